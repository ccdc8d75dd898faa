"""Metrics (kasuhara_ari/metrics.py): the hooks count what happened, the scrape-time gauges read the
spool and the connections, the endpoint refuses to leak off the host, and the shipped alert rules and
Grafana dashboard only name metrics that exist (and the rules pass ``promtool``).

Counters are process-wide: every test compares before and after (``delta``), never absolute values.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from test_call_logic import FakeAri, run_call

from kasuhara_ari import metrics
from kasuhara_ari.audit import AuditLog
from kasuhara_ari.config import MetricsConfig
from kasuhara_ari.events import NullEvents
from kasuhara_ari.metrics import REGISTRY, RUNTIME, RuntimeSources
from kasuhara_ari.storage import MemoryStore, StorageError

from conftest import REPO, skip_or_fail

DATA = REPO / "kasuhara_ari" / "data"
ALERTS = DATA / "prometheus" / "alerts.yml"
DASHBOARD = DATA / "grafana" / "kasuhara.json"


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@dataclass
class Delta:
    name: str
    labels: dict[str, str]
    before: float

    @property
    def now(self) -> float:
        return value(self.name, **self.labels) - self.before


def delta(name: str, **labels: str) -> Delta:
    return Delta(name, labels, value(name, **labels))


# --- hooks ---------------------------------------------------------------------------------------------


async def test_a_call_is_counted_by_direction_and_end_reason_and_leaves_no_active_call(
    tmp_path: Path,
) -> None:
    started = delta("kasuhara_calls_total", direction="inbound")
    ended = delta("kasuhara_calls_ended_total", direction="inbound", reason="agent_hungup")
    active = delta("kasuhara_calls_active", direction="inbound")
    meta, _ = await run_call(tmp_path, FakeAri())
    assert meta["end_reason"] == "agent_hungup"
    assert (started.now, ended.now, active.now) == (1, 1, 0)


def test_a_handed_over_call_is_active_in_the_process_that_carries_it() -> None:
    """A restart: the old serve's `handed_over` ends its count of the call, the new one's `resumed`
    starts it, and neither counts a second call started."""
    started = delta("kasuhara_calls_total", direction="inbound")
    active = delta("kasuhara_calls_active", direction="inbound")
    metrics.observe_call_event("started", {}, "inbound")
    metrics.observe_call_event("handed_over", {}, "inbound")
    assert (started.now, active.now) == (1, 0)
    metrics.observe_call_event("resumed", {"direction": "inbound"}, "inbound")
    assert (started.now, active.now) == (1, 1)
    metrics.observe_call_event("ended", {"reason": "caller_hungup"}, "inbound")
    assert (started.now, active.now) == (1, 0)


async def test_an_outbound_call_counts_as_outbound(tmp_path: Path) -> None:
    started = delta("kasuhara_calls_total", direction="outbound")
    await run_call(tmp_path, FakeAri(), outbound=True)
    assert started.now == 1


class FailingNotice(FakeAri):
    """The notice's playback fails (a prompt missing for the caller's language)."""

    async def play(
        self, channel_id: str, media: str, *, lang: str | None = None, playback_id: str | None = None
    ) -> Any:
        if "notice" not in media:
            return await super().play(channel_id, media, lang=lang, playback_id=playback_id)
        self.ops.append(("play", (channel_id, media, lang)))
        self._send({"type": "PlaybackFinished", "playback": {"id": playback_id, "state": "failed"}})
        return {"id": playback_id}


@pytest.mark.parametrize("outbound", [False, True], ids=["inbound", "outbound"])
async def test_a_notice_that_fails_is_counted_and_a_caller_hanging_up_during_it_is_not(
    tmp_path: Path, outbound: bool
) -> None:
    failures = delta("kasuhara_notice_failures_total")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    meta, _ = await run_call(tmp_path / "a", FailingNotice(), outbound=outbound)
    assert meta["notice_played"] is False
    assert failures.now == 1
    await run_call(tmp_path / "b", FakeAri(notice="hangup"))
    assert failures.now == 1


def test_detections_are_counted_by_the_kind_in_the_event_name() -> None:
    shouting = delta("kasuhara_detections_total", kind="shouting")
    monologue = delta("kasuhara_detections_total", kind="monologue")
    metrics.observe_call_event("monologue_detected", {"offset_s": 1.0}, "inbound")
    metrics.observe_call_event("shouting_detected", {}, "inbound")
    metrics.observe_call_event("agent_answered", {}, "inbound")
    assert (monologue.now, shouting.now) == (1, 1)


def test_escalations_by_action_and_a_tidy_result() -> None:
    pending = delta("kasuhara_escalations_total", action="flag", result="flagged_hold_pending_upload")
    metrics.observe_escalation("flag", "flagged (hold pending upload)")
    assert pending.now == 1
    assert metrics.label_value("") == "unknown"
    assert metrics.label_value("A" * 100) == "a" * 40


def test_retention_counts_real_sweeps_and_remembers_the_last_success() -> None:
    runs = delta("kasuhara_retention_runs_total", status="completed")
    deleted = delta("kasuhara_retention_deleted_objects_total")
    metrics.observe_retention("completed", {"objects_deleted": 4, "purged": 2}, dry_run=True)
    assert (runs.now, deleted.now) == (0, 0)  # a dry run proves nothing and deletes nothing
    before = time.time()
    metrics.observe_retention("completed", {"objects_deleted": 4, "purged": 2}, dry_run=False)
    assert (runs.now, deleted.now) == (1, 4)
    # Only a process that sweeps shows when it last succeeded (a serve process would look "never").
    assert value("kasuhara_retention_last_success_timestamp_seconds") == 0.0
    detach = RUNTIME.attach(RuntimeSources(retention=True))
    try:
        assert value("kasuhara_retention_last_success_timestamp_seconds") >= before
    finally:
        detach()
    metrics.observe_retention("failed", {"objects_deleted": 0, "purged": 0}, dry_run=False)
    assert value("kasuhara_retention_runs_total", status="failed") >= 1


async def test_an_audit_record_s3_refuses_is_counted() -> None:
    failures = delta("kasuhara_audit_write_failures_total")
    store = MemoryStore()
    store.down = True
    log = AuditLog(store, NullEvents(), by="tester", host="h")
    with pytest.raises(StorageError):
        await log.write(log.new("download", reason="test", result="ok", target={"call_id": "1.1"}))
    assert failures.now == 1


def test_s3_operations_never_carry_a_key() -> None:
    assert metrics.s3_operation("put recordings/2026/01/01/1.1.wav") == "put"
    assert metrics.s3_operation("legal hold recordings/x.wav") == "legal_hold"
    assert metrics.s3_operation("object lock config bucket") == "object_lock"
    assert metrics.s3_operation("delete 3 objects") == "delete"
    assert metrics.s3_operation("lifecycle") == "lifecycle"
    assert metrics.s3_operation("../../etc") == "other"


# --- state read at scrape time -------------------------------------------------------------------------


def test_the_spool_backlog_is_the_ended_calls_waiting_and_the_oldest_ones_age(tmp_path: Path) -> None:
    now = time.time()
    for name, age in (("1.1.json", 600), ("1.2.json", 60), ("1.3.wav", 9000), (".1.4.json.tmp", 9000)):
        path = tmp_path / name
        path.write_text("{}")
        os.utime(path, (now - age, now - age))
    pending, oldest = metrics.spool_backlog(tmp_path, now=now)
    assert pending == 2  # the in-call .wav and a temporary file are not waiting for upload
    assert 599 <= oldest <= 601
    assert metrics.spool_backlog(tmp_path / "missing") == (0, 0.0)


@dataclass
class FakeStats:
    buffered: int
    dropped: int
    rejected: int
    connected: bool


def test_the_runtime_collector_reads_its_sources_and_forgets_them_when_detached(tmp_path: Path) -> None:
    (tmp_path / "9.9.json").write_text("{}")
    connected = [True]
    detach = RUNTIME.attach(
        RuntimeSources(
            spool=tmp_path,
            ari_connected=lambda: connected[0],
            mqtt_stats=lambda: FakeStats(buffered=3, dropped=7, rejected=1, connected=True),
        )
    )
    try:
        assert value("kasuhara_spool_recordings_pending") == 1
        assert value("kasuhara_ari_connected") == 1
        connected[0] = False
        assert value("kasuhara_ari_connected") == 0
        assert value("kasuhara_mqtt_buffered_events") == 3
        assert value("kasuhara_mqtt_dropped_events_total") == 7
        assert value("kasuhara_mqtt_connected") == 1
    finally:
        detach()
    assert REGISTRY.get_sample_value("kasuhara_ari_connected") is None


def test_no_label_names_a_call() -> None:
    """The naming guide and the brief: no per-call labels (call ids, numbers, agents)."""
    allowed = {"direction", "reason", "action", "result", "kind", "status", "operation", "method", "le"}
    for family in REGISTRY.collect():
        assert family.name.startswith(("kasuhara_", "process_")), family.name
        for sample in family.samples:
            assert set(sample.labels) <= allowed, (sample.name, sample.labels)


# --- the endpoint --------------------------------------------------------------------------------------


def test_metrics_are_served_over_http_in_their_own_thread() -> None:
    server = metrics.serve_metrics(MetricsConfig(enabled=True, bind="127.0.0.1"), 0)
    assert server is not None
    try:
        text = httpx.get(server.url, timeout=5).text
    finally:
        server.close()
    names = {name for name, _, _ in metrics.iter_samples(text)}
    assert "kasuhara_uploads_total" in names and "process_start_time_seconds" in names
    assert metrics.serve_metrics(MetricsConfig(enabled=False), 0) is None


@pytest.mark.parametrize("bind", ["0.0.0.0", "192.0.2.1", "metrics.example.jp", "::"])
def test_a_non_loopback_bind_is_refused_unless_allowed(bind: str) -> None:
    with pytest.raises(metrics.MetricsSetupError, match="allow_remote"):
        metrics.serve_metrics(MetricsConfig(enabled=True, bind=bind), 0)
    assert metrics.bind_refusal(MetricsConfig(enabled=True, bind=bind, allow_remote=True)) is None


def test_kasuhara_serve_with_a_public_metrics_bind_exits_2_before_starting(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KASUHARA_")}
    env.update(
        {
            "KASUHARA_METRICS__ENABLED": "true",
            "KASUHARA_METRICS__BIND": "0.0.0.0",
            "KASUHARA_ARI__URL": "http://127.0.0.1:1",
            "KASUHARA_RECORDING__LOCAL_DIR": str(tmp_path),
        }
    )
    proc = subprocess.run(
        [sys.executable, "-m", "kasuhara_ari.cli", "serve"],
        env=env,
        cwd=REPO,  # this checkout's code (the shared venv's editable install may point at another)
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "metrics.allow_remote" in proc.stderr


def test_a_taken_port_is_logged_and_the_command_runs_on(caplog: pytest.LogCaptureFixture) -> None:
    first = metrics.serve_metrics(MetricsConfig(enabled=True), 0)
    assert first is not None
    try:
        with metrics.exposed(MetricsConfig(enabled=True), first.address[1]) as second:
            assert second is None
        assert "metrics event=not_listening" in caplog.text
    finally:
        first.close()


# --- what ships: alert rules and the dashboard ---------------------------------------------------------

_NAME = re.compile(r"\b(?:kasuhara|process)_[a-z0-9_]+\b")


def rule_exprs() -> list[str]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in doc["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    import json

    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in doc["panels"] for t in panel["targets"]]
    exprs += [v["definition"] for v in doc["templating"]["list"] if "definition" in v]
    return exprs


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_every_metric_the_rules_and_dashboard_name_exists(source: str) -> None:
    exprs = rule_exprs() if source == "alerts" else dashboard_exprs()
    named = {name for expr in exprs for name in _NAME.findall(expr)}
    assert named, source
    missing = named - metrics.metric_names()
    assert not missing, f"{source} names metrics the registry does not have: {sorted(missing)}"


def test_the_alerts_the_issue_asks_for_are_there() -> None:
    joined = "\n".join(rule_exprs())
    for name in (
        "kasuhara_spool_recordings_pending",
        "kasuhara_retention_last_success_timestamp_seconds",
        "kasuhara_notice_failures_total",
        "kasuhara_ari_connected",
    ):
        assert name in joined, name


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        skip_or_fail("promtool is not installed (Debian package prometheus; scripts/bootstrap)")
    assert path is not None
    return path


def test_the_alert_rules_pass_promtool_check() -> None:
    proc = subprocess.run([_promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 9 rules found" in proc.stdout


def _expected(alert: str, instance: str, value: str = "") -> dict[str, Any]:
    """What promtool must see for ``alert`` on ``instance``: its labels and its annotations rendered."""
    doc = yaml.safe_load(ALERTS.read_text())
    rule = next(r for g in doc["groups"] for r in g["rules"] if r.get("alert") == alert)

    def render(text: str) -> str:
        return text.replace("{{ $labels.instance }}", instance).replace("{{ $value | humanize }}", value)

    return {
        "exp_labels": {**rule["labels"], "instance": instance, "job": "kasuhara"},
        "exp_annotations": {k: render(v) for k, v in rule["annotations"].items()},
    }


def test_the_alert_rules_fire_when_they_should(tmp_path: Path) -> None:
    """promtool's unit tests of the rules: each alert fires on the series that should make it fire, and
    the retention alert stays quiet for a daemon younger than two days."""
    serve, retention = 'instance="pbx:9464", job="kasuhara"', 'instance="pbx:9466", job="kasuhara"'
    young = 'instance="young:9466", job="kasuhara"'
    tests = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": f"kasuhara_ari_connected{{{serve}}}", "values": "1 1 0 0 0 0 0"},
                    {"series": f"kasuhara_notice_failures_total{{{serve}}}", "values": "0 0 1 1 1 1 1"},
                    # overloaded from minute 2 on, another node only for one minute (not long enough)
                    {"series": f"kasuhara_overloaded{{{serve}}}", "values": "0 0 1 1 1 1 1"},
                    {"series": f"kasuhara_overloaded{{{young}}}", "values": "0 0 0 0 0 1 0"},
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "6m",
                        "alertname": "KasuharaBoxOverloaded",
                        "exp_alerts": [_expected("KasuharaBoxOverloaded", "pbx:9464")],
                    },
                    {
                        "eval_time": "6m",
                        "alertname": "KasuharaAriDisconnected",
                        "exp_alerts": [_expected("KasuharaAriDisconnected", "pbx:9464")],
                    },
                    {
                        "eval_time": "6m",
                        "alertname": "KasuharaNoticeFailures",
                        "exp_alerts": [_expected("KasuharaNoticeFailures", "pbx:9464", "1")],
                    },
                ],
            },
            {
                "interval": "1m",
                "input_series": [
                    # two daemons that never completed a sweep: one started at 0, one at 47 h (its
                    # "never" is 3 hours old at 50 h: it has not missed a sweep yet)
                    {
                        "series": f"kasuhara_retention_last_success_timestamp_seconds{{{retention}}}",
                        "values": "0x3100",
                    },
                    {"series": f"process_start_time_seconds{{{retention}}}", "values": "0x3100"},
                    {
                        "series": f"kasuhara_retention_last_success_timestamp_seconds{{{young}}}",
                        "values": "0x3100",
                    },
                    {"series": f"process_start_time_seconds{{{young}}}", "values": "169200x3100"},
                ],
                "alert_rule_test": [
                    {"eval_time": "24h", "alertname": "KasuharaRetentionNotRun", "exp_alerts": []},
                    {
                        "eval_time": "50h",
                        "alertname": "KasuharaRetentionNotRun",
                        "exp_alerts": [_expected("KasuharaRetentionNotRun", "pbx:9466")],
                    },
                ],
            },
        ],
    }
    path = tmp_path / "rules_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    proc = subprocess.run([_promtool(), "test", "rules", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rules_and_dashboard_ship_in_the_wheel() -> None:
    import tomllib

    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "data/prometheus/*.yml" in data["kasuhara_ari"]
    assert "data/grafana/*.json" in data["kasuhara_ari"]


@pytest.fixture(autouse=True)
def _no_leftover_sources() -> Iterator[None]:
    yield
    assert not RUNTIME._sources, "a test left a metrics source attached"
