"""Histogram numbers as MIDAS and GSAS-II give them: ``hist_NNNN``.

MIDAS's ``gsas_ii_refine.py`` and GSAS-II's MIDAS importer number the same histograms the same
way (docs/reference/midas_zarr_layout.md): an η column is a histogram column when more than 20
of its bins have a non-zero area in the store's ``REtaMap`` BinArea plane; the ω-groups are taken
in the order of their ``OmegaSumFrame`` member names, ``LastFrameNumber_<n>``, sorted as text (so
``LastFrameNumber_10`` comes before ``LastFrameNumber_2``); and the histograms are numbered 0, 1,
2, … over the groups in that order and, within a group, over its histogram columns in η order.
The numbers therefore skip nothing: a masked η column or a tenth ω-group changes every later
number, unlike midasflow's position index ``group · n_eta + eta``, which the results keep as the
(group, η) grid.

midasflow writes the BinArea plane as 0 wherever any ω-group's intensity is NaN, so that the
importer never reads a NaN point; :func:`importer_area` gives that plane for any caked scan.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

#: Prefix of the ω-group members of a MIDAS ``.zarr.zip`` (``OmegaSumFrame/LastFrameNumber_<n>``).
GROUP_PREFIX = "LastFrameNumber_"
#: No histogram: the lineout's η column has too few usable bins.
NOT_A_HISTOGRAM = -1


def group_order(last_frame: Any) -> list[int]:
    """The ω-groups in MIDAS's order: sorted by their member name ``LastFrameNumber_<n>`` as text.

    Parameters
    ----------
    last_frame : sequence of int
        Each group's last frame number (the ``<n>`` of its member name).

    Returns
    -------
    list of int
        Group indices (positions in ``last_frame``) in MIDAS's order.
    """
    names = [f"{GROUP_PREFIX}{int(n)}" for n in np.asarray(last_frame).reshape(-1)]
    return sorted(range(len(names)), key=lambda g: names[g])


def histogram_numbers(area: np.ndarray, last_frame: Any, *, min_points: int = 20) -> np.ndarray:
    """MIDAS's histogram number of every (ω-group, η) lineout.

    Parameters
    ----------
    area : ndarray (n_r, n_eta)
        The importer's bin areas (the ``REtaMap`` BinArea plane; :func:`importer_area`).
    last_frame : sequence of int, (n_groups,)
        Each group's last frame number.
    min_points : int
        An η column is a histogram column with more than this many bins of non-zero area.

    Returns
    -------
    ndarray int64 (n_groups, n_eta)
        0, 1, 2, … over the groups in :func:`group_order` and their histogram columns in η
        order; :data:`NOT_A_HISTOGRAM` (−1) in the other columns.
    """
    area = np.asarray(area)
    columns = np.flatnonzero((area != 0).sum(axis=0) > int(min_points))
    order = group_order(last_frame)
    numbers = np.full((len(order), area.shape[1]), NOT_A_HISTOGRAM, dtype=np.int64)
    for rank, g in enumerate(order):
        numbers[g, columns] = rank * columns.size + np.arange(columns.size)
    return numbers


def arrival_numbers(area: np.ndarray, n_groups: int, *, min_points: int = 20) -> np.ndarray:
    """Histogram numbers of a scan whose ω-groups are numbered as they arrive (the stream backend).

    A stream cannot know MIDAS's text order of ``LastFrameNumber_<n>`` names before its last group
    (``_10`` sorts before ``_2``), so it numbers its groups 0, 1, 2, … in arrival order; the
    histogram columns are chosen as in :func:`histogram_numbers`.

    Parameters
    ----------
    area : ndarray (n_r, n_eta)
        The importer's bin areas.
    n_groups : int
        Groups closed so far.
    min_points : int
        An η column is a histogram column with more than this many bins of non-zero area.

    Returns
    -------
    ndarray int64 (n_groups, n_eta)
    """
    area = np.asarray(area)
    columns = np.flatnonzero((area != 0).sum(axis=0) > int(min_points))
    numbers = np.full((int(n_groups), area.shape[1]), NOT_A_HISTOGRAM, dtype=np.int64)
    numbers[:, columns] = np.arange(int(n_groups))[:, None] * columns.size + np.arange(columns.size)
    return numbers


def importer_area(ds: Any, store: str | os.PathLike | None = None) -> np.ndarray:
    """The bin areas GSAS-II's importer and MIDAS's script see for a caked scan, (n_r, n_eta).

    For a ``.zarr.zip`` ``store`` (the file ``ds`` was opened from): its ``REtaMap`` BinArea plane
    as stored, whoever wrote the file (:func:`midasflow.io.midas_zarr.read_importer_area`).
    Otherwise what :func:`midasflow.io.midas_zarr.write_midas_zarr` would store for ``ds``:
    ``bin_area``, 0 wherever any ω-group's intensity is NaN — for a lazy Dataset this reads every
    cake once.
    """
    import zipfile

    if store is not None and os.path.isfile(store) and zipfile.is_zipfile(store):
        from midasflow.io.midas_zarr import read_importer_area

        return read_importer_area(store)
    area = np.asarray(ds["bin_area"].transpose("r", "eta").values, dtype=np.float64)
    finite = np.asarray(np.isfinite(ds["intensity"].transpose("group", "r", "eta")).all("group").values)
    return np.where(finite, area, 0.0)


def histogram_name(number: int) -> str:
    """``hist_NNNN``: the file stem MIDAS gives histogram ``number``."""
    return f"hist_{int(number):04d}"
