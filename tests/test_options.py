"""RefineOptions: frozen, typed, JSON settings and a digest that is stable and complete."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys

import pytest

from midasflow.crystal import cubic_phase
from midasflow.errors import ParameterError
from midasflow.instrument import Instrument
from midasflow.refinement.options import BACKENDS, MODES, SEED_MODES, RefineOptions


def _options(**changes) -> RefineOptions:
    base = RefineOptions(phases=(cubic_phase("CeO2", 5.411),), instrument=Instrument(lam=0.172979, U=2.0),
                         bkg_terms=6, limits=(2.0, 9.5))
    return base.replace(**changes) if changes else base


_DIGEST_SCRIPT = """
from midasflow.crystal import cubic_phase
from midasflow.instrument import Instrument
from midasflow.refinement.options import RefineOptions
print(RefineOptions(phases=(cubic_phase("CeO2", 5.411),), instrument=Instrument(lam=0.172979, U=2.0),
                    bkg_terms=6, limits=(2.0, 9.5)).digest())
"""


def test_frozen_and_the_vocabularies():
    opts = _options()
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.bkg_terms = 3
    assert MODES == ("rietveld", "lebail") and BACKENDS == ("native", "gsas2")
    assert SEED_MODES == (None, "neighbour", "group")
    with pytest.raises(ParameterError, match="--mode 'rietvelt': expected one of rietveld, lebail"):
        _options(mode="rietvelt")


def test_recipe_kwargs_are_the_recipe_fields_only():
    assert _options().recipe_kwargs() == {"bkg_terms": 6, "limits": (2.0, 9.5), "refine_atoms": True,
                                          "mode": "rietveld", "estimate": True, "physical_profile": False}
    assert "max_rwp" not in _options(max_rwp=20.0).recipe_kwargs()  # applied by the executors


def test_digest_is_stable_across_processes_and_pickling():
    opts = _options()
    assert pickle.loads(pickle.dumps(opts)).digest() == opts.digest()
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # another hash seed: set/dict order may differ
    out = subprocess.run([sys.executable, "-c", _DIGEST_SCRIPT], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.strip() == opts.digest()


@pytest.mark.parametrize("change", [
    dict(bkg_terms=5), dict(limits=(2.0, 9.6)), dict(limits=None), dict(refine_atoms=False), dict(mode="lebail"),
    dict(estimate=False), dict(physical_profile=True), dict(max_rwp=25.0), dict(precision="float32"),
    dict(warm_start=True), dict(warm_start=False),
    dict(instrument=Instrument(lam=0.172979, U=2.0000001)), dict(instrument=Instrument(lam=0.17298, U=2.0)),
    dict(phases=(cubic_phase("CeO2", 5.4111),)), dict(phases=(cubic_phase("CeO2", 5.411, "F d -3 m"),)),
])
def test_digest_sees_every_option(change):
    assert _options(**change).digest() != _options().digest()


def test_settings_are_json_with_the_phase_in_full():
    settings = json.loads(json.dumps(_options().settings()))
    phase = settings["phases"][0]
    assert phase["name"] == "CeO2" and phase["cell"] == [5.411] * 3 + [90.0] * 3
    assert phase["space_group"] == "F m -3 m" and phase["laue"] == "m3m"
    assert [a[:2] for a in phase["atoms"]] == [[a.label, a.element] for a in _options().phases[0].atoms]
    assert settings["instrument"]["U"] == 2.0 and settings["instrument"]["Lam"] == 0.172979
    assert settings["limits"] == [2.0, 9.5] and settings["mode"] == "rietveld"


@pytest.mark.parametrize("changes, message", [
    (dict(bkg_terms=0), r"--bkg-terms 0: expected 1 to 36"),
    (dict(bkg_terms=-3), r"--bkg-terms -3: expected 1 to 36"),
    (dict(bkg_terms=37), r"--bkg-terms 37: expected 1 to 36"),
    (dict(limits=(8.0, 2.0)), r"--limits 8 2: expected 0 <= LOW < HIGH <= 180"),
    (dict(limits=(5.0, 5.0)), r"--limits 5 5: expected 0 <= LOW < HIGH"),
    (dict(limits=(-1.0, 5.0)), r"--limits -1 5: expected 0 <= LOW"),
    (dict(limits=(1.0, float("nan"))), r"--limits 1.0 nan: expected two finite 2θ values"),
])
def test_options_no_lineout_could_use_are_refused(changes, message):
    with pytest.raises(ParameterError, match=message):
        _options(**changes)


def test_options_are_checked_against_the_data():
    import numpy as np

    tth = [np.linspace(1.0, 11.0, 400), np.linspace(1.0, 11.0, 300)]
    _options(limits=(2.0, 9.5)).check_against(tth, min_points=20)  # fine
    _options(limits=None).check_against(tth, min_points=20)
    with pytest.raises(ParameterError, match=r"--limits 50 60: the data cover 2θ 1 to 11 deg and no lineout "
                                             r"has more than 20 points inside the limits \(it has at most 0\)"):
        _options(limits=(50.0, 60.0)).check_against(tth, min_points=20)
    with pytest.raises(ParameterError, match=r"at most 16\)"):  # 10.6..11: 16 of the 400 points
        _options(limits=(10.6, 11.5)).check_against(tth, min_points=20)
    with pytest.raises(ParameterError, match=r"--bkg-terms 30: no lineout has more points than that \(at most 28\)"):
        _options(limits=(10.3, 11.0), bkg_terms=30).check_against(tth, min_points=20)
    _options(limits=(50.0, 60.0)).check_against([np.empty(0)], min_points=20)  # all skipped: the run says so


@pytest.mark.parametrize("bad", [0, -3.0, float("nan"), float("inf"), "abc"])
def test_max_rwp_must_be_a_positive_percentage(bad):
    with pytest.raises(ParameterError, match=r"--max-rwp .*: expected a positive Rwp in percent"):
        _options(max_rwp=bad)


def test_precision_is_checked_and_reaches_the_native_engine(monkeypatch):
    """``precision`` (``--precision``): float64 by default, float32 (GSAS-II's) on request, anything
    else refused with the flag named; the native backend passes it to ``refine_pattern``."""
    import numpy as np

    from midasflow.refinement import engine
    from midasflow.refinement.backends import NativeBackend
    from midasflow.refinement.lineouts import LineoutSpec

    assert _options().precision == "float64"
    with pytest.raises(ParameterError, match="--precision float16: expected one of float64, float32"):
        _options(precision="float16")
    seen = {}
    monkeypatch.setattr(engine, "refine_pattern", lambda *a, **kw: seen.update(kw))
    x = np.linspace(2.0, 9.5, 50)
    spec = LineoutSpec(index=0, group=0, eta_index=0, omega_deg=0.0, eta_deg=0.0, tth_deg=x,
                       intensity=np.ones(50), sigma=np.ones(50), frames_summed=1, skipped=False)
    NativeBackend().refine(spec, _options(precision="float32"))
    assert seen["precision"] == "float32"


def test_warm_starts_follow_the_precision_unless_asked():
    """``warm_start`` None (default): warm starts in float64 only (where they are measured equal to
    the full recipe within 0.1 esd), never with a texture stage or in Le Bail mode (not measured);
    True/False decide otherwise."""
    assert _options().warm_starts() and not _options(precision="float32").warm_starts()
    assert _options(precision="float32", warm_start=True).warm_starts()
    assert not _options(precision="float64", warm_start=False).warm_starts()
    assert not _options(precision="float64", texture="md").warm_starts()
    assert not _options(precision="float64", mode="lebail").warm_starts()
    with pytest.raises(ParameterError, match="warm_start 'yes': expected True, False or None"):
        _options(warm_start="yes")
