"""The Bokeh HTML report is written, self-contained, with the expected figures."""
import json
import re

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
    for t in ("Cake: intensity per frame", "Lattice parameter a vs", "Rwp vs", "Strain vs", "demo.zarr.zip",
              "23 refined, 0 failed, 1 skipped"):
        assert t in text, t
    assert not list(tmp_path.glob(".*.tmp"))
