"""midasflow.profile against GSAS-II reference values (gsas2_cw_profile.md Appendix A) and finite
differences."""
from __future__ import annotations

import math

import numpy as np
import pytest

from midasflow import profile as P

# ---- Appendix A.1: pypsvfcjo values per centidegree -------------------------------------------
OFFSETS_DEG = np.array([-0.05, -0.02, -0.01, -0.005, 0.0, 0.005, 0.01, 0.02])
A1 = [  # 2θ_h, σ², γ, SH/L, Γ, η, values at OFFSETS_DEG
    (2.0, 0.3, 0.2, 0.002, 1.39738, 0.18606,
     [1.66991e-3, 1.28144e-2, 1.92392e-1, 4.80615e-1, 6.23227e-1, 3.96218e-1, 1.34773e-1,
      1.00204e-2]),
    (5.0, 1.0, 0.5, 0.002, 2.62601, 0.24356,
     [3.90633e-3, 7.78166e-2, 2.28210e-1, 3.03085e-1, 3.29194e-1, 2.88924e-1, 2.08524e-1,
      6.64745e-2]),
    (5.0, 1.0, 0.5, 0.02, 2.62601, 0.24356,
     [5.10387e-2, 1.39099e-1, 1.87018e-1, 1.91018e-1, 1.70687e-1, 1.30655e-1, 8.59059e-2,
      2.56053e-2]),
    (30.0, 4.0, 2.0, 0.01, 5.84338, 0.41610,
     [2.68536e-2, 1.05314e-1, 1.31470e-1, 1.38122e-1, 1.38641e-1, 1.32923e-1, 1.22061e-1,
      9.19924e-2]),
    (120.0, 4.0, 2.0, 0.01, 5.84338, 0.41610,
     [2.29406e-2, 9.64611e-2, 1.25505e-1, 1.35096e-1, 1.39143e-1, 1.36850e-1, 1.28676e-1,
      1.00943e-1]),
]
A1_IDS = [f"2th{r[0]:g}-shl{r[3]:g}" for r in A1]


@pytest.mark.parametrize("row", A1, ids=A1_IDS)
def test_fcj_float32_matches_gsas2(row):
    tth, sig2, gam, shl, _, _, ref = row
    ref = np.asarray(ref)
    got = P.fcj_profile(tth + OFFSETS_DEG, tth, sig2, gam, shl, precision="float32")
    # reference values carry 6 significant digits; float32 emulation is ~1e-6 relative
    assert np.max(np.abs(got - ref)) < 1e-5 * ref.max()


@pytest.mark.parametrize("row", A1, ids=A1_IDS)
def test_fcj_float64_within_spec(row):
    tth, sig2, gam, shl, _, _, ref = row
    ref = np.asarray(ref)
    got = P.fcj_profile(tth + OFFSETS_DEG, tth, sig2, gam, shl, precision="float64")
    err = np.max(np.abs(got - ref)) / ref.max()
    # §1.3: double precision differs by ~1 % of the maximum at 2θ = 2°, SH/L = 0.002 only
    assert err < (2e-2 if tth == 2.0 else 1e-3)


def test_default_precision_is_float32():
    tth, sig2, gam, shl = A1[0][:4]
    x = tth + OFFSETS_DEG
    np.testing.assert_array_equal(P.fcj_profile(x, tth, sig2, gam, shl),
                                  P.fcj_profile(x, tth, sig2, gam, shl, precision="float32"))


@pytest.mark.parametrize("row", A1, ids=A1_IDS)
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_tch_fwhm_and_eta(row, precision):
    _, sig2, gam, _, fwhm_ref, eta_ref, _ = row
    fwhm, eta = P.tch_fwhm_eta(sig2, gam, precision=precision)
    assert fwhm == pytest.approx(fwhm_ref, abs=6e-6)
    assert eta == pytest.approx(eta_ref, abs=6e-6)


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_symmetric_pseudo_voigt(precision):
    ref = np.array([3.82089e-3, 7.19709e-2, 2.18393e-1, 2.96302e-1, 3.29658e-1])
    delta = np.array([-5.0, -2.0, -1.0, -0.5, 0.0])  # centideg
    got = P.tch_pseudo_voigt(delta, 1.0, 0.5, precision=precision)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    np.testing.assert_allclose(P.tch_pseudo_voigt(-delta, 1.0, 0.5, precision=precision), got,
                               rtol=1e-6)


def test_pseudo_voigt_unit_area_and_derivatives():
    d = np.linspace(-4000.0, 4000.0, 800001)
    v = P.tch_pseudo_voigt(d, 1.0, 0.5, precision="float64")
    # Lorentzian tails beyond ±4000 cdeg hold η·Γ/(π·4000) of the area, plus the π′ quirk
    assert np.trapezoid(v, d) == pytest.approx(1.0, abs=2e-4)
    x = np.linspace(-6, 6, 41)
    f, dd, ds, dg = P.tch_pseudo_voigt(x, 1.3, 0.7, precision="float64", derivatives=True)
    h = 1e-6
    fd = lambda s, g, xx=x: P.tch_pseudo_voigt(xx, s, g, precision="float64")
    np.testing.assert_allclose(dd, (fd(1.3, 0.7, x + h) - fd(1.3, 0.7, x - h)) / (2 * h),
                               atol=1e-7)
    np.testing.assert_allclose(ds, (fd(1.3 + h, 0.7) - fd(1.3 - h, 0.7)) / (2 * h), atol=1e-7)
    np.testing.assert_allclose(dg, (fd(1.3, 0.7 + h) - fd(1.3, 0.7 - h)) / (2 * h), atol=1e-7)


def test_shl_floor():
    x = 5.0 + OFFSETS_DEG
    np.testing.assert_array_equal(P.fcj_profile(x, 5.0, 1.0, 0.5, 0.0),
                                  P.fcj_profile(x, 5.0, 1.0, 0.5, 0.002))


@pytest.mark.parametrize("tth,sig2,gam,shl", [(10.0, 1.0, 0.5, 0.02), (5.0, 1.0, 0.5, 0.005),
                                              (30.0, 4.0, 2.0, 0.0264), (120.0, 4.0, 2.0, 0.01)])
def test_fcj_derivatives_vs_finite_differences(tth, sig2, gam, shl):
    x = tth + np.linspace(-0.3, 0.2, 201)
    der = P.fcj_profile_derivatives(x, tth, sig2, gam, shl, precision="float64")
    np.testing.assert_array_equal(der.value, P.fcj_profile(x, tth, sig2, gam, shl,
                                                           precision="float64"))
    args = {"tth": tth, "sig2": sig2, "gam": gam, "shl": shl}
    for name, got, h in [("tth", der.d_pos, 1e-6), ("sig2", der.d_sig2, 1e-6),
                         ("gam", der.d_gam, 1e-6), ("shl", der.d_shl, 1e-7)]:
        up, dn = dict(args), dict(args)
        up[name] += h
        dn[name] -= h
        fd = (P.fcj_profile(x, up["tth"], up["sig2"], up["gam"], up["shl"], precision="float64")
              - P.fcj_profile(x, dn["tth"], dn["sig2"], dn["gam"], dn["shl"],
                              precision="float64")) / (2 * h)
        assert np.max(np.abs(got - fd)) < 1e-5 * np.max(np.abs(fd)), name


def test_fcj_derivative_float32_close_to_float64():
    x = 10.0 + np.linspace(-0.3, 0.2, 101)
    d32 = P.fcj_profile_derivatives(x, 10.0, 1.0, 0.5, 0.02)
    d64 = P.fcj_profile_derivatives(x, 10.0, 1.0, 0.5, 0.02, precision="float64")
    for a, b in [(d32.d_pos, d64.d_pos), (d32.d_sig2, d64.d_sig2), (d32.d_gam, d64.d_gam),
                 (d32.d_shl, d64.d_shl)]:
        assert np.max(np.abs(a - b)) < 1e-3 * np.max(np.abs(b))


def test_shl_derivative_zero_below_floor():
    x = 10.0 + np.linspace(-0.1, 0.1, 11)
    assert not np.any(P.fcj_profile_derivatives(x, 10.0, 1.0, 0.5, 0.001).d_shl)


# ---- Appendix A.2: PbSO4 reflections -----------------------------------------------------------
CELL = (8.48, 5.398, 6.958)
LAM = 0.413263
A2 = [  # hkl, M, d, 2θ, σ², γ, refl[11]
    ((1, 0, 1), 4, 5.37902856, 4.40058664, 0.0598757343, 0.72645271, 4256.79045),
    ((0, 1, 1), 4, 4.26501274, 5.55154040, 0.0596248745, 0.78933185, 2674.28108),
    ((2, 0, 0), 2, 4.24, 5.58433239, 0.0596211766, 0.79112484, 1321.47619),
]


@pytest.mark.parametrize("row", A2, ids=[str(r[0]) for r in A2])
def test_pbso4_reflection_quantities(row):
    (h, k, l), mult, d_ref, tth_ref, sig2_ref, gam_ref, refl11_ref = row
    a, b, c = CELL
    d = 1.0 / math.sqrt(h * h / a**2 + k * k / b**2 + l * l / c**2)  # Pnma: A3 = A4 = A5 = 0
    assert d == pytest.approx(d_ref, rel=1e-8)
    pos = P.peak_position_deg(np.array([d]), LAM, zero_deg=0.003, displace_x_um=50.0,
                              displace_y_um=-30.0, gonio_radius_mm=500.0)
    tth = pos.tth_deg[0]
    assert tth == pytest.approx(tth_ref, rel=1e-6)
    sg = P.peak_sig2_gam(pos.tth_deg, 1.163, -0.126, 0.063, 0.2, 0.5, 0.05, size_um=1.0,
                         mustrain=1000.0, lam_a=LAM)
    assert sg.sig2[0] == pytest.approx(sig2_ref, rel=1e-6)
    assert sg.gam[0] == pytest.approx(gam_ref, rel=1e-6)
    volume = a * b * c
    refl11 = (1000.0 * mult * P.polarization_factor(tth, 0.99, 30.0) / volume
              * P.lorentz_factor(tth))
    assert refl11 == pytest.approx(refl11_ref, rel=1e-6)
    assert P.lorentz_polarization(tth, 0.99, 30.0) == pytest.approx(
        P.lorentz_factor(tth) * P.polarization_factor(tth, 0.99, 30.0), rel=1e-15)


def test_peak_position_derivatives():
    d = np.array([5.379, 2.1, 1.2])
    kw = {"lam_a": LAM, "zero_deg": 0.003, "displace_x_um": 50.0, "displace_y_um": -30.0,
          "gonio_radius_mm": 500.0}
    pos = P.peak_position_deg(d, **kw)
    h = 1e-6
    fd_d = (P.peak_position_deg(d + h, **kw).tth_deg - P.peak_position_deg(d - h, **kw).tth_deg)
    np.testing.assert_allclose(pos.d_d, fd_d / (2 * h), rtol=1e-6)
    for field, key, step in [("d_lam", "lam_a", 1e-7), ("d_zero", "zero_deg", 1e-4),
                             ("d_displace_x", "displace_x_um", 1e-2),
                             ("d_displace_y", "displace_y_um", 1e-2)]:
        up, dn = dict(kw), dict(kw)
        up[key] += step
        dn[key] -= step
        fd = (P.peak_position_deg(d, **up).tth_deg - P.peak_position_deg(d, **dn).tth_deg)
        np.testing.assert_allclose(getattr(pos, field), fd / (2 * step), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("mx", [1.0, 0.6])
def test_sig2_gam_derivatives(mx):
    tth = np.array([4.4, 12.0, 40.0])
    base = {"U": 1.163, "V": -0.126, "W": 0.063, "X": 0.2, "Y": 0.5, "Z": 0.05,
            "size_um": 0.8, "mustrain": 1500.0}
    names = {"U": "U", "V": "V", "W": "W", "X": "X", "Y": "Y", "Z": "Z", "size_um": "Size",
             "mustrain": "Mustrain"}
    sg = P.peak_sig2_gam(tth, **base, lam_a=LAM, size_mx=mx, mustrain_mx=mx)
    for key, name in names.items():
        h = 1e-6 * max(1.0, abs(base[key]))
        up, dn = dict(base), dict(base)
        up[key] += h
        dn[key] -= h
        su = P.peak_sig2_gam(tth, **up, lam_a=LAM, size_mx=mx, mustrain_mx=mx)
        sd = P.peak_sig2_gam(tth, **dn, lam_a=LAM, size_mx=mx, mustrain_mx=mx)
        np.testing.assert_allclose(sg.d_sig2[name], (su.sig2 - sd.sig2) / (2 * h), rtol=1e-6,
                                   atol=1e-9)
        np.testing.assert_allclose(sg.d_gam[name], (su.gam - sd.gam) / (2 * h), rtol=1e-6,
                                   atol=1e-9)
    h = 1e-6
    su = P.peak_sig2_gam(tth + h, **base, lam_a=LAM, size_mx=mx, mustrain_mx=mx)
    sd = P.peak_sig2_gam(tth - h, **base, lam_a=LAM, size_mx=mx, mustrain_mx=mx)
    np.testing.assert_allclose(sg.d_sig2["tth"], (su.sig2 - sd.sig2) / (2 * h), rtol=1e-5)
    np.testing.assert_allclose(sg.d_gam["tth"], (su.gam - sd.gam) / (2 * h), rtol=1e-5)


def test_sig2_gam_floor():
    sg = P.peak_sig2_gam(np.array([10.0]), 0.0, 0.0, -1.0, 0.0, 0.0, -5.0, lam_a=LAM)
    assert sg.sig2[0] == 0.001 and sg.gam[0] == 0.001
    assert sg.d_sig2["W"][0] == 0.0 and sg.d_gam["Z"][0] == 0.0


def test_default_sample_broadening_magnitude():
    # §1.1: at λ = 0.4133 Å, 2θ = 10°, Size 1 µm and Mustrain 1000 add ≈0.24 + 0.50 centideg
    sg = P.peak_sig2_gam(np.array([10.0]), 0, 0, 0, 0, 0, 0, lam_a=0.4133)
    assert sg.gam[0] == pytest.approx(0.24 + 0.50, abs=0.01)


# ---- corrections -------------------------------------------------------------------------------
def test_polarization_special_cases():
    tth = np.array([5.0, 30.0, 90.0, 150.0])
    c2 = np.cos(np.radians(tth)) ** 2
    np.testing.assert_allclose(P.polarization_factor(tth, 0.5, 37.0), (1 + c2) / 2)
    np.testing.assert_allclose(P.polarization_factor(tth, 0.99, 0.0), 0.99 + 0.01 * c2)
    np.testing.assert_allclose(P.polarization_factor(tth, 0.99, 90.0), 0.99 * c2 + 0.01)
    h = 1e-6
    fd = (P.polarization_factor(tth, 0.8 + h, 30.0) - P.polarization_factor(tth, 0.8 - h, 30.0))
    np.testing.assert_allclose(P.polarization_dpolariz(tth, 30.0), fd / (2 * h), rtol=1e-7)


def test_lorentz_factor_identity():
    tth = np.array([3.0, 45.0, 120.0])
    th = np.radians(tth) / 2
    np.testing.assert_allclose(P.lorentz_factor(tth), 1 / (np.sin(th) * np.sin(2 * th)))


def test_march_dollase():
    a, b, c = CELL
    G = np.diag([1 / a**2, 1 / b**2, 1 / c**2])
    # mmm: the 8 sign combinations of (1 0 1) as equivalents (with duplicates)
    eq = np.array([[[s1, 0, s3] for s1 in (1, -1) for _ in (0, 1) for s3 in (1, -1)]])
    po, dpo = P.march_dollase(eq, [0, 0, 1], 1.0, G)
    assert po[0] == pytest.approx(1.0, abs=1e-15)
    # reflection along the axis: cosφ = 1 -> r^-3; perpendicular: r^(3/2)
    po_par, _ = P.march_dollase(np.array([[0, 0, 2]]), [0, 0, 1], 1.3, G)
    po_perp, _ = P.march_dollase(np.array([[2, 0, 0]]), [0, 0, 1], 1.3, G)
    assert po_par[0] == pytest.approx(1.3**-3)
    assert po_perp[0] == pytest.approx(1.3**1.5)
    h = 1e-6
    po, dpo = P.march_dollase(eq, [0, 0, 1], 0.8, G)
    fd = (P.march_dollase(eq, [0, 0, 1], 0.8 + h, G)[0]
          - P.march_dollase(eq, [0, 0, 1], 0.8 - h, G)[0]) / (2 * h)
    np.testing.assert_allclose(dpo, fd, rtol=1e-6)


# ---- background --------------------------------------------------------------------------------
def test_chebyshev_background():
    x = np.linspace(3.0, 12.0, 301)
    coeffs = [100.0, 20.0, -10.0]
    t = -1 + 2 * (x - x[0]) / (x[-1] - x[0])
    expected = sum(b * np.cos(n * np.arccos(np.clip(t, -1, 1))) for n, b in enumerate(coeffs))
    np.testing.assert_allclose(P.chebyshev_background(x, coeffs, x[0], x[-1]), expected,
                               rtol=1e-12, atol=1e-10)
    m = P.chebyshev_design_matrix(x, 5, x[0], x[-1])
    assert m.shape == (301, 5)
    np.testing.assert_allclose(m[0], [1, -1, 1, -1, 1])
    np.testing.assert_allclose(m[-1], np.ones(5))


# ---- windows and whole pattern -----------------------------------------------------------------
def test_peak_window_rule():
    lo, hi = P.peak_window(np.array([30.0, 120.0]), np.array([4.0, 4.0]), np.array([2.0, 2.0]),
                           0.0)  # SH/L floored to 0.002
    fwhm = (2.355 * 2.0 + 2.0) / 100.0
    low30 = 50 * (fwhm + 0.002 * math.cos(math.radians(30.0)))
    low120 = 50 * (fwhm + 0.002 * abs(math.cos(math.radians(120.0))))
    assert lo[0] == pytest.approx(30.0 - low30) and hi[0] == pytest.approx(30.0 + 75 * fwhm)
    assert lo[1] == pytest.approx(120.0 - 75 * fwhm) and hi[1] == pytest.approx(120.0 + low120)
    lo, hi = P.peak_window(np.array([10.0]), np.array([0.0]), np.array([0.0]), 0.002)
    assert hi[0] - 10.0 == pytest.approx(75 * 0.0001)


@pytest.fixture(scope="module")
def synthetic():
    rng = np.random.default_rng(42)
    x = np.linspace(2.0, 12.0, 3000)
    pos = np.sort(rng.uniform(2.5, 11.5, 40))
    sg = P.peak_sig2_gam(pos, 1.163, -0.126, 0.063, 0.2, 0.5, 0.05, lam_a=LAM)
    inten = rng.uniform(100.0, 1000.0, 40)
    return x, pos, sg.sig2, sg.gam, inten


def test_pattern_equals_windowed_sum(synthetic):
    x, pos, sig2, gam, inten = synthetic
    res = P.pattern(x, pos, sig2, gam, inten, 0.01)
    lo_deg, hi_deg = P.peak_window(pos, sig2, gam, 0.01)
    expected = np.zeros_like(x)
    for j in range(pos.size):
        inside = (x >= lo_deg[j]) & (x < hi_deg[j])
        expected[inside] += inten[j] * P.fcj_profile(x[inside], pos[j], sig2[j], gam[j], 0.01)
    np.testing.assert_allclose(res.y, expected, rtol=1e-12, atol=1e-12)
    # §1.5: I_h = ∫ y d(2θ in centidegrees) (window tails excluded, so slightly below)
    step = x[1] - x[0]
    one = P.pattern(x, pos[20:21], sig2[20:21], gam[20:21], [1.0], 0.01)
    assert one.y.sum() * step * 100 == pytest.approx(1.0, abs=5e-3)
    np.testing.assert_array_equal(res.dense("d_intensity")[20] * 1.0, one.y)


def test_pattern_window_edge_cases():
    x = np.linspace(5.0, 6.0, 101)
    res = P.pattern(x, np.array([1.0, 5.5, 9.0]), np.full(3, 1.0), np.full(3, 0.5),
                    np.ones(3), 0.002)
    assert res.hi[0] == res.lo[0] and res.hi[2] == res.lo[2]  # outside the data
    assert np.all(res.y[: res.lo[1]] == 0) and np.all(res.y[res.hi[1]:] == 0)
    single = P.pattern(np.array([5.0]), np.array([5.0]), [1.0], [0.5], [1.0], 0.002)
    assert single.y[0] == 0.0  # a one-point window contributes nothing


@pytest.mark.parametrize("doublet", [False, True])
def test_pattern_derivatives_vs_finite_differences(synthetic, doublet):
    x, pos, sig2, gam, inten = synthetic
    kw = {"precision": "float64", "lam1_a": 0.4130, "lam2_a": 0.4140, "i_ratio": 0.5} \
        if doublet else {"precision": "float64"}
    res = P.pattern(x, pos, sig2, gam, inten, 0.01, derivatives=True, **kw)
    j = 17
    for name, arr, h in [("d_pos", pos, 1e-6), ("d_sig2", sig2, 1e-6), ("d_gam", gam, 1e-6)]:
        up, dn = arr.copy(), arr.copy()
        up[j] += h
        dn[j] -= h
        args_up = [up if a is arr else a for a in (pos, sig2, gam)]
        args_dn = [dn if a is arr else a for a in (pos, sig2, gam)]
        fd = (P.pattern(x, *args_up, inten, 0.01, **kw).y
              - P.pattern(x, *args_dn, inten, 0.01, **kw).y) / (2 * h)
        got = res.dense(name)[j]
        assert np.max(np.abs(got - fd)) < 1e-4 * np.max(np.abs(fd)), name
    # SH/L also moves the window edges: check it on points well inside every window
    xs, ps = np.linspace(5.95, 6.15, 400), np.array([6.0, 6.05, 6.1])
    s3, g3, i3 = sig2[:3], gam[:3], inten[:3]
    h = 1e-7
    fd = (P.pattern(xs, ps, s3, g3, i3, 0.01 + h, **kw).y
          - P.pattern(xs, ps, s3, g3, i3, 0.01 - h, **kw).y) / (2 * h)
    got = P.pattern(xs, ps, s3, g3, i3, 0.01, derivatives=True, **kw).dense("d_shl").sum(axis=0)
    assert np.max(np.abs(got - fd)) < 1e-4 * np.max(np.abs(fd))
    zero_j = inten.copy()
    zero_j[j] = 0.0
    np.testing.assert_allclose(res.dense("d_intensity")[j] * inten[j],
                               res.y - P.pattern(x, pos, sig2, gam, zero_j, 0.01, **kw).y,
                               atol=1e-9)


def test_kalpha2_position_and_intensity():
    x = np.linspace(20.0, 22.0, 4001)
    lam1, lam2 = 1.540596, 1.544493
    res = P.pattern(x, [21.0], [2.0], [1.0], [100.0], 0.002, lam1_a=lam1, lam2_a=lam2,
                    i_ratio=0.5, precision="float64")
    pos2, _ = P.kalpha2_position_deg(np.array([21.0]), lam1, lam2)
    exact = 2 * np.degrees(np.arcsin(lam2 / lam1 * np.sin(np.radians(10.5))))
    assert pos2[0] == pytest.approx(exact, abs=2e-4)  # GSAS-II's linearised shift
    single = P.pattern(x, [21.0], [2.0], [1.0], [100.0], 0.002, precision="float64")
    second = P.pattern(x, pos2, [2.0], [1.0], [50.0], 0.002, precision="float64")
    np.testing.assert_allclose(res.y, single.y + second.y, atol=1e-10)


def test_pattern_pieces_are_the_derivative_rows_and_project_either_way(synthetic):
    """``PeakSum.pieces`` stacks the five derivative pieces in the order of ``PIECES`` (its rows
    are the fields), and projecting all five through it equals projecting them one by one."""
    x, pos, sig2, gam, inten = synthetic
    res = P.pattern(x, pos, sig2, gam, inten, 0.01, derivatives=True, precision="float64")
    for row, name in zip(res.pieces, P.PIECES):
        assert np.shares_memory(row, getattr(res, name)) and np.array_equal(row, getattr(res, name))
    rng = np.random.default_rng(5)
    coefs = {name: rng.normal(size=(pos.size, 3)) for name in P.PIECES}
    whole = res.project(coefs)
    summed = sum(res.project({name: c}) for name, c in coefs.items())
    np.testing.assert_allclose(whole, summed, rtol=1e-12, atol=1e-9 * np.abs(whole).max())
    # SH/L below its floor: the d_shl row is zero (the floor holds it)
    low = P.pattern(x, pos, sig2, gam, inten, 0.001, derivatives=True, precision="float64")
    assert not low.d_shl.any() and low.pieces[1].any()
