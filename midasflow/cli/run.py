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
        description="Cake raw frames, then refine every lineout. Extra 'Key value' pairs override "
        "the parameter file.",
    )
    add_integration_flags(parser, required=False, result_folder_help="folder of the caked store "
                          "(default: the folder that holds --out, beside the refinement folder)")
    add_refinement_flags(parser, data_required=False, pipeline=True)
    add_cluster_flags(parser)
    add_common_flags(parser)
    parser.add_argument("--skip-integration", action="store_true",
                        help="refine an existing store given by --zarr-file")
    parser.add_argument("--zarr-file", default=None, help="caked .zarr.zip for --skip-integration")
    parser.add_argument("--skip-refinement", action="store_true", help="integrate only")
    return parser


def main(argv: Sequence[str]) -> int:
    from midasflow.pipeline import check_run_inputs, run, scan_stem

    args, overrides = parse_command(build_parser(), argv, overrides=True)
    check_backend(args, pipeline=True)
    configure_logging(args.verbose)
    if args.result_folder is None:  # the store goes beside the refinement folder
        args.result_folder = str(Path(args.out).parent)
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
        return report_outcome(result, args.out, "run", store=result.attrs["data_file"])
    status = 0
    for results in result:  # one refinement folder per file
        folder = Path(args.out) / scan_stem(results.attrs["data_file"])
        print(f"== {folder}")
        status = max(status, report_outcome(results, str(folder), "run", store=results.attrs["data_file"]))
    return status
