"""Pieces shared by the sub-commands: MIDAS-style flag aliases, the Dask client, progress."""
from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator


def add_flag(parser: argparse.ArgumentParser, midas: str, long: str, **kwargs) -> None:
    """Register a MIDAS single-dash flag (``-paramFN``) with its ``--param-fn`` alias."""
    parser.add_argument(midas, long, **kwargs)


def add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    """Flags that choose where Dask runs: local workers, a scheduler, or a jobqueue cluster."""
    group = parser.add_argument_group("where the work runs")
    add_flag(group, "-nCPUs", "--nCPUs", dest="n_cpus", type=int, default=None,
             help="workers of a local Dask cluster (default: run in this process)")
    group.add_argument("--scheduler", default=None, metavar="ADDR",
                       help="address of a running Dask scheduler, e.g. tcp://host:8786")
    group.add_argument("--cluster", choices=("slurm", "pbs"), default=None,
                       help="start workers as SLURM or PBS jobs (needs midasflow[cluster])")
    group.add_argument("--queue", default=None, help="jobqueue: queue/partition")
    group.add_argument("--cores", type=int, default=None, help="jobqueue: cores per job")
    group.add_argument("--memory", default=None, help="jobqueue: memory per job, e.g. 16GB")
    group.add_argument("--walltime", default=None, help="jobqueue: walltime, e.g. 01:00:00")
    group.add_argument("--jobs", type=int, default=1, help="jobqueue: number of jobs")
    group.add_argument("--dashboard-address", default=None, metavar="HOST:PORT",
                       help="where the Dask dashboard of a cluster started here listens (default "
                       "127.0.0.1:8787, this machine only; e.g. 0.0.0.0:8787 opens it to the "
                       "network without authentication, with a warning)")


@contextlib.contextmanager
def dask_client(args: argparse.Namespace) -> Iterator[object | None]:
    """A distributed Client when the flags ask for one (printing the dashboard address), else None."""
    wants_cluster = args.scheduler or args.cluster or (args.n_cpus is not None and args.n_cpus > 1)
    if not wants_cluster:
        yield None
        return
    from midasflow.cluster import close_client, get_client

    client, description = get_client(
        n_workers=args.n_cpus,
        scheduler=args.scheduler,
        cluster=args.cluster,
        queue=args.queue,
        cores=args.cores,
        memory=args.memory,
        walltime=args.walltime,
        jobs=args.jobs,
        dashboard_address=args.dashboard_address,
    )
    print(description, file=sys.stderr)
    try:
        if args.cluster:  # batch jobs start when the queue lets them; work needs a worker
            print(f"waiting for the first of {args.jobs} {args.cluster.upper()} job(s) to start a worker "
                  "(Ctrl-C to give up)", file=sys.stderr)
            client.wait_for_workers(1)
        yield client
    finally:
        close_client(client)  # and the cluster get_client made (a --scheduler client has none)


@contextlib.contextmanager
def progress_bar(client: object | None, enabled: bool = True) -> Iterator[None]:
    """Show Dask's progress bar on stderr while the block computes."""
    if not enabled:
        yield
        return
    if client is None:
        from dask.diagnostics import ProgressBar

        with ProgressBar(out=sys.stderr):
            yield
        return
    yield  # the distributed dashboard shows progress; the address was printed
