"""midasflow.io.instprm: .instprm reading/writing (docs/gsas2.md §R1) and the importer's defaults (docs/reference/midas_zarr_layout.md §5)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
import zarr

from midasflow.errors import CakeFileError, InstprmError
from midasflow.instrument import Instrument
from midasflow.io.instprm import instrument_from_midas, read_instprm, write_instprm

SPEC_EXAMPLE = """#GSAS-II instrument parameter file; do not add/delete items!
Type:PXC
Bank:1
Lam:0.172979
Zero:0.0
Polariz.:0.99
Azimuth:0.0
U:1.163
V:-0.126
W:0.063
X:0.0
Y:0.0
Z:0.0
SH/L:0.002
Diff-type:Debye-Scherrer
Gonio. radius:1000.0
"""


def _write(tmp_path, text, name="inst.instprm"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_read_spec_example(tmp_path):
    inst = read_instprm(_write(tmp_path, SPEC_EXAMPLE))
    assert inst.type == "PXC" and inst.bank == 1
    assert inst.lam == 0.172979 and inst.wavelength_a == 0.172979 and not inst.is_doublet
    assert (inst.U, inst.V, inst.W, inst.X, inst.Y, inst.Z) == (1.163, -0.126, 0.063, 0, 0, 0)
    assert inst.shl == 0.002 and inst.polariz == 0.99 and inst.zero == 0.0
    assert inst.diff_type == "Debye-Scherrer" and inst.gonio_radius_mm == 1000.0


def test_semicolons_spaces_and_defaults(tmp_path):
    text = ("#GSAS-II instrument parameter file\n"
            "Type: PXC ; Lam : 0.413263; Zero:0.01\n"
            "Polariz.:0.95;U:1;V:-0.1;W:0.05;X:0.2;Y:0.3;SH/L:0.02\n\n"
            "InstrName:APS 1-ID\n")
    inst = read_instprm(_write(tmp_path, text))
    assert inst.lam == 0.413263 and inst.zero == 0.01 and inst.polariz == 0.95
    assert inst.Z == 0.0 and inst.azimuth == 0.0 and inst.bank == 1
    assert inst.gonio_radius_mm == 200.0  # GSAS-II sample default when the file has none
    assert inst.diff_type == "Debye-Scherrer" and inst.instr_name == "APS 1-ID"


def test_doublet_is_bragg_brentano(tmp_path):
    text = SPEC_EXAMPLE.replace("Lam:0.172979", "Lam1:1.540596\nLam2:1.544493\nI(L2)/I(L1):0.5")
    text = text.replace("Diff-type:Debye-Scherrer\n", "")
    inst = read_instprm(_write(tmp_path, text))
    assert inst.is_doublet and inst.lam is None
    assert (inst.lam1, inst.lam2, inst.i_ratio) == (1.540596, 1.544493, 0.5)
    assert inst.wavelength_a == 1.540596 and inst.diff_type == "Bragg-Brentano"


def test_banks(tmp_path):
    body = SPEC_EXAMPLE.split("\n", 1)[1]
    text = ("#Bank 2: GSAS-II instrument parameter file; do not add/delete items!\n"
            + body.replace("U:1.163", "U:2.0")
            + "#Bank 1: GSAS-II instrument parameter file; do not add/delete items!\n"
            + body)
    path = _write(tmp_path, text)
    assert read_instprm(path).U == 1.163  # lowest bank by default
    assert read_instprm(path, bank=2).U == 2.0
    with pytest.raises(InstprmError, match=r"bank 3 not found \(banks: 1, 2\)"):
        read_instprm(path, bank=3)


def test_round_trip(tmp_path):
    inst = Instrument(lam=0.1234567890123, zero=-0.0012, polariz=0.97, azimuth=12.5, U=1.5,
                      V=-0.2, W=0.07, X=0.11, Y=2.2, Z=0.3, shl=0.0264, gonio_radius_mm=654.3,
                      instr_name="APS 1-ID-E", extra={"Source": "synchrotron"})
    path = write_instprm(inst, tmp_path / "rt.instprm")
    assert path.read_text().startswith("#GSAS-II instrument parameter file")
    back = read_instprm(path)
    assert back.replace(source="") == inst
    doublet = Instrument(lam=None, lam1=1.540596, lam2=1.544493, i_ratio=0.5,
                         diff_type="Bragg-Brentano")
    assert read_instprm(write_instprm(doublet, tmp_path / "d.instprm")).replace(
        source="") == doublet
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary file


@pytest.mark.parametrize("text,pattern", [
    ("Type:PXC\nLam:0.4\n", r"line 1: expected a header containing 'GSAS-II'"),
    ("", r"line 1: expected a header containing 'GSAS-II'.*empty file"),
    (SPEC_EXAMPLE.replace("U:1.163", "U:abc"), r"line 8: key 'U': expected a number, got 'abc'"),
    (SPEC_EXAMPLE.replace("Lam:0.172979\n", ""), r"missing required key\(s\) Lam"),
    (SPEC_EXAMPLE.replace("SH/L:0.002\n", "").replace("Zero:0.0\n", ""),
     r"missing required key\(s\) Zero, SH/L"),
    (SPEC_EXAMPLE.replace("Zero:0.0", "Zero 0.0"), r"line 5: expected 'key:value', got 'Zero 0.0'"),
    (SPEC_EXAMPLE.replace("Type:PXC", "Type:PNT"), r"Type 'PNT': only constant-wavelength X-ray"),
    (SPEC_EXAMPLE.replace("Lam:0.172979", "Lam:-1"), r"wavelength must be a positive number"),
])
def test_bad_files(tmp_path, text, pattern):
    path = _write(tmp_path, text, "bad.instprm")
    with pytest.raises(InstprmError, match=pattern) as exc:
        read_instprm(path)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_missing_file(tmp_path):
    with pytest.raises(InstprmError, match="cannot read"):
        read_instprm(tmp_path / "nope.instprm")


def _midas_zip(path, values):
    store = zarr.storage.ZipStore(path, mode="w")
    root = zarr.open_group(store, mode="w", zarr_format=2)
    grp = root.create_group("InstrumentParameters")
    for name, value in values.items():
        grp.create_array(name, shape=(1,), dtype="<f8")[...] = np.array([value])
    store.close()
    return path


def test_instrument_from_midas_zip(tmp_path):
    path = _midas_zip(tmp_path / "scan.zarr.zip", {
        "Lam": 0.172978, "Polariz": 0.98, "SH_L": 0.003, "U": 2.0, "V": -0.5, "W": 0.1,
        "X": 0.4, "Y": 0.6, "Z": 0.0, "Distance": 650000.0, "Unrelated": 5.0})
    inst = instrument_from_midas(path)
    assert inst.lam == 0.172978 and inst.polariz == 0.98 and inst.shl == 0.003
    assert (inst.U, inst.V, inst.W, inst.X, inst.Y) == (2.0, -0.5, 0.1, 0.4, 0.6)
    assert inst.gonio_radius_mm == 650.0 and inst.type == "PXC" and inst.zero == 0.0
    assert "Unrelated" not in inst.extra


def test_instrument_from_midas_defaults_and_sibling(tmp_path):
    path = _midas_zip(tmp_path / "scan.zarr.zip", {"Lam": 0.2})
    inst = instrument_from_midas(path)
    assert inst == Instrument(lam=0.2, source=str(path))  # the importer's defaults, R = 1000 mm
    (tmp_path / "scan.zarr.instprm").write_text(
        "#GSAS-II instrument parameter file\nU:9.0;SH/L:0.02\nGonio. radius:123\n")
    inst = instrument_from_midas(path)
    assert inst.U == 9.0 and inst.shl == 0.02 and inst.lam == 0.2
    assert inst.gonio_radius_mm == 1000.0  # GSAS-II resets R from Distance after the override


def test_instrument_from_dataset():
    ds = xr.Dataset(attrs={"instrument": json.dumps(
        {"Lam": 0.172978, "Polariz.": 0.99, "SH/L": 0.002, "U": 1.163, "V": -0.126, "W": 0.063,
         "X": 0.0, "Y": 0.0, "Z": 0.0, "Distance": 1.0e6})})
    inst = instrument_from_midas(ds)
    assert inst.lam == 0.172978 and inst.gonio_radius_mm == 1000.0
    assert instrument_from_midas(xr.Dataset()).lam == 0.413263
    with pytest.raises(CakeFileError, match="attrs\\['instrument'\\]"):
        instrument_from_midas(xr.Dataset(attrs={"instrument": "{not json"}))


def test_midas_file_errors(tmp_path):
    with pytest.raises(CakeFileError, match="no such file"):
        instrument_from_midas(tmp_path / "missing.zarr.zip")
    (tmp_path / "junk.zarr.zip").write_text("not a zip")
    with pytest.raises(CakeFileError, match="not a zip"):
        instrument_from_midas(tmp_path / "junk.zarr.zip")
    store = zarr.storage.ZipStore(tmp_path / "empty.zarr.zip", mode="w")
    zarr.open_group(store, mode="w", zarr_format=2).create_group("REtaMap")
    store.close()
    with pytest.raises(CakeFileError, match="'InstrumentParameters' not found"):
        instrument_from_midas(tmp_path / "empty.zarr.zip")


@pytest.mark.parametrize("key", ["U", "W"])
def test_negative_gaussian_width_term_warns_naming_file_line_and_key(tmp_path, key):
    text = SPEC_EXAMPLE.replace(f"\n{key}:", f"\n{key}:-").replace(f"{key}:--", f"{key}:-")
    path = _write(tmp_path, text)
    line = next(n for n, s in enumerate(text.splitlines(), 1) if s.startswith(f"{key}:"))
    with pytest.warns(UserWarning) as record:
        inst = read_instprm(path)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and messages[0].startswith(f"{path}: line {line}: key {key} = -")
    assert getattr(inst, key) < 0  # still read as written
    # the same file beside a store (GSAS-II's sibling rule) warns too
    store = tmp_path / "x.zarr.zip"
    _midas_zip(store, {})
    (tmp_path / "x.zarr.instprm").write_text(text)
    with pytest.warns(UserWarning, match=rf"x\.zarr\.instprm: line {line}: key {key} = -"):
        instrument_from_midas(store)


def test_non_negative_widths_and_negative_v_do_not_warn(tmp_path, recwarn):
    read_instprm(_write(tmp_path, SPEC_EXAMPLE))  # V = -0.126 is normal
    assert not [w for w in recwarn if "negative" in str(w.message)]
