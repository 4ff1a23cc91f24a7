"""One writer per output: an exclusive lock held while a command writes into a folder.

``refine`` locks its output folder (``<out>/.midasflow.lock``); ``integrate`` locks the store it
writes (``<resultFolder>/.<scan>.zarr.zip.lock``), so several scans can still be integrated into
one result folder at the same time, as MIDAS users do, while two writers of the same store or the
same refinement folder are refused with one line naming the holder.

The lock is a POSIX ``flock`` on the lock file: the kernel releases it when its process ends in
any way (exit, crash, SIGKILL), so a lock left by a dead process is simply taken over. The file
names the holder (pid, host, command, start time) for the message; it is removed on release. On
NFS, Linux emulates ``flock`` with POSIX byte-range locks, which the server arbitrates.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from midasflow.errors import OutputInUseError, OutputPathError

#: Lock file of an output folder (``refine --out``).
FOLDER_LOCK = ".midasflow.lock"


def lock_name(output: str | os.PathLike) -> str:
    """Lock file name, inside the same folder, of one output file or store: ``.<name>.lock``."""
    return f".{Path(output).name}.lock"


def _holder(path: Path) -> str:
    """Who holds the lock at ``path``, from what it wrote there (never trusted beyond display)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8")[:4096])
        pid, host = int(info["pid"]), str(info.get("host", "?"))[:64]
        command, started = str(info.get("command", "midasflow"))[:40], str(info.get("started", ""))[:19]
    except (OSError, ValueError, TypeError, KeyError):
        return "another process (its lock file names no pid yet)"
    return f"{command} (pid {pid} on {host}, since {started.replace('T', ' ')})"


def _open_locked(path: Path) -> int:
    """Open ``path`` and take its lock without waiting; return the descriptor.

    Loops when the file was replaced (released and removed by its holder) between open and lock,
    so the lock held always belongs to the file at ``path``.

    Raises
    ------
    OutputInUseError
        Another process holds it.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputInUseError(f"{path.parent}: in use by {_holder(path)}; wait for it to "
                                   "finish or choose another output") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # locked a file its holder had just removed: try the new one


def check_writable_folder(folder: str | os.PathLike, flag: str) -> None:
    """Refuse an output folder that is an existing file, or that cannot be created or written.

    Raises
    ------
    OutputPathError
        One line naming ``flag`` and the folder.
    """
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists() or p.is_symlink()), None)
    if existing is not None and not existing.is_dir():
        what = "is" if existing == folder else f"is inside {existing}, which is"
        raise OutputPathError(f"{flag} {folder}: {what} an existing file, expected a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == folder else f"{existing} "
        raise OutputPathError(f"{flag} {folder}: {where}is not writable (permission denied)")


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, name: str = FOLDER_LOCK, *, flag: str = "output folder",
                holder: str = "midasflow") -> Iterator[Path]:
    """Create ``folder`` if needed and hold the exclusive lock ``folder/name`` until exit.

    On exit the lock is released and its file removed; folders this call created that are empty
    again (the run failed before writing anything) are removed too.

    Parameters
    ----------
    folder : path
        The output folder.
    name : str
        Lock file name: :data:`FOLDER_LOCK` for a whole folder, :func:`lock_name` for one output.
    flag : str
        How the user named the folder (e.g. ``"--out"``), for messages.
    holder : str
        What holds the lock, as a second run's message names it (e.g. ``"midasflow refine"``).

    Yields
    ------
    Path
        ``folder``.

    Raises
    ------
    OutputInUseError
        Another live process holds the lock (the message names it).
    OutputPathError
        ``folder`` is a file, or cannot be created or written.
    """
    folder = Path(folder)
    check_writable_folder(folder, flag)
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"{flag} {folder}: cannot create the folder ({exc.strerror})") from None
    path = folder / name
    try:
        fd = _open_locked(path)
    except OSError as exc:
        _remove_if_empty(folder, created)
        raise OutputPathError(f"{flag} {folder}: cannot write in the folder ({exc.strerror})") from None
    except BaseException:
        _remove_if_empty(folder, created)
        raise
    try:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": holder,
                  "started": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        yield folder
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # before the unlock: a waiter never locks a file that is going away
        os.close(fd)
        _remove_if_empty(folder, created)


def _remove_if_empty(folder: Path, created: list[Path]) -> None:
    """Remove the folders this lock created (deepest first) as long as they are empty."""
    for path in created:
        try:
            path.rmdir()  # only succeeds when empty
        except OSError:
            return
