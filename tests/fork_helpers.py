"""Run a check in a forked child process (for state that must survive, or be rebuilt after, a fork)."""
from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest


def assert_forked_child_passes(check: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """Fork; in the child run ``check()`` and exit 0 only if it returns True; in the parent fail
    the test if the child exits otherwise or has not finished within ``timeout_s`` (a hang)."""
    pid = os.fork()
    if pid == 0:  # the child
        ok = False
        try:
            ok = bool(check())
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0, "the check failed in the forked child"
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail(f"the forked child did not finish in {timeout_s:.0f} s")
