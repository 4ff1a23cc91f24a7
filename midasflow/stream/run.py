"""``run --backend stream``: cake and refine frames while they arrive (MIDAS's stream backend).

:func:`run_stream` sets up what batch mode sets up (parameters, bin map, dark, refinement
options, backend, checkpoints; every input checked before any work), then feeds a source
(:class:`~midasflow.stream.sources.FolderSource` or :class:`~midasflow.stream.pva.PvaSource`) into
a :class:`~midasflow.stream.dataflow.StreamDataflow` until it stops: after ``stop_after`` frames,
``idle_timeout_s`` seconds without a frame, or Ctrl-C / SIGTERM. As groups are refined,
``results.zarr``, ``refinement_summary.json`` and ``report.html`` in ``out`` are rewritten every
few groups (atomically); at the end come the ``.zarr.zip`` batch mode writes, the HDF5 of the
cakes with ``output_h5``, and the final results, report and ``stream_summary.json``.

Ctrl-C or SIGTERM stops taking frames, finishes the frames and groups in flight, keeps the open
group's partial sum in the spool and writes every output for the closed groups; ``resume``
continues the stream from there (a folder's files not yet taken; frames of a PV from now on),
and the open group goes on bit for bit. A second Ctrl-C / SIGTERM stops at once: the spool and
checkpoints stay consistent (every file is written atomically) and ``resume`` finishes.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from midasflow.errors import ParameterError

log = logging.getLogger(__name__)

#: Groups whose lineouts keep their full patterns (fitted curves) for the report and live view.
FULL_PATTERN_GROUPS = 12

#: Dask settings of the workers of a cluster made for a stream: distributed's statistical
#: profiler samples each worker's running task every 100 ms instead of every 10 ms (its default).
#: Sampling runs on the worker's event loop, the thread that also receives the frames; at 10 ms it
#: cost ~2 ms of CPU per 2048² frame at 20 frames/s (docs/stream.md). The dashboard's Profile page
#: still fills (10 samples per second per worker); switching it off would blank it.
STREAM_WORKER_CONFIG = {"distributed.worker.profile.interval": "100ms"}


@contextmanager
def stream_worker_config() -> Iterator[None]:
    """While inside, workers made in this process (a ``LocalCluster``'s) get
    :data:`STREAM_WORKER_CONFIG`."""
    import dask
    import distributed  # noqa: F401  (its settings must be known before they are set)

    with dask.config.set(STREAM_WORKER_CONFIG):
        yield


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[dict[str, int]]:
    """While inside: the first Ctrl-C / SIGTERM sets ``stop`` (the stream winds down); a second
    one raises at once (KeyboardInterrupt, or ``cli.Terminated`` for SIGTERM). Yields a dict whose
    ``"signal"`` is the first signal received (0: none)."""
    from midasflow.cli import Terminated

    seen = {"signal": 0}
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def handler(signum, frame):  # noqa: ANN001, ARG001
        if seen["signal"]:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        seen["signal"] = signum
        stop.set()
        print("midasflow run: stopping the stream: finishing the frames and groups in flight "
              "(Ctrl-C again stops at once; --resume continues)", file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield seen
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _slim(result: Any) -> Any:
    """A lineout result without its fitted curves (the numbers stay)."""
    if result.pattern is None:
        return result
    return dataclasses.replace(result, pattern=result.pattern.without_curves())


def zarr_output_path(zarr_output: str | None, output_h5: str | None, result_folder: str | os.PathLike,
                     stem: str) -> Path:
    """Where the ``.zarr.zip`` goes: ``--zarr-output``; else beside ``--output-h5`` with its
    extension replaced (``scan.01.h5`` → ``scan.01.zarr.zip``); else ``<resultFolder>/<stem>.zarr.zip``."""
    if zarr_output:
        return Path(zarr_output)
    if output_h5:
        return Path(os.path.splitext(output_h5)[0] + ".zarr.zip")
    return Path(result_folder) / f"{stem}.zarr.zip"


def first_file_dark(path: str, params: Any, dark_loc: str) -> tuple[np.ndarray | None, str]:
    """The dark inside a stream's first file: the mean of dataset ``dark_loc`` of an HDF5 file or
    zarr group, as batch mode takes it from a scan's first file (by the same function,
    :func:`midasflow.io.frames.dark_mean`).

    Returns
    -------
    (ndarray (nz, ny) float32 or None, str)
        The dark and its label (file and dataset); ``(None, "")`` when the file holds none.
    """
    from midasflow.io.frames import dark_mean

    frame, label = dark_mean(path, params, None, dark_loc)
    return (None, "") if frame is None else (np.asarray(frame.compute(), dtype=np.float32), label)


def source_stem(folder: str | None, channel: str) -> str:
    """Output stem of a stream: the folder's name, or the PV name with ``:`` as ``_``."""
    if folder:
        return Path(folder).resolve().name or "stream"
    return channel.replace(":", "_")


def run_stream(
    param_fn: str | os.PathLike,
    cifs: Sequence[str | os.PathLike],
    *,
    folder: str | os.PathLike | None = None,
    pva: bool = False,
    pva_ip: str | None = None,
    pva_channel: str | None = None,
    pva_conf: Mapping[str, str] | None = None,
    out: str | os.PathLike = "refinement",
    result_folder: str | os.PathLike | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    cache_dir: str | os.PathLike | None = None,
    dark: str | None = None,
    data_loc: str = "exchange/data",
    dark_loc: str = "exchange/dark",
    output_h5: str | None = None,
    compress: bool = False,
    zarr_output: str | None = None,
    no_zarr: bool = False,
    stop_after: int | None = None,
    idle_timeout_s: float | None = None,
    settle_s: float = 0.5,
    client: Any = None,
    resume: bool = False,
    skip_refinement: bool = False,
    refresh_every: int = 1,
    live: bool = True,
    live_port: int = 0,
    max_frames_in_flight: int | None = None,
    instprm: str | None = None,
    bkg_terms: int = 6,
    limits: tuple[float, float] | None = None,
    refine_atoms: bool = True,
    mode: str = "rietveld",
    export: bool | Sequence[str] = True,
    backend: str = "native",
    seed_from: str | None = "group",
    ref_cells: Mapping[str, Sequence[float]] | None = None,
    min_points: int = 20,
    max_reflections: int | None = None,
    report: bool = True,
    progress: bool = False,
    estimate: bool = True,
    physical_profile: bool = False,
    max_rwp: float | None = None,
    include_flagged: bool = False,
    max_bins: int | None = None,
    max_map_entries: int | None = None,
    texture: str | None = None,
    po_axis: Sequence[int] = (0, 0, 1),
    sh_order: int = 4,
    precision: str = "float64",
    warm_start: bool | None = None,
) -> Any:
    """Cake and refine a stream of frames as they arrive; return the results Dataset (the
    ``.zarr.zip`` path with ``skip_refinement``; None when no group closed).

    Parameters
    ----------
    param_fn : path
        MIDAS parameter file (``--param-file``); ``overrides`` as for batch mode.
    cifs : sequence of path
        One CIF per phase.
    folder : path, optional
        Watch this folder (``--folder``); else ``pva`` must be set.
    pva, pva_ip, pva_channel
        Take frames from the NTNDArray PV ``pva_channel`` searched at ``pva_ip``.
    out : path
        Refinement outputs, checkpoints and the stream's spool (``<out>/stream``).
    result_folder : path, optional
        Where the ``.zarr.zip`` goes unless ``zarr_output`` names it (default: the folder
        holding ``out``, as :func:`midasflow.pipeline.run`).
    dark : path, optional
        ``--dark``: a dark file in any frame format (its frames' mean is subtracted). Without
        it, the parameter file's ``Dark``; else, as batch mode, dataset ``dark_loc`` in the
        stream's first file (HDF5, zarr; :func:`first_file_dark`); else no dark.
    data_loc, dark_loc : str
        ``--stream-data-loc`` (or ``-dataLoc``), ``-darkLoc``: datasets of the frames and darks
        in HDF5/zarr files.
    output_h5, compress, zarr_output, no_zarr
        ``--output-h5 F`` (HDF5 of the cakes), ``--compress`` (deflate in it), ``--zarr-output
        NAME``, ``--no-zarr``.
    stop_after, idle_timeout_s
        Stop after this many frames / seconds without a frame (the stream also stops on
        Ctrl-C and SIGTERM).
    settle_s : float
        A folder's file counts as complete once unchanged this long (and readable).
    client : distributed.Client, optional
        Default: a local cluster of one single-threaded worker per core.
    resume : bool
        Continue a stream that stopped, from its spool and checkpoints.
    refresh_every : int
        Rewrite the results and report after this many refined groups (at least).
    live, live_port
        Serve the live page (:mod:`midasflow.stream.live`) on 127.0.0.1 (port 0: any free one).
    Other parameters
        As :func:`midasflow.pipeline.refine`.
    """
    from midasflow.binmap import load_or_build_binmap
    from midasflow.caked_schema import caked_dataset
    from midasflow.caking import cake_attrs, cake_coords
    from midasflow.crystal import read_phases
    from midasflow.io.atomic import remove_stale_temporaries
    from midasflow.io.frames import dark_mean
    from midasflow.io.instprm import instrument_from_midas, read_instprm
    from midasflow.io.lock import check_writable_folder, output_lock
    from midasflow.io.mask import mask_from_params
    from midasflow.limits import MAX_BINS, MAX_MAP_ENTRIES, MAX_REFLECTIONS, check_binning
    from midasflow.params import read_params
    from midasflow.pipeline import check_binmap_covers_detector, clear_previous_outputs
    from midasflow.refinement.backends import make_refiner
    from midasflow.refinement.checkpoints import SUBDIR as CHECKPOINT_SUBDIR
    from midasflow.refinement.checkpoints import Checkpoints, record_settings
    from midasflow.refinement.options import RefineOptions, check_max_rwp, check_recipe
    from midasflow.refinement.plan import CakeLayout, LineoutPlan
    from midasflow.stream.dataflow import (
        Refinement,
        StreamDataflow,
        StreamLimits,
        lineouts_per_task,
        resumed_state,
    )
    from midasflow.stream.pva import DEFAULT_CHANNEL, PvaSource
    from midasflow.stream.sources import FolderSource
    from midasflow.stream.spool import Spool, caking_digest, load_array
    from midasflow.stream.tasks import Caking

    # ---- every input checked before any work -------------------------------------------
    if (folder is None) == (not pva):
        raise ParameterError("stream: give --folder DIR or --pva (one of them)")
    channel = pva_channel or DEFAULT_CHANNEL
    params = read_params(param_fn, overrides)
    max_bins = max_bins or MAX_BINS
    max_map_entries = max_map_entries or MAX_MAP_ENTRIES
    check_binning(params, max_bins=max_bins, max_map_entries=max_map_entries)
    if folder is not None and not Path(folder).is_dir():
        raise ParameterError(f"{folder}: no such folder (--folder)")
    out = Path(out)
    result_folder = out.parent if result_folder is None else result_folder  # the store beside ``out``
    check_writable_folder(out, "--out")
    check_writable_folder(result_folder, "-resultFolder")
    for name in (zarr_output, output_h5):
        if name:
            check_writable_folder(Path(name).resolve().parent, "--zarr-output/--output-h5")
    if stop_after is not None and stop_after < 1:
        raise ParameterError(f"--stop-after {stop_after}: expected a frame count >= 1")
    if idle_timeout_s is not None and not idle_timeout_s > 0:
        raise ParameterError(f"--idle-timeout {idle_timeout_s}: expected seconds > 0")
    phases = None
    if not skip_refinement:
        if not cifs:
            raise ParameterError("--cif: at least one CIF is needed to refine")
        check_recipe(bkg_terms, limits, mode)
        check_max_rwp(max_rwp)
        phases = read_phases(cifs)
    dark_frame, dark_label = dark_mean("", params, dark, dark_loc)  # --dark or Dark: before the map is built
    in_file_dark = dark_frame is None and folder is not None  # the first file's, once it is there
    binmap = load_or_build_binmap(params, mask_from_params(params), cache_dir, max_bins=max_bins,
                                  max_map_entries=max_map_entries)
    check_binmap_covers_detector(binmap, params)
    dark_frame = None if dark_frame is None else np.asarray(dark_frame.compute(), dtype=np.float32)
    skeleton = caked_dataset(  # the caked layout of the stream (no group yet)
        intensity=np.zeros((0, binmap.n_r, binmap.n_eta)), frames_summed=np.zeros(0),
        omega_first_deg=np.zeros(0), omega_last_deg=np.zeros(0), last_frame=np.zeros(0),
        frame=np.zeros(0), omega_frame_deg=np.zeros(0), **cake_coords(params, binmap),
        attrs=cake_attrs(params))
    caking = Caking(params=params, data_loc=data_loc, normalize=bool(params.normalize),
                    min_area_fraction=float(params.min_area_fraction), mask_rule=str(params.mask_rule),
                    pre_proc_thresh=None)
    keep_frames = bool(params.save_individual_frames or params.sum_images or output_h5)
    digest = caking_digest(params.to_text(), binmap.key,
                           dark_label or (f"first file::{dark_loc}" if in_file_dark else ""),
                           {"data_loc": data_loc, "source": str(folder) if folder else channel})
    plan = None
    if phases is not None:
        instrument = read_instprm(instprm) if instprm else instrument_from_midas(skeleton)
        options = RefineOptions(phases=tuple(phases), instrument=instrument, bkg_terms=bkg_terms,
                                limits=limits, refine_atoms=refine_atoms, mode=mode, estimate=estimate,
                                physical_profile=physical_profile, max_rwp=max_rwp,
                                texture=texture, po_axis=tuple(po_axis), sh_order=sh_order,
                                precision=precision, warm_start=warm_start)
        refiner = make_refiner(backend, cifs, out, export=export, physical_profile=physical_profile)
        plan = LineoutPlan(CakeLayout.of(skeleton), None, options, refiner, seed_from, int(min_points))
        options.check_against(plan.usable_tth(), min_points, max_reflections=max_reflections or MAX_REFLECTIONS)

    owns_client = client is None
    if owns_client:
        from midasflow.cluster import get_client

        with stream_worker_config():
            client, description = get_client(n_workers=os.cpu_count() or 1)
        print(description, file=sys.stderr)
    stop = threading.Event()
    spool = Spool(out)
    try:
        with output_lock(out, flag="--out", holder="midasflow run --backend stream"):
            for path in (out, out / CHECKPOINT_SUBDIR):
                remove_stale_temporaries(path)
            clear_previous_outputs(out, resume=resume)
            state = carry = None
            cakes: list[Any] = []
            if resume:
                manifest = spool.read_manifest(digest)
                keep_frames = keep_frames and bool(manifest["keep_frames"])
                state, carry, cakes = resumed_state(manifest, spool, client, (binmap.n_r, binmap.n_eta))
                previous_source = manifest["source"]
            else:
                spool.create()
                previous_source = {}
            dark_of_file = None
            if in_file_dark and state is not None and state.dark_source:  # resumed: the spool's copy
                dark_frame, dark_label = (load_array(spool.dark_path, tuple(binmap.detector_shape), np.float32),
                                          state.dark_source)
            elif in_file_dark and (state is None or state.dark_source is None):
                dark_of_file = functools.partial(first_file_dark, params=params, dark_loc=dark_loc)
            refinement = None
            if plan is not None:
                record_settings(out, {**plan.options.settings(), "backend": backend, "min_points": min_points,
                                      "seed_from": seed_from, "data_file": f"stream {folder or channel}"},
                                resume=resume)
                checkpoints = Checkpoints.create(out, plan.refine_digest(), resume=resume)
                threads = sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values())
                refinement = Refinement(plan.worker_context(checkpoints), seed_from,
                                        lineouts_per_task(binmap.n_eta, threads),
                                        int(binmap.n_eta))
            if folder is not None:
                source = FolderSource(folder, params, data_loc=data_loc, settle_s=settle_s,
                                      skip=state.files if state else ())
                source_summary = lambda: {"kind": "folder", "folder": str(Path(folder).resolve()),  # noqa: E731
                                          "pending": source.pending()}
            else:
                source = PvaSource(channel, params, address=pva_ip, conf=dict(pva_conf) if pva_conf else None)
                if previous_source.get("kind") == "pva":
                    source.dropped = int(previous_source.get("dropped_frames", 0))
                source_summary = lambda: {"kind": "pva", **source.summary()}  # noqa: E731
            outputs = _Outputs(out, plan, ref_cells, include_flagged, backend, mode, report, refresh_every,
                               source_summary)
            live_view = None
            if live:
                from midasflow.stream.live import LiveView

                live_view = LiveView(skeleton, port=live_port)
                print(f"live view: {live_view.url}", file=sys.stderr)
            threads = sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values())
            per_task = StreamLimits.frames_per_task  # each thread busy with one map pass, one waiting
            limits_ = StreamLimits(stop_after=stop_after, idle_timeout_s=idle_timeout_s,
                                   max_frames_in_flight=max_frames_in_flight or 2 * threads * per_task)
            flow = StreamDataflow(
                client, params, binmap, caking, dark_frame, spool, limits_, keep_frames=keep_frames,
                caking_digest=digest, dark_source=dark_label, dark_of_file=dark_of_file, refinement=refinement,
                on_group_refined=lambda rec, res: _on_refined(outputs, live_view, flow, rec, res),
                on_group_closed=(None if live_view is None
                                 else lambda rec, fut: live_view.show_cake(rec, fut.result())),
                source_summary=source_summary, state=state, carry=carry)
            outputs.flow = flow
            if cakes:
                flow.refine_resumed(cakes)
            flow.warm_up()
            t_start = time.time()
            with stop_on_signals(stop) as received:
                end_of_stream = _consume(source, flow, stop, idle_timeout_s, progress)
                flow.finish(end_of_stream=end_of_stream and not received["signal"])
                results = outputs.final(flow, skeleton, binmap, params, client, spool,
                                        zarr_output_path(zarr_output, output_h5, result_folder,
                                                         source_stem(str(folder) if folder else None, channel)),
                                        no_zarr=no_zarr, output_h5=output_h5, compress=compress,
                                        keep_frames=keep_frames, t_start=t_start,
                                        interrupted=bool(received["signal"]), skip_refinement=skip_refinement)
            if live_view is not None:
                live_view.close()
            signum = received["signal"]
    finally:
        stop.set()
        if owns_client:
            from midasflow.cluster import close_client

            close_client(client)
    if signum:  # the outputs are written; the command reports the stop as for batch mode
        from midasflow.cli import Terminated

        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
    return results


def _consume(source: Any, flow: Any, stop: threading.Event, idle_timeout_s: float | None,
             progress: bool) -> bool:
    """Feed the source's arrivals to the dataflow until it stops; True at the stream's end
    (frame count or idle timeout), False when ``stop`` was set (a signal)."""
    from midasflow.progress import TextProgress

    bar = TextProgress(flow.limits.stop_after or 0, "stream frames", progress)
    last = None  # the idle time counts from the source's first tick (it is ready: p4p imported, ...)
    try:
        for arrival in source.arrivals(stop):
            last = time.monotonic() if last is None else last
            flow.collect(block=False)
            if stop.is_set():
                return False
            if arrival is None:
                flow.flush_due(stop.is_set)
                if idle_timeout_s is not None and time.monotonic() - last > idle_timeout_s:
                    log.info("no frame for %g s: the stream ends", idle_timeout_s)
                    return True
                continue
            last = time.monotonic()
            before = flow.n_frames
            flow.feed(arrival, stop.is_set)
            for _ in range(flow.n_frames - before):
                bar.update(f"groups {len(flow.state.groups)}  ")
            if not flow.wants_more():
                return True
        return not stop.is_set()
    finally:
        bar.close()


def _on_refined(outputs: Any, live_view: Any, flow: Any, record: Any, results: list[Any]) -> None:
    outputs.group_refined(record, results)
    if live_view is not None:
        live_view.show_results(record, results, outputs.current)


class _Outputs:
    """The refinement outputs of a stream: refreshed as groups are refined, written at the end.

    A refresh (results, summary, report) runs in a writer thread on a snapshot of the finished
    groups, so the stream keeps taking frames meanwhile; at most one runs at a time."""

    def __init__(self, out: Path, plan: Any, ref_cells: Any, include_flagged: bool, backend: str, mode: str,
                 report: bool, refresh_every: int, source_summary: Any) -> None:
        self.out, self.plan, self.include_flagged = out, plan, include_flagged
        self.backend, self.mode, self.report = backend, mode, report
        self.refresh_every = max(1, int(refresh_every))
        self.source_summary = source_summary
        self.cells = dict(ref_cells or {})
        if plan is not None:
            for phase in plan.options.phases:
                self.cells.setdefault(phase.name, tuple(phase.cell))
        self.since_refresh = 0
        self.refresh_cost_s = 0.0
        self.last_refresh = 0.0
        self.current = None
        self.flow: Any = None
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream-outputs")
        self._refreshing: Future | None = None

    def assemble(self, lineouts: list[Any], groups: Sequence[Any]) -> Any:
        from midasflow.results import assemble_results

        done = sorted({r.group for r in lineouts})
        omega_frames = [np.linspace(groups[g].omega_first_deg, groups[g].omega_last_deg,
                                    groups[g].frames_summed) for g in range(max(done) + 1)] if done else None
        return assemble_results(
            lineouts, ref_cells=self.cells, phase_names=[p.name for p in self.plan.options.phases],
            attrs={"data_file": "stream", "backend": self.backend, "mode": self.mode,
                   "refine_digest": self.plan.refine_digest(), "tth_axis": self.plan.tth_axis},
            include_flagged=self.include_flagged, omega_frames_deg=omega_frames,
            texture=self.plan.options.texture, sh_order=self.plan.options.sh_order)

    def group_refined(self, record: Any, results: list[Any]) -> None:
        """Keep the group's results (fitted curves only for the first groups and this one),
        and rewrite the results and report every few groups."""
        flow = self.flow
        keep = set(range(FULL_PATTERN_GROUPS)) | {record.group}
        flow.results = [r if r.group in keep else _slim(r) for r in flow.results]
        self.since_refresh += 1
        busy = self._refreshing is not None and not self._refreshing.done()
        due = (not busy and self.since_refresh >= self.refresh_every
               and time.monotonic() - self.last_refresh >= 2 * self.refresh_cost_s)
        if not due:
            return
        self.wait()  # the last refresh's error, if any, stops the stream here
        # only groups whose every lineout is back, numbered from 0 without holes
        complete = 0
        while complete < len(flow.state.groups) and flow.state.groups[complete].refined_s is not None:
            complete += 1
        lineouts = sorted((r for r in flow.results if r.group < complete), key=lambda r: r.index)
        if lineouts:
            self.since_refresh = 0
            self._refreshing = self._writer.submit(self.refresh, lineouts, list(flow.state.groups[:complete]))

    def refresh(self, lineouts: list[Any], groups: list[Any]) -> None:
        """Rewrite results, summary and report from these lineouts (the writer thread)."""
        from midasflow.results import write_results

        t0 = time.monotonic()
        current = self.assemble(lineouts, groups)
        write_results(current, self.out)
        if self.report:
            from midasflow.report import write_report

            write_report(current, self.out / "report.html", lineouts=lineouts,
                         title="midasflow stream refinement report (refreshed while the stream runs)")
        self.current = current
        self.last_refresh = time.monotonic()
        self.refresh_cost_s = self.last_refresh - t0

    def wait(self) -> None:
        """Wait for the refresh in flight (raising its error)."""
        refreshing, self._refreshing = self._refreshing, None
        if refreshing is not None:
            refreshing.result()

    def final(self, flow: Any, skeleton: Any, binmap: Any, params: Any, client: Any, spool: Any,
              zarr_path: Path, *, no_zarr: bool, output_h5: str | None, compress: bool, keep_frames: bool,
              t_start: float, interrupted: bool, skip_refinement: bool) -> Any:
        """The outputs at the end: ``.zarr.zip``, HDF5, results, report, stream summary."""
        self.wait()  # no refresh may overwrite the final outputs
        self._writer.shutdown()
        from midasflow.io.atomic import write_text_atomic
        from midasflow.io.midas_zarr import write_midas_zarr
        from midasflow.stream.outputs import caked_from_spool, write_cakes_h5

        caked = caked_from_spool(flow.state, spool, params, binmap, keep_frames=keep_frames,
                                 flagged=flow.flagged)
        if caked is not None and not no_zarr:
            write_midas_zarr(caked, zarr_path, client=client)
        if caked is not None and output_h5:
            write_cakes_h5(output_h5, caked, flow.state, spool, compress=compress, keep_frames=keep_frames)
        stream = self.stream_summary(flow, t_start, interrupted, None if no_zarr or caked is None else zarr_path)
        write_text_atomic(self.out / "stream_summary.json", json.dumps(stream, indent=1))
        if skip_refinement or self.plan is None or not flow.results:
            return zarr_path if caked is not None and not no_zarr else None
        from midasflow.results import write_results

        lineouts = sorted(flow.results, key=lambda r: r.index)
        results = self.assemble(lineouts, flow.state.groups)
        results.attrs["stream"] = json.dumps(stream)
        write_results(results, self.out, extra={"stream": stream})
        if self.report:
            from midasflow.report import write_report

            write_report(results, self.out / "report.html", caked=caked, lineouts=lineouts,
                         title="midasflow stream refinement report")
        self.current = results
        return results

    def stream_summary(self, flow: Any, t_start: float, interrupted: bool, zarr_path: Path | None) -> dict:
        st = flow.state
        refined = [g.refined_s for g in st.groups if g.refined_s is not None]
        first, last = st.first_frame_s, st.last_frame_s
        return {
            "frames": flow.n_frames,
            "groups": len(st.groups),
            "open_group_frames": flow.n_frames - st.open_first,
            "interrupted": interrupted,
            "source": self.source_summary(),
            "first_frame_unix_s": first,
            "last_frame_unix_s": last,
            "frames_per_s": (flow.n_frames - 1) / (last - first) if first and last and last > first else None,
            "last_result_after_last_frame_s": (max(refined) - last) if refined and last else None,
            "dark": st.dark_source,
            "zarr": None if zarr_path is None else str(zarr_path),
        }
