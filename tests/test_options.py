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
    assert SEED_MODES == (None, "neighbour")
    with pytest.raises(ParameterError, match="--mode 'rietvelt': expected one of rietveld, lebail"):
        _options(mode="rietvelt")


def test_recipe_kwargs_are_the_recipe_fields_only():
    assert _options().recipe_kwargs() == {"bkg_terms": 6, "limits": (2.0, 9.5), "refine_atoms": False,
                                          "mode": "rietveld"}


def test_digest_is_stable_across_processes_and_pickling():
    opts = _options()
    assert pickle.loads(pickle.dumps(opts)).digest() == opts.digest()
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # another hash seed: set/dict order may differ
    out = subprocess.run([sys.executable, "-c", _DIGEST_SCRIPT], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.strip() == opts.digest()


@pytest.mark.parametrize("change", [
    dict(bkg_terms=5), dict(limits=(2.0, 9.6)), dict(limits=None), dict(refine_atoms=True), dict(mode="lebail"),
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
