"""An escalated call's events on a real mosquitto: in order, valid, and unaffected by a broker outage."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kasuhara_ari.config import Config
from kasuhara_ari.events import MemoryEvents, MqttEvents
from kasuhara_ari.schemas import validate_event
from kasuhara_ari.service import Service

from conftest import resynced, stop_service_task
from escalation_helpers import (
    agent_pressing,
    clean_spool,
    stop_all,
    supervisor_endpoint,
    supervisor_phone,
    wait_for_files,
    with_supervisors,
)
from sip import agent_port, answering, caller, free_udp_port
from test_events import Collector, first_seen, running_mosquitto

pytestmark = pytest.mark.integration

#: The whole life of the call in these tests: *9 (a supervisor joins), then *1 (flag) and *2 (warning).
EXPECTED = [
    "started",
    "recording_started",
    "notice_played",
    "agent_ringing",
    "agent_answered",
    "escalation_requested",
    "supervisor_ringing",
    "supervisor_joined",
    "flagged",
    "warning_played",
    "ended",
]
PRESSES = [(2000, "*9"), (4000, "*1"), (500, "*2")]


@pytest.fixture(autouse=True)
def _clean_spool() -> Iterator[None]:
    yield
    clean_spool()


class Tee:
    """Events to memory (so the test can follow the call) and to MQTT (what is under test)."""

    def __init__(self, *sinks: Any) -> None:
        self.sinks = sinks

    def emit(self, event: str, call_id: str | None = None, /, **fields: Any) -> None:
        for sink in self.sinks:
            sink.emit(event, call_id, **fields)


async def started_service(service: Service) -> asyncio.Task[None]:
    task = asyncio.create_task(service.run())
    await asyncio.wait_for(service.app.connected.wait(), 10)
    await resynced()
    return task


async def stop_task(task: asyncio.Task[Any]) -> None:
    """Stop a service or publisher task; one that crashed fails the test (conftest.stop_service_task)."""
    crash = await stop_service_task(task)
    assert crash is None, crash


def call_payloads(sub: Collector, port: int) -> tuple[str, list[dict[str, Any]]]:
    """The call to the agent on ``port`` and its payloads in the order they first arrived."""
    calls = sub.calls()
    (call_id,) = {p["call_id"] for p in calls if p["event"] == "started" and p["target"].endswith(f":{port}")}
    ours = [p for p in calls if p.get("call_id") == call_id]
    seen: dict[int, dict[str, Any]] = {}
    for p in ours:
        seen.setdefault(p["seq"], p)
    return call_id, [seen[s] for s in first_seen([p["seq"] for p in ours])]


async def test_escalated_call_events_arrive_in_order_and_validate(
    call_cfg: Config, mqtt_broker: Config, sip_workdir: Path
) -> None:
    prefix = f"kasuhara-test/{uuid.uuid4().hex[:12]}"
    sup_port, port = free_udp_port(5100, 5999), agent_port()
    cfg = with_supervisors(call_cfg, sup_port)
    cfg = replace(cfg, mqtt=replace(mqtt_broker.mqtt, enabled=True, topic_prefix=prefix))
    async with Collector(cfg.mqtt.port, prefix) as sub:
        service = Service(cfg)  # builds its own MqttEvents from [mqtt], as `kasuhara serve` does
        task = await started_service(service)
        supervisor = await supervisor_phone(sip_workdir, sup_port, ring_ms=300).start()
        agent = await agent_pressing(sip_workdir, port, PRESSES).start()
        phone = await caller(sip_workdir, port, app=cfg.ari.app, call_ms=21000).start()
        try:
            assert await phone.wait(60) == 0, phone.error_text()
            await sub.wait_for(lambda c: any(p["event"] == "ended" for p in c.calls()), timeout=20)
        finally:
            await stop_all(phone, agent, supervisor)
            await stop_task(task)
    call_id, payloads = call_payloads(sub, port)
    for payload in payloads:
        validate_event(payload)
    assert [p["event"] for p in payloads] == EXPECTED
    seqs = [p["seq"] for p in payloads]
    assert seqs == sorted(seqs), seqs  # published in emit order
    topics = {t for t, p, _ in sub.messages if p.get("call_id") == call_id}
    assert topics == {f"{prefix}/calls/{call_id}/{name}" for name in EXPECTED}
    by_name = {p["event"]: p for p in payloads}
    assert by_name["escalation_requested"]["key"] == "*9"
    assert by_name["supervisor_joined"]["supervisor"] == supervisor_endpoint(sup_port)
    assert by_name["flagged"]["key"] == "*1" and by_name["warning_played"]["key"] == "*2"
    assert [p["state"] for p in sub.statuses()][:1] == ["online"]
    await wait_for_files(cfg.recording.host_dir, call_id)


async def test_broker_stopped_mid_call_call_unaffected_events_delivered_after(
    call_cfg: Config, sip_workdir: Path, tmp_path: Path
) -> None:
    prefix = f"kasuhara-test/{uuid.uuid4().hex[:12]}"
    sup_port, port = free_udp_port(5100, 5999), agent_port()
    with running_mosquitto(tmp_path / "broker") as broker:
        cfg = with_supervisors(call_cfg, sup_port)
        cfg = replace(cfg, mqtt=replace(cfg.mqtt, enabled=True, port=broker.port, topic_prefix=prefix))
        memory = MemoryEvents()
        publisher = MqttEvents(cfg.mqtt, reconnect_max_s=1.0)
        # A persistent session: the collector misses nothing while the broker restarts.
        async with Collector(broker.port, prefix, session=f"collector-{uuid.uuid4().hex[:8]}") as sub:
            publishing = asyncio.create_task(publisher.run())
            service = Service(cfg, events=Tee(memory, publisher))
            task = await started_service(service)
            supervisor = await supervisor_phone(sip_workdir, sup_port, ring_ms=300).start()
            agent = await agent_pressing(sip_workdir, port, PRESSES).start()
            phone = await caller(sip_workdir, port, app=cfg.ari.app, call_ms=21000).start()
            try:
                call_id = await until_event(memory, "agent_answered")
                await sub.wait_for(lambda c: any(p["event"] == "agent_answered" for p in c.calls()))
                broker.stop()
                # The agent's *9, *1 and *2 come while the broker is down: the call carries on.
                await until_event(memory, "warning_played", timeout=40)
                assert broker.proc is None, "the broker came back too early for this test to mean anything"
                down_names = [e["event"] for e in memory.of(call_id)]
                broker.start()
                assert await phone.wait(60) == 0, phone.error_text()
                assert await agent.wait(10) == 0, agent.error_text()
                assert await supervisor.wait(10) == 0, supervisor.error_text()
                await sub.wait_for(lambda c: any(p["event"] == "ended" for p in c.calls()), timeout=30)
                await publisher.close(timeout=5)
            finally:
                await stop_all(phone, agent, supervisor)
                await stop_task(task)
                await stop_task(publishing)
    assert down_names[-4:] == ["supervisor_ringing", "supervisor_joined", "flagged", "warning_played"]
    assert [e["event"] for e in memory.of(call_id)] == EXPECTED
    _, payloads = call_payloads(sub, port)
    for payload in payloads:
        validate_event(payload)
    assert [p["event"] for p in payloads] == EXPECTED  # all of them, in order, after the outage
    assert publisher.stats.dropped == 0
    meta = await wait_for_files(cfg.recording.host_dir, call_id)
    assert [(e["action"], e["result"]) for e in meta["escalations"]] == [
        ("supervisor", "joined"),
        ("flag", "flagged"),
        ("warn", "finished"),
    ]
    assert meta["end_reason"] == "caller_hungup"


async def until_event(memory: MemoryEvents, name: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in memory.events:
            if e["event"] == name:
                return str(e["call_id"])
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {name}: {[e['event'] for e in memory.events]}")


async def test_stopping_the_service_mid_call_still_publishes_the_end(
    call_cfg: Config, mqtt_broker: Config, sip_workdir: Path
) -> None:
    """``kasuhara serve`` stopped (SIGTERM) during a call: the call is torn down, and its last events
    (``ended``) still reach the broker before the publisher disconnects: calls are stopped first, the
    publisher flushes, and only then is it stopped."""
    prefix = f"kasuhara-test/{uuid.uuid4().hex[:12]}"
    port = agent_port()
    cfg = replace(call_cfg, mqtt=replace(mqtt_broker.mqtt, enabled=True, topic_prefix=prefix))
    async with Collector(cfg.mqtt.port, prefix) as sub:
        service = Service(cfg)
        task = await started_service(service)
        agent = await answering(sip_workdir, port).start()
        phone = await caller(sip_workdir, port, app=cfg.ari.app, call_ms=25000).start()
        try:
            await sub.wait_for(lambda c: any(p["event"] == "agent_answered" for p in c.calls()), timeout=20)
            await stop_task(task)  # what SIGTERM does in `kasuhara serve`
            await sub.wait_for(lambda c: any(p["event"] == "ended" for p in c.calls()), timeout=10)
        finally:
            await stop_all(phone, agent)
    call_id, payloads = call_payloads(sub, port)
    assert [p["event"] for p in payloads][-2:] == ["agent_answered", "ended"]
    assert [p["state"] for p in sub.statuses()][-1:] == ["offline"]
    await wait_for_files(cfg.recording.host_dir, call_id)
