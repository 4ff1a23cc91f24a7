"""Results Dataset, strain columns and fits, results.zarr / refinement_summary.json / exports."""
import json

import numpy as np
import pytest

from midasflow import strain
from midasflow.refinement.lineouts import plan_lineouts, run_serial
from midasflow.refinement.result import FLAGS
from midasflow.results import assemble_results, open_results, summary_dict, write_results

from lineouts_helpers import A0_A, TENSOR, TOY_OPTIONS, ToyBackend, make_caked

REF = {"CeO2": (A0_A, A0_A, A0_A, 90.0, 90.0, 90.0)}


@pytest.fixture(scope="module")
def run():
    ds = make_caked(n_groups=3, n_eta=12, omega_step=45.0, height=3000.0, masked=[(1, 4)], seed=7)
    ds["intensity"][2, :, 7] = 1.0  # flat: the injected failure triggers on it
    lineouts = run_serial(plan_lineouts(ds), TOY_OPTIONS, backend=ToyBackend(fail_below=3.0))
    res = assemble_results(lineouts, ref_cells=REF, attrs={"data_file": "scan.zarr.zip"})
    return ds, lineouts, res


def test_results_dataset_fields(run):
    caked, lineouts, res = run
    assert dict(res.sizes) == {"group": 3, "eta": 12, "phase": 1, "component": 6, "flag": len(FLAGS)}
    for name in ("a_a", "b_a", "c_a", "alpha_deg", "beta_deg", "gamma_deg", "volume_a3", "a_a_esd",
                 "volume_a3_esd", "phase_scale", "phase_fraction", "phase_fraction_esd", "rwp", "gof",
                 "zero", "u", "v", "w", "x", "y", "shl", "scale", "n_points", "status", "warnings",
                 "notes", "flags", "in_strain_fit", "strain", "strain_esd", "strain_lab", "strain_sample"):
        assert name in res, name
    np.testing.assert_allclose(res.omega_deg, [0.0, 45.0, 90.0])
    np.testing.assert_allclose(res.eta_deg, caked.eta_deg)
    assert res.status.values[1, 4] == "skipped" and res.status.values[2, 7] == "failed"
    assert (res.status.values == "ok").sum() == 34
    # MIDAS's numbers: η column 4, NaN in group 1, is no histogram for GSAS-II's importer (the
    # store's BinArea plane is 0 there), so each group numbers 11 columns; its other lineouts are
    # refined all the same, without a number
    assert int(res.histogram_index[2, 7]) == 2 * 11 + 6
    assert int(res.histogram_index[0, 4]) == -1 and res.status.values[0, 4] == "ok"
    ok = res.status.values == "ok"
    z = (res.a_a.values[0] - caked.true_a.values) / res.a_a_esd.values[0]
    assert np.all(np.abs(z[ok]) < 5)
    assert np.isnan(res.a_a.values[0, 2, 7]) and np.isnan(res.strain.values[0, 1, 4])
    np.testing.assert_allclose(res.strain.values[0][ok], res.a_a.values[0][ok] / A0_A - 1)
    np.testing.assert_allclose(res.shl.values[ok], 0.002)


def test_strain_fits_recover_the_tensor(run):
    caked, _, res = run
    truth = strain.components_from_tensor(TENSOR)
    assert list(res.strain_sample_status.values) == ["ok"]
    z = (res.strain_sample.values[0] - truth) / res.strain_sample_esd.values[0]
    assert np.all(np.abs(z) < 5), z
    # in-plane components well below 1e-5; the weak x shears are looser
    assert np.all(res.strain_sample_esd.values[0, 1:4] < 1e-5)
    # per ω-group lab-frame fits: ε_zz equals the sample ε_zz at every ω
    izz = strain.COMPONENTS.index("zz")
    assert list(res.strain_lab_status.values[0]) == ["ok"] * 3
    zz = res.strain_lab.values[0, :, izz]
    assert np.all(np.abs(zz - truth[izz]) < 5 * res.strain_lab_esd.values[0, :, izz])


@pytest.mark.slow
def test_write_and_read_back(run, tmp_path):
    _, lineouts, res = run
    out = write_results(res, tmp_path / "out")
    back = open_results(out["results"])
    for name in ("a_a", "strain", "rwp", "strain_sample", "omega_deg", "eta_deg"):
        np.testing.assert_array_equal(back[name].values, res[name].values)
    assert back.status.values.tolist() == res.status.values.tolist()
    assert back.attrs["data_file"] == "scan.zarr.zip"

    summary = json.loads(out["summary"].read_text())
    for key in ("data_file", "total_histograms", "succeeded", "failed", "skipped", "mean_Rwp", "histograms"):
        assert key in summary
    # η column 4 (NaN in group 1) is no histogram: 3 groups x 11 numbered columns
    assert (summary["total_histograms"], summary["succeeded"], summary["failed"], summary["skipped"]) == (33, 32, 1, 0)
    numbered = res.histogram_index.values >= 0
    assert summary["mean_Rwp"] == pytest.approx(float(np.mean(res.rwp.values[(res.status.values == "ok") & numbered])))
    h = summary["histograms"][13]  # group 1, its third histogram column: η index 2
    assert h["histogram_index"] == 13 and h["status"] == "success" and h["group"] == 1 and h["eta_index"] == 2
    assert h["omega_deg"] == 45.0 and h["eta_deg"] == pytest.approx(float(res.eta_deg[2]))
    assert h["phases"][0]["name"] == "CeO2" and set(h["phases"][0]["cell"]) == {
        "a", "b", "c", "alpha", "beta", "gamma", "volume"}
    assert h["phases"][0]["cell"]["a"] == pytest.approx(float(res.a_a[0, 1, 2]))
    assert h["Rwp"] == pytest.approx(float(res.rwp[1, 2])) and h["gpx"] is None
    failed = summary["histograms"][28]
    assert failed["status"] == "failed" and "injected failure" in failed["error"] and "phases" not in failed
    assert "Rwp" not in failed  # as MIDAS: no Rwp for a failure
    assert summary["lineouts_not_histograms"] == 3
    assert [(o["group"], o["eta_index"], o["status"]) for o in summary["other_lineouts"]] == [
        (0, 4, "success"), (2, 4, "success")]
    assert summary["strain"]["CeO2"]["sample"]["components"]["zz"]["determined"]
    assert len(summary["strain"]["CeO2"]["orientations"]) == 3

    # rewriting replaces the store atomically
    out2 = write_results(res, tmp_path / "out")
    assert open_results(out2["results"]).sizes["group"] == 3
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_exports_are_gsas2s_csv_with_weights(run, tmp_path):
    import csv

    from midasflow.results import CSV_COLUMNS, export_lineout

    caked, lineouts, _ = run
    specs = {s.index: s for s in plan_lineouts(caked)}
    for res in lineouts:
        if res.status == "ok":
            export_lineout(specs[res.index], res.pattern, tmp_path, TOY_OPTIONS.instrument)
    csvs = sorted(p.name for p in tmp_path.glob("hist_*_data.csv"))
    assert len(csvs) == 32 and csvs[0] == "hist_0000_data.csv"
    assert sorted(p.name for p in tmp_path.glob("lineout_*_data.csv")) == [
        "lineout_g0000_e0004_data.csv", "lineout_g0002_e0004_data.csv"]
    with open(tmp_path / "hist_0000_data.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][0] == "Histogram" and rows[0][1].startswith("PWDR hist_0000")
    assert ["Instparm: Lam", f"{TOY_OPTIONS.instrument.lam:10.6f}"] in rows
    header = rows.index(list(CSV_COLUMNS))
    table = np.array(rows[header + 1:], dtype=float)
    spec, pattern = specs[0], lineouts[0].pattern
    np.testing.assert_allclose(table[:, 0], spec.tth_deg, rtol=1e-5)
    np.testing.assert_allclose(table[:, 1], spec.intensity, rtol=1e-5)
    np.testing.assert_allclose(table[:, 2], 1 / spec.sigma**2, rtol=1e-5)
    fitted = np.isin(spec.tth_deg, pattern.tth_deg)
    np.testing.assert_allclose(table[fitted, 3], pattern.calc, rtol=1e-5)
    np.testing.assert_allclose(table[fitted, 4], pattern.bkg, rtol=1e-5)
    lam = TOY_OPTIONS.instrument.wavelength_a
    np.testing.assert_allclose(table[:, 5], 4 * np.pi * np.sin(np.radians(spec.tth_deg) / 2) / lam, rtol=1e-5)


def test_summary_from_dataset_only(run):
    _, _, res = run
    s = summary_dict(res)
    assert [h["histogram_index"] for h in s["histograms"]] == list(range(33))


def test_effective_theta_weights_reflections_by_their_pull_on_the_cell():
    from types import SimpleNamespace

    from midasflow.results import effective_theta_deg

    tth = np.array([4.0, 8.0])
    refl = {"tth_deg": tth, "intensity": np.array([1.0, 1.0]), "sig2": np.array([1.0, 1.0]),
            "gam": np.array([0.5, 0.5])}
    pattern = SimpleNamespace(tth_deg=np.linspace(3.0, 9.0, 50), reflections={"P": refl})
    theta = np.deg2rad(tth / 2)
    expected = np.rad2deg(np.average(theta, weights=np.tan(theta) ** 2))  # equal I and widths
    assert effective_theta_deg(pattern, "P") == pytest.approx(expected, rel=1e-12)
    assert effective_theta_deg(pattern, "P") > 3.0  # pulled towards the high-angle reflection
    # a broader reflection carries less information about the cell
    broad = dict(refl, sig2=np.array([1.0, 16.0]), gam=np.array([0.5, 2.0]))
    pattern.reflections = {"P": broad}
    assert effective_theta_deg(pattern, "P") < expected


def test_noncubic_lineout_strain_uses_the_reflections_and_weights_of_its_theta():
    """ε of a non-cubic cell averages d/d0 - 1 over the fitted range's reflections with the weights
    effective_theta_deg uses; a strong reflection outside the data (no information) must not count."""
    from types import SimpleNamespace

    from midasflow.results import _lineout_strain, effective_theta_deg

    ref = (3.0, 3.0, 5.0, 90.0, 90.0, 120.0)
    cell = (3.003, 3.003, 5.0, 90.0, 90.0, 120.0)   # ε_a = 1e-3, ε_c = 0
    hkl = np.array([[1, 0, 0], [0, 0, 2], [0, 0, 4]])
    tth = np.array([4.0, 5.0, 12.0])                  # (004) beyond the fitted 3..9°
    refl = {"h": hkl[:, 0], "k": hkl[:, 1], "l": hkl[:, 2], "tth_deg": tth,
            "intensity": np.array([1.0, 1.0, 100.0]), "sig2": np.ones(3), "gam": np.full(3, 0.5)}
    pattern = SimpleNamespace(tth_deg=np.linspace(3.0, 9.0, 50), reflections={"P": refl},
                              cells={"P": cell + (0.0,)}, cell_esds={"P": (1e-4,) * 7})
    theta = np.deg2rad(tth[:2] / 2)
    w = np.tan(theta) ** 2
    d = strain.d_spacing_a(cell, hkl[:2]) / strain.d_spacing_a(ref, hkl[:2]) - 1
    eps, esd = _lineout_strain(pattern, "P", ref)
    assert eps == pytest.approx(np.average(d, weights=w), rel=1e-9)
    assert np.isfinite(esd) and esd > 0
    assert effective_theta_deg(pattern, "P") == pytest.approx(np.rad2deg(np.average(theta, weights=w)))
