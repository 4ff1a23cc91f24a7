"""MIDAS ``.zarr.zip`` caked files (docs/reference/midas_zarr_layout.md), written and read back.

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
``BinArea`` (midasflow)                       (nR, nEta)       Units
``Effective2Theta`` (midasflow)               (nR, nEta)       Units
============================================  ===============  =====================================

REtaMap's BinArea plane is the bin's unmasked area, except that it is 0 wherever the intensity of
any ω-group is NaN (a bin masked by the mask rule): GSAS-II's importer keeps exactly the bins of
non-zero area, so it never reads a NaN point (a module gap would otherwise put NaN y and w into
most of its histograms). The true areas are kept in ``BinArea`` and read back as ``bin_area``.
``Effective2Theta`` is the 2θ (deg) each bin's value samples (the Dataset's
``effective_tth_deg``, docs/caking_2theta.md; NaN where no pixel is collected); REtaMap's 2Theta
plane stays the bin centres, as MIDAS writes it, so importers that read REtaMap are unchanged.

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
from midasflow.io.atomic import atomic_output, compute_settled
from midasflow.io.untrusted import check_v2_array, check_zip_members, reading, zip_v2_arrays

#: REtaMap plane names and units (midas_zarr_layout.md §3).
RETAMAP_HEADER = "Radius,2Theta,Eta,BinArea,Q"
RETAMAP_UNITS = "Pixels,Degrees,Degrees,Pixels,InvAngstrom"
CAKE_HEADER = "Radius,Eta"
CAKE_UNITS = "Pixels,Degrees"
#: Caked process-variable name -> OmegaSumFrame attribute (midas_zarr_layout.md §3).
PROCESS_ATTRS = {"temperature": "Temperature", "pressure": "Pressure", "i": "I", "i0": "I0"}
GROUP_PREFIX = "LastFrameNumber_"
FRAME_PREFIX = "FrameNr_"
REQUIRED = ("REtaMap", "OmegaSumFrame", "InstrumentParameters")
#: Root array holding every bin's unmasked area (px²); REtaMap's BinArea plane is 0 where a group's
#: intensity is NaN, so GSAS-II's importer (which keeps bins of area != 0) gets no NaN points.
BIN_AREA = "BinArea"
#: Root array holding the 2θ (deg) each bin's value samples (Dataset ``effective_tth_deg``).
EFFECTIVE_TTH = "Effective2Theta"


def _compressor() -> Any:
    from numcodecs import Blosc

    return Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE)


def _new_array(group: Any, name: str, shape: tuple[int, ...], attrs: dict[str, Any]) -> Any:
    """One array of the layout (midas_zarr_layout.md §2): <f8, single chunk, zstd-3 bit-shuffle; attributes written once."""
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


class _Members:
    """The (nR, nEta) member arrays ``names`` of the layout, as a ``da.store`` target.

    Row ``i`` along axis 0 is member ``names[i]``. Each block is encoded (the codec of the
    ``.zarray`` document ``template``, which zarr wrote for an array of that shape) by the task
    that computed it, on whichever thread, process or machine that is, and written as one small
    uncompressed zip of its members' chunks into the folder ``parts`` (temporary name, then
    renamed, so a retried task simply replaces its part). The object pickles as plain values.
    """

    def __init__(self, parts: str, tag: str, names: list[str], template: bytes) -> None:
        self.parts, self.tag, self.names, self.template = parts, tag, names, template

    def __setitem__(self, key: tuple[slice, ...], value: np.ndarray) -> None:
        import numcodecs

        meta = json.loads(self.template)
        codec = numcodecs.get_codec(meta["compressor"])
        chunk = ".".join("0" * len(meta["shape"]))
        rows = range(*key[0].indices(len(self.names)))
        part = Path(self.parts, f"{self.tag}-{rows.start:09d}.zip")
        tmp = part.with_name(f".{part.name}.{os.getpid()}-{threading.get_ident()}")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for i, row in zip(rows, value):
                data = np.ascontiguousarray(row, dtype=meta["dtype"])
                zf.writestr(f"{self.names[i]}/{chunk}", codec.encode(data))
        os.replace(tmp, part)


def _compute(collections: list[Any], client: Any, progress: bool) -> tuple[Any, ...]:
    """Compute ``collections`` together on ``client`` (a ``distributed.Client``), or on the
    current Dask scheduler when None, with progress on a client
    (:func:`~midasflow.io.atomic.compute_settled`: no task still writing when an error reaches
    the caller's cleanup)."""
    from midasflow.progress import futures_progress

    return compute_settled(*collections, client=client,
                           on_submit=lambda futures: futures_progress(futures, "integrate", enabled=progress))


def _write(ds: Any, path: Path, parts: Path, client: Any, progress: bool) -> None:
    """Write the layout of ``ds`` (docs/reference/midas_zarr_layout.md) as the zip ``path``; ``parts`` is an empty scratch folder.

    Metadata and small arrays are made by zarr in memory; the cakes are encoded and written by
    the tasks that compute them (``da.store`` into :class:`_Members`), in parallel, and only
    their per-bin NaN flags come back; REtaMap is made last, once the NaN bins are known. Then
    everything is packed into the uncompressed zip zarr's ZipStore would write."""
    import dask.array as da
    import zarr

    from midasflow import __version__

    n_r, n_eta = ds.sizes["r"], ds.sizes["eta"]
    entries: dict[str, Any] = {}  # zarr's in-memory store: member name -> Buffer
    root = zarr.open_group(zarr.storage.MemoryStore(store_dict=entries), mode="w", zarr_format=2,
                           attributes={
        "midasflow_version": __version__,
        "creation_timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "midasflow_params": ds.attrs.get("params", ""),
        "midasflow_instrument": ds.attrs.get("instrument", json.dumps(_instrument(ds))),
        "midasflow_process_variables": [name for name in PROCESS_ATTRS if name in ds],
    })
    omegas = ds["omega_frame_deg"].values.astype("<f8")
    _new_array(root, "Omegas", omegas.shape, {"Units": "Degrees"})[...] = omegas
    inst = _instrument(ds)
    grp = root.create_group("InstrumentParameters")
    for name, key in DATASET_NAMES.items():
        _new_array(grp, name, (1,), {})[...] = np.array([inst[key]], dtype="<f8")
    bin_area = np.asarray(ds["bin_area"].values, dtype="<f8")
    _new_array(root, BIN_AREA, bin_area.shape, {"Units": "Pixels"})[...] = bin_area
    if "effective_tth_deg" in ds.variables:
        tth_eff = np.asarray(ds["effective_tth_deg"].transpose("r", "eta").values, dtype="<f8")
        _new_array(root, EFFECTIVE_TTH, tth_eff.shape, {"Units": "Degrees"})[...] = tth_eff
    template = entries[f"{BIN_AREA}/.zarray"].to_bytes()  # every (nR, nEta) member's metadata
    indent = zarr.config.get("json_indent")
    member_meta: dict[str, bytes] = {}

    def members(tag: str, names: list[str], attrs: list[dict[str, Any]]) -> _Members:
        for name, a in zip(names, attrs):
            member_meta[f"{name}/.zarray"] = template
            member_meta[f"{name}/.zattrs"] = json.dumps(a, indent=indent, allow_nan=True).encode()
        return _Members(str(parts), tag, names, template)

    stores: list[tuple[Any, _Members]] = []
    root.create_group("OmegaSumFrame")
    last = [int(v) for v in ds["last_frame"].values]
    stores.append((ds["intensity"].data, members(
        "group", [f"OmegaSumFrame/{GROUP_PREFIX}{i}" for i in last],
        [{"LastFrameNumber": last[g],
          "Number Of Frames Summed": int(ds["frames_summed"].values[g]),
          "FirstOme": float(ds["omega_first_deg"].values[g]),
          "LastOme": float(ds["omega_last_deg"].values[g]),
          **{attr: float(ds[name].values[g]) if name in ds else 0.0
             for name, attr in PROCESS_ATTRS.items()}} for g in range(len(last))])))
    if "frame_intensity" in ds:
        root.create_group("IntegrationResult")
        stores.append((ds["frame_intensity"].data, members(
            "frame", [f"IntegrationResult/{FRAME_PREFIX}{int(i)}" for i in ds["frame"].values],
            [{"omega": float(w), "Header": CAKE_HEADER, "Units": CAKE_UNITS} for w in omegas])))
    if "sum_frames" in ds:
        stores.append((ds["sum_frames"].data[None], members(
            "sum", ["SumFrames"],
            [{"Header": CAKE_HEADER, "Units": CAKE_UNITS, "nFrames": int(ds.sizes["frame"])}])))

    sources = [s if isinstance(s, da.Array) else da.from_array(np.asarray(s)) for s, _ in stores]
    stored = da.store(sources, [target for _, target in stores], lock=False, compute=False)
    _, nan_bins = _compute([stored, da.isnan(sources[0]).any(axis=0)], client, progress)

    retamap = np.stack([
        np.broadcast_to(ds["r_px"].values[:, None], (n_r, n_eta)),
        np.broadcast_to(ds["tth_deg"].values[:, None], (n_r, n_eta)),
        np.broadcast_to(ds["eta_deg"].values[None, :], (n_r, n_eta)),
        np.where(nan_bins, 0.0, bin_area),  # importers drop area-0 bins (no NaN points)
        np.broadcast_to(ds["q_inv_a"].values[:, None], (n_r, n_eta)),
    ]).astype("<f8")
    _new_array(root, "REtaMap", retamap.shape, {
        "nEtaBins": int(n_eta), "nRBins": int(n_r), "Header": RETAMAP_HEADER,
        "Units": RETAMAP_UNITS,
    })[...] = retamap
    expected = {f"{name}/0.0" for _, target in stores for name in target.names}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, value in entries.items():
            zf.writestr(name, value.to_bytes())
        # members in text order (LastFrameNumber_10 before _2): zarr lists a zip group's members
        # in the order they first appear, so GSAS-II's importer, iterating OmegaSumFrame, then
        # numbers the histograms as MIDAS's script, which sorts the names
        for name in sorted(member_meta):
            zf.writestr(name, member_meta[name])
        for part in sorted(parts.glob("*.zip")):
            with zipfile.ZipFile(part) as src:
                for info in src.infolist():
                    if info.filename in expected:
                        zf.writestr(info.filename, src.read(info))
                        expected.discard(info.filename)
    if expected:
        raise CakeFileError(
            f"{parts}: {len(expected)} caked arrays (first {min(expected)}) were not written; "
            "the output folder must be on a filesystem every Dask worker can write to")


def write_midas_zarr(ds: Any, path: str | os.PathLike, *, client: Any = None,
                     progress: bool = False) -> Path:
    """Write a caked Dataset as a MIDAS ``.zarr.zip`` (midas_zarr_layout.md, zarr format 2), atomically.

    Parameters
    ----------
    ds : xarray.Dataset
        Output of :func:`midasflow.caking.cake` (lazy or computed).
    path : path-like
        Destination, conventionally ``<stem>.zarr.zip`` (GSAS-II's importer needs that suffix).
    client : distributed.Client, optional
        Compute on this client; default the current Dask scheduler (the threaded one, or an
        active distributed client).
    progress : bool
        With ``client``: a progress bar on stderr (the threaded scheduler's progress is shown by
        ``dask.diagnostics.ProgressBar``).

    Returns
    -------
    Path
        ``path``.

    Notes
    -----
    Every task that computes a block of cakes encodes and writes that block's members itself,
    on its own worker, as one part file in a hidden temporary folder next to ``path``; nothing
    but the tiny per-bin NaN flags travels back to the caller, and memory does not depend on the
    number of frames. The parts (one per block, not one folder per member, which matters on
    cluster filesystems) are then packed with the metadata into a temporary zip that is renamed
    to ``path``; on any error both temporaries are removed and ``path`` is left untouched.
    Workers must be able to write to the output folder (a shared filesystem on a cluster).
    """
    import shutil

    with atomic_output(path) as tmp:
        parts = tmp.with_name(tmp.name + ".parts").resolve()
        parts.mkdir()
        try:
            _write(ds, tmp, parts, client, progress)
        finally:
            shutil.rmtree(parts, ignore_errors=True)
    return Path(path)


# ------------------------------------------------------------------------------------ reading
def _read_member(path: str, key: str) -> np.ndarray:
    """One member array (a cake) read whole; CakeFileError when it cannot be decoded."""
    import zarr

    store = zarr.storage.ZipStore(path, mode="r")
    try:
        with reading(path, f"member {key}", CakeFileError):
            return zarr.open_array(store, path=key, mode="r", zarr_format=2)[...]
    finally:
        store.close()


def verify_members(path: str | os.PathLike) -> None:
    """Read every member of a ``.zarr.zip`` once and check its CRC-32, in 1 MiB pieces (memory
    does not grow with the file): a damaged store is refused before any work, not found by the
    task that reads the damaged group.

    Raises
    ------
    CakeFileError
        A member cannot be read (bad CRC, truncated), naming the file and the member.
    """
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            with reading(path, f"member {info.filename.rsplit('/', 1)[0]}", CakeFileError), \
                    zf.open(info) as member:
                while member.read(1 << 20):
                    pass


def _read_block(path: str, key: str) -> np.ndarray:
    """One member as a (1, nR, nEta) block of a stack."""
    return _read_member(path, key)[None]


def _lazy_stack(path: str, keys: list[str], shape: tuple[int, int]) -> Any:
    """The members ``keys`` stacked along a new first axis, one lazy read per member (a plain
    graph: thousands of members cost milliseconds, not one dask array each)."""
    import dask.array as da
    from dask.base import tokenize

    name = f"read-midas-zarr-{tokenize(path, keys, shape)}"
    graph = {(name, i, 0, 0): (_read_block, path, key) for i, key in enumerate(keys)}
    chunks = ((1,) * len(keys), (shape[0],), (shape[1],))
    return da.Array(graph, name, chunks, dtype=np.float64)


def _member_attrs(path: Path, names: list[str]) -> list[dict[str, Any]]:
    """The zarr format 2 attributes (``<name>/.zattrs``) of many members, read in one pass over
    the zip (zarr opens each array on its own: ~1 ms a member)."""
    with zipfile.ZipFile(path) as zf:
        present = set(zf.namelist())
        return [json.loads(zf.read(f"{n}/.zattrs")) if f"{n}/.zattrs" in present else {}
                for n in names]


def _numbered(shapes: dict[str, tuple[int, ...]], group: str, prefix: str, path: Path
              ) -> list[tuple[int, str]]:
    """(index, name) of the arrays ``<prefix><i>`` in a group, in numeric (not lexicographic)
    order; ``shapes`` = every array of the zip (path → declared shape, from :func:`_open_root`)."""
    out = []
    for array in shapes:
        where, _, name = array.rpartition("/")
        if where != group:
            continue
        if not name.startswith(prefix) or not name[len(prefix):].isdigit():
            raise CakeFileError(f"{path}: unexpected member {group}/{name}, expected "
                                f"{prefix}<frame number>")
        out.append((int(name[len(prefix):]), name))
    return sorted(out)


@contextlib.contextmanager
def _open_root(path: str | os.PathLike, shapes: dict[str, tuple[int, ...]] | None = None
               ) -> Iterator[Any]:
    """The root group of a ``.zarr.zip`` opened read-only, closed on exit; ``shapes``, when
    given, receives every array's path and declared shape (read from the zip's metadata, so
    thousands of members cost no zarr array opens).

    Raises
    ------
    CakeFileError
        The file is missing, not a zip, has member names that are not plain relative paths, an
        array declares more than :data:`midasflow.limits.MAX_ARRAY_BYTES` or a compressor other
        than Blosc (what every MIDAS writer uses), a Blosc chunk would expand beyond its declared
        size, it is not a zarr format 2 group, or a member read inside the block cannot be
        decoded (bad CRC, corrupt chunk).
    """
    import zarr

    path = Path(path)
    if not path.is_file():
        raise CakeFileError(f"{path}: no such file, expected a MIDAS .zarr.zip")
    if not zipfile.is_zipfile(path):
        raise CakeFileError(f"{path}: not a zip file, expected a MIDAS .zarr.zip")
    check_zip_members(path, CakeFileError)
    with zipfile.ZipFile(path) as zf, reading(path, "a member", CakeFileError):
        # declared sizes and Blosc headers, before anything is decoded
        for array, meta, heads in zip_v2_arrays(zf, str(path), CakeFileError):
            shape = check_v2_array(meta, heads, f"{path}: member {array or 'root'}", CakeFileError,
                                   compressors=("blosc", None))
            if shapes is not None:
                shapes[array] = tuple(shape)
    store = zarr.storage.ZipStore(path, mode="r")
    try:
        try:
            root = zarr.open_group(store, mode="r", zarr_format=2)
        except Exception as exc:  # zarr raises several types for a zip without a group
            raise CakeFileError(f"{path}: not a zarr format 2 group ({exc})") from None
        with reading(path, "a member", CakeFileError):
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


#: The stored REtaMap BinArea plane of the stores :func:`read_midas_zarr` read last, by file
#: identity (path, inode, size, mtime): planning numbers histograms by it right after opening the
#: store, and a store rewritten since has another identity.
_IMPORTER_AREAS: dict[tuple[str, int, int, int], np.ndarray] = {}
_IMPORTER_AREAS_KEPT = 4
_IMPORTER_AREAS_LOCK = threading.Lock()


def _file_identity(path: str | os.PathLike) -> tuple[str, int, int, int]:
    st = os.stat(path)
    return os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns


def read_importer_area(path: str | os.PathLike) -> np.ndarray:
    """The ``REtaMap`` BinArea plane of a ``.zarr.zip`` as stored, (nR, nEta): the bin areas
    GSAS-II's MIDAS importer and MIDAS's ``gsas_ii_refine.py`` select and number histograms by
    (midasflow's own ``bin_area`` is the ``BinArea`` member when present). The plane
    :func:`read_midas_zarr` read from the same, unchanged file is not read again.

    Raises
    ------
    CakeFileError
        The file is missing, not a zip, or has no REtaMap of at least four planes.
    """
    if os.path.isfile(path):
        with _IMPORTER_AREAS_LOCK:
            kept = _IMPORTER_AREAS.get(_file_identity(path))
        if kept is not None:
            return kept.copy()
    with _open_root(path) as root:
        if "REtaMap" not in set(root.array_keys()):
            raise CakeFileError(f"{path}: not a MIDAS caked layout, member 'REtaMap' missing")
        retamap = root["REtaMap"]
        if len(retamap.shape) != 3 or retamap.shape[0] < 4:
            raise CakeFileError(f"{path}: REtaMap has shape {retamap.shape}, expected (5, nR, nEta)")
        return np.asarray(retamap[3], dtype=np.float64)


def _check_cake_shapes(shapes: dict[str, tuple[int, ...]], shape: tuple[int, int],
                       path: Path) -> None:
    """Every (nR, nEta) member of the layout declares REtaMap's (nR, nEta): the lazy cakes are
    built on that shape, so a member declaring another is refused before it is read."""
    for name, declared in shapes.items():
        cake = name in (BIN_AREA, EFFECTIVE_TTH, "SumFrames") or name.rpartition("/")[0] in (
            "OmegaSumFrame", "IntegrationResult")
        if cake and tuple(declared) != tuple(shape):
            raise CakeFileError(f"{path}: member {name} has shape {tuple(declared)}, expected "
                                f"REtaMap's (nR, nEta) = {tuple(shape)}")


def _check_group_attrs(g_attrs: list[dict[str, Any]], names: list[str], process: dict[str, list],
                       path: Path) -> None:
    """Every ω-group's attributes hold what the Dataset is built from: a frame count >= 1 and
    finite or NaN numbers for FirstOme, LastOme and the process variables read."""
    for name, attrs in zip(names, g_attrs):
        where = f"{path}: member OmegaSumFrame/{name}: attribute"
        frames = attrs.get("Number Of Frames Summed")
        if isinstance(frames, bool) or not isinstance(frames, (int, float)) or not frames >= 1:
            raise CakeFileError(f"{where} 'Number Of Frames Summed' = {frames!r}, expected a frame count >= 1")
        for key in ("FirstOme", "LastOme", *(PROCESS_ATTRS[k] for k in process)):
            value = attrs.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise CakeFileError(f"{where} {key!r} = {value!r}, expected a number")


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
        The file is missing, not a zip, or lacks the members of midas_zarr_layout.md §3.
    """
    from midasflow.caked_schema import caked_dataset

    path = Path(path)
    identity = _file_identity(path) if path.is_file() else None  # before the file is read
    shapes: dict[str, tuple[int, ...]] = {}
    with _open_root(path, shapes) as root:
        members = set(root.group_keys()) | set(root.array_keys())
        for name in REQUIRED:
            if name not in members:
                raise CakeFileError(f"{path}: not a MIDAS caked layout, member {name!r} missing")
        shape = root["REtaMap"].shape  # declared: checked before anything is read
        if len(shape) != 3 or shape[0] not in (4, 5):
            raise CakeFileError(f"{path}: REtaMap has shape {shape}, expected (5, nR, nEta)")
        n_r, n_eta = shape[1:]
        _check_cake_shapes(shapes, (n_r, n_eta), path)
        retamap = root["REtaMap"][...]
        bin_area = root[BIN_AREA][...] if BIN_AREA in members else None
        tth_eff = root[EFFECTIVE_TTH][...] if EFFECTIVE_TTH in members else None
        groups = _numbered(shapes, "OmegaSumFrame", GROUP_PREFIX, path)
        g_attrs = _member_attrs(path, [f"OmegaSumFrame/{name}" for _, name in groups])
        frames = (_numbered(shapes, "IntegrationResult", FRAME_PREFIX, path)
                  if "IntegrationResult" in members else [])
        # MIDAS's GPU/stream writer stores no Omegas (midas_zarr_layout.md §4): per-frame ω from IntegrationResult
        omegas = (root["Omegas"][...] if "Omegas" in members else np.array(
            [float(a.get("omega", 0.0)) for a in
             _member_attrs(path, [f"IntegrationResult/{name}" for _, name in frames])]))
        has_sum = "SumFrames" in members
        inst = gsas_names(_instrument_parameters(root["InstrumentParameters"]))
        root_attrs = dict(root.attrs)
    with _IMPORTER_AREAS_LOCK:
        _IMPORTER_AREAS.pop(identity, None)
        _IMPORTER_AREAS[identity] = np.asarray(retamap[3], dtype=np.float64)
        while len(_IMPORTER_AREAS) > _IMPORTER_AREAS_KEPT:
            del _IMPORTER_AREAS[next(iter(_IMPORTER_AREAS))]
    if tth_eff is not None and (np.asarray(tth_eff).dtype.kind != "f"
                                or ((tth_eff < 0) | (tth_eff >= 180)).any()):  # NaN: False
        raise CakeFileError(f"{path}: member {EFFECTIVE_TTH} holds {np.asarray(tth_eff).dtype} "
                            "values outside [0, 180), expected 2θ in degrees (NaN: no pixel)")
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
    _check_group_attrs(g_attrs, [name for _, name in groups], process, path)
    omegas = np.asarray(omegas)
    if omegas.ndim != 1 or omegas.dtype.kind not in "iuf" or (frames and omegas.size != len(frames)):
        raise CakeFileError(f"{path}: Omegas holds {omegas.shape} {omegas.dtype} values, expected one "
                            f"number per IntegrationResult frame ({len(frames)})")
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
        bin_area=retamap[3] if bin_area is None else bin_area,
        effective_tth_deg=tth_eff,
        frame_intensity=(_lazy_stack(src, [f"IntegrationResult/{n}" for _, n in frames],
                                     (n_r, n_eta)) if frames else None),
        sum_frames=_lazy_stack(src, ["SumFrames"], (n_r, n_eta))[0] if has_sum else None,
        process_variables=process,
        attrs=attrs,
    )
