"""The stream backend (midasflow.stream): codecs, sources with real parts on loopback (a p4p
PVAccess server, a writer thread), the dataflow against batch mode, the command, interruption and
resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from stream_helpers import NtndArrayServer, drop_files

pytest.importorskip("p4p")
pytest.importorskip("watchfiles")


# ---------------------------------------------------------------------------------------------
# codecs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["lz4", "bslz4", "blosc"])
@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_areadetector_codecs_decode_to_the_frame(codec, dtype):
    import bitshuffle
    import lz4.block
    from numcodecs import Blosc

    from midasflow.stream.codecs import decode_frame

    rng = np.random.default_rng(3)
    frame = rng.integers(-5 if dtype == np.int32 else 0, 3000, size=(37, 53)).astype(dtype)
    raw = frame.tobytes()
    data = {"lz4": lambda: lz4.block.compress(raw, store_size=False),
            "bslz4": lambda: bitshuffle.compress_lz4(frame, 0).tobytes(),
            "blosc": lambda: Blosc(cname="zstd", shuffle=Blosc.SHUFFLE, typesize=frame.itemsize).encode(frame)}[codec]()
    code = {np.uint16: 6, np.int32: 3}[dtype]
    out = decode_frame(np.frombuffer(data, np.uint8), frame.shape, codec=codec, parameters=code,
                       uncompressed_size=frame.nbytes)
    assert out.dtype == frame.dtype and np.array_equal(out, frame)


def test_bad_or_lossy_codec_frames_are_one_line_errors():
    from midasflow.errors import FrameError
    from midasflow.stream.codecs import decode_frame

    u8 = np.zeros(16, np.uint8)
    with pytest.raises(FrameError, match="codec 'jpeg' refused.*lossy"):
        decode_frame(u8, (4, 4), codec="jpeg", parameters=5)
    with pytest.raises(FrameError, match="codec.parameters 42"):
        decode_frame(u8, (4, 4), codec="lz4", parameters=42)
    with pytest.raises(FrameError, match="uncompressedSize 10 bytes"):
        decode_frame(u8, (4, 4), codec="lz4", parameters=6, uncompressed_size=10)
    with pytest.raises(FrameError, match="lz4 frame cannot be decoded"):
        decode_frame(np.full(16, 255, np.uint8), (4, 4), codec="lz4", parameters=6)
    with pytest.raises(FrameError, match="20 pixels"):
        decode_frame(np.zeros(20, np.uint16), (4, 4))
    # bitshuffle's decoder takes no input length: a truncated frame must not reach it (it would
    # read past the end and crash the process)
    import bitshuffle

    frame = np.random.default_rng(1).poisson(50, (65, 67)).astype(np.uint16)  # 2 blocks and 3 raw pixels
    data = np.frombuffer(bitshuffle.compress_lz4(frame, 0).tobytes(), np.uint8)
    assert np.array_equal(decode_frame(data, frame.shape, codec="bslz4", parameters=6), frame)
    for cut in (data[:-1], data[: len(data) // 2], data[:3]):
        with pytest.raises(FrameError, match=r"ends inside block \d of 2 \(4355 pixels\): truncated"):
            decode_frame(cut, frame.shape, codec="bslz4", parameters=6)
    with pytest.raises(FrameError, match="3 bytes after its 2 blocks"):
        decode_frame(np.concatenate([data, data[:3]]), frame.shape, codec="bslz4", parameters=6)


# ---------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------
def _params(shape=(24, 20)):
    from midasflow.params import Params

    return Params(nr_pixels_z=shape[0], nr_pixels_y=shape[1])


def _collect(source, stop, until, timeout_s=30.0):
    got, t0 = [], time.monotonic()
    for arrival in source.arrivals(stop, tick_s=0.05):
        if arrival is not None:
            got.append(arrival)
        if until(got) or time.monotonic() - t0 > timeout_s:
            stop.set()
    return got


@pytest.mark.slow
def test_folder_source_takes_complete_files_once_in_name_order(tmp_path):
    import tifffile

    from midasflow.stream.sources import FolderSource

    params = _params()
    frames = (np.arange(12)[:, None, None] * 10 + np.zeros((12, 24, 20))).astype(np.uint16)
    tifffile.imwrite(tmp_path / "frame_0.tif", frames[0])  # present before the stream starts
    (tmp_path / ".hidden.tif").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / "frame_99.tif.part").write_bytes(b"partial")
    writer = drop_files(tmp_path, frames[1:], interval_s=0.03, half_written=3, stem="frame_")
    source = FolderSource(tmp_path, params, settle_s=0.3, give_up_s=20)
    got = _collect(source, threading.Event(), lambda g: len(g) == 12)
    writer.join(10)
    names = [a.name for a in got]
    assert names == ["frame_0.tif"] + [f"frame_{i}.tif" for i in range(1, 12)]  # 2 before 10: name order
    # every file was read whole: its frame value is what the writer wrote
    from midasflow.stream.sources import frames_of_file

    for a in got:
        assert a.n_frames == 1
        value = frames_of_file(a.path, params, "exchange/data", 0, 1)[0, 0, 0]
        assert value == frames[int(a.name.split("_")[1].split(".")[0])][0, 0]


@pytest.mark.slow
def test_folder_source_reads_every_frame_format_whole_in_name_order(tmp_path):
    """Every format open_frames reads (HDF5/NeXus with filters, GE, TIFF pages and stacks, CBF,
    EDF, zarr v2/v3 directories and zip), numbered so that name order is not text order; a zarr
    directory written chunk by chunk while the folder is watched (its declared shape readable
    from the start, so only its settling shows it is complete) is taken once, whole."""
    import zarr
    from test_frames import FORMATS, NY, NZ, _expected, _frames, _write_zarr_group

    from midasflow.params import Params
    from midasflow.stream.sources import FolderSource, frames_of_file

    params = Params(nr_pixels_z=NZ, nr_pixels_y=NY)
    written = {}
    for k, (name, writer, dtype, n, extra) in enumerate(f for f in FORMATS if not f[4]):
        raw = _frames(n, dtype, seed=k)
        written[f"{(k * 7) % 19}_{name}"] = raw  # 2_… before 10_…
        writer(tmp_path / f"{(k * 7) % 19}_{name}", raw)
    late = _frames(5, np.int32, seed=99)

    def write_slowly() -> None:
        time.sleep(0.5)
        group = zarr.open_group(str(tmp_path / "99_late.zarr"), mode="w", zarr_format=2)
        array = group.create_array("exchange/data", shape=late.shape, dtype=late.dtype, chunks=(1, NZ, NY))
        for i in range(len(late)):  # a chunk every 0.2 s, under the 0.6 s settle time
            array[i] = late[i]
            time.sleep(0.2)

    writer = threading.Thread(target=write_slowly, daemon=True)
    writer.start()
    written["99_late.zarr"] = late
    source = FolderSource(tmp_path, params, settle_s=0.6, give_up_s=20)
    got = _collect(source, threading.Event(), lambda g: len(g) == len(written))
    writer.join(10)
    from midasflow.stream.sources import natural_key

    names = [a.name for a in got]
    assert names[:-1] == sorted(names[:-1], key=natural_key) and names[-1] == "99_late.zarr"
    assert sorted(names) == sorted(written) and names[:-1] != sorted(names[:-1])  # not text order
    for a in got:
        raw = written[a.name]
        assert a.n_frames == len(raw), a.name
        np.testing.assert_array_equal(frames_of_file(a.path, params, "exchange/data", 0, len(raw)),
                                      _expected(raw), err_msg=a.name)


def test_folder_source_skips_files_already_taken(tmp_path):
    import tifffile

    from midasflow.stream.sources import FolderSource

    for i in range(3):
        tifffile.imwrite(tmp_path / f"f{i}.tif", np.zeros((24, 20), np.uint16))
    source = FolderSource(tmp_path, _params(), settle_s=0.1, skip=["f0.tif", "f1.tif"])
    got = _collect(source, threading.Event(), lambda g: len(g) >= 1, timeout_s=3)
    assert [a.name for a in got] == ["f2.tif"]


def test_idle_timeout_counts_from_when_the_source_is_ready():
    """A source that takes longer than the idle timeout to get ready (imports, the PV's channel
    search) still gets its first frame taken; then the stream ends after the idle time."""
    from types import SimpleNamespace

    from midasflow.stream.dataflow import StreamLimits
    from midasflow.stream.run import _consume
    from midasflow.stream.sources import Arrival

    class Source:
        def arrivals(self, stop):  # noqa: ANN001, ARG002
            time.sleep(0.6)  # subscribing
            yield None
            yield Arrival(name="1", n_frames=1)
            while True:
                time.sleep(0.05)
                yield None

    class Flow:
        limits = StreamLimits(idle_timeout_s=0.4)
        state = SimpleNamespace(groups=[])
        n_frames = 0

        def collect(self, block=False):  # noqa: ANN001, ARG002
            return False

        def flush_due(self, interrupted):  # noqa: ANN001, ARG002
            pass

        def feed(self, arrival, interrupted):  # noqa: ANN001, ARG002
            self.n_frames += 1

        def wants_more(self):
            return True

    flow = Flow()
    t0 = time.monotonic()
    assert _consume(Source(), flow, threading.Event(), 0.4, False) is True
    assert flow.n_frames == 1
    assert time.monotonic() - t0 >= 0.6 + 0.4


@pytest.mark.slow
def test_pva_source_decodes_counts_drops_and_ignores_the_stale_value():
    from midasflow.stream.pva import PvaSource

    server = NtndArrayServer(shape=(24, 20))
    try:
        frames = [(np.full((24, 20), 100 + i)).astype(np.uint16) for i in range(8)]
        server.publish(frames, rate_hz=40, codecs=("", "lz4", "bslz4", "blosc"), skip_ids=(4, 5),
                       start_delay_s=0.8)
        source = PvaSource(server.pv_name, _params(), conf=server.conf)
        got = _collect(source, threading.Event(), lambda g: len(g) == 8, timeout_s=20)
        assert source.disconnects == 0  # p4p's Disconnected before the first connection is none
        threading.Timer(0.5, server.stop).start()
        _collect(source, threading.Event(), lambda g: source.disconnects > 0, timeout_s=10)
    finally:
        server.stop()
    assert [a.unique_id for a in got] == [1, 2, 3, 6, 7, 8, 9, 10]  # the initial zeros frame not taken
    assert [int(a.payload.decode()[0, 0]) for a in got] == [100 + i for i in range(8)]
    assert {a.payload.codec for a in got} == {"", "lz4", "bslz4", "blosc"}
    summary = source.summary()
    assert summary["dropped_frames"] == 2 and summary["gaps"] == [[3, 6]]
    assert summary["received_frames"] == 8 and summary["disconnects"] == 1


# ---------------------------------------------------------------------------------------------
# the dataflow against batch mode
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_scan(tmp_path_factory):
    """6 simulated CeO2 frames (128², uint16) with a dark: as one HDF5 (batch mode) and as one
    TIFF per frame (a folder for the stream)."""
    import h5py
    import tifffile

    from midasflow.simulate import simulate_ceo2_scan

    root = tmp_path_factory.mktemp("stream_scan")
    files, truth = simulate_ceo2_scan(root / "batch", n_frames=6, shape=(128, 128),
                                      params_overrides=dict(omega_sum_frames=2, omega_step_deg=0.5))
    with h5py.File(files.data) as f:
        frames, dark = f["exchange/data"][...], f["exchange/dark"][...]
    tifffile.imwrite(root / "dark.tif", dark)
    return {"root": root, "files": files, "frames": frames, "dark": root / "dark.tif"}


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None)
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


@pytest.mark.slow
def test_stream_cakes_are_bit_identical_to_batch_mode(small_scan, client, tmp_path):
    from midasflow.io.caked_store import open_caked
    from midasflow.pipeline import integrate
    from midasflow.stream.run import run_stream

    batch = integrate(small_scan["files"].params_file, small_scan["files"].data,
                      result_folder=tmp_path / "batch", client=client)
    folder = tmp_path / "watch"
    folder.mkdir()
    writer = drop_files(folder, small_scan["frames"], interval_s=0.05, half_written=2)
    store = run_stream(small_scan["files"].params_file, [], folder=folder, out=tmp_path / "ref",
                       result_folder=tmp_path / "out", dark=str(small_scan["dark"]), stop_after=6,
                       client=client, skip_refinement=True, live=False, settle_s=0.2,
                       output_h5=str(tmp_path / "cakes.h5"), compress=True)
    writer.join(10)
    assert store == tmp_path / "cakes.zarr.zip"  # named after --output-h5, as MIDAS does
    a, b = open_caked(batch), open_caked(store)
    for name in ("intensity", "frame_intensity", "frames_summed", "omega_first_deg", "omega_last_deg",
                 "last_frame", "tth_deg", "bin_area", "effective_tth_deg", "omega_deg"):
        assert np.array_equal(a[name].values, b[name].values, equal_nan=True), name
    import h5py

    with h5py.File(tmp_path / "cakes.h5") as f:
        assert np.array_equal(f["geometry_maps/TTh_eff_map"][...], a.effective_tth_deg.values, equal_nan=True)
        sums = f["OmegaSumFrame"]
        assert list(sums) == ["Summed_from_0_to_1", "Summed_from_2_to_3", "Summed_from_4_to_5"]
        assert np.array_equal(sums["Summed_from_2_to_3"][...], a.intensity.values[1], equal_nan=True)
        assert sums["Summed_from_2_to_3"].compression == "gzip"
        assert sums["Summed_from_4_to_5"].attrs["last_frame_identifier"] == "frame_6"
        assert len(f["frames"]) == 6 and f.attrs["num_frames"] == 6
    summary = json.loads((tmp_path / "ref" / "stream_summary.json").read_text())
    assert summary["frames"] == 6 and summary["groups"] == 3 and not summary["interrupted"]


@pytest.mark.slow
def test_dark_inside_the_files_is_subtracted_as_batch_mode_does(small_scan, client, tmp_path):
    """HDF5 files holding their dark (exchange/dark, MIDAS's -darkLoc): without --dark the stream
    subtracts the first file's dark, as batch integrate does, and says so; --resume keeps it
    (from the spool) though that file is gone; --dark overrides it. The command without -nCPUs
    starts its own cluster quietly: no distributed INFO lines on stderr."""
    import h5py
    import tifffile

    from midasflow.io.caked_store import open_caked
    from midasflow.io.frames import ScanSource
    from midasflow.pipeline import integrate
    from midasflow.stream.run import run_stream

    params_file = small_scan["files"].params_file
    with h5py.File(small_scan["files"].data) as f:
        dark = f["exchange/dark"][...]
    assert dark.mean() > 50  # the simulated dark offset: a stream that ignores it cakes other numbers

    def h5_folder(name):
        folder = tmp_path / name
        folder.mkdir()
        for k in range(3):
            with h5py.File(folder / f"scan_{k + 1:06d}.h5", "w") as f:
                f["exchange/data"] = small_scan["frames"][2 * k:2 * k + 2]
                f["exchange/dark"] = dark
        return folder

    folder = h5_folder("h5")
    out = tmp_path / "ref"
    proc = subprocess.run(_command("--param-file", str(params_file), "--folder", str(folder), "--skip-refinement",
                                   "--cif", str(_cif(small_scan["root"])),
                                   "--stop-after", "4", "--no-live", "--no-progress", "--settle", "0.1",
                                   "-resultFolder", str(tmp_path / "a"), "--out", str(out)),
                          capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "LocalCluster" in proc.stderr, proc.stderr
    assert not [line for line in proc.stderr.splitlines() if "INFO" in line and "distributed" in line], proc.stderr
    first = folder / "scan_000001.h5"
    assert json.loads((out / "stream_summary.json").read_text())["dark"] == f"{first}::exchange/dark"
    os.remove(first)  # --resume takes the dark from the spool
    store = run_stream(params_file, [], folder=str(folder), out=out, result_folder=tmp_path / "a",
                       stop_after=6, client=client, skip_refinement=True, live=False, settle_s=0.1, resume=True)
    batch = open_caked(integrate(params_file, small_scan["files"].data, result_folder=tmp_path / "batch",
                                 client=client))
    streamed = open_caked(store)
    for name in ("intensity", "frame_intensity", "frames_summed"):
        assert np.array_equal(batch[name].values, streamed[name].values, equal_nan=True), name

    other = tmp_path / "other_dark.tif"
    tifffile.imwrite(other, (dark + 37).astype(dark.dtype))
    store = run_stream(params_file, [], folder=h5_folder("h5b"), out=tmp_path / "ref_b",
                       result_folder=tmp_path / "b", dark=str(other), stop_after=6, client=client,
                       skip_refinement=True, live=False, settle_s=0.1)
    batch_other = open_caked(integrate(params_file, ScanSource(str(small_scan["files"].data), dark_fn=str(other)),
                                       result_folder=tmp_path / "batch_b", client=client))
    overridden = open_caked(store)
    assert np.array_equal(batch_other.intensity.values, overridden.intensity.values, equal_nan=True)
    assert not np.allclose(batch.intensity.values, overridden.intensity.values, equal_nan=True)
    assert json.loads((tmp_path / "ref_b" / "stream_summary.json").read_text())["dark"] == str(other)


async def _nothing() -> None:
    """A coroutine run on the client's event loop after everything queued there before it."""


def _stream_tasks_on_the_scheduler(client, token, prefix="stream-", held_only=False) -> int:
    """Tasks of a stream (its ``token``) the scheduler knows (``held_only``: those pending or
    holding data), once it has taken every submission and release the client made before."""
    # releases pass through the client's event loop, then they and the submissions travel on
    # its batched stream, which the scheduler can take later than run_on_scheduler's own
    # connection on a loaded machine: wait until the keys it has the client wanting are the
    # client's own
    client.sync(_nothing)

    def wanted(dask_scheduler, client_id=client.id):
        state = dask_scheduler.clients.get(client_id)
        return sorted(str(ts.key) for ts in state.wants_what) if state is not None else []

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with client._refcount_lock:
            own = sorted(str(key) for key in client.refcount if str(key).endswith(token))
        if [key for key in client.run_on_scheduler(wanted) if key.endswith(token)] == own:
            break
        time.sleep(0.02)

    def count(dask_scheduler, prefix=prefix, held_only=held_only):
        return sum(str(k).startswith(prefix) and str(k).endswith(token)
                   and not (held_only and ts.state in ("released", "forgotten"))
                   for k, ts in dask_scheduler.tasks.items())

    return client.run_on_scheduler(count)


@pytest.mark.parametrize("max_in_flight", [3, None])
def test_frames_in_flight_are_bounded(small_scan, client, tmp_path, monkeypatch, max_in_flight):
    """24 frames arriving at once while caking is slow: the stream holds at most
    ``max_frames_in_flight`` frame cakes on the cluster (without the bound: nearly every frame),
    cakes every frame into its group, and the scheduler's record of the stream (the lineage of
    the ω-group fold) does not grow with the frames."""
    from midasflow.binmap import load_or_build_binmap
    from midasflow.params import read_params
    from midasflow.stream import tasks
    from midasflow.stream.dataflow import StreamDataflow, StreamLimits
    from midasflow.stream.sources import Arrival
    from midasflow.stream.spool import Spool

    real = tasks._cake_chunk
    # unbounded, the caking waits until every frame has been fed, so the count held does not
    # depend on how fast this machine cakes; bounded, it only runs slow (a gate would deadlock)
    gate = None if max_in_flight else threading.Event()

    def slow(*args, **kw):  # the in-process worker's caking, slowed
        if gate is None:
            time.sleep(0.05)
        else:
            gate.wait(60)
        return real(*args, **kw)

    monkeypatch.setattr(tasks, "_cake_chunk", slow)
    params = read_params(small_scan["files"].params_file)
    binmap = load_or_build_binmap(params, None)
    caking = tasks.Caking(params=params, data_loc="exchange/data", normalize=bool(params.normalize),
                          min_area_fraction=float(params.min_area_fraction), mask_rule=str(params.mask_rule),
                          pre_proc_thresh=None)
    spool = Spool(tmp_path / "out")
    spool.create()
    path = tmp_path / "frame.tif"
    import tifffile

    tifffile.imwrite(path, small_scan["frames"][0])
    limits = StreamLimits(max_frames_in_flight=max_in_flight or 1000, max_groups_pending=1000,
                          frames_per_task=1)
    flow = StreamDataflow(client, params, binmap, caking, None, spool, limits, keep_frames=False,
                          caking_digest="test")
    held = []
    for i in range(24):
        flow.feed(Arrival(name=f"f{i}.tif", n_frames=1, path=str(path)))
        held.append(_stream_tasks_on_the_scheduler(client, flow.token, "stream-cake", held_only=True))
    if gate is not None:
        gate.set()
    flow.finish(end_of_stream=True)
    shape = (binmap.n_r, binmap.n_eta)
    first, last = (tasks.load_spooled(spool.group_path(g), shape) for g in (0, 11))
    assert len(flow.state.groups) == 12 and np.nansum(first) > 0
    assert np.array_equal(first, last, equal_nan=True)  # every group: the same frame twice
    deadline = time.monotonic() + 10
    while _stream_tasks_on_the_scheduler(client, flow.token) > 4 and time.monotonic() < deadline:  # releases are asynchronous
        time.sleep(0.05)
    assert _stream_tasks_on_the_scheduler(client, flow.token) <= 4  # the last group's two cakes and folds at most
    if max_in_flight:
        # in flight, plus a caked frame or two waiting for the fold of the one before
        assert max(held) <= max_in_flight + 2, held
    else:
        # the bound is what kept it small: unbounded, every frame fed is held
        assert max(held) > 3 + 2 + 1, held
    # arrivals that came back to back are caked together, up to frames_per_task, never across
    # a group's end (OmegaSumFrames 3 here), and give the same groups; with max_wait_s, a frame
    # with none queued behind it waits that long for more
    params = params.with_overrides(omega_sum_frames=3)
    from distributed import get_task_stream

    for wait_s, expected in ((0.0, [0, 3, 5, 6]),   # 0-2 (group end), 3-4 (no more waiting), 5, 6-7
                             (60.0, [0, 3, 6])):    # 0-2, 3-5 (group ends), 6-7 (the end)
        limits = StreamLimits(max_frames_in_flight=8, frames_per_task=4, max_wait_s=wait_s)
        spool = Spool(tmp_path / f"batched_{wait_s:g}")
        spool.create()
        flow = StreamDataflow(client, params, binmap, caking, None, spool, limits, keep_frames=False,
                              caking_digest="test")
        with get_task_stream(client) as ts:
            for i in range(8):
                flow.feed(Arrival(name=f"f{i}.tif", n_frames=1, path=str(path), more=i not in (4, 7)))
            flow.finish(end_of_stream=True)
        starts = sorted(int(str(t["key"]).split("-")[2]) for t in ts.data if str(t["key"]).startswith("stream-cake"))
        assert starts == expected, wait_s
        assert [g.frames_summed for g in flow.state.groups] == [3, 3, 2]
        np.testing.assert_array_equal(tasks.load_spooled(spool.group_path(1), shape), first * 1.5)
    # a lone frame is submitted by flush_due (the idle tick) once it has waited max_wait_s
    flow = StreamDataflow(client, params, binmap, caking, None, Spool(tmp_path / "waited"),
                          StreamLimits(frames_per_task=4, max_wait_s=0.3), keep_frames=False, caking_digest="test")
    flow.spool.create()
    flow.feed(Arrival(name="f0.tif", n_frames=1, path=str(path)))
    flow.flush_due()
    assert flow.frames_in_flight == 0  # waiting for company
    time.sleep(0.35)
    flow.flush_due()
    assert flow.frames_in_flight == 1
    flow.finish(end_of_stream=True)


def _small_caking(small_scan):
    """The small scan's parameters, bin map and the stream's caking settings."""
    from midasflow.binmap import load_or_build_binmap
    from midasflow.params import read_params
    from midasflow.stream import tasks

    params = read_params(small_scan["files"].params_file)
    binmap = load_or_build_binmap(params, None)
    caking = tasks.Caking(params=params, data_loc="exchange/data", normalize=bool(params.normalize),
                          min_area_fraction=float(params.min_area_fraction), mask_rule=str(params.mask_rule),
                          pre_proc_thresh=None)
    return params, binmap, caking


def _small_flow(small_scan, client, tmp_path, name, **limits):
    """A StreamDataflow of the small scan's parameters (cake only), and a TIFF of its first frame."""
    import tifffile

    from midasflow.stream.dataflow import StreamDataflow, StreamLimits
    from midasflow.stream.spool import Spool

    params, binmap, caking = _small_caking(small_scan)
    spool = Spool(tmp_path / name)
    spool.create()
    path = tmp_path / "frame.tif"
    tifffile.imwrite(path, small_scan["frames"][0])
    flow = StreamDataflow(client, params, binmap, caking, None, spool, StreamLimits(**limits),
                          keep_frames=False, caking_digest="test")
    return flow, path


def test_pv_frames_of_one_task_are_read_as_one_block_and_caked_as_each_alone(small_scan):
    """A caking task's PV frames are decoded into one block in frame order (the thread's
    reused frame buffer), and their cakes are bit for bit those of each frame caked alone; parts
    of two dtypes come as float32 with the flags NaN."""
    import bitshuffle

    from midasflow.io.frames import _to_float32
    from midasflow.stream.pva import PvaFrame
    from midasflow.stream.tasks import FrameItem, FramePart, cake_item, read_item

    _, binmap, caking = _small_caking(small_scan)
    frames = small_scan["frames"]
    code = {np.dtype(np.uint16): 6, np.dtype(np.int32): 3}[frames.dtype]

    def item(frames_, first=0):
        parts = tuple(FramePart(pva=PvaFrame(value=np.frombuffer(bitshuffle.compress_lz4(f, 0).tobytes(), np.uint8),
                                             shape=f.shape, codec="bslz4", parameters=code,
                                             uncompressed_size=f.nbytes, channel="test")) for f in frames_)
        return FrameItem(positions=tuple(range(first, first + len(parts))), parts=parts)

    [block] = read_item(item(frames[:4]), caking)
    assert block.dtype == frames.dtype and np.array_equal(block, frames[:4])
    [again] = read_item(item(frames[2:6], 2), caking)
    assert np.shares_memory(block, again) and np.array_equal(again, frames[2:6])
    cakes = cake_item(item(frames), binmap, caking, None)
    alone = np.concatenate([cake_item(item(frames[i:i + 1], i), binmap, caking, None) for i in range(len(frames))])
    assert np.array_equal(cakes, alone, equal_nan=True)
    other = frames[:1].astype(np.int32 if code == 6 else np.uint16)
    plain = FramePart(pva=PvaFrame(value=other[0].ravel(), shape=other.shape[1:], codec="", parameters=None,
                                   uncompressed_size=None, channel="test"))
    mixed = FrameItem(positions=(0, 1), parts=(*item(frames[:1]).parts, plain))
    [both] = read_item(mixed, caking)
    assert both.dtype == np.float32
    np.testing.assert_array_equal(both, np.concatenate([_to_float32(frames[:1]), _to_float32(other)]))


def test_cakes_stay_on_the_workers_and_a_failed_task_still_stops_the_stream(small_scan, client, tmp_path,
                                                                             monkeypatch):
    """The client checks the caking and group tasks for errors without fetching their results
    (a caking task's cakes are ~1.2 MB per 2048² frame): only what it needs comes back. A frame
    that cannot be read still stops the stream with its error."""
    from distributed import Future

    from midasflow.stream.sources import Arrival

    fetched = []
    real = Future.result

    def result(self, *args, **kw):
        fetched.append(str(self.key))
        return real(self, *args, **kw)

    monkeypatch.setattr(Future, "result", result)
    flow, path = _small_flow(small_scan, client, tmp_path, "kept", frames_per_task=2, max_wait_s=0.0)
    for i in range(4):
        flow.feed(Arrival(name=f"f{i}.tif", n_frames=1, path=str(path), more=i % 2 == 0))
    flow.finish(end_of_stream=True)
    assert len(flow.state.groups) == 2 and Path(flow.spool.group_path(1)).is_file()
    assert not [k for k in fetched if k.startswith(("stream-cake", "stream-group"))], fetched
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"not a tiff")
    flow, _ = _small_flow(small_scan, client, tmp_path, "broken", frames_per_task=1)
    flow.feed(Arrival(name="f0.tif", n_frames=1, path=str(path)))  # the first frame (its flags read here)
    flow.feed(Arrival(name="broken.tif", n_frames=1, path=str(broken)))
    with pytest.raises(Exception, match="broken.tif"):
        flow.finish(end_of_stream=True)


def _gaps(shape):
    """A module gap (rows 60..66) and a dead block, cutting through the small scan's rings."""
    gaps = np.zeros(shape, dtype=bool)
    gaps[60:67, :] = True
    gaps[90:110, 20:31] = True
    return gaps


def _flagged_frames(small_scan):
    """The small scan's frames as int32 with its gaps flagged −1 (a Pilatus's gap value)."""
    frames = small_scan["frames"].astype(np.int32)
    frames[:, _gaps(frames.shape[1:])] = -1
    return frames


def test_stream_refinement_takes_the_first_frames_flagged_pixels_and_resume_keeps_them(small_scan, client,
                                                                                       tmp_path):
    """A stream whose frames have gaps flagged −1 and no mask file: at its first frame the
    refinement's lineouts get the effective 2θ a mask of the gaps gives (within 1e-9°), the flags
    go to the spool, and a resumed stream takes them from there."""
    import tifffile

    from midasflow.binmap import load_or_build_binmap
    from midasflow.caked_schema import caked_dataset
    from midasflow.caking import cake_attrs, cake_coords
    from midasflow.refinement.plan import CakeLayout, WorkerContext
    from midasflow.stream.dataflow import Refinement, StreamDataflow, StreamLimits, StreamState
    from midasflow.stream.sources import Arrival
    from midasflow.stream.spool import Spool

    params, binmap, caking = _small_caking(small_scan)
    params = params.with_overrides(omega_sum_frames=2)  # no group closes: nothing is refined
    skeleton = caked_dataset(
        intensity=np.zeros((0, binmap.n_r, binmap.n_eta)), frames_summed=np.zeros(0),
        omega_first_deg=np.zeros(0), omega_last_deg=np.zeros(0), last_frame=np.zeros(0),
        frame=np.zeros(0), omega_frame_deg=np.zeros(0), **cake_coords(params, binmap), attrs=cake_attrs(params))
    context = WorkerContext(CakeLayout.of(skeleton), None, None, None, None, 20, None)
    path = tmp_path / "gaps.tif"
    tifffile.imwrite(path, _flagged_frames(small_scan)[0])
    spool = Spool(tmp_path / "flags")
    spool.create()

    def flow_of(state=None):
        return StreamDataflow(client, params, binmap, caking, None, spool, StreamLimits(frames_per_task=1),
                              keep_frames=False, caking_digest="test", state=state,
                              refinement=Refinement(context, None, binmap.n_eta, binmap.n_eta))

    flow = flow_of()
    static = client.gather(flow.context).layout.tth_deg
    np.testing.assert_array_equal(static, binmap.effective_tth_deg)
    flow.feed(Arrival(name="gaps.tif", n_frames=1, path=str(path)))
    np.testing.assert_array_equal(flow.flagged, _gaps(binmap.detector_shape))
    by_mask = load_or_build_binmap(params, _gaps(binmap.detector_shape)).effective_tth_deg
    collected = np.isfinite(by_mask)
    assert (np.abs(by_mask - static)[collected] > 1e-3).sum() >= 20  # bins the gaps move
    followed = client.gather(flow.context).layout.tth_deg
    np.testing.assert_allclose(followed[collected], by_mask[collected], rtol=0, atol=1e-9)
    flow.finish(end_of_stream=False)
    resumed = flow_of(StreamState(frames=list(flow.state.frames)))
    np.testing.assert_array_equal(resumed.flagged, flow.flagged)
    np.testing.assert_array_equal(client.gather(resumed.context).layout.tth_deg, followed)


@pytest.mark.slow
def test_folder_and_pv_streams_follow_flagged_pixels_as_a_mask_file_does(small_scan, client, tmp_path):
    """Frames with gaps flagged −1 (int32) and no mask file, from a watched folder and from a
    PV: the stream's store and HDF5 carry the effective 2θ that batch mode gives with a mask
    file of the gaps (within 1e-9°)."""
    import h5py
    import tifffile

    from midasflow.io.caked_store import open_caked
    from midasflow.pipeline import integrate
    from midasflow.stream.run import run_stream

    frames = _flagged_frames(small_scan)
    mask_file = tmp_path / "gaps_mask.tif"
    tifffile.imwrite(mask_file, _gaps(frames.shape[1:]).astype(np.uint8))
    batch = open_caked(integrate(small_scan["files"].params_file, small_scan["files"].data,
                                 overrides={"MaskFile": str(mask_file)}, result_folder=tmp_path / "batch",
                                 client=client))
    by_mask = batch.effective_tth_deg.values
    collected = np.isfinite(by_mask)
    folder = tmp_path / "watch"
    folder.mkdir()
    writer = drop_files(folder, frames[:2], interval_s=0.05)
    server = NtndArrayServer(shape=frames.shape[1:])
    try:
        server.publish(frames[:2], rate_hz=20)
        for source, kwargs in (("folder", dict(folder=folder, settle_s=0.2, output_h5=str(tmp_path / "cakes.h5"))),
                               ("pva", dict(pva=True, pva_channel=server.pv_name, pva_conf=server.conf))):
            store = run_stream(small_scan["files"].params_file, [], out=tmp_path / f"ref_{source}",
                               result_folder=tmp_path / source, dark=str(small_scan["dark"]), stop_after=2,
                               client=client, skip_refinement=True, live=False, **kwargs)
            streamed = open_caked(store).effective_tth_deg.values
            np.testing.assert_allclose(streamed[collected], by_mask[collected], rtol=0, atol=1e-9, err_msg=source)
    finally:
        server.stop()
    writer.join(10)
    with h5py.File(tmp_path / "cakes.h5") as f:
        np.testing.assert_allclose(f["geometry_maps/TTh_eff_map"][...][collected], by_mask[collected],
                                   rtol=0, atol=1e-9)


@pytest.mark.slow
def test_each_worker_loads_the_bin_map_once_and_keeps_it_for_the_next_stream(small_scan, tmp_path):
    """The caking tasks name the bin map by its cache file: no task depends on a map key (whose
    extra copies distributed's active memory manager would drop, so every few tasks a worker
    would receive the whole map again and rebuild the kernel's layout of it); each worker of a
    two-process cluster loads it once and keeps the same copy through the memory manager's
    cycles, and for the next stream of the same map."""
    from midasflow.cluster import close_client, get_client

    client, _ = get_client(n_workers=2, dashboard=False)
    try:
        _bin_map_kept_by_each_worker(small_scan, client, tmp_path)
    finally:
        close_client(client)


def _bin_map_kept_by_each_worker(small_scan, client, tmp_path):
    from midasflow.stream import tasks
    from midasflow.stream.sources import Arrival

    flow, path = _small_flow(small_scan, client, tmp_path, "kept", frames_per_task=1, max_wait_s=0.0)
    assert isinstance(flow.binmap, tasks.BinMapRef)
    digest = flow.binmap.digest

    def kept():
        from midasflow.stream import tasks

        return {d: id(bm) for d, bm in tasks._STREAM_MAP.items()}

    flow.warm_up()
    before = client.run(kept)
    assert len(before) == 2 and all(set(k) == {digest} for k in before.values())
    for i in range(4):
        flow.feed(Arrival(name=f"f{i}.tif", n_frames=1, path=str(path)))
        deps = client.run_on_scheduler(lambda dask_scheduler: [str(d.key) for t in dask_scheduler.tasks.values()
                                                               for d in t.dependencies])
        assert not [k for k in deps if k.startswith("binmap")], deps
        client.amm.run_once()
    flow.finish(end_of_stream=True)
    again, _ = _small_flow(small_scan, client, tmp_path, "again", frames_per_task=1, max_wait_s=0.0)
    again.warm_up()
    assert client.run(kept) == before


def test_a_worker_keeps_one_stream_bin_map(small_scan, monkeypatch):
    """A worker keeps the latest stream's map only: another map replaces it (memory stays
    bounded however many streams of other geometries a cluster runs)."""
    import dataclasses

    from midasflow.binmap import load_or_build_binmap
    from midasflow.stream import tasks

    monkeypatch.setattr(tasks, "_STREAM_MAP", {})  # this process's in-process workers kept one
    params, binmap, _ = _small_caking(small_scan)
    other = load_or_build_binmap(dataclasses.replace(params, eta_bin_deg=2 * params.eta_bin_deg), None)
    assert other.digest != binmap.digest
    refs = [tasks.BinMapRef(bm.cache_file, bm.key, bm.digest) for bm in (binmap, other)]
    first = tasks.stream_binmap(refs[0])
    assert first.digest == binmap.digest and tasks.stream_binmap(refs[0]) is first  # kept
    assert tasks.stream_binmap(refs[1]).digest == other.digest and list(tasks._STREAM_MAP) == [other.digest]
    assert tasks.stream_binmap(binmap) is binmap  # a map given as itself is used as it is


def test_a_workers_threads_load_the_stream_bin_map_once(small_scan, monkeypatch):
    """Tasks starting together on one worker's threads share one load of the map."""
    import threading
    import time

    import midasflow.binmap as binmap_module
    from midasflow.stream import tasks

    monkeypatch.setattr(tasks, "_STREAM_MAP", {})
    _, binmap, _ = _small_caking(small_scan)
    loads = []
    load = binmap_module.cached_binmap

    def slow_load(*args):
        loads.append(args)
        time.sleep(0.2)  # a 2048² map takes seconds: the other threads arrive meanwhile
        return load(*args)

    monkeypatch.setattr(binmap_module, "cached_binmap", slow_load)
    ref = tasks.BinMapRef(binmap.cache_file, binmap.key, binmap.digest)
    got = []
    threads = [threading.Thread(target=lambda: got.append(tasks.stream_binmap(ref))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loads) == 1 and len(got) == 4 and all(bm is got[0] for bm in got)


def test_a_stream_clusters_workers_profile_every_100_ms():
    """Workers made for a stream sample their tasks for the dashboard's Profile page every
    100 ms (distributed's default is 10 ms, on the thread that also receives the frames)."""
    from distributed import LocalCluster

    from midasflow.stream.run import stream_worker_config

    with stream_worker_config():
        cluster = LocalCluster(n_workers=1, processes=False, dashboard_address=None)
    try:
        [worker] = cluster.workers.values()
        assert worker.periodic_callbacks["profile"].callback_time == 100
    finally:
        cluster.close()


# ---------------------------------------------------------------------------------------------
# the command, end to end
# ---------------------------------------------------------------------------------------------
def _cif(root: Path) -> Path:
    from midasflow.crystal import cubic_phase, write_phase_cif
    from midasflow.simulate import CEO2_A_A

    path = root / "CeO2.cif"
    if not path.exists():
        write_phase_cif(cubic_phase("CeO2", CEO2_A_A), path)
    return path


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "midasflow", "run", "--backend", "stream", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def test_stream_flags_need_backend_stream_and_one_source():
    from midasflow.cli import main

    assert main(["run", "--folder", "x", "--cif", "c.cif", "-paramFN", "p.txt", "-dataFN", "d.h5"]) == 2
    assert main(["run", "--backend", "stream", "--param-file", "p.txt", "--cif", "c.cif"]) == 2
    assert main(["run", "--backend", "stream", "--param-file", "p.txt", "--cif", "c.cif", "--folder", "x",
                 "--pva"]) == 2


def _captured_run_stream(monkeypatch):
    """run_stream and the command's cluster replaced: the keyword arguments the command passes."""
    import contextlib

    from midasflow.cli import run as cli_run
    from midasflow.stream import run as stream_run

    calls = []

    def fake(param_fn, cifs, **kw):
        calls.append({"param_fn": param_fn, "cifs": cifs, **kw})

    monkeypatch.setattr(stream_run, "run_stream", fake)
    monkeypatch.setattr(cli_run, "dask_client", lambda args, **kw: contextlib.nullcontext(None))
    return calls


def test_the_manuals_stream_commands_run_verbatim(monkeypatch, capsys):
    """The manual's two command lines, word for word, reach the stream with what they say;
    --pva-channel defaults to areaDetector's NDPluginPva PV of the simulated detector."""
    from midasflow.cli import main

    calls = _captured_run_stream(monkeypatch)
    line = "run --backend stream --param-file ps.txt --folder DIR --cif CeO2.cif --out refinement/ -nCPUs 8"
    assert main(line.split()) == 0
    line = ("run --backend stream --param-file ps.txt --pva --pva-ip 127.0.0.1 --cif CeO2.cif --out refinement/ "
            "-nCPUs 8")
    assert main(line.split()) == 0
    folder, pva = calls
    assert (folder["param_fn"], folder["cifs"], folder["folder"], Path(folder["out"]), folder["pva"]) == \
        ("ps.txt", ["CeO2.cif"], "DIR", Path("refinement"), False)
    assert (pva["pva"], pva["pva_ip"], pva["pva_channel"], pva["folder"]) == \
        (True, "127.0.0.1", "13SIM1:Pva1:Image", None)
    assert folder["backend"] == "native" and folder["data_loc"] == "exchange/data"
    line = ("run --backend stream --param-file ps.txt --folder DIR --cif CeO2.cif --engine gsas2 --output-h5 c.h5 "
            "--compress --zarr-output z.zarr.zip --stream-data-loc entry/data --dark d.h5 --stop-after 10 "
            "--idle-timeout 5 --pva-channel X:Image")
    assert main(line.split()) == 0
    flags = calls[-1]
    assert (flags["backend"], flags["output_h5"], flags["compress"], flags["zarr_output"], flags["data_loc"],
            flags["dark"], flags["stop_after"], flags["idle_timeout_s"], flags["pva_channel"]) == \
        ("gsas2", "c.h5", True, "z.zarr.zip", "entry/data", "d.h5", 10, 5.0, "X:Image")


def test_backend_batch_is_the_two_step_run(small_scan, tmp_path):
    """``run --backend batch`` is today's run: the same store as without the flag."""
    from midasflow.cli import main
    from midasflow.io.caked_store import open_caked

    files = small_scan["files"]
    base = ["run", "-paramFN", str(files.params_file), "-dataFN", str(files.data), "--cif",
            str(_cif(small_scan["root"])), "--skip-refinement", "--no-progress"]
    assert main([*base, "-resultFolder", str(tmp_path / "plain")]) == 0
    assert main([*base, "--backend", "batch", "-resultFolder", str(tmp_path / "batch")]) == 0
    [plain], [batch] = (list((tmp_path / d).glob("*.zarr.zip")) for d in ("plain", "batch"))
    a, b = open_caked(plain), open_caked(batch)
    assert a.sizes["group"] == 3 and np.array_equal(a.intensity.values, b.intensity.values, equal_nan=True)


def test_stream_zarr_output_names_the_store_and_no_zarr_writes_none(small_scan, client, tmp_path):
    """--zarr-output NAME: the .zarr.zip is NAME; --no-zarr: no .zarr.zip at all (the stream's
    summary says so)."""
    import tifffile

    from midasflow.io.caked_store import open_caked
    from midasflow.stream.run import run_stream

    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(small_scan["frames"][:4]):
        tifffile.imwrite(folder / f"f{i}.tif", frame)
    common = dict(folder=folder, result_folder=tmp_path / "rf", stop_after=4, client=client,
                  skip_refinement=True, live=False, settle_s=0.05)
    named = tmp_path / "elsewhere" / "mine.zarr.zip"
    named.parent.mkdir()
    store = run_stream(small_scan["files"].params_file, [], out=tmp_path / "a", zarr_output=str(named), **common)
    assert store == named and open_caked(named).sizes["group"] == 2
    assert not (tmp_path / "rf" / "frames.zarr.zip").exists()
    assert run_stream(small_scan["files"].params_file, [], out=tmp_path / "b", no_zarr=True, **common) is None
    assert list(tmp_path.rglob("*.zarr.zip")) == [named]
    summary = json.loads((tmp_path / "b" / "stream_summary.json").read_text())
    assert summary["zarr"] is None and summary["groups"] == 2 and summary["frames"] == 4


def test_first_signal_stops_the_stream_and_a_second_sigterm_stops_at_once():
    """Ctrl-C and SIGTERM (what batch schedulers send at walltime) wind the stream down; a
    second one raises (SIGTERM: cli.Terminated, exit 143)."""
    from midasflow.cli import Terminated
    from midasflow.stream.run import stop_on_signals

    before = signal.getsignal(signal.SIGTERM)
    for first in (signal.SIGINT, signal.SIGTERM):
        stop = threading.Event()
        with pytest.raises(Terminated), stop_on_signals(stop) as received:
            os.kill(os.getpid(), first)
            time.sleep(0.1)
            assert stop.is_set() and received["signal"] == first
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_folder_stream_refines_as_batch_mode_does(small_scan, tmp_path):
    """The manual's command on a folder filled while it runs: equal refinement results, with
    --warm-start in both (this small scan's group means are flagged high_correlation, so both
    refuse them as warm seeds and say so; tests/test_warm.py has stream tasks warm-starting)."""
    from midasflow.pipeline import integrate, refine
    from midasflow.results import open_results

    cif = _cif(small_scan["root"])
    folder = tmp_path / "watch"
    folder.mkdir()
    writer = drop_files(folder, small_scan["frames"], interval_s=0.2)
    proc = subprocess.run(_command("--param-file", str(small_scan["files"].params_file), "--folder", str(folder),
                                   "--cif", str(cif), "--out", str(tmp_path / "refinement"), "-nCPUs", "2",
                                   "--dark", str(small_scan["dark"]), "--idle-timeout", "4", "--no-live",
                                   "--no-progress", "-resultFolder", str(tmp_path), "--warm-start"),
                          capture_output=True, text=True, env=_env(), timeout=900)
    writer.join(10)
    assert proc.returncode == 0, proc.stderr
    streamed = open_results(tmp_path / "refinement" / "results.zarr")
    store = integrate(small_scan["files"].params_file, small_scan["files"].data, result_folder=tmp_path / "b")
    batch = refine(store, [cif], out=tmp_path / "batch_ref", warm_start=True)
    for name in ("a_a", "a_a_esd", "rwp", "status", "recipe"):
        assert np.array_equal(streamed[name].values, batch[name].values), name
    ok = batch.status.values == "ok"
    assert all("no warm start from group mean: the seed is flagged" in n for n in streamed.notes.values[ok])
    assert (tmp_path / "watch.zarr.zip").is_file() and (tmp_path / "refinement" / "report.html").is_file()


@pytest.mark.slow
def test_pva_stream_with_dropped_frames_reports_them_and_finishes(small_scan, tmp_path):
    cif = _cif(small_scan["root"])
    server = NtndArrayServer(pv="13SIM1:Pva1:Image", shape=(128, 128))
    try:
        server.publish(small_scan["frames"], rate_hz=5, codecs=("bslz4", "lz4"), skip_ids=(3,),
                       start_delay_s=1)
        proc = subprocess.run(_command("--param-file", str(small_scan["files"].params_file), "--pva",
                                       "--pva-ip", server.address, "--cif", str(cif),
                                       "--out", str(tmp_path / "refinement"), "-nCPUs", "2",
                                       "--dark", str(small_scan["dark"]), "--stop-after", "6", "--idle-timeout", "120", "--no-live",
                                       "--no-progress", "-resultFolder", str(tmp_path)),
                              capture_output=True, text=True, env=_env(), timeout=900)
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "refinement" / "refinement_summary.json").read_text())
    assert summary["stream"]["source"]["dropped_frames"] == 1
    assert summary["stream"]["source"]["gaps"] == [[2, 4]]
    assert summary["stream"]["frames"] == 6 and summary["stream"]["groups"] == 3
    assert (tmp_path / "13SIM1_Pva1_Image.zarr.zip").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_leaves_consistent_outputs_and_resume_finishes(small_scan, tmp_path, signum):
    """A group's lineouts are refined and published as soon as it closes, while the stream
    runs. SIGINT or SIGTERM mid-stream: the groups in flight are finished, every output is
    written for the closed groups; --resume takes the remaining files and ends with the
    uninterrupted result."""
    from midasflow.io.caked_store import open_caked
    from midasflow.pipeline import integrate
    from midasflow.results import open_results

    cif = _cif(small_scan["root"])
    folder = tmp_path / "watch"
    folder.mkdir()
    args = ["--param-file", str(small_scan["files"].params_file), "--folder", str(folder), "--cif", str(cif),
            "--out", str(tmp_path / "refinement"), "-nCPUs", "2", "--dark", str(small_scan["dark"]),
            "--no-live", "--no-progress", "-resultFolder", str(tmp_path), "--refresh-every", "1"]
    writer = drop_files(folder, small_scan["frames"][:3], interval_s=0.1)  # one group and a half
    proc = subprocess.Popen(_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    writer.join(10)
    results_path, report_path = tmp_path / "refinement" / "results.zarr", tmp_path / "refinement" / "report.html"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        # the closed group is refined and its results and report written while the stream still
        # waits for frames (no --idle-timeout, no --stop-after: only the signal ends it)
        if results_path.is_dir() and report_path.is_file():
            break
        time.sleep(0.2)
    assert proc.poll() is None and results_path.is_dir() and report_path.is_file()
    assert open_results(results_path).sizes["group"] == 1
    time.sleep(1)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signum, err
    assert ("stopped by SIGTERM" if signum == signal.SIGTERM else "interrupted") in err
    first = open_caked(tmp_path / "watch.zarr.zip")
    assert first.sizes["group"] == 1  # the closed group; the open one waits in the spool
    assert open_results(tmp_path / "refinement" / "results.zarr").sizes["group"] == 1
    drop_files(folder, small_scan["frames"][3:], interval_s=0.05, stem="frame_x").join(10)
    for i in range(3, 6):  # the rest, named after the first three
        os.rename(folder / f"frame_x{i - 2}.tif", folder / f"frame_{i + 1}.tif")
    proc = subprocess.run(_command(*args, "--resume", "--idle-timeout", "3"), capture_output=True, text=True,
                          env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr
    batch = open_caked(integrate(small_scan["files"].params_file, small_scan["files"].data,
                                 result_folder=tmp_path / "b"))
    resumed = open_caked(tmp_path / "watch.zarr.zip")
    assert np.array_equal(resumed.intensity.values, batch.intensity.values, equal_nan=True)
    assert open_results(tmp_path / "refinement" / "results.zarr").sizes["group"] == 3


def test_results_and_report_are_rewritten_beside_the_stream_not_in_its_way(tmp_path, monkeypatch):
    """A refresh of results.zarr and report.html (seconds for a long stream) runs in a writer
    thread: the client goes on taking frames meanwhile; one refresh at a time; the end waits
    for it, and a failed refresh is the stream's error."""
    from types import SimpleNamespace

    from midasflow.stream import run as stream_run
    from midasflow.stream.dataflow import GroupRecord

    started, release, written = threading.Event(), threading.Event(), []

    def slow_report(ds, path, **kw):
        started.set()
        assert release.wait(20)
        written.append(ds)

    monkeypatch.setattr("midasflow.report.write_report", slow_report)
    monkeypatch.setattr("midasflow.results.write_results", lambda ds, out: None)
    outputs = stream_run._Outputs(tmp_path, None, {}, False, "native", "rietveld", True, 1, dict)
    outputs.assemble = lambda lineouts, groups: (len(lineouts), len(groups))
    groups = [GroupRecord(g, 2 * g, 2 * g + 1, 0.0, 1.0, 0.0, refined_s=1.0) for g in range(3)]
    flow = SimpleNamespace(results=[], state=SimpleNamespace(groups=groups[:1]))
    outputs.flow = flow
    flow.results = [SimpleNamespace(group=0, index=i, pattern=None) for i in range(4)]
    outputs.group_refined(groups[0], flow.results)  # returns while the report is being written
    assert started.wait(30) and not written
    flow.state.groups = groups[:2]
    flow.results += [SimpleNamespace(group=1, index=4 + i, pattern=None) for i in range(4)]
    outputs.group_refined(groups[1], flow.results[4:])  # busy: no second refresh
    release.set()
    outputs.wait()
    assert written == [(4, 1)] and outputs.current == (4, 1)
    monkeypatch.setattr("midasflow.results.write_results", lambda ds, out: 1 / 0)
    outputs.last_refresh = outputs.refresh_cost_s = 0.0
    outputs.group_refined(groups[1], [])
    with pytest.raises(ZeroDivisionError):
        outputs.wait()


def test_live_page_serves_on_loopback_and_follows_the_groups():
    import urllib.request

    from midasflow.caked_schema import caked_dataset
    from midasflow.refinement.lineouts import LineoutResult
    from midasflow.refinement.result import PatternResult
    from midasflow.stream.dataflow import GroupRecord
    from midasflow.stream.live import LiveView

    n_r, n_eta = 30, 8
    skeleton = caked_dataset(
        intensity=np.zeros((0, n_r, n_eta)), frames_summed=np.zeros(0), omega_first_deg=np.zeros(0),
        omega_last_deg=np.zeros(0), last_frame=np.zeros(0), frame=np.zeros(0), omega_frame_deg=np.zeros(0),
        r_px=np.arange(n_r, dtype=float), tth_deg=np.linspace(2, 8, n_r), q_inv_a=np.linspace(1, 4, n_r),
        eta_deg=np.linspace(-157.5, 157.5, n_eta), bin_area=np.ones((n_r, n_eta)))
    view = LiveView(skeleton)
    try:
        assert view.url.startswith("http://127.0.0.1:")
        page = urllib.request.urlopen(view.url, timeout=30).read().decode()
        assert "bokeh" in page.lower()
        record = GroupRecord(0, 0, 3, 10.0, 11.5, time.time())
        view.show_cake(record, np.full((n_r, n_eta), 8.0))
        assert view.snapshot["cake"][0, 0] == 2.0  # counts per frame: the sum over 4 frames
        x = np.linspace(2, 8, n_r)
        pattern = PatternResult(status="ok", message="", rwp=5.0, rp=4.0, chi2=1.0, gof=1.0, n_points=n_r,
                                n_dropped=0, stage_rwp={}, values={}, esds={},
                                cells={"CeO2": (5.41, 5.41, 5.41, 90, 90, 90, 158.4)}, cell_esds={},
                                phase_fractions={}, tth_deg=x, obs=x, calc=x, bkg=0 * x, reflections={},
                                warnings=[])
        results = [LineoutResult(e, 0, e, 10.75, float(skeleton.eta_deg[e]), n_r, "ok", pattern=pattern)
                   for e in range(n_eta)]
        view.show_results(record, results, None)
        assert [a for _, a in view.snapshot["a_eta"][0]] == [5.41] * n_eta
        assert view.snapshot["fits"][0][0].startswith("η")
    finally:
        view.close()
    assert not view.thread.is_alive()


def _stream_refine(small_scan, client, tmp_path, **kw):
    """A folder stream of the small scan's first four frames, refined (run_stream in-process)."""
    import tifffile

    from midasflow.stream.run import run_stream

    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(small_scan["frames"][:4]):
        tifffile.imwrite(folder / f"f{i}.tif", frame)
    out = tmp_path / "refinement"
    run_stream(small_scan["files"].params_file, [_cif(small_scan["root"])], folder=folder, out=out,
               result_folder=tmp_path, dark=str(small_scan["dark"]), stop_after=4, client=client,
               live=False, settle_s=0.05, report=False, **kw)
    return out


@pytest.mark.slow
def test_stream_summary_names_the_gsas2_projects_it_wrote(small_scan, client, tmp_path):
    """The stream's refinement_summary.json is the batch one plus "stream": every refined
    histogram's "gpx" is the project the stream exported (it was null)."""
    out = _stream_refine(small_scan, client, tmp_path, export=("gpx",))
    summary = json.loads((out / "refinement_summary.json").read_text())
    assert summary["stream"]["frames"] == 4 and summary["stream"]["groups"] == 2
    ok = [h for h in summary["histograms"] if h["status"] == "success"]
    assert ok and all(h["gpx"] and Path(h["gpx"]).is_file() for h in ok), ok[:2]


@pytest.mark.slow
def test_stream_results_carry_the_texture_of_batch_mode(small_scan, client, tmp_path):
    """--texture sh: the stream's results.zarr has batch mode's per-reflection intensities, pole
    directions, per-lineout texture terms and joint texture fit, and ``midasflow texture``
    refits from it."""
    from midasflow.cli import main
    from midasflow.results import open_results

    out = _stream_refine(small_scan, client, tmp_path, texture="sh", sh_order=4)
    res = open_results(out / "results.zarr")
    assert res.sizes["reflection"] >= 3 and np.isfinite(res.I.values).any()
    assert {"I_esd", "pole_direction", "po_param"} <= set(res.variables)
    assert json.loads(res.attrs["texture_fits"])["CeO2"]["order"] == 4
    assert main(["texture", "--results", str(out), "--sh-order", "6", "--no-progress"]) == 0
    assert json.loads(open_results(out / "results.zarr").attrs["texture_fits"])["CeO2"]["order"] == 6


def test_stream_refuses_an_unknown_export_kind_as_batch_mode_does(small_scan, tmp_path):
    """One refiner builder for batch and stream: an unknown export kind is refused before the
    stream starts (it was taken as a kind and exported as nothing)."""
    from midasflow.errors import ParameterError
    from midasflow.stream.run import run_stream

    folder = tmp_path / "frames"
    folder.mkdir()
    cif = _cif(small_scan["root"])
    with pytest.raises(ParameterError, match=r"export \['pdf'\]: expected True, False or kinds of"):
        run_stream(small_scan["files"].params_file, [cif], folder=folder, out=tmp_path / "a",
                   result_folder=tmp_path, live=False, export=("pdf",), idle_timeout_s=1)
    assert not (tmp_path / "a" / "stream_summary.json").exists()


@pytest.mark.slow
def test_stream_store_goes_beside_the_refinement_folder_by_default(small_scan, tmp_path):
    """run_stream without result_folder puts the .zarr.zip beside ``out`` as pipeline.run does
    (it went to the working directory)."""
    import tifffile

    from midasflow.stream.run import run_stream

    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(small_scan["frames"][:2]):
        tifffile.imwrite(folder / f"f{i}.tif", frame)
    store = run_stream(small_scan["files"].params_file, [], folder=folder, out=tmp_path / "run" / "refinement",
                       stop_after=2, skip_refinement=True, live=False, settle_s=0.05)
    assert store == tmp_path / "run" / "frames.zarr.zip" and store.is_file()
