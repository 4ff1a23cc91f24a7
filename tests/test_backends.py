"""Refinement backends: one protocol, the lineout's spec (index included) for every backend."""
from __future__ import annotations

import numpy as np
import pytest

from midasflow.errors import ParameterError
from midasflow.refinement import engine
from midasflow.refinement.backends import ExportingBackend, NativeBackend, RefineBackend, get_backend
from midasflow.refinement.gsas2 import Gsas2Backend
from midasflow.refinement.lineouts import plan_lineouts, run_serial

from lineouts_helpers import TOY_OPTIONS, Recording, ToyBackend, make_caked


def test_every_backend_is_a_refine_backend():
    for backend in (NativeBackend(), Gsas2Backend(["x.cif"], "work"), ExportingBackend(NativeBackend(), "out"),
                    ToyBackend()):
        assert isinstance(backend, RefineBackend)
    assert not isinstance(lambda *a: None, RefineBackend)
    assert isinstance(get_backend("native", ["x.cif"], "out"), NativeBackend)
    with pytest.raises(ParameterError, match="--engine 'gsas3': expected one of native, gsas2"):
        get_backend("gsas3", ["x.cif"], "out")


def test_the_executor_gives_each_backend_the_lineout_index_and_seed():
    ds = make_caked(n_groups=2, n_eta=3)
    plan = plan_lineouts(ds)
    rec = Recording()
    res = run_serial(plan, TOY_OPTIONS, backend=rec, seed_from="neighbour")
    assert [i for i, _ in rec.calls] == [s.index for s in plan] == list(range(6))
    starts = dict(rec.calls)
    assert starts[0] is None and starts[3] is None  # the first lineout of each ω-group starts fresh
    assert starts[1] == res[0].pattern.values and starts[5] == res[3].pattern.values


@pytest.mark.slow
def test_native_backend_is_the_engine():
    ds = make_caked(n_groups=1, n_eta=2, height=4000.0)
    spec = plan_lineouts(ds)[0]
    got = NativeBackend().refine(spec, TOY_OPTIONS)
    want = engine.refine_pattern(spec.tth_deg, spec.intensity, spec.sigma, list(TOY_OPTIONS.phases),
                                 TOY_OPTIONS.instrument, **TOY_OPTIONS.recipe_kwargs())
    assert got.status == want.status and got.values == want.values
    np.testing.assert_array_equal(got.calc, want.calc)


def test_exporting_backend_writes_ok_lineouts_only(tmp_path):
    ds = make_caked(n_groups=1, n_eta=3)
    ds["intensity"][0, :, 1] = 1.0  # flat: the injected failure triggers on it
    for stale in ("hist_0001_data.csv", "hist_0001_CeO2.cif", "hist_0001.gpx"):  # an earlier refinement's exports
        (tmp_path / stale).write_text("old")
    res = run_serial(plan_lineouts(ds), TOY_OPTIONS, backend=ExportingBackend(ToyBackend(fail_below=3.0), tmp_path))
    assert [r.status for r in res] == ["ok", "failed", "ok"]
    assert sorted(p.name for p in tmp_path.glob("hist_*_data.csv")) == ["hist_0000_data.csv", "hist_0002_data.csv"]
    assert not (tmp_path / "hist_0001_CeO2.cif").exists()  # not left beside the failed lineout
    assert not (tmp_path / "hist_0001.gpx").exists()
    # the toy engine gives no point weights: no project, and the lineout says why
    assert not list(tmp_path.glob("hist_*.gpx"))
    assert any(w.startswith("no hist_0000.gpx:") for w in res[0].pattern.warnings)
