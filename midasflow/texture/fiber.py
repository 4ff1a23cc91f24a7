"""Known fibre textures for simulated scans: pole densities of reflections at sample directions.

:class:`FiberTexture` has cylindrical symmetry about a sample axis and is either

* ``'md'`` — March–Dollase: crystallites' [hkl] axis ``md_axis`` is distributed about the sample
  axis with density f(α) = (r² cos²α + sin²α/r)^(−3/2) (normalised over the hemisphere). The
  pole density of reflection h at a sample direction y at angle χ from the sample axis averages
  f over the crystallites with some equivalent h_j along y: with δ_j the angle between h_j and
  the axis, cos α = cos χ cos δ_j + sin χ sin δ_j cos φ over the rotation φ about y,

      P_h(y) = (1/N) Σ_j (1/2π) ∫ f(α(φ)) dφ,

  which at χ = 0 is GSAS-II's March–Dollase factor (the per-pattern correction the engine
  refines);
* ``'sh'`` — GSAS-II's cylindrical spherical-harmonics texture, A(h, y) = 1 + Σ C(l,0,n)
  (4π/(2l+1)) K_l^n(h) K_l^0(ψ) (:func:`midasflow.texture.po.sh_po_design`), with
  coefficient names ``C(l,n)`` or ``C(l,0,n)``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["FiberTexture"]

#: Quadrature points over the rotation about the scattering vector (March–Dollase).
_N_PHI = 96


@dataclass(frozen=True)
class FiberTexture:
    """A fibre texture (module docstring).

    Attributes
    ----------
    kind : {'md', 'sh'}
    sample_axis : (3,)
        Fibre axis in the sample frame (lab frame turned by ω about +z).
    md_ratio : float
        March–Dollase r (< 1: ``md_axis`` along the fibre axis, platelets).
    md_axis : (3,) int
        Crystal direction, reciprocal-lattice [h, k, l].
    coefficients : mapping
        SH coefficients ``C(l,n)`` / ``C(l,0,n)`` → value.
    """

    kind: str
    sample_axis: tuple[float, float, float] = (0.0, 0.0, 1.0)
    md_ratio: float = 1.0
    md_axis: tuple[int, int, int] = (0, 0, 1)
    coefficients: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("md", "sh"):
            raise ValueError(f"FiberTexture kind {self.kind!r}: expected 'md' or 'sh'")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description."""
        return {"kind": self.kind, "sample_axis": [float(v) for v in self.sample_axis],
                "md_ratio": float(self.md_ratio), "md_axis": [int(v) for v in self.md_axis],
                "coefficients": {k: float(v) for k, v in self.coefficients.items()}}

    def pole_density(self, phase: Any, hkl: np.ndarray, directions: np.ndarray) -> np.ndarray:
        """Pole density of each reflection at sample directions.

        Parameters
        ----------
        phase : midasflow.crystal.Phase
        hkl : (n, 3)
        directions : (..., n, 3)
            Unit sample-frame directions, one per reflection (broadcast).

        Returns
        -------
        ndarray (..., n)
        """
        from midasflow.crystal import _A_to_G, cell_to_A, laue_rotations

        hkl = np.atleast_2d(np.asarray(hkl, float))
        d = np.broadcast_to(np.asarray(directions, float), directions.shape[:-2] + (hkl.shape[0], 3))
        axis = np.asarray(self.sample_axis, float)
        axis = axis / np.linalg.norm(axis)
        cos_chi = np.clip(d @ axis, -1.0, 1.0)
        if self.kind == "sh":
            from midasflow.texture.po import sh_po_design

            names = list(self.coefficients)
            psi = np.degrees(np.arccos(np.abs(cos_chi)))
            flat_h = np.broadcast_to(hkl, psi.shape + (3,)).reshape(-1, 3)
            D = sh_po_design(flat_h, phase.cell, phase.laue, names, psi.ravel(), phase.unique_axis)
            return (1.0 + D @ np.array([self.coefficients[n] for n in names])).reshape(psi.shape)
        G = _A_to_G(cell_to_A(phase.cell))
        eq = np.einsum("ni,rij->nrj", hkl, laue_rotations(phase.space_group))      # (n, N, 3)
        P = np.asarray(self.md_axis, float)
        cos_delta = np.einsum("nri,ij,j->nr", eq, G, P) / np.sqrt(
            np.einsum("nri,ij,nrj->nr", eq, G, eq) * (P @ G @ P))
        sin_delta = np.sqrt(np.clip(1.0 - cos_delta ** 2, 0.0, 1.0))
        sin_chi = np.sqrt(np.clip(1.0 - cos_chi ** 2, 0.0, 1.0))
        phi = (np.arange(_N_PHI) + 0.5) * (2 * np.pi / _N_PHI)
        cos_a = (cos_chi[..., None, None] * cos_delta[..., None]
                 + sin_chi[..., None, None] * sin_delta[..., None] * np.cos(phi))
        r = float(self.md_ratio)
        f = (r * r * cos_a ** 2 + (1.0 - cos_a ** 2) / r) ** -1.5
        return f.mean(axis=(-1, -2))
