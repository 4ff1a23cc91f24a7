"""Raw detector frames as a lazy, dark-subtracted ``xarray.DataArray`` over dask.

:func:`open_frames` reads metadata only: it resolves the file series, checks every file (exists,
format known, dataset present, frame shape equal to NrPixelsZ×NrPixelsY) and builds a dask graph
whose tasks open the files themselves, so the graph pickles and runs on any dask worker.

Formats, dispatched on the extension (one small module each):

============================  ===============================================================
``.h5 .hdf5 .hdf .nxs``       HDF5/NeXus dataset ``data_loc`` (compressed via hdf5plugin)
``.ge1`` … ``.geN``           GE binary: ``HeadSize``-byte header, uint16/uint32 (``PixelValue``)
``.tif .tiff``                TIFF, one frame per page (tifffile)
``.cbf .edf``                 CBF / EDF (fabio)
``.zarr``, ``.zip``, zarr dir  zarr array, or array ``data_loc`` of a zarr group (format 2 or 3)
============================  ===============================================================

Choices (see docs/reference/midas_parameters.md §8):

* **Series** (docs/reference/midas_parameters.md §8): :class:`ScanSource`'s ``start_file_nr``/``end_file_nr`` select files whose names differ only in the
  file number. :func:`open_frames` reads them as one scan, concatenated along ``frame`` (a
  missing file is then an error: it would silently break the ω sequence);
  :meth:`ScanSource.per_file` splits them into one scan per file, as MIDAS's integrator does,
  skipping a missing file with a warning.
* **SkipFrame** drops the first ``SkipFrame`` frames *of the scan* (of its first file, running
  into the next files only if the first holds fewer frames). MIDAS drops them from every file of
  a multi-frame series; we treat a series as one continuous acquisition whose ω follows
  ``OmegaStart + i·OmegaStep`` for the kept frames i = 0, 1, ….
* **Dark** = mean of the dark frames after the first ``SkipFrame`` (all frames if the dark holds
  no more than ``SkipFrame``, e.g. a single-frame dark TIFF), subtracted in float32. Source, in
  order: :class:`ScanSource`'s ``dark_fn``; the parameter file's ``Dark``; dataset ``dark_loc`` inside the (first) HDF5
  data file or zarr group. None found: no subtraction.
* **Threshold** (``-preProcThresh T``, :class:`ScanSource`'s ``pre_proc_thresh``): after the dark
  is subtracted, a pixel below T becomes 0 and a negative one 0, as MIDAS's ZIPGEN does
  (``raw < dark + T → 0``, else ``max(0, raw − dark)``; MIDAS truncates the dark mean to an
  integer first, midasflow keeps it exact). Without a dark the threshold applies to the raw values.
* **Detector flags**: pixels whose raw value is negative in signed-integer data (Pilatus gaps −1,
  bad pixels −2) or the largest value of unsigned-integer data (Eiger gaps and dead pixels,
  2³²−1 or 2¹⁶−1; a pixel saturated at the full range of its type is no measurement either)
  become NaN, in frames and dark alike; floating-point raw data are kept as they are (negative
  values can be real after pre-processing; NaN stays NaN).
* **Process variables** (midas_parameters.md §3.4): ``Temperature``/``Pressure``/``I``/``I0`` per frame, read from the
  HDF5 data files at ``TemperatureDatasetPath`` etc. (default
  ``/measurement/instrument/GSAS2_PVS/<name>``), concatenated over the series, SkipFrame frames
  dropped, and attached as frame coordinates ``temperature``, ``pressure``, ``i``, ``i0``. A
  variable is attached only when every file of the scan holds it; a dataset that does not hold
  one value per frame is an error.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from midasflow.errors import FrameError
from midasflow.io.mask import read_mask
from midasflow.io.untrusted import reading
from midasflow.limits import MAX_FRAMES

if TYPE_CHECKING:
    import xarray as xr

    from midasflow.params import Params

__all__ = ["ScanSource", "open_frames", "read_mask", "series_files", "series_names", "open_source",
           "ScanReader", "is_frame_file", "dark_mean"]

#: Target size of one dask chunk of float32 frames.
CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ScanSource:
    """Where a scan's frames are: the six arguments of MIDAS's ``integrator.py`` that name them.

    Attributes
    ----------
    data_fn : str
        Frame file, or the first/any file of a numbered series; format from the extension.
    dark_fn : str or None
        Dark file in any supported format; overrides the parameter file's ``Dark``.
    data_loc, dark_loc : str
        Dataset paths inside HDF5 files and zarr groups (``-dataLoc``, ``-darkLoc``).
    start_file_nr, end_file_nr : int or None
        Inclusive file-number range of a series (:func:`series_files`; ``-startFileNr``,
        ``-endFileNr``).
    pre_proc_thresh : float or None
        ``-preProcThresh T``: after dark subtraction, pixels below T become 0 and negative values
        0 (MIDAS's ZIPGEN: raw < dark + T → 0, else max(0, raw − dark)); None (MIDAS's −1):
        values kept as they are.
    frames_per_read : int or None
        ``-numFrameChunks N``: read (and cake) at most N frames at a time, to bound memory; None
        (MIDAS's −1): midasflow's own chunk, one pass of the caking kernel.
    """

    data_fn: str
    dark_fn: str | None = None
    data_loc: str = "exchange/data"
    dark_loc: str = "exchange/dark"
    start_file_nr: int | None = None
    end_file_nr: int | None = None
    pre_proc_thresh: float | None = None
    frames_per_read: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_fn", os.fspath(self.data_fn))
        if self.dark_fn is not None:
            object.__setattr__(self, "dark_fn", os.fspath(self.dark_fn))
        if self.frames_per_read is not None and int(self.frames_per_read) < 1:
            raise FrameError(f"-numFrameChunks {self.frames_per_read}: expected a frame count >= 1 "
                             "(or -1 for the default)")

    @classmethod
    def of(cls, source: ScanSource | str | os.PathLike) -> ScanSource:
        """``source`` as is, or a single data file with every other setting at its default."""
        return source if isinstance(source, ScanSource) else cls(os.fspath(source))

    def files(self) -> list[str]:
        """The scan's data files (:func:`series_files`); FrameError if one is missing."""
        return series_files(self.data_fn, self.start_file_nr, self.end_file_nr)

    @property
    def is_series(self) -> bool:
        """Whether the file range names more than one file."""
        return len(series_names(self.data_fn, self.start_file_nr, self.end_file_nr)) > 1

    def per_file(self) -> list[ScanSource]:
        """One scan per file of the range, as MIDAS's ``integrator.py`` makes them: every other
        setting kept, a missing file skipped with a warning naming it.

        Raises
        ------
        FrameError
            No file of the range exists (or the range is malformed).
        """
        import warnings

        names = series_names(self.data_fn, self.start_file_nr, self.end_file_nr)
        kept = [name for name in names if os.path.exists(name)]
        for name in names:
            if name not in kept:
                warnings.warn(f"{name}: file not found; skipped (a missing file of the range is skipped, "
                              "as MIDAS's integrator does)", UserWarning, stacklevel=2)
        if not kept:
            raise FrameError(f"{names[0]}: no file of the range {names[0]} .. {names[-1]} exists")
        return [dataclasses.replace(self, data_fn=name, start_file_nr=None, end_file_nr=None)
                for name in kept]


class FrameSource(Protocol):
    """One file's frames: metadata as attributes, pixels read on demand."""

    path: str
    n_frames: int
    frame_shape: tuple[int, int]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Raw frames ``start:stop`` as an array (stop − start, nz, ny)."""


def is_frame_file(path: str | os.PathLike) -> bool:
    """Whether :func:`open_source` reads files of this name's format (by its extension; a
    zarr store is recognised by its extension or folder layout)."""
    from midasflow.io import fabio_frames, ge, hdf5, zarr_frames

    lower = os.fspath(path).lower()
    return (lower.endswith(hdf5.EXTENSIONS + fabio_frames.TIFF_EXTENSIONS + fabio_frames.FABIO_EXTENSIONS)
            or ge.is_ge(lower) or zarr_frames.is_zarr(os.fspath(path)))


def open_source(path: str, params: Params, loc: str) -> FrameSource:
    """Describe the frames of one file (no pixel data read) and check their shape.

    Parameters
    ----------
    path : str
        Frame file; the format follows from the extension (module docstring).
    params : Params
        Supplies NrPixelsZ×NrPixelsY (and ``HeadSize``/``PixelValue`` for GE files).
    loc : str
        Dataset path for HDF5 files and zarr groups.

    Raises
    ------
    FrameError
        Missing file, unknown extension, missing dataset, or a frame shape other than
        NrPixelsZ×NrPixelsY.
    """
    from midasflow.io import fabio_frames, ge, hdf5, zarr_frames

    if not os.path.exists(path):
        raise FrameError(f"{path}: file not found")
    expected = (int(params.nr_pixels_z), int(params.nr_pixels_y))
    lower = path.lower()
    source: FrameSource
    if lower.endswith(hdf5.EXTENSIONS):
        source = hdf5.open_hdf5(path, loc)
    elif ge.is_ge(lower):
        source = ge.open_ge(path, expected, header_bytes=params.ge_header_bytes,
                            pixel_value_bytes=params.pixel_value_bytes)
    elif lower.endswith(fabio_frames.TIFF_EXTENSIONS):
        source = fabio_frames.open_tiff(path)
    elif lower.endswith(fabio_frames.FABIO_EXTENSIONS):
        source = fabio_frames.open_fabio(path)
    elif zarr_frames.is_zarr(path):
        source = zarr_frames.open_zarr(path, loc)
    else:
        raise FrameError(
            f"{path}: unknown frame format {Path(path).suffix or '(no extension)'!r}; expected "
            ".h5/.hdf5/.hdf/.nxs, .geN, .tif/.tiff, .cbf, .edf, .zarr or .zip"
        )
    if source.frame_shape != expected:
        raise FrameError(
            f"{path}: frames are {source.frame_shape[0]}×{source.frame_shape[1]} (z×y) but the "
            f"parameters say NrPixelsZ×NrPixelsY = {expected[0]}×{expected[1]}"
        )
    if source.n_frames < 1:
        raise FrameError(f"{path}: holds no frames")
    return source


def _find_file_number(name: str, number: int | None) -> tuple[int, int]:
    """(start index, width) of the file-number digits inside ``name`` (a base name).

    ``number`` given: its six-digit zero-padded spelling, else a digit run of any width equal to
    it. Otherwise (or if it does not occur): the first run of exactly six digits, else the last
    digit run of the stem (the extension's digits, e.g. ``.ge3``, never count).
    """
    stem = name[: len(name) - len(Path(name).suffix)]
    runs = [(m.start(), m.end() - m.start(), int(m.group())) for m in re.finditer(r"\d+", stem)]
    if number is not None:
        matches = [r for r in runs if r[1] == 6 and r[2] == number] or [r for r in runs[::-1] if r[2] == number]
        if matches:
            return matches[0][:2]
    six = [r for r in runs if r[1] == 6]
    if six or runs:
        return (six or runs[-1:])[0][:2]
    raise FrameError(f"{name}: no file number in the name to build a file series from")


def series_names(data_fn: str | os.PathLike, start_file_nr: int | None = None,
                 end_file_nr: int | None = None) -> list[str]:
    """The file names :func:`series_files` returns, whether the files exist or not.

    Raises
    ------
    FrameError
        No number in the name, or ``end < start``.
    """
    data_fn = os.fspath(data_fn)
    if start_file_nr is None and end_file_nr is None:
        return [data_fn]
    folder, name = os.path.split(data_fn)
    pos, width = _find_file_number(name, start_file_nr)
    start = int(name[pos:pos + width]) if start_file_nr is None else int(start_file_nr)
    end = start if end_file_nr is None else int(end_file_nr)
    if end < start:
        raise FrameError(f"{data_fn}: end file number {end} is before start file number {start}")
    return [os.path.join(folder, f"{name[:pos]}{k:0{width}d}{name[pos + width:]}")
            for k in range(start, end + 1)]


def series_files(data_fn: str | os.PathLike, start_file_nr: int | None = None,
                 end_file_nr: int | None = None) -> list[str]:
    """File names of a numbered scan (docs/reference/midas_parameters.md §8).

    Parameters
    ----------
    data_fn : path
        One file of the series; its number locates the digits to replace (see
        ``_find_file_number``); a number wider than its digits widens the name.
    start_file_nr, end_file_nr : int, optional
        Inclusive range. Both None: ``[data_fn]``. ``start_file_nr`` None: the number in the
        name. ``end_file_nr`` None: one file.

    Returns
    -------
    list of str
        Names with the number zero-padded to the width it has in ``data_fn``.

    Raises
    ------
    FrameError
        No number in the name, ``end < start``, or a file of the series is missing.
    """
    files = series_names(data_fn, start_file_nr, end_file_nr)
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        more = f" (and {len(missing) - 1} more of the series)" if len(missing) > 1 else ""
        raise FrameError(f"{missing[0]}: file not found{more}")
    return files


def _to_float32(raw: np.ndarray) -> np.ndarray:
    """Raw frames -> float32; detector flags -> NaN: negative values of signed-integer data,
    the type's largest value in unsigned-integer data."""
    out = raw.astype(np.float32)
    if raw.dtype.kind == "i":
        out[raw < 0] = np.nan
    elif raw.dtype.kind == "u":
        out[raw == np.iinfo(raw.dtype).max] = np.nan
    return out


@dataclass(frozen=True)
class ScanReader:
    """Array-like view (frame, z, y) float32 of several files' frames after ``skip`` frames.

    Indexing with slices reads only the frames asked for (opening the files inside the call),
    converts them to float32 and turns detector flags into NaN. A file that cannot be decoded
    (truncated, corrupt chunk, bad CRC) raises :class:`FrameError` naming it and the frames.
    Picklable; used by ``dask.array.from_array``.
    """

    sources: tuple[FrameSource, ...]
    skip: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """(frames after skip, nz, ny)."""
        total = sum(s.n_frames for s in self.sources)
        return (total - self.skip, *self.sources[0].frame_shape)

    @property
    def dtype(self) -> np.dtype:
        """Always float32."""
        return np.dtype(np.float32)

    @property
    def ndim(self) -> int:
        """3."""
        return 3

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        frames = key[0] if key else slice(None)
        if not isinstance(frames, slice):
            raise TypeError("ScanReader takes slices along the frame axis")
        start, stop, step = frames.indices(self.shape[0])
        raw = self.read_raw(start, max(start, stop))
        return _to_float32(raw)[(slice(None, None, step), *key[1:])]

    def read_raw(self, start: int, stop: int,
                 buffer: Callable[[tuple[int, ...], np.dtype], np.ndarray] | None = None
                 ) -> np.ndarray:
        """Frames ``start:stop`` (after ``skip``) as stored, (stop − start, nz, ny) of the files'
        dtype (several files' dtypes promoted), no flag turned into NaN: what
        :meth:`__getitem__` converts, for a kernel that converts while it reads
        (:class:`midasflow.caking_kernel.RawCorrection`).

        ``buffer(shape, dtype)``, when given, supplies the array to read into (a caller's
        reused buffer) where every file's source reads into an array (``read_into``: HDF5, GE)
        and the files share one dtype; the result is then that array.
        """
        lo, hi = start + self.skip, stop + self.skip  # raw indices over the series
        spans, offset = [], 0
        for source in self.sources:
            a, b = max(lo, offset), min(hi, offset + source.n_frames)
            if a < b:
                spans.append((source, a - offset, b - offset, a - lo))
            offset += source.n_frames
        nz, ny = self.shape[1:]
        dtypes = {getattr(source, "dtype", "") for source, *_ in spans}
        if buffer is not None and spans and all(hasattr(s, "read_into") for s, *_ in spans) \
                and len(dtypes) == 1 and "" not in dtypes:
            out = buffer((hi - lo, nz, ny), np.dtype(dtypes.pop()))
            for source, a, b, pos in spans:
                with reading(source.path, f"frames {a}..{b - 1}", FrameError):
                    source.read_into(a, b, out[pos:pos + b - a])
            return out
        pieces = []
        for source, a, b, _ in spans:
            with reading(source.path, f"frames {a}..{b - 1}", FrameError):
                pieces.append(source.read(a, b))
        return (pieces[0] if len(pieces) == 1 else np.concatenate(pieces) if pieces
                else np.empty((0, nz, ny), np.float32))  # one file: no copy


@dataclass(frozen=True)
class RawFrames:
    """How :func:`open_frames` computes its frames from the files: raw frames read by
    ``reader``, turned into float32 with detector flags NaN, minus ``dark``, thresholded at
    ``threshold``. :func:`midasflow.caking.cake` cakes such a scan from the raw frames, the
    conversion done inside the kernel (:class:`midasflow.caking_kernel.RawCorrection`), with
    the same result.

    Attributes
    ----------
    reader : ScanReader
        The scan's raw frames (:meth:`ScanReader.read_raw`).
    dark : dask array (nz, ny) float32 or None
        The dark frame subtracted (:func:`dark_mean`).
    threshold : float or None
        ``-preProcThresh``.
    frames_per_read : int or None
        The frames per read the caller asked for (``-numFrameChunks``, ``frames_per_chunk``),
        None for the default.
    """

    reader: ScanReader
    dark: Any
    threshold: float | None
    frames_per_read: int | None


#: open_frames' recipes by the dask name of the frames they compute (most recent last).
_RAW_FRAMES: dict[str, RawFrames] = {}
_RAW_FRAMES_LOCK = threading.Lock()
_MAX_RAW_FRAMES = 256


def raw_frames_of(frames: Any) -> RawFrames | None:
    """The recipe of a dask array that :func:`open_frames` returned (in this process), None for
    any other array.

    A dask array's name is the token of its whole computation, so an array with the name of
    open_frames' result is that result (the same files, read the same way); any operation on
    it (selecting frames, rechunking, arithmetic) gives another name, and None here.
    """
    with _RAW_FRAMES_LOCK:
        raw = _RAW_FRAMES.get(getattr(frames, "name", None))
    if raw is None or tuple(frames.shape) != raw.reader.shape:
        return None
    return raw


def _frames_per_chunk(shape: tuple[int, int, int], frames_per_chunk: int | None) -> int:
    if frames_per_chunk is None:
        return max(1, CHUNK_BYTES // (shape[1] * shape[2] * 4))
    if int(frames_per_chunk) < 1:
        raise FrameError(f"frames_per_chunk: expected a frame count >= 1, got {frames_per_chunk}")
    return int(frames_per_chunk)


def _lazy(reader: ScanReader, per_chunk: int, label: str):
    """dask array over ``reader``, chunked by ``per_chunk`` frames, named by the files' state."""
    import dask.array as da
    from dask.base import tokenize

    n, nz, ny = reader.shape
    stamps = [(s.path, os.stat(s.path).st_mtime_ns, os.stat(s.path).st_size) for s in reader.sources]
    chunks = ((per_chunk,) * (n // per_chunk) + ((n % per_chunk,) if n % per_chunk else ()), (nz,), (ny,))
    name = f"{label}-{tokenize(reader, stamps, per_chunk)}"
    return da.from_array(reader, chunks=chunks, name=name, meta=np.empty((0, 0, 0), np.float32))


def _dark_source(first_file: str, params: Params, dark_fn: str | None, dark_loc: str) -> FrameSource | None:
    from midasflow.io import hdf5, zarr_frames

    if dark_fn is None and params.dark_file:
        dark_fn = params.resolve_path(params.dark_file)
    if dark_fn is not None:
        return open_source(os.fspath(dark_fn), params, dark_loc)
    lower = first_file.lower()
    if lower.endswith(hdf5.EXTENSIONS) and hdf5.has_dataset(first_file, dark_loc):
        return open_source(first_file, params, dark_loc)
    if zarr_frames.is_zarr(first_file) and zarr_frames.has_array(first_file, dark_loc):
        return open_source(first_file, params, dark_loc)
    return None


def dark_mean(first_file: str, params: Params, dark_fn: str | None, dark_loc: str,
              frames_per_chunk: int | None = None) -> tuple[Any, str]:
    """The dark frame subtracted from every frame, lazily: the mean of the dark frames after the
    first ``SkipFrame`` (all of them when there are no more), float32 (nz, ny) dask array.

    The dark is ``dark_fn``, else the parameter file's ``Dark``, else dataset ``dark_loc`` in
    ``first_file`` (HDF5, zarr); returns ``(None, "")`` when there is none, else the array and
    a label naming the file (and dataset).
    """
    import dask
    import dask.array as da
    from dask.base import tokenize

    dark = _dark_source(first_file, params, dark_fn, dark_loc)
    if dark is None:
        return None, ""
    skip = int(params.skip_frame)
    dark_reader = ScanReader((dark,), skip if dark.n_frames > skip else 0)
    per_chunk = _frames_per_chunk(dark_reader.shape, frames_per_chunk)
    status = os.stat(dark.path)
    stamp = (dark.path, status.st_mtime_ns, status.st_size)
    name = f"dark-mean-{tokenize(dark_reader, stamp, per_chunk)}"
    task = dask.delayed(_dark_frame, pure=True)(name, dark_reader, per_chunk, dask_key_name=name)
    label = dark.path + (f"::{dark.loc}" if getattr(dark, "loc", "") else "")
    return da.from_delayed(task, shape=dark_reader.shape[1:], dtype=np.float32,
                           meta=np.empty((0, 0), np.float32)), label


#: Partial sums a dask reduction adds at once (its ``split_every`` default).
_SPLIT_EVERY = 4


def _sum_in_order(parts: list[np.ndarray]) -> np.ndarray:
    """``parts[0] + parts[1] + ...`` added in order, in place of ``parts[0]``."""
    total = parts[0]
    for part in parts[1:]:
        np.add(total, part, out=total)
    return total


def _mean_frames(reader: ScanReader, per_chunk: int) -> np.ndarray:
    """The float32 mean of ``reader``'s frames (flags NaN), bit for bit what dask's
    ``frames.astype(float64).mean(axis=0).astype(float32)`` gives over chunks of ``per_chunk``
    frames: a float64 sum frame by frame within each chunk, the chunks' sums added in dask's
    tree (groups of ``_SPLIT_EVERY`` consecutive sums, in order), divided by the count. Without
    a float copy of the frames: one chunk of raw frames in memory, summed in one sweep
    (:func:`midasflow.caking_kernel.sum_raw_frames`)."""
    from midasflow.caking_kernel import sum_raw_frames

    n = reader.shape[0]
    sums = [sum_raw_frames(reader.read_raw(lo, min(lo + per_chunk, n)))
            for lo in range(0, n, per_chunk)]
    depth = max(1, math.ceil(math.log(len(sums), _SPLIT_EVERY))) if len(sums) > 1 else 1
    for _ in range(depth - 1):
        sums = [_sum_in_order(sums[i:i + _SPLIT_EVERY]) for i in range(0, len(sums), _SPLIT_EVERY)]
    return (_sum_in_order(sums) / n).astype(np.float32)


#: The darks computed in this process, by their graph key (most recent last).
_DARKS: dict[str, np.ndarray] = {}
_DARKS_LOCK = threading.Lock()
#: Darks kept (a frame each, 16 MiB for 2048² pixels).
_MAX_DARKS = 2


def _dark_frame(name: str, reader: ScanReader, per_chunk: int) -> np.ndarray:
    """The task of :func:`dark_mean`'s array ``name``: :func:`_mean_frames`, computed once per
    process. The key names the dark's files, their size and modification time and the
    chunking, so reading the first frame's flags with the dark (:func:`midasflow.caking.cake`)
    and caking the scan, two computations, read the dark files once. Read-only."""
    with _DARKS_LOCK:
        dark = _DARKS.get(name)
    if dark is None:
        dark = _mean_frames(reader, per_chunk)
        dark.flags.writeable = False
        with _DARKS_LOCK:
            dark = _DARKS.setdefault(name, dark)
            while len(_DARKS) > _MAX_DARKS:
                del _DARKS[next(iter(_DARKS))]
    return dark


def _process_variables(sources: tuple[FrameSource, ...], params: Params,
                       skip: int) -> dict[str, np.ndarray]:
    """Per-frame process variables found in every (HDF5) file, concatenated, SkipFrame dropped."""
    from midasflow.io import hdf5

    if not all(s.path.lower().endswith(hdf5.EXTENSIONS) for s in sources):
        return {}
    out = {}
    for name, loc in params.process_variable_paths.items():
        parts = [hdf5.read_per_frame(s.path, loc, s.n_frames) for s in sources]
        if all(p is not None for p in parts):
            out[name] = np.concatenate(parts)[skip:]
    return out


def threshold_frames(frames: np.ndarray, thresh: float) -> np.ndarray:
    """MIDAS's ``-preProcThresh``: values below ``thresh`` become 0, then negative values 0; NaN
    (a flagged pixel) stays NaN.

    Parameters
    ----------
    frames : ndarray, float32
        Dark-subtracted frames.
    thresh : float
        Threshold in counts above the dark.

    Returns
    -------
    ndarray, float32, same shape
    """
    return np.where(frames < thresh, np.float32(0), np.maximum(frames, np.float32(0))).astype(np.float32)


def open_frames(
    source: ScanSource | str | os.PathLike,
    params: Params,
    *,
    frames_per_chunk: int | None = None,
) -> xr.DataArray:
    """Open a scan lazily as dark-subtracted float32 frames.

    Parameters
    ----------
    source : ScanSource or path
        The scan's files, dark and dataset locations; a path is a single data file with the
        defaults of :class:`ScanSource`.
    params : Params
        NrPixelsZ/NrPixelsY (checked against the files), SkipFrame, OmegaStart, OmegaStep,
        Dark, HeadSize and PixelValue (GE).
    frames_per_chunk : int, optional
        Frames per dask chunk; default ``source.frames_per_read``, else ≈ 64 MiB of float32 per
        chunk.

    Returns
    -------
    xarray.DataArray, dims (frame, z, y), float32, dask-backed
        Raw orientation, dark subtracted (then thresholded with ``source.pre_proc_thresh``),
        detector-flagged pixels NaN, SkipFrame frames dropped.
        Coords ``frame`` (int, index after SkipFrame) and ``omega`` (deg,
        OmegaStart + frame·OmegaStep), plus ``temperature``, ``pressure``, ``i``, ``i0``
        (float64, per frame) for the process variables the HDF5 files hold. Attrs ``source_files`` (list of str), ``data_loc``,
        ``dark_source`` ("" when no dark), ``skip_frame``.

    Raises
    ------
    FrameError
        Any file missing or unreadable, a missing dataset, wrong frame shape or dimensionality,
        a process-variable dataset not holding one value per frame, or SkipFrame leaving no
        frame. Nothing is read beyond metadata and nothing is written.

    Notes
    -----
    Series, SkipFrame, dark and flag rules are in the module docstring.
    """
    import xarray as xr

    scan = ScanSource.of(source)
    files = scan.files()
    sources = tuple(open_source(f, params, scan.data_loc) for f in files)
    total = sum(s.n_frames for s in sources)
    if total > MAX_FRAMES:
        raise FrameError(f"{files[0]}: the scan declares {total} frames, expected at most {MAX_FRAMES}")
    skip = int(params.skip_frame)
    if skip >= total:
        raise FrameError(f"{files[0]}: SkipFrame {skip} leaves no frames (the scan holds {total})")
    reader = ScanReader(sources, skip)
    asked = scan.frames_per_read or frames_per_chunk
    per_chunk = _frames_per_chunk(reader.shape, asked)
    frames = _lazy(reader, per_chunk, "frames")

    dark, dark_label = dark_mean(files[0], params, scan.dark_fn, scan.dark_loc, per_chunk)
    if dark is not None:
        frames = frames - dark
    if scan.pre_proc_thresh is not None:
        frames = frames.map_blocks(threshold_frames, np.float32(scan.pre_proc_thresh), dtype=np.float32)
    with _RAW_FRAMES_LOCK:
        _RAW_FRAMES.pop(frames.name, None)
        _RAW_FRAMES[frames.name] = RawFrames(reader, dark, scan.pre_proc_thresh,
                                             None if asked is None else int(asked))
        while len(_RAW_FRAMES) > _MAX_RAW_FRAMES:
            del _RAW_FRAMES[next(iter(_RAW_FRAMES))]

    n = reader.shape[0]
    index = np.arange(n)
    omega = float(params.omega_start_deg) + float(params.omega_step_deg) * index
    pvs = _process_variables(sources, params, skip)
    return xr.DataArray(
        frames,
        dims=("frame", "z", "y"),
        coords={"frame": index, "omega": ("frame", omega, {"units": "deg"}),
                **{name: ("frame", values) for name, values in pvs.items()}},
        name="frames",
        attrs={
            "source_files": list(files),
            "data_loc": scan.data_loc,
            "dark_source": dark_label,
            "skip_frame": skip,
        },
    )

