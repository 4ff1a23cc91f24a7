"""GSAS-II projects (``.gpx``) from a refined lineout, written without GSAS-II.

A ``.gpx`` file is GSAS-II's data tree as a sequence of pickles, one per top-level tree item:
each is a list of ``[name, data]`` pairs, the item first and its children after it. This module
writes one project per lineout with the layout GSAS-II's GUI and ``GSASIIscriptable`` read
(``docs/reference/gsas2_project.md``): the histogram (data, limits, Chebyshev background,
instrument and sample parameters, reflection lists), the phases (refined cell, atoms, size and
microstrain, GSAS-II's space-group record), and Controls and Covariance with the refined
variables under GSAS-II's names, so GSAS-II can show the fit and refine on from it.

Only builtins and plain numpy arrays go into the pickles (protocol 2, as GSAS-II writes); the
file is written under a temporary name and renamed. Nothing here reads a ``.gpx``.
"""
from __future__ import annotations

import hashlib
import math
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gemmi
import numpy as np

from midasflow.crystal import Atom, Phase, cell_volume, laue_rotations, laue_tie_matrix
from midasflow.instrument import Instrument, as_instrument
from midasflow.io.atomic import atomic_output
from midasflow.io.gpx_symmetry import SpaceGroupRecord, UnsupportedSetting, site_symmetry, \
    space_group_record
from midasflow.profile import SHL_MIN
from midasflow.texture.po import PreferredOrientation

if TYPE_CHECKING:  # pragma: no cover
    from midasflow.refinement.result import PatternResult

__all__ = ["GPX_PROTOCOL", "NoFittedPattern", "UnsupportedSetting", "gsas2_name", "refined_names",
           "write_gpx"]


class NoFittedPattern(ValueError):
    """The result carries no fitted points, weights and calculated pattern to write (a backend
    that returns none of them, e.g. GSAS-II's)."""


#: Pickle protocol of every tree item (GSAS-II's GUI writes 2, its scripting module 1).
GPX_PROTOCOL = 2
#: GSAS-II's default refinement controls (``GSASIIobj.DefaultControls``).
_CONTROLS = {
    "deriv type": "analytic Hessian", "min dM/M": 0.001, "shift factor": 1.0, "max cyc": 3,
    "F**2": False, "SVDtol": 1e-6,
    "UsrReject": {"minF/sig": 0.0, "MinExt": 0.01, "MaxDF/F": 100.0, "MaxD": 500.0, "MinD": 0.05},
    "Copy2Next": False, "Reverse Seq": False, "HatomFix": False, "Author": "midasflow",
    "newLeBail": False, "FreePrm1": "Sample humidity (%)", "FreePrm2": "Sample voltage (V)",
    "FreePrm3": "Applied load (MN)", "ShowCell": False,
}
#: Histogram-level parameters of the engine that GSAS-II keys ``:0:<name>``.
_INSTRUMENT_TERMS = ("Zero", "U", "V", "W", "X", "Y", "Z", "SH/L")
#: GSAS-II's number of generalised-microstrain and hydrostatic-strain terms per Laue class
#: (``GSASIIspc.MustrainNames`` / ``HStrainNames``).
_N_MUSTRAIN = {"m3": 2, "m3m": 2, "6/m": 3, "6/mmm": 3, "3m1": 3, "3": 3, "31m": 4, "3R": 4,
               "3mR": 4, "4/m": 4, "4/mmm": 4, "mmm": 6, "2/m": 9, "-1": 15}
_N_HSTRAIN = {"m3": 2, "m3m": 2, "6/m": 2, "6/mmm": 2, "3m1": 2, "31m": 2, "3": 2, "3R": 2,
              "3mR": 2, "4/m": 2, "4/mmm": 2, "mmm": 3, "2/m": 4, "-1": 6}
#: Upper limit beyond the engine's last reflection (deg): GSAS-II keeps it after a cell shift.
_LIMIT_MARGIN_DEG = 0.01
#: Neutral drawing colour of every atom type (GSAS-II replaces it with its own element colour
#: when the phase is first shown).
_ATOM_COLOUR = (200, 200, 200)


def gsas2_name(name: str) -> str:
    """GSAS-II's variable name of a :class:`~midasflow.refinement.result.PatternResult` key.

    Histogram terms get the histogram prefix (``'U'`` → ``':0:U'``, ``'Back;2'`` →
    ``':0:Back;2'``), atom coordinates become GSAS-II's shifts (``'0::Ax:1'`` → ``'0::dAx:1'``);
    phase and phase-histogram names (``'0::A0'``, ``'0:0:Scale'``, ``'0:0:Size;i'``) are
    GSAS-II's already.
    """
    if ":" not in name:
        return f":0:{name}"
    pfx, sep, rest = name.partition("::")
    if sep and rest[:2] in ("Ax", "Ay", "Az") and rest[2:3] == ":":
        return f"{pfx}::d{rest}"
    return name


def _ran_id(*parts: str) -> int:
    """A stable 63-bit identifier (GSAS-II's ``ranId``) from names: rewriting a lineout gives
    the same file."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def refined_names(pattern: PatternResult) -> list[str]:
    """The variables a project flags for GSAS-II to refine, in the order of ``pattern.esds``: the
    refined ones but SH/L held on its 0.002 floor. The engine keeps that SH/L in its covariance
    (docs/reference/gsas2_profile.md section 6), but GSAS-II's model has no derivative there and
    one GSAS-II cycle with it flagged made a demo lineout's Rwp 1 % worse instead of keeping it."""
    return [n for n in pattern.esds
            if not (n == "SH/L" and pattern.values.get("SH/L", math.inf) <= SHL_MIN)]


def _flag(pattern: PatternResult, name: str) -> bool:
    return name in refined_names(pattern)


def _value(pattern: PatternResult, name: str, default: float) -> float:
    value = pattern.values.get(name)
    return float(default if value is None else value)


# ------------------------------------------------------------------------------- histogram

def _instrument_parameters(pattern: PatternResult, inst: Instrument,
                           eta_deg: float | None) -> list[dict]:
    """``[{key: [start, current, refine]}, {}]`` (GSAS-II's CW instrument dict)."""
    start = inst.to_dict()
    out: dict[str, list] = {"Type": [inst.type, inst.type, False],
                            "Bank": [float(inst.bank), float(inst.bank), False]}
    if inst.is_doublet:
        for key in ("Lam1", "Lam2", "I(L2)/I(L1)"):
            out[key] = [float(start[key]), float(start[key]), False]
    else:
        out["Lam"] = [float(inst.lam), float(inst.lam), False]
    out["Polariz."] = [float(inst.polariz), float(inst.polariz), False]
    # GSAS-II's MIDAS importer records the lineout's azimuth as 90° − η (unused by the fit)
    azimuth = float(inst.azimuth) if eta_deg is None else 90.0 - float(eta_deg)
    out["Azimuth"] = [azimuth, azimuth, False]
    for key in _INSTRUMENT_TERMS:
        first = float(start[key])
        out[key] = [first, _value(pattern, key, first), _flag(pattern, key)]
    for key, value in inst.extra.items():
        if isinstance(value, str):
            out[key] = [value, value, False]
        else:
            out[key] = [float(value), float(value), False]
    return [out, {}]


def _sample_parameters(pattern: PatternResult, inst: Instrument, ran_id: int,
                       omega_deg: float | None, sample_azimuth_deg: float) -> dict:
    """GSAS-II's Sample Parameters of a CW histogram.

    The engine models sample displacement as Debye–Scherrer (DisplaceX/Y); a Bragg–Brentano
    instrument is written as such (with GSAS-II's Shift, Transparency and roughness terms at 0)
    only when no displacement entered the fit.
    """
    sample: dict[str, Any] = {"InstrName": inst.instr_name, "ranId": ran_id,
                              "Scale": [_value(pattern, "Scale", 1.0), _flag(pattern, "Scale")]}
    displacement = {key: [_value(pattern, key, start), _flag(pattern, key)]
                    for key, start in (("DisplaceX", inst.displace_x_um),
                                       ("DisplaceY", inst.displace_y_um))}
    if "Bragg" in inst.diff_type and not any(v or f for v, f in displacement.values()):
        sample.update({"Type": "Bragg-Brentano", "Shift": [0.0, False],
                       "Transparency": [0.0, False], "SurfRoughA": [0.0, False],
                       "SurfRoughB": [0.0, False]})
    else:
        sample.update({"Type": "Debye-Scherrer", "Absorption": [0.0, False], **displacement})
    sample.update({
        "Temperature": 300.0, "Pressure": 0.1, "Time": 0.0, "FreePrm1": 0.0, "FreePrm2": 0.0,
        "FreePrm3": 0.0, "Gonio. radius": float(inst.gonio_radius_mm), "Omega": 0.0, "Chi": 0.0,
        # GSAS-II's MIDAS importer puts the ω-group's mid ω in Phi
        "Phi": 0.0 if omega_deg is None else float(omega_deg),
        "Azimuth": float(sample_azimuth_deg),
        "Materials": [{"Name": "vacuum", "VolFrac": 1.0}, {"Name": "vacuum", "VolFrac": 0.0}],
        "Thick": 1.0, "Contrast": [0.0, 0.0], "Trans": 1.0, "SlitLen": 0.0,
    })
    return sample


def _background(pattern: PatternResult) -> list:
    n = 0
    while f"Back;{n}" in pattern.values:
        n += 1
    coeffs = [float(pattern.values[f"Back;{i}"]) for i in range(n)]
    refine = any(_flag(pattern, f"Back;{i}") for i in range(n))
    return [["chebyschev-1", refine, n, *coeffs],
            {"nDebye": 0, "debyeTerms": [], "nPeaks": 0, "peaksList": [],
             "background PWDR": ["", 1.0, False]}]


def _residuals(x: np.ndarray, y: np.ndarray, w: np.ndarray, yc: np.ndarray,
               yb: np.ndarray) -> dict[str, float]:
    """GSAS-II's histogram residuals over the points it counts (``GSASIIstrMath.getPowderProfile``
    definitions)."""
    sum_wyo2 = float(np.sum(w * y**2))
    wdy = np.sqrt(w) * (y - yc)
    peaks = yc != yb
    ymb = np.abs(y - yb)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(peaks & (y != 0), np.abs(y - yc) * ymb / y, 0.0)
    rb_den, wrb_den = float(np.sum(ymb[peaks])), float(np.sum(w[peaks] * ymb[peaks] ** 2))
    out = {
        "Nobs": int(x.size), "sumwYo": sum_wyo2,
        "R": min(100.0, 100.0 * float(np.sum(np.abs(y - yc)) / np.sum(y))),
        "wR": min(100.0, 100.0 * math.sqrt(float(wdy @ wdy) / sum_wyo2)),
        "wRmin": min(100.0, 100.0 * math.sqrt(x.size / sum_wyo2)),
        "Durbin-Watson": float(np.sum(np.diff(wdy) ** 2) / (wdy @ wdy)),
    }
    if rb_den > 0 and wrb_den > 0:
        out["Rb"] = min(100.0, 100.0 * float(np.sum(scaled)) / rb_den)
        out["wRb"] = min(100.0, 100.0 * math.sqrt(float(np.sum(w * scaled**2)) / wrb_den))
    return out


# ---------------------------------------------------------------------------------- phases

def _sh_coefficients(pattern: PatternResult, p: int) -> dict[str, float]:
    """Phase ``p``'s spherical-harmonics preferred-orientation coefficients, ``{"C(l,n)": value}``
    (empty without the SH texture model)."""
    prefix = f"{p}:0:C("
    return {name[len(prefix) - 2:]: float(v) for name, v in pattern.values.items()
            if name.startswith(prefix)}


def _sh_order(coefficients: Mapping[str, float]) -> int:
    return max((int(name[2:].split(",")[0]) for name in coefficients), default=0)


def _preferred_orientation(table: Mapping[str, np.ndarray], phase: Phase, p: int,
                           pattern: PatternResult, po_axis: Sequence[int]) -> np.ndarray:
    """PO_h of every reflection, as the engine's texture model gives it (1 without texture)."""
    hkl = np.column_stack([table["h"], table["k"], table["l"]]).astype(float)
    sh = _sh_coefficients(pattern, p)
    r = _value(pattern, f"{p}:0:MD", 1.0)
    if not hkl.shape[0] or (r == 1.0 and not any(sh.values())):
        return np.ones(hkl.shape[0])
    equivalents = np.einsum("ni,rij->nrj", hkl, laue_rotations(phase.space_group))
    model = PreferredOrientation("sh" if sh else "md", f"{p}:0:", hkl, equivalents, phase.cell,
                                 phase.laue, phase.unique_axis, po_axis, max(_sh_order(sh), 2))
    po, _ = model.correction(pattern.values, [], table["tth_deg"])
    return np.broadcast_to(np.asarray(po, dtype=float), (hkl.shape[0],)).copy()


def _reflection_list(table: Mapping[str, np.ndarray], po: np.ndarray, lebail: bool) -> np.ndarray:
    """GSAS-II's CW powder ``RefList`` (n, 15): h, k, l, mult, d, 2θ, σ², γ, Fo², Fc², phase,
    Icorr, PO (``po``), absorption, extinction.

    Icorr = intensity / Fc² (scale × multiplicity × LP × PO / V, so Icorr·Fc² is the
    reflection's integrated intensity). Fo² is the engine's extracted value in a Le Bail fit
    (Fc² = Fo² there, as GSAS-II holds them) and 0 after a Rietveld fit (GSAS-II computes it on
    its next refinement).
    """
    hkl = np.column_stack([table["h"], table["k"], table["l"]]).astype(float)
    n = hkl.shape[0]
    fsq = np.asarray(table["fsq"], dtype=float)
    intensity = np.asarray(table["intensity"], dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        icorr = np.where(fsq > 0, intensity / fsq, 0.0)
    ref = np.zeros((n, 15))
    ref[:, :3] = hkl
    ref[:, 3] = table["mult"]
    ref[:, 4] = table["d_a"]
    ref[:, 5] = table["tth_deg"]
    ref[:, 6] = table["sig2"]
    ref[:, 7] = table["gam"]
    ref[:, 8] = fsq if lebail else 0.0
    ref[:, 9] = fsq
    ref[:, 11] = icorr
    ref[:, 12] = po
    ref[:, 13:15] = 1.0
    return ref


def _reflection_residuals(ref: np.ndarray, p: int) -> dict[str, float | int]:
    """GSAS-II's per-phase histogram residuals of a reflection list: RF and RF² from Fo² and Fc²
    (``GSASIIstrMath.GetFobsSq``; 100 % when no Fo² is held, as after a Rietveld fit here) and
    the number of reflections. GSAS-II's GUI shows them whenever the histogram is selected."""
    fo2, fc2 = ref[:, 8], ref[:, 9]
    sum_fo = float(np.sum(np.sqrt(np.abs(fo2))))
    if sum_fo > 0:
        rf = min(100.0, 100.0 * float(np.sum(np.abs(np.sqrt(np.abs(fo2)) - np.sqrt(np.abs(fc2)))))
                 / sum_fo)
        rf2 = min(100.0, 100.0 * math.sqrt(float(np.sum((fo2 - fc2) ** 2)) / float(np.sum(fo2**2))))
    else:
        rf = rf2 = 100.0
    return {f"{p}:0:Rf": rf, f"{p}:0:Rf^2": rf2, f"{p}:0:Nref": int(ref.shape[0])}


def _atoms(phase: Phase, p: int, pattern: PatternResult, record: SpaceGroupRecord,
           stem: str) -> list[list]:
    """GSAS-II's nuclear atom records: label, type, refine flags, x, y, z, frac, site symmetry,
    multiplicity, 'I', Uiso, U11..U23, ranId."""
    rows = []
    for j, atom in enumerate(phase.atoms):
        xyz = np.mod(np.asarray(atom.xyz, dtype=float) - record.origin_shift, 1.0)
        xyz = np.where(np.isclose(xyz, 1.0, atol=1e-12), 0.0, xyz)
        sym, mult = site_symmetry(xyz, record)
        flags = ("X" if any(_flag(pattern, f"{p}::A{c}:{j}") for c in "xyz") else "") + \
                ("U" if _flag(pattern, f"{p}::AUiso:{j}") else "")
        rows.append([atom.label, _element(atom), flags, *map(float, xyz), float(atom.occ), sym,
                     int(mult), "I", float(atom.uiso), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                     _ran_id(stem, phase.name, atom.label, str(j))])
    return rows


def _element(atom: Atom) -> str:
    return gemmi.Element(atom.element).name


def _general(phase: Phase, record: SpaceGroupRecord, atoms: list[list], cell_refined: bool,
             folder: str) -> dict:
    """The phase's General dict: GSAS-II's defaults plus the composition computed here."""
    types: list[str] = []
    counts: dict[str, float] = {}
    for row in atoms:
        el = row[1]
        if el not in types:
            types.append(el)
        counts[el] = counts.get(el, 0.0) + row[6] * row[8]
    elements = [gemmi.Element(el) for el in types]
    masses = [float(e.weight) for e in elements]
    a, b, c, al, be, ga = (float(v) for v in phase.cell)
    return {
        "Name": phase.name, "Type": "nuclear", "Modulated": False, "AtomPtrs": [3, 1, 7, 9],
        "SGData": record.sg_data,
        "Cell": [cell_refined, a, b, c, al, be, ga, cell_volume(phase.cell)],
        "Pawley dmin": 1.0, "Data plot type": "None",
        "SH Texture": {"Order": 0, "Model": "cylindrical", "Sample omega": [False, 0.0],
                       "Sample chi": [False, 0.0], "Sample phi": [False, 0.0],
                       "SH Coeff": [False, {}], "SHShow": False, "PFhkl": [0, 0, 1],
                       "PFxyz": [0, 0, 1], "PlotType": "Pole figure",
                       "Penalty": [[""], 0.1, False, 1.0]},
        "Super": 0, "AtomTypes": types,
        "Isotopes": {el: {"Nat. Abund.": {"Mass": m, "SL": [float(e.neutron92.get_coefs()[0]) / 10.0, 0]}}
                     for el, e, m in zip(types, elements, masses)},
        "Isotope": {el: "Nat. Abund." for el in types},
        "POhkl": [0, 0, 1],
        "Map": {"MapType": "", "RefList": "", "GridStep": 0.25, "Show bonds": True, "rho": [],
                "rhoMax": 0.0, "mapSize": 4.0, "cutOff": 50.0, "Flip": False},
        "Flip": {"RefList": "", "GridStep": 0.25, "Norm element": "None", "k-factor": 0.1,
                 "k-Max": 20.0, "testHKL": [[0, 0, 2], [2, 0, 0], [1, 1, 1], [0, 2, 0], [1, 2, 3]]},
        "doPawley": False, "Pawley dmax": 100.0, "Pawley neg wt": 0.0, "3Dproj": "",
        "doDysnomia": False,
        "MCSA controls": {"Data source": "", "Annealing": [0.7, 0.1, 250], "dmin": 2.8,
                          "Algorithm": "log", "fast parms": [0.8, 0.6], "log slope": 0.9,
                          "Cycles": 1, "Results": [], "newDmin": True},
        "HydIds": {},
        "Compare": {"Oatoms": "", "Tatoms": "", "Tilts": {"Otilts": [], "Ttilts": []},
                    "Bonds": {"Obonds": [], "Tbonds": []}, "Vects": {"Ovec": [], "Tvec": []},
                    "dVects": {"Ovec": [], "Tvec": []}, "Sampling": 1.0},
        "SpnIds": {}, "NoAtoms": counts,
        # drawing radii and colours: GSAS-II's General tab replaces them with its own tables
        "BondRadii": [float(e.covalent_r) for e in elements],
        "AngleRadii": [float(e.covalent_r) for e in elements],
        "vdWRadii": [float(e.vdw_r) for e in elements],
        "AtomMass": masses, "Color": [_ATOM_COLOUR] * len(types), "Mydir": folder,
        "Mass": float(sum(masses[types.index(el)] * n for el, n in counts.items())),
    }


def _histogram_phase(pattern: PatternResult, phase: Phase, p: int, hist_name: str,
                     lebail: bool, po_axis: Sequence[int]) -> dict:
    """GSAS-II's phase-in-histogram ("HAP") dict: scale, preferred orientation (March–Dollase
    along ``po_axis``, or spherical harmonics when the engine refined them), size, microstrain
    (isotropic, as refined), hydrostatic strain (none)."""
    nm, nh = _N_MUSTRAIN[phase.laue], _N_HSTRAIN[phase.laue]
    sh = _sh_coefficients(pattern, p)
    if sh:
        pref = ["SH", 1.0, any(_flag(pattern, f"{p}:0:{c}") for c in sh), [int(v) for v in po_axis],
                _sh_order(sh), sh, [""], 0.1]
    else:
        pref = ["MD", _value(pattern, f"{p}:0:MD", 1.0), _flag(pattern, f"{p}:0:MD"),
                [int(v) for v in po_axis], 0, {}, [""], 0.1]
    size = _value(pattern, f"{p}:0:Size;i", 1.0)
    strain = _value(pattern, f"{p}:0:Mustrain;i", 1000.0)
    return {
        "Histogram": hist_name, "Show": False,
        "Scale": [_value(pattern, f"{p}:0:Scale", 1.0), _flag(pattern, f"{p}:0:Scale")],
        "Type": "PWDR",
        "Pref.Ori.": pref,
        "Size": ["isotropic", [size, size, 1.0], [_flag(pattern, f"{p}:0:Size;i"), False, False],
                 [0, 0, 1], [1.0, 1.0, 1.0, 0.0, 0.0, 0.0], [False] * 6],
        "Mustrain": ["isotropic", [strain, strain, 1.0],
                     [_flag(pattern, f"{p}:0:Mustrain;i"), False, False], [0, 0, 1],
                     [0.01] * nm, [False] * nm],
        "HStrain": [[0.0] * nh, [False] * nh],
        "Extinction": [0.0, False], "Babinet": {"BabA": [0.0, False], "BabU": [0.0, False]},
        "hId": 0, "Use": True, "LeBail": lebail,
    }


# ------------------------------------------------------------------------------ covariance

def _dependent_cell_terms(pattern: PatternResult, phases: Sequence[Phase]
                          ) -> dict[str, tuple[float, float]]:
    """Value and esd of every A-term the Laue class ties to the refined ones (GSAS-II's
    depSigDict lists e.g. A1 and A2 of a cubic cell beside A0)."""
    out: dict[str, tuple[float, float]] = {}
    names = list(pattern.esds)
    cov = pattern.covariance
    for p, phase in enumerate(phases):
        tie, free = laue_tie_matrix(phase.laue, phase.unique_axis)
        keys = [f"{p}::A{i}" for i in free]
        if not all(k in names for k in keys) or cov is None:
            continue
        idx = [names.index(k) for k in keys]
        cov_p = cov[np.ix_(idx, idx)]
        A = tie @ np.array([pattern.values[k] for k in keys])
        sig = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", tie, cov_p, tie), 0.0))
        for i in range(6):
            if tie[i].any() and f"{p}::A{i}" not in names:
                out[f"{p}::A{i}"] = (float(A[i]), float(sig[i]))
    return out


def _covariance(pattern: PatternResult, phases: Sequence[Phase],
                records: Sequence[SpaceGroupRecord], title: str) -> dict:
    """GSAS-II's Covariance item: refined variables (GSAS-II names, :func:`refined_names`), their values and esds, the covariance matrix and the residuals.

    Atom coordinates are GSAS-II shifts ``dAx``: 0 here, the refined coordinates being in the
    atom records already (``newAtomDict`` names them, in the written setting).
    """
    names = refined_names(pattern)
    vary = [gsas2_name(n) for n in names]
    shifted = ["::dA" in g for g in vary]
    values = np.array([0.0 if moved else float(pattern.values[n])
                       for n, moved in zip(names, shifted)])
    sig = np.array([float(pattern.esds[n]) for n in names])
    kept = [list(pattern.esds).index(n) for n in names]
    cov = (np.array(pattern.covariance, dtype=float)[np.ix_(kept, kept)]
           if pattern.covariance is not None else np.diag(sig**2))
    dep = {g: (float(v), float(e)) for g, v, e in zip(vary, values, sig)}
    dep.update(_dependent_cell_terms(pattern, phases))
    new_atoms = {}
    for n, g, moved in zip(names, vary, shifted):
        if moved:
            p, axis = int(n.split("::")[0]), "xyz".index(n.split("::A")[1][0])
            coord = float(pattern.values[n]) - float(records[p].origin_shift[axis])
            new_atoms[g] = [g.replace("::dA", "::A"), coord % 1.0]
    rvals = {"Rwp": float(pattern.rwp), "chisq": float(pattern.chi2), "GOF": float(pattern.gof),
             "Nobs": int(pattern.n_points), "Nvars": len(vary), "RestraintSum": 0,
             "RestraintTerms": 0, "Restraints": {}, "nRestraints": {}}
    return {"variables": values, "varyList": vary, "sig": sig, "Rvals": rvals,
            "varyListStart": tuple(vary), "Lastshft": np.zeros(len(vary)), "covMatrix": cov,
            "title": title, "newAtomDict": new_atoms, "newCellDict": {}, "freshCOV": True,
            "depSigDict": dep}


# ----------------------------------------------------------------------------------- writer

def _upper_limit(last_deg: float, reflection_lists: Mapping[str, dict]) -> float:
    """The histogram's upper 2θ limit: its last point, or beyond it up to the engine's last
    reflection (whose tail reaches into the range) so that GSAS-II, which generates the
    reflections up to the upper limit, models the same peaks."""
    top = float(last_deg)
    for table in reflection_lists.values():
        tth = table["RefList"][:, 5]
        if tth.size:
            top = max(top, float(tth.max()) + _LIMIT_MARGIN_DEG)
    return top


@dataclass(frozen=True)
class _Points:
    """The histogram's points: ``x, y, w, yc, yb`` (2θ ascending); the refined range runs from
    point ``first`` (GSAS-II's lower limit) to the last point."""

    x: np.ndarray
    y: np.ndarray
    w: np.ndarray
    yc: np.ndarray
    yb: np.ndarray
    first: int

    @property
    def diff(self) -> np.ndarray:
        """y − yc inside the limits, 0 below (as GSAS-II leaves it)."""
        return np.where(np.arange(self.x.size) >= self.first, self.y - self.yc, 0.0)


def _fitted_points(pattern: PatternResult, path: Path) -> tuple[np.ndarray, ...]:
    arrays = tuple(np.asarray(a, dtype=np.float64) for a in
                   (pattern.tth_deg, pattern.obs, pattern.weight, pattern.calc, pattern.bkg))
    x = arrays[0]
    if not (x.size and all(a.shape == x.shape for a in arrays)):
        raise NoFittedPattern(f"{path}: the lineout's fitted points, weights and calculated pattern "
                              "are needed (a result of midasflow's engine)")
    return arrays


def _points(pattern: PatternResult, path: Path,
            data: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
            limits: Sequence[float] | None) -> _Points:
    """The histogram: the fitted points alone (``data`` None), or the lineout ``data`` up to the
    refined range's end, with the fit filled in where the engine refined it.

    Of ``data`` (2θ, intensity, σ), points without a finite 2θ are left out (GSAS-II holds none);
    weight = 1/σ², 0 where σ ≤ 0 or σ or the intensity is not finite (an intensity that is not
    finite is written as 0). The refined range is the points inside ``limits`` (all without), as
    the engine takes them; they must hold every fitted point and, besides, exactly the
    ``pattern.n_dropped`` points the engine dropped. Those have weight 0, as GSAS-II's MIDAS
    importer gives points it cannot weigh (GSAS-II's excluded regions would mask them, but its
    Le Bail extraction diverges when they cut into a peak, and its Chebyshev background needs
    the range's first and last point unmasked); their yc and yb are interpolated between the
    neighbouring fitted points, for the plot. Below the range yc and yb are 0, as GSAS-II
    leaves them. Points above the range (an upper limit below the lineout's
    end) are left out: GSAS-II generates reflections only up to its upper limit and refines
    every point up to it, so the engine's reflections past the range's end, whose tails it
    modelled, and its points cannot both be had with them in.
    """
    fx, fy, fw, fyc, fyb = _fitted_points(pattern, path)
    if data is None:
        return _Points(fx, fy, fw, fyc, fyb, 0)
    x, y, sigma = (np.asarray(a, dtype=np.float64).ravel() for a in data)
    if not x.size == y.size == sigma.size:
        raise ValueError(f"{path}: data arrays differ in length: 2θ {x.size}, intensity {y.size}, "
                         f"sigma {sigma.size}")
    order = np.argsort(x, kind="stable")
    keep = order[np.isfinite(x[order])]
    x, y, sigma = x[keep], y[keep], sigma[keep]
    usable = np.isfinite(y) & np.isfinite(sigma) & (sigma > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(usable, 1.0 / sigma**2, 0.0)
    y = np.where(np.isfinite(y), y, 0.0)
    inside = (np.ones(x.size, dtype=bool) if limits is None
              else (x >= float(limits[0])) & (x <= float(limits[1])))
    # the k-th of equal 2θ values is the k-th there (two bins inside one pixel sample the same
    # 2θ, docs/caking_2theta.md)
    at = np.searchsorted(x, fx) + np.arange(fx.size) - np.searchsorted(fx, fx)
    found = at < x.size
    found[found] = x[at[found]] == fx[found]
    found[found] &= (y[at[found]] == fy[found]) & inside[at[found]] & usable[at[found]]
    n_range = int(inside.sum())
    if not (found.all() and np.all(np.diff(at) > 0) and n_range - fx.size == pattern.n_dropped):
        where = "the whole lineout" if limits is None else f"limits {limits[0]:g}..{limits[1]:g} deg"
        raise ValueError(f"{path}: data ({where}) are not the points the lineout was refined "
                         f"from: {int(found.sum())} of its {fx.size} fitted points and "
                         f"{n_range - int(found.sum())} other points inside, expected "
                         f"{pattern.n_dropped} dropped")
    first, last = int(np.flatnonzero(inside)[0]), int(np.flatnonzero(inside)[-1])
    # GSAS-II generates reflections only up to its upper limit, and takes in every point up to
    # it (and one beyond): to model the engine's reflections past the range's end with the
    # engine's points, no point may follow the range
    x, y, w, inside = x[:last + 1], y[:last + 1], w[:last + 1], inside[:last + 1]
    yc, yb = np.zeros_like(x), np.zeros_like(x)
    yc[at], yb[at], w[at] = fyc, fyb, fw
    dropped = inside.copy()
    dropped[at] = False
    yc[dropped] = np.interp(x[dropped], fx, fyc)
    yb[dropped] = np.interp(x[dropped], fx, fyb)
    return _Points(x, y, w, yc, yb, first)


def _tree(pattern: PatternResult, inst: Instrument, path: Path, *, lebail: bool,
          histogram_name: str, comments: Sequence[str], omega_deg: float | None,
          eta_deg: float | None, sample_azimuth_deg: float, po_axis: Sequence[int],
          data: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
          limits: Sequence[float] | None) -> list[list[list]]:
    stem = path.stem
    phases = list(pattern.phases)
    records = [space_group_record(ph.space_group, ph.laue) for ph in phases]
    points = _points(pattern, path, data, limits)
    hist_id = _ran_id(stem, "histogram")
    residuals = _residuals(*(a[points.first:] for a in (points.x, points.y, points.w, points.yc,
                                                        points.yb)))
    phase_items, reflection_lists = [], {}
    for p, (phase, record) in enumerate(zip(phases, records)):
        name = phase.name
        cell = pattern.cells.get(name, tuple(phase.cell) + (cell_volume(phase.cell),))[:6]
        phase = phase.with_cell(cell)
        atoms = _atoms(phase, p, pattern, record, stem)
        cell_refined = any(_flag(pattern, f"{p}::A{i}") for i in range(6))
        phase_data = {
            "ranId": _ran_id(stem, "phase", name),
            "General": _general(phase, record, atoms, cell_refined, str(path.parent.resolve())),
            "Atoms": atoms, "Drawing": {},
            "Histograms": {histogram_name: _histogram_phase(pattern, phase, p, histogram_name,
                                                            lebail, po_axis)},
            "Pawley ref": [], "RBModels": {}, "pId": p,
        }
        phase_items.append([name, phase_data])
        table = pattern.reflections.get(name)
        if table is not None:
            po = _preferred_orientation(table, phase, p, pattern, po_axis)
            ref = _reflection_list(table, po, lebail)
            reflection_lists[name] = {"RefList": ref, "FF": {}, "Type": inst.type, "Super": False}
            residuals.update(_reflection_residuals(ref, p))
        residuals[f"{p}::Name"] = name
    x, y = points.x, points.y
    ymin, ymax = float(y.min()), float(y.max())
    hist_dict = {"wtFactor": 1.0, "Dummy": False, "ranId": hist_id, "Offset": [0.0, 0.0],
                 "delOffset": 0.02 * ymax, "refOffset": -0.1 * ymax, "refDelt": 0.1 * ymax,
                 "Yminmax": [ymin, ymax], "hId": 0, **residuals}
    arrays = [x.copy(), y.copy(), points.w.copy(), points.yc.copy(), points.yb.copy(), points.diff]
    lo, hi = float(x[points.first]), _upper_limit(x[-1], reflection_lists)
    limits_item = [(float(x[0]), hi), [lo, hi]]
    histogram = [
        [histogram_name, [hist_dict, arrays, histogram_name]],
        ["Comments", [str(c) for c in comments]],
        ["Limits", limits_item],
        ["Background", _background(pattern)],
        ["Instrument Parameters", _instrument_parameters(pattern, inst, eta_deg)],
        ["Sample Parameters", _sample_parameters(
            pattern, inst, hist_id,
            # GSAS-II's spherical-harmonics PO turns the sample by Phi; the engine's does not
            None if any(_sh_coefficients(pattern, p) for p in range(len(phases))) else omega_deg,
            sample_azimuth_deg)],
        ["Peak List", {"peaks": [], "sigDict": {}}],
        ["Index Peak List", [[], []]],
        ["Unit Cells List", []],
        ["Reflection Lists", reflection_lists],
    ]
    controls = dict(_CONTROLS, parmFrozen={"FrozenList": []},
                    LastSavedAs=str(path.resolve()))
    notebook = [f"[midasflow] {line}" for line in comments]
    return [
        [["Notebook", notebook]],
        [["Controls", controls]],
        [["Covariance", _covariance(pattern, phases, records, str(path.resolve()))]],
        [["Constraints", {"Hist": [], "HAP": [], "Phase": [], "Global": [],
                          "_seqmode": "auto-wildcard", "_seqhist": 0}]],
        [["Restraints", {}]],
        [["Rigid bodies", {"Vector": {"AtInfo": {}}, "Residue": {"AtInfo": {}}, "Spin": {},
                           "RBIds": {"Vector": [], "Residue": [], "Spin": []}}]],
        histogram,
        [["Phases", None], *phase_items],
    ]


def write_gpx(path: str | os.PathLike, pattern: PatternResult,
              instrument: Instrument | Mapping[str, Any] | str | os.PathLike, *,
              mode: str = "rietveld", histogram_name: str | None = None,
              comments: Sequence[str] = (), omega_deg: float | None = None,
              eta_deg: float | None = None, sample_azimuth_deg: float = 0.0,
              po_axis: Sequence[int] = (0, 0, 1),
              data: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
              limits: Sequence[float] | None = None) -> Path:
    """Write a refined lineout as a GSAS-II project.

    With ``data`` the histogram holds the whole lineout, as GSAS-II's importer reads it, and
    GSAS-II's limits are the range the engine refined (``limits``); without, it holds the fitted
    points only.

    Parameters
    ----------
    path : path-like
        The ``.gpx`` file (written under a temporary name, then renamed).
    pattern : PatternResult
        A refinement by midasflow's engine (fitted points, weights, calculated pattern,
        values, esds and covariance, refined phases, reflection tables).
    instrument : Instrument, mapping or .instprm path
        The instrument the lineout was refined with (start values of the profile terms,
        wavelength, polarisation, goniometer radius).
    mode : {"rietveld", "lebail"}
        The refinement mode (Le Bail: the phases' ``LeBail`` flag on, extracted Fo² kept).
    histogram_name : str, optional
        GSAS-II histogram name (``'PWDR …'``); default ``'PWDR <file stem>'``.
    comments : sequence of str
        Lines for the histogram's Comments (and, prefixed, the project Notebook).
    omega_deg, eta_deg : float, optional
        The lineout's ω (→ sample Phi) and η (→ instrument Azimuth 90° − η), as GSAS-II's MIDAS
        importer records them; neither enters the fit (Phi is left 0 when spherical-harmonics
        preferred orientation was refined: GSAS-II's would turn the sample by it).
    sample_azimuth_deg : float
        Sample Azimuth of the polarisation correction the engine used (degrees).
    po_axis : (h, k, l)
        March–Dollase axis the engine refined along (``RefineOptions.po_axis``).
    data : (tth_deg, intensity, sigma), optional
        The whole lineout the pattern was refined from (2θ in degrees, counts per frame, σ), as
        given to the engine. The histogram's points are these (weight 1/σ², 0 where σ ≤ 0) up
        to the refined range's end, with the calculated pattern and background where the engine
        refined, 0 below the limits; points the engine dropped inside the range keep weight 0.
        Default: the fitted points only.
    limits : (lo, hi), optional
        The 2θ limits the lineout was refined within (degrees; ``RefineOptions.limits``), used
        with ``data``; default the whole lineout. GSAS-II's lower limit is the first point
        inside them, its upper limit the last point or beyond, up to the engine's last
        reflection (points above the range are left out: GSAS-II would refine them).

    Returns
    -------
    Path

    Raises
    ------
    UnsupportedSetting
        A phase's space-group setting or a site symmetry GSAS-II cannot hold as given.
    NoFittedPattern
        ``pattern`` lacks the fitted points or weights.
    ValueError
        ``mode`` is unknown; ``data`` and ``limits`` do not hold the points ``pattern`` was
        refined from.
    """
    if mode not in ("rietveld", "lebail"):
        raise ValueError(f"mode {mode!r}: expected 'rietveld' or 'lebail'")
    path = Path(path)
    name = histogram_name or f"PWDR {path.stem}"
    tree = _tree(pattern, as_instrument(instrument), path, lebail=mode == "lebail",
                 histogram_name=name, comments=comments, omega_deg=omega_deg, eta_deg=eta_deg,
                 sample_azimuth_deg=sample_azimuth_deg, po_axis=po_axis, data=data, limits=limits)
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            for item in tree:
                pickle.dump(item, fh, protocol=GPX_PROTOCOL)
    return path
