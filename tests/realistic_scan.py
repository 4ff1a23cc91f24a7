"""A CeO2 scan in the regime real data are in, for the refinement-trust tests.

Pilatus-like: 172 µm pixels with the module gaps flagged (−1 in int32 frames, and a mask TIFF),
photon counting (Poisson, no dark offset), λ = 0.41 Å, peaks 0.05–0.09° FWHM (1.2–2 pixels) with
a Lorentzian part and some asymmetry. The frames are simulated once; the parameter file written
beside them can carry the true profile or MIDAS's default one (U 1.163, V −0.126, W 0.063: peaks
about 10× too narrow), and the store is integrated with any RBinSize.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from midasflow import pipeline
from midasflow.crystal import cubic_phase, write_phase_cif
from midasflow.simulate import CEO2_A_A, ceo2_params, module_gaps, simulate_frames, write_scan

SHAPE = (512, 512)
WAVELENGTH_A = 0.41
#: The rings' GSAS-II profile (centidegrees): Gaussian FWHM 5 → 7 cdeg, Lorentzian 2.3 → 3.4 cdeg
#: from the first ring (2θ 4.3°) to the last (11°).
TRUE_PROFILE = (("Polariz.", 0.99), ("SH/L", 0.003), ("U", 550.0), ("V", 0.0), ("W", 3.7), ("X", 1.5),
                ("Y", 20.0), ("Z", 0.0))


def true_params(**overrides):
    """The scan's geometry and true instrument (Lsd 225 mm: 2θ up to 11°, 7 CeO2 rings)."""
    fields = dict(px_um=172.0, lsd_um=225_000.0, wavelength_a=WAVELENGTH_A, eta_bin_deg=30.0, r_bin_px=0.25,
                  omega_sum_frames=2, omega_step_deg=0.25, instrument_overrides=TRUE_PROFILE)
    fields.update(overrides)
    return ceo2_params(SHAPE, **fields)


def gaps(shape=SHAPE):
    """Pilatus module gaps scaled to the detector (rows, columns)."""
    scale = max(shape) / 2048.0
    return module_gaps(shape, (max(1, round(195 * scale)), max(1, round(487 * scale))),
                       (max(1, round(17 * scale)), max(1, round(7 * scale))))


def write_frames(folder: Path, *, seed: int = 0, n_frames: int = 2, counts: float = 1000.0,
                 background: float = 30.0, strain_tensor=None):
    """Simulate the frames once; returns (frames, mask, truth)."""
    params = true_params()
    frames, truth = simulate_frames(
        params, cubic_phase("CeO2", CEO2_A_A), n_frames=n_frames, strain_tensor=strain_tensor,
        background=background, counts=counts, poisson=True, seed=seed, masked_regions=gaps(),
        supersample=4, dtype=np.int32)
    return frames, truth["flagged"], truth


def write_store(folder: Path, frames, mask, *, store_profile: str = "true", r_bin_px: float = 0.25,
                cache_dir: Path | None = None) -> tuple[Path, Path]:
    """Write the scan with a parameter file carrying the ``store_profile`` ("true" or "midas"
    defaults), integrate it at ``r_bin_px``; returns (store, CIF)."""
    folder = Path(folder)
    inst = TRUE_PROFILE if store_profile == "true" else ()
    params = true_params(instrument_overrides=inst, r_bin_px=r_bin_px)
    files = write_scan(folder, params, frames, None, fmt="h5", mask=mask)
    store = pipeline.integrate(files.params_file, files.data, result_folder=folder,
                               cache_dir=cache_dir or folder / "cache")
    cif = write_phase_cif(cubic_phase("CeO2", CEO2_A_A), folder / "CeO2.cif")
    return store, cif
