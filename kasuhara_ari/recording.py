"""Recording a call with MixMonitor, knowing when the file is complete, and writing its metadata.

MixMonitor closes its file asynchronously after a hangup and sends no event for it. Its ``Command`` option
runs *after* the file is closed (and the WAV header fixed up), so we make it create ``<call_id>.done``
beside the audio: the marker is the completion signal and nothing downstream reads a file without it.
The command contains only the configured directory and the call id, which are both restricted to safe
characters: never anything a caller controls.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .safe import safe_call_id

log = logging.getLogger(__name__)

SCHEMA = "kasuhara.recording/1"
#: Channel variable into which MixMonitor stores its id (``i()`` option): proof that it started.
MIXMONITOR_ID_VAR = "KASUHARA_MIXMON_ID"


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

    def __init__(self, ami: MixMonitorControl, asterisk_dir: str, host_dir: Path) -> None:
        self._ami = ami
        self.asterisk_dir = asterisk_dir.rstrip("/")
        self.host_dir = host_dir

    def paths(self, call_id: str) -> SpoolPaths:
        return SpoolPaths(self.asterisk_dir, self.host_dir, safe_call_id(call_id))

    async def start(self, channel_name: str, call_id: str) -> SpoolPaths:
        """Start recording ``channel_name`` (both directions mixed) into the spool."""
        paths = self.paths(call_id)
        # Both the directory and the id are checked for shell-safe characters (config + safe_call_id).
        command = f"touch {paths.asterisk_marker}"
        await self._ami.mixmonitor(
            channel_name, paths.asterisk_audio, options=f"i({MIXMONITOR_ID_VAR})", command=command
        )
        log.info("recording event=started call_id=%s file=%s", call_id, paths.asterisk_audio)
        return paths

    async def stop(self, channel_name: str, call_id: str) -> None:
        """Stop recording while the channel still exists, so the file closes now rather than later."""
        await self._ami.stop_mixmonitor(channel_name)
        log.info("recording event=stopped call_id=%s", call_id)


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
            "audio": {"format": "wav", "expected": self.recording_started},
            "recording_error": self.recording_error,
            "end_reason": self.end_reason,
            "escalations": [e.as_dict() for e in self.escalations],
            "flags": list(self.flags),
            "hold": self.hold,
            "repeat_count": self.repeat_count,
            "listed": self.listed,
            "timeline": list(self.events),
        }


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
