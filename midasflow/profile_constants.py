"""Constants of GSAS-II's constant-wavelength peak profile shared by the profile kernels.

Both implementations of the profile kernels (:mod:`midasflow.profile_numpy`, the first-use tier,
and :mod:`midasflow.profile_compiled`, numba) read these; ``docs/reference/gsas2_profile.md``
section 2 describes where they come from.
"""
from __future__ import annotations

import math

import numpy as np

# Gauss-Legendre table sizes of PSVFCJO (all even); N = first entry >= K, 400 if K > 300.
NTERMS = np.array(
    [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 40, 50, 60, 70, 80, 90, 100, 110,
     120, 140, 160, 180, 200, 220, 240, 260, 280, 300, 400], dtype=np.int64)
FSTTERM = np.concatenate(([0], np.cumsum(NTERMS // 2)[:-1])).astype(np.int64)

COFT = np.array([1.0, 2.69269, 2.42843, 4.47163, 0.07842, 1.0])  # TCH FWHM coefficients
COFN = np.array([1.36603, -0.47719, 0.11116])                    # TCH eta coefficients
STOFW = 2.35482005       # 2 sqrt(2 ln 2)
SQ2PI = 2.506628275      # sqrt(2 pi)
PI_LORENTZ = 3.1415292654  # sic: the mistyped pi of GSAS-II's lorentz.for
RPD = 0.017453292519943  # radians per degree as in GSAS-II's sind/cosd/acosd
#: PSVOIGT clamps the Gaussian exponent at −20: exp(−20), and the dx²/σ² beyond which the clamp
#: holds whatever the rounding (40 with a 2.5e-5 relative margin; float32 rounding is ~1e-7)
EXP_FLOOR = math.exp(-20.0)
GAUSS_FLOOR_DX2 = 40.001
