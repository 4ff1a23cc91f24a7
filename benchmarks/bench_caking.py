"""Caking throughput and memory: midasflow vs pyFAI on the same frames and bins, same run.

Geometry: 2048 x 2048 frame, 200 µm pixels, Lsd 1 m, beam centre (1024, 1024), no tilt;
RMin 10, RMax 1000, RBinSize 0.5 px (1980 R bins), EtaBinSize 5° (72 η bins).
pyFAI gets the identical bins in (r_mm, χ): 1980 radial bins over [RMin, RMax]·px and 72 azimuthal
bins over [-180, 180]; its CSR engine is built on the first call and timed afterwards.

The machine may be shared: every round times midasflow and pyFAI back to back, and the printed
rates are medians over the rounds (best round in brackets), so the ratio compares like with like.

Usage::

    python benchmarks/bench_caking.py [--frames 64] [--rounds 5] [--threads 2] [--skip-memory]
        [--skip-cold-start]

Paths timed, each printed with its ratio to pyFAI's median from the same rounds: the kernel on
whole passes, the kernel one frame per call (calibrant images, single exposures), ``cake()``
through Dask on pass-sized chunks, and the README's composition ``open_frames -> cake`` on an
HDF5 file of the same frames as uint16 counts with a dark, with open_frames' default chunks
(read raw and dark-subtracted inside the kernel). The composition's two parts are timed apart
too: the kernel on the file's raw uint16 frames with the dark (what it cakes), and reading the
file alone, one read per map pass as the composition reads it (its floor on this input); the
composition is printed as a fraction of each and of what the two allow together on the cores.
The same composition and read on the same frames written bitshuffle-LZ4 compressed (HDF5 filter
32008, as Eiger detectors write them; one frame per chunk), with their bound likewise. Cold start: a fresh process to its first caked frame
with no cached bin map, with an empty and with a filled numba cache, beside a fresh process's
first pyFAI integrate2d_ng of the same frame (import, geometry, its CSR engine built on that
call); wall and CPU (user + system of the process and its threads) times.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
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


# ------------------------------------------------------------------------------ cold start
def _cold_start_child(frame_file: str, map_cache: str) -> None:
    """Run in a fresh interpreter: import, build (and cache) the map, cake the first frame.

    Prints one JSON line of the times (s since this function started) at each step."""
    t0 = time.perf_counter()
    import numpy as np

    from midasflow.binmap import load_or_build_binmap
    from midasflow.caking_kernel import cake_block
    t_import = time.perf_counter() - t0
    frame = np.load(frame_file)
    bm = load_or_build_binmap(_params(), cache_dir=map_cache)
    t_map = time.perf_counter() - t0
    cake_block(frame, bm)
    t_frame = time.perf_counter() - t0
    print(json.dumps({"import_s": t_import, "map_s": t_map, "first_frame_s": t_frame,
                      "nnz": int(bm.weights.nnz), "n_r": bm.n_r, "n_eta": bm.n_eta}), flush=True)


def _pyfai_cold_start_child(frame_file: str) -> None:
    """Run in a fresh interpreter: import pyFAI and integrate the first frame on the same bins
    (its CSR engine is built on that call). Prints one JSON line of the times (s)."""
    t0 = time.perf_counter()
    import numpy as np
    import pyFAI  # noqa: F401
    t_import = time.perf_counter() - t0
    frame = np.load(frame_file)
    params = _params()
    ai, kw = _pyfai(params, len(params.r_edges_px()) - 1, len(params.eta_edges_deg()) - 1)
    ai.integrate2d_ng(frame, **kw)
    print(json.dumps({"import_s": t_import, "first_frame_s": time.perf_counter() - t0}),
          flush=True)


def _child(args: list[str], env: dict[str, str]) -> tuple[dict, float, float]:
    """(the child's last JSON line, wall s, CPU s of the child and its threads)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, *args], env=env, check=True,
                         capture_output=True, text=True).stdout
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return json.loads(out.strip().splitlines()[-1]), wall, cpu


def bench_cold_start(frame: np.ndarray) -> None:
    """Time from starting a Python process to the first caked frame, with no cached bin map:
    once with an empty numba cache (every kernel compiled) and once with numba's cache filled by
    that first run (what every later run sees, ``cache=True`` on every kernel); beside pyFAI's
    first frame in a fresh process, from the same run."""
    with tempfile.TemporaryDirectory() as tmp:
        frame_file = os.path.join(tmp, "frame.npy")
        np.save(frame_file, frame)
        env = dict(os.environ, NUMBA_CACHE_DIR=os.path.join(tmp, "numba"))
        print(f"cold start (load average {os.getloadavg()[0]:.1f}; aim <= 10 s with an empty cache):")
        for label in ("empty numba cache", "numba cache filled"):
            r, wall, cpu = _child(["--cold-start-child", frame_file, tempfile.mkdtemp(dir=tmp)],
                                  env)
            print(f"  midasflow, {label:18s}: first frame {wall:6.2f} s after process start, "
                  f"{cpu:5.2f} s CPU (imports {r['import_s']:.2f} s, map {r['n_r']} x "
                  f"{r['n_eta']} bins, {r['nnz']:,} entries built and cached by {r['map_s']:.2f} s, "
                  f"first frame caked at {r['first_frame_s']:.2f} s)")
        r, wall, cpu = _child(["--pyfai-cold-start-child", frame_file], dict(os.environ))
        print(f"  pyFAI integrate2d_ng (csr)   : first frame {wall:6.2f} s after process start, "
              f"{cpu:5.2f} s CPU (imports {r['import_s']:.2f} s, first frame integrated at "
              f"{r['first_frame_s']:.2f} s)")


# ------------------------------------------------------------------------------ throughput
def _pyfai(params, n_r: int, n_eta: int):
    """pyFAI's integrator and integrate2d keywords for the same bins (r_mm, chi)."""
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    px_m = params.px_um * 1e-6
    ai = AzimuthalIntegrator(dist=params.lsd_um * 1e-6, poni1=(params.bc_z_px + 0.5) * px_m,
                             poni2=(params.bc_y_px + 0.5) * px_m, pixel1=px_m, pixel2=px_m,
                             wavelength=params.wavelength_a * 1e-10)
    r_range = (params.r_min_px * params.px_um * 1e-3, params.r_max_px * params.px_um * 1e-3)
    kw = {"npt_rad": n_r, "npt_azim": n_eta, "unit": "r_mm", "radial_range": r_range,
          "azimuth_range": (-180.0, 180.0), "correctSolidAngle": False,
          "method": ("full", "csr", "cython")}
    return ai, kw


def bench_throughput(args, frames: np.ndarray) -> None:
    import dask
    import numba
    import pyFAI
    import xarray as xr

    from midasflow.binmap import load_or_build_binmap
    from midasflow.caking import cake
    from midasflow.caking_kernel import RawCorrection, cake_block, frames_per_pass, raw_buffer
    from midasflow.io.frames import open_frames, raw_frames_of
    from midasflow.params import read_params
    from midasflow.simulate import write_scan

    numba.set_num_threads(args.threads)
    tmpdir = tempfile.TemporaryDirectory()  # removed when the function returns
    tmp = tmpdir.name
    binmap = load_or_build_binmap(_params(), cache_dir=tmp)
    step = frames_per_pass(binmap)
    params = _params(omega_sum_frames=step)
    n = frames.shape[0]
    # raw uint16 counts with a 4-frame dark in the file (exchange/dark), as a beamline writes
    dark = np.random.default_rng(1).integers(0, 8, size=(4,) + frames.shape[1:]).astype(np.uint16)
    raw = np.round(frames).astype(np.uint16)
    scan = write_scan(os.path.join(tmp, "scan"), params, raw, dark)
    file_params = read_params(scan.params_file)
    scan_bs = write_scan(os.path.join(tmp, "scan_bs"), params, raw, dark, compression="bitshuffle")
    file_params_bs = read_params(scan_bs.params_file)
    print(f"frames: {frames.shape} float32; numba threads {numba.get_num_threads()}; "
          f"{step} frames per map pass; {os.cpu_count()} CPUs; load average "
          f"{os.getloadavg()[0]:.1f} at start")
    ai, kw = _pyfai(params, binmap.n_r, binmap.n_eta)

    def dask_run(make_frames, threads: int | None = None):
        def run():
            with dask.config.set(scheduler="threads", num_workers=threads):
                cake(make_frames(), params, binmap=binmap)["intensity"].compute()
        return run

    def one_by_one():
        for i in range(n):
            cake_block(frames[i], binmap)

    # what open_frames -> cake does per map pass, apart: the file's raw frames read as the
    # composition reads them (its floor on this input), and the kernel on them (dark subtracted
    # and flags turned into NaN inside the kernel, as the composition cakes them)
    reader = raw_frames_of(open_frames(scan.data, file_params).data).reader
    reader_bs = raw_frames_of(open_frames(scan_bs.data, file_params_bs).data).reader
    correction = RawCorrection(dark.astype(np.float64).mean(axis=0).astype(np.float32))

    def read_only(scan_reader):
        def run():
            for lo in range(0, n, step):
                scan_reader.read_raw(lo, min(lo + step, n), raw_buffer)
        return run

    def raw_kernel():
        for lo in range(0, n, step):
            cake_block(raw[lo:lo + step], binmap, correction=correction)

    n_fai = min(n, 8)
    # wrapped once: dask hashes a numpy array's bytes when it is wrapped, which is not caking
    chunked = xr.DataArray(frames, dims=("frame", "z", "y")).chunk({"frame": step})
    runs = {
        "kernel: cake_block, whole passes": (lambda: cake_block(frames, binmap), n),
        "kernel: cake_block, one frame per call": (one_by_one, n),
        "kernel: raw uint16 + dark (as open_frames -> cake), passes": (raw_kernel, n),
        "read only: the HDF5 file's raw frames, one read per pass": (read_only(reader), n),
        f"cake() on {step}-frame chunks (threaded scheduler)": (dask_run(lambda: chunked), n),
        "open_frames -> cake (HDF5 uint16 + dark, default chunks)":
            (dask_run(lambda: open_frames(scan.data, file_params)), n),
        "read only: the bitshuffle-LZ4 file's frames, one read per pass": (read_only(reader_bs), n),
        "open_frames -> cake (bitshuffle-LZ4 HDF5 + dark)":
            (dask_run(lambda: open_frames(scan_bs.data, file_params_bs)), n),
        f"pyFAI {pyFAI.version} integrate2d_ng {kw['method']}":
            (lambda: [ai.integrate2d_ng(frames[i], **kw) for i in range(n_fai)], n_fai),
    }
    chunks = open_frames(scan.data, file_params).chunks[0]
    for fn, _ in runs.values():  # warm up (numba compile, kernel layouts, thread buffers, CSR)
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu_ms: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for i in range(args.rounds):  # rotate the order: no run always follows the same neighbour
        for name in names[i % len(names):] + names[:i % len(names)]:
            fn, count = runs[name]
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(count / (time.perf_counter() - t0))
            cpu_ms[name].append((time.process_time() - c0) / count * 1e3)
    fps = {name: float(np.median(v)) for name, v in times.items()}
    fai = fps[names[-1]]
    print(f"frames/s, median [best] of {args.rounds} rounds; ratio = median / pyFAI's median "
          f"from the same rounds; CPU ms per frame (all threads of this process; what other "
          f"processes take does not count) (open_frames' chunks: {chunks[0]} frames)")
    for name in names:
        print(f"  {name:58s} {fps[name]:7.1f} [{max(times[name]):7.1f}]  "
              f"{fps[name] / fai:5.2f}x pyFAI  {np.median(cpu_ms[name]):6.1f} ms CPU")
    raw_fps = fps[names[2]]
    for label, composed, read in (
            ("open_frames -> cake", "open_frames -> cake (HDF5 uint16 + dark, default chunks)", names[3]),
            ("bitshuffle-LZ4 open_frames -> cake", "open_frames -> cake (bitshuffle-LZ4 HDF5 + dark)",
             "read only: the bitshuffle-LZ4 file's frames, one read per pass")):
        composition, read_fps = fps[composed], fps[read]
        # the reads and the kernel overlap; the bound takes each read's CPU from the kernel's cores
        read_cpu_s = float(np.median(cpu_ms[read])) / 1e3
        bound = 1.0 / (1.0 / raw_fps + read_cpu_s / args.threads)
        print(f"{label}: {composition / fps[names[0]]:.2f} of the float32 kernel, "
              f"{composition / raw_fps:.2f} of the kernel on the file's raw frames, "
              f"{composition / bound:.2f} of what that kernel and the reads allow together on "
              f"{args.threads} cores ({bound:.1f} frames/s = 1 / (1/kernel + read CPU s/{args.threads}))")
    print(f"load average {os.getloadavg()[0]:.1f} at the end (2 cores shared: wall rates are "
          "noisy, the ratios less so)")

    # same bins, same frame: compare the η-averaged profiles (pyFAI's χ origin differs from η)
    ours = cake_block(frames[:1], binmap)[0]
    theirs = ai.integrate2d_ng(frames[0], **kw).intensity
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
    ap.add_argument("--skip-cold-start", action="store_true")
    ap.add_argument("--cold-start-child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--pyfai-cold-start-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cold_start_child:
        _cold_start_child(*args.cold_start_child)
        return
    if args.pyfai_cold_start_child:
        _pyfai_cold_start_child(args.pyfai_cold_start_child)
        return
    frames = _frames(_params(), args.frames)
    if not args.skip_cold_start:
        bench_cold_start(frames[0])
    bench_throughput(args, frames)
    if not args.skip_memory:
        bench_memory(args)


if __name__ == "__main__":
    main()
