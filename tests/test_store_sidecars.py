"""Files beside a caked store (issue 10, item 5): ``x.instprm`` (the MIDAS manual's "same base
name") and GSAS-II's ``x.zarr.instprm`` override the store's InstrumentParameters; ``x.samprm`` /
``x.zarr.samprm`` are read as GSAS-II's MIDAS importer reads them, without ``eval``."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from midasflow.errors import InstprmError
from midasflow.io.instprm import instrument_from_midas, read_samprm, read_sample_parameters
from midasflow.pipeline import integrate
from midasflow.simulate import simulate_ceo2_scan

HEADER = "#GSAS-II instrument parameter file; do not add/delete items!\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("sidecars")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files, truth = simulate_ceo2_scan(root / "scan", shape=(256, 256), n_frames=2, seed=4,
                                          params_overrides={"omega_sum_frames": 2, "eta_bin_deg": 90.0})
        path = integrate(files.params_file, files.data, result_folder=root, cache_dir=root / "cache")
    return path, truth


@pytest.fixture
def fresh(store, tmp_path):
    """A copy of the store in an empty folder (so sidecar files of one test stay there)."""
    import shutil

    path = tmp_path / store[0].name
    shutil.copy(store[0], path)
    return path


def test_manual_base_name_instprm_overrides_the_store(fresh):
    before = instrument_from_midas(fresh)
    (fresh.parent / "scan_000001.instprm").write_text(HEADER + "U:9.0\nZero:0.01\n")
    after = instrument_from_midas(fresh)
    assert before.U != 9.0 and after.U == 9.0 and after.zero == 0.01
    assert after.lam == before.lam and after.gonio_radius_mm == before.gonio_radius_mm
    assert "scan_000001.instprm" in after.source


def test_gsas2_name_wins_over_the_manual_name(fresh):
    (fresh.parent / "scan_000001.instprm").write_text(HEADER + "U:9.0\nV:-1.0\n")
    (fresh.parent / "scan_000001.zarr.instprm").write_text(HEADER + "U:7.0\n")
    with pytest.warns(UserWarning, match="both apply, scan_000001.zarr.instprm .GSAS-II's own. over "
                                         "scan_000001.instprm"):
        inst = instrument_from_midas(fresh)
    assert inst.U == 7.0 and inst.V == -1.0


@pytest.mark.slow
def test_refine_uses_the_manual_base_name_instprm(fresh):
    """Through midasflow.refine (the store opened once): the sibling applies there too."""
    from midasflow.crystal import cubic_phase, write_phase_cif
    from midasflow.pipeline import refine
    from midasflow.simulate import CEO2_A_A

    cif = write_phase_cif(cubic_phase("CeO2", CEO2_A_A), fresh.parent / "CeO2.cif")
    (fresh.parent / "scan_000001.instprm").write_text(HEADER + "Polariz.:0.5\n")
    refine(fresh, [cif], out=fresh.parent / "out", refine_atoms=False, mode="lebail", export=False,
           report=False)
    import json

    settings = json.loads((fresh.parent / "out" / "lineouts" / "settings.json").read_text())
    assert settings["instrument"]["Polariz."] == 0.5


SAMPRM = """#GSAS-II sample parameter file
'Type':'Debye-Scherrer'
'Gonio. radius':500.0
'InstrName':'APS 1-ID-E'
'DisplaceX':[12.5, False]
'DisplaceY':-3.0
'Temperature':295.5
"""


def test_samprm_read_as_the_importer_reads_it(tmp_path):
    path = tmp_path / "x.samprm"
    path.write_text("  # an indented comment: the importer skips it too\n" + SAMPRM)
    values = read_samprm(path)
    assert values == {"Type": "Debye-Scherrer", "Gonio. radius": 500.0, "InstrName": "APS 1-ID-E",
                      "DisplaceX": 12.5, "DisplaceY": -3.0, "Temperature": 295.5}


def test_samprm_beside_the_store_sets_sample_terms(fresh):
    base = instrument_from_midas(fresh)
    (fresh.parent / "scan_000001.zarr.samprm").write_text(SAMPRM + "'Absorption':[1.5, True]\n'Colour':'red'\n")
    with pytest.warns(UserWarning) as record:
        inst = instrument_from_midas(fresh)
    messages = " | ".join(str(w.message) for w in record)
    assert "'Gonio. radius' ignored: the goniometer radius is the store's Distance" in messages
    assert "not modelled by midasflow's refinement: Absorption" in messages
    assert "not GSAS-II sample parameters, ignored: Colour" in messages
    assert (inst.displace_x_um, inst.displace_y_um) == (12.5, -3.0)
    assert inst.instr_name == "APS 1-ID-E" and inst.diff_type == "Debye-Scherrer"
    assert inst.gonio_radius_mm == base.gonio_radius_mm != 500.0
    assert read_sample_parameters(fresh)["Temperature"] == 295.5


def test_samprm_displacement_reaches_the_engine(fresh):
    """DisplaceX from a .samprm is where the peak positions start (held: no stage refines it),
    so the refined cell moves as the displacement moves the peaks."""
    from midasflow.crystal import cubic_phase
    from midasflow.refinement.engine import refine_pattern
    from midasflow.refinement.lineouts import plan_lineouts
    from midasflow.simulate import CEO2_A_A

    spec = next(s for s in plan_lineouts(fresh) if not s.skipped)
    phase = cubic_phase("CeO2", CEO2_A_A)
    plain = refine_pattern(spec.tth_deg, spec.intensity, spec.sigma, [phase], instrument_from_midas(fresh),
                           refine_atoms=False)
    (fresh.parent / "scan_000001.samprm").write_text("'DisplaceX':500.0\n")
    inst = instrument_from_midas(fresh)
    moved = refine_pattern(spec.tth_deg, spec.intensity, spec.sigma, [phase], inst, refine_atoms=False)
    assert moved.values["DisplaceX"] == 500.0 and plain.values["DisplaceX"] == 0.0
    a0, a1, esd = plain.cells["CeO2"][0], moved.cells["CeO2"][0], plain.cell_esds["CeO2"][0]
    # 2θ_h = 2θ₀ − (0.18/πR)·DisplaceX·cos2θ₀ (deg; R mm, µm): the model's peaks drawn lower, so
    # a smaller cell (higher 2θ₀) puts them back where the data are
    assert a1 < a0 - 10 * esd


@pytest.mark.parametrize("line, expected", [
    ("'Temperature':__import__('os').system('touch pwned')", "line 1: key 'Temperature': expected a number"),
    ("'Type'=Debye\n", "line 1: expected one 'key':value pair"),
    ("'Type':'a':'b'\n", "line 1: expected one 'key':value pair"),
])
def test_bad_samprm_is_one_line_and_never_evaluated(tmp_path, monkeypatch, line, expected):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "x.samprm"
    path.write_text(line + "\n")
    with pytest.raises(InstprmError, match=expected) as info:
        read_samprm(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert not (tmp_path / "pwned").exists()


def test_bad_samprm_beside_the_store_is_a_cli_error(store, tmp_path, capsys):
    import shutil

    from midasflow.cli import main
    from midasflow.crystal import cubic_phase, write_phase_cif
    from midasflow.simulate import CEO2_A_A

    path = tmp_path / store[0].name
    shutil.copy(store[0], path)
    (tmp_path / "scan_000001.zarr.samprm").write_text("'DisplaceX':'far'\n")
    cif = write_phase_cif(cubic_phase("CeO2", CEO2_A_A), tmp_path / "CeO2.cif")
    assert main(["refine", "--data", str(path), "--cif", str(cif), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "scan_000001.zarr.samprm: key 'DisplaceX': expected a number (µm), got 'far'" in err


def test_gsas2_importer_reads_the_same_sidecars(gsasii, fresh, tmp_path):
    (fresh.parent / "scan_000001.zarr.instprm").write_text(HEADER + "U:9.0\nSH/L:0.004\n")
    (fresh.parent / "scan_000001.zarr.samprm").write_text(SAMPRM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = instrument_from_midas(fresh)
    gpx = gsasii.G2Project(newgpx=str(tmp_path / "import.gpx"))
    hist = gpx.add_powder_histogram(str(fresh), None, fmthint="MIDAS", multiple=True)[0]
    inst, sample = hist.InstrumentParameters, hist.SampleParameters
    assert float(inst["U"][1]) == ours.U == 9.0 and float(inst["SH/L"][1]) == ours.shl == 0.004
    assert float(inst["Lam"][1]) == pytest.approx(ours.lam)
    assert sample["InstrName"] == ours.instr_name
    assert float(np.atleast_1d(sample["DisplaceX"])[0]) == ours.displace_x_um == 12.5
    assert float(np.atleast_1d(sample["DisplaceY"])[0]) == ours.displace_y_um
    assert sample["Gonio. radius"] == pytest.approx(ours.gonio_radius_mm)  # Distance, not the .samprm


def test_gsas2_engine_starts_from_the_samprm_displacement(gsasii, fresh):
    from midasflow.crystal import cubic_phase, write_phase_cif
    from midasflow.refinement.gsas2 import refine_pattern_gsas2
    from midasflow.refinement.lineouts import plan_lineouts
    from midasflow.simulate import CEO2_A_A

    cif = write_phase_cif(cubic_phase("CeO2", CEO2_A_A), fresh.parent / "CeO2.cif")
    (fresh.parent / "scan_000001.samprm").write_text("'DisplaceX':500.0\n")
    spec = next(s for s in plan_lineouts(fresh) if not s.skipped)
    refine_pattern_gsas2(spec.tth_deg, spec.intensity, spec.sigma, [cif], instrument_from_midas(fresh),
                         workdir=fresh.parent / "g2", index=0, refine_atoms=False)
    project = gsasii.G2Project(str(fresh.parent / "g2" / "hist_0000" / "hist_0000.gpx"))
    assert project.histograms()[0].SampleParameters["DisplaceX"][0] == 500.0


def test_the_commands_say_which_sidecars_apply(fresh, capsys):
    from midasflow.cli._common import announce_sidecars

    store, tmp_path = fresh, fresh.parent
    (tmp_path / "scan_000001.instprm").write_text(HEADER + "Polariz.:0.5\n")
    (tmp_path / "scan_000001.zarr.samprm").write_text(SAMPRM)
    announce_sidecars(str(store), None, "refine")
    assert capsys.readouterr().err.splitlines() == [
        f"midasflow refine: {tmp_path / 'scan_000001.instprm'} beside the store sets its instrument parameters",
        f"midasflow refine: {tmp_path / 'scan_000001.zarr.samprm'} beside the store sets its sample parameters"]
    announce_sidecars(str(store), "given.instprm", "check")  # -i replaces the store's terms: .samprm only
    assert capsys.readouterr().err.splitlines() == [
        f"midasflow check: {tmp_path / 'scan_000001.zarr.samprm'} beside the store sets its sample parameters"]


def test_sidecars_of_a_plain_zarr_store_are_announced_without_opening_it(store, tmp_path, capsys):
    """A plain zarr directory (``refine --data x.zarr``) with ``x.instprm`` beside it: the file is
    announced, and a bad one is the one-line error — the store itself is not opened for it."""
    from midasflow.cli._common import announce_sidecars
    from midasflow.errors import InstprmError
    from midasflow.io.caked_store import write_caked_zarr
    from midasflow.io.midas_zarr import read_midas_zarr

    plain = write_caked_zarr(read_midas_zarr(store[0]), tmp_path / "scan_000001.zarr")
    (tmp_path / "scan_000001.instprm").write_text(HEADER + "U:9.0\n")
    announce_sidecars(str(plain), None, "refine")
    assert capsys.readouterr().err.splitlines() == [
        f"midasflow refine: {tmp_path / 'scan_000001.instprm'} beside the store sets its instrument parameters"]
    (tmp_path / "scan_000001.instprm").write_text(HEADER + "U:wide\n")
    with pytest.raises(InstprmError, match=r"scan_000001.instprm: line 2: key 'U': expected a number"):
        announce_sidecars(str(plain), None, "refine")
