"""``midasflow integrate``: raw frames → ``<resultFolder>/<scan>.zarr.zip`` with MIDAS's flags."""
from __future__ import annotations

import argparse
import os
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
from midasflow.limits import MAX_BINS, MAX_MAP_ENTRIES


def add_integration_flags(parser: argparse.ArgumentParser, *, required: bool = True,
                          result_folder_help: str = "output folder (default .)") -> None:
    """The flags of MIDAS's ``integrator.py`` (single dash) with ``--long-form`` aliases; without
    ``required`` (``run``) ``-resultFolder`` has no default (None)."""
    parser.add_argument("-paramFN", "--param-fn", "--param-file", dest="param_fn", required=required,
                        help="MIDAS parameter file (--param-file: MIDAS integrate_and_refine.py's spelling)")
    add_flag(parser, "-dataFN", "--data-fn", dest="data_fn", required=required,
             help="first data file of the scan")
    parser.add_argument("-darkFN", "--dark-fn", "--dark", dest="dark_fn", default=None,
                        help="dark file (--dark: MIDAS integrate_and_refine.py's spelling)")
    add_flag(parser, "-dataLoc", "--data-loc", dest="data_loc", default="exchange/data",
             help="HDF5 dataset of the frames (default exchange/data)")
    add_flag(parser, "-darkLoc", "--dark-loc", dest="dark_loc", default="exchange/dark",
             help="HDF5 dataset of the darks (default exchange/dark)")
    add_flag(parser, "-startFileNr", "--start-file-nr", dest="start_file_nr", type=int, default=None,
             help="first file number of a numbered series (default or -1: the number in -dataFN)")
    add_flag(parser, "-endFileNr", "--end-file-nr", dest="end_file_nr", type=int, default=None,
             help="last file number of a numbered series (default or -1: one file)")
    add_flag(parser, "-resultFolder", "--result-folder", dest="result_folder",
             default="." if required else None, help=result_folder_help)
    add_flag(parser, "-preProcThresh", "--pre-proc-thresh", dest="pre_proc_thresh", type=float, default=-1,
             help="after dark subtraction, pixels below T become 0 and negative ones 0, as MIDAS "
             "(default -1: off)")
    add_flag(parser, "-numFrameChunks", "--num-frame-chunks", dest="num_frame_chunks", type=int, default=-1,
             help="read at most N frames at a time, to bound memory (default -1: one caking pass)")
    add_flag(parser, "-nCPUsLocal", "--n-cpus-local", dest="n_cpus_local", type=int, default=None,
             help="threads of each worker, or of this process without -nCPUs (MIDAS: threads per "
             "integrator instance; default: 1 per worker, all cores in this process)")
    add_flag(parser, "-convertFiles", "--convert-files", dest="convert_files", type=int, choices=(0, 1),
             default=1, help="1 (default): read the data files; 0: read MIDAS's converted "
             "<resultFolder>/<data file>.analysis.MIDAS.zip instead, as MIDAS does")
    add_flag(parser, "-mapDetector", "--map-detector", dest="map_detector", type=int, choices=(0, 1),
             default=1, help="accepted for MIDAS (0 or 1): the bin map is built when no valid cached "
             "map exists, either way (MIDAS builds Map.bin only when absent, too)")
    parser.add_argument("--merge-series", action="store_true",
                        help="one store for the whole -startFileNr..-endFileNr range (default: one "
                        "store per file, as MIDAS's integrator)")
    add_flag(parser, "-skipExisting", "--skip-existing", dest="skip_existing", action="store_true",
             help="do not integrate a file whose store already exists (MIDAS)")
    parser.add_argument("--plain-zarr", action="store_true",
                        help="also write <scan>.zarr, a plain xarray zarr store")
    parser.add_argument("--cache-dir", default=None, help="bin-map cache folder")
    parser.add_argument("--max-bins", type=int, default=MAX_BINS, metavar="N",
                        help=f"refuse a binning with more R × η bins (default {MAX_BINS})")
    parser.add_argument("--max-map-entries", type=int, default=MAX_MAP_ENTRIES, metavar="N",
                        help="refuse a binning that splits the pixels into more bin pieces "
                        f"(default {MAX_MAP_ENTRIES}, ~8 GB while the map is built)")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="midasflow integrate",
        description="Cake raw frames with MIDAS geometry into <resultFolder>/<scan>.zarr.zip (one "
        "per file of a -startFileNr..-endFileNr range). Extra 'Key value' pairs override the "
        "parameter file.",
    )
    add_integration_flags(parser)
    add_cluster_flags(parser)
    add_common_flags(parser)
    return parser


#: Suffix of MIDAS's converted data files (ZIPGEN's output, read back with ``-convertFiles 0``).
CONVERTED_SUFFIX = ".analysis.MIDAS.zip"


def converted_file(data_fn: str, result_folder: str | os.PathLike) -> str:
    """MIDAS's converted file for ``data_fn``: ``<resultFolder>/<name>.analysis.MIDAS.zip``, or
    ``<resultFolder>/<name>`` when ``data_fn`` already is a ``.zip`` (``integrator.py``,
    ``-convertFiles 0``)."""
    name = os.path.basename(data_fn)
    return os.path.join(os.fspath(result_folder), name if name.endswith(".zip") else name + CONVERTED_SUFFIX)


def _unset(value: int | None) -> int | None:
    """MIDAS's -1 ("automatic") as None."""
    return None if value is None or value == -1 else value


def scan_source(args: argparse.Namespace) -> ScanSource | None:
    """The scan the flags name (``-dataFN``, ``-darkFN``, ``-dataLoc``, ``-darkLoc``,
    ``-startFileNr``, ``-endFileNr``, ``-preProcThresh``, ``-numFrameChunks``, ``-convertFiles``);
    None without ``-dataFN``. MIDAS's −1 means "not set" for the numbers, as in ``integrator.py``.

    ``-convertFiles 0`` reads the file MIDAS's converter wrote (:func:`converted_file`), dark
    included (its ``exchange/dark``), instead of ``-dataFN``/``-darkFN``.
    """
    if not args.data_fn:
        return None
    data_fn, dark_fn = args.data_fn, args.dark_fn or None
    if args.convert_files == 0:
        data_fn, dark_fn = converted_file(data_fn, args.result_folder), None
    return ScanSource(data_fn, dark_fn=dark_fn, data_loc=args.data_loc,
                      dark_loc=args.dark_loc, start_file_nr=_unset(args.start_file_nr),
                      end_file_nr=_unset(args.end_file_nr),
                      pre_proc_thresh=None if args.pre_proc_thresh == -1 else args.pre_proc_thresh,
                      frames_per_read=_unset(args.num_frame_chunks))


def main(argv: Sequence[str]) -> int:
    from midasflow.pipeline import integrate_scans, scans_of

    args, overrides = parse_command(build_parser(), argv, overrides=True)
    configure_logging(args.verbose)
    source = scan_source(args)
    scans_of(source, args.merge_series)  # at least one file, before any worker starts
    with dask_client(args) as client:
        stores = integrate_scans(args.param_fn, source, merge_series=args.merge_series,
                                 skip_existing=args.skip_existing, overrides=overrides,
                                 result_folder=args.result_folder, cache_dir=args.cache_dir,
                                 plain_zarr=args.plain_zarr, client=client,
                                 progress=not args.no_progress, max_bins=args.max_bins,
                                 max_map_entries=args.max_map_entries)
    for store in stores:
        print(store)
    return 0
