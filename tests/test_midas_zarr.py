"""MIDAS .zarr.zip (docs/reference/midas_zarr_layout.md) and plain zarr caked stores: layout, round trip, GSAS-II import."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr
from cake_helpers import lazy_frames, small_params
from dask_helpers import raise_if_dask_computes

from midasflow.binmap import build_binmap
from midasflow.caking import cake
from midasflow.errors import CakeFileError
from midasflow.io.caked_store import open_caked, write_caked_zarr
from midasflow.io.midas_zarr import read_midas_zarr, write_midas_zarr

N_FRAMES = 23


@pytest.fixture(scope="module")
def params():
    # 30 R bins (> 20 so GSAS-II keeps the lineouts), 8 eta bins, groups of 2 -> 12 groups
    # (more than 10, so lexicographic and numeric member order differ)
    return small_params(r_max_px=24.5, omega_sum_frames=2, sum_images=True,
                        instrument_overrides=(("U", 2.5), ("SH/L", 0.003)))


@pytest.fixture(scope="module")
def caked(params):
    return cake(lazy_frames(params, N_FRAMES, chunks=(5, 7, 11)), params,
                binmap=build_binmap(params))


@pytest.fixture(scope="module")
def zip_path(caked, tmp_path_factory):
    return write_midas_zarr(caked, tmp_path_factory.mktemp("z") / "scan_000001.zarr.zip")


def _json(zf, name):
    return json.loads(zf.read(name))


def test_zip_members_match_spec(zip_path, caked, params):
    zf = zipfile.ZipFile(zip_path)
    names = [i.filename for i in zf.infolist()]
    assert len(names) == len(set(names))  # every node written once
    assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
    n_r, n_eta = caked.sizes["r"], caked.sizes["eta"]
    groups = [f"OmegaSumFrame/LastFrameNumber_{i}" for i in range(1, N_FRAMES, 2)] + [
        f"OmegaSumFrame/LastFrameNumber_{N_FRAMES - 1}"]
    frames = [f"IntegrationResult/FrameNr_{i}" for i in range(N_FRAMES)]
    inst = [f"InstrumentParameters/{k}" for k in
            ("Polariz", "Lam", "SH_L", "U", "V", "W", "X", "Y", "Z", "Distance")]
    arrays = {"REtaMap": (5, n_r, n_eta), "Omegas": (N_FRAMES,), "SumFrames": (n_r, n_eta),
              "BinArea": (n_r, n_eta), "Effective2Theta": (n_r, n_eta),
              **{g: (n_r, n_eta) for g in groups}, **{f: (n_r, n_eta) for f in frames},
              **{i: (1,) for i in inst}}
    assert {n[:-len("/.zarray")] for n in names if n.endswith(".zarray")} == set(arrays)
    assert {n[:-len(".zgroup")].rstrip("/") for n in names if n.endswith(".zgroup")} == {
        "", "OmegaSumFrame", "IntegrationResult", "InstrumentParameters"}
    for name, shape in arrays.items():
        meta = _json(zf, f"{name}/.zarray")
        assert meta == {
            "shape": list(shape), "chunks": list(shape), "dtype": "<f8", "fill_value": 0.0,
            "order": "C", "filters": None, "dimension_separator": ".", "zarr_format": 2,
            "compressor": {"id": "blosc", "cname": "zstd", "clevel": 3, "shuffle": 2,
                           "blocksize": 0},
        }, name
        assert f"{name}/{'.'.join('0' * len(shape))}" in names  # one chunk, '.' keys
    assert _json(zf, ".zgroup") == {"zarr_format": 2}

    assert _json(zf, "REtaMap/.zattrs") == {
        "nEtaBins": n_eta, "nRBins": n_r, "Header": "Radius,2Theta,Eta,BinArea,Q",
        "Units": "Pixels,Degrees,Degrees,Pixels,InvAngstrom"}
    assert _json(zf, "Omegas/.zattrs") == {"Units": "Degrees"}
    assert _json(zf, "Effective2Theta/.zattrs") == {"Units": "Degrees"}
    omega = 10.0 + 0.25 * np.arange(N_FRAMES)
    assert _json(zf, "OmegaSumFrame/LastFrameNumber_5/.zattrs") == {
        "LastFrameNumber": 5, "Number Of Frames Summed": 2, "FirstOme": omega[4],
        "LastOme": omega[5], "Temperature": 0.0, "Pressure": 0.0, "I": 0.0, "I0": 0.0}
    last = _json(zf, f"OmegaSumFrame/LastFrameNumber_{N_FRAMES - 1}/.zattrs")
    assert last["Number Of Frames Summed"] == 1  # the real count of the remainder group
    assert _json(zf, "IntegrationResult/FrameNr_7/.zattrs") == {
        "omega": omega[7], "Header": "Radius,Eta", "Units": "Pixels,Degrees"}
    assert _json(zf, "SumFrames/.zattrs") == {"Header": "Radius,Eta", "Units": "Pixels,Degrees",
                                               "nFrames": N_FRAMES}
    root = _json(zf, ".zattrs")
    assert root["midasflow_version"] and root["creation_timestamp"]

    z = zarr.open_group(zarr.storage.ZipStore(zip_path, mode="r"), mode="r", zarr_format=2)
    ret = z["REtaMap"][...]
    np.testing.assert_array_equal(ret[0], np.broadcast_to(caked.r_px.values[:, None], ret[0].shape))
    np.testing.assert_array_equal(ret[1][:, 3], caked.tth_deg.values)
    np.testing.assert_array_equal(ret[2][5], caked.eta_deg.values)
    np.testing.assert_array_equal(ret[3], caked.bin_area.values)
    np.testing.assert_array_equal(ret[4][:, 0], caked.q_inv_a.values)
    np.testing.assert_array_equal(z["Omegas"][...], omega)
    assert z["InstrumentParameters/U"][0] == 2.5 and z["InstrumentParameters/SH_L"][0] == 0.003
    assert z["InstrumentParameters/Lam"][0] == 0.2
    assert z["InstrumentParameters/Distance"][0] == params.lsd_um
    np.testing.assert_array_equal(z["OmegaSumFrame/LastFrameNumber_5"][...],
                                  caked.intensity[2].values)


def test_opening_either_store_computes_nothing(caked, zip_path, tmp_path):
    plain = write_caked_zarr(caked, tmp_path / "caked.zarr")
    with raise_if_dask_computes():
        from_zip = read_midas_zarr(zip_path)
        opened = [open_caked(zip_path), open_caked(plain)]
    for ds in (from_zip, *opened):
        assert isinstance(ds["intensity"].data, da.Array) and isinstance(ds["frame_intensity"].data, da.Array)
        assert isinstance(ds["bin_area"].data, np.ndarray)  # small variables read now


def test_roundtrip_both_stores(caked, zip_path, tmp_path):
    ref = caked.compute()
    from_zip = open_caked(zip_path)
    assert isinstance(from_zip["intensity"].data, da.Array)  # read lazily
    np.testing.assert_array_equal(from_zip["last_frame"], np.r_[1:N_FRAMES:2, N_FRAMES - 1])
    xr.testing.assert_identical(from_zip.compute(), ref)
    store = write_caked_zarr(caked, tmp_path / "caked.zarr")
    xr.testing.assert_identical(open_caked(store).compute(), ref)
    # rewriting replaces the store atomically and leaves no temporaries behind
    write_caked_zarr(ref.isel(group=slice(0, 3)), store)
    assert open_caked(store).sizes["group"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["caked.zarr"]


def test_roundtrip_without_optional_members(params, tmp_path):
    p = params.with_overrides(save_individual_frames=False, sum_images=False)
    ds = cake(lazy_frames(p, 5, chunks=2), p, binmap=build_binmap(p))
    back = open_caked(write_midas_zarr(ds, tmp_path / "x.zarr.zip"))
    assert "frame_intensity" not in back and "sum_frames" not in back
    xr.testing.assert_identical(back.compute(), ds.compute())


def test_reads_midas_stream_writer_files(caked, tmp_path):
    """MIDAS's GPU/stream writer (midas_zarr_layout.md §4) stores no Omegas or IntegrationResult; older files have a
    4-plane REtaMap without Q. Both must open (GSAS-II reads them), Q from Lam."""
    ref = caked.compute()
    path = tmp_path / "stream.zarr.zip"
    store = zarr.storage.ZipStore(path, mode="w")
    root = zarr.open_group(store, mode="w", zarr_format=2)
    retamap = np.stack([np.broadcast_to(ref[k].values[:, None], ref.bin_area.shape)
                        for k in ("r_px", "tth_deg")]
                       + [np.broadcast_to(ref.eta_deg.values, ref.bin_area.shape), ref.bin_area.values])
    root.create_array("REtaMap", data=retamap)
    grp = root.create_group("OmegaSumFrame")
    for g in range(ref.sizes["group"]):
        last = int(ref.last_frame[g])
        grp.create_array(f"LastFrameNumber_{last}", data=ref.intensity.values[g], attributes={
            "LastFrameNumber": last, "Number Of Frames Summed": int(ref.frames_summed[g]),
            "FirstOme": float(ref.omega_first_deg[g]), "LastOme": float(ref.omega_last_deg[g])})
    inst = root.create_group("InstrumentParameters")
    lam = json.loads(ref.attrs["instrument"])["Lam"]
    for name in ("Lam", "Polariz", "SH_L", "U", "V", "W", "X", "Y", "Z", "Distance"):
        inst.create_array(name, data=np.array([lam if name == "Lam" else 0.0]))
    store.close()
    back = open_caked(path).compute()
    assert back.sizes["frame"] == 0
    assert "effective_tth_deg" not in back.variables  # MIDAS writes bin centres only
    ref = ref.drop_vars("effective_tth_deg")
    for name in ("intensity", "frames_summed", "last_frame", "omega_deg", "bin_area", "tth_deg"):
        xr.testing.assert_equal(back[name], ref[name])
    np.testing.assert_allclose(back.q_inv_a, ref.q_inv_a, rtol=1e-14)
    # without midasflow's root attributes the Dataset's instrument is the group's
    from midasflow.io.instprm import instrument_from_midas

    inst = instrument_from_midas(open_caked(path), store=path)
    assert inst == instrument_from_midas(path) and inst.U == 0.0 and inst.lam == lam


def test_store_instrument_is_read_once_and_equals_the_group(zip_path, params, monkeypatch, tmp_path):
    """refine() opens the store once: the Dataset's instrument is the InstrumentParameters group's,
    sibling .instprm included, and nothing reads the group again."""
    from midasflow.io import midas_zarr
    from midasflow.io.instprm import instrument_from_midas

    by_path = instrument_from_midas(zip_path)
    assert (by_path.U, by_path.shl, by_path.lam) == (2.5, 0.003, 0.2)
    assert by_path.gonio_radius_mm == params.lsd_um / 1000.0
    reads = []
    read_group = midas_zarr._instrument_parameters
    monkeypatch.setattr(midas_zarr, "_instrument_parameters",
                        lambda group: reads.append(group.path) or read_group(group))
    ds = open_caked(zip_path)
    assert instrument_from_midas(ds, store=zip_path) == by_path
    assert reads == ["InstrumentParameters"]
    # a sibling <root>.instprm applies to the Dataset of the store as to the path
    copy = tmp_path / "scan.zarr.zip"
    copy.write_bytes(zip_path.read_bytes())
    (tmp_path / "scan.zarr.instprm").write_text("#GSAS-II instrument parameter file\nU:9.0\n")
    assert instrument_from_midas(open_caked(copy), store=copy).U == 9.0 == instrument_from_midas(copy).U


def test_gsas2_importer_emulation(zip_path, caked):
    """Read the file as G2pwd_MIDAS does (docs/reference/midas_zarr_layout.md §5) and check its histograms."""
    z = zarr.open_group(zarr.storage.ZipStore(zip_path, mode="r"), mode="r")
    assert {"InstrumentParameters", "REtaMap", "OmegaSumFrame"} <= set(z.group_keys()) | set(
        z.array_keys())
    inst = {k: z["InstrumentParameters"][k][0] for k in z["InstrumentParameters"].array_keys()}
    inst["Polariz."] = inst.pop("Polariz")
    inst["SH/L"] = inst.pop("SH_L")
    gonio_radius_mm = inst["Distance"] / 1000
    ret = z["REtaMap"][...]
    hists = []
    for key in sorted(z["OmegaSumFrame"].array_keys()):  # lexicographic, as zarr iterates
        arr = z["OmegaSumFrame"][key]
        n_frame = arr.attrs.get("Number Of Frames Summed", 1)
        phi = (arr.attrs["FirstOme"] + arr.attrs["LastOme"]) / 2
        data = arr[...]
        for i_azm in range(ret.shape[2]):
            used = ret[3][:, i_azm] != 0
            if used.sum() <= 20:
                continue
            x = ret[1][used, i_azm]
            y = data[used, i_azm] / n_frame
            hists.append(dict(key=key, azimuth=90 - ret[2][used, i_azm].mean(), phi=phi, x=x, y=y))
    n_eta_used = int(((caked.bin_area.values != 0).sum(axis=0) > 20).sum())
    assert n_eta_used >= 4
    assert len(hists) == caked.sizes["group"] * n_eta_used
    assert [h["key"] for h in hists][:n_eta_used] == ["LastFrameNumber_1"] * n_eta_used
    assert gonio_radius_mm == 1000.0 and inst["Polariz."] == 0.99 and inst["SH/L"] == 0.003
    ref = caked.compute()
    for h in hists:
        g = int(np.flatnonzero(ref.last_frame.values == int(h["key"].split("_")[1]))[0])
        e = int(np.argmin(np.abs(90 - ref.eta_deg.values - h["azimuth"])))
        used = ref.bin_area.values[:, e] != 0
        np.testing.assert_allclose(h["phi"], ref.omega_deg.values[g])
        np.testing.assert_array_equal(h["x"], ref.tth_deg.values[used])
        # y is the per-frame mean: group sum / real frame count
        np.testing.assert_allclose(h["y"], ref.intensity.values[g, used, e]
                                   / ref.frames_summed.values[g], equal_nan=True)
        assert np.all(np.diff(h["x"]) > 0) and np.nanmean(h["y"]) > 0


def test_failed_write_leaves_nothing(caked, zip_path, tmp_path):
    target = tmp_path / "out.zarr.zip"
    target.write_bytes(zip_path.read_bytes())

    def boom(block):
        raise RuntimeError("disk on fire")

    bad = caked.copy()
    bad["intensity"] = bad["intensity"].copy(data=bad["intensity"].data.map_blocks(
        boom, dtype=np.float64, meta=np.empty((0, 0, 0))))
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_midas_zarr(bad, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr.zip"]
    assert target.read_bytes() == zip_path.read_bytes()
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_caked_zarr(bad, tmp_path / "plain.zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr.zip"]


def test_open_errors_are_one_line(tmp_path):
    with pytest.raises(CakeFileError, match="no such"):
        open_caked(tmp_path / "missing.zarr.zip")
    (tmp_path / "text.zarr.zip").write_text("hello")
    with pytest.raises(CakeFileError, match="not a zip"):
        open_caked(tmp_path / "text.zarr.zip")
    other = tmp_path / "other.zarr.zip"
    store = zarr.storage.ZipStore(other, mode="w")
    g = zarr.open_group(store, mode="w", zarr_format=2)
    g.create_array("exchange", shape=(2,), dtype="<f8")[...] = 1.0
    store.close()
    with pytest.raises(CakeFileError, match="member 'REtaMap' missing") as info:
        open_caked(other)
    assert "\n" not in str(info.value)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(CakeFileError, match="emptydir"):
        open_caked(tmp_path / "emptydir")


def test_process_variables_written_as_group_attrs_and_read_back(params, tmp_path):
    """Per-frame Temperature/Pressure/I/I0 -> group means in the OmegaSumFrame attrs (remainder
    group included) and back; absent ones stay 0.0 in the file and absent in the Dataset."""
    n = 7  # groups of 2: (0,1) (2,3) (4,5) (6)
    rng = np.random.default_rng(5)
    pv = {"temperature": rng.normal(295.0, 3.0, n), "pressure": rng.normal(1.0, 0.1, n),
          "i0": rng.normal(1e5, 1e3, n)}
    frames = lazy_frames(params, n, chunks=3).assign_coords(
        {name: ("frame", v) for name, v in pv.items()})
    ds = cake(frames, params, binmap=build_binmap(params))
    path = write_midas_zarr(ds, tmp_path / "pv.zarr.zip")
    zf = zipfile.ZipFile(path)
    bounds = [(0, 2), (2, 4), (4, 6), (6, 7)]
    for g, (lo, hi) in enumerate(bounds):
        attrs = _json(zf, f"OmegaSumFrame/LastFrameNumber_{hi - 1}/.zattrs")
        assert attrs["Number Of Frames Summed"] == hi - lo
        assert attrs["Temperature"] == float(ds["temperature"][g])
        assert attrs["Pressure"] == float(ds["pressure"][g])
        assert attrs["I0"] == float(ds["i0"][g])
        assert attrs["I"] == 0.0  # not measured: MIDAS's placeholder
        np.testing.assert_allclose(attrs["Temperature"], pv["temperature"][lo:hi].mean(), rtol=1e-15)
        np.testing.assert_allclose(attrs["I0"], pv["i0"][lo:hi].mean(), rtol=1e-15)
    ref = ds.compute()
    back = open_caked(path)
    assert "i" not in back and back["temperature"].dims == ("group",)
    xr.testing.assert_identical(back.compute(), ref)
    xr.testing.assert_identical(open_caked(write_caked_zarr(ds, tmp_path / "pv.zarr")).compute(), ref)


def test_midas_written_process_variables_are_read(zip_path, tmp_path):
    """A MIDAS IZ file (no midasflow root attrs) carries all four attrs: all four are read."""
    midas = tmp_path / "midas.zarr.zip"
    with zipfile.ZipFile(zip_path) as src, zipfile.ZipFile(midas, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == ".zattrs":
                data = json.dumps({"midas_version": "7"}).encode()
            elif info.filename == "OmegaSumFrame/LastFrameNumber_5/.zattrs":
                data = json.dumps({**json.loads(data), "Temperature": 310.5}).encode()
            dst.writestr(info, data)
    back = open_caked(midas)
    assert back["temperature"].values[2] == 310.5 and back["temperature"].values[0] == 0.0
    for name in ("pressure", "i", "i0"):
        np.testing.assert_array_equal(back[name], 0.0)


def test_nan_bins_have_zero_area_for_importers(params, tmp_path):
    """A dead-pixel band makes some bins NaN in every group and a frame-level NaN stripe makes
    others NaN in some groups (MIDAS mask rule): REtaMap's BinArea is 0 exactly where any group
    is NaN, so an importer keeping the bins of area != 0 (GSAS-II) reads no NaN; the true areas
    are kept in BinArea and read back."""
    p = params.with_overrides(mask_rule="midas")
    mask = np.zeros((p.nr_pixels_z, p.nr_pixels_y), dtype=bool)
    mask[30:32, :] = True
    bm = build_binmap(p, mask)
    ds = cake(lazy_frames(p, 6, chunks=4, nan_every=4), p, binmap=bm)
    ref = ds.compute()
    nan_any = np.isnan(ref.intensity.values).any(axis=0)
    assert bm.touches_mask.any() and (nan_any & ~bm.touches_mask).any()  # both kinds
    assert (ref.bin_area.values[nan_any] > 0).all()  # partly masked bins keep an area
    path = write_midas_zarr(ds, tmp_path / "gaps.zarr.zip")
    z = zarr.open_group(zarr.storage.ZipStore(path, mode="r"), mode="r", zarr_format=2)
    area = z["REtaMap"][3]
    np.testing.assert_array_equal(area, np.where(nan_any, 0.0, ref.bin_area.values))
    np.testing.assert_array_equal(z["BinArea"][...], ref.bin_area.values)
    for key in z["OmegaSumFrame"].array_keys():
        y = z["OmegaSumFrame"][key][...][area != 0]
        assert np.isfinite(y).all(), key
    back = open_caked(path)
    xr.testing.assert_identical(back.compute(), ref)  # bin_area from BinArea, not REtaMap
    # the plane the importers number by: the stored one, kept from the open, and the new one once
    # the file is rewritten (here: the same layout without the NaN stripes)
    import midasflow.io.midas_zarr as midas_zarr

    np.testing.assert_array_equal(midas_zarr.read_importer_area(path), area)
    write_midas_zarr(cake(lazy_frames(p, 6, chunks=4), p, binmap=bm), path)
    rewritten = midas_zarr.read_importer_area(path)
    midas_zarr._IMPORTER_AREAS.clear()  # a fresh process reads the plane from the file itself
    np.testing.assert_array_equal(rewritten, midas_zarr.read_importer_area(path))
    assert (rewritten != area).any()


@pytest.mark.slow
def test_write_on_a_distributed_client_sends_no_cakes_back(caked, zip_path, tmp_path):
    """The workers write their own members; the file equals the one written on the threaded
    scheduler, and no caked block travels to the client. integrate(client=...) likewise, with
    the bin map read from the cache by the workers."""
    from midasflow.pipeline import integrate
    from midasflow.simulate import simulate_ceo2_scan

    scan, _ = simulate_ceo2_scan(tmp_path / "scan", n_frames=3, shape=(128, 128), supersample=1)
    local = integrate(scan.params_file, scan.data, result_folder=tmp_path / "local",
                      cache_dir=tmp_path / "cache")
    from distributed import Client, LocalCluster
    from distributed.diagnostics.plugin import SchedulerPlugin

    class ClientBytes(SchedulerPlugin):
        """Bytes of every task result a client asked for (what travels to the client)."""

        def __init__(self, scheduler) -> None:
            self.scheduler, self.wanted = scheduler, []

        def transition(self, key, start, finish, *args, **kwargs) -> None:
            ts = self.scheduler.tasks.get(key)
            if finish == "memory" and ts is not None and ts.who_wants:
                self.wanted.append(ts.nbytes)

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        plugin = ClientBytes(cluster.scheduler)  # the scheduler runs in this process
        cluster.scheduler.add_plugin(plugin)
        path = write_midas_zarr(caked, tmp_path / "dist.zarr.zip", client=client)
        wanted_by_write = list(plugin.wanted)
        remote = integrate(scan.params_file, scan.data, result_folder=tmp_path / "remote",
                           cache_dir=tmp_path / "cache", client=client)
    xr.testing.assert_identical(open_caked(remote).compute(), open_caked(local).compute())
    plugin.wanted = wanted_by_write
    one_cake = caked.sizes["r"] * caked.sizes["eta"] * 8
    assert 1 <= len(plugin.wanted) <= 2 and max(plugin.wanted) < one_cake  # NaN flags only
    a, b = zipfile.ZipFile(zip_path), zipfile.ZipFile(path)
    assert sorted(a.namelist()) == sorted(b.namelist())
    for name in a.namelist():
        if name != ".zattrs":  # creation_timestamp differs
            assert a.read(name) == b.read(name), name
    assert "dist.zarr.zip" in [p.name for p in tmp_path.iterdir()]
    assert not [p for p in tmp_path.rglob(".*tmp*")]  # no temporaries left anywhere


# VmHWM, not getrusage's ru_maxrss, which Linux carries over from the parent across exec
_PEAK_RSS_SCRIPT = """
import sys
from midasflow.pipeline import integrate
integrate(sys.argv[1], sys.argv[2], result_folder=sys.argv[3], cache_dir=sys.argv[4])
with open("/proc/self/status") as f:
    print([line.split()[1] for line in f if line.startswith("VmHWM:")][0])
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_integrate_peak_memory_does_not_grow_with_frames(tmp_path):
    """512² frames, one ω-group per frame and every frame's cake saved (SaveIndividualFrames 1):
    the peak RSS of ``integrate`` at 200 and at 800 frames differs by less than 10 %."""
    import os
    import subprocess
    import sys

    import h5py

    import midasflow
    from midasflow.simulate import simulate_ceo2_scan, write_scan

    # the child imports this very midasflow (a worktree may shadow an installed one)
    env = dict(os.environ, PYTHONPATH=str(Path(midasflow.__file__).parents[1]))

    files, truth = simulate_ceo2_scan(tmp_path / "one", n_frames=1, shape=(512, 512),
                                      poisson=False, supersample=1,
                                      params_overrides={"save_individual_frames": True})
    with h5py.File(files.data) as f:
        one, dark = f["exchange/data"][0], f["exchange/dark"][...]
    rng = np.random.default_rng(0)
    peak = {}
    for n in (200, 800):
        frames = np.empty((n,) + one.shape, dtype=one.dtype)
        for i in range(n):
            frames[i] = one + rng.integers(0, 3, size=one.shape, dtype=one.dtype)
        scan = write_scan(tmp_path / f"s{n}", truth["params"], frames, dark, compression="blosc")
        del frames
        out = subprocess.run([sys.executable, "-c", _PEAK_RSS_SCRIPT, str(scan.params_file),
                              str(scan.data), str(tmp_path / f"o{n}"), str(tmp_path / "cache")],
                             check=True, capture_output=True, text=True, env=env).stdout
        peak[n] = int(out.split()[-1]) / 1024  # MiB (VmHWM is in kB)
        assert open_caked(tmp_path / f"o{n}" / "scan_000001.zarr.zip").sizes["group"] == n
    assert abs(peak[800] - peak[200]) < 0.1 * peak[200], peak


def _member_data_offset(path, member):
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    return info.header_offset + 30 + len(info.filename) + len(info.extra), info.compress_size


def test_damaged_or_crafted_zips_are_one_line_errors(zip_path, tmp_path):
    # a bad CRC in a cake (read lazily, inside a dask task) and in REtaMap (read on open)
    for member in ("OmegaSumFrame/LastFrameNumber_1/0.0", "REtaMap/0.0.0"):
        bad = tmp_path / "bad.zarr.zip"
        data = bytearray(zip_path.read_bytes())
        start, size = _member_data_offset(zip_path, member)
        data[start + size // 2] ^= 0xFF
        bad.write_bytes(bytes(data))
        with pytest.raises(CakeFileError) as info:
            open_caked(bad)["intensity"].values  # noqa: B018
        assert str(info.value).startswith(f"{bad}: ") and "Bad CRC-32" in str(info.value)
        assert "cannot be read" in str(info.value) and "\n" not in str(info.value)
    # members named with '..' (or absolute): refused before anything is opened
    for evil in ("../outside/.zarray", "/etc/passwd", "OmegaSumFrame/../../x"):
        crafted = tmp_path / "crafted.zarr.zip"
        crafted.write_bytes(zip_path.read_bytes())
        with zipfile.ZipFile(crafted, "a") as zf:
            zf.writestr(evil, b"{}")
        with pytest.raises(CakeFileError, match=r"zip member .* is not a plain relative path"):
            open_caked(crafted)



@pytest.mark.parametrize("member, attrs, expected", [
    ("OmegaSumFrame/LastFrameNumber_1", {"Number Of Frames Summed": "two", "FirstOme": 0.0, "LastOme": 1.0},
     r"member OmegaSumFrame/LastFrameNumber_1: attribute 'Number Of Frames Summed' = 'two', expected a frame count"),
    ("OmegaSumFrame/LastFrameNumber_1", {"Number Of Frames Summed": 2, "LastOme": 1.0},
     r"attribute 'FirstOme' = None, expected a number"),
])
def test_group_attributes_are_checked(zip_path, tmp_path, member, attrs, expected):  # found by the fuzz test
    bad = tmp_path / "bad.zarr.zip"
    with zipfile.ZipFile(zip_path) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            data = json.dumps(attrs).encode() if info.filename == f"{member}/.zattrs" else zin.read(info)
            zout.writestr(info.filename, data)
    with pytest.raises(CakeFileError, match=expected):
        open_caked(bad)


def test_omegas_must_match_the_frames(zip_path, tmp_path):  # found by the fuzz test: a frame member dropped
    bad = tmp_path / "bad.zarr.zip"
    with zipfile.ZipFile(zip_path) as zin, zipfile.ZipFile(bad, "w") as zout:
        names = zin.namelist()
        last = sorted(n for n in names if n.startswith("IntegrationResult/FrameNr_"))[-1].split("/")[1]
        for info in zin.infolist():
            if not info.filename.startswith(f"IntegrationResult/{last}/"):
                zout.writestr(info.filename, zin.read(info))
    with pytest.raises(CakeFileError, match=r"Omegas holds \(\d+,\) float64 values, expected one number per "
                                            r"IntegrationResult frame"):
        open_caked(bad)


def test_effective_tth_read_back_is_checked(caked, tmp_path):
    """A store's Effective2Theta is not trusted: values that are no 2θ in degrees are refused on
    open, and a bin that holds counts but no finite effective 2θ is refused when lineouts are
    planned from it, each with one line naming the store or the bin."""
    from midasflow.refinement.lineouts import plan_lineouts

    tth = caked["effective_tth_deg"].transpose("r", "eta").values
    r, e = np.argwhere(caked["bin_area"].transpose("r", "eta").values != 0)[0]
    for value, where in ((200.0, "open"), (np.nan, "plan")):
        changed = tth.copy()
        changed[r, e] = value
        bad = caked.assign_coords(effective_tth_deg=(("r", "eta"), changed))
        path = write_midas_zarr(bad, tmp_path / f"bad_{where}.zarr.zip")
        if where == "open":
            with pytest.raises(CakeFileError, match=r"member Effective2Theta holds float64 values outside "
                                                    r"\[0, 180\), expected 2θ in degrees") as info:
                open_caked(path)
            assert str(info.value).startswith(f"{path}: ")
        else:
            with pytest.raises(CakeFileError, match=rf"effective_tth_deg is nan in bin \(r {r}, eta {e}\)") as info:
                plan_lineouts(open_caked(path))
        assert "\n" not in str(info.value)
