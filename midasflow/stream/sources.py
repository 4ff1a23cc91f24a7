"""Where a stream's frames come from: a watched folder of image files, or a live PVAccess PV.

A source is an iterator of :class:`Arrival`\\ s (``None`` for "nothing new in the last tick",
so the consumer can apply its idle timeout and see Ctrl-C); the dataflow
(:mod:`midasflow.stream.dataflow`) turns each arrival into caking tasks.

:class:`FolderSource` watches a folder with watchfiles (inotify, or polling where the
filesystem has no events). A file counts once it is complete: its size and modification time
have not changed for ``settle_s`` seconds and it can be read (its format opens and its last frame
decodes), so a file still being written, or written under a temporary name and renamed into
place, is read once, whole. A zarr store written as a directory counts the same way, by the
total size and latest modification time of its files. Hidden files, temporary names (``.tmp``,
``.part``, …) and files of formats :func:`midasflow.io.frames.open_source` does not read are
ignored. Complete files are
taken in natural name order (``frame2`` before ``frame10``); a file still settling holds back
the files named after it.

:class:`PvaSource` (:mod:`midasflow.stream.pva`) subscribes to an areaDetector NTNDArray PV.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from midasflow.errors import FrameError

log = logging.getLogger(__name__)

#: Name endings of files being written under a temporary name (rsync, browsers, editors, scp).
TEMPORARY_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".crdownload", ".filepart", ".swp", "~",
                      ".lock", ".writing")


@dataclass(frozen=True)
class Arrival:
    """Frames that arrived: a complete file, or one frame of a PV.

    Attributes
    ----------
    name : str
        The file's name, or the PV frame's ``uniqueId`` as text.
    n_frames : int
    path : str or None
        The file (folder streams); tasks open it where they run.
    payload : Any
        A PV frame (:class:`midasflow.stream.pva.PvaFrame`), decoded where it is caked.
    unique_id : int or None
        The PV frame's ``uniqueId``.
    timestamp : float or None
        Seconds since the epoch: the PV frame's time stamp, or the file's modification time.
    more : bool
        Another arrival is already waiting behind this one (the dataflow then cakes them in one
        task, up to a map pass of frames, instead of one task each).
    """

    name: str
    n_frames: int
    path: str | None = None
    payload: Any = field(default=None, repr=False)
    unique_id: int | None = None
    timestamp: float | None = None
    more: bool = False


def natural_key(name: str) -> tuple:
    """Sort key comparing digit runs as numbers: ``frame2`` < ``frame10``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def is_candidate(path: str | os.PathLike) -> bool:
    """Whether a folder entry may hold frames: not hidden, not a temporary name, and of a
    format :func:`midasflow.io.frames.open_source` reads (a zarr directory is recognised by its
    name or its metadata files)."""
    from midasflow.io.frames import is_frame_file

    name = os.path.basename(os.fspath(path))
    return not name.startswith(".") and not name.lower().endswith(TEMPORARY_SUFFIXES) and is_frame_file(path)


def _tree_stamp(path: str) -> tuple[int, int]:
    """(total bytes, latest mtime_ns) of the files under a directory (a zarr store being written
    changes one or the other with every chunk)."""
    size, mtime = 0, os.stat(path).st_mtime_ns
    for root, _, files in os.walk(path):
        for name in files:
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:  # removed while walking: the next tick sees the change
                continue
            size, mtime = size + st.st_size, max(mtime, st.st_mtime_ns)
    return size, mtime


@dataclass
class _Pending:
    """A candidate file seen but not yet taken."""

    stamp: tuple[int, int]  # (size, mtime_ns)
    since: float            # when the stamp was first seen
    unreadable_since: float | None = None
    error: str = ""


class FolderSource:
    """Complete frame files of a folder, old and new, in natural name order, each once.

    Parameters
    ----------
    folder : path
        Watched (not its sub-folders).
    params : Params
        The detector (NrPixelsZ × NrPixelsY, GE header) the files must match.
    data_loc : str
        HDF5/zarr dataset of the frames.
    settle_s : float
        A file's size and modification time must stay the same this long.
    give_up_s : float
        A file that stays unchanged but unreadable this long is skipped with a warning.
    skip : iterable of str
        File names already taken (a resumed stream).
    force_polling : bool, optional
        watchfiles' polling instead of filesystem events (network filesystems); default: its
        own choice.

    Raises
    ------
    FrameError
        ``folder`` is not a folder.
    """

    def __init__(self, folder: str | os.PathLike, params: Any, *, data_loc: str = "exchange/data",
                 settle_s: float = 0.5, give_up_s: float = 30.0, skip: Iterable[str] = (),
                 force_polling: bool | None = None) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FrameError(f"{self.folder}: no such folder (--folder)")
        self.params, self.data_loc = params, data_loc
        self.settle_s, self.give_up_s = float(settle_s), float(give_up_s)
        self.taken: set[str] = set(skip)
        self.force_polling = force_polling
        self.describe = f"folder {self.folder}"
        self._pending: dict[str, _Pending] = {}

    # -- completeness -------------------------------------------------------------------
    def _stamp(self, name: str) -> tuple[int, int] | None:
        path = self.folder / name
        try:
            if path.is_dir():
                return _tree_stamp(str(path))
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_size, st.st_mtime_ns) if path.is_file() else None

    def _readable(self, name: str) -> tuple[int, str]:
        """(frames, "") when the file opens and its last frame decodes, else (0, reason)."""
        from midasflow.io.frames import open_source
        from midasflow.io.untrusted import reading

        path = str(self.folder / name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                source = open_source(path, self.params, self.data_loc)
                with reading(path, "the last frame", FrameError):
                    source.read(source.n_frames - 1, source.n_frames)
        except FrameError as exc:
            return 0, str(exc)
        except (OSError, ValueError) as exc:  # a reader library's own error while the file grows
            return 0, f"{path}: {type(exc).__name__}: {exc}"
        return int(source.n_frames), ""

    def _scan(self, names: Iterable[str]) -> None:
        now = time.monotonic()
        for name in names:
            if name in self.taken or not is_candidate(self.folder / name):
                continue
            stamp = self._stamp(name)
            if stamp is None:
                self._pending.pop(name, None)
                continue
            seen = self._pending.get(name)
            if seen is None or seen.stamp != stamp:
                self._pending[name] = _Pending(stamp, now)

    def _ready(self) -> list[Arrival]:
        """Complete files in name order, up to the first one still settling."""
        now = time.monotonic()
        out = []
        for name in sorted(self._pending, key=natural_key):
            seen = self._pending[name]
            stamp = self._stamp(name)
            if stamp is None:  # removed (a temporary renamed away)
                del self._pending[name]
                continue
            if stamp != seen.stamp:
                self._pending[name] = _Pending(stamp, now)
                break
            if now - seen.since < self.settle_s:
                break
            n_frames, error = self._readable(name)
            if not n_frames:
                seen.unreadable_since = seen.unreadable_since or now
                seen.error = error
                if now - seen.unreadable_since < self.give_up_s:
                    break
                warnings.warn(f"{error} (unchanged and unreadable for {self.give_up_s:g} s; skipped)",
                              UserWarning, stacklevel=2)
                self.taken.add(name)
                del self._pending[name]
                continue
            del self._pending[name]
            self.taken.add(name)
            path = self.folder / name
            out.append(Arrival(name=name, n_frames=n_frames, path=str(path),
                               timestamp=seen.stamp[1] / 1e9, more=True))
        if out:
            out[-1] = replace(out[-1], more=False)
        return out

    # -- the stream -----------------------------------------------------------------------
    def arrivals(self, stop: threading.Event, tick_s: float = 0.2) -> Iterator[Arrival | None]:
        """Complete files as they come (the folder's present files first); ``None`` after each
        quiet tick. Ends when ``stop`` is set."""
        import watchfiles

        self._scan(os.listdir(self.folder))
        yield from self._ready() or [None]
        watcher = watchfiles.watch(
            self.folder, stop_event=stop, recursive=False, debounce=50, step=20,
            rust_timeout=max(int(tick_s * 1000), 1), yield_on_timeout=True,
            force_polling=self.force_polling, watch_filter=None, raise_interrupt=True)
        try:
            for changes in watcher:
                self._scan(Path(path).name for _, path in changes
                           if Path(path).parent == self.folder or Path(path).parent.resolve()
                           == self.folder.resolve())
                if self._pending:  # settling files are looked at again every tick
                    self._scan(list(self._pending))
                ready = self._ready()
                yield from ready or [None]
                if stop.is_set():
                    return
        finally:
            watcher.close()

    def pending(self) -> list[str]:
        """Candidate files seen but not (yet) taken: settling, or unreadable so far."""
        return sorted(self._pending, key=natural_key)


def frames_of_file(path: str, params: Any, data_loc: str, start: int, stop: int, *,
                   raw: bool = False) -> np.ndarray:
    """Frames ``start:stop`` of one file as float32 with detector flags NaN (the reading of
    :class:`midasflow.io.frames.ScanReader`), or with ``raw`` as stored (its
    :meth:`~midasflow.io.frames.ScanReader.read_raw`), read where the task runs."""
    from midasflow.io.frames import ScanReader, open_source

    reader = ScanReader((open_source(path, params, data_loc),), 0)
    return reader.read_raw(start, stop) if raw else reader[start:stop]
