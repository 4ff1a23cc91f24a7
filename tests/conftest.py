"""Fixtures shared by several test files."""
from __future__ import annotations

import pytest

from cake_helpers import dead_rows_and_column, small_params


@pytest.fixture(scope="session")
def gsasii():
    """GSASIIscriptable where GSAS-II imports here; otherwise the test is skipped with the reason."""
    from midasflow.errors import BackendError
    from midasflow.refinement.gsas2 import check_gsas2_available, import_gsasii

    try:
        check_gsas2_available()
    except BackendError as exc:
        pytest.skip(f"GSAS-II is not importable here: {exc}")
    return import_gsasii()


@pytest.fixture(scope="session")
def caking_params():
    """cake_helpers.small_params(): the 48 x 40 detector of the caking and store tests."""
    return small_params()


@pytest.fixture(scope="session")
def masked_map(caking_params):
    """Bin map of ``caking_params`` with a dead row pair and a dead column masked."""
    from midasflow.binmap import build_binmap

    return build_binmap(caking_params, dead_rows_and_column(caking_params))


@pytest.fixture(scope="session")
def plain_map():
    """No corrections (weights == areas, so a flat frame cakes to its value exactly); RMax 32 px
    puts the outer bins of some η sectors off the detector (empty bins)."""
    from midasflow.binmap import build_binmap

    return build_binmap(small_params(solid_angle_correction=False, polarization_correction=False,
                                     r_max_px=32.0))


@pytest.fixture(scope="module")
def client():
    """A LocalCluster of two one-thread worker processes (127.0.0.1) and its client, per module."""
    from midasflow.cluster import close_client, get_client

    c, _ = get_client(n_workers=2, dashboard=False)
    yield c
    close_client(c)
