"""The test helper ``raise_if_dask_computes`` itself: it must catch a computation, or it proves nothing."""
import dask.array as da
import pytest

from dask_helpers import raise_if_dask_computes


def test_a_computation_raises_and_the_allowed_number_passes():
    lazy = da.ones(4, chunks=2).sum()
    with pytest.raises(RuntimeError, match="Dask computed 1 time"):
        with raise_if_dask_computes():
            lazy.compute()
    with raise_if_dask_computes(max_computes=1) as scheduler:
        assert lazy.compute() == 4.0
    assert scheduler.total_computes == 1
    with raise_if_dask_computes():
        (lazy + 1).sum()  # building a graph is not computing
