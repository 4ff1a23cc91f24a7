"""``midasflow check``: the CIF's ring positions against a caked store, nothing refined.

GSAS-II's manual way to check a MIDAS calibration is "Calculate → Compute": the calibrant's
reflection positions drawn over the pattern. This command draws them over the η-averaged pattern
and every lineout (``<out>/calibration_check.html``), fits each ring, and prints each ring's shift
as a d-spacing error in ppm (also ``<out>/ring_shifts.csv``); see :mod:`midasflow.check`.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from midasflow.cli._common import (
    CommandParser,
    add_common_flags,
    announce_sidecars,
    configure_logging,
    parse_command,
)

#: A mean ring shift this large (ppm) and beyond three esds says: recalibrate.
NOTEWORTHY_PPM = 50.0


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="midasflow check",
        usage="midasflow check --data STORE --cif CIF [CIF ...] [options]",
        description="""\
Calibration check without refining (GSAS-II's "Calculate -> Compute"): the
CIF's reflection positions drawn over the η-averaged pattern and every lineout
(calibration_check.html), each ring fitted and its shift printed as a d-spacing
error in ppm (also ring_shifts.csv). A mean shift beyond 50 ppm says to revisit
the calibration.""",
        epilog="""\
example:
  midasflow check --data CeO2_000001.zarr.zip --cif CeO2.cif""",
    )
    parser.add_argument("--data", "-d", required=True, metavar="STORE",
                        help="caked .zarr.zip (or plain zarr) to check")
    parser.add_argument("--cif", "-c", nargs="+", required=True, metavar="CIF",
                        help="one CIF per phase (the calibrant)")
    parser.add_argument("--out", "-o", default="check", metavar="DIR",
                        help="output folder: calibration_check.html, ring_shifts.csv (default check/)")
    parser.add_argument("--instprm", "-i", default=None, metavar="FILE",
                        help="GSAS-II .instprm (default: the store's InstrumentParameters, "
                        "overridden by x.instprm or x.zarr.instprm beside x.zarr.zip)")
    parser.add_argument("--limits", nargs=2, type=float, metavar=("LOW", "HIGH"), default=None,
                        help="2θ range to check, degrees (default: the data's)")
    parser.add_argument("--no-lineouts", action="store_true",
                        help="fit the rings in the η-averaged pattern only, not in every lineout")
    add_common_flags(parser)
    return parser


def main(argv: Sequence[str]) -> int:
    from midasflow.check import check_calibration, write_check_report
    from midasflow.errors import ParameterError

    args, _ = parse_command(build_parser(), argv)
    configure_logging(args.verbose)
    if args.limits and not 0 <= args.limits[0] < args.limits[1] <= 180:
        raise ParameterError(f"--limits {args.limits[0]:g} {args.limits[1]:g}: expected 0 <= LOW < HIGH <= 180")
    announce_sidecars(args.data, args.instprm, "check")
    check = check_calibration(args.data, args.cif, instprm=args.instprm, limits=args.limits,
                              per_lineout=not args.no_lineouts, progress=not args.no_progress)
    out = Path(args.out)
    html = write_check_report(check, out / "calibration_check.html")
    csv = check.write_csv(out / "ring_shifts.csv")
    print(check.format_table())
    mean, esd, n = check.mean_shift_ppm()
    print(f"mean ring shift {mean:.1f} ± {esd:.1f} ppm over {n} rings (d_obs/d_calc − 1, η-averaged pattern)")
    if n and abs(mean) > max(NOTEWORTHY_PPM, 3 * esd):
        print(f"midasflow check: note: the rings sit {abs(mean):.0f} ppm {'above' if mean > 0 else 'below'} "
              "the CIF's d-spacings: revisit the calibration (Lsd, wavelength) or the CIF's cell",
              file=sys.stderr)
    print(f"plots: {html}; table: {csv}")
    return 0
