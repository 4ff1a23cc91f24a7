"""Strain geometry and tensor fits against known tensors (synthetic ε from the forward model)."""
import numpy as np
import pytest

from midasflow import strain
from midasflow.strain import COMPONENTS

TRUTH = strain.tensor_from_components([4e-4, -6e-4, 9e-4, 2.5e-4, -3e-4, 1.5e-4])


def test_scattering_vector_matches_k_out_minus_k_in():
    rng = np.random.default_rng(0)
    tth = rng.uniform(1, 30, 50)
    eta = rng.uniform(-180, 180, 50)
    t, e = np.deg2rad(tth), np.deg2rad(eta)
    k_out = np.stack([np.cos(t), -np.sin(t) * np.sin(e), np.sin(t) * np.cos(e)], -1)
    q = k_out - np.array([1.0, 0, 0])
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    np.testing.assert_allclose(strain.scattering_vector(tth / 2, eta), q, atol=1e-14)


def test_design_matrix_reproduces_reference_formula():
    rng = np.random.default_rng(1)
    th = np.deg2rad(rng.uniform(1, 10, 20))
    et = np.deg2rad(rng.uniform(-180, 180, 20))
    exx, eyy, ezz, eyz, exz, exy = strain.components_from_tensor(TRUTH)
    formula = (exx * np.sin(th) ** 2
               + np.cos(th) ** 2 * (eyy * np.sin(et) ** 2 + ezz * np.cos(et) ** 2 - 2 * eyz * np.sin(et) * np.cos(et))
               + 2 * np.sin(th) * np.cos(th) * (exy * np.sin(et) - exz * np.cos(et)))
    a = strain.design_matrix(np.rad2deg(th), np.rad2deg(et))
    np.testing.assert_allclose(a @ strain.components_from_tensor(TRUTH), formula, atol=1e-18)
    np.testing.assert_allclose(strain.normal_strain(np.rad2deg(th), np.rad2deg(et), TRUTH), formula, atol=1e-18)


def test_omega_sign_uniaxial_strain_follows_the_sample():
    """Uniaxial strain along the sample direction (cos45°, sin45°, 0): after the sample turns by
    ω = +45° about +z that direction points along lab +y, so the lineouts at η = ±90° (n ≈ ∓y)
    see the full strain; at ω = −45° it points along lab +x and they see none."""
    u = np.array([1.0, 1.0, 0.0]) / np.sqrt(2)
    tensor = 1e-3 * np.outer(u, u)
    theta = 1e-9  # n exactly in the y-z plane
    assert strain.normal_strain(theta, 90.0, tensor, omega_deg=45.0) == pytest.approx(1e-3, rel=1e-9)
    assert strain.normal_strain(theta, -90.0, tensor, omega_deg=45.0) == pytest.approx(1e-3, rel=1e-9)
    assert abs(strain.normal_strain(theta, 90.0, tensor, omega_deg=-45.0)) < 1e-15
    # the explicit rotation of the tensor gives the same lab-frame strain as Rz(ω)ᵀ n
    rot = strain.rotation_z(45.0)
    lab = rot @ tensor @ rot.T
    np.testing.assert_allclose(lab[1, 1], 1e-3, rtol=1e-12)
    eta = np.linspace(-180, 175, 72)
    np.testing.assert_allclose(strain.normal_strain(3.0, eta, tensor, 45.0),
                               strain.normal_strain(3.0, eta, lab, 0.0), atol=1e-18)


def _synthetic(omegas, *, esd=2e-6, seed=0, theta_deg=3.2):
    rng = np.random.default_rng(seed)
    eta = np.tile(np.arange(-177.5, 180, 5.0), len(omegas))
    omega = np.repeat(omegas, 72)
    theta = theta_deg + rng.normal(0, 0.01, eta.size)
    eps = strain.normal_strain(theta, eta, TRUTH, omega) + rng.normal(0, esd, eta.size)
    return eta, theta, omega, eps, np.full(eta.size, esd)


def test_orientation_fit_recovers_lab_components():
    eta, theta, omega, eps, esd = _synthetic([0.0])
    # hold ε_xx at its true value: the other five are then unbiased
    fit = strain.fit_strain_orientation(eta, theta, eps, esd, eps_xx=TRUTH[0, 0])
    assert fit.status == "ok" and fit.frame == "lab"
    truth = strain.components_from_tensor(TRUTH)
    free = [COMPONENTS.index(c) for c in ("yy", "zz", "yz", "xz", "xy")]
    z = (fit.values[free] - truth[free]) / fit.esds[free]
    assert np.all(np.abs(z) < 4.5), z
    # in-plane terms are much better determined than the weak x shears
    assert fit.esds[COMPONENTS.index("yy")] < 0.2 * fit.esds[COMPONENTS.index("xy")]
    assert fit.esds[COMPONENTS.index("yy")] < 1e-6
    assert not fit.determined[0] and fit.fixed == {"xx": TRUTH[0, 0]}
    assert fit.chi2 / fit.dof == pytest.approx(1.0, abs=0.4)
    # default ε_xx = 0: the bias on yy/zz is tan²θ·ε_xx, tiny
    fit0 = strain.fit_strain_orientation(eta, theta, eps, esd)
    bias = np.tan(np.deg2rad(3.2)) ** 2 * TRUTH[0, 0]
    assert abs(fit0.values[1] - truth[1] - bias) < 5 * fit0.esds[1]


def test_orientation_fit_with_free_xx_and_constant_theta_is_degenerate():
    eta, _, _, eps, esd = _synthetic([0.0])
    fit = strain.fit_strain_orientation(eta, 3.2, eps, esd, eps_xx=None)
    assert fit.status == "degenerate"
    assert np.all(np.isnan(fit.values)) and "xx" in fit.message


def test_orientation_fit_with_too_few_azimuths_is_degenerate():
    eta = np.array([0.0, 90.0, 180.0, -90.0] * 3)
    eps = strain.normal_strain(3.0, eta, TRUTH)
    fit = strain.fit_strain_orientation(eta, 3.0, eps, np.full(eta.size, 1e-6))
    assert fit.status == "degenerate"  # yz needs sin η cos η ≠ 0
    assert np.isnan(fit.values[COMPONENTS.index("yy")]) and "yz" in fit.message
    few = strain.fit_strain_orientation([0.0, 45.0], 3.0, [1e-4, 2e-4], [1e-6, 1e-6])
    assert few.status == "degenerate" and "points" in few.message


def test_joint_fit_recovers_all_six_sample_components():
    eta, theta, omega, eps, esd = _synthetic([0.0, 45.0, 90.0, 135.0], seed=3)
    fit = strain.fit_strain_tensor(eta, theta, omega, eps, esd)
    assert fit.status == "ok" and fit.determined.all() and fit.frame == "sample"
    truth = strain.components_from_tensor(TRUTH)
    z = (fit.values - truth) / fit.esds
    assert np.all(np.abs(z) < 4.5), z
    assert np.all(fit.esds < 2e-6)
    np.testing.assert_allclose(fit.tensor(), fit.tensor().T)
    d = fit.to_dict()
    assert d["components"]["xy"]["determined"] and d["status"] == "ok"
    # covariance is consistent with the esds
    np.testing.assert_allclose(np.sqrt(np.diag(fit.covariance)), fit.esds)


def test_joint_fit_with_wrong_omega_sign_is_detectably_wrong():
    eta, theta, omega, eps, esd = _synthetic([0.0, 45.0, 90.0], seed=4)
    right = strain.fit_strain_tensor(eta, theta, omega, eps, esd)
    wrong = strain.fit_strain_tensor(eta, theta, -omega, eps, esd)
    assert wrong.chi2 > 100 * right.chi2


def test_joint_fit_single_omega_is_degenerate():
    eta, _, omega, eps, esd = _synthetic([30.0])
    fit = strain.fit_strain_tensor(eta, 3.2, omega, eps, esd)
    assert fit.status == "degenerate"


def test_lattice_strain_cubic_and_general():
    eps, esd = strain.lattice_strain((4.1128, 4.1128, 4.1128, 90, 90, 90, 69.6),
                                     (4.1110, 4.1110, 4.1110, 90, 90, 90), cell_esd=(2e-5, 2e-5, 2e-5, 0, 0, 0))
    assert eps == pytest.approx(4.1128 / 4.1110 - 1, rel=1e-12)
    assert esd == pytest.approx(2e-5 / 4.1110, rel=1e-12)
    # general: d-spacings of given reflections; cubic cells give a/a0 - 1 for any hkl
    e2, _ = strain.lattice_strain((4.1128,) * 3 + (90,) * 3, (4.1110,) * 3 + (90,) * 3, hkl=[[1, 1, 1], [2, 0, 0]])
    assert e2 == pytest.approx(eps, rel=1e-9)
    tet = (3.0 * 1.001, 3.0 * 1.001, 5.0 * 0.998, 90, 90, 90)
    ref = (3.0, 3.0, 5.0, 90, 90, 90)
    e001, _ = strain.lattice_strain(tet, ref, hkl=[0, 0, 2])
    e100, _ = strain.lattice_strain(tet, ref, hkl=[1, 0, 0])
    assert e001 == pytest.approx(-0.002, rel=1e-9) and e100 == pytest.approx(0.001, rel=1e-9)
    d = strain.d_spacing_a((5.0, 6.0, 7.0, 80.0, 95.0, 100.0), [[1, 0, 0], [0, 1, 1]])
    assert np.all(d > 0)
    with pytest.raises(ValueError, match="hkl"):
        strain.lattice_strain(tet, ref)


def test_lineout_design_is_the_average_a_lineout_measures():
    """Reflections at several θ, a 30° η bin and two frames' ω: the row is the weighted mean of
    the normal strain over all of them (brute force), which one effective θ, η, ω is not."""
    from midasflow.strain import lineout_design

    tensor = strain.tensor_from_components([2e-4, -4e-4, 8e-4, 1.5e-4, -1e-4, 2e-4])
    comps = strain.components_from_tensor(tensor)
    theta, weight, eta_c, width, omegas = np.array([1.6, 3.1, 5.2]), np.array([1.0, 3.0, 2.0]), 37.0, 30.0, [80.0, 90.0]
    etas = eta_c - width / 2 + (np.arange(20000) + 0.5) / 20000 * width
    brute = sum(w * np.mean(strain.normal_strain(th, etas, tensor, om))
                for th, w in zip(theta, weight) for om in omegas) / (weight.sum() * len(omegas))
    row = lineout_design(theta, eta_c, weights=weight, eta_width_deg=width, omega_deg=omegas)
    assert row @ comps == pytest.approx(brute, rel=1e-8, abs=1e-12)
    centre = strain.design_matrix([np.average(theta, weights=weight)], [eta_c], [85.0])[0]
    assert abs(centre @ comps - brute) > 5e-6  # the single-point row is off by 1.5 % of the strain
    lab = lineout_design(theta, eta_c, weights=weight, eta_width_deg=width)
    lab_brute = sum(w * np.mean(strain.normal_strain(th, etas, tensor)) for th, w in zip(theta, weight)) / weight.sum()
    assert lab @ comps == pytest.approx(lab_brute, rel=1e-8, abs=1e-12)


def test_fits_with_lineout_designs_recover_the_tensor_from_bin_averaged_strains():
    from midasflow.strain import lineout_design

    tensor = strain.tensor_from_components([2e-4, -4e-4, 8e-4, 1.5e-4, -1e-4, 2e-4])
    width = 30.0
    eta = -180 + width / 2 + width * np.arange(12)
    rows, eps = [], []
    for om in (0.0, 90.0):
        for e in eta:
            row = lineout_design([2.0, 4.0], e, weights=[1.0, 1.0], eta_width_deg=width, omega_deg=[om - 5, om + 5])
            rows.append(row)
            eps.append(row @ strain.components_from_tensor(tensor))
    esd = np.full(len(eps), 1e-6)
    om = np.repeat([0.0, 90.0], eta.size)
    fit = strain.fit_strain_tensor(np.tile(eta, 2), 1.5, om, eps, esd, design=np.array(rows))
    np.testing.assert_allclose(fit.values, strain.components_from_tensor(tensor), atol=1e-12)
    naive = strain.fit_strain_tensor(np.tile(eta, 2), 1.5, om, eps, esd)
    assert np.max(np.abs(naive.values - strain.components_from_tensor(tensor))) > 5e-6
    with pytest.raises(ValueError, match="23 design rows for 24 measurements"):
        strain.fit_strain_tensor(np.tile(eta, 2), 1.5, om, eps, esd, design=np.array(rows)[:-1])
