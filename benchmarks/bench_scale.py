"""A 1440-group × 72-η scan (103,680 lineouts) refined with a one-stage recipe on 2 Dask workers.

Measures the lazy, store-native plan (:class:`midasflow.refinement.plan.LineoutPlan`) and the
distributed executor at scale, each step in a fresh process so peak memories are its own:

1. the scan: a strained CeO2 caked scan from the simulator (:func:`midasflow.simulate.simulate_caked`,
   512² geometry, 1 px R bins = 242 points a lineout, 5° η bins), written as a MIDAS ``.zarr.zip``;
2. planning: time and client peak RSS of ``LineoutPlan.of(store)`` + ``describe()``, beside the
   eager plan the project used before (:func:`midasflow.refinement.lineouts.plan_lineouts`:
   every lineout read in the client) on the same store, as a ratio;
3. refinement: lineouts/s, client peak RSS (the LocalCluster scheduler runs in the client
   process) and each worker's peak RSS, for tasks of one ω-group (72 lineouts) and, on the first
   ``--compare-groups`` groups, tasks of one lineout and the serial executor, beside each other.

The recipe is one stage (background, scale and cell together; ``NativeBackend(stages=...)``),
started from the store's instrument terms (right for the simulated scan; ``--estimate`` measures
them from every lineout first, the engine's default).
Results are kept only as counts (``LineoutPlan.results`` streams them); checkpoints are written
as in a real run. Run: ``python benchmarks/bench_scale.py [--groups 1440] [--workers 2]
[--compare-groups 40] [--store PATH]``. Timings on a shared machine are noisy: read the ratios.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mb() -> float:
    """This process's peak resident memory, MB (VmHWM: its own, where ru_maxrss would keep a
    forking parent's across exec)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024.0


def _options(estimate: bool = False):
    from midasflow.crystal import cubic_phase
    from midasflow.refinement.options import RefineOptions
    from midasflow.simulate import CEO2_A_A, ceo2_params

    params = ceo2_params((512, 512), r_bin_px=1.0, eta_bin_deg=5.0, omega_step_deg=0.25)
    return params, RefineOptions(phases=(cubic_phase("CeO2", CEO2_A_A),), instrument=params.instrument,
                                 bkg_terms=3, estimate=estimate)


def _backend():
    from midasflow.refinement.backends import NativeBackend
    from midasflow.refinement.recipe import Stage

    return NativeBackend((Stage("one", ("Back;0", "Back;1", "Back;2", "Scale", "0::A0"), max_cycles=6),))


def make_store(path: str, groups: int) -> dict:
    """Step 1 (own process)."""
    import dask

    from midasflow.cli.demo import DEMO_STRAIN
    from midasflow.io.midas_zarr import write_midas_zarr
    from midasflow.simulate import simulate_caked

    params, options = _options()
    t0 = time.perf_counter()
    ds, _ = simulate_caked(params, options.phases[0], n_groups=groups, strain_tensor=DEMO_STRAIN, seed=3)
    with dask.config.set(scheduler="threads"):
        write_midas_zarr(ds, path)
    return {"seconds": time.perf_counter() - t0, "bytes": Path(path).stat().st_size}


def plan_lazy(path: str) -> dict:
    """Step 2, the plan of this project (own process)."""
    from midasflow.refinement.plan import LineoutPlan

    _, options = _options()
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    plan = LineoutPlan.of(path, options, backend=_backend())
    about = plan.describe()
    return {"seconds": time.perf_counter() - t0, "lineouts": about["lineouts"], "rss_mb": _rss_mb(),
            "rss_before_mb": rss0}


def plan_eager(path: str) -> dict:
    """Step 2, the eager plan (every lineout's arrays read into the client), for comparison."""
    from midasflow.refinement.lineouts import plan_lineouts

    rss0 = _rss_mb()
    t0 = time.perf_counter()
    specs = plan_lineouts(path)
    return {"seconds": time.perf_counter() - t0, "lineouts": len(specs), "rss_mb": _rss_mb(),
            "rss_before_mb": rss0}


def refine(path: str, workers: int, per_task: int | None, out: str, estimate: bool) -> dict:
    """Step 3 (own process): refine on a LocalCluster of ``workers`` one-thread workers
    (``workers`` 0: the serial executor in this process, the reference)."""
    from midasflow.cluster import close_client, get_client
    from midasflow.refinement.executors import DistributedExecutor, SerialExecutor
    from midasflow.refinement.plan import LineoutPlan

    _, options = _options(estimate)
    client = None
    if workers:
        client, _ = get_client(n_workers=workers, dashboard=False)
        client.wait_for_workers(workers)
    try:
        plan = LineoutPlan.of(path, options, backend=_backend())
        executor = SerialExecutor() if client is None else DistributedExecutor(client, lineouts_per_task=per_task)
        counts = {"ok": 0, "failed": 0, "skipped": 0}
        t0 = time.perf_counter()
        for res in plan.results(executor, checkpoint_dir=out):
            counts[res.status] += 1
        seconds = time.perf_counter() - t0
        worker_rss = client.run(_rss_mb) if client is not None else {}
    finally:
        if client is not None:
            close_client(client)
    n = sum(counts.values())
    return {"seconds": seconds, "lineouts": n, "rate": n / seconds, **counts, "client_rss_mb": _rss_mb(),
            "worker_rss_mb": sorted(worker_rss.values())}


STEPS = {"make_store": make_store, "plan_lazy": plan_lazy, "plan_eager": plan_eager, "refine": refine}


def _step(name: str, *args) -> dict:
    """Run one step in a fresh Python process; its JSON result."""
    cmd = [sys.executable, __file__, "--step", name, json.dumps(args)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=1440)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--compare-groups", type=int, default=40,
                        help="groups refined both ways (one ω-group per task vs one lineout per task)")
    parser.add_argument("--store", default=None, help="reuse (or keep) the simulated store here")
    parser.add_argument("--skip-full", action="store_true", help="only the comparison, not the whole scan")
    parser.add_argument("--estimate", action="store_true",
                        help="estimate start values from every lineout (the engine's default; ~2.5x the "
                        "CPU of the one-stage fit) instead of taking the store's, which are right here")
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(STEPS[args.step](*json.loads(args.args))))
        return

    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        store = args.store or str(Path(tmp) / "scan.zarr.zip")
        if not Path(store).exists():
            made = _step("make_store", store, args.groups)
            print(f"scan: {args.groups} ω-groups × 72 η = {args.groups * 72} lineouts, 242 points each; "
                  f"simulated and written in {made['seconds']:.1f} s ({made['bytes'] / 1e6:.0f} MB)")
        lazy, eager = _step("plan_lazy", store), _step("plan_eager", store)
        print(f"plan, {lazy['lineouts']} lineouts:")
        print(f"  lazy (LineoutPlan.of + describe): {lazy['seconds']:7.2f} s  client peak RSS "
              f"{lazy['rss_mb']:6.0f} MB (after imports {lazy['rss_before_mb']:.0f} MB)")
        print(f"  eager (plan_lineouts, before)   : {eager['seconds']:7.2f} s  client peak RSS "
              f"{eager['rss_mb']:6.0f} MB")
        print(f"  ratio eager / lazy: time {eager['seconds'] / lazy['seconds']:.1f}x, "
              f"RSS {eager['rss_mb'] / lazy['rss_mb']:.1f}x")

        def show(label: str, r: dict) -> None:
            print(f"  {label}: {r['lineouts']} lineouts in {r['seconds']:7.1f} s = {r['rate']:6.1f} lineouts/s "
                  f"({r['ok']} ok, {r['failed']} failed, {r['skipped']} skipped); client peak RSS "
                  f"{r['client_rss_mb']:.0f} MB, workers {', '.join(f'{m:.0f}' for m in r['worker_rss_mb'])} MB")

        n = min(args.compare_groups, args.groups)
        small = str(Path(tmp) / "first_groups.zarr.zip")  # the scan's first n groups (same seed)
        _step("make_store", small, n)
        est = args.estimate
        print(f"task size, first {n} groups ({n * 72} lineouts), {args.workers} workers "
              f"(start values {'estimated from each lineout' if est else 'from the store'}):")
        serial = _step("refine", small, 0, None, str(Path(tmp) / "cmp_serial"), est)
        group = _step("refine", small, args.workers, None, str(Path(tmp) / "cmp_group"), est)
        one = _step("refine", small, args.workers, 1, str(Path(tmp) / "cmp_one"), est)
        show("serial, in-process   ", serial)
        show("one ω-group per task ", group)
        show("one lineout per task ", one)
        print(f"  ratios: group tasks / lineout tasks {group['rate'] / one['rate']:.2f}x; "
              f"group tasks / serial {group['rate'] / serial['rate']:.2f}x")
        if not args.skip_full:
            print(f"whole scan, one ω-group per task, {args.workers} workers:")
            show("refine", _step("refine", store, args.workers, None, str(Path(tmp) / "full"), est))


if __name__ == "__main__":
    main()
