"""HDF5 / NeXus frame files (``.h5 .hdf5 .hdf .nxs``).

The dataset is ``(frames, nz, ny)`` or a single ``(nz, ny)`` frame. Compressed datasets
(bitshuffle/LZ4, Blosc, … as written by Eiger/Pilatus/Dectris software) are decoded through the
filters registered by ``import hdf5plugin``. Files are opened inside :meth:`Hdf5Source.read`, so a
source pickles to a few strings and works on any dask worker.
"""
from __future__ import annotations

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
        :attr:`dtype`), with no array allocated (``read_direct``)."""
        with _open_file(self.path) as f:
            ds = f[self.loc]
            if ds.ndim == 2:
                out[...] = ds[()][np.newaxis][start:stop]
            else:
                ds.read_direct(out, np.s_[start:stop])


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
