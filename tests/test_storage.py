"""Keys, the ObjectStore contract (in-memory fake AND the real S3 server), holds, the deletion guard."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

from kasuhara_ari.config import StorageConfig
from kasuhara_ari.safe import UnsafeValueError
from kasuhara_ari.storage import (
    ContentChanged,
    DeletionGuard,
    HashingReader,
    HoldRecord,
    MemoryStore,
    MinioStore,
    ObjectRef,
    ObjectStore,
    RecordingHolds,
    StorageSetupError,
    decode_sse_c_key,
    deletion_verdicts,
    hash_file,
    hold_key,
    parse_recording_key,
    policy_documents,
    recording_keys,
)

from s3_fixture import create_bucket, destroy_bucket, open_store, require_s3, unique_bucket

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------- keys


def test_keys_use_the_utc_date_of_started_at() -> None:
    keys = recording_keys("1732800000.123", "2025-01-01T08:30:00.000+09:00")
    assert keys.audio == "recordings/2024/12/31/1732800000.123.wav"
    assert keys.metadata == "recordings/2024/12/31/1732800000.123.json"
    assert keys.hold == "holds/1732800000.123.json"
    assert keys.day == date(2024, 12, 31)
    assert (
        recording_keys("c1", datetime(2025, 3, 9, 23, 59, tzinfo=UTC)).audio == "recordings/2025/03/09/c1.wav"
    )


@pytest.mark.parametrize(
    "started", ["2025-01-01T08:30:00", "yesterday", "", None, 1735689600, "2025-13-01T00:00:00Z"]
)
def test_keys_refuse_naive_or_bad_times(started: object) -> None:
    with pytest.raises(ValueError, match="started_at"):
        recording_keys("c1", started)  # type: ignore[arg-type]


@pytest.mark.parametrize("call_id", ["../x", "a/b", "a\nb", "a\x00b", "", ".x", "x" * 129, "a..b", "a b"])
def test_keys_refuse_unsafe_call_ids(call_id: str) -> None:
    with pytest.raises(UnsafeValueError):
        recording_keys(call_id, "2025-01-01T00:00:00Z")
    with pytest.raises(UnsafeValueError):
        hold_key(call_id)


def test_parse_recording_key_round_trip() -> None:
    keys = recording_keys("abc.1", "2025-06-30T12:00:00+00:00")
    for key, kind in ((keys.audio, "wav"), (keys.metadata, "json")):
        parsed = parse_recording_key(key)
        assert parsed is not None
        assert (parsed.call_id, parsed.day, parsed.kind) == ("abc.1", date(2025, 6, 30), kind)
    for other in [
        "holds/abc.json",
        "audit/2025/01/01/x.json",
        "recordings/2025/02/30/x.wav",
        "recordings/2025/01/01/../x.wav",
        "recordings/2025/01/01/x.mp3",
        "recordings/2025/1/01/x.wav",
    ]:
        assert parse_recording_key(other) is None


# ---------------------------------------------------------------------------------------------- pure bits


def test_sse_c_key_is_base64_of_32_bytes() -> None:
    raw = os.urandom(32)
    assert decode_sse_c_key(base64.b64encode(raw).decode()) == raw
    assert decode_sse_c_key("") is None
    with pytest.raises(StorageSetupError, match="32 bytes"):
        decode_sse_c_key(base64.b64encode(b"short").decode())
    with pytest.raises(StorageSetupError, match="base64"):
        decode_sse_c_key("not base64 !!")


def test_sse_c_needs_tls() -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    with pytest.raises(StorageSetupError, match="secure"):
        MinioStore.from_config(StorageConfig(sse_c_key=key, secure=False))
    store = MinioStore.from_config(StorageConfig(sse_c_key=key, secure=True))
    assert "sse_c=True" in repr(store)
    assert key not in repr(store)
    store.close()


def test_hashing_reader_refuses_changed_content(tmp_path: Path) -> None:
    data = os.urandom(3000)
    good = hashlib.sha256(data).hexdigest()
    reader = HashingReader(io.BytesIO(data), len(data), good)
    assert reader.read(1000) + reader.read() == data
    assert reader.read() == b""
    bad = HashingReader(io.BytesIO(data), len(data), "0" * 64)
    bad.read(2999)
    with pytest.raises(ContentChanged):
        bad.read(10)
    short = HashingReader(io.BytesIO(data[:10]), len(data), good)
    short.read(10)
    with pytest.raises(ContentChanged, match="shorter"):
        short.read(10)
    with pytest.raises(ContentChanged):
        HashingReader(io.BytesIO(b""), 0, "0" * 64)


def test_hash_file_streams(tmp_path: Path) -> None:
    p = tmp_path / "f"
    data = os.urandom(3 * 1024 * 1024 + 5)
    p.write_bytes(data)
    assert hash_file(p, chunk=4096) == (len(data), hashlib.sha256(data).hexdigest())


def test_deletion_verdicts_refuse_holds_and_foreign_keys() -> None:
    a = recording_keys("a", "2025-01-01T00:00:00Z")
    b = recording_keys("b", "2025-01-01T00:00:00Z")
    refs = [
        ObjectRef(a.audio, "1"),
        ObjectRef(a.metadata, "2"),
        ObjectRef(b.audio, "3"),
        ObjectRef("holds/b.json", "4"),
        ObjectRef("audit/2025/01/01/x.json", "5"),
    ]
    allowed, refused = deletion_verdicts(refs, {"b"})
    assert allowed == refs[:2]
    assert {(r.ref.key, r.reason) for r in refused} == {
        (b.audio, "hold record"),
        ("holds/b.json", "not a recording object"),
        ("audit/2025/01/01/x.json", "not a recording object"),
    }


def test_hold_record_cleans_untrusted_text() -> None:
    rec = HoldRecord.create(
        "c1",
        "why\x00\n" + "x" * 5000,
        "agent\x1b",
        at="2025-01-01T00:00:00.000+00:00",
        started_at="2025-01-01T09:00:00+09:00",
    )
    assert "\x00" not in rec.reason and "\n" not in rec.reason
    assert len(rec.reason) <= 1000
    assert rec.by == "agent\\x1b"
    assert HoldRecord.from_json(rec.to_json()) == rec
    with pytest.raises(UnsafeValueError):
        HoldRecord.create("../c1", "r", "b", at="x")


def test_policy_documents_match_the_shipped_files() -> None:
    docs = policy_documents("kasuhara-recordings")
    for role, doc in docs.items():
        shipped = json.loads((REPO / "docs" / "s3-policies" / f"{role}.json").read_text())
        assert shipped == doc, f"docs/s3-policies/{role}.json is out of date"


def _actions(doc: dict[str, object]) -> dict[str, set[str]]:
    """action -> resources it is allowed on (the Deny statements are checked on a real server:
    tests/test_policies_enforced.py)"""
    out: dict[str, set[str]] = {}
    for st in doc["Statement"]:  # type: ignore[attr-defined]
        if st["Effect"] != "Allow":
            continue
        for action in st["Action"]:
            out.setdefault(action, set()).update(st["Resource"])
    return out


def test_policies_give_each_role_only_its_powers() -> None:
    docs = policy_documents("b1")
    service, retention, admin = (_actions(docs[r]) for r in ("service", "retention", "admin"))
    assert not any("Delete" in a for a in service), "the call service must never delete"
    assert "s3:PutObjectLegalHold" in service
    assert "s3:PutObjectLegalHold" not in retention, "retention must not lift holds"
    # The bucket ARN: Ceph RGW checks a multi-object delete against it (objects stay guarded by the Deny).
    assert retention["s3:DeleteObjectVersion"] == {"arn:aws:s3:::b1", "arn:aws:s3:::b1/recordings/*"}
    assert retention["s3:PutObject"] == {
        "arn:aws:s3:::b1/audit/*",
        "arn:aws:s3:::b1/audit-chains/*",
        "arn:aws:s3:::b1/retention/*",
    }
    assert service["s3:GetObject"] >= {"arn:aws:s3:::b1/callers/*"}, "serve reads the caller list"
    assert "arn:aws:s3:::b1/callers/*" in admin["s3:PutObject"], "admins manage the caller list"
    assert not any("callers" in r for r in service["s3:PutObject"]), "serve must not change the caller list"
    assert not any(r.startswith("arn:aws:s3:::b1/audit") for r in admin["s3:DeleteObjectVersion"])
    assert "s3:BypassGovernanceRetention" in admin, "admin alone may delete before the lock expires"
    assert "s3:BypassGovernanceRetention" not in service and "s3:BypassGovernanceRetention" not in retention
    for doc in docs.values():
        for st in doc["Statement"]:
            assert all(r.startswith("arn:aws:s3:::b1") for r in st["Resource"])
            assert not any(a.endswith("*") for a in st["Action"])


# ---------------------------------------------------------------------------------------------- contract


@pytest.fixture(params=["memory", pytest.param("s3", marks=pytest.mark.integration)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[ObjectStore]:
    if request.param == "memory":
        yield MemoryStore()
        return
    target = require_s3()
    bucket = unique_bucket("kt-contract")
    real = open_store(target, bucket, read_timeout_s=20.0)
    create_bucket(real)
    try:
        yield real
    finally:
        real.close()
        destroy_bucket(target, bucket)


def _file(tmp_path: Path, data: bytes, name: str = "a.wav") -> tuple[Path, str]:
    p = tmp_path / name
    p.write_bytes(data)
    return p, hashlib.sha256(data).hexdigest()


async def test_put_file_stat_and_get(store: ObjectStore, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    path, sha = _file(tmp_path, data)
    result = await store.put_file(
        "recordings/2025/01/01/c.wav",
        path,
        length=len(data),
        sha256=sha,
        metadata={"sha256": sha, "call-id": "c"},
        content_type="audio/wav",
    )
    assert result.key == "recordings/2025/01/01/c.wav"
    info = await store.stat("recordings/2025/01/01/c.wav")
    assert info is not None
    assert info.size == len(data)
    assert info.metadata["sha256"] == sha
    assert info.metadata["call-id"] == "c"
    assert info.legal_hold in (False, None)
    out = tmp_path / "out.wav"
    got = await store.get_to_file("recordings/2025/01/01/c.wav", out)
    assert out.read_bytes() == data
    assert got.size == len(data)
    assert not list(tmp_path.glob(".*part"))


async def test_put_file_with_wrong_checksum_leaves_no_object(store: ObjectStore, tmp_path: Path) -> None:
    path, _ = _file(tmp_path, b"x" * 1000)
    with pytest.raises(ContentChanged):
        await store.put_file("k/x.wav", path, length=1000, sha256="0" * 64, metadata={})
    assert await store.stat("k/x.wav") is None
    with pytest.raises(ContentChanged):
        await store.put_file("k/y.wav", path, length=2000, sha256="0" * 64, metadata={})
    assert await store.stat("k/y.wav") is None


async def test_put_bytes_get_bytes_and_missing(store: ObjectStore) -> None:
    await store.put_bytes("holds/c.json", b'{"a": 1}', metadata={"call-id": "c"})
    assert await store.get_bytes("holds/c.json") == b'{"a": 1}'
    assert await store.get_bytes("holds/none.json") is None
    assert await store.stat("holds/none.json") is None


async def test_list_prefix_and_versions(store: ObjectStore) -> None:
    for key in ["recordings/2025/01/01/a.json", "recordings/2025/01/02/b.json", "holds/a.json"]:
        await store.put_bytes(key, b"{}", metadata={})
    listed = [o.key async for o in store.list_prefix("recordings/2025/01/")]
    assert listed == ["recordings/2025/01/01/a.json", "recordings/2025/01/02/b.json"]
    assert [o.key async for o in store.list_prefix("holds/")] == ["holds/a.json"]
    # A plain delete only hides the object behind a delete marker; the version is still there.
    assert await store.delete_versions([ObjectRef("recordings/2025/01/01/a.json")]) == []
    assert await store.stat("recordings/2025/01/01/a.json") is None
    assert [o.key async for o in store.list_prefix("recordings/2025/01/01/")] == []
    versions = [o async for o in store.list_prefix("recordings/2025/01/01/", versions=True)]
    assert sorted(o.is_delete_marker for o in versions) == [False, True]
    data_version = next(o for o in versions if not o.is_delete_marker)
    assert data_version.version_id
    assert not data_version.is_latest


async def test_legal_hold_blocks_version_delete(store: ObjectStore) -> None:
    key = "recordings/2025/01/01/h.wav"
    put = await store.put_bytes(key, b"audio", metadata={})
    assert put.version_id
    assert await store.legal_hold(key) is False
    await store.set_legal_hold(key, True)
    assert await store.legal_hold(key) is True
    info = await store.stat(key)
    assert info is not None
    assert info.legal_hold in (True, None)
    failures = await store.delete_versions([ObjectRef(key, put.version_id)])
    assert [f.ref for f in failures] == [ObjectRef(key, put.version_id)]
    assert await store.stat(key) is not None
    await store.set_legal_hold(key, False)
    assert await store.delete_versions([ObjectRef(key, put.version_id)]) == []
    assert [o async for o in store.list_prefix(key, versions=True)] == []


async def test_holds_apply_and_release(store: ObjectStore) -> None:
    keys = recording_keys("held1", "2025-02-03T04:05:06+00:00")
    record = HoldRecord.create("held1", "threats", "agent", at="2025-02-03T04:06:00.000+00:00")
    holds = RecordingHolds(store)
    early = await holds.apply(record, keys)  # before upload: record only
    assert early.record_written and early.pending_upload and early.held_keys == ()
    await store.put_bytes(keys.audio, b"wav", metadata={})
    await store.put_bytes(keys.metadata, b"{}", metadata={})
    later = await holds.apply(record, keys)
    assert not later.record_written and not later.pending_upload
    assert set(later.held_keys) == {keys.audio, keys.metadata}
    assert await store.legal_hold(keys.audio) and await store.legal_hold(keys.metadata)
    assert await holds.record("held1") == record
    guard = DeletionGuard(store)
    assert await guard.why_not("held1", [keys.audio]) == "hold record"
    assert await holds.release(keys) == (keys.audio, keys.metadata)
    assert not await store.legal_hold(keys.audio)
    assert await holds.record("held1") is None
    assert await guard.why_not("held1", [keys.audio, keys.metadata]) is None


async def test_deletion_guard(store: ObjectStore) -> None:
    free = recording_keys("free", "2025-01-01T00:00:00Z")
    flagged = recording_keys("flagged", "2025-01-01T00:00:00Z")
    locked = recording_keys("locked", "2025-01-01T00:00:00Z")
    for k in (free, flagged, locked):
        await store.put_bytes(k.audio, b"a", metadata={})
        await store.put_bytes(k.metadata, b"{}", metadata={})
    await store.put_bytes(flagged.hold, b"{}", metadata={})
    await store.set_legal_hold(locked.audio, True)  # legal hold without a record (e.g. set by hand)
    refs = [ObjectRef(o.key, o.version_id) async for o in store.list_prefix("recordings/", versions=True)]
    refs.append(ObjectRef(flagged.hold))
    guard = DeletionGuard(store)
    dry = await guard.delete(refs, dry_run=True)
    assert {r.key for r in dry.deleted} == {free.audio, free.metadata, locked.metadata}
    assert len([o async for o in store.list_prefix("recordings/", versions=True)]) == 6
    outcome = await guard.delete(refs)
    assert {r.key for r in outcome.deleted} == {free.audio, free.metadata, locked.metadata}
    reasons = {r.ref.key: r.reason for r in outcome.refused}
    assert reasons == {
        flagged.audio: "hold record",
        flagged.metadata: "hold record",
        locked.audio: "legal hold",
        flagged.hold: "not a recording object",
    }
    left = {o.key async for o in store.list_prefix("recordings/", versions=True)}
    assert left == {flagged.audio, flagged.metadata, locked.audio}
    # Without its own legal-hold check the guard still cannot delete a held version: the server refuses.
    unchecked = DeletionGuard(store, check_legal_hold=False)
    [ref] = [ObjectRef(o.key, o.version_id) async for o in store.list_prefix(locked.audio, versions=True)]
    outcome = await unchecked.delete([ref])
    assert outcome.deleted == ()
    assert outcome.refused[0].reason.startswith("server refused")


@pytest.mark.integration
async def test_sse_c_round_trip(tmp_path: Path) -> None:
    """The server accepts our SSE-C requests on put, HEAD and GET (moto does not encrypt; MinIO does)."""
    target = require_s3()
    bucket = unique_bucket("kt-ssec")
    key = os.urandom(32)
    store = open_store(target, bucket, sse_c_key=key)
    create_bucket(store)
    try:
        data = os.urandom(10_000)
        path, sha = _file(tmp_path, data)
        await store.put_file(
            "recordings/2025/01/01/e.wav", path, length=len(data), sha256=sha, metadata={"sha256": sha}
        )
        info = await store.stat("recordings/2025/01/01/e.wav")
        assert info is not None and info.metadata["sha256"] == sha
        out = tmp_path / "e.out"
        await store.get_to_file("recordings/2025/01/01/e.wav", out)
        assert out.read_bytes() == data
    finally:
        store.close()
        destroy_bucket(target, bucket)


@pytest.mark.integration
async def test_ensure_bucket_creates_with_object_lock_and_refuses_unlocked() -> None:
    target = require_s3()
    bucket = unique_bucket("kt-init")
    store = open_store(target, bucket)
    plain_bucket = unique_bucket("kt-plain")
    plain = open_store(target, plain_bucket)
    try:
        assert await store.ensure_bucket() is True
        assert await store.ensure_bucket() is False
        await store.abort_stale_multipart_rule()
        plain.client.make_bucket(plain_bucket)  # no object lock
        from kasuhara_ari.storage import StorageRefused

        with pytest.raises(StorageRefused, match="object lock"):
            await plain.ensure_bucket()
    finally:
        store.close()
        plain.close()
        destroy_bucket(target, bucket)
        destroy_bucket(target, plain_bucket)


@pytest.mark.integration
async def test_unreachable_server_is_storage_unavailable() -> None:
    from kasuhara_ari.storage import StorageUnavailable

    from s3_fixture import CuttableProxy

    target = require_s3()
    host, _, port = target.endpoint.partition(":")
    proxy = CuttableProxy(host, int(port))
    store = open_store(target, "kt-none", endpoint=proxy.endpoint, connect_timeout_s=1, read_timeout_s=1)
    try:
        proxy.cut()
        with pytest.raises(StorageUnavailable):
            await store.stat("x")
        proxy.blackhole()
        with pytest.raises(StorageUnavailable):
            await store.put_bytes("x", b"1", metadata={})
    finally:
        store.close()
        proxy.close()


# ---------------------------------------------------------------------------------------------- versions


async def test_conditional_create_refuses_a_second_writer(store: ObjectStore, tmp_path: Path) -> None:
    """A recording key is created once: the second writer fails and the first version stays the only one
    (without the condition a second PUT silently became the latest version of held evidence)."""
    from kasuhara_ari.storage import PreconditionFailed, key_versions

    key = "recordings/2025/01/01/dup.wav"
    first, sha1 = _file(tmp_path, b"first" * 1000, "1.wav")
    second, sha2 = _file(tmp_path, b"second" * 1000, "2.wav")
    put = await store.put_file(
        key, first, length=5000, sha256=sha1, metadata={"sha256": sha1}, if_none_match=True
    )
    assert put.version_id
    with pytest.raises(PreconditionFailed):
        await store.put_file(
            key, second, length=6000, sha256=sha2, metadata={"sha256": sha2}, if_none_match=True
        )
    versions = await key_versions(store, key)
    assert [v.version_id for v in versions] == [put.version_id]
    info = await store.stat(key)
    assert info is not None and info.metadata["sha256"] == sha1


async def test_reads_by_version_id(store: ObjectStore, tmp_path: Path) -> None:
    """Evidence readers name the version: a later version of the key does not change what they get."""
    key = "recordings/2025/01/01/v.json"
    v1 = await store.put_bytes(key, b"original", metadata={"sha256": "a"})
    v2 = await store.put_bytes(key, b"replacement", metadata={"sha256": "b"})
    assert v1.version_id and v2.version_id and v1.version_id != v2.version_id
    assert await store.get_bytes(key) == b"replacement"
    assert await store.get_bytes(key, version_id=v1.version_id) == b"original"
    info = await store.stat(key, version_id=v1.version_id)
    assert info is not None and info.version_id == v1.version_id and info.metadata["sha256"] == "a"
    got = await store.get_to_file(key, tmp_path / "o", version_id=v1.version_id)
    assert (tmp_path / "o").read_bytes() == b"original"
    assert got.version_id == v1.version_id and got.last_modified is not None


@pytest.mark.integration
async def test_conditional_create_multipart(tmp_path: Path) -> None:
    """Above one part the condition rides on CompleteMultipartUpload; the loser leaves no version."""
    from kasuhara_ari.storage import PreconditionFailed, key_versions

    target = require_s3()
    bucket = unique_bucket("kt-mp")
    real = open_store(target, bucket, read_timeout_s=30.0, part_size=5 * 1024 * 1024)
    create_bucket(real)
    try:
        data = os.urandom(5 * 1024 * 1024 + 1000)
        path, sha = _file(tmp_path, data)
        key = "recordings/2025/01/01/big.wav"
        put = await real.put_file(
            key, path, length=len(data), sha256=sha, metadata={"sha256": sha}, if_none_match=True
        )
        with pytest.raises(PreconditionFailed):
            await real.put_file(
                key, path, length=len(data), sha256=sha, metadata={"sha256": sha}, if_none_match=True
            )
        assert [v.version_id for v in await key_versions(real, key)] == [put.version_id]
        await real.get_to_file(key, tmp_path / "back.wav", version_id=put.version_id)
        assert (tmp_path / "back.wav").read_bytes() == data
    finally:
        real.close()
        destroy_bucket(target, bucket)


def test_conditional_create_header_on_the_wire(tmp_path: Path) -> None:
    """What really goes over the socket: ``If-None-Match: *`` as a header, not ``X-Amz-Meta-*``.

    minio-py's public put_object() rewrites unknown headers into user metadata (shown here too), so a
    condition passed that way would never reach the server.
    """
    import asyncio
    import http.server
    import threading

    seen: list[dict[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            seen.append({k.lower(): v for k, v in self.headers.items()})
            self.send_response(200)
            self.send_header("ETag", '"0123"')
            self.send_header("x-amz-version-id", "v1")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    store = MinioStore(
        endpoint=f"127.0.0.1:{server.server_address[1]}",
        access_key="k",
        secret_key="s",
        bucket="wire-check",
        connect_retries=0,
    )
    try:
        path, sha = _file(tmp_path, b"audio" * 100)
        result = asyncio.run(
            store.put_file(
                "recordings/x.wav", path, length=500, sha256=sha, metadata={"sha256": sha}, if_none_match=True
            )
        )
        assert result.version_id == "v1"
        asyncio.run(store.put_bytes_if("holds/x.json", b"{}", metadata={}, if_none_match=True))
        store.client.put_object("wire-check", "naive", io.BytesIO(b"x"), 1, metadata={"If-None-Match": "*"})
    finally:
        store.close()
        server.shutdown()
    conditional, hold, naive = seen
    for headers in (conditional, hold):
        assert headers.get("if-none-match") == "*"
        assert "x-amz-meta-if-none-match" not in headers
    assert conditional["x-amz-meta-sha256"] == sha
    # The trap the README warns about: the public API sent the condition as user metadata.
    assert "if-none-match" not in naive
    assert naive.get("x-amz-meta-if-none-match") == "*"


def test_legal_hold_header_on_the_wire(tmp_path: Path) -> None:
    """A flagged call's objects are created under their legal hold: ``x-amz-object-lock-legal-hold: ON``
    is a real header of the creating PUT (conditional create, plain put, small conditional write), never
    ``X-Amz-Meta-*``; without ``legal_hold`` it is not sent at all."""
    import asyncio
    import http.server
    import threading

    seen: list[dict[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append({k.lower(): v for k, v in self.headers.items()})
            self.send_response(200)
            self.send_header("ETag", '"0123"')
            self.send_header("x-amz-version-id", "v1")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    store = MinioStore(
        endpoint=f"127.0.0.1:{server.server_address[1]}",
        access_key="k",
        secret_key="s",
        bucket="wire-check",
        connect_retries=0,
    )
    try:
        path, sha = _file(tmp_path, b"audio" * 100)
        for conditional in (True, False):
            asyncio.run(
                store.put_file(
                    "recordings/x.wav",
                    path,
                    length=500,
                    sha256=sha,
                    metadata={"sha256": sha},
                    if_none_match=conditional,
                    legal_hold=True,
                )
            )
        asyncio.run(
            store.put_bytes_if("recordings/x.json", b"{}", metadata={}, if_none_match=True, legal_hold=True)
        )
        asyncio.run(store.put_bytes_if("holds/x.json", b"{}", metadata={}, if_none_match=True))
    finally:
        store.close()
        server.shutdown()
    *held, plain = seen
    assert len(held) == 3
    for headers in held:
        assert headers.get("x-amz-object-lock-legal-hold") == "ON"
        assert not any("legal-hold" in name for name in headers if name.startswith("x-amz-meta-"))
    assert "x-amz-object-lock-legal-hold" not in plain


async def test_a_hold_pins_the_evidence_version_not_a_later_one(store: ObjectStore) -> None:
    """A later PUT to a key is not the evidence: the hold pins the version the metadata names (audio)
    and the first version (metadata), and holds exactly those."""
    from kasuhara_ari.storage import pin_versions

    keys = recording_keys("pin1", "2025-02-03T04:05:06+00:00")
    original = await store.put_bytes(keys.audio, b"original audio", metadata={})
    doc = {"call_id": "pin1", "audio": {"key": keys.audio, "version_id": original.version_id}}
    meta = await store.put_bytes(keys.metadata, json.dumps(doc).encode(), metadata={})
    forged = await store.put_bytes(keys.audio, b"forged audio", metadata={})
    record = HoldRecord.create("pin1", "threats", "admin", at="2025-02-03T05:00:00+00:00")
    holds = RecordingHolds(store)
    outcome = await holds.apply(record, keys)
    assert outcome.pinned == {keys.audio: original.version_id, keys.metadata: meta.version_id}
    assert outcome.lost == ()
    assert await store.legal_hold(keys.audio, version_id=original.version_id) is True
    assert await store.legal_hold(keys.audio, version_id=forged.version_id) is False
    assert await holds.verify(outcome.pinned) == []
    stored = await holds.record("pin1")
    assert stored is not None and dict(stored.versions) == outcome.pinned
    pins = await pin_versions(store, keys, stored.versions)
    assert pins.audio.superseded and [v.version_id for v in pins.audio.later] == [forged.version_id]
    assert not pins.metadata.superseded
    # Released: every legal hold it placed is lifted (the pinned one and the latest).
    await holds.release(keys)
    assert await store.legal_hold(keys.audio, version_id=original.version_id) is False


async def test_a_hold_that_comes_after_the_audio_was_deleted_says_so(store: ObjectStore) -> None:
    """The metadata names audio of which no version is left (a sweep deleted it first): the hold record
    is still written, but the outcome names the loss instead of reporting the call as held."""
    keys = recording_keys("lost1", "2025-02-03T04:05:06+00:00")
    audio = await store.put_bytes(keys.audio, b"audio", metadata={})
    doc = {"call_id": "lost1", "audio": {"key": keys.audio, "version_id": audio.version_id}}
    await store.put_bytes(keys.metadata, json.dumps(doc).encode(), metadata={})
    assert await store.delete_versions([ObjectRef(keys.audio, audio.version_id)]) == []
    record = HoldRecord.create("lost1", "threats", "admin", at="2025-02-03T05:00:00+00:00")
    outcome = await RecordingHolds(store).apply(record, keys)
    assert outcome.lost == (keys.audio,)
    assert outcome.held_keys == (keys.metadata,)
    assert await store.stat(keys.hold) is not None


async def test_the_guard_reports_deletions_a_concurrent_hold_came_too_late_for() -> None:
    """A hold record that lands while a batch is being deleted: what the batch deleted of that call comes
    back as ``raced`` (reported), not silently as deleted-and-fine."""

    class HoldLandsMidBatch(MemoryStore):
        async def delete_versions(self, refs: Any, *, bypass_governance: bool = False) -> Any:
            await self.put_bytes(hold_key("race1"), b"{}", metadata={})
            return await super().delete_versions(refs, bypass_governance=bypass_governance)

    store = HoldLandsMidBatch()
    keys = recording_keys("race1", "2025-02-03T04:05:06+00:00")
    v = await store.put_bytes(keys.audio, b"audio", metadata={})
    outcome = await DeletionGuard(store, check_legal_hold=False).delete([ObjectRef(keys.audio, v.version_id)])
    assert outcome.deleted == (ObjectRef(keys.audio, v.version_id),)
    assert outcome.raced == (ObjectRef(keys.audio, v.version_id),)


async def test_hold_record_completes_where_if_match_is_always_refused_but_never_over_a_change() -> None:
    """RGW 16 refuses every If-Match on a versioned bucket. A refused replace whose record is unchanged
    is written plainly (before the fix: 'the hold record keeps changing', forever); one whose record
    really changed meanwhile is read again, so the other writer's record is not overwritten by a stale
    copy."""
    from kasuhara_ari.storage import PreconditionFailed

    keys = recording_keys("ifm1", "2025-02-03T04:05:06+00:00")

    class RefusesIfMatch(MemoryStore):
        interloper: HoldRecord | None = None

        async def put_bytes_if(self, key: str, data: bytes, **kw: Any) -> Any:
            if kw.get("if_match") is None:
                return await super().put_bytes_if(key, data, **kw)
            if self.interloper is not None:  # another writer lands just before our replace
                await self.put_bytes(key, self.interloper.to_json(), metadata={})
                self.interloper = None
            raise PreconditionFailed(f"put {key}: PreconditionFailed", code="PreconditionFailed")

    store = RefusesIfMatch()
    audio = await store.put_bytes(keys.audio, b"RIFF", metadata={})
    meta = await store.put_bytes(keys.metadata, b'{"audio": {"key": "x"}}', metadata={})
    first = HoldRecord.create("ifm1", "first", "agent", at="2025-02-03T04:06:00.000+00:00")
    await RecordingHolds(store).apply(first, keys, resolve=False)
    store.interloper = HoldRecord.create("ifm1", "other writer", "admin", at="2025-02-03T04:07:00.000+00:00")
    outcome = await RecordingHolds(store).apply(first, keys, versions={keys.audio: audio.version_id or ""})
    assert set(outcome.held_keys) == {keys.audio, keys.metadata}
    record = HoldRecord.from_json(store.objects[keys.hold][-1].data or b"")
    assert record.reason == "other writer", "the concurrent record was re-read, not overwritten"
    assert dict(record.versions) == {keys.audio: audio.version_id, keys.metadata: meta.version_id}


def test_multipart_etag_and_the_file_etags_a_listing_shows(tmp_path: Path) -> None:
    import hashlib as _h

    from kasuhara_ari.storage import _response_etag, file_etags, multipart_etag

    data = bytes(range(256)) * 40  # 10240 bytes: 3 parts of 4096
    path = tmp_path / "a.wav"
    path.write_bytes(data)
    parts = [_h.md5(data[i : i + 4096]).digest() for i in range(0, len(data), 4096)]
    expected = _h.md5(b"".join(parts)).hexdigest() + "-3"
    assert multipart_etag(parts) == expected
    assert file_etags(path, len(data), 4096) == {_h.md5(data).hexdigest(), expected}
    assert file_etags(path, len(data), 1 << 20) == {_h.md5(data).hexdigest()}
    assert file_etags(path, len(data) + 1, 4096) == frozenset()  # shorter than said: matches nothing
    ns = b'<CompleteMultipartUploadResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
    assert _response_etag(ns + b"<ETag>&quot;abc-2&quot;</ETag></CompleteMultipartUploadResult>") == "abc-2"
    assert _response_etag(b'<R><ETag>"abc-2"</ETag></R>') == "abc-2"
    assert _response_etag(b"<R></R>") == ""
