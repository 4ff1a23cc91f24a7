"""Crystal phases: CIF reading, GSAS-II cell A-terms, powder reflection lists and |F|².

Conventions follow GSAS-II (``docs/reference/gsas2_profile.md`` sections 3 and 4):

* ``A = (A0..A5) = (a*², b*², c*², 2a*b*cosγ*, 2a*c*cosβ*, 2b*c*cosα*)`` in Å⁻², so that
  ``1/d² = A0 h² + A1 k² + A2 l² + A3 hk + A4 hl + A5 kl``.
* Powder multiplicity counts every member of the Laue-group orbit of ``hkl`` (Friedel mates
  included), as GSAS-II's ``refl[3]`` does.
* ``|F|²`` sums over the full unit-cell orbit of every atom (site multiplicity), with IT92
  four-Gaussian form factors plus the anomalous f′ + i·f″ at the wavelength
  (:func:`anomalous_factors`) and isotropic Debye–Waller ``exp(-8π² U sin²θ/λ²)``; see
  ``docs/reference/gsas2_profile.md`` (structure factor).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import gemmi
import numpy as np

from midasflow.errors import CIFError
from midasflow.io.atomic import write_text_atomic

__all__ = [
    "Atom",
    "Phase",
    "ReflectionList",
    "StructureFactorTable",
    "anomalous_factors",
    "read_phase",
    "read_phases",
    "phase_from_cell",
    "cubic_phase",
    "cell_to_A",
    "A_to_cell",
    "A_derivative_H",
    "laue_tie_matrix",
    "laue_rotations",
    "free_coordinates",
    "cell_volume",
    "cell_esds",
    "reflections",
    "write_phase_cif",
]

LAUE_CLASSES = ("-1", "2/m", "mmm", "4/m", "4/mmm", "3", "3m1", "31m", "6/m", "6/mmm",
                "3R", "3mR", "m3", "m3m")


@dataclass(frozen=True)
class Atom:
    """One atom site of the asymmetric unit.

    Attributes
    ----------
    label : str
    element : str
        Element symbol without charge (e.g. ``'Ce'``).
    xyz : tuple of float
        Fractional coordinates.
    occ : float
        Site occupancy (0..1).
    uiso : float
        Isotropic displacement parameter, Å² (U_eq for anisotropic sites).
    """

    label: str
    element: str
    xyz: tuple[float, float, float]
    occ: float = 1.0
    uiso: float = 0.005


@dataclass
class Phase:
    """A crystalline phase.

    Attributes
    ----------
    name : str
    cell : tuple of float
        ``(a, b, c, alpha, beta, gamma)`` in Å and degrees.
    space_group : gemmi.SpaceGroup
        In the setting the CIF gave.
    laue : str
        GSAS-II Laue class symbol, one of ``LAUE_CLASSES``.
    atoms : list of Atom
    z_formula : float
        Formula units per cell (``_cell_formula_units_Z``; 1 if not given).
    """

    name: str
    cell: tuple[float, float, float, float, float, float]
    space_group: gemmi.SpaceGroup
    laue: str
    atoms: list[Atom] = field(default_factory=list)
    z_formula: float = 1.0

    @property
    def unique_axis(self) -> str:
        """Monoclinic unique axis ('a', 'b' or 'c'); 'b' for other systems (unused there)."""
        if self.space_group.crystal_system_str() == "monoclinic":
            return self.space_group.monoclinic_unique_axis()
        return "b"

    @property
    def cell_mass(self) -> float:
        """Mass of the unit-cell contents in g/mol (Σ occupancy × site multiplicity × weight)."""
        return float(sum(a.occ * len(_atom_orbit(a.xyz, self.space_group))
                         * gemmi.Element(a.element).weight
                         for a in self.atoms))

    def with_cell(self, cell: Sequence[float]) -> "Phase":
        """Copy with another cell."""
        return replace(self, cell=tuple(float(c) for c in cell))

    def with_atoms(self, atoms: Sequence[Atom]) -> "Phase":
        """Copy with another atom list."""
        return replace(self, atoms=list(atoms))


@dataclass
class ReflectionList:
    """Unique powder reflections of one phase, sorted by increasing 2θ.

    Attributes
    ----------
    hkl : ndarray, int, shape (n, 3)
    d_a : ndarray, float64, shape (n,)
        d-spacing, Å.
    tth_deg : ndarray, float64, shape (n,)
        Bragg angle 2θ (no zero shift), degrees.
    mult : ndarray, int, shape (n,)
        Powder multiplicity (Laue orbit incl. Friedel mates).
    fsq : ndarray, float64, shape (n,)
        Friedel-averaged |F|² (electrons², f′/f″ at the wavelength included); 1 for a phase
        without atoms.
    equivalents : list of ndarray
        Per reflection, the (mult, 3) int array of its symmetry-equivalent hkl (March–Dollase).
    """

    hkl: np.ndarray
    d_a: np.ndarray
    tth_deg: np.ndarray
    mult: np.ndarray
    fsq: np.ndarray
    equivalents: list[np.ndarray]

    def __len__(self) -> int:
        return int(self.hkl.shape[0])


# ------------------------------------------------------------------------------------ CIF reading

def _laue_symbol(sg: gemmi.SpaceGroup) -> str:
    laue = sg.laue_str()
    rhomb_axes = sg.hm.startswith("R") and sg.ext == "R"
    simple = {"-1": "-1", "2/m": "2/m", "mmm": "mmm", "4/m": "4/m", "4/mmm": "4/mmm",
              "6/m": "6/m", "6/mmm": "6/mmm", "m-3": "m3", "m-3m": "m3m"}
    if laue in simple:
        return simple[laue]
    if laue == "-3":
        return "3R" if rhomb_axes else "3"
    if laue == "-3m":
        if rhomb_axes:
            return "3mR"
        parts = sg.hm.split()
        return "31m" if len(parts) == 4 and parts[2] == "1" else "3m1"
    raise ValueError(f"unknown Laue class {laue!r} of space group {sg.hm}")


def _ueq(aniso: gemmi.SMat33d, cell: gemmi.UnitCell) -> float:
    """U_eq = trace/3 of the Cartesian U from CIF U^ij (crystallographic, on a*, b*, c*)."""
    u = np.array([[aniso.u11, aniso.u12, aniso.u13],
                  [aniso.u12, aniso.u22, aniso.u23],
                  [aniso.u13, aniso.u23, aniso.u33]])
    frac = np.array(cell.frac.mat.tolist())          # rows: a*, b*, c* components (Cartesian)
    n = np.diag(np.linalg.norm(frac, axis=1))        # a*, b*, c*
    orth = np.array(cell.orth.mat.tolist())          # columns: a, b, c
    u_cart = orth @ n @ u @ n @ orth.T
    return float(np.trace(u_cart) / 3.0)


def read_phase(cif_path: str | os.PathLike, name: str | None = None) -> Phase:
    """Read the first data block of a CIF into a :class:`Phase`.

    Parameters
    ----------
    cif_path : path-like
    name : str, optional
        Phase name; defaults to the CIF file stem.

    Returns
    -------
    Phase

    Raises
    ------
    CIFError
        If gemmi cannot parse the file, or it lacks the cell or the symmetry.
    """
    path = Path(cif_path)
    try:
        doc = gemmi.cif.read(str(path))
        block = doc[0]
        ss = gemmi.make_small_structure_from_block(block)
    except Exception as exc:  # gemmi raises RuntimeError/ValueError/IndexError
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CIFError(f"{path}: cannot be read as CIF ({msg})") from None
    cell = ss.cell
    if not block.find_value("_cell_length_a") or cell.a <= 1.0 or cell.volume <= 0:
        raise CIFError(f"{path}: no unit cell (_cell_length_a/b/c, _cell_angle_*) found")
    sg = ss.spacegroup
    if sg is None:
        try:
            ss.determine_and_set_spacegroup("S.H12N")
        except Exception:
            pass
        sg = ss.spacegroup
    if sg is None:
        raise CIFError(f"{path}: no space group (symmetry operators, Hall or H-M symbol) found")
    atoms = []
    for site in ss.sites:
        uiso = float(site.u_iso)
        if site.aniso.nonzero():
            uiso = _ueq(site.aniso, cell)
        atoms.append(Atom(site.label, site.element.name,
                          (float(site.fract.x), float(site.fract.y), float(site.fract.z)),
                          float(site.occ), uiso))
    z_txt = block.find_value("_cell_formula_units_Z")
    try:
        z = float(gemmi.cif.as_number(z_txt)) if z_txt else 1.0
        z = z if math.isfinite(z) and z > 0 else 1.0
    except Exception:
        z = 1.0
    return Phase(name or path.stem,
                 (cell.a, cell.b, cell.c, cell.alpha, cell.beta, cell.gamma),
                 sg, _laue_symbol(sg), atoms, z)


def read_phases(paths: Iterable[str | os.PathLike]) -> list[Phase]:
    """Read several CIFs; phase names are the file stems (made unique with a suffix)."""
    phases: list[Phase] = []
    seen: set[str] = set()
    for p in paths:
        stem = Path(p).stem
        name, i = stem, 1
        while name in seen:
            i += 1
            name = f"{stem}_{i}"
        seen.add(name)
        phases.append(read_phase(p, name))
    return phases


def phase_from_cell(name: str, cell: Sequence[float], space_group: str | gemmi.SpaceGroup,
                    atoms: Sequence[Atom] = (), z_formula: float = 1.0) -> Phase:
    """Build a synthetic phase.

    Parameters
    ----------
    name : str
    cell : sequence of 6 float
        a, b, c (Å), alpha, beta, gamma (deg).
    space_group : str or gemmi.SpaceGroup
        Any symbol gemmi understands (e.g. ``'P 63 m c'``, ``'R -3 m:H'``).
    atoms : sequence of Atom
    z_formula : float
    """
    sg = space_group if isinstance(space_group, gemmi.SpaceGroup) else gemmi.SpaceGroup(space_group)
    if len(cell) != 6:
        raise ValueError(f"cell must have 6 values (a, b, c, alpha, beta, gamma), got {len(cell)}")
    return Phase(name, tuple(float(c) for c in cell), sg, _laue_symbol(sg), list(atoms),
                 float(z_formula))


def cubic_phase(name: str, a: float, space_group: str = "F m -3 m",
                atoms: Sequence[Atom] | None = None) -> Phase:
    """Cubic phase; default atoms are CeO2 (fluorite, Ce 4a, O 8c)."""
    if atoms is None:
        atoms = [Atom("Ce1", "Ce", (0.0, 0.0, 0.0), 1.0, 0.005),
                 Atom("O1", "O", (0.25, 0.25, 0.25), 1.0, 0.008)]
    return phase_from_cell(name, (a, a, a, 90.0, 90.0, 90.0), space_group, atoms, 4.0)


# ------------------------------------------------------------------------------- cell, A-terms

def _g_real(cell: Sequence[float]) -> np.ndarray:
    a, b, c, al, be, ga = cell
    ca, cb, cg = (math.cos(math.radians(x)) for x in (al, be, ga))
    return np.array([[a * a, a * b * cg, a * c * cb],
                     [a * b * cg, b * b, b * c * ca],
                     [a * c * cb, b * c * ca, c * c]])


def _A_to_G(A: np.ndarray) -> np.ndarray:
    """Reciprocal metric tensor G* (3, 3), Å⁻², of the A-terms (6,)."""
    return np.array([[A[0], A[3] / 2, A[4] / 2],
                     [A[3] / 2, A[1], A[5] / 2],
                     [A[4] / 2, A[5] / 2, A[2]]])


def cell_to_A(cell: Sequence[float]) -> np.ndarray:
    """Cell (a, b, c Å; α, β, γ deg) → A-terms (6,) in Å⁻² (GSAS-II ``cell2A``)."""
    G = np.linalg.inv(_g_real(cell))
    return np.array([G[0, 0], G[1, 1], G[2, 2], 2 * G[0, 1], 2 * G[0, 2], 2 * G[1, 2]])


def A_to_cell(A: Sequence[float]) -> tuple[float, float, float, float, float, float]:
    """A-terms (6,) in Å⁻² → cell (a, b, c Å; α, β, γ deg) (GSAS-II ``A2cell``)."""
    g = np.linalg.inv(_A_to_G(np.asarray(A, dtype=float)))
    a, b, c = np.sqrt(np.diag(g))
    al = math.degrees(math.acos(np.clip(g[1, 2] / (b * c), -1, 1)))
    be = math.degrees(math.acos(np.clip(g[0, 2] / (a * c), -1, 1)))
    ga = math.degrees(math.acos(np.clip(g[0, 1] / (a * b), -1, 1)))
    return (float(a), float(b), float(c), al, be, ga)


def cell_volume(cell: Sequence[float]) -> float:
    """Unit-cell volume, Å³."""
    return float(math.sqrt(np.linalg.det(_g_real(cell))))


def A_derivative_H(hkl: np.ndarray) -> np.ndarray:
    """The (n, 6) design matrix H with 1/d² = H @ A: (h², k², l², hk, hl, kl)."""
    h, k, l = (np.asarray(hkl, dtype=float)[:, i] for i in range(3))
    return np.stack([h * h, k * k, l * l, h * k, h * l, k * l], axis=1)


def laue_tie_matrix(laue: str, unique_axis: str = "b") -> tuple[np.ndarray, list[int]]:
    """Laue-class constraints on the A-terms (GSAS-II ``GSASIIlattice``): ``A = T @ p``.

    Parameters
    ----------
    laue : str
        GSAS-II Laue symbol.
    unique_axis : str
        Monoclinic unique axis ('a', 'b', 'c').

    Returns
    -------
    T : ndarray, shape (6, k)
    free : list of int
        Indices of the independent A-terms (the GSAS-II names ``p::A<i>`` that are refined);
        ``p = A[free]``.
    """
    if laue in ("m3", "m3m"):
        cols = {0: [1, 1, 1, 0, 0, 0]}
    elif laue in ("4/m", "4/mmm"):
        cols = {0: [1, 1, 0, 0, 0, 0], 2: [0, 0, 1, 0, 0, 0]}
    elif laue in ("3", "3m1", "31m", "6/m", "6/mmm"):
        cols = {0: [1, 1, 0, 1, 0, 0], 2: [0, 0, 1, 0, 0, 0]}
    elif laue in ("3R", "3mR"):
        cols = {0: [1, 1, 1, 0, 0, 0], 3: [0, 0, 0, 1, 1, 1]}
    elif laue == "mmm":
        cols = {i: list(np.eye(6)[i]) for i in (0, 1, 2)}
    elif laue == "2/m":
        extra = {"a": 5, "b": 4, "c": 3}[unique_axis]
        cols = {i: list(np.eye(6)[i]) for i in (0, 1, 2, extra)}
    elif laue == "-1":
        cols = {i: list(np.eye(6)[i]) for i in range(6)}
    else:
        raise ValueError(f"unknown Laue class {laue!r}; expected one of {LAUE_CLASSES}")
    free = sorted(cols)
    return np.array([cols[i] for i in free], dtype=float).T, free


def _cell_and_volume(A: np.ndarray) -> np.ndarray:
    cell = A_to_cell(A)
    return np.array(list(cell) + [cell_volume(cell)])


def cell_esds(A: np.ndarray, cov_p: np.ndarray, laue: str,
              unique_axis: str = "b") -> np.ndarray:
    """Esds of (a, b, c, α, β, γ, V) from the covariance of the independent A-terms.

    Parameters
    ----------
    A : ndarray (6,)
        Full A-terms, Å⁻².
    cov_p : ndarray (k, k)
        Covariance of the independent terms ``A[free]`` of :func:`laue_tie_matrix`.
    laue, unique_axis : str

    Returns
    -------
    ndarray (7,)
        Esds in Å, degrees and Å³; angle esds are exactly 0 where the Laue class fixes them.
    """
    T, _ = laue_tie_matrix(laue, unique_axis)
    cov_A = T @ cov_p @ T.T
    J = np.zeros((7, 6))
    for i in np.flatnonzero(np.any(cov_A != 0, axis=0)):   # tied-off terms (cov 0) add nothing
        step = 1e-7 * max(abs(A[i]), 1e-3)
        ap, am = A.copy(), A.copy()
        ap[i] += step
        am[i] -= step
        J[:, i] = (_cell_and_volume(ap) - _cell_and_volume(am)) / (2 * step)
    esd = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", J, cov_A, J), 0.0))
    fixed_angles = {"-1": (), "2/m": tuple(i for i, ax in zip((3, 4, 5), "abc")
                                           if ax != unique_axis),
                    "3R": (), "3mR": ()}.get(laue, (3, 4, 5))
    esd[list(fixed_angles)] = 0.0
    return esd


# ----------------------------------------------------------------------- symmetry helpers

def laue_rotations(sg: gemmi.SpaceGroup) -> np.ndarray:
    """Laue-group rotations acting on hkl row vectors: (2·n_rot, 3, 3) int, h' = h @ R.

    The rotation parts of every space-group operator (centring excluded) and their negatives.
    """
    rots = np.array([op.rot for op in sg.operations().sym_ops], dtype=int) // gemmi.Op.DEN
    return np.concatenate([rots, -rots])


@functools.lru_cache(maxsize=64)
def _seitz_operators(hall: str) -> tuple[np.ndarray, np.ndarray]:
    """Every operation of the space group with Hall symbol ``hall`` (centring included): rotation
    parts (n, 3, 3) and translations (n, 3) as floats (read-only; cached: gemmi's per-operator
    calls take ~5 ms for the 192 operations of Fm-3m)."""
    ops = gemmi.symops_from_hall(hall)
    rot = np.array([op.rot for op in ops], dtype=float) / gemmi.Op.DEN
    tran = np.array([op.tran for op in ops], dtype=float) / gemmi.Op.DEN
    rot.flags.writeable = tran.flags.writeable = False
    return rot, tran


def _orbit_and_rotations(xyz: Sequence[float],
                         sg: gemmi.SpaceGroup) -> tuple[np.ndarray, np.ndarray]:
    """Distinct unit-cell positions (m, 3) of a site under all operations of ``sg`` (centring
    included) and the rotation part (m, 3, 3) of the operation giving each: ∂position/∂xyz."""
    rot, tran = _seitz_operators(sg.hall)
    pos = (rot @ np.asarray(xyz, dtype=float) + tran) % 1.0
    keys = np.round(pos * 1e4).astype(np.int64) % 10000                    # 1e-4 tolerance
    _, first = np.unique(keys, axis=0, return_index=True)
    first = np.sort(first)
    return pos[first], rot[first]


def _atom_orbit(xyz: Sequence[float], sg: gemmi.SpaceGroup) -> np.ndarray:
    """Distinct unit-cell positions (m, 3) of a site under all operations (centring included)."""
    return _orbit_and_rotations(xyz, sg)[0]


def free_coordinates(phase: Phase, atom: Atom) -> tuple[bool, bool, bool]:
    """Which fractional coordinates of a site may move alone without changing its site symmetry.

    A coordinate is free when displacing it by a small amount keeps the orbit size (site
    multiplicity). Coordinates tied to each other (e.g. x = 2y) are reported as not free.
    """
    n0 = len(_atom_orbit(atom.xyz, phase.space_group))
    free = []
    for c in range(3):
        moved = list(atom.xyz)
        moved[c] += 0.0123
        free.append(len(_atom_orbit(moved, phase.space_group)) == n0)
    return tuple(free)


def _orbit_keys(hkl: np.ndarray, rots: np.ndarray, off: int) -> np.ndarray:
    """Integer key (n, nrot) of every h·R, monotonic in (h, k, l) lexicographically for indices
    within ±off: ((h + off)·b + k + off)·b + l + off with b = 2·off + 1, computed as
    h·(R·(b², b, 1)) + off·(b² + b + 1) without forming the (n, nrot, 3) orbits."""
    base = 2 * off + 1
    weights = np.array([base * base, base, 1], dtype=np.int64)
    return hkl @ (rots @ weights).T + off * (base * base + base + 1)


# --------------------------------------------------------------------------- structure factor

#: keV·Å: E = HC_KEV_A / λ (the constant GSAS-II's ``wavekE`` uses).
HC_KEV_A = 12.397639


@functools.lru_cache(maxsize=256)
def anomalous_factors(element: str, wavelength_a: float) -> tuple[float, float]:
    """Anomalous scattering factors f′ and f″ (electrons) of an element at a wavelength.

    From xraylib's ``Fi`` / ``Fii`` (Kissel's RTAB tabulation; xraylib's f″ sign is negative, it is
    returned positive here). GSAS-II computes them with the Cromer–Liberman algorithm
    (``GSASIIElem.FPcalc``); the two agree to ≲ 0.1 e in f′ and ≲ 2 % in f″ away from absorption
    edges (see ``docs/reference/gsas2_profile.md``).

    Parameters
    ----------
    element : str
        Element symbol (``'Pb'``; a charge suffix such as ``'O2-'`` is ignored).
    wavelength_a : float
        λ, Å (> 0).

    Returns
    -------
    (f_prime, f_double_prime) : tuple of float
    """
    import xraylib

    if not wavelength_a > 0:
        raise ValueError(f"wavelength must be > 0 Å, got {wavelength_a}")
    z = gemmi.Element(element).atomic_number
    if z == 0:
        raise CIFError(f"unknown element {element!r} (no anomalous scattering factors)")
    energy_kev = HC_KEV_A / float(wavelength_a)
    return float(xraylib.Fi(z, energy_kev)), float(-xraylib.Fii(z, energy_kev))


class StructureFactorTable:
    """|F|² of a fixed hkl list, re-evaluable at other d-spacings and U_iso (derivatives included).

    ``F(h) = Σ_atoms occ·(f0(s²) + f′ + i f″)·exp(-8π² U s²)·Σ_orbit exp(2πi h·x)``,
    s² = 1/(4d²). A powder line holds h and −h (Friedel mates), so the table returns their mean
    ½(|F(h)|² + |F(−h)|²) = R_a² + R_b² + I_a² + I_b² (R/I: the f0 + f′ / f″ parts, a/b: the cos /
    sin sums); for a centrosymmetric phase this equals GSAS-II's |F(h)|².

    Parameters
    ----------
    phase : Phase
    hkl : ndarray int (n, 3)
    wavelength_a : float, optional
        λ (Å) for f′ and f″ (:func:`anomalous_factors`); None leaves them out.
    """

    def __init__(self, phase: Phase, hkl: np.ndarray, wavelength_a: float | None = None):
        self.n_atoms = len(phase.atoms)
        n = hkl.shape[0]
        self.geom = np.zeros((self.n_atoms, n), dtype=complex)
        self.coef_a = np.zeros((self.n_atoms, 4))
        self.coef_b = np.zeros((self.n_atoms, 4))
        self.coef_c = np.zeros(self.n_atoms)
        self.f_prime = np.zeros(self.n_atoms)
        self.f_double_prime = np.zeros(self.n_atoms)
        self.occ = np.array([a.occ for a in phase.atoms], dtype=float)
        self.uiso = np.array([a.uiso for a in phase.atoms], dtype=float)
        self._hkl = np.asarray(hkl, dtype=float)
        self._orbits = []        # per atom: orbit positions (m, 3), ∂position/∂xyz (m, 3, 3)
        self._dgeom = None
        for j, atom in enumerate(phase.atoms):
            orbit, rot = _orbit_and_rotations(atom.xyz, phase.space_group)
            self._orbits.append((orbit, rot))
            self.geom[j] = np.exp(2j * np.pi * (self._hkl @ orbit.T)).sum(axis=1)
            it92 = gemmi.Element(atom.element).it92
            if it92 is None:
                raise CIFError(f"phase {phase.name}: no IT92 form factor for element "
                               f"{atom.element!r} (atom {atom.label})")
            coefs = np.array(it92.get_coefs(), dtype=float)
            self.coef_a[j], self.coef_b[j], self.coef_c[j] = coefs[:4], coefs[4:8], coefs[8]
            if wavelength_a is not None:
                self.f_prime[j], self.f_double_prime[j] = anomalous_factors(atom.element,
                                                                            float(wavelength_a))

    def _scattering(self, inv_d2: np.ndarray, uiso: np.ndarray | None):
        """U_iso, s², the f0 exponentials (na, 4, n), occupancy × Debye–Waller (na, n), the
        real (f0 + f′) and imaginary (f″) scattering (na, n) and the four sums R_a, R_b, I_a,
        I_b (n,) over the atoms."""
        u = self.uiso if uiso is None else np.asarray(uiso, dtype=float)
        s2 = inv_d2 / 4.0
        ex = np.exp(-self.coef_b[:, :, None] * s2[None, None, :])        # (na, 4, n)
        f0 = np.einsum("ak,akn->an", self.coef_a, ex) + self.coef_c[:, None]
        dw = self.occ[:, None] * np.exp(-8 * np.pi ** 2 * u[:, None] * s2[None, :])
        re = (f0 + self.f_prime[:, None]) * dw                            # (na, n)
        im = self.f_double_prime[:, None] * dw
        ga, gb = self.geom.real, self.geom.imag
        sums = ((re * ga).sum(0), (re * gb).sum(0), (im * ga).sum(0), (im * gb).sum(0))
        return u, s2, ex, dw, re, im, sums

    def fsq(self, inv_d2: np.ndarray, uiso: np.ndarray | None = None,
            derivatives: bool = False):
        """Friedel-averaged |F|² at the given 1/d² (Å⁻²), optionally with derivatives.

        Parameters
        ----------
        inv_d2 : ndarray (n,)
        uiso : ndarray (n_atoms,), optional
            Overrides the phase's U_iso (Å²).
        derivatives : bool

        Returns
        -------
        fsq : ndarray (n,)
            If ``derivatives``: ``(fsq, dfsq_dinvd2 (n,), dfsq_duiso (n_atoms, n))``.
        """
        n = inv_d2.shape[0]
        if self.n_atoms == 0:
            one = np.ones(n)
            return (one, np.zeros(n), np.zeros((0, n))) if derivatives else one
        u, s2, ex, dw, re, im, sums = self._scattering(inv_d2, uiso)
        ga, gb = self.geom.real, self.geom.imag
        fsq = sum(t * t for t in sums)
        if not derivatives:
            return fsq
        df0 = -np.einsum("ak,akn->an", self.coef_a * self.coef_b, ex)
        dre = dw * df0 - 8 * np.pi ** 2 * u[:, None] * re                 # ∂/∂s²
        dim = -8 * np.pi ** 2 * u[:, None] * im
        dsums = [(dre * ga).sum(0), (dre * gb).sum(0), (dim * ga).sum(0), (dim * gb).sum(0)]
        dfsq_dinvd2 = 0.5 * sum(t * d for t, d in zip(sums, dsums))       # 2·Σ t dt · (1/4)
        k = -8 * np.pi ** 2 * s2[None, :]
        dfsq_du = 2 * k * (re * (sums[0] * ga + sums[1] * gb)
                           + im * (sums[2] * ga + sums[3] * gb))          # (na, n)
        return fsq, dfsq_dinvd2, dfsq_du

    def dfsq_dxyz(self, inv_d2: np.ndarray, uiso: np.ndarray | None = None) -> np.ndarray:
        """∂|F|²/∂(x, y, z) of every atom (fractional coordinates), analytic.

        Each orbit position moves with the atom's coordinates through the rotation part R of
        the operation giving it, so ∂geom/∂x_a = Σ_orbit 2πi (hR)_a exp(2πi h·x_orbit). Valid
        for coordinates that move freely (:func:`free_coordinates`: the orbit keeps its size).

        Parameters
        ----------
        inv_d2 : ndarray (n,)
            1/d² (Å⁻²).
        uiso : ndarray (n_atoms,), optional
            Overrides the phase's U_iso (Å²).

        Returns
        -------
        ndarray (n_atoms, 3, n)
        """
        n = inv_d2.shape[0]
        if self.n_atoms == 0:
            return np.zeros((0, 3, n))
        if self._dgeom is None:         # (n_atoms, 3, n): geometry only, computed once
            dgeom = np.zeros((self.n_atoms, 3, n), dtype=complex)
            for j, (orbit, rot) in enumerate(self._orbits):
                phase = np.exp(2j * np.pi * (self._hkl @ orbit.T))            # (n, m)
                h_rot = np.einsum("ni,mij->nmj", self._hkl, rot)             # (n, m, 3)
                dgeom[j] = 2j * np.pi * np.einsum("nm,nmj->jn", phase, h_rot)
            self._dgeom = dgeom
        _, _, _, _, re, im, (t0, t1, t2, t3) = self._scattering(inv_d2, uiso)
        dga, dgb = self._dgeom.real, self._dgeom.imag                     # (na, 3, n)
        return 2 * (re[:, None, :] * (t0 * dga + t1 * dgb)
                    + im[:, None, :] * (t2 * dga + t3 * dgb))


# ------------------------------------------------------------------------------- reflections

def reflections(phase: Phase, wavelength_a: float, tth_max_deg: float,
                tth_min_deg: float = 0.0) -> ReflectionList:
    """Unique, allowed powder reflections with tth_min_deg < 2θ < tth_max_deg.

    Parameters
    ----------
    phase : Phase
    wavelength_a : float
        λ, Å.
    tth_max_deg, tth_min_deg : float
        2θ range, degrees (no zero shift).

    Returns
    -------
    ReflectionList
        Sorted by increasing 2θ; systematic absences removed.
    """
    if wavelength_a <= 0:
        raise ValueError(f"wavelength must be > 0 Å, got {wavelength_a}")
    s_max = math.sin(math.radians(min(tth_max_deg, 179.0)) / 2)
    s_min = math.sin(math.radians(max(tth_min_deg, 0.0)) / 2)
    inv_d2_max = (2 * s_max / wavelength_a) ** 2
    inv_d2_min = (2 * s_min / wavelength_a) ** 2
    d_min = 1.0 / math.sqrt(inv_d2_max)
    A = cell_to_A(phase.cell)
    lims = [int(math.floor(x / d_min)) + 1 for x in phase.cell[:3]]
    grids = np.meshgrid(*[np.arange(-m, m + 1) for m in lims], indexing="ij")
    hkl = np.stack([g.ravel() for g in grids], axis=1)
    inv_d2 = A_derivative_H(hkl) @ A
    keep = (inv_d2 > inv_d2_min) & (inv_d2 < inv_d2_max) & (np.abs(hkl).sum(axis=1) > 0)
    hkl = hkl[keep]
    if hkl.shape[0] == 0:
        return ReflectionList(np.zeros((0, 3), int), np.zeros(0), np.zeros(0),
                              np.zeros(0, int), np.zeros(0), [])
    rots = laue_rotations(phase.space_group)
    off = int(np.abs(hkl).max())
    keys = _orbit_keys(hkl, rots, off)                          # (n, nrot)
    canon = keys.max(axis=1)
    uniq, first = np.unique(canon, return_index=True)
    reps_idx = first[np.argsort(-uniq)]
    ops = phase.space_group.operations()
    absent = np.asarray(ops.systematic_absences(hkl[reps_idx].astype(np.int32)), dtype=bool)
    reps_idx = reps_idx[~absent]
    rep_keys = keys[reps_idx]
    rep_orbits = np.einsum("ni,rij->nrj", hkl[reps_idx], rots)  # (n_rep, nrot, 3)
    # representative: the orbit member with the largest key (positive indices first)
    hkl_rep = rep_orbits[np.arange(len(reps_idx)), np.argmax(rep_keys, axis=1)]
    equivalents = []
    mult = np.empty(len(reps_idx), dtype=int)
    for i, (row, row_keys) in enumerate(zip(rep_orbits, rep_keys)):
        # distinct members, sorted as np.unique(row, axis=0) sorts them (the key is monotonic
        # in (h, k, l) lexicographically); 1-D unique is ~100x faster than axis=0
        eq = row[np.unique(row_keys, return_index=True)[1]]
        equivalents.append(eq)
        mult[i] = eq.shape[0]
    inv_d2 = A_derivative_H(hkl_rep) @ A
    d = 1.0 / np.sqrt(inv_d2)
    tth = 2 * np.degrees(np.arcsin(np.clip(wavelength_a / (2 * d), -1, 1)))
    fsq = StructureFactorTable(phase, hkl_rep, wavelength_a).fsq(inv_d2)
    order = np.lexsort((-hkl_rep[:, 2], -hkl_rep[:, 1], -hkl_rep[:, 0], tth))
    return ReflectionList(hkl_rep[order], d[order], tth[order], mult[order], fsq[order],
                          [equivalents[i] for i in order])


# ------------------------------------------------------------------------------ CIF writing

def write_phase_cif(phase: Phase, path: str | os.PathLike,
                    cell_esd: Sequence[float] | None = None) -> Path:
    """Write a phase as a small CIF (atomic: temp file + rename) that :func:`read_phase` reads back.

    Parameters
    ----------
    phase : Phase
    path : path-like
    cell_esd : sequence of 6 or 7 float, optional
        Esds of a, b, c, α, β, γ (, V); written in CIF parenthesis notation only as a
        comment-free extra item ``_midasflow_cell_esd``.

    Returns
    -------
    Path
    """
    path = Path(path)
    sg = phase.space_group
    lines = [f"data_{_cif_token(phase.name)}",
             "_audit_creation_method 'midasflow'",
             f"_cell_length_a {phase.cell[0]:.8f}",
             f"_cell_length_b {phase.cell[1]:.8f}",
             f"_cell_length_c {phase.cell[2]:.8f}",
             f"_cell_angle_alpha {phase.cell[3]:.6f}",
             f"_cell_angle_beta {phase.cell[4]:.6f}",
             f"_cell_angle_gamma {phase.cell[5]:.6f}",
             f"_cell_volume {cell_volume(phase.cell):.6f}",
             f"_cell_formula_units_Z {phase.z_formula:g}",
             f"_space_group_name_H-M_alt '{sg.xhm()}'",
             f"_space_group_name_Hall '{sg.hall.strip()}'",
             f"_space_group_IT_number {sg.number}"]
    if cell_esd is not None:
        lines.append("_midasflow_cell_esd '" + " ".join(f"{e:.3e}" for e in cell_esd) + "'")
    lines += ["loop_", "_space_group_symop_operation_xyz"]
    lines += [f"'{op.triplet()}'" for op in sg.operations()]
    if phase.atoms:
        lines += ["loop_", "_atom_site_label", "_atom_site_type_symbol", "_atom_site_fract_x",
                  "_atom_site_fract_y", "_atom_site_fract_z", "_atom_site_occupancy",
                  "_atom_site_U_iso_or_equiv"]
        for a in phase.atoms:
            lines.append(f"{_cif_token(a.label)} {a.element} {a.xyz[0]:.6f} {a.xyz[1]:.6f} "
                         f"{a.xyz[2]:.6f} {a.occ:.5f} {a.uiso:.6f}")
    return write_text_atomic(path, "\n".join(lines) + "\n")


def _cif_token(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in text) or "phase"
