"""MIDAS's hist_NNNN numbering and refinement_summary.json schema (issue 10, item 1).

Histograms are numbered as MIDAS's gsas_ii_refine.py and GSAS-II's MIDAS importer number them:
consecutively over the η columns with more than 20 bins of non-zero BinArea, ω-groups in the
order of their sorted member names (LastFrameNumber_10 before LastFrameNumber_2). A script
written for MIDAS's JSON runs unchanged against midasflow's.
"""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from midasflow.refinement.lineouts import plan_lineouts
from midasflow.refinement.numbering import arrival_numbers, group_order, histogram_numbers

SCRIPT = Path(__file__).parent / "midas_scripts" / "summarize_refinement.py"


def test_groups_in_the_order_of_their_sorted_member_names():
    # LastFrameNumber_1, _3, …, _23: as text, _11 … _19 come before _3
    last = [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23]
    names = [f"LastFrameNumber_{n}" for n in last]
    assert [names[g] for g in group_order(last)] == sorted(names)
    assert group_order(last)[:3] == [0, 5, 6]


def test_numbers_skip_columns_without_enough_area():
    area = np.ones((30, 4))
    area[9:, 1] = 0.0  # 9 bins: more than 8, a histogram column
    area[8:, 3] = 0.0  # 8 bins: none
    numbers = histogram_numbers(area, [5, 1, 3], min_points=8)  # groups in the order 1, 2, 0
    assert numbers[:, 3].tolist() == [-1, -1, -1]
    assert numbers[1].tolist() == [0, 1, 2, -1] and numbers[2].tolist() == [3, 4, 5, -1]
    assert numbers[0].tolist() == [6, 7, 8, -1]


def test_stream_numbers_groups_as_they_arrive():
    area = np.ones((30, 4))
    area[8:, 3] = 0.0  # 8 bins: not a histogram column
    numbers = arrival_numbers(area, 11, min_points=8)
    assert numbers[:, 3].tolist() == [-1] * 11
    assert numbers[2].tolist() == [6, 7, 8, -1]  # group 2 third, though "_2" sorts after "_10"
    assert numbers[10].tolist() == [30, 31, 32, -1]


def _midas_histograms(path):
    """MIDAS's gsas_ii_refine._extract_histograms, as its code reads the file: the valid η columns
    from REtaMap[3], the OmegaSumFrame keys sorted, (key, η column, its unmasked bins, their 2θ as
    GSAS-II's importer takes them: REtaMap's bin centres)."""
    import zarr
    from zarr.storage import ZipStore

    store = ZipStore(str(path), mode="r")
    try:
        fp = zarr.open_group(store, mode="r", zarr_format=2)
        remap = np.array(fp["REtaMap"][...])
        tth_map, area_map = remap[1], remap[3]
        valid = [i for i in range(tth_map.shape[1]) if np.sum(area_map[:, i] != 0) > 20]
        keys = sorted(fp["OmegaSumFrame"].keys())
        return [(key, i, area_map[:, i] != 0, tth_map[area_map[:, i] != 0, i])
                for key in keys for i in valid]
    finally:
        store.close()


@pytest.fixture(scope="module")
def twelve_groups(tmp_path_factory):
    """A .zarr.zip of 12 ω-groups × 8 η columns; column 2 is NaN in group 3 (so BinArea is 0 there
    for every group: no histogram column)."""
    from midasflow.io.caked_store import open_caked
    from midasflow.io.midas_zarr import write_midas_zarr
    from midasflow.pipeline import integrate
    from midasflow.simulate import simulate_ceo2_scan

    root = tmp_path_factory.mktemp("numbering")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files, _ = simulate_ceo2_scan(root / "scan", shape=(256, 256), n_frames=12, seed=8,
                                      params_overrides={"omega_sum_frames": 1, "eta_bin_deg": 45.0,
                                                        "omega_step_deg": 1.0})
        store = integrate(files.params_file, files.data, result_folder=root / "plain", cache_dir=root / "cache")
    ds = open_caked(store).load()
    ds["intensity"][3, :, 2] = np.nan
    return write_midas_zarr(ds, root / "masked.zarr.zip")


def test_numbering_is_midas_scripts(twelve_groups):
    midas = _midas_histograms(twelve_groups)
    specs = {s.histogram: s for s in plan_lineouts(twelve_groups) if s.histogram >= 0}
    assert len(specs) == len(midas) == 12 * 7
    from midasflow.io.caked_store import open_caked

    caked = open_caked(twelve_groups)
    last_frame, effective = caked.last_frame.values, caked.effective_tth_deg.values
    for k, (key, column, bins, _) in enumerate(midas):
        spec = specs[k]
        assert key == f"LastFrameNumber_{last_frame[spec.group]}" and spec.eta_index == column
        # the importer's points (its x axis is REtaMap's bin centres; ours each bin's effective 2θ)
        np.testing.assert_array_equal(spec.tth_deg, np.sort(effective[bins, column]))
    # the tenth and later groups come between the first and the second (text order)
    assert specs[7 * 2].group == 10 and specs[7 * 4].group == 2
    # the masked column is no histogram in any group, but its other lineouts are still planned
    column2 = [s for s in plan_lineouts(twelve_groups) if s.eta_index == 2]
    assert all(s.histogram == -1 for s in column2) and sum(not s.skipped for s in column2) == 11
    assert column2[0].name == "lineout_g0000_e0002"


def test_numbering_is_gsas2_importers(gsasii, twelve_groups, tmp_path):
    gpx = gsasii.G2Project(newgpx=str(tmp_path / "import.gpx"))
    hists = gpx.add_powder_histogram(str(twelve_groups), None, fmthint="MIDAS", multiple=True)
    specs = {s.histogram: s for s in plan_lineouts(twelve_groups) if s.histogram >= 0}
    midas = _midas_histograms(twelve_groups)
    assert len(hists) == len(specs) == len(midas)
    for k, hist in enumerate(hists):
        # GSAS-II's x axis is REtaMap's bin centres (ours each bin's effective 2θ, same bins)
        np.testing.assert_allclose(np.asarray(hist.getdata("X")), midas[k][3], rtol=1e-12)
        assert specs[k].eta_index == midas[k][1] and specs[k].n_points == midas[k][3].size
        assert f"omega={specs[k].omega_deg}" in hist.name


def _refine_small(tmp_path):
    """3 ω-groups × 4 η columns, column 1 NaN in group 2: 9 histograms and 3 other lineouts."""
    from midasflow.crystal import cubic_phase, write_phase_cif
    from midasflow.io.caked_store import open_caked
    from midasflow.io.midas_zarr import write_midas_zarr
    from midasflow.pipeline import integrate, refine
    from midasflow.simulate import simulate_ceo2_scan

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files, truth = simulate_ceo2_scan(tmp_path / "scan", shape=(256, 256), n_frames=3, seed=9,
                                          params_overrides={"omega_sum_frames": 1, "eta_bin_deg": 90.0})
        plain = integrate(files.params_file, files.data, result_folder=tmp_path / "plain",
                          cache_dir=tmp_path / "cache")
    ds = open_caked(plain).load()
    ds["intensity"][2, :, 1] = np.nan
    store = write_midas_zarr(ds, tmp_path / "scan.zarr.zip")
    cif = write_phase_cif(cubic_phase("CeO2", truth["a0_a"]), tmp_path / "CeO2.cif")
    out = tmp_path / "refinement"
    results = refine(store, [cif], out=out, refine_atoms=False, report=False)
    return out, results


@pytest.mark.slow
def test_a_script_written_for_midas_json_runs_unchanged(tmp_path):
    out, results = _refine_small(tmp_path)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    summary = json.loads((out / "refinement_summary.json").read_text())
    assert summary["total_histograms"] == 9 and summary["succeeded"] == 9
    assert f"Succeeded: 9 / 9" in proc.stdout and "Mean Rwp = " in proc.stdout
    numbered = (results.histogram_index.values >= 0) & (results.status.values == "ok")
    mean_a = float(np.mean(results.a_a.values[0][numbered]))
    assert last == f"mean_a={mean_a:.6f} n=9 mean_Rwp={summary['mean_Rwp']:.6f}"
    # the other lineouts are refined too, reported apart and named by their (group, η)
    assert [(o["group"], o["eta_index"]) for o in summary["other_lineouts"]] == [(0, 1), (1, 1)]
    assert (out / "lineout_g0000_e0001_data.csv").is_file()
    assert sorted(p.name for p in out.glob("hist_*_data.csv")) == [f"hist_{k:04d}_data.csv" for k in range(9)]


def test_nothing_succeeded_leaves_mean_rwp_out(tmp_path):
    from midasflow.results import summary_dict
    from midasflow.refinement.lineouts import run_serial

    from lineouts_helpers import TOY_OPTIONS, ToyBackend, make_caked
    from midasflow.results import assemble_results

    ds = make_caked(n_groups=1, n_eta=4)
    lineouts = run_serial(plan_lineouts(ds), TOY_OPTIONS, backend=ToyBackend(fail_below=1e9))
    summary = summary_dict(assemble_results(lineouts))
    assert summary["succeeded"] == 0 and summary["failed"] == 4 and "mean_Rwp" not in summary
    assert all(h["status"] == "failed" and h["error"] for h in summary["histograms"])


def test_gpx_paths_name_the_projects_that_exist(tmp_path):
    from lineouts_helpers import TOY_OPTIONS, ToyBackend, make_caked
    from midasflow.refinement.lineouts import run_serial
    from midasflow.results import assemble_results, summary_dict

    ds = make_caked(n_groups=1, n_eta=4)
    results = assemble_results(run_serial(plan_lineouts(ds), TOY_OPTIONS, backend=ToyBackend()))
    (tmp_path / "hist_0001.gpx").write_bytes(b"")  # one written beside the summary (native)
    (tmp_path / "gsas2" / "hist_0003").mkdir(parents=True)  # one by the GSAS-II engine
    (tmp_path / "gsas2" / "hist_0003" / "hist_0003.gpx").write_bytes(b"")
    gpx = [h["gpx"] for h in summary_dict(results, tmp_path)["histograms"]]
    assert gpx == [None, str((tmp_path / "hist_0001.gpx").resolve()), None,
                   str((tmp_path / "gsas2" / "hist_0003" / "hist_0003.gpx").resolve())]
