"""Atomic outputs: write under a temporary sibling name, then rename into place.

A crash or an error part-way through never leaves a half-written file or store that looks
complete: the temporary name is removed and the destination keeps its previous content. A process
killed outright (SIGKILL, a node failure) cannot remove its temporary; the names carry the
writer's pid so that :func:`remove_stale_temporaries` can remove them on the next run once that
process is gone.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
#: Temporaries of our own naming (:func:`_sibling`; ``.parts`` is the caked-store writer's scratch
#: folder beside its temporary), with the writer's pid.
_TEMPORARY = re.compile(r"^\..+\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}(?:\.parts)?$")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def compute_settled(*collections: Any, client: Any = None,
                    on_submit: Callable[[list[Any]], None] | None = None) -> tuple[Any, ...]:
    """``dask.compute(*collections)``, with every task stopped when it returns or raises.

    Dask raises the first error (or a SIGTERM or Ctrl-C arriving in the main thread) at once,
    while the tasks already running go on: one writing into a temporary that the caller's cleanup
    is removing can leave a file behind it, or make the folder again. So the error is passed on
    only once no task of ``collections`` still runs:

    - on the threaded scheduler (the default without a distributed client) the tasks run in a
      pool of their own, drained first: running tasks finish, queued ones are cancelled;
    - on a ``distributed`` client (``client``, or the default client Dask is configured with)
      the futures are cancelled and the workers polled until none of the tasks still executes
      (a worker finishes a running task even once it is cancelled), for at most
      :data:`SETTLE_TIMEOUT_S`;
    - any other scheduler is used as configured.

    ``on_submit`` is called with the client's futures once they are submitted (progress).
    """
    from concurrent.futures import ThreadPoolExecutor

    import dask
    import dask.threaded

    configured = dask.base.get_scheduler()  # None: the arrays' and delayed's default, threads
    if client is None:
        client = _client_of(configured)
    if client is not None:
        return _compute_on_client(client, list(collections), on_submit)
    if configured is not None and configured is not dask.threaded.get:
        return dask.compute(*collections)
    pool = ThreadPoolExecutor(dask.config.get("num_workers", None) or os.cpu_count() or 1)
    try:
        return dask.compute(*collections, scheduler="threads", pool=pool)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


#: How long a failed computation on a distributed client waits for its running tasks (s).
SETTLE_TIMEOUT_S = 300.0
#: A worker's task states in which the task's code may still be running.
_RUNNING_STATES = frozenset({"executing", "long-running", "cancelled", "resumed"})


def _client_of(scheduler: Any) -> Any:
    """The ``distributed.Client`` whose ``get`` ``scheduler`` is, else None."""
    owner = getattr(scheduler, "__self__", None)
    return owner if type(owner).__name__ == "Client" and hasattr(owner, "compute") else None


def _compute_on_client(client: Any, collections: list[Any],
                       on_submit: Callable[[list[Any]], None] | None) -> tuple[Any, ...]:
    """Compute on ``client``; on an error, cancel and wait for running tasks before raising."""
    import time

    import dask
    from dask.base import collections_to_expr

    # as Client.compute takes them: containers (da.store's result) as one delayed each
    collections = [dask.delayed(c) if isinstance(c, (list, tuple, set, dict)) else c for c in collections]
    graph = collections_to_expr([c for c in collections if dask.is_dask_collection(c)]).optimize()
    names = {key[0] if isinstance(key, tuple) else key for key in graph.__dask_graph__()}
    futures = client.compute(collections)
    try:
        if on_submit is not None:
            on_submit(futures)
        return tuple(client.gather(futures))
    except BaseException:
        client.cancel(futures)
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                running = sum(client.run(_running_tasks, names=names).values())
            except Exception:  # noqa: BLE001 - workers gone: nothing of theirs runs on
                break
            if not running:
                break
            time.sleep(0.05)
        else:
            log.warning("tasks still running on the workers %.0f s after a failed computation",
                        SETTLE_TIMEOUT_S)
        raise


def _running_tasks(dask_worker: Any, names: set[Any]) -> int:
    """On a worker: how many tasks named in ``names`` may still be running there."""
    return sum((key[0] if isinstance(key, tuple) else key) in names and ts.state in _RUNNING_STATES
               for key, ts in dask_worker.state.tasks.items())


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write a file or a directory store into.

    On normal exit the temporary replaces ``path`` (an existing directory store is swapped out
    only once the new one is complete, then deleted); on any exception it is removed and
    ``path`` is left untouched. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        _move_into_place(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _sibling(path: Path, kind: str) -> Path:
    """A hidden sibling name of our own making: ``.<name>.<kind>-<pid>-<random>``."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


#: What ``rename`` says when the destination is in the way: a non-empty folder, or a file where a
#: folder goes (or the reverse).
_IN_THE_WAY = (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR)


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``, replacing a file or a whole directory store there.

    A file replaces a file in one atomic rename. A directory cannot be renamed over a non-empty
    one, so whatever is at ``path`` is first renamed aside and deleted once ``tmp`` is in place.
    Safe against concurrent writers of the same ``path``: when another writer's store lands (or
    takes the old one away) between the two renames, this one simply tries again; every writer
    ends with a complete store at ``path`` (the last one wins), and no rename fails.
    """
    displaced: list[Path] = []
    try:
        while True:
            try:
                os.replace(tmp, path)
                return
            except OSError as exc:
                if exc.errno not in _IN_THE_WAY:
                    raise
            old = _sibling(path, "old")
            try:
                os.replace(path, old)
            except FileNotFoundError:  # another writer moved it aside first
                continue
            displaced.append(old)
    finally:
        for old in displaced:
            _remove(old)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return the path."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return the path."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (another user's process counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of our own naming in ``folder`` whose writer is no longer alive.

    Only names this module makes (``.<name>.tmp-<pid>-<hex>``, ``.<name>.old-<pid>-<hex>`` and a
    temporary's ``.parts`` folder) are considered, and only when process ``<pid>`` no longer
    exists on this host: a temporary being written right now is never touched. Call it on a
    folder the caller holds the lock of (:func:`midasflow.io.lock.output_lock`), so no writer on
    another host can own one.

    Returns
    -------
    list of Path
        What was removed (also logged).
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match and not _alive(int(match.group("pid"))):
            path = Path(entry.path)
            _remove(path)
            removed.append(path)
            log.info("removed %s, left by process %s, which no longer runs", path, match.group("pid"))
    return removed
