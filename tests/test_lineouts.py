"""Lineout plan and executors: selection, σ, serial vs distributed, failures, resume, seeding."""
import numpy as np
import pytest
from dask.utils import key_split
from distributed import get_task_stream

from midasflow.errors import CakeFileError, ParameterError
from midasflow.refinement import lineouts
from midasflow.refinement.lineouts import plan_lineouts, run_distributed, run_serial

from lineouts_helpers import TOY_OPTIONS, ToyBackend, make_caked

TOY = ToyBackend()
FAILING = ToyBackend(fail_below=3.0)


class CountingBackend(ToyBackend):
    """Counts calls in this process (serial executor only)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def refine(self, spec, options, start=None):
        self.calls.append(spec.n_points)
        return super().refine(spec, options, start)


def test_plan_selection_numbering_and_sigma():
    ds = make_caked(n_groups=2, n_eta=8, n_r=80, frames=3, masked=[(1, 2)])
    # a column with exactly 20 usable bins is skipped, 21 is kept (GSAS-II: more than 20)
    ds["intensity"][0, 3 + 21:, 5] = np.nan
    ds["intensity"][0, 3 + 20:, 6] = np.nan
    plan = plan_lineouts(ds)
    assert [s.index for s in plan] == list(range(16))
    by = {s.index: s for s in plan}
    assert by[5].n_points == 21 and not by[5].skipped
    assert by[6].n_points == 20 and by[6].skipped
    assert by[8 + 2].skipped and by[8 + 2].n_points == 0  # all-NaN column
    s = by[8 + 3]
    assert (s.group, s.eta_index, s.omega_deg) == (1, 3, 90.0)
    assert s.eta_deg == pytest.approx(ds.eta_deg.values[3])
    assert s.n_points == 77  # 3 zero-area bins dropped
    summed = ds.intensity.values[1, 3:, 3]
    np.testing.assert_allclose(s.intensity, summed / 3)
    np.testing.assert_allclose(s.tth_deg, ds.tth_deg.values[3:])
    # σ² = y / (area · N): Poisson counts C = sum · area over the group's frames
    np.testing.assert_allclose(s.sigma ** 2, s.intensity / (2.0 * 3), rtol=1e-12)
    assert not s.intensity.flags.writeable
    with pytest.raises(CakeFileError, match="bin_area"):
        plan_lineouts(ds.drop_vars("bin_area"))


def test_sigma_floor_and_unnormalised_cakes():
    sig = lineouts.lineout_sigma(np.array([0.0, -3.0, 100.0]), np.array([0.5, 0.5, 0.5]), 4)
    # fewer than one count behind the bin: σ of one count, 1/(area·N)
    np.testing.assert_allclose(sig, [1 / 2.0, 1 / 2.0, np.sqrt(50.0) / 2.0])
    raw = lineouts.lineout_sigma(np.array([0.0, 400.0]), np.array([2.0, 2.0]), 4, normalized=False)
    np.testing.assert_allclose(raw, [0.25, 5.0])
    ds = make_caked(n_groups=1, n_eta=2)
    ds.attrs["params"] = "Lsd 1e6\nNormalize 0\n"
    s = plan_lineouts(ds)[0]
    np.testing.assert_allclose(s.sigma, np.sqrt(np.maximum(s.intensity * 3, 1)) / 3)


def test_serial_refines_and_recovers_the_cell():
    ds = make_caked(n_groups=2, n_eta=8)
    res = run_serial(plan_lineouts(ds), TOY_OPTIONS, backend=TOY)
    assert [r.status for r in res] == ["ok"] * 16
    a = np.array([r.pattern.cells["CeO2"][0] for r in res]).reshape(2, 8)
    da = np.array([r.pattern.cell_esds["CeO2"][0] for r in res]).reshape(2, 8)
    z = (a - ds.true_a.values) / da
    assert np.all(np.abs(z) < 5), z


def test_failures_never_stop_the_others():
    ds = make_caked(n_groups=1, n_eta=4, masked=[(0, 1)])
    ds["intensity"][0, :, 2] = 1.0  # flat: the injected failure triggers on it
    plan = plan_lineouts(ds)
    res = run_serial(plan, TOY_OPTIONS, backend=FAILING)
    assert [r.status for r in res] == ["ok", "skipped", "failed", "ok"]
    assert res[2].message == "RuntimeError: injected failure" and res[2].pattern is None
    assert "usable points" in res[1].message


@pytest.mark.slow
def test_serial_and_distributed_give_identical_results(client, tmp_path):
    ds = make_caked(n_groups=2, n_eta=8, masked=[(0, 4)])
    plan = plan_lineouts(ds)
    ser = run_serial(plan, TOY_OPTIONS, backend=TOY)
    dis = run_distributed(plan, TOY_OPTIONS, client, backend=TOY, progress=False, checkpoint_dir=tmp_path)
    assert [r.index for r in dis] == [r.index for r in ser]
    assert [r.status for r in dis] == [r.status for r in ser]
    for a, b in zip(ser, dis):
        if a.status == "ok":
            assert a.pattern.values == b.pattern.values
            assert a.pattern.cells == b.pattern.cells
            np.testing.assert_array_equal(a.pattern.calc, b.pattern.calc)
    # 14 histograms; η column 4, NaN in group 0, is none for GSAS-II (files lineout_g…_e0004)
    assert len(list((tmp_path / "lineouts").glob("hist_*.npz"))) == 14
    assert sorted(p.name for p in (tmp_path / "lineouts").glob("lineout_*.npz")) == [
        "lineout_g0000_e0004.npz", "lineout_g0001_e0004.npz"]
    assert len(client.scheduler_info()["workers"]) == 2
    # each result names the worker that refined it; the serial ones ran in this process
    assert {r.worker for r in ser} == {""}
    assert {r.worker for r in dis} <= set(client.scheduler_info()["workers"]) and all(r.worker for r in dis)


def test_distributed_failure_isolated_and_keys_named(client):
    ds = make_caked(n_groups=1, n_eta=4)
    ds["intensity"][0, :, 1] = 1.0
    plan = plan_lineouts(ds)
    with get_task_stream(client) as ts:
        res = run_distributed(plan, TOY_OPTIONS, client, backend=FAILING, progress=False, lineouts_per_task=1)
    assert [r.status for r in res] == ["ok", "failed", "ok", "ok"]
    assert "injected failure" in res[1].message
    # task keys as the dashboard's task stream shows them
    keys = sorted(t["key"] for t in ts.data if str(t["key"]).startswith("refine-lineout"))
    assert [k.rsplit("-", 1)[0] for k in keys] == [f"refine-lineout-{i}" for i in range(4)]
    assert {key_split(k) for k in keys} == {"refine-lineout"}


def test_resume_computes_only_the_missing_lineouts(tmp_path):
    ds = make_caked(n_groups=2, n_eta=4)
    plan = plan_lineouts(ds)
    first = CountingBackend()
    # "interrupted" run: only the first 5 lineouts were finished
    run_serial(plan[:5], TOY_OPTIONS, backend=first, checkpoint_dir=tmp_path)
    assert len(first.calls) == 5
    again = CountingBackend()
    res = run_serial(plan, TOY_OPTIONS, backend=again, checkpoint_dir=tmp_path, resume=True)
    assert len(again.calls) == 3 and all(r.status == "ok" for r in res)
    full = run_serial(plan, TOY_OPTIONS, backend=TOY)
    assert [r.pattern.values for r in res] == [r.pattern.values for r in full]
    # without resume everything is recomputed
    fresh = CountingBackend()
    run_serial(plan, TOY_OPTIONS, backend=fresh, checkpoint_dir=tmp_path)
    assert len(fresh.calls) == 8
    with pytest.raises(ParameterError, match="resume"):
        run_serial(plan, TOY_OPTIONS, backend=TOY, resume=True)


def test_resume_distributed_after_interruption(client, tmp_path):
    ds = make_caked(n_groups=2, n_eta=4)
    plan = plan_lineouts(ds)
    run_serial(plan[:6], TOY_OPTIONS, backend=TOY, checkpoint_dir=tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "lineouts").iterdir()}
    res = run_distributed(plan, TOY_OPTIONS, client, backend=TOY, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert all(r.status == "ok" for r in res)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "lineouts").iterdir()}
    assert len(after) == 8
    assert all(after[k] == v for k, v in stamps.items())  # the finished six were not redone


def test_seed_from_neighbour(client):
    ds = make_caked(n_groups=2, n_eta=6, masked=[(1, 0)])
    plan = plan_lineouts(ds)
    seeds = lineouts.seed_sources(plan, "neighbour")
    assert seeds == {1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 8: 7, 9: 7, 10: 7, 11: 7}
    ser = run_serial(plan, TOY_OPTIONS, backend=TOY, seed_from="neighbour")
    dis = run_distributed(plan, TOY_OPTIONS, client, backend=TOY, seed_from="neighbour", progress=False)
    assert [r.seeded for r in ser] == [i in seeds for i in range(12)]
    assert [r.pattern.values if r.pattern else None for r in ser] == \
           [r.pattern.values if r.pattern else None for r in dis]
    indep = run_serial(plan, TOY_OPTIONS, backend=TOY)
    # seeded starts are closer: fewer function evaluations in total
    nfev = lambda rs: sum(r.pattern.values["nfev"] for r in rs if r.pattern)  # noqa: E731
    assert nfev(ser) < nfev(indep)
    with pytest.raises(ParameterError, match="seed-from"):
        lineouts.seed_sources(plan, "nearest")


def test_progress_line_on_stderr(capsys):
    ds = make_caked(n_groups=1, n_eta=2)
    run_serial(plan_lineouts(ds), TOY_OPTIONS, backend=TOY, progress=True)
    err = capsys.readouterr().err
    assert "refine-lineout" in err and "2/2" in err and "ok 2" in err
