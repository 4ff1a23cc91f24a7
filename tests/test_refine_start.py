"""Start values from the data (midasflow.refinement.start) and the independence of the refined
cell from start widths and point spacing, on engine-simulated patterns with realistic widths."""


import numpy as np
import pytest

from midasflow.profile import peak_sig2_gam, tch_fwhm_eta
from midasflow.refinement.engine import PatternModel, refine_pattern
from midasflow.refinement.start import estimate_start, low_envelope
from phase_helpers import ceo2, zno

#: Realistic high-energy widths: FWHM ≈ 0.04–0.06° over the range (U..Y in centideg², centideg).
TRUE = {"U": 8.0, "V": -1.0, "W": 3.0, "X": 1.2, "Y": 6.0, "Z": 0.0, "SH/L": 0.002,
        "Polariz.": 0.99, "Zero": 0.0}






def narrow(inst, factor=10.0):
    """The same instrument with every width ``factor`` times too small."""
    out = dict(inst)
    for k in ("U", "V", "W"):
        out[k] = inst[k] / factor ** 2
    for k in ("X", "Y"):
        out[k] = inst[k] / factor
    return out


def simulate_fine(phase, lam, lo, hi, step, seed, peak_max=3e4):
    """Noisy pattern on a grid of ``step`` (deg) and the model's values."""
    inst = dict(TRUE, Lam=lam)
    x = np.arange(lo, hi, step)
    model = PatternModel(x, (x[0], x[-1]), [phase], inst, 6)
    vals = dict(model.values, **{"Back;0": 400.0, "Back;1": -60.0, "Back;2": 15.0})
    peaks = model.evaluate(vals)[0] - model.background(vals)
    vals["Scale"] = peak_max / peaks.max()
    y = model.evaluate(vals)[0]
    rng = np.random.default_rng(seed)
    return x, y + rng.normal(size=y.size) * np.sqrt(y), np.sqrt(y), vals, inst


def rebin_pairs(x, y, s):
    """The same counts in bins twice as wide (mean of pairs of points)."""
    n = x.size // 2 * 2
    return (x[:n].reshape(-1, 2).mean(1), y[:n].reshape(-1, 2).mean(1),
            np.sqrt((s[:n].reshape(-1, 2) ** 2).sum(1)) / 2)


def fwhm_deg(values, tth, lam):
    sg = peak_sig2_gam(np.atleast_1d(tth), values["U"], values["V"], values["W"], values["X"],
                       values["Y"], 0.0, lam_a=lam)
    return np.array([tch_fwhm_eta(a, b)[0] for a, b in zip(sg.sig2, sg.gam)]) / 100


@pytest.mark.parametrize("lam,lo,hi,step", [(0.172979, 2.0, 12.0, 0.006),
                                            (0.413263, 5.0, 30.0, 0.012)])
def test_estimate_start_measures_widths_scale_background(lam, lo, hi, step):
    x, y, s, truth, inst = simulate_fine(ceo2(), lam, lo, hi, step, seed=1)
    est = estimate_start(x, y, s, [ceo2()], narrow(inst))
    mid = np.array([lo + 0.3 * (hi - lo), lo + 0.7 * (hi - lo)])
    true_fw = fwhm_deg(truth, mid, lam)
    assert 0.04 < true_fw.min() and true_fw.max() < 0.1
    got = fwhm_deg(dict(est, Z=0.0), mid, lam)
    assert np.all(np.abs(got / true_fw - 1) < 0.25), (got, true_fw)
    # the instrument's (U..Y 10× too narrow; the sample terms stay) widths were not used
    assert np.all(fwhm_deg(narrow(inst), mid, lam) < 0.3 * got)
    assert est["Scale"] == pytest.approx(truth["Scale"], rel=0.15)
    model = PatternModel(x, (x[0], x[-1]), [ceo2()], inst, 6)
    bkg_true = model.background(truth)
    bkg_est = model.background(est)
    # a start, not the answer: the peaks' tails lift the envelope where they crowd
    assert np.median(np.abs(bkg_est - bkg_true) / bkg_true) < 0.05


def test_low_envelope_ignores_peaks():
    x, y, s, truth, inst = simulate_fine(ceo2(), 0.172979, 2.0, 12.0, 0.006, seed=2)
    model = PatternModel(x, (x[0], x[-1]), [ceo2()], inst, 6)
    _, bkg = low_envelope(model.bkg_basis, y, s)
    assert np.max(np.abs(bkg - model.background(truth))) < 3 * np.median(s)


@pytest.mark.parametrize("phase_fn,lam,lo,hi,step,seed", [
    (ceo2, 0.172979, 2.0, 12.0, 0.006, 3),
    (zno, 0.413263, 5.0, 30.0, 0.012, 4),
])
def test_cell_independent_of_start_widths_and_spacing(phase_fn, lam, lo, hi, step, seed):
    true = phase_fn()
    x, y, s, _, inst = simulate_fine(true, lam, lo, hi, step / 2, seed)
    xc, yc, sc = rebin_pairs(x, y, s)
    start = true.with_cell([v * 1.001 if i < 3 else v for i, v in enumerate(true.cell)])
    right = refine_pattern(xc, yc, sc, [start], inst)
    for res in (right,):
        assert res.status == "ok" and 0.9 < res.gof < 1.15, (res.gof, res.warnings)
    others = {"10x narrow": refine_pattern(xc, yc, sc, [start], narrow(inst)),
              "10x narrow, no estimate": refine_pattern(xc, yc, sc, [start], narrow(inst),
                                                        estimate=False),
              "half step": refine_pattern(x, y, s, [start], narrow(inst))}
    for label, res in others.items():
        assert res.status == "ok", (label, res.message)
        for i in range(3):
            a0, esd = right.cells[true.name][i], right.cell_esds[true.name][i]
            diff = abs(res.cells[true.name][i] - a0)
            assert diff <= esd and diff <= 20e-6 * a0, (label, i, diff, esd)
