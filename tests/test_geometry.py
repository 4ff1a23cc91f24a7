"""Geometry checks: MIDAS pixel -> (R, 2θ, η) against pyFAI, plus closed forms for the extras."""

from __future__ import annotations

import numpy as np
import pytest

from midasflow.errors import ParameterError
from midasflow.geometry import (
    pixel_map,
    pixel_to_r_eta,
    r_to_tth_deg,
    raw_to_transformed,
    tilt_matrix,
    transform_image,
    transformed_to_raw,
    tth_to_q_inv_a,
    tth_to_r_px,
    untransform_image,
)
from midasflow.params import Params

NZ, NY = 256, 300


def _params(**kw) -> Params:
    base = dict(
        nr_pixels_y=NY, nr_pixels_z=NZ, px_um=172.0, lsd_um=250_000.0,
        bc_y_px=137.3, bc_z_px=101.6, r_min_px=1.0, r_max_px=400.0, r_bin_px=1.0,
    )
    base.update(kw)
    return Params(**base)


def _pyfai_geometry(params: Params):
    """pyFAI Geometry with the same physics as the MIDAS geometry of ``params``.

    MIDAS lab: x along the beam, P = (Lsd, 0, 0) + TRs·(0, (BCy − Y)·px, (Z − BCz)·px).
    pyFAI lab: t = Rp·(d1 − poni1, d2 − poni2, L) with d1 along rows (Z), d2 along columns (Y),
    t3 along the beam, Rp = R3(rot3)·R2(rot2)·R1(rot1).
    The proper rotation M taking MIDAS (x, y, z) to pyFAI (t1, t2, t3) is x -> t3, y -> −t2,
    z -> t1, so M·P = Lsd·e3 + (M·TRs·Mᵀ)·((Z − BCz)·px·e1 + (Y − BCy)·px·e2). Matching with
    Rp = M·TRs·Mᵀ gives (d1 − poni1, d2 − poni2, L) = Lsd·Rpᵀ·e3 + (...), hence L = Lsd·w3,
    poni1 = (BCz + ½)·px − Lsd·w1, poni2 = (BCy + ½)·px − Lsd·w2 with w = Rpᵀ·e3 (pyFAI pixel
    centres sit at (index + ½)·pixel). Angles follow from Rp: Rp[2,0] = sin rot2,
    Rp[2,1] = −cos rot2·sin rot1, Rp[2,2] = cos rot2·cos rot1, Rp[1,0]/Rp[0,0] = tan rot3.
    Then chi = atan2(t1, t2) = atan2(P_z, −P_y) = 90° − η.
    """
    from pyFAI.detectors import Detector
    from pyFAI.geometry import Geometry

    m = np.array([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [1.0, 0.0, 0.0]])
    rp = m @ tilt_matrix(params.tx_deg, params.ty_deg, params.tz_deg) @ m.T
    rot2 = np.arcsin(rp[2, 0])
    rot1 = np.arctan2(-rp[2, 1], rp[2, 2])
    rot3 = np.arctan2(rp[1, 0], rp[0, 0])
    w = params.lsd_um * rp.T[:, 2]
    px_m = params.px_um * 1e-6
    det = Detector(pixel1=px_m, pixel2=px_m, max_shape=(params.nr_pixels_z, params.nr_pixels_y))
    geo = Geometry(
        dist=w[2] * 1e-6,
        poni1=(params.bc_z_px + 0.5) * px_m - w[0] * 1e-6,
        poni2=(params.bc_y_px + 0.5) * px_m - w[1] * 1e-6,
        rot1=rot1, rot2=rot2, rot3=rot3, detector=det,
    )
    assert np.allclose(geo.rotation_matrix(), rp, atol=1e-14)
    return geo


def _wrap_deg(a: np.ndarray) -> np.ndarray:
    return (a + 180.0) % 360.0 - 180.0


@pytest.mark.parametrize("tilts", [(0.0, 0.0, 0.0), (0.7, 0.4, -0.3), (-2.0, 1.5, 3.0)])
def test_every_pixel_matches_pyfai(tilts):
    params = _params(tx_deg=tilts[0], ty_deg=tilts[1], tz_deg=tilts[2])
    geo = _pyfai_geometry(params)
    z, y = np.mgrid[0:NZ, 0:NY].astype(np.float64)
    r_px, eta_deg = pixel_to_r_eta(y, z, params)
    tth_deg = r_to_tth_deg(r_px, params)
    tth_ref = np.rad2deg(geo.tth(z, y, path="tan"))
    chi_ref = np.rad2deg(geo.chi(z, y, path="tan"))
    assert np.max(np.abs(tth_deg - tth_ref)) < 1e-6
    assert r_px.min() > 0.01  # BC is off the pixel centres, so η is defined everywhere
    assert np.max(np.abs(_wrap_deg(eta_deg - (90.0 - chi_ref)))) < 1e-5


def test_eta_convention_and_range():
    params = _params(bc_y_px=100.0, bc_z_px=100.0)
    r, eta = pixel_to_r_eta([100, 110, 100, 90, 110], [110, 100, 90, 100, 110], params)
    np.testing.assert_allclose(r, [10, 10, 10, 10, np.hypot(10, 10)])
    np.testing.assert_allclose(eta, [0.0, 90.0, 180.0, -90.0, 45.0], atol=1e-12)
    _, eta_all = pixel_map(params)
    assert eta_all.min() > -180.0 and eta_all.max() <= 180.0


def test_tilt_matrix_order():
    t = tilt_matrix(0.0, 90.0, 0.0)  # Ry(90): z -> x
    np.testing.assert_allclose(t @ [0, 0, 1], [1, 0, 0], atol=1e-15)
    a = tilt_matrix(10.0, 20.0, 30.0)
    np.testing.assert_allclose(
        a, tilt_matrix(10.0, 0, 0) @ tilt_matrix(0, 20.0, 0) @ tilt_matrix(0, 0, 30.0)
    )


def test_distortion_isotropic_and_angular_terms():
    base = _params(bc_y_px=0.0, bc_z_px=0.0, rhod_um=40_000.0)
    y = np.array([50.0, 0.0, 30.0])
    z = np.array([0.0, 80.0, 40.0])
    r0, eta0 = pixel_to_r_eta(y, z, base)
    rho = r0 * base.px_um / base.rhod_um
    p = [0.0] * 15
    p[2], p[5], p[4] = 1e-3, -2e-3, 5e-4  # iso ρ², ρ⁴, ρ⁶
    r, eta = pixel_to_r_eta(y, z, base.with_overrides(p=tuple(p)))
    np.testing.assert_allclose(r, r0 * (1 + 1e-3 * rho**2 - 2e-3 * rho**4 + 5e-4 * rho**6), rtol=1e-13)
    np.testing.assert_array_equal(eta, eta0)  # distortion never moves η
    p = [0.0] * 15
    p[0], p[6] = 2e-3, 30.0  # two-fold term with phase: ρ²·cos(2(90° − η) + 30°)
    r, _ = pixel_to_r_eta(y, z, base.with_overrides(p=tuple(p)))
    expected = r0 * (1 + 2e-3 * rho**2 * np.cos(np.deg2rad(2 * (90 - eta0) + 30.0)))
    np.testing.assert_allclose(r, expected, rtol=1e-13)
    p = [0.0] * 15
    p[7], p[8] = 3e-3, -45.0  # one-fold term uses ρ⁴
    r, _ = pixel_to_r_eta(y, z, base.with_overrides(p=tuple(p)))
    expected = r0 * (1 + 3e-3 * rho**4 * np.cos(np.deg2rad((90 - eta0) - 45.0)))
    np.testing.assert_allclose(r, expected, rtol=1e-13)


def test_parallax():
    base = _params(bc_y_px=0.0, bc_z_px=0.0)
    r0, _ = pixel_to_r_eta(120.0, 50.0, base)
    r, _ = pixel_to_r_eta(120.0, 50.0, base.with_overrides(parallax_um=300.0))
    rad_um = r0 * base.px_um
    assert r - r0 == pytest.approx(300.0 * np.sin(np.arctan(rad_um / base.lsd_um)) / base.px_um)


def test_tth_r_q_round_trip():
    params = _params()
    r = np.linspace(0, 2000, 11)
    np.testing.assert_allclose(tth_to_r_px(r_to_tth_deg(r, params), params), r, atol=1e-9)
    assert r_to_tth_deg(params.lsd_um / params.px_um, params) == pytest.approx(45.0)
    assert tth_to_q_inv_a(60.0, 1.0) == pytest.approx(2 * np.pi)
    with pytest.raises(ParameterError):
        tth_to_q_inv_a(10.0, 0.0)


@pytest.mark.parametrize("codes", [(0,), (1,), (2,), (3,), (1, 3), (3, 2, 1), (2, 2)])
def test_im_trans_opt_image_and_coordinates_agree(codes):
    n = 7
    params = _params(nr_pixels_y=n, nr_pixels_z=n, im_trans_opt=codes)
    raw = np.arange(n * n).reshape(n, n)
    img_t = transform_image(raw, codes)
    z, y = np.mgrid[0:n, 0:n]
    yt, zt = raw_to_transformed(y, z, params)
    np.testing.assert_array_equal(img_t[zt, yt], raw)
    yr, zr = transformed_to_raw(yt, zt, params)
    np.testing.assert_array_equal(yr, y)
    np.testing.assert_array_equal(zr, z)
    np.testing.assert_array_equal(untransform_image(img_t, codes), raw)


def test_im_trans_opt_known_flips():
    raw = np.array([[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(transform_image(raw, (1,)), [[3, 2, 1], [6, 5, 4]])
    np.testing.assert_array_equal(transform_image(raw, (2,)), [[4, 5, 6], [1, 2, 3]])
    np.testing.assert_array_equal(transform_image(raw, (0, 1, 2)), raw[::-1, ::-1])
    with pytest.raises(ParameterError, match="square"):
        transform_image(raw, (3,))
    with pytest.raises(ParameterError, match="ImTransOpt"):
        transform_image(raw, (4,))


def test_pixel_map_uses_transformed_frame_geometry():
    params = _params(im_trans_opt=(1,), tx_deg=0.5)
    r_raw, eta_raw = pixel_map(params)
    # raw pixel (y, z) sits at transformed (NY-1-y, z), where BC and tilts are defined
    z, y = np.mgrid[0:NZ, 0:NY]
    r_t, eta_t = pixel_to_r_eta(NY - 1 - y, z, params)
    np.testing.assert_array_equal(r_raw, r_t)
    np.testing.assert_array_equal(eta_raw, eta_t)
    assert r_raw.shape == (NZ, NY)
