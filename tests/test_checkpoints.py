"""Checkpoints that never run code and never mix results (issue 12 items 1-3, 11).

Every repro of the issue fails with the pickled checkpoints and the one settings file of before:
a planted checkpoint ran code, settings rewritten by another run let old results through, a
rewritten store's old results were reused, a worker's death made finished lineouts run again.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from midasflow.refinement import checkpoints
from midasflow.refinement.backends import NativeBackend
from midasflow.refinement.checkpoints import CheckpointError, Checkpoints, record_settings
from midasflow.refinement.lineouts import plan_lineouts, refine_lineout, run_distributed, run_serial

from lineouts_helpers import TOY_OPTIONS, ToyBackend, make_caked, simulated_store


class _Counting(ToyBackend):
    """The toy engine, counting its calls in this process."""

    def __init__(self, delay_s=0.0):
        super().__init__()
        self.calls, self.delay_s = [], delay_s

    def refine(self, spec, options, start=None):
        self.calls.append(spec.index)
        time.sleep(self.delay_s)
        return super().refine(spec, options, start)


class _Evil:
    """Unpickling this creates the file ``path``: the proof that a file ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _assert_same_results(a, b):
    assert [r.index for r in a] == [r.index for r in b]
    for x, y in zip(a, b):
        assert x.status == y.status
        if x.pattern is not None:
            assert x.pattern.values == y.pattern.values


def _compare(a, b, where="result"):
    """Field-by-field equality of rebuilt objects (arrays, tuples, dataclasses, space groups)."""
    import dataclasses

    if dataclasses.is_dataclass(a):
        assert type(a) is type(b), where
        for f in dataclasses.fields(a):
            _compare(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype, where
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, dict):
        assert type(b) is dict and list(a) == list(b), where
        for k in a:
            _compare(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _compare(x, y, f"{where}[{i}]")
    elif hasattr(a, "xhm"):
        assert a.xhm() == b.xhm(), where
    elif isinstance(a, (float, np.floating)):  # numpy scalars come back as Python floats
        assert isinstance(b, float) and (a == b or (np.isnan(a) and np.isnan(b))), where
    else:
        assert type(a) is type(b) and a == b, where


def test_a_real_refinement_round_trips_exactly(tmp_path):
    path, options = simulated_store(tmp_path / "scan.zarr.zip", n_groups=1, eta_bin_deg=90.0)
    spec = plan_lineouts(path)[1]
    res = refine_lineout(spec, NativeBackend(), options)  # the full recipe: every field filled
    assert res.status == "ok" and res.pattern.reflections and res.pattern.phases
    file = tmp_path / "hist.npz"
    file.write_bytes(checkpoints.dumps(res, {"refine": "r", "input": "i", "run": "x"}))
    stamps, back = checkpoints.loads(file)
    assert stamps == {"refine": "r", "input": "i", "run": "x"}
    _compare(res, back)
    with np.load(file, allow_pickle=False) as npz:  # plain numbers only
        assert all(npz[k].dtype.kind in "biuf" for k in npz.files)


def _planted(folder: Path, marker: Path) -> dict[str, bytes | None]:
    """Crafted files under the names the executor reads (index → what it holds)."""
    good = checkpoints.dumps(
        run_serial(plan_lineouts(make_caked(n_groups=1, n_eta=8))[:1], TOY_OPTIONS, backend=ToyBackend())[0],
        {"refine": "r", "input": "i", "run": "x"})
    evil = pickle.dumps(_Evil(marker))
    with np.load(__import__("io").BytesIO(good), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = bytes(arrays["meta"]).decode()
    files = {
        "hist_0000.pkl": evil,                       # the old format: never opened
        "hist_0001.npz": evil,                       # a pickle under the new name
        "hist_0003.npz": good[: len(good) // 2],     # truncated
    }
    buf = io.BytesIO()
    np.savez(buf, meta=arrays["meta"], a0=np.array([_Evil(marker)], dtype=object))  # object array
    files["hist_0002.npz"] = buf.getvalue()
    for index, (old, new) in {4: (r'"\$object": "PatternResult"', '"$object": "Popen"'),
                              5: (r'"rwp": [^,]+', '"rwp": "12"'),
                              6: (r'"format": "[^"]+"', '"format": "other/1"')}.items():
        crafted = re.sub(old, new, meta, count=1)
        assert crafted != meta
        buf = io.BytesIO()
        np.savez(buf, **{**arrays, "meta": np.frombuffer(crafted.encode(), np.uint8)})
        files[f"hist_{index:04d}.npz"] = buf.getvalue()
    (folder / "lineouts").mkdir(parents=True)
    for name, data in files.items():
        (folder / "lineouts" / name).write_bytes(data)
    return files


def test_planted_checkpoints_never_run_code_and_are_refined_again(tmp_path):
    marker = tmp_path / "code-ran"
    _planted(tmp_path, marker)
    plan = plan_lineouts(make_caked(n_groups=1, n_eta=8))
    counting = _Counting()
    with pytest.warns(UserWarning) as caught:
        res = run_serial(plan, TOY_OPTIONS, backend=counting, checkpoint_dir=tmp_path, resume=True)
    assert not marker.exists()
    assert sorted(counting.calls) == list(range(8))  # nothing planted was taken
    assert all(r.status == "ok" for r in res)
    invalid = sorted(str(w.message).split(":")[0] for w in caught if "not a valid checkpoint" in str(w.message))
    assert [Path(p).name for p in invalid] == [f"hist_{i:04d}.npz" for i in range(1, 7)]
    reasons = " ".join(str(w.message) for w in caught)
    for why in ("not a data-only .npz", "'Popen' is not allowed", "PatternResult.rwp: expected float",
                "format 'other/1'"):
        assert why in reasons, why
    # the refined results replaced them; taken back on the next resume without a warning
    again = _Counting()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = run_serial(plan, TOY_OPTIONS, backend=again, checkpoint_dir=tmp_path, resume=True)
    assert again.calls == [] and not marker.exists()
    _assert_same_results(res, back)


def test_checkpoints_of_other_settings_or_data_are_refined_again(tmp_path):
    ds = make_caked(n_groups=2, n_eta=4)
    plan = plan_lineouts(ds)
    run_serial(plan, TOY_OPTIONS, backend=ToyBackend(), checkpoint_dir=tmp_path)
    other = TOY_OPTIONS.replace(bkg_terms=2)
    counting = _Counting()
    with pytest.warns(UserWarning, match="8 made with other settings checkpoint"):
        res = run_serial(plan, other, backend=counting, checkpoint_dir=tmp_path, resume=True)
    assert sorted(counting.calls) == list(range(8))
    _assert_same_results(res, run_serial(plan, other, backend=ToyBackend()))
    # same settings, other data in two lineouts: exactly those two are refined again
    changed = ds.copy(deep=True)
    changed["intensity"][1, :, 2] *= 1.5
    changed["intensity"][0, 10, 0] += 1.0
    counting = _Counting()
    with pytest.warns(UserWarning, match="2 made from other data"):
        res = run_serial(plan_lineouts(changed), other, backend=counting, checkpoint_dir=tmp_path, resume=True)
    assert sorted(counting.calls) == [0, 6]
    _assert_same_results(res, run_serial(plan_lineouts(changed), other, backend=ToyBackend()))
    # a fresh run (no resume) takes none of the earlier run's files, matching or not
    fresh = _Counting()
    run_serial(plan_lineouts(changed), other, backend=fresh, checkpoint_dir=tmp_path)
    assert sorted(fresh.calls) == list(range(8))


def test_two_concurrent_runs_with_other_settings_never_mix(tmp_path):
    """Two runs write into one folder at once (no lock). Every file then holds one run's
    lineout; a resume of either takes exactly its own run's files (so between them every file is
    taken once) and gives what a clean run of its settings gives."""
    plan = plan_lineouts(make_caked(n_groups=2, n_eta=6))
    settings = {"a": TOY_OPTIONS, "b": TOY_OPTIONS.replace(bkg_terms=3)}
    shared = tmp_path / "shared"
    runs = [threading.Thread(target=run_serial, args=(plan[: 8 if key == "a" else 12], opts),
                             kwargs=dict(backend=_Counting(delay_s=0.005), checkpoint_dir=shared))
            for key, opts in settings.items()]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    refined_again = 0
    for key, opts in settings.items():
        copy = tmp_path / key
        shutil.copytree(shared, copy)
        counting = _Counting()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = run_serial(plan, opts, backend=counting, checkpoint_dir=copy, resume=True)
        _assert_same_results(res, run_serial(plan, opts, backend=ToyBackend()))
        refined_again += len(counting.calls)
    assert refined_again == 12


def test_settings_file_refuses_resume_under_other_settings_but_not_another_data_path(tmp_path):
    record_settings(tmp_path, {"bkg_terms": 6, "data_file": "/a/scan.zarr.zip"}, resume=False)
    record_settings(tmp_path, {"bkg_terms": 6, "data_file": "scan.zarr.zip"}, resume=True)  # data: by content
    with pytest.raises(Exception, match=r"settings.json: --resume: .*other bkg_terms"):
        record_settings(tmp_path, {"bkg_terms": 3, "data_file": "scan.zarr.zip"}, resume=True)


def test_a_checkpoint_names_the_run_that_wrote_it(tmp_path):
    spec = plan_lineouts(make_caked(n_groups=1, n_eta=1))[0]
    res = refine_lineout(spec, ToyBackend(), TOY_OPTIONS)
    mine = Checkpoints.create(tmp_path, "r1")
    mine.save(spec.name, res, "d1")
    assert mine.load(spec.name, "d1")[0] is not None
    assert mine.load(spec.name, "d2") == (None, ("data", str(mine.path(spec.name))))
    other_run = Checkpoints.create(tmp_path, "r1")
    assert other_run.load(spec.name, "d1") == (None, ("earlier run", str(mine.path(spec.name))))
    resumed = Checkpoints.create(tmp_path, "r1", resume=True)
    assert resumed.load(spec.name, "d1")[0].index == spec.index
    assert Checkpoints.create(tmp_path, "r2", resume=True).load(spec.name, "d1")[1][0] == "settings"
    with pytest.raises(CheckpointError):
        checkpoints.loads(tmp_path / "missing.npz")


class _DiesOnce(ToyBackend):
    """Kills its worker process the first time it reaches lineout ``at``; logs every call."""

    def __init__(self, log, at):
        super().__init__()
        self.log, self.at = str(log), at

    def refine(self, spec, options, start=None):
        with open(self.log, "a") as fh:
            fh.write(f"{spec.index}\n")
        flag = Path(self.log + ".died")
        if spec.index == self.at and not flag.exists():
            flag.touch()
            os._exit(1)
        time.sleep(0.05)
        return super().refine(spec, options, start)


@pytest.mark.slow
def test_a_dead_worker_costs_only_the_lineout_it_was_refining(tmp_path):
    """Units are collected and released as they finish and each lineout is checkpointed by its
    task: when a worker dies mid-run, nothing that had finished is refined again."""
    from midasflow.cluster import close_client, get_client

    plan = plan_lineouts(make_caked(n_groups=4, n_eta=6))
    log = tmp_path / "calls.log"
    client, _ = get_client(n_workers=2, dashboard=False)
    try:
        res = run_distributed(plan, TOY_OPTIONS, client, backend=_DiesOnce(log, at=15),
                              checkpoint_dir=tmp_path, progress=False)
    finally:
        close_client(client)
    assert [r.status for r in res] == ["ok"] * 24
    calls = [int(x) for x in log.read_text().split()]
    again = sorted(i for i in set(calls) if calls.count(i) > 1)
    assert again == [15], calls
    _assert_same_results(res, run_serial(plan, TOY_OPTIONS, backend=ToyBackend()))


# ---------------------------------------------------------------------------------------------
# the repros, through pipeline.refine (serial, in-process)
# ---------------------------------------------------------------------------------------------
class _Engine:
    """The built-in engine, counting its calls; raises KeyboardInterrupt at call ``interrupt_at``."""

    def __init__(self, interrupt_at=None):
        from midasflow.refinement import engine

        self.fn, self.calls, self.interrupt_at = engine.refine_pattern, 0, interrupt_at

    def __call__(self, *args, **kw):
        if self.interrupt_at is not None and self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        self.calls += 1
        from midasflow.refinement.recipe import Stage

        # one quick stage; the options still decide what is refined
        stage = Stage("one", (*(f"Back;{i}" for i in range(kw["bkg_terms"])), "Scale", "0::A0"), max_cycles=6)
        return self.fn(*args, **{**kw, "stages": (stage,)})


@pytest.fixture
def scan(tmp_path, monkeypatch):
    """A 6-lineout store, its CIF, and a way to run pipeline.refine with a counting engine."""
    from midasflow import pipeline
    from midasflow.crystal import write_phase_cif
    from midasflow.refinement import engine

    store, options = simulated_store(tmp_path / "scan.zarr.zip", n_groups=1, eta_bin_deg=60.0)
    cif = write_phase_cif(options.phases[0], tmp_path / "CeO2.cif")
    original = engine.refine_pattern

    def refine(data=store, interrupt_at=None, **kw):
        counting = _Engine(interrupt_at)
        counting.fn = original
        monkeypatch.setattr(engine, "refine_pattern", counting)
        # seed_from None: one engine call a lineout (no group-mean fit), so the calls count lineouts
        kw = {"out": tmp_path / "out", "export": False, "report": False, "seed_from": None, **kw}
        try:
            return pipeline.refine(data, [cif], **kw), counting.calls
        except KeyboardInterrupt:
            return None, counting.calls

    return store, refine, tmp_path / "out"


@pytest.mark.slow
def test_resume_after_an_interrupted_rerun_with_other_settings_refines_everything(scan):
    """Issue 12.1: bkg 6 to completion; a bkg 3 rerun killed right after it rewrote the
    settings; bkg 3 --resume published every bkg-6 lineout as bkg 3."""
    store, refine, out = scan
    six, n = refine(bkg_terms=6)
    assert n == 6
    _, n = refine(bkg_terms=3, interrupt_at=0)
    assert n == 0
    three, n = refine(bkg_terms=3, resume=True)
    assert n == 6
    clean, _ = refine(bkg_terms=3, out=out.with_name("clean"))
    np.testing.assert_array_equal(three.a_a.values, clean.a_a.values)
    assert not np.array_equal(three.rwp.values, six.rwp.values)
    # the same with the old checkpoints still there (another run rewrote only the settings)
    refine(bkg_terms=6)
    record_settings(out, json.loads((out.with_name("clean") / "lineouts" / "settings.json").read_text()),
                    resume=False)
    with pytest.warns(UserWarning, match="6 made with other settings"):
        again, n = refine(bkg_terms=3, resume=True)
    assert n == 6
    np.testing.assert_array_equal(again.a_a.values, clean.a_a.values)


@pytest.mark.slow
def test_resume_after_the_store_was_replaced_refines_everything(scan, monkeypatch):
    """Issue 12.2: a different scan integrated to the same path; its resume reused every old
    result. The same store by a relative and an absolute path is the same data."""
    store, refine, out = scan
    first, n = refine()
    assert n == 6
    monkeypatch.chdir(store.parent)
    _, n = refine(data=store.name, resume=True)  # relative path, same content: nothing to do
    assert n == 0
    simulated_store(store, n_groups=1, eta_bin_deg=60.0, seed=7, strain=False)
    with pytest.warns(UserWarning, match="6 made from other data"):
        second, n = refine(resume=True)
    assert n == 6
    clean, _ = refine(out=out.with_name("clean"))
    np.testing.assert_array_equal(second.a_a.values, clean.a_a.values)
    assert not np.array_equal(second.a_a.values, first.a_a.values)


def test_a_planted_pickle_checkpoint_runs_no_code(scan):
    """Issue 12.3: a planted lineouts/hist_0000.pkl ran arbitrary code on --resume."""
    store, refine, out = scan
    marker = out.parent / "code-ran"
    (out / "lineouts").mkdir(parents=True)
    for name in ("hist_0000.pkl", "hist_0000.npz"):
        (out / "lineouts" / name).write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.warns(UserWarning, match="hist_0000.npz: not a valid checkpoint"):
        res, n = refine(resume=True)
    assert n == 6 and not marker.exists() and (res.status.values == "ok").all()


@pytest.mark.slow
def test_an_interrupted_rerun_leaves_no_earlier_results_beside_new_settings(scan):
    """Issue 12.11: a rerun with other settings, interrupted, left the old results.zarr and
    summary in the folder as if they were its own."""
    store, refine, out = scan
    refine(bkg_terms=6, report=True)
    assert (out / "results.zarr").is_dir() and (out / "refinement_summary.json").is_file()
    _, n = refine(bkg_terms=3, interrupt_at=2)
    assert n == 2
    assert not (out / "results.zarr").exists() and not (out / "refinement_summary.json").exists()
    assert not (out / "report.html").exists()
    assert len(list((out / "lineouts").glob("hist_*.npz"))) == 2  # only the new run's own
