"""Bitshuffle + LZ4 ("bslz4"), as Dectris detectors and areaDetector write it: checked, then
decoded with ``bitshuffle.decompress_lz4``.

The data are blocks of pixels (``block`` pixels each, a multiple of 8; 0 means bitshuffle's
default of 8192 bytes' worth of pixels, rounded down to a multiple of 8, at least 128); each
block is bit-transposed, LZ4-compressed, and stored as its 4-byte big-endian byte count
followed by that many LZ4 bytes; a last, shorter block holds a multiple of 8 pixels; the last
``n % 8`` pixels are stored raw (bitshuffle's ``bshuf_compress_lz4``, src/bitshuffle.c and
src/bitshuffle_core.c of https://github.com/kiyo-masui/bitshuffle).

The HDF5 filter (id 32008, registered by bitshuffle and shipped by hdf5plugin) writes, before
the blocks, a 12-byte header: the chunk's uncompressed size in bytes (uint64, big-endian) and
the block size in bytes (uint32, big-endian); LZ4 compression is ``cd_values[4] == 2``
(src/bshuf_h5filter.c).

bitshuffle's decoder is given no input length: it trusts the block counts, and a truncated or
corrupt count makes it read past the end of the data (the process crashes, in HDF5's filter
too: docs/architecture.md, "Reading HDF5 frames"). :func:`check_blocks` therefore walks the
block counts first (~1 ms for a 2048² frame).
"""
from __future__ import annotations

import concurrent.futures
import os
import struct
import threading

import numpy as np

from midasflow.errors import FrameError

#: HDF5 filter id of bitshuffle (https://github.com/HDFGroup/hdf5_plugins, registered filters).
HDF5_FILTER = 32008
#: ``cd_values[4]`` of the HDF5 filter for LZ4 compression after the bit transpose.
HDF5_LZ4 = 2
#: The HDF5 filter's chunk header: uncompressed bytes (uint64), block size in bytes (uint32).
HDF5_HEADER = struct.Struct(">QI")
#: Threads of :func:`decode_pool` (docs/architecture.md, "Reading HDF5 frames": two threads of
#: one OpenMP thread each decode a 2048² frame in ~3.6 ms wall, ~6.6 ms CPU, on 2 cores; one
#: call on bitshuffle's own two OpenMP threads took ~10 ms of both).
DECODE_THREADS = min(2, os.cpu_count() or 1)
_POOL: list[concurrent.futures.ThreadPoolExecutor | None] = [None]
_POOL_LOCK = threading.Lock()
if hasattr(os, "register_at_fork"):  # a forked child has none of the pool's threads: a new pool
    os.register_at_fork(after_in_child=lambda: _POOL.__setitem__(0, None))


def default_block(itemsize: int) -> int:
    """bitshuffle's block size in pixels for block size 0 (``bshuf_default_block_size``)."""
    return max((8192 // itemsize) // 8 * 8, 128)


def check_blocks(data: np.ndarray, n_pixels: int, itemsize: int, source: str, block: int = 0) -> None:
    """Check that ``data`` is exactly the blocks ``bshuf_compress_lz4`` writes for ``n_pixels``
    pixels of ``itemsize`` bytes in blocks of ``block`` pixels (0: the default).

    Raises
    ------
    FrameError
        The bytes end inside a block, or bytes are left over; one line naming ``source``.
    """
    block = block or default_block(itemsize)
    last = n_pixels % block - n_pixels % block % 8
    n_blocks = n_pixels // block + (1 if last else 0)
    raw = np.frombuffer(data, dtype=np.uint8)
    end = raw.size - (n_pixels % 8) * itemsize
    k, pos = _block_walk()(raw, n_blocks, end)
    if k == n_blocks:
        if pos == end:
            return
        raise FrameError(f"{source}: bslz4 frame of {raw.size} bytes has {end - pos} bytes after its "
                         f"{n_blocks} blocks ({n_pixels} pixels)")
    raise FrameError(f"{source}: bslz4 frame of {raw.size} bytes ends inside block {k + 1} of {n_blocks} "
                     f"({n_pixels} pixels): truncated")


_WALK: list = [None]


def _block_walk():
    """The compiled block walk (numba, cached; compiled on first use, so importing this module
    does not import numba): ``walk(raw, n_blocks, end) -> (k, pos)``, following the 4-byte
    big-endian counts from byte 0; ``k == n_blocks`` and the position after the last block when
    every block ends by ``end``, else the index of the first block that does not and the
    position reached (~20 µs for a 2048² frame's 1024 blocks, against ~1 ms in Python)."""
    if _WALK[0] is None:
        import numba

        @numba.njit(cache=True, nogil=True)
        def walk(raw, n_blocks, end):  # pragma: no cover - compiled
            pos = 0
            for k in range(n_blocks):
                if pos + 4 > end:
                    return k, pos
                count = ((np.int64(raw[pos]) << 24) | (np.int64(raw[pos + 1]) << 16)
                         | (np.int64(raw[pos + 2]) << 8) | np.int64(raw[pos + 3]))
                pos += 4 + count
                if pos > end:
                    return k, pos
            return n_blocks, pos

        _WALK[0] = walk
    return _WALK[0]


def check_hdf5_chunk(chunk: np.ndarray, n_bytes: int, itemsize: int, source: str) -> int:
    """Check a chunk as HDF5's bitshuffle filter stores it (header, then blocks) for a chunk of
    ``n_bytes`` uncompressed bytes of ``itemsize``-byte pixels; returns its block size in
    pixels.

    Raises
    ------
    FrameError
        A header that disagrees with the chunk's size or holds an impossible block size, or
        blocks that do not fill the chunk exactly (:func:`check_blocks`); one line naming
        ``source``.
    """
    if chunk.size < HDF5_HEADER.size:
        raise FrameError(f"{source}: bitshuffle chunk of {chunk.size} bytes, shorter than its "
                         f"{HDF5_HEADER.size}-byte header: truncated")
    declared, block_bytes = HDF5_HEADER.unpack_from(chunk)
    if declared != n_bytes:
        raise FrameError(f"{source}: bitshuffle chunk declares {declared} uncompressed bytes, "
                         f"the dataset's chunk holds {n_bytes}")
    block = block_bytes // itemsize
    if block_bytes % itemsize or block <= 0 or block % 8:
        raise FrameError(f"{source}: bitshuffle chunk declares blocks of {block_bytes} bytes, not a "
                         f"positive multiple of 8 pixels of {itemsize} bytes")
    check_blocks(chunk[HDF5_HEADER.size:], n_bytes // itemsize, itemsize, source, block)
    return block


def _one_openmp_thread() -> None:
    """Run bitshuffle's OpenMP loops on this thread alone: the PyPI wheels parallelise each call
    over all cores, and their idle OpenMP threads spin, which on 2 cores took ~60 % more CPU
    per frame than one thread (OpenMP's thread count is per calling thread)."""
    import bitshuffle  # noqa: F401  (loads its OpenMP runtime, for threadpoolctl to find)
    import threadpoolctl

    threadpoolctl.threadpool_limits(1, user_api="openmp")


def decode_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The :data:`DECODE_THREADS` threads that decode chunks (created on first use); each runs
    bitshuffle on one OpenMP thread."""
    with _POOL_LOCK:
        if _POOL[0] is None:
            _POOL[0] = concurrent.futures.ThreadPoolExecutor(
                DECODE_THREADS, thread_name_prefix="midasflow-bslz4", initializer=_one_openmp_thread)
    return _POOL[0]


_C_DECODER: list = []


def _c_decoder():
    """bitshuffle's C function ``bshuf_decompress_lz4`` (its public C interface, bitshuffle.h:
    ``int64_t (const void *in, void *out, size_t size, size_t elem_size, size_t block_size)``,
    returning the input bytes used or a negative error code) as its extension module exports it,
    called through ctypes (which releases the GIL for the call): it decodes straight into the
    caller's array, where ``decompress_lz4`` returns a new array to copy (~0.8 ms of ~6 ms per
    2048² uint16 frame). None when the module does not export it."""
    if not _C_DECODER:
        import ctypes

        import bitshuffle.ext

        try:
            fn = ctypes.CDLL(bitshuffle.ext.__file__).bshuf_decompress_lz4
        except (OSError, AttributeError):
            fn = None
        else:
            fn.restype = ctypes.c_int64
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                           ctypes.c_size_t]
        _C_DECODER.append(fn)
    return _C_DECODER[0]


def decode_hdf5_chunk(chunk: np.ndarray, out: np.ndarray, source: str) -> None:
    """Decode a chunk of HDF5's bitshuffle-LZ4 filter into ``out`` (C-contiguous, the chunk's
    pixels in their dtype), after :func:`check_hdf5_chunk`: through bitshuffle's C function
    (:func:`_c_decoder`), else ``bitshuffle.decompress_lz4``; both release the GIL while they
    decode.

    Raises
    ------
    FrameError
        The chunk fails the check, or the decoder reports an error or uses other than all the
        chunk's bytes; one line naming ``source``.
    """
    import bitshuffle

    if not out.flags.c_contiguous:
        raise ValueError("decode_hdf5_chunk decodes into a C-contiguous array")
    block = check_hdf5_chunk(chunk, out.nbytes, out.dtype.itemsize, source)
    data = np.ascontiguousarray(chunk[HDF5_HEADER.size:])
    decode = _c_decoder()
    if decode is not None:
        used = decode(data.ctypes.data, out.ctypes.data, out.size, out.dtype.itemsize, block)
        if used != data.size:
            why = f"error code {used}" if used < 0 else f"it used {used} of its {data.size} bytes"
            raise FrameError(f"{source}: bitshuffle chunk cannot be decoded ({why})")
        return
    try:
        decoded = bitshuffle.decompress_lz4(data, (out.size,), out.dtype, block)
    except Exception as exc:  # bitshuffle raises RuntimeError with its error code
        raise FrameError(f"{source}: bitshuffle chunk cannot be decoded ({type(exc).__name__}: "
                         f"{(str(exc).splitlines() or [''])[0]})") from None
    out.reshape(-1)[...] = decoded
