"""areaDetector NTNDArray payloads → numpy frames: the codecs of NDPluginCodec, decoded.

An NTNDArray carries its pixels in ``value``, a union of typed arrays; areaDetector's codec
plugin (NDPluginCodec) may compress them, and then (docs/stream.md, "PVAccess frames"):

* ``codec.name`` names the codec: ``""`` (none), ``lz4``, ``bslz4``, ``blosc`` (and ``jpeg``, a
  lossy 8-bit codec refused here: its pixels are no measurement);
* ``codec.parameters`` holds the pvData scalar-type code of the *uncompressed* pixels
  (:data:`SCALAR_TYPES`);
* the compressed bytes are in ``ubyteValue``, with ``compressedSize`` and ``uncompressedSize``;
* ``dimension[0]`` is the fastest axis (x), so the numpy shape is the sizes reversed.

Decoders, each from the library that owns the format (imported where used):

``lz4``     an LZ4 block without a size prefix: ``lz4.block.decompress``;
``bslz4``   bitshuffle + LZ4 as ``bshuf_compress_lz4`` writes it (block size 0, no HDF5-filter
            header): ``bitshuffle.decompress_lz4``;
``blosc``   a Blosc frame: ``numcodecs.Blosc``.

This module imports neither p4p nor dask: :mod:`midasflow.stream.pva` hands it the fields.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from midasflow.errors import FrameError
from midasflow.io.bslz4 import check_blocks

#: pvData ScalarType code of ``codec.parameters`` → numpy dtype of the uncompressed pixels.
SCALAR_TYPES = {
    1: np.dtype(np.int8), 2: np.dtype(np.int16), 3: np.dtype(np.int32), 4: np.dtype(np.int64),
    5: np.dtype(np.uint8), 6: np.dtype(np.uint16), 7: np.dtype(np.uint32), 8: np.dtype(np.uint64),
    9: np.dtype(np.float32), 10: np.dtype(np.float64),
}
#: Codecs decoded here.
CODECS = ("", "lz4", "bslz4", "blosc")


def frame_shape(dimension_sizes: Sequence[int]) -> tuple[int, ...]:
    """Numpy shape of an NTNDArray from its ``dimension[].size`` (fastest axis first)."""
    return tuple(int(s) for s in dimension_sizes)[::-1]


def decode_frame(value: np.ndarray, shape: Sequence[int], *, codec: str = "", parameters: int | None = None,
                 uncompressed_size: int | None = None, source: str = "NTNDArray") -> np.ndarray:
    """The frame an NTNDArray carries, uncompressed, in its original dtype and shape.

    Parameters
    ----------
    value : ndarray, 1-D
        The ``value`` union's array: the pixels (no codec), or the compressed bytes (uint8).
    shape : sequence of int
        Numpy shape (:func:`frame_shape` of the dimensions).
    codec : str
        ``codec.name``.
    parameters : int, optional
        ``codec.parameters``: the pvData scalar-type code of the pixels (compressed frames).
    uncompressed_size : int, optional
        ``uncompressedSize`` in bytes; checked against shape × itemsize when given.
    source : str
        Named in errors (the PV).

    Returns
    -------
    ndarray of ``shape``, the pixels' dtype (read-only view for an uncompressed frame).

    Raises
    ------
    FrameError
        An unknown or lossy codec, an unknown scalar-type code, sizes that disagree, or bytes
        the codec cannot decode; one line naming ``source``.
    """
    shape = tuple(int(s) for s in shape)
    n_pixels = int(np.prod(shape)) if shape else 0
    value = np.asarray(value)
    if not codec:
        if value.size != n_pixels:
            raise FrameError(f"{source}: {value.size} pixels, but the dimensions say {shape}")
        return value.reshape(shape)
    if codec not in CODECS:
        why = "lossy 8-bit compression" if codec == "jpeg" else "not an areaDetector codec decoded here"
        raise FrameError(f"{source}: codec {codec!r} refused ({why}); expected one of "
                         f"{', '.join(repr(c) for c in CODECS[1:])} or none (NDPluginCodec)")
    dtype = SCALAR_TYPES.get(int(parameters) if parameters is not None else -1)
    if dtype is None:
        raise FrameError(f"{source}: codec {codec!r} with codec.parameters {parameters!r}; expected a "
                         f"pvData scalar-type code {min(SCALAR_TYPES)}..{max(SCALAR_TYPES)}")
    n_bytes = n_pixels * dtype.itemsize
    if uncompressed_size is not None and int(uncompressed_size) != n_bytes:
        raise FrameError(f"{source}: uncompressedSize {uncompressed_size} bytes, but {shape} pixels of "
                         f"{dtype} are {n_bytes}")
    data = np.ascontiguousarray(value, dtype=np.uint8)
    if codec == "bslz4":
        check_blocks(data, n_pixels, dtype.itemsize, source)  # bitshuffle trusts the block counts
    try:
        if codec == "lz4":
            import lz4.block

            raw = lz4.block.decompress(data.tobytes(), uncompressed_size=n_bytes)
            out = np.frombuffer(raw, dtype=dtype)
        elif codec == "bslz4":
            import bitshuffle

            out = bitshuffle.decompress_lz4(data, (n_pixels,), dtype, 0)
        else:  # blosc
            from numcodecs import Blosc

            out = np.frombuffer(Blosc().decode(data), dtype=dtype)
    except Exception as exc:  # the codec libraries raise their own types
        raise FrameError(f"{source}: {codec} frame cannot be decoded ({type(exc).__name__}: "
                         f"{(str(exc).splitlines() or [''])[0]})") from None
    if out.size != n_pixels:
        raise FrameError(f"{source}: {codec} frame decodes to {out.size} pixels, expected {n_pixels}")
    return out.reshape(shape)
