"""``midasflow demo``: simulate a small strained CeO2 scan and run integration + refinement on it."""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from midasflow.cli._common import add_cluster_flags, dask_client
from midasflow.strain import COMPONENTS, components_from_tensor

#: Sample-frame strain of the demo (xx, yy, zz, yz, xz, xy as a symmetric tensor).
DEMO_STRAIN = np.array([[2.0e-4, 0.0, 0.0], [0.0, -4.0e-4, 1.5e-4], [0.0, 1.5e-4, 8.0e-4]])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="midasflow demo",
                                     description="Simulate a strained CeO2 scan and run it end to end.")
    parser.add_argument("--out", default="demo_out", help="output folder (default demo_out/)")
    parser.add_argument("--frames", type=int, default=8, help="frames to simulate (default 8)")
    parser.add_argument("--sum-frames", type=int, default=2, help="OmegaSumFrames (default 2)")
    parser.add_argument("--size", type=int, default=512, help="detector pixels per side (default 512)")
    parser.add_argument("--eta-bin", type=float, default=5.0, help="EtaBinSize, degrees (default 5: 72 η bins)")
    parser.add_argument("--seed", type=int, default=0)
    add_cluster_flags(parser)
    return parser


#: Simulated profile of the demo: FWHM in pixels at the detector centre, Lorentzian fraction.
DEMO_FWHM_PX = 2.5
DEMO_LORENTZ_FRACTION = 0.2


def _tch_mixing(q: float) -> float:
    """Thompson–Cox–Hastings mixing η of a pseudo-Voigt with Γ_L/Γ = q."""
    return 1.36603 * q - 0.47719 * q**2 + 0.11116 * q**3


def _tch_fwhm(gauss: float, lorentz: float) -> float:
    """Thompson–Cox–Hastings total FWHM from the Gaussian and Lorentzian FWHMs."""
    g, l_ = gauss, lorentz
    return (g**5 + 2.69269 * g**4 * l_ + 2.42843 * g**3 * l_**2 + 4.47163 * g**2 * l_**3
            + 0.07842 * g * l_**4 + l_**5) ** 0.2


def instrument_for_profile(px_um: float, lsd_um: float, fwhm_px: float,
                           lorentz_fraction: float) -> tuple[tuple[str, float], ...]:
    """GSAS-II starting widths (``U V W X Y``) matching a pseudo-Voigt ring profile on the detector.

    The simulator draws rings as a pseudo-Voigt of FWHM ``fwhm_px`` pixels and Lorentzian
    fraction ``lorentz_fraction``; the Thompson–Cox–Hastings split of that FWHM gives the
    Gaussian and Lorentzian FWHMs (centidegrees of 2θ at the detector centre), to which the
    1-pixel box of the pixel itself and of the pixel splitting is added in quadrature (variance
    2/12 px²). Returned as ``Params.instrument_overrides``: ``W`` = σ² (centideg²), ``X`` = γ
    (centideg), ``U = V = Y = 0``. Starting values only: the recipe refines them.
    """
    from scipy.optimize import brentq

    cdeg_per_px = 100.0 * float(np.rad2deg(np.arctan(px_um / lsd_um)))
    fwhm = fwhm_px * cdeg_per_px
    q = brentq(lambda v: _tch_mixing(v) - lorentz_fraction, 0.0, 1.0) if lorentz_fraction > 0 else 0.0
    lorentz = q * fwhm
    gauss = brentq(lambda g: _tch_fwhm(g, lorentz) - fwhm, 1e-9 * fwhm, fwhm) if q < 1 else 0.0
    sig2 = gauss**2 / (8.0 * np.log(2.0)) + (2.0 / 12.0) * cdeg_per_px**2
    return (("U", 0.0), ("V", 0.0), ("W", float(sig2)), ("X", float(lorentz)), ("Y", 0.0))


def make_demo_scan(out: Path, *, n_frames: int, sum_frames: int, size: int, seed: int,
                   omega_step_deg: float = 10.0, eta_bin_deg: float = 5.0,
                   strain_tensor: np.ndarray | None = DEMO_STRAIN, supersample: int = 2,
                   counts: float = 2000.0):
    """Write the simulated scan and the CeO2 CIF under ``out/scan``; return (files, truth, cif).

    The parameter file carries starting profile widths matching the simulated rings
    (:func:`instrument_for_profile`), as a calibrant refinement would give them.
    """
    from midasflow.crystal import cubic_phase, write_phase_cif
    from midasflow.simulate import CEO2_A_A, ceo2_params, simulate_ceo2_scan

    scan_dir = out / "scan"
    base = ceo2_params((size, size))
    instrument = instrument_for_profile(base.px_um, base.lsd_um, DEMO_FWHM_PX, DEMO_LORENTZ_FRACTION)
    files, truth = simulate_ceo2_scan(
        scan_dir, n_frames=n_frames, shape=(size, size), strain_tensor=strain_tensor, seed=seed,
        fwhm_px=DEMO_FWHM_PX, supersample=supersample, counts=counts,
        params_overrides={"omega_sum_frames": sum_frames, "omega_step_deg": omega_step_deg,
                          "eta_bin_deg": eta_bin_deg, "instrument_overrides": instrument},
    )
    cif = write_phase_cif(cubic_phase("CeO2", CEO2_A_A), scan_dir / "CeO2.cif")
    return files, truth, cif


def main(argv: Sequence[str]) -> int:
    from midasflow.cli.refine import print_summary
    from midasflow.pipeline import run

    args = build_parser().parse_args(argv)
    if args.n_cpus is None and not (args.scheduler or args.cluster):
        args.n_cpus = min(os.cpu_count() or 1, 4)  # the demo shows the distributed run by default
    out = Path(args.out)
    t0 = time.perf_counter()
    files, truth, cif = make_demo_scan(out, n_frames=args.frames, sum_frames=args.sum_frames,
                                       size=args.size, seed=args.seed, eta_bin_deg=args.eta_bin)
    print(f"simulated {args.frames} frames of strained CeO2 ({args.size}×{args.size} px) in {files.data}",
          file=sys.stderr)
    # Le Bail: the simulator's ring heights carry no Lorentz-polarisation factor, so a Rietveld
    # model would misfit the intensities; Le Bail fits them freely and keeps the positions exact.
    with dask_client(args) as client:
        results = run(files.params_file, files.data, [cif], out=out / "refinement",
                      result_folder=out, client=client, refine_atoms=False, mode="lebail", progress=True)
    print_summary(results, str(out / "refinement"))
    truth_text = ", ".join(f"{c} {v:+.2e}" for c, v in zip(COMPONENTS, components_from_tensor(DEMO_STRAIN)))
    print(f"simulated truth: a0 = {truth['a0_a']:.6f} Å, sample-frame strain {truth_text}")
    print(f"done in {time.perf_counter() - t0:.1f} s; open {out / 'refinement' / 'report.html'}")
    return 0
