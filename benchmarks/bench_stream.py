"""Stream backend: sustained frames per second for 2048² frames fed at increasing rates over
PVAccess (a p4p server in another process, on 127.0.0.1), and the delay from the last frame to
the last refined lineout.

For each rate the server publishes ``--frames`` frames (bitshuffle-LZ4 compressed uint16, as an
Eiger's PVA plugin would send them) once the stream has subscribed; the stream cakes and refines
them on a local cluster (``--workers`` single-threaded workers). Printed per rate: frames received
and dropped (uniqueId gaps), the rate the stream took them at, and the delay from the last frame
to the last result. Beside it, from the same run: batch mode's caking rate of the same frames on
the same cluster (``integrate`` of the same frames from an HDF5 file), the stream's ratio to it, and the load
average (the machine is shared: timings under load are noisy). Less noisy under load: the CPU
time per frame received (this process, which is the stream's client and the local cluster's
scheduler, plus the workers; the PV server's excluded), beside batch mode's, and the rate that
CPU time allows on ``--workers`` free cores (``cpu_bound_fps``), and how many of the refined
lineouts were warm-started (``--precision``, ``--warm-start``; :mod:`midasflow.refinement.warm`).

The PV's monitor queues up to 64 frames on the server side and 64 on the client side, so a
stream slower than the feed drops frames only once 128 are waiting: ``--frames`` (default 320)
is well above that, so "sustained" means sustained, and the dropped count shows a rate the stream
cannot keep up with.

    python benchmarks/bench_stream.py --rates 5 10 20 30 --frames 320
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import numpy as np


#: With frames dropped, ``--frames`` is never reached: the stream ends this long after the last
#: frame (its short last group is then refined), and the delay printed includes it.
IDLE_TIMEOUT_S = 3.0


def _serve(frame_file: str, pv: str, rate_hz: float, n_frames: int, ready, address) -> None:
    """Server process: publish ``n_frames`` copies of the frame at ``rate_hz`` from the first
    client connection on (uniqueId 1, 2, …), bitshuffle-LZ4 compressed."""
    import bitshuffle
    from p4p import Value
    from p4p.nt import NTNDArray
    from p4p.server import Server
    from p4p.server.thread import SharedPV

    frame = np.load(frame_file)
    data = np.frombuffer(bitshuffle.compress_lz4(frame, 0).tobytes(), np.uint8)
    nt = NTNDArray()
    # each update is built as NTNDArray.wrap builds one, but from the compressed bytes: wrap
    # would first copy the uncompressed frame in (twice), which cost this process more than
    # publishing, on the cores the stream runs on (a detector is another machine)
    dimension = [{"size": n, "offset": 0, "fullSize": n, "binning": 1, "reverse": False} for n in frame.shape[::-1]]
    connected = mp.Event()

    class Handler:
        def onFirstConnect(self, pv):  # noqa: N802, ANN001, ARG002
            connected.set()

    shared = SharedPV(initial=nt.wrap(np.zeros((2, 2), np.uint16)), handler=Handler())
    server = Server(providers=[{pv: shared}], isolate=True)
    address.value = f"127.0.0.1:{server.conf()['EPICS_PVA_BROADCAST_PORT']}".encode()
    ready.set()
    connected.wait(600)
    time.sleep(1.0)
    t0 = time.perf_counter()
    for uid in range(1, n_frames + 1):
        now = time.time()
        value = Value(nt.type, {"value": ("ubyteValue", data), "uniqueId": uid, "dimension": dimension,
                                "timeStamp": {"secondsPastEpoch": int(now), "nanoseconds": int(now % 1 * 1e9)}})
        value["codec.name"] = "bslz4"
        value["codec.parameters"] = 6
        value["compressedSize"] = data.size
        value["uncompressedSize"] = frame.nbytes
        shared.post(value)
        delay = t0 + uid / rate_hz - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    time.sleep(600)  # the stream stops itself; the parent terminates this process


def _cpu_s(client) -> float:  # noqa: ANN001
    """CPU seconds used so far by this process and the cluster's workers."""
    return time.process_time() + sum(client.run(time.process_time).values())


def _thread_cpu() -> dict[str, float]:
    """CPU seconds used so far by this process's threads, by kind: Python threads by their
    name (numbers dropped, so a pool's threads add up), threads Python does not know (p4p's,
    the codecs' and numba's own) as ``other``."""
    import re
    import threading

    tick = os.sysconf("SC_CLK_TCK")
    by_kind: dict[str, float] = {}
    known = 0.0
    for thread in threading.enumerate():
        try:
            fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, TypeError):
            continue
        cpu = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        kind = re.sub(r"-?\d+-?", "", thread.name) or thread.name
        by_kind[kind] = by_kind.get(kind, 0.0) + cpu
        known += cpu
    by_kind["other"] = max(time.process_time() - known, 0.0)
    return by_kind


def _cpu_split(client) -> dict[str, float]:  # noqa: ANN001
    """CPU seconds so far by process (``client``: this process, with the scheduler; ``worker``:
    the workers added up) and thread kind."""
    split = {f"client {k}": v for k, v in _thread_cpu().items()}
    for per_worker in client.run(_thread_cpu).values():
        for k, v in per_worker.items():
            split[f"worker {k}"] = split.get(f"worker {k}", 0.0) + v
    return split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[5, 10, 20, 30])
    ap.add_argument("--frames", type=int, default=320)
    ap.add_argument("--omega-sum-frames", type=int, default=40)
    ap.add_argument("--eta-bin", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-refine", action="store_true", help="cake only")
    ap.add_argument("--precision", choices=("float32", "float64"), default=None,
                    help="profile arithmetic of the refinement (default: run_stream's)")
    ap.add_argument("--warm-start", action=argparse.BooleanOptionalAction, default=None,
                    help="warm starts of the seeded lineouts (default: run_stream's, on in float64)")
    args = ap.parse_args()

    from distributed import Client, LocalCluster

    from midasflow.crystal import cubic_phase, write_phase_cif
    from midasflow.simulate import CEO2_A_A, ceo2_params, simulate_frames
    from midasflow.stream.run import run_stream, stream_worker_config

    work = Path(tempfile.mkdtemp(prefix="bench_stream_"))
    params = ceo2_params((2048, 2048), eta_bin_deg=args.eta_bin, omega_sum_frames=args.omega_sum_frames,
                         save_individual_frames=False)
    param_file = work / "ps.txt"
    param_file.write_text(params.to_text())
    t = time.perf_counter()
    frame, _ = simulate_frames(params, cubic_phase("CeO2", CEO2_A_A), n_frames=1, background=50, counts=2000,
                               poisson=True, supersample=1, dtype=np.uint16)
    np.save(work / "frame.npy", frame[0])
    cif = write_phase_cif(cubic_phase("CeO2", CEO2_A_A), work / "CeO2.cif")
    print(f"# 2048² CeO2 frame simulated in {time.perf_counter() - t:.0f} s; {params.n_r} R × {params.n_eta} η bins, "
          f"OmegaSumFrames {args.omega_sum_frames}, {args.workers} workers; precision {args.precision or 'default'}, "
          f"warm starts {'default' if args.warm_start is None else args.warm_start}; work folder {work}")

    with stream_worker_config():  # as run --backend stream makes its cluster
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
    # the peer from the same run: batch mode (integrate) of the same frames from an HDF5 file
    # (bitshuffle-LZ4, as an Eiger writes) on the same cluster, the .zarr.zip written as the stream writes it
    from midasflow.pipeline import integrate
    from midasflow.simulate import write_scan

    n_batch = min(args.frames, 64)
    scan = write_scan(work / "batch", params, np.broadcast_to(frame[0], (n_batch, 2048, 2048)),
                      compression="bitshuffle")
    integrate(scan.params_file, scan.data, result_folder=work / "batch_warm", client=client)  # map, numba
    t, cpu = time.perf_counter(), _cpu_s(client)
    integrate(scan.params_file, scan.data, result_folder=work / "batch", client=client)
    batch_fps = n_batch / (time.perf_counter() - t)
    batch_cpu_ms = 1e3 * (_cpu_s(client) - cpu) / n_batch
    print(f"# batch mode (integrate) of {n_batch} frames from HDF5 on the same cluster: {batch_fps:.1f} frames/s, "
          f"{batch_cpu_ms:.0f} ms CPU per frame")
    print("rate_hz  received  dropped  stream_fps  ratio_to_batch  last_result_after_last_frame_s  "
          "cpu_ms_per_frame  cpu_ratio_to_batch  cpu_bound_fps  load_avg")
    ctx = mp.get_context("spawn")
    for rate in args.rates:
        ready, address = ctx.Event(), ctx.Array("c", 64)
        server = ctx.Process(target=_serve, args=(str(work / "frame.npy"), "bench:Pva1:Image", rate, args.frames,
                                                  ready, address), daemon=True)
        server.start()
        ready.wait(60)
        out = work / f"rate_{rate:g}"
        cpu, split = _cpu_s(client), _cpu_split(client)
        try:
            run_stream(param_file, [] if args.no_refine else [cif], pva=True, pva_ip=address.value.decode(),
                       pva_channel="bench:Pva1:Image", out=out, result_folder=out, client=client,
                       stop_after=args.frames, idle_timeout_s=IDLE_TIMEOUT_S, live=False, export=False, report=False,
                       refine_atoms=False, skip_refinement=args.no_refine, no_zarr=True, refresh_every=10**6,
                       warm_start=args.warm_start, **({"precision": args.precision} if args.precision else {}))
        finally:
            server.terminate()
            server.join(10)
        summary = json.loads((out / "stream_summary.json").read_text())
        src = summary["source"]
        fps = summary["frames_per_s"] or float("nan")
        delay = summary["last_result_after_last_frame_s"]
        cpu_ms = 1e3 * (_cpu_s(client) - cpu) / max(src["received_frames"], 1)
        split = {k: 1e3 * (v - split.get(k, 0.0)) / max(src["received_frames"], 1)
                 for k, v in _cpu_split(client).items()}
        recipes = ""
        if (out / "results.zarr").is_dir():
            from midasflow.results import open_results

            refined = [r for r in open_results(out / "results.zarr").recipe.values.ravel() if r]
            recipes = f"  warm {refined.count('warm')}/{len(refined)}"
        print(f"{rate:7g}  {src['received_frames']:8d}  {src['dropped_frames']:7d}  {fps:10.1f}  "
              f"{fps / batch_fps:14.2f}  {delay if delay is not None else float('nan'):30.2f}  "
              f"{cpu_ms:16.0f}  {batch_cpu_ms / cpu_ms:18.2f}  {1e3 * args.workers / cpu_ms:13.1f}  "
              f"{os.getloadavg()[0]:8.1f}{recipes}", flush=True)
        print("#   CPU ms per frame by process and thread: " + ", ".join(
            f"{k} {v:.1f}" for k, v in sorted(split.items(), key=lambda kv: -kv[1]) if v >= 0.5), flush=True)
    client.close()
    cluster.close()


if __name__ == "__main__":
    main()
