"""Lattice strain per lineout and least-squares fits of the strain tensor (pure numpy).

Frame and conventions (docs/reference/strain_geometry.md): MIDAS lab frame, x along the beam, y
horizontal, z vertical; MIDAS azimuth η = atan2(−P_y, P_z). A reflection at Bragg angle θ seen at
η measures the normal strain along the unit scattering vector

    n(θ, η) = (−sin θ, −cos θ · sin η, cos θ · cos η),      ε_n = nᵀ ε n.

Sample frame: the sample is turned by ω about the vertical +z axis (right-handed, counter-clockwise
seen from +z), so a direction fixed in the sample with sample coordinates v has lab coordinates
Rz(ω) v, the lab tensor is Rz(ω) ε_s Rz(ω)ᵀ and n in sample coordinates is Rz(ω)ᵀ n.

Tensor components are ordered as in Voigt notation, ``COMPONENTS = ("xx", "yy", "zz", "yz", "xz",
"xy")``, and are tensor (not engineering) shear strains.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

COMPONENTS: tuple[str, ...] = ("xx", "yy", "zz", "yz", "xz", "xy")
_PAIRS = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))
#: components one ω-orientation constrains well; the fit is "degenerate" without them
_IN_PLANE = ("yy", "zz", "yz")


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------
def scattering_vector(theta_deg: Any, eta_deg: Any) -> np.ndarray:
    """Unit scattering vector in the MIDAS lab frame.

    Parameters
    ----------
    theta_deg, eta_deg : array_like, float, degrees
        Bragg angle θ (half the scattering angle 2θ) and MIDAS azimuth η; broadcast together.

    Returns
    -------
    ndarray, float64, shape ``broadcast(theta, eta).shape + (3,)``
        (−sin θ, −cos θ sin η, cos θ cos η).
    """
    th = np.deg2rad(np.asarray(theta_deg, dtype=float))
    et = np.deg2rad(np.asarray(eta_deg, dtype=float))
    th, et = np.broadcast_arrays(th, et)
    return np.stack([-np.sin(th), -np.cos(th) * np.sin(et), np.cos(th) * np.cos(et)], axis=-1)


def rotation_z(omega_deg: Any) -> np.ndarray:
    """Rotation matrices Rz(ω) about +z, shape ``np.shape(omega_deg) + (3, 3)``."""
    om = np.deg2rad(np.asarray(omega_deg, dtype=float))
    c, s = np.cos(om), np.sin(om)
    zero, one = np.zeros_like(om), np.ones_like(om)
    return np.stack(
        [np.stack([c, -s, zero], -1), np.stack([s, c, zero], -1), np.stack([zero, zero, one], -1)], -2
    )


def design_matrix(theta_deg: Any, eta_deg: Any, omega_deg: Any | None = None) -> np.ndarray:
    """Coefficients of the six tensor components in ε_n, one row per measurement.

    Parameters
    ----------
    theta_deg, eta_deg : array_like (n,), degrees
        Bragg angle and MIDAS azimuth of each measurement.
    omega_deg : array_like (n,), degrees, optional
        Sample rotation about +z. ``None``: lab-frame components.

    Returns
    -------
    ndarray, float64, shape (n, 6)
        Row i holds (n_x², n_y², n_z², 2 n_y n_z, 2 n_x n_z, 2 n_x n_y) for the scattering vector
        of measurement i (in sample coordinates when ``omega_deg`` is given), columns in
        ``COMPONENTS`` order, so that ε_n = design_matrix @ components.
    """
    n = np.atleast_2d(scattering_vector(np.ravel(theta_deg), np.ravel(eta_deg)))
    if omega_deg is not None:
        rot = rotation_z(np.broadcast_to(np.ravel(omega_deg), n.shape[:1]))
        n = np.einsum("kji,kj->ki", rot, n)  # Rz(ω)ᵀ n
    cols = [(1.0 if i == j else 2.0) * n[:, i] * n[:, j] for i, j in _PAIRS]
    return np.stack(cols, axis=-1)


#: Gauss–Legendre nodes over an η bin: the design is a trigonometric polynomial of degree 2 in
#: η, which 6 nodes average to ~1e-13 over bins up to 90° wide.
_ETA_NODES, _ETA_WEIGHTS = np.polynomial.legendre.leggauss(6)


def lineout_design(theta_deg: Any, eta_deg: float, *, weights: Any = None, eta_width_deg: float = 0.0,
                   omega_deg: Any = None) -> np.ndarray:
    """The design row of one lineout: ε_n averaged as the lineout averages it.

    A lineout's refined cell is a weighted mean over its reflections (Bragg angles θ_k, weights
    w_k: :func:`midasflow.results.reflection_weights`) of the normal strain they see, each
    averaged over the η bin (width ``eta_width_deg``, uniform in η) and over the frames summed
    into the ω-group (their ω). The row is the same mean of :func:`design_matrix` rows, so
    ``row @ components`` is the strain the lineout measures, with no single effective θ, η or ω.

    Parameters
    ----------
    theta_deg : array_like (m,), degrees
        Bragg angles of the reflections (one value: a single θ).
    eta_deg : float, degrees
        Centre of the η bin.
    weights : array_like (m,), optional
        Weights of the reflections; default equal.
    eta_width_deg : float, degrees
        Width of the η bin (0: its centre only).
    omega_deg : array_like (k,), degrees, optional
        ω of the frames summed into the lineout's group; ``None``: lab-frame components.

    Returns
    -------
    ndarray (6,), float64
        Coefficients of ``COMPONENTS`` (sample frame when ``omega_deg`` is given).
    """
    theta = np.atleast_1d(np.asarray(theta_deg, dtype=float))
    w = np.ones(theta.size) if weights is None else np.broadcast_to(np.asarray(weights, float), theta.shape)
    w = w / w.sum()
    etas = float(eta_deg) + 0.5 * float(eta_width_deg) * _ETA_NODES
    eta_w = _ETA_WEIGHTS / _ETA_WEIGHTS.sum()
    omegas = None if omega_deg is None else np.atleast_1d(np.asarray(omega_deg, dtype=float))
    n_om = 1 if omegas is None else omegas.size
    # every (reflection, η node, ω) combination, weighted by the product of the weights
    th, et, om = np.meshgrid(theta, etas, np.zeros(1) if omegas is None else omegas, indexing="ij")
    weight = (w[:, None, None] * eta_w[None, :, None] / n_om) * np.ones(th.shape)
    rows = design_matrix(th.ravel(), et.ravel(), None if omegas is None else om.ravel())
    return weight.ravel() @ rows


def tensor_from_components(components: Sequence[float]) -> np.ndarray:
    """Symmetric 3×3 tensor from six components in ``COMPONENTS`` order."""
    t = np.zeros((3, 3))
    for value, (i, j) in zip(components, _PAIRS, strict=True):
        t[i, j] = t[j, i] = value
    return t


def components_from_tensor(tensor: np.ndarray) -> np.ndarray:
    """Six components in ``COMPONENTS`` order from a symmetric 3×3 tensor."""
    t = np.asarray(tensor, dtype=float)
    return np.array([t[i, j] for i, j in _PAIRS])


def normal_strain(theta_deg: Any, eta_deg: Any, tensor: np.ndarray, omega_deg: Any = 0.0) -> np.ndarray:
    """Forward model: ε_n = nᵀ (Rz(ω) ε_s Rz(ω)ᵀ) n for a sample-frame tensor.

    Parameters
    ----------
    theta_deg, eta_deg, omega_deg : array_like, degrees
        Broadcast together.
    tensor : ndarray (3, 3)
        Symmetric strain tensor in the sample frame (equal to the lab frame at ω = 0).

    Returns
    -------
    ndarray, float64, broadcast shape of the angles.
    """
    th, et, om = np.broadcast_arrays(
        np.asarray(theta_deg, float), np.asarray(eta_deg, float), np.asarray(omega_deg, float)
    )
    n = scattering_vector(th, et)
    rot = rotation_z(om)
    lab = rot @ np.asarray(tensor, float) @ np.swapaxes(rot, -1, -2)
    return np.einsum("...i,...ij,...j->...", n, lab, n)


# ---------------------------------------------------------------------------------------------
# strain of one lineout from its refined cell
# ---------------------------------------------------------------------------------------------
def d_spacing_a(cell: Sequence[float], hkl: Any) -> np.ndarray:
    """d-spacings (Å) of reflections ``hkl`` (int array (n, 3) or (3,)) for a cell (a, b, c Å; α, β, γ deg)."""
    from midasflow.crystal import A_derivative_H, cell_to_A

    h = np.atleast_2d(np.asarray(hkl, dtype=float))
    return 1.0 / np.sqrt(A_derivative_H(h) @ cell_to_A(cell[:6]))


def is_cubic(cell: Sequence[float], *, rtol: float = 1e-9) -> bool:
    """True when a = b = c and α = β = γ = 90° (within ``rtol``)."""
    a, b, c, al, be, ga = (float(v) for v in cell[:6])
    return bool(np.allclose([b, c], a, rtol=rtol, atol=0) and np.allclose([al, be, ga], 90.0, rtol=rtol, atol=0))


def lattice_strain(
    cell: Sequence[float],
    ref_cell: Sequence[float],
    *,
    cell_esd: Sequence[float] | None = None,
    hkl: Any = None,
    weights: Any = None,
) -> tuple[float, float]:
    """Lattice strain of a refined cell against a reference cell, with its esd.

    Parameters
    ----------
    cell, ref_cell : sequence of 6 floats
        (a, b, c in Å; α, β, γ in degrees); extra entries (e.g. volume) are ignored.
    cell_esd : sequence of 6 floats, optional
        esds of ``cell``; propagated independently (correlations ignored). ``None``: esd NaN.
    hkl : int array (m, 3), optional
        Reflections whose d-spacings carry the strain; required unless both cells are cubic.
        ε = Σ wₖ (dₖ/d₀ₖ − 1) / Σ wₖ.
    weights : float array (m,), optional
        Weights of the reflections (e.g. their intensities); default equal.

    Returns
    -------
    (eps, eps_esd) : floats, dimensionless
        For cubic cells ε = a/a₀ − 1 (the same for every reflection).
    """
    cell6 = np.asarray(cell[:6], dtype=float)
    ref6 = np.asarray(ref_cell[:6], dtype=float)
    esd6 = np.full(6, np.nan) if cell_esd is None else np.nan_to_num(np.asarray(cell_esd[:6], dtype=float))
    if hkl is None:
        if not (is_cubic(ref6, rtol=1e-6) and is_cubic(cell6, rtol=1e-6)):
            raise ValueError("lattice_strain: non-cubic cell needs the reflections `hkl` whose d carries the strain")
        return float(cell6[0] / ref6[0] - 1.0), float(esd6[0] / ref6[0])
    hkl = np.atleast_2d(np.asarray(hkl))
    w = np.ones(len(hkl)) if weights is None else np.asarray(weights, dtype=float)
    d0 = d_spacing_a(ref6, hkl)

    def eps_of(c6: np.ndarray) -> float:
        return float(np.sum(w * (d_spacing_a(c6, hkl) / d0 - 1.0)) / np.sum(w))

    eps = eps_of(cell6)
    grad = np.empty(6)
    for k in range(6):
        step = 1e-6 * max(abs(cell6[k]), 1.0)
        up, dn = cell6.copy(), cell6.copy()
        up[k] += step
        dn[k] -= step
        grad[k] = (eps_of(up) - eps_of(dn)) / (2 * step)
    return eps, float(np.sqrt(np.sum((grad * esd6) ** 2)))


# ---------------------------------------------------------------------------------------------
# least-squares fits
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class StrainFit:
    """Result of a weighted linear least-squares strain-tensor fit.

    Attributes
    ----------
    frame : str
        "lab" (one ω-orientation) or "sample" (joint fit over ω-groups).
    values, esds : ndarray (6,), float64
        Components in ``COMPONENTS`` order; NaN where not determined. A component held fixed
        (see ``fixed``) carries its fixed value and esd NaN.
    covariance : ndarray (6, 6)
        Covariance propagated from the input esds (not scaled by χ²/dof); NaN rows/columns for
        components that are not determined.
    determined : ndarray (6,), bool
        Components the data determine (estimable: in the row space of the weighted design).
    fixed : dict[str, float]
        Components held at a value instead of fitted.
    n_points, dof : int
    chi2 : float
        Σ ((ε − model)/esd)².
    status : str
        "ok" (every free component determined), "partial" (some weak ones not determined) or
        "degenerate" (ε_yy, ε_zz or ε_yz not determined, or too few points; values NaN).
    message : str
    """

    frame: str
    values: np.ndarray
    esds: np.ndarray
    covariance: np.ndarray
    determined: np.ndarray
    fixed: dict[str, float] = field(default_factory=dict)
    n_points: int = 0
    dof: int = 0
    chi2: float = float("nan")
    status: str = "degenerate"
    message: str = ""

    def tensor(self) -> np.ndarray:
        """The fitted 3×3 tensor (NaN where not determined)."""
        return tensor_from_components(self.values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: per component value, esd and whether it is determined."""
        def num(v: float) -> float | None:
            return None if not np.isfinite(v) else float(v)

        return {
            "frame": self.frame,
            "status": self.status,
            "message": self.message,
            "n_points": int(self.n_points),
            "dof": int(self.dof),
            "chi2": num(self.chi2),
            "fixed": {k: float(v) for k, v in self.fixed.items()},
            "components": {
                name: {"value": num(v), "esd": num(e), "determined": bool(d)}
                for name, v, e, d in zip(COMPONENTS, self.values, self.esds, self.determined, strict=True)
            },
        }


def _validated(*arrays: Any) -> tuple[np.ndarray, ...]:
    out = np.broadcast_arrays(*(np.asarray(a, dtype=float).ravel() for a in arrays))
    return tuple(np.array(a) for a in out)


def _weighted_fit(
    design: np.ndarray,
    eps: np.ndarray,
    eps_esd: np.ndarray,
    *,
    frame: str,
    fixed: Mapping[str, float],
    cond_max: float,
) -> StrainFit:
    """Weighted LSQ on the free columns with an estimability check (truncated SVD)."""
    nan6 = np.full(6, np.nan)
    good = np.isfinite(eps) & np.isfinite(eps_esd) & (eps_esd > 0) & np.all(np.isfinite(design), axis=1)
    design, eps, eps_esd = design[good], eps[good], eps_esd[good]
    free = [k for k, name in enumerate(COMPONENTS) if name not in fixed]
    values, esds = nan6.copy(), nan6.copy()
    cov = np.full((6, 6), np.nan)
    determined = np.zeros(6, dtype=bool)
    for name, v in fixed.items():
        values[COMPONENTS.index(name)] = v
    n = len(eps)
    if n <= len(free):
        return StrainFit(frame, values, esds, cov, determined, dict(fixed), n, 0, np.nan, "degenerate",
                         f"{n} usable points for {len(free)} free components")
    fixed_vec = np.array([fixed.get(name, 0.0) for name in COMPONENTS])
    w = 1.0 / eps_esd
    a = design[:, free] * w[:, None]
    b = (eps - design @ fixed_vec) * w
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    u, s, vt = np.linalg.svd(a / scale, full_matrices=False)
    keep = s > s[0] / cond_max
    null = vt[~keep]
    est = np.ones(len(free), dtype=bool) if null.size == 0 else np.linalg.norm(null, axis=0) < 1e-6
    x = vt[keep].T @ ((u[:, keep].T @ b) / s[keep])
    cov_free = (vt[keep].T / s[keep] ** 2) @ vt[keep]
    x, cov_free = x / scale, cov_free / np.outer(scale, scale)
    resid = b - a @ x
    rank = int(keep.sum())
    for i, k in enumerate(free):
        if est[i]:
            determined[k] = True
            values[k] = x[i]
            esds[k] = np.sqrt(cov_free[i, i])
            for j, kk in enumerate(free):
                if est[j]:
                    cov[k, kk] = cov_free[i, j]
    missing = [COMPONENTS[k] for i, k in enumerate(free) if not est[i]]
    chi2 = float(resid @ resid)
    if any(name in missing for name in _IN_PLANE if name not in fixed):
        values[free] = np.nan
        esds[:] = np.nan
        cov[:] = np.nan
        determined[:] = False
        status, message = "degenerate", "not determined: " + ", ".join(missing)
    elif missing:
        status, message = "partial", "not determined: " + ", ".join(missing)
    else:
        status, message = "ok", ""
    return StrainFit(frame, values, esds, cov, determined, dict(fixed), n, n - rank, chi2, status, message)


def fit_strain_orientation(
    eta_deg: Any,
    theta_deg: Any,
    eps: Any,
    eps_esd: Any,
    *,
    eps_xx: float | None = 0.0,
    cond_max: float = 1e8,
    design: Any = None,
) -> StrainFit:
    """Fit the lab-frame strain components seen in one ω-orientation from ε(η).

    ε_n = ε_xx sin²θ + cos²θ (ε_yy sin²η + ε_zz cos²η − 2 ε_yz sin η cos η)
          + 2 sin θ cos θ (ε_xy sin η − ε_xz cos η)

    ε_yy, ε_zz, ε_yz are well constrained; ε_xy and ε_xz only through sin θ (esds about 1/(2θ)
    times larger). ε_xx enters as sin²θ·ε_xx, which cannot be told apart from a common shift of
    ε_yy and ε_zz when every lineout has about the same θ, so by default it is held at
    ``eps_xx`` (0): the bias this puts on ε_yy and ε_zz is tan²θ·ε_xx (≈ 3e-3·ε_xx at θ = 3°).
    Pass ``eps_xx=None`` to fit it too; it is then reported as determined only if the θ spread
    makes it estimable.

    Parameters
    ----------
    eta_deg, theta_deg : array_like (n,), degrees
        MIDAS azimuth and Bragg angle θ of each lineout (θ broadcasts).
    eps, eps_esd : array_like (n,)
        Lattice strain and its esd per lineout; points with NaN or esd ≤ 0 are ignored.
    eps_xx : float or None
        Value ε_xx is held at, or ``None`` to fit it.
    cond_max : float
        Singular values of the column-normalised weighted design below s_max/cond_max count as
        zero; components with weight on those directions are reported as not determined.
    design : array_like (n, 6), optional
        Rows replacing ``design_matrix(theta, eta)``, e.g. :func:`lineout_design` (averaged over
        each lineout's reflections and η bin).

    Returns
    -------
    StrainFit
        ``frame == "lab"``; status "degenerate" (values NaN) when ε_yy, ε_zz or ε_yz cannot be
        determined (e.g. fewer than four distinct η), never a silently wrong answer.
    """
    eta, theta, e, s = _validated(eta_deg, theta_deg, eps, eps_esd)
    fixed = {} if eps_xx is None else {"xx": float(eps_xx)}
    rows = design_matrix(theta, eta) if design is None else _design_rows(design, e.size)
    return _weighted_fit(rows, e, s, frame="lab", fixed=fixed, cond_max=cond_max)


def fit_strain_tensor(
    eta_deg: Any,
    theta_deg: Any,
    omega_deg: Any,
    eps: Any,
    eps_esd: Any,
    *,
    cond_max: float = 1e8,
    design: Any = None,
) -> StrainFit:
    """Joint fit of all six sample-frame components from lineouts at several ω.

    Parameters
    ----------
    eta_deg, theta_deg, omega_deg : array_like (n,), degrees
        MIDAS azimuth, Bragg angle and sample rotation about +z of each lineout (broadcast).
    eps, eps_esd : array_like (n,)
        Lattice strain and esd per lineout; NaN or esd ≤ 0 points are ignored.
    cond_max : float
        As in :func:`fit_strain_orientation`.
    design : array_like (n, 6), optional
        Rows replacing ``design_matrix(theta, eta, omega)``, e.g. :func:`lineout_design` with
        the ω of each group's frames.

    Returns
    -------
    StrainFit
        ``frame == "sample"``. With two ω-groups 90° apart all six components are determined;
        with a single ω (or ω and ω + 180°) and one θ, ε_xx, ε_yy, ε_zz are not separable and
        the fit is reported "degenerate" (use :func:`fit_strain_orientation` there).
    """
    eta, theta, omega, e, s = _validated(eta_deg, theta_deg, omega_deg, eps, eps_esd)
    rows = design_matrix(theta, eta, omega) if design is None else _design_rows(design, e.size)
    return _weighted_fit(rows, e, s, frame="sample", fixed={}, cond_max=cond_max)


def _design_rows(design: Any, n: int) -> np.ndarray:
    rows = np.asarray(design, dtype=float).reshape(-1, 6)
    if rows.shape[0] != n:
        raise ValueError(f"strain fit: {rows.shape[0]} design rows for {n} measurements")
    return rows
