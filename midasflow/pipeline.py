"""The dataflows behind the commands: ``integrate`` (frames → caked store), ``refine`` and ``run``.

Everything here is orchestration of functions of other modules. ``integrate`` wires frames →
cakes → ω-groups into one lazy Dask graph that the caller's scheduler (threaded by default, or a
``distributed.Client``) computes while the store is written. ``refine`` reads a store back and
refines one task per lineout (a plan run by a serial or a distributed executor). ``run`` does the
two one after the other on the same scheduler.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from midasflow.io.frames import ScanSource
from midasflow.limits import MAX_BINS, MAX_MAP_ENTRIES, MAX_REFLECTIONS
from midasflow.params import PROCESS_VARIABLES, Params, read_params
from midasflow.refinement.options import BackendName, Mode, SeedFrom

log = logging.getLogger(__name__)

_COMPRESSION_SUFFIXES = (".bz2", ".gz")
#: Suffixes MIDAS's pipeline stacks onto a data file's name (``integrator.py``'s
#: ``short_pipeline_stem``), stripped from the right so ``x.h5.analysis.MIDAS.zip`` -> ``x``.
_PIPELINE_SUFFIXES = (".zarr", ".zip", ".midas", ".analysis", ".caked", ".hdf5", ".hdf", ".h5",
                      ".tiff", ".tif")


def scan_stem(data_fn: str | Path) -> str:
    """Output stem of a scan: the first data file's name without its format extension.

    ``scan_000001.h5`` → ``scan_000001``; ``ff_000123.ge3`` → ``ff_000123``; MIDAS's converted
    ``scan_000001.h5.analysis.MIDAS.zip`` → ``scan_000001`` (the suffixes MIDAS stacks are
    stripped as its ``-shortNames 1`` does).
    """
    name = Path(data_fn).name
    for suffix in _COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    stripped = name
    while True:
        for suffix in _PIPELINE_SUFFIXES:
            if stripped.lower().endswith(suffix) and len(stripped) > len(suffix):
                stripped = stripped[: -len(suffix)]
                break
        else:
            break
    if stripped != name:
        return stripped
    return re.sub(r"\.[^.]+$", "", name) or name


def integrate_dataset(
    source: ScanSource | str | Path,
    params: Params,
    *,
    cache_dir: str | Path | None = None,
    max_bins: int = MAX_BINS,
    max_map_entries: int = MAX_MAP_ENTRIES,
) -> xr.Dataset:
    """Open the frames and cake them: the lazy caked Dataset (nothing is computed).

    Parameters
    ----------
    source : ScanSource or path
        The scan (HDF5/NeXus, GE, TIFF, CBF/EDF or zarr files, dark, dataset locations, file
        range; MIDAS ``integrator.py``'s flags of the same names); a path is one data file.
    params : Params
        Geometry, binning and frame parameters.
    cache_dir : path, optional
        Where bin maps are cached (default ``~/.cache/midasflow/binmaps``).
    max_bins, max_map_entries : int
        Size limits of the cake and the bin map (:func:`midasflow.limits.check_binning`),
        checked before anything is built.

    Notes
    -----
    The bin map comes first, then the frames are opened, in chunks of as many frames as one
    pass over the map takes (the kernel's fastest size, with bounded memory). The files'
    existence and the mask are checked before the map is built; the frames' shapes when they
    are opened. The first frame is read at once for the pixels the detector flags
    (:func:`midasflow.caking.cake`); the rest stays lazy.
    """
    from midasflow.binmap import load_or_build_binmap
    from midasflow.caking import cake
    from midasflow.caking_kernel import frames_per_pass
    from midasflow.io.frames import open_frames
    from midasflow.io.mask import mask_from_params
    from midasflow.limits import check_binning

    scan = ScanSource.of(source)
    check_binning(params, max_bins=max_bins, max_map_entries=max_map_entries)  # before any array
    scan.files()  # every file of the series exists, before the map is built
    binmap = load_or_build_binmap(params, mask_from_params(params), cache_dir, max_bins=max_bins,
                                  max_map_entries=max_map_entries)
    check_binmap_covers_detector(binmap, params)
    frames = open_frames(scan, params, frames_per_chunk=frames_per_pass(binmap, np.float32))
    return cake(frames, params, binmap=binmap)


def check_binmap_covers_detector(binmap: Any, params: Params) -> None:
    """Refuse a geometry under which no (R, η) bin overlaps a detector pixel.

    Raises
    ------
    ParameterError
        Naming the parameter file, the R and η ranges, the beam centre and the detector size.
    """
    from midasflow.errors import ParameterError

    if np.any(np.asarray(binmap.geometric_area) > 0):
        return
    raise ParameterError(
        f"{params.source}: no (R, η) bin overlaps the detector: R {params.r_min_px:g}..{params.r_max_px:g} px "
        f"and η {params.eta_min_deg:g}..{params.eta_max_deg:g}° around BC {params.bc_y_px:g} {params.bc_z_px:g} "
        f"miss all {params.nr_pixels_y}×{params.nr_pixels_z} pixels; expected RMin/RMax, BC, Lsd and px "
        "of this detector")


def integrate(
    param_fn: str | Path,
    source: ScanSource | str | Path,
    *,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    result_folder: str | Path = ".",
    cache_dir: str | Path | None = None,
    plain_zarr: bool = False,
    client: Any = None,
    progress: bool = False,
    max_bins: int = MAX_BINS,
    max_map_entries: int = MAX_MAP_ENTRIES,
) -> Path:
    """Integrate one scan to ``<result_folder>/<scan>.zarr.zip`` (MIDAS layout) and return its path.

    The computation runs on ``client`` (a ``distributed.Client``) when given, else on the current
    Dask scheduler (an active distributed client, or the threaded scheduler). Either way the
    tasks that cake the frames write the store's members themselves (the output folder must be
    on a filesystem the workers share) and only per-bin NaN flags come back. With ``plain_zarr``
    the same Dataset is also written as ``<scan>.zarr`` through xarray. ``progress`` shows the
    progress on stderr (:mod:`midasflow.progress`). ``max_bins`` and ``max_map_entries`` bound
    the binning (:func:`midasflow.limits.check_binning`; ``--max-bins``, ``--max-map-entries``).

    Only one process writes a given store at a time: a second one is refused
    (:class:`~midasflow.errors.OutputInUseError`, naming the holder's pid) while the first holds
    the lock ``<result_folder>/.<scan>.zarr.zip.lock`` (:mod:`midasflow.io.lock`).
    """
    from midasflow.io.atomic import remove_stale_temporaries
    from midasflow.io.caked_store import write_caked_zarr
    from midasflow.io.lock import check_writable_folder, lock_name, output_lock
    from midasflow.io.midas_zarr import write_midas_zarr

    scan = ScanSource.of(source)
    params = read_params(param_fn, overrides)
    if cache_dir is not None:  # the workers read the bin map from there
        check_writable_folder(cache_dir, "--cache-dir")
    folder = Path(result_folder)
    stem = scan_stem(scan.data_fn)
    from midasflow.progress import dask_progress

    target = folder / f"{stem}.zarr.zip"
    # one writer per store (other scans may share the folder); the folder is created here and
    # removed again if the run fails before writing anything
    with output_lock(folder, lock_name(target), flag="-resultFolder", holder="midasflow integrate"):
        remove_stale_temporaries(folder)  # e.g. a store half-written by a killed run
        ds = integrate_dataset(scan, params, cache_dir=cache_dir, max_bins=max_bins,
                                max_map_entries=max_map_entries)
        # a client reports the progress of its own tasks; the local schedulers through a callback
        with dask_progress("integrate", enabled=progress and client is None):
            out = write_midas_zarr(ds, target, client=client, progress=progress)
        if plain_zarr:
            write_caked_zarr(ds, folder / f"{stem}.zarr", client=client)
    log.info("wrote %s", out)
    return out


def scans_of(source: ScanSource | str | Path, merge_series: bool = False) -> list[ScanSource]:
    """The scans a source names: one per file of a file range, as MIDAS's ``integrator.py``
    makes them (a missing file skipped with a warning), or the whole range as one scan with
    ``merge_series``.

    Raises
    ------
    FrameError
        No file of the range exists, or the range is malformed.
    """
    scan = ScanSource.of(source)
    return [scan] if merge_series or not scan.is_series else scan.per_file()


def integrate_scans(
    param_fn: str | Path,
    source: ScanSource | str | Path,
    *,
    merge_series: bool = False,
    skip_existing: bool = False,
    result_folder: str | Path = ".",
    **integrate_options: Any,
) -> list[Path]:
    """MIDAS's ``integrator.py``: one ``<result_folder>/<file stem>.zarr.zip`` per file of the
    source's file range (:func:`scans_of`), or one store for the whole range with
    ``merge_series``; returns the stores in file order.

    Parameters
    ----------
    skip_existing : bool
        MIDAS's ``-skipExisting``: a file whose store exists is not integrated again (its store
        is still returned).
    **integrate_options
        As :func:`integrate` (``overrides``, ``cache_dir``, ``plain_zarr``, ``client``, ``progress``).
    """
    stores = []
    for scan in scans_of(source, merge_series):
        target = Path(result_folder) / f"{scan_stem(scan.data_fn)}.zarr.zip"
        if skip_existing and target.exists():
            log.info("%s exists: not integrated again (-skipExisting)", target)
            stores.append(target)
            continue
        stores.append(integrate(param_fn, scan, result_folder=result_folder, **integrate_options))
    return stores


def refine(
    data: str | Path | xr.Dataset,
    cifs: Sequence[str | Path],
    *,
    out: str | Path = "refinement",
    instprm: str | Path | None = None,
    bkg_terms: int = 6,
    limits: tuple[float, float] | None = None,
    refine_atoms: bool = True,
    mode: Mode = "rietveld",
    export: bool | Sequence[str] = True,
    backend: BackendName = "native",
    client: Any = None,
    seed_from: SeedFrom | None = "group",
    resume: bool = False,
    ref_cells: Mapping[str, Sequence[float]] | None = None,
    min_points: int = 20,
    max_reflections: int = MAX_REFLECTIONS,
    report: bool = True,
    progress: bool = False,
    estimate: bool = True,
    physical_profile: bool = False,
    max_rwp: float | None = None,
    include_flagged: bool = False,
    texture: str | None = None,
    po_axis: Sequence[int] = (0, 0, 1),
    sh_order: int = 4,
    precision: str = "float64",
    warm_start: bool | None = None,
) -> xr.Dataset:
    """Refine every (ω-group, η) lineout of a caked scan; write and return the results Dataset.

    Parameters
    ----------
    data : path or xarray.Dataset
        A MIDAS ``.zarr.zip``, a plain caked zarr store, or the Dataset :func:`midasflow.cake` made.
    cifs : sequence of path
        One CIF per phase.
    out : path
        Output folder: ``results.zarr``, ``refinement_summary.json``, ``hist_NNNN_data.csv``,
        ``hist_NNNN_<phase>.cif``, ``report.html``, and ``lineouts/`` checkpoints for ``resume``.
    instprm : path, optional
        GSAS-II ``.instprm``; default the store's ``InstrumentParameters`` (docs/reference/midas_zarr_layout.md §5).
    bkg_terms, limits, refine_atoms, mode
        The staged recipe's options (Chebyshev terms; 2θ range in degrees; atoms stage;
        "rietveld" or "lebail"). Atoms are refined unless ``refine_atoms=False``, as by the
        command line and MIDAS's script; the manual recommends ``refine_atoms=False``
        (``--no-atoms``) for lattice and strain work.
    export : bool or collection of {"csv", "cif", "gpx"}
        Write the per-lineout ``hist_NNNN_data.csv`` (GSAS-II's CSV export layout),
        ``hist_NNNN_<phase>.cif`` files and GSAS-II project ``hist_NNNN.gpx`` (True: all;
        False: none; the GSAS-II engine leaves its own projects in ``gsas2/`` instead). With
        ``resume``, finished lineouts get the exports they lack.
    backend : {"native", "gsas2"}
    client : distributed.Client, optional
        Run the lineouts as tasks on this client (one per ω-group, each reading its group from
        the store on its worker; :class:`~midasflow.refinement.executors.DistributedExecutor`);
        in-process serial execution when None.
    seed_from : {"group", "neighbour", None}
        Start each lineout from the refined values of its ω-group's η-averaged pattern (default:
        refined first, with every stage, from the data's estimate), of the group's first
        lineout, or (None) from each lineout's own estimate. The results say which
        (``seeded_from``). Measured on the demo scan (288 lineouts, 4 groups; engine CPU time):
        "group" cut the median per lineout from 101 to 71 ms (80 ms with the four group-mean
        fits shared out) and moved no lineout's a by more than 0.21 esd (median 0.003 esd), Rwp
        within 5e-4 %; a group whose mean pattern fails seeds nothing.
    resume : bool
        Take back lineouts already refined in ``out`` with the same settings from the same data
        (checked inside every checkpoint, :mod:`midasflow.refinement.checkpoints`); refuse when
        ``lineouts/settings.json`` names other settings. Without it earlier checkpoints and
        exports are removed first. Earlier results (``results.zarr``, the summary, the report)
        are removed first either way and written again at the end.
    ref_cells : mapping phase name → (a, b, c, α, β, γ), optional
        Reference cells for strain; default each CIF's cell.
    max_reflections : int
        At most this many unique reflections per phase in the refined 2θ range
        (:func:`midasflow.limits.check_reflections`; ``--max-reflections``), checked before any
        lineout is refined.
    min_points : int
        Lineouts with this many usable bins or fewer are skipped (GSAS-II's importer: 20).
    report : bool
        Write ``report.html``.
    progress : bool
        Progress line on stderr.
    estimate : bool
        Start each lineout's profile, scale and background from its own data (default); the
        store's U, V, W, X, Y are then only the fallback.
    physical_profile : bool
        Keep the peak widths physical over the fitted range (native backend only).
    max_rwp : float, optional
        Flag lineouts whose Rwp (%) is above this (``rwp_above_max``; a flag, not a failure).
    include_flagged : bool
        Let flagged lineouts into the strain fits too; by default a lineout carrying a flag of
        :data:`midasflow.results.STRAIN_EXCLUDING_FLAGS` is left out of them
        (``in_strain_fit`` in the results says which lineouts were used).
    texture, po_axis, sh_order
        Stage 5, preferred orientation per lineout (native engine): None, "md" (March–Dollase
        along ``po_axis`` [h, k, l]) or "sh" (GSAS-II's spherical harmonics to ``sh_order``);
        docs/texture.md.
    precision : {"float32", "float64"}
        Profile arithmetic of the native engine (``--precision``): GSAS-II's float32 (default)
        or double precision (docs/reference/gsas2_profile.md section 6).
    warm_start : bool or None
        A seeded lineout whose seed is good runs only the recipe's final vary list, and its
        whole recipe when that fit is refused (``--warm-start``/``--no-warm-start``;
        :mod:`midasflow.refinement.warm`); None (default): in float64 only
        (:attr:`~midasflow.refinement.options.RefineOptions.warm_start`). ``recipe`` in the
        results says which recipe refined each lineout.

    Notes
    -----
    The options are checked against the data's layout and a ``.zarr.zip``'s members against
    their CRCs (:func:`midasflow.io.midas_zarr.verify_members`) before anything is written.
    ``out`` is then locked (``<out>/.midasflow.lock``) until the results are written: a second
    run into the same folder is refused with :class:`~midasflow.errors.OutputInUseError` naming
    the holder's pid.
    """
    from midasflow.crystal import read_phases
    from midasflow.io.atomic import remove_stale_temporaries
    from midasflow.io.caked_store import open_caked
    from midasflow.io.instprm import instrument_from_midas, read_instprm, with_sample_parameters
    from midasflow.io.lock import check_writable_folder, output_lock
    from midasflow.refinement.backends import make_refiner
    from midasflow.refinement.checkpoints import SUBDIR as CHECKPOINT_SUBDIR
    from midasflow.refinement.checkpoints import record_settings
    from midasflow.refinement.executors import DistributedExecutor, SerialExecutor
    from midasflow.refinement.options import RefineOptions
    from midasflow.refinement.plan import LineoutPlan
    from midasflow.results import assemble_results, write_results

    out = Path(out)
    check_writable_folder(out, "--out")
    in_memory = isinstance(data, xr.Dataset)
    source = data if in_memory else open_caked(data)  # the layout is read now, cakes by the tasks
    if not in_memory and Path(data).is_file():  # a zip: its CRCs say now whether every cake reads
        from midasflow.io.midas_zarr import verify_members

        verify_members(data)
    phases = read_phases(cifs)
    # the store's InstrumentParameters were read with it (open_caked): not read again
    store = None if in_memory else data
    if not instprm:  # the store's terms, its sibling .instprm and .samprm files over them
        instrument = instrument_from_midas(source, store=store)
    else:  # the given file replaces the store's terms; a .samprm beside the store still applies
        instrument = read_instprm(instprm)
        instrument = instrument if store is None else with_sample_parameters(instrument, store)
    options = RefineOptions(phases=tuple(phases), instrument=instrument, bkg_terms=bkg_terms,
                            limits=limits, refine_atoms=refine_atoms, mode=mode, estimate=estimate,
                            physical_profile=physical_profile, max_rwp=max_rwp,
                            texture=texture, po_axis=tuple(po_axis), sh_order=sh_order,
                            precision=precision, warm_start=warm_start)
    refiner = make_refiner(backend, cifs, out, export=export, physical_profile=physical_profile)
    plan = LineoutPlan.of(source if in_memory else data, options, backend=refiner,
                          seed_from=seed_from, min_points=min_points,
                          dataset=None if in_memory else source)
    options.check_against(plan.usable_tth(), min_points,  # from the layout: no cake read
                          max_reflections=max_reflections)
    data_file = plan.store or source.attrs.get("source", "<dataset>")
    with output_lock(out, flag="--out", holder="midasflow refine"):  # one writer per folder
        for folder in (out, out / CHECKPOINT_SUBDIR):  # left by a killed run
            remove_stale_temporaries(folder)
        clear_previous_outputs(out, resume=resume)
        record_settings(out, {**options.settings(), "backend": backend, "min_points": min_points,
                              "seed_from": seed_from, "data_file": data_file}, resume=resume)
        executor = SerialExecutor() if client is None else DistributedExecutor(client)
        # the fitted curves are kept only for the groups the report plots (memory stays flat in scan
        # size; the exports were written by the tasks)
        from midasflow.report import PLOTTED_GROUPS

        plotted = PLOTTED_GROUPS if report else 0
        lineouts = sorted((r if r.group < plotted or r.pattern is None
                           else dataclasses.replace(r, pattern=r.pattern.without_curves())
                           for r in plan.results(executor, checkpoint_dir=out, resume=resume,
                                                 progress=progress)), key=lambda r: r.index)
        cells = dict(ref_cells or {})
        for phase in phases:
            cells.setdefault(phase.name, tuple(phase.cell))
        results = assemble_results(
            lineouts,
            ref_cells=cells,
            phase_names=[p.name for p in phases],
            attrs={"data_file": str(data) if not in_memory else data_file, "backend": backend,
                   "mode": mode, "refine_digest": plan.refine_digest(), "tth_axis": plan.tth_axis},
            include_flagged=include_flagged,
            omega_frames_deg=_omega_frames_deg(source),
            texture=texture, sh_order=sh_order,
        )
        # the ω-groups' process variables (temperature, pressure, I, I0) ride along as coordinates
        measured = [name for name in PROCESS_VARIABLES if name in source and "group" in source[name].dims]
        if results.sizes["group"] == source.sizes.get("group"):
            results = results.assign_coords({name: ("group", source[name].values) for name in measured})
        write_results(results, out)  # the exports were written by the tasks
        if report:
            from midasflow.report import write_report

            write_report(results, out / "report.html", caked=source, lineouts=lineouts)
    return results


def _omega_frames_deg(source: xr.Dataset) -> list[np.ndarray] | None:
    """ω (deg) of the frames summed into each ω-group of a caked Dataset: its frames are evenly
    spaced from ``omega_first_deg`` to ``omega_last_deg`` (None without those variables)."""
    names = ("omega_first_deg", "omega_last_deg", "frames_summed")
    if not all(name in source.variables for name in names):
        return None
    first, last, count = (np.asarray(source[name].values) for name in names)
    return [np.linspace(float(f), float(la), max(int(n), 1)) for f, la, n in zip(first, last, count)]


#: What a refinement run writes into its output folder besides checkpoints and exports.
RESULT_FILES = ("results.zarr", "refinement_summary.json", "report.html")


def clear_previous_outputs(out: Path, *, resume: bool) -> None:
    """Remove what an earlier run left in ``out`` before a new run starts, so an interrupted run
    never leaves results beside settings they were not made with.

    Always the results (:data:`RESULT_FILES`): they are written again, atomically, at the end.
    Without ``resume`` also the checkpoints (``lineouts/``) and the per-lineout exports
    (``hist_NNNN_data.csv``, ``hist_NNNN_<phase>.cif``, GSAS-II projects ``hist_NNNN.gpx`` and
    ``gsas2/hist_NNNN``, and the same for ``lineout_gGGGG_eEEEE`` lineouts that are no
    histograms).
    Only files of these names are touched.
    """
    import shutil

    from midasflow.refinement.checkpoints import clear_checkpoints

    for name in RESULT_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    if resume:
        return
    clear_checkpoints(out)
    for stem in ("hist_*", "lineout_g*_e*"):
        for pattern in (f"{stem}_data.csv", f"{stem}_*.cif", f"{stem}.gpx"):
            for path in out.glob(pattern):
                path.unlink(missing_ok=True)
        for path in (out / "gsas2").glob(stem):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)


def check_run_inputs(
    param_fn: str | Path | None,
    source: ScanSource | str | Path | None,
    cifs: Sequence[str | Path],
    *,
    skip_integration: bool = False,
    zarr_file: str | Path | None = None,
    skip_refinement: bool = False,
    result_folder: str | Path = ".",
    merge_series: bool = False,
    **refine_options: Any,
) -> None:
    """Every check :func:`run` makes before any work (or output) starts: the scan's parameter
    and data files (at least one file of a per-file range) or the store to refine, the CIFs, the
    ``.instprm``, the recipe options (background terms, 2θ limits, mode), the backend, and that
    the output folders (``result_folder``, ``out``) are folders that can be written.

    Raises
    ------
    MidasflowError
        One line naming the input and what was expected.
    """
    from midasflow.crystal import read_phases
    from midasflow.errors import CakeFileError, ParameterError
    from midasflow.io.lock import check_writable_folder
    from midasflow.refinement.backends import get_backend
    from midasflow.refinement.options import PRECISIONS, check_max_rwp, check_recipe, check_texture

    if skip_integration:
        if zarr_file is None:
            raise ParameterError("--skip-integration needs --zarr-file F (the caked .zarr.zip to refine)")
        if not skip_refinement and not Path(zarr_file).exists():
            raise CakeFileError(f"{zarr_file}: no such caked store (--zarr-file)")
    elif param_fn is None or source is None:
        raise ParameterError("-paramFN and -dataFN are required unless --skip-integration --zarr-file F")
    else:
        scans_of(source, merge_series)
        check_writable_folder(result_folder, "-resultFolder")
    if skip_refinement:
        return
    check_writable_folder(refine_options.get("out", "refinement"), "--out")
    if not cifs:
        raise ParameterError("--cif: at least one CIF is needed to refine")
    check_recipe(refine_options.get("bkg_terms", 6), refine_options.get("limits"),
                 refine_options.get("mode", "rietveld"))
    read_phases(cifs)
    if refine_options.get("instprm"):
        from midasflow.io.instprm import read_instprm

        read_instprm(refine_options["instprm"])
    # a known name; GSAS-II importable and asked for nothing it cannot do
    get_backend(refine_options.get("backend", "native"), cifs, ".",
                physical_profile=bool(refine_options.get("physical_profile", False)))
    check_max_rwp(refine_options.get("max_rwp"))
    check_texture(refine_options.get("texture"), refine_options.get("po_axis", (0, 0, 1)),
                  refine_options.get("sh_order", 4))
    if refine_options.get("precision", PRECISIONS[0]) not in PRECISIONS:
        raise ParameterError(f"--precision {refine_options['precision']}: expected one of "
                             f"{', '.join(PRECISIONS)}")


def run(
    param_fn: str | Path | None,
    source: ScanSource | str | Path | None,
    cifs: Sequence[str | Path],
    *,
    out: str | Path = "refinement",
    result_folder: str | Path | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    cache_dir: str | Path | None = None,
    skip_integration: bool = False,
    zarr_file: str | Path | None = None,
    skip_refinement: bool = False,
    merge_series: bool = False,
    skip_existing: bool = False,
    max_bins: int = MAX_BINS,
    max_map_entries: int = MAX_MAP_ENTRIES,
    **refine_options: Any,
) -> xr.Dataset | Path | list[xr.Dataset | Path]:
    """Integration, then refinement of the written store: MIDAS's ``integrate_and_refine.py``.

    Two steps on the same scheduler: the caked store is written first
    (``<result_folder>/<scan>.zarr.zip``, the file GSAS-II and MIDAS tools read; one Dask graph;
    ``result_folder`` None: the folder holding ``out``, so the store lies beside the refinement
    folder),
    then its lineouts are refined (one task per lineout). Every input is checked first
    (:func:`check_run_inputs`).

    A source whose file range names several files is integrated one store per file
    (:func:`integrate_scans`) and each store refined into its own folder ``<out>/<file stem>``;
    with ``merge_series`` the range is one scan, as for a single file.

    Returns
    -------
    The results Dataset, or the store's path with ``skip_refinement``; for a per-file range, a
    list of them in file order.
    """
    if result_folder is None:
        result_folder = Path(out).parent
    check_run_inputs(param_fn, source, cifs, skip_integration=skip_integration, zarr_file=zarr_file,
                     skip_refinement=skip_refinement, result_folder=result_folder,
                     merge_series=merge_series, out=out, **refine_options)
    if skip_integration:
        stores = [Path(zarr_file)]
    else:
        stores = integrate_scans(
            param_fn, source, merge_series=merge_series, skip_existing=skip_existing,
            overrides=overrides, result_folder=result_folder, cache_dir=cache_dir,
            client=refine_options.get("client"),
            progress=bool(refine_options.get("progress", False)),
            max_bins=max_bins, max_map_entries=max_map_entries,
        )
    per_file = not skip_integration and not merge_series and ScanSource.of(source).is_series
    if skip_refinement:
        return stores if per_file else stores[0]
    results = [refine(store, cifs, out=Path(out) / scan_stem(store) if per_file else out, **refine_options)
               for store in stores]
    return results if per_file else results[0]
