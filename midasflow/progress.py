"""Progress on stderr: a bar redrawn in place on a terminal, one line every few seconds elsewhere.

On a terminal (``sys.stderr.isatty()``) progress is one line rewritten with carriage returns.
Anywhere else (a log file, a batch job's output, a pipe) carriage returns would pile up into one
enormous line, so progress is printed as a new line at most every :data:`LOG_INTERVAL_S`
seconds, plus a last line when the work ends.

Three sources share the same printer (:class:`TextProgress`): counted items (lineouts gathered
from a client), tasks of the local Dask schedulers (:func:`dask_progress`), and futures computed
on a ``distributed`` cluster (:func:`futures_progress`).
"""
from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

#: Seconds between two progress lines when stderr is not a terminal.
LOG_INTERVAL_S = 5.0


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class TextProgress:
    """``label [#####.....] 37/72  <extra>4.1/s`` on stderr.

    Parameters
    ----------
    total : int
        Items expected.
    label : str
    enabled : bool
        False: count silently.
    width : int
        Characters of the bar.
    interval_s : float
        Seconds between lines when stderr is not a terminal.
    """

    def __init__(self, total: int, label: str, enabled: bool = True, width: int = 30,
                 interval_s: float = LOG_INTERVAL_S) -> None:
        self.total, self.label, self.enabled, self.width = total, label, enabled, width
        self.interval_s = interval_s
        self.done = 0
        self.t0 = time.perf_counter()
        self._last_line = -float("inf")
        self._drawn = False
        self._printed = -1  # count shown by the last line (not a terminal)
        self._extra = ""

    def _line(self) -> str:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        fill = int(self.width * min(self.done, self.total) / max(self.total, 1))
        bar = "#" * fill + "." * (self.width - fill)
        return f"{self.label} [{bar}] {self.done}/{self.total}  {self._extra}{self.done / elapsed:.1f}/s"

    def set(self, done: int, extra: str = "") -> None:
        """Set the count to ``done`` and show it (in place, or as a line when one is due)."""
        self.done, self._extra = done, extra
        if not self.enabled:
            return
        stream = sys.stderr
        if _is_terminal(stream):
            stream.write("\r" + self._line())
            self._drawn = True
        else:
            now = time.perf_counter()
            if now - self._last_line < self.interval_s:
                return
            self._last_line = now
            self._printed = self.done
            stream.write(self._line() + "\n")
        stream.flush()

    def update(self, extra: str = "") -> None:
        """Count one finished item and show it."""
        self.set(self.done + 1, extra)

    def close(self) -> None:
        """End the progress: end the terminal line, or print the final count as a line."""
        if not self.enabled or not self.total:
            return
        stream = sys.stderr
        if _is_terminal(stream):
            if self._drawn:
                stream.write("\n")
        elif self._printed != self.done:
            stream.write(self._line() + "\n")
        stream.flush()


@contextlib.contextmanager
def dask_progress(label: str = "compute", enabled: bool = True,
                  interval_s: float = LOG_INTERVAL_S) -> Iterator[None]:
    """Progress of the local Dask schedulers (threaded, processes, synchronous) in the block.

    The printed line ends in ``100% Completed`` when every task has run.
    """
    if not enabled:
        yield
        return
    from dask.callbacks import Callback

    bar = _PercentProgress(label, interval_s)

    class _Tasks(Callback):
        def _start_state(self, dsk: Any, state: Any) -> None:
            bar.start(sum(len(state[k]) for k in ("ready", "waiting", "running", "finished")))

        def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            bar.set(len(state["finished"]))

        def _finish(self, dsk: Any, state: Any, errored: bool) -> None:
            bar.finish(errored)

    with _Tasks():
        yield


def futures_progress(futures: Sequence[Any], label: str = "compute", enabled: bool = True,
                     interval_s: float = LOG_INTERVAL_S) -> None:
    """Wait for ``futures`` (of a ``distributed.Client``), showing the progress of every task they
    depend on; returns when they are all done (failed ones included)."""
    from distributed import wait

    if not enabled:
        wait(futures)
        return
    from distributed.diagnostics.progressbar import TextProgressBar

    bar = _PercentProgress(label, interval_s)

    class _Bar(TextProgressBar):  # the scheduler's task counts, drawn by our printer
        def _draw_bar(self, remaining: int, all: int, **kwargs: Any) -> None:  # noqa: A002
            bar.start(all)
            bar.set(all - remaining)

        def _draw_stop(self, **kwargs: Any) -> None:
            bar.finish(kwargs.get("status") == "error")

    _Bar(list(futures), interval="200ms")
    wait(futures)


class _PercentProgress(TextProgress):
    """A :class:`TextProgress` over task counts whose line reads ``… 37% Completed | 12.0 s``."""

    def __init__(self, label: str, interval_s: float) -> None:
        super().__init__(0, label, True, 40, interval_s)
        self._closed = False

    def start(self, total: int) -> None:
        if total != self.total:
            self.total = total

    def _line(self) -> str:
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        bar = "#" * int(self.width * frac)
        elapsed = time.perf_counter() - self.t0
        return f"{self.label} [{bar:<{self.width}}] | {int(100 * frac):3d}% Completed | {elapsed:.1f} s"

    def finish(self, errored: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        if not errored:
            self.done = self.total
        if _is_terminal(sys.stderr):
            self.set(self.done)
        self.close()
