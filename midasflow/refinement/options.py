"""What every lineout of a run is refined with: :class:`RefineOptions`, and the option vocabularies.

:class:`RefineOptions` is frozen and travels once to every worker (scattered by
:func:`midasflow.refinement.lineouts.run_distributed`); a backend
(:class:`midasflow.refinement.backends.RefineBackend`) reads from it what it needs. Its
:meth:`~RefineOptions.settings` are JSON and its :meth:`~RefineOptions.digest` a SHA-256 of them,
so checkpoints and results can name the options they were made with.

Adding an option: add a field with a default. Mark it ``field(default=..., metadata=RECIPE)``
when it is a keyword of the per-lineout refinement call (the engine's ``refine_pattern`` and the
GSAS-II backend take it by that name); leave the metadata out for an option the run uses
elsewhere (e.g. which lineouts enter the strain fits). Either way it enters the settings and the
digest, so checkpoints made without it are never taken for checkpoints made with it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from midasflow.crystal import Phase
from midasflow.errors import ParameterError
from midasflow.instrument import Instrument

#: Rietveld (structure-factor intensities) or Le Bail (intensities extracted every cycle).
Mode = Literal["rietveld", "lebail"]
MODES: tuple[str, ...] = get_args(Mode)
#: The refinement engines: the built-in one, or GSAS-II itself (GSASIIscriptable).
BackendName = Literal["native", "gsas2"]
BACKENDS: tuple[str, ...] = get_args(BackendName)
#: Where a lineout's start values come from besides the store: the first refined lineout of its
#: ω-group ("neighbour"), or nowhere (None).
SeedFrom = Literal["neighbour"]
SEED_MODES: tuple[str | None, ...] = (None, *get_args(SeedFrom))

#: Field metadata of the options passed to the per-lineout refinement call as keywords.
RECIPE = {"recipe": True}


@dataclass(frozen=True)
class RefineOptions:
    """The phases, the instrument and the recipe options shared by every lineout of a run.

    Attributes
    ----------
    phases : tuple of Phase
        One per CIF, in CIF order.
    instrument : Instrument
        Start values and fixed terms (GSAS-II names; docs/reference/gsas2_profile.md).
    bkg_terms : int
        Chebyshev background coefficients (≥ 1).
    limits : (float, float) or None
        2θ range refined, degrees; None = the whole lineout.
    refine_atoms : bool
        Add the recipe's last stage (atom coordinates and Uiso; Rietveld only).
    mode : {"rietveld", "lebail"}
    """

    phases: tuple[Phase, ...]
    instrument: Instrument
    bkg_terms: int = field(default=6, metadata=RECIPE)
    limits: tuple[float, float] | None = field(default=None, metadata=RECIPE)
    refine_atoms: bool = field(default=False, metadata=RECIPE)
    mode: Mode = field(default="rietveld", metadata=RECIPE)

    def __post_init__(self) -> None:
        object.__setattr__(self, "phases", tuple(self.phases))
        if self.limits is not None:
            object.__setattr__(self, "limits", tuple(float(v) for v in self.limits))
        if self.mode not in MODES:
            raise ParameterError(f"--mode {self.mode!r}: expected one of {', '.join(MODES)}")

    def recipe_kwargs(self) -> dict[str, Any]:
        """The options marked :data:`RECIPE`, as keywords of the per-lineout refinement call."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get("recipe")}

    def replace(self, **changes: Any) -> RefineOptions:
        """A copy with some options changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def settings(self) -> dict[str, Any]:
        """Every option as JSON-ready data (phases in full: cell, space group, atoms)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def digest(self) -> str:
        """SHA-256 hex of :meth:`settings` in canonical JSON (sorted keys, exact float repr):
        the same options give the same digest in every process and Python version."""
        blob = json.dumps(self.settings(), sort_keys=True, separators=(",", ":"), allow_nan=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def _plain(value: Any) -> Any:
    """JSON-ready form of an option value."""
    if isinstance(value, Phase):
        return {"name": value.name, "cell": [float(v) for v in value.cell],
                "space_group": value.space_group.xhm(), "laue": value.laue,
                "z_formula": float(value.z_formula),
                "atoms": [[a.label, a.element, *map(float, a.xyz), float(a.occ), float(a.uiso)]
                          for a in value.atoms]}
    if isinstance(value, Instrument):
        return {key: _plain(v) for key, v in value.to_dict().items()}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, Sequence):
        return [_plain(v) for v in value]
    if isinstance(value, int):
        return int(value)
    return float(value)
