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
    Gonio. radius and InstrName (as GSAS-II's ``WriteInstprm``).
    """
    text = "\n".join([HEADER] + [f"{k}:{_format(v)}" for k, v in inst.to_dict().items()]) + "\n"
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
        ``x.zarr.instprm``) overrides or extends the values, except Gonio. radius, which GSAS-II
        always takes from Distance. The per-lineout Azimuth (90 − η̄) and Bank (azimuth index)
        are not set here.

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
    if store is not None:
        sibling = Path(os.path.splitext(store)[0] + ".instprm")
        if sibling.is_file():
            override = _parse(sibling, None)
            override.pop("Gonio. radius", None)
            if "Lam1" in override:
                inst.pop("Lam", None)
            inst.update(override)
    return Instrument.from_dict(inst, source=str(store) if store is not None else "dataset")
