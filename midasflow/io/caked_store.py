"""Caked stores: a plain xarray zarr store, and one entry point that opens either kind.

``write_caked_zarr`` keeps the caked Dataset exactly (every variable, coordinate and attribute);
``open_caked`` opens that store or a MIDAS ``.zarr.zip`` (:mod:`midasflow.io.midas_zarr`) and
returns the Dataset :func:`midasflow.caking.cake` produced.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

from midasflow.caked_schema import CAKED_VARS
from midasflow.errors import CakeFileError
from midasflow.io.atomic import atomic_output, compute_settled


def _regular_chunks(ds: Any) -> Any:
    """Rechunk dask variables to uniform chunks along their first dim (zarr needs regular ones)
    and drop encodings inherited from a previous store."""
    out = ds.copy()
    for name, var in out.variables.items():
        var.encoding = {}
        if var.chunks is not None and var.ndim:
            out[name] = var.chunk({var.dims[0]: max(var.chunks[0])})
    return out


def write_caked_zarr(ds: Any, path: str | os.PathLike, *, client: Any = None) -> Path:
    """Write a caked Dataset to a plain zarr store (``xarray.Dataset.to_zarr``), atomically.

    Parameters
    ----------
    ds : xarray.Dataset
        Output of :func:`midasflow.caking.cake` (lazy: computed while writing).
    path : path-like
        Destination directory. Written to ``<path>.tmp-<pid>`` first and renamed into place; an
        existing store at ``path`` is replaced only after the new one is complete.
    client : distributed.Client, optional
        Compute on this client (each task writes its own chunks); default the current Dask
        scheduler.

    Returns
    -------
    Path
        ``path``.
    """
    with atomic_output(path) as tmp:
        stored = _regular_chunks(ds).to_zarr(tmp, mode="w", zarr_format=3, consolidated=False,
                                             compute=False)
        compute_settled(stored, client=client)
    return Path(path)


def open_caked(path: str | os.PathLike) -> Any:
    """Open a caked store of either kind as the Dataset :func:`midasflow.caking.cake` produced.

    Parameters
    ----------
    path : path-like
        A MIDAS ``.zarr.zip`` file (docs/reference/midas_zarr_layout.md) or a zarr directory written by
        :func:`write_caked_zarr`.

    Returns
    -------
    xarray.Dataset
        Lazy (dask-backed) cakes with the variables, coordinates and attrs of :func:`cake`.

    Raises
    ------
    CakeFileError
        ``path`` is missing or is neither layout.
    """
    import xarray as xr

    from midasflow.io.midas_zarr import read_midas_zarr

    path = Path(path)
    if path.is_file():
        if zipfile.is_zipfile(path):
            return read_midas_zarr(path)
        raise CakeFileError(f"{path}: not a zip file, expected a MIDAS .zarr.zip or a zarr store")
    if not path.is_dir():
        raise CakeFileError(f"{path}: no such caked store (.zarr.zip file or zarr directory)")
    try:  # no dask yet: the small variables are read directly, the cakes wrapped lazily below
        ds = xr.open_zarr(path, consolidated=False, chunks=None)
    except Exception as exc:  # xarray/zarr raise several types for a non-store directory
        raise CakeFileError(f"{path}: not a zarr store ({type(exc).__name__})") from None
    missing = [v for v in CAKED_VARS if v not in ds.variables]
    if missing:
        raise CakeFileError(f"{path}: not a caked store, variable {missing[0]!r} missing")
    small = {name for name, var in ds.variables.items() if "frame" not in var.dims
             and "group" not in var.dims or var.ndim == 1}
    return ds.assign_coords({k: ds[k].load() for k in ds.coords if k in small}).assign(
        {k: ds[k].load() if k in small else ds[k].chunk(ds[k].encoding["preferred_chunks"])
         for k in ds.data_vars})
