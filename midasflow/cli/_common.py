"""Pieces shared by the sub-commands: a strict parser, MIDAS-style flag aliases, logging and the
Dask client."""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence

from midasflow.errors import UsageError


class CommandParser(argparse.ArgumentParser):
    """``argparse`` whose errors raise :class:`UsageError` (one line, exit status 2 from
    :func:`midasflow.cli.main`) instead of printing the usage and exiting; flags are never
    abbreviated. The description and the ``epilog`` (examples) keep their line breaks."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)  # a misspelt flag is refused, not guessed at
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def add_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, midas: str, long: str,
             **kwargs) -> None:
    """Register a MIDAS single-dash flag (``-paramFN``) with its ``--param-fn`` alias."""
    parser.add_argument(midas, long, **kwargs)


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Flags every command has: ``-v`` and ``--no-progress``."""
    group = parser.add_argument_group("messages")
    group.add_argument("-v", "--verbose", action="store_true",
                       help="log what is done, including the Dask scheduler's messages")
    group.add_argument("--no-progress", action="store_true",
                       help="no progress lines on stderr (without a terminal, e.g. in a batch job's "
                       "log, progress is one line every few seconds)")


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every flag ``parser`` knows (``-paramFN``, ``--param-fn``, …)."""
    return [s for action in parser._actions for s in action.option_strings]


def parse_command(parser: argparse.ArgumentParser, argv: Sequence[str], *,
                  overrides: bool = False) -> tuple[argparse.Namespace, list[str]]:
    """Parse ``argv``; refuse whatever the command does not understand.

    Parameters
    ----------
    parser : argparse.ArgumentParser
    argv : sequence of str
    overrides : bool
        Whether the command takes MIDAS ``Key value`` parameter overrides after its flags (as
        MIDAS's ``integrator.py`` does): bare words and dashed parameter-file keys (``-Lsd``,
        ``--EtaBinSize``) are then overrides, checked against the known keys.

    Returns
    -------
    (namespace, overrides)
        The parsed flags, and the override tokens (empty without ``overrides``).

    Raises
    ------
    UsageError
        An unknown ``-flag``/``--flag`` (naming the nearest known flag or key), a MIDAS flag
        midasflow does not support (saying why), an argument the command takes none of, or an
        override naming an unknown key or carrying a bad value.
    """
    from midasflow.params import check_overrides, is_known_key, is_number, known_keys, nearest

    args, extras = parser.parse_known_args(list(argv))
    flags = option_strings(parser)
    for token in extras:
        if not token.startswith("-") or is_number(token):
            continue
        name = token.split("=", 1)[0]
        if name in UNSUPPORTED_MIDAS_FLAGS:
            raise UsageError(f"{name}: {UNSUPPORTED_MIDAS_FLAGS[name]}")
        if overrides and is_known_key(name):
            continue
        close = nearest(name, flags) or (nearest(name, known_keys()) if overrides else None)
        raise UsageError(f"unknown option {name}" + (f"; did you mean {close}?" if close else
                                                    f" ('{parser.prog} -h' lists the options)"))
    if extras and not overrides:
        raise UsageError(f"unexpected argument {extras[0]!r} (this command takes no parameter overrides)")
    if extras:
        check_overrides(extras)
    return args, extras


#: Flags of MIDAS's integrator.py that midasflow refuses, with why and what to do instead.
UNSUPPORTED_MIDAS_FLAGS = {
    "-writeMat": "MIDAS's MATLAB export is not supported; open the .zarr.zip with xarray or h5py-like zarr readers",
    "-liveViewer": "MIDAS's live viewer is not supported; watch the Dask dashboard (-nCPUs N prints its address)",
    "-viewerTheme": "MIDAS's live viewer is not supported",
    "-peakFit": "peak fitting inside the integrator is not supported; refine the lineouts with 'midasflow refine'",
    "-peakParamsFN": "peak fitting inside the integrator is not supported; refine the lineouts with 'midasflow refine'",
    "-brightFN": "bright/flat-field images are not supported",
    "-csvOutput": "MIDAS's CSV sidecar is not supported; hist_NNNN_data.csv files come from 'midasflow refine'",
    "-outName": "not supported: the store is always named <data file stem>.zarr.zip (as MIDAS's -shortNames 1)",
    "-shortNames": "not supported: the store is always named <data file stem>.zarr.zip (as MIDAS's -shortNames 1)",
}


def configure_logging(verbose: bool = False, level: str | None = None) -> None:
    """Log to stderr: WARNING and above by default, INFO with ``verbose``, or ``level``.

    The ``distributed`` scheduler's INFO messages ("Scheduler cancels key refine-lineout-…",
    "Remove client …") are routine bookkeeping; they show only with ``verbose``.
    """
    chosen = getattr(logging, level) if level else (logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=chosen, format="%(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("midasflow").setLevel(chosen)
    for name in ("distributed", "bokeh", "tornado"):
        logging.getLogger(name).setLevel(chosen if chosen <= logging.INFO else logging.ERROR)


def add_cluster_flags(parser: argparse.ArgumentParser, *, threads: bool = False) -> None:
    """Flags that choose where Dask runs: local workers, a scheduler, or a jobqueue cluster; with
    ``threads`` also MIDAS's ``-nCPUsLocal`` (threads per worker)."""
    group = parser.add_argument_group("where the work runs (Dask)")
    add_flag(group, "-nCPUs", "--nCPUs", dest="n_cpus", type=int, default=None, metavar="N",
             help="N workers of a local Dask cluster, its dashboard address printed (default: "
             "run in this process; run --backend stream: one worker per core)")
    group.add_argument("--scheduler", default=None, metavar="ADDR",
                       help="address of a running Dask scheduler, e.g. tcp://host:8786")
    group.add_argument("--cluster", choices=("slurm", "pbs"), default=None,
                       help="start workers as SLURM or PBS jobs (needs midasflow[cluster])")
    group.add_argument("--queue", default=None, metavar="NAME", help="--cluster: queue or partition")
    group.add_argument("--cores", type=int, default=None, metavar="N", help="--cluster: cores per job")
    group.add_argument("--memory", default=None, metavar="SIZE", help="--cluster: memory per job, e.g. 16GB")
    group.add_argument("--walltime", default=None, metavar="HH:MM:SS", help="--cluster: walltime per job")
    group.add_argument("--jobs", type=int, default=1, metavar="N", help="--cluster: number of jobs (default 1)")
    group.add_argument("--dashboard-address", default=None, metavar="HOST:PORT",
                       help="where the Dask dashboard of a cluster started here listens (default "
                       "127.0.0.1:8787, this machine only; e.g. 0.0.0.0:8787 opens it to the "
                       "network without authentication, with a warning)")
    if threads:
        add_flag(group, "-nCPUsLocal", "--n-cpus-local", dest="n_cpus_local", type=int, default=None,
                 metavar="T", help="threads of each worker, or of this process without -nCPUs "
                 "(MIDAS: threads per integrator; default: 1 per worker, all cores in this process)")


@contextlib.contextmanager
def dask_client(args: argparse.Namespace, *, distributed: bool = False) -> Iterator[object | None]:
    """A distributed Client when the flags ask for one (printing the dashboard address), else None;
    with ``distributed`` (a command that needs one: the stream) always a Client, without
    ``-nCPUs`` a local cluster of one worker per core. Its routine log lines show only with -v.

    ``-nCPUsLocal T`` (where the command has it) sets the threads of each local worker, or of the
    in-process scheduler without a cluster: MIDAS's threads per integrator instance.
    """
    threads = getattr(args, "n_cpus_local", None)
    if threads is not None and threads < 1:
        raise UsageError(f"-nCPUsLocal {threads}: expected a positive number of threads")
    wants_cluster = distributed or args.scheduler or args.cluster or (args.n_cpus is not None and args.n_cpus > 1)
    if not wants_cluster:
        import dask

        with dask.config.set(num_workers=threads) if threads else contextlib.nullcontext():
            yield None
        return
    import distributed  # noqa: F401  (sets its loggers up on import; configure_logging comes after)

    from midasflow.cluster import close_client, get_client

    configure_logging(getattr(args, "verbose", False), getattr(args, "log_level", None))
    client, description = get_client(
        n_workers=args.n_cpus,
        scheduler=args.scheduler,
        cluster=args.cluster,
        queue=args.queue,
        cores=args.cores,
        memory=args.memory,
        walltime=args.walltime,
        jobs=args.jobs,
        threads_per_worker=threads or 1,
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


def announce_sidecars(store: str, instprm: str | None, command: str) -> None:
    """Say on stderr which GSAS-II files beside ``store`` apply (:func:`midasflow.io.instprm.sibling_files`):
    its ``.instprm`` files unless ``-i`` gives one, and its ``.samprm`` files. They are read first,
    so a bad one is the command's one-line error with nothing said before it."""
    import warnings

    from midasflow.io.instprm import read_sibling_files

    with warnings.catch_warnings():  # the refinement itself warns (once) about what it reads
        warnings.simplefilter("ignore")
        found = read_sibling_files(store, instprm_given=bool(instprm))
    for path in found:
        what = "instrument" if path.suffix == ".instprm" else "sample"
        print(f"midasflow {command}: {path} beside the store sets its {what} parameters", file=sys.stderr)
