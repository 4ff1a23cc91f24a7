"""The lazy refinement plan: every (ω-group, η) lineout of a caked scan, read where it is refined.

A :class:`LineoutPlan` is a small value: the cake's layout (2θ, η, bin areas, ω and frames per
group: O(groups + bins), never the cakes), where the cakes are (a store path), and how every
lineout is refined (options, backend, seeding). It is made without reading a cake
(:meth:`LineoutPlan.of`), inspected without reading one (:meth:`LineoutPlan.describe`), and run by
an executor (:meth:`LineoutPlan.execute`; :mod:`midasflow.refinement.executors`). Its work is cut
into :class:`TaskUnit`\\ s, a run of η columns of one ω-group each (by default the whole group);
a unit's task reads its group's cake from the store itself (on its Dask worker), makes the
lineouts with :func:`~midasflow.refinement.lineouts.lineouts_of_group` (GSAS-II MIDAS-importer
numbering and skipping), takes back the checkpointed ones, refines the others and checkpoints
each as it finishes (:mod:`midasflow.refinement.checkpoints`).

Three kinds of source:

* a store path (``.zarr.zip`` or plain zarr): tasks read their group on the worker; the client
  holds only the layout;
* an in-memory Dataset: the client reads each unit's columns when it submits the unit;
* a sequence of :class:`~midasflow.refinement.lineouts.LineoutSpec` (an explicit, eager plan):
  each unit carries its specs.

Seeding (``seed_from``): "neighbour" starts every lineout of a group from the refined values of
the group's first lineout that is not skipped; "group" refines the group's η-averaged pattern
first (:func:`group_mean_spec`: every usable bin's counts summed over η) and starts every lineout
of the group from it. A whole-group unit seeds itself; units of part of a group share one seed
task per group.
"""
from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from midasflow.errors import CakeFileError, ParameterError
from midasflow.refinement.checkpoints import Checkpoints, refine_digest, spec_digest
from midasflow.refinement.lineouts import (
    LineoutResult,
    LineoutSpec,
    failed_result,
    in_tth_order,
    independent_fraction,
    is_normalized,
    lineouts_of_group,
    noise_correlation,
    refine_lineout,
)
from midasflow.refinement.options import SEED_MODES, RefineOptions, SeedFrom

#: Variables and coordinates a caked Dataset must have to be planned.
_LAYOUT_VARS = ("intensity", "frames_summed", "tth_deg", "eta_deg", "bin_area")


# ---------------------------------------------------------------------------------------------
# the layout: what can be known without reading a cake
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class CakeLayout:
    """The small, data-free part of a caked scan: enough to number, describe and make lineouts.

    Attributes
    ----------
    n_groups, n_r, n_eta : int
    tth_deg : ndarray (n_r,) or (n_r, n_eta), degrees
        The lineouts' x axis: the 2θ every bin's value samples (the cake's
        ``effective_tth_deg``, docs/caking_2theta.md) where the cake has it, else the bin
        centres (``tth_deg``: stores written by MIDAS, or by midasflow before it).
    eta_deg : ndarray (n_eta,), degrees
    bin_area : ndarray (n_r, n_eta), pixel²
    omega_deg : ndarray (n_groups,), mid-group ω, degrees
    frames_summed : ndarray (n_groups,), int
    normalized : bool
        Whether the cakes are area-normalised (MIDAS ``Normalize``; σ depends on it).
    fraction : ndarray (n_r, n_eta) or None
        :func:`~midasflow.refinement.lineouts.independent_fraction` of every bin (None: a cake
        without ``r_px``, independent bins).
    histogram : ndarray (n_groups, n_eta) int
        MIDAS's histogram number of every lineout (:mod:`midasflow.refinement.numbering`; −1:
        no histogram).
    tth_axis : {"effective", "bin_centre"}
        Which 2θ ``tth_deg`` holds.
    radial_width_px : float or None
        R bin spacing in pixels (None: a cake without ``r_px``), for the lineouts'
        :func:`~midasflow.refinement.lineouts.noise_correlation`.
    """

    n_groups: int
    n_r: int
    n_eta: int
    tth_deg: np.ndarray
    eta_deg: np.ndarray
    bin_area: np.ndarray
    omega_deg: np.ndarray
    frames_summed: np.ndarray
    normalized: bool
    fraction: np.ndarray | None = None
    histogram: np.ndarray | None = None
    tth_axis: str = "bin_centre"
    radial_width_px: float | None = None

    @classmethod
    def of(cls, ds: Any, normalized: bool | None = None, *, store: str | os.PathLike | None = None,
           min_points: int = 20) -> CakeLayout:
        """The layout of a caked Dataset (:func:`midasflow.caking.cake`'s, or one opened with
        :func:`midasflow.io.caked_store.open_caked`); no cake is read.

        The histogram numbers come from the BinArea plane of ``store`` when it is the
        ``.zarr.zip`` ``ds`` was opened from (:func:`~midasflow.refinement.numbering.importer_area`;
        otherwise the cakes' NaN bins are read once) and the groups' ``last_frame``.

        Raises
        ------
        CakeFileError
            A variable of the caked layout is missing.
        """
        for name in _LAYOUT_VARS:
            if name not in ds.variables:
                raise CakeFileError(f"caked dataset: missing {name!r} (expected the layout of "
                                    "midasflow.caking.cake)")
        if normalized is None:
            normalized = is_normalized(str(ds.attrs.get("params", "")))
        if "omega_deg" in ds.variables:
            omega = np.asarray(ds["omega_deg"].values, dtype=np.float64)
        else:
            omega = 0.5 * (np.asarray(ds["omega_first_deg"].values, dtype=np.float64)
                           + np.asarray(ds["omega_last_deg"].values, dtype=np.float64))
        sizes = ds["intensity"].sizes
        area = np.asarray(ds["bin_area"].transpose("r", "eta").values, dtype=np.float64)
        eta = np.asarray(ds["eta_deg"].values, dtype=np.float64)
        fraction, width = None, None
        if "r_px" in ds.variables:  # every cake of the caking contract; absent: independent bins
            sq = (np.asarray(ds["bin_area_sq"].transpose("r", "eta").values)
                  if "bin_area_sq" in ds.variables else None)
            r_px = np.asarray(ds["r_px"].values, dtype=np.float64)
            fraction = independent_fraction(r_px, eta, bin_area=area, bin_area_sq=sq)
            width = float(np.median(np.abs(np.diff(r_px)))) if r_px.size > 1 else None
        from midasflow.refinement.numbering import histogram_numbers, importer_area

        last_frame = (np.asarray(ds["last_frame"].values) if "last_frame" in ds.variables
                      else np.arange(int(sizes["group"])))
        histogram = histogram_numbers(importer_area(ds, store), last_frame, min_points=min_points)
        tth, axis = lineout_tth_axis(ds, area)
        return cls(
            n_groups=int(sizes["group"]), n_r=int(sizes["r"]), n_eta=int(sizes["eta"]),
            tth_deg=tth, eta_deg=eta, bin_area=area, omega_deg=omega,
            frames_summed=np.asarray(ds["frames_summed"].values, dtype=np.int64),
            normalized=bool(normalized), fraction=fraction, histogram=histogram, tth_axis=axis,
            radial_width_px=width)

    def columns(self, e0: int, e1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """2θ, η, bin areas and independent fractions of η columns ``e0:e1``."""
        tth = self.tth_deg if self.tth_deg.ndim == 1 else self.tth_deg[:, e0:e1]
        fraction = None if self.fraction is None else self.fraction[:, e0:e1]
        return tth, self.eta_deg[e0:e1], self.bin_area[:, e0:e1], fraction


def lineout_tth_axis(ds: Any, area: np.ndarray) -> tuple[np.ndarray, str]:
    """The lineouts' 2θ axis of a caked Dataset and its name: ``effective_tth_deg`` (r, eta)
    when present ("effective"), else the bin centres ``tth_deg`` (r) ("bin_centre").

    Raises
    ------
    CakeFileError
        ``effective_tth_deg`` is not finite in a bin of non-zero area.
    """
    if "effective_tth_deg" not in ds.variables:
        return np.asarray(ds["tth_deg"].transpose("r", ...).values, dtype=np.float64), "bin_centre"
    tth = np.asarray(ds["effective_tth_deg"].transpose("r", "eta").values, dtype=np.float64)
    bad = (area != 0) & ~np.isfinite(tth)
    if bad.any():
        r, e = np.argwhere(bad)[0]
        raise CakeFileError(f"caked dataset: effective_tth_deg is {tth[r, e]} in bin (r {r}, "
                            f"eta {e}) of area {area[r, e]}, expected a finite 2θ wherever the "
                            "bin area is not 0")
    return tth, "effective"


# ---------------------------------------------------------------------------------------------
# reading a group's cake where the task runs
# ---------------------------------------------------------------------------------------------
_OPEN_STORES: dict[str, tuple[tuple[int, int, int], Any]] = {}
_OPEN_LOCK = threading.Lock()


def _stamp(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def read_group(store: str, group: int, shape: tuple[int, int]) -> np.ndarray:
    """The summed cake (n_r, n_eta) of one ω-group of a caked store, read in this process.

    The store is opened once per process (:func:`midasflow.io.caked_store.open_caked`) and
    reopened when its file changes; only the group's own member is decompressed.

    Raises
    ------
    CakeFileError
        The store is missing, unreadable, or its cakes are not ``shape``.
    """
    from midasflow.io.caked_store import open_caked

    try:
        stamp = _stamp(store)
    except OSError:
        raise CakeFileError(f"{store}: no such caked store") from None
    with _OPEN_LOCK:
        cached = _OPEN_STORES.get(store)
        if cached is None or cached[0] != stamp:
            _OPEN_STORES.clear()  # one store at a time per process: no growing cache
            _OPEN_STORES[store] = cached = (stamp, open_caked(store))
    intensity = cached[1]["intensity"].transpose("group", "r", "eta")
    if intensity.shape[1:] != tuple(shape) or not 0 <= group < intensity.shape[0]:
        raise CakeFileError(f"{store}: cakes {intensity.shape} changed since the plan was made "
                            f"(expected group {group} of (…, {shape[0]}, {shape[1]}))")
    block = intensity.data[group]
    values = block.compute(scheduler="sync") if hasattr(block, "compute") else block
    return np.asarray(values, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# units of work
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskUnit:
    """η columns ``eta_start:eta_stop`` of ω-group ``group``: the lineouts one task refines.

    ``specs`` holds the lineouts themselves for an explicit (spec-list) plan; empty otherwise.
    """

    group: int
    eta_start: int
    eta_stop: int
    whole_group: bool
    specs: tuple[LineoutSpec, ...] = ()

    def indices(self, n_eta: int) -> range | list[int]:
        """Lineout indices of the unit."""
        if self.specs:
            return [s.index for s in self.specs]
        base = self.group * n_eta
        return range(base + self.eta_start, base + self.eta_stop)


@dataclass(frozen=True)
class UnitOutcome:
    """What a unit's task returns: its lineouts' results and notes about checkpoints
    (:meth:`Checkpoints.load`'s (kind, text) pairs) for the client to report."""

    results: list[LineoutResult]
    notes: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True, eq=False)
class WorkerContext:
    """Everything a unit's task needs besides the unit (scattered once per run)."""

    layout: CakeLayout | None
    store: str | None
    options: RefineOptions
    backend: Any
    seed_from: SeedFrom | None
    min_points: int
    checkpoints: Checkpoints | None

    def specs_of(self, group: int, block: np.ndarray, eta_start: int) -> list[LineoutSpec]:
        """The lineouts of η columns ``eta_start:eta_start + block.shape[1]`` of a group."""
        lay = self.layout
        tth, eta, area, fraction = lay.columns(eta_start, eta_start + block.shape[1])
        return lineouts_of_group(
            block, group=group, frames_summed=int(lay.frames_summed[group]),
            omega_deg=float(lay.omega_deg[group]), tth_deg=tth, eta_deg=eta, bin_area=area,
            min_points=self.min_points, normalized=lay.normalized, fraction=fraction,
            eta_start=eta_start, n_eta=lay.n_eta,
            histogram=lay.histogram[group, eta_start:eta_start + block.shape[1]],
            radial_width_px=lay.radial_width_px)

    def read(self, group: int) -> np.ndarray:
        """The group's whole cake, from the store."""
        return read_group(self.store, group, (self.layout.n_r, self.layout.n_eta))


@dataclass(frozen=True)
class Seed:
    """A group's seed as a seed task returns it: its result, input digest and checkpoint name."""

    result: LineoutResult
    digest: str
    name: str


def group_mean_spec(intensity: np.ndarray, layout: CakeLayout, group: int, *,
                    min_points: int) -> LineoutSpec:
    """The η-averaged pattern of one ω-group, as a lineout (index −1 − group, η index −1).

    Per R bin, over the η columns where the bin is usable (area ≠ 0, finite cake): normalised
    cakes merge their counts ``C = Σ sum·area`` over the area ``A = Σ area``, so
    ``y = C / (A·N)`` per pixel and frame and σ = sqrt(max(C, 1)) / (A·N); cakes that are not
    normalised are averaged, ``y = Σ sum / (n·N)`` with σ = sqrt(max(Σ sum, 1)) / (n·N) over the
    n usable columns. 2θ is the area-weighted mean where it varies with η. A bin no column can
    use is left out. The independent fraction of a merged bin is the area-weighted mean of its
    columns' (Σa²/Σa over all its pixels), the lineout's the mean over its bins.
    """
    area = layout.bin_area
    use = (area != 0) & np.isfinite(intensity)
    used_area = np.where(use, area, 0.0).sum(axis=1)
    keep = used_area > 0
    n = max(int(layout.frames_summed[group]), 1)
    if layout.normalized:
        counts = np.where(use, intensity * area, 0.0).sum(axis=1)[keep]
        norm = used_area[keep] * n
    else:
        counts = np.where(use, intensity, 0.0).sum(axis=1)[keep]
        norm = use.sum(axis=1)[keep] * float(n)
    tth2d = np.broadcast_to(layout.tth_deg.reshape(layout.n_r, -1), area.shape)
    arrays = in_tth_order([np.where(use, tth2d * area, 0.0).sum(axis=1)[keep] / used_area[keep],
                           counts / norm, np.sqrt(np.maximum(counts, 1.0)) / norm])
    fraction = 1.0
    if layout.fraction is not None and keep.any():
        merged = (np.where(use, area * layout.fraction, 0.0)).sum(axis=1)[keep] / used_area[keep]
        fraction = float(merged.mean())
    lags = noise_correlation(layout.radial_width_px, fraction) if layout.radial_width_px else ()
    return LineoutSpec(index=-1 - group, group=group, eta_index=-1,
                       omega_deg=float(layout.omega_deg[group]), eta_deg=float("nan"),
                       tth_deg=arrays[0], intensity=arrays[1], sigma=arrays[2], frames_summed=n,
                       skipped=bool(keep.sum() <= min_points), independent_fraction=fraction,
                       noise_correlation=lags)


def _refine_checkpointed(ctx: WorkerContext, spec: LineoutSpec, name: str, digest: str,
                         seed: Callable[[], LineoutResult | None],
                         notes: list[tuple[str, str]], backend: Any = None) -> LineoutResult:
    """A checkpoint of ``spec`` that may be used, else its refinement (by ``backend``, default
    the plan's) from ``seed()``'s values (called only then), checkpointed at once."""
    ckpt = ctx.checkpoints
    if ckpt is not None:
        done, note = ckpt.load(name, digest)
        if note is not None:
            notes.append(note)
        if done is not None:
            complete = getattr(backend or ctx.backend, "complete", None)
            if complete is not None:  # e.g. exports a --no-export run did not write
                complete(spec, ctx.options, done)
            return done
    res = refine_lineout(spec, backend or ctx.backend, ctx.options, seed())
    if ckpt is not None:
        ckpt.save(name, res, digest)
    return res


class _GroupSeed:
    """A group's seed, refined (or taken from its checkpoint) only when first needed."""

    def __init__(self, ctx: WorkerContext, group: int, specs: Sequence[LineoutSpec],
                 block: np.ndarray | None, notes: list[tuple[str, str]]) -> None:
        self.ctx, self.notes, self.result = ctx, notes, None
        if ctx.seed_from == "group":
            self.spec = group_mean_spec(block, ctx.layout, group, min_points=ctx.min_points)
            self.name = f"seed_group_{group:04d}"
        else:  # "neighbour": the group's first lineout that is not skipped
            self.spec = next((s for s in specs if not s.skipped), None)
            self.name = "" if self.spec is None else self.spec.name
        self.digest = "" if self.spec is None else spec_digest(self.spec)

    @classmethod
    def given(cls, seed: Seed) -> _GroupSeed:
        """A seed a seed task refined already."""
        obj = cls.__new__(cls)
        obj.spec, obj.result, obj.digest, obj.name = None, seed.result, seed.digest, seed.name
        return obj

    def get(self) -> LineoutResult | None:
        """The seed's result (a group's mean pattern is refined without the exports of an
        :class:`~midasflow.refinement.backends.ExportingBackend`: it is no lineout)."""
        if self.result is None and self.spec is not None:
            backend = self.ctx.backend
            if self.ctx.seed_from == "group":
                from midasflow.refinement.backends import ExportingBackend

                while isinstance(backend, ExportingBackend):
                    backend = backend.backend
            self.result = _refine_checkpointed(self.ctx, self.spec, self.name, self.digest,
                                               lambda: None, self.notes, backend)
        return self.result


def _block(ctx: WorkerContext, unit: TaskUnit, payload: np.ndarray | None, whole: bool
           ) -> np.ndarray | None:
    """The unit's cake columns (the group's whole cake with ``whole``): the payload the client
    sent, else read from the store here; None for a unit that carries its specs."""
    if unit.specs:
        return None
    if payload is not None:
        return payload
    full = ctx.read(unit.group)
    return full if whole else full[:, unit.eta_start:unit.eta_stop]


def _unit_specs(ctx: WorkerContext, unit: TaskUnit, block: np.ndarray | None, whole: bool
                ) -> tuple[list[LineoutSpec], list[LineoutSpec]]:
    """(the unit's lineouts, the group's lineouts the task has), in index order."""
    if unit.specs:
        specs = sorted(unit.specs, key=lambda s: s.index)
        return specs, specs
    if whole:
        every = ctx.specs_of(unit.group, block, 0)
        return every[unit.eta_start:unit.eta_stop], every
    specs = ctx.specs_of(unit.group, block, unit.eta_start)
    return specs, specs


def refine_seed(ctx: WorkerContext, unit: TaskUnit, payload: np.ndarray | None = None
                ) -> tuple[Seed | None, list[tuple[str, str]]]:
    """Task: the seed of ``unit.group`` (refined, checkpointed), for units of part of a group;
    ``unit`` carries the group's specs for a spec-list plan, ``payload`` the group's cake for
    an in-memory Dataset."""
    notes: list[tuple[str, str]] = []
    block = _block(ctx, unit, payload, True)
    _, every = _unit_specs(ctx, unit, block, True)
    seed = _GroupSeed(ctx, unit.group, every, block, notes)
    result = seed.get()
    return (None if result is None else Seed(result, seed.digest, seed.name)), notes


def refine_unit(ctx: WorkerContext, unit: TaskUnit, payload: np.ndarray | None = None,
                seed: tuple[Seed | None, list[tuple[str, str]]] | None = None) -> UnitOutcome:
    """Task: refine the lineouts of one unit, each taken from its checkpoint or refined and
    checkpointed at once; a lineout's failure is its result, never an exception.

    Parameters
    ----------
    ctx : WorkerContext
    unit : TaskUnit
    payload : ndarray, optional
        The unit's cake columns from the client (an in-memory Dataset; the whole group's when
        :meth:`LineoutPlan.needs_whole_group`); None reads them from the store here.
    seed : (Seed or None, notes), optional
        What :func:`refine_seed` returned for the unit's group (units of part of a group).
    """
    if ctx.seed_from is not None and seed is None and not unit.whole_group:
        raise ParameterError("refine_unit: a unit of part of a group needs its group's seed "
                             "(refine_seed)")
    notes: list[tuple[str, str]] = []
    whole = unit.whole_group
    block = _block(ctx, unit, payload, whole)
    specs, every = _unit_specs(ctx, unit, block, whole)
    group_seed: _GroupSeed | None = None
    if seed is not None:
        notes += seed[1]
        group_seed = None if seed[0] is None else _GroupSeed.given(seed[0])
    elif ctx.seed_from is not None:
        group_seed = _GroupSeed(ctx, unit.group, every, block, notes)
        if not group_seed.name:
            group_seed = None
    results = []
    for spec in specs:
        if group_seed is not None and spec.name == group_seed.name:  # the neighbour seed itself
            results.append(group_seed.get())
            continue
        seeded = group_seed is not None and not spec.skipped
        digest = spec_digest(spec, group_seed.digest if seeded else None)
        results.append(_refine_checkpointed(ctx, spec, spec.name, digest,
                                            group_seed.get if seeded else (lambda: None), notes))
    return UnitOutcome(results, notes)


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class LineoutPlan:
    """Every lineout of a caked scan and how to refine it; no cake is held (see module docs).

    Make it with :meth:`of`. Attributes: ``layout`` (:class:`CakeLayout`, None for a spec
    list), ``store`` (absolute path the tasks read, or None), ``options``, ``backend``,
    ``seed_from``, ``min_points``.
    """

    layout: CakeLayout | None
    store: str | None
    options: RefineOptions
    backend: Any
    seed_from: SeedFrom | None = None
    min_points: int = 20
    _dataset: Any = field(default=None, repr=False)
    _specs: tuple[LineoutSpec, ...] = field(default=(), repr=False)

    @classmethod
    def of(cls, data: Any, options: RefineOptions, *, backend: Any = None,
           seed_from: SeedFrom | None = None, min_points: int = 20,
           dataset: Any = None) -> LineoutPlan:
        """Plan the refinement of ``data``.

        Parameters
        ----------
        data : path, xarray.Dataset or sequence of LineoutSpec
            A caked store (``.zarr.zip`` or zarr; opened for its layout only), a caked Dataset,
            or explicit lineouts.
        options : RefineOptions
        backend : RefineBackend, optional
            Default :class:`~midasflow.refinement.backends.NativeBackend`.
        seed_from : {None, "neighbour", "group"}
        min_points : int
            A lineout needs more usable bins than this (GSAS-II's importer: 20).
        dataset : xarray.Dataset, optional
            ``data`` already opened (a store path's Dataset), so it is not opened again.
        """
        from midasflow.refinement.backends import NativeBackend

        if seed_from not in SEED_MODES:
            raise ParameterError(f"--seed-from {seed_from!r}: expected one of "
                                 f"{', '.join(m for m in SEED_MODES if m)} or nothing")
        backend = backend or NativeBackend()
        common = dict(options=options, backend=backend, seed_from=seed_from, min_points=int(min_points))
        if isinstance(data, (str, os.PathLike)):
            from midasflow.io.caked_store import open_caked

            ds = dataset if dataset is not None else open_caked(data)
            return cls(CakeLayout.of(ds, store=data, min_points=min_points), str(Path(data).resolve()),
                       **common)
        if hasattr(data, "data_vars"):
            return cls(CakeLayout.of(data, min_points=min_points), None, _dataset=data, **common)
        specs = tuple(sorted(data, key=lambda s: s.index))
        if len({s.index for s in specs}) != len(specs):
            raise ParameterError("lineout plan: duplicate lineout indices")
        if seed_from == "group":
            raise ParameterError("--seed-from group needs the cakes (a store or Dataset), "
                                 "not a list of lineouts")
        return cls(None, None, _specs=specs, **common)

    # -- inspection -----------------------------------------------------------------------
    @property
    def n_lineouts(self) -> int:
        """Number of lineouts (skipped ones included)."""
        if self.layout is None:
            return len(self._specs)
        return self.layout.n_groups * self.layout.n_eta

    @property
    def n_eta(self) -> int:
        """η bins per ω-group (0 for a spec list)."""
        return 0 if self.layout is None else self.layout.n_eta

    def units_in_group(self, group: int, lineouts_per_task: int | None = None) -> int:
        """How many units :meth:`units` makes of one ω-group."""
        if self.layout is None:
            n = sum(s.group == group for s in self._specs)
            return math.ceil(n / (lineouts_per_task or n)) if n else 0
        step = min(max(int(lineouts_per_task or self.n_eta), 1), self.n_eta)
        return math.ceil(self.n_eta / step)

    @property
    def source(self) -> str:
        """Where the cakes are read: ``store <path>``, ``dataset`` or ``specs``."""
        return f"store {self.store}" if self.store else ("dataset" if self.layout else "specs")

    @property
    def tth_axis(self) -> str:
        """The lineouts' 2θ: "effective" (each bin's effective 2θ, docs/caking_2theta.md),
        "bin_centre" (the cake has none), or "given" (a spec list: the specs' own 2θ)."""
        return self.layout.tth_axis if self.layout is not None else "given"

    def usable_tth(self) -> list[np.ndarray]:
        """2θ (deg) of the points each lineout may have, for checking options against the data
        before any work (:meth:`RefineOptions.check_against`): per η column, the bins of non-zero
        area (an upper bound: NaN bins are known only when a cake is read), columns the
        geometry alone skips left out; the non-skipped specs' 2θ for a spec list."""
        if self.layout is None:
            return [s.tth_deg for s in self._specs if not s.skipped]
        lay = self.layout
        tth = np.broadcast_to(lay.tth_deg.reshape(lay.n_r, -1), lay.bin_area.shape)
        columns = [tth[lay.bin_area[:, e] != 0, e] for e in range(lay.n_eta)]
        return [c for c in columns if c.size > self.min_points]

    def refine_digest(self) -> str:
        """:func:`midasflow.refinement.checkpoints.refine_digest` of this plan."""
        return refine_digest(self.options, self.backend, self.seed_from)

    def describe(self) -> dict[str, Any]:
        """What the plan will do, from the layout alone (no cake is read).

        Returns
        -------
        dict
            ``source``, ``lineouts``, ``groups``, ``eta_bins``, ``r_bins``, ``numbering``,
            ``min_points``, ``skipped_by_geometry`` (lineouts whose column has ≤ min_points bins
            of non-zero area: certainly skipped; NaN bins are known only when read),
            ``tth_range_deg``, ``tth_axis`` ("effective": each bin's effective 2θ;
            "bin_centre": the store has none), ``omega_range_deg``, ``backend``, ``seed_from``,
            ``options_digest``, ``refine_digest`` and ``options`` (the settings).
        """
        from midasflow.refinement.checkpoints import backend_identity

        out: dict[str, Any] = {"source": self.source, "lineouts": self.n_lineouts}
        lay = self.layout
        if lay is not None:
            per_column = (lay.bin_area != 0).sum(axis=0)
            out.update(
                groups=lay.n_groups, eta_bins=lay.n_eta, r_bins=lay.n_r,
                numbering="index = group * eta_bins + eta_index (GSAS-II MIDAS importer)",
                skipped_by_geometry=int((per_column <= self.min_points).sum()) * lay.n_groups,
                tth_range_deg=[float(np.nanmin(lay.tth_deg)), float(np.nanmax(lay.tth_deg))],
                tth_axis=lay.tth_axis,
                omega_range_deg=([float(lay.omega_deg.min()), float(lay.omega_deg.max())]
                                 if lay.n_groups else []))
        else:
            out.update(groups=len({s.group for s in self._specs}),
                       skipped=sum(s.skipped for s in self._specs))
        out.update(min_points=self.min_points, backend=backend_identity(self.backend)["class"],
                   seed_from=self.seed_from, options_digest=self.options.digest(),
                   refine_digest=self.refine_digest(), options=self.options.settings())
        return out

    # -- work -----------------------------------------------------------------------------
    def units(self, lineouts_per_task: int | None = None) -> Iterator[TaskUnit]:
        """The plan's units in index order: runs of ``lineouts_per_task`` η columns of one
        ω-group (default: the whole group), generated lazily."""
        if self.layout is None:
            by_group: dict[int, list[LineoutSpec]] = {}
            for s in self._specs:
                by_group.setdefault(s.group, []).append(s)
            for g, specs in by_group.items():
                step = lineouts_per_task or len(specs)
                for k in range(0, len(specs), step):
                    part = tuple(specs[k:k + step])
                    yield TaskUnit(g, part[0].eta_index, part[-1].eta_index + 1,
                                   len(part) == len(specs), part)
            return
        n_eta = self.layout.n_eta
        step = min(max(int(lineouts_per_task or n_eta), 1), n_eta)
        for g in range(self.layout.n_groups):
            for e0 in range(0, n_eta, step):
                yield TaskUnit(g, e0, min(e0 + step, n_eta), step >= n_eta)

    def worker_context(self, checkpoints: Checkpoints | None) -> WorkerContext:
        """The part of the plan every task needs (no cakes)."""
        return WorkerContext(self.layout, self.store, self.options, self.backend, self.seed_from,
                             self.min_points, checkpoints)

    def payload(self, unit: TaskUnit, *, whole: bool = False) -> np.ndarray | None:
        """What the client sends with a unit: nothing for a store or a spec list (the task reads
        its cake / carries its specs); for an in-memory Dataset the unit's columns (the group's
        whole cake for a whole-group unit or with ``whole``)."""
        if self._dataset is None:
            return None
        cake = self._dataset["intensity"].transpose("group", "r", "eta").isel(group=unit.group)
        if not (whole or unit.whole_group):
            cake = cake.isel(eta=slice(unit.eta_start, unit.eta_stop))
        return np.asarray(cake.values, dtype=np.float64)

    def failed(self, unit: TaskUnit, message: str) -> UnitOutcome:
        """The outcome of a unit whose task was lost: every lineout failed with ``message``."""
        if unit.specs:
            return UnitOutcome([failed_result(s.index, s.group, s.eta_index, s.omega_deg,
                                              s.eta_deg, message, s.histogram) for s in unit.specs])
        lay = self.layout
        return UnitOutcome([
            failed_result(unit.group * lay.n_eta + e, unit.group, e, float(lay.omega_deg[unit.group]),
                          float(lay.eta_deg[e]), message, int(lay.histogram[unit.group, e]))
            for e in range(unit.eta_start, unit.eta_stop)])

    def results(self, executor: Any = None, *, checkpoint_dir: str | os.PathLike | None = None,
                resume: bool = False, progress: bool = False) -> Iterator[LineoutResult]:
        """Refine the plan, yielding each lineout's result as its unit finishes (completion
        order; the caller decides what to keep).

        Parameters
        ----------
        executor : SerialExecutor or DistributedExecutor, optional
            Default :class:`~midasflow.refinement.executors.SerialExecutor`.
        checkpoint_dir : path, optional
            Output folder: each finished lineout is checkpointed to
            ``<checkpoint_dir>/lineouts/hist_NNNN.npz`` by its task.
        resume : bool
            Take matching checkpoints of earlier runs instead of refining again.
        progress : bool
            A progress line on stderr.
        """
        from midasflow.refinement.executors import SerialExecutor, report_notes
        from midasflow.refinement.lineouts import LineoutProgress

        if resume and checkpoint_dir is None:
            raise ParameterError("--resume needs an output folder (checkpoint_dir)")
        checkpoints = None if checkpoint_dir is None else Checkpoints.create(
            checkpoint_dir, self.refine_digest(), resume=resume)
        executor = executor or SerialExecutor()
        bar = LineoutProgress(self.n_lineouts, progress)
        notes: list[tuple[str, str]] = []
        try:
            for outcome in executor.run(self, checkpoints):
                notes += outcome.notes
                for res in outcome.results:
                    bar.update(res)
                    yield res
        finally:
            bar.close()
            report_notes(notes)

    def execute(self, executor: Any = None, **kwargs: Any) -> list[LineoutResult]:
        """Refine the plan; every lineout's result in index order (keywords as :meth:`results`)."""
        return sorted(self.results(executor, **kwargs), key=lambda r: r.index)


