"""``from midasflow import run_refinement``: MIDAS's Python API (issue 10, item 2)."""
from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

import midasflow

#: MIDAS gsas_ii_refine.run_refinement's parameters and defaults, in order.
MIDAS_SIGNATURE = [("data_file", inspect.Parameter.empty), ("cif_files", inspect.Parameter.empty),
                   ("output_dir", inspect.Parameter.empty), ("instprm_file", None), ("bkg_terms", 6),
                   ("refine_atoms", True), ("two_theta_limits", None), ("export_cif", True),
                   ("export_csv", True), ("n_cpus", 1)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from midasflow.cli.demo import make_demo_scan
    from midasflow.pipeline import integrate

    root = tmp_path_factory.mktemp("compat")
    files, _, cif = make_demo_scan(root, n_frames=2, sum_frames=2, size=256, seed=13, eta_bin_deg=90.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = integrate(files.params_file, files.data, result_folder=root, cache_dir=root / "cache")
    return path, cif


def test_signature_is_midas():
    params = inspect.signature(midasflow.run_refinement).parameters
    assert [(p.name, p.default) for p in params.values()] == MIDAS_SIGNATURE


@pytest.mark.slow
def test_the_manuals_example_runs(store, tmp_path, capsys):
    from midasflow import run_refinement

    path, cif = store
    results = run_refinement(data_file=str(path), cif_files=[str(cif)], output_dir=str(tmp_path / "refinement/"),
                             bkg_terms=6, refine_atoms=False, two_theta_limits=[1.0, 11.0], export_cif=False)
    print(f"Mean Rwp = {results['mean_Rwp']:.3f}%")
    print(f"Succeeded: {results['succeeded']} / {results['total_histograms']}")
    assert "Succeeded: 4 / 4" in capsys.readouterr().out
    for key in ("data_file", "total_histograms", "succeeded", "failed", "skipped", "mean_Rwp", "histograms"):
        assert key in results
    written = json.loads((tmp_path / "refinement" / "refinement_summary.json").read_text())
    assert json.loads(json.dumps(results)) == written
    assert results["data_file"] == str(path.resolve())
    assert len(list((tmp_path / "refinement").glob("hist_*_data.csv"))) == 4
    assert not list((tmp_path / "refinement").glob("hist_*.cif"))  # export_cif=False
    # a GSAS-II project per histogram, named in the summary as MIDAS's script names its own
    assert [h["gpx"] for h in results["histograms"]] == [
        str((tmp_path / "refinement" / f"hist_{h['histogram_index']:04d}.gpx").resolve())
        for h in results["histograms"]]
    assert all(Path(h["gpx"]).is_file() for h in results["histograms"])
    lo, hi = min(h["phases"][0]["cell"]["a"] for h in results["histograms"]), max(
        h["phases"][0]["cell"]["a"] for h in results["histograms"])
    assert 5.40 < lo <= hi < 5.43


def test_missing_data_file_raises_instead_of_exiting(tmp_path, store):
    from midasflow.errors import CakeFileError

    with pytest.raises(CakeFileError, match="nope.zarr.zip"):
        midasflow.run_refinement(str(tmp_path / "nope.zarr.zip"), [str(store[1])], str(tmp_path / "out"))


@pytest.mark.slow
def test_n_cpus_runs_on_a_local_dask_cluster(store, tmp_path):
    from midasflow.results import open_results

    path, cif = store
    serial = midasflow.run_refinement(path, [cif], tmp_path / "serial", refine_atoms=False, export_cif=False,
                                      export_csv=False)
    parallel = midasflow.run_refinement(path, [cif], tmp_path / "parallel", refine_atoms=False,
                                        export_cif=False, export_csv=False, n_cpus=2)
    assert [h["phases"] for h in parallel["histograms"]] == [h["phases"] for h in serial["histograms"]]
    workers = open_results(tmp_path / "parallel" / "results.zarr").worker.values
    assert all(w.startswith("tcp://127.0.0.1:") for w in workers.ravel())
    assert not any(open_results(tmp_path / "serial" / "results.zarr").worker.values.ravel())
    assert np.isclose(parallel["mean_Rwp"], serial["mean_Rwp"])
