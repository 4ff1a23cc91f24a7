"""GSAS-II instrument terms: the :class:`Instrument` record, MIDAS's names for them and the defaults.

One place for every fact about instrument terms (docs/reference/midas_parameters.md, "GSAS-II
instrument terms"; docs/reference/midas_zarr_layout.md, "What GSAS-II's importer reads"):

* :class:`Instrument`, the record the engines refine from, with GSAS-II's keys
  (:meth:`Instrument.to_dict` / :meth:`Instrument.from_dict`);
* :data:`MIDAS_INSTRUMENT_TERMS`, the one name table: each term's GSAS-II key, MIDAS
  parameter-file key and ``InstrumentParameters`` dataset name;
* the defaults MIDAS writes and GSAS-II's importer assumes (:data:`PROFILE_DEFAULTS`,
  :data:`MIDAS_DEFAULT_WAVELENGTH_A`, :data:`IMPORTER_DEFAULT_WAVELENGTH_A`, radii);
* :func:`as_instrument`, the one normaliser of every form instrument terms are passed in, and
  :func:`importer_values`, GSAS-II's MIDAS importer rule (defaults, renames, Distance → radius).

Pure Python: reading and writing files is :mod:`midasflow.io.instprm` (``.instprm``) and
:mod:`midasflow.io.midas_zarr` (``.zarr.zip``). Only constant-wavelength X-ray data (``Type``
'PXC') is supported.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from midasflow.errors import InstprmError

#: Wavelength (Å) MIDAS's integrator writes as ``Lam`` when the parameter file has no ``Wavelength``.
MIDAS_DEFAULT_WAVELENGTH_A = 0.172978
#: Wavelength (Å) GSAS-II's MIDAS importer assumes when the file carries no ``Lam``.
IMPORTER_DEFAULT_WAVELENGTH_A = 0.413263
#: Goniometer radius (mm) of GSAS-II's MIDAS importer without ``Distance``; MIDAS's default
#: ``Lsd`` (1e6 µm) gives the same.
MIDAS_DEFAULT_RADIUS_MM = 1000.0
#: GSAS-II's own sample default goniometer radius (mm), used for an ``.instprm`` without one.
GSAS_DEFAULT_RADIUS_MM = 200.0
#: Polarisation and profile terms MIDAS writes when the parameter file does not set them; GSAS-II's
#: MIDAS importer assumes the same values.
PROFILE_DEFAULTS: dict[str, float] = {
    "Polariz.": 0.99,
    "SH/L": 0.002,
    "U": 1.163,
    "V": -0.126,
    "W": 0.063,
    "X": 0.0,
    "Y": 0.0,
    "Z": 0.0,
}

#: The one MIDAS <-> GSAS-II name table: (GSAS-II key, MIDAS parameter-file key,
#: ``InstrumentParameters`` dataset name), in the order MIDAS writes the datasets. ``Lam`` comes
#: from the geometry key ``Wavelength`` (Å) and ``Distance`` from ``Lsd`` (µm; GSAS-II's
#: goniometer radius is Distance / 1000 mm).
MIDAS_INSTRUMENT_TERMS: tuple[tuple[str, str, str], ...] = (
    ("Polariz.", "Polariz", "Polariz"),
    ("Lam", "Wavelength", "Lam"),
    ("SH/L", "SHpL", "SH_L"),
    ("U", "U", "U"),
    ("V", "V", "V"),
    ("W", "W", "W"),
    ("X", "X", "X"),
    ("Y", "Y", "Y"),
    ("Z", "Z", "Z"),
    ("Distance", "Lsd", "Distance"),
)
#: Parameter-file key -> GSAS-II key of the profile terms (the geometry keys live in Params).
PARAMETER_FILE_KEYS: dict[str, str] = {
    param: gsas for gsas, param, _ in MIDAS_INSTRUMENT_TERMS if gsas in PROFILE_DEFAULTS}
#: ``InstrumentParameters`` dataset name -> GSAS-II key, in MIDAS's writing order.
DATASET_NAMES: dict[str, str] = {name: gsas for gsas, _, name in MIDAS_INSTRUMENT_TERMS}

#: GSAS-II key -> Instrument field, in the order ``.instprm`` files list them.
FIELDS = {
    "Type": "type", "Bank": "bank", "Lam": "lam", "Lam1": "lam1", "Lam2": "lam2",
    "I(L2)/I(L1)": "i_ratio", "Zero": "zero", "Polariz.": "polariz", "Azimuth": "azimuth",
    "U": "U", "V": "V", "W": "W", "X": "X", "Y": "Y", "Z": "Z", "SH/L": "shl",
}
#: Sample-parameter keys an .instprm may carry (GSAS-II moves them to Sample Parameters).
SAMPLE_FIELDS = {"Diff-type": "diff_type", "Gonio. radius": "gonio_radius_mm",
                 "InstrName": "instr_name", "DisplaceX": "displace_x_um", "DisplaceY": "displace_y_um"}
#: Sample-parameter keys that a GSAS-II ``.instprm`` never holds (they come from a ``.samprm``).
SAMPLE_ONLY = ("DisplaceX", "DisplaceY")
#: Keys whose values are text.
STRING_KEYS = {"Type", "Diff-type", "InstrName"}
#: Other keys GSAS-II writes into CW instrument dicts/.instprm files (kept in ``extra``).
OTHER_GSAS_KEYS = {"Source"}


@dataclass(frozen=True)
class Instrument:
    """GSAS-II CW X-ray instrument parameters (defaults: GSAS-II's MIDAS importer's).

    Attributes (GSAS-II key in brackets)
    ----------
    type : 'PXC' [Type].  bank : bank number [Bank].
    lam : wavelength Å [Lam] — or ``lam1``, ``lam2`` [Lam1, Lam2] and ``i_ratio`` [I(L2)/I(L1)]
        for a Kα doublet (then ``lam`` is None).
    zero : 2θ zero shift, deg [Zero].  polariz : polarization fraction [Polariz.].
    azimuth : instrument Azimuth, deg [Azimuth] — stored, ignored by the refinement (the
        polarisation uses the *sample* azimuth; docs/reference/gsas2_profile.md §4).
    U, V, W : centideg².  X, Y, Z : centideg.  shl : FCJ (S+H)/L [SH/L].
    diff_type : 'Debye-Scherrer' | 'Bragg-Brentano' [Diff-type].
    gonio_radius_mm : goniometer radius R, mm [Gonio. radius].  instr_name : [InstrName].
    displace_x_um, displace_y_um : sample displacements ⊥ and ∥ to the beam, µm [DisplaceX,
        DisplaceY; GSAS-II sample parameters, e.g. from a ``.samprm`` beside the store]: the
        peak positions' start values.
    extra : other keys of an .instprm, kept verbatim for round trips.
    source : file the values came from ('' when built in code).
    """

    type: str = "PXC"
    bank: int = 1
    lam: float | None = IMPORTER_DEFAULT_WAVELENGTH_A
    lam1: float | None = None
    lam2: float | None = None
    i_ratio: float | None = None
    zero: float = 0.0
    polariz: float = PROFILE_DEFAULTS["Polariz."]
    azimuth: float = 0.0
    U: float = PROFILE_DEFAULTS["U"]
    V: float = PROFILE_DEFAULTS["V"]
    W: float = PROFILE_DEFAULTS["W"]
    X: float = PROFILE_DEFAULTS["X"]
    Y: float = PROFILE_DEFAULTS["Y"]
    Z: float = PROFILE_DEFAULTS["Z"]
    shl: float = PROFILE_DEFAULTS["SH/L"]
    diff_type: str = "Debye-Scherrer"
    gonio_radius_mm: float = MIDAS_DEFAULT_RADIUS_MM
    instr_name: str = ""
    displace_x_um: float = 0.0
    displace_y_um: float = 0.0
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
        """True for a Kα doublet (Lam1/Lam2), False for a single wavelength (Lam)."""
        return self.lam is None

    def to_dict(self) -> dict[str, float | str]:
        """GSAS-II key -> value (instrument keys, then extras, then the Sample-parameter keys;
        DisplaceX/DisplaceY only when not 0)."""
        out: dict[str, float | str] = {}
        for key, name in FIELDS.items():
            value = getattr(self, name)
            if value is not None:
                out[key] = value
        out.update(self.extra)
        for key, name in SAMPLE_FIELDS.items():
            value = getattr(self, name)
            if value != "" and not (key in SAMPLE_ONLY and value == 0.0):
                out[key] = value
        return out

    def to_midas(self) -> dict[str, float]:
        """The terms MIDAS stores (``InstrumentParameters``), keyed by their GSAS-II names.

        ``Lam`` (Å; Lam1 for a doublet), ``Polariz.``, ``SH/L``, ``U`` … ``Z`` and ``Distance``
        (µm, = 1000 × the goniometer radius in mm), in the order of a caked Dataset's
        ``attrs['instrument']``. Distance is rounded to 1e-6 µm, so an Lsd written with up to six
        decimals comes back as written (R = Lsd / 1000 then R · 1000 can be one unit in the last
        place off).
        """
        values = {"Lam": self.wavelength_a, "Polariz.": self.polariz, "SH/L": self.shl,
                  "U": self.U, "V": self.V, "W": self.W, "X": self.X, "Y": self.Y, "Z": self.Z}
        values["Distance"] = round(self.gonio_radius_mm * 1000.0, 6)
        return {key: float(value) for key, value in values.items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "") -> Instrument:
        """Build from GSAS-II keys; missing keys take the defaults, unknown keys go to extra."""
        kwargs: dict[str, Any] = {"source": source, "extra": {}}
        for key, value in values.items():
            name = FIELDS.get(key) or SAMPLE_FIELDS.get(key)
            if name is None:
                kwargs["extra"][key] = value
            elif key in STRING_KEYS:
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


#: What a MIDAS integrator writes when the parameter file sets no instrument term (Lam = its
#: default wavelength, Distance = its default Lsd), GSAS-II-named as :meth:`Instrument.to_midas`.
MIDAS_WRITE_DEFAULTS: dict[str, float] = Instrument(lam=MIDAS_DEFAULT_WAVELENGTH_A).to_midas()
#: Names GSAS-II's MIDAS importer takes from ``InstrumentParameters`` -> GSAS-II key: its default
#: keys under their own names, ``Polariz``/``SH_L`` renamed, and ``Distance`` (µm).
IMPORTER_NAMES: dict[str, str] = {
    **{key: key for key in ("Bank", "Lam", "Polariz.", "SH/L", "Type", "U", "V", "W", "X", "Y",
                            "Z", "Zero")},
    **DATASET_NAMES,
}


def gsas_names(values: Mapping[str, Any]) -> dict[str, Any]:
    """``InstrumentParameters`` values renamed to GSAS-II keys; names the importer ignores dropped.

    ``Distance`` (µm) keeps its name; ``Type`` stays text, every other value becomes a float.
    """
    return {IMPORTER_NAMES[name]: (value if IMPORTER_NAMES[name] == "Type" else float(value))
            for name, value in values.items() if name in IMPORTER_NAMES}


def importer_values(values: Mapping[str, Any]) -> dict[str, float | str]:
    """The GSAS-II instrument dict GSAS-II's MIDAS importer builds from ``InstrumentParameters``.

    Parameters
    ----------
    values : mapping
        Dataset names as MIDAS writes them (``Polariz``, ``SH_L`` …) or GSAS-II keys (as a caked
        Dataset's ``attrs['instrument']`` carries them), each a number (``Type`` text).

    Returns
    -------
    dict
        GSAS-II keys: the importer's defaults (:class:`Instrument`'s), each replaced by the
        file's value, and ``Gonio. radius`` = Distance / 1000 mm (1000 mm without Distance).
    """
    inst: dict[str, float | str] = Instrument().to_dict()
    named = gsas_names(values)
    distance = named.pop("Distance", None)
    inst.update(named)
    inst["Gonio. radius"] = (float(distance) / 1000.0 if distance is not None
                             else MIDAS_DEFAULT_RADIUS_MM)
    return inst


def _mapping_value(key: str, value: Any) -> Any:
    """A mapping value: a scalar, or GSAS-II's in-memory ``[original, current(, refine)]``."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise InstprmError(f"instrument parameters: key {key!r}: expected a value, got []")
        value = value[1] if len(value) >= 2 else value[0]
    if key in STRING_KEYS or key in OTHER_GSAS_KEYS:
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
        path of an ``.instprm`` file (read by :func:`midasflow.io.instprm.read_instprm`).

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
        from midasflow.io.instprm import read_instprm  # the file format lives in io/

        return read_instprm(instprm)
    if not isinstance(instprm, Mapping):
        raise InstprmError(f"instrument parameters: expected an Instrument, a mapping of GSAS-II "
                           f"keys or an .instprm path, got {type(instprm).__name__}")
    known = FIELDS.keys() | SAMPLE_FIELDS.keys() | OTHER_GSAS_KEYS
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
