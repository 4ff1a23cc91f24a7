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
                          result_folder_help: str = "folder of the .zarr.zip stores (default .)") -> None:
    """The flags of MIDAS's ``integrator.py`` (single dash) with ``--long-form`` aliases; without
    ``required`` (``run``) ``-resultFolder`` has no default (None)."""
    scan = parser.add_argument_group("the scan (MIDAS integrator.py flags; -1 means unset, as there)")
    scan.add_argument("-paramFN", "--param-fn", "--param-file", dest="param_fn", required=required,
                      metavar="FILE", help="MIDAS parameter file: the calibrated geometry (Lsd, BC, "
                      "Wavelength, tx/ty/tz, p0..), binning and ω (--param-file: integrate_and_refine.py's "
                      "spelling)")
    add_flag(scan, "-dataFN", "--data-fn", dest="data_fn", required=required, metavar="FILE",
             help="the scan's (first) data file: HDF5/NeXus, GE, TIFF, CBF, EDF or zarr")
    scan.add_argument("-darkFN", "--dark-fn", "--dark", dest="dark_fn", default=None, metavar="FILE",
                      help="dark file (--dark: integrate_and_refine.py's spelling; default: -darkLoc "
                      "inside the data file, if there)")
    add_flag(scan, "-dataLoc", "--data-loc", dest="data_loc", default="exchange/data", metavar="PATH",
             help="HDF5 dataset of the frames (default exchange/data)")
    add_flag(scan, "-darkLoc", "--dark-loc", dest="dark_loc", default="exchange/dark", metavar="PATH",
             help="HDF5 dataset of the darks (default exchange/dark)")
    add_flag(scan, "-startFileNr", "--start-file-nr", dest="start_file_nr", type=int, default=None,
             metavar="N", help="first file number of a numbered series (default: the 6-digit number "
             "in -dataFN)")
    add_flag(scan, "-endFileNr", "--end-file-nr", dest="end_file_nr", type=int, default=None, metavar="N",
             help="last file number of the series (default: one file); one .zarr.zip per file, "
             "missing files skipped with a warning")
    scan.add_argument("--merge-series", action="store_true",
                      help="one store for the whole -startFileNr..-endFileNr range instead of one "
                      "per file")
    add_flag(scan, "-preProcThresh", "--pre-proc-thresh", dest="pre_proc_thresh", type=float, default=-1,
             metavar="T", help="after dark subtraction, pixels under T counts become 0, and negative ones "
             "0, as MIDAS's converter does (default: off)")
    add_flag(scan, "-numFrameChunks", "--num-frame-chunks", dest="num_frame_chunks", type=int, default=-1,
             metavar="N", help="read at most N frames at a time, to bound memory (default: one pass)")
    add_flag(scan, "-convertFiles", "--convert-files", dest="convert_files", type=int, choices=(0, 1),
             default=1, help="1 (default): read the data files; 0: read MIDAS's converted "
             "<resultFolder>/<data file>.analysis.MIDAS.zip instead, as MIDAS does")
    add_flag(scan, "-mapDetector", "--map-detector", dest="map_detector", type=int, choices=(0, 1),
             default=1, help="accepted for MIDAS: the bin map is built whenever no valid cached map "
             "exists, either way")
    out = parser.add_argument_group("the caked store")
    add_flag(out, "-resultFolder", "--result-folder", dest="result_folder", metavar="DIR",
             default="." if required else None, help=result_folder_help)
    add_flag(out, "-skipExisting", "--skip-existing", dest="skip_existing", action="store_true",
             help="do not integrate a file whose store already exists (MIDAS)")
    out.add_argument("--plain-zarr", action="store_true",
                     help="also write <scan>.zarr, a plain xarray zarr store")
    out.add_argument("--cache-dir", default=None, metavar="DIR",
                     help="keep the pixel-to-bin map here and reuse it while the geometry is unchanged")
    out.add_argument("--max-bins", type=int, default=MAX_BINS, metavar="N",
                     help=f"refuse a binning with more R × η bins (default {MAX_BINS})")
    out.add_argument("--max-map-entries", type=int, default=MAX_MAP_ENTRIES, metavar="N",
                     help="refuse a binning that splits the pixels into more bin pieces "
                     f"(default {MAX_MAP_ENTRIES}, ~8 GB while the map is built)")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="midasflow integrate",
        usage="midasflow integrate -paramFN FILE -dataFN FILE [options] [Key value ...]",
        description="""\
Cake raw detector frames with MIDAS's geometry (exact pixel splitting onto an
(R, η) grid, ω-frames summed by OmegaSumFrames) into
<resultFolder>/<scan>.zarr.zip, the store GSAS-II's MIDAS importer and
'midasflow refine' read: one store per file of a -startFileNr..-endFileNr range,
as MIDAS's integrator.py. 'Key value' pairs after the flags override the
parameter file (an unknown key is an error).""",
        epilog="""\
examples:
  midasflow integrate -paramFN ps.txt -dataFN CeO2_000001.h5 -darkFN dark_000001.h5
  midasflow integrate -paramFN ps.txt -dataFN scan_000010.h5 -startFileNr 10 \\
      -endFileNr 20 -resultFolder caked -nCPUs 4 EtaBinSize 10 RBinSize 0.5""",
    )
    add_integration_flags(parser)
    add_cluster_flags(parser, threads=True)
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
