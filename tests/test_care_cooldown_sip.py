"""The agent's recovery pause through the real Asterisk and a real queue (asterisk_conf/queues.conf).

Two agents (endpoints ``carea``, ``careb``, SIPp phones) are members of ``kasuhara-care-test``, rung in
order (``linear``: carea first). The app dials the queue as the call's target
(``Local/kasuhara-care-test@kasuhara-queue/n``). carea takes a call and presses ``*1``, the caller hangs
up: carea is paused (AMI QueueStatus shows it); the next caller is not offered to carea (whose phone is
up and would answer) but to careb, and a direct call to carea goes to the queue instead (the dialplan
honours the pause's device state); after the (shortened) pause carea takes calls again. Then carea warns
a caller (``*2``: a long pause) and ends the pause from the phone with the feature code ``*0``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kasuhara_ari.ami import AmiClient
from kasuhara_ari.care.cooldown import DB_FAMILY
from kasuhara_ari.config import Config
from kasuhara_ari.schemas import validate_event

from escalation_helpers import agent_pressing
from sip import Phone, agent_port, answering, caller

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("care-queue")]

QUEUE = "kasuhara-care-test"


def member(endpoint: str, port: int) -> str:
    return f"PJSIP/{endpoint}/sip:{endpoint}@127.0.0.1:{port}"


@pytest.fixture
async def ami(asterisk: Config) -> AsyncIterator[AmiClient]:
    client = AmiClient(asterisk.ami.host, asterisk.ami.port, asterisk.ami.username, asterisk.ami.secret)
    await client.wait_ready(timeout=10)
    shown = await client.command(f"queue show {QUEUE}")
    if f"{QUEUE} has" not in shown:
        client.close()
        pytest.fail(
            f"the stack's Asterisk has no queue {QUEUE} (app_queue, queues.conf): scripts/stack up "
            f"installs them ({shown.strip()[:120]!r})",
            pytrace=False,
        )
    try:
        yield client
    finally:
        client.close()


async def queue_members(ami: AmiClient) -> dict[str, dict[str, str]]:
    messages = await ami.action_list({"Action": "QueueStatus", "Queue": QUEUE})
    return {m["Name"]: m for m in messages if m.get("Event") == "QueueMember"}


async def wait_for(
    service: Any, name: str, *, after: int = 0, timeout: float = 60, **fields: Any
) -> dict[str, Any]:
    """The first event ``name`` (with ``fields``) among the service's events from index ``after``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in service.memory_events.events[after:]:
            if e["event"] == name and all(e.get(k) == v for k, v in fields.items()):
                return dict(e)
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {name} {fields}: {[e['event'] for e in service.memory_events.events[after:]]}")


async def call(
    service: Any, workdir: Path, name: str, *, call_ms: int, exten: str = "100"
) -> tuple[str, Phone]:
    """A customer calls the queue (extension 100: the app's default target, here the queue; 7XXX: carea
    directly unless paused); the call's id once an agent answered."""
    mark = len(service.memory_events.events)
    phone = await caller(workdir, exten, app=service.cfg.ari.app, call_ms=call_ms, name=name).start()
    answered = await wait_for(service, "agent_answered", after=mark, timeout=40)
    return str(answered["call_id"]), phone


async def test_an_agent_is_paused_after_a_flagged_call_the_queue_skips_them_and_the_key_ends_it(
    service_factory: Any, call_cfg: Config, sip_workdir: Path, ami: AmiClient
) -> None:
    cfg = replace(
        call_cfg,
        routing=replace(call_cfg.routing, default_target=f"Local/{QUEUE}@kasuhara-queue/n"),
        care=replace(call_cfg.care, cooldown=True, flag_s=20, warn_s=600),
    )
    service = await service_factory(cfg)
    port_a, port_b = agent_port(), agent_port()
    tag = uuid.uuid4().hex[:8]
    # A state interface of their own (UNKNOWN = free): only the queue pause can keep carea from a call.
    for endpoint, port in (("carea", port_a), ("careb", port_b)):
        # (the CLI command: panoramisk waits forever for more after QueueAdd's "Added interface to queue")
        out = await ami.command(
            f"queue add member {member(endpoint, port)} to {QUEUE} penalty 0 as {endpoint} "
            f"state_interface Custom:kt-{tag}-{endpoint}"
        )
        assert "Added" in out or not out, out
    phones: list[Phone] = []
    try:
        # 1. carea answers the first caller and presses *1; the caller hangs up 5 s after the answer.
        a1 = await agent_pressing(sip_workdir, port_a, [(1500, "*1")], name="carea-1").start()
        phones.append(a1)
        first, c1 = await call(service, sip_workdir, "caller-1", call_ms=5000)
        phones.append(c1)
        assert (await wait_for(service, "agent_answered", call_id=first))["agent"] == member("carea", port_a)
        await wait_for(service, "flagged", call_id=first)
        started = await wait_for(service, "agent_cooldown_started", call_id=first)
        validate_event({"schema": "kasuhara.event/1", **started})
        assert started["agent"] == "carea" and started["trigger"] == "flag" and started["queue_paused"]
        status = (await queue_members(ami))["carea"]
        assert status["Paused"] == "1", status
        assert status["PausedReason"].startswith("kasuhara-care until="), status
        assert (await queue_members(ami))["careb"]["Paused"] == "0"
        assert await a1.wait(20) == 0, a1.error_text()

        # 2. During the pause: carea's phone is up and would answer, but the queue offers careb.
        a2 = await answering(sip_workdir, port_a, name="carea-2").start()
        b1 = await answering(sip_workdir, port_b, name="careb-1", calls=2).start()
        phones += [a2, b1]
        mark = len(service.memory_events.events)
        second, c2 = await call(service, sip_workdir, "caller-2", call_ms=1500)
        phones.append(c2)
        assert (await wait_for(service, "agent_answered", call_id=second))["agent"] == member("careb", port_b)
        assert await c2.wait(30) == 0, c2.error_text()
        # A direct call to carea (7XXX) meets the dialplan's check of Custom:kasuhara-care-carea: it goes
        # to KASUHARA_COOLDOWN_TARGET (here the queue) instead, so to careb.
        direct = f"7{str(port_a)[1:]}"
        second_b, c2b = await call(service, sip_workdir, "caller-2b", call_ms=1500, exten=direct)
        phones.append(c2b)
        assert (await wait_for(service, "agent_answered", call_id=second_b))["agent"] == member(
            "careb", port_b
        )
        assert await c2b.wait(30) == 0, c2b.error_text()
        assert not a2.received("INVITE"), "carea was offered a call during the pause"
        assert not any(e["event"] == "agent_cooldown_ended" for e in service.memory_events.events[mark:])

        # 3. After the pause (10 s) carea is unpaused and takes the next caller.
        ended = await wait_for(service, "agent_cooldown_ended", call_id=first, timeout=30)
        assert ended["agent"] == "carea" and ended["reason"] == "expired"
        validate_event({"schema": "kasuhara.event/1", **ended})
        assert (await queue_members(ami))["carea"]["Paused"] == "0"
        third, c3 = await call(service, sip_workdir, "caller-3", call_ms=1500)
        phones.append(c3)
        assert (await wait_for(service, "agent_answered", call_id=third))["agent"] == member("carea", port_a)
        assert await c3.wait(30) == 0 and await a2.wait(20) == 0
        # ... and a direct call reaches carea directly again.
        a2b = await answering(sip_workdir, port_a, name="carea-2b").start()
        phones.append(a2b)
        third_b, c3b = await call(service, sip_workdir, "caller-3b", call_ms=1500, exten=direct)
        phones.append(c3b)
        assert (await wait_for(service, "agent_answered", call_id=third_b))["agent"] == member(
            "carea", port_a
        )
        assert await c3b.wait(30) == 0 and await a2b.wait(20) == 0

        # 4. carea warns the next caller (*2: a 600 s pause), then ends the pause early with *0.
        a3 = await agent_pressing(sip_workdir, port_a, [(1000, "*2")], name="carea-3").start()
        phones.append(a3)
        fourth, c4 = await call(service, sip_workdir, "caller-4", call_ms=4000)
        phones.append(c4)
        started = await wait_for(service, "agent_cooldown_started", call_id=fourth)
        assert started["trigger"] == "warn" and started["duration_s"] > 500
        assert (await queue_members(ami))["carea"]["Paused"] == "1"
        key = await caller(
            sip_workdir, "*0", app=service.cfg.ari.app, call_ms=30000, from_user="carea", name="carea-key"
        ).start()
        phones.append(key)
        ended = await wait_for(service, "agent_cooldown_ended", call_id=fourth, timeout=30)
        assert ended["reason"] == "agent" and ended["agent"] == "carea"
        assert await key.wait(30) == 0, key.error_text()  # the dialplan confirmed and hung up
        assert (await queue_members(ami))["carea"]["Paused"] == "0"
        db = await ami.action_list({"Action": "DBGetTree", "Family": DB_FAMILY})
        assert not [m for m in db if m.get("Event") == "DBGetTreeResponse" and "carea" in m.get("Key", "")]
    finally:
        for phone in phones:
            await phone.stop()
        for endpoint, port in (("carea", port_a), ("careb", port_b)):
            with contextlib.suppress(Exception):
                await ami.command(f"queue remove member {member(endpoint, port)} from {QUEUE}")
        for endpoint in ("carea", "careb"):
            with contextlib.suppress(Exception):
                await ami.action({"Action": "DBDel", "Family": DB_FAMILY, "Key": endpoint})
