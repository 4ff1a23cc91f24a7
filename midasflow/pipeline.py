"""The dataflows behind the commands: ``integrate`` (frames → caked store), ``refine`` and ``run``.

Everything here is orchestration: each step is a function of another module, wired into one lazy
Dask graph that the caller's scheduler (threaded by default, or a ``distributed.Client``)
executes when a store is written.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import xarray as xr

from midasflow.params import PROCESS_VARIABLES, Params, read_params

log = logging.getLogger(__name__)

_COMPRESSION_SUFFIXES = (".bz2", ".gz")


def scan_stem(data_fn: str | Path) -> str:
    """Output stem of a scan: the first data file's name without its format extension.

    ``scan_000001.h5`` → ``scan_000001``; ``ff_000123.ge3`` → ``ff_000123``.
    """
    name = Path(data_fn).name
    for suffix in _COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return re.sub(r"\.[^.]+$", "", name) or name


def integrate_dataset(
    data_fn: str | Path,
    params: Params,
    *,
    dark_fn: str | Path | None = None,
    data_loc: str = "exchange/data",
    dark_loc: str = "exchange/dark",
    start_file_nr: int | None = None,
    end_file_nr: int | None = None,
    cache_dir: str | Path | None = None,
) -> xr.Dataset:
    """Open the frames and cake them: the lazy caked Dataset (nothing is computed).

    Parameters
    ----------
    data_fn : path
        First data file of the scan (HDF5/NeXus, GE, TIFF, CBF/EDF or zarr).
    params : Params
        Geometry, binning and frame parameters.
    dark_fn, data_loc, dark_loc, start_file_nr, end_file_nr
        As the MIDAS ``integrator.py`` flags of the same names.
    cache_dir : path, optional
        Where bin maps are cached (default ``~/.cache/midasflow/binmaps``).
    """
    from midasflow.binmap import load_or_build_binmap
    from midasflow.caking import cake
    from midasflow.caking_kernel import frames_per_pass
    from midasflow.io.frames import open_frames
    from midasflow.io.mask import mask_from_params

    source = dict(dark_fn=dark_fn, data_loc=data_loc, dark_loc=dark_loc,
                  start_file_nr=start_file_nr, end_file_nr=end_file_nr)
    frames = open_frames(data_fn, params, **source)  # checks every input before any work
    binmap = load_or_build_binmap(params, mask_from_params(params), cache_dir)
    # the kernel's fastest chunk: as many frames as one pass over the map takes (bounded memory);
    # reading chunks of that size directly avoids concatenating smaller ones
    per_pass = frames_per_pass(binmap, frames.dtype)
    if frames.chunks[0][0] != min(per_pass, frames.sizes["frame"]):
        frames = open_frames(data_fn, params, frames_per_chunk=per_pass, **source)
    return cake(frames, params, binmap=binmap)


def integrate(
    param_fn: str | Path,
    data_fn: str | Path,
    *,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    result_folder: str | Path = ".",
    dark_fn: str | Path | None = None,
    data_loc: str = "exchange/data",
    dark_loc: str = "exchange/dark",
    start_file_nr: int | None = None,
    end_file_nr: int | None = None,
    cache_dir: str | Path | None = None,
    plain_zarr: bool = False,
    progress: bool = False,
) -> Path:
    """Integrate one scan to ``<result_folder>/<scan>.zarr.zip`` (MIDAS layout) and return its path.

    The computation runs on the current Dask scheduler: a ``distributed.Client`` if one is
    active, the threaded scheduler otherwise. With ``plain_zarr`` the same Dataset is also
    written as ``<scan>.zarr`` through xarray. ``progress`` shows a progress line on stderr when
    a distributed client computes it.
    """
    from midasflow.io.caked_store import write_caked_zarr
    from midasflow.io.midas_zarr import write_midas_zarr

    params = read_params(param_fn, overrides)
    ds = integrate_dataset(
        data_fn,
        params,
        dark_fn=dark_fn,
        data_loc=data_loc,
        dark_loc=dark_loc,
        start_file_nr=start_file_nr,
        end_file_nr=end_file_nr,
        cache_dir=cache_dir,
    )
    folder = Path(result_folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = scan_stem(data_fn)
    out = write_midas_zarr(ds, folder / f"{stem}.zarr.zip", progress=progress)
    if plain_zarr:
        write_caked_zarr(ds, folder / f"{stem}.zarr")
    log.info("wrote %s", out)
    return out


BACKENDS = ("native", "gsas2")


def _refine_fn(backend: str, cif_paths: Sequence[str | Path], out: Path) -> Any:
    """The per-lineout refinement callable of a backend (checked before any task is submitted)."""
    if backend == "native":
        from midasflow.refinement.lineouts import default_refine_fn

        return default_refine_fn()
    if backend == "gsas2":
        from midasflow.refinement.gsas2 import Gsas2Refiner, check_gsas2_available

        check_gsas2_available()
        return Gsas2Refiner(cif_paths=tuple(str(p) for p in cif_paths), workdir=str(out / "gsas2"))
    from midasflow.errors import ParameterError

    raise ParameterError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")


class ExportingRefiner:
    """A backend's per-lineout callable that also writes the lineout's CSV/CIF exports.

    The exports are part of each lineout's task, so they are written on the workers in
    parallel, not one after another in the client at the end.
    """

    takes_lineout_index = True

    def __init__(self, refine_fn: Any, folder: str | Path) -> None:
        self.refine_fn, self.folder = refine_fn, Path(folder)

    def __call__(self, tth_deg: Any, intensity: Any, sigma: Any, *, index: int, **options: Any) -> Any:
        from midasflow.results import export_lineout

        if getattr(self.refine_fn, "takes_lineout_index", False):
            options["index"] = index
        pattern = self.refine_fn(tth_deg, intensity, sigma, **options)
        if getattr(pattern, "status", "ok") == "ok":
            export_lineout(pattern, self.folder, index)
        return pattern


def refine(
    data: str | Path | xr.Dataset,
    cifs: Sequence[str | Path],
    *,
    out: str | Path = "refinement",
    instprm: str | Path | None = None,
    bkg_terms: int = 6,
    limits: tuple[float, float] | None = None,
    refine_atoms: bool = False,
    mode: str = "rietveld",
    export: bool = True,
    backend: str = "native",
    client: Any = None,
    seed_from: str | None = None,
    resume: bool = False,
    ref_cells: Mapping[str, Sequence[float]] | None = None,
    min_points: int = 20,
    report: bool = True,
    progress: bool = False,
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
        GSAS-II ``.instprm``; default the store's ``InstrumentParameters`` (§7.4).
    bkg_terms, limits, refine_atoms, mode
        The staged recipe's options (Chebyshev terms; 2θ range in degrees; atoms stage;
        "rietveld" or "lebail").
    export : bool
        Write the per-lineout CSV and CIF files.
    backend : {"native", "gsas2"}
    client : distributed.Client, optional
        Run one task per lineout on this client; in-process serial execution when None.
    seed_from : {None, "neighbour"}
        Start each lineout from the refined values of the first lineout of its ω-group.
    resume : bool
        Skip lineouts whose results already exist in ``out``.
    ref_cells : mapping phase name → (a, b, c, α, β, γ), optional
        Reference cells for strain; default each CIF's cell.
    min_points : int
        Lineouts with this many usable bins or fewer are skipped (GSAS-II's importer: 20).
    report : bool
        Write ``report.html``.
    progress : bool
        Progress line on stderr.
    """
    from midasflow.crystal import read_phases
    from midasflow.io.caked_store import open_caked
    from midasflow.io.instprm import instrument_from_midas, read_instprm
    from midasflow.refinement.lineouts import (
        plan_lineouts,
        record_settings,
        run_distributed,
        run_serial,
    )
    from midasflow.results import assemble_results, write_results

    out = Path(out)
    source = data if isinstance(data, xr.Dataset) else open_caked(data)
    phases = read_phases(cifs)
    # the store's InstrumentParameters were read with it (open_caked): not read again
    instrument = (read_instprm(instprm) if instprm else instrument_from_midas(
        source, store=None if isinstance(data, xr.Dataset) else data))
    refine_fn = _refine_fn(backend, cifs, out)
    if export:
        refine_fn = ExportingRefiner(refine_fn, out)
    plan = plan_lineouts(source, min_points=min_points)
    common = dict(phases=phases, instprm=instrument, bkg_terms=bkg_terms, limits=limits,
                  refine_atoms=refine_atoms, mode=mode)
    out.mkdir(parents=True, exist_ok=True)
    record_settings(out, {
        "data": str(data) if not isinstance(data, xr.Dataset) else "<dataset>",
        "phases": {p.name: list(p.cell) for p in phases}, "instrument": instrument.to_dict(),
        "bkg_terms": bkg_terms, "limits": list(limits) if limits else None,
        "refine_atoms": refine_atoms, "mode": mode, "backend": backend, "min_points": min_points,
        "seed_from": seed_from,
    }, resume=resume)
    options = dict(seed_from=seed_from, checkpoint_dir=out, resume=resume, progress=progress)
    if client is None:
        lineouts = run_serial(plan, refine_fn, common, **options)
    else:
        lineouts = run_distributed(plan, refine_fn, common, client, **options)
    cells = dict(ref_cells or {})
    for phase in phases:
        cells.setdefault(phase.name, tuple(phase.cell))
    data_file = str(data) if not isinstance(data, xr.Dataset) else data.attrs.get("source", "<dataset>")
    results = assemble_results(
        lineouts,
        ref_cells=cells,
        phase_names=[p.name for p in phases],
        attrs={"data_file": data_file, "backend": backend, "mode": mode},
    )
    # the ω-groups' process variables (temperature, pressure, I, I0) ride along as coordinates
    measured = [name for name in PROCESS_VARIABLES if name in source and "group" in source[name].dims]
    if results.sizes["group"] == source.sizes.get("group"):
        results = results.assign_coords({name: ("group", source[name].values) for name in measured})
    write_results(results, out, lineouts=lineouts, no_export=True)  # exported by the tasks
    if report:
        from midasflow.report import write_report

        write_report(results, out / "report.html", caked=source, lineouts=lineouts)
    return results


def _check_refinement_inputs(cifs: Sequence[str | Path], options: Mapping[str, Any]) -> None:
    """Read the CIFs and the .instprm and check the backend before any work (or output) starts."""
    from midasflow.crystal import read_phases
    from midasflow.errors import ParameterError

    if not cifs:
        raise ParameterError("--cif: at least one CIF is needed to refine")
    read_phases(cifs)
    if options.get("instprm"):
        from midasflow.io.instprm import read_instprm

        read_instprm(options["instprm"])
    backend = options.get("backend", "native")
    if backend not in BACKENDS:
        raise ParameterError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "gsas2":
        from midasflow.refinement.gsas2 import check_gsas2_available

        check_gsas2_available()


def run(
    param_fn: str | Path,
    data_fn: str | Path,
    cifs: Sequence[str | Path],
    *,
    out: str | Path = "refinement",
    result_folder: str | Path = ".",
    overrides: Sequence[str] | Mapping[str, Any] = (),
    dark_fn: str | Path | None = None,
    data_loc: str = "exchange/data",
    dark_loc: str = "exchange/dark",
    start_file_nr: int | None = None,
    end_file_nr: int | None = None,
    cache_dir: str | Path | None = None,
    skip_integration: bool = False,
    zarr_file: str | Path | None = None,
    skip_refinement: bool = False,
    **refine_options: Any,
) -> xr.Dataset | Path:
    """Integration then refinement, MIDAS's ``integrate_and_refine.py`` as one dataflow.

    The caked store is written first (``<result_folder>/<scan>.zarr.zip``, the file GSAS-II and
    MIDAS tools read) and the lineouts are refined from it on the same scheduler. Returns the
    results Dataset, or the store's path with ``skip_refinement``.
    """
    from midasflow.errors import CakeFileError, ParameterError

    if not skip_refinement:
        _check_refinement_inputs(cifs, refine_options)
    if skip_integration:
        if zarr_file is None:
            raise ParameterError("--skip-integration needs --zarr-file F (the caked .zarr.zip to refine)")
        store = Path(zarr_file)
        if not skip_refinement and not store.exists():
            raise CakeFileError(f"{store}: no such caked store (--zarr-file)")
    else:
        store = integrate(
            param_fn, data_fn, overrides=overrides, result_folder=result_folder, dark_fn=dark_fn,
            data_loc=data_loc, dark_loc=dark_loc, start_file_nr=start_file_nr,
            end_file_nr=end_file_nr, cache_dir=cache_dir,
            progress=bool(refine_options.get("progress", False)),
        )
    if skip_refinement:
        return store
    return refine(store, cifs, out=out, **refine_options)
