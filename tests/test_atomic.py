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
