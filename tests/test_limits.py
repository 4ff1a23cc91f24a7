"""midasflow.limits: bins, bin-map entries, reflections and declared array sizes are refused
before memory is spent, with one line naming the input and the override."""
from __future__ import annotations

import time

import numpy as np
import pytest

from midasflow.crystal import cubic_phase, phase_from_cell
from midasflow.errors import ParameterError
from midasflow.limits import (
    MAX_BINS,
    check_array_size,
    check_binning,
    check_reflections,
    estimate_map_entries,
    estimate_reflections,
)
from midasflow.params import Params


def _params(**kw) -> Params:
    base = dict(source="ps.txt", nr_pixels_y=256, nr_pixels_z=256, px_um=200.0, lsd_um=125000.0,
                bc_y_px=128.4, bc_z_px=127.7, r_min_px=10.0, r_max_px=124.0, r_bin_px=0.25, eta_bin_deg=45.0)
    return Params(**{**base, **kw})


@pytest.mark.parametrize("r_bin", [1e-7, 1e-8, 1e-300])
def test_absurd_radial_bins_are_refused_at_once(r_bin):
    t0 = time.perf_counter()
    with pytest.raises(ParameterError, match=rf"ps.txt: keys RBinSize {r_bin:g}, EtaBinSize 45: .* bins, "
                                             rf"expected at most {MAX_BINS} \(--max-bins raises the limit\)"):
        check_binning(_params(r_bin_px=r_bin))
    assert time.perf_counter() - t0 < 5  # a check, not a build (was 60 s and 9 GB for 1e-7)


def test_fine_binning_that_splits_pixels_too_far_is_refused_and_the_limits_can_be_raised():
    fine = _params(r_bin_px=1e-4, eta_bin_deg=360.0)  # 1.1 M bins, but each pixel in ~15 000 pieces
    with pytest.raises(ParameterError, match=r"pixels split into ~.* bin pieces, expected at most 268435456 "
                                             r"\(--max-map-entries raises the limit\)"):
        check_binning(fine)
    check_binning(fine, max_map_entries=10**10)
    with pytest.raises(ParameterError, match="--max-bins"):
        check_binning(_params(), max_bins=1000)  # 456 × 8 bins
    check_binning(_params(), max_bins=456 * 8)


def test_map_entry_estimate_is_within_a_factor_two_of_the_built_map(tmp_path):
    from midasflow.binmap import build_binmap

    for params in (_params(), _params(r_bin_px=1.0, eta_bin_deg=5.0, tx_deg=0.0)):
        actual = build_binmap(params).weights.nnz
        assert 0.5 < estimate_map_entries(params) / actual < 2.0


def test_reflection_estimate_and_limit():
    lam = 0.172979
    p1 = phase_from_cell("P1", (20.0, 21.0, 22.0, 90.0, 95.0, 90.0), "P 1")
    from midasflow.crystal import reflections

    n = len(reflections(p1, lam, 11.5, 0.5).hkl)
    assert abs(estimate_reflections(p1, lam, 0.5, 11.5) / n - 1) < 0.05  # no absences in P1
    big = phase_from_cell("big", (100.0, 100.0, 100.0, 90.0, 90.0, 90.0), "P 1")
    t0 = time.perf_counter()
    with pytest.raises(ParameterError, match=r"phase big \(cell 100 100 100 90 90 90, Laue -1\): ~.* unique "
                                             r"reflections .* expected at most 20000 \(--max-reflections"):
        check_reflections([cubic_phase("CeO2", 5.41), big], lam, 1.0, 11.3)
    assert time.perf_counter() - t0 < 2  # was 4.5 GB and no lineout finished
    check_reflections([big], lam, 1.0, 3.0, max_reflections=10**6)


@pytest.mark.parametrize("shape, itemsize, ok", [((5, 456, 8), 8, True), ((5, 10**6, 10**4), 8, False),
                                                 ((10**12, 10**12), 8, False), ((3, -1), 8, False)])
def test_declared_array_sizes(shape, itemsize, ok):
    if ok:
        assert check_array_size(shape, itemsize, "REtaMap") == int(np.prod(shape)) * itemsize
    else:
        with pytest.raises(ValueError, match="REtaMap declares"):
            check_array_size(shape, itemsize, "REtaMap")


def test_an_absurd_detector_is_refused_before_any_pixel_array():  # found by the fuzz test
    with pytest.raises(ParameterError, match=r"keys NrPixelsY/NrPixelsZ: .* pixels, expected at most 4294967296"):
        check_binning(_params(nr_pixels_y=10**300, nr_pixels_z=256))
