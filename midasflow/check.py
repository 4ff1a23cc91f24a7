"""Calibration check without refining: where each ring of the CIF's phases should be, where it is.

GSAS-II's manual check of a MIDAS calibration is "Calculate → Compute": the phase's reflection
positions drawn over the observed pattern, nothing refined. This module does that for a caked
store and measures the disagreement:

* the ring positions 2θ_h of every reflection of the phases (the cell as the CIF gives it, the
  store's wavelength, Zero and sample displacements: :func:`midasflow.profile.peak_position_deg`);
* the η-averaged pattern (every ω-group and η bin, area-weighted: counts per frame and per unit
  area, as one lineout of the whole detector) and every lineout;
* in each, one peak per ring fitted with the instrument's own profile (FCJ-asymmetric TCH
  pseudo-Voigt, SH/L fixed; position, height, a scale of σ² and of γ and a linear background
  free) in a window of a few FWHM, rings whose windows meet fitted together, so the fitted
  position means what 2θ_h means in the refinement;
* the shift of each ring as a d-spacing error, ``(d_obs / d_calc − 1) · 10⁶`` ppm: a uniform
  shift says the cell (or wavelength) is off, a shift growing with 2θ a distance or zero error,
  one varying with η a tilt or beam-centre error.

Rings of one phase closer than one FWHM cannot be told apart: they move together and are
reported "overlapped"; a peak less than five esds high, or fitted as far as two FWHM from its
calculated position, is "not found"; a window reaching past the data is "outside".
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: A fitted peak must stand this many esds above its background to count as found.
MIN_HEIGHT_SIGMA = 5.0
#: Fit window: this many FWHM below (plus the FCJ tail) and above the calculated position.
WINDOW_LOW_FWHM, WINDOW_HIGH_FWHM = 3.0, 2.5
#: A ring is fitted only with at least this many points in its window.
MIN_WINDOW_POINTS = 8


@dataclass(frozen=True)
class Ring:
    """One ring: phase, its reflections' hkl (several when they share d, e.g. 511 and 333 of a
    cubic phase), d (Å), calculated position 2θ_h (deg), the derivative ∂2θ_h/∂d (deg per Å),
    starting widths σ² (centideg²) and γ (centideg) and the fit window (deg)."""

    phase: str
    hkl: tuple[tuple[int, int, int], ...]
    d_a: float
    tth_calc_deg: float
    dtth_dd: float
    sig2: float
    gam: float
    lo_deg: float
    hi_deg: float

    @property
    def hkl_text(self) -> str:
        """``"1 1 1"``, or ``"5 1 1/3 3 3"`` for coinciding reflections."""
        return "/".join(" ".join(map(str, h)) for h in self.hkl)

    @property
    def label(self) -> str:
        return f"{self.phase} {self.hkl_text}"


@dataclass(frozen=True)
class PeakFit:
    """A ring's fitted peak in one pattern: status "ok", "not found", "overlapped" or "outside"
    (the window leaves the data); position and esd (deg), shift and esd (ppm of d)."""

    status: str
    tth_deg: float = math.nan
    tth_esd_deg: float = math.nan
    shift_ppm: float = math.nan
    shift_esd_ppm: float = math.nan


@dataclass
class CalibrationCheck:
    """Result of :func:`check_calibration`.

    Attributes
    ----------
    rings : list of Ring
    average : list of PeakFit
        One per ring, in the η-averaged pattern.
    tth_deg, average_intensity, average_sigma : ndarray
        The η-averaged pattern (counts per frame per unit area).
    lineouts : list of dict
        Per lineout: ``group``, ``eta_index``, ``omega_deg``, ``eta_deg``, ``tth_deg``,
        ``intensity``, ``fits`` (one PeakFit per ring).
    data_file : str
    """

    rings: list[Ring]
    average: list[PeakFit]
    tth_deg: np.ndarray
    average_intensity: np.ndarray
    average_sigma: np.ndarray
    lineouts: list[dict[str, Any]] = field(default_factory=list)
    data_file: str = ""

    def lineout_shifts(self) -> np.ndarray:
        """(n_lineouts, n_rings) shifts in ppm; NaN where the ring was not fitted."""
        return np.array([[f.shift_ppm for f in lo["fits"]] for lo in self.lineouts]).reshape(
            len(self.lineouts), len(self.rings))

    def table_rows(self) -> list[dict[str, Any]]:
        """One row per ring: calculated and observed positions, the η-averaged shift and the
        spread of the per-lineout shifts."""
        shifts = self.lineout_shifts()
        rows = []
        for k, (ring, fit) in enumerate(zip(self.rings, self.average)):
            per = shifts[:, k][np.isfinite(shifts[:, k])] if shifts.size else np.zeros(0)
            rows.append({
                "ring": k + 1, "phase": ring.phase, "hkl": ring.hkl_text, "d_a": ring.d_a,
                "tth_calc_deg": ring.tth_calc_deg, "tth_obs_deg": fit.tth_deg, "status": fit.status,
                "shift_ppm": fit.shift_ppm, "shift_esd_ppm": fit.shift_esd_ppm,
                "lineouts_fitted": int(per.size),
                "lineout_mean_ppm": float(per.mean()) if per.size else math.nan,
                "lineout_sd_ppm": float(per.std(ddof=1)) if per.size > 1 else math.nan,
            })
        return rows

    def mean_shift_ppm(self) -> tuple[float, float, int]:
        """Weighted mean of the η-averaged ring shifts (ppm), its esd, and the rings used."""
        ok = [f for f in self.average if f.status == "ok" and f.shift_esd_ppm > 0]
        if not ok:
            return math.nan, math.nan, 0
        w = np.array([1.0 / f.shift_esd_ppm**2 for f in ok])
        s = np.array([f.shift_ppm for f in ok])
        mean = float(np.sum(w * s) / np.sum(w))
        # the scatter of the rings about the mean, when it exceeds their esds
        chi2 = float(np.sum(w * (s - mean) ** 2)) / max(len(ok) - 1, 1)
        return mean, float(math.sqrt(max(chi2, 1.0) / np.sum(w))), len(ok)

    def format_table(self) -> str:
        """The ring table as aligned text."""
        width = max([9] + [len(r.hkl_text) for r in self.rings])
        head = (f"{'ring':>4}  {'phase':<10} {'hkl':<{width}} {'d (Å)':>9} {'2θ calc':>10} {'2θ obs':>10} "
                f"{'shift ppm':>10} {'± esd':>7}  {'lineouts: mean ± sd (n)':<26}")
        lines = [head]
        for r in self.table_rows():
            obs = f"{r['tth_obs_deg']:10.5f}" if r["status"] == "ok" else f"{r['status']:>10}"
            shift = (f"{r['shift_ppm']:10.1f} {r['shift_esd_ppm']:7.1f}" if r["status"] == "ok"
                     else f"{'':>10} {'':>7}")
            per = (f"{r['lineout_mean_ppm']:8.1f} ± {r['lineout_sd_ppm']:6.1f} ({r['lineouts_fitted']})"
                   if r["lineouts_fitted"] > 1 else "")
            lines.append(f"{r['ring']:>4}  {r['phase']:<10} {r['hkl']:<{width}} {r['d_a']:9.5f} "
                         f"{r['tth_calc_deg']:10.5f} {obs} {shift}  {per}")
        return "\n".join(lines)

    def write_csv(self, path: str | os.PathLike) -> Path:
        """The ring table as CSV (atomic)."""
        from midasflow.io.atomic import write_text_atomic

        rows = self.table_rows()
        keys = list(rows[0]) if rows else ["ring"]
        text = ",".join(keys) + "\n" + "".join(
            ",".join(_csv(r[k]) for k in keys) + "\n" for r in rows)
        return write_text_atomic(path, text)


def _csv(value: Any) -> str:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.8g}"
    text = str(value)
    return f'"{text}"' if "," in text else text


# ---------------------------------------------------------------------------------------------
# rings
# ---------------------------------------------------------------------------------------------
def ring_positions(phases: Sequence[Any], instrument: Any, tth_min_deg: float,
                   tth_max_deg: float) -> list[Ring]:
    """Every reflection of ``phases`` inside the 2θ range, at its calculated position.

    Positions include the instrument's Zero and sample displacements (as the refinement draws
    them); starting widths are the instrument's U..Z at each ring (no sample broadening);
    reflections of one phase at the same d (511 and 333) make one ring.
    """
    from midasflow.crystal import reflections
    from midasflow.profile import peak_position_deg, peak_sig2_gam, tch_fwhm_eta

    lam = instrument.wavelength_a
    rings = []
    for phase in phases:
        refl = reflections(phase, lam, tth_max_deg + 1.0, max(tth_min_deg - 1.0, 0.0))
        pos = peak_position_deg(refl.d_a, lam, instrument.zero, instrument.displace_x_um,
                                instrument.displace_y_um, instrument.gonio_radius_mm)
        widths = peak_sig2_gam(pos.tth_deg, instrument.U, instrument.V, instrument.W, instrument.X,
                               instrument.Y, instrument.Z, size_um=1e9, mustrain=0.0, lam_a=lam)
        for i in range(len(refl.d_a)):
            tth = float(pos.tth_deg[i])
            if not tth_min_deg < tth < tth_max_deg:
                continue
            sig2, gam = float(widths.sig2[i]), float(widths.gam[i])
            fwhm = tch_fwhm_eta(sig2, gam, precision="float64")[0] / 100.0
            tail = max(instrument.shl, 0.002) * abs(math.cos(math.radians(tth))) * 2.0
            hkl = (tuple(int(v) for v in refl.hkl[i]),)
            same = [j for j, r in enumerate(rings) if r.phase == phase.name and abs(r.d_a - refl.d_a[i]) <= 1e-9 * r.d_a]
            if same:  # a reflection at the same d (511 and 333): one ring
                rings[same[0]] = Ring(**{**rings[same[0]].__dict__, "hkl": rings[same[0]].hkl + hkl})
                continue
            rings.append(Ring(phase.name, hkl, float(refl.d_a[i]), tth,
                              float(pos.d_d[i]), sig2, gam, tth - WINDOW_LOW_FWHM * fwhm - tail,
                              tth + WINDOW_HIGH_FWHM * fwhm))
    rings.sort(key=lambda r: r.tth_calc_deg)
    return rings


# ---------------------------------------------------------------------------------------------
# peaks
# ---------------------------------------------------------------------------------------------
def clusters(rings: Sequence[Ring]) -> list[list[int]]:
    """Indices of rings fitted together: rings whose fit windows meet, transitively (in 2θ order)."""
    groups: list[list[int]] = []
    hi = -math.inf
    for k, ring in enumerate(rings):
        if groups and ring.lo_deg < hi:
            groups[-1].append(k)
        else:
            groups.append([k])
        hi = max(hi, ring.hi_deg) if len(groups[-1]) > 1 else ring.hi_deg
    return groups


def fit_rings(x: np.ndarray, y: np.ndarray, sigma: np.ndarray, rings: Sequence[Ring],
              shl: float) -> list[PeakFit]:
    """Fit every ring's peak in one pattern (one :class:`PeakFit` per ring, in ring order).

    Rings whose windows meet (:func:`clusters`) are fitted together over the union of their
    windows: the instrument's profile shape (FCJ asymmetry from SH/L) per ring, each ring with
    its own position and height, the cluster with one scale of the instrument's σ² and one of its
    γ and a linear background. Rings of one phase closer than one FWHM (``Ring.overlapped``)
    share one position shift and are reported "overlapped".

    Parameters
    ----------
    x, y, sigma : ndarray
        2θ (deg, increasing), intensity and its σ.
    rings : sequence of Ring
        From :func:`ring_positions`.
    shl : float
        SH/L of the instrument.
    """
    fits: list[PeakFit] = [PeakFit("outside")] * len(rings)
    for group in clusters(rings):
        for k, fit in zip(group, _fit_cluster(x, y, sigma, [rings[k] for k in group], shl)):
            fits[k] = fit
    return fits


def _fit_cluster(x: np.ndarray, y: np.ndarray, sigma: np.ndarray, rings: list[Ring],
                 shl: float) -> list[PeakFit]:
    from scipy.optimize import least_squares

    from midasflow.profile import fcj_profile_derivatives, tch_fwhm_eta

    lo, hi = min(r.lo_deg for r in rings), max(r.hi_deg for r in rings)
    if x.size == 0 or lo < x[0] or hi > x[-1]:
        return [PeakFit("outside")] * len(rings)
    use = (x >= lo) & (x <= hi) & np.isfinite(y) & (sigma > 0)
    if use.sum() < MIN_WINDOW_POINTS * len(rings):
        return [PeakFit("outside")] * len(rings)
    xs, ys, ss = x[use], y[use], sigma[use]
    centre, half = 0.5 * (xs[0] + xs[-1]), max(0.5 * (xs[-1] - xs[0]), 1e-9)
    t = (xs - centre) / half
    fwhm = [tch_fwhm_eta(r.sig2, r.gam, precision="float64")[0] / 100.0 for r in rings]
    # position groups: rings closer than one FWHM move together
    shift_of: list[int] = []
    for k, ring in enumerate(rings):
        if k and ring.tth_calc_deg - rings[k - 1].tth_calc_deg < min(fwhm[k], fwhm[k - 1]):
            shift_of.append(shift_of[-1])
        else:
            shift_of.append(shift_of[-1] + 1 if shift_of else 0)
    n_shift, n = shift_of[-1] + 1, len(rings)
    edge = np.concatenate([ys[:2], ys[-2:]])
    b0 = float(np.median(edge))
    heights = []
    for ring in rings:
        near = np.abs(xs - ring.tth_calc_deg) <= 0.5 * max(fwhm)
        peak = float(np.max(ys[near])) if near.any() else float(np.max(ys))
        unit = float(np.max(fcj_profile_derivatives(xs, ring.tth_calc_deg, ring.sig2, ring.gam, shl,
                                                    precision="float64").value))
        heights.append(max(peak - b0, 1e-12) / max(unit, 1e-12))
    start = np.array([0.0] * n_shift + heights + [1.0, 1.0, b0, 0.0])
    step = [2 * min(fwhm[k] for k in range(n) if shift_of[k] == j) for j in range(n_shift)]
    lower = np.array([-d for d in step] + [0.0] * n + [0.1, 0.1, -np.inf, -np.inf])
    upper = np.array(step + [np.inf] * n + [10.0, 10.0, np.inf, np.inf])

    def evaluate(p: np.ndarray, jac: bool) -> tuple[np.ndarray, np.ndarray | None]:
        fs, fg = p[n_shift + n] ** 2, p[n_shift + n + 1] ** 2
        model = p[-2] + p[-1] * t
        cols = np.zeros((xs.size, p.size)) if jac else None
        for k, ring in enumerate(rings):
            prof = fcj_profile_derivatives(xs, ring.tth_calc_deg + p[shift_of[k]], ring.sig2 * fs,
                                           ring.gam * fg, shl, precision="float64")
            h = p[n_shift + k]
            model = model + h * prof.value
            if jac:
                cols[:, shift_of[k]] += h * prof.d_pos
                cols[:, n_shift + k] = prof.value
                cols[:, n_shift + n] += h * prof.d_sig2 * ring.sig2 * 2 * p[n_shift + n]
                cols[:, n_shift + n + 1] += h * prof.d_gam * ring.gam * 2 * p[n_shift + n + 1]
        if jac:
            cols[:, -2], cols[:, -1] = 1.0, t
            return model, cols / ss[:, None]
        return model, None

    start = np.clip(start, lower + 1e-12, upper - 1e-12)
    with np.errstate(all="ignore"):
        try:
            sol = least_squares(lambda p: (evaluate(p, False)[0] - ys) / ss, start,
                                jac=lambda p: evaluate(p, True)[1], bounds=(lower, upper),
                                x_scale="jac", max_nfev=300)
            chi2 = float(np.sum(sol.fun**2)) / max(xs.size - sol.x.size, 1)
            cov = np.linalg.pinv(sol.jac.T @ sol.jac) * max(chi2, 1.0)
        except (ValueError, np.linalg.LinAlgError):
            return [PeakFit("not found")] * n
    out = []
    for k, ring in enumerate(rings):
        j = shift_of[k]
        shift, shift_esd = float(sol.x[j]), float(math.sqrt(max(cov[j, j], 0.0)))
        h, h_esd = float(sol.x[n_shift + k]), float(math.sqrt(max(cov[n_shift + k, n_shift + k], 0.0)))
        if shift_of.count(j) > 1:
            out.append(PeakFit("overlapped"))
        elif not sol.success or abs(shift) > 0.999 * step[j] or not h > MIN_HEIGHT_SIGMA * h_esd:
            out.append(PeakFit("not found"))
        else:
            pos = ring.tth_calc_deg + shift
            # d_obs from the measured position: one Newton step from d_calc (shifts are ppm-small)
            d_obs = ring.d_a + shift / ring.dtth_dd
            out.append(PeakFit("ok", pos, shift_esd, (d_obs / ring.d_a - 1.0) * 1e6,
                               abs(shift_esd / ring.dtth_dd) / ring.d_a * 1e6))
    return out


# ---------------------------------------------------------------------------------------------
# patterns of a caked store
# ---------------------------------------------------------------------------------------------
def eta_averaged_pattern(ds: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The whole cake as one pattern: 2θ (deg), counts per frame per unit area, and σ.

    y(r) = Σ I·A / Σ N·A over every ω-group and η bin with finite intensity and area A > 0
    (``Normalize 1``: I is counts per unit area per frame summed over the group's N frames);
    σ = √max(C, 1) / Σ N·A with C = Σ I·A the counts. For a cake that is not area-normalised
    I·A is replaced by I (counts) and A by 1. The 2θ of a row is the same N·A-weighted mean of
    its bins' effective 2θ (docs/caking_2theta.md), or its centre for a cake without them, so
    the average and the lineouts (:func:`~midasflow.refinement.lineouts.plan_lineouts`) put a
    ring at the same place.
    """
    from midasflow.params import params_from_text
    from midasflow.refinement.plan import lineout_tth_axis

    normalized = True
    if ds.attrs.get("params"):
        normalized = params_from_text(str(ds.attrs["params"])).normalize
    inten = np.asarray(ds["intensity"].transpose("group", "r", "eta").values, dtype=np.float64)
    area = np.asarray(ds["bin_area"].transpose("r", "eta").values, dtype=np.float64)
    frames = np.asarray(ds["frames_summed"].values, dtype=np.float64)
    usable = np.isfinite(inten) & (area[None] > 0)
    weight = np.where(usable, area[None] if normalized else 1.0, 0.0)
    counts = np.where(usable, inten, 0.0) * weight
    exposure = (weight * frames[:, None, None]).sum(axis=(0, 2))
    total = counts.sum(axis=(0, 2))
    tth_bins = np.broadcast_to(lineout_tth_axis(ds, area)[0].reshape(area.shape[0], -1), area.shape)
    keep = exposure > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        tth = (np.where(usable, tth_bins[None], 0.0) * weight * frames[:, None, None]).sum(axis=(0, 2)) / exposure
        y = total / exposure
        s = np.sqrt(np.maximum(total, 1.0)) / exposure
    return tth[keep], y[keep], s[keep]


def check_calibration(data: str | os.PathLike | Any, cifs: Sequence[str | os.PathLike], *,
                      instprm: str | os.PathLike | None = None, limits: tuple[float, float] | None = None,
                      per_lineout: bool = True, min_points: int = 20,
                      progress: bool = False) -> CalibrationCheck:
    """Compare the CIF phases' ring positions with a caked store, refining nothing.

    Parameters
    ----------
    data : path or xarray.Dataset
        A ``.zarr.zip`` (its InstrumentParameters and sibling ``.instprm``/``.samprm`` files give
        wavelength, Zero, displacements and profile) or a caked Dataset.
    cifs : sequence of path
        One CIF per phase (the calibrant).
    instprm : path, optional
        GSAS-II ``.instprm`` replacing the store's instrument terms.
    limits : (lo, hi), optional
        2θ range checked, degrees; default the data's.
    per_lineout : bool
        Also fit every ring in every lineout.
    min_points : int
        Lineouts with this many usable bins or fewer are left out (as in the refinement).
    progress : bool
        A progress line on stderr while the lineouts are fitted.
    """
    import xarray as xr

    from midasflow.crystal import read_phases
    from midasflow.errors import ParameterError
    from midasflow.io.caked_store import open_caked
    from midasflow.io.instprm import instrument_from_midas, read_instprm, with_sample_parameters

    store = None if isinstance(data, xr.Dataset) else data
    ds = data if store is None else open_caked(store)
    phases = read_phases(cifs)
    if instprm:
        instrument = read_instprm(instprm)
        instrument = instrument if store is None else with_sample_parameters(instrument, store)
    else:
        instrument = instrument_from_midas(ds, store=store)
    x, y, s = eta_averaged_pattern(ds)
    data_lo, data_hi = float(x.min()), float(x.max())
    if limits is not None and not (float(limits[0]) < data_hi and float(limits[1]) > data_lo):
        raise ParameterError(f"--limits {limits[0]:g} {limits[1]:g}: the data of "
                             f"{store if store is not None else 'the Dataset'} cover 2θ {data_lo:.4g} to "
                             f"{data_hi:.4g} deg; expected limits that overlap them")
    lo, hi = (data_lo, data_hi) if limits is None else (float(limits[0]), float(limits[1]))
    rings = ring_positions(phases, instrument, lo, hi)
    if not rings:
        raise ParameterError(f"no reflection of {', '.join(p.name for p in phases)} between 2θ {lo:.4g} and "
                             f"{hi:.4g} deg{' (--limits)' if limits is not None else ''} of "
                             f"{store if store is not None else 'the data'}; expected the calibrant's CIF")
    average = fit_rings(x, y, s, rings, instrument.shl)
    check = CalibrationCheck(rings, average, x, y, s,
                             data_file=str(store) if store is not None else str(ds.attrs.get("source", "")))
    if per_lineout:
        from midasflow.progress import TextProgress
        from midasflow.refinement.lineouts import plan_lineouts

        specs = [spec for spec in plan_lineouts(ds, min_points=min_points) if not spec.skipped]
        bar = TextProgress(len(specs), "check-lineout", progress)
        for spec in specs:
            xs, ys, ss = (np.asarray(a, dtype=np.float64) for a in (spec.tth_deg, spec.intensity, spec.sigma))
            check.lineouts.append({
                "group": spec.group, "eta_index": spec.eta_index, "omega_deg": spec.omega_deg,
                "eta_deg": spec.eta_deg, "tth_deg": xs, "intensity": ys,
                "fits": fit_rings(xs, ys, ss, rings, instrument.shl),
            })
            bar.update()
        bar.close()
    return check


# ---------------------------------------------------------------------------------------------
# the HTML page
# ---------------------------------------------------------------------------------------------
def check_figures(check: CalibrationCheck) -> list[Any]:
    """The page's figures: the η-averaged pattern with the rings' tick marks, the ring shifts
    (ppm) against 2θ, the per-lineout shifts against η, and every lineout with the tick marks
    (a slider chooses the lineout)."""
    from bokeh.layouts import column
    from bokeh.models import ColumnDataSource, CustomJS, Div, HoverTool, Slider, Whisker
    from bokeh.plotting import figure

    from midasflow.report import _HEIGHT, _WIDTH, _palette, add_reflection_ticks

    phases = list(dict.fromkeys(r.phase for r in check.rings))
    ticks = {ph: [r.tth_calc_deg for r in check.rings if r.phase == ph] for ph in phases}
    figs: list[Any] = []

    x, y = check.tth_deg, check.average_intensity
    span = float(np.nanmax(y) - np.nanmin(y)) if y.size else 1.0
    avg = figure(title="η-averaged pattern and the CIF's reflection positions", width=_WIDTH, height=_HEIGHT,
                 x_axis_label="2θ (deg)", y_axis_label="counts per frame per px²")
    avg.line(x, y, color="black", legend_label="observed (all ω-groups and η)")
    found = [(r, f) for r, f in zip(check.rings, check.average) if f.status == "ok"]
    if found:
        src = ColumnDataSource({"x": [f.tth_deg for _, f in found],
                                "y": [float(np.interp(f.tth_deg, x, y)) for _, f in found],
                                "ring": [r.label for r, _ in found],
                                "shift": [f"{f.shift_ppm:.1f} ± {f.shift_esd_ppm:.1f} ppm" for _, f in found]})
        dots = avg.scatter("x", "y", source=src, size=6, color="crimson", legend_label="fitted ring position")
        avg.add_tools(HoverTool(renderers=[dots], tooltips=[("ring", "@ring"), ("shift", "@shift")]))
    add_reflection_ticks(avg, ticks, float(np.nanmin(y)) - 0.03 * span, 0.05 * span)
    avg.legend.location = "top_right"
    figs.append(avg)

    rows = check.table_rows()
    shift = figure(title="Ring shift (d_obs/d_calc − 1) vs 2θ", width=_WIDTH, height=_HEIGHT,
                   x_axis_label="2θ calc (deg)", y_axis_label="shift (ppm)")
    ok = [r for r in rows if r["status"] == "ok"]
    if ok:
        src = ColumnDataSource({"x": [r["tth_calc_deg"] for r in ok], "y": [r["shift_ppm"] for r in ok],
                                "lo": [r["shift_ppm"] - r["shift_esd_ppm"] for r in ok],
                                "hi": [r["shift_ppm"] + r["shift_esd_ppm"] for r in ok],
                                "ring": [f"{r['phase']} {r['hkl']}" for r in ok]})
        pts = shift.scatter("x", "y", source=src, size=7, color="crimson", legend_label="η-averaged pattern")
        shift.add_layout(Whisker(source=src, base="x", lower="lo", upper="hi", line_color="crimson"))
        shift.add_tools(HoverTool(renderers=[pts], tooltips=[("ring", "@ring"), ("shift", "@y{0.0} ppm")]))
    per = [r for r in rows if r["lineouts_fitted"] > 1]
    if per:
        src = ColumnDataSource({"x": [r["tth_calc_deg"] for r in per], "y": [r["lineout_mean_ppm"] for r in per],
                                "lo": [r["lineout_mean_ppm"] - r["lineout_sd_ppm"] for r in per],
                                "hi": [r["lineout_mean_ppm"] + r["lineout_sd_ppm"] for r in per]})
        shift.scatter("x", "y", source=src, size=6, marker="square", color="royalblue",
                      legend_label="lineouts: mean ± sd")
        shift.add_layout(Whisker(source=src, base="x", lower="lo", upper="hi", line_color="royalblue"))
    shift.line([float(x.min()), float(x.max())] if x.size else [0, 1], [0.0, 0.0], color="gray",
               line_dash="dashed")
    shift.legend.location = "top_right"
    figs.append(shift)

    if check.lineouts:
        shifts = check.lineout_shifts()
        eta = np.array([lo["eta_deg"] for lo in check.lineouts])
        by_eta = figure(title="Ring shift per lineout vs η (every ω-group)", width=_WIDTH, height=_HEIGHT,
                        x_axis_label="η (deg)", y_axis_label="shift (ppm)")
        colors = _palette(len(check.rings))
        for k, ring in enumerate(check.rings):
            good = np.isfinite(shifts[:, k])
            if good.any():
                by_eta.scatter(eta[good], shifts[good, k], size=4, color=colors[k], legend_label=ring.label)
        if by_eta.legend:
            by_eta.legend.click_policy = "hide"
            legend = by_eta.legend[0]
            by_eta.center.remove(legend)
            by_eta.add_layout(legend, "right")
        figs.append(by_eta)

        first = check.lineouts[0]
        source = ColumnDataSource({"x": first["tth_deg"], "y": first["intensity"]})
        every = ColumnDataSource({"x": [lo["tth_deg"] for lo in check.lineouts],
                                  "y": [lo["intensity"] for lo in check.lineouts],
                                  "label": [f"ω-group {lo['group']} (ω = {lo['omega_deg']:g}°), η = "
                                            f"{lo['eta_deg']:g}°" for lo in check.lineouts]})
        view = figure(title="Lineout with the CIF's reflection positions", width=_WIDTH, height=_HEIGHT,
                      x_axis_label="2θ (deg)", y_axis_label="counts per frame")
        view.line("x", "y", source=source, color="black", legend_label="observed")
        lows = [float(np.nanmin(lo["intensity"])) for lo in check.lineouts if lo["intensity"].size]
        highs = [float(np.nanmax(lo["intensity"])) for lo in check.lineouts if lo["intensity"].size]
        lspan = (max(highs) - min(lows)) if lows else 1.0
        add_reflection_ticks(view, ticks, (min(lows) if lows else 0.0) - 0.03 * lspan, 0.05 * lspan)
        view.legend.location = "top_right"
        label = Div(text=every.data["label"][0], width=_WIDTH)
        slider = Slider(start=0, end=max(len(check.lineouts) - 1, 1), value=0, step=1,
                        title="lineout", width=_WIDTH)
        slider.js_on_change("value", CustomJS(args=dict(source=source, every=every, label=label), code="""
            const i = cb_obj.value;
            source.data = {x: every.data.x[i], y: every.data.y[i]};
            label.text = every.data.label[i];
        """))
        figs.append(column(slider, label, view))
    return figs


def write_check_report(check: CalibrationCheck, path: str | os.PathLike,
                       title: str = "midasflow calibration check") -> Path:
    """The check as a self-contained HTML page (Bokeh, inline resources; atomic): the ring table
    and :func:`check_figures`."""
    import html

    from bokeh.io import save
    from bokeh.layouts import column
    from bokeh.models import Div
    from bokeh.resources import INLINE

    from midasflow.io.atomic import atomic_output
    from midasflow.report import _WIDTH

    mean, esd, n = check.mean_shift_ppm()
    head = (f"<h2>{html.escape(title)}</h2><p>{html.escape(check.data_file)}: {len(check.rings)} rings, "
            f"{len(check.lineouts)} lineouts. Mean ring shift {mean:.1f} ± {esd:.1f} ppm over {n} rings "
            "(d_obs/d_calc − 1, η-averaged pattern).</p>")
    table = "<pre>" + html.escape(check.format_table()) + "</pre>"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layout = column(Div(text=head, width=_WIDTH), Div(text=table, width=_WIDTH + 300), *check_figures(check))
    with atomic_output(path) as tmp:
        save(layout, filename=str(tmp), resources=INLINE, title=title)
    return path
