"""Stage 5 of the recipe: preferred orientation (March–Dollase or spherical harmonics), opt-in.

:func:`run_texture_stage` runs after the other stages of
:func:`midasflow.refinement.engine.refine_pattern` with every parameter refined so far plus the
texture parameters of every phase (:attr:`midasflow.texture.po.PreferredOrientation.names`). As
the other stages it is undone when it diverges or raises Rwp, and also when the texture parameters
are not determined by the pattern:

* a zero or non-finite esd (singular normal matrix);
* a March–Dollase ratio with esd above :data:`MAX_MD_ESD` (relative), or a harmonic coefficient
  with esd above :data:`MAX_SH_ESD`;
* a correction PO_h ≤ 0 for some reflection (an unphysical, negative pole density).

A cubic phase has no first-order March–Dollase effect at r = 1 (the derivative averages to zero
over the cubic equivalents), so the LM cannot leave r = 1; the stage then starts from r = 0.8 and
from r = 1.25 and keeps the lower χ². An untextured cubic pattern then leaves r undetermined
(χ² is quartic in r − 1) and the stage is rolled back with that reason.

A rolled-back texture stage raises its own flag, ``texture_rolled_back``, not ``rolled_back``:
the lineout's result is then the refinement without ``--texture`` (every other stage of the
recipe refined), which is the right outcome for an untextured lineout, so the flag reports it but
does not keep the lineout out of the strain fits (``docs/quality_flags.md``).
"""
from __future__ import annotations

import math
import warnings as _warnings
from collections.abc import Sequence

import numpy as np

from midasflow.refinement import engine as _engine
from midasflow.texture.harmonics import MAX_SH_ESD, texture_index

__all__ = ["MAX_MD_ESD", "MAX_SH_ESD", "TEXTURE_STAGE", "run_texture_stage", "undetermined_reason"]

#: Name of the stage (``PatternResult.stage_rwp`` key).
TEXTURE_STAGE = "texture"
#: A March–Dollase ratio whose esd exceeds this fraction of r is not determined.
MAX_MD_ESD = 0.25
#: Starts of r tried when dPO/dr vanishes at r = 1 (cubic phases).
MD_STARTS = (0.8, 1.25)
#: LM cycles of the stage (× 3 in Le Bail mode, as the other stages).
_CYCLES = 10


def _starts(model, values: dict[str, float]) -> list[dict[str, float]]:
    """Start values of the texture parameters: none, or r = 0.8 and 1.25 for the phases whose
    March–Dollase derivative vanishes at r = 1."""
    flat = []
    for pd, po in zip(model.phases, model.po):
        if po.kind == "md" and values[po.md_name] == 1.0:
            tth = model.reflection_terms(pd.index, values)["tth"]
            _, deriv = po.correction(values, [po.md_name], tth)
            if np.all(np.abs(deriv[po.md_name]) < 1e-9):
                flat.append(po.md_name)
    if not flat:
        return [{}]
    return [{name: r for name in flat} for r in MD_STARTS]


def _undetermined(model, values, vary: Sequence[str], y, sqrt_w) -> str:
    """Why the texture parameters of ``values`` are not determined ('' when they are)."""
    _, _, J = model.evaluate(values, vary, jac=True)
    r = sqrt_w * (y - model.evaluate(values)[0])
    dof = max(y.size - len(vary), 1)
    cov = _engine._normal_inverse(J * sqrt_w[:, None]) * float(r @ r) / dof
    esd = dict(zip(vary, np.sqrt(np.maximum(np.diag(cov), 0.0))))
    problems = []
    for pd, po in zip(model.phases, model.po):
        found = undetermined_reason(po.kind, {n: values[n] for n in po.names},
                                    {n: float(esd[n]) for n in po.names})
        if found:
            problems.append(found)
        if po.names:
            tth = model.reflection_terms(pd.index, values)["tth"]
            corr, _ = po.correction(values, (), tth)
            if np.any(np.asarray(corr) <= 0):
                problems.append(f"phase {pd.phase.name}: the texture correction is ≤ 0 for "
                                f"{int(np.sum(np.asarray(corr) <= 0))} reflections")
    return "; ".join(problems)


def undetermined_reason(kind: str, values: dict[str, float], esds: dict[str, float]) -> str:
    """Why refined texture parameters are not determined ('' when they are): a zero or
    non-finite esd, a March–Dollase ratio with esd above :data:`MAX_MD_ESD` · r, a harmonic
    coefficient with esd above :data:`MAX_SH_ESD`. Shared by both backends.

    Parameters
    ----------
    kind : {'md', 'sh'}
    values, esds : dict
        Parameter name → refined value and its esd.
    """
    problems = []
    for name, v in values.items():
        e = esds.get(name, math.nan)
        if not (math.isfinite(e) and e > 0):
            problems.append(f"{name} has a zero or non-finite esd (singular)")
        elif kind == "md" and e > MAX_MD_ESD * v:
            problems.append(f"{name} = {v:.4g} ± {e:.2g} is not determined (esd > {MAX_MD_ESD:g}·r)")
        elif kind == "sh" and e > MAX_SH_ESD:
            problems.append(f"{name} = {v:.4g} ± {e:.2g} is not determined (esd > {MAX_SH_ESD:g})")
    return "; ".join(problems)


def run_texture_stage(model: _engine.PatternModel, values: dict[str, float], vary: list[str],
                      y: np.ndarray, w: np.ndarray, sqrt_w: np.ndarray, *, lebail: bool,
                      constraint: _engine.ProfileConstraint | None,
                      rwp_prev: float, stage_rwp: dict[str, float], warn: list[str],
                      flags: list[str], info: list[str]) -> tuple[dict[str, float], list[str], float]:
    """Refine the texture parameters with everything refined so far (module docstring).

    Parameters
    ----------
    model : midasflow.refinement.engine.PatternModel
        Built with ``texture`` set.
    values, vary : the refinement's current values and vary list.
    y, w, sqrt_w : observed points and their weights.
    lebail : bool
    constraint : ProfileConstraint or None
    rwp_prev : float
        Rwp (%) before the stage.
    stage_rwp, warn, flags, info : the refinement's records, appended to.

    Returns
    -------
    values, vary, rwp
        Unchanged when the stage was skipped or rolled back.
    """
    names = [n for po in model.po for n in po.names]
    if not names:
        kinds = {po.kind for po in model.po} - {None}
        if kinds:
            info.append("texture: no symmetry-allowed harmonic up to order "
                        f"{model.po[0].sh_order} for "
                        + ", ".join(f"{pd.phase.name} ({pd.phase.laue})" for pd in model.phases)
                        + "; stage skipped")
        return values, vary, rwp_prev
    trial_vary = vary + [n for n in names if n not in vary]
    saved_lebail = [pd.fsq_lebail.copy() for pd in model.phases]
    best, best_chi2, error = None, math.inf, ""
    with np.errstate(all="ignore"), _warnings.catch_warnings():
        _warnings.simplefilter("ignore", RuntimeWarning)
        for start in _starts(model, values):
            try:
                st = _engine.levenberg_marquardt(model, {**values, **start}, trial_vary, y, sqrt_w,
                                                 max_cycles=_CYCLES * (3 if lebail else 1),
                                                 lebail=lebail, constraint=constraint)
            except (FloatingPointError, np.linalg.LinAlgError, ValueError) as exc:
                error = str(exc)
                continue
            if st.chi2 < best_chi2:
                best, best_chi2 = st, st.chi2
        rwp_new = math.nan
        if best is not None:
            yc, _, _ = model.evaluate(best.values)
            rwp_new = _engine._rwp(y, yc, w)
        reason = ""
        if best is None or not math.isfinite(rwp_new):
            reason = f"diverged ({error or 'non-finite R'})"
        elif rwp_new > rwp_prev * (1 + 1e-9):
            reason = f"made Rwp worse ({rwp_new:.4g} % > {rwp_prev:.4g} %)"
        else:
            reason = _undetermined(model, best.values, trial_vary, y, sqrt_w)
    if reason:
        _engine._roll_back(model, TEXTURE_STAGE, reason, saved_lebail, warn, flags,
                           flag="texture_rolled_back")
        stage_rwp[TEXTURE_STAGE] = rwp_prev
        return values, vary, rwp_prev
    stage_rwp[TEXTURE_STAGE] = rwp_new
    for pd, po in zip(model.phases, model.po):
        if po.kind == "sh" and po.names:
            coef = {n.rsplit(":", 1)[-1]: best.values[n] for n in po.names}
            info.append(f"texture: {pd.phase.name} texture index J = {texture_index(coef):.5g}")
    return best.values, trial_vary, rwp_new
