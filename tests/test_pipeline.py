"""End to end: simulated frames of a strained CeO2 sample → caking → one refinement per lineout →
lattice parameters and strain, checked against the simulated truth.

The scan (module fixture, simulated and integrated once): a 320×320 detector, three frames at
ω = 0°, 60°, 120° (one frame per ω-group), 15° η bins, Poisson noise, the demo's strain tensor.
A stress-free scan of the same instrument gives the reference cell, as on a beamline; the
refinement runs on a real two-worker ``LocalCluster``.

Refinement mode is Le Bail: the simulator draws ring heights ∝ multiplicity·|F|² without the
Lorentz–polarisation factor a Rietveld model applies, so only Le Bail (free intensities) matches
its patterns.

Why the reference cell comes from a stress-free scan and not from the simulated a0: the simulator
draws symmetric pseudo-Voigt rings, while GSAS-II's profile (and the engine's) always carries the
FCJ axial-divergence asymmetry with SH/L ≥ 0.002 (gsas2_cw_profile.md: "GSAS-II can never
compute a symmetric peak"). The refined cell of symmetric peaks is therefore biased by about
−4e-5 (relative) at these 2θ, the same for every lineout. ``test_a_against_simulated_a0`` records
that shortfall (strict xfail); everything else is checked against the stress-free reference.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from midasflow import pipeline, strain
from midasflow.cli.demo import DEMO_STRAIN, make_demo_scan
from midasflow.simulate import CEO2_A_A

SIZE = 320
ETA_BIN_DEG = 15.0
COUNTS = 40000.0  # peak height of the strongest ring: keeps Poisson scatter of a well below 2e-5
TOL = 2e-5
MODE = "lebail"


def _scan(folder, *, n_frames, strain_tensor, seed):
    files, truth, cif = make_demo_scan(folder, n_frames=n_frames, sum_frames=1, size=SIZE, seed=seed,
                                       omega_step_deg=60.0, eta_bin_deg=ETA_BIN_DEG,
                                       strain_tensor=strain_tensor, supersample=4, counts=COUNTS)
    return files, truth, cif


@pytest.fixture(scope="module")
def client():
    from midasflow.cluster import close_client, get_client

    client, _ = get_client(n_workers=2, dashboard=False)
    yield client
    close_client(client)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, client):
    root = tmp_path_factory.mktemp("e2e")
    cache = root / "binmaps"
    files0, _, cif0 = _scan(root / "unstrained", n_frames=1, strain_tensor=None, seed=2)
    store0 = pipeline.integrate(files0.params_file, files0.data, result_folder=root / "unstrained",
                                cache_dir=cache)
    ref = pipeline.refine(store0, [cif0], out=root / "unstrained" / "refinement", mode=MODE,
                          client=client, export=False, report=False)
    a_ref = float(np.mean(ref.a_a.values))
    files, truth, cif = _scan(root / "strained", n_frames=3, strain_tensor=DEMO_STRAIN, seed=1)
    store = pipeline.integrate(files.params_file, files.data, result_folder=root / "strained",
                               cache_dir=cache)
    out = root / "strained" / "refinement"
    results = pipeline.refine(store, [cif], out=out, mode=MODE, client=client,
                              ref_cells={"CeO2": (a_ref,) * 3 + (90.0,) * 3})
    return dict(results=results, reference=ref, a_ref=a_ref, store=store, cif=cif, out=out,
                truth=truth)


def _expected_strain(results):
    """ε = nᵀ ε_lab n per lineout at the lineout's θ (strain_theta_deg) and the group's ω."""
    th = results.strain_theta_deg.values[0]
    eta = results.eta_deg.values
    return np.array([strain.normal_strain(th[g], eta, DEMO_STRAIN, om)
                     for g, om in enumerate(results.omega_deg.values)])


def test_every_lineout_succeeds(e2e):
    r = e2e["results"]
    assert r.sizes["group"] == 3 and r.sizes["eta"] == int(360 / ETA_BIN_DEG)
    np.testing.assert_allclose(r.omega_deg.values, [0.0, 60.0, 120.0])
    assert (r.status.values == "ok").all(), r.message.values[r.status.values != "ok"]
    assert (e2e["reference"].status.values == "ok").all()
    assert (r.n_points.values > 20).all()
    # Le Bail fits of Poisson data: small Rwp, GOF near 1 off the cardinal η bins
    assert np.nanmax(r.rwp.values) < 6.0
    assert 0.5 < np.median(r.gof.values) < 3.0


def test_refined_a_per_lineout_matches_the_strained_truth(e2e):
    r = e2e["results"]
    a = r.a_a.values[0]
    expected = e2e["a_ref"] * (1.0 + _expected_strain(r))
    err = a / expected - 1.0
    assert np.abs(err).max() < TOL, f"max |Δa/a| = {np.abs(err).max():.2e}"
    # the strain signal itself is 40× the tolerance: a flat (unstrained) answer would fail
    assert np.ptp(_expected_strain(r)) > 40 * TOL
    # the θ the strain is evaluated at is the one of the strong low-angle reflections
    th = r.strain_theta_deg.values[0]
    assert np.all((th > 2.0) & (th < 5.5))
    # the reference scan itself: scatter well below the tolerance, and its bias (the profile-model
    # shortfall explained in the module docstring) small and negative
    ref_a = e2e["reference"].a_a.values[0]
    assert np.std(ref_a) / e2e["a_ref"] < 0.5 * TOL
    assert -8e-5 < e2e["a_ref"] / CEO2_A_A - 1.0 < 0.0


@pytest.mark.xfail(strict=True, reason="simulator draws symmetric pseudo-Voigt rings; GSAS-II's "
                   "profile has FCJ asymmetry with SH/L >= 0.002, which biases a by about -4e-5")
def test_a_against_simulated_a0(e2e):
    r = e2e["results"]
    err = r.a_a.values[0] / (CEO2_A_A * (1.0 + _expected_strain(r))) - 1.0
    assert np.abs(err).max() < TOL


def test_strain_fits_recover_the_simulated_tensor(e2e):
    r = e2e["results"]
    comps = list(r.component.values)
    in_plane = [comps.index(c) for c in ("yy", "zz", "yz")]
    for g, om in enumerate(r.omega_deg.values):
        rz = strain.rotation_z(om)
        lab = strain.components_from_tensor(rz @ DEMO_STRAIN @ rz.T)
        assert r.strain_lab_status.values[0, g] == "ok"
        np.testing.assert_allclose(r.strain_lab.values[0, g, in_plane], lab[in_plane], rtol=0, atol=TOL)
        assert np.all(r.strain_lab_esd.values[0, g, in_plane] < 0.5 * TOL)
    assert r.strain_sample_status.values[0] == "ok"
    np.testing.assert_allclose(r.strain_sample.values[0], strain.components_from_tensor(DEMO_STRAIN),
                               rtol=0, atol=TOL)
    # per-lineout strain is a/a_ref - 1
    np.testing.assert_allclose(r.strain.values[0], r.a_a.values[0] / e2e["a_ref"] - 1.0, rtol=0, atol=1e-12)


def test_two_worker_cluster_matches_single_process(e2e):
    from midasflow.crystal import read_phases
    from midasflow.io.instprm import instrument_from_midas
    from midasflow.refine.lineouts import plan_lineouts, run_serial

    r = e2e["results"]
    plan = plan_lineouts(e2e["store"])
    subset = plan[::7]  # every group, spread over η
    common = dict(phases=read_phases([e2e["cif"]]), instprm=instrument_from_midas(e2e["store"]).to_dict(),
                  bkg_terms=6, limits=None, refine_atoms=False, mode=MODE)
    serial = run_serial(subset, None, common)
    for res in serial:
        assert res.status == "ok"
        g, e = res.group, res.eta_index
        assert int(r.histogram_index.values[g, e]) == res.index
        np.testing.assert_allclose(r.a_a.values[0, g, e], res.pattern.cells["CeO2"][0], rtol=1e-10, atol=0)
        np.testing.assert_allclose(r.rwp.values[g, e], res.pattern.rwp, rtol=1e-10, atol=0)
        np.testing.assert_allclose(r.a_a_esd.values[0, g, e], res.pattern.cell_esds["CeO2"][0], rtol=1e-8)


def test_summary_and_results_store_read_back(e2e):
    from midasflow.results import open_results

    r, out = e2e["results"], e2e["out"]
    summary = json.loads((out / "refinement_summary.json").read_text())
    for key in ("data_file", "total_histograms", "succeeded", "failed", "skipped", "mean_Rwp", "histograms"):
        assert key in summary
    n = r.sizes["group"] * r.sizes["eta"]
    assert summary["data_file"] == str(e2e["store"])
    assert (summary["total_histograms"], summary["succeeded"], summary["failed"], summary["skipped"]) == (n, n, 0, 0)
    assert summary["mean_Rwp"] == pytest.approx(float(np.mean(r.rwp.values)), rel=1e-12)
    hists = summary["histograms"]
    assert [h["histogram_index"] for h in hists] == list(range(n))
    n_eta = r.sizes["eta"]
    for h in hists:
        g, e = divmod(h["histogram_index"], n_eta)
        assert h["status"] == "ok"
        assert h["Rwp"] == pytest.approx(float(r.rwp.values[g, e]), rel=1e-12)
        assert h["omega_deg"] == pytest.approx(float(r.omega_deg.values[g]))
        assert h["eta_deg"] == pytest.approx(float(r.eta_deg.values[e]))
        [phase] = h["phases"]
        assert phase["name"] == "CeO2"
        assert phase["cell"][0] == pytest.approx(float(r.a_a.values[0, g, e]), rel=1e-12)
        assert len(phase["cell"]) == 7
    assert summary["strain"]["CeO2"]["sample"]["status"] == "ok"

    back = open_results(out / "results.zarr")
    assert set(back.dims) == {"phase", "group", "eta", "component"}
    for name in ("a_a", "a_a_esd", "b_a", "c_a", "alpha_deg", "beta_deg", "gamma_deg", "volume_a3",
                 "phase_scale", "phase_fraction", "strain", "strain_esd", "strain_theta_deg", "rwp", "gof",
                 "zero", "u", "v", "w", "x", "y", "shl", "n_points", "status", "warnings",
                 "strain_lab", "strain_lab_esd", "strain_sample", "strain_sample_esd"):
        assert name in back.variables, name
    np.testing.assert_array_equal(back.a_a.values, r.a_a.values)
    np.testing.assert_array_equal(back.status.values, r.status.values)
    np.testing.assert_array_equal(back.omega_deg.values, r.omega_deg.values)
    np.testing.assert_array_equal(back.histogram_index.values, r.histogram_index.values)
    # per-lineout exports, numbered as GSAS-II's importer numbers them, and the report
    for index in (0, n - 1):
        assert (out / f"hist_{index:04d}_data.csv").is_file()
        assert (out / f"hist_{index:04d}_CeO2.cif").is_file()
    assert (out / "report.html").stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------
# failures and resume, on a six-lineout slice of the scan (serial, in-process)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(e2e):
    from midasflow.io.caked_store import open_caked

    ds = open_caked(e2e["store"]).isel(group=[0], eta=slice(0, 6)).load()
    return ds, e2e["cif"]


class _Counting:
    """The built-in engine, counting its calls; raises KeyboardInterrupt at call ``interrupt_at``."""

    def __init__(self, interrupt_at: int | None = None):
        from midasflow.refine.engine import refine_pattern

        self.fn, self.calls, self.interrupt_at = refine_pattern, [], interrupt_at

    def __call__(self, tth, y, s, **kw):
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        self.calls.append(float(tth[0]))
        return self.fn(tth, y, s, **kw)


def _use_engine(monkeypatch, engine):
    import midasflow.refine.lineouts as lineouts

    monkeypatch.setattr(lineouts, "default_refine_fn", lambda: engine)


def test_a_bad_lineout_is_reported_while_the_others_succeed(small, tmp_path):
    ds, cif = small
    bad = ds.copy(deep=True)
    bad["intensity"][0, :, 2] = 0.0  # all-zero pattern: the engine refuses it -> failed
    bad["intensity"][0, :, 4] = np.nan  # no usable bins -> skipped, as GSAS-II's importer skips it
    r = pipeline.refine(bad, [cif], out=tmp_path, mode=MODE, export=False, report=False)
    assert list(r.status.values[0]) == ["ok", "ok", "failed", "ok", "skipped", "ok"]
    assert r.message.values[0, 2].startswith("PatternError")
    assert np.isnan(r.a_a.values[0, 0, 2]) and np.isfinite(r.a_a.values[0, 0, [0, 1, 3, 5]]).all()
    summary = json.loads((tmp_path / "refinement_summary.json").read_text())
    assert (summary["succeeded"], summary["failed"], summary["skipped"]) == (4, 1, 1)
    assert summary["histograms"][2]["status"] == "failed" and summary["histograms"][2]["Rwp"] is None


def test_resume_after_interruption_refines_only_what_is_missing(small, tmp_path, monkeypatch):
    ds, cif = small
    options = dict(out=tmp_path, mode=MODE, export=False, report=False)
    interrupted = _Counting(interrupt_at=4)
    _use_engine(monkeypatch, interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.refine(ds, [cif], **options)
    assert len(list((tmp_path / "lineouts").glob("hist_*.pkl"))) == 4

    resumed = _Counting()
    _use_engine(monkeypatch, resumed)
    r = pipeline.refine(ds, [cif], resume=True, **options)
    assert len(resumed.calls) == 2
    assert (r.status.values == "ok").all()

    # delete two checkpoints: exactly those two are refined again, to the same numbers
    for index in (1, 3):
        (tmp_path / "lineouts" / f"hist_{index:04d}.pkl").unlink()
    again = _Counting()
    _use_engine(monkeypatch, again)
    r2 = pipeline.refine(ds, [cif], resume=True, **options)
    assert len(again.calls) == 2
    np.testing.assert_array_equal(r2.a_a.values, r.a_a.values)
    np.testing.assert_array_equal(r2.rwp.values, r.rwp.values)

    # without --resume everything is refined again
    fresh = _Counting()
    _use_engine(monkeypatch, fresh)
    pipeline.refine(ds, [cif], **options)
    assert len(fresh.calls) == 6
