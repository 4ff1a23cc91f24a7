"""Reading files midasflow did not write: nothing they declare is trusted before it is checked.

* :func:`check_zip_members`: a zip whose member names are absolute or hold ``.``/``..``
  segments (a crafted archive) is refused before any member is opened;
* :func:`reading`: any failure while decoding a member or a frame (a bad CRC, a truncated or
  corrupt chunk, a codec error) becomes one line naming the file and the member, in the
  project's error type, instead of a library traceback;
* :func:`check_v2_array`: a zarr (format 2) array's declared shape and chunk size are checked
  against the limits (:mod:`midasflow.limits`) and, for Blosc, every chunk's header against the
  declared chunk size, before anything is decoded: a 400 kB chunk that would expand to 800 MB
  (a "blosc bomb") or a ``.zarray`` declaring 10¹² elements is refused, not allocated.
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
import zipfile
from collections.abc import Iterable, Iterator, Sequence

from midasflow.errors import MidasflowError
from midasflow.limits import MAX_ARRAY_BYTES, check_array_size

#: Largest ``.zarray`` document read (a real one is a few hundred bytes).
MAX_METADATA_BYTES = 64 * 1024
#: Blosc's 16-byte chunk header: version, versionlz, flags, typesize, nbytes, blocksize, cbytes.
BLOSC_HEADER = struct.Struct("<BBBBIII")


def _unsafe(name: str) -> bool:
    """True for an absolute name, a drive or backslash, or an empty, ``.`` or ``..`` segment
    (a trailing ``/`` marks a folder entry and is allowed)."""
    if name.startswith("/") or "\\" in name:
        return True
    parts = name.rstrip("/").split("/")
    return ":" in parts[0] or any(p in ("", ".", "..") for p in parts)


def check_zip_members(path: str | os.PathLike, error: type[MidasflowError]) -> None:
    """Refuse a zip whose member names are not plain relative paths.

    Raises
    ------
    error
        The file is not a readable zip, or a member name is absolute, holds a drive or a
        backslash, or has an empty, ``.`` or ``..`` segment (naming the first such member).
    """
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise error(f"{path}: not a readable zip file ({type(exc).__name__}: {exc})") from None
    bad = next((name for name in names if _unsafe(name)), None)
    if bad is not None:
        raise error(f"{path}: zip member {bad!r} is not a plain relative path (absolute, or with "
                    "'.' or '..' segments); expected zarr members only")


@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str, error: type[MidasflowError]) -> Iterator[None]:
    """Turn a failure inside the block into one line: ``<path>: <what>: cannot be read (...)``.

    Project errors and MemoryError pass through unchanged; anything else raised while a file is
    decoded (zipfile's bad CRC, a truncated TIFF strip, a blosc or zlib error, an HDF5 read
    error) is a damaged input, reported with its type and first line.
    """
    try:
        yield
    except (MidasflowError, MemoryError):
        raise
    except Exception as exc:  # a damaged file can fail in every library's own way
        first = (str(exc).splitlines() or [""])[0][:200]
        raise error(f"{path}: {what} cannot be read, the file is damaged or truncated "
                    f"({type(exc).__name__}: {first})") from None


def read_metadata(data: bytes, where: str, error: type[MidasflowError]) -> dict:
    """A ``.zarray``/``.zgroup`` document parsed, refusing an oversized or non-object one."""
    if len(data) > MAX_METADATA_BYTES:
        raise error(f"{where}: metadata of {len(data)} bytes, expected at most {MAX_METADATA_BYTES}")
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise error(f"{where}: metadata is not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise error(f"{where}: metadata is not a JSON object")
    return meta


def check_v2_array(meta: dict, heads: Iterable[tuple[str, bytes]], where: str,
                   error: type[MidasflowError], *, expected_shape: Sequence[int] | None = None,
                   compressors: Sequence[str | None] | None = None,
                   max_bytes: int = MAX_ARRAY_BYTES) -> tuple[int, ...]:
    """Check a zarr format 2 array's metadata and its chunks' headers before decoding any.

    Parameters
    ----------
    meta : dict
        The parsed ``.zarray``.
    heads : iterable of (chunk key, bytes)
        At least the first 16 bytes of every stored chunk.
    where : str
        File and array, for messages.
    error : MidasflowError subclass
    expected_shape : sequence of int, optional
        The shape the layout requires (a cake member must be (nR, nEta)).
    compressors : sequence of str or None, optional
        Allowed compressor ids (None = uncompressed); default any.
    max_bytes : int
        Largest array, and chunk, in bytes.

    Returns
    -------
    tuple of int
        The declared shape.

    Raises
    ------
    error
        A malformed shape or dtype, a shape other than ``expected_shape``, an array or chunk
        above ``max_bytes``, a compressor not allowed, or a Blosc chunk whose header says it
        expands to more than the declared chunk size.
    """
    import numpy as np

    try:
        shape = tuple(int(n) for n in meta["shape"])
        chunks = tuple(int(n) for n in meta["chunks"])
        itemsize = np.dtype(meta["dtype"]).itemsize
    except (KeyError, TypeError, ValueError) as exc:
        raise error(f"{where}: malformed .zarray ({type(exc).__name__}: {exc})") from None
    if expected_shape is not None and shape != tuple(expected_shape):
        raise error(f"{where}: shape {shape}, expected {tuple(expected_shape)}")
    if len(chunks) != len(shape) or any(c < 1 for c in chunks):
        raise error(f"{where}: chunks {chunks} do not fit the shape {shape}")
    try:
        check_array_size(shape, itemsize, "the array", max_bytes=max_bytes)
        chunk_bytes = check_array_size(chunks, itemsize, "a chunk", max_bytes=max_bytes)
    except ValueError as exc:
        raise error(f"{where}: {exc}") from None
    compressor = meta.get("compressor")
    cid = compressor.get("id") if isinstance(compressor, dict) else None
    if compressors is not None and cid not in compressors:
        allowed = ", ".join("none" if c is None else c for c in compressors)
        raise error(f"{where}: compressor {cid!r}, expected {allowed}")
    if cid == "blosc":
        for key, head in heads:
            if len(head) < BLOSC_HEADER.size:
                raise error(f"{where}: chunk {key} is shorter than a Blosc header")
            nbytes = BLOSC_HEADER.unpack_from(head)[4]
            if nbytes > chunk_bytes:
                raise error(f"{where}: chunk {key} expands to {nbytes} bytes, but the array declares "
                            f"chunks of {chunk_bytes} bytes (a damaged or crafted file)")
    return shape


def zip_v2_arrays(zf: zipfile.ZipFile, where: str, error: type[MidasflowError]
                  ) -> Iterator[tuple[str, dict, list[tuple[str, bytes]]]]:
    """(array path, parsed ``.zarray``, [(chunk key, first 16 bytes)]) of every zarr format 2
    array in an open zip, reading only metadata and chunk headers."""
    names = zf.namelist()
    arrays = sorted(n[: -len(".zarray")].rstrip("/") for n in names
                    if n == ".zarray" or n.endswith("/.zarray"))
    chunks: dict[str, list[str]] = {array: [] for array in arrays}
    for n in names:  # one pass: each chunk to the arrays it lies under (not one scan per array)
        if n.endswith("/") or n.rsplit("/", 1)[-1].startswith("."):
            continue
        parts = n.split("/")
        for owner in ["/".join(parts[:k]) for k in range(1, len(parts))] or [""]:
            if owner in chunks:
                chunks[owner].append(n)
    for array in arrays:
        prefix = f"{array}/" if array else ""
        meta = read_metadata(_head(zf, f"{prefix}.zarray", MAX_METADATA_BYTES + 1),
                             f"{where}: {array or 'root'}", error)
        yield array, meta, [(key, _head(zf, key, BLOSC_HEADER.size)) for key in chunks[array]]


def _head(zf: zipfile.ZipFile, name: str, size: int) -> bytes:
    """The first ``size`` bytes of a zip member (only those are read and decompressed)."""
    with zf.open(name) as fh:
        return fh.read(size)
