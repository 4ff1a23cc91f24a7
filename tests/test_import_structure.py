"""Kernels in their own room: importing a kernel module loads neither dask, distributed nor xarray,
and the refinement engine loads no file-format module (docs/architecture.md, "Layers")."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

#: The pure numpy/numba/scipy modules: geometry, bin-map kernel, caking kernel, profile, engine
#: core, strain (and what they stand on).
KERNELS = ("midasflow.geometry", "midasflow.binmap", "midasflow.caking_kernel", "midasflow.profile",
           "midasflow.profile_compiled", "midasflow.refinement.engine", "midasflow.strain",
           "midasflow.crystal", "midasflow.instrument",
           "midasflow.params")
HEAVY = ("dask", "distributed", "xarray")

_PROBE = """
import importlib, json, sys
heavy, loaded = {heavy!r}, {{}}
for name in {kernels!r}:
    importlib.import_module(name)
    loaded[name] = sorted(m for m in sys.modules if m.split(".")[0] in heavy or m.startswith("midasflow.io."))
print(json.dumps(loaded))
"""


@pytest.fixture(scope="module")
def loaded() -> dict[str, list[str]]:
    """Import the kernels one after another in a fresh interpreter; what is loaded after each."""
    code = _PROBE.format(heavy=HEAVY, kernels=KERNELS)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_kernels_load_no_dask_distributed_or_xarray(loaded):
    assert list(loaded) == list(KERNELS)
    for name, modules in loaded.items():  # cumulative: the first offender is named
        heavy = [m for m in modules if m.split(".")[0] in HEAVY]
        assert heavy == [], f"importing {name} loads {heavy}"


def test_the_engine_loads_no_file_format_module(loaded):
    io_modules = loaded["midasflow.refinement.engine"]
    # the atomic-write helper (CIF and CSV exports) is the only io module below the engine
    assert set(io_modules) <= {"midasflow.io.atomic"}, io_modules
