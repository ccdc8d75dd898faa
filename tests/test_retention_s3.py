"""Retention against the real S3-compatible server: exactness, holds, dry run, kill -9, two workers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from kasuhara_ari.audit import AuditLog
from kasuhara_ari.events import MemoryEvents
from kasuhara_ari.retention import LEASE_KEY, LEASE_PREFIX, RetentionSweep, cutoff_for
from kasuhara_ari.storage import AUDIT_PREFIX, MinioStore, PreconditionFailed

from recordings_seed import (
    REPO,
    all_versions,
    cli_command,
    cli_env,
    hold,
    legal_hold_only,
    live_keys,
    read_json,
    run_cli,
    seed,
    seed_many,
)
from s3_fixture import S3Target, create_bucket, destroy_bucket, open_store, require_s3, unique_bucket

pytestmark = pytest.mark.integration
TOKYO = ZoneInfo("Asia/Tokyo")
DAYS = 30


@dataclass
class Bucket:
    target: S3Target
    name: str
    store: MinioStore


@pytest.fixture
async def bucket() -> AsyncIterator[Bucket]:
    target = require_s3()
    name = unique_bucket("kt-retention")
    store = open_store(target, name, read_timeout_s=30.0, pool_size=16)
    create_bucket(store)
    try:
        yield Bucket(target, name, store)
    finally:
        store.close()
        destroy_bucket(target, name)


def cutoff() -> datetime:
    return cutoff_for(datetime.now(UTC), DAYS, TOKYO)


def sweep(store: MinioStore, events: MemoryEvents | None = None, **kw: Any) -> RetentionSweep:
    ev = events or MemoryEvents()
    return RetentionSweep(store, ev, AuditLog(store, ev, by="tester"), days=DAYS, tz=TOKYO, **kw)


async def purge_records(store: MinioStore) -> list[dict[str, Any]]:
    out = []
    async for obj in store.list_prefix(AUDIT_PREFIX):
        doc = await read_json(store, obj.key)
        if doc["action"] == "purge":
            out.append(doc)
    return out


async def test_conditional_writes_and_dirs_on_the_server(bucket: Bucket) -> None:
    store = bucket.store
    first = await store.put_bytes_if(LEASE_KEY, b"1", metadata={}, if_none_match=True)
    with pytest.raises(PreconditionFailed):
        await store.put_bytes_if(LEASE_KEY, b"2", metadata={}, if_none_match=True)
    with pytest.raises(PreconditionFailed):
        await store.put_bytes_if(LEASE_KEY, b"3", metadata={}, if_match="0" * 32)
    await store.put_bytes_if(LEASE_KEY, b"4", metadata={}, if_match=first.etag)
    assert await store.get_bytes(LEASE_KEY) == b"4"
    for key in (
        "recordings/2024/12/31/a.json",
        "recordings/2025/01/01/b.json",
        "recordings/2025/02/03/c.json",
    ):
        await store.put_bytes(key, b"{}", metadata={})
    assert await store.list_dirs("recordings/") == ["recordings/2024/", "recordings/2025/"]
    assert await store.list_dirs("recordings/2025/") == ["recordings/2025/01/", "recordings/2025/02/"]


async def test_retention_deletes_exactly_what_is_past_the_cutoff(bucket: Bucket) -> None:
    store = bucket.store
    c = cutoff()
    old = [
        await seed(store, "old-edge", c - timedelta(seconds=1)),
        await seed(store, "old-jst-morning", c - timedelta(hours=9, minutes=30)),  # previous UTC day
        await seed(store, "old-week", c - timedelta(days=7)),
        await seed(store, "old-year", c - timedelta(days=365)),
        await seed(store, "old-silent", c - timedelta(days=3), with_audio=False),
    ]
    new = [
        await seed(store, "new-edge", c),
        await seed(store, "new-after", c + timedelta(minutes=1)),
        await seed(store, "new-today", datetime.now(UTC) - timedelta(minutes=5)),
    ]
    held = await seed(store, "held", c - timedelta(days=10))
    await hold(store, held)
    locked = await seed(store, "locked", c - timedelta(days=10))
    await legal_hold_only(store, locked)  # no hold record: the server's refusal protects it

    events = MemoryEvents()
    report = await sweep(store, events).run()

    assert report.status == "completed"
    assert sorted(p.call_id for p in report.purged) == sorted(s.call_id for s in old)
    assert {s.call_id: s.reason for s in report.skipped} == {
        "held": "hold record",
        "locked": "server refused (AccessDenied)",
    }
    versions = await all_versions(store, "recordings/")
    for s in old:
        assert not [v for v in versions if v[0] in (s.keys.audio, s.keys.metadata)], s.call_id
    live = await live_keys(store)
    for s in [*new, held, locked]:
        assert s.keys.metadata in live, s.call_id
        if s.audio is not None:
            assert s.keys.audio in live, s.call_id
    # One audit record for the run, listing exactly what it deleted.
    [record] = await purge_records(store)
    assert record["result"] == "completed"
    assert sorted(p["call_id"] for p in record["details"]["purged"]) == sorted(s.call_id for s in old)
    assert record["details"]["counts"]["skipped"] == 2
    assert sorted(e["call_id"] for e in events.events if e["event"] == "retention.purged") == sorted(
        s.call_id for s in old
    )
    # A second run finds nothing more to do.
    again = await sweep(store).run()
    assert again.purged == [] and again.status == "completed"


async def test_dry_run_on_the_server_changes_nothing(bucket: Bucket) -> None:
    store = bucket.store
    c = cutoff()
    old = await seed(store, "old", c - timedelta(days=2))
    held = await seed(store, "held", c - timedelta(days=2))
    await hold(store, held)
    await seed(store, "new", c + timedelta(days=2))
    before = await all_versions(store)
    env = cli_env(bucket.target, bucket.name, KASUHARA_RETENTION__DAYS=str(DAYS))
    result = run_cli(env, "retention", "run", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "would delete" in result.stdout and old.call_id in result.stdout
    assert "would skip" in result.stdout and "held" in result.stdout and "hold record" in result.stdout
    assert "Traceback" not in result.stderr
    assert await all_versions(store) == before
    as_json = run_cli(env, "retention", "run", "--dry-run", "--json")
    doc = json.loads(as_json.stdout)
    assert [p["call_id"] for p in doc["purged"]] == [old.call_id]
    assert doc["dry_run"] is True and doc["counts"]["objects_deleted"] == 0
    assert await all_versions(store) == before


async def test_cli_run_purges_and_audits(bucket: Bucket) -> None:
    store = bucket.store
    c = cutoff()
    old = await seed(store, "old", c - timedelta(days=2))
    new = await seed(store, "new", c + timedelta(days=2))
    env = cli_env(bucket.target, bucket.name)  # retention.days stays 90
    shorter = run_cli(env, "retention", "run", "--days", str(DAYS))
    assert shorter.returncode == 3 and "shorter than retention.days" in shorter.stderr
    assert old.keys.metadata in await live_keys(store)
    env["KASUHARA_RETENTION__DAYS"] = str(DAYS)
    result = run_cli(env, "retention", "run", "--days", str(DAYS))
    assert result.returncode == 0, result.stderr
    assert "purged" in result.stdout and "audit record" in result.stdout
    live = await live_keys(store)
    assert old.keys.metadata not in live and new.keys.metadata in live
    [record] = await purge_records(store)
    assert record["by"] == "test-admin"
    assert [p["call_id"] for p in record["details"]["purged"]] == ["old"]


def _eligible_ids(n: int) -> list[tuple[str, datetime]]:
    c = cutoff()
    return [(f"1700000000.{i}", c - timedelta(days=1 + i % 20, minutes=i)) for i in range(n)]


async def test_sweep_killed_midway_then_rerun_finishes_and_audits_each_recording_once(bucket: Bucket) -> None:
    store = bucket.store
    specs = _eligible_ids(800)
    await seed_many(store, specs)
    keep = await seed(store, "keep", cutoff() + timedelta(hours=1))
    held = await seed(store, "held", cutoff() - timedelta(days=3))
    await hold(store, held)
    env = cli_env(bucket.target, bucket.name, KASUHARA_RETENTION__DAYS=str(DAYS))
    proc = subprocess.Popen(
        cli_command("retention", "run", "--batch-size", "10"),
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # Kill -9 once a few deletion batches have been journaled (each journal precedes its deletes).
        for _ in range(3000):
            journals = [o.key async for o in store.list_prefix("retention/runs/")]
            if len(journals) >= 4 or proc.poll() is not None:
                break
            await asyncio.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the sweep finished before it could be killed"
    remaining = {k.rsplit("/", 1)[1] for k in await live_keys(store)}
    eligible_left = [cid for cid, _ in specs if f"{cid}.json" in remaining]
    assert 0 < len(eligible_left) < len(specs), "the kill did not land in the middle of the sweep"

    rerun = run_cli(env, "retention", "run", "--json")
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    assert report["status"] == "completed"
    assert len(report["recovered_runs"]) == 1

    live = await live_keys(store)
    assert {k for k in live if k.startswith("recordings/")} == {
        keep.keys.audio,
        keep.keys.metadata,
        held.keys.audio,
        held.keys.metadata,
    }
    assert not [v for v in await all_versions(store, "recordings/") if "1700000000." in v[0]]

    records = await purge_records(store)
    assert sorted(r["result"] for r in records) == ["completed", "interrupted"]
    crashed = next(r for r in records if r["result"] == "interrupted")
    finished = next(r for r in records if r["result"] == "completed")
    a = {p["call_id"] for p in crashed["details"]["purged"]}
    b = {p["call_id"] for p in finished["details"]["purged"]}
    assert a and b
    assert not a & b, "a recording is listed by both runs"
    assert a | b == {cid for cid, _ in specs}
    assert crashed["details"]["completed_by_run"] == finished["target"]["run_id"]


async def test_two_concurrent_cli_sweeps_agree(bucket: Bucket) -> None:
    store = bucket.store
    specs = _eligible_ids(300)
    await seed_many(store, specs)
    keep = await seed(store, "keep", cutoff() + timedelta(hours=1))
    env = cli_env(bucket.target, bucket.name, KASUHARA_RETENTION__DAYS=str(DAYS))
    procs = [
        subprocess.Popen(
            cli_command("retention", "run", "--json", "--batch-size", "50"),
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    reports = [json.loads(out) for out, _ in outputs]
    for p, (_out, err), r in zip(procs, outputs, reports, strict=True):
        # busy: the other one holds the lease: refused (3), not failed
        assert p.returncode == {"completed": 0, "busy": 3}[r["status"]], err
        assert "Traceback" not in err
    assert {r["status"] for r in reports} <= {"completed", "busy"}
    assert "completed" in {r["status"] for r in reports}
    assert {k for k in await live_keys(store) if k.startswith("recordings/")} == {
        keep.keys.audio,
        keep.keys.metadata,
    }
    records = await purge_records(store)
    assert len(records) == 2
    listed = [p["call_id"] for r in records for p in r["details"]["purged"]]
    assert sorted(listed) == sorted(cid for cid, _ in specs), "each recording in exactly one record"
    assert all(r["details"]["counts"]["objects_refused"] == 0 for r in records)


async def test_two_sweeps_without_the_lease_are_still_safe(bucket: Bucket) -> None:
    """A server that ignores conditional writes gives no exclusivity: deleting stays idempotent."""
    store = bucket.store
    specs = _eligible_ids(200)
    await seed_many(store, specs)
    held = await seed(store, "held", cutoff() - timedelta(days=2))
    await hold(store, held)
    a, b = sweep(store, use_lease=False, batch_size=20), sweep(store, use_lease=False, batch_size=20)
    ra, rb = await asyncio.gather(a.run(), b.run())
    assert ra.status == rb.status == "completed"
    assert not [v for v in await all_versions(store, "recordings/") if "1700000000." in v[0]]
    assert {p.call_id for p in ra.purged} | {p.call_id for p in rb.purged} == {cid for cid, _ in specs}
    assert {held.keys.audio, held.keys.metadata} <= await live_keys(store)


async def _wait_for_purge_record(store: MinioStore, proc: subprocess.Popen[str]) -> list[dict[str, Any]]:
    for _ in range(600):
        records = await purge_records(store)
        if records or proc.poll() is not None:
            return records
        await asyncio.sleep(0.1)
    return []


async def test_daemon_runs_now_and_stops_on_sigterm(bucket: Bucket) -> None:
    store = bucket.store
    old = await seed(store, "old", cutoff() - timedelta(days=1))
    env = cli_env(bucket.target, bucket.name, KASUHARA_RETENTION__DAYS=str(DAYS))
    proc = subprocess.Popen(
        cli_command("retention", "daemon", "--run-now"), env=env, cwd=REPO, stderr=subprocess.PIPE, text=True
    )
    try:
        records = await _wait_for_purge_record(store, proc)
        assert proc.poll() is None, "the daemon exited after its first sweep"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "retention daemon stopped" in err and "Traceback" not in err
    assert [r["result"] for r in records] == ["completed"]
    assert old.keys.metadata not in await live_keys(store)


async def test_sigterm_mid_sweep_records_what_was_deleted_and_frees_the_lease(bucket: Bucket) -> None:
    store = bucket.store
    specs = _eligible_ids(600)
    await seed_many(store, specs)
    env = cli_env(bucket.target, bucket.name, KASUHARA_RETENTION__DAYS=str(DAYS))
    proc = subprocess.Popen(
        cli_command("retention", "daemon", "--run-now", "--batch-size", "20"),
        env=env,
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(3000):
            if len([o async for o in store.list_prefix("retention/runs/")]) >= 2 or proc.poll() is not None:
                break
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    [record] = await purge_records(store)
    assert record["result"] == "interrupted", "the signal did not land during the sweep"
    deleted = {p["call_id"] for p in record["details"]["purged"]}
    live = {k.rsplit("/", 1)[1] for k in await live_keys(store)}
    left = {cid for cid, _ in specs if f"{cid}.json" in live}
    assert deleted and left and deleted | left == {cid for cid, _ in specs} and not deleted & left
    [lease_obj] = [o async for o in store.list_prefix(LEASE_PREFIX)]
    assert json.loads(await store.get_bytes(lease_obj.key) or b"{}")["state"] == "free"
    rerun = run_cli(env, "retention", "run", "--json")
    report = json.loads(rerun.stdout)
    assert report["status"] == "completed" and report["recovered_runs"] == []
    assert {p["call_id"] for p in report["purged"]} == left
