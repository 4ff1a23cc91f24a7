"""Reading files midasflow did not write: nothing they declare is trusted before it is checked.

* :func:`check_zip_members`: a zip whose member names are absolute or hold ``.``/``..``
  segments (a crafted archive) is refused before any member is opened;
* :func:`reading`: any failure while decoding a member or a frame (a bad CRC, a truncated or
  corrupt chunk, a codec error) becomes one line naming the file and the member, in the
  project's error type, instead of a library traceback.
"""
from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Iterator

from midasflow.errors import MidasflowError


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
