"""Issue 12: hostile objects in the bucket never stop a retention sweep or a search, and never reach a
terminal or a log line raw. Against the real S3-compatible server, through the real ``kasuhara`` CLI.

Before the fix: a metadata object of ``[`` × 100 000 raised RecursionError through the sweep (nothing
purged, a traceback, the daemon dead); ``started_at = "0001-01-01T00:00:00+14:00"`` raised OverflowError;
metadata over 16 MiB failed every run at that object; keys with C1 controls and bidi overrides were
printed raw; ``audit list`` printed ``action`` raw.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from kasuhara_ari.audit import AuditLog, audit_key
from kasuhara_ari.events import MemoryEvents
from kasuhara_ari.retention import RetentionSweep, cutoff_for
from kasuhara_ari.storage import AUDIT_PREFIX, MinioStore, day_prefix

from recordings_seed import cli_env, live_keys, read_json, run_cli, seed
from s3_fixture import S3Target, create_bucket, destroy_bucket, open_store, require_s3, unique_bucket

pytestmark = pytest.mark.integration
TOKYO = ZoneInfo("Asia/Tokyo")
DAYS = 30
#: C1 CSI, DEL and a bidi override: valid in S3 keys and in XML listings, harmful on a terminal.
EVIL = "evil\u009b2J\u007f\u202egnp"


@dataclass
class Bucket:
    target: S3Target
    name: str
    store: MinioStore


@pytest.fixture
async def bucket() -> AsyncIterator[Bucket]:
    target = require_s3()
    name = unique_bucket("kt-robust")
    store = open_store(target, name, read_timeout_s=30.0)
    create_bucket(store)
    try:
        yield Bucket(target, name, store)
    finally:
        store.close()
        destroy_bucket(target, name)


def raw_controls(text: str) -> list[str]:
    bad = {ch for ch in text if (ord(ch) < 0x20 and ch not in "\n") or 0x7F <= ord(ch) <= 0x9F}
    bad |= {ch for ch in text if ch in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"}
    return sorted(repr(ch) for ch in bad)


async def seed_hostile(store: MinioStore, when: datetime) -> dict[str, str]:
    """Recordings whose metadata objects are hostile, on the same day as good ones; returns key → why."""
    hostile = {}
    nested = await seed(store, "nested", when)
    await store.put_bytes(nested.keys.metadata, b"[" * 100_000, metadata={})
    hostile[nested.keys.metadata] = "nested"
    impossible = await seed(store, "impossible", when)
    doc = json.loads(await store.get_bytes(impossible.keys.metadata) or b"{}")
    doc["started_at"] = "0001-01-01T00:00:00+14:00"
    await store.put_bytes(impossible.keys.metadata, json.dumps(doc).encode(), metadata={})
    hostile[impossible.keys.metadata] = "range"
    huge = await seed(store, "huge", when)
    await store.put_bytes(huge.keys.metadata, b'{"pad": "' + b"x" * (17 * 1024 * 1024) + b'"}', metadata={})
    hostile[huge.keys.metadata] = "16 MiB"
    evil = f"{day_prefix(when.astimezone(UTC).date())}{EVIL}.json"
    await store.put_bytes(evil, b"{}", metadata={})
    hostile[evil] = "not a recording key"
    return hostile


async def test_retention_run_purges_past_hostile_metadata_and_reports_each(bucket: Bucket) -> None:
    store = bucket.store
    when = cutoff_for(datetime.now(UTC), DAYS, TOKYO) - timedelta(days=3)
    good = await seed(store, "old-good", when)
    hostile = await seed_hostile(store, when)
    later = await seed(store, "old-after", when + timedelta(minutes=5))
    env = cli_env(bucket.target, bucket.name, KASUHARA_RETENTION__DAYS=str(DAYS))
    result = run_cli(env, "retention", "run", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert raw_controls(result.stdout + result.stderr) == []
    live = await live_keys(store)
    assert good.keys.metadata not in live and later.keys.metadata not in live  # the sweep went on
    for key in hostile:
        assert key in live, key  # never deleted: reported
    # Each problem is named in the run's audit record (keys as data: JSON escapes them).
    records = [await read_json(store, o.key) async for o in store.list_prefix(AUDIT_PREFIX)]
    [purge] = [r for r in records if r["action"] == "purge"]
    problems = {p["key"]: p["problem"] for p in purge["details"]["problems"]}
    for key, why in hostile.items():
        assert key in problems, key
        assert why in problems[key], (key, problems[key])
    assert "\\x9b" in result.stderr  # the evil key is shown, escaped


async def test_sweep_in_process_reports_problems_and_completes(bucket: Bucket) -> None:
    """The same through the library, as ``retention daemon`` runs it: status completed, not a crash."""
    store = bucket.store
    when = cutoff_for(datetime.now(UTC), DAYS, TOKYO) - timedelta(days=2)
    hostile = await seed_hostile(store, when)
    events = MemoryEvents()
    report = await RetentionSweep(
        store, events, AuditLog(store, events, by="tester"), days=DAYS, tz=TOKYO
    ).run()
    assert report.status == "completed"
    assert {p.key for p in report.problems} == set(hostile)
    assert {e["key"] for e in events.events if e["event"] == "retention.problem"} == set(hostile)


async def test_recordings_list_and_audit_list_show_hostile_values_escaped(bucket: Bucket) -> None:
    store = bucket.store
    when = datetime.now(UTC) - timedelta(days=1)
    await seed(store, "fine", when)
    hostile = await seed_hostile(store, when)
    # Audit records written by someone with put rights: fields with terminal controls, and one whose
    # `at` has no offset (it cannot be placed in the range: reported, escaped, never a crash).
    for n, at in enumerate((when.isoformat(timespec="milliseconds"), when.replace(tzinfo=None).isoformat())):
        doc = {
            "schema": "kasuhara.audit/1",
            "id": f"{n:08x}",
            "at": at,
            "action": "dele\u009b2Jte",
            "by": "mallory\u202e",
            "host": "h",
            "reason": "r\u0085x",
            "result": "ok",
            "target": {},
            "details": {},
        }
        await store.put_bytes(audit_key(when, f"{n:08x}"), json.dumps(doc).encode(), metadata={})
    env = cli_env(bucket.target, bucket.name)
    day = when.astimezone(TOKYO).date().isoformat()
    listed = run_cli(env, "recordings", "list", "--from", day, "--to", day, timeout=300)
    assert listed.returncode == 0, listed.stderr
    assert "fine" in listed.stdout
    assert "Traceback" not in listed.stderr
    assert raw_controls(listed.stdout + listed.stderr) == []
    for key in hostile:
        if key.endswith(("nested.json", "impossible.json", "huge.json")):
            assert key in listed.stderr, key  # reported, not silently dropped
    as_json = run_cli(env, "recordings", "list", "--from", day, "--to", day, "--json", timeout=300)
    assert as_json.returncode == 0, as_json.stderr
    assert [e["call_id"] for e in json.loads(as_json.stdout)] == ["fine"]
    audit = run_cli(env, "audit", "list", "--from", day, "--to", day)
    assert audit.returncode == 0, audit.stderr
    assert raw_controls(audit.stdout + audit.stderr) == []
    assert "dele\\x9b2Jte" in audit.stdout  # escaped
    assert "at has no UTC offset" in audit.stderr
    audit_json = run_cli(env, "audit", "list", "--from", day, "--to", day, "--json")
    assert raw_controls(audit_json.stdout) == []
    assert [r["action"] for r in json.loads(audit_json.stdout)] == ["dele\u009b2Jte"]


def test_show_time_marks_naive_and_impossible_times() -> None:
    from kasuhara_ari.cli.recordings import show_time

    assert show_time("2025-01-31T09:00:00", TOKYO) == "2025-01-31T09:00:00 (no offset)"
    assert show_time("0001-01-01T00:00:00+14:00", TOKYO).endswith("(out of range)")
    assert show_time("2025-01-31T00:00:00+00:00", TOKYO) == "2025-01-31 09:00:00"
