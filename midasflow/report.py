"""A self-contained HTML report of a refinement run (Bokeh, inline resources: works offline).

Sections: the cake of the first ω-group (intensity per frame vs 2θ and η), one fitted lineout per
ω-group (observed, calculated, difference), lattice parameter a and Rwp versus η (one line per
ω-group), and per phase the lattice strain versus η with the per-ω-group strain fit.
"""
from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from midasflow import strain as strain_mod
from midasflow.io.atomic import atomic_output

_WIDTH, _HEIGHT = 760, 300


def _palette(n: int) -> list[str]:
    from bokeh.palettes import Category10_10, Turbo256

    if n <= 10:
        return list(Category10_10[:max(n, 1)])
    return [Turbo256[int(i)] for i in np.linspace(20, 235, n)]


def _legend_outside(fig: Any) -> None:
    """Move the legend to the right of the plot (one entry per ω-group; click hides a group)."""
    if fig.legend:
        legend = fig.legend[0]
        legend.click_policy = "hide"
        fig.center.remove(legend)
        fig.add_layout(legend, "right")


def _omega_label(results: xr.Dataset, g: int) -> str:
    return f"ω = {float(results.omega_deg[g]):g}°"


def cake_figure(caked: xr.Dataset, group: int = 0) -> Any:
    """Image of the intensity per frame (``intensity / frames_summed``) of one ω-group, 2θ × η."""
    from bokeh.models import ColorBar, LinearColorMapper
    from bokeh.plotting import figure

    inten = caked["intensity"].isel(group=group).transpose("r", "eta")
    img = np.asarray(inten.values, dtype=float) / float(caked["frames_summed"].values[group])
    tth = np.asarray(caked["tth_deg"].values, dtype=float).reshape(img.shape[0], -1)[:, 0]
    eta = np.asarray(caked["eta_deg"].values, dtype=float)
    d_tth = (tth[-1] - tth[0]) / max(len(tth) - 1, 1)
    d_eta = (eta[-1] - eta[0]) / max(len(eta) - 1, 1) if len(eta) > 1 else 1.0
    finite = img[np.isfinite(img)]
    lo, hi = (np.percentile(finite, [1, 99.5]) if finite.size else (0.0, 1.0))
    mapper = LinearColorMapper(palette="Viridis256", low=float(lo), high=float(max(hi, lo + 1e-12)),
                               nan_color="lightgray")
    omega = float(caked["omega_deg"].values[group]) if "omega_deg" in caked.variables else float("nan")
    fig = figure(title=f"Cake: intensity per frame, ω-group {group} (ω = {omega:g}°)", width=_WIDTH,
                 height=_HEIGHT + 60, x_axis_label="2θ (deg)", y_axis_label="η (deg)",
                 x_range=(tth[0] - d_tth / 2, tth[-1] + d_tth / 2),
                 y_range=(eta[0] - d_eta / 2, eta[-1] + d_eta / 2))
    fig.image(image=[img.T], x=tth[0] - d_tth / 2, y=eta[0] - d_eta / 2, dw=tth[-1] - tth[0] + d_tth,
              dh=eta[-1] - eta[0] + d_eta, color_mapper=mapper)
    fig.add_layout(ColorBar(color_mapper=mapper, title="counts/px/frame"), "right")
    return fig


def lineout_figure(result: Any) -> Any:
    """Observed (points), calculated (line), background and difference (offset below) of one lineout."""
    from bokeh.plotting import figure

    p = result.pattern
    x, obs, calc, bkg = (np.asarray(v, dtype=float) for v in (p.tth_deg, p.obs, p.calc, p.bkg))
    diff = obs - calc
    offset = float(np.nanmin(obs) - np.nanmax(diff) - 0.05 * (np.nanmax(obs) - np.nanmin(obs)))
    fig = figure(title=f"Lineout {result.index}: ω = {result.omega_deg:g}°, η = {result.eta_deg:g}°, "
                       f"Rwp = {p.rwp:.2f}%", width=_WIDTH, height=_HEIGHT,
                 x_axis_label="2θ (deg)", y_axis_label="counts per frame")
    fig.scatter(x, obs, size=3, color="black", legend_label="observed")
    fig.line(x, calc, color="crimson", legend_label="calculated")
    fig.line(x, bkg, color="gray", line_dash="dashed", legend_label="background")
    fig.line(x, diff + offset, color="royalblue", legend_label="obs − calc (offset)")
    fig.legend.location = "top_right"
    fig.legend.click_policy = "hide"
    return fig


def versus_eta_figure(results: xr.Dataset, var: str, title: str, y_label: str, *, phase: int | None = None) -> Any:
    """``var`` versus η, one line per ω-group (error bars from ``<var>_esd`` when present)."""
    from bokeh.models import Whisker
    from bokeh.plotting import ColumnDataSource, figure

    fig = figure(title=title, width=_WIDTH, height=_HEIGHT, x_axis_label="η (deg)", y_axis_label=y_label)
    colors = _palette(results.sizes["group"])
    eta = np.asarray(results.eta_deg.values, dtype=float)
    for g in range(results.sizes["group"]):
        sel = {"group": g} if phase is None else {"group": g, "phase": phase}
        y = np.asarray(results[var].isel(sel).values, dtype=float)
        if not np.isfinite(y).any():
            continue
        esd = (np.asarray(results[f"{var}_esd"].isel(sel).values, dtype=float)
               if f"{var}_esd" in results else np.zeros_like(y))
        src = ColumnDataSource({"eta": eta, "y": y, "lo": y - esd, "hi": y + esd})
        fig.line("eta", "y", source=src, color=colors[g], legend_label=_omega_label(results, g))
        fig.scatter("eta", "y", source=src, color=colors[g], size=4)
        if np.nanmax(esd) > 0:
            fig.add_layout(Whisker(source=src, base="eta", lower="lo", upper="hi", line_color=colors[g]))
    _legend_outside(fig)
    return fig


def strain_figure(results: xr.Dataset, phase: int) -> Any:
    """Lattice strain versus η per ω-group, with the curve of that group's lab-frame strain fit."""
    from bokeh.plotting import figure

    name = str(results.phase.values[phase])
    fig = figure(title=f"Strain vs η ({name}): ε and the per-ω-group tensor fit", width=_WIDTH,
                 height=_HEIGHT, x_axis_label="η (deg)", y_axis_label="lattice strain ε")
    colors = _palette(results.sizes["group"])
    eta = np.asarray(results.eta_deg.values, dtype=float)
    fine = np.linspace(-180.0, 180.0, 361)
    for g in range(results.sizes["group"]):
        eps = np.asarray(results.strain.values[phase, g], dtype=float)
        if not np.isfinite(eps).any():
            continue
        fig.scatter(eta, eps, color=colors[g], size=5, legend_label=_omega_label(results, g))
        comps = np.asarray(results.strain_lab.values[phase, g], dtype=float)
        if str(results.strain_lab_status.values[phase, g]) != "degenerate" and np.isfinite(comps).any():
            theta = float(np.nanmean(results.strain_theta_deg.values[phase, g]))
            curve = strain_mod.design_matrix(np.full_like(fine, theta), fine) @ np.nan_to_num(comps)
            fig.line(fine, curve, color=colors[g], legend_label=_omega_label(results, g))
    _legend_outside(fig)
    return fig


def _representative(lineouts: Sequence[Any], group: int) -> Any | None:
    ok = [r for r in lineouts if r.group == group and r.status == "ok" and r.pattern is not None]
    if not ok:
        return None
    ok.sort(key=lambda r: (r.pattern.rwp, r.index))
    return ok[len(ok) // 2]  # median Rwp: a typical lineout


def report_figures(results: xr.Dataset, *, caked: xr.Dataset | None = None,
                   lineouts: Sequence[Any] = (), max_groups: int = 12) -> list[Any]:
    """The report's figures, in order (see module docstring)."""
    figs: list[Any] = []
    if caked is not None:
        figs.append(cake_figure(caked, 0))
    for g in range(min(results.sizes["group"], max_groups)):
        rep = _representative(lineouts, g)
        if rep is not None:
            figs.append(lineout_figure(rep))
    for k, name in enumerate(results.phase.values.tolist()):
        figs.append(versus_eta_figure(results, "a_a", f"Lattice parameter a vs η ({name})", "a (Å)", phase=k))
    figs.append(versus_eta_figure(results, "rwp", "Rwp vs η", "Rwp (%)"))
    for k in range(results.sizes["phase"]):
        if np.isfinite(results.strain.values[k]).any():
            figs.append(strain_figure(results, k))
    return figs


def write_report(
    results: xr.Dataset,
    path: str | os.PathLike,
    *,
    caked: xr.Dataset | None = None,
    lineouts: Sequence[Any] = (),
    title: str = "midasflow refinement report",
    max_groups: int = 12,
) -> Path:
    """Write the HTML report (Bokeh, resources inline so it opens offline); atomic.

    Parameters
    ----------
    results : xarray.Dataset
        From :func:`midasflow.results.assemble_results`.
    path : path
        Output ``.html``.
    caked : xarray.Dataset, optional
        The caked scan, for the cake image of the first ω-group.
    lineouts : sequence of LineoutResult
        For the fitted-lineout plots (one per ω-group, the median-Rwp lineout).
    title : str
        Plain text (escaped, like the data file name, before it enters the HTML).
    max_groups : int
        At most this many ω-groups get a lineout plot.

    Returns
    -------
    Path
    """
    from bokeh.io import save
    from bokeh.layouts import column
    from bokeh.models import Div
    from bokeh.resources import INLINE

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    status = results.status.values
    # a Div's text is HTML: user-provided strings (file names, titles) go in escaped
    header = Div(text=(f"<h2>{html.escape(title)}</h2><p>{html.escape(str(results.attrs.get('data_file', '')))}: "
                       f"{int((status == 'ok').sum())} refined, {int((status == 'failed').sum())} failed, "
                       f"{int((status == 'skipped').sum())} skipped lineouts "
                       f"({results.sizes['group']} ω-groups × {results.sizes['eta']} η).</p>"), width=_WIDTH)
    layout = column(header, *report_figures(results, caked=caked, lineouts=lineouts, max_groups=max_groups))
    with atomic_output(path) as tmp:
        save(layout, filename=str(tmp), resources=INLINE, title=title)
    return path
