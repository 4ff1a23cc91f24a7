"""numpy kernels of the GSAS-II profile in float64: the first-use tier of :mod:`midasflow.profile`.

The same algorithm as the float64 specialisation of :mod:`midasflow.profile_compiled`, vectorised
over peaks, points and quadrature nodes, in the same operation order (sums run left to right as
the scalar loops add) and with the C library's ``exp``/``log``/``sin``/``cos``/``acos`` (Python's
``math``, which numba's compiled code also calls), so both tiers give bit-identical results.
A new process can refine a first pattern without importing numba, whose import and CPU-target
set-up cost about 0.5 s of CPU. These kernels are 10-20 times slower than the compiled ones;
:mod:`midasflow.profile` uses them only while a process has done little profile work (see
``midasflow.profile.NUMPY_TIER_BUDGET``).
"""
from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from midasflow.profile_constants import (COFN, COFT, EXP_FLOOR, FSTTERM, GAUSS_FLOOR_DX2, NTERMS,
                                         PI_LORENTZ, RPD, SQ2PI, STOFW)

#: numpy work of one call of :func:`peaks_f64` beside its per-point-and-node elements, in those
#: elements (its ~100 array operations cost ~5 µs each whatever the size; an element costs
#: ~0.15 µs without derivatives, twice that with them)
CALL_OVERHEAD_ELEMENTS = 7000


def _libm(fn, np_fn):
    """``fn`` of ``math`` applied elementwise (float64 in, float64 out): numpy's own vectorised
    exp/acos round differently from the C library in ~5 % of arguments. Where ``math`` refuses
    an argument (log of a negative, exp overflowing, sin of inf) the C library returns nan or
    inf, as ``np_fn`` does: the call is then made with ``np_fn``."""
    ufunc = np.frompyfunc(fn, 1, 1)

    def apply(a):
        try:
            return ufunc(a).astype(np.float64)
        except (ValueError, OverflowError):
            with np.errstate(all="ignore"):
                return np_fn(a)
    return apply


_exp, _log, _sin, _cos, _acos = (_libm(f, g) for f, g in (
    (math.exp, np.exp), (math.log, np.log), (math.sin, np.sin), (math.cos, np.cos),
    (math.acos, np.arccos)))


def gauss_legendre_f64() -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """PSVFCJO's Gauss–Legendre tables in float64: for every N in ``NTERMS`` the positive half of
    the N-point rule (Numerical Recipes' ``gauleg``: Newton from cos(π(i − ¼)/(N + ½)) until two
    iterates differ by ≤ 3e-14), ascending, packed at ``FSTTERM`` offsets. Every root of every
    table is iterated at once; a converged root keeps its value, as the scalar loop stops there."""
    n_root = np.repeat(NTERMS, NTERMS // 2)                 # ascending, as the tables are packed
    i_root = np.concatenate([np.arange(1, n // 2 + 1) for n in NTERMS])
    n_f, i_f = n_root.astype(np.float64), i_root.astype(np.float64)
    z = _cos(3.141592654 * (i_f - 0.25) / (n_f + 0.5))
    z1 = np.zeros_like(z)
    pp = np.ones_like(z)
    # the Legendre recurrence's step j runs on the roots of the tables with N >= j: a suffix
    from_j = np.searchsorted(n_root, np.arange(1, NTERMS[-1] + 1), side="left")
    active = np.abs(z - z1) > 3.0e-14
    while active.any():
        p1, p2 = np.ones_like(z), np.zeros_like(z)
        for j in range(1, int(NTERMS[-1]) + 1):
            s = from_j[j - 1]
            p3 = p2[s:].copy()
            p2[s:] = p1[s:]
            p1[s:] = ((2.0 * j - 1.0) * z[s:] * p2[s:] - (j - 1.0) * p3) / j
        pp_new = n_f * (z * p1 - p2) / (z * z - 1.0)
        pp = np.where(active, pp_new, pp)
        z1 = np.where(active, z, z1)
        z = np.where(active, z - p1 / pp_new, z)
        active &= np.abs(z - z1) > 3.0e-14
    slot = np.repeat(FSTTERM, NTERMS // 2) + n_root // 2 - i_root
    xp, wp = np.empty_like(z), np.empty_like(z)
    xp[slot] = z
    wp[slot] = 2.0 / ((1.0 - z * z) * pp * pp)
    return xp, wp


def tch_widths(sig: NDArray[np.float64], gam: NDArray[np.float64]) -> tuple[NDArray, ...]:
    """PSVOIGT's per-(σ², γ) part for arrays: (Γ, η, γ/Γ, ∂η/∂(γ/Γ), ∂ΣΓ⁵/∂fwhg, ∂ΣΓ⁵/∂γ, ΣΓ⁵,
    σ) as :func:`midasflow.profile_compiled.tch_widths` computes them in float64."""
    sqsg = np.maximum(np.sqrt(sig), 0.001)
    fwhg = STOFW * sqsg
    pgl = fwhg * fwhg * fwhg * fwhg * fwhg
    sumhm = pgl
    dsdl = np.zeros_like(pgl)
    dsdg = np.zeros_like(pgl)
    for itrm in range(1, 6):
        pgl = pgl / fwhg
        dsdl = dsdl + float(itrm) * COFT[itrm] * pgl
        dsdg = dsdg + float(6 - itrm) * COFT[itrm - 1] * pgl
        pgl = pgl * gam
        sumhm = sumhm + COFT[itrm] * pgl
    fwhm = _exp(0.2 * _log(sumhm))
    frac = gam / fwhm
    dedf = np.zeros_like(pgl)
    pf = np.ones_like(pgl)
    eta = np.zeros_like(pgl)
    for itrm in range(1, 4):
        dedf = dedf + float(itrm) * COFN[itrm - 1] * pf
        pf = pf * frac
        eta = eta + COFN[itrm - 1] * pf
    return fwhm, eta, frac, dedf, dsdg, dsdl, sumhm, sqsg


def _row_sums(a: NDArray[np.float64]) -> NDArray[np.float64]:
    """Sums along axis 1 added left to right from 0.0 (np.sum adds pairwise, the scalar loops do
    not); one column: 0.0 + a, which turns −0.0 into 0.0 as the loop's first addition does."""
    if a.shape[1] == 1:
        return a[:, 0] + 0.0
    return np.cumsum(a, axis=1)[:, -1]


def peaks_f64(x, pos, sig2, gam_in, shl, xp, wp, lo, hi, off, scale, pos_fac, deriv, out,
              max_work: int) -> int:
    """:func:`midasflow.profile_compiled.peaks_f64`: every (sub)peak p with ≥ 2 points adds
    scale[p]·Ω_p(x[lo[p]:hi[p]]) (and derivative rows) to out[:, off[p]:…], out all zeros.

    Returns the call's work, or −1 without touching ``out`` when it exceeds ``max_work``. Work is
    counted in elements: points × the largest quadrature node count among the peaks (twice that
    with derivatives) plus ``CALL_OVERHEAD_ELEMENTS``.
    """
    keep = hi - lo >= 2
    tth, sig, gam = pos[keep], sig2[keep], gam_in[keep]
    lo, hi, off, scale, pos_fac = lo[keep], hi[keep], off[keep], scale[keep], pos_fac[keep]
    n_pts = hi - lo
    rpd = RPD
    # per peak (fcj_core's set-up)
    ttheta = tth * 100.0
    tthetad = 0.01 * ttheta
    s2t = _sin(tthetad * rpd)
    c2t = _cos(tthetad * rpd)
    s2t2 = s2t * s2t
    c2t2 = c2t * c2t
    a_half = shl / 2.0
    apb = a_half + a_half
    sq_tmp2 = math.sqrt(1.0 + apb * apb)
    einfl = _acos(np.clip(c2t, -1.0, 1.0)) / rpd
    u = sq_tmp2 * c2t
    inside = np.abs(u) <= 1.0
    emin = np.where(inside, _acos(np.clip(u, -1.0, 1.0)) / rpd, np.where(u > 0.0, 0.0, 180.0))
    one_m_u2 = 1.0 - u * u
    has_root = inside & (one_m_u2 > 0.0)
    root = np.sqrt(np.where(has_root, one_m_u2, 1.0))
    demin_dt = np.where(has_root, sq_tmp2 * s2t / root, 0.0)
    demin_da = np.where(has_root, -apb * c2t / (sq_tmp2 * root) / rpd, 0.0)
    tmp = np.abs(tthetad - emin)
    k = np.where(gam <= 0.0, tmp * 200.0, 300.0 * tmp / np.where(gam <= 0.0, 1.0, gam))
    with np.errstate(invalid="ignore"):       # a nan width takes the first table, as in numba
        k_int = np.trunc(np.minimum(k, 1e9)).astype(np.int64)
    table = np.minimum(np.searchsorted(NTERMS, k_int, "left"), NTERMS.size - 1)
    nh = NTERMS[table] // 2
    n_nodes = int(nh.max()) if nh.size else 0
    work = int(n_pts.sum()) * n_nodes * (2 if deriv else 1) + CALL_OVERHEAD_ELEMENTS
    if work > max_work:
        return -1
    if not nh.size:
        return work
    # per node, padded to the largest node count (padding has weight 0: adds exact zeros)
    kk = np.arange(n_nodes)
    valid = kk[None, :] < nh[:, None]
    node = np.where(valid, FSTTERM[table][:, None] + kk[None, :], FSTTERM[table][:, None])
    xk = xp[node]
    col = np.newaxis
    delta = emin[:, col] + (tthetad - emin)[:, col] * xk
    d100 = delta * 100.0
    sind = _sin(delta * rpd)
    cosd = _cos(delta * rpd)
    rcos = 1.0 / cosd
    tt = np.where(ttheta[:, col] > 4500.0, cosd * cosd - c2t2[:, col], s2t2[:, col] - sind * sind)
    pos_tt = tt > 0.0
    rs = np.where(pos_tt, 1.0 / np.sqrt(np.where(pos_tt, tt, 1.0)), 0.0)
    ff = np.where(pos_tt, np.abs(c2t)[:, col] * rs, 1.0)
    g = np.where(np.abs(delta - emin[:, col]) > np.abs(einfl - emin)[:, col],
                 2.0 * a_half * ff * rcos, (-1.0 + apb * ff) * rcos)
    wpk = np.where(valid, wp[node], 0.0)
    wg = wpk * g
    rsumwg = 1.0 / _row_sums(wg)
    if deriv:
        ddt = (1.0 - xk) * demin_dt[:, col] + xk
        dda = (1.0 - xk) * demin_da[:, col]
        wdel_dt = wg * 100.0 * ddt
        wdel_da = wg * 100.0 * dda
        dt_dt = 2.0 * s2t[:, col] * c2t[:, col] * rpd - 2.0 * sind * cosd * rpd * ddt
        dt_da = -2.0 * sind * cosd * rpd * dda
        sgn = np.where(c2t >= 0.0, 1.0, -1.0)
        ac2t = np.abs(c2t)[:, col]
        df_dt = np.where(pos_tt, -sgn[:, col] * s2t[:, col] * rpd * rs
                         - 0.5 * ac2t * rs * rs * rs * dt_dt, 0.0)
        df_da = np.where(pos_tt, -0.5 * ac2t * rs * rs * rs * dt_da, 0.0)
        tand = sind * rcos
        dwg_dt = wpk * (apb * df_dt * rcos + g * tand * rpd * ddt)
        dwg_da = wpk * ((ff + apb * df_da) * rcos + g * tand * rpd * dda)
        sum_dwg_dt = _row_sums(dwg_dt)
        sum_dwg_da = _row_sums(dwg_da)
    fwhm, eta, frac, dedf, dsdg, dsdl, sumhm, sqsg = tch_widths(sig, gam)
    # _pv_constants
    ctl = np.where(np.abs(fwhm) > 5.0e-6, 2.0 * fwhm / PI_LORENTZ, 0.0)
    sigp = (fwhm / STOFW) * (fwhm / STOFW)
    tg_floor = STOFW * EXP_FLOOR / (SQ2PI * fwhm)
    dx2_floor = GAUSS_FLOOR_DX2 * sigp
    # per point and node: the pseudo-Voigt at 100(x − δ_k)
    peak = np.repeat(np.arange(lo.size), n_pts)
    local = np.arange(peak.size) - np.repeat(np.cumsum(n_pts) - n_pts, n_pts)
    point = np.repeat(lo, n_pts) + local
    slot = np.repeat(off, n_pts) + local
    base = (x[point] - tth[peak]) * 100.0 + ttheta[peak]
    dx = base[:, col] - d100[peak]

    def per_point(a):
        return a[peak][:, col]

    fw, et, sg = per_point(fwhm), per_point(eta), per_point(sigp)
    denom = fw * fw + 4.0 * dx * dx
    tl = per_point(ctl) / denom
    tail = dx * dx > per_point(dx2_floor)
    ex = np.where(tail, -20.0, np.maximum(-20.0, -0.5 * dx * dx / sg))
    gauss = np.zeros_like(ex)
    gauss[~tail] = _exp(ex[~tail])         # the tail's clamped value is tg_floor
    tg = np.where(tail, per_point(tg_floor), STOFW * gauss / (SQ2PI * fw))
    r = et * tl + (1.0 - et) * tg
    wg_pt = wg[peak]
    prf = _row_sums(wg_pt * r) * rsumwg[peak]
    sc = scale[peak]
    m = out.shape[1]
    out[0] += np.bincount(slot, sc * prf, minlength=m)
    if not deriv:
        return work
    # derivatives (_psvoigt's and _pv_chain's)
    rden = 1.0 / denom
    lorentz = per_point(ctl) != 0.0
    dtldt = np.where(lorentz, -8.0 * dx * tl * rden, 0.0)
    dtldfw = np.where(lorentz, (8.0 * dx * dx - 2.0 * fw * fw) * rden * rden * (1.0 / PI_LORENTZ),
                      0.0)
    ts = -2.0 * (1.0 - et) * tg * (ex + 0.5) * (1.0 / fw)
    drdx = et * dtldt - (1.0 - et) * tg * dx * (1.0 / sg)
    s_t = _row_sums(dwg_dt[peak] * r - wdel_dt[peak] * drdx)
    s_a = _row_sums(dwg_da[peak] * r - wdel_da[peak] * drdx)
    s_d = _row_sums(wg_pt * (tl - tg))
    s_f = _row_sums(wg_pt * (et * dtldfw + ts))
    dfwdg = 0.2 * dsdg * fwhm / sumhm
    dfrdg = -frac * dfwdg / fwhm
    ks = 0.5 * STOFW / sqsg
    dfwdl = 0.2 * dsdl * fwhm / sumhm
    dfrdl = (1.0 - frac * dfwdl) / fwhm
    a_s, b_s, a_g, b_g = ks * dedf * dfrdg, ks * dfwdg, dedf * dfrdl, dfwdl
    rs_pt = rsumwg[peak]
    out[1] += np.bincount(slot, sc * pos_fac[peak] * (s_t - prf * sum_dwg_dt[peak]) * rs_pt,
                          minlength=m)
    out[2] += np.bincount(slot, sc * (a_s[peak] * s_d + b_s[peak] * s_f) * rs_pt, minlength=m)
    out[3] += np.bincount(slot, sc * (a_g[peak] * s_d + b_g[peak] * s_f) * rs_pt, minlength=m)
    out[4] += np.bincount(slot, sc * (s_a - prf * sum_dwg_da[peak]) * rs_pt, minlength=m)
    return work


def accumulate(lo, offsets, intensity, values, npts: int) -> NDArray[np.float64]:
    """y (npts,) with y[lo[p] + j] = Σ_p intensity[p]·values[offsets[p] + j], added in peak order
    (:func:`midasflow.profile_compiled.accumulate` into zeros)."""
    n = np.diff(offsets)
    point = np.arange(offsets[-1]) + np.repeat(lo - offsets[:-1], n)
    return np.bincount(point, np.repeat(intensity, n) * values, minlength=npts)


def project(lo, offsets, pieces, coef, out) -> None:
    """out[c, lo[p] + j] += Σ_r pieces[r, offsets[p] + j]·coef[r, p, c], added peak by peak and
    row by row as :func:`midasflow.profile_compiled.project` does (a zero coefficient adds an
    exact zero there instead of being skipped)."""
    for p in range(lo.size):
        a, b = offsets[p], offsets[p + 1]
        if b == a:
            continue
        for r in range(coef.shape[0]):
            out[:, lo[p]:lo[p] + b - a] += coef[r, p, :, None] * pieces[r, None, a:b]
