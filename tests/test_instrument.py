"""midasflow.instrument: the one name table, the defaults, and MIDAS's terms round-tripping through
GSAS-II's importer rule."""
from __future__ import annotations

import pytest

from midasflow.instrument import (
    DATASET_NAMES,
    IMPORTER_DEFAULT_WAVELENGTH_A,
    MIDAS_DEFAULT_WAVELENGTH_A,
    MIDAS_WRITE_DEFAULTS,
    PARAMETER_FILE_KEYS,
    Instrument,
    gsas_names,
    importer_values,
)
from midasflow.params import params_from_text


def test_the_name_table_spells_each_term_three_ways():
    # parameter file -> GSAS-II (midas_parameters.md), dataset -> GSAS-II (midas_zarr_layout.md)
    assert PARAMETER_FILE_KEYS == {"Polariz": "Polariz.", "SHpL": "SH/L", "U": "U", "V": "V", "W": "W",
                                   "X": "X", "Y": "Y", "Z": "Z"}
    assert list(DATASET_NAMES) == ["Polariz", "Lam", "SH_L", "U", "V", "W", "X", "Y", "Z", "Distance"]
    assert DATASET_NAMES["SH_L"] == "SH/L" and DATASET_NAMES["Polariz"] == "Polariz."


def test_midas_and_importer_defaults():
    assert MIDAS_WRITE_DEFAULTS == {"Lam": 0.172978, "Polariz.": 0.99, "SH/L": 0.002, "U": 1.163, "V": -0.126,
                                    "W": 0.063, "X": 0.0, "Y": 0.0, "Z": 0.0, "Distance": 1.0e6}
    assert MIDAS_DEFAULT_WAVELENGTH_A == 0.172978 and IMPORTER_DEFAULT_WAVELENGTH_A == 0.413263
    # with nothing in the file, GSAS-II's importer assumes its own wavelength and R = 1000 mm
    assert Instrument.from_dict(importer_values({})) == Instrument()
    assert Instrument().lam == 0.413263 and Instrument().gonio_radius_mm == 1000.0


def test_parameter_file_terms_survive_the_store_and_the_importer():
    params = params_from_text("Wavelength 0.2\nLsd 657437\nPolariz 0.95\nSHpL 0.004\nU 3.5\nY 1.25\n")
    inst = params.instrument
    assert (inst.lam, inst.polariz, inst.shl, inst.U, inst.Y) == (0.2, 0.95, 0.004, 3.5, 1.25)
    assert inst.V == -0.126 and inst.W == 0.063 and inst.gonio_radius_mm == pytest.approx(657.437)
    stored = inst.to_midas()
    assert stored["Distance"] == 657437.0  # Lsd as written, not 657.437 * 1000 one ulp off
    midas_named = {name: stored[key] for name, key in DATASET_NAMES.items()}  # as the zip holds them
    back = Instrument.from_dict(importer_values(midas_named), source=params.source)
    assert back == inst


def test_importer_takes_its_own_keys_and_drops_others():
    named = gsas_names({"Polariz": 0.9, "SH_L": 0.01, "Zero": 0.02, "Type": "PXC", "Bank": 3.0,
                        "Unrelated": 7.0, "Distance": 5.0e5})
    assert named == {"Polariz.": 0.9, "SH/L": 0.01, "Zero": 0.02, "Type": "PXC", "Bank": 3.0, "Distance": 5.0e5}
    values = importer_values(named)
    assert values["Gonio. radius"] == 500.0 and "Distance" not in values and values["Zero"] == 0.02
