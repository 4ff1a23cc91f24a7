"""MIDAS parameter files: parse, validate, write.

A MIDAS parameter file has one ``Key value [value ...]`` per line; lines starting with ``#`` are
comments and an inline ``# ...`` after the values is dropped. Keys are case-sensitive, the last
occurrence of a scalar key wins, and ``ImTransOpt`` accumulates (one or several codes per line).
Units follow MIDAS (docs/reference/midas_parameters.md §3): R in detector pixels, lengths in µm, angles in
degrees, wavelength in Å.

Keys midasflow does not use are kept verbatim in :attr:`Params.extra` and reported once as a
warning naming the file, never silently dropped (MIDAS files carry keys of other MIDAS tools); an
unknown key given as a command-line override is an error naming the nearest known key. ``Lsd``,
``BC`` and ``Wavelength`` must be given: MIDAS's silent defaults (1 m, 1024 1024, 0.172978 Å)
would cake with a geometry nobody calibrated.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from midasflow.errors import ParameterError
from midasflow.instrument import (
    MIDAS_DEFAULT_WAVELENGTH_A,
    PARAMETER_FILE_KEYS,
    PROFILE_DEFAULTS,
    Instrument,
)

#: Per-frame process variables: caked-variable name -> (parameter key, MIDAS default HDF5 path)
#: (docs/reference/midas_parameters.md §3.4).
PROCESS_VARIABLES = {
    "temperature": ("TemperatureDatasetPath", "/measurement/instrument/GSAS2_PVS/Temperature"),
    "pressure": ("PressureDatasetPath", "/measurement/instrument/GSAS2_PVS/Pressure"),
    "i": ("IDatasetPath", "/measurement/instrument/GSAS2_PVS/I"),
    "i0": ("I0DatasetPath", "/measurement/instrument/GSAS2_PVS/I0"),
}

N_DISTORTION_TERMS = 15
VALID_IM_TRANS_OPT = (0, 1, 2, 3)
#: Which caked bins are NaN: too little unmasked area ("area"), or any masked pixel ("midas").
MaskRule = Literal["area", "midas"]
MASK_RULES: tuple[str, ...] = get_args(MaskRule)


@dataclass(frozen=True)
class _KeySpec:
    """How one parameter-file key maps onto a :class:`Params` field."""

    field: str
    kind: type  # int, float, str or bool
    count: int = 1  # number of values expected on the line


# Key -> spec. Aliases point at the same field (docs/reference/midas_parameters.md §3).
_KEYS: dict[str, _KeySpec] = {
    "NrPixelsY": _KeySpec("nr_pixels_y", int),
    "NrPixelsZ": _KeySpec("nr_pixels_z", int),
    "px": _KeySpec("px_um", float),
    "PixelSize": _KeySpec("px_um", float),
    "YPixelSize": _KeySpec("px_um", float),
    "pxY": _KeySpec("px_um", float),
    "Lsd": _KeySpec("lsd_um", float),
    "DetDist": _KeySpec("lsd_um", float),
    "tx": _KeySpec("tx_deg", float),
    "ty": _KeySpec("ty_deg", float),
    "tz": _KeySpec("tz_deg", float),
    "RhoD": _KeySpec("rhod_um", float),
    "MaxRingRad": _KeySpec("rhod_um", float),
    "Parallax": _KeySpec("parallax_um", float),
    "Wavelength": _KeySpec("wavelength_a", float),
    "RMin": _KeySpec("r_min_px", float),
    "RMax": _KeySpec("r_max_px", float),
    "RBinSize": _KeySpec("r_bin_px", float),
    "EtaMin": _KeySpec("eta_min_deg", float),
    "MinEta": _KeySpec("eta_min_deg", float),
    "EtaMax": _KeySpec("eta_max_deg", float),
    "EtaBinSize": _KeySpec("eta_bin_deg", float),
    "SolidAngleCorrection": _KeySpec("solid_angle_correction", bool),
    "PolarizationCorrection": _KeySpec("polarization_correction", bool),
    "PolarizationFraction": _KeySpec("polarization_fraction", float),
    "Normalize": _KeySpec("normalize", bool),
    "OmegaStart": _KeySpec("omega_start_deg", float),
    "OmegaFirstFile": _KeySpec("omega_start_deg", float),
    "OmegaStep": _KeySpec("omega_step_deg", float),
    "OmegaSumFrames": _KeySpec("omega_sum_frames", int),
    "SkipFrame": _KeySpec("skip_frame", int),
    "SumImages": _KeySpec("sum_images", bool),
    "SaveIndividualFrames": _KeySpec("save_individual_frames", bool),
    "MaskFile": _KeySpec("mask_file", str),
    "Dark": _KeySpec("dark_file", str),
    "HeadSize": _KeySpec("ge_header_bytes", int),
    "PixelValue": _KeySpec("pixel_value_bytes", int),
    "MinAreaFraction": _KeySpec("min_area_fraction", float),
    "MaskRule": _KeySpec("mask_rule", str),
    **{key: _KeySpec(f"{name}_dataset_path", str) for name, (key, _) in PROCESS_VARIABLES.items()},
}
# Keys that change the cake but that midasflow does not implement: refuse rather than ignore.
_UNSUPPORTED = {
    "DistortionFile": "per-pixel distortion maps are not supported; use p0..p14",
    "ResidualCorrectionMap": "residual R maps are not supported",
    "PanelShiftsFile": "panel shifts are not supported",
}
# Keys accepted for compatibility whose value MIDAS itself ignores or that do not change the cake.
_IGNORED = {
    "pxZ", "DistortionOrder", "GapFile", "BadPxFile", "GapIntensity", "BadPxIntensity",
    "DoBinSort", "Write2D", "ResultFolder", "DoPeakFit", "PeakLocation", "AutoDetectPeaks",
    "SNIPIterations", "FitROIPadding", "FitROIAuto", "DoSmoothing", "MultiplePeaks",
    "DoubletSeparation", "MaskFN", "NPanelsY", "NPanelsZ", "PanelSizeY", "PanelSizeZ",
    "PanelGapsY", "PanelGapsZ", "SubPixelCardinalWidth", "QMin", "QMax",
}
# Keys MIDAS applies but midasflow does not: (value that changes nothing, what the user gets).
_NOT_APPLIED = {
    "SubPixelLevel": (1.0, "exact pixel splitting is used instead of sub-pixels"),
    "GradientCorrection": (0.0, "pixel values are not resampled at the R-bin centre"),
}


@dataclass(frozen=True)
class Params:
    """Every parameter that affects caking, typed, with MIDAS units.

    Lengths are µm, angles degrees, R in detector pixels, wavelength Å. ``bc_y_px``/``bc_z_px``
    are the beam centre in the frame after the ``ImTransOpt`` transforms.
    """

    source: str = "<defaults>"
    nr_pixels_y: int = 2048
    nr_pixels_z: int = 2048
    px_um: float = 200.0
    lsd_um: float = 1.0e6
    bc_y_px: float = 1024.0
    bc_z_px: float = 1024.0
    tx_deg: float = 0.0
    ty_deg: float = 0.0
    tz_deg: float = 0.0
    rhod_um: float = 2.0e5
    p: tuple[float, ...] = (0.0,) * N_DISTORTION_TERMS
    parallax_um: float = 0.0
    im_trans_opt: tuple[int, ...] = (0,)
    wavelength_a: float = MIDAS_DEFAULT_WAVELENGTH_A
    r_min_px: float = 10.0
    r_max_px: float = 1524.0
    r_bin_px: float = 0.25
    eta_min_deg: float = -180.0
    eta_max_deg: float = 180.0
    eta_bin_deg: float = 5.0
    solid_angle_correction: bool = False
    polarization_correction: bool = False
    polarization_fraction: float = 0.99
    normalize: bool = True
    omega_start_deg: float = 0.0
    omega_step_deg: float = 0.0
    omega_sum_frames: int = 1
    skip_frame: int = 0
    sum_images: bool = False
    save_individual_frames: bool = True
    mask_file: str | None = None
    dark_file: str | None = None
    ge_header_bytes: int = 8192
    pixel_value_bytes: int = 2
    min_area_fraction: float = 0.5
    mask_rule: MaskRule = "area"
    temperature_dataset_path: str = PROCESS_VARIABLES["temperature"][1]
    pressure_dataset_path: str = PROCESS_VARIABLES["pressure"][1]
    i_dataset_path: str = PROCESS_VARIABLES["i"][1]
    i0_dataset_path: str = PROCESS_VARIABLES["i0"][1]
    instrument_overrides: tuple[tuple[str, float], ...] = ()
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __post_init__(self) -> None:
        # plain Python scalars (numpy scalars would leak into to_text() and the hash)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("float", "int", "bool") and value is not None:
                object.__setattr__(self, f.name, {"float": float, "int": int, "bool": bool}[f.type](value))
        object.__setattr__(self, "p", tuple(float(v) for v in self.p))
        object.__setattr__(self, "im_trans_opt", tuple(int(v) for v in self.im_trans_opt))
        _validate(self, where=self.source)

    # ----------------------------------------------------------------------------- derived
    @property
    def n_r(self) -> int:
        """Number of radial bins, ceil((RMax − RMin)/RBinSize)."""
        return int(math.ceil((self.r_max_px - self.r_min_px) / self.r_bin_px - 1e-9))

    @property
    def n_eta(self) -> int:
        """Number of azimuthal bins, ceil((EtaMax − EtaMin)/EtaBinSize)."""
        return int(math.ceil((self.eta_max_deg - self.eta_min_deg) / self.eta_bin_deg - 1e-9))

    def r_edges_px(self):
        """Radial bin edges in pixels, shape (n_r + 1,); the last bin may pass RMax."""
        import numpy as np

        return self.r_min_px + self.r_bin_px * np.arange(self.n_r + 1, dtype=np.float64)

    def eta_edges_deg(self):
        """Azimuthal bin edges in degrees, shape (n_eta + 1,)."""
        import numpy as np

        return self.eta_min_deg + self.eta_bin_deg * np.arange(self.n_eta + 1, dtype=np.float64)

    @property
    def instrument(self) -> Instrument:
        """The GSAS-II instrument terms this parameter file writes into a caked store.

        ``Lam`` = Wavelength, the profile terms (``Polariz``, ``SHpL``, ``U`` … ``Z`` keys) over
        MIDAS's defaults, goniometer radius = Lsd / 1000 mm; :meth:`Instrument.to_midas` gives
        them as stored (``Distance`` in µm).
        """
        terms = {**PROFILE_DEFAULTS, **dict(self.instrument_overrides)}
        return Instrument.from_dict(
            {"Lam": self.wavelength_a, **terms, "Gonio. radius": self.lsd_um / 1000.0},
            source=self.source)

    @property
    def extra_keys(self) -> dict[str, tuple[str, ...]]:
        """Keys midasflow does not use, with their raw values."""
        return dict(self.extra)

    @property
    def process_variable_paths(self) -> dict[str, str]:
        """HDF5 dataset path of each per-frame process variable, keyed by its caked name
        (``temperature``, ``pressure``, ``i``, ``i0``; :data:`PROCESS_VARIABLES`)."""
        return {name: getattr(self, f"{name}_dataset_path") for name in PROCESS_VARIABLES}

    def geometry_key(self) -> str:
        """SHA-256 hex digest over every field the pixel → bin map depends on."""
        fields = (
            "nr_pixels_y", "nr_pixels_z", "px_um", "lsd_um", "bc_y_px", "bc_z_px", "tx_deg",
            "ty_deg", "tz_deg", "rhod_um", "p", "parallax_um", "im_trans_opt", "r_min_px",
            "r_max_px", "r_bin_px", "eta_min_deg", "eta_max_deg", "eta_bin_deg",
            "solid_angle_correction", "polarization_correction", "polarization_fraction",
        )
        blob = json.dumps({name: getattr(self, name) for name in fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def resolve_path(self, path: str) -> str:
        """A file named in the parameter file: as given when it exists (or is absolute), else
        relative to the parameter file's folder, as MIDAS users write them."""
        if os.path.isabs(path) or os.path.exists(path):
            return path
        beside = os.path.join(os.path.dirname(self.source), path)
        return beside if os.path.exists(beside) else path

    def with_overrides(self, **changes: Any) -> Params:
        """A copy with some fields replaced (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_text(self) -> str:
        """MIDAS parameter-file text that :func:`read_params` reads back to an equal Params."""
        lines = [f"# written by midasflow from {self.source}"]
        inverse = {}
        for key, spec in _KEYS.items():
            inverse.setdefault(spec.field, key)  # first spelling is the canonical one
        for f in dataclasses.fields(self):
            name = f.name
            value = getattr(self, name)
            if name in ("source", "instrument_overrides", "extra", "p", "im_trans_opt"):
                continue
            if name in ("bc_y_px", "bc_z_px"):
                continue
            if value is None:
                continue
            key = inverse[name]
            lines.append(f"{key} {_fmt(value)}")
        lines.append(f"BC {_fmt(self.bc_y_px)} {_fmt(self.bc_z_px)}")
        lines.extend(f"p{i} {_fmt(v)}" for i, v in enumerate(self.p))
        lines.extend(f"ImTransOpt {code}" for code in self.im_trans_opt)
        reverse_inst = {v: k for k, v in PARAMETER_FILE_KEYS.items()}
        lines.extend(f"{reverse_inst[k]} {_fmt(v)}" for k, v in self.instrument_overrides)
        lines.extend(f"{key} {' '.join(values)}" for key, values in self.extra)
        return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _validate(params: Params, where: str) -> None:
    """Raise ParameterError for values no geometry or binning can use."""
    checks = [
        (params.nr_pixels_y > 0 and params.nr_pixels_z > 0, "NrPixelsY/NrPixelsZ", "positive pixel counts"),
        (params.px_um > 0, "px", "a positive pixel size in µm"),
        (params.lsd_um > 0, "Lsd", "a positive sample-detector distance in µm"),
        (params.r_bin_px > 0, "RBinSize", "a bin size > 0 (pixels)"),
        (params.eta_bin_deg > 0, "EtaBinSize", "a bin size > 0 (degrees)"),
        (params.r_max_px > params.r_min_px, "RMax", f"RMax > RMin (RMin is {params.r_min_px})"),
        (params.r_min_px >= 0, "RMin", "RMin >= 0 (pixels)"),
        (params.eta_max_deg > params.eta_min_deg, "EtaMax", f"EtaMax > EtaMin (EtaMin is {params.eta_min_deg})"),
        (params.rhod_um > 0, "RhoD", "a positive distortion radius in µm"),
        (params.wavelength_a > 0, "Wavelength", "a positive wavelength in Å"),
        (params.omega_sum_frames != 0, "OmegaSumFrames", "a non-zero frame count (-1 = all frames)"),
        (params.skip_frame >= 0, "SkipFrame", "a frame count >= 0"),
        (0.0 <= params.min_area_fraction <= 1.0, "MinAreaFraction", "a fraction between 0 and 1"),
        (params.mask_rule in MASK_RULES, "MaskRule", f"one of {', '.join(MASK_RULES)}"),
        (params.pixel_value_bytes in (2, 4), "PixelValue", "2 (uint16) or 4 (uint32)"),
        (params.ge_header_bytes >= 0, "HeadSize", "a header size >= 0 bytes"),
        (len(params.p) == N_DISTORTION_TERMS, "p0..p14", f"{N_DISTORTION_TERMS} distortion terms"),
    ]
    for ok, key, expected in checks:
        if not ok:
            raise ParameterError(f"{where}: key {key}: expected {expected}")
    for code in params.im_trans_opt:
        if code not in VALID_IM_TRANS_OPT:
            raise ParameterError(
                f"{where}: key ImTransOpt: unknown code {code}, expected 0 (none), 1 (flip "
                "left-right), 2 (flip top-bottom) or 3 (transpose)"
            )
    if 3 in params.im_trans_opt and params.nr_pixels_y != params.nr_pixels_z:
        raise ParameterError(f"{where}: key ImTransOpt: code 3 (transpose) needs a square detector")


def _convert(token: str, kind: type, where: str, key: str) -> Any:
    try:
        if kind is int:
            number = float(token)
            if number != int(number):
                raise ValueError
            return int(number)
        if kind is float:
            value = float(token)
            if not math.isfinite(value):
                raise ValueError
            return value
        if kind is bool:
            return bool(int(float(token)))
    except (ValueError, OverflowError):  # OverflowError: int(inf)
        raise ParameterError(
            f"{where}: key {key}: expected {'an integer' if kind in (int, bool) else 'a number'}, got {token!r}"
        ) from None
    return token


def _check_count(tokens: Sequence[str], count: int, where: str, key: str, what: str) -> None:
    """A numeric key must carry exactly ``count`` values (a stray token is a typo, not a comment)."""
    if len(tokens) != count:
        raise ParameterError(f"{where}: key {key}: expected {count} value{'s' if count > 1 else ''}"
                             f" ({what}), got {len(tokens)}: {' '.join(tokens)!r}")


def _strip_comment(line: str) -> str:
    return line.split("#", 1)[0].strip()


#: Keys whose absence is an error: without them the geometry is a guess (MIDAS would silently
#: use Lsd 1e6 µm, BC 1024 1024 px and Wavelength 0.172978 Å).
REQUIRED_KEYS: dict[str, tuple[tuple[str, ...], str]] = {
    "Lsd": (("Lsd", "DetDist"), "the sample-detector distance in µm"),
    "BC": (("BC",), "the beam centre Ycen Zcen in pixels"),
    "Wavelength": (("Wavelength",), "the wavelength in Å"),
}
#: Source name of command-line overrides in messages.
COMMAND_LINE = "command line"


def known_keys() -> set[str]:
    """Every parameter-file key midasflow recognises (used, ignored, refused or not applied)."""
    return (set(_KEYS) | set(_IGNORED) | set(_NOT_APPLIED) | set(_UNSUPPORTED) | set(PARAMETER_FILE_KEYS)
            | {"BC", "NrPixels", "ImTransOpt", "QBinSize"} | {f"p{i}" for i in range(N_DISTORTION_TERMS)})


def is_known_key(key: str) -> bool:
    """Whether ``key`` (leading dashes ignored) is a parameter-file key midasflow recognises."""
    return key.lstrip("-") in known_keys()


def nearest(name: str, candidates: Sequence[str] | set[str]) -> str | None:
    """The candidate closest to ``name`` (case-insensitive, dashes ignored), or None if none is
    close (:func:`difflib.get_close_matches`, cutoff 0.6)."""
    import difflib

    folded = {c.lstrip("-").lower(): c for c in sorted(candidates)}
    match = difflib.get_close_matches(name.lstrip("-").lower(), list(folded), n=1, cutoff=0.6)
    return folded[match[0]] if match else None


def _source_of(where: str) -> str:
    """The file (or "command line") part of a ``<file>:<line>`` / override location."""
    return COMMAND_LINE if where.startswith(COMMAND_LINE) else where.rsplit(":", 1)[0]


def _parse_lines(lines: Sequence[tuple[str, str]]) -> tuple[dict[str, Any], dict[str, list[str]],
                                                            dict[str, list[str]]]:
    """Parse (location, text) pairs into Params keyword arguments, the MIDAS keys whose values
    midasflow does not apply (with what that means) and the unknown keys, both by source.

    An unknown key from the command line (location "command line …") is an error naming the
    nearest known key; unknown keys of a file are kept (MIDAS files carry keys of other tools).
    """
    values: dict[str, Any] = {}
    im_trans: list[int] = []
    distortion: dict[int, float] = {}
    instrument: dict[str, float] = {}
    extra: dict[str, tuple[str, ...]] = {}
    unknown: dict[str, list[str]] = {}
    not_applied: dict[str, list[str]] = {}
    for where, raw in lines:
        text = _strip_comment(raw)
        if not text:
            continue
        key, *tokens = text.split()
        if key.startswith("--"):
            key = key[2:]
        if key in _UNSUPPORTED:
            raise ParameterError(f"{where}: key {key}: {_UNSUPPORTED[key]}")
        if not tokens and key not in _IGNORED:
            raise ParameterError(f"{where}: key {key}: expected a value after the key")
        if key == "QBinSize":
            if _convert(tokens[0], float, where, key) > 0:
                raise ParameterError(f"{where}: key QBinSize: Q-mode binning is not supported; "
                                     "expected 0, bin in R with RMin/RMax/RBinSize (pixels)")
        elif key in _NOT_APPLIED:
            neutral, consequence = _NOT_APPLIED[key]
            if _convert(tokens[0], float, where, key) != neutral:
                not_applied.setdefault(_source_of(where), []).append(f"{key} ({consequence})")
        elif key == "ImTransOpt":
            im_trans.extend(_convert(t, int, where, key) for t in tokens)
        elif key == "BC":
            _check_count(tokens, 2, where, key, "Ycen Zcen in pixels")
            values["bc_y_px"], values["bc_z_px"] = (_convert(t, float, where, key) for t in tokens)
        elif key == "NrPixels":
            _check_count(tokens, 1, where, key, "a pixel count")
            n = _convert(tokens[0], int, where, key)
            values["nr_pixels_y"] = values["nr_pixels_z"] = n
        elif key.startswith("p") and key[1:].isdigit() and int(key[1:]) < N_DISTORTION_TERMS:
            _check_count(tokens, 1, where, key, "a number")
            distortion[int(key[1:])] = _convert(tokens[0], float, where, key)
        elif key in PARAMETER_FILE_KEYS:
            _check_count(tokens, 1, where, key, "a number")
            instrument[PARAMETER_FILE_KEYS[key]] = _convert(tokens[0], float, where, key)
        elif key in _KEYS:
            spec = _KEYS[key]
            if spec.kind is str:
                values[spec.field] = " ".join(tokens)
            else:
                _check_count(tokens, spec.count, where, key,
                             "an integer" if spec.kind in (int, bool) else "a number")
                values[spec.field] = _convert(tokens[0], spec.kind, where, key)
        elif key in _IGNORED:
            continue
        elif where.startswith(COMMAND_LINE):
            close = nearest(key, known_keys())
            raise ParameterError(f"{where}: unknown parameter key {key!r}"
                                 + (f"; did you mean {close}?" if close else ""))
        else:
            extra[key] = tuple(tokens)
            unknown.setdefault(_source_of(where), []).append(key)
    if im_trans:
        values["im_trans_opt"] = tuple(im_trans)
    if distortion:
        values["p"] = tuple(distortion.get(i, 0.0) for i in range(N_DISTORTION_TERMS))
    if instrument:
        values["instrument_overrides"] = tuple(sorted(instrument.items()))
    if extra:
        values["extra"] = tuple(sorted(extra.items()))
    if values.get("omega_sum_frames") == 0:
        values["omega_sum_frames"] = 1  # MIDAS: 0 means 1
    return (values, {src: sorted(set(v)) for src, v in not_applied.items()},
            {src: sorted(set(v)) for src, v in unknown.items()})


def _override_lines(overrides: Sequence[str] | Mapping[str, Any]) -> list[tuple[str, str]]:
    """Command-line ``Key value [value ...]`` overrides as parameter-file lines."""
    if isinstance(overrides, Mapping):
        items = [(str(k), " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)) for k, v in overrides.items()]
        return [(f"command line override {k}", f"{k.lstrip('-')} {v}") for k, v in items]
    lines: list[tuple[str, str]] = []
    tokens = list(overrides)
    i = 0
    while i < len(tokens):
        key = tokens[i].lstrip("-")
        if is_number(tokens[i]):
            raise ParameterError(f"command line: {tokens[i]!r} has no key before it; expected "
                                 "'Key value ...' pairs, e.g. EtaBinSize 5")
        # the first token after a key is its value; later non-numeric tokens start the next key
        if i + 1 >= len(tokens) or (tokens[i + 1].startswith("-") and not is_number(tokens[i + 1])):
            raise ParameterError(f"command line: key {key}: expected a value after the key")
        j = i + 2
        while j < len(tokens) and is_number(tokens[j]):
            j += 1
        lines.append((f"command line override {key}", " ".join([key, *tokens[i + 1 : j]])))
        i = j
    return lines


def check_overrides(overrides: Sequence[str] | Mapping[str, Any]) -> None:
    """Check command-line overrides on their own, before any file is read: every key known and
    every value of the right kind (ParameterError naming the key otherwise)."""
    _parse_lines(_override_lines(overrides))


def is_number(token: str) -> bool:
    """Whether ``token`` reads as a number (a value, not a key, on a command line)."""
    try:
        float(token)
    except ValueError:
        return False
    return True


def read_params(path: str | Path, overrides: Sequence[str] | Mapping[str, Any] = ()) -> Params:
    """Read a MIDAS parameter file, apply command-line overrides, validate.

    Parameters
    ----------
    path : str or Path
        The parameter file (``Key value`` lines, ``#`` comments).
    overrides : sequence of str or mapping, optional
        ``["Lsd", "1000000", "BC", "1024", "1020"]`` (or ``--Lsd``) or ``{"Lsd": 1e6}``;
        applied after the file, so they win.

    Returns
    -------
    Params

    Raises
    ------
    ParameterError
        One line naming the file, line number and key, and what was expected.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ParameterError(f"{path}: parameter file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ParameterError(f"{path}: cannot read the parameter file ({exc.__class__.__name__})") from None
    lines = [(f"{path}:{n}", line) for n, line in enumerate(text.splitlines(), start=1)]
    override_lines = _override_lines(overrides)
    if any(line.split()[:1] == ["ImTransOpt"] for _, line in override_lines):
        # an override replaces the file's transform list instead of extending it
        lines = [(w, line) for w, line in lines if _strip_comment(line).split()[:1] != ["ImTransOpt"]]
    values, not_applied, unknown = _parse_lines(lines + override_lines)
    for source, keys in not_applied.items():
        warnings.warn(f"{source}: not applied by midasflow: {'; '.join(keys)}", UserWarning,
                      stacklevel=2)
    for source, keys in unknown.items():
        warnings.warn(f"{source}: keys not used by midasflow (kept in Params.extra): {', '.join(keys)}",
                      UserWarning, stacklevel=2)
    try:
        params = Params(source=str(path), **values)
    except ParameterError as exc:
        # add the line of the offending key when we know it
        message = str(exc)
        key = message.split("key ", 1)[1].split(":", 1)[0] if "key " in message else ""
        names = set(key.split("/"))  # "NrPixelsY/NrPixelsZ", and every alias of the field:
        fields = {_KEYS[k].field for k in names if k in _KEYS}
        names |= {k for k, spec in _KEYS.items() if spec.field in fields}
        if fields & {"nr_pixels_y", "nr_pixels_z"}:
            names.add("NrPixels")
        for where, line in reversed(lines + override_lines):
            if _strip_comment(line).split()[:1] and _strip_comment(line).split()[0].lstrip("-") in names:
                raise ParameterError(message.replace(f"{path}: ", f"{where}: ", 1)) from None
        raise
    given = {_strip_comment(line).split()[0].lstrip("-") for _, line in lines + override_lines
             if _strip_comment(line)}
    missing = [(name, what) for name, (aliases, what) in REQUIRED_KEYS.items() if not given & set(aliases)]
    if missing:
        raise ParameterError(
            f"{path}: missing key{'s' if len(missing) > 1 else ''} {', '.join(n for n, _ in missing)}: "
            f"expected {'; '.join(f'{n}, {w}' for n, w in missing)} (from the calibration; in the file "
            "or as a command-line override)")
    return params


def params_from_text(text: str, source: str = "<text>") -> Params:
    """Parse parameter-file text (as written by :meth:`Params.to_text`)."""
    values, _, _ = _parse_lines([(f"{source}:{n}", line) for n, line in enumerate(text.splitlines(), start=1)])
    return Params(source=source, **values)
