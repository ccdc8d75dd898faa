"""Prometheus metrics: one registry of this app's own, every metric object, and the ``/metrics`` server.

The registry is not ``prometheus_client``'s global one, so a library that registers its own metrics, or
a test that imports both, never collides with ours; one process exposes one registry, whichever commands
(``serve``, ``agi``, ``retention daemon``) it runs. Names follow the Prometheus naming guide: the
``kasuhara_`` prefix, base units (seconds, bytes), ``_total`` on counters (``prometheus_client`` adds it
to a :class:`~prometheus_client.Counter`'s name). No label ever names a call, a number or an agent: only
small, code-defined sets (direction, end reason, escalation action and result, detection kind, S3
operation, ARI method, AMI action).

Hooks are plain function calls on the hot path (a counter increment is a few hundred nanoseconds under
``prometheus_client``'s own lock; see ``scripts/bench_metrics.py``). What is a state rather than a count —
the spool's backlog, whether ARI and MQTT are connected, the MQTT buffer — is read at scrape time by
:class:`RuntimeCollector` from the objects that own it (in the scrape's thread, never on the event loop).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from .config import MetricsConfig, is_loopback

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

log = logging.getLogger(__name__)

# No ``*_created`` series: they double a scrape's size and nothing here needs them (process-wide, and
# this process is ours).
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client
REGISTRY = CollectorRegistry(auto_describe=True)

#: ARI/AMI answer in milliseconds on a quiet box and in seconds on a loaded one.
_RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
#: S3 requests range from a HEAD (milliseconds) to a multi-part recording upload (tens of seconds).
_S3_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# --- calls ---------------------------------------------------------------------------------------------
CALLS = Counter("kasuhara_calls", "Calls started, by direction.", ["direction"], registry=REGISTRY)
CALLS_ENDED = Counter(
    "kasuhara_calls_ended",
    "Calls ended, by direction and end reason.",
    ["direction", "reason"],
    registry=REGISTRY,
)
CALLS_ACTIVE = Gauge(
    "kasuhara_calls_active", "Calls in progress, by direction.", ["direction"], registry=REGISTRY
)
#: How late Asterisk's StasisStart for a new call reached the app (kasuhara_ari/overload.py).
STASIS_START_LATENESS = Histogram(
    "kasuhara_stasis_start_lateness_seconds",
    "How late a new call's StasisStart reached the app (after the clock offset).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
OVERLOADED = Gauge(
    "kasuhara_overloaded",
    "1 while new calls reach the app late (the box is past its limit).",
    registry=REGISTRY,
)
OVERLOAD_EPISODES = Counter(
    "kasuhara_overload_episodes",
    "Times the box became overloaded (see kasuhara_overloaded).",
    registry=REGISTRY,
)
NOTICE_FAILURES = Counter(
    "kasuhara_notice_failures",
    "Calls whose recording notice did not play to the end (the caller hung up during it is not one).",
    registry=REGISTRY,
)
ESCALATIONS = Counter(
    "kasuhara_escalations",
    "Escalations (flag, warn, warn_and_hangup, supervisor), by action and result.",
    ["action", "result"],
    registry=REGISTRY,
)
DETECTIONS = Counter(
    "kasuhara_detections",
    "Live detections (monologue, talk_over, ...), by kind.",
    ["kind"],
    registry=REGISTRY,
)

# --- recordings ----------------------------------------------------------------------------------------
UPLOADS = Counter("kasuhara_uploads", "Recordings stored in S3 (audio and metadata).", registry=REGISTRY)
UPLOADED_BYTES = Counter("kasuhara_uploaded_bytes", "Audio bytes stored in S3.", registry=REGISTRY)
UPLOAD_FAILURES = Counter(
    "kasuhara_upload_failures", "Upload attempts that failed (retried later).", registry=REGISTRY
)

# --- requests ------------------------------------------------------------------------------------------
S3_REQUEST_SECONDS = Histogram(
    "kasuhara_s3_request_duration_seconds",
    "S3 requests (failed ones too), by operation.",
    ["operation"],
    buckets=_S3_BUCKETS,
    registry=REGISTRY,
)
ARI_REQUEST_SECONDS = Histogram(
    "kasuhara_ari_request_duration_seconds",
    "ARI REST requests (failed ones too), by HTTP method.",
    ["method"],
    buckets=_RPC_BUCKETS,
    registry=REGISTRY,
)
AMI_REQUEST_SECONDS = Histogram(
    "kasuhara_ami_action_duration_seconds",
    "AMI actions (failed ones too), by action.",
    ["action"],
    buckets=_RPC_BUCKETS,
    registry=REGISTRY,
)

# --- retention and audit -------------------------------------------------------------------------------
RETENTION_RUNS = Counter(
    "kasuhara_retention_runs", "Retention sweeps, by status.", ["status"], registry=REGISTRY
)
RETENTION_DELETED_OBJECTS = Counter(
    "kasuhara_retention_deleted_objects", "Object versions deleted by retention sweeps.", registry=REGISTRY
)
RETENTION_PURGED_RECORDINGS = Counter(
    "kasuhara_retention_purged_recordings", "Recordings purged by retention sweeps.", registry=REGISTRY
)
AUDIT_WRITE_FAILURES = Counter(
    "kasuhara_audit_write_failures",
    "Audit records S3 did not take (the action's caller sees the error).",
    registry=REGISTRY,
)

#: When this process's last retention sweep completed (0: none yet); read by :class:`RuntimeCollector`.
_retention_last_success = [0.0]

#: Every ``*_detected`` call event is a detection of the kind before the suffix.
_DETECTED = "_detected"
_LABEL_VALUE = re.compile(r"[^a-z0-9]+")


def label_value(text: object, *, limit: int = 40) -> str:
    """A short, tidy label value from a code-defined string (``flagged (hold pending upload)`` →
    ``flagged_hold_pending_upload``): never a free-form one."""
    return _LABEL_VALUE.sub("_", str(text).lower()).strip("_")[:limit] or "unknown"


def observe_call_event(event: str, fields: Mapping[str, Any], direction: str) -> None:
    """Count what a call's event says (Call.emit calls this for every event of every call)."""
    if event == "started":
        CALLS.labels(direction).inc()
        CALLS_ACTIVE.labels(direction).inc()
    elif event == "ended":
        CALLS_ENDED.labels(direction, label_value(fields.get("reason", "normal"))).inc()
        CALLS_ACTIVE.labels(direction).dec()
    # A restart hands talking calls over: active here until handed over, active there once resumed
    # (counted as started by the process they started in).
    elif event == "handed_over":
        CALLS_ACTIVE.labels(direction).dec()
    elif event == "resumed":
        CALLS_ACTIVE.labels(direction).inc()
    elif event.endswith(_DETECTED):
        DETECTIONS.labels(event[: -len(_DETECTED)]).inc()


def observe_escalation(action: str, result: str) -> None:
    ESCALATIONS.labels(label_value(action), label_value(result)).inc()


def observe_retention(status: str, counts: Mapping[str, Any], *, dry_run: bool) -> None:
    """One finished sweep: a dry run deletes nothing and proves nothing about retention running."""
    if dry_run:
        return
    RETENTION_RUNS.labels(label_value(status)).inc()
    if status == "completed":
        _retention_last_success[0] = time.time()
    RETENTION_DELETED_OBJECTS.inc(int(counts.get("objects_deleted", 0)))
    RETENTION_PURGED_RECORDINGS.inc(int(counts.get("purged", 0)))


def s3_operation(what: str) -> str:
    """The operation of a MinioStore request description (``put recordings/…`` → ``put``): the key
    and bucket never become a label."""
    head = what.split(" ", 2)
    if head[0] in ("legal", "object", "ensure") and len(head) > 1:
        return f"{head[0]}_{head[1]}"
    return head[0] if head[0].isalpha() else "other"


# --- state read at scrape time -------------------------------------------------------------------------


@dataclass
class RuntimeSources:
    """What one running command lets the scrape read: its spool, its ARI connection, its MQTT publisher."""

    spool: Path | None = None
    ari_connected: Callable[[], bool] | None = None
    mqtt_stats: Callable[[], Any] | None = None
    #: ``retention daemon``: only a process that sweeps reports when the last sweep succeeded (an alert
    #: on a serve process's "never" would be a false one).
    retention: bool = False


def spool_backlog(directory: Path, now: float | None = None) -> tuple[int, float]:
    """Recordings waiting for upload in ``directory`` (a ``<call_id>.json``: the call has ended) and the
    oldest one's age in seconds: one ``scandir`` and a stat per metadata file."""
    now = time.time() if now is None else now
    pending = 0
    oldest: float | None = None
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if not entry.name.endswith(".json") or entry.name.startswith("."):
                    continue
                try:
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                except OSError:
                    continue
                pending += 1
                oldest = mtime if oldest is None else min(oldest, mtime)
    except OSError:
        return 0, 0.0
    return pending, 0.0 if oldest is None else max(0.0, now - oldest)


class RuntimeCollector(Collector):
    """Gauges and counters read from the running commands' objects when Prometheus scrapes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sources: list[RuntimeSources] = []

    def attach(self, sources: RuntimeSources) -> Callable[[], None]:
        """Start reporting ``sources``; call the returned function when the command stops."""
        with self._lock:
            self._sources.append(sources)

        def detach() -> None:
            with self._lock:
                if sources in self._sources:
                    self._sources.remove(sources)

        return detach

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            sources = list(self._sources)
        return self._families(sources)

    def _families(self, sources: list[RuntimeSources] | None = None) -> list[Metric]:
        pending = GaugeMetricFamily(
            "kasuhara_spool_recordings_pending", "Ended calls' recordings in the spool waiting for upload."
        )
        oldest = GaugeMetricFamily(
            "kasuhara_spool_oldest_pending_age_seconds",
            "Age of the oldest recording waiting for upload (0: none waiting).",
        )
        ari = GaugeMetricFamily("kasuhara_ari_connected", "1 while the ARI event websocket is connected.")
        mqtt = GaugeMetricFamily("kasuhara_mqtt_connected", "1 while the MQTT publisher is connected.")
        buffered = GaugeMetricFamily(
            "kasuhara_mqtt_buffered_events", "Events waiting for the broker (in flight included)."
        )
        dropped = CounterMetricFamily(
            "kasuhara_mqtt_dropped_events", "Events dropped: pushed out of a full buffer, or unsent at close."
        )
        rejected = CounterMetricFamily(
            "kasuhara_mqtt_rejected_events", "Events refused (unsafe name or call id, not JSON, too large)."
        )
        retention = GaugeMetricFamily(
            "kasuhara_retention_last_success_timestamp_seconds",
            "When the last retention sweep completed (Unix time; 0: none since this daemon started).",
        )
        families: list[Metric] = [pending, oldest, ari, mqtt, buffered, dropped, rejected, retention]
        if sources is None:
            return families
        spools = {s.spool for s in sources if s.spool is not None}
        if spools:
            backlog = [spool_backlog(p) for p in spools]
            pending.add_metric([], sum(b[0] for b in backlog))
            oldest.add_metric([], max(b[1] for b in backlog))
        aris = [s.ari_connected for s in sources if s.ari_connected is not None]
        if aris:
            ari.add_metric([], float(all(f() for f in aris)))
        if any(s.retention for s in sources):
            retention.add_metric([], _retention_last_success[0])
        stats = [s.mqtt_stats() for s in sources if s.mqtt_stats is not None]
        if stats:
            mqtt.add_metric([], float(all(st.connected for st in stats)))
            buffered.add_metric([], sum(st.buffered for st in stats))
            dropped.add_metric([], sum(st.dropped for st in stats))
            rejected.add_metric([], sum(st.rejected for st in stats))
        return families


RUNTIME = RuntimeCollector()
REGISTRY.register(RUNTIME)
#: process_start_time_seconds, CPU, memory, open files of this process (the alert rules use the start
#: time: a daemon younger than two days has not missed a sweep).
ProcessCollector(registry=REGISTRY)


def metric_names(registry: CollectorRegistry = REGISTRY) -> set[str]:
    """Every sample name the registry can expose (``_total``, ``_bucket``, ``_sum``, … included)."""
    names: set[str] = set()
    for family in registry.collect():
        names.add(family.name)
        if family.type == "counter":
            names.update({family.name + "_total", family.name + "_created"})
        elif family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_sum", "_count", "_created"))
        names.update(sample.name for sample in family.samples)
    return names


# --- the endpoint --------------------------------------------------------------------------------------


class MetricsSetupError(ValueError):
    """``[metrics]`` asks for something the command will not do (a non-loopback bind without consent)."""


def bind_refusal(cfg: MetricsConfig) -> str | None:
    """Why ``/metrics`` must not listen on ``metrics.bind``, or None: call volumes, end reasons and
    escalations are nobody else's business, and the endpoint has no authentication."""
    if is_loopback(cfg.bind) or cfg.allow_remote:
        return None
    return (
        f"metrics.bind = {cfg.bind!r} is not a loopback address and /metrics has no authentication: "
        "scrape it through the host (or a TLS proxy), or set metrics.allow_remote = true"
    )


@dataclass
class MetricsServer:
    """``/metrics`` on its own small HTTP server, in a daemon thread (a scrape never touches the loop)."""

    address: tuple[str, int]
    _server: WSGIServer
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(cfg: MetricsConfig, port: int) -> MetricsServer | None:
    """Start ``/metrics`` on ``metrics.bind``:``port`` when metrics are on (None when off). Raises
    :class:`MetricsSetupError` for a refused bind and ``OSError`` when the port is taken."""
    if not cfg.enabled:
        return None
    refusal = bind_refusal(cfg)
    if refusal is not None:
        raise MetricsSetupError(refusal)
    host = cfg.bind.strip().strip("[]")
    server, thread = start_http_server(port, addr=host, registry=REGISTRY)
    bound = server.server_address
    running = MetricsServer((host, int(bound[1])), server, thread)
    log.info("metrics event=listening url=%s", running.url)
    return running


@contextlib.contextmanager
def exposed(cfg: MetricsConfig, port: int) -> Iterator[MetricsServer | None]:
    """``/metrics`` for as long as a command runs. A refused bind raises :class:`MetricsSetupError` (the
    command exits 2); a port already taken is logged and the command runs without it: calls and their
    recordings matter more than their metrics (and ``kasuhara doctor`` says the endpoint is missing)."""
    try:
        server = serve_metrics(cfg, port)
    except OSError as exc:
        log.error("metrics event=not_listening bind=%s port=%d error=%s", cfg.bind, port, exc.strerror or exc)
        server = None
    try:
        yield server
    finally:
        if server is not None:
            server.close()


def iter_samples(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """Samples of a text exposition (for tests, the benchmark and ``kasuhara doctor``)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            yield sample.name, dict(sample.labels), float(sample.value)
