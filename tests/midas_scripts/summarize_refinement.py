#!/usr/bin/env python
"""A user script written for MIDAS's refinement_summary.json (gsas_ii_refine.py), unchanged.

It reads the summary the way MIDAS's manual and gsas_ii_refine.py read it: the counts, the mean
Rwp when present, every histogram's number, status, Rwp and phases[].cell dict, the per-histogram
files hist_NNNN_data.csv / hist_NNNN_<phase>.cif named by histogram_index, and the errors of
the failures. It knows nothing of midasflow. Usage: summarize_refinement.py OUTPUT_DIR
Prints one line per histogram and a last line "mean_a=<Å> n=<count> mean_Rwp=<%>"; exits
non-zero when the summary does not look like MIDAS's.
"""
import csv
import json
import os
import sys


def main(out_dir):
    with open(os.path.join(out_dir, "refinement_summary.json")) as f:
        results = json.load(f)

    # the manual's "Python API" example
    if "mean_Rwp" in results:
        print(f"Mean Rwp = {results['mean_Rwp']:.3f}%")
    print(f"Succeeded: {results['succeeded']} / {results['total_histograms']}")

    # gsas_ii_refine.py's own bookkeeping must add up
    hists = results["histograms"]
    assert results["total_histograms"] == len(hists), "total_histograms != len(histograms)"
    counts = {s: sum(1 for h in hists if h.get("status") == s) for s in ("success", "failed", "skipped")}
    assert counts["success"] == results["succeeded"], counts
    assert counts["failed"] == results["failed"], counts
    assert counts["skipped"] == results["skipped"], counts
    numbers = [h["histogram_index"] for h in hists]
    assert numbers == list(range(len(hists))), "histograms are numbered 0..N-1 in order"

    a_values, rwps = [], []
    for h in hists:
        idx = h.get("histogram_index", "?")
        status = h.get("status", "unknown")
        rwp = h.get("Rwp")
        if status == "success" and rwp is not None:
            print(f"  Histogram {idx}  ->  Rwp={rwp:.3f}%")
            rwps.append(rwp)
            stem = os.path.join(out_dir, f"hist_{idx:04d}")
            for phase in h.get("phases", []):
                cell = phase["cell"]
                a_values.append(cell["a"])
                assert cell["volume"] > 0 and cell["alpha"] == cell["beta"] == cell["gamma"] == 90.0
                assert os.path.isfile(f"{stem}_{phase['name']}.cif"), f"{stem}_{phase['name']}.cif"
            with open(f"{stem}_data.csv") as data:
                rows = [row for row in csv.reader(data) if row]
            assert len(rows) > 20, f"{stem}_data.csv is too short"
        elif status == "failed":
            print(f"  Histogram {idx}  ->  FAILED: {h.get('error', '')}")
        else:
            print(f"  Histogram {idx}  ->  {status}")
    if "mean_Rwp" in results:
        assert abs(sum(rwps) / len(rwps) - results["mean_Rwp"]) < 1e-9, "mean_Rwp is the mean of the Rwp"
    mean_a = sum(a_values) / len(a_values) if a_values else float("nan")
    print(f"mean_a={mean_a:.6f} n={len(a_values)} mean_Rwp={results.get('mean_Rwp', float('nan')):.6f}")


if __name__ == "__main__":
    main(sys.argv[1])
