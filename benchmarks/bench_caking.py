"""Caking throughput and memory: midasflow vs pyFAI on the same frames and bins, same run.

Geometry: 2048 x 2048 frame, 200 µm pixels, Lsd 1 m, beam centre (1024, 1024), no tilt;
RMin 10, RMax 1000, RBinSize 0.5 px (1980 R bins), EtaBinSize 5° (72 η bins).
pyFAI gets the identical bins in (r_mm, χ): 1980 radial bins over [RMin, RMax]·px and 72 azimuthal
bins over [-180, 180]; its CSR engine is built on the first call and timed afterwards.

Usage::

    python benchmarks/bench_caking.py [--frames 16] [--block 8] [--repeat 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import tracemalloc

import numpy as np


def _best(fn, repeat: int) -> float:
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _frames(params, n: int) -> np.ndarray:
    from midasflow.simulate import cubic_rings, simulate_frames

    ceo2 = cubic_rings(5.411, [(1, 1, 1), (2, 0, 0), (2, 2, 0), (3, 1, 1), (2, 2, 2), (4, 0, 0),
                              (3, 3, 1), (4, 2, 0), (4, 2, 2)])
    one, _ = simulate_frames(params, ceo2, n_frames=1, background=20.0, supersample=1)
    rng = np.random.default_rng(0)
    return (one * rng.uniform(0.9, 1.1, size=(n, 1, 1))).astype(np.float32)


def bench_throughput(args) -> None:
    import dask
    import numba
    import xarray as xr

    from midasflow.binmap import build_binmap, load_or_build_binmap
    from midasflow.cake import cake, cake_block
    from midasflow.params import Params

    numba.set_num_threads(args.threads)
    params = Params(r_min_px=10.0, r_max_px=1000.0, r_bin_px=0.5, eta_bin_deg=5.0,
                    wavelength_a=0.172978, save_individual_frames=False,
                    omega_sum_frames=args.block)
    t0 = time.perf_counter()
    binmap = build_binmap(params)
    t_build = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        load_or_build_binmap(params, cache_dir=cache)
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_or_build_binmap(params, cache_dir=cache)
        t_cached = time.perf_counter() - t0
    print(f"bin map: {binmap.n_r} x {binmap.n_eta} bins, {binmap.weights.nnz:,} entries; "
          f"build (cold) {t_build:.2f} s, build+save {t_first:.2f} s, load cached {t_cached:.2f} s")

    frames = _frames(params, args.frames)
    print(f"frames: {frames.shape} float32, numba threads {numba.get_num_threads()}")
    cake_block(frames[:2], binmap)  # compile / warm caches
    t_mf = _best(lambda: [cake_block(frames[i:i + args.block], binmap)
                          for i in range(0, args.frames, args.block)], args.repeat)
    fps_mf = args.frames / t_mf
    print(f"midasflow cake_block ({args.block} frames/pass): {fps_mf:8.1f} frames/s")
    fps_1 = args.block / _best(lambda: [cake_block(frames[i:i + 1], binmap)
                                        for i in range(args.block)], args.repeat)
    print(f"midasflow cake_block (1 frame/pass):        {fps_1:8.1f} frames/s")

    da_frames = xr.DataArray(frames, dims=("frame", "z", "y")).chunk({"frame": args.block})
    ds = cake(da_frames, params, binmap=binmap)
    with dask.config.set(scheduler="threads", num_workers=1):
        ds["intensity"].values  # warm
        fps_dask = args.frames / _best(lambda: ds["intensity"].values, args.repeat)
    print(f"midasflow cake() dask threaded:             {fps_dask:8.1f} frames/s")

    import pyFAI
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    px_m = params.px_um * 1e-6
    ai = AzimuthalIntegrator(dist=params.lsd_um * 1e-6, poni1=(params.bc_z_px + 0.5) * px_m,
                             poni2=(params.bc_y_px + 0.5) * px_m, pixel1=px_m, pixel2=px_m,
                             wavelength=params.wavelength_a * 1e-10)
    r_range = (params.r_min_px * params.px_um * 1e-3, params.r_max_px * params.px_um * 1e-3)
    kw = dict(npt_rad=binmap.n_r, npt_azim=binmap.n_eta, unit="r_mm", radial_range=r_range,
              azimuth_range=(-180.0, 180.0), correctSolidAngle=False)
    results = {}
    for name in ("integrate2d_ng", "integrate2d"):
        fn = getattr(ai, name, None)
        if fn is None:
            continue
        method = ("full", "csr", "cython")
        t0 = time.perf_counter()
        fn(frames[0], method=method, **kw)
        t_setup = time.perf_counter() - t0
        n = min(args.frames, 8)
        t = _best(lambda: [fn(frames[i], method=method, **kw) for i in range(n)], args.repeat)
        results[name] = n / t
        print(f"pyFAI {pyFAI.version} {name} {method}: {results[name]:8.1f} frames/s "
              f"(first call incl. CSR build {t_setup:.2f} s)")
    best = max(results.values())
    # same bins, same frame: compare the η-averaged profiles (pyFAI's χ origin differs from η)
    ours = cake_block(frames[:1], binmap)[0]
    theirs = ai.integrate2d_ng(frames[0], method=("full", "csr", "cython"), **kw).intensity
    prof_a, prof_b = np.nanmean(ours, axis=1), theirs.mean(axis=0)
    ok = (prof_a > 0) & (prof_b > 0)
    print(f"agreement of η-mean profiles (pyFAI vs midasflow): median |rel diff| "
          f"{np.median(np.abs(prof_b[ok] / prof_a[ok] - 1)):.2e}")
    print(f"ratio midasflow cake_block / best pyFAI: {fps_mf / best:.2f}x; "
          f"dask cake() / best pyFAI: {fps_dask / best:.2f}x")


def bench_memory(args) -> None:
    import dask
    import xarray as xr

    from midasflow.binmap import build_binmap
    from midasflow.cake import cake
    from midasflow.params import Params

    params = Params(nr_pixels_y=256, nr_pixels_z=256, bc_y_px=128.0, bc_z_px=128.0,
                    r_min_px=5.0, r_max_px=125.0, r_bin_px=0.5, eta_bin_deg=5.0,
                    omega_sum_frames=-1, save_individual_frames=False, sum_images=True)
    binmap = build_binmap(params)
    cake_mb = binmap.n_r * binmap.n_eta * 8 / 1e6
    print(f"memory: 256 x 256 frames (full size would take minutes per 500 frames here), "
          f"{binmap.n_r} x {binmap.n_eta} bins ({cake_mb:.2f} MB per cake), 10 frames/chunk")
    import dask.array as da

    for n in (50, 500):
        data = da.random.default_rng(1).gamma(2.0, 50.0, size=(n, 256, 256), chunks=(10, -1, -1))
        frames = xr.DataArray(data.astype(np.float32), dims=("frame", "z", "y"))
        ds = cake(frames, params, binmap=binmap)
        tracemalloc.start()
        with dask.config.set(scheduler="threads", num_workers=2):
            ds["intensity"].values, ds["sum_frames"].values
        peak = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()
        print(f"  {n:4d} frames: tracemalloc peak {peak:7.1f} MB "
              f"(all per-frame cakes would be {n * cake_mb:7.1f} MB; frames {n * 0.262:6.1f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    bench_throughput(args)
    if not args.skip_memory:
        bench_memory(args)


if __name__ == "__main__":
    main()
