"""Calibration check without refining (issue 10, item 10): ``midasflow check``.

Simulated CeO2 with known truth: the true cell gives ring shifts of 0 within their esds, a CIF
cell 500 ppm too large gives −500/(1 + 5e-4) ppm on every ring, and a known strain tensor shows
up lineout by lineout as the shift against η.
"""
from __future__ import annotations

import csv
import re
import warnings

import numpy as np
import pytest

from midasflow.check import check_calibration, eta_averaged_pattern, ring_positions
from midasflow.cli import main
from midasflow.crystal import cubic_phase, write_phase_cif
from midasflow.simulate import CEO2_A_A


def _store(root, strain_tensor=None, seed=1):
    from midasflow.pipeline import integrate
    from midasflow.simulate import simulate_ceo2_scan

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files, truth = simulate_ceo2_scan(root / "scan", shape=(512, 512), n_frames=2, seed=seed,
                                          strain_tensor=strain_tensor,
                                          params_overrides={"omega_sum_frames": 2, "eta_bin_deg": 10.0,
                                                            "omega_step_deg": 0.0})
        store = integrate(files.params_file, files.data, result_folder=root, cache_dir=root / "cache")
    return store, truth


@pytest.fixture(scope="module")
def unstrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    store, truth = _store(root)
    cif = write_phase_cif(cubic_phase("CeO2", truth["a0_a"]), root / "CeO2.cif")
    return dict(root=root, store=store, cif=cif, a0=truth["a0_a"])


def test_true_cell_gives_zero_shifts(unstrained):
    check = check_calibration(unstrained["store"], [unstrained["cif"]], per_lineout=False)
    ok = [f for f in check.average if f.status == "ok"]
    assert len(ok) >= 6
    for fit in ok:
        assert abs(fit.shift_ppm) < 4 * fit.shift_esd_ppm + 5, fit
    mean, esd, n = check.mean_shift_ppm()
    assert n == len(ok) and abs(mean) < 3 * esd + 5 and esd < 20


@pytest.mark.slow
def test_a_cif_cell_500_ppm_too_large_shows_on_every_ring(unstrained, tmp_path):
    cif = write_phase_cif(cubic_phase("CeO2", unstrained["a0"] * (1 + 500e-6)), tmp_path / "big.cif")
    check = check_calibration(unstrained["store"], [cif])
    expected = (1 / (1 + 500e-6) - 1) * 1e6  # d_obs/d_calc − 1
    ok = [f for f in check.average if f.status == "ok"]
    assert len(ok) >= 6
    for fit in ok:
        assert abs(fit.shift_ppm - expected) < 4 * fit.shift_esd_ppm + 5, fit
    mean, esd, _ = check.mean_shift_ppm()
    assert abs(mean - expected) < 3 * esd + 5
    rows = check.table_rows()
    per = [r for r in rows if r["lineouts_fitted"] > 1]
    assert per and all(abs(r["lineout_mean_ppm"] - expected) < 4 * r["lineout_sd_ppm"] / np.sqrt(r["lineouts_fitted"]) + 10
                       for r in per)
    assert len(check.lineouts) == 36  # every 10° η bin of the one ω-group


@pytest.mark.slow
def test_strain_shows_lineout_by_lineout_against_eta(tmp_path):
    from midasflow.cli.demo import DEMO_STRAIN
    from midasflow.strain import normal_strain

    store, truth = _store(tmp_path, strain_tensor=DEMO_STRAIN, seed=2)
    cif = write_phase_cif(cubic_phase("CeO2", truth["a0_a"]), tmp_path / "CeO2.cif")
    check = check_calibration(store, [cif])
    shifts = check.lineout_shifts()
    esd = np.array([[f.shift_esd_ppm for f in lo["fits"]] for lo in check.lineouts])
    theta = np.array([r.tth_calc_deg / 2 for r in check.rings])
    residuals = []
    for i, lo in enumerate(check.lineouts):
        good = np.isfinite(shifts[i]) & (esd[i] > 0)
        w = 1 / esd[i, good] ** 2
        measured = np.sum(w * shifts[i, good]) / np.sum(w)
        model = 1e6 * np.sum(w * normal_strain(theta[good], lo["eta_deg"], DEMO_STRAIN, 0.0)) / np.sum(w)
        residuals.append(measured - model)
    model_span = 1e6 * np.ptp([normal_strain(3.0, lo["eta_deg"], DEMO_STRAIN) for lo in check.lineouts])
    assert model_span > 800  # the strain moves the rings by more than the noise ...
    assert np.sqrt(np.mean(np.square(residuals))) < 40  # ... and the check follows it


def test_eta_average_is_the_area_weighted_mean(unstrained):
    from midasflow.io.caked_store import open_caked

    ds = open_caked(unstrained["store"])
    x, y, s = eta_averaged_pattern(ds)
    inten = ds.intensity.values[0]  # one ω-group
    area = ds.bin_area.values
    r = int(np.argmax(y))
    use = np.isfinite(inten[r]) & (area[r] > 0)
    expected = np.sum(inten[r, use] * area[r, use]) / (ds.frames_summed.values[0] * np.sum(area[r, use]))
    assert y[r] == pytest.approx(expected, rel=1e-12) and np.all(s > 0) and x.size == y.size


def test_coinciding_reflections_make_one_ring():
    from midasflow.instrument import Instrument

    rings = ring_positions([cubic_phase("CeO2", CEO2_A_A)], Instrument(lam=0.172979), 2.0, 11.5)
    labels = [r.hkl_text for r in rings]
    assert "3 3 3/5 1 1" in labels or "5 1 1/3 3 3" in labels
    assert len({round(r.d_a, 9) for r in rings}) == len(rings)


@pytest.mark.slow
def test_check_command_prints_the_table_and_writes_the_page(unstrained, tmp_path, capsys):
    cif = write_phase_cif(cubic_phase("CeO2", unstrained["a0"] * (1 + 500e-6)), tmp_path / "CeO2.cif")
    out = tmp_path / "check"
    assert main(["check", "--data", str(unstrained["store"]), "--cif", str(cif), "--out", str(out),
                 "--no-progress"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split()[:3] == ["ring", "phase", "hkl"] and "shift ppm" in lines[0]
    assert any(line.split()[2:5] == ["1", "1", "1"] for line in lines[1:])
    shift = re.search(r"mean ring shift (\S+) ± (\S+) ppm", captured.out)
    assert abs(float(shift[1]) - (1 / (1 + 500e-6) - 1) * 1e6) < 3 * float(shift[2]) + 1  # −499.75 ppm
    assert "revisit the calibration" in captured.err
    with open(out / "ring_shifts.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and {"ring", "hkl", "tth_calc_deg", "tth_obs_deg", "shift_ppm", "shift_esd_ppm",
                     "lineout_mean_ppm"} <= set(rows[0])
    page = (out / "calibration_check.html").read_text()
    assert "CeO2 reflections" in page and "\\u03b7-averaged pattern" in page and "Slider" in page


@pytest.mark.parametrize("case, expected", [
    ("missing store", "no such caked store"),
    ("bad CIF", "garbage.cif"),
    ("bad limits", "--limits 8 2: expected 0 <= LOW < HIGH <= 180"),
    ("no rings in range", "no reflection of CeO2 between 2θ 0.2 and 2.5 deg"),
    ("limits outside the data", "--limits 30 40: the data of "),
    ("unknown flag", "unknown option --limit; did you mean --limits?"),
])
def test_check_bad_input_is_one_line_exit_2(case, expected, unstrained, tmp_path, capsys):
    garbage = tmp_path / "garbage.cif"
    garbage.write_text("not a CIF\n")
    base = ["check", "--data", str(unstrained["store"]), "--cif", str(unstrained["cif"]), "--out", str(tmp_path / "o")]
    argv = {
        "missing store": ["check", "--data", str(tmp_path / "nope.zarr.zip"), "--cif", str(unstrained["cif"])],
        "bad CIF": ["check", "--data", str(unstrained["store"]), "--cif", str(garbage)],
        "bad limits": base + ["--limits", "8", "2"],
        "no rings in range": base + ["--limits", "0.2", "2.5"],  # below CeO2 111
        "limits outside the data": base + ["--limits", "30", "40"],  # CeO2 rings there but no data: it wrote an empty page, exit 0
        "unknown flag": base + ["--limit", "2", "8"],
    }[case]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("midasflow check: error: ") and expected in err, err
    assert not (tmp_path / "o").exists()


def test_report_lineout_plots_carry_reflection_ticks():
    from types import SimpleNamespace

    from bokeh.models import Segment

    from midasflow.report import lineout_figure

    x = np.linspace(2, 10, 400)
    pattern = SimpleNamespace(tth_deg=x, obs=np.sin(x) + 2, calc=np.sin(x) + 2, bkg=np.ones_like(x), rwp=3.0,
                              reflections={"CeO2": {"tth_deg": np.array([3.17, 5.18, 12.0])},
                                           "Si": {"tth_deg": np.array([4.0])}})
    fig = lineout_figure(SimpleNamespace(pattern=pattern, index=7, omega_deg=0.0, eta_deg=5.0))
    ticks = [r for r in fig.renderers if isinstance(r.glyph, Segment)]
    positions = sorted(float(v) for r in ticks for v in r.data_source.data["x0"])
    assert positions == [3.17, 4.0, 5.18]  # inside the plotted range only, one row per phase
    labels = {item.label["value"] for item in fig.legend[0].items}
    assert {"CeO2 reflections", "Si reflections"} <= labels
