"""The texture stage of the native engine (stage 5): March–Dollase along a chosen axis and
spherical-harmonics preferred orientation, on patterns simulated by the engine's own model."""
import numpy as np
import pytest

from midasflow.refinement.engine import PatternModel, refine_pattern
from phase_helpers import ceo2, zno

LAM = 0.172979
INST = {"Lam": LAM, "Polariz.": 0.99, "Zero": 0.0, "U": 1.163, "V": -0.126, "W": 0.063,
        "X": 0.2, "Y": 0.5, "Z": 0.0, "SH/L": 0.002}
X = np.linspace(2.5, 12.0, 3000)


def simulate(phase, truth, *, texture=None, po_axis=(0, 0, 1), sh_order=4, seed=0, peak_max=2e4):
    """Noisy pattern (σ = sqrt(y)) with the texture parameters in ``truth``."""
    model = PatternModel(X, (X[0], X[-1]), [phase], INST, 6, texture=texture, po_axis=po_axis,
                         sh_order=sh_order)
    vals = dict(model.values, **{"Back;0": 100.0, "Back;1": -20.0}, **truth)
    y0, _, _ = model.evaluate(vals)
    vals["Scale"] = peak_max / (y0 - model.evaluate(dict(vals, Scale=0.0))[0]).max()
    y, _, _ = model.evaluate(vals)
    sig = np.sqrt(y)
    return y + np.random.default_rng(seed).normal(size=y.size) * sig, sig


def test_jacobian_of_texture_parameters():
    model = PatternModel(X, (X[0], X[-1]), [zno()], INST, 4, texture="sh", sh_order=6,
                         precision="float64")
    vals = dict(model.values, **{"Scale": 1e-2, "0:0:MD": 0.8, "0:0:C(2,0)": 0.3,
                                 "0:0:C(4,0)": -0.2, "0:0:C(6,6)": 0.1})
    vary = ["0:0:MD", "0:0:C(2,0)", "0:0:C(4,0)", "0:0:C(6,0)", "0:0:C(6,6)"]
    _, _, J = model.evaluate(vals, vary, jac=True)
    for c, name in enumerate(vary):
        h = 1e-6
        num = (model.evaluate(dict(vals, **{name: vals[name] + h}))[0]
               - model.evaluate(dict(vals, **{name: vals[name] - h}))[0]) / (2 * h)
        assert np.abs(num).max() > 0
        assert np.abs(J[:, c] - num).max() < 1e-4 * np.abs(num).max(), name


@pytest.mark.parametrize("phase_fn, axis, r", [(zno, (0, 0, 1), 0.8), (zno, (1, 0, 0), 1.25),
                                               (ceo2, (1, 1, 1), 0.85)])
def test_march_dollase_ratio_recovered_along_chosen_axis(phase_fn, axis, r):
    y, s = simulate(phase_fn(), {"0:0:MD": r}, po_axis=axis)
    res = refine_pattern(X, y, s, [phase_fn()], INST, texture="md", po_axis=axis)
    assert res.status == "ok"
    assert "texture" in res.stage_rwp and "texture_rolled_back" not in res.flags, res.warnings
    assert abs(res.values["0:0:MD"] - r) < 3 * res.esds["0:0:MD"]
    assert res.esds["0:0:MD"] < 0.02
    # without the stage the texture is left in the residual
    plain = refine_pattern(X, y, s, [phase_fn()], INST)
    assert res.rwp < plain.rwp


def test_sh_coefficients_recovered_cubic_order_6():
    truth = {"0:0:C(4,1)": 0.4, "0:0:C(6,1)": -0.25}
    y, s = simulate(ceo2(), truth, texture="sh", sh_order=6)
    res = refine_pattern(X, y, s, [ceo2()], INST, texture="sh", sh_order=6)
    assert "texture_rolled_back" not in res.flags, res.warnings
    for name, v in truth.items():
        assert abs(res.values[name] - v) < 3 * res.esds[name], (name, res.values[name], res.esds[name])
    assert any("texture index J" in n for n in res.notes)


def test_untextured_cubic_march_dollase_is_rolled_back_not_singular():
    y, s = simulate(ceo2(), {})
    res = refine_pattern(X, y, s, [ceo2()], INST, texture="md")
    assert res.status == "ok"
    assert "bad_esd" not in res.flags
    assert "0:0:MD" not in res.esds and res.values["0:0:MD"] == 1.0
    assert "texture_rolled_back" in res.flags and "rolled_back" not in res.flags
    assert any(w.startswith("texture_rolled_back: stage 'texture'") for w in res.warnings), res.warnings


def test_cubic_order_2_has_no_harmonics_stage_skipped():
    y, s = simulate(ceo2(), {})
    res = refine_pattern(X, y, s, [ceo2()], INST, texture="sh", sh_order=2)
    assert res.status == "ok" and "texture_rolled_back" not in res.flags
    assert "texture" not in res.stage_rwp
    assert any("no symmetry-allowed harmonic" in n for n in res.notes)


def test_extracted_intensities_match_the_model_within_esd():
    truth = {"0:0:MD": 0.8}
    y, s = simulate(zno(), truth, po_axis=(0, 0, 1), seed=3)
    res = refine_pattern(X, y, s, [zno()], INST, texture="md")
    t = res.reflections["ZnO"]
    seen = np.isfinite(t["i_obs"])
    assert seen.sum() > 10
    strong = seen & (t["intensity"] > 20 * t["i_obs_esd"])
    pull = (t["i_obs"][strong] - t["intensity"][strong]) / t["i_obs_esd"][strong]
    assert strong.sum() > 5 and np.abs(pull).max() < 5 and 0.3 < pull.std() < 2.0, pull
    # the model without texture misses the (00l) intensities the extraction keeps
    plain = refine_pattern(X, y, s, [zno()], INST)
    tp = plain.reflections["ZnO"]
    i002 = np.flatnonzero((tp["h"] == 0) & (tp["k"] == 0) & (tp["l"] == 2))[0]
    assert abs(tp["i_obs"][i002] - t["i_obs"][i002]) < 3 * t["i_obs_esd"][i002] + 0.02 * t["i_obs"][i002]
    assert abs(tp["intensity"][i002] - tp["i_obs"][i002]) > 5 * tp["i_obs_esd"][i002]


def test_texture_options_and_flags():
    from midasflow.cli.refine import build_parser, refine_options
    from midasflow.errors import ParameterError
    from midasflow.instrument import Instrument
    from midasflow.refinement.options import RefineOptions

    args = build_parser().parse_args(["--data", "x.zarr.zip", "--cif", "a.cif", "--texture", "md",
                                      "--po-axis", "1", "1", "1", "--sh-order", "6"])
    opts = refine_options(args)
    assert (opts["texture"], opts["po_axis"], opts["sh_order"]) == ("md", (1, 1, 1), 6)
    base = RefineOptions(phases=(ceo2(),), instrument=Instrument(lam=LAM))
    with_md = base.replace(texture="md", po_axis=[1, 1, 1])
    assert with_md.texture_kwargs() == {"texture": "md", "po_axis": (1, 1, 1), "sh_order": 4}
    assert with_md.digest() != base.digest()
    for bad, match in (({"texture": "xyz"}, "--texture 'xyz'"), ({"po_axis": (0, 0, 0)}, "--po-axis 0 0 0"),
                       ({"sh_order": 13}, "--sh-order 13"), ({"po_axis": (1.5, 0, 0)}, "--po-axis")):
        with pytest.raises(ParameterError, match=match):
            base.replace(**bad)



def test_extracted_intensities_from_the_final_evaluation_equal_a_fresh_one():
    """``extract_intensities`` given the final evaluation (as the engine's ``_finish`` does)
    equals it evaluating the unit profiles itself, coincident reflections (CeO2 333/511) shared."""
    from midasflow.texture.intensities import extract_intensities

    y, sig = simulate(ceo2(), {})
    res = refine_pattern(X, y, sig, [ceo2()], INST)
    model = PatternModel(X, (X[0], X[-1]), [ceo2()], INST, 6)
    vals = dict(model.values, **res.values)
    evaluated = model._evaluate(vals, list(res.esds), jac=True)[3]
    given = extract_intensities(model, vals, y, 1 / sig, res.gof, evaluated)["CeO2"]
    fresh = extract_intensities(model, vals, y, 1 / sig, res.gof)["CeO2"]
    for a, b in zip(given, fresh):
        assert np.isfinite(a).sum() > 10
        np.testing.assert_allclose(a, b, rtol=1e-9, equal_nan=True)
    np.testing.assert_allclose(res.reflections["CeO2"]["i_obs"], given[0], rtol=1e-6, equal_nan=True)
