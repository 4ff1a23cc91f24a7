"""Honest esds from pixel-split cakes: the shared-pixel fraction, the esd rescaling, and the pulls
of per-lineout a and of the strain tensor over noise realisations of a simulated strained scan."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from midasflow.refinement.lineouts import independent_fraction
from midasflow.refinement.result import PatternResult


@pytest.mark.parametrize("r_bin_px, eta_bin_deg", [(0.25, 30.0), (0.5, 5.0), (2.0, 30.0)])
def test_independent_fraction_matches_the_bin_map(r_bin_px, eta_bin_deg):
    """The size-based f against Σa²/Σa of the exact bin map, averaged over each η column."""
    from midasflow.binmap import build_binmap
    from midasflow.simulate import ceo2_params

    params = ceo2_params((192, 192), r_bin_px=r_bin_px, eta_bin_deg=eta_bin_deg)
    bm = build_binmap(params)
    sq = np.asarray(bm.areas.multiply(bm.areas).sum(axis=1)).reshape(bm.n_r, bm.n_eta)
    r = 0.5 * (bm.r_edges_px[1:] + bm.r_edges_px[:-1])
    eta = 0.5 * (bm.eta_edges_deg[1:] + bm.eta_edges_deg[:-1])
    exact = independent_fraction(r, eta, bin_area=bm.bin_area, bin_area_sq=sq)
    approx = independent_fraction(r, eta)
    used = bm.bin_area > 0
    # a lineout's mean f within 8 % (its esd factor within 4 %); over the whole cake within 2 %
    for e in range(bm.n_eta):
        col = used[:, e]
        assert np.mean(approx[col, e]) == pytest.approx(np.mean(exact[col, e]), rel=0.08)
    assert np.mean(approx[used]) == pytest.approx(np.mean(exact[used]), rel=0.02)
    assert 0.2 < np.mean(exact[used]) < 0.9  # bins share pixels in all three


def test_esds_are_rescaled_to_the_independent_points():
    res = PatternResult(status="ok", message="", rwp=5.0, rp=4.0, chi2=250.0, gof=0.5, n_points=1004,
                        n_dropped=0, values={"a": 1.0, "b": 2.0}, esds={"a": 1e-3, "b": 2e-3, "c": 0.1, "d": 1.0},
                        cells={"P": (5.0,) * 3 + (90.0,) * 3 + (125.0,)}, cell_esds={"P": (1e-5,) * 7},
                        phase_fractions={"P": (1.0, 0.01)}, covariance=np.diag([1e-6, 4e-6, 1e-2, 1.0]))
    out = res.with_independent_fraction(0.25)
    factor = np.sqrt((1004 - 4) / (0.25 * 1004 - 4))
    assert out.esds["a"] == pytest.approx(1e-3 * factor) and out.esds["d"] == pytest.approx(factor)
    assert out.cell_esds["P"] == pytest.approx((1e-5 * factor,) * 7)
    assert np.sqrt(np.diag(out.covariance)) == pytest.approx(list(out.esds.values()))
    assert out.phase_fractions["P"] == pytest.approx((1.0, 0.01 * factor))
    assert out.gof == res.gof and out.cells == res.cells  # GSAS-II's GOF, values untouched
    assert out.notes[-1].startswith(f"esds × {factor:.3g}: neighbouring bins share detector pixels")
    assert res.with_independent_fraction(1.0) is res
    failed = dataclasses.replace(res, status="failed")
    assert failed.with_independent_fraction(0.25) is failed


#: The pull test's scan: strain with every component, two ω-groups 90° apart (one frame each),
#: 45° η bins, pixel-wide R bins, photon counting; the pattern is the engine's CeO2 model with
#: SH/L = 0.005 (above GSAS-II's 0.002 floor: with the truth on the floor ~40 % of the fits end
#: there, flagged shl_at_floor, and the cell errs by ~0.4·ρ esd, ρ ≈ −0.7 its correlation with
#: SH/L: zz pull mean −0.9; docs/reference/gsas2_profile.md section 6).
PULL_SHL = 0.005
PULL_TENSOR = np.array([[2.0e-4, 1.0e-4, -1.0e-4], [1.0e-4, -4.0e-4, 1.5e-4], [-1.0e-4, 1.5e-4, 8.0e-4]])
N_REALISATIONS = 50


@pytest.mark.slow
def test_pulls_of_lineout_cells_and_of_the_strain_tensor_have_unit_spread(tmp_path):
    """50 Poisson realisations of one strained scan, caked and refined as the pipeline does:
    (estimate − truth)/esd of every lineout's a and of each sample-frame tensor component has
    |mean| ≤ 0.3 and a standard deviation between 0.8 and 1.3."""
    import xarray as xr

    from midasflow import pipeline
    from midasflow.binmap import build_binmap
    from midasflow.caking import cake
    from midasflow.crystal import cubic_phase, write_phase_cif
    from midasflow.simulate import CEO2_A_A, ceo2_params, simulate_frames
    from midasflow.strain import COMPONENTS, components_from_tensor, lineout_design

    params = ceo2_params((192, 192), r_bin_px=1.0, eta_bin_deg=45.0, omega_sum_frames=1, omega_step_deg=90.0)
    inst = tuple((k, PULL_SHL if k == "SH/L" else v) for k, v in params.instrument_overrides)
    params = params.with_overrides(instrument_overrides=inst)
    phase = cubic_phase("CeO2", CEO2_A_A)
    cif = write_phase_cif(phase, tmp_path / "CeO2.cif")
    expected, _ = simulate_frames(params, phase, n_frames=2, strain_tensor=PULL_TENSOR, background=50.0,
                                  counts=2000.0, supersample=4, dtype=np.float64)
    binmap = build_binmap(params)
    truth = components_from_tensor(PULL_TENSOR)
    rng = np.random.default_rng(20261130)
    a_pulls, tensor_pulls = [], []
    for k in range(N_REALISATIONS):
        frames = xr.DataArray(rng.poisson(expected).astype(np.float64), dims=("frame", "z", "y"),
                              coords={"frame": [0, 1], "omega": ("frame", [0.0, 90.0])})
        caked = cake(frames, params, binmap=binmap).compute()
        res = pipeline.refine(caked, [cif], out=tmp_path / f"r{k}", export=False, report=False, refine_atoms=False)
        assert (res.status.values == "ok").all() and str(res.strain_sample_status.values[0]) == "ok"
        theta = res.strain_theta_deg.values[0]
        for g in range(res.sizes["group"]):
            for e in range(res.sizes["eta"]):
                row = lineout_design(theta[g, e], float(res.eta_deg[e]), eta_width_deg=45.0,
                                     omega_deg=[float(res.omega_deg[g])])
                a_true = CEO2_A_A * (1.0 + row @ truth)
                a_pulls.append((res.a_a.values[0, g, e] - a_true) / res.a_a_esd.values[0, g, e])
        tensor_pulls.append((res.strain_sample.values[0] - truth) / res.strain_sample_esd.values[0])
    a_pulls, tensor_pulls = np.array(a_pulls), np.array(tensor_pulls)
    report = {"a": (a_pulls.mean(), a_pulls.std(ddof=1))}
    report.update({c: (tensor_pulls[:, i].mean(), tensor_pulls[:, i].std(ddof=1)) for i, c in enumerate(COMPONENTS)})
    print("pulls (mean, sd):", {k: (round(m, 2), round(s, 2)) for k, (m, s) in report.items()})
    for name, (mean, sd) in report.items():
        assert abs(mean) <= 0.3 and 0.8 <= sd <= 1.3, (name, mean, sd)


def test_the_plan_carries_the_fraction_and_every_backend_result_is_rescaled():
    """A cake with quarter-pixel R bins: each lineout knows f, and the executor rescales the esds
    its backend returned (here the toy backend; the GSAS-II backend goes the same way)."""
    from lineouts_helpers import TOY_OPTIONS, ToyBackend, make_caked, toy_refine
    from midasflow.refinement.lineouts import plan_lineouts, run_serial

    caked = make_caked(n_groups=1, n_eta=4, height=3000.0)
    caked = caked.assign_coords(r_px=("r", 200.0 + 0.25 * np.arange(caked.sizes["r"])))
    plan = plan_lineouts(caked)
    f = plan[0].independent_fraction
    assert f == pytest.approx((0.25 - 0.25**2 / 3) * (1 - 1 / (3 * 200.0 * np.pi / 2)), rel=1e-3)
    result = run_serial(plan[:1], TOY_OPTIONS, backend=ToyBackend())[0]
    raw = toy_refine(plan[0].tth_deg, plan[0].intensity, plan[0].sigma)
    n, n_var = raw.n_points, len(raw.esds)
    factor = np.sqrt((n - n_var) / (f * n - n_var))
    assert result.pattern.cell_esds["CeO2"][0] == pytest.approx(raw.cell_esds["CeO2"][0] * factor, rel=1e-9)
    assert plan_lineouts(caked.drop_vars("r_px"))[0].independent_fraction == 1.0  # no pixel size: as given


@pytest.mark.parametrize("width_px", [0.25, 0.5, 1.0, 2.0])
def test_noise_correlation_is_the_pixel_bin_overlap_shape(width_px):
    """Unit pixels split over R bins of width w at every offset: bins k apart share
    Σ_j o_j,b·o_j,b+k of a pixel's variance (o the overlaps), averaged over the offsets;
    noise_correlation gives that shape relative to lag 0, times the independent fraction."""
    from midasflow.refinement.lineouts import noise_correlation

    lags = noise_correlation(width_px, 0.5)
    shared = np.zeros(len(lags) + 2)
    offsets = (np.arange(2000) + 0.5) / 2000
    for phi in offsets:
        lo = phi + width_px * np.arange(len(shared))[:, None]          # bins 0, 1, … from phi
        pixels = np.arange(-2, int(np.ceil(width_px * len(shared))) + 3)[None, :]
        overlap = np.clip(np.minimum(lo + width_px, pixels + 1) - np.maximum(lo, pixels), 0, None)
        shared += overlap @ overlap[0]
    assert lags[0] == 0.5
    np.testing.assert_allclose(np.array(lags) / 0.5, shared[:len(lags)] / shared[0], atol=2e-4)
    assert np.all(shared[len(lags):] < 1e-9 * shared[0])              # no lag beyond the last
    assert noise_correlation(width_px, 1.0) == ()                       # independent bins
    assert noise_correlation(1.0, 2 / 3) == pytest.approx((2 / 3, 1 / 6), rel=1e-4)


def test_covariance_is_the_estimators_own_under_correlated_noise():
    """Linear least squares with noise of lag correlations c (units of σσ): the sandwich
    covariance the engine reports equals the scatter of the estimates over 20,000 noise draws,
    and the χ² expectation it scales by equals their mean χ²; without the correlations the
    GSAS-II covariance is returned."""
    from midasflow.refinement.engine import _covariance, _normal_inverse

    rng = np.random.default_rng(7)
    n = 120
    x = np.linspace(-1, 1, n)
    sigma = 0.5 + x**2
    J = np.column_stack([np.ones(n), x, np.exp(-(x / 0.05) ** 2)])
    Jw = J / sigma[:, None]
    c = (0.6, 0.2, 0.05)
    R = sum(ck * (np.eye(n, k=k) + (np.eye(n, k=-k) if k else 0)) for k, ck in enumerate(c))
    noise = rng.multivariate_normal(np.zeros(n), R, size=20000) * sigma   # correlated, σ-scaled
    beta = np.linalg.lstsq(Jw, (noise / sigma).T, rcond=None)[0].T
    chi2 = np.sum(((noise - beta @ J.T) / sigma) ** 2, axis=1)
    n_inv = _normal_inverse(Jw)
    cov, expected = _covariance(Jw, n_inv, float(chi2.mean()), c)
    assert expected == pytest.approx(chi2.mean(), rel=0.01)
    np.testing.assert_allclose(np.sqrt(np.diag(cov)), beta.std(axis=0), rtol=0.02)
    np.testing.assert_allclose(cov, np.cov(beta.T), atol=0.03 * np.sqrt(np.outer(np.diag(cov), np.diag(cov))).max())
    plain, dof = _covariance(Jw, n_inv, 50.0, None)
    assert dof == n - 3 and np.allclose(plain, n_inv * 50.0 / (n - 3))
