"""End to end: simulated frames of a strained CeO2 sample → caking → one refinement per lineout →
lattice parameters and strain, checked against the simulated truth.

The scan (module fixture, simulated and integrated once): a 320×320 detector, three frames at
ω = 0°, 60°, 120° (one frame per ω-group), 15° η bins, Poisson noise, the demo's strain tensor.
The simulator draws the rings with the refinement engine's own model (GSAS-II CW profile with FCJ
asymmetry, Lorentz–polarisation, |F|²) and writes the instrument terms into the parameter file,
so the refinement (Rietveld, the default) runs on a real two-worker ``LocalCluster`` from a
calibrated instrument and is compared with the TRUE a0. These tests are marked ``slow``; the
failure and resume tests below use a small scan of their own and stay in the quick lane.

What "the truth" of one lineout is: its rings sit at different θ_k, and a lab-frame shear with
an x component (ε_xy, ε_xz ≠ 0 at ω = 60°, 120°) strains them differently,
ε_k = n(θ_k, η)ᵀ ε_lab n(θ_k, η). One cubic a per lineout is the least-squares combination
Σ_k c_k ε_k, with c_k the response of the refined ln a to a shift of reflection k alone
(``_response_weights``: Σ c_k = 1). The results' ``strain_theta_deg`` (intensity-weighted mean θ,
≈ 2.9° here where the response-weighted θ is ≈ 3.7°) is a coarser summary: with it the lineouts
of the ω = 60°/120° groups differ from the refined a by up to ≈ 3.4e-5. A second, smaller effect:
the recipe refines SH/L per lineout, and an FCJ asymmetry change shifts rings by a θ-dependent
amount, so part of a θ-dependent strain goes into SH/L instead of a (1-D, noise-free: up to
9e-6 when SH/L rises above its 0.002 floor; < 1e-6 with SH/L fixed).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from midasflow import pipeline, strain
from midasflow.cli.demo import DEMO_STRAIN, make_demo_scan
from midasflow.refinement import engine
from midasflow.simulate import CEO2_A_A

SIZE = 320
ETA_BIN_DEG = 15.0
COUNTS = 60000.0  # highest point of the pattern (uint16 data): Poisson esd of a ≈ 6e-6
TOL = 2e-5
#: per-lineout |Δa/a|: with f′/f″ in the simulated intensities, lineout (ω 0°, η bin 1) refines
#: SH/L to 0.00235 for the true 0.002 (χ²(SH/L) has its minimum there: the θ-dependent strain
#: looks like asymmetry) and a moves with it by −2.5e-5 (3.9 esd).
A_TOL = 3e-5


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, client):
    root = tmp_path_factory.mktemp("e2e")
    files, truth, cif = make_demo_scan(root, n_frames=3, sum_frames=1, size=SIZE, seed=1, omega_step_deg=60.0,
                                       eta_bin_deg=ETA_BIN_DEG, strain_tensor=DEMO_STRAIN, supersample=4,
                                       counts=COUNTS)
    store = pipeline.integrate(files.params_file, files.data, result_folder=root, cache_dir=root / "binmaps")
    out = root / "refinement"
    results = pipeline.refine(store, [cif], out=out, client=client, refine_atoms=False)  # strain work
    return dict(results=results, store=store, cif=cif, out=out, truth=truth)


def _response_weights(tth_deg, sigma, truth):
    """c_k: change of the refined ln a per unit strain of reflection k alone (single-parameter
    least squares, overlaps included; the other refined parameters are ignored), from the
    simulated profile of every reflection on the lineout's points."""
    from midasflow import profile

    inst = truth["instrument"]
    tth0 = truth["tth0_deg"]
    sg = profile.peak_sig2_gam(tth0, *(inst[k] for k in "UVWXYZ"), lam_a=inst["Lam"])
    peaks = profile.pattern(tth_deg, tth0, sg.sig2, sg.gam, truth["intensity"], inst["SH/L"], derivatives=True)
    j_k = peaks.dense("d_pos") * (-2.0 * np.tan(np.deg2rad(tth0) / 2.0) * 180.0 / np.pi)[:, None]
    j = j_k.sum(axis=0)
    w = 1.0 / np.asarray(sigma) ** 2
    return (j_k * j * w).sum(axis=1) / (j * j * w).sum()


def _expected_strain(e2e):
    """Σ_k c_k n(θ_k, η)ᵀ ε_lab(ω) n(θ_k, η) per lineout (group, eta) at the η-bin centre."""
    from midasflow.refinement.lineouts import plan_lineouts

    r, truth = e2e["results"], e2e["truth"]
    theta_k = truth["tth0_deg"] / 2.0
    expected = np.full(r.a_a.shape[1:], np.nan)
    for spec in plan_lineouts(e2e["store"]):
        c = _response_weights(spec.tth_deg, spec.sigma, truth)
        eps_k = np.array([strain.normal_strain(t, spec.eta_deg, DEMO_STRAIN, spec.omega_deg) for t in theta_k])
        expected[spec.group, spec.eta_index] = c @ eps_k.ravel()
    return expected


@pytest.mark.slow
def test_every_lineout_succeeds(e2e):
    r = e2e["results"]
    assert r.sizes["group"] == 3 and r.sizes["eta"] == int(360 / ETA_BIN_DEG)
    np.testing.assert_allclose(r.omega_deg.values, [0.0, 60.0, 120.0])
    assert (r.status.values == "ok").all(), r.message.values[r.status.values != "ok"]
    assert (r.n_points.values > 20).all()
    # Rietveld fits of Poisson data drawn with the engine's own model: GOF near 1, small Rwp
    assert np.nanmax(r.rwp.values) < 6.0
    assert 0.8 < np.median(r.gof.values) < 1.3
    # the calibrated instrument the simulator wrote is what the refinement started from
    from midasflow.io.instprm import instrument_from_midas

    inst = instrument_from_midas(e2e["store"]).to_dict()
    for key in ("Lam", "Polariz.", "U", "V", "W", "X", "Y", "SH/L"):
        assert inst[key] == pytest.approx(e2e["truth"]["instrument"][key], rel=1e-9, abs=1e-12), key


@pytest.mark.slow
def test_refined_a_per_lineout_matches_the_true_a0(e2e):
    r = e2e["results"]
    expected = _expected_strain(e2e)
    err = r.a_a.values[0] / (CEO2_A_A * (1.0 + expected)) - 1.0
    assert np.abs(err).max() < A_TOL, f"max |Δa/a| = {np.abs(err).max():.2e}"
    assert abs(err.mean()) < 0.25 * TOL  # no common bias left (symmetric rings gave −3.6e-5)
    # the strain signal itself is 40× the tolerance: a flat (unstrained) answer would fail
    assert np.ptp(expected) > 40 * TOL
    # the θ the results evaluate strain at is the one of the strong low-angle reflections
    th = r.strain_theta_deg.values[0]
    assert np.all((th > 2.0) & (th < 5.5))


@pytest.mark.slow
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
    # per-lineout strain is a/a0 - 1 against the CIF's (= simulated) cell
    np.testing.assert_allclose(r.strain.values[0], r.a_a.values[0] / CEO2_A_A - 1.0, rtol=0, atol=1e-12)


@pytest.mark.slow
def test_two_worker_cluster_matches_single_process(e2e):
    from midasflow.crystal import read_phases
    from midasflow.io.instprm import instrument_from_midas
    from midasflow.io.caked_store import open_caked
    from midasflow.refinement.backends import NativeBackend
    from midasflow.refinement.lineouts import plan_lineouts, refine_lineout
    from midasflow.refinement.options import RefineOptions
    from midasflow.refinement.plan import CakeLayout, group_mean_spec

    r = e2e["results"]
    assert set(r.seeded_from.values.ravel()) == {"group mean"}  # the default seeding
    plan = plan_lineouts(e2e["store"])
    subset = plan[::7]  # every group, spread over η
    options = RefineOptions(phases=tuple(read_phases([e2e["cif"]])), instrument=instrument_from_midas(e2e["store"]),
                            bkg_terms=6, limits=None, refine_atoms=False, mode="rietveld")
    # in this process, one by one: each group's η-averaged pattern, then the lineouts from it
    caked = open_caked(e2e["store"])
    layout = CakeLayout.of(caked)
    seeds = {g: refine_lineout(group_mean_spec(caked.intensity.isel(group=g).transpose("r", "eta").values,
                                               layout, g, min_points=20), NativeBackend(), options)
             for g in {spec.group for spec in subset}}
    serial = [refine_lineout(spec, NativeBackend(), options, seeds[spec.group]) for spec in subset]
    for res in serial:
        assert res.seeded_from == "group mean"
        assert res.status == "ok"
        g, e = res.group, res.eta_index
        assert int(r.histogram_index.values[g, e]) == res.index
        np.testing.assert_allclose(r.a_a.values[0, g, e], res.pattern.cells["CeO2"][0], rtol=1e-10, atol=0)
        np.testing.assert_allclose(r.rwp.values[g, e], res.pattern.rwp, rtol=1e-10, atol=0)
        np.testing.assert_allclose(r.a_a_esd.values[0, g, e], res.pattern.cell_esds["CeO2"][0], rtol=1e-8)


@pytest.mark.slow
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
    for h in hists:
        g, e = h["group"], h["eta_index"]
        assert h["histogram_index"] == int(r.histogram_index.values[g, e])
        assert h["status"] == "success"  # MIDAS's word for a refined histogram
        assert h["Rwp"] == pytest.approx(float(r.rwp.values[g, e]), rel=1e-12)
        assert h["omega_deg"] == pytest.approx(float(r.omega_deg.values[g]))
        assert h["eta_deg"] == pytest.approx(float(r.eta_deg.values[e]))
        [phase] = h["phases"]
        assert phase["name"] == "CeO2"
        assert phase["cell"]["a"] == pytest.approx(float(r.a_a.values[0, g, e]), rel=1e-12)
        assert set(phase["cell"]) == {"a", "b", "c", "alpha", "beta", "gamma", "volume"}
    assert summary["strain"]["CeO2"]["sample"]["status"] == "ok"

    back = open_results(out / "results.zarr")
    # (reflection, xyz: the per-reflection intensities and their sample directions, docs/texture.md)
    assert set(back.dims) == {"phase", "group", "eta", "component", "flag", "reflection", "xyz"}
    assert back.I.dims == ("group", "eta", "reflection") and np.isfinite(back.I.values).any()
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
# failures and resume, on six lineouts of a small scan of their own (serial, in-process)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Six lineouts (one ω-group, 60° η bins) of a small simulated scan, loaded in memory."""
    from midasflow.io.caked_store import open_caked

    root = tmp_path_factory.mktemp("small")
    files, _, cif = make_demo_scan(root, n_frames=1, sum_frames=1, size=192, seed=1, eta_bin_deg=60.0,
                                   strain_tensor=DEMO_STRAIN, supersample=2, counts=COUNTS)
    store = pipeline.integrate(files.params_file, files.data, result_folder=root, cache_dir=root / "binmaps")
    ds = open_caked(store).load()
    assert ds.sizes["group"] == 1 and ds.sizes["eta"] == 6
    return ds, cif


#: The engine itself, kept before any test replaces it with a counting wrapper.
_REFINE_PATTERN = engine.refine_pattern


class _Counting:
    """The built-in engine, counting its calls; raises KeyboardInterrupt at call ``interrupt_at``."""

    def __init__(self, interrupt_at: int | None = None):
        self.fn, self.calls, self.interrupt_at = _REFINE_PATTERN, [], interrupt_at

    def __call__(self, tth, y, s, *args, **kw):
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        self.calls.append(float(tth[0]))
        return self.fn(tth, y, s, *args, **kw)


def _use_engine(monkeypatch, counting):
    monkeypatch.setattr(engine, "refine_pattern", counting)


def test_a_bad_lineout_is_reported_while_the_others_succeed(small, tmp_path):
    ds, cif = small
    bad = ds.copy(deep=True)
    bad["intensity"][0, :, 2] = 0.0  # all-zero pattern: the engine refuses it -> failed
    bad["intensity"][0, :, 4] = np.nan  # no usable bins -> skipped, as GSAS-II's importer skips it
    r = pipeline.refine(bad, [cif], out=tmp_path, export=False, report=False)
    assert list(r.status.values[0]) == ["ok", "ok", "failed", "ok", "skipped", "ok"]
    assert r.message.values[0, 2].startswith("not a diffraction pattern")
    assert np.isnan(r.a_a.values[0, 0, 2]) and np.isfinite(r.a_a.values[0, 0, [0, 1, 3, 5]]).all()
    summary = json.loads((tmp_path / "refinement_summary.json").read_text())
    # the all-NaN column is no histogram for GSAS-II's importer (nor in MIDAS's numbering)
    assert (summary["total_histograms"], summary["succeeded"], summary["failed"], summary["skipped"]) == (5, 4, 1, 0)
    assert summary["lineouts_not_histograms"] == 1
    failed = summary["histograms"][2]
    assert failed["status"] == "failed" and "Rwp" not in failed and failed["error"].startswith("not a diffraction")


@pytest.mark.slow
def test_resume_after_interruption_refines_only_what_is_missing(small, tmp_path, monkeypatch):
    ds, cif = small
    options = dict(out=tmp_path, export=False, report=False, seed_from=None)  # one engine call a lineout
    interrupted = _Counting(interrupt_at=4)
    _use_engine(monkeypatch, interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.refine(ds, [cif], **options)
    assert len(list((tmp_path / "lineouts").glob("hist_*.npz"))) == 4

    resumed = _Counting()
    _use_engine(monkeypatch, resumed)
    r = pipeline.refine(ds, [cif], resume=True, **options)
    assert len(resumed.calls) == 2
    assert (r.status.values == "ok").all()

    # delete two checkpoints: exactly those two are refined again, to the same numbers
    for index in (1, 3):
        (tmp_path / "lineouts" / f"hist_{index:04d}.npz").unlink()
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


@pytest.mark.slow
def test_resume_refuses_checkpoints_made_with_other_settings(small, tmp_path, monkeypatch):
    from midasflow.errors import ParameterError

    ds, cif = small
    _use_engine(monkeypatch, _Counting())
    pipeline.refine(ds, [cif], out=tmp_path, export=False, report=False, bkg_terms=6)
    counting = _Counting()
    _use_engine(monkeypatch, counting)
    with pytest.raises(ParameterError, match=r"settings.json: --resume: .*other bkg_terms, mode"):
        pipeline.refine(ds, [cif], out=tmp_path, export=False, report=False, bkg_terms=4,
                        mode="lebail", resume=True)
    assert counting.calls == []  # refused before any lineout ran


@pytest.mark.slow
def test_group_process_variables_reach_the_results(small, tmp_path):
    from midasflow.results import open_results

    ds, cif = small
    ds = ds.assign(temperature=("group", [412.5]), i0=("group", [1.25e6]))
    r = pipeline.refine(ds, [cif], out=tmp_path, export=False, report=False)
    assert r.temperature.dims == ("group",) and r.temperature.values.tolist() == [412.5]
    back = open_results(tmp_path / "results.zarr")
    assert back.i0.values.tolist() == [1.25e6] and "pressure" not in back.coords


def test_integrate_dataset_opens_the_frames_once_in_map_pass_chunks(tmp_path, monkeypatch):
    """The bin map first, then one open_frames with chunks of one map pass (no reopening, no
    concatenated smaller chunks)."""
    from midasflow.binmap import load_or_build_binmap
    from midasflow.caking_kernel import frames_per_pass
    from midasflow.io import frames as frames_module
    from midasflow.io.frames import ScanSource
    from midasflow.simulate import write_scan

    from cake_helpers import small_params

    params = small_params()
    raw = np.random.default_rng(3).poisson(50.0, size=(40, params.nr_pixels_z, params.nr_pixels_y))
    files = write_scan(tmp_path, params, raw.astype(np.uint16))
    opened = []
    open_source = frames_module.open_source
    monkeypatch.setattr(frames_module, "open_source",
                        lambda path, *a, **k: opened.append(path) or open_source(path, *a, **k))
    ds = pipeline.integrate_dataset(ScanSource(files.data), files.params, cache_dir=tmp_path / "maps")
    assert opened == [str(files.data)]  # data once; no dark in this scan
    per_pass = frames_per_pass(load_or_build_binmap(files.params, None, tmp_path / "maps"))
    assert per_pass < 40 and ds["frame_intensity"].chunks[0][0] == per_pass


@pytest.mark.slow
def test_curves_are_kept_only_for_the_groups_the_report_plots(small, tmp_path, monkeypatch):
    """A run keeps the fitted curves (and covariances) only of the ω-groups report.html plots, so
    the client's memory does not grow with the scan by every lineout's curves; the numbers stay."""
    import midasflow.report as report

    ds, cif = small
    seen = {}
    write_report = report.write_report

    def capture(results, path, **kw):
        seen["lineouts"] = kw["lineouts"]
        return write_report(results, path, **kw)

    monkeypatch.setattr(report, "write_report", capture)
    kept = pipeline.refine(ds, [cif], out=tmp_path / "plotted", export=False)
    plotted = [r.pattern for r in seen["lineouts"] if r.status == "ok"]
    assert plotted and all(p.obs.size and p.weight.size and p.covariance is not None for p in plotted)
    monkeypatch.setattr(report, "PLOTTED_GROUPS", 0)
    r = pipeline.refine(ds, [cif], out=tmp_path / "none", export=False)
    slim = [x.pattern for x in seen["lineouts"] if x.status == "ok"]
    assert len(slim) == len(plotted)
    for p, q in zip(slim, plotted):
        assert p.obs.size == p.calc.size == p.weight.size == 0 and p.covariance is None
        assert p.rwp == q.rwp and p.cells == q.cells and p.flags == q.flags
    assert (tmp_path / "none" / "report.html").is_file() and np.isfinite(r.a_a.values[0, 0]).all()
    # strain and its fits come from the numbers and reflection tables, not from the curves
    assert r.in_strain_fit.values.all()
    for name in ("strain", "strain_esd", "in_strain_fit", "strain_tensor"):
        if name in kept:
            xr.testing.assert_identical(r[name], kept[name])
