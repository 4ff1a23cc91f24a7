"""Caking: a thin lazy Dask wrapper around :mod:`midasflow.caking_kernel`, and the ω-group scan.

:func:`cake` runs the kernel (:func:`midasflow.caking_kernel.cake_block`) with ``map_blocks``
over frame chunks and reduces per-frame cakes to OmegaSumFrames groups (docs/reference/midas_parameters.md §7) with a streaming
scan, so memory does not grow with the number of frames. The masking rules are described in
:mod:`midasflow.caking_kernel`.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numba
import numpy as np

from midasflow.caked_schema import caked_dataset
from midasflow.caking_kernel import (RawCorrection, cake_block, frames_per_pass, raw_buffer,
                                     reading_frames)
from midasflow.errors import FrameError, ParameterError
from midasflow.params import PROCESS_VARIABLES

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

    from midasflow.binmap import BinMap
    from midasflow.io.frames import RawFrames, ScanReader
    from midasflow.params import MaskRule, Params

__all__ = ["cake", "group_bounds", "bin_centres", "cake_coords", "cake_attrs", "flagged_pixels"]


# --------------------------------------------------------------------------------------------
# OmegaSumFrames grouping (midas_parameters.md §7): a streaming scan over frame chunks
# --------------------------------------------------------------------------------------------
def group_bounds(n_frames: int, omega_sum_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last frame position of every OmegaSumFrames group.

    Parameters
    ----------
    n_frames : int
        Number of (post-SkipFrame) frames.
    omega_sum_frames : int
        Frames per group; negative means one group of all frames. A remainder group with fewer
        frames is kept (MIDAS flushes at the last frame).

    Returns
    -------
    first, last : ndarray (n_groups,) int64
        Positions (0-based) of the first and last frame of each group.
    """
    size = n_frames if omega_sum_frames < 0 else int(omega_sum_frames)
    if size == 0:
        raise ParameterError("OmegaSumFrames: expected a non-zero frame count (-1 = all frames)")
    first = np.arange(0, n_frames, size, dtype=np.int64)
    last = np.minimum(first + size, n_frames) - 1
    return first, last


def _group_step(cakes: np.ndarray, carry: np.ndarray | None, starts: np.ndarray,
                ends: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Add the frames of one chunk, in frame order, onto the running group sum.

    ``cakes`` (k, n_r, n_eta); ``starts``/``ends`` (k,) bool flag frames that open/close a group;
    ``carry`` is the open group's partial sum from the previous chunk (never modified). Returns the
    groups closed in this chunk (m, n_r, n_eta) and the partial sum still open (or None). Frames
    are added one at a time so the result is bit-identical for every chunking.
    """
    closed = []
    acc, owned = carry, False
    for i in range(cakes.shape[0]):
        if starts[i]:
            acc, owned = cakes[i].copy(), True
        elif owned:
            acc += cakes[i]
        else:
            acc, owned = acc + cakes[i], True
        if ends[i]:
            closed.append(acc)
            acc, owned = None, False
    out = np.stack(closed) if closed else np.empty((0,) + cakes.shape[1:], dtype=cakes.dtype)
    return out, acc


def _group_sums(cakes, first: np.ndarray, last: np.ndarray):
    """Lazy group sums (n_groups, n_r, n_eta) of a dask array of per-frame cakes.

    One scan task per frame chunk: it holds one chunk of cakes and one partial sum, so peak memory
    is independent of the number of frames.
    """
    import dask
    import dask.array as da

    n = cakes.shape[0]
    starts = np.zeros(n, dtype=bool)
    ends = np.zeros(n, dtype=bool)
    starts[first] = True
    ends[last] = True
    step = dask.delayed(_group_step, nout=2, pure=True)
    blocks = cakes.to_delayed(optimize_graph=False).ravel()  # same keys as the cakes: computed once
    carry = None
    pieces = []
    lo = 0
    for blk, size in zip(blocks, cakes.chunks[0]):
        hi = lo + size
        closed, carry = step(blk, carry, starts[lo:hi], ends[lo:hi])
        m = int(ends[lo:hi].sum())
        if m:
            pieces.append(da.from_delayed(closed, shape=(m,) + cakes.shape[1:], dtype=cakes.dtype,
                                          meta=np.empty((0, 0, 0), dtype=cakes.dtype)))
        lo = hi
    return da.concatenate(pieces, axis=0)


# --------------------------------------------------------------------------------------------
# Dask / xarray wrapper
# --------------------------------------------------------------------------------------------
def _worker_threads() -> int | None:
    """The thread count of the Dask worker running this task, or None outside a worker."""
    try:
        from distributed import get_worker

        return int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        return None


def _cake_chunk(block: np.ndarray | list[np.ndarray], binmap: BinMap, normalize: bool,
                min_area_fraction: float, mask_rule: MaskRule,
                correction: RawCorrection | None = None) -> np.ndarray:
    """The cakes of one frame chunk (or of consecutive chunks, caked as one).

    On a distributed worker the kernel runs on at most the worker's own thread count of numba
    threads (numba's setting is per calling thread), so n one-thread workers on n cores run n
    threads, not n x cpu_count; concurrent calls in one process take turns pass by pass."""
    threads = _worker_threads()
    if threads is not None:
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    return cake_block(block, binmap, normalize=normalize, min_area_fraction=min_area_fraction,
                      mask_rule=mask_rule, max_threads=threads, correction=correction)


def _cake_raw_pass(reader: ScanReader, lo: int, hi: int, dark: np.ndarray | None,
                   threshold: float | None, binmap: BinMap, normalize: bool,
                   min_area_fraction: float, mask_rule: MaskRule) -> np.ndarray:
    """The cakes of frames ``lo:hi`` of an ``open_frames`` scan, read raw here and corrected
    inside the kernel. Tasks read one at a time (:func:`midasflow.caking_kernel.reading_frames`)
    beside the kernel passes of other tasks (one pass at a time per process, on every thread:
    :func:`midasflow.caking_kernel.cake_block`)."""
    with reading_frames():
        frames = reader.read_raw(lo, hi, raw_buffer)
    return _cake_chunk(frames, binmap, normalize, min_area_fraction, mask_rule,
                       RawCorrection(dark, threshold))


def _cake_raw(data: Any, raw: RawFrames, handle: Any, kernel_args: tuple, per_pass: int,
              n_r: int, n_eta: int) -> Any:
    """Lazy per-frame cakes of an ``open_frames`` scan: one task per map pass (or per
    ``frames_per_read`` frames when fewer), each reading its raw frames (no float32 frames,
    no dark-subtracted copy, no concatenation of chunks), the dark one graph key."""
    import dask
    import dask.array as da

    n = int(data.shape[0])
    step = min(per_pass, raw.frames_per_read or per_pass)
    token = dask.base.tokenize(data.name, handle, kernel_args, step)
    task = dask.delayed(_cake_raw_pass, pure=True)
    meta = np.empty((0, 0, 0), dtype=np.float64)
    dark = None if raw.dark is None else dask.delayed(raw.dark, pure=True)  # one key, once
    pieces = []
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        cakes = task(raw.reader, lo, hi, dark, raw.threshold, handle, *kernel_args,
                     dask_key_name=f"cake-raw-frames-{token}-{lo // step}")
        pieces.append(da.from_delayed(cakes, shape=(hi - lo, n_r, n_eta), dtype=np.float64,
                                      meta=meta))
    return da.concatenate(pieces, axis=0)


def _pass_groups(sizes: tuple[int, ...], per_pass: int) -> list[list[int]]:
    """Consecutive frame chunks grouped so each group holds at most ``per_pass`` frames (a chunk
    larger than that is a group of its own)."""
    groups: list[list[int]] = []
    total = per_pass
    for i, size in enumerate(sizes):
        if total + size > per_pass:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    return groups


def _cake_chunks(data: Any, handle: Any, kernel_args: tuple, per_pass: int, n_r: int,
                 n_eta: int) -> Any:
    """Lazy per-frame cakes (frame, r, eta) of the frames ``data`` (a dask array).

    Chunks that hold a whole map pass are caked one task each (``map_blocks``). Smaller chunks
    (``open_frames``' 64 MiB default, say) are caked in groups of consecutive chunks that fill a
    pass, each group in one task that hands the chunks to the kernel as a list (no rechunk
    layer, no extra tasks): every frame costs what it costs in a full pass."""
    import dask
    import dask.array as da

    sizes = data.chunks[0]
    meta = np.empty((0, 0, 0), dtype=np.float64)
    if len(sizes) == 1 or max(sizes) >= per_pass:
        return data.map_blocks(_cake_chunk, handle, *kernel_args, chunks=(sizes, (n_r,), (n_eta,)),
                               dtype=np.float64, meta=meta, name="cake-frames")
    (data,) = dask.optimize(data)  # fuse the reading chain once (to_delayed would not)
    blocks = data.to_delayed(optimize_graph=False).ravel()
    token = dask.base.tokenize(data.name, handle, kernel_args, per_pass)
    task = dask.delayed(_cake_chunk, pure=True)
    pieces = []
    for g, group in enumerate(_pass_groups(sizes, per_pass)):
        cakes = task([blocks[i] for i in group], handle, *kernel_args,
                     dask_key_name=f"cake-frames-{token}-{g}")
        pieces.append(da.from_delayed(cakes, shape=(sum(sizes[i] for i in group), n_r, n_eta),
                                      dtype=np.float64, meta=meta))
    return da.concatenate(pieces, axis=0)


def _binmap_handle(binmap: BinMap) -> Any:
    """The bin map as ONE graph key: a task loading it from its cache file when it has one
    (:func:`midasflow.binmap.cached_binmap`; in this process it is the live object, on a worker
    it is read from the shared cache), else the map itself."""
    import dask

    if binmap.cache_file is not None and binmap.digest is not None:
        from midasflow.binmap import cached_binmap

        return dask.delayed(cached_binmap, pure=True)(
            binmap.cache_file, binmap.key, binmap.digest, dask_key_name=f"binmap-{binmap.digest}")
    return dask.delayed(binmap, name=f"binmap-{binmap.key}", pure=True)


def bin_centres(edges: np.ndarray) -> np.ndarray:
    """Centres of consecutive bin edges, shape (len(edges) - 1,)."""
    edges = np.asarray(edges, dtype=np.float64)
    return 0.5 * (edges[:-1] + edges[1:])


def cake(
    frames: xr.DataArray,
    params: Params,
    *,
    binmap: BinMap | None = None,
    mask: np.ndarray | None = None,
    cache_dir: str | None = None,
) -> xr.Dataset:
    """Lazily cake a scan of frames into OmegaSumFrames groups (MIDAS IntegratorZarrOMP).

    Parameters
    ----------
    frames : xarray.DataArray, dims (frame, z, y), float32/float64
        Dark-subtracted raw frames (NaN = masked pixel), usually from ``open_frames``; dask-backed
        (a numpy-backed array is wrapped). Coordinates ``frame`` (post-SkipFrame index) and
        ``omega`` (deg) are used when present, else ``frame = 0..n-1`` and
        ``omega = OmegaStart + i * OmegaStep``. Per-frame process-variable coordinates
        ``temperature``, ``pressure``, ``i``, ``i0`` (``open_frames`` reads them from HDF5) become
        per-group variables of the same names.
    params : Params
        Binning, normalisation, mask rule, grouping (``omega_sum_frames``, negative = all frames),
        ``save_individual_frames`` and ``sum_images``.
    binmap : BinMap, optional
        Pixel -> bin map; built (or loaded from ``cache_dir``) from ``params`` and ``mask`` if None.
    mask : ndarray (nz, ny) bool, optional
        Static mask (True = masked), raw frame; default ``params.mask_file`` when set.
    cache_dir : str, optional
        Bin-map cache folder (default ``~/.cache/midasflow/binmaps``).

    Returns
    -------
    xarray.Dataset
        Lazy (dask) dataset with ``intensity`` (group, r, eta) float64 — the SUM of the per-frame
        normalised cakes of each group (NaN stays NaN) —, ``frames_summed``, ``omega_first_deg``,
        ``omega_last_deg``, ``last_frame`` (group), ``frame_intensity`` (frame, r, eta) when
        ``save_individual_frames``, ``sum_frames`` (r, eta) when ``sum_images``, ``temperature``,
        ``pressure``, ``i``, ``i0`` (group, float64) for the process variables ``frames`` carries,
        each the mean over the group's frames; coordinates
        ``r_px``, ``tth_deg``, ``q_inv_a`` (r; bin centres), ``eta_deg`` (eta), ``bin_area``
        (r, eta, pixel²), ``effective_tth_deg`` (r, eta; the 2θ each bin's value samples,
        :attr:`midasflow.binmap.BinMap.effective_tth_deg` with the pixels the first frame has no
        value for left out, NaN where no pixel is collected),
        ``omega_deg`` (group, mid-group ω), ``omega_frame_deg`` (frame); attrs ``params`` (MIDAS
        text) and ``instrument`` (JSON of the GSAS-II instrument terms).

    Notes
    -----
    Frames that :func:`midasflow.io.frames.open_frames` returned, unchanged, are caked from
    their raw frames (:func:`midasflow.io.frames.raw_frames_of`): one task per map pass (or per
    ``frames_per_read`` frames when fewer) reads them as stored (uint16, say) and the kernel
    turns them into open_frames' float32 values while it reads them
    (:class:`midasflow.caking_kernel.RawCorrection`: flags, dark, threshold), with no float
    copy, dark-subtracted copy or concatenation of the frames; the cakes are bit-identical.
    The other notes below are about any other frames.

    Only the first frame is read here (with the dark, once per process): the pixels it has no
    value for (NaN: detector flags such as a Pilatus's −1 gaps, in the frame or in the dark)
    are not in the map's static mask, so the bins they cut get the 2θ of their other pixels
    (:func:`cake_coords`; docs/caking_2theta.md §6). Flags that change from frame to frame are
    not followed: give fixed gaps as a mask.

    Nothing else is computed here: the per-frame cakes are one task per map pass of
    ``frames_per_pass(binmap)`` frames (32 for 2048 x 2048 float32 frames), whose tasks share
    the bin map as a single graph key; group sums are a streaming scan over those chunks.
    Frame chunks smaller than a pass (``open_frames``' default, say) are not rechunked: each task
    takes as many consecutive chunks as fill a pass and hands them to the kernel as a list, so
    ``open_frames -> cake`` runs at the kernel's full-pass speed (the kernel copies the chunks
    of a pass into one array, cheaper than a sweep through its buffer per chunk); larger
    chunks are kept (the kernel goes through them pass by pass). Tasks running at the same time
    in one process take turns pass by pass, each pass on all the process's (or the worker's)
    threads with one pass buffer, while the other tasks read their next frames (one read at a
    time: :func:`midasflow.caking_kernel.reading_frames`): two Dask threads on two cores
    pipeline reading and caking.

    Process variables: MIDAS IntegratorZarrOMP writes group sums divided by the ω-arithmetic
    frame count for Temperature/Pressure/I, and for I0 the last frame's value divided by that
    count (an assignment where it means to accumulate; docs/reference/midas_parameters.md §7). midasflow writes
    the mean over the group's frames for every one of them (NaN if a frame's value is NaN).
    """
    import dask.array as da

    if frames.ndim != 3:
        raise FrameError(f"frames: expected dims (frame, z, y), got {frames.dims}")
    n = int(frames.shape[0])
    if n == 0:
        raise FrameError("frames: expected at least one frame, got 0")
    if binmap is None:
        from midasflow.binmap import load_or_build_binmap

        if mask is None:
            from midasflow.io.mask import mask_from_params

            mask = mask_from_params(params)
        binmap = load_or_build_binmap(params, mask=mask, cache_dir=cache_dir)
    if tuple(frames.shape[1:]) != tuple(binmap.detector_shape):
        raise FrameError(
            f"frames: frame shape {tuple(frames.shape[1:])} does not match the detector "
            f"(NrPixelsZ, NrPixelsY) = {tuple(binmap.detector_shape)}"
        )

    from midasflow.io.frames import raw_frames_of

    data = frames.data
    if not isinstance(data, da.Array):
        data = np.asarray(data)
        data = da.from_array(data, chunks=(min(n, frames_per_pass(binmap, data.dtype)), -1, -1))
    n_r, n_eta = int(binmap.n_r), int(binmap.n_eta)
    kernel_args = (bool(params.normalize), float(params.min_area_fraction), str(params.mask_rule))
    raw = raw_frames_of(data)
    if raw is not None:
        cakes = _cake_raw(data, raw, _binmap_handle(binmap), kernel_args,
                          frames_per_pass(binmap, np.float32), n_r, n_eta)
    else:
        data = data.rechunk({1: -1, 2: -1})
        cakes = _cake_chunks(data, _binmap_handle(binmap), kernel_args,
                             frames_per_pass(binmap, data.dtype), n_r, n_eta)

    frame_idx = (np.asarray(frames["frame"].values, dtype=np.int64) if "frame" in frames.coords
                 else np.arange(n, dtype=np.int64))
    if "omega" in frames.coords:
        omega = np.asarray(frames["omega"].values, dtype=np.float64)
    else:
        omega = params.omega_start_deg + params.omega_step_deg * np.arange(n, dtype=np.float64)
    first, last = group_bounds(n, params.omega_sum_frames)
    counts = last - first + 1
    process = {name: np.add.reduceat(np.asarray(frames[name].values, dtype=np.float64), first)
               / counts for name in PROCESS_VARIABLES if name in frames.coords}

    sum_frames = None
    if params.sum_images:
        all_first, all_last = group_bounds(n, -1)
        sum_frames = _group_sums(cakes, all_first, all_last)[0]
    return caked_dataset(
        intensity=_group_sums(cakes, first, last),
        frames_summed=counts,
        omega_first_deg=omega[first],
        omega_last_deg=omega[last],
        last_frame=frame_idx[last],
        frame=frame_idx,
        omega_frame_deg=omega,
        **cake_coords(params, binmap, _first_frame_flags(data)),
        frame_intensity=cakes if params.save_individual_frames else None,
        sum_frames=sum_frames,
        process_variables=process,
        attrs=cake_attrs(params),
    )


def cake_coords(params: Params, binmap: BinMap, flagged: np.ndarray | None = None
                ) -> dict[str, np.ndarray]:
    """The bin coordinates of a caked Dataset: ``r_px``, ``tth_deg``, ``q_inv_a`` (r; bin centres),
    ``eta_deg`` (eta), ``bin_area`` and ``effective_tth_deg`` (r, eta), as keywords of
    :func:`midasflow.caked_schema.caked_dataset`.

    ``flagged`` (nz, ny) bool, raw frame: pixels with no value in the frames besides the map's
    mask (detector flags, :func:`flagged_pixels`); the bins they cut get the 2θ their other
    pixels sample (:func:`midasflow.binmap.effective_tth_deg_without`, docs/caking_2theta.md §6).
    """
    from midasflow.binmap import effective_tth_deg_without
    from midasflow.geometry import r_to_tth_deg, tth_to_q_inv_a

    r_px = bin_centres(binmap.r_edges_px)
    tth = r_to_tth_deg(r_px, params)
    effective = (binmap.effective_tth_deg if flagged is None or not flagged.any()
                 else effective_tth_deg_without(binmap, params, flagged))
    return {"r_px": r_px, "tth_deg": tth, "q_inv_a": tth_to_q_inv_a(tth, params.wavelength_a),
            "eta_deg": bin_centres(binmap.eta_edges_deg), "bin_area": binmap.bin_area,
            "effective_tth_deg": effective}


def flagged_pixels(first: np.ndarray, dark: np.ndarray | None = None) -> np.ndarray:
    """The pixels (nz, ny) bool that have no value in a scan's first frame ``first`` (as read:
    float32 with detector flags NaN, :func:`midasflow.io.frames.open_frames`' conversion)
    once ``dark`` is subtracted: NaN in either."""
    first = np.asarray(first)
    return np.isnan(first) if dark is None else np.isnan(first - np.asarray(dark))


def _first_frame_flags(data: Any) -> np.ndarray:
    """:func:`flagged_pixels` of the first of the frames ``data`` (a dask array) caked: for
    ``open_frames``' frames one frame read from the files and its dark (computed once per
    process: :func:`midasflow.io.frames.dark_mean`), for any other array its first frame."""
    from midasflow.io.frames import raw_frames_of

    raw = raw_frames_of(data)
    if raw is None:
        return flagged_pixels(np.asarray(data[0].compute()))
    return flagged_pixels(raw.reader[0:1][0], None if raw.dark is None else raw.dark.compute())


def cake_attrs(params: Params) -> dict[str, str]:
    """The attributes of a caked Dataset: ``params`` (MIDAS text) and ``instrument`` (JSON of the
    GSAS-II instrument terms)."""
    return {"params": params.to_text(), "instrument": json.dumps(params.instrument.to_midas())}
