"""MIDAS detector geometry: pixel (y, z) -> (R, 2θ, η), and the ImTransOpt image transforms.

Everything here is pure, vectorised numpy and follows docs/reference/midas_parameters.md §4:

* Pixel (y, z) has its centre at integer (y, z); y is the column (fast axis), z the row.
* ``ImTransOpt`` codes are applied to the *raw image* in list order: 0 (or −1) = nothing,
  1 = flip left-right (y -> NY−1−y), 2 = flip top-bottom (z -> NZ−1−z), 3 = transpose (square
  detectors only). Beam centre, tilts and distortion are defined in the transformed frame.
* Centred detector coordinates (µm) y_c = (BC_y − Y)·px, z_c = (Z − BC_z)·px are tilted by
  TRs = Rx(tx)·Ry(ty)·Rz(tz); P = (Lsd, 0, 0) + TRs·(0, y_c, z_c); Rad = Lsd/P_x·√(P_y²+P_z²);
  η = atan2(−P_y, P_z) in (−180°, 180°]; R = Rad·D(ρ, η)/px (+ parallax), with the 15-term
  distortion D of midas_parameters.md §4.3 and ρ = Rad/RhoD. ``pxY`` (``Params.px_um``) is used for both axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike, NDArray

from midasflow.errors import ParameterError

if TYPE_CHECKING:
    from midasflow.params import Params

__all__ = [
    "tilt_matrix",
    "pixel_to_r_eta",
    "r_to_tth_deg",
    "tth_to_r_px",
    "tth_to_q_inv_a",
    "raw_to_transformed",
    "transformed_to_raw",
    "transform_image",
    "untransform_image",
    "pixel_map",
]

_VALID_CODES = (-1, 0, 1, 2, 3)


def tilt_matrix(tx_deg: float, ty_deg: float, tz_deg: float) -> NDArray[np.float64]:
    """MIDAS tilt matrix TRs = Rx(tx)·Ry(ty)·Rz(tz).

    Parameters
    ----------
    tx_deg, ty_deg, tz_deg : float
        Detector tilts in degrees about the lab x (beam), y (horizontal) and z (vertical) axes.

    Returns
    -------
    ndarray, shape (3, 3), float64
        Rotation matrix applied to column vectors (x, y, z).
    """
    a, b, c = np.deg2rad([tx_deg, ty_deg, tz_deg])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(a), -np.sin(a)], [0.0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0.0, np.sin(b)], [0.0, 1.0, 0.0], [-np.sin(b), 0.0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0.0], [np.sin(c), np.cos(c), 0.0], [0.0, 0.0, 1.0]])
    return rx @ ry @ rz


def _distortion_factor(rho: NDArray, eta_deg: NDArray, p: Sequence[float]) -> NDArray:
    """Multiplicative radial distortion D(ρ, η) of midas_parameters.md §4.3 (p3, p6, p8, p10, p12, p14 in degrees).

    D = 1 + p0·ρ²·cos(2η_T + p6) + p1·ρ⁴·cos(4η_T + p3) + p2·ρ² + p4·ρ⁶ + p5·ρ⁴
          + p7·ρ⁴·cos(η_T + p8) + p9·ρ³·cos(3η_T + p10) + p11·ρ⁵·cos(5η_T + p12)
          + p13·ρ⁶·cos(6η_T + p14),  η_T = 90° − η.  Terms with a zero amplitude are skipped.
    """
    # (amplitude index, power of ρ, harmonic n, phase index); n = 0 means isotropic
    terms = ((0, 2, 2, 6), (1, 4, 4, 3), (2, 2, 0, -1), (4, 6, 0, -1), (5, 4, 0, -1),
             (7, 4, 1, 8), (9, 3, 3, 10), (11, 5, 5, 12), (13, 6, 6, 14))
    d = np.ones_like(rho)
    eta_t = 90.0 - eta_deg
    for amp, power, n, phase in terms:
        if p[amp] == 0.0:
            continue
        term = p[amp] * rho**power
        if n:
            term = term * np.cos(np.deg2rad(n * eta_t + p[phase]))
        d += term
    return d


def pixel_to_r_eta(
    y_px: ArrayLike, z_px: ArrayLike, params: Params
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Map detector positions of the transformed frame to (R, η).

    Parameters
    ----------
    y_px, z_px : array_like of float, broadcastable
        Column and row positions in the TRANSFORMED frame (pixel centres at integers).
    params : Params
        Geometry: ``px_um``, ``lsd_um``, ``bc_y_px``, ``bc_z_px``, ``tx_deg``, ``ty_deg``,
        ``tz_deg``, ``rhod_um``, ``p`` (15 terms), ``parallax_um``.

    Returns
    -------
    r_px : ndarray, float64
        Radius in pixels on the plane normal to the beam at Lsd, after distortion and parallax.
    eta_deg : ndarray, float64
        Azimuth η = atan2(−P_y, P_z) in degrees, in (−180, 180]; 0 along +Z, +90 along +Y.
    """
    y = np.asarray(y_px, dtype=np.float64)
    z = np.asarray(z_px, dtype=np.float64)
    px = float(params.px_um)
    lsd = float(params.lsd_um)
    yc = (float(params.bc_y_px) - y) * px
    zc = (z - float(params.bc_z_px)) * px
    t = tilt_matrix(params.tx_deg, params.ty_deg, params.tz_deg)
    p_x = lsd + t[0, 1] * yc + t[0, 2] * zc
    p_y = t[1, 1] * yc + t[1, 2] * zc
    p_z = t[2, 1] * yc + t[2, 2] * zc
    rad_um = (lsd / p_x) * np.hypot(p_y, p_z)
    eta_deg = np.rad2deg(np.arctan2(-p_y, p_z))
    eta_deg = np.where(eta_deg <= -180.0, eta_deg + 360.0, eta_deg) + 0.0  # (-180, 180], no -0
    r_px = rad_um * _distortion_factor(rad_um / float(params.rhod_um), eta_deg, tuple(params.p)) / px
    parallax = float(params.parallax_um)
    if parallax != 0.0:
        r_px = r_px + parallax * np.sin(np.arctan(rad_um / lsd)) / px
    return r_px, eta_deg


def r_to_tth_deg(r_px: ArrayLike, params: Params) -> NDArray[np.float64]:
    """Scattering angle 2θ (degrees) of radius ``r_px`` (pixels): atan(R·px / Lsd)."""
    r = np.asarray(r_px, dtype=np.float64)
    return np.rad2deg(np.arctan(r * float(params.px_um) / float(params.lsd_um)))


def tth_to_r_px(tth_deg: ArrayLike, params: Params) -> NDArray[np.float64]:
    """Radius in pixels of scattering angle ``tth_deg`` (degrees): Lsd·tan(2θ) / px."""
    tth = np.asarray(tth_deg, dtype=np.float64)
    return float(params.lsd_um) * np.tan(np.deg2rad(tth)) / float(params.px_um)


def tth_to_q_inv_a(tth_deg: ArrayLike, wavelength_a: float) -> NDArray[np.float64]:
    """Momentum transfer Q = 4π/λ·sin(2θ/2) in Å⁻¹ for 2θ in degrees and λ in Å."""
    if wavelength_a <= 0:
        raise ParameterError(f"Wavelength: expected a positive value in Å, got {wavelength_a}")
    tth = np.asarray(tth_deg, dtype=np.float64)
    return 4.0 * np.pi / wavelength_a * np.sin(np.deg2rad(tth) / 2.0)


def _checked_codes(im_trans_opt: Sequence[int], shape: tuple[int, int]) -> tuple[int, ...]:
    """Validate ImTransOpt codes for a detector of shape (nz, ny); drop the no-ops."""
    codes = tuple(int(c) for c in im_trans_opt)
    for c in codes:
        if c not in _VALID_CODES:
            raise ParameterError(f"ImTransOpt: expected codes 0..3, got {c}")
    if 3 in codes and shape[0] != shape[1]:
        raise ParameterError(
            f"ImTransOpt: transpose (3) needs a square detector, got NrPixelsZ×NrPixelsY = {shape}"
        )
    return tuple(c for c in codes if c > 0)


def _apply_code(y: NDArray, z: NDArray, code: int, ny: int, nz: int) -> tuple[NDArray, NDArray]:
    if code == 1:
        return (ny - 1) - y, z
    if code == 2:
        return y, (nz - 1) - z
    return z, y  # code 3; the detector is square


def raw_to_transformed(y: ArrayLike, z: ArrayLike, params: Params) -> tuple[NDArray, NDArray]:
    """Raw pixel coordinates -> transformed-frame coordinates (ImTransOpt codes in list order).

    Parameters
    ----------
    y, z : array_like
        Raw column and row coordinates (integers or floats, pixel centres at integers).
    params : Params
        Uses ``im_trans_opt``, ``nr_pixels_y``, ``nr_pixels_z``.

    Returns
    -------
    (y_t, z_t) : tuple of ndarray
        Coordinates of the same points in the transformed frame.
    """
    ny, nz = int(params.nr_pixels_y), int(params.nr_pixels_z)
    yt, zt = np.asarray(y), np.asarray(z)
    for code in _checked_codes(params.im_trans_opt, (nz, ny)):
        yt, zt = _apply_code(yt, zt, code, ny, nz)
    return yt, zt


def transformed_to_raw(y: ArrayLike, z: ArrayLike, params: Params) -> tuple[NDArray, NDArray]:
    """Inverse of :func:`raw_to_transformed` (each code is self-inverse; applied in reverse)."""
    ny, nz = int(params.nr_pixels_y), int(params.nr_pixels_z)
    yr, zr = np.asarray(y), np.asarray(z)
    for code in reversed(_checked_codes(params.im_trans_opt, (nz, ny))):
        yr, zr = _apply_code(yr, zr, code, ny, nz)
    return yr, zr


def _image_code(img: NDArray, code: int) -> NDArray:
    if code == 1:
        return img[..., :, ::-1]
    if code == 2:
        return img[..., ::-1, :]
    return np.swapaxes(img, -1, -2)


def transform_image(img: ArrayLike, im_trans_opt: Sequence[int]) -> NDArray:
    """Raw image -> transformed frame, applying ImTransOpt codes in list order.

    Parameters
    ----------
    img : array_like, shape (..., nz, ny)
        Raw image(s); the last two axes are (row z, column y).
    im_trans_opt : sequence of int
        ImTransOpt codes (0/−1 no-op, 1 flip y, 2 flip z, 3 transpose).

    Returns
    -------
    ndarray, shape (..., nz, ny)
        A view of ``img`` such that ``out[..., z_t, y_t] == img[..., z, y]`` with
        ``(y_t, z_t) = raw_to_transformed(y, z)``.
    """
    out = np.asarray(img)
    for code in _checked_codes(im_trans_opt, out.shape[-2:]):
        out = _image_code(out, code)
    return out


def untransform_image(img: ArrayLike, im_trans_opt: Sequence[int]) -> NDArray:
    """Transformed-frame image -> raw frame (inverse of :func:`transform_image`)."""
    out = np.asarray(img)
    for code in reversed(_checked_codes(im_trans_opt, out.shape[-2:])):
        out = _image_code(out, code)
    return out


def pixel_map(params: Params) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(R, η) of every RAW pixel centre.

    Returns
    -------
    r_px, eta_deg : ndarray, shape (nr_pixels_z, nr_pixels_y), float64
        ``r_px[z, y]`` and ``eta_deg[z, y]`` for raw pixel (y, z).
    """
    nz, ny = int(params.nr_pixels_z), int(params.nr_pixels_y)
    zt, yt = np.mgrid[0:nz, 0:ny].astype(np.float64)
    r_t, eta_t = pixel_to_r_eta(yt, zt, params)
    return (
        np.ascontiguousarray(untransform_image(r_t, params.im_trans_opt)),
        np.ascontiguousarray(untransform_image(eta_t, params.im_trans_opt)),
    )
