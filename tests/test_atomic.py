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
