"""Per-file scans (issue 10, item 3): -startFileNr/-endFileNr make one store per file, as MIDAS's
integrator does, and `run` one refinement folder per file; a missing file is skipped with a
warning; --merge-series keeps one store for the whole range."""
from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest

from midasflow.cli import main
from midasflow.cli.demo import make_demo_scan
from midasflow.io.caked_store import open_caked


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """scan_000001.h5 and scan_000003.h5 (twice the counts); scan_000002.h5 is missing."""
    root = tmp_path_factory.mktemp("series")
    files, _, cif = make_demo_scan(root, n_frames=2, sum_frames=2, size=256, seed=21, eta_bin_deg=45.0)
    third = files.data.with_name("scan_000003.h5")
    shutil.copy(files.data, third)
    with h5py.File(third, "a") as f:
        f["exchange/data"][...] = f["exchange/data"][...] * 2
    return dict(params=str(files.params_file), first=str(files.data), third=str(third), cif=str(cif),
                cache=str(root / "cache"))


def _integrate(series, folder, *flags):
    return ["integrate", "-paramFN", series["params"], "-dataFN", series["first"], "-resultFolder", str(folder),
            "--cache-dir", series["cache"], "--no-progress", *flags]


def test_one_store_per_file_missing_ones_skipped_with_a_warning(series, tmp_path, capsys):
    folder = tmp_path / "per_file"
    assert main(_integrate(series, folder, "-startFileNr", "1", "-endFileNr", "3")) == 0
    captured = capsys.readouterr()
    assert captured.out.split() == [str(folder / "scan_000001.zarr.zip"), str(folder / "scan_000003.zarr.zip")]
    warning = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "scan_000002.h5: file not found; skipped" in warning[0]
    first, third = (open_caked(folder / f"scan_00000{k}.zarr.zip") for k in (1, 3))
    assert first.sizes["group"] == third.sizes["group"] == 1
    assert first.attrs["params"] == third.attrs["params"]

    single = tmp_path / "single"
    assert main(_integrate(series, single)) == 0
    alone = open_caked(single / "scan_000001.zarr.zip")
    np.testing.assert_array_equal(first.intensity.values, alone.intensity.values)
    ratio = np.nanmedian(third.intensity.values / first.intensity.values)
    assert ratio > 1.5  # the third file's own (doubled) frames, not the first's


def test_merge_series_keeps_one_store_for_the_range(series, tmp_path, capsys):
    folder = tmp_path / "merged"
    shutil.copy(series["first"], tmp_path / "scan_000002.h5")  # a complete range elsewhere
    first = tmp_path / "scan_000001.h5"
    shutil.copy(series["first"], first)
    shutil.copy(series["third"], tmp_path / "scan_000003.h5")
    assert main(["integrate", "-paramFN", series["params"], "-dataFN", str(first), "-resultFolder", str(folder),
                 "--cache-dir", series["cache"], "--no-progress", "-startFileNr", "1", "-endFileNr", "3",
                 "--merge-series"]) == 0
    assert capsys.readouterr().out.split() == [str(folder / "scan_000001.zarr.zip")]
    merged = open_caked(folder / "scan_000001.zarr.zip")
    assert merged.sizes["group"] == 3 and list(merged.frames_summed.values) == [2, 2, 2]


def test_merge_series_with_a_missing_file_is_an_error(series, tmp_path, capsys):
    assert main(_integrate(series, tmp_path / "m", "-startFileNr", "1", "-endFileNr", "3", "--merge-series")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "scan_000002.h5: file not found (and" not in err
    assert "scan_000002.h5: file not found" in err
    assert not (tmp_path / "m").exists()


def test_a_range_without_any_file_is_an_error(series, tmp_path, capsys):
    assert main(_integrate(series, tmp_path / "none", "-startFileNr", "7", "-endFileNr", "9")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("midasflow integrate: error: ") and "no file of the range" in err[-1]
    assert "scan_000007.h5" in err[-1] and "scan_000009.h5" in err[-1]
    assert not (tmp_path / "none").exists()


def test_skip_existing_keeps_an_existing_store(series, tmp_path, capsys):
    folder = tmp_path / "skip"
    assert main(_integrate(series, folder)) == 0
    store = folder / "scan_000001.zarr.zip"
    before = store.stat().st_mtime_ns
    assert main(_integrate(series, folder, "-skipExisting")) == 0
    assert store.stat().st_mtime_ns == before and capsys.readouterr().out.split()[-1] == str(store)


@pytest.mark.slow
def test_run_refines_each_file_into_its_own_folder(series, tmp_path, capsys):
    out = tmp_path / "refined"
    assert main(["run", "-paramFN", series["params"], "-dataFN", series["first"], "-resultFolder",
                 str(tmp_path / "caked"), "--cache-dir", series["cache"], "-startFileNr", "1", "-endFileNr", "3",
                 "--cif", series["cif"], "--out", str(out), "--no-atoms", "--mode", "lebail", "--no-export",
                 "--no-report", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert f"== {out / 'scan_000001'}" in text and f"== {out / 'scan_000003'}" in text
    for k in (1, 3):
        summary = json.loads((out / f"scan_00000{k}" / "refinement_summary.json").read_text())
        assert summary["data_file"].endswith(f"scan_00000{k}.zarr.zip")
        assert summary["succeeded"] == 8
    assert not (out / "scan_000002").exists() and not (out / "refinement_summary.json").exists()
