"""Per-pattern preferred-orientation corrections: March–Dollase along a chosen axis and GSAS-II's
spherical-harmonics model with cylindrical sample symmetry (``docs/reference/texture_model.md``).

:class:`PreferredOrientation` is what the refinement engine
(:class:`midasflow.refinement.engine.PatternModel`) asks for the correction PO_h of each
reflection and its derivatives with respect to the refined texture parameters; the parameter
names are GSAS-II's (``p:0:MD``; ``p:0:C(l,n)``). The March–Dollase factor itself is
:func:`midasflow.profile.march_dollase`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from midasflow.profile import march_dollase
from midasflow.refinement.options import TEXTURE_MODELS
from midasflow.texture import harmonics as _sh

__all__ = ["TEXTURE_MODELS", "PreferredOrientation", "sh_po_design"]

def sh_po_design(hkl: ArrayLike, cell: Sequence[float], laue: str, names: Sequence[str],
                 psi_deg: ArrayLike, unique_axis: str = "b") -> NDArray[np.float64]:
    """∂A/∂C of the spherical-harmonics preferred orientation (GSAS-II ``SHPOcal``).

    A(h) = 1 + Σ_k C_k · D[h, k] with D[h, k] = (4π/(2l+1)) · K_l^n(Φ_h, β_h) · K_l^0(ψ_h).

    Parameters
    ----------
    hkl : (n, 3)
    cell : (a, b, c, α, β, γ)
        Sets the crystal angles Φ, β (:func:`midasflow.texture.harmonics.crystal_angles`).
    laue : str
    names : sequence of str
        ``C(l,n)`` names (:func:`midasflow.texture.harmonics.coefficient_names`).
    psi_deg : (n,) or scalar
        Polar angle of each reflection's scattering vector from the sample axis, degrees.
        GSAS-II's Debye–Scherrer histogram with zero sample angles has ψ = θ; Bragg–Brentano
        has ψ = 90°.
    unique_axis : str

    Returns
    -------
    ndarray (n, len(names))
    """
    H = np.atleast_2d(np.asarray(hkl, dtype=float))
    phi, beta = _sh.crystal_angles(H, cell, laue, unique_axis)
    psi = np.broadcast_to(np.asarray(psi_deg, dtype=float), (H.shape[0],))
    out = np.empty((H.shape[0], len(names)))
    sample: dict[int, np.ndarray] = {}
    for k, name in enumerate(names):
        l, _, n = _sh.parse_name(name)
        if l not in sample:
            sample[l] = _sh.sample_harmonic(l, 0, psi)
        out[:, k] = _sh.l_norm(l) * _sh.crystal_harmonic(l, n, laue, phi, beta) * sample[l]
    return out


class PreferredOrientation:
    """The texture correction of one phase in one pattern.

    Parameters
    ----------
    kind : {None, 'md', 'sh'}
        None: March–Dollase with r as given (1 = none), not refined by the texture stage.
    prefix : str
        Parameter-name prefix of the phase, ``'p:0:'``.
    hkl : (n, 3)
    equivalents : (n, N, 3)
        Symmetry equivalents (March–Dollase).
    cell : (a, b, c, α, β, γ)
        Cell fixing the angles (the starting cell; the angles' dependence on the refined cell
        is neglected, as the engine documents).
    laue, unique_axis : str
    po_axis : (3,)
        March–Dollase axis [h, k, l].
    sh_order : int
        Highest l of the spherical harmonics (even l = 2 … order).
    """

    def __init__(self, kind: str | None, prefix: str, hkl: ArrayLike, equivalents: ArrayLike,
                 cell: Sequence[float], laue: str, unique_axis: str = "b",
                 po_axis: Sequence[int] = (0, 0, 1), sh_order: int = 4):
        from midasflow.crystal import _A_to_G, cell_to_A

        if kind not in TEXTURE_MODELS:
            raise ValueError(f"texture {kind!r}: expected one of None, 'md', 'sh'")
        self.kind = kind
        self.hkl = np.asarray(hkl, dtype=float)
        self.equivalents = np.asarray(equivalents)
        self.cell = tuple(float(c) for c in cell)
        self.laue, self.unique_axis = laue, unique_axis
        self.G = _A_to_G(cell_to_A(self.cell))
        self.po_axis = tuple(int(v) for v in po_axis)
        self.md_name = f"{prefix}MD"
        self.sh_order = int(sh_order)
        self.sh_names = ([f"{prefix}{n}" for n in _sh.coefficient_names(laue, self.sh_order)]
                         if kind == "sh" else [])
        self._sh_memo: tuple = (None, None)

    @property
    def names(self) -> list[str]:
        """Parameters the texture stage refines (empty for ``kind`` None or when the Laue class
        allows no harmonic up to the order)."""
        return {"md": [self.md_name], "sh": list(self.sh_names)}.get(self.kind, [])

    def initial_values(self) -> dict[str, float]:
        """Start values: no texture (MD r = 1, every C = 0)."""
        return {self.md_name: 1.0, **{n: 0.0 for n in self.sh_names}}

    def design(self, psi_deg: ArrayLike) -> NDArray[np.float64]:
        """The SH design matrix D (n, k) at ``psi_deg`` (memoised on ψ)."""
        psi = np.asarray(psi_deg, dtype=float)
        key, value = self._sh_memo
        if key is not None and key.shape == psi.shape and np.array_equal(key, psi):
            return value
        bare = [n.rsplit(":", 1)[-1] for n in self.sh_names]
        value = sh_po_design(self.hkl, self.cell, self.laue, bare, psi, self.unique_axis)
        self._sh_memo = (psi.copy(), value)
        return value

    def correction(self, values: Mapping[str, float], vary: Sequence[str],
                   tth_deg: ArrayLike) -> tuple[np.ndarray | float, dict[str, np.ndarray]]:
        """PO_h of every reflection and ∂PO_h/∂(refined texture parameter).

        Parameters
        ----------
        values : mapping of parameter name → value
        vary : sequence of str
            Refined parameters (derivatives are returned for those among :attr:`names` and MD).
        tth_deg : (n,)
            Reflection 2θ; the SH sample angle is ψ = θ (GSAS-II's Debye–Scherrer histogram
            with zero sample angles).

        Returns
        -------
        po : ndarray (n,) or 1.0
        derivatives : dict name → ndarray (n,)
        """
        r = values.get(self.md_name, 1.0)
        po: np.ndarray | float = 1.0
        deriv: dict[str, np.ndarray] = {}
        if r != 1.0 or self.md_name in vary:
            po, dpo = march_dollase(self.equivalents, self.po_axis, r, self.G)
            deriv[self.md_name] = dpo
        if self.sh_names and (any(values[n] for n in self.sh_names)
                              or any(n in vary for n in self.sh_names)):
            D = self.design(0.5 * np.asarray(tth_deg, dtype=float))
            coef = np.array([values[n] for n in self.sh_names])
            a_sh = 1.0 + D @ coef
            for k, name in enumerate(self.sh_names):
                deriv[name] = D[:, k] * po
            for name in list(deriv):
                if name == self.md_name:
                    deriv[name] = deriv[name] * a_sh
            po = po * a_sh
        return po, deriv
