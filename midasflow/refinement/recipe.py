"""The staged refinement recipe (GSAS-II's scripted recipe; ``docs/reference/gsas2_profile.md``
section 6).

Each stage adds parameters to the cumulative vary list of the previous stages:

1. ``background``: background coefficients + scale factors (histogram ``Scale`` for one phase;
   phase fractions ``p:0:Scale`` of every phase but the first for several phases);
2. ``cell``: the independent A-terms of every phase;
3. ``profile_gauss`` (3a): ``U``, ``V``, ``W``;
4. ``profile_lorentz`` (3b): ``X``, ``Y``, ``SH/L`` — with everything before, so this stage is the
   joint refinement of all parameters; after its LM it scans SH/L across the FCJ quadrature-order
   steps of the model and restarts the joint LM from a lower χ² when one is found (from profile
   terms started ~50 % off, SH/L 0.008 for 0.005, the LM alone stopped at GOF 1.21 where the
   true start gives 1.01);
5. ``atoms`` (only when asked, Rietveld only): atom coordinates and U_iso.

:func:`~midasflow.refinement.engine.refine_pattern` runs every stage with the peak widths held
physical and ends with one unconstrained pass over all refined parameters (unless
``physical_profile``).

In Le Bail mode the scale factors are not refined (the extracted intensities absorb them).

A lineout started from a good seed (:mod:`midasflow.refinement.warm`) runs the short recipe of
:func:`warm_stages` instead: the seed's final vary list in two stages.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["WARM_STAGES", "Stage", "default_stages", "warm_stages"]

#: Names of the warm-start recipe's stages (``PatternResult.stage_rwp`` keys).
WARM_STAGES = ("warm_cell", "warm")
#: An independent A-term of a phase's cell (``'0::A0'``; atom parameters are ``'0::Ax:0'``).
_CELL_TERM = re.compile(r"^\d+::A\d$")


@dataclass(frozen=True)
class Stage:
    """One refinement stage.

    Attributes
    ----------
    name : str
        Key in ``PatternResult.stage_rwp``.
    add : tuple of str
        GSAS-II parameter names added to the vary list in this stage.
    max_cycles : int
        Levenberg–Marquardt cycles at most.
    scan : tuple of str
        Parameters scanned after the LM (current value × 0.8 … 1.25, the others fixed) to step
        over discontinuities of χ²; a lower χ² restarts the LM of the whole vary list
        (``midasflow.refinement.engine._escape_scan``).
    """

    name: str
    add: tuple[str, ...]
    max_cycles: int = 8
    scan: tuple[str, ...] = ()


def default_stages(n_phases: int, bkg_terms: int, cell_names: Sequence[str],
                   atom_names: Sequence[str] = (), *, mode: str = "rietveld",
                   refine_atoms: bool = False) -> list[Stage]:
    """The default recipe.

    Parameters
    ----------
    n_phases : int
    bkg_terms : int
        Number of Chebyshev terms ``Back;0 .. Back;n-1``.
    cell_names : sequence of str
        Independent A-term names of all phases (``'0::A0'`` …).
    atom_names : sequence of str
        Atom parameter names (``'0::Ax:0'`` …, ``'0::AUiso:0'``) used when ``refine_atoms``.
    mode : {'rietveld', 'lebail'}
    refine_atoms : bool

    Returns
    -------
    list of Stage
    """
    first = [f"Back;{i}" for i in range(bkg_terms)]
    if mode == "rietveld":
        first.append("Scale")
        first += [f"{p}:0:Scale" for p in range(1, n_phases)]
    stages = [Stage("background", tuple(first), max_cycles=3),
              Stage("cell", tuple(cell_names)),
              Stage("profile_gauss", ("U", "V", "W")),
              Stage("profile_lorentz", ("X", "Y", "SH/L"), scan=("SH/L",))]
    if refine_atoms and mode == "rietveld" and atom_names:
        stages.append(Stage("atoms", tuple(atom_names)))
    return stages


def warm_stages(vary: Sequence[str], max_cycles: int = 8) -> list[Stage]:
    """The warm-start recipe, for a lineout started from a good seed's refined values.

    1. ``warm_cell``: background, scale factors and cell terms of ``vary`` (3 cycles): the
       lineout's peaks move by its strain while its profile is the seed's;
    2. ``warm``: every name of ``vary`` jointly (``max_cycles``), the full recipe's final stage.

    Joining all at once without the first stage stopped on a step of χ² far from the minimum
    (Rwp 2.4 % for 0.6 %) on lineouts strained 1e-3 away from their ω-group's mean pattern with
    SH/L 0.01 (docs/reference/gsas2_profile.md, warm starts).

    Parameters
    ----------
    vary : sequence of str
        The final vary list (GSAS-II names) of the recipe the seed was refined with.
    max_cycles : int
        Levenberg–Marquardt cycles of the joint stage.

    Returns
    -------
    list of Stage
    """
    first = tuple(n for n in vary if n.startswith("Back;") or n == "Scale" or n.endswith(":0:Scale")
                  or _CELL_TERM.match(n))
    return [Stage(WARM_STAGES[0], first, max_cycles=3), Stage(WARM_STAGES[1], tuple(vary), max_cycles=max_cycles)]
