"""The caked Dataset's schema: its one constructor and the variables every caked store holds.

:func:`midasflow.caking.cake` builds the Dataset with :func:`caked_dataset`, and the store readers
(:mod:`midasflow.io.midas_zarr`, :mod:`midasflow.io.caked_store`) rebuild it with the same
function, so every path yields the same variables, dims, dtypes and coordinates. The layout is
listed in docs/architecture.md ("Caking") and its ``.zarr.zip`` form in
docs/reference/midas_zarr_layout.md.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

#: Variables every caked store holds.
CAKED_VARS = ("intensity", "frames_summed", "omega_first_deg", "omega_last_deg", "last_frame")


def caked_dataset(
    *,
    intensity: Any,
    frames_summed: np.ndarray,
    omega_first_deg: np.ndarray,
    omega_last_deg: np.ndarray,
    last_frame: np.ndarray,
    frame: np.ndarray,
    omega_frame_deg: np.ndarray,
    r_px: np.ndarray,
    tth_deg: np.ndarray,
    q_inv_a: np.ndarray,
    eta_deg: np.ndarray,
    bin_area: np.ndarray,
    effective_tth_deg: np.ndarray | None = None,
    frame_intensity: Any = None,
    sum_frames: Any = None,
    process_variables: dict[str, Any] | None = None,
    attrs: dict[str, str] | None = None,
) -> xr.Dataset:
    """Assemble the caked Dataset (layout of :func:`midasflow.caking.cake`) from its parts.

    ``intensity`` (group, r, eta), ``frame_intensity`` (frame, r, eta) and ``sum_frames``
    (r, eta) may be numpy or dask arrays; the rest are numpy. ``omega_deg`` (group)
    is derived as the mid-group ω, (first + last) / 2. ``process_variables`` maps names of
    :data:`midasflow.params.PROCESS_VARIABLES` to per-group values (group,), stored as float64
    variables of those names. ``effective_tth_deg`` (r, eta), the 2θ each bin's value samples
    (:attr:`midasflow.binmap.BinMap.effective_tth_deg`), becomes a coordinate of that name when
    given (stores MIDAS wrote, and older midasflow stores, have none).
    """
    import xarray as xr

    first = np.asarray(omega_first_deg, dtype=np.float64)
    last = np.asarray(omega_last_deg, dtype=np.float64)
    data_vars: dict[str, Any] = {
        "intensity": (("group", "r", "eta"), intensity),
        "frames_summed": ("group", np.asarray(frames_summed, dtype=np.int64)),
        "omega_first_deg": ("group", first),
        "omega_last_deg": ("group", last),
        "last_frame": ("group", np.asarray(last_frame, dtype=np.int64)),
    }
    if frame_intensity is not None:
        data_vars["frame_intensity"] = (("frame", "r", "eta"), frame_intensity)
    if sum_frames is not None:
        data_vars["sum_frames"] = (("r", "eta"), sum_frames)
    for name, values in (process_variables or {}).items():
        data_vars[name] = ("group", np.asarray(values, dtype=np.float64))
    coords = {
        "frame": ("frame", np.asarray(frame, dtype=np.int64)),
        "r_px": ("r", np.asarray(r_px, dtype=np.float64)),
        "tth_deg": ("r", np.asarray(tth_deg, dtype=np.float64)),
        "q_inv_a": ("r", np.asarray(q_inv_a, dtype=np.float64)),
        "eta_deg": ("eta", np.asarray(eta_deg, dtype=np.float64)),
        "bin_area": (("r", "eta"), np.asarray(bin_area, dtype=np.float64)),
        **({} if effective_tth_deg is None else
           {"effective_tth_deg": (("r", "eta"), np.asarray(effective_tth_deg, dtype=np.float64))}),
        "omega_deg": ("group", 0.5 * (first + last)),
        "omega_frame_deg": ("frame", np.asarray(omega_frame_deg, dtype=np.float64)),
    }
    return xr.Dataset(data_vars, coords=coords, attrs=dict(attrs or {}))
