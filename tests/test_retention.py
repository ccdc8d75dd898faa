"""Retention, search and audit logic: pure functions, and the sweep against the in-memory store.

The same sweep against the real S3 server (moto), with crashes and concurrent workers, is in
``test_retention_s3.py``.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from kasuhara_ari.audit import AuditLog, audit_key, is_audit_key
from kasuhara_ari.events import MemoryEvents
from kasuhara_ari.retention import (
    LEASE_KEY,
    RetentionLease,
    RetentionSweep,
    RunInfo,
    cutoff_for,
    last_day_to_walk,
    next_run,
    parse_daily_at,
)
from kasuhara_ari.search import (
    caller_matches,
    epoch_days,
    normalise_number,
    parse_direction,
    parse_when,
    utc_days,
)
from kasuhara_ari.storage import MemoryStore, PreconditionFailed, day_prefix

from recordings_seed import all_versions, hold, legal_hold_only, live_keys, read_json, seed

TOKYO = ZoneInfo("Asia/Tokyo")
NEW_YORK = ZoneInfo("America/New_York")


# --------------------------------------------------------------------------------------------- cutoff


def test_cutoff_is_local_midnight_n_days_back() -> None:
    now = datetime(2025, 5, 30, 2, 0, tzinfo=UTC)  # 11:00 in Tokyo on 30 May
    assert cutoff_for(now, 90, TOKYO) == datetime(2025, 3, 1, 0, 0, tzinfo=TOKYO)
    assert cutoff_for(now, 90, TOKYO).astimezone(UTC) == datetime(2025, 2, 28, 15, 0, tzinfo=UTC)
    assert cutoff_for(now, 90, ZoneInfo("UTC")) == datetime(2025, 3, 1, tzinfo=UTC)


def test_cutoff_uses_the_local_date_not_the_utc_date() -> None:
    # 23:30 UTC on 31 May is already 1 June in Tokyo: one day later cutoff than in UTC.
    now = datetime(2025, 5, 31, 23, 30, tzinfo=UTC)
    assert cutoff_for(now, 1, TOKYO) == datetime(2025, 5, 31, 0, 0, tzinfo=TOKYO)
    assert cutoff_for(now, 1, ZoneInfo("UTC")) == datetime(2025, 5, 30, tzinfo=UTC)


def test_cutoff_across_a_dst_change() -> None:
    # New York springs forward on 9 March 2025: midnight before is -05:00, after -04:00.
    now = datetime(2025, 3, 12, 12, 0, tzinfo=UTC)
    assert cutoff_for(now, 5, NEW_YORK).astimezone(UTC) == datetime(2025, 3, 7, 5, 0, tzinfo=UTC)
    assert cutoff_for(now, 1, NEW_YORK).astimezone(UTC) == datetime(2025, 3, 11, 4, 0, tzinfo=UTC)


def test_cutoff_refuses_zero_days() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        cutoff_for(datetime.now(UTC), 0, TOKYO)


def test_last_day_to_walk_is_the_utc_day_before_the_cutoff_instant() -> None:
    # Cutoff 1 March 00:00 JST = 28 Feb 15:00 UTC: calls before it are on UTC days up to 28 Feb.
    assert last_day_to_walk(datetime(2025, 3, 1, tzinfo=TOKYO)) == date(2025, 2, 28)
    # Cutoff exactly at UTC midnight: nothing on that UTC day is older.
    assert last_day_to_walk(datetime(2025, 3, 1, tzinfo=UTC)) == date(2025, 2, 28)


def test_next_run_and_daily_at() -> None:
    at = parse_daily_at("03:00")
    assert at == time(3, 0)
    before = datetime(2025, 1, 1, 17, 0, tzinfo=UTC)  # 02:00 JST 2 Jan
    assert next_run(before, at, TOKYO) == datetime(2025, 1, 2, 3, 0, tzinfo=TOKYO)
    after = datetime(2025, 1, 1, 18, 0, tzinfo=UTC)  # 03:00 JST exactly: the next day
    assert next_run(after, at, TOKYO) == datetime(2025, 1, 3, 3, 0, tzinfo=TOKYO)
    # 02:30 does not exist in New York on 9 March 2025; the run still happens that day.
    nyc = next_run(datetime(2025, 3, 9, 5, 0, tzinfo=UTC), time(2, 30), NEW_YORK)
    assert nyc.astimezone(NEW_YORK).date() == date(2025, 3, 9)
    for bad in ("3am", "25:00", "", "03"):
        with pytest.raises(ValueError, match="daily_at"):
            parse_daily_at(bad)


# --------------------------------------------------------------------------------------------- search values


def test_parse_when_dates_and_datetimes() -> None:
    assert parse_when("2025-01-02", TOKYO) == datetime(2025, 1, 2, tzinfo=TOKYO)
    end = parse_when("2025-01-02", TOKYO, end=True)
    assert end == datetime(2025, 1, 2, 23, 59, 59, 999999, tzinfo=TOKYO)
    assert parse_when("2025-01-02T10:30", TOKYO) == datetime(2025, 1, 2, 10, 30, tzinfo=TOKYO)
    assert parse_when("2025-01-02T10:30:00Z", TOKYO) == datetime(2025, 1, 2, 10, 30, tzinfo=UTC)
    assert parse_when("2025-01-02 10:30+01:00", TOKYO).utcoffset() == timedelta(hours=1)
    for bad in ("2025-13-01", "yesterday", "02/01/2025", "2025-02-30", ""):
        with pytest.raises(ValueError, match="date"):
            parse_when(bad, TOKYO)


def test_utc_days_cover_a_local_range() -> None:
    start = parse_when("2025-01-02", TOKYO)
    end = parse_when("2025-01-02", TOKYO, end=True)
    # A Tokyo day spans two UTC days (15:00 UTC the day before .. 14:59 UTC).
    assert utc_days(start, end) == [date(2025, 1, 1), date(2025, 1, 2)]


@pytest.mark.parametrize(
    ("given", "normal"),
    [
        ("03-1234-5678", "0312345678"),
        ("+81 3 1234 5678", "0312345678"),
        ("+81-3-1234-5678", "0312345678"),
        ("+81 (0)3 1234 5678", "0312345678"),
        ("0081312345678", "0312345678"),
        ("０３－１２３４－５６７８", "0312345678"),
        ("sip:0312345678@pbx.example;user=phone", "0312345678"),
        ("tel:+81-90-1234-5678", "09012345678"),
        ("+1 212 555 0100", "+12125550100"),
        ("Anonymous", "anonymous"),
        (None, ""),
    ],
)
def test_normalise_number(given: str | None, normal: str) -> None:
    assert normalise_number(given) == normal


def test_caller_matches_domestic_and_international_forms() -> None:
    assert caller_matches("+81312345678", "03-1234-5678")
    assert caller_matches("03 1234 5678", "+81-3-1234-5678")
    assert not caller_matches("0312345679", "03-1234-5678")
    assert caller_matches("03*", "+81 3 1234 5678")
    assert not caller_matches("06*", "+81 3 1234 5678")
    assert not caller_matches("0312345678", None)
    assert not caller_matches("", "0312345678")


def test_direction_aliases() -> None:
    assert parse_direction("in") == "inbound"
    assert parse_direction("OUT") == "outbound"
    assert parse_direction("inbound") == "inbound"
    with pytest.raises(ValueError, match="inbound or outbound"):
        parse_direction("sideways")


def test_epoch_days_from_linkedid() -> None:
    # 1735689600 = 2025-01-01T00:00:00Z
    assert epoch_days("1735689600.12") == [date(2025, 1, 1), date(2025, 1, 2), date(2024, 12, 31)]
    assert epoch_days("pbx1-1735689600.3")[0] == date(2025, 1, 1)
    assert epoch_days("manual-id") == []


def test_audit_keys_sort_by_time_and_parse() -> None:
    a = audit_key(datetime(2025, 1, 2, 3, 4, 5, 6000, tzinfo=UTC), "abcdef012345")
    assert a == "audit/2025/01/02/20250102T030405.006Z-abcdef012345.json"
    assert is_audit_key(a)
    b = audit_key(datetime(2025, 1, 2, 12, 4, 5, tzinfo=TOKYO), "abcdef012345")  # 03:04:05 UTC
    assert b.startswith("audit/2025/01/02/20250102T030405.000Z")
    assert not is_audit_key("audit/2025/01/02/x.json")


# --------------------------------------------------------------------------------------------- sweep (memory)

NOW = datetime(2025, 6, 1, 3, 0, tzinfo=TOKYO)
CUTOFF = cutoff_for(NOW, 30, TOKYO)  # 2 May 2025 00:00 JST = 1 May 15:00 UTC


def sweep(store: MemoryStore, events: MemoryEvents | None = None, **kw: object) -> RetentionSweep:
    ev = events or MemoryEvents()
    return RetentionSweep(
        store,
        ev,
        AuditLog(store, ev, by="tester", host="test-host"),
        days=30,
        tz=TOKYO,
        now=NOW,
        **kw,  # type: ignore[arg-type]
    )


async def test_sweep_deletes_exactly_what_started_before_the_cutoff() -> None:
    store = MemoryStore()
    old = [
        await seed(store, "old-1", CUTOFF - timedelta(seconds=1)),  # same UTC day as the cutoff
        await seed(store, "old-2", CUTOFF - timedelta(days=3)),
        await seed(store, "old-3", CUTOFF - timedelta(days=400)),
        await seed(store, "old-noaudio", CUTOFF - timedelta(days=2), with_audio=False),
    ]
    new = [
        await seed(store, "new-1", CUTOFF),  # exactly the cutoff: kept
        await seed(store, "new-2", CUTOFF + timedelta(seconds=1)),
        await seed(store, "new-3", NOW - timedelta(hours=1)),
    ]
    events = MemoryEvents()
    s = sweep(store, events)
    report = await s.run()
    assert report.status == "completed"
    assert {p.call_id for p in report.purged} == {r.call_id for r in old}
    live = await live_keys(store)
    for r in old:
        assert not {k for k in live if r.call_id in k}
        assert not [v async for v in store.list_prefix(r.keys.metadata, versions=True)]
    for r in new:
        assert r.keys.metadata in live and r.keys.audio in live
    # The walk stopped at the cutoff's UTC day: the newer days were never listed.
    listed = {key for op, key in store.calls if op == "list"}
    assert day_prefix((NOW - timedelta(hours=1)).astimezone(UTC).date()) not in listed
    # Events and one audit record listing exactly what was deleted.
    purged_events = [e["call_id"] for e in events.events if e["event"] == "retention.purged"]
    assert sorted(purged_events) == sorted(r.call_id for r in old)
    assert [e["event"] for e in events.events if not e["event"].endswith("purged")] == [
        "retention.started",
        "audit.purge",
        "retention.completed",
    ]
    record = await read_json(store, report.audit_key)
    assert record["action"] == "purge" and record["result"] == "completed" and record["by"] == "tester"
    assert sorted(p["call_id"] for p in record["details"]["purged"]) == sorted(r.call_id for r in old)


async def test_sweep_decides_by_started_at_not_by_the_key_date() -> None:
    store = MemoryStore()
    s = await seed(store, "moved", NOW - timedelta(days=1))
    # Same metadata, but stored under an old day prefix (as if the key were wrong): still kept.
    old_prefix = day_prefix((CUTOFF - timedelta(days=10)).astimezone(UTC).date())
    data = await store.get_bytes(s.keys.metadata)
    assert data is not None
    await store.put_bytes(f"{old_prefix}moved.json", data, metadata={})
    report = await sweep(store).run()
    assert report.purged == []
    assert report.recordings_kept == 1
    assert f"{old_prefix}moved.json" in await live_keys(store)


async def test_sweep_never_deletes_recordings_with_missing_or_corrupt_metadata() -> None:
    store = MemoryStore()
    t = CUTOFF - timedelta(days=5)
    prefix = day_prefix(t.astimezone(UTC).date())
    await store.put_bytes(f"{prefix}orphan.wav", b"RIFF", metadata={})
    await store.put_bytes(f"{prefix}garbled.wav", b"RIFF", metadata={})
    await store.put_bytes(f"{prefix}garbled.json", b"{not json", metadata={})
    await store.put_bytes(
        f"{prefix}naive.json",
        json.dumps({"call_id": "naive", "started_at": "2025-01-01T00:00:00"}).encode(),
        metadata={},
    )
    await store.put_bytes(
        f"{prefix}other.json",
        json.dumps({"call_id": "someone-else", "started_at": t.isoformat()}).encode(),
        metadata={},
    )
    await store.put_bytes(f"{prefix}stray.txt", b"?", metadata={})
    ok = await seed(store, "fine", t)
    events = MemoryEvents()
    report = await sweep(store, events).run()
    assert [p.call_id for p in report.purged] == [ok.call_id]
    problems = {p.key.rsplit("/", 1)[1]: p.problem for p in report.problems}
    assert set(problems) == {"orphan.json", "garbled.json", "naive.json", "other.json", "stray.txt"}
    assert "metadata missing" in problems["orphan.json"]
    assert "not JSON" in problems["garbled.json"]
    assert "no UTC offset" in problems["naive.json"]
    assert "call_id" in problems["other.json"]
    left = await live_keys(store)
    assert {
        f"{prefix}{n}" for n in ("orphan.wav", "garbled.wav", "garbled.json", "naive.json", "stray.txt")
    } <= left
    assert len([e for e in events.events if e["event"] == "retention.problem"]) == 5


async def test_sweep_spares_held_recordings() -> None:
    store = MemoryStore()
    t = CUTOFF - timedelta(days=2)
    held = await seed(store, "held", t)
    await hold(store, held)
    record_only = await seed(store, "record-only", t)
    await store.put_bytes(record_only.keys.hold, b"{}", metadata={})
    locked = await seed(store, "locked", t)
    await legal_hold_only(store, locked)
    free = await seed(store, "free", t)
    report = await sweep(store).run()
    assert [p.call_id for p in report.purged] == [free.call_id]
    reasons = {s.call_id: s.reason for s in report.skipped}
    assert reasons["held"] == "hold record"
    assert reasons["record-only"] == "hold record"
    assert reasons["locked"].startswith("server refused")  # no per-object check: the server refuses
    left = await live_keys(store)
    for s in (held, record_only, locked):
        assert {s.keys.audio, s.keys.metadata} <= left


async def test_dry_run_changes_nothing_and_says_what_it_would_delete() -> None:
    store = MemoryStore()
    old = await seed(store, "old", CUTOFF - timedelta(days=1))
    held = await seed(store, "held", CUTOFF - timedelta(days=1))
    await hold(store, held)
    locked = await seed(store, "locked", CUTOFF - timedelta(days=1))
    await legal_hold_only(store, locked)
    await seed(store, "new", NOW)
    before = await all_versions(store)
    store.calls.clear()
    events = MemoryEvents()
    report = await sweep(store, events, dry_run=True).run()
    assert await all_versions(store) == before
    assert [p.call_id for p in report.purged] == [old.call_id]
    assert {s.call_id: s.reason for s in report.skipped} == {"held": "hold record", "locked": "legal hold"}
    assert report.objects_deleted == 0 and report.audit_key == ""
    assert not any(op in {"delete_versions", "put_bytes", "put_bytes_if"} for op, _ in store.calls)
    assert not [e for e in events.events if e["event"] == "retention.purged"]


async def test_sweep_deletes_every_version_and_delete_marker() -> None:
    store = MemoryStore()
    s = await seed(store, "versions", CUTOFF - timedelta(days=1))
    data = await store.get_bytes(s.keys.metadata)
    assert data is not None
    await store.put_bytes(s.keys.metadata, data, metadata={})  # a second version (re-upload)
    report = await sweep(store).run()
    assert report.purged[0].objects == 3
    assert await all_versions(store, "recordings/") == set()


async def test_small_batches_and_audio_before_metadata() -> None:
    store = MemoryStore()
    for i in range(25):
        await seed(store, f"c{i:02d}", CUTOFF - timedelta(days=1, minutes=i))
    report = await sweep(store, batch_size=4).run()
    assert len(report.purged) == 25
    deletes = [int(n.split()[0]) for op, n in store.calls if op == "delete_versions"]
    assert deletes and max(deletes) <= 4
    # One journal entry per batch (written before it is deleted), all under this run.
    journals = [k for k in store.objects if k.startswith("retention/runs/")]
    assert {k.split("/")[2] for k in journals} == {report.run_id}
    assert len(journals) == 7  # 25 recordings, 4 per batch


# --------------------------------------------------------------------------------------------- lease (memory)


def run_info(run_id: str, pid: int = 0, host: str = "test-host") -> RunInfo:
    return RunInfo(
        run_id,
        f"audit/2025/01/01/20250101T000000.000Z-{run_id[-12:]}.json",
        "2025-01-01T00:00:00+00:00",
        "t",
        host,
        pid,
    )


async def test_lease_is_exclusive_until_released() -> None:
    store = MemoryStore()
    a = RetentionLease(store, run_info("run-a-aaaaaaaaaaaa", os.getpid()), hostname="test-host")
    b = RetentionLease(store, run_info("run-b-bbbbbbbbbbbb", os.getpid()), hostname="test-host")
    assert await a.acquire()
    assert not await b.acquire()
    assert b.holder is not None and b.holder["run_id"] == "run-a-aaaaaaaaaaaa"
    await a.release([])
    assert await b.acquire()
    assert b.inherited == []


async def test_lease_of_a_dead_process_or_expired_is_taken_over() -> None:
    store = MemoryStore()
    dead = RetentionLease(store, run_info("run-dead-aaaaaaaaaaaa", pid=2**22 + 12345), hostname="test-host")
    assert await dead.acquire()
    heir = RetentionLease(store, run_info("run-heir-bbbbbbbbbbbb", os.getpid()), hostname="test-host")
    assert await heir.acquire()
    assert [r.run_id for r in heir.inherited] == ["run-dead-aaaaaaaaaaaa"]
    # The old holder notices at its next renewal that it lost the lease.
    dead._renewed = -1e9
    with pytest.raises(Exception, match="taken over"):
        await dead.renew_if_due()
    # Another host's live lease is respected until it expires.
    store2 = MemoryStore()
    remote = RetentionLease(
        store2, run_info("run-remote-cccccccccccc", 1, host="elsewhere"), hostname="elsewhere", ttl_s=0.0
    )
    assert await remote.acquire()  # ttl 0: expired at once
    local = RetentionLease(store2, run_info("run-local-dddddddddddd", os.getpid()), hostname="test-host")
    assert await local.acquire()
    assert [r.run_id for r in local.inherited] == ["run-remote-cccccccccccc"]


async def test_conditional_writes_on_memory_store() -> None:
    store = MemoryStore()
    first = await store.put_bytes_if(LEASE_KEY, b"1", metadata={}, if_none_match=True)
    with pytest.raises(PreconditionFailed):
        await store.put_bytes_if(LEASE_KEY, b"2", metadata={}, if_none_match=True)
    with pytest.raises(PreconditionFailed):
        await store.put_bytes_if(LEASE_KEY, b"3", metadata={}, if_match="0" * 32)
    await store.put_bytes_if(LEASE_KEY, b"4", metadata={}, if_match=first.etag)
    assert await store.get_bytes(LEASE_KEY) == b"4"


async def test_busy_sweep_does_nothing_and_is_audited() -> None:
    store = MemoryStore()
    await seed(store, "old", CUTOFF - timedelta(days=1))
    first = sweep(store)
    assert await first.lease.acquire()
    second = await sweep(store).run()
    assert second.status == "busy" and second.purged == []
    assert second.lease_holder is not None and second.lease_holder["run_id"] == first.report.run_id
    assert (await read_json(store, second.audit_key))["result"] == "busy"
    assert len(await live_keys(store)) == 2
