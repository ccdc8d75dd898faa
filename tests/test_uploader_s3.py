"""The uploader against the real S3-compatible server: keys, checksums, outages, kill -9, holds."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from uploader_helpers import (
    STARTED,
    arrive_while_running,
    metadata,
    put_recording,
    run_until_empty,
    spool_config,
    spool_names,
    wav_bytes,
)

from kasuhara_ari.events import MemoryEvents
from kasuhara_ari.storage import DeletionGuard, HoldRecord, MinioStore, ObjectRef, recording_keys
from kasuhara_ari.uploader import Timing, Uploader

from s3_fixture import (
    CuttableProxy,
    S3Target,
    all_versions,
    fresh_bucket,
    open_store,
)

pytestmark = pytest.mark.integration
TESTS = Path(__file__).resolve().parent


@pytest.fixture
def s3() -> Iterator[tuple[S3Target, str]]:
    with fresh_bucket("kt-upload") as made:
        yield made


def fast_uploader(cfg_dir: Path, store: MinioStore, events: MemoryEvents | None = None) -> Uploader:
    return Uploader(
        spool_config(cfg_dir),
        store,
        events or MemoryEvents(),
        poll_interval_s=0.05,
        backoff_base_s=0.1,
        backoff_cap_s=0.5,
        timing=Timing(incomplete_after_s=1.0, orphan_after_s=30.0),
        concurrency=4,
    )


def versions_by_key(store: MinioStore, prefix: str = "") -> Counter[str]:
    """How many data versions (not delete markers) each key has: "exactly once" means 1 each."""
    return Counter(o.object_name for o in all_versions(store, prefix) if not o.is_delete_marker)


def fetch_json(store: MinioStore, key: str) -> dict[str, Any]:
    resp = store.client.get_object(store.bucket, key)
    try:
        doc: dict[str, Any] = json.loads(resp.read())
        return doc
    finally:
        resp.close()
        resp.release_conn()


def fetch_sha(store: MinioStore, key: str) -> str:
    h = hashlib.sha256()
    resp = store.client.get_object(store.bucket, key)
    try:
        for block in resp.stream(1024 * 1024):
            h.update(block)
    finally:
        resp.close()
        resp.release_conn()
    return h.hexdigest()


async def test_the_servers_etag_proves_a_single_part_put(s3: tuple[S3Target, str], tmp_path: Path) -> None:
    """What lets a new recording skip reading back: the real server answers a single-part put with the
    MD5 of the bytes it received, and a multipart put (or SSE-C) with something else."""
    target, bucket = s3
    store = open_store(target, bucket)
    small, large = tmp_path / "small.wav", tmp_path / "large.wav"
    small.write_bytes(wav_bytes(320_000))
    large.write_bytes(os.urandom(9 * 1024 * 1024))  # above the 8 MiB part size: multipart
    try:
        for path in (small, large):
            data = path.read_bytes()
            result = await store.put_file(
                f"etag/{path.name}",
                path,
                length=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                metadata={},
            )
            md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
            assert store.put_etag_is_md5(len(data)) is (path is small)
            assert (result.etag == md5) is (path is small), result.etag
        body = b'{"schema": "kasuhara.recording/1"}'
        result = await store.put_bytes("etag/meta.json", body, metadata={})
        assert result.etag == hashlib.md5(body, usedforsecurity=False).hexdigest()
    finally:
        store.close()
    sse = open_store(target, bucket, sse_c_key=b"k" * 32)
    assert not sse.put_etag_is_md5(100)
    sse.close()


async def test_new_recordings_are_stored_without_reading_back(
    s3: tuple[S3Target, str], tmp_path: Path
) -> None:
    target, bucket = s3
    store = open_store(target, bucket)
    looked: list[str] = []
    real_stat = store.stat

    async def counted_stat(key: str) -> Any:
        looked.append(key)
        return await real_stat(key)

    store.stat = counted_stat  # type: ignore[method-assign]
    uploader = fast_uploader(tmp_path, store)
    await arrive_while_running(
        tmp_path, uploader, {f"1732900000.{i}": wav_bytes(320_000, seed=i) for i in range(5)}
    )
    try:
        assert looked == []
        assert uploader.stats.stored == 5
        for i in range(5):
            keys = recording_keys(f"1732900000.{i}", STARTED)
            assert fetch_sha(store, keys.audio) == hashlib.sha256(wav_bytes(320_000, seed=i)).hexdigest()
        assert len(versions_by_key(store)) == 10
    finally:
        store.close()


async def test_uploads_land_with_keys_metadata_and_sha256(s3: tuple[S3Target, str], tmp_path: Path) -> None:
    target, bucket = s3
    store = open_store(target, bucket)
    events = MemoryEvents()
    audio = {f"1732800000.{i}": wav_bytes(200_000 * (i + 1), seed=i) for i in range(3)}
    audio["1732800000.3"] = os.urandom(20 * 1024 * 1024)  # multipart (part size 8 MiB)
    for cid, data in audio.items():
        put_recording(tmp_path, cid, audio=data)
    try:
        await run_until_empty(fast_uploader(tmp_path, store, events))
        expected_keys = set()
        for cid, data in audio.items():
            keys = recording_keys(cid, STARTED)
            expected_keys |= {keys.audio, keys.metadata}
            sha = hashlib.sha256(data).hexdigest()
            stat = store.client.stat_object(bucket, keys.audio)
            assert stat.size == len(data)
            assert stat.metadata["x-amz-meta-sha256"] == sha
            assert stat.content_type == "audio/wav"
            assert fetch_sha(store, keys.audio) == sha
            meta = fetch_json(store, keys.metadata)
            assert meta["audio"] | {} == meta["audio"]
            assert (meta["audio"]["key"], meta["audio"]["bytes"], meta["audio"]["sha256"]) == (
                keys.audio,
                len(data),
                sha,
            )
            assert meta["call_id"] == cid and meta["started_at"] == STARTED
            [ev] = events.of(cid)
            assert (ev["event"], ev["key"], ev["sha256"]) == ("recording_stored", keys.audio, sha)
        assert versions_by_key(store) == dict.fromkeys(expected_keys, 1)
        assert spool_names(tmp_path) == []
    finally:
        store.close()


async def test_zero_length_audio_on_s3(s3: tuple[S3Target, str], tmp_path: Path) -> None:
    target, bucket = s3
    store = open_store(target, bucket)
    put_recording(tmp_path, "hungup", audio=b"")
    try:
        await run_until_empty(fast_uploader(tmp_path, store))
        keys = recording_keys("hungup", STARTED)
        assert versions_by_key(store) == {keys.metadata: 1}
        meta = fetch_json(store, keys.metadata)
        assert meta["audio"]["status"] == "empty"
        assert (meta["audio"]["key"], meta["audio"]["bytes"], meta["audio"]["sha256"]) == (None, 0, None)
    finally:
        store.close()


async def test_outage_during_many_uploads_every_recording_arrives_once(
    s3: tuple[S3Target, str], tmp_path: Path
) -> None:
    """20 calls while S3 goes away (connections refused, then a server that accepts but never answers),
    then comes back: every recording is stored exactly once and the spool ends empty."""
    target, bucket = s3
    host, _, port = target.endpoint.partition(":")
    proxy = CuttableProxy(host, int(port))
    store = open_store(target, bucket, endpoint=proxy.endpoint, connect_timeout_s=1.0, read_timeout_s=2.0)
    check = open_store(target, bucket)
    uploader = fast_uploader(tmp_path, store)
    task = asyncio.create_task(uploader.run())
    data = {f"out-{i:02d}": wav_bytes(150_000 + i, seed=i) for i in range(20)}
    try:
        for cid in list(data)[:5]:
            put_recording(tmp_path, cid, audio=data[cid])
            await uploader.notify(cid)
        await asyncio.sleep(0.05)
        proxy.cut()  # mid-stream: some of the first five are in flight
        for cid in list(data)[5:12]:
            put_recording(tmp_path, cid, audio=data[cid])
            await uploader.notify(cid)
        await asyncio.sleep(1.5)
        failures_while_cut = uploader.stats.failures
        proxy.blackhole()
        for cid in list(data)[12:]:
            put_recording(tmp_path, cid, audio=data[cid])
            await uploader.notify(cid)
        await asyncio.sleep(3.0)
        assert failures_while_cut > 0
        assert uploader.stats.failures > failures_while_cut, "timeouts while the server did not answer"
        left = {n.rsplit(".", 1)[0] for n in spool_names(tmp_path)}
        assert len(left) >= 15, "recordings stay in the spool while S3 is unreachable"
        proxy.restore()
        await asyncio.wait_for(uploader.wait_empty(), 60)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        store.close()
        proxy.close()
    try:
        counts = versions_by_key(check)
        for cid, payload in data.items():
            keys = recording_keys(cid, STARTED)
            assert counts[keys.audio] == 1, cid
            assert counts[keys.metadata] == 1, cid
            assert fetch_json(check, keys.metadata)["audio"]["sha256"] == hashlib.sha256(payload).hexdigest()
        assert len(counts) == 40
    finally:
        check.close()


UPLOADER_PROCESS = r"""
import asyncio, logging, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from uploader_helpers import spool_config
from kasuhara_ari.events import NullEvents
from kasuhara_ari.storage import MinioStore
from kasuhara_ari.uploader import Timing, Uploader

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
spool, endpoint, bucket = Path(sys.argv[2]), sys.argv[3], sys.argv[4]
store = MinioStore(endpoint=endpoint, access_key="testing", secret_key="testing", bucket=bucket,
                   read_timeout_s=10, part_size=5 * 1024 * 1024, parallel_parts=2)
uploader = Uploader(spool_config(spool), store, NullEvents(), poll_interval_s=0.05, backoff_base_s=0.1,
                    backoff_cap_s=0.5, timing=Timing(incomplete_after_s=1.0, orphan_after_s=600),
                    concurrency=2)

async def main():
    task = asyncio.create_task(uploader.run())
    await uploader.wait_empty()
    task.cancel()

asyncio.run(main())
print("DRAINED", flush=True)
"""


KILL_AFTER_BYTES = [1_500_000, 4_000_000, 7_500_000, 3_300_000, 9_000_000, 12_000_000, 5_000_000]


def start_uploader_process(spool: Path, endpoint: str, bucket: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", UPLOADER_PROCESS, str(TESTS), str(spool), endpoint, bucket],
        stdout=subprocess.PIPE,
        stderr=log.open("ab"),
        cwd=TESTS.parent,
    )


async def test_kill_9_mid_upload_then_restart_completes_without_duplicates(
    s3: tuple[S3Target, str], tmp_path: Path
) -> None:
    """The uploader process is killed with SIGKILL again and again while it is sending (the link is slowed
    so every kill lands inside a PUT); each restart carries on, and in the end every recording — including
    the held ones — is in the bucket exactly once, verified, held where flagged, and the spool is empty."""
    target, bucket = s3
    host, _, port = target.endpoint.partition(":")
    proxy = CuttableProxy(host, int(port), rate_bps=12 * 1024 * 1024)
    spool = tmp_path / "spool"
    data = {f"kill-{i}": os.urandom((3 + 2 * i) * 1024 * 1024) for i in range(6)}
    for cid, payload in data.items():
        hold = None
        if cid == "kill-1":
            hold = {
                "reason": "flagged by agent as harassment",
                "by": "agent",
                "at": "2025-01-01T18:00:00.000+00:00",
            }
        put_recording(
            spool, cid, audio=payload, meta=metadata(cid, hold=hold, flags=["harassment"] if hold else [])
        )
    # a hold asked for through the queue (as the call service does during a call)
    marker = HoldRecord.create(
        "kill-4", "threat", "supervisor", at="2025-01-01T18:01:00.000+00:00", started_at=STARTED
    )
    (spool / "kill-4.hold").write_bytes(marker.to_json())
    log = tmp_path / "uploader.log"
    kills = 0
    try:
        for _round in range(30):
            if not spool_names(spool):
                break
            before = proxy.forwarded
            proc = start_uploader_process(spool, proxy.endpoint, bucket, log)
            # Kill once this process has sent so many bytes: early kills land in the first PUTs, later ones
            # after some objects are complete (between audio and metadata, during cleanup, ...).
            threshold = KILL_AFTER_BYTES[kills] if kills < len(KILL_AFTER_BYTES) else 0
            deadline = time.monotonic() + 30
            while (
                proxy.forwarded - before < threshold and proc.poll() is None and time.monotonic() < deadline
            ):
                await asyncio.sleep(0.005)
            if proc.poll() is None and kills < len(KILL_AFTER_BYTES):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                kills += 1
                continue
            out, _ = proc.communicate(timeout=120)
            assert b"DRAINED" in out
        assert kills == len(KILL_AFTER_BYTES)
        text = log.read_text()
        assert "already_stored" in text, "some restart found its objects already uploaded"
        assert spool_names(spool) == [], f"left behind: {spool_names(spool)}"
    finally:
        proxy.close()
    check = open_store(target, bucket)
    try:
        counts = versions_by_key(check, "recordings/")
        assert len(counts) == 12
        for cid, payload in data.items():
            keys = recording_keys(cid, STARTED)
            sha = hashlib.sha256(payload).hexdigest()
            assert (counts[keys.audio], counts[keys.metadata]) == (1, 1), cid
            assert check.client.stat_object(bucket, keys.audio).metadata["x-amz-meta-sha256"] == sha
            assert fetch_json(check, keys.metadata)["audio"]["sha256"] == sha
            held = cid in {"kill-1", "kill-4"}
            assert check.client.is_object_legal_hold_enabled(bucket, keys.audio) is held, cid
            assert check.client.is_object_legal_hold_enabled(bucket, keys.metadata) is held, cid
        # Each hold record: written first, then completed once with the versions it pins.
        assert versions_by_key(check, "holds/") == {"holds/kill-1.json": 2, "holds/kill-4.json": 2}
        for cid in ("kill-1", "kill-4"):
            keys = recording_keys(cid, STARTED)
            pinned = fetch_json(check, keys.hold)["versions"]
            assert pinned == {
                keys.audio: check.client.stat_object(bucket, keys.audio).version_id,
                keys.metadata: check.client.stat_object(bucket, keys.metadata).version_id,
            }
            assert fetch_json(check, keys.metadata)["audio"]["version_id"] == pinned[keys.audio]
    finally:
        check.close()


async def test_flagged_call_is_held_and_the_server_refuses_delete(
    s3: tuple[S3Target, str], tmp_path: Path
) -> None:
    from minio.deleteobjects import DeleteObject
    from minio.error import S3Error

    target, bucket = s3
    store = open_store(target, bucket)
    hold = {"reason": "flagged by agent as harassment", "by": "agent", "at": "2025-01-01T18:00:00.000+00:00"}
    put_recording(
        tmp_path, "flagged", audio=wav_bytes(8000), meta=metadata("flagged", flags=["harassment"], hold=hold)
    )
    put_recording(tmp_path, "normal", audio=wav_bytes(8000))
    try:
        await run_until_empty(fast_uploader(tmp_path, store))
        keys = recording_keys("flagged", STARTED)
        client = store.client
        assert client.is_object_legal_hold_enabled(bucket, keys.audio)
        assert client.is_object_legal_hold_enabled(bucket, keys.metadata)
        record = json.loads(client.get_object(bucket, keys.hold).read())
        assert (record["call_id"], record["reason"], record["by"]) == ("flagged", hold["reason"], "agent")
        versions = [
            o for o in all_versions(store, "recordings/") if o.object_name in (keys.audio, keys.metadata)
        ]
        assert len(versions) == 2
        # the server itself refuses, whoever asks
        errors = list(
            client.remove_objects(bucket, [DeleteObject(o.object_name, o.version_id) for o in versions])
        )
        assert len(errors) == 2 and all(e.code == "AccessDenied" for e in errors)
        [audio_version] = [o.version_id for o in versions if o.object_name == keys.audio]
        with pytest.raises(S3Error) as refused:
            client.remove_object(bucket, keys.audio, version_id=audio_version)
        assert refused.value.code == "AccessDenied"
        assert versions_by_key(store, "recordings/")[keys.audio] == 1
        # and the guard refuses before asking
        refs = [ObjectRef(o.object_name, o.version_id) for o in all_versions(store, "recordings/")]
        outcome = await DeletionGuard(store).delete(refs)
        normal = recording_keys("normal", STARTED)
        assert {r.key for r in outcome.deleted} == {normal.audio, normal.metadata}
        assert {r.ref.key for r in outcome.refused} == {keys.audio, keys.metadata}
    finally:
        store.close()


async def test_hold_after_upload_on_s3(s3: tuple[S3Target, str], tmp_path: Path) -> None:
    target, bucket = s3
    store = open_store(target, bucket)
    put_recording(tmp_path, "later", audio=wav_bytes(4000))
    uploader = fast_uploader(tmp_path, store)
    task = asyncio.create_task(uploader.run())
    try:
        await asyncio.wait_for(uploader.wait_empty(), 20)
        keys = recording_keys("later", STARTED)
        assert not store.client.is_object_legal_hold_enabled(bucket, keys.audio)
        await uploader.hold("later", "complaint filed", "admin", started_at=STARTED)
        await asyncio.wait_for(uploader.wait_empty(), 20)
        assert store.client.is_object_legal_hold_enabled(bucket, keys.audio)
        assert store.client.is_object_legal_hold_enabled(bucket, keys.metadata)
        assert versions_by_key(store) == {keys.audio: 1, keys.metadata: 1, keys.hold: 1}
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        store.close()


async def test_hostile_caller_id_on_s3(s3: tuple[S3Target, str], tmp_path: Path) -> None:
    target, bucket = s3
    store = open_store(target, bucket)
    spool = tmp_path / "spool"
    hostile = {
        "number": "../../etc/passwd\x00",
        "name": "evil\r\nX-Amz-Meta-Injected: 1\x00\x07\x1b[31m\u202e" + "../" * 10 + "名" * 3400,
    }
    assert len(hostile["name"].encode()) > 10_000
    put_recording(
        spool, "1732800000.77", audio=wav_bytes(4000), meta=metadata("1732800000.77", caller=hostile)
    )
    try:
        await run_until_empty(fast_uploader(spool, store))
        keys = recording_keys("1732800000.77", STARTED)
        assert set(versions_by_key(store)) == {keys.audio, keys.metadata}
        stat = store.client.stat_object(bucket, keys.metadata)
        assert not any("injected" in k.lower() for k in stat.metadata)
        caller = fetch_json(store, keys.metadata)["caller"]
        assert caller["number"] == "../../etc/passwd\\x00"
        assert caller["name"].startswith("evil\\x0d\\x0aX-Amz-Meta-Injected: 1\\x00\\x07\\x1b[31m\\u202e../")
        assert len(caller["name"]) <= 256 and caller["name"].endswith(")")
        assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
            "spool",
            "spool/.kasuhara-uploader.lock",
        ]
    finally:
        store.close()


async def test_a_call_id_collision_never_replaces_a_held_recording(
    s3: tuple[S3Target, str], tmp_path: Path
) -> None:
    """A fresh recording whose key already holds another (held) recording: the uploader used to skip the
    lookup for fresh recordings and PUT a second version, which every reader then took as the evidence.
    Now the conditional create refuses: the held version stays the only one, the new files stay local."""
    target, bucket = s3
    store = open_store(target, bucket)
    try:
        cid = "1732900000.77"
        keys = recording_keys(cid, STARTED)
        first = wav_bytes(40_000, seed=1)
        await arrive_while_running(tmp_path, fast_uploader(tmp_path, store), {cid: first})
        holder = HoldRecord.create(cid, "threat", "admin", at="2025-01-01T19:00:00+00:00", started_at=STARTED)
        from kasuhara_ari.storage import RecordingHolds

        await RecordingHolds(store).apply(holder, keys)

        uploader = fast_uploader(tmp_path, store)
        task = asyncio.create_task(uploader.run())
        try:
            await asyncio.sleep(0.2)
            put_recording(tmp_path, cid, audio=wav_bytes(40_000, seed=2))  # same id, other audio
            await uploader.notify(cid)
            deadline = time.monotonic() + 20
            while uploader.stats.failures < 2:
                assert time.monotonic() < deadline, "the collision was never refused"
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert versions_by_key(store, "recordings/") == {keys.audio: 1, keys.metadata: 1}
        assert fetch_sha(store, keys.audio) == hashlib.sha256(first).hexdigest()
        assert uploader.stats.stored == 0
        assert f"{cid}.wav" in spool_names(tmp_path), "the colliding recording stays in the spool"
    finally:
        store.close()
