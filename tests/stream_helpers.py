"""Real stream sources for the tests, on loopback only: a p4p PVAccess server publishing an
NTNDArray PV, and a writer thread dropping frame files into a folder."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np


class NtndArrayServer:
    """A p4p server on 127.0.0.1 (isolated: random ports) serving ``pv`` as an NTNDArray.

    ``publish(frames, rate_hz, codec=..., skip_ids=...)`` posts frames with uniqueId 1, 2, …
    (ids in ``skip_ids`` are never posted: dropped frames), compressed with areaDetector's codecs
    when asked; ``conf`` is the client configuration that finds it (``--pva-ip``: ``address``).
    """

    def __init__(self, pv: str = "test:Pva1:Image", shape: tuple[int, int] = (4, 5)) -> None:
        from p4p.nt import NTNDArray
        from p4p.server import Server
        from p4p.server.thread import SharedPV

        self.pv_name = pv
        self.nt = NTNDArray()
        self.connected = threading.Event()
        connected = self.connected

        class Handler:
            def onFirstConnect(self, pv):  # noqa: N802, ANN001, ARG002
                connected.set()

        # the initial value is stale: posted before any client subscribed
        self.pv = SharedPV(initial=self.nt.wrap(np.zeros(shape, np.uint16)), handler=Handler())
        self.server = Server(providers=[{pv: self.pv}], isolate=True)
        conf = self.server.conf()
        self.address = f"127.0.0.1:{conf['EPICS_PVA_BROADCAST_PORT']}"
        self.conf = {"EPICS_PVA_ADDR_LIST": self.address, "EPICS_PVA_AUTO_ADDR_LIST": "NO"}

    def post(self, frame: np.ndarray, unique_id: int, codec: str = "") -> None:
        value = self.nt.wrap(frame, timestamp=time.time())
        value["uniqueId"] = int(unique_id)
        # every codec field is posted (marked changed), as NDPluginPva does: a monitor sends only
        # changed fields, so a codec left unmarked would keep the previous frame's name
        value["codec.name"] = ""
        value["compressedSize"] = value["uncompressedSize"] = frame.nbytes
        if codec:
            raw = np.ascontiguousarray(frame)
            if codec == "lz4":
                import lz4.block

                data = lz4.block.compress(raw.tobytes(), store_size=False)
            elif codec == "bslz4":
                import bitshuffle

                data = bitshuffle.compress_lz4(raw, 0).tobytes()
            else:
                from numcodecs import Blosc

                data = Blosc(cname="lz4", shuffle=Blosc.BITSHUFFLE, typesize=raw.dtype.itemsize).encode(raw)
            codes = {np.dtype(np.uint16): 6, np.dtype(np.int32): 3, np.dtype(np.uint32): 7}
            value["value"] = ("ubyteValue", np.frombuffer(data, np.uint8))
            value["codec.name"] = codec
            value["codec.parameters"] = codes[raw.dtype]
            value["compressedSize"] = len(data)
            value["uncompressedSize"] = raw.nbytes
        self.pv.post(value)

    def publish(self, frames: np.ndarray, rate_hz: float, *, codecs: tuple[str, ...] = ("",),
                skip_ids: tuple[int, ...] = (), start_delay_s: float = 1.0) -> threading.Thread:
        """Post ``frames`` in a thread at ``rate_hz`` (codec of frame i: ``codecs[i % len]``),
        ``start_delay_s`` after the first client connected."""

        def run() -> None:
            self.connected.wait(600)
            time.sleep(start_delay_s)
            uid = 0
            for i, frame in enumerate(frames):
                uid += 1
                while uid in skip_ids:
                    uid += 1
                self.post(frame, uid, codecs[i % len(codecs)])
                time.sleep(1.0 / rate_hz)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.server.stop()


def write_tiff_atomic(path: Path, frame: np.ndarray) -> None:
    """A file written under a temporary name and renamed into place (as rsync does)."""
    import tifffile

    tmp = path.with_name(path.name + ".tmp")
    tifffile.imwrite(tmp, frame)
    os.replace(tmp, path)


def drop_files(folder: Path, frames: np.ndarray, *, interval_s: float = 0.05, half_written: int | None = None,
               stem: str = "frame_", start_delay_s: float = 0.5) -> threading.Thread:
    """A writer thread: frame i becomes ``<stem><i + 1>.tif`` (numbers not zero-padded, so name
    order matters), each written under a ``.tmp`` name and renamed; frame ``half_written`` is
    first written half, left so for a while, then completed in place."""
    import tifffile

    def run() -> None:
        time.sleep(start_delay_s)
        for i, frame in enumerate(frames):
            path = folder / f"{stem}{i + 1}.tif"
            if i == half_written:
                tifffile.imwrite(path.with_name(".scratch.tif"), frame)
                data = path.with_name(".scratch.tif").read_bytes()
                os.remove(path.with_name(".scratch.tif"))
                path.write_bytes(data[: len(data) // 2])  # half a file, under its final name
                time.sleep(1.5)
                path.write_bytes(data)
            else:
                write_tiff_atomic(path, frame)
            time.sleep(interval_s)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread
