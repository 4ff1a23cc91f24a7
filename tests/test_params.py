"""MIDAS parameter files: keys, defaults, units, overrides and one-line errors."""
from __future__ import annotations

import warnings

import pytest

from midasflow.errors import ParameterError
from midasflow.instrument import MIDAS_DEFAULT_WAVELENGTH_A as DEFAULT_WAVELENGTH_A
from midasflow.params import Params, params_from_text, read_params

GOOD = """\
# a comment line
NrPixelsY 300
NrPixelsZ 256
px 172   # inline comment is dropped
Lsd 1000000
BC 150.5 120.25
tx 0.5
ty -0.25
tz 0.1
p0 1e-4
p7 2e-5
RhoD 50000
ImTransOpt 1
ImTransOpt 2
RMin 10
RMax 100
RBinSize 0.5
EtaMin -180
EtaMax 180
EtaBinSize 5
Wavelength 0.2
OmegaStart -180
OmegaStep 0.25
OmegaSumFrames 10
Polariz 0.95
SHpL 0.003
SpaceGroup 225
"""


#: The calibrated keys every file must carry.
GEOMETRY = "Lsd 1000000\nBC 1024 1024\nWavelength 0.2\n"


def write(tmp_path, text, name="ps.txt"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reads_every_caking_key_with_units(tmp_path):
    with pytest.warns(UserWarning, match="SpaceGroup"):
        p = read_params(write(tmp_path, GOOD))
    assert (p.nr_pixels_y, p.nr_pixels_z) == (300, 256)
    assert p.px_um == 172.0 and p.lsd_um == 1e6
    assert (p.bc_y_px, p.bc_z_px) == (150.5, 120.25)
    assert (p.tx_deg, p.ty_deg, p.tz_deg) == (0.5, -0.25, 0.1)
    assert p.p[0] == 1e-4 and p.p[7] == 2e-5 and p.p[1] == 0.0 and len(p.p) == 15
    assert p.im_trans_opt == (1, 2)
    assert p.n_r == 180 and p.n_eta == 72
    assert p.r_edges_px()[-1] == pytest.approx(100.0)
    assert p.omega_sum_frames == 10 and p.omega_step_deg == 0.25
    assert p.instrument.polariz == 0.95 and p.instrument.shl == 0.003
    assert p.instrument.lam == 0.2 and p.instrument.to_midas()["Distance"] == 1e6
    assert p.instrument.gonio_radius_mm == 1000.0
    assert p.extra_keys == {"SpaceGroup": ("225",)}


def test_defaults_follow_midas():
    p = Params()
    assert (p.r_min_px, p.r_max_px, p.r_bin_px) == (10.0, 1524.0, 0.25)
    assert (p.eta_min_deg, p.eta_max_deg, p.eta_bin_deg) == (-180.0, 180.0, 5.0)
    assert p.wavelength_a == DEFAULT_WAVELENGTH_A and p.normalize
    assert p.instrument.U == 1.163 and p.instrument.V == -0.126 and p.instrument.W == 0.063


def test_overrides_win_and_replace_imtransopt(tmp_path):
    path = write(tmp_path, GOOD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = read_params(path, ["Lsd", "900000", "--BC", "10", "20", "ImTransOpt", "0", "EtaMin", "-90"])
        q = read_params(path, {"RMax": 50})
    assert p.lsd_um == 9e5 and (p.bc_y_px, p.bc_z_px) == (10.0, 20.0)
    assert p.im_trans_opt == (0,) and p.eta_min_deg == -90.0
    assert q.r_max_px == 50.0


def test_text_round_trip(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = read_params(write(tmp_path, GOOD))
    assert params_from_text(p.to_text(), source=p.source) == p
    again = write(tmp_path, p.to_text(), "again.txt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert read_params(again).with_overrides(source=p.source) == p


def test_geometry_key_tracks_every_geometry_field():
    base = Params()
    assert base.geometry_key() == Params().geometry_key()
    changed = [
        base.with_overrides(p=(0.0,) * 7 + (1e-5,) + (0.0,) * 7),
        base.with_overrides(parallax_um=5.0),
        base.with_overrides(tz_deg=0.1),
        base.with_overrides(im_trans_opt=(1,)),
        base.with_overrides(eta_bin_deg=10.0),
    ]
    keys = {c.geometry_key() for c in changed}
    assert len(keys) == len(changed) and base.geometry_key() not in keys
    # ω and wavelength do not change the map
    assert base.with_overrides(omega_step_deg=1.0, wavelength_a=0.3).geometry_key() == base.geometry_key()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Lsd abc\n", r"ps.txt:1: key Lsd: expected a number, got 'abc'"),
        ("RMin 10\nRMax 5\n", r"ps.txt:2: key RMax: expected RMax > RMin"),
        ("RBinSize 0\n", r"ps.txt:1: key RBinSize: expected a bin size > 0"),
        ("EtaBinSize -5\n", r"ps.txt:1: key EtaBinSize: expected a bin size > 0"),
        ("BC 1024\n", r"ps.txt:1: key BC: expected 2 values"),
        ("\nImTransOpt 7\n", r"ps.txt:2: key ImTransOpt: unknown code 7"),
        ("NrPixelsY 2.5\n", r"ps.txt:1: key NrPixelsY: expected an integer"),
        ("Lsd\n", r"ps.txt:1: key Lsd: expected a value"),
        ("DistortionFile d.bin\n", r"ps.txt:1: key DistortionFile: per-pixel distortion maps are not supported"),
        ("Lsd 1000000 900000\n", r"ps.txt:1: key Lsd: expected 1 value \(a number\), got 2"),
        ("BC 1024 1020 5\n", r"ps.txt:1: key BC: expected 2 values"),
        ("p2 0.1 0.2\n", r"ps.txt:1: key p2: expected 1 value"),
        ("NrPixels 100\nNrPixelsY 0\n", r"ps.txt:2: key NrPixelsY/NrPixelsZ: expected positive"),
        ("DetDist -5\n", r"ps.txt:1: key Lsd: expected a positive"),
        ("NrPixelsY inf\n", r"ps.txt:1: key NrPixelsY: expected an integer, got 'inf'"),  # found by the fuzz test
        ("SkipFrame -inf\n", r"ps.txt:1: key SkipFrame: expected an integer, got '-inf'"),
    ],
)
def test_bad_files_name_file_line_key(tmp_path, text, expected):
    with pytest.raises(ParameterError, match=expected) as info:
        read_params(write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ParameterError, match="nope.txt: parameter file not found"):
        read_params(tmp_path / "nope.txt")


def test_bad_override_is_named(tmp_path):
    with pytest.raises(ParameterError, match="command line override RBinSize: key RBinSize"):
        read_params(write(tmp_path, "RMin 10\n"), ["RBinSize", "-1"])


def test_q_mode_is_refused_not_ignored(tmp_path):
    with pytest.raises(ParameterError, match=r"ps.txt:2: key QBinSize: Q-mode binning is not supported"):
        read_params(write(tmp_path, "RMin 10\nQBinSize 0.01\nQMin 1\nQMax 5\n"))
    assert read_params(write(tmp_path, GEOMETRY + "QBinSize 0\n")).r_bin_px == 0.25  # 0 = R-mode, fine


def test_midas_keys_not_applied_are_reported(tmp_path):
    with pytest.warns(UserWarning, match=r"not applied by midasflow: GradientCorrection .*SubPixelLevel"):
        read_params(write(tmp_path, GEOMETRY + "SubPixelLevel 3\nGradientCorrection 1\n"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neutral values say nothing
        read_params(write(tmp_path, GEOMETRY + "SubPixelLevel 1\nGradientCorrection 0\n"))


@pytest.mark.parametrize("text, missing", [
    ("BC 128 128\nWavelength 0.2\n", "key Lsd: expected Lsd, the sample-detector distance"),
    ("Lsd 1e6\nWavelength 0.2\nNrPixels 256\n", "key BC: expected BC, the beam centre"),
    ("DetDist 1e6\nBC 1 2\n", "key Wavelength: expected Wavelength"),
    ("RMin 10\n", "keys Lsd, BC, Wavelength: expected Lsd"),
])
def test_missing_geometry_keys_are_errors(tmp_path, text, missing):
    # MIDAS would cake with Lsd 1 m, BC 1024 1024 and 0.172978 Å: a geometry nobody calibrated
    with pytest.raises(ParameterError, match=rf"ps.txt: missing {missing}") as info:
        read_params(write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_geometry_keys_may_come_from_the_command_line(tmp_path):
    p = read_params(write(tmp_path, "NrPixels 256\n"), ["Lsd", "5e5", "BC", "128", "127", "-Wavelength", "0.3"])
    assert (p.lsd_um, p.bc_y_px, p.bc_z_px, p.wavelength_a) == (5e5, 128.0, 127.0, 0.3)


@pytest.mark.parametrize("overrides, expected", [
    (["EtaBinSiz", "30"], r"command line override EtaBinSiz: unknown parameter key 'EtaBinSiz'; did you mean EtaBinSize\?"),
    (["--RBinSise", "0.5"], r"unknown parameter key 'RBinSise'; did you mean RBinSize\?"),
    ({"Wavelenght": 0.3}, r"unknown parameter key 'Wavelenght'; did you mean Wavelength\?"),
])
def test_unknown_override_key_is_an_error_naming_the_nearest(tmp_path, overrides, expected):
    with pytest.raises(ParameterError, match=expected):
        read_params(write(tmp_path, GEOMETRY), overrides)


def test_unknown_file_keys_warn_once_naming_the_file_not_the_overrides(tmp_path):
    path = write(tmp_path, GEOMETRY + "SpaceGroup 225\nRingThresh 1 100\n")
    with pytest.warns(UserWarning) as record:
        p = read_params(path, ["SubPixelLevel", "2", "RBinSize", "0.5"])
    messages = [str(w.message) for w in record]
    assert f"{path}: keys not used by midasflow (kept in Params.extra): RingThresh, SpaceGroup" in messages
    # SubPixelLevel came from the command line: blamed on it, not on the file
    assert any(m.startswith("command line: not applied by midasflow: SubPixelLevel") for m in messages)
    assert not any(m.startswith(str(path)) and "SubPixelLevel" in m for m in messages)
    assert p.r_bin_px == 0.5 and dict(p.extra) == {"RingThresh": ("1", "100"), "SpaceGroup": ("225",)}
