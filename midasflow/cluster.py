"""Getting a ``distributed.Client``: a local cluster, a running scheduler, or an HPC batch queue.

``get_client`` is the one entry point used by the commands (``-nCPUs``, ``--scheduler``,
``--cluster slurm|pbs`` …). dask-jobqueue is optional (the ``cluster`` extra) and imported only
when a batch queue is asked for.
"""
from __future__ import annotations

import ipaddress
import warnings
from typing import Any

from midasflow.errors import BackendError, ParameterError

_JOBQUEUE_CLASSES = {"slurm": "SLURMCluster", "pbs": "PBSCluster"}
#: Where the Dask dashboard listens unless asked otherwise: this machine only (no authentication).
DEFAULT_DASHBOARD_ADDRESS = "127.0.0.1:8787"


def check_dashboard_address(address: str | None = None) -> str:
    """The dashboard's ``host:port`` to bind: ``address`` or :data:`DEFAULT_DASHBOARD_ADDRESS`.

    The dashboard has no authentication, so an address that is not a loopback one (``:8787``,
    ``0.0.0.0:8787``, a host name or a public IP) draws a warning: anyone who can reach that
    interface can watch and stop the run.

    Raises
    ------
    ParameterError
        Not of the form ``[host]:port`` with a port number.
    """
    if address is None:
        return DEFAULT_DASHBOARD_ADDRESS
    host, sep, port = str(address).rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ParameterError(f"--dashboard-address {address!r}: expected [host]:port, e.g. "
                             f"{DEFAULT_DASHBOARD_ADDRESS} or 0.0.0.0:8787")
    host = host.strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # empty (every interface) or a host name
        loopback = False
    if not loopback:
        where = "every interface" if host in ("", "0.0.0.0", "::") else host
        warnings.warn(f"--dashboard-address {address}: the Dask dashboard listens on {where} "
                      "without authentication; anyone who can reach it can see and stop this run",
                      UserWarning, stacklevel=2)
    return str(address)


def make_jobqueue_cluster(
    kind: str,
    *,
    queue: str | None = None,
    cores: int | None = None,
    memory: str | None = None,
    walltime: str | None = None,
    processes: int | None = None,
    dashboard: bool = True,
    dashboard_address: str | None = None,
    **kwargs: Any,
) -> Any:
    """Build (but do not scale) a dask-jobqueue cluster.

    Parameters
    ----------
    kind : {"slurm", "pbs"}
    queue : str, optional
        Partition (SLURM) or queue (PBS).
    cores : int
        Cores per job (required).
    memory : str
        Memory per job, e.g. ``"16GB"`` (required).
    walltime : str, optional
        ``"HH:MM:SS"``.
    processes : int, optional
        Worker processes per job; default one per core (the engine is single-threaded numpy).
    dashboard : bool
        Serve the scheduler's dashboard (on port 8787, or a free one).
    dashboard_address : str, optional
        Where the dashboard listens (:func:`check_dashboard_address`; default 127.0.0.1:8787, this
        machine only: reach it from elsewhere through an SSH tunnel).
    **kwargs
        Passed to the dask-jobqueue class (e.g. ``account``, ``job_extra_directives``).

    Returns
    -------
    dask_jobqueue.SLURMCluster or dask_jobqueue.PBSCluster
        No job is submitted until ``cluster.scale(jobs=...)``; ``cluster.job_script()`` shows
        the batch script.
    """
    cls_name = _JOBQUEUE_CLASSES.get(str(kind).lower())
    if cls_name is None:
        raise ParameterError(f"--cluster {kind!r}: expected one of {sorted(_JOBQUEUE_CLASSES)}")
    if cores is None or memory is None:
        raise ParameterError(f"--cluster {kind}: --cores and --memory are required (cores and memory per job)")
    try:
        import dask_jobqueue
    except ImportError as exc:
        raise BackendError(
            f"--cluster {kind} needs dask-jobqueue, which is not installed: install midasflow[cluster]"
        ) from exc
    cls = getattr(dask_jobqueue, cls_name)
    scheduler_options = dict(kwargs.pop("scheduler_options", {}))
    scheduler_options.setdefault("dashboard_address",
                                 check_dashboard_address(dashboard_address) if dashboard else None)
    return cls(
        queue=queue,
        cores=int(cores),
        memory=str(memory),
        walltime=walltime,
        processes=int(processes) if processes is not None else int(cores),
        scheduler_options=scheduler_options,
        **kwargs,
    )


def _dashboard(client: Any, enabled: bool = True) -> str:
    # the scheduler's HTTP server (health routes) runs even without the Bokeh dashboard
    has_http = bool(client.scheduler_info().get("services", {}).get("dashboard"))
    return f"dashboard {client.dashboard_link}" if enabled and has_http else "no dashboard"


def get_client(
    *,
    n_workers: int | None = None,
    scheduler: str | None = None,
    cluster: str | None = None,
    queue: str | None = None,
    cores: int | None = None,
    memory: str | None = None,
    walltime: str | None = None,
    jobs: int | None = None,
    threads_per_worker: int = 1,
    dashboard: bool = True,
    dashboard_address: str | None = None,
    timeout_s: float = 20.0,
) -> tuple[Any, str]:
    """A ``distributed.Client`` and a one-line description of what it is connected to.

    Exactly one of three kinds, in this order of precedence:

    * ``scheduler="tcp://host:port"`` — connect to a running scheduler;
    * ``cluster="slurm" | "pbs"`` — a dask-jobqueue cluster scaled to ``jobs`` jobs (default 1)
      of ``cores`` cores and ``memory`` each on ``queue`` for ``walltime``;
    * otherwise a ``LocalCluster`` of ``n_workers`` worker processes (default: the number of
      CPUs) with ``threads_per_worker`` threads each, listening on 127.0.0.1 only.

    Parameters
    ----------
    dashboard : bool
        Serve the Bokeh dashboard (port 8787, or a free port when 8787 is taken).
    dashboard_address : str, optional
        ``host:port`` the dashboard of a cluster made here listens on; default 127.0.0.1:8787
        (this machine only). Any other interface draws a warning (:func:`check_dashboard_address`).
    timeout_s : float
        How long to wait for a ``scheduler`` to answer.

    Returns
    -------
    (client, description)
        The caller owns the client: ``client.close()`` (and ``client.cluster.close()`` for the
        clusters made here; ``close_client`` does both). The description names the kind,
        the scheduler address and the dashboard link, e.g.
        ``"LocalCluster: 2 workers x 1 thread, scheduler tcp://127.0.0.1:40123, dashboard
        http://127.0.0.1:8787/status"``.

    Raises
    ------
    ParameterError
        Bad option combination (e.g. ``cluster`` without ``cores``/``memory``).
    BackendError
        dask-jobqueue missing, or the scheduler cannot be reached.
    """
    from distributed import Client

    if scheduler:
        try:
            client = Client(scheduler, timeout=f"{timeout_s}s")
        except OSError as exc:
            raise BackendError(f"--scheduler {scheduler}: cannot connect ({exc})") from exc
        n = len(client.scheduler_info().get("workers", {}))
        return client, f"scheduler {scheduler}: {n} workers, {_dashboard(client)}"
    if cluster:
        jq = make_jobqueue_cluster(cluster, queue=queue, cores=cores, memory=memory, walltime=walltime,
                                   dashboard=dashboard, dashboard_address=dashboard_address)
        n_jobs = int(jobs) if jobs else 1
        jq.scale(jobs=n_jobs)
        client = Client(jq)
        return client, (
            f"{type(jq).__name__}: {n_jobs} job(s) x {cores} cores, {memory} on queue {queue or '(default)'}, "
            f"walltime {walltime or '(default)'}; scheduler {jq.scheduler_address}, {_dashboard(client, dashboard)}"
        )
    from distributed import LocalCluster

    if n_workers is not None and int(n_workers) < 1:
        raise ParameterError(f"-nCPUs {n_workers}: expected a positive number of workers")
    local = LocalCluster(
        n_workers=int(n_workers) if n_workers else None,
        threads_per_worker=int(threads_per_worker),
        processes=True,
        host="127.0.0.1",
        dashboard_address=check_dashboard_address(dashboard_address) if dashboard else None,
    )
    client = Client(local)
    n = len(local.workers)
    plural = "s" if threads_per_worker != 1 else ""
    return client, (
        f"LocalCluster: {n} workers x {threads_per_worker} thread{plural}, scheduler {local.scheduler_address}, "
        f"{_dashboard(client, dashboard)}"
    )


def close_client(client: Any) -> None:
    """Close a client and, when it was made by :func:`get_client`, its cluster."""
    cluster = getattr(client, "cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()
