"""Warm starts (midasflow.refinement.warm): a lineout seeded by a good result runs the short recipe
and ends where the full recipe ends, within 0.1 esd in every cell parameter and strain component;
a refused seed or warm fit gets the full recipe, and the results say which recipe ran.

Scans are the project's simulator's (simulate_caked: a strained CeO2 sample with known truth,
fixed noise seeds), refined in double precision, where the full recipe's own minimum does not
depend on the start (in float32 it moves by up to a few esd: warm starts are off there by default).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from midasflow.crystal import cubic_phase, read_phase, write_phase_cif
from midasflow.pipeline import refine
from midasflow.refinement.backends import NativeBackend
from midasflow.refinement.lineouts import LineoutSpec, plan_lineouts
from midasflow.refinement.options import RefineOptions
from midasflow.refinement.warm import GOF_MARGIN, fallback_reason, refine_warm, seed_refusal
from midasflow.simulate import CEO2_A_A, ceo2_params, simulate_caked

PBSO4 = Path(__file__).resolve().parent / "data" / "pbso4"
STRAIN = np.array([[1e-3, 0.0, 2e-4], [0.0, -5e-4, 0.0], [2e-4, 0.0, 3e-4]])
#: the largest difference allowed between warm and full results, in esds of the full result
MAX_ESD = 0.1


def _scan(shape: int, eta_bin_deg: float, n_groups: int, seed: int, shl: float | None = None):
    params = ceo2_params((shape, shape), eta_bin_deg=eta_bin_deg)
    if shl is not None:
        terms = dict(params.instrument_overrides, **{"SH/L": shl})
        params = ceo2_params((shape, shape), eta_bin_deg=eta_bin_deg, instrument_overrides=tuple(terms.items()))
    ds, truth = simulate_caked(params, cubic_phase("CeO2", CEO2_A_A), n_groups=n_groups, frames_per_group=10,
                               strain_tensor=STRAIN, seed=seed)
    return ds


def _warm_and_full(ds, tmp_path, **kw):
    cif = write_phase_cif(cubic_phase("CeO2", CEO2_A_A), tmp_path / "CeO2.cif")
    common = dict(export=False, report=False, precision="float64", refine_atoms=False, **kw)
    warm = refine(ds, [cif], out=tmp_path / "warm", warm_start=True, **common)
    full = refine(ds, [cif], out=tmp_path / "full", warm_start=False, **common)
    return warm, full


def _assert_same_within_esd(warm, full):
    ok = full.status.values == "ok"
    assert ok.all() and (warm.status.values == "ok").all()
    for name in ("a_a", "strain"):
        diff = np.abs(warm[name] - full[name]) / full[f"{name}_esd"]
        assert float(diff.max()) < MAX_ESD, (name, float(diff.max()))
    for name in ("strain_lab", "strain_sample"):  # every strain component the fits determine
        esd = full[f"{name}_esd"].values
        fitted = np.isfinite(esd)  # one ω: the lab fit leaves the beam-axis component undetermined
        assert np.array_equal(np.isfinite(warm[f"{name}_esd"].values), fitted)
        assert fitted.sum() >= (fitted.size * 5) // 6
        diff = np.abs(warm[name].values - full[name].values)[fitted] / esd[fitted]
        assert float(diff.max()) < MAX_ESD, (name, diff)


@pytest.mark.slow
def test_warm_starts_end_where_the_full_recipe_ends(tmp_path):
    """~500-point lineouts of a strained two-group scan: warm from the group mean (the default
    seed), every lineout's cell and strain and every strain-tensor component within 0.1 esd of
    the full recipe's; the results and summary say which recipe ran."""
    warm, full = _warm_and_full(_scan(256, 30.0, 2, seed=5), tmp_path)
    _assert_same_within_esd(warm, full)
    assert set(full.recipe.values.ravel()) == {"full"}
    recipes = warm.recipe.values.ravel().tolist()
    assert recipes.count("warm") >= 0.9 * len(recipes)
    assert set(recipes) <= {"warm", "full after warm"}
    notes = warm.notes.values.ravel().tolist()
    assert all(("warm start from group mean: " in n) == (r == "warm") for n, r in zip(notes, recipes))
    summary = json.loads((tmp_path / "warm" / "refinement_summary.json").read_text())
    assert [h["recipe"] for h in summary["histograms"]] == [r for r, s in zip(recipes, warm.status.values.ravel())
                                                            if s != "skipped"]


@pytest.mark.slow
def test_warm_starts_end_where_the_full_recipe_ends_on_4040_point_lineouts(tmp_path):
    """The stream benchmark's 2048² geometry with 10° η bins: 36 lineouts of 4040 points."""
    warm, full = _warm_and_full(_scan(2048, 10.0, 2, seed=1), tmp_path)
    _assert_same_within_esd(warm, full)
    recipes = warm.recipe.values.ravel().tolist()
    assert recipes.count("warm") >= 0.9 * len(recipes)


@pytest.mark.slow
def test_no_warm_start_where_chi2_has_steps_in_shl(tmp_path):
    """SH/L 0.01 (above MAX_SHL, 0.005): χ² has steps in SH/L, the full recipe's minimum moves with the
    start, and a warm fit can stop on another step (0.9 esd away, or far worse without the warm
    recipe's first stage: Rwp 2.4 % for 0.6 %). The seed is refused: every lineout gets the full
    recipe from its values, the results of the run without warm starts exactly."""
    warm, full = _warm_and_full(_scan(512, 10.0, 1, seed=1, shl=0.01), tmp_path)
    assert set(warm.recipe.values.ravel()) == {"full"}
    for name in ("a_a", "a_a_esd", "rwp", "strain"):
        assert np.array_equal(warm[name].values, full[name].values, equal_nan=True), name
    assert all("no warm start from group mean: its SH/L 0.0" in n and "is above 0.005" in n
               for n in warm.notes.values.ravel())


def test_stream_tasks_warm_start_as_batch_mode_does():
    """The stream refines a closed ω-group by its seed task and η-column parts
    (stream.tasks.refine_group_seed, refine_part); batch mode by the lineout plan: with warm
    starts on, the same recipe and the same numbers for every lineout."""
    from midasflow.io.instprm import instrument_from_midas
    from midasflow.refinement.plan import CakeLayout, LineoutPlan
    from midasflow.stream.tasks import GroupInfo, refine_group_seed, refine_part

    ds = _scan(256, 30.0, 2, seed=5)
    options = RefineOptions(phases=(cubic_phase("CeO2", CEO2_A_A),), instrument=instrument_from_midas(ds),
                            refine_atoms=False, precision="float64")
    assert options.warm_starts()  # the default in float64
    batch = {r.index: r for r in LineoutPlan.of(ds, options, seed_from="group").execute()}
    ctx = LineoutPlan(CakeLayout.of(ds), None, options, NativeBackend(), "group", 20).worker_context(None)
    cakes = ds["intensity"].transpose("group", "r", "eta").values
    streamed = []
    for g, cake in enumerate(cakes):
        info = GroupInfo(g, int(ds["frames_summed"].values[g]), float(ds["omega_deg"].values[g]))
        seed = refine_group_seed(ctx, info, cake)
        for e0 in range(0, cake.shape[1], 5):
            streamed += refine_part(ctx, info, cake, e0, min(e0 + 5, cake.shape[1]), seed).results
    assert len(streamed) == len(batch) and sum(r.recipe == "warm" for r in streamed) >= 0.9 * len(batch)
    for r in streamed:
        b = batch[r.index]
        assert (r.recipe, r.status, r.seeded_from) == (b.recipe, b.status, b.seeded_from)
        assert r.pattern.values == b.pattern.values and r.pattern.esds == b.pattern.esds


@pytest.fixture(scope="module")
def lineouts():
    """Two lineouts of a strained scan, the options and the full fit of the first (a good seed)."""
    ds = _scan(256, 30.0, 1, seed=2)
    cif_phase = cubic_phase("CeO2", CEO2_A_A)
    from midasflow.io.instprm import instrument_from_midas

    options = RefineOptions(phases=(cif_phase,), instrument=instrument_from_midas(ds), refine_atoms=False,
                            precision="float64", warm_start=True)
    specs = [s for s in plan_lineouts(ds) if not s.skipped]
    backend = NativeBackend()
    seed = backend.refine(specs[0], options)
    return backend, options, specs[3], seed


def test_a_refused_warm_fit_falls_back_to_the_full_recipe(lineouts):
    """A warm fit that runs out of cycles is not kept: the lineout gets the whole recipe from the
    seed's values (bit for bit its refinement without warm starts), and its notes say why."""
    backend, options, spec, seed = lineouts
    assert seed_refusal(seed) == ""

    def fit(stages, start):
        return backend.refine(spec, options, start, stages)

    result, recipe = refine_warm(fit, seed, "hist_0000", max_cycles=1)
    assert recipe == "full after warm"
    seeded = backend.refine(spec, options, dict(seed.values))
    assert result.values == seeded.values and result.esds == seeded.esds
    assert result.notes[-1] == ("warm start from hist_0000 refused: not converged; the whole recipe "
                                "from its values instead")
    warm, recipe = refine_warm(fit, seed, "hist_0000")
    assert recipe == "warm" and warm.converged and warm.stage_rwp.keys() == {"warm_cell", "warm"}


def test_what_a_warm_fit_must_show_to_be_kept(lineouts):
    backend, options, spec, seed = lineouts
    warm, _ = backend.refine_warm(spec, options, seed, "group mean")
    assert fallback_reason(warm, seed) == ""
    assert fallback_reason(warm, seed.__class__(**{**seed.__dict__, "gof": warm.gof / (GOF_MARGIN * 1.01)})) \
        .startswith("GOF ")
    flagged = warm.__class__(**{**warm.__dict__, "flags": ("at_bound",)})
    assert fallback_reason(flagged, seed) == "flagged (at_bound)"
    assert seed_refusal(flagged) == "the seed is flagged (at_bound)"
    on_floor = warm.__class__(**{**warm.__dict__, "flags": ("shl_at_floor",)})  # warm starts' regime
    floor_seed = seed.__class__(**{**seed.__dict__, "flags": ("shl_at_floor",)})
    assert fallback_reason(on_floor, seed) == "" and seed_refusal(floor_seed) == ""
    both = warm.__class__(**{**warm.__dict__, "flags": ("shl_at_floor", "at_bound")})
    assert fallback_reason(both, seed) == "flagged (at_bound)"
    failed = warm.__class__(**{**warm.__dict__, "status": "failed", "message": "no peaks"})
    assert fallback_reason(failed, seed) == "failed (no peaks)"
    assert seed_refusal(failed) == "the seed is failed (no peaks)"


@pytest.mark.slow
def test_real_pbso4_minimum_is_flagged_so_it_seeds_no_warm_start():
    """GSAS-II's own PbSO4 lab pattern: its minimum (GSAS-II's too) has X < 0 at the lowest
    angles, flagged unphysical_profile, so it is no good seed: a lineout it seeds is refined with
    every stage from its values, exactly as without warm starts, and the notes say why."""
    x, y, s = np.loadtxt(PBSO4 / "PBSO4_xray.xye").T
    from midasflow.io.instprm import read_instprm

    options = RefineOptions(phases=(read_phase(PBSO4 / "PbSO4.cif"),), instrument=read_instprm(PBSO4 / "PBSO4_xray.instprm"),
                            limits=(16.0, 110.0), refine_atoms=False, precision="float64", warm_start=True)
    spec = LineoutSpec(index=0, group=0, eta_index=0, omega_deg=0.0, eta_deg=0.0, tth_deg=x, intensity=y, sigma=s,
                       frames_summed=1, skipped=False)
    backend = NativeBackend()
    seed = backend.refine(spec, options)
    assert "unphysical_profile" in seed.flags
    noisy = LineoutSpec(**{**spec.__dict__, "intensity": y + np.random.default_rng(5).normal(0.0, s)})
    result, recipe = backend.refine_warm(noisy, options, seed, "hist_0000")
    seeded = backend.refine(noisy, options, dict(seed.values))
    assert recipe == "full" and result.values == seeded.values
    assert result.notes[-1].startswith("no warm start from hist_0000: the seed is flagged (unphysical_profile)")
