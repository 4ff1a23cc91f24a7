"""Benchmark of the native refinement engine (one core).

Per lineout: wall and CPU time of the four-stage recipe, time per model evaluation and per
Jacobian, and the share of a Jacobian evaluation spent in the profile
(``midasflow.profile.pattern``). Phases: CeO2 (Fm-3m, 2θ 2.5–12°) and PbSO4 (Pnma, 2θ 2.5–5.9°,
~40 reflections), 3000 points each, started 0.3 % off in cell and ~40 % off in U..Y. The
instrument is passed as an :class:`~midasflow.instrument.Instrument`, as the pipeline does. If
GSAS-II is importable (:func:`midasflow.refinement.gsas2.import_gsasii`), the same recipe runs through
GSASIIscriptable (:func:`~midasflow.refinement.gsas2.refine_pattern_gsas2`) on the same CeO2 data
and the time ratio and both final Rwp are printed; otherwise the reason is printed.

Run: ``python benchmarks/bench_refine.py``
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")          # one core: no multi-threaded BLAS

import tempfile
import time

import numpy as np

from midasflow.crystal import Atom, cubic_phase, phase_from_cell, write_phase_cif
from midasflow.errors import BackendError
from midasflow.instrument import Instrument
from midasflow.refinement.engine import PatternModel, refine_pattern

INST = Instrument(lam=0.172979, polariz=0.99, zero=0.0, U=1.163, V=-0.126, W=0.063, X=0.2,
                  Y=0.5, Z=0.0, shl=0.002)
START = INST.replace(U=1.6, V=-0.1, W=0.09, X=0.3, Y=0.7)


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
    peaks = model.evaluate(vals)[0] - model.background(vals)
    vals["Scale"] = 2e4 / np.abs(peaks).max()
    y = model.evaluate(vals)[0]
    s = np.sqrt(y)
    return y + np.random.default_rng(seed).normal(size=y.size) * s, s


def timeit(fn, n, clock=time.perf_counter):
    fn()
    t = clock()
    for _ in range(n):
        fn()
    return (clock() - t) / n


def bench(name, true_phase, start_phase, x):
    y, s = simulate(true_phase, x)
    refine_pattern(x, y, s, [start_phase], START)          # numba warm-up, reflection cache
    n_rep = 5
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    for _ in range(n_rep):
        res = refine_pattern(x, y, s, [start_phase], START)
    wall = (time.perf_counter() - t_wall) / n_rep
    cpu = (time.process_time() - t_cpu) / n_rep
    model = PatternModel(x, (x[0], x[-1]), [start_phase], INST, 6)
    vals = dict(res.values)
    vary = list(res.esds)
    t_model = timeit(lambda: model.evaluate(vals), 20)
    t_jac = timeit(lambda: model.evaluate(vals, vary, jac=True), 20)
    rt, _ = model._all_terms(vals, vary, True)
    t_prof = timeit(lambda: model._peaks(rt, vals["SH/L"], True), 20)
    tth = res.reflections[true_phase.name]["tth_deg"]
    n_refl = int(((tth >= x[0]) & (tth <= x[-1])).sum())
    print(f"{name}: {x.size} points, {n_refl} reflections in range, {len(vary)} refined "
          "parameters")
    print(f"  four stages: {wall * 1e3:.1f} ms wall, {cpu * 1e3:.1f} ms CPU per lineout "
          f"(Rwp {res.rwp:.3f} %, GOF {res.gof:.3f}, a = {res.cells[true_phase.name][0]:.6f} Å "
          f"± {res.cell_esds[true_phase.name][0]:.1e})")
    print(f"  model evaluation {t_model * 1e3:.2f} ms, Jacobian {t_jac * 1e3:.2f} ms, "
          f"profile share of a Jacobian {100 * t_prof / t_jac:.0f} %")
    return x, y, s, wall, res


def bench_gsas2(x, y, s, native_wall, native):
    from midasflow.refinement.gsas2 import import_gsasii, refine_pattern_gsas2
    try:
        import_gsasii()
    except BackendError as exc:
        print(f"GSAS-II: skipped ({exc})")
        return
    with tempfile.TemporaryDirectory() as tmp:
        cif = write_phase_cif(cubic_phase("CeO2", 5.4113 * 1.003), f"{tmp}/CeO2.cif")
        t = time.perf_counter()
        res = refine_pattern_gsas2(x, y, s, [cif], START, workdir=tmp, index=0)
        wall = time.perf_counter() - t
    print(f"GSAS-II (same recipe, CeO2): {wall * 1e3:.0f} ms, {wall / native_wall:.1f}x the "
          f"native engine; final Rwp GSAS-II {res.rwp:.3f} %, native {native.rwp:.3f} %; "
          f"a = {res.cells['CeO2'][0]:.6f} Å (native {native.cells['CeO2'][0]:.6f} Å)")


def main():
    x = np.linspace(2.5, 12.0, 3000)
    cx, cy, cs, wall, res = bench("CeO2", cubic_phase("CeO2", 5.4113),
                                  cubic_phase("CeO2", 5.4113 * 1.003), x)
    bench("PbSO4", pbso4(), pbso4(1.003), np.linspace(2.5, 5.9, 3000))
    bench_gsas2(cx, cy, cs, wall, res)


if __name__ == "__main__":
    main()
