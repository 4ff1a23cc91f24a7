"""A live areaDetector stream: frames of an NTNDArray PV over EPICS PVAccess (p4p client).

:class:`PvaSource` subscribes with ``p4p.client.thread.Context('pva', nt=False)`` (raw values:
p4p's automatic NTNDArray unwrapping cannot reshape a compressed frame and would close the
subscription) and a monitor queue of ``queue_size`` updates. Each update becomes an
:class:`~midasflow.stream.sources.Arrival` carrying a :class:`PvaFrame`: the ``value`` array as
it came (compressed bytes stay compressed until the task that cakes the frame decodes them with
:func:`midasflow.stream.codecs.decode_frame`), its codec fields and shape.

Dropped frames: areaDetector numbers its frames (``uniqueId``, +1 per frame). A jump by more than
one means frames were lost between the detector and us (the monitor squashes updates when its
queue overflows, as does a slow network); the missing count is added to :attr:`dropped` and the
gap recorded. A ``uniqueId`` that goes back is a new acquisition (the counter was reset): noted,
not counted as a loss.

The PV's current value, delivered first by every new subscription, is taken only when its time
stamp is not older than the subscription: an idle detector's last frame from an earlier
acquisition is not a frame of this stream.

Addresses: ``address`` (``--pva-ip``, ``host`` or ``host:port``) becomes
``EPICS_PVA_ADDR_LIST`` with automatic address lists off; other ``EPICS_PVA_*`` settings come from
the environment.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from midasflow.errors import FrameError
from midasflow.stream.codecs import decode_frame, frame_shape
from midasflow.stream.sources import Arrival

log = logging.getLogger(__name__)

#: areaDetector's usual PVA plugin channel (NDPluginPva of the simulated detector, 13SIM1).
DEFAULT_CHANNEL = "13SIM1:Pva1:Image"
#: At most this many gaps are listed (all are counted).
MAX_GAPS_LISTED = 100


@dataclass(frozen=True)
class PvaFrame:
    """One NTNDArray update as it came: what :func:`decode_frame` needs, decoded on the worker."""

    value: np.ndarray = field(repr=False)
    shape: tuple[int, ...]
    codec: str
    parameters: int | None
    uncompressed_size: int | None
    channel: str

    def decode(self) -> np.ndarray:
        """The frame's pixels in their own dtype (:func:`decode_frame`)."""
        return decode_frame(self.value, self.shape, codec=self.codec, parameters=self.parameters,
                            uncompressed_size=self.uncompressed_size, source=self.channel)


def client_conf(address: str | None) -> dict[str, str]:
    """p4p client configuration: ``EPICS_PVA_*`` from the environment, ``address`` as the only
    search address when given."""
    conf = {k: v for k, v in os.environ.items() if k.startswith("EPICS_PVA")}
    if address:
        conf.update(EPICS_PVA_ADDR_LIST=address, EPICS_PVA_AUTO_ADDR_LIST="NO")
    return conf


def _timestamp(value: Any) -> float | None:
    try:
        return float(value["timeStamp.secondsPastEpoch"]) + 1e-9 * float(value["timeStamp.nanoseconds"])
    except (KeyError, TypeError, ValueError):
        return None


def frame_of(value: Any, channel: str) -> PvaFrame:
    """A :class:`PvaFrame` from a raw p4p ``Value`` of an NTNDArray."""
    codec = str(value["codec.name"] or "")
    params = value["codec.parameters"] if codec else None
    return PvaFrame(
        # p4p's array is a read-only view of the update's buffer, which it keeps alive and which
        # never changes (a pvData array is immutable once shared): no copy (4 MB per 2048² frame)
        value=np.asarray(value["value"]),
        shape=frame_shape([d["size"] for d in value["dimension"]]),
        codec=codec,
        parameters=None if params is None else int(params),
        uncompressed_size=int(value["uncompressedSize"]) if codec else None,
        channel=channel,
    )


class PvaSource:
    """Frames of an NTNDArray PV as they are published.

    Parameters
    ----------
    channel : str
        The PV (``--pva-channel``), e.g. ``13SIM1:Pva1:Image``.
    params : Params
        The detector: frames must be NrPixelsZ × NrPixelsY.
    address : str, optional
        ``--pva-ip``: ``host`` or ``host:port`` to search the PV at.
    queue_size : int
        Updates the monitor may queue (server and client side) before it squashes.
    conf : dict, optional
        A complete p4p client configuration (tests; overrides ``address`` and the environment).
    """

    def __init__(self, channel: str, params: Any, *, address: str | None = None, queue_size: int = 64,
                 conf: dict[str, str] | None = None) -> None:
        self.channel, self.params = channel, params
        self.conf = dict(conf) if conf is not None else client_conf(address)
        self.queue_size = int(queue_size)
        self.describe = f"PV {channel}" + (f" at {address}" if address else "")
        self.received = 0
        self.dropped = 0
        self.gaps: list[tuple[int, int]] = []  # (last uniqueId seen, next uniqueId seen)
        self.resets = 0
        self.disconnects = 0
        self._last_id: int | None = None

    def _count(self, unique_id: int) -> None:
        """Book a uniqueId: gaps are drops, a step back a new acquisition."""
        last = self._last_id
        self._last_id = unique_id
        self.received += 1
        if last is None:
            return
        if unique_id > last + 1:
            self.dropped += unique_id - last - 1
            if len(self.gaps) < MAX_GAPS_LISTED:
                self.gaps.append((last, unique_id))
        elif unique_id <= last:
            self.resets += 1
            log.warning("%s: uniqueId went back from %d to %d (a new acquisition)", self.channel,
                        last, unique_id)

    def _check_shape(self, frame: PvaFrame) -> None:
        expected = (int(self.params.nr_pixels_z), int(self.params.nr_pixels_y))
        if tuple(frame.shape) != expected:
            raise FrameError(f"{self.channel}: frames are {'×'.join(map(str, frame.shape))} (z×y) but the "
                             f"parameters say NrPixelsZ×NrPixelsY = {expected[0]}×{expected[1]}")

    def arrivals(self, stop: threading.Event, tick_s: float = 0.2) -> Iterator[Arrival | None]:
        """Frames as they are published (``None`` after each quiet tick); ends when ``stop``
        is set.

        Raises
        ------
        FrameError
            A frame of another shape than the detector's (the stream's parameters are wrong).
        """
        from p4p.client.thread import Cancelled, Context, Disconnected, Finished

        updates: queue.Queue = queue.Queue(maxsize=self.queue_size)
        subscribed = time.time()

        def callback(value: Any) -> None:
            # blocks while the stream is behind: p4p then queues, and finally squashes, upstream
            while not stop.is_set():
                try:
                    updates.put(value, timeout=0.2)
                    return
                except queue.Full:
                    continue

        context = Context("pva", conf=self.conf, useenv=False, nt=False)
        monitor = context.monitor(self.channel, callback, notify_disconnect=True,
                                  request=f"record[queueSize={self.queue_size}]field()")
        first = True
        connected = False  # p4p reports Disconnected first, before the channel ever connects
        try:
            while not stop.is_set():
                try:
                    value = updates.get(timeout=tick_s)
                except queue.Empty:
                    yield None
                    continue
                if isinstance(value, Disconnected):
                    if connected:
                        self.disconnects += 1
                        log.warning("%s: disconnected; waiting for it to come back", self.channel)
                    connected, first = False, True
                    continue
                if isinstance(value, (Cancelled, Finished)):
                    return
                if isinstance(value, Exception):
                    raise FrameError(f"{self.channel}: {type(value).__name__}: {value}")
                connected = True
                stamp = _timestamp(value)
                if first:
                    first = False
                    if stamp is not None and stamp < subscribed:
                        continue  # the value the PV held before we subscribed
                frame = frame_of(value, self.channel)
                self._check_shape(frame)
                unique_id = int(value["uniqueId"])
                self._count(unique_id)
                yield Arrival(name=str(unique_id), n_frames=1, payload=frame, unique_id=unique_id,
                              timestamp=stamp, more=not updates.empty())
        finally:
            monitor.close()
            context.close()

    def summary(self) -> dict[str, Any]:
        """Received and dropped frames (``uniqueId`` gaps), for the run's summary."""
        return {"channel": self.channel, "received_frames": self.received, "dropped_frames": self.dropped,
                "gaps": [list(g) for g in self.gaps], "gaps_listed_max": MAX_GAPS_LISTED,
                "uniqueid_resets": self.resets, "disconnects": self.disconnects}
