"""The lazy Dask wrapper (midasflow.caking): graph, chunk invariance, ω-groups, memory, rings."""
from __future__ import annotations

import pickle

import dask
import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from cake_helpers import lazy_frames, small_params
from dask_helpers import raise_if_dask_computes

from midasflow.binmap import build_binmap
from midasflow.caking import cake, group_bounds
from midasflow.caking_kernel import cake_block
from midasflow.errors import FrameError
from midasflow.params import params_from_text


@pytest.fixture(scope="module")
def params(caking_params):
    return caking_params


def _counting_frames(params, n, counter):
    base = lazy_frames(params, n, chunks=4)

    def touch(block):
        counter.append(1)
        return block

    return base.copy(data=base.data.map_blocks(touch, dtype=np.float32,
                                               meta=np.empty((0, 0, 0), np.float32)))


def test_building_the_graph_computes_only_the_first_frame(params, masked_map):
    """The first frame is computed for its flagged (NaN) pixels, nothing else; the cakes read
    each frame chunk once."""
    calls: list[int] = []
    frames = _counting_frames(params.with_overrides(sum_images=True), 10, calls)
    with raise_if_dask_computes(max_computes=1):
        ds = cake(frames, params.with_overrides(sum_images=True, omega_sum_frames=3),
                  binmap=masked_map)
    assert calls == [1]  # the first chunk, for its first frame
    assert all(isinstance(ds[v].data, dask.array.Array)
               for v in ("intensity", "frame_intensity", "sum_frames"))
    ds.compute()
    assert len(calls) == 1 + 3  # each frame chunk read once, shared by every output


def test_binmap_is_one_graph_key(params, masked_map):
    ds = cake(lazy_frames(params, 12, chunks=2), params, binmap=masked_map)
    graph = dict(ds["frame_intensity"].data.__dask_graph__())
    map_keys = [k for k in graph if str(k).startswith("binmap-")]
    assert len(map_keys) == 1
    big = len(pickle.dumps(masked_map))
    for key, task in graph.items():
        if key not in map_keys:
            assert len(pickle.dumps(task)) < big / 4, key  # no task embeds the map


@pytest.mark.parametrize("chunks", [12, 1, 5, (3, 1, 7, 1)])
def test_results_do_not_depend_on_chunking(params, masked_map, chunks):
    p = params.with_overrides(omega_sum_frames=5, sum_images=True)
    ref = cake(lazy_frames(p, 12, chunks=4), p, binmap=masked_map).compute()
    got = cake(lazy_frames(p, 12, chunks=chunks), p, binmap=masked_map).compute()
    xr.testing.assert_identical(ref, got)


@st.composite
def _scan_layouts(draw):
    """A frame count, an uneven chunking of it, a grouping and whether all frames are summed."""
    n = draw(st.integers(1, 13))
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=n - 1))) if n > 1 else []
    chunks = tuple(int(c) for c in np.diff([0, *cuts, n]))
    group = draw(st.integers(-1, n + 1).filter(lambda g: g != 0))
    return n, chunks, group, draw(st.booleans())


@settings(max_examples=25, deadline=None)
@given(layout=_scan_layouts())
def test_cake_is_chunk_invariant(params, masked_map, layout):
    """Property: any chunking of the frames (uneven, single-frame chunks, one chunk) gives the
    identical Dataset, for any OmegaSumFrames grouping (NaN pixels in every third frame)."""
    n, chunks, group, sum_images = layout
    p = params.with_overrides(omega_sum_frames=group, sum_images=sum_images)
    ref = cake(lazy_frames(p, n, chunks=n), p, binmap=masked_map).compute()
    got = cake(lazy_frames(p, n, chunks=chunks), p, binmap=masked_map).compute()
    xr.testing.assert_identical(ref, got)


def test_group_sums_and_metadata(params, masked_map):
    p = params.with_overrides(omega_sum_frames=4, sum_images=True)
    frames = lazy_frames(p, 10, chunks=3)
    ds = cake(frames, p, binmap=masked_map).compute()
    per_frame = cake_block(frames.values, masked_map)
    np.testing.assert_array_equal(ds["frame_intensity"].values, per_frame)
    assert ds.sizes["group"] == 3
    np.testing.assert_array_equal(ds["frames_summed"], [4, 4, 2])  # remainder group kept
    np.testing.assert_array_equal(ds["last_frame"], [3, 7, 9])
    omega = 10.0 + 0.25 * np.arange(10)
    np.testing.assert_allclose(ds["omega_first_deg"], omega[[0, 4, 8]])
    np.testing.assert_allclose(ds["omega_last_deg"], omega[[3, 7, 9]])
    np.testing.assert_allclose(ds["omega_deg"], (omega[[0, 4, 8]] + omega[[3, 7, 9]]) / 2)
    for g, (lo, hi) in enumerate([(0, 4), (4, 8), (8, 10)]):
        np.testing.assert_allclose(ds["intensity"][g], per_frame[lo:hi].sum(axis=0),
                                   rtol=1e-13, equal_nan=True)
    # NaN bins of any member frame stay NaN in the group sum
    assert np.isnan(ds["intensity"][0]).sum() >= np.isnan(per_frame[0]).sum()
    np.testing.assert_allclose(ds["sum_frames"], per_frame.sum(axis=0), rtol=1e-13,
                               equal_nan=True)


def test_all_frames_group_and_no_individual_frames(params, masked_map):
    p = params.with_overrides(omega_sum_frames=-1, save_individual_frames=False)
    ds = cake(lazy_frames(p, 7, chunks=3), p, binmap=masked_map)
    assert "frame_intensity" not in ds and "sum_frames" not in ds
    assert ds.sizes["group"] == 1 and int(ds["frames_summed"][0]) == 7
    np.testing.assert_array_equal(group_bounds(7, 3)[1], [2, 5, 6])


def test_coordinates_and_attrs(params, masked_map):
    ds = cake(lazy_frames(params, 3), params, binmap=masked_map)
    r_c = 0.5 * (params.r_edges_px()[1:] + params.r_edges_px()[:-1])
    np.testing.assert_allclose(ds["r_px"], r_c)
    tth = np.degrees(np.arctan(r_c * params.px_um / params.lsd_um))
    np.testing.assert_allclose(ds["tth_deg"], tth, rtol=1e-14)
    np.testing.assert_allclose(ds["q_inv_a"], 4 * np.pi / 0.2 * np.sin(np.radians(tth) / 2))
    np.testing.assert_allclose(ds["eta_deg"], -157.5 + 45.0 * np.arange(8))
    np.testing.assert_array_equal(ds["bin_area"], masked_map.bin_area)
    np.testing.assert_allclose(ds["omega_frame_deg"], [10.0, 10.25, 10.5])
    back = params_from_text(ds.attrs["params"])
    assert back.with_overrides(source=params.source) == params
    import json
    assert json.loads(ds.attrs["instrument"])["Lam"] == 0.2


def test_frame_shape_mismatch_is_one_line(params, masked_map):
    frames = lazy_frames(small_params(nr_pixels_y=41), 2)
    with pytest.raises(FrameError, match="does not match the detector"):
        cake(frames, params, binmap=masked_map)


def _max_live_cake_bytes(params, binmap, n, monkeypatch, scheduler="threads"):
    """Largest number of bytes held at once in per-frame cake chunks while computing the group
    sums of ``n`` frames with dask's ``scheduler`` (2 threads for "threads"; every chunk the
    kernel returns is tracked until it is freed)."""
    import weakref

    import midasflow.caking as cake_module

    live = [0, 0]  # current, maximum
    kernel = cake_module._cake_chunk

    def tracked(*args):
        out = kernel(*args)
        live[0] += out.nbytes
        live[1] = max(live)
        weakref.finalize(out, lambda nbytes=out.nbytes: live.__setitem__(0, live[0] - nbytes))
        return out

    monkeypatch.setattr(cake_module, "_cake_chunk", tracked)
    p = params.with_overrides(omega_sum_frames=-1, save_individual_frames=False)
    ds = cake(lazy_frames(p, n, chunks=5), p, binmap=binmap)
    with dask.config.set(scheduler=scheduler, num_workers=2):
        out = ds["intensity"].values
    monkeypatch.undo()
    assert np.isfinite(out).any() and live[0] == 0
    return live[1]


def test_group_sum_memory_does_not_grow_with_frames(monkeypatch):
    p = small_params(nr_pixels_y=64, nr_pixels_z=64, bc_y_px=31.7, bc_z_px=32.2,
                     r_max_px=40.0, r_bin_px=0.5, eta_bin_deg=10.0)
    from midasflow.caking_kernel import frames_per_pass

    bm = build_binmap(p)
    per_task = frames_per_pass(bm) // 5 * 5  # 5-frame chunks, as many as fill a map pass
    chunk_bytes = per_task * bm.n_r * bm.n_eta * 8
    n = 400
    all_bytes = -(-n // per_task) * chunk_bytes  # every task's cakes held at once: 14 chunks
    # one thread in dask's own order (deterministic): a chunk is summed into its group before
    # the next but one is caked, however many frames
    assert _max_live_cake_bytes(p, bm, n, monkeypatch, "sync") <= 2 * chunk_bytes
    # two threads: a few tasks may run ahead of the streaming sum while the other thread is
    # held up (5 chunks seen on a loaded machine), never all of them
    peak = _max_live_cake_bytes(p, bm, n, monkeypatch)
    assert peak <= 8 * chunk_bytes < all_bytes, (peak, chunk_bytes, all_bytes)


def test_distributed_client_gives_same_result(params, masked_map):
    distributed = pytest.importorskip("distributed")
    p = params.with_overrides(omega_sum_frames=2)
    ref = cake(lazy_frames(p, 6, chunks=2), p, binmap=masked_map).compute()
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2,
                            dashboard_address=None):
        got = cake(lazy_frames(p, 6, chunks=2), p, binmap=masked_map).compute()
    xr.testing.assert_identical(ref, got)


def _numba_threads() -> int:
    import numba

    return numba.get_num_threads()


@pytest.mark.slow
def test_cached_map_reaches_workers_as_one_small_key_and_caps_numba_threads(params, tmp_path):
    """A cached map enters the graph as ONE task loading it from the cache (no client-side
    scatter, no map inside the graph); worker processes give the threaded scheduler's result;
    and on one-thread workers every caking task runs numba on one thread, not cpu_count."""
    import os

    from distributed import Client, LocalCluster, get_task_stream

    from midasflow.binmap import load_or_build_binmap

    bm = load_or_build_binmap(params, cache_dir=tmp_path)
    assert bm.cache_file == str((tmp_path / f"{bm.key}.npz").resolve()) and bm.digest
    ds = cake(lazy_frames(params, 8, chunks=1), params, binmap=bm)
    graph = dict(ds["intensity"].data.__dask_graph__())
    map_keys = [k for k in graph if str(k).startswith("binmap-")]
    assert len(map_keys) == 1 and len(pickle.dumps(graph[map_keys[0]])) < 4096
    ref = ds.compute(scheduler="threads")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        workers = list(client.scheduler_info()["workers"])
        before = [client.submit(_numba_threads, workers=[w], pure=False).result()
                  for w in workers]
        with get_task_stream(client) as stream:
            got = client.compute(ds).result()
        caking = {t["worker"] for t in stream.data if "cake-frames" in str(t["key"])}
        after = [client.submit(_numba_threads, workers=[w], pure=False).result()
                 for w in caking]
    xr.testing.assert_identical(ref, got)
    if (os.cpu_count() or 1) > 1:
        assert min(before) > 1  # numba's default: every core, in every worker
    assert after and set(after) == {1}


def test_small_chunks_are_caked_a_whole_pass_per_task(params, masked_map, monkeypatch):
    """open_frames' small chunks: each task hands as many consecutive chunks as fill a map pass
    to the kernel as a list (no rechunk layer); results are bit-identical."""
    import midasflow.caking as cake_module
    from midasflow.caking_kernel import _kernel_map, frames_per_pass

    row_bytes = _kernel_map(masked_map).n_used * 4
    monkeypatch.setattr("midasflow.caking_kernel._PASS_BYTES", 12 * row_bytes)  # 8-frame passes
    per_pass = frames_per_pass(masked_map)
    assert per_pass == 8
    p = params.with_overrides(omega_sum_frames=4)
    calls = []
    kernel = cake_module._cake_chunk

    def spy(block, *args):
        calls.append([b.shape[0] for b in block] if isinstance(block, list) else [block.shape[0]])
        return kernel(block, *args)

    ref = cake(lazy_frames(p, 3 * per_pass + 2, chunks=per_pass), p, binmap=masked_map).compute()
    monkeypatch.setattr(cake_module, "_cake_chunk", spy)
    ds = cake(lazy_frames(p, 3 * per_pass + 2, chunks=2), p, binmap=masked_map)
    assert ds["frame_intensity"].data.chunks[0] == (per_pass,) * 3 + (2,)
    xr.testing.assert_identical(ds.compute(), ref)
    assert sorted(map(sum, calls)) == sorted([per_pass] * 3 + [2])
    assert max(len(c) for c in calls) == per_pass // 2  # whole chunks, handed over as a list


# ------------------------------------------------------------------ simulated CeO2 rings
@pytest.fixture(scope="module")
def ceo2():
    from midasflow.simulate import cubic_rings, module_gaps, simulate_frames

    p = small_params(nr_pixels_y=480, nr_pixels_z=480, bc_y_px=241.3, bc_z_px=238.6,
                     lsd_um=5.0e5, r_min_px=120.0, r_max_px=235.0, r_bin_px=0.25,
                     eta_bin_deg=30.0, wavelength_a=0.172978, solid_angle_correction=False,
                     polarization_correction=False)
    rings = cubic_rings(5.411, [(1, 1, 1), (2, 0, 0), (2, 2, 0)])
    kw = {"fwhm_deg": 0.05, "background": 10.0, "supersample": 4, "dtype": np.float64}
    clean, truth = simulate_frames(p, rings, **kw)
    gaps = module_gaps((480, 480), module_px=(97, 121), gap_px=(8, 5))  # Pilatus-like
    gapped, _ = simulate_frames(p, rings, masked_regions=gaps, flag_value=np.nan, **kw)
    return p, build_binmap(p), clean, gapped, truth["tth0_deg"]


def _ring_centres(cake2d, tth_deg, tth0_deg):
    """Gaussian + constant fit of every ring in every η lineout -> centres (ring, eta), NaN where
    the lineout has a NaN bin under the ring."""
    from scipy.optimize import curve_fit

    def gauss(x, a, c, s, b):
        return a * np.exp(-0.5 * ((x - c) / s) ** 2) + b

    out = np.full((len(tth0_deg), cake2d.shape[1]), np.nan)
    for k, t0 in enumerate(tth0_deg):
        window = np.abs(tth_deg - t0) < 0.1
        for e in range(cake2d.shape[1]):
            y = cake2d[window, e]
            if np.isfinite(y).all():
                popt, _ = curve_fit(gauss, tth_deg[window], y, p0=[y.max() - y.min(), t0, 0.02,
                                                                   y.min()])
                out[k, e] = popt[1]
    return out


def test_simulated_ceo2_rings_at_true_tth(ceo2):
    p, bm, clean, _, tth0 = ceo2
    ds = cake(xr.DataArray(clean, dims=("frame", "z", "y")), p, binmap=bm).compute()
    centres = _ring_centres(ds["intensity"].values[0], ds["tth_deg"].values, tth0)
    ppm = (centres / tth0[:, None] - 1) * 1e6
    assert np.isfinite(ppm).all() and ppm.shape == (3, 12)
    assert np.abs(ppm).max() < 20, ppm


def test_module_gaps_keep_rings_and_most_bins(ceo2):
    p, bm, clean, gapped, tth0 = ceo2
    assert 0.05 < np.isnan(gapped).mean() < 0.2
    ref = cake_block(clean, bm)[0]
    area = cake_block(gapped, bm)[0]
    midas = cake_block(gapped, bm, mask_rule="midas")[0]
    covered = bm.geometric_area > 0
    assert np.isnan(area[covered]).mean() < 0.05  # default rule keeps most bins
    assert np.isnan(midas[covered]).mean() > 0.6  # MIDAS rule loses most of them
    r_px = 0.5 * (p.r_edges_px()[1:] + p.r_edges_px()[:-1])
    tth = np.degrees(np.arctan(r_px * p.px_um / p.lsd_um))
    c_ref = _ring_centres(ref, tth, tth0)
    c_gap = _ring_centres(area, tth, tth0)
    shift_ppm = (c_gap / c_ref - 1) * 1e6
    kept = np.isfinite(shift_ppm)
    assert kept.mean() > 0.8
    # partially masked bins move a centre by at most ~20 ppm; on average the rings stay put
    assert np.abs(shift_ppm[kept]).max() < 25, shift_ppm
    assert abs(np.nanmean(shift_ppm)) < 5, shift_ppm
    assert np.abs(c_gap[kept] / np.broadcast_to(tth0[:, None], c_gap.shape)[kept] - 1).max() \
        < 25e-6


def test_process_variables_become_group_means(params, plain_map, tmp_path):
    """Temperature/Pressure/I/I0 read per frame from HDF5 (custom Temperature path, SkipFrame)
    become per-group means, remainder group included; the cakes do not change."""
    import h5py

    from midasflow.io.frames import open_frames

    rng = np.random.default_rng(11)
    raw = rng.integers(0, 500, size=(9, params.nr_pixels_z, params.nr_pixels_y)).astype(np.int32)
    pv = {name: rng.normal(300.0, 20.0, size=9) for name in ("temperature", "pressure", "i", "i0")}
    path = str(tmp_path / "scan.h5")
    with h5py.File(path, "w") as f:
        f["exchange/data"] = raw
        f["/sample/T_K"] = pv["temperature"]
        for name, key in (("pressure", "Pressure"), ("i", "I"), ("i0", "I0")):
            f[f"/measurement/instrument/GSAS2_PVS/{key}"] = pv[name]
    p = params.with_overrides(skip_frame=1, omega_sum_frames=3,
                              temperature_dataset_path="/sample/T_K")
    frames = open_frames(path, p, frames_per_chunk=2)
    ds = cake(frames, p, binmap=plain_map).compute()
    np.testing.assert_array_equal(ds["frames_summed"], [3, 3, 2])
    for name, values in pv.items():
        kept = values[1:]
        expected = [kept[0:3].mean(), kept[3:6].mean(), kept[6:8].mean()]
        assert ds[name].dims == ("group",) and ds[name].dtype == np.float64
        np.testing.assert_allclose(ds[name].values, expected, rtol=1e-15)
    plain = cake(frames.drop_vars(list(pv)), p, binmap=plain_map).compute()
    assert not set(pv) & set(plain.variables)
    xr.testing.assert_identical(ds.drop_vars(list(pv)), plain)


@pytest.mark.parametrize("fmt, dtype", [("h5", np.uint16), pytest.param("h5", np.int32, marks=pytest.mark.slow),
                                        pytest.param("ge", np.uint32, marks=pytest.mark.slow)])
def test_open_frames_scan_is_caked_from_its_raw_frames(params, masked_map, tmp_path, fmt, dtype,
                                                       monkeypatch):
    """cake() of what open_frames returned reads the raw frames in its own pass-sized tasks (a
    series of two files, SkipFrame, a dark, a threshold, detector flags, frames_per_read
    smaller than a pass) and corrects them inside the kernel: the same Dataset, bit for bit, as
    caking the float32 frames open_frames computes. Any change to the frames (here a rechunk)
    falls back to caking those float frames."""
    from midasflow.caking_kernel import _kernel_map
    from midasflow.io.frames import ScanSource, open_frames, raw_frames_of
    from midasflow.simulate import write_scan

    row_bytes = _kernel_map(masked_map).n_used * 4
    monkeypatch.setattr("midasflow.caking_kernel._PASS_BYTES", 12 * row_bytes)  # 8-frame passes
    rng = np.random.default_rng(3)
    shape = (2, 11, params.nr_pixels_z, params.nr_pixels_y)
    raw = rng.integers(0, 300, size=shape).astype(dtype)
    flag = -1 if np.dtype(dtype).kind == "i" else np.iinfo(dtype).max
    raw[:, ::3, 5:8, 4:30] = flag
    dark = rng.integers(0, 9, size=(3,) + shape[2:]).astype(dtype)
    files = [write_scan(tmp_path, params, raw[k], dark, fmt=fmt, stem=f"scan_00000{k + 1}")
             for k in range(2)]
    p = files[0].params.with_overrides(skip_frame=2, omega_sum_frames=5)
    for frames_per_read in (None, 3):
        scan = ScanSource(files[0].data, start_file_nr=1, end_file_nr=2, pre_proc_thresh=4.0,
                          frames_per_read=frames_per_read)
        frames = open_frames(scan, p)
        assert raw_frames_of(frames.data) is not None
        assert raw_frames_of(frames.data.rechunk({0: 5})) is None
        ds = cake(frames, p, binmap=masked_map)
        keys = [str(k) for k in ds["intensity"].data.__dask_graph__()]
        assert any(k.startswith("cake-raw-frames-") for k in keys)
        assert ds["frame_intensity"].data.chunks[0] == ((8, 8, 4) if frames_per_read is None
                                                        else (3,) * 6 + (2,))
        floats = frames.copy(data=frames.data.rechunk({0: 5}))
        ref = cake(floats, p, binmap=masked_map)
        assert not any(str(k).startswith("cake-raw-frames-")
                       for k in ref["intensity"].data.__dask_graph__())
        got, ref = ds.compute(), ref.compute()
        xr.testing.assert_identical(got, ref)
        assert np.isnan(got["frame_intensity"].values).any()
        assert np.isfinite(got["intensity"].values).sum() > got["intensity"].size // 2
