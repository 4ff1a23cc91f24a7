"""Tests of midasflow.crystal: CIF reading, A-terms, reflection lists, |F|²."""

import pickle

import numpy as np
import pytest

from midasflow.crystal import (A_to_cell, Atom, StructureFactorTable, anomalous_factors,
                               cell_esds, cell_to_A, cubic_phase, free_coordinates,
                               laue_tie_matrix,
                               phase_from_cell, read_phase, read_phases, reflections,
                               write_phase_cif)
from midasflow.errors import CIFError

PBSO4 = """data_PbSO4
_cell_length_a 8.48
_cell_length_b 5.398
_cell_length_c 6.958
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_cell_formula_units_Z 4
_symmetry_space_group_name_H-M 'P n m a'
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
_atom_site_occupancy
_atom_site_U_iso_or_equiv
Pb1 Pb2+ 0.1879 0.25 0.167 1 0.0163
S1 S 0.0654 0.25 0.684 1 0.0109
O1 O 0.9083 0.25 0.5954 1 0.0193
O2 O 0.1940 0.25 0.5432 1 0.0220
O3 O 0.0810 0.0272 0.8086 1 0.0156
"""

CEO2 = """data_CeO2
_cell_length_a 5.4113
_cell_length_b 5.4113
_cell_length_c 5.4113
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_space_group_name_H-M_alt 'F m -3 m'
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
_atom_site_U_iso_or_equiv
Ce1 Ce4+ 0 0 0 0.005
O1 O2- 0.25 0.25 0.25 0.008
"""

ZNO = """data_ZnO
_cell_length_a 3.2498
_cell_length_b 3.2498
_cell_length_c 5.2066
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 120
loop_
_space_group_symop_operation_xyz
'x,y,z'
'-y,x-y,z'
'-x+y,-x,z'
'-x,-y,z+1/2'
'y,-x+y,z+1/2'
'x-y,x,z+1/2'
'-y,-x,z'
'-x+y,y,z'
'x,x-y,z'
'y,x,z+1/2'
'x-y,-y,z+1/2'
'-x,-x+y,z+1/2'
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
_atom_site_U_iso_or_equiv
Zn1 Zn 0.33333 0.66667 0.0 0.006
O1 O 0.33333 0.66667 0.3819 0.008
"""

ANISO = """data_aniso
_cell_length_a 4.0
_cell_length_b 5.0
_cell_length_c 6.0
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_space_group_name_H-M 'P 1'
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
Fe1 Fe 0 0 0
loop_
_atom_site_aniso_label
_atom_site_aniso_U_11
_atom_site_aniso_U_22
_atom_site_aniso_U_33
_atom_site_aniso_U_12
_atom_site_aniso_U_13
_atom_site_aniso_U_23
Fe1 0.01 0.02 0.03 0 0 0
"""


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_pbso4_multiplicities_and_d(tmp_path):
    ph = read_phase(_write(tmp_path, "PbSO4.cif", PBSO4))
    assert ph.laue == "mmm" and ph.z_formula == 4 and len(ph.atoms) == 5
    assert ph.atoms[0].element == "Pb"
    r = reflections(ph, 0.413263, 6.0)
    table = {tuple(h): (m, d) for h, m, d in zip(r.hkl, r.mult, r.d_a)}
    assert table[(1, 0, 1)][0] == 4 and abs(table[(1, 0, 1)][1] - 5.37902856) < 1e-6
    assert table[(0, 1, 1)][0] == 4 and abs(table[(0, 1, 1)][1] - 4.26501274) < 1e-6
    assert table[(2, 0, 0)][0] == 2 and abs(table[(2, 0, 0)][1] - 4.24) < 1e-6
    # systematic absences of Pnma: (1 0 0), (0 1 0), (0 0 1), (1 1 0) is allowed? h k 0: h even
    assert (1, 0, 0) not in table and (0, 1, 0) not in table and (0, 0, 1) not in table
    assert (1, 1, 0) not in table          # a-glide ⊥ c: hk0 needs h even
    assert np.all(np.diff(r.tth_deg) >= 0)
    for eq, m in zip(r.equivalents, r.mult):
        assert eq.shape == (m, 3)


def test_ceo2_structure_factor_and_multiplicity(tmp_path):
    ph = read_phase(_write(tmp_path, "CeO2.cif", CEO2))
    assert ph.laue == "m3m"
    r = reflections(ph, 0.172979, 10.0)
    hkl = [tuple(h) for h in r.hkl]
    assert hkl[:4] == [(1, 1, 1), (2, 0, 0), (2, 2, 0), (3, 1, 1)]
    assert list(r.mult[:4]) == [8, 6, 12, 24]
    assert (1, 0, 0) not in hkl and (2, 1, 0) not in hkl   # F centring
    # (111): O cancels, F = 4 f_Ce T_Ce;  (200): F = 4 f_Ce T_Ce - 8 f_O T_O, f = f0 + f′ + i f″
    import gemmi
    fp_ce, fpp_ce = anomalous_factors("Ce", 0.172979)
    fp_o, fpp_o = anomalous_factors("O", 0.172979)
    s2 = 1 / (4 * r.d_a[0] ** 2)
    t_ce = np.exp(-8 * np.pi ** 2 * 0.005 * s2)
    f_ce = gemmi.Element("Ce").it92.calculate_sf(s2)
    assert r.fsq[0] == pytest.approx(abs(4 * (f_ce + fp_ce + 1j * fpp_ce) * t_ce) ** 2, rel=1e-6)
    s2 = 1 / (4 * r.d_a[1] ** 2)
    t_ce, t_o = (np.exp(-8 * np.pi ** 2 * u * s2) for u in (0.005, 0.008))
    f_ce = gemmi.Element("Ce").it92.calculate_sf(s2)
    f_o = gemmi.Element("O").it92.calculate_sf(s2)
    F = 4 * (f_ce + fp_ce + 1j * fpp_ce) * t_ce - 8 * (f_o + fp_o + 1j * fpp_o) * t_o
    assert r.fsq[1] == pytest.approx(abs(F) ** 2, rel=1e-6)
    # without a wavelength the table leaves f′ and f″ out
    plain = StructureFactorTable(ph, r.hkl[:1]).fsq(np.array([1 / r.d_a[0] ** 2]))
    s2 = 1 / (4 * r.d_a[0] ** 2)
    f_ce = gemmi.Element("Ce").it92.calculate_sf(s2) * np.exp(-8 * np.pi ** 2 * 0.005 * s2)
    assert plain[0] == pytest.approx((4 * f_ce) ** 2, rel=1e-6)


# f′, f″ (electrons) from GSAS-II's own Cromer–Liberman code: GSASIIElem.FPcalc on the orbital
# tables of GSASII/inputs/Xsect.dat with E = 12.397639/λ keV (GSAS-II 5.x source, evaluated
# outside this repository). xraylib's Kissel tabulation agrees within the tolerances below.
GSAS2_FPRIME = {  # (element, λ Å): (f′, f″)
    ("Ce", 0.41): (-1.1888, 0.9948), ("Ce", 1.5405): (-1.8543, 9.6534),
    ("Ce", 0.17): (-0.0993, 1.2854), ("O", 0.41): (0.0014, 0.0018),
    ("O", 1.5405): (0.0492, 0.0322), ("O", 0.17): (-0.0031, 0.0002),
    ("Pb", 0.41): (-0.6692, 4.1592), ("Pb", 1.5405): (-4.0780, 8.5013),
    ("Pb", 0.17): (-1.9550, 0.9137), ("S", 0.41): (0.0436, 0.0401),
    ("S", 1.5405): (0.3331, 0.5567), ("S", 0.17): (-0.0061, 0.0061),
}


@pytest.mark.parametrize("element,lam", sorted(GSAS2_FPRIME))
def test_anomalous_factors_match_gsas2(element, lam):
    fp, fpp = anomalous_factors(element, lam)
    g_fp, g_fpp = GSAS2_FPRIME[(element, lam)]
    assert abs(fp - g_fp) < 0.12, (fp, g_fp)
    assert abs(fpp - g_fpp) < 0.03 * g_fpp + 0.002, (fpp, g_fpp)


def test_non_centrosymmetric_fsq_is_the_friedel_mean(tmp_path):
    ph = read_phase(_write(tmp_path, "ZnO.cif", ZNO))
    r = reflections(ph, 1.5405, 60.0)
    import gemmi
    ops = ph.space_group.operations()

    def F(h, s2):
        total = 0j
        for atom in ph.atoms:
            fp, fpp = anomalous_factors(atom.element, 1.5405)
            f = (gemmi.Element(atom.element).it92.calculate_sf(s2) + fp + 1j * fpp) \
                * np.exp(-8 * np.pi ** 2 * atom.uiso * s2) * atom.occ
            orbit = {tuple(np.round(np.mod(op.apply_to_xyz(atom.xyz), 1.0), 3) % 1.0): xyz
                     for op in ops for xyz in [np.mod(op.apply_to_xyz(atom.xyz), 1.0)]}
            total += f * sum(np.exp(2j * np.pi * np.dot(h, xyz)) for xyz in orbit.values())
        return total

    differs = 0
    for h, d, fsq in zip(r.hkl, r.d_a, r.fsq):
        s2 = 1 / (4 * d * d)
        plus, minus = abs(F(h, s2)) ** 2, abs(F(-h, s2)) ** 2
        assert fsq == pytest.approx((plus + minus) / 2, rel=1e-6)
        differs += abs(plus - minus) > 1e-3 * plus
    assert differs > 0        # the anomalous terms make Friedel mates differ in ZnO (P6_3mc)


def test_structure_factor_derivatives_with_anomalous_terms(tmp_path):
    ph = read_phase(_write(tmp_path, "ZnO.cif", ZNO))
    r = reflections(ph, 1.5405, 90.0)
    table = StructureFactorTable(ph, r.hkl, 1.5405)
    inv_d2 = 1 / r.d_a ** 2
    uiso = np.array([0.006, 0.009])
    fsq, d_inv, d_u = table.fsq(inv_d2, uiso, derivatives=True)
    h = 1e-7
    num = (table.fsq(inv_d2 + h, uiso) - table.fsq(inv_d2 - h, uiso)) / (2 * h)
    assert np.allclose(d_inv, num, rtol=1e-5, atol=1e-6 * fsq.max())
    for j in range(2):
        du = np.zeros(2)
        du[j] = 1e-7
        num = (table.fsq(inv_d2, uiso + du) - table.fsq(inv_d2, uiso - du)) / 2e-7
        assert np.allclose(d_u[j], num, rtol=1e-5, atol=1e-6 * fsq.max())


def test_hexagonal_from_symops(tmp_path):
    ph = read_phase(_write(tmp_path, "ZnO.cif", ZNO))
    assert ph.space_group.number == 186 and ph.laue == "6/mmm"
    r = reflections(ph, 0.172979, 8.0)
    table = {tuple(h): m for h, m in zip(r.hkl, r.mult)}
    assert table[(1, 0, 0)] == 6 and table[(0, 0, 2)] == 2 and table[(1, 0, 1)] == 12
    assert (0, 0, 1) not in table          # 6_3: 00l with l odd absent


def test_uaniso_reduced_to_ueq(tmp_path):
    ph = read_phase(_write(tmp_path, "a.cif", ANISO))
    assert ph.atoms[0].uiso == pytest.approx(0.02, rel=1e-9)


def test_cif_errors(tmp_path):
    with pytest.raises(CIFError, match="cannot be read"):
        read_phase(_write(tmp_path, "bad.cif", "data_x\nloop_\n_a\n'unterminated\n"))
    nocell = "\n".join(line for line in PBSO4.splitlines() if not line.startswith("_cell"))
    with pytest.raises(CIFError, match="no unit cell"):
        read_phase(_write(tmp_path, "nocell.cif", nocell))
    nosym = "\n".join(line for line in PBSO4.splitlines() if "H-M" not in line)
    with pytest.raises(CIFError, match="no space group"):
        read_phase(_write(tmp_path, "nosym.cif", nosym))
    with pytest.raises(CIFError, match="missing.cif"):
        read_phase(tmp_path / "missing.cif")


def test_read_phases_unique_names(tmp_path):
    a = _write(tmp_path, "x.cif", CEO2)
    (tmp_path / "sub").mkdir()
    b = _write(tmp_path / "sub", "x.cif", PBSO4)
    names = [p.name for p in read_phases([a, b])]
    assert names == ["x", "x_2"]


@pytest.mark.parametrize("cell,laue,axis", [
    ((5.4, 5.4, 5.4, 90, 90, 90), "m3m", "b"),
    ((3.2, 3.2, 5.2, 90, 90, 120), "6/mmm", "b"),
    ((4.1, 4.1, 6.3, 90, 90, 90), "4/mmm", "b"),
    ((8.48, 5.398, 6.958, 90, 90, 90), "mmm", "b"),
    ((5.1, 6.2, 7.3, 90, 103.2, 90), "2/m", "b"),
    ((5.1, 6.2, 7.3, 81.0, 93.2, 101.5), "-1", "b"),
    ((4.0, 4.0, 4.0, 80, 80, 80), "3mR", "b"),
])
def test_A_terms_and_ties(cell, laue, axis):
    A = cell_to_A(cell)
    assert np.allclose(A_to_cell(A), cell, rtol=1e-12, atol=1e-10)
    T, free = laue_tie_matrix(laue, axis)
    assert np.allclose(T @ A[free], A, atol=1e-14)
    esd = cell_esds(A, np.eye(len(free)) * 1e-14, laue, axis)
    assert esd.shape == (7,) and np.all(esd[:3] > 0) and esd[6] > 0
    if laue in ("m3m", "6/mmm", "4/mmm", "mmm"):
        assert np.all(esd[3:6] == 0)


def test_cell_esd_cubic_analytic():
    a = 5.4
    A = cell_to_A((a, a, a, 90, 90, 90))
    var = 1e-12
    esd = cell_esds(A, np.array([[var]]), "m3m")
    # a = A0^-1/2 -> σ_a = a³/2 σ_A0 ; V = a³ -> σ_V = 3a² σ_a
    assert esd[0] == pytest.approx(a ** 3 / 2 * 1e-6, rel=1e-5)
    assert esd[6] == pytest.approx(3 * a ** 2 * esd[0], rel=1e-5)


def test_fsq_derivatives_match_finite_differences():
    ph = phase_from_cell("PbSO4", (8.48, 5.398, 6.958, 90, 90, 90), "P n m a",
                         [Atom("Pb1", "Pb", (0.1879, 0.25, 0.167), 1.0, 0.0163),
                          Atom("O3", "O", (0.081, 0.0272, 0.8086), 1.0, 0.0156)])
    r = reflections(ph, 0.413263, 12.0)
    sf = StructureFactorTable(ph, r.hkl, 0.413263)
    inv_d2 = 1 / r.d_a ** 2
    f, dq, du = sf.fsq(inv_d2, derivatives=True)
    assert np.allclose(f, r.fsq)
    h = 1e-7
    num = (sf.fsq(inv_d2 + h) - sf.fsq(inv_d2 - h)) / (2 * h)
    assert np.allclose(dq, num, rtol=1e-5, atol=1e-6 * f.max())
    u = sf.uiso.copy()
    up, um = u.copy(), u.copy()
    up[1] += 1e-7
    um[1] -= 1e-7
    num = (sf.fsq(inv_d2, up) - sf.fsq(inv_d2, um)) / 2e-7
    assert np.allclose(du[1], num, rtol=1e-5, atol=1e-6 * f.max())


def test_cif_round_trip_and_pickle(tmp_path):
    ph = read_phase(_write(tmp_path, "PbSO4.cif", PBSO4))
    out = write_phase_cif(ph.with_cell((8.5, 5.4, 6.96, 90, 90, 90)), tmp_path / "o" / "r.cif")
    back = read_phase(out)
    assert back.cell == pytest.approx((8.5, 5.4, 6.96, 90, 90, 90))
    assert back.space_group.number == 62 and len(back.atoms) == 5
    assert back.atoms[2].xyz == pytest.approx(ph.atoms[2].xyz, abs=1e-6)
    assert pickle.loads(pickle.dumps(ph)).space_group.hm == "P n m a"
    assert cubic_phase("c", 4.0).laue == "m3m"


@pytest.mark.parametrize("which", ["PbSO4", "ZnO"])
def test_fsq_coordinate_derivatives_match_finite_differences(tmp_path, which):
    """∂|F|²/∂(x, y, z) (analytic, through each orbit member's operation) against central
    differences of tables rebuilt at moved coordinates: general and special positions, a
    non-centrosymmetric phase with anomalous terms."""
    if which == "PbSO4":
        ph = phase_from_cell("PbSO4", (8.48, 5.398, 6.958, 90, 90, 90), "P n m a",
                             [Atom("Pb1", "Pb", (0.1879, 0.25, 0.167), 1.0, 0.0163),
                              Atom("O3", "O", (0.081, 0.0272, 0.8086), 1.0, 0.0156)])
        lam = 0.413263
    else:
        ph, lam = read_phase(_write(tmp_path, "ZnO.cif", ZNO)), 1.5405
    r = reflections(ph, lam, 60.0)
    inv_d2 = 1 / r.d_a ** 2
    sf = StructureFactorTable(ph, r.hkl, lam)
    f = sf.fsq(inv_d2)
    d_xyz = sf.dfsq_dxyz(inv_d2)
    assert d_xyz.shape == (len(ph.atoms), 3, len(f))
    h = 1e-6
    checked = 0
    for j, atom in enumerate(ph.atoms):
        for axis, free in enumerate(free_coordinates(ph, atom)):
            if not free:
                continue
            moved = []
            for sgn in (1, -1):
                xyz = list(atom.xyz)
                xyz[axis] += sgn * h
                atoms = list(ph.atoms)
                atoms[j] = Atom(atom.label, atom.element, tuple(xyz), atom.occ, atom.uiso)
                moved.append(StructureFactorTable(ph.with_atoms(atoms), r.hkl, lam).fsq(inv_d2))
            num = (moved[0] - moved[1]) / (2 * h)
            assert np.abs(num).max() > 1e-3 * f.max()
            assert np.allclose(d_xyz[j, axis], num, rtol=1e-6, atol=1e-7 * f.max()), (j, axis)
            checked += 1
    assert checked == (5 if which == "PbSO4" else 2)    # Pb x, z; O3 x, y, z / Zn z, O z
