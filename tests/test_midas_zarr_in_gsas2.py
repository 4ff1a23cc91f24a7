"""The .zarr.zip we write, read by GSAS-II's own MIDAS importer (skipped where GSAS-II is absent)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from midasflow.io.caked_store import open_caked
from midasflow.pipeline import integrate
from midasflow.refinement.lineouts import plan_lineouts
from midasflow.simulate import simulate_ceo2_scan

pytestmark = pytest.mark.slow  # GSAS-II refines simulated scans here


def _integrated_scan(out, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files, truth = simulate_ceo2_scan(out / "scan", shape=(256, 256), **overrides)
        path = integrate(files.params_file, files.data, result_folder=out, cache_dir=out / "cache")
    return path, truth


@pytest.fixture(scope="module")
def scan_zip(tmp_path_factory):
    return _integrated_scan(tmp_path_factory.mktemp("g2import"), n_frames=5, seed=3,
                            params_overrides={"omega_sum_frames": 2})


def _bins_in_our_order(caked, spec):
    """The R bins of a lineout (finite in its group, area ≠ 0) in bin order, as GSAS-II's importer
    reads them, and the order midasflow puts them in (increasing effective 2θ)."""
    e = spec.eta_index
    bins = (np.isfinite(caked.intensity.values[spec.group][:, e]) & (caked.bin_area.values[:, e] != 0))
    return bins, np.argsort(caked.effective_tth_deg.values[bins, e], kind="stable")


def test_gsasii_midas_importer_reads_our_lineouts(gsasii, scan_zip, tmp_path):
    path, truth = scan_zip
    ours = [spec for spec in plan_lineouts(open_caked(path)) if not spec.skipped]
    gpx = gsasii.G2Project(newgpx=str(tmp_path / "import.gpx"))
    hists = gpx.add_powder_histogram(str(path), None, fmthint="MIDAS", multiple=True)
    # same selection (> 20 bins with area ≠ 0), numbered image·n_eta + eta as GSAS-II numbers them
    assert len(hists) == len(ours) > 0
    caked = open_caked(path)
    assert caked.sizes["group"] == 3  # 5 frames in groups of 2: the remainder group is kept
    n_frames = caked.frames_summed.values
    for hist, spec in zip(hists, ours):
        x = np.asarray(hist.getdata("X"))
        y = np.asarray(hist.getdata("Yobs"))
        # the importer's x is REtaMap's bin centres; midasflow's lineouts use each bin's
        # effective 2θ (docs/caking_2theta.md), in increasing order: same bins, same values
        bins, order = _bins_in_our_order(caked, spec)
        np.testing.assert_allclose(x, caked.tth_deg.values[bins], rtol=1e-12)
        np.testing.assert_allclose(y[order], spec.intensity, rtol=1e-12)
        np.testing.assert_allclose(spec.tth_deg,
                                   caked.effective_tth_deg.values[bins, spec.eta_index][order], rtol=1e-12)
        assert f"eta={spec.eta_deg}" in hist.name
        # GSAS-II divides by the real frame count we wrote (the remainder group has 1 frame)
        group_sum = caked.intensity.values[spec.group][:, spec.eta_index]
        finite = np.isfinite(group_sum) & (caked.bin_area.values[:, spec.eta_index] != 0)
        np.testing.assert_allclose(y, group_sum[finite] / n_frames[spec.group], rtol=1e-12)
    first = hists[0]
    assert float(first.InstrumentParameters["Lam"][1]) == pytest.approx(truth["params"].wavelength_a)
    assert first.SampleParameters["Gonio. radius"] == pytest.approx(truth["params"].lsd_um / 1000)
    omega = caked.omega_first_deg.values[0], caked.omega_last_deg.values[0]
    assert first.SampleParameters["Phi"] == pytest.approx(np.mean(omega))


@pytest.fixture(scope="module")
def coarse_scan(tmp_path_factory):
    """Two ω-groups × four 90° η bins: eight lineouts, few enough to refine with GSAS-II here."""
    from midasflow.crystal import cubic_phase, write_phase_cif
    from midasflow.simulate import CEO2_A_A

    out = tmp_path_factory.mktemp("g2pipeline")
    path, _ = _integrated_scan(out, n_frames=2, seed=5, params_overrides={"eta_bin_deg": 90.0})
    cif = write_phase_cif(cubic_phase("CeO2", CEO2_A_A), out / "CeO2.cif")
    return path, cif, out


def test_gsas2_backend_through_the_pipeline(gsasii, coarse_scan):
    from midasflow.pipeline import refine
    from midasflow.results import open_results

    path, cif, out = coarse_scan
    native = refine(path, [cif], out=out / "native", report=False, export=False)
    g2 = refine(path, [cif], out=out / "gsas2", backend="gsas2", report=False)
    assert set(native.data_vars) == set(g2.data_vars)  # results do not care which backend ran
    ok = native.status.values == "ok"
    assert ok.sum() == 8 and (g2.status.values == "ok").all()
    a_native, a_g2 = native.a_a.values[0][ok], g2.a_a.values[0][ok]
    esd = np.maximum(native.a_a_esd.values[0][ok], g2.a_a_esd.values[0][ok])
    assert np.all(np.abs(a_native - a_g2) < 3 * esd + 2e-5 * a_native)
    # one GSAS-II project per lineout, which GSAS-II reopens with the refined cell
    for index in g2.histogram_index.values.ravel():
        gpx = out / "gsas2" / "gsas2" / f"hist_{index:04d}" / f"hist_{index:04d}.gpx"
        assert gpx.exists()
    first = int(g2.histogram_index.values.ravel()[0])
    project = gsasii.G2Project(gpxfile=str(out / "gsas2" / "gsas2" / f"hist_{first:04d}" / f"hist_{first:04d}.gpx"))
    cell = project.phases()[0].get_cell()
    assert cell["length_a"] == pytest.approx(float(g2.a_a.values[0].ravel()[0]), rel=1e-9)
    assert open_results(out / "gsas2" / "results.zarr").attrs["backend"] == "gsas2"


def test_gsasii_reads_no_nan_on_a_detector_with_module_gaps(gsasii, tmp_path):
    """Module gaps leave partly masked bins NaN (area rule): their REtaMap BinArea is 0, so GSAS-II's
    importer drops them instead of reading NaN y and w; midasflow reads the true areas back."""
    path, _ = _integrated_scan(tmp_path, n_frames=2, seed=4, gaps=True)
    caked = open_caked(path)
    nan_bins = np.isnan(caked.intensity.values).any(axis=0)
    assert (caked.bin_area.values[nan_bins] > 0).any()  # partly masked bins keep an area
    ours = [spec for spec in plan_lineouts(caked) if not spec.skipped]
    gpx = gsasii.G2Project(newgpx=str(tmp_path / "gaps.gpx"))
    hists = gpx.add_powder_histogram(str(path), None, fmthint="MIDAS", multiple=True)
    assert len(hists) == len(ours) > 0
    for hist, spec in zip(hists, ours):
        y = np.asarray(hist.getdata("Yobs"))
        w = np.asarray(hist.getdata("Yweight"))
        assert np.isfinite(y).all() and np.isfinite(w).all(), hist.name
        np.testing.assert_allclose(y[_bins_in_our_order(caked, spec)[1]], spec.intensity, rtol=1e-12)
