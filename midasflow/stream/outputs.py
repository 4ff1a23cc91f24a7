"""What a stream leaves behind: the caked Dataset of its closed ω-groups, the MIDAS
``.zarr.zip``, and the HDF5 of the cakes (``--output-h5``; layout in docs/stream.md).

The caked Dataset is built from the spool (:mod:`midasflow.stream.spool`) with the batch mode's
one constructor (:func:`midasflow.caked_schema.caked_dataset`) and coordinates
(:func:`midasflow.caking.cake_coords`), lazily (each cake read by its own task), so
:func:`midasflow.io.midas_zarr.write_midas_zarr` writes the same store batch mode writes.
"""
from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

import numpy as np

from midasflow.stream.spool import Spool, load_array


def _lazy_stack(paths: list[str], shape: tuple[int, int]) -> Any:
    import dask
    import dask.array as da

    meta = np.empty((0, 0), dtype=np.float64)
    load = dask.delayed(load_array, pure=True)
    return da.stack([da.from_delayed(load(p, shape), shape=shape, dtype=np.float64, meta=meta)
                     for p in paths])


def caked_from_spool(state: Any, spool: Spool, params: Any, binmap: Any, *, keep_frames: bool,
                     flagged: np.ndarray | None = None) -> Any:
    """The caked Dataset (:func:`midasflow.caking.cake`'s layout) of the stream's closed groups.

    Frames of an open group (a stream stopped mid-group) are not in it. Per-frame cakes
    (``frame_intensity``, when ``SaveIndividualFrames``) and ``sum_frames`` (``SumImages``) come
    from the spooled frame cakes, summed in frame order as batch mode sums them. ``flagged``:
    the pixels the stream's first frame had no value for, left out of the effective 2θ as
    batch mode leaves them out.

    Returns
    -------
    xarray.Dataset or None
        None when no group closed.
    """
    from midasflow.caked_schema import caked_dataset
    from midasflow.caking import _group_sums, cake_attrs, cake_coords

    groups = state.groups
    if not groups:
        return None
    shape = (int(binmap.n_r), int(binmap.n_eta))
    n = groups[-1].last + 1
    frames = state.frames[:n]
    omega = np.array([f["omega_deg"] for f in frames], dtype=np.float64)
    frame_cakes = None
    if keep_frames and (params.save_individual_frames or params.sum_images):
        frame_cakes = _lazy_stack([spool.frame_path(p) for p in range(n)], shape).rechunk((32, -1, -1))
    sum_frames = None
    if params.sum_images and frame_cakes is not None:
        sum_frames = _group_sums(frame_cakes, np.array([0]), np.array([n - 1]))[0]
    return caked_dataset(
        intensity=_lazy_stack([spool.group_path(g.group) for g in groups], shape),
        frames_summed=np.array([g.frames_summed for g in groups]),
        omega_first_deg=np.array([g.omega_first_deg for g in groups]),
        omega_last_deg=np.array([g.omega_last_deg for g in groups]),
        last_frame=np.array([g.last for g in groups]),
        frame=np.arange(n),
        omega_frame_deg=omega,
        **cake_coords(params, binmap, flagged),
        frame_intensity=frame_cakes if params.save_individual_frames else None,
        sum_frames=sum_frames,
        attrs={**cake_attrs(params), "source": "stream"},
    )


def frame_label(frame: dict[str, Any]) -> str:
    """A frame's name in the HDF5 (MIDAS's rule): the file name without its extension (and
    ``:frameK`` for a file of several frames), or the PV frame's ``uniqueId``."""
    if "unique_id" in frame:
        return str(frame["unique_id"])
    stem = os.path.splitext(frame["name"])[0]
    return f"{stem}:frame{frame['frame_in_file']}" if frame.get("multi") else stem


def write_cakes_h5(path: str | os.PathLike, caked: Any, state: Any, spool: Spool, *, compress: bool,
                   keep_frames: bool) -> Path:
    """``--output-h5``: the stream's cakes as HDF5 (layout in docs/stream.md), atomically.

    Parameters
    ----------
    path : path
    caked : xarray.Dataset
        :func:`caked_from_spool`'s Dataset (its groups and coordinates).
    state : StreamState
    spool : Spool
    compress : bool
        ``--compress``: every array deflate-compressed (level 4, byte shuffle), readable by any
        HDF5 reader; otherwise contiguous and uncompressed, as MIDAS writes it.
    keep_frames : bool
        Whether the spool holds every frame's cake (written under ``frames/``).
    """
    import h5py

    from midasflow import __version__
    from midasflow.io.atomic import atomic_output

    options = dict(compression="gzip", compression_opts=4, shuffle=True) if compress else {}
    n_r, n_eta = caked.sizes["r"], caked.sizes["eta"]
    chunked = dict(chunks=(n_r, n_eta), **options) if compress else {}
    with atomic_output(path) as tmp, h5py.File(tmp, "w", track_order=True) as f:
        n = int(caked.sizes["frame"])
        f.attrs.update(creation_date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                       num_frames=n, num_groups=int(caked.sizes["group"]), midasflow_version=__version__,
                       params=caked.attrs.get("params", ""))
        geo = f.create_group("geometry_maps")
        planes = {
            "R_map": (np.broadcast_to(caked.r_px.values[:, None], (n_r, n_eta)), "pixels", "bin centre R"),
            "TTh_map": (np.broadcast_to(caked.tth_deg.values[:, None], (n_r, n_eta)), "degrees", "bin centre 2θ"),
            "Eta_map": (np.broadcast_to(caked.eta_deg.values[None, :], (n_r, n_eta)), "degrees", "bin centre η"),
            "Area_map": (caked.bin_area.values, "pixels²", "unmasked pixel area of the bin"),
            "Q_map": (np.broadcast_to(caked.q_inv_a.values[:, None], (n_r, n_eta)), "1/Å", "bin centre Q"),
        }
        if "effective_tth_deg" in caked.variables:
            planes["TTh_eff_map"] = (caked.effective_tth_deg.transpose("r", "eta").values, "degrees",
                                     "2θ each bin's value samples (docs/caking_2theta.md)")
        for name, (values, units, description) in planes.items():
            ds = geo.create_dataset(name, data=np.ascontiguousarray(values, dtype=np.float64), **chunked)
            ds.attrs.update(units=units, description=description)
        sums = f.create_group("OmegaSumFrame")
        for k, g in enumerate(state.groups):
            ds = sums.create_dataset(f"Summed_from_{g.first}_to_{g.last}",
                                     data=caked.intensity.isel(group=k).values, **chunked)
            ds.attrs.update({"Number Of Frames Summed": g.frames_summed,
                             "original_frame_indices": np.arange(g.first, g.last + 1),
                             "last_frame_identifier": frame_label(state.frames[g.last]),
                             "FirstOme": g.omega_first_deg, "LastOme": g.omega_last_deg,
                             "group": g.group})
        if keep_frames:
            per_frame = f.create_group("frames")
            for p in range(n):
                frame = state.frames[p]
                ds = per_frame.create_dataset(f"frame_{p:06d}", data=load_array(spool.frame_path(p), (n_r, n_eta)),
                                              **chunked)
                ds.attrs.update(frame_index=p, omega=float(frame["omega_deg"]), source=frame_label(frame))
    return Path(path)
