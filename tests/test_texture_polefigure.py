"""Pole figures and the joint texture fit (midasflow.texture.polefigure), the simulator's fibre
textures (midasflow.texture.fiber) and a textured scan refined end to end."""
import json

import numpy as np
import pytest

from midasflow.crystal import cubic_phase, phase_from_cell
from midasflow.texture.fiber import FiberTexture
from midasflow.texture.po import sh_po_design
from midasflow.texture.polefigure import (coverage_map, equal_area, fit_joint_texture,
                                          sample_directions)

CEO2 = cubic_phase("CeO2", 5.4117)
HKL = np.array([(1, 1, 1), (2, 0, 0), (2, 2, 0), (3, 1, 1), (2, 2, 2), (4, 0, 0), (3, 3, 1), (4, 2, 0)])


def test_sample_direction_is_the_strain_scattering_vector_turned_by_omega():
    y = sample_directions(10.0, 90.0, 0.0)
    np.testing.assert_allclose(y, [-np.sin(np.radians(5)), -np.cos(np.radians(5)), 0.0], atol=1e-12)
    # ω = 90° about +z: the lab −y direction is the sample +x direction (y = Rz(ω)ᵀ n)
    np.testing.assert_allclose(sample_directions(0.0, 90.0, 90.0), [-1.0, 0.0, 0.0], atol=1e-12)
    px, py = equal_area(np.array([[0, 0, 1.0], [1.0, 0, 0], [0, 0, -1.0]]))
    np.testing.assert_allclose(np.hypot(px, py), [0.0, 1.0, 0.0], atol=1e-12)


@pytest.mark.slow
def test_fibre_march_dollase_along_the_axis_is_gsas2s_factor():
    # at χ = 0 the fibre pole density is GSAS-II's March–Dollase factor (GetPrefOri, r = 0.8, 001)
    tex = FiberTexture("md", md_ratio=0.8)
    dens = tex.pole_density(CEO2, HKL[:4], np.array([0.0, 0.0, 1.0]))
    np.testing.assert_allclose(dens, [0.93387212, 1.12806950, 0.96422044, 1.02289667], rtol=1e-6)
    # the average over the sphere of any pole density is 1 (normalised ODF)
    rng = np.random.default_rng(0)
    u = rng.normal(size=(4000, 1, 3))
    u /= np.linalg.norm(u, axis=-1, keepdims=True)
    assert tex.pole_density(CEO2, HKL[:3], u).mean(axis=0) == pytest.approx(np.ones(3), abs=0.03)


def _synthetic(coef, *, seed=0, noise=0.01, n_eta=36, omegas=(0.0, 45.0, 90.0)):
    tth = 2 * np.degrees(np.arcsin(0.173 / (2 * 5.4117 / np.sqrt((HKL ** 2).sum(1)))))
    eta = np.arange(n_eta) * 360.0 / n_eta - 180 + 5
    y = sample_directions(tth[None, None, :], eta[None, :, None], np.array(omegas)[:, None, None])
    tex = FiberTexture("sh", sample_axis=(1.0, 0.0, 0.0), coefficients=coef)
    s = np.linspace(1000, 5000, len(HKL))
    I0 = s * tex.pole_density(CEO2, HKL, y)
    rng = np.random.default_rng(seed)
    esd = noise * I0 + 1.0
    return I0 + rng.normal(size=I0.shape) * esd, esd, y


def test_joint_fit_recovers_coefficients_and_texture_index():
    coef = {"C(4,1)": 0.5, "C(6,1)": -0.3}
    I, esd, y = _synthetic(coef)
    fit = fit_joint_texture(I, esd, y, HKL, CEO2.cell, "m3m", order=6, sample_axis=(1, 0, 0))
    assert fit.status == "ok" and fit.names == ["C(4,0,1)", "C(6,0,1)"]
    for v, e, t in zip(fit.values, fit.esds, coef.values()):
        assert abs(v - t) < 3 * e and e < 0.02
    assert abs(fit.texture_index - 1.0347009) < 3 * fit.texture_index_esd
    assert 0.7 < fit.gof < 1.3


def test_joint_fit_untextured_gives_j_one():
    I, esd, y = _synthetic({"C(4,1)": 0.0}, seed=4)
    fit = fit_joint_texture(I, esd, y, HKL, CEO2.cell, "m3m", order=8, sample_axis=(1, 0, 0))
    assert fit.status == "ok"
    assert abs(fit.texture_index - 1.0) < 3 * fit.texture_index_esd + 1e-4
    assert np.all(np.abs(fit.values) < 3 * fit.esds)


def test_joint_fit_flags_what_the_coverage_cannot_tell():
    # one ω and the fibre axis along the beam: every direction of a reflection is at the same ψ
    # (cos ψ = sin θ), so K_l^0(ψ) is fixed and one reflection's scale and C are inseparable
    I, esd, y = _synthetic({"C(4,1)": 0.3}, omegas=(0.0,))
    fit = fit_joint_texture(I[..., :1], esd[..., :1], y[..., :1, :], HKL[:1], CEO2.cell, "m3m",
                            order=4, sample_axis=(1, 0, 0))
    assert fit.status in ("ill-conditioned", "no data")
    assert not np.isfinite(fit.texture_index_esd)


def test_joint_fit_says_when_it_stopped_short_or_failed(monkeypatch):
    """A fit cut off before χ² stops falling is 'not converged', never 'ok'; a failure of the
    linear algebra is the fit's status with NaN values, not an exception after every lineout."""
    I, esd, y = _synthetic({"C(4,1)": 0.5, "C(6,1)": -0.3})
    cut = fit_joint_texture(I, esd, y, HKL, CEO2.cell, "m3m", order=6, sample_axis=(1, 0, 0), max_iter=1)
    assert cut.status == "not converged" and "still falling after 1" in cut.notes[0]
    full = fit_joint_texture(I, esd, y, HKL, CEO2.cell, "m3m", order=6, sample_axis=(1, 0, 0))
    assert full.status == "ok" and not full.notes

    def broken(*args, **kwargs):
        raise np.linalg.LinAlgError("SVD did not converge")

    monkeypatch.setattr(np.linalg, "svd", broken)
    failed = fit_joint_texture(I, esd, y, HKL, CEO2.cell, "m3m", order=6, sample_axis=(1, 0, 0))
    assert failed.status == "failed: SVD did not converge"
    assert np.isnan(failed.values).all() and np.isnan(failed.texture_index)


@pytest.mark.slow
def test_joint_fit_holds_one_block_of_the_jacobian_not_all_of_it():
    """The fit reduces the Jacobian block by block (QR): any block size gives the same fit, and
    its peak memory is at least a whole Jacobian below that of one block of every row (at
    103,680 lineouts × 40 reflections a whole Jacobian is 1.5 GB)."""
    import tracemalloc

    coef = {"C(4,1)": 0.5, "C(6,1)": -0.3}
    I, esd, y = _synthetic(coef, n_eta=360, omegas=tuple(np.arange(0.0, 180.0, 18.0)))
    args = (I, esd, y, HKL, CEO2.cell, "m3m")

    def fit_and_peak(row_block):
        tracemalloc.start()
        fit = fit_joint_texture(*args, order=6, sample_axis=(1, 0, 0), row_block=row_block)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return fit, peak

    whole, peak_whole = fit_and_peak(10 ** 9)
    blocked, peak = fit_and_peak(1024)
    few = (I[:3, :12], esd[:3, :12], y[:3, :12], HKL, CEO2.cell, "m3m")
    tiny = fit_joint_texture(*few, order=6, sample_axis=(1, 0, 0), row_block=5)  # < columns
    tiny_whole = fit_joint_texture(*few, order=6, sample_axis=(1, 0, 0))
    assert whole.status == blocked.status == tiny.status == tiny_whole.status == "ok"
    np.testing.assert_allclose(tiny.values, tiny_whole.values, rtol=1e-9)
    for a, b in ((whole.values, blocked.values), (whole.esds, blocked.esds),
                 (whole.scales, blocked.scales), (whole.scales_esd, blocked.scales_esd)):
        np.testing.assert_allclose(a, b, rtol=1e-9)
    assert blocked.chi2 == pytest.approx(whole.chi2, rel=1e-12)
    rows = I.size
    dense_jacobian = rows * (len(HKL) + len(blocked.names)) * 8
    assert peak + dense_jacobian < peak_whole, (peak, dense_jacobian, peak_whole)


def test_coverage_map_counts_hemisphere_cells():
    y = sample_directions(np.full(36, 10.0), np.arange(36) * 10.0, 0.0)
    cov = coverage_map(y)
    assert cov.sum() == 36 and 0 < np.count_nonzero(cov) < cov.size


def test_hexagonal_texture_design_matches_gsas2_values():
    hexa = phase_from_cell("Mg", (3.21, 3.21, 5.21, 90, 90, 120), "P 63/m m c")
    D = sh_po_design(np.array([(1, 0, 0), (0, 0, 2)]), hexa.cell, hexa.laue, ["C(2,0,0)", "C(4,0,0)"], 90.0)
    np.testing.assert_allclose(1 + D @ [0.4, -0.2], [1.07187504, 0.72500000], atol=2e-6)


@pytest.mark.slow
def test_textured_scan_refined_end_to_end(tmp_path):
    from midasflow.crystal import write_phase_cif
    from midasflow.pipeline import refine
    from midasflow.results import open_results
    from midasflow.simulate import CEO2_A_A, ceo2_params, simulate_caked
    from midasflow.texture.polefigure import add_texture_fit

    phase = cubic_phase("CeO2", CEO2_A_A)
    cif = write_phase_cif(phase, tmp_path / "ceo2.cif")
    params = ceo2_params((256, 256), eta_bin_deg=20.0, omega_step_deg=45.0)
    truth = {"C(4,1)": 0.6, "C(6,1)": -0.3}
    tex = FiberTexture("sh", sample_axis=(0.0, 0.0, 1.0), coefficients=truth)
    ds, sim = simulate_caked(params, phase, n_groups=2, texture=tex, counts=4000.0, seed=2)
    res = refine(ds, [cif], out=tmp_path / "out", refine_atoms=False, texture="sh", sh_order=6,
                 report=False, export=False)
    assert "I" in res and res.sizes["reflection"] >= 5
    fits = json.loads(res.attrs["texture_fits"])[str(res.texture_phase.values[0])]
    assert fits["status"] == "ok"
    for name, t in (("C(4,0,1)", 0.6), ("C(6,0,1)", -0.3)):
        v, e = fits["coefficients"][name]
        assert abs(v - t) < 3 * e, (name, v, e)
    # the pole figure of (200) peaks where the fibre axis points (sample z: η = 0 and 180°)
    i200 = int(np.flatnonzero((res.h.values == 2) & (res.k.values == 0) & (res.l.values == 0))[0])
    dens = res.pole_density.isel(reflection=i200)
    psi = np.degrees(np.arccos(np.abs(res.pole_direction.isel(reflection=i200).sel(xyz="z"))))
    top = np.nanargmax(dens.values.ravel())
    assert psi.values.ravel()[top] < 20.0
    # the texture command refits from the store alone
    from midasflow.cli import main

    assert main(["texture", "--results", str(tmp_path / "out"), "--sh-order", "8", "--no-progress"]) == 0
    again = json.loads(open_results(tmp_path / "out" / "results.zarr").attrs["texture_fits"])
    assert again[str(res.texture_phase.values[0])]["order"] == 8
    assert (tmp_path / "out" / "texture.html").stat().st_size > 10000
    # a misspelt phase is named, not dropped (fitting the others as if it were not asked for)
    name = str(res.texture_phase.values[0])
    with pytest.raises(ValueError, match=rf"phase '{name}x' not in these results \(phases with reflections: {name}\)"):
        add_texture_fit(res, order=6, phases=[name, f"{name}x"])
    # untextured: J within 3 esd of 1 from the same store refitted
    ds0, _ = simulate_caked(params, phase, n_groups=2, counts=4000.0, seed=3)
    res0 = refine(ds0, [cif], out=tmp_path / "out0", refine_atoms=False, report=False, export=False)
    fit0 = add_texture_fit(res0, order=6)
    j, je = float(fit0.texture_index[0]), float(fit0.texture_index_esd[0])
    assert abs(j - 1.0) < 3 * je, (j, je)


def test_texture_command_refuses_bad_input(tmp_path, capsys):
    from midasflow.cli import main

    assert main(["texture", "--results", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no results store" in err[0]
    (tmp_path / "results.zarr").mkdir()
    assert main(["texture", "--results", str(tmp_path), "--sh-order", "14"]) == 2
    assert "--sh-order 14" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_texture_runs_end_to_end(tmp_path, capsys):
    from midasflow.cli import main

    assert main(["demo", "--texture", "--out", str(tmp_path / "d"), "--size", "192", "--eta-bin", "30",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split(":")[0].split()[-1]: ln for ln in out.splitlines() if "(simulated" in ln}
    for name, true in (("C(4,0,1)", 0.6), ("C(6,0,1)", -0.3)):
        value, esd = (float(v) for v in lines[name].split(":")[1].split("(")[0].split("±"))
        assert abs(value - true) < 3 * esd + 0.01, lines[name]
    assert "pole density" in (tmp_path / "d" / "refinement" / "report.html").read_text()


@pytest.mark.slow
def test_march_dollase_fibre_scan_refines_to_its_ratio(tmp_path):
    """A March–Dollase fibre about sample z: the lineouts whose scattering vector lies near the
    fibre axis (η ≈ ±180°, χ ≈ 5°) refine the simulated r within 3 esd."""
    from midasflow.crystal import write_phase_cif
    from midasflow.pipeline import refine
    from midasflow.simulate import CEO2_A_A, ceo2_params, simulate_caked

    phase = cubic_phase("CeO2", CEO2_A_A)
    cif = write_phase_cif(phase, tmp_path / "ceo2.cif")
    params = ceo2_params((256, 256), eta_bin_deg=10.0)
    ds, _ = simulate_caked(params, phase, n_groups=1, counts=4000.0, seed=5,
                           texture=FiberTexture("md", md_ratio=0.8, md_axis=(0, 0, 1)))
    res = refine(ds, [cif], out=tmp_path / "out", refine_atoms=False, texture="md", report=False,
                 export=False)
    near = np.flatnonzero(np.abs(np.abs(res.eta_deg.values) - 175.0) < 1.0)
    r = res.po_param.sel(po_name="MD").values[0, 0, near]
    e = res.po_param_esd.sel(po_name="MD").values[0, 0, near]
    assert near.size == 2 and np.all(np.abs(r - 0.8) < 3 * e) and np.all(e < 0.02), (r, e)


def test_pole_figures_are_drawn_only_for_reliably_extracted_reflections():
    """A reflection overlapping a neighbour is extracted with huge, anticorrelated errors (the
    textured demo's 533/622: densities ±400 with esds ~200): it gets no pole figure even though it
    has the most measured points; the others come by measured points, then strength."""
    import xarray as xr

    from midasflow.texture.report import MAX_POLE_FIGURES, pole_figure_reflections

    rng = np.random.default_rng(0)
    shape = (2, 6, 6)
    dens = 1.0 + 0.1 * rng.normal(size=shape)
    esd = np.full(shape, 0.02)
    dens[..., 0], esd[..., 0] = 300.0 * rng.normal(size=shape[:2]), 150.0     # overlapped: noise
    dens[0, 0, 1:3] = np.nan                                                    # fewer points
    dens[..., 5] = -1.0                                                         # negative densities
    intensity = np.broadcast_to([1e5, 9e4, 1e3, 5e4, 2e4, 3e4], shape).copy()
    ds = xr.Dataset({"pole_density": (("group", "eta", "reflection"), dens),
                     "pole_density_esd": (("group", "eta", "reflection"), esd),
                     "I": (("group", "eta", "reflection"), intensity)})
    assert pole_figure_reflections(ds, np.arange(6)) == [3, 4, 1, 2][:MAX_POLE_FIGURES]
    assert pole_figure_reflections(ds, np.array([0, 5])) == []


def test_nearly_singular_joint_fit_is_ill_conditioned_not_ok():
    """One ω-group with η = ±45°, ±135° and the sample axis z: every lineout sees a reflection at
    the same ψ but for its own small 2θ shift, so the coefficients barely separate from the
    reflections' scales. Was reported 'ok' with C = 0 ± 1e4 and J = 1 ± 0."""
    tth = 2 * np.degrees(np.arcsin(0.173 / (2 * 5.4117 / np.sqrt((HKL ** 2).sum(1)))))
    rng = np.random.default_rng(0)
    seen = tth[None, None, :] * (1 + 3e-4 * rng.normal(size=(1, 4, len(HKL))))
    y = sample_directions(seen, np.array([-135.0, -45.0, 45.0, 135.0])[None, :, None], 0.0)
    I0 = np.broadcast_to(np.linspace(1000, 5000, len(HKL)), y.shape[:-1])
    esd = 0.01 * I0 + 1.0
    fit = fit_joint_texture(I0 + rng.normal(size=I0.shape) * esd, esd, y, HKL, CEO2.cell, "m3m", order=6,
                            sample_axis=(0, 0, 1))
    assert fit.status == "ill-conditioned" and "not determined (esd > 1)" in fit.notes[-1]
    assert np.isnan(fit.esds).all() and np.isnan(fit.texture_index_esd)


def _results_for_pole_figures(n_eta, omegas):
    """A results Dataset with per-lineout intensities of a textured CeO2 (the simulator's fibre),
    as refine writes them, with its joint texture fit."""
    import json as _json

    import xarray as xr

    from midasflow.texture.polefigure import add_texture_fit

    I, esd, y = _synthetic({"C(4,1)": 0.5, "C(6,1)": -0.3}, n_eta=n_eta, omegas=omegas)
    gerh = ("group", "eta", "reflection")
    ds = xr.Dataset(
        {"I": (gerh, I), "I_esd": (gerh, esd), "pole_direction": ((*gerh, "xyz"), y),
         "h": ("reflection", HKL[:, 0]), "k": ("reflection", HKL[:, 1]), "l": ("reflection", HKL[:, 2]),
         "reflection_phase": ("reflection", np.array(["CeO2"] * len(HKL)))},
        attrs={"texture_phases": _json.dumps({"CeO2": {"cell": list(CEO2.cell), "laue": "m3m",
                                                        "unique_axis": "b"}})})
    return add_texture_fit(ds, order=6, sample_axis=(1, 0, 0))


@pytest.mark.slow
def test_pole_figures_of_a_large_scan_are_binned_images_not_a_glyph_per_point(tmp_path):
    """Past MAX_GLYPHS measured points a pole figure's measured densities and the coverage plot are
    equal-area cell images, so the page does not grow with the scan; a small scan keeps a glyph
    per point. The binned image holds the cell means of the densities."""
    from bokeh.models import GlyphRenderer, Image, Scatter

    from midasflow.texture import report

    def glyphs(figs):
        kinds = []
        for fig in figs:
            for child in getattr(fig, "children", [fig]):
                kinds += [type(r.glyph) for r in getattr(child, "renderers", [])
                          if isinstance(r, GlyphRenderer)]
        return kinds

    small = _results_for_pole_figures(36, (0.0, 45.0, 90.0))
    kinds = glyphs(report.texture_figures(small))
    assert Scatter in kinds and kinds.count(Image) == kinds.count(Scatter) - 1  # models + coverage
    large = _results_for_pole_figures(5400, (0.0, 45.0, 90.0, 135.0))
    assert np.isfinite(large.pole_density.values[..., 0]).sum() > report.MAX_GLYPHS
    kinds = glyphs(report.texture_figures(large))
    assert Scatter not in kinds and Image in kinds
    small_html = report.write_texture_report(small, tmp_path / "small.html").stat().st_size
    large_html = report.write_texture_report(large, tmp_path / "large.html").stat().st_size
    assert large_html < 2 * small_html, (small_html, large_html)  # 100× the points
    # the cell image is the mean of the densities in each cell
    d = large.pole_density.values[..., 0]
    ok = np.isfinite(d)
    px, py = equal_area(large.pole_direction.values[..., 0, :][ok], (1, 0, 0))
    img = report._binned(px, py, d[ok])
    ix = np.clip(((px + 1) / 2 * report._GRID).astype(int), 0, report._GRID - 1)
    iy = np.clip(((py + 1) / 2 * report._GRID).astype(int), 0, report._GRID - 1)
    pick = (iy == iy[0]) & (ix == ix[0])
    assert img[iy[0], ix[0]] == pytest.approx(d[ok][pick].mean(), rel=1e-12)
    assert np.isfinite(img).sum() == np.unique(iy * report._GRID + ix).size
