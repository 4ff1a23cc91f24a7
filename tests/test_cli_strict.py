"""The command line refuses what it does not understand (issue 10, item 8).

Unknown flags and keys, missing geometry, a geometry off the detector and a missing command all
end in one line on stderr and exit status 2, before anything is written; progress is one line
every few seconds when stderr is not a terminal; a local cluster's INFO chatter stays hidden.
"""
from __future__ import annotations

import io
import subprocess
import sys

import pytest

from midasflow.cli import main
from midasflow.cli.demo import make_demo_scan


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    root = tmp_path_factory.mktemp("strict")
    files, _, cif = make_demo_scan(root, n_frames=2, sum_frames=2, size=256, seed=5, eta_bin_deg=45.0)
    return dict(root=root, params=str(files.params_file), data=str(files.data), cif=str(cif),
                cache=str(root / "cache"))


def _error(argv, capsys):
    """Run the command; it must fail with status 2 and exactly one line on stderr."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _params_without(scan, tmp_path, *keys, extra=""):
    lines = [line for line in open(scan["params"]).read().splitlines()
             if line.split()[:1] not in [[k] for k in keys]]
    path = tmp_path / "ps.txt"
    path.write_text("\n".join(lines) + "\n" + extra)
    return str(path)


@pytest.mark.parametrize("argv, expected", [
    (["run", "--no-progres", "EtaBinSize", "30"], "unknown option --no-progres; did you mean --no-progress?"),
    (["integrate", "-dataFn", "x.h5"], "unknown option -dataFn; did you mean -dataFN?"),
    (["integrate", "--resultfolder", "x"], "unknown option --resultfolder; did you mean -resultFolder?"),
    (["refine", "--bkg-term", "3"], "unknown option --bkg-term; did you mean --bkg-terms?"),
    (["demo", "--size=64", "--frame", "2"], "unknown option --frame; did you mean --frames?"),
    (["integrate", "EtaBinSiz", "30"], "unknown parameter key 'EtaBinSiz'; did you mean EtaBinSize?"),
    (["integrate", "--EtaBinSiz", "30"], "unknown option --EtaBinSiz; did you mean EtaBinSize?"),
    (["integrate", "RBinSize", "abc"], "key RBinSize: expected a number, got 'abc'"),
    (["refine", "EtaBinSize", "30"], "unexpected argument 'EtaBinSize' (this command takes no parameter overrides)"),
    (["integrate", "-peakFit"], "-peakFit: peak fitting inside the integrator is not supported"),
    (["refine", "--backend", "gsas2"], "--backend gsas2: the refinement engine is now chosen with --engine gsas2"),
    (["run", "--backend", "native"], "--backend native: the refinement engine is now chosen with --engine native"),
    (["run", "--backend", "streaming"], "--backend streaming: expected one of batch, stream"),
    (["demo", "--backend", "gsas2"], "--backend gsas2: the refinement engine is now chosen with --engine gsas2"),
    (["demo", "--backend", "stream"], "--backend stream: unknown option for demo; the engine is --engine"),
    (["refine", "--bkg-terms", "x"], "argument --bkg-terms: invalid int value: 'x'"),
    (["refine", "-x"], "unknown option -x ('midasflow refine -h' lists the options)"),
    (["check", "-nCPUs", "2"], "unknown option -nCPUs ('midasflow check -h' lists the options)"),
    (["check", "--no-progres"], "unknown option --no-progres; did you mean --no-progress?"),
    (["integrate", "30", "EtaBinSize", "5"], "'30' has no key before it; expected 'Key value ...' pairs"),
])
def test_unknown_flags_and_keys_exit_2_naming_the_nearest(argv, expected, scan, tmp_path, capsys):
    command, rest = argv[0], argv[1:]
    base = {
        "integrate": ["-paramFN", scan["params"], "-dataFN", scan["data"], "-resultFolder", str(tmp_path / "out")],
        "run": ["-paramFN", scan["params"], "-dataFN", scan["data"], "-resultFolder", str(tmp_path / "out"),
                "--cif", scan["cif"], "--out", str(tmp_path / "out")],
        "refine": ["--data", str(tmp_path / "nope.zarr.zip"), "--cif", scan["cif"], "--out", str(tmp_path / "out")],
        "demo": ["--out", str(tmp_path / "out")],
        "check": ["--data", str(tmp_path / "nope.zarr.zip"), "--cif", scan["cif"], "--out", str(tmp_path / "out")],
    }[command]
    err = _error([command, *base, *rest], capsys)
    assert err.startswith(f"midasflow {command}: error: ") and expected in err, err
    assert not (tmp_path / "out").exists()


def test_a_flag_before_overrides_no_longer_swallows_them(scan, tmp_path, capsys):
    # run used to store no-progress = "EtaBinSize 30" and cake with EtaBinSize 5
    from midasflow.io.caked_store import open_caked

    folder = tmp_path / "caked"
    assert main(["run", "-paramFN", scan["params"], "-dataFN", scan["data"], "-resultFolder", str(folder),
                 "--cache-dir", scan["cache"], "--cif", scan["cif"], "--skip-refinement", "--no-progress",
                 "EtaBinSize", "30",
                 "-RBinSize", "0.5"]) == 0
    captured = capsys.readouterr()
    assert "Completed" not in captured.err  # --no-progress honoured
    ds = open_caked(folder / "scan_000001.zarr.zip")
    assert ds.sizes["eta"] == 12 and float(ds.r_px[1] - ds.r_px[0]) == pytest.approx(0.5)


@pytest.mark.parametrize("keys, expected", [
    (("BC",), "missing key BC: expected BC, the beam centre Ycen Zcen in pixels"),
    (("Lsd",), "missing key Lsd: expected Lsd, the sample-detector distance in µm"),
    (("Wavelength",), "missing key Wavelength: expected Wavelength, the wavelength in Å"),
])
def test_missing_geometry_keys_are_errors(keys, expected, scan, tmp_path, capsys):
    params = _params_without(scan, tmp_path, *keys)
    err = _error(["integrate", "-paramFN", params, "-dataFN", scan["data"], "-resultFolder",
                  str(tmp_path / "out"), "--cache-dir", scan["cache"]], capsys)
    assert f"{params}: {expected}" in err
    assert not (tmp_path / "out").exists()


def test_a_missing_key_given_on_the_command_line_is_fine(scan, tmp_path):
    params = _params_without(scan, tmp_path, "BC")
    assert main(["integrate", "-paramFN", params, "-dataFN", scan["data"], "-resultFolder", str(tmp_path / "out"),
                 "--cache-dir", scan["cache"], "--no-progress", "BC", "128", "128"]) == 0


def test_geometry_with_every_bin_off_the_detector_is_an_error(scan, tmp_path, capsys):
    err = _error(["integrate", "-paramFN", scan["params"], "-dataFN", scan["data"], "-resultFolder",
                  str(tmp_path / "out"), "--cache-dir", scan["cache"], "BC", "5000", "5000",
                  "RMin", "10", "RMax", "200"], capsys)
    assert "no (R, η) bin overlaps the detector" in err and "BC 5000 5000" in err and "256×256" in err
    assert not (tmp_path / "out").exists()


def test_unknown_file_keys_warn_naming_the_file(scan, tmp_path, capsys):
    params = _params_without(scan, tmp_path, extra="RingThresh 1 100\nSpaceGroup 225\n")
    assert main(["integrate", "-paramFN", params, "-dataFN", scan["data"], "-resultFolder", str(tmp_path / "out"),
                 "--cache-dir", scan["cache"], "--no-progress"]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warning == [f"midasflow integrate: warning: {params}: keys not used by midasflow (kept in "
                       "Params.extra): RingThresh, SpaceGroup"]


def test_no_command_prints_the_usage_and_exits_2(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: midasflow <command> [options]") and "  refine " in err and "midasflow: error: a command is required" in err
    assert main(["refin"]) == 2
    assert "unknown command 'refin'; did you mean refine?" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["integrate", "refine", "run", "check", "demo"])
def test_every_command_has_no_progress_and_verbose(command):
    import importlib

    parser = importlib.import_module(f"midasflow.cli.{command}").build_parser()
    flags = {s for action in parser._actions for s in action.option_strings}
    assert {"--no-progress", "-v", "--verbose"} <= flags


def test_refine_takes_midas_short_instprm_flag():
    from midasflow.cli.refine import build_parser

    args = build_parser().parse_args(["--data", "x", "--cif", "c.cif", "-i", "a.instprm", "--engine", "gsas2"])
    assert args.instprm == "a.instprm" and args.engine == "gsas2"


def test_progress_without_a_terminal_is_a_line_every_few_seconds(monkeypatch):
    from midasflow import progress

    stream = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", stream)
    clock = iter(range(0, 10_000, 1))  # one second per call
    monkeypatch.setattr(progress.time, "perf_counter", lambda: float(next(clock)))
    bar = progress.TextProgress(100, "refine-lineout", interval_s=5.0)
    for _ in range(100):
        bar.update("ok  ")
    bar.close()
    text = stream.getvalue()
    lines = text.splitlines()
    assert "\r" not in text
    assert lines[-1].startswith("refine-lineout [####") and " 100/100 " in lines[-1]
    assert 10 <= len(lines) <= 40  # about one line per 5 s of the 100 s, not one per item


def test_progress_on_a_terminal_redraws_one_line(monkeypatch):
    from midasflow import progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    bar = progress.TextProgress(3, "x")
    for _ in range(3):
        bar.update()
    bar.close()
    assert stream.getvalue().count("\r") == 3 and stream.getvalue().count("\n") == 1


def test_dask_progress_without_a_terminal(monkeypatch):
    import dask.array as da

    from midasflow import progress

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    with progress.dask_progress("integrate"):
        da.ones((100,), chunks=10).sum().compute(scheduler="threads")
    text = stream.getvalue()
    assert "\r" not in text and text.splitlines()[-1].startswith("integrate [") and "100% Completed" in text


@pytest.mark.slow
def test_local_cluster_runs_without_scheduler_chatter(scan, tmp_path):
    folder = tmp_path / "caked"
    proc = subprocess.run(
        [sys.executable, "-m", "midasflow", "run", "-paramFN", scan["params"], "-dataFN", scan["data"],
         "-resultFolder", str(folder), "--cache-dir", scan["cache"], "--cif", scan["cif"], "--out",
         str(tmp_path / "ref"), "--no-atoms", "--mode", "lebail", "--no-report", "--no-export", "-nCPUs", "2"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Scheduler cancels key" not in proc.stderr and "INFO" not in proc.stderr, proc.stderr
    assert "\r" not in proc.stderr  # a pipe: progress as lines
    assert any(line.startswith("refine-lineout [") for line in proc.stderr.splitlines())
