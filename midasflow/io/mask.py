"""Detector masks (``MaskFile``): a TIFF in the raw detector orientation, 1 = masked.

MIDAS masks a pixel iff its value is exactly 1 (docs/reference/midas_parameters.md §3.4); 0, 255 or any other value
is a valid pixel.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from midasflow.errors import FrameError

if TYPE_CHECKING:  # pragma: no cover
    from midasflow.params import Params


def mask_from_params(params: Params) -> np.ndarray | None:
    """The parameter file's ``MaskFile`` (path relative to the parameter file allowed), or None.

    Returns
    -------
    ndarray (NrPixelsZ, NrPixelsY) bool, True = masked; None without ``MaskFile``.
    """
    if not params.mask_file:
        return None
    return read_mask(params.resolve_path(params.mask_file), (params.nr_pixels_z, params.nr_pixels_y))


def read_mask(path: str, shape: tuple[int, int]) -> np.ndarray:
    """Read a MIDAS mask TIFF.

    Parameters
    ----------
    path : str
        Single-page TIFF, raw orientation.
    shape : tuple of int
        Expected (NrPixelsZ, NrPixelsY).

    Returns
    -------
    ndarray, shape (nz, ny), bool
        True where the pixel is masked (value == 1).

    Raises
    ------
    FrameError
        Missing or unreadable file, or a shape other than ``shape``.
    """
    import tifffile

    try:
        image = tifffile.imread(path, key=0)
    except FileNotFoundError:
        raise FrameError(f"{path}: mask file not found") from None
    except (tifffile.TiffFileError, OSError, ValueError, IndexError) as exc:
        raise FrameError(f"{path}: not a readable TIFF mask ({exc})") from None
    expected = tuple(int(n) for n in shape)
    if image.shape != expected:
        raise FrameError(
            f"{path}: mask shape {image.shape} differs from NrPixelsZ×NrPixelsY = {expected}"
        )
    return image == 1
