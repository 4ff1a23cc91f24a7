"""Size limits checked before memory is spent: bins, bin-map entries, reflections, declared arrays.

A parameter file, a CIF or a store can ask for more than any machine holds (``RBinSize 1e-8``, a
P1 cell with a = 100 Å, a ``.zarray`` declaring 10¹² elements, a compressed chunk that expands
a thousandfold). Each is refused here with one line naming the input, what it asks for and the
limit, before anything is allocated. The defaults are far above any real measurement; the
commands' ``--max-bins``, ``--max-map-entries`` and ``--max-reflections`` raise them.

Pure Python and numpy (no dask, no I/O).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from midasflow.errors import ParameterError

if TYPE_CHECKING:
    from midasflow.crystal import Phase
    from midasflow.params import Params

#: Caked bins (R × η) of one scan: 2²⁵ ≈ 33.5 M, i.e. 268 MB per float64 cake.
MAX_BINS = 2**25
#: (pixel, bin) pairs of the bin map, estimated from the binning before it is built: 2²⁸ ≈ 268 M
#: (≈ 8 GB while it is built). A 2048² detector at RBinSize 0.25 px, EtaBinSize 1° needs ≈ 50 M.
MAX_MAP_ENTRIES = 2**28
#: Unique reflections of one phase inside the refined 2θ range. The engine holds a few dense
#: (reflections × points) arrays per lineout: ~85 kB per reflection for a 456-point lineout
#: (P1, a = 12 Å, 5 500 reflections: 760 MB RSS), so 20 000 is ~2 GB per worker. A 25 Å cubic
#: cell at d = 0.5 Å has ≈ 11 000 before absences; P1 with a = 100 Å at d = 0.88 Å, ≈ 6 million.
MAX_REFLECTIONS = 20_000
#: Bytes of one array (or chunk) read whole from a store: 2 GiB, blosc's own limit.
MAX_ARRAY_BYTES = 2**31
#: Frames of one scan (the lazy graph holds one entry per chunk of them).
MAX_FRAMES = 10**7
#: Detector pixels (NrPixelsY × NrPixelsZ): 2³² is a 65536 × 65536 detector.
MAX_DETECTOR_PIXELS = 2**32


def estimate_map_entries(params: Params) -> float:
    """Estimated (pixel, bin) pairs of the bin map of ``params`` (within a factor of ~2).

    A pixel at radius R (pixels) spans about 1.5 px radially and 1.5/R rad azimuthally, so it
    is split into about (1 + 1.5/RBinSize)·(1 + 1.5·(180/π)/(R·EtaBinSize)) bins; the pixels'
    radii are sampled on a grid of at most ~2²⁰ detector points (beam centre, no tilt: the
    estimate only has to catch binnings that are orders of magnitude too fine).
    """
    nz, ny = int(params.nr_pixels_z), int(params.nr_pixels_y)
    step = max(1, int(math.ceil(math.sqrt(nz * ny / 2**20))))
    z = np.arange(0, nz, step, dtype=np.float64) - float(params.bc_z_px)
    y = np.arange(0, ny, step, dtype=np.float64) - float(params.bc_y_px)
    r = np.hypot(z[:, None], y[None, :]).ravel()
    r = r[(r >= params.r_min_px - 1.0) & (r <= params.r_max_px + 1.0)]
    if r.size == 0:
        return 0.0
    eta_span = max(min(params.eta_max_deg - params.eta_min_deg, 360.0), params.eta_bin_deg)
    per_pixel = (1.0 + 1.5 / params.r_bin_px) * (
        1.0 + np.minimum(1.5 * (180.0 / math.pi) / np.maximum(r, 0.5), eta_span) / params.eta_bin_deg)
    return float(per_pixel.sum()) * step * step


def check_binning(params: Params, *, max_bins: int = MAX_BINS,
                  max_map_entries: int = MAX_MAP_ENTRIES) -> None:
    """Refuse a binning whose cake or bin map would not fit, before either is allocated.

    Raises
    ------
    ParameterError
        More than :data:`MAX_DETECTOR_PIXELS` pixels, n_r × n_eta > ``max_bins`` (naming
        RBinSize, EtaBinSize and ``--max-bins``), or the estimated map entries
        (:func:`estimate_map_entries`) > ``max_map_entries``.
    """
    pixels = float(params.nr_pixels_y) * float(params.nr_pixels_z)
    if pixels > MAX_DETECTOR_PIXELS:
        raise ParameterError(f"{params.source}: keys NrPixelsY/NrPixelsZ: {params.nr_pixels_y} × "
                             f"{params.nr_pixels_z} pixels, expected at most {MAX_DETECTOR_PIXELS}")
    n_r = (params.r_max_px - params.r_min_px) / params.r_bin_px  # floats: 1e-300 bins never overflow
    n_eta = (params.eta_max_deg - params.eta_min_deg) / params.eta_bin_deg
    if n_r * n_eta > max_bins:
        raise ParameterError(
            f"{params.source}: keys RBinSize {params.r_bin_px:g}, EtaBinSize {params.eta_bin_deg:g}: "
            f"{n_r:.3g} × {n_eta:.3g} = {n_r * n_eta:.3g} bins, expected at most {max_bins} "
            "(--max-bins raises the limit)")
    entries = estimate_map_entries(params)
    if entries > max_map_entries:
        raise ParameterError(
            f"{params.source}: keys RBinSize {params.r_bin_px:g}, EtaBinSize {params.eta_bin_deg:g}: "
            f"pixels split into ~{entries:.3g} bin pieces, expected at most {max_map_entries} "
            "(--max-map-entries raises the limit)")


def laue_order(phase: Phase) -> int:
    """Number of distinct rotations of the phase's Laue group (2 for -1, 48 for m-3m)."""
    from midasflow.crystal import laue_rotations

    return int(np.unique(laue_rotations(phase.space_group).reshape(-1, 9), axis=0).shape[0])


def estimate_reflections(phase: Phase, wavelength_a: float, tth_min_deg: float,
                         tth_max_deg: float) -> float:
    """Unique reflections of ``phase`` with 2θ in the range: reciprocal-lattice points in the
    shell, (4π/3)·V·(1/d_min³ − 1/d_max³), over the Laue group's order."""
    from midasflow.crystal import cell_volume

    def inv_d(tth_deg: float) -> float:
        return 2.0 * math.sin(math.radians(min(max(tth_deg, 0.0), 179.0)) / 2.0) / wavelength_a

    shell = 4.0 * math.pi / 3.0 * cell_volume(phase.cell) * (inv_d(tth_max_deg) ** 3 - inv_d(tth_min_deg) ** 3)
    return shell / laue_order(phase)


def check_reflections(phases: Sequence[Phase], wavelength_a: float, tth_min_deg: float,
                      tth_max_deg: float, *, max_reflections: int = MAX_REFLECTIONS) -> None:
    """Refuse a phase with more unique reflections in the refined range than ``max_reflections``.

    Raises
    ------
    ParameterError
        Naming the phase, its cell, the estimate and ``--max-reflections``.
    """
    for phase in phases:
        n = estimate_reflections(phase, wavelength_a, tth_min_deg, tth_max_deg)
        if n > max_reflections:
            cell = " ".join(f"{v:g}" for v in phase.cell)
            raise ParameterError(
                f"phase {phase.name} (cell {cell}, Laue {phase.laue}): ~{n:.3g} unique reflections "
                f"at 2θ {tth_min_deg:.4g}–{tth_max_deg:.4g}° (λ {wavelength_a:g} Å), expected at most "
                f"{max_reflections} (--max-reflections raises the limit; --limits narrows the range)")


def check_array_size(shape: Sequence[int], itemsize: int, what: str, *,
                     max_bytes: int = MAX_ARRAY_BYTES) -> int:
    """Bytes of an array declared by a file; refuse a negative shape or more than ``max_bytes``.

    Returns
    -------
    int
        prod(shape) · itemsize.

    Raises
    ------
    ValueError
        Saying what is wrong; callers turn it into their one-line error naming the file.
    """
    if any(int(n) < 0 for n in shape):
        raise ValueError(f"{what} declares the shape {tuple(shape)}")
    nbytes = math.prod(int(n) for n in shape) * int(itemsize)
    if nbytes > max_bytes:
        raise ValueError(f"{what} declares shape {tuple(int(n) for n in shape)} ({nbytes:.3g} bytes), "
                         f"expected at most {max_bytes} bytes")
    return nbytes
