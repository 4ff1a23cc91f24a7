"""MIDAS integrator flags (issue 10, item 4): -preProcThresh, -numFrameChunks, -nCPUsLocal,
-convertFiles and -mapDetector, as MIDAS's ``integrator.py`` takes them."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from midasflow.cli import main
from midasflow.cli.demo import make_demo_scan
from midasflow.io.caked_store import open_caked
from midasflow.io.frames import ScanSource, open_frames
from midasflow.params import read_params


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    root = tmp_path_factory.mktemp("midasflags")
    files, _, cif = make_demo_scan(root, n_frames=2, sum_frames=2, size=256, seed=11, eta_bin_deg=45.0)
    return dict(root=root, params=str(files.params_file), data=str(files.data), cif=str(cif),
                cache=str(root / "cache"))


def _midas_apply_correction(raw, dark_mean, thresh):
    """MIDAS ffGenerateZipRefactor.apply_correction, element by element (raw < dark + T → 0, else
    max(0, int(raw) − int(dark)))."""
    out = np.empty(raw.shape, dtype=np.float64)
    level = dark_mean + thresh
    for idx in np.ndindex(raw.shape):
        j, k = idx[1:]
        out[idx] = 0 if raw[idx] < level[j, k] else max(0, int(raw[idx]) - int(dark_mean[j, k]))
    return out


def _integrate(scan, folder, *flags):
    assert main(["integrate", "-paramFN", scan["params"], "-dataFN", scan["data"], "-resultFolder", str(folder),
                 "--cache-dir", scan["cache"], "--no-progress", *flags]) == 0
    return open_caked(folder / "scan_000001.zarr.zip")


def test_pre_proc_thresh_matches_midas_zipgen(scan):
    params = read_params(scan["params"])
    with h5py.File(scan["data"], "r") as f:
        raw = f["exchange/data"][...]
        dark = f["exchange/dark"][...]
    dark_mean = dark[params.skip_frame:].astype(np.float64).mean(axis=0) if len(dark) > params.skip_frame \
        else dark.astype(np.float64).mean(axis=0)
    dark_mean = np.floor(dark_mean)  # MIDAS subtracts int(dark mean); an integer dark makes both agree
    with h5py.File(scan["data"], "a") as f:
        f["exchange/dark"][...] = np.broadcast_to(dark_mean, dark.shape).astype(dark.dtype)
    thresh = 40.0
    frames = open_frames(ScanSource(scan["data"], pre_proc_thresh=thresh), params).values
    expected = _midas_apply_correction(raw[params.skip_frame:], dark_mean, thresh)
    np.testing.assert_array_equal(frames, expected.astype(np.float32))
    plain = open_frames(ScanSource(scan["data"]), params).values
    below = (plain < thresh) & (plain != 0)
    assert below.sum() > 100 and (frames[below] == 0).all()  # the threshold zeroed them
    assert frames.min() == 0 and plain.min() > 0


def test_pre_proc_thresh_keeps_flagged_pixels_nan():
    from midasflow.io.frames import threshold_frames

    frames = np.array([[[-3.0, 0.5, 2.0, np.nan, 7.0]]], dtype=np.float32)
    out = threshold_frames(frames, np.float32(2.0))
    np.testing.assert_array_equal(out, np.array([[[0.0, 0.0, 2.0, np.nan, 7.0]]], dtype=np.float32))
    np.testing.assert_array_equal(threshold_frames(frames, np.float32(-5.0)),
                                  np.array([[[0.0, 0.5, 2.0, np.nan, 7.0]]], dtype=np.float32))


def test_pre_proc_thresh_flag_reaches_the_cake(scan, tmp_path):
    everything = _integrate(scan, tmp_path / "all", "-preProcThresh", "1e9")
    assert float(np.nanmax(np.abs(everything.intensity.values))) == 0.0
    off = _integrate(scan, tmp_path / "off", "-preProcThresh", "-1")  # MIDAS's "disabled"
    assert float(np.nanmax(off.intensity.values)) > 0


def test_num_frame_chunks_reads_n_frames_at_a_time_with_the_same_cakes(scan, tmp_path):
    params = read_params(scan["params"])
    frames = open_frames(ScanSource(scan["data"], frames_per_read=1), params)
    assert frames.data.chunks[0] == (1, 1)
    one = _integrate(scan, tmp_path / "one", "-numFrameChunks", "1")
    default = _integrate(scan, tmp_path / "default", "-numFrameChunks", "-1")
    np.testing.assert_array_equal(one.intensity.values, default.intensity.values)


def test_convert_files_0_reads_midas_converted_zip(scan, tmp_path):
    import zarr
    from zarr.storage import ZipStore

    folder = tmp_path / "result"
    folder.mkdir()
    with h5py.File(scan["data"], "r") as f:
        raw, dark = f["exchange/data"][...], f["exchange/dark"][...]
    # what MIDAS's ZIPGEN writes without -preProcThresh: raw frames and darks under exchange/
    store = ZipStore(str(folder / "scan_000001.h5.analysis.MIDAS.zip"), mode="w")
    group = zarr.open_group(store, mode="w", zarr_format=2)
    group.create_array("exchange/data", data=raw, chunks=(1, *raw.shape[1:]))
    group.create_array("exchange/dark", data=dark, chunks=(1, *dark.shape[1:]))
    store.close()
    converted = _integrate(scan, folder, "-convertFiles", "0")
    direct = _integrate(scan, tmp_path / "direct", "-convertFiles", "1")
    np.testing.assert_array_equal(converted.intensity.values, direct.intensity.values)


def test_convert_files_0_without_the_converted_file_names_it(scan, tmp_path, capsys):
    assert main(["integrate", "-paramFN", scan["params"], "-dataFN", scan["data"], "-resultFolder",
                 str(tmp_path / "r"), "-convertFiles", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{tmp_path / 'r' / 'scan_000001.h5.analysis.MIDAS.zip'}: file not found" in err


@pytest.mark.parametrize("flags", [["-mapDetector", "0"], ["-mapDetector", "1"], ["-nCPUsLocal", "1"],
                                   ["-startFileNr", "-1", "-endFileNr", "-1"], ["-v"]])
def test_midas_flags_are_accepted(scan, tmp_path, flags):
    ds = _integrate(scan, tmp_path / "x", *flags)
    assert ds.sizes["eta"] == 8


@pytest.mark.parametrize("flags, message", [
    (["-numFrameChunks", "0"], "-numFrameChunks 0: expected a frame count >= 1 (or -1 for the default)"),
    (["-nCPUsLocal", "0"], "-nCPUsLocal 0: expected a positive number of threads"),
    (["-mapDetector", "2"], "argument -mapDetector/--map-detector: invalid choice: 2"),
    (["-preProcThresh", "x"], "argument -preProcThresh/--pre-proc-thresh: invalid float value: 'x'"),
])
def test_bad_midas_flag_values_exit_2(scan, tmp_path, capsys, flags, message):
    assert main(["integrate", "-paramFN", scan["params"], "-dataFN", scan["data"], "-resultFolder",
                 str(tmp_path / "r"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name, stem", [
    ("scan_000001.h5", "scan_000001"), ("ff_000123.ge3", "ff_000123"), ("img_0001.tif.bz2", "img_0001"),
    ("scan_000001.h5.analysis.MIDAS.zip", "scan_000001"), ("x.cbf", "x"), ("run.7.edf", "run.7"),
])
def test_store_names_follow_midas_short_names(name, stem):
    from midasflow.pipeline import scan_stem

    assert scan_stem(f"/data/{name}") == stem
