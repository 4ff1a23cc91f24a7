"""Start values of a refinement estimated from the pattern itself (before the first stage).

The instrument's U..Y (e.g. a store's defaults) can be an order of magnitude off the real peak
widths; a least-squares fit started there can settle in a narrow-peak local minimum whose cell
depends on the binning. :func:`estimate_start` measures the pattern instead:

1. **background**: a robust low envelope, the Chebyshev basis of the refinement fitted by
   weighted least squares to the points that do not stand out above it (points more than 1.5σ
   above the current fit are left out, repeated until the set stops changing);
2. **peak widths**: the strongest peaks above the envelope (local maxima with a prominence of
   10σ, as ``scipy.signal.find_peaks`` defines it) that are isolated (no other significant
   reflection of any phase within 2.5 FWHM, nothing above a quarter of the height 1.5 FWHM
   away) are fitted with symmetric pseudo-Voigts (centre, area, FWHM Γ, η, local line; all
   peaks at once by a bounded Levenberg–Marquardt). Γ and η are split into the Gaussian σ²
   and Lorentzian γ of GSAS-II's TCH profile (Thompson–Cox–Hastings η(q) inverted for
   q = γ/Γ, Ida et al. 2000 for the Gaussian FWHM), then σ²(θ) = W + U tan²θ and
   γ(θ) = X/cosθ + Y tanθ are fitted with non-negative coefficients (W and X alone when fewer
   than four peaks or a narrow tanθ span); V = 0. The Kα2 line of a doublet is allowed for by
   removing a third of its splitting from the width;
3. **scale and background again**: the integrated net intensity over the range divided by the
   model's Σ I_h at unit scale, then — with the measured widths, whose tails the envelope sits
   on where peaks crowd — scale and background by weighted linear least squares;
4. **zero-shift check**: peak centres minus the predicted positions, fitted as z + k·tanθ; a z
   beyond 3 esd and one FWHM is reported, not applied (Zero is the detector calibration's; the
   asymmetry and a Kα2 line move a symmetric fit's centre by a fraction of the FWHM).

The instrument's widths are the fallback when no isolated peak is found.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from midasflow.crystal import Phase
from midasflow.errors import PatternError

__all__ = ["estimate_start", "estimate_from_model"]

#: Peaks are found at this prominence, in units of the median σ.
_PROMINENCE_SIGMA = 10.0
#: At most this many of the strongest isolated peaks are fitted.
_MAX_PEAKS = 6
#: Another reflection within this many FWHM makes a peak non-isolated ...
_ISOLATION_FWHM = 2.5
#: ... if its predicted intensity exceeds this fraction of the peak's own.
_NEIGHBOUR_FRACTION = 0.02
_STOFW = 2.0 * math.sqrt(2.0 * math.log(2.0))


def estimate_start(tth_deg: np.ndarray, intensity: np.ndarray, sigma: np.ndarray,
                   phases: Sequence[Phase], instrument: Any, *, bkg_terms: int = 6,
                   limits: tuple[float, float] | None = None,
                   sample_azimuth_deg: float = 0.0, precision: str = "float64") -> dict[str, float]:
    """GSAS-II-named start values (U, V, W, X, Y, Scale, Back;i) measured from a pattern.

    Parameters
    ----------
    tth_deg, intensity, sigma : ndarray (n,)
        2θ (deg), counts and their standard deviations; NaN points and σ ≤ 0 are ignored.
    phases : sequence of Phase
        Their reflections say where peaks are expected and which overlap.
    instrument : Instrument, mapping of GSAS-II keys or .instprm path
        Wavelength(s), polarization and Zero; its U..Y are the fallback widths.
    bkg_terms : int
        Chebyshev-1 background terms (as in the refinement).
    limits : (lo, hi), optional
        2θ range, degrees.
    sample_azimuth_deg : float
    precision : {'float64', 'float32'}
        Arithmetic of the profile the estimate fits (:class:`~midasflow.refinement.engine.PatternModel`;
        the GSAS-II backend asks for GSAS-II's float32).

    Returns
    -------
    dict
        ``U, V, W`` (centideg²), ``X, Y`` (centideg), ``Scale`` and ``Back;0..n-1``; pass it
        as ``start`` to :func:`~midasflow.refinement.engine.refine_pattern` (which calls this
        itself by default, ``estimate=True``).

    Raises
    ------
    PatternError
        Malformed input, or fewer than 10 usable points.
    """
    from midasflow.refinement.engine import PatternModel, _prepare

    x, y, s, x_range, _ = _prepare(tth_deg, intensity, sigma, limits)
    if x.size < 10:
        raise PatternError(f"pattern has {x.size} usable points; need at least 10")
    model = PatternModel(x, x_range, phases, instrument, bkg_terms, sample_azimuth_deg,
                         precision=precision)
    values, _, _ = estimate_from_model(model, y, s)
    return values


def estimate_from_model(model: Any, yobs: np.ndarray, sigma: np.ndarray,
                        envelope: tuple[np.ndarray, np.ndarray] | None = None
                        ) -> tuple[dict[str, float], list[str], list[str]]:
    """:func:`estimate_start` on a built :class:`~midasflow.refinement.engine.PatternModel`.

    ``envelope``: the :func:`low_envelope` of the pattern when already computed.

    Returns
    -------
    values : dict
        GSAS-II-named start values.
    notes : list of str
        What was measured (peaks used, their widths beside the instrument's).
    warnings : list of str
        No isolated peak found (instrument widths used); a significant zero shift.
    """
    x = model.x
    back, bkg = envelope if envelope is not None else low_envelope(model.bkg_basis, yobs, sigma)
    net = yobs - bkg
    values = {f"Back;{i}": float(c) for i, c in enumerate(back)}
    notes: list[str] = []
    warns: list[str] = []
    base = dict(model.values)
    refl = _predicted(model, base)
    scale = _scale_from_area(x, net, refl, model)
    if scale > 0:
        values["Scale"] = scale
    peaks = _isolated_peaks(x, net, sigma, refl, model)
    if not peaks:
        warns.append("start widths: no isolated peak found; the instrument's U..Y are used")
        return values, notes, warns
    tth = np.array([p["tth"] for p in peaks])
    sig2 = np.array([p["sig2"] for p in peaks])
    gam = np.array([p["gam"] for p in peaks])
    th = np.radians(tth) / 2
    values.update(_fit_widths(th, sig2, gam))
    fwhm = np.array([p["fwhm"] for p in peaks])
    inst_fwhm = _instrument_fwhm(model, base, tth)
    notes.append(f"start widths from {len(peaks)} isolated peaks at 2θ "
                 f"{tth.min():.4g}–{tth.max():.4g}°: FWHM {fwhm.min():.3g}–{fwhm.max():.3g}° "
                 f"(the instrument's U..Y give {inst_fwhm.min():.3g}–{inst_fwhm.max():.3g}°)")
    note = _zero_check(peaks, fwhm)
    if note:
        warns.append(note)
    # with the measured widths the peaks' tails are known: scale and background by weighted
    # linear least squares (the envelope alone sits on the tails where peaks crowd)
    from midasflow.refinement.engine import _linear_scale_background

    trial = dict(base, **values)
    with np.errstate(all="ignore"):
        _linear_scale_background(model, trial, yobs, 1.0 / sigma)
    if trial["Scale"] > 0 and all(math.isfinite(trial[k]) for k in values):
        values.update({k: float(trial[k]) for k in values if k == "Scale" or k.startswith("Back;")})
    return values, notes, warns


def low_envelope(basis: np.ndarray, yobs: np.ndarray, sigma: np.ndarray,
                 clip_sigma: float = 1.5, max_iter: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Chebyshev coefficients and values of a robust low envelope of the pattern.

    Weighted least squares on the points not more than ``clip_sigma``·σ above the current fit,
    repeated until that set stops changing (at most ``max_iter`` times).

    Parameters
    ----------
    basis : ndarray (n, k)
        Background design matrix (e.g. ``PatternModel.bkg_basis``).
    yobs, sigma : ndarray (n,)

    Returns
    -------
    coefficients : ndarray (k,)
    background : ndarray (n,)
    """
    w = 1.0 / sigma ** 2
    keep = np.ones(yobs.size, dtype=bool)
    coef = np.zeros(basis.shape[1])
    # normal equations (the basis has a few columns) of the kept points, updated by the points
    # that join or leave the set (after the first passes a few of thousands)
    weighted = basis * w[:, None]
    normal, rhs = basis.T @ weighted, weighted.T @ yobs
    for _ in range(max_iter):
        if keep.sum() < basis.shape[1]:
            break
        coef = np.linalg.lstsq(normal, rhs, rcond=None)[0]
        new = yobs - basis @ coef <= clip_sigma * sigma
        changed = np.flatnonzero(new != keep)
        if not changed.size:
            break
        b = basis[changed]
        wb = b * np.where(new[changed], w[changed], -w[changed])[:, None]  # + joins, − leaves
        normal = normal + b.T @ wb
        rhs = rhs + wb.T @ yobs[changed]
        keep = new
    return coef, basis @ coef


def _predicted(model: Any, values: Mapping[str, float]) -> dict[str, np.ndarray]:
    """Positions (deg), integrated intensities at unit scale, Kα2 positions of all phases."""
    tth, inten = [], []
    for pd in model.phases:
        rt = model.reflection_terms(pd.index, values)
        tth.append(rt["tth"])
        inten.append(rt["intensity"] / values["Scale"])
    tth, inten = np.concatenate(tth), np.concatenate(inten)
    good = np.isfinite(tth) & np.isfinite(inten)
    tth, inten = tth[good], inten[good]
    out = {"tth": tth, "intensity": inten}
    if model.doublet:
        d = model.doublet
        ratio = 360.0 * (d["lam2_a"] - d["lam1_a"]) / (math.pi * d["lam1_a"])
        out["tth2"] = tth + ratio * np.tan(np.radians(tth) / 2)
        out["i_ratio"] = d["i_ratio"]
    return out


def _scale_from_area(x, net, refl, model) -> float:
    """Σ net·Δx (counts·centideg) over Σ I_h at unit scale, reflections inside the range."""
    inside = (refl["tth"] >= x[0]) & (refl["tth"] <= x[-1])
    model_area = float(refl["intensity"][inside].sum())
    if "tth2" in refl:
        inside2 = (refl["tth2"] >= x[0]) & (refl["tth2"] <= x[-1])
        model_area += refl["i_ratio"] * float(refl["intensity"][inside2].sum())
    data_area = 100.0 * float(np.sum(np.maximum(net, 0.0) * model.x_step))
    return data_area / model_area if model_area > 0 and data_area > 0 else 0.0


def _pv_batch(p: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Symmetric pseudo-Voigts (area-normalised) on local lines, one per row: p (k, 6) = c,
    area, Γ, η, b0, b1 at points xs (k, m)."""
    c, area, fw, eta, b0, b1 = (p[:, i:i + 1] for i in range(6))
    d = xs - c
    g = math.sqrt(4 * math.log(2) / math.pi) / fw * np.exp(-4 * math.log(2) * d * d / (fw * fw))
    lo = (2 / (math.pi * fw)) / (1 + 4 * d * d / (fw * fw))
    return area * (eta * lo + (1 - eta) * g) + b0 + b1 * d


def _pv_jac_batch(p: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """∂:func:`_pv_batch`/∂p (k, m, 6), analytic."""
    c, area, fw, eta, b0, b1 = (p[:, i:i + 1] for i in range(6))
    d = xs - c
    k = 4 * math.log(2)
    g = math.sqrt(k / math.pi) / fw * np.exp(-k * d * d / (fw * fw))
    den = fw * fw + 4 * d * d
    lo = 2 * fw / (math.pi * den)
    dg_dd, dlo_dd = g * (-2 * k * d / (fw * fw)), lo * (-8 * d / den)
    dg_dfw, dlo_dfw = g * (-1 / fw + 2 * k * d * d / fw ** 3), lo * (4 * d * d - fw * fw) / (fw * den)
    return np.stack([-(area * (eta * dlo_dd + (1 - eta) * dg_dd) + b1),
                     eta * lo + (1 - eta) * g,
                     area * (eta * dlo_dfw + (1 - eta) * dg_dfw),
                     area * (lo - g), np.ones_like(d), d], axis=-1)


def _find_peaks(y: np.ndarray, min_prominence: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """Local maxima of ``y`` with a topographic prominence ≥ ``min_prominence`` and their
    widths (points, linearly interpolated) at half their prominence.

    The definitions of ``scipy.signal.find_peaks(y, prominence=min_prominence, width=1.0,
    rel_height=0.5)`` (a flat top's middle sample is its peak; each base is the lowest point
    between the peak and the nearest higher sample or the end; peaks narrower than one point
    are dropped), without scipy.signal's ~0.7 s import.

    Returns
    -------
    peaks : ndarray int (k,)
    widths : ndarray (k,)
    """
    n = y.size
    if n < 3:
        return np.zeros(0, dtype=int), np.zeros(0)
    # runs of equal values; a run higher than both neighbouring runs is a (flat) maximum
    starts = np.flatnonzero(np.concatenate(([True], y[1:] != y[:-1])))
    ends = np.append(starts[1:], n) - 1
    v = y[starts]
    top = np.flatnonzero((v[1:-1] > v[:-2]) & (v[1:-1] > v[2:])) + 1
    peaks = (starts[top] + ends[top]) // 2
    # each peak's reach: up to (not including) the nearest higher sample on either side
    first = _reach(y, peaks)
    last = n - 1 - _reach(y[::-1], n - 1 - peaks)
    prominence = y[peaks] - np.maximum(_range_min(y, first, peaks), _range_min(y, peaks, last))
    keep = prominence >= min_prominence
    out_peaks, out_widths = [], []
    for i, a, b, prom in zip(peaks[keep], first[keep], last[keep], prominence[keep]):
        left_base = i - int(np.argmin(y[a:i + 1][::-1]))     # the lowest point nearest the peak
        right_base = i + int(np.argmin(y[i:b + 1]))
        level = y[i] - 0.5 * prom
        below = np.flatnonzero(y[left_base:i + 1] <= level)
        j = left_base + below[-1] if below.size else left_base
        left = j + ((level - y[j]) / (y[j + 1] - y[j]) if y[j] < level else 0.0)
        below = np.flatnonzero(y[i:right_base + 1] <= level)
        j = i + below[0] if below.size else right_base
        right = j - ((level - y[j]) / (y[j - 1] - y[j]) if y[j] < level else 0.0)
        if right - left >= 1.0:
            out_peaks.append(i)
            out_widths.append(right - left)
    return np.array(out_peaks, dtype=int), np.array(out_widths, dtype=float)


def _max_tables(y: np.ndarray, op) -> list[np.ndarray]:
    """Sparse table of ``op`` (np.maximum / np.minimum): level k holds op over y[t:t + 2^k]."""
    tables = [y]
    while (1 << len(tables)) <= y.size:
        half = 1 << (len(tables) - 1)
        tables.append(op(tables[-1][:-half], tables[-1][half:]))
    return tables


def _reach(y: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """For each i in ``idx`` the smallest p ≤ i with y[p:i] all ≤ y[i] (binary lifting over a
    sparse table of maxima: vectorised over ``idx``)."""
    tables = _max_tables(y, np.maximum)
    pos = idx.copy()
    h = y[idx]
    for k in range(len(tables) - 1, -1, -1):
        step = 1 << k
        can = pos >= step
        block = tables[k][np.where(can, pos - step, 0)]
        move = can & (block <= h)
        pos[move] -= step
    return pos


def _range_min(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """min(y[a:b + 1]) for index arrays a ≤ b (two overlapping sparse-table blocks)."""
    tables = _max_tables(y, np.minimum)
    k = np.floor(np.log2(b - a + 1)).astype(int)
    out = np.empty(a.size)
    for level in np.unique(k):
        sel = k == level
        t = tables[level]
        out[sel] = np.minimum(t[a[sel]], t[b[sel] - (1 << level) + 1])
    return out


def _fit_pseudo_voigts(windows: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                       p0: np.ndarray, lower: np.ndarray, upper: np.ndarray,
                       max_iter: int = 60, rtol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """Bounded weighted least-squares fits of :func:`_pv` to several peaks at once.

    Levenberg–Marquardt on each peak's normal equations (normalised by their diagonal; all
    peaks advance together, each with its own damping), steps clipped to the bounds, a
    parameter on a bound held there while the gradient points outwards (projected active set).

    Parameters
    ----------
    windows : list of (x, y, sigma)
        Each peak's points.
    p0, lower, upper : ndarray (k, 6)
        Start values and bounds of (centre, area, FWHM, η, b0, b1).

    Returns
    -------
    params : ndarray (k, 6)
    converged : ndarray bool (k,)
        The relative χ² decrease fell below ``rtol`` (or the step vanished) within
        ``max_iter`` iterations.
    """
    k = len(windows)
    m = max(w[0].size for w in windows)
    xs = np.zeros((k, m))
    ys = np.zeros((k, m))
    inv_s = np.zeros((k, m))          # 0 on the padding: it takes no part in the fit
    for i, (x, y, s) in enumerate(windows):
        xs[i, :x.size], ys[i, :x.size], inv_s[i, :x.size] = x, y, 1.0 / s
        xs[i, x.size:] = x[-1]
    p = np.clip(np.asarray(p0, dtype=float), lower, upper)
    lam = np.zeros(k)
    converged = np.zeros(k, dtype=bool)
    eye = np.eye(6)

    def chi2_of(params):
        r = (_pv_batch(params, xs) - ys) * inv_s
        return r, np.einsum("km,km->k", r, r)

    r, chi2 = chi2_of(p)
    for _ in range(max_iter):
        jac = _pv_jac_batch(p, xs) * inv_s[:, :, None]                     # (k, m, 6)
        normal = np.einsum("kmi,kmj->kij", jac, jac)
        grad = np.einsum("kmi,km->ki", jac, r)
        held = ((p <= lower) & (grad > 0)) | ((p >= upper) & (grad < 0))
        scale = np.sqrt(np.einsum("kii->ki", normal))
        scale[(scale == 0) | held] = 1.0
        nn = normal / (scale[:, :, None] * scale[:, None, :])
        gn = grad / scale
        nn[held[:, :, None] | held[:, None, :]] = 0.0
        nn += eye * (held[:, :, None] + lam[:, None, None])
        gn[held] = 0.0
        try:
            step = -np.linalg.solve(nn, gn[:, :, None])[:, :, 0] / scale
        except np.linalg.LinAlgError:
            step = -np.einsum("kij,kj->ki", np.linalg.pinv(nn), gn) / scale
        trial = np.clip(p + step, lower, upper)
        r_new, chi2_new = chi2_of(trial)
        better = chi2_new < chi2
        active = ~converged
        done = active & ((better & (chi2 - chi2_new <= rtol * chi2))
                         | np.all(np.abs(trial - p) <= 1e-12 * (np.abs(p) + 1e-12), axis=1))
        take = active & better
        p[take], r[take], chi2[take] = trial[take], r_new[take], chi2_new[take]
        lam = np.where(take, np.where(lam >= 1e-2, lam / 10, 0.0),
                       np.where(lam == 0, 1e-3, lam * 10))
        converged |= done | (active & (lam > 1e8))
        if converged.all():
            break
    return p, converged


def _isolated_peaks(x, net, sigma, refl, model) -> list[dict[str, float]]:
    """Pseudo-Voigt fits of the strongest isolated peaks (deg, centideg², centideg)."""
    noise = float(np.median(sigma))
    idx, widths_pts = _find_peaks(net, _PROMINENCE_SIGMA * noise)
    if idx.size == 0:
        return []
    order = np.argsort(-net[idx])
    chosen: list[tuple[int, float, float, float, float]] = []   # (reflection, c0, h0, fw0, Kα2)
    windows = []
    step = np.gradient(x)
    for k in order:
        if len(chosen) >= _MAX_PEAKS:
            break
        i = idx[k]
        c0, h0 = float(x[i]), float(net[i])
        fw0 = float(widths_pts[k] * step[i])
        if not fw0 > 0:
            continue
        # nothing above a quarter of the height 1.5 FWHM away (a shoulder, an unresolved pair)
        side = np.abs(x - c0)
        ring = (side > 1.5 * fw0) & (side < 2.5 * fw0)
        if not np.any(ring) or float(net[ring].max()) > 0.25 * h0:
            continue
        # the reflection this peak is, and no significant neighbour within 2.5 FWHM
        j = int(np.argmin(np.abs(refl["tth"] - c0)))
        if abs(refl["tth"][j] - c0) > max(3 * fw0, 0.02 * c0):
            continue
        near = np.abs(refl["tth"] - refl["tth"][j]) < _ISOLATION_FWHM * fw0
        strong = refl["intensity"] > _NEIGHBOUR_FRACTION * refl["intensity"][j]
        if np.count_nonzero(near & strong) > 1:
            continue
        split = 0.0
        if "tth2" in refl:
            near2 = np.abs(refl["tth2"] - refl["tth"][j]) < _ISOLATION_FWHM * fw0
            if np.count_nonzero(near2 & strong & (np.arange(near2.size) != j)):
                continue
            split = float(refl["tth2"][j] - refl["tth"][j])
        win = np.abs(x - c0) <= 3 * fw0
        if np.count_nonzero(win) < 7:
            continue
        chosen.append((j, c0, h0, fw0, split))
        windows.append((x[win], net[win], sigma[win]))
    if not chosen:
        return []
    c0, h0, fw0 = (np.array([c[n] for c in chosen]) for n in (1, 2, 3))
    zero, inf = np.zeros_like(c0), np.full_like(c0, np.inf)
    p0 = np.column_stack([c0, h0 * fw0 * 1.06, fw0, np.full_like(c0, 0.5), zero, zero])
    lower = np.column_stack([c0 - fw0, zero, 0.1 * fw0, zero, -inf, -inf])
    upper = np.column_stack([c0 + fw0, inf, 5 * fw0, np.ones_like(c0), inf, inf])
    with np.errstate(all="ignore"):
        fits, converged = _fit_pseudo_voigts(windows, p0, lower, upper)
    out: list[dict[str, float]] = []
    for (j, *_, split), (c, area, fw, eta, _, _), ok in zip(chosen, fits, converged):
        if not (ok and area > 0 and fw > 0 and np.all(np.isfinite([c, area, fw, eta]))):
            continue
        fw_line = max(fw - split / 3.0, 0.5 * fw)
        sig2, gam = _split_tch(100.0 * fw_line, eta)
        out.append(dict(tth=c, fwhm=fw_line, sig2=sig2, gam=gam, offset=c - refl["tth"][j],
                        refl_tth=float(refl["tth"][j])))
    return out


def _split_tch(fwhm_cdeg: float, eta: float) -> tuple[float, float]:
    """Gaussian σ² (centideg²) and Lorentzian γ (centideg) of a TCH pseudo-Voigt (Γ, η)."""
    # η = 1.36603 q − 0.47719 q² + 0.11116 q³ (monotonic on 0..1), q = γ/Γ
    roots = np.roots([0.11116, -0.47719, 1.36603, -min(max(eta, 0.0), 1.0)])
    real = [r.real for r in roots if abs(r.imag) < 1e-9 and -1e-9 <= r.real <= 1 + 1e-9]
    q = min(max(real[0] if real else 0.0, 0.0), 1.0)
    gauss_frac = max(1 - 0.74417 * q - 0.24781 * q * q - 0.00810 * q ** 3, 0.0) ** 0.5
    return (fwhm_cdeg * gauss_frac / _STOFW) ** 2, fwhm_cdeg * q


def _fit_widths(th: np.ndarray, sig2: np.ndarray, gam: np.ndarray) -> dict[str, float]:
    """Non-negative W + U tan²θ and X/cosθ + Y tanθ through the measured widths."""
    tan_t, cos_t = np.tan(th), np.cos(th)
    # the tanθ terms only where they vary enough to be measured (lab data, not 2θ < ~30°)
    wide = th.size >= 4 and tan_t.max() - tan_t.min() >= 0.25
    if wide:
        W, U = _nnls2(np.column_stack([np.ones_like(tan_t), tan_t ** 2]), sig2)
        X, Y = _nnls2(np.column_stack([1 / cos_t, tan_t]), gam)
    else:
        U, Y = 0.0, 0.0
        W = float(np.median(sig2))
        X = float(np.median(gam * cos_t))
    return {"U": float(U), "V": 0.0, "W": float(max(W, 0.0)), "X": float(X), "Y": float(Y)}


def _nnls2(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """argmin |a c − b| over c ≥ 0 for two columns (``scipy.optimize.nnls``, whose import
    costs ~0.3 s): the unconstrained solution if it is non-negative, else the better of the
    one-column fits (each clipped at 0) — the minimum of a convex problem lies on that face."""
    c = np.linalg.lstsq(a, b, rcond=None)[0]
    if np.all(c >= 0):
        return float(c[0]), float(c[1])
    best, best_res = (0.0, 0.0), float(b @ b)
    for i in range(2):
        col = a[:, i]
        ci = max(float(col @ b) / float(col @ col), 0.0) if col @ col > 0 else 0.0
        res = float(np.sum((b - ci * col) ** 2))
        if res < best_res:
            best, best_res = ((ci, 0.0) if i == 0 else (0.0, ci)), res
    return best


def _instrument_fwhm(model: Any, values: Mapping[str, float], tth: np.ndarray) -> np.ndarray:
    """FWHM (deg) the instrument's U..Y give at ``tth``."""
    from midasflow.profile import peak_sig2_gam, tch_fwhm_eta

    v = values
    sg = peak_sig2_gam(tth, v["U"], v["V"], v["W"], v["X"], v["Y"], v["Z"],
                       size_um=v["0:0:Size;i"], mustrain=v["0:0:Mustrain;i"], lam_a=model.lam)
    return np.asarray(tch_fwhm_eta(sg.sig2, sg.gam, precision=model.precision)[0]) / 100.0


def _zero_check(peaks: list[dict[str, float]], fwhm: np.ndarray) -> str:
    """A warning when the peak centres sit a constant offset z from the predicted positions."""
    if len(peaks) < 3:
        return ""
    th = np.radians(np.array([p["refl_tth"] for p in peaks])) / 2
    off = np.array([p["offset"] for p in peaks])
    design = np.column_stack([np.ones_like(th), np.tan(th)])
    coef, res, rank, _ = np.linalg.lstsq(design, off, rcond=None)
    if rank < 2:
        return ""
    dof = max(len(peaks) - 2, 1)
    resid = off - design @ coef
    cov = np.linalg.pinv(design.T @ design) * float(resid @ resid) / dof
    z, z_esd = float(coef[0]), math.sqrt(max(float(cov[0, 0]), 0.0))
    # a symmetric fit's centre also moves with the FCJ asymmetry (to lower 2θ) and a Kα2 line
    # (to higher 2θ) by a fraction of the FWHM: only a shift beyond one FWHM is reported
    if abs(z) > max(3 * z_esd, float(np.median(fwhm))):
        return (f"zero-shift check: the peak centres suggest a 2θ zero offset of {z:+.4g}° "
                f"(± {z_esd:.2g}, more than the {float(np.median(fwhm)):.3g}° FWHM) beyond the "
                "instrument's Zero (not applied)")
    return ""
