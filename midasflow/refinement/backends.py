"""Refinement backends: what refines one lineout, behind one protocol.

A backend is any picklable object with a :meth:`RefineBackend.refine` method; the executors
(:func:`midasflow.refinement.lineouts.run_serial`, :func:`~midasflow.refinement.lineouts.run_distributed`)
call it once per lineout with the lineout's spec, the run's :class:`RefineOptions` and the start
values of a seeding lineout. Every backend gets the same call, the lineout's index included.

* :class:`NativeBackend`: the built-in engine, :func:`midasflow.refinement.engine.refine_pattern`;
* :class:`midasflow.refinement.gsas2.Gsas2Backend`: GSAS-II itself (one ``.gpx`` per lineout);
* :class:`ExportingBackend`: wraps another and writes each refined lineout's CSV/CIF files and
  GSAS-II project in the lineout's own task (so on the workers, in parallel).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from midasflow.errors import ParameterError
from midasflow.refinement.options import BACKENDS, RefineOptions

if TYPE_CHECKING:  # pragma: no cover
    from midasflow.refinement.lineouts import LineoutSpec
    from midasflow.refinement.recipe import Stage
    from midasflow.refinement.result import PatternResult


@runtime_checkable
class RefineBackend(Protocol):
    """Refines one lineout. Implementations must be picklable (they travel to Dask workers).

    A backend whose results depend on its own configuration (not only on the run's
    :class:`RefineOptions`) also has ``settings() -> dict`` (JSON): it enters the digest every
    checkpoint carries (:func:`midasflow.refinement.checkpoints.refine_digest`), so results of
    another configuration are never taken back. A backend that can warm-start a lineout from a
    good seed also has ``refine_warm(spec, options, seed, seed_name) -> (PatternResult, recipe)``
    (:mod:`midasflow.refinement.warm`); without it a seeded lineout runs its whole recipe.
    """

    def refine(self, spec: LineoutSpec, options: RefineOptions,
               start: Mapping[str, float] | None = None) -> PatternResult:
        """Refine ``spec`` (its ``tth_deg``, ``intensity``, ``sigma``; ``index``, ``eta_deg``,
        ``omega_deg`` as needed) with ``options``, from the GSAS-II-named ``start`` values when
        given. May raise: the executor records the error as a failed lineout."""


class NativeBackend:
    """The built-in engine (:func:`midasflow.refinement.engine.refine_pattern`).

    Parameters
    ----------
    stages : sequence of Stage, optional
        A recipe replacing :func:`~midasflow.refinement.recipe.default_stages` (e.g. one stage
        for a quick survey of a large scan).
    """

    def __init__(self, stages: Sequence[Stage] | None = None) -> None:
        self.stages = None if stages is None else tuple(stages)

    def settings(self) -> dict[str, Any]:
        """What besides the options decides this backend's results (JSON): the recipe."""
        return {"stages": None if self.stages is None else [dataclasses.asdict(s) for s in self.stages]}

    def refine(self, spec: LineoutSpec, options: RefineOptions,
               start: Mapping[str, float] | None = None,
               stages: Sequence[Stage] | None = None) -> PatternResult:
        """Refine ``spec`` with ``stages`` (default this backend's recipe) from ``start``."""
        from midasflow.refinement import engine

        stages = stages if stages is not None else self.stages
        extra = {} if stages is None else {"stages": stages}
        return engine.refine_pattern(spec.tth_deg, spec.intensity, spec.sigma, list(options.phases),
                                     options.instrument, start=start, **options.recipe_kwargs(),
                                     **options.texture_kwargs(), precision=options.precision,
                                     noise_correlation=getattr(spec, "noise_correlation", None) or None,
                                     **extra)

    def refine_warm(self, spec: LineoutSpec, options: RefineOptions, seed: PatternResult,
                    seed_name: str) -> tuple[PatternResult, str]:
        """Refine ``spec`` warm from ``seed`` (:func:`midasflow.refinement.warm.refine_warm`):
        the result and the recipe that made it."""
        from midasflow.refinement.warm import refine_warm

        return refine_warm(lambda stages, start: self.refine(spec, options, start, stages), seed,
                           seed_name, recipe=self.stages)


class ExportingBackend:
    """Another backend whose every "ok" lineout also writes its ``hist_NNNN_data.csv`` (GSAS-II's
    CSV layout), ``hist_NNNN_<phase>.cif`` and GSAS-II project ``hist_NNNN.gpx`` into ``folder``
    (:func:`midasflow.results.export_lineout`; ``kinds`` chooses among "csv", "cif" and "gpx");
    a lineout refined again that is not "ok" removes those an earlier refinement left. A lineout
    taken from a checkpoint gets the exports it lacks (:meth:`complete`).

    A backend that leaves its own GSAS-II project per lineout (``writes_projects = True``, the
    GSAS-II engine) gets no second one: "gpx" is dropped from ``kinds``.
    """

    def __init__(self, backend: RefineBackend, folder: str | os.PathLike,
                 kinds: Sequence[str] = ("csv", "cif", "gpx")) -> None:
        own_projects = getattr(backend, "writes_projects", False)
        self.backend, self.folder = backend, Path(folder)
        self.kinds = tuple(k for k in kinds if not (k == "gpx" and own_projects))

    def refine(self, spec: LineoutSpec, options: RefineOptions,
               start: Mapping[str, float] | None = None) -> PatternResult:
        pattern = None
        try:
            pattern = self.backend.refine(spec, options, start)
        finally:
            self._export(spec, options, pattern)
        return pattern

    def refine_warm(self, spec: LineoutSpec, options: RefineOptions, seed: PatternResult,
                    seed_name: str) -> tuple[PatternResult, str]:
        """The wrapped backend's warm start, exported (its whole recipe from the seed's values
        when it has none)."""
        warm = getattr(self.backend, "refine_warm", None)
        if warm is None:
            return self.refine(spec, options, dict(seed.values)), "full"
        result = None
        try:
            result = warm(spec, options, seed, seed_name)
        finally:
            self._export(spec, options, None if result is None else result[0])
        return result

    def _export(self, spec: LineoutSpec, options: RefineOptions, pattern: PatternResult | None) -> None:
        """Write an "ok" refinement's exports, or remove those an earlier refinement left."""
        from midasflow.results import export_lineout

        if pattern is not None and getattr(pattern, "status", "ok") == "ok":
            export_lineout(spec, pattern, self.folder, options.instrument, self.kinds,
                           mode=options.mode, po_axis=options.po_axis, limits=options.limits)
        else:
            stem = spec.name
            for stale in [self.folder / f"{stem}_data.csv", self.folder / f"{stem}.gpx",
                          *self.folder.glob(f"{stem}_*.cif")]:
                stale.unlink(missing_ok=True)

    def complete(self, spec: LineoutSpec, options: RefineOptions, result: Any) -> list[Path]:
        """Write the exports a finished lineout (e.g. one taken from a checkpoint of a
        ``--no-export`` run) lacks; returns the files written."""
        from midasflow.results import export_lineout, exports_of

        pattern = getattr(result, "pattern", None)
        if getattr(result, "status", "") != "ok" or pattern is None:
            return []
        if all(path.is_file() for path in exports_of(spec, pattern, self.folder, self.kinds)):
            return []
        return export_lineout(spec, pattern, self.folder, options.instrument, self.kinds,
                              mode=options.mode, po_axis=options.po_axis, limits=options.limits)


def get_backend(name: str, cif_paths: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                physical_profile: bool = False) -> RefineBackend:
    """The backend called ``name`` (:data:`~midasflow.refinement.options.BACKENDS`), checked
    before any task is submitted: "gsas2" needs GSAS-II importable (its projects go to
    ``<out>/gsas2``) and cannot keep the widths physical (``physical_profile``).

    Raises
    ------
    ParameterError
        Unknown name; "gsas2" with ``physical_profile``.
    BackendError
        "gsas2" without GSAS-II.
    """
    if name == "native":
        return NativeBackend()
    if name == "gsas2":
        from midasflow.refinement.gsas2 import (PHYSICAL_PROFILE_UNAVAILABLE, Gsas2Backend,
                                                check_gsas2_available)

        if physical_profile:
            raise ParameterError(PHYSICAL_PROFILE_UNAVAILABLE)
        check_gsas2_available()
        return Gsas2Backend(cif_paths=tuple(str(p) for p in cif_paths),
                            workdir=str(Path(out) / "gsas2"))
    raise ParameterError(f"--engine {name!r}: expected one of {', '.join(BACKENDS)}")


def make_refiner(name: str, cif_paths: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                 export: bool | Sequence[str] = False, physical_profile: bool = False) -> RefineBackend:
    """What refines the lineouts of a run (batch or stream): the backend called ``name``
    (:func:`get_backend`) and, with ``export``, an :class:`ExportingBackend` around it writing
    into ``out``.

    Parameters
    ----------
    name : str
        One of :data:`~midasflow.refinement.options.BACKENDS`.
    cif_paths : sequence of path
        The phases' CIF files (the GSAS-II engine reads them).
    out : path
        The output folder.
    export : bool or sequence of str
        True: every kind of :data:`midasflow.results.EXPORT_KINDS`; False or empty: none; else
        the kinds named ("csv", "cif", "gpx").
    physical_profile : bool
        Keep the profile widths physical (not with "gsas2").

    Raises
    ------
    ParameterError
        Unknown backend or export kind; "gsas2" with ``physical_profile``.
    BackendError
        "gsas2" without GSAS-II.
    """
    from midasflow.results import EXPORT_KINDS

    if export is not True and export and set(export) - set(EXPORT_KINDS):
        raise ParameterError(f"export {sorted(export)!r}: expected True, False or kinds of {EXPORT_KINDS}")
    refiner = get_backend(name, cif_paths, out, physical_profile=physical_profile)
    kinds = EXPORT_KINDS if export is True else tuple(k for k in EXPORT_KINDS if export and k in export)
    return ExportingBackend(refiner, out, kinds) if kinds else refiner
