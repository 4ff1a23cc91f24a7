"""The 2θ each cake bin samples (``BinMap.effective_tth_deg``, docs/caking_2theta.md).

Checked against a brute-force computation that shares nothing with the map but the geometry
function: every pixel near a bin is cut into 160 × 160 points, each point's (R, η) decides
which bin it falls in, a pixel's fragment in a bin is its area times the fraction of its points
in the bin, and a pixel's mean 2θ is the mean over all its points."""
from __future__ import annotations

import numpy as np
import pytest

from midasflow.binmap import build_binmap, load_or_build_binmap
from midasflow.geometry import pixel_to_r_eta, r_to_tth_deg, raw_to_transformed, tth_to_r_px
from midasflow.simulate import ceo2_params

SHAPE = (192, 192)
#: A module gap (rows 60..66) and a masked block, both cutting through rings.
GAP_ROWS = (60, 67)
BLOCK = (120, 150, 30, 41)  # z0, z1, y0, y1


def _mask() -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[GAP_ROWS[0]:GAP_ROWS[1], :] = True
    z0, z1, y0, y1 = BLOCK
    mask[z0:z1, y0:y1] = True
    return mask


def _pixel_area_px2(params, z: int, y: int) -> float:
    """Ideal-plane area of raw pixel (y, z): shoelace over its four mapped corners."""
    cy = np.array([y - 0.5, y + 0.5, y + 0.5, y - 0.5])
    cz = np.array([z - 0.5, z - 0.5, z + 0.5, z + 0.5])
    r, eta = pixel_to_r_eta(*raw_to_transformed(cy, cz, params), params)
    x, yy = -r * np.sin(np.deg2rad(eta)), r * np.cos(np.deg2rad(eta))
    return 0.5 * abs(np.dot(x, np.roll(yy, -1)) - np.dot(yy, np.roll(x, -1)))


def _brute_force_tth(params, mask, k: int, e: int, n_sub: int = 160) -> float:
    """Effective 2θ (deg) of bin (k, e): Σ fragment area · pixel mean 2θ / Σ fragment area over
    the unmasked pixels, fragments from n_sub² points per pixel."""
    r_edges, eta_edges = params.r_edges_px(), params.eta_edges_deg()
    nz, ny = mask.shape
    zz, yy = np.mgrid[0:nz, 0:ny].astype(float)
    r_c, eta_c = pixel_to_r_eta(*raw_to_transformed(yy, zz, params), params)
    # candidates: pixel centres within 1.5 px of the bin (a pixel reaches ≤ 0.71 px from its centre)
    d_eta = np.abs((eta_c - 0.5 * (eta_edges[e] + eta_edges[e + 1]) + 180.0) % 360.0 - 180.0)
    near = ((r_c > r_edges[k] - 1.5) & (r_c < r_edges[k + 1] + 1.5)
            & (np.deg2rad(d_eta - 0.5 * (eta_edges[e + 1] - eta_edges[e])) * r_c < 1.5)
            & ~mask)
    sub = (np.arange(n_sub) + 0.5) / n_sub - 0.5
    dz, dy = np.meshgrid(sub, sub, indexing="ij")
    num = den = 0.0
    for z, y in zip(*np.nonzero(near)):
        r, eta = pixel_to_r_eta(*raw_to_transformed(y + dy, z + dz, params), params)
        inside = ((r >= r_edges[k]) & (r < r_edges[k + 1])
                  & (eta >= eta_edges[e]) & (eta < eta_edges[e + 1]))
        if not inside.any():
            continue
        fragment = _pixel_area_px2(params, z, y) * inside.mean()
        num += fragment * r_to_tth_deg(r, params).mean()
        den += fragment
    return num / den


def test_cut_bins_sample_their_fragments_mean_2theta(tmp_path):
    """(a) Bins cut by a module gap, a masked block and the detector edge: the map's effective
    2θ is the fragment-area-weighted mean of the pixels' mean 2θ, as brute force computes it,
    and far from the bin centre's; the cache carries the same values."""
    params = ceo2_params(SHAPE, r_bin_px=1.0, eta_bin_deg=10.0, r_max_px=120.0)  # past the edge
    mask = _mask()
    bm = build_binmap(params, mask)
    free = build_binmap(params)
    r_c = 0.5 * (bm.r_edges_px[1:] + bm.r_edges_px[:-1])
    centre = r_to_tth_deg(r_c, params)[:, None]
    # bins the mask or the detector edge cut to between 15 % and 85 % of their area
    share = bm.bin_area / np.where(free.bin_area > 0, free.bin_area, np.inf)
    edge = bm.geometric_area / (np.deg2rad(10.0) * r_c[:, None] * 1.0)  # vs the full sector
    by_mask = np.argwhere((share > 0.15) & (share < 0.85) & (edge > 0.999))
    by_edge = np.argwhere((edge > 0.15) & (edge < 0.85) & (share > 0.999))
    rng = np.random.default_rng(3)
    picks = [*by_mask[rng.choice(len(by_mask), size=4, replace=False)],
             *by_edge[rng.choice(len(by_edge), size=3, replace=False)]]
    px_deg = float(r_to_tth_deg(r_c[-1] + 0.5, params) - r_to_tth_deg(r_c[-1] - 0.5, params))
    shifts = []
    for k, e in picks:
        expected = _brute_force_tth(params, mask, int(k), int(e))
        assert bm.effective_tth_deg[k, e] == pytest.approx(expected, abs=2e-4 * px_deg), (k, e)
        shifts.append(abs(expected - centre[k, 0]) / px_deg)
    assert max(shifts) > 0.1  # the cut bins sample well away from their centres (in px)
    # an uncut bin agrees as well (the pixel-extent term only)
    k, e = 40, 3
    assert free.touches_mask[k, e] == bm.touches_mask[k, e] == False  # noqa: E712
    assert bm.effective_tth_deg[k, e] == pytest.approx(_brute_force_tth(params, mask, k, e),
                                                       abs=2e-4 * px_deg)
    # masked bins: NaN where nothing is collected
    assert np.isnan(bm.effective_tth_deg[bm.bin_area == 0]).all()
    assert np.isfinite(bm.effective_tth_deg[bm.bin_area > 0]).all()
    cached = load_or_build_binmap(params, mask, cache_dir=tmp_path)
    again = load_or_build_binmap(params, mask, cache_dir=tmp_path)
    assert again.digest == cached.digest
    np.testing.assert_array_equal(again.effective_tth_deg, bm.effective_tth_deg)


@pytest.mark.parametrize("r_bin_px", [1.0, 2.0])
def test_annulus_samples_its_mean_radius(r_bin_px):
    """(b) On a whole, unmasked annulus of R bins w px wide the bins sample
    R_c + (w² + 1)/(12 R_c) px on average (w²/12 from the bin's width, 1/12 from the pixel's own
    extent; the leading term of the mean of R over the annulus and over each pixel). The formula
    neglects O(R⁻³) terms and the curvature of 2θ(R), ~5 % of it at these radii."""
    params = ceo2_params(SHAPE, r_bin_px=r_bin_px, eta_bin_deg=30.0)
    bm = build_binmap(params)
    r_c = 0.5 * (bm.r_edges_px[1:] + bm.r_edges_px[:-1])
    whole = bm.geometric_area.sum(axis=1) > 0.999 * np.pi * (
        bm.r_edges_px[1:] ** 2 - bm.r_edges_px[:-1] ** 2)
    assert whole.sum() > 20
    tth = (bm.effective_tth_deg * bm.bin_area).sum(axis=1) / bm.bin_area.sum(axis=1)
    shift_px = tth_to_r_px(tth, params) - r_c
    predicted = (r_bin_px ** 2 + 1.0) / (12.0 * r_c)
    np.testing.assert_allclose(shift_px[whole], predicted[whole], rtol=0.1, atol=1e-4)


@pytest.fixture(scope="module")
def noise_free_ceo2(tmp_path_factory):
    """One noise-free frame of the engine's CeO2 pattern on the 192-px detector (rings at
    R = 26–90 px, 2-px FWHM), 8 × 8 sub-pixels per pixel, and its CIF."""
    import xarray as xr

    from midasflow.crystal import cubic_phase, write_phase_cif
    from midasflow.simulate import CEO2_A_A, simulate_frames

    phase = cubic_phase("CeO2", CEO2_A_A)
    cif = write_phase_cif(phase, tmp_path_factory.mktemp("cif") / "CeO2.cif")
    params = ceo2_params(SHAPE, r_bin_px=1.0, eta_bin_deg=45.0, omega_sum_frames=1)
    frames, _ = simulate_frames(params, phase, n_frames=1, background=50.0, counts=2000.0,
                                supersample=8, dtype=np.float64)
    frames = xr.DataArray(frames, dims=("frame", "z", "y"),
                          coords={"frame": [0], "omega": ("frame", [0.0])})
    return params, phase, cif, frames


@pytest.mark.slow
def test_refined_cell_is_unbiased_on_the_effective_axis(noise_free_ceo2, tmp_path):
    """(c) End to end: noise-free frames, caked, every lineout refined with the FCJ asymmetry
    held at its true value (so the cell alone answers for a ring shift). On bin centres every
    lineout's a is off by +28 to +60 ppm (the rings sampled (w² + 1)/(12 R) px outside their
    centres); on the effective axis the median is within 2 ppm. With the default recipe a
    lineout's a changes by less than its esd between R bins of 0.25 and 0.5 px, and the
    results say which axis they used."""
    import json

    from midasflow import pipeline
    from midasflow.caking import cake
    from midasflow.io.instprm import instrument_from_midas
    from midasflow.refinement.engine import refine_pattern
    from midasflow.refinement.lineouts import plan_lineouts
    from midasflow.refinement.recipe import Stage
    from midasflow.simulate import CEO2_A_A

    base, phase, cif, frames = noise_free_ceo2
    stages = [Stage("background", tuple(f"Back;{i}" for i in range(6)) + ("Scale",), 3),
              Stage("cell", ("0::A0",)), Stage("profile_gauss", ("U", "V", "W")),
              Stage("profile_lorentz", ("X", "Y"))]  # SH/L stays at the simulated 0.002
    default = {}
    for r_bin_px in (0.5, 0.25):
        params = base.with_overrides(r_bin_px=r_bin_px)
        caked = cake(frames, params, binmap=build_binmap(params)).compute()
        instrument = instrument_from_midas(caked)
        bias_ppm = {}
        for axis, ds in (("effective", caked), ("bin_centre", caked.drop_vars("effective_tth_deg"))):
            ppm = [(refine_pattern(s.tth_deg, s.intensity, s.sigma, [phase], instrument, stages=stages,
                                   precision="float64").cells["CeO2"][0] / CEO2_A_A - 1) * 1e6
                   for s in plan_lineouts(ds) if not s.skipped]
            assert len(ppm) == 8
            bias_ppm[axis] = np.median(ppm)
        print(f"R bins {r_bin_px} px: median a - a_true {bias_ppm} ppm")
        assert bias_ppm["bin_centre"] > 20.0
        assert abs(bias_ppm["effective"]) < 2.0
        res = pipeline.refine(caked, [cif], out=tmp_path / f"w{r_bin_px}", export=False,
                              report=False, refine_atoms=False, precision="float64")
        assert (res.status.values == "ok").all() and res.attrs["tth_axis"] == "effective"
        summary = json.loads((tmp_path / f"w{r_bin_px}" / "refinement_summary.json").read_text())
        assert summary["tth_axis"] == "effective"
        default[r_bin_px] = res.a_a.values[0], res.a_a_esd.values[0]
    change = np.abs(default[0.25][0] - default[0.5][0])
    assert (change < np.minimum(default[0.25][1], default[0.5][1])).all(), change
    old = pipeline.refine(caked.drop_vars("effective_tth_deg"), [cif], out=tmp_path / "old",
                          export=False, report=False, refine_atoms=False, precision="float64")
    assert old.attrs["tth_axis"] == "bin_centre"


def _flagged_and_masked_scans(tmp_path, dark: bool):
    """The same scan twice: its gaps flagged −1 in the frames (or in the dark) with no mask
    file, and the gaps' pixels 0 with a mask file of them."""
    from midasflow.simulate import write_scan

    params = ceo2_params(SHAPE, r_bin_px=1.0, eta_bin_deg=10.0)
    mask = _mask()
    rng = np.random.default_rng(7)
    frames = rng.integers(50, 500, size=(2, *SHAPE)).astype(np.int32)
    darks = rng.integers(0, 5, size=(2, *SHAPE)).astype(np.int32) if dark else None
    (darks if dark else frames)[..., mask] = -1  # flagged in every frame, or in the dark only
    flagged = write_scan(tmp_path / "flags", params, frames, darks)
    masked = write_scan(tmp_path / "mask", params, np.where(frames < 0, 0, frames).astype(np.int32),
                        None if darks is None else np.where(darks < 0, 0, darks).astype(np.int32), mask=mask)
    return params, flagged, masked


@pytest.mark.parametrize("dark", [False, True])
def test_detector_flags_in_the_frames_move_the_axis_as_a_mask_does(tmp_path, dark):
    """Pilatus gaps flagged −1 in the frames (or in the dark) and no mask file: the cake's
    effective 2θ is the one a mask of those pixels gives (the bins they cut sample their other
    pixels), the values are the same, and bins no flag touches keep the map's value; through
    ``integrate``, the public composition ``open_frames -> cake`` and ``cake`` of the same
    frames as a numpy array (flags: the first frame's NaN pixels)."""
    import xarray as xr

    from midasflow import pipeline
    from midasflow.caking import cake
    from midasflow.io.frames import open_frames

    params, flagged, masked = _flagged_and_masked_scans(tmp_path, dark)
    cache = tmp_path / "cache"
    by_mask = pipeline.integrate_dataset(masked.data, masked.params, cache_dir=cache)  # HDF5: the dark is
    frames = open_frames(flagged.data, flagged.params)                                # exchange/dark
    in_memory = xr.DataArray(frames.values, dims=frames.dims)
    static = load_or_build_binmap(params, None, cache)
    tth_mask = by_mask.effective_tth_deg.values
    collected = np.isfinite(tth_mask)
    cut = collected & (np.abs(static.effective_tth_deg - tth_mask) > 1e-3)  # bins the gaps move by > 0.001°
    assert cut.sum() >= 20
    untouched = np.isclose(by_mask.bin_area.values, static.bin_area)
    for way, by_flags in (("integrate", pipeline.integrate_dataset(flagged.data, flagged.params, cache_dir=cache)),
                          ("open_frames -> cake", cake(frames, flagged.params, cache_dir=cache)),
                          ("numpy frames", cake(in_memory, flagged.params, cache_dir=cache))):
        tth_flags = by_flags.effective_tth_deg.values
        np.testing.assert_allclose(tth_flags[collected], tth_mask[collected], rtol=0, atol=1e-9, err_msg=way)
        np.testing.assert_array_equal(tth_flags[untouched], static.effective_tth_deg[untouched], err_msg=way)
        intensity = by_flags.intensity.values
        np.testing.assert_array_equal(np.isnan(intensity), np.isnan(by_mask.intensity.values), err_msg=way)
        np.testing.assert_allclose(intensity, by_mask.intensity.values, rtol=1e-6, equal_nan=True, err_msg=way)


def test_following_flags_reads_the_dark_once_and_keeps_the_pixel_2theta_with_the_map(tmp_path, monkeypatch):
    """``open_frames -> cake`` of a scan with flags computes the dark once for the flags and
    the cakes, and the pixels' mean 2θ once per map: cached beside the map's file and read
    back (checked) by the next process; a tampered file is refused, with a warning, and
    recomputed; parameters of another geometry are refused."""
    import midasflow.binmap as binmap_module
    import midasflow.io.frames as frames_module
    from midasflow.caking import cake
    from midasflow.io.frames import open_frames

    params, flagged, masked = _flagged_and_masked_scans(tmp_path, dark=True)
    cache = tmp_path / "cache"
    binmap = load_or_build_binmap(params, None, cache)  # its build computes the pixel means too
    darks, pixel_means = [], []
    real_mean, real_pixels = frames_module._mean_frames, binmap_module.pixel_mean_tth_deg
    monkeypatch.setattr(frames_module, "_mean_frames", lambda *a: darks.append(1) or real_mean(*a))
    monkeypatch.setattr(binmap_module, "pixel_mean_tth_deg", lambda *a: pixel_means.append(1) or real_pixels(*a))
    ds = cake(open_frames(flagged.data, flagged.params), flagged.params, cache_dir=cache)
    ds.compute()
    assert darks == [1] and pixel_means == [1]
    cached = cache / f"{binmap.key}.pixel-tth.npz"
    assert cached.is_file()
    binmap_module._PIXEL_TTH.clear()  # as in another process: from the file
    again = cake(open_frames(flagged.data, flagged.params), flagged.params, cache_dir=cache)
    assert pixel_means == [1]
    np.testing.assert_array_equal(again.effective_tth_deg.values, ds.effective_tth_deg.values)

    with np.load(cached) as f:
        members = {k: f[k] for k in f.files}
    members["pixel_tth_deg"] = members["pixel_tth_deg"] + 1e-6  # a consistent digest, other values
    members["digest"] = np.array(binmap_module._pixel_tth_digest(binmap.key, members["pixel_tth_deg"]))
    np.savez(cached, **members)
    binmap_module._PIXEL_TTH.clear()
    with pytest.warns(UserWarning, match="cached pixel 2θ rejected, its values do not give the map's"):
        tampered = cake(open_frames(flagged.data, flagged.params), flagged.params, cache_dir=cache)
    assert pixel_means == [1, 1]
    np.testing.assert_array_equal(tampered.effective_tth_deg.values, ds.effective_tth_deg.values)
    binmap_module._PIXEL_TTH.clear()
    with pytest.raises(ValueError, match="not the bin map's geometry"):
        binmap_module.cached_pixel_mean_tth_deg(build_binmap(params), params.with_overrides(lsd_um=params.lsd_um * 1.01))
