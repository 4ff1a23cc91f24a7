"""Zarr frame stores (format 2 or 3): a directory (``*.zarr`` or any zarr directory) or a zip
file (``*.zip``, e.g. a MIDAS ``*.analysis.MIDAS.zip`` with ``exchange/data``).

The path may be an array, or a group in which ``loc`` names the array. The store is reopened in
every :meth:`ZarrSource.read`, so the source pickles to plain strings for dask workers.
"""
from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from midasflow.errors import FrameError
from midasflow.io.untrusted import (
    BLOSC_HEADER,
    MAX_METADATA_BYTES,
    check_v2_array,
    check_zip_members,
    read_metadata,
    zip_v2_arrays,
)
from midasflow.limits import check_array_size

ZIP_EXTENSION = ".zip"
_METADATA_FILES = ("zarr.json", ".zarray", ".zgroup")


def is_zarr(path: str) -> bool:
    """True for ``*.zarr``, ``*.zip`` or a directory that holds zarr metadata."""
    if path.endswith((".zarr", ".zarr/", ZIP_EXTENSION)):
        return True
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in _METADATA_FILES)


@contextlib.contextmanager
def _open_node(path: str) -> Iterator[object]:
    """The zarr array or group at ``path`` (zip stores are closed on exit)."""
    import zarr

    if not os.path.exists(path):
        raise FrameError(f"{path}: file not found")
    store = None
    if path.endswith(ZIP_EXTENSION):
        check_zip_members(path, FrameError)
    try:
        if path.endswith(ZIP_EXTENSION):
            from zarr.storage import ZipStore

            store = ZipStore(path, mode="r")
            node = zarr.open(store, mode="r")
        else:
            node = zarr.open(path, mode="r")
    except Exception as exc:  # zarr raises several types for a non-store path
        if store is not None:
            store.close()
        raise FrameError(f"{path}: not a readable zarr array or group ({exc.__class__.__name__})") from None
    try:
        yield node
    finally:
        if store is not None:
            store.close()


@dataclass(frozen=True)
class ZarrSource:
    """Frames of one zarr array.

    Attributes
    ----------
    path : str
        Store path (directory or zip).
    loc : str
        Array path inside a group store, "" when ``path`` is the array itself.
    n_frames : int
    frame_shape : tuple of int
        (nz, ny).
    """

    path: str
    loc: str
    n_frames: int
    frame_shape: tuple[int, int]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Raw frames ``start:stop``, array (stop − start, nz, ny) of the stored dtype."""
        with _open_node(self.path) as node:
            array = node[self.loc] if self.loc else node
            if array.ndim == 2:
                return np.asarray(array[...])[np.newaxis][start:stop]
            return np.asarray(array[start:stop])


def has_array(path: str, loc: str) -> bool:
    """True if ``path`` is a zarr group holding an array at ``loc``."""
    import zarr

    with _open_node(path) as node:
        return isinstance(node, zarr.Group) and isinstance(node.get(loc), zarr.Array)


def _v2_chunk_heads(path: str, loc: str) -> tuple[dict, list[tuple[str, bytes]]] | None:
    """The ``.zarray`` and every chunk's first bytes of the format 2 array ``loc`` of a zip or
    directory store; None when the array has no ``.zarray`` (format 3)."""
    if path.endswith(ZIP_EXTENSION):
        with zipfile.ZipFile(path) as zf:
            for array, meta, heads in zip_v2_arrays(zf, path, FrameError):
                if array == loc:
                    return meta, heads
        return None
    folder = os.path.join(path, loc)
    meta_file = os.path.join(folder, ".zarray")
    if not os.path.isfile(meta_file):
        return None
    with open(meta_file, "rb") as fh:
        meta = read_metadata(fh.read(MAX_METADATA_BYTES + 1), f"{path}: array '{loc}'", FrameError)
    heads = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith("."):
                with open(os.path.join(root, name), "rb") as fh:
                    heads.append((os.path.relpath(os.path.join(root, name), folder), fh.read(BLOSC_HEADER.size)))
    return meta, heads


def _check_declared(path: str, loc: str, array: object) -> None:
    """Chunks no larger than :data:`midasflow.limits.MAX_ARRAY_BYTES`, and (format 2, Blosc)
    no chunk that would expand beyond its declared size: checked before a frame is read."""
    where = f"{path}: array '{loc}'" if loc else f"{path}: array"
    try:
        check_array_size(array.chunks, array.dtype.itemsize, "a chunk")
    except ValueError as exc:
        raise FrameError(f"{where}: {exc}") from None
    found = _v2_chunk_heads(path, loc)
    if found is not None:
        check_v2_array(found[0], found[1], where, FrameError)


def open_zarr(path: str, loc: str) -> ZarrSource:
    """Describe the frames of a zarr array, or of the array ``loc`` in a zarr group.

    Raises
    ------
    FrameError
        Missing/unreadable store, ``loc`` missing in a group (the message lists the top-level
        members), an array that is not 2-D or 3-D, chunks above
        :data:`midasflow.limits.MAX_ARRAY_BYTES`, or a Blosc chunk that would expand beyond its
        declared size.
    """
    import zarr

    with _open_node(path) as node:
        if isinstance(node, zarr.Group):
            array = node.get(loc)
            if not isinstance(array, zarr.Array):
                top = ", ".join(sorted(node.keys())) or "nothing"
                raise FrameError(f"{path}: no array '{loc}'; top-level entries: {top}")
            used_loc = loc
        else:
            array, used_loc = node, ""
        shape = array.shape
        _check_declared(path, used_loc, array)
    if len(shape) == 2:
        return ZarrSource(path, used_loc, 1, (int(shape[0]), int(shape[1])))
    if len(shape) == 3:
        return ZarrSource(path, used_loc, int(shape[0]), (int(shape[1]), int(shape[2])))
    where = f"array '{used_loc}'" if used_loc else "array"
    raise FrameError(f"{path}: {where} has shape {shape}, expected (frames, nz, ny) or (nz, ny)")
