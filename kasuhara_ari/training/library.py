"""The training library: clips of real harassment calls for staff training, kept apart from the evidence.

Objects (``kasuhara.training/1``; README "Training library"):

``training/<clip_id>.wav``              the clip (16-bit PCM; stereo when the source was)
``training/<clip_id>.json``             title, note, duration, who made it and when: nothing about the
                                        caller (no number, no name, no call id, no call time)
``training-sources/<clip_id>.json``     which call and range it was cut from (``kasuhara.training-source/1``):
                                        the only link to the source, under a prefix only the admin S3 key
                                        may read (docs/s3-policies)

The clip id is random: it says nothing about the call. Retention walks ``recordings/`` only, so clips
stay until removed; deleting the source recording leaves the clip whole (it is a copy). Evidence search
and export read ``recordings/`` only, so a clip is never evidence.

Only a held or flagged recording may be cut (it is a harassment case; anything else is refused), and
only from its pinned audio version, verified against the sha256 recorded at capture. Every operation is
checked against the desk's roles (``training_*`` in PERMITS) and audited like the desk's: ``add``, ``play``
and ``export`` write their record first and are refused if it cannot be written.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import secrets
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from ..evidence.desk import (
    DeskFailed,
    DeskIntegrityFailure,
    DeskNotFound,
    DeskRefused,
    EvidenceDesk,
    call_target,
    permit,
)
from ..export import verdict
from ..safe import clean_caller_text
from ..storage import TRAINING_PREFIX, TRAINING_SOURCES_PREFIX, StorageError, hash_file
from .clipper import ClipError, cut

SCHEMA = "kasuhara.training/1"
SOURCE_SCHEMA = "kasuhara.training-source/1"
TITLE_MAX_CHARS = 200
NOTE_MAX_CHARS = 4000
#: The default shift of the caller's voice with ``--anonymise`` (cents; -400 = four semitones down).
DEFAULT_PITCH_CENTS = -400
_CLIP_ID_RE = re.compile(r"^tc-[0-9a-f]{16}$")


def new_clip_id() -> str:
    """Random, so the id says nothing about the call it came from."""
    return f"tc-{secrets.token_hex(8)}"


def clip_id_of(value: str) -> str:
    """``value`` if it is a clip id (``tc-`` and 16 hex digits), else ValueError: ids become keys."""
    if not _CLIP_ID_RE.match(value):
        raise ValueError(f"{value!r} is not a training clip id (tc- and 16 hex digits)")
    return value


def clip_keys(clip_id: str) -> tuple[str, str, str]:
    """(audio, metadata, source link) keys of a clip."""
    cid = clip_id_of(clip_id)
    audio, meta = f"{TRAINING_PREFIX}{cid}.wav", f"{TRAINING_PREFIX}{cid}.json"
    return audio, meta, f"{TRAINING_SOURCES_PREFIX}{cid}.json"


@dataclass(frozen=True)
class Clip:
    """A clip's metadata document (``training/<clip_id>.json``)."""

    clip_id: str
    title: str
    note: str
    duration_s: float
    channels: int
    anonymised: bool
    created_at: str
    created_by: str
    audio_key: str
    bytes: int
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "clip_id": self.clip_id,
            "title": self.title,
            "note": self.note,
            "duration_s": self.duration_s,
            "channels": self.channels,
            "layout": ["caller", "agent"] if self.channels == 2 else ["mixed"],
            "anonymised": self.anonymised,
            "created_at": self.created_at,
            "created_by": self.created_by,
            "audio": {"key": self.audio_key, "bytes": self.bytes, "sha256": self.sha256},
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Clip:
        """ValueError on a document that is not a clip's."""
        if doc.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} document")
        audio = doc.get("audio")
        if not isinstance(audio, Mapping):
            raise ValueError("no audio")
        try:
            return cls(
                clip_id=clip_id_of(str(doc["clip_id"])),
                title=str(doc["title"]),
                note=str(doc.get("note") or ""),
                duration_s=float(doc["duration_s"]),
                channels=int(doc["channels"]),
                anonymised=bool(doc.get("anonymised")),
                created_at=str(doc["created_at"]),
                created_by=str(doc["created_by"]),
                audio_key=str(audio["key"]),
                bytes=int(audio["bytes"]),
                sha256=str(audio["sha256"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"incomplete clip document: {exc}") from exc


@dataclass(frozen=True)
class Unlisted:
    """A ``training/*.json`` that could not be read as a clip."""

    key: str
    problem: str


def identity_in(text: str, number: str, name: str) -> str:
    """What of the caller's identity ``text`` (a title or note) repeats: "" when nothing."""
    digits = re.sub(r"\D", "", number)
    if len(digits) >= 4 and digits in re.sub(r"\D", "", text):
        return "the caller's number"
    if len(name.strip()) >= 2 and name.strip().casefold() in text.casefold():
        return "the caller's name"
    return ""


class TrainingLibrary:
    """The training operations for the desk's principal, audited in the desk's audit session."""

    def __init__(self, desk: EvidenceDesk, *, pitch_cents: int = DEFAULT_PITCH_CENTS) -> None:
        self.desk = desk
        self.store = desk.store
        self.pitch_cents = pitch_cents

    def _permit(self, action: str) -> None:
        permit(self.desk.principal, action)

    # -- adding

    async def add(
        self,
        call_id: str,
        start_s: float,
        end_s: float,
        *,
        title: str,
        note: str = "",
        anonymise: bool = False,
        days: Sequence[date] = (),
        reason: str = "",
    ) -> Clip:
        """Cut ``start_s``-``end_s`` (seconds into the recording) out of a held or flagged call into a new
        clip. ValueError for a bad range, title or note (nothing written)."""
        self._permit("training_add")
        title = (clean_caller_text(title, max_chars=TITLE_MAX_CHARS) or "").strip()
        note = (clean_caller_text(note, max_chars=NOTE_MAX_CHARS) or "").strip()
        if not title:
            raise ValueError("a clip needs a title")
        if not 0 <= start_s < end_s:
            raise ValueError(f"--from ({start_s:.3f} s) must be before --to ({end_s:.3f} s)")
        found = await self.desk.locate(call_id, days)
        ev = await self.desk.evidence(found)
        doc = ev.entry.doc
        flags = doc.get("flags") if isinstance(doc.get("flags"), list) else []
        if ev.hold is None and doc.get("hold") is None and "harassment" not in (flags or []):
            raise DeskRefused(
                f"refused: {call_id} is neither held nor flagged; only harassment cases become training clips"
            )
        caller = doc.get("caller") if isinstance(doc.get("caller"), Mapping) else {}
        assert isinstance(caller, Mapping)
        leak = identity_in(f"{title}\n{note}", str(caller.get("number") or ""), str(caller.get("name") or ""))
        if leak:
            raise ValueError(f"the title or note contains {leak}: a clip never names the caller")
        audio = doc.get("audio") if isinstance(doc.get("audio"), Mapping) else {}
        assert isinstance(audio, Mapping)
        pin = ev.pins.audio
        if not ev.entry.audio_key:
            raise DeskFailed(f"{call_id} has no audio")
        if not pin.present:
            raise DeskIntegrityFailure(f"EVIDENCE MISSING: {pin.key} version {pin.version_id} ({pin.source})")
        clip_id = new_clip_id()
        audio_key, meta_key, source_key = clip_keys(clip_id)
        first = await self.desk.audit_first(
            "training_add",
            reason=reason,
            # The source stays out of ``target`` (which MQTT subscribers see as the event's subject): it is
            # only in the details of the record in the bucket, which only the admin key reads.
            target={"clip_id": clip_id},
            details={
                "source": call_target(found),
                "version_id": pin.version_id,
                "from_s": start_s,
                "to_s": end_s,
                "anonymised": anonymise,
            },
        )
        try:
            with tempfile.TemporaryDirectory(prefix="kasuhara-training-") as tmp:
                source = Path(tmp) / "source.wav"
                clip = Path(tmp) / "clip.wav"
                info = await self.store.get_to_file(pin.key, source, version_id=pin.version_id)
                _, sha = await asyncio.to_thread(hash_file, source)
                recorded = [audio.get("sha256"), info.metadata.get("sha256")]
                if verdict(sha, recorded) == "mismatch":
                    raise DeskIntegrityFailure(
                        f"INTEGRITY FAILURE: {pin.key} version {pin.version_id} does not match the sha256 "
                        "recorded at capture; no clip made"
                    )
                shape = await cut(
                    source, clip, start_s, end_s, pitch_cents=self.pitch_cents if anonymise else None
                )
                clip_size, clip_sha = await asyncio.to_thread(hash_file, clip)
                made = Clip(
                    clip_id=clip_id,
                    title=title,
                    note=note,
                    duration_s=round(shape.duration_s, 3),
                    channels=shape.channels,
                    anonymised=anonymise,
                    created_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
                    created_by=self.desk.audit.by,
                    audio_key=audio_key,
                    bytes=clip_size,
                    sha256=clip_sha,
                )
                link = {
                    "schema": SOURCE_SCHEMA,
                    "clip_id": clip_id,
                    "call_id": found.keys.call_id,
                    "audio_key": pin.key,
                    "audio_version_id": pin.version_id,
                    "audio_sha256": sha,
                    "from_s": start_s,
                    "to_s": end_s,
                    "anonymised": anonymise,
                    "pitch_cents": self.pitch_cents if anonymise else None,
                    "audit_record": first.key,
                }
                # The link first (a clip never exists without it), the metadata last (it makes the clip
                # appear in the list): an interruption leaves at most unlisted objects, never a bad clip.
                await self.store.put_bytes(source_key, _json(link), metadata={})
                await self.store.put_file(
                    audio_key,
                    clip,
                    length=clip_size,
                    sha256=clip_sha,
                    metadata={"sha256": clip_sha},
                    content_type="audio/wav",
                    if_none_match=True,
                )
                await self.store.put_bytes(meta_key, _json(made.as_dict()), metadata={})
        except (ClipError, ValueError, StorageError, DeskFailed) as exc:
            await self.desk.audit_outcome(first, "failed", {"error": str(exc)[:500]})
            if isinstance(exc, ClipError):
                raise DeskFailed(f"no clip made: {exc}") from exc
            raise
        await self.desk.audit_outcome(first, "done", {"clip_id": clip_id, "sha256": clip_sha})
        return made

    # -- reading

    async def clips(self, *, reason: str = "") -> tuple[list[Clip], list[Unlisted]]:
        """Every clip (by creation time), and the documents under ``training/`` that are not clips."""
        self._permit("training_list")
        found: list[Clip] = []
        problems: list[Unlisted] = []
        async for obj in self.store.list_prefix(TRAINING_PREFIX):
            if not obj.key.endswith(".json"):
                continue
            try:
                data = await self.store.get_bytes(obj.key, max_bytes=1024 * 1024)
                if data is None:
                    continue
                clip = Clip.from_dict(json.loads(data))
                if clip_keys(clip.clip_id)[1] != obj.key:
                    raise ValueError("clip_id does not match its key")
                found.append(clip)
            except (ValueError, UnicodeDecodeError) as exc:
                problems.append(Unlisted(obj.key, str(exc)[:200]))
        found.sort(key=lambda c: (c.created_at, c.clip_id))
        await self.desk.note(
            self.desk.audit.new(
                "training_list", reason=reason, target={}, details={"counts": {"listed": len(found)}}
            )
        )
        return found, problems

    async def clip(self, clip_id: str) -> Clip:
        _, meta_key, _ = clip_keys(clip_id)
        data = await self.store.get_bytes(meta_key, max_bytes=1024 * 1024)
        if data is None:
            raise DeskNotFound(f"no training clip {clip_id!r}")
        try:
            return Clip.from_dict(json.loads(data))
        except (ValueError, UnicodeDecodeError) as exc:
            raise DeskFailed(f"{meta_key} is unreadable: {exc}") from exc

    async def _fetch(self, clip: Clip, out: Path) -> None:
        """The clip's audio into ``out``, verified against the sha256 written when it was made."""
        tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
        try:
            await self.store.get_to_file(clip.audio_key, tmp)
            size, sha = await asyncio.to_thread(hash_file, tmp)
            if sha != clip.sha256 or size != clip.bytes:
                raise DeskIntegrityFailure(
                    f"INTEGRITY FAILURE: {clip.audio_key} hashes to {sha} ({size} bytes), the clip's "
                    f"metadata says {clip.sha256} ({clip.bytes} bytes); nothing written"
                )
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)

    async def play(self, clip_id: str, out: Path, *, reason: str = "") -> Clip:
        """The clip's audio into ``out`` for playing, on record as ``training_play`` before it is read."""
        self._permit("training_play")
        clip = await self.clip(clip_id)
        first = await self.desk.audit_first(
            "training_play", reason=reason, target={"clip_id": clip.clip_id}, details={"file": out.name}
        )
        try:
            await self._fetch(clip, out)
        except (DeskFailed, StorageError) as exc:
            await self.desk.audit_outcome(first, "failed", {"error": str(exc)[:500]})
            raise
        await self.desk.audit_outcome(first, "done", {"sha256": clip.sha256})
        return clip

    async def export(self, clip_ids: Sequence[str], out: Path, *, reason: str = "") -> list[Clip]:
        """A zip of clips (``<clip_id>.wav`` and ``.json`` each, ``SHA256SUMS``, ``manifest.json``); no
        source call ids in it. Written through a temporary file: no zip at all if anything fails."""
        self._permit("training_export")
        clips = [await self.clip(c) for c in dict.fromkeys(clip_ids)]
        if not clips:
            raise ValueError("no clips to export")
        first = await self.desk.audit_first(
            "training_export",
            reason=reason,
            target={"clip_ids": [c.clip_id for c in clips]},
            details={"file": out.name},
        )
        tmp_zip = out.with_name(f".{out.name}.{os.getpid()}.part")
        try:
            with tempfile.TemporaryDirectory(prefix="kasuhara-training-") as tmp:
                sums: list[str] = []
                with zipfile.ZipFile(tmp_zip, "w", zipfile.ZIP_DEFLATED) as zf:
                    for c in clips:
                        wav = Path(tmp) / f"{c.clip_id}.wav"
                        await self._fetch(c, wav)
                        zf.write(wav, wav.name)
                        meta = _json(c.as_dict())
                        zf.writestr(f"{c.clip_id}.json", meta)
                        sums.append(f"{c.sha256}  {c.clip_id}.wav")
                        sums.append(f"{hashlib.sha256(meta).hexdigest()}  {c.clip_id}.json")
                    zf.writestr("SHA256SUMS", "\n".join(sums) + "\n")
                    manifest = {
                        "schema": "kasuhara.training-export/1",
                        "created_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
                        "created_by": self.desk.audit.by,
                        "reason": reason,
                        "audit_record": first.key,
                        "clips": [c.as_dict() for c in clips],
                    }
                    zf.writestr("manifest.json", _json(manifest))
            os.replace(tmp_zip, out)
        except (DeskFailed, StorageError, OSError) as exc:
            await self.desk.audit_outcome(first, "failed", {"error": str(exc)[:500]})
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp_zip.unlink()
        await self.desk.audit_outcome(first, "done", {"clips": len(clips)})
        return clips


def _json(doc: Mapping[str, Any]) -> bytes:
    return (json.dumps(doc, ensure_ascii=False, indent=2, sort_keys=True) + "\n").encode()
