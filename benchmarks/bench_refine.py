"""Benchmark of the native refinement engine (one core).

Per lineout: wall time of the four-stage recipe, time per model evaluation and per Jacobian,
and the share of a Jacobian evaluation spent in the profile (``midasflow.profile.pattern``).
Phases: CeO2 (Fm-3m) and PbSO4 (Pnma) restricted to ~40 reflections. If ``GSASIIscriptable``
is importable, GSAS-II refines the same CeO2 pattern for comparison; otherwise the reason is
printed.

Run: ``python benchmarks/bench_refine.py``
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from midasflow import profile
from midasflow.crystal import Atom, cubic_phase, phase_from_cell
from midasflow.refine.engine import PatternModel, refine_pattern

INST = {"Lam": 0.172979, "Polariz.": 0.99, "Zero": 0.0, "U": 1.163, "V": -0.126, "W": 0.063,
        "X": 0.2, "Y": 0.5, "Z": 0.0, "SH/L": 0.002}
START = dict(INST, U=1.6, V=-0.1, W=0.09, X=0.3, Y=0.7)


def pbso4(scale=1.0):
    return phase_from_cell("PbSO4", (8.48 * scale, 5.398 * scale, 6.958 * scale, 90, 90, 90),
                           "P n m a",
                           [Atom("Pb1", "Pb", (0.1879, 0.25, 0.167), 1.0, 0.0163),
                            Atom("S1", "S", (0.0654, 0.25, 0.684), 1.0, 0.0109),
                            Atom("O1", "O", (0.9083, 0.25, 0.5954), 1.0, 0.0193),
                            Atom("O3", "O", (0.0810, 0.0272, 0.8086), 1.0, 0.0156)])


def simulate(phase, x, seed=0):
    model = PatternModel(x, (x[0], x[-1]), [phase], INST, 6)
    vals = dict(model.values, **{"Back;0": 100.0, "Back;1": -20.0})
    peaks = model.evaluate(vals)[0] - 100.0
    vals["Scale"] = 2e4 / np.abs(peaks).max()
    y = model.evaluate(vals)[0]
    s = np.sqrt(y)
    return y + np.random.default_rng(seed).normal(size=y.size) * s, s


def timeit(fn, n):
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def bench(name, true_phase, start_phase, x):
    y, s = simulate(true_phase, x)
    refine_pattern(x, y, s, [start_phase], START)          # numba warm-up
    t = time.perf_counter()
    n_rep = 5
    for _ in range(n_rep):
        res = refine_pattern(x, y, s, [start_phase], START)
    wall = (time.perf_counter() - t) / n_rep
    model = PatternModel(x, (x[0], x[-1]), [start_phase], INST, 6)
    vals = dict(res.values)
    vary = list(res.esds)
    t_model = timeit(lambda: model.evaluate(vals), 20)
    t_jac = timeit(lambda: model.evaluate(vals, vary, jac=True), 20)
    rt = model.reflection_terms(0, vals)
    t_prof = timeit(lambda: profile.pattern(x, rt["tth"], rt["sig2"], rt["gam"],
                                            rt["intensity"], vals["SH/L"], derivatives=True), 20)
    n_refl = len(model.phases[0].hkl)
    print(f"{name}: {x.size} points, {n_refl} reflections, {len(vary)} refined parameters")
    print(f"  four stages: {wall * 1e3:.1f} ms per lineout (Rwp {res.rwp:.3f} %, "
          f"GOF {res.gof:.3f}, a = {res.cells[true_phase.name][0]:.6f} Å "
          f"± {res.cell_esds[true_phase.name][0]:.1e})")
    print(f"  model evaluation {t_model * 1e3:.2f} ms, Jacobian {t_jac * 1e3:.2f} ms, "
          f"profile share of a Jacobian {100 * t_prof / t_jac:.0f} %")
    return x, y, s


def bench_gsas2(x, y, s):
    try:
        import GSASIIscriptable as G2sc  # noqa: F401
    except ImportError as exc:
        print(f"GSAS-II: skipped (GSASIIscriptable not importable: {exc})")
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "ceo2.xye")
        np.savetxt(data, np.column_stack([x, y, s]))
        inst = os.path.join(tmp, "inst.instprm")
        with open(inst, "w") as fh:
            fh.write("#GSAS-II instrument parameter file\n")
            for k, v in dict(START, Type="PXC", Bank=1, Azimuth=0.0).items():
                fh.write(f"{k}:{v}\n")
        cif = os.path.join(tmp, "CeO2.cif")
        from midasflow.crystal import write_phase_cif
        write_phase_cif(cubic_phase("CeO2", 5.4113 * 1.003), cif)
        gpx = G2sc.G2Project(newgpx=os.path.join(tmp, "b.gpx"))
        hist = gpx.add_powder_histogram(data, inst)
        gpx.add_phase(cif, phasename="CeO2", histograms=[hist])
        steps = [{"set": {"Background": {"type": "chebyschev-1", "no. coeffs": 6,
                                         "refine": True}}},
                 {"set": {"Cell": True}},
                 {"set": {"Instrument Parameters": ["U", "V", "W"]}},
                 {"set": {"Instrument Parameters": ["X", "Y", "SH/L"]}}]
        t = time.perf_counter()
        gpx.do_refinements(steps)
        print(f"GSAS-II: four stages {1e3 * (time.perf_counter() - t):.0f} ms, "
              f"wR {hist.get_wR():.3f} %")


def main():
    x = np.linspace(2.5, 12.0, 3000)
    cx, cy, cs = bench("CeO2", cubic_phase("CeO2", 5.4113), cubic_phase("CeO2", 5.4113 * 1.003),
                       x)
    x_o = np.linspace(2.5, 7.2, 3000)                    # ~40 PbSO4 reflections
    bench("PbSO4", pbso4(), pbso4(1.003), x_o)
    bench_gsas2(cx, cy, cs)


if __name__ == "__main__":
    main()
