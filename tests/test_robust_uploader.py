"""Issue 12, robust workers: bad spool files never stop the uploader, never lose audio or a hold.

Against the real S3-compatible server. Each test reproduces one finding of the review on the shipped code
(a RecursionError or OverflowError that ended ``Uploader.run()`` and with it ``serve``; metadata over
16 MiB that left the audio in the spool forever; a corrupt hold marker that looped without end; a full
spool disk that dropped a ``*1`` hold).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from uploader_helpers import STARTED, metadata, put_recording, spool_config, wav_bytes

from kasuhara_ari.events import MemoryEvents
from kasuhara_ari.storage import MinioStore, recording_keys
from kasuhara_ari.uploader import Timing, Uploader

from conftest import skip_or_fail
from s3_fixture import S3Target, fresh_bucket, open_store

pytestmark = pytest.mark.integration
#: uploader.QUARANTINE_DIR, spelled out so this file also imports against the code before the fix.
QUARANTINE_DIR = "quarantine"


@pytest.fixture
def s3() -> Iterator[tuple[S3Target, str]]:
    with fresh_bucket("kt-robust") as made:
        yield made


def uploader_for(spool: Path, store: MinioStore, events: MemoryEvents, **timing: float) -> Uploader:
    return Uploader(
        spool_config(spool),
        store,
        events,
        poll_interval_s=0.05,
        backoff_base_s=0.1,
        backoff_cap_s=0.5,
        timing=Timing(**{"incomplete_after_s": 1.0, "orphan_after_s": 30.0, **timing}),
        concurrency=2,
    )


async def drain(uploader: Uploader, timeout: float = 60.0) -> None:
    """Run the uploader until the spool is empty. A run() that dies (the old RecursionError) or never
    empties the spool (the old endless hold loop) fails here, with the reason."""
    task = asyncio.create_task(uploader.run())
    waiter = asyncio.create_task(uploader.wait_empty())
    try:
        done, _ = await asyncio.wait({task, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            raise AssertionError(f"Uploader.run() ended: {task.exception()!r}")
        assert waiter in done, (
            f"the spool never emptied: {sorted(p.name for p in uploader.spool.directory.iterdir())}"
        )
    finally:
        for t in (task, waiter):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, BaseException):
                await t


def find(store: MinioStore, call_id: str, ext: str) -> str:
    keys = [
        o.object_name
        for o in store.client.list_objects(store.bucket, prefix="recordings/", recursive=True)
        if o.object_name.endswith(f"/{call_id}.{ext}")
    ]
    assert len(keys) == 1, f"{call_id}.{ext}: {keys}"
    return str(keys[0])


def stored_json(store: MinioStore, key: str) -> Any:
    response = store.client.get_object(store.bucket, key)
    try:
        return json.loads(response.read())
    finally:
        response.close()
        response.release_conn()


def legal_hold(store: MinioStore, key: str) -> bool:
    return bool(store.client.is_object_legal_hold_enabled(store.bucket, key))


def quarantined(spool: Path) -> list[Path]:
    qdir = spool / QUARANTINE_DIR
    return sorted(qdir.iterdir()) if qdir.is_dir() else []


BAD_METADATA: dict[str, bytes] = {
    "deeply_nested": b"[" * 100_000,
    "deep_object": b'{"call_id": "x", "started_at": "2025-01-02T03:04:05+09:00", "x": '
    + b'{"a":' * 5000
    + b"1"
    + b"}" * 5001,
    "infinity": b'{"call_id": "x", "started_at": "2025-01-02T03:04:05+09:00", "duration_s": Infinity}',
}


@pytest.mark.parametrize("kind", sorted(BAD_METADATA))
async def test_hostile_spool_metadata_is_quarantined_and_the_audio_still_uploaded(
    s3: tuple[S3Target, str], tmp_path: Path, kind: str
) -> None:
    target, bucket = s3
    spool = tmp_path / "spool"
    audio = wav_bytes(4000, seed=3)
    put_recording(spool, "good.1", audio=wav_bytes(2000))
    put_recording(spool, "bad.1", audio=audio, meta=False)
    raw = BAD_METADATA[kind].replace(b'"x"', b'"bad.1"')
    (spool / "bad.1.json").write_bytes(raw)
    store = open_store(target, bucket)
    events = MemoryEvents()
    try:
        await drain(uploader_for(spool, store, events))
        # The good recording was not held up by the bad one.
        assert stored_json(store, recording_keys("good.1", STARTED).metadata)["call_id"] == "good.1"
        # The bad one's audio is in the bucket, byte for byte, with metadata that says why.
        wav_key = find(store, "bad.1", "wav")
        response = store.client.get_object(bucket, wav_key)
        assert response.read() == audio
        response.close()
        response.release_conn()
        doc = stored_json(store, find(store, "bad.1", "json"))
        assert doc["orphaned"] is True
        assert doc["metadata_invalid"]["reason"]
        assert doc["metadata_invalid"]["quarantined"].startswith(f"{QUARANTINE_DIR}/bad.1.json.")
        # The bad document is kept for a human, unchanged, and reported as an event.
        kept = quarantined(spool)
        assert [p.read_bytes() for p in kept] == [raw]
        assert [e["event"] for e in events.of("bad.1")] == ["metadata_quarantined", "recording_stored"]
    finally:
        store.close()


async def test_impossible_started_at_keeps_the_hold_it_carried(
    s3: tuple[S3Target, str], tmp_path: Path
) -> None:
    """``0001-01-01T00:00:00+14:00`` parses but has no UTC instant: the shipped uploader died of
    OverflowError. The document also says the call was flagged: the hold must survive the salvage."""
    target, bucket = s3
    spool = tmp_path / "spool"
    doc = metadata(
        "impossible.1",
        started_at="0001-01-01T00:00:00+14:00",
        flags=["harassment"],
        hold={"reason": "flagged by agent as harassment", "by": "agent", "at": STARTED},
    )
    put_recording(spool, "impossible.1", audio=wav_bytes(3000), meta=doc)
    store = open_store(target, bucket)
    try:
        await drain(uploader_for(spool, store, MemoryEvents()))
        wav_key, json_key = find(store, "impossible.1", "wav"), find(store, "impossible.1", "json")
        assert legal_hold(store, wav_key) and legal_hold(store, json_key)
        record = stored_json(store, "holds/impossible.1.json")
        assert "unusable" in record["reason"]
        assert stored_json(store, json_key)["metadata_invalid"]["reason"]
    finally:
        store.close()


async def test_metadata_over_16_mib_does_not_leave_the_audio_in_the_spool(
    s3: tuple[S3Target, str], tmp_path: Path
) -> None:
    target, bucket = s3
    spool = tmp_path / "spool"
    doc = metadata("huge.1", padding="x" * (17 * 1024 * 1024))
    put_recording(spool, "huge.1", audio=wav_bytes(1000), meta=doc)
    store = open_store(target, bucket)
    try:
        await drain(uploader_for(spool, store, MemoryEvents()))
        find(store, "huge.1", "wav")
        assert "16 MiB" in stored_json(store, find(store, "huge.1", "json"))["metadata_invalid"]["reason"]
        assert [p.stat().st_size > 16 * 1024 * 1024 for p in quarantined(spool)] == [True]
    finally:
        store.close()


@pytest.mark.parametrize("marker", [b"{not json", b"[" * 100_000, b'{"call_id": "other.9", "reason": "x"}'])
async def test_corrupt_hold_marker_is_applied_once_and_quarantined(
    s3: tuple[S3Target, str], tmp_path: Path, marker: bytes
) -> None:
    """The shipped uploader rebuilt an unreadable marker with ``at=now`` on every read, so the marker it
    had applied never equalled the one on disk: an endless loop of S3 requests, files never removed."""
    target, bucket = s3
    spool = tmp_path / "spool"
    put_recording(spool, "marked.1", audio=wav_bytes(2000))
    (spool / "marked.1.hold").write_bytes(marker)
    store = open_store(target, bucket)
    try:
        await drain(uploader_for(spool, store, MemoryEvents()), timeout=30.0)
        keys = recording_keys("marked.1", STARTED)
        assert legal_hold(store, keys.audio) and legal_hold(store, keys.metadata)
        record = stored_json(store, keys.hold)
        assert record["reason"].startswith("(unreadable hold marker")
        assert [p.read_bytes() for p in quarantined(spool)] == [marker]
        assert not (spool / "marked.1.hold").exists()
    finally:
        store.close()


# --------------------------------------------------------------------------------------------- full disk


@contextlib.contextmanager
def tiny_filesystem(path: Path, size: str = "4m") -> Iterator[Path]:
    """A real, small tmpfs (we are root in the test environment): ENOSPC comes from the kernel."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        skip_or_fail(f"cannot mount a tmpfs for the full-disk test: {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while os.write(fd, b"\0" * 4096):
                pass
    finally:
        os.close(fd)
    return filler


async def test_hold_asked_on_a_full_spool_disk_survives_to_the_bucket(
    s3: tuple[S3Target, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``*1`` while the spool's disk is full: the shipped ``Uploader.hold`` raised ENOSPC, the call
    service only logged it, and an hour later the audio was adopted with no hold, to be purged at day 90.
    Now the hold is kept in memory, retried until durable, applied at upload, and the disk state is said."""
    target, bucket = s3
    store = open_store(target, bucket)
    caplog.set_level(logging.INFO, logger="kasuhara_ari.uploader")
    with tiny_filesystem(tmp_path / "spool") as spool:
        uploader = uploader_for(spool, store, MemoryEvents(), orphan_after_s=0.5)
        task = asyncio.create_task(uploader.run())
        try:
            await asyncio.sleep(0.2)  # it holds its lock (a file on the spool) before the disk fills
            filler = fill(spool)
            record = await uploader.hold(
                "full.1", "flagged by agent as harassment", "agent", started_at=STARTED
            )
            assert record.call_id == "full.1"
            assert not (spool / "full.1.hold").exists()  # the disk refused it ...
            assert uploader.disk is not None and uploader.disk.state == "full"  # ... and that is said
            assert any("event=disk_full" in r.getMessage() for r in caplog.records)
            # Space comes back; the call's audio is there, its metadata never was (the call service could
            # not write it either): it is adopted as an orphan and must still be held.
            filler.unlink()
            audio = wav_bytes(3000)
            put_recording(spool, "full.1", audio=audio, meta=False, age_s=5.0)
            await uploader.notify("full.1")
            async with asyncio.timeout(60):
                await uploader.wait_empty()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        wav_key = find(store, "full.1", "wav")
        assert legal_hold(store, wav_key)
        assert legal_hold(store, find(store, "full.1", "json"))
        assert stored_json(store, "holds/full.1.json")["reason"] == "flagged by agent as harassment"
        assert uploader.disk is not None and uploader.disk.state != "full"
        assert any("hold event=durable call_id=full.1" in r.getMessage() for r in caplog.records)
    store.close()


async def test_corrupt_hold_marker_for_an_uploaded_recording_finds_it_and_holds_it(
    s3: tuple[S3Target, str], tmp_path: Path
) -> None:
    """The recording is already in the bucket; only an unreadable marker is left (it lost the date the
    keys need). The shipped uploader retried it forever and never held anything."""
    target, bucket = s3
    spool = tmp_path / "spool"
    call_id = "1735689600.7"  # its epoch points at 2025-01-01, the UTC day of STARTED
    store = open_store(target, bucket)
    try:
        put_recording(spool, call_id, audio=wav_bytes(1500))
        await drain(uploader_for(spool, store, MemoryEvents()))
        keys = recording_keys(call_id, STARTED)
        assert not legal_hold(store, keys.audio)
        (spool / f"{call_id}.hold").write_bytes(b"\x00garbage")
        await drain(uploader_for(spool, store, MemoryEvents()), timeout=30.0)
        assert legal_hold(store, keys.audio) and legal_hold(store, keys.metadata)
        assert stored_json(store, keys.hold)["reason"].startswith("(unreadable hold marker")
        assert [p.read_bytes() for p in quarantined(spool)] == [b"\x00garbage"]
    finally:
        store.close()
