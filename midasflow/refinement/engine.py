"""Native GSAS-II-style Rietveld / Le Bail refinement of one constant-wavelength pattern.

Model (``docs/reference/gsas2_profile.md``, with GSAS-II sources)::

    y_calc(x) = Σ_n Back;n·T_n(t) + Σ_phases Σ_h I_h·[Ω_h(x) + k·Ω_h^Kα2(x)]
    I_h = Scale · p:0:Scale · M_h · P_pol(2θ_h) · PO_h · (1/V) · L(θ_h) · |F_h|²
    2θ_h = 2θ₀ − (0.18/πR)(DisplaceX cos2θ₀ + DisplaceY sin2θ₀) + Zero   (Debye–Scherrer)

with Ω_h the FCJ ⊗ TCH pseudo-Voigt of :mod:`midasflow.profile` (per centidegree); the Kα2 term
only for a doublet instrument (Lam1, Lam2, k = I(L2)/I(L1)), positions computed with Lam1.
Weighted least squares (w = 1/σ²) by Levenberg–Marquardt on the diagonally normalised normal
matrix with an SVD pseudo-inverse; the Jacobian is analytic (profile derivatives × chain rule
through A-terms → 2θ, U..Z/size/mustrain → σ²/γ, Lorentz–polarization, 1/V, |F|²(d), U_iso and
the atom coordinates).

Parameter names are GSAS-II's: ``Zero, U, V, W, X, Y, Z, SH/L, Scale, DisplaceX, DisplaceY,
Back;n`` (histogram), ``p::A<i>`` (independent A-terms of phase p), ``p:0:Scale`` (phase
fraction), ``p:0:Size;i`` (µm), ``p:0:Mustrain;i`` (10⁻⁶), ``p:0:MD`` (March–Dollase ratio, axis
``po_axis``), ``p:0:C(l,n)`` (spherical-harmonics preferred orientation,
:mod:`midasflow.texture.po`), ``p::Ax:j``, ``p::Ay:j``, ``p::Az:j``, ``p::AUiso:j``.

Le Bail (``mode='lebail'``, doc section 9): the |F|² of every reflection is replaced by the extracted
Fo², re-extracted after every least-squares cycle, each extraction's partition repeated while it
lowers χ² (up to its fixed point).
The histogram and phase scales are held fixed (they are fully correlated with the extracted
intensities). One deliberate difference from GSAS-II's ``ComputeFobsSqCW``: every point of a
reflection's window contributes its ratio (y − y_b)/(y_c − y_b), negative ones included. GSAS-II
drops the points with ratio ≤ 0; over its 50–75 FWHM windows the dropped negative noise in the
tails biases every Fo² upwards, which pulls the background down and the Lorentzian widths up
cycle after cycle (on a simulated ZnO pattern Rwp drifted from 6.68 % to 6.98 % in 30 cycles
while the unclipped partition stays at 6.66 %, below Rietveld's 6.68 %).
"""

from __future__ import annotations

import math
import warnings as _warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from midasflow import profile as _profile
from midasflow.blas_threads import one_blas_thread
from midasflow.crystal import (
    A_derivative_H,
    A_to_cell,
    Atom,
    Phase,
    StructureFactorTable,
    _A_to_G,
    cell_esds,
    cell_to_A,
    cell_volume,
    free_coordinates,
    laue_rotations,
    laue_tie_matrix,
    reflections,
)
from midasflow.errors import PatternError
from midasflow.instrument import Instrument, as_instrument
from midasflow.refinement.recipe import Stage, default_stages
from midasflow.refinement.result import PatternResult
from midasflow.refinement.start import estimate_from_model, low_envelope
from midasflow.texture.intensities import extract_intensities
from midasflow.texture.po import PreferredOrientation

__all__ = ["PatternModel", "levenberg_marquardt", "refine_pattern"]

_DEG = 180.0 / math.pi
_SIG2_FLOOR = _profile.SIG2_FLOOR_CDEG2
_GAM_FLOOR = _profile.GAM_FLOOR_CDEG
#: Reflection tables reused between calls (the pipeline refines many lineouts of one phase).
_TABLE_CACHE: OrderedDict[tuple, _PhaseTables] = OrderedDict()
_TABLE_CACHE_SIZE = 16
#: 2θ range of a reflection list is widened to multiples of this (deg) so lineouts share it.
_RANGE_STEP_DEG = 0.5
#: Le Bail: extraction passes per call at most, and their relative convergence tolerance.
_LEBAIL_PASSES = 30
_LEBAIL_RTOL = 1e-5
#: Extracted Fo² never drop below this fraction of the largest one (0 would be a fixed point).
_LEBAIL_FLOOR = 1e-9
#: SH/L escape scan (stage option ``scan``): relative offsets tried around the current value.
_SCAN_FACTORS = np.exp(np.linspace(math.log(0.8), math.log(1.25), 12))
#: ... and the relative χ² gain a candidate must bring to restart the LM from it.
_SCAN_GAIN = 1e-3
#: 2θ grid (points over the fitted range) on which the unfloored widths are checked (flags)
#: and bounded (ProfileConstraint).
_WIDTH_GRID = 129


@dataclass(frozen=True)
class _PhaseTables:
    """Reflection tables of one phase for one wavelength and 2θ range (shared, read-only)."""

    hkl: np.ndarray          # (n, 3)
    H6: np.ndarray           # (n, 6)
    T: np.ndarray            # (6, k)
    free: tuple[int, ...]
    HT: np.ndarray           # (n, k) = H6 @ T : ∂(1/d²)/∂p
    mult: np.ndarray         # (n,) float
    sf: StructureFactorTable
    orbits: np.ndarray       # (n, N, 3) hkl × Laue rotations (March–Dollase equivalents)


def _phase_key(ph: Phase) -> tuple:
    atoms = tuple((a.label, a.element, tuple(map(float, a.xyz)), float(a.occ), float(a.uiso))
                  for a in ph.atoms)
    return (ph.name, tuple(map(float, ph.cell)), ph.space_group.hall, ph.laue, ph.unique_axis,
            atoms)


def _phase_tables(ph: Phase, lam: float, tth_min: float, tth_max: float) -> _PhaseTables:
    """Reflections, tie matrix, |F|² table and PO orbits of ``ph`` (cached by content)."""
    lo = math.floor(max(tth_min, 0.0) / _RANGE_STEP_DEG) * _RANGE_STEP_DEG
    hi = math.ceil(tth_max / _RANGE_STEP_DEG) * _RANGE_STEP_DEG
    key = (_phase_key(ph), float(lam), lo, hi)
    tables = _TABLE_CACHE.get(key)
    if tables is not None:
        _TABLE_CACHE.move_to_end(key)
        return tables
    refl = reflections(ph, lam, hi, lo)
    T, free = laue_tie_matrix(ph.laue, ph.unique_axis)
    H6 = A_derivative_H(refl.hkl)
    orbits = np.einsum("ni,rij->nrj", refl.hkl, laue_rotations(ph.space_group))
    tables = _PhaseTables(refl.hkl, H6, T, tuple(free), H6 @ T, refl.mult.astype(float),
                          StructureFactorTable(ph, refl.hkl, lam), orbits)
    for arr in (tables.hkl, tables.H6, tables.T, tables.HT, tables.mult, tables.orbits):
        arr.flags.writeable = False
    _TABLE_CACHE[key] = tables
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return tables


@dataclass
class _PhaseData:
    """Per-model state of one phase: shared tables plus what refinement changes."""

    index: int
    phase: Phase
    tables: _PhaseTables
    fsq_lebail: np.ndarray   # (n,) extracted intensities (Le Bail)
    sf: StructureFactorTable
    sf_key: tuple = ()       # atom coordinates the |F|² table was built for
    fsq_memo: tuple = field(default=(None, None))   # (key, fsq output) of the last |F|² call

    @property
    def hkl(self) -> np.ndarray:
        return self.tables.hkl

    @property
    def mult(self) -> np.ndarray:
        return self.tables.mult

    @property
    def free(self) -> tuple[int, ...]:
        return self.tables.free


class PatternModel:
    """y_calc and its Jacobian for one pattern and a set of phases.

    Parameters
    ----------
    x_deg : ndarray (n,)
        2θ of the points, degrees, increasing.
    x_range : tuple of float
        (x₀, x_N) mapped onto t = −1..1 for the Chebyshev background.
    phases : sequence of Phase
    instprm : Instrument, mapping of GSAS-II keys or .instprm path
        Normalised by :func:`midasflow.instrument.as_instrument`. Lam (or Lam1, Lam2,
        I(L2)/I(L1)), Polariz. and Gonio. radius are fixed; Zero, U..Z, SH/L are starting values.
    bkg_terms : int
    sample_azimuth_deg : float
        Sample azimuth φ of the polarization correction (doc section 4).
    mode : {'rietveld', 'lebail'}
    precision : {'float64', 'float32'}
        Profile arithmetic: float64 (default) evaluates the model exactly; float32 is GSAS-II's
        REAL*4 operation order, for parity checks (:mod:`midasflow.profile`; its rounding makes
        χ² a staircase in SH/L at low angles, :func:`refine_pattern`).
    texture, po_axis, sh_order
        Preferred-orientation model of every phase (:class:`midasflow.texture.po.PreferredOrientation`):
        None, 'md' (March–Dollase along ``po_axis`` [h, k, l]) or 'sh' (spherical harmonics to
        order ``sh_order``); its parameters start at no texture.

    Notes
    -----
    The preferred-orientation angles use the metric of the starting cell; their tiny
    dependence on the refined cell is neglected in model and Jacobian alike. DisplaceX/Y use the
    Debye–Scherrer formula (doc section 3) with R = Gonio. radius.
    """

    def __init__(self, x_deg: np.ndarray, x_range: tuple[float, float], phases: Sequence[Phase],
                 instprm: Instrument | Mapping[str, Any] | str, bkg_terms: int = 6,
                 sample_azimuth_deg: float = 0.0, mode: str = "rietveld",
                 precision: str = "float64", texture: str | None = None,
                 po_axis: Sequence[int] = (0, 0, 1), sh_order: int = 4):
        self.x = np.asarray(x_deg, dtype=float)
        self.mode = mode
        self.precision = precision
        inst = as_instrument(instprm)
        self.instrument = inst
        self.lam = inst.wavelength_a
        self.doublet = (dict(lam1_a=inst.lam1, lam2_a=inst.lam2, i_ratio=inst.i_ratio)
                        if inst.is_doublet else {})
        self.polariz = inst.polariz
        self.gonio_radius_mm = inst.gonio_radius_mm
        self.azimuth = float(sample_azimuth_deg)
        x0, xn = x_range
        self.bkg_basis = _profile.chebyshev_design_matrix(self.x, bkg_terms, x0,
                                                          xn if xn > x0 else x0 + 1.0)
        self.bkg_terms = bkg_terms
        self.values: dict[str, float] = {
            "Zero": inst.zero, "U": inst.U, "V": inst.V, "W": inst.W, "X": inst.X, "Y": inst.Y,
            "Z": inst.Z, "SH/L": inst.shl, "Scale": 1.0, "DisplaceX": inst.displace_x_um,
            "DisplaceY": inst.displace_y_um}
        for i in range(bkg_terms):
            self.values[f"Back;{i}"] = 0.0
        self.phases: list[_PhaseData] = []
        tth_max = float(self.x.max()) + 2.0
        tth_min = max(float(self.x.min()) - 1.0, 0.0)
        for p, ph in enumerate(phases):
            self.phases.append(self._phase_data(p, ph, tth_min, tth_max))
        self.po = [PreferredOrientation(texture, f"{pd.index}:0:", pd.hkl, pd.tables.orbits,
                                        pd.phase.cell, pd.phase.laue, pd.phase.unique_axis,
                                        po_axis, sh_order) for pd in self.phases]
        for po in self.po:
            self.values.update(po.initial_values())
        self.x_step = np.diff(self.x, append=self.x[-1] + (self.x[-1] - self.x[-2]
                                                             if self.x.size > 1 else 1.0))
        self._terms_memo: list[tuple] = []     # (key, output) of the last two _all_terms
        self._eval_memo = [(None, None), (None, None)]  # (key, output) of the last _evaluate without, with J

    # ------------------------------------------------------------------ set-up
    def _phase_data(self, p: int, ph: Phase, tth_min: float, tth_max: float) -> _PhaseData:
        tables = _phase_tables(ph, self.lam, tth_min, tth_max)
        A = cell_to_A(ph.cell)
        for i in tables.free:
            self.values[f"{p}::A{i}"] = float(A[i])
        self.values[f"{p}:0:Scale"] = 1.0
        self.values[f"{p}:0:Size;i"] = 1.0
        self.values[f"{p}:0:Mustrain;i"] = 1000.0
        self.values[f"{p}:0:MD"] = 1.0
        for j, atom in enumerate(ph.atoms):
            for c, v in zip("xyz", atom.xyz):
                self.values[f"{p}::A{c}:{j}"] = float(v)
            self.values[f"{p}::AUiso:{j}"] = float(atom.uiso)
        return _PhaseData(p, ph, tables, np.ones(len(tables.mult)), tables.sf,
                          tuple(c for a in ph.atoms for c in a.xyz))

    def atom_names(self, p: int) -> list[str]:
        """Names of the refinable atom parameters of phase p: the coordinates not fixed by the
        site symmetry (:func:`~midasflow.crystal.free_coordinates`), then U_iso."""
        ph = self.phases[p].phase
        names = []
        for j, atom in enumerate(ph.atoms):
            names += [f"{p}::A{c}:{j}" for c, ok in zip("xyz", free_coordinates(ph, atom)) if ok]
            names.append(f"{p}::AUiso:{j}")
        return names

    def cell_names(self) -> list[str]:
        """Independent A-term names of all phases."""
        return [f"{pd.index}::A{i}" for pd in self.phases for i in pd.free]

    def A_terms(self, p: int, values: Mapping[str, float]) -> np.ndarray:
        """Full A (6,) of phase p from the independent terms in ``values``."""
        pd = self.phases[p]
        return pd.tables.T @ np.array([values[f"{p}::A{i}"] for i in pd.free])

    def refined_phase(self, p: int, values: Mapping[str, float]) -> Phase:
        """Phase p with the cell (and atoms) of ``values``."""
        ph = self.phases[p].phase
        atoms = [Atom(a.label, a.element,
                      tuple(values[f"{p}::A{c}:{j}"] for c in "xyz"), a.occ,
                      values[f"{p}::AUiso:{j}"]) for j, a in enumerate(ph.atoms)]
        return ph.with_cell(A_to_cell(self.A_terms(p, values))).with_atoms(atoms)

    def _fsq(self, p: int, values: Mapping[str, float], inv_d2: np.ndarray, A: np.ndarray,
             derivatives: bool):
        """|F|² of phase p (and derivatives), memoised on (A, U_iso, coordinates)."""
        pd = self.phases[p]
        key = tuple(values[f"{p}::A{c}:{j}"] for j in range(pd.sf.n_atoms) for c in "xyz")
        if key != pd.sf_key:
            pd.sf = StructureFactorTable(self.refined_phase(p, values), pd.hkl, self.lam)
            pd.sf_key = key
        uiso = np.array([values[f"{p}::AUiso:{j}"] for j in range(pd.sf.n_atoms)])
        memo_key = (A.tobytes(), uiso.tobytes(), key)
        old_key, old = pd.fsq_memo
        if old_key == memo_key:
            if isinstance(old, tuple):          # computed with derivatives: serves both calls
                return old if derivatives else old[0]
            if not derivatives:
                return old
        out = pd.sf.fsq(inv_d2, uiso, derivatives=derivatives)
        pd.fsq_memo = (memo_key, out)
        return out

    # ------------------------------------------------------------------ reflections
    def reflection_terms(self, p: int, values: Mapping[str, float], vary: Sequence[str] = (),
                         jac: bool = False) -> dict[str, np.ndarray]:
        """Per-reflection positions, widths, intensities (and their parameter derivatives).

        Returns
        -------
        dict
            ``tth, sig2, gam, intensity, fsq, pre`` (n,) (``pre`` = I_h/|F_h|²) and, if ``jac``,
            ``dI, dtth, dsig2, dgam, dshl`` (n, len(vary)): derivatives of I_h, 2θ_h, σ²_h, γ_h
            and SH/L, and ``jac_coef`` (5, n, len(vary)): those five stacked (they are its rows),
            in the order of the peak sum's pieces (:data:`midasflow.profile.PIECES`).
        """
        pd = self.phases[p]
        tb = pd.tables
        v = values
        A = self.A_terms(p, v)
        inv_d2 = tb.H6 @ A
        with np.errstate(invalid="ignore", divide="ignore"):
            d = 1.0 / np.sqrt(inv_d2)
            pos = _profile.peak_position_deg(d, self.lam, v["Zero"], v["DisplaceX"],
                                             v["DisplaceY"], self.gonio_radius_mm)
        tth = pos.tth_deg
        size, mu = v[f"{p}:0:Size;i"], v[f"{p}:0:Mustrain;i"]
        sg = _profile.peak_sig2_gam(tth, v["U"], v["V"], v["W"], v["X"], v["Y"], v["Z"],
                                    size_um=size, mustrain=mu, lam_a=self.lam, derivatives=jac)
        lorentz = _profile.lorentz_factor(tth)
        ppol = _profile.polarization_factor(tth, self.polariz, self.azimuth)
        det_g = np.linalg.det(_A_to_G(A))
        inv_v = math.sqrt(det_g) if det_g > 0 else math.nan
        po, dpo = self.po[p].correction(v, vary, tth)
        rietveld = self.mode != "lebail"
        if rietveld:
            fsq_out = self._fsq(p, v, inv_d2, A, jac)
            fsq = fsq_out[0] if jac else fsq_out
        else:
            fsq = pd.fsq_lebail
        pre_no_po = v["Scale"] * v[f"{p}:0:Scale"] * tb.mult * ppol * inv_v * lorentz
        pre = pre_no_po * po  # I/|F|²
        intensity = pre * fsq
        out = dict(tth=tth, sig2=sg.sig2, gam=sg.gam, intensity=intensity, fsq=fsq, pre=pre)
        if not jac:
            return out
        col = {name: i for i, name in enumerate(vary)}
        n, nv = len(tth), len(vary)
        jac_coef = np.zeros((5, n, nv))
        dI, dtth, dsig2, dgam, dshl = jac_coef      # views: filled in place
        # I_h through 2θ_h: ∂ln L/∂2θ and ∂ln P_pol/∂2θ (per degree)
        th = np.radians(tth) / 2
        dlnl_dtth = (-2 / np.tan(th) + np.tan(th)) * (math.pi / 360.0)
        phi = math.radians(self.azimuth)
        pa = (1 - self.polariz) * math.cos(phi) ** 2 + self.polariz * math.sin(phi) ** 2
        dppol_dtth = -pa * 2 * np.sin(4 * th) * (math.pi / 180.0)
        dI_dtth = intensity * (dlnl_dtth + dppol_dtth / ppol)
        # cell: 2θ through 1/d² (d = (1/d²)^-1/2), 1/V, |F|²(1/d²)
        dtth_dinvd2 = pos.d_d * (-0.5 * d ** 3)
        g_real = np.linalg.inv(_A_to_G(A))
        dlninvv_dp = 0.5 * np.array([g_real[0, 0], g_real[1, 1], g_real[2, 2], g_real[0, 1],
                                     g_real[0, 2], g_real[1, 2]]) @ tb.T
        for k, i in enumerate(tb.free):
            c = col.get(f"{p}::A{i}")
            if c is not None:
                dtth[:, c] = dtth_dinvd2 * tb.HT[:, k]
                dI[:, c] = intensity * dlninvv_dp[k]
                if rietveld:
                    dI[:, c] += pre * fsq_out[1] * tb.HT[:, k]
        for name, deriv in (("Zero", pos.d_zero), ("DisplaceX", pos.d_displace_x),
                            ("DisplaceY", pos.d_displace_y)):
            if name in col:
                dtth[:, col[name]] = deriv
        dI += dI_dtth[:, None] * dtth
        dsig2 += sg.d_sig2["tth"][:, None] * dtth
        dgam += sg.d_gam["tth"][:, None] * dtth
        for name, key in (("U", "U"), ("V", "V"), ("W", "W"), ("X", "X"), ("Y", "Y"),
                          ("Z", "Z"), (f"{p}:0:Size;i", "Size"),
                          (f"{p}:0:Mustrain;i", "Mustrain")):
            c = col.get(name)
            if c is not None:
                dsig2[:, c] += sg.d_sig2[key]
                dgam[:, c] += sg.d_gam[key]
        if "SH/L" in col:
            dshl[:, col["SH/L"]] = 1.0
        if "Scale" in col:
            dI[:, col["Scale"]] = intensity / v["Scale"]
        if f"{p}:0:Scale" in col:
            dI[:, col[f"{p}:0:Scale"]] = intensity / v[f"{p}:0:Scale"]
        for name, d_po in dpo.items():
            if name in col:
                dI[:, col[name]] = pre_no_po * fsq * d_po
        if rietveld:
            dxyz = None
            for j in range(pd.sf.n_atoms):
                c = col.get(f"{p}::AUiso:{j}")
                if c is not None:
                    dI[:, c] = pre * fsq_out[2][j]
                for axis, name in enumerate("xyz"):
                    c = col.get(f"{p}::A{name}:{j}")
                    if c is not None:
                        if dxyz is None:
                            uiso = np.array([v[f"{p}::AUiso:{i}"] for i in range(pd.sf.n_atoms)])
                            dxyz = pd.sf.dfsq_dxyz(inv_d2, uiso)
                        dI[:, c] = pre * dxyz[j, axis]
        return dict(out, dI=dI, dtth=dtth, dsig2=dsig2, dgam=dgam, dshl=dshl, jac_coef=jac_coef)

    # ------------------------------------------------------------------ pattern
    def _all_terms(self, values, vary=(), jac=False):
        # Rietveld terms without derivatives do not depend on SH/L and the background: the
        # last two are reused while only those change (the SH/L escape scan alternates its
        # candidates with stepped trials; scale and background solves). Le Bail's extracted
        # intensities change between calls.
        key = None
        if not jac and self.mode != "lebail":
            key = tuple((k, v) for k, v in values.items()
                        if k != "SH/L" and not k.startswith("Back;"))
            for i, (memo_key, memo_out) in enumerate(self._terms_memo):
                if key == memo_key:
                    self._terms_memo.insert(0, self._terms_memo.pop(i))
                    return memo_out
        terms = [self.reflection_terms(pd.index, values, vary, jac) for pd in self.phases]
        if len(terms) == 1:
            out = terms[0], terms
        else:
            out = {k: np.concatenate([t[k] for t in terms], axis=1 if k == "jac_coef" else 0)
                   for k in terms[0]}, terms
        if key is not None:
            self._terms_memo = [(key, out)] + self._terms_memo[:1]
        return out

    def _peaks(self, rt: Mapping[str, np.ndarray], shl: float, jac: bool,
               intensity: np.ndarray | None = None) -> _profile.PeakSum:
        return _profile.pattern(self.x, rt["tth"], rt["sig2"], rt["gam"],
                                rt["intensity"] if intensity is None else intensity, shl,
                                derivatives=jac, precision=self.precision, **self.doublet)

    def background(self, values: Mapping[str, float]) -> np.ndarray:
        """Chebyshev background (n,) of ``values``."""
        return self.bkg_basis @ np.array([values[f"Back;{i}"] for i in range(self.bkg_terms)])

    def evaluate(self, values: Mapping[str, float], vary: Sequence[str] = (),
                 jac: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """y_calc, background and (optionally) the Jacobian ∂y_calc/∂vary.

        Returns
        -------
        ycalc : ndarray (n,)
        bkg : ndarray (n,)
        J : ndarray (n, len(vary)) or None
        """
        y, bkg, J, _ = self._evaluate(values, vary, jac)
        return y, bkg, J

    def _evaluate(self, values, vary=(), jac=False):
        """:meth:`evaluate` plus what it was made of: ``(rt, terms, peaks)``, the concatenated
        and per-phase reflection terms (:meth:`_all_terms`) and the peak sum (None when a
        reflection's 2θ is not finite).

        The last evaluation with and the last without the Jacobian are kept and given again for
        the same values and vary list (Rietveld only: Le Bail's extracted intensities change
        between calls): a refinement evaluates its stages' and its final values once more after
        the LM has (the stage's R, the esds at the minimum). The arrays returned are shared:
        callers must not change them in place."""
        key = None
        if self.mode != "lebail":
            key = (tuple(values.items()), tuple(vary))
            memo_key, memo_out = self._eval_memo[jac]
            if key == memo_key:
                return memo_out
        out = self._evaluate_new(values, vary, jac)
        if key is not None:
            self._eval_memo[jac] = (key, out)
        return out

    def _evaluate_new(self, values, vary, jac):
        bkg = self.background(values)
        rt, terms = self._all_terms(values, vary, jac)
        if not np.all(np.isfinite(rt["tth"])):
            nan = np.full(self.x.size, np.nan)
            return nan, bkg, (np.full((self.x.size, len(vary)), np.nan) if jac else None), (rt, terms, None)
        peaks = self._peaks(rt, values["SH/L"], jac)
        y = bkg + peaks.y
        if not jac:
            return y, bkg, None, (rt, terms, peaks)
        # every column is set: the background's, the peaks' (each per-peak piece only
        # multiplies the parameter columns it depends on) and zeros
        J = np.empty((self.x.size, len(vary)))
        coef = rt["jac_coef"]
        depends = coef.any(axis=(0, 1))
        used = np.flatnonzero(depends)
        if used.size:
            J[:, used] = peaks.project(dict(zip(_profile.PIECES, coef[:, :, used])))
        back = [(c, int(name[5:])) for c, name in enumerate(vary) if name.startswith("Back;")]
        if back:
            cols, terms_b = zip(*back)
            J[:, cols] = self.bkg_basis[:, terms_b]
            depends[list(cols)] = True
        J[:, ~depends] = 0.0
        return y, bkg, J, (rt, terms, peaks)

    def chi2(self, values: Mapping[str, float], yobs: np.ndarray, sqrt_w: np.ndarray) -> float:
        """Σ w (y − y_calc)² (inf if not finite)."""
        yc, _, _, _ = self._evaluate(values)
        r = sqrt_w * (yobs - yc)
        c = float(r @ r)
        return c if math.isfinite(c) else math.inf

    def raw_widths(self, values: Mapping[str, float],
                   tth_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Unfloored σ² (centideg²) and γ (centideg) of every phase at ``tth_deg`` (deg).

        Returns
        -------
        sig2_raw, gam_raw : ndarray (n_phases, len(tth_deg))
        """
        v = values
        sg = [_profile.peak_sig2_gam(tth_deg, v["U"], v["V"], v["W"], v["X"], v["Y"], v["Z"],
                                     size_um=v[f"{pd.index}:0:Size;i"],
                                     mustrain=v[f"{pd.index}:0:Mustrain;i"], lam_a=self.lam,
                                     derivatives=False)
              for pd in self.phases]
        return np.array([g.sig2_raw for g in sg]), np.array([g.gam_raw for g in sg])

    # ------------------------------------------------------------------ Le Bail
    def lebail_extract(self, values: Mapping[str, float], yobs: np.ndarray,
                       sqrt_w: np.ndarray) -> None:
        """Fo² partition (doc section 9), repeated while it lowers χ²: replace the Le Bail intensities.

        Each pass sets Fo²_h ← Fo²_h · Σ_i r_i Ω_h(x_i)Δx_i / Σ_i Ω_h(x_i)Δx_i over the
        reflection's window with r_i = (y_i − yb_i)/(yc_i − yb_i) (1e-10 where yc = yb), negative
        ratios included (see the module docstring); Fo² stay above 1e-9 of the largest one. The
        profile is computed once; the passes only re-partition. Passes stop at the fixed point
        (largest change < 1e-5 of the largest Fo²), after 30, or at the first pass that would
        raise χ² (that pass is discarded): with a misplaced or mis-shaped model (early stages)
        the partition shares observed intensity among wrong reflections, so iterating it blindly
        can make the fit much worse, while the guarded passes never do.
        """
        rt, terms = self._all_terms(values)
        if not np.all(np.isfinite(rt["tth"])) or len(rt["tth"]) == 0:
            return
        unit = self._peaks(rt, values["SH/L"], False, intensity=np.ones_like(rt["tth"]))
        n_pts = unit.hi - unit.lo
        peak_of = np.repeat(np.arange(n_pts.size), n_pts)
        point = unit.entry_points()
        omega = unit.d_intensity
        om = omega * self.x_step[point]
        den = np.bincount(peak_of, weights=om, minlength=n_pts.size)
        has = den > 0
        ymb = yobs - self.background(values)
        pre = rt["pre"]
        fsq = np.concatenate([pd.fsq_lebail for pd in self.phases])
        best, best_chi2 = fsq, math.inf
        for _ in range(_LEBAIL_PASSES + 1):
            ycalc_peaks = np.bincount(point, weights=omega * (pre * fsq)[peak_of],
                                      minlength=self.x.size)
            res = sqrt_w * (ymb - ycalc_peaks)
            chi2 = float(res @ res)
            if not chi2 < best_chi2:
                break
            best, best_chi2 = fsq, chi2
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(ycalc_peaks != 0, ymb / ycalc_peaks, 1e-10)
            num = np.bincount(peak_of, weights=ratio[point] * om, minlength=n_pts.size)
            factor = np.where(has, num / np.where(has, den, 1.0), 1.0)
            new = fsq * factor
            new = np.maximum(new, _LEBAIL_FLOOR * max(float(new.max()), 0.0))
            if float(np.max(np.abs(new - fsq))) <= _LEBAIL_RTOL * float(new.max()):
                best = new
                break
            fsq = new
        start = 0
        for pd, t in zip(self.phases, terms):
            n = len(t["tth"])
            pd.fsq_lebail = best[start:start + n].copy()
            start += n


# ------------------------------------------------------------------------------ least squares

@dataclass
class _LMState:
    values: dict[str, float]
    chi2: float
    cycles: int
    converged: bool = True


#: Phase parameters that also set σ² and γ (besides U..Z), matched by suffix.
_WIDTH_SUFFIXES = (":0:Size;i", ":0:Mustrain;i")


class ProfileConstraint:
    """σ² > 0 and γ > 0 (the unfloored formulas) over the fitted 2θ range.

    The bounds sit 1 % above GSAS-II's 0.001 floors (σ² ≥ 0.00101 centideg², γ ≥ 0.00101
    centideg) so that a width held at its bound keeps a non-zero derivative (on the floor the
    model's derivatives vanish and the fit could not leave it). The widths are checked on a
    grid of 2θ over the range (every phase, its size and microstrain terms included). σ² and γ
    are linear in U..Z; the size and microstrain terms are linearised by central differences.
    Used by :func:`levenberg_marquardt`.

    Parameters
    ----------
    model : PatternModel
    x_range : (float, float)
        Fitted 2θ range, degrees.
    n_grid : int
        Grid points over the range.
    """

    SIG2_MIN = 1.01 * _SIG2_FLOOR
    GAM_MIN = 1.01 * _GAM_FLOOR

    def __init__(self, model: PatternModel, x_range: tuple[float, float],
                 n_grid: int = _WIDTH_GRID):
        self.model = model
        self.tth = np.linspace(float(x_range[0]), float(x_range[1]), n_grid)
        th = np.radians(self.tth) / 2
        tan_t, one, zero = np.tan(th), np.ones_like(th), np.zeros_like(th)
        n_ph = len(model.phases)
        # ∂(σ², γ)/∂(U..Z), the same for every phase: σ² = U t² + V t + W, γ = X/c + Y t + Z
        rows = {"U": (tan_t ** 2, zero), "V": (tan_t, zero), "W": (one, zero),
                "X": (zero, 1 / np.cos(th)), "Y": (zero, tan_t), "Z": (zero, one)}
        self._linear = {k: np.concatenate([np.tile(a, n_ph), np.tile(b, n_ph)])
                        for k, (a, b) in rows.items()}
        # what the widths depend on, and the last widths computed (an accepted trial's are
        # the next LM cycle's linearisation point)
        self._width_names = ("U", "V", "W", "X", "Y", "Z") + tuple(
            f"{pd.index}{suffix}" for pd in model.phases for suffix in _WIDTH_SUFFIXES)
        self._memo: tuple = (None, None)

    def bounds(self) -> np.ndarray:
        """Lower bounds of the stacked (σ², γ) grid values."""
        n = len(self.model.phases) * self.tth.size
        return np.concatenate([np.full(n, self.SIG2_MIN), np.full(n, self.GAM_MIN)])

    def values_of(self, values: Mapping[str, float]) -> np.ndarray:
        """Stacked unfloored σ² and γ on the grid."""
        sig2, gam = self._grid_widths(values)
        return np.concatenate([sig2.ravel(), gam.ravel()])

    def _grid_widths(self, values: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
        """Unfloored σ², γ on the grid (shared arrays: not to be changed in place)."""
        key = tuple(values[name] for name in self._width_names)
        if key != self._memo[0]:
            self._memo = (key, self.model.raw_widths(values, self.tth))
        return self._memo[1]

    def feasible(self, values: Mapping[str, float]) -> bool:
        sig2, gam = self._grid_widths(values)
        # relative slack: the bound itself is reached by the constrained step
        return bool(np.all(sig2 >= self.SIG2_MIN - 1e-9 * (1.0 + np.abs(sig2)))
                    and np.all(gam >= self.GAM_MIN - 1e-9 * (1.0 + np.abs(gam))))

    def linearised(self, values: Mapping[str, float],
                   vary: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(C, g0): the grid values are g0 + C @ δ for parameter shifts δ of ``vary``."""
        g0 = self.values_of(values)
        C = np.zeros((g0.size, len(vary)))
        for c, name in enumerate(vary):
            if name in self._linear:
                C[:, c] = self._linear[name]
            elif name.endswith(_WIDTH_SUFFIXES):
                h = 1e-4 * max(abs(values[name]), 1.0)
                up = self.values_of(dict(values, **{name: values[name] + h}))
                dn = self.values_of(dict(values, **{name: values[name] - h}))
                C[:, c] = (up - dn) / (2 * h)
        return C, g0

    def active(self, values: Mapping[str, float], margin: float = 0.1) -> bool:
        """Whether a width is within ``margin`` (relative) of its bound anywhere."""
        sig2, gam = self._grid_widths(values)
        return bool(sig2.min() <= self.SIG2_MIN * (1 + margin)
                    or gam.min() <= self.GAM_MIN * (1 + margin))

    def make_feasible(self, values: dict[str, float]) -> list[str]:
        """Raise W (σ²) and X (γ) just enough to satisfy the bounds; returns what changed."""
        notes = []
        sig2, gam = self._grid_widths(values)
        lack = self.SIG2_MIN - float(sig2.min())
        if lack > 0:
            values["W"] += lack * (1 + 1e-6) + 1e-9
            notes.append(f"start W raised by {lack:.4g} centideg² to keep σ² > 0")
        lack = self.GAM_MIN - float(gam.min())
        if lack > 0:
            values["X"] += lack * (1 + 1e-6) + 1e-9      # γ grows by ΔX/cosθ ≥ ΔX
            notes.append(f"start X raised by {lack:.4g} centideg to keep γ > 0")
        return notes


def _constrained_step(H: np.ndarray, g: np.ndarray, C: np.ndarray, lower: np.ndarray,
                      step: np.ndarray, max_iter: int = 60) -> np.ndarray:
    """Minimise ½δᵀHδ − gᵀδ subject to C δ ≥ lower, given the unconstrained minimiser ``step``.

    Returns ``step`` when it already satisfies the constraints. Otherwise a primal active-set
    method (Nocedal & Wright, *Numerical Optimization*, algorithm 16.3) from δ = 0, which is
    feasible (``lower`` ≤ 0: the current point satisfies the constraints); each iteration
    solves the equality-constrained problem of the active rows by least squares on its KKT
    system (H may be singular), steps to the first blocking constraint or drops the active row
    with the most negative multiplier. The QP is convex, so this ends at its minimum.
    """
    tol = 1e-12 * (1 + np.abs(lower))
    if np.all(C @ step >= lower - tol):
        return step
    n = H.shape[0]
    x = np.zeros(n)
    active: list[int] = []
    is_active = np.zeros(C.shape[0], dtype=bool)
    p_zero = 1e-7 * (1.0 + float(np.linalg.norm(step)))
    # degenerate vertices (many nearly tangent rows of one width bound active at once) make
    # the active set trade rows with steps of ~zero length: n steps in a row that lower the
    # objective by less than 1e-10 of its value end the search there (a CeO2 fit's QP
    # otherwise used all 60 iterations to reach the same objective to 1e-10)
    objective, stalled = 0.0, 0
    for _ in range(max_iter):
        A = C[active]
        k = len(active)
        kkt = np.zeros((n + k, n + k))
        kkt[:n, :n] = H
        kkt[:n, n:] = -A.T
        kkt[n:, :n] = A
        rhs = np.concatenate([g - H @ x, np.zeros(k)])
        sol = _kkt_solve(kkt, rhs)
        p, mu = sol[:n], sol[n:]
        if np.linalg.norm(p) <= p_zero:         # (the KKT solve leaves ~1e-9 of noise)
            if k == 0 or mu.min() >= 0:
                return x
            is_active[active.pop(int(np.argmin(mu)))] = False
            continue
        cp = C @ p
        slack = C @ x - lower
        block = np.flatnonzero((cp < -1e-15) & ~is_active)
        alpha, hit = 1.0, -1
        if block.size:
            ratios = np.maximum(slack[block], 0.0) / -cp[block]
            j = int(np.argmin(ratios))
            if ratios[j] < 1.0:
                alpha, hit = float(ratios[j]), int(block[j])
        x = x + alpha * p
        new_objective = float(0.5 * x @ H @ x - g @ x)
        stalled = stalled + 1 if objective - new_objective <= 1e-10 * abs(new_objective) else 0
        objective = new_objective
        if stalled >= n:
            return x
        if hit >= 0:
            active.append(hit)
            is_active[hit] = True
    return x


def _kkt_solve(kkt: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solution of a KKT system by LU when that solves it to 1e-10 (relative residual), else
    the least-squares (minimum-norm, singular values below 1e-12 of the largest dropped)
    solution, which the rank-deficient systems of (nearly) dependent active rows need."""
    try:
        sol = np.linalg.solve(kkt, rhs)
    except np.linalg.LinAlgError:
        sol = None
    if sol is not None and np.all(np.isfinite(sol)) and \
            np.linalg.norm(kkt @ sol - rhs) <= 1e-10 * (1.0 + np.linalg.norm(rhs)):
        return sol
    return np.linalg.lstsq(kkt, rhs, rcond=1e-12)[0]


def levenberg_marquardt(model: PatternModel, values: dict[str, float], vary: Sequence[str],
                        yobs: np.ndarray, sqrt_w: np.ndarray, *, max_cycles: int = 8,
                        tol: float = 1e-6, svd_tol: float = 1e-10, lebail: bool = False,
                        constraint: ProfileConstraint | None = None) -> _LMState:
    """Minimise Σ w (y − y_calc)² over ``vary`` (Levenberg–Marquardt, SVD-stable).

    As GSAS-II's ``HessianLSQ``: the normal matrix is normalised by its diagonal, solved by an
    SVD pseudo-inverse (singular values below ``svd_tol`` of the largest dropped), λ starts at 0
    (Gauss–Newton), becomes 1e-3 on a rejected step and grows ×10 per retry; the next cycle
    starts from λ/10. Unlike GSAS-II a step is accepted only if χ² decreases (GSAS-II accepts up
    to 1 + 1.5e-8 more, doubling that slack per retry) and retries go on to λ = 1e3 (GSAS-II
    stops at 10). A cycle with no accepted step, or whose step promises (linear model) a χ²
    decrease below ``tol``·χ², or a relative decrease below ``tol`` ends the minimisation
    (GSAS-II's default tolerance is 1e-3).

    A step is also rejected when SH/L becomes negative or a varied scale, size or March–Dollase
    ratio non-positive (:func:`_physical`). Peak widths may reach GSAS-II's 0.001 floors (that
    is reported by the result's ``unphysical_profile`` flag), unless ``constraint`` is given:
    then each step is the solution of the damped normal equations under the linearised
    constraint (σ², γ > 0 over the fitted range, :class:`ProfileConstraint`) and a step
    that still violates it is rejected. In Le Bail mode the intensities are re-extracted after
    every cycle (:meth:`PatternModel.lebail_extract`).

    Returns
    -------
    _LMState
        Best parameters, their χ², the number of cycles run and whether a convergence test (not
        ``max_cycles``) ended the minimisation.
    """
    vals = dict(values)
    vary = list(vary)
    _onto_shl_floor(vals, vary)
    chi2 = model.chi2(vals, yobs, sqrt_w)
    cycles = 0
    eye = np.eye(len(vary))
    lam_start = 0.0
    converged = False
    for cycles in range(1, max_cycles + 1):
        yc, _, J, _ = model._evaluate(vals, vary, jac=True)
        r = sqrt_w * (yobs - yc)
        Jw = J * sqrt_w[:, None]
        N = Jw.T @ Jw
        g = Jw.T @ r
        # a non-finite Jw or r (inf or nan) makes N's diagonal or g non-finite
        if not (np.all(np.isfinite(np.diag(N))) and np.all(np.isfinite(g)) and math.isfinite(chi2)):
            break
        scale = np.sqrt(np.diag(N))
        scale[scale == 0] = 1.0
        Nn = N / np.outer(scale, scale)
        gn = g / scale
        if constraint is not None:
            C, g0 = constraint.linearised(vals, vary)
            Cn, lower = C / scale, constraint.bounds() - g0
        step_n = _hold_shl_on_floor(Nn, gn, vals, vary, lam_start, svd_tol)
        lam = lam_start
        accepted = False
        while lam <= 1e3:
            if step_n is None:
                step_n = _svd_solve(Nn + lam * eye, gn, svd_tol)
            if constraint is not None:
                step_n = _constrained_step(Nn + lam * eye, gn, Cn, lower, step_n)
            # linear-model decrease of χ² for this step: negligible -> converged, stop
            predicted = float(step_n @ (2 * gn - Nn @ step_n))
            if predicted < tol * chi2:
                converged = True
                break
            trial = dict(vals)
            for name, st in zip(vary, step_n / scale):
                trial[name] += st
            _onto_shl_floor(trial, vary)
            if _physical(trial, vary) and (constraint is None or constraint.feasible(trial)):
                chi2_new = model.chi2(trial, yobs, sqrt_w)
                if chi2_new < chi2:
                    accepted = True
                    break
            lam = 1e-3 if lam == 0 else lam * 10
            step_n = None
        if not accepted:
            break
        # Marquardt: the next cycle starts from a ten times smaller damping
        lam_start = lam / 10 if lam >= 1e-2 else 0.0
        vals = trial
        if lebail:
            model.lebail_extract(vals, yobs, sqrt_w)
            chi2_new = model.chi2(vals, yobs, sqrt_w)
        rel = (chi2 - chi2_new) / chi2 if chi2 > 0 else 0.0
        chi2 = chi2_new
        if rel < tol:
            converged = True
            break
    return _LMState(vals, chi2, cycles, converged)


def _hold_shl_on_floor(Nn: np.ndarray, gn: np.ndarray, values: Mapping[str, float],
                       vary: Sequence[str], lam: float, svd_tol: float) -> np.ndarray | None:
    """SH/L on its 0.002 floor with a step pointing below it: hold it for this cycle (its row
    and column of the normalised normal equations decoupled, in place), so the other
    parameters take the step they have with SH/L fixed. Projecting the full step onto the
    floor instead moves them as if SH/L had gone down: the step is refused and the LM stalls
    (a ZnO fit stopped 3 in χ² and 1.1 esd in a short of its minimum).

    Returns the step (damping ``lam``) it solved for when it left the equations unchanged
    (the caller's first step), else None."""
    if "SH/L" not in vary or values["SH/L"] > _profile.SHL_MIN:
        return None
    i = vary.index("SH/L")
    step = _svd_solve(Nn + lam * np.eye(len(vary)), gn, svd_tol)
    if step[i] >= 0:
        return step
    Nn[i, :] = 0.0
    Nn[:, i] = 0.0
    Nn[i, i] = 1.0
    gn[i] = 0.0
    return None


def _onto_shl_floor(values: dict[str, float], vary: Sequence[str]) -> None:
    """A refined SH/L below GSAS-II's 0.002 is set to 0.002: the same model and χ² (the profile
    uses max(SH/L, 0.002)), but with a derivative. Left below, SH/L has none and the LM cannot
    bring it back: a CeO₂ fit whose stage-4 step overshot below the floor stopped at χ² 942.32
    instead of 941.81, a 0.38 esd off."""
    if "SH/L" in vary and values["SH/L"] < _profile.SHL_MIN:
        values["SH/L"] = _profile.SHL_MIN


def _physical(values: Mapping[str, float], vary: Sequence[str]) -> bool:
    """SH/L ≥ 0 and every varied scale, phase fraction, size and MD ratio > 0.

    GSAS-II floors the scales at 1e-12 instead; a negative phase fraction lets a misplaced
    phase (cell still off in stage 1) cancel observed intensity and drags its cell into a
    wrong minimum (seen on CeO2 + Si: Si a off by 3e-3 relative).
    """
    if values["SH/L"] < 0:
        return False
    return all(values[n] > 0 for n in vary
               if n == "Scale" or n.endswith((":0:Scale", ":0:Size;i", ":0:MD")))


def _svd_solve(N: np.ndarray, g: np.ndarray, rtol: float) -> np.ndarray:
    u, s, vt = np.linalg.svd(N)
    keep = s > rtol * s[0] if s.size and s[0] > 0 else np.zeros_like(s, bool)
    inv = np.where(keep, 1.0 / np.where(keep, s, 1.0), 0.0)
    return vt.T @ (inv * (u.T @ g))


def _svd_pinv(N: np.ndarray, rtol: float = 1e-12) -> np.ndarray:
    u, s, vt = np.linalg.svd(N)
    keep = s > rtol * s[0] if s.size and s[0] > 0 else np.zeros_like(s, bool)
    inv = np.where(keep, 1.0 / np.where(keep, s, 1.0), 0.0)
    return (vt.T * inv) @ u.T


def _escape_scan(model: PatternModel, state: _LMState, vary: Sequence[str],
                 names: Sequence[str], yobs: np.ndarray, sqrt_w: np.ndarray, max_cycles: int,
                 lebail: bool, constraint: ProfileConstraint | None = None,
                 svd_tol: float = 1e-10) -> _LMState:
    """Step across the model's discontinuities in ``names`` (stage option ``scan``).

    GSAS-II's FCJ quadrature order jumps with SH/L (and γ), so χ²(SH/L) is piecewise smooth
    with steps of up to ~30 % of χ² at high energy; the LM can stop inside a piece whose
    neighbours hold a far lower minimum (GSAS-II stops there too). For each name, candidates at
    the current value × 0.8 … 1.25 (12 log-spaced factors) each get one Gauss–Newton step of
    the other parameters (normal matrix of the current point, residual of the candidate); if
    one ends ≥ 0.1 % below the current χ² (and satisfies ``constraint``) the LM restarts from
    it with the whole vary list. At most three rounds.
    """
    for _ in range(3):
        best, best_chi2 = None, state.chi2
        for name in names:
            if name not in vary:
                continue
            others = [n for n in vary if n != name]
            _, _, J, _ = model._evaluate(state.values, others, jac=True)
            Jw = J * sqrt_w[:, None]
            N = Jw.T @ Jw
            scale = np.sqrt(np.diag(N))
            scale[scale == 0] = 1.0
            # (n_others, n_points)
            solve = _svd_pinv(N / np.outer(scale, scale), svd_tol) @ (Jw / scale).T
            base = state.values[name]
            for f in _SCAN_FACTORS:
                trial = dict(state.values, **{name: base * float(f)})
                yc, _, _, _ = model._evaluate(trial)
                step = solve @ (sqrt_w * (yobs - yc)) / scale
                for other, st in zip(others, step):
                    trial[other] += st
                if not _physical(trial, vary):
                    continue
                if constraint is not None and not constraint.feasible(trial):
                    continue
                c = model.chi2(trial, yobs, sqrt_w)
                if c < best_chi2 * (1 - _SCAN_GAIN):
                    best, best_chi2 = trial, c
        if best is None:
            break
        st = levenberg_marquardt(model, best, vary, yobs, sqrt_w, max_cycles=max_cycles,
                                 lebail=lebail, constraint=constraint)
        state = _LMState(st.values, st.chi2, state.cycles + st.cycles, st.converged)
    return state


# ------------------------------------------------------------------------------ driver

#: |intensity| or σ beyond this are not counts (overflowed or uninitialised data).
_MAX_ABS_COUNTS = 1e15
#: The phases' peaks must lower χ² below a background-only fit by this many χ²/dof units
#: (≈ a 7σ detection; pure noise fitted with ~15 parameters stays below it with P > 0.9999).
_MIN_PEAK_SIGNIFICANCE = 49.0
#: A pattern needs one local maximum this many σ above its low envelope to be refined.
_PEAK_PROMINENCE_SIGMA = 5.0
#: |correlation| above which two refined parameters are reported (GSAS-II's setHcorr: 0.95).
_HIGH_CORRELATION = 0.95


def _prepare(tth_deg, intensity, sigma, limits):
    """Sorted, limited, finite points; PatternError only for a malformed call."""
    x = np.asarray(tth_deg, dtype=float).ravel()
    y = np.asarray(intensity, dtype=float).ravel()
    s = np.asarray(sigma, dtype=float).ravel()
    if not (x.size == y.size == s.size):
        raise PatternError(f"pattern arrays differ in length: 2θ {x.size}, intensity {y.size}, "
                           f"sigma {s.size}")
    if x.size == 0:
        raise PatternError("pattern is empty (0 points)")
    if x.size > 1 and not np.all(x[1:] >= x[:-1]):
        order = np.argsort(x, kind="stable")
        x, y, s = x[order], y[order], s[order]
    if limits is not None:
        lo, hi = float(limits[0]), float(limits[1])
        inside = (x >= lo) & (x <= hi)
        x, y, s = x[inside], y[inside], s[inside]
        if x.size == 0:
            raise PatternError(f"no points inside the limits {lo}..{hi} deg")
    finite_x = x[np.isfinite(x)]
    x_range = ((float(finite_x[0]), float(finite_x[-1])) if finite_x.size
               else (math.nan, math.nan))
    good = np.isfinite(x) & np.isfinite(y) & np.isfinite(s) & (s > 0)
    n_dropped = int((~good).sum())
    if n_dropped:
        x, y, s = x[good], y[good], s[good]
    return x, y, s, x_range, n_dropped


def _not_a_pattern(x: np.ndarray, y: np.ndarray, s: np.ndarray, n_dropped: int) -> str:
    """Why the points cannot be a diffraction pattern ('' if they may be one)."""
    if x.size < 10:
        return (f"not a diffraction pattern: {x.size} usable points (NaN or sigma <= 0 "
                f"dropped: {n_dropped}); need at least 10")
    big = max(float(np.max(np.abs(y))), float(np.max(s)))
    if big > _MAX_ABS_COUNTS:
        return (f"not a diffraction pattern: intensity or sigma up to {big:.3g} "
                f"(counts stay below {_MAX_ABS_COUNTS:.0e})")
    if float(y.max()) <= 0:
        return f"not a diffraction pattern: no positive intensity (largest {float(y.max()):.6g})"
    return ""


def _rwp(yobs, ycalc, w):
    return 100.0 * math.sqrt(float(np.sum(w * (yobs - ycalc) ** 2)) / float(np.sum(w * yobs ** 2)))


def _has_peaks(yobs: np.ndarray, sigma: np.ndarray, bkg: np.ndarray) -> bool:
    """Whether a local maximum of the 5-point running mean of (y − low envelope)/σ stands
    2·``_PEAK_PROMINENCE_SIGMA`` of its own noise (σ/√5) high: a peak of ≳ 5σ spread over five
    points; single-point noise excursions of a pattern without peaks stay below ~7."""
    smooth = np.convolve((yobs - bkg) / sigma, np.full(5, 1 / 5), mode="same") * math.sqrt(5)
    return _max_prominence(smooth) >= 2 * _PEAK_PROMINENCE_SIGMA


def _max_prominence(y: np.ndarray) -> float:
    """The largest topographic prominence of y's local maxima (``scipy.signal.peak_prominences``
    of ``find_peaks``' peaks), −inf without interior points; O(n) and without scipy.signal's
    import (~1 s, most of a single pattern's refinement).

    max over i of y_i − max(min_{a<i} y_a, min_{b>i} y_b) is that prominence: a highest point j
    of the interval between those two minima is a local maximum whose bases lie at or below them,
    and a peak's own bases are such a pair.
    """
    if y.size < 3:
        return -math.inf
    left = np.minimum.accumulate(y)[:-2]
    right = np.minimum.accumulate(y[::-1])[::-1][2:]
    return float(np.max(y[1:-1] - np.maximum(left, right)))


def _background_only_chi2(model: PatternModel, yobs, sqrt_w) -> float:
    """χ² of the best background-only fit (weighted linear least squares)."""
    design = model.bkg_basis * sqrt_w[:, None]
    coef, *_ = np.linalg.lstsq(design, yobs * sqrt_w, rcond=None)
    r = yobs * sqrt_w - design @ coef
    return float(r @ r)


def _linear_scale_background(model: PatternModel, values: dict[str, float], yobs,
                             sqrt_w) -> None:
    """Exact weighted linear least squares for the background and the histogram scale."""
    nb = model.bkg_terms
    vals = dict(values)
    for i in range(nb):
        vals[f"Back;{i}"] = 0.0
    peaks, _, _ = model.evaluate(vals)
    design = np.column_stack([model.bkg_basis, peaks / values["Scale"]]) * sqrt_w[:, None]
    if not np.all(np.isfinite(design)):
        return
    N = design.T @ design
    scale = np.sqrt(np.diag(N))
    scale[scale == 0] = 1.0
    sol = _svd_solve(N / np.outer(scale, scale), design.T @ (yobs * sqrt_w) / scale,
                     1e-12) / scale
    for i in range(nb):
        values[f"Back;{i}"] = float(sol[i])
    if sol[nb] > 0:
        values["Scale"] = float(sol[nb])


def _failed(message: str, x, y, n_dropped: int, warn: list[str]) -> PatternResult:
    nan = math.nan
    return PatternResult(status="failed", message=message, rwp=nan, rp=nan, chi2=nan, gof=nan,
                         n_points=int(x.size), n_dropped=int(n_dropped), tth_deg=x, obs=y,
                         warnings=warn)


@one_blas_thread()
def refine_pattern(tth_deg: np.ndarray, intensity: np.ndarray, sigma: np.ndarray,
                   phases: Sequence[Phase], instprm: Instrument | Mapping[str, Any] | str, *,
                   bkg_terms: int = 6, limits: tuple[float, float] | None = None,
                   refine_atoms: bool = False, mode: str = "rietveld",
                   start: Mapping[str, float] | None = None, sample_azimuth_deg: float = 0.0,
                   stages: Sequence[Stage] | None = None, estimate: bool = True,
                   physical_profile: bool = False, texture: str | None = None,
                   po_axis: Sequence[int] = (0, 0, 1), sh_order: int = 4,
                   precision: str = "float64",
                   noise_correlation: Sequence[float] | None = None) -> PatternResult:
    """Staged Rietveld or Le Bail refinement of one pattern.

    Parameters
    ----------
    tth_deg, intensity, sigma : ndarray (n,)
        2θ (deg), counts and their standard deviations (w = 1/σ²). NaN points and σ ≤ 0 are
        dropped (counted in ``n_dropped``).
    phases : sequence of Phase
    instprm : Instrument, mapping of GSAS-II keys or .instprm path
        Instrument terms (:func:`midasflow.instrument.as_instrument`): ``Lam`` or the Kα
        doublet ``Lam1, Lam2, I(L2)/I(L1)``, ``Polariz.``, ``Gonio. radius`` and the starting
        ``Zero, U..Z, SH/L`` (U..Y only a fallback when ``estimate``).
    bkg_terms : int
        Chebyshev-1 background terms over the refined limits.
    limits : (lo, hi), optional
        2θ range to refine, degrees (default: all data).
    refine_atoms : bool
        Add a final stage refining atom coordinates and U_iso (Rietveld only).
    mode : {'rietveld', 'lebail'}
    start : dict, optional
        GSAS-II-named starting values; they override the instrument and the estimate. A
        :class:`PatternResult`'s ``values`` (e.g. of the ω-group's η-averaged pattern) seed
        profile, scales, background and cell completely (the estimate is then skipped).
    sample_azimuth_deg : float
        Sample azimuth used by the polarization factor.
    stages : sequence of Stage, optional
        Replaces :func:`~midasflow.refinement.recipe.default_stages`.
    estimate : bool
        Start profile, scale and background from the data
        (:func:`midasflow.refinement.start.estimate_start`) unless ``start`` gives U, V, W, X, Y.
    physical_profile : bool
        Keep σ² ≥ 0.001 centideg² and γ ≥ 0 over the fitted range (:class:`ProfileConstraint`);
        by default the widths may go negative and are floored as in GSAS-II (then flagged
        ``unphysical_profile``).
    texture : {None, 'md', 'sh'}
        Add the preferred-orientation stage after the others
        (:func:`midasflow.refinement.texture_stage.run_texture_stage`): March–Dollase along
        ``po_axis`` ([h, k, l]) or GSAS-II's spherical harmonics (cylindrical sample symmetry)
        up to order ``sh_order``.
    precision : {'float64', 'float32'}
        Arithmetic of the profile (:class:`PatternModel`). 'float64' (default) evaluates the
        model in double precision. 'float32' is GSAS-II's REAL*4 PSVFCJO, for parity checks: it
        rounds √(1 + SH/L²)·cos 2θ and the peak position in the FCJ lower limit, so at small SH/L
        and low angles χ² is a staircase in SH/L and ripples in 2θ, the minimiser stops on
        whichever step it meets and the cell depends on the start values (a CeO₂ lineout at
        0.17 Å, SH/L at its 0.002 floor: `a` moved by up to 1 esd between seven starts, χ²
        941.7–943.0; in float64 every start reaches χ² 941.4 with `a` within 0.01 esd).
    noise_correlation : sequence of float, optional
        Correlation of the noise of neighbouring points, in units of σ_i·σ_j: (c₀, c₁, …) for
        points 0, 1, … apart (c₀ ≤ 1 is the independent fraction of each point's variance).
        Pixel-split cakes share detector pixels between neighbouring bins
        (:func:`midasflow.refinement.lineouts.noise_correlation`). The covariance is then the
        least-squares estimate's own, (JᵀWJ)⁻¹·JᵀWCWJ·(JᵀWJ)⁻¹ with C the points' noise
        covariance, scaled by χ² over its expectation tr((I − H)·C/σσᵀ) for a right model
        (GSAS-II's GOF² when the points are independent). None: independent points
        (GSAS-II's covariance).

    Returns
    -------
    PatternResult
        ``status`` 'failed' (with a one-line ``message``) for data that is not a diffraction
        pattern: too few finite points, magnitudes beyond 1e15, no positive intensity, or no
        peaks of the phases above the noise. ``flags`` lists quality flags
        (:data:`midasflow.refinement.result.FLAGS`).

    Raises
    ------
    PatternError
        Empty or mismatched input, no points inside ``limits``.
    InstprmError
        Unusable instrument terms (unknown key, no wavelength, bad file).
    """
    if mode not in ("rietveld", "lebail"):
        raise PatternError(f"mode must be 'rietveld' or 'lebail', got {mode!r}")
    if precision not in ("float32", "float64"):
        raise PatternError(f"precision must be 'float32' or 'float64', got {precision!r}")
    if not phases:
        raise PatternError("no phases given")
    x, y, s, x_range, n_dropped = _prepare(tth_deg, intensity, sigma, limits)
    warn: list[str] = []
    info: list[str] = []
    if n_dropped:
        warn.append(f"{n_dropped} points dropped (NaN intensity or sigma <= 0)")
    problem = _not_a_pattern(x, y, s, n_dropped)
    if problem:
        return _failed(problem, x, y, n_dropped, warn)
    w = 1.0 / s ** 2
    sqrt_w = 1.0 / s
    model = PatternModel(x, x_range, phases, instprm, bkg_terms, sample_azimuth_deg, mode,
                         precision=precision, texture=texture, po_axis=po_axis,
                         sh_order=sh_order)
    chi2_background = _background_only_chi2(model, y, sqrt_w)
    if chi2_background <= 1e-20 * float(np.sum(w * y * y)):
        return _failed("not a diffraction pattern: a smooth background fits it exactly",
                       x, y, n_dropped, warn)
    envelope = low_envelope(model.bkg_basis, y, s)
    if not _has_peaks(y, s, envelope[1]):
        return _failed(f"no peaks above the noise: nothing stands {_PEAK_PROMINENCE_SIGMA:g} "
                       "sigma above a smooth background", x, y, n_dropped, warn)
    values = dict(model.values)
    seeded = {k: float(v) for k, v in (start or {}).items()
              if k in values and v is not None and math.isfinite(float(v))}
    if estimate and not all(k in seeded for k in ("U", "V", "W", "X", "Y")):
        est, est_notes, est_warn = estimate_from_model(model, y, s, envelope)
        values.update(est)
        info.extend(est_notes)
        warn.extend(est_warn)
    values.update(seeded)
    if seeded:
        info.append(f"start values given for {len(seeded)} parameters")
    lebail = mode == "lebail"
    if stages is None:
        atom_names = ([n for pd in model.phases for n in model.atom_names(pd.index)]
                      if refine_atoms and not lebail else [])
        stages = default_stages(len(phases), bkg_terms, model.cell_names(), atom_names,
                                mode=mode, refine_atoms=refine_atoms)
    # the stages keep the widths physical: a width far below GSAS-II's floor has a zero
    # derivative and traps the fit; without physical_profile a final unconstrained pass lets
    # them go where GSAS-II's model has a lower minimum
    constraint: ProfileConstraint | None = ProfileConstraint(model, x_range)
    if not constraint.feasible(values):
        refined = {n for st in stages for n in st.add}
        if physical_profile or {"W", "X"} <= refined:
            info.extend(constraint.make_feasible(values))
        else:               # unphysical start widths that no stage refines: leave them
            constraint = None
    with np.errstate(all="ignore"):
        if lebail:
            _lebail_start(model, values, y, sqrt_w)
        else:
            _linear_scale_background(model, values, y, sqrt_w)
    start_values = dict(values)
    vary: list[str] = []
    stage_rwp: dict[str, float] = {}
    flags: list[str] = []
    converged = True
    with np.errstate(all="ignore"):
        yc, _, _ = model.evaluate(values)
        rwp_prev = _rwp(y, yc, w) if np.all(np.isfinite(yc)) else math.inf
    for stage in stages:
        trial_vary = vary + [n for n in stage.add if n in values and n not in vary]
        saved_lebail = [pd.fsq_lebail.copy() for pd in model.phases]
        with np.errstate(all="ignore"), _warnings.catch_warnings():
            _warnings.simplefilter("ignore", RuntimeWarning)
            try:
                # Le Bail alternates LSQ cycles with intensity extraction: allow more cycles
                cycles = stage.max_cycles * (3 if lebail else 1)
                st = levenberg_marquardt(model, values, trial_vary, y, sqrt_w,
                                         max_cycles=cycles, lebail=lebail,
                                         constraint=constraint)
                if stage.scan:
                    st = _escape_scan(model, st, trial_vary, stage.scan, y, sqrt_w, cycles,
                                      lebail, constraint)
                yc, _, _ = model.evaluate(st.values)
                rwp_new = _rwp(y, yc, w)
                error = ""
            except (FloatingPointError, np.linalg.LinAlgError, ValueError) as exc:
                rwp_new, error = math.nan, str(exc)
        reason = ""
        if error or not math.isfinite(rwp_new):
            reason = f"diverged ({error or 'non-finite R'})"
        elif rwp_new > rwp_prev * (1 + 1e-9):
            reason = f"made Rwp worse ({rwp_new:.4g} % > {rwp_prev:.4g} %)"
        if reason:
            _roll_back(model, stage.name, reason, saved_lebail, warn, flags)
            stage_rwp[stage.name] = rwp_prev
            continue
        values, vary, rwp_prev = st.values, trial_vary, rwp_new
        stage_rwp[stage.name] = rwp_new
        converged = st.converged
    if texture is not None:
        from midasflow.refinement.texture_stage import run_texture_stage
        values, vary, rwp_prev = run_texture_stage(
            model, values, vary, y, w, sqrt_w, lebail=lebail, constraint=constraint,
            rwp_prev=rwp_prev, stage_rwp=stage_rwp, warn=warn, flags=flags, info=info)
    if not physical_profile and vary and stage_rwp and constraint is not None \
            and constraint.active(values):
        # the bound holds a width: without it GSAS-II's model may go lower (an inactive
        # bound changes nothing, the minimum is the same)
        values, rwp_prev = _release(model, values, vary, y, w, sqrt_w, stages[-1], lebail,
                                    rwp_prev)
        stage_rwp[stages[-1].name] = rwp_prev
    if "SH/L" in vary and values["SH/L"] <= _profile.SHL_MIN:
        # below GSAS-II's 0.002 the model uses 0.002; the floor clamps the model, it is no
        # bound of the estimate: SH/L stays in the covariance with its derivative just above
        # the floor (docs/reference/gsas2_profile.md section 6, esds)
        values["SH/L"] = _profile.SHL_MIN  # flagged shl_at_floor by _finish
    result = _finish(model, values, vary, x, y, w, sqrt_w, n_dropped, stage_rwp, warn, flags,
                     start_values, constraint if physical_profile else None, chi2_background,
                     noise_correlation)
    result.notes = info + result.notes
    result.converged = converged
    return result


def _roll_back(model: PatternModel, stage_name: str, reason: str, saved_lebail: list[np.ndarray],
               warn: list[str], flags: list[str], flag: str = "rolled_back") -> None:
    """Record a stage undone (warning and ``flag``: ``rolled_back``, or ``texture_rolled_back``
    for the optional texture stage) and restore its Le Bail intensities."""
    warn.append(f"{flag}: stage {stage_name!r} {reason}; kept the previous stage")
    if flag not in flags:
        flags.append(flag)
    for pd, fsq in zip(model.phases, saved_lebail):
        pd.fsq_lebail = fsq


def _release(model: PatternModel, values, vary, y, w, sqrt_w, stage: Stage, lebail: bool,
             rwp_prev: float) -> tuple[dict[str, float], float]:
    """Final LM pass over the whole vary list without the width constraint (GSAS-II's model:
    widths floored at 0.001, not bounded); kept only if it lowers Rwp."""
    saved_lebail = [pd.fsq_lebail.copy() for pd in model.phases]
    with np.errstate(all="ignore"), _warnings.catch_warnings():
        _warnings.simplefilter("ignore", RuntimeWarning)
        try:
            st = levenberg_marquardt(model, values, vary, y, sqrt_w,
                                     max_cycles=stage.max_cycles * (3 if lebail else 1),
                                     lebail=lebail)
            yc, _, _ = model.evaluate(st.values)
            rwp_new = _rwp(y, yc, w)
        except (FloatingPointError, np.linalg.LinAlgError, ValueError):
            rwp_new = math.nan
    if math.isfinite(rwp_new) and rwp_new <= rwp_prev:
        return st.values, rwp_new
    for pd, fsq in zip(model.phases, saved_lebail):
        pd.fsq_lebail = fsq
    return values, rwp_prev


def _lebail_start(model: PatternModel, values: dict[str, float], yobs, sqrt_w) -> None:
    """Start Le Bail intensities: uniform |F|², linear scale + background, then partitions.

    The histogram scale is folded into the intensities and held at 1 (it is fully correlated
    with them); each round extracts to the partition's fixed point and re-solves the
    background linearly.
    """
    for pd in model.phases:
        pd.fsq_lebail = np.ones(len(pd.mult))
    for _ in range(3):
        _linear_scale_background(model, values, yobs, sqrt_w)
        for pd in model.phases:
            pd.fsq_lebail = pd.fsq_lebail * values["Scale"]
        values["Scale"] = 1.0
        model.lebail_extract(values, yobs, sqrt_w)
    _linear_scale_background(model, values, yobs, sqrt_w)
    for pd in model.phases:
        pd.fsq_lebail = pd.fsq_lebail * values["Scale"]
    values["Scale"] = 1.0


def _sub_covariance(cov: np.ndarray, idx: Mapping[str, int],
                    names: Sequence[str]) -> np.ndarray:
    """Covariance block of ``names`` (rows/columns of unrefined names are 0)."""
    sub = [idx.get(n) for n in names]
    out = np.zeros((len(names), len(names)))
    for a, ia in enumerate(sub):
        for b, ib in enumerate(sub):
            if ia is not None and ib is not None:
                out[a, b] = cov[ia, ib]
    return out


def _normal_inverse(Jw: np.ndarray) -> np.ndarray:
    """(JᵀWJ)⁻¹ by the SVD pseudo-inverse of the diagonally normalised normal matrix."""
    N = Jw.T @ Jw
    scale = np.sqrt(np.diag(N))
    scale[scale == 0] = 1.0
    return _svd_pinv(N / np.outer(scale, scale)) / np.outer(scale, scale)


def _cell_weights(model: PatternModel, values: Mapping[str, float], vary: Sequence[str],
                  Jw: np.ndarray, sqrt_w: np.ndarray, normal_inv: np.ndarray,
                  parts: tuple) -> dict[int, np.ndarray]:
    """Weight of every reflection on the refined cubic cell: ∂ln a/∂ε_k, the change of the
    refined ln a when reflection k alone moves as a strain ε_k would move it (2θ_k by
    −2 tan θ_k·ε_k), through the least-squares estimator (JᵀWJ)⁻¹JᵀW of all refined parameters.

    Uniform strain moves the cell, so the weights sum to ~1; reflections whose shift the
    correlated parameters (SH/L, zero, widths) absorb weigh less, and some may weigh < 0
    (a low-angle peak moved alone reads partly as asymmetry). Phases with one free A-term
    (cubic) only: ``{phase index: (n_reflections,)}``. ``normal_inv`` is
    :func:`_normal_inverse` of ``Jw``; ``parts`` what :meth:`PatternModel._evaluate` made ``Jw``
    of (its peak sum with derivatives).
    """
    out: dict[int, np.ndarray] = {}
    cubic = {pd.index for pd in model.phases if len(pd.free) == 1 and f"{pd.index}::A{pd.free[0]}" in vary}
    _, terms, peaks = parts
    if not cubic or peaks is None:
        return out
    point = peaks.entry_points()
    peak_of = np.repeat(np.arange(peaks.lo.size), peaks.hi - peaks.lo)
    start = 0
    for pd, t in zip(model.phases, terms):
        n_refl = len(t["tth"])
        if pd.index in cubic:
            name = f"{pd.index}::A{pd.free[0]}"
            gain = normal_inv[vary.index(name)] @ Jw.T  # (n_obs,): change of A per unit of r_w
            mine = slice(peaks.offsets[start], peaks.offsets[start + n_refl])  # its entries
            d_a = np.bincount(peak_of[mine] - start, minlength=n_refl,
                              weights=gain[point[mine]] * peaks.d_pos[mine] * sqrt_w[point[mine]])
            shift_deg = -2.0 * np.tan(np.radians(t["tth"]) / 2.0) * (180.0 / math.pi)
            out[pd.index] = -0.5 * (d_a * shift_deg) / values[name]
        start += n_refl
    return out


def _covariance(Jw: np.ndarray, n_inv: np.ndarray, chi2: float,
                noise_correlation: Sequence[float] | None) -> tuple[np.ndarray, float]:
    """Covariance of the least-squares estimate and the χ² a right model has on average.

    ``Jw``: the Jacobian with rows times 1/σ; ``n_inv``: (JᵀWJ)⁻¹. Independent points (``noise_correlation`` None):
    GSAS-II's (JᵀWJ)⁻¹·χ²/(N − n). Correlated points (lag correlations c_k in units of σσ):
    the sandwich (JᵀWJ)⁻¹·JᵀWCWJ·(JᵀWJ)⁻¹ scaled by χ² over E[χ²] = tr((I − H)·R), R the
    points' correlation matrix and H the hat matrix.
    """
    n_obs, n_var = Jw.shape
    if not noise_correlation:
        expected = float(max(n_obs - n_var, 1))
        return n_inv * (chi2 / expected), expected
    c = np.asarray(noise_correlation, dtype=float)
    rj = c[0] * Jw
    lagged = np.empty_like(Jw)
    for k in range(1, min(c.size, n_obs)):
        rj[k:] += np.multiply(c[k], Jw[:-k], out=lagged[k:])
        rj[:-k] += np.multiply(c[k], Jw[k:], out=lagged[:-k])
    middle = Jw.T @ rj
    expected = max(float(c[0] * n_obs - np.sum(n_inv * middle)), 1.0)  # tr(R) − tr((JᵀWJ)⁻¹M)
    return n_inv @ middle @ n_inv * (chi2 / expected), expected


def _finish(model: PatternModel, values, vary, x, y, w, sqrt_w, n_dropped, stage_rwp, warn,
            flags, start_values, constraint, chi2_background,
            noise_correlation: Sequence[float] | None = None) -> PatternResult:
    yc, bkg, J, parts = model._evaluate(values, vary, jac=True)
    terms = parts[1]
    chi2 = float(np.sum(w * (y - yc) ** 2))
    n_obs, n_var = y.size, len(vary)
    dof = max(n_obs - n_var, 1)
    gof = math.sqrt(chi2 / dof)
    Jw = J * sqrt_w[:, None]
    normal_inv = _normal_inverse(Jw)
    cov, chi2_expected = _covariance(Jw, normal_inv, chi2, noise_correlation)
    cell_weights = (_cell_weights(model, values, vary, Jw, sqrt_w, normal_inv, parts)
                    if math.isfinite(chi2) else {})
    esd_vec = np.sqrt(np.maximum(np.diag(cov), 0.0)) if n_var else np.zeros(0)
    esds = {name: float(e) for name, e in zip(vary, esd_vec)}
    idx = {name: i for i, name in enumerate(vary)}
    cells, cell_err, fractions, refl_tables, phases_out = {}, {}, {}, {}, []
    masses = []
    for pd in model.phases:
        p, ph = pd.index, pd.phase
        A = model.A_terms(p, values)
        cell = A_to_cell(A)
        cells[ph.name] = tuple(cell) + (cell_volume(cell),)
        cov_p = _sub_covariance(cov, idx, [f"{p}::A{i}" for i in pd.free])
        cell_err[ph.name] = tuple(float(e) for e in cell_esds(A, cov_p, ph.laue, ph.unique_axis))
        phases_out.append(model.refined_phase(p, values))
        if len(model.phases) > 1:       # one phase: its weight fraction is 1 ± 0 whatever its mass
            masses.append(phases_out[-1].cell_mass)
        rt = terms[p]                   # the final evaluation's (the same values)
        refl_tables[ph.name] = dict(h=pd.hkl[:, 0].copy(), k=pd.hkl[:, 1].copy(),
                                    l=pd.hkl[:, 2].copy(), mult=pd.mult.astype(int),
                                    d_a=1 / np.sqrt(pd.tables.H6 @ A), tth_deg=rt["tth"],
                                    sig2=rt["sig2"], gam=rt["gam"], fsq=rt["fsq"],
                                    intensity=rt["intensity"])
        if p in cell_weights:
            refl_tables[ph.name]["cell_weight"] = cell_weights[p]
    for name, (i_obs, i_esd) in extract_intensities(model, values, y, sqrt_w,
                                                    math.sqrt(chi2 / chi2_expected), parts).items():
        refl_tables[name].update(i_obs=i_obs, i_obs_esd=i_esd)
    # weight fractions W_p ∝ S_p · cell mass_p (GSAS-II)
    sc = np.array([values[f"{pd.index}:0:Scale"] for pd in model.phases])
    m = np.array(masses) if masses and all(mm > 0 for mm in masses) else np.ones(len(sc))
    wt = sc * m
    frac = wt / wt.sum()
    jf = (np.diag(m) * wt.sum() - np.outer(wt, m)) / wt.sum() ** 2     # ∂frac_i/∂S_j
    cov_s = _sub_covariance(cov, idx, [f"{pd.index}:0:Scale" for pd in model.phases])
    frac_esd = np.sqrt(np.maximum(np.diag(jf @ cov_s @ jf.T), 0.0))
    for i, pd in enumerate(model.phases):
        fractions[pd.phase.name] = (float(frac[i]), float(frac_esd[i]))
    flags = list(flags)
    cov_flags, cov_notes = _covariance_flags(cov, vary, esd_vec)
    for flag, message in (_profile_flags(model, values, x, constraint)
                          + _bound_flags(values, vary, start_values, esds) + cov_flags
                          + _floor_flags(values, vary, cov)):
        if flag not in flags:
            flags.append(flag)
        warn.append(f"{flag}: {message}")
    status, message = "ok", ""
    if not math.isfinite(chi2):
        status, message = "failed", "refinement produced a non-finite chi2"
    elif chi2_background - chi2 < _MIN_PEAK_SIGNIFICANCE * chi2 / dof:
        status = "failed"
        message = (f"no peaks above the noise: the phases lower chi2 below a background-only "
                   f"fit by {(chi2_background - chi2) / (chi2 / dof):.3g} chi2/dof "
                   f"(need {_MIN_PEAK_SIGNIFICANCE:g})")
    return PatternResult(
        status=status, message=message,
        rwp=_rwp(y, yc, w), rp=100.0 * float(np.sum(np.abs(y - yc)) / np.sum(np.abs(y))),
        chi2=chi2, gof=gof, n_points=int(n_obs), n_dropped=int(n_dropped),
        stage_rwp=stage_rwp, values={k: float(v) for k, v in values.items()}, esds=esds,
        cells=cells, cell_esds=cell_err, phase_fractions=fractions, tth_deg=x, obs=y, calc=yc,
        bkg=bkg, weight=w, covariance=cov, reflections=refl_tables, warnings=warn, phases=phases_out, flags=tuple(flags),
        notes=cov_notes, noise_correlation=tuple(float(c) for c in noise_correlation or ()))


def _floor_flags(values: Mapping[str, float], vary: Sequence[str],
                 cov: np.ndarray) -> list[tuple[str, str]]:
    """``shl_at_floor``: a refined SH/L ended on GSAS-II's floor (the model's smallest
    asymmetry). Where the true asymmetry is there or below, the fit could not follow the noise
    below it and the cell errs to the side its correlation with SH/L gives, by ~0.4·ρ esd
    (docs/reference/gsas2_profile.md section 6)."""
    if "SH/L" not in vary or values["SH/L"] > _profile.SHL_MIN:
        return []
    i = list(vary).index("SH/L")
    sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
    rho = {name: float(cov[i, j] / (sd[i] * sd[j])) for j, name in enumerate(vary)
           if "::A" in name and sd[i] > 0 and sd[j] > 0}
    worst = max(rho, key=lambda n: abs(rho[n]), default=None)
    corr = (f"; correlation with {worst} {rho[worst]:+.2f}: if the true asymmetry is at or "
            f"below the floor, {worst} is biased by about 0.4 × that in its esds") if worst else ""
    return [("shl_at_floor", f"SH/L ended on its floor {_profile.SHL_MIN} (held there; its esd "
                             f"and correlations are those just above it){corr}")]


def _ranges(tth: np.ndarray, bad: np.ndarray) -> str:
    """'16.0–17.3°' spans of the grid points flagged in ``bad``."""
    spans, start = [], None
    for i, b in enumerate(np.append(bad, False)):
        if b and start is None:
            start = i
        elif not b and start is not None:
            spans.append(f"{tth[start]:.4g}–{tth[i - 1]:.4g}°")
            start = None
    return ", ".join(spans)


def _profile_flags(model: PatternModel, values, x, constraint) -> list[tuple[str, str]]:
    """``unphysical_profile`` from the unfloored σ², γ over the fitted range; ``at_bound`` when
    the physical-profile constraint holds them at their bounds."""
    tth = np.linspace(float(x[0]), float(x[-1]), _WIDTH_GRID)
    sig2, gam = model.raw_widths(values, tth)
    out = []
    for pd in model.phases:
        name = pd.phase.name
        s2, g = sig2[pd.index], gam[pd.index]
        parts = []
        if np.any(s2 <= 0):
            parts.append(f"Gaussian σ² ≤ 0 at 2θ {_ranges(tth, s2 <= 0)} (min {s2.min():.3g} "
                         "centideg²)")
        if np.any(g < 0):
            parts.append(f"Lorentzian γ < 0 at 2θ {_ranges(tth, g < 0)} (min {g.min():.3g} "
                         "centideg)")
        if parts:
            out.append(("unphysical_profile", f"{name}: " + "; ".join(parts)
                        + " (GSAS-II floors them at 0.001)"))
        if constraint is not None:
            held = []
            if s2.min() <= constraint.SIG2_MIN * (1 + 1e-3):
                held.append(f"σ² at {constraint.SIG2_MIN:g} centideg²")
            if g.min() <= constraint.GAM_MIN * (1 + 1e-3):
                held.append(f"γ at {constraint.GAM_MIN:g} centideg")
            if held:
                out.append(("at_bound", f"{name}: physical-profile constraint active ("
                            + ", ".join(held) + ")"))
    return out


def _bound_flags(values, vary, start_values, esds) -> list[tuple[str, str]]:
    """``at_bound``: a positive-only parameter (scale, phase fraction, size, MD) driven to ~0:
    closer to 0 than a tenth of its esd, or below 1e-6 of its start value."""
    out = []
    for name in vary:
        if name == "Scale" or name.endswith((":0:Scale", ":0:Size;i", ":0:MD")):
            v, e = values[name], esds.get(name, 0.0)
            if v < 0.1 * e or v <= 1e-6 * abs(start_values.get(name, 1.0)):
                out.append(("at_bound", f"{name} = {v:.3g} (esd {e:.2g}) ran into its bound 0"))
    return out


def _family(name: str) -> str:
    """Parameters of one width or background polynomial share a family (their mutual
    correlation is a property of the parametrisation over the fitted range, not of the fit)."""
    if name in ("U", "V", "W"):
        return "gauss"
    if name in ("X", "Y", "Z"):
        return "lorentz"
    if name.startswith("Back;"):
        return "background"
    return name


def _covariance_flags(cov: np.ndarray, vary, esd: np.ndarray
                      ) -> tuple[list[tuple[str, str]], list[str]]:
    """``bad_esd`` (non-finite or zero esd) and ``high_correlation`` (|r| > 0.95) pairs; pairs
    inside one family (U/V/W, X/Y/Z, background terms) are returned as notes instead."""
    out, notes = [], []
    bad = [n for n, e in zip(vary, esd) if not (math.isfinite(e) and e > 0)]
    if bad:
        out.append(("bad_esd", "non-finite or zero esd of " + ", ".join(bad)))
    if len(vary) > 1 and not bad:
        corr = cov / np.outer(esd, esd)
        i, j = np.nonzero(np.triu(np.abs(corr) > _HIGH_CORRELATION, 1))
        order = np.argsort(-np.abs(corr[i, j]))
        pairs = [(vary[i[k]], vary[j[k]], corr[i[k], j[k]]) for k in order]
        across = [f"{a}–{b} {c:+.3f}" for a, b, c in pairs if _family(a) != _family(b)]
        within = [f"{a}–{b} {c:+.3f}" for a, b, c in pairs if _family(a) == _family(b)]
        if across:
            out.append(("high_correlation", "|correlation| > 0.95: " + ", ".join(across)))
        if within:
            notes.append("|correlation| > 0.95 within one width/background polynomial "
                         "(not flagged): " + ", ".join(within))
    return out, notes
