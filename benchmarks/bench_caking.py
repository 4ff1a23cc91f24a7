"""Caking throughput and memory: midasflow vs pyFAI on the same frames and bins, same run.

Geometry: 2048 x 2048 frame, 200 µm pixels, Lsd 1 m, beam centre (1024, 1024), no tilt;
RMin 10, RMax 1000, RBinSize 0.5 px (1980 R bins), EtaBinSize 5° (72 η bins).
pyFAI gets the identical bins in (r_mm, χ): 1980 radial bins over [RMin, RMax]·px and 72 azimuthal
bins over [-180, 180]; its CSR engine is built on the first call and timed afterwards.

The machine may be shared: every round times midasflow and pyFAI back to back, and the printed
rates are medians over the rounds (best round in brackets), so the ratio compares like with like.

Usage::

    python benchmarks/bench_caking.py [--frames 64] [--rounds 5] [--threads 2] [--skip-memory]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np


def _params(**over):
    from midasflow.params import Params

    base = {"r_min_px": 10.0, "r_max_px": 1000.0, "r_bin_px": 0.5, "eta_bin_deg": 5.0,
                "wavelength_a": 0.172978, "save_individual_frames": False}
    base.update(over)
    return Params(**base)


def _frames(params, n: int) -> np.ndarray:
    from midasflow.simulate import cubic_rings, simulate_frames

    ceo2 = cubic_rings(5.411, [(1, 1, 1), (2, 0, 0), (2, 2, 0), (3, 1, 1), (2, 2, 2), (4, 0, 0),
                              (3, 3, 1), (4, 2, 0), (4, 2, 2)])
    one, _ = simulate_frames(params, ceo2, n_frames=1, background=20.0, supersample=1)
    rng = np.random.default_rng(0)
    return (one * rng.uniform(0.9, 1.1, size=(n, 1, 1))).astype(np.float32)


# ------------------------------------------------------------------------------ map build
def _map_build_child() -> None:
    """Run in a fresh interpreter with an empty numba cache: print the build timings as JSON."""
    t0 = time.perf_counter()
    from midasflow.binmap import build_binmap, load_or_build_binmap
    from midasflow.caking_kernel import cake_block
    t_import = time.perf_counter() - t0
    params = _params()
    t0 = time.perf_counter()
    bm = build_binmap(params)
    t_cold_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_binmap(params)
    t_cold = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        load_or_build_binmap(params, cache_dir=cache)
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_or_build_binmap(params, cache_dir=cache)
        t_cached = time.perf_counter() - t0
    frame = np.zeros((1,) + bm.detector_shape, dtype=np.float32)
    t0 = time.perf_counter()
    cake_block(frame, bm)  # kernel compile + kernel-layout derivation + one pass
    t_kernel_first = time.perf_counter() - t0
    print(json.dumps({"import_s": t_import, "cold_compile_s": t_cold_compile, "cold_s": t_cold,
                          "build_save_s": t_first, "cached_s": t_cached,
                          "kernel_first_call_s": t_kernel_first, "nnz": int(bm.weights.nnz),
                          "n_r": bm.n_r, "n_eta": bm.n_eta}))


def bench_map_build() -> None:
    with tempfile.TemporaryDirectory() as numba_cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=numba_cache)
        out = subprocess.run([sys.executable, __file__, "--map-build-child"], env=env,
                             check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    print(f"bin map: {r['n_r']} x {r['n_eta']} bins, {r['nnz']:,} entries (fresh process, empty "
          f"numba cache)\n"
          f"  build cold incl. numba compile {r['cold_compile_s']:6.2f} s\n"
          f"  build cold excl. compile       {r['cold_s']:6.2f} s\n"
          f"  build + save to cache          {r['build_save_s']:6.2f} s\n"
          f"  load cached                    {r['cached_s']:6.2f} s\n"
          f"  first cake_block call (kernel compile + layout) {r['kernel_first_call_s']:.2f} s")


# ------------------------------------------------------------------------------ throughput
def bench_throughput(args) -> None:
    import dask
    import numba
    import pyFAI
    import xarray as xr
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    from midasflow.binmap import load_or_build_binmap
    from midasflow.caking import cake
    from midasflow.caking_kernel import cake_block, frames_per_pass

    numba.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as cache:
        binmap = load_or_build_binmap(_params(), cache_dir=cache)
    step = frames_per_pass(binmap)
    params = _params(omega_sum_frames=step)
    frames = _frames(params, args.frames)
    print(f"frames: {frames.shape} float32; numba threads {numba.get_num_threads()}; "
          f"{step} frames per map pass")

    px_m = params.px_um * 1e-6
    ai = AzimuthalIntegrator(dist=params.lsd_um * 1e-6, poni1=(params.bc_z_px + 0.5) * px_m,
                             poni2=(params.bc_y_px + 0.5) * px_m, pixel1=px_m, pixel2=px_m,
                             wavelength=params.wavelength_a * 1e-10)
    r_range = (params.r_min_px * params.px_um * 1e-3, params.r_max_px * params.px_um * 1e-3)
    kw = {"npt_rad": binmap.n_r, "npt_azim": binmap.n_eta, "unit": "r_mm", "radial_range": r_range,
              "azimuth_range": (-180.0, 180.0), "correctSolidAngle": False}
    method = ("full", "csr", "cython")
    n_fai = min(args.frames, 8)

    def dask_run(chunk: int, threads: int):
        da_frames = xr.DataArray(frames, dims=("frame", "z", "y")).chunk({"frame": chunk})
        ds = cake(da_frames, params, binmap=binmap)

        def run():
            with dask.config.set(scheduler="threads", num_workers=threads):
                ds["intensity"].compute()
        return run

    # one call per chunk of k frames (open_frames' default chunk is 64 MiB = 4 such frames)
    def per_chunk(k):
        return lambda: [cake_block(frames[i:i + k], binmap) for i in range(0, args.frames, k)]

    n_cpu = os.cpu_count() or 1  # the threaded scheduler's default worker count
    dask_main = f"midasflow cake() dask, {step}-frame chunks, {n_cpu} threads"
    runs = {
        "midasflow cake_block": (lambda: cake_block(frames, binmap), args.frames),
        "midasflow cake_block, 4-frame calls": (per_chunk(4), args.frames),
        "midasflow cake_block, 1-frame calls": (per_chunk(1), args.frames),
        dask_main: (dask_run(step, n_cpu), args.frames),
        f"midasflow cake() dask, {step}-frame chunks, 1 thread": (dask_run(step, 1), args.frames),
        f"midasflow cake() dask, 4-frame chunks, {n_cpu} threads": (dask_run(4, n_cpu),
                                                                  args.frames),
    }
    setup = {}
    for name in ("integrate2d_ng", "integrate2d"):
        fn = getattr(ai, name, None)
        if fn is None:
            continue
        t0 = time.perf_counter()
        fn(frames[0], method=method, **kw)
        setup[name] = time.perf_counter() - t0
        runs[f"pyFAI {pyFAI.version} {name} {method}"] = (
            (lambda fn=fn: [fn(frames[i], method=method, **kw) for i in range(n_fai)]), n_fai)
    for fn, _ in runs.values():  # warm up (numba compile, kernel layout, thread buffers)
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for i in range(args.rounds):  # rotate the order: no run always follows the same neighbour
        for name in names[i % len(names):] + names[:i % len(names)]:
            fn, n = runs[name]
            t0 = time.perf_counter()
            fn()
            times[name].append(n / (time.perf_counter() - t0))
    fps = {name: float(np.median(v)) for name, v in times.items()}
    for name in runs:
        extra = ""
        for fai_name, t in setup.items():
            if fai_name in name:
                extra = f"  (first call incl. CSR build {t:.2f} s)"
        print(f"{name:60s} {fps[name]:7.1f} frames/s median "
              f"[best {max(times[name]):6.1f}]{extra}")
    best = max(v for k, v in fps.items() if k.startswith("pyFAI"))
    print(f"ratio cake_block / best pyFAI: {fps['midasflow cake_block'] / best:.2f}x; "
          f"dask cake() / best pyFAI: {fps[dask_main] / best:.2f}x "
          f"(aim >= 5x)")

    # same bins, same frame: compare the η-averaged profiles (pyFAI's χ origin differs from η)
    ours = cake_block(frames[:1], binmap)[0]
    theirs = ai.integrate2d_ng(frames[0], method=method, **kw).intensity
    prof_a, prof_b = np.nanmean(ours, axis=1), theirs.mean(axis=0)
    ok = (prof_a > 0) & (prof_b > 0)
    rel = np.abs(prof_b[ok] / prof_a[ok] - 1)
    print(f"agreement of η-mean profiles (pyFAI vs midasflow): |rel diff| median "
          f"{np.median(rel):.1e}, 99th percentile {np.quantile(rel, 0.99):.1e}, max {rel.max():.1e}")


# ------------------------------------------------------------------------------ memory
def bench_memory(args) -> None:
    import dask
    import dask.array as da
    import xarray as xr

    from midasflow.binmap import build_binmap
    from midasflow.caking import cake
    from midasflow.params import Params

    params = Params(nr_pixels_y=256, nr_pixels_z=256, bc_y_px=128.0, bc_z_px=128.0,
                    r_min_px=5.0, r_max_px=125.0, r_bin_px=0.5, eta_bin_deg=5.0,
                    omega_sum_frames=-1, save_individual_frames=False, sum_images=True)
    binmap = build_binmap(params)
    cake_mb = binmap.n_r * binmap.n_eta * 8 / 1e6
    print(f"memory: SMALL 256 x 256 frames (not 2048 x 2048: 500 full frames would take minutes "
          f"to generate here), {binmap.n_r} x {binmap.n_eta} bins ({cake_mb:.2f} MB per cake), "
          f"10 frames/chunk, 2 dask threads, tracemalloc peak (numpy allocations)")
    for n in (50, 500):
        data = da.random.default_rng(1).gamma(2.0, 50.0, size=(n, 256, 256), chunks=(10, -1, -1))
        frames = xr.DataArray(data.astype(np.float32), dims=("frame", "z", "y"))
        ds = cake(frames, params, binmap=binmap)
        tracemalloc.start()
        with dask.config.set(scheduler="threads", num_workers=2):
            ds["intensity"].values, ds["sum_frames"].values
        peak = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()
        print(f"  {n:4d} frames: peak {peak:7.1f} MB "
              f"(all per-frame cakes would be {n * cake_mb:7.1f} MB; frames {n * 0.262:6.1f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--map-build-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.map_build_child:
        _map_build_child()
        return
    if not args.skip_build:
        bench_map_build()
    bench_throughput(args)
    if not args.skip_memory:
        bench_memory(args)


if __name__ == "__main__":
    main()
