"""Events about calls, retention and admin actions, as the rest of the app sees them.

Call logic only ever calls :meth:`EventSink.emit`, which never blocks and never raises: a broker outage
must not slow a call. Publishing to MQTT lives behind this interface (:class:`MqttEvents`).

Which topic an event goes to is decided by its name alone:

- a plain name is a call event and needs a call_id:
  ``emit("started", call_id, direction="inbound")`` → ``<prefix>/calls/<call_id>/started``;
- ``retention.<event>`` → ``<prefix>/retention/<event>``, e.g. ``emit("retention.purged", call_id, key=k)``;
- ``audit.<action>`` → ``<prefix>/audit/<action>``, e.g. ``emit("audit.download", call_id, by="alice")``.
  For retention and audit events the call_id is optional and only goes into the payload.

The payload's ``event`` is the full name (``"retention.purged"``), so a payload is unambiguous without its
topic. Every payload is JSON: ``schema`` (``kasuhara.event/1``), ``event``, ``at`` (ISO 8601, milliseconds,
offset; a caller may pass its own ``at``), ``call_id`` when there is one, ``seq`` (MQTT only), then the
fields. ``call_id=`` given as a keyword is honoured like the positional one. Values JSON cannot hold are
turned into strings (datetimes into ISO 8601). The payload contract is ``kasuhara_ari/schemas/event-1.json``;
:data:`CALL_EVENTS` is the registry of call events and their required fields (a test keeps both in step).
An event missing from the registry, or missing a required field, is still published, with one warning.

The retained ``<prefix>/status`` payload has ``event: "status"``, ``state`` (online/offline), ``reason``
(connected, shutdown, cancelled, connection lost), ``hostname`` and ``version``. In the last will, ``at`` is
when the connection was made: the broker publishes the will later, when it notices the connection is gone.

Names and call_ids become topic levels, so both must match ``[A-Za-z0-9][A-Za-z0-9._-]*``: anything with
``/``, ``+``, ``#``, NUL, spaces or non-ASCII never makes a topic. Such an event is rejected — logged and
counted, never raised into the caller.

Delivery by :class:`MqttEvents`: QoS 1, at-least-once, in emit order. A message is removed only when the
broker has acknowledged it; what was in flight when a connection dropped is sent again (so a consumer can
see the same ``seq`` twice; a jump in ``seq`` means drops). The buffer is bounded by ``buffer_size``; when
it is full the OLDEST event is dropped: the newest events describe the calls as they are now, which is
what a supervisor's live view needs, and a gap in ``seq`` shows consumers exactly what is missing.

Live snapshots: an :class:`MqttEvents` made with ``live_snapshots`` (as ``kasuhara serve`` runs it) also
folds every call event it publishes into a :class:`~kasuhara_ari.live.LiveBoard` and keeps
``<prefix>/live/<call_id>`` RETAINED with the call's snapshot (``kasuhara.live/1``), cleared (an empty
retained payload) when the call ends. Call events are not retained, so without these a console or monitor
started mid-call would not see the calls in progress. After every (re)connection the snapshots of the calls
still live are published again: a broker restarted without persistence gets them back. A snapshot is built
when it is sent (never a stale one), and one per call is pending at a time, outside the event buffer (a
full buffer never drops it). Snapshots and the status carry ``boot``, this publisher's random id: a
consumer ignores snapshots that an earlier run left retained.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import enum
import json
import logging
import math
import os
import random
import re
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

import aiomqtt

from kasuhara_ari import mqtt_client
from kasuhara_ari.config import MqttConfig
from kasuhara_ari.live import MAX_CALLS as LIVE_MAX_CALLS
from kasuhara_ari.live import LiveBoard
from kasuhara_ari.safe import clean_caller_text, clean_log_value, is_safe_call_id
from kasuhara_ari.schemas import EVENT_SCHEMA

log = logging.getLogger(__name__)

#: Call events and the fields each must carry besides schema/event/at/call_id (kept in step with
#: ``schemas/event-1.json`` by a test).
CALL_EVENTS: Mapping[str, frozenset[str]] = {
    "started": frozenset({"direction"}),
    "notice_played": frozenset(),
    "recording_started": frozenset(),
    "recording_failed": frozenset({"error"}),
    "agent_ringing": frozenset({"target"}),
    "agent_answered": frozenset({"agent"}),
    "agent_unavailable": frozenset({"target"}),
    "agent_left": frozenset({"supervisor"}),
    "customer_ringing": frozenset({"target"}),
    "customer_answered": frozenset({"target"}),
    "escalation_requested": frozenset({"key"}),
    "supervisor_ringing": frozenset({"supervisor"}),
    "supervisor_joined": frozenset({"supervisor"}),
    "supervisor_unavailable": frozenset(),
    "supervisor_missed": frozenset(),
    "supervisor_left": frozenset(),
    "supervisor_listening": frozenset(),
    "supervisor_whispering": frozenset(),
    "supervisor_barging": frozenset(),
    "supervision_ended": frozenset(),
    "flagged": frozenset(),
    "warning_played": frozenset(),
    "caller_hungup": frozenset(),
    "long_call": frozenset({"duration_s"}),
    "time_limit": frozenset({"duration_s"}),
    "repeat_caller": frozenset({"count"}),
    "caller_listed": frozenset({"action"}),
    "ended": frozenset({"duration_s"}),
    # a restart of serve: the stopping one left the call talking, the next one took it over
    "handed_over": frozenset(),
    "resumed": frozenset({"direction"}),
    "recording_stored": frozenset({"key"}),
    "metadata_quarantined": frozenset({"reason"}),
    "hold_incomplete": frozenset({"reason"}),
    "monologue_detected": frozenset({"offset_s", "mode", "talking_s"}),
    "talk_over_detected": frozenset({"offset_s", "mode", "attempts"}),
    # care: the agent's recovery pause after this call (kasuhara_ari/care/cooldown.py)
    "agent_cooldown_started": frozenset({"agent", "trigger", "duration_s", "until"}),
    "agent_cooldown_ended": frozenset({"agent", "reason"}),
    "shouting_detected": frozenset({"offset_s", "mode", "level_dbfs", "baseline_dbfs", "duration_s"}),
    "custom_detected": frozenset({"offset_s", "mode", "kind"}),
    "detection_alert": frozenset({"kind", "offset_s"}),
}
#: Namespaces that route to ``<prefix>/<namespace>/<name>`` instead of a call's topic.
NAMESPACES = frozenset({"retention", "audit"})
STATUS_EVENT = "status"
MAX_PAYLOAD_BYTES = 64 * 1024

_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_RESERVED = frozenset({"schema", "event", "call_id", "seq"})
_RESERVED_STATUS = frozenset({"schema", "event", "at", "state", "reason", "hostname", "version", "boot"})


class EventNameError(ValueError):
    """An event name, call_id or topic prefix that must not become part of an MQTT topic."""


def mqtt_tls_context(cfg: MqttConfig) -> ssl.SSLContext | None:
    """The TLS context for every MQTT client of the app (serve, agi, monitor, admin), from ``[mqtt]``;
    ``None`` when ``mqtt.tls`` is off. The broker's chain is always verified (``ca_file``, else the
    system's trust store); ``tls_insecure`` only skips the hostname check."""
    if not cfg.tls:
        return None
    ctx = ssl.create_default_context(cafile=cfg.ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.cert_file:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file or None)
    if cfg.tls_insecure:
        ctx.check_hostname = False
    return ctx


def now_iso() -> str:
    """ISO 8601 with offset and milliseconds, as every payload's ``at``."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def _segment(value: object, what: str) -> str:
    if not isinstance(value, str) or not _SEGMENT.fullmatch(value):
        raise EventNameError(f"{what} {clean_log_value(value)} is not a safe topic level ([A-Za-z0-9._-])")
    return value


def check_prefix(prefix: str) -> str:
    """The topic prefix, checked: levels of ``[A-Za-z0-9._-]`` separated by ``/``."""
    if not isinstance(prefix, str) or not prefix:
        raise EventNameError("topic prefix must not be empty")
    for level in prefix.split("/"):
        _segment(level, "topic prefix level")
    return prefix


def topic_for(prefix: str, event: str, call_id: str | None) -> str:
    """The topic of an event (see the module docstring); :class:`EventNameError` if it cannot have one."""
    if not isinstance(event, str):
        raise EventNameError(f"event name {clean_log_value(event)} is not a string")
    namespace, dot, name = event.partition(".")
    if dot and namespace in NAMESPACES:
        return f"{prefix}/{namespace}/{_segment(name, f'{namespace} event name')}"
    if event == STATUS_EVENT:
        raise EventNameError("'status' is the service's own topic; it is not emitted")
    _segment(event, "event name")
    if "." in event:
        raise EventNameError(f"event {event!r}: a dotted name must start with one of {sorted(NAMESPACES)}")
    if call_id is None:
        raise EventNameError(f"call event {event!r} needs a call_id")
    if not is_safe_call_id(call_id):
        raise EventNameError(f"call_id {clean_log_value(call_id)} is not safe in a topic")
    return f"{prefix}/calls/{call_id}/{event}"


def build_payload(
    event: str, call_id: str | None, fields: Mapping[str, Any], *, seq: int | None = None
) -> dict[str, Any]:
    """The payload of an event: schema, event, at, call_id, seq, then the caller's fields."""
    payload: dict[str, Any] = {"schema": EVENT_SCHEMA, "event": event, "at": fields.get("at") or now_iso()}
    if call_id is None:
        call_id = fields.get("call_id")
    if call_id is not None:
        payload["call_id"] = call_id
    if seq is not None:
        payload["seq"] = seq
    for key, value in fields.items():
        if key not in _RESERVED and key != "at":
            payload[key] = value
    return payload


def _json_default(value: object) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat(timespec="milliseconds")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


def encode(payload: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON; ``ValueError`` for NaN/infinity or a circular structure."""
    return json.dumps(
        payload, ensure_ascii=False, separators=(",", ":"), default=_json_default, allow_nan=False
    ).encode("utf-8")


class EventSink(Protocol):
    def emit(self, event: str, call_id: str | None = None, /, **fields: Any) -> None:
        """Queue an event; never blocks, never raises."""


@runtime_checkable
class StatusDetails(Protocol):
    """A sink that also carries the service's health in its retained ``status`` message."""

    def set_status_detail(self, name: str, value: Any) -> None:
        """Put ``name: value`` into the status payload (and republish it if it changed)."""


@dataclass
class MemoryEvents:
    """Keeps events in a list: for tests and for the demo's summary. Payloads are built as for MQTT
    (without ``seq``), so tests can check them with :func:`kasuhara_ari.schemas.validate_event`."""

    events: list[dict[str, Any]] = field(default_factory=list)

    def emit(self, event: str, call_id: str | None = None, /, **fields: Any) -> None:
        self.events.append(build_payload(event, call_id, fields))

    def of(self, call_id: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("call_id") == call_id]


class NullEvents:
    def emit(self, event: str, call_id: str | None = None, /, **fields: Any) -> None:
        return None


@dataclass(frozen=True)
class PublisherStats:
    """Counters of an :class:`MqttEvents` since it was created."""

    accepted: int  # emitted and put into the buffer
    published: int  # acknowledged by the broker (PUBACK)
    resent: int  # sent again after a connection loss (possible duplicates downstream)
    dropped: int  # pushed out of a full buffer, or left unsent at close
    rejected: int  # refused by emit(): unsafe name/call_id, not JSON, too large
    buffered: int  # waiting now, including what is in flight
    connected: bool
    connections: int  # successful connections so far


class _Throttle:
    """Lets one log line per key through every ``interval`` seconds and counts what it held back."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """None to stay quiet; otherwise how many lines were held back since the last one."""
        now = time.monotonic()
        if now < self._next.get(key, 0.0):
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._next[key] = now + self._interval
        return self._held.pop(key, 0)


@dataclass(slots=True)
class _Outgoing:
    seq: int
    topic: str
    payload: bytes
    sent: bool = False
    acked: bool = False
    #: The retained status, built when sent (so a late one never carries stale details).
    status: bool = False
    #: A call's retained live snapshot (its call_id), built when sent; cleared if the call is over.
    live: str = ""


class _CloseDeadline(Exception):
    """close()'s timeout ran out while flushing."""


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("kasuhara-ari")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class MqttEvents:
    """An :class:`EventSink` that publishes to MQTT through aiomqtt.

    ``emit()`` is synchronous, O(1) and safe from any thread: it only appends to a bounded buffer.
    ``run()`` owns the connection: it connects (retained ``status`` online, last will offline), drains
    the buffer in order with QoS 1, and reconnects with capped, jittered backoff. ``close()`` flushes,
    publishes retained offline and disconnects within a timeout. Use it either as
    ``async with MqttEvents(...) as events:`` (the context owns the ``run()`` task), or run
    ``events.run()`` in your own TaskGroup and ``await events.close()`` before leaving it.
    """

    def __init__(
        self,
        config: MqttConfig | None = None,
        /,
        *,
        host: str | None = None,
        port: int | None = None,
        topic_prefix: str | None = None,
        username: str | None = None,
        password: str | None = None,
        buffer_size: int | None = None,
        linger_s: float | None = None,
        keepalive_s: int = 30,
        connect_timeout_s: float = 10.0,
        publish_timeout_s: float = 10.0,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        window: int = 20,
        client_id: str | None = None,
        hostname: str | None = None,
        version: str | None = None,
        log_interval_s: float = 10.0,
        live_snapshots: bool = False,
        node: str | None = None,
    ) -> None:
        """Connection settings come from ``config`` (the ``[mqtt]`` section; defaults if None), each
        overridden by the keyword of the same name; the other keywords are tunables. ``live_snapshots``:
        keep the retained ``<prefix>/live/<call_id>`` snapshots (``kasuhara serve`` does)."""
        cfg = config if config is not None else MqttConfig()
        host = cfg.host if host is None else host
        port = cfg.port if port is None else port
        topic_prefix = cfg.topic_prefix if topic_prefix is None else topic_prefix
        username = cfg.username if username is None else username
        password = cfg.password if password is None else password
        buffer_size = cfg.buffer_size if buffer_size is None else buffer_size
        self._tls_context = mqtt_tls_context(cfg)
        linger_s = cfg.linger_ms / 1000 if linger_s is None else linger_s
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be at least 1, got {buffer_size}")
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        if keepalive_s < 1:
            raise ValueError(f"keepalive_s must be at least 1, got {keepalive_s}")
        self._prefix = check_prefix(topic_prefix)
        self._host = host
        self._port = port
        self._username = username
        self._password = password
        self._buffer_size = buffer_size
        self._keepalive_s = keepalive_s
        self._connect_timeout_s = connect_timeout_s
        self._publish_timeout_s = publish_timeout_s
        self._reconnect_min_s = reconnect_min_s
        self._reconnect_max_s = max(reconnect_min_s, reconnect_max_s)
        self._window = window
        self._linger_s = max(0.0, linger_s)
        self._hostname = hostname or socket.gethostname()
        #: The node's name, added to every event and the status as ``node`` (several nodes, one broker).
        self._node = node
        self._client_id = client_id or f"kasuhara-{os.getpid()}-{secrets.token_hex(4)}"
        self._version = version or _version()
        self.status_topic = f"{self._prefix}/status"
        #: Several nodes share a broker: each service's status also on ``<prefix>/status/<node>``
        #: (retained; the last will stays on ``<prefix>/status``, DESIGN.md's topic: MQTT has one will).
        self.node_status_topic = f"{self._prefix}/status/{node}" if node else None
        #: This publisher's id in the status and the live snapshots (see the module docstring).
        self.boot = secrets.token_hex(8)

        # Guards the buffer, seq and counters: emit() may come from threads. Reentrant, because encoding a
        # field calls its __str__, which might log, and a log handler might emit.
        self._lock = threading.RLock()
        self._buffer: collections.deque[_Outgoing] = collections.deque()
        self._inflight: list[_Outgoing] = []  # owned by run(); oldest first
        self._seq = 0
        self._accepted = 0
        self._published = 0
        self._resent = 0
        self._dropped = 0
        self._rejected = 0
        self._connections = 0
        self._connected = False
        self._throttle = _Throttle(log_interval_s)
        self._dropped_since_log = 0
        self._unknown_warned: set[str] = set()
        #: Health details every status payload carries (e.g. ``spool_disk``); see set_status_detail().
        self._status_details: dict[str, Any] = {}
        self._live_snapshots = live_snapshots
        #: The calls as this publisher's events describe them, for the retained live snapshots.
        self._live = LiveBoard()
        #: Calls whose snapshot (or clear) is to be published, in order; a call at most once.
        self._live_dirty: dict[str, None] = {}
        #: Calls that ended lately: a late or re-sent event must not bring one back as a live call.
        self._live_ended: dict[str, None] = {}

        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._wake: asyncio.Event | None = None
        self._closing_event: asyncio.Event | None = None
        self._stopped: asyncio.Event | None = None
        self._running = False
        self._closing = False
        self._connected_once_in_session = False
        self._close_deadline: float | None = None
        self._task: asyncio.Task[None] | None = None

    # --- the caller's side: never blocks, never raises ------------------------------------------------

    def emit(self, event: str, call_id: str | None = None, /, **fields: Any) -> None:
        try:
            self._emit(event, call_id, fields)
        except Exception as exc:  # a bug here must still not reach call logic
            with contextlib.suppress(Exception):
                self._reject(event, call_id, f"{type(exc).__name__}: {exc}")

    def _emit(self, event: str, call_id: str | None, fields: dict[str, Any]) -> None:
        if call_id is None and "call_id" in fields:
            call_id = fields["call_id"]
        if self._node and "node" not in fields:
            fields = {**fields, "node": self._node}
        try:
            topic = topic_for(self._prefix, event, call_id)
        except EventNameError as exc:
            self._reject(event, call_id, str(exc))
            return
        self._warn_if_unknown(event, fields)
        with self._lock:
            if self._closing and not self._running:
                self._dropped += 1
                self._dropped_since_log += 1
                reason = "closed"
            else:
                self._seq += 1
                try:
                    payload = build_payload(event, call_id, fields, seq=self._seq)
                    data = encode(payload)
                except (TypeError, ValueError, RecursionError) as exc:
                    self._seq -= 1
                    data, reason = b"", f"not JSON: {exc}"
                else:
                    if len(data) > MAX_PAYLOAD_BYTES:
                        self._seq -= 1
                        data, reason = b"", f"payload of {len(data)} bytes exceeds {MAX_PAYLOAD_BYTES}"
                    else:
                        reason = ""
                        self._buffer.append(_Outgoing(self._seq, topic, data))
                        self._accepted += 1
                        self._trim_locked()
                        if self._live_snapshots:
                            self._fold_live_locked(payload)
        if reason == "closed":
            self._log_drops("closed")
        elif reason:
            self._reject(event, call_id, reason)
        else:
            if self._dropped_since_log:
                self._log_drops("buffer_full")
            self._notify()

    def _fold_live_locked(self, payload: Mapping[str, Any]) -> None:
        """A published call event changes its call's snapshot (call with the lock held)."""
        call_id = payload.get("call_id")
        event = payload.get("event")
        if not isinstance(call_id, str) or not isinstance(event, str) or "." in event:
            return
        if call_id in self._live_ended:
            return  # late or re-sent after the end: the snapshot is cleared for good
        call = self._live.apply(payload)
        if call is None:
            return
        if not call.live:
            self._live.remove(call_id)
            self._live_ended[call_id] = None
            while len(self._live_ended) > LIVE_MAX_CALLS:
                del self._live_ended[next(iter(self._live_ended))]
        self._live_dirty[call_id] = None

    def live_snapshot(self, call_id: str) -> dict[str, Any] | None:
        """The retained snapshot of a live call as it would be published now; None once it ended."""
        with self._lock:
            call = self._live.calls.get(call_id)
            return call.snapshot(boot=self.boot) if call is not None else None

    def live_topic(self, call_id: str) -> str:
        return f"{self._prefix}/live/{call_id}"

    def _trim_locked(self) -> None:
        """Drop the oldest events beyond ``buffer_size`` (call with the lock held)."""
        while len(self._buffer) > self._buffer_size:
            self._buffer.popleft()
            self._dropped += 1
            self._dropped_since_log += 1

    def _log_drops(self, why: str) -> None:
        held = self._throttle.allow("drop")
        if held is None:
            return
        with self._lock:
            count, self._dropped_since_log = self._dropped_since_log, 0
            total = self._dropped
        log.warning(
            "mqtt.events_dropped reason=%s dropped=%d dropped_total=%d buffer_size=%d",
            why,
            count,
            total,
            self._buffer_size,
        )

    def _reject(self, event: object, call_id: object, reason: str) -> None:
        with self._lock:
            self._rejected += 1
            total = self._rejected
        held = self._throttle.allow("reject")
        if held is not None:
            log.error(
                "mqtt.event_rejected event=%s call_id=%s rejected_total=%d suppressed=%d reason=%s",
                clean_log_value(event),
                clean_log_value(call_id),
                total,
                held,
                clean_caller_text(reason, max_chars=200),
            )

    def _warn_if_unknown(self, event: str, fields: Mapping[str, Any]) -> None:
        if "." in event or event in self._unknown_warned or len(self._unknown_warned) > 256:
            return
        required = CALL_EVENTS.get(event)
        if required is None:
            problem = "not in the kasuhara.event/1 registry"
        elif missing := sorted(required - fields.keys()):
            problem = f"missing required fields {missing}"
        else:
            return
        self._unknown_warned.add(event)
        log.warning("mqtt.event_off_schema event=%s problem=%s (published anyway)", event, problem)

    def _notify(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or wake.is_set():
            return
        if threading.get_ident() == self._loop_thread:
            wake.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closing: run() is gone anyway
                loop.call_soon_threadsafe(wake.set)

    @property
    def stats(self) -> PublisherStats:
        with self._lock:
            return PublisherStats(
                accepted=self._accepted,
                published=self._published,
                resent=self._resent,
                dropped=self._dropped,
                rejected=self._rejected,
                buffered=len(self._buffer) + sum(1 for m in self._inflight if not m.acked),
                connected=self._connected,
                connections=self._connections,
            )

    @property
    def connected(self) -> bool:
        return self._connected

    # --- the connection's side ----------------------------------------------------------------------

    def set_status_detail(self, name: str, value: Any) -> None:
        """Report a health detail (``spool_disk``: the spool's disk state) in the retained status; a
        change republishes it, in order with the events. Thread-safe, never raises."""
        with self._lock:
            if self._status_details.get(name) == value or name in _RESERVED_STATUS:
                return
            self._status_details[name] = value
            if self._closing:
                return
            self._buffer.append(_Outgoing(0, self.status_topic, b"", status=True))
            self._trim_locked()
        self._notify()

    def _status(self, state: str, reason: str, at: str | None = None) -> bytes:
        with self._lock:
            details = dict(self._status_details)
        return encode(
            {
                **details,
                "schema": EVENT_SCHEMA,
                "event": STATUS_EVENT,
                "at": at or now_iso(),
                "state": state,
                "reason": reason,
                "hostname": self._hostname,
                **({"node": self._node} if self._node else {}),
                "version": self._version,
                "boot": self.boot,
            }
        )

    async def run(self) -> None:
        """Publish until :meth:`close` (then flush, retained offline, disconnect) or cancellation."""
        if self._running:
            raise RuntimeError("MqttEvents.run() is already running")
        if self._closing:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._closing_event = asyncio.Event()
        self._stopped = asyncio.Event()
        self._running = True
        self._wake.set()
        delay = self._reconnect_min_s
        try:
            while True:
                stop = False
                try:
                    await self._session()
                    stop = True  # closed gracefully
                except* _CloseDeadline:
                    stop = True
                except* (aiomqtt.MqttError, OSError, TimeoutError) as group:
                    err = group.exceptions[0]
                    if self._connected_once_in_session:
                        delay = self._reconnect_min_s
                    log.warning(
                        "mqtt.disconnected host=%s port=%d error=%s buffered=%d retry_in_s=%.1f",
                        self._host,
                        self._port,
                        f"{type(err).__name__}: {err}"[:200],
                        self.stats.buffered,
                        delay,
                    )
                finally:
                    self._connected = False
                    self._requeue_inflight()
                if stop or (self._closing and self._deadline_passed()):
                    return
                await self._pause(delay * random.uniform(0.8, 1.0))  # noqa: S311 - jitter, not crypto
                delay = min(delay * 2, self._reconnect_max_s)
        finally:
            self._running = False
            self._connected = False
            with self._lock:
                unsent = len(self._buffer)
                if self._closing and unsent:
                    self._buffer.clear()
                    self._dropped += unsent
            if self._closing and unsent:
                log.warning("mqtt.closed_with_unsent_events dropped=%d", unsent)
            self._stopped.set()

    async def _pause(self, seconds: float) -> None:
        """Wait before reconnecting; close() cuts the wait short once, not every later one."""
        assert self._closing_event is not None
        if self._closing:
            await asyncio.sleep(max(0.0, min(seconds, self._remaining())))
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing_event.wait(), seconds)

    def _deadline_passed(self) -> bool:
        return self._close_deadline is not None and time.monotonic() >= self._close_deadline

    def _timeout(self, limit: float) -> float:
        """``limit``, shortened to what is left of close()'s timeout; _CloseDeadline if nothing is."""
        if self._close_deadline is None:
            return limit
        remaining = self._close_deadline - time.monotonic()
        if remaining <= 0:
            raise _CloseDeadline
        return min(limit, remaining)

    async def _session(self) -> None:
        """One session (the connection, and the node's will connection): online, drain until closing,
        offline. Raises MqttError when either breaks."""
        self._connected_once_in_session = False
        connected_at = now_iso()
        client = mqtt_client.Client(
            self._host,
            self._port,
            username=self._username or None,
            password=self._password or None,
            identifier=self._client_id,
            tls_context=self._tls_context,
            keepalive=self._keepalive_s,
            timeout=self._timeout(self._connect_timeout_s),
            will=aiomqtt.Will(
                self.status_topic, self._status("offline", "connection lost", connected_at), 1, True
            ),
            max_inflight_messages=self._window,
            logger=logging.getLogger(f"{__name__}.aiomqtt"),
        )
        client.pending_calls_threshold = self._window + 1  # a full window is normal, not a warning
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(client)
            node_will = self._node_will_client(connected_at)
            if node_will is not None:
                await stack.enter_async_context(node_will)
            await self._connected_session(client, node_will)

    def _node_will_client(self, connected_at: str) -> aiomqtt.Client | None:
        """A second, idle connection whose only job is the last will on ``<prefix>/status/<node>``.

        MQTT allows one will per connection, and the main one keeps DESIGN.md's ``<prefix>/status``:
        without this a node that died (SIGKILL, power) stayed "online" on its own topic until it ran again.
        """
        if self.node_status_topic is None:
            return None
        return mqtt_client.Client(
            self._host,
            self._port,
            username=self._username or None,
            password=self._password or None,
            identifier=f"{self._client_id}-will",
            tls_context=self._tls_context,
            keepalive=self._keepalive_s,
            timeout=self._timeout(self._connect_timeout_s),
            will=aiomqtt.Will(
                self.node_status_topic, self._status("offline", "connection lost", connected_at), 1, True
            ),
            logger=logging.getLogger(f"{__name__}.aiomqtt"),
        )

    async def _connected_session(self, client: aiomqtt.Client, node_will: aiomqtt.Client | None) -> None:
        """Online, drain until closing, offline (both connections are up)."""
        self._connected = True
        self._connected_once_in_session = True
        self._connections += 1
        log.info("mqtt.connected host=%s port=%d buffered=%d", self._host, self._port, self.stats.buffered)
        try:
            try:
                await self._publish_status(
                    client, self._status("online", "connected"), self._timeout(self._publish_timeout_s)
                )
                with self._lock:
                    # The broker may have lost the retained snapshots (restarted without
                    # persistence): every live call's goes out again.
                    for live_id in self._live.calls:
                        self._live_dirty[live_id] = None
                async with asyncio.TaskGroup() as tg:
                    watchers = [tg.create_task(self._watch(c)) for c in (client, node_will) if c]
                    await self._drain(client)
                    for watcher in watchers:
                        watcher.cancel()
            except* _CloseDeadline:
                pass
        except asyncio.CancelledError:
            # Cancelled from outside: a graceful DISCONNECT would swallow the last will, so say
            # offline ourselves (briefly) before aiomqtt disconnects.
            with contextlib.suppress(Exception):
                await self._publish_status(client, self._status("offline", "cancelled"), 1.0)
            raise
        # Closing: either everything is flushed, or close()'s timeout ran out. Offline gets a short
        # grace period either way; if it fails the connection is broken and the will says offline.
        await self._publish_status(
            client,
            self._status("offline", "shutdown"),
            max(1.0, min(self._publish_timeout_s, self._remaining())),
        )
        log.info("mqtt.closed published=%d dropped=%d", self._published, self._dropped)

    def _remaining(self) -> float:
        if self._close_deadline is None:
            return self._publish_timeout_s
        return self._close_deadline - time.monotonic()

    @staticmethod
    async def _watch(client: aiomqtt.Client) -> None:
        """Raise MqttError as soon as the connection is lost (nothing is subscribed; no message comes)."""
        async for _ in client.messages:
            pass

    async def _drain(self, client: aiomqtt.Client) -> None:
        """Publish the buffer in order, ``window`` messages at a time; return when closing and empty."""
        assert self._wake is not None
        while True:
            self._wake.clear()
            with self._lock:
                # Snapshots share each window with the events, so a steady stream of events cannot
                # starve them (and one per call is pending at most, so they cannot starve the events).
                reserve = min(len(self._live_dirty), max(1, self._window // 4))
                while self._buffer and len(self._inflight) < self._window - reserve:
                    self._inflight.append(self._buffer.popleft())
                while self._live_dirty and len(self._inflight) < self._window:
                    live_id = next(iter(self._live_dirty))
                    del self._live_dirty[live_id]
                    self._inflight.append(_Outgoing(0, self.live_topic(live_id), b"", live=live_id))
                while self._buffer and len(self._inflight) < self._window:
                    self._inflight.append(self._buffer.popleft())
                batch = list(self._inflight)
            if not batch:
                if self._closing:
                    return
                await self._wake.wait()
                if self._linger_s and not self._closing:
                    # The first event after a quiet spell: its neighbours (a call's events come in
                    # bursts) join it in one window. Per window, publishing costs ~3x what each message
                    # in it does (load benchmark); under load windows fill up without waiting.
                    await asyncio.sleep(self._linger_s)
                continue
            # One timeout for the whole window rather than one timer (and task) per message: publishing
            # is most of the MQTT cost per call (load benchmark).
            timeout = self._timeout(self._publish_timeout_s)
            try:
                async with asyncio.timeout(timeout):
                    if len(batch) == 1:
                        results: list[BaseException | None] = [None]
                        await self._publish(client, batch[0])
                    else:
                        results = await asyncio.gather(
                            *(self._publish(client, m) for m in batch), return_exceptions=True
                        )
            except TimeoutError as exc:
                results = [aiomqtt.MqttError(f"no PUBACK within {timeout:.1f}s")]
                if self._closing and self._deadline_passed():
                    raise _CloseDeadline from exc
            self._settle_inflight()
            for result in results:
                if isinstance(result, BaseException):
                    if self._closing and self._deadline_passed():
                        raise _CloseDeadline from result
                    raise result

    async def _publish_status(self, client: aiomqtt.Client, payload: bytes, timeout: float) -> None:
        """The retained status, on ``<prefix>/status`` and this node's own ``<prefix>/status/<node>``."""
        await client.publish(self.status_topic, payload, qos=1, retain=True, timeout=timeout)
        if self.node_status_topic is not None:
            await client.publish(self.node_status_topic, payload, qos=1, retain=True, timeout=timeout)

    async def _publish(self, client: aiomqtt.Client, message: _Outgoing) -> None:
        if message.sent:
            with self._lock:
                self._resent += 1
        message.sent = True
        # math.inf: aiomqtt then awaits the PUBACK directly instead of through wait_for (a task each).
        if message.status:
            await self._publish_status(client, self._status("online", "updated"), math.inf)
        elif message.live:
            snapshot = self.live_snapshot(message.live)
            # An empty retained payload deletes the retained message: the call is over.
            data = encode(snapshot) if snapshot is not None else b""
            await client.publish(message.topic, data, qos=1, retain=True, timeout=math.inf)
        else:
            await client.publish(message.topic, message.payload, qos=1, timeout=math.inf)
        message.acked = True

    def _settle_inflight(self) -> None:
        """Forget the acknowledged head of what is in flight."""
        with self._lock:
            done = 0
            for m in self._inflight:
                if not m.acked:
                    break
                done += 1
            # Snapshots are not events: the counters count what consumers see as events.
            self._published += sum(1 for m in self._inflight[:done] if not m.live)
            del self._inflight[:done]

    def _requeue_inflight(self) -> None:
        """After a connection loss: what was not acknowledged goes back to the front, in order.

        Messages acknowledged after an unacknowledged one are sent again too, so order is kept at the
        price of a duplicate (at-least-once)."""
        self._settle_inflight()
        with self._lock:
            for m in self._inflight:
                m.acked = False
                if m.live:
                    self._live_dirty[m.live] = None  # built anew when sent again
            self._buffer.extendleft(reversed([m for m in self._inflight if not m.live]))
            self._inflight.clear()
            self._trim_locked()
        if self._dropped_since_log:
            self._log_drops("buffer_full")

    async def close(self, timeout: float = 5.0) -> None:
        """Flush what is buffered, publish retained offline and disconnect; give up after ``timeout``.

        Idempotent. Events emitted after close() are dropped (counted)."""
        if not self._running:
            await asyncio.sleep(0)  # a run() task created just now gets to start, so it can flush
        self._closing = True
        if not self._running:
            self._drop_unsent_at_close()
            return
        assert self._stopped is not None and self._closing_event is not None and self._wake is not None
        if self._close_deadline is None:
            self._close_deadline = time.monotonic() + timeout
        self._closing_event.set()
        self._wake.set()
        try:
            await asyncio.wait_for(self._stopped.wait(), timeout + 2.0)
        except TimeoutError:
            log.error("mqtt.close_timeout timeout_s=%.1f (the publisher did not stop)", timeout)
            if self._task is not None:
                self._task.cancel()

    def _drop_unsent_at_close(self) -> None:
        with self._lock:
            unsent = len(self._buffer)
            self._buffer.clear()
            self._dropped += unsent
        if unsent:
            log.warning("mqtt.closed_with_unsent_events dropped=%d (run() never started)", unsent)

    async def __aenter__(self) -> Self:
        if self._task is not None:
            raise RuntimeError("MqttEvents is not reentrant")
        self._task = asyncio.create_task(self.run(), name="mqtt-events")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._task is not None
        task = self._task
        await self.close()
        with contextlib.suppress(asyncio.CancelledError):
            await task
