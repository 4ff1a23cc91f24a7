"""Caking kernels: detector frames -> per-frame (R, eta) cakes, numpy and numba only.

The kernel follows pyFAI's CSR engine and MIDAS ``IntegratorZarrOMP`` (docs/reference/midas_parameters.md
§7): for every bin ``b`` it accumulates ``S_b = sum(w * v)`` over the map entries (``w`` =
corrected weight ``frac``) and ``A_b = sum(area)`` over the *valid* pixels, and divides only at the
end, ``I_b = S_b / A_b`` (area-weighted mean) when normalising. A NaN pixel value means "masked in
this frame": it adds nothing to ``S`` and its area is left out of ``A``.

Masking rules (which bins become NaN):

``"area"`` (default)
    a bin is NaN when its unmasked area ``A`` is below ``min_area_fraction`` times its geometric
    area (the area of every pixel overlapping it, masked ones included).
``"midas"``
    a bin is NaN as soon as a masked pixel touches it (``binmap.touches_mask``, MIDAS
    ``maskMap.bin``), NaN-valued pixels included.

Bins no pixel overlaps (geometric area 0) are 0 under both rules.

This module imports neither dask, distributed nor xarray; :mod:`midasflow.caking` wraps it.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numba
import numpy as np
import scipy.sparse

from midasflow.binmap import check_binmap
from midasflow.errors import ParameterError
from midasflow.params import MASK_RULES, MaskRule

if TYPE_CHECKING:  # pragma: no cover
    from numpy.typing import DTypeLike

    from midasflow.binmap import BinMap

__all__ = ["cake_block", "cake_block_reference", "frames_per_pass", "RawCorrection",
           "reading_frames", "raw_buffer", "sum_raw_frames"]


# --------------------------------------------------------------------------------------------
# numba kernels
# --------------------------------------------------------------------------------------------
#: Fused multiply-add only: no "nnan"/"ninf" (a NaN pixel value must propagate and is tested
#: for inside the kernels) and no "reassoc", so every kernel adds a bin's entries in the same
#: order with the same roundings and the result never depends on which kernel ran.
_FASTMATH = {"contract"}
#: Largest pixel-major frame buffer of one pass over the map (one per calling thread).
_PASS_BYTES = 2**29
_MAX_PASS_FRAMES = 32  # the NaN flags of one pixel in a pass are the bits of a uint32
#: Bin ranges of (nearly) equal entry counts handed to the threads of one map pass.
_N_CHUNKS = 64
_TILE = 4096
#: Tiles of :func:`_gather_pixel_major` per call (a thread takes the next call as it frees up).
_TILES_PER_CALL = 8
#: Pixels of one transposed block of :func:`_gather_pixel_major` (a (32, 256) float32 tile
#: is 32 KiB, an L1 cache).
_BLOCK = 256
#: Sectors of the (R, eta) grid the threads share in a one-frame pass (:func:`_sector_map`).
_N_SECTORS = 8
#: Passes of fewer frames go through the map frame by frame, sector by sector
#: (:func:`_sector_frame`), instead of the pixel-major buffer, which only pays for itself over several frames.
_MIN_BUFFER_FRAMES = 4
#: Entries of one record of the sector layout (:func:`_sector_split`): most pixels have 3 or
#: 4 entries in a sector (2048 x 2048 frames, 0.5 px R bins).
_RECORD = 4


@numba.njit(cache=True)
def _ring_order(indices, n_pix):  # pragma: no cover - compiled
    """Order the pixels by the first bin that uses them (CSR order of first appearance).

    Returns ``slot`` (n_pix,) int32, the row of each raw pixel in the pixel-major buffer (-1 for
    pixels without map entries), the number of such rows, and the map's column indices
    translated to buffer rows (int32).
    """
    slot = np.full(n_pix, -1, dtype=np.int32)
    n_used = 0
    for j in range(indices.size):
        p = indices[j]
        if slot[p] < 0:
            slot[p] = n_used
            n_used += 1
    rows = np.empty(indices.size, dtype=np.int32)
    for j in range(indices.size):
        rows[j] = slot[indices[j]]
    return slot, n_used, rows


@numba.njit(cache=True, inline="always")
def _raw_value(v, dark, flag, flag_value, lower):  # pragma: no cover - compiled
    """Raw detector value ``v`` -> float32, as :class:`RawCorrection` says: minus the pixel's
    ``dark`` (0.0 without a dark: x - 0.0 is x, -0.0 and NaN included), 0 below ``lower``
    (``max(threshold, 0)``: values below the threshold and negative ones; -inf without a
    threshold), NaN where flagged (``flag`` 1: negative; 2: equal to ``flag_value``); NaN
    stays NaN. float32 arithmetic throughout, as numpy does it on float32 frames."""
    flagged = ((flag == 1) & (v < 0)) | ((flag == 2) & (v == flag_value))  # no branches
    x = np.float32(v) - dark
    x = np.float32(0.0) if x < lower else x
    return np.float32(np.nan) if flagged else x


@numba.njit(cache=True, nogil=True)
def _gather_pixel_major(t0, t1, frames2d, slot, out, nan_bits, raw, dark, flag, flag_value,
                        lower):  # pragma: no cover - compiled
    """``out[slot[p], f] = frames2d[f, p]`` for every pixel with map entries of the tiles
    ``t0..t1-1`` of ``_TILE`` pixels, NaN written as 0.

    frames2d: (n <= 32, n_pix) frame-major; out: (n_used, n) pixel-major in ring order;
    nan_bits: (n_used,) uint32, bit f set where frame f is NaN. With ``raw`` each value is
    first corrected by :func:`_raw_value` (``dark`` (n_pix,) float32 or empty, flag,
    lower). Returns the number of NaN values met (NaN pixels without map entries do not
    matter and are not counted). Releases the GIL: ranges of tiles run on threads
    (:func:`_threaded`), which compiles much faster than a numba parallel loop.

    A transpose by blocks of ``_BLOCK`` pixels: each frame's run of the block is read
    (and corrected) in one sequential sweep into a small (n, _BLOCK) tile that stays in
    cache, whose columns are then written out as whole buffer rows. (Scratch arrays are
    allocated in the kernels, not passed in: LLVM then knows they alias nothing and
    vectorises their loops.)
    """
    n, n_pix = frames2d.shape
    count = 0
    block = np.empty((n, _BLOCK), dtype=out.dtype)
    for t in range(t0, t1):
        end = (t + 1) * _TILE if (t + 1) * _TILE < n_pix else n_pix
        for b0 in range(t * _TILE, end, _BLOCK):
            m = _BLOCK if b0 + _BLOCK < n_pix else n_pix - b0
            for f in range(n):
                if raw:
                    row, tile = frames2d[f, b0:b0 + m], block[f, :m]
                    if dark.size:
                        d = dark[b0:b0 + m]
                        for i in range(m):
                            tile[i] = _raw_value(row[i], d[i], flag, flag_value, lower)
                    else:
                        for i in range(m):
                            tile[i] = _raw_value(row[i], np.float32(0.0), flag, flag_value,
                                                 lower)
                else:
                    for i in range(m):
                        block[f, i] = frames2d[f, b0 + i]
            for i in range(m):
                q = slot[b0 + i]
                if q >= 0:
                    bits = np.uint32(0)
                    for f in range(n):
                        v = block[f, i]
                        nan = np.isnan(v)
                        out[q, f] = 0.0 if nan else v
                        bits |= np.uint32(nan) << np.uint32(f)
                        count += nan
                    nan_bits[q] = bits
    return count


@numba.njit(cache=True, nogil=True)
def _raw_to_float32(frames2d, dark, flag, flag_value, lower, out):  # pragma: no cover
    """``out[f, p]`` = :func:`_raw_value` of ``frames2d[f, p]`` (both (n, n_pix))."""
    n, n_pix = frames2d.shape
    for f in range(n):
        for p in range(n_pix):
            d = dark[p] if dark.size else np.float32(0.0)
            out[f, p] = _raw_value(frames2d[f, p], d, flag, flag_value, lower)


@numba.njit(cache=True, nogil=True)
def _sum_raw_frames(frames2d, flag, flag_value, out):  # pragma: no cover - compiled
    """``out[p]`` = the float64 sum over f, in frame order, of the float32 value of
    ``frames2d[f, p]`` (detector flags NaN, :func:`_raw_value` without dark or threshold):
    numpy's ``frames.astype(float32)`` (flags NaN) summed frame by frame into float64, bit for
    bit, in one sweep through the raw frames (n, n_pix)."""
    n, n_pix = frames2d.shape
    for p in range(n_pix):
        out[p] = np.float64(_raw_value(frames2d[0, p], np.float32(0.0), flag, flag_value,
                                       np.float32(-np.inf)))
    for f in range(1, n):
        for p in range(n_pix):
            out[p] += np.float64(_raw_value(frames2d[f, p], np.float32(0.0), flag, flag_value,
                                            np.float32(-np.inf)))


@numba.njit(cache=True)
def _sector_split(csc_indptr, csc_bins, csc_weights, sector_of_bin, local_of_bin, spare, recs,
                  seen, pix, local, weights):  # pragma: no cover - compiled
    """Split the map (CSC: pixel-major, bins increasing within a pixel) into the sectors
    ``sector_of_bin``, pixel-major within each sector, in records of ``_RECORD`` entries: a
    pixel's entries in a sector fill as many consecutive records as they need, the last one
    padded with weight 0 in the sector's ``spare`` bin (a scratch bin never read back).

    ``recs`` (n_sectors,) int64 advances past every record of each sector; ``seen``
    (n_sectors,) bool, all False, is scratch. Counting pass (``pix.size == 0``, ``recs``
    zero): it ends as the record counts. Filling pass (from each sector's first record on):
    writes each record's pixel and its entries' bins within the sector (``local_of_bin``) and
    weights.
    """
    n_pix = csc_indptr.size - 1
    fill = pix.size > 0
    for p in range(n_pix):
        j0, j1 = csc_indptr[p], csc_indptr[p + 1]
        for j in range(j0, j1):
            g = sector_of_bin[csc_bins[j]]
            if seen[g]:
                continue
            seen[g] = True
            first = recs[g] * _RECORD
            m = 0
            for k in range(j, j1):  # this pixel's entries in sector g, bins increasing
                if sector_of_bin[csc_bins[k]] == g:
                    if fill:
                        local[first + m] = local_of_bin[csc_bins[k]]
                        weights[first + m] = csc_weights[k]
                    m += 1
            n_recs = (m + _RECORD - 1) // _RECORD
            if fill:
                for x in range(m, n_recs * _RECORD):
                    local[first + x] = spare
                    weights[first + x] = 0.0
                for r in range(n_recs):
                    pix[recs[g] + r] = p
            recs[g] += n_recs
        for j in range(j0, j1):
            seen[sector_of_bin[csc_bins[j]]] = False


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _sector_sums(g0, g1, n_eta, eta_per, r_per, n_eta_sectors, rec_start, pix, local, weights,
                 frame, S, touched, sums, hit):  # pragma: no cover - compiled
    """The sums ``S`` (n_bins,) and NaN flags ``touched`` of the bins of sectors g0..g1-1 of one
    frame.

    Within a sector (:func:`_sector_split`) the frame's pixels are read in increasing order
    (long runs along the rows) and each is added to its bins' sums, which stay in cache; every
    bin sees its entries in increasing pixel order, the CSR order of :func:`_bin_sums`, a NaN
    value adding ``w * 0.0`` there too, so the sums are bit-identical. Every record has
    ``_RECORD`` entries (padding adds 0 to a spare bin): a loop of fixed length, unrolled,
    where a loop over each pixel's own entry count (3 or 4, at random) would mispredict its
    exit. ``touched[b]`` is set where a NaN value has an entry in bin b. Returns the number of
    records of NaN values in the sectors (> 0 when a NaN value has entries). Releases the GIL:
    the sectors of a frame run on Python threads (:func:`_sector_frame`), which compiles much
    faster than a numba parallel loop. ``sums`` (float64) and ``hit`` (bool), of at least
    ``r_per * eta_per + 1``, are scratch.
    """
    count = 0
    for g in range(g0, g1):
        for x in range(r_per * eta_per + 1):
            sums[x] = 0.0
            hit[x] = False
        for q in range(rec_start[g], rec_start[g + 1]):
            v = frame[pix[q]]
            nan = np.isnan(v)
            value = 0.0 if nan else np.float64(v)
            e = q * _RECORD
            for k in range(e, e + _RECORD):
                sums[local[k]] += weights[k] * value
            if nan:
                count += 1
                for k in range(e, e + _RECORD):
                    hit[local[k]] = True
        n_r = S.size // n_eta
        r0, e0 = g // n_eta_sectors * r_per, g % n_eta_sectors * eta_per
        r1 = r0 + r_per if r0 + r_per < n_r else n_r  # min(): builtins compile apart (binmap.py)
        e1 = e0 + eta_per if e0 + eta_per < n_eta else n_eta
        for ir in range(r0, r1):
            for ie in range(e0, e1):
                x = (ir - r0) * eta_per + ie - e0
                S[ir * n_eta + ie] = sums[x]
                touched[ir * n_eta + ie] = hit[x]
    return count


@numba.njit(cache=True, nogil=True)
def _touched_areas(c0, c1, indptr, indices, areas, bin_area, frame, touched, chunks, A,
                   T):  # pragma: no cover
    """Area of the non-NaN entries ``A`` and count of NaN entries ``T`` (n_bins,) of one frame
    where ``touched``, else ``bin_area`` and 0, for the bins of ``chunks[c0]..chunks[c1]``:
    :func:`_valid_areas` reading the frame directly (same sums in the same order)."""
    for c in range(c0, c1):
        for b in range(chunks[c], chunks[c + 1]):
            if not touched[b]:
                A[b] = bin_area[b]
                T[b] = 0.0
                continue
            a = 0.0
            t = 0.0
            for j in range(indptr[b], indptr[b + 1]):
                flagged = np.isnan(frame[indices[j]])
                a += 0.0 if flagged else np.float64(areas[j])
                t += flagged
            A[b] = a
            T[b] = t
    return 0


@numba.njit(cache=True, nogil=True)
def _valid_areas(c0, c1, indptr, rows, areas, nan_bits, bin_area, chunks, A,
                 T):  # pragma: no cover
    """Per-frame area of the non-NaN entries ``A`` and count of NaN entries ``T`` (n, n_bins)
    of the bins of ``chunks[c0]..chunks[c1]``.

    Bins without a NaN entry take ``bin_area`` (n_bins,), the same sum in the same order.
    """
    n = A.shape[0]
    a = np.empty(n, dtype=np.float64)
    t = np.empty(n, dtype=np.float64)
    for c in range(c0, c1):
        for b in range(chunks[c], chunks[c + 1]):
            hit = np.uint32(0)
            for j in range(indptr[b], indptr[b + 1]):
                hit |= nan_bits[rows[j]]
            if hit == 0:
                for f in range(n):
                    A[f, b] = bin_area[b]
                    T[f, b] = 0.0
                continue
            a[:] = 0.0
            t[:] = 0.0
            for j in range(indptr[b], indptr[b + 1]):
                bits = nan_bits[rows[j]]
                ar = np.float64(areas[j])
                for f in range(n):
                    flagged = (bits >> np.uint32(f)) & np.uint32(1)
                    a[f] += 0.0 if flagged else ar
                    t[f] += flagged
            for f in range(n):
                A[f, b] = a[f]
                T[f, b] = t[f]
    return 0


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _bin_sums(c0, c1, indptr, rows, weights, values, chunks, S):  # pragma: no cover - compiled
    """``S[f, b] = sum_j weights[j] * values[rows[j], f]`` over the entries j of every bin b of
    ``chunks[c0]..chunks[c1]``.

    values: (n_used, n) pixel-major buffer (NaN already 0); S: (n, n_bins) float64, written.
    ``chunks``: bin boundaries of the ranges the threads share (balanced by entry count).
    """
    n = values.shape[1]
    s = np.empty(n, dtype=np.float64)
    for c in range(c0, c1):
        for b in range(chunks[c], chunks[c + 1]):
            s[:] = 0.0
            for j in range(indptr[b], indptr[b + 1]):
                q = rows[j]
                w = np.float64(weights[j])
                for f in range(n):
                    s[f] += w * values[q, f]
            for f in range(n):
                S[f, b] = s[f]
    return 0


# --------------------------------------------------------------------------------------------
# kernel front ends
# --------------------------------------------------------------------------------------------
class _CsrMap(NamedTuple):
    """The checked bin map in CSR (bin-major) order (derived once per BinMap object)."""

    indptr: np.ndarray  # (n_bins + 1,)
    indices: np.ndarray  # (nnz,) raw pixel of each entry
    weights: np.ndarray  # (nnz,) float64
    areas: np.ndarray  # (nnz,) float64
    bin_area: np.ndarray  # (n_bins,) float64: sum of the areas of each bin's entries
    chunks: np.ndarray  # (<= _N_CHUNKS + 1,) int64 bin boundaries


class _KernelMap(NamedTuple):
    """:class:`_CsrMap` plus the ring order of the pixel-major pass buffer (built on the first
    pass of several frames)."""

    indptr: np.ndarray
    indices: np.ndarray
    weights: np.ndarray
    areas: np.ndarray
    bin_area: np.ndarray
    chunks: np.ndarray
    rows: np.ndarray  # (nnz,) int32: buffer row of each entry's pixel
    slot: np.ndarray  # (n_pix,) int32: buffer row of each raw pixel, -1 = no entry
    n_used: int


class _SectorMap(NamedTuple):
    """The weights split into sectors of the (R, eta) grid, pixel-major within each sector, in
    records of ``_RECORD`` entries, for passes of few frames (built on first use,
    :func:`_sector_split`)."""

    eta_per: int  # eta bins per sector
    r_per: int  # R bins per sector
    n_eta_sectors: int
    rec_start: np.ndarray  # (n_sectors + 1,) int64: first record of each sector
    pix: np.ndarray  # (n_records,) int32: pixel of each record
    local: np.ndarray  # (n_records * _RECORD,) uint16/uint32: bin of each entry in its sector
    weights: np.ndarray  # (n_records * _RECORD,) float64 (0 for padding)


_CSR_MAPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_KERNEL_MAPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SECTOR_MAPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: Maps that had a call of fewer than _MIN_BUFFER_FRAMES frames (:func:`_sectors_due`).
_ONE_FRAME_CALLED: weakref.WeakSet = weakref.WeakSet()
_KERNEL_MAPS_LOCK = threading.Lock()
_HELPER_POOL: list[concurrent.futures.ThreadPoolExecutor | None] = [None]
_BUFFERS = threading.local()
#: Held by the kernel pass running in this process (:func:`_pass_threads`).
_PASS_LOCK = threading.Lock()
#: Held by the thread reading frames for the kernel (:func:`reading_frames`).
_READ_LOCK = threading.Lock()
#: The pass buffer (:func:`_pass_buffer`), used under ``_PASS_LOCK`` only.
_PASS_BUFFER: list[np.ndarray | None] = [None]


def _reset_after_fork() -> None:
    """In a forked child: a new helper pool and new locks. Only the forking thread survives a
    fork, so the parent's pool threads are gone (work handed to them would wait forever) and a
    lock another thread held at the fork would never be released."""
    global _KERNEL_MAPS_LOCK, _PASS_LOCK, _READ_LOCK
    _KERNEL_MAPS_LOCK, _PASS_LOCK, _READ_LOCK = threading.Lock(), threading.Lock(), threading.Lock()
    _HELPER_POOL[0] = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _csr_map(binmap: BinMap) -> _CsrMap:
    """The checked CSR layout of ``binmap``, built on first use and kept while the map lives.

    Raises
    ------
    ParameterError
        The map fails :func:`midasflow.binmap.check_binmap`.
    """
    with _KERNEL_MAPS_LOCK:
        cm = _CSR_MAPS.get(binmap)
        if cm is None:
            try:  # the kernels trust the map's indices: nothing out of bounds may reach them
                check_binmap(binmap)
            except ValueError as exc:
                raise ParameterError(f"bin map {binmap.key}: {exc}") from None
            W = binmap.weights
            n_bins = W.shape[0]
            targets = np.linspace(0, W.nnz, _N_CHUNKS + 1)
            chunks = np.unique(np.concatenate(
                ([0, n_bins], np.searchsorted(W.indptr, targets).clip(0, n_bins))))
            bin_area = np.ascontiguousarray(binmap.bin_area, dtype=np.float64).reshape(-1)
            cm = _CsrMap(W.indptr, W.indices, W.data, binmap.areas.data, bin_area,
                         chunks.astype(np.int64))
            _CSR_MAPS[binmap] = cm
    return cm


def _kernel_map(binmap: BinMap) -> _KernelMap:
    """:func:`_csr_map` with the ring order of the pass buffer, built on first use."""
    cm = _csr_map(binmap)
    with _KERNEL_MAPS_LOCK:
        km = _KERNEL_MAPS.get(binmap)
        if km is None:
            slot, n_used, rows = _ring_order(cm.indices, binmap.weights.shape[1])
            km = _KernelMap(*cm, rows, slot, int(n_used))
            _KERNEL_MAPS[binmap] = km
    return km


def _sector_map(binmap: BinMap) -> _SectorMap:
    """The sector layout of ``binmap``'s weights (after :func:`_csr_map` checked the map):
    about ``_N_SECTORS`` sectors, eta wedges first (a wedge of the detector is read in long
    runs along its rows), then R bands when there are fewer eta bins than that."""
    _csr_map(binmap)
    with _KERNEL_MAPS_LOCK:
        sm = _SECTOR_MAPS.get(binmap)
        if sm is not None:
            return sm
        n_r, n_eta = int(binmap.n_r), int(binmap.n_eta)
        n_eta_sectors = min(_N_SECTORS, n_eta)
        eta_per = -(-n_eta // n_eta_sectors)
        n_eta_sectors = -(-n_eta // eta_per)
        n_r_sectors = -(-_N_SECTORS // n_eta_sectors)
        while -(-n_r // n_r_sectors) * eta_per >= 2**16 and n_r_sectors < n_r:
            n_r_sectors += 1  # local bins (and the spare) fit in uint16 unless a wedge is too wide
        r_per = -(-n_r // n_r_sectors)
        n_r_sectors = -(-n_r // r_per)
        csc = binmap.weights.tocsc()  # within a pixel: bins in increasing order
        ir, ie = np.divmod(np.arange(n_r * n_eta, dtype=np.int64), n_eta)
        sector_of_bin = (ir // r_per * n_eta_sectors + ie // eta_per).astype(np.int32)
        local_dtype = np.uint16 if r_per * eta_per < 2**16 else np.uint32
        local_of_bin = (ir % r_per * eta_per + ie % eta_per).astype(local_dtype)
        n_sectors = n_r_sectors * n_eta_sectors
        recs = np.zeros(n_sectors, dtype=np.int64)
        seen = np.zeros(n_sectors, dtype=np.bool_)
        tables = (csc.indptr, csc.indices, csc.data, sector_of_bin, local_of_bin, r_per * eta_per)
        _sector_split(*tables, recs, seen, np.empty(0, np.int32), np.empty(0, local_dtype),
                      np.empty(0, np.float64))
        rec_start = np.concatenate(([0], np.cumsum(recs)))
        pix = np.empty(rec_start[-1], dtype=np.int32)
        local = np.empty(rec_start[-1] * _RECORD, dtype=local_dtype)
        weights = np.empty(rec_start[-1] * _RECORD, dtype=np.float64)
        _sector_split(*tables, rec_start[:-1].copy(), seen, pix, local, weights)
        sm = _SectorMap(eta_per, r_per, n_eta_sectors, rec_start, pix, local, weights)
        _SECTOR_MAPS[binmap] = sm
    return sm


def _sector_frame(sm: _SectorMap, n_eta: int, frame: np.ndarray, S: np.ndarray,
                  touched: np.ndarray) -> int:
    """One frame's sums through the sector map, the sectors shared by ``numba.get_num_threads()``
    threads (this one and pool threads, each taking the next sector as it frees up); returns
    the number of NaN values with entries (:func:`_sector_sums`)."""
    args = (n_eta, sm.eta_per, sm.r_per, sm.n_eta_sectors, sm.rec_start, sm.pix, sm.local,
            sm.weights, frame, S, touched)
    return _threaded(_sector_sums, sm.rec_start.size - 1, 1, *args, scratch=lambda: (
        np.empty(sm.r_per * sm.eta_per + 1), np.empty(sm.r_per * sm.eta_per + 1, np.bool_)))


def _threaded(kernel: Callable[..., int], n_items: int, step: int, *args: Any,
              scratch: Callable[[], tuple] = tuple) -> int:
    """Sum of ``kernel(i, min(i + step, n_items), *args, *scratch())`` over i = 0, step, ...
    below ``n_items``, on ``numba.get_num_threads()`` threads: this one and pool threads, each
    taking the next range as it frees up, each with its own ``scratch()`` arrays. ``kernel``
    releases the GIL; threads compile much faster than a numba parallel loop, and share
    the work as well."""
    starts = iter(range(0, n_items, step))  # next() on it is atomic under the GIL

    def work() -> int:
        extra = scratch()
        return sum(kernel(i, min(i + step, n_items), *args, *extra) for i in starts)

    n_helpers = min(numba.get_num_threads(), -(-n_items // step)) - 1
    helpers = [_helper_pool().submit(work) for _ in range(n_helpers)]
    return work() + sum(f.result() for f in helpers)


def _helper_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The threads that help :func:`_threaded` (created on first use, one fewer than numba's)."""
    with _KERNEL_MAPS_LOCK:
        if _HELPER_POOL[0] is None:
            _HELPER_POOL[0] = concurrent.futures.ThreadPoolExecutor(
                max(1, numba.config.NUMBA_NUM_THREADS - 1), thread_name_prefix="midasflow-cake")
    return _HELPER_POOL[0]


@contextlib.contextmanager
def _pass_threads(max_threads: int | None) -> Iterator[Callable[[], contextlib.AbstractContextManager]]:
    """Run the passes of one kernel call one at a time in this process, each with
    ``max_threads`` numba threads (default all).

    Yields a function returning the context to run each pass in: it holds this process's pass
    lock, so kernel calls running at the same time (Dask threads) take turns pass by pass, each
    pass on every thread, instead of two passes sharing the cores with a buffer each (more
    memory traffic per frame); what a caller does between its passes (reading the next frames)
    runs beside the other calls' passes. The caller's thread setting is restored on exit
    (numba's thread count is per calling thread).
    """
    budget = numba.config.NUMBA_NUM_THREADS if max_threads is None else int(max_threads)
    budget = max(1, min(budget, numba.config.NUMBA_NUM_THREADS))
    previous = numba.get_num_threads()

    @contextlib.contextmanager
    def one_pass() -> Iterator[None]:
        with _PASS_LOCK:
            numba.set_num_threads(budget)
            yield

    try:
        yield one_pass
    finally:
        numba.set_num_threads(previous)


@contextlib.contextmanager
def reading_frames() -> Iterator[None]:
    """Read frames for the kernel one thread at a time in this process (a lock held for the
    whole read). HDF5 reads run one at a time anyway (h5py's lock), but they interleave: two
    tasks' reads started together end together, and neither pass can start before. Whole
    reads in turn let the first read's pass run while the next read goes on beside it."""
    with _READ_LOCK:
        yield


def sum_raw_frames(raw: np.ndarray) -> np.ndarray:
    """The float64 sum, frame by frame in order, of raw frames ``raw`` (n >= 1, nz, ny) turned
    into float32 with detector flags NaN (:class:`RawCorrection`'s flags, no dark): numpy's
    float32 frames added one by one into a float64 frame, bit for bit, without a float copy of
    the frames.

    Returns
    -------
    ndarray (nz, ny) float64
    """
    raw = np.ascontiguousarray(raw, dtype=raw.dtype.newbyteorder("="))
    _, flag, flag_value, _ = _raw_args(raw.dtype, RawCorrection())
    out = np.empty(raw.shape[1:], dtype=np.float64)
    _sum_raw_frames(raw.reshape(raw.shape[0], -1), flag, flag_value, out.reshape(-1))
    return out


def raw_buffer(shape: tuple[int, ...], dtype: DTypeLike) -> np.ndarray:
    """An array of ``shape`` and ``dtype`` to read raw frames into, reused by the calling thread
    across calls (a fresh array of a pass of frames costs its page faults on every read): its
    contents last until this thread asks for the next one."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = getattr(_BUFFERS, "frames", None)
    if raw is None or raw.size < nbytes:
        raw = _BUFFERS.frames = np.empty(nbytes, dtype=np.uint8)
    return raw[:nbytes].view(dtype).reshape(shape)


def _pass_buffer(n_rows: int, n_frames: int, dtype: np.dtype) -> np.ndarray:
    """A (n_rows, n_frames) scratch array starting on a 64-byte cache-line boundary (a row of
    16 float32 frames is then exactly one line), reused across passes: one per process, for
    the pass holding ``_PASS_LOCK``."""
    nbytes = n_rows * n_frames * np.dtype(dtype).itemsize
    raw = _PASS_BUFFER[0]
    if raw is None or raw.size < nbytes + 64:
        raw = _PASS_BUFFER[0] = np.empty(nbytes + 64, dtype=np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + nbytes].view(dtype).reshape(n_rows, n_frames)


class RawCorrection(NamedTuple):
    """What turns raw detector frames into the values :func:`cake_block` sums, inside the
    kernel (no float copy of the frames): each value becomes float32, detector flags NaN
    (negative values of signed-integer data, the type's largest value of unsigned-integer data;
    floating-point data keep theirs), the dark is subtracted, then with a threshold values
    below it and negative values become 0 (NaN stays NaN): what
    :func:`midasflow.io.frames.open_frames` does to the frames it reads, bit for bit.

    Attributes
    ----------
    dark : ndarray (nz, ny) float32, optional
        Dark frame subtracted from every frame (counts).
    threshold : float, optional
        ``-preProcThresh`` (counts above the dark).
    """

    dark: np.ndarray | None = None
    threshold: float | None = None


def _raw_args(dtype: np.dtype, correction: RawCorrection) -> tuple:
    """The correction arguments of :func:`_raw_value` for frames of ``dtype``."""
    dark = (np.empty(0, np.float32) if correction.dark is None
            else np.ascontiguousarray(correction.dark, dtype=np.float32).reshape(-1))
    flag, flag_value = (1, 0) if dtype.kind == "i" else (
        (2, int(np.iinfo(dtype).max)) if dtype.kind == "u" else (0, 0))
    lower = (-np.inf if correction.threshold is None
             else max(np.float32(correction.threshold), np.float32(0.0)))
    return dark, flag, flag_value, np.float32(lower)


def _check(frames: np.ndarray, binmap: Any, mask_rule: MaskRule, raw: bool = False) -> np.ndarray:
    if mask_rule not in MASK_RULES:
        raise ParameterError(f"MaskRule: expected one of {MASK_RULES}, got {mask_rule!r}")
    frames = np.asarray(frames)
    if frames.ndim == 2:
        frames = frames[None]
    if frames.ndim != 3 or tuple(frames.shape[1:]) != tuple(binmap.detector_shape):
        raise ParameterError(
            f"frames: expected shape (n, {binmap.detector_shape[0]}, {binmap.detector_shape[1]}) "
            f"matching the bin map (NrPixelsZ, NrPixelsY), got {frames.shape}"
        )
    if raw and frames.dtype.kind not in "iuf":
        raise ParameterError(f"frames: expected integer or floating-point raw values, got {frames.dtype}")
    if not raw and frames.dtype not in (np.float32, np.float64):
        frames = frames.astype(np.float64)
    return np.ascontiguousarray(frames)


def _finish(S, A, nan_touch, binmap, normalize, min_area_fraction, mask_rule):
    """Divide the sums and apply the mask rule, in place of ``S``, which is returned.

    S: (n, n_r, n_eta) float64; A: (n, n_r, n_eta) or (n_r, n_eta) float64;
    nan_touch: (n, n_r, n_eta) bool or None."""
    geom = np.asarray(binmap.geometric_area, dtype=np.float64)
    if normalize:
        np.divide(S, A, out=S, where=A > 0)
    if mask_rule == "area":
        bad = A < min_area_fraction * geom
    else:
        bad = np.asarray(binmap.touches_mask, dtype=bool)
        if nan_touch is not None:
            bad = bad | nan_touch
    bad = bad & (geom > 0)
    if bad.ndim == 2:
        S[:, bad] = np.nan
    else:
        S[bad] = np.nan
    S[:, geom <= 0] = 0.0
    return S


def frames_per_pass(binmap: BinMap, dtype: DTypeLike = np.float32) -> int:
    """Number of frames :func:`cake_block` puts through one pass over the map.

    Parameters
    ----------
    binmap : BinMap
        The map; only its pixels with entries count (``n_used``).
    dtype : numpy dtype
        Frame dtype (float32 or float64).

    Returns
    -------
    int
        Frames whose pixel-major copy of the used pixels fits in 512 MiB, at most 32, a
        multiple of 16 (or 8) when at least 16 (or 8), whole vectors; 32 for 2048 x 2048 float32
        frames with RMax 1000 (a 400 MB buffer). Also the fastest frame-chunk size for
        :func:`cake`.
    """
    n_used = max(_kernel_map(binmap).n_used, 1)
    k = max(1, min(_MAX_PASS_FRAMES, _PASS_BYTES // (n_used * np.dtype(dtype).itemsize)))
    for width in (16, 8):  # whole vectors of float32 lanes
        if k >= width:
            return k - k % width
    return k


def _segments(blocks: list[np.ndarray], lo: int, hi: int) -> Iterator[tuple[np.ndarray, int]]:
    """The pieces of frames ``lo:hi`` of the concatenated ``blocks`` (each (n_i, n_pix)), with
    the position of each piece's first frame relative to ``lo``."""
    start = 0
    for block in blocks:
        stop = start + block.shape[0]
        a, b = max(lo, start), min(hi, stop)
        if a < b:
            yield block[a - start:b - start], a - lo
        start = stop


def _area_rows(AT, S, lo, bin_area):
    """``AT = [A, T]`` (per-frame area and NaN-touch sums, like ``S``), allocated at the first
    frame that meets a NaN with rows ``:lo`` (NaN-free frames) filled with ``bin_area``."""
    if AT[0] is None:
        AT[0], AT[1] = np.empty_like(S), np.empty_like(S)
        AT[0][:lo] = bin_area
        AT[1][:lo] = 0.0
    return AT[0], AT[1]


def _sectors_due(binmap: BinMap) -> bool:
    """Whether the one-frame passes of this call go through the sector layout
    (:func:`_sector_map`): from the map's second call of fewer than ``_MIN_BUFFER_FRAMES``
    frames on. The first such call (a new process's first frame, a single calibrant image) goes
    through the CSR map (:func:`_csr_frame`), which needs no layout built."""
    with _KERNEL_MAPS_LOCK:
        if binmap in _SECTOR_MAPS or binmap in _ONE_FRAME_CALLED:
            return True
        _ONE_FRAME_CALLED.add(binmap)
    return False


def _csr_frame(cm: _CsrMap, frame: np.ndarray, S: np.ndarray, AT: list, i: int) -> None:
    """One frame's sums into row ``i`` of ``S`` (and of ``AT = [A, T]`` once a frame meets a
    NaN) straight through the CSR map: :func:`_bin_sums` and :func:`_valid_areas` with the
    frame (NaN written as 0) as a one-frame pixel-major buffer whose rows are the raw pixels.
    The sums of :func:`_sector_frame` (and of a whole pass) bit for bit: every bin adds its
    entries in increasing pixel order with the same fused multiply-adds."""
    nan = np.isnan(frame)
    has_nan = bool(nan.any())
    values = np.where(nan, frame.dtype.type(0.0), frame) if has_nan else frame
    n_chunks = cm.chunks.size - 1
    _threaded(_bin_sums, n_chunks, 1, cm.indptr, cm.indices, cm.weights, values.reshape(-1, 1),
              cm.chunks, S[i:i + 1])
    if has_nan:
        A, T = _area_rows(AT, S, i, cm.bin_area)
        _threaded(_valid_areas, n_chunks, 1, cm.indptr, cm.indices, cm.areas,
                  nan.astype(np.uint32), cm.bin_area, cm.chunks, A[i:i + 1], T[i:i + 1])
    elif AT[0] is not None:
        AT[0][i] = cm.bin_area
        AT[1][i] = 0.0


def _one_pass(blocks, lo, hi, binmap, S, AT, correction=None):
    """Sums of frames ``lo:hi`` of the concatenated ``blocks`` into rows ``lo:hi`` of ``S`` and,
    once a pass meets a NaN, of ``AT = [A, T]`` (allocated then, earlier rows NaN-free);
    raw frames corrected by ``correction`` (:class:`RawCorrection`) when given."""
    pieces = list(_segments(blocks, lo, hi))
    if hi - lo < _MIN_BUFFER_FRAMES:  # frame by frame, straight from the frames
        km = _csr_map(binmap)
        sm = _sector_map(binmap) if _sectors_due(binmap) else None
        touched = _pass_buffer(1, S.shape[1], np.bool_)[0]
        for piece, col in pieces:
            if correction is not None:
                values = np.empty(piece.shape, dtype=np.float32)
                _raw_to_float32(piece, *_raw_args(piece.dtype, correction), values)
                piece = values
            for i, frame in enumerate(piece, start=lo + col):
                if sm is None:
                    _csr_frame(km, frame, S, AT, i)
                elif _sector_frame(sm, int(binmap.n_eta), frame, S[i], touched):
                    A, T = _area_rows(AT, S, i, km.bin_area)
                    _threaded(_touched_areas, km.chunks.size - 1, 1, km.indptr, km.indices,
                              km.areas, km.bin_area, frame, touched, km.chunks, A[i], T[i])
                elif AT[0] is not None:
                    AT[0][i] = km.bin_area
                    AT[1][i] = 0.0
        return
    km = _kernel_map(binmap)
    dtype = np.result_type(*(piece.dtype for piece, _ in pieces))
    values = _pass_buffer(km.n_used, hi - lo, np.float32 if correction is not None else dtype)
    nan_bits = np.empty(km.n_used, dtype=np.uint32)
    # several blocks: one copy into a pass-sized array, as one pass through the frames
    # writes whole buffer rows (a sweep per block costs more than that copy)
    frames2d = (pieces[0][0] if len(pieces) == 1
                else np.concatenate([piece for piece, _ in pieces], dtype=dtype))
    raw_args = _raw_args(dtype, correction or RawCorrection())
    n_tiles = -(-frames2d.shape[1] // _TILE)
    n_nan = _threaded(_gather_pixel_major, n_tiles, _TILES_PER_CALL, frames2d, km.slot, values,
                      nan_bits, correction is not None, *raw_args)
    n_chunks = km.chunks.size - 1
    _threaded(_bin_sums, n_chunks, 1, km.indptr, km.rows, km.weights, values, km.chunks, S[lo:hi])
    if n_nan:
        A, T = _area_rows(AT, S, lo, km.bin_area)
        _threaded(_valid_areas, n_chunks, 1, km.indptr, km.rows, km.areas, nan_bits, km.bin_area,
                  km.chunks, A[lo:hi], T[lo:hi])
    elif AT[0] is not None:
        AT[0][lo:hi] = km.bin_area
        AT[1][lo:hi] = 0.0


def cake_block(
    frames: np.ndarray | Sequence[np.ndarray],
    binmap: BinMap,
    *,
    normalize: bool = True,
    min_area_fraction: float = 0.5,
    mask_rule: MaskRule = "area",
    max_threads: int | None = None,
    correction: RawCorrection | None = None,
) -> np.ndarray:
    """Cake a block of frames with the numba kernels.

    Parameters
    ----------
    frames : ndarray, shape (n, nz, ny), float32 or float64, or a sequence of such blocks
        Dark-subtracted raw frames (raw orientation, ``binmap.detector_shape``). NaN marks a pixel
        masked in that frame. A 2-D frame is treated as ``n = 1``. A sequence of blocks is caked
        as their concatenation along frames (the blocks of a pass are copied into one array).
    binmap : BinMap
        Pixel -> (R, eta) map (``weights``, ``areas``, ``bin_area``, ``geometric_area``,
        ``touches_mask``, ``n_r``, ``n_eta``).
    normalize : bool
        Divide by the unmasked area (MIDAS ``Normalize 1``): area-weighted mean per bin.
    min_area_fraction : float
        ``"area"`` rule: a bin with unmasked area below this fraction of its geometric area is NaN.
    mask_rule : {"area", "midas"}
        Which bins are NaN (module docstring).
    max_threads : int, optional
        Numba threads this call and the kernel calls running at the same time in this process
        share (default all of numba's); a Dask worker passes its own thread count.
    correction : RawCorrection, optional
        The frames are raw detector values (any integer or floating-point dtype, uint16 say)
        and each is corrected as :class:`RawCorrection` says while the kernel reads it: the
        result is that of the corrected float32 frames, with no float copy of them.

    Returns
    -------
    ndarray, shape (n, n_r, n_eta), float64
        Per-frame cakes (intensity per pixel area when normalising, counts otherwise).

    Notes
    -----
    Frames go through the map :func:`frames_per_pass` at a time (32 for a 2048 x 2048 float32
    frame). Each pass first copies the pixels that have map entries into a pixel-major buffer
    (one row of all frames per pixel) in the order in which the bins use them, so the bin sums
    then read that buffer almost sequentially and every entry updates all frames of the pass
    with one vector operation; threads share the bins in ranges of equal entry counts. The
    buffer (up to 512 MiB) is kept per process and reused. A pass of fewer than
    ``_MIN_BUFFER_FRAMES`` frames (a single frame, say) skips the buffer and goes through the
    map frame by frame, straight from the frames, the threads sharing sectors of the (R, eta)
    grid (each pixel's entries in a sector read as records of 4, padded); the map's first such
    call (a new process's first frame, one calibrant image) goes
    through the CSR map instead, bin by bin, so no sector layout is built for it. NaN values
    count as 0 and are flagged; only the bins a NaN touches have the unmasked areas of their
    entries summed again (other bins keep the precomputed ``binmap.bin_area``). Every way adds
    a bin's entries in increasing pixel order in float64 (fused multiply-adds), so every
    frame's result is bit-identical whichever frames share its pass and however the frames
    are split into blocks.

    Calls running at the same time in one process (Dask threads) take turns pass by pass, each
    pass on ``max_threads`` threads with the process's one pass buffer: two passes at once, a
    buffer each, would cost more memory traffic per frame.
    """
    raw = correction is not None
    if raw and correction.dark is not None and \
            np.shape(correction.dark) != tuple(binmap.detector_shape):
        raise ParameterError(f"dark: expected shape {tuple(binmap.detector_shape)} matching the "
                             f"bin map (NrPixelsZ, NrPixelsY), got {np.shape(correction.dark)}")
    blocks = [_check(block, binmap, mask_rule, raw) for block in
              ([frames] if isinstance(frames, np.ndarray) else list(frames))]
    n = sum(block.shape[0] for block in blocks)
    n_r, n_eta = int(binmap.n_r), int(binmap.n_eta)
    _csr_map(binmap)  # checks the map before any kernel reads it
    flats = [block.reshape(block.shape[0], -1) for block in blocks if block.shape[0]]
    S = np.empty((n, n_r * n_eta), dtype=np.float64)
    AT = [None, None]  # per-frame area and NaN-touch sums, allocated at the first NaN pass
    dtype = np.float32 if raw else np.result_type(np.float32, *(block.dtype for block in blocks))
    # a call of fewer frames than the buffer pays for is one pass (no ring order needed)
    step = max(n, 1) if n < _MIN_BUFFER_FRAMES else frames_per_pass(binmap, dtype)
    with _pass_threads(max_threads) as one_pass:
        for lo in range(0, n, step):
            with one_pass():
                _one_pass(flats, lo, min(lo + step, n), binmap, S, AT, correction)
    A, T = AT
    shape = (n, n_r, n_eta)
    if A is None:
        return _finish(S.reshape(shape), np.asarray(binmap.bin_area, dtype=np.float64), None,
                       binmap, normalize, min_area_fraction, mask_rule)
    return _finish(S.reshape(shape), A.reshape(shape), T.reshape(shape) > 0, binmap, normalize,
                   min_area_fraction, mask_rule)


def cake_block_reference(
    frames: np.ndarray,
    binmap: BinMap,
    *,
    normalize: bool = True,
    min_area_fraction: float = 0.5,
    mask_rule: MaskRule = "area",
) -> np.ndarray:
    """Oracle for :func:`cake_block`: the same result with plain ``scipy.sparse`` products.

    Same parameters and return value as :func:`cake_block`; slow, float64 throughout.
    """
    frames = _check(frames, binmap, mask_rule)
    n = frames.shape[0]
    n_r, n_eta = int(binmap.n_r), int(binmap.n_eta)
    v = frames.reshape(n, -1).astype(np.float64).T  # (npix, n)
    valid = ~np.isnan(v)
    S = scipy.sparse.csr_matrix(binmap.weights) @ np.where(valid, v, 0.0)
    A = scipy.sparse.csr_matrix(binmap.areas) @ valid.astype(np.float64)
    touch = (binmap.areas != 0).astype(np.float64) @ (~valid).astype(np.float64)
    shape = (n, n_r, n_eta)
    return _finish(
        np.ascontiguousarray(S.T).reshape(shape),
        np.ascontiguousarray(A.T).reshape(shape),
        np.ascontiguousarray(touch.T).reshape(shape) > 0,
        binmap,
        normalize,
        min_area_fraction,
        mask_rule,
    )
