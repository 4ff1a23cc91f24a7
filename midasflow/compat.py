"""MIDAS's Python API, for scripts written against ``gsas_ii_refine.py``.

``from midasflow import run_refinement`` replaces ``from gsas_ii_refine import run_refinement``
(the MIDAS manual's "Python API"): same arguments, same returned dictionary, the same
``refinement_summary.json`` and per-histogram files in ``output_dir`` — refined by midasflow's
engine, one Dask task per lineout.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

def run_refinement(
    data_file: str | os.PathLike,
    cif_files: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    instprm_file: str | os.PathLike | None = None,
    bkg_terms: int = 6,
    refine_atoms: bool = True,
    two_theta_limits: Sequence[float] | None = None,
    export_cif: bool = True,
    export_csv: bool = True,
    n_cpus: int = 1,
) -> dict[str, Any]:
    """Refine every histogram (lineout) of a MIDAS ``.zarr.zip``: MIDAS's ``run_refinement``.

    Parameters
    ----------
    data_file : path
        The caked ``.zarr.zip``.
    cif_files : sequence of path
        One CIF per phase.
    output_dir : path
        Folder of ``refinement_summary.json``, ``hist_NNNN.gpx`` (a GSAS-II project per
        refined histogram, as MIDAS's script leaves), ``hist_NNNN_data.csv``,
        ``hist_NNNN_<phase>.cif``, ``results.zarr`` and ``report.html``.
    instprm_file : path, optional
        GSAS-II ``.instprm`` replacing the store's instrument parameters.
    bkg_terms : int
        Chebyshev background terms.
    refine_atoms : bool
        Refine atom positions and U_iso in the last stage.
    two_theta_limits : [low, high], optional
        2θ range, degrees.
    export_cif, export_csv : bool
        Write ``hist_NNNN_<phase>.cif`` / ``hist_NNNN_data.csv`` per refined histogram.
    n_cpus : int
        More than 1: the lineouts are refined on a local Dask cluster of that many workers
        (processes, 127.0.0.1); 1: in this process.

    Returns
    -------
    dict
        The content of ``refinement_summary.json`` (:func:`midasflow.results.summary_dict`):
        MIDAS's ``data_file``, ``total_histograms``, ``succeeded``, ``failed``, ``skipped``,
        ``histograms`` (one dict per histogram) and ``mean_Rwp`` (absent when no histogram
        succeeded), plus midasflow's fields.

    Raises
    ------
    MidasflowError
        A missing or unreadable data file, CIF or ``.instprm``, bad options (MIDAS's script
        exits instead).
    """
    from midasflow.errors import ParameterError
    from midasflow.pipeline import refine
    from midasflow.results import summary_dict

    if int(n_cpus) < 1:
        raise ParameterError(f"n_cpus {n_cpus}: expected a positive number of workers")
    # MIDAS's script leaves a GSAS-II project per histogram whatever the export flags
    exports = {"gpx"} | {kind for kind, on in (("cif", export_cif), ("csv", export_csv)) if on}
    options = dict(out=output_dir, instprm=instprm_file, bkg_terms=int(bkg_terms),
                   limits=tuple(two_theta_limits) if two_theta_limits is not None else None,
                   refine_atoms=bool(refine_atoms), export=exports)
    if int(n_cpus) > 1:
        from midasflow.cluster import close_client, get_client

        client, _ = get_client(n_workers=int(n_cpus), dashboard=False)
        try:
            results = refine(data_file, list(cif_files), client=client, **options)
        finally:
            close_client(client)
    else:
        results = refine(data_file, list(cif_files), **options)
    return summary_dict(results, output_dir)
