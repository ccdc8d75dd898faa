"""Audit records: who did what, when, why, to which recordings — in S3 and on MQTT.

One record per admin action and per retention run, at ``audit/YYYY/MM/DD/<timestamp>-<id>.json`` (UTC
date and time of the action, so keys sort by time), schema ``kasuhara.audit/1``. The same facts, without
long lists, go to MQTT as ``audit.<action>`` (topic ``<prefix>/audit/<action>``).

The S3 record is the durable one. MQTT is a notification: :class:`CommandEvents` publishes from a
short-lived command (QoS 1) and gives up quickly when the broker is down, saying so on stderr, rather
than making an admin wait. It deliberately does not use :class:`~kasuhara_ari.events.MqttEvents`, whose
retained ``<prefix>/status`` and last will belong to the long-running service: a CLI run would otherwise
announce the service offline when it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import getpass
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiomqtt

from . import metrics, mqtt_client
from .config import Config, MqttConfig
from .events import (
    EventNameError,
    EventSink,
    build_payload,
    check_prefix,
    encode,
    mqtt_tls_context,
    topic_for,
)
from .safe import REASON_MAX_CHARS, clean_caller_text
from .search import utc_days
from .storage import AUDIT_PREFIX, META_SHA256, ObjectStore, PreconditionFailed, PutResult, StorageError

log = logging.getLogger(__name__)

AUDIT_SCHEMA = "kasuhara.audit/1"
#: Every action that writes a record. ``purge`` is a retention run; ``play`` is listening through a
#: console (evidence/desk.py), audited apart from ``download``.
ACTIONS = (
    "list",
    "show",
    "play",
    "download",
    "export",
    "hold",
    "release",
    "delete",
    "purge",
    "callers_add",
    "callers_remove",
    # console accounts (kasuhara users): target = the user name, never a password or hash
    "user_add",
    "user_passwd",
    "user_disable",
    "user_enable",
    "user_role",
    "user_endpoint",
    # a console user joined a live call from the board (listen/whisper/barge): target = the call_id
    "supervise",
    # care for agents (kasuhara care): target = the agent's endpoint name (a note's text stays in its object)
    "care_report",
    "care_note",
    "care_resume",
    # the training library (kasuhara training): target = the clip id; the source call id only in
    # training_add's record (the audit log is admin-readable, like training-sources/)
    "training_add",
    "training_list",
    "training_play",
    "training_export",
)
_KEY_RE = re.compile(
    r"audit/(?P<y>[0-9]{4})/(?P<m>[0-9]{2})/(?P<d>[0-9]{2})/"
    r"(?P<ts>[0-9]{8}T[0-9]{6}\.[0-9]{3}Z)-(?P<id>[0-9a-f]{8,32})\.json"
)
#: Audit records of big purges list every recording deleted; reading one is allowed to be this large.
MAX_RECORD_BYTES = 256 * 1024 * 1024


def actor(cfg: Config) -> str:
    """Who is acting: ``admin.name`` from the config, else the OS user."""
    name = cfg.admin.name.strip()
    if not name:
        try:
            name = getpass.getuser()
        except (KeyError, OSError):
            name = f"uid:{os.getuid()}"
    return clean_caller_text(name, max_chars=200) or "unknown"


def new_id() -> str:
    return secrets.token_hex(6)


def audit_key(at: datetime, record_id: str) -> str:
    """``audit/YYYY/MM/DD/<YYYYMMDDTHHMMSS.mmmZ>-<id>.json`` for a record made at ``at``."""
    t = at.astimezone(UTC)
    stamp = t.strftime("%Y%m%dT%H%M%S") + f".{t.microsecond // 1000:03d}Z"
    return f"{AUDIT_PREFIX}{t:%Y/%m/%d}/{stamp}-{record_id}.json"


def is_audit_key(key: str) -> bool:
    return _KEY_RE.fullmatch(key) is not None


@dataclass(frozen=True)
class AuditRecord:
    """One audited action. ``target`` says on what (call ids, keys, a date range); ``details`` carries
    action-specific facts (sha256 of a download, the recordings a purge deleted)."""

    id: str
    at: str
    action: str
    by: str
    host: str
    reason: str
    result: str
    target: Mapping[str, Any] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)
    key: str = ""
    #: The record's link in its writer's hash chain (:class:`ChainLink` as a dict); set by
    #: :meth:`AuditLog.write`. ``None``: written before chains existed (or not written yet).
    chain: Mapping[str, Any] | None = None

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "schema": AUDIT_SCHEMA,
            "id": self.id,
            "at": self.at,
            "action": self.action,
            "by": self.by,
            "host": self.host,
            "reason": self.reason,
            "result": self.result,
            "target": dict(self.target),
            "details": dict(self.details),
        }
        if self.chain is not None:
            doc["chain"] = dict(self.chain)
        return json.dumps(doc, ensure_ascii=False, indent=1, default=str).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes, key: str = "") -> AuditRecord:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("schema") != AUDIT_SCHEMA:
            raise ValueError("not a kasuhara.audit/1 record")
        return cls(
            id=str(doc.get("id", "")),
            at=str(doc.get("at", "")),
            action=str(doc.get("action", "")),
            by=str(doc.get("by", "")),
            host=str(doc.get("host", "")),
            reason=str(doc.get("reason", "")),
            result=str(doc.get("result", "")),
            target=doc.get("target") or {},
            details=doc.get("details") or {},
            key=key,
            chain=doc["chain"] if isinstance(doc.get("chain"), dict) else None,
        )

    def event_fields(self) -> dict[str, Any]:
        """What goes to MQTT: the record without ``details`` (which can list thousands of recordings)
        but with the counts found there; the record's ``target`` is sent as ``subject``."""
        fields: dict[str, Any] = {
            "id": self.id,
            "at": self.at,
            "action": self.action,
            "by": self.by,
            "host": self.host,
            "reason": self.reason,
            "result": self.result,
            "audit_key": self.key,
        }
        # ``subject`` (not ``target``, which in kasuhara.event/1 is a call's dialled target).
        subject = {k: v for k, v in self.target.items() if not isinstance(v, list) or len(v) <= 20}
        subject.update({f"{k}_count": len(v) for k, v in self.target.items() if isinstance(v, list)})
        fields["subject"] = subject
        counts = self.details.get("counts")
        if isinstance(counts, Mapping):
            fields["counts"] = dict(counts)
        return fields


class AuditLog:
    """Writes and reads audit records; each write is also emitted as ``audit.<action>``."""

    def __init__(self, store: ObjectStore, events: EventSink, *, by: str, host: str | None = None) -> None:
        self.store = store
        self.events = events
        self.by = by
        self.host = host or socket.gethostname()

    def new(
        self,
        action: str,
        *,
        reason: object = "",
        result: str = "done",
        target: Mapping[str, Any] | None = None,
        details: Mapping[str, Any] | None = None,
        at: datetime | None = None,
        record_id: str | None = None,
        by: str | None = None,
        host: str | None = None,
    ) -> AuditRecord:
        if action not in ACTIONS:
            raise ValueError(f"unknown audit action {action!r}")
        when = (at or datetime.now(UTC)).astimezone(UTC)
        rid = record_id or new_id()
        return AuditRecord(
            id=rid,
            at=when.isoformat(timespec="milliseconds"),
            action=action,
            by=by or self.by,
            host=host or self.host,
            reason=clean_caller_text(reason, max_chars=REASON_MAX_CHARS) or "",
            result=result,
            target=dict(target or {}),
            details=dict(details or {}),
            key=audit_key(when, rid),
        )

    async def write(self, record: AuditRecord) -> AuditRecord:
        """Link the record into this writer's hash chain and store it (raises :class:`StorageError` if
        S3 refuses), then emit it. Returns the record as stored, with its ``chain`` link."""
        try:
            record, sha = await AuditChain(self.store, by=self.by, host=self.host).append(record)
        except StorageError:
            metrics.AUDIT_WRITE_FAILURES.inc()
            raise
        call_id = record.target.get("call_id")
        fields = record.event_fields()
        if record.chain is not None:
            # Subscribers that keep these hold an anchor outside the bucket: a rewritten chain shows.
            fields["chain"] = {"id": record.chain.get("id"), "seq": record.chain.get("seq"), "sha256": sha}
        self.events.emit(f"audit.{record.action}", call_id if isinstance(call_id, str) else None, **fields)
        log.info("audit event=written action=%s result=%s key=%s", record.action, record.result, record.key)
        return record

    async def records(
        self,
        start: datetime,
        end: datetime,
        *,
        action: str | None = None,
        on_day: Callable[[date], None] | None = None,
        on_problem: Callable[[str, str], None] | None = None,
    ) -> AsyncIterator[AuditRecord]:
        """Records made in [start, end] (inclusive), oldest first; one LIST per UTC day + one GET each."""
        for day in utc_days(start, end):
            async for obj in self.store.list_prefix(f"{AUDIT_PREFIX}{day:%Y/%m/%d}/"):
                if not is_audit_key(obj.key):
                    continue
                try:
                    data = await self.store.get_bytes(obj.key, max_bytes=MAX_RECORD_BYTES)
                except StorageError as exc:
                    if exc.code != "TooLarge":
                        raise
                    if on_problem is not None:
                        on_problem(obj.key, "too large to read")
                    continue
                if data is None:
                    continue
                try:
                    record = AuditRecord.from_json(data, obj.key)
                    at = datetime.fromisoformat(record.at)
                    # Bucket writers choose these bytes: a naive or out-of-range `at` cannot be placed
                    # in the range (and comparing it would raise), deep nesting must not end the listing.
                    if at.tzinfo is None:
                        raise ValueError(f"at has no UTC offset: {record.at[:40]!r}")
                    at.astimezone(UTC)
                except (ValueError, OverflowError, RecursionError) as exc:
                    if on_problem is not None:
                        on_problem(obj.key, f"unreadable: {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                if start <= at <= end and (action is None or record.action == action):
                    yield record
            if on_day is not None:
                on_day(day)


# --------------------------------------------------------------------------------------------- chains
#
# Each writer (``by`` + ``host`` of an :class:`AuditLog`) keeps one hash chain: every record it writes
# carries ``chain = {id, seq, prev_key, prev_sha256, writer}``, the sha256 being of the previous record's
# exact stored bytes. The chain's head, ``audit-chains/<id>.json``, names the last record (seq, key,
# sha256). A record is appended head first: the head is advanced with a conditional write (If-Match on
# the etag read, If-None-Match for a new chain), so two processes of the same writer never both take a
# sequence number (the loser re-reads and retries); only then is the record written. A record write that
# fails puts the head back, so an S3 outage leaves no gap. The heads live outside ``audit/`` so that a
# listing of ``audit/`` still yields only records. A local lock (flock, per OS user and chain) orders the
# writer's processes on this host as well: Ceph RGW 16 refuses every If-Match on a versioned bucket, and
# there the head is written under that lock alone (see :meth:`AuditChain._advance`).

AUDIT_CHAINS_PREFIX = "audit-chains/"
CHAIN_SCHEMA = "kasuhara.audit-chain/1"
#: User metadata on a head (what a writer needs, in one HEAD request).
_META_SEQ, _META_LAST_KEY, _META_LAST_SHA = "chain-seq", "chain-last-key", "chain-last-sha256"
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_CHAIN_ID_RE = re.compile(r"[0-9a-f]{16}")


class ChainBusy(StorageError):
    """The chain head kept changing under us (another process of the same writer is very busy)."""


def chain_id(by: str, host: str) -> str:
    """A writer's chain: 16 hex digits of sha256(by, host) — safe in a key whatever ``by`` holds."""
    return hashlib.sha256(f"{by}\n{host}".encode()).hexdigest()[:16]


def chain_head_key(cid: str) -> str:
    if _CHAIN_ID_RE.fullmatch(cid) is None:
        raise ValueError(f"not a chain id: {cid[:40]!r}")
    return f"{AUDIT_CHAINS_PREFIX}{cid}.json"


@dataclass(frozen=True)
class ChainHead:
    """``audit-chains/<id>.json``: the last record of one writer's chain (seq 0: none yet)."""

    chain: str
    seq: int
    last_key: str
    last_sha256: str
    by: str = ""
    host: str = ""
    since: str = ""
    updated_at: str = ""

    def to_json(self) -> bytes:
        doc = {"schema": CHAIN_SCHEMA, **dataclasses.asdict(self)}
        return json.dumps(doc, ensure_ascii=False, indent=1).encode("utf-8")

    def metadata(self) -> dict[str, str]:
        return {_META_SEQ: str(self.seq), _META_LAST_KEY: self.last_key, _META_LAST_SHA: self.last_sha256}

    @classmethod
    def from_json(cls, data: bytes) -> ChainHead:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("schema") != CHAIN_SCHEMA:
            raise ValueError("not a kasuhara.audit-chain/1 head")
        seq = doc.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise ValueError("head has no valid seq")
        return cls(
            chain=str(doc.get("chain", "")),
            seq=seq,
            last_key=str(doc.get("last_key", "")),
            last_sha256=str(doc.get("last_sha256", "")),
            by=str(doc.get("by", "")),
            host=str(doc.get("host", "")),
            since=str(doc.get("since", "")),
            updated_at=str(doc.get("updated_at", "")),
        )

    @classmethod
    def from_metadata(cls, cid: str, meta: Mapping[str, str]) -> ChainHead | None:
        try:
            seq = int(meta[_META_SEQ])
        except (KeyError, ValueError):
            return None
        return cls(cid, seq, meta.get(_META_LAST_KEY, ""), meta.get(_META_LAST_SHA, ""))


_LOCKS: dict[tuple[int, str], asyncio.Lock] = {}
_WARNED: set[int] = set()


def _warn_no_conditional_writes(store: ObjectStore) -> None:
    if id(store) not in _WARNED:
        _WARNED.add(id(store))
        log.warning("audit event=conditional_write_refused bucket=%s fallback=local_lock", store.bucket)


def _lock_file(cid: str) -> int | None:
    """This user's lock file of chain ``cid`` (``/tmp/kasuhara-audit-<uid>/``, 700), locked; ``None``
    while another process holds it. Raises ``OSError`` when the directory is not ours."""
    directory = Path(tempfile.gettempdir()) / f"kasuhara-audit-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)
    st = directory.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise OSError(f"{directory} is not a private directory of this user")
    fd = os.open(directory / f"{cid}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextlib.asynccontextmanager
async def _writer_lock(cid: str, wait_s: float = 30.0) -> AsyncIterator[None]:
    """Orders one writer's appends within this process (asyncio) and between its processes on this
    host (flock), besides the server's conditional write — which not every server honours. Polls, so
    a cancelled append never leaves the lock taken; after ``wait_s`` it goes on without (logged)."""
    lock = _LOCKS.setdefault((id(asyncio.get_running_loop()), cid), asyncio.Lock())
    async with lock:
        fd: int | None = None
        try:
            for _ in range(max(1, int(wait_s / 0.01))):
                if (fd := _lock_file(cid)) is not None:
                    break
                await asyncio.sleep(0.01)
        except OSError as exc:
            log.warning("audit event=no_local_lock chain=%s error=%s", cid, exc)
        if fd is None:
            log.warning("audit event=local_lock_busy chain=%s waited_s=%.0f", cid, wait_s)
        try:
            yield
        finally:
            if fd is not None:
                os.close(fd)


class AuditChain:
    """Appends records to one writer's chain (see the section comment for the protocol)."""

    def __init__(self, store: ObjectStore, *, by: str, host: str, attempts: int = 20) -> None:
        self.store = store
        self.by = by
        self.host = host
        self.id = chain_id(by, host)
        self.head_key = chain_head_key(self.id)
        self.attempts = attempts

    async def head(self) -> tuple[ChainHead | None, str | None]:
        """The current head and its etag (``None, None``: the chain has no head yet)."""
        info = await self.store.stat(self.head_key)
        if info is None:
            return None, None
        head = ChainHead.from_metadata(self.id, info.metadata)
        if head is None:  # a server that dropped the user metadata: read the body
            data = await self.store.get_bytes(self.head_key)
            try:
                head = ChainHead.from_json(data or b"")
            except (ValueError, RecursionError):
                raise StorageError(
                    f"audit chain head {self.head_key} is unreadable", code="BadHead"
                ) from None
        return head, info.etag

    async def append(self, record: AuditRecord) -> tuple[AuditRecord, str]:
        """Store ``record`` as the chain's next link; returns it (with ``chain``) and its sha256."""
        async with _writer_lock(self.id):
            return await self._append(record)

    async def _advance(self, new_head: ChainHead, etag: str | None) -> PutResult | None:
        """Move the head to ``new_head`` if it is still at ``etag``; ``None`` if someone else moved it."""
        body, meta = new_head.to_json(), new_head.metadata()
        try:
            return await self.store.put_bytes_if(
                self.head_key, body, metadata=meta, if_match=etag, if_none_match=etag is None
            )
        except PreconditionFailed:
            if etag is None or not await self._still_at(etag):
                return None
        # The head is exactly as read, yet the server refused the If-Match: Ceph RGW 16 refuses every
        # If-Match on a versioned bucket (and ignores If-None-Match). Only the local lock orders this
        # writer's processes there; a fork from elsewhere is reported by `audit verify`.
        _warn_no_conditional_writes(self.store)
        return await self.store.put_bytes(self.head_key, body, metadata=meta, content_type="application/json")

    async def _still_at(self, etag: str) -> bool:
        info = await self.store.stat(self.head_key)
        return info is not None and info.etag.strip('"') == etag.strip('"')

    async def _append(self, record: AuditRecord) -> tuple[AuditRecord, str]:
        for attempt in range(self.attempts):
            head, etag = await self.head()
            now = datetime.now(UTC).isoformat(timespec="milliseconds")
            prev = head if head is not None and head.seq > 0 else None
            seq = (head.seq if head is not None else 0) + 1
            link = {
                "id": self.id,
                "seq": seq,
                "prev_key": prev.last_key if prev else None,
                "prev_sha256": prev.last_sha256 if prev else None,
                "writer": {"by": self.by, "host": self.host},
            }
            linked = dataclasses.replace(record, chain=link)
            data = linked.to_json()
            sha = hashlib.sha256(data).hexdigest()
            new_head = ChainHead(
                self.id,
                seq,
                record.key,
                sha,
                by=self.by,
                host=self.host,
                since=head.since if head is not None and head.since else now,
                updated_at=now,
            )
            claimed = await self._advance(new_head, etag)
            if claimed is None:  # another process of this writer moved the head first: read it again
                await asyncio.sleep(secrets.randbelow(20 * (attempt + 1)) / 1000)
                continue
            try:
                await self.store.put_bytes(
                    record.key, data, metadata={META_SHA256: sha}, content_type="application/json"
                )
            except StorageError:
                if await self._landed(record.key, sha):
                    return linked, sha
                await self._put_back(head, claimed.etag)
                raise
            return linked, sha
        raise ChainBusy(f"audit chain {self.id}: head changed {self.attempts} times in a row", code="Busy")

    async def _landed(self, key: str, sha: str) -> bool:
        """Whether a write that reported an error was stored all the same (a lost answer)."""
        try:
            info = await self.store.stat(key)
        except StorageError:
            return False
        return info is not None and info.metadata.get(META_SHA256) == sha

    async def _put_back(self, head: ChainHead | None, etag: str) -> None:
        """Undo a claimed head whose record was not stored (best effort: else a gap is reported)."""
        back = head or ChainHead(self.id, 0, "", "", by=self.by, host=self.host)
        try:
            await self._advance(back, etag)
        except StorageError as exc:
            log.error("audit event=chain_gap chain=%s head=%s error=%s", self.id, self.head_key, exc)


# --------------------------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class Finding:
    """One thing ``audit verify`` found wrong. ``kind``: edited, missing, reordered, moved, fork,
    unreadable, unchained, head_missing, head_mismatch, head_behind."""

    kind: str
    key: str
    detail: str
    chain: str = ""

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclass
class ChainSummary:
    chain: str
    by: str = ""
    host: str = ""
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    head_seq: int | None = None
    #: The range ends before the chain does: its last record in range is vouched for by nothing read.
    open_end: bool = False
    problems: int = 0


@dataclass
class VerifyReport:
    records: int = 0
    chains: dict[str, ChainSummary] = field(default_factory=dict)
    legacy: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "chains": [dataclasses.asdict(c) for c in self.chains.values()],
            "legacy": self.legacy,
            "findings": [f.as_dict() for f in self.findings],
        }


@dataclass(frozen=True)
class _Entry:
    key: str
    sha256: str
    at: datetime
    chain: str
    seq: int
    prev_key: str | None
    prev_sha256: str | None
    by: str
    host: str


def _entry(key: str, data: bytes) -> _Entry | None:
    """A record's facts for verification; ``None`` for a record without a chain (legacy). Raises
    ``ValueError`` for anything unreadable or malformed."""
    try:
        record = AuditRecord.from_json(data, key)
    except RecursionError:
        raise ValueError("nested too deeply to read") from None
    at = datetime.fromisoformat(record.at)
    if at.tzinfo is None:
        raise ValueError("its 'at' has no UTC offset")
    try:
        at = at.astimezone(UTC)
    except OverflowError:
        raise ValueError("its 'at' is out of range") from None
    if record.chain is None:
        return None
    link = record.chain
    cid, seq = link.get("id"), link.get("seq")
    if not isinstance(cid, str) or _CHAIN_ID_RE.fullmatch(cid) is None:
        raise ValueError("its chain id is malformed")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise ValueError("its chain seq is malformed")
    prev_key, prev_sha = link.get("prev_key"), link.get("prev_sha256")
    writer = link.get("writer") if isinstance(link.get("writer"), dict) else {}
    assert isinstance(writer, dict)
    return _Entry(
        key=key,
        sha256=hashlib.sha256(data).hexdigest(),
        at=at,
        chain=cid,
        seq=seq,
        prev_key=prev_key if isinstance(prev_key, str) else None,
        prev_sha256=prev_sha if isinstance(prev_sha, str) else None,
        by=str(writer.get("by", "")),
        host=str(writer.get("host", "")),
    )


def _shown(value: object) -> str:
    """Untrusted text (a key named inside a record) as one safe line."""
    return clean_caller_text("" if value is None else value, max_chars=200) or "-"


async def audit_days(store: ObjectStore, start: date | None, end: date | None) -> list[date]:
    """The UTC days under ``audit/`` that hold anything, within [start, end]: three levels of LIST."""
    days: list[date] = []
    for ydir in await store.list_dirs(AUDIT_PREFIX):
        for mdir in await store.list_dirs(ydir):
            for ddir in await store.list_dirs(mdir):
                parts = ddir[len(AUDIT_PREFIX) :].strip("/").split("/")
                try:
                    day = date(int(parts[0]), int(parts[1]), int(parts[2]))
                except (ValueError, IndexError):
                    continue
                if (start is None or day >= start) and (end is None or day <= end):
                    days.append(day)
    return sorted(days)


class AuditVerifier:
    """Walks the audit records of a range and the chain heads, and names every gap, edit, reorder,
    fork or deletion. Cost: a few LISTs for the days, one LIST + one GET per chain head, one GET per
    record (``concurrency`` at a time), one GET per record just outside the range that a chain names.

    ``start``/``end`` are datetimes (their UTC days are walked whole); ``None`` = the whole log. Only with
    ``end=None`` does a chain's head vouch for its last record (and a deleted tail show)."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        concurrency: int = 16,
        on_day: Callable[[date], None] | None = None,
    ) -> None:
        self.store = store
        self.start = start
        self.end = end
        self.on_day = on_day
        self._limit = asyncio.Semaphore(concurrency)
        self.report = VerifyReport()

    def _find(self, kind: str, key: str, detail: str, chain: str = "") -> None:
        self.report.findings.append(Finding(kind, _shown(key), detail, chain))
        if chain in self.report.chains:
            self.report.chains[chain].problems += 1

    async def _read(self, key: str) -> bytes | None:
        async with self._limit:
            return await self.store.get_bytes(key, max_bytes=MAX_RECORD_BYTES)

    async def _load(self, key: str) -> tuple[str, _Entry | str | None]:
        """(key, entry | None for legacy | "missing" | an error text)."""
        try:
            data = await self._read(key)
        except StorageError as exc:
            if exc.code != "TooLarge":
                raise
            return key, "too large to read"
        if data is None:
            return key, "missing"
        try:
            return key, _entry(key, data)
        except ValueError as exc:
            return key, f"unreadable: {str(exc)[:200]}"

    async def run(self) -> VerifyReport:
        entries: list[_Entry] = []
        unchained: list[tuple[str, datetime | None]] = []
        start_day = self.start.astimezone(UTC).date() if self.start else None
        end_day = self.end.astimezone(UTC).date() if self.end else None
        for day in await audit_days(self.store, start_day, end_day):
            keys = [o.key async for o in self.store.list_prefix(f"{AUDIT_PREFIX}{day:%Y/%m/%d}/")]
            for key in keys:
                if not is_audit_key(key):
                    self._find("unreadable", key, "not an audit record key (an object put there by hand?)")
            loaded = await asyncio.gather(*(self._load(k) for k in keys if is_audit_key(k)))
            for key, got in loaded:
                self.report.records += 1
                if isinstance(got, _Entry):
                    entries.append(got)
                elif got is None:
                    unchained.append((key, _key_time(key)))
                elif got != "missing":  # deleted between LIST and GET: not this walk's business
                    self._find("unreadable", key, got)
            if self.on_day is not None:
                self.on_day(day)
        # The heads are read after the records: a record appended while the walk ran is then behind its
        # head (checked through the head's link), never ahead of it (which would look like a rollback).
        heads = await self._heads()
        by_chain: dict[str, list[_Entry]] = {}
        for e in entries:
            by_chain.setdefault(e.chain, []).append(e)
        for cid in sorted(set(by_chain) | set(heads)):
            head = heads.get(cid)
            chain_entries = sorted(by_chain.get(cid, []), key=lambda e: (e.seq, e.key))
            summary = ChainSummary(chain=cid, head_seq=head.seq if isinstance(head, ChainHead) else None)
            if isinstance(head, ChainHead):
                summary.by, summary.host = head.by, head.host
            elif chain_entries:
                summary.by, summary.host = chain_entries[-1].by, chain_entries[-1].host
            self.report.chains[cid] = summary
            await self._check_chain(cid, chain_entries, head, summary)
        self._check_unchained(unchained, heads)
        return self.report

    async def _heads(self) -> dict[str, ChainHead | str]:
        heads: dict[str, ChainHead | str] = {}
        async for obj in self.store.list_prefix(AUDIT_CHAINS_PREFIX):
            cid = obj.key[len(AUDIT_CHAINS_PREFIX) :].removesuffix(".json")
            if _CHAIN_ID_RE.fullmatch(cid) is None or not obj.key.endswith(".json"):
                self._find("unreadable", obj.key, "not a chain head key")
                continue
            data = await self.store.get_bytes(obj.key)
            try:
                head = ChainHead.from_json(data or b"")
            except (ValueError, RecursionError) as exc:
                heads[cid] = f"unreadable head: {str(exc)[:200]}"
                continue
            if head.chain != cid:
                heads[cid] = f"the head names chain {_shown(head.chain)}"
                continue
            heads[cid] = head
        return heads

    async def _check_chain(
        self, cid: str, chain: list[_Entry], head: ChainHead | str | None, summary: ChainSummary
    ) -> None:
        if chain:
            summary.records = len(chain)
            summary.first_seq, summary.last_seq = chain[0].seq, chain[-1].seq
        by_seq: dict[int, _Entry] = {}
        for e in chain:
            own = audit_key(e.at, e.key.rsplit("-", 1)[1].removesuffix(".json"))
            if own != e.key:
                self._find(
                    "moved", e.key, f"its content belongs at {own}: records were swapped or moved", cid
                )
            if e.seq in by_seq:
                other = by_seq[e.seq]
                self._find("fork", e.key, f"seq {e.seq} is also taken by {other.key}", cid)
                continue
            by_seq[e.seq] = e
        prev_present: _Entry | None = None
        for e in sorted(by_seq.values(), key=lambda x: x.seq):
            await self._check_link(cid, e, by_seq.get(e.seq - 1), prev_present)
            prev_present = e
        if isinstance(head, str):
            self._find("head_mismatch", chain_head_key(cid), head, cid)
            return
        if head is None:
            if chain:
                self._find("head_missing", chain_head_key(cid), "the chain's head is gone (deleted?)", cid)
            return
        last = prev_present
        if last is None:
            if head.seq > 0 and self.start is None and self.end is None:
                await self._missing_tail(cid, head, 0)
            elif head.seq > 0:
                summary.open_end = True
            return
        if head.seq == last.seq:
            if head.last_key != last.key:
                self._find(
                    "reordered", last.key, f"the head names {_shown(head.last_key)} as seq {head.seq}", cid
                )
            elif head.last_sha256 != last.sha256:
                self._find("edited", last.key, "its content differs from the sha256 in the chain head", cid)
        elif head.seq > last.seq:
            if self.end is None:
                await self._missing_tail(cid, head, last.seq)
            else:
                summary.open_end = True
        else:
            self._find(
                "head_behind",
                chain_head_key(cid),
                f"the head says seq {head.seq} but {last.key} is seq {last.seq} (head rolled back?)",
                cid,
            )

    async def _check_link(
        self, cid: str, e: _Entry, prev: _Entry | None, prev_present: _Entry | None
    ) -> None:
        if e.seq == 1:
            if e.prev_key is not None or e.prev_sha256 is not None:
                self._find("edited", e.key, "seq 1 names a predecessor", cid)
            return
        if e.prev_key is None or not is_audit_key(e.prev_key) or not _SHA_RE.fullmatch(e.prev_sha256 or ""):
            self._find("edited", e.key, f"seq {e.seq} has no valid predecessor link", cid)
            return
        if prev is not None:
            self._compare(cid, e, prev)
            return
        # The predecessor was not among the records read: outside the range, or gone.
        _, got = await self._load(e.prev_key)
        first_missing = prev_present.seq + 1 if prev_present is not None else 1
        if got == "missing":
            count = e.seq - first_missing
            more = f" and {count - 1} record(s) before it" if count > 1 else ""
            self._find(
                "missing",
                e.prev_key,
                f"seq {e.seq - 1}{more} {'are' if count > 1 else 'is'} gone: deleted (named by {e.key})",
                cid,
            )
        elif isinstance(got, _Entry):
            if got.chain != cid or got.seq != e.seq - 1:
                self._find(
                    "reordered",
                    e.prev_key,
                    f"{e.key} names it as seq {e.seq - 1}, it says chain {got.chain} seq {got.seq}",
                    cid,
                )
            elif got.sha256 != e.prev_sha256:
                self._find(
                    "edited", e.prev_key, f"its content differs from the sha256 {e.key} recorded for it", cid
                )
            # Else intact: outside the range (a record's key carries its "at", which for a retention run
            # is when it started, so the chain's order and the keys' order can differ).
        elif got is None:
            self._find("edited", e.prev_key, f"{e.key} names it as seq {e.seq - 1}, but it has no chain", cid)
        else:
            self._find("unreadable", e.prev_key, got, cid)

    def _compare(self, cid: str, e: _Entry, prev: _Entry) -> None:
        if e.prev_key != prev.key:
            self._find(
                "reordered",
                prev.key,
                f"seq {prev.seq}, but {e.key} (seq {e.seq}) names {_shown(e.prev_key)} as its predecessor",
                cid,
            )
        elif e.prev_sha256 != prev.sha256:
            self._find(
                "edited", prev.key, f"its content differs from the sha256 {e.key} recorded for it", cid
            )

    async def _missing_tail(self, cid: str, head: ChainHead, last_seq: int) -> None:
        if not is_audit_key(head.last_key):
            self._find("head_mismatch", chain_head_key(cid), "the head names no valid record key", cid)
            return
        _, got = await self._load(head.last_key)
        if got == "missing":
            self._find(
                "missing",
                head.last_key,
                f"seq {last_seq + 1}..{head.seq} gone: deleted (the chain head names seq {head.seq})",
                cid,
            )
        elif isinstance(got, _Entry):
            # Outside the range, or appended while this walk ran: its link to the head is still checked.
            if got.chain != cid or got.seq != head.seq:
                self._find("reordered", head.last_key, f"the head names it as seq {head.seq}", cid)
            elif got.sha256 != head.last_sha256:
                self._find(
                    "edited", head.last_key, "its content differs from the sha256 in the chain head", cid
                )
            else:
                self.report.chains[cid].open_end = True
        elif got is None:
            self._find(
                "edited", head.last_key, f"the head names it as seq {head.seq}, but it has no chain", cid
            )
        else:
            self._find("unreadable", head.last_key, got, cid)

    def _check_unchained(
        self, unchained: list[tuple[str, datetime | None]], heads: Mapping[str, Any]
    ) -> None:
        """Records without a chain: legacy when older than every chain, otherwise suspicious (an old
        writer still running, or a record slipped in without a link)."""
        since = [
            datetime.fromisoformat(h.since) for h in heads.values() if isinstance(h, ChainHead) and h.since
        ]
        began = min(since) if since else None
        for key, at in unchained:
            if began is None or at is None or at < began:
                self.report.legacy.append(key)
            else:
                self._find(
                    "unchained",
                    key,
                    "written after chaining began but carries no chain link (an old writer, or inserted)",
                )


def _key_time(key: str) -> datetime | None:
    m = _KEY_RE.fullmatch(key)
    if m is None:
        return None
    return datetime.strptime(m["ts"], "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC)


# --------------------------------------------------------------------------------------------- MQTT


class CommandEvents:
    """An :class:`EventSink` for a command that runs for seconds or minutes (the admin CLI, one
    retention sweep): publishes each event as it comes (QoS 1, up to ``window`` in flight), without the
    service's retained status or last will. If the broker cannot be reached within
    ``connect_timeout_s`` the events are dropped and counted; :meth:`close` waits at most
    ``close_timeout_s`` for the rest. Use as ``async with CommandEvents(cfg.mqtt) as events:``.
    """

    def __init__(
        self,
        config: MqttConfig,
        *,
        connect_timeout_s: float = 3.0,
        publish_timeout_s: float = 5.0,
        close_timeout_s: float = 5.0,
        window: int = 50,
        buffer_size: int | None = None,
        enabled: bool | None = None,
    ) -> None:
        self._cfg = config
        self.enabled = config.enabled if enabled is None else enabled
        self._prefix = check_prefix(config.topic_prefix)
        self._connect_timeout_s = connect_timeout_s
        self._publish_timeout_s = publish_timeout_s
        self._close_timeout_s = close_timeout_s
        self._window = window
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(buffer_size or config.buffer_size)
        self._closing = False
        self._failed: str | None = None
        self._task: asyncio.Task[None] | None = None
        self.published = 0
        self.dropped = 0

    def emit(self, event: str, call_id: str | None = None, /, **fields: Any) -> None:
        if not self.enabled:
            return
        try:
            topic = topic_for(self._prefix, event, call_id)
            payload = encode(build_payload(event, call_id, fields))
        except (EventNameError, ValueError, TypeError) as exc:
            log.warning("mqtt event=rejected name=%s error=%s", str(event)[:60], str(exc)[:200])
            self.dropped += 1
            return
        if self._failed is not None or self._closing:
            self.dropped += 1
            return
        try:
            self._queue.put_nowait((topic, payload))
        except asyncio.QueueFull:
            self.dropped += 1

    async def __aenter__(self) -> Self:
        if self.enabled:
            self._task = asyncio.create_task(self._run(), name="command-events")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _run(self) -> None:
        try:
            async with mqtt_client.Client(
                self._cfg.host,
                self._cfg.port,
                username=self._cfg.username or None,
                password=self._cfg.password or None,
                tls_context=mqtt_tls_context(self._cfg),
                identifier=f"kasuhara-cli-{os.getpid()}-{secrets.token_hex(3)}",
                timeout=self._connect_timeout_s,
                max_inflight_messages=self._window,
                logger=logging.getLogger(f"{__name__}.aiomqtt"),
            ) as client:
                while True:
                    if self._closing and self._queue.empty():
                        return
                    try:
                        first = await asyncio.wait_for(self._queue.get(), 0.2)
                    except TimeoutError:
                        continue
                    batch = [first]
                    while len(batch) < self._window and not self._queue.empty():
                        batch.append(self._queue.get_nowait())
                    await asyncio.gather(
                        *(client.publish(t, p, qos=1, timeout=self._publish_timeout_s) for t, p in batch)
                    )
                    self.published += len(batch)
        except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
            self._failed = f"{type(exc).__name__}: {exc}"[:200]
            self._drop_queued()

    def _drop_queued(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()
            self.dropped += 1

    async def close(self) -> None:
        """Publish what is queued (within ``close_timeout_s``), then disconnect. Idempotent."""
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), self._close_timeout_s)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                self._failed = self._failed or "timed out"
            self._drop_queued()
        if self.dropped:
            log.warning(
                "mqtt event=not_published dropped=%d broker=%s:%d error=%s",
                self.dropped,
                self._cfg.host,
                self._cfg.port,
                self._failed or "-",
            )

    @property
    def failure(self) -> str | None:
        """Why events could not be published (``None`` if all went out)."""
        return self._failed
