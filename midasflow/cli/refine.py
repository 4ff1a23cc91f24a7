"""``midasflow refine``: every lineout of a caked store, with the flags of MIDAS's ``gsas_ii_refine.py``."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from midasflow.cli._common import (
    CommandParser,
    add_cluster_flags,
    add_common_flags,
    announce_sidecars,
    configure_logging,
    dask_client,
    parse_command,
)
from midasflow.errors import UsageError
from midasflow.limits import MAX_REFLECTIONS
from midasflow.refinement.options import BACKENDS, MODES, PRECISIONS, SEED_MODES

#: ``run --backend``: where the frames come from, as in MIDAS's ``integrate_and_refine.py``.
PIPELINE_BACKENDS = ("batch", "stream")


def add_refinement_flags(parser: argparse.ArgumentParser, *, data_required: bool = True,
                         pipeline: bool = False) -> None:
    """Flags shared by ``refine`` and ``run`` (MIDAS ``gsas_ii_refine.py`` spellings).

    ``--engine`` chooses the refinement engine; ``--backend`` means in ``run`` what it means in
    MIDAS's ``integrate_and_refine.py`` (``batch``: frames from files) and, given the engine
    names it used to take, is refused naming ``--engine``.
    """
    files = parser.add_argument_group("input and output (MIDAS gsas_ii_refine.py flags)")
    if data_required:
        files.add_argument("--data", "-d", required=True, metavar="STORE",
                           help="caked .zarr.zip (or plain zarr) to refine")
    files.add_argument("--cif", "-c", nargs="+", required=True, metavar="CIF", help="one CIF per phase")
    files.add_argument("--out", "-o", default="refinement", metavar="DIR",
                       help="output folder (default refinement/): results.zarr, "
                       "refinement_summary.json, hist_NNNN_data.csv, hist_NNNN_<phase>.cif, report.html")
    files.add_argument("--instprm", "-i", default=None, metavar="FILE",
                       help="GSAS-II .instprm (default: the store's InstrumentParameters, "
                       "overridden by x.instprm or x.zarr.instprm beside x.zarr.zip)")
    files.add_argument("--no-export", action="store_true",
                       help="no per-lineout CSV/CIF files or GSAS-II projects")
    files.add_argument("--no-gpx", action="store_true",
                       help="no per-lineout GSAS-II project hist_NNNN.gpx (the CSV/CIF files stay)")
    files.add_argument("--no-report", action="store_true", help="do not write report.html")
    files.add_argument("--resume", action="store_true",
                       help="skip lineouts whose results already exist in --out (and write the "
                       "exports they lack)")
    recipe = parser.add_argument_group("the refinement")
    recipe.add_argument("--bkg-terms", type=int, default=6, metavar="N",
                        help="Chebyshev background terms (default 6)")
    recipe.add_argument("--limits", nargs=2, type=float, metavar=("LOW", "HIGH"), default=None,
                        help="2θ range to refine, degrees (default: the data's)")
    recipe.add_argument("--no-atoms", action="store_true",
                        help="skip the atom stage of the recipe (atoms are refined by default, as in "
                        "MIDAS's gsas_ii_refine.py; the manual recommends --no-atoms for lattice and "
                        "strain work)")
    recipe.add_argument("--mode", choices=MODES, default="rietveld",
                        help="rietveld (default): intensities from the structure; lebail: intensities "
                        "free, cell and profile only")
    recipe.add_argument("--engine", choices=BACKENDS, default="native",
                        help="refinement engine: built-in (default) or GSAS-II (GSASIIscriptable)")
    recipe.add_argument("--backend", default=None,
                        help="where the frames come from: 'batch' (files; the default) or "
                        "'stream' (a watched --folder or a live --pva stream)" if pipeline
                        else argparse.SUPPRESS)
    recipe.add_argument("--seed-from", choices=(*SEED_MODES[1:], "none"), default="group",
                        help="start each lineout from the refined values of its ω-group's η-averaged "
                        "pattern (group, the default: 1.4x less CPU per lineout on the demo, the "
                        "same results within 0.2 esd), of its ω-group's first lineout (neighbour), "
                        "or from its own data (none)")
    recipe.add_argument("--ref-cell", nargs="+", type=float, default=None, metavar="A",
                        help="reference cell of the first phase for strain: a (cubic) | a b c (angles "
                        "from the CIF) | a b c α β γ (default: the CIF's cell)")
    recipe.add_argument("--max-reflections", type=int, default=MAX_REFLECTIONS, metavar="N",
                        help="refuse a phase with more unique reflections in the refined 2θ range "
                        f"(default {MAX_REFLECTIONS}; each costs ~85 kB per lineout being refined)")
    quality = parser.add_argument_group("start values and quality")
    quality.add_argument("--no-estimate", action="store_true",
                         help="start the profile, scale and background from the store's (or "
                         "--instprm's) values instead of measuring them from each lineout")
    quality.add_argument("--physical-profile", action="store_true",
                         help="keep the Gaussian and Lorentzian widths physical (σ² > 0, γ ≥ 0) over "
                         "the fitted range; by default GSAS-II's minimum is followed and a negative "
                         "width is flagged unphysical_profile (native engine only)")
    quality.add_argument("--precision", choices=PRECISIONS, default=PRECISIONS[0],
                         help="profile arithmetic of the native engine: float64 (default; χ² smooth in "
                         "SH/L, the same minimum from every start) or float32, GSAS-II's single "
                         "precision, for parity checks")
    quality.add_argument("--warm-start", action=argparse.BooleanOptionalAction, default=None,
                         help="a lineout seeded by a good (ok, unflagged) result runs only the recipe's "
                         "final vary list from the seed's values, and every stage as without it "
                         "when that fit is flagged, not converged or clearly worse (the results' "
                         "'recipe' says which); default: on with --precision float64 (the full "
                         "recipe's results within 0.1 esd), off with float32")
    quality.add_argument("--max-rwp", type=float, default=None, metavar="PERCENT",
                         help="flag lineouts whose Rwp is above PERCENT (rwp_above_max; a flag, not a "
                         "failure)")
    quality.add_argument("--include-flagged", action="store_true",
                         help="let flagged lineouts into the strain and tensor fits (left out by "
                         "default: at_bound, rolled_back, bad_esd, rwp_above_max; unphysical_profile, "
                         "high_correlation and texture_rolled_back do not exclude)")
    texture = parser.add_argument_group("texture (stage 5, preferred orientation; docs/texture.md)")
    texture.add_argument("--texture", choices=("md", "sh"), default=None,
                         help="refine preferred orientation per lineout: md (March–Dollase along "
                         "--po-axis) or sh (GSAS-II's spherical harmonics, cylindrical sample "
                         "symmetry, order --sh-order); rolled back where it does not improve the fit")
    texture.add_argument("--po-axis", nargs=3, type=int, default=(0, 0, 1), metavar=("H", "K", "L"),
                         help="March–Dollase axis, a reciprocal-lattice direction (default 0 0 1)")
    texture.add_argument("--sh-order", type=int, default=4, metavar="N",
                         help="highest spherical-harmonics order, 2..12 (default 4)")


def check_backend(args: argparse.Namespace, *, pipeline: bool, command: str = "refine") -> None:
    """Refuse ``--backend`` values this command does not take; the engine names point to
    ``--engine``."""
    value = args.backend
    if value is None:
        return
    if value in BACKENDS:
        raise UsageError(f"--backend {value}: the refinement engine is now chosen with --engine {value}"
                         + (" (--backend chooses where the frames come from: batch or stream)" if pipeline
                            else ""))
    if not pipeline:
        raise UsageError(f"--backend {value}: unknown option for {command}; the engine is --engine "
                         f"{{{','.join(BACKENDS)}}}")
    if value not in PIPELINE_BACKENDS:
        raise UsageError(f"--backend {value}: expected one of {', '.join(PIPELINE_BACKENDS)} "
                         "(frames from files, or as they arrive)")


def ref_cells_from(args: argparse.Namespace) -> dict[str, tuple[float, ...]] | None:
    """``--ref-cell`` as {first phase name: (a, b, c, α, β, γ)}.

    One number is a cubic a (refused for a non-cubic first phase); with three, the angles are the
    first CIF's (a hexagonal γ stays 120°).
    """
    if not args.ref_cell:
        return None
    from midasflow.crystal import read_phase
    from midasflow.errors import ParameterError

    phase = read_phase(args.cif[0])
    values = list(args.ref_cell)
    if len(values) == 1:
        if phase.laue not in ("m3", "m3m"):
            raise ParameterError(f"--ref-cell: one number is a cubic a, but {args.cif[0]} is "
                                 f"{phase.space_group.crystal_system_str()}; give a b c or a b c α β γ")
        values = values * 3 + [90.0, 90.0, 90.0]
    elif len(values) == 3:
        values += list(phase.cell[3:6])
    elif len(values) != 6:
        raise ParameterError(f"--ref-cell: expected 1, 3 or 6 numbers, got {len(values)}")
    return {phase.name: tuple(values)}


def refine_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :func:`midasflow.pipeline.refine` from the parsed flags."""
    return dict(
        out=args.out,
        instprm=args.instprm,
        bkg_terms=args.bkg_terms,
        limits=tuple(args.limits) if args.limits else None,
        refine_atoms=not args.no_atoms,
        mode=args.mode,
        export=False if args.no_export else ({"csv", "cif"} if args.no_gpx else True),
        backend=args.engine,
        seed_from=None if args.seed_from == "none" else args.seed_from,
        resume=args.resume,
        ref_cells=ref_cells_from(args),
        report=not args.no_report,
        progress=not args.no_progress,
        estimate=not args.no_estimate,
        physical_profile=args.physical_profile,
        max_rwp=args.max_rwp,
        include_flagged=args.include_flagged,
        max_reflections=args.max_reflections,
        texture=args.texture,
        po_axis=tuple(args.po_axis),
        sh_order=args.sh_order,
        precision=args.precision,
        warm_start=args.warm_start,
    )


def print_summary(results: Any, out: str, file: Any = None, store: str | None = None,
                  report: bool = True) -> None:
    """The summary table: counts, mean Rwp, cell per phase, strain fits, where the files are
    (the caked ``store`` too when given, on the line before the results; ``report.html`` when
    ``report``).

    ``file`` defaults to the ``sys.stdout`` of the moment of the call (not of the import).
    """
    import numpy as np

    file = sys.stdout if file is None else file

    from midasflow.results import summary_dict

    summary = summary_dict(results)
    other = summary.get("lineouts_not_histograms", 0)
    print(f"lineouts: {summary['total_histograms']} total, {summary['succeeded']} refined, "
          f"{summary['failed']} failed, {summary['skipped']} skipped; mean Rwp "
          f"{summary.get('mean_Rwp', float('nan')):.3f} %"
          + (f" ({other} more in η columns with too few bins: no histograms)" if other else ""), file=file)
    ok = results.status.values == "ok"
    for k, name in enumerate(results.phase.values.tolist()):
        a = results.a_a.values[k][ok]
        if a.size:
            print(f"{name}: a = {np.mean(a):.6f} Å (scatter {np.std(a):.2e}, median esd "
                  f"{np.median(results.a_a_esd.values[k][ok]):.1e}) over {a.size} lineouts", file=file)
        if "strain_sample" in results and np.isfinite(results.strain_sample.values[k]).any():
            comps = results.component.values.tolist()
            strain = results.strain_sample.values[k]
            esd = results.strain_sample_esd.values[k]
            text = ", ".join(f"{c} {v:+.2e}±{e:.1e}" for c, v, e in zip(comps, strain, esd))
            print(f"{name}: sample-frame strain {text}", file=file)
    print(flags_line(summary), file=file)
    if store is not None:
        print(f"caked store: {store}", file=file)
    print(f"results: {out}/results.zarr, {out}/refinement_summary.json"
          + (f", report {out}/report.html" if report else ""), file=file)


def flags_line(summary: dict[str, Any]) -> str:
    """One line: how many refined lineouts carry each quality flag, and which flags kept lineouts
    out of the strain fits (from :func:`midasflow.results.summary_dict`)."""
    counts = summary.get("flag_counts", {})
    if not any(counts.values()):
        return f"quality flags: none on the {summary['succeeded']} refined lineouts"
    text = ", ".join(f"{name} {n}" for name, n in counts.items() if n)
    excluding = summary.get("strain_excluding_flags", [])
    left_out = sum(1 for h in summary.get("histograms", ())
                   if any(not st.get("in_fit", True) for st in h.get("strain", {}).values()))
    tail = (f"; {left_out} lineout(s) with {', '.join(excluding)} left out of the strain fits "
            "(--include-flagged puts them back)" if excluding and left_out else "")
    return f"quality flags on {summary['flagged']} of {summary['succeeded']} refined lineouts: {text}{tail}"


def report_outcome(results: Any, out: str, command: str, store: str | None = None,
                   report: bool = True) -> int:
    """Print the summary table; exit status 0, or 1 with a one-line error on stderr when no
    lineout was refined (every one failed or was skipped; the summary's ``error`` says why too)."""
    from midasflow.results import run_failure

    print_summary(results, out, store=store, report=report)
    failure = run_failure(results)
    if failure is None:
        return 0
    print(f"midasflow {command}: error: {failure}", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="midasflow refine",
        usage="midasflow refine --data STORE --cif CIF [CIF ...] [options]",
        description="""\
Refine every (ω, η) lineout of a caked scan (a .zarr.zip from 'midasflow
integrate' or MIDAS's integrator), each as a Dask task, with the recipe of
MIDAS's gsas_ii_refine.py: cell, profile, background, scale (and atoms, unless
--no-atoms). Writes results.zarr, refinement_summary.json (a superset of
MIDAS's), per-lineout hist_NNNN_data.csv and hist_NNNN_<phase>.cif, strain and
report.html into --out. Exit status 1 when no lineout could be refined.""",
        epilog="""\
examples:
  midasflow refine --data CeO2_000001.zarr.zip --cif CeO2.cif --no-atoms
  midasflow refine -d scan_000001.zarr.zip -c Fe.cif Cu.cif -o fit -nCPUs 8 --resume""",
    )
    add_refinement_flags(parser)
    add_cluster_flags(parser)
    add_common_flags(parser)
    return parser


def main(argv: Sequence[str]) -> int:
    from midasflow.pipeline import refine

    args, _ = parse_command(build_parser(), argv)
    check_backend(args, pipeline=False)
    configure_logging(args.verbose)
    announce_sidecars(args.data, args.instprm, "refine")
    with dask_client(args) as client:
        results = refine(args.data, args.cif, client=client, **refine_options(args))
    return report_outcome(results, args.out, "refine", report=not args.no_report)
