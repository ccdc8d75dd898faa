"""The durable recording queue: from the spool directory into S3, exactly once, surviving any crash.

The spool (``recording.host_dir``) *is* the queue; nothing about a pending upload lives only in memory.
Per call, all named by its call id (anything else in the directory is ignored):

``<id>.wav``   MixMonitor's audio, written by Asterisk.
``<id>.done``  empty marker created by MixMonitor's completion command once Asterisk has closed the file.
``<id>.json``  metadata (``kasuhara.recording/1``) written atomically by the call service when the call ended.
``<id>.hold``  an evidence hold asked for while the recording may still be local (``Uploader.hold``);
               written atomically into ``storage.queue_dir`` (default: the spool itself).

A recording is *ready* when its ``.json`` exists and either no audio is expected or ``.done`` exists. If
``.done`` never comes (Asterisk crashed), the audio is uploaded anyway once it has not changed for
``incomplete_after_s``, marked ``audio.incomplete: true``. Audio without metadata for ``orphan_after_s``
(the app died during the call) is *adopted*: the uploader writes minimal metadata (``orphaned: true``) so
the evidence still reaches the bucket.

One upload, in this order (each step idempotent, so a crash anywhere is repaired by running it again):

1. the hold record, if the call is flagged (before anything else: the deletion guard refuses on it);
2. the audio: hashed in a first streaming pass (sha256 and MD5), skipped if the bucket already has this key
   with the same size and sha256, else streamed up as a conditional create (``If-None-Match: *``: a key is
   never given a second version; a *different* recording there is a :class:`RecordingCollision`, kept in
   the spool) (re-hashed while sending; a file that changed aborts the upload before it completes), then
   verified;
3. the metadata (audio key/bytes/sha256 and the audio's ``version_id`` filled in), also a conditional
   create — last, so a reader that sees the ``.json`` object sees a complete recording; skipped if already
   there for this audio (``x-amz-meta-audio-sha256``); verified;
4. if flagged: the hold record completed with both version ids, legal holds on exactly those versions;
   then holds asked for during the upload; then the event ``recording_stored``;
5. local files removed: ``.wav``, ``.done``, ``.json``, and the ``.hold`` marker last.

*Verified*: the ETag of a single-part put is the MD5 of what the server received; when the store says its
ETags are MD5s (no SSE-C, one part) and it equals ours, that is the proof. Otherwise the object is read back
(HEAD: size and ``x-amz-meta-sha256``). *Looked up first* (step 2 and 3's "already there"): only for a call
that is not *fresh* — found by the first scan after start (a crash may have stored it) or after a failed
attempt. A fresh recording costs two requests instead of six.

Failures leave everything in place and retry with capped exponential backoff, forever. On start the whole
spool is scanned, so whatever a crash left behind is picked up. ``notify(call_id)`` makes the worker look
at that call at once; between full scans (every ``poll_interval_s``, the safety net) only notified calls
and due retries are looked at.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import errno
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import struct
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import metrics
from .config import Config
from .events import EventSink, StatusDetails, now_iso
from .node import node_name
from .recording import fix_stereo_header
from .safe import (
    UntrustedJsonError,
    clean_caller_name,
    clean_caller_number,
    clean_log_value,
    is_safe_call_id,
    load_untrusted_json,
    safe_call_id,
)
from .search import Catalog
from .storage import (
    META_AUDIO_SHA256,
    META_CALL_ID,
    META_SHA256,
    NO_AUDIO,
    HoldOutcome,
    HoldRecord,
    MinioStore,
    ObjectInfo,
    ObjectStore,
    PreconditionFailed,
    PutResult,
    RecordingHolds,
    RecordingKeys,
    StorageError,
    StorageRefused,
    hash_file_md5,
    key_versions,
    parse_started_at,
    recording_keys,
)

log = logging.getLogger(__name__)

RECORDING_SCHEMA = "kasuhara.recording/1"
SUFFIXES = (".wav", ".done", ".json", ".hold")
LOCK_NAME = ".kasuhara-uploader.lock"
#: Where unusable local files go (inside the spool, so a rename never crosses filesystems): kept for a
#: human to look at, out of the uploader's way. Nothing in it is ever uploaded or deleted by the app.
QUARANTINE_DIR = "quarantine"
#: Larger than any metadata or hold marker the app writes by orders of magnitude.
MAX_METADATA_BYTES = 16 * 1024 * 1024
MAX_HOLD_MARKER_BYTES = 64 * 1024
META_AUDIO_STATUS = "audio-status"
META_ORPHANED = "orphaned"
#: The flag ``*1`` puts into the metadata (escalation.py).
FLAG_HARASSMENT = "harassment"


# --------------------------------------------------------------------------------------------- spool


@dataclass(frozen=True)
class FileStat:
    size: int
    mtime: float


@dataclass(frozen=True)
class LocalState:
    """What one call has in the spool right now (``None`` = file absent)."""

    call_id: str
    wav: FileStat | None = None
    done: FileStat | None = None
    json: FileStat | None = None
    hold: FileStat | None = None

    @property
    def oldest(self) -> float:
        return min(
            (f.mtime for f in (self.wav, self.done, self.json, self.hold) if f is not None), default=0.0
        )

    @property
    def bytes(self) -> int:
        return self.wav.size if self.wav else 0


class InvalidMetadata(ValueError):
    """``<id>.json`` cannot be used (not JSON, wrong call id, no usable ``started_at``)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path, data: bytes, *, replace: bool = True) -> bool:
    """Write ``data`` so that readers see nothing or all of it, even after ``kill -9`` or power loss.

    With ``replace=False`` an existing file wins (returns ``False``): used for markers where the first
    writer's content must be kept.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        _fsync_dir(path.parent)
        return True
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class SpoolFiles:
    wav: Path
    done: Path
    json: Path
    hold: Path


class Spool:
    """The spool directory as the uploader's durable queue. All methods are blocking (run in threads)."""

    def __init__(self, directory: Path, queue_dir: Path | None = None) -> None:
        self.directory = Path(directory)
        self.queue_dir = Path(queue_dir) if queue_dir is not None else self.directory

    @classmethod
    def from_config(cls, cfg: Config) -> Spool:
        queue = Path(cfg.storage.queue_dir) if cfg.storage.queue_dir else None
        return cls(cfg.recording.host_dir, queue)

    def files(self, call_id: str) -> SpoolFiles:
        cid = safe_call_id(call_id)
        return SpoolFiles(
            wav=self.directory / f"{cid}.wav",
            done=self.directory / f"{cid}.done",
            json=self.directory / f"{cid}.json",
            hold=self.queue_dir / f"{cid}.hold",
        )

    def scan(self) -> dict[str, LocalState]:
        """Every call id with at least one file, from one listing per directory."""
        found: dict[str, dict[str, FileStat]] = {}
        sources: list[tuple[Path, tuple[str, ...]]]
        if self.queue_dir == self.directory:
            sources = [(self.directory, SUFFIXES)]
        else:
            sources = [(self.directory, (".wav", ".done", ".json")), (self.queue_dir, (".hold",))]
        for directory, wanted in sources:
            try:
                entries = list(os.scandir(directory))
            except FileNotFoundError:
                continue
            for entry in entries:
                stem, dot, ext = entry.name.rpartition(".")
                if dot + ext not in wanted or not is_safe_call_id(stem):
                    continue
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                found.setdefault(stem, {})[ext] = FileStat(st.st_size, st.st_mtime)
        return {
            cid: LocalState(cid, f.get("wav"), f.get("done"), f.get("json"), f.get("hold"))
            for cid, f in found.items()
        }

    def inspect(self, call_id: str) -> LocalState:
        files = self.files(call_id)

        def stat(p: Path) -> FileStat | None:
            try:
                st = p.stat()
            except FileNotFoundError:
                return None
            return FileStat(st.st_size, st.st_mtime)

        return LocalState(call_id, stat(files.wav), stat(files.done), stat(files.json), stat(files.hold))

    def read_metadata(self, call_id: str) -> dict[str, Any]:
        """The call's metadata, checked for what the uploader relies on; :class:`InvalidMetadata` if not.

        Never raises anything else for bad content (deep nesting, NaN, impossible dates): one bad file
        must not stop the uploader, and with it ``serve``."""
        path = self.files(call_id).json
        with path.open("rb") as fh:
            if os.fstat(fh.fileno()).st_size > MAX_METADATA_BYTES:
                raise InvalidMetadata(f"{path.name}: larger than 16 MiB")
            raw = fh.read(MAX_METADATA_BYTES + 1)
        try:
            doc = load_untrusted_json(raw, max_bytes=MAX_METADATA_BYTES)
        except UntrustedJsonError as exc:
            raise InvalidMetadata(f"{path.name}: {exc}") from None
        if not isinstance(doc, dict):
            raise InvalidMetadata(f"{path.name}: not a JSON object")
        if doc.get("call_id") != call_id:
            raise InvalidMetadata(f"{path.name}: call_id does not match the file name")
        try:
            recording_keys(call_id, parse_started_at(doc.get("started_at")))
        except ValueError as exc:
            raise InvalidMetadata(f"{path.name}: {exc}") from None
        return doc

    def write_metadata(self, call_id: str, metadata: Mapping[str, Any], *, replace: bool = True) -> bool:
        """Atomic write of ``<id>.json`` (for the call service, and for adopted orphans)."""
        data = json.dumps(dict(metadata), ensure_ascii=False, indent=1).encode("utf-8", "backslashreplace")
        return write_file_atomic(self.files(call_id).json, data, replace=replace)

    def read_hold(self, call_id: str) -> HoldRecord | None:
        """The hold asked for this call, if any. A marker that cannot be read still means "hold": it is
        quarantined and replaced by a readable one that says so, and the same record comes back on every
        read (one rebuilt with ``at=now`` never equalled itself, so :meth:`finish` looped forever)."""
        path = self.files(call_id).hold
        try:
            with path.open("rb") as fh:
                st = os.fstat(fh.fileno())
                raw = fh.read(MAX_HOLD_MARKER_BYTES + 1)
        except FileNotFoundError:
            return None
        started: object = None
        try:
            doc = load_untrusted_json(raw, max_bytes=MAX_HOLD_MARKER_BYTES)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            started = doc.get("started_at")
            record = HoldRecord.from_json(raw)
            if record.call_id != call_id:
                raise ValueError("call_id does not match the file name")
            return record
        except ValueError as exc:
            problem = str(exc)
        try:
            started_at = parse_started_at(started).isoformat()
        except ValueError:
            started_at = None
        # Deterministic: the marker's own mtime, not the time of reading.
        at = datetime.fromtimestamp(st.st_mtime, UTC).isoformat(timespec="milliseconds")
        record = HoldRecord.create(
            call_id, f"(unreadable hold marker: {problem})", "", at=at, started_at=started_at
        )
        log.error(
            "spool event=unreadable_hold_marker call_id=%s problem=%s action=kept_as_hold",
            call_id,
            clean_log_value(problem, max_chars=120),
        )
        try:
            moved = self.quarantine(path)
            write_file_atomic(path, record.to_json(), replace=True)
        except OSError as err:  # a full disk: the record above is still returned on every read
            log.error("spool event=hold_marker_repair_failed call_id=%s error=%s", call_id, err)
        else:
            log.warning("spool event=quarantined file=%s moved_to=%s", path.name, moved)
        return record

    def quarantine(self, path: Path) -> Path:
        """Keep an unusable file for a human (hard link, so the original can then be replaced atomically
        by the caller); returns where. Raises ``OSError`` (e.g. ENOSPC)."""
        qdir = self.directory / QUARANTINE_DIR
        qdir.mkdir(mode=0o700, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        target = qdir / f"{path.name}.{stamp}"
        try:
            os.link(path, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:  # the queue dir on another filesystem: copy instead
                raise
            write_file_atomic(target, path.read_bytes(), replace=False)
        _fsync_dir(qdir)
        return target

    def write_hold(self, record: HoldRecord) -> HoldRecord:
        """Durably record a hold request; the first one for a call wins and is returned."""
        path = self.files(record.call_id).hold
        self.queue_dir.mkdir(parents=True, exist_ok=True)
        if write_file_atomic(path, record.to_json(), replace=False):
            return record
        return self.read_hold(record.call_id) or record

    def remove_recording(self, call_id: str) -> None:
        """Remove audio, marker and metadata, in this order (metadata last keeps a crash recoverable)."""
        files = self.files(call_id)
        for path in (files.wav, files.done, files.json):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        _fsync_dir(self.directory)

    def finish(self, call_id: str, applied: HoldRecord | None) -> HoldRecord | None:
        """After a verified upload: remove the call's files (its hold marker last), unless a hold request
        other than ``applied`` arrived meanwhile. Then nothing is removed and that request is returned:
        apply it and call again."""
        current = self.read_hold(call_id)
        if current is not None and current != applied:
            return current
        self.remove_recording(call_id)
        if current is not None:
            self.remove_hold(call_id, current)
        return None

    def remove_hold(self, call_id: str, applied: HoldRecord) -> bool:
        """Remove the hold marker if it is still the one that was applied (a newer one stays)."""
        current = self.read_hold(call_id)
        if current is None:
            return True
        if current != applied:
            return False
        with contextlib.suppress(FileNotFoundError):
            self.files(call_id).hold.unlink()
        _fsync_dir(self.queue_dir)
        return True

    def remove_stray_done(self, call_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.files(call_id).done.unlink()


# --------------------------------------------------------------------------------------------- decisions


class Action(enum.Enum):
    WAIT = "wait"
    UPLOAD = "upload"
    ADOPT_ORPHAN = "adopt_orphan"
    APPLY_HOLD = "apply_hold"
    DROP_STRAY_DONE = "drop_stray_done"
    INVALID = "invalid"


class AudioMode(enum.Enum):
    COMPLETE = "stored"  # .done present
    INCOMPLETE = "incomplete"  # no .done, file unchanged for the grace period
    ABSENT = "absent"  # expected but no local file: already uploaded (crash) or never written
    NOT_RECORDED = "not_recorded"  # metadata says MixMonitor never started, and there is no file


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    audio: AudioMode | None = None
    #: For ABSENT: the grace period is over, so "no audio anywhere" may be concluded.
    final: bool = True


@dataclass(frozen=True)
class Timing:
    incomplete_after_s: float = 120.0
    orphan_after_s: float = 3600.0


def decide(
    state: LocalState, metadata: Mapping[str, Any] | InvalidMetadata | None, now: float, timing: Timing
) -> Decision:
    """What to do with one call's spool files now. Pure: inputs are file stats, parsed metadata, wall time."""
    wav, done, meta_file = state.wav, state.done, state.json
    if meta_file is not None:
        if metadata is None:
            return Decision(Action.WAIT, "metadata being replaced")
        if isinstance(metadata, InvalidMetadata):
            return Decision(Action.INVALID, str(metadata))
        audio = metadata.get("audio")
        expected = bool(audio.get("expected", True)) if isinstance(audio, Mapping) else True
        if wav is None and not expected:
            return Decision(Action.UPLOAD, "no audio expected", AudioMode.NOT_RECORDED)
        if done is not None:
            if wav is None:
                return Decision(Action.UPLOAD, "audio closed but not here", AudioMode.ABSENT)
            return Decision(Action.UPLOAD, "ready", AudioMode.COMPLETE)
        if wav is not None:
            quiet = now - wav.mtime
            if quiet >= timing.incomplete_after_s:
                return Decision(Action.UPLOAD, "no .done; audio unchanged", AudioMode.INCOMPLETE)
            return Decision(Action.WAIT, "waiting for .done")
        waited = now - meta_file.mtime
        final = waited >= timing.incomplete_after_s
        return Decision(Action.UPLOAD, "audio expected, not here", AudioMode.ABSENT, final=final)
    if wav is not None:
        since = now - (done.mtime if done is not None else wav.mtime)
        if since >= timing.orphan_after_s:
            return Decision(Action.ADOPT_ORPHAN, "audio without metadata")
        return Decision(Action.WAIT, "call in progress or metadata pending")
    if state.hold is not None:
        return Decision(Action.APPLY_HOLD, "hold for a recording not in the spool")
    if done is not None:
        if now - done.mtime >= timing.orphan_after_s:
            return Decision(Action.DROP_STRAY_DONE, ".done without audio")
        return Decision(Action.WAIT, ".done without audio")
    return Decision(Action.WAIT, "nothing")


def backoff_delay(attempt: int, *, base_s: float, cap_s: float, jitter: float = 0.2) -> float:
    """Capped exponential backoff with ±``jitter`` so queued recordings don't retry in lockstep."""
    delay = min(cap_s, base_s * (2 ** max(0, attempt - 1)))
    return float(delay * random.uniform(1 - jitter, 1 + jitter))  # noqa: S311 - not for security


def wav_duration_s(path: Path, size: int) -> float:
    """Duration from a WAV header's byte rate (0 if unknown): used to estimate an orphan's start."""
    try:
        with path.open("rb") as fh:
            head = fh.read(44)
    except OSError:
        return 0.0
    if len(head) < 44 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return 0.0
    (byte_rate,) = struct.unpack_from("<I", head, 28)
    return max(0.0, (size - 44) / byte_rate) if byte_rate else 0.0


#: A hold signal in metadata that could not be parsed: ``"hold": {`` or ``"hold": "`` (not null), or the
#: ``*1`` flag anywhere. Crude on purpose: a false positive keeps evidence, a false negative loses it.
_HOLD_SIGNAL = re.compile(rb'"hold"\s*:\s*[{"]|"harassment"')


def hold_signal(raw: bytes) -> bool:
    """Whether unusable metadata still shows that the call was flagged or held."""
    try:
        doc = load_untrusted_json(raw, max_bytes=MAX_METADATA_BYTES)
    except UntrustedJsonError:
        return _HOLD_SIGNAL.search(raw[:MAX_METADATA_BYTES]) is not None
    if not isinstance(doc, dict):
        return _HOLD_SIGNAL.search(raw) is not None
    flags = doc.get("flags")
    return bool(doc.get("hold")) or (isinstance(flags, list) and FLAG_HARASSMENT in flags)


def salvage_metadata(call_id: str, wav: Path | None, reason: str, quarantined: str) -> dict[str, Any]:
    """Metadata for a recording whose own was unusable: what orphan adoption writes, plus why. The audio
    still goes to the bucket; the bad document stays in the spool's quarantine for a human."""
    if wav is not None and wav.exists():
        doc = orphan_metadata(call_id, wav)
    else:
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        doc = {**orphan_metadata_fields(call_id), "started_at": now, "ended_at": now}
    doc["orphan_note"] = (
        "the call service's metadata was unusable and is kept in the spool's quarantine; "
        "started_at estimated from the audio file"
    )
    doc["metadata_invalid"] = {"reason": reason[:500], "quarantined": quarantined}
    return doc


def orphan_metadata_fields(call_id: str) -> dict[str, Any]:
    """The fields of adopted metadata that do not depend on the audio file."""
    return {
        "schema": RECORDING_SCHEMA,
        "call_id": call_id,
        "direction": None,
        "caller": {"number": None, "name": None},
        "target": None,
        "agent": None,
        "started_at": None,
        "answered_at": None,
        "ended_at": None,
        "duration_s": None,
        "notice_played": False,
        "audio": {"format": "wav", "expected": True},
        "escalations": [],
        "flags": [],
        "hold": None,
        "orphaned": True,
        "orphan_note": "the call service wrote no metadata; started_at estimated from the audio file",
    }


def orphan_metadata(call_id: str, wav: Path) -> dict[str, Any]:
    """Minimal metadata for audio whose call service never wrote any (the app died during the call)."""
    st = wav.stat()
    started = st.st_mtime - wav_duration_s(wav, st.st_size)
    return {
        **orphan_metadata_fields(call_id),
        "started_at": datetime.fromtimestamp(started, UTC).isoformat(timespec="milliseconds"),
        "ended_at": datetime.fromtimestamp(st.st_mtime, UTC).isoformat(timespec="milliseconds"),
    }


# --------------------------------------------------------------------------------------------- upload


@dataclass(frozen=True)
class AudioResult:
    status: str  # stored | incomplete | empty | missing | not_recorded
    key: str | None = None
    bytes: int | None = None
    sha256: str | None = None
    #: The version the upload created (or found): the metadata records it, a hold pins it.
    version_id: str | None = None
    #: This upload created that version (then under the legal hold if the call was flagged by then).
    created: bool = False


def final_metadata(
    metadata: Mapping[str, Any], keys: RecordingKeys, audio: AudioResult, hold: HoldRecord | None
) -> dict[str, Any]:
    """The metadata object as stored: the call service's document with the audio filled in and the
    caller's text cleaned again (cleaning is idempotent, so this is only a safety net)."""
    doc = dict(metadata)
    doc["call_id"] = keys.call_id
    caller = doc.get("caller")
    if isinstance(caller, Mapping):
        doc["caller"] = {
            **caller,
            "number": clean_caller_number(caller.get("number")),
            "name": clean_caller_name(caller.get("name")),
        }
    given = doc.get("audio")
    audio_doc = dict(given) if isinstance(given, Mapping) else {}
    audio_doc.update(
        {
            "format": "wav",
            "expected": bool(audio_doc.get("expected", True)) or audio.key is not None,
            "key": audio.key,
            "bytes": audio.bytes,
            "sha256": audio.sha256,
            "version_id": audio.version_id,
            "status": audio.status,
            "incomplete": audio.status == "incomplete",
        }
    )
    doc["audio"] = audio_doc
    if hold is not None and not doc.get("hold"):
        doc["hold"] = hold.as_metadata_hold()
    return doc


def encode_metadata(doc: Mapping[str, Any]) -> bytes:
    try:
        return json.dumps(doc, ensure_ascii=False, indent=1).encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates somewhere: fall back to \\u escapes, which every JSON reader accepts.
        return json.dumps(doc, ensure_ascii=True, indent=1).encode("ascii")


# --------------------------------------------------------------------------------------------- disk


#: ``low``: below this many free bytes or this fraction of the filesystem, whichever is smaller.
LOW_FREE_BYTES = 512 * 1024 * 1024
LOW_FREE_FRACTION = 0.05
#: ``full``: below this (a WAV of a minute is ~1 MiB), or a write just failed for lack of space.
FULL_FREE_BYTES = 1024 * 1024
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


@dataclass(frozen=True)
class DiskState:
    """How much room the spool (and the hold queue) has: ``ok``, ``low``, ``full`` or ``unknown``."""

    state: str
    path: str
    free_bytes: int | None = None
    total_bytes: int | None = None
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in ("", None)}


def disk_state(path: Path, *, write_error: str = "") -> DiskState:
    """Blocking: the state of the filesystem holding ``path``; a recent out-of-space ``write_error``
    makes it ``full`` whatever statvfs says (reserved blocks, quotas)."""
    try:
        st = os.statvfs(path)
    except OSError as exc:
        return DiskState("unknown", str(path), error=exc.strerror or type(exc).__name__)
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    if write_error or free < FULL_FREE_BYTES:
        state = "full"
    elif free < min(LOW_FREE_BYTES, total * LOW_FREE_FRACTION):
        state = "low"
    else:
        state = "ok"
    return DiskState(state, str(path), free, total, write_error)


def is_out_of_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _NO_SPACE


class RetryLater(Exception):
    def __init__(self, reason: str, delay_s: float) -> None:
        super().__init__(reason)
        self.delay_s = delay_s


class VerifyError(StorageError):
    """The object read back does not match what was uploaded."""


class RecordingCollision(StorageRefused):
    """The key already holds a *different* recording (a call-id collision, or someone wrote there): the
    uploader never replaces it. The local files stay in the spool (retried, logged as an error)."""


@dataclass
class _Track:
    attempts: int = 0
    not_before: float = 0.0
    last_reason: str = ""
    #: Its files appeared while this uploader ran and no attempt failed: the bucket cannot hold its
    #: objects yet, so nothing is read back before uploading (6 S3 requests per recording become 2).
    fresh: bool = False


@dataclass
class UploaderStats:
    stored: int = 0
    skipped_existing: int = 0
    failures: int = 0
    holds_applied: int = 0
    #: Holds whose S3 legal hold this key could not place (see ``Uploader._report_refused``).
    holds_need_admin: int = 0
    #: Holds that came after a sweep deleted the evidence (``HoldOutcome.lost``): reported, never applied.
    holds_lost: int = 0
    started_at: float = field(default_factory=time.time)


class Uploader:
    """Moves finished recordings from the spool into S3. Owned by the service's TaskGroup via :meth:`run`."""

    def __init__(
        self,
        cfg: Config,
        store: ObjectStore,
        events: EventSink,
        *,
        spool: Spool | None = None,
        poll_interval_s: float = 5.0,
        coalesce_s: float = 0.2,
        concurrency: int = 2,
        timing: Timing | None = None,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.events = events
        self.spool = spool or Spool.from_config(cfg)
        self.holds = RecordingHolds(store)
        self.poll_interval_s = poll_interval_s
        # Calls end in bursts under load; one spool scan per burst instead of one per call (load benchmark).
        self.coalesce_s = coalesce_s
        self.concurrency = concurrency
        self.timing = timing or Timing()
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.clock = clock
        self.stats = UploaderStats()
        self._wake = asyncio.Event()
        self._active: set[str] = set()
        self._track: dict[str, _Track] = {}
        self._hash_cache: dict[tuple[str, int, int, int], tuple[str, str]] = {}
        #: Whatever the first scan finds may be left from before (a crash): it is never fresh.
        self._scanned_once = False
        #: Call ids to look at on the next pass (notified, or ready but waiting for a free slot).
        self._due: set[str] = set()
        self._next_full = 0.0
        self._meta_cache: dict[str, tuple[tuple[int, int], Mapping[str, Any] | InvalidMetadata]] = {}
        self._lock_fd: int | None = None
        #: Holds asked for while the disk refused the marker (full): applied from here at upload, and
        #: written again on every pass until the marker is on disk. Never dropped.
        self._unwritten_holds: dict[str, HoldRecord] = {}
        #: The last out-of-space write error, until a write succeeds again.
        self._space_error = ""
        self.disk: DiskState | None = None

    # -- public

    async def notify(self, call_id: str) -> None:
        """The call service wrote ``<call_id>.json`` (or anything changed for it): look now."""
        if not is_safe_call_id(call_id):
            log.warning("upload event=notify_ignored reason=unsafe_call_id")
            return
        track = self._track.get(call_id)
        if track is None:
            track = self._track[call_id] = _Track(fresh=self._scanned_once)
        track.not_before = 0.0
        self._due.add(call_id)
        self._wake.set()

    async def hold(self, call_id: str, reason: str, by: str, *, started_at: datetime | str) -> HoldRecord:
        """Put a call's recording on evidence hold, durably, whether it is uploaded yet or not.

        Returns once the request is on disk (``<id>.hold``, fsynced): from then on no crash loses it. The
        worker applies it — at upload if the recording is still local, else to the objects in the bucket,
        retrying while S3 is down. The first hold of a call wins; it is returned.
        """
        record = HoldRecord.create(call_id, reason, by, at=now_iso(), started_at=started_at)
        try:
            stored = await asyncio.to_thread(self.spool.write_hold, record)
        except OSError as exc:
            # A full spool disk must not lose a *1: keep it here, apply it at upload, and write it on
            # every pass until it is durable (log, doctor and the MQTT status say the disk is full).
            stored = self._unwritten_holds.setdefault(record.call_id, record)
            self._note_write_error(exc)
            log.error(
                "hold event=not_durable call_id=%s error=%s (kept in memory; retried until written)",
                record.call_id,
                clean_log_value(exc.strerror or exc, max_chars=80),
            )
            await self._report_disk()
        else:
            log.info("hold event=requested call_id=%s", record.call_id)
        await self.notify(record.call_id)
        return stored

    def _note_write_error(self, exc: BaseException) -> None:
        if is_out_of_space(exc):
            self._space_error = f"{type(exc).__name__}: {getattr(exc, 'strerror', '') or exc}"

    def _write_unwritten_holds(self) -> None:
        """Blocking: try again to make the holds kept in memory durable."""
        for call_id, record in list(self._unwritten_holds.items()):
            try:
                self.spool.write_hold(record)
            except OSError as exc:
                self._note_write_error(exc)
                return  # the disk is still full: the next pass tries again
            self._space_error = ""
            del self._unwritten_holds[call_id]
            self._due.add(call_id)
            log.warning("hold event=durable call_id=%s (written after the disk had refused it)", call_id)

    def _observe_disk(self) -> DiskState:
        """Blocking: the spool's (or the hold queue's, if worse) disk state."""
        if self._space_error and not self._unwritten_holds:
            self._space_error = ""  # nothing waits for room any more: statvfs alone says it again
        states = [disk_state(self.spool.directory, write_error=self._space_error)]
        if self.spool.queue_dir != self.spool.directory:
            states.append(disk_state(self.spool.queue_dir, write_error=self._space_error))
        order = {"full": 0, "unknown": 1, "low": 2, "ok": 3}
        return min(states, key=lambda d: order.get(d.state, 1))

    async def _report_disk(self) -> None:
        """Log a change of the disk state, and put it into the MQTT status (``spool_disk``)."""
        state = await asyncio.to_thread(self._observe_disk)
        previous, self.disk = self.disk, state
        if previous is not None and previous.state == state.state:
            return
        level = {"ok": logging.INFO, "low": logging.WARNING}.get(state.state, logging.ERROR)
        if previous is not None or state.state != "ok":
            log.log(
                level,
                "spool event=disk_%s path=%s free_bytes=%s unwritten_holds=%d error=%s",
                state.state,
                state.path,
                state.free_bytes,
                len(self._unwritten_holds),
                clean_log_value(state.error or "-", max_chars=80),
            )
        if isinstance(self.events, StatusDetails):
            self.events.set_status_detail("spool_disk", state.as_dict())

    async def run(self) -> None:
        """Scan the spool now and keep uploading until cancelled."""
        await self._acquire_lock()
        log.info(
            "upload event=started spool=%s queue=%s bucket=%s",
            self.spool.directory,
            self.spool.queue_dir,
            self.store.bucket,
        )
        try:
            async with asyncio.TaskGroup() as tasks:
                full = True
                while True:
                    self._wake.clear()
                    if full:
                        self._next_full = time.monotonic() + self.poll_interval_s
                        await self._schedule(tasks, None)
                    else:
                        ids, self._due = self._due, set()
                        await self._schedule(tasks, ids | self._retries_due(time.monotonic()))
                    full = await self._sleep()
        finally:
            self._release_lock()

    async def _sleep(self) -> bool:
        """Until woken (a notify, a finished upload) or a retry falls due; True when the periodic full
        scan of the spool is due. Between full scans only the call ids that were named are looked at:
        under load a scan of the whole spool per burst of finished calls cost more than the uploads."""
        retries = [t.not_before for t in self._track.values() if t.not_before > 0]
        if self._unwritten_holds:  # a hold not yet on disk: try again soon
            retries.append(time.monotonic() + 1.0)
        until = min([self._next_full, *retries])
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, until - time.monotonic())):
                await self._wake.wait()
                if self.coalesce_s > 0:
                    await asyncio.sleep(self.coalesce_s)  # calls end in bursts: one pass per burst
        return time.monotonic() >= self._next_full

    def _retries_due(self, now: float) -> set[str]:
        return {cid for cid, t in self._track.items() if 0 < t.not_before <= now and cid not in self._active}

    async def wait_empty(self, poll_s: float = 0.1) -> None:
        """Return once the spool holds no recording and no hold marker and no upload is still finishing
        (for drains and tests). An upload removes its local files *before* it emits ``recording_stored``:
        an empty spool alone let a drain stop the uploader in between, and the event was lost."""
        while True:
            if (
                not self._active
                and not self._unwritten_holds
                and not await asyncio.to_thread(self.spool.scan)
            ):
                return
            await asyncio.sleep(poll_s)

    # -- scheduling

    async def _acquire_lock(self) -> None:
        """One uploader per queue: a second process on the same spool waits instead of racing."""
        self.spool.queue_dir.mkdir(parents=True, exist_ok=True)
        path = self.spool.queue_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        warned = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
                if not warned:
                    log.warning("upload event=waiting_for_lock path=%s (another uploader runs)", path)
                    warned = True
                await asyncio.sleep(1.0)
                continue
            self._lock_fd = fd
            return

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None

    def _metadata_for(self, state: LocalState) -> Mapping[str, Any] | InvalidMetadata | None:
        if state.json is None:
            self._meta_cache.pop(state.call_id, None)
            return None
        stamp = (state.json.size, int(state.json.mtime * 1e9))
        cached = self._meta_cache.get(state.call_id)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            value: Mapping[str, Any] | InvalidMetadata = self.spool.read_metadata(state.call_id)
        except FileNotFoundError:
            return None
        except InvalidMetadata as exc:
            value = exc
        except (ValueError, OverflowError, RecursionError) as exc:  # a check above missed it: still not fatal
            value = InvalidMetadata(f"{state.call_id}.json: {type(exc).__name__}")
        self._meta_cache[state.call_id] = (stamp, value)
        return value

    def _plan(self, ids: set[str] | None) -> list[tuple[LocalState, Decision]]:
        """Blocking: look (the whole spool, or only ``ids``) and decide (runs in a thread)."""
        now = self.clock()
        if ids is None:
            states = self.spool.scan()
            looked: set[str] = set(self._meta_cache)
        else:
            states = {}
            for cid in ids:
                state = self.spool.inspect(cid)
                if state.wav or state.done or state.json or state.hold:
                    states[cid] = state
            looked = ids
        for gone in looked - set(states):
            self._meta_cache.pop(gone, None)
        plan = [(s, decide(s, self._metadata_for(s), now, self.timing)) for s in states.values()]
        plan.sort(key=lambda item: item[0].oldest)
        return plan

    async def _schedule(self, tasks: asyncio.TaskGroup, ids: set[str] | None) -> None:
        """Start what is ready: of the whole spool (``ids`` None), or of the named call ids."""
        if self._unwritten_holds:
            await asyncio.to_thread(self._write_unwritten_holds)
            if ids is not None:
                ids = ids | self._due
        if ids is None or self._unwritten_holds:
            await self._report_disk()
        if ids is not None and not ids:
            return
        try:
            plan = await asyncio.to_thread(self._plan, ids)
        except OSError as exc:
            log.error("upload event=scan_failed spool=%s error=%s", self.spool.directory, exc)
            return
        present = {s.call_id for s, _ in plan}
        for cid in list(self._track) if ids is None else ids:
            if cid not in present and cid not in self._active:
                self._track.pop(cid, None)
        mono = time.monotonic()
        first_scan = ids is None and not self._scanned_once
        self._scanned_once = self._scanned_once or ids is None
        for state, decision in plan:
            cid = state.call_id
            track = self._track.get(cid)
            if track is None:
                track = self._track[cid] = _Track(fresh=not first_scan)
            if decision.reason != track.last_reason:
                track.last_reason = decision.reason
                level = logging.ERROR if decision.action is Action.INVALID else logging.DEBUG
                log.log(
                    level,
                    "upload event=state call_id=%s action=%s reason=%s",
                    cid,
                    decision.action.value,
                    decision.reason.replace(" ", "_"),
                )
            if cid in self._active or track.not_before > mono:
                continue
            track.not_before = 0.0  # looked at now; a failure or RetryLater sets the next time again
            if decision.action is Action.WAIT:
                continue
            if len(self._active) >= self.concurrency:
                self._due.add(cid)  # next, when an upload finishes (it wakes the loop)
                continue
            self._active.add(cid)
            tasks.create_task(self._run_one(cid, decision), name=f"upload-{cid}")

    async def _run_one(self, call_id: str, decision: Decision) -> None:
        track = self._track.setdefault(call_id, _Track())
        try:
            if decision.action is Action.UPLOAD:
                await self._upload(call_id, decision)
            elif decision.action is Action.ADOPT_ORPHAN:
                await asyncio.to_thread(self._adopt, call_id)
            elif decision.action is Action.APPLY_HOLD:
                await self._apply_marker_hold(call_id)
            elif decision.action is Action.DROP_STRAY_DONE:
                await asyncio.to_thread(self.spool.remove_stray_done, call_id)
            elif decision.action is Action.INVALID:
                await asyncio.to_thread(self._salvage, call_id, decision.reason)
                self._due.add(call_id)  # upload it with the salvaged metadata on the next pass
            track.attempts = 0
            track.not_before = 0.0
        except RetryLater as exc:
            track.not_before = time.monotonic() + exc.delay_s
            log.debug("upload event=later call_id=%s reason=%s", call_id, str(exc).replace(" ", "_"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # evidence is never dropped: every failure is retried
            track.attempts += 1
            track.fresh = False  # part of it may be stored: look before writing again
            self.stats.failures += 1
            metrics.UPLOAD_FAILURES.inc()
            self._note_write_error(exc)
            delay = backoff_delay(track.attempts, base_s=self.backoff_base_s, cap_s=self.backoff_cap_s)
            track.not_before = time.monotonic() + delay
            # An outage is expected and logged as a warning; a refusal (credentials, policy) or anything
            # unexpected needs an operator, but is retried all the same: evidence is never given up.
            level = logging.ERROR
            if isinstance(exc, StorageError | OSError) and not isinstance(exc, StorageRefused):
                level = logging.WARNING
            log.log(
                level,
                "upload event=failed call_id=%s attempt=%d retry_in_s=%.1f error=%s: %s",
                call_id,
                track.attempts,
                delay,
                type(exc).__name__,
                str(exc)[:300],
                exc_info=not isinstance(exc, StorageError | OSError),
            )
        finally:
            self._active.discard(call_id)
            self._wake.set()

    # -- the work

    def _salvage(self, call_id: str, reason: str) -> None:
        """Blocking: unusable ``<id>.json`` (malformed, huge, deeply nested, impossible dates) goes to the
        quarantine and is replaced by minimal metadata, so the audio is still uploaded; a hold or flag
        still visible in the bad document becomes a hold marker first (a crash in between keeps it)."""
        files = self.spool.files(call_id)
        try:
            with files.json.open("rb") as fh:
                raw = fh.read(MAX_METADATA_BYTES + 1)
        except FileNotFoundError:
            return
        held = hold_signal(raw)
        moved = self.spool.quarantine(files.json)
        where = str(moved.relative_to(self.spool.directory))
        doc = salvage_metadata(call_id, files.wav, reason, where)
        if held and self.spool.read_hold(call_id) is None and call_id not in self._unwritten_holds:
            self.spool.write_hold(
                HoldRecord.create(
                    call_id,
                    "flagged or held in metadata that was unusable (quarantined)",
                    "uploader",
                    at=now_iso(),
                    started_at=doc["started_at"],
                )
            )
        self.spool.write_metadata(call_id, doc, replace=True)
        self._meta_cache.pop(call_id, None)
        log.error(
            "upload event=metadata_quarantined call_id=%s reason=%s moved_to=%s hold_signal=%s",
            call_id,
            clean_log_value(reason, max_chars=120),
            where,
            held,
        )
        self.events.emit("metadata_quarantined", call_id, reason=reason[:500], quarantined=where, held=held)

    def _adopt(self, call_id: str) -> None:
        files = self.spool.files(call_id)
        doc = orphan_metadata(call_id, files.wav)
        if self.spool.write_metadata(call_id, doc, replace=False):
            log.warning("upload event=orphan_adopted call_id=%s started_at=%s", call_id, doc["started_at"])

    def _hash(self, path: Path) -> tuple[int, str, str]:
        """Size, sha256 and MD5 of the audio (one read; remembered while the file is unchanged)."""
        st = path.stat()
        stamp = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
        cached = self._hash_cache.get(stamp)
        if cached is not None:
            return st.st_size, *cached
        size, sha, md5 = hash_file_md5(path)
        if size == st.st_size:
            if len(self._hash_cache) > 1000:
                self._hash_cache.clear()
            self._hash_cache[stamp] = (sha, md5)
        return size, sha, md5

    def _is_fresh(self, call_id: str) -> bool:
        track = self._track.get(call_id)
        return track is not None and track.fresh and track.attempts == 0

    async def _verify_put(
        self, key: str, result: PutResult, *, size: int, sha256: str, md5: str, path: Path | None = None
    ) -> ObjectInfo | None:
        """Prove the object holds what was sent: its ETags are the MD5s of our bytes where the server
        gives them (returns None: nothing read back), else read back size and ``x-amz-meta-sha256`` of
        the version this put created. A key that may not read it (the service and audio) compares the
        listed version's size and ETag with the file's instead; with SSE-C that proves nothing, so
        there the service key needs ``s3:GetObject`` on audio (README, "Storage and roles")."""
        if result.verified or (self.store.put_etag_is_md5(size) and result.etag == md5):
            return None
        try:
            info = await self.store.stat(key, version_id=result.version_id)
        except StorageRefused as exc:
            if exc.code != "AccessDenied" or path is None:
                raise
            etags = await asyncio.to_thread(self.store.content_etags, path, size)
            if not etags:
                raise
            listed = [v for v in await key_versions(self.store, key) if v.version_id == result.version_id]
            if not listed or listed[0].size != size or listed[0].etag not in etags:
                raise VerifyError(f"verify {key}: listed version does not match the uploaded file") from None
            return None
        if info is None or info.size != size or info.metadata.get(META_SHA256) != sha256:
            raise VerifyError(f"verify {key}: object does not match the uploaded file")
        return info

    async def _audio_named_by_metadata(self, keys: RecordingKeys) -> ObjectInfo | None:
        """The audio version an earlier attempt recorded in the metadata object (``audio.sha256``,
        ``audio.bytes``, ``audio.version_id``): the service may read metadata, never audio."""
        data = await self.store.get_bytes(keys.metadata, max_bytes=MAX_METADATA_BYTES)
        try:
            doc = json.loads(data) if data is not None else None
        except (ValueError, RecursionError):
            return None
        audio = doc.get("audio") if isinstance(doc, dict) else None
        if not isinstance(audio, dict) or audio.get("key") != keys.audio:
            return None
        sha, size, vid = audio.get("sha256"), audio.get("bytes"), audio.get("version_id")
        if not isinstance(sha, str) or not isinstance(size, int) or not isinstance(vid, str):
            return None
        status = str(audio.get("status") or "stored")
        return ObjectInfo(
            keys.audio, size, version_id=vid, metadata={META_SHA256: sha, META_AUDIO_STATUS: status}
        )

    async def _stored_audio(self, keys: RecordingKeys, wav: Path, size: int, sha: str) -> ObjectInfo | None:
        """What an earlier attempt stored at the audio key, as far as this key may know: the metadata
        object's record first, then a HEAD; where the HEAD is refused (the service role on a server
        that enforces it), the latest listed version, identified by size and ETag (the MD5s the server
        computed from the bytes it received: proof without reading). A version that does not match is
        returned as is, so the caller sees a collision and never replaces it."""
        named = await self._audio_named_by_metadata(keys)
        if named is not None and named.size == size and named.metadata.get(META_SHA256) == sha:
            return named
        try:
            return await self.store.stat(keys.audio)
        except StorageRefused as exc:
            if exc.code != "AccessDenied":
                raise
        versions = await key_versions(self.store, keys.audio)
        if not versions or versions[0].is_delete_marker:
            return None
        latest = versions[0]
        etags = await asyncio.to_thread(self.store.content_etags, wav, size)
        if not etags:
            raise StorageRefused(
                f"{keys.audio}: exists, may not be read and its ETag proves nothing (SSE-C)",
                code="AccessDenied",
            )
        if latest.size != size or latest.etag not in etags:
            return latest  # no sha256 metadata: a collision, never replaced
        log.warning(
            "upload event=audio_identified_by_etag key=%s version_id=%s (stored by an earlier attempt;"
            " HEAD refused to this key)",
            keys.audio,
            latest.version_id,
        )
        return dataclasses.replace(latest, metadata={META_SHA256: sha})

    async def _existing(
        self, key: str, same: Callable[[ObjectInfo], bool], info: ObjectInfo | None = None
    ) -> ObjectInfo:
        """The object already at ``key`` (``info``, or read now after a conditional create lost), if it
        is this very recording (a retry whose first answer was lost); a different one is a
        :class:`RecordingCollision`."""
        if info is None:
            info = await self.store.stat(key)
        if info is None or not same(info):
            log.error("upload event=collision key=%s (a different object exists; never replaced)", key)
            raise RecordingCollision(
                f"{key} already holds a different recording; not replaced", code="Exists"
            )
        self.stats.skipped_existing += 1
        return info

    async def _store_audio(
        self, call_id: str, keys: RecordingKeys, decision: Decision, held: bool
    ) -> AudioResult:
        mode = decision.audio
        if mode is AudioMode.NOT_RECORDED:
            return AudioResult("not_recorded")
        if mode is AudioMode.ABSENT:
            info = await self._audio_named_by_metadata(keys) or await self.store.stat(keys.audio)
            if info is not None and info.metadata.get(META_SHA256):
                # Uploaded before a crash that came after the local file was removed.
                status = info.metadata.get(META_AUDIO_STATUS, "stored")
                return AudioResult(status, keys.audio, info.size, info.metadata[META_SHA256], info.version_id)
            if not decision.final:
                raise RetryLater("audio expected; waiting for it", self.timing.incomplete_after_s / 4)
            log.warning("upload event=audio_missing call_id=%s", call_id)
            return AudioResult("missing")
        wav = self.spool.files(call_id).wav
        size, sha, md5 = await asyncio.to_thread(self._hash, wav)
        if size == 0:
            return AudioResult("empty", None, 0, None)
        status = "incomplete" if mode is AudioMode.INCOMPLETE else "stored"

        def same(info: ObjectInfo) -> bool:
            return info.size == size and info.metadata.get(META_SHA256) == sha

        info = None if self._is_fresh(call_id) else await self._stored_audio(keys, wav, size, sha)
        if info is not None:
            info = await self._existing(keys.audio, same, info)
            log.info("upload event=audio_already_stored call_id=%s key=%s", call_id, keys.audio)
            version = info.version_id
        else:
            try:
                # A conditional create: an existing recording is never replaced by a second version.
                result = await self.store.put_file(
                    keys.audio,
                    wav,
                    length=size,
                    sha256=sha,
                    metadata={META_SHA256: sha, META_CALL_ID: call_id, META_AUDIO_STATUS: status},
                    content_type="audio/wav",
                    if_none_match=True,
                    legal_hold=held,  # held from its creation: the service never needs PutObjectLegalHold
                )
            except PreconditionFailed:
                found = await self._stored_audio(keys, wav, size, sha)
                version = (await self._existing(keys.audio, same, found)).version_id
            else:
                await self._verify_put(keys.audio, result, size=size, sha256=sha, md5=md5, path=wav)
                return AudioResult(status, keys.audio, size, sha, result.version_id, created=True)
        return AudioResult(status, keys.audio, size, sha, version)

    async def _store_metadata(
        self, keys: RecordingKeys, doc: Mapping[str, Any], audio: AudioResult, *, held: bool = False
    ) -> tuple[str | None, bool]:
        """Store the metadata object once (conditional create, under a legal hold if ``held``); returns
        its version id and whether this call created it."""
        audio_mark = audio.sha256 or NO_AUDIO
        orphaned = "yes" if doc.get("orphaned") else "no"

        def same(info: ObjectInfo) -> bool:
            return (
                info.metadata.get(META_AUDIO_SHA256) == audio_mark
                and info.metadata.get(META_ORPHANED, "no") == orphaned
            )

        info = None if self._is_fresh(keys.call_id) else await self.store.stat(keys.metadata)
        if info is not None:
            # Already stored for this audio: a re-run after a crash must not add a second version.
            info = await self._existing(keys.metadata, same, info)
            log.info("upload event=metadata_already_stored call_id=%s key=%s", keys.call_id, keys.metadata)
            return info.version_id, False
        data = encode_metadata(doc)
        sha = hashlib.sha256(data).hexdigest()
        try:
            result = await self.store.put_bytes_if(
                keys.metadata,
                data,
                metadata={
                    META_SHA256: sha,
                    META_AUDIO_SHA256: audio_mark,
                    META_CALL_ID: keys.call_id,
                    META_ORPHANED: orphaned,
                },
                if_none_match=True,
                content_type="application/json",
                legal_hold=held,
            )
        except PreconditionFailed:
            return (await self._existing(keys.metadata, same)).version_id, False
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        await self._verify_put(keys.metadata, result, size=len(data), sha256=sha, md5=md5)
        return result.version_id, True

    async def _ensure_held(
        self,
        hold: HoldRecord,
        keys: RecordingKeys,
        versions: Mapping[str, str],
        created_held: frozenset[str] = frozenset(),
    ) -> bool:
        """The hold record pinning ``versions`` and legal holds on them; a pinned version that is gone
        fails the upload (retried; the local files stay), never a silent success. ``created_held``: the
        keys this upload created with the legal-hold header. False: a legal hold was refused (reported)."""
        outcome = await self.holds.apply(hold, keys, versions=versions, created_held=created_held)
        if outcome.lost:
            raise StorageError(f"hold {keys.call_id}: pinned version gone: {', '.join(outcome.lost)}")
        self._report_refused(hold, outcome)
        return not outcome.refused

    def _report_refused(self, hold: HoldRecord, outcome: HoldOutcome) -> None:
        """Legal holds this key may not place (the service on Ceph RGW, for a hold asked after the audio
        was stored without one): the hold record stands and the retention sweep honours it, but the S3
        legal hold needs an admin's ``kasuhara recordings hold``. Said loudly, never counted as held."""
        if not outcome.refused:
            return
        self.stats.holds_need_admin += 1
        log.error(
            "hold event=legal_hold_refused call_id=%s keys=%s (hold record kept; run `kasuhara recordings"
            " hold` with the admin key to place the S3 legal hold)",
            hold.call_id,
            ",".join(outcome.refused),
        )
        self.events.emit(
            "hold_incomplete",
            hold.call_id,
            reason="legal_hold_refused",
            keys=list(outcome.refused),
            record=True,
        )

    def _fix_stereo(self, call_id: str) -> None:
        """Blocking: a stereo recording's header says 2 channels before it is hashed (MixMonitor's ``D``
        writes it as one; :func:`~kasuhara_ari.recording.fix_stereo_header`)."""
        wav = self.spool.files(call_id).wav
        try:
            if fix_stereo_header(wav):
                log.info("upload event=stereo_header_fixed call_id=%s", call_id)
        except FileNotFoundError:
            pass  # no audio: the metadata goes up alone, as before
        except ValueError as exc:  # evidence is never held back for its header: stored as it is
            log.warning("upload event=stereo_header_unfixable call_id=%s error=%s", call_id, exc)

    def _read_local(self, call_id: str) -> tuple[dict[str, Any], HoldRecord | None]:
        """Blocking: the call's metadata and hold marker (one trip to a thread for both); a hold the disk
        refused is taken from memory."""
        marker = self.spool.read_hold(call_id) or self._unwritten_holds.get(call_id)
        return self.spool.read_metadata(call_id), marker

    async def _upload(self, call_id: str, decision: Decision) -> None:
        try:
            metadata, marker = await asyncio.to_thread(self._read_local, call_id)
        except FileNotFoundError:
            return  # gone meanwhile (removed by hand?): the next scan decides again
        audio_meta = metadata.get("audio")
        if isinstance(audio_meta, Mapping) and audio_meta.get("channels") == 2:
            await asyncio.to_thread(self._fix_stereo, call_id)
        keys = recording_keys(call_id, metadata["started_at"])
        hold = marker
        given = metadata.get("hold")
        if hold is None and isinstance(given, Mapping):
            hold = HoldRecord.create(
                call_id,
                given.get("reason", ""),
                given.get("by", ""),
                at=str(given.get("at") or now_iso()),
                started_at=keys_started(metadata),
            )
        if hold is not None:
            await self.holds.apply(hold, keys, resolve=False)  # record first (objects may not exist yet)
        audio = await self._store_audio(call_id, keys, decision, held=hold is not None)
        doc = final_metadata(metadata, keys, audio, hold)
        if not doc.get("node"):
            # The uploader runs beside the node that recorded (one spool per node): it names it.
            doc["node"] = node_name(self.cfg.general.node)
        meta_version, meta_created = await self._store_metadata(keys, doc, audio, held=hold is not None)
        # The versions this upload created (or found): what a hold pins, so a later PUT to either key
        # can never stand in for the evidence.
        versions = {
            k: v for k, v in ((audio.key, audio.version_id), (keys.metadata, meta_version)) if k and v
        }
        complete = True
        if hold is not None:
            # Completes the record with the pinned versions and holds exactly those (idempotent); what
            # this upload created carries its legal hold from the PUT already.
            created = {keys.metadata} if meta_created else set()
            if audio.created and audio.key:
                created.add(audio.key)
            complete = await self._ensure_held(hold, keys, versions, frozenset(created))
        # Local files go now, unless a hold was asked for while uploading: that one is applied first.
        held = hold is not None
        while (late := await asyncio.to_thread(self.spool.finish, call_id, marker)) is not None:
            complete = await self._ensure_held(late, keys, versions)
            marker, held = late, True
        if held and complete:
            self.stats.holds_applied += 1
        self.stats.stored += 1
        metrics.UPLOADS.inc()
        if audio.created and audio.bytes:
            metrics.UPLOADED_BYTES.inc(audio.bytes)
        fields: dict[str, Any] = {
            "key": audio.key or keys.metadata,
            "metadata_key": keys.metadata,
            "audio_status": audio.status,
            "held": held,
        }
        if audio.bytes is not None:
            fields["bytes"] = audio.bytes
        if audio.sha256 is not None:
            fields["sha256"] = audio.sha256
        self.events.emit("recording_stored", call_id, **fields)
        log.info(
            "upload event=stored call_id=%s key=%s bytes=%s audio=%s held=%s",
            call_id,
            fields["key"],
            audio.bytes,
            audio.status,
            fields["held"],
        )

    async def _apply_marker_hold(self, call_id: str) -> None:
        marker = await asyncio.to_thread(self.spool.read_hold, call_id)
        if marker is None:
            return
        state = await asyncio.to_thread(self.spool.inspect, call_id)
        if state.json is not None or state.wav is not None:
            return  # the recording is (again) local: the upload applies the hold
        if marker.started_at is not None:
            keys = recording_keys(call_id, marker.started_at)
        else:
            # An unreadable marker lost the call's date: find the recording as `recordings show` does
            # (HEAD requests on the days the call id's epoch and an existing hold record point at).
            located = await Catalog(self.store).locate(call_id)
            if located is None:
                log.error("hold event=cannot_locate call_id=%s reason=no_started_at", call_id)
                raise RetryLater("hold without started_at", self.backoff_cap_s)
            keys = located.keys
        outcome = await self.holds.apply(marker, keys)
        if outcome.pending_upload and not outcome.lost:
            # Not uploaded and not local: the call has not ended yet (metadata comes later). Keep it.
            raise RetryLater("recording not uploaded yet", min(self.backoff_cap_s, 5.0))
        if outcome.lost:
            # The hold came too late: a sweep deleted (part of) the evidence. Never counted as applied;
            # the record stays (it says a hold was asked for), the marker goes (retrying cannot help).
            self.stats.holds_lost += 1
            log.error(
                "hold event=evidence_lost call_id=%s keys=%s (deleted before the hold was placed)",
                call_id,
                ",".join(outcome.lost),
            )
            self.events.emit(
                "hold_incomplete", call_id, reason="evidence_lost", keys=list(outcome.lost), record=True
            )
        elif not outcome.refused:
            self.stats.holds_applied += 1
        self._report_refused(marker, outcome)
        await asyncio.to_thread(self.spool.remove_hold, call_id, marker)


def keys_started(metadata: Mapping[str, Any]) -> str | None:
    value = metadata.get("started_at")
    return value if isinstance(value, str) else None


# --------------------------------------------------------------------------------------------- status


@dataclass(frozen=True)
class SpoolStatus:
    """The queue's backlog as ``kasuhara storage status`` shows it."""

    spool: str
    queue: str
    recordings: int
    ready: int
    waiting_for_audio: int
    in_call: int
    orphans: int
    invalid: int
    pending_holds: int
    bytes: int
    oldest_age_s: float | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def spool_status(spool: Spool, *, now: float | None = None, timing: Timing | None = None) -> SpoolStatus:
    """Blocking: count what the uploader would do with each call in the spool."""
    now = time.time() if now is None else now
    timing = timing or Timing()
    counts = dict.fromkeys(("ready", "waiting_for_audio", "in_call", "orphans", "invalid", "holds"), 0)
    recordings = 0
    total = 0
    oldest: float | None = None
    for state in spool.scan().values():
        if state.hold is not None:
            counts["holds"] += 1
        if state.wav is None and state.json is None:
            continue
        recordings += 1
        total += state.bytes
        oldest = state.oldest if oldest is None else min(oldest, state.oldest)
        meta: Mapping[str, Any] | InvalidMetadata | None = None
        if state.json is not None:
            try:
                meta = spool.read_metadata(state.call_id)
            except InvalidMetadata as exc:
                meta = exc
            except FileNotFoundError:
                meta = None
        d = decide(state, meta, now, timing)
        if d.action is Action.UPLOAD:
            counts["ready"] += 1
        elif d.action is Action.INVALID:
            counts["invalid"] += 1
        elif d.action is Action.ADOPT_ORPHAN:
            counts["orphans"] += 1
        elif state.json is not None:
            counts["waiting_for_audio"] += 1
        else:
            counts["in_call"] += 1
    return SpoolStatus(
        spool=str(spool.directory),
        queue=str(spool.queue_dir),
        recordings=recordings,
        ready=counts["ready"],
        waiting_for_audio=counts["waiting_for_audio"],
        in_call=counts["in_call"],
        orphans=counts["orphans"],
        invalid=counts["invalid"],
        pending_holds=counts["holds"],
        bytes=total,
        oldest_age_s=None if oldest is None else max(0.0, now - oldest),
    )


def build_uploader(cfg: Config, events: EventSink, **options: Any) -> Uploader:
    """The uploader ``kasuhara serve`` runs: a :class:`MinioStore` from ``[storage]`` over the spool."""
    options.setdefault("timing", Timing(orphan_after_s=cfg.storage.orphan_after_s))
    return Uploader(cfg, MinioStore.from_config(cfg.storage), events, **options)
