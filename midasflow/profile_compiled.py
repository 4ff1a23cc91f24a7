"""numba kernels of the GSAS-II profile (the compiled tier of :mod:`midasflow.profile`).

Imported only when a caller needs them (GSAS-II's REAL*4 arithmetic, ``precision="float32"``;
the single-peak functions; float64 patterns once the first-use budget of
:mod:`midasflow.profile_numpy` is spent or a call is too large for it): importing numba and
setting up its CPU target costs about 0.5 s of CPU in a new process, most of a one-pattern
user's wait, so :mod:`midasflow.profile` does not import this module before then.

Every kernel takes the float type F (np.float32 emulates GSAS-II's REAL*4, np.float64 runs the
same algorithm in double precision) and casts each literal with it, so one source serves both
precisions and numba caches one specialisation per type.
"""
from __future__ import annotations

import math

import numba
import numpy as np

from midasflow.profile_constants import COFN as _COFN
from midasflow.profile_constants import COFT as _COFT
from midasflow.profile_constants import EXP_FLOOR as _EXP_FLOOR
from midasflow.profile_constants import FSTTERM as _FSTTERM
from midasflow.profile_constants import GAUSS_FLOOR_DX2 as _GAUSS_FLOOR_DX2
from midasflow.profile_constants import NTERMS as _NTERMS
from midasflow.profile_constants import PI_LORENTZ as _PI_LORENTZ
from midasflow.profile_constants import RPD as _RPD
from midasflow.profile_constants import SQ2PI as _SQ2PI
from midasflow.profile_constants import STOFW as _STOFW


@numba.njit(cache=True)
def _gauleg_into(n, eps, xp, wp, first, F):
    """Positive half of the n-point Gauss-Legendre rule (NR ``gauleg``), ascending nodes, into
    xp/wp[first:first + n/2]. (Written into preallocated arrays: returning fresh arrays of a
    dtype given by the class F took ~4 s of numba compilation.)"""
    half = n // 2
    one = F(1.0)
    for i in range(1, (n + 1) // 2 + 1):
        z = F(math.cos(F(3.141592654) * (F(i) - F(0.25)) / (F(n) + F(0.5))))
        z1 = F(0.0)
        pp = one
        while abs(z - z1) > F(eps):
            p1 = one
            p2 = F(0.0)
            for j in range(1, n + 1):
                p3 = p2
                p2 = p1
                p1 = ((F(2.0) * F(j) - one) * z * p2 - (F(j) - one) * p3) / F(j)
            pp = F(n) * (z * p1 - p2) / (z * z - one)
            z1 = z
            z = z1 - p1 / pp
        # x(n+1-i) = +z is the (half - i)-th positive node in ascending order
        xp[first + half - i] = z
        wp[first + half - i] = F(2.0) / ((one - z * z) * pp * pp)


# GSAS-II's REAL*4 PSVFCJO quadrature tables, positive halves packed at _FSTTERM offsets (the
# float64 tables are computed with numpy: midasflow.profile_numpy.gauss_legendre_f64)
@numba.njit(cache=True)
def tables_f32(xp, wp, nterms, fstterm):
    for t in range(nterms.size):
        _gauleg_into(nterms[t], 3.0e-7, xp, wp, fstterm[t], np.float32)


@numba.njit(cache=True)
def tch_widths(sig, gam, F):
    """PSVOIGT's per-(σ², γ) part: total FWHM Γ, η and the pieces of their derivatives."""
    sqsg = max(F(math.sqrt(sig)), F(0.001))
    fwhg = F(_STOFW) * sqsg
    pgl = fwhg * fwhg * fwhg * fwhg * fwhg
    sumhm = pgl
    dsdl = F(0.0)
    dsdg = F(0.0)
    for itrm in range(1, 6):
        pgl = pgl / fwhg
        dsdl = dsdl + F(itrm) * F(_COFT[itrm]) * pgl
        dsdg = dsdg + F(6 - itrm) * F(_COFT[itrm - 1]) * pgl
        pgl = pgl * gam
        sumhm = sumhm + F(_COFT[itrm]) * pgl
    fwhm = F(math.exp(F(0.2) * F(math.log(sumhm))))
    frac = gam / fwhm
    dedf = F(0.0)
    pf = F(1.0)
    eta = F(0.0)
    for itrm in range(1, 4):
        dedf = dedf + F(itrm) * F(_COFN[itrm - 1]) * pf
        pf = pf * frac
        eta = eta + F(_COFN[itrm - 1]) * pf
    return fwhm, eta, frac, dedf, dsdg, dsdl, sumhm, sqsg


@numba.njit(cache=True)
def _pv_constants(fwhm, F):
    """Per-peak constants of :func:`_psvoigt`: 2Γ/π (the Lorentzian's numerator, 0 when PSVOIGT
    switches it off), σ_p² = (Γ/2.355)², the dx² beyond which the Gaussian exponent is clamped,
    and the clamped Gaussian (each computed in PSVOIGT's operation order)."""
    stofw = F(_STOFW)
    ctl = F(2.0) * fwhm / F(_PI_LORENTZ) if abs(fwhm) > F(5.0e-6) else F(0.0)
    sigp = (fwhm / stofw) * (fwhm / stofw)
    tg_floor = stofw * F(_EXP_FLOOR) / (F(_SQ2PI) * fwhm)
    return ctl, sigp, F(_GAUSS_FLOOR_DX2) * sigp, tg_floor


@numba.njit(cache=True)
def _psvoigt(dx, fwhm, eta, ctl, sigp, dx2_floor, tg_floor, deriv, F):
    """TCH pseudo-Voigt at dx (centideg) (PSVOIGT + LORENTZ); ctl … tg_floor from
    :func:`_pv_constants`. With ``deriv`` also ∂/∂dx and the two terms ``(tl − tg,
    η ∂tl/∂Γ + ∂tg/∂Γ·…)`` that :func:`_pv_chain` turns into ∂/∂σ² and ∂/∂γ."""
    stofw = F(_STOFW)
    one = F(1.0)
    half = F(0.5)
    denom = fwhm * fwhm + F(4.0) * dx * dx
    tl = ctl / denom
    if dx * dx > dx2_floor:
        # far tail: −½dx²/σ² is below −20 by far more than rounding, so PSVOIGT's exponent is
        # clamped there; the division and exp are skipped (same value, most points of a window)
        ex = F(-20.0)
        tg = tg_floor
    else:
        ex = max(F(-20.0), -half * dx * dx / sigp)
        tg = stofw * F(math.exp(ex)) / (F(_SQ2PI) * fwhm)
    func = eta * tl + (one - eta) * tg
    if not deriv:
        return func, F(0.0), F(0.0), F(0.0)
    # derivatives: reciprocals instead of PSVOIGT's divisions (an ulp apart, not its values)
    rden = one / denom
    if ctl != F(0.0):
        dtldt = F(-8.0) * dx * tl * rden
        dtldfw = (F(8.0) * dx * dx - F(2.0) * fwhm * fwhm) * rden * rden * F(1.0 / _PI_LORENTZ)
    else:
        dtldt = F(0.0)
        dtldfw = F(0.0)
    ts = F(-2.0) * (one - eta) * tg * (ex + half) * (one / fwhm)
    dfdx = eta * dtldt - (one - eta) * tg * dx * (one / sigp)
    return func, dfdx, tl - tg, eta * dtldfw + ts


@numba.njit(cache=True)
def _pv_chain(fwhm, frac, dedf, dsdg, dsdl, sumhm, sqsg, F):
    """Per-peak factors (a_s, b_s, a_g, b_g): ∂PV/∂σ² = a_s·(tl − tg) + b_s·(η∂tl/∂Γ + …) and
    ∂PV/∂γ = a_g·(…) + b_g·(…) (PSVOIGT's chain through Γ and η)."""
    one = F(1.0)
    dfwdg = F(0.2) * dsdg * fwhm / sumhm
    dfrdg = -frac * dfwdg / fwhm
    ks = F(0.5) * F(_STOFW) / sqsg
    dfwdl = F(0.2) * dsdl * fwhm / sumhm
    dfrdl = (one - frac * dfwdl) / fwhm
    return ks * dedf * dfrdg, ks * dfwdg, dedf * dfrdl, dfwdl


@numba.njit(cache=True)
def pv_array(delta_cdeg, sig, gam, deriv, F):
    n = delta_cdeg.size
    out = np.zeros((4, n), dtype=np.float64)
    fwhm, eta, frac, dedf, dsdg, dsdl, sumhm, sqsg = tch_widths(F(sig), F(gam), F)
    ctl, sigp, dx2_floor, tg_floor = _pv_constants(fwhm, F)
    a_s, b_s, a_g, b_g = _pv_chain(fwhm, frac, dedf, dsdg, dsdl, sumhm, sqsg, F)
    for i in range(n):
        f, dfdx, d_tl_tg, d_fw = _psvoigt(F(delta_cdeg[i]), fwhm, eta, ctl, sigp, dx2_floor,
                                          tg_floor, deriv, F)
        out[0, i] = f
        out[1, i] = dfdx
        out[2, i] = a_s * d_tl_tg + b_s * d_fw
        out[3, i] = a_g * d_tl_tg + b_g * d_fw
    return out


@numba.njit(cache=True)
def fcj_core(x, lo, hi, tth, sig_in, gam_in, shl_in, xp, wp, deriv, scale, pos_fac, out, off,
              F):
    """Add scale·Ω(x[i]) (and derivatives) for i in [lo, hi) to out[:, off + i - lo].

    Follows PSVFCJO (psvfcjo.for) with A = B = SH/L/2. out rows: 0 Ω, 1 dΩ/d2θ_h (per degree,
    times pos_fac), 2 dΩ/dσ², 3 dΩ/dγ, 4 dΩ/d(SH/L_eff). Derivatives differentiate the node
    positions δ_k(2θ_h, SH/L) and FCJ weights analytically for the selected node count.
    """
    one = F(1.0)
    zero = F(0.0)
    half = F(0.5)
    two = F(2.0)
    hundred = F(100.0)
    rpd = F(_RPD)
    sig = F(sig_in)
    gam = F(gam_in)
    ttheta = F(tth) * hundred
    tthetad = F(0.01) * ttheta
    s2t = F(math.sin(tthetad * rpd))
    c2t = F(math.cos(tthetad * rpd))
    s2t2 = s2t * s2t
    c2t2 = c2t * c2t
    a_half = F(shl_in) / two
    apb = a_half + a_half
    tmp2 = one + apb * apb
    einfl = F(math.acos(min(one, max(-one, c2t)))) / rpd
    u = F(math.sqrt(tmp2)) * c2t
    demin_dt = zero
    demin_da = zero
    if abs(u) <= one:
        emin = F(math.acos(min(one, max(-one, u)))) / rpd
        one_m_u2 = one - u * u
        if one_m_u2 > zero:
            root = F(math.sqrt(one_m_u2))
            demin_dt = F(math.sqrt(tmp2)) * s2t / root
            demin_da = -apb * c2t / (F(math.sqrt(tmp2)) * root) / rpd
    elif u > zero:
        emin = zero
    else:
        emin = F(180.0)
    tmp = abs(tthetad - emin)
    if gam <= zero:
        k = int(tmp * F(200.0))
    else:
        k = int(F(300.0) * tmp / gam)
    arraynum = 0
    while arraynum < _NTERMS.size - 1 and k > _NTERMS[arraynum]:
        arraynum += 1
    first = _FSTTERM[arraynum]
    nh = _NTERMS[arraynum] // 2
    # per-node quantities (independent of the data point)
    d100 = np.empty(nh, dtype=F)
    wg = np.empty(nh, dtype=F)
    wdel_dt = np.zeros(nh, dtype=F)     # w_k·100·∂δ_k/∂2θ (the PV argument's shift)
    wdel_da = np.zeros(nh, dtype=F)
    dwg_dt = np.zeros(nh, dtype=F)
    dwg_da = np.zeros(nh, dtype=F)
    sumwg = zero
    sum_dwg_dt = zero
    sum_dwg_da = zero
    sgn = one if c2t >= zero else -one
    for kk in range(nh):
        xk = xp[first + kk]
        delta = emin + (tthetad - emin) * xk
        d100[kk] = delta * hundred
        sind = F(math.sin(delta * rpd))
        cosd = F(math.cos(delta * rpd))
        rcos = one / cosd
        tt = s2t2 - sind * sind
        if ttheta > F(4500.0):
            tt = cosd * cosd - c2t2
        if tt > zero:
            rs = one / F(math.sqrt(tt))
            ff = abs(c2t) * rs
        else:
            rs = zero
            ff = one
        if abs(delta - emin) > abs(einfl - emin):
            g = two * a_half * ff * rcos
        else:
            g = (-one + apb * ff) * rcos
        wg[kk] = wp[first + kk] * g
        sumwg = sumwg + wg[kk]
        if deriv:
            ddt = (one - xk) * demin_dt + xk
            dda = (one - xk) * demin_da
            wdel_dt[kk] = wg[kk] * hundred * ddt
            wdel_da[kk] = wg[kk] * hundred * dda
            # T = sin²2θ − sin²δ:  dT = 2 s c RPD d2θ − 2 sinδ cosδ RPD dδ
            dt_dt = two * s2t * c2t * rpd - two * sind * cosd * rpd * ddt
            dt_da = -two * sind * cosd * rpd * dda
            df_dt = (-sgn * s2t * rpd * rs - half * abs(c2t) * rs * rs * rs * dt_dt) if tt > zero \
                else zero
            df_da = -half * abs(c2t) * rs * rs * rs * dt_da if tt > zero else zero
            tand = sind * rcos
            dwg_dt[kk] = wp[first + kk] * (apb * df_dt * rcos + g * tand * rpd * ddt)
            dwg_da[kk] = wp[first + kk] * ((ff + apb * df_da) * rcos + g * tand * rpd * dda)
            sum_dwg_dt += dwg_dt[kk]
            sum_dwg_da += dwg_da[kk]
    rsumwg = one / sumwg
    fwhm, eta, frac, dedf, dsdg, dsdl, sumhm, sqsg = tch_widths(sig, gam, F)
    ctl, sigp, dx2_floor, tg_floor = _pv_constants(fwhm, F)
    a_s, b_s, a_g, b_g = _pv_chain(fwhm, frac, dedf, dsdg, dsdl, sumhm, sqsg, F)
    for i in range(lo, hi):
        base = F(x[i] - tth) * hundred + ttheta
        sumwrg = zero
        s_t = zero
        s_a = zero
        s_d = zero
        s_f = zero
        for kk in range(nh):
            r, drdx, d_tl_tg, d_fw = _psvoigt(base - d100[kk], fwhm, eta, ctl, sigp, dx2_floor,
                                              tg_floor, deriv, F)
            sumwrg = sumwrg + wg[kk] * r
            if deriv:
                # the PV argument moves by −100 dδ at fixed x
                s_t += dwg_dt[kk] * r - wdel_dt[kk] * drdx
                s_a += dwg_da[kk] * r - wdel_da[kk] * drdx
                s_d += wg[kk] * d_tl_tg
                s_f += wg[kk] * d_fw
        prf = sumwrg * rsumwg
        j = off + i - lo
        out[0, j] += scale * prf
        if deriv:
            out[1, j] += scale * pos_fac * (s_t - prf * sum_dwg_dt) * rsumwg
            out[2, j] += scale * (a_s * s_d + b_s * s_f) * rsumwg
            out[3, j] += scale * (a_g * s_d + b_g * s_f) * rsumwg
            out[4, j] += scale * (s_a - prf * sum_dwg_da) * rsumwg


@numba.njit(cache=True)
def _peaks_kernel(x, pos, sig2, gam, shl, xp, wp, lo, hi, off, scale, pos_fac, deriv, out, F):
    """Evaluate every (sub)peak p on x[lo[p]:hi[p]] into out[:, off[p]:...]."""
    for p in range(pos.size):
        if hi[p] - lo[p] >= 2:
            fcj_core(x, lo[p], hi[p], pos[p], sig2[p], gam[p], shl, xp, wp, deriv, scale[p],
                      pos_fac[p], out, off[p], F)


# one entry point per precision: numba types a class argument (F) slowly on every call
@numba.njit(cache=True)
def peaks_f32(x, pos, sig2, gam, shl, xp, wp, lo, hi, off, scale, pos_fac, deriv, out):
    _peaks_kernel(x, pos, sig2, gam, shl, xp, wp, lo, hi, off, scale, pos_fac, deriv, out,
                  np.float32)


@numba.njit(cache=True)
def peaks_f64(x, pos, sig2, gam, shl, xp, wp, lo, hi, off, scale, pos_fac, deriv, out):
    _peaks_kernel(x, pos, sig2, gam, shl, xp, wp, lo, hi, off, scale, pos_fac, deriv, out,
                  np.float64)



@numba.njit(cache=True)
def accumulate(lo, offsets, intensity, values, y):
    """y[lo[p] + j] += intensity[p]·values[offsets[p] + j] over every peak's entries."""
    for p in range(lo.size):
        base = lo[p] - offsets[p]
        for e in range(offsets[p], offsets[p + 1]):
            y[base + e] += intensity[p] * values[e]


@numba.njit(cache=True)
def project(lo, offsets, pieces, coef, out):
    """out[c, lo[p] + j] += Σ_r pieces[r, offsets[p] + j]·coef[r, p, c] (see PeakSum.project);
    parameter columns with an all-zero coefficient row for a peak are skipped."""
    n_rows, _, k = coef.shape
    for p in range(lo.size):
        base = lo[p] - offsets[p]
        for r in range(n_rows):
            for c in range(k):
                cf = coef[r, p, c]
                if cf != 0.0:
                    for e in range(offsets[p], offsets[p + 1]):
                        out[c, base + e] += pieces[r, e] * cf
