"""``raise_if_dask_computes``: a test fails if building a lazy result makes Dask compute.

The pattern of xarray's and flox's test suites: every Dask computation in the block goes through
a scheduler that counts it and raises once more than ``max_computes`` happen. Reading metadata
(HDF5 attributes, zarr arrays read directly) is not a Dask computation and is allowed.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import dask


class CountingScheduler:
    """A Dask scheduler (the synchronous one underneath) that counts calls and raises after
    ``max_computes`` of them."""

    def __init__(self, max_computes: int = 0) -> None:
        self.max_computes = max_computes
        self.total_computes = 0

    def __call__(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        self.total_computes += 1
        if self.total_computes > self.max_computes:
            raise RuntimeError(f"Dask computed {self.total_computes} time(s); at most "
                               f"{self.max_computes} allowed here")
        return dask.get(dsk, keys, **kwargs)


@contextlib.contextmanager
def raise_if_dask_computes(max_computes: int = 0) -> Iterator[CountingScheduler]:
    """Run the block with a scheduler that raises RuntimeError on the (max_computes + 1)-th
    Dask computation; yields the scheduler (``total_computes``)."""
    scheduler = CountingScheduler(max_computes)
    with dask.config.set(scheduler=scheduler):
        yield scheduler
