"""HDF5 / NeXus frame files (``.h5 .hdf5 .hdf .nxs``).

The dataset is ``(frames, nz, ny)`` or a single ``(nz, ny)`` frame. Compressed datasets
(bitshuffle/LZ4, Blosc, … as written by Eiger/Pilatus/Dectris software) are decoded through the
filters registered by ``import hdf5plugin``. Files are opened inside :meth:`Hdf5Source.read`, so a
source pickles to a few strings and works on any dask worker.

:meth:`Hdf5Source.read_into` (the caking path) reads the stored bytes itself where the layout
allows it (docs/architecture.md, "Reading HDF5 frames"): HDF5 reports where each chunk (or the
contiguous data) lies in the file (``H5Dget_chunk_info``, ``H5Dget_offset``), and an
uncompressed frame's bytes are then read with ``os.preadv`` straight into the caller's buffer,
about half the CPU time of HDF5's own read of the same bytes; bitshuffle-LZ4 chunks (Eiger) are
read the same way, checked and decoded on two threads (:mod:`midasflow.io.bslz4`). Anything it
does not recognise (other filters, chunks splitting a frame, a big-endian type, a user block,
external or virtual storage, an unwritten chunk) goes through h5py's ``read_direct``, a
bitshuffle dataset's chunks checked first (HDF5's filter crashes on a damaged one).
"""
from __future__ import annotations

import concurrent.futures
import os
import threading
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
        """Raw frames ``start:stop`` as an array (stop − start, nz, ny) of the stored dtype
        (:meth:`read_into` a new array)."""
        with _open_file(self.path) as f:
            ds = f[self.loc]
            if ds.ndim == 2:
                _check_bitshuffle_chunks(ds, 0, 1, f"{self.path}: frame 0")
                return ds[()][np.newaxis][start:stop]
            dtype = ds.dtype
        out = np.empty((max(0, stop - start), *self.frame_shape), dtype=dtype)
        self.read_into(start, stop, out)
        return out

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Raw frames ``start:stop`` of a 3-D dataset into ``out`` ((stop − start, nz, ny) of
        :attr:`dtype`, C-contiguous), with no array allocated: the stored bytes read (and
        bitshuffle-LZ4 chunks decoded) here where :func:`_direct_plan` finds the layout plain,
        else h5py's ``read_direct`` (bitshuffle chunks checked first:
        :func:`_check_bitshuffle_chunks`).

        Raises
        ------
        FrameError
            The file ends before the bytes HDF5 places the frames at, or a bitshuffle chunk is
            damaged (one line naming the file and the frames).
        """
        what = f"{self.path}: frames {start}..{stop - 1}"
        with _open_file(self.path) as f:
            ds = f[self.loc]
            if ds.ndim == 2:
                _check_bitshuffle_chunks(ds, 0, 1, what)
                out[...] = ds[()][np.newaxis][start:stop]
                return
            plan = _direct_plan(f, ds, start, stop, out)
            if plan is None:
                _check_bitshuffle_chunks(ds, start, stop, what)
                ds.read_direct(out, np.s_[start:stop])
                return
        _read_plan(plan, out, start, what)


@dataclass(frozen=True)
class _Piece:
    """``n_frames`` frames stored as ``n_bytes`` bytes at byte ``offset`` of the file, the first
    being frame ``frame`` of the read's output (negative for a compressed chunk that starts
    before the frames read)."""

    offset: int
    n_bytes: int
    frame: int
    n_frames: int


@dataclass(frozen=True)
class _Plan:
    """Where a read's frames are stored: in file ``path`` (an external link's target, say), as
    ``pieces``, raw (``codec`` "") or one bitshuffle-LZ4 chunk a piece (``codec`` "bslz4")."""

    path: str
    codec: str
    pieces: list[_Piece]


def _codec(dcpl, itemsize: int) -> str | None:
    """"" for no filter, "bslz4" for HDF5's bitshuffle filter with LZ4 alone
    (:data:`midasflow.io.bslz4.HDF5_FILTER`), None for anything else."""
    from midasflow.io import bslz4

    n = dcpl.get_nfilters()
    if n == 0:
        return ""
    if n == 1:
        code, _, values, _ = dcpl.get_filter(0)
        if (code == bslz4.HDF5_FILTER and len(values) >= 5 and values[4] == bslz4.HDF5_LZ4
                and values[2] == itemsize):
            return "bslz4"
    return None


def _direct_plan(f, ds, start: int, stop: int, out: np.ndarray) -> _Plan | None:
    """Where frames ``start:stop`` of the open 3-D dataset ``ds`` are stored, when nothing but
    a bitshuffle-LZ4 filter stands between those bytes and ``out``'s: no other filter, whole
    frames per chunk (or contiguous storage), every chunk written and (uncompressed) of exactly
    its frames' size, the stored type ``out``'s own (native byte order), no user block, no
    external or virtual storage, a plain POSIX file. None otherwise: the caller reads through
    HDF5."""
    import h5py

    dtype = np.dtype(ds.dtype)
    frame_bytes = int(np.prod(ds.shape[1:])) * dtype.itemsize
    if (dtype != out.dtype or not dtype.isnative or dtype.kind not in "uif" or f.driver != "sec2"
            or f.userblock_size != 0 or not out.flags.c_contiguous
            or out.shape != (stop - start, *ds.shape[1:])):
        return None
    dcpl = ds.id.get_create_plist()
    codec = _codec(dcpl, dtype.itemsize)
    if codec is None or dcpl.get_external_count() != 0:
        return None
    layout = dcpl.get_layout()
    pieces: list[_Piece] = []
    if layout == h5py.h5d.CONTIGUOUS:
        base = ds.id.get_offset()
        if base is None or ds.id.get_storage_size() != ds.shape[0] * frame_bytes:
            return None
        pieces.append(_Piece(base + start * frame_bytes, (stop - start) * frame_bytes, 0, stop - start))
    elif layout == h5py.h5d.CHUNKED and tuple(ds.chunks[1:]) == tuple(ds.shape[1:]):
        per_chunk = int(ds.chunks[0])
        for first in range(start - start % per_chunk, stop, per_chunk):
            info = ds.id.get_chunk_info_by_coord((first, 0, 0))
            if info.byte_offset is None or info.filter_mask:
                return None
            if codec:  # the whole chunk, decoded in one piece (LZ4 never doubles a block)
                if info.size > 2 * per_chunk * frame_bytes + 4096:
                    return None
                pieces.append(_Piece(info.byte_offset, info.size, first - start, per_chunk))
                continue
            if info.size != per_chunk * frame_bytes:
                return None
            a, b = max(first, start), min(first + per_chunk, stop)
            offset = info.byte_offset + (a - first) * frame_bytes
            last = pieces[-1] if pieces else None
            if last is not None and last.offset + last.n_bytes == offset:  # one read
                pieces[-1] = _Piece(last.offset, last.n_bytes + (b - a) * frame_bytes, last.frame,
                                    last.n_frames + b - a)
            else:
                pieces.append(_Piece(offset, (b - a) * frame_bytes, a - start, b - a))
    else:
        return None
    return _Plan(ds.file.filename, codec, pieces)


_SCRATCH = threading.local()


def _scratch(n_bytes: int) -> np.ndarray:
    """A uint8 array of ``n_bytes`` for compressed chunks, reused by the calling thread."""
    buf = getattr(_SCRATCH, "chunks", None)
    if buf is None or buf.size < n_bytes:
        buf = _SCRATCH.chunks = np.empty(n_bytes, dtype=np.uint8)
    return buf[:n_bytes]


def _pread(fd: int, view: memoryview, offset: int, path: str, what: str) -> None:
    """Fill ``view`` from byte ``offset`` of the open file ``fd`` (``os.preadv``, the GIL
    released while the operating system copies); FrameError if the file ends first."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise FrameError(f"{what}: {path} ended at byte {offset + done} while it was read: "
                             "truncated")
        done += got


def _read_plan(plan: _Plan, out: np.ndarray, first: int, what: str) -> None:
    """Read the frames :func:`_direct_plan` located into ``out`` (whose frame 0 is the
    dataset's frame ``first``), after checking that the file holds every piece: raw pieces
    straight into ``out``, compressed chunks into a scratch buffer, then decoded
    (:func:`midasflow.io.bslz4.decode_hdf5_chunk`) into ``out`` on the decoding threads
    (:func:`midasflow.io.bslz4.decode_pool`; through a chunk-sized array for a chunk holding
    frames outside the read).

    Raises
    ------
    FrameError
        A piece ends past the end of the file, a read comes back short (the file was cut while
        it was read), or a chunk is damaged; one line starting with ``what`` (file and frames).
    """
    from midasflow.io import bslz4

    frame_bytes = out[0].nbytes if len(out) else 0
    flat = memoryview(out.reshape(-1).view(np.uint8))
    fd = os.open(plan.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        size = os.fstat(fd).st_size
        for piece in plan.pieces:
            if piece.offset + piece.n_bytes > size:
                a, b = max(first, first + piece.frame), min(first + len(out), first + piece.frame + piece.n_frames)
                raise FrameError(f"{what}: frames {a}..{b - 1} are stored up to byte "
                                 f"{piece.offset + piece.n_bytes} of {plan.path}, which holds {size} "
                                 "bytes: truncated")
        if not plan.codec:
            for piece in plan.pieces:
                view = flat[piece.frame * frame_bytes:piece.frame * frame_bytes + piece.n_bytes]
                _pread(fd, view, piece.offset, plan.path, what)
            return
        scratch = _scratch(sum(piece.n_bytes for piece in plan.pieces))
        starts = np.cumsum([0] + [piece.n_bytes for piece in plan.pieces])
        for piece, pos in zip(plan.pieces, starts):
            _pread(fd, memoryview(scratch[pos:pos + piece.n_bytes]), piece.offset, plan.path, what)
    finally:
        os.close(fd)
    def decode(piece: _Piece, pos: int) -> None:
        chunk = scratch[pos:pos + piece.n_bytes]
        where = f"{what}: chunk of frames {first + piece.frame}..{first + piece.frame + piece.n_frames - 1}"
        if piece.frame >= 0 and piece.frame + piece.n_frames <= len(out):
            bslz4.decode_hdf5_chunk(chunk, out[piece.frame:piece.frame + piece.n_frames], where)
        else:  # the chunk holds frames before or after the read
            whole = np.empty((piece.n_frames, *out.shape[1:]), dtype=out.dtype)
            bslz4.decode_hdf5_chunk(chunk, whole, where)
            a, b = max(0, piece.frame), min(len(out), piece.frame + piece.n_frames)
            out[a:b] = whole[a - piece.frame:b - piece.frame]

    pool = bslz4.decode_pool()
    futures = [pool.submit(decode, piece, pos) for piece, pos in zip(plan.pieces, starts)]
    concurrent.futures.wait(futures)  # none still writes into out or reads the scratch buffer
    for future in futures:
        future.result()  # the first error


def _check_bitshuffle_chunks(ds, start: int, stop: int, what: str) -> None:
    """Before HDF5 decodes frames ``start:stop`` of ``ds`` (all of a 2-D dataset): check every
    chunk its bitshuffle filter would decode with LZ4 or zstd blocks (:mod:`midasflow.io.bslz4`:
    the filter's decoder trusts the block counts and crashes the process on a damaged chunk).
    Nothing for a dataset without that filter.

    Raises
    ------
    FrameError
        A damaged chunk, or a bitshuffle filter followed by another filter (its chunks cannot
        be checked before decoding); one line starting with ``what``.
    """
    import itertools

    from midasflow.io import bslz4

    dcpl = ds.id.get_create_plist()
    n = dcpl.get_nfilters()
    index = next((i for i in range(n) if dcpl.get_filter(i)[0] == bslz4.HDF5_FILTER), None)
    if index is None:
        return
    values = dcpl.get_filter(index)[2]
    if len(values) < 5 or values[4] not in (bslz4.HDF5_LZ4, 3):  # bitshuffle alone: no blocks
        return
    if index != n - 1:
        raise FrameError(f"{what}: the dataset's bitshuffle filter (HDF5 32008) is followed by another "
                         "filter, so its chunks cannot be checked before they are decoded; refused "
                         "(bitshuffle's decoder crashes the process on a damaged chunk)")
    itemsize = ds.dtype.itemsize
    chunk_bytes = int(np.prod(ds.chunks)) * itemsize
    if ds.ndim == 3:
        axes = [range(start - start % ds.chunks[0], stop, ds.chunks[0])]
        axes += [range(0, size, step) for size, step in zip(ds.shape[1:], ds.chunks[1:])]
    else:
        axes = [range(0, size, step) for size, step in zip(ds.shape, ds.chunks)]
    for coord in itertools.product(*axes):
        info = ds.id.get_chunk_info_by_coord(coord)
        if info.byte_offset is None or info.filter_mask & (1 << index):
            continue  # not written (fill value), or stored without the filter
        _, data = ds.id.read_direct_chunk(coord)
        bslz4.check_hdf5_chunk(np.frombuffer(data, dtype=np.uint8), chunk_bytes, itemsize,
                               f"{what}: chunk at {coord}")


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
