"""Lineout checkpoints: data-only files, each tied to the settings and the data it was made from.

A finished lineout is written to ``<out>/lineouts/hist_NNNN.npz`` by the task that refined it
(on its Dask worker, or in this process), the moment it finishes. The file is an uncompressed
``.npz`` of plain numeric arrays plus one ``meta`` array holding UTF-8 JSON; it is read back with
``numpy.load(allow_pickle=False)`` and rebuilt from an allow-list of types (:class:`LineoutResult`,
:class:`~midasflow.refinement.result.PatternResult`, :class:`~midasflow.crystal.Phase`,
:class:`~midasflow.crystal.Atom`, gemmi space groups by name), so nothing read back can run code.

Every checkpoint carries three stamps, and is used only when all of them match:

``refine``
    :func:`refine_digest`: SHA-256 of the options digest
    (:meth:`~midasflow.refinement.options.RefineOptions.digest`), the backend and the seeding mode.
``input``
    :func:`spec_digest`: SHA-256 of the lineout's input (its 2θ, intensity and σ arrays, index,
    ω, η, frames summed, skipped), computed on the worker from the slice it read; for a seeded
    lineout combined with its seed's input digest. The data file's name plays no part: the
    same store given by a relative and an absolute path matches, a store rewritten with other
    data under the same name does not.
``run``
    A fresh run (no ``resume``) takes only checkpoints its own tasks wrote (a task retried after
    a worker died finds the lineouts it had finished); ``resume`` takes any run's.

A file that fails to parse or validate is recomputed with a warning; a checkpoint with other
stamps is recomputed and counted. :func:`record_settings` keeps a readable copy of the settings
in ``lineouts/settings.json`` (and refuses ``resume`` under other settings); correctness does not
depend on it: the stamps inside each file decide.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import uuid
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from midasflow.errors import ParameterError
from midasflow.io.atomic import write_bytes_atomic, write_text_atomic

FORMAT = "midasflow-lineout-checkpoint/1"
SUBDIR = "lineouts"
SETTINGS_FILE = "settings.json"
#: Array dtype kinds a checkpoint may hold: bool, signed/unsigned integers, floats.
_NUMERIC_KINDS = "biuf"


class CheckpointError(ValueError):
    """A checkpoint file that does not parse or validate."""


# ---------------------------------------------------------------------------------------------
# digests
# ---------------------------------------------------------------------------------------------
def _sha256_json(value: Any) -> str:
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def spec_digest(spec: Any, seed_digest: str | None = None) -> str:
    """SHA-256 of one lineout's input: what its refinement depends on besides the settings.

    Parameters
    ----------
    spec : LineoutSpec
        Its ``index``, ``group``, ``eta_index``, ``omega_deg``, ``eta_deg``, ``frames_summed``,
        ``skipped``, ``independent_fraction``, ``noise_correlation`` and the bytes of
        ``tth_deg``, ``intensity``, ``sigma`` (as float64).
    seed_digest : str, optional
        Input digest of the result that seeds it (its start values depend on that input).
    """
    h = hashlib.sha256()
    head = [int(spec.index), int(spec.group), int(spec.eta_index), repr(float(spec.omega_deg)),
            repr(float(spec.eta_deg)), int(spec.frames_summed), bool(spec.skipped),
            repr(float(getattr(spec, "independent_fraction", 1.0))), seed_digest,
            [repr(float(c)) for c in getattr(spec, "noise_correlation", ())]]
    h.update(json.dumps(head).encode())
    for arr in (spec.tth_deg, spec.intensity, spec.sigma):
        a = np.ascontiguousarray(arr, dtype=np.float64)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def backend_identity(backend: Any) -> dict[str, Any]:
    """What identifies a backend's results: its class, and its ``settings()`` (JSON) when it has
    that method (e.g. :class:`~midasflow.refinement.backends.NativeBackend`'s recipe).

    An :class:`~midasflow.refinement.backends.ExportingBackend` is the backend it wraps (its
    exports do not change results).
    """
    from midasflow.refinement.backends import ExportingBackend

    while isinstance(backend, ExportingBackend):
        backend = backend.backend
    cls = type(backend)
    settings = getattr(backend, "settings", None)
    return {"class": f"{cls.__module__}.{cls.__qualname__}",
            "settings": settings() if callable(settings) else {}}


def refine_digest(options: Any, backend: Any, seed_from: str | None) -> str:
    """SHA-256 of how every lineout of a run is refined: the options' digest, the backend and
    the seeding mode (checkpoint format included)."""
    return _sha256_json({"format": FORMAT, "options": options.digest(),
                         "backend": backend_identity(backend), "seed_from": seed_from})


def new_run_id() -> str:
    """A fresh identifier for one execution of a plan."""
    return uuid.uuid4().hex


# ---------------------------------------------------------------------------------------------
# the data-only codec
# ---------------------------------------------------------------------------------------------
def _classes() -> dict[str, type]:
    from midasflow.crystal import Atom, Phase
    from midasflow.refinement.lineouts import LineoutResult
    from midasflow.refinement.result import PatternResult

    return {c.__name__: c for c in (LineoutResult, PatternResult, Phase, Atom)}


def _encode(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    """JSON-ready form of ``value``; numeric arrays go to ``arrays`` (referenced by key)."""
    import gemmi

    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in _NUMERIC_KINDS:
            raise TypeError(f"checkpoint: array of dtype {value.dtype} (only numbers are stored)")
        key = f"a{len(arrays)}"
        arrays[key] = value
        return {"$array": key}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, arrays) for v in value]}
    if isinstance(value, list):
        return [_encode(v, arrays) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("checkpoint: mapping with non-text keys")
        return {"$dict": {k: _encode(v, arrays) for k, v in value.items()}}
    if isinstance(value, gemmi.SpaceGroup):
        return {"$spacegroup": value.xhm()}
    if dataclasses.is_dataclass(value) and type(value).__name__ in _classes():
        return {"$object": type(value).__name__,
                "fields": {f.name: _encode(getattr(value, f.name), arrays)
                           for f in dataclasses.fields(value)}}
    raise TypeError(f"checkpoint: cannot store a {type(value).__name__}")


#: Types a field annotation's outer name allows (bool is never taken for a number).
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "float": (float, int), "int": (int,), "str": (str,), "bool": (bool,), "np.ndarray": (np.ndarray,),
    "dict": (dict,), "list": (list,), "tuple": (tuple,)}


def _is(value: Any, type_name: str) -> bool:
    allowed = _FIELD_TYPES[type_name]
    return isinstance(value, allowed) and (type_name == "bool" or not isinstance(value, bool))


def _check_fields(obj: Any) -> None:
    """Each field of a rebuilt dataclass has the type its annotation names (outer type; the
    items of ``dict[str, float]``, ``list[str]`` and ``tuple[str, ...]`` too)."""
    import gemmi

    for f in dataclasses.fields(obj):
        annotation = str(f.type).replace(" ", "")
        value = getattr(obj, f.name)
        if value is None and "None" in annotation:
            continue
        outer = annotation.split("[", 1)[0]
        if outer == "gemmi.SpaceGroup":
            ok = isinstance(value, gemmi.SpaceGroup)
        elif outer in _FIELD_TYPES:
            ok = _is(value, outer)
            items = {"dict[str,float]": (lambda v: v.values(), "float"),
                     "list[str]": (lambda v: v, "str"),
                     "tuple[str,...]": (lambda v: v, "str")}.get(annotation)
            if ok and items is not None:
                ok = all(_is(item, items[1]) for item in items[0](value))
        else:
            continue
        if not ok:
            raise CheckpointError(f"{type(obj).__name__}.{f.name}: expected {annotation}, "
                                  f"got {type(value).__name__}")


def _decode(node: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    import gemmi

    if node is None or isinstance(node, (bool, str, int, float)):
        return node
    if isinstance(node, list):
        return [_decode(v, arrays) for v in node]
    if not isinstance(node, dict) or len(node) not in (1, 2):
        raise CheckpointError(f"unexpected JSON node {str(node)[:60]!r}")
    if set(node) == {"$array"}:
        try:
            return arrays[node["$array"]]
        except (KeyError, TypeError):
            raise CheckpointError(f"missing array {node['$array']!r}") from None
    if set(node) == {"$tuple"} and isinstance(node["$tuple"], list):
        return tuple(_decode(v, arrays) for v in node["$tuple"])
    if set(node) == {"$dict"} and isinstance(node["$dict"], dict):
        return {str(k): _decode(v, arrays) for k, v in node["$dict"].items()}
    if set(node) == {"$spacegroup"} and isinstance(node["$spacegroup"], str):
        try:
            return gemmi.SpaceGroup(node["$spacegroup"])
        except (ValueError, RuntimeError):
            raise CheckpointError(f"unknown space group {node['$spacegroup']!r}") from None
    if set(node) == {"$object", "fields"} and isinstance(node["fields"], dict):
        cls = _classes().get(node["$object"])
        if cls is None:
            raise CheckpointError(f"type {node['$object']!r} is not allowed")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(node["fields"]) - names
        if unknown:
            raise CheckpointError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
        try:
            obj = cls(**{k: _decode(v, arrays) for k, v in node["fields"].items()})
        except TypeError as exc:
            raise CheckpointError(f"{cls.__name__}: {exc}") from None
        _check_fields(obj)
        return obj
    raise CheckpointError(f"unexpected JSON node {str(node)[:60]!r}")


def dumps(result: Any, stamps: Mapping[str, str]) -> bytes:
    """The checkpoint file of ``result`` (a LineoutResult) with its ``stamps``, as bytes."""
    arrays: dict[str, np.ndarray] = {}
    meta = {"format": FORMAT, **stamps, "result": _encode(result, arrays)}
    text = json.dumps(meta, allow_nan=True).encode()
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(text, dtype=np.uint8), **arrays)
    return buf.getvalue()


def loads(path: str | os.PathLike) -> tuple[dict[str, Any], Any]:
    """Read a checkpoint file: ``(stamps, LineoutResult)``.

    Raises
    ------
    CheckpointError
        The file is not a checkpoint of this format or does not validate (object arrays, unknown
        types or fields, wrong field types, missing arrays).
    """
    from midasflow.refinement.lineouts import LineoutResult

    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"not a data-only .npz ({type(exc).__name__}: {exc})") from None
    raw = arrays.pop("meta", None)
    if raw is None or raw.dtype != np.uint8 or raw.ndim != 1:
        raise CheckpointError("no 'meta' record")
    try:
        meta = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"meta is not JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                              f"expected {FORMAT!r}")
    bad = [k for k, a in arrays.items() if a.dtype.kind not in _NUMERIC_KINDS]
    if bad:
        raise CheckpointError(f"array {bad[0]!r} is not numeric")
    result = _decode(meta.get("result"), arrays)
    if not isinstance(result, LineoutResult):
        raise CheckpointError("does not hold a lineout result")
    stamps = {k: meta.get(k) for k in ("refine", "input", "run")}
    return stamps, result


# ---------------------------------------------------------------------------------------------
# one run's checkpoints
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checkpoints:
    """Where one run keeps its finished lineouts, and which files it may take back.

    Picklable (plain strings): it travels with every task, which reads and writes its own
    lineouts' files.

    Attributes
    ----------
    folder : str
        ``<out>/lineouts`` (absolute; on a cluster, a folder every worker can reach).
    refine : str
        :func:`refine_digest` of the run.
    run : str
        This run's identifier (:func:`new_run_id`).
    resume : bool
        Take matching checkpoints of earlier runs too.
    """

    folder: str
    refine: str
    run: str
    resume: bool = False

    @classmethod
    def create(cls, out: str | os.PathLike, refine: str, *, resume: bool = False) -> Checkpoints:
        """Checkpoints of a new run under ``<out>/lineouts``."""
        return cls(str(Path(out, SUBDIR).resolve()), refine, new_run_id(), bool(resume))

    def path(self, name: str) -> Path:
        """``<folder>/<name>.npz`` (``name`` = ``hist_NNNN``, ``lineout_gGGGG_eEEEE`` or
        ``seed_group_GGGG``)."""
        return Path(self.folder) / f"{name}.npz"

    def load(self, name: str, input_digest: str) -> tuple[Any, tuple[str, str] | None]:
        """The checkpointed result ``name`` if it may be used, and why not otherwise.

        Returns
        -------
        (LineoutResult or None, note or None)
            ``note`` = (kind, text): kind "invalid" (the file does not parse or validate;
            ``text`` says why), "settings" (made with other settings), "data" (made from other
            data) or "earlier run" (a matching file of another run, without ``resume``).
        """
        path = self.path(name)
        if not path.is_file():
            return None, None
        try:
            stamps, result = loads(path)
        except CheckpointError as exc:
            return None, ("invalid", f"{path}: not a valid checkpoint ({exc}); refined again")
        if stamps["refine"] != self.refine:
            return None, ("settings", str(path))
        if stamps["input"] != input_digest:
            return None, ("data", str(path))
        if not self.resume and stamps["run"] != self.run:
            return None, ("earlier run", str(path))
        return result, None

    def save(self, name: str, result: Any, input_digest: str) -> Path:
        """Write ``result`` atomically with this run's stamps."""
        data = dumps(result, {"refine": self.refine, "input": input_digest, "run": self.run})
        return write_bytes_atomic(self.path(name), data)


def clear_checkpoints(out: str | os.PathLike) -> int:
    """Delete the checkpoint files under ``<out>/lineouts`` (current and earlier formats, e.g. the
    ``.pkl`` files of older versions, which are never read); return how many."""
    folder = Path(out) / SUBDIR
    n = 0
    for pattern in ("hist_*.npz", "lineout_*.npz", "seed_*.npz", "hist_*.pkl"):
        for path in folder.glob(pattern):
            path.unlink(missing_ok=True)
            n += 1
    return n


def record_settings(out: str | os.PathLike, settings: Mapping[str, Any], *, resume: bool) -> Path:
    """Keep a readable copy of a run's settings; refuse ``resume`` under other settings.

    ``settings`` (JSON-serialisable: phases, instrument, recipe options, backend, seeding) is
    written to ``<out>/lineouts/settings.json``. With ``resume``, an existing file with other
    settings raises :class:`ParameterError` naming them. Keys starting with ``"data"`` are
    recorded but not compared: the data are compared by content, inside every checkpoint.
    """
    path = Path(out) / SUBDIR / SETTINGS_FILE
    current = json.loads(json.dumps(dict(settings), sort_keys=True, default=str))
    if resume and path.is_file():
        try:
            before = json.loads(path.read_text())
        except (OSError, ValueError):
            before = None
        if isinstance(before, dict):
            keys = {k for k in set(before) | set(current) if not k.startswith("data")}
            changed = sorted(k for k in keys if before.get(k) != current.get(k))
            if changed:
                raise ParameterError(
                    f"{path}: --resume: the finished lineouts were refined with other "
                    f"{', '.join(changed)}; run without --resume or choose another output folder")
    return write_text_atomic(path, json.dumps(current, indent=1, sort_keys=True))
