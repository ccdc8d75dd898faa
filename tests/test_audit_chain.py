"""The audit trail's hash chains: `kasuhara audit verify` names every edit, deletion, reorder and fork.

Each scenario runs twice: on the in-memory fake (pure logic) and on the stack's real S3 server (moto),
where the conditional writes that keep a chain from forking are the server's."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from kasuhara_ari.audit import (
    AUDIT_CHAINS_PREFIX,
    AuditChain,
    AuditLog,
    AuditRecord,
    AuditVerifier,
    VerifyReport,
    chain_head_key,
    chain_id,
)
from kasuhara_ari.cli import main
from kasuhara_ari.events import NullEvents
from kasuhara_ari.storage import (
    META_SHA256,
    MemoryStore,
    MinioStore,
    ObjectRef,
    ObjectStore,
    PreconditionFailed,
    StorageUnavailable,
)

from conftest import skip_or_fail
from recordings_seed import cli_env
from s3_fixture import create_bucket, destroy_bucket, open_store, require_s3, unique_bucket

BASE = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)


class ListEvents:
    """The events an :class:`AuditLog` emitted (fields as given)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, event: str, call_id: str | None = None, /, **fields: Any) -> None:
        self.events.append({"event": event, **fields})


@pytest.fixture(params=["memory", "s3"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[ObjectStore]:
    if request.param == "memory":
        yield MemoryStore()
        return
    target = require_s3()
    bucket = unique_bucket("kt-chain")
    s3 = open_store(target, bucket, read_timeout_s=30.0)
    create_bucket(s3)
    try:
        yield s3
    finally:
        s3.close()
        destroy_bucket(target, bucket)


async def write_records(log: AuditLog, n: int, *, start: int = 0) -> list[AuditRecord]:
    out = []
    for i in range(start, start + n):
        record = log.new("hold", reason=f"r{i}", target={"call_id": f"c{i}"}, at=BASE + timedelta(hours=i))
        out.append(await log.write(record))
    return out


async def verify(store: ObjectStore, **kw: datetime) -> VerifyReport:
    return await AuditVerifier(store, **kw).run()


def kinds(report: VerifyReport) -> set[tuple[str, str]]:
    return {(f.kind, f.key) for f in report.findings}


async def raw(store: ObjectStore, key: str) -> bytes:
    data = await store.get_bytes(key)
    assert data is not None
    return data


async def replace(store: ObjectStore, key: str, data: bytes) -> None:
    await store.put_bytes(key, data, metadata={}, content_type="application/json")


async def delete(store: ObjectStore, key: str) -> None:
    """What a reader sees after a DELETE: the record is gone (on a versioned bucket, a delete marker)."""
    assert await store.delete_versions([ObjectRef(key)]) == []


async def test_records_are_linked_and_an_intact_trail_verifies(store: ObjectStore) -> None:
    events = ListEvents()
    alice = AuditLog(store, events, by="alice", host="pc1")
    bob = AuditLog(store, NullEvents(), by="bob", host="pc2")
    written = await write_records(alice, 4)
    await write_records(bob, 2, start=10)
    docs = [json.loads(await raw(store, r.key)) for r in written]
    assert [d["chain"]["seq"] for d in docs] == [1, 2, 3, 4]
    assert docs[0]["chain"]["prev_key"] is None and docs[0]["chain"]["prev_sha256"] is None
    for before, doc, record in zip(written, docs[1:], written[1:], strict=False):
        assert doc["chain"]["prev_key"] == before.key
        assert doc["chain"]["prev_sha256"] == hashlib.sha256(await raw(store, before.key)).hexdigest()
        assert record.chain == doc["chain"]
    assert docs[0]["chain"]["id"] == chain_id("alice", "pc1") != chain_id("bob", "pc2")
    # The MQTT event carries the link: an anchor outside the bucket.
    assert [e["chain"]["seq"] for e in events.events] == [1, 2, 3, 4]
    report = await verify(store)
    assert report.ok, report.findings
    assert report.records == 6 and len(report.chains) == 2
    assert {c.records for c in report.chains.values()} == {4, 2}


async def test_an_edited_field_is_named(store: ObjectStore) -> None:
    log = AuditLog(store, NullEvents(), by="alice", host="pc1")
    written = await write_records(log, 5)
    victim = written[2].key
    doc = json.loads(await raw(store, victim))
    doc["reason"] = "nothing to see"
    await replace(store, victim, json.dumps(doc, ensure_ascii=False, indent=1).encode())
    report = await verify(store)
    assert kinds(report) == {("edited", victim)}
    # The newest record is vouched for by the chain head.
    tail = written[-1].key
    doc = json.loads(await raw(store, victim))
    tail_doc = json.loads(await raw(store, tail))
    tail_doc["result"] = "refused"
    await replace(store, tail, json.dumps(tail_doc, indent=1).encode())
    assert kinds(await verify(store)) == {("edited", victim), ("edited", tail)}


async def test_a_deleted_record_is_named(store: ObjectStore) -> None:
    log = AuditLog(store, NullEvents(), by="alice", host="pc1")
    written = await write_records(log, 6)
    await delete(store, written[3].key)
    report = await verify(store)
    assert kinds(report) == {("missing", written[3].key)}
    # Two in a row: the later one is named, with the count.
    await delete(store, written[2].key)
    report = await verify(store)
    assert kinds(report) == {("missing", written[3].key)}
    assert "1 record(s) before it" in report.findings[0].detail
    # The first record and the newest one (named by the head).
    await delete(store, written[0].key)
    await delete(store, written[5].key)
    assert kinds(await verify(store)) == {
        ("missing", written[0].key),
        ("missing", written[3].key),
        ("missing", written[5].key),
    }


async def test_reordered_records_are_named(store: ObjectStore) -> None:
    log = AuditLog(store, NullEvents(), by="alice", host="pc1")
    written = await write_records(log, 5)
    a, b = written[1].key, written[3].key
    data_a, data_b = await raw(store, a), await raw(store, b)
    await replace(store, a, data_b)
    await replace(store, b, data_a)
    found = kinds(await verify(store))
    assert ("moved", a) in found and ("moved", b) in found
    assert {key for _, key in found} == {a, b}


async def test_legacy_records_are_unchained_not_tampering(store: ObjectStore) -> None:
    legacy = AuditRecord(
        id="0123456789ab",
        at=(BASE - timedelta(days=30)).isoformat(timespec="milliseconds"),
        action="hold",
        by="old",
        host="pc0",
        reason="before chains",
        result="done",
        key="audit/2025/01/30/20250130T090000.000Z-0123456789ab.json",
    )
    await replace(store, legacy.key, legacy.to_json())
    assert (await verify(store)).legacy == [legacy.key]  # no chain at all yet: legacy
    await write_records(AuditLog(store, NullEvents(), by="alice", host="pc1"), 2)
    report = await verify(store)
    assert report.ok and report.legacy == [legacy.key]
    # An unchained record written after chaining began is not legacy: an old writer, or an insertion.
    now = datetime.now(UTC) + timedelta(minutes=1)
    late = AuditRecord(**{**legacy.__dict__, "id": "abcdefabcdef", "key": ""})
    key = f"audit/{now:%Y/%m/%d}/{now:%Y%m%dT%H%M%S}.000Z-abcdefabcdef.json"
    await replace(store, key, late.to_json())
    report = await verify(store)
    assert kinds(report) == {("unchained", key)} and report.legacy == [legacy.key]


async def test_a_deleted_head_and_a_rolled_back_head_are_named(store: ObjectStore) -> None:
    log = AuditLog(store, NullEvents(), by="alice", host="pc1")
    await write_records(log, 3)
    head_key = chain_head_key(chain_id("alice", "pc1"))
    old_head = await raw(store, head_key)
    await write_records(log, 1, start=3)
    await replace(store, head_key, old_head)
    assert ("head_behind", head_key) in kinds(await verify(store))
    await delete(store, head_key)
    assert kinds(await verify(store)) == {("head_missing", head_key)}


async def test_a_range_checks_its_edges_against_the_records_outside(store: ObjectStore) -> None:
    log = AuditLog(store, NullEvents(), by="alice", host="pc1")
    written = await write_records(log, 72)  # 1 March 09:00 UTC onwards, an hour apart
    day2 = datetime(2025, 3, 2, tzinfo=UTC)
    end = day2 + timedelta(hours=23, minutes=59)
    inside = await verify(store, start=day2, end=end)
    assert inside.ok and inside.records == 24
    [summary] = inside.chains.values()
    assert summary.open_end and (summary.first_seq, summary.last_seq) == (16, 39)
    # The record just before the range is read and checked: an edit there shows.
    before = written[14].key
    doc = json.loads(await raw(store, before))
    doc["by"] = "mallory"
    await replace(store, before, json.dumps(doc, indent=1).encode())
    assert kinds(await verify(store, start=day2, end=end)) == {("edited", before)}
    # Deleted just before the range: named too.
    await delete(store, before)
    assert kinds(await verify(store, start=day2, end=end)) == {("missing", before)}


async def test_chain_order_and_key_order_may_differ(store: ObjectStore) -> None:
    """A retention run's record is dated when the run started but written when it ends: later in the
    chain than records with later keys. Neither the whole walk nor a range may call that tampering."""
    log = AuditLog(store, NullEvents(), by="ops", host="pc1")
    day1, day2 = datetime(2025, 4, 1, 23, 50, tzinfo=UTC), datetime(2025, 4, 2, 0, 5, tzinfo=UTC)
    await log.write(log.new("hold", target={"call_id": "a"}, at=day1 - timedelta(hours=1)))
    await log.write(log.new("hold", target={"call_id": "b"}, at=day2))  # during the run
    await log.write(log.new("purge", target={"run_id": "r"}, at=day1))  # the run's record, at its start
    await log.write(log.new("hold", target={"call_id": "c"}, at=day2 + timedelta(hours=1)))
    assert (await verify(store)).ok
    only_day1 = await verify(store, start=day1.replace(hour=0), end=day1.replace(hour=23, minute=59))
    assert only_day1.ok, only_day1.findings
    only_day2 = await verify(store, start=day2.replace(hour=0, minute=0))
    assert only_day2.ok, only_day2.findings


async def test_concurrent_writers_of_one_chain_never_fork(store: ObjectStore) -> None:
    """Two processes of the same writer append at once: the conditional write on the head decides."""
    logs = [AuditLog(store, NullEvents(), by="alice", host="pc1") for _ in range(4)]

    async def burst(log: AuditLog, n: int) -> None:
        for i in range(n):
            await log.write(log.new("show", reason=f"{id(log)}-{i}", target={"call_id": f"c{i}"}))

    await asyncio.gather(*(burst(log, 5) for log in logs))
    report = await verify(store)
    assert report.ok, report.findings
    [summary] = report.chains.values()
    assert summary.records == 20 and (summary.first_seq, summary.last_seq, summary.head_seq) == (1, 20, 20)


def test_concurrent_threads_on_the_real_server_never_fork() -> None:
    """The same against moto from separate threads and clients: real interleaving on the wire."""
    target = require_s3()
    bucket = unique_bucket("kt-chain")
    admin = open_store(target, bucket)
    create_bucket(admin)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        s3 = open_store(target, bucket)
        try:
            log = AuditLog(s3, NullEvents(), by="alice", host="pc1")

            async def go() -> None:
                for i in range(n):
                    await log.write(log.new("show", reason=f"{i}", target={"call_id": f"t{i}"}))

            asyncio.run(go())
        except BaseException as exc:
            errors.append(exc)
        finally:
            s3.close()

    try:
        threads = [threading.Thread(target=worker, args=(6,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        report = asyncio.run(verify(admin))
        assert report.ok, report.findings
        [summary] = report.chains.values()
        assert (summary.records, summary.head_seq) == (24, 24)
    finally:
        admin.close()
        destroy_bucket(target, bucket)


class FailingPuts(MemoryStore):
    """Refuses record writes under audit/ (the head's conditional write still works)."""

    fail = True

    async def put_bytes(self, key: str, data: bytes, **kw: object) -> object:  # type: ignore[override]
        if self.fail and key.startswith("audit/"):
            raise StorageUnavailable("S3 down")
        return await super().put_bytes(key, data, **kw)  # type: ignore[arg-type]


async def test_a_failed_record_write_leaves_no_gap() -> None:
    store = FailingPuts()
    log = AuditLog(store, NullEvents(), by="alice", host="pc1")
    store.fail = False
    await write_records(log, 2)
    store.fail = True
    with pytest.raises(StorageUnavailable):
        await log.write(log.new("delete", reason="x", target={"call_id": "c9"}))
    store.fail = False
    await write_records(log, 1, start=5)
    report = await verify(store)
    assert report.ok, report.findings
    assert next(iter(report.chains.values())).last_seq == 3


async def test_the_first_record_of_a_new_chain_rolls_back_to_an_empty_head() -> None:
    store = FailingPuts()
    chain = AuditChain(store, by="bob", host="pc2")
    log = AuditLog(store, NullEvents(), by="bob", host="pc2")
    with pytest.raises(StorageUnavailable):
        await log.write(log.new("show", target={"call_id": "c1"}))
    head, _ = await chain.head()
    assert head is not None and head.seq == 0
    store.fail = False
    [record] = await write_records(log, 1)
    assert record.chain is not None and record.chain["seq"] == 1
    assert (await verify(store)).ok


async def test_hostile_records_do_not_stop_the_walk() -> None:
    store = MemoryStore()
    await write_records(AuditLog(store, NullEvents(), by="alice", host="pc1"), 2)
    nested = "audit/2025/03/01/20250301T100000.000Z-0123456789ab.json"
    await replace(store, nested, b"[" * 100_000)
    await replace(store, "audit/2025/03/01/\x1b[2Jevil.json", b"{}")
    report = await verify(store)
    assert ("unreadable", nested) in kinds(report)
    assert any(f.kind == "unreadable" and "\x1b" not in f.key for f in report.findings if "evil" in f.key)
    assert report.records == 3


def test_cli_verify_exit_codes_and_named_keys(tmp_path: Path) -> None:
    target = require_s3()
    bucket = unique_bucket("kt-chaincli")
    s3 = open_store(target, bucket)
    create_bucket(s3)
    env = cli_env(target, bucket)
    try:
        written = asyncio.run(write_records(AuditLog(s3, NullEvents(), by="alice", host="pc1"), 4))
        ok = CliRunner().invoke(main, ["audit", "verify"], env=env)
        assert ok.exit_code == 0, ok.output
        assert "intact" in ok.output
        # An audit list by the admin is itself audited (and chained): still intact.
        listed = CliRunner().invoke(main, ["audit", "list", "--from", "2025-01-01"], env=env)
        assert listed.exit_code == 0, listed.output
        assert CliRunner().invoke(main, ["audit", "verify"], env=env).exit_code == 0
        asyncio.run(delete(s3, written[1].key))
        bad = CliRunner().invoke(main, ["audit", "verify"], env=env)
        assert bad.exit_code == 1
        assert "MISSING" in bad.output and written[1].key in bad.output
        as_json = CliRunner().invoke(main, ["audit", "verify", "--json"], env=env)
        doc = json.loads(as_json.stdout)
        assert as_json.exit_code == 1 and doc["ok"] is False
        assert [(f["kind"], f["key"]) for f in doc["findings"]] == [("missing", written[1].key)]
        usage = CliRunner().invoke(
            main, ["audit", "verify", "--from", "2025-02-01", "--to", "2025-01-01"], env=env
        )
        assert usage.exit_code == 2
    finally:
        s3.close()
        destroy_bucket(target, bucket)


def test_chain_heads_stay_out_of_the_audit_prefix() -> None:
    """Readers of audit/ (audit list, the tests of other commands) see records only."""
    assert not AUDIT_CHAINS_PREFIX.startswith("audit/")
    assert chain_head_key(chain_id("a", "b")).startswith(AUDIT_CHAINS_PREFIX)
    with pytest.raises(ValueError, match="not a chain id"):
        chain_head_key("../x")
    assert META_SHA256 == "sha256"


class NoConditionalWrites(MemoryStore):
    """A server like Ceph RGW 16 on a versioned bucket: If-Match always refused, If-None-Match ignored."""

    async def put_bytes_if(self, key: str, data: bytes, **kw: Any) -> Any:  # type: ignore[override]
        if kw.get("if_match") is not None:
            raise PreconditionFailed(f"put {key}: PreconditionFailed", code="PreconditionFailed")
        return await self.put_bytes(key, data, metadata=kw["metadata"])


async def test_a_server_that_refuses_every_if_match_still_gets_an_intact_chain() -> None:
    """Before: 20 refused If-Match in a row, ChainBusy, and every audited admin action refused on RGW."""
    store = NoConditionalWrites()
    logs = [AuditLog(store, NullEvents(), by="alice", host="pc1") for _ in range(3)]

    async def burst(log: AuditLog) -> None:
        for i in range(4):
            await log.write(log.new("show", target={"call_id": f"c{i}"}))

    await asyncio.gather(*(burst(log) for log in logs))  # one process: the local lock orders them
    report = await verify(store)
    assert report.ok, report.findings
    [summary] = report.chains.values()
    assert (summary.records, summary.head_seq) == (12, 12)


def rgw_owner_keys() -> tuple[str, str, str]:
    """Endpoint and keys of the bucket-owning user of the stack's Ceph RGW (which enforces policies)."""
    creds = Path(os.environ.get("KASUHARA_RGW_CREDENTIALS", "/var/cache/kasuhara/rgw-credentials"))
    if not creds.exists():
        skip_or_fail(f"Ceph RGW credentials {creds} missing (start it with: scripts/stack up rgw)")
    values = dict(line.split("=", 1) for line in creds.read_text().split() if "=" in line)
    endpoint = values["RGW_ENDPOINT"]
    host, _, port = endpoint.partition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        skip_or_fail(f"Ceph RGW at {endpoint} is not running (start it with: scripts/stack up rgw)")
    return endpoint, values["RGW_SETUP_ACCESS_KEY"], values["RGW_SETUP_SECRET_KEY"]


def test_chains_on_ceph_rgw_whose_conditional_writes_do_not_work() -> None:
    """Ceph RGW 16 refuses a matching If-Match on a versioned (object-lock) bucket: the chain falls back to
    the local lock, stays intact under concurrent processes of one writer, and tampering still shows."""
    endpoint, access, secret = rgw_owner_keys()
    bucket = unique_bucket("kt-chain-rgw")

    def rgw() -> MinioStore:
        return MinioStore(endpoint=endpoint, access_key=access, secret_key=secret, bucket=bucket)

    owner = rgw()
    owner.client.make_bucket(bucket, object_lock=True)
    errors: list[BaseException] = []

    def worker() -> None:
        s3 = rgw()
        try:
            log = AuditLog(s3, NullEvents(), by="alice", host="pc1")

            async def go() -> None:
                for i in range(4):
                    await log.write(log.new("show", target={"call_id": f"c{i}"}))

            asyncio.run(go())
        except BaseException as exc:
            errors.append(exc)
        finally:
            s3.close()

    try:
        threads = [threading.Thread(target=worker) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        report = asyncio.run(verify(owner))
        assert report.ok, report.findings
        [summary] = report.chains.values()
        assert (summary.records, summary.head_seq) == (12, 12)
        first = sorted(o.object_name for o in owner.client.list_objects(bucket, "audit/", recursive=True))[0]
        data = asyncio.run(raw(owner, first))
        asyncio.run(replace(owner, first, data.replace(b'"show"', b'"hold"')))
        assert kinds(asyncio.run(verify(owner))) == {("edited", first)}
    finally:
        from minio.deleteobjects import DeleteObject

        versions = list(owner.client.list_objects(bucket, recursive=True, include_version=True))
        list(
            owner.client.remove_objects(bucket, [DeleteObject(v.object_name, v.version_id) for v in versions])
        )
        with contextlib.suppress(Exception):
            owner.client.remove_bucket(bucket)
        owner.close()
