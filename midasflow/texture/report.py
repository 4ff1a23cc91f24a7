"""Texture section of the HTML report: the joint fit's coefficients, equal-area pole figures
(measured pole densities and the fitted model) and the coverage of the sample directions.

Figures come from a results Dataset carrying :func:`midasflow.texture.polefigure.add_texture_fit`'s
variables; :func:`texture_figures` returns none otherwise.
"""
from __future__ import annotations

import html
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from midasflow.texture.po import sh_po_design
from midasflow.texture.polefigure import equal_area

__all__ = ["pole_figure_reflections", "texture_figures", "texture_summary_html", "write_texture_report"]

_SIZE = 300
#: Pole figures drawn per phase (the reflections with the most measured points, strongest first).
MAX_POLE_FIGURES = 4
#: A reflection gets a pole figure only if its measured pole densities have a median esd below
#: this (1 = random): reflections overlapping a neighbour within a fraction of the peak width
#: are extracted with huge, anticorrelated errors and would draw noise.
MAX_DENSITY_ESD = 0.1
_GRID = 101
#: Above this many measured points a pole figure or coverage plot is drawn as an image of
#: equal-area cells (:data:`_GRID`² over the disk) instead of one glyph per point, so the page's
#: size does not grow with the scan (103,680 lineouts × 40 reflections would be 4 M glyphs).
MAX_GLYPHS = 20000


def pole_figure_reflections(results: xr.Dataset, cols: np.ndarray) -> list[int]:
    """Columns of ``cols`` to draw pole figures of: those measured with median pole-density esd
    below :data:`MAX_DENSITY_ESD` and a positive median density, the most measured points first,
    then the strongest; at most :data:`MAX_POLE_FIGURES`."""
    dens = results.pole_density.values[..., cols]
    esd = results.pole_density_esd.values[..., cols]
    counts = np.isfinite(dens).sum(axis=(0, 1))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        reliable = (counts > 0) & (np.nanmedian(np.abs(esd), axis=(0, 1)) < MAX_DENSITY_ESD) \
            & (np.nanmedian(dens, axis=(0, 1)) > 0)
        strength = np.nan_to_num(np.nanmedian(results.I.values[..., cols], axis=(0, 1)))
    return [int(cols[i]) for i in np.lexsort((-strength, -counts)) if reliable[i]][:MAX_POLE_FIGURES]


def texture_summary_html(results: xr.Dataset) -> str:
    """Table of the joint texture fits: status, J ± esd, each coefficient ± esd."""
    fits = json.loads(results.attrs.get("texture_fits", "{}"))
    rows = []
    for phase, fit in fits.items():
        j, je = fit["texture_index"]
        coefs = ", ".join(f"{html.escape(n)} = {v:.4f} ± {e:.4f}" for n, (v, e) in fit["coefficients"].items())
        rows.append(f"<tr><td>{html.escape(phase)}</td><td>{html.escape(fit['status'])}</td>"
                    f"<td>{fit['order']}</td><td>{j:.4f} ± {je:.4f}</td><td>{coefs}</td></tr>")
    return ("<h3>Texture (joint spherical-harmonics fit, cylindrical sample symmetry)</h3>"
            "<table border=1 cellpadding=3><tr><th>phase</th><th>status</th><th>order</th>"
            "<th>texture index J</th><th>coefficients C(l,0,n)</th></tr>" + "".join(rows) + "</table>")


def _disk(fig: Any) -> None:
    t = np.linspace(0, 2 * np.pi, 181)
    fig.line(np.cos(t), np.sin(t), color="black")
    fig.axis.visible = False
    fig.grid.visible = False


def _model_image(fit: dict[str, Any], hkl: np.ndarray, info: dict[str, Any]) -> np.ndarray:
    """Fitted pole density of one reflection on the equal-area grid (NaN outside the disk); the
    model is cylindrical about the sample axis, so only the distance from the centre matters."""
    u = np.linspace(-1, 1, _GRID)
    px, py = np.meshgrid(u, u)
    rho2 = px ** 2 + py ** 2
    inside = rho2 <= 1.0
    psi = np.degrees(np.arccos(np.clip(1.0 - rho2 / 2.0, -1.0, 1.0)))  # ψ from the axis
    names = list(fit["coefficients"])
    coef = np.array([v for v, _ in fit["coefficients"].values()])
    D = sh_po_design(np.broadcast_to(hkl, (inside.sum(), 3)), info["cell"], info["laue"], names,
                     psi[inside], info["unique_axis"])
    img = np.full(px.shape, np.nan)
    img[inside] = 1.0 + D @ coef
    return img


def texture_figures(results: xr.Dataset) -> list[Any]:
    """Summary table, per phase up to :data:`MAX_POLE_FIGURES` pole figures (measured | model),
    and the coverage of every measured direction; empty without a texture fit."""
    if "pole_density" not in results or "texture_fits" not in results.attrs:
        return []
    from bokeh.layouts import row
    from bokeh.models import ColorBar, Div, LinearColorMapper
    from bokeh.plotting import figure

    fits = json.loads(results.attrs["texture_fits"])
    info = json.loads(results.attrs.get("texture_phases", "{}"))
    out: list[Any] = [Div(text=texture_summary_html(results), width=900)]
    dens = results.pole_density.values
    dirs = results.pole_direction.values
    ref_phase = results.reflection_phase.values.astype(str)
    for phase, fit in fits.items():
        if phase not in info:
            continue
        axis = fit["sample_axis"]
        cols = np.flatnonzero(ref_phase == phase)
        for c in pole_figure_reflections(results, cols):
            hkl = np.array([int(results.h[c]), int(results.k[c]), int(results.l[c])])
            label = f"{phase} ({hkl[0]} {hkl[1]} {hkl[2]})"
            ok = np.isfinite(dens[..., c])
            px, py = equal_area(dirs[..., c, :][ok], axis)
            model = _model_image(fit, hkl, info[phase])
            values = np.concatenate([dens[..., c][ok], model[np.isfinite(model)]])
            lo, hi = (float(np.nanmin(values)), float(np.nanmax(values))) if values.size else (0.0, 2.0)
            mapper = LinearColorMapper(palette="Viridis256", low=lo, high=max(hi, lo + 1e-6))
            meas = figure(title=f"{label}: measured pole density", width=_SIZE, height=_SIZE,
                          x_range=(-1.05, 1.05), y_range=(-1.05, 1.05), match_aspect=True)
            _disk(meas)
            if px.size > MAX_GLYPHS:
                meas.title.text = f"{label}: measured pole density (cell means of {px.size} points)"
                meas.image(image=[_binned(px, py, dens[..., c][ok])], x=-1, y=-1, dw=2, dh=2,
                           color_mapper=mapper)
            else:
                meas.scatter("x", "y", size=7, source=_source(px, py, dens[..., c][ok]),
                             fill_color={"field": "d", "transform": mapper}, line_color=None)
            fitted = figure(title=f"{label}: fitted model", width=_SIZE + 80, height=_SIZE,
                            x_range=(-1.05, 1.05), y_range=(-1.05, 1.05), match_aspect=True)
            fitted.image(image=[model], x=-1, y=-1, dw=2, dh=2, color_mapper=mapper)
            _disk(fitted)
            fitted.add_layout(ColorBar(color_mapper=mapper, width=10), "right")
            out.append(row(meas, fitted))
        ok = np.all(np.isfinite(dirs[..., cols, :]), axis=-1) & np.isfinite(dens[..., cols])
        px, py = equal_area(dirs[..., cols, :][ok], axis)
        cov = figure(title=f"{phase}: coverage (every measured direction, all reflections)",
                     width=_SIZE, height=_SIZE, x_range=(-1.05, 1.05), y_range=(-1.05, 1.05),
                     match_aspect=True)
        _disk(cov)
        if px.size > MAX_GLYPHS:
            cov.title.text = f"{phase}: coverage (points per cell, {px.size} measured directions)"
            counts = _binned(px, py, None)
            grey = LinearColorMapper(palette="Greys256", low=float(np.nanmax(counts)), high=0.0)
            cov.image(image=[counts], x=-1, y=-1, dw=2, dh=2, color_mapper=grey)
        else:
            cov.scatter(px, py, size=3, alpha=0.5)
        cover = results.pole_coverage.values[cols]
        out.append(row(cov, Div(text=f"<p>Equal-area projection, sample axis {axis} at the centre. "
                                f"Hemisphere coverage per reflection: median {np.nanmedian(cover):.0%}, "
                                f"range {np.nanmin(cover):.0%}–{np.nanmax(cover):.0%}.</p>", width=300)))
    return out


def _binned(px: np.ndarray, py: np.ndarray, values: np.ndarray | None) -> np.ndarray:
    """Equal-area points on the :data:`_GRID`² image of the disk: the mean of ``values`` per
    cell, or (``values`` None) the number of points per cell; NaN where no point fell."""
    ix = np.clip(((px + 1.0) / 2.0 * _GRID).astype(np.int64), 0, _GRID - 1)
    iy = np.clip(((py + 1.0) / 2.0 * _GRID).astype(np.int64), 0, _GRID - 1)
    cell = iy * _GRID + ix  # bokeh images are row-major from the bottom: y rows, x columns
    counts = np.bincount(cell, minlength=_GRID * _GRID).astype(float)
    sums = counts if values is None else np.bincount(cell, weights=values, minlength=_GRID * _GRID)
    with np.errstate(invalid="ignore", divide="ignore"):
        img = sums if values is None else sums / counts
    img = np.where(counts > 0, img, np.nan)
    return img.reshape(_GRID, _GRID)


def _source(px: np.ndarray, py: np.ndarray, d: np.ndarray) -> Any:
    from bokeh.models import ColumnDataSource

    return ColumnDataSource({"x": px, "y": py, "d": d})


def write_texture_report(results: xr.Dataset, path: str | os.PathLike,
                         title: str = "midasflow texture") -> Path:
    """Write :func:`texture_figures` as a self-contained HTML page (Bokeh, inline resources); atomic."""
    from bokeh.io import save
    from bokeh.layouts import column
    from bokeh.models import Div
    from bokeh.resources import INLINE

    from midasflow.io.atomic import atomic_output

    path = Path(path)
    header = Div(text=f"<h2>{html.escape(title)}</h2><p>{html.escape(str(results.attrs.get('data_file', '')))}</p>")
    with atomic_output(path) as tmp:
        save(column(header, *texture_figures(results)), filename=str(tmp), resources=INLINE, title=title)
    return path
