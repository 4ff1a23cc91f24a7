"""Small detectors, maps and frames shared by the caking and store tests (fixtures in conftest.py)."""
from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr

from midasflow.params import Params


def small_params(**over) -> Params:
    """48 x 40 pixel detector, off-centre beam, 1 m, 200 µm pixels, 0.75 px x 45° bins, with
    solid-angle + polarisation corrections so weights differ from areas."""
    base = dict(nr_pixels_y=40, nr_pixels_z=48, px_um=200.0, lsd_um=1.0e6, bc_y_px=19.3,
                bc_z_px=23.6, r_min_px=2.0, r_max_px=20.0, r_bin_px=0.75, eta_bin_deg=45.0,
                omega_start_deg=10.0, omega_step_deg=0.25, wavelength_a=0.2,
                solid_angle_correction=True, polarization_correction=True)
    base.update(over)
    return Params(**base)


def _random_block(block_info=None, *, seed: int, nan_every: int):
    """Frames of one chunk, reproducible per absolute frame index (so any chunking gives the same
    frames); every ``nan_every``-th frame has a NaN stripe."""
    (lo, hi), (_, nz), (_, ny) = block_info[None]["array-location"]
    out = np.empty((hi - lo, nz, ny), dtype=np.float32)
    for k, i in enumerate(range(lo, hi)):
        rng = np.random.default_rng([seed, i])
        out[k] = rng.gamma(2.0, 50.0, size=(nz, ny))
        if nan_every and i % nan_every == 0:
            out[k, 5 + i % 7, 3:25] = np.nan
    return out


def lazy_frames(params: Params, n: int, chunks=4, *, seed: int = 7, nan_every: int = 3
                ) -> xr.DataArray:
    """A lazy (frame, z, y) float32 DataArray like ``open_frames`` returns."""
    shape = (n, params.nr_pixels_z, params.nr_pixels_y)
    data = da.map_blocks(_random_block, chunks=da.core.normalize_chunks((chunks, -1, -1), shape),
                         dtype=np.float32, meta=np.empty((0, 0, 0), np.float32), seed=seed,
                         nan_every=nan_every)
    omega = params.omega_start_deg + params.omega_step_deg * np.arange(n)
    return xr.DataArray(data, dims=("frame", "z", "y"),
                        coords={"frame": np.arange(n), "omega": ("frame", omega)})


def dead_rows_and_column(params: Params) -> np.ndarray:
    """A static mask (True = masked) for ``params``' detector: a dead row pair, so some bins lose
    part of their area, and a dead column."""
    mask = np.zeros((params.nr_pixels_z, params.nr_pixels_y), dtype=bool)
    mask[30:32, :] = True
    mask[:, 8] = True
    return mask


def noisy_frames(params: Params, n: int = 5, seed: int = 1) -> np.ndarray:
    """(n, nz, ny) float64 gamma-distributed frames with per-frame NaN stripes in frames 1 and 3."""
    rng = np.random.default_rng(seed)
    f = rng.gamma(2.0, 40.0, size=(n, params.nr_pixels_z, params.nr_pixels_y))
    f[1, 10:12, 4:30] = np.nan  # per-frame NaN stripe
    f[3, 20:40, 17] = np.nan
    return f
