"""The stream's working store: what has been caked so far, so a stopped stream can be resumed.

``<out>/stream/`` (docs/stream.md, "Outputs") holds

``manifest.json``   written by the client, atomically, each time a group closes and when the stream
                    stops: the frames taken (name, frame in file, ω, PV ``uniqueId``), the files
                    taken, the closed groups, the open group's first frame, the source's counts
                    (dropped frames …) and a digest of the caking settings;
``groups/group_GGGGGG.npy``   each closed ω-group's summed cake (n_r, n_eta) float64, written by
                    the task that closed it;
``frames/frame_PPPPPPPPP.npy``  each frame's cake, when the outputs need them (saved individual
                    frames, ``--output-h5``, SumImages), written by the task that caked it;
``open_group.npy``  the open group's partial sum, written when the stream stops with frames of an
                    unfinished group, so ``--resume`` continues that group bit for bit;
``dark.npy``        the dark (nz, ny) float32 taken from the stream's first file (no ``--dark``
                    or ``Dark``), so ``--resume`` subtracts the same dark without that file.

Every file is written under a temporary name and renamed. Nothing read back is trusted: the
manifest is checked field by field against the settings of the run that resumes it, arrays are
read with ``allow_pickle=False`` and must have the expected shape and dtype.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from midasflow.errors import CakeFileError, ParameterError
from midasflow.io.atomic import write_bytes_atomic, write_text_atomic

FORMAT = "midasflow-stream-spool/1"
SUBDIR = "stream"


def caking_digest(params_text: str, binmap_key: str, dark_label: str, extra: Mapping[str, Any]) -> str:
    """SHA-256 of what the cakes depend on: the parameter text, the bin map, the dark and the
    stream's reading settings (``extra``)."""
    blob = json.dumps({"params": params_text, "binmap": binmap_key, "dark": dark_label, **extra},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_array(path: str | os.PathLike, array: np.ndarray) -> str:
    """Write ``array`` as ``.npy`` atomically (called by the tasks, on their workers)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    write_bytes_atomic(path, buf.getvalue())
    return str(path)


def load_array(path: str | os.PathLike, shape: tuple[int, ...], dtype: Any = np.float64) -> np.ndarray:
    """An array the spool holds, checked: ``dtype`` (default float64) of ``shape``.

    Raises
    ------
    CakeFileError
        Missing, unreadable, or another shape or dtype (one line naming the file).
    """
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise CakeFileError(f"{path}: stream spool array unreadable ({exc}); remove {SUBDIR}/ and "
                            "run without --resume") from None
    if array.dtype != np.dtype(dtype) or array.shape != tuple(shape):
        raise CakeFileError(f"{path}: stream spool array is {array.dtype} {array.shape}, expected "
                            f"{np.dtype(dtype)} {tuple(shape)}")
    return array


class Spool:
    """Paths and manifest of ``<out>/stream``.

    Parameters
    ----------
    out : path
        The run's output folder (``--out``).
    """

    def __init__(self, out: str | os.PathLike) -> None:
        self.folder = Path(out, SUBDIR).resolve()

    def group_path(self, group: int) -> str:
        return str(self.folder / "groups" / f"group_{group:06d}.npy")

    def frame_path(self, position: int) -> str:
        return str(self.folder / "frames" / f"frame_{position:09d}.npy")

    @property
    def open_group_path(self) -> str:
        return str(self.folder / "open_group.npy")

    @property
    def dark_path(self) -> str:
        return str(self.folder / "dark.npy")

    @property
    def flags_path(self) -> str:
        """The pixels the stream's first frame has no value for (bool (nz, ny)), for --resume."""
        return str(self.folder / "flagged_pixels.npy")

    @property
    def manifest_path(self) -> Path:
        return self.folder / "manifest.json"

    def create(self) -> None:
        """Start an empty spool (what an earlier stream left is removed)."""
        import shutil

        if self.folder.exists():
            shutil.rmtree(self.folder)
        for sub in ("groups", "frames"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)

    def write_manifest(self, state: Mapping[str, Any]) -> None:
        """Record the stream's state (atomic)."""
        write_text_atomic(self.manifest_path, json.dumps({"format": FORMAT, **state}, indent=1))

    def read_manifest(self, digest: str) -> dict[str, Any]:
        """The recorded state of a stream made with caking settings ``digest``.

        Raises
        ------
        ParameterError
            No spool, another format, or cakes made with other settings (``--resume`` cannot
            continue them).
        CakeFileError
            A manifest that does not parse or lacks a field.
        """
        path = self.manifest_path
        if not path.is_file():
            raise ParameterError(f"{path}: --resume: no stream to resume in this output folder")
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CakeFileError(f"{path}: unreadable stream manifest ({exc})") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CakeFileError(f"{path}: not a stream manifest of format {FORMAT}")
        if state.get("caking_digest") != digest:
            raise ParameterError(f"{path}: --resume: the stream was caked with other parameters, bin "
                                 "map, dark or source settings; run without --resume or choose another "
                                 "output folder")
        _check_manifest(state, path)
        return state


#: Manifest fields and their JSON types.
_FIELDS = {"caking_digest": str, "frames": list, "groups": list, "taken_files": list,
           "open_first": int, "open_frames": int, "source": dict, "keep_frames": bool}


def _check_manifest(state: dict[str, Any], path: Path) -> None:
    for name, kind in _FIELDS.items():
        if not isinstance(state.get(name), kind):
            raise CakeFileError(f"{path}: stream manifest field {name!r} missing or not a {kind.__name__}")
    n = len(state["frames"])
    for k, group in enumerate(state["groups"]):
        ok = (isinstance(group, dict) and group.get("group") == k
              and all(isinstance(group.get(f), int) for f in ("first", "last"))
              and 0 <= group["first"] <= group["last"] < n)
        if not ok:
            raise CakeFileError(f"{path}: stream manifest group {k} malformed")
    for frame in state["frames"]:
        if not (isinstance(frame, dict) and isinstance(frame.get("name"), str)
                and isinstance(frame.get("omega_deg"), (int, float))):
            raise CakeFileError(f"{path}: stream manifest frame entry malformed")
    if not isinstance(state.get("dark_source"), (str, type(None))):
        raise CakeFileError(f"{path}: stream manifest field 'dark_source' not a str")
    first, count = state["open_first"], state["open_frames"]
    if not (0 <= first <= n and count == n - first):
        raise CakeFileError(f"{path}: stream manifest open group malformed")
