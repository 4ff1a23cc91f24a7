"""Simulator: rings where the geometry puts them, strain shifts as nᵀεn predicts, seeds reproduce."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import curve_fit

from midasflow.geometry import pixel_map, r_to_tth_deg
from midasflow.io.frames import open_frames, read_mask
from midasflow.simulate import (
    CEO2_A_A,
    ceo2_params,
    cubic_rings,
    module_gaps,
    ring_tth_deg,
    simulate_ceo2_scan,
    simulate_frames,
    write_scan,
)

SHAPE = (160, 192)  # (nz, ny)


def _params(**kw):
    # tilted, distorted, flipped detector: every part of the geometry takes part
    return ceo2_params(SHAPE, im_trans_opt=(1, 2), **kw)


def _fit_ring(frame, params, eta0_deg, tth_guess_deg, fwhm_deg, half_width_deg=0.8):
    """Centre (2θ, deg) of a Gaussian + constant fitted to the pixels of a thin η wedge."""
    r, eta = pixel_map(params)
    tth = r_to_tth_deg(r, params)
    d_eta = (eta - eta0_deg + 180.0) % 360.0 - 180.0
    sel = (np.abs(d_eta) < half_width_deg) & (np.abs(tth - tth_guess_deg) < 3 * fwhm_deg)

    def model(x, amp, centre, sigma, base):
        return base + amp * np.exp(-0.5 * ((x - centre) / sigma) ** 2)

    popt, _ = curve_fit(model, tth[sel], frame[sel].astype(float),
                        p0=(frame[sel].max(), tth_guess_deg, fwhm_deg / 2.355, 0.0))
    return popt[1]


def _px_in_deg(params):
    return float(np.rad2deg(np.arctan(params.px_um / params.lsd_um)))


def test_unstrained_ring_maximum_at_true_tth():
    params = _params()
    fwhm = 3 * _px_in_deg(params)
    rings = cubic_rings(CEO2_A_A, [[1, 1, 1], [3, 1, 1], [4, 2, 0]])
    frames, truth = simulate_frames(params, rings, fwhm_deg=fwhm, background=20.0, supersample=4)
    true_tth = np.rad2deg(2 * np.arcsin(params.wavelength_a / (2 * CEO2_A_A / np.sqrt([3, 11, 20]))))
    np.testing.assert_allclose(truth["tth0_deg"], true_tth, rtol=1e-12)
    for k in range(3):
        for eta0 in (-135.0, -40.0, 10.0, 95.0, 170.0):
            centre = _fit_ring(frames[0], params, eta0, true_tth[k], fwhm)
            assert abs(centre - true_tth[k]) < 0.01 * _px_in_deg(params), (k, eta0, centre - true_tth[k])


def _strain_n_reference(tth_deg, eta_deg, omega_deg, eps):
    """ε_n written out as in docs/reference/strain_geometry.md §3, with n_sample = Rz(ω)ᵀ n_lab."""
    th, et, om = np.deg2rad(tth_deg) / 2, np.deg2rad(eta_deg), np.deg2rad(omega_deg)
    n_lab = np.array([-np.sin(th), -np.cos(th) * np.sin(et), np.cos(th) * np.cos(et)])
    rz = np.array([[np.cos(om), -np.sin(om), 0], [np.sin(om), np.cos(om), 0], [0, 0, 1]])
    n_s = rz.T @ n_lab
    return n_s @ eps @ n_s


def test_ring_tth_truth_matches_strain_reference():
    eps = np.array([[1e-3, 2e-4, -3e-4], [2e-4, -6e-4, 4e-4], [-3e-4, 4e-4, 8e-4]])
    d0 = np.array([3.1244, 1.6317])
    eta = np.array([-170.0, -60.0, 0.0, 45.0, 120.0])
    got = ring_tth_deg(d0, 0.172979, eta, omega_deg=37.0, strain_tensor=eps)
    for i, d in enumerate(d0):
        for j, e in enumerate(eta):
            d_strained = d * (1 + _strain_n_reference(got[i, j], e, 37.0, eps))
            assert got[i, j] == pytest.approx(np.rad2deg(2 * np.arcsin(0.172979 / (2 * d_strained))), abs=1e-10)


def test_strained_rings_shift_as_predicted():
    eps = np.array([[4e-4, 0, 1e-3], [0, 2.5e-3, -1e-3], [1e-3, -1e-3, -2e-3]])
    params = _params(omega_start_deg=0.0, omega_step_deg=60.0)
    fwhm = 3 * _px_in_deg(params)
    rings = cubic_rings(CEO2_A_A, [[2, 2, 0], [4, 2, 0]])
    frames, truth = simulate_frames(params, rings, n_frames=2, strain_tensor=eps, fwhm_deg=fwhm, supersample=4)
    tth0 = truth["tth0_deg"]
    shifts = []
    for f, omega in enumerate((0.0, 60.0)):
        for k in range(2):
            for eta0 in (-150.0, -90.0, 0.0, 30.0, 90.0):
                measured = _fit_ring(frames[f], params, eta0, tth0[k], fwhm)
                # independent prediction: d = d0 (1 + ε_n) at the unstrained θ
                d = CEO2_A_A / np.sqrt([8, 20][k]) * (1 + _strain_n_reference(tth0[k], eta0, omega, eps))
                predicted = np.rad2deg(2 * np.arcsin(params.wavelength_a / (2 * d)))
                shifts.append((measured - tth0[k], predicted - tth0[k]))
    measured, predicted = np.array(shifts).T
    assert np.abs(predicted).max() > 0.1 * _px_in_deg(params)  # shifts of up to ~0.17 px
    np.testing.assert_allclose(measured, predicted, atol=0.01 * _px_in_deg(params))


def test_raw_orientation_matches_pixel_map():
    # supersample 1: each pixel value is the profile at its centre's 2θ from geometry.pixel_map
    params = ceo2_params((96, 96), im_trans_opt=(3, 1))
    fwhm = 4 * _px_in_deg(params)
    rings = cubic_rings(CEO2_A_A, [[1, 1, 1], [2, 2, 0]])
    frames, truth = simulate_frames(params, rings, fwhm_deg=fwhm, background=5.0, counts=100.0, supersample=1)
    tth = r_to_tth_deg(pixel_map(params)[0], params)
    expected = 5.0 + 100.0 * sum(a * np.exp(-4 * np.log(2) * ((tth - t0) / fwhm) ** 2)
                                 for a, t0 in zip(truth["intensity"], truth["tth0_deg"]))
    np.testing.assert_allclose(frames[0], expected, rtol=1e-3, atol=1e-3)


def test_phase_rings_are_the_engine_model_with_the_parameter_file_instrument():
    # supersample 1: each pixel is the engine's y_calc (no background) at its centre's 2θ, scaled
    from midasflow.crystal import cubic_phase, reflections
    from midasflow.profile import lorentz_polarization
    from midasflow.refinement.engine import PatternModel

    params = ceo2_params((96, 96))
    phase = cubic_phase("CeO2", CEO2_A_A)
    frames, truth = simulate_frames(params, phase, background=5.0, counts=100.0, supersample=1,
                                    dtype=np.float64)
    assert truth["profile"] == "gsas2-cw"
    for key in ("Lam", "Polariz.", "SH/L", "U", "V", "W", "X", "Y", "Z"):
        assert truth["instrument"][key] == params.instrument.to_midas()[key], key
    assert truth["instrument"]["W"] > 0 and truth["instrument"]["X"] > 0 and truth["instrument"]["SH/L"] == 0.002

    tth = r_to_tth_deg(pixel_map(params)[0], params).ravel()
    order = np.argsort(tth)
    model = PatternModel(tth[order], (tth.min(), tth.max()), [phase], truth["instrument"], bkg_terms=1)
    y, bkg, _ = model.evaluate(model.values)
    engine = np.empty_like(tth)
    engine[order] = y - bkg
    net = frames[0].ravel() - 5.0
    scale = (net @ engine) / (engine @ engine)
    assert np.abs(net - scale * engine).max() < 2e-3 * net.max()
    assert net.max() > 50.0  # rings are really there

    # integrated intensities ∝ M·LP·|F|² (Lorentz–polarisation included), independent of the engine
    refl = reflections(phase, params.wavelength_a, 10.0)
    n = len(refl.mult)
    np.testing.assert_allclose(truth["tth0_deg"][:n], refl.tth_deg, rtol=1e-9)
    weight = refl.mult * refl.fsq * lorentz_polarization(refl.tth_deg, 0.99, 0.0)
    np.testing.assert_allclose(truth["intensity"][:n] / truth["intensity"][0], weight / weight[0], rtol=1e-6)


def test_noise_seed_flags_and_omega_factor():
    params = _params(omega_start_deg=10.0, omega_step_deg=5.0)
    rings = cubic_rings(CEO2_A_A, [[1, 1, 1]])
    gaps = module_gaps(SHAPE, module_px=(40, 60), gap_px=(3, 2))
    assert (40, 43, 0, SHAPE[1]) in gaps and (0, SHAPE[0], 60, 62) in gaps
    kw = dict(n_frames=2, background=30.0, counts=500.0, dark_offset=100.0, masked_regions=gaps,
              omega_factor=lambda w: 1.0 + (w - 10.0) / 5.0, supersample=2)
    a, truth = simulate_frames(params, rings, poisson=True, seed=7, dtype=np.int32, **kw)
    b, _ = simulate_frames(params, rings, poisson=True, seed=7, dtype=np.int32, **kw)
    c, _ = simulate_frames(params, rings, poisson=True, seed=8, dtype=np.int32, **kw)
    clean, _ = simulate_frames(params, rings, **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.int32
    flagged = truth["flagged"]
    assert np.all(a[:, flagged] == -1) and np.all(clean[:, flagged] == -1)
    assert flagged.sum() == sum((z1 - z0) * (y1 - y0) for z0, z1, y0, y1 in gaps) - 9 * 3 * 2  # 3×3 crossings
    residual = (a - clean)[:, ~flagged]
    assert abs(residual.mean()) < 0.5 and residual.std() == pytest.approx(np.sqrt(clean[:, ~flagged]).mean(), rel=0.1)
    np.testing.assert_allclose(truth["omega_deg"], [10.0, 15.0])
    # ring intensity doubles on frame 1, the background does not
    ring0, ring1 = clean[0][~flagged] - 130.0, clean[1][~flagged] - 130.0
    np.testing.assert_allclose(ring1, 2 * ring0, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="does not fit the unsigned dtype"):
        simulate_frames(params, rings, masked_regions=gaps, dtype=np.uint16)


@pytest.mark.parametrize("fmt,compression", [("h5", "bitshuffle"), ("h5", "blosc"), ("ge", None), ("tif", None)])
def test_write_scan_round_trips_through_open_frames(tmp_path, fmt, compression):
    params = _params()
    rings = cubic_rings(CEO2_A_A, [[1, 1, 1], [2, 0, 0]])
    frames, _ = simulate_frames(params, rings, n_frames=3, background=10, dark_offset=40, poisson=True,
                                seed=3, supersample=1, dtype=np.uint16)
    dark = np.full((2, *SHAPE), 40, np.uint16)
    files = write_scan(tmp_path, params, frames, dark, fmt=fmt, compression=compression)
    assert files.params.nr_pixels_y == SHAPE[1] and files.params.lsd_um == params.lsd_um
    opened = open_frames(files.data, files.params)
    np.testing.assert_array_equal(opened.values, frames.astype(np.float32) - 40)


def test_ceo2_scan_end_to_end(tmp_path):
    eps = np.diag([0.0, 1e-3, -5e-4])
    files, truth = simulate_ceo2_scan(tmp_path, n_frames=2, shape=(128, 128), strain_tensor=eps, seed=11, gaps=True)
    assert truth["a0_a"] == CEO2_A_A and truth["phase"] == "CeO2"
    # the instrument terms of the rings are in the parameter file, as a calibration would put them
    for key, value in truth["instrument"].items():
        if key in files.params.instrument.to_midas():
            assert files.params.instrument.to_midas()[key] == pytest.approx(value, rel=1e-12), key
    np.testing.assert_array_equal(truth["strain_tensor"], eps)
    assert truth["ring_tth_deg"].shape == (2, truth["d0_a"].size, 360)
    assert truth["hkl"][0].tolist() == [1, 1, 1]
    mask = read_mask(str(files.mask), (128, 128))
    np.testing.assert_array_equal(mask, truth["flagged"])
    assert mask.any()
    frames = open_frames(files.data, files.params)
    values = frames.values
    assert np.isnan(values[:, mask]).all() and not np.isnan(values[:, ~mask]).any()
    # dark (mean of 2 Poisson frames around 100) removed: the background level remains
    far = values[:, ~mask]
    assert np.median(far) > truth["background"] - 5
    files2, _ = simulate_ceo2_scan(tmp_path / "again", n_frames=2, shape=(128, 128), strain_tensor=eps,
                                        seed=11, gaps=True)
    np.testing.assert_array_equal(open_frames(files2.data, files2.params).values, values)


@pytest.mark.slow
def test_textured_frames_carry_the_pole_density_at_each_pixel():
    """With a fibre texture (axis tilted 45° towards the beam, so ω turns it) each pixel of an isolated ring is
    the untextured pixel times the pole density at that pixel's own sample direction
    Rz(ω)ᵀ n(θ_k, η), worked out here per pixel from the geometry, not from the simulator's table."""
    from midasflow.crystal import cubic_phase
    from midasflow.texture.fiber import FiberTexture
    from midasflow.texture.polefigure import sample_directions

    params = ceo2_params((384, 384), omega_step_deg=90.0)  # 111 and 200 3.5 FWHM apart
    phase = cubic_phase("CeO2", CEO2_A_A)
    texture = FiberTexture("sh", sample_axis=(1.0, 0.0, 1.0), coefficients={"C(4,1)": 0.6, "C(6,1)": -0.3})
    common = dict(n_frames=2, counts=100.0, supersample=1, dtype=np.float64)
    plain, _ = simulate_frames(params, phase, **common)
    textured, truth = simulate_frames(params, phase, texture=texture, **common)
    assert truth["pole_density"].shape == (2, 360, len(truth["hkl"]))
    assert truth["texture"] == texture.to_dict()
    with pytest.raises(ValueError, match="needs a Phase"):
        simulate_frames(params, cubic_rings(CEO2_A_A, [(1, 1, 1)]), texture=texture)

    r, eta = pixel_map(params)
    tth = r_to_tth_deg(r, params)
    tth0, fwhm = truth["tth0_deg"][0], truth["fwhm_deg"][0]
    assert tuple(truth["hkl"][0]) == (1, 1, 1) and truth["tth0_deg"][1] - tth0 > 3 * fwhm
    ring = (tth > tth0 - 0.5 * fwhm) & (tth < tth0)  # the side away from 200
    assert ring.sum() > 50
    for f, omega in enumerate(truth["omega_deg"]):
        ratio = textured[f][ring] / plain[f][ring]
        expected = texture.pole_density(phase, truth["hkl"][:1],
                                        sample_directions(tth0, eta[ring], omega)[:, None, :])[:, 0]
        np.testing.assert_allclose(ratio, expected, rtol=0.015)
        assert expected.max() / expected.min() > 1.2  # the texture really shows on this ring
    assert not np.allclose(textured[0][ring], textured[1][ring], rtol=0.05)  # and ω turns it
