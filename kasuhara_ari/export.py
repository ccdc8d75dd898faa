"""Evidence export: a zip whose every byte is checked against the sha256 recorded at capture.

Layout of the zip (paths use the call id, which is safe in a path)::

    manifest.json                 what was exported, by whom, when, from which query; per file its sha256
    SHA256SUMS                    `sha256sum -c SHA256SUMS` verifies every other file, manifest included
    manifest.sig                  Ed25519 over manifest.json and SHA256SUMS (signing.py; when a key exists)
    <call_id>/audio.wav           the audio as stored (absent when the call has none)
    <call_id>/metadata.json       the metadata object, byte for byte as stored
    <call_id>/timeline.json       the call's event timeline (from the metadata's ``timeline``)

What is exported is the *pinned* version of each object (the hold record's ``versions``, else the audio
version the metadata names, else the key's first version: the uploader creates each key once), never
simply the latest: a later PUT to a held key is a new, unheld version. Later versions are listed as
``superseded_by`` (possible tampering) and not exported.

Verification, per file, recorded in the manifest: ``verified`` (the metadata's bytes hash to the
``sha256`` stored on its object; the audio's to both ``audio.sha256`` in the metadata and the object's
own ``sha256``, with ``audio.bytes`` bytes), ``unverifiable`` (no hash was recorded at capture: missing
provenance, not tampering), ``mismatch`` (a recorded hash or size differs), ``missing`` (the pinned
version is gone). The CLI turns these into its exit code.

The zip is written to a temporary file beside the destination and renamed into place only when
complete (and, in the CLI, audited). Audio is streamed through a temporary file, never held in memory;
audio is stored uncompressed (it barely compresses), JSON deflated; zip64 applies beyond 4 GB.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .search import CorruptMetadata, parse_metadata
from .signing import SIGNATURE_NAME, ExportSigner
from .storage import (
    CHUNK,
    META_SHA256,
    HoldRecord,
    ObjectInfo,
    ObjectStore,
    PinnedObject,
    RecordingHolds,
    RecordingKeys,
    StorageError,
    hash_file,
    hold_key,
    parse_recording_key,
    pin_versions,
)

EXPORT_SCHEMA = "kasuhara.export/1"


class EvidenceMismatch(Exception):
    """A stored object does not match the hash recorded at capture (tampering or corruption)."""

    def __init__(self, call_id: str, what: str, detail: str) -> None:
        super().__init__(f"{call_id}: {what}: {detail}")
        self.call_id = call_id
        self.what = what


class ExportError(Exception):
    """The export cannot be made (a recording vanished, unreadable metadata)."""


@dataclass(frozen=True)
class ExportItem:
    call_id: str
    metadata_key: str


@dataclass(frozen=True)
class ExportResult:
    path: Path
    recordings: int
    files: int
    bytes: int
    sha256: str
    call_ids: tuple[str, ...]
    #: Files per verification state: ``verified``, ``unverifiable``, ``mismatch``, ``missing``.
    verification: Mapping[str, int] = dataclasses.field(default_factory=dict)
    #: Call ids with a later version of a pinned object (possible tampering).
    superseded: tuple[str, ...] = ()


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _ZipWriter:
    """The blocking side of an export (run in threads): a temporary zip beside the destination and a
    scratch directory for downloads."""

    def __init__(self, out: Path) -> None:
        out = out.resolve()
        fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
        os.close(fd)
        self.tmp = Path(name)
        self._scratch = tempfile.TemporaryDirectory(dir=out.parent, prefix=".kasuhara-export-")
        self.work = Path(self._scratch.name)
        self._zf = zipfile.ZipFile(self.tmp, "w", allowZip64=True)

    def add_file(self, arcname: str, path: Path) -> None:
        # Audio barely compresses: stored, so the zip is written at disk speed.
        self._zf.write(path, arcname, compress_type=zipfile.ZIP_STORED)

    def add_bytes(self, arcname: str, data: bytes) -> None:
        self._zf.writestr(arcname, data, compress_type=zipfile.ZIP_DEFLATED)

    @staticmethod
    def take(path: Path) -> bytes:
        data = path.read_bytes()
        path.unlink()
        return data

    def close(self) -> str:
        """Finish the zip, make it durable, return its sha256."""
        self._zf.close()
        self._scratch.cleanup()
        h = hashlib.sha256()
        with self.tmp.open("rb") as fh:
            while block := fh.read(CHUNK):
                h.update(block)
            os.fsync(fh.fileno())
        return h.hexdigest()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._zf.close()
        self._scratch.cleanup()
        self.tmp.unlink(missing_ok=True)


class EvidenceExport:
    """Builds one evidence zip. ``progress(1)`` is called after each recording."""

    #: Signs manifest.json + SHA256SUMS into manifest.sig; ``None``: the export is not signed.
    signer: ExportSigner | None = None

    def __init__(
        self,
        store: ObjectStore,
        *,
        created_by: str,
        query: Mapping[str, Any],
        reason: str = "",
        progress: Callable[[int], None] | None = None,
        audit_key: str = "",
    ) -> None:
        self.store = store
        #: The audit record written before this export (its key goes into the manifest).
        self.audit_key = audit_key
        self.created_by = created_by
        self.query = dict(query)
        self.reason = reason
        self.progress = progress

    async def write(self, items: Sequence[ExportItem], out: Path) -> ExportResult:
        """Write the zip to a temporary file beside ``out`` and return it unrenamed as ``result.path``;
        :meth:`commit` moves it into place. On any error nothing is left behind."""
        zw = await asyncio.to_thread(_ZipWriter, out)
        try:
            return await self._write(items, zw)
        except BaseException:
            await asyncio.to_thread(zw.abort)
            raise

    @staticmethod
    def commit(result: ExportResult, out: Path) -> Path:
        os.replace(result.path, out)
        return out

    @staticmethod
    def discard(result: ExportResult) -> None:
        result.path.unlink(missing_ok=True)

    async def _write(self, items: Sequence[ExportItem], zw: _ZipWriter) -> ExportResult:
        sums: list[tuple[str, str]] = []
        recordings: list[dict[str, Any]] = []
        total = 0
        for item in items:
            entry, files = await self._one(item, zw)
            recordings.append(entry)
            for arcname, sha, size in files:
                sums.append((sha, arcname))
                total += size
            if self.progress is not None:
                self.progress(1)
        data = self.manifest(recordings)
        await asyncio.to_thread(zw.add_bytes, "manifest.json", data)
        sums.append((_sha256_bytes(data), "manifest.json"))
        lines = "".join(f"{sha}  {name}\n" for sha, name in sums)
        await asyncio.to_thread(zw.add_bytes, "SHA256SUMS", lines.encode("ascii"))
        if self.signer is not None:
            sig = self.signer.sign_export(data, lines.encode("ascii"))
            await asyncio.to_thread(zw.add_bytes, SIGNATURE_NAME, sig)
        zip_sha = await asyncio.to_thread(zw.close)
        return ExportResult(
            path=zw.tmp,
            recordings=len(recordings),
            files=len(sums) + 1,
            bytes=total,
            sha256=zip_sha,
            call_ids=tuple(r["call_id"] for r in recordings),
            verification=dict(verification_counts(recordings)),
            superseded=tuple(r["call_id"] for r in recordings if r["superseded"]),
        )

    def manifest(self, recordings: Sequence[Mapping[str, Any]]) -> bytes:
        """``manifest.json``, built in this one place (what a signature covers). Per recording: the
        pinned version of each object, its verification, legal hold, LastModified and any later version;
        the hold record; and the export's own audit key and who exported it."""
        doc = {
            "schema": EXPORT_SCHEMA,
            "created_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "created_by": self.created_by,
            "host": socket.gethostname(),
            "reason": self.reason,
            "audit_key": self.audit_key,
            "query": self.query,
            "summary": {
                "verification": dict(verification_counts(recordings)),
                "superseded": sum(1 for r in recordings if r["superseded"]),
            },
            "recordings": list(recordings),
            "verification": VERIFICATION_TEXT,
        }
        return json.dumps(doc, ensure_ascii=False, indent=1).encode("utf-8")

    async def _one(
        self, item: ExportItem, zw: _ZipWriter
    ) -> tuple[dict[str, Any], list[tuple[str, str, int]]]:
        cid = item.call_id
        keys = _keys_of(item)
        hold = await RecordingHolds(self.store).record(cid)
        pins = await pin_versions(self.store, keys, hold.versions if hold is not None else {})
        if not pins.metadata.present:
            raise ExportError(
                f"{cid}: metadata {item.metadata_key} version {pins.metadata.version_id} "
                f"({pins.metadata.source}) does not exist"
            )
        meta_path = zw.work / f"{cid}.json"
        try:
            meta_info = await self.store.get_to_file(
                item.metadata_key, meta_path, version_id=pins.metadata.version_id
            )
        except StorageError as exc:
            if exc.code in {"NoSuchKey", "NoSuchObject", "NoSuchVersion"}:
                raise ExportError(f"{cid}: metadata {item.metadata_key} vanished during the export") from None
            raise
        meta_bytes = await asyncio.to_thread(zw.take, meta_path)
        meta_sha = _sha256_bytes(meta_bytes)
        recorded = meta_info.metadata.get(META_SHA256)
        meta_check = verdict(meta_sha, [recorded])
        try:
            doc = parse_metadata(meta_bytes, cid)
        except CorruptMetadata as exc:
            raise ExportError(f"{cid}: metadata unreadable: {exc}") from None

        files: list[tuple[str, str, int]] = []
        audio = doc.get("audio") if isinstance(doc.get("audio"), Mapping) else {}
        assert isinstance(audio, Mapping)
        audio_entry: dict[str, Any] | None = None
        audio_key = audio.get("key")
        if isinstance(audio_key, str) and audio_key:
            parsed = parse_recording_key(audio_key)
            if parsed is None or parsed.call_id != cid or parsed.kind != "wav" or audio_key != keys.audio:
                raise EvidenceMismatch(cid, "audio", f"metadata names an unexpected audio key {audio_key!r}")
            audio_entry = await self._audio(cid, pins.audio, audio, zw)
            if audio_entry["path"] is not None:
                files.append((audio_entry["path"], audio_entry["sha256"], audio_entry["bytes"]))

        meta_arc = f"{cid}/metadata.json"
        await asyncio.to_thread(zw.add_bytes, meta_arc, meta_bytes)
        files.append((meta_arc, meta_sha, len(meta_bytes)))

        timeline = doc.get("timeline")
        timeline_doc: dict[str, Any] = {
            "call_id": cid,
            "note": None if isinstance(timeline, list) else "the metadata has no timeline",
            "escalations": doc.get("escalations") or [],
            "events": timeline if isinstance(timeline, list) else [],
        }
        tl_bytes = json.dumps(timeline_doc, ensure_ascii=False, indent=1).encode("utf-8")
        tl_arc = f"{cid}/timeline.json"
        await asyncio.to_thread(zw.add_bytes, tl_arc, tl_bytes)
        files.append((tl_arc, _sha256_bytes(tl_bytes), len(tl_bytes)))

        caller = doc.get("caller") if isinstance(doc.get("caller"), Mapping) else {}
        meta_entry = {
            "path": meta_arc,
            "key": item.metadata_key,
            "sha256": meta_sha,
            "bytes": len(meta_bytes),
            "verification": meta_check,
            "recorded_sha256": recorded,
            **await self._object_facts(pins.metadata, meta_info),
        }
        entry = {
            "call_id": cid,
            "started_at": doc.get("started_at"),
            "direction": doc.get("direction"),
            "caller": caller,
            "flags": doc.get("flags") or [],
            "hold_record": hold_record_doc(hold),
            "audio": audio_entry
            or {"path": None, "status": audio.get("status") or "none", "note": "no audio stored"},
            "metadata": meta_entry,
            "timeline": {"path": tl_arc, "events": len(timeline_doc["events"])},
        }
        entry["superseded"] = bool(meta_entry["superseded_by"]) or bool(
            audio_entry and audio_entry.get("superseded_by")
        )
        return entry, files

    async def _object_facts(self, pin: PinnedObject, info: ObjectInfo | None) -> dict[str, Any]:
        """Version, where the pin comes from, legal hold, LastModified, later versions of one object."""
        held = info.legal_hold if info is not None else None
        if held is None and pin.present and pin.version_id is not None:
            try:
                held = await self.store.legal_hold(pin.key, version_id=pin.version_id)
            except StorageError:
                held = None
        last = info.last_modified if info is not None else None
        return {
            "version_id": pin.version_id,
            "version_source": pin.source,
            "legal_hold": held,
            "last_modified": last.isoformat() if last is not None else None,
            # A later version (or delete marker) of the key: not the evidence; possible tampering.
            "superseded_by": [
                {
                    "version_id": v.version_id,
                    "delete_marker": v.is_delete_marker,
                    "last_modified": v.last_modified.isoformat() if v.last_modified else None,
                }
                for v in pin.later
            ],
        }

    async def _audio(
        self, cid: str, pin: PinnedObject, audio: Mapping[str, Any], zw: _ZipWriter
    ) -> dict[str, Any]:
        key = pin.key
        if not pin.present:
            return {
                "path": None,
                "key": key,
                "status": audio.get("status") or "stored",
                "verification": "missing",
                "note": f"version {pin.version_id} ({pin.source}) does not exist",
                **await self._object_facts(pin, None),
            }
        path = zw.work / f"{cid}.wav"
        try:
            info = await self.store.get_to_file(key, path, version_id=pin.version_id)
        except StorageError as exc:
            if exc.code in {"NoSuchKey", "NoSuchObject", "NoSuchVersion"}:
                raise ExportError(f"{cid}: audio {key} vanished during the export") from None
            raise
        try:
            size, sha = await asyncio.to_thread(hash_file, path)
            in_metadata = audio.get("sha256")
            on_object = info.metadata.get(META_SHA256)
            check = verdict(sha, [in_metadata, on_object])
            expected_size = audio.get("bytes")
            if isinstance(expected_size, int) and expected_size != size:
                check = "mismatch"
            arc = f"{cid}/audio.wav"
            await asyncio.to_thread(zw.add_file, arc, path)
        finally:
            await asyncio.to_thread(path.unlink, missing_ok=True)
        return {
            "path": arc,
            "key": key,
            "sha256": sha,
            "bytes": size,
            "status": audio.get("status") or "stored",
            "verification": check,
            "recorded_sha256": {"metadata": in_metadata, "object": on_object},
            **await self._object_facts(pin, info),
        }


VERIFICATION_TEXT = (
    "per file: 'verified' = its bytes match every sha256 recorded at capture (for audio: audio.sha256 in "
    "the metadata and the sha256 stored on the object; for metadata: the sha256 stored on its object); "
    "'unverifiable' = no sha256 was recorded at capture (missing provenance, not evidence of tampering); "
    "'mismatch' = a recorded sha256 or size differs (tampering or corruption); 'missing' = the pinned "
    "version does not exist. Each object is the version pinned by the hold record, else the version the "
    "metadata names, else the key's first version; 'superseded_by' lists later versions of the key "
    "(possible tampering), which are not exported."
)


def verdict(actual: str, recorded: Sequence[object]) -> str:
    """``verified`` / ``unverifiable`` (nothing recorded at capture) / ``mismatch``. Pure."""
    hashes = [r for r in recorded if isinstance(r, str) and r]
    if not hashes:
        return "unverifiable"
    return "verified" if all(h == actual for h in hashes) else "mismatch"


def verification_counts(recordings: Sequence[Mapping[str, Any]]) -> Counter[str]:
    """How many files of an export are verified, unverifiable, mismatched or missing."""
    counts: Counter[str] = Counter()
    for r in recordings:
        for part in ("audio", "metadata"):
            v = r.get(part, {}).get("verification")
            if isinstance(v, str):
                counts[v] += 1
    return counts


def hold_record_doc(hold: HoldRecord | None) -> dict[str, Any] | None:
    return None if hold is None else {**dataclasses.asdict(hold), "versions": dict(hold.versions)}


def _keys_of(item: ExportItem) -> RecordingKeys:
    parsed = parse_recording_key(item.metadata_key)
    if parsed is None or parsed.kind != "json" or parsed.call_id != item.call_id:
        raise ExportError(f"{item.call_id}: not a metadata key: {item.metadata_key!r}")
    audio = item.metadata_key[: -len(".json")] + ".wav"
    return RecordingKeys(parsed.call_id, parsed.day, audio, item.metadata_key, hold_key(parsed.call_id))
