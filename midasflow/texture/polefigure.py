"""Pole figures from (ω, η) lineouts and the joint spherical-harmonics texture fit.

Every refined lineout gives each reflection's integrated intensity I(group, eta, reflection)
with its esd (:func:`midasflow.texture.intensities.extract_intensities`). The reflection is seen
along its scattering vector n = (−sin θ, −cos θ sin η, cos θ cos η) in the MIDAS lab frame (the
geometry of the strain fits, :func:`midasflow.strain.scattering_vector`); in the sample frame,
which is the lab frame turned with the sample by ω about +z, that direction is y = Rz(ω)ᵀ n.

The joint fit (GSAS-II's multi-histogram texture fit, ``G2mth.FitTexture``, with cylindrical
sample symmetry about a sample axis, z by default) models every measured intensity as

    I(g, e, h) = s_h · A(h, y),   A(h, y) = 1 + Σ C(l,0,n) · (4π/(2l+1)) · K_l^n(h) · K_l^0(ψ)

with ψ the angle between y and the sample axis, s_h the untextured intensity of reflection h
(a free scale per reflection: no structure factors are needed) and C(l,0,n) GSAS-II's
coefficients of the cylindrical texture model; weighted least squares gives the coefficients with
GOF-scaled esds and the texture index J = 1 + Σ C²/(2l+1). The pole density of a measured point
is I/s_h (1 for a random powder). ``docs/texture.md`` shows how to use it;
``docs/reference/texture_model.md`` states the model.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from midasflow.strain import rotation_z, scattering_vector
from midasflow.texture import harmonics as _sh
from midasflow.texture.po import sh_po_design

__all__ = ["JointTextureFit", "add_texture_fit", "coverage_map", "equal_area", "fit_joint_texture",
           "lineout_texture_dataset", "reflection_dataset", "sample_directions"]

#: Cells of the coverage measure: equal-area bins of the upper hemisphere (cos ψ × azimuth).
COVERAGE_BINS = (9, 36)
#: The joint fit is ill-conditioned when a normalised singular value falls below this.
_SINGULAR = 1e-10


def sample_directions(tth_deg: Any, eta_deg: Any, omega_deg: Any) -> np.ndarray:
    """Unit scattering vectors in the sample frame, y = Rz(ω)ᵀ n(θ, η); shape broadcast + (3,)."""
    tth, eta, om = np.broadcast_arrays(np.asarray(tth_deg, float), np.asarray(eta_deg, float),
                                       np.asarray(omega_deg, float))
    n = scattering_vector(tth / 2.0, eta)
    return np.einsum("...ji,...j->...i", rotation_z(om), n)


def _polar(directions: np.ndarray, sample_axis: Sequence[float]) -> np.ndarray:
    """Angle ψ (deg, 0..90) between ±y and the sample axis."""
    axis = np.asarray(sample_axis, float)
    axis = axis / np.linalg.norm(axis)
    return np.degrees(np.arccos(np.clip(np.abs(directions @ axis), 0.0, 1.0)))


def equal_area(directions: np.ndarray, sample_axis: Sequence[float] = (0, 0, 1)) -> tuple[np.ndarray, np.ndarray]:
    """Lambert equal-area projection of ±y onto the plane normal to the sample axis.

    The pole is the centre; the equator (ψ = 90°) is the unit circle. The in-plane axes are the
    sample x and y for the default axis z (otherwise any right-handed pair normal to the axis).

    Returns
    -------
    px, py : ndarray, the shape of ``directions[..., 0]``
    """
    axis = np.asarray(sample_axis, float)
    axis = axis / np.linalg.norm(axis)
    ref = np.array([1.0, 0.0, 0.0]) if abs(axis[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = ref - axis * (ref @ axis)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(axis, e1)
    d = np.where((directions @ axis)[..., None] < 0, -directions, directions)
    psi = np.arccos(np.clip(d @ axis, -1.0, 1.0))
    gamma = np.arctan2(d @ e2, d @ e1)
    rho = np.sqrt(2.0) * np.sin(psi / 2.0)
    return rho * np.cos(gamma), rho * np.sin(gamma)


def coverage_map(directions: np.ndarray, sample_axis: Sequence[float] = (0, 0, 1)) -> np.ndarray:
    """Points per equal-area cell of the hemisphere (:data:`COVERAGE_BINS`: cos ψ × azimuth).

    Returns
    -------
    ndarray (n_cos, n_azimuth) int
    """
    d = np.asarray(directions, float).reshape(-1, 3)
    d = d[np.all(np.isfinite(d), axis=1)]
    px, py = equal_area(d, sample_axis)
    cos_psi = 1.0 - (px ** 2 + py ** 2) / 2.0   # Lambert: ρ² = 2(1 − cos ψ)
    az = np.mod(np.arctan2(py, px), 2 * np.pi)
    n_c, n_a = COVERAGE_BINS
    ic = np.clip(((1.0 - cos_psi) * n_c).astype(int), 0, n_c - 1)
    ia = np.clip((az / (2 * np.pi) * n_a).astype(int), 0, n_a - 1)
    out = np.zeros(COVERAGE_BINS, dtype=np.int64)
    np.add.at(out, (ic, ia), 1)
    return out


@dataclass
class JointTextureFit:
    """Outcome of :func:`fit_joint_texture`.

    Attributes
    ----------
    status : str
        'ok', 'ill-conditioned' (coefficients not determined by the coverage; their esds are
        NaN), 'not converged' (χ² still falling after ``max_iter`` iterations), 'failed: …'
        (the linear algebra failed; values NaN) or 'no data'.
    names : list of str
        ``C(l,0,n)`` (GSAS-II's cylindrical texture names).
    values, esds : ndarray (n_coef,)
    texture_index, texture_index_esd : float
        J and its esd.
    scales, scales_esd : ndarray (n_reflections,)
        Untextured intensity s_h of every reflection (NaN where not fitted).
    chi2, gof : float
    n_points : int
    order : int
    sample_axis : tuple of float
    """

    status: str
    names: list[str]
    values: np.ndarray
    esds: np.ndarray
    texture_index: float
    texture_index_esd: float
    scales: np.ndarray
    scales_esd: np.ndarray
    chi2: float = math.nan
    gof: float = math.nan
    n_points: int = 0
    order: int = 0
    sample_axis: tuple[float, float, float] = (0.0, 0.0, 1.0)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {"status": self.status, "order": self.order, "sample_axis": list(self.sample_axis),
                "coefficients": {n: [float(v), float(e)] for n, v, e in zip(self.names, self.values, self.esds)},
                "texture_index": [float(self.texture_index), float(self.texture_index_esd)],
                "chi2": float(self.chi2), "gof": float(self.gof), "n_points": int(self.n_points),
                "notes": list(self.notes)}


def fit_joint_texture(intensity: np.ndarray, esd: np.ndarray, directions: np.ndarray,
                      hkl: np.ndarray, cell: Sequence[float], laue: str, *, order: int = 4,
                      sample_axis: Sequence[float] = (0, 0, 1), unique_axis: str = "b",
                      max_iter: int = 30, row_block: int = 65536) -> JointTextureFit:
    """Joint cylindrical SH texture fit to per-lineout reflection intensities (module docstring).

    Parameters
    ----------
    intensity, esd : ndarray (..., n_reflections)
        Measured integrated intensities and esds; NaN (or esd ≤ 0) are left out.
    directions : ndarray (..., n_reflections, 3)
        Sample-frame unit scattering vectors (:func:`sample_directions`).
    hkl : ndarray (n_reflections, 3)
    cell, laue, unique_axis
        The phase (crystal angles of the harmonics).
    order : int
        Highest harmonic order (even l = 2 … order; 2..12).
    sample_axis : (3,)
        Axis of the cylindrical sample symmetry in the sample frame.
    max_iter : int
        Gauss–Newton iterations at most.
    row_block : int
        Measured intensities per block of the Jacobian's QR reduction: the Jacobian is never held
        whole (103,680 lineouts × 40 reflections × 45 columns would be 1.5 GB), only one block
        and its (columns + 1)² triangle. Results do not depend on it beyond rounding.

    Returns
    -------
    JointTextureFit
    """
    names = _sh.coefficient_names(laue, order, "0")  # C(l,0,n): cylindrical sample symmetry
    n_refl = hkl.shape[0]
    I = np.asarray(intensity, float).reshape(-1, n_refl)
    S = np.asarray(esd, float).reshape(-1, n_refl)
    Y = np.asarray(directions, float).reshape(-1, n_refl, 3)
    ok = np.isfinite(I) & np.isfinite(S) & (S > 0) & np.all(np.isfinite(Y), axis=-1)
    rows, refl = np.nonzero(ok)
    nan_c = np.full(len(names), np.nan)
    empty = JointTextureFit("no data", names, nan_c, nan_c, math.nan, math.nan,
                            np.full(n_refl, np.nan), np.full(n_refl, np.nan), order=order,
                            sample_axis=tuple(float(v) for v in sample_axis))
    used = np.unique(refl)
    if rows.size <= used.size + len(names):
        why = (f"{rows.size} measured intensities for {used.size} reflection scales and {len(names)} "
               "coefficients: too few to fit")
        if rows.size == 0:
            why += (" (none was extracted: the GSAS-II backend extracts no per-reflection intensities; "
                    "refine with --engine native for the joint fit and pole figures)")
        return dataclasses.replace(empty, notes=[why])
    y_obs, sig = I[rows, refl], S[rows, refl]
    psi = _polar(Y[rows, refl], sample_axis)
    D = sh_po_design(hkl[refl], cell, laue, names, psi, unique_axis) if names else np.zeros((rows.size, 0))
    col = np.searchsorted(used, refl)
    # start: C = 0, s_h = weighted mean of the reflection's intensities
    w = 1.0 / sig ** 2
    s = np.bincount(col, weights=w * y_obs) / np.bincount(col, weights=w)
    c = np.zeros(len(names))
    n_s = used.size

    n_cols = n_s + len(names)

    def reduced_jacobian(s, c):
        """R of the weighted Jacobian's QR (the normal matrix is RᵀR) and Qᵀr, built over blocks
        of rows so memory does not grow with the number of measured intensities."""
        R = np.zeros((n_cols + 1, n_cols + 1))  # [J | r] reduced to a triangle
        for lo in range(0, rows.size, row_block):
            sl = slice(lo, lo + row_block)
            cb, sb, Db = col[sl], sig[sl], D[sl]
            Ab = 1.0 + Db @ c
            block = np.zeros((cb.size, n_cols + 1))
            block[np.arange(cb.size), cb] = Ab
            block[:, n_s:n_cols] = s[cb][:, None] * Db
            block[:, n_cols] = y_obs[sl] - s[cb] * Ab
            R = np.linalg.qr(np.vstack([R, block / sb[:, None]]), mode="r")
        return R[:n_cols, :n_cols], R[:n_cols, n_cols]

    def chi2_at(s, c):
        r = (y_obs - s[col] * (1.0 + D @ c)) / sig
        return float(r @ r)

    chi2, converged = math.inf, False
    try:
        for _ in range(max_iter):
            Rj, qtr = reduced_jacobian(s, c)
            chi2_now = chi2_at(s, c)
            scale = np.linalg.norm(Rj, axis=0)  # the Jacobian's column norms
            scale[scale == 0] = 1.0
            step = np.linalg.lstsq(Rj / scale, qtr, rcond=None)[0] / scale
            for shrink in (1.0, 0.5, 0.25, 0.125, 0.0625):  # the Gauss–Newton step, halved
                s_new, c_new = s + shrink * step[:n_s], c + shrink * step[n_s:]
                chi2_new = chi2_at(s_new, c_new)
                if chi2_new < chi2_now:
                    break
            else:  # no step along the Gauss–Newton direction lowers χ²: at the minimum
                chi2, converged = chi2_now, True
                break
            s, c, chi2 = s_new, c_new, chi2_new
            if chi2_now - chi2_new < 1e-10 * chi2_now:
                converged = True
                break
        Rj, _ = reduced_jacobian(s, c)
        A = 1.0 + D @ c
        dof = max(rows.size - n_s - len(names), 1)
        gof = math.sqrt(chi2 / dof)
        scale = np.linalg.norm(Rj, axis=0)
        scale[scale == 0] = 1.0
        u, sv, vt = np.linalg.svd(Rj / scale, full_matrices=False)  # J's singular values and V
    except (np.linalg.LinAlgError, ValueError) as exc:  # a non-finite intensity or direction
        return dataclasses.replace(empty, status=f"failed: {exc}", n_points=int(rows.size))
    status = "ok" if converged else "not converged"
    notes = [] if converged else [f"χ² still falling after {max_iter} Gauss–Newton iterations"]
    if sv.size and sv[-1] < _SINGULAR * sv[0]:
        status = "ill-conditioned"
        notes.append("the measured directions do not determine every coefficient (singular normal "
                     "matrix); widen the ω/η coverage or lower the order")
    inv = (vt.T / np.where(sv > _SINGULAR * sv[0], sv, np.inf) ** 2) @ vt
    cov = inv / np.outer(scale, scale) * gof ** 2
    err = np.sqrt(np.maximum(np.diag(cov), 0.0))
    loose = [n for n, e in zip(names, err[n_s:]) if not e <= _sh.MAX_SH_ESD]
    if status != "ill-conditioned" and loose:
        # nearly singular: e.g. one ω-group whose lineouts all see each reflection at the same ψ
        # but for the per-lineout 2θ (C = 0 ± 1e4 was reported 'ok' with J = 1 ± 0)
        status = "ill-conditioned"
        notes.append(f"{', '.join(loose)} not determined (esd > {_sh.MAX_SH_ESD:g}): the measured "
                     "directions barely separate them from the reflections' scales; widen the ω/η "
                     "coverage or lower the order")
    if status == "ill-conditioned":
        err[n_s:] = np.nan
    if np.any(A <= 0):
        notes.append(f"the fitted pole density is ≤ 0 at {int(np.sum(A <= 0))} measured points "
                     "(order too high for the data)")
    lvals = np.array([_sh.parse_name(n)[0] for n in names], float)
    J = 1.0 + float(np.sum(c ** 2 / (2 * lvals + 1)))
    grad = 2 * c / (2 * lvals + 1)
    J_esd = float(math.sqrt(max(grad @ cov[n_s:, n_s:] @ grad, 0.0))) if names else 0.0
    if status == "ill-conditioned":
        J_esd = math.nan
    scales, scales_esd = np.full(n_refl, np.nan), np.full(n_refl, np.nan)
    scales[used], scales_esd[used] = s, err[:n_s]
    return JointTextureFit(status, names, c, err[n_s:], J, J_esd, scales, scales_esd, chi2, gof,
                           int(rows.size), int(order), tuple(float(v) for v in sample_axis), notes)


def reflection_dataset(lineouts: Sequence[Any], phase_names: Sequence[str], n_groups: int,
                       n_eta: int) -> xr.Dataset:
    """I(group, eta, reflection) with esds and sample directions from refined lineouts.

    Parameters
    ----------
    lineouts : sequence of LineoutResult
        Every lineout (those without an ok pattern or without extracted intensities leave NaN).
    phase_names : sequence of str
    n_groups, n_eta : int
        Sizes of the results grid.

    Returns
    -------
    xarray.Dataset
        ``I``, ``I_esd`` (group, eta, reflection), counts·centidegree, and ``pole_direction``
        (group, eta, reflection, xyz): the sample-frame scattering vector; coordinates of
        ``reflection``: ``reflection_phase``, ``h``, ``k``, ``l``, ``d_a`` and ``tth_deg``
        (medians over the lineouts); attribute ``texture_phases`` (JSON: Laue class, unique
        axis and cell of each phase). ``I`` is NaN where a backend extracted no intensities
        (GSAS-II's); no ``reflection`` at all without any reflection table.
    """
    keys: dict[tuple[str, int, int, int], int] = {}
    phase_info: dict[str, Any] = {}
    for r in lineouts:
        p = r.pattern
        if p is None or r.status != "ok":
            continue
        for ph in p.phases or []:
            phase_info.setdefault(ph.name, {"laue": ph.laue, "unique_axis": ph.unique_axis,
                                            "cell": [float(v) for v in ph.cell]})
        for name in phase_names:
            t = (p.reflections or {}).get(name)
            if t is None or "h" not in t:
                continue
            for hkl in zip(t["h"], t["k"], t["l"]):
                keys.setdefault((name, *map(int, hkl)), len(keys))
    order = sorted(keys, key=lambda k: (list(phase_names).index(k[0]), keys[k]))
    index = {k: i for i, k in enumerate(order)}
    n = len(order)
    I, E = np.full((n_groups, n_eta, n), np.nan), np.full((n_groups, n_eta, n), np.nan)
    tth, d = np.full((n_groups, n_eta, n), np.nan), np.full((n_groups, n_eta, n), np.nan)
    omega = np.full((n_groups, n_eta), np.nan)
    eta = np.full((n_groups, n_eta), np.nan)
    for r in lineouts:
        p = r.pattern
        if p is None or r.status != "ok":
            continue
        g, e = r.group, r.eta_index
        omega[g, e], eta[g, e] = r.omega_deg, r.eta_deg
        for name in phase_names:
            t = (p.reflections or {}).get(name)
            if t is None or "h" not in t:
                continue
            cols = [index[(name, *map(int, hkl))] for hkl in zip(t["h"], t["k"], t["l"])]
            if "i_obs" in t:
                I[g, e, cols], E[g, e, cols] = t["i_obs"], t["i_obs_esd"]
            tth[g, e, cols], d[g, e, cols] = t["tth_deg"], t["d_a"]
    directions = sample_directions(tth, eta[..., None], omega[..., None])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN columns
        tth_med, d_med = np.nanmedian(tth, axis=(0, 1)), np.nanmedian(d, axis=(0, 1))
    gerh = ("group", "eta", "reflection")
    return xr.Dataset(
        {"I": (gerh, I, {"units": "counts·centidegree", "long_name": "integrated intensity (Pawley, "
                         "refined profile held)"}),
         "I_esd": (gerh, E),
         "pole_direction": ((*gerh, "xyz"), directions,
                            {"frame": "sample (lab frame turned by omega about +z)"})},
        coords={"reflection": np.arange(n),
                "reflection_phase": ("reflection", np.array([k[0] for k in order], dtype=str)),
                "h": ("reflection", np.array([k[1] for k in order], dtype=np.int64)),
                "k": ("reflection", np.array([k[2] for k in order], dtype=np.int64)),
                "l": ("reflection", np.array([k[3] for k in order], dtype=np.int64)),
                "d_a": ("reflection", d_med), "tth_deg": ("reflection", tth_med),
                "xyz": np.array(["x", "y", "z"])},
        attrs={"texture_phases": json.dumps(phase_info)},
    )


def lineout_texture_dataset(lineouts: Sequence[Any], phase_names: Sequence[str], n_groups: int,
                            n_eta: int) -> xr.Dataset:
    """The per-lineout texture parameters the texture stage refined.

    Returns
    -------
    xarray.Dataset
        ``po_param``/``po_param_esd`` (phase, group, eta, po_name): the March–Dollase ratio ``MD``
        and the harmonic coefficients ``C(l,n)`` of each phase (NaN where not refined: stage
        rolled back, skipped or failed lineouts). Empty (no ``po_name``) when no lineout refined one.
    """
    found: dict[str, None] = {}
    for r in lineouts:
        if r.pattern is not None and r.status == "ok":
            for key in r.pattern.esds:
                head, _, tail = key.partition(":0:")
                if head.isdigit() and (tail == "MD" or tail.startswith("C(")):
                    found.setdefault(tail, None)
    names = sorted(found, key=lambda n: (n != "MD", _sh.parse_name(n) if n != "MD" else (0, 0, 0)))
    val = np.full((len(phase_names), n_groups, n_eta, len(names)), np.nan)
    err = np.full_like(val, np.nan)
    for r in lineouts:
        if r.pattern is None or r.status != "ok":
            continue
        for p in range(len(phase_names)):
            for j, name in enumerate(names):
                key = f"{p}:0:{name}"
                if key in r.pattern.esds:
                    val[p, r.group, r.eta_index, j] = r.pattern.values[key]
                    err[p, r.group, r.eta_index, j] = r.pattern.esds[key]
    dims = ("phase", "group", "eta", "po_name")
    return xr.Dataset({"po_param": (dims, val, {"long_name": "per-lineout preferred orientation "
                                               "(March–Dollase r, harmonic C(l,n))"}),
                       "po_param_esd": (dims, err)},
                      coords={"po_name": np.array(names, dtype=str)})


def add_texture_fit(ds: xr.Dataset, *, order: int = 4, sample_axis: Sequence[float] = (0, 0, 1),
                    phases: Sequence[str] | None = None) -> xr.Dataset:
    """Fit the joint texture of every phase of a results Dataset and store it.

    Parameters
    ----------
    ds : xarray.Dataset
        With :func:`reflection_dataset`'s variables (``results.zarr``).
    order : int
        Harmonic order (2..12).
    sample_axis : (3,)
        Cylindrical sample-symmetry axis, sample frame.
    phases : sequence of str, optional
        Default: every phase with reflections.

    Returns
    -------
    xarray.Dataset
        ``ds`` with ``pole_density``/``pole_density_esd`` (group, eta, reflection): I/s_h and its
        esd; ``pole_coverage`` (reflection): the fraction of the hemisphere's equal-area cells
        measured; ``texture_coef``/``texture_coef_esd`` (texture_phase, texture_coef_name) and
        ``texture_index``/``texture_index_esd``, ``texture_status`` (texture_phase); attribute
        ``texture_fits`` (JSON of :meth:`JointTextureFit.to_dict` per phase).
    """
    if "I" not in ds or ds.sizes.get("reflection", 0) == 0:
        raise ValueError("no per-reflection intensities in these results (refined by an engine that "
                         "does not extract them, or nothing refined)")
    info = json.loads(ds.attrs.get("texture_phases", "{}"))
    ref_phase = ds["reflection_phase"].values.astype(str)
    unknown = [p for p in phases or () if p not in info]
    if unknown:
        raise ValueError(f"phase {', '.join(map(repr, unknown))} not in these results (phases with "
                         f"reflections: {', '.join(info) or 'none'})")
    names_phases = [p for p in (phases or list(dict.fromkeys(ref_phase))) if p in info]
    if not names_phases:
        raise ValueError("no phase of these results has reflections and a known Laue class")
    density = np.full(ds["I"].shape, np.nan)
    density_esd = np.full(ds["I"].shape, np.nan)
    coverage = np.full(ds.sizes["reflection"], np.nan)
    fits: dict[str, JointTextureFit] = {}
    hkl_all = np.stack([ds["h"].values, ds["k"].values, ds["l"].values], axis=1)
    directions = ds["pole_direction"].values
    n_c = COVERAGE_BINS[0] * COVERAGE_BINS[1]
    for name in names_phases:
        cols = np.flatnonzero(ref_phase == name)
        ph = info[name]
        fit = fit_joint_texture(ds["I"].values[..., cols], ds["I_esd"].values[..., cols],
                                directions[..., cols, :], hkl_all[cols], ph["cell"], ph["laue"],
                                order=order, sample_axis=sample_axis, unique_axis=ph["unique_axis"])
        fits[name] = fit
        with np.errstate(invalid="ignore", divide="ignore"):
            density[..., cols] = ds["I"].values[..., cols] / fit.scales
            density_esd[..., cols] = ds["I_esd"].values[..., cols] / fit.scales
        for c in cols:
            seen = np.isfinite(ds["I"].values[..., c])
            coverage[c] = np.count_nonzero(coverage_map(directions[..., c, :][seen], sample_axis)) / n_c
    coef_names = sorted({n for f in fits.values() for n in f.names}, key=lambda n: _sh.parse_name(n))
    coef = np.full((len(fits), len(coef_names)), np.nan)
    coef_esd = np.full_like(coef, np.nan)
    for i, fit in enumerate(fits.values()):
        for n, v, e in zip(fit.names, fit.values, fit.esds):
            coef[i, coef_names.index(n)], coef_esd[i, coef_names.index(n)] = v, e
    gerh = ("group", "eta", "reflection")
    out = ds.drop_vars([v for v in ("pole_density", "pole_density_esd", "pole_coverage", "texture_coef",
                                    "texture_coef_esd", "texture_index", "texture_index_esd",
                                    "texture_status", "texture_phase", "texture_coef_name")
                        if v in ds.variables])
    tp = ("texture_phase",)
    return out.assign(
        pole_density=(gerh, density, {"long_name": "pole density I/s_h (1 = random)"}),
        pole_density_esd=(gerh, density_esd),
        pole_coverage=("reflection", coverage, {"long_name": "fraction of the hemisphere's "
                                                "equal-area cells measured"}),
        texture_coef=((*tp, "texture_coef_name"), coef),
        texture_coef_esd=((*tp, "texture_coef_name"), coef_esd),
        texture_index=(tp, np.array([f.texture_index for f in fits.values()])),
        texture_index_esd=(tp, np.array([f.texture_index_esd for f in fits.values()])),
        texture_status=(tp, np.array([f.status for f in fits.values()], dtype=str)),
    ).assign_coords(texture_phase=np.array(list(fits), dtype=str),
                    texture_coef_name=np.array(coef_names, dtype=str)).assign_attrs(
        texture_fits=json.dumps({k: f.to_dict() for k, f in fits.items()}))
