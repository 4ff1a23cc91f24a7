"""GSAS-II projects written without GSAS-II (issue 10, item 7): the tree GSAS-II reads, checked
item by item against the refinement it was written from. The files are read back here only, with
an Unpickler that builds nothing but builtins and numpy arrays (tests/gpx_helpers.py)."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from gpx_helpers import read_gpx, refined_lineout, tree
from midasflow.crystal import cell_to_A
from midasflow.io.gpx import NoFittedPattern, gsas2_name, refined_names, write_gpx
from phase_helpers import ceo2, pbso4, zno

#: The top-level items of a project, in GSAS-II's order.
ITEMS = ["Notebook", "Controls", "Covariance", "Constraints", "Restraints", "Rigid bodies"]
HISTOGRAM_CHILDREN = ["Comments", "Limits", "Background", "Instrument Parameters",
                      "Sample Parameters", "Peak List", "Index Peak List", "Unit Cells List",
                      "Reflection Lists"]


@pytest.fixture(scope="module")
def ceo2_fit():
    return refined_lineout(ceo2(5.40), mode="rietveld")


def _write(tmp_path, fit, mode="rietveld", name="hist_0007"):
    """The project of a refined lineout, holding the whole lineout, as the exports write it."""
    spec, pattern, inst = fit
    return write_gpx(tmp_path / f"{name}.gpx", pattern, inst, mode=mode,
                     histogram_name=f"PWDR {name}", omega_deg=spec.omega_deg, eta_deg=spec.eta_deg,
                     data=(spec.tth_deg, spec.intensity, spec.sigma))


def _check_project(path, pattern, mode, spec=None):
    """Everything a project must hold of ``pattern`` (and of the whole lineout ``spec``, refined
    without limits, when given); returns the parsed tree."""
    items = read_gpx(path)
    names = [item[0][0] for item in items]
    assert names[:6] == ITEMS and names[6] == f"PWDR {path.stem}" and names[7] == "Phases"
    t = tree(path)
    hist = t[f"PWDR {path.stem}"]
    assert list(hist)[1:] == HISTOGRAM_CHILDREN

    # data: the lineout's points (the fitted ones without spec), their weights, the fit;
    # residuals recomputed from them
    hist_dict, arrays, _ = hist[f"PWDR {path.stem}"]
    x, y, w, yc, yb, diff = arrays
    if spec is None:
        np.testing.assert_array_equal(x, pattern.tth_deg)
        np.testing.assert_array_equal(y, pattern.obs)
        np.testing.assert_array_equal(w, pattern.weight)
    else:
        np.testing.assert_array_equal(x, spec.tth_deg)
        np.testing.assert_array_equal(y, spec.intensity)
        np.testing.assert_array_equal(w, np.where(spec.sigma > 0, 1 / spec.sigma**2, 0.0))
    fitted = np.isin(x, pattern.tth_deg)
    assert fitted.sum() == pattern.n_points
    np.testing.assert_array_equal(yc[fitted], pattern.calc)
    np.testing.assert_array_equal(yb[fitted], pattern.bkg)
    np.testing.assert_allclose(diff, y - yc)
    rwp = 100 * math.sqrt(np.sum(w * (y - yc) ** 2) / np.sum(w * y**2))
    assert hist_dict["wR"] == pytest.approx(pattern.rwp, rel=1e-9) == rwp
    assert hist_dict["Nobs"] == x.size == pattern.n_points + pattern.n_dropped

    # background, instrument and sample terms: refined values, flags = what was refined
    back = hist["Background"][0]
    n_back = back[2]
    assert back[0] == "chebyschev-1" and back[3:] == [pattern.values[f"Back;{i}"] for i in range(n_back)]
    assert back[1] == any(f"Back;{i}" in pattern.esds for i in range(n_back))
    inst = hist["Instrument Parameters"][0]
    for key in ("Zero", "U", "V", "W", "X", "Y", "Z", "SH/L"):
        assert inst[key][1] == pattern.values[key] and inst[key][2] == (key in refined_names(pattern)), key
    assert inst["Type"][0] == "PXC" and inst["Lam"][1] > 0
    sample = hist["Sample Parameters"]
    assert sample["Scale"] == [pattern.values["Scale"], "Scale" in pattern.esds]
    assert sample["Azimuth"] == 0.0  # the polarisation's azimuth, as the engine used it

    # limits: from the first point up to the last reflection the engine modelled, nothing excluded
    (lo0, hi0), (lo, hi) = hist["Limits"]
    assert lo0 == lo == x[0] and hi0 == hi >= x[-1]

    phases = [name for name in t["Phases"] if name != "Phases"]
    assert phases == [ph.name for ph in pattern.phases]
    for p, name in enumerate(phases):
        data = t["Phases"][name]
        general = data["General"]
        cell = pattern.cells[name]
        assert general["Cell"][1:] == pytest.approx(list(cell), rel=1e-12)
        assert general["Cell"][0] == any(f"{p}::A{i}" in pattern.esds for i in range(6))
        assert general["SGData"]["SpGrp"] == pattern.phases[p].space_group.hm
        hap = data["Histograms"][f"PWDR {path.stem}"]
        assert hap["LeBail"] == (mode == "lebail")
        assert hap["Scale"][0] == pattern.values[f"{p}:0:Scale"]
        # reflections: the engine's, every one inside the limits GSAS-II generates them for
        ref = hist["Reflection Lists"][name]["RefList"]
        table = pattern.reflections[name]
        assert ref.shape == (table["h"].size, 15)
        np.testing.assert_array_equal(ref[:, 0], table["h"])
        np.testing.assert_allclose(ref[:, 5], table["tth_deg"])
        np.testing.assert_allclose(ref[:, 4], table["d_a"])
        assert ref[:, 5].max() < hi
        assert hist_dict[f"{p}:0:Nref"] == ref.shape[0]
        # RF, RF² as GSAS-II's GUI shows them: from Fo² (extracted in Le Bail; none, 100 %, after Rietveld)
        assert hist_dict[f"{p}:0:Rf"] == hist_dict[f"{p}:0:Rf^2"] == (0.0 if mode == "lebail" else 100.0)
        # atoms: as refined; the site multiplicities fill the cell's composition
        for row, atom in zip(data["Atoms"], pattern.phases[p].atoms):
            assert row[0] == atom.label and row[6] == atom.occ and row[10] == atom.uiso

    # covariance: the refined variables under GSAS-II's names, values, esds, Rwp
    cov = t["Covariance"]["Covariance"]
    names = refined_names(pattern)
    assert cov["varyList"] == [gsas2_name(n) for n in names]
    assert names == [n for n in pattern.esds if n != "SH/L" or pattern.values["SH/L"] > 0.002]
    np.testing.assert_array_equal(cov["sig"], [pattern.esds[n] for n in names])
    for n, v in zip(names, cov["variables"]):
        assert v == (0.0 if "::A" in n and n.split("::A")[1][0] in "xyz" else pattern.values[n])
    assert cov["covMatrix"].shape == (len(names), len(names))
    np.testing.assert_allclose(np.sqrt(np.diag(cov["covMatrix"])), cov["sig"], rtol=1e-9)
    assert cov["Rvals"]["Rwp"] == pattern.rwp and cov["Rvals"]["Nvars"] == len(names)
    assert t["Controls"]["Controls"]["LastSavedAs"] == str(path.resolve())
    return t


def test_ceo2_project(tmp_path, ceo2_fit):
    spec, pattern, _ = ceo2_fit
    path = _write(tmp_path, ceo2_fit)
    t = _check_project(path, pattern, "rietveld", spec)
    assert "0::A0" in pattern.esds
    # a cubic cell: GSAS-II lists the A-terms tied to A0 among the dependent ones, same esd
    dep = t["Covariance"]["Covariance"]["depSigDict"]
    assert dep["0::A1"] == dep["0::A2"] == (pattern.values["0::A0"], pattern.esds["0::A0"])
    assert pattern.cells["CeO2"][0] == pytest.approx(1 / math.sqrt(pattern.values["0::A0"]))
    general = t["Phases"]["CeO2"]["General"]
    assert general["SGData"]["SGLaue"] == "m3m" and general["SGData"]["SGLatt"] == "F"
    assert general["SGData"]["SGInv"] and len(general["SGData"]["SGOps"]) == 24
    sites = {row[0]: (row[7], row[8]) for row in t["Phases"]["CeO2"]["Atoms"]}
    assert sites == {"Ce1": ("m3m", 4), "O1": ("-43m", 8)}
    assert general["NoAtoms"] == {"Ce": 4.0, "O": 8.0}
    # the lineout's η and ω as GSAS-II's MIDAS importer records them
    hist = t["PWDR hist_0007"]
    assert hist["Instrument Parameters"][0]["Azimuth"][1] == 90.0 - spec.eta_deg
    assert hist["Sample Parameters"]["Phi"] == spec.omega_deg
    # written again: the same bytes (stable ids), and no temporary left beside it
    blob = path.read_bytes()
    _write(tmp_path, ceo2_fit)
    assert path.read_bytes() == blob and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


@pytest.fixture(scope="module")
def cut_fit(ceo2_fit):
    """The CeO2 lineout refined within 2θ limits that fall between its points 30|31 and 400|401,
    with σ = 0 at the range's first point, three points in a row and one more inside it:
    (spec, pattern, instrument, limits)."""
    from dataclasses import replace

    from midasflow.refinement.engine import refine_pattern

    spec, _, inst = ceo2_fit
    x, sigma = spec.tth_deg, spec.sigma.copy()
    sigma[[31, 100, 101, 102, 200]] = 0.0
    spec = replace(spec, sigma=sigma)
    limits = ((x[30] + x[31]) / 2, (x[400] + x[401]) / 2)
    pattern = refine_pattern(x, spec.intensity, sigma, [ceo2(5.40)], inst, limits=limits)
    assert pattern.status == "ok" and pattern.n_dropped == 5, pattern.message
    return spec, pattern, inst, limits


def test_limits_and_dropped_points(tmp_path, cut_fit):
    """Refined within limits with points dropped: GSAS-II's limits are the refined range, the
    dropped points weight 0, the points above the range left out."""
    spec, pattern, inst, limits = cut_fit
    x = spec.tth_deg
    path = write_gpx(tmp_path / "cut.gpx", pattern, inst, data=(x, spec.intensity, spec.sigma),
                     limits=limits)
    hist = tree(path)["PWDR cut"]
    hist_dict, (hx, hy, hw, yc, yb, diff), _ = hist["PWDR cut"]
    np.testing.assert_array_equal(hx, x[:401])
    np.testing.assert_array_equal(hy, spec.intensity[:401])
    dropped = [31, 100, 101, 102, 200]
    np.testing.assert_array_equal(hw[dropped], 0.0)
    np.testing.assert_array_equal(np.delete(hw, dropped), 1 / np.delete(spec.sigma[:401], dropped) ** 2)
    assert hist["Limits"] == [(x[0], hist["Limits"][1][1]), [x[31], hist["Limits"][1][1]]]
    assert hist["Limits"][1][1] > x[400]  # up to the last reflection the engine modelled
    # below the limits no fit (as GSAS-II leaves it); inside, the engine's at the fitted points
    assert not yc[:31].any() and not yb[:31].any() and not diff[:31].any()
    fitted = np.isin(hx, pattern.tth_deg)
    assert fitted.sum() == pattern.n_points and not fitted[:32].any() and not fitted[dropped].any()
    np.testing.assert_array_equal(yc[fitted], pattern.calc)
    np.testing.assert_array_equal(yb[fitted], pattern.bkg)
    assert np.all(yb[dropped] > 0)  # interpolated for the plot
    # GSAS-II's residuals: every point from the lower limit on (weight 0 ones too)
    assert hist_dict["Nobs"] == 401 - 31 == pattern.n_points + pattern.n_dropped
    assert hist_dict["wR"] == pytest.approx(pattern.rwp, rel=1e-9)

    # data given in another order: the same histogram; without data, the fitted points only
    order = np.random.default_rng(0).permutation(x.size)
    again = write_gpx(tmp_path / "cut.gpx", pattern, inst, limits=limits,
                      data=(x[order], spec.intensity[order], spec.sigma[order]))
    assert again.read_bytes() == path.read_bytes()
    hist = tree(write_gpx(tmp_path / "fitted.gpx", pattern, inst))["PWDR fitted"]
    np.testing.assert_array_equal(hist["PWDR fitted"][1][0], pattern.tth_deg)
    assert hist["Limits"][1][0] == pattern.tth_deg[0] and len(hist["Limits"]) == 2


def test_data_not_refined_is_refused(tmp_path, cut_fit):
    """Data or limits that are not what the pattern was refined from: a clear error, no file."""
    spec, pattern, inst, limits = cut_fit
    data = (spec.tth_deg, spec.intensity, spec.sigma)
    with pytest.raises(ValueError, match="the whole lineout.*not the points"):
        write_gpx(tmp_path / "x.gpx", pattern, inst, data=data)
    with pytest.raises(ValueError, match=r"limits 2\.\..*not the points"):
        write_gpx(tmp_path / "x.gpx", pattern, inst, data=data, limits=(2.0, limits[1]))
    with pytest.raises(ValueError, match="not the points"):
        write_gpx(tmp_path / "x.gpx", pattern, inst, data=(data[0], data[1] * 2, data[2]), limits=limits)
    with pytest.raises(ValueError, match="differ in length"):
        write_gpx(tmp_path / "x.gpx", pattern, inst, data=(data[0], data[1][1:], data[2]))
    assert not list(tmp_path.iterdir())


def test_reader_refuses_other_objects(tmp_path):
    path = tmp_path / "evil.gpx"
    path.write_bytes(pickle.dumps([["Notebook", [complex(1, 2)]]], protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        read_gpx(path)


def test_lineout_without_weights_is_refused(tmp_path, ceo2_fit):
    from dataclasses import replace

    _, pattern, inst = ceo2_fit
    with pytest.raises(NoFittedPattern, match="weights"):
        write_gpx(tmp_path / "x.gpx", replace(pattern, weight=np.zeros(0)), inst)
    with pytest.raises(ValueError, match="mode"):
        write_gpx(tmp_path / "x.gpx", pattern, inst, mode="pawley")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("phase_fn,mode,atoms", [(zno, "lebail", False), (pbso4, "rietveld", True)])
def test_other_phases(tmp_path, phase_fn, mode, atoms):
    fit = refined_lineout(phase_fn(), mode=mode, refine_atoms=atoms)
    spec, pattern, _ = fit
    path = _write(tmp_path, fit, mode=mode)
    t = _check_project(path, pattern, mode, spec)
    name = pattern.phases[0].name
    general = t["Phases"][name]["General"]
    if name == "ZnO":
        assert general["SGData"]["SGLaue"] == "6/mmm" and general["SGData"]["SGPolax"] == "z"
        assert {row[0]: row[7] for row in t["Phases"][name]["Atoms"]} == {"Zn1": "3m(100)", "O1": "3m(100)"}  # GSAS-II's SytSym
        # Le Bail: the extracted intensities are kept as Fo²
        ref = t[f"PWDR {path.stem}"]["Reflection Lists"][name]["RefList"]
        np.testing.assert_array_equal(ref[:, 8], ref[:, 9])
    else:
        # refined coordinates are GSAS-II shifts dAx.. (0), the new positions in the atom records
        cov = t["Covariance"]["Covariance"]
        moved = [v for v in cov["varyList"] if "::dA" in v]
        assert moved and set(cov["newAtomDict"]) == set(moved)
        rows = t["Phases"][name]["Atoms"]
        for var in moved:
            j, axis = int(var.split(":")[-1]), "xyz".index(var.split("::dA")[1][0])
            assert rows[j][3 + axis] == pytest.approx(pattern.values[var.replace("::dA", "::A")] % 1.0)
            assert cov["newAtomDict"][var][1] == pytest.approx(rows[j][3 + axis])
        assert {row[7] for row in rows} == {"m(y)", "1"}
        A = cell_to_A(pattern.cells[name][:6])
        assert [pattern.values[f"0::A{i}"] for i in range(3)] == pytest.approx(A[:3])


@pytest.mark.slow
def test_textured_projects(tmp_path):
    """March–Dollase along the chosen axis and spherical harmonics go into the phase's
    Pref.Ori. as GSAS-II holds them; the reflections carry the engine's PO factors."""
    from midasflow.refinement.engine import refine_pattern
    from test_texture_refine import INST, X
    from test_texture_refine import simulate as simulate_textured

    y, sigma = simulate_textured(zno(), {"0:0:MD": 1.25}, po_axis=(1, 0, 0))
    md = refine_pattern(X, y, sigma, [zno()], INST, texture="md", po_axis=(1, 0, 0))
    t = tree(write_gpx(tmp_path / "md.gpx", md, INST, po_axis=(1, 0, 0), omega_deg=30.0))
    pref = t["Phases"]["ZnO"]["Histograms"]["PWDR md"]["Pref.Ori."]
    assert pref[:4] == ["MD", md.values["0:0:MD"], True, [1, 0, 0]]
    po = t["PWDR md"]["Reflection Lists"]["ZnO"]["RefList"][:, 12]
    assert po.min() < 0.9 < 1.1 < po.max()  # r = 1.25 along [100]
    assert t["PWDR md"]["Sample Parameters"]["Phi"] == 30.0

    truth = {"0:0:C(2,0)": 0.3, "0:0:C(4,0)": -0.2}
    y, sigma = simulate_textured(zno(), truth, texture="sh")
    sh = refine_pattern(X, y, sigma, [zno()], INST, texture="sh")
    t = tree(write_gpx(tmp_path / "sh.gpx", sh, INST, omega_deg=30.0))
    pref = t["Phases"]["ZnO"]["Histograms"]["PWDR sh"]["Pref.Ori."]
    assert pref[0] == "SH" and pref[2] and pref[4] == 4
    assert pref[5] == {k.split(":")[-1]: v for k, v in sh.values.items() if ":0:C(" in k}
    # GSAS-II's harmonics would turn the sample by Phi; the engine's do not: Phi stays 0
    assert t["PWDR sh"]["Sample Parameters"]["Phi"] == 0.0
