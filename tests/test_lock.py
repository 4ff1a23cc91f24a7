"""midasflow.io.lock: one writer per output; a second is refused naming the holder; a dead
holder's lock is taken over."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from midasflow.errors import OutputInUseError, OutputPathError
from midasflow.io.lock import FOLDER_LOCK, lock_name, output_lock

_HOLD = textwrap.dedent("""
    import sys, time
    from midasflow.io.lock import output_lock
    with output_lock(sys.argv[1], holder="midasflow refine"):
        print("locked", flush=True)
        time.sleep(600)
""")


@pytest.fixture
def holder(tmp_path):
    """A separate process holding the lock of ``tmp_path / 'out'``; killed at the end."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path / "out")], stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, holder):
    with pytest.raises(OutputInUseError) as info:
        with output_lock(tmp_path / "out"):
            pass
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'out'}: in use by midasflow refine (pid {holder.pid} on ")
    assert "\n" not in message


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = tmp_path / "out" / FOLDER_LOCK
    assert json.loads(lock.read_text())["pid"] == holder.pid  # left behind, naming the dead pid
    with output_lock(tmp_path / "out", holder="second") as folder:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert folder == tmp_path / "out"
    assert not lock.exists()  # removed on release


def test_lock_is_released_on_exit_and_on_error_and_an_empty_new_folder_is_removed(tmp_path):
    out = tmp_path / "new" / "out"
    with pytest.raises(ValueError), output_lock(out):
        raise ValueError("bad input found after locking")
    assert not (tmp_path / "new").exists()  # both folders it created, removed again
    with output_lock(out):
        (out / "results.json").write_text("{}")
    with output_lock(out):  # released: can be taken again
        pass
    assert sorted(os.listdir(out)) == ["results.json"]


def test_different_outputs_in_one_folder_do_not_conflict(tmp_path):
    with output_lock(tmp_path, lock_name(tmp_path / "a.zarr.zip")):
        with output_lock(tmp_path, lock_name(tmp_path / "b.zarr.zip")):
            pass
        with pytest.raises(OutputInUseError, match="in use by midasflow"):
            with output_lock(tmp_path, lock_name(tmp_path / "a.zarr.zip")):
                pass


def test_a_file_or_an_unwritable_place_is_refused(tmp_path):
    existing = tmp_path / "results.txt"
    existing.write_text("x")
    with pytest.raises(OutputPathError, match=rf"--out {existing}: is an existing file, expected a folder"):
        with output_lock(existing, flag="--out"):
            pass
    with pytest.raises(OutputPathError, match=r"is inside .*results.txt, which is an existing file"):
        with output_lock(existing / "sub", flag="--out"):
            pass
    # /proc refuses new entries even to root
    with pytest.raises(OutputPathError, match=r"--out /proc/midasflow-test: "):
        with output_lock("/proc/midasflow-test", flag="--out"):
            pass


@pytest.mark.slow
def test_racing_lockers_exactly_one_wins(tmp_path):
    script = textwrap.dedent("""
        import os, sys, time
        from midasflow.errors import OutputInUseError
        from midasflow.io.lock import output_lock
        print("ready", flush=True)
        while not os.path.exists(sys.argv[2]):
            time.sleep(0.001)
        try:
            with output_lock(sys.argv[1]):
                time.sleep(3.0)
            print("won")
        except OutputInUseError:
            print("refused")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "out"), str(go)],
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(4)]
    assert all(p.stdout.readline().strip() == "ready" for p in procs)
    go.touch()
    outcomes = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert outcomes.count("won") == 1 and outcomes.count("refused") == 3, outcomes
