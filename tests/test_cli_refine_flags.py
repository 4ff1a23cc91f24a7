"""``midasflow refine`` flag handling that changes results: --ref-cell."""
import argparse

import pytest

from midasflow.cli.refine import ref_cells_from
from midasflow.crystal import cubic_phase, phase_from_cell, write_phase_cif
from midasflow.errors import ParameterError


def _args(cif, ref_cell):
    return argparse.Namespace(cif=[str(cif)], ref_cell=ref_cell)


def test_ref_cell_three_values_keep_the_cif_angles(tmp_path):
    cif = write_phase_cif(phase_from_cell("Zn", (2.665, 2.665, 4.947, 90, 90, 120), "P 63/m m c"),
                          tmp_path / "Zn.cif")
    cells = ref_cells_from(_args(cif, [2.66, 2.66, 4.95]))
    assert cells == {"Zn": (2.66, 2.66, 4.95, 90.0, 90.0, 120.0)}


def test_ref_cell_one_value_is_cubic_only(tmp_path):
    cubic = write_phase_cif(cubic_phase("CeO2", 5.41), tmp_path / "CeO2.cif")
    assert ref_cells_from(_args(cubic, [5.4]))["CeO2"] == (5.4, 5.4, 5.4, 90.0, 90.0, 90.0)
    hexa = write_phase_cif(phase_from_cell("Zn", (2.665, 2.665, 4.947, 90, 90, 120), "P 63/m m c"),
                           tmp_path / "Zn.cif")
    with pytest.raises(ParameterError, match="cubic a"):
        ref_cells_from(_args(hexa, [2.66]))
