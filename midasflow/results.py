"""The results of a refinement run: an xarray Dataset over (group, eta), its stores and exports.

:func:`assemble_results` turns the executors' list of
:class:`~midasflow.refinement.lineouts.LineoutResult` into the results Dataset, including the lattice
strain of every lineout against a reference cell and the strain-tensor fits
(:mod:`midasflow.strain`). :func:`write_results` writes ``results.zarr``,
``refinement_summary.json`` (MIDAS ``gsas_ii_refine.py`` fields plus ω, η and strain) and, unless
``no_export``, ``hist_NNNN_data.csv`` and ``hist_NNNN_<phase>.cif`` per refined lineout.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from midasflow import strain as strain_mod
from midasflow.refinement.result import FLAGS
from midasflow.io.atomic import atomic_output, write_text_atomic

CELL_VARS = ("a_a", "b_a", "c_a", "alpha_deg", "beta_deg", "gamma_deg", "volume_a3")
#: MIDAS's names of the same cell terms in ``refinement_summary.json`` (``phases[].cell``).
MIDAS_CELL_KEYS = ("a", "b", "c", "alpha", "beta", "gamma", "volume")
#: results.zarr status -> MIDAS's word in refinement_summary.json.
MIDAS_STATUS = {"ok": "success", "failed": "failed", "skipped": "skipped"}
#: Between a lineout's warnings in results.zarr's ``warnings`` (each warning is one line).
WARNING_SEPARATOR = "\n"
#: Quality flags that keep a lineout out of the strain and tensor fits unless ``include_flagged``
#: (``docs/quality_flags.md``): each says the cell or its esd cannot be taken at face value — a
#: parameter ran into its bound (the covariance no longer describes it), a stage was undone (part
#: of the model never refined), an esd is zero or non-finite, or the fit is worse than the user's
#: ``max_rwp``. ``unphysical_profile`` and ``high_correlation`` are not among them: both describe
#: the parametrisation, not the cell — GSAS-II's own minima often carry negative widths (its PbSO4
#: minimum has X < 0), and a correlation, even of the cell with SH/L (0.99 on 0.05° peaks at
#: λ 0.41 Å), is already in the cell's esd, the marginal of the full covariance. Nor is
#: ``texture_rolled_back``: an undone optional texture stage leaves the complete refinement
#: without texture, the right result for an untextured lineout.
STRAIN_EXCLUDING_FLAGS: tuple[str, ...] = ("at_bound", "rolled_back", "bad_esd", "rwp_above_max")
#: per-lineout variable → GSAS-II parameter name
PROFILE_VARS = {"zero": "Zero", "u": "U", "v": "V", "w": "W", "x": "X", "y": "Y", "shl": "SH/L", "scale": "Scale"}


def _nan_grid(*shape: int) -> np.ndarray:
    return np.full(shape, np.nan)


def _phase_names(results: Sequence[Any]) -> list[str]:
    names: list[str] = []
    for r in results:
        for name in getattr(r.pattern, "cells", {}) or {}:
            if name not in names:
                names.append(name)
    return names


def reflection_weights(pattern: Any, phase: str) -> tuple[dict[str, np.ndarray], np.ndarray] | None:
    """The phase's reflections inside the fitted range and the weight each puts on its cell.

    The native engine's ``cell_weight`` column where the table has one (cubic phases): the
    change of the refined ln a when that reflection alone is strained, through the whole
    least-squares estimator (:func:`midasflow.refinement.engine._cell_weights`; they sum to ~1,
    and reflections whose shift SH/L or the widths absorb weigh less). Otherwise intensity ×
    tan²θ / FWHM² (the information a reflection position carries about the cell: Poisson
    statistics, ∂2θ/∂ln d = −2 tan θ), which ignores those correlations: on the strained CeO₂
    scan of the pull test (cell and SH/L correlated at −0.7, the 111 reflection's exact weight
    −0.15) it biased the tensor's xy component (pull means +0.15 and +0.36 on two sets of 50
    realisations; −0.04 and +0.16 with the exact weights). Engine weights that do not sum to
    about 1 (a cell the fit could not move) fall back to the formula. Returns ``(table
    restricted to those reflections, weights)``, or None without a usable reflection table.
    """
    from midasflow.profile import tch_fwhm_eta

    fitted = getattr(pattern, "fitted_range_deg", None)
    if fitted is None:  # a result that is not a PatternResult: its fitted points
        x = np.asarray(getattr(pattern, "tth_deg", ()), dtype=float)
        fitted = (x.min(), x.max()) if x.size else None
    refl = (getattr(pattern, "reflections", None) or {}).get(phase)
    if refl is None or fitted is None or not {"tth_deg", "intensity", "sig2", "gam"} <= set(refl):
        return None
    tth = np.asarray(refl["tth_deg"], dtype=float)
    inten = np.asarray(refl["intensity"], dtype=float)
    inside = (tth >= fitted[0]) & (tth <= fitted[1]) & np.isfinite(inten) & (inten > 0)
    if not inside.any():
        return None
    table = {key: np.asarray(col)[inside] for key, col in refl.items()}
    if "cell_weight" in refl and abs(float(np.sum(table["cell_weight"]))) > 0.5:
        return table, np.asarray(table["cell_weight"], dtype=float)
    fwhm = np.array([tch_fwhm_eta(s2, g)[0] for s2, g in
                     zip(np.asarray(refl["sig2"])[inside], np.asarray(refl["gam"])[inside])])
    theta = np.deg2rad(tth[inside]) / 2.0
    return table, inten[inside] * np.tan(theta) ** 2 / fwhm**2


def effective_theta_deg(pattern: Any, phase: str) -> float:
    """Bragg angle θ (deg) the refined cell of ``phase`` stands for in one lineout.

    A refined cell is a least-squares compromise between reflections at different θ; each
    reflection pulls on it in proportion to the information its position carries about the cell:
    intensity × tan²θ / FWHM² (Poisson statistics, ∂2θ/∂ln d = −2 tan θ). The mean θ under those
    weights, over the phase's reflections inside the fitted range (``pattern.reflections[phase]``
    with ``tth_deg``, ``intensity``, ``sig2``, ``gam``); the non-cubic lattice strain of the
    lineout averages d/d₀ − 1 over the same reflections with the same weights. Without
    reflections: the mean over the fitted points weighted by the net calculated intensity
    (calc − bkg). The strain fits use the reflections themselves (:func:`_reflection_thetas`,
    :func:`midasflow.strain.lineout_design`); this θ labels plots.
    """
    theta, weight = _reflection_thetas(pattern, phase)
    return float(np.average(theta, weights=weight)) if theta.size else float("nan")


def _reflection_thetas(pattern: Any, phase: str) -> tuple[np.ndarray, np.ndarray]:
    """Bragg angles θ (deg) of the reflections a lineout's cell stands for and their weights
    (:func:`reflection_weights`); without a reflection table, one θ: half the mean 2θ of the
    fitted points weighted by the net calculated intensity (none when nothing is above it)."""
    weighted = reflection_weights(pattern, phase)
    if weighted is not None:
        table, weight = weighted
        return np.asarray(table["tth_deg"], dtype=float) / 2.0, weight
    x = np.asarray(getattr(pattern, "tth_deg", ()), dtype=float)
    net = np.asarray(getattr(pattern, "calc", ()), dtype=float) - np.asarray(getattr(pattern, "bkg", ()), dtype=float)
    good = np.isfinite(net) & (net > 0)
    if not good.any():
        return np.zeros(0), np.zeros(0)
    return np.array([0.5 * np.average(x[good], weights=net[good])]), np.ones(1)


def _lineout_strain(pattern: Any, phase: str, ref_cell: Sequence[float]) -> tuple[float, float]:
    cell = pattern.cells[phase]
    esd = (getattr(pattern, "cell_esds", {}) or {}).get(phase)
    if strain_mod.is_cubic(ref_cell, rtol=1e-6) and strain_mod.is_cubic(cell, rtol=1e-6):
        return strain_mod.lattice_strain(cell, ref_cell, cell_esd=esd)
    weighted = reflection_weights(pattern, phase)
    if weighted is None or not {"h", "k", "l"} <= set(weighted[0]):
        return float("nan"), float("nan")
    table, weight = weighted
    hkl = np.column_stack([table["h"], table["k"], table["l"]])
    return strain_mod.lattice_strain(cell, ref_cell, cell_esd=esd, hkl=hkl, weights=weight)


def _eta_width(eta_width_deg: float | None, results: Sequence[Any]) -> float:
    """The η bin width: given, else the spacing of the lineouts' η centres (0 for one bin)."""
    if eta_width_deg is not None:
        return float(eta_width_deg)
    centres = np.unique([float(r.eta_deg) for r in results if np.isfinite(r.eta_deg)])
    return float(np.min(np.diff(centres))) if centres.size > 1 else 0.0


def assemble_results(
    results: Sequence[Any],
    *,
    ref_cells: Mapping[str, Sequence[float]] | None = None,
    phase_names: Sequence[str] | None = None,
    attrs: Mapping[str, Any] | None = None,
    include_flagged: bool = False,
    omega_frames_deg: Sequence[Sequence[float]] | None = None,
    eta_width_deg: float | None = None,
    texture: str | None = None,
    sh_order: int = 4,
) -> xr.Dataset:
    """Build the results Dataset from the executors' results (batch and stream mode alike).

    Parameters
    ----------
    results : sequence of LineoutResult
        Every lineout of the plan (skipped and failed ones included), any order.
    ref_cells : mapping phase name → (a, b, c, α, β, γ), optional
        Reference (unstrained) cells; no strain is computed for phases without one.
    phase_names : sequence of str, optional
        Phase order; default the order in which the patterns name them.
    attrs : mapping, optional
        Extra attributes (e.g. ``data_file``); JSON-serialisable.
    include_flagged : bool
        Let lineouts carrying a flag of :data:`STRAIN_EXCLUDING_FLAGS` into the strain fits
        (default: left out; ``in_strain_fit`` says which lineouts were used).
    omega_frames_deg : sequence (per ω-group) of sequences of float, degrees, optional
        ω of the frames summed into each group; the sample-frame design of a lineout averages
        over them (default: the mid-group ω alone).
    eta_width_deg : float, optional
        η bin width, degrees; the design averages over it (default: the spacing of the η
        centres; 0 for a single η bin).
    texture : {"md", "sh"}, optional
        The texture stage the lineouts were refined with: their texture parameters and the
        joint texture fit to order ``sh_order`` are added (:func:`_with_texture`).
    sh_order : int
        Order of the joint spherical-harmonics texture fit.

    Returns
    -------
    xarray.Dataset
        dims ``group``, ``eta``, ``phase``, ``component`` (``strain.COMPONENTS``); coords
        ``omega_deg`` (group, mid-group ω), ``eta_deg`` (eta), ``histogram_index`` (group, eta).
        Per phase (phase, group, eta): ``a_a b_a c_a alpha_deg beta_deg gamma_deg volume_a3``
        and ``<name>_esd``, ``phase_scale``, ``phase_fraction`` (+ ``_esd``), ``strain``,
        ``strain_esd``, ``strain_theta_deg``. Per lineout (group, eta): ``rwp``, ``rp``, ``gof``,
        ``chi2``, ``zero u v w x y shl scale`` (GSAS-II Zero, U, V, W, X, Y, SH/L, Scale),
        ``n_points``, ``status``, ``message``, ``warnings`` (str; "; "-joined), ``elapsed_s``,
        ``worker`` (address of the Dask worker that refined it; "" in the calling process),
        ``seeded_from`` ("group mean", "hist_NNNN" or "": where its start values came from),
        ``recipe`` ("full", "warm" or "full after warm": :data:`midasflow.refinement.warm.RECIPES`),
        ``flags`` (group, eta, flag) bool with coord ``flag`` = the names of
        :data:`midasflow.refinement.result.FLAGS` (``results.flags.sel(flag="at_bound")``,
        ``results.flags.any("flag")``), ``notes`` (str; "; "-joined).
        ``in_strain_fit`` (phase, group, eta) bool: the lineout entered the strain fits (refined,
        strain finite, and no flag of :data:`STRAIN_EXCLUDING_FLAGS` unless ``include_flagged``).
        Strain fits: ``strain_lab`` / ``strain_lab_esd`` (phase, group, component) and
        ``strain_lab_status`` (phase, group) from :func:`midasflow.strain.fit_strain_orientation`
        per ω-group; ``strain_sample`` / ``strain_sample_esd`` (phase, component) and
        ``strain_sample_status`` (phase) from :func:`midasflow.strain.fit_strain_tensor` when
        there are several ω-groups. attrs: ``ref_cells`` and ``strain_fits`` (JSON) plus ``attrs``.
        Per reflection, when the lineouts have reflection tables: ``I``, ``I_esd`` and
        ``pole_direction``; with ``texture`` also ``po_param`` and the joint texture fit
        (:func:`_with_texture`).
    """
    results = list(results)
    if not results:
        raise ValueError("assemble_results: no lineout results (empty plan)")
    n_groups = 1 + max(r.group for r in results)
    n_eta = 1 + max(r.eta_index for r in results)
    phases = list(phase_names) if phase_names is not None else _phase_names(results)
    n_ph = len(phases)
    omega = _nan_grid(n_groups)
    eta = _nan_grid(n_eta)
    hist = np.full((n_groups, n_eta), -1, dtype=np.int64)
    per_phase = {name: _nan_grid(n_ph, n_groups, n_eta) for name in
                 [*CELL_VARS, *(f"{v}_esd" for v in CELL_VARS), "phase_scale", "phase_fraction",
                  "phase_fraction_esd", "strain", "strain_esd", "strain_theta_deg"]}
    per_lineout = {name: _nan_grid(n_groups, n_eta) for name in
                   ["rwp", "rp", "gof", "chi2", "elapsed_s", *PROFILE_VARS]}
    n_points = np.zeros((n_groups, n_eta), dtype=np.int64)
    status = np.full((n_groups, n_eta), "skipped", dtype=object)
    message = np.full((n_groups, n_eta), "", dtype=object)
    warnings = np.full((n_groups, n_eta), "", dtype=object)
    notes = np.full((n_groups, n_eta), "", dtype=object)
    worker = np.full((n_groups, n_eta), "", dtype=object)
    seeded_from = np.full((n_groups, n_eta), "", dtype=object)
    recipe = np.full((n_groups, n_eta), "", dtype=object)
    flag_names = list(FLAGS)
    flags = np.zeros((n_groups, n_eta, len(flag_names)), dtype=bool)
    n_c = len(strain_mod.COMPONENTS)
    design_lab, design_sample = _nan_grid(n_ph, n_groups, n_eta, n_c), _nan_grid(n_ph, n_groups, n_eta, n_c)
    omega_frames = [None] * n_groups if omega_frames_deg is None else list(omega_frames_deg)
    width = _eta_width(eta_width_deg, results)
    ref_cells = dict(ref_cells or {})
    for r in results:
        g, e = r.group, r.eta_index
        omega[g], eta[e], hist[g, e] = r.omega_deg, r.eta_deg, getattr(r, "histogram", -1)
        n_points[g, e], status[g, e], message[g, e] = r.n_points, r.status, r.message
        per_lineout["elapsed_s"][g, e], worker[g, e] = r.elapsed_s, r.worker
        seeded_from[g, e] = getattr(r, "seeded_from", "")
        recipe[g, e] = getattr(r, "recipe", "full") if r.status != "skipped" else ""
        p = r.pattern
        if p is None:
            continue
        warnings[g, e] = WARNING_SEPARATOR.join(getattr(p, "warnings", []) or [])
        notes[g, e] = "; ".join(getattr(p, "notes", []) or [])
        for name in getattr(p, "flags", ()) or ():
            if name in FLAGS:
                flags[g, e, flag_names.index(name)] = True
        for name in ("rwp", "rp", "gof", "chi2"):
            per_lineout[name][g, e] = getattr(p, name, np.nan)
        for name, key in PROFILE_VARS.items():
            per_lineout[name][g, e] = p.values.get(key, np.nan)
        if r.status != "ok":
            continue
        for k, ph in enumerate(phases):
            if ph not in p.cells:
                continue
            cell, esd = p.cells[ph], (p.cell_esds or {}).get(ph, (np.nan,) * 7)
            for j, name in enumerate(CELL_VARS):
                per_phase[name][k, g, e] = cell[j]
                per_phase[f"{name}_esd"][k, g, e] = esd[j]
            per_phase["phase_scale"][k, g, e] = p.values.get(f"{k}:0:Scale", 1.0 if k == 0 else np.nan)
            frac = (p.phase_fractions or {}).get(ph, (np.nan, np.nan))
            per_phase["phase_fraction"][k, g, e], per_phase["phase_fraction_esd"][k, g, e] = frac
            if ph in ref_cells:
                eps, eps_esd = _lineout_strain(p, ph, ref_cells[ph])
                per_phase["strain"][k, g, e], per_phase["strain_esd"][k, g, e] = eps, eps_esd
                theta, weight = _reflection_thetas(p, ph)
                if theta.size:
                    per_phase["strain_theta_deg"][k, g, e] = np.average(theta, weights=weight)
                    design_lab[k, g, e] = strain_mod.lineout_design(
                        theta, r.eta_deg, weights=weight, eta_width_deg=width)
                    om = omega_frames[g] if omega_frames[g] is not None else [r.omega_deg]
                    design_sample[k, g, e] = strain_mod.lineout_design(
                        theta, r.eta_deg, weights=weight, eta_width_deg=width,
                        omega_deg=om)

    excluding = [flag_names.index(f) for f in STRAIN_EXCLUDING_FLAGS]
    clean = np.ones((n_groups, n_eta), dtype=bool) if include_flagged else ~flags[:, :, excluding].any(axis=-1)
    in_fit = (np.isfinite(per_phase["strain"]) & np.isfinite(per_phase["strain_esd"])
              & np.isfinite(design_sample).all(axis=-1) & clean[None])
    lab, lab_esd = _nan_grid(n_ph, n_groups, n_c), _nan_grid(n_ph, n_groups, n_c)
    lab_status = np.full((n_ph, n_groups), "not run", dtype=object)
    sample, sample_esd = _nan_grid(n_ph, n_c), _nan_grid(n_ph, n_c)
    sample_status = np.full(n_ph, "not run", dtype=object)
    fits: dict[str, Any] = {}
    for k, ph in enumerate(phases):
        if ph not in ref_cells:
            continue
        eps = np.where(in_fit[k], per_phase["strain"][k], np.nan)  # left out: NaN, ignored
        esd, th = per_phase["strain_esd"][k], per_phase["strain_theta_deg"][k]
        fits[ph] = {"orientations": [], "sample": None}
        for g in range(n_groups):
            fit = strain_mod.fit_strain_orientation(eta, th[g], eps[g], esd[g],
                                                    design=design_lab[k, g])
            lab[k, g], lab_esd[k, g], lab_status[k, g] = fit.values, fit.esds, fit.status
            fits[ph]["orientations"].append({"group": g, "omega_deg": float(omega[g]), **fit.to_dict()})
        groups_with_data = np.isfinite(eps).any(axis=1).sum()
        if groups_with_data > 1:
            om = np.broadcast_to(omega[:, None], eps.shape)
            fit = strain_mod.fit_strain_tensor(np.broadcast_to(eta, eps.shape), th, om, eps, esd,
                                               design=design_sample[k])
            sample[k], sample_esd[k], sample_status[k] = fit.values, fit.esds, fit.status
            fits[ph]["sample"] = fit.to_dict()

    ge, pge = ("group", "eta"), ("phase", "group", "eta")
    data_vars: dict[str, Any] = {name: (pge, arr) for name, arr in per_phase.items()}
    data_vars.update({name: (ge, arr) for name, arr in per_lineout.items()})
    data_vars.update(
        n_points=(ge, n_points), status=(ge, status.astype(str)), message=(ge, message.astype(str)),
        warnings=(ge, warnings.astype(str)), notes=(ge, notes.astype(str)), worker=(ge, worker.astype(str)),
        seeded_from=(ge, seeded_from.astype(str)), recipe=(ge, recipe.astype(str)),
        flags=(("group", "eta", "flag"), flags, {"flag_meanings": json.dumps(FLAGS)}),
        in_strain_fit=(pge, in_fit),
        strain_lab=(("phase", "group", "component"), lab),
        strain_lab_esd=(("phase", "group", "component"), lab_esd),
        strain_lab_status=(("phase", "group"), lab_status.astype(str)),
        strain_sample=(("phase", "component"), sample),
        strain_sample_esd=(("phase", "component"), sample_esd),
        strain_sample_status=("phase", sample_status.astype(str)),
    )
    out_attrs = {"ref_cells": json.dumps({k: [float(v) for v in c[:6]] for k, c in ref_cells.items()}),
                 "strain_fits": json.dumps(fits), "strain_frame": "MIDAS lab (x beam, y horizontal, z up); "
                 "sample frame = lab rotated by omega about +z",
                 "strain_excluding_flags": json.dumps([] if include_flagged else list(STRAIN_EXCLUDING_FLAGS)),
                 **dict(attrs or {})}
    ds = xr.Dataset(
        data_vars,
        coords={"group": np.arange(n_groups), "eta": np.arange(n_eta), "phase": np.array(phases, dtype=str),
                "component": np.array(strain_mod.COMPONENTS), "flag": np.array(flag_names, dtype=str),
                "omega_deg": ("group", omega),
                "eta_deg": ("eta", eta), "histogram_index": (ge, hist)},
        attrs=out_attrs,
    )
    return _with_texture(ds, results, phases, texture, sh_order)


def _with_texture(results: xr.Dataset, lineouts: Sequence[Any], phase_names: Sequence[str],
                  texture: str | None, sh_order: int) -> xr.Dataset:
    """The results with the per-reflection intensities and pole directions
    (:func:`midasflow.texture.polefigure.reflection_dataset`) and, when a texture stage ran, the
    lineouts' texture parameters (:func:`~midasflow.texture.polefigure.lineout_texture_dataset`)
    and the joint texture fit to order ``sh_order`` (:func:`~midasflow.texture.polefigure.add_texture_fit`)."""
    from midasflow.texture.polefigure import add_texture_fit, lineout_texture_dataset, reflection_dataset

    refl = reflection_dataset(lineouts, phase_names, results.sizes["group"], results.sizes["eta"])
    if refl.sizes["reflection"] == 0:
        return results
    results = xr.merge([results, refl], combine_attrs="no_conflicts")
    if texture is None:
        return results
    per_lineout = lineout_texture_dataset(lineouts, phase_names, results.sizes["group"], results.sizes["eta"])
    if per_lineout.sizes["po_name"]:
        results = xr.merge([results, per_lineout], combine_attrs="no_conflicts")
    return add_texture_fit(results, order=sh_order)


def _num(v: Any) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None


def flag_counts(ds: xr.Dataset) -> dict[str, int]:
    """{flag: number of refined ("ok") lineouts carrying it} for every flag of
    :data:`midasflow.refinement.result.FLAGS` (zeros included; all zero without ``flags``)."""
    counts = dict.fromkeys(FLAGS, 0)
    if "flags" in ds:
        ok = ds["status"].values == "ok"
        for name, n in zip(ds["flag"].values.tolist(), ds["flags"].values[ok].sum(axis=0)):
            counts[str(name)] = int(n)
    return counts


def run_failure(ds: xr.Dataset) -> str | None:
    """Why a run refined nothing, in one line; None when at least one lineout was refined.

    Every lineout failed: the count and the most common error. Every lineout skipped: too few
    usable points.
    """
    status = ds["status"].values
    if (status == "ok").any():
        return None
    failed = status == "failed"
    n_failed, n_skipped = int(failed.sum()), int((status == "skipped").sum())
    if not n_failed:
        return (f"no lineout refined: all {n_skipped} lineouts were skipped (too few usable points "
                "in every lineout)")
    message, count = Counter(ds["message"].values[failed].tolist()).most_common(1)[0]
    skipped = f", {n_skipped} skipped" if n_skipped else ""
    return (f"no lineout refined: all {n_failed} refined lineouts failed{skipped}; most common "
            f"error ({count} of {n_failed}): {message or '(no message)'}")


def summary_dict(ds: xr.Dataset, folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """``refinement_summary.json`` content from a results Dataset: MIDAS's schema and more.

    MIDAS's fields (``gsas_ii_refine.py``), with its values: ``data_file``, ``total_histograms``
    (the lineouts that are histograms, :mod:`midasflow.refinement.numbering`), ``succeeded``,
    ``failed``, ``skipped`` (over those), ``histograms`` (sorted by number) and ``mean_Rwp``
    (mean over the succeeded ones; absent when none succeeded). Per histogram:
    ``histogram_index`` (MIDAS's number, the ``NNNN`` of ``hist_NNNN``), ``gpx`` (the path of
    its GSAS-II project when one was written, else null), ``status`` ("success", "failed",
    "skipped"), and as MIDAS writes them ``Rwp`` and ``phases`` [{``name``, ``cell`` {``a``,
    ``b``, ``c``, ``alpha``, ``beta``, ``gamma``, ``volume``}}] for a success, ``warnings``
    (list) when there are any, ``error`` for a failure, ``message`` for a skipped one.

    midasflow's additions: per histogram ``group``, ``eta_index``, ``omega_deg``, ``eta_deg``,
    ``n_points``, ``seeded_from`` (where its start values came from), ``recipe`` ("full",
    "warm" or "full after warm"), ``flags`` (names) and
    ``strain`` {phase: {``eps``, ``esd``, ``in_fit``}};
    top level ``lineouts_not_histograms`` (lineouts of η columns that are no histogram for
    GSAS-II's importer) and ``other_lineouts`` (those of them midasflow refined, entries as a
    histogram's without ``histogram_index`` and ``gpx``), ``strain`` (the fits, as
    :meth:`midasflow.strain.StrainFit.to_dict`), ``flag_counts`` ({flag: refined lineouts
    carrying it}, every flag of :data:`midasflow.refinement.result.FLAGS`), ``flagged`` (refined
    lineouts with any flag), ``strain_excluding_flags`` (the flags that kept lineouts out of the
    strain fits; empty with ``include_flagged``), ``tth_axis`` (the lineouts' 2θ: "effective",
    each bin's effective 2θ, docs/caking_2theta.md; "bin_centre" for a cake without it; "given"
    for a list of lineouts) and, when no lineout was refined, ``error``
    (:func:`run_failure`). The (group, η) grid of every lineout stays in results.zarr.

    Parameters
    ----------
    ds : xarray.Dataset
        From :func:`assemble_results`.
    folder : path, optional
        The output folder, where ``gpx`` paths are looked for (``hist_NNNN.gpx``, or
        ``gsas2/hist_NNNN/hist_NNNN.gpx`` of the GSAS-II engine).
    """
    status = ds["status"].values
    rwp = ds["rwp"].values
    # plain numpy arrays up front: xarray indexing inside the loop took ~1.7 ms a lineout
    hist_index, omega, eta = (ds[v].values for v in ("histogram_index", "omega_deg", "eta_deg"))
    n_points, message, warn = ds["n_points"].values, ds["message"].values, ds["warnings"].values
    seeds = ds["seeded_from"].values if "seeded_from" in ds else np.full(status.shape, "")
    recipes = ds["recipe"].values if "recipe" in ds else np.full(status.shape, "full")
    cells = np.stack([ds[v].values for v in CELL_VARS], axis=-1)  # (phase, group, eta, 7)
    strain, strain_esd = ds["strain"].values, ds["strain_esd"].values
    in_fit = ds["in_strain_fit"].values if "in_strain_fit" in ds else np.isfinite(strain)
    phase_names = ds["phase"].values.tolist()
    flag_names = ds["flag"].values.tolist() if "flags" in ds else []
    flags = ds["flags"].values if "flags" in ds else np.zeros(status.shape + (0,), dtype=bool)
    from midasflow.refinement.numbering import histogram_name

    histogram = hist_index >= 0
    gpx = _gpx_paths(folder)
    hists, others = [], []
    refined_other = ~histogram & (status != "skipped")
    for g, e in zip(*np.nonzero(histogram | refined_other)):
        g, e = int(g), int(e)
        number, state = int(hist_index[g, e]), str(status[g, e])
        entry: dict[str, Any] = ({"histogram_index": number, "gpx": gpx.get(histogram_name(number))}
                                 if number >= 0 else {})
        entry["status"] = MIDAS_STATUS.get(state, state)
        if state == "ok":
            entry["Rwp"] = _num(rwp[g, e])
            entry["phases"] = [
                {"name": ph, "cell": dict(zip(MIDAS_CELL_KEYS, (float(v) for v in cells[k, g, e])))}
                for k, ph in enumerate(phase_names) if np.isfinite(cells[k, g, e]).all()]
        elif state == "failed":
            entry["error"] = str(message[g, e])
        else:
            entry["message"] = str(message[g, e])
        lines = [w for w in str(warn[g, e]).split(WARNING_SEPARATOR) if w]
        if lines:
            entry["warnings"] = lines
        strains = {}
        for k, ph in enumerate(phase_names):
            if np.isfinite(strain[k, g, e]):
                strains[ph] = {"eps": float(strain[k, g, e]), "esd": _num(strain_esd[k, g, e]),
                               "in_fit": bool(in_fit[k, g, e])}
        entry.update({"group": g, "eta_index": e, "omega_deg": float(omega[g]), "eta_deg": float(eta[e]),
                      "n_points": int(n_points[g, e]), "seeded_from": str(seeds[g, e]),
                      "recipe": str(recipes[g, e]),
                      "flags": [name for name, on in zip(flag_names, flags[g, e]) if on],
                      "strain": strains})
        (hists if number >= 0 else others).append(entry)
    hists.sort(key=lambda h: h["histogram_index"])
    counts = {word: sum(h["status"] == word for h in hists) for word in ("success", "failed", "skipped")}
    ok = (status == "ok") & histogram
    summary: dict[str, Any] = {
        "data_file": str(ds.attrs.get("data_file", "")),
        "total_histograms": len(hists),
        "succeeded": counts["success"],
        "failed": counts["failed"],
        "skipped": counts["skipped"],
        "histograms": hists,
    }
    if ok.any():
        summary["mean_Rwp"] = float(np.mean(rwp[ok]))
    summary.update({
        "lineouts_not_histograms": int((~histogram).sum()),
        "other_lineouts": others,
        "flag_counts": flag_counts(ds),
        "flagged": int((flags.any(axis=-1) & (status == "ok")).sum()),
        "strain_excluding_flags": json.loads(ds.attrs.get("strain_excluding_flags", "[]")),
        "strain": json.loads(ds.attrs.get("strain_fits", "{}")),
        "tth_axis": str(ds.attrs.get("tth_axis", "bin_centre")),
    })
    failure = run_failure(ds)
    if failure:
        summary["error"] = failure
    return summary


def _gpx_paths(folder: str | os.PathLike | None) -> dict[str, str]:
    """Histogram stem -> the GSAS-II project written for it in ``folder`` (``<stem>.gpx``, as
    midasflow's engine writes it, over ``gsas2/<stem>/<stem>.gpx``, the GSAS-II backend's
    working project), from one listing of each place."""
    if folder is None:
        return {}
    folder = Path(folder).resolve()
    found = {}
    if (folder / "gsas2").is_dir():
        found = {entry.name: str(folder / "gsas2" / entry.name / f"{entry.name}.gpx")
                 for entry in os.scandir(folder / "gsas2")
                 if entry.is_dir() and os.path.isfile(os.path.join(entry.path, f"{entry.name}.gpx"))}
    if folder.is_dir():
        found.update({entry.name[:-4]: str(folder / entry.name) for entry in os.scandir(folder)
                      if entry.name.endswith(".gpx") and entry.is_file()})
    return found


def write_results_zarr(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write the results Dataset as a zarr (format 2) directory store, atomically (temporary name, rename)."""
    with atomic_output(path) as tmp:
        # zarr format 2: its fixed-width string dtype (status, messages) is specified; v3's is not
        ds.to_zarr(tmp, mode="w", consolidated=True, zarr_format=2)
    return Path(path)


def open_results(path: str | os.PathLike) -> xr.Dataset:
    """Read ``results.zarr`` back (loaded into memory)."""
    with xr.open_zarr(path, consolidated=True) as ds:
        return ds.load()


def write_results(ds: xr.Dataset, folder: str | os.PathLike,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write ``results.zarr`` and ``refinement_summary.json`` (atomic each).

    The per-lineout exports are written by the tasks that refine the lineouts
    (:class:`~midasflow.refinement.backends.ExportingBackend`, :func:`export_lineout`).

    Parameters
    ----------
    ds : xarray.Dataset
        From :func:`assemble_results`.
    folder : path
        Output folder (created); GSAS-II projects found in it are named in the summary.
    extra : mapping, optional
        Top-level entries added to the summary (the stream's ``"stream"``).

    Returns
    -------
    dict
        ``{"results": Path, "summary": Path}``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    zarr_path = write_results_zarr(ds, folder / "results.zarr")
    summary_path = folder / "refinement_summary.json"
    summary = {**summary_dict(ds, folder), **(extra or {})}
    write_text_atomic(summary_path, json.dumps(summary, indent=1))
    return {"results": zarr_path, "summary": summary_path}


#: What :func:`export_lineout` can write: ``hist_NNNN_data.csv``, ``hist_NNNN_<phase>.cif`` and
#: the GSAS-II project ``hist_NNNN.gpx``.
EXPORT_KINDS = ("csv", "cif", "gpx")
#: Columns of GSAS-II's histogram CSV export (``G2export_csv.ExportPowderCSV``).
CSV_COLUMNS = ("x", "y_obs", "weight", "y_calc", "y_bkg", "Q")


def export_lineout(spec: Any, pattern: Any, folder: str | os.PathLike, instrument: Any = None,
                   kinds: Sequence[str] = EXPORT_KINDS, mode: str = "rietveld",
                   po_axis: Sequence[int] = (0, 0, 1),
                   limits: Sequence[float] | None = None) -> list[Path]:
    """Write one refined lineout's ``<name>_data.csv`` (:func:`write_lineout_csv`),
    ``<name>_<phase>.cif`` files and GSAS-II project ``<name>.gpx``
    (:func:`midasflow.io.gpx.write_gpx`) as ``kinds`` says ("csv", "cif", "gpx").

    ``<name>`` is the lineout's file stem ``spec.name``: ``hist_NNNN`` with MIDAS's histogram
    number. ``instrument`` (an :class:`~midasflow.instrument.Instrument`) gives the CSV's
    wavelength and instrument lines and the project's instrument parameters; ``mode`` and
    ``po_axis`` are the refinement's ("rietveld" or "lebail"; the March–Dollase axis), ``limits``
    its 2θ limits (degrees; None: the whole lineout): the project holds the whole lineout with
    GSAS-II's limits on the refined range. A phase
    setting GSAS-II cannot hold, or a pattern without the fitted points' weights, leaves the
    project out with a warning on ``pattern`` (the lineout's result stands).
    """
    folder = Path(folder)
    written = []
    if "csv" in kinds:
        written.append(write_lineout_csv(folder / f"{spec.name}_data.csv", spec, pattern, instrument))
    if "cif" in kinds:
        written += pattern.write_cifs(folder, spec.name)
    if "gpx" in kinds:
        from midasflow.io.gpx import NoFittedPattern, UnsupportedSetting, write_gpx

        try:
            written.append(write_gpx(
                folder / f"{spec.name}.gpx", pattern, instrument, mode=mode, po_axis=po_axis,
                histogram_name=f"PWDR {spec.name}", omega_deg=spec.omega_deg, eta_deg=spec.eta_deg,
                data=(spec.tth_deg, spec.intensity, spec.sigma), limits=limits,
                comments=[f"midasflow lineout {spec.name}: omega {spec.omega_deg:g} deg, "
                          f"eta {spec.eta_deg:g} deg"]))
        except (UnsupportedSetting, NoFittedPattern) as exc:
            pattern.warnings.append(f"no {spec.name}.gpx: {exc}")
    return written


def exports_of(spec: Any, pattern: Any, folder: str | os.PathLike,
               kinds: Sequence[str] = EXPORT_KINDS) -> list[Path]:
    """The files :func:`export_lineout` writes for this lineout."""
    folder = Path(folder)
    paths = [folder / f"{spec.name}_data.csv"] if "csv" in kinds else []
    if "cif" in kinds:
        paths += [folder / f"{spec.name}_{ph.name}.cif" for ph in getattr(pattern, "phases", ()) or ()]
    if "gpx" in kinds:
        paths.append(folder / f"{spec.name}.gpx")
    return paths


def write_lineout_csv(path: str | os.PathLike, spec: Any, pattern: Any, instrument: Any = None) -> Path:
    """A lineout and its fit as GSAS-II's histogram CSV export writes it (atomic).

    Layout (``GSASII/exports/G2export_csv.py``, ``ExportPowderCSV``): ``"Histogram","<name>"``,
    one ``"Instparm: <key>",<value>`` line per instrument term (refined values; Lam and Zero with
    six decimals, the others with two, as GSAS-II writes them), ``"Samparm: <key>",<value>``
    lines, then the columns ``"x","y_obs","weight","y_calc","y_bkg","Q"`` and one row per point
    of the lineout (``%.6g``). x is 2θ (deg), y_obs the counts per frame, weight = 1/σ²,
    y_calc and y_bkg the fit (0 outside the refined points, as GSAS-II leaves them), Q = 4π
    sin((x − Zero)/2)/λ (Å⁻¹).
    """
    from midasflow.io.atomic import atomic_output

    x = np.asarray(spec.tth_deg, dtype=np.float64)
    y = np.asarray(spec.intensity, dtype=np.float64)
    sigma = np.asarray(spec.sigma, dtype=np.float64)
    with np.errstate(divide="ignore"):
        weight = np.where(sigma > 0, 1.0 / sigma**2, 0.0)
    calc, bkg = np.zeros_like(x), np.zeros_like(x)
    fx = np.asarray(getattr(pattern, "tth_deg", ()), dtype=np.float64)
    if fx.size:
        at = np.clip(np.searchsorted(x, fx), 0, max(x.size - 1, 0))
        same = x[at] == fx
        calc[at[same]] = np.asarray(pattern.calc, dtype=np.float64)[same]
        bkg[at[same]] = np.asarray(pattern.bkg, dtype=np.float64)[same]
    values = dict(getattr(pattern, "values", {}) or {})
    inst = {} if instrument is None else instrument.to_dict()
    zero = float(values.get("Zero", inst.get("Zero", 0.0)))
    lam = float(getattr(instrument, "wavelength_a", math.nan)) if instrument is not None else math.nan
    q = 4 * np.pi * np.sin(np.radians(x - zero) / 2) / lam
    lines = [f'"Histogram","PWDR {spec.name} omega={spec.omega_deg:g} eta={spec.eta_deg:g}"']
    for key in ("Type", "Bank", "Lam", "Lam1", "Lam2", "I(L2)/I(L1)", "Zero", "Polariz.", "Azimuth",
                "U", "V", "W", "X", "Y", "Z", "SH/L"):
        if key not in inst:
            continue
        value = values.get(key, inst[key])
        if key == "Type":
            lines.append(f'"Instparm: {key}","{value}"')
        elif key in ("Lam", "Lam1", "Lam2", "Zero"):
            lines.append(f'"Instparm: {key}",{float(value):10.6f}')
        else:
            lines.append(f'"Instparm: {key}",{float(value):10.2f}')
    if instrument is not None:
        if instrument.instr_name:
            lines.append(f'"Samparm: InstrName",{instrument.instr_name}')
        lines.append(f'"Samparm: Type",{instrument.diff_type}')
        for key, value in (("Azimuth", 0.0), ("Gonio. radius", instrument.gonio_radius_mm),
                           ("Phi", spec.omega_deg),
                           ("DisplaceX", values.get("DisplaceX", instrument.displace_x_um)),
                           ("DisplaceY", values.get("DisplaceY", instrument.displace_y_um)),
                           ("Scale", values.get("Scale", 1.0))):
            lines.append(f'"Samparm: {key}",{float(value):10.2f}')
    lines.append(",".join(f'"{c}"' for c in CSV_COLUMNS))
    table = np.column_stack([x, y, weight, calc, bkg, q])
    lines += [",".join(f"{v:.6g}" for v in row) for row in table]
    path = Path(path)
    with atomic_output(path) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    return path
