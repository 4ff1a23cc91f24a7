"""One BLAS thread while a pattern is refined.

The engine's linear algebra works on small matrices (tens of parameters, a few thousand
points): a multi-threaded BLAS (OpenBLAS, MKL) gains nothing there, and its idle threads
busy-wait between calls. Measured on this project's 2-core machine: a CeO2 lineout took 37–53 ms
CPU with OpenBLAS's default threads against 17–20 ms with one, and the real PbSO4 pattern
1.0–1.8 s against 0.9–1.3 s, with no gain in wall time. Dask's worker processes already start
with one BLAS thread (distributed's nanny sets ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` and
``MKL_NUM_THREADS`` to 1); this covers refinement in the calling process (a script calling
``refine_pattern``, the serial executor). From other threads of a process whose main thread
set its own limit, OpenBLAS 0.3.31 does not take a new one: there the limit is best effort.

The limit is process-wide (BLAS has one thread pool per process), so it is counted: the first
refinement to start sets it (threadpoolctl), the last to finish puts the previous setting back,
whatever the order in which threads enter and leave.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

_LOCK = threading.Lock()
_state: dict[str, Any] = {"users": 0, "limiter": None, "controller": None}


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the block with BLAS limited to one thread (nested and concurrent uses are counted)."""
    with _LOCK:
        if _state["users"] == 0:
            if _state["controller"] is None:
                from threadpoolctl import ThreadpoolController

                _state["controller"] = ThreadpoolController()
            _state["limiter"] = _state["controller"].limit(limits=1, user_api="blas")
        _state["users"] += 1
    try:
        yield
    finally:
        with _LOCK:
            _state["users"] -= 1
            if _state["users"] == 0:
                _state["limiter"].restore_original_limits()
                _state["limiter"] = None
