"""Bin-map build and cache-load times for a 2048×2048 detector.

RMin 10, RMax 1000, RBinSize 0.5 px, EtaBinSize 5°, Lsd 1 m, px 200 µm, small tilts and a
distortion term, no mask. Prints the numba compile time (first build, on a tiny detector, with
an empty numba cache directory so the kernels really compile), the cold build of the 2048² map
with compiled kernels, their sum, the part of the build that computes every bin's effective 2θ
(docs/caking_2theta.md; wall and process CPU time), and the load time of the cached map.

Run: python benchmarks/bench_binmap.py            (``--warm`` keeps numba's on-disk cache)
"""

from __future__ import annotations

import os
import sys
import tempfile
import time


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if "--warm" not in sys.argv:
            os.environ["NUMBA_CACHE_DIR"] = os.path.join(tmp, "numba")  # before numba loads
        from midasflow.binmap import build_binmap, load_or_build_binmap
        from midasflow.params import Params

        params = Params(
            nr_pixels_y=2048, nr_pixels_z=2048, px_um=200.0, lsd_um=1.0e6,
            bc_y_px=1022.3, bc_z_px=1030.7, tx_deg=0.2, ty_deg=-0.3, tz_deg=0.1,
            p=(1e-4,) + (0.0,) * 14, r_min_px=10.0, r_max_px=1000.0, r_bin_px=0.5,
            eta_bin_deg=5.0,
        )
        tiny = params.with_overrides(nr_pixels_y=16, nr_pixels_z=16, bc_y_px=8.0, bc_z_px=8.0)
        t0 = time.perf_counter()
        build_binmap(tiny)
        t_compile = time.perf_counter() - t0

        t0, c0 = time.perf_counter(), time.process_time()
        bm = build_binmap(params)
        t_build, c_build = time.perf_counter() - t0, time.process_time() - c0
        print(f"numba compile (tiny detector build): {t_compile:7.2f} s")
        print(f"cold build 2048x2048, compiled:      {t_build:7.2f} s  ({bm.weights.nnz} entries, "
              f"{bm.n_r}x{bm.n_eta} bins)")
        print(f"cold build including compile:        {t_compile + t_build:7.2f} s")
        from midasflow.binmap import _corner_grid, _effective_tth_deg, pixel_mean_tth_deg

        corners = _corner_grid(params)[:2]  # the build has them already
        t0, c0 = time.perf_counter(), time.process_time()
        _effective_tth_deg(bm.areas, bm.bin_area.ravel(), pixel_mean_tth_deg(params, corners))
        t_eff, c_eff = time.perf_counter() - t0, time.process_time() - c0
        print(f"  of which each bin's effective 2θ:  {t_eff:7.2f} s  ({100 * t_eff / t_build:.0f} % of "
              f"the build; CPU {c_eff:.2f} of {c_build:.2f} s, {100 * c_eff / c_build:.0f} %; "
              f"load average {os.getloadavg()[0]:.1f})")

        cache = os.path.join(tmp, "binmaps")
        load_or_build_binmap(params, cache_dir=cache)
        t0 = time.perf_counter()
        load_or_build_binmap(params, cache_dir=cache)
        print(f"cached load:                         {time.perf_counter() - t0:7.2f} s")


if __name__ == "__main__":
    main()
