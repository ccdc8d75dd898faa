"""The caller's audio to the app: one UDP socket for every call's RTP, cut into frames for the detectors.

Per call, Asterisk streams the caller's voice only (a snoop channel ``spy=in`` on the caller's leg,
bridged with an ARI ``externalMedia`` channel, format ``slin``: 8 kHz 16-bit linear, 20 ms per packet)
to this socket. Each externalMedia channel sends from its own local port (its channel variables
UNICASTRTP_LOCAL_ADDRESS/PORT), which is how packets are told apart: no per-call socket, no per-call task.

The call's own bridge is never touched: the snoop copies the caller's audio out of an audiohook, so what
the caller and agent hear (and MixMonitor records) is the same with detection on or off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from .base import AudioFrame, Detection, FrameDetector, Party

log = logging.getLogger(__name__)

#: What Asterisk is asked to send (externalMedia ``format``) and how to read it: 8 kHz signed linear,
#: big-endian (RTP's L16). The telephone band needs no more, and it is the audiohook's own format (no
#: transcoding in Asterisk).
MEDIA_FORMAT = "slin"
RATE = 8000
_SAMPLE = np.dtype(">i2")

Source = tuple[str, int]
#: The socket's receive buffer (the kernel caps it at net.core.rmem_max).
RECEIVE_BUFFER = 4 * 1024 * 1024
#: Addresses that name no particular sender (a channel variable that says "any").
_UNSPECIFIED = frozenset({"0.0.0.0", "::", ""})  # noqa: S104 (compared against, never bound)


def rtp_payload(packet: bytes) -> bytes | None:
    """The payload of an RTP packet (None: not RTP version 2, or truncated)."""
    if len(packet) < 12 or packet[0] >> 6 != 2:
        return None
    start = 12 + 4 * (packet[0] & 0x0F)
    if packet[0] & 0x10:  # header extension: 4 bytes, then its length in 32-bit words
        if len(packet) < start + 4:
            return None
        start += 4 + 4 * int.from_bytes(packet[start + 2 : start + 4], "big")
    end = len(packet)
    if packet[0] & 0x20:  # padding: its length is the last byte
        end -= packet[-1]
    return packet[start:end] if start <= end else None


@dataclass
class StreamFeed:
    """One party's stream of one call: RTP payloads in, frames to the detectors, detections out.

    The stream's clock is the count of samples received (packets lost in between are not made up; on a
    local socket there are none). ``started_wall``: when its first packet arrived (time.time()), which
    places the stream on the recording's clock."""

    party: Party
    detectors: list[FrameDetector]
    on_detections: Callable[[list[Detection], StreamFeed], None]
    frame_samples: int = RATE // 10
    started_wall: float | None = None
    samples: int = 0
    packets: int = 0
    failures: int = 0
    #: Payload bytes not yet a whole frame: numpy only sees whole frames (5000 packets a second at 100
    #: calls make the per-packet work what the app pays; see scripts/bench_detection_media.py).
    _pending: bytearray = field(default_factory=bytearray)

    def rtp(self, packet: bytes) -> None:
        # Asterisk's packets have no CSRC, extension or padding: the common case skips the parser.
        payload = packet[12:] if packet[:1] == b"\x80" else rtp_payload(packet)
        if not payload:
            return
        if self.started_wall is None:
            self.started_wall = time.time()
        self.packets += 1
        pending = self._pending
        pending += payload
        frame_bytes = 2 * self.frame_samples
        while len(pending) >= frame_bytes:
            chunk = bytes(pending[:frame_bytes])  # a copy: the bytearray must stay resizable
            del pending[:frame_bytes]
            frame = np.frombuffer(chunk, dtype=_SAMPLE).astype(np.float32) / np.float32(32768.0)
            self._frame(AudioFrame(self.party, frame, RATE, self.samples / RATE))
            self.samples += self.frame_samples

    def _frame(self, frame: AudioFrame) -> None:
        found: list[Detection] = []
        for det in self.detectors:
            try:
                found += det.feed(frame)
            except Exception:  # an operator's plug-in must not take the others (or the socket) down
                self.failures += 1
                if self.failures in (1, 100, 10000):
                    log.exception("detection event=detector_failed detector=%s", type(det).__name__)
        if found:
            self.on_detections(found, self)


class MediaReceiver(asyncio.DatagramProtocol):
    """The one UDP socket: packets from a registered source go to its feed, others are counted and
    dropped (a late packet of a call that ended, or a stranger)."""

    def __init__(self) -> None:
        self._feeds: dict[Source, StreamFeed] = {}
        self._by_port: dict[int, StreamFeed] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.address: Source | None = None
        self.packets = 0
        self.strays = 0
        self._lock = asyncio.Lock()

    async def open(self, bind: str, port: int) -> Source:
        """Open the socket once (later calls return the address it has)."""
        async with self._lock:
            if self.address is None:
                loop = asyncio.get_running_loop()
                transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(bind, port))
                sock = transport.get_extra_info("socket")
                if sock is not None:  # 100 calls' packets arrive in bursts: room for a busy moment's
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
                self.address = transport.get_extra_info("sockname")[:2]
                log.info("detection event=media_socket_open address=%s:%s", *self.address)
            return self.address

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (the selector loop's datagram transport does not subclass DatagramTransport at runtime)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def register(self, source: Source, feed: StreamFeed) -> None:
        """Packets from ``source`` (Asterisk's UNICASTRTP_LOCAL_ADDRESS/PORT) are ``feed``'s; an unspecified
        address (0.0.0.0) matches any sender on that port."""
        if source[0] in _UNSPECIFIED:
            self._by_port[source[1]] = feed
        else:
            self._feeds[source] = feed

    def unregister(self, feed: StreamFeed) -> None:
        for source in [k for k, v in self._feeds.items() if v is feed]:
            del self._feeds[source]
        for port in [k for k, v in self._by_port.items() if v is feed]:
            del self._by_port[port]

    @property
    def streams(self) -> int:
        return len(self._feeds) + len(self._by_port)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.packets += 1
        source = (str(addr[0]), int(addr[1]))
        feed = self._feeds.get(source) or self._by_port.get(source[1])
        if feed is None:
            self.strays += 1
            return
        try:
            feed.rtp(data)
        except Exception:  # a bad packet or a bug ends nothing but this packet
            feed.failures += 1
            if feed.failures in (1, 100, 10000):
                log.exception("detection event=media_packet_failed source=%s:%s", *source)

    def error_received(self, exc: Exception) -> None:
        log.warning("detection event=media_socket_error error=%s", exc)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
            self.address = None
