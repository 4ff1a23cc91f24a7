"""Refinement in the calling process runs on one BLAS thread (midasflow.blas_threads), and the
process's own setting comes back afterwards, whatever the order threads leave in."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from midasflow import blas_threads
from midasflow.blas_threads import one_blas_thread


def _blas_threads() -> set[int]:
    return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}


@pytest.fixture
def two_blas_threads():
    if not _blas_threads():
        pytest.skip("no BLAS library with a thread pool is loaded")
    with threadpool_limits(2, user_api="blas"):
        assert _blas_threads() == {2}
        yield


def test_nested_and_interleaved_uses_restore_the_setting(two_blas_threads):
    first, second = one_blas_thread(), one_blas_thread()
    first.__enter__()
    assert _blas_threads() == {1}
    second.__enter__()
    first.__exit__(None, None, None)  # the first one leaves while the second still runs
    assert _blas_threads() == {1}
    second.__exit__(None, None, None)
    assert _blas_threads() == {2}


def test_concurrent_threads_leave_the_setting_as_it_was(two_blas_threads):
    """Four threads inside at once, leaving in any order: one limit set, the setting restored
    by the last. (What a thread other than the one that set it sees depends on the BLAS build:
    OpenBLAS 0.3.31 keeps a main-thread setting per thread, so only the count is checked here.)"""
    barrier = threading.Barrier(4)
    users = []

    def work():
        with one_blas_thread():
            barrier.wait()
            users.append(blas_threads._state["users"])
            barrier.wait()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert users == [4, 4, 4, 4]
    assert blas_threads._state["users"] == 0 and blas_threads._state["limiter"] is None
    assert _blas_threads() == {2}


def test_refine_pattern_runs_on_one_blas_thread(two_blas_threads, monkeypatch):
    from midasflow.crystal import cubic_phase
    from midasflow.refinement import engine

    seen = []
    prepare = engine._prepare
    monkeypatch.setattr(engine, "_prepare", lambda *a, **k: seen.append(_blas_threads()) or prepare(*a, **k))
    x = np.linspace(2.0, 12.0, 500)
    inst = {"Lam": 0.41, "Zero": 0.0, "Polariz.": 0.99, "U": 2.0, "V": -0.5, "W": 0.5, "X": 0.0, "Y": 1.0,
            "Z": 0.0, "SH/L": 0.002}
    res = engine.refine_pattern(x, np.zeros_like(x), np.ones_like(x), [cubic_phase("CeO2", 5.4113)], inst)
    assert res.status == "failed"  # refused at once; what counts is the setting it ran under
    assert seen == [{1}]
    assert _blas_threads() == {2}
