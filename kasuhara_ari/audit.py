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
import getpass
import hashlib
import json
import logging
import os
import re
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from types import TracebackType
from typing import Any, Self

import aiomqtt

from .config import Config, MqttConfig
from .events import EventNameError, EventSink, build_payload, check_prefix, encode, topic_for
from .safe import REASON_MAX_CHARS, clean_caller_text
from .search import utc_days
from .storage import AUDIT_PREFIX, META_SHA256, ObjectStore, StorageError

log = logging.getLogger(__name__)

AUDIT_SCHEMA = "kasuhara.audit/1"
#: Every action that writes a record. ``purge`` is a retention run.
ACTIONS = (
    "list",
    "show",
    "download",
    "export",
    "hold",
    "release",
    "delete",
    "purge",
    "callers_add",
    "callers_remove",
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

    def to_json(self) -> bytes:
        doc = {
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
        """Store the record (raises :class:`StorageError` if S3 refuses), then emit it."""
        data = record.to_json()
        await self.store.put_bytes(
            record.key,
            data,
            metadata={META_SHA256: hashlib.sha256(data).hexdigest()},
            content_type="application/json",
        )
        call_id = record.target.get("call_id")
        self.events.emit(
            f"audit.{record.action}", call_id if isinstance(call_id, str) else None, **record.event_fields()
        )
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
                except ValueError as exc:
                    if on_problem is not None:
                        on_problem(obj.key, str(exc))
                    continue
                if start <= at <= end and (action is None or record.action == action):
                    yield record
            if on_day is not None:
                on_day(day)


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
            async with aiomqtt.Client(
                self._cfg.host,
                self._cfg.port,
                username=self._cfg.username or None,
                password=self._cfg.password or None,
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
