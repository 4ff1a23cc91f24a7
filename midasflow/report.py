"""A self-contained HTML report of a refinement run (Bokeh, inline resources: works offline).

Sections: a numeric summary at the top (quality-flag counts, the cell per phase, the strain
tensor with esds), the cake of the first ω-group (intensity per frame vs 2θ and η), one fitted
lineout per ω-group (observed, calculated, difference), lattice parameter a and Rwp versus η (one
line per ω-group), and per phase the lattice strain versus η with error bars and the
per-ω-group strain fit.
"""
from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from midasflow import strain as strain_mod
from midasflow.io.atomic import atomic_output

_WIDTH, _HEIGHT = 760, 300
#: The ω-groups (the first ones) whose typical lineout the report plots with its fit.
PLOTTED_GROUPS = 12


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


def add_reflection_ticks(fig: Any, positions: dict[str, Any], y_top: float, height: float) -> None:
    """Tick marks at reflection positions (2θ, deg) below a pattern, one row per phase, as
    GSAS-II draws them: a vertical segment from ``y_top`` down by ``height`` per row, and a
    legend entry naming the phase."""
    colors = _palette(len(positions))
    for row, (name, tth) in enumerate(positions.items()):
        tth = np.asarray(tth, dtype=float)
        tth = tth[np.isfinite(tth)]
        if not tth.size:
            continue
        top = y_top - row * 1.5 * height
        fig.segment(x0=tth, x1=tth, y0=np.full(tth.size, top), y1=np.full(tth.size, top - height),
                    color=colors[row], line_width=1.5, legend_label=f"{name} reflections")


def lineout_figure(result: Any) -> Any:
    """Observed (points), calculated (line), background and difference (offset below) of one
    lineout, with tick marks at every phase's reflection positions."""
    from bokeh.plotting import figure

    p = result.pattern
    x, obs, calc, bkg = (np.asarray(v, dtype=float) for v in (p.tth_deg, p.obs, p.calc, p.bkg))
    diff = obs - calc
    span = float(np.nanmax(obs) - np.nanmin(obs))
    offset = float(np.nanmin(obs) - np.nanmax(diff) - 0.05 * span)
    fig = figure(title=f"Lineout {getattr(result, 'name', result.index)}: ω = {result.omega_deg:g}°, η = {result.eta_deg:g}°, "
                       f"Rwp = {p.rwp:.2f}%", width=_WIDTH, height=_HEIGHT,
                 x_axis_label="2θ (deg)", y_axis_label="counts per frame")
    fig.scatter(x, obs, size=3, color="black", legend_label="observed")
    fig.line(x, calc, color="crimson", legend_label="calculated")
    fig.line(x, bkg, color="gray", line_dash="dashed", legend_label="background")
    fig.line(x, diff + offset, color="royalblue", legend_label="obs − calc (offset)")
    inside = {name: [t for t in np.asarray(table.get("tth_deg", ()), dtype=float) if x.min() <= t <= x.max()]
              for name, table in (getattr(p, "reflections", None) or {}).items()} if x.size else {}
    add_reflection_ticks(fig, inside, offset + float(np.nanmin(diff)) - 0.03 * span, 0.04 * span)
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
    """Lattice strain versus η per ω-group with ±1 esd error bars (lineouts left out of the fits
    hollow), and the curve of that group's lab-frame strain fit."""
    from bokeh.models import Whisker
    from bokeh.plotting import ColumnDataSource, figure

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
        esd = np.nan_to_num(np.asarray(results.strain_esd.values[phase, g], dtype=float))
        used = (np.asarray(results.in_strain_fit.values[phase, g], dtype=bool)
                if "in_strain_fit" in results else np.isfinite(eps))
        src = ColumnDataSource({"eta": eta, "eps": eps, "lo": eps - esd, "hi": eps + esd,
                                "fill": np.where(used, colors[g], "white").tolist()})
        fig.scatter("eta", "eps", source=src, color=colors[g], fill_color="fill", size=5,
                    legend_label=_omega_label(results, g))
        fig.add_layout(Whisker(source=src, base="eta", lower="lo", upper="hi", line_color=colors[g]))
        comps = np.asarray(results.strain_lab.values[phase, g], dtype=float)
        if str(results.strain_lab_status.values[phase, g]) != "degenerate" and np.isfinite(comps).any():
            theta = float(np.nanmean(results.strain_theta_deg.values[phase, g]))
            curve = strain_mod.design_matrix(np.full_like(fine, theta), fine) @ np.nan_to_num(comps)
            fig.line(fine, curve, color=colors[g], legend_label=_omega_label(results, g))
    _legend_outside(fig)
    return fig


def _fmt(value: float, esd: float | None = None, digits: int = 6) -> str:
    if not np.isfinite(value):
        return "–"
    if esd is None or not np.isfinite(esd):
        return f"{value:.{digits}g}"
    return f"{value:.{digits}g} ± {esd:.2g}"


def summary_html(results: xr.Dataset) -> str:
    """The report's numeric summary (HTML): quality-flag counts, the cell of every phase over the
    refined lineouts, and the strain tensor (sample frame, else per ω-group) with esds."""
    from midasflow.refinement.result import FLAGS
    from midasflow.results import CELL_VARS, flag_counts

    ok = results.status.values == "ok"
    counts = flag_counts(results)
    excluding = set(json.loads(results.attrs.get("strain_excluding_flags", "[]")))
    rows = "".join(
        f"<tr title='{html.escape(FLAGS[name])}'><td>{name}</td><td>{n}</td>"
        f"<td>{'left out of the strain fits' if name in excluding else 'kept in the strain fits'}</td></tr>"
        for name, n in counts.items())
    flagged = int((results.flags.values.any(axis=-1) & ok).sum()) if "flags" in results else 0
    parts = [f"<h3>Quality flags</h3><p>{flagged} of {int(ok.sum())} refined lineouts carry a flag"
             + (" (strain fits include flagged lineouts)" if not excluding else "") + ".</p>"
             f"<table border='1' cellpadding='3'><tr><th>flag</th><th>lineouts</th><th>strain</th></tr>"
             f"{rows}</table>"]
    labels = ("a (Å)", "b (Å)", "c (Å)", "α (°)", "β (°)", "γ (°)", "V (Å³)")
    cell_rows = []
    for k, name in enumerate(results.phase.values.tolist()):
        vals = [np.asarray(results[v].values[k], dtype=float)[ok] for v in CELL_VARS]
        esds = [np.asarray(results[f"{v}_esd"].values[k], dtype=float)[ok] for v in CELL_VARS]
        if not vals[0].size or not np.isfinite(vals[0]).any():
            continue
        cells = "".join(f"<td>{_fmt(float(np.nanmean(v)))}<br><small>sd {np.nanstd(v):.2g}, median esd "
                        f"{np.nanmedian(e):.2g}</small></td>" for v, e in zip(vals, esds))
        cell_rows.append(f"<tr><td>{html.escape(name)}</td><td>{int(np.isfinite(vals[0]).sum())}</td>{cells}</tr>")
    if cell_rows:
        parts.append("<h3>Cell over the refined lineouts (mean; sd of the lineouts, median esd)</h3>"
                     "<table border='1' cellpadding='3'><tr><th>phase</th><th>lineouts</th>"
                     + "".join(f"<th>{label}</th>" for label in labels) + "</tr>" + "".join(cell_rows)
                     + "</table>")
    comps = results.component.values.tolist() if "component" in results.coords else []
    strain_rows = []
    for k, name in enumerate(results.phase.values.tolist()):
        if "strain_sample" in results and str(results.strain_sample_status.values[k]) != "not run":
            fits = [("sample frame", results.strain_sample.values[k], results.strain_sample_esd.values[k],
                     str(results.strain_sample_status.values[k]))]
        elif "strain_lab" in results:
            fits = [(f"lab, ω = {float(results.omega_deg[g]):g}°", results.strain_lab.values[k, g],
                     results.strain_lab_esd.values[k, g], str(results.strain_lab_status.values[k, g]))
                    for g in range(results.sizes["group"])
                    if str(results.strain_lab_status.values[k, g]) != "not run"]
        else:
            fits = []
        used = int(results.in_strain_fit.values[k].sum()) if "in_strain_fit" in results else 0
        for label, values, esds, status in fits:
            cells = "".join(f"<td>{_fmt(float(v), float(e), 4)}</td>" for v, e in zip(values, esds))
            strain_rows.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(label)}</td>"
                               f"<td>{html.escape(status)}</td><td>{used}</td>{cells}</tr>")
    if strain_rows:
        parts.append("<h3>Strain tensor (esd from the lineouts' esds)</h3><table border='1' cellpadding='3'>"
                     "<tr><th>phase</th><th>frame</th><th>fit</th><th>lineouts</th>"
                     + "".join(f"<th>ε<sub>{c}</sub></th>" for c in comps) + "</tr>" + "".join(strain_rows)
                     + "</table>")
    return "".join(parts)


def _representative(lineouts: Sequence[Any], group: int) -> Any | None:
    ok = [r for r in lineouts if r.group == group and r.status == "ok" and r.pattern is not None
          and len(r.pattern.obs)]  # a run keeps the curves of the plotted groups only
    if not ok:
        return None
    ok.sort(key=lambda r: (r.pattern.rwp, r.index))
    return ok[len(ok) // 2]  # median Rwp: a typical lineout


def report_figures(results: xr.Dataset, *, caked: xr.Dataset | None = None,
                   lineouts: Sequence[Any] = (), max_groups: int = PLOTTED_GROUPS) -> list[Any]:
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
    from midasflow.texture.report import texture_figures

    figs += texture_figures(results)  # the joint texture fit, when one was made
    return figs


def write_report(
    results: xr.Dataset,
    path: str | os.PathLike,
    *,
    caked: xr.Dataset | None = None,
    lineouts: Sequence[Any] = (),
    title: str = "midasflow refinement report",
    max_groups: int = PLOTTED_GROUPS,
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
    summary = Div(text=summary_html(results), width=_WIDTH + 240)
    layout = column(header, summary, *report_figures(results, caked=caked, lineouts=lineouts, max_groups=max_groups))
    with atomic_output(path) as tmp:
        save(layout, filename=str(tmp), resources=INLINE, title=title)
    return path
