"""A local SQLite index of the recordings' metadata and of the audit records, so that a search over
100 000 recordings answers in milliseconds instead of reading 100 000 metadata objects.

S3 stays the source of truth: the index is a cache that can be deleted at any time and is rebuilt from
the bucket (``rebuild``). What it costs, which the README repeats:

- **rebuild**: three levels of LIST to find the days, one LIST per 1000 objects of each day, and one GET
  per metadata object that is new or whose ETag changed (``concurrency`` at a time, the sync minio client
  in threads). Over an index that is current it is LISTs only — the console runs one at start (catching
  up after downtime, forgetting what retention deleted) and every ``web.index_reconcile_s``.
- **refresh**: the same for the most recent UTC days only (today and yesterday) plus one LIST of
  ``holds/``: what the console runs every ``web.index_refresh_s``.

Everything read from the bucket is untrusted (caller names are chosen by callers): it is stored as data
through SQL parameters only, never spliced into SQL, and rendered escaped by the faces. An index belongs
to one bucket: its ``source`` is written into it, and an index file of another source is wiped, not
mixed in. SQLite runs in threads (``asyncio.to_thread``) behind one lock, in WAL mode; every write is a
short transaction, so a long rebuild never holds searches up for more than one batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from ..audit import MAX_RECORD_BYTES, AuditRecord, audit_days, is_audit_key
from ..safe import is_safe_call_id
from ..search import CorruptMetadata, normalise_number, parse_metadata, started_of
from ..storage import (
    AUDIT_PREFIX,
    HOLDS_PREFIX,
    RECORDINGS_PREFIX,
    ObjectStore,
    StorageError,
    day_prefix,
    parse_recording_key,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = "2"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Untrusted text is stored capped: a 10 kB caller name is an attack, not a name.
MAX_TEXT = 512
#: Metadata objects fetched and written per transaction during a sync.
BATCH = 256
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS recordings (
    metadata_key TEXT PRIMARY KEY,
    day TEXT NOT NULL,
    etag TEXT NOT NULL,
    call_id TEXT NOT NULL,
    started_us INTEGER NOT NULL,
    started_at TEXT NOT NULL,
    direction TEXT,
    caller_number TEXT,
    caller_norm TEXT NOT NULL,
    caller_name TEXT,
    agent TEXT,
    duration_s REAL,
    flags TEXT NOT NULL,
    flagged INTEGER NOT NULL,
    audio_status TEXT
);
-- Newest first, and covering the filtered columns: a selective filter is checked in the index, so a page
-- does not look up 100 000 rows to find its 50.
CREATE INDEX IF NOT EXISTS recordings_order ON recordings (started_us DESC, metadata_key DESC,
    caller_norm, agent, direction, flagged, duration_s, call_id);
CREATE INDEX IF NOT EXISTS recordings_day ON recordings (day);
CREATE INDEX IF NOT EXISTS recordings_call ON recordings (call_id);
CREATE TABLE IF NOT EXISTS problems (key TEXT PRIMARY KEY, day TEXT NOT NULL, etag TEXT NOT NULL,
    problem TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS holds (call_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS audit (
    key TEXT PRIMARY KEY,
    day TEXT NOT NULL,
    at_us INTEGER NOT NULL,
    at TEXT NOT NULL,
    action TEXT NOT NULL,
    by_name TEXT NOT NULL,
    host TEXT NOT NULL,
    result TEXT NOT NULL,
    reason TEXT NOT NULL,
    call_id TEXT,
    target TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_order ON audit (at_us DESC, key DESC);
CREATE INDEX IF NOT EXISTS audit_day ON audit (day);
CREATE TABLE IF NOT EXISTS audit_calls (key TEXT NOT NULL, call_id TEXT NOT NULL,
    PRIMARY KEY (call_id, key));
CREATE TABLE IF NOT EXISTS audit_problems (key TEXT PRIMARY KEY, day TEXT NOT NULL, problem TEXT NOT NULL);
"""


class IndexUnavailable(RuntimeError):
    """The index file is not open (it could not be created or opened): the faces answer 503."""


def to_us(moment: datetime) -> int:
    """An aware datetime as integer microseconds since the epoch (exact, sortable, DST-free)."""
    return (moment - _EPOCH) // timedelta(microseconds=1)


def like_escape(text: str) -> str:
    """``text`` as a literal inside a LIKE pattern with ``ESCAPE '\\'``."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text[:MAX_TEXT]


# --------------------------------------------------------------------------------------------- queries


@dataclass(frozen=True)
class Query:
    """A search of the index. Bounds are inclusive; ``None``/False means any."""

    start: datetime | None = None
    end: datetime | None = None
    #: Partial caller number: matched anywhere in the normalised number (``*`` is a wildcard).
    caller: str | None = None
    #: Match ``caller`` only within the number's last four digits (what a viewer is shown).
    caller_suffix: bool = False
    #: Partial agent (case-insensitive substring).
    agent: str | None = None
    direction: str | None = None
    flagged: bool = False
    held: bool = False
    min_duration_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The filters as an audit record's ``target`` (like ``Filters.as_dict``)."""
        out: dict[str, Any] = {}
        if self.start is not None:
            out["from"] = self.start.isoformat()
        if self.end is not None:
            out["to"] = self.end.isoformat()
        for name in ("caller", "agent", "direction", "min_duration_s"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        for name in ("flagged", "held"):
            if getattr(self, name):
                out[name] = True
        return out


@dataclass(frozen=True)
class Cursor:
    """Where the next page starts (keyset pagination: stable while recordings are added)."""

    started_us: int
    metadata_key: str

    def token(self) -> str:
        return f"{self.started_us}~{self.metadata_key}"

    @classmethod
    def parse(cls, token: str) -> Cursor:
        """``ValueError`` for anything that is not a cursor this module made."""
        us, sep, key = token.partition("~")
        if not sep or parse_recording_key(key) is None or not us.lstrip("-").isdigit() or len(us) > 20:
            raise ValueError("not a page cursor")
        return cls(int(us), key)


@dataclass(frozen=True)
class Row:
    """One recording as the index holds it (untrusted text fields are data to escape when shown)."""

    call_id: str
    metadata_key: str
    started_at: datetime
    direction: str | None
    caller_number: str | None
    caller_name: str | None
    agent: str | None
    duration_s: float | None
    flags: tuple[str, ...]
    held: bool
    audio_status: str | None


@dataclass(frozen=True)
class Page:
    rows: list[Row]
    total: int
    next: Cursor | None


@dataclass(frozen=True)
class AuditQuery:
    start: datetime | None = None
    end: datetime | None = None
    action: str | None = None
    #: Partial actor (``by``), case-insensitive.
    actor: str | None = None
    call_id: str | None = None


@dataclass(frozen=True)
class AuditRow:
    key: str
    at: datetime
    action: str
    by: str
    host: str
    result: str
    reason: str
    call_id: str | None
    target: Mapping[str, Any]


@dataclass(frozen=True)
class AuditPage:
    rows: list[AuditRow]
    total: int
    next: tuple[int, str] | None


@dataclass
class IndexState:
    """What the faces show about the index (is it complete yet, how old is it)."""

    recordings: int = 0
    problems: int = 0
    audit_records: int = 0
    built_at: str | None = None
    refreshed_at: str | None = None
    building: bool = False
    last_error: str | None = None


@dataclass
class SyncCounts:
    """What one sync did (for logs and the benchmark)."""

    listed: int = 0
    fetched: int = 0
    removed: int = 0
    problems: int = 0

    def add(self, other: SyncCounts) -> None:
        self.listed += other.listed
        self.fetched += other.fetched
        self.removed += other.removed
        self.problems += other.problems


# --------------------------------------------------------------------------------------------- the index


class EvidenceIndex:
    """The recordings' and the audit records' index over one bucket (see the module docstring)."""

    def __init__(
        self,
        path: Path | str,
        store: ObjectStore,
        *,
        source: str,
        concurrency: int = 16,
        recent_days: int = 2,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.path = str(path)
        self.store = store
        self.source = source
        self.concurrency = concurrency
        self.recent_days = recent_days
        self.now = now
        self.state = IndexState()
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        #: One sync at a time (a refresh waits for a running rebuild rather than racing it).
        self._sync = asyncio.Lock()
        #: The audit records' own: an audit page view must not wait for a long rebuild of recordings.
        self._audit_sync = asyncio.Lock()

    # -- sqlite plumbing

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _open_sync(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            conn = self._connect()
            has_meta = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() is not None
            got = dict(conn.execute("SELECT name, value FROM meta").fetchall()) if has_meta else {}
        except sqlite3.DatabaseError:  # not a SQLite file (a crash mid-write, a wrong path): rebuilt
            conn = sqlite3.connect(":memory:")
            got = {"unreadable": "yes"}
        if got.get("source") != self.source or got.get("schema") != SCHEMA_VERSION:
            if got:
                # Another bucket's index, or an older layout: it is a cache, so start afresh.
                log.warning("index event=wiped reason=other_source_or_schema path=%s", self.path)
            conn.close()
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    Path(self.path + suffix).unlink()
            conn = self._connect()
            conn.executescript(_SCHEMA)
            conn.execute(
                "INSERT INTO meta VALUES ('source', ?), ('schema', ?)", (self.source, SCHEMA_VERSION)
            )
        self._conn = conn
        self.state.built_at = self._meta("built_at")
        self._count()

    async def open(self) -> None:
        """Open (creating or wiping as needed) the index file."""
        await asyncio.to_thread(self._locked, self._open_sync)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _locked(self, fn: Callable[[], T]) -> T:
        with self._lock:
            return fn()

    async def _db(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            with self._lock:
                if self._conn is None:
                    raise IndexUnavailable(self.path)
                return fn(self._conn)

        return await asyncio.to_thread(run)

    def _meta(self, name: str) -> str | None:
        assert self._conn is not None
        row = self._conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return str(row[0]) if row else None

    def _set_meta(self, conn: sqlite3.Connection, name: str, value: str) -> None:
        conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))

    def _count(self) -> None:
        assert self._conn is not None
        c = self._conn
        self.state.recordings = int(c.execute("SELECT COUNT(*) FROM recordings").fetchone()[0])
        self.state.problems = int(c.execute("SELECT COUNT(*) FROM problems").fetchone()[0])
        self.state.audit_records = int(c.execute("SELECT COUNT(*) FROM audit").fetchone()[0])

    # -- keeping it current

    async def rebuild(self) -> SyncCounts:
        """Reconcile the whole index with the bucket (every day, holds, the audit log)."""
        async with self._sync:
            self.state.building = True
            try:
                total = SyncCounts()
                days = await self._recording_days()
                for day in days:
                    total.add(await self._sync_day(day))
                known = await self._db(
                    lambda c: [str(r[0]) for r in c.execute("SELECT DISTINCT day FROM recordings")]
                )
                gone = sorted(set(known) - {d.isoformat() for d in days})
                for day_text in gone:
                    total.add(await self._sync_day(date.fromisoformat(day_text)))
                await self._sync_holds()
                for day in await audit_days(self.store, None, None):
                    async with self._audit_sync:
                        await self._sync_audit_day(day)
                stamp = self.now().isoformat(timespec="seconds")

                def done(c: sqlite3.Connection) -> None:
                    self._set_meta(c, "built_at", stamp)
                    self._count()

                await self._db(done)
                self.state.built_at = stamp
                self.state.refreshed_at = stamp
                self.state.last_error = None
                log.info(
                    "index event=rebuilt recordings=%d fetched=%d removed=%d problems=%d",
                    self.state.recordings,
                    total.fetched,
                    total.removed,
                    total.problems,
                )
                return total
            finally:
                self.state.building = False

    async def refresh(self) -> SyncCounts:
        """Re-list the most recent UTC days (new, changed, deleted recordings), the holds, and the
        audit records of those days."""
        async with self._sync:
            today = self.now().astimezone(UTC).date()
            total = SyncCounts()
            for back in range(self.recent_days - 1, -1, -1):
                total.add(await self._sync_day(today - timedelta(days=back)))
                async with self._audit_sync:
                    await self._sync_audit_day(today - timedelta(days=back))
            await self._sync_holds()
            await self._db(lambda c: self._count())
            self.state.refreshed_at = self.now().isoformat(timespec="seconds")
            self.state.last_error = None
            return total

    async def refresh_audit(self) -> None:
        """The audit records of today and yesterday (UTC): what the audit page reads before a view."""
        async with self._audit_sync:
            today = self.now().astimezone(UTC).date()
            for back in (1, 0):
                await self._sync_audit_day(today - timedelta(days=back))
            await self._db(lambda c: self._count())

    async def _recording_days(self) -> list[date]:
        days: list[date] = []
        for ydir in await self.store.list_dirs(RECORDINGS_PREFIX):
            for mdir in await self.store.list_dirs(ydir):
                for ddir in await self.store.list_dirs(mdir):
                    parts = ddir[len(RECORDINGS_PREFIX) :].strip("/").split("/")
                    try:
                        days.append(date(int(parts[0]), int(parts[1]), int(parts[2])))
                    except (ValueError, IndexError):
                        continue
        return sorted(days)

    async def _gather_limited(self, jobs: Iterable[Awaitable[T]]) -> list[T]:
        limit = asyncio.Semaphore(self.concurrency)

        async def one(job: Awaitable[T]) -> T:
            async with limit:
                return await job

        return await asyncio.gather(*(one(j) for j in jobs))

    async def _sync_day(self, day: date) -> SyncCounts:
        """Make the index's rows of one UTC day equal to what its prefix holds."""
        counts = SyncCounts()
        listed: dict[str, str] = {}
        async for obj in self.store.list_prefix(day_prefix(day)):
            parsed = parse_recording_key(obj.key)
            if parsed is not None and parsed.kind == "json":
                listed[obj.key] = f"{obj.etag}/{obj.size}"
        counts.listed = len(listed)
        day_text = day.isoformat()

        def known(c: sqlite3.Connection) -> dict[str, str]:
            rows = c.execute(
                "SELECT metadata_key, etag FROM recordings WHERE day = ?", (day_text,)
            ).fetchall()
            rows += c.execute("SELECT key, etag FROM problems WHERE day = ?", (day_text,)).fetchall()
            return {str(k): str(e) for k, e in rows}

        have = await self._db(known)
        stale = [k for k in have if k not in listed]
        wanted = [k for k, etag in listed.items() if have.get(k) != etag]
        if stale:

            def remove(c: sqlite3.Connection) -> None:
                c.execute("BEGIN")
                c.executemany("DELETE FROM recordings WHERE metadata_key = ?", [(k,) for k in stale])
                c.executemany("DELETE FROM problems WHERE key = ?", [(k,) for k in stale])
                c.execute("COMMIT")

            await self._db(remove)
            counts.removed = len(stale)
        for start in range(0, len(wanted), BATCH):
            batch = wanted[start : start + BATCH]
            fetched = await self._gather_limited(self._fetch(k, listed[k], day_text) for k in batch)
            await self._db(lambda c, rows=fetched: self._store_rows(c, rows))  # type: ignore[misc]
            counts.fetched += len(batch)
            counts.problems += sum(1 for f in fetched if isinstance(f, tuple))
        return counts

    async def _fetch(
        self, key: str, etag: str, day: str
    ) -> dict[str, Any] | tuple[str, str, str, str] | None:
        """A row for the recordings table, a problem (key, day, etag, text), or None (gone)."""
        parsed = parse_recording_key(key)
        assert parsed is not None
        try:
            data = await self.store.get_bytes(key)
        except StorageError as exc:
            if exc.code != "TooLarge":
                raise
            return (key, day, etag, "larger than 16 MiB (not read)")
        if data is None:
            return None
        try:
            doc = parse_metadata(data, parsed.call_id)
            started = started_of(doc)
        except CorruptMetadata as exc:
            return (key, day, etag, str(exc)[:MAX_TEXT])
        caller = doc.get("caller") if isinstance(doc.get("caller"), Mapping) else {}
        audio = doc.get("audio") if isinstance(doc.get("audio"), Mapping) else {}
        assert isinstance(caller, Mapping) and isinstance(audio, Mapping)
        number = caller.get("number")
        duration = doc.get("duration_s")
        flags = doc.get("flags") if isinstance(doc.get("flags"), list) else []
        assert isinstance(flags, list)
        flag_texts = [str(f)[:64] for f in flags[:32]]
        return {
            "metadata_key": key,
            "day": day,
            "etag": etag,
            "call_id": parsed.call_id,
            "started_us": to_us(started.astimezone(UTC)),
            "started_at": started.astimezone(UTC).isoformat(),
            "direction": _text(doc.get("direction")),
            "caller_number": _text(number),
            "caller_norm": normalise_number(number if isinstance(number, str | int) else None)[:MAX_TEXT],
            "caller_name": _text(caller.get("name")),
            "agent": _text(doc.get("agent")),
            "duration_s": float(duration)
            if isinstance(duration, int | float) and not isinstance(duration, bool)
            else None,
            "flags": json.dumps(flag_texts, ensure_ascii=False),
            "flagged": 1 if flags else 0,
            "audio_status": _text(audio.get("status")),
        }

    @staticmethod
    def _store_rows(c: sqlite3.Connection, fetched: Sequence[Any]) -> None:
        rows = [r for r in fetched if isinstance(r, dict)]
        problems = [r for r in fetched if isinstance(r, tuple)]
        c.execute("BEGIN")
        c.executemany(
            "INSERT OR REPLACE INTO recordings VALUES (:metadata_key, :day, :etag, :call_id, :started_us, "
            ":started_at, :direction, :caller_number, :caller_norm, :caller_name, :agent, :duration_s, "
            ":flags, :flagged, :audio_status)",
            rows,
        )
        c.executemany("DELETE FROM problems WHERE key = ?", [(r["metadata_key"],) for r in rows])
        c.executemany("INSERT OR REPLACE INTO problems VALUES (?, ?, ?, ?)", problems)
        c.executemany("DELETE FROM recordings WHERE metadata_key = ?", [(p[0],) for p in problems])
        c.execute("COMMIT")

    async def _sync_holds(self) -> None:
        held: list[tuple[str]] = []
        async for obj in self.store.list_prefix(HOLDS_PREFIX):
            name = obj.key[len(HOLDS_PREFIX) :]
            if name.endswith(".json") and is_safe_call_id(name[: -len(".json")]):
                held.append((name[: -len(".json")],))

        def replace(c: sqlite3.Connection) -> None:
            c.execute("BEGIN")
            c.execute("DELETE FROM holds")
            c.executemany("INSERT OR IGNORE INTO holds VALUES (?)", held)
            c.execute("COMMIT")

        await self._db(replace)

    async def _sync_audit_day(self, day: date) -> None:
        """Audit records are immutable: read the keys not indexed yet, forget the ones gone."""
        listed = [
            o.key
            async for o in self.store.list_prefix(f"{AUDIT_PREFIX}{day:%Y/%m/%d}/")
            if is_audit_key(o.key)
        ]
        day_text = day.isoformat()

        def known(c: sqlite3.Connection) -> set[str]:
            rows = c.execute("SELECT key FROM audit WHERE day = ?", (day_text,)).fetchall()
            rows += c.execute("SELECT key FROM audit_problems WHERE day = ?", (day_text,)).fetchall()
            return {str(r[0]) for r in rows}

        have = await self._db(known)
        stale = have - set(listed)
        wanted = [k for k in listed if k not in have]
        if stale:

            def remove(c: sqlite3.Connection) -> None:
                c.execute("BEGIN")
                for table, col in (("audit", "key"), ("audit_calls", "key"), ("audit_problems", "key")):
                    c.executemany(f"DELETE FROM {table} WHERE {col} = ?", [(k,) for k in stale])  # noqa: S608
                c.execute("COMMIT")

            await self._db(remove)
        for start in range(0, len(wanted), BATCH):
            batch = wanted[start : start + BATCH]
            fetched = await self._gather_limited(self._fetch_audit(k, day_text) for k in batch)
            await self._db(lambda c, rows=fetched: self._store_audit(c, rows))  # type: ignore[misc]

    async def _fetch_audit(
        self, key: str, day: str
    ) -> tuple[dict[str, Any], list[str]] | tuple[str, str, str] | None:
        try:
            data = await self.store.get_bytes(key, max_bytes=MAX_RECORD_BYTES)
        except StorageError as exc:
            if exc.code != "TooLarge":
                raise
            return (key, day, "too large to read")
        if data is None:
            return None
        try:
            record = AuditRecord.from_json(data, key)
            at = datetime.fromisoformat(record.at)
            if at.tzinfo is None:
                raise ValueError("at has no UTC offset")
            at = at.astimezone(UTC)
        except (ValueError, OverflowError, RecursionError, TypeError) as exc:
            return (key, day, f"unreadable: {type(exc).__name__}")
        target = record.target if isinstance(record.target, Mapping) else {}
        cid = target.get("call_id")
        calls = [cid] if isinstance(cid, str) else []
        ids = target.get("call_ids")
        if isinstance(ids, list):
            calls += [i for i in ids if isinstance(i, str)]
        shown_target = {
            k: (v if not isinstance(v, list) else f"{len(v)} item(s)")
            for k, v in list(target.items())[:16]
            if isinstance(k, str)
        }
        row = {
            "key": key,
            "day": day,
            "at_us": to_us(at),
            "at": at.isoformat(),
            "action": record.action[:64],
            "by_name": record.by[:MAX_TEXT],
            "host": record.host[:MAX_TEXT],
            "result": record.result[:64],
            "reason": record.reason[:MAX_TEXT],
            "call_id": cid[:MAX_TEXT] if isinstance(cid, str) else None,
            "target": json.dumps(shown_target, ensure_ascii=False, default=str)[:4096],
        }
        return row, [c[:MAX_TEXT] for c in calls[:10000]]

    @staticmethod
    def _store_audit(c: sqlite3.Connection, fetched: Sequence[Any]) -> None:
        c.execute("BEGIN")
        for item in fetched:
            if item is None:
                continue
            if len(item) == 3:
                c.execute("INSERT OR REPLACE INTO audit_problems VALUES (?, ?, ?)", item)
                continue
            row, calls = item
            c.execute(
                "INSERT OR REPLACE INTO audit VALUES (:key, :day, :at_us, :at, :action, :by_name, :host, "
                ":result, :reason, :call_id, :target)",
                row,
            )
            c.executemany("INSERT OR IGNORE INTO audit_calls VALUES (?, ?)", [(row["key"], x) for x in calls])
        c.execute("COMMIT")

    # -- reading

    async def search(self, q: Query, *, limit: int = 50, after: Cursor | None = None) -> Page:
        """One page of matches, newest first (ties by key), and the total number of matches."""
        where: list[str] = []
        args: list[Any] = []
        if q.start is not None:
            where.append("r.started_us >= ?")
            args.append(to_us(q.start.astimezone(UTC)))
        if q.end is not None:
            where.append("r.started_us <= ?")
            args.append(to_us(q.end.astimezone(UTC)))
        if q.caller:
            wanted = normalise_number(q.caller)
            column = "substr(r.caller_norm, -4)" if q.caller_suffix else "r.caller_norm"
            if wanted and "*" in wanted:
                pattern = "%" + "%".join(like_escape(part) for part in wanted.split("*")) + "%"
                where.append(f"{column} LIKE ? ESCAPE '\\'")
                args.append(pattern)
            elif wanted:
                where.append(f"instr({column}, ?) > 0")  # a plain substring: cheaper than LIKE per row
                args.append(wanted)
        if q.agent:
            where.append("r.agent LIKE ? ESCAPE '\\'")
            args.append("%" + like_escape(q.agent.strip()) + "%")
        if q.direction is not None:
            where.append("r.direction = ?")
            args.append(q.direction)
        if q.flagged:
            where.append("r.flagged = 1")
        if q.min_duration_s is not None:
            where.append("r.duration_s >= ?")
            args.append(q.min_duration_s)
        # Held only: driven from the (few) hold records (CROSS JOIN fixes SQLite's loop order).
        if q.held:
            base = "FROM holds h CROSS JOIN recordings r ON r.call_id = h.call_id"
        else:
            base = "FROM recordings r LEFT JOIN holds h ON h.call_id = r.call_id"
        cond = (" WHERE " + " AND ".join(where)) if where else ""
        page_where = list(where)
        page_args = list(args)
        if after is not None:
            page_where.append("(r.started_us < ? OR (r.started_us = ? AND r.metadata_key < ?))")
            page_args += [after.started_us, after.started_us, after.metadata_key]
        page_cond = (" WHERE " + " AND ".join(page_where)) if page_where else ""
        select = (
            "SELECT r.call_id, r.metadata_key, r.started_at, r.direction, r.caller_number, r.caller_name, "
            "r.agent, r.duration_s, r.flags, h.call_id IS NOT NULL, r.audio_status, r.started_us "
            f"{base}{page_cond} ORDER BY r.started_us DESC, r.metadata_key DESC LIMIT ?"
        )

        def run(c: sqlite3.Connection) -> tuple[list[tuple[Any, ...]], int]:
            found = c.execute(select, [*page_args, limit + 1]).fetchall()
            total = int(c.execute(f"SELECT COUNT(*) {base}{cond}", args).fetchone()[0])
            return found, total

        found, total = await self._db(run)
        rows = [
            Row(
                call_id=r[0],
                metadata_key=r[1],
                started_at=datetime.fromisoformat(r[2]),
                direction=r[3],
                caller_number=r[4],
                caller_name=r[5],
                agent=r[6],
                duration_s=r[7],
                flags=tuple(json.loads(r[8])),
                held=bool(r[9]),
                audio_status=r[10],
            )
            for r in found[:limit]
        ]
        more = len(found) > limit
        nxt = Cursor(int(found[limit - 1][11]), str(found[limit - 1][1])) if more and limit > 0 else None
        return Page(rows, total, nxt)

    async def audit(
        self, q: AuditQuery, *, limit: int = 50, after: tuple[int, str] | None = None
    ) -> AuditPage:
        """One page of audit records, newest first, and the number matching."""
        where: list[str] = []
        args: list[Any] = []
        if q.start is not None:
            where.append("a.at_us >= ?")
            args.append(to_us(q.start.astimezone(UTC)))
        if q.end is not None:
            where.append("a.at_us <= ?")
            args.append(to_us(q.end.astimezone(UTC)))
        if q.action:
            where.append("a.action = ?")
            args.append(q.action)
        if q.actor:
            where.append("a.by_name LIKE ? ESCAPE '\\'")
            args.append("%" + like_escape(q.actor.strip()) + "%")
        if q.call_id:
            where.append("EXISTS (SELECT 1 FROM audit_calls x WHERE x.key = a.key AND x.call_id = ?)")
            args.append(q.call_id)
        cond = (" WHERE " + " AND ".join(where)) if where else ""
        page_where, page_args = list(where), list(args)
        if after is not None:
            page_where.append("(a.at_us < ? OR (a.at_us = ? AND a.key < ?))")
            page_args += [after[0], after[0], after[1]]
        page_cond = (" WHERE " + " AND ".join(page_where)) if page_where else ""
        select = (
            "SELECT a.key, a.at, a.action, a.by_name, a.host, a.result, a.reason, a.call_id, a.target, "  # noqa: S608
            f"a.at_us FROM audit a{page_cond} ORDER BY a.at_us DESC, a.key DESC LIMIT ?"
        )

        def run(c: sqlite3.Connection) -> tuple[list[tuple[Any, ...]], int]:
            found = c.execute(select, [*page_args, limit + 1]).fetchall()
            total = int(c.execute(f"SELECT COUNT(*) FROM audit a{cond}", args).fetchone()[0])  # noqa: S608
            return found, total

        found, total = await self._db(run)
        rows = [
            AuditRow(
                key=r[0],
                at=datetime.fromisoformat(r[1]),
                action=r[2],
                by=r[3],
                host=r[4],
                result=r[5],
                reason=r[6],
                call_id=r[7],
                target=json.loads(r[8]),
            )
            for r in found[:limit]
        ]
        nxt = (
            (int(found[limit - 1][9]), str(found[limit - 1][0])) if len(found) > limit and limit > 0 else None
        )
        return AuditPage(rows, total, nxt)
