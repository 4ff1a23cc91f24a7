"""The ``midasflow`` command: ``integrate``, ``refine``, ``run``, ``check``, ``texture`` and ``demo``.

Each sub-command lives in its own module with a ``main(argv) -> int``. User mistakes
(:class:`midasflow.errors.MidasflowError`) print one line and exit with status 2; bugs keep
their traceback. Python warnings print as one line each, ``midasflow <command>: warning: ...``.
SIGTERM (what batch schedulers send at walltime, and ``kill``'s default) stops a command the way
Ctrl-C does: what finished is kept, temporaries are removed, one line says so (exit 143; 130 for
Ctrl-C).
"""
from __future__ import annotations

import contextlib
import importlib
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence

from midasflow.errors import MidasflowError

COMMANDS = {
    "integrate": ("midasflow.cli.integrate", "raw frames -> caked .zarr.zip, one per file (MIDAS integrator.py)"),
    "refine": ("midasflow.cli.refine", "refine every (ω, η) lineout of a .zarr.zip (MIDAS gsas_ii_refine.py)"),
    "run": ("midasflow.cli.run", "integrate, then refine, on one Dask scheduler (integrate_and_refine.py)"),
    "check": ("midasflow.cli.check", "calibration check: the CIF's rings on a .zarr.zip, shifts in ppm"),
    "texture": ("midasflow.cli.texture", "joint texture fit and pole figures from an existing results.zarr"),
    "demo": ("midasflow.cli.demo", "simulate a strained CeO2 scan and run it end to end (a first try)"),
}

USAGE = "usage: midasflow <command> [options]\n\n" \
    "Far-field powder diffraction from raw frames to refined lattice parameters and strain.\n\n" \
    "commands:\n" + "\n".join(f"  {name:<10} {help_text}" for name, (_, help_text) in COMMANDS.items()) + """

examples:
  midasflow demo
  midasflow run -paramFN ps.txt -dataFN CeO2_000001.h5 --cif CeO2.cif -nCPUs 8
  midasflow refine --data CeO2_000001.zarr.zip --cif CeO2.cif --no-atoms

'midasflow <command> -h' shows a command's options; 'midasflow -V' the version.
"""


@contextlib.contextmanager
def one_line_warnings(command: str) -> Iterator[None]:
    """Show warnings as ``midasflow <command>: warning: <message>`` (no source line, no category
    for our own UserWarnings), restoring the previous display on exit."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        kind = "" if category is UserWarning else f"{category.__name__}: "
        first = (str(message).splitlines() or [""])[0]
        print(f"midasflow {command}: warning: {kind}{first}", file=file or sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: unwinds like Ctrl-C, so every ``finally`` and temporary cleanup runs."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` in the main thread for the duration.

    A second SIGTERM (schedulers repeat it before SIGKILL) is ignored so the cleanup can finish.
    """
    if threading.current_thread() is not threading.main_thread():  # signals only go there
        yield
        return

    def handler(signum, frame):  # noqa: ANN001, ARG001
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_STOPPED = ("what finished is kept (refine, run: --resume continues) and nothing half-written is "
            "left")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``midasflow`` console script; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        sys.stderr.write(USAGE)
        print("midasflow: error: a command is required", file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0
    if args[0] in ("-V", "--version"):
        from midasflow import __version__

        print(f"midasflow {__version__}")
        return 0
    command = args[0]
    if command not in COMMANDS:
        from midasflow.params import nearest

        close = nearest(command, list(COMMANDS))
        sys.stderr.write(USAGE)
        print(f"midasflow: error: unknown command {command!r}" + (f"; did you mean {close}?" if close else ""),
              file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    try:
        with sigterm_as_interrupt(), one_line_warnings(command):
            return int(module.main(args[1:]) or 0)
    except MidasflowError as exc:
        print(f"midasflow {command}: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"midasflow {command}: stopped by SIGTERM; {_STOPPED}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"midasflow {command}: interrupted; {_STOPPED}", file=sys.stderr)
        return 130
