"""``midasflow texture``: fit the joint texture again from an existing results store.

Reads ``<results>/results.zarr`` (the per-reflection intensities and sample directions every
native refinement writes), fits GSAS-II's cylindrical spherical-harmonics texture to all lineouts
together (:func:`midasflow.texture.polefigure.add_texture_fit`), writes the fit back into
``results.zarr`` (atomically) and ``texture.html`` (pole figures, coverage), and prints the
coefficients and the texture index J. No lineout is refined again.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from midasflow.cli._common import CommandParser, add_common_flags, configure_logging, parse_command


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="midasflow texture",
                           description="Joint spherical-harmonics texture fit over every lineout of an existing "
                           "refinement (results.zarr), without refining again; writes the fit into "
                           "results.zarr and pole figures into texture.html.")
    parser.add_argument("--results", "-r", required=True,
                        help="refinement output folder holding results.zarr (or the results.zarr itself)")
    parser.add_argument("--sh-order", type=int, default=4, metavar="N",
                        help="highest harmonic order, 2..12 (default 4)")
    parser.add_argument("--sample-axis", nargs=3, type=float, default=(0.0, 0.0, 1.0), metavar=("X", "Y", "Z"),
                        help="axis of the cylindrical sample symmetry in the sample frame (lab frame at "
                        "ω = 0: x beam, y horizontal, z up; default 0 0 1)")
    parser.add_argument("--phase", nargs="+", default=None, help="phases to fit (default: all)")
    add_common_flags(parser)
    return parser


def main(argv: Sequence[str]) -> int:
    import numpy as np

    from midasflow.errors import ParameterError
    from midasflow.refinement.options import check_sh_order
    from midasflow.results import open_results, write_results_zarr
    from midasflow.texture.polefigure import add_texture_fit

    args, _ = parse_command(build_parser(), argv)
    configure_logging(args.verbose)
    check_sh_order(args.sh_order)
    axis = np.asarray(args.sample_axis, float)
    if not (np.all(np.isfinite(axis)) and np.linalg.norm(axis) > 0):
        raise ParameterError(f"--sample-axis {' '.join(map(str, args.sample_axis))}: expected a non-zero "
                             "direction X Y Z")
    path = Path(args.results)
    store = path if path.name.endswith(".zarr") else path / "results.zarr"
    if not store.exists():
        raise ParameterError(f"--results {store}: no results store (expected the --out folder of midasflow refine)")
    try:
        ds = open_results(store)
    except Exception as exc:  # noqa: BLE001 - any unreadable store is the user's input error
        raise ParameterError(f"--results {store}: not a readable results store ({type(exc).__name__}: {exc})") from None
    try:
        ds = add_texture_fit(ds, order=args.sh_order, sample_axis=tuple(axis), phases=args.phase)
    except ValueError as exc:
        raise ParameterError(f"--results {store}: {exc}") from None
    write_results_zarr(ds, store)
    from midasflow.texture.report import write_texture_report

    html = write_texture_report(ds, store.parent / "texture.html")
    for phase, fit in json.loads(ds.attrs["texture_fits"]).items():
        j, je = fit["texture_index"]
        print(f"{phase}: {fit['status']}, order {fit['order']}, {fit['n_points']} points, "
              f"J = {j:.5f} ± {je:.5f}, GOF {fit['gof']:.3g}")
        for name, (v, e) in fit["coefficients"].items():
            print(f"  {name:<10} {v:+.5f} ± {e:.5f}")
        for note in fit["notes"]:
            print(f"  note: {note}")
    print(f"results: {store}; pole figures: {html}")
    if (store.parent / "report.html").is_file():
        print(f"note: {store.parent / 'report.html'} still shows the refinement's own texture fit; "
              f"this fit is in {html.name} and results.zarr")
    return 0
