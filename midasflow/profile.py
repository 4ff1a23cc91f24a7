"""GSAS-II constant-wavelength X-ray ("PXC") peak model: profile, widths, positions, corrections.

Native re-implementation of the pieces of GSAS-II's powder model that ``midasflow.crystal``
and the least-squares engine ``midasflow.refinement`` build on (described, with sources, in
``docs/reference/gsas2_profile.md`` sections 1–5). Conventions:

* ``x_deg`` / ``tth_deg``: 2θ in degrees. θ is half of it.
* Peak widths are GSAS-II's: ``sig2`` = Gaussian variance in centidegree², ``gam`` = Lorentzian
  FWHM in centidegrees. Profile values are **per centidegree** (unit area in centidegrees), so a
  peak of integrated intensity ``I`` contributes ``I * Ω(x)`` counts at point ``x`` (doc section 2, window).
* ``shl`` is GSAS-II's ``SH/L``; the effective value is ``max(shl, 0.002)`` (doc section 2) and S/L = H/L =
  SH/L/2.

Precision. GSAS-II evaluates the Finger–Cox–Jephcoat sum with the REAL*4 Fortran routine
``PSVFCJO``. With ``precision="float32"`` (the default everywhere in this module) the kernels
follow that routine's operation order in float32 and reproduce GSAS-II to ~1e-6 relative; with
``precision="float64"`` the same algorithm runs in double precision, which differs from GSAS-II by
up to 1 % of the peak maximum at 2θ ≈ 2° with SH/L = 0.002 and by ≤ 3e-4 elsewhere.
Returned arrays are always float64.

Kernels. The profile sums run in two implementations with bit-identical results: numba
(:mod:`midasflow.profile_compiled`) and numpy (:mod:`midasflow.profile_numpy`, float64 only).
Importing numba and setting up its CPU target costs about 0.5 s of CPU in a new process, five
to ten times a typical lineout's refinement, so a process starts on the numpy kernels and loads
the compiled ones once it has spent ``NUMPY_TIER_BUDGET`` on them, meets a call larger than
``NUMPY_TIER_MAX_CALL``, needs float32 or a single-peak function, or calls :func:`use_compiled_kernels`; a
process that has imported numba already (for caking, say) uses the compiled ones from the start.
"""
from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from midasflow import profile_numpy as _numpy_kernels
from midasflow.profile_constants import FSTTERM as _FSTTERM
from midasflow.profile_constants import NTERMS as _NTERMS

Precision = Literal["float32", "float64"]

SHL_MIN = 0.002
"""Floor GSAS-II applies to SH/L in Rietveld / Le Bail profiles (doc section 2)."""
SIG2_FLOOR_CDEG2 = 0.001
GAM_FLOOR_CDEG = 0.001
_WINDOW_LOW_FWHM = 50.0
_WINDOW_HIGH_FWHM = 75.0




#: profile work a process does with the numpy kernels before it loads the compiled ones, in the
#: work units of :func:`midasflow.profile_numpy.peaks_f64` (~0.15 µs of CPU each): about 0.2 s,
#: under half of what loading the compiled kernels costs (two CeO2 refinements of 1000 points)
NUMPY_TIER_BUDGET = 1_500_000
#: the largest single call the numpy kernels take (~8 ms there, ~0.5 ms compiled): a refinement
#: makes 50-100 profile calls, so a pattern with larger ones (a 3761-point PbSO4 Cu Kα pattern
#: makes ~500 000) would spend more in numpy than loading the compiled kernels costs
NUMPY_TIER_MAX_CALL = 50_000
_numpy_tier = {"left": NUMPY_TIER_BUDGET}


def _compiled() -> ModuleType:
    """The numba kernels; the first call imports numba (and the cached kernels load on their
    first call)."""
    from midasflow import profile_compiled
    return profile_compiled


def use_compiled_kernels() -> None:
    """Use the numba kernels for every later profile evaluation of this process.

    For a process about to refine many patterns (the numpy kernels it would otherwise start on
    give bit-identical results, 10-20 times slower). Imports numba and loads the cached kernels.
    """
    _numpy_tier["left"] = 0
    kernels = _compiled()
    kernels.accumulate(np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0), np.zeros(0),
                       np.zeros(0))


def _numba_loaded() -> bool:
    """Whether this process has imported numba already (caking, the compiled profile kernels or
    the user's own code): most of the compiled kernels' one-time cost is then paid."""
    return "numba" in sys.modules


def _numpy_tier_open() -> bool:
    """Whether float64 profile sums run on the numpy kernels: budget left and numba not loaded."""
    return _numpy_tier["left"] > 0 and not _numba_loaded()


@functools.lru_cache(maxsize=2)
def _tables(precision: Precision) -> tuple[type, NDArray, NDArray]:
    """(float type, packed positive Gauss–Legendre nodes, weights) for one precision: float64
    computed with numpy (the same values numba's loop gives), GSAS-II's float32 with numba."""
    if precision == "float64":
        return (np.float64, *_numpy_kernels.gauss_legendre_f64())
    if precision != "float32":
        raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
    total = int(_FSTTERM[-1] + _NTERMS[-1] // 2)
    xp, wp = np.empty(total, dtype=np.float32), np.empty(total, dtype=np.float32)
    _compiled().tables_f32(xp, wp, _NTERMS, _FSTTERM)
    return np.float32, xp, wp


# --------------------------------------------------------------------------------------------
# pseudo-Voigt and FCJ profile
# --------------------------------------------------------------------------------------------
def tch_fwhm_eta(sig2_cdeg2: ArrayLike, gam_cdeg: ArrayLike, *,
                 precision: Precision = "float32") -> tuple[float, float] | tuple[NDArray, NDArray]:
    """Total TCH FWHM Γ (centideg) and Lorentzian fraction η of the pseudo-Voigt (doc section 2).

    Parameters
    ----------
    sig2_cdeg2 : Gaussian variance σ² (centideg²); σ is floored at 0.001 centideg.
    gam_cdeg : Lorentzian FWHM γ (centideg), broadcast with ``sig2_cdeg2``.
    precision : "float32" (GSAS-II arithmetic) or "float64".

    Returns
    -------
    (Γ, η) : floats for scalar arguments, float64 arrays of the broadcast shape otherwise.
    """
    sig2, gam = np.broadcast_arrays(np.asarray(sig2_cdeg2, dtype=np.float64),
                                    np.asarray(gam_cdeg, dtype=np.float64))
    if precision == "float64":
        with np.errstate(all="ignore"):
            fwhm, eta = _numpy_kernels.tch_widths(sig2.ravel(), gam.ravel())[:2]
    else:
        ftype, _, _ = _tables(precision)
        kernel = _compiled().tch_widths
        pairs = [kernel(ftype(s), ftype(g), ftype)[:2] for s, g in zip(sig2.flat, gam.flat)]
        fwhm, eta = np.array(pairs, dtype=np.float64).reshape(-1, 2).T
    if sig2.ndim == 0:
        return float(fwhm[0]), float(eta[0])
    return fwhm.reshape(sig2.shape), eta.reshape(sig2.shape)


def tch_pseudo_voigt(delta_cdeg: ArrayLike, sig2_cdeg2: float, gam_cdeg: float, *,
                     precision: Precision = "float32",
                     derivatives: bool = False) -> NDArray[np.float64] | tuple[NDArray, ...]:
    """Thompson–Cox–Hastings pseudo-Voigt, unit area per centidegree (GSAS-II ``PSVOIGT``).

    Reproduces GSAS-II's quirks: π′ = 3.1415292654 in the Lorentzian, Gaussian exponent floored
    at −20, σ floored at 0.001 centideg (doc section 2).

    Parameters
    ----------
    delta_cdeg : array, any shape — distance from the peak centre in centidegrees.
    sig2_cdeg2 : Gaussian variance σ² (centideg²).
    gam_cdeg : Lorentzian FWHM γ (centideg).
    precision : "float32" (default, GSAS-II's REAL*4) or "float64".
    derivatives : also return d/dΔ (per centideg), d/dσ², d/dγ.

    Returns
    -------
    float64 array of delta's shape (values per centidegree), or a tuple
    ``(value, d_delta, d_sig2, d_gam)`` of such arrays when ``derivatives``.
    """
    d = np.asarray(delta_cdeg, dtype=np.float64)
    ftype, _, _ = _tables(precision)
    out = _compiled().pv_array(d.ravel(), float(sig2_cdeg2), float(gam_cdeg), bool(derivatives),
                               ftype)
    vals = tuple(row.reshape(d.shape) for row in out)
    return vals if derivatives else vals[0]


def _fcj_eval(x_deg: ArrayLike, tth_peak_deg: float, sig2: float, gam: float, shl: float,
              precision: Precision, deriv: bool) -> tuple[NDArray, NDArray]:
    x = np.ascontiguousarray(x_deg, dtype=np.float64)
    flat = x.ravel()
    ftype, xp, wp = _tables(precision)
    out = np.zeros((5, flat.size), dtype=np.float64)
    _compiled().fcj_core(flat, 0, flat.size, float(tth_peak_deg), float(sig2), float(gam),
              max(float(shl), SHL_MIN), xp, wp, deriv, 1.0, 1.0, out, 0, ftype)
    return out, x


def fcj_profile(x_deg: ArrayLike, tth_peak_deg: float, sig2: float, gam: float, shl: float, *,
                precision: Precision = "float32") -> NDArray[np.float64]:
    """FCJ-asymmetric TCH pseudo-Voigt Ω(x) per centidegree — GSAS-II ``pypsvfcjo`` (doc section 2).

    Ω = Σ_k w_k W_k PV(100(x − δ_k)) / Σ_k w_k W_k over the positive half of an N-point
    Gauss–Legendre rule between 2φ_min and 2θ_h, with S/L = H/L = max(SH/L, 0.002)/2.
    No window is applied (see :func:`peak_window`).

    Parameters
    ----------
    x_deg : array, any shape — 2θ of the data points (degrees).
    tth_peak_deg : peak position 2θ_h (degrees, corrected for Zero/displacement).
    sig2 : Gaussian variance σ² (centideg²).  gam : Lorentzian FWHM γ (centideg).
    shl : SH/L (floored at 0.002).
    precision : "float32" (default; GSAS-II's REAL*4 operation order, parity ~1e-6) or
        "float64" (same algorithm in double precision).

    Returns
    -------
    float64 array of x's shape, per centidegree.
    """
    out, x = _fcj_eval(x_deg, tth_peak_deg, sig2, gam, shl, precision, False)
    return out[0].reshape(x.shape)


@dataclass(frozen=True)
class ProfileDerivatives:
    """Ω and its analytic derivatives at the points of :func:`fcj_profile_derivatives`.

    All float64 arrays of the x shape. ``d_pos`` per degree of 2θ_h; ``d_sig2`` per centideg²;
    ``d_gam`` per centideg; ``d_shl`` per unit SH/L (0 when SH/L < 0.002, where the floor holds).
    """

    value: NDArray[np.float64]
    d_pos: NDArray[np.float64]
    d_sig2: NDArray[np.float64]
    d_gam: NDArray[np.float64]
    d_shl: NDArray[np.float64]


def fcj_profile_derivatives(x_deg: ArrayLike, tth_peak_deg: float, sig2: float, gam: float,
                            shl: float, *, precision: Precision = "float32") -> ProfileDerivatives:
    """Ω of :func:`fcj_profile` with analytic ∂Ω/∂2θ_h, ∂Ω/∂σ², ∂Ω/∂γ and ∂Ω/∂SH/L.

    The derivatives differentiate the quadrature nodes δ_k (through 2φ_min) and the FCJ weights
    W_k analytically for a fixed node count N (N is piecewise constant in the parameters), and the
    pseudo-Voigt as GSAS-II's ``PSVOIGT`` does. ``value`` equals :func:`fcj_profile` exactly.
    """
    out, x = _fcj_eval(x_deg, tth_peak_deg, sig2, gam, shl, precision, True)
    rows = [r.reshape(x.shape) for r in out]
    d_shl = rows[4] if shl >= SHL_MIN else np.zeros_like(rows[4])
    return ProfileDerivatives(rows[0], rows[1], rows[2], rows[3], d_shl)


# --------------------------------------------------------------------------------------------
# widths, window, position
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SigGam:
    """Peak widths at 2θ_h and their derivatives (arrays broadcast from the inputs).

    ``sig2`` centideg², ``gam`` centideg (floored at 0.001 as GSAS-II does); ``sig2_raw`` /
    ``gam_raw`` the same formulas without the floors (≤ 0 marks an unphysical profile).
    ``d_sig2`` / ``d_gam`` map parameter names 'U', 'V', 'W', 'X', 'Y', 'Z', 'Size', 'Mustrain',
    'tth' (per degree of 2θ_h) to derivative arrays; derivatives are zero where the 0.001 floor is
    active.
    """

    sig2: NDArray[np.float64]
    gam: NDArray[np.float64]
    d_sig2: dict[str, NDArray[np.float64]]
    d_gam: dict[str, NDArray[np.float64]]
    sig2_raw: NDArray[np.float64]
    gam_raw: NDArray[np.float64]


_FOUR_LN2_X2 = 8.0 * math.log(2.0)


def peak_sig2_gam(tth_peak_deg: ArrayLike, U: float, V: float, W: float, X: float, Y: float,
                  Z: float, size_um: float = 1.0, mustrain: float = 1000.0, lam_a: float = 1.0,
                  size_mx: float = 1.0, mustrain_mx: float = 1.0,
                  derivatives: bool = True) -> SigGam:
    """Gaussian variance σ² and Lorentzian FWHM γ of each peak (doc section 1, isotropic sample terms).

    σ² = max(0.001, U tan²θ + V tanθ + W + σ²_sample), γ = max(0.001, X/cosθ + Y tanθ + Z +
    γ_sample) with Scherrer size S = 1.8λ/(π D cosθ) and microstrain M = 0.018 µ tanθ/π split by
    the mixing coefficients: γ_sample = S·mx_S + M·mx_M, σ²_sample = ((S(1−mx_S))² +
    (M(1−mx_M))²)/(8 ln 2). GSAS-II's defaults Size = 1 µm and Mustrain = 1000 are non-zero
    broadening.

    Parameters
    ----------
    tth_peak_deg : array (n,) — corrected peak positions 2θ_h (deg).
    U, V, W : centideg².  X, Y, Z : centideg.  size_um : crystallite size D (µm).
    mustrain : microstrain µ (10⁻⁶).  lam_a : wavelength (Å).  size_mx, mustrain_mx : LG mix.
    derivatives : False leaves ``d_sig2`` and ``d_gam`` empty (widths only).
    """
    tth = np.asarray(tth_peak_deg, dtype=np.float64)
    th = np.radians(tth) / 2.0
    tan_t = np.tan(th)
    cos_t = np.cos(th)
    sec2 = 1.0 / cos_t**2
    s_fw = 1.8 * lam_a / (math.pi * size_um * cos_t)
    m_per_mu = 0.018 * tan_t / math.pi
    m_fw = m_per_mu * mustrain
    gs, gm = 1.0 - size_mx, 1.0 - mustrain_mx
    sig2_raw = U * tan_t**2 + V * tan_t + W + ((s_fw * gs) ** 2 + (m_fw * gm) ** 2) / _FOUR_LN2_X2
    gam_raw = X / cos_t + Y * tan_t + Z + s_fw * size_mx + m_fw * mustrain_mx
    if not derivatives:
        return SigGam(sig2=np.maximum(SIG2_FLOOR_CDEG2, sig2_raw),
                      gam=np.maximum(GAM_FLOOR_CDEG, gam_raw), d_sig2={}, d_gam={},
                      sig2_raw=sig2_raw, gam_raw=gam_raw)
    s_on = (sig2_raw > SIG2_FLOOR_CDEG2).astype(np.float64)
    g_on = (gam_raw > GAM_FLOOR_CDEG).astype(np.float64)
    # d/dθ (rad) of the pieces, then × (π/360) for per-degree-of-2θ
    ds_dth = s_fw * tan_t
    dm_dth = 0.018 * mustrain * sec2 / math.pi
    dsig_dth = (2 * U * tan_t * sec2 + V * sec2
                + 2 * ((s_fw * gs**2) * ds_dth + (m_fw * gm**2) * dm_dth) / _FOUR_LN2_X2)
    dgam_dth = X * tan_t / cos_t + Y * sec2 + ds_dth * size_mx + dm_dth * mustrain_mx
    to_2th = math.pi / 360.0
    one = np.ones_like(tan_t)
    d_sig2 = {
        "U": tan_t**2, "V": tan_t, "W": one, "X": 0 * one, "Y": 0 * one, "Z": 0 * one,
        "Size": 2 * (s_fw * gs) ** 2 * (-1.0 / size_um) / _FOUR_LN2_X2,
        "Mustrain": 2 * m_fw * gm**2 * m_per_mu / _FOUR_LN2_X2,
        "tth": dsig_dth * to_2th,
    }
    d_gam = {
        "U": 0 * one, "V": 0 * one, "W": 0 * one, "X": 1.0 / cos_t, "Y": tan_t, "Z": one,
        "Size": -s_fw * size_mx / size_um,
        "Mustrain": m_per_mu * mustrain_mx,
        "tth": dgam_dth * to_2th,
    }
    return SigGam(
        sig2=np.maximum(SIG2_FLOOR_CDEG2, sig2_raw),
        gam=np.maximum(GAM_FLOOR_CDEG, gam_raw),
        d_sig2={k: v * s_on for k, v in d_sig2.items()},
        d_gam={k: v * g_on for k, v in d_gam.items()},
        sig2_raw=sig2_raw,
        gam_raw=gam_raw,
    )


def peak_window(tth_peak_deg: ArrayLike, sig2: ArrayLike, gam: ArrayLike,
                shl: float) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Evaluation window (lo_deg, hi_deg) of each peak, GSAS-II ``getWidthsCW`` (doc section 2).

    fwhm = max((2.355√σ² + γ)/100, 1e-4) deg; low = 2θ − 50(fwhm + SH/L_eff|cos2θ|), high =
    2θ + 75·fwhm; the two extents swap for 2θ > 90°. Points used: ``lo <= x < hi``, i.e.
    ``np.searchsorted(x, lo)`` … ``np.searchsorted(x, hi)`` (see :func:`window_indices`).
    """
    tth = np.asarray(tth_peak_deg, dtype=np.float64)
    fwhm = np.maximum((2.355 * np.sqrt(np.asarray(sig2, dtype=np.float64))
                       + np.asarray(gam, dtype=np.float64)) / 100.0, 0.0001)
    fmin = _WINDOW_LOW_FWHM * (fwhm + max(shl, SHL_MIN) * np.abs(np.cos(np.radians(tth))))
    fmax = _WINDOW_HIGH_FWHM * fwhm
    back = tth > 90.0
    lo_ext = np.where(back, fmax, fmin)
    hi_ext = np.where(back, fmin, fmax)
    return tth - lo_ext, tth + hi_ext


def window_indices(x_deg: ArrayLike, lo_deg: ArrayLike,
                   hi_deg: ArrayLike) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Index ranges [iBeg, iFin) of the points lo <= x < hi (left-sided searchsorted, sorted x)."""
    x = np.asarray(x_deg, dtype=np.float64)
    return (np.searchsorted(x, lo_deg).astype(np.int64),
            np.searchsorted(x, hi_deg).astype(np.int64))


@dataclass(frozen=True)
class PeakPosition:
    """2θ_h (deg) and its derivatives: ``d_d`` per Å of d, ``d_lam`` per Å, ``d_zero`` (=1),
    ``d_displace_x`` / ``d_displace_y`` per µm. Arrays of the d shape."""

    tth_deg: NDArray[np.float64]
    d_d: NDArray[np.float64]
    d_lam: NDArray[np.float64]
    d_zero: NDArray[np.float64]
    d_displace_x: NDArray[np.float64]
    d_displace_y: NDArray[np.float64]


def peak_position_deg(d_A: ArrayLike, lam_a: float, zero_deg: float = 0.0,
                      displace_x_um: float = 0.0, displace_y_um: float = 0.0,
                      gonio_radius_mm: float = 200.0) -> PeakPosition:
    """Debye–Scherrer peak position (doc section 3, GSAS-II ``GetReflPos``).

    2θ_h = 2θ₀ − (0.18/(πR))(Dx cos2θ₀ + Dy sin2θ₀) + Zero with 2θ₀ = 2 asin(λ/2d) (deg),
    Dx, Dy in µm, R in mm, cos/sin of the uncorrected 2θ₀.

    Parameters
    ----------
    d_A : array (n,) d-spacings (Å), from A + Dij.
    lam_a : wavelength (Å).  zero_deg : Zero (deg 2θ).  displace_x_um, displace_y_um : sample
    displacement (µm).  gonio_radius_mm : goniometer radius R (mm).
    """
    d = np.asarray(d_A, dtype=np.float64)
    arg = lam_a / (2.0 * d)
    tth0 = 2.0 * np.degrees(np.arcsin(arg))
    t0 = np.radians(tth0)
    k = 0.18 / (math.pi * gonio_radius_mm)
    tth = tth0 - k * (displace_x_um * np.cos(t0) + displace_y_um * np.sin(t0)) + zero_deg
    # d(2θ₀)/d(arg) in degrees; d(arg)/dd = -arg/d; d(arg)/dλ = 1/(2d)
    dtth0_darg = 2.0 * np.degrees(1.0 / np.sqrt(1.0 - arg**2))
    chain = 1.0 - k * (-displace_x_um * np.sin(t0) + displace_y_um * np.cos(t0)) * (math.pi / 180)
    return PeakPosition(
        tth_deg=tth,
        d_d=chain * dtth0_darg * (-arg / d),
        d_lam=chain * dtth0_darg / (2.0 * d),
        d_zero=np.ones_like(tth),
        d_displace_x=-k * np.cos(t0),
        d_displace_y=-k * np.sin(t0),
    )


# --------------------------------------------------------------------------------------------
# intensity corrections
# --------------------------------------------------------------------------------------------
def lorentz_factor(tth_deg: ArrayLike) -> NDArray[np.float64]:
    """CW Lorentz factor L = 1/(2 sin²θ cosθ) at the corrected 2θ_h (deg) (doc section 4)."""
    th = np.radians(np.asarray(tth_deg, dtype=np.float64)) / 2.0
    return 1.0 / (2.0 * np.sin(th) ** 2 * np.cos(th))


def polarization_factor(tth_deg: ArrayLike, polariz: float,
                        azimuth_deg: float = 0.0) -> NDArray[np.float64]:
    """GSAS-II X-ray polarization P_pol (doc section 4), ``azimuth_deg`` = **Sample** Azimuth φ.

    P_pol = [(1−P)cos²φ + P sin²φ]cos²2θ + (1−P)sin²φ + P cos²φ.
    """
    c2 = np.cos(np.radians(np.asarray(tth_deg, dtype=np.float64))) ** 2
    cf2 = math.cos(math.radians(azimuth_deg)) ** 2
    sf2 = 1.0 - cf2
    return ((1 - polariz) * cf2 + polariz * sf2) * c2 + (1 - polariz) * sf2 + polariz * cf2


def polarization_dpolariz(tth_deg: ArrayLike, azimuth_deg: float = 0.0) -> NDArray[np.float64]:
    """∂P_pol/∂P of :func:`polarization_factor` (independent of P)."""
    c2 = np.cos(np.radians(np.asarray(tth_deg, dtype=np.float64))) ** 2
    cf2 = math.cos(math.radians(azimuth_deg)) ** 2
    sf2 = 1.0 - cf2
    return (sf2 - cf2) * c2 + cf2 - sf2


def lorentz_polarization(tth_deg: ArrayLike, polariz: float,
                         azimuth_deg: float = 0.0) -> NDArray[np.float64]:
    """Product L·P_pol of :func:`lorentz_factor` and :func:`polarization_factor`."""
    return lorentz_factor(tth_deg) * polarization_factor(tth_deg, polariz, azimuth_deg)


def march_dollase(equivalents: ArrayLike, axis_hkl: ArrayLike, ratio: float,
                  G: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """March–Dollase preferred-orientation factor and ∂/∂r (doc section 4).

    PO_h = (1/N) Σ_H (r² cos²φ_H + sin²φ_H / r)^(−3/2), φ_H the angle between each equivalent
    H and the axis, both reciprocal-lattice vectors (metric G). r = 1 gives exactly 1.

    Parameters
    ----------
    equivalents : int/float array (n_refl, N, 3) — all symmetry equivalents of each reflection
        (hkl × rotation parts of every operator, duplicates included), or (n_refl, 3) for N = 1.
    axis_hkl : (3,) MD axis [h, k, l].
    ratio : March–Dollase r (> 0).
    G : (3, 3) reciprocal metric tensor (Å⁻²).

    Returns
    -------
    (po, d_po_d_ratio) : float64 arrays (n_refl,).
    """
    H = np.asarray(equivalents, dtype=np.float64)
    if H.ndim == 2:
        H = H[:, None, :]
    P = np.asarray(axis_hkl, dtype=np.float64)
    Gm = np.asarray(G, dtype=np.float64)
    hgp = np.einsum("rni,ij,j->rn", H, Gm, P)
    hgh = np.einsum("rni,ij,rnj->rn", H, Gm, H)
    pgp = P @ Gm @ P
    cos2 = np.clip(hgp**2 / (hgh * pgp), 0.0, 1.0)
    sin2 = 1.0 - cos2
    r = float(ratio)
    base = r * r * cos2 + sin2 / r
    po = np.mean(base**-1.5, axis=1)
    dpo = np.mean(-1.5 * base**-2.5 * (2 * r * cos2 - sin2 / (r * r)), axis=1)
    return po, dpo


# --------------------------------------------------------------------------------------------
# background
# --------------------------------------------------------------------------------------------
def chebyshev_design_matrix(x_deg: ArrayLike, n_terms: int, x0: float,
                            xn: float) -> NDArray[np.float64]:
    """Design matrix (npts, n_terms) of GSAS-II 'chebyschev-1': column n = T_n(t) (doc section 5).

    t = −1 + 2(x − x₀)/(x_N − x₀), x₀/x_N = first/last point of the refined-limits slice.
    """
    t = -1.0 + 2.0 * (np.asarray(x_deg, dtype=np.float64) - x0) / (xn - x0)
    return np.polynomial.chebyshev.chebvander(t, n_terms - 1)


def chebyshev_background(x_deg: ArrayLike, coeffs: ArrayLike, x0: float,
                         xn: float) -> NDArray[np.float64]:
    """GSAS-II 'chebyschev-1' background Σ B_n T_n(t) (doc section 5); see :func:`chebyshev_design_matrix`."""
    c = np.asarray(coeffs, dtype=np.float64)
    return chebyshev_design_matrix(x_deg, c.size, x0, xn) @ c


# --------------------------------------------------------------------------------------------
# whole pattern
# --------------------------------------------------------------------------------------------
#: The per-peak pieces of a :class:`PeakSum` with derivatives, in the order of its ``pieces``.
PIECES = ("d_intensity", "d_pos", "d_sig2", "d_gam", "d_shl")


@dataclass(frozen=True)
class PeakSum:
    """Σ_h I_h Ω_h(x) and the per-peak pieces for the Jacobian (from :func:`pattern`).

    y : (npts,) float64 — peak sum (no background).
    lo, hi : (npk,) int64 — each peak's point range [lo, hi) (union of Kα1/Kα2 windows; empty
        when the peak is outside the data).
    offsets : (npk+1,) int64 — peak p's per-point pieces are ``piece[offsets[p]:offsets[p+1]]``
        and belong to points ``lo[p] .. hi[p]-1``.
    d_intensity : ∂y/∂I_p = Ω₁ + k·Ω₂ (per centidegree).
    d_pos, d_sig2, d_gam, d_shl : ∂y/∂2θ_p (per deg), ∂y/∂σ²_p, ∂y/∂γ_p, ∂y/∂SH/L (this peak's
        share; sum over peaks for the global SH/L). ``None`` unless ``derivatives=True``.
    pieces : (5, n_entries) — the five pieces stacked in the order of :data:`PIECES` (the
        fields above are its rows), or ``None`` unless ``derivatives=True``.
    """

    y: NDArray[np.float64]
    lo: NDArray[np.int64]
    hi: NDArray[np.int64]
    offsets: NDArray[np.int64]
    d_intensity: NDArray[np.float64]
    d_pos: NDArray[np.float64] | None
    d_sig2: NDArray[np.float64] | None
    d_gam: NDArray[np.float64] | None
    d_shl: NDArray[np.float64] | None
    pieces: NDArray[np.float64] | None = None

    def entry_points(self) -> NDArray[np.int64]:
        """Data-point index of every entry of the concatenated per-peak pieces."""
        n = self.hi - self.lo
        return np.arange(self.offsets[-1]) + np.repeat(self.lo - self.offsets[:-1], n)

    def project(self, coefs: dict[str, NDArray]) -> NDArray[np.float64]:
        """Jacobian (npts, k) of y for k parameters: Σ_p piece_p(x) · coef[p, :] over the given
        pieces, where ``coefs`` maps piece names ('d_intensity', 'd_pos', 'd_sig2', 'd_gam',
        'd_shl') to (npk, k) derivatives of the peaks' I, 2θ, σ², γ, SH/L by the parameters.
        Each peak's block only touches its own window's points."""
        names = list(coefs)
        k = coefs[names[0]].shape[1] if names else 0
        out = np.zeros((k, self.y.size))
        if not names or not k or not self.offsets[-1]:
            return out.T
        if tuple(names) == PIECES and self.pieces is not None:
            pieces = self.pieces                # all five, in their stacked order: no copy
        else:
            for name in names:
                if getattr(self, name) is None:
                    raise ValueError(f"{name} was not computed; call pattern(..., derivatives=True)")
            pieces = np.stack([getattr(self, name) for name in names])
        coef = np.ascontiguousarray(np.stack([coefs[n] for n in names]), dtype=np.float64)
        kernels = _numpy_kernels if _numpy_tier_open() else _compiled()
        kernels.project(self.lo, self.offsets, pieces, coef, out)
        return out.T

    def dense(self, name: str) -> NDArray[np.float64]:
        """Piece ``name`` ('d_intensity', 'd_pos', …) as a dense (npk, npts) array."""
        piece = getattr(self, name)
        if piece is None:
            raise ValueError(f"{name} was not computed; call pattern(..., derivatives=True)")
        out = np.zeros((self.lo.size, self.y.size))
        for p in range(self.lo.size):
            out[p, self.lo[p]:self.hi[p]] = piece[self.offsets[p]:self.offsets[p + 1]]
        return out


def kalpha2_position_deg(tth_deg: ArrayLike, lam1_a: float,
                         lam2_a: float) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """GSAS-II's Kα2 position 2θ₂ = 2θ₁ + (360/π)(Δλ/λ₁) tan(θ₁) and ∂2θ₂/∂2θ₁."""
    tth = np.asarray(tth_deg, dtype=np.float64)
    lam_ratio = 360.0 * (lam2_a - lam1_a) / (math.pi * lam1_a)
    half = np.radians(tth) / 2.0
    return tth + lam_ratio * np.tan(half), 1.0 + lam_ratio * (math.pi / 360.0) / np.cos(half) ** 2


def pattern(x_deg: ArrayLike, tth_peak_deg: ArrayLike, sig2: ArrayLike, gam: ArrayLike,
            intensity: ArrayLike, shl: float, *, lam1_a: float | None = None,
            lam2_a: float | None = None, i_ratio: float = 0.0, derivatives: bool = False,
            precision: Precision = "float32") -> PeakSum:
    """Sum of FCJ pseudo-Voigt peaks over a 2θ grid within GSAS-II's windows (doc section 2).

    y(x) = Σ_p I_p Ω_p(x) (+ I_p·k·Ω_p at the Kα2 position when ``lam2_a`` and ``i_ratio`` are
    given, with the same σ²/γ, as GSAS-II does). A peak contributes only on lo <= x < hi of
    :func:`peak_window`; windows with fewer than 2 points contribute nothing. Unlike GSAS-II,
    a peak whose window falls into a data gap is skipped instead of ending the loop (identical
    results for gap-free data).

    Parameters
    ----------
    x_deg : (npts,) sorted 2θ (deg) — the data inside the refinement limits.
    tth_peak_deg, sig2, gam, intensity : (npk,) — corrected 2θ_h (deg), σ² (centideg²),
        γ (centideg), integrated intensity I_h = refl[11]·|F|² (counts·centideg).
    shl : SH/L (floored at 0.002).
    lam1_a, lam2_a, i_ratio : Kα1/Kα2 doublet (Lam1, Lam2, I(L2)/I(L1)); positions are Kα1.
    derivatives : also return the per-peak derivative pieces.
    precision : see module docstring.
    """
    x = np.ascontiguousarray(x_deg, dtype=np.float64)
    pos1 = np.atleast_1d(np.asarray(tth_peak_deg, dtype=np.float64))
    # per-peak arrays for the kernels: C-contiguous, writable float64 (one numba signature)
    s2, gm, inten = (_kernel_array(a, pos1.shape) for a in (sig2, gam, intensity))
    shl_eff = max(float(shl), SHL_MIN)
    doublet = lam2_a is not None and i_ratio != 0.0
    if doublet:
        if lam1_a is None:
            raise ValueError("lam1_a is required with lam2_a (Kα doublet)")
        pos2, dpos2 = kalpha2_position_deg(pos1, lam1_a, lam2_a)
        pos = np.concatenate([pos1, pos2])
        s2a, gma = np.concatenate([s2, s2]), np.concatenate([gm, gm])
        ratio = np.concatenate([np.ones_like(pos1), np.full_like(pos1, i_ratio)])
        pos_fac = np.concatenate([np.ones_like(pos1), dpos2])
    else:
        pos, s2a, gma, ratio = pos1, s2, gm, np.ones_like(pos1)
        pos_fac = ratio
    lo_deg, hi_deg = peak_window(pos, s2a, gma, shl_eff)
    ilo, ihi = window_indices(x, lo_deg, hi_deg)
    ihi = np.maximum(ihi, ilo)
    ihi = np.where(ihi - ilo >= 2, ihi, ilo)
    npk = pos1.size
    if doublet:
        lo2, hi2 = ilo[npk:], ihi[npk:]
        lo1, hi1 = ilo[:npk], ihi[:npk]
        has1, has2 = hi1 > lo1, hi2 > lo2
        lo = np.where(has1 & has2, np.minimum(lo1, lo2), np.where(has1, lo1, lo2))
        hi = np.where(has1 & has2, np.maximum(hi1, hi2), np.where(has1, hi1, hi2))
        lo = np.where(has1 | has2, lo, 0)
        hi = np.where(has1 | has2, hi, 0)
        lo_all = np.concatenate([lo, lo])
    else:
        lo, hi = ilo, ihi
        lo_all = lo
    lo, hi = lo.astype(np.int64, copy=False), hi.astype(np.int64, copy=False)
    offsets = np.zeros(npk + 1, dtype=np.int64)
    np.cumsum(hi - lo, out=offsets[1:])
    # sub-peak s writes into its parent's slot, shifted by its own start within the union
    parent_off = np.concatenate([offsets[:-1]] * (2 if doublet else 1))
    sub_off = parent_off + (ilo - lo_all)
    ftype, xp, wp = _tables(precision)
    buf = np.zeros((5 if derivatives else 1, offsets[-1]), dtype=np.float64)
    args = (x, pos, s2a, gma, shl_eff, xp, wp, ilo.astype(np.int64, copy=False),
            ihi.astype(np.int64, copy=False), sub_off.astype(np.int64, copy=False), ratio,
            pos_fac, bool(derivatives), buf)
    if precision == "float64" and _numpy_tier_open():
        with np.errstate(all="ignore"):     # numba's kernels make nan/inf silently too
            used = _numpy_kernels.peaks_f64(
                *args, max_work=min(_numpy_tier["left"], NUMPY_TIER_MAX_CALL))
        # a call too large for the numpy kernels: loading numba costs less than staying
        _numpy_tier["left"] = _numpy_tier["left"] - used if used >= 0 else 0
        if used >= 0:
            y = _numpy_kernels.accumulate(lo, offsets, inten, buf[0], x.size)
            return _peak_sum(y, lo, hi, offsets, inten, buf, shl, derivatives)
    kernels = _compiled()
    (kernels.peaks_f64 if ftype is np.float64 else kernels.peaks_f32)(*args)
    y = np.zeros(x.size)
    kernels.accumulate(lo, offsets, inten, buf[0], y)
    return _peak_sum(y, lo, hi, offsets, inten, buf, shl, derivatives)


def _kernel_array(a: ArrayLike, shape: tuple[int, ...]) -> NDArray[np.float64]:
    """``a`` as the kernels take it: C-contiguous writable float64 of ``shape`` (broadcast), as
    it is when it is one already (the kernels only read it)."""
    if isinstance(a, np.ndarray) and a.dtype == np.float64 and a.shape == shape \
            and a.flags.c_contiguous and a.flags.writeable:
        return a
    return np.require(np.broadcast_to(np.asarray(a, dtype=np.float64), shape),
                      requirements=("C", "W"))


def _peak_sum(y, lo, hi, offsets, inten, buf, shl, derivatives) -> PeakSum:
    """The :class:`PeakSum` of :func:`pattern` from the kernels' per-peak pieces ``buf``."""
    if not derivatives:
        return PeakSum(y=y, lo=lo, hi=hi, offsets=offsets, d_intensity=buf[0], d_pos=None,
                       d_sig2=None, d_gam=None, d_shl=None)
    buf[1:] *= np.repeat(inten, hi - lo)     # the derivatives of I·Ω: rows 1.. times I
    if shl < SHL_MIN:
        buf[4] = 0.0                            # the floor holds SH/L
    return PeakSum(y=y, lo=lo, hi=hi, offsets=offsets, d_intensity=buf[0], d_pos=buf[1],
                   d_sig2=buf[2], d_gam=buf[3], d_shl=buf[4], pieces=buf)
