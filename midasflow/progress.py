"""A one-line text progress bar on stderr, for work the Dask diagnostics cannot see
(results gathered from a distributed client as they complete)."""
from __future__ import annotations

import sys
import time


class TextProgress:
    """``label [#####.....] 37/72  <extra>  4.1/s``, rewritten in place on stderr."""

    def __init__(self, total: int, label: str, enabled: bool = True, width: int = 30) -> None:
        self.total, self.label, self.enabled, self.width = total, label, enabled, width
        self.done = 0
        self.t0 = time.perf_counter()

    def update(self, extra: str = "") -> None:
        """Count one finished item and redraw the line."""
        self.done += 1
        if not self.enabled:
            return
        rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
        fill = int(self.width * self.done / max(self.total, 1))
        bar = "#" * fill + "." * (self.width - fill)
        sys.stderr.write(f"\r{self.label} [{bar}] {self.done}/{self.total}  {extra}{rate:.1f}/s")
        sys.stderr.flush()

    def close(self) -> None:
        """End the line."""
        if self.enabled and self.total:
            sys.stderr.write("\n")
            sys.stderr.flush()
