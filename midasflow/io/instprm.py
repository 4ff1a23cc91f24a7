"""GSAS-II ``.instprm`` files, and the instrument terms of a MIDAS caked store.

The :class:`~midasflow.instrument.Instrument` record, the MIDAS <-> GSAS-II name table and the
defaults live in :mod:`midasflow.instrument`; this module reads and writes files
(docs/gsas2.md §R1, after GSAS-II's ``GSASIIfiles.ReadInstprm`` / ``WriteInstprm``;
docs/reference/midas_zarr_layout.md §5 for the importer's rules).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from midasflow.errors import CakeFileError, InstprmError
from midasflow.instrument import (
    FIELDS,
    GSAS_DEFAULT_RADIUS_MM,
    SAMPLE_FIELDS,
    SAMPLE_ONLY,
    STRING_KEYS,
    Instrument,
    importer_values,
)
from midasflow.io.atomic import write_text_atomic

HEADER = "#GSAS-II instrument parameter file; do not add/delete items!"

#: Keys a complete single-wavelength / doublet file must provide (Z, Azimuth, Bank optional).
_REQUIRED = ("Type", "Zero", "Polariz.", "U", "V", "W", "X", "Y", "SH/L")
#: Profile terms that are squares of widths: a negative value is almost always a mistake (the
#: Gaussian variance U·tan²θ + V·tanθ + W then goes negative at low or high angle).
_NON_NEGATIVE = ("U", "W")


# --------------------------------------------------------------------------------------------
# .instprm
# --------------------------------------------------------------------------------------------
def _bank_of(header: str, path: Path, lineno: int) -> int:
    try:
        return int(header.split(":")[0].split()[1])
    except (IndexError, ValueError):
        raise InstprmError(f"{path}: line {lineno}: expected a bank header '#Bank <n>: ...', "
                           f"got {header.strip()!r}") from None


def _parse(path: Path, bank: int | None) -> dict[str, float | str]:
    """Key/value pairs of one bank of an .instprm, GSAS-II ``ReadInstprm`` rules (docs/gsas2.md §R1)."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise InstprmError(f"{path}: cannot read instrument parameter file ({exc.strerror})") \
            from None
    if not lines or "GSAS-II" not in lines[0]:
        got = lines[0].strip() if lines else "an empty file"
        raise InstprmError(f"{path}: line 1: expected a header containing 'GSAS-II' "
                           f"(e.g. '{HEADER}'), got {got!r}")
    banks = {_bank_of(s, path, n) for n, s in enumerate(lines, 1)
             if s.startswith("#") and "Bank" in s}
    if bank is None:
        bank = min(banks) if banks else 1
    elif banks and bank not in banks:
        raise InstprmError(f"{path}: bank {bank} not found (banks: "
                           f"{', '.join(map(str, sorted(banks)))})")
    values: dict[str, float | str] = {}
    line_of: dict[str, int] = {}
    in_bank = not banks
    for lineno, raw in enumerate(lines, 1):
        if raw.startswith("#"):
            if "Bank" in raw:
                in_bank = _bank_of(raw, path, lineno) == bank
            continue
        if not in_bank or not raw.strip():
            continue
        for item in raw.split(";"):
            if not item.strip():
                continue
            if ":" not in item:
                raise InstprmError(f"{path}: line {lineno}: expected 'key:value', got "
                                   f"{item.strip()!r}")
            key, value = item.split(":", 1)
            key = key.replace(" ", "")
            key = "Gonio. radius" if key == "Gonio.radius" else key
            value = value.strip() if key == "InstrName" else value.replace(" ", "")
            if key in STRING_KEYS:
                values[key] = value
                continue
            line_of[key] = lineno
            try:
                values[key] = float(value)
            except ValueError:
                if key in FIELDS or key in SAMPLE_FIELDS:
                    raise InstprmError(f"{path}: line {lineno}: key {key!r}: expected a number, "
                                       f"got {value!r}") from None
                values[key] = value
    _warn_negative_widths(values, line_of, path)
    return values


def _warn_negative_widths(values: dict[str, float | str], line_of: dict[str, int], path: Path) -> None:
    """Warn about a negative U or W (Gaussian width terms, centideg²), naming file, line and key."""
    for key in _NON_NEGATIVE:
        value = values.get(key)
        if isinstance(value, float) and value < 0:
            warnings.warn(f"{path}: line {line_of[key]}: key {key} = {value:g} is negative; expected "
                          f"U, W >= 0 (the Gaussian variance U·tan²θ + V·tanθ + W must stay "
                          "positive); refining from it anyway", UserWarning, stacklevel=3)


def read_instprm(path: str | os.PathLike, bank: int | None = None) -> Instrument:
    """Read a GSAS-II ``.instprm`` file (docs/gsas2.md §R1).

    The first line must contain "GSAS-II"; then ``key:value`` items, one per line or several
    separated by ``;`` (spaces are removed, except inside InstrName). With ``#Bank n:`` headers the
    lowest bank (or ``bank``) is read. Required: Type, Lam (or Lam1, Lam2, I(L2)/I(L1)), Zero,
    Polariz., U, V, W, X, Y, SH/L; Z, Azimuth and Bank default to 0, 0, 1. Without Diff-type a
    single-wavelength file is Debye–Scherrer and a doublet Bragg–Brentano; without Gonio. radius
    R = 200 mm (GSAS-II's sample default).

    Raises
    ------
    InstprmError
        Naming the file, line and what was expected.
    """
    p = Path(path)
    values = _parse(p, bank)
    missing = [k for k in _REQUIRED if k not in values]
    if "Lam" not in values and not {"Lam1", "Lam2", "I(L2)/I(L1)"} <= values.keys():
        missing.insert(1, "Lam")
    if missing:
        raise InstprmError(f"{p}: missing required key(s) {', '.join(missing)} (expected "
                           "'key:value' lines; Lam or Lam1/Lam2/I(L2)/I(L1) for the wavelength)")
    values.setdefault("Gonio. radius", GSAS_DEFAULT_RADIUS_MM)
    return Instrument.from_dict(values, source=str(p))


def _format(value: float | str) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def write_instprm(inst: Instrument, path: str | os.PathLike) -> Path:
    """Write ``inst`` as a GSAS-II ``.instprm`` (atomic); :func:`read_instprm` reads it back equal.

    Writes ``key:value`` for every instrument key, the extra keys, then Diff-type,
    Gonio. radius and InstrName (as GSAS-II's ``WriteInstprm``); the sample displacements are
    sample parameters GSAS-II never reads from an ``.instprm`` and are left out.
    """
    items = [f"{k}:{_format(v)}" for k, v in inst.to_dict().items() if k not in SAMPLE_ONLY]
    text = "\n".join([HEADER] + items) + "\n"
    return write_text_atomic(path, text)




# --------------------------------------------------------------------------------------------
# the instrument terms of a MIDAS caked store
# --------------------------------------------------------------------------------------------
def instrument_from_midas(source: Any, *, store: str | os.PathLike | None = None) -> Instrument:
    """Instrument parameters of a MIDAS caked store, as GSAS-II's MIDAS importer builds them.

    Parameters
    ----------
    source : path or xarray.Dataset
        A MIDAS ``.zarr.zip`` (only its ``InstrumentParameters`` group is read: 'Polariz' →
        'Polariz.', 'SH_L' → 'SH/L', other GSAS-II names as they are, 'Distance' µm → Gonio.
        radius mm), or a caked Dataset whose ``attrs['instrument']`` is a JSON dict with GSAS-II
        names (what :func:`midasflow.cake` and :func:`midasflow.open_caked` produce; 'Distance' in
        µm), from which nothing is read again.
    store : path, optional
        With a Dataset: the store it was opened from, so that store's sibling ``.instprm``
        applies as it does for a path.

    Returns
    -------
    Instrument
        Missing values take the importer's defaults (Lam 0.413263, Polariz. 0.99, SH/L 0.002,
        U/V/W 1.163/−0.126/0.063, X = Y = Z = Zero = 0, R = 1000 mm). A sibling
        ``<root>.instprm`` of the store (``os.path.splitext``: ``x.zarr.zip`` →
        ``x.zarr.instprm``) overrides or extends the values, and so does ``x.instprm`` (the MIDAS
        manual's "same base name"; :func:`sibling_files`: GSAS-II's own file wins), except
        Gonio. radius, which GSAS-II always takes from Distance. A ``.samprm`` beside the store
        (:func:`read_sample_parameters`) sets Type (Diff-type), InstrName and the sample
        displacements DisplaceX/DisplaceY. The per-lineout Azimuth (90 − η̄) and Bank (azimuth
        index) are not set here.

    Raises
    ------
    CakeFileError
        The file is missing, not a zip, has no ``InstrumentParameters``, or the Dataset's
        ``attrs['instrument']`` is not a JSON object.
    """
    if isinstance(source, (str, os.PathLike)):
        from midasflow.io.midas_zarr import read_instrument_parameters

        store = Path(source)
        values = read_instrument_parameters(store)
    else:
        attrs = getattr(source, "attrs", None)
        if attrs is None:
            raise TypeError(f"expected a path or an xarray Dataset, got {type(source).__name__}")
        raw = attrs.get("instrument")
        try:
            values = {} if raw is None else json.loads(raw) if isinstance(raw, str) else dict(raw)
        except (json.JSONDecodeError, TypeError, ValueError):
            values = None
        if not isinstance(values, dict):
            raise CakeFileError("dataset attrs['instrument']: expected a JSON object of GSAS-II "
                                f"instrument keys, got {str(raw)[:60]!r}") from None
    inst = importer_values(values)
    sources = [str(store) if store is not None else "dataset"]
    if store is not None:
        for sibling in sibling_files(store, ".instprm"):
            override = _parse(sibling, None)
            override.pop("Gonio. radius", None)  # GSAS-II's importer takes R from Distance
            if "Lam1" in override:
                inst.pop("Lam", None)
            if "Lam" in override:
                for key in ("Lam1", "Lam2", "I(L2)/I(L1)"):
                    inst.pop(key, None)
            inst.update(override)
            sources.append(str(sibling))
    result = Instrument.from_dict(inst, source=" + ".join(sources))
    return result if store is None else with_sample_parameters(result, store)


def with_sample_parameters(inst: Instrument, store: str | os.PathLike) -> Instrument:
    """``inst`` with the sample parameters of the ``.samprm`` beside ``store`` applied
    (:func:`read_sample_parameters`; :data:`SAMPLE_TERMS`), whatever the instrument came from."""
    sample = read_sample_parameters(store)
    values = {inst_key: sample[key] for key, inst_key in SAMPLE_TERMS.items() if key in sample}
    if not values:
        return inst
    merged = Instrument.from_dict({**inst.to_dict(), **values}, source=inst.source)
    return merged


def sibling_files(store: str | os.PathLike, suffix: str) -> list[Path]:
    """The files beside a caked store that share its base name, in the order they apply.

    For ``x.zarr.zip``: ``x<suffix>`` (the MIDAS manual's "same base name"), then
    ``x.zarr<suffix>`` (what GSAS-II's MIDAS importer reads, ``os.path.splitext``), which wins.
    Only existing files are returned; when both exist a warning says which one wins.
    """
    store = Path(store)
    gsas = Path(os.path.splitext(store)[0] + suffix)
    name = store.name
    base = name[: -len(".zarr.zip")] if name.endswith(".zarr.zip") else os.path.splitext(name)[0]
    manual = store.with_name(base + suffix)
    found = [path for path in dict.fromkeys([manual, gsas]) if path.is_file()]
    if len(found) == 2:
        warnings.warn(f"{manual} and {gsas} both lie beside {store}: both apply, {gsas.name} (GSAS-II's "
                      f"own) over {manual.name} where they set the same key", UserWarning, stacklevel=3)
    return found


def read_sibling_files(store: str | os.PathLike, *, instprm_given: bool = False) -> list[Path]:
    """Read (and so check) the GSAS-II files beside ``store`` that a refinement of it applies, without
    opening the store: its ``.instprm`` files (:func:`sibling_files`) unless ``instprm_given``
    (``-i`` names one), then its ``.samprm`` files. Returns them in the order they apply.

    Raises
    ------
    InstprmError
        A file that cannot be read or parsed, naming the file and line.
    """
    found = [] if instprm_given else sibling_files(store, ".instprm")
    for path in found:
        _parse(path, None)
    samples = sibling_files(store, ".samprm")
    if samples:
        read_sample_parameters(store)
    return found + samples


# --------------------------------------------------------------------------------------------
# .samprm (GSAS-II sample parameters beside a store)
# --------------------------------------------------------------------------------------------
#: Sample parameters midasflow applies: ``.samprm`` key -> the :class:`Instrument` key it sets.
#: ``Type`` (Debye-Scherrer / Bragg-Brentano) and ``InstrName`` are recorded; DisplaceX/DisplaceY
#: (µm) are the sample displacements the peak positions start from (held unless a stage refines
#: them).
SAMPLE_TERMS = {"Type": "Diff-type", "InstrName": "InstrName", "DisplaceX": "DisplaceX",
                "DisplaceY": "DisplaceY"}
#: Sample parameters that are bookkeeping (no effect on the calculated pattern), kept as read.
SAMPLE_RECORDED = ("Temperature", "Pressure", "Time", "FreePrm1", "FreePrm2", "FreePrm3", "Omega",
                   "Chi", "Phi", "Azimuth", "Scale", "Materials", "Thick", "Contrast", "Trans")
#: Sample parameters that change the pattern but that the refinement does not model, with the
#: value that changes nothing.
SAMPLE_NOT_MODELLED = {"Absorption": 0.0, "Shift": 0.0, "Transparency": 0.0, "SurfRoughA": 0.0,
                       "SurfRoughB": 0.0, "SlitLen": 0.0}


def read_samprm(path: str | os.PathLike) -> dict[str, Any]:
    """Read a GSAS-II ``.samprm`` file as GSAS-II's MIDAS importer does, without ``eval``.

    Lines whose first non-blank character is ``#`` are comments, blank lines are skipped; every
    other line is ``'key':value`` (quotes around the key optional) with one colon, and the value
    a Python literal (number, string, list such as ``[0.5, False]``) read with
    :func:`ast.literal_eval`. A ``[value, refine]`` list gives its value.

    Raises
    ------
    InstprmError
        Naming the file and line: no colon, several colons, or a value that is not a literal.
    """
    import ast

    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise InstprmError(f"{p}: cannot read sample parameter file ({exc.strerror})") from None
    values: dict[str, Any] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or line.strip().startswith("#"):  # the importer: S.strip().startswith('#')
            continue
        parts = line.split(":")
        if len(parts) != 2:
            raise InstprmError(f"{p}: line {lineno}: expected one 'key':value pair, got {line.strip()!r}")
        key = parts[0].strip().strip("'").strip('"')
        try:
            value = ast.literal_eval(parts[1].strip())
        except (ValueError, SyntaxError):
            raise InstprmError(f"{p}: line {lineno}: key {key!r}: expected a number, a quoted string or "
                               f"a [value, refine] list, got {parts[1].strip()!r}") from None
        if isinstance(value, (list, tuple)) and value and key not in ("Materials", "Contrast"):
            value = value[0]
        values[key] = value
    return values


def read_sample_parameters(store: str | os.PathLike) -> dict[str, Any]:
    """The sample parameters of the ``.samprm`` files beside a caked store (:func:`sibling_files`:
    ``x.samprm`` then ``x.zarr.samprm``), as GSAS-II's importer reads them.

    ``Gonio. radius`` is dropped with a warning (the importer takes it from the store's
    Distance); a term the refinement does not model (:data:`SAMPLE_NOT_MODELLED`) at a value that
    changes the pattern, and keys GSAS-II does not know, warn naming the file.
    """
    values: dict[str, Any] = {}
    for path in sibling_files(store, ".samprm"):
        read = read_samprm(path)
        if "Gonio. radius" in read:
            warnings.warn(f"{path}: 'Gonio. radius' ignored: the goniometer radius is the store's "
                          "Distance, as GSAS-II's MIDAS importer sets it", UserWarning, stacklevel=3)
            read.pop("Gonio. radius")
        ignored = sorted(k for k, neutral in SAMPLE_NOT_MODELLED.items() if k in read and read[k] != neutral)
        unknown = sorted(k for k in read if k not in SAMPLE_TERMS and k not in SAMPLE_RECORDED
                         and k not in SAMPLE_NOT_MODELLED)
        if ignored:
            warnings.warn(f"{path}: not modelled by midasflow's refinement: {', '.join(ignored)}",
                          UserWarning, stacklevel=3)
        if unknown:
            warnings.warn(f"{path}: not GSAS-II sample parameters, ignored: {', '.join(unknown)}",
                          UserWarning, stacklevel=3)
        for key in SAMPLE_TERMS:
            if key in ("DisplaceX", "DisplaceY") and key in read:
                try:
                    read[key] = float(read[key])
                except (TypeError, ValueError):
                    raise InstprmError(f"{path}: key {key!r}: expected a number (µm), got "
                                       f"{read[key]!r}") from None
        values.update({k: v for k, v in read.items() if k not in unknown})
    return values
