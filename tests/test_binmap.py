"""Bin map: exact pixel splitting, area bookkeeping, masks, corrections, ImTransOpt, cache."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import example, given, settings
from hypothesis import strategies as st

import midasflow.binmap as binmap_mod
from midasflow.binmap import binmap_key, build_binmap, load_or_build_binmap
from midasflow.errors import FrameError, ParameterError
from midasflow.geometry import pixel_map, pixel_to_r_eta, r_to_tth_deg
from midasflow.params import Params

NZ, NY = 48, 56


def _params(**kw) -> Params:
    base = dict(
        nr_pixels_y=NY, nr_pixels_z=NZ, px_um=200.0, lsd_um=300_000.0,
        bc_y_px=27.3, bc_z_px=22.6, r_min_px=0.0, r_max_px=60.0, r_bin_px=0.5, eta_bin_deg=10.0,
    )
    base.update(kw)
    return Params(**base)


def _sector_area(bm) -> np.ndarray:
    """Ideal-plane area of every (R, η) bin, shape (n_r, n_eta)."""
    r = bm.r_edges_px
    eta = np.deg2rad(bm.eta_edges_deg)
    return 0.5 * np.outer(r[1:] ** 2 - r[:-1] ** 2, np.diff(eta))


def _pixel_sums(bm) -> np.ndarray:
    return np.asarray(bm.areas.sum(axis=0)).reshape(bm.detector_shape)


@pytest.mark.parametrize("bc", [(27.3, 22.6), (27.0, 22.0), (27.5, 22.5), (27.5, 22.2)],
                         ids=["generic", "on-centre", "on-corner", "on-edge"])
def test_split_areas_of_every_pixel_sum_to_one_untilted(bc):
    # RMin 0 and a large RMax: every pixel is in range, including the one(s) touching the beam
    # centre and the column crossing the η = ±180° seam (y ≈ 27, z < 22)
    bm = build_binmap(_params(r_bin_px=0.37, eta_bin_deg=7.2, bc_y_px=bc[0], bc_z_px=bc[1]))
    sums = _pixel_sums(bm)
    assert np.max(np.abs(sums - 1.0)) < 1e-5
    assert bm.areas.nnz > 3 * NZ * NY  # pixels really are split
    if bc[0] % 1 != 0.5:  # otherwise the seam runs along pixel edges
        seam_pixel = bm.areas[:, 10 * NY + 27].toarray().reshape(bm.n_r, bm.n_eta)
        used = np.nonzero(seam_pixel.sum(axis=0))[0]
        assert {0, bm.n_eta - 1} <= set(used)  # split across −180 and +180
    np.testing.assert_array_equal(bm.weights.toarray(), bm.areas.toarray())  # no corrections


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"tx_deg": 0.7, "ty_deg": 2.0, "tz_deg": -0.3, "p": (2e-2,) + (0.0,) * 6 + (5e-2, 40.0) + (0.0,) * 6},
        {"eta_min_deg": 0.0, "eta_max_deg": 360.0, "eta_bin_deg": 45.0, "ty_deg": 1.0},
        {"eta_min_deg": -190.0, "eta_max_deg": 170.0, "eta_bin_deg": 120.0},
        {"eta_bin_deg": 360.0},
    ],
    ids=["untilted", "tilted-distorted", "eta-0-360", "eta-shifted-wide", "one-eta-bin"],
)
def test_geometric_area_equals_sector_area(extra):
    # the mapped pixel quadrilaterals share corners, so they tile the covered part of the ideal
    # plane without gaps: every bin well inside the detector has exactly its sector area
    params = _params(r_min_px=3.0, r_max_px=19.0, bc_y_px=28.4, bc_z_px=24.1, **extra)
    bm = build_binmap(params)
    np.testing.assert_allclose(bm.geometric_area, _sector_area(bm), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(bm.bin_area, bm.geometric_area)
    assert not bm.touches_mask.any()
    # and the total equals the annulus
    total = np.pi * (bm.r_edges_px[-1] ** 2 - bm.r_edges_px[0] ** 2)
    assert bm.geometric_area.sum() == pytest.approx(total, rel=1e-10)


def test_tilted_pixel_splits_sum_to_the_quadrilateral_area():
    # with tilt and distortion a pixel's pieces add up to the area of its mapped quadrilateral
    params = _params(ty_deg=20.0, tx_deg=5.0, p=(0.0,) * 5 + (0.2,) + (0.0,) * 9, rhod_um=8000.0)
    bm = build_binmap(params)
    z, y = np.mgrid[0:NZ, 0:NY].astype(np.float64)
    xs, ys = [], []
    for dy, dz in ((-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)):
        r, eta = pixel_to_r_eta(y + dy, z + dz, params)
        xs.append(-r * np.sin(np.deg2rad(eta)))
        ys.append(r * np.cos(np.deg2rad(eta)))
    quad = 0.5 * np.abs(sum(xs[k] * ys[k - 3] - ys[k] * xs[k - 3] for k in range(4)))
    assert np.ptp(quad) > 0.1  # tilt and distortion really change the projected pixel area
    np.testing.assert_allclose(_pixel_sums(bm), quad, rtol=1e-9)


def _quad_areas(params) -> np.ndarray:
    """Ideal-plane area of every pixel's mapped corner quadrilateral (shoelace), (nz, ny)."""
    z, y = np.mgrid[0:params.nr_pixels_z, 0:params.nr_pixels_y].astype(np.float64)
    xs, ys = [], []
    for dy, dz in ((-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)):
        r, eta = pixel_to_r_eta(y + dy, z + dz, params)
        xs.append(-r * np.sin(np.deg2rad(eta)))
        ys.append(r * np.cos(np.deg2rad(eta)))
    return 0.5 * np.abs(sum(xs[k] * ys[k - 3] - ys[k] * xs[k - 3] for k in range(4)))


@st.composite
def _geometries(draw):
    """Small detectors with the beam anywhere near them, tilts, a little distortion, and R/η
    binnings whose η bins tile one full turn (starting anywhere)."""
    ny, nz = draw(st.integers(4, 14)), draw(st.integers(4, 14))
    angle = st.floats(-4.0, 4.0)
    n_eta = draw(st.sampled_from([1, 2, 3, 5, 8, 12, 36, 72]))
    eta_min = draw(st.floats(-200.0, -160.0))
    p = [0.0] * 15
    p[0], p[2], p[6] = draw(st.floats(-2e-3, 2e-3)), draw(st.floats(-2e-3, 2e-3)), draw(st.floats(0, 90))
    return Params(nr_pixels_y=ny, nr_pixels_z=nz, px_um=200.0, lsd_um=draw(st.floats(1e5, 1e6)),
                  bc_y_px=draw(st.floats(-3.0, ny + 3.0)), bc_z_px=draw(st.floats(-3.0, nz + 3.0)),
                  tx_deg=draw(angle), ty_deg=draw(angle), tz_deg=draw(angle), p=tuple(p), rhod_um=4000.0,
                  r_min_px=0.0, r_max_px=2.0 * (ny + nz) + 10.0, r_bin_px=draw(st.floats(0.2, 3.0)),
                  eta_min_deg=eta_min, eta_max_deg=eta_min + 360.0, eta_bin_deg=360.0 / n_eta)


@settings(max_examples=40, deadline=None)
@given(params=_geometries())
@example(params=_params(nr_pixels_y=4, nr_pixels_z=4, bc_y_px=0.0, bc_z_px=0.5, r_min_px=0.0,
                        r_max_px=26.0, r_bin_px=1.0))  # the beam centre on a pixel edge (lost 22 %)
def test_split_areas_conserve_every_pixel_area(params):
    """Property: however the pixels are cut by the (R, η) bins, the pieces of every pixel add up
    to the area of its mapped quadrilateral (nothing lost at bin edges, the η seam or the beam
    centre; nothing counted twice), and the bins' areas add up to the detector's."""
    bm = build_binmap(params)
    quad = _quad_areas(params)
    np.testing.assert_allclose(_pixel_sums(bm), quad, rtol=1e-9, atol=1e-8)
    assert bm.geometric_area.sum() == pytest.approx(quad.sum(), rel=1e-9)


def test_mask_semantics():
    params = _params(r_min_px=2.0, r_max_px=30.0)
    mask = np.zeros((NZ, NY), dtype=bool)
    mask[10:14, 5:40] = True
    mask[30, 30] = True
    plain = build_binmap(params)
    masked = build_binmap(params, mask)
    cols = np.flatnonzero(mask.ravel())
    masked_area = np.asarray(plain.areas[:, cols].sum(axis=1)).reshape(plain.n_r, plain.n_eta)
    np.testing.assert_allclose(masked.geometric_area, plain.geometric_area, rtol=1e-12)
    np.testing.assert_allclose(masked.bin_area + masked_area, masked.geometric_area, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(masked.touches_mask, masked_area > 0)
    assert masked.touches_mask.any() and not masked.touches_mask.all()
    assert masked.weights[:, cols].nnz == 0 and masked.areas[:, cols].nnz == 0
    keep = np.flatnonzero(~mask.ravel())
    assert abs(masked.areas[:, keep] - plain.areas[:, keep]).max() == 0.0
    np.testing.assert_allclose(np.asarray(masked.areas.sum(axis=1)).ravel(), masked.bin_area.ravel())
    with pytest.raises(FrameError, match="mask"):
        build_binmap(params, mask[:, :-1])


def test_corrections_divide_the_area():
    params = _params(
        lsd_um=20_000.0, solid_angle_correction=True, polarization_correction=True,
        polarization_fraction=0.9,
    )
    bm = build_binmap(params)
    r_c, eta_c = pixel_map(params)
    tth = np.deg2rad(r_to_tth_deg(r_c, params)).ravel()
    corr = np.cos(tth) ** 3 * (1 - 0.9 * np.sin(tth) ** 2 * np.cos(np.deg2rad(eta_c.ravel())) ** 2)
    assert corr.min() < 0.85  # large angles, so the test means something
    expected = bm.areas @ sp.diags(1.0 / corr)
    assert abs(bm.weights - expected).max() < 1e-12
    assert (bm.weights.indices == bm.areas.indices).all()


@pytest.mark.parametrize("codes", [(1,), (2,), (1, 2), (3,), (3, 1)])
def test_im_trans_opt_permutes_columns(codes):
    n = 40  # square, so the transpose is allowed
    base = _params(nr_pixels_y=n, nr_pixels_z=n, bc_y_px=17.2, bc_z_px=23.9, tx_deg=1.0, ty_deg=-2.0, r_max_px=25.0)
    ref = build_binmap(base)
    flipped = build_binmap(base.with_overrides(im_trans_opt=codes))
    # raw pixel (y, z) of the transformed detector is pixel (y_t, z_t) of the reference
    z, y = np.mgrid[0:n, 0:n]
    for code in codes:
        y, z = {1: (n - 1 - y, z), 2: (y, n - 1 - z), 3: (z, y)}[code]
    perm = (z * n + y).ravel()
    assert not np.array_equal(perm, np.arange(n * n))
    assert abs(flipped.areas - ref.areas[:, perm]).max() < 1e-12
    np.testing.assert_allclose(flipped.geometric_area, ref.geometric_area, rtol=1e-12, atol=1e-12)


def test_cache_reuse_and_key(tmp_path, monkeypatch):
    params = _params(r_max_px=20.0)
    mask = np.zeros((NZ, NY), dtype=bool)
    first = load_or_build_binmap(params, mask, cache_dir=tmp_path)
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == [f"{first.key}.npz"]
    with np.load(files[0], allow_pickle=False) as f:  # data only, and its digest inside
        assert all(f[k].dtype != object for k in f.files) and len(str(f["digest"])) == 64
    mtime = files[0].stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt although a cached map exists")

    monkeypatch.setattr(binmap_mod, "build_binmap", fail)
    again = load_or_build_binmap(params, None, cache_dir=tmp_path)  # None == all-False mask
    assert again.key == first.key and files[0].stat().st_mtime_ns == mtime
    assert abs(again.weights - first.weights).max() == 0.0
    for name in ("bin_area", "geometric_area", "touches_mask", "r_edges_px", "eta_edges_deg"):
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name))
    assert again.detector_shape == first.detector_shape == (NZ, NY)
    monkeypatch.undo()

    p = list(params.p)
    p[7] = 1e-3
    changed = params.with_overrides(p=tuple(p))
    assert binmap_key(changed) != first.key
    mask[0, 0] = True
    assert binmap_key(params, mask) != first.key
    load_or_build_binmap(changed, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2


def test_cache_dir_from_env_and_corrupt_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MIDASFLOW_CACHE", str(tmp_path))
    params = _params(r_max_px=10.0)
    path = tmp_path / f"{binmap_key(params)}.npz"
    path.write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="unreadable"):
        bm = load_or_build_binmap(params)
    assert path.stat().st_size > 100 and bm.weights.nnz > 0
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_unusable_eta_binning_is_refused():
    with pytest.raises(ParameterError, match="EtaBinSize"):
        build_binmap(_params(eta_min_deg=-180.0, eta_max_deg=540.0, eta_bin_deg=720.0))
    with pytest.raises(ParameterError, match="EtaMin/EtaMax"):
        build_binmap(_params(eta_min_deg=-720.0, eta_max_deg=0.0))


def _tamper(path, change, *, redigest: bool) -> None:
    """Rewrite a cached map with ``change(arrays)`` applied, re-signing it when ``redigest``
    (a consistent-looking file that only the structural checks can catch)."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    change(arrays)
    if redigest:
        body = {k: arrays[k] for k in binmap_mod._ARRAYS}
        arrays["digest"] = np.array(binmap_mod._digest(str(arrays["key"]), body))
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _set(name, fn):
    def change(arrays):
        arrays[name] = fn(arrays[name])
    return change


def _poke(name, index, value):
    def fn(a):
        a = a.copy()
        a[index] = value
        return a
    return _set(name, fn)


_OBJECT = np.empty(1, dtype=object)
_OBJECT[0] = {"x": 1}


@pytest.mark.parametrize("change, redigest, reason", [
    (_poke("indices", 5, NZ * NY + 10), True, "pixel index outside"),
    (_poke("indices", 5, -3), True, "pixel index outside"),
    (_poke("indptr", 7, 10**6), True, "row pointers"),
    (_set("indptr", lambda a: a[::-1].copy()), True, "row pointers"),
    (_set("indices", lambda a: a.astype(np.float64)), True, "index dtype"),
    (_set("weights", lambda a: a[:-1]), True, "one per entry"),
    (_set("bin_area", lambda a: a.T.copy()), True, "bin_area"),
    (_set("areas", lambda a: -a), True, "areas >= 0"),
    (_set("weights", lambda a: 2 * a), False, "digest"),
    (_set("weights", lambda a: np.full_like(a, np.nan)), False, "digest"),
    (_set("r_edges_px", lambda a: a + 1.0), True, "bin edges"),
    (_set("detector_shape", lambda a: a[::-1].copy()), True, "detector_shape"),
    (_set("key", lambda a: np.array("0" * 64)), True, "key"),
    (_set("digest", lambda a: np.array(0.0)), False, "digest"),
    (_set("touches_mask", lambda a: _OBJECT), False, "unreadable"),
    (_set("effective_tth_deg", lambda a: a + 0.01), False, "digest"),
    (_set("effective_tth_deg", lambda a: np.full_like(a, np.nan)), True, "effective_tth_deg"),
    (_set("effective_tth_deg", lambda a: a[:, :1].copy()), True, "effective_tth_deg"),
], ids=["index-too-large", "index-negative", "indptr-overrun", "indptr-decreasing",
        "index-dtype", "short-data", "bin-area-shape", "negative-areas", "weights-x2",
        "weights-nan", "r-edges", "detector-shape", "key", "digest-type", "pickled-object",
        "effective-tth-shifted", "effective-tth-nan", "effective-tth-shape"])
def test_tampered_cache_is_rejected_and_rebuilt(tmp_path, change, redigest, reason):
    """Nothing in a cached map is trusted: each inconsistency is caught on load (one-line
    warning naming the file and the reason), the map is rebuilt and the file replaced."""
    params = _params(r_max_px=20.0, solid_angle_correction=True)
    good = load_or_build_binmap(params, cache_dir=tmp_path)
    path = tmp_path / f"{good.key}.npz"
    _tamper(path, change, redigest=redigest)
    with pytest.warns(UserWarning, match=reason) as record:
        again = load_or_build_binmap(params, cache_dir=tmp_path)
    assert str(path) in str(record[0].message) and "\n" not in str(record[0].message)
    assert abs(again.weights - good.weights).max() == 0.0
    np.testing.assert_array_equal(again.bin_area, good.bin_area)
    np.testing.assert_array_equal(again.effective_tth_deg, good.effective_tth_deg)
    import warnings

    with warnings.catch_warnings():  # the rebuilt file is valid again
        warnings.simplefilter("error")
        load_or_build_binmap(params, cache_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_kernel_refuses_an_inconsistent_map():
    """A BinMap built in memory is checked before the kernels use it: out-of-range or negative
    pixel indices give a one-line ParameterError, never an out-of-bounds access."""
    from midasflow.caking_kernel import cake_block

    good = build_binmap(_params(r_max_px=20.0))
    frames = np.ones((2, NZ, NY), dtype=np.float32)
    for bad_index in (NZ * NY + 7, -1):
        indices = good.weights.indices.copy()
        indices[3] = bad_index
        W = sp.csr_matrix((good.weights.data, indices, good.weights.indptr), shape=good.weights.shape)
        bad = dataclasses.replace(good, weights=W, areas=W.copy())
        with pytest.raises(ParameterError, match="pixel index outside") as info:
            cake_block(frames, bad)
        assert "\n" not in str(info.value)
    doubled = dataclasses.replace(good, bin_area=good.bin_area * 2)
    with pytest.raises(ParameterError, match="bin_area"):
        cake_block(frames, doubled)


def test_cached_binmap_loads_by_digest_and_refuses_a_different_file(tmp_path):
    """The caking graph's map task: the live map of that digest, else the checked cache file;
    a missing file or other content is a one-line error, never a different map."""
    import gc

    from midasflow.binmap import cached_binmap
    from midasflow.errors import MidasflowError

    params = _params(r_max_px=20.0)
    bm = load_or_build_binmap(params, cache_dir=tmp_path)
    assert cached_binmap(bm.cache_file, bm.key, bm.digest) is bm  # alive here: no reload
    key, digest, path = bm.key, bm.digest, bm.cache_file
    del bm
    gc.collect()
    again = cached_binmap(path, key, digest)  # read from the file, checked
    assert again.digest == digest and again.cache_file == path
    del again
    gc.collect()
    with pytest.raises(MidasflowError, match="differs from the map the task graph") as info:
        cached_binmap(path, key, "0" * 64)
    assert "\n" not in str(info.value)
    with pytest.raises(MidasflowError, match="must be the same for every Dask worker"):
        cached_binmap(str(tmp_path / "gone.npz"), key, digest)


@settings(max_examples=200, deadline=None)
@given(edges=st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=12, unique=True),
       picks=st.lists(st.integers(0, 11), max_size=4),
       others=st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=4))
def test_bin_span_is_numpys_searchsorted(edges, picks, others):
    """binmap._bin_span (numba's own searchsorted costs ~2 s of compiling) finds numpy's
    searchsorted positions (right side of the low bound, left side of the high one), on the
    edges themselves, between them, outside, at ±inf and NaN."""
    from midasflow.binmap import _bin_span

    a = np.sort(np.asarray(edges, dtype=np.float64))
    xs = [a[i % a.size] for i in picks] + list(others) + [a[0] - 1.0, a[-1] + 1.0]
    for lo in xs:
        for hi in xs:
            assert _bin_span(a, lo, hi) == (np.searchsorted(a, lo, side="right") - 1,
                                            np.searchsorted(a, hi, side="left") - 1)


def test_entry_buffers_resumed_when_full(monkeypatch):
    """The map is the same when every band's entry buffer fills up again and again (a first
    guess of 0.01 entries per pixel; the beam centre's pixel alone has more candidates than a
    band's first buffer holds) as with buffers that never fill."""
    params = Params(nr_pixels_y=40, nr_pixels_z=1100, bc_y_px=20.0, bc_z_px=550.0,
                    r_min_px=0.0, r_max_px=30.0, r_bin_px=0.25, eta_bin_deg=0.25)
    mask = np.zeros((1100, 40), dtype=bool)
    mask[540:545, 10:14] = True
    whole = build_binmap(params, mask)
    calls = []
    real = binmap_mod._split_pixels

    def counted(*args):
        done = real(*args)
        calls.append((args[0], *done))
        return done

    monkeypatch.setattr(binmap_mod, "_ENTRIES_PER_PIXEL", 0.01)
    monkeypatch.setattr(binmap_mod, "_split_pixels", counted)
    pieces = build_binmap(params, mask)
    assert len(calls) > 2 * 16  # 16 bands of rows; buffers filled up and were continued
    assert any(stop == start for start, stop, _ in calls)  # one pixel overflowed a new buffer
    for name in ("weights", "areas"):
        a, b = getattr(whole, name), getattr(pieces, name)
        assert a.nnz > 20_000
        for part in ("indptr", "indices", "data"):
            np.testing.assert_array_equal(getattr(a, part), getattr(b, part))
    for name in ("bin_area", "geometric_area", "touches_mask"):
        np.testing.assert_array_equal(getattr(whole, name), getattr(pieces, name))
    assert whole.touches_mask.any()
