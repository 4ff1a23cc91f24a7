"""Lineouts as tasks: a plain plan (one frozen spec per (ω-group, η) lineout) and two executors.

The plan follows GSAS-II's MIDAS importer (docs/reference/midas_zarr_layout.md §5; the σ
model is docs/reference/lineout_sigma.md): one lineout per ω-group and η column, at position
``index = group · n_eta + eta_index``; its points are the R bins with bin area ≠ 0 and a finite
intensity, and a lineout with ``min_points`` (20) or fewer such points is skipped. Its histogram
number, the ``NNNN`` of its ``hist_NNNN`` files, is MIDAS's and GSAS-II's
(:mod:`midasflow.refinement.numbering`): consecutive over the lineouts of the η columns the
importer keeps, ω-groups in the order of their member names. A lineout of another column (a
column NaN in some ω-group, which the store's BinArea plane zeroes) is no histogram for GSAS-II
or MIDAS; midasflow still refines it when it has the points, and names its files
``lineout_gGGGG_eEEEE``.

Intensity and σ (counts per frame). A group's cake is the SUM over its N frames of per-frame
cakes, each the area-weighted mean pixel value of the bin (``Normalize 1``). The lineout
intensity is the per-frame mean ``y = sum / N``. The counts behind a bin over the whole group are
``C = sum · area`` (``sum`` alone when the cake was not normalised), Poisson, so

    σ_y = sqrt(max(C, 1)) / (area · N)        (σ² = y / (area · N) when C ≥ 1),

the σ GSAS-II's importer derives in its comment (its code uses N times larger weights, which
changes χ² and GOF but not the minimum or wR). The floor of one count keeps σ > 0 for empty or
negative (dark-subtracted) bins.

Shared pixels. Exact pixel splitting gives a pixel larger than a bin to several bins, so the
noise of neighbouring bins is correlated and each bin's own variance is only f·σ², with
f = Σa²/Σa over the overlap areas a of its pixels (:func:`independent_fraction`; 0.23 for
0.25-px radial bins). For a model that is smooth on the pixel scale the σ above still weights
every pixel once, so the least-squares information is right — but χ² then has the expectation
Σ f instead of N, and an esd scaled by GOF = sqrt(χ²/(N − n)) (GSAS-II's convention, followed by
the engine) comes out about √f too small: 2× at 0.25-px bins. Each lineout therefore carries the
mean f of its bins (``LineoutSpec.independent_fraction``), and :func:`refine_lineout` rescales
every backend's esds to GOF = sqrt(χ²/(f·N − n))
(:meth:`~midasflow.refinement.result.PatternResult.with_independent_fraction`).

That rescaling is exact only for a model smooth on the pixel scale. Peaks one or two pixels wide
are not: the noise the pixel splitting removes (the high spatial frequencies) is the part a peak
position is most sensitive to, and the rescaled esd of a came out ~10 % too large (pull spread
0.83 over 800 lineouts of 2-px peaks in 1-px bins). Each lineout therefore also carries the
correlation of its neighbouring points' noise (:func:`noise_correlation`: c_k = f·S(k·w)/S(0),
S the overlap of a unit pixel with two bins of width w a lag k·w apart), and the native engine
computes the covariance of its estimate under that noise (``refine_pattern(noise_correlation=
...)``); its results are not rescaled again. Points on either side of a masked bin are treated
as neighbours (a correlation they do not have: the esd errs large).


The lazy plan that reads these lineouts where they are refined, its checkpoints and executors
live in :mod:`midasflow.refinement.plan`, :mod:`~midasflow.refinement.checkpoints` and
:mod:`~midasflow.refinement.executors`; :func:`run_serial` (the reference) and
:func:`run_distributed` (Dask tasks, keys ``refine-lineout-…``) run a plan and return the same
list of :class:`LineoutResult`. A failing lineout becomes a "failed" result with its error.
"""
from __future__ import annotations

import functools
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from midasflow.errors import ParameterError
from midasflow.progress import TextProgress
from midasflow.refinement.backends import RefineBackend
from midasflow.refinement.options import SEED_MODES, RefineOptions, SeedFrom

TASK_PREFIX = "refine-lineout"


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class LineoutSpec:
    """One lineout to refine.

    Attributes
    ----------
    index : int
        Position ``group · n_eta + eta_index`` (the key of the plan and the results grid).
    group, eta_index : int
    omega_deg : float
        Mid-group ω (mean of the group's first and last frame ω), degrees.
    eta_deg : float
        η bin centre, degrees (MIDAS convention).
    tth_deg, intensity, sigma : ndarray (n_points,), float64, read-only
        2θ (deg), counts per frame and σ of the usable bins (area ≠ 0, finite intensity), in
        increasing 2θ. The 2θ is the one each bin's value samples (the cake's
        ``effective_tth_deg``, docs/caking_2theta.md) when the cake has it, else its centre.
    frames_summed : int
    skipped : bool
        True when n_points ≤ the plan's ``min_points``; such a lineout is not refined.
    independent_fraction : float
        Mean over the usable bins of the fraction f of their σ² that is independent noise
        (:func:`independent_fraction`; 1 = independent bins).
    noise_correlation : tuple of float
        Correlation of the noise of points 0, 1, … apart in units of σσ
        (:func:`noise_correlation`); empty: independent points.
    histogram : int
        MIDAS's histogram number (:mod:`midasflow.refinement.numbering`), the ``NNNN`` of the
        lineout's ``hist_NNNN`` files; −1 when its η column is no histogram for GSAS-II's
        importer (refined all the same when it has the points; files ``lineout_gGGGG_eEEEE``).
    """

    index: int
    group: int
    eta_index: int
    omega_deg: float
    eta_deg: float
    tth_deg: np.ndarray
    intensity: np.ndarray
    sigma: np.ndarray
    frames_summed: int
    skipped: bool
    independent_fraction: float = 1.0
    histogram: int = -1
    noise_correlation: tuple[float, ...] = ()

    @property
    def n_points(self) -> int:
        """Number of usable bins."""
        return int(self.tth_deg.size)

    @property
    def name(self) -> str:
        """File stem: ``hist_NNNN`` (MIDAS's histogram number), or ``lineout_gGGGG_eEEEE`` for a
        lineout that is no histogram."""
        return lineout_name(self.histogram, self.group, self.eta_index)


def lineout_name(histogram: int, group: int, eta_index: int) -> str:
    """``hist_NNNN`` for histogram ``histogram`` ≥ 0, else ``lineout_gGGGG_eEEEE``."""
    from midasflow.refinement.numbering import histogram_name

    return histogram_name(histogram) if histogram >= 0 else f"lineout_g{group:04d}_e{eta_index:04d}"


def lineout_sigma(group_sum: np.ndarray, area: np.ndarray, frames_summed: int, *,
                  normalized: bool = True) -> np.ndarray:
    """σ of the per-frame lineout intensity ``group_sum / frames_summed`` (see module docstring).

    Parameters
    ----------
    group_sum : ndarray, float64
        Summed cake values of the bins (counts per pixel when ``normalized``).
    area : ndarray, float64, pixel²
        Bin areas (> 0), same shape.
    frames_summed : int
        N, the number of frames in the group.
    normalized : bool
        Whether the cake is area-normalised (MIDAS ``Normalize 1``).

    Returns
    -------
    ndarray, float64, same shape: sqrt(max(C, 1)) / (area·N) with C = sum·area (normalised) or
    sqrt(max(sum, 1)) / N (not normalised).
    """
    n = float(frames_summed)
    if normalized:
        counts = group_sum * area
        return np.sqrt(np.maximum(counts, 1.0)) / (area * n)
    return np.sqrt(np.maximum(group_sum, 1.0)) / n


def _shared_fraction(width_px: np.ndarray) -> np.ndarray:
    """Σa²/Σa along one direction for a bin ``width_px`` wide cut from unit pixels: the
    overlap of a pixel's 1-px box with a slab of width w, averaged over the pixel positions."""
    w = np.maximum(np.asarray(width_px, dtype=np.float64), 1e-12)
    return np.where(w <= 1.0, w - w * w / 3.0, 1.0 - 1.0 / (3.0 * w))


def noise_correlation(radial_width_px: float, fraction: float) -> tuple[float, ...]:
    """Correlation of the noise of a lineout's points 0, 1, 2, … bins apart, in units of σσ.

    A unit pixel split over radial bins of width w gives bins a lag d apart the shared variance
    S(d) = ∫ T_w(d − u)·T_1(u) du (T_s the triangle autocorrelation of a box of width s, per
    unit of the pixel's variance); S(0)/w is the radial part of :func:`independent_fraction`
    and Σ_k S(k·w)/w = 1 (a model smooth on the pixel scale sees every pixel once). The lag-k
    correlation is ``fraction``·S(k·w)/S(0): the mean independent fraction of the lineout's
    bins (the arc part included, which neighbouring η bins share), with the radial lag shape.

    Parameters
    ----------
    radial_width_px : float
        R bin spacing, pixels.
    fraction : float
        The lineout's mean independent fraction (``LineoutSpec.independent_fraction``).

    Returns
    -------
    tuple of float
        (c₀ = fraction, c₁, …) up to the last lag the pixels reach (|k·w| < 1 + w); () for
        ``fraction`` ≥ 1 (independent points).
    """
    w = float(radial_width_px)
    if not (fraction < 1.0 and w > 0):
        return ()
    s = _shared_variance(w)
    return tuple(float(fraction * v / s[0]) for v in s if v > 1e-12 * s[0])


@functools.lru_cache(maxsize=32)
def _shared_variance(w: float) -> tuple[float, ...]:
    """S(k·w) of :func:`noise_correlation` for the lags k = 0, 1, … the pixels reach, bins w px
    wide (the same for every lineout of a cake, so computed once per width)."""
    u = np.linspace(-1.0, 1.0, 4001)
    tri_pixel = 1.0 - np.abs(u)
    lags = np.arange(int(np.ceil((1.0 + w) / w)))
    return tuple(float(np.trapezoid(np.maximum(w - np.abs(k * w - u), 0.0) * tri_pixel, u))
                 for k in lags)


def independent_fraction(r_px: np.ndarray, eta_deg: np.ndarray, *, bin_area: np.ndarray | None = None,
                         bin_area_sq: np.ndarray | None = None) -> np.ndarray:
    """Fraction f of each bin's σ² (module docstring) that is its own, independent noise.

    Exact with ``bin_area_sq`` (Σ over the bin's pixels of the squared overlap areas, px⁴):
    f = bin_area_sq / bin_area. Otherwise from the bin's size in pixels: radial width w_r (the R
    spacing) and arc length w_t = R·Δη, f ≈ g(w_r)·g(w_t) with g(w) = w − w²/3 for w ≤ 1 and
    1 − 1/(3w) above (a unit pixel's overlaps with a slab of width w). Against Σa²/Σa from the
    exact bin map this is within 1–2 % on average over a lineout (RBinSize 0.25–2 px, η bins
    1–30°; single bins scatter ±20 %).

    Parameters
    ----------
    r_px : ndarray (n_r,)
        R bin centres, pixels (uniform spacing).
    eta_deg : ndarray (n_eta,)
        η bin centres, degrees (uniform spacing).
    bin_area, bin_area_sq : ndarray (n_r, n_eta), optional
        Unmasked area (px²) and Σ squared overlaps (px⁴) of each bin, when the caking recorded them.

    Returns
    -------
    ndarray (n_r, n_eta), float64 in (0, 1]
    """
    r = np.asarray(r_px, dtype=np.float64).ravel()
    eta = np.asarray(eta_deg, dtype=np.float64).ravel()
    if bin_area_sq is not None and bin_area is not None:
        area = np.asarray(bin_area, dtype=np.float64)
        sq = np.asarray(bin_area_sq, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(area > 0, np.clip(sq / area, 1e-6, 1.0), 1.0)
    dr = float(np.median(np.abs(np.diff(r)))) if r.size > 1 else 1.0
    d_eta = float(np.median(np.abs(np.diff(eta)))) if eta.size > 1 else 360.0
    arc = np.abs(r)[:, None] * np.deg2rad(d_eta)
    return np.broadcast_to(_shared_fraction(dr) * _shared_fraction(arc), (r.size, eta.size)).copy()


def lineouts_of_group(
    intensity: np.ndarray,
    *,
    group: int,
    frames_summed: int,
    omega_deg: float,
    tth_deg: np.ndarray,
    eta_deg: np.ndarray,
    bin_area: np.ndarray,
    min_points: int = 20,
    normalized: bool = True,
    fraction: np.ndarray | None = None,
    eta_start: int = 0,
    n_eta: int | None = None,
    histogram: Sequence[int] | np.ndarray | None = None,
    radial_width_px: float | None = None,
) -> list[LineoutSpec]:
    """Specs of every η column of one ω-group's cake, or of a run of its columns (pure numpy).

    Parameters
    ----------
    intensity : ndarray (n_r, n_columns), float64
        The group's summed cake (NaN = masked bin), or its columns ``eta_start:eta_start +
        n_columns``.
    group, frames_summed : int
    omega_deg : float
        Mid-group ω.
    tth_deg : ndarray (n_r,) or (n_r, n_columns), degrees
    eta_deg : ndarray (n_columns,), degrees
    bin_area : ndarray (n_r, n_columns), pixel²
    min_points, normalized
        As :func:`plan_lineouts`.
    fraction : ndarray (n_r, n_columns), optional
        :func:`independent_fraction` of every bin; default 1 (independent bins).
    eta_start : int
        η index of the first column.
    n_eta : int, optional
        η bins of the whole cake (position: index = group·n_eta + η index); default the
        number of columns.
    histogram : sequence of int (n_columns,), optional
        Each column's histogram number in this group
        (:func:`midasflow.refinement.numbering.histogram_numbers`; −1: no histogram); default
        the position index of every lineout that is not skipped.
    radial_width_px : float, optional
        R bin spacing in pixels: each lineout then carries its :func:`noise_correlation`
        (with ``fraction``).

    Returns
    -------
    list of LineoutSpec, one per column, in η order.
    """
    intensity = np.asarray(intensity, dtype=np.float64)
    area = np.asarray(bin_area, dtype=np.float64)
    n_r, n_cols = intensity.shape
    n_eta = n_cols if n_eta is None else int(n_eta)
    tth2d = np.broadcast_to(np.asarray(tth_deg, dtype=np.float64).reshape(n_r, -1), (n_r, n_cols))
    n_frames = max(int(frames_summed), 1)
    specs = []
    for e in range(n_cols):
        use = (area[:, e] != 0) & np.isfinite(intensity[:, e])
        col_sum, col_area = intensity[use, e], area[use, e]
        arrays = in_tth_order([tth2d[use, e], col_sum / n_frames,
                               lineout_sigma(col_sum, col_area, n_frames, normalized=normalized)])
        index = int(group) * n_eta + eta_start + e
        skipped = bool(use.sum() <= min_points)
        number = (-1 if skipped else index) if histogram is None else int(histogram[e])
        f = float(np.mean(fraction[use, e])) if fraction is not None and use.any() else 1.0
        specs.append(LineoutSpec(
            index=index, group=int(group), eta_index=eta_start + e,
            omega_deg=float(omega_deg),
            eta_deg=float(eta_deg[e]), tth_deg=arrays[0], intensity=arrays[1], sigma=arrays[2],
            frames_summed=n_frames, skipped=skipped, independent_fraction=f, histogram=number,
            noise_correlation=noise_correlation(radial_width_px, f) if radial_width_px else (),
        ))
    return specs


def in_tth_order(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """``arrays`` (2θ first, then the values of the same points), read-only, in increasing 2θ.

    Bin-centre axes are increasing already; effective 2θ axes (docs/caking_2theta.md) may step
    back where a mask cuts two neighbouring bins, and the backends (GSAS-II's peak ranges)
    expect increasing 2θ. The points are the same, only their order changes."""
    tth = arrays[0]
    if (np.diff(tth) < 0).any():
        order = np.argsort(tth, kind="stable")
        arrays = [a[order] for a in arrays]
    for arr in arrays:
        arr.setflags(write=False)
    return arrays


def is_normalized(params_text: str) -> bool:
    """Whether the ``Normalize`` key of MIDAS parameter text is on (true when absent)."""
    m = re.search(r"^\s*Normalize\s+(\S+)", params_text or "", flags=re.MULTILINE)
    return True if m is None else m.group(1).strip() not in ("0", "0.0")


def plan_lineouts(ds: Any, *, min_points: int = 20, normalized: bool | None = None) -> list[LineoutSpec]:
    """Every lineout of a caked scan, read now: one :class:`LineoutSpec` per (ω-group, η).

    For inspection and small scans; :class:`midasflow.refinement.plan.LineoutPlan` is the plan
    that reads each group where it is refined.

    Parameters
    ----------
    ds : xarray.Dataset or path
        Caked Dataset as :func:`midasflow.caking.cake` makes it (``intensity`` (group, r, eta) =
        sum of per-frame cakes, ``frames_summed`` (group), coords ``tth_deg``, ``eta_deg``,
        ``bin_area``, ``omega_deg``), or a ``.zarr.zip``/zarr path opened with
        :func:`midasflow.io.caked_store.open_caked`. Lazy intensities are computed one group
        at a time.
    min_points : int
        A lineout needs MORE than this many usable bins (GSAS-II's importer: > 20).
    normalized : bool, optional
        Whether the cake values are area-normalised; default from the ``Normalize`` key in
        ``ds.attrs["params"]`` (true when absent).

    Returns
    -------
    list of LineoutSpec, ordered by index (skipped ones included, flagged).
    """
    from midasflow.refinement.plan import CakeLayout

    store = None
    if isinstance(ds, (str, os.PathLike)):
        from midasflow.io.caked_store import open_caked

        store, ds = ds, open_caked(ds)
    lay = CakeLayout.of(ds, normalized, store=store, min_points=min_points)
    intensity = ds["intensity"].transpose("group", "r", "eta")
    plan: list[LineoutSpec] = []
    for g in range(lay.n_groups):
        plan += lineouts_of_group(
            np.asarray(intensity.isel(group=g).values), group=g, frames_summed=int(lay.frames_summed[g]),
            omega_deg=float(lay.omega_deg[g]), tth_deg=lay.tth_deg, eta_deg=lay.eta_deg,
            bin_area=lay.bin_area, min_points=min_points, normalized=lay.normalized,
            fraction=lay.fraction, histogram=lay.histogram[g], radial_width_px=lay.radial_width_px)
    return plan


# ---------------------------------------------------------------------------------------------
# one lineout
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class LineoutResult:
    """Outcome of one lineout.

    Attributes
    ----------
    index, group, eta_index : int
    omega_deg, eta_deg : float
    n_points : int
        Usable bins of the lineout.
    status : str
        "ok", "failed" or "skipped".
    message : str
        Error or skip reason; empty when ok.
    pattern : PatternResult or None
        The engine's result (None when skipped or when the engine raised).
    elapsed_s : float
        Wall time of the engine call on its worker.
    seeded : bool
        Whether the refinement started from another refinement's values.
    worker : str
        Address of the Dask worker that refined the lineout (e.g. ``"tcp://10.0.0.7:40215"``);
        empty when it was refined in the calling process.
    histogram : int
        MIDAS's histogram number (``LineoutSpec.histogram``); −1: no histogram.
    seeded_from : str
        Where the start values came from: ``"group mean"`` (the ω-group's η-averaged pattern),
        the name of the lineout whose refined values it started from (``"hist_NNNN"``, see
        :func:`lineout_name`) or ``""`` (the data's own estimate, or the instrument's terms).
    recipe : str
        What refined it (:data:`midasflow.refinement.warm.RECIPES`): "full" (every stage),
        "warm" (the short recipe from a good seed) or "full after warm" (a warm fit refused,
        then every stage from the seed's values); the pattern's notes say why.
    """

    index: int
    group: int
    eta_index: int
    omega_deg: float
    eta_deg: float
    n_points: int
    status: str
    message: str = ""
    pattern: Any = None
    elapsed_s: float = 0.0
    seeded: bool = False
    worker: str = ""
    histogram: int = -1
    seeded_from: str = ""
    recipe: str = "full"

    @property
    def name(self) -> str:
        """File stem, as ``LineoutSpec.name``."""
        return lineout_name(self.histogram, self.group, self.eta_index)


def _result(spec: LineoutSpec, status: str, message: str = "", pattern: Any = None,
            elapsed_s: float = 0.0, seed: LineoutResult | None = None, recipe: str = "full") -> LineoutResult:
    return LineoutResult(spec.index, spec.group, spec.eta_index, spec.omega_deg, spec.eta_deg,
                         spec.n_points, status, message, pattern, elapsed_s, seed is not None,
                         _worker_address(), spec.histogram, seed_name(seed), recipe)


def seed_name(seed: LineoutResult | None) -> str:
    """``seeded_from`` of a lineout started from ``seed``: "group mean" (an ω-group's η-averaged
    pattern, index < 0), the seed's name (``hist_NNNN``, :func:`lineout_name`) or "" (no seed)."""
    if seed is None:
        return ""
    return "group mean" if seed.index < 0 else seed.name


def failed_result(index: int, group: int, eta_index: int, omega_deg: float, eta_deg: float,
                  message: str, histogram: int = -1) -> LineoutResult:
    """A "failed" result for a lineout whose task was lost (nothing known of its data)."""
    return LineoutResult(index, group, eta_index, omega_deg, eta_deg, 0, "failed", message,
                         histogram=histogram)


def _worker_address() -> str:
    """Address of the Dask worker running this call; "" outside a worker."""
    if "distributed" not in sys.modules:  # nothing can be running on a worker
        return ""
    from distributed import get_worker

    try:
        return str(get_worker().address)
    except ValueError:  # not inside a worker task
        return ""


def refine_lineout(spec: LineoutSpec, backend: RefineBackend, options: RefineOptions,
                   seed: LineoutResult | None = None) -> LineoutResult:
    """Refine one lineout; never raises.

    ``backend.refine(spec, options, start)`` is called with ``start`` = the seed's refined
    ``values`` when ``seed`` is an "ok" result (else None); with warm starts
    (:meth:`RefineOptions.warm_starts`) a backend that has ``refine_warm`` is asked for a warm
    start from the seed instead (:mod:`midasflow.refinement.warm`; the result's ``recipe`` says
    which recipe ran). A result above ``options.max_rwp``
    is flagged ``rwp_above_max`` (:meth:`PatternResult.with_max_rwp`); the esds are rescaled
    for the pixels the lineout's bins share (``spec.independent_fraction``, module docstring).
    An exception, or a pattern whose ``status`` is not "ok", gives a "failed" result carrying the
    one-line message. The result's ``seeded_from`` names the seed (:func:`seed_name`).
    """
    if spec.skipped:
        return _result(spec, "skipped", f"{spec.n_points} usable points (need more than the plan's minimum)")
    if seed is not None and (seed.status != "ok" or seed.pattern is None):
        seed = None  # a failed seed: the lineout starts as an unseeded one
    warm = getattr(backend, "refine_warm", None) if seed is not None and options.warm_starts() else None
    recipe = "full"
    t0 = time.perf_counter()
    try:
        if warm is not None:
            pattern, recipe = warm(spec, options, seed.pattern, seed_name(seed))
        else:
            pattern = backend.refine(spec, options, None if seed is None else dict(seed.pattern.values))
    except Exception as exc:  # one lineout must never stop the others
        first_line = (str(exc).splitlines() or [""])[0]
        return _result(spec, "failed", f"{type(exc).__name__}: {first_line}", None,
                       time.perf_counter() - t0, seed)
    elapsed = time.perf_counter() - t0
    if hasattr(pattern, "with_independent_fraction"):  # every backend's result alike
        pattern = pattern.with_independent_fraction(spec.independent_fraction)
    if options.max_rwp is not None and hasattr(pattern, "with_max_rwp"):
        pattern = pattern.with_max_rwp(options.max_rwp)
    status = getattr(pattern, "status", "ok")
    message = getattr(pattern, "message", "") or ""
    return _result(spec, "ok" if status == "ok" else "failed", message, pattern, elapsed, seed, recipe)


def seed_sources(plan: Sequence[LineoutSpec], seed_from: SeedFrom | None) -> dict[int, int]:
    """Map lineout index → index of what seeds it (the rule the executors follow).

    ``seed_from="neighbour"``: every lineout of an ω-group starts from the first (lowest η index)
    non-skipped lineout of that group; ``"group"``: every non-skipped lineout of group g starts
    from the group's η-averaged pattern, index −1 − g
    (:func:`midasflow.refinement.plan.group_mean_spec`); ``None``: independent starts (empty map).
    """
    if seed_from not in SEED_MODES:
        raise ParameterError(f"--seed-from {seed_from!r}: expected one of "
                             f"{', '.join(m for m in SEED_MODES if m)} or nothing")
    if seed_from is None:
        return {}
    first: dict[int, int] = {}
    out = {}
    for spec in sorted(plan, key=lambda s: s.index):
        if spec.skipped:
            continue
        if seed_from == "group":
            out[spec.index] = -1 - spec.group
        elif spec.group not in first:
            first[spec.group] = spec.index
        else:
            out[spec.index] = first[spec.group]
    return out


# ---------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------
class LineoutProgress(TextProgress):
    """``refine-lineout [####....] 37/72  ok 35  failed 2  4.1/s`` on stderr."""

    def __init__(self, total: int, enabled: bool) -> None:
        super().__init__(total, TASK_PREFIX, enabled)
        self.ok = self.failed = 0

    def update(self, res: LineoutResult) -> None:  # type: ignore[override]
        self.ok += res.status == "ok"
        self.failed += res.status == "failed"
        super().update(f"ok {self.ok}  failed {self.failed}  ")


# ---------------------------------------------------------------------------------------------
# executors
# ---------------------------------------------------------------------------------------------
def run_serial(
    plan: Any,
    options: RefineOptions,
    *,
    backend: RefineBackend | None = None,
    seed_from: SeedFrom | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = False,
    min_points: int = 20,
) -> list[LineoutResult]:
    """Refine every lineout of ``plan`` in this process (the reference executor).

    Parameters
    ----------
    plan : sequence of LineoutSpec, caked store path or caked Dataset
        What :class:`midasflow.refinement.plan.LineoutPlan` plans (a store's groups are read
        one at a time).
    options : RefineOptions
        Phases, instrument and recipe options shared by every lineout.
    backend : RefineBackend, optional
        What refines each lineout; default the built-in engine
        (:class:`~midasflow.refinement.backends.NativeBackend`).
    seed_from : {None, "neighbour", "group"}
        See :mod:`midasflow.refinement.plan`.
    checkpoint_dir : path, optional
        Each finished lineout is checkpointed to ``<checkpoint_dir>/lineouts/hist_NNNN.npz``
        (:mod:`midasflow.refinement.checkpoints`).
    resume : bool
        Take matching checkpoints of earlier runs instead of refining again.
    progress : bool
        Progress line on stderr.
    min_points : int
        For a store or Dataset: a lineout needs more usable bins than this.

    Returns
    -------
    list of LineoutResult, in index order.
    """
    from midasflow.refinement.executors import SerialExecutor
    from midasflow.refinement.plan import LineoutPlan

    lineout_plan = LineoutPlan.of(plan, options, backend=backend, seed_from=seed_from, min_points=min_points)
    return lineout_plan.execute(SerialExecutor(), checkpoint_dir=checkpoint_dir, resume=resume,
                                progress=progress)


def run_distributed(
    plan: Any,
    options: RefineOptions,
    client: Any,
    *,
    backend: RefineBackend | None = None,
    seed_from: SeedFrom | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    retries: int = 2,
    min_points: int = 20,
    lineouts_per_task: int | None = None,
) -> list[LineoutResult]:
    """Refine every lineout on a ``distributed.Client``; the same results as :func:`run_serial`.

    The plan's context (layout, options, backend) is scattered once to every worker; each task
    refines a unit of lineouts (``lineouts_per_task`` η columns of one ω-group, default the
    whole group), reading its cake on the worker from a store. Keys
    ``refine-lineout-<first>[-<last>]-<token>``. Other parameters as :func:`run_serial`, and
    ``retries`` as :class:`~midasflow.refinement.executors.DistributedExecutor`.
    """
    from midasflow.refinement.executors import DistributedExecutor
    from midasflow.refinement.plan import LineoutPlan

    lineout_plan = LineoutPlan.of(plan, options, backend=backend, seed_from=seed_from, min_points=min_points)
    executor = DistributedExecutor(client, lineouts_per_task=lineouts_per_task, retries=retries)
    return lineout_plan.execute(executor, checkpoint_dir=checkpoint_dir, resume=resume, progress=progress)
