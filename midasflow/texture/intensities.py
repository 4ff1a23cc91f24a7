"""Per-reflection integrated intensities of one refined pattern, with esds (Pawley style).

With the refined profile, positions and background held, the pattern is linear in the
reflections' integrated intensities: y_i − b_i = Σ_h I_h Ω_h(x_i) (Ω_h the unit-intensity peak
of reflection h, per centidegree, as :func:`midasflow.profile.pattern` computes it). The weighted
least-squares solution gives every I_h with its esd from (ΩᵀWΩ)⁻¹ scaled by the fit's GOF²; it is
the observed intensity of each reflection whatever the model's |F|² and texture are, so it carries
the texture the pole figures need. Reflections at the same 2θ (within :data:`COINCIDENT_DEG`)
cannot be told apart: their sum is fitted and shared in the ratio of the model's intensities.
Reflections with no point of the pattern under them get NaN.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from midasflow.refinement.engine import PatternModel

__all__ = ["COINCIDENT_DEG", "extract_intensities"]

#: Reflections closer than this in 2θ (deg) are fitted as one (exact overlaps, e.g. 333/511).
COINCIDENT_DEG = 1e-6


def extract_intensities(model: PatternModel, values: Mapping[str, float], y: np.ndarray,
                        sqrt_w: np.ndarray, gof: float,
                        evaluated: tuple | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Integrated intensity and esd of every reflection of every phase (module docstring).

    Parameters
    ----------
    model : midasflow.refinement.engine.PatternModel
    values : mapping
        The refined parameters.
    y, sqrt_w : ndarray (n,)
        Observed points and the square roots of their weights.
    gof : float
        The refinement's GOF; esds are scaled by it (as the parameters' are).
    evaluated : tuple, optional
        What ``PatternModel._evaluate`` made its evaluation at ``values`` of (reflection terms
        and peak sum): the unit profiles are taken from that peak sum instead of evaluated again
        (they do not depend on the intensities).

    Returns
    -------
    dict phase name → (i_obs, i_obs_esd), each (n_reflections,) in the units of the model's
    ``intensity`` (counts·centidegree).
    """
    rt, terms, unit = evaluated if evaluated is not None else (*model._all_terms(values), None)
    n = len(rt["tth"])
    i_obs, i_esd = np.full(n, np.nan), np.full(n, np.nan)
    if n and np.all(np.isfinite(rt["tth"])):
        if unit is None:
            unit = model._peaks(rt, values["SH/L"], False, intensity=np.ones(n))
        # coincident reflections: one column, shared in the model's intensity ratio
        order = np.argsort(rt["tth"], kind="stable")
        group = np.zeros(n, dtype=int)
        group[order] = np.cumsum(np.r_[0, np.diff(rt["tth"][order]) > COINCIDENT_DEG])
        share = np.maximum(np.asarray(rt["intensity"], float), 0.0)
        total = np.bincount(group, weights=share)
        share = np.where(total[group] > 0, share / np.where(total[group] > 0, total[group], 1.0),
                         1.0 / np.bincount(group)[group])
        # design (n_points, n_groups): every unit peak (its entries over its window) times its
        # share, summed into its group's column
        n_groups = int(group.max()) + 1
        peak_of = np.repeat(np.arange(n), unit.hi - unit.lo)
        cell = unit.entry_points() * n_groups + group[peak_of]
        design = np.bincount(cell, weights=unit.d_intensity * share[peak_of],
                             minlength=y.size * n_groups).reshape(y.size, n_groups)
        design *= sqrt_w[:, None]
        normal = design.T @ design
        seen = np.diag(normal) > 0
        if seen.any():
            rhs = design.T @ (sqrt_w * (y - model.background(values)))
            sub = normal[np.ix_(seen, seen)]
            scale = np.sqrt(np.diag(sub))
            inv = np.linalg.pinv(sub / np.outer(scale, scale), rcond=1e-12) / np.outer(scale, scale)
            sol, var = np.full(seen.size, np.nan), np.full(seen.size, np.nan)
            sol[seen] = inv @ rhs[seen]
            var[seen] = np.diag(inv)
            i_obs = sol[group] * share
            i_esd = np.sqrt(np.maximum(var[group], 0.0)) * share * float(gof)
    out, start = {}, 0
    for pd, t in zip(model.phases, terms):
        k = len(t["tth"])
        out[pd.phase.name] = (i_obs[start:start + k], i_esd[start:start + k])
        start += k
    return out
