"""Result of one single-pattern refinement (picklable; travels between dask workers)."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from midasflow.crystal import Phase, write_phase_cif
from midasflow.io.atomic import atomic_output

__all__ = ["FLAGS", "PatternResult"]

#: Quality flags a :class:`PatternResult` may carry (the fixed vocabulary) and their meaning.
#: Each raised flag also adds a warning ``"<flag>: <details>"`` naming what was found. See
#: ``docs/reference/gsas2_profile.md`` (quality flags).
FLAGS: dict[str, str] = {
    "unphysical_profile": "Gaussian σ² ≤ 0 or Lorentzian γ < 0 somewhere in the fitted 2θ range "
                          "(unfloored U..Z/size/microstrain formulas; GSAS-II floors them at "
                          "0.001 and so does the model)",
    "at_bound": "a refined parameter ended on a bound: a scale, phase fraction, size or "
                "March–Dollase ratio driven to 0, or (physical_profile) σ²/γ held at their "
                "bounds",
    "rolled_back": "a refinement stage diverged or raised Rwp and was undone",
    "texture_rolled_back": "the optional texture stage (--texture) diverged, raised Rwp or left "
                           "the texture undetermined and was undone: the result is the "
                           "refinement without texture",
    "high_correlation": "two refined parameters of different kinds correlate with |r| > 0.95 "
                        "(the warning names the pairs; pairs within U/V/W, X/Y/Z or the "
                        "background terms are only noted)",
    "bad_esd": "a refined parameter has a non-finite or zero esd (singular normal matrix)",
    "rwp_above_max": "Rwp is above the maximum the caller set (PatternResult.with_max_rwp)",
    "shl_at_floor": "the refined FCJ asymmetry SH/L ended on GSAS-II's floor 0.002: if the true "
                    "asymmetry is at or below it the cell is biased by ~0.4·ρ(cell, SH/L) esd, "
                    "the same way on every such lineout",
}


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
        Weighted and plain profile R, percent.
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
    weight : ndarray (n_points,)
        Their least-squares weights 1/σ² (GSAS-II's w); empty when the backend gives none.
    covariance : ndarray (n_var, n_var) or None
        Covariance of the refined parameters, rows and columns in the order of ``esds``
        (its diagonal is esds²); None when the backend gives none.
    reflections : dict
        Phase name → dict of equal-length arrays: h, k, l, mult, d_a, tth_deg, sig2, gam, fsq,
        intensity (integrated intensity I_h of the model, counts·centideg) and, from the native
        engine, i_obs / i_obs_esd (the intensity the pattern shows with the refined profile
        held, and its esd: :func:`midasflow.texture.intensities.extract_intensities`).
    warnings : list of str
        Human-readable notes; a raised flag's note starts with ``"<flag>: "``.
    phases : list of Phase
        The refined phases (cell updated; atoms updated when refined), used by :meth:`write_cifs`.
    flags : tuple of str
        Quality flags raised (names from :data:`FLAGS`, in the order raised); empty for a clean
        fit. ``status`` stays 'ok' for a flagged fit.
    notes : list of str
        Information that is no warning: where the start values came from (measured peak
        widths beside the instrument's, or given ``start`` values), parameters held.
    dropped_range_deg : (float, float) or None
        The fitted points' 2θ range (deg) once :meth:`without_curves` has dropped the points;
        read it through :attr:`fitted_range_deg`.
    converged : bool
        Whether the minimisation of the last stage kept ended on its convergence test (False:
        it ran out of cycles or found no step lowering χ²); True from backends that do not say.
    noise_correlation : tuple of float
        The correlation of neighbouring points' noise the covariance accounts for (lag 0, 1, …
        in units of σσ; ``refine_pattern(noise_correlation=...)``); empty: independent points.
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
    weight: np.ndarray = field(default_factory=lambda: np.zeros(0))
    covariance: np.ndarray | None = None
    reflections: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    flags: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)
    dropped_range_deg: tuple[float, float] | None = None
    converged: bool = True
    noise_correlation: tuple[float, ...] = ()

    @property
    def fitted_range_deg(self) -> tuple[float, float] | None:
        """(lowest, highest) 2θ of the fitted points, deg, also after :meth:`without_curves`
        dropped them; None when nothing was fitted."""
        if len(self.tth_deg):
            return float(np.min(self.tth_deg)), float(np.max(self.tth_deg))
        return self.dropped_range_deg

    def without_curves(self) -> "PatternResult":
        """This result without its per-point arrays (``tth_deg``, ``obs``, ``calc``, ``bkg``,
        ``weight``) and covariance: the numbers, flags, reflection tables and the fitted 2θ range
        (:attr:`fitted_range_deg`) stay. What a run
        keeps of the lineouts it does not plot, once their exports are written."""
        empty = np.zeros(0)
        return dataclasses.replace(self, tth_deg=empty, obs=empty, calc=empty, bkg=empty,
                                   weight=empty, covariance=None, dropped_range_deg=self.fitted_range_deg)

    def with_max_rwp(self, max_rwp: float | None) -> "PatternResult":
        """This result, flagged ``rwp_above_max`` if its Rwp (%) exceeds ``max_rwp``.

        Parameters
        ----------
        max_rwp : float or None
            Largest acceptable Rwp, percent; None (or a failed result) returns ``self``.

        Returns
        -------
        PatternResult
            A copy with the flag and a warning added, or ``self`` unchanged.
        """
        if (max_rwp is None or self.status != "ok" or "rwp_above_max" in self.flags
                or not (math.isfinite(self.rwp) and self.rwp > max_rwp)):
            return self
        return dataclasses.replace(
            self, flags=self.flags + ("rwp_above_max",),
            warnings=self.warnings + [f"rwp_above_max: Rwp {self.rwp:.4g} % > {max_rwp:g} %"])

    def with_independent_fraction(self, fraction: float) -> "PatternResult":
        """This result with its esds rescaled for bins that share detector pixels.

        The esds of a GOF-scaled least-squares fit assume χ² ≈ N − n for a right model; when
        only a fraction f of each point's variance is independent noise (neighbouring bins of a
        pixel-split cake, :func:`midasflow.refinement.lineouts.independent_fraction`) a right
        model gives χ² ≈ f·N − n instead. Every esd (parameters, cells, phase fractions) is
        multiplied by sqrt((N − n)/(f·N − n)) (the covariance by its square), n = the refined
        parameters (and so are the reflections' ``i_obs_esd``); ``gof`` stays
        GSAS-II's, over all points, and a note gives the factor.

        A result whose covariance already accounts for the points' correlation
        (:attr:`noise_correlation`, the native engine's) is returned as it is.

        Parameters
        ----------
        fraction : float
            f in (0, 1]; 1 (or a failed result) returns ``self``.

        Returns
        -------
        PatternResult
        """
        f = float(fraction)
        if self.status != "ok" or not (0.0 < f < 1.0) or not self.n_points or self.noise_correlation:
            return self
        n, n_var = float(self.n_points), float(len(self.esds))
        factor = math.sqrt(max(n - n_var, 1.0) / max(f * n - n_var, 1.0))
        gof = self.gof / factor
        return dataclasses.replace(
            self, esds={k: v * factor for k, v in self.esds.items()},
            covariance=None if self.covariance is None else self.covariance * factor**2,
            cell_esds={k: tuple(float(v) * factor for v in esd) for k, esd in self.cell_esds.items()},
            phase_fractions={k: (v[0], v[1] * factor) for k, v in self.phase_fractions.items()},
            reflections={ph: ({**t, "i_obs_esd": t["i_obs_esd"] * factor} if "i_obs_esd" in t else t)
                         for ph, t in self.reflections.items()},
            notes=self.notes + [f"esds × {factor:.3g}: neighbouring bins share detector pixels (f = {f:.3g} "
                                f"of each point's variance independent; GOF over independent points "
                                f"{gof:.3g})"])

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
