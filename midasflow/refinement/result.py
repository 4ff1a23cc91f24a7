"""Result of one single-pattern refinement (picklable; travels between dask workers)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from midasflow.crystal import Phase, write_phase_cif
from midasflow.io.atomic import atomic_output

__all__ = ["PatternResult"]


@dataclass
class PatternResult:
    """Outcome of :func:`midasflow.refinement.engine.refine_pattern`.

    Attributes
    ----------
    status : str
        ``'ok'`` or ``'failed'``.
    message : str
        One line; empty when everything went well.
    rwp, rp : float
        Weighted and plain profile R, percent (§5).
    chi2 : float
        Σ w (y − y_calc)².
    gof : float
        sqrt(χ² / (N_obs − N_var)).
    n_points : int
        Points used (inside the limits, finite, σ > 0).
    n_dropped : int
        Points inside the limits dropped for NaN intensity or σ ≤ 0 / NaN σ.
    stage_rwp : dict
        Stage name → Rwp (%) after that stage (after a rollback: the kept value).
    values, esds : dict
        GSAS-II parameter name → value / esd (esds only for refined parameters).
    cells, cell_esds : dict
        Phase name → (a, b, c, α, β, γ, V) in Å, deg, Å³ and their esds.
    phase_fractions : dict
        Phase name → (weight fraction, esd); weight fraction ∝ phase scale × cell mass (GSAS-II).
    tth_deg, obs, calc, bkg : ndarray (n_points,)
        The fitted points: 2θ (deg), observed, calculated (incl. background), background.
    reflections : dict
        Phase name → dict of equal-length arrays: h, k, l, mult, d_a, tth_deg, sig2, gam, fsq,
        intensity (I_h of §3.1).
    warnings : list of str
    phases : list of Phase
        The refined phases (cell updated; atoms updated when refined), used by :meth:`write_cifs`.
    """

    status: str
    message: str
    rwp: float
    rp: float
    chi2: float
    gof: float
    n_points: int
    n_dropped: int
    stage_rwp: dict[str, float] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)
    esds: dict[str, float] = field(default_factory=dict)
    cells: dict[str, tuple[float, ...]] = field(default_factory=dict)
    cell_esds: dict[str, tuple[float, ...]] = field(default_factory=dict)
    phase_fractions: dict[str, tuple[float, float]] = field(default_factory=dict)
    tth_deg: np.ndarray = field(default_factory=lambda: np.zeros(0))
    obs: np.ndarray = field(default_factory=lambda: np.zeros(0))
    calc: np.ndarray = field(default_factory=lambda: np.zeros(0))
    bkg: np.ndarray = field(default_factory=lambda: np.zeros(0))
    reflections: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write columns ``tth_deg, obs, calc, bkg, diff`` (diff = obs − calc); atomic write.

        Returns
        -------
        Path
        """
        path = Path(path)
        table = np.column_stack([self.tth_deg, self.obs, self.calc, self.bkg,
                                 self.obs - self.calc])
        with atomic_output(path) as tmp:
            np.savetxt(tmp, table, delimiter=",", fmt="%.10g",
                       header="tth_deg,obs,calc,bkg,diff", comments="")
        return path

    def write_cifs(self, folder: str | os.PathLike, stem: str) -> list[Path]:
        """Write one refined CIF per phase, ``<folder>/<stem>_<phase>.cif``.

        Returns
        -------
        list of Path
        """
        folder = Path(folder)
        out = []
        for ph in self.phases:
            esd = self.cell_esds.get(ph.name)
            out.append(write_phase_cif(ph, folder / f"{stem}_{ph.name}.cif", esd))
        return out
