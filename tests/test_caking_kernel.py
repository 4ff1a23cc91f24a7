"""Caking kernel (midasflow.caking_kernel): numba vs the scipy oracle, mask rules, pass sizes."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from cake_helpers import noisy_frames
from fork_helpers import assert_forked_child_passes

from midasflow.caking_kernel import RawCorrection, cake_block, cake_block_reference
from midasflow.errors import ParameterError


@pytest.fixture(scope="module")
def params(caking_params):
    return caking_params


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mask_rule", ["area", "midas"])
@pytest.mark.parametrize("normalize", [True, False])
def test_kernel_matches_reference(params, masked_map, dtype, mask_rule, normalize):
    frames = noisy_frames(params).astype(dtype)
    kw = {"normalize": normalize, "mask_rule": mask_rule, "min_area_fraction": 0.6}
    fast = cake_block(frames, masked_map, **kw)
    ref = cake_block_reference(frames, masked_map, **kw)
    assert fast.shape == (5, masked_map.n_r, masked_map.n_eta) and fast.dtype == np.float64
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(ref))
    np.testing.assert_allclose(fast, ref, rtol=1e-10, atol=0, equal_nan=True)
    assert np.isfinite(fast[0]).sum() > 0.5 * fast[0].size  # the comparison is not vacuous


def test_fast_path_without_nan_matches_reference(params, masked_map):
    frames = noisy_frames(params)[[0, 2, 4]]  # no NaN: uses the precomputed bin_area
    np.testing.assert_allclose(cake_block(frames, masked_map),
                               cake_block_reference(frames, masked_map), rtol=1e-10,
                               equal_nan=True)


def test_flat_frame_gives_its_value(plain_map):
    frame = np.full((1,) + plain_map.detector_shape, 3.5, dtype=np.float32)
    out = cake_block(frame, plain_map)[0]
    covered = plain_map.geometric_area > 0
    np.testing.assert_allclose(out[covered], 3.5, rtol=1e-12)
    assert (out[~covered] == 0).all() and (~covered).any()  # empty bins are 0, not NaN
    counts = cake_block(frame, plain_map, normalize=False)[0]
    np.testing.assert_allclose(counts, 3.5 * plain_map.bin_area, rtol=1e-12)


def test_nan_pixels_leave_the_area_out(plain_map):
    """A NaN pixel neither adds intensity nor area: a flat frame stays flat around it."""
    frame = np.full((1,) + plain_map.detector_shape, 2.0)
    frame[0, 30, 10:14] = np.nan
    out = cake_block(frame, plain_map, min_area_fraction=0.0)[0]
    covered = plain_map.geometric_area > 0
    np.testing.assert_allclose(out[covered], 2.0, rtol=1e-12)


@pytest.mark.parametrize("mask_rule", ["area", "midas"])
def test_all_nan_frame_matches_reference(plain_map, mask_rule):
    """Bins that lose every pixel: area exactly 0 (value 0 when min_area_fraction is 0), as the
    oracle, not a rounding residue of the subtracted NaN areas."""
    frames = np.full((2,) + plain_map.detector_shape, 4.0)
    frames[0] = np.nan
    frames[1, :20] = np.nan
    for fraction in (0.0, 0.5):
        got = cake_block(frames, plain_map, min_area_fraction=fraction, mask_rule=mask_rule)
        ref = cake_block_reference(frames, plain_map, min_area_fraction=fraction,
                                   mask_rule=mask_rule)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=0, equal_nan=True)
        covered = plain_map.geometric_area > 0
        if mask_rule == "area" and fraction == 0.0:
            assert (got[0][covered] == 0).all()
        else:
            assert np.isnan(got[0][covered]).all()


def test_mask_rules(params, masked_map):
    frames = noisy_frames(params)
    area_rule = cake_block(frames, masked_map, min_area_fraction=0.5)
    midas_rule = cake_block(frames, masked_map, mask_rule="midas")
    geom = masked_map.geometric_area
    # static mask: "midas" drops every touched bin; "area" only those below half their area
    static_bad = masked_map.bin_area < 0.5 * geom
    assert np.isnan(area_rule[0][static_bad]).all()
    assert np.isfinite(area_rule[0][~static_bad]).all()
    assert np.isnan(midas_rule[0][masked_map.touches_mask]).all()
    assert np.isnan(midas_rule).sum() > np.isnan(area_rule).sum()
    # a per-frame NaN stripe flags bins only in that frame under "midas"
    assert np.isnan(midas_rule[1]).sum() > np.isnan(midas_rule[0]).sum()
    # min_area_fraction 0 keeps every bin that has any unmasked area
    keep_all = cake_block(frames[[0]], masked_map, min_area_fraction=0.0)[0]
    assert np.isfinite(keep_all).all()


def test_ring_order_covers_every_entry_pixel(masked_map):
    from midasflow.caking_kernel import _kernel_map

    km = _kernel_map(masked_map)
    W = masked_map.weights
    used = np.unique(W.indices)
    assert km.n_used == used.size and (km.slot[used] >= 0).all()
    assert (np.delete(km.slot, used) == -1).all()  # masked / out-of-range pixels get no row
    np.testing.assert_array_equal(np.sort(km.slot[used]), np.arange(used.size))
    np.testing.assert_array_equal(km.rows, km.slot[W.indices])
    # rows first appear in map order: the bins read the buffer front to back
    first = np.maximum.accumulate(km.rows)
    assert (np.diff(np.unique(first)) == 1).all()
    assert km.chunks[0] == 0 and km.chunks[-1] == W.shape[0] and (np.diff(km.chunks) > 0).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_result_does_not_depend_on_pass_size(params, masked_map, monkeypatch, dtype):
    """Frames split over several map passes (NaN and NaN-free passes mixed) give bit-identical
    per-frame cakes to one pass and to one call per frame."""
    import midasflow.caking_kernel as cake_module

    frames = noisy_frames(params, n=7).astype(dtype)  # NaN only in frames 1 and 3
    one_pass = cake_block(frames, masked_map, mask_rule="midas")
    assert cake_module.frames_per_pass(masked_map, frames.dtype) >= 7
    row_bytes = cake_module._kernel_map(masked_map).n_used * frames.itemsize
    monkeypatch.setattr(cake_module, "_PASS_BYTES", 2 * row_bytes)
    assert cake_module.frames_per_pass(masked_map, frames.dtype) == 2
    np.testing.assert_array_equal(cake_block(frames, masked_map, mask_rule="midas"), one_pass)
    singles = np.concatenate([cake_block(f, masked_map, mask_rule="midas") for f in frames])
    np.testing.assert_array_equal(singles, one_pass)


def test_concurrent_calls_use_their_own_buffers(params, masked_map):
    from concurrent.futures import ThreadPoolExecutor

    blocks = [noisy_frames(params, n=5, seed=s).astype(np.float32) for s in range(6)]
    expected = [cake_block(b, masked_map) for b in blocks]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda b: cake_block(b, masked_map), blocks))
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(g, e)


def test_kernel_rejects_bad_input(params, masked_map):
    with pytest.raises(ParameterError, match="MaskRule"):
        cake_block(noisy_frames(params), masked_map, mask_rule="strict")
    with pytest.raises(ParameterError, match="expected shape"):
        cake_block(np.zeros((2, 10, 10)), masked_map)


def test_concurrent_kernel_calls_take_turns_pass_by_pass(params, masked_map, monkeypatch):
    """Two kernel calls at once (two Dask threads) run their passes one at a time, each pass on
    every numba thread (not two passes with one thread and a buffer each); both calls get the
    result of a call alone; the caller's thread setting is kept."""
    import threading
    import time

    import numba

    import midasflow.caking_kernel as kernel

    n_threads = numba.config.NUMBA_NUM_THREADS
    monkeypatch.setattr(kernel, "_PASS_BYTES", 4 * 4 * kernel._kernel_map(masked_map).n_used)
    frames = noisy_frames(params, n=16).astype(np.float32)
    one_pass = kernel._one_pass
    passes: list[tuple[str, int, float, float]] = []

    def recording(*args):
        t0 = time.perf_counter()
        out = one_pass(*args)
        time.sleep(0.01)  # long enough for the other call to try to overlap
        passes.append((threading.current_thread().name, numba.get_num_threads(), t0,
                       time.perf_counter()))
        return out

    monkeypatch.setattr(kernel, "_one_pass", recording)
    numba.set_num_threads(1)
    ref = cake_block(frames, masked_map)  # 4 passes of 4 frames
    assert [p[1] for p in passes] == [n_threads] * 4 and numba.get_num_threads() == 1
    numba.set_num_threads(n_threads)
    passes.clear()
    out = {}
    threads = [threading.Thread(target=lambda k=k: out.__setitem__(k, cake_block(frames, masked_map)),
                                name=f"dask-{k}") for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(2):
        np.testing.assert_array_equal(out[k], ref)
    assert sorted(p[0] for p in passes) == ["dask-0"] * 4 + ["dask-1"] * 4
    assert all(p[1] == n_threads for p in passes)
    spans = sorted(p[2:] for p in passes)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # never two passes at once
    assert numba.get_num_threads() == n_threads


@pytest.mark.parametrize("eta_bin_deg", [360.0, 30.0, 7.5])
def test_one_frame_sectors_give_the_whole_pass_result(eta_bin_deg):
    """One frame per call goes through the map sector by sector (eta wedges, R bands when there
    are few eta bins): bit-identical to the whole pass, every entry in exactly one sector."""
    from cake_helpers import small_params

    from midasflow.binmap import build_binmap
    from midasflow.caking_kernel import _N_SECTORS, _RECORD, _sector_map

    params = small_params(eta_bin_deg=eta_bin_deg)
    bm = build_binmap(params)
    sm = _sector_map(bm)
    n_sectors = sm.rec_start.size - 1
    assert min(_N_SECTORS, bm.n_r * bm.n_eta) // 2 < n_sectors <= 2 * _N_SECTORS
    assert sm.weights.size == sm.local.size == _RECORD * sm.pix.size
    real = sm.local != sm.r_per * sm.eta_per  # the rest pads records in the spare bin
    assert (sm.weights[~real] == 0).all() and (sm.local < sm.r_per * sm.eta_per + 1).all()
    np.testing.assert_array_equal(np.sort(sm.weights[real]), np.sort(bm.weights.data))
    frames = noisy_frames(params, n=6)  # NaN stripes in some frames
    whole = cake_block(frames, bm, mask_rule="midas")
    singles = np.concatenate([cake_block(f, bm, mask_rule="midas") for f in frames])
    np.testing.assert_array_equal(singles, whole)
    np.testing.assert_allclose(singles, cake_block_reference(frames, bm, mask_rule="midas"),
                               rtol=1e-10, atol=0, equal_nan=True)


@pytest.mark.parametrize("mask_rule", ["area", "midas"])
def test_first_one_frame_call_goes_through_the_csr_map_with_the_same_result(mask_rule):
    """A map's first call of fewer than _MIN_BUFFER_FRAMES frames (a new process's first frame)
    reads the frames through the CSR map, building no sector layout; later calls use the
    sectors. Both give the whole pass's cakes bit for bit, NaN-free and NaN frames alike."""
    from cake_helpers import small_params

    from midasflow.binmap import build_binmap
    from midasflow.caking_kernel import _MIN_BUFFER_FRAMES, _SECTOR_MAPS

    params = small_params()
    bm = build_binmap(params)
    frames = noisy_frames(params, n=6)
    has_nan = np.isnan(frames).any(axis=(1, 2))
    picked = np.concatenate([frames[has_nan][:1], frames[~has_nan][:1]])
    assert len(picked) == 2 < _MIN_BUFFER_FRAMES
    whole = cake_block(frames, bm, mask_rule=mask_rule)
    expected = np.concatenate([whole[has_nan][:1], whole[~has_nan][:1]])
    first = cake_block(picked, bm, mask_rule=mask_rule)
    assert bm not in _SECTOR_MAPS
    np.testing.assert_array_equal(first, expected)
    later = cake_block(picked, bm, mask_rule=mask_rule)
    assert bm in _SECTOR_MAPS
    np.testing.assert_array_equal(later, expected)
    raw = picked[1].astype(np.float32)  # raw frames take the one-frame CSR path too
    raw_first = cake_block(raw, build_binmap(params), mask_rule=mask_rule,
                           correction=RawCorrection(np.ones(raw.shape, np.float32)))
    np.testing.assert_array_equal(raw_first, cake_block(raw - np.float32(1), bm,
                                                        mask_rule=mask_rule))


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("threshold", [None, 7.5])
@pytest.mark.parametrize("n_frames", [1, 6])
def test_raw_frames_corrected_inside_the_kernel_as_open_frames_corrects_them(
        params, masked_map, dtype, threshold, n_frames):
    """RawCorrection: raw frames (detector flags, a dark, a threshold) caked with the correction
    done inside the kernel give bit for bit the cakes of open_frames' float32 frames (its numpy
    conversion: flags -> NaN, minus the dark, threshold), on the one-frame path and on the
    pass buffer."""
    from midasflow.caking_kernel import RawCorrection
    from midasflow.io.frames import _to_float32, threshold_frames

    rng = np.random.default_rng(5)
    shape = (n_frames,) + tuple(masked_map.detector_shape)
    raw = rng.integers(0, 400, size=shape).astype(dtype)
    kind = np.dtype(dtype).kind
    if kind == "u":
        raw[:, 3:6, 10:40] = np.iinfo(dtype).max  # Eiger gaps
    elif kind == "i":
        raw[:, 3:6, 10:40] = -1  # Pilatus gaps
        raw[:, 20, 20:25] = -2
    else:
        raw[:, 3:6, 10:40] = np.nan
    dark = rng.uniform(0.0, 20.0, size=shape[1:]).astype(np.float32)
    frames = _to_float32(raw) - dark
    if threshold is not None:
        frames = threshold_frames(frames, np.float32(threshold))
    for mask_rule in ("area", "midas"):
        expected = cake_block(frames, masked_map, mask_rule=mask_rule)
        got = cake_block(raw, masked_map, mask_rule=mask_rule,
                         correction=RawCorrection(dark, threshold))
        np.testing.assert_array_equal(got, expected)
        assert np.isnan(got).any() and np.isfinite(got).sum() > got.size // 2
    no_dark = cake_block(raw, masked_map, correction=RawCorrection())
    np.testing.assert_array_equal(no_dark, cake_block(_to_float32(raw), masked_map))


def test_raw_correction_refuses_a_dark_of_another_shape(params, masked_map):
    from midasflow.caking_kernel import RawCorrection

    frames = np.zeros((1,) + tuple(masked_map.detector_shape), np.uint16)
    with pytest.raises(ParameterError, match=r"^dark: expected shape"):
        cake_block(frames, masked_map, correction=RawCorrection(np.zeros((3, 3), np.float32)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_cakes_on_threads_of_its_own(params, masked_map):
    """The helper threads of a kernel pass do not survive a fork, and a lock another thread
    holds at the fork is never released in the child: a child that cakes after its parent did
    (helper pool made), forked while a parent thread is inside a pass (pass lock held), cakes
    on two threads and gets the parent's cakes (it would otherwise wait forever)."""
    import numba

    from midasflow import caking_kernel

    frames = noisy_frames(params)
    threads = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        expected = cake_block(frames, masked_map)
        assert caking_kernel._HELPER_POOL[0] is not None  # the parent's pool exists
        inside, release = threading.Event(), threading.Event()

        def hold_the_pass() -> None:
            with caking_kernel._PASS_LOCK:
                inside.set()
                release.wait(30)

        holder = threading.Thread(target=hold_the_pass)
        holder.start()
        inside.wait(30)
        try:
            assert_forked_child_passes(lambda: np.array_equal(
                cake_block(frames, masked_map), expected, equal_nan=True))
        finally:
            release.set()
            holder.join()
    finally:
        numba.set_num_threads(threads)
