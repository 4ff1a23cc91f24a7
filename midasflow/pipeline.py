"""The dataflows behind the commands: ``integrate`` (frames → caked store), ``refine`` and ``run``.

Everything here is orchestration: each step is a function of another module, wired into one lazy
Dask graph that the caller's scheduler (threaded by default, or a ``distributed.Client``)
executes when a store is written.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import xarray as xr

from midasflow.params import Params, read_params

log = logging.getLogger(__name__)

_COMPRESSION_SUFFIXES = (".bz2", ".gz")


def scan_stem(data_fn: str | Path) -> str:
    """Output stem of a scan: the first data file's name without its format extension.

    ``scan_000001.h5`` → ``scan_000001``; ``ff_000123.ge3`` → ``ff_000123``.
    """
    name = Path(data_fn).name
    for suffix in _COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return re.sub(r"\.[^.]+$", "", name) or name


def integrate_dataset(
    data_fn: str | Path,
    params: Params,
    *,
    dark_fn: str | Path | None = None,
    data_loc: str = "exchange/data",
    dark_loc: str = "exchange/dark",
    start_file_nr: int | None = None,
    end_file_nr: int | None = None,
    cache_dir: str | Path | None = None,
) -> xr.Dataset:
    """Open the frames and cake them: the lazy caked Dataset (nothing is computed).

    Parameters
    ----------
    data_fn : path
        First data file of the scan (HDF5/NeXus, GE, TIFF, CBF/EDF or zarr).
    params : Params
        Geometry, binning and frame parameters.
    dark_fn, data_loc, dark_loc, start_file_nr, end_file_nr
        As the MIDAS ``integrator.py`` flags of the same names.
    cache_dir : path, optional
        Where bin maps are cached (default ``~/.cache/midasflow/binmaps``).
    """
    from midasflow.binmap import load_or_build_binmap
    from midasflow.cake import cake
    from midasflow.io.frames import open_frames
    from midasflow.io.mask import read_mask

    frames = open_frames(
        data_fn,
        params,
        dark_fn=dark_fn,
        data_loc=data_loc,
        dark_loc=dark_loc,
        start_file_nr=start_file_nr,
        end_file_nr=end_file_nr,
    )
    mask = None
    if params.mask_file:
        mask = read_mask(params.mask_file, (params.nr_pixels_z, params.nr_pixels_y))
    binmap = load_or_build_binmap(params, mask, cache_dir)
    return cake(frames, params, binmap=binmap)


def integrate(
    param_fn: str | Path,
    data_fn: str | Path,
    *,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    result_folder: str | Path = ".",
    dark_fn: str | Path | None = None,
    data_loc: str = "exchange/data",
    dark_loc: str = "exchange/dark",
    start_file_nr: int | None = None,
    end_file_nr: int | None = None,
    cache_dir: str | Path | None = None,
    plain_zarr: bool = False,
) -> Path:
    """Integrate one scan to ``<result_folder>/<scan>.zarr.zip`` (MIDAS layout) and return its path.

    The computation runs on the current Dask scheduler: a ``distributed.Client`` if one is
    active, the threaded scheduler otherwise. With ``plain_zarr`` the same Dataset is also
    written as ``<scan>.zarr`` through xarray.
    """
    from midasflow.io.caked_store import write_caked_zarr
    from midasflow.io.midas_zarr import write_midas_zarr

    params = read_params(param_fn, overrides)
    ds = integrate_dataset(
        data_fn,
        params,
        dark_fn=dark_fn,
        data_loc=data_loc,
        dark_loc=dark_loc,
        start_file_nr=start_file_nr,
        end_file_nr=end_file_nr,
        cache_dir=cache_dir,
    )
    folder = Path(result_folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = scan_stem(data_fn)
    out = write_midas_zarr(ds, folder / f"{stem}.zarr.zip")
    if plain_zarr:
        write_caked_zarr(ds, folder / f"{stem}.zarr")
    log.info("wrote %s", out)
    return out
