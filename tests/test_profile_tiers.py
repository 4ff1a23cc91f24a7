"""The profile's two kernel tiers: numpy (first use, no numba import) and numba give bit-identical
results, a new process refines its first pattern without importing numba, and the numpy tier
hands over to the compiled one when its budget is spent or a call is too large for it."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from midasflow import profile as P
from midasflow import profile_compiled as C
from midasflow import profile_numpy as N
from midasflow.profile_constants import FSTTERM, NTERMS

LAM = 0.172979


def test_float64_tables_equal_numbas_gauleg():
    total = int(FSTTERM[-1] + NTERMS[-1] // 2)
    xp, wp = np.empty(total), np.empty(total)
    for n, first in zip(NTERMS, FSTTERM):
        C._gauleg_into(n, 3.0e-14, xp, wp, first, np.float64)
    xq, wq = N.gauss_legendre_f64()
    np.testing.assert_array_equal(xq, xp)
    np.testing.assert_array_equal(wq, wp)


def _peak_args(doublet: bool, shl: float, n_peaks: int = 15, seed: int = 3):
    """Arguments of the peaks kernels for a random pattern, as profile.pattern builds them."""
    rng = np.random.default_rng(seed)
    x = np.linspace(2.0, 30.0, 2000) if doublet else np.linspace(2.0, 12.0, 1500)
    pos = np.sort(rng.uniform(x[0] + 0.5, x[-1] - 0.5, n_peaks))
    sg = P.peak_sig2_gam(pos, 1.163, -0.126, 0.063, 0.2, 0.5, 0.05, lam_a=LAM)
    inten = rng.uniform(100.0, 1000.0, n_peaks)
    return x, pos, sg.sig2, sg.gam, inten, shl


@pytest.mark.parametrize("doublet,shl", [(False, 0.002), (False, 0.03), (True, 0.05)])
@pytest.mark.parametrize("deriv", [False, True])
def test_numpy_peaks_equal_numba_bit_for_bit(doublet, shl, deriv):
    x, pos, sig2, gam, inten, shl = _peak_args(doublet, shl)
    kw = dict(lam1_a=1.5406, lam2_a=1.5444, i_ratio=0.5) if doublet else {}
    # run both tiers through profile.pattern's own preparation, then the kernels directly
    _, xp, wp = P._tables("float64")
    pos_all = np.concatenate([pos, P.kalpha2_position_deg(pos, 1.5406, 1.5444)[0]]) if doublet \
        else pos
    s2 = np.concatenate([sig2, sig2]) if doublet else sig2
    gm = np.concatenate([gam, gam]) if doublet else gam
    lo_deg, hi_deg = P.peak_window(pos_all, s2, gm, shl)
    lo, hi = P.window_indices(x, lo_deg, hi_deg)
    hi = np.where(hi - lo >= 2, hi, lo)
    off = np.concatenate([[0], np.cumsum(hi - lo)[:-1]]).astype(np.int64)
    scale = np.linspace(0.5, 1.5, pos_all.size)
    pos_fac = np.linspace(1.0, 1.1, pos_all.size)
    rows = 5 if deriv else 1
    out_c = np.zeros((rows, int((hi - lo).sum())))
    out_n = np.zeros_like(out_c)
    args = (x, pos_all, s2, gm, shl, xp, wp, lo, hi, off, scale, pos_fac, deriv)
    C.peaks_f64(*args, out_c)
    used = N.peaks_f64(*args, out_n, max_work=10**9)
    n_nodes = (used - N.CALL_OVERHEAD_ELEMENTS) // ((2 if deriv else 1) * int((hi - lo).sum()))
    assert n_nodes == 1 if shl == 0.002 else n_nodes > 10     # one node, and many (padded)
    assert np.abs(out_c).max() > 0
    np.testing.assert_array_equal(out_n, out_c)
    # the whole pattern through either tier: identical too (accumulate and project included)
    res = P.pattern(x, pos, sig2, gam, inten, shl, derivatives=True, precision="float64", **kw)
    y_n = N.accumulate(res.lo, res.offsets, inten, res.d_intensity, x.size)
    y_c = np.zeros(x.size)
    C.accumulate(res.lo, res.offsets, inten, res.d_intensity, y_c)
    np.testing.assert_array_equal(y_n, y_c)
    coef = np.random.default_rng(0).normal(size=(2, pos.size, 4))
    coef[0, ::3, 1] = 0.0                   # numba skips zero coefficients; numpy adds zeros
    pieces = np.stack([res.d_intensity, res.d_pos])
    out_pc, out_pn = np.zeros((4, x.size)), np.zeros((4, x.size))
    C.project(res.lo, res.offsets, pieces, coef, out_pc)
    N.project(res.lo, res.offsets, pieces, coef, out_pn)
    np.testing.assert_array_equal(out_pn, out_pc)


def test_numpy_peaks_refuse_a_call_over_their_budget():
    x, pos, sig2, gam, _, shl = _peak_args(False, 0.002)
    _, xp, wp = P._tables("float64")
    lo, hi = P.window_indices(x, *P.peak_window(pos, sig2, gam, shl))
    off = np.concatenate([[0], np.cumsum(hi - lo)[:-1]]).astype(np.int64)
    out = np.zeros((1, int((hi - lo).sum())))
    ones = np.ones(pos.size)
    args = (x, pos, sig2, gam, shl, xp, wp, lo, hi, off, ones, ones, False, out)
    need = N.peaks_f64(*args, max_work=10**9)
    out[:] = 0.0
    assert N.peaks_f64(*args, max_work=need - 1) == -1
    assert not out.any()                    # refused before writing anything
    assert N.peaks_f64(*args, max_work=need) == need


def test_tch_widths_float64_equal_numba_and_arrays_equal_scalars():
    rng = np.random.default_rng(1)
    sig2, gam = rng.uniform(0.001, 50.0, 200), rng.uniform(0.001, 20.0, 200)
    fwhm, eta = P.tch_fwhm_eta(sig2, gam, precision="float64")
    ref = np.array([C.tch_widths(s, g, np.float64)[:2] for s, g in zip(sig2, gam)])
    np.testing.assert_array_equal(fwhm, ref[:, 0])
    np.testing.assert_array_equal(eta, ref[:, 1])
    assert P.tch_fwhm_eta(sig2[7], gam[7], precision="float64") == (fwhm[7], eta[7])
    f32 = P.tch_fwhm_eta(sig2[:5], gam[:5])         # GSAS-II's float32 through numba
    assert f32[0].shape == (5,)
    assert f32[0][2] == P.tch_fwhm_eta(float(sig2[2]), float(gam[2]))[0]


_NEW_PROCESS = """
import json, sys
import numpy as np
from midasflow.crystal import cubic_phase
from midasflow.instrument import Instrument
from midasflow.refinement.engine import PatternModel, refine_pattern
from midasflow import profile

inst = Instrument(lam=0.172979, polariz=0.99, zero=0.0, U=1.163, V=-0.126, W=0.063, X=0.2,
                  Y=0.5, Z=0.0, shl=0.002)
x = np.linspace(2.5, 12.0, 1000)
model = PatternModel(x, (x[0], x[-1]), [cubic_phase("CeO2", 5.4113)], inst, 6)
vals = dict(model.values, **{"Back;0": 100.0, "Back;1": -20.0})
y = model.evaluate(vals)[0]
vals["Scale"] = 2e4 / np.abs(y - model.background(vals)).max()
y = model.evaluate(vals)[0]
s = np.sqrt(y)
y = y + np.random.default_rng(0).normal(size=y.size) * s
start = inst.replace(U=1.6, V=-0.1, W=0.09, X=0.3, Y=0.7)
first = refine_pattern(x, y, s, [cubic_phase("CeO2", 5.4113 * 1.003)], start)
numba_after_first = "numba" in sys.modules
left = profile._numpy_tier["left"]
profile.use_compiled_kernels()
again = refine_pattern(x, y, s, [cubic_phase("CeO2", 5.4113 * 1.003)], start)
print(json.dumps({"numba_after_first": numba_after_first, "left": left,
                  "numba_at_end": "numba" in sys.modules,
                  "first": [first.values, first.esds, first.rwp],
                  "again": [again.values, again.esds, again.rwp]}))
"""


@pytest.mark.slow
def test_first_refinement_in_a_new_process_runs_without_numba_and_equals_the_compiled():
    out = subprocess.run([sys.executable, "-c", _NEW_PROCESS], capture_output=True, text=True,
                         check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["numba_after_first"] is False
    assert 0 < res["left"] < P.NUMPY_TIER_BUDGET       # the numpy tier did the work
    assert res["numba_at_end"] is True
    assert res["first"] == res["again"]                 # bit-identical through either tier


def test_large_call_hands_over_to_the_compiled_kernels(monkeypatch):
    monkeypatch.setitem(P._numpy_tier, "left", 10**9)
    monkeypatch.setattr(P, "NUMPY_TIER_MAX_CALL", 10)
    monkeypatch.setattr(P, "_numba_loaded", lambda: False)           # as in a new process
    calls = []
    monkeypatch.setattr(C, "peaks_f64", lambda *a, kernel=C.peaks_f64: calls.append(kernel(*a)))
    x, pos, sig2, gam, inten, shl = _peak_args(False, 0.002)
    res = P.pattern(x, pos, sig2, gam, inten, shl, precision="float64")
    assert P._numpy_tier["left"] == 0 and len(calls) == 1
    assert P._numpy_tier_open() is False
    monkeypatch.setattr(P, "_numba_loaded", lambda: True)
    monkeypatch.setitem(P._numpy_tier, "left", 10**9)
    assert P._numpy_tier_open() is False                # numba in the process: compiled
    monkeypatch.setattr(P, "_numba_loaded", lambda: False)
    monkeypatch.setitem(P._numpy_tier, "left", 10**9)
    monkeypatch.setattr(P, "NUMPY_TIER_MAX_CALL", 10**9)
    ref = P.pattern(x, pos, sig2, gam, inten, shl, precision="float64")
    assert len(calls) == 1                  # the numpy tier, now with budget
    np.testing.assert_array_equal(res.y, ref.y)


def test_spent_budget_hands_over_to_the_compiled_kernels(monkeypatch):
    monkeypatch.setattr(P, "_numba_loaded", lambda: False)
    monkeypatch.setattr(P, "NUMPY_TIER_MAX_CALL", 10**9)
    calls = []
    monkeypatch.setattr(C, "peaks_f64", lambda *a, kernel=C.peaks_f64: calls.append(kernel(*a)))
    x, pos, sig2, gam, inten, shl = _peak_args(False, 0.002)
    monkeypatch.setitem(P._numpy_tier, "left", 10**9)
    first = P.pattern(x, pos, sig2, gam, inten, shl, precision="float64")
    one_call = 10**9 - P._numpy_tier["left"]
    assert one_call > N.CALL_OVERHEAD_ELEMENTS and not calls
    monkeypatch.setitem(P._numpy_tier, "left", one_call)      # room for exactly one more call
    P.pattern(x, pos, sig2, gam, inten, shl, precision="float64")
    assert P._numpy_tier["left"] == 0 and not calls
    again = P.pattern(x, pos, sig2, gam, inten, shl, precision="float64")
    assert len(calls) == 1
    np.testing.assert_array_equal(again.y, first.y)
