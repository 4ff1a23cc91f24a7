"""midasflow.io.atomic: outputs appear complete or not at all, also with concurrent writers."""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from midasflow.io.atomic import atomic_output, write_text_atomic


def _write_store(args):
    """One writer: a three-file directory store whose files all carry the writer's number."""
    path, i = args
    try:
        with atomic_output(path) as tmp:
            tmp.mkdir()
            for k in range(3):
                (tmp / f"chunk{k}").write_text(str(i))
    except Exception as exc:  # reported, not raised: the test counts them
        return f"{type(exc).__name__}: {exc}"
    return None


@pytest.mark.slow
def test_concurrent_directory_store_writes_all_succeed_and_leave_one_complete_store(tmp_path):
    path = tmp_path / "store.zarr"
    with ProcessPoolExecutor(4) as pool:
        errors = [e for e in pool.map(_write_store, [(path, i) for i in range(400)], chunksize=4) if e]
    assert errors == []
    assert os.listdir(tmp_path) == ["store.zarr"]  # no temporaries or displaced stores left
    contents = {(path / f"chunk{k}").read_text() for k in range(3)}
    assert len(contents) == 1  # one writer's complete store, never a mixture


@pytest.mark.parametrize("before, after", [("file", "dir"), ("dir", "file"), ("dir", "dir"), ("file", "file")])
def test_an_output_replaces_a_file_or_a_store_of_the_other_kind(tmp_path, before, after):
    path = tmp_path / "out"
    if before == "dir":
        path.mkdir()
        (path / "old").write_text("old")
    else:
        path.write_text("old")
    with atomic_output(path) as tmp:
        if after == "dir":
            tmp.mkdir()
            (tmp / "new").write_text("new")
        else:
            tmp.write_text("new")
    assert (path / "new" if after == "dir" else path).read_text() == "new"
    assert os.listdir(tmp_path) == ["out"]


def test_a_failed_write_leaves_the_previous_output_and_no_temporary(tmp_path):
    path = write_text_atomic(tmp_path / "summary.json", "old")
    with pytest.raises(RuntimeError), atomic_output(path) as tmp:
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["summary.json"]


def test_stale_temporaries_of_dead_writers_are_removed_and_nothing_else(tmp_path):
    import subprocess
    import sys

    from midasflow.io.atomic import remove_stale_temporaries

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid no longer exists
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        stale = [f".scan.zarr.zip.tmp-{dead.pid}-0123abcd", f".scan.zarr.zip.tmp-{dead.pid}-0123abcd.parts",
                 f".results.zarr.old-{dead.pid}-89abcdef", f".hist_0003.pkl.tmp-{dead.pid}-deadbeef"]
        kept = [f".scan.zarr.zip.tmp-{live.pid}-0123abcd", f".scan.zarr.zip.tmp-{os.getpid()}-0123abcd.parts",
                "scan.zarr.zip", ".midasflow.lock", f"scan.zarr.zip.tmp-{dead.pid}-0123abcd",  # not hidden
                f".notes.tmp-{dead.pid}-xyz", ".hidden"]
        for name in stale + kept:
            if name.endswith((".parts", ".zarr")) or ".zarr.old-" in name:
                (tmp_path / name).mkdir()
                (tmp_path / name / "part-000.zip").write_bytes(b"x" * 1000)
            else:
                (tmp_path / name).write_bytes(b"x")
        removed = remove_stale_temporaries(tmp_path)
        assert sorted(p.name for p in removed) == sorted(stale)
        assert sorted(os.listdir(tmp_path)) == sorted(kept)
        assert remove_stale_temporaries(tmp_path / "missing") == []
    finally:
        live.kill()
        live.wait()


def test_compute_settled_passes_an_error_on_only_after_the_running_tasks_stop(tmp_path):
    """Dask's threaded scheduler raises the first error while other tasks still run; a task
    writing into a temporary after the caller's cleanup removed it would leave it behind.
    compute_settled returns its error only once every running task has finished."""
    import threading
    import time

    import dask

    from midasflow.io.atomic import compute_settled

    started, finished = threading.Event(), []

    def slow_writer():
        started.set()
        time.sleep(0.5)
        (tmp_path / "late").write_text("written after the error was raised")
        finished.append(True)
        return 1

    def failing():
        started.wait(10)  # fail while the writer runs
        raise RuntimeError("first task failed")

    with dask.config.set(num_workers=2), pytest.raises(RuntimeError, match="first task failed"):
        compute_settled(dask.delayed(slow_writer)(), dask.delayed(failing)())
    assert finished == [True] and (tmp_path / "late").exists()  # settled: nothing runs on
    assert compute_settled(dask.delayed(sum)([1, 2])) == (3,)


def _block_failing_while_others_run(x, block_info=None):
    """A caked block: the first fails after 0.1 s, the others are returned after 0.6 s."""
    import time

    if block_info[0]["chunk-location"][0] == 0:
        time.sleep(0.1)
        raise RuntimeError("disk on fire")
    time.sleep(0.6)
    return x


@pytest.mark.parametrize("where", ["threads", pytest.param("client", marks=pytest.mark.slow),
                                   pytest.param("default client", marks=pytest.mark.slow)])
def test_a_failed_caked_store_write_leaves_nothing_behind_its_running_tasks(tmp_path, where, request):
    """Blocks still being computed when another block's error stops the write: they finish
    before the temporary store is removed, so they cannot make its folders again, whether they
    run on Dask's threads or on a distributed cluster's workers (passed, or the default client)."""
    import contextlib
    import time

    import dask
    import dask.array as da
    import numpy as np
    import xarray as xr

    from midasflow.io.caked_store import write_caked_zarr

    data = da.zeros((4, 8, 3), chunks=(1, 8, 3)).map_blocks(_block_failing_while_others_run,
                                                           dtype=np.float64)
    ds = xr.Dataset({"intensity": (("group", "r", "eta"), data)})
    client = None if where == "threads" else request.getfixturevalue("client")
    context = client.as_current() if where == "default client" else contextlib.nullcontext()
    with dask.config.set(num_workers=4), context, pytest.raises(RuntimeError, match="disk on fire"):
        write_caked_zarr(ds, tmp_path / "plain.zarr", client=client if where == "client" else None)
    time.sleep(1.0)  # any task still running would have written by now
    assert list(tmp_path.iterdir()) == []
    if client is not None:  # the workers are free again: the next write goes through
        ok = xr.Dataset({"intensity": (("group", "r", "eta"), da.ones((2, 8, 3), chunks=(1, 8, 3)))})
        write_caked_zarr(ok, tmp_path / "ok.zarr", client=client)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.zarr"]
