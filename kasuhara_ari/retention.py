"""The retention worker: purge recordings whose call started before the cutoff, never anything held.

**Cutoff.** ``retention.days`` are calendar days in ``general.timezone``: a run on 30 May with 90 days
deletes calls that started before 00:00 local time on 1 March (:func:`cutoff_for`). Everything deleted is
therefore more than N days old, whenever in the day the sweep runs. Age is the metadata's
``started_at``, never S3's LastModified.

**Walk.** Keys carry the UTC day of ``started_at``, so only the day prefixes up to the cutoff's UTC day
can hold something to delete: they are found with delimiter listings (``recordings/`` → years → months
→ days; one request each, no bucket scan) and each such day is listed with all its versions. The date
in the key is only a pre-filter: each recording's metadata is read and the decision is made on its
``started_at``. A recording whose metadata is missing, hidden by a delete marker, or unreadable is never
deleted: it is reported as a problem (on stderr, in the audit record, as ``retention.problem``).

**Deletion.** Every version and delete marker of a recording's keys is deleted by version id (on an
object-lock bucket a plain DELETE only adds a marker), through the one :class:`DeletionGuard`, in
DeleteObjects batches of at most ``batch_size`` keys: first the audio of a batch of recordings, then the
metadata of those whose audio is entirely gone. So an interruption can leave metadata without audio (the
next run finishes it) but never audio without its metadata. Hold records refuse deletion in the guard;
legal holds are enforced by the server (refusals count as skipped), so a run costs no per-object
legal-hold request. A dry run asks the guard for its verdicts (including a legal-hold check per object,
since no server refuses anything there) and deletes nothing, takes no lease and writes nothing.

**Two workers, crashes.** A run holds a lease (:mod:`kasuhara_ari.lease`): epoch objects
``retention/lease/<epoch>.json``, created with ``If-None-Match: *`` and decided by the server's version
order where the server ignores the condition. A second worker that finds it held does nothing and says
so (``busy``; the CLI exits 3). A lease whose holder is past its expiry, or was a process on this host
that no longer exists, is taken over as the next epoch. The epoch is a fencing token: before each
deletion batch the run checks it still holds the lease (its own clock, then the newest epoch), so a
worker paused past its expiry deletes nothing after it resumes (status ``lost_lease``).

Before each deletion batch the run writes its journal (``retention/runs/<run_id>/<n>.json``: the
recordings it is about to delete). Its audit record is written at the end. When a run crashed, the next
run that takes its lease finishes the crashed run's audit record from that journal: recordings it
deleted before it died (metadata gone, and not deleted by the new run) are listed there, the rest in the
new run's own record — every deleted recording is in exactly one audit record. Without the lease
(``use_lease=False``) sweeps stay safe — deleting a version twice is a no-op — but a recording could be
listed by both runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time as monotonic_time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from . import metrics
from .audit import AuditLog, AuditRecord, audit_key, new_id
from .events import EventSink
from .lease import Lease, pid_alive
from .lease import LeaseLost as LeaseBaseLost
from .safe import clean_log_value, is_safe_call_id
from .search import local_midnight, parse_metadata, started_of
from .storage import (
    RECORDINGS_PREFIX,
    RETENTION_PREFIX,
    DeletionGuard,
    ObjectInfo,
    ObjectRef,
    ObjectStore,
    Refusal,
    StorageError,
    day_prefix,
    parse_recording_key,
)

log = logging.getLogger(__name__)

LEASE_KEY = f"{RETENTION_PREFIX}lease.json"  # the single-object lease of earlier versions
LEASE_PREFIX = f"{RETENTION_PREFIX}lease/"
LEASE_SKEW_S = 30.0
LEASE_SCHEMA = "kasuhara.retention-lease/1"
JOURNAL_SCHEMA = "kasuhara.retention-journal/1"
MAX_BATCH = 1000
MAX_PROBLEMS_LISTED = 1000


# --------------------------------------------------------------------------------------------- pure


def cutoff_for(now: datetime, days: int, tz: ZoneInfo) -> datetime:
    """The first instant that is kept: local midnight ``days`` calendar days before ``now``'s date."""
    if days < 1:
        raise ValueError(f"retention days must be at least 1, got {days}")
    today = now.astimezone(tz).date()
    return local_midnight(today - timedelta(days=days), tz)


def last_day_to_walk(cutoff: datetime) -> date:
    """The last UTC day prefix that can hold a call started before ``cutoff``."""
    return (cutoff.astimezone(UTC) - timedelta(microseconds=1)).date()


def parse_daily_at(value: str) -> time:
    """``retention.daily_at`` (``HH:MM``) as a time; ``ValueError`` naming the key otherwise."""
    try:
        hours, minutes = value.strip().split(":")
        return time(int(hours), int(minutes))
    except ValueError:
        raise ValueError(f"retention.daily_at: {value!r} is not a time like 03:00") from None


def next_run(now: datetime, at: time, tz: ZoneInfo) -> datetime:
    """The next moment (after ``now``) that the local clock in ``tz`` shows ``at``."""
    local = now.astimezone(tz)
    candidate = datetime.combine(local.date(), at, tzinfo=tz)
    while candidate <= local:
        candidate = datetime.combine(candidate.date() + timedelta(days=1), at, tzinfo=tz)
    return candidate.astimezone(UTC)


def day_of_prefix(prefix: str, depth: int) -> tuple[int, ...] | None:
    """``recordings/2025/`` → (2025,), ``recordings/2025/01/`` → (2025, 1), … ; ``None`` if malformed."""
    parts = prefix[len(RECORDINGS_PREFIX) :].rstrip("/").split("/")
    if len(parts) != depth or not all(p.isdigit() for p in parts):
        return None
    return tuple(int(p) for p in parts)


@dataclass
class Recording:
    """All versions of one call's objects under one day prefix."""

    call_id: str
    day: date
    audio: list[ObjectInfo] = field(default_factory=list)
    metadata: list[ObjectInfo] = field(default_factory=list)

    @property
    def metadata_key(self) -> str:
        return f"{day_prefix(self.day)}{self.call_id}.json"

    @property
    def audio_key(self) -> str:
        return f"{day_prefix(self.day)}{self.call_id}.wav"

    def refs(self, versions: list[ObjectInfo]) -> list[ObjectRef]:
        return [ObjectRef(v.key, v.version_id) for v in versions]

    def metadata_problem(self) -> str | None:
        """Why the metadata cannot be read from its latest version (``None``: it can)."""
        if not any(not v.is_delete_marker for v in self.metadata):
            return "metadata missing (audio without metadata: upload unfinished, or deleted by hand)"
        latest = next((v for v in self.metadata if v.is_latest), None)
        if latest is not None and latest.is_delete_marker:
            return "metadata hidden by a delete marker"
        return None


# --------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Purged:
    call_id: str
    started_at: str
    objects: int


@dataclass(frozen=True)
class Skipped:
    call_id: str
    started_at: str
    reason: str


@dataclass(frozen=True)
class Problem:
    key: str
    problem: str


@dataclass
class SweepReport:
    run_id: str
    started_at: datetime
    cutoff: datetime
    days: int
    dry_run: bool
    audit_key: str = ""
    status: str = "running"  # completed | busy | failed | interrupted | lost_lease
    error: str = ""
    finished_at: datetime | None = None
    days_walked: int = 0
    recordings_seen: int = 0
    recordings_kept: int = 0
    purged: list[Purged] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    #: All problems found; ``problems`` lists the first MAX_PROBLEMS_LISTED (a bucket full of junk must
    #: not make the audit record itself too large to write).
    problems_total: int = 0
    objects_deleted: int = 0
    objects_refused: int = 0
    lease_holder: dict[str, Any] | None = None
    recovered_runs: list[dict[str, Any]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "days_walked": self.days_walked,
            "recordings_seen": self.recordings_seen,
            "recordings_kept": self.recordings_kept,
            "purged": len(self.purged),
            "skipped": len(self.skipped),
            "problems": max(self.problems_total, len(self.problems)),
            "objects_deleted": self.objects_deleted,
            "objects_refused": self.objects_refused,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status,
            "error": self.error,
            "dry_run": self.dry_run,
            "days": self.days,
            "cutoff": self.cutoff.isoformat(),
            "started_at": self.started_at.isoformat(timespec="milliseconds"),
            "finished_at": self.finished_at.isoformat(timespec="milliseconds") if self.finished_at else None,
            "audit_key": self.audit_key or None,
            "counts": self.counts(),
            "purged": [asdict(p) for p in self.purged],
            "skipped": [asdict(s) for s in self.skipped],
            "problems": [asdict(p) for p in self.problems],
            "lease_holder": self.lease_holder,
            "recovered_runs": self.recovered_runs,
        }


# --------------------------------------------------------------------------------------------- lease


class LeaseLost(Exception):
    """Another worker took the lease over (this run was too slow to renew it): stop deleting."""


@dataclass(frozen=True)
class RunInfo:
    """A run as the lease names it (also what a crashed run leaves for the next one to finish)."""

    run_id: str
    audit_key: str
    started_at: str
    by: str
    host: str
    pid: int

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> RunInfo | None:
        try:
            info = cls(
                run_id=str(doc["run_id"]),
                audit_key=str(doc["audit_key"]),
                started_at=str(doc["started_at"]),
                by=str(doc.get("by", "")),
                host=str(doc.get("host", "")),
                pid=int(doc.get("pid", 0)),
            )
        except (KeyError, TypeError, ValueError):
            return None
        return info if is_safe_call_id(info.run_id) else None


class RetentionLease:
    """The sweep's lease: a :class:`~kasuhara_ari.lease.Lease` under ``retention/lease/`` (epoch objects,
    the epoch is the fencing token) whose payload carries this run and the crashed runs handed on.

    A ``retention/lease.json`` of an earlier version is still respected while it is held and unexpired
    (a worker not yet upgraded), and its unfinished runs are inherited by the first epoch."""

    def __init__(
        self, store: ObjectStore, me: RunInfo, *, ttl_s: float = 600.0, hostname: str | None = None
    ) -> None:
        self.store = store
        self.me = me
        self.ttl_s = ttl_s
        self.hostname = hostname or socket.gethostname()
        owner = {
            "run_id": me.run_id,
            "by": me.by,
            "host": me.host,
            "pid": me.pid,
            "started_at": me.started_at,
        }
        self.lease = Lease(
            store,
            LEASE_PREFIX,
            owner=owner,
            ttl_s=ttl_s,
            skew_s=min(LEASE_SKEW_S, ttl_s / 5),
            hostname=self.hostname,
        )
        self.inherited: list[RunInfo] = []
        self.holder: dict[str, Any] | None = None
        self._renewed = 0.0

    @property
    def token(self) -> int | None:
        """The fencing token (lease epoch) while held."""
        return self.lease.token

    def _payload(self, pending: Sequence[RunInfo]) -> dict[str, Any]:
        return {"run": asdict(self.me), "pending": [asdict(r) for r in pending]}

    async def _legacy(self) -> dict[str, Any] | None:
        """``retention/lease.json`` of an earlier version, if any."""
        if await self.store.stat(LEASE_KEY) is None:
            return None
        try:
            doc = json.loads(await self.store.get_bytes(LEASE_KEY) or b"")
        except ValueError:
            return {}
        return doc if isinstance(doc, dict) else {}

    def _legacy_live(self, doc: Mapping[str, Any]) -> bool:
        if doc.get("state") != "held":
            return False
        try:
            expires = datetime.fromisoformat(str(doc["expires_at"]))
        except (KeyError, ValueError):
            return False
        if expires <= datetime.now(UTC):
            return False
        return not (doc.get("host") == self.hostname and not pid_alive(int(doc.get("pid", 0) or 0)))

    async def acquire(self) -> bool:
        """Take the lease; ``False`` (with :attr:`holder` set) if another live run holds it."""
        legacy: dict[str, Any] | None = None
        if await self.lease.current_epoch() is None:
            legacy = await self._legacy()
            if legacy is not None and self._legacy_live(legacy):
                self.holder = {k: legacy.get(k) for k in ("run_id", "by", "host", "pid", "started_at")}
                self.holder["expires_at"] = legacy.get("expires_at")
                return False
        if not await self.lease.acquire(self._payload([])):
            self.holder = self.lease.holder
            return False
        prev = self.lease.previous if self.lease.previous is not None else legacy
        inherited: list[RunInfo] = []
        if prev:
            payload = prev.get("payload") if isinstance(prev.get("payload"), dict) else prev
            assert isinstance(payload, dict)
            inherited = [r for r in map(RunInfo.from_dict, payload.get("pending") or []) if r]
            crashed_doc = payload.get("run", prev) if "payload" in prev else prev
            crashed = RunInfo.from_dict(crashed_doc) if prev.get("state") == "held" else None
            if crashed is not None and crashed.run_id != self.me.run_id:
                log.warning(
                    "retention event=lease_taken_over run_id=%s host=%s pid=%s",
                    crashed.run_id,
                    crashed.host,
                    crashed.pid,
                )
                inherited.append(crashed)
        self.inherited = inherited
        if inherited:
            await self.lease.renew(self._payload(inherited))
        self._renewed = monotonic_time.monotonic()
        return True

    async def check(self) -> int:
        """Fencing: the token if this run still holds the lease, else :class:`LeaseLost`."""
        try:
            return await self.lease.check()
        except LeaseBaseLost as exc:
            raise LeaseLost(f"the retention lease was taken over by another worker ({exc})") from None

    async def renew_if_due(self) -> None:
        if self.lease.token is None or monotonic_time.monotonic() - self._renewed < self.ttl_s / 3:
            return
        try:
            await self.lease.renew(self._payload(self.inherited))
        except LeaseBaseLost as exc:
            raise LeaseLost(f"the retention lease was taken over by another worker ({exc})") from None
        self._renewed = monotonic_time.monotonic()

    async def release(self, pending: Sequence[RunInfo]) -> None:
        """Mark the lease free, handing on the runs whose audit record still has to be finished."""
        await self.lease.release(self._payload(pending))


# --------------------------------------------------------------------------------------------- sweep


@dataclass
class _Candidate:
    rec: Recording
    started_at: str


class RetentionSweep:
    """One retention run. ``progress(n_days_total)`` is called once when the day prefixes are known and
    ``on_day()`` after each; see the module docstring for everything else."""

    def __init__(
        self,
        store: ObjectStore,
        events: EventSink,
        audit: AuditLog,
        *,
        days: int,
        tz: ZoneInfo,
        dry_run: bool = False,
        now: datetime | None = None,
        batch_size: int = MAX_BATCH,
        use_lease: bool = True,
        lease_ttl_s: float = 600.0,
        concurrency: int = 16,
        on_days: Callable[[int], None] | None = None,
        on_day: Callable[[date], None] | None = None,
    ) -> None:
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch size must be 1..{MAX_BATCH}, got {batch_size}")
        self.store = store
        self.events = events
        self.audit = audit
        self.dry_run = dry_run
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.use_lease = use_lease and not dry_run
        self.on_days = on_days
        self.on_day = on_day
        started = (now or datetime.now(UTC)).astimezone(UTC)
        run_id = f"{started:%Y%m%dT%H%M%S}-{new_id()}"
        self.report = SweepReport(
            run_id=run_id,
            started_at=started,
            cutoff=cutoff_for(started, days, tz),
            days=days,
            dry_run=dry_run,
        )
        if not dry_run:
            self.report.audit_key = audit_key(started, run_id.rsplit("-", 1)[1])
        self.me = RunInfo(
            run_id=run_id,
            audit_key=self.report.audit_key,
            started_at=started.isoformat(timespec="milliseconds"),
            by=audit.by,
            host=audit.host,
            pid=os.getpid(),
        )
        self.lease = RetentionLease(store, self.me, ttl_s=lease_ttl_s, hostname=audit.host)
        # The guard checks hold records itself; legal holds only in a dry run (see module docstring).
        self.guard = DeletionGuard(store, check_legal_hold=dry_run)
        self._pending: list[_Candidate] = []
        self._journal_n = 0
        self._purged_ids: set[str] = set()
        #: Versions deleted while a hold on their call was being placed (see DeletionGuard).
        self._raced: set[ObjectRef] = set()
        self._inflight: asyncio.Future[None] | None = None

    # -- the run

    async def run(self) -> SweepReport:
        r = self.report
        if self.use_lease and not await self.lease.acquire():
            r.status = "busy"
            r.lease_holder = self.lease.holder
            r.finished_at = datetime.now(UTC)
            log.info("retention event=busy holder=%s", (r.lease_holder or {}).get("run_id"))
            await self._write_audit(r)
            self._emit("retention.completed", status=r.status, run_id=r.run_id, **r.counts())
            return r
        self._emit(
            "retention.started", cutoff=r.cutoff.isoformat(), days=r.days, dry_run=r.dry_run, run_id=r.run_id
        )
        pending_runs = list(self.lease.inherited)
        try:
            try:
                for day in await self._days():
                    await self._sweep_day(day)
                    r.days_walked += 1
                    if self.on_day is not None:
                        self.on_day(day)
                    await self.lease.renew_if_due()
                await self._flush()
                pending_runs = await self._finish_crashed(pending_runs)
                r.status = "completed"
            except LeaseLost as exc:
                r.status, r.error = "lost_lease", str(exc)
                raise
            except asyncio.CancelledError:
                r.status, r.error = "interrupted", "cancelled"
                raise
            except StorageError as exc:
                r.status, r.error = "failed", str(exc)
                raise
        finally:
            r.finished_at = datetime.now(UTC)
            with contextlib.suppress(Exception):
                await asyncio.shield(self._close(pending_runs))
        return r

    async def _close(self, pending_runs: list[RunInfo]) -> None:
        """Audit record, lease release and the summary event — best effort after a failure."""
        r = self.report
        if self._inflight is not None and not self._inflight.done():
            with contextlib.suppress(Exception):
                await self._inflight
        if r.status == "lost_lease" and await self._audit_written(r.audit_key):
            # The worker that took the lease over already finished our record from our journal.
            written = True
        else:
            written = await self._write_audit(r)
        if self.use_lease and r.status != "lost_lease":
            # Our own record not written (S3 down)? Hand our run on so the next run finishes it.
            with contextlib.suppress(StorageError):
                await self.lease.release(pending_runs + ([] if written else [self.me]))
        self._emit("retention.completed", status=r.status, run_id=r.run_id, **r.counts())

    async def _audit_written(self, key: str) -> bool:
        """Whether ``key`` exists, by listing (the retention role may not read audit records)."""
        with contextlib.suppress(StorageError):
            async for obj in self.store.list_prefix(key):
                if obj.key == key:
                    return True
        return False

    async def _write_audit(self, r: SweepReport) -> bool:
        if r.dry_run:
            return True
        record = self.audit.new(
            "purge",
            reason=f"retention: calls started before {r.cutoff.isoformat()} ({r.days} days)",
            result=r.status,
            target={"cutoff": r.cutoff.isoformat(), "days": r.days, "run_id": r.run_id},
            details={
                "counts": r.counts(),
                "error": r.error,
                "purged": [asdict(p) for p in r.purged],
                "skipped": [asdict(s) for s in r.skipped],
                "problems": [asdict(p) for p in r.problems],
                "lease_holder": r.lease_holder,
                "recovered_runs": r.recovered_runs,
                "finished_at": r.finished_at.isoformat(timespec="milliseconds") if r.finished_at else None,
            },
            at=r.started_at,
            record_id=r.run_id.rsplit("-", 1)[1],
        )
        try:
            await self.audit.write(record)
        except StorageError as exc:
            log.error("retention event=audit_not_written run_id=%s error=%s", r.run_id, exc)
            return False
        return True

    def _emit(self, event: str, call_id: str | None = None, /, **fields: Any) -> None:
        self.events.emit(event, call_id, **fields)
        if event == "retention.completed":
            metrics.observe_retention(str(fields.get("status")), fields, dry_run=self.report.dry_run)

    # -- the walk

    async def _days(self) -> list[date]:
        last = last_day_to_walk(self.report.cutoff)
        found: list[date] = []
        for ydir in await self.store.list_dirs(RECORDINGS_PREFIX, versions=True):
            y = day_of_prefix(ydir, 1)
            if y is None or y[0] > last.year:
                continue
            for mdir in await self.store.list_dirs(ydir, versions=True):
                ym = day_of_prefix(mdir, 2)
                if ym is None or ym > (last.year, last.month):
                    continue
                for ddir in await self.store.list_dirs(mdir, versions=True):
                    ymd = day_of_prefix(ddir, 3)
                    if ymd is None:
                        continue
                    try:
                        day = date(*ymd)
                    except ValueError:
                        continue
                    if day <= last:
                        found.append(day)
        found.sort()
        if self.on_days is not None:
            self.on_days(len(found))
        return found

    async def _sweep_day(self, day: date) -> None:
        prefix = day_prefix(day)
        recs: dict[str, Recording] = {}
        async for obj in self.store.list_prefix(prefix, versions=True):
            parsed = parse_recording_key(obj.key)
            if parsed is None or parsed.day != day or obj.key.count("/") != prefix.count("/"):
                self._problem(obj.key, "not a recording key (left alone)")
                continue
            rec = recs.setdefault(parsed.call_id, Recording(parsed.call_id, day))
            (rec.audio if parsed.kind == "wav" else rec.metadata).append(obj)
        items = list(recs.values())
        for start in range(0, len(items), self.concurrency):
            chunk = items[start : start + self.concurrency]
            for rec, verdict in zip(
                chunk, await asyncio.gather(*(self._judge(r) for r in chunk)), strict=True
            ):
                self.report.recordings_seen += 1
                if isinstance(verdict, Problem):
                    self._problem(verdict.key, verdict.problem)
                elif verdict is None:
                    self.report.recordings_kept += 1
                else:
                    self._pending.append(_Candidate(rec, verdict))
                    if self._pending_refs() >= self.batch_size:
                        await self._flush()

    async def _judge(self, rec: Recording) -> str | Problem | None:
        """The ``started_at`` of a recording to purge; ``None`` to keep it; a :class:`Problem`."""
        problem = rec.metadata_problem()
        if problem is not None:
            return Problem(rec.metadata_key, problem)
        try:
            data = await self.store.get_bytes(rec.metadata_key)
        except StorageError as exc:
            if exc.code != "TooLarge":
                raise  # the server is away or refuses: the run fails and says so
            return Problem(rec.metadata_key, "metadata unreadable: larger than 16 MiB (not read)")
        if data is None:
            return None  # gone since listed (another worker, an admin delete): nothing to do
        try:
            doc = parse_metadata(data, rec.call_id)
            started = started_of(doc)
        except ValueError as exc:  # CorruptMetadata, or anything the parser's checks let through
            return Problem(rec.metadata_key, f"metadata unreadable: {exc}")
        if started >= self.report.cutoff:
            return None
        return str(doc["started_at"])

    def _problem(self, key: str, problem: str) -> None:
        self.report.problems_total += 1
        if len(self.report.problems) >= MAX_PROBLEMS_LISTED:
            return  # counted; the first ones are listed, logged and published
        self.report.problems.append(Problem(key, problem))
        log.warning(
            "retention event=problem key=%s problem=%s",
            clean_log_value(key, max_chars=200),
            clean_log_value(problem, max_chars=120),
        )
        self._emit("retention.problem", None, key=key, problem=problem, run_id=self.report.run_id)

    def _pending_refs(self) -> int:
        return max(
            sum(len(c.rec.audio) for c in self._pending), sum(len(c.rec.metadata) for c in self._pending)
        )

    # -- deletion

    async def _guarded(self, refs: list[ObjectRef]) -> tuple[set[ObjectRef], list[Refusal]]:
        deleted: set[ObjectRef] = set()
        refused: list[Refusal] = []
        for start in range(0, len(refs), self.batch_size):
            outcome = await self.guard.delete(refs[start : start + self.batch_size], dry_run=self.dry_run)
            deleted.update(outcome.deleted)
            refused.extend(outcome.refused)
            for ref in outcome.raced:
                # A hold landed while this batch was deleting: what went is reported, never "kept".
                self._raced.add(ref)
                self._problem(ref.key, f"deleted while a hold was being placed (version {ref.version_id})")
        return deleted, refused

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        # Shielded: a cancellation (SIGTERM) must not cut a batch in half. A DeleteObjects already sent
        # completes in its thread anyway; its outcome has to reach the report (and so the audit record),
        # which _close() ensures by awaiting this task first.
        self._inflight = asyncio.ensure_future(self._delete_batch(batch))
        await asyncio.shield(self._inflight)

    async def _delete_batch(self, batch: list[_Candidate]) -> None:
        r = self.report
        if self.use_lease:
            # Fencing: a run that lost the lease (paused past its expiry, taken over) deletes nothing more.
            await self.lease.renew_if_due()
            await self.lease.check()
        if not self.dry_run:
            await self._journal(batch)
        audio_refs = [ref for c in batch for ref in c.rec.refs(c.rec.audio)]
        audio_deleted, audio_refused = await self._guarded(audio_refs)
        why: dict[str, str] = {}
        for refusal in audio_refused:
            parsed = parse_recording_key(refusal.ref.key)
            if parsed is not None:
                why.setdefault(parsed.call_id, refusal.reason)
        # Metadata goes only where the audio is entirely gone: never audio left without its metadata.
        meta_refs = [ref for c in batch if c.rec.call_id not in why for ref in c.rec.refs(c.rec.metadata)]
        meta_deleted, meta_refused = await self._guarded(meta_refs)
        audio_gone = {p.call_id: ref.key for ref in audio_deleted if (p := parse_recording_key(ref.key))}
        for refusal in meta_refused:
            parsed = parse_recording_key(refusal.ref.key)
            if parsed is not None:
                if parsed.call_id not in why and parsed.call_id in audio_gone:
                    # Its audio went in this batch, then its metadata was refused: a hold that came
                    # while the sweep ran. The audio is not "kept": say what was lost.
                    self._problem(
                        audio_gone[parsed.call_id],
                        f"audio deleted, then its metadata was refused ({refusal.reason}): "
                        "a hold placed during the sweep came too late for the audio",
                    )
                why.setdefault(parsed.call_id, f"metadata kept: {refusal.reason}")
        r.objects_refused += len(audio_refused) + len(meta_refused)
        if not self.dry_run:
            r.objects_deleted += len(audio_deleted) + len(meta_deleted)
        raced_calls = {p.call_id for ref in self._raced if (p := parse_recording_key(ref.key)) is not None}
        for c in batch:
            reason = why.get(c.rec.call_id)
            if reason is not None:
                if c.rec.call_id in raced_calls:
                    reason = f"audio deleted before a concurrent hold landed; {reason}"
                r.skipped.append(Skipped(c.rec.call_id, c.started_at, reason))
                continue
            refs = len(c.rec.audio) + len(c.rec.metadata)
            r.purged.append(Purged(c.rec.call_id, c.started_at, refs))
            self._purged_ids.add(c.rec.call_id)
            if not self.dry_run:
                self._emit(
                    "retention.purged", c.rec.call_id, started_at=c.started_at, objects=refs, run_id=r.run_id
                )
        log.info(
            "retention event=batch run_id=%s recordings=%d skipped=%d dry_run=%s",
            r.run_id,
            len(batch),
            sum(1 for c in batch if c.rec.call_id in why),
            self.dry_run,
        )

    async def _journal(self, batch: list[_Candidate]) -> None:
        self._journal_n += 1
        doc = {
            "schema": JOURNAL_SCHEMA,
            "run_id": self.report.run_id,
            "batch": self._journal_n,
            "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "recordings": [
                {"call_id": c.rec.call_id, "started_at": c.started_at, "metadata_key": c.rec.metadata_key}
                for c in batch
            ],
        }
        key = f"{RETENTION_PREFIX}runs/{self.report.run_id}/{self._journal_n:06d}.json"
        await self.store.put_bytes(key, json.dumps(doc, ensure_ascii=False).encode(), metadata={})

    # -- crashed runs

    async def _finish_crashed(self, runs: list[RunInfo]) -> list[RunInfo]:
        """Write the audit record of each crashed run from its journal; returns those still pending."""
        left: list[RunInfo] = []
        for run in runs:
            try:
                summary = await self._finish_one(run)
            except StorageError as exc:
                log.error("retention event=recovery_failed run_id=%s error=%s", run.run_id, exc)
                left.append(run)
                continue
            self.report.recovered_runs.append(summary)
        return left

    async def _finish_one(self, run: RunInfo) -> dict[str, Any]:
        # Whether the crashed run's own record exists, by listing its key: the retention role may list the
        # bucket but not read audit records (a HEAD needs s3:GetObject), so on a server that enforces the
        # policy a HEAD was refused and the crashed run's deletions were never audited.
        async for obj in self.store.list_prefix(run.audit_key):
            if obj.key == run.audit_key:
                return {"run_id": run.run_id, "audit_key": run.audit_key, "note": "record already written"}
        purged: list[dict[str, Any]] = []
        not_deleted = 0
        async for obj in self.store.list_prefix(f"{RETENTION_PREFIX}runs/{run.run_id}/"):
            data = await self.store.get_bytes(obj.key)
            try:
                entries = json.loads(data or b"{}").get("recordings") or []
            except (ValueError, AttributeError):
                entries = []
            for entry in entries:
                cid = str(entry.get("call_id", ""))
                if cid in self._purged_ids:
                    continue  # this run deleted it: listed in this run's record
                if await self.store.stat(str(entry.get("metadata_key", ""))) is None:
                    purged.append({"call_id": cid, "started_at": entry.get("started_at")})
                else:
                    not_deleted += 1
        started = datetime.fromisoformat(run.started_at)
        record = AuditRecord(
            id=run.audit_key.rsplit("-", 1)[1].removesuffix(".json"),
            at=started.astimezone(UTC).isoformat(timespec="milliseconds"),
            action="purge",
            by=run.by,
            host=run.host,
            reason="retention run interrupted (process died); record completed from its journal",
            result="interrupted",
            target={"run_id": run.run_id},
            details={
                "counts": {"purged": len(purged), "journaled_not_deleted": not_deleted},
                "purged": purged,
                "completed_by_run": self.report.run_id,
            },
            key=run.audit_key,
        )
        await self.audit.write(record)
        log.warning("retention event=crashed_run_recorded run_id=%s purged=%d", run.run_id, len(purged))
        return {"run_id": run.run_id, "audit_key": run.audit_key, "purged": len(purged)}
