"""The stream as a Dask dataflow: frames → caking tasks → ω-group scan → refinement tasks.

The client (this process) takes each :class:`~midasflow.stream.sources.Arrival` and submits

* one ``stream-cake`` task per run of arrivals that came back to back (a PV's queue, several
  files ready at once) or within ``max_wait_s`` of each other, at most ``frames_per_task``
  frames (a map pass, cheaper per frame than one frame's) per task:
  :func:`midasflow.stream.tasks.cake_item`, with the bin map and the dark as
  futures made once (the map is read from its cache by one worker and copied to the others by
  Dask, once each);
* one ``stream-fold`` task after it: the frames added to the open ω-group in frame order
  (:func:`~midasflow.stream.tasks.fold`), each fold depending on the one before in its group
  (a task never spans two groups, so the scheduler's lineage stays within one group);
* for every group a fold closes, a ``stream-group`` task (the group's cake, written to the spool)
  and at once its ``refine-lineout`` tasks (:func:`~midasflow.stream.tasks.refine_part`), so group
  k is refined while group k+1 is caked.

Futures are collected with ``distributed.as_completed`` as they finish and released at once.
Backpressure: at most ``max_frames_in_flight`` frames are being caked and at most
``max_groups_pending`` closed groups wait for their refinement; beyond that the client stops
taking frames (a folder waits; a PV's monitor queue fills and then drops, which is counted), so
memory stays bounded however long the stream runs.
"""
from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from midasflow.errors import MidasflowError
from midasflow.io.frames import _to_float32
from midasflow.stream.sources import Arrival
from midasflow.stream.spool import Spool, load_array, save_array
from midasflow.stream.tasks import (
    BinMapRef,
    Caking,
    FrameItem,
    FramePart,
    GroupInfo,
    cake_item,
    close_open,
    fold,
    load_spooled,
    refine_group_seed,
    read_part,
    refine_part,
    save_carry,
    take_group,
    warm_caking,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamLimits:
    """When the stream stops, and how much it holds in flight.

    Attributes
    ----------
    stop_after : int or None
        Stop after this many frames (after SkipFrame; counted over resumed runs too).
    idle_timeout_s : float or None
        Stop after this many seconds without a new frame.
    max_frames_in_flight : int
        Frames submitted for caking and not yet caked.
    max_groups_pending : int
        Closed ω-groups whose refinement has not finished.
    frames_per_task : int
        Frames caked in one task (a map pass), of one file or of arrivals that came back to back.
    max_wait_s : float
        A frame taken waits at most this long (s) for later frames to share its caking task
        (0: a frame with no other queued behind it is submitted at once).
    """

    stop_after: int | None = None
    idle_timeout_s: float | None = None
    max_frames_in_flight: int = 8
    max_groups_pending: int = 3
    frames_per_task: int = 16
    max_wait_s: float = 1.0


@dataclass
class GroupRecord:
    """A closed ω-group: frames, ω, and when its last frame arrived and its lineouts finished."""

    group: int
    first: int
    last: int
    omega_first_deg: float
    omega_last_deg: float
    arrived_s: float
    units_left: int = 0
    refined_s: float | None = None

    @property
    def frames_summed(self) -> int:
        return self.last - self.first + 1

    def info(self) -> GroupInfo:
        return GroupInfo(self.group, self.frames_summed,
                         0.5 * (self.omega_first_deg + self.omega_last_deg))

    def to_json(self) -> dict[str, Any]:
        return {"group": self.group, "first": self.first, "last": self.last,
                "omega_first_deg": self.omega_first_deg, "omega_last_deg": self.omega_last_deg}


@dataclass
class Refinement:
    """How closed groups are refined: the plan's worker context (the dataflow sends it to the
    workers, again once the first frame's flagged pixels move its lineouts' 2θ) and the unit
    size."""

    context: Any           # the stream's WorkerContext (the dataflow scatters it)
    seed_from: str | None
    lineouts_per_task: int
    n_eta: int


@dataclass
class _Tracked:
    kind: str
    payload: Any = None


@dataclass
class StreamState:
    """What has arrived and been caked (the spool manifest's content)."""

    frames: list[dict[str, Any]] = field(default_factory=list)
    groups: list[GroupRecord] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)          # file name -> its frames
    partial_files: dict[str, int] = field(default_factory=dict)  # resumed: frames already taken
    open_first: int = 0
    skipped: int = 0
    dark_source: str | None = None   # the dark subtracted ("": none; None: not known before a file came)
    first_frame_s: float | None = None
    last_frame_s: float | None = None


class StreamDataflow:
    """Feed arrivals in, get caked and refined ω-groups out (module docstring).

    Parameters
    ----------
    client : distributed.Client
    params : Params
    binmap : BinMap
    caking : Caking
    dark : ndarray (nz, ny) float32 or None
        The dark subtracted from every frame.
    spool : Spool
    limits : StreamLimits
    keep_frames : bool
        Write every frame's cake to the spool (for saved individual frames, SumImages, HDF5).
    dark_source : str
        What ``dark`` is (file and dataset; "" for none), recorded in the manifest.
    dark_of_file : callable, optional
        No dark given: called with the stream's first file before its frames are caked, it
        returns ``(dark or None, dark_source)``, the dark that file holds, subtracted from then on
        (and kept in the spool for ``--resume``).
    refinement : Refinement, optional
        Refine every closed group; None: cake only. The lineouts' 2θ follow the pixels the
        first frame has no value for (``flagged``).
    on_group_refined : callable, optional
        Called with (GroupRecord, list of LineoutResult) when a group's lineouts are all back.
    state : StreamState, optional
        A resumed stream's state; ``carry`` its open group's partial sum (a future or None).
    """

    def __init__(self, client: Any, params: Any, binmap: Any, caking: Caking, dark: np.ndarray | None,
                 spool: Spool, limits: StreamLimits, *, keep_frames: bool, caking_digest: str,
                 dark_source: str = "",
                 dark_of_file: Callable[[str], tuple[np.ndarray | None, str]] | None = None,
                 refinement: Refinement | None = None,
                 on_group_refined: Callable[[GroupRecord, list[Any]], None] | None = None,
                 on_group_closed: Callable[[GroupRecord, Any], None] | None = None,
                 source_summary: Callable[[], dict[str, Any]] = dict,
                 state: StreamState | None = None, carry: Any = None) -> None:
        from distributed import as_completed

        self.client, self.params, self.caking, self.spool, self.limits = client, params, caking, spool, limits
        self.keep_frames, self.caking_digest = keep_frames, caking_digest
        self.refinement, self.on_group_refined = refinement, on_group_refined
        self.on_group_closed = on_group_closed
        self.source_summary = source_summary
        self.shape = (int(binmap.n_r), int(binmap.n_eta))
        self.group_size = int(params.omega_sum_frames)
        if self.group_size == 0:
            raise MidasflowError("OmegaSumFrames: expected a non-zero frame count (-1 = all frames)")
        self.token = uuid.uuid4().hex[:8]
        self.state = state or StreamState()
        if binmap.cache_file is not None and binmap.digest is not None:  # each worker loads and keeps it
            self.binmap = BinMapRef(binmap.cache_file, binmap.key, binmap.digest)
        else:
            [self.binmap] = client.scatter([binmap], broadcast=True, hash=False)
        self.map = binmap
        self.dark_frame = dark
        self.dark = None if dark is None else client.scatter([dark], broadcast=True, hash=False)[0]
        #: The pixels the first frame taken has no value for (detector flags, with the dark's),
        #: None before it came: the cake's effective 2θ leaves them out (docs/caking_2theta.md §6).
        self.flagged = None if state is None else _resumed_flags(spool, self.state, tuple(binmap.detector_shape))
        self.context = None  # future of the refinement's WorkerContext
        if refinement is not None:
            self._scatter_context()
        self.dark_of_file = dark_of_file
        if dark_of_file is None:
            self.state.dark_source = dark_source
        [self.caking_future] = client.scatter([caking], broadcast=True, hash=False)
        self.last_fold = carry
        self.done = as_completed()
        self.tracked: dict[str, tuple[Any, _Tracked]] = {}
        self.frames_in_flight = 0
        self.groups_pending = 0
        self.results: list[Any] = []
        self.unwritten: set[int] = set()  # groups whose cake is not yet in the spool
        self._parts: list[FramePart] = []   # frames taken, not yet submitted (one task)
        self._positions: list[int] = []
        self._taken_at = 0.0                # time.monotonic() when the first of them was taken

    # -- feeding --------------------------------------------------------------------------
    @property
    def n_frames(self) -> int:
        """Frames taken (after SkipFrame)."""
        return len(self.state.frames)

    def wants_more(self) -> bool:
        """False once ``stop_after`` frames were taken."""
        n = self.limits.stop_after
        return n is None or self.n_frames < n

    def _track(self, future: Any, kind: str, payload: Any = None) -> None:
        self.tracked[future.key] = (future, _Tracked(kind, payload))
        self.done.add(future)

    def _omega(self, position: int) -> float:
        return float(self.params.omega_start_deg) + float(self.params.omega_step_deg) * position

    def feed(self, arrival: Arrival, interrupted: Callable[[], bool] = lambda: False) -> None:
        """Take an arrival's frames and submit their caking (waiting while too much is in flight).

        Frames are caked together up to ``frames_per_task``, never across an ω-group's end: the
        frames of arrivals that come back to back (``arrival.more``), and of arrivals that come
        within ``max_wait_s`` of the first frame waiting (:meth:`flush_due` submits them once it
        has waited that long, when no frame comes).
        """
        now = time.time()
        start = 0
        if self.dark_of_file is not None and arrival.path is not None:
            self._take_dark(arrival.path)
        if arrival.path is not None:
            self.state.files[arrival.name] = arrival.n_frames
            start = self.state.partial_files.pop(arrival.name, 0)  # a resumed file's frames left
        skip = max(int(self.params.skip_frame) - self.state.skipped, 0)
        if skip:  # SkipFrame: the stream's first frames are not taken
            skipped = min(skip, arrival.n_frames - start)
            self.state.skipped += skipped
            start += skipped
        if self.flagged is None and start < arrival.n_frames and self.wants_more():
            self._take_flags(arrival, start)
        per_task = self.limits.frames_per_task
        while start < arrival.n_frames and self.wants_more():
            room = self.limits.stop_after - self.n_frames if self.limits.stop_after else arrival.n_frames
            stop = min(arrival.n_frames, start + per_task - len(self._positions), start + room)
            if self.group_size > 0:  # a task ends where its group ends (the next starts a new lineage)
                stop = min(stop, start + self.group_size - (self.n_frames - self.state.open_first) % self.group_size)
            self._take(arrival, start, stop)
            start = stop
            group_end = self.group_size > 0 and (self.n_frames - self.state.open_first) % self.group_size == 0
            if len(self._positions) >= per_task or group_end:
                self.flush(interrupted)
        if not self.wants_more():
            self.flush(interrupted)
        elif not arrival.more:
            self.flush_due(interrupted)
        self.state.last_frame_s = now
        if self.state.first_frame_s is None:
            self.state.first_frame_s = now

    def warm_up(self) -> None:
        """Give every worker the bin map and the caking kernel's layout of it (one pass of
        ``frames_per_task`` blank frames, :func:`~midasflow.stream.tasks.warm_caking`) before the
        first frame comes: they take seconds to load, check and build, which would otherwise be
        spent while the first frames queue up (and a PV drops them). This process gets the
        pixels' mean 2θ the first frame's flags need (:func:`midasflow.binmap.cached_pixel_mean_tth_deg`)."""
        from midasflow.binmap import cached_pixel_mean_tth_deg

        if self.flagged is None:
            cached_pixel_mean_tth_deg(self.map, self.params)
        workers = list(self.client.scheduler_info()["workers"])
        n = self.limits.frames_per_task
        futures = [self.client.submit(warm_caking, self.binmap, self.caking_future, n, workers=[w],
                                      allow_other_workers=False, pure=False, key=f"stream-warm-{k}-{self.token}")
                   for k, w in enumerate(workers)]
        self.client.gather(futures)
        for future in futures:
            future.release()

    def _take_dark(self, path: str) -> None:
        """The dark of the stream's first file (``dark_of_file``), kept in the spool and sent to
        the workers once."""
        dark, self.state.dark_source = self.dark_of_file(path)
        self.dark_of_file = None
        self.dark_frame = dark
        if dark is not None:
            save_array(self.spool.dark_path, dark)
            [self.dark] = self.client.scatter([dark], broadcast=True, hash=False)
        log.info("stream dark: %s", self.state.dark_source or "none")

    def _take_flags(self, arrival: Arrival, start: int) -> None:
        """The pixels the stream's first frame (frame ``start`` of ``arrival``, read here) has
        no value for, with the dark's (:func:`midasflow.caking.flagged_pixels`, as batch mode
        takes them from a scan's first frame), kept in the spool; the refinement's lineouts
        get the 2θ the bins they cut sample."""
        from midasflow.caking import flagged_pixels

        part = FramePart(path=arrival.path, start=start, stop=start + 1, pva=arrival.payload)
        [first] = _to_float32(read_part(part, self.caking))
        self.flagged = flagged_pixels(first, self.dark_frame)
        save_array(self.spool.flags_path, self.flagged)
        log.info("stream first frame: %d pixels flagged", int(self.flagged.sum()))
        if self.refinement is not None and self.flagged.any():
            self._scatter_context()

    def _scatter_context(self) -> None:
        """Send the refinement's worker context to the workers (replacing the one sent before),
        its lineouts' 2θ following ``flagged`` (:func:`midasflow.caking.cake_coords`)."""
        from midasflow.caking import cake_coords

        context = self.refinement.context
        layout = context.layout
        if self.flagged is not None and layout is not None and layout.tth_axis == "effective":
            axis = cake_coords(self.params, self.map, self.flagged)["effective_tth_deg"]
            context = replace(context, layout=replace(layout, tth_deg=np.asarray(axis)))
        if self.context is not None:
            self.context.release()
        [self.context] = self.client.scatter([context], broadcast=True, hash=False)

    def _take(self, arrival: Arrival, start: int, stop: int) -> None:
        """Frames ``start:stop`` of an arrival: recorded, and added to the next caking task."""
        first = self.n_frames
        for k in range(stop - start):
            frame = {"name": arrival.name, "frame_in_file": start + k, "omega_deg": self._omega(first + k)}
            if arrival.unique_id is not None:
                frame["unique_id"] = arrival.unique_id
            if arrival.path is not None and arrival.n_frames > 1:
                frame["multi"] = True
            self.state.frames.append(frame)
        if not self._positions:
            self._taken_at = time.monotonic()
        self._parts.append(FramePart(path=arrival.path, start=start, stop=stop, pva=arrival.payload))
        self._positions.extend(range(first, first + stop - start))

    def flush_due(self, interrupted: Callable[[], bool] = lambda: False) -> None:
        """Submit the frames taken once the first of them has waited ``max_wait_s``."""
        if self._positions and time.monotonic() - self._taken_at >= self.limits.max_wait_s:
            self.flush(interrupted)

    def flush(self, interrupted: Callable[[], bool] = lambda: False) -> None:
        """Submit the frames taken and not yet submitted as one caking task."""
        if not self._positions:
            return
        parts, positions = tuple(self._parts), tuple(self._positions)
        self._parts, self._positions = [], []
        self._wait_for_room(len(positions), interrupted)
        self._submit(parts, positions, time.time())

    def _wait_for_room(self, n: int, interrupted: Callable[[], bool]) -> None:
        lim = self.limits
        while (self.frames_in_flight and self.frames_in_flight + n > lim.max_frames_in_flight) or \
                self.groups_pending >= lim.max_groups_pending:
            if not self.collect(block=True) or interrupted():
                return

    def _submit(self, parts: tuple[FramePart, ...], positions: tuple[int, ...], now: float) -> None:
        item = FrameItem(positions=positions, parts=parts,
                         frame_paths=tuple(self.spool.frame_path(p) for p in positions) if self.keep_frames else ())
        key = f"stream-cake-{positions[0]}-{self.token}"
        data = None
        if any(part.pva is not None for part in parts):  # PV frames (MBs each) go as data, not in the task
            item = replace(item, parts=())
            # straight to a worker (distributed's default sends them through the scheduler: every
            # frame's bytes would cross two connections), unless the client was told not to
            [data] = self.client.scatter([parts], hash=False, direct=self.client.direct_to_workers is not False)
        cakes = self.client.submit(cake_item, item, self.binmap, self.caking_future, self.dark, data, key=key,
                                   pure=False, priority=10)
        self._track(cakes, "cake", len(positions))
        self.frames_in_flight += len(positions)
        rel = np.asarray(positions) - self.state.open_first  # groups start at open_first + k·size
        if self.group_size > 0:
            starts, ends = rel % self.group_size == 0, rel % self.group_size == self.group_size - 1
        else:  # OmegaSumFrames -1: one group of every frame, closed at the end
            starts, ends = rel == 0, np.zeros(rel.size, dtype=bool)
        # a fold that starts a group does not need the one before: not depending on it keeps the
        # scheduler's lineage (and a lost worker's recomputation) within one group
        previous = None if starts[0] else self.last_fold
        self.last_fold = self.client.submit(fold, previous, cakes, starts, ends,
                                            key=f"stream-fold-{positions[0]}-{self.token}", pure=False,
                                            priority=10)
        closed = 0
        group_first = self.state.open_first
        for p, end in zip(positions, ends):
            if end:
                self._close(self.last_fold, closed, group_first, p, now)
                closed += 1
                group_first = p + 1
        self.state.open_first = group_first

    def _close(self, fold_future: Any, k: int, first: int, last: int, now: float) -> None:
        g = len(self.state.groups)
        record = GroupRecord(g, first, last, self._omega(first), self._omega(last), now)
        self.state.groups.append(record)
        fut = self.client.submit(take_group, fold_future, k, self.spool.group_path(g),
                                 key=f"stream-group-{g}-{self.token}", pure=False, priority=10)
        self._track(fut, "group", record)
        self.unwritten.add(g)
        self.groups_pending += 1

    def refine_resumed(self, cakes: list[Any]) -> None:
        """Refine the closed groups of a resumed stream again (their finished lineouts come back
        from their checkpoints)."""
        for record, cake in zip(self.state.groups, cakes):
            self.groups_pending += 1
            self._refine(cake, record)

    # -- collecting -----------------------------------------------------------------------
    def collect(self, block: bool = False) -> bool:
        """Handle the futures that finished (waiting for one with ``block``); False when none
        is in flight."""
        if self.done.is_empty():
            return False
        for fut in self.done.next_batch(block=block):
            _, tracked = self.tracked.pop(fut.key)
            self._finished(fut, tracked)
            fut.release()
        return True

    def _finished(self, fut: Any, tracked: _Tracked) -> None:
        if tracked.kind == "cake":
            self.frames_in_flight -= tracked.payload
            _raise_if_failed(fut)  # a frame that could not be read stops the stream (one line)
        elif tracked.kind == "save":
            _raise_if_failed(fut)
        elif tracked.kind == "group":
            _raise_if_failed(fut)
            record: GroupRecord = tracked.payload
            self.unwritten.discard(record.group)
            self.write_manifest()
            if self.on_group_closed is not None:
                self.on_group_closed(record, fut)
            self._refine(fut, record)
        elif tracked.kind == "refine":
            record, unit = tracked.payload
            try:
                outcome = fut.result()
                results = outcome.results
            except Exception as exc:  # lost beyond retries: its lineouts fail, the others go on
                from midasflow.refinement.lineouts import failed_result

                message = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
                omega = record.info().omega_deg
                results = [failed_result(record.group * self.refinement.n_eta + e, record.group, e, omega,
                                         float("nan"), message) for e in range(*unit)]
            self.results.extend(results)
            record.units_left -= 1
            if record.units_left == 0:
                record.refined_s = time.time()
                self.groups_pending -= 1
                done = [r for r in self.results if r.group == record.group]
                if self.on_group_refined is not None:
                    self.on_group_refined(record, done)

    def _refine(self, cake: Any, record: GroupRecord) -> None:
        ref = self.refinement
        if ref is None:
            record.refined_s = time.time()
            self.groups_pending -= 1
            return
        info = record.info()
        seed = None
        step = ref.lineouts_per_task
        whole = step >= ref.n_eta
        if ref.seed_from is not None and not whole:
            seed = self.client.submit(refine_group_seed, self.context, info, cake, pure=False,
                                      key=f"refine-lineout-seed-{record.group}-{self.token}")
        base = record.group * ref.n_eta
        for e0 in range(0, ref.n_eta, step):
            e1 = min(e0 + step, ref.n_eta)
            span = f"{base + e0}" if e1 - e0 == 1 else f"{base + e0}-{base + e1 - 1}"
            fut = self.client.submit(refine_part, self.context, info, cake, e0, e1, seed, pure=False,
                                     key=f"refine-lineout-{span}-{self.token}", retries=2)
            self._track(fut, "refine", (record, (e0, e1)))
            record.units_left += 1

    # -- the end --------------------------------------------------------------------------
    def finish(self, *, end_of_stream: bool) -> None:
        """Wait for everything in flight. ``end_of_stream``: the open group is closed (a short
        last group, as MIDAS); otherwise (the stream was interrupted) its partial sum is kept in
        the spool for ``--resume``."""
        self.flush()
        open_frames = self.n_frames - self.state.open_first
        if open_frames and self.last_fold is not None:
            if end_of_stream:
                self.last_fold = self.client.submit(close_open, self.last_fold, pure=False,
                                                    key=f"stream-fold-end-{self.token}")
                self._close(self.last_fold, 0, self.state.open_first, self.n_frames - 1, time.time())
                self.state.open_first = self.n_frames
            else:
                fut = self.client.submit(save_carry, self.last_fold, self.spool.open_group_path,
                                         pure=False, key=f"stream-save-open-{self.token}")
                self._track(fut, "save")
        while self.collect(block=True):
            pass
        self.write_manifest(complete=True)

    def write_manifest(self, complete: bool = False) -> None:
        """Record the stream's state in the spool.

        While the stream runs (``complete`` False) the record stops at the last ω-group whose
        cake is written (every earlier one is too), so a stream killed outright resumes from
        there; ``complete`` (after :meth:`finish`) records every frame and the open group.
        """
        st = self.state
        groups = []
        for g in st.groups:
            if g.group in self.unwritten:
                break
            groups.append(g)
        cut = self.n_frames if complete else (groups[-1].last + 1 if groups else 0)
        frames = st.frames[:cut]
        consumed: dict[str, int] = {}
        for frame in frames:
            consumed[frame["name"]] = max(consumed.get(frame["name"], 0), frame["frame_in_file"] + 1)
        taken = [name for name, n in st.files.items() if consumed.get(name, n if complete else 0) >= n]
        partial = {name: consumed[name] for name, n in st.files.items() if 0 < consumed.get(name, 0) < n}
        partial.update({k: v for k, v in st.partial_files.items() if k not in st.files})  # not seen again yet
        open_first = st.open_first if complete else cut
        self.spool.write_manifest({
            "caking_digest": self.caking_digest,
            "frames": frames,
            "groups": [g.to_json() for g in groups],
            "taken_files": taken,
            "partial_files": partial,
            "open_first": open_first,
            "open_frames": cut - open_first,
            "skipped": st.skipped,
            "dark_source": st.dark_source,
            "keep_frames": self.keep_frames,
            "source": self.source_summary(),
        })


def _raise_if_failed(future: Any) -> None:
    """Raise a finished task's error, if it failed, without fetching its result: the cakes of a
    caking task (~1.2 MB per 2048² frame) and a group's cake stay on the workers, where the
    tasks after them read them."""
    if future.status != "finished":
        future.result()


def _resumed_flags(spool: Spool, state: StreamState, shape: tuple[int, int]) -> np.ndarray | None:
    """The flagged pixels of a resumed stream's first frame, from the spool (None: no frame
    was taken yet); none (with a warning) for a spool written before midasflow kept them."""
    from pathlib import Path

    if Path(spool.flags_path).is_file():
        return load_array(spool.flags_path, shape, np.bool_)
    if not state.frames:
        return None
    log.warning("%s: missing; the resumed stream's effective 2θ leaves no flagged pixel out",
                spool.flags_path)
    return np.zeros(shape, dtype=bool)


def lineouts_per_task(n_eta: int, threads: int) -> int:
    """η columns per refinement task: every thread gets about four tasks of each group."""
    return max(1, math.ceil(n_eta / max(4 * threads, 1)))


def resumed_state(manifest: dict[str, Any], spool: Spool, client: Any, shape: tuple[int, int]
                  ) -> tuple[StreamState, Any, list[Any]]:
    """A stopped stream's state from its manifest: the state, the open group's partial sum (a
    future, or None) and a future of every closed group's spooled cake."""
    groups = [GroupRecord(g["group"], g["first"], g["last"], float(g["omega_first_deg"]),
                          float(g["omega_last_deg"]), 0.0) for g in manifest["groups"]]
    state = StreamState(frames=list(manifest["frames"]), groups=groups,
                        files={name: 0 for name in manifest["taken_files"]},
                        partial_files=dict(manifest.get("partial_files", {})),
                        open_first=manifest["open_first"], skipped=int(manifest.get("skipped", 0)),
                        dark_source=manifest.get("dark_source"))
    carry = None
    if manifest["open_frames"]:
        carry = client.submit(load_spooled, spool.open_group_path, shape, pure=False)
    cakes = [client.submit(load_spooled, spool.group_path(g.group), shape, pure=False) for g in groups]
    return state, carry, cakes
