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
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from midasflow.crystal import Phase
from midasflow.errors import ParameterError
from midasflow.instrument import Instrument
from midasflow.limits import MAX_REFLECTIONS, check_reflections

#: Rietveld (structure-factor intensities) or Le Bail (intensities extracted every cycle).
Mode = Literal["rietveld", "lebail"]
MODES: tuple[str, ...] = get_args(Mode)
#: The refinement engines: the built-in one, or GSAS-II itself (GSASIIscriptable).
BackendName = Literal["native", "gsas2"]
BACKENDS: tuple[str, ...] = get_args(BackendName)
#: Where a lineout's start values come from besides the store: the first refined lineout of its
#: ω-group ("neighbour"), the refined η-averaged pattern of its ω-group ("group"), or nowhere (None).
SeedFrom = Literal["neighbour", "group"]
SEED_MODES: tuple[str | None, ...] = (None, *get_args(SeedFrom))

#: Field metadata of the options passed to the per-lineout refinement call as keywords.
RECIPE = {"recipe": True}
#: Chebyshev background terms GSAS-II offers (its Background window: 1 to 36 coefficients).
BKG_TERMS_RANGE = (1, 36)


def check_recipe(bkg_terms: int, limits: Sequence[float] | None, mode: str) -> None:
    """Refuse recipe options no lineout could be refined with, before any work.

    Raises
    ------
    ParameterError
        ``bkg_terms`` outside 1..36, ``limits`` that are not two finite 2θ values in
        [0, 180] degrees with LOW < HIGH, or an unknown ``mode``.
    """
    lo_terms, hi_terms = BKG_TERMS_RANGE
    if isinstance(bkg_terms, bool) or int(bkg_terms) != bkg_terms or not lo_terms <= bkg_terms <= hi_terms:
        raise ParameterError(f"--bkg-terms {bkg_terms}: expected {lo_terms} to {hi_terms} Chebyshev "
                             "background terms (GSAS-II's range)")
    if limits is not None:
        try:
            lo, hi = (float(v) for v in limits)
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError
        except (TypeError, ValueError):
            raise ParameterError(f"--limits {' '.join(map(str, limits))}: expected two finite 2θ values "
                                 "LOW HIGH in degrees") from None
        if not 0.0 <= lo < hi <= 180.0:
            raise ParameterError(f"--limits {lo:g} {hi:g}: expected 0 <= LOW < HIGH <= 180 (2θ in degrees)")
    if mode not in MODES:
        raise ParameterError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")


#: Per-lineout texture models (stage 5): none, March–Dollase, spherical harmonics.
TEXTURE_MODELS: tuple[str | None, ...] = (None, "md", "sh")
#: Spherical-harmonics orders offered (GSAS-II's even l = 2 … order; the cubic table ends at 12).
SH_ORDER_RANGE = (2, 12)
#: Profile arithmetic of the native engine: double precision (default) or GSAS-II's float32.
PRECISIONS = ("float64", "float32")


def check_texture(texture: Any, po_axis: Any, sh_order: Any) -> tuple[int, int, int]:
    """Refuse texture options no lineout could be refined with; returns the axis as ints.

    Raises
    ------
    ParameterError
        ``texture`` not None/'md'/'sh', ``po_axis`` not three integers (not all 0), or
        ``sh_order`` outside 2..12.
    """
    if texture not in TEXTURE_MODELS:
        raise ParameterError(f"--texture {texture!r}: expected md (March–Dollase) or sh "
                             "(spherical harmonics)")
    try:
        axis = tuple(int(v) for v in po_axis)
        if len(axis) != 3 or any(int(v) != float(v) for v in po_axis) or not any(axis):
            raise ValueError
    except (TypeError, ValueError):
        raise ParameterError(f"--po-axis {' '.join(map(str, po_axis)) if isinstance(po_axis, Sequence) else po_axis}: "
                             "expected three integers h k l, not all 0") from None
    check_sh_order(sh_order)
    return axis


def check_sh_order(sh_order: Any) -> int:
    """Refuse a spherical-harmonics order outside :data:`SH_ORDER_RANGE`; returns it as an int.

    Raises
    ------
    ParameterError
        ``sh_order`` not an integer from 2 to 12.
    """
    lo, hi = SH_ORDER_RANGE
    if isinstance(sh_order, bool) or int(sh_order) != sh_order or not lo <= sh_order <= hi:
        raise ParameterError(f"--sh-order {sh_order}: expected {lo} to {hi} (harmonic order)")
    return int(sh_order)


def check_max_rwp(max_rwp: Any) -> float | None:
    """``max_rwp`` as a float (None stays None).

    Raises
    ------
    ParameterError
        Not a finite positive number (Rwp in percent).
    """
    if max_rwp is None:
        return None
    try:
        value = float(max_rwp)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ParameterError(f"--max-rwp {max_rwp}: expected a positive Rwp in percent")
    return value


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
        Add the recipe's last stage (atom coordinates and Uiso; Rietveld only). On by default,
        as in MIDAS's ``gsas_ii_refine.py``; the manual recommends off for lattice and strain
        work (atoms trade off against the scale and background, not the cell).
    mode : {"rietveld", "lebail"}
    estimate : bool
        Start each lineout's profile, scale and background from its own data
        (:func:`midasflow.refinement.start.estimate_start`); the instrument's U, V, W, X, Y are
        then only the fallback. ``False``: start from the instrument terms as given.
    physical_profile : bool
        Keep the Gaussian σ² and Lorentzian γ physical (σ² > 0, γ ≥ 0) over the fitted range
        (``--physical-profile``); by default GSAS-II's model is followed where it lets them go
        negative, and such a fit is flagged ``unphysical_profile``.
    max_rwp : float or None
        Rwp (%) above which a lineout is flagged ``rwp_above_max`` (``--max-rwp``); a flag, not
        a failure. Applied by the executors to every backend's result.
    texture : {None, "md", "sh"}
        Stage 5, preferred orientation (``--texture``): March–Dollase along ``po_axis`` or
        GSAS-II's spherical harmonics (cylindrical sample symmetry) to order ``sh_order``
        (:mod:`midasflow.refinement.texture_stage`). None: no texture stage. Not a :data:`RECIPE` keyword:
        both backends take the texture options as keywords (:meth:`texture_kwargs`).
    po_axis : (int, int, int)
        March–Dollase axis [h, k, l] (``--po-axis``), a reciprocal-lattice direction.
    sh_order : int
        Highest harmonic order, 2..12 (``--sh-order``).
    precision : {"float32", "float64"}
        Profile arithmetic of the native engine (``--precision``, ``refine_pattern``'s
        ``precision``): GSAS-II's REAL*4 by default; "float64" gives a smooth χ² in SH/L and
        a start-independent minimum (docs/reference/gsas2_profile.md section 6). The GSAS-II
        backend always computes in its own float32.
    warm_start : bool or None
        Whether a seeded lineout whose seed is good runs the short warm recipe
        (:mod:`midasflow.refinement.warm`, ``--warm-start``/``--no-warm-start``) instead of every
        stage. None (default): when the profile is in float64 (there the warm results are the
        full recipe's within 0.1 esd; in float32 the full recipe's own minimum moves by up to a
        few esd with the start). Never with ``texture`` (its stage has starts of its own), in
        Le Bail mode (not measured) or with the GSAS-II engine. See :meth:`warm_starts`.
    """

    phases: tuple[Phase, ...]
    instrument: Instrument
    bkg_terms: int = field(default=6, metadata=RECIPE)
    limits: tuple[float, float] | None = field(default=None, metadata=RECIPE)
    refine_atoms: bool = field(default=True, metadata=RECIPE)
    mode: Mode = field(default="rietveld", metadata=RECIPE)
    estimate: bool = field(default=True, metadata=RECIPE)
    physical_profile: bool = field(default=False, metadata=RECIPE)
    max_rwp: float | None = None
    texture: str | None = None
    po_axis: tuple[int, int, int] = (0, 0, 1)
    sh_order: int = 4
    precision: str = "float64"
    warm_start: bool | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ParameterError(f"--precision {self.precision}: expected one of {', '.join(PRECISIONS)}")
        if self.warm_start not in (None, True, False):
            raise ParameterError(f"warm_start {self.warm_start!r}: expected True, False or None (auto)")
        object.__setattr__(self, "phases", tuple(self.phases))
        check_recipe(self.bkg_terms, self.limits, self.mode)
        object.__setattr__(self, "po_axis", check_texture(self.texture, self.po_axis, self.sh_order))
        object.__setattr__(self, "max_rwp", check_max_rwp(self.max_rwp))
        if self.limits is not None:
            object.__setattr__(self, "limits", tuple(float(v) for v in self.limits))

    def check_against(self, tth_deg: Sequence[Any], min_points: int, *,
                      max_reflections: int = MAX_REFLECTIONS) -> None:
        """Refuse options that would fail every lineout of this data, before any is refined.

        Parameters
        ----------
        tth_deg : sequence of ndarray, degrees
            The usable 2θ points of each lineout to refine (skipped ones left out).
        min_points : int
            A lineout needs more than this many points inside the limits.
        max_reflections : int
            Most unique reflections a phase may have in the refined range
            (:func:`midasflow.limits.check_reflections`).

        Raises
        ------
        ParameterError
            No lineout has more than ``min_points`` points inside ``limits`` (naming the data's
            2θ range), fewer points than ``bkg_terms`` + 1 in every lineout, or a phase with
            more reflections in the range than ``max_reflections``.
        """
        import numpy as np

        arrays = [np.asarray(x, dtype=float) for x in tth_deg]
        if not arrays or not any(a.size for a in arrays):
            return  # nothing to refine: every lineout is skipped, and the run says so
        lo, hi = self.limits if self.limits is not None else (-np.inf, np.inf)
        inside = [int(((a >= lo) & (a <= hi)).sum()) for a in arrays]
        if self.limits is not None and max(inside) <= min_points:
            span = (min(float(a.min()) for a in arrays if a.size), max(float(a.max()) for a in arrays if a.size))
            raise ParameterError(
                f"--limits {lo:g} {hi:g}: the data cover 2θ {span[0]:.4g} to {span[1]:.4g} deg and no "
                f"lineout has more than {min_points} points inside the limits (it has at most {max(inside)})")
        if self.bkg_terms >= max(inside):
            raise ParameterError(f"--bkg-terms {self.bkg_terms}: no lineout has more points than that "
                                 f"(at most {max(inside)}); expected fewer background terms")
        used = [a[(a >= lo) & (a <= hi)] for a in arrays]
        check_reflections(self.phases, self.instrument.wavelength_a,
                          min(float(a.min()) for a in used if a.size),
                          max(float(a.max()) for a in used if a.size), max_reflections=max_reflections)

    def warm_starts(self) -> bool:
        """Whether seeded lineouts are warm-started (:attr:`warm_start`; None: in float64 only;
        never with a texture stage or in Le Bail mode)."""
        wanted = self.precision == "float64" if self.warm_start is None else self.warm_start
        return bool(wanted) and self.texture is None and self.mode == "rietveld"

    def recipe_kwargs(self) -> dict[str, Any]:
        """The options marked :data:`RECIPE`, as keywords of the per-lineout refinement call."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get("recipe")}

    def texture_kwargs(self) -> dict[str, Any]:
        """The texture options as keywords of the per-lineout refinement call (both backends)."""
        return {"texture": self.texture, "po_axis": self.po_axis, "sh_order": self.sh_order}

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
