"""Warm starts (``midasflow.refinement.warm``): CPU per lineout and the difference of the results,
warm against the full recipe from the same seed, on simulated strained CeO2 scans.

Two geometries (``midasflow.simulate.ceo2_params``, ``simulate_caked``, one ω-group of 40 frames,
the sample strained by ~1e-3, noise seed fixed): the stream benchmark's 2048² detector with 10° η
bins (36 lineouts of 4040 points) and a 512² detector (~1000 points per lineout). Each lineout is
seeded by its ω-group's η-averaged pattern (the default seed, refined with every stage first) and
refined (1) with the whole recipe from the seed's values (what runs without warm starts) and (2)
warm (:meth:`NativeBackend.refine_warm`: the short recipe, guarded). Printed per geometry and
precision: CPU per lineout (``time.process_time``, one thread) of each and their ratio, the
largest difference in any refined parameter and in ``a``, in esds of the full result, and how
many warm fits were refused (refined in full again, their CPU included). Beside them the
unseeded full recipe (its own estimate) for scale.

The machine may be shared: the load average is printed; ratios from the same run are the
robust figure.

    python benchmarks/bench_warm.py [--precision float64 float32] [--shapes 2048 512]
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")          # one core: no multi-threaded BLAS

import argparse
import time

import numpy as np

from midasflow.crystal import cubic_phase
from midasflow.io.instprm import instrument_from_midas
from midasflow.refinement.backends import NativeBackend
from midasflow.refinement.lineouts import plan_lineouts
from midasflow.refinement.options import RefineOptions
from midasflow.refinement.plan import CakeLayout, group_mean_spec
from midasflow.simulate import CEO2_A_A, ceo2_params, simulate_caked

STRAIN = np.array([[1e-3, 0.0, 2e-4], [0.0, -5e-4, 0.0], [2e-4, 0.0, 3e-4]])


def _cpu(call):
    t = time.process_time()
    out = call()
    return out, time.process_time() - t


def _esd_diff(a, b) -> tuple[float, float]:
    """Largest |a − b| / esd_b over the refined parameters, and over the cubic cell edge."""
    every = max(abs(a.values[k] - b.values[k]) / b.esds[k] for k in b.esds if b.esds[k] > 0)
    cell = abs(a.cells["CeO2"][0] - b.cells["CeO2"][0]) / b.cell_esds["CeO2"][0]
    return every, cell


def bench(shape: int, precision: str) -> None:
    params = ceo2_params((shape, shape), eta_bin_deg=10.0)
    ds, _ = simulate_caked(params, cubic_phase("CeO2", CEO2_A_A), n_groups=1, frames_per_group=40,
                           strain_tensor=STRAIN, seed=1)
    options = RefineOptions(phases=(cubic_phase("CeO2", CEO2_A_A),), instrument=instrument_from_midas(ds),
                            refine_atoms=False, precision=precision, warm_start=True)
    specs = [s for s in plan_lineouts(ds) if not s.skipped]
    mean = group_mean_spec(np.asarray(ds["intensity"].transpose("group", "r", "eta").values[0]),
                           CakeLayout.of(ds), 0, min_points=20)
    backend = NativeBackend()
    backend.refine(specs[0], options)  # compile and warm the caches
    seed, seed_cpu = _cpu(lambda: backend.refine(mean, options))
    cpu = {"full": 0.0, "warm": 0.0, "unseeded": 0.0}
    worst, worst_a, worst_unseeded, refused = 0.0, 0.0, 0.0, 0
    for spec in specs:
        full, t = _cpu(lambda: backend.refine(spec, options, dict(seed.values)))
        cpu["full"] += t
        (warm, recipe), t = _cpu(lambda: backend.refine_warm(spec, options, seed, "group mean"))
        cpu["warm"] += t
        unseeded, t = _cpu(lambda: backend.refine(spec, options))
        cpu["unseeded"] += t
        refused += recipe != "warm"
        every, cell = _esd_diff(warm, full)
        worst, worst_a = max(worst, every), max(worst_a, cell)
        worst_unseeded = max(worst_unseeded, _esd_diff(unseeded, full)[0])
    n = len(specs)
    print(f"{shape}² ({specs[0].n_points} points, {n} lineouts), {precision}: CPU per lineout "
          f"full {1e3 * cpu['full'] / n:.0f} ms, warm {1e3 * cpu['warm'] / n:.0f} ms "
          f"(ratio {cpu['full'] / cpu['warm']:.2f}), unseeded {1e3 * cpu['unseeded'] / n:.0f} ms, "
          f"group-mean seed {1e3 * seed_cpu:.0f} ms; warm vs full: max {worst:.3f} esd over the refined "
          f"parameters, a {worst_a:.3f} esd; unseeded vs full max {worst_unseeded:.3f} esd; "
          f"warm fits refused {refused}/{n}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", nargs="+", default=["float64", "float32"])
    ap.add_argument("--shapes", type=int, nargs="+", default=[2048, 512])
    args = ap.parse_args()
    print(f"# load average {os.getloadavg()[0]:.1f}", flush=True)
    for shape in args.shapes:
        for precision in args.precision:
            bench(shape, precision)
    print(f"# load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
