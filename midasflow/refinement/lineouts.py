"""Lineouts as tasks: a plain plan (one frozen spec per (ω-group, η) lineout) and two executors.

The plan follows GSAS-II's MIDAS importer (docs/reference/midas_zarr_layout.md §5; the σ
model is docs/reference/lineout_sigma.md): one lineout per ω-group and η column, numbered
``index = group · n_eta + eta_index``; its points are the R bins with bin area ≠ 0 and a finite
intensity, and a lineout with ``min_points`` (20) or fewer such points is skipped.

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

Executors: :func:`run_serial` (the reference) and :func:`run_distributed` (one
``dask.distributed`` task per lineout, keys ``refine-lineout-<index>-<token>``) return the same
list of :class:`LineoutResult` for the same plan. A failing lineout becomes a "failed" result with
its error; finished lineouts are checkpointed one small file each so ``resume=True`` computes
only what is missing.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from midasflow.errors import CakeFileError, ParameterError
from midasflow.io.atomic import write_bytes_atomic, write_text_atomic
from midasflow.progress import TextProgress
from midasflow.refinement.backends import NativeBackend, RefineBackend
from midasflow.refinement.options import SEED_MODES, RefineOptions, SeedFrom

CHECKPOINT_SUBDIR = "lineouts"
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
        ``group · n_eta + eta_index`` (GSAS-II importer numbering; ``hist_NNNN`` files).
    group, eta_index : int
    omega_deg : float
        Mid-group ω (mean of the group's first and last frame ω), degrees.
    eta_deg : float
        η bin centre, degrees (MIDAS convention).
    tth_deg, intensity, sigma : ndarray (n_points,), float64, read-only
        2θ (deg), counts per frame and σ of the usable bins (area ≠ 0, finite intensity).
    frames_summed : int
    skipped : bool
        True when n_points ≤ the plan's ``min_points``; such a lineout is not refined.
    independent_fraction : float
        Mean over the usable bins of the fraction f of their σ² that is independent noise
        (:func:`independent_fraction`; 1 = independent bins).
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

    @property
    def n_points(self) -> int:
        """Number of usable bins."""
        return int(self.tth_deg.size)

    @property
    def name(self) -> str:
        """File stem, ``hist_NNNN``."""
        return f"hist_{self.index:04d}"


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
) -> list[LineoutSpec]:
    """Specs of every η column of one ω-group's cake (pure numpy).

    Parameters
    ----------
    intensity : ndarray (n_r, n_eta), float64
        The group's summed cake (NaN = masked bin).
    group, frames_summed : int
    omega_deg : float
        Mid-group ω.
    tth_deg : ndarray (n_r,) or (n_r, n_eta), degrees
    eta_deg : ndarray (n_eta,), degrees
    bin_area : ndarray (n_r, n_eta), pixel²
    min_points, normalized
        As :func:`plan_lineouts`.
    fraction : ndarray (n_r, n_eta), optional
        :func:`independent_fraction` of every bin; default 1 (independent bins).

    Returns
    -------
    list of LineoutSpec, one per η column, in η order.
    """
    intensity = np.asarray(intensity, dtype=np.float64)
    area = np.asarray(bin_area, dtype=np.float64)
    n_r, n_eta = intensity.shape
    tth2d = np.broadcast_to(np.asarray(tth_deg, dtype=np.float64).reshape(n_r, -1), (n_r, n_eta))
    n_frames = max(int(frames_summed), 1)
    specs = []
    for e in range(n_eta):
        use = (area[:, e] != 0) & np.isfinite(intensity[:, e])
        col_sum, col_area = intensity[use, e], area[use, e]
        arrays = [tth2d[use, e], col_sum / n_frames,
                  lineout_sigma(col_sum, col_area, n_frames, normalized=normalized)]
        for arr in arrays:
            arr.setflags(write=False)
        specs.append(LineoutSpec(
            index=int(group) * n_eta + e, group=int(group), eta_index=e, omega_deg=float(omega_deg),
            eta_deg=float(eta_deg[e]), tth_deg=arrays[0], intensity=arrays[1], sigma=arrays[2],
            frames_summed=n_frames, skipped=bool(use.sum() <= min_points),
            independent_fraction=float(np.mean(fraction[use, e])) if fraction is not None and use.any() else 1.0,
        ))
    return specs


def _is_normalized(params_text: str) -> bool:
    m = re.search(r"^\s*Normalize\s+(\S+)", params_text or "", flags=re.MULTILINE)
    return True if m is None else m.group(1).strip() not in ("0", "0.0")


def plan_lineouts(ds: Any, *, min_points: int = 20, normalized: bool | None = None) -> list[LineoutSpec]:
    """The refinement plan of a caked scan: one :class:`LineoutSpec` per (ω-group, η).

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
    if isinstance(ds, (str, os.PathLike)):
        from midasflow.io.caked_store import open_caked

        ds = open_caked(ds)
    for name in ("intensity", "frames_summed", "tth_deg", "eta_deg", "bin_area"):
        if name not in ds.variables:
            raise CakeFileError(f"caked dataset: missing {name!r} (expected the layout of midasflow.caking.cake)")
    if normalized is None:
        normalized = _is_normalized(str(ds.attrs.get("params", "")))
    if "omega_deg" in ds.variables:
        omega = np.asarray(ds["omega_deg"].values, dtype=np.float64)
    else:
        omega = 0.5 * (np.asarray(ds["omega_first_deg"].values) + np.asarray(ds["omega_last_deg"].values))
    tth = np.asarray(ds["tth_deg"].transpose("r", ...).values, dtype=np.float64)
    eta = np.asarray(ds["eta_deg"].values, dtype=np.float64)
    area = np.asarray(ds["bin_area"].transpose("r", "eta").values, dtype=np.float64)
    frames = np.asarray(ds["frames_summed"].values)
    fraction = None
    if "r_px" in ds.variables:  # every cake of the caking contract; absent: independent bins
        sq = ds["bin_area_sq"].transpose("r", "eta").values if "bin_area_sq" in ds.variables else None
        fraction = independent_fraction(ds["r_px"].values, eta, bin_area=area, bin_area_sq=sq)
    intensity = ds["intensity"].transpose("group", "r", "eta")
    plan: list[LineoutSpec] = []
    for g in range(intensity.sizes["group"]):
        plan += lineouts_of_group(
            np.asarray(intensity.isel(group=g).values), group=g, frames_summed=int(frames[g]),
            omega_deg=float(omega[g]), tth_deg=tth, eta_deg=eta, bin_area=area,
            min_points=min_points, normalized=normalized, fraction=fraction)
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
        Whether the refinement started from a neighbour's refined values.
    worker : str
        Address of the Dask worker that refined the lineout (e.g. ``"tcp://10.0.0.7:40215"``);
        empty when it was refined in the calling process.
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


def _result(spec: LineoutSpec, status: str, message: str = "", pattern: Any = None,
            elapsed_s: float = 0.0, seeded: bool = False) -> LineoutResult:
    return LineoutResult(spec.index, spec.group, spec.eta_index, spec.omega_deg, spec.eta_deg,
                         spec.n_points, status, message, pattern, elapsed_s, seeded,
                         _worker_address())


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
    ``values`` when ``seed`` is an "ok" result (else None). A result above ``options.max_rwp``
    is flagged ``rwp_above_max`` (:meth:`PatternResult.with_max_rwp`); the esds are rescaled
    for the pixels the lineout's bins share (``spec.independent_fraction``, module docstring). An exception, or a pattern whose
    ``status`` is not "ok", gives a "failed" result carrying the one-line message.
    """
    if spec.skipped:
        return _result(spec, "skipped", f"{spec.n_points} usable points (need more than the plan's minimum)")
    seeded = seed is not None and seed.status == "ok" and seed.pattern is not None
    start = dict(seed.pattern.values) if seeded else None
    t0 = time.perf_counter()
    try:
        pattern = backend.refine(spec, options, start)
    except Exception as exc:  # one lineout must never stop the others
        first_line = (str(exc).splitlines() or [""])[0]
        return _result(spec, "failed", f"{type(exc).__name__}: {first_line}", None,
                       time.perf_counter() - t0, seeded)
    elapsed = time.perf_counter() - t0
    if hasattr(pattern, "with_independent_fraction"):  # every backend's result alike
        pattern = pattern.with_independent_fraction(spec.independent_fraction)
    if options.max_rwp is not None and hasattr(pattern, "with_max_rwp"):
        pattern = pattern.with_max_rwp(options.max_rwp)
    status = getattr(pattern, "status", "ok")
    message = getattr(pattern, "message", "") or ""
    return _result(spec, "ok" if status == "ok" else "failed", message, pattern, elapsed, seeded)


def seed_sources(plan: Sequence[LineoutSpec], seed_from: SeedFrom | None) -> dict[int, int]:
    """Map lineout index → index of the lineout whose refined values seed it.

    ``seed_from="neighbour"``: every lineout of an ω-group starts from the first (lowest η index)
    non-skipped lineout of that group; ``None``: independent starts (empty map).
    """
    if seed_from not in SEED_MODES:
        raise ParameterError(f"--seed-from {seed_from!r}: expected 'neighbour' or nothing")
    if seed_from is None:
        return {}
    first: dict[int, int] = {}
    out = {}
    for spec in sorted(plan, key=lambda s: s.index):
        if spec.skipped:
            continue
        if spec.group not in first:
            first[spec.group] = spec.index
        else:
            out[spec.index] = first[spec.group]
    return out


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def checkpoint_path(checkpoint_dir: str | os.PathLike, index: int) -> Path:
    """``<checkpoint_dir>/lineouts/hist_NNNN.pkl``."""
    return Path(checkpoint_dir) / CHECKPOINT_SUBDIR / f"hist_{index:04d}.pkl"


def save_checkpoint(result: LineoutResult, checkpoint_dir: str | os.PathLike) -> Path:
    """Write one finished lineout atomically (temporary file, then rename). Pickle: a private cache
    of this output folder, read back only by :func:`load_checkpoints`."""
    path = checkpoint_path(checkpoint_dir, result.index)
    return write_bytes_atomic(path, pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))


def load_checkpoints(plan: Sequence[LineoutSpec], checkpoint_dir: str | os.PathLike) -> dict[int, LineoutResult]:
    """Finished lineouts of ``plan`` found in ``checkpoint_dir`` (unreadable or foreign files ignored)."""
    done = {}
    for spec in plan:
        path = checkpoint_path(checkpoint_dir, spec.index)
        if not path.is_file():
            continue
        try:
            with open(path, "rb") as fh:
                res = pickle.load(fh)
        except Exception:
            continue
        if isinstance(res, LineoutResult) and (res.group, res.eta_index) == (spec.group, spec.eta_index):
            done[spec.index] = res
    return done


def record_settings(checkpoint_dir: str | os.PathLike, settings: Mapping[str, Any], *, resume: bool) -> Path:
    """Keep the settings the checkpoints are made with; refuse to resume under other settings.

    ``settings`` (JSON-serialisable: data file, phases, instrument, recipe options, backend) is
    written to ``<checkpoint_dir>/lineouts/settings.json``. With ``resume``, an existing file that
    differs raises :class:`ParameterError` naming the settings that changed, so finished lineouts
    of one setup are never mixed silently with lineouts of another.
    """
    path = Path(checkpoint_dir) / CHECKPOINT_SUBDIR / "settings.json"
    current = json.loads(json.dumps(dict(settings), sort_keys=True, default=str))
    if resume and path.is_file():
        try:
            before = json.loads(path.read_text())
        except (OSError, ValueError):
            before = None
        if isinstance(before, dict) and before != current:
            changed = sorted(k for k in set(before) | set(current) if before.get(k) != current.get(k))
            raise ParameterError(
                f"{path}: --resume: the finished lineouts were refined with other {', '.join(changed)}; "
                "run without --resume or choose another output folder"
            )
    return write_text_atomic(path, json.dumps(current, indent=1, sort_keys=True))


# ---------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------
class _LineoutProgress(TextProgress):
    """``refine-lineout [####....] 37/72  ok 35  failed 2  4.1/s`` on stderr."""

    def __init__(self, total: int, enabled: bool) -> None:
        super().__init__(total, TASK_PREFIX, enabled)
        self.ok = self.failed = 0

    def update(self, res: LineoutResult) -> None:  # type: ignore[override]
        self.ok += res.status == "ok"
        self.failed += res.status == "failed"
        super().update(f"ok {self.ok}  failed {self.failed}  ")


def _in_notebook() -> bool:
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return type(shell).__name__ == "ZMQInteractiveShell"


# ---------------------------------------------------------------------------------------------
# executors
# ---------------------------------------------------------------------------------------------
def _prepare(plan: Sequence[LineoutSpec], seed_from: SeedFrom | None, checkpoint_dir: Any, resume: bool
             ) -> tuple[list[LineoutSpec], dict[int, int], dict[int, LineoutResult]]:
    plan = sorted(plan, key=lambda s: s.index)
    if len({s.index for s in plan}) != len(plan):
        raise ParameterError("lineout plan: duplicate lineout indices")
    seeds = seed_sources(plan, seed_from)
    if resume and checkpoint_dir is None:
        raise ParameterError("--resume needs an output folder (checkpoint_dir)")
    done = load_checkpoints(plan, checkpoint_dir) if resume else {}
    return plan, seeds, done


def run_serial(
    plan: Sequence[LineoutSpec],
    options: RefineOptions,
    *,
    backend: RefineBackend | None = None,
    seed_from: SeedFrom | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = False,
) -> list[LineoutResult]:
    """Refine every lineout of ``plan`` in this process, in index order (the reference executor).

    Parameters
    ----------
    plan : sequence of LineoutSpec
    options : RefineOptions
        Phases, instrument and recipe options shared by every lineout.
    backend : RefineBackend, optional
        What refines each lineout; default the built-in engine
        (:class:`~midasflow.refinement.backends.NativeBackend`).
    seed_from : {None, "neighbour"}
        See :func:`seed_sources`.
    checkpoint_dir : path, optional
        Each finished lineout is written to ``<checkpoint_dir>/lineouts/hist_NNNN.pkl``.
    resume : bool
        Load finished lineouts from ``checkpoint_dir`` instead of recomputing them.
    progress : bool
        Progress line on stderr.

    Returns
    -------
    list of LineoutResult, in plan index order.
    """
    backend = backend or NativeBackend()
    plan, seeds, results = _prepare(plan, seed_from, checkpoint_dir, resume)
    bar = _LineoutProgress(len(plan) - len(results), progress)
    try:
        for spec in plan:
            if spec.index in results:
                continue
            seed = results.get(seeds[spec.index]) if spec.index in seeds else None
            res = refine_lineout(spec, backend, options, seed)
            if checkpoint_dir is not None:
                save_checkpoint(res, checkpoint_dir)
            results[spec.index] = res
            bar.update(res)
    finally:  # the line ends also when Ctrl-C or SIGTERM stops the loop
        bar.close()
    return [results[s.index] for s in plan]


def run_distributed(
    plan: Sequence[LineoutSpec],
    options: RefineOptions,
    client: Any,
    *,
    backend: RefineBackend | None = None,
    seed_from: SeedFrom | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    retries: int = 2,
) -> list[LineoutResult]:
    """Refine every lineout as one ``dask.distributed`` task; same results as :func:`run_serial`.

    ``options`` (phases, instrument, recipe) is scattered once to every worker
    (``broadcast=True``) and each task receives it by reference. Task keys are
    ``refine-lineout-<index>-<token>`` (the dashboard groups them as "refine-lineout"; the
    per-call token keeps repeated runs on one client apart). ``retries`` covers workers that die;
    a lineout still lost after that is recorded "failed" with the error. With
    ``seed_from="neighbour"`` the seeding lineout of each ω-group is a dependency of the others.
    Results are checkpointed by the client as they arrive.

    Parameters
    ----------
    client : distributed.Client
    Other parameters as :func:`run_serial`; ``progress`` shows a widget in a notebook and a
    text line on stderr elsewhere.

    Returns
    -------
    list of LineoutResult, in plan index order.
    """
    from distributed import as_completed

    backend = backend or NativeBackend()
    plan, seeds, results = _prepare(plan, seed_from, checkpoint_dir, resume)
    todo = [s for s in plan if s.index not in results]
    if not todo:
        return [results[s.index] for s in plan]
    [options_future] = client.scatter([options], broadcast=True, hash=False)
    token = uuid.uuid4().hex[:8]
    futures: dict[Any, LineoutSpec] = {}
    by_index: dict[int, Any] = {}
    for spec in todo:  # index order: every group's seeding lineout comes before its dependants
        seed_index = seeds.get(spec.index)
        seed = None if seed_index is None else results.get(seed_index, by_index.get(seed_index))
        fut = client.submit(refine_lineout, spec, backend, options_future, seed,
                            key=f"{TASK_PREFIX}-{spec.index}-{token}", retries=retries, pure=False)
        futures[fut] = spec
        by_index[spec.index] = fut
    notebook = progress and _in_notebook()
    if notebook:
        from distributed import progress as dask_progress

        dask_progress(list(futures))
    bar = _LineoutProgress(len(todo), progress and not notebook)
    try:
        for fut in as_completed(list(futures)):
            spec = futures[fut]
            try:
                res = fut.result()
            except Exception as exc:  # worker lost beyond retries, or the seed's task lost
                res = _result(spec, "failed", f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
            if checkpoint_dir is not None:
                save_checkpoint(res, checkpoint_dir)
            results[spec.index] = res
            bar.update(res)
    finally:
        bar.close()
        client.cancel(list(futures) + [options_future])
    return [results[s.index] for s in plan]
