"""GE detector files (``.ge1`` … ``.ge5``, any ``.geN``).

A header of ``HeadSize`` bytes (default 8192) followed by frames of NrPixelsZ×NrPixelsY
little-endian pixels, uint16 (``PixelValue 2``, default) or uint32 (``PixelValue 4``)
(docs/reference/midas_parameters.md §3.4, §8). The frame count is (file size − header) / frame bytes; a file whose
size is not header + whole frames is refused. A ``HeadSize`` above 8192 simply starts the frames
later, which is what MIDAS's conversion into extra skipped frames amounts to.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from midasflow.errors import FrameError

_EXTENSION = re.compile(r"\.ge\d+$", re.IGNORECASE)


def is_ge(path: str) -> bool:
    """True if the file name ends in ``.geN`` (N digits)."""
    return _EXTENSION.search(path) is not None


@dataclass(frozen=True)
class GeSource:
    """Frames of one GE file.

    Attributes
    ----------
    path : str
    header_bytes : int
        Bytes before the first frame.
    dtype : str
        ``'<u2'`` or ``'<u4'``.
    n_frames : int
    frame_shape : tuple of int
        (nz, ny), from the parameter file.
    """

    path: str
    header_bytes: int
    dtype: str
    n_frames: int
    frame_shape: tuple[int, int]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Raw frames ``start:stop``, array (stop − start, nz, ny) uint16/uint32."""
        nz, ny = self.frame_shape
        dtype = np.dtype(self.dtype)
        offset = self.header_bytes + start * nz * ny * dtype.itemsize
        data = np.fromfile(self.path, dtype=dtype, count=(stop - start) * nz * ny, offset=offset)
        return data.reshape(stop - start, nz, ny)

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Raw frames ``start:stop`` into ``out`` ((stop − start, nz, ny) of :attr:`dtype`,
        C-contiguous), with no array allocated."""
        nz, ny = self.frame_shape
        with open(self.path, "rb") as fh:
            fh.seek(self.header_bytes + start * nz * ny * np.dtype(self.dtype).itemsize)
            if fh.readinto(memoryview(out).cast("B")) != out.nbytes:
                raise FrameError(f"{self.path}: frames {start}..{stop - 1}: the file ends early")


def open_ge(path: str, frame_shape: tuple[int, int], *, header_bytes: int = 8192,
            pixel_value_bytes: int = 2) -> GeSource:
    """Check the size of a GE file and describe its frames (no pixel data read).

    Parameters
    ----------
    path : str
    frame_shape : tuple of int
        (NrPixelsZ, NrPixelsY) from the parameter file.
    header_bytes : int
        ``HeadSize``.
    pixel_value_bytes : int
        ``PixelValue``: 2 (uint16) or 4 (uint32).

    Raises
    ------
    FrameError
        Missing file, or a size that is not header + a whole number (≥ 1) of frames.
    """
    dtype = {2: "<u2", 4: "<u4"}[pixel_value_bytes]
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise FrameError(f"{path}: file not found") from None
    nz, ny = frame_shape
    frame_bytes = nz * ny * pixel_value_bytes
    payload = size - header_bytes
    if payload <= 0 or payload % frame_bytes:
        raise FrameError(
            f"{path}: size {size} bytes is not a {header_bytes}-byte header plus whole frames of "
            f"NrPixelsZ×NrPixelsY = {nz}×{ny} {np.dtype(dtype).name} ({frame_bytes} bytes each); "
            "check NrPixelsY/NrPixelsZ, HeadSize and PixelValue"
        )
    return GeSource(path, header_bytes, dtype, payload // frame_bytes, (nz, ny))
