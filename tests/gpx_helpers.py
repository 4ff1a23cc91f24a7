"""Refined lineouts of the simulator's caked scans, and a reader of ``.gpx`` files for the tests.

midasflow never reads a ``.gpx``; the tests do, to check what was written, through an Unpickler
that builds nothing but builtins and numpy arrays.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

#: Everything a project written by midasflow may ask the unpickler to build (protocol 2: numpy
#: arrays are rebuilt from their dtype and bytes, the bytes through ``_codecs.encode``).
ALLOWED_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
    ("_codecs", "encode"),
})


class _NumpyOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a .gpx")
        return super().find_class(module, name)


def read_gpx(path: str | Path) -> list[list]:
    """The tree items of a ``.gpx``: one ``[[name, data], [child, data], ...]`` list per pickle."""
    blob = Path(path).read_bytes()
    stream, items = io.BytesIO(blob), []
    while stream.tell() < len(blob):
        items.append(_NumpyOnly(stream).load())
    return items


def tree(path: str | Path) -> dict[str, dict[str, object]]:
    """``{item name: {child name (item name for the item itself): data}}`` of a ``.gpx``."""
    return {item[0][0]: {name: data for name, data in item} for item in read_gpx(path)}


def refined_lineout(phase, *, mode: str = "rietveld", refine_atoms: bool = False, seed: int = 1,
                    precision: str = "float32"):
    """One lineout of a simulated caked scan of ``phase`` (:func:`midasflow.simulate.simulate_caked`),
    refined by the native engine: (spec, pattern, instrument). By default in GSAS-II's float32
    arithmetic, so GSAS-II computes a Le Bail project's Rwp as ours to 1e-6 (a float64 minimum
    evaluated in GSAS-II's float32 differs by ~1e-4)."""
    from midasflow.refinement.backends import NativeBackend
    from midasflow.refinement.lineouts import plan_lineouts
    from midasflow.refinement.options import RefineOptions
    from midasflow.simulate import ceo2_params, simulate_caked

    params = ceo2_params((256, 256), eta_bin_deg=90.0)
    ds, _ = simulate_caked(params, phase, n_groups=1, seed=seed)
    spec = next(s for s in plan_lineouts(ds) if not s.skipped)
    options = RefineOptions(phases=(phase,), instrument=params.instrument,
                            refine_atoms=refine_atoms, mode=mode, precision=precision)
    pattern = NativeBackend().refine(spec, options)
    assert pattern.status == "ok", pattern.message
    return spec, pattern, params.instrument
