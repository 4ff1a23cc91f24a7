"""Warm starts: a lineout started from a good seed runs a short recipe, guarded by the full one.

A seed is another refinement of the same phases with the same options: the ω-group's η-averaged
pattern, or another lineout. When it is good (``"ok"``, no quality flag, a covariance, SH/L at
most 0.005: :func:`seed_refusal`), a
lineout it seeds needs no staged approach to the minimum: it starts from the seed's profile,
background, scales and cell and runs :func:`~midasflow.refinement.recipe.warm_stages` over the
seed's final vary list. That fit is checked (:func:`fallback_reason`): if it failed, is flagged,
did not converge, or fits clearly worse than the seed (its GOF above :data:`GOF_MARGIN` × the
seed's), the lineout is refined again with the whole recipe from the seed's values (what it
gets without warm starts), and the result's notes say which recipe made it and why
(:func:`refine_warm`).

Measured (docs/reference/gsas2_profile.md, warm starts; ``benchmarks/bench_warm.py``): in double
precision the warm results are the full recipe's within 0.04 esd, for ~55 % of its CPU time.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

from midasflow.profile import SHL_MIN
from midasflow.refinement.recipe import Stage, warm_stages
from midasflow.refinement.result import PatternResult

__all__ = ["GOF_MARGIN", "MAX_SHL", "RECIPES", "TOLERATED_FLAGS", "fallback_reason", "refine_warm",
           "seed_refusal", "warm_vary"]

#: A warm fit whose GOF exceeds the seed's by more than this factor is refined again in full.
#: Full-recipe lineouts of simulated scans end at 1.06–1.19 × their group mean's GOF; a warm fit
#: stuck on a step of χ² ended at 2–4 ×.
GOF_MARGIN = 1.5
#: A seed whose SH/L is above this gets no warm start (:func:`seed_refusal`; GSAS-II's floor is 0.002).
MAX_SHL = 0.005
#: What ``LineoutResult.recipe`` may say: the whole staged recipe, the warm one, or the whole
#: recipe after a warm fit was refused.
RECIPES = ("full", "warm", "full after warm")

#: Flags that refuse neither a seed nor a warm fit: ``shl_at_floor`` marks SH/L on its floor,
#: which is where warm starts are measured equal to the full recipe (the cell's possible floor
#: bias is the full recipe's too).
TOLERATED_FLAGS = ("shl_at_floor",)

#: ``fit(stages, start)``: the refinement of one pattern with a recipe (None: the backend's own)
#: from start values (None: from the data).
Fit = Callable[[Sequence[Stage] | None, Mapping[str, float] | None], PatternResult]


def seed_refusal(seed: PatternResult) -> str:
    """Why ``seed`` cannot start a warm fit ("" when it can): it is not "ok", carries a
    quality flag (but :data:`TOLERATED_FLAGS`), has no esds (nothing was refined), or its SH/L
    is above :data:`MAX_SHL`.

    With a large SH/L the FCJ asymmetry's quadrature order jumps with it, so χ² has steps and
    the full recipe's own minimum moves with the start (seeded and unseeded full fits of one
    simulated scan with SH/L 0.01: up to 4 esd apart in `a`, in float64); a warm fit there ended
    up to 0.9 esd from the seeded full one, and half of them did not converge. With SH/L 0.0022,
    0.003 and 0.005 warm fits ended within 0.003, 0.006 and 0.018 esd of the full ones, none
    refused (36 lineouts each)."""
    defect = _defect(seed)
    if defect:
        return f"the seed is {defect}"
    if not seed.esds:
        return "the seed refined nothing"
    if seed.values.get("SH/L", SHL_MIN) > MAX_SHL:
        return f"its SH/L {seed.values['SH/L']:.4g} is above {MAX_SHL:g} (χ² has steps in SH/L there)"
    return ""


def _defect(result: PatternResult) -> str:
    """"failed (message)" or "flagged (flags)" for a result that is not a clean fit, else ""."""
    if result.status != "ok":
        return f"{result.status} ({result.message})"
    flags = [f for f in result.flags if f not in TOLERATED_FLAGS]
    return f"flagged ({', '.join(flags)})" if flags else ""


def warm_vary(seed: PatternResult, recipe: Sequence[Stage] | None = None) -> list[str]:
    """The final vary list of the recipe ``seed`` was refined with: its refined parameters, and
    SH/L when it ended on its floor and the recipe refines it (``recipe`` None: the default
    recipe, which does) but the seed's esds leave it out (results of before SH/L stayed in the
    covariance on its floor)."""
    vary = list(seed.esds)
    refines_shl = recipe is None or any("SH/L" in st.add for st in recipe)
    if refines_shl and "SH/L" not in vary and seed.values.get("SH/L", math.inf) <= SHL_MIN:
        vary.append("SH/L")
    return vary


def fallback_reason(warm: PatternResult, seed: PatternResult) -> str:
    """Why the warm fit ``warm`` of a lineout seeded by ``seed`` is not kept ("" when it is)."""
    defect = _defect(warm)
    if defect:
        return defect
    if not warm.converged:
        return "not converged"
    if warm.gof > GOF_MARGIN * seed.gof:
        return f"GOF {warm.gof:.3g} > {GOF_MARGIN:g} × the seed's {seed.gof:.3g}"
    return ""


def refine_warm(fit: Fit, seed: PatternResult, seed_name: str, *, recipe: Sequence[Stage] | None = None,
                max_cycles: int = 8) -> tuple[PatternResult, str]:
    """Refine a lineout warm from ``seed``, or with the whole recipe from its values when the seed
    or the warm fit is refused.

    Parameters
    ----------
    fit : callable
        ``fit(stages, start)`` refines the lineout (:data:`Fit`).
    seed : PatternResult
        The seed's refinement (same phases and options).
    seed_name : str
        How the notes name the seed (``"group mean"``, ``"hist_0003"``).
    recipe : sequence of Stage, optional
        The recipe the seed was refined with (None: the default one).
    max_cycles : int
        LM cycles of the warm recipe's joint stage.

    Returns
    -------
    (PatternResult, str)
        The result, with a note saying which recipe made it, and that recipe (:data:`RECIPES`):
        "warm"; "full after warm" (the warm fit refused, :func:`fallback_reason`) or "full" (the
        seed refused, :func:`seed_refusal`), both the whole recipe from the seed's values, bit
        for bit what the lineout gives without warm starts. (Not from the lineout's own data:
        where χ² has steps in SH/L, above its floor, the whole recipe's minimum moves with the
        start by up to ~1 esd, so a fallback from the data would differ from the seeded run by
        that much.)
    """
    refusal = seed_refusal(seed)
    if refusal:
        full = fit(None, dict(seed.values))
        note = f"no warm start from {seed_name}: {refusal}; the whole recipe from its values"
        return _noted(full, note), "full"
    warm = fit(warm_stages(warm_vary(seed, recipe), max_cycles), dict(seed.values))
    reason = fallback_reason(warm, seed)
    if not reason:
        return _noted(warm, f"warm start from {seed_name}: its background, scales and cell, then its "
                            "final vary list (not every stage)"), "warm"
    full = fit(None, dict(seed.values))
    note = f"warm start from {seed_name} refused: {reason}; the whole recipe from its values instead"
    return _noted(full, note), "full after warm"


def _noted(result: PatternResult, note: str) -> PatternResult:
    return dataclasses.replace(result, notes=[*result.notes, note])
