"""MIDAS ``.zarr.zip`` caked files (reference/midas_caking.md §7.1), written and read back.

Layout (zarr format 2 inside an uncompressed zip; every array ``<f8``, one chunk = full shape,
Blosc zstd clevel 3 bit-shuffle, fill value 0.0, order C, no filters, ``.`` chunk keys):

============================================  ===============  =====================================
member                                        shape            attributes
============================================  ===============  =====================================
``REtaMap``                                   (5, nR, nEta)    nEtaBins, nRBins, Header, Units
``OmegaSumFrame/LastFrameNumber_<i>``         (nR, nEta)       LastFrameNumber, Number Of Frames
                                                               Summed, FirstOme, LastOme,
                                                               Temperature, Pressure, I, I0
``Omegas``                                    (nFrames,)       Units
``IntegrationResult/FrameNr_<i>``             (nR, nEta)       omega, Header, Units
``SumFrames``                                 (nR, nEta)       Header, Units, nFrames
``InstrumentParameters/<name>``               (1,)             —
============================================  ===============  =====================================

``i`` is the post-SkipFrame frame index (not zero-padded). ``Number Of Frames Summed`` is the real
frame count of the group (midasflow writes what MIDAS' IZ-param path writes, not IZ-zarr's
ω-arithmetic value). ``Temperature``, ``Pressure``, ``I``, ``I0`` are the group means of the
Dataset's ``temperature``, ``pressure``, ``i``, ``i0`` (see :func:`midasflow.caking.cake`), 0.0 for
a variable the Dataset lacks, as MIDAS writes. Root attributes: ``midasflow_version``,
``creation_timestamp`` and, so the file reopens to the very Dataset :func:`midasflow.caking.cake`
produced, ``midasflow_params`` (MIDAS parameter text), ``midasflow_instrument`` (JSON) and
``midasflow_process_variables`` (the names of the variables the Dataset held, so a measured 0.0
and an absent variable read back apart).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from midasflow.errors import CakeFileError
from midasflow.instrument import DATASET_NAMES, MIDAS_WRITE_DEFAULTS, gsas_names
from midasflow.io.atomic import atomic_output
from midasflow.progress import TextProgress

#: REtaMap plane names and units (§7.1).
RETAMAP_HEADER = "Radius,2Theta,Eta,BinArea,Q"
RETAMAP_UNITS = "Pixels,Degrees,Degrees,Pixels,InvAngstrom"
CAKE_HEADER = "Radius,Eta"
CAKE_UNITS = "Pixels,Degrees"
#: Caked process-variable name -> OmegaSumFrame attribute (§7.1).
PROCESS_ATTRS = {"temperature": "Temperature", "pressure": "Pressure", "i": "I", "i0": "I0"}
GROUP_PREFIX = "LastFrameNumber_"
FRAME_PREFIX = "FrameNr_"
REQUIRED = ("REtaMap", "OmegaSumFrame", "InstrumentParameters")


def _compressor() -> Any:
    from numcodecs import Blosc

    return Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE)


def _new_array(group: Any, name: str, shape: tuple[int, ...], attrs: dict[str, Any]) -> Any:
    """One §7.1 array: <f8, single chunk, zstd-3 bit-shuffle; attributes written once."""
    return group.create_array(
        name, shape=shape, chunks=shape, dtype="<f8", compressors=_compressor(), filters=None,
        fill_value=0.0, order="C", attributes=attrs, config={"write_empty_chunks": True},
    )


def _instrument(ds: Any) -> dict[str, float]:
    """GSAS-II-named terms to write: MIDAS's defaults, then the Dataset's ``attrs['instrument']``."""
    inst = dict(MIDAS_WRITE_DEFAULTS)
    if "instrument" in ds.attrs:
        inst.update(json.loads(ds.attrs["instrument"]))
    return inst


def _write(ds: Any, path: Path, progress: bool) -> None:
    import dask.array as da
    import zarr

    from midasflow import __version__

    n_r, n_eta = ds.sizes["r"], ds.sizes["eta"]
    store = zarr.storage.ZipStore(path, mode="w")
    try:
        root_attrs = {
            "midasflow_version": __version__,
            "creation_timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "midasflow_params": ds.attrs.get("params", ""),
            "midasflow_instrument": ds.attrs.get("instrument", json.dumps(_instrument(ds))),
            "midasflow_process_variables": [name for name in PROCESS_ATTRS if name in ds],
        }
        root = zarr.open_group(store, mode="w", zarr_format=2, attributes=root_attrs)

        r2 = np.broadcast_to(ds["r_px"].values[:, None], (n_r, n_eta))
        retamap = np.stack([
            r2,
            np.broadcast_to(ds["tth_deg"].values[:, None], (n_r, n_eta)),
            np.broadcast_to(ds["eta_deg"].values[None, :], (n_r, n_eta)),
            ds["bin_area"].values,
            np.broadcast_to(ds["q_inv_a"].values[:, None], (n_r, n_eta)),
        ]).astype("<f8")
        _new_array(root, "REtaMap", retamap.shape, {
            "nEtaBins": int(n_eta), "nRBins": int(n_r), "Header": RETAMAP_HEADER,
            "Units": RETAMAP_UNITS,
        })[...] = retamap

        omegas = ds["omega_frame_deg"].values.astype("<f8")
        _new_array(root, "Omegas", omegas.shape, {"Units": "Degrees"})[...] = omegas

        inst = _instrument(ds)
        grp = root.create_group("InstrumentParameters")
        for name, key in DATASET_NAMES.items():
            _new_array(grp, name, (1,), {})[...] = np.array([inst[key]], dtype="<f8")

        sources, targets = [], []
        grp = root.create_group("OmegaSumFrame")
        for g in range(ds.sizes["group"]):
            last = int(ds["last_frame"].values[g])
            targets.append(_new_array(grp, f"{GROUP_PREFIX}{last}", (n_r, n_eta), {
                "LastFrameNumber": last,
                "Number Of Frames Summed": int(ds["frames_summed"].values[g]),
                "FirstOme": float(ds["omega_first_deg"].values[g]),
                "LastOme": float(ds["omega_last_deg"].values[g]),
                **{attr: float(ds[name].values[g]) if name in ds else 0.0
                   for name, attr in PROCESS_ATTRS.items()},
            }))
            sources.append(ds["intensity"].data[g])
        if "frame_intensity" in ds:
            grp = root.create_group("IntegrationResult")
            for k, frame in enumerate(ds["frame"].values):
                targets.append(_new_array(grp, f"{FRAME_PREFIX}{int(frame)}", (n_r, n_eta), {
                    "omega": float(omegas[k]), "Header": CAKE_HEADER, "Units": CAKE_UNITS,
                }))
                sources.append(ds["frame_intensity"].data[k])
        if "sum_frames" in ds:
            targets.append(_new_array(root, "SumFrames", (n_r, n_eta), {
                "Header": CAKE_HEADER, "Units": CAKE_UNITS, "nFrames": int(ds.sizes["frame"]),
            }))
            sources.append(ds["sum_frames"].data)
        sources = [s if isinstance(s, da.Array) else da.from_array(np.asarray(s)) for s in sources]
        _store_all(sources, targets, progress=progress)
    finally:
        store.close()


class _Sink:
    """A ``da.store`` target that hands each computed block to the writing thread."""

    def __init__(self, queue: Any, index: int) -> None:
        self.queue, self.index = queue, index

    def __setitem__(self, key: Any, value: np.ndarray) -> None:
        self.queue.put((self.index, key, np.array(value, dtype="<f8")))


def _blocks(source: Any) -> list[tuple[tuple[slice, ...], Any]]:
    """(index of the block in the array, delayed block) for every chunk of a dask array."""
    import itertools

    starts = [np.cumsum((0,) + c) for c in source.chunks]
    delayed = source.to_delayed()
    out = []
    for idx in itertools.product(*(range(len(c)) for c in source.chunks)):
        key = tuple(slice(int(s[k]), int(s[k + 1])) for s, k in zip(starts, idx))
        out.append((key, delayed[idx]))
    return out


def _store_all(sources: list[Any], targets: list[Any], *, progress: bool = False) -> None:
    """Compute all sources in ONE graph (each frame chunk is caked once) and write each block in
    this thread as soon as it is computed: memory stays bounded and only one thread touches the
    zip (zarr's ZipStore is not safe to write from scheduler threads or other processes)."""
    import queue

    import dask.array as da

    try:
        from distributed import as_completed, default_client

        client = default_client()
    except (ImportError, ValueError):
        client = None
    if client is not None:
        # one future per block (shared upstream chunks computed once), written as they arrive
        # and released, so neither the workers nor this process hold a whole array
        blocks = [(i, key, block) for i, source in enumerate(sources)
                  for key, block in _blocks(source)]
        futures = client.compute([block for _, _, block in blocks])
        where = {f.key: (i, key) for f, (i, key, _) in zip(futures, blocks)}
        bar = TextProgress(len(futures), "write-midas-zarr", enabled=progress)
        for fut, value in as_completed(futures, with_results=True):
            i, key = where[fut.key]
            targets[i][key] = value
            fut.release()
            bar.update()
        bar.close()
        return
    blocks: queue.Queue = queue.Queue()
    done = object()
    failure: list[BaseException] = []

    def compute() -> None:
        try:
            da.store(sources, [_Sink(blocks, i) for i in range(len(sources))], lock=False)
        except BaseException as exc:  # re-raised in the writing thread
            failure.append(exc)
        finally:
            blocks.put(done)

    worker = threading.Thread(target=compute, name="midasflow-zarr-store", daemon=True)
    worker.start()
    while (item := blocks.get()) is not done:
        i, key, value = item
        targets[i][key] = value
    worker.join()
    if failure:
        raise failure[0]


def write_midas_zarr(ds: Any, path: str | os.PathLike, *, progress: bool = False) -> Path:
    """Write a caked Dataset as a MIDAS ``.zarr.zip`` (§7.1 layout, zarr format 2), atomically.

    Parameters
    ----------
    ds : xarray.Dataset
        Output of :func:`midasflow.caking.cake` (lazy or computed).
    path : path-like
        Destination, conventionally ``<stem>.zarr.zip`` (GSAS-II's importer needs that suffix).
    progress : bool
        With a distributed client: a progress line on stderr as blocks arrive (the threaded
        scheduler's progress is shown by ``dask.diagnostics.ProgressBar``).

    Returns
    -------
    Path
        ``path``. The file is written under a temporary sibling name and renamed into place; on
        any error the temporary file is removed and ``path`` is left untouched.
    """
    with atomic_output(path) as tmp:
        _write(ds, tmp, progress)
    return Path(path)


# ------------------------------------------------------------------------------------ reading
def _read_member(path: str, key: str) -> np.ndarray:
    import zarr

    store = zarr.storage.ZipStore(path, mode="r")
    try:
        return zarr.open_array(store, path=key, mode="r", zarr_format=2)[...]
    finally:
        store.close()


def _lazy_stack(path: str, keys: list[str], shape: tuple[int, int]) -> Any:
    import dask
    import dask.array as da

    read = dask.delayed(_read_member, pure=True)
    meta = np.empty((0, 0), dtype=np.float64)
    return da.stack([da.from_delayed(read(path, k), shape=shape, dtype=np.float64, meta=meta)
                     for k in keys])


def _numbered(group: Any, prefix: str, path: Path) -> list[tuple[int, str]]:
    """(index, name) of the arrays ``<prefix><i>`` in a group, in numeric (not lexicographic)
    order."""
    out = []
    for name in group.array_keys():
        if not name.startswith(prefix) or not name[len(prefix):].isdigit():
            raise CakeFileError(f"{path}: unexpected member {group.path}/{name}, expected "
                                f"{prefix}<frame number>")
        out.append((int(name[len(prefix):]), name))
    return sorted(out)


@contextlib.contextmanager
def _open_root(path: str | os.PathLike) -> Iterator[Any]:
    """The root group of a ``.zarr.zip`` opened read-only, closed on exit.

    Raises
    ------
    CakeFileError
        The file is missing, not a zip, or not a zarr format 2 group.
    """
    import zarr

    path = Path(path)
    if not path.is_file():
        raise CakeFileError(f"{path}: no such file, expected a MIDAS .zarr.zip")
    if not zipfile.is_zipfile(path):
        raise CakeFileError(f"{path}: not a zip file, expected a MIDAS .zarr.zip")
    store = zarr.storage.ZipStore(path, mode="r")
    try:
        try:
            root = zarr.open_group(store, mode="r", zarr_format=2)
        except Exception as exc:  # zarr raises several types for a zip without a group
            raise CakeFileError(f"{path}: not a zarr format 2 group ({exc})") from None
        yield root
    finally:
        store.close()


def _instrument_parameters(group: Any) -> dict[str, Any]:
    """Name -> first element of every array of an ``InstrumentParameters`` group (text decoded)."""
    values: dict[str, Any] = {}
    for name, arr in group.arrays():
        data = np.asarray(arr[...]).reshape(-1)
        if data.size:
            item = data[0]
            values[name] = item.decode() if isinstance(item, bytes) else item.item()
    return values


def read_instrument_parameters(path: str | os.PathLike) -> dict[str, Any]:
    """The ``InstrumentParameters`` group of a ``.zarr.zip`` (dataset name -> value), read alone.

    Raises
    ------
    CakeFileError
        The file is missing, not a zip, or has no ``InstrumentParameters`` group.
    """
    with _open_root(path) as root:
        if "InstrumentParameters" not in root:
            raise CakeFileError(f"{path}: group 'InstrumentParameters' not found (expected a "
                                "MIDAS caked .zarr.zip)")
        return _instrument_parameters(root["InstrumentParameters"])


def read_midas_zarr(path: str | os.PathLike) -> Any:
    """Open a MIDAS ``.zarr.zip`` as the caked Dataset :func:`midasflow.caking.cake` produces.

    Cakes (``intensity``, ``frame_intensity``, ``sum_frames``) are read lazily, one member per
    task; ``REtaMap`` and the attributes are read now. Files written by MIDAS itself lack the
    ``midasflow_*`` root attributes: ``attrs['params']`` is then absent and ``instrument`` is
    rebuilt from ``InstrumentParameters``, and every process variable whose attribute
    (``Temperature``, ``Pressure``, ``I``, ``I0``) all groups carry is read (MIDAS IZ writes all
    four, its stream writer none); midasflow files name theirs in ``midasflow_process_variables``
    (files from before it have none).

    Raises
    ------
    CakeFileError
        The file is missing, not a zip, or lacks the §7.1 members.
    """
    from midasflow.caked_schema import caked_dataset

    path = Path(path)
    with _open_root(path) as root:
        members = set(root.group_keys()) | set(root.array_keys())
        for name in REQUIRED:
            if name not in members:
                raise CakeFileError(f"{path}: not a MIDAS caked layout, member {name!r} missing")
        retamap = root["REtaMap"][...]
        if retamap.ndim != 3 or retamap.shape[0] < 4:
            raise CakeFileError(f"{path}: REtaMap has shape {retamap.shape}, expected "
                                "(5, nR, nEta)")
        n_r, n_eta = retamap.shape[1:]
        groups = _numbered(root["OmegaSumFrame"], GROUP_PREFIX, path)
        g_attrs = [dict(root["OmegaSumFrame"][name].attrs) for _, name in groups]
        frames = (_numbered(root["IntegrationResult"], FRAME_PREFIX, path)
                  if "IntegrationResult" in members else [])
        # MIDAS's GPU/stream writer stores no Omegas (§7.2): per-frame ω from IntegrationResult
        omegas = (root["Omegas"][...] if "Omegas" in members else np.array(
            [float(root["IntegrationResult"][name].attrs.get("omega", 0.0)) for _, name in frames]))
        has_sum = "SumFrames" in members
        inst = gsas_names(_instrument_parameters(root["InstrumentParameters"]))
        root_attrs = dict(root.attrs)
    if retamap.shape[0] == 4:  # legacy 4-plane REtaMap (R, 2θ, η, BinArea): Q from Lam
        from midasflow.geometry import tth_to_q_inv_a

        lam = inst.get("Lam", MIDAS_WRITE_DEFAULTS["Lam"])
        retamap = np.concatenate([retamap, tth_to_q_inv_a(retamap[1:2], lam)])

    src = str(path)
    attrs = {}
    if "midasflow_params" in root_attrs:
        attrs["params"] = root_attrs["midasflow_params"]
    attrs["instrument"] = root_attrs.get("midasflow_instrument", json.dumps(inst))
    frame_idx = (np.array([i for i, _ in frames], dtype=np.int64) if frames
                 else np.arange(omegas.shape[0], dtype=np.int64))
    # older midasflow files (no list) wrote placeholder zeros; MIDAS files: whatever they carry
    measured = root_attrs.get("midasflow_process_variables",
                              () if "midasflow_version" in root_attrs else PROCESS_ATTRS)
    process = {name: [a[attr] for a in g_attrs] for name, attr in PROCESS_ATTRS.items()
               if name in measured and all(attr in a for a in g_attrs)}
    return caked_dataset(
        intensity=_lazy_stack(src, [f"OmegaSumFrame/{n}" for _, n in groups], (n_r, n_eta)),
        frames_summed=[a["Number Of Frames Summed"] for a in g_attrs],
        omega_first_deg=[a["FirstOme"] for a in g_attrs],
        omega_last_deg=[a["LastOme"] for a in g_attrs],
        last_frame=[i for i, _ in groups],
        frame=frame_idx,
        omega_frame_deg=omegas,
        r_px=retamap[0, :, 0],
        tth_deg=retamap[1, :, 0],
        q_inv_a=retamap[4, :, 0],
        eta_deg=retamap[2, 0, :],
        bin_area=retamap[3],
        frame_intensity=(_lazy_stack(src, [f"IntegrationResult/{n}" for _, n in frames],
                                     (n_r, n_eta)) if frames else None),
        sum_frames=_lazy_stack(src, ["SumFrames"], (n_r, n_eta))[0] if has_sum else None,
        process_variables=process,
        attrs=attrs,
    )
