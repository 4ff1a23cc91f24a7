"""``midasflow demo``: simulate a small strained CeO2 scan and run integration + refinement on it;
``--texture``: a fibre-textured CeO2 scan, refined with the texture stage and the joint texture fit."""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import distributed

from midasflow.cli._common import (
    CommandParser,
    add_cluster_flags,
    add_common_flags,
    configure_logging,
    dask_client,
    parse_command,
)
from midasflow.refinement.options import BACKENDS
from midasflow.strain import COMPONENTS, components_from_tensor

#: Sample-frame strain of the demo (xx, yy, zz, yz, xz, xy as a symmetric tensor).
DEMO_STRAIN = np.array([[2.0e-4, 0.0, 0.0], [0.0, -4.0e-4, 1.5e-4], [0.0, 1.5e-4, 8.0e-4]])
#: Fibre texture of ``demo --texture``: GSAS-II cubic harmonics about the sample z axis.
DEMO_TEXTURE = {"C(4,1)": 0.6, "C(6,1)": -0.3}


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="midasflow demo",
        usage="midasflow demo [options]",
        description="""\
A first try: simulate a strained CeO2 scan (HDF5 frames, a MIDAS parameter
file and the CIF, under <out>/scan), integrate and refine it as 'midasflow run'
would, and print the refined cell and strain beside the simulated truth. Takes
a minute on a laptop; the files it writes are inputs to try the other commands
on.""",
        epilog="""\
example:
  midasflow demo --out demo_out && midasflow check \\
      --data demo_out/scan_000001.zarr.zip --cif demo_out/scan/CeO2.cif""",
    )
    parser.add_argument("--out", default="demo_out", metavar="DIR", help="output folder (default demo_out/)")
    parser.add_argument("--frames", type=int, default=8, metavar="N", help="frames to simulate (default 8)")
    parser.add_argument("--sum-frames", type=int, default=2, metavar="N", help="OmegaSumFrames (default 2)")
    parser.add_argument("--size", type=int, default=512, metavar="PX",
                        help="detector pixels per side (default 512)")
    parser.add_argument("--eta-bin", type=float, default=5.0, metavar="DEG",
                        help="EtaBinSize, degrees (default 5: 72 η bins)")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="random seed of the simulated counts (default 0)")
    parser.add_argument("--engine", choices=BACKENDS, default="native",
                        help="refinement engine: built-in (default) or GSAS-II (GSASIIscriptable)")
    parser.add_argument("--backend", default=None, help=argparse.SUPPRESS)  # the engine's old name: refused
    parser.add_argument("--texture", action="store_true",
                        help="a fibre-textured CeO2 scan instead (simulated as a caked store, 4 ω-groups): "
                        "refined with --texture sh --sh-order 6 and the joint texture fit (pole figures "
                        "in the report)")
    add_cluster_flags(parser)
    add_common_flags(parser)
    return parser


def make_demo_scan(out: Path, *, n_frames: int, sum_frames: int, size: int, seed: int,
                   omega_step_deg: float = 10.0, eta_bin_deg: float = 5.0,
                   strain_tensor: np.ndarray | None = DEMO_STRAIN, supersample: int = 2,
                   counts: float = 2000.0):
    """Write the simulated scan and the CeO2 CIF under ``out/scan``; return (files, truth, cif).

    The parameter file carries the instrument terms the rings were simulated with
    (:func:`midasflow.simulate.ceo2_params`), as a calibrant refinement would give them.
    """
    from midasflow.crystal import cubic_phase, write_phase_cif
    from midasflow.simulate import CEO2_A_A, simulate_ceo2_scan

    scan_dir = out / "scan"
    files, truth = simulate_ceo2_scan(
        scan_dir, n_frames=n_frames, shape=(size, size), strain_tensor=strain_tensor, seed=seed,
        supersample=supersample, counts=counts,
        params_overrides={"omega_sum_frames": sum_frames, "omega_step_deg": omega_step_deg,
                          "eta_bin_deg": eta_bin_deg},
    )
    cif = write_phase_cif(cubic_phase("CeO2", CEO2_A_A), scan_dir / "CeO2.cif")
    return files, truth, cif


def texture_demo(out: Path, *, size: int, eta_bin_deg: float, seed: int,
                 client: distributed.Client | None = None,
                 progress: bool = True, engine: str = "native") -> tuple[object, dict[str, float]]:
    """Simulate a caked CeO2 scan with :data:`DEMO_TEXTURE` about sample z (4 ω-groups, 30° apart),
    write it as a MIDAS ``.zarr.zip`` and refine it with the texture stage; returns (results, truth)."""
    import dask

    from midasflow.crystal import cubic_phase, write_phase_cif
    from midasflow.io.midas_zarr import write_midas_zarr
    from midasflow.pipeline import refine
    from midasflow.simulate import CEO2_A_A, ceo2_params, simulate_caked
    from midasflow.texture.fiber import FiberTexture

    scan_dir = out / "scan"
    scan_dir.mkdir(parents=True, exist_ok=True)
    phase = cubic_phase("CeO2", CEO2_A_A)
    params = ceo2_params((size, size), eta_bin_deg=eta_bin_deg, omega_step_deg=30.0)
    ds, _ = simulate_caked(params, phase, n_groups=4, seed=seed, counts=4000.0,
                           texture=FiberTexture("sh", coefficients=DEMO_TEXTURE))
    store = scan_dir / "textured_ceo2.zarr.zip"
    with dask.config.set(scheduler="threads"):
        write_midas_zarr(ds, store)
    cif = write_phase_cif(phase, scan_dir / "CeO2.cif")
    results = refine(store, [cif], out=out / "refinement", client=client, refine_atoms=False,
                     texture="sh", sh_order=6, progress=progress, backend=engine)
    return results, DEMO_TEXTURE


def main(argv: Sequence[str]) -> int:
    from midasflow.cli.refine import check_backend, report_outcome
    from midasflow.pipeline import run

    # Default: this process. On the 2-core development machine the in-process run refined the
    # 288 lineouts at 8.2/s (45.7 s in all) where two LocalCluster workers, starting and compiling
    # numba each, managed 7.5/s (61.1 s); -nCPUs N or --scheduler/--cluster distribute it.
    args, _ = parse_command(build_parser(), argv)
    check_backend(args, pipeline=False, command="demo")
    configure_logging(args.verbose)
    out = Path(args.out)
    t0 = time.perf_counter()
    if args.texture:
        import json

        print(f"simulating a fibre-textured CeO2 scan (caked directly, {args.size}×{args.size} px geometry, "
              "4 ω-groups) and refining it with --texture sh --sh-order 6", file=sys.stderr)
        with dask_client(args) as client:
            results, tex = texture_demo(out, size=args.size, eta_bin_deg=args.eta_bin, seed=args.seed,
                                        client=client, progress=not args.no_progress, engine=args.engine)
        status = report_outcome(results, str(out / "refinement"), "demo")
        from midasflow.texture.harmonics import parse_name

        for phase, fit in json.loads(results.attrs.get("texture_fits", "{}")).items():
            for name, (v, e) in fit["coefficients"].items():
                l, _, n = parse_name(name)
                true = tex.get(f"C({l},{n})", 0.0)
                print(f"{phase} {name}: {v:+.4f} ± {e:.4f} (simulated {true:+.4f})")
            print(f"{phase} texture index J = {fit['texture_index'][0]:.4f} ± {fit['texture_index'][1]:.4f}")
        print(f"done in {time.perf_counter() - t0:.1f} s; open {out / 'refinement' / 'report.html'}")
        return status
    files, truth, cif = make_demo_scan(out, n_frames=args.frames, sum_frames=args.sum_frames,
                                       size=args.size, seed=args.seed, eta_bin_deg=args.eta_bin)
    print(f"simulated {args.frames} frames of strained CeO2 ({args.size}×{args.size} px) in {files.data}",
          file=sys.stderr)
    # lattice and strain work: atoms held (--no-atoms), as the manual recommends
    print("refining with --no-atoms (refine_atoms=False): atoms are refined by default, as in "
          "MIDAS's script, but the manual recommends --no-atoms for lattice and strain work",
          file=sys.stderr)
    with dask_client(args) as client:
        results = run(files.params_file, files.data, [cif], out=out / "refinement",
                      result_folder=out, client=client, refine_atoms=False, backend=args.engine,
                      progress=not args.no_progress)
    status = report_outcome(results, str(out / "refinement"), "demo")
    truth_text = ", ".join(f"{c} {v:+.2e}" for c, v in zip(COMPONENTS, components_from_tensor(DEMO_STRAIN)))
    print(f"simulated truth: a0 = {truth['a0_a']:.6f} Å, sample-frame strain {truth_text}")
    print(f"done in {time.perf_counter() - t0:.1f} s; open {out / 'refinement' / 'report.html'}")
    return status
