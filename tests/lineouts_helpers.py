"""Hand-built caked Datasets of a strained cubic phase and a small stand-in refinement engine.

The caked Dataset has exactly the layout of the caking contract (docs/architecture.md); each
η-column holds one Gaussian peak (the 111 reflection of a cubic cell a(η) strained by a known
tensor) on a flat background, summed over N frames with Poisson noise.

``toy_refine`` is a genuine least-squares fit (scipy) of that peak: it returns a
``PatternResult`` with the fields the lineout/results code reads, and honours ``start``.
``ToyBackend`` runs it as a :class:`~midasflow.refinement.backends.RefineBackend` with
``TOY_OPTIONS``.
"""
from __future__ import annotations

import json

import numpy as np
import xarray as xr
from scipy.optimize import least_squares

from midasflow import strain
from midasflow.crystal import cubic_phase
from midasflow.instrument import Instrument
from midasflow.refinement.options import RefineOptions
from midasflow.refinement.recipe import Stage
from midasflow.refinement.result import PatternResult

WAVELENGTH_A = 0.172979
A0_A = 5.411
HKL = (1, 1, 1)
TENSOR = strain.tensor_from_components([3e-4, -5e-4, 8e-4, 2e-4, -1e-4, 1e-4])
PEAK_SIGMA_DEG = 0.012


def tth_of_a(a_a):
    d = np.asarray(a_a) / np.sqrt(sum(h * h for h in HKL))
    return 2 * np.rad2deg(np.arcsin(WAVELENGTH_A / (2 * d)))


def a_of_tth(tth_deg):
    d = WAVELENGTH_A / (2 * np.sin(np.deg2rad(tth_deg) / 2))
    return d * np.sqrt(sum(h * h for h in HKL))


def make_caked(*, n_groups=2, n_eta=8, n_r=80, frames=3, omega0=0.0, omega_step=90.0,
               seed=0, height=400.0, bkg=5.0, area=2.0, masked=()):
    """Caked Dataset (group, r, eta); ``masked`` = (group, eta) columns set to NaN."""
    rng = np.random.default_rng(seed)
    tth0 = float(tth_of_a(A0_A))
    tth = np.linspace(tth0 - 0.15, tth0 + 0.15, n_r)
    eta = -180 + (np.arange(n_eta) + 0.5) * 360 / n_eta
    omega = omega0 + omega_step * np.arange(n_groups)
    bin_area = np.full((n_r, n_eta), area)
    bin_area[:3, :] = 0.0  # empty bins at the low edge
    inten = np.empty((n_groups, n_r, n_eta))
    true_a = np.empty((n_groups, n_eta))
    for g in range(n_groups):
        for e in range(n_eta):
            # a cake's η column averages the strain over its η bin
            in_bin = eta[e] + (np.arange(64) + 0.5) / 64 * (360 / n_eta) - 180 / n_eta
            eps = float(np.mean(strain.normal_strain(tth0 / 2, in_bin, TENSOR, omega[g])))
            a = A0_A * (1 + eps)
            true_a[g, e] = a
            mean = bkg + height * np.exp(-0.5 * ((tth - tth_of_a(a)) / PEAK_SIGMA_DEG) ** 2)
            counts = rng.poisson(mean * area * frames)  # counts over the group's frames
            inten[g, :, e] = counts / area  # sum over frames of per-frame area-normalised cakes
    for g, e in masked:
        inten[g, :, e] = np.nan
    ds = xr.Dataset(
        {"intensity": (("group", "r", "eta"), inten),
         "frames_summed": ("group", np.full(n_groups, frames)),
         "omega_first_deg": ("group", omega - 0.5), "omega_last_deg": ("group", omega + 0.5),
         "true_a": (("group", "eta"), true_a)},
        coords={"tth_deg": ("r", tth), "eta_deg": ("eta", eta), "bin_area": (("r", "eta"), bin_area),
                "omega_deg": ("group", omega)},
        attrs={"params": "Normalize 1\n", "instrument": json.dumps({"Lam": WAVELENGTH_A})},
    )
    return ds


def toy_refine(tth_deg, intensity, sigma, phases=("CeO2",), instprm=None, *, bkg_terms=1, limits=None,
               refine_atoms=False, mode="rietveld", start=None, sample_azimuth_deg=0.0, fail_below=None,
               estimate=True, physical_profile=False):
    """Fit background + one Gaussian; ``phases`` are names. Raises on an empty pattern. ``estimate``
    and ``physical_profile`` are accepted as the engine's keywords and have no effect here."""
    x, y, s = (np.asarray(v, float) for v in (tth_deg, intensity, sigma))
    if x.size < 5:
        raise ValueError(f"pattern has {x.size} points")
    if fail_below is not None and np.nanmax(y) < fail_below:
        raise RuntimeError("injected failure")
    start = dict(start or {})
    p0 = [start.get("Back;0", float(np.median(y))), start.get("Scale", float(y.max() - np.median(y))),
          start.get("pos", float(x[np.argmax(y)])), start.get("sig", 0.02)]

    def model(p):
        return p[0] + p[1] * np.exp(-0.5 * ((x - p[2]) / p[3]) ** 2)

    fit = least_squares(lambda p: (y - model(p)) / s, p0, method="lm", xtol=1e-12, ftol=1e-12)
    jac = fit.jac
    cov = np.linalg.inv(jac.T @ jac)
    calc = model(fit.x)
    chi2 = float(np.sum(((y - calc) / s) ** 2))
    rwp = 100 * np.sqrt(chi2 / np.sum((y / s) ** 2))
    a = float(a_of_tth(fit.x[2]))
    da = abs(float(a_of_tth(fit.x[2] + 1e-6)) - a) / 1e-6 * np.sqrt(cov[2, 2])
    name = phases[0] if isinstance(phases[0], str) else phases[0].name
    vals = {"Back;0": fit.x[0], "Scale": fit.x[1], "pos": fit.x[2], "sig": fit.x[3], "Zero": 0.0,
            "U": 1.0, "V": -0.1, "W": 0.05, "X": 0.0, "Y": 0.0, "SH/L": 0.002, "nfev": float(fit.nfev)}
    return PatternResult(
        status="ok", message="", rwp=float(rwp), rp=float(rwp), chi2=chi2,
        gof=float(np.sqrt(chi2 / (x.size - 4))), n_points=int(x.size), n_dropped=0,
        values=vals, esds={"Scale": float(np.sqrt(cov[1, 1]))},
        cells={name: (a, a, a, 90.0, 90.0, 90.0, a ** 3)},
        cell_esds={name: (da, da, da, 0.0, 0.0, 0.0, 3 * a * a * da)},
        phase_fractions={name: (1.0, 0.0)},
        tth_deg=x, obs=y, calc=calc, bkg=np.full_like(x, fit.x[0]), warnings=[],
    )



#: Options of the toy runs: the cubic phase and the wavelength the caked data were made with.
TOY_OPTIONS = RefineOptions(phases=(cubic_phase("CeO2", A0_A),), instrument=Instrument(lam=WAVELENGTH_A),
                            bkg_terms=1)


class ToyBackend:
    """``toy_refine`` as a refinement backend (picklable); ``fail_below`` injects failures."""

    def __init__(self, fail_below=None):
        self.fail_below = fail_below

    def refine(self, spec, options, start=None):
        return toy_refine(spec.tth_deg, spec.intensity, spec.sigma, options.phases, options.instrument,
                          start=start, fail_below=self.fail_below, **options.recipe_kwargs())


def simulated_store(path, *, n_groups=3, eta_bin_deg=30.0, r_bin_px=1.0, size=256, seed=0, strain=True):
    """A MIDAS ``.zarr.zip`` of a strained CeO2 scan made with the simulator's caked scan
    (:func:`midasflow.simulate.simulate_caked`), and (path, options) to refine it with."""
    import dask

    from midasflow.crystal import cubic_phase
    from midasflow.io.midas_zarr import write_midas_zarr
    from midasflow.simulate import CEO2_A_A, ceo2_params, simulate_caked

    params = ceo2_params((size, size), r_bin_px=r_bin_px, eta_bin_deg=eta_bin_deg, omega_step_deg=30.0)
    phase = cubic_phase("CeO2", CEO2_A_A)
    ds, _ = simulate_caked(params, phase, n_groups=n_groups, strain_tensor=TENSOR if strain else None,
                           seed=seed)
    with dask.config.set(scheduler="threads"):  # not a distributed client another test left behind
        write_midas_zarr(ds, path)
    options = RefineOptions(phases=(phase,), instrument=params.instrument, bkg_terms=3)
    return path, options


#: A quick recipe for executor tests on simulated stores: background, scale and cell at once.
ONE_STAGE = (Stage("one", ("Back;0", "Back;1", "Back;2", "Scale", "0::A0"), max_cycles=6),)


class Recording:
    """Another backend (default the toy one), keeping the (index, start) of every call in this
    process (serial executor)."""

    def __init__(self, backend=None):
        self.backend, self.calls = backend or ToyBackend(), []

    def refine(self, spec, options, start=None):
        self.calls.append((spec.index, start))
        return self.backend.refine(spec, options, start)
