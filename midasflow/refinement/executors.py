"""Executors of a :class:`~midasflow.refinement.plan.LineoutPlan`: in this process, or on Dask.

Both run the same task functions (:func:`~midasflow.refinement.plan.refine_unit`,
:func:`~midasflow.refinement.plan.refine_seed`) on the same units, so they give the same results;
:class:`SerialExecutor` is the reference. An executor's ``run(plan, checkpoints)`` yields one
:class:`~midasflow.refinement.plan.UnitOutcome` per unit as units finish.

:class:`DistributedExecutor` keeps a bounded window of units in flight (submitted lazily as
others finish, so neither the client nor the scheduler holds the whole scan), collects each
result as it finishes (``as_completed``) and releases its future at once: a worker that dies
later cannot make a finished unit run again, and the units it was running find the lineouts they
had finished in their checkpoints when the scheduler reruns them. Task keys are
``refine-lineout-<first index>[-<last index>]-<token>`` (the dashboard groups them as
"refine-lineout"); seed tasks ``refine-lineout-seed-<group>-<token>``.
"""
from __future__ import annotations

import logging
import math
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import Any

from midasflow.refinement.checkpoints import Checkpoints
from midasflow.refinement.lineouts import TASK_PREFIX
from midasflow.refinement.plan import LineoutPlan, TaskUnit, UnitOutcome, refine_seed, refine_unit

log = logging.getLogger(__name__)

#: Lineouts kept in flight per worker thread by the distributed executor (at least 4 units).
LINEOUTS_IN_FLIGHT_PER_THREAD = 500


def report_notes(notes: list[tuple[str, str]]) -> None:
    """Tell the user about checkpoints that were not used: a warning per invalid file, one line
    for those made with other settings or data (earlier runs' files without resume are silent)."""
    for kind, text in notes:
        if kind == "invalid":
            warnings.warn(text, UserWarning, stacklevel=3)
    counts = Counter(kind for kind, _ in notes if kind in ("settings", "data"))
    if counts:
        what = " and ".join(f"{n} made {'with other settings' if k == 'settings' else 'from other data'}"
                            for k, n in sorted(counts.items()))
        first = next(text for kind, text in notes if kind in counts)
        warnings.warn(f"{what} checkpoint(s) refined again (first: {first})", UserWarning, stacklevel=3)


class SerialExecutor:
    """Every unit in this process, in index order (the reference executor).

    Parameters
    ----------
    lineouts_per_task : int, optional
        Unit size; default one ω-group per unit (each group's cake read once).
    """

    def __init__(self, lineouts_per_task: int | None = None) -> None:
        self.lineouts_per_task = lineouts_per_task

    def run(self, plan: LineoutPlan, checkpoints: Checkpoints | None) -> Iterator[UnitOutcome]:
        """Yield each unit's outcome, in index order."""
        ctx = plan.worker_context(checkpoints)
        seeds: dict[int, Any] = {}
        for unit in plan.units(self.lineouts_per_task):
            seed = None
            if plan.seed_from is not None and not unit.whole_group:
                if unit.group not in seeds:
                    seeds.clear()  # units come group by group
                    seeds[unit.group] = refine_seed(ctx, _seed_unit(plan, unit),
                                                    plan.payload(unit, whole=True))
                seed = seeds[unit.group]
            try:
                outcome = refine_unit(ctx, unit, plan.payload(unit), seed)
            except Exception as exc:  # the unit's cake could not be read: its lineouts fail
                outcome = plan.failed(unit, _first_line(exc))
            yield outcome


def _seed_unit(plan: LineoutPlan, unit: TaskUnit) -> TaskUnit:
    """The unit a group's seed task gets: the whole group (its specs, for a spec list)."""
    specs = tuple(s for s in plan._specs if s.group == unit.group) if unit.specs else ()
    return TaskUnit(unit.group, 0, plan.layout.n_eta if plan.layout else 0, True, specs)


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"


class DistributedExecutor:
    """Units as tasks on a ``distributed.Client``.

    Parameters
    ----------
    client : distributed.Client
    lineouts_per_task : int, optional
        Unit size; default one ω-group per unit (measured 1.8× the throughput of one lineout per
        task: each group's cake is read once and the scheduler sees n_eta× fewer tasks), or, for a
        scan of fewer than 4 groups per worker thread, groups cut evenly into 4 units per thread
        so that every worker has work.
    retries : int
        Extra attempts for a unit whose task raised (a lost worker is rescheduled by the
        scheduler anyway); a unit still failing is recorded as failed lineouts with the error.
    max_in_flight : int, optional
        Units submitted but not yet collected; default enough for
        :data:`LINEOUTS_IN_FLIGHT_PER_THREAD` lineouts per worker thread, at least 4 units per
        thread.
    """

    def __init__(self, client: Any, *, lineouts_per_task: int | None = None, retries: int = 2,
                 max_in_flight: int | None = None) -> None:
        self.client, self.lineouts_per_task = client, lineouts_per_task
        self.retries, self.max_in_flight = retries, max_in_flight

    def _threads(self) -> int:
        workers = self.client.scheduler_info()["workers"].values()
        return max(sum(w.get("nthreads", 1) for w in workers), 1)

    def _window(self, unit_size: int) -> int:
        if self.max_in_flight:
            return int(self.max_in_flight)
        threads = self._threads()
        return max(4 * threads, math.ceil(LINEOUTS_IN_FLIGHT_PER_THREAD * threads / max(unit_size, 1)))

    def unit_size(self, plan: LineoutPlan) -> int | None:
        """Lineouts per unit for ``plan`` (see the class docs); None = whole groups."""
        if self.lineouts_per_task or plan.layout is None:
            return self.lineouts_per_task
        units = 4 * self._threads()
        if plan.layout.n_groups >= units:
            return None
        return max(1, math.ceil(plan.n_lineouts / units))

    def run(self, plan: LineoutPlan, checkpoints: Checkpoints | None) -> Iterator[UnitOutcome]:
        """Yield each unit's outcome as it finishes."""
        from distributed import as_completed

        client = self.client
        size = self.unit_size(plan)
        units = plan.units(size)
        first = next(units, None)
        if first is None:
            return
        window = self._window(len(first.indices(plan.n_eta)))
        token = uuid.uuid4().hex[:8]
        [ctx] = client.scatter([plan.worker_context(checkpoints)], broadcast=True, hash=False)
        pending: dict[str, tuple[Any, TaskUnit]] = {}
        seeds: dict[int, list[Any]] = {}  # group -> [seed future, units of the group left to collect]
        done = as_completed()

        def submit(unit: TaskUnit) -> None:
            seed = None
            if plan.seed_from is not None and not unit.whole_group:
                if unit.group not in seeds:
                    seed_fut = client.submit(
                        refine_seed, ctx, _seed_unit(plan, unit), plan.payload(unit, whole=True),
                        key=f"{TASK_PREFIX}-seed-{unit.group}-{token}", retries=self.retries,
                        pure=False)
                    seeds[unit.group] = [seed_fut, plan.units_in_group(unit.group, size)]
                seed = seeds[unit.group][0]
            indices = unit.indices(plan.n_eta)
            span = f"{indices[0]}" if len(indices) == 1 else f"{indices[0]}-{indices[-1]}"
            fut = client.submit(refine_unit, ctx, unit, plan.payload(unit), seed,
                                key=f"{TASK_PREFIX}-{span}-{token}", retries=self.retries,
                                pure=False)
            pending[fut.key] = (fut, unit)
            done.add(fut)

        def fill() -> None:
            while len(pending) < window:
                unit = next(units, None)
                if unit is None:
                    return
                submit(unit)

        try:
            submit(first)
            fill()
            for fut in done:
                _, unit = pending.pop(fut.key)
                try:
                    outcome = fut.result()
                except Exception as exc:  # the unit's task failed beyond its retries, or was lost
                    outcome = plan.failed(unit, _first_line(exc))
                fut.release()
                del fut
                if unit.group in seeds:
                    seeds[unit.group][1] -= 1
                    if seeds[unit.group][1] == 0:
                        seeds.pop(unit.group)[0].release()
                fill()
                yield outcome
        finally:
            client.cancel([f for f, _ in pending.values()] + [s[0] for s in seeds.values()] + [ctx])
