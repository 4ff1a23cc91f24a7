"""Exports and output paths (issue 10, item 9): hist_NNNN_data.csv in GSAS-II's CSV layout with
weights; --resume after --no-export writes the exports still missing; run puts the caked store
beside the refinement folder and says where."""
from __future__ import annotations

import csv
import warnings

import numpy as np
import pytest

from midasflow.cli import main
from midasflow.results import CSV_COLUMNS


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    from midasflow.cli.demo import make_demo_scan

    root = tmp_path_factory.mktemp("exports")
    files, _, cif = make_demo_scan(root, n_frames=2, sum_frames=2, size=256, seed=12, eta_bin_deg=90.0)
    return dict(root=root, params=str(files.params_file), data=str(files.data), cif=str(cif))


@pytest.fixture(scope="module")
def store(scan):
    from midasflow.pipeline import integrate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return integrate(scan["params"], scan["data"], result_folder=scan["root"] / "caked",
                         cache_dir=scan["root"] / "cache")


def _table(path):
    with open(path) as fh:
        rows = [row for row in csv.reader(fh) if row]
    header = rows.index(list(CSV_COLUMNS))
    return rows[:header], np.array(rows[header + 1:], dtype=float)


@pytest.mark.slow
def test_resume_after_no_export_writes_the_missing_exports(scan, store, tmp_path):
    from midasflow.pipeline import refine

    out = tmp_path / "ref"
    first = refine(store, [scan["cif"]], out=out, refine_atoms=False, mode="lebail", export=False, report=False)
    assert not list(out.glob("hist_*_data.csv"))
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "lineouts").glob("hist_*.npz")}
    again = refine(store, [scan["cif"]], out=out, refine_atoms=False, mode="lebail", resume=True, report=False)
    ok = int((first.status.values == "ok").sum())
    assert ok == 4 and len(list(out.glob("hist_*_data.csv"))) == ok and len(list(out.glob("hist_*_CeO2.cif"))) == ok
    assert len(list(out.glob("hist_*.gpx"))) == ok  # the GSAS-II projects too
    # nothing was refined again: the checkpoints were taken as they were
    assert {p.name: p.stat().st_mtime_ns for p in (out / "lineouts").glob("hist_*.npz")} == stamps
    np.testing.assert_array_equal(again.a_a.values, first.a_a.values)
    head, table = _table(out / "hist_0000_data.csv")
    assert head[0][0] == "Histogram" and table.shape[1] == 6 and (table[:, 2] > 0).all()


@pytest.mark.slow
def test_export_kinds(scan, store, tmp_path):
    from midasflow.pipeline import refine

    refine(store, [scan["cif"]], out=tmp_path, refine_atoms=False, mode="lebail", export={"csv"}, report=False)
    assert list(tmp_path.glob("hist_*_data.csv")) and not list(tmp_path.glob("hist_*_CeO2.cif"))
    assert not list(tmp_path.glob("hist_*.gpx"))
    with pytest.raises(Exception, match="export"):
        refine(store, [scan["cif"]], out=tmp_path / "x", export={"xlsx"})


def test_no_gpx_flag():
    """--no-gpx keeps the CSV/CIF exports and leaves out the projects; --no-export all three."""
    from midasflow.cli.refine import build_parser, refine_options

    base = ["--data", "x.zarr.zip", "--cif", "c.cif"]
    assert refine_options(build_parser().parse_args(base))["export"] is True
    assert refine_options(build_parser().parse_args(base + ["--no-gpx"]))["export"] == {"csv", "cif"}
    assert refine_options(build_parser().parse_args(base + ["--no-export", "--no-gpx"]))["export"] is False


def test_csv_matches_gsas2s_own_export(gsasii, scan, store, tmp_path):
    """The GSAS-II engine's lineout, exported by midasflow and by GSAS-II itself
    (G2PwdrData.Export, "histogram CSV file"): same layout, same numbers."""
    from midasflow.io.instprm import instrument_from_midas
    from midasflow.refinement.gsas2 import refine_pattern_gsas2
    from midasflow.refinement.lineouts import plan_lineouts
    from midasflow.results import export_lineout

    spec = next(s for s in plan_lineouts(store) if not s.skipped)
    inst = instrument_from_midas(store)
    pattern = refine_pattern_gsas2(spec.tth_deg, spec.intensity, spec.sigma, [scan["cif"]], inst,
                                   workdir=tmp_path / "g2", index=spec.index, stem=spec.name,
                                   refine_atoms=False)
    ours = export_lineout(spec, pattern, tmp_path, inst, kinds=("csv",))[0]
    project = gsasii.G2Project(str(tmp_path / "g2" / spec.name / f"{spec.name}.gpx"))
    project.histograms()[0].Export(str(tmp_path / "gsas2_export"), ".csv", "hist")
    g2_head, g2 = _table(tmp_path / "gsas2_export.csv")
    head, table = _table(ours)
    assert g2_head[0][0] == head[0][0] == "Histogram"
    assert {r[0] for r in head if r[0].startswith("Instparm")} <= {r[0] for r in g2_head} | {"Instparm: Bank"}
    assert table.shape == g2.shape
    for k, column in enumerate(CSV_COLUMNS):  # both written with %.6g
        tol = 1e-5 if column != "y_calc" else 1e-4
        np.testing.assert_allclose(table[:, k], g2[:, k], rtol=tol, atol=1e-9 * np.abs(g2[:, k]).max(),
                                   err_msg=column)


@pytest.mark.slow
def test_run_puts_the_store_beside_the_refinement_folder(scan, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "beamtime" / "refinement"
    assert main(["run", "-paramFN", scan["params"], "-dataFN", scan["data"], "--cache-dir",
                 str(scan["root"] / "cache"), "--cif", scan["cif"], "--out", str(out), "--no-atoms",
                 "--mode", "lebail", "--no-export", "--no-report", "--no-progress"]) == 0
    store = tmp_path / "beamtime" / "scan_000001.zarr.zip"
    assert store.is_file() and not (tmp_path / "scan_000001.zarr.zip").exists()
    last = capsys.readouterr().out.strip().splitlines()[-3:]
    assert f"caked store: {store}" in last and last[-1].startswith(f"results: {out}/results.zarr")
    assert "report" not in last[-1]  # --no-report: no report named
    # -resultFolder still says where it goes
    assert main(["run", "-paramFN", scan["params"], "-dataFN", scan["data"], "-resultFolder", str(tmp_path / "c"),
                 "--cache-dir", str(scan["root"] / "cache"), "--skip-refinement", "--cif", scan["cif"],
                 "--no-progress"]) == 0
    assert (tmp_path / "c" / "scan_000001.zarr.zip").is_file()
