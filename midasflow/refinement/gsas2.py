"""Optional GSAS-II backend: each lineout refined by GSASIIscriptable into its own ``.gpx``.

The built-in engine (:func:`midasflow.refinement.engine.refine_pattern`) is the default. Users
who have GSAS-II can ask for this backend to get the same
:class:`~midasflow.refinement.result.PatternResult` plus one GSAS-II project per lineout that they
can open, inspect and continue in the GSAS-II GUI.

GSAS-II is not a dependency: it is imported only by the functions below, from an installed
``GSASII`` package, a ``GSASIIscriptable`` module on ``sys.path`` or the folder named by the
environment variable ``GSASII_PATH`` (see :func:`import_gsasii`). The pipeline calls
:func:`check_gsas2_available` before it submits any task.

GSAS-II keeps global state in its modules (constraint maps, print routing), so refinements in
one process are serialised by a lock; run several worker *processes* for parallel lineouts.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from midasflow.crystal import (A_to_cell, Phase, cell_to_A, cell_volume, laue_tie_matrix,
                               read_phases)
from midasflow.errors import BackendError, ParameterError, PatternError
from midasflow.instrument import Instrument, as_instrument
from midasflow.io.instprm import write_instprm
from midasflow.refinement.result import PatternResult
from midasflow.texture.harmonics import coefficient_names

if TYPE_CHECKING:  # pragma: no cover
    from midasflow.refinement.lineouts import LineoutSpec
    from midasflow.refinement.options import RefineOptions

log = logging.getLogger(__name__)

GSASII_PATH_ENV = "GSASII_PATH"
"""Environment variable naming a GSAS-II installation (its root or its ``GSASII`` subfolder)."""
PHYSICAL_PROFILE_UNAVAILABLE = ("--physical-profile: GSAS-II has no bound on the peak widths; "
                                "use it with --engine native")
"""Why ``physical_profile`` is refused with this backend (checked before any work)."""

_GSASII_LOCK = threading.RLock()
_INSTRUMENT_KEYS = ("Zero", "U", "V", "W", "X", "Y", "Z", "SH/L")
_CELL_KEYS = ("length_a", "length_b", "length_c", "angle_alpha", "angle_beta", "angle_gamma",
              "volume")
_MIN_POINTS = 10


# ------------------------------------------------------------------------------------ import

@contextlib.contextmanager
def _console_to(path: str | os.PathLike) -> Iterator[None]:
    """Send Python *and* C/Fortran console output (fds 1 and 2) to the file ``path`` (appended)."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    sys.stderr.flush()
    with open(path, "a", encoding="utf-8", errors="replace") as sink:
        saved = (os.dup(1), os.dup(2))
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                yield
        finally:
            sink.flush()
            libc.fflush(None)
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _import_from_folder(folder: Path) -> ModuleType:
    """Import GSASIIscriptable from a GSAS-II root or its ``GSASII`` subfolder."""
    if (folder / "GSASII" / "GSASIIscriptable.py").is_file():
        root, package = folder, True
    elif (folder / "GSASIIscriptable.py").is_file():
        # modern layout: GSASII/ is a package (relative imports); old layout: a flat folder
        package = (folder / "__init__.py").is_file()
        root = folder.parent if package else folder
    else:
        raise ImportError(f"no GSASIIscriptable.py in {folder} or {folder / 'GSASII'}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if package:
        return importlib.import_module("GSASII.GSASIIscriptable")
    return importlib.import_module("GSASIIscriptable")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _import_routes() -> ModuleType:
    failures = []
    for name in ("GSASII.GSASIIscriptable", "GSASIIscriptable"):
        try:
            return importlib.import_module(name)
        except Exception as exc:  # a broken install raises more than ImportError
            failures.append(f"{name}: {_one_line(exc)}")
    folder = os.environ.get(GSASII_PATH_ENV)
    if folder:
        try:
            return _import_from_folder(Path(folder).expanduser().resolve())
        except Exception as exc:
            failures.append(f"{GSASII_PATH_ENV}={folder}: {_one_line(exc)}")
    else:
        failures.append(f"{GSASII_PATH_ENV} is not set")
    raise BackendError(
        "GSAS-II could not be imported (" + "; ".join(failures) + "); install GSAS-II as its "
        f"documentation describes and set {GSASII_PATH_ENV} to its folder (the one holding "
        "GSASII/GSASIIscriptable.py)")


def import_gsasii() -> ModuleType:
    """Import and return GSAS-II's ``GSASIIscriptable`` module.

    Tries, in order: ``from GSASII import GSASIIscriptable`` (an installed package), a plain
    ``import GSASIIscriptable`` (already on ``sys.path``), then the folder in the environment
    variable ``GSASII_PATH`` — either the GSAS-II root (holding ``GSASII/``) or that ``GSASII``
    subfolder — which is put on ``sys.path``. GSAS-II's import-time chatter is logged at DEBUG
    level, not printed.

    Returns
    -------
    module
        ``GSASIIscriptable``.

    Raises
    ------
    BackendError
        One line saying that GSAS-II could not be imported (with each route's reason) and how
        to point ``GSASII_PATH`` at an installation.
    """
    loaded = sys.modules.get("GSASII.GSASIIscriptable") or sys.modules.get("GSASIIscriptable")
    if loaded is not None:
        return loaded
    with _GSASII_LOCK:
        with tempfile.TemporaryDirectory(prefix="midasflow-g2import-") as tmp:
            chatter = Path(tmp) / "import.log"
            try:
                with _console_to(chatter):
                    return _import_routes()
            finally:
                text = chatter.read_text(errors="replace").strip() if chatter.exists() else ""
                if text:
                    log.debug("GSAS-II import output:\n%s", text)


def check_gsas2_available() -> str:
    """Check that the GSAS-II backend can run here; call before submitting any task.

    Returns
    -------
    str
        Path of the ``GSASIIscriptable`` module that will be used.

    Raises
    ------
    BackendError
        If GSAS-II cannot be imported (see :func:`import_gsasii`).
    """
    return str(Path(import_gsasii().__file__).resolve())


# ------------------------------------------------------------------------------ input files

def _write_xye(path: Path, x: np.ndarray, y: np.ndarray, s: np.ndarray, index: int) -> None:
    """Three-column 2θ (deg), intensity, σ text that GSAS-II's 'xye' importer reads with σ."""
    with open(path, "w", encoding="ascii") as fh:
        fh.write(f"/* midasflow lineout {index}: 2theta_deg intensity esd */\n")
        np.savetxt(fh, np.column_stack([x, y, s]), fmt="%.17g")  # exact round trip


def _clean_pattern(tth_deg: np.ndarray, intensity: np.ndarray, sigma: np.ndarray,
                   limits: tuple[float, float] | None, index: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float], int]:
    """Usable points sorted by 2θ, the 2θ limits, and how many points inside them were dropped."""
    x = np.asarray(tth_deg, dtype=np.float64).ravel()
    y = np.asarray(intensity, dtype=np.float64).ravel()
    s = np.asarray(sigma, dtype=np.float64).ravel()
    if not (x.shape == y.shape == s.shape):
        raise PatternError(f"lineout {index}: tth_deg, intensity and sigma differ in length "
                           f"({x.size}, {y.size}, {s.size}); expected equal 1-D arrays")
    finite_x = np.isfinite(x)
    if limits is not None:
        lo, hi = float(min(limits)), float(max(limits))
    elif finite_x.any():
        lo, hi = float(x[finite_x].min()), float(x[finite_x].max())
    else:
        lo, hi = 0.0, 0.0
    inside = finite_x & (x >= lo) & (x <= hi)
    keep = inside & np.isfinite(y) & np.isfinite(s) & (s > 0)
    if keep.sum() < _MIN_POINTS:
        raise PatternError(f"lineout {index}: {int(keep.sum())} usable points within "
                           f"{lo:g}-{hi:g} deg; expected at least {_MIN_POINTS}")
    order = np.argsort(x[keep], kind="stable")
    return (x[keep][order], y[keep][order], s[keep][order], (lo, hi),
            int(inside.sum() - keep.sum()))


# ------------------------------------------------------------------------------- refinement

def _stages(bkg_terms: int, limits: tuple[float, float], refine_atoms: bool, mode: str,
            n_phases: int, start: Mapping[str, float] | None = None
            ) -> list[tuple[str, list[dict[str, Any]]]]:
    """The built-in engine's staged recipe (:func:`~midasflow.refinement.recipe.default_stages`) as
    GSAS-II ``do_refinements`` step dicts, keyed by the same stage names.

    Each stage is a list of dicts applied with ``G2Project.set_refinement`` (a dict's
    ``'phases'`` entry restricts it to those phases) before one refinement. Stage 1 sets
    'Background' in its dict form: a boolean there makes GSAS-II's ``set_refinements`` return
    early and silently skip the keys after it (docs/gsas2.md §R2). New GSAS-II histograms have ``Scale``
    flagged already; Le Bail clears it, as the built-in recipe does, and switches ``LeBail`` on
    only from the second stage, once the reflection list exists (docs/gsas2.md §R2).
    """
    bkg: dict[str, Any] = {"type": "chebyschev-1", "no. coeffs": int(bkg_terms), "refine": True}
    start = start or {}
    if all(f"Back;{i}" in start for i in range(bkg_terms)):
        bkg["coeffs"] = [float(start[f"Back;{i}"]) for i in range(bkg_terms)]
    background: list[dict[str, Any]] = [{"set": {
        "Limits": [float(limits[0]), float(limits[1])], "Background": bkg}}]
    if mode == "lebail":
        background.append({"clear": {"Sample Parameters": ["Scale"]}})
    elif n_phases > 1:  # phase fractions of every phase but the first
        background.append({"set": {"PhaseFraction": True}, "phases": list(range(1, n_phases))})
    cell: dict[str, Any] = {"set": {"Cell": True}}
    if mode == "lebail":
        cell["set"]["LeBail"] = True
    stages = [("background", background), ("cell", [cell]),
              ("profile_gauss", [{"set": {"Instrument Parameters": ["U", "V", "W"]}}]),
              ("profile_lorentz", [{"set": {"Instrument Parameters": ["X", "Y", "SH/L"]}}])]
    if refine_atoms and mode == "rietveld":
        stages.append(("atoms", [{"set": {"Atoms": {"all": "XU"}}}]))
    return stages


def _apply_start(hist: Any, g2phases: list[Any], phases: list[Phase],
                 start: Mapping[str, float]) -> None:
    """Seed GSAS-II's starting values from GSAS-II-named ``start`` values (e.g. a neighbour
    lineout's ``PatternResult.values``): instrument terms, ``Scale``, ``p::A<i>`` and
    ``p:0:Scale``; background coefficients go in with the first stage's flags."""
    def given(key: str) -> bool:
        return key in start and start[key] is not None and math.isfinite(float(start[key]))

    for key in _INSTRUMENT_KEYS:
        if given(key) and key in hist.InstrumentParameters:
            hist.InstrumentParameters[key][1] = float(start[key])
    if given("Scale"):
        hist.SampleParameters["Scale"][0] = float(start["Scale"])
    for p, (g2, ph) in enumerate(zip(g2phases, phases)):
        tie, free = laue_tie_matrix(ph.laue, ph.unique_axis)
        if all(given(f"{p}::A{i}") for i in free):
            A = tie @ np.array([float(start[f"{p}::A{i}"]) for i in free])
            cell = A_to_cell(A)
            g2.data["General"]["Cell"][1:8] = [*map(float, cell), cell_volume(cell)]
        if given(f"{p}:0:Scale"):
            g2.data["Histograms"][hist.name]["Scale"][0] = float(start[f"{p}:0:Scale"])


class _RefineFailed(Exception):
    """GSAS-II reported a failed refinement (its message is the exception text)."""


def _refine(gpx: Any) -> Mapping[str, Any]:
    """One GSAS-II refinement that reports failure (``G2Project.refine`` ignores it).

    Does what ``G2Project.refine`` does for a non-sequential project without constraints,
    but keeps the value ``GSASIIstrMain.Refine`` returns on failure.
    """
    gpx.index_ids()  # saves the project, as G2Project.refine does
    G2strMain = sys.modules[type(gpx).__module__].G2strMain
    outcome = G2strMain.Refine(gpx.filename, makeBack=False)
    gpx.reload()
    if isinstance(outcome, tuple) and outcome and outcome[0] is False:
        msg = str(outcome[1].get("msg", "refinement failed")) if len(outcome) > 1 else ""
        raise _RefineFailed(" ".join(msg.split()) or "GSAS-II refinement failed")
    covariance = gpx.data.get("Covariance", {}).get("data", {})
    if not covariance.get("Rvals"):
        raise _RefineFailed("GSAS-II refinement left no covariance record")
    return covariance


def _short_name(name: str) -> str:
    """GSAS-II variable name as PatternResult keys it: ':0:U' -> 'U'; phase names unchanged."""
    return name[3:] if name.startswith(":0:") else name


def _refined_phase(phase: Phase, g2phase: Any) -> Phase:
    """``phase`` with GSAS-II's refined cell and, for the atoms GSAS-II has, xyz and Uiso."""
    cell = tuple(float(v) for v in g2phase.data["General"]["Cell"][1:7])
    by_label = {atom.label: atom for atom in g2phase.atoms()}
    atoms = []
    for atom in phase.atoms:
        g2 = by_label.get(atom.label)
        if g2 is None:
            atoms.append(atom)
            continue
        uiso = float(g2.uiso) if g2.adp_flag == "I" else atom.uiso
        atoms.append(replace(atom, xyz=tuple(float(v) for v in g2.coordinates), uiso=uiso))
    return replace(phase, cell=cell, atoms=atoms)


def _reflection_table(refl: np.ndarray) -> dict[str, np.ndarray]:
    """PatternResult reflection columns from a GSAS-II CW powder ``RefList`` (docs/gsas2.md §R3)."""
    refl = np.asarray(refl, dtype=np.float64).reshape(-1, refl.shape[-1] if refl.size else 12)
    table = {key: refl[:, col].copy() for key, col in
             (("h", 0), ("k", 1), ("l", 2), ("d_a", 4), ("tth_deg", 5), ("sig2", 6),
              ("gam", 7), ("fsq", 9))}
    table["mult"] = np.abs(refl[:, 3])  # GSAS-II negates it for reflections masked out
    table["intensity"] = refl[:, 11] * refl[:, 9]  # I_h = refl[11]·|F|² (docs/gsas2.md §R3)
    return table


def _weight_fractions(g2phases: list[Any], phases: list[Phase], hist_name: str,
                      dep: Mapping[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """Weight fraction and esd per phase: GSAS-II's ``p:0:WgtFrac`` where it computed one
    (refined phase fractions), else phase scale × cell mass normalised over the phases."""
    mass = [float(g2.data["Histograms"][hist_name]["Scale"][0]) * ph.cell_mass
            for g2, ph in zip(g2phases, phases)]
    total = sum(mass)
    return {ph.name: dep.get(f"{p}:0:WgtFrac", (m / total if total > 0 else math.nan, 0.0))
            for p, (ph, m) in enumerate(zip(phases, mass))}


def _collect(hist: Any, g2phases: list[Any], phases: list[Phase], covariance: Mapping[str, Any],
             stage_rwp: dict[str, float], n_dropped: int, warnings: list[str]) -> PatternResult:
    """Map the refined GSAS-II project onto a :class:`PatternResult`."""
    rvals = covariance["Rvals"]
    dep = {k: (float(v[0]), float(v[1])) for k, v in covariance.get("depSigDict", {}).items()}
    names = [ph.name for ph in phases]
    values: dict[str, float] = {}
    inst = hist.InstrumentParameters
    values.update({key: float(inst[key][1]) for key in _INSTRUMENT_KEYS if key in inst})
    values["Scale"] = float(hist.SampleParameters["Scale"][0])
    values.update({f"Back;{i}": float(c) for i, c in enumerate(hist.Background[0][3:])})
    cells, cell_esds, reflections = {}, {}, {}
    lists = hist.reflections()
    for p, (ph, name) in enumerate(zip(g2phases, names)):
        cell, esd = ph.get_cell_and_esd()
        cells[name] = tuple(float(cell[k]) for k in _CELL_KEYS)
        cell_esds[name] = tuple(float(esd[k]) for k in _CELL_KEYS)
        A = cell_to_A(ph.data["General"]["Cell"][1:7])
        _, free = laue_tie_matrix(phases[p].laue, phases[p].unique_axis)
        values.update({f"{p}::A{i}": float(A[i]) for i in free})
        hap = ph.data["Histograms"][hist.name]
        values[f"{p}:0:Scale"] = float(hap["Scale"][0])
        values[f"{p}:0:Size;i"] = float(hap["Size"][1][0])
        values[f"{p}:0:Mustrain;i"] = float(hap["Mustrain"][1][0])
        values[f"{p}:0:MD"] = float(hap["Pref.Ori."][1])
        reflections[name] = _reflection_table(lists[name]["RefList"])
    esds: dict[str, float] = {}
    for key, (val, sig) in dep.items():
        short = _short_name(key)
        if short in values or key in covariance.get("varyList", ()):
            values[short] = val  # dependent A-terms (e.g. cubic A1 = A2 = A0) are left out
            esds[short] = sig

    x = np.ma.getdata(hist.getdata("X"))
    lo, hi = hist.data["Limits"][1]
    inside = np.zeros(x.size, dtype=bool)  # GSAS-II's refined slice x[xB:xF] (docs/gsas2.md §R3)
    inside[np.searchsorted(x, lo):np.searchsorted(x, hi) + 1] = True
    sel = inside & ~np.ma.getmaskarray(hist.getdata("Yobs"))
    arrays = {t: np.ma.getdata(hist.getdata(t))[sel].astype(np.float64)
              for t in ("Yobs", "Yweight", "Ycalc", "Background")}
    if not rvals.get("converged", True):
        warnings.append("GSAS-II: the last stage did not converge within the cycle limit")
    return PatternResult(
        status="ok", message="", rwp=float(hist.get_wR()),
        rp=float(hist.residuals.get("R", math.nan)), chi2=float(rvals["chisq"]),
        gof=float(rvals["GOF"]), n_points=int(rvals.get("Nobs", sel.sum())),
        n_dropped=n_dropped, stage_rwp=stage_rwp, values=values, esds=esds, cells=cells,
        cell_esds=cell_esds,
        phase_fractions=_weight_fractions(g2phases, phases, hist.name, dep),
        tth_deg=x[sel].astype(np.float64), obs=arrays["Yobs"], calc=arrays["Ycalc"],
        bkg=arrays["Background"], weight=arrays["Yweight"], reflections=reflections, warnings=warnings,
        phases=[_refined_phase(ph, g2) for ph, g2 in zip(phases, g2phases)])


def refine_pattern_gsas2(
    tth_deg: np.ndarray,
    intensity: np.ndarray,
    sigma: np.ndarray,
    phase_cif_paths: Sequence[str | os.PathLike],
    instprm: Instrument | Mapping[str, Any] | str | os.PathLike,
    *,
    workdir: str | os.PathLike,
    index: int,
    stem: str | None = None,
    bkg_terms: int = 6,
    limits: tuple[float, float] | None = None,
    refine_atoms: bool = False,
    mode: str = "rietveld",
    start: Mapping[str, float] | None = None,
    sample_azimuth_deg: float = 0.0,
    max_cycles: int = 20,
    min_dchi2: float = 1e-5,
    estimate: bool = True,
    physical_profile: bool = False,
    texture: str | None = None,
    po_axis: Sequence[int] = (0, 0, 1),
    sh_order: int = 4,
) -> PatternResult:
    """Refine one lineout with GSAS-II; leave ``hist_NNNN.gpx`` for the GSAS-II GUI.

    Parameters
    ----------
    tth_deg, intensity, sigma : ndarray (n,) float
        The lineout: 2θ (degrees), intensity and its standard uncertainty (same units).
        Points inside the limits with a non-finite value or σ ≤ 0 are dropped (counted in
        ``n_dropped``).
    phase_cif_paths : sequence of path-like
        One CIF per phase; phase names are the file stems, as in
        :func:`midasflow.crystal.read_phases`.
    instprm : Instrument, mapping or path-like
        Instrument terms: an :class:`~midasflow.instrument.Instrument`, a mapping of GSAS-II
        keys or an ``.instprm`` file (docs/gsas2.md §R1); written to ``hist_NNNN.instprm`` for GSAS-II.
    workdir : path-like
        Output folder; this lineout's files go to its own subfolder ``hist_NNNN/``:
        ``hist_NNNN.gpx``, the ``.xye`` and ``.instprm`` it was built from, GSAS-II's
        ``.lst`` and ``hist_NNNN.log`` with GSAS-II's console output.
    index : int
        Lineout index (``NNNN`` in the file names unless ``stem`` is given; also labels the
        ``.xye``).
    stem : str, optional
        File stem and subfolder name, e.g. ``hist_0012`` (``LineoutSpec.name``); default
        ``hist_<index>``.
    bkg_terms : int
        Number of Chebyshev ('chebyschev-1') background coefficients.
    limits : (float, float), optional
        2θ range (degrees) refined; default the whole lineout.
    refine_atoms : bool
        Add a last stage refining coordinates and Uiso of all atoms (Rietveld only).
    mode : {"rietveld", "lebail"}
    start : dict, optional
        GSAS-II-named starting values, as the built-in engine takes them (e.g. a neighbour
        lineout's ``values``): instrument terms, ``Scale``, ``Back;n``, ``p::A<i>``,
        ``p:0:Scale``; other names are ignored.
    sample_azimuth_deg : float
        GSAS-II Sample ``Azimuth`` (degrees) used by the polarization correction (docs/reference/gsas2_profile.md §4).
    max_cycles : int
        GSAS-II least-squares cycle limit of every stage (Controls 'max cyc').
    min_dchi2 : float
        GSAS-II convergence test (Controls 'min dM/M'): a stage ends when χ² falls by less
        than this fraction in a cycle. GSAS-II's cell Jacobian is incomplete for cubic,
        tetragonal and hexagonal cells (docs/gsas2.md §R4), so the cell converges linearly; its defaults
        (3 cycles, 0.001) stop it short of the minimum.
    estimate : bool
        Start GSAS-II from the profile, scale and background measured from the lineout
        (:func:`midasflow.refinement.start.estimate_start`, as the built-in engine does) when
        the instrument's peak widths are more than 2× off the measured ones, unless ``start``
        gives U, V, W, X and Y; ``start`` values win over the estimate.
    physical_profile : bool
        Not available in GSAS-II (it has no bound on the peak widths): ``True`` raises
        :class:`~midasflow.errors.ParameterError`.
    texture : {None, "md", "sh"}
        A last stage refining GSAS-II's own preferred orientation of every phase ('Pref.Ori.'):
        March–Dollase ``MD`` along ``po_axis`` or the cylindrical spherical harmonics
        ``C(l,n)`` up to ``sh_order``, undone as the built-in engine's (:func:`_texture_stage`).
    po_axis, sh_order
        The March–Dollase axis [h, k, l] and the highest harmonic order (2..12).

    Returns
    -------
    PatternResult
        The same fields as the built-in engine. A refinement GSAS-II fails on gives
        ``status="failed"`` with GSAS-II's message.

    Raises
    ------
    BackendError
        GSAS-II cannot be imported.
    InstprmError
        ``instprm`` is not a valid set of instrument terms.
    PatternError
        The arrays differ in length, fewer than 10 usable points remain, or ``mode`` is unknown.
    CIFError
        A CIF cannot be read.
    """
    if mode not in ("rietveld", "lebail"):
        raise PatternError(f"lineout {index}: mode={mode!r}; expected 'rietveld' or 'lebail'")
    if physical_profile:
        raise ParameterError(PHYSICAL_PROFILE_UNAVAILABLE)
    x, y, s, (lo, hi), n_dropped = _clean_pattern(tth_deg, intensity, sigma, limits, index)
    cifs = [Path(p).resolve() for p in phase_cif_paths]
    phases = read_phases(cifs)
    instrument = as_instrument(instprm)
    if estimate and not all(k in (start or {}) for k in ("U", "V", "W", "X", "Y")):
        start = {**_measured_start(x, y, s, phases, instrument, bkg_terms, (lo, hi),
                                   sample_azimuth_deg), **dict(start or {})}
    G2sc = import_gsasii()

    stem = stem or f"hist_{int(index):04d}"
    folder = Path(workdir) / stem
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{stem}*"):  # a rerun starts from a clean project
        old.unlink()
    data_path = folder / f"{stem}.xye"
    _write_xye(data_path, x, y, s, index)
    inst_path = write_instprm(instrument, folder / f"{stem}.instprm")
    stage_rwp: dict[str, float] = {}
    warnings: list[str] = []
    with _GSASII_LOCK, _console_to(folder / f"{stem}.log"):
        try:
            gpx = G2sc.G2Project(newgpx=str(folder / f"{stem}.gpx"))
            hist = gpx.add_powder_histogram(str(data_path), str(inst_path), fmthint="xye")
            for cif, ph in zip(cifs, phases):
                gpx.add_phase(str(cif), phasename=ph.name, histograms=[hist], fmthint="CIF")
            hist.SampleParameters["Azimuth"] = float(sample_azimuth_deg)
            for key, um in (("DisplaceX", instrument.displace_x_um), ("DisplaceY", instrument.displace_y_um)):
                if um and key in hist.SampleParameters:  # a .samprm's start values, held as GSAS-II holds them
                    hist.SampleParameters[key][0] = float(um)
            gpx.set_Controls("cycles", int(max_cycles))
            gpx.data["Controls"]["data"]["min dM/M"] = float(min_dchi2)
            covariance: Mapping[str, Any] = {}
            if start:
                _apply_start(hist, gpx.phases(), phases, start)
            for stage, step in _stages(bkg_terms, (lo, hi), refine_atoms, mode, len(phases),
                                       start):
                for flags in step:
                    gpx.set_refinement(flags, phase=flags.get("phases", "all"))
                covariance = _refine(gpx)
                hist = gpx.histograms()[0]
                stage_rwp[stage] = float(hist.get_wR())
                note = covariance["Rvals"].get("msg")
                if note:
                    warnings.append(f"GSAS-II ({stage}): " + " ".join(str(note).split()))
            flags: tuple[str, ...] = ()
            notes: list[str] = []
            if texture == "sh" and not any(coefficient_names(ph.laue, sh_order) for ph in phases):
                notes.append(f"texture: no symmetry-allowed harmonic up to order {sh_order} for "
                             + ", ".join(f"{ph.name} ({ph.laue})" for ph in phases) + "; stage skipped")
            elif texture is not None:
                gpx, covariance, flags = _texture_stage(gpx, covariance, phases, texture, po_axis,
                                                        sh_order, stage_rwp, warnings)
                hist = gpx.histograms()[0]
            result = _collect(hist, gpx.phases(), phases, covariance, stage_rwp, n_dropped,
                              warnings)
            result.flags, result.notes = flags, notes
        except Exception as exc:  # GSAS-II raises bare Exceptions; record, don't crash the scan
            message = _one_line(exc)
            print(f"midasflow: lineout {index} failed: {message}")
            result = PatternResult(status="failed", message=f"GSAS-II: {message}",
                                   rwp=math.nan, rp=math.nan, chi2=math.nan, gof=math.nan,
                                   n_points=int(x.size), n_dropped=n_dropped,
                                   stage_rwp=stage_rwp, warnings=warnings, phases=phases)
    for backup in [*folder.glob(f"{stem}.bak*.gpx"), folder / f"{stem}.before_texture.gpx"]:
        backup.unlink(missing_ok=True)  # GSAS-II's pre-refinement copies, the texture stage's
    return result


def _texture_start(phase: Phase, texture: str) -> tuple[float, ...]:
    """Start values of MD tried: r = 1, or r = 0.8 and 1.25 for a cubic phase, whose MD
    derivative vanishes at r = 1 in GSAS-II as in the built-in engine
    (:mod:`midasflow.refinement.texture_stage`)."""
    from midasflow.refinement.texture_stage import MD_STARTS

    if texture == "md" and phase.laue in ("m3", "m3m"):
        return MD_STARTS
    return (1.0,)


def _texture_problems(covariance: Mapping[str, Any], phases: list[Phase], texture: str) -> str:
    """Why GSAS-II's refined texture parameters are not determined ('' when they are), by the
    built-in engine's rules (:func:`midasflow.refinement.texture_stage.undetermined_reason`)."""
    from midasflow.refinement.texture_stage import undetermined_reason

    dep = covariance.get("depSigDict", {})
    values, esds = {}, {}
    for p, ph in enumerate(phases):
        names = ([f"{p}:0:MD"] if texture == "md"
                 else [n for n in covariance.get("varyList", ()) if n.startswith(f"{p}:0:C(")])
        for name in names:
            v, e = dep.get(name, (math.nan, math.nan))
            values[name], esds[name] = float(v), float(e)
    return undetermined_reason(texture, values, esds)


def _texture_stage(gpx: Any, covariance: Mapping[str, Any], phases: list[Phase], texture: str,
                   po_axis: Sequence[int], sh_order: int, stage_rwp: dict[str, float],
                   warnings: list[str]) -> tuple[Any, Mapping[str, Any], tuple[str, ...]]:
    """The texture stage in GSAS-II: every phase's 'Pref.Ori.' set to March–Dollase along
    ``po_axis`` or to the cylindrical harmonics of order ``sh_order`` (GSAS-II's own
    ``HAPvalue('PO', order)``) and refined with everything refined so far. Undone — the project
    put back as it was, flag ``texture_rolled_back`` — when it fails, raises Rwp or leaves the
    texture undetermined (the built-in engine's rules). Returns the project, its covariance
    record and the flags."""
    from midasflow.refinement.texture_stage import TEXTURE_STAGE

    rwp_prev = float(gpx.histograms()[0].get_wR())
    backup = Path(gpx.filename).with_suffix(".before_texture.gpx")
    gpx.save()
    shutil.copyfile(gpx.filename, backup)
    best: tuple[float, Path, Mapping[str, Any]] | None = None
    reason, error = "", ""
    for k, r0 in enumerate(_texture_start(phases[0], texture)):
        if k:
            shutil.copyfile(backup, gpx.filename)
            gpx.reload()
        hist = gpx.histograms()[0]
        for g2 in gpx.phases():
            if texture == "md":
                po = g2.data["Histograms"][hist.name]["Pref.Ori."]
                po[0], po[1], po[3] = "MD", float(r0), [int(v) for v in po_axis]
            else:
                g2.HAPvalue("PO", int(sh_order), targethistlist=[hist])
            g2.set_HAP_refinements({"Pref.Ori.": True}, histograms=[hist])
        try:
            trial = _refine(gpx)
        except _RefineFailed as exc:
            error = str(exc)
            continue
        rwp = float(gpx.histograms()[0].get_wR())
        if math.isfinite(rwp) and (best is None or rwp < best[0]):
            kept = backup.with_suffix(f".trial{k}.gpx")
            shutil.copyfile(gpx.filename, kept)
            best = (rwp, kept, trial)
    if best is None:
        reason = f"diverged ({error or 'non-finite R'})"
    elif best[0] > rwp_prev * (1 + 1e-9):
        reason = f"made Rwp worse ({best[0]:.4g} % > {rwp_prev:.4g} %)"
    else:
        reason = _texture_problems(best[2], phases, texture)
    keep = backup if reason else best[1]
    shutil.copyfile(keep, gpx.filename)
    gpx.reload()
    for trial in backup.parent.glob(backup.stem + ".trial*.gpx"):
        trial.unlink()
    if reason:
        stage_rwp[TEXTURE_STAGE] = rwp_prev
        warnings.append(f"texture_rolled_back: stage {TEXTURE_STAGE!r} {reason}; kept the previous stage")
        return gpx, covariance, ("texture_rolled_back",)
    stage_rwp[TEXTURE_STAGE] = best[0]
    return gpx, best[2], ()


#: The instrument's peak widths are kept as GSAS-II's start unless the measured ones differ by
#: more than this factor somewhere in the range.
_WIDTH_RATIO_KEPT = 2.0


def _fwhm_deg(values: Mapping[str, float], tth_deg: np.ndarray, lam_a: float) -> np.ndarray:
    """Total TCH FWHM (deg) of the U..Z profile ``values`` at ``tth_deg``."""
    from midasflow.profile import peak_sig2_gam, tch_fwhm_eta

    sg = peak_sig2_gam(tth_deg, *(float(values.get(k, 0.0)) for k in ("U", "V", "W", "X", "Y", "Z")),
                       lam_a=lam_a)
    return np.array([tch_fwhm_eta(s2, g)[0] for s2, g in zip(np.atleast_1d(sg.sig2),
                                                             np.atleast_1d(sg.gam))]) / 100.0


def _measured_start(x: np.ndarray, y: np.ndarray, s: np.ndarray, phases: list[Phase],
                    instrument: Instrument, bkg_terms: int, limits: tuple[float, float],
                    sample_azimuth_deg: float) -> dict[str, float]:
    """Start values from the data (:func:`midasflow.refinement.start.estimate_start`) when the
    instrument's peak widths are more than 2× off the measured ones at the ends or the middle of
    the range (e.g. a store's MIDAS defaults, 10× too narrow); else none, and GSAS-II starts
    from the instrument as it would by itself. Closer than that, GSAS-II's own LM does better
    from the instrument than from the estimate's coarser widths: on narrow simulated CeO2 peaks
    (2 points per FWHM, benchmarks/bench_refine.py) it ended at Rwp 7.21 % from the instrument
    and 10.24 % from the estimate."""
    from midasflow.refinement.start import estimate_start

    try:
        measured = estimate_start(x, y, s, phases, instrument, bkg_terms=bkg_terms, limits=limits,
                                  sample_azimuth_deg=sample_azimuth_deg, precision="float32")
    except PatternError:
        return {}  # GSAS-II starts from the instrument terms
    tth = np.array([limits[0], 0.5 * (limits[0] + limits[1]), limits[1]])
    lam = instrument.wavelength_a
    ratio = _fwhm_deg(measured, tth, lam) / _fwhm_deg(instrument.to_dict(), tth, lam)
    if np.all((ratio <= _WIDTH_RATIO_KEPT) & (ratio >= 1.0 / _WIDTH_RATIO_KEPT)):
        return {}
    return measured


class Gsas2Backend:
    """GSAS-II in place of the built-in engine, as a
    :class:`~midasflow.refinement.backends.RefineBackend`.

    GSAS-II reads the phases from the CIFs itself (``options.phases`` is not used); every
    lineout's project goes to ``<workdir>/hist_NNNN/``, named by its histogram number (MIDAS's,
    ``LineoutSpec.histogram``). Picklable,
    so it travels to distributed workers.
    """

    #: Its projects are GSAS-II's own: the exports write no second one.
    writes_projects = True

    def __init__(self, cif_paths: Sequence[str], workdir: str) -> None:
        self.cif_paths = tuple(str(p) for p in cif_paths)
        self.workdir = str(workdir)

    def refine(self, spec: LineoutSpec, options: RefineOptions,
               start: Mapping[str, float] | None = None) -> PatternResult:
        return refine_pattern_gsas2(spec.tth_deg, spec.intensity, spec.sigma, self.cif_paths,
                                    options.instrument, workdir=self.workdir, index=spec.index,
                                    stem=spec.name, start=start, **options.recipe_kwargs(),
                                    **options.texture_kwargs())
