"""Frame readers: every format written with its own library reads back to the same float32 frames."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from midasflow.errors import FrameError
from midasflow.io import fabio_frames, ge, hdf5, zarr_frames
from midasflow.io.frames import ScanSource, open_frames, read_mask, series_files
from midasflow.params import Params

from dask_helpers import raise_if_dask_computes

NZ, NY = 6, 7


def _params(**kw) -> Params:
    return Params(nr_pixels_z=NZ, nr_pixels_y=NY, **kw)


#: Detector flags _frames writes into signed data: a Pilatus-like gap (-1) and a bad pixel (-2).
FLAGGED = {(1, 2): -1, (4, 0): -2}


def _frames(n: int, dtype=np.int32, seed: int = 0) -> np.ndarray:
    """Counts 0..999 (exact in float32); signed data also carry the FLAGGED values."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 1000, size=(n, NZ, NY)).astype(dtype)
    if np.dtype(dtype).kind == "i":
        for (z, y), flag in FLAGGED.items():
            data[:, z, y] = flag
    return data


def _expected(raw: np.ndarray) -> np.ndarray:
    """What open_frames must give for _frames data, written down from how _frames made it (not
    from the reader's rule): the counts themselves, NaN exactly where _frames put the flags."""
    out = np.array(raw, dtype=np.float64)  # the counts are small integers: exact in any float
    if np.dtype(raw.dtype).kind == "i":
        for z, y in FLAGGED:
            out[:, z, y] = np.nan
    return out


# ----------------------------------------------------------------------------- writers
def _write_h5(path, data, compression=None):
    import h5py
    import hdf5plugin

    kwargs = {
        None: {},
        "bitshuffle": dict(hdf5plugin.Bitshuffle(cname="lz4")),
        "blosc": dict(hdf5plugin.Blosc(cname="zstd", clevel=3, shuffle=hdf5plugin.Blosc.BITSHUFFLE)),
    }[compression]
    with h5py.File(path, "w") as f:
        f.create_dataset("exchange/data", data=data, chunks=(1, NZ, NY), **kwargs)
    return path


def _write_ge(path, data, header=8192):
    with open(path, "wb") as f:
        f.write(b"\0" * header)
        f.write(np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<")).tobytes())
    return path


def _write_tiff_pages(path, data):
    import tifffile

    for frame in data:
        tifffile.imwrite(path, frame, append=True)
    return path


def _write_tiff_stack(path, data):
    import tifffile

    tifffile.imwrite(path, data, photometric="minisblack")
    return path


def _write_tiff_planar(path, data):
    """Three frames in ONE page as separate sample planes (tifffile's old default for (3, nz, ny))."""
    import tifffile

    tifffile.imwrite(path, data, photometric="rgb", planarconfig="separate")
    return path


def _write_cbf(path, data):
    from fabio.cbfimage import CbfImage

    CbfImage(data=data[0]).write(str(path))
    return path


def _write_edf(path, data):
    from fabio.edfimage import EdfImage

    img = EdfImage(data=data[0])
    for frame in data[1:]:
        img.append_frame(data=frame)
    img.write(str(path))
    return path


def _write_zarr_group(path, data, zarr_format=2):
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    group.create_array("exchange/data", shape=data.shape, dtype=data.dtype, chunks=(1, NZ, NY))[:] = data
    return path


def _write_zarr_array(path, data):
    import zarr

    zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, chunks=(2, NZ, NY))[:] = data
    return path


def _write_zarr_zip(path, data):
    import zarr
    from zarr.storage import ZipStore

    store = ZipStore(str(path), mode="w")
    group = zarr.open_group(store, mode="w", zarr_format=2)
    group.create_array("exchange/data", shape=data.shape, dtype=data.dtype, chunks=(1, NZ, NY))[:] = data
    store.close()
    return path


FORMATS = [
    ("scan.h5", lambda p, d: _write_h5(p, d), np.int32, 5, {}),
    ("scan.hdf5", lambda p, d: _write_h5(p, d, "bitshuffle"), np.uint32, 5, {}),
    ("scan.nxs", lambda p, d: _write_h5(p, d, "blosc"), np.int32, 4, {}),
    ("scan.ge3", lambda p, d: _write_ge(p, d), np.uint16, 5, {}),
    ("scan.ge5", lambda p, d: _write_ge(p, d, header=8192 + 100), np.uint32, 3,
     {"ge_header_bytes": 8292, "pixel_value_bytes": 4}),
    ("pages.tif", _write_tiff_pages, np.int32, 4, {}),
    ("stack.tiff", _write_tiff_stack, np.uint16, 5, {}),
    ("planar.tif", _write_tiff_planar, np.uint16, 3, {}),
    ("single.tif", _write_tiff_stack, np.int32, 1, {}),
    ("pilatus.cbf", _write_cbf, np.int32, 1, {}),
    ("multi.edf", _write_edf, np.uint16, 3, {}),
    ("v2group.zarr", lambda p, d: _write_zarr_group(p, d, 2), np.int32, 5, {}),
    ("v3group.zarr", lambda p, d: _write_zarr_group(p, d, 3), np.int32, 5, {}),
    ("v3array.zarr", _write_zarr_array, np.uint16, 5, {}),
    ("scan.analysis.MIDAS.zip", _write_zarr_zip, np.int32, 4, {}),
]


@pytest.mark.parametrize("name,writer,dtype,n,extra", FORMATS, ids=[f[0] for f in FORMATS])
def test_format_round_trip(tmp_path, name, writer, dtype, n, extra):
    raw = _frames(n, dtype)
    path = writer(tmp_path / name, raw)
    frames = open_frames(path, _params(**extra), frames_per_chunk=2)
    assert frames.dtype == np.float32
    assert frames.dims == ("frame", "z", "y")
    assert frames.chunks[0] == tuple([2] * (n // 2) + ([n % 2] if n % 2 else []))
    np.testing.assert_array_equal(frames.values, _expected(raw))
    assert frames.attrs["source_files"] == [str(path)]
    assert frames.attrs["dark_source"] == ""
    # the graph pickles (dask.distributed ships it to workers) and recomputes the same frames
    clone = pickle.loads(pickle.dumps(frames.data))
    np.testing.assert_array_equal(clone.compute(), _expected(raw))


def test_default_chunks_are_about_64_mib(tmp_path):
    import h5py

    path = tmp_path / "big.h5"
    with h5py.File(path, "w") as f:  # fill-value dataset: nothing stored on disk
        f.create_dataset("exchange/data", shape=(10, 2048, 2048), dtype=np.uint16, chunks=(1, 2048, 2048))
    params = Params(nr_pixels_z=2048, nr_pixels_y=2048)
    frames = open_frames(path, params)
    assert frames.chunks[0] == (4, 4, 2)  # 4 float32 frames of 16 MiB = 64 MiB


def test_opening_reads_no_pixels(tmp_path, monkeypatch):
    reads = []
    for cls in (hdf5.Hdf5Source, ge.GeSource, fabio_frames.TiffSource, fabio_frames.FabioSource,
                zarr_frames.ZarrSource):
        original = cls.read

        def counting(self, start, stop, _original=original):
            reads.append((self.path, start, stop))
            return _original(self, start, stop)

        monkeypatch.setattr(cls, "read", counting)
    raw = _frames(6)
    path = tmp_path / "scan.h5"
    _write_h5(path, raw)
    import h5py

    with h5py.File(path, "a") as f:
        f["exchange/dark"] = np.full((2, NZ, NY), 3, np.int32)
    frames = open_frames(path, _params(skip_frame=1), frames_per_chunk=2)
    ge_path = _write_ge(tmp_path / "scan.ge2", _frames(3, np.uint16))
    lazy_ge = open_frames(ScanSource(ge_path, dark_fn=_write_tiff_stack(tmp_path / "d.tif", _frames(1))), _params())
    assert reads == []
    first = frames.isel(frame=slice(0, 2)).values  # one chunk of data + the dark
    assert sorted(reads) == [(str(path), 1, 2), (str(path), 1, 3)]  # dark frame 1, data frames 1-2
    np.testing.assert_array_equal(first, _expected(raw)[1:3] - 3)
    lazy_ge.compute()
    assert {r[0] for r in reads} == {str(path), str(ge_path), str(tmp_path / "d.tif")}


def test_series_concatenates_and_skips_first_frames_of_scan(tmp_path):
    raw = _frames(7, np.uint16)
    # GE series numbered 5..7 with 3 + 2 + 2 frames
    _write_ge(tmp_path / "ff_000005.ge3", raw[:3])
    _write_ge(tmp_path / "ff_000006.ge3", raw[3:5])
    _write_ge(tmp_path / "ff_000007.ge3", raw[5:])
    params = _params(skip_frame=2, omega_start_deg=-5.0, omega_step_deg=0.25)
    frames = open_frames(ScanSource(tmp_path / "ff_000005.ge3", end_file_nr=7), params, frames_per_chunk=2)
    np.testing.assert_array_equal(frames.values, _expected(raw)[2:])
    np.testing.assert_array_equal(frames["frame"].values, np.arange(5))
    np.testing.assert_allclose(frames["omega"].values, -5.0 + 0.25 * np.arange(5))
    assert frames.attrs["source_files"] == [str(tmp_path / f"ff_00000{k}.ge3") for k in (5, 6, 7)]
    # an explicit start number picks the file even when data_fn names another one of the series
    frames = open_frames(ScanSource(tmp_path / "ff_000005.ge3", start_file_nr=6, end_file_nr=7), params)
    np.testing.assert_array_equal(frames.values, _expected(raw)[5:])


def test_opening_a_series_with_a_dark_computes_nothing(tmp_path):
    raw = _frames(5, np.uint16)
    _write_ge(tmp_path / "ff_000001.ge3", raw[:3])
    _write_ge(tmp_path / "ff_000002.ge3", raw[3:])
    dark = _write_tiff_stack(tmp_path / "dark.tif", np.full((3, NZ, NY), 4, np.int32))
    with raise_if_dask_computes():
        frames = open_frames(ScanSource(tmp_path / "ff_000001.ge3", dark_fn=dark, end_file_nr=2),
                             _params(skip_frame=1), frames_per_chunk=2)
    np.testing.assert_array_equal(frames.values, _expected(raw)[1:] - 4)


def test_single_frame_tiff_series_other_width_and_skip_across_files(tmp_path):
    raw = _frames(4)
    for k, frame in enumerate(raw):
        _write_tiff_stack(tmp_path / f"img_{10 + k:04d}_x.tif", frame[np.newaxis])
    names = series_files(tmp_path / "img_0010_x.tif", 10, 13)
    assert [os.path.basename(n) for n in names] == [f"img_{k:04d}_x.tif" for k in range(10, 14)]
    frames = open_frames(ScanSource(tmp_path / "img_0010_x.tif", start_file_nr=10, end_file_nr=13),
                         _params(skip_frame=3))
    np.testing.assert_array_equal(frames.values, _expected(raw)[3:])


@pytest.mark.parametrize("dtype", [np.uint32, np.uint16])
def test_eiger_gap_value_of_unsigned_data_is_masked(tmp_path, dtype):
    raw = _frames(3, dtype)
    raw[:, 2, :] = np.iinfo(dtype).max  # Eiger module gap row
    raw[1, 4, 5] = np.iinfo(dtype).max  # a dead pixel in one frame
    frames = open_frames(_write_h5(tmp_path / "eiger.h5", raw, "bitshuffle"), _params()).values
    assert np.isnan(frames[:, 2, :]).all() and np.isnan(frames[1, 4, 5])
    assert np.isfinite(frames[0, 4, 5]) and np.isfinite(np.delete(frames, 2, axis=1)[[0, 2]]).all()
    assert np.nanmax(frames) < 1000  # no 4e9 counts leak into the cake


def test_dark_mean_subtracted_with_skip_and_flags(tmp_path):
    import h5py

    raw = _frames(4)
    dark = np.stack([np.full((NZ, NY), 10_000), np.full((NZ, NY), 4), np.full((NZ, NY), 7)]).astype(np.int32)
    dark[1:, 0, 0] = -1  # a flagged dark pixel makes that pixel NaN
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as f:
        f["exchange/data"] = raw
        f["exchange/dark"] = dark
        f["other/dark"] = np.full((1, NZ, NY), 2, np.int32)
    expected = _expected(raw)[1:] - np.float32(5.5)  # mean of dark frames 1 and 2 (SkipFrame 1)
    expected[:, 0, 0] = np.nan
    frames = open_frames(path, _params(skip_frame=1))
    assert frames.attrs["dark_source"] == f"{path}::exchange/dark"
    np.testing.assert_array_equal(frames.values, expected)
    # another location in the same file; a one-frame dark is used whole despite SkipFrame
    frames = open_frames(ScanSource(path, dark_fn=path, dark_loc="other/dark"), _params(skip_frame=1))
    np.testing.assert_array_equal(frames.values, _expected(raw)[1:] - 2)
    # no dark anywhere: no subtraction
    frames = open_frames(ScanSource(path, dark_loc="missing/dark"), _params())
    np.testing.assert_array_equal(frames.values, _expected(raw))


def test_dark_from_parameter_file_relative_to_it(tmp_path):
    raw = _frames(2, np.uint16)
    data = _write_ge(tmp_path / "data.ge2", raw)
    (tmp_path / "darks").mkdir()
    _write_ge(tmp_path / "darks" / "dark.ge2", np.full((2, NZ, NY), 6, np.uint16))
    params = _params(dark_file="darks/dark.ge2").with_overrides(source=str(tmp_path / "ps.txt"))
    frames = open_frames(data, params)
    np.testing.assert_array_equal(frames.values, _expected(raw) - 6)


def _one_line_error(match, tmp_path, data_fn, params, frames_per_chunk=None, **source):
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(FrameError, match=match) as info:
        open_frames(ScanSource(data_fn, **source), params, frames_per_chunk=frames_per_chunk)
    assert "\n" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == before  # nothing written
    return str(info.value)


def test_bad_inputs_give_one_line_errors(tmp_path):
    import h5py

    good = _write_h5(tmp_path / "good.h5", _frames(2))
    msg = _one_line_error("file not found", tmp_path, tmp_path / "nope.h5", _params())
    assert "nope.h5" in msg
    msg = _one_line_error(r"no dataset 'entry/data'; top-level entries: exchange", tmp_path, good, _params(),
                          data_loc="entry/data")
    assert "good.h5" in msg
    _one_line_error(r"'exchange' is a group", tmp_path, good, _params(), data_loc="exchange")
    msg = _one_line_error(r"frames are 6×7 \(z×y\) but the parameters say NrPixelsZ×NrPixelsY = 6×8",
                          tmp_path, good, Params(nr_pixels_z=6, nr_pixels_y=8))
    assert "good.h5" in msg
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["exchange/data"] = np.zeros((2, 2, NZ, NY))
        f["line"] = np.zeros(5)
    _one_line_error(r"bad.h5: dataset 'exchange/data' has shape \(2, 2, 6, 7\)", tmp_path, tmp_path / "bad.h5", _params())
    _one_line_error(r"dataset 'line' has shape \(5,\)", tmp_path, tmp_path / "bad.h5", _params(), data_loc="line")
    _one_line_error(r"dark.h5: file not found", tmp_path, good, _params(), dark_fn=tmp_path / "dark.h5")
    _one_line_error(r"good.h5: no dataset 'exchange/flat'", tmp_path, good, _params(), dark_fn=good,
                    dark_loc="exchange/flat")
    _one_line_error(r"SkipFrame 2 leaves no frames \(the scan holds 2\)", tmp_path, good, _params(skip_frame=2))
    (tmp_path / "frame.xyz").write_bytes(b"1234")
    _one_line_error(r"frame.xyz: unknown frame format '.xyz'", tmp_path, tmp_path / "frame.xyz", _params())
    _write_ge(tmp_path / "short.ge1", _frames(2, np.uint16)[:, :5])
    _one_line_error(r"short.ge1: size 8332 bytes is not a 8192-byte header plus whole frames of "
                    r"NrPixelsZ×NrPixelsY = 6×7 uint16", tmp_path, tmp_path / "short.ge1", _params())
    (tmp_path / "junk.tif").write_bytes(b"not a tiff")
    _one_line_error(r"junk.tif: not a readable TIFF", tmp_path, tmp_path / "junk.tif", _params())
    _write_zarr_group(tmp_path / "g.zarr", _frames(2))
    _one_line_error(r"g.zarr: no array 'data'; top-level entries: exchange", tmp_path, tmp_path / "g.zarr",
                    _params(), data_loc="data")
    _write_h5(tmp_path / "scan_000002.h5", _frames(1))
    _one_line_error(r"scan_000003.h5: file not found \(and 1 more of the series\)", tmp_path,
                    _write_h5(tmp_path / "scan_000001.h5", _frames(1)), _params(), end_file_nr=4)
    _one_line_error(r"good.h5: no file number in the name", tmp_path, good, _params(), start_file_nr=9)
    _one_line_error(r"frames_per_chunk: expected a frame count >= 1", tmp_path, good, _params(),
                    frames_per_chunk=0)


def test_read_mask(tmp_path):
    import tifffile

    image = np.zeros((NZ, NY), np.uint8)
    image[2, 3] = 1
    image[4, 4] = 255  # MIDAS masks only value 1
    tifffile.imwrite(tmp_path / "mask.tif", image)
    mask = read_mask(str(tmp_path / "mask.tif"), (NZ, NY))
    assert mask.dtype == bool and mask.shape == (NZ, NY)
    assert np.argwhere(mask).tolist() == [[2, 3]]
    with pytest.raises(FrameError, match=r"mask shape \(6, 7\) differs from NrPixelsZ×NrPixelsY = \(7, 6\)"):
        read_mask(str(tmp_path / "mask.tif"), (7, 6))
    with pytest.raises(FrameError, match="missing.tif: mask file not found"):
        read_mask(str(tmp_path / "missing.tif"), (NZ, NY))
    (tmp_path / "bad.tif").write_bytes(b"garbage")
    with pytest.raises(FrameError, match="bad.tif: not a readable TIFF mask"):
        read_mask(str(tmp_path / "bad.tif"), (NZ, NY))


def test_mask_file_relative_to_the_parameter_file(tmp_path, monkeypatch):
    import tifffile

    from midasflow.io.mask import mask_from_params

    (tmp_path / "masks").mkdir()
    image = np.zeros((NZ, NY), np.uint8)
    image[2, 3] = 1
    tifffile.imwrite(tmp_path / "masks" / "m.tif", image)
    params = _params(mask_file="masks/m.tif").with_overrides(source=str(tmp_path / "ps.txt"))
    monkeypatch.chdir(tmp_path.parent)  # not where the parameter file is
    mask = mask_from_params(params)
    assert mask.sum() == 1 and mask[2, 3]
    assert mask_from_params(_params()) is None
    with pytest.raises(FrameError, match="nope.tif: mask file not found"):
        mask_from_params(_params(mask_file="nope.tif").with_overrides(source=str(tmp_path / "ps.txt")))


# ----------------------------------------------------------------------------- process variables
def _write_pvs(path, values: dict[str, np.ndarray]):
    """Add per-frame process-variable datasets (path inside the file -> values) to an HDF5 file."""
    import h5py

    with h5py.File(path, "a") as f:
        for loc, v in values.items():
            f.create_dataset(loc, data=v)
    return path


def test_process_variables_concatenated_over_series_after_skip(tmp_path):
    rng = np.random.default_rng(3)
    pv = {name: rng.normal(100.0, 10.0, size=7) for name in ("T", "P", "I", "I0")}
    gsas2 = "/measurement/instrument/GSAS2_PVS/"
    for k, (lo, hi) in enumerate([(0, 4), (4, 7)]):
        path = _write_h5(str(tmp_path / f"scan_{k + 1:06d}.h5"), _frames(hi - lo, seed=k))
        _write_pvs(path, {"/my/temperature": pv["T"][lo:hi], gsas2 + "Pressure": pv["P"][lo:hi],
                          gsas2 + "I0": pv["I0"][lo:hi].reshape(-1, 1)})
        if k == 0:  # I only in the first file -> absent
            _write_pvs(path, {gsas2 + "I": pv["I"][lo:hi]})
    params = _params(skip_frame=2, temperature_dataset_path="/my/temperature")
    da_ = open_frames(ScanSource(str(tmp_path / "scan_000001.h5"), start_file_nr=1, end_file_nr=2), params)
    assert da_.sizes["frame"] == 5
    np.testing.assert_array_equal(da_["temperature"].values, pv["T"][2:])
    np.testing.assert_array_equal(da_["pressure"].values, pv["P"][2:])
    np.testing.assert_array_equal(da_["i0"].values, pv["I0"][2:])
    assert da_["temperature"].dims == ("frame",) and da_["temperature"].dtype == np.float64
    assert "i" not in da_.coords
    # the default GSAS2_PVS Temperature path is absent here: no coordinate, no error
    assert "temperature" not in open_frames(str(tmp_path / "scan_000001.h5"), _params()).coords


def test_process_variable_of_wrong_length_is_one_line(tmp_path):
    path = _write_h5(str(tmp_path / "scan.h5"), _frames(4))
    _write_pvs(path, {"/measurement/instrument/GSAS2_PVS/Temperature": np.arange(3.0)})
    with pytest.raises(FrameError) as info:
        open_frames(path, _params())
    msg = str(info.value)
    assert "\n" not in msg and path in msg and "GSAS2_PVS/Temperature" in msg
    assert "3 values" in msg and "(4)" in msg


def _truncate(path, keep_fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path


@pytest.mark.parametrize("writer", [_write_tiff_pages, _write_tiff_stack])
def test_truncated_tiff_is_one_line_at_open(tmp_path, writer):
    path = _truncate(writer(tmp_path / "scan.tif", _frames(3)), 0.6)
    msg = _one_line_error(r"scan.tif: truncated TIFF, (page \d+ needs \d+ bytes but the file holds \d+|"
                          r"it declares 3 frames but holds [12] readable pages)", tmp_path, path, _params())
    assert str(path) in msg


@pytest.mark.parametrize("name, writer, damage", [
    ("scan.tif", _write_tiff_pages, "truncate"),
    ("scan.h5", lambda p, d: _write_h5(p, d, "blosc"), "truncate"),
    ("scan.zip", _write_zarr_zip, "crc"),
])
def test_a_file_damaged_after_opening_gives_one_line_when_read(tmp_path, name, writer, damage):
    """Damage found only when the pixels are read (inside the dask tasks) is a FrameError naming
    the file and the frames, not a library traceback."""
    import zipfile

    path = writer(tmp_path / name, _frames(4))
    frames = open_frames(path, _params())
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        del data[len(data) // 2:]
    else:  # flip a byte of the last frame's chunk: a bad CRC
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo("exchange/data/3.0.0")
        start = info.header_offset + 30 + len(info.filename) + len(info.extra)
        data[start + info.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(FrameError) as err:
        frames.values  # noqa: B018 - reading is the test
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert "cannot be read" in message or "not a readable HDF5 file (Unable to synchronously open file (truncated" in message


def test_zarr_zip_with_dotdot_members_is_refused(tmp_path):
    import zipfile

    path = _write_zarr_zip(tmp_path / "scan.zip", _frames(2))
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("../../etc/evil/.zarray", b"{}")
    _one_line_error(r"scan.zip: zip member '../../etc/evil/.zarray' is not a plain relative path", tmp_path,
                    path, _params())


def test_zarr_frames_that_would_expand_beyond_their_declared_chunks_are_refused(tmp_path):
    """A Blosc chunk whose header promises far more than its array's chunk (a "blosc bomb"), or a
    chunk declared larger than any frame store needs, is refused when the store is opened."""
    import json
    import zipfile

    from numcodecs import Blosc

    good = _write_zarr_zip(tmp_path / "good.zip", _frames(2))
    bomb = Blosc(cname="zstd", clevel=9).encode(np.zeros(2**24))  # 128 MB of zeros in a few kB
    for name, member, data in (("bomb.zip", "exchange/data/1.0.0", bomb),
                               ("big.zip", "exchange/data/.zarray", None)):
        path = tmp_path / name
        with zipfile.ZipFile(good) as zin, zipfile.ZipFile(path, "w") as zout:
            for info in zin.infolist():
                value = zin.read(info)
                if info.filename == member:
                    if data is None:  # declare 2²⁰-frame chunks: 160 GB
                        meta = json.loads(value)
                        meta["shape"], meta["chunks"] = [2**20, NZ, NY], [2**20, NZ, NY * 1000]
                        value = json.dumps(meta).encode()
                    else:
                        value = data
                zout.writestr(info.filename, value)
        expected = (r"chunk exchange/data/1.0.0 expands to 134217728 bytes, but the array declares chunks of 168 bytes"
                    if data is not None else r"a chunk declares shape \(1048576, 6, 7000\)")
        _one_line_error(rf"{name}: array 'exchange/data': {expected}", tmp_path, path, _params())


def test_a_scan_declaring_absurdly_many_frames_is_refused(tmp_path):
    import zarr

    path = tmp_path / "many.zarr"
    zarr.create_array(str(path), shape=(10**9, NZ, NY), dtype="i4", chunks=(1, NZ, NY))  # nothing stored
    _one_line_error(r"many.zarr: the scan declares 1000000000 frames, expected at most 10000000", tmp_path,
                    path, _params())


def test_a_scan_truncated_after_opening_is_named_in_one_line_by_both_reads(tmp_path):
    """A GE file cut short after open_frames sized it (a copy still running): the float32 read
    and the raw read into a caller's buffer (what cake() uses) both raise one FrameError line
    naming the file and the frames, never a reshape error or a buffer half filled silently."""
    from midasflow.caking_kernel import raw_buffer
    from midasflow.io.frames import raw_frames_of

    path = _write_ge(tmp_path / "scan.ge3", _frames(4, np.uint16))
    frames = open_frames(path, _params())
    raw = raw_frames_of(frames.data)
    assert raw is not None
    with open(path, "r+b") as fh:
        fh.truncate(8192 + 2 * NZ * NY * 2 + 10)  # two whole frames and a few bytes
    for read in (lambda: raw.reader.read_raw(0, 4, raw_buffer), lambda: frames.values):
        with pytest.raises(FrameError) as info:
            read()
        message = str(info.value)
        assert "\n" not in message and str(path) in message and "frames 0..3" in message, message


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize(("n_dark", "per_chunk"), [(1, 4), (3, 4), (10, 4), (20, 1)])
def test_dark_mean_is_dasks_mean_of_the_float32_frames(tmp_path, dtype, n_dark, per_chunk):
    """dark_mean reads the dark in one task without a float64 copy of the frames, and gives
    bit for bit dask's float64 mean of open_frames' float32 dark frames (flags NaN) over the
    same chunks, more chunks than a reduction combines at once included."""
    import h5py

    from midasflow.io.frames import ScanReader, _lazy, dark_mean

    rng = np.random.default_rng(3)
    if np.dtype(dtype).kind == "f":
        dark = rng.gamma(2.0, 3.3, size=(n_dark, NZ, NY)).astype(dtype)  # sums that round
        dark[0, 1, 2] = np.nan
    else:
        dark = rng.integers(0, 9000, size=(n_dark, NZ, NY)).astype(dtype)
        dark[0, 1, 2] = np.iinfo(dtype).max if np.dtype(dtype).kind == "u" else -1
    path = tmp_path / "dark.h5"
    with h5py.File(path, "w") as f:
        f["exchange/data"] = dark[:1]
        f["exchange/dark"] = dark
    with raise_if_dask_computes():
        got, label = dark_mean(str(path), _params(), None, "exchange/dark", per_chunk)
    assert label == f"{path}::exchange/dark" and got.dtype == np.float32
    reader = ScanReader((hdf5.open_hdf5(str(path), "exchange/dark"),), 0)
    expected = _lazy(reader, per_chunk, "dark").astype(np.float64).mean(axis=0).astype(np.float32)
    got, expected = got.compute(), expected.compute()
    np.testing.assert_array_equal(got, expected)
    assert np.isnan(got[1, 2]) and np.isfinite(np.delete(got.ravel(), 1 * NY + 2)).all()
