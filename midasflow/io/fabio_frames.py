"""TIFF (tifffile) and CBF/EDF (fabio) frame files.

TIFF: one frame per page (single- or multi-page files); a single page holding a 3-D stack (as
tifffile writes a (3, nz, ny) array) is read as that many frames. CBF and EDF: every frame fabio
sees in the file. Opening reads headers only; pixel data are read in :meth:`read`, which opens
the file again, so the sources pickle to plain strings for dask workers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from midasflow.errors import FrameError

TIFF_EXTENSIONS = (".tif", ".tiff")
FABIO_EXTENSIONS = (".cbf", ".edf")


@dataclass(frozen=True)
class TiffSource:
    """Frames of one TIFF file.

    Attributes
    ----------
    path : str
    n_frames : int
    frame_shape : tuple of int
        (nz, ny).
    page_per_frame : bool
        True: frame i is page i. False: one page holds all frames.
    """

    path: str
    n_frames: int
    frame_shape: tuple[int, int]
    page_per_frame: bool

    def read(self, start: int, stop: int) -> np.ndarray:
        """Raw frames ``start:stop``, array (stop − start, nz, ny) of the stored dtype."""
        import tifffile

        with tifffile.TiffFile(self.path) as tif:
            if self.page_per_frame:
                data = tif.asarray(key=range(start, stop))
            else:
                data = tif.pages[0].asarray()[start:stop]
        return data.reshape(stop - start, *self.frame_shape)


def open_tiff(path: str) -> TiffSource:
    """Describe the frames of a TIFF file from its page headers.

    Raises
    ------
    FrameError
        Missing or unreadable file, a page whose pixel data reach past the end of the file
        (truncated), or pages that are not 2-D images.
    """
    import logging
    import math
    import os

    import tifffile

    quiet = logging.getLogger("tifffile")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # damage is reported below, in one line
    try:
        size = os.path.getsize(path)
        with tifffile.TiffFile(path) as tif:
            n_pages = len(tif.pages)
            shape = tif.pages[0].shape
            for k, page in enumerate(tif.pages):  # every page's pixel data inside the file
                end = max((o + n for o, n in zip(page.dataoffsets, page.databytecounts)), default=0)
                if end > size:
                    raise FrameError(f"{path}: truncated TIFF, page {k} needs {end} bytes but the "
                                     f"file holds {size}")
            declared = math.prod(tif.series[0].shape[:-2]) if len(shape) == 2 and tif.series else 1
            if declared > n_pages:  # the page chain breaks off before the frames it declares
                raise FrameError(f"{path}: truncated TIFF, it declares {declared} frames but holds "
                                 f"{n_pages} readable pages")
    except FileNotFoundError:
        raise FrameError(f"{path}: file not found") from None
    except (tifffile.TiffFileError, OSError, ValueError) as exc:
        raise FrameError(f"{path}: not a readable TIFF file ({exc})") from None
    finally:
        quiet.setLevel(level)
    if len(shape) == 2:
        return TiffSource(path, n_pages, (int(shape[0]), int(shape[1])), True)
    if len(shape) == 3 and n_pages == 1:
        return TiffSource(path, int(shape[0]), (int(shape[1]), int(shape[2])), False)
    raise FrameError(f"{path}: TIFF pages have shape {shape}, expected 2-D (nz, ny) images")


@dataclass(frozen=True)
class FabioSource:
    """Frames of one CBF or EDF file read through fabio.

    Attributes
    ----------
    path : str
    n_frames : int
    frame_shape : tuple of int
        (nz, ny).
    """

    path: str
    n_frames: int
    frame_shape: tuple[int, int]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Raw frames ``start:stop``, array (stop − start, nz, ny) of the stored dtype."""
        import fabio

        with fabio.open(self.path) as img:
            if self.n_frames == 1:
                return img.data[np.newaxis][start:stop]
            return np.stack([img.getframe(i).data for i in range(start, stop)])


def open_fabio(path: str) -> FabioSource:
    """Describe the frames of a CBF/EDF file from its header(s).

    Raises
    ------
    FrameError
        Missing or unreadable file.
    """
    import fabio

    try:
        header = fabio.openheader(path)
        shape, n_frames = header.shape, header.nframes
    except FileNotFoundError:
        raise FrameError(f"{path}: file not found") from None
    except Exception as exc:  # fabio raises many types for a damaged header
        raise FrameError(f"{path}: not a readable CBF/EDF file ({exc.__class__.__name__}: {exc})") from None
    if shape is None or len(shape) != 2:
        raise FrameError(f"{path}: image shape {shape} from the header, expected 2-D (nz, ny)")
    return FabioSource(path, int(n_frames), (int(shape[0]), int(shape[1])))
