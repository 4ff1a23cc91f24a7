"""Symmetrised spherical harmonics of GSAS-II's texture models (pure numpy).

The definitions, names and normalisation are GSAS-II's (``GSASIIlattice``: ``OdfChk``,
``GenSHCoeffT``, ``CrsAng``, ``GetKcl``, ``GetKsl``, ``textureIndex``; Bunge, *Texture Analysis
in Materials Science*, 1982); ``docs/reference/texture_model.md`` states them in full. All angles
are in degrees.

* :func:`plm_bar` — the normalised associated Legendre function P̄_l^m(ψ) without the
  Condon–Shortley phase (P̄_l^{−m} = P̄_l^{m}).
* :func:`crystal_angles` — the polar angle Φ of a reflection from the crystal reference axis and
  its azimuth β (``CrsAng``).
* :func:`crystal_harmonic` — K_l^n(Φ, β) of a Laue class (``GetKcl``); cubic classes use Bunge's
  cubic harmonics (:data:`BUNGE_CUBIC`).
* :func:`sample_harmonic` — K_l^m(ψ, γ) of a sample symmetry (``GetKsl``).
* :func:`allowed` / :func:`coefficient_names` — the coefficients a symmetry allows.
* :func:`texture_index` — J = 1 + Σ C²/(2l+1).
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["BUNGE_CUBIC", "MAX_SH_ESD", "SAMPLE_SYMMETRIES", "allowed", "coefficient_names",
           "crystal_angles", "crystal_harmonic", "l_norm", "parse_name", "plm_bar", "sample_harmonic",
           "texture_index"]

#: A harmonic coefficient whose esd exceeds this is not determined (|C| ~ 1 is a strong texture):
#: the per-lineout texture stage is then undone, the joint fit 'ill-conditioned'.
MAX_SH_ESD = 1.0

#: Bunge's coefficients B_l^{j,n} of the cubic (m3m) harmonics, j = 0, 4, 8, … (Bunge 1982,
#: Table 15.2.1; the values GSAS-II tabulates as ``BOH``), for even l up to 12.
BUNGE_CUBIC: dict[int, tuple[tuple[float, ...], ...]] = {
    4: ((0.30469720, 0.36418281),),
    6: ((-0.14104740, 0.52775103),),
    8: ((0.28646862, 0.21545346, 0.32826995),),
    10: ((-0.16413497, 0.33078546, 0.39371345),),
    12: ((0.26141975, 0.27266871, 0.03277460, 0.32589402),
         (0.09298802, -0.23773812, 0.49446631, 0.0)),
}
#: Highest harmonic order supported (the cubic table above).
MAX_ORDER = 12
#: Sample symmetries (GSAS-II's symbols): '0' cylindrical (fibre), 'mmm' rolling, '2/m' shear,
#: '-1' none.
SAMPLE_SYMMETRIES = ("0", "mmm", "2/m", "-1")
_CUBIC = ("m3", "m3m")
_NAME = re.compile(r"^C\((-?\d+),(-?\d+)(?:,(-?\d+))?\)$")
_RSQ2PI = 1.0 / math.sqrt(2.0 * math.pi)


def plm_bar(l: int, m: int, psi_deg: ArrayLike) -> NDArray[np.float64]:
    """P̄_l^m(ψ) = √((2l+1)/2 · (l−|m|)!/(l+|m|)!) · P_l^|m|(cos ψ), no Condon–Shortley phase.

    Parameters
    ----------
    l, m : int
        Degree and order (|m| ≤ l); negative m gives the same values as |m| (as GSAS-II's
        ``pyplmpsi``).
    psi_deg : array_like
        Polar angle, degrees.

    Returns
    -------
    ndarray (float64), the shape of ``psi_deg``.
    """
    from scipy.special import lpmv  # here: scipy.special costs ~0.3 s of the engine's import

    am = abs(int(m))
    norm = math.exp(0.5 * (math.log((2 * l + 1) / 2.0) + math.lgamma(l - am + 1) - math.lgamma(l + am + 1)))
    cos_psi = np.cos(np.radians(np.asarray(psi_deg, dtype=float)))
    # scipy's lpmv carries the Condon–Shortley phase (−1)^m: remove it
    return (-1.0) ** am * norm * lpmv(am, l, cos_psi)


def l_norm(l: int) -> float:
    """GSAS-II's ``Lnorm``: 4π/(2l+1)."""
    return 4.0 * math.pi / (2 * l + 1)


def allowed(symmetry: str, l: int, n: int) -> bool:
    """Whether the harmonic (l, n) is allowed by a Laue class or sample symmetry (``OdfChk``).

    Parameters
    ----------
    symmetry : str
        A GSAS-II Laue class (:data:`midasflow.crystal.LAUE_CLASSES`) or sample symmetry
        (:data:`SAMPLE_SYMMETRIES`).
    l, n : int
        Only even l ≥ 2 and |n| ≤ l are ever allowed.
    """
    if l % 2 or abs(n) > l or l < 2:
        return False
    a = abs(n)
    if symmetry == "0":
        return n == 0
    if symmetry == "-1":
        return True
    if symmetry == "2/m":
        return a % 2 == 0
    if symmetry == "mmm":
        return a % 2 == 0 and n >= 0
    if symmetry == "4/m":
        return a % 4 == 0
    if symmetry == "4/mmm":
        return a % 4 == 0 and n >= 0
    if symmetry in ("3R", "3"):
        return a % 3 == 0
    if symmetry in ("3mR", "3m1", "31m"):
        return a % 3 == 0 and n >= 0
    if symmetry == "6/m":
        return a % 6 == 0
    if symmetry == "6/mmm":
        return a % 6 == 0 and n >= 0
    if symmetry in _CUBIC:
        return 0 < n <= (l // 12 if l % 12 == 2 else l // 12 + 1)
    raise ValueError(f"unknown symmetry {symmetry!r}")


def coefficient_names(laue: str, order: int, sample_symmetry: str | None = None) -> list[str]:
    """Coefficient names in GSAS-II's order (``GenSHCoeffT``).

    Parameters
    ----------
    laue : str
        Laue class of the phase.
    order : int
        Highest l (2..12); the even l = 2 … order are used.
    sample_symmetry : str or None
        None: the powder preferred-orientation names ``C(l,n)`` (cylindrical sample symmetry,
        m = 0 implied); otherwise the texture names ``C(l,m,n)`` of that sample symmetry.

    Returns
    -------
    list of str
        Empty when the symmetry allows nothing up to ``order`` (cubic at order 2).
    """
    if not 0 <= int(order) <= MAX_ORDER:
        raise ValueError(f"harmonic order {order}: expected 0..{MAX_ORDER}")
    names = []
    for l in range(2, int(order) + 1, 2):
        for m in range(-l, l + 1):
            if not allowed(sample_symmetry or "0", l, m):
                continue
            for n in range(-l, l + 1):
                if allowed(laue, l, n):
                    names.append(f"C({l},{n})" if sample_symmetry is None else f"C({l},{m},{n})")
    return names


def parse_name(name: str) -> tuple[int, int, int]:
    """(l, m, n) of ``'C(l,n)'`` (m = 0) or ``'C(l,m,n)'``; a ``'p:h:'`` prefix is ignored."""
    match = _NAME.match(name.rsplit(":", 1)[-1])
    if match is None:
        raise ValueError(f"not a harmonic coefficient name: {name!r} (expected C(l,n) or C(l,m,n))")
    l, a, b = match.groups()
    return (int(l), 0, int(a)) if b is None else (int(l), int(a), int(b))


def crystal_angles(hkl: ArrayLike, cell: Sequence[float], laue: str,
                   unique_axis: str = "b") -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Polar angle Φ and azimuth β of reflections in the crystal frame (``CrsAng``), degrees.

    Φ is the angle between **h** and the reference reciprocal axis (c*; for 2/m the unique
    axis); β follows GSAS-II's formula for each Laue class.

    Parameters
    ----------
    hkl : array_like (n, 3)
    cell : (a, b, c, α, β, γ), Å and degrees
    laue : str
    unique_axis : {'a', 'b', 'c'}
        Monoclinic unique axis.

    Returns
    -------
    phi_deg, beta_deg : ndarray (n,)
    """
    from midasflow.crystal import cell_to_A, _A_to_G

    H = np.atleast_2d(np.asarray(hkl, dtype=float))
    a, b, c, al, be, ga = (float(v) for v in cell)
    G = _A_to_G(cell_to_A(cell))
    ref = np.zeros(3)
    ref["abc".index(unique_axis) if laue == "2/m" else 2] = 1.0
    dh = np.einsum("ni,ij,nj->n", H, G, H)
    cosphi = (H @ G @ ref) / np.sqrt(dh * (ref @ G @ ref))
    phi = np.degrees(np.arccos(np.clip(cosphi, -1.0, 1.0)))
    h, k, l = H.T
    cosd = lambda x: math.cos(math.radians(x))  # noqa: E731
    sind = lambda x: math.sin(math.radians(x))  # noqa: E731
    if laue == "-1" or (laue == "2/m" and unique_axis == "c"):
        ba, bb = k * a / (b - h * cosd(ga)), h * sind(ga) ** 2
    elif laue == "2/m" and unique_axis == "a":
        ba, bb = l * b / (c - k * cosd(al)), k * sind(al) ** 2
    elif laue == "2/m":
        ba, bb = h * c / (a - l * cosd(be)), l * sind(be) ** 2
    elif laue in ("mmm", "4/m", "4/mmm"):
        ba, bb = k * a, h * b
    elif laue in ("3R", "3mR"):
        ba, bb = h + k - 2.0 * l, math.sqrt(3.0) * (h - k)
    elif laue in _CUBIC:
        ba, bb = k, h
    else:
        ba, bb = h + 2.0 * k, math.sqrt(3.0) * h
    return phi, np.degrees(np.arctan2(ba, bb))


def crystal_harmonic(l: int, n: int, laue: str, phi_deg: ArrayLike,
                     beta_deg: ArrayLike) -> NDArray[np.float64]:
    """Symmetrised crystal harmonic K_l^n(Φ, β) of a Laue class (``GetKcl``).

    Cubic classes: Σ_j B_l^{j,n} P̄_l^j(Φ) cos jβ, j = 0, 4, 8, … (:data:`BUNGE_CUBIC`). Other
    classes: (2π)^−½ P̄_l^n(Φ) · (√2 if n ≠ 0) · g(nβ) with g = cos for mmm, 4/mmm, 6/mmm (and
    sin for 3m1, 31m when n mod 6 = 3), else cos + sin.
    """
    phi = np.asarray(phi_deg, dtype=float)
    beta = np.radians(np.asarray(beta_deg, dtype=float))
    if laue in _CUBIC:
        rows = BUNGE_CUBIC.get(l, ())
        if not 1 <= n <= len(rows):
            raise ValueError(f"no cubic harmonic K_{l}^{n} (order ≤ {MAX_ORDER})")
        out = np.zeros(np.broadcast(phi, beta).shape)
        for i, coef in enumerate(rows[n - 1]):
            if coef:
                out = out + coef * plm_bar(l, 4 * i, phi) * np.cos(4 * i * beta)
        return out
    p = plm_bar(l, n, phi) * _RSQ2PI * (math.sqrt(2.0) if n else 1.0)
    if laue in ("3m1", "31m") and n % 6 == 3:
        return p * np.sin(n * beta)
    if laue in ("mmm", "4/mmm", "6/mmm", "3m1", "31m"):
        return p * np.cos(n * beta)
    return p * (np.cos(n * beta) + np.sin(n * beta))


def sample_harmonic(l: int, m: int, psi_deg: ArrayLike, gamma_deg: ArrayLike = 0.0,
                    sample_symmetry: str = "0") -> NDArray[np.float64]:
    """Sample harmonic K_l^m(ψ, γ) (``GetKsl``): (2π)^−½ P̄_l^m(ψ) · (√2 if m ≠ 0) ·
    (cos mγ for 'mmm', else cos mγ + sin mγ). For m = 0 this is (2π)^−½ P̄_l^0(ψ)."""
    p = plm_bar(l, m, psi_deg) * _RSQ2PI
    if not m:
        return p * np.ones(np.shape(gamma_deg))
    g = np.radians(np.asarray(gamma_deg, dtype=float))
    trig = np.cos(m * g) if sample_symmetry == "mmm" else np.cos(m * g) + np.sin(m * g)
    return p * math.sqrt(2.0) * trig


def texture_index(coefficients: Mapping[str, float]) -> float:
    """GSAS-II's texture index J = 1 + Σ C²/(2l+1) (1 for a random texture)."""
    return 1.0 + sum(float(v) ** 2 / (2 * parse_name(k)[0] + 1) for k, v in coefficients.items())
