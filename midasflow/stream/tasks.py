"""The stream's task functions: what runs on the Dask workers as frames arrive.

Each reuses the batch kernels: frames are read raw as :class:`midasflow.io.frames.ScanReader`
reads them (a PV frame decoded), and caked by the same kernel call as :func:`midasflow.caking.cake`
makes of an ``open_frames`` scan: the kernel turns the raw values into float32 with detector flags
NaN, subtracts the dark and applies the threshold while it reads them
(:class:`midasflow.caking_kernel.RawCorrection`, bit for bit what ``open_frames`` does), so no
float32 copy of the frames is made; they are added to their ω-group one frame at a time in frame order by
the same step as the batch group scan (so a group's sum is bit-identical to batch mode's), and a
closed group's lineouts are made and refined by the lineout plan's own task functions
(:func:`midasflow.refinement.plan.refine_unit`, :func:`~midasflow.refinement.plan.refine_seed`).
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from midasflow.caking import _cake_chunk, _group_step
from midasflow.caking_kernel import RawCorrection, raw_buffer
from midasflow.io.frames import _to_float32
from midasflow.stream.spool import load_array, save_array


@dataclass(frozen=True)
class FramePart:
    """Frames ``start:stop`` of a file, or one PV frame."""

    path: str | None = None
    start: int = 0
    stop: int = 0
    pva: Any = None


@dataclass(frozen=True)
class FrameItem:
    """Frames to cake in one task: parts of one or more arrivals (consecutive frames).

    ``positions`` are the stream positions (after SkipFrame) of the frames; ``frame_paths`` the
    spool files their cakes are written to (empty: not kept).
    """

    positions: tuple[int, ...]
    parts: tuple[FramePart, ...]
    frame_paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class Caking:
    """What every caking task needs besides the frames and the bin map (sent once)."""

    params: Any
    data_loc: str
    normalize: bool
    min_area_fraction: float
    mask_rule: str
    pre_proc_thresh: float | None


@dataclass(frozen=True)
class BinMapRef:
    """The stream's bin map by its cache file, for the caking tasks: each worker loads it once
    (checked as on every load, :func:`midasflow.binmap.cached_binmap`) and keeps it
    (:func:`stream_binmap`).

    Not a Dask dependency on purpose: distributed's active memory manager drops every copy of a
    key beyond one that no queued task waits for (every 2 s), so with the map as a future each
    worker would receive it again (240 MB for 20 M entries) and rebuild the kernel's layout of it
    every few tasks: ~50 ms of CPU per 2048² frame in the stream benchmark (docs/stream.md)."""

    cache_file: str
    key: str
    digest: str


#: The bin map of the latest stream on this worker (one at most: memory stays bounded).
_STREAM_MAP: dict[str, Any] = {}
#: Held while the map is looked up or loaded: a worker's threads load it once between them.
_STREAM_MAP_LOCK = threading.Lock()


def stream_binmap(binmap: Any) -> Any:
    """The bin map a caking task was given: a :class:`BinMapRef` resolved to this worker's
    copy, or the map itself. A worker keeps the latest stream's map after the stream (the next
    stream of the same geometry starts without loading it again: seconds for 20 M entries,
    while a PV's first frames wait) and drops it when a stream of another map comes."""
    if not isinstance(binmap, BinMapRef):
        return binmap
    with _STREAM_MAP_LOCK:
        bm = _STREAM_MAP.get(binmap.digest)
        if bm is None:
            from midasflow.binmap import cached_binmap

            _STREAM_MAP.clear()
            bm = _STREAM_MAP[binmap.digest] = cached_binmap(binmap.cache_file, binmap.key, binmap.digest)
    return bm


def read_part(part: FramePart, caking: Caking) -> np.ndarray:
    """A part's frames (k, nz, ny) as stored (a PV frame decoded), in their own dtype."""
    if part.pva is not None:
        return part.pva.decode()[None]
    from midasflow.stream.sources import frames_of_file

    return frames_of_file(part.path, caking.params, caking.data_loc, part.start, part.stop, raw=True)


def read_item(item: FrameItem, caking: Caking) -> list[np.ndarray]:
    """The item's frames as blocks (k_i, nz, ny) for the kernel's :class:`RawCorrection`: as
    stored when every part has one dtype, else each part as float32 with its detector flags NaN
    (a concatenation promoted to a common dtype would lose an integer type's flag value).

    Several blocks of one dtype and frame shape (an item of PV frames, say) come as one, copied
    into this thread's reused frame buffer (:func:`midasflow.caking_kernel.raw_buffer`; valid
    until the thread asks for it again): the kernel would otherwise concatenate them into a
    fresh array of the whole pass, whose page faults cost more than the copy (16 PV frames of
    2048² uint16: 32-42 vs 40-50 ms per frame decoded and caked, alternated in one process)."""
    blocks = [read_part(part, caking) for part in item.parts]
    if len({block.dtype for block in blocks}) > 1:
        blocks = [_to_float32(block) for block in blocks]
    if len(blocks) > 1 and len({block.shape[1:] for block in blocks}) == 1:
        whole = raw_buffer((sum(len(block) for block in blocks), *blocks[0].shape[1:]), blocks[0].dtype)
        blocks = [np.concatenate(blocks, out=whole)]
    return blocks


def cake_item(item: FrameItem, binmap: Any, caking: Caking, dark: np.ndarray | None,
              parts: tuple[FramePart, ...] | None = None) -> np.ndarray:
    """Task: the per-frame cakes (k, n_r, n_eta) float64 of one item (``dark`` (nz, ny) float32
    subtracted); each frame's cake is also written to the spool when the item names a file for
    it. ``parts``, when given, are the item's parts (PV frames sent to the workers as data, not
    inside the task)."""
    if parts is not None:
        item = dataclasses.replace(item, parts=parts)
    cakes = _cake_chunk(read_item(item, caking), stream_binmap(binmap), caking.normalize, caking.min_area_fraction,
                        caking.mask_rule, RawCorrection(dark, caking.pre_proc_thresh))
    for path, cake in zip(item.frame_paths, cakes):
        save_array(path, cake)
    return cakes


def warm_caking(binmap: Any, caking: Caking, n_frames: int) -> int:
    """Task: cake ``n_frames`` blank frames on this worker, so it holds the bin map and the
    kernel's layout of it (built on first use) before the stream's first frame; returns the
    number of frames caked."""
    binmap = stream_binmap(binmap)
    frames = np.zeros((n_frames, *binmap.detector_shape), dtype=np.uint16)
    return len(_cake_chunk(frames, binmap, caking.normalize, caking.min_area_fraction, caking.mask_rule,
                           RawCorrection()))


@dataclass(frozen=True)
class Fold:
    """The ω-group scan after some frames: the groups they closed and the open group's sum."""

    closed: np.ndarray            # (m, n_r, n_eta)
    carry: np.ndarray | None      # the open group's partial sum


def fold(previous: Fold | np.ndarray | None, cakes: np.ndarray, starts: np.ndarray,
         ends: np.ndarray) -> Fold:
    """Task: add an item's cakes to the open group, frame by frame in frame order (the batch
    group scan's step, :func:`midasflow.caking._group_step`); ``previous`` is the last fold, a
    resumed group's partial sum, or None at the start."""
    carry = previous.carry if isinstance(previous, Fold) else previous
    closed, carry = _group_step(cakes, carry, np.asarray(starts, bool), np.asarray(ends, bool))
    return Fold(closed, carry)


def close_open(previous: Fold | np.ndarray | None) -> Fold:
    """Task: close the open group at the end of the stream (MIDAS keeps a short last group)."""
    carry = previous.carry if isinstance(previous, Fold) else previous
    return Fold(carry[None], None)


def take_group(fold_result: Fold, k: int, path: str) -> np.ndarray:
    """Task: the ``k``-th group a fold closed, written to the spool; it stays on the worker as
    the input of the group's refinement tasks."""
    cake = fold_result.closed[k]
    save_array(path, cake)
    return cake


def save_carry(previous: Fold | np.ndarray | None, path: str) -> str:
    """Task: the open group's partial sum, written to the spool (the stream stopped mid-group)."""
    carry = previous.carry if isinstance(previous, Fold) else previous
    return save_array(path, carry)


def load_spooled(path: str, shape: tuple[int, ...]) -> np.ndarray:
    """Task: a spooled cake, checked (:func:`midasflow.stream.spool.load_array`)."""
    return load_array(path, shape)


@dataclass(frozen=True)
class GroupInfo:
    """A closed ω-group's numbers: index, frames summed and mid-group ω (deg)."""

    group: int
    frames_summed: int
    omega_deg: float


def group_context(ctx: Any, info: GroupInfo) -> Any:
    """The plan's worker context for one group of the stream: the stream's layout (2θ, η, bin
    areas; scattered once) with the group's ω and frame count at its index, and histogram numbers
    in arrival order (:func:`midasflow.refinement.numbering.arrival_numbers`)."""
    from midasflow.refinement.numbering import arrival_numbers

    n = info.group + 1
    layout = dataclasses.replace(ctx.layout, n_groups=n, omega_deg=np.full(n, info.omega_deg),
                                 frames_summed=np.full(n, info.frames_summed, dtype=np.int64),
                                 histogram=arrival_numbers(ctx.layout.bin_area, n, min_points=ctx.min_points))
    return dataclasses.replace(ctx, layout=layout)


def refine_part(ctx: Any, info: GroupInfo, cake: np.ndarray, eta_start: int, eta_stop: int,
                seed: Any = None) -> Any:
    """Task ``refine-lineout``: the lineouts of η columns ``eta_start:eta_stop`` of a closed group
    (:func:`midasflow.refinement.plan.refine_unit`; checkpointed as they finish)."""
    from midasflow.refinement.plan import TaskUnit, refine_unit

    whole = eta_start == 0 and eta_stop == cake.shape[1]
    unit = TaskUnit(info.group, eta_start, eta_stop, whole)
    return refine_unit(group_context(ctx, info), unit, cake if whole else cake[:, eta_start:eta_stop], seed)


def refine_group_seed(ctx: Any, info: GroupInfo, cake: np.ndarray) -> Any:
    """Task: a closed group's seed (``--seed-from``), for its parts
    (:func:`midasflow.refinement.plan.refine_seed`)."""
    from midasflow.refinement.plan import TaskUnit, refine_seed

    unit = TaskUnit(info.group, 0, cake.shape[1], True)
    return refine_seed(group_context(ctx, info), unit, cake)
