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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Stage", "default_stages"]


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
