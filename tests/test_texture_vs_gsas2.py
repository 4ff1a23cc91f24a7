"""The harmonics against GSAS-II itself for every kind of Laue class (skipped without GSAS-II;
GSASII_PATH=/opt/gsas2): names (GenSHCoeffT), crystal angles (CrsAng), K_l^n (GetKcl) and the
powder SH correction (SHPOcal) at random coefficients."""
import math

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


# ------------------------------------------------- the texture stage in both backends
G2_INST = {"Type": "PXC", "Bank": 1, "Lam": 0.172979, "Zero": 0.0, "Polariz.": 0.99, "Azimuth": 0.0,
           "U": 5.0, "V": -1.0, "W": 2.0, "X": 0.5, "Y": 1.0, "Z": 0.0, "SH/L": 0.005}
G2_X = np.arange(2.5, 12.0, 0.005)


def _textured_lineout(phase, truth, texture, po_axis=(0, 0, 1), sh_order=4, seed=0):
    """A lineout of the built-in engine's forward model with ``truth`` texture, Poisson noise
    (in GSAS-II's float32 arithmetic, as the lineouts these tests were measured on)."""
    from midasflow.refinement.engine import PatternModel

    model = PatternModel(G2_X, (G2_X[0], G2_X[-1]), [phase], G2_INST, 3, texture=texture,
                         po_axis=po_axis, sh_order=sh_order, precision="float32")
    values = dict(model.values, **{"Back;0": 200.0, "Back;1": -30.0}, **truth)
    peaks = model.evaluate(values)[0] - model.evaluate(dict(values, Scale=0.0))[0]
    values["Scale"] = 3e4 / peaks.max()
    y = np.random.default_rng(seed).poisson(model.evaluate(values)[0]).astype(float)
    return y, np.sqrt(np.maximum(y, 1.0))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["zno-md-001", "ceo2-sh-6"])
def test_gsas2_texture_stage_agrees_with_the_native_engine(gsasii, tmp_path, case):
    """The same simulated textured lineout refined by both backends with --texture: GSAS-II's own
    'Pref.Ori.' (MD along [001]; cylindrical harmonics of order 6) recovers the simulated texture
    and agrees with the built-in engine within 2 combined esds."""
    from midasflow.crystal import write_phase_cif
    from midasflow.refinement.engine import refine_pattern
    from midasflow.refinement.gsas2 import refine_pattern_gsas2
    from phase_helpers import ceo2, zno

    phase_fn, texture, order, truth = {
        "zno-md-001": (zno, "md", 4, {"0:0:MD": 0.8}),
        "ceo2-sh-6": (ceo2, "sh", 6, {"0:0:C(4,1)": 0.4, "0:0:C(6,1)": -0.25})}[case]
    y, s = _textured_lineout(phase_fn(), truth, texture, sh_order=order)
    cif = write_phase_cif(phase_fn(), tmp_path / f"{phase_fn().name}.cif")
    native = refine_pattern(G2_X, y, s, [phase_fn()], G2_INST, bkg_terms=3, texture=texture, sh_order=order)
    g2 = refine_pattern_gsas2(G2_X, y, s, [cif], G2_INST, workdir=tmp_path, index=0, bkg_terms=3,
                              texture=texture, sh_order=order)
    assert native.status == g2.status == "ok", g2.message
    assert "texture_rolled_back" not in native.flags + g2.flags, g2.warnings
    assert list(g2.stage_rwp)[-1] == "texture" and g2.stage_rwp["texture"] < 0.5 * g2.stage_rwp["profile_lorentz"]
    for name, true in truth.items():
        e_n, e_g = native.esds[name], g2.esds[name]
        assert 0 < e_g < 0.01 and abs(g2.values[name] - true) < 3 * e_g, (name, g2.values[name], e_g)
        assert abs(g2.values[name] - native.values[name]) < 2 * math.hypot(e_n, e_g), name
    # the project keeps the refined texture for the GSAS-II GUI
    project = gsasii.G2Project(gpxfile=str(tmp_path / "hist_0000" / "hist_0000.gpx"))
    po = project.phases()[0].data["Histograms"][project.histograms()[0].name]["Pref.Ori."]
    assert po[0] == texture.upper() and po[2] is True
    assert not list((tmp_path / "hist_0000").glob("*before_texture*"))


@pytest.mark.slow
def test_gsas2_texture_stage_is_undone_when_not_determined(gsasii, tmp_path, monkeypatch):
    """A texture stage the rules reject is undone in GSAS-II too: the project and the result are
    those of the refinement without texture, flagged texture_rolled_back; a cubic phase at order
    2 has no harmonic and skips the stage with a note."""
    from midasflow.crystal import write_phase_cif
    from midasflow.refinement import gsas2
    from phase_helpers import ceo2

    y, s = _textured_lineout(ceo2(), {}, None)
    cif = write_phase_cif(ceo2(), tmp_path / "CeO2.cif")
    run = dict(workdir=tmp_path, bkg_terms=3)
    plain = gsas2.refine_pattern_gsas2(G2_X, y, s, [cif], G2_INST, index=0, **run)
    monkeypatch.setattr(gsas2, "_texture_problems", lambda *a: "forced by the test")
    undone = gsas2.refine_pattern_gsas2(G2_X, y, s, [cif], G2_INST, index=1, texture="md", po_axis=(1, 1, 1), **run)
    assert undone.flags == ("texture_rolled_back",)
    assert undone.warnings[-1] == ("texture_rolled_back: stage 'texture' forced by the test; kept the "
                                   "previous stage")
    assert undone.stage_rwp["texture"] == undone.stage_rwp["profile_lorentz"] == undone.rwp
    assert undone.cells["CeO2"] == plain.cells["CeO2"] and undone.values["0:0:MD"] == 1.0
    assert "0:0:MD" not in undone.esds
    skipped = gsas2.refine_pattern_gsas2(G2_X, y, s, [cif], G2_INST, index=2, texture="sh", sh_order=2, **run)
    assert "texture" not in skipped.stage_rwp and skipped.flags == ()
    assert any("no symmetry-allowed harmonic" in n for n in skipped.notes)
