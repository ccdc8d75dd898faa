"""The evidence index (kasuhara_ari/evidence/index.py): filters, pagination, timezone edges, partial
numbers, hostile strings, incremental sync. Pure logic over the in-memory store (recordings written by
the same seed helper as the S3 tests); the S3 round trip is in tests/test_web_search_s3.py."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from uploader_helpers import metadata

from kasuhara_ari.audit import AuditLog
from kasuhara_ari.events import NullEvents
from kasuhara_ari.evidence.index import AuditQuery, Cursor, EvidenceIndex, Query
from kasuhara_ari.search import parse_when, zone
from kasuhara_ari.storage import MemoryStore, recording_keys
from kasuhara_ari.uploader import encode_metadata

from recordings_seed import Seeded, hold, iso


async def seed(
    store: MemoryStore,
    call_id: str,
    started: datetime,
    *,
    caller: str = "03-1234-5678",
    direction: str = "inbound",
    flags: tuple[str, ...] | list[str] = (),
    **over: object,
) -> Seeded:
    """A metadata object as the uploader's (no audio: the index reads metadata only)."""
    keys = recording_keys(call_id, started)
    doc = metadata(
        call_id,
        started_at=iso(started),
        direction=direction,
        caller={"number": caller, "name": "山田 太郎"},
        flags=list(flags),
        **over,
    )
    await store.put_bytes(keys.metadata, encode_metadata(doc), metadata={})
    return Seeded(call_id, started, keys, None)


TOKYO = zone("Asia/Tokyo")
NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


@pytest.fixture
async def store() -> MemoryStore:
    return MemoryStore("idx")


@pytest.fixture
async def index(tmp_path: Path, store: MemoryStore) -> AsyncIterator[EvidenceIndex]:
    idx = EvidenceIndex(tmp_path / "index.sqlite", store, source="memory/idx", now=lambda: NOW)
    await idx.open()
    yield idx
    idx.close()


async def ids(index: EvidenceIndex, q: Query, **kw: object) -> list[str]:
    page = await index.search(q, limit=1000, **kw)  # type: ignore[arg-type]
    return [r.call_id for r in page.rows]


async def test_filters_each_narrow_the_results(store: MemoryStore, index: EvidenceIndex) -> None:
    t = NOW - timedelta(hours=5)
    await seed(store, "c-plain", t, caller="03-1111-2222", agent="PJSIP/suzuki", duration_s=30.0)
    await seed(store, "c-out", t + timedelta(minutes=1), direction="outbound", caller="0312345678")
    flagged = await seed(
        store, "c-flag", t + timedelta(minutes=2), flags=["harassment"], caller="+81 90 5555 6666"
    )
    await seed(
        store, "c-long", t + timedelta(minutes=3), duration_s=600.0, agent="PJSIP/tanaka", caller="0120000000"
    )
    await hold(store, flagged)
    await index.rebuild()

    assert await ids(index, Query()) == ["c-long", "c-flag", "c-out", "c-plain"]
    assert await ids(index, Query(direction="outbound")) == ["c-out"]
    assert await ids(index, Query(flagged=True)) == ["c-flag"]
    assert await ids(index, Query(held=True)) == ["c-flag"]
    assert await ids(index, Query(min_duration_s=100)) == ["c-long"]
    assert await ids(index, Query(agent="suzu")) == ["c-plain"]
    assert await ids(index, Query(agent="SUZUKI")) == ["c-plain"]  # case-insensitive
    # Partial numbers, in any notation: +81 becomes 0, full-width digits fold, dashes drop.
    assert await ids(index, Query(caller="5555-66")) == ["c-flag"]
    assert await ids(index, Query(caller="090")) == ["c-flag"]
    assert await ids(index, Query(caller="１１１１")) == ["c-plain"]
    assert await ids(index, Query(caller="03*5678")) == ["c-out"]
    # The flags stored are what the metadata said; held comes from the hold records.
    row = (await index.search(Query(flagged=True))).rows[0]
    assert row.flags == ("harassment",) and row.held


async def test_viewer_caller_filter_matches_only_the_last_four_digits(
    store: MemoryStore, index: EvidenceIndex
) -> None:
    await seed(store, "c-a", NOW - timedelta(hours=1), caller="03-1234-5678")
    await index.rebuild()
    assert await ids(index, Query(caller="5678", caller_suffix=True)) == ["c-a"]
    assert await ids(index, Query(caller="67", caller_suffix=True)) == ["c-a"]
    # Digits a viewer cannot see find nothing (no oracle for the hidden part of the number).
    assert await ids(index, Query(caller="1234", caller_suffix=True)) == []
    assert await ids(index, Query(caller="1234")) == ["c-a"]


async def test_date_range_is_whole_local_days_inclusive(store: MemoryStore, index: EvidenceIndex) -> None:
    # 2026-12-02 in Tokyo is 2026-12-01T15:00Z .. 2026-12-02T15:00Z (exclusive).
    await seed(store, "c-before", datetime(2026, 12, 1, 14, 59, 59, 999000, tzinfo=UTC))
    await seed(store, "c-first", datetime(2026, 12, 1, 15, 0, tzinfo=UTC))
    await seed(store, "c-last", datetime(2026, 12, 2, 14, 59, 59, 999000, tzinfo=UTC))
    await seed(store, "c-after", datetime(2026, 12, 2, 15, 0, tzinfo=UTC))
    await index.rebuild()
    q = Query(start=parse_when("2026-12-02", TOKYO), end=parse_when("2026-12-02", TOKYO, end=True))
    assert await ids(index, q) == ["c-last", "c-first"]
    # The same instants in UTC days: the UTC day 2026-12-01 holds c-before and c-first.
    utc = zone("UTC")
    q = Query(start=parse_when("2026-12-01", utc), end=parse_when("2026-12-01", utc, end=True))
    assert await ids(index, q) == ["c-first", "c-before"]


async def test_a_day_with_a_dst_change_is_its_23_local_hours(
    store: MemoryStore, index: EvidenceIndex
) -> None:
    # 2026-03-29 in Berlin starts at 23:00Z (CET) and ends at 22:00Z (CEST): 23 hours.
    await seed(store, "c-start", datetime(2026, 3, 28, 23, 0, tzinfo=UTC))
    await seed(store, "c-end", datetime(2026, 3, 29, 21, 59, 59, 999000, tzinfo=UTC))
    await seed(store, "c-next", datetime(2026, 3, 29, 22, 0, tzinfo=UTC))
    await seed(store, "c-prev", datetime(2026, 3, 28, 22, 59, 59, tzinfo=UTC))
    await index.rebuild()
    berlin = zone("Europe/Berlin")
    q = Query(start=parse_when("2026-03-29", berlin), end=parse_when("2026-03-29", berlin, end=True))
    assert await ids(index, q) == ["c-end", "c-start"]


async def test_keyset_pages_are_stable_and_complete(store: MemoryStore, index: EvidenceIndex) -> None:
    t = NOW - timedelta(hours=3)
    # Several recordings at the same instant: the key breaks the tie, nothing is lost or repeated.
    for i in range(7):
        await seed(store, f"same-{i}", t)
    for i in range(6):
        await seed(store, f"other-{i}", t + timedelta(minutes=i + 1))
    await index.rebuild()
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        page = await index.search(Query(), limit=4, after=after)
        assert page.total == (13 if pages == 0 else 14)  # the count includes the late one
        seen += [r.call_id for r in page.rows]
        pages += 1
        if page.next is None:
            break
        after = Cursor.parse(page.next.token())
        # A recording added between pages (newer than all) does not shift the next page.
        if pages == 1:
            await seed(store, "late", NOW)
            await index.refresh()
    assert pages == 4
    assert seen == [f"other-{i}" for i in range(5, -1, -1)] + [f"same-{i}" for i in range(6, -1, -1)]


@pytest.mark.parametrize(
    "token", ["", "123", "x~recordings/2026/12/03/a.json", "1~../../etc/passwd", "1~a'b"]
)
def test_cursor_refuses_what_it_did_not_make(token: str) -> None:
    with pytest.raises(ValueError, match="cursor"):
        Cursor.parse(token)


async def test_hostile_strings_are_data_not_sql(store: MemoryStore, index: EvidenceIndex) -> None:
    name = "'); DROP TABLE recordings; --\u202e<script>" + "x" * 10_000
    await seed(store, "c-hostile", NOW - timedelta(hours=1), agent="a' OR '1'='1", caller="0311112222")
    await seed(store, "c-evil-name", NOW - timedelta(hours=2), caller="0399998888")
    doc_key = "recordings/2026/12/03/c-evil-name.json"
    # The caller name is what a caller chose: rewrite it in place (a later PUT is a new version).
    raw = await store.get_bytes(doc_key)
    assert raw is not None
    doc = json.loads(raw)
    doc["caller"]["name"] = name
    await store.put_bytes(doc_key, encode_metadata(doc), metadata={})
    await index.rebuild()
    for hostile in ("' OR 1=1 --", "%", "_", "\\", "'); DROP TABLE recordings; --", "*"):
        assert await ids(index, Query(agent=hostile)) == [], hostile
    assert await ids(index, Query(agent="a' OR '1'='1")) == ["c-hostile"]
    assert await ids(index, Query(caller="%")) == []
    assert await ids(index, Query(caller="_")) == []
    rows = (await index.search(Query())).rows
    assert {r.call_id for r in rows} == {"c-hostile", "c-evil-name"}
    evil = next(r for r in rows if r.call_id == "c-evil-name")
    assert evil.caller_name is not None and evil.caller_name.startswith("'); DROP TABLE")
    assert len(evil.caller_name) <= 512  # stored capped
    with sqlite3.connect(index.path) as c:  # the table survived
        assert c.execute("SELECT COUNT(*) FROM recordings").fetchone()[0] == 2


async def test_sync_follows_new_changed_deleted_and_unreadable(
    store: MemoryStore, index: EvidenceIndex
) -> None:
    a = await seed(store, "c-a", NOW - timedelta(hours=2))
    await index.rebuild()
    assert await ids(index, Query()) == ["c-a"]
    # New today, a recording deleted, a corrupt metadata object: a refresh sees all three.
    await seed(store, "c-b", NOW - timedelta(hours=1), flags=["x"])
    await store.put_bytes("recordings/2026/12/03/c-bad.json", b"{not json", metadata={})
    store.objects.pop(a.keys.metadata)
    counts = await index.refresh()
    assert counts.removed == 1 and counts.problems == 1
    assert await ids(index, Query()) == ["c-b"]
    assert index.state.problems == 1
    # Nothing changed: a refresh lists but reads nothing.
    assert (await index.refresh()).fetched == 0
    # An old day (outside the recent days) is picked up by the reconcile, not the refresh.
    await seed(store, "c-old", NOW - timedelta(days=20))
    await index.refresh()
    assert "c-old" not in await ids(index, Query())
    await index.rebuild()
    assert "c-old" in await ids(index, Query())


async def test_index_of_another_bucket_is_wiped_not_mixed(tmp_path: Path, store: MemoryStore) -> None:
    await seed(store, "c-a", NOW - timedelta(hours=1))
    first = EvidenceIndex(tmp_path / "i.sqlite", store, source="memory/idx", now=lambda: NOW)
    await first.open()
    await first.rebuild()
    first.close()
    other = EvidenceIndex(tmp_path / "i.sqlite", MemoryStore("other"), source="memory/other", now=lambda: NOW)
    await other.open()
    assert (await other.search(Query())).total == 0
    other.close()


async def test_audit_records_are_indexed_and_filtered(store: MemoryStore, index: EvidenceIndex) -> None:
    log = AuditLog(store, NullEvents(), by="web:sato", host="h1")
    await log.write(log.new("play", target={"call_id": "c-1"}, at=NOW - timedelta(hours=2)))
    await log.write(log.new("download", target={"call_id": "c-1"}, at=NOW - timedelta(hours=1)))
    other = AuditLog(store, NullEvents(), by="admin-cli", host="h2")
    await other.write(
        other.new("export", target={"call_ids": ["c-1", "c-2"]}, at=NOW - timedelta(minutes=30))
    )
    await other.write(other.new("list", target={"from": "x"}, at=NOW - timedelta(days=3)))
    await index.rebuild()

    page = await index.audit(AuditQuery())
    assert [r.action for r in page.rows] == ["export", "download", "play", "list"]  # newest first
    assert [r.action for r in (await index.audit(AuditQuery(actor="SATO"))).rows] == ["download", "play"]
    assert [r.action for r in (await index.audit(AuditQuery(call_id="c-2"))).rows] == ["export"]
    assert [r.action for r in (await index.audit(AuditQuery(action="play"))).rows] == ["play"]
    day = AuditQuery(start=NOW - timedelta(days=4), end=NOW - timedelta(days=2))
    assert [r.action for r in (await index.audit(day)).rows] == ["list"]
    first = await index.audit(AuditQuery(), limit=3)
    assert first.total == 4 and first.next is not None
    rest = await index.audit(AuditQuery(), limit=3, after=first.next)
    assert [r.action for r in rest.rows] == ["list"] and rest.next is None
    # A record written now shows after refresh_audit (what the audit page does before a view).
    await log.write(log.new("hold", target={"call_id": "c-3"}, at=NOW))
    await index.refresh_audit()
    assert (await index.audit(AuditQuery())).rows[0].action == "hold"


async def test_a_corrupt_index_file_is_rebuilt_not_fatal(tmp_path: Path, store: MemoryStore) -> None:
    await seed(store, "c-a", NOW - timedelta(hours=1))
    path = tmp_path / "i.sqlite"
    path.write_bytes(b"this is not a SQLite database" * 100)
    index = EvidenceIndex(path, store, source="memory/idx", now=lambda: NOW)
    await index.open()
    await index.rebuild()
    assert await ids(index, Query()) == ["c-a"]
    index.close()
