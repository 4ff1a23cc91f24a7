"""GSAS-II instrument parameters: the ``Instrument`` record, ``.instprm`` files, MIDAS defaults.

Spec: ``shared/reference/gsas2_cw_profile.md`` §7.5 (``.instprm``, after ``GSASIIfiles.ReadInstprm``
/ ``WriteInstprm``) and §8 (the MIDAS zarr importer's instrument defaults). Only constant-wavelength
X-ray data (``Type`` 'PXC') is supported.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from midasflow.errors import CakeFileError, InstprmError
from midasflow.io.atomic import write_text_atomic

HEADER = "#GSAS-II instrument parameter file; do not add/delete items!"
MIDAS_DEFAULT_RADIUS_MM = 1000.0
GSAS_DEFAULT_RADIUS_MM = 200.0

#: GSAS-II key -> Instrument field, in the order write_instprm writes them.
_FIELDS = {
    "Type": "type", "Bank": "bank", "Lam": "lam", "Lam1": "lam1", "Lam2": "lam2",
    "I(L2)/I(L1)": "i_ratio", "Zero": "zero", "Polariz.": "polariz", "Azimuth": "azimuth",
    "U": "U", "V": "V", "W": "W", "X": "X", "Y": "Y", "Z": "Z", "SH/L": "shl",
}
#: Sample-parameter keys an .instprm may carry (GSAS-II moves them to Sample Parameters).
_SAMPLE_FIELDS = {"Diff-type": "diff_type", "Gonio. radius": "gonio_radius_mm",
                  "InstrName": "instr_name"}
_STRING_KEYS = {"Type", "Diff-type", "InstrName"}
#: Keys a complete single-wavelength / doublet file must provide (Z, Azimuth, Bank optional).
_REQUIRED = ("Type", "Zero", "Polariz.", "U", "V", "W", "X", "Y", "SH/L")
#: Other keys GSAS-II writes into CW instrument dicts/.instprm files (kept in ``extra``).
_OTHER_GSAS_KEYS = {"Source"}
#: MIDAS InstrumentParameters dataset name -> GSAS-II key (§8); Distance (µm) handled apart.
_MIDAS_NAMES = {"Bank": "Bank", "Lam": "Lam", "Polariz": "Polariz.", "Polariz.": "Polariz.",
                "SH_L": "SH/L", "SH/L": "SH/L", "Type": "Type", "U": "U", "V": "V", "W": "W",
                "X": "X", "Y": "Y", "Z": "Z", "Zero": "Zero"}


@dataclass(frozen=True)
class Instrument:
    """GSAS-II CW X-ray instrument parameters (defaults: the MIDAS importer's, spec §8).

    Attributes (GSAS-II key in brackets)
    ----------
    type : 'PXC' [Type].  bank : bank number [Bank].
    lam : wavelength Å [Lam] — or ``lam1``, ``lam2`` [Lam1, Lam2] and ``i_ratio`` [I(L2)/I(L1)]
        for a Kα doublet (then ``lam`` is None).
    zero : 2θ zero shift, deg [Zero].  polariz : polarization fraction [Polariz.].
    azimuth : instrument Azimuth, deg [Azimuth] — stored, ignored by the refinement (§3.2).
    U, V, W : centideg².  X, Y, Z : centideg.  shl : FCJ (S+H)/L [SH/L].
    diff_type : 'Debye-Scherrer' | 'Bragg-Brentano' [Diff-type].
    gonio_radius_mm : goniometer radius R, mm [Gonio. radius].  instr_name : [InstrName].
    extra : other keys of an .instprm, kept verbatim for round trips.
    source : file the values came from ('' when built in code).
    """

    type: str = "PXC"
    bank: int = 1
    lam: float | None = 0.413263
    lam1: float | None = None
    lam2: float | None = None
    i_ratio: float | None = None
    zero: float = 0.0
    polariz: float = 0.99
    azimuth: float = 0.0
    U: float = 1.163
    V: float = -0.126
    W: float = 0.063
    X: float = 0.0
    Y: float = 0.0
    Z: float = 0.0
    shl: float = 0.002
    diff_type: str = "Debye-Scherrer"
    gonio_radius_mm: float = MIDAS_DEFAULT_RADIUS_MM
    instr_name: str = ""
    extra: dict[str, float | str] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        where = self.source or "Instrument"
        doublet = self.lam1 is not None or self.lam2 is not None
        if doublet and (self.lam1 is None or self.lam2 is None or self.i_ratio is None):
            raise InstprmError(f"{where}: a Kα doublet needs Lam1, Lam2 and I(L2)/I(L1)")
        if doublet == (self.lam is not None):
            raise InstprmError(f"{where}: expected either Lam or Lam1/Lam2, not "
                               f"{'both' if doublet else 'neither'}")
        if not (self.type.startswith("PX") and self.type.endswith("C")):
            raise InstprmError(f"{where}: Type {self.type!r}: only constant-wavelength X-ray "
                               "data ('PXC') is supported")
        wavelength = self.lam1 if doublet else self.lam
        if not (wavelength > 0 and math.isfinite(wavelength)):
            raise InstprmError(f"{where}: wavelength must be a positive number, got {wavelength}")

    @property
    def wavelength_a(self) -> float:
        """Lam, or Lam1 for a doublet (the wavelength reflection positions use)."""
        return float(self.lam if self.lam is not None else self.lam1)

    @property
    def is_doublet(self) -> bool:
        return self.lam is None

    def to_dict(self) -> dict[str, float | str]:
        """GSAS-II key -> value (instrument keys, then extras, then the Sample-parameter keys)."""
        out: dict[str, float | str] = {}
        for key, name in _FIELDS.items():
            value = getattr(self, name)
            if value is not None:
                out[key] = value
        out.update(self.extra)
        for key, name in _SAMPLE_FIELDS.items():
            value = getattr(self, name)
            if value != "":
                out[key] = value
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "") -> Instrument:
        """Build from GSAS-II keys; missing keys take the defaults, unknown keys go to extra."""
        kwargs: dict[str, Any] = {"source": source, "extra": {}}
        for key, value in values.items():
            name = _FIELDS.get(key) or _SAMPLE_FIELDS.get(key)
            if name is None:
                kwargs["extra"][key] = value
            elif key in _STRING_KEYS:
                kwargs[name] = str(value)
            elif key == "Bank":
                kwargs[name] = int(value)
            else:
                kwargs[name] = float(value)
        if "lam1" in kwargs and "lam" not in kwargs:
            kwargs["lam"] = None
            kwargs.setdefault("diff_type", "Bragg-Brentano")
        return cls(**kwargs)

    def replace(self, **changes: Any) -> Instrument:
        """Copy with fields changed (dataclasses.replace)."""
        return dataclasses.replace(self, **changes)


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
    """Key/value pairs of one bank of an .instprm, GSAS-II ``ReadInstprm`` rules (§7.5)."""
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
            if key in _STRING_KEYS:
                values[key] = value
                continue
            try:
                values[key] = float(value)
            except ValueError:
                if key in _FIELDS or key in _SAMPLE_FIELDS:
                    raise InstprmError(f"{path}: line {lineno}: key {key!r}: expected a number, "
                                       f"got {value!r}") from None
                values[key] = value
    return values


def read_instprm(path: str | os.PathLike, bank: int | None = None) -> Instrument:
    """Read a GSAS-II ``.instprm`` file (§7.5).

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
# MIDAS
# --------------------------------------------------------------------------------------------
def _from_midas_values(values: dict[str, Any]) -> dict[str, float | str]:
    """GSAS-II instrument dict of the MIDAS importer: defaults, then the file's values (§8)."""
    inst: dict[str, float | str] = Instrument().to_dict()
    inst.pop("Gonio. radius")
    for name, value in values.items():
        key = _MIDAS_NAMES.get(name)
        if key is None:
            continue
        inst[key] = value if key == "Type" else float(value)
    distance = values.get("Distance")
    inst["Gonio. radius"] = (float(distance) / 1000.0 if distance is not None
                             else MIDAS_DEFAULT_RADIUS_MM)
    return inst


def _read_zarr_instrument(path: Path) -> dict[str, Any]:
    import zipfile

    import zarr

    if not path.is_file():
        raise CakeFileError(f"{path}: MIDAS .zarr.zip not found")
    if not zipfile.is_zipfile(path):
        raise CakeFileError(f"{path}: not a readable zip file (expected a MIDAS .zarr.zip)")
    store = zarr.storage.ZipStore(path, mode="r")
    try:
        root = zarr.open_group(store, mode="r", zarr_format=2)
        if "InstrumentParameters" not in root:
            raise CakeFileError(f"{path}: group 'InstrumentParameters' not found (expected a "
                                "MIDAS caked .zarr.zip)")
        values: dict[str, Any] = {}
        for name, arr in root["InstrumentParameters"].arrays():
            data = np.asarray(arr[...]).reshape(-1)
            if data.size:
                item = data[0]
                values[name] = item.decode() if isinstance(item, bytes) else item.item()
        return values
    finally:
        store.close()


def instrument_from_midas(path_or_ds: Any) -> Instrument:
    """Instrument parameters of a MIDAS caked file, as GSAS-II's MIDAS importer builds them (§8).

    Parameters
    ----------
    path_or_ds : path of a MIDAS ``.zarr.zip`` (its ``InstrumentParameters`` group: 'Polariz' →
        'Polariz.', 'SH_L' → 'SH/L', other GSAS-II names as they are, 'Distance' µm → Gonio. radius
        mm), or an xarray Dataset whose ``attrs['instrument']`` is a JSON dict with GSAS-II names
        (what ``midasflow.cake`` produces; 'Distance' in µm).

    Missing values take the importer's defaults (Lam 0.413263, Polariz. 0.99, SH/L 0.002, U/V/W
    1.163/−0.126/0.063, X = Y = Z = Zero = 0, R = 1000 mm). For a path, a sibling
    ``<root>.instprm`` (``os.path.splitext``: ``x.zarr.zip`` → ``x.zarr.instprm``) overrides or
    extends the values, except Gonio. radius, which GSAS-II always takes from Distance. The
    per-lineout Azimuth (90 − η̄) and Bank (azimuth index) are not set here.
    """
    if isinstance(path_or_ds, (str, os.PathLike)):
        path = Path(path_or_ds)
        inst = _from_midas_values(_read_zarr_instrument(path))
        sibling = Path(os.path.splitext(path)[0] + ".instprm")
        if sibling.is_file():
            override = _parse(sibling, None)
            override.pop("Gonio. radius", None)
            if "Lam1" in override:
                inst.pop("Lam", None)
            inst.update(override)
        return Instrument.from_dict(inst, source=str(path))
    attrs = getattr(path_or_ds, "attrs", None)
    if attrs is None:
        raise TypeError(f"expected a path or an xarray Dataset, got {type(path_or_ds).__name__}")
    raw = attrs.get("instrument")
    if raw is None:
        values: dict[str, Any] = {}
    else:
        try:
            values = json.loads(raw) if isinstance(raw, str) else dict(raw)
        except (json.JSONDecodeError, TypeError, ValueError):
            raise CakeFileError("dataset attrs['instrument']: expected a JSON object of GSAS-II "
                                f"instrument keys, got {str(raw)[:60]!r}") from None
    return Instrument.from_dict(_from_midas_values(values), source="dataset")


# --------------------------------------------------------------------------------------------
# one normaliser for every way instrument terms are passed
# --------------------------------------------------------------------------------------------
def _mapping_value(key: str, value: Any) -> Any:
    """A mapping value: a scalar, or GSAS-II's in-memory ``[original, current(, refine)]``."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise InstprmError(f"instrument parameters: key {key!r}: expected a value, got []")
        value = value[1] if len(value) >= 2 else value[0]
    if key in _STRING_KEYS or key in _OTHER_GSAS_KEYS:
        return str(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InstprmError(f"instrument parameters: key {key!r}: expected a number, got "
                           f"{value!r}") from None
    if not math.isfinite(number):
        raise InstprmError(f"instrument parameters: key {key!r}: expected a finite number, got "
                           f"{value!r}")
    return number


def as_instrument(instprm: Instrument | Mapping[str, Any] | str | os.PathLike) -> Instrument:
    """Instrument terms as an :class:`Instrument`, whatever form they were given in.

    Parameters
    ----------
    instprm : Instrument, mapping or path-like
        An :class:`Instrument` (returned as is); a mapping of GSAS-II keys (``Lam`` or
        ``Lam1``/``Lam2``/``I(L2)/I(L1)``, ``Zero``, ``Polariz.``, ``Azimuth``, ``U`` … ``Z``,
        ``SH/L``, ``Type``, ``Bank``, ``Diff-type``, ``Gonio. radius``, ``InstrName``,
        ``Source``), each value a number or GSAS-II's ``[original, current, refine]`` list (the
        current value is used), missing keys taking the :class:`Instrument` defaults; or the
        path of an ``.instprm`` file (:func:`read_instprm`).

    Returns
    -------
    Instrument

    Raises
    ------
    InstprmError
        Unknown (e.g. misspelled) key, non-numeric value, no wavelength, an unreadable file, or
        another type — one line naming the key.
    """
    if isinstance(instprm, Instrument):
        return instprm
    if isinstance(instprm, (str, os.PathLike)):
        return read_instprm(instprm)
    if not isinstance(instprm, Mapping):
        raise InstprmError(f"instrument parameters: expected an Instrument, a mapping of GSAS-II "
                           f"keys or an .instprm path, got {type(instprm).__name__}")
    known = _FIELDS.keys() | _SAMPLE_FIELDS.keys() | _OTHER_GSAS_KEYS
    values: dict[str, Any] = {}
    for key, value in instprm.items():
        if key not in known:
            raise InstprmError(f"instrument parameters: unknown key {key!r} (expected GSAS-II "
                               f"keys: {', '.join(sorted(known))})")
        values[key] = _mapping_value(key, value)
    if "Lam" not in values and not {"Lam1", "Lam2", "I(L2)/I(L1)"} <= values.keys():
        raise InstprmError("instrument parameters: missing key 'Lam' (or 'Lam1', 'Lam2' and "
                           "'I(L2)/I(L1)' for a Kα doublet)")
    return Instrument.from_dict(values, source="instrument parameters")
