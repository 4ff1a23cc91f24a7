"""``midasflow run``: integration and refinement in one command (MIDAS ``integrate_and_refine.py``)."""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from midasflow.cli._common import (
    CommandParser,
    add_cluster_flags,
    add_common_flags,
    configure_logging,
    dask_client,
    parse_command,
)
from midasflow.cli.integrate import add_integration_flags, scan_source
from midasflow.cli.refine import add_refinement_flags, check_backend, refine_options, report_outcome


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="midasflow run",
        usage="midasflow run -paramFN FILE -dataFN FILE --cif CIF [CIF ...] [options] [Key value ...]",
        description="""\
Integrate, then refine, in one command on one Dask scheduler (MIDAS's
integrate_and_refine.py): the frames are caked into <scan>.zarr.zip beside the
refinement folder (or in -resultFolder), then every lineout is refined into
--out (one folder per file of a -startFileNr..-endFileNr range). Takes the flags
of 'midasflow integrate' and 'midasflow refine'; 'Key value' pairs after the
flags override the parameter file (an unknown key is an error).""",
        epilog="""\
examples:
  midasflow run -paramFN ps.txt -dataFN CeO2_000001.h5 --cif CeO2.cif --no-atoms
  midasflow run -paramFN ps.txt -dataFN s_000001.h5 --cif Fe.cif -o fit -nCPUs 8 \\
      EtaBinSize 10
  midasflow run --backend stream --param-file ps.txt --folder /data/live \\
      --cif CeO2.cif -nCPUs 4""",
    )
    add_integration_flags(parser, required=False, result_folder_help="folder of the caked store "
                          "(default: the folder that holds --out, beside the refinement folder)")
    steps = parser.add_argument_group("steps")
    steps.add_argument("--skip-integration", action="store_true",
                       help="refine an existing store given by --zarr-file")
    steps.add_argument("--zarr-file", default=None, metavar="STORE",
                       help="caked .zarr.zip for --skip-integration")
    steps.add_argument("--skip-refinement", action="store_true", help="integrate only")
    add_refinement_flags(parser, data_required=False, pipeline=True)
    add_cluster_flags(parser, threads=True)
    add_common_flags(parser)
    add_stream_flags(parser)
    return parser


def add_stream_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of MIDAS ``integrate_and_refine.py --backend stream`` (and what midasflow adds)."""
    from midasflow.stream.pva import DEFAULT_CHANNEL

    group = parser.add_argument_group("--backend stream: cake and refine frames as they arrive")
    group.add_argument("--folder", default=None, metavar="DIR",
                       help="watch DIR: every complete frame file, present and new, in name order")
    group.add_argument("--pva", action="store_true", help="frames of a live areaDetector NTNDArray PV")
    group.add_argument("--pva-ip", default=None, metavar="HOST[:PORT]",
                       help="where to search the PV (EPICS_PVA_ADDR_LIST; default the EPICS environment)")
    group.add_argument("--pva-channel", default=DEFAULT_CHANNEL, metavar="PV",
                       help=f"the NTNDArray PV (default {DEFAULT_CHANNEL})")
    group.add_argument("--stream-data-loc", default=None, metavar="PATH",
                       help="HDF5 dataset of the frames in a watched folder's files (default -dataLoc's)")
    group.add_argument("--output-h5", default=None, metavar="FILE",
                       help="also write the cakes (groups, and frames) as HDF5 (layout: docs/stream.md)")
    group.add_argument("--compress", action="store_true",
                       help="deflate-compress the --output-h5 arrays (any HDF5 reader reads them)")
    group.add_argument("--zarr-output", default=None, metavar="NAME",
                       help="name of the caked .zarr.zip (default beside --output-h5, else "
                       "<resultFolder>/<folder or PV name>.zarr.zip)")
    group.add_argument("--no-zarr", action="store_true", help="write no .zarr.zip")
    group.add_argument("--stop-after", type=int, default=None, metavar="N",
                       help="stop after N frames (default: Ctrl-C, SIGTERM or --idle-timeout)")
    group.add_argument("--idle-timeout", type=float, default=None, metavar="S",
                       help="stop after S seconds without a new frame")
    group.add_argument("--settle", type=float, default=0.5, metavar="S",
                       help="a folder's file counts once unchanged for S seconds and readable (default 0.5)")
    group.add_argument("--refresh-every", type=int, default=1, metavar="N",
                       help="rewrite results.zarr and report.html after every N refined ω-groups (default 1; "
                       "never sooner than twice the last rewrite's duration after it)")
    group.add_argument("--no-live", action="store_true", help="do not serve the live page")
    group.add_argument("--live-port", type=int, default=0, metavar="PORT",
                       help="port of the live page on 127.0.0.1 (default: a free one, printed)")


#: Flags that mean something only with --backend stream.
_STREAM_ONLY = ("folder", "pva", "pva_ip", "stream_data_loc", "output_h5", "compress", "zarr_output",
                "no_zarr", "stop_after", "idle_timeout")


def _check_stream_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from midasflow.errors import UsageError

    defaults = {name: parser.get_default(name) for name in _STREAM_ONLY}
    if args.backend != "stream":
        used = [name for name in _STREAM_ONLY if getattr(args, name) != defaults[name]]
        if used:
            flag = "--" + used[0].replace("_", "-")
            raise UsageError(f"{flag} needs --backend stream")
        return
    if (args.folder is None) == (not args.pva):
        raise UsageError("--backend stream needs --folder DIR or --pva (one of them)")
    for flag in ("skip_integration", "zarr_file", "data_fn"):
        if getattr(args, flag):
            raise UsageError(f"--{flag.replace('_', '-')}: not with --backend stream (the frames come from "
                             "--folder or --pva)")
    if not args.param_fn:
        raise UsageError("--backend stream needs --param-file")


def stream_main(args: argparse.Namespace, overrides: list[str]) -> int:
    """``run --backend stream``."""
    from midasflow.cli.refine import refine_options, report_outcome
    from midasflow.stream.run import run_stream, stream_worker_config

    options = refine_options(args)
    out = options.pop("out")
    resume = options.pop("resume")
    with stream_worker_config(), dask_client(args, distributed=True) as client:
        result = run_stream(
            args.param_fn, args.cif, folder=args.folder, pva=args.pva, pva_ip=args.pva_ip,
            pva_channel=args.pva_channel, out=out, result_folder=args.result_folder, overrides=overrides,
            cache_dir=args.cache_dir, dark=args.dark_fn, dark_loc=args.dark_loc,
            data_loc=args.stream_data_loc or args.data_loc, output_h5=args.output_h5,
            compress=args.compress, zarr_output=args.zarr_output, no_zarr=args.no_zarr,
            stop_after=args.stop_after, idle_timeout_s=args.idle_timeout, settle_s=args.settle,
            client=client, resume=resume, skip_refinement=args.skip_refinement,
            refresh_every=args.refresh_every, live=not args.no_live, live_port=args.live_port,
            max_bins=args.max_bins, max_map_entries=args.max_map_entries, **options)
    if args.skip_refinement or result is None:
        print(result if result is not None else "no ω-group closed: nothing written but the stream's summary")
        return 0
    return report_outcome(result, str(out), "run", report=not args.no_report)


def main(argv: Sequence[str]) -> int:
    from midasflow.pipeline import check_run_inputs, run, scan_stem

    parser = build_parser()
    args, overrides = parse_command(parser, argv, overrides=True)
    check_backend(args, pipeline=True)
    _check_stream_flags(args, parser)
    configure_logging(args.verbose)
    if args.result_folder is None:  # the store goes beside the refinement folder
        args.result_folder = str(Path(args.out).parent)
    if args.backend == "stream":
        return stream_main(args, overrides)
    source = scan_source(args)
    steps = dict(skip_integration=args.skip_integration, zarr_file=args.zarr_file,
                 skip_refinement=args.skip_refinement, merge_series=args.merge_series,
                 **refine_options(args))
    check_run_inputs(args.param_fn, source, args.cif, result_folder=args.result_folder,
                     **steps)  # before any worker starts
    with dask_client(args) as client:
        result = run(args.param_fn, source, args.cif, result_folder=args.result_folder,
                     overrides=overrides, cache_dir=args.cache_dir, client=client,
                     skip_existing=args.skip_existing, max_bins=args.max_bins,
                     max_map_entries=args.max_map_entries, **steps)
    if args.skip_refinement:
        for store in result if isinstance(result, list) else [result]:
            print(store)
        return 0
    if not isinstance(result, list):
        return report_outcome(result, args.out, "run", store=result.attrs["data_file"],
                              report=not args.no_report)
    status = 0
    for results in result:  # one refinement folder per file
        folder = Path(args.out) / scan_stem(results.attrs["data_file"])
        print(f"== {folder}")
        status = max(status, report_outcome(results, str(folder), "run", store=results.attrs["data_file"],
                                            report=not args.no_report))
    return status
