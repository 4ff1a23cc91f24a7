"""HDF5 frames read for the caking kernel (``Hdf5Source.read_into``): the stored bytes read
directly where the layout is plain, HDF5's own read otherwise; bit for bit h5py's frames either
way, and a file cut short is one FrameError line."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
from fork_helpers import assert_forked_child_passes

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
    if kwargs.pop("bitshuffle", False):
        import hdf5plugin

        kwargs.update(hdf5plugin.Bitshuffle(nelems=kwargs.pop("nelems", 0), cname="lz4"))
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
    pieces = _plan(path).pieces
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
    plan = _plan(str(tmp_path / "master.h5"))
    assert plan.path.endswith("data_000001.h5") and plan.pieces
    np.testing.assert_array_equal(_read(str(tmp_path / "master.h5"), 1, 4), data[1:4])


@pytest.mark.parametrize("layout", [{"chunks": (1, NZ, NY)}, {}, {"chunks": (1, NZ, NY), "bitshuffle": True}])
def test_a_file_cut_after_the_layout_was_read_is_one_line(tmp_path, layout):
    """The file shrinks between HDF5 placing the frames and the read (a copy being rewritten):
    one FrameError line naming the file and the frames, never frames half read silently."""
    data = _data(6, "<u2")
    path = _write(tmp_path / "scan.h5", data, **layout)
    plan = _plan(path)
    with open(path, "r+b") as fh:
        fh.truncate(plan.pieces[-1].offset + plan.pieces[-1].n_bytes - 10)
    out = np.empty((6, NZ, NY), "<u2")
    with pytest.raises(FrameError) as info:
        hdf5._read_plan(plan, out, 0, f"{path}: frames 0..5")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: frames 0..5: ") and "truncated" in message


# ----------------------------------------------------------------------------- bitshuffle-LZ4
#: Frames of more pixels than one default block (4096 uint16, 2048 uint32), not a multiple of 8.
BZ, BY = 91, 97


def _bs_data(n: int, dtype) -> np.ndarray:
    rng = np.random.default_rng(11)
    values = rng.poisson(30.0, size=(n, BZ, BY)) * (rng.random((n, BZ, BY)) < 0.7)
    return values.astype(dtype)


def _bs_read(path, start, stop, loc="exchange/data"):
    source = hdf5.open_hdf5(path, loc)
    out = np.full((stop - start, *source.frame_shape), 7, dtype=np.dtype(source.dtype))
    source.read_into(start, stop, out)
    return out


@pytest.fixture(params=["C function", "decompress_lz4"])
def decoder(request, monkeypatch):
    """Each of bitshuffle's two entry points decode_hdf5_chunk uses."""
    from midasflow.io import bslz4

    if request.param == "C function":
        assert bslz4._c_decoder() is not None, "bitshuffle's extension exports bshuf_decompress_lz4"
    else:
        monkeypatch.setattr(bslz4, "_C_DECODER", [None])
    return request.param


@pytest.mark.parametrize("dtype", ["<u2", "<u4", "<i4", "<f4"])
@pytest.mark.parametrize("per_chunk, nelems", [(1, 0), (3, 0), (1, 256), (2, 1024)])
def test_bitshuffle_lz4_chunks_are_decoded_here_bit_for_bit(tmp_path, dtype, per_chunk, nelems, decoder):
    """HDF5 bitshuffle-LZ4 (filter 32008, as Eiger files hold it): read and decoded outside HDF5,
    the same bits as h5py + hdf5plugin, for one or several frames per chunk, the default and
    explicit block sizes, any frame range (chunks holding frames outside it included), with
    either of bitshuffle's entry points."""
    data = _bs_data(7, dtype)
    path = _write(tmp_path / "eiger.h5", data, chunks=(per_chunk, BZ, BY), bitshuffle=True, nelems=nelems)
    plan = _plan(path)
    assert plan is not None and plan.codec == "bslz4"
    for start, stop in [(0, 7), (1, 6), (4, 5), (6, 7)]:
        got = _bs_read(path, start, stop)
        np.testing.assert_array_equal(got.view(np.uint8), _h5py(path, start, stop).view(np.uint8))
    source = hdf5.open_hdf5(path, "exchange/data")
    np.testing.assert_array_equal(source.read(2, 5), data[2:5])  # the float32 path's read


@pytest.mark.parametrize("n_bytes", [200, 2000])
def test_lz4_bytes_the_decoder_rejects_are_one_line(tmp_path, decoder, n_bytes):
    """The first block's LZ4 bytes overwritten (its count intact, so the block check passes):
    the decoder's error is one FrameError line, whichever entry point. (LZ4 carries no checksum:
    other damage can decode to wrong pixels unnoticed, through HDF5's filter as here.)"""
    path = _write(tmp_path / "eiger.h5", _bs_data(2, "<u2"), chunks=(1, BZ, BY), bitshuffle=True)
    with h5py.File(path, "r") as f:
        offset = f["exchange/data"].id.get_chunk_info_by_coord((1, 0, 0)).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(offset + 16)
        fh.write(b"\xff" * n_bytes)
    with pytest.raises(FrameError, match=r"frames 0..1: chunk of frames 1..1: bitshuffle chunk cannot be decoded"):
        _bs_read(path, 0, 2)


def _damage(path, frame, how):
    """Damage the stored chunk of ``frame`` in place: a block count pointing past the chunk,
    or the chunk's header declaring another size."""
    import struct

    with h5py.File(path, "r") as f:
        info = f["exchange/data"].id.get_chunk_info_by_coord((frame, 0, 0) if f["exchange/data"].ndim == 3
                                                             else (0, 0))
    with open(path, "r+b") as fh:
        if how == "block count":
            fh.seek(info.byte_offset + 12)
            count = struct.unpack(">I", fh.read(4))[0]
            fh.seek(info.byte_offset + 12)
            fh.write(struct.pack(">I", count + 1000))
        else:
            fh.seek(info.byte_offset)
            fh.write(struct.pack(">Q", 2**40))


_READ_IN_CHILD = """
import sys
from midasflow.errors import FrameError
from midasflow.io import hdf5
source = hdf5.open_hdf5(sys.argv[1], "exchange/data")
try:
    source.read(0, source.n_frames)
except FrameError as exc:
    print("FrameError:", exc)
else:
    print("read")
"""


_PATHS = [("decoded here", {"chunks": (1, BZ, BY)}, "<u2"),
          ("through HDF5, big-endian", {"chunks": (1, BZ, BY)}, ">u2"),
          ("through HDF5, frames split over chunks", {"chunks": (1, 50, BY)}, "<u2"),
          ("through HDF5, one 2-D frame", {"chunks": (BZ, BY)}, "<u2")]


@pytest.mark.parametrize("how, name, layout, dtype", [
    # a child process each (~1.5 s): the quick lane keeps one per read path
    pytest.param(how, *path, marks=() if how == "block count" and i < 2 else pytest.mark.slow)
    for how in ("block count", "header") for i, path in enumerate(_PATHS)])
def test_a_damaged_bitshuffle_chunk_is_one_line_never_a_crash(tmp_path, how, name, layout, dtype):
    """A bitshuffle chunk whose block count points past its end makes hdf5plugin's filter read
    past the chunk (the process dies of a segmentation fault: checked below on h5py alone).
    Every read path checks the blocks first: one FrameError line naming the file, in a child
    process so that a crash fails the test instead of killing the run."""
    import subprocess
    import sys

    data = _bs_data(3, dtype)
    if len(layout["chunks"]) == 2:
        data = data[1]
    path = _write(tmp_path / "eiger.h5", data, bitshuffle=True, **layout)
    _damage(path, 1, how)
    run = subprocess.run([sys.executable, "-c", _READ_IN_CHILD, path], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, f"child died ({run.returncode}): {run.stderr[-500:]}"
    line = run.stdout.strip()
    assert line.startswith(f"FrameError: {path}: frame") and "\n" not in line, line
    assert ("truncated" in line) if how == "block count" else ("declares 1099511627776" in line), line


def test_hdf5plugins_filter_crashes_on_the_damaged_chunk(tmp_path):
    """Why the check exists: h5py + hdf5plugin alone on a chunk whose block count points past
    its end. A segmentation fault here (today's behaviour) or a clean error both pass; the test
    records which, so a fixed filter shows up in its output."""
    import subprocess
    import sys

    path = _write(tmp_path / "eiger.h5", _bs_data(3, "<u2"), chunks=(1, BZ, BY), bitshuffle=True)
    _damage(path, 1, "block count")
    code = "import sys, h5py, hdf5plugin\nwith h5py.File(sys.argv[1]) as f: f['exchange/data'][1]"
    run = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=120)
    print(f"h5py + hdf5plugin on the damaged chunk: exit code {run.returncode}")
    assert run.returncode != 0


def test_bitshuffle_before_another_filter_is_refused_in_one_line(tmp_path):
    """A bitshuffle chunk wrapped by a later filter cannot be checked before HDF5 decodes it:
    refused, not risked."""
    import hdf5plugin

    path = tmp_path / "wrapped.h5"
    with h5py.File(path, "w") as f:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_chunk((1, BZ, BY))
        bs = hdf5plugin.Bitshuffle(cname="lz4")
        dcpl.set_filter(bs.filter_id, h5py.h5z.FLAG_OPTIONAL, bs.filter_options)
        dcpl.set_fletcher32()
        space = h5py.h5s.create_simple((2, BZ, BY))
        h5py.h5d.create(f.require_group("exchange").id, b"data", h5py.h5t.STD_U16LE, space, dcpl=dcpl)
        f["exchange/data"][...] = _bs_data(2, "<u2")
    with pytest.raises(FrameError, match=r"wrapped.h5: frames 0..1: the dataset's bitshuffle filter .* refused"):
        hdf5.open_hdf5(str(path), "exchange/data").read(0, 2)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_decodes_on_its_own_threads(tmp_path):
    """The decode pool's threads do not survive a fork: a child that reads bitshuffle frames
    after its parent did gets a pool of its own (it would otherwise wait forever)."""
    data = _bs_data(2, "<u2")
    path = _write(tmp_path / "eiger.h5", data, chunks=(1, BZ, BY), bitshuffle=True)
    np.testing.assert_array_equal(_bs_read(path, 0, 2), data)  # the parent's pool exists now
    assert_forked_child_passes(lambda: np.array_equal(_bs_read(path, 0, 2), data))


def test_a_failed_decode_returns_only_when_every_decode_has_finished(tmp_path, monkeypatch):
    """One chunk failing must not leave others decoding into the caller's buffer (reused by its
    next read) after the error is raised."""
    import time

    from midasflow.io import bslz4

    path = _write(tmp_path / "eiger.h5", _bs_data(6, "<u2"), chunks=(1, BZ, BY), bitshuffle=True)
    finished = []

    def decode(chunk, out, source):
        if "frames 0..0" in source:
            raise FrameError(f"{source}: damaged")
        time.sleep(0.2)
        finished.append(source)

    monkeypatch.setattr(bslz4, "decode_hdf5_chunk", decode)
    with pytest.raises(FrameError, match="chunk of frames 0..0: damaged"):
        _bs_read(path, 0, 6)
    assert len(finished) == 5
