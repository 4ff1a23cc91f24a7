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


def test_find_peaks_equals_scipy():
    """The start estimate's peak finder gives scipy.signal.find_peaks' peaks and half-prominence
    widths (sums of Gaussians with noise, rounded counts with flat tops, random walks)."""
    from scipy.signal import find_peaks

    from midasflow.refinement.start import _find_peaks

    rng = np.random.default_rng(5)
    found = 0
    for trial in range(300):
        n = int(rng.integers(3, 700))
        x = np.linspace(0.0, 10.0, n)
        y = sum(rng.uniform(5, 200) * np.exp(-0.5 * ((x - rng.uniform(0, 10))
                                                       / rng.uniform(0.02, 0.5)) ** 2)
                for _ in range(int(rng.integers(0, 8))))
        y = y + rng.normal(size=n) * rng.uniform(0.5, 5)
        if trial % 3 == 1:
            y = np.round(y)                 # integer counts: plateaus
        elif trial % 3 == 2:
            y = rng.normal(size=n).cumsum()
        threshold = rng.uniform(0.5, 30)
        want, props = find_peaks(y, prominence=threshold, width=1.0, rel_height=0.5)
        got, widths = _find_peaks(y, threshold)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(widths, props["widths"], rtol=1e-12, atol=1e-12)
        found += got.size
    assert found > 300


def test_two_column_nnls_equals_scipy():
    from scipy.optimize import nnls

    from midasflow.refinement.start import _nnls2

    rng = np.random.default_rng(6)
    for _ in range(300):
        a = np.abs(rng.normal(size=(int(rng.integers(2, 9)), 2)))
        b = rng.normal(size=a.shape[0]) + rng.uniform(-1, 2) * a @ rng.normal(size=2)
        want, _ = nnls(a, b)
        got = np.array(_nnls2(a, b))
        assert np.all(got >= 0)
        assert np.sum((a @ got - b) ** 2) == pytest.approx(np.sum((a @ want - b) ** 2),
                                                          rel=1e-9, abs=1e-12)


def test_pseudo_voigt_fits_match_least_squares():
    """The all-peaks-at-once bounded LM reaches scipy.optimize.least_squares' minimum for each
    peak (free and bound-held η)."""
    from scipy.optimize import least_squares

    from midasflow.refinement.start import _fit_pseudo_voigts, _pv_batch

    rng = np.random.default_rng(7)
    truth = np.array([[5.0, 40.0, 0.05, 0.3, 100.0, 5.0], [7.2, 10.0, 0.08, 0.0, 80.0, -3.0],
                      [9.1, 25.0, 0.04, 1.0, 60.0, 0.0], [3.3, 60.0, 0.06, 0.7, 120.0, 10.0]])
    windows, p0 = [], []
    for t in truth:
        x = np.arange(t[0] - 3 * t[2], t[0] + 3 * t[2], t[2] / 4)
        y0 = _pv_batch(t[None], x[None])[0]
        s = np.sqrt(y0)
        windows.append((x, y0 + rng.normal(size=x.size) * s, s))
        p0.append([t[0] + 0.3 * t[2], t[1] * 1.3, t[2] * 1.4, 0.5, 0.0, 0.0])
    p0 = np.array(p0)
    fw0, zero, inf = p0[:, 2], np.zeros(len(p0)), np.full(len(p0), np.inf)
    lower = np.column_stack([p0[:, 0] - fw0, zero, 0.1 * fw0, zero, -inf, -inf])
    upper = np.column_stack([p0[:, 0] + fw0, inf, 5 * fw0, zero + 1, inf, inf])
    fits, converged = _fit_pseudo_voigts(windows, p0, lower, upper)
    assert converged.all()
    assert fits[1, 3] == 0.0 and fits[2, 3] == 1.0        # η held on its bounds
    for (x, y, s), start, lo, hi, got in zip(windows, p0, lower, upper, fits):
        ref = least_squares(lambda p: (_pv_batch(p[None], x[None])[0] - y) / s, start,
                            bounds=(lo, hi), x_scale="jac", xtol=1e-15, ftol=1e-15, gtol=1e-15)
        def chi2(p):
            return float(np.sum(((_pv_batch(p[None], x[None])[0] - y) / s) ** 2))

        assert chi2(got) <= chi2(ref.x) * (1 + 1e-9)
        np.testing.assert_allclose(got[:4], ref.x[:4], rtol=1e-5, atol=1e-6)


def test_low_envelope_equals_its_definition():
    """The envelope's normal equations, updated by the points that join or leave the kept set,
    give the weighted least squares of the final kept set formed afresh, and that set is the
    points not more than 1.5 σ above it."""
    x, y, s, _, inst = simulate_fine(ceo2(), 0.172979, 2.0, 12.0, 0.006, seed=2)
    basis = PatternModel(x, (x[0], x[-1]), [ceo2()], inst, 6).bkg_basis
    coef, bkg = low_envelope(basis, y, s)
    keep = y - bkg <= 1.5 * s
    assert 0.2 * y.size < keep.sum() < y.size
    w = keep / s ** 2
    direct = np.linalg.lstsq(basis * np.sqrt(w)[:, None], y * np.sqrt(w), rcond=None)[0]
    np.testing.assert_allclose(coef, direct, rtol=1e-9, atol=1e-9 * np.abs(direct).max())
