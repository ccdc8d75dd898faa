"""The recording page's waveform and markers: pure computations, and a small cache of peaks.

Peaks are min/max pairs over the whole WAV, computed once per (call id, audio version, sha256) while the
audio streams past (never held in memory whole), and the same pass hashes the bytes: the page can then
say whether the stored audio still matches the sha256 recorded at capture. Markers are the call's events
placed on the recording's own clock, which starts at ``answered_at`` (MixMonitor starts at answer).
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import sys
from array import array
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

#: Min/max pairs per waveform: enough for a 1280-px-wide canvas, small as JSON (~8 kB).
PEAK_BUCKETS = 1000
#: Waveforms kept in memory (each a few kB): bounded, least recently used dropped first.
CACHE_ENTRIES = 256
#: Markers shown at most (hostile or corrupt metadata could list thousands of escalations).
MAX_MARKERS = 200
#: How far into the file the WAV header (RIFF, fmt, data chunk start) may reach.
MAX_HEADER_BYTES = 64 * 1024

MARKER_KINDS = (
    "notice",
    "answered",
    "flag",
    "warning",
    "supervisor",
    "monologue",
    "talk_over",
    "shouting",
    "ended",
)


@dataclass(frozen=True)
class WavFormat:
    channels: int
    rate: int
    bits: int
    data_offset: int
    data_bytes: int

    @property
    def frame_bytes(self) -> int:
        return self.channels * self.bits // 8

    @property
    def duration_s(self) -> float:
        return self.data_bytes / (self.rate * self.frame_bytes) if self.rate and self.frame_bytes else 0.0


def parse_wav_header(head: bytes, object_size: int) -> WavFormat | None:
    """The PCM layout of a WAV from its first bytes; ``None``: more bytes needed. ``ValueError``: not a
    PCM WAV this page can draw (8 or 16 bit). A data size of 0 or 0xFFFFFFFF (a recording Asterisk never
    closed) means "to the end of the object"."""
    if len(head) < 12:
        return None
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE file")
    at = 12
    fmt: tuple[int, int, int, int] | None = None
    while True:
        if at + 8 > len(head):
            if at + 8 > MAX_HEADER_BYTES:
                raise ValueError("no data chunk in the first 64 kB")
            return None
        chunk_id, size = head[at : at + 4], struct.unpack_from("<I", head, at + 4)[0]
        body = at + 8
        if chunk_id == b"fmt ":
            if body + 16 > len(head):
                return None
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", head, body)
            fmt = (tag, channels, rate, bits)
        elif chunk_id == b"data":
            if fmt is None:
                raise ValueError("data chunk before fmt chunk")
            tag, channels, rate, bits = fmt
            if tag not in (1, 0xFFFE) or bits not in (8, 16) or not 1 <= channels <= 8 or not rate:
                raise ValueError(f"unsupported WAV format (tag {tag}, {bits} bit, {channels} channels)")
            available = max(0, object_size - body)
            data_bytes = available if size in (0, 0xFFFFFFFF) else min(size, available)
            return WavFormat(channels, rate, bits, body, data_bytes)
        at = body + size + (size & 1)
        if at > MAX_HEADER_BYTES:
            raise ValueError("no data chunk in the first 64 kB")


@dataclass
class PeakAccumulator:
    """Min/max per bucket over PCM bytes fed in any block sizes, scaled to -127..127."""

    fmt: WavFormat
    buckets: int = PEAK_BUCKETS
    peaks: list[tuple[int, int]] = field(default_factory=list)
    _pending: bytearray = field(default_factory=bytearray)
    _left: int = 0

    def __post_init__(self) -> None:
        frames = self.fmt.data_bytes // self.fmt.frame_bytes if self.fmt.frame_bytes else 0
        per_bucket = max(1, -(-frames // self.buckets)) if frames else 1
        self._bucket_bytes = per_bucket * self.fmt.frame_bytes
        self._left = self.fmt.data_bytes - self.fmt.data_bytes % max(1, self.fmt.frame_bytes)

    def feed(self, data: bytes) -> None:
        """PCM bytes (the data chunk only, in order); bytes beyond the data chunk are ignored."""
        data = data[: self._left]
        self._left -= len(data)
        self._pending += data
        size = self._bucket_bytes
        done = 0
        while len(self._pending) - done >= size:
            self._bucket(bytes(self._pending[done : done + size]))
            done += size
        del self._pending[:done]

    def finish(self) -> list[tuple[int, int]]:
        if self._pending:
            usable = len(self._pending) - len(self._pending) % (self.fmt.bits // 8)
            if usable:
                self._bucket(bytes(self._pending[:usable]))
            self._pending.clear()
        return self.peaks

    def _bucket(self, raw: bytes) -> None:
        if self.fmt.bits == 16:
            samples = array("h")
            samples.frombytes(raw)
            if sys.byteorder == "big":
                samples.byteswap()
            low, high = min(samples), max(samples)
            self.peaks.append((round(low * 127 / 32768), round(high * 127 / 32767)))
        else:
            low, high = min(raw) - 128, max(raw) - 128
            self.peaks.append((round(low * 127 / 128), round(high * 127 / 127)))


@dataclass(frozen=True)
class Waveform:
    """What the page draws, and what reading every byte told about the stored audio."""

    peaks: list[tuple[int, int]]
    duration_s: float
    sha256: str
    bytes: int
    #: ``verified`` (the bytes hash to the capture sha256), ``mismatch``, ``unverifiable`` (none recorded).
    verification: str
    #: Why there are no peaks (not a PCM WAV this page draws), else empty.
    problem: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "peaks": [list(p) for p in self.peaks],
            "duration_s": round(self.duration_s, 3),
            "sha256": self.sha256,
            "bytes": self.bytes,
            "verification": self.verification,
            "problem": self.problem,
        }


async def compute_waveform(
    blocks: AsyncIterator[bytes], object_size: int, capture_sha256: str | None, *, buckets: int = PEAK_BUCKETS
) -> Waveform:
    """Peaks and sha256 of the whole object in one streaming pass (the CPU work per block in a thread)."""
    digest = hashlib.sha256()
    head = bytearray()
    fmt: WavFormat | None = None
    acc: PeakAccumulator | None = None
    problem = ""
    seen = 0

    def take(block: bytes) -> None:
        nonlocal fmt, acc, problem
        digest.update(block)
        if problem:
            return
        if acc is not None:
            acc.feed(block)
            return
        head.extend(block)
        try:
            fmt = parse_wav_header(bytes(head[:MAX_HEADER_BYTES]), object_size)
        except ValueError as exc:
            problem = str(exc)
            return
        if fmt is not None:
            acc = PeakAccumulator(fmt, buckets)
            acc.feed(bytes(head[fmt.data_offset :]))
            head.clear()
        elif len(head) > MAX_HEADER_BYTES:
            problem = "no data chunk in the first 64 kB"

    async for block in blocks:
        seen += len(block)
        await asyncio.to_thread(take, block)
    if acc is None and not problem:
        problem = "the file ends inside its header"
    peaks = await asyncio.to_thread(acc.finish) if acc is not None else []
    sha = digest.hexdigest()
    if not capture_sha256:
        verification = "unverifiable"
    else:
        verification = "verified" if sha == capture_sha256 and seen == object_size else "mismatch"
    return Waveform(peaks, fmt.duration_s if fmt else 0.0, sha, seen, verification, problem)


class WaveformCache:
    """Computed waveforms by (call id, version id, capture sha256), LRU-bounded; two requests for the same
    key while it is computed share one computation (one read of the file)."""

    def __init__(self, entries: int = CACHE_ENTRIES) -> None:
        self._entries = entries
        self._done: OrderedDict[tuple[str, str, str], Waveform] = OrderedDict()
        self._running: dict[tuple[str, str, str], asyncio.Future[Waveform]] = {}
        #: Files read for waveforms at once (each reads a whole recording from S3).
        self._limit = asyncio.Semaphore(2)

    def __len__(self) -> int:
        return len(self._done)

    def cached(self, key: tuple[str, str, str]) -> Waveform | None:
        found = self._done.get(key)
        if found is not None:
            self._done.move_to_end(key)
        return found

    async def get(self, key: tuple[str, str, str], compute: Callable[[], Awaitable[Waveform]]) -> Waveform:
        found = self.cached(key)
        if found is not None:
            return found
        running = self._running.get(key)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[Waveform] = asyncio.get_running_loop().create_future()
        self._running[key] = future
        try:
            async with self._limit:
                result = await compute()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        finally:
            del self._running[key]
        future.set_result(result)
        self._done[key] = result
        while len(self._done) > self._entries:
            self._done.popitem(last=False)
        return result


# ------------------------------------------------------------------------------------------- markers


@dataclass(frozen=True)
class Marker:
    kind: str
    #: Seconds into the recording (its start: ``answered_at``, else ``started_at``).
    at_s: float
    #: The event's timestamp as recorded (shown in the configured timezone by the page).
    at: str


def _time(value: object) -> datetime | None:
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def _onset(start: datetime, entry: Mapping[str, Any]) -> object:
    """A timeline entry's ``offset_s`` (seconds into the recording) as a time; else its ``at``."""
    offset = entry.get("offset_s")
    if isinstance(offset, int | float) and not isinstance(offset, bool) and 0 <= offset < 86400:
        return (start + timedelta(seconds=float(offset))).isoformat(timespec="milliseconds")
    return entry.get("at")


def markers(doc: Mapping[str, Any]) -> list[Marker]:
    """The call's events on the recording's clock, in time order: notice, agent answered, flag, warning,
    supervisor joined, detections (monologue, talk-over), ended. From the metadata (escalations,
    agent_answered_at, ended_at) and, where the metadata has no field for it, the published ``timeline``.
    Unparseable times are left out."""
    start = _time(doc.get("answered_at")) or _time(doc.get("started_at"))
    if start is None:
        return []
    raw_timeline = doc.get("timeline")
    timeline = [e for e in raw_timeline if isinstance(e, Mapping)] if isinstance(raw_timeline, list) else []
    raw_escalations = doc.get("escalations")
    escalations = (
        [e for e in raw_escalations if isinstance(e, Mapping)] if isinstance(raw_escalations, list) else []
    )
    found: list[tuple[str, object]] = []

    def events(name: str) -> list[object]:
        return [e.get("at") for e in timeline if e.get("event") == name]

    found += [("notice", at) for at in events("notice_played")]
    answered = doc.get("agent_answered_at")
    found += [("answered", at) for at in ([answered] if answered else events("agent_answered"))]
    flags = [e.get("at") for e in escalations if e.get("action") == "flag"]
    found += [("flag", at) for at in (flags or events("flagged"))]
    warnings = [e.get("at") for e in escalations if e.get("action") in ("warn", "warn_and_hangup")]
    found += [("warning", at) for at in (warnings or events("warning_played"))]
    # The escalation's "at" is when the agent asked; the timeline has when the supervisor was on the line.
    joined = events("supervisor_joined") or [
        e.get("at") for e in escalations if e.get("action") == "supervisor" and e.get("result") == "joined"
    ]
    found += [("supervisor", at) for at in joined]
    # Live detection (issue 14): when the detector reported, from the timeline.
    found += [("monologue", at) for at in events("monologue_detected")]
    found += [("talk_over", at) for at in events("talk_over_detected")]
    # A shout is reported a second after it began: its marker sits at its onset (offset_s, recording clock).
    found += [("shouting", _onset(start, e)) for e in timeline if e.get("event") == "shouting_detected"]
    found += [("ended", at) for at in ([doc.get("ended_at")] if doc.get("ended_at") else events("ended"))]
    out: list[Marker] = []
    for kind, at in found[: MAX_MARKERS * 2]:
        t = _time(at)
        if t is None:
            continue
        assert isinstance(at, str)
        out.append(Marker(kind, max(0.0, (t - start).total_seconds()), at))
    out.sort(key=lambda m: (m.at_s, MARKER_KINDS.index(m.kind)))
    return out[:MAX_MARKERS]
