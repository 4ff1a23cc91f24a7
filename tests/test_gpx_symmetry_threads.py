"""The .gpx writer's space-group and site-symmetry caches under threaded Dask workers: many
threads asking for more groups than the cache holds (so entries are evicted while others read)
get exactly the records and site names a single thread gets."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import gemmi
import numpy as np

from midasflow.crystal import _laue_symbol
from midasflow.io import gpx_symmetry
from midasflow.io.gpx_symmetry import UnsupportedSetting, site_symmetry, space_group_record

POSITIONS = [(0, 0, 0), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), (0.13, 0.13, 0.13), (0.13, 0.25, 0.31)]


def _groups(count: int) -> list[gemmi.SpaceGroup]:
    groups = []
    for entry in gemmi.spacegroup_table_itb():
        sg = gemmi.find_spacegroup_by_name(entry.xhm())
        try:
            space_group_record(sg, _laue_symbol(sg))
        except UnsupportedSetting:
            continue
        groups.append(sg)
        if len(groups) == count:
            return groups
    raise AssertionError("too few settings the writer accepts")


def _describe(sg: gemmi.SpaceGroup) -> tuple:
    record = space_group_record(sg, _laue_symbol(sg))
    sites = tuple(site_symmetry(np.array(xyz, dtype=float), record) for xyz in POSITIONS)
    return record.sg_data["SpGrp"], record.sg_data["SGLaue"], record.rotations.tobytes(), sites


def test_threads_get_the_records_one_thread_gets(monkeypatch):
    groups = _groups(2 * gpx_symmetry._RECORDS_SIZE)
    monkeypatch.setattr(gpx_symmetry, "_RECORDS", type(gpx_symmetry._RECORDS)())
    serial = [_describe(sg) for sg in groups]
    assert len(gpx_symmetry._RECORDS) == gpx_symmetry._RECORDS_SIZE  # evicted down to its size
    monkeypatch.setattr(gpx_symmetry, "_RECORDS", type(gpx_symmetry._RECORDS)())
    monkeypatch.setattr(gpx_symmetry, "_SITES_SIZE", 2)  # site names evicted all the time
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(2):
            threaded = list(pool.map(_describe, groups * 2))
            assert threaded == serial * 2
    assert len(gpx_symmetry._RECORDS) <= gpx_symmetry._RECORDS_SIZE
