"""The MQTT event publisher: routing and payload rules (pure), and delivery against a real mosquitto.

The broker fixtures here start private mosquitto instances (so a test may stop and restart its broker);
they are written to move into conftest.py unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import getpass
import json
import logging
import math
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from asyncio.subprocess import Process
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from kasuhara_ari.events import (
    CALL_EVENTS,
    MAX_PAYLOAD_BYTES,
    EventNameError,
    MemoryEvents,
    MqttEvents,
    NullEvents,
    build_payload,
    check_prefix,
    now_iso,
    topic_for,
)
from kasuhara_ari.schemas import validate_event

from conftest import REPO, skip_or_fail

# --- fixtures (movable to conftest.py) -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Mosquitto:
    """A private mosquitto on a free port; stop() and start() keep the port and (persistent) sessions."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            f"user {getpass.getuser()}\n"  # as root, mosquitto would switch to a user who cannot write here
            "persistence true\n"
            f"persistence_location {workdir}/\n"
            "log_dest stderr\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.workdir / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=log, stderr=log)
        for _ in range(200):
            if port_open(self.port):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not start: {(self.workdir / 'mosquitto.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


def _mosquitto_binary() -> str:
    binary = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else ""
    )
    if not binary:
        skip_or_fail("mosquitto is not installed (apt-get install mosquitto)")
    return binary


@contextlib.contextmanager
def running_mosquitto(workdir: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(_mosquitto_binary(), workdir)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A broker shared by the tests of this module (each test uses its own topic prefix)."""
    with running_mosquitto(tmp_path_factory.mktemp("mosquitto")) as broker:
        yield broker


@pytest.fixture
def own_mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker for one test, which it may stop and start."""
    with running_mosquitto(tmp_path / "broker") as broker:
        yield broker


@pytest.fixture
def prefix() -> str:
    return f"kasuhara-test/{uuid.uuid4().hex[:12]}"


class Collector:
    """Subscribes to ``<prefix>/#`` and keeps (topic, payload, retained) of every message.

    With ``session`` set it uses a persistent session and reconnects, so nothing is lost while its
    broker restarts."""

    def __init__(self, port: int, prefix: str, *, session: str | None = None) -> None:
        self.port = port
        self.prefix = prefix
        self.session = session
        self.messages: list[tuple[str, dict[str, Any], bool]] = []
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1",
                    self.port,
                    identifier=self.session,
                    clean_session=False if self.session else None,
                    keepalive=5,
                ) as client:
                    await client.subscribe(f"{self.prefix}/#", qos=1)
                    self.subscribed.set()
                    async for message in client.messages:
                        assert isinstance(message.payload, bytes)
                        if "/live/" in message.topic.value:
                            continue  # the service's retained call snapshots are state, not events
                        self.messages.append(
                            (message.topic.value, json.loads(message.payload), bool(message.retain))
                        )
            except aiomqtt.MqttError:
                if self.session is None:
                    raise
                await asyncio.sleep(0.1)

    async def __aenter__(self) -> Collector:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self.subscribed.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def calls(self) -> list[dict[str, Any]]:
        return [p for t, p, _ in self.messages if not t.endswith("/status")]

    def statuses(self) -> list[dict[str, Any]]:
        return [p for t, p, _ in self.messages if t == f"{self.prefix}/status"]

    async def wait_for(self, condition: Callable[[Collector], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition(self):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; got {[(t, p.get('event')) for t, p, _ in self.messages]}")
            await asyncio.sleep(0.02)


async def retained_status(port: int, prefix: str, node: str = "") -> dict[str, Any]:
    """What a newcomer sees on ``<prefix>/status`` (``<prefix>/status/<node>`` with ``node``)."""
    topic = f"{prefix}/status/{node}" if node else f"{prefix}/status"
    async with Collector(port, topic) as probe:
        await probe.wait_for(lambda c: any(t == topic for t, _, _ in c.messages), timeout=10)
    _, payload, retained = next(m for m in probe.messages if m[0] == topic)
    assert retained, "status must be retained"
    return payload


async def until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def first_seen(seqs: list[int]) -> list[int]:
    """The order in which distinct seq values first arrived (re-sends after a reconnect are allowed)."""
    return list(dict.fromkeys(seqs))


# --- pure rules -----------------------------------------------------------------------------------------


def test_topics_for_call_retention_and_audit_events() -> None:
    assert topic_for("kasuhara", "started", "1738282502.17") == "kasuhara/calls/1738282502.17/started"
    assert topic_for("site-1/kasuhara", "retention.purged", None) == "site-1/kasuhara/retention/purged"
    assert topic_for("kasuhara", "retention.purged", "c1") == "kasuhara/retention/purged"
    assert topic_for("kasuhara", "audit.download", "c1") == "kasuhara/audit/download"


BAD_CALL_IDS = ["a/b", "+", "#", "a+b", "a#", "x\x00y", "caf\u00e9", "", " c1", "..", "a..b", "-x", "a" * 129]
BAD_EVENTS = [
    "ended/x",
    "+",
    "#",
    "end\x00ed",
    "énded",
    "",
    "retention.",
    "retention.a/b",
    "audit.#",
    "x.y",
    "status",
]


@pytest.mark.parametrize("call_id", BAD_CALL_IDS)
def test_unsafe_call_ids_never_make_a_topic(call_id: str) -> None:
    with pytest.raises(EventNameError):
        topic_for("kasuhara", "started", call_id)


@pytest.mark.parametrize("event", BAD_EVENTS)
def test_unsafe_event_names_never_make_a_topic(event: str) -> None:
    with pytest.raises(EventNameError):
        topic_for("kasuhara", event, "c1")


def test_a_call_event_needs_a_call_id() -> None:
    with pytest.raises(EventNameError, match="needs a call_id"):
        topic_for("kasuhara", "started", None)


@pytest.mark.parametrize("bad", ["", "a//b", "a/+", "#", "a/b/", "k\x00"])
def test_unsafe_prefixes_are_refused_at_construction(bad: str) -> None:
    with pytest.raises(EventNameError):
        check_prefix(bad)
    with pytest.raises(ValueError, match="prefix"):
        MqttEvents(topic_prefix=bad)


def test_payload_shape() -> None:
    when = dt.datetime(2025, 1, 31, 0, 15, 2, 123456, tzinfo=dt.UTC)
    payload = build_payload(
        "ended", None, {"call_id": "c1", "schema": "evil", "event": "evil", "duration_s": 1.0, "at": when}
    )
    assert list(payload)[:4] == ["schema", "event", "at", "call_id"]
    assert payload["schema"] == "kasuhara.event/1"
    assert payload["event"] == "ended"
    assert payload["call_id"] == "c1"
    assert payload["at"] == when  # encoded later, see below
    events = MqttEvents(topic_prefix="t")
    events.emit("ended", "c1", duration_s=1.0, at=when, tags={"b", "a"}, path=Path("/x"))
    message = events._buffer[0]
    body = json.loads(message.payload)
    assert body["at"] == "2025-01-31T00:15:02.123+00:00"
    assert body["tags"] == ["a", "b"]
    assert body["path"] == "/x"
    assert body["seq"] == 1
    validate_event(body)


def test_now_iso_has_milliseconds_and_offset() -> None:
    validate_event(build_payload("caller_hungup", "c1", {"at": now_iso()}))


def test_emit_never_raises_and_counts_rejections(caplog: pytest.LogCaptureFixture) -> None:
    events = MqttEvents(topic_prefix="t", log_interval_s=3600)
    caplog.set_level(logging.ERROR, logger="kasuhara_ari.events")
    events.emit("ended", "a/b")
    events.emit("ended", "c1", duration_s=math.nan)  # not JSON
    events.emit("ended", "c1", blob="x" * (MAX_PAYLOAD_BYTES + 1))
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    events.emit("ended", "c1", duration_s=1, loop=cyclic)
    events.emit(None, "c1")  # type: ignore[arg-type]
    stats = events.stats
    assert stats.rejected == 5
    assert stats.accepted == 0 and stats.buffered == 0
    rejected = [r for r in caplog.records if "mqtt.event_rejected" in r.getMessage()]
    assert len(rejected) == 1, "rejections are logged rate-limited"
    events.emit("ended", "c1", duration_s=2.0)
    assert json.loads(events._buffer[0].payload)["seq"] == 1, "a rejected event takes no seq"


def test_unknown_or_incomplete_events_are_published_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    events = MqttEvents(topic_prefix="t")
    caplog.set_level(logging.WARNING, logger="kasuhara_ari.events")
    events.emit("made_up", "c1")
    events.emit("made_up", "c1")
    events.emit("agent_answered", "c1")
    assert events.stats.accepted == 3
    warnings = [r.getMessage() for r in caplog.records if "mqtt.event_off_schema" in r.getMessage()]
    assert len(warnings) == 2
    assert "missing required fields ['agent']" in warnings[1]


def test_full_buffer_drops_the_oldest_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    events = MqttEvents(topic_prefix="t", buffer_size=5, log_interval_s=3600)
    caplog.set_level(logging.WARNING, logger="kasuhara_ari.events")
    for i in range(12):
        events.emit("long_call", "c1", duration_s=float(i))
    stats = events.stats
    assert (stats.accepted, stats.dropped, stats.buffered) == (12, 7, 5)
    assert [m.seq for m in events._buffer] == [8, 9, 10, 11, 12]
    drops = [r.getMessage() for r in caplog.records if "mqtt.events_dropped" in r.getMessage()]
    assert len(drops) == 1 and "dropped=1 " in drops[0]


def test_memory_and_null_sinks() -> None:
    memory = MemoryEvents()
    memory.emit("started", "c1", direction="inbound")
    assert memory.events[0]["call_id"] == "c1"
    NullEvents().emit("started", "c1", direction="inbound")


async def test_close_without_run_drops_and_later_emits_are_dropped() -> None:
    events = MqttEvents(topic_prefix="t")
    events.emit("caller_hungup", "c1")
    await events.close()
    events.emit("caller_hungup", "c1")
    assert events.stats.dropped == 2 and events.stats.buffered == 0


# --- against a real mosquitto ---------------------------------------------------------------------------


def _one_of_each(call_id: str) -> list[tuple[str, str | None, dict[str, Any]]]:
    fields: dict[str, dict[str, Any]] = {
        "started": {
            "direction": "inbound",
            "caller": {"number": "0312345678", "name": "山田"},
            "target": "PJSIP/a",
        },
        "agent_answered": {"agent": "PJSIP/agent"},
        "agent_ringing": {"target": "PJSIP/agent"},
        "agent_unavailable": {"target": "PJSIP/agent", "reason": "busy"},
        "agent_left": {"supervisor": "PJSIP/supervisor"},
        "customer_ringing": {"target": "PJSIP/customer"},
        "customer_answered": {"target": "PJSIP/customer"},
        "time_limit": {"duration_s": 1800.0, "budget_s": 1800},
        "caller_listed": {"action": "refuse"},
        "escalation_requested": {"key": "*9", "by": "agent", "supervisors": ["PJSIP/s1"]},
        "supervisor_ringing": {"supervisor": "PJSIP/s1", "attempt": 1},
        "supervisor_joined": {"supervisor": "PJSIP/s1", "attempt": 1},
        "ended": {"duration_s": 61.5, "reason": "normal"},
        "resumed": {"direction": "inbound", "agent": "PJSIP/agent", "flags": ["harassment"]},
        "recording_stored": {"key": f"recordings/2025/01/31/{call_id}.wav", "bytes": 10, "sha256": "0" * 64},
        "long_call": {"duration_s": 1800.0},
        "repeat_caller": {"count": 4},
        "recording_failed": {"error": "AMI not connected"},
        "metadata_quarantined": {"reason": "nested too deeply", "quarantined": "quarantine/x", "held": False},
        "hold_incomplete": {"reason": "legal_hold_refused", "keys": ["recordings/x.wav"], "record": True},
        "monologue_detected": {"offset_s": 70.2, "mode": "observe", "talking_s": 60.0, "caller_share": 0.9},
        "talk_over_detected": {"offset_s": 90.0, "mode": "act", "attempts": 3, "window_s": 60.0},
        "shouting_detected": {
            "offset_s": 41.3,
            "mode": "observe",
            "level_dbfs": -12.3,
            "baseline_dbfs": -27.9,
            "duration_s": 1.1,
        },
        "custom_detected": {"offset_s": 12.0, "mode": "observe", "kind": "keyword"},
        "detection_alert": {"kind": "shouting", "offset_s": 41.3},
        "agent_cooldown_started": {
            "agent": "agent1",
            "trigger": "flag",
            "duration_s": 300.0,
            "until": "2025-01-31T09:20:02.123+00:00",
            "interface": "PJSIP/agent1",
            "queue_paused": True,
        },
        "agent_cooldown_ended": {"agent": "agent1", "reason": "expired", "by": None},
    }
    out: list[tuple[str, str | None, dict[str, Any]]] = [
        (event, call_id, fields.get(event, {})) for event in CALL_EVENTS
    ]
    out.append(("retention.purged", call_id, {"key": f"recordings/2025/01/31/{call_id}.wav"}))
    out.append(("retention.sweep_finished", None, {"purged": 1, "held": 0}))
    out.append(("audit.download", call_id, {"by": "alice"}))
    return out


@pytest.mark.integration
async def test_events_arrive_in_order_on_their_topics_and_validate(mosquitto: Mosquitto, prefix: str) -> None:
    sent = _one_of_each("1738282502.17")
    async with Collector(mosquitto.port, prefix) as sub:
        async with MqttEvents(port=mosquitto.port, topic_prefix=prefix) as events:
            for event, call_id, fields in sent:
                events.emit(event, call_id, **fields)
            await sub.wait_for(lambda c: len(c.calls()) == len(sent))
        await sub.wait_for(lambda c: any(s["state"] == "offline" for s in c.statuses()))
    received = [(t, p) for t, p, _ in sub.messages]
    for _, payload in received:
        validate_event(payload)
    calls = [(t, p) for t, p in received if not t.endswith("/status")]
    assert [p["event"] for _, p in calls] == [e for e, _, _ in sent]
    assert [p["seq"] for _, p in calls] == list(range(1, len(sent) + 1))
    assert calls[0][0] == f"{prefix}/calls/1738282502.17/started"
    assert calls[0][1]["caller"] == {"number": "0312345678", "name": "山田"}
    assert calls[-3][0] == f"{prefix}/retention/purged"
    assert calls[-2][0] == f"{prefix}/retention/sweep_finished" and "call_id" not in calls[-2][1]
    assert calls[-1][0] == f"{prefix}/audit/download"
    assert [s["state"] for s in sub.statuses()] == ["online", "offline"]
    assert events.stats.published == len(sent) and events.stats.dropped == 0


@pytest.mark.integration
async def test_status_is_retained_online_then_offline(mosquitto: Mosquitto, prefix: str) -> None:
    events = MqttEvents(port=mosquitto.port, topic_prefix=prefix, hostname="pbx-test", version="9.9.9")
    async with events:
        await until(lambda: events.connected)
        online = await retained_status(mosquitto.port, prefix)
        assert (online["state"], online["hostname"], online["version"]) == ("online", "pbx-test", "9.9.9")
        validate_event(online)
    offline = await retained_status(mosquitto.port, prefix)
    assert (offline["state"], offline["reason"]) == ("offline", "shutdown")
    validate_event(offline)


@pytest.mark.integration
async def test_each_node_also_keeps_its_own_status(mosquitto: Mosquitto, prefix: str) -> None:
    """Several nodes on one broker: `<prefix>/status` shows whichever wrote last, `<prefix>/status/<node>`
    each node's own (what the console judges that node's snapshots by)."""
    first = MqttEvents(port=mosquitto.port, topic_prefix=prefix, node="pbx-a")
    second = MqttEvents(port=mosquitto.port, topic_prefix=prefix, node="pbx-b")
    async with first:
        await until(lambda: first.connected)
        async with second:
            await until(lambda: second.connected)
            mine = await retained_status(mosquitto.port, prefix, "pbx-a")
            assert (mine["state"], mine["node"], mine["boot"]) == ("online", "pbx-a", first.boot)
            shared = await retained_status(mosquitto.port, prefix)
            assert shared["node"] == "pbx-b"  # the last one to connect
        theirs = await retained_status(mosquitto.port, prefix, "pbx-b")
        assert (theirs["state"], theirs["reason"]) == ("offline", "shutdown")
        mine = await retained_status(mosquitto.port, prefix, "pbx-a")
        assert mine["state"] == "online"


PUBLISHER = textwrap.dedent(
    """
    import asyncio, sys
    from kasuhara_ari.events import MqttEvents

    async def main():
        node = sys.argv[3] if len(sys.argv) > 3 else None
        events = MqttEvents(port=int(sys.argv[1]), topic_prefix=sys.argv[2], keepalive_s=1, node=node)
        async with events:
            events.emit("caller_hungup", "c1")
            while events.stats.published < 1:
                await asyncio.sleep(0.02)
            print("published", events.boot, flush=True)
            await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


@contextlib.asynccontextmanager
async def publisher_process(port: int, prefix: str, *node: str) -> AsyncIterator[tuple[Process, str]]:
    """A process publishing through MqttEvents (one event out), to be killed; yields it and its boot."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PUBLISHER, str(port), prefix, *node, cwd=REPO, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line.split()[0] == b"published", line
        yield proc, line.split()[1].decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.integration
async def test_last_will_says_offline_when_the_process_is_killed(mosquitto: Mosquitto, prefix: str) -> None:
    async with publisher_process(mosquitto.port, prefix) as (proc, _boot):
        async with Collector(mosquitto.port, prefix) as sub:
            await sub.wait_for(lambda c: [s["state"] for s in c.statuses()] == ["online"])
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            await sub.wait_for(lambda c: len(c.statuses()) == 2)
        will = sub.statuses()[1]
        assert (will["state"], will["reason"]) == ("offline", "connection lost")
        validate_event(will)
        assert (await retained_status(mosquitto.port, prefix))["state"] == "offline"


@pytest.mark.integration
async def test_a_killed_node_says_offline_on_its_own_status_too(mosquitto: Mosquitto, prefix: str) -> None:
    """One will per MQTT connection: the node's own ``status/<node>`` has its own (a second connection);
    without it a node that died stayed "online" there, and its calls on the board with it."""
    async with publisher_process(mosquitto.port, prefix, "pbx-k") as (proc, boot):
        mine = await retained_status(mosquitto.port, prefix, "pbx-k")
        assert (mine["state"], mine["boot"]) == ("online", boot)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        deadline = time.monotonic() + 20
        while (mine := await retained_status(mosquitto.port, prefix, "pbx-k"))["state"] == "online":
            assert time.monotonic() < deadline, mine
            await asyncio.sleep(0.1)
        assert (mine["state"], mine["reason"], mine["node"], mine["boot"]) == (
            "offline",
            "connection lost",
            "pbx-k",
            boot,
        )
        validate_event(mine)
        assert (await retained_status(mosquitto.port, prefix))["state"] == "offline"


@pytest.mark.integration
async def test_broker_outage_buffers_without_blocking_and_delivers_in_order(
    own_mosquitto: Mosquitto, prefix: str
) -> None:
    events = MqttEvents(
        port=own_mosquitto.port, topic_prefix=prefix, reconnect_min_s=0.05, reconnect_max_s=0.3, keepalive_s=5
    )
    session = f"collector-{uuid.uuid4().hex[:8]}"
    async with Collector(own_mosquitto.port, prefix, session=session) as sub, events:
        for i in range(10):
            events.emit("long_call", "c1", duration_s=float(i))
        await sub.wait_for(lambda c: len(c.calls()) == 10)

        await asyncio.to_thread(own_mosquitto.stop)
        await until(lambda: not events.connected)
        for i in range(10, 40):
            events.emit("long_call", "c1", duration_s=float(i))  # synchronous: cannot wait for the broker
        assert events.stats.buffered == 30
        assert events.stats.published == 10

        await asyncio.to_thread(own_mosquitto.start)
        await sub.wait_for(lambda c: len({p["seq"] for p in c.calls()}) == 40, timeout=30)
        await until(lambda: events.stats.buffered == 0)
    seqs = [p["seq"] for p in sub.calls()]
    assert first_seen(seqs) == list(range(1, 41))
    assert [p["duration_s"] for p in sub.calls()][:10] == [float(i) for i in range(10)]
    assert events.stats.connections == 2
    assert events.stats.dropped == 0
    for payload in sub.calls():
        validate_event(payload)


@pytest.mark.integration
async def test_overflow_during_an_outage_keeps_the_newest(own_mosquitto: Mosquitto, prefix: str) -> None:
    events = MqttEvents(
        port=own_mosquitto.port, topic_prefix=prefix, buffer_size=5, reconnect_min_s=0.05, reconnect_max_s=0.3
    )
    async with Collector(own_mosquitto.port, prefix, session=f"c-{uuid.uuid4().hex[:8]}") as sub, events:
        await until(lambda: events.connected)
        await asyncio.to_thread(own_mosquitto.stop)
        await until(lambda: not events.connected)
        for i in range(12):
            events.emit("long_call", "c1", duration_s=float(i))
        assert (events.stats.dropped, events.stats.buffered) == (7, 5)
        await asyncio.to_thread(own_mosquitto.start)
        await sub.wait_for(lambda c: len({p["seq"] for p in c.calls()}) == 5, timeout=30)
    assert first_seen([p["seq"] for p in sub.calls()]) == [8, 9, 10, 11, 12]


@pytest.mark.integration
async def test_bad_names_publish_nothing(
    mosquitto: Mosquitto, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="kasuhara_ari.events")
    async with (
        Collector(mosquitto.port, prefix) as sub,
        MqttEvents(port=mosquitto.port, topic_prefix=prefix) as events,
    ):
        for call_id in BAD_CALL_IDS:
            events.emit("caller_hungup", call_id)
        for event in BAD_EVENTS:
            events.emit(event, "c1")
        events.emit("caller_hungup", "sentinel")
        await sub.wait_for(lambda c: len(c.calls()) >= 1)
    assert [t for t, p, _ in sub.messages if not t.endswith("/status")] == [
        f"{prefix}/calls/sentinel/caller_hungup"
    ]
    assert events.stats.rejected == len(BAD_CALL_IDS) + len(BAD_EVENTS)
    assert any("mqtt.event_rejected" in r.getMessage() for r in caplog.records)


@pytest.mark.integration
async def test_close_flushes_everything_before_offline(mosquitto: Mosquitto, prefix: str) -> None:
    async with Collector(mosquitto.port, prefix) as sub:
        async with MqttEvents(port=mosquitto.port, topic_prefix=prefix) as events:
            for i in range(500):
                events.emit("long_call", f"c{i % 7}", duration_s=float(i))
        await sub.wait_for(lambda c: any(s["state"] == "offline" for s in c.statuses()))
    order = [p.get("seq", "offline" if p.get("state") == "offline" else None) for _, p, _ in sub.messages]
    assert order[-1] == "offline"
    assert first_seen([p["seq"] for p in sub.calls()]) == list(range(1, 501))


@pytest.mark.integration
async def test_close_while_lingering_loses_nothing(mosquitto: Mosquitto, prefix: str) -> None:
    """An event held back by ``linger`` (waiting for its burst) is still sent when close comes during
    the wait, and before the offline status."""
    async with Collector(mosquitto.port, prefix) as sub:
        async with MqttEvents(port=mosquitto.port, topic_prefix=prefix, linger_s=0.5) as events:
            await sub.wait_for(lambda c: any(s["state"] == "online" for s in c.statuses()))
            events.emit("long_call", "c1", duration_s=1.0)
            await asyncio.sleep(0.05)  # the publisher is now lingering
            events.emit("long_call", "c2", duration_s=2.0)
        await sub.wait_for(lambda c: any(s["state"] == "offline" for s in c.statuses()))
    order = [p.get("seq", p.get("state")) for _, p, _ in sub.messages]
    assert order == ["online", 1, 2, "offline"]
    assert events.stats.published == 2 and events.stats.dropped == 0


@pytest.mark.integration
async def test_emit_from_other_threads(mosquitto: Mosquitto, prefix: str) -> None:
    async with (
        Collector(mosquitto.port, prefix) as sub,
        MqttEvents(port=mosquitto.port, topic_prefix=prefix) as events,
    ):
        await until(lambda: events.connected)

        def worker() -> None:
            for i in range(50):
                events.emit("recording_stored", "c1", key=f"recordings/2025/01/31/c{i}.wav")

        await asyncio.to_thread(worker)
        await sub.wait_for(lambda c: len(c.calls()) == 50)
    assert [p["seq"] for p in sub.calls()] == list(range(1, 51))


@pytest.mark.integration
async def test_cancelled_publisher_says_offline(mosquitto: Mosquitto, prefix: str) -> None:
    events = MqttEvents(port=mosquitto.port, topic_prefix=prefix)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(events.run())
        await until(lambda: events.connected)
        task.cancel()
    status = await retained_status(mosquitto.port, prefix)
    assert (status["state"], status["reason"]) == ("offline", "cancelled")


async def test_close_gives_up_when_the_broker_is_unreachable() -> None:
    events = MqttEvents(port=free_port(), topic_prefix="t", reconnect_min_s=0.05, reconnect_max_s=0.1)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(events.run())
        for _ in range(3):
            events.emit("caller_hungup", "c1")
        await asyncio.sleep(0.2)
        assert not events.connected
        await asyncio.wait_for(events.close(timeout=0.5), 20)
    stats = events.stats
    assert (stats.dropped, stats.buffered, stats.published) == (3, 0, 0)


@pytest.mark.integration
async def test_run_in_own_taskgroup_with_close(mosquitto: Mosquitto, prefix: str) -> None:
    events = MqttEvents(port=mosquitto.port, topic_prefix=prefix)
    async with Collector(mosquitto.port, prefix) as sub:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(events.run())
            events.emit("caller_hungup", "c1")
            await events.close()
        await sub.wait_for(lambda c: [s["state"] for s in c.statuses()] == ["online", "offline"])
    assert [p["event"] for p in sub.calls()] == ["caller_hungup"]


class AckHoldingProxy:
    """A TCP proxy in front of the broker that can hold back the broker's replies (PUBACKs) and cut the
    connection: the situation where messages reached the broker but their acknowledgement did not."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.hold = False
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> AckHoldingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers += [writer, up_writer]
        for task in (self._pump(reader, up_writer, hold=False), self._pump(up_reader, writer, hold=True)):
            t = asyncio.create_task(task)
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, hold: bool) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await src.read(65536):
                if hold and self.hold:
                    continue  # swallowed: the client never hears back
                dst.write(data)
                await dst.drain()

    def cut(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers.clear()


@pytest.mark.integration
async def test_unacknowledged_messages_are_sent_again_in_order(mosquitto: Mosquitto, prefix: str) -> None:
    async with AckHoldingProxy(mosquitto.port) as proxy:
        events = MqttEvents(
            port=proxy.port, topic_prefix=prefix, reconnect_min_s=0.05, reconnect_max_s=0.2, keepalive_s=30
        )
        async with Collector(mosquitto.port, prefix) as sub, events:
            for i in range(5):
                events.emit("long_call", "c1", duration_s=float(i))
            await until(lambda: events.stats.published == 5)
            proxy.hold = True
            for i in range(5, 10):
                events.emit("long_call", "c1", duration_s=float(i))
            await sub.wait_for(lambda c: len(c.calls()) == 10)  # the broker has them...
            assert events.stats.published == 5  # ...but no PUBACK came back
            assert events.stats.buffered == 5
            proxy.hold = False
            proxy.cut()
            await until(lambda: events.stats.buffered == 0)
            await sub.wait_for(lambda c: len(c.calls()) == 15)
        seqs = [p["seq"] for p in sub.calls()]
        assert seqs == [*range(1, 11), *range(6, 11)]
        assert first_seen(seqs) == list(range(1, 11))
        assert events.stats.resent == 5
        assert events.stats.connections == 2
