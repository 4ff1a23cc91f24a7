"""HDF5 frames read for the caking kernel (``Hdf5Source.read_into``): the stored bytes read
directly where the layout is plain, HDF5's own read otherwise; bit for bit h5py's frames either
way, and a file cut short is one FrameError line."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from midasflow.errors import FrameError
from midasflow.io import hdf5

NZ, NY = 6, 7


def _data(n: int, dtype) -> np.ndarray:
    rng = np.random.default_rng(7)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.normal(100.0, 30.0, size=(n, NZ, NY)).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -(2**20)), min(info.max, 2**20), size=(n, NZ, NY),
                        endpoint=True).astype(dtype)


def _write(path, data, **kwargs):
    with h5py.File(path, "w", **kwargs.pop("file_kwargs", {})) as f:
        f.create_dataset("exchange/data", data=data, **kwargs)
    return str(path)


def _plan(path):
    """:func:`hdf5._direct_plan` for frames 0..n of ``path`` (None: read through HDF5)."""
    with h5py.File(path, "r") as f:
        ds = f["exchange/data"]
        return hdf5._direct_plan(f, ds, 0, ds.shape[0], np.empty(ds.shape, ds.dtype))


def _read(path, start, stop):
    source = hdf5.open_hdf5(path, "exchange/data")
    out = np.full((stop - start, NZ, NY), 99, dtype=np.dtype(source.dtype))
    source.read_into(start, stop, out)
    return out


def _h5py(path, start, stop):
    with h5py.File(path, "r") as f:
        return f["exchange/data"][start:stop]


RANGES = [(0, 10), (2, 7), (4, 5), (9, 10), (3, 3)]


@pytest.mark.parametrize("dtype", ["<u2", "<u4", "<i4", "<f4", "<f8"])
@pytest.mark.parametrize("layout", [{"chunks": (1, NZ, NY)}, {"chunks": (3, NZ, NY)}, {},
                                    {"chunks": (4, NZ, NY), "maxshape": (None, NZ, NY)}])
def test_plain_layouts_are_read_directly_bit_for_bit(tmp_path, dtype, layout):
    """One frame per chunk, several (the last chunk partly beyond the data), contiguous, an
    extendible dataset: read without HDF5, the same bits as h5py's, for any frame range."""
    data = _data(10, dtype)
    path = _write(tmp_path / "scan.h5", data, **layout)
    assert _plan(path) is not None, "expected the direct read"
    for start, stop in RANGES:
        got = _read(path, start, stop)
        np.testing.assert_array_equal(got.view(np.uint8), _h5py(path, start, stop).view(np.uint8))
        assert got.dtype == np.dtype(dtype)


def test_consecutive_chunks_are_read_in_one_run(tmp_path):
    path = _write(tmp_path / "scan.h5", _data(10, "<u2"), chunks=(1, NZ, NY))
    _, pieces = _plan(path)
    assert len(pieces) == 1 and pieces[0].n_frames == 10  # h5py writes chunks in order


def _with_unwritten_chunk(path):
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("exchange/data", shape=(4, NZ, NY), dtype="<u2", chunks=(1, NZ, NY),
                              fillvalue=5)
        ds[0], ds[1], ds[3] = 1, 2, 4  # frame 2 never written: HDF5 gives the fill value
    return str(path)


def _compact(path):
    data = _data(4, "<u2")
    with h5py.File(path, "w") as f:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.COMPACT)
        space = h5py.h5s.create_simple(data.shape)
        h5py.h5d.create(f.require_group("exchange").id, b"data", h5py.h5t.STD_U16LE, space, dcpl=dcpl)
        f["exchange/data"][...] = data
    return str(path)


@pytest.mark.parametrize("name, make", [
    ("big-endian", lambda p: _write(p, _data(4, ">u2"), chunks=(1, NZ, NY))),
    ("big-endian contiguous", lambda p: _write(p, _data(4, ">i4"))),
    ("a frame split over chunks", lambda p: _write(p, _data(4, "<u2"), chunks=(1, 3, NY))),
    ("gzip", lambda p: _write(p, _data(4, "<u2"), chunks=(1, NZ, NY), compression="gzip")),
    ("shuffle + fletcher32", lambda p: _write(p, _data(4, "<u2"), chunks=(1, NZ, NY), shuffle=True,
                                               fletcher32=True)),
    ("an unwritten chunk", _with_unwritten_chunk),
    ("a user block", lambda p: _write(p, _data(4, "<u2"), chunks=(1, NZ, NY),
                                      file_kwargs={"userblock_size": 512})),
    ("compact", _compact),
])
def test_layouts_not_read_directly_go_through_hdf5(tmp_path, name, make):
    """Anything but plain stored bytes of the output's type is left to HDF5, with the same
    frames as h5py gives."""
    path = make(tmp_path / "scan.h5")
    assert _plan(path) is None
    with h5py.File(path, "r") as f:
        shape, dtype = f["exchange/data"].shape, f["exchange/data"].dtype
    source = hdf5.open_hdf5(path, "exchange/data")
    out = np.empty(shape, dtype)
    source.read_into(0, shape[0], out)
    np.testing.assert_array_equal(out, _h5py(path, 0, shape[0]))


def test_external_link_is_read_from_the_file_holding_the_data(tmp_path):
    """An Eiger-style master file linking to a data file: the bytes are read from the linked
    file, at the offsets HDF5 gives in it."""
    data = _data(5, "<u2")
    _write(tmp_path / "data_000001.h5", data, chunks=(1, NZ, NY))
    with h5py.File(tmp_path / "master.h5", "w") as f:
        f["exchange/data"] = h5py.ExternalLink("data_000001.h5", "exchange/data")
    path, pieces = _plan(str(tmp_path / "master.h5"))
    assert path.endswith("data_000001.h5") and pieces
    np.testing.assert_array_equal(_read(str(tmp_path / "master.h5"), 1, 4), data[1:4])


@pytest.mark.parametrize("layout", [{"chunks": (1, NZ, NY)}, {}])
def test_a_file_cut_after_the_layout_was_read_is_one_line(tmp_path, layout):
    """The file shrinks between HDF5 placing the frames and the read (a copy being rewritten):
    one FrameError line naming the file and the frames, never frames half read silently."""
    data = _data(6, "<u2")
    path = _write(tmp_path / "scan.h5", data, **layout)
    file, pieces = _plan(path)
    end = pieces[-1].offset + 6 * NZ * NY * 2 if len(pieces) == 1 else pieces[-1].offset + NZ * NY * 2
    with open(path, "r+b") as fh:
        fh.truncate(end - 10)
    out = np.empty((6, NZ, NY), "<u2")
    with pytest.raises(FrameError) as info:
        hdf5._read_pieces(file, pieces, out, 0, f"{path}: frames 0..5")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: frames 0..5: ") and "truncated" in message
