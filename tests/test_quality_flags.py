"""Quality flags through the pipeline: results.zarr, the summary JSON, the strain fits, the CLI.

A small simulated CeO2 scan (256² px, one ω-group, 45° η bins: 8 lineouts) refined by the native
engine; garbage columns are written into its cake, and a tiny ``max_rwp`` flags every lineout.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from midasflow import pipeline
from midasflow.cli.demo import make_demo_scan
from midasflow.refinement.result import FLAGS
from midasflow.results import STRAIN_EXCLUDING_FLAGS, open_results

N_ETA = 8


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    from midasflow.io.caked_store import open_caked

    root = tmp_path_factory.mktemp("flags")
    files, _, cif = make_demo_scan(root, n_frames=2, sum_frames=2, size=256, seed=11, eta_bin_deg=360 / N_ETA)
    store = pipeline.integrate(files.params_file, files.data, result_folder=root, cache_dir=root / "cache")
    return dict(store=store, caked=open_caked(store).load(), cif=cif, root=root)


def _refine(scan, out, data=None, **options):
    return pipeline.refine(scan["store"] if data is None else data, [scan["cif"]], out=out, export=False,
                           report=False, refine_atoms=False, **options)


def test_garbage_lineouts_fail_and_stay_out_of_every_statistic(scan, tmp_path):
    caked = scan["caked"].copy(deep=True)
    caked["intensity"][0, :, 1] = 1e300     # absurd magnitude
    caked["intensity"][0, :, 2] = -5000.0   # nothing positive
    res = _refine(scan, tmp_path, data=caked)
    status = res.status.values[0]
    assert status[1] == "failed" and status[2] == "failed"
    assert res.message.values[0, 1].startswith("not a diffraction pattern: intensity or sigma up to 5e+299")
    assert res.message.values[0, 2].startswith("not a diffraction pattern: no positive intensity")
    ok = status == "ok"
    assert ok.sum() == N_ETA - 2
    assert np.isnan(res.a_a.values[0, 0, [1, 2]]).all() and not res.in_strain_fit.values[0, 0, [1, 2]].any()
    assert res.in_strain_fit.values[0, 0][ok].all()
    summary = json.loads((tmp_path / "refinement_summary.json").read_text())
    assert summary["failed"] == 2 and summary["succeeded"] == N_ETA - 2
    assert summary["mean_Rwp"] == pytest.approx(float(np.mean(res.rwp.values[0][ok])))
    cells = {h["histogram_index"]: h.get("phases") for h in summary["histograms"]}
    assert cells[1] is None and cells[2] is None  # MIDAS writes phases for successes only
    # the garbage spoils the group's η-averaged pattern: it seeds nothing, every lineout starts
    # from its own data, and the good ones end where the clean scan's (seeded) lineouts end
    assert set(res.seeded_from.values.ravel()) == {""}
    alone = _refine(scan, tmp_path / "alone")
    assert set(alone.seeded_from.values.ravel()) == {"group mean"}
    shift = (res.a_a.values[0, 0] - alone.a_a.values[0, 0]) / alone.a_a_esd.values[0, 0]
    assert np.all(np.abs(shift[ok]) < 0.1), shift


@pytest.mark.slow
def test_max_rwp_flags_every_lineout_and_keeps_them_out_of_the_strain_fits(scan, tmp_path):
    clean = _refine(scan, tmp_path / "clean")
    assert not clean.flags.sel(flag="rwp_above_max").any()
    assert clean.in_strain_fit.values.sum() == N_ETA and str(clean.strain_lab_status.values[0, 0]) == "ok"
    lowest = float(np.nanmin(clean.rwp.values))
    flagged = _refine(scan, tmp_path / "flagged", max_rwp=0.5 * lowest)
    assert flagged.flags.sel(flag="rwp_above_max").all()
    assert flagged.flags.dims == ("group", "eta", "flag") and list(flagged.flag.values) == list(FLAGS)
    assert not flagged.in_strain_fit.values.any()
    assert str(flagged.strain_lab_status.values[0, 0]) == "degenerate"
    assert all("rwp_above_max: Rwp" in w for w in flagged.warnings.values[0])
    # a flag, not a failure: the cells are the unflagged run's
    np.testing.assert_array_equal(flagged.a_a.values, clean.a_a.values)
    back = open_results(tmp_path / "flagged" / "results.zarr")
    assert back.flags.sel(flag="rwp_above_max").values.all() and back.flags.dtype == bool
    summary = json.loads((tmp_path / "flagged" / "refinement_summary.json").read_text())
    assert summary["flag_counts"]["rwp_above_max"] == N_ETA and summary["flagged"] == N_ETA
    assert set(summary["flag_counts"]) == set(FLAGS)
    assert summary["strain_excluding_flags"] == list(STRAIN_EXCLUDING_FLAGS)
    assert all("rwp_above_max" in h["flags"] for h in summary["histograms"])
    assert all(not st["in_fit"] for h in summary["histograms"] for st in h["strain"].values())
    # --include-flagged puts them back: the same fit as without the flag
    back_in = _refine(scan, tmp_path / "included", max_rwp=0.5 * lowest, include_flagged=True)
    assert back_in.in_strain_fit.values.all()
    np.testing.assert_allclose(back_in.strain_lab.values, clean.strain_lab.values, rtol=1e-12, atol=0)
    assert json.loads(back_in.attrs["strain_excluding_flags"]) == []


def test_flags_of_the_parametrisation_do_not_exclude_from_strain():
    assert {"unphysical_profile", "high_correlation", "texture_rolled_back", "shl_at_floor"} <= set(FLAGS)
    assert set(STRAIN_EXCLUDING_FLAGS) == set(FLAGS) - {"unphysical_profile", "high_correlation",
                                                        "texture_rolled_back", "shl_at_floor"}


@pytest.mark.slow
def test_undone_texture_stage_on_an_untextured_scan_is_reported_not_excluded(scan, tmp_path):
    """The demo's CeO2 is untextured: March–Dollase along [111] finds nothing (r within 3 esd of
    1 where it is kept) and is undone on some lineouts. Those lineouts are flagged ``texture_rolled_back`` (not ``rolled_back``), keep
    the cell of the refinement without texture (within 0.05 esd) and stay in the strain fits."""
    plain = _refine(scan, tmp_path / "plain")
    md = _refine(scan, tmp_path / "md", texture="md", po_axis=(1, 1, 1))
    undone = md.flags.sel(flag="texture_rolled_back").values[0]
    assert undone.any(), md.warnings.values  # 3 of 8 on the effective-2θ axis (at least 4 on bin centres)
    kept = md.po_param.values[0, 0][~undone], md.po_param_esd.values[0, 0][~undone]
    assert np.all(np.abs(kept[0] - 1.0) < 3 * kept[1]), kept  # where kept: no texture, r = 1
    assert not md.flags.sel(flag="rolled_back").values.any()
    assert all("texture_rolled_back: stage 'texture'" in w for w in md.warnings.values[0][undone])
    # the group-mean seed was refined with the stage, so the start differs slightly
    shift = (md.a_a.values[0, 0] - plain.a_a.values[0, 0]) / plain.a_a_esd.values[0, 0]
    assert np.all(np.abs(shift[undone]) < 0.05), shift
    assert np.isnan(md.po_param.values[0, 0][undone]).all()
    assert md.in_strain_fit.values.sum() == plain.in_strain_fit.values.sum() == N_ETA
    summary = json.loads((tmp_path / "md" / "refinement_summary.json").read_text())
    assert summary["flag_counts"]["texture_rolled_back"] == int(undone.sum())
    assert "texture_rolled_back" not in summary["strain_excluding_flags"]


@pytest.mark.slow
def test_command_line_flags_reach_the_results(scan, tmp_path, capsys):
    from midasflow.cli import main

    out = tmp_path / "cli"
    assert main(["refine", "--data", str(scan["store"]), "--cif", str(scan["cif"]), "--out", str(out),
                 "--no-atoms", "--no-export", "--no-report", "--max-rwp", "1e-6", "--physical-profile"]) == 0
    text = capsys.readouterr().out
    assert f"quality flags on {N_ETA} of {N_ETA} refined lineouts: " in text and f"rwp_above_max {N_ETA}" in text
    assert "left out of the strain fits (--include-flagged puts them back)" in text
    back = open_results(out / "results.zarr")
    assert not back.flags.sel(flag="unphysical_profile").any()  # --physical-profile keeps them physical


@pytest.mark.parametrize("argv, message", [
    (["--max-rwp", "-1"], "--max-rwp -1.0: expected a positive Rwp in percent"),
    (["--physical-profile", "--engine", "gsas2"], "--physical-profile: GSAS-II has no bound on the peak widths"),
])
def test_options_no_backend_can_honour_exit_2_before_any_work(scan, tmp_path, capsys, argv, message):
    from midasflow.cli import main

    out = tmp_path / "out"
    assert main(["refine", "--data", str(scan["store"]), "--cif", str(scan["cif"]), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


@pytest.mark.slow
def test_lineouts_start_from_their_group_mean_by_default_and_say_so(scan, tmp_path, capsys):
    from midasflow.cli import main

    seeded = _refine(scan, tmp_path / "seeded")
    assert set(seeded.seeded_from.values.ravel()) == {"group mean"}
    assert all("start values given for" in n for n in seeded.notes.values.ravel())
    assert main(["refine", "--data", str(scan["store"]), "--cif", str(scan["cif"]), "--out", str(tmp_path / "own"),
                 "--no-atoms", "--no-export", "--no-report", "--seed-from", "none"]) == 0
    capsys.readouterr()
    own = open_results(tmp_path / "own" / "results.zarr")
    assert set(own.seeded_from.values.ravel()) == {""}
    shift = (seeded.a_a.values - own.a_a.values) / own.a_a_esd.values
    assert np.all(np.abs(shift) < 0.5), shift
    summary = json.loads((tmp_path / "seeded" / "refinement_summary.json").read_text())
    assert {h["seeded_from"] for h in summary["histograms"]} == {"group mean"}
