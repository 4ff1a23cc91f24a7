"""Texture corrections against values computed by GSAS-II itself (git 013259a0: GetPrefOri,
SHPOcal, GetKcl, textureIndex; see docs/reference/texture_model.md). The reference numbers are
written here; GSAS-II's harmonics are float32, so agreement is to ~1e-6 relative."""
import math

import numpy as np
import pytest

from midasflow.crystal import _A_to_G, cell_to_A, laue_rotations, phase_from_cell
from midasflow.profile import march_dollase
from midasflow.texture import harmonics as sh
from midasflow.texture.po import sh_po_design

LAM = 1.5406
CUBIC = (5.4117, 5.4117, 5.4117, 90, 90, 90)
HEX = (3.21, 3.21, 5.21, 90, 90, 120)
ORTHO = (8.48, 5.40, 6.96, 90, 90, 90)


def _tth(hkl, cell):
    G = _A_to_G(cell_to_A(cell))
    h = np.asarray(hkl, float)
    d = 1 / np.sqrt(np.einsum("ni,ij,nj->n", h, G, h))
    return 2 * np.degrees(np.arcsin(LAM / (2 * d)))


def _md(cell, sg, hkl, axis, r):
    ph = phase_from_cell("x", cell, sg)
    orbits = np.einsum("ni,rij->nrj", np.asarray(hkl, float), laue_rotations(ph.space_group))
    return march_dollase(orbits, axis, r, _A_to_G(cell_to_A(cell)))


def test_march_dollase_cubic_axis_001_values_and_derivatives():
    hkl = [(1, 1, 1), (2, 0, 0), (2, 2, 0), (3, 1, 1)]
    p08, d08 = _md(CUBIC, "F m -3 m", hkl, (0, 0, 1), 0.8)
    p12, d12 = _md(CUBIC, "F m -3 m", hkl, (0, 0, 1), 1.2)
    np.testing.assert_allclose(p08, [0.93387212, 1.12806950, 0.96422044, 1.02289667], rtol=1e-7)
    np.testing.assert_allclose(d08, [0.68032881, -1.54697906, 0.42561519, -0.23134958], rtol=1e-7)
    np.testing.assert_allclose(p12, [0.94894250, 1.06925733, 0.98830010, 1.01343291], rtol=1e-7)
    np.testing.assert_allclose(d12, [-0.46327128, 0.61319203, -0.07136641, 0.10462295], rtol=1e-6)


@pytest.mark.parametrize("cell, sg, axis, hkl, at08, at12", [
    (CUBIC, "F m -3 m", (1, 1, 1), [(1, 1, 1), (2, 0, 0), (2, 2, 0), (3, 1, 1)],
     [1.07174326, 0.93387212, 1.00338215, 0.98365320], [1.02200304, 0.94894250, 1.02035013, 0.98901205]),
    (HEX, "P 63/m m c", (0, 0, 1), [(1, 0, 0), (1, 1, 0), (0, 0, 2), (1, 0, 1), (1, 0, 2)],
     [0.71554175, 0.71554175, 1.95312500, 0.84956113, 1.12368335],
     [1.31453414, 1.31453414, 0.57870370, 1.05035625, 0.80419867]),
    (ORTHO, "P n m a", (0, 1, 0), [(1, 0, 1), (1, 1, 1), (2, 1, 0), (0, 2, 0)],
     [0.71554175, 1.08660260, 0.97452130, 1.95312500], [1.31453414, 0.82641318, 0.91023743, 0.57870370]),
])
def test_march_dollase_other_axes(cell, sg, axis, hkl, at08, at12):
    np.testing.assert_allclose(_md(cell, sg, hkl, axis, 0.8)[0], at08, rtol=1e-7)
    np.testing.assert_allclose(_md(cell, sg, hkl, axis, 1.2)[0], at12, rtol=1e-7)


def test_coefficient_names_follow_gsas2():
    assert sh.coefficient_names("m3m", 2) == []
    assert sh.coefficient_names("m3m", 4) == ["C(4,1)"]
    assert sh.coefficient_names("m3m", 6) == ["C(4,1)", "C(6,1)"]
    assert sh.coefficient_names("m3m", 12) == ["C(4,1)", "C(6,1)", "C(8,1)", "C(10,1)", "C(12,1)",
                                               "C(12,2)"]
    assert sh.coefficient_names("6/mmm", 4) == ["C(2,0)", "C(4,0)"]
    assert sh.coefficient_names("6/mmm", 6) == ["C(2,0)", "C(4,0)", "C(6,0)", "C(6,6)"]
    assert sh.coefficient_names("mmm", 4) == ["C(2,0)", "C(2,2)", "C(4,0)", "C(4,2)", "C(4,4)"]
    assert sh.coefficient_names("mmm", 4, "mmm")[:3] == ["C(2,0,0)", "C(2,0,2)", "C(2,2,0)"]
    assert "C(2,-2)" in sh.coefficient_names("2/m", 2)


def test_cubic_harmonics_and_sample_harmonics():
    phi, beta = sh.crystal_angles([(1, 1, 1), (2, 0, 0), (2, 2, 0), (3, 1, 1), (0, 0, 1), (1, 1, 0)],
                                  CUBIC, "m3m")
    np.testing.assert_allclose(phi[:4], [54.735610, 90, 90, 72.451599], atol=1e-6)
    np.testing.assert_allclose(beta[:4], [45, 0, 45, 18.434949], atol=1e-6)
    np.testing.assert_allclose(sh.crystal_harmonic(4, 1, "m3m", phi[:3], beta[:3]),
                               [-0.430907, 0.646360, -0.161590], atol=2e-6)
    np.testing.assert_allclose(sh.crystal_harmonic(6, 1, "m3m", phi[[4, 0, 5]], beta[[4, 0, 5]]),
                               [-0.359602, -0.639292, 0.584353], atol=2e-6)
    np.testing.assert_allclose([sh.sample_harmonic(2, 0, 90.0), sh.sample_harmonic(4, 0, 90.0)],
                               [-0.3153916, 0.3173566], atol=2e-7)
    # closed form K_4^1 = sqrt(21/64π)(5 S4 − 3) for a unit vector u of h
    u = np.array([3, 1, 1]) / math.sqrt(11)
    assert sh.crystal_harmonic(4, 1, "m3m", phi[3], beta[3]) == pytest.approx(
        math.sqrt(21 / (64 * math.pi)) * (5 * np.sum(u ** 4) - 3), abs=1e-6)


@pytest.mark.parametrize("geometry", ["DS", "BB"])
def test_sh_preferred_orientation_cubic(geometry):
    hkl = np.array([(1, 1, 1), (2, 0, 0), (2, 2, 0), (3, 1, 1)])
    tth = _tth(hkl, CUBIC)
    np.testing.assert_allclose(tth, [28.545684, 33.079382, 47.481335, 56.339776], atol=1e-5)
    psi = tth / 2 if geometry == "DS" else 90.0
    D = sh_po_design(hkl, CUBIC, "m3m", ["C(4,1)", "C(6,1)"], psi)
    o4 = 1 + D[:, 0] * 0.5
    o6 = 1 + D @ [0.5, -0.3]
    ref = {"DS": ([0.81866903, 1.23811147, 0.97092797, 1.00844951],
                  [0.90273553, 1.26956385, 0.99552414, 1.00387061]),
           "BB": ([0.90452971, 1.14320543, 0.96419863, 1.03077142],
                  [0.84560415, 1.11005980, 1.01806027, 1.02638853])}[geometry]
    np.testing.assert_allclose(o4, ref[0], atol=2e-6)
    np.testing.assert_allclose(o6, ref[1], atol=2e-6)
    if geometry == "DS":     # ∂A/∂C of (111)
        np.testing.assert_allclose(D[0], [-0.3626619, -0.2802217], atol=1e-6)


@pytest.mark.parametrize("cell, laue, hkl, coef, ds, bb", [
    (HEX, "6/mmm", [(1, 0, 0), (0, 0, 2), (1, 0, 1), (1, 0, 2)], [0.4, -0.2],
     [0.77489218, 1.22828571, 0.96938439, 1.11268684], [1.07187504, 0.72500000, 1.05160503, 0.96886602]),
    (ORTHO, "mmm", [(1, 0, 1), (1, 1, 1), (2, 1, 0), (0, 0, 2), (0, 2, 0)], [0.3, -0.2, 0.1, 0.05, -0.1],
     [1.04175907, 1.01680372, 0.89615982, 1.35450401, 1.01508472],
     [0.97296399, 0.97384929, 1.13173089, 0.88749997, None]),
])
def test_sh_preferred_orientation_hexagonal_orthorhombic(cell, laue, hkl, coef, ds, bb):
    names = sh.coefficient_names(laue, 4)
    hkl = np.array(hkl)
    A_ds = 1 + sh_po_design(hkl, cell, laue, names, _tth(hkl, cell) / 2) @ coef
    A_bb = 1 + sh_po_design(hkl, cell, laue, names, 90.0) @ coef
    np.testing.assert_allclose(A_ds, ds, atol=2e-6)
    keep = [i for i, v in enumerate(bb) if v is not None]
    np.testing.assert_allclose(A_bb[keep], [bb[i] for i in keep], atol=2e-6)


def test_texture_index():
    assert sh.texture_index({"C(4,1)": 0.5}) == pytest.approx(1.0277778, abs=1e-7)
    assert sh.texture_index({"C(4,1)": 0.5, "C(6,1)": -0.3}) == pytest.approx(1.0347009, abs=1e-7)
    assert sh.texture_index({"C(2,0)": 0.4, "C(4,0)": -0.2}) == pytest.approx(1.0364444, abs=1e-7)
    assert sh.texture_index(dict(zip(sh.coefficient_names("mmm", 4), [0.3, -0.2, 0.1, 0.05, -0.1]))) \
        == pytest.approx(1.0285, abs=1e-7)
    assert sh.texture_index({"0:0:C(4,0,1)": 0.5, "C(4,2,1)": 0.3, "C(4,4,1)": -0.2}) \
        == pytest.approx(1.0422222, abs=1e-7)
