"""Space-group and site-symmetry records in GSAS-II's vocabulary, for writing ``.gpx`` projects.

A GSAS-II phase carries its space group as a dict (``SGData``) that GSAS-II builds from the
Hermann–Mauguin symbol, and every atom carries a site-symmetry name and multiplicity. GSAS-II
uses the operators of ``SGData`` for structure factors, and looks the site-symmetry name up in
its tables of coordinate and Uij constraints. This module builds both from a
:class:`gemmi.SpaceGroup` without GSAS-II (``docs/reference/gsas2_project.md`` §4):

* :func:`space_group_record` — the ``SGData`` dict of a phase's space group, in the setting GSAS-II
  reads its symbol in (origin choice 2, hexagonal axes for R unless the symbol ends in ``R``);
  a phase given in origin choice 1 is moved to origin choice 2 as GSAS-II's CIF importer does.
* :func:`site_symmetry` — GSAS-II's site-symmetry name and the multiplicity of a position.

Settings whose symbol GSAS-II reads differently from the International Tables (checked against
GSAS-II's own parser in ``tests/test_gpx_gsas2.py``) are refused with :class:`UnsupportedSetting`.
"""
from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import combinations

import gemmi
import numpy as np

__all__ = ["SpaceGroupRecord", "UnsupportedSetting", "site_symmetry", "space_group_record"]

_DEN = gemmi.Op.DEN  # gemmi stores rotations and translations × 24
#: GSAS-II lattice letters and their centring vectors, in GSAS-II's order.
_CENTRING = {
    "P": ((0, 0, 0),),
    "A": ((0, 0, 0), (0, .5, .5)),
    "B": ((0, 0, 0), (.5, 0, .5)),
    "C": ((0, 0, 0), (.5, .5, 0)),
    "I": ((0, 0, 0), (.5, .5, .5)),
    "F": ((0, 0, 0), (0, .5, .5), (.5, 0, .5), (.5, .5, 0)),
    "R": ((0, 0, 0), (2 / 3, 1 / 3, 1 / 3), (1 / 3, 2 / 3, 2 / 3)),
}
_SYSTEMS = {"-1": "triclinic", "2/m": "monoclinic", "mmm": "orthorhombic", "4/m": "tetragonal",
            "4/mmm": "tetragonal", "3R": "rhombohedral", "3mR": "rhombohedral", "3": "trigonal",
            "3m1": "trigonal", "31m": "trigonal", "6/m": "hexagonal", "6/mmm": "hexagonal",
            "m3": "cubic", "m3m": "cubic"}
#: Laue classes whose site symmetries GSAS-II names with hexagonal directions.
_HEXAGONAL_LAUE = ("3", "3m1", "31m", "6/m", "6/mmm")
#: Settings whose symbol GSAS-II's parser reads with another origin than the International
#: Tables' (GSAS-II 5.7.9, tests/test_gpx_gsas2.py): refused rather than written wrong.
_READ_DIFFERENTLY = frozenset({"P 21 n m", "A b a m"})
#: An axial field of a symbol GSAS-II parses: a (screw) rotation or rotoinversion, optionally
#: over a mirror or glide, or a mirror or glide alone.
_AXIAL_FIELD = re.compile(r"-?[1-6]{1,2}(/[abcdemn])?|[abcdemn]")


class UnsupportedSetting(ValueError):
    """The phase's space-group setting has no GSAS-II ``SGData`` that means the same operators."""


@dataclass(frozen=True)
class SpaceGroupRecord:
    """A phase's space group as GSAS-II holds it.

    Attributes
    ----------
    sg_data : dict
        GSAS-II's ``SGData`` (builtins and numpy arrays only).
    origin_shift : ndarray (3,)
        Fractional vector subtracted from the phase's coordinates to reach the setting of
        ``sg_data`` (non-zero only for an origin-choice-1 phase).
    rotations : ndarray (n, 3, 3) int
        Rotation parts of every operator of the group, centring and inversion included.
    translations : ndarray (n, 3)
        Their translations, fractional.
    """

    sg_data: dict
    origin_shift: np.ndarray
    rotations: np.ndarray
    translations: np.ndarray
    #: Site symmetries already named (:func:`site_symmetry`), by rounded position.
    sites: dict = field(default_factory=dict, compare=False, repr=False)


#: Records already built, by (Hall symbol, Laue class): every lineout of a scan writes the same
#: phases, so each is built once per process. ``_CACHE_LOCK`` guards these caches and each
#: record's site names: a threaded Dask worker writes several lineouts' projects at once.
_RECORDS: OrderedDict[tuple[str, str], SpaceGroupRecord] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_RECORDS_SIZE = 32
_SITES_SIZE = 4096


def _seitz(ops: gemmi.GroupOps) -> tuple[np.ndarray, np.ndarray]:
    """Every operator of ``ops`` (centring included): rotations (n, 3, 3) int, translations (n, 3)."""
    rot = np.array([op.rot for op in ops], dtype=np.int64) // _DEN
    tran = np.array([op.tran for op in ops], dtype=float) / _DEN
    return rot, tran


def _op_keys(rot: np.ndarray, tran: np.ndarray) -> set[tuple]:
    """Operators as hashable (rotation, translation × 24 mod 24) keys."""
    steps = np.round(np.mod(tran, 1.0) * _DEN).astype(np.int64) % _DEN
    return {(tuple(r.ravel()), tuple(t)) for r, t in zip(rot, steps)}


def _shifted(rot: np.ndarray, tran: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Translations of the operators in coordinates x' = x − shift."""
    return tran + rot @ shift - shift


def _gsas2_setting(sg: gemmi.SpaceGroup) -> tuple[gemmi.SpaceGroup, str]:
    """The setting GSAS-II reads the phase's symbol in, and that symbol as GSAS-II writes it."""
    hm = sg.hm
    lattice, *fields = hm.split()
    if (lattice not in _CENTRING or not all(_AXIAL_FIELD.fullmatch(f) for f in fields)
            or hm in _READ_DIFFERENTLY):
        raise UnsupportedSetting(f"space group {sg.xhm()!r}: GSAS-II reads the symbol {hm!r} "
                                 "in another setting")
    if sg.ext == "R":  # rhombohedral axes: GSAS-II's symbol ends in 'R' (stored lower case)
        return sg, f"{hm} r"
    if sg.ext == "1":
        target = gemmi.find_spacegroup_by_name(f"{hm}:2")
        if target is None:
            raise UnsupportedSetting(f"space group {sg.xhm()!r}: no origin-choice-2 setting")
        return target, hm
    return sg, hm


def _origin_shift(sg: gemmi.SpaceGroup, target: gemmi.SpaceGroup) -> np.ndarray:
    """Shift s with target operators = the phase's operators in x' = x − s (0 when equal)."""
    rot, tran = _seitz(sg.operations())
    wanted = _op_keys(*_seitz(target.operations()))
    if _op_keys(rot, tran) == wanted:
        return np.zeros(3)
    # origin choice 1 -> 2 moves the origin onto a centre of inversion: try them all
    for r, t in zip(rot, tran):
        if np.array_equal(r, -np.eye(3, dtype=np.int64)):
            for half in np.ndindex(2, 2, 2):
                shift = np.mod((t + np.array(half)) / 2.0, 1.0)
                if _op_keys(rot, _shifted(rot, tran, shift)) == wanted:
                    return shift
    raise UnsupportedSetting(f"space group {sg.xhm()!r}: no origin shift reaches GSAS-II's "
                             f"setting {target.xhm()!r}")


def _lattice_letter(centring: np.ndarray) -> str:
    found = {tuple(np.round(np.mod(c, 1.0) * _DEN).astype(int)) for c in centring}
    for letter, vectors in _CENTRING.items():
        if found == {tuple(np.round(np.array(v) * _DEN).astype(int)) for v in vectors}:
            return letter
    raise UnsupportedSetting(f"centring vectors {sorted(found)} (/24) are none of GSAS-II's "
                             "P, A, B, C, I, F, R")


def _polar_axes(ops: list[np.ndarray], centric: bool) -> str:
    """GSAS-II's ``SGPolax``: the axes along which the origin is free (none when centric).

    An axis is free when no operator reverses or moves that coordinate (every diagonal element
    positive); ``'111'`` marks a free origin along the body diagonal of a rhombohedral cell.
    """
    if centric:
        return ""
    code = sum(bit for i, bit in enumerate((1, 2, 4)) if all(m[i, i] > 0 for m in ops))
    body = 8 if any(m[0, 2] > 0 for m in ops) and not any(m[1, 2] > 0 for m in ops) else 0
    return ("", "x", "y", "x y", "z", "x z", "y z", "xyz", "111")[code + body]


def _point_group(symbol: str, laue: str, polar: str) -> tuple[str, list[int]]:
    """GSAS-II's ``SGPtGrp`` and its default (3+1)-dimensional ``SSGKl``, read from the symbol's
    axial fields as GSAS-II reads them."""
    fields = symbol.split()
    if laue == "-1":
        return ("-1", [-1]) if "-" in fields[1] else ("1", [1])
    if laue == "2/m":
        if "/" in symbol:
            return "2/m", [-1, 1]
        return ("2", [-1]) if "2" in symbol else ("m", [1])
    if laue == "mmm":
        twos = symbol.count("2")
        if twos == 3:
            return "222", [-1, -1, -1]
        if twos == 1:
            return {"x": ("2mm", [-1, 1, 1]), "y": ("m2m", [1, -1, 1]),
                    "z": ("mm2", [1, 1, -1])}[polar]
        return "mmm", [1, 1, 1]
    if laue == "4/m":
        if "/" in symbol:
            return "4/m", [1, -1]
        return ("-4", [-1]) if "-" in fields[1] else ("4", [1])
    if laue == "4/mmm":
        if "/" in symbol:
            return "4/mmm", [1, -1, 1, 1]
        if "-" in fields[1]:
            return ("-42m", [-1, -1, 1]) if "2" in fields[2] else ("-4m2", [-1, 1, -1])
        return ("422", [1, -1, -1]) if any("2" in f for f in fields[2:]) else ("4mm", [1, 1, 1])
    if laue in ("3", "3R"):
        return ("-3", [-1]) if "-" in fields[1] else ("3", [1])
    if laue == "3mR" or "R" in fields[0]:
        if "2" in fields[2]:
            return "32", [1, -1]
        return ("-3m", [-1, 1]) if "-" in fields[1] else ("3m", [1, 1])
    if laue == "3m1":
        if "2" in fields[2]:
            return "321", [1, -1, 1]
        return ("-3m1", [-1, 1, 1]) if "-" in fields[1] else ("3m1", [1, 1, 1])
    if laue == "31m":
        if "2" in fields[3]:
            return "312", [1, 1, -1]
        return ("-31m", [-1, 1, 1]) if "-" in fields[1] else ("31m", [1, 1, 1])
    if laue == "6/m":
        if "/" in symbol:
            return "6/m", [1, -1]
        return ("-6", [-1]) if "-" in symbol else ("6", [1])
    if laue == "6/mmm":
        if "/" in symbol:
            return "6/mmm", [1, -1, 1, 1]
        if "-" in fields[1]:
            return ("-62m", [-1, -1, 1]) if "2" in fields[2] else ("-6m2", [-1, 1, -1])
        return ("622", [1, -1, -1]) if any("2" in f for f in fields[2:]) else ("6mm", [1, 1, 1])
    if laue == "m3":
        return ("23", []) if "2" in fields[1] else ("m3", [])
    if "4" in fields[1]:  # m3m
        return ("-43m", []) if "-" in fields[1] else ("432", [])
    return "m3m", []


def _spin_colours(lattice: str, point_group: str, rhombohedral_centring: bool) -> list[int]:
    """GSAS-II's ``SGSpin``: one +1 ('black', no spin flip) per generator of a nuclear group."""
    if rhombohedral_centring:
        return [1] * {"3": 3, "-3": 4, "32": 4, "3m": 4, "-3m": 5}[point_group]
    centring = {"P": 0, "A": 1, "B": 1, "C": 1, "I": 1, "F": 4}[lattice]
    if point_group in ("1", "3", "23"):
        generators = 1
    elif point_group in ("-1", "2", "m", "4", "-4", "-3", "312", "321", "3m1", "31m", "6", "-6",
                         "432", "-43m"):
        generators = 2
    elif point_group in ("2/m", "4/m", "422", "4mm", "-42m", "-4m2", "-3m1", "-31m", "6/m",
                         "622", "6mm", "-6m2", "-62m", "m3", "m3m"):
        generators = 3
    else:
        generators = 4
    return [1] * (centring + generators)


def space_group_record(sg: gemmi.SpaceGroup, laue: str) -> SpaceGroupRecord:
    """GSAS-II's ``SGData`` for a phase's space group.

    Parameters
    ----------
    sg : gemmi.SpaceGroup
        The phase's space group, in the setting of its CIF.
    laue : str
        GSAS-II Laue class (:attr:`midasflow.crystal.Phase.laue`).

    Returns
    -------
    SpaceGroupRecord

    Raises
    ------
    UnsupportedSetting
        A setting GSAS-II's symbol parser reads with other operators (named in the message).

    Notes
    -----
    ``SGOps`` lists the operators without centring; for a centrosymmetric group only the proper
    half (det +1), the inversion at the origin standing for the rest (``SGInv``), as GSAS-II
    stores them. Their order is not GSAS-II's, and ``SGGen`` (the generator flags GSAS-II's
    magnetic-group tools read) is not written: GSAS-II rebuilds both when the space group is
    entered again in its General tab. Records are cached per process (by Hall symbol and Laue
    class) and must not be modified.
    """
    key = (sg.hall, laue)
    with _CACHE_LOCK:
        record = _RECORDS.get(key)
        if record is not None:
            _RECORDS.move_to_end(key)
            return record
    record = _build_record(sg, laue)  # outside the lock: two threads may both build it once
    with _CACHE_LOCK:
        record = _RECORDS.setdefault(key, record)
        while len(_RECORDS) > _RECORDS_SIZE:
            _RECORDS.popitem(last=False)
    return record


def _build_record(sg: gemmi.SpaceGroup, laue: str) -> SpaceGroupRecord:
    target, symbol = _gsas2_setting(sg)
    shift = _origin_shift(sg, target)
    ops = target.operations()
    rot, tran = _seitz(ops)
    cen = np.array(ops.cen_ops, dtype=float) / _DEN
    lattice = _lattice_letter(cen)
    sym = [(np.array(op.rot, dtype=np.int64) // _DEN, np.array(op.tran, dtype=float) / _DEN)
           for op in ops.sym_ops]
    minus_one = -np.eye(3, dtype=np.int64)
    centric = any(np.array_equal(r, minus_one) for r, _ in sym)
    if centric and (tuple(minus_one.ravel()), (0, 0, 0)) not in _op_keys(rot, tran):
        raise UnsupportedSetting(f"space group {target.xhm()!r}: the centre of inversion is not "
                                 "at the origin")
    listed = [(r, np.mod(t, 1.0)) for r, t in sym if not centric or round(np.linalg.det(r)) == 1]
    sg_ops = [[r.astype(np.float32), t.astype(np.float32)] for r, t in listed]
    polar = _polar_axes([r for r, _ in listed], centric)
    point_group, kl = _point_group(symbol, laue, polar)
    system = _SYSTEMS[laue]
    unique = target.monoclinic_unique_axis() if laue == "2/m" else ""
    sg_data = {
        "SGGray": False, "SpGrp": symbol, "SGLaue": laue, "SGInv": centric, "SGLatt": lattice,
        "SGUniq": unique, "SGFixed": False, "SGOps": sg_ops,
        "BNSlattsym": [lattice, [0, 0, 0]],
        "SGCen": np.array(_CENTRING[lattice], dtype=float), "SGSys": system,
        "SGPolax": polar, "SGPtGrp": point_group, "SSGKl": kl,
        "SGSpin": _spin_colours(lattice, point_group, lattice == "R"),
    }
    return SpaceGroupRecord(sg_data, shift, rot, tran)


# ----------------------------------------------------------------------------- site symmetry

#: Direction labels of GSAS-II's site-symmetry names, for axes in lattice coordinates (sign
#: normalised: first non-zero component positive).
_CUBIC_AXES = {(1, 0, 0): "x", (0, 1, 0): "y", (0, 0, 1): "z", (1, 1, 0): "xy", (1, -1, 0): "+-0",
               (1, 0, 1): "xz", (1, 0, -1): "+0-", (0, 1, 1): "yz", (0, 1, -1): "0+-",
               (1, 1, 1): "111", (1, -1, -1): "+--", (1, -1, 1): "-+-", (1, 1, -1): "--+"}
_HEX_AXES = {(0, 0, 1): "001", (1, 0, 0): "100", (0, 1, 0): "010", (1, 1, 0): "110",
             (1, 2, 0): "120", (2, 1, 0): "210", (1, -1, 0): "+-0"}
#: In-plane hexagonal directions: perpendicular pairs (2-folds or mirrors of 222, mmm, mm2) and
#: the triads 120° apart (of 32, 3m, -3m, -6m2) are each named after one member.
_HEX_PAIRS = {"100": "100", "120": "100", "010": "010", "210": "010", "110": "110", "+-0": "110"}
_HEX_TRIADS = {"100": "100", "010": "100", "110": "100", "120": "120", "210": "120", "+-0": "120"}
_KINDS = {(1, 3): "1", (1, -1): "2", (1, 0): "3", (1, 1): "4", (1, 2): "6",
          (-1, -3): "-1", (-1, 1): "m", (-1, 0): "-3", (-1, -1): "-4", (-1, -2): "-6"}


def _element(rot: np.ndarray) -> tuple[str, tuple[int, ...] | None]:
    """Kind of a rotation ('2', 'm', '-4', ...) and its axis (of −R for improper ones), as a
    sign-normalised integer lattice direction."""
    det = int(round(np.linalg.det(rot)))
    kind = _KINDS[(det, int(np.trace(rot)))]
    if kind in ("1", "-1"):
        return kind, None
    fixed = (rot * det) - np.eye(3, dtype=np.int64)
    axis = np.zeros(3, dtype=np.int64)
    for i, j in combinations(range(3), 2):
        axis = np.cross(fixed[i], fixed[j])
        if axis.any():
            break
    axis //= math.gcd(*map(int, axis))
    if axis[np.nonzero(axis)[0][0]] < 0:
        axis = -axis
    return kind, tuple(int(v) for v in axis)


def _stabilizer(xyz: np.ndarray, record: SpaceGroupRecord, tol: float = 1e-4) -> np.ndarray:
    """Rotation parts (m, 3, 3) of the operators that map ``xyz`` onto itself (mod lattice)."""
    moved = record.rotations @ xyz + record.translations - xyz
    moved -= np.round(moved)
    keep = np.all(np.abs(moved) < tol, axis=1)
    return np.unique(record.rotations[keep], axis=0)


def _name(elements: list[tuple[str, tuple | None]], hexagonal: bool) -> str | None:
    """GSAS-II's name of a site-symmetry group given by its non-identity elements."""
    labels = _HEX_AXES if hexagonal else _CUBIC_AXES
    axes: dict[str, list[str]] = {}
    for kind, axis in elements:
        if axis is not None and axis not in labels:
            return None
        axes.setdefault(kind, []).append(labels[axis] if axis is not None else "")
    inv = "-1" in axes
    twos, mirrors = sorted(axes.get("2", [])), sorted(axes.get("m", []))
    order = len(elements) + 1
    threes = sorted(set(axes.get("3", [])))
    if len(threes) == 4:  # cubic
        if "4" in axes:
            return "m3m" if inv else "432"
        if "-4" in axes:
            return "-43m"
        return "m3" if inv else "23"
    if hexagonal and ("6" in axes or "-6" in axes):
        if "6" in axes:
            return {6: "6", 12: "6/m" if inv else ("622" if twos[1:] else "6mm"),
                    24: "6/mmm"}.get(order)
        inplane = [m for m in mirrors if m != "001"]
        return f"-6m2({_HEX_TRIADS[inplane[0]]})" if inplane else "-6"
    if threes:
        axis = "" if hexagonal else f"({threes[0]})"
        family = twos or mirrors
        if not family:
            return ("-3" if inv else "3") + axis
        if hexagonal:
            axis = f"({_HEX_TRIADS[family[0]]})"
        if inv:
            return "-3m" + axis
        return ("32" if twos else "3m") + axis
    fours = axes.get("4") or axes.get("-4")
    if fours:
        axis = fours[0]
        if order == 4:
            return ("4" if "4" in axes else "-4") + f"({axis})"
        if order == 16:
            return f"4/mmm({axis})"
        if inv:
            return f"4/m({axis})"
        if "-4" in axes:
            across = [t for t in twos if t != axis]
            return ("-42m" if across[0] in ("x", "y", "z") else "-4m2") + f"({axis})"
        return ("4mm" if mirrors else "422") + f"({axis})"
    if order == 1:
        return "1"
    if order == 2:
        if inv:
            return "-1"
        return f"2({twos[0]})" if twos else f"m({mirrors[0]})"
    if order == 4 and inv:
        return f"2/m({twos[0]})"
    if order == 4 and len(twos) == 1:
        return _mm2(twos[0], mirrors, hexagonal)
    if order in (4, 8) and len(twos) == 3:
        stem = "222" if order == 4 else "mmm"
        if hexagonal:
            inplane = [t for t in twos if t != "001"]
            return f"{stem}({_HEX_PAIRS[inplane[0]]})"
        main = [t for t in twos if t in ("x", "y", "z")]
        return stem if len(main) == 3 else f"{stem}({main[0]})"
    return None


def _mm2(two: str, mirrors: list[str], hexagonal: bool) -> str:
    """``mm2`` named after its 2-fold axis (GSAS-II: 'd' prefixes a coordinate axis whose
    mirrors lie on the diagonals; hexagonal 'z' is followed by the mirror pair)."""
    if hexagonal:
        return f"mm2(z{_HEX_PAIRS[mirrors[0]]})" if two == "001" else f"mm2({two})"
    if two in ("x", "y", "z") and not set(mirrors) <= {"x", "y", "z"}:
        return "mm2(d" + {"x": "100", "y": "010", "z": "001"}[two] + ")"
    return f"mm2({two})"


def site_symmetry(xyz: tuple[float, float, float] | np.ndarray,
                  record: SpaceGroupRecord) -> tuple[str, int]:
    """GSAS-II's site-symmetry name and multiplicity of a position.

    Parameters
    ----------
    xyz : sequence of 3 float
        Fractional coordinates in the setting of ``record`` (origin shift applied).
    record : SpaceGroupRecord

    Returns
    -------
    name : str
        E.g. ``'m3m'``, ``'-43m'``, ``'4mm(z)'``, ``'2(+-0)'``, ``'-3m(100)'``.
    multiplicity : int
        Number of equivalent positions in the unit cell.

    Raises
    ------
    UnsupportedSetting
        A site-symmetry group GSAS-II has no name for (not expected for crystallographic sites).
    """
    xyz = np.asarray(xyz, dtype=float)
    key = tuple(np.round(np.mod(xyz, 1.0), 6))
    with _CACHE_LOCK:
        named = record.sites.get(key)
    if named is None:
        named = _site_symmetry(xyz, record)
        with _CACHE_LOCK:
            if len(record.sites) >= _SITES_SIZE:  # refined general positions: all different
                record.sites.clear()
            record.sites[key] = named
    return named


def _site_symmetry(xyz: np.ndarray, record: SpaceGroupRecord) -> tuple[str, int]:
    stab = _stabilizer(xyz, record)
    multiplicity = len(record.rotations) // len(stab)
    identity = np.eye(3, dtype=np.int64)
    elements = [_element(r) for r in stab if not np.array_equal(r, identity)]
    name = _name(elements, record.sg_data["SGLaue"] in _HEXAGONAL_LAUE)
    if name is None:
        raise UnsupportedSetting(f"site {tuple(float(v) for v in xyz)} of "
                                 f"{record.sg_data['SpGrp']!r}: no GSAS-II name for its site "
                                 f"symmetry {sorted(k for k, _ in elements)}")
    return name, multiplicity
