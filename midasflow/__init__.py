"""midasflow: far-field powder diffraction from raw frames to refined lattice parameters on Dask.

The public API is imported lazily so that ``import midasflow`` stays cheap and a missing optional
dependency only matters when its feature is used.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "read_params": "midasflow.params",
    "Params": "midasflow.params",
    "open_frames": "midasflow.io.frames",
    "ScanSource": "midasflow.io.frames",
    "Instrument": "midasflow.instrument",
    "cake": "midasflow.caking",
    "open_caked": "midasflow.io.caked_store",
    "write_midas_zarr": "midasflow.io.midas_zarr",
    "refine_pattern": "midasflow.refinement.engine",
    "read_phase": "midasflow.crystal",
    "read_phases": "midasflow.crystal",
    "read_instprm": "midasflow.io.instprm",
    "refine": "midasflow.pipeline",
    "run": "midasflow.pipeline",
    "integrate": "midasflow.pipeline",
    "run_refinement": "midasflow.compat",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'midasflow' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
