"""Fixtures shared by several test files."""
from __future__ import annotations

import pytest


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
