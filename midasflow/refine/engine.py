"""Native GSAS-II-style Rietveld / Le Bail refinement of one constant-wavelength pattern.

Model (``shared/reference/gsas2_cw_profile.md`` §1–§6)::

    y_calc(x) = Σ_n Back;n·T_n(t) + Σ_phases Σ_h I_h·Ω_h(x)
    I_h = Scale · p:0:Scale · M_h · P_pol(2θ_h) · PO_h · (1/V) · L(θ_h) · |F_h|²

with Ω_h the FCJ ⊗ TCH pseudo-Voigt of :mod:`midasflow.profile` (per centidegree). Weighted least
squares (w = 1/σ²) by Levenberg–Marquardt on the diagonally normalised normal matrix with an SVD
pseudo-inverse; the Jacobian is analytic (profile derivatives × chain rule through A-terms → 2θ,
U..Z/size/mustrain → σ²/γ, Lorentz–polarization, 1/V and |F|²(d)), except the atom coordinates,
whose |F|² derivatives are central finite differences.

Parameter names are GSAS-II's: ``Zero, U, V, W, X, Y, Z, SH/L, Scale, Back;n`` (histogram),
``p::A<i>`` (independent A-terms of phase p), ``p:0:Scale`` (phase fraction), ``p:0:Size;i`` (µm),
``p:0:Mustrain;i`` (10⁻⁶), ``p:0:MD`` (March–Dollase ratio, axis [001]), ``p::Ax:j``, ``p::Ay:j``,
``p::Az:j``, ``p::AUiso:j``.
"""

from __future__ import annotations

import math
import warnings as _warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import sparse

from midasflow import profile as _profile
from midasflow.crystal import (A_derivative_H, A_to_cell, Atom, Phase, StructureFactorTable,
                               cell_esds, cell_to_A, cell_volume, free_coordinates, laue_rotations,
                               laue_tie_matrix, reflections)
from midasflow.errors import PatternError
from midasflow.refine.recipe import Stage, default_stages
from midasflow.refine.result import PatternResult

__all__ = ["PatternModel", "refine_pattern", "levenberg_marquardt"]

_DEG = 180.0 / math.pi
_SIG2_FLOOR = _profile.SIG2_FLOOR_CDEG2
_GAM_FLOOR = _profile.GAM_FLOOR_CDEG
_INSTRUMENT_KEYS = ("Zero", "U", "V", "W", "X", "Y", "Z", "SH/L")


def _inst_value(instprm: Any, key: str, default: float | None = None) -> float:
    """Read a GSAS-II instrument key from a Mapping or an :class:`Instrument`-like object."""
    for getter in (lambda: instprm[key], lambda: instprm.get(key),
                   lambda: getattr(instprm, key.replace("/", "_").replace(".", "").replace(" ", "_")
                                   .lower())):
        try:
            val = getter()
        except (KeyError, TypeError, AttributeError, IndexError):
            continue
        if val is not None:
            return float(val[0] if isinstance(val, (list, tuple)) else val)
    if default is None:
        raise PatternError(f"instrument parameters: key {key!r} missing")
    return default


@dataclass
class _PhaseData:
    """Fixed per-phase tables (reflection set, tie matrix, |F|² table, PO geometry)."""

    index: int
    phase: Phase
    hkl: np.ndarray          # (n, 3)
    HT: np.ndarray           # (n, k) = H6 @ T : ∂(1/d²)/∂p
    H6: np.ndarray           # (n, 6)
    T: np.ndarray            # (6, k)
    free: list[int]
    mult: np.ndarray         # (n,)
    sf: StructureFactorTable
    orbits: np.ndarray       # (n, N, 3) hkl × Laue rotations (March–Dollase equivalents)
    G0: np.ndarray           # (3, 3) reciprocal metric of the starting cell (PO geometry)
    fsq_lebail: np.ndarray   # (n,) extracted intensities (Le Bail)
    sf_key: tuple = ()       # atom coordinates the |F|² table was built for


def _metric(A: np.ndarray) -> np.ndarray:
    return np.array([[A[0], A[3] / 2, A[4] / 2], [A[3] / 2, A[1], A[5] / 2],
                     [A[4] / 2, A[5] / 2, A[2]]])


class PatternModel:
    """y_calc and its Jacobian for one pattern and a set of phases.

    Parameters
    ----------
    x_deg : ndarray (n,)
        2θ of the points, degrees, increasing.
    x_range : tuple of float
        (x₀, x_N) mapped onto t = −1..1 for the Chebyshev background.
    phases : sequence of Phase
    instprm : Mapping or Instrument
        Needs ``Lam``; ``Polariz.`` (default 0.99), ``Zero, U..Z, SH/L`` are starting values.
    bkg_terms : int
    sample_azimuth_deg : float
        Sample azimuth φ of the polarization correction (§3.2).
    mode : {'rietveld', 'lebail'}
    precision : {'float32', 'float64'}
        Profile arithmetic (float32 = GSAS-II's REAL*4, see :mod:`midasflow.profile`).

    Notes
    -----
    The March–Dollase angles use the metric of the starting cell (axis [001]); their tiny
    dependence on the refined cell is neglected in model and Jacobian alike.
    """

    def __init__(self, x_deg: np.ndarray, x_range: tuple[float, float], phases: Sequence[Phase],
                 instprm: Any, bkg_terms: int = 6, sample_azimuth_deg: float = 0.0,
                 mode: str = "rietveld", precision: str = "float32"):
        self.x = np.asarray(x_deg, dtype=float)
        self.mode = mode
        self.precision = precision
        self.lam = _inst_value(instprm, "Lam")
        self.polariz = _inst_value(instprm, "Polariz.", 0.99)
        self.azimuth = float(sample_azimuth_deg)
        x0, xn = x_range
        self.bkg_basis = _profile.chebyshev_design_matrix(self.x, bkg_terms, x0,
                                                          xn if xn > x0 else x0 + 1.0)
        self.bkg_terms = bkg_terms
        self.values: dict[str, float] = {k: _inst_value(instprm, k, 0.0) for k in _INSTRUMENT_KEYS}
        self.values["Scale"] = 1.0
        for i in range(bkg_terms):
            self.values[f"Back;{i}"] = 0.0
        self.phases: list[_PhaseData] = []
        tth_max = float(self.x.max()) + 2.0
        tth_min = max(float(self.x.min()) - 1.0, 0.0)
        for p, ph in enumerate(phases):
            self.phases.append(self._phase_data(p, ph, tth_min, tth_max))
        self.x_step = np.diff(self.x, append=self.x[-1] + (self.x[-1] - self.x[-2]
                                                             if self.x.size > 1 else 1.0))

    # ------------------------------------------------------------------ set-up
    def _phase_data(self, p: int, ph: Phase, tth_min: float, tth_max: float) -> _PhaseData:
        refl = reflections(ph, self.lam, tth_max, tth_min)
        T, free = laue_tie_matrix(ph.laue, ph.unique_axis)
        A = cell_to_A(ph.cell)
        for i in free:
            self.values[f"{p}::A{i}"] = float(A[i])
        self.values[f"{p}:0:Scale"] = 1.0
        self.values[f"{p}:0:Size;i"] = 1.0
        self.values[f"{p}:0:Mustrain;i"] = 1000.0
        self.values[f"{p}:0:MD"] = 1.0
        for j, atom in enumerate(ph.atoms):
            for c, v in zip("xyz", atom.xyz):
                self.values[f"{p}::A{c}:{j}"] = float(v)
            self.values[f"{p}::AUiso:{j}"] = float(atom.uiso)
        H6 = A_derivative_H(refl.hkl)
        orbits = np.einsum("ni,rij->nrj", refl.hkl, laue_rotations(ph.space_group))
        return _PhaseData(p, ph, refl.hkl, H6 @ T, H6, T, free, refl.mult.astype(float),
                          StructureFactorTable(ph, refl.hkl), orbits, _metric(A),
                          np.ones(len(refl)), tuple(c for a in ph.atoms for c in a.xyz))

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
        return pd.T @ np.array([values[f"{p}::A{i}"] for i in pd.free])

    def refined_phase(self, p: int, values: Mapping[str, float]) -> Phase:
        """Phase p with the cell (and atoms) of ``values``."""
        ph = self.phases[p].phase
        atoms = [Atom(a.label, a.element,
                      tuple(values[f"{p}::A{c}:{j}"] for c in "xyz"), a.occ,
                      values[f"{p}::AUiso:{j}"]) for j, a in enumerate(ph.atoms)]
        return ph.with_cell(A_to_cell(self.A_terms(p, values))).with_atoms(atoms)

    def _sf_table(self, p: int, values: Mapping[str, float]) -> StructureFactorTable:
        """|F|² table of phase p for the atom coordinates in ``values`` (rebuilt when they move)."""
        pd = self.phases[p]
        key = tuple(values[f"{p}::A{c}:{j}"] for j in range(pd.sf.n_atoms) for c in "xyz")
        if key != pd.sf_key:
            pd.sf = StructureFactorTable(self.refined_phase(p, values), pd.hkl)
            pd.sf_key = key
        return pd.sf

    # ------------------------------------------------------------------ reflections
    def reflection_terms(self, p: int, values: Mapping[str, float], vary: Sequence[str] = (),
                         jac: bool = False) -> dict[str, np.ndarray]:
        """Per-reflection positions, widths, intensities (and their parameter derivatives).

        Returns
        -------
        dict
            ``tth, sig2, gam, intensity, fsq`` (n,) and, if ``jac``, ``dI, dtth, dsig2, dgam,
            dshl`` (n, len(vary)): derivatives of I_h, 2θ_h, σ²_h, γ_h and SH/L.
        """
        pd = self.phases[p]
        v = values
        A = pd.T @ np.array([v[f"{p}::A{i}"] for i in pd.free])
        inv_d2 = pd.H6 @ A
        with np.errstate(invalid="ignore", divide="ignore"):
            t0 = np.arcsin(self.lam * np.sqrt(inv_d2) / 2)
        tth = 2 * t0 * _DEG + v["Zero"]
        size, mu = v[f"{p}:0:Size;i"], v[f"{p}:0:Mustrain;i"]
        sg = _profile.peak_sig2_gam(tth, v["U"], v["V"], v["W"], v["X"], v["Y"], v["Z"],
                                    size_um=size, mustrain=mu, lam_a=self.lam)
        lorentz = _profile.lorentz_factor(tth)
        ppol = _profile.polarization_factor(tth, self.polariz, self.azimuth)
        det_g = np.linalg.det(_metric(A))
        inv_v = math.sqrt(det_g) if det_g > 0 else math.nan
        r = v[f"{p}:0:MD"]
        if r != 1.0 or f"{p}:0:MD" in vary:
            po, dpo = _profile.march_dollase(pd.orbits, (0, 0, 1), r, pd.G0)
        else:
            po = np.ones(len(pd.mult))
        if self.mode == "lebail":
            fsq = pd.fsq_lebail
        else:
            uiso = np.array([v[f"{p}::AUiso:{j}"] for j in range(pd.sf.n_atoms)])
            fsq_out = self._sf_table(p, v).fsq(inv_d2, uiso, derivatives=jac)
            fsq = fsq_out[0] if jac else fsq_out
        pre = v["Scale"] * v[f"{p}:0:Scale"] * pd.mult * ppol * po * inv_v * lorentz  # I/|F|²
        intensity = pre * fsq
        out = dict(tth=tth, sig2=sg.sig2, gam=sg.gam, intensity=intensity, fsq=fsq)
        if not jac:
            return out
        col = {name: i for i, name in enumerate(vary)}
        n, nv = len(tth), len(vary)
        dI, dtth, dsig2, dgam, dshl = (np.zeros((n, nv)) for _ in range(5))
        # I_h through 2θ_h: ∂ln L/∂2θ and ∂ln P_pol/∂2θ (per degree)
        th = np.radians(tth) / 2
        dlnl_dtth = (-2 / np.tan(th) + np.tan(th)) * (math.pi / 360.0)
        phi = math.radians(self.azimuth)
        pa = (1 - self.polariz) * math.cos(phi) ** 2 + self.polariz * math.sin(phi) ** 2
        dppol_dtth = -pa * 2 * np.sin(4 * th) * (math.pi / 180.0)
        dI_dtth = intensity * (dlnl_dtth + dppol_dtth / ppol)
        # cell: 2θ through 1/d², 1/V, |F|²(1/d²)
        dtth_dinvd2 = _DEG * self.lam / (2 * np.sqrt(inv_d2) * np.cos(t0))
        g_real = np.linalg.inv(_metric(A))
        dlninvv_dp = 0.5 * np.array([g_real[0, 0], g_real[1, 1], g_real[2, 2], g_real[0, 1],
                                     g_real[0, 2], g_real[1, 2]]) @ pd.T
        for k, i in enumerate(pd.free):
            c = col.get(f"{p}::A{i}")
            if c is not None:
                dtth[:, c] = dtth_dinvd2 * pd.HT[:, k]
                dI[:, c] = intensity * dlninvv_dp[k]
                if self.mode != "lebail":
                    dI[:, c] += pre * fsq_out[1] * pd.HT[:, k]
        if "Zero" in col:
            dtth[:, col["Zero"]] = 1.0
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
        if f"{p}:0:MD" in col:
            dI[:, col[f"{p}:0:MD"]] = intensity / po * dpo
        if self.mode != "lebail":
            for j in range(pd.sf.n_atoms):
                c = col.get(f"{p}::AUiso:{j}")
                if c is not None:
                    dI[:, c] = pre * fsq_out[2][j]
                for axis, name in enumerate("xyz"):
                    c = col.get(f"{p}::A{name}:{j}")
                    if c is not None:
                        dI[:, c] = pre * self._dfsq_dxyz(p, v, j, axis, inv_d2, uiso)
        return dict(out, dI=dI, dtth=dtth, dsig2=dsig2, dgam=dgam, dshl=dshl)

    def _dfsq_dxyz(self, p: int, values: Mapping[str, float], j: int, axis: int,
                   inv_d2: np.ndarray, uiso: np.ndarray, step: float = 1e-6) -> np.ndarray:
        """Central finite difference of |F|² w.r.t. one fractional coordinate of atom j."""
        pd = self.phases[p]
        res = []
        for sgn in (1.0, -1.0):
            vals = dict(values)
            vals[f"{p}::A{'xyz'[axis]}:{j}"] += sgn * step
            table = StructureFactorTable(self.refined_phase(p, vals), pd.hkl)
            res.append(table.fsq(inv_d2, uiso))
        return (res[0] - res[1]) / (2 * step)

    # ------------------------------------------------------------------ pattern
    def _all_terms(self, values, vary=(), jac=False):
        terms = [self.reflection_terms(pd.index, values, vary, jac) for pd in self.phases]
        return {key: np.concatenate([t[key] for t in terms]) for key in terms[0]}, terms

    def evaluate(self, values: Mapping[str, float], vary: Sequence[str] = (),
                 jac: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """y_calc, background and (optionally) the Jacobian ∂y_calc/∂vary.

        Returns
        -------
        ycalc : ndarray (n,)
        bkg : ndarray (n,)
        J : ndarray (n, len(vary)) or None
        """
        coeffs = np.array([values[f"Back;{i}"] for i in range(self.bkg_terms)])
        bkg = self.bkg_basis @ coeffs
        rt, _ = self._all_terms(values, vary, jac)
        if not np.all(np.isfinite(rt["tth"])):
            nan = np.full(self.x.size, np.nan)
            return nan, bkg, (np.full((self.x.size, len(vary)), np.nan) if jac else None)
        peaks = _profile.pattern(self.x, rt["tth"], rt["sig2"], rt["gam"], rt["intensity"],
                                 values["SH/L"], derivatives=jac, precision=self.precision)
        y = bkg + peaks.y
        if not jac:
            return y, bkg, None
        J = np.zeros((self.x.size, len(vary)))
        for c, name in enumerate(vary):
            if name.startswith("Back;"):
                J[:, c] = self.bkg_basis[:, int(name[5:])]
        if peaks.offsets[-1]:
            # the per-peak pieces are CSC columns of (n_points × n_peaks) matrices
            point = self._piece_points(peaks)
            for piece, coef in ((peaks.d_intensity, rt["dI"]), (peaks.d_pos, rt["dtth"]),
                                (peaks.d_sig2, rt["dsig2"]), (peaks.d_gam, rt["dgam"]),
                                (peaks.d_shl, rt["dshl"])):
                used = np.flatnonzero(np.any(coef != 0, axis=0))
                if used.size:
                    mat = sparse.csc_matrix((piece, point, peaks.offsets),
                                            shape=(self.x.size, coef.shape[0]))
                    J[:, used] += mat @ coef[:, used]
        return y, bkg, J

    @staticmethod
    def _piece_points(peaks: "_profile.PeakSum") -> np.ndarray:
        n_pts = peaks.hi - peaks.lo
        return (np.arange(peaks.offsets[-1]) - np.repeat(peaks.offsets[:-1], n_pts)
                + np.repeat(peaks.lo, n_pts))

    # ------------------------------------------------------------------ Le Bail
    def lebail_extract(self, values: Mapping[str, float], yobs: np.ndarray) -> None:
        """One Fobs-partition pass (§3.7): replace the Le Bail intensities by the extracted ones."""
        rt, terms = self._all_terms(values)
        if not np.all(np.isfinite(rt["tth"])):
            return
        coeffs = np.array([values[f"Back;{i}"] for i in range(self.bkg_terms)])
        bkg = self.bkg_basis @ coeffs
        unit = _profile.pattern(self.x, rt["tth"], rt["sig2"], rt["gam"],
                                np.ones_like(rt["tth"]), values["SH/L"],
                                precision=self.precision)
        n_pts = unit.hi - unit.lo
        peak_of = np.repeat(np.arange(n_pts.size), n_pts)
        point = self._piece_points(unit)
        ycalc_peaks = np.bincount(point, weights=unit.d_intensity * rt["intensity"][peak_of],
                                  minlength=self.x.size)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(ycalc_peaks != 0, (yobs - bkg) / ycalc_peaks, 1e-10)
        om = unit.d_intensity * self.x_step[point]
        num = np.bincount(peak_of, weights=np.maximum(ratio[point], 0.0) * om,
                          minlength=n_pts.size)
        den = np.bincount(peak_of, weights=om, minlength=n_pts.size)
        factor = np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)
        start = 0
        for pd, t in zip(self.phases, terms):
            n = len(t["tth"])
            pd.fsq_lebail = np.maximum(pd.fsq_lebail * factor[start:start + n], 0.0)
            start += n

    def n_floored(self, values: Mapping[str, float]) -> int:
        """Number of σ² and γ values on GSAS-II's 0.001 floors (+ peaks with a NaN 2θ)."""
        rt, _ = self._all_terms(values)
        return int((~np.isfinite(rt["tth"])).sum() + (rt["sig2"] <= _SIG2_FLOOR).sum()
                   + (rt["gam"] <= _GAM_FLOOR).sum())


# ------------------------------------------------------------------------------ least squares

@dataclass
class _LMState:
    values: dict[str, float]
    chi2: float
    cycles: int


def levenberg_marquardt(model: PatternModel, values: dict[str, float], vary: Sequence[str],
                        yobs: np.ndarray, sqrt_w: np.ndarray, *, max_cycles: int = 8,
                        tol: float = 1e-6, svd_tol: float = 1e-10,
                        lebail: bool = False) -> _LMState:
    """Minimise Σ w (y − y_calc)² over ``vary`` (Levenberg–Marquardt, SVD-stable).

    λ starts at 0 (Gauss–Newton), becomes 1e-3 on a rejected step and is ×10 per retry up to
    1e3; a cycle with no accepted step ends the stage. A step is rejected when χ² does not
    decrease, SH/L becomes negative or more peak widths hit GSAS-II's 0.001 floors (a floored
    width has zero derivative and would trap the fit). Converged when the relative decrease of χ²
    is below ``tol``. In Le Bail mode the intensities are re-extracted after every cycle.

    Returns
    -------
    _LMState
        Best parameters, their χ² and the number of cycles run.
    """
    vals = dict(values)
    vary = list(vary)

    def chi2_of(v):
        yc, _, _ = model.evaluate(v)
        r = sqrt_w * (yobs - yc)
        c = float(r @ r)
        return c if math.isfinite(c) else math.inf

    chi2 = chi2_of(vals)
    floored = model.n_floored(vals)
    cycles = 0
    for cycles in range(1, max_cycles + 1):
        yc, _, J = model.evaluate(vals, vary, jac=True)
        r = sqrt_w * (yobs - yc)
        Jw = J * sqrt_w[:, None]
        if not (np.all(np.isfinite(Jw)) and np.all(np.isfinite(r))):
            break
        N = Jw.T @ Jw
        g = Jw.T @ r
        scale = np.sqrt(np.diag(N))
        scale[scale == 0] = 1.0
        Nn = N / np.outer(scale, scale)
        gn = g / scale
        lam = 0.0
        accepted = False
        while lam <= 1e3:
            step = _svd_solve(Nn + lam * np.eye(len(vary)), gn, svd_tol) / scale
            trial = dict(vals)
            for name, s in zip(vary, step):
                trial[name] += s
            chi2_new = chi2_of(trial)
            if chi2_new < chi2 and trial["SH/L"] >= 0 and model.n_floored(trial) <= floored:
                accepted = True
                break
            lam = 1e-3 if lam == 0 else lam * 10
        if not accepted:
            break
        vals = trial
        if lebail:
            model.lebail_extract(vals, yobs)
            chi2_new = min(chi2_of(vals), chi2_new)
        rel = (chi2 - chi2_new) / chi2 if chi2 > 0 else 0.0
        chi2 = chi2_of(vals) if lebail else chi2_new
        if rel < tol:
            break
    return _LMState(vals, chi2, cycles)


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


# ------------------------------------------------------------------------------ driver

def _prepare(tth_deg, intensity, sigma, limits):
    x = np.asarray(tth_deg, dtype=float).ravel()
    y = np.asarray(intensity, dtype=float).ravel()
    s = np.asarray(sigma, dtype=float).ravel()
    if not (x.size == y.size == s.size):
        raise PatternError(f"pattern arrays differ in length: 2θ {x.size}, intensity {y.size}, "
                           f"sigma {s.size}")
    if x.size == 0:
        raise PatternError("pattern is empty (0 points)")
    order = np.argsort(x, kind="stable")
    x, y, s = x[order], y[order], s[order]
    if limits is not None:
        lo, hi = float(limits[0]), float(limits[1])
        inside = (x >= lo) & (x <= hi)
        x, y, s = x[inside], y[inside], s[inside]
        if x.size == 0:
            raise PatternError(f"no points inside the limits {lo}..{hi} deg")
    x_range = (float(x[0]), float(x[-1]))
    good = np.isfinite(x) & np.isfinite(y) & np.isfinite(s) & (s > 0)
    n_dropped = int((~good).sum())
    x, y, s = x[good], y[good], s[good]
    if x.size < 10:
        raise PatternError(f"pattern has {x.size} usable points (NaN or sigma <= 0 dropped: "
                           f"{n_dropped}); need at least 10")
    if not np.any(y != 0):
        raise PatternError("pattern intensity is zero everywhere")
    return x, y, s, x_range, n_dropped


def _rwp(yobs, ycalc, w):
    return 100.0 * math.sqrt(float(np.sum(w * (yobs - ycalc) ** 2)) / float(np.sum(w * yobs ** 2)))


def _linear_scale_background(model: PatternModel, values: dict[str, float], yobs, w) -> None:
    """Exact weighted linear least squares for the background and the histogram scale."""
    nb = model.bkg_terms
    vals = dict(values)
    for i in range(nb):
        vals[f"Back;{i}"] = 0.0
    peaks, _, _ = model.evaluate(vals)
    design = np.column_stack([model.bkg_basis, peaks / values["Scale"]])
    sw = np.sqrt(w)
    sol, *_ = np.linalg.lstsq(design * sw[:, None], yobs * sw, rcond=None)
    for i in range(nb):
        values[f"Back;{i}"] = float(sol[i])
    if sol[nb] > 0:
        values["Scale"] = float(sol[nb])


def refine_pattern(tth_deg: np.ndarray, intensity: np.ndarray, sigma: np.ndarray,
                   phases: Sequence[Phase], instprm: Any, *, bkg_terms: int = 6,
                   limits: tuple[float, float] | None = None, refine_atoms: bool = False,
                   mode: str = "rietveld", start: Mapping[str, float] | None = None,
                   sample_azimuth_deg: float = 0.0,
                   stages: Sequence[Stage] | None = None) -> PatternResult:
    """Staged Rietveld or Le Bail refinement of one pattern.

    Parameters
    ----------
    tth_deg, intensity, sigma : ndarray (n,)
        2θ (deg), counts and their standard deviations (w = 1/σ²). NaN points and σ ≤ 0 are
        dropped (counted in ``n_dropped``).
    phases : sequence of Phase
    instprm : Mapping or Instrument
        GSAS-II instrument parameters (``Lam``, ``Polariz.``, starting ``Zero, U..Z, SH/L``).
    bkg_terms : int
        Chebyshev-1 background terms over the refined limits.
    limits : (lo, hi), optional
        2θ range to refine, degrees (default: all data).
    refine_atoms : bool
        Add a final stage refining atom coordinates and U_iso (Rietveld only).
    mode : {'rietveld', 'lebail'}
    start : dict, optional
        GSAS-II-named starting values (e.g. a neighbour lineout's result ``values``).
    sample_azimuth_deg : float
        Sample azimuth used by the polarization factor.
    stages : sequence of Stage, optional
        Replaces :func:`~midasflow.refine.recipe.default_stages`.

    Returns
    -------
    PatternResult

    Raises
    ------
    PatternError
        Empty, all-zero or mismatched input.
    """
    if mode not in ("rietveld", "lebail"):
        raise PatternError(f"mode must be 'rietveld' or 'lebail', got {mode!r}")
    if not phases:
        raise PatternError("no phases given")
    x, y, s, x_range, n_dropped = _prepare(tth_deg, intensity, sigma, limits)
    w = 1.0 / s ** 2
    sqrt_w = 1.0 / s
    warn: list[str] = []
    if n_dropped:
        warn.append(f"{n_dropped} points dropped (NaN intensity or sigma <= 0)")
    model = PatternModel(x, x_range, phases, instprm, bkg_terms, sample_azimuth_deg, mode)
    values = dict(model.values)
    for key, val in (start or {}).items():
        if key in values and val is not None and math.isfinite(float(val)):
            values[key] = float(val)
    if mode == "lebail":
        _lebail_start(model, values, y, w)
    else:
        _linear_scale_background(model, values, y, w)
    if stages is None:
        atom_names = [n for pd in model.phases for n in model.atom_names(pd.index)]
        stages = default_stages(len(phases), bkg_terms, model.cell_names(), atom_names,
                                mode=mode, refine_atoms=refine_atoms)
    vary: list[str] = []
    stage_rwp: dict[str, float] = {}
    yc, _, _ = model.evaluate(values)
    rwp_prev = _rwp(y, yc, w) if np.all(np.isfinite(yc)) else math.inf
    for stage in stages:
        trial_vary = vary + [n for n in stage.add if n in values and n not in vary]
        saved_lebail = [pd.fsq_lebail.copy() for pd in model.phases]
        floored_before = model.n_floored(values)
        with np.errstate(all="ignore"), _warnings.catch_warnings():
            _warnings.simplefilter("ignore", RuntimeWarning)
            try:
                # Le Bail alternates LSQ cycles with intensity extraction: allow more cycles
                cycles = stage.max_cycles * (3 if mode == "lebail" else 1)
                st = levenberg_marquardt(model, values, trial_vary, y, sqrt_w,
                                         max_cycles=cycles, lebail=mode == "lebail")
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
        elif st.values["SH/L"] < 0 or model.n_floored(st.values) > floored_before:
            reason = "gave non-physical peak widths (more widths on the 0.001 floor, SH/L < 0)"
        if reason:
            warn.append(f"stage {stage.name!r} {reason}; rolled back to the previous stage")
            for pd, fsq in zip(model.phases, saved_lebail):
                pd.fsq_lebail = fsq
            stage_rwp[stage.name] = rwp_prev
            continue
        values, vary, rwp_prev = st.values, trial_vary, rwp_new
        stage_rwp[stage.name] = rwp_new
    return _finish(model, values, vary, x, y, w, sqrt_w, n_dropped, stage_rwp, warn)


def _lebail_start(model: PatternModel, values: dict[str, float], yobs, w) -> None:
    """Start Le Bail intensities: uniform |F|², linear scale + background, then partitions."""
    for pd in model.phases:
        pd.fsq_lebail = np.ones(len(pd.mult))
    _linear_scale_background(model, values, yobs, w)
    for pd in model.phases:
        pd.fsq_lebail = pd.fsq_lebail * values["Scale"]
    values["Scale"] = 1.0
    for _ in range(5):
        model.lebail_extract(values, yobs)
        _linear_scale_background(model, values, yobs, w)
        for pd in model.phases:
            pd.fsq_lebail = pd.fsq_lebail * values["Scale"]
        values["Scale"] = 1.0


def _finish(model: PatternModel, values, vary, x, y, w, sqrt_w, n_dropped, stage_rwp,
            warn) -> PatternResult:
    yc, bkg, J = model.evaluate(values, vary, jac=True)
    chi2 = float(np.sum(w * (y - yc) ** 2))
    n_obs, n_var = y.size, len(vary)
    dof = max(n_obs - n_var, 1)
    gof = math.sqrt(chi2 / dof)
    Jw = J * sqrt_w[:, None]
    N = Jw.T @ Jw
    scale = np.sqrt(np.diag(N))
    scale[scale == 0] = 1.0
    cov = _svd_pinv(N / np.outer(scale, scale)) / np.outer(scale, scale) * gof ** 2
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
        names = [f"{p}::A{i}" for i in pd.free]
        sub = [idx.get(n) for n in names]
        cov_p = np.zeros((len(names), len(names)))
        for a_, ia in enumerate(sub):
            for b_, ib in enumerate(sub):
                if ia is not None and ib is not None:
                    cov_p[a_, b_] = cov[ia, ib]
        cell_err[ph.name] = tuple(float(e) for e in cell_esds(A, cov_p, ph.laue, ph.unique_axis))
        phases_out.append(model.refined_phase(p, values))
        masses.append(phases_out[-1].cell_mass)
        rt = model.reflection_terms(p, values)
        refl_tables[ph.name] = dict(h=pd.hkl[:, 0].copy(), k=pd.hkl[:, 1].copy(),
                                    l=pd.hkl[:, 2].copy(), mult=pd.mult.astype(int),
                                    d_a=1 / np.sqrt(pd.H6 @ A), tth_deg=rt["tth"],
                                    sig2=rt["sig2"], gam=rt["gam"], fsq=rt["fsq"],
                                    intensity=rt["intensity"])
    # weight fractions W_p ∝ S_p · cell mass_p (GSAS-II)
    sc = np.array([values[f"{pd.index}:0:Scale"] for pd in model.phases])
    m = np.array(masses) if all(mm > 0 for mm in masses) else np.ones(len(masses))
    wt = sc * m
    frac = wt / wt.sum()
    jf = (np.diag(m) * wt.sum() - np.outer(wt, m)) / wt.sum() ** 2     # ∂frac_i/∂S_j
    cov_s = np.zeros((len(sc), len(sc)))
    for a_, pa in enumerate(model.phases):
        for b_, pb in enumerate(model.phases):
            ia, ib = idx.get(f"{pa.index}:0:Scale"), idx.get(f"{pb.index}:0:Scale")
            if ia is not None and ib is not None:
                cov_s[a_, b_] = cov[ia, ib]
    frac_esd = np.sqrt(np.maximum(np.diag(jf @ cov_s @ jf.T), 0.0))
    for i, pd in enumerate(model.phases):
        fractions[pd.phase.name] = (float(frac[i]), float(frac_esd[i]))
    ok = math.isfinite(chi2)
    return PatternResult(
        status="ok" if ok else "failed",
        message="" if ok else "refinement produced a non-finite chi2",
        rwp=_rwp(y, yc, w), rp=100.0 * float(np.sum(np.abs(y - yc)) / np.sum(np.abs(y))),
        chi2=chi2, gof=gof, n_points=int(n_obs), n_dropped=int(n_dropped),
        stage_rwp=stage_rwp, values={k: float(v) for k, v in values.items()}, esds=esds,
        cells=cells, cell_esds=cell_err, phase_fractions=fractions, tth_deg=x, obs=y, calc=yc,
        bkg=bkg, reflections=refl_tables, warnings=warn, phases=phases_out)
