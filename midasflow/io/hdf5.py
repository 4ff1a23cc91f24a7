"""HDF5 / NeXus frame files (``.h5 .hdf5 .hdf .nxs``).

The dataset is ``(frames, nz, ny)`` or a single ``(nz, ny)`` frame. Compressed datasets
(bitshuffle/LZ4, Blosc, … as written by Eiger/Pilatus/Dectris software) are decoded through the
filters registered by ``import hdf5plugin``. Files are opened inside :meth:`Hdf5Source.read`, so a
source pickles to a few strings and works on any dask worker.

:meth:`Hdf5Source.read_into` (the caking path) reads the stored bytes itself where the layout
allows it (docs/architecture.md, "Reading HDF5 frames"): HDF5 reports where each chunk (or the
contiguous data) lies in the file (``H5Dget_chunk_info``, ``H5Dget_offset``), and an
uncompressed frame's bytes are then read with ``os.preadv`` straight into the caller's buffer,
about half the CPU time of HDF5's own read of the same bytes. Anything it does not recognise
(filters, chunks splitting a frame, a big-endian type, a user block, external or virtual
storage, an unwritten chunk) goes through h5py's ``read_direct`` as before.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from midasflow.errors import FrameError

EXTENSIONS = (".h5", ".hdf5", ".hdf", ".nxs")


def _open_file(path: str):
    import h5py
    import hdf5plugin  # noqa: F401  (registers the compression filters with h5py)

    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise FrameError(f"{path}: file not found") from None
    except OSError as exc:
        raise FrameError(f"{path}: not a readable HDF5 file ({exc})") from None


@dataclass(frozen=True)
class Hdf5Source:
    """Frames of one HDF5 dataset.

    Attributes
    ----------
    path : str
        The HDF5 file.
    loc : str
        Dataset path inside the file, e.g. ``exchange/data``.
    n_frames : int
        Number of frames (1 for a 2-D dataset).
    frame_shape : tuple of int
        (nz, ny) of one frame.
    dtype : str
        The stored dtype (numpy's spelling, e.g. ``'<u2'``).
    """

    path: str
    loc: str
    n_frames: int
    frame_shape: tuple[int, int]
    dtype: str = ""

    def read(self, start: int, stop: int) -> np.ndarray:
        """Raw frames ``start:stop`` as an array (stop − start, nz, ny) of the stored dtype."""
        with _open_file(self.path) as f:
            ds = f[self.loc]
            if ds.ndim == 2:
                return ds[()][np.newaxis][start:stop]
            return ds[start:stop]

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Raw frames ``start:stop`` of a 3-D dataset into ``out`` ((stop − start, nz, ny) of
        :attr:`dtype`, C-contiguous), with no array allocated: the stored bytes read directly
        where :func:`_direct_plan` finds the layout plain, else h5py's ``read_direct``.

        Raises
        ------
        FrameError
            The file ends before the bytes HDF5 places the frames at (one line naming the file
            and the frames).
        """
        with _open_file(self.path) as f:
            ds = f[self.loc]
            if ds.ndim == 2:
                out[...] = ds[()][np.newaxis][start:stop]
                return
            plan = _direct_plan(f, ds, start, stop, out)
            if plan is None:
                ds.read_direct(out, np.s_[start:stop])
                return
        _read_pieces(*plan, out, start, f"{self.path}: frames {start}..{stop - 1}")


@dataclass(frozen=True)
class _Piece:
    """Frames stored as one run of bytes: ``n_frames`` frames from ``frame`` (an index into the
    read's output) at byte ``offset`` of the file."""

    offset: int
    frame: int
    n_frames: int


def _direct_plan(f, ds, start: int, stop: int, out: np.ndarray) -> tuple[str, list[_Piece]] | None:
    """Where frames ``start:stop`` of the open 3-D dataset ``ds`` lie in its file, as (path of
    the file holding them, runs of frames stored as whole runs of bytes), when nothing stands
    between those bytes and ``out``'s: no filter, whole frames per chunk (or contiguous
    storage), every chunk written and of exactly its frames' size, the stored type ``out``'s
    own (native byte order), no user block, no external or virtual storage, a plain POSIX file.
    None otherwise: the caller reads through HDF5."""
    import h5py

    dtype = np.dtype(ds.dtype)
    frame_bytes = int(np.prod(ds.shape[1:])) * dtype.itemsize
    if (dtype != out.dtype or not dtype.isnative or dtype.kind not in "uif" or f.driver != "sec2"
            or f.userblock_size != 0 or not out.flags.c_contiguous
            or out.shape != (stop - start, *ds.shape[1:])):
        return None
    dcpl = ds.id.get_create_plist()
    if dcpl.get_nfilters() != 0 or dcpl.get_external_count() != 0:
        return None
    layout = dcpl.get_layout()
    pieces: list[_Piece] = []
    if layout == h5py.h5d.CONTIGUOUS:
        base = ds.id.get_offset()
        if base is None or ds.id.get_storage_size() != ds.shape[0] * frame_bytes:
            return None
        pieces.append(_Piece(base + start * frame_bytes, 0, stop - start))
    elif layout == h5py.h5d.CHUNKED and tuple(ds.chunks[1:]) == tuple(ds.shape[1:]):
        per_chunk = int(ds.chunks[0])
        for first in range(start - start % per_chunk, stop, per_chunk):
            info = ds.id.get_chunk_info_by_coord((first, 0, 0))
            if info.byte_offset is None or info.size != per_chunk * frame_bytes or info.filter_mask:
                return None
            a, b = max(first, start), min(first + per_chunk, stop)
            offset = info.byte_offset + (a - first) * frame_bytes
            last = pieces[-1] if pieces else None
            if last is not None and last.offset + last.n_frames * frame_bytes == offset:
                pieces[-1] = _Piece(last.offset, last.frame, last.n_frames + b - a)  # one read
            else:
                pieces.append(_Piece(offset, a - start, b - a))
    else:
        return None
    return ds.file.filename, pieces


def _read_pieces(path: str, pieces: list[_Piece], out: np.ndarray, first: int, what: str) -> None:
    """Read the runs of bytes of :func:`_direct_plan` from file ``path`` into ``out`` (whose
    frame 0 is the dataset's frame ``first``) with ``os.preadv``, the GIL released while the
    operating system copies, after checking that the file holds them all.

    Raises
    ------
    FrameError
        A run ends past the end of the file, or a read comes back short (the file was cut while
        it was read); one line starting with ``what`` (file and frames).
    """
    frame_bytes = out[0].nbytes if len(out) else 0
    flat = memoryview(out.reshape(-1).view(np.uint8))
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        size = os.fstat(fd).st_size
        for piece in pieces:
            end = piece.offset + piece.n_frames * frame_bytes
            if end > size:
                raise FrameError(f"{what}: frames {first + piece.frame}..{first + piece.frame + piece.n_frames - 1} "
                                 f"are stored up to byte {end} of {path}, which holds {size} bytes: "
                                 "truncated")
        for piece in pieces:
            view = flat[piece.frame * frame_bytes:(piece.frame + piece.n_frames) * frame_bytes]
            done = 0
            while done < len(view):
                got = os.preadv(fd, [view[done:]], piece.offset + done)
                if got <= 0:
                    raise FrameError(f"{what}: {path} ended at byte {piece.offset + done} while it "
                                     "was read: truncated")
                done += got
    finally:
        os.close(fd)


def has_dataset(path: str, loc: str) -> bool:
    """True if the HDF5 file ``path`` holds a dataset at ``loc``."""
    import h5py

    with _open_file(path) as f:
        return isinstance(f.get(loc), h5py.Dataset)


def open_hdf5(path: str, loc: str) -> Hdf5Source:
    """Read the metadata of dataset ``loc`` in ``path`` (no pixel data).

    Raises
    ------
    FrameError
        The file cannot be opened, ``loc`` is missing or not a dataset (the message lists the
        top-level entries), or the dataset is not 2-D or 3-D.
    """
    import h5py

    with _open_file(path) as f:
        node = f.get(loc)
        if node is None:
            top = ", ".join(sorted(f.keys())) or "nothing"
            raise FrameError(f"{path}: no dataset '{loc}'; top-level entries: {top}")
        if not isinstance(node, h5py.Dataset):
            members = ", ".join(sorted(node.keys())) or "nothing"
            raise FrameError(f"{path}: '{loc}' is a group (holding {members}), expected a dataset")
        shape, dtype = node.shape, node.dtype.str
    if len(shape) == 2:
        return Hdf5Source(path, loc, 1, (int(shape[0]), int(shape[1])), dtype)
    if len(shape) == 3:
        return Hdf5Source(path, loc, int(shape[0]), (int(shape[1]), int(shape[2])), dtype)
    raise FrameError(f"{path}: dataset '{loc}' has shape {shape}, expected (frames, nz, ny) or (nz, ny)")


def read_per_frame(path: str, loc: str, n_frames: int) -> np.ndarray | None:
    """One value per frame from dataset ``loc`` of ``path`` (a process variable, docs/reference/midas_parameters.md §3.4).

    Parameters
    ----------
    path : str
        HDF5 file.
    loc : str
        Dataset path, e.g. ``/measurement/instrument/GSAS2_PVS/Temperature``.
    n_frames : int
        Frames of the file's data dataset; the dataset must hold exactly that many values.

    Returns
    -------
    ndarray (n_frames,) float64 or None
        None when the file has no dataset at ``loc``.

    Raises
    ------
    FrameError
        The dataset is not numeric or does not hold one value per frame.
    """
    import h5py

    with _open_file(path) as f:
        node = f.get(loc)
        if not isinstance(node, h5py.Dataset):
            return None
        if node.dtype.kind not in "biuf":
            raise FrameError(f"{path}: dataset '{loc}' has dtype {node.dtype}, expected numbers")
        values = np.asarray(node[()], dtype=np.float64).ravel()
    if values.size != n_frames:
        raise FrameError(f"{path}: dataset '{loc}' holds {values.size} values, expected one per "
                         f"frame ({n_frames})")
    return values
