"""Synthetic far-field powder frames with known truth, for examples, tests and benchmarks.

Every detector pixel is split into ``supersample × supersample`` sub-pixels; each sub-pixel
centre goes through the full MIDAS geometry (ImTransOpt, tilts, distortion, parallax:
:func:`midasflow.geometry.pixel_to_r_eta`) to its 2θ and η, and the pixel value is the mean of
the sub-pixel intensities. Frames come out in the RAW detector orientation (sub-pixels are laid
out in raw coordinates and mapped to the transformed frame for the geometry).

Strain (docs/reference/strain_geometry.md): ring k seen at azimuth η on a frame at rotation ω has
d = d0_k·(1 + nᵀεn), with n = (−sin θ, −cos θ sin η, cos θ cos η) the lab-frame scattering vector
and ε the sample-frame tensor rotated into the lab frame, ε_lab = Rz(ω)·ε·Rz(ω)ᵀ (equivalently
n_sample = Rz(ω)ᵀ·n; strain_geometry.md §4). A sub-pixel at Bragg angle θ_s therefore sees
the unstrained pattern at sin θ' = sin θ_s·(1 + nᵀεn), with n evaluated at its own (θ_s, η_s); the
unstrained pattern is tabulated once in 2θ and interpolated.

The unstrained 1-D pattern comes from one of two sources:

* a :class:`midasflow.crystal.Phase`: the refinement engine's own model
  (:class:`midasflow.refinement.engine.PatternModel`, no background) with the instrument terms of
  ``params.instrument`` (what the parameter file, and so the ``.zarr.zip`` InstrumentParameters,
  carry) — GSAS-II's CW profile (TCH pseudo-Voigt ⊗ FCJ asymmetry, widths from U, V, W, X, Y, Z
  and the default Size/Mustrain) and I_h = M_h·L·P·|F_h|²/V, with the sample azimuth 0 that the
  pipeline refines with. A refinement of these rings therefore has the simulated cell as its
  exact answer (up to the pixel, bin and η-bin averaging of the detector and the cake).
* :class:`Rings` (idealised rings for geometry and caking tests): peak-height normalised
  profiles in 2θ (degrees), Gaussian exp(−4 ln2 x²/FWHM²), Lorentzian 1/(1 + 4x²/FWHM²),
  pseudo-Voigt = ``lorentz_fraction``·L + (1 − ``lorentz_fraction``)·G.

``counts`` is the peak height (above background) of a ring of relative intensity 1 (Rings) or
of the highest point of the phase's pattern (Phase).
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from midasflow.geometry import pixel_to_r_eta, r_to_tth_deg, raw_to_transformed
from midasflow.params import Params
from midasflow.strain import rotation_z, scattering_vector

__all__ = [
    "Rings",
    "cubic_rings",
    "module_gaps",
    "ring_tth_deg",
    "simulate_frames",
    "simulate_dark",
    "simulate_caked",
    "ScanFiles",
    "write_scan",
    "simulate_ceo2_scan",
    "ceo2_params",
    "CEO2_A_A",
    "CEO2_WAVELENGTH_A",
    "CEO2_GAUSS_FWHM_PX",
    "CEO2_LORENTZ_FWHM_PX",
    "CEO2_SHL",
]

#: CeO2 (NIST SRM 674b-like) lattice parameter, Å.
CEO2_A_A = 5.411651
#: A typical APS 1-ID wavelength, Å.
CEO2_WAVELENGTH_A = 0.172979
#: Ring profile of the CeO2 scans in detector pixels (at the detector centre): Gaussian FWHM,
#: Lorentzian FWHM, and GSAS-II's smallest FCJ asymmetry SH/L; see :func:`ceo2_params`.
CEO2_GAUSS_FWHM_PX = 2.0
CEO2_LORENTZ_FWHM_PX = 0.5
CEO2_SHL = 0.002
#: Sub-pixels per geometry block (bounds memory; geometry is computed once per block).
_BLOCK_SUBPIXELS = 2**20


@dataclass(frozen=True)
class Rings:
    """Powder rings: d-spacings and relative intensities.

    Attributes
    ----------
    d_a : ndarray, shape (n,), float64
        d-spacings, Å.
    intensity : ndarray, shape (n,), float64
        Relative peak heights (strongest = 1).
    hkl : ndarray, shape (n, 3), int, or None
    """

    d_a: np.ndarray
    intensity: np.ndarray
    hkl: np.ndarray | None = None


def _cubic_multiplicity(hkl: Sequence[int]) -> int:
    """Number of distinct signed permutations of (h, k, l) (m-3m powder multiplicity)."""
    return len({tuple(s * v for s, v in zip(signs, perm))
                for perm in itertools.permutations(hkl) for signs in itertools.product((1, -1), repeat=3)})


def cubic_rings(a_a: float, hkl_list: Sequence[Sequence[int]]) -> Rings:
    """Rings of a cubic lattice: d = a/√(h²+k²+l²), intensity ∝ m-3m multiplicity.

    Parameters
    ----------
    a_a : float
        Lattice parameter, Å.
    hkl_list : sequence of (h, k, l)

    Returns
    -------
    Rings
    """
    hkl = np.asarray(hkl_list, dtype=int).reshape(-1, 3)
    d = a_a / np.sqrt((hkl**2).sum(axis=1))
    mult = np.array([_cubic_multiplicity(tuple(row)) for row in hkl], dtype=np.float64)
    return Rings(d, mult / mult.max(), hkl)


def module_gaps(shape: tuple[int, int], module_px: tuple[int, int] = (195, 487),
                gap_px: tuple[int, int] = (17, 7)) -> list[tuple[int, int, int, int]]:
    """Rectangles of the gaps between detector modules (Pilatus layout by default).

    Parameters
    ----------
    shape : (nz, ny)
    module_px : (rows, columns) of one module
    gap_px : (rows, columns) of the gaps between modules

    Returns
    -------
    list of (z0, z1, y0, y1)
        Half-open pixel ranges, raw orientation.
    """
    nz, ny = shape
    rects = []
    for axis, (n, module, gap) in enumerate(((nz, module_px[0], gap_px[0]), (ny, module_px[1], gap_px[1]))):
        start = module
        while start < n:
            stop = min(start + gap, n)
            rects.append((start, stop, 0, ny) if axis == 0 else (0, nz, start, stop))
            start = stop + module
    return rects


def _strain_n(n: np.ndarray, strain_lab: np.ndarray) -> np.ndarray:
    """nᵀ ε n for unit scattering vectors ``n`` (..., 3) and a symmetric lab-frame tensor."""
    return np.einsum("...i,ij,...j->...", n, strain_lab, n)


def _lab_tensor(strain_sample: np.ndarray, omega_deg: float) -> np.ndarray:
    """Sample-frame tensor seen in the lab with the sample turned by ω about +z."""
    rot = rotation_z(omega_deg)
    return rot @ np.asarray(strain_sample, float) @ rot.T


def ring_tth_deg(d0_a: Sequence[float], wavelength_a: float, eta_deg: Sequence[float], *,
                 omega_deg: float = 0.0, strain_tensor: np.ndarray | None = None) -> np.ndarray:
    """True 2θ of rings along η: 2·asin(λ / 2d) with d = d0·(1 + nᵀεn) at the ring's own θ.

    Parameters
    ----------
    d0_a : (n_rings,) unstrained d-spacings, Å
    wavelength_a : float, Å
    eta_deg : (n_eta,) MIDAS azimuths, deg
    omega_deg : float
        Sample rotation about z, deg.
    strain_tensor : (3, 3), optional
        Sample-frame strain.

    Returns
    -------
    ndarray, shape (n_rings, n_eta), float64, degrees
    """
    d0 = np.asarray(d0_a, float)[:, None]
    eta = np.asarray(eta_deg, float)[None, :]
    sin0 = wavelength_a / (2.0 * d0) * np.ones_like(eta)
    theta = np.arcsin(sin0)
    if strain_tensor is not None:
        lab = _lab_tensor(strain_tensor, omega_deg)
        for _ in range(4):  # fixed point: n depends (weakly) on the strained θ itself
            theta = np.arcsin(sin0 / (1.0 + _strain_n(scattering_vector(np.rad2deg(theta), eta), lab)))
    return np.rad2deg(2.0 * theta)


def _profile(x_deg: np.ndarray, fwhm_deg: float, lorentz_fraction: float) -> np.ndarray:
    u = (2.0 * x_deg / fwhm_deg) ** 2
    return lorentz_fraction / (1.0 + u) + (1.0 - lorentz_fraction) * np.exp(-np.log(2.0) * u)


@dataclass(frozen=True)
class _Pattern:
    """Unstrained 1-D pattern Σ_k I_k·profile_k(2θ − 2θ_k) tabulated on a uniform 2θ grid."""

    start_deg: float
    step_deg: float
    values: np.ndarray

    def __call__(self, tth_deg: np.ndarray) -> np.ndarray:
        pos = (tth_deg - self.start_deg) / self.step_deg
        i = np.clip(np.floor(pos).astype(np.int64), 0, self.values.size - 2)
        frac = np.clip(pos - i, 0.0, 1.0)
        return self.values[i] * (1.0 - frac) + self.values[i + 1] * frac


#: Tabulation step of the 1-D pattern: this fraction of the narrowest peak's FWHM.
_STEPS_PER_FWHM = 64


def _tabulate(tth0_deg: np.ndarray, intensity: np.ndarray, fwhm_deg: np.ndarray, lorentz_fraction: float,
              tth_max_deg: float) -> _Pattern:
    step = float(fwhm_deg.min()) / _STEPS_PER_FWHM
    n = int(np.ceil(tth_max_deg / step)) + 2
    grid = np.arange(n) * step
    values = np.zeros(n)
    for t0, amp, w in zip(tth0_deg, intensity, fwhm_deg):
        values += amp * _profile(grid - t0, w, lorentz_fraction)
    return _Pattern(0.0, step, values)


def _rings_pattern(rings: Rings, wavelength_a: float, fwhm_deg: float | Sequence[float],
                   lorentz_fraction: float, tth_max_deg: float) -> tuple[_Pattern, dict[str, Any]]:
    """Pseudo-Voigt pattern of idealised rings (peak heights = ``rings.intensity``) and its truth."""
    d0 = np.asarray(rings.d_a, float)
    keep = wavelength_a / (2.0 * d0) < 1.0
    d0, amp = d0[keep], np.asarray(rings.intensity, float)[keep]
    tth0 = np.rad2deg(2.0 * np.arcsin(wavelength_a / (2.0 * d0)))
    fwhm = np.broadcast_to(np.asarray(fwhm_deg, float), rings.d_a.shape)[keep]
    pattern = _tabulate(tth0, amp, fwhm, lorentz_fraction, tth_max_deg + 10.0 * fwhm.max())
    truth = dict(profile="pseudo-voigt", d0_a=d0, tth0_deg=tth0, intensity=amp,
                 hkl=None if rings.hkl is None else np.asarray(rings.hkl)[keep], fwhm_deg=fwhm,
                 lorentz_fraction=float(lorentz_fraction), instrument=None)
    return pattern, truth


def _phase_pattern(phase: Any, params: Params, tth_max_deg: float) -> tuple[_Pattern, dict[str, Any]]:
    """The refinement engine's model of ``phase`` (peaks only, max = 1) on a fine 2θ grid, and its truth.

    The instrument terms are ``params.instrument``, the terms the caked file carries and the
    pipeline reads back (:func:`midasflow.io.instprm.instrument_from_midas`), so simulation and
    refinement use one instrument and one model (:class:`midasflow.refinement.engine.PatternModel`).
    """
    from midasflow.profile import tch_fwhm_eta
    from midasflow.refinement.engine import PatternModel

    instrument = params.instrument
    if instrument.is_doublet:
        raise ValueError("simulate_frames: a Kα doublet instrument is not supported (set Lam)")
    hi = tth_max_deg + 1.0

    def widths(model: PatternModel) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Reflection terms inside 0..hi and their TCH FWHM (deg)."""
        rt = model.reflection_terms(0, model.values)
        keep = np.isfinite(rt["tth"]) & (rt["tth"] <= hi)
        rt = {key: np.asarray(val)[keep] for key, val in rt.items()}
        rt["hkl"] = np.asarray(model.phases[0].hkl)[keep]
        return rt, np.array([tch_fwhm_eta(s2, g)[0] for s2, g in zip(rt["sig2"], rt["gam"])]) / 100.0

    _, fwhm = widths(PatternModel(np.array([0.0, hi]), (0.0, hi), [phase], instrument, bkg_terms=1))
    step = float(fwhm.min()) / _STEPS_PER_FWHM
    grid = np.arange(int(np.ceil(hi / step)) + 2) * step
    model = PatternModel(grid, (0.0, float(grid[-1])), [phase], instrument, bkg_terms=1)
    y, bkg, _ = model.evaluate(model.values)
    peaks = y - bkg
    top = float(peaks.max())
    rt, fwhm = widths(model)
    truth = dict(profile="gsas2-cw", d0_a=params.wavelength_a / (2.0 * np.sin(np.deg2rad(rt["tth"]) / 2.0)),
                 tth0_deg=rt["tth"], intensity=rt["intensity"] / top, hkl=rt["hkl"], fwhm_deg=fwhm,
                 lorentz_fraction=None, instrument=instrument.to_dict())
    return _Pattern(0.0, step, peaks / top), truth


def _reflection_patterns(phase: Any, params: Params, pattern: _Pattern, truth: dict[str, Any]) -> list[_Pattern]:
    """The pattern of :func:`_phase_pattern` split into one tabulated peak per reflection of
    ``truth`` (same grid and normalisation: they sum to ``pattern``)."""
    from midasflow.profile import pattern as peak_sum
    from midasflow.refinement.engine import PatternModel

    grid = pattern.start_deg + np.arange(pattern.values.size) * pattern.step_deg
    model = PatternModel(grid, (float(grid[0]), float(grid[-1])), [phase], params.instrument, bkg_terms=1)
    rt = model.reflection_terms(0, model.values)
    index = {tuple(map(int, h)): i for i, h in enumerate(model.phases[0].hkl)}
    out = []
    for hkl, intensity in zip(truth["hkl"], truth["intensity"]):
        i = index[tuple(map(int, hkl))]
        y = peak_sum(grid, rt["tth"][i:i + 1], rt["sig2"][i:i + 1], rt["gam"][i:i + 1], [intensity],
                     model.values["SH/L"], precision=model.precision).y
        out.append(_Pattern(pattern.start_deg, pattern.step_deg, y))
    return out


def _finish(values: np.ndarray, *, poisson: bool, rng: np.random.Generator, dtype: np.dtype,
            flagged: np.ndarray, flag_value: float) -> np.ndarray:
    """Noise, conversion to the detector dtype, flagged pixels."""
    if poisson:
        values = rng.poisson(np.clip(values, 0.0, None)).astype(np.float64)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = np.clip(np.rint(values), max(info.min, 0), info.max)
    out = values.astype(dtype)
    if flagged.any():
        if dtype.kind == "u" and flag_value < 0:
            raise ValueError(f"flag value {flag_value} does not fit the unsigned dtype {dtype}")
        out[..., flagged] = flag_value
    return out


def _flag_mask(shape: tuple[int, int], masked_regions: Sequence[tuple[int, int, int, int]]) -> np.ndarray:
    flagged = np.zeros(shape, bool)
    for z0, z1, y0, y1 in masked_regions:
        flagged[z0:z1, y0:y1] = True
    return flagged


def _detector_tth_max(params: Params) -> float:
    """Largest 2θ on the detector border (plus the centre row/column), degrees."""
    nz, ny = params.nr_pixels_z, params.nr_pixels_y
    z = np.concatenate([np.arange(nz), np.arange(nz), np.zeros(ny), np.full(ny, nz - 1.0)])
    y = np.concatenate([np.zeros(nz), np.full(nz, ny - 1.0), np.arange(ny), np.arange(ny)])
    r, _ = pixel_to_r_eta(*raw_to_transformed(y + 0.5, z + 0.5, params), params)
    r2, _ = pixel_to_r_eta(*raw_to_transformed(y - 0.5, z - 0.5, params), params)
    return float(r_to_tth_deg(max(r.max(), r2.max()), params))


def simulate_frames(
    params: Params,
    rings: Rings | Any,
    *,
    n_frames: int = 1,
    strain_tensor: np.ndarray | None = None,
    fwhm_deg: float | Sequence[float] = 0.02,
    lorentz_fraction: float = 0.0,
    background: float = 0.0,
    counts: float = 1000.0,
    dark_offset: float = 0.0,
    poisson: bool = False,
    seed: int = 0,
    masked_regions: Sequence[tuple[int, int, int, int]] = (),
    flag_value: float = -1,
    omega_factor: Callable[[np.ndarray], np.ndarray] | Sequence[float] | None = None,
    supersample: int = 4,
    dtype: Any = np.float32,
    texture: Any = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Simulate raw powder frames through the full MIDAS geometry.

    Parameters
    ----------
    params : Params
        Detector geometry, wavelength, NrPixelsZ×NrPixelsY, ImTransOpt, OmegaStart/OmegaStep.
    rings : Rings or midasflow.crystal.Phase
        Idealised rings drawn with the pseudo-Voigt of ``fwhm_deg``/``lorentz_fraction``, or a
        Phase drawn with the refinement engine's model and the instrument terms of
        ``params.instrument`` (module docstring).
    n_frames : int
        Frames; frame i is at ω = OmegaStart + i·OmegaStep (deg).
    strain_tensor : (3, 3) array, optional
        Symmetric sample-frame strain (module docstring).
    fwhm_deg : float or (n_rings,)
        Profile FWHM in 2θ, degrees (Rings only).
    lorentz_fraction : float
        0 = Gaussian, 1 = Lorentzian, between = pseudo-Voigt (Rings only).
    background, counts, dark_offset : float
        Flat background (counts/pixel), peak height of a ring of intensity 1 (Rings) or of the
        pattern's highest point (Phase), detector offset (the level a dark frame records).
    poisson : bool
        Add Poisson noise (``seed`` makes it reproducible).
    masked_regions : sequence of (z0, z1, y0, y1)
        Raw-frame rectangles set to ``flag_value`` (e.g. :func:`module_gaps` with −1).
    omega_factor : callable or (n_frames,), optional
        Ring-intensity factor per frame, a function of ω (deg) or the values.
    supersample : int
        Sub-pixels per pixel along each axis.
    dtype : numpy dtype
        Output dtype; integer dtypes are rounded and clipped at 0 and the dtype maximum.
    texture : midasflow.texture.fiber.FiberTexture, optional
        (Phase only.) Reflection k seen by a sub-pixel at azimuth η on the frame at ω is
        multiplied by the texture's pole density at its sample direction Rz(ω)ᵀ·n(θ_k, η), as in
        :func:`simulate_caked`; the density is tabulated on the truth's 1° η grid and
        interpolated (periodic) in η. ``counts`` stays the maximum of the untextured pattern.

    Returns
    -------
    frames : ndarray, shape (n_frames, nz, ny), ``dtype``
        Raw orientation.
    truth : dict
        ``wavelength_a``, ``profile`` ("pseudo-voigt" for Rings, "gsas2-cw" for a Phase),
        ``d0_a``, ``tth0_deg``, ``intensity`` (Rings: peak heights; Phase: integrated I_h in
        units of ``counts``·centidegree), ``hkl`` (n_rings arrays or None), ``fwhm_deg`` (total
        FWHM per ring), ``lorentz_fraction`` (Rings) and ``instrument`` (Phase: the GSAS-II
        terms used, as refinement reads them back; else None), ``omega_deg`` (n_frames,),
        ``omega_factor`` (n_frames,),
        ``strain_tensor`` (3, 3), ``eta_deg`` (360,) 1° grid, ``ring_tth_deg``
        (n_frames, n_rings, 360) true ring 2θ along η, ``background``, ``counts``,
        ``dark_offset``, ``flagged`` (nz, ny) bool, ``supersample``; with a texture also
        ``texture`` (its description) and ``pole_density`` (n_frames, 360, n_rings) on the η grid.
    """
    nz, ny = int(params.nr_pixels_z), int(params.nr_pixels_y)
    dtype = np.dtype(dtype)
    tth_max = _detector_tth_max(params)
    if isinstance(rings, Rings):
        if texture is not None:
            raise ValueError("simulate_frames: a texture needs a Phase (its reflections' hkl), not Rings")
        pattern, ring_truth = _rings_pattern(rings, params.wavelength_a, fwhm_deg, lorentz_fraction, tth_max)
    else:
        pattern, ring_truth = _phase_pattern(rings, params, tth_max)
    d0 = ring_truth["d0_a"]
    eta_grid = np.arange(-179.5, 180.0, 1.0)

    omega = float(params.omega_start_deg) + float(params.omega_step_deg) * np.arange(n_frames)
    if omega_factor is None:
        factor = np.ones(n_frames)
    elif callable(omega_factor):
        factor = np.asarray(omega_factor(omega), float) * np.ones(n_frames)
    else:
        factor = np.asarray(omega_factor, float).reshape(n_frames)
    strain = None if strain_tensor is None else np.asarray(strain_tensor, float).reshape(3, 3)
    # frames with equal ω share one ring image; without strain or texture every frame does
    keys = np.zeros(n_frames) if strain is None and texture is None else omega
    unique_omega, which = np.unique(keys, return_inverse=True)
    lab = [None if strain is None else _lab_tensor(strain, w) for w in unique_omega]
    peaks, density = None, None
    if texture is not None:
        from midasflow.texture.polefigure import sample_directions

        peaks = _reflection_patterns(rings, params, pattern, ring_truth)
        density = np.stack([texture.pole_density(  # (ω, η grid, reflection)
            rings, ring_truth["hkl"], sample_directions(ring_truth["tth0_deg"][None, :], eta_grid[:, None], w))
            for w in unique_omega])

    s = int(supersample)
    sub = (np.arange(s) + 0.5) / s - 0.5
    rows = max(1, _BLOCK_SUBPIXELS // (ny * s * s))
    ring_images = np.empty((unique_omega.size, nz, ny))

    def render(z0: int) -> None:
        """Ring images of raw rows z0:z0+rows for every distinct ω (geometry computed once)."""
        z1 = min(nz, z0 + rows)
        z = np.arange(z0, z1, dtype=float)[:, None, None, None] + sub[None, None, :, None]
        y = np.arange(ny, dtype=float)[None, :, None, None] + sub[None, None, None, :]
        r, eta = pixel_to_r_eta(*raw_to_transformed(*np.broadcast_arrays(y, z), params), params)
        tth = r_to_tth_deg(r, params)
        if strain is not None:
            theta = np.deg2rad(tth) / 2.0
            sin_theta, n = np.sin(theta), scattering_vector(np.rad2deg(theta), eta)
        for k, strain_lab in enumerate(lab):
            if strain_lab is not None:
                sin_unstrained = sin_theta * (1.0 + _strain_n(n, strain_lab))
                tth = 2.0 * np.rad2deg(np.arcsin(np.clip(sin_unstrained, -1.0, 1.0)))
            if peaks is None:
                ring_images[k, z0:z1] = pattern(tth).mean(axis=(2, 3))
            else:
                image = sum(np.interp(eta, eta_grid, density[k, :, j], period=360.0) * peak(tth)
                            for j, peak in enumerate(peaks))
                ring_images[k, z0:z1] = image.mean(axis=(2, 3))

    # numpy releases the GIL in its loops: row blocks run in parallel threads
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(render, range(0, nz, rows)))

    values = background + dark_offset + counts * factor[:, None, None] * ring_images[which]
    flagged = _flag_mask((nz, ny), masked_regions)
    frames = _finish(values, poisson=poisson, rng=np.random.default_rng(seed), dtype=dtype,
                     flagged=flagged, flag_value=flag_value)
    truth = {
        "wavelength_a": float(params.wavelength_a),
        **ring_truth,
        "omega_deg": omega,
        "omega_factor": factor,
        "strain_tensor": np.zeros((3, 3)) if strain is None else strain,
        "eta_deg": eta_grid,
        "ring_tth_deg": np.stack([ring_tth_deg(d0, params.wavelength_a, eta_grid, omega_deg=w,
                                               strain_tensor=strain) for w in omega]),
        "background": float(background),
        "counts": float(counts),
        "dark_offset": float(dark_offset),
        "flagged": flagged,
        "supersample": s,
    }
    if texture is not None:
        truth.update(texture=texture.to_dict(), pole_density=density[which])
    return frames, truth


def simulate_dark(params: Params, *, n_frames: int = 2, level: float = 0.0, poisson: bool = False,
                  seed: int = 1, masked_regions: Sequence[tuple[int, int, int, int]] = (),
                  flag_value: float = -1, dtype: Any = np.float32) -> np.ndarray:
    """Dark frames (n_frames, nz, ny): ``level`` (+ Poisson noise), flagged regions as in the data."""
    shape = (int(params.nr_pixels_z), int(params.nr_pixels_y))
    return _finish(np.full((n_frames, *shape), float(level)), poisson=poisson, rng=np.random.default_rng(seed),
                   dtype=np.dtype(dtype), flagged=_flag_mask(shape, masked_regions), flag_value=flag_value)


def simulate_caked(
    params: Params,
    phase: Any,
    *,
    n_groups: int,
    frames_per_group: int = 1,
    strain_tensor: np.ndarray | None = None,
    counts: float = 2000.0,
    background: float = 50.0,
    seed: int = 0,
    texture: Any = None,
) -> tuple[Any, dict[str, Any]]:
    """A caked scan made directly in (ω-group, R, η), without frames: for plan, executor and
    scale tests where caking is not the subject.

    Every bin sees the unstrained pattern of ``phase`` (:func:`simulate_frames`' model, peak
    height ``counts`` over a flat ``background``) at its R-bin centre, strained as at its η-bin
    centre and ω (module docstring); a group of N frames sums N per-frame, area-normalised cakes
    whose counts (value × bin area × N) are Poisson. Bin areas are the annular sectors
    R·ΔR·Δη(rad); group g covers frames g·N … g·N + N − 1 at ω = OmegaStart + i·OmegaStep.

    Parameters
    ----------
    params : Params
        R and η binning, wavelength, Lsd and pixel size, ω of the frames.
    phase : midasflow.crystal.Phase
    n_groups, frames_per_group : int
    strain_tensor : (3, 3), optional
        Sample-frame strain.
    counts, background : float
        Pattern maximum and flat background, counts per pixel per frame.
    seed : int
        Poisson noise seed.
    texture : midasflow.texture.fiber.FiberTexture, optional
        Reflection k seen at η in group g is multiplied by the texture's pole density at its
        sample direction Rz(ω)ᵀ·n(θ_k, η) (η-bin centre, mid-group ω); ``counts`` stays the
        maximum of the untextured pattern.

    Returns
    -------
    (xarray.Dataset, truth)
        The caked Dataset (:func:`midasflow.caked_schema.caked_dataset`, attrs ``params`` and
        ``instrument`` as :func:`midasflow.caking.cake` sets them) and ``truth`` with
        ``omega_deg`` (group,), ``strain_tensor``, ``wavelength_a`` and the pattern's
        ``tth0_deg``, ``d0_a``, ``hkl``, ``intensity``, ``instrument``; with a texture also
        ``texture`` (its description) and ``pole_density`` (group, eta, reflection).
    """
    import json

    from midasflow.caked_schema import caked_dataset
    from midasflow.geometry import tth_to_q_inv_a

    r_edges, eta_edges = params.r_edges_px(), params.eta_edges_deg()
    r_px, eta_deg = 0.5 * (r_edges[1:] + r_edges[:-1]), 0.5 * (eta_edges[1:] + eta_edges[:-1])
    tth = r_to_tth_deg(r_px, params)
    pattern, truth = _phase_pattern(phase, params, float(tth.max()))
    area = np.outer(r_px * np.diff(r_edges), np.deg2rad(np.diff(eta_edges)))
    n = int(frames_per_group)
    first = float(params.omega_start_deg) + float(params.omega_step_deg) * n * np.arange(n_groups)
    last = first + float(params.omega_step_deg) * (n - 1)
    theta = np.broadcast_to(np.deg2rad(tth)[:, None] / 2.0, area.shape)
    normal = scattering_vector(np.rad2deg(theta), np.broadcast_to(eta_deg, area.shape))
    strain = None if strain_tensor is None else np.asarray(strain_tensor, float).reshape(3, 3)
    rng = np.random.default_rng(seed)
    intensity = np.empty((n_groups, *area.shape))
    peaks = None if texture is None else _reflection_patterns(phase, params, pattern, truth)
    density = []
    for g, omega in enumerate(0.5 * (first + last)):
        sin_theta = np.sin(theta)
        if strain is not None:
            sin_theta = sin_theta * (1.0 + _strain_n(normal, _lab_tensor(strain, omega)))
        tth_seen = 2.0 * np.rad2deg(np.arcsin(np.clip(sin_theta, -1, 1)))
        if peaks is None:
            per_frame = background + counts * pattern(tth_seen)
        else:
            from midasflow.texture.polefigure import sample_directions

            y = sample_directions(truth["tth0_deg"][None, :], eta_deg[:, None], omega)   # (eta, refl, 3)
            density.append(texture.pole_density(phase, truth["hkl"], y))
            per_frame = background + counts * sum(density[-1][:, k] * peak(tth_seen) for k, peak in enumerate(peaks))
        intensity[g] = rng.poisson(per_frame * area * n) / area
    ds = caked_dataset(
        intensity=intensity, frames_summed=np.full(n_groups, n), omega_first_deg=first,
        omega_last_deg=last, last_frame=np.arange(1, n_groups + 1) * n - 1,
        frame=np.arange(n_groups * n),
        omega_frame_deg=float(params.omega_start_deg) + float(params.omega_step_deg) * np.arange(n_groups * n),
        r_px=r_px, tth_deg=tth, q_inv_a=tth_to_q_inv_a(tth, params.wavelength_a), eta_deg=eta_deg,
        bin_area=area,
        attrs={"params": params.to_text(), "instrument": json.dumps(params.instrument.to_midas())},
    )
    truth.update(omega_deg=0.5 * (first + last), wavelength_a=float(params.wavelength_a),
                 strain_tensor=np.zeros((3, 3)) if strain is None else strain)
    if texture is not None:
        truth.update(texture=texture.to_dict(), pole_density=np.stack(density))
    return ds, truth


@dataclass(frozen=True)
class ScanFiles:
    """Files written by :func:`write_scan`.

    Attributes
    ----------
    data : Path
    params_file : Path
        MIDAS parameter file (``Dark``/``MaskFile`` set when written separately).
    params : Params
        What ``read_params(params_file)`` returns.
    dark : Path or None
        Separate dark file (GE/TIFF); None for HDF5 (``exchange/dark`` in the data file).
    mask : Path or None
    """

    data: Path
    params_file: Path
    params: Params
    dark: Path | None = None
    mask: Path | None = None


def _write_h5(path: Path, frames: np.ndarray, dark: np.ndarray | None, compression: str | None) -> None:
    import h5py
    import hdf5plugin

    options = {
        None: {},
        "bitshuffle": dict(hdf5plugin.Bitshuffle(cname="lz4")),
        "blosc": dict(hdf5plugin.Blosc(cname="zstd", clevel=1, shuffle=hdf5plugin.Blosc.BITSHUFFLE)),
    }
    if compression not in options:
        raise ValueError(f"compression: expected None, 'bitshuffle' or 'blosc', got {compression!r}")
    with h5py.File(path, "w") as f:
        f.create_dataset("exchange/data", data=frames, chunks=(1, *frames.shape[1:]), **options[compression])
        if dark is not None:
            f.create_dataset("exchange/dark", data=dark, chunks=(1, *dark.shape[1:]), **options[compression])


def _write_ge(path: Path, frames: np.ndarray) -> None:
    if frames.dtype not in (np.uint16, np.uint32):
        raise ValueError(f"GE files hold uint16 or uint32 pixels, got {frames.dtype}")
    with open(path, "wb") as f:
        f.write(bytes(8192))
        f.write(frames.astype(frames.dtype.newbyteorder("<")).tobytes())


def _write_tiff(path: Path, frames: np.ndarray) -> None:
    import tifffile

    tifffile.imwrite(path, frames, photometric="minisblack")


def write_scan(folder: str | os.PathLike, params: Params, frames: np.ndarray, dark: np.ndarray | None = None, *,
               fmt: str = "h5", stem: str = "scan_000001", compression: str | None = None,
               mask: np.ndarray | None = None) -> ScanFiles:
    """Write frames, dark, parameter file (and mask) as a beamline would.

    Parameters
    ----------
    folder : path
        Created if missing.
    params : Params
        Written with :meth:`Params.to_text` as ``<stem>_ps.txt``, with ``Dark``, ``MaskFile``
        and ``PixelValue`` filled in for what is written here.
    frames : (n, nz, ny) array
        Raw frames (e.g. from :func:`simulate_frames`).
    dark : (m, nz, ny) array, optional
    fmt : {"h5", "ge", "tif"}
        ``h5``: ``<stem>.h5`` with ``exchange/data`` and ``exchange/dark``; ``ge``:
        ``<stem>.ge3`` (+ ``dark_<stem>.ge3``; uint16/uint32 only); ``tif``: multi-page
        ``<stem>.tif`` (+ ``dark_<stem>.tif``).
    compression : {None, "bitshuffle", "blosc"}
        HDF5 filter through hdf5plugin (bitshuffle/LZ4 as Eiger writes, or Blosc zstd).
    mask : (nz, ny) bool, optional
        Written as ``<stem>_mask.tif`` (uint8, 1 = masked).

    Returns
    -------
    ScanFiles
    """
    from midasflow.params import read_params

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    frames = np.asarray(frames)
    changes: dict[str, Any] = {}
    dark_path = None
    if fmt == "h5":
        data_path = folder / f"{stem}.h5"
        _write_h5(data_path, frames, None if dark is None else np.asarray(dark), compression)
    elif fmt in ("ge", "tif"):
        writer, ext = (_write_ge, "ge3") if fmt == "ge" else (_write_tiff, "tif")
        data_path = folder / f"{stem}.{ext}"
        writer(data_path, frames)
        if dark is not None:
            dark_path = folder / f"dark_{stem}.{ext}"
            writer(dark_path, np.asarray(dark, dtype=frames.dtype))
            changes["dark_file"] = str(dark_path)
        if fmt == "ge":
            changes["pixel_value_bytes"] = frames.dtype.itemsize
    else:
        raise ValueError(f"fmt: expected 'h5', 'ge' or 'tif', got {fmt!r}")
    mask_path = None
    if mask is not None:
        import tifffile

        mask_path = folder / f"{stem}_mask.tif"
        tifffile.imwrite(mask_path, np.asarray(mask, bool).astype(np.uint8))
        changes["mask_file"] = str(mask_path)
    params_path = folder / f"{stem}_ps.txt"
    params_path.write_text(params.with_overrides(**changes).to_text())
    return ScanFiles(data_path, params_path, read_params(params_path), dark_path, mask_path)


def ceo2_params(shape: tuple[int, int] = (512, 512), **overrides: Any) -> Params:
    """A realistic high-energy CeO2 geometry scaled to a detector of ``shape`` (nz, ny).

    200 µm pixels, λ = 0.172979 Å, Lsd = 1 m × (max(shape)/2048) so the rings cover the same
    2θ range as a 2048² detector at 1 m; beam centre slightly off the middle, small tilts and
    distortion; R bins of 0.25 px out to the largest full ring radius, η bins of 5°.

    Unless ``instrument_overrides`` is given, the GSAS-II instrument terms of the rings (written
    to the parameter file, used by :func:`simulate_frames` for a Phase and read back by the
    refinement as a calibrated instrument): ``Polariz.`` 0.99, ``SH/L`` = :data:`CEO2_SHL`,
    ``U = V = Y = Z = 0``, ``W`` = σ² and ``X`` = γ (centidegrees of 2θ) of a Gaussian FWHM of
    :data:`CEO2_GAUSS_FWHM_PX` and a Lorentzian FWHM of :data:`CEO2_LORENTZ_FWHM_PX` pixels.
    """
    nz, ny = shape
    scale = max(shape) / 2048.0
    bc_y, bc_z = ny / 2 + 0.37, nz / 2 - 0.29
    r_full = min(bc_y, ny - 1 - bc_y, bc_z, nz - 1 - bc_z) - 2.0
    fields: dict[str, Any] = dict(
        source="<simulate_ceo2_scan>", nr_pixels_y=ny, nr_pixels_z=nz, px_um=200.0,
        lsd_um=1.0e6 * scale, bc_y_px=bc_y, bc_z_px=bc_z, tx_deg=0.0, ty_deg=0.12, tz_deg=-0.08,
        rhod_um=float(200.0 * np.hypot(nz, ny) / 2), p=(2e-4, 0.0, -1e-4) + (0.0,) * 12,
        wavelength_a=CEO2_WAVELENGTH_A, r_min_px=10.0, r_max_px=float(np.floor(r_full)),
        r_bin_px=0.25, eta_bin_deg=5.0, omega_start_deg=0.0, omega_step_deg=1.0,
    )
    fields.update(overrides)
    if "instrument_overrides" not in overrides:
        cdeg_per_px = 100.0 * float(np.rad2deg(np.arctan(fields["px_um"] / fields["lsd_um"])))
        sigma = CEO2_GAUSS_FWHM_PX * cdeg_per_px / np.sqrt(8.0 * np.log(2.0))
        fields["instrument_overrides"] = (
            ("Polariz.", 0.99), ("SH/L", CEO2_SHL), ("U", 0.0), ("V", 0.0), ("W", round(float(sigma**2), 6)),
            ("X", round(CEO2_LORENTZ_FWHM_PX * cdeg_per_px, 6)), ("Y", 0.0), ("Z", 0.0))
    return Params(**fields)


def simulate_ceo2_scan(
    folder: str | os.PathLike,
    *,
    n_frames: int = 4,
    shape: tuple[int, int] = (512, 512),
    strain_tensor: np.ndarray | None = None,
    seed: int = 0,
    fmt: str = "h5",
    compression: str | None = None,
    poisson: bool = True,
    gaps: bool = False,
    supersample: int = 2,
    counts: float = 2000.0,
    background: float = 50.0,
    dark_offset: float = 100.0,
    params_overrides: dict[str, Any] | None = None,
) -> tuple[ScanFiles, dict[str, Any]]:
    """A complete small CeO2 scan on disk (frames, dark, parameter file, mask) with its truth.

    The rings are the engine's model of CeO2 (a = :data:`CEO2_A_A`) with the instrument terms of
    the parameter file (:func:`simulate_frames` with a Phase).

    Parameters
    ----------
    folder : path
    n_frames : int
    shape : (nz, ny)
    strain_tensor : (3, 3), optional
        Sample-frame strain applied to every ring.
    seed : int
        Poisson noise seed (data uses ``seed``, dark ``seed + 1``).
    fmt, compression : see :func:`write_scan`
    poisson : bool
    gaps : bool
        Pilatus-like module gaps (modules scaled to the detector) flagged −1 in int32 data and
        written as a mask TIFF; otherwise uint16 data and no mask.
    supersample : int
    counts, background, dark_offset : float
        Peak height of the strongest ring, flat background, dark level (counts).
    params_overrides : dict, optional
        :class:`Params` fields replacing those of :func:`ceo2_params` (``instrument_overrides``
        replaces the ring profile terms).

    Returns
    -------
    (ScanFiles, truth)
        ``truth`` is :func:`simulate_frames`'s dict plus ``a0_a``, ``phase`` (name),
        ``params`` (the written Params) and ``mask`` ((nz, ny) bool or None).
    """
    from midasflow.crystal import cubic_phase

    params = ceo2_params(shape, **(params_overrides or {}))
    scale = max(shape) / 2048.0
    regions = module_gaps(shape, (max(1, round(195 * scale)), max(1, round(487 * scale))),
                          (max(1, round(17 * scale)), max(1, round(7 * scale)))) if gaps else []
    dtype = np.int32 if gaps else np.uint16
    phase = cubic_phase("CeO2", CEO2_A_A)
    frames, truth = simulate_frames(
        params, phase, n_frames=n_frames, strain_tensor=strain_tensor, background=background,
        counts=counts, dark_offset=dark_offset, poisson=poisson, seed=seed, masked_regions=regions, supersample=supersample, dtype=dtype,
    )
    dark = simulate_dark(params, n_frames=2, level=dark_offset, poisson=poisson, seed=seed + 1,
                         masked_regions=regions, dtype=dtype)
    mask = truth["flagged"] if gaps else None
    files = write_scan(folder, params, frames, dark, fmt=fmt, compression=compression, mask=mask)
    truth.update(a0_a=CEO2_A_A, phase="CeO2", params=files.params, mask=mask)
    return files, truth
