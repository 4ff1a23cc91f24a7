"""Small phases shared by the engine tests (CeO2, Si, ZnO, PbSO4 with literature coordinates)."""

from midasflow.crystal import Atom, cubic_phase, phase_from_cell


def ceo2(a=5.4113):
    return cubic_phase("CeO2", a)


def si(a=5.431):
    return cubic_phase("Si", a, "F d -3 m", [Atom("Si1", "Si", (0.0, 0.0, 0.0), 1.0, 0.005)])


def zno(a=3.2498, c=5.2066):
    return phase_from_cell("ZnO", (a, a, c, 90, 90, 120), "P 63 m c",
                           [Atom("Zn1", "Zn", (1 / 3, 2 / 3, 0.0), 1.0, 0.006),
                            Atom("O1", "O", (1 / 3, 2 / 3, 0.3819), 1.0, 0.008)])


def pbso4(a=8.48, b=5.398, c=6.958):
    return phase_from_cell("PbSO4", (a, b, c, 90, 90, 90), "P n m a",
                           [Atom("Pb1", "Pb", (0.1879, 0.25, 0.167), 1.0, 0.0163),
                            Atom("S1", "S", (0.0654, 0.25, 0.684), 1.0, 0.0109),
                            Atom("O1", "O", (0.9083, 0.25, 0.5954), 1.0, 0.0193),
                            Atom("O2", "O", (0.1940, 0.25, 0.5432), 1.0, 0.0220),
                            Atom("O3", "O", (0.0810, 0.0272, 0.8086), 1.0, 0.0156)])
