"""The Bokeh HTML report is written, self-contained, with the expected figures."""
import html as html_module
import json
import re
from html.parser import HTMLParser

from midasflow.refinement.lineouts import plan_lineouts, run_serial
from midasflow.report import report_figures, write_report
from midasflow.results import assemble_results

from lineouts_helpers import A0_A, TOY_OPTIONS, ToyBackend, make_caked


def test_report_written_with_expected_figures(tmp_path):
    caked = make_caked(n_groups=2, n_eta=12, omega_step=90.0, height=2000.0, masked=[(0, 3)])
    lineouts = run_serial(plan_lineouts(caked), TOY_OPTIONS, backend=ToyBackend())
    results = assemble_results(lineouts, ref_cells={"CeO2": (A0_A,) * 3 + (90.0,) * 3},
                               attrs={"data_file": "demo.zarr.zip"})
    figs = report_figures(results, caked=caked, lineouts=lineouts)
    titles = [f.title.text for f in figs]
    assert titles[0].startswith("Cake: intensity per frame, ω-group 0")
    assert sum(t.startswith("Lineout ") for t in titles) == 2  # one per ω-group
    assert "Lattice parameter a vs η (CeO2)" in titles and "Rwp vs η" in titles
    assert any(t.startswith("Strain vs η (CeO2)") for t in titles)

    path = write_report(results, tmp_path / "report.html", caked=caked, lineouts=lineouts)
    html = path.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    assert "cdn.bokeh.org" not in html  # inline resources: opens offline
    docs = re.search(r'<script type="application/json" id="[^"]+">\s*(.*?)\s*</script>', html, re.S)
    text = json.dumps(json.loads(docs.group(1)), ensure_ascii=False)
    for t in ("Quality flags", "Cell over the refined lineouts", "Strain tensor", "Cake: intensity per frame",
              "Lattice parameter a vs", "Rwp vs", "Strain vs", "demo.zarr.zip",
              "23 refined, 0 failed, 1 skipped"):
        assert t in text, t
    assert not list(tmp_path.glob(".*.tmp"))
    # at the top, before any figure: the header, then the numeric tables (flags, cell, strain tensor)
    [root] = next(iter(json.loads(docs.group(1)).values()))["roots"]
    children = root["attributes"]["children"]
    assert [c["name"] for c in children[:3]] == ["Div", "Div", "Figure"]
    tables = _Tables()
    tables.feed(html_module.unescape(children[1]["attributes"]["text"]))
    flags, cell, tensor = tables.rows
    from midasflow.refinement.result import FLAGS
    assert [row[0] for row in flags[1:]] == list(FLAGS) and all(row[1] == "0" for row in flags[1:])
    assert cell[1][:2] == ["CeO2", "23"] and cell[1][2].startswith(f"{results.a_a.values[0][results.status.values == 'ok'].mean():.6g}")
    assert tensor[0][4:] == [f"ε{c}" for c in results.component.values]
    assert tensor[1][:3] == ["CeO2", "sample frame", "ok"] and all("±" in v for v in tensor[1][4:])


class _Tables(HTMLParser):
    """Rows of every <table> in an HTML fragment, as lists of cell texts."""

    def __init__(self):
        super().__init__()
        self.rows, self._cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.rows.append([])
        elif tag == "tr":
            self.rows[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1][-1].append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def test_user_strings_are_escaped_in_the_html(tmp_path):
    caked = make_caked(n_groups=1, n_eta=4, omega_step=90.0, height=2000.0)
    lineouts = run_serial(plan_lineouts(caked), TOY_OPTIONS, backend=ToyBackend())
    evil = '<img src=x onerror="alert(1)">scan.zarr.zip'
    results = assemble_results(lineouts, ref_cells={"CeO2": (A0_A,) * 3 + (90.0,) * 3},
                               attrs={"data_file": evil})
    path = write_report(results, tmp_path / "report.html", title="<script>alert(2)</script> run")
    html = path.read_text(encoding="utf-8")
    docs = re.search(r'<script type="application/json" id="[^"]+">\s*(.*?)\s*</script>', html, re.S)
    # the document JSON is itself HTML-escaped inside its <script> tag; unescaped, it holds the
    # Div's HTML as Bokeh will render it
    text = html_module.unescape(json.dumps(json.loads(docs.group(1)), ensure_ascii=False))
    assert "<h2>" in text and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;scan.zarr.zip" in text
    assert "&lt;script&gt;alert(2)&lt;/script&gt; run" in text
    assert "<img" not in text and "<script>alert(2)" not in text


def test_summary_table_and_strain_error_bars(tmp_path):
    import dataclasses

    import numpy as np
    from bokeh.models import Whisker

    from midasflow.report import strain_figure, summary_html

    caked = make_caked(n_groups=2, n_eta=12, omega_step=90.0, height=2000.0)
    lineouts = run_serial(plan_lineouts(caked), TOY_OPTIONS, backend=ToyBackend())
    # two lineouts carry flags: one that keeps them out of the strain fits, one that does not
    marked = {3: ("at_bound",), 5: ("unphysical_profile",)}
    lineouts = [dataclasses.replace(r, pattern=dataclasses.replace(r.pattern, flags=marked[r.index]))
                if r.index in marked else r for r in lineouts]
    results = assemble_results(lineouts, ref_cells={"CeO2": (A0_A,) * 3 + (90.0,) * 3})
    text = summary_html(results)
    assert "<tr title=" in text and "<td>at_bound</td><td>1</td><td>left out of the strain fits</td>" in text
    assert "<td>unphysical_profile</td><td>1</td><td>kept in the strain fits</td>" in text
    assert "2 of 24 refined lineouts carry a flag" in text
    a = results.a_a.values[0][results.status.values == "ok"]
    assert f"{np.mean(a):.6g}" in text  # the mean cell
    for c, value, esd in zip(results.component.values, results.strain_sample.values[0],
                             results.strain_sample_esd.values[0]):
        assert f"<th>ε<sub>{c}</sub></th>" in text and f"{value:.4g} ± {esd:.2g}" in text
    fig = strain_figure(results, 0)
    whiskers = [r for r in fig.center if isinstance(r, Whisker)]
    assert len(whiskers) == 2  # one per ω-group
    src = whiskers[0].source.data
    np.testing.assert_allclose(np.asarray(src["hi"]) - np.asarray(src["eps"]), results.strain_esd.values[0, 0])
    assert src["fill"][3] == "white" and src["fill"][5] != "white"  # left out: hollow
