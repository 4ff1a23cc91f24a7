"""``midasflow integrate``: raw frames → ``<resultFolder>/<scan>.zarr.zip`` with MIDAS's flags."""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from midasflow.cli._common import (
    CommandParser,
    add_cluster_flags,
    add_common_flags,
    add_flag,
    configure_logging,
    dask_client,
    parse_command,
)
from midasflow.io.frames import ScanSource


def add_integration_flags(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """The flags of MIDAS's ``integrator.py`` (single dash) with ``--long-form`` aliases."""
    add_flag(parser, "-paramFN", "--param-fn", dest="param_fn", required=required,
             help="MIDAS parameter file")
    add_flag(parser, "-dataFN", "--data-fn", dest="data_fn", required=required,
             help="first data file of the scan")
    add_flag(parser, "-darkFN", "--dark-fn", dest="dark_fn", default=None, help="dark file")
    add_flag(parser, "-dataLoc", "--data-loc", dest="data_loc", default="exchange/data",
             help="HDF5 dataset of the frames (default exchange/data)")
    add_flag(parser, "-darkLoc", "--dark-loc", dest="dark_loc", default="exchange/dark",
             help="HDF5 dataset of the darks (default exchange/dark)")
    add_flag(parser, "-startFileNr", "--start-file-nr", dest="start_file_nr", type=int, default=None,
             help="first file number of a numbered series (default: the number in -dataFN)")
    add_flag(parser, "-endFileNr", "--end-file-nr", dest="end_file_nr", type=int, default=None,
             help="last file number of a numbered series (default: one file)")
    add_flag(parser, "-resultFolder", "--result-folder", dest="result_folder", default=".",
             help="output folder (default .)")
    parser.add_argument("--plain-zarr", action="store_true",
                        help="also write <scan>.zarr, a plain xarray zarr store")
    parser.add_argument("--cache-dir", default=None, help="bin-map cache folder")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="midasflow integrate",
        description="Cake raw frames with MIDAS geometry into <resultFolder>/<scan>.zarr.zip. "
        "Extra 'Key value' pairs override the parameter file.",
    )
    add_integration_flags(parser)
    add_cluster_flags(parser)
    add_common_flags(parser)
    return parser


def scan_source(args: argparse.Namespace) -> ScanSource | None:
    """The scan the flags name (``-dataFN``, ``-darkFN``, ``-dataLoc``, ``-darkLoc``,
    ``-startFileNr``, ``-endFileNr``); None without ``-dataFN``."""
    if not args.data_fn:
        return None
    return ScanSource(args.data_fn, dark_fn=args.dark_fn, data_loc=args.data_loc,
                      dark_loc=args.dark_loc, start_file_nr=args.start_file_nr,
                      end_file_nr=args.end_file_nr)


def main(argv: Sequence[str]) -> int:
    from midasflow.pipeline import integrate

    args, overrides = parse_command(build_parser(), argv, overrides=True)
    configure_logging(args.verbose)
    with dask_client(args) as client:
        out = integrate(args.param_fn, scan_source(args), overrides=overrides,
                        result_folder=args.result_folder, cache_dir=args.cache_dir,
                        plain_zarr=args.plain_zarr, client=client,
                        progress=not args.no_progress)
    print(out)
    return 0
