"""What following detector-flagged pixels costs: ``open_frames -> cake`` of a 2048² scan whose
module gaps are flagged −1 (Pilatus-like: 7-px rows every 195 px, 17-px columns every 487 px),
with a 4-frame dark, against the same scan without flags (docs/caking_2theta.md §6).

Each measurement runs in a fresh process (nothing cached in memory), the bin map already in
the cache: the lazy caked Dataset (``pipeline.integrate_dataset``: the map loaded, the first
frame and the dark read, the flagged bins' effective 2θ), then its computation. Prints wall and
process CPU seconds and the load average.

Run: python benchmarks/bench_flags.py [--runs N]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

SHAPE = (2048, 2048)


def _scan(folder: str, flagged: bool) -> str:
    import numpy as np

    from midasflow.simulate import ceo2_params, write_scan

    params = ceo2_params(SHAPE, r_bin_px=0.5, eta_bin_deg=5.0)
    rng = np.random.default_rng(1)
    frames = rng.integers(50, 500, size=(2, *SHAPE)).astype(np.int32)
    dark = rng.integers(0, 5, size=(4, *SHAPE)).astype(np.int32)
    if flagged:
        gaps = np.zeros(SHAPE, bool)
        for z in range(195, SHAPE[0], 212):
            gaps[z:z + 7] = True
        for y in range(487, SHAPE[1], 504):
            gaps[:, y:y + 17] = True
        frames[:, gaps] = -1
    return str(write_scan(folder, params, frames, dark).params_file)


def _measure(params_file: str, cache: str) -> dict:
    from midasflow.params import read_params
    from midasflow.pipeline import integrate_dataset

    params = read_params(params_file)
    data = params_file.replace("_ps.txt", ".h5")
    t0, c0 = time.perf_counter(), time.process_time()
    ds = integrate_dataset(data, params, cache_dir=cache)
    t1, c1 = time.perf_counter(), time.process_time()
    ds.intensity.compute()
    t2, c2 = time.perf_counter(), time.process_time()
    return {"lazy_wall_s": t1 - t0, "lazy_cpu_s": c1 - c0, "compute_wall_s": t2 - t1,
            "compute_cpu_s": c2 - c1, "load": os.getloadavg()[0]}


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(_measure(sys.argv[2], sys.argv[3])))
        return
    runs = int(sys.argv[sys.argv.index("--runs") + 1]) if "--runs" in sys.argv else 3
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "binmaps")
        files = {kind: _scan(os.path.join(tmp, kind), kind == "flags") for kind in ("flags", "plain")}
        from midasflow.binmap import load_or_build_binmap
        from midasflow.params import read_params

        load_or_build_binmap(read_params(files["plain"]), cache_dir=cache)
        for k in range(runs):
            for kind, params_file in files.items():
                out = subprocess.run([sys.executable, __file__, "--child", params_file, cache],
                                     capture_output=True, text=True, check=True).stdout
                m = json.loads(out.splitlines()[-1])
                print(f"run {k} {kind:5s}: cake() {m['lazy_wall_s']:5.2f} s wall {m['lazy_cpu_s']:5.2f} s CPU; "
                      f"compute {m['compute_wall_s']:5.2f} s wall {m['compute_cpu_s']:5.2f} s CPU; "
                      f"load {m['load']:.1f}", flush=True)


if __name__ == "__main__":
    main()
