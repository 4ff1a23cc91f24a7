"""The harmonics against GSAS-II itself for every kind of Laue class (skipped without GSAS-II;
GSASII_PATH=/opt/gsas2): names (GenSHCoeffT), crystal angles (CrsAng), K_l^n (GetKcl) and the
powder SH correction (SHPOcal) at random coefficients."""
import numpy as np
import pytest

from midasflow.crystal import phase_from_cell, reflections
from midasflow.errors import BackendError
from midasflow.texture import harmonics as sh
from midasflow.texture.po import sh_po_design

CASES = [("P 1 21/c 1", (5.1, 6.2, 7.3, 90, 101.0, 90)), ("P -1", (5.1, 6.2, 7.3, 81.0, 97.0, 103.0)),
         ("P 4/m", (4.2, 4.2, 6.1, 90, 90, 90)), ("I 4/m m m", (4.2, 4.2, 6.1, 90, 90, 90)),
         ("P -3", (4.9, 4.9, 5.4, 90, 90, 120)), ("P -3 m 1", (4.9, 4.9, 5.4, 90, 90, 120)),
         ("P -3 1 m", (4.9, 4.9, 5.4, 90, 90, 120)), ("P 6/m", (4.9, 4.9, 5.4, 90, 90, 120)),
         ("P 63/m m c", (3.21, 3.21, 5.21, 90, 90, 120)), ("P n m a", (8.48, 5.40, 6.96, 90, 90, 90)),
         ("P m -3", (5.4, 5.4, 5.4, 90, 90, 90)), ("F m -3 m", (5.4117, 5.4117, 5.4117, 90, 90, 90))]


@pytest.fixture(scope="module")
def g2():
    from midasflow.refinement.gsas2 import import_gsasii

    try:
        import_gsasii()
    except BackendError as exc:
        pytest.skip(str(exc))
    from GSASII import GSASIIlattice as G2lat
    from GSASII import GSASIIspc as G2spc

    G2lat.ptx.pyqlmninit()
    return G2lat, G2spc


@pytest.mark.parametrize("symbol, cell", CASES)
def test_harmonics_and_sh_correction_match_gsas2(g2, symbol, cell):
    G2lat, G2spc = g2
    phase = phase_from_cell("x", cell, symbol)
    sgdata = G2spc.SpcGroup(symbol)[1]
    assert phase.laue == sgdata["SGLaue"]
    order = 8
    names = G2lat.GenSHCoeffT(sgdata["SGLaue"], "0", order, False)
    assert sh.coefficient_names(phase.laue, order) == names
    refl = reflections(phase, 1.5406, 80.0)
    hkl = refl.hkl[:25].astype(float)
    tth = refl.tth_deg[:25]
    phi_g2, beta_g2 = G2lat.CrsAng(hkl, list(cell), sgdata)
    phi, beta = sh.crystal_angles(hkl, cell, phase.laue, phase.unique_axis)
    np.testing.assert_allclose(phi, phi_g2, atol=1e-6)
    np.testing.assert_allclose(beta, beta_g2, atol=1e-6)
    coef = np.random.default_rng(1).normal(scale=0.3, size=len(names))
    ours = 1 + sh_po_design(hkl, cell, phase.laue, names, tth / 2, phase.unique_axis) @ coef
    theirs = np.ones(len(hkl))
    for name, c in zip(names, coef):
        l, n = (int(v) for v in name[2:-1].split(","))
        ksl = np.array([G2lat.GetKsl(l, 0, "0", t / 2, 0.0)[0][0] for t in tth])
        theirs += c * G2lat.Lnorm(l) * np.asarray(G2lat.GetKcl(l, n, sgdata["SGLaue"], phi_g2, beta_g2)) * ksl
    np.testing.assert_allclose(ours, theirs, atol=5e-6)
