"""The examples run as written (small settings)."""
from __future__ import annotations

import runpy
import sys
import warnings
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.slow
def test_api_walkthrough_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["api_walkthrough.py", str(tmp_path), "--small"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runpy.run_path(str(EXAMPLES / "api_walkthrough.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "24 of 24 lineouts refined" in out
    assert (tmp_path / "scan.zarr.zip").exists()
    assert (tmp_path / "refinement" / "results.zarr").exists()
