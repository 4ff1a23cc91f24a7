"""Pixel -> (R, η) bin map with exact pixel splitting (docs/reference/midas_parameters.md §6), as sparse matrices.

Each raw pixel's four corners are mapped through :func:`midasflow.geometry.pixel_to_r_eta` and
placed in the ideal plane (X, Y) = (−R sin η, R cos η) (pixels, origin at the beam centre). The
straight-edged quadrilateral they span is intersected *exactly* with every annular sector
{R_lo ≤ r ≤ R_hi, η_lo ≤ η ≤ η_hi} it can touch:

* the quadrilateral is clipped to the η wedge (two half-planes through the origin; wedges wider
  than 180° are split into pieces of at most 180°), then
* the area inside the annulus is area(P ∩ disk R_hi) − area(P ∩ disk R_lo), where each disk
  area is a Green's-theorem sum over the polygon edges of the signed area of
  (triangle origin-a-b) ∩ disk: straight (shoelace) terms inside the circle and exact arc
  terms (R²/2)·Δφ outside it.

This is exact for any simple polygon, so MIDAS's "skip edge intersections when ≥ 4 vertices
are already found" shortcut (which can under-estimate an overlap) is deliberately NOT
reproduced; for an untilted, undistorted detector the split areas of a pixel sum to 1 to
rounding. Entries below ``MIN_AREA_PX2`` (1e−10 px², i.e. rounding noise) are dropped; MIDAS
drops areas < 1e−5. ``SubPixelLevel`` is not needed with exact areas and is not implemented.
The ±180° seam needs no special case: a pixel's η interval is unwrapped around its first
corner, and bins are matched against that interval shifted by multiples of 360°.

Weights are ``area / C`` with C = cos³(2θ) (``SolidAngleCorrection``) times
1 − f·sin²(2θ)·cos²(η) (``PolarizationCorrection``, applied only where it exceeds 1e−6),
both at the pixel centre (midas_parameters.md §6.2). Masked pixels have no entries in ``weights``/``areas`` but
their overlap counts in ``geometric_area`` and flags ``touches_mask`` on every bin they overlap.

Every bin also carries the 2θ its value samples, ``effective_tth_deg`` (docs/caking_2theta.md):
the overlap-area-weighted mean, over the unmasked pixels it collects, of each pixel's mean 2θ
over its own area — the same weights the cake applies to the pixel values, so for an intensity
locally linear in 2θ a bin's value is the pattern at its effective 2θ, not at its centre.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import warnings
import weakref
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numba
import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray

from midasflow.errors import FrameError, MidasflowError, ParameterError
from midasflow.geometry import (
    pixel_map,
    pixel_to_r_eta,
    r_to_tth_deg,
    untransform_image,
)
from midasflow.io.atomic import atomic_output
from midasflow.limits import MAX_BINS, MAX_MAP_ENTRIES, check_binning

if TYPE_CHECKING:
    from collections.abc import Callable

    from midasflow.params import Params

__all__ = ["BinMap", "build_binmap", "load_or_build_binmap", "binmap_key", "check_binmap",
           "cached_binmap", "pixel_mean_tth_deg", "cached_pixel_mean_tth_deg", "effective_tth_deg_without",
           "MIN_AREA_PX2"]

#: Overlap areas (px²) at or below this are rounding noise and produce no entry.
MIN_AREA_PX2 = 1e-10
#: Bumped whenever the map algorithm or file layout changes, so stale cache files are not reused.
_FORMAT = "midasflow-binmap-v4"  # v4: effective_tth_deg; v3: a pixel with the beam centre on its edge keeps all its area
_MAX_VERTS = 16
#: First guess of the entries per pixel that sizes a band's entry buffers (:func:`_split_bands`).
_ENTRIES_PER_PIXEL = 4.0


@dataclass(frozen=True, eq=False)
class BinMap:
    """Sparse pixel -> bin map of one detector geometry, binning and static mask.

    Attributes
    ----------
    n_r, n_eta : int
        Number of radial and azimuthal bins; bins are flattened r-major, b = r*n_eta + e.
    detector_shape : tuple of int
        Raw frame shape (nz, ny); pixel columns are raw flat indices z*ny + y.
    r_edges_px : ndarray, shape (n_r + 1,), float64
    eta_edges_deg : ndarray, shape (n_eta + 1,), float64
    weights : scipy.sparse.csr_matrix, shape (n_r*n_eta, nz*ny), float64
        Corrected weight frac = area / C of every unmasked pixel in every bin it overlaps.
    areas : scipy.sparse.csr_matrix, same shape and sparsity as ``weights``, float64
        Uncorrected overlap area (px² of the ideal plane).
    bin_area : ndarray, shape (n_r, n_eta), float64
        Σ overlap area over unmasked pixels.
    geometric_area : ndarray, shape (n_r, n_eta), float64
        Σ overlap area over all pixels, masked ones included.
    touches_mask : ndarray, shape (n_r, n_eta), bool
        True where a masked pixel overlaps the bin (MIDAS maskMap flag).
    effective_tth_deg : ndarray, shape (n_r, n_eta), float64
        The 2θ (deg) the bin's value samples: Σ area·(pixel's mean 2θ) / ``bin_area`` over the
        unmasked pixels; NaN where ``bin_area`` is 0. Differs from the bin centre's 2θ by
        ≈ (w² + 1)/(12 R) px on a whole annulus of R bins w px wide, by up to half a bin where
        a mask, a gap or the detector edge cuts the bin.
    key : str
        Cache key: hash of ``Params.geometry_key()``, the mask and the map format.
    digest : str or None
        SHA-256 of the content, set on maps saved to or loaded from the cache.
    cache_file : str or None
        Absolute path of the cache file holding this very content (with ``digest``); Dask
        workers load the map from it (:func:`cached_binmap`) instead of receiving it.
    """

    n_r: int
    n_eta: int
    detector_shape: tuple[int, int]
    r_edges_px: NDArray[np.float64]
    eta_edges_deg: NDArray[np.float64]
    weights: sp.csr_matrix
    areas: sp.csr_matrix
    bin_area: NDArray[np.float64]
    geometric_area: NDArray[np.float64]
    touches_mask: NDArray[np.bool_]
    effective_tth_deg: NDArray[np.float64]
    key: str
    digest: str | None = None
    cache_file: str | None = None


# ----------------------------------------------------------------------------------- kernels
# Compile time is most of a cold start, and numba compiles every jitted function, every
# overload of a numpy or builtin function (np.zeros per dtype, min/max per argument types) and
# every literal argument value (f(x, 4)) as a separate function, at 0.05-0.3 s CPU each: the
# kernels below use conditional expressions for min/max, pass sizes as variables and leave
# allocations to the drivers where they can.
@numba.njit(cache=True, inline="always")
def _arc_angle(ax, ay, bx, by):
    """Signed angle (rad) from vector a to vector b."""
    return np.arctan2(ax * by - ay * bx, ax * bx + ay * by)


@numba.njit(cache=True)
def _tri_disk_area(ax, ay, bx, by, r, r2):
    """Signed area of triangle (origin, a, b) ∩ disk of radius r about the origin."""
    a2 = ax * ax + ay * ay
    b2 = bx * bx + by * by
    if a2 <= r2 and b2 <= r2:
        return 0.5 * (ax * by - ay * bx)
    dx = bx - ax
    dy = by - ay
    qa = dx * dx + dy * dy
    if qa == 0.0:
        return 0.0
    qb = ax * dx + ay * dy
    disc = qb * qb - qa * (a2 - r2)
    root = np.sqrt(disc) if disc > 0.0 else 0.0
    if a2 <= r2:  # a inside, b outside: straight a -> exit point, then arc to b
        t = (-qb + root) / qa
        px = ax + t * dx
        py = ay + t * dy
        return 0.5 * (ax * py - ay * px) + 0.5 * r2 * _arc_angle(px, py, bx, by)
    if b2 <= r2:  # a outside, b inside: arc a -> entry point, then straight to b
        t = (-qb - root) / qa
        px = ax + t * dx
        py = ay + t * dy
        return 0.5 * r2 * _arc_angle(ax, ay, px, py) + 0.5 * (px * by - py * bx)
    if disc > 0.0:  # both outside: the chord may still cut the disk
        t1 = (-qb - root) / qa
        t2 = (-qb + root) / qa
        if t1 > 0.0 and t2 < 1.0:
            p1x = ax + t1 * dx
            p1y = ay + t1 * dy
            p2x = ax + t2 * dx
            p2y = ay + t2 * dy
            return 0.5 * (
                r2 * (_arc_angle(ax, ay, p1x, p1y) + _arc_angle(p2x, p2y, bx, by))
                + (p1x * p2y - p1y * p2x)
            )
    return 0.5 * r2 * _arc_angle(ax, ay, bx, by)


@numba.njit(cache=True)
def _poly_disk_area(xs, ys, n, r):
    """Signed area of polygon (xs, ys)[:n] ∩ disk of radius r about the origin."""
    total = 0.0
    r2 = r * r
    for k in range(n):
        k1 = k + 1 if k + 1 < n else 0
        total += _tri_disk_area(xs[k], ys[k], xs[k1], ys[k1], r, r2)
    return total


@numba.njit(cache=True)
def _poly_area(xs, ys, n):
    """Signed shoelace area of polygon (xs, ys)[:n]."""
    total = 0.0
    for k in range(n):
        k1 = k + 1 if k + 1 < n else 0
        total += xs[k] * ys[k1] - ys[k] * xs[k1]
    return 0.5 * total


@numba.njit(cache=True)
def _clip_half_plane(xs, ys, n, nx, ny, out_x, out_y):
    """Sutherland–Hodgman clip of polygon (xs, ys)[:n] to nx*x + ny*y ≥ 0; returns count.

    A convex n-gon gains at most one vertex, so 4 corners and two clips fit in _MAX_VERTS.
    """
    m = 0
    for k in range(n):
        k1 = k + 1 if k + 1 < n else 0
        fa = nx * xs[k] + ny * ys[k]
        fb = nx * xs[k1] + ny * ys[k1]
        if fa >= 0.0:
            out_x[m] = xs[k]
            out_y[m] = ys[k]
            m += 1
        if (fa >= 0.0) != (fb >= 0.0):
            t = fa / (fa - fb)
            out_x[m] = xs[k] + t * (xs[k1] - xs[k])
            out_y[m] = ys[k] + t * (ys[k1] - ys[k])
            m += 1
    return m


@numba.njit(cache=True)
def _clip_wedge(xs, ys, n, lo_deg, hi_deg, tmp_x, tmp_y, out_x, out_y):
    """Clip a polygon to the wedge lo ≤ η ≤ hi (width ≤ 180°) of the ideal plane."""
    lo = np.deg2rad(lo_deg)
    hi = np.deg2rad(hi_deg)
    # direction of η is (−sin η, cos η); η ≥ lo <=> cross(d_lo, p) ≥ 0, η ≤ hi <=> cross(p, d_hi) ≥ 0
    m = _clip_half_plane(xs, ys, n, -np.cos(lo), -np.sin(lo), tmp_x, tmp_y)
    if m < 3:
        return 0
    return _clip_half_plane(tmp_x, tmp_y, m, np.cos(hi), np.sin(hi), out_x, out_y)


@numba.njit(cache=True)
def _pixel_polygon(cx, cy, z, y, xs, ys):
    """Corners of raw pixel (y, z) in perimeter order into (xs, ys).

    Returns (signed area, r_min, r_max, origin_inside) of the quadrilateral.
    """
    xs[0] = cx[z, y]
    ys[0] = cy[z, y]
    xs[1] = cx[z, y + 1]
    ys[1] = cy[z, y + 1]
    xs[2] = cx[z + 1, y + 1]
    ys[2] = cy[z + 1, y + 1]
    xs[3] = cx[z + 1, y]
    ys[3] = cy[z + 1, y]
    area = _poly_area(xs, ys, xs.size)
    r_max = 0.0
    r_min = np.inf
    inside = True
    for k in range(4):
        k1 = k + 1 if k < 3 else 0
        r_k = np.sqrt(xs[k] * xs[k] + ys[k] * ys[k])
        r_max = r_k if r_k > r_max else r_max
        # origin inside <=> it is on the inner side of every edge; ON an edge counts as inside
        # (the corners' η then span 180° and unwrapping could pick the other half-turn), hence
        # the tolerance of 1e-9 of the pixel's area for rounding of the corner positions
        if (xs[k] * ys[k1] - ys[k] * xs[k1]) * area < -1e-9 * area * area:
            inside = False
        dx = xs[k1] - xs[k]
        dy = ys[k1] - ys[k]
        d2 = dx * dx + dy * dy
        t = 0.0 if d2 == 0.0 else -(xs[k] * dx + ys[k] * dy) / d2
        t = 1.0 if t >= 1.0 else (t if t > 0.0 else 0.0)
        qx = xs[k] + t * dx
        qy = ys[k] + t * dy
        r_q = np.sqrt(qx * qx + qy * qy)
        r_min = r_q if r_q < r_min else r_min
    if inside:
        r_min = 0.0
    return area, r_min, r_max, inside


@numba.njit(cache=True)
def _bin_span(edges, lo, hi):
    """First and last bin of the sorted finite ``edges`` that [lo, hi] reaches, unclipped:
    ``np.searchsorted(edges, lo, "right") - 1`` and ``np.searchsorted(edges, hi, "left") - 1``
    (a NaN bound sorts after every edge, as numpy sorts NaN). numba's own searchsorted costs
    about 2 s of compiling (every comparison kind it supports) for this one use."""
    n = edges.size
    first = n
    for side in range(2):  # 0: numpy's side="right" of lo, 1: side="left" of hi
        x = lo if side == 0 else hi
        pos = n
        if not np.isnan(x):
            a, b = 0, n
            while a < b:
                mid = (a + b) // 2
                if edges[mid] < x or (side == 0 and edges[mid] == x):
                    a = mid + 1
                else:
                    b = mid
            pos = a
        if side == 0:
            first = pos
    return first - 1, pos - 1


@numba.njit(cache=True)
def _eta_interval(ceta, z, y):
    """Unwrapped η interval (deg) spanned by the corners of raw pixel (y, z)."""
    base = ceta[z, y]
    lo = 0.0
    hi = 0.0
    for dz, dy in ((0, 1), (1, 1), (1, 0)):
        d = ceta[z + dz, y + dy] - base
        d -= 360.0 * np.floor((d + 180.0) / 360.0)
        lo = d if d < lo else lo
        hi = d if d > hi else hi
    return base + lo, base + hi


@numba.njit(cache=True)
def _eta_ranges(lo, hi, full, eta_edges, starts, stops, shifts):
    """Bin ranges [start, stop] overlapping [lo, hi] + 360·k; returns how many ranges."""
    n_eta = eta_edges.size - 1
    if full:
        starts[0] = 0
        stops[0] = n_eta - 1
        shifts[0] = 0.0
        return 1
    n = 0
    last = -1
    for k in range(-2, 3):
        a = lo + 360.0 * k
        b = hi + 360.0 * k
        if b < eta_edges[0] or a > eta_edges[-1]:
            continue
        e0, e1 = _bin_span(eta_edges, a, b)
        e0 = e0 if e0 > last + 1 else last + 1  # last + 1 >= 0
        e1 = e1 if e1 < n_eta - 1 else n_eta - 1
        if e0 <= e1:
            starts[n] = e0
            stops[n] = e1
            shifts[n] = 360.0 * k
            last = e1
            n += 1
    return n


@numba.njit(cache=True, nogil=True)
def _split_pixels(p0, p1, cx, cy, ceta, r_edges, eta_edges, min_area, out_bin, out_area, used):
    """Exact overlap areas of raw pixels p0, p0 + 1, ... (flat, z*ny + y) with their bins.

    The entries of the pixels go one after the other to ``out_bin``/``out_area`` from position 0,
    pixel p's count to ``used[p]``. Stops before a pixel whose candidate bins might not fit in
    what is left of ``out_bin``; returns (that pixel, or p1 when all are done; entries written).
    Releases the GIL: bands of rows run on threads (:func:`_split_bands`), which compiles much
    faster than a numba parallel loop.
    """
    ny = cx.shape[1] - 1
    n_r = r_edges.size - 1
    n_eta = eta_edges.size - 1
    xs = np.empty(4)
    ys = np.empty(4)
    tmp_x = np.empty(_MAX_VERTS)
    tmp_y = np.empty(_MAX_VERTS)
    cl_x = np.empty(_MAX_VERTS)
    cl_y = np.empty(_MAX_VERTS)
    starts = np.empty(5, dtype=np.int64)
    stops = np.empty(5, dtype=np.int64)
    shifts = np.empty(5)
    acc = np.empty(n_r)
    disk = np.empty(n_r + 1)
    pos = 0
    for pix in range(p0, p1):
        z, y = pix // ny, pix % ny
        area, r_min, r_max, inside = _pixel_polygon(cx, cy, z, y, xs, ys)
        k0, k1 = _bin_span(r_edges, r_min, r_max)
        k0 = k0 if k0 > 0 else 0
        k1 = k1 if k1 < n_r - 1 else n_r - 1
        if area == 0.0 or k0 > k1:
            used[pix] = 0
            continue
        sign = 1.0 if area > 0.0 else -1.0
        lo, hi = _eta_interval(ceta, z, y)
        n_ranges = _eta_ranges(lo, hi, inside, eta_edges, starts, stops, shifts)
        n_cand = 0
        for j in range(n_ranges):
            n_cand += stops[j] - starts[j] + 1
        if pos + n_cand * (k1 - k0 + 1) > out_bin.size:
            return pix, pos
        start = pos
        for j in range(n_ranges):
            for e in range(starts[j], stops[j] + 1):
                w_lo = eta_edges[e] - shifts[j]
                w_hi = eta_edges[e + 1] - shifts[j]
                acc[k0 : k1 + 1] = 0.0
                whole = (not inside) and w_lo <= lo and hi <= w_hi
                n_sub = 1 if whole else int(np.ceil((w_hi - w_lo) / 180.0))
                for s in range(n_sub):
                    if whole:
                        px_, py_, m = xs, ys, xs.size
                    else:
                        s_lo = w_lo + (w_hi - w_lo) * s / n_sub
                        s_hi = w_lo + (w_hi - w_lo) * (s + 1) / n_sub
                        m = _clip_wedge(xs, ys, xs.size, s_lo, s_hi, tmp_x, tmp_y, cl_x, cl_y)
                        px_, py_ = cl_x, cl_y
                    if m < 3:
                        continue
                    full = sign * _poly_area(px_, py_, m)
                    if full <= min_area:
                        continue
                    for k in range(k0, k1 + 2):
                        edge = r_edges[k]
                        if edge <= r_min:
                            disk[k] = 0.0
                        elif edge >= r_max:
                            disk[k] = full
                        else:
                            disk[k] = sign * _poly_disk_area(px_, py_, m, edge)
                    for k in range(k0, k1 + 1):
                        acc[k] += disk[k + 1] - disk[k]
                for k in range(k0, k1 + 1):
                    if acc[k] > min_area:
                        out_bin[pos] = k * n_eta + e
                        out_area[pos] = acc[k]
                        pos += 1
        used[pix] = pos - start
    return p1, pos


# ------------------------------------------------------------------------------- python API
def _check_mask(mask: NDArray | None, params: Params) -> NDArray[np.bool_]:
    shape = (int(params.nr_pixels_z), int(params.nr_pixels_y))
    if mask is None:
        return np.zeros(shape, dtype=np.bool_)
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise FrameError(
            f"mask: shape {mask.shape} does not match NrPixelsZ×NrPixelsY = {shape} (raw frame)"
        )
    return np.ascontiguousarray(mask, dtype=np.bool_)


def binmap_key(params: Params, mask: NDArray | None = None) -> str:
    """Cache key of the map of ``params`` and ``mask``.

    SHA-256 hex over the map format version, ``params.geometry_key()`` and the mask bytes
    (shape included); ``mask=None`` and an all-False mask give the same key.
    """
    m = _check_mask(mask, params)
    h = hashlib.sha256()
    h.update(_FORMAT.encode())
    h.update(params.geometry_key().encode())
    h.update(repr(m.shape).encode())
    h.update(np.packbits(m).tobytes())
    return h.hexdigest()


def _in_row_bands(fn: Callable[..., None], n_rows: int, *args: Any, per_thread: int = 8) -> None:
    """``fn(z0, z1, *args)`` over bands of rows covering ``0..n_rows``, on
    ``numba.get_num_threads()`` threads (``fn`` must release the GIL), ``per_thread`` bands per
    thread (of at least 64 rows) so threads that finish early take the next band."""
    n_threads = max(1, numba.get_num_threads())
    n_bands = max(1, min(n_threads * per_thread, n_rows // 64))
    edges = np.linspace(0, n_rows, n_bands + 1).astype(int)
    with ThreadPoolExecutor(min(n_threads, n_bands)) as pool:
        list(pool.map(lambda z0, z1: fn(z0, z1, *args), edges[:-1], edges[1:]))


def _split_bands(shape: tuple[int, int], cx: NDArray, cy: NDArray, ceta: NDArray,
                 r_edges: NDArray, eta_edges: NDArray,
                 used: NDArray[np.int64]) -> tuple[NDArray[np.int32], NDArray[np.float64]]:
    """Every (pixel, bin) entry of the detector, pixel by pixel: :func:`_split_pixels` over bands
    of rows on threads, each band into buffers sized by the entries per pixel met so far, a
    full buffer continued in a new one. Returns the bins (int32) and areas of all entries in
    pixel order; ``used[p]`` (filled) counts pixel p's."""
    nz, ny = shape
    pieces: dict[int, list[tuple[NDArray, NDArray]]] = {}

    def band(z0: int, z1: int) -> None:
        p, stop = z0 * ny, z1 * ny
        out = pieces.setdefault(z0, [])
        per_pixel, done, entries, least = _ENTRIES_PER_PIXEL, 0, 0, 0
        while p < stop:
            size = max(int((stop - p) * per_pixel * 1.1) + 1024, least)
            out_bin, out_area = np.empty(size, dtype=np.int32), np.empty(size)
            p_next, n = _split_pixels(p, stop, cx, cy, ceta, r_edges, eta_edges, MIN_AREA_PX2,
                                      out_bin, out_area, used)
            out.append((out_bin[:n], out_area[:n]))
            least = 2 * size if p_next == p else 0  # one pixel's candidates did not fit
            done, entries, p = done + p_next - p, entries + n, p_next
            per_pixel = max(entries / max(done, 1), 0.1)

    _in_row_bands(band, nz)
    parts = [part for z0 in sorted(pieces) for part in pieces[z0]]
    if len(parts) == 1:
        return parts[0]
    return (np.concatenate([b for b, _ in parts]) if parts else np.empty(0, np.int32),
            np.concatenate([a for _, a in parts]) if parts else np.empty(0))


def _assemble(used: NDArray[np.int64], out_bin: NDArray[np.int32], out_area: NDArray[np.float64],
              masked: NDArray[np.bool_], corr: NDArray[np.float64], n_bins: int) -> tuple:
    """Bin-major CSR of the unmasked entries (pixels increasing within every bin) plus per-bin
    area sums and mask flags, from the pixel-ordered entries of :func:`_split_bands`.

    Returns indptr, indices, areas, weights (areas / corr of the pixel), bin_area (Σ unmasked
    areas), geometric (Σ all areas), touches (a masked pixel has an entry); every sum adds a
    bin's entries in increasing pixel order.
    """
    n_pix = used.size
    pix = np.repeat(np.arange(n_pix, dtype=np.int32 if n_pix < 2**31 else np.int64), used)
    geometric = np.bincount(out_bin, weights=out_area, minlength=n_bins)
    touches = np.zeros(n_bins, dtype=np.bool_)
    if masked.any():
        hidden = masked[pix]
        touches[out_bin[hidden]] = True
        keep = ~hidden
        out_bin, out_area, pix = out_bin[keep], out_area[keep], pix[keep]
    bin_area = np.bincount(out_bin, weights=out_area, minlength=n_bins)
    # a stable counting sort by bin (scipy's COO -> CSR), so pixels stay increasing in a bin
    csr = sp.csr_matrix((out_area, (out_bin, pix)), shape=(n_bins, n_pix))
    return (csr.indptr, csr.indices, csr.data, csr.data / corr[csr.indices], bin_area, geometric,
            touches)


def _corner_grid(params: Params) -> tuple[NDArray, NDArray, NDArray]:
    """Ideal-plane (X, Y) and η of every pixel corner, raw frame, shape (nz+1, ny+1)."""
    nz, ny = int(params.nr_pixels_z), int(params.nr_pixels_y)
    y = np.arange(ny + 1, dtype=np.float64) - 0.5
    z = np.arange(nz + 1, dtype=np.float64) - 0.5
    r_t, eta_t = np.empty((nz + 1, ny + 1)), np.empty((nz + 1, ny + 1))

    def band(z0: int, z1: int) -> None:  # element-wise numpy, which releases the GIL
        zt, yt = np.meshgrid(z[z0:z1], y, indexing="ij")
        r_t[z0:z1], eta_t[z0:z1] = pixel_to_r_eta(yt, zt, params)

    _in_row_bands(band, nz + 1, per_thread=1)
    # flipping/transposing the corner grid is the same permutation as for the image
    r = untransform_image(r_t, params.im_trans_opt)
    eta = np.ascontiguousarray(untransform_image(eta_t, params.im_trans_opt))
    eta_rad = np.deg2rad(eta)
    return np.ascontiguousarray(-r * np.sin(eta_rad)), np.ascontiguousarray(r * np.cos(eta_rad)), eta


def _correction(params: Params) -> NDArray[np.float64]:
    """Per raw pixel correction C of midas_parameters.md §6.2, flat (nz*ny,); all ones when both are off."""
    if not (params.solid_angle_correction or params.polarization_correction):
        return np.ones(int(params.nr_pixels_z) * int(params.nr_pixels_y))
    r_c, eta_c = pixel_map(params)
    corr = np.ones_like(r_c)
    tth = np.deg2rad(r_to_tth_deg(r_c, params))
    if params.solid_angle_correction:
        corr *= np.cos(tth) ** 3
    if params.polarization_correction:
        pol = 1.0 - params.polarization_fraction * np.sin(tth) ** 2 * np.cos(np.deg2rad(eta_c)) ** 2
        corr *= np.where(pol > 1e-6, pol, 1.0)
    return corr.ravel()


def build_binmap(params: Params, mask: NDArray | None = None) -> BinMap:
    """Build the exact pixel-splitting map of ``params`` (no cache).

    Parameters
    ----------
    params : Params
        Geometry (midas_parameters.md §4), binning (RMin/RMax/RBinSize, EtaMin/EtaMax/EtaBinSize) and corrections.
    mask : ndarray of bool, shape (nz, ny), optional
        Static mask in the RAW frame, True = masked.

    Returns
    -------
    BinMap
    """
    masked = _check_mask(mask, params)
    if params.eta_bin_deg > 360.0:
        raise ParameterError(f"{params.source}: key EtaBinSize: expected at most 360 degrees")
    r_edges = np.asarray(params.r_edges_px(), dtype=np.float64)
    eta_edges = np.asarray(params.eta_edges_deg(), dtype=np.float64)
    if eta_edges[0] < -540.0 or eta_edges[-1] > 540.0:
        # _eta_ranges tries the shifts 0, ±360, ±720, which reach bins inside ±540°
        raise ParameterError(
            f"{params.source}: keys EtaMin/EtaMax: expected η bin edges within ±540 degrees, "
            f"got {eta_edges[0]}..{eta_edges[-1]}"
        )
    n_r, n_eta = r_edges.size - 1, eta_edges.size - 1
    n_bins = n_r * n_eta
    if n_bins >= 2**31:
        raise ParameterError(f"{params.source}: keys RBinSize/EtaBinSize: {n_bins} bins, expected < 2^31")
    if masked.size >= 2**31:
        raise ParameterError(f"{params.source}: keys NrPixelsY/NrPixelsZ: expected < 2^31 pixels")
    cx, cy, ceta = _corner_grid(params)
    used = np.empty(masked.size, dtype=np.int64)
    out_bin, out_area = _split_bands(masked.shape, cx, cy, ceta, r_edges, eta_edges, used)
    del ceta
    indptr, indices, areas, weights, bin_area, geometric, touches = _assemble(
        used, out_bin, out_area, masked.ravel(), _correction(params), n_bins
    )
    shape = (n_bins, masked.size)
    # one index dtype for indptr and indices, so scipy does not copy them
    indptr = indptr.astype(np.int32) if indptr[-1] < 2**31 else indptr
    indices = indices if indptr.dtype == np.int32 else indices.astype(np.int64)
    area_map = sp.csr_matrix((areas, indices, indptr), shape=shape)
    return BinMap(
        n_r=n_r,
        n_eta=n_eta,
        detector_shape=masked.shape,
        r_edges_px=r_edges,
        eta_edges_deg=eta_edges,
        weights=sp.csr_matrix((weights, indices, indptr), shape=shape),
        areas=area_map,
        bin_area=bin_area.reshape(n_r, n_eta),
        geometric_area=geometric.reshape(n_r, n_eta),
        touches_mask=touches.reshape(n_r, n_eta),
        effective_tth_deg=_effective_tth_deg(area_map, bin_area, pixel_mean_tth_deg(params, (cx, cy))
                                             ).reshape(n_r, n_eta),
        key=binmap_key(params, masked),
    )


#: Offset (px) of the 2 × 2 Gauss–Legendre nodes from a pixel's centre along y and z: the rule
#: integrates every cubic in (y, z) exactly, so a pixel's mean 2θ is exact to O(R⁻³) px
#: (the leading term, 1/(24 R) px above the centre's R, is quadratic).
_GAUSS_OFFSET_PX = 0.5 / np.sqrt(3.0)


def pixel_mean_tth_deg(params: Params, corners: tuple[NDArray, NDArray] | None = None
                       ) -> NDArray[np.float64]:
    """Mean 2θ (deg) over the area of every RAW pixel, shape (nz, ny).

    A pixel's value is its intensity integrated over its area, so for an intensity locally
    linear in 2θ it is the intensity at this mean, not at the pixel centre's 2θ. Computed with
    the 2 × 2 Gauss–Legendre rule on the detector pixel; each node's ideal-plane position is
    interpolated bilinearly between the pixel's four corners as the full geometry maps them
    (:func:`midasflow.geometry.pixel_to_r_eta`: tilts, distortion, parallax), whose curvature
    over one pixel is negligible (it is the map's own straight-edged pixel).

    Parameters
    ----------
    params : Params
    corners : (ndarray, ndarray), optional
        The ideal-plane (X, Y) of every pixel corner, shape (nz+1, ny+1), raw frame, if already
        computed (:func:`build_binmap` has them).
    """
    cx, cy = corners if corners is not None else _corner_grid(params)[:2]
    nz, ny = cx.shape[0] - 1, cx.shape[1] - 1
    mean_t = np.empty((nz, ny))
    lo, hi = 0.5 - _GAUSS_OFFSET_PX, 0.5 + _GAUSS_OFFSET_PX

    def band(z0: int, z1: int) -> None:  # element-wise numpy, which releases the GIL
        acc = np.zeros((z1 - z0, ny))
        for a in (lo, hi):  # along z (rows)
            edge_x = (1 - a) * cx[z0:z1] + a * cx[z0 + 1:z1 + 1]
            edge_y = (1 - a) * cy[z0:z1] + a * cy[z0 + 1:z1 + 1]
            for b in (lo, hi):  # along y (columns)
                r = np.hypot((1 - b) * edge_x[:, :-1] + b * edge_x[:, 1:],
                             (1 - b) * edge_y[:, :-1] + b * edge_y[:, 1:])
                acc += r_to_tth_deg(r, params)
        mean_t[z0:z1] = 0.25 * acc

    _in_row_bands(band, nz)
    return mean_t


def _effective_tth_deg(area_map: sp.csr_matrix, bin_area: NDArray[np.float64],
                       pixel_tth_deg: NDArray[np.float64]) -> NDArray[np.float64]:
    """Σ area·(pixel mean 2θ) / bin area of every bin (flat), NaN where the bin area is 0, from
    the pixels' mean 2θ (:func:`pixel_mean_tth_deg`)."""
    sums = area_map @ pixel_tth_deg.ravel()
    out = np.full(bin_area.shape, np.nan)
    np.divide(sums, bin_area, out=out, where=bin_area > 0)
    return out


def effective_tth_deg_without(binmap: BinMap, params: Params, excluded: NDArray[np.bool_]
                              ) -> NDArray[np.float64]:
    """The bins' effective 2θ (deg), shape (n_r, n_eta), in frames where the pixels ``excluded``
    have no value (NaN: detector flags such as a Pilatus's −1 gaps) besides the map's mask.

    A bin such a pixel overlaps samples only its other pixels, so its effective 2θ is
    Σ area·(pixel mean 2θ) / Σ area over those. Bins no excluded pixel overlaps, and bins left
    with no area (their value is NaN or 0), keep ``binmap.effective_tth_deg`` bit for bit.

    Parameters
    ----------
    binmap : BinMap
        The map of ``params`` (its static mask is already left out).
    params : Params
        The geometry the map was built from (for the pixels' mean 2θ, computed once per map:
        :func:`cached_pixel_mean_tth_deg`).
    excluded : ndarray of bool, shape (nz, ny)
        RAW frame, True = no value.
    """
    excluded = np.asarray(excluded, dtype=bool)
    if excluded.shape != tuple(binmap.detector_shape):
        raise ValueError(f"excluded: expected shape {tuple(binmap.detector_shape)}, got {excluded.shape}")
    hidden = excluded.ravel().astype(np.float64)
    touched = (binmap.areas @ hidden) > 0
    if not touched.any():
        return binmap.effective_tth_deg
    rows = binmap.areas[np.flatnonzero(touched)]
    kept = 1.0 - hidden
    area = rows @ kept
    sums = rows @ (cached_pixel_mean_tth_deg(binmap, params).ravel() * kept)
    out = binmap.effective_tth_deg.ravel().copy()
    changed = np.flatnonzero(touched)[area > 0]
    out[changed] = sums[area > 0] / area[area > 0]
    return out.reshape(binmap.n_r, binmap.n_eta)


#: Format of a map's cached pixel mean 2θ (``<map key>.pixel-tth.npz`` beside the map's file).
_PIXEL_TTH_FORMAT = "midasflow-pixel-tth-v1"
#: Largest difference (deg) allowed between a map's effective 2θ and the one its pixel means give.
_PIXEL_TTH_ATOL_DEG = 1e-9
#: The pixels' mean 2θ of the maps alive in this process (computed or loaded once per map).
_PIXEL_TTH: weakref.WeakKeyDictionary[BinMap, NDArray[np.float64]] = weakref.WeakKeyDictionary()
_PIXEL_TTH_LOCK = threading.Lock()


def cached_pixel_mean_tth_deg(binmap: BinMap, params: Params) -> NDArray[np.float64]:
    """:func:`pixel_mean_tth_deg` (deg, shape (nz, ny), read-only) of the map's geometry,
    computed once per map: kept with the map in this process and, for a map from the cache,
    in the cache beside its file (``<key>.pixel-tth.npz``, 8 bytes a pixel).

    Nothing read back is trusted: the file is read without unpickling and used only if its
    SHA-256 content digest, the map's key, its shape and dtype match and its values, summed
    over every bin with the map's areas, give the map's own (digest-checked)
    ``effective_tth_deg`` within 1e-9°; a file that fails is recomputed and replaced, with a
    warning. A cache folder that cannot be written to only costs the recomputation (warned).

    Parameters
    ----------
    binmap : BinMap
    params : Params
        The geometry the map was built from.

    Raises
    ------
    ValueError
        ``params`` are not the map's geometry (their pixel means do not give its effective 2θ).
    """
    with _PIXEL_TTH_LOCK:
        tth = _PIXEL_TTH.get(binmap)
    if tth is not None:
        return tth
    path = (None if binmap.cache_file is None
            else Path(binmap.cache_file).with_name(f"{binmap.key}.pixel-tth.npz"))
    if path is not None and path.exists():
        try:
            tth = _load_pixel_tth(path, binmap)
        except ValueError as exc:
            warnings.warn(f"{path}: cached pixel 2θ rejected, {exc}; recomputing it", stacklevel=2)
    if tth is None:
        tth = pixel_mean_tth_deg(params)
        problem = _pixel_tth_problem(binmap, tth)
        if problem:
            raise ValueError(f"{params.source}: the parameters are not the bin map's geometry ({problem})")
        if path is not None:
            try:
                with atomic_output(path) as tmp, open(tmp, "wb") as fh:
                    np.savez(fh, key=np.array(binmap.key), digest=np.array(_pixel_tth_digest(binmap.key, tth)),
                             pixel_tth_deg=tth)
            except OSError as exc:
                warnings.warn(f"{path}: pixel 2θ not cached ({exc}); it is recomputed next time", stacklevel=2)
    tth.flags.writeable = False
    with _PIXEL_TTH_LOCK:
        return _PIXEL_TTH.setdefault(binmap, tth)


def _pixel_tth_digest(key: str, tth: NDArray[np.float64]) -> str:
    """SHA-256 hex over the format, the map's key and the array's dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(_PIXEL_TTH_FORMAT.encode())
    h.update(key.encode())
    a = np.ascontiguousarray(tth)
    h.update(f"{a.dtype.str}:{a.shape}".encode())
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _pixel_tth_problem(binmap: BinMap, tth: NDArray) -> str:
    """Why ``tth`` cannot be the pixel mean 2θ of ``binmap``'s geometry ("" when it can)."""
    if tth.dtype != np.float64 or tth.shape != tuple(binmap.detector_shape):
        return f"expected float64 of shape {tuple(binmap.detector_shape)}, got {tth.dtype} {tth.shape}"
    flat = binmap.bin_area.ravel()
    again = _effective_tth_deg(binmap.areas, flat, tth).reshape(binmap.n_r, binmap.n_eta)
    if not np.allclose(again, binmap.effective_tth_deg, rtol=0, atol=_PIXEL_TTH_ATOL_DEG, equal_nan=True):
        return "its values do not give the map's effective 2θ"
    return ""


def _load_pixel_tth(path: Path, binmap: BinMap) -> NDArray[np.float64]:
    """The pixel mean 2θ cached at ``path`` for ``binmap``, checked (ValueError saying why not)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("key", "digest", "pixel_tth_deg") if k not in f.files]
            if missing:
                raise ValueError(f"member {missing[0]!r} missing")
            key, digest, tth = f["key"], f["digest"], f["pixel_tth_deg"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"unreadable ({exc})") from None
    if key.dtype.kind != "U" or str(key) != binmap.key:
        raise ValueError("made for another bin map (key differs)")
    if digest.dtype.kind != "U" or str(digest) != _pixel_tth_digest(binmap.key, tth):
        raise ValueError("content does not match its digest")
    problem = _pixel_tth_problem(binmap, tth)
    if problem:
        raise ValueError(problem)
    return tth


def _default_cache_dir() -> Path:
    env = os.environ.get("MIDASFLOW_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "midasflow" / "binmaps"


#: The arrays of a cached map, in the order the digest covers them.
_ARRAYS = ("detector_shape", "r_edges_px", "eta_edges_deg", "indptr", "indices", "weights", "areas",
           "bin_area", "geometric_area", "touches_mask", "effective_tth_deg")


def _arrays(bm: BinMap) -> dict[str, np.ndarray]:
    return {
        "detector_shape": np.array(bm.detector_shape, dtype=np.int64),
        "r_edges_px": bm.r_edges_px,
        "eta_edges_deg": bm.eta_edges_deg,
        "indptr": bm.weights.indptr,
        "indices": bm.weights.indices,
        "weights": bm.weights.data,
        "areas": bm.areas.data,
        "bin_area": bm.bin_area,
        "geometric_area": bm.geometric_area,
        "touches_mask": bm.touches_mask,
        "effective_tth_deg": bm.effective_tth_deg,
    }


def _digest(key: str, arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 hex over the format, the key and every array's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(_FORMAT.encode())
    h.update(key.encode())
    for name in _ARRAYS:
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _check_arrays(n_r: int, n_eta: int, arrays: dict[str, np.ndarray]) -> None:
    """The checks of :func:`check_binmap` on the arrays of a map (as :func:`_arrays` names them)."""
    det = np.asarray(arrays["detector_shape"])
    if det.shape != (2,) or det.dtype.kind not in "iu" or (det < 1).any():
        raise ValueError(f"detector_shape {det}: expected two positive sizes")
    for name, n in (("r_edges_px", n_r), ("eta_edges_deg", n_eta)):
        edges = arrays[name]
        if not (edges.dtype == np.float64 and edges.ndim == 1 and edges.size == n + 1 and n >= 1):
            raise ValueError(f"{name}: expected {n + 1} float64 bin edges")
        if not (np.isfinite(edges).all() and (np.diff(edges) > 0).all()):
            raise ValueError(f"{name}: expected finite, increasing bin edges")
    n_bins, n_pix = n_r * n_eta, int(det[0]) * int(det[1])
    indptr, indices = arrays["indptr"], arrays["indices"]
    if indices.dtype not in (np.int32, np.int64) or indptr.dtype != indices.dtype \
            or indices.ndim != 1 or indptr.ndim != 1:
        raise ValueError("indptr/indices: expected 1-D arrays of one index dtype, int32 or int64")
    nnz = indices.size
    if indptr.size != n_bins + 1 or indptr[0] != 0 or indptr[-1] != nnz:
        raise ValueError(f"indptr: expected {n_bins + 1} row pointers from 0 to {nnz} entries")
    if (np.diff(indptr) < 0).any():
        raise ValueError("indptr: row pointers decrease")
    if nnz and (indices.min() < 0 or indices.max() >= n_pix):
        raise ValueError(f"indices: pixel index outside 0..{n_pix - 1}")
    weights, areas = arrays["weights"], arrays["areas"]
    for name, values in (("weights", weights), ("areas", areas)):
        if values.dtype != np.float64 or values.shape != (nnz,):
            raise ValueError(f"{name}: expected {nnz} float64 values, one per entry")
        if not np.isfinite(values).all():
            raise ValueError(f"{name}: expected finite values")
    if nnz and (areas.min() < 0 or (weights < areas * (1 - 1e-12)).any()):
        raise ValueError("weights/areas: expected areas >= 0 and weights >= areas")
    for name in ("bin_area", "geometric_area", "touches_mask", "effective_tth_deg"):
        a = arrays[name]
        dtype = np.bool_ if name == "touches_mask" else np.float64
        if not (a.shape == (n_r, n_eta) and a.dtype == dtype):
            raise ValueError(f"{name}: expected a {np.dtype(dtype)} array of shape {(n_r, n_eta)}")
    rows = np.zeros(n_bins)
    nonempty = np.flatnonzero(np.diff(indptr))
    if nonempty.size:
        rows[nonempty] = np.add.reduceat(areas, indptr[nonempty])
    if not np.allclose(rows, arrays["bin_area"].ravel(), rtol=1e-9, atol=1e-12):
        raise ValueError("bin_area: expected the row sums of areas")
    if not (arrays["geometric_area"] >= arrays["bin_area"] * (1 - 1e-9) - 1e-12).all():
        raise ValueError("geometric_area: expected at least bin_area")
    tth, collects = arrays["effective_tth_deg"], arrays["bin_area"] > 0
    if not (np.isfinite(tth) == collects).all() or (tth[collects] < 0).any() \
            or (tth[collects] >= 180).any():
        raise ValueError("effective_tth_deg: expected a 2θ in [0, 180) degrees exactly where "
                         "bin_area > 0, NaN elsewhere")


def check_binmap(bm: BinMap) -> None:
    """Check that a map is consistent, so the caking kernels can never read or write out of bounds.

    Checks shapes and dtypes, bin edges (finite, increasing), the CSR structure (row pointers
    from 0, non-decreasing, ending at the entry count; pixel indices inside the detector; ``areas``
    sharing the sparsity of ``weights``), finite non-negative areas and weights, weights at least
    the areas (the corrections only divide by factors <= 1), and ``bin_area`` equal to the row
    sums of ``areas``. Weights scaled consistently are not caught here; the digest of a cached
    map catches those (:func:`load_or_build_binmap`).

    Raises
    ------
    ValueError
        One line naming the first inconsistency found.
    """
    W, A = bm.weights, bm.areas
    shape = (bm.n_r * bm.n_eta, int(np.prod(bm.detector_shape)))
    for name, m in (("weights", W), ("areas", A)):
        if not (sp.issparse(m) and m.format == "csr" and m.shape == shape):
            raise ValueError(f"{name}: expected a CSR matrix of shape {shape}")
    if not (A.indptr is W.indptr or np.array_equal(A.indptr, W.indptr)) or not (
            A.indices is W.indices or np.array_equal(A.indices, W.indices)):
        raise ValueError("areas: expected the sparsity pattern of weights")
    arrays = _arrays(bm)
    for name in ("bin_area", "geometric_area", "touches_mask", "effective_tth_deg"):
        arrays[name] = np.asarray(arrays[name])
    _check_arrays(int(bm.n_r), int(bm.n_eta), arrays)


def _save(bm: BinMap, path: Path) -> BinMap:
    """Write ``bm`` to ``path`` atomically; return it with its ``digest`` and ``cache_file``."""
    arrays = _arrays(bm)
    digest = _digest(bm.key, arrays)
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, key=np.array(bm.key), digest=np.array(digest), **arrays)
    return _remember(dataclasses.replace(bm, digest=digest, cache_file=str(path.resolve())))


#: Maps with a digest alive in this process, so loading one by digest never reads it twice.
_LIVE: weakref.WeakValueDictionary[str, BinMap] = weakref.WeakValueDictionary()


def _remember(bm: BinMap) -> BinMap:
    if bm.digest is not None:
        _LIVE.setdefault(bm.digest, bm)
    return bm


def _load_file(path: Path, key: str, digest: str | None = None) -> BinMap:
    """The map stored at ``path``, checked against its own digest (and ``digest`` when given),
    ``key`` and :func:`check_binmap`.

    Raises
    ------
    ValueError
        One line saying why the file is unusable.
    """
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("key", "digest", *_ARRAYS) if k not in f.files]
            if missing:
                raise ValueError(f"member {missing[0]!r} missing")
            arrays = {name: f[name] for name in _ARRAYS}
            stored_key, stored_digest = f["key"], f["digest"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"unreadable ({exc})") from None
    if stored_key.dtype.kind != "U" or str(stored_key) != key:
        raise ValueError("made for other parameters (key differs)")
    actual = _digest(key, arrays)
    if stored_digest.dtype.kind != "U" or str(stored_digest) != actual:
        raise ValueError("content does not match its digest")
    if digest is not None and actual != digest:
        raise ValueError("content differs from the map the task graph was built with")
    r_edges, eta_edges = arrays["r_edges_px"], arrays["eta_edges_deg"]
    n_r, n_eta = r_edges.size - 1, eta_edges.size - 1
    _check_arrays(n_r, n_eta, arrays)
    nz, ny = (int(v) for v in arrays["detector_shape"])
    shape = (n_r * n_eta, nz * ny)
    indptr, indices = arrays["indptr"], arrays["indices"]
    return _remember(BinMap(
        n_r=n_r,
        n_eta=n_eta,
        detector_shape=(nz, ny),
        r_edges_px=r_edges,
        eta_edges_deg=eta_edges,
        weights=sp.csr_matrix((arrays["weights"], indices, indptr), shape=shape, copy=False),
        areas=sp.csr_matrix((arrays["areas"], indices, indptr), shape=shape, copy=False),
        bin_area=arrays["bin_area"],
        geometric_area=arrays["geometric_area"],
        touches_mask=arrays["touches_mask"],
        effective_tth_deg=arrays["effective_tth_deg"],
        key=key,
        digest=actual,
        cache_file=str(path.resolve()),
    ))


def _load(path: Path, params: Params, key: str) -> BinMap:
    """The map cached at ``path`` for ``params``, validated (ValueError saying why not)."""
    bm = _load_file(path, key)
    expected = (int(params.nr_pixels_z), int(params.nr_pixels_y))
    if bm.detector_shape != expected:
        raise ValueError(f"detector_shape: expected {expected}")
    if not (np.array_equal(bm.r_edges_px, params.r_edges_px())
            and np.array_equal(bm.eta_edges_deg, params.eta_edges_deg())):
        raise ValueError("bin edges differ from the parameters'")
    return bm


def cached_binmap(cache_file: str, key: str, digest: str) -> BinMap:
    """The map of content ``digest``: the one alive in this process, else loaded from its cache
    file (checked as on every load). This is the bin map's task in the caking graphs, so every
    Dask worker reads it from the cache instead of receiving it from the client.

    Raises
    ------
    MidasflowError
        The file is missing, unreadable or does not hold that content (one line).
    """
    bm = _LIVE.get(digest)
    if bm is not None:
        return bm
    try:
        return _load_file(Path(cache_file), key, digest)
    except ValueError as exc:
        raise MidasflowError(
            f"{cache_file}: bin map cache {exc}; the cache folder (cache_dir or "
            "$MIDASFLOW_CACHE) must be the same for every Dask worker") from None


def load_or_build_binmap(
    params: Params, mask: NDArray | None = None, cache_dir: str | os.PathLike | None = None, *,
    max_bins: int = MAX_BINS, max_map_entries: int = MAX_MAP_ENTRIES,
) -> BinMap:
    """The map of ``params`` and ``mask``, from the cache when present, else built and cached.

    Parameters
    ----------
    params : Params
    mask : ndarray of bool, shape (nz, ny), optional
        Static mask in the RAW frame, True = masked.
    cache_dir : path, optional
        Directory of ``<key>.npz`` files; default ``$MIDASFLOW_CACHE`` or
        ``~/.cache/midasflow/binmaps``. Files are written under a temporary name and renamed,
        so concurrent builders never see a partial file. Nothing in them is trusted: they are
        read without unpickling, their SHA-256 content digest (stored in the file) is checked,
        and so are the parameters they were made for and :func:`check_binmap`; a file that fails
        is rebuilt and replaced, with a warning.

    max_bins, max_map_entries : int
        Limits checked before a map is built (:func:`midasflow.limits.check_binning`).

    Returns
    -------
    BinMap

    Raises
    ------
    ParameterError
        The binning asks for more bins or map entries than the limits, before any allocation.
    """
    check_binning(params, max_bins=max_bins, max_map_entries=max_map_entries)
    key = binmap_key(params, mask)
    path = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    path = path / f"{key}.npz"
    if path.exists():
        try:
            return _load(path, params, key)
        except ValueError as exc:
            warnings.warn(f"{path}: cached bin map rejected, {exc}; rebuilding it", stacklevel=2)
    return _save(build_binmap(params, mask), path)
