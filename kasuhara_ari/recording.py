"""Recording a call with MixMonitor, knowing when the file is complete, and writing its metadata.

MixMonitor closes its file asynchronously after a hangup and sends no event for it. ``<call_id>.done``
beside the audio is the completion signal: nothing downstream reads a recording without it. Two ways to
get it (``recording.completion``):

``watch`` (default)  :class:`CompletionWatcher` sees the file closed (inotify ``IN_CLOSE_WRITE``) and
                     writes the marker. A sweep checks the WAV header as well: Asterisk's ``wav`` format
                     leaves the RIFF and data sizes at 0 until it closes the file, so a header whose sizes
                     match the file proves it closed (for events missed while the app was down, and for
                     filesystems where inotify sees nothing, such as NFS).
``command``          MixMonitor's ``Command`` option runs ``touch <dir>/<call_id>.done`` after closing the
                     file. It costs Asterisk a fork of its whole process per call: the load benchmark
                     measured ~33 ms of Asterisk CPU per call and latency spikes for every call on the box.

The command contains only the configured directory and the call id, which are both restricted to safe
characters: never anything a caller controls.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .config import COMPLETION_MODES, RECORDING_MODES
from .inotify import IN_Q_OVERFLOW, DirectoryWatch, InotifyUnavailable
from .safe import is_safe_call_id, safe_call_id

log = logging.getLogger(__name__)

SCHEMA = "kasuhara.recording/1"
#: Channel variable into which MixMonitor stores its id (``i()`` option): proof that it started.
MIXMONITOR_ID_VAR = "KASUHARA_MIXMON_ID"


#: What each channel of a stereo recording holds (metadata ``audio.layout``).
STEREO_LAYOUT = ("caller", "agent")


class RecordingError(Exception):
    """MixMonitor could not be started."""


@dataclass(frozen=True)
class SpoolPaths:
    """Where one call's files live, as Asterisk sees them and as this host reads them."""

    asterisk_dir: str
    host_dir: Path
    call_id: str

    @property
    def asterisk_audio(self) -> str:
        return f"{self.asterisk_dir}/{self.call_id}.wav"

    @property
    def asterisk_marker(self) -> str:
        return f"{self.asterisk_dir}/{self.call_id}.done"

    @property
    def audio(self) -> Path:
        return self.host_dir / f"{self.call_id}.wav"

    @property
    def marker(self) -> Path:
        return self.host_dir / f"{self.call_id}.done"

    @property
    def metadata(self) -> Path:
        return self.host_dir / f"{self.call_id}.json"


class MixMonitorControl(Protocol):
    async def mixmonitor(self, channel: str, file: str, *, options: str = "", command: str = "") -> None: ...

    async def stop_mixmonitor(self, channel: str) -> None: ...


class Recorder:
    """Starts and stops MixMonitor for one call through AMI."""

    def __init__(
        self,
        ami: MixMonitorControl,
        asterisk_dir: str,
        host_dir: Path,
        *,
        completion: str = "watch",
        mode: str = "mixed",
    ) -> None:
        if completion not in COMPLETION_MODES:
            raise ValueError(f"completion must be one of {COMPLETION_MODES}, not {completion!r}")
        if mode not in RECORDING_MODES:
            raise ValueError(f"mode must be one of {RECORDING_MODES}, not {mode!r}")
        self.mode = mode
        self._ami = ami
        self.asterisk_dir = asterisk_dir.rstrip("/")
        self.host_dir = host_dir
        self.completion = completion

    def paths(self, call_id: str) -> SpoolPaths:
        return SpoolPaths(self.asterisk_dir, self.host_dir, safe_call_id(call_id))

    def completion_command(self, paths: SpoolPaths) -> str:
        """MixMonitor's ``Command`` for this spool: none when the watcher writes the marker."""
        # Both the directory and the id are checked for shell-safe characters (config + safe_call_id).
        return f"touch {paths.asterisk_marker}" if self.completion == "command" else ""

    @property
    def options(self) -> str:
        """MixMonitor's options: its id into a variable (proof it started), and ``D`` in stereo mode —
        Asterisk 22 then writes a 2-channel WAV whose first channel is what the recorded channel (the
        caller's) sends and the second what it receives (measured: tests/test_stereo_sip.py)."""
        return f"i({MIXMONITOR_ID_VAR})" + ("D" if self.mode == "stereo" else "")

    @property
    def channels(self) -> int:
        return 2 if self.mode == "stereo" else 1

    async def start(self, channel_name: str, call_id: str) -> SpoolPaths:
        """Start recording ``channel_name`` (both directions mixed, or as two channels) into the spool."""
        paths = self.paths(call_id)
        await self._ami.mixmonitor(
            channel_name,
            paths.asterisk_audio,
            options=self.options,
            command=self.completion_command(paths),
        )
        log.debug("recording event=started call_id=%s file=%s", call_id, paths.asterisk_audio)
        return paths

    async def stop(self, channel_name: str, call_id: str) -> None:
        """Stop recording while the channel still exists, so the file closes now rather than later."""
        await self._ami.stop_mixmonitor(channel_name)
        log.debug("recording event=stopped call_id=%s", call_id)


def fix_stereo_header(path: Path) -> bool:
    """Make a closed stereo recording's header say what its data is; True if it was changed.

    MixMonitor's ``D`` writes interleaved 2-channel samples into a ``.wav`` whose header still says one
    channel at 8 kHz (Asterisk 22.10.1, measured): played as is, the call would last twice as long with
    both sides alternating sample by sample. Only the fmt chunk's channel count, byte rate and block
    align change (12 bytes, one write); a header already saying 2 channels is left alone, so it is safe
    to call again after a crash. Call it only on a file recorded with ``D`` and closed (``.done``).
    """
    with path.open("r+b") as fh:
        head = fh.read(4096)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            raise ValueError(f"{path.name}: not a WAV file")
        pos = 12
        while pos + 8 <= len(head):
            tag, size = head[pos : pos + 4], struct.unpack_from("<I", head, pos + 4)[0]
            if tag == b"fmt " and pos + 8 + 16 <= len(head):
                fmt_tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", head, pos + 8)
                if fmt_tag != 1 or bits != 16:
                    raise ValueError(f"{path.name}: not 16-bit PCM (format {fmt_tag}, {bits} bit)")
                if channels == 2:
                    return False
                if channels != 1:
                    raise ValueError(f"{path.name}: {channels} channels, expected 1 or 2")
                fh.seek(pos + 8 + 2)
                fh.write(struct.pack("<HIIH", 2, rate, rate * 4, 4))
                fh.flush()
                os.fsync(fh.fileno())
                return True
            pos += 8 + size + (size & 1)
    raise ValueError(f"{path.name}: no fmt chunk")


@dataclass
class Escalation:
    at: str
    action: str
    key: str
    by: str
    supervisor: str | None = None
    result: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "action": self.action,
            "key": self.key,
            "by": self.by,
            "supervisor": self.supervisor,
            "result": self.result,
        }


@dataclass
class CallRecord:
    """What we know about one call, as written into ``<call_id>.json`` (schema kasuhara.recording/1)."""

    call_id: str
    direction: str
    caller_number: str
    caller_name: str
    target: str
    started_at: str
    agent: str | None = None
    answered_at: str | None = None
    agent_answered_at: str | None = None
    ended_at: str | None = None
    duration_s: float | None = None
    notice_played: bool = False
    recording_started: bool = False
    recording_error: str | None = None
    end_reason: str = ""
    escalations: list[Escalation] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    hold: dict[str, str] | None = None
    repeat_count: int | None = None
    listed: dict[str, str] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    #: Seconds each party talked (TALK_DETECT), when detection is on.
    talk: dict[str, float] | None = None
    #: 2 when recorded in stereo (``recording.mode``): channel 1 the caller's side, 2 what the caller hears.
    channels: int = 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "call_id": self.call_id,
            "direction": self.direction,
            "caller": {"number": self.caller_number, "name": self.caller_name},
            "target": self.target,
            "agent": self.agent,
            "started_at": self.started_at,
            "answered_at": self.answered_at,
            "agent_answered_at": self.agent_answered_at,
            "ended_at": self.ended_at,
            "duration_s": self.duration_s,
            "notice_played": self.notice_played,
            "audio": {
                "format": "wav",
                "expected": self.recording_started,
                # Only when stereo: documents of mixed recordings stay exactly as before.
                **({"channels": self.channels, "layout": list(STEREO_LAYOUT)} if self.channels == 2 else {}),
            },
            "recording_error": self.recording_error,
            "end_reason": self.end_reason,
            "escalations": [e.as_dict() for e in self.escalations],
            "flags": list(self.flags),
            "hold": self.hold,
            "repeat_count": self.repeat_count,
            "listed": self.listed,
            "timeline": list(self.events),
            "talk": self.talk,
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> CallRecord:
        """The inverse of :meth:`as_dict`: a call handed over by a stopping ``serve`` is resumed from it
        (raises KeyError/TypeError/ValueError on a document that is not one)."""
        caller = doc.get("caller") or {}
        audio = doc.get("audio") or {}
        escalations = [Escalation(**{k: e.get(k) for k in _ESCALATION_FIELDS}) for e in doc["escalations"]]
        return cls(
            call_id=str(doc["call_id"]),
            direction=str(doc["direction"]),
            caller_number=str(caller.get("number") or ""),
            caller_name=str(caller.get("name") or ""),
            target=str(doc["target"]),
            started_at=str(doc["started_at"]),
            agent=doc.get("agent"),
            answered_at=doc.get("answered_at"),
            agent_answered_at=doc.get("agent_answered_at"),
            ended_at=doc.get("ended_at"),
            duration_s=doc.get("duration_s"),
            notice_played=bool(doc.get("notice_played")),
            recording_started=bool(audio.get("expected")),
            channels=2 if audio.get("channels") == 2 else 1,
            recording_error=doc.get("recording_error"),
            end_reason=str(doc.get("end_reason") or ""),
            escalations=escalations,
            flags=[str(f) for f in doc.get("flags") or []],
            hold=doc.get("hold"),
            repeat_count=doc.get("repeat_count"),
            listed=doc.get("listed"),
            events=[dict(e) for e in doc.get("timeline") or []],
            talk=doc.get("talk"),
        )


_ESCALATION_FIELDS = ("at", "action", "key", "by", "supervisor", "result")


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON so that a reader sees either nothing or the whole file, even after a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, ensure_ascii=False, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------ completion


def wav_header_final(path: Path) -> bool:
    """True when the WAV header's RIFF and data sizes match the file: Asterisk writes them on close only
    (they read 0 while it records), so a final header means MixMonitor has closed the file."""
    try:
        with path.open("rb") as fh:
            head = fh.read(4096)
            size = os.fstat(fh.fileno()).st_size
    except OSError:
        return False
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return False
    (riff,) = struct.unpack_from("<I", head, 4)
    if riff != size - 8:
        return False
    pos = 12
    while pos + 8 <= len(head):
        chunk, length = head[pos : pos + 4], struct.unpack_from("<I", head, pos + 4)[0]
        if chunk == b"data":
            return size - (pos + 8) in (length, length + 1)  # + the pad byte of an odd length
        pos += 8 + length + (length & 1)
    return False


class CompletionWatcher:
    """Writes ``<call_id>.done`` once MixMonitor has closed ``<call_id>.wav`` (``recording.completion =
    "watch"``), and tells ``on_complete``. Owned by the service's TaskGroup via :meth:`run`.

    inotify reports each close at once. A sweep of the directory (at start, after an inotify overflow,
    and every ``sweep_interval_s``) marks every WAV whose header is final, so a close that happened while
    the app was down, or on a filesystem that sends no inotify events, is found too.
    """

    def __init__(
        self,
        host_dir: Path,
        on_complete: Callable[[str], Awaitable[None]] | None = None,
        *,
        sweep_interval_s: float = 10.0,
    ) -> None:
        self.host_dir = host_dir
        self.on_complete = on_complete
        self.sweep_interval_s = sweep_interval_s
        self.marked = 0
        self.inotify = False
        self._closed: set[str] = set()
        self._sweep_due = True
        self._wake = asyncio.Event()

    async def run(self) -> None:
        await asyncio.to_thread(self.host_dir.mkdir, parents=True, exist_ok=True)
        watch: DirectoryWatch | None = None
        loop = asyncio.get_running_loop()
        try:
            watch = DirectoryWatch(self.host_dir)
        except InotifyUnavailable as exc:
            log.warning(
                "recording event=no_inotify dir=%s error=%s (completion found by sweeping every %.0fs)",
                self.host_dir,
                exc,
                self.sweep_interval_s,
            )
        else:
            loop.add_reader(watch.fileno(), self._readable, watch)
            self.inotify = True
        try:
            while True:
                self._wake.clear()
                if self._sweep_due:  # a sweep finds whatever the queued events would
                    self._sweep_due = False
                    self._closed.clear()
                    found = await asyncio.to_thread(self._sweep)
                elif self._closed:
                    names, self._closed = self._closed, set()
                    found = await asyncio.to_thread(self._mark, names)
                else:
                    try:
                        async with asyncio.timeout(self.sweep_interval_s):
                            await self._wake.wait()
                    except TimeoutError:
                        self._sweep_due = True
                    continue
                for call_id in found:
                    await self._tell(call_id)
        finally:
            if watch is not None:
                loop.remove_reader(watch.fileno())
                watch.close()

    def _readable(self, watch: DirectoryWatch) -> None:
        try:
            events = watch.read()
        except OSError as exc:
            log.warning("recording event=inotify_read_failed error=%s", exc)
            events = [(IN_Q_OVERFLOW, "")]
        for mask, name in events:
            if mask & IN_Q_OVERFLOW:
                self._sweep_due = True
            elif name.endswith(".wav"):
                self._closed.add(name[: -len(".wav")])
        if self._closed or self._sweep_due:
            self._wake.set()

    def _mark(self, call_ids: set[str]) -> list[str]:
        """Blocking: write the markers of recordings reported closed (only ids that are safe)."""
        marked = []
        for call_id in call_ids:
            if is_safe_call_id(call_id) and self._write_marker(call_id):
                marked.append(call_id)
        return marked

    def _sweep(self) -> list[str]:
        """Blocking: mark every recording in the directory whose header says it was closed."""
        try:
            names = os.listdir(self.host_dir)
        except OSError as exc:
            log.warning("recording event=sweep_failed dir=%s error=%s", self.host_dir, exc)
            return []
        present = set(names)
        stems = (n[: -len(".wav")] for n in names if n.endswith(".wav"))
        closed = {
            s
            for s in stems
            if f"{s}.done" not in present
            and is_safe_call_id(s)
            and wav_header_final(self.host_dir / f"{s}.wav")
        }
        return self._mark(closed)

    def _write_marker(self, call_id: str) -> bool:
        marker = self.host_dir / f"{call_id}.done"
        if marker.exists() or not (self.host_dir / f"{call_id}.wav").exists():
            return False  # marked already, or uploaded and removed meanwhile
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT, 0o644)
        except OSError as exc:
            log.error("recording event=marker_failed call_id=%s error=%s", call_id, exc)
            return False
        os.close(fd)
        self.marked += 1
        log.debug("recording event=closed call_id=%s", call_id)
        return True

    async def _tell(self, call_id: str) -> None:
        if self.on_complete is None:
            return
        try:
            await self.on_complete(call_id)
        except Exception:
            log.exception("recording event=on_complete_failed call_id=%s", call_id)
