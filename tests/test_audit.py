"""Audit records (S3 + MQTT) and the command-line MQTT sink."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import uuid
from datetime import UTC, datetime, timedelta

import aiomqtt
import pytest

from kasuhara_ari.audit import AuditLog, AuditRecord, CommandEvents
from kasuhara_ari.config import MqttConfig
from kasuhara_ari.events import MemoryEvents
from kasuhara_ari.schemas import validate_event
from kasuhara_ari.storage import MemoryStore

from conftest import closed_port


async def test_record_is_stored_and_emitted() -> None:
    store = MemoryStore()
    events = MemoryEvents()
    log = AuditLog(store, events, by="alice", host="pc1")
    record = log.new(
        "export",
        reason="court order\x00\n\u202eevil",
        target={"from": "2025-01-01", "call_ids": [f"c{i}" for i in range(50)]},
        details={"counts": {"recordings": 50}, "zip_sha256": "ab" * 32},
        at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    written = await log.write(record)
    assert record.key == f"audit/2025/01/02/20250102T030405.000Z-{record.id}.json"
    data = await store.get_bytes(record.key)
    assert data is not None
    back = AuditRecord.from_json(data, record.key)
    assert back == written  # as stored: with its link in the writer's hash chain
    assert back.chain is not None and back.chain["seq"] == 1 and back.chain["prev_sha256"] is None
    assert dataclasses.replace(back, chain=None) == record
    assert back.reason == "court order\\x00\\x0a\\u202eevil"  # control characters never reach a reader raw
    [event] = events.events
    validate_event(event)
    assert event["event"] == "audit.export" and event["by"] == "alice" and event["audit_key"] == record.key
    assert event["subject"] == {"from": "2025-01-01", "call_ids_count": 50}  # long lists stay in S3
    assert event["counts"] == {"recordings": 50}
    with pytest.raises(ValueError, match="unknown audit action"):
        log.new("explode")


async def test_records_are_read_by_range_and_action() -> None:
    store = MemoryStore()
    log = AuditLog(store, MemoryEvents(), by="bob")
    base = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    for i, action in enumerate(["hold", "delete", "hold", "purge"]):
        await log.write(log.new(action, at=base + timedelta(days=i), target={"call_id": f"c{i}"}))
    await store.put_bytes("audit/2025/03/02/20250302T000000.000Z-0123456789ab.json", b"{broken", metadata={})
    problems: list[tuple[str, str]] = []
    got = [
        r.target["call_id"]
        async for r in log.records(
            base, base + timedelta(days=2), on_problem=lambda k, p: problems.append((k, p))
        )
    ]
    assert got == ["c0", "c1", "c2"]  # both bounds inclusive
    assert len(problems) == 1
    holds = [r.target["call_id"] async for r in log.records(base, base + timedelta(days=9), action="hold")]
    assert holds == ["c0", "c2"]
    # Only the days of the range are listed: no scan of audit/.
    listed = {key for op, key in store.calls if op == "list"}
    assert listed <= {f"audit/2025/03/{d:02d}/" for d in range(1, 11)}


async def test_command_events_do_not_block_when_the_broker_is_down() -> None:
    events = CommandEvents(MqttConfig(port=closed_port(), topic_prefix="kt"), connect_timeout_s=1.0)
    async with events:
        for i in range(10):
            events.emit("audit.hold", f"c{i}", by="x")
    assert events.published == 0
    assert events.dropped == 10
    assert events.failure is not None


async def test_command_events_reject_unsafe_names_without_raising() -> None:
    events = CommandEvents(MqttConfig(topic_prefix="kt"), enabled=True)
    events.emit("audit.bad/topic", None)
    events.emit("retention.purged", "../x")  # a retention event: call_id only in the payload, fine
    events.emit("not-namespaced-without-call-id", None)
    assert events.dropped == 2
    off = CommandEvents(MqttConfig(enabled=False))
    async with off:
        off.emit("audit.hold", "c1")
    assert off.dropped == 0 and off.failure is None


@pytest.mark.integration
async def test_command_events_publish_to_the_broker() -> None:
    try:
        socket.create_connection(("127.0.0.1", 1883), timeout=1).close()
    except OSError:
        from conftest import missing

        missing("mosquitto at 127.0.0.1:1883 is not reachable")
    prefix = f"kt{uuid.uuid4().hex[:8]}"
    received: list[tuple[str, dict[str, object]]] = []
    async with aiomqtt.Client("127.0.0.1", 1883) as sub:
        await sub.subscribe(f"{prefix}/#", qos=1)
        async with CommandEvents(MqttConfig(topic_prefix=prefix)) as events:
            for i in range(120):
                events.emit("retention.purged", f"c{i}", objects=2)
            events.emit("audit.delete", "c1", by="carol", result="done")

        async def collect() -> None:
            async for message in sub.messages:
                received.append((str(message.topic), json.loads(bytes(message.payload))))  # type: ignore[arg-type]
                if len(received) == 121:
                    return

        await asyncio.wait_for(collect(), 20)
    assert events.published == 121 and events.dropped == 0
    assert received[0][0] == f"{prefix}/retention/purged"
    assert [p["call_id"] for _, p in received[:120]] == [f"c{i}" for i in range(120)]  # in order
    assert received[-1][0] == f"{prefix}/audit/delete"
    assert not [t for t, _ in received if t.endswith("/status")]  # never the service's status topic
    for _, payload in received:
        validate_event(payload)
