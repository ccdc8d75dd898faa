"""Evidence export: a zip whose every byte is checked against the sha256 recorded at capture.

Layout of the zip (paths use the call id, which is safe in a path)::

    manifest.json                 what was exported, by whom, when, from which query; per file its sha256
    SHA256SUMS                    `sha256sum -c SHA256SUMS` verifies every other file, manifest included
    <call_id>/audio.wav           the audio as stored (absent when the call has none)
    <call_id>/metadata.json       the metadata object, byte for byte as stored
    <call_id>/timeline.json       the call's event timeline (from the metadata's ``timeline``)

Verification, per recording, before anything goes into the zip: the metadata object's bytes must hash
to the ``sha256`` the uploader stored on it; the audio's bytes must hash to both the ``audio.sha256``
in the metadata and the object's own ``sha256`` (and have ``audio.bytes`` bytes). Any mismatch raises
:class:`EvidenceMismatch`: the export stops, the partial zip is removed, nothing is left behind.

The zip is written to a temporary file beside the destination and renamed into place only when
complete (and, in the CLI, audited). Audio is streamed through a temporary file, never held in memory;
audio is stored uncompressed (it barely compresses), JSON deflated; zip64 applies beyond 4 GB.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .search import CorruptMetadata, parse_metadata
from .storage import CHUNK, META_SHA256, ObjectStore, StorageError, hash_file, parse_recording_key

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

    def __init__(
        self,
        store: ObjectStore,
        *,
        created_by: str,
        query: Mapping[str, Any],
        reason: str = "",
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.store = store
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
        manifest = {
            "schema": EXPORT_SCHEMA,
            "created_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "created_by": self.created_by,
            "host": socket.gethostname(),
            "reason": self.reason,
            "query": self.query,
            "recordings": recordings,
            "verification": (
                "every audio file matched audio.sha256 in its metadata and the sha256 stored on the "
                "object at capture; every metadata file matched the sha256 stored on its object"
            ),
        }
        data = json.dumps(manifest, ensure_ascii=False, indent=1).encode("utf-8")
        await asyncio.to_thread(zw.add_bytes, "manifest.json", data)
        sums.append((_sha256_bytes(data), "manifest.json"))
        lines = "".join(f"{sha}  {name}\n" for sha, name in sums)
        await asyncio.to_thread(zw.add_bytes, "SHA256SUMS", lines.encode("ascii"))
        zip_sha = await asyncio.to_thread(zw.close)
        return ExportResult(
            path=zw.tmp,
            recordings=len(recordings),
            files=len(sums) + 1,
            bytes=total,
            sha256=zip_sha,
            call_ids=tuple(r["call_id"] for r in recordings),
        )

    async def _one(
        self, item: ExportItem, zw: _ZipWriter
    ) -> tuple[dict[str, Any], list[tuple[str, str, int]]]:
        cid = item.call_id
        meta_path = zw.work / f"{cid}.json"
        try:
            meta_info = await self.store.get_to_file(item.metadata_key, meta_path)
        except StorageError as exc:
            if exc.code in {"NoSuchKey", "NoSuchObject"}:
                raise ExportError(f"{cid}: metadata {item.metadata_key} vanished during the export") from None
            raise
        meta_bytes = await asyncio.to_thread(zw.take, meta_path)
        meta_sha = _sha256_bytes(meta_bytes)
        recorded = meta_info.metadata.get(META_SHA256)
        if not recorded:
            raise EvidenceMismatch(cid, "metadata", f"{item.metadata_key} has no sha256 recorded at capture")
        if recorded != meta_sha:
            raise EvidenceMismatch(
                cid, "metadata", f"{item.metadata_key} hashes to {meta_sha}, recorded {recorded}"
            )
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
            if parsed is None or parsed.call_id != cid or parsed.kind != "wav":
                raise EvidenceMismatch(cid, "audio", f"metadata names an unexpected audio key {audio_key!r}")
            audio_entry = await self._audio(cid, audio_key, audio, zw)
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
        entry = {
            "call_id": cid,
            "started_at": doc.get("started_at"),
            "direction": doc.get("direction"),
            "caller": caller,
            "flags": doc.get("flags") or [],
            "audio": audio_entry
            or {"path": None, "status": audio.get("status") or "none", "note": "no audio stored"},
            "metadata": {
                "path": meta_arc,
                "key": item.metadata_key,
                "version_id": meta_info.version_id,
                "sha256": meta_sha,
                "bytes": len(meta_bytes),
            },
            "timeline": {"path": tl_arc, "events": len(timeline_doc["events"])},
        }
        return entry, files

    async def _audio(self, cid: str, key: str, audio: Mapping[str, Any], zw: _ZipWriter) -> dict[str, Any]:
        path = zw.work / f"{cid}.wav"
        try:
            info = await self.store.get_to_file(key, path)
        except StorageError as exc:
            if exc.code in {"NoSuchKey", "NoSuchObject"}:
                raise EvidenceMismatch(cid, "audio", f"{key} named in the metadata does not exist") from None
            raise
        try:
            size, sha = await asyncio.to_thread(hash_file, path)
            in_metadata = audio.get("sha256")
            on_object = info.metadata.get(META_SHA256)
            if not in_metadata or not on_object:
                raise EvidenceMismatch(cid, "audio", f"{key}: no sha256 recorded at capture")
            if sha != in_metadata or sha != on_object:
                raise EvidenceMismatch(
                    cid,
                    "audio",
                    f"{key} hashes to {sha}; recorded at capture: metadata {in_metadata}, object {on_object}",
                )
            expected_size = audio.get("bytes")
            if isinstance(expected_size, int) and expected_size != size:
                raise EvidenceMismatch(cid, "audio", f"{key} has {size} bytes, metadata says {expected_size}")
            arc = f"{cid}/audio.wav"
            await asyncio.to_thread(zw.add_file, arc, path)
        finally:
            await asyncio.to_thread(path.unlink, missing_ok=True)
        return {
            "path": arc,
            "key": key,
            "version_id": info.version_id,
            "sha256": sha,
            "bytes": size,
            "status": audio.get("status") or "stored",
        }
