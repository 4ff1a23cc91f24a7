"""The demo scan end to end (integration and refinement) on 1 and 2 Dask workers, and — where
GSAS-II is importable — the same lineouts refined the MIDAS way: one GSAS-II project per lineout
in a ``concurrent.futures.ProcessPoolExecutor``.

Prints, per worker count, the integration and refinement wall times and lineouts per second, the
2-worker/1-worker scaling ratio, and the GSAS-II process-pool rate beside the built-in engine's on
the same lineouts with the same number of processes. The scan is the one ``midasflow demo``
simulates (512² px, 8 frames summed in pairs → 4 ω-groups × 72 η = 288 lineouts; Rietveld).

Run: python benchmarks/bench_pipeline.py [--workers 1 2] [--gsas2-lineouts 24] [--size 512]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

MODE = "rietveld"


def _end_to_end(scan, cif, folder: Path, n_workers: int) -> dict[str, float]:
    from midasflow import pipeline
    from midasflow.cluster import close_client, get_client

    client, _ = get_client(n_workers=n_workers, dashboard=False)
    try:
        client.wait_for_workers(n_workers)
        t0 = time.perf_counter()
        store = pipeline.integrate(scan.params_file, scan.data, result_folder=folder,
                                   cache_dir=folder.parent / "cache")
        t_int = time.perf_counter() - t0
        t0 = time.perf_counter()
        results = pipeline.refine(store, [cif], out=folder / "refinement", mode=MODE, client=client,
                                  refine_atoms=False,  # as the GSAS-II peer below
                                  export=False, report=False)
        t_ref = time.perf_counter() - t0
    finally:
        close_client(client)
    n = int((results.status.values != "skipped").sum())
    return {"integrate_s": t_int, "refine_s": t_ref, "lineouts": n, "rate": n / t_ref, "store": store}


def _gsas2_one(args):
    from midasflow.refinement.gsas2 import refine_pattern_gsas2

    spec, cif, instprm, workdir = args
    res = refine_pattern_gsas2(spec.tth_deg, spec.intensity, spec.sigma, [cif], instprm, workdir=workdir,
                               index=spec.index, mode=MODE)
    return spec.index, res.status, res.rwp, res.cells.get(Path(cif).stem, (float("nan"),))[0]


def _compare_gsas2(store: Path, cif: Path, folder: Path, n_lineouts: int, n_procs: int) -> None:
    try:
        from midasflow.refinement.gsas2 import check_gsas2_available

        where = check_gsas2_available()
    except Exception as exc:  # BackendError: say why and skip
        print(f"GSAS-II comparison skipped: {exc}")
        return
    from midasflow.cluster import close_client, get_client
    from midasflow.crystal import read_phases
    from midasflow.io.instprm import instrument_from_midas
    from midasflow.refinement.lineouts import plan_lineouts, run_distributed
    from midasflow.refinement.options import RefineOptions

    plan = [s for s in plan_lineouts(store) if not s.skipped]
    step = max(1, len(plan) // n_lineouts)
    subset = plan[::step][:n_lineouts]
    instprm = instrument_from_midas(store).to_dict()
    options = RefineOptions(phases=tuple(read_phases([cif])), instrument=instrument_from_midas(store),
                            bkg_terms=6, limits=None, refine_atoms=False, mode=MODE)
    client, _ = get_client(n_workers=n_procs, dashboard=False)
    try:
        client.wait_for_workers(n_procs)
        t0 = time.perf_counter()
        native = run_distributed(subset, options, client, progress=False)
        t_native = time.perf_counter() - t0
    finally:
        close_client(client)
    workdir = folder / "gsas2"
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=n_procs) as pool:
        g2 = list(pool.map(_gsas2_one, [(s, str(cif), instprm, str(workdir)) for s in subset]))
    t_g2 = time.perf_counter() - t0
    ok_g2 = sum(status == "ok" for _, status, _, _ in g2)
    ok_native = sum(r.status == "ok" for r in native)
    print(f"GSAS-II ({where}), {len(subset)} lineouts, {n_procs} processes, one project per lineout:")
    print(f"  GSAS-II process pool : {t_g2:7.2f} s  {len(subset) / t_g2:6.2f} lineouts/s  ({ok_g2} ok)")
    print(f"  midasflow, Dask      : {t_native:7.2f} s  {len(subset) / t_native:6.2f} lineouts/s  ({ok_native} ok)")
    print(f"  speed ratio midasflow / GSAS-II: {t_g2 / t_native:.1f}x")
    da = [abs(r.pattern.cells["CeO2"][0] - a) / a for r, (_, st, _, a) in zip(native, g2)
          if r.status == "ok" and st == "ok"]
    if da:
        print(f"  |Δa|/a between the two, max over {len(da)} lineouts: {max(da):.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--gsas2-lineouts", type=int, default=24)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=8)
    args = parser.parse_args()

    from midasflow.cli.demo import make_demo_scan

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        scan, _, cif = make_demo_scan(root, n_frames=args.frames, sum_frames=2, size=args.size, seed=0)
        print(f"demo scan: {args.frames} frames {args.size}x{args.size} px simulated in {time.perf_counter() - t0:.1f} s")
        from midasflow.binmap import load_or_build_binmap

        t0 = time.perf_counter()
        load_or_build_binmap(scan.params, None, root / "cache")  # shared by every run below
        print(f"bin map built (and cached) in {time.perf_counter() - t0:.1f} s")
        rates = {}
        for n in args.workers:
            run = _end_to_end(scan, cif, root / f"w{n}", n)
            rates[n] = run["rate"]
            print(f"{n} worker(s): integration {run['integrate_s']:6.2f} s, refinement {run['refine_s']:6.2f} s "
                  f"for {run['lineouts']} lineouts = {run['rate']:5.2f} lineouts/s")
            store = run["store"]
        if 1 in rates and 2 in rates:
            print(f"scaling 2 workers / 1 worker: {rates[2] / rates[1]:.2f}x")
        _compare_gsas2(store, cif, root, args.gsas2_lineouts, max(args.workers))


if __name__ == "__main__":
    main()
