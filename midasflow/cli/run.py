"""``midasflow run``: integration and refinement in one command (MIDAS ``integrate_and_refine.py``)."""
from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from midasflow.cli._common import add_cluster_flags, dask_client
from midasflow.cli.integrate import add_integration_flags
from midasflow.cli.refine import add_refinement_flags, print_summary, refine_options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="midasflow run",
        description="Cake raw frames, then refine every lineout. Extra 'Key value' pairs override "
        "the parameter file.",
    )
    add_integration_flags(parser, required=False)
    add_refinement_flags(parser, data_required=False)
    add_cluster_flags(parser)
    parser.add_argument("--skip-integration", action="store_true",
                        help="refine an existing store given by --zarr-file")
    parser.add_argument("--zarr-file", default=None, help="caked .zarr.zip for --skip-integration")
    parser.add_argument("--skip-refinement", action="store_true", help="integrate only")
    return parser


def main(argv: Sequence[str]) -> int:
    from midasflow.errors import ParameterError
    from midasflow.pipeline import run

    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if not args.skip_integration and not (args.param_fn and args.data_fn):
        raise ParameterError("-paramFN and -dataFN are required unless --skip-integration --zarr-file F")
    with dask_client(args) as client:
        result = run(
            args.param_fn, args.data_fn, args.cif,
            result_folder=args.result_folder, overrides=overrides, dark_fn=args.dark_fn,
            data_loc=args.data_loc, dark_loc=args.dark_loc, start_file_nr=args.start_file_nr,
            end_file_nr=args.end_file_nr, cache_dir=args.cache_dir,
            skip_integration=args.skip_integration, zarr_file=args.zarr_file,
            skip_refinement=args.skip_refinement, client=client, **refine_options(args),
        )
    if args.skip_refinement:
        print(result)
    else:
        print_summary(result, args.out)
    return 0
