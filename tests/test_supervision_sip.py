"""Supervisors joining live calls uninvited (``kasuhara supervise``): listen, whisper, barge over real SIP.

Who heard the supervisor is read from packet captures of what each phone received (the supervisor's
phone streams a 1900 Hz tone), and from the call's recording.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from kasuhara_ari.config import Config
from kasuhara_ari.events import MemoryEvents
from kasuhara_ari.schemas import validate_event
from kasuhara_ari.supervision import EVENT_FOR_MODE, CallNotFound, SupervisionSession, SupervisorUnavailable

from audio import Capture, header_is_final
from conftest import STACK_CONFIG, closed_port
from escalation_helpers import (
    ABSENT,
    AGENT_HZ,
    CALLER_HZ,
    PRESENT,
    SUPERVISOR_HZ,
    clean_spool,
    event_names,
    heard,
    levels,
    recording_levels,
    stop_all,
    supervisor_endpoint,
    supervisor_phone,
    wait_ended,
    wait_for_event,
    wait_for_files,
    when,
)
from sip import agent_port, answering, caller, free_udp_port

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _clean_spool() -> Iterator[None]:
    yield
    clean_spool()


def at(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["at"]).timestamp()


#: mode -> (the agent hears the supervisor, the caller hears the supervisor)
HEARS = {"listen": (False, False), "whisper": (True, False), "barge": (True, True)}


@pytest.mark.parametrize("mode", ["listen", "whisper", "barge"])
async def test_supervisor_joins_a_live_call(
    running_service: Any, call_cfg: Config, sip_workdir: Path, tmp_path: Path, mode: str
) -> None:
    service = running_service
    sup_port, port = free_udp_port(5100, 5999), agent_port()
    # The supervisor listens for 8 s, then hangs up; the call goes on without them.
    supervisor = await supervisor_phone(sip_workdir, sup_port, ring_ms=300, hold_ms=8000).start()
    agent = await answering(sip_workdir, port).start()
    phone = await caller(sip_workdir, port, app=service.cfg.ari.app, call_ms=17000).start()
    events = MemoryEvents()
    pcap = tmp_path / "lo.pcap"
    try:
        async with Capture(pcap):
            call_id = await wait_for_event(service, port, "agent_answered")
            session = SupervisionSession(
                call_cfg, call_id, mode, supervisor_endpoint(sup_port), events=events
            )
            reason = await asyncio.wait_for(session.run(), 30)
            assert reason == "supervisor_hungup"
            assert "ended" not in event_names(service, call_id), "the call must outlive the supervision"
            assert await phone.wait(60) == 0, phone.error_text()
        assert await agent.wait(10) == 0, agent.error_text()
        assert await supervisor.wait(10) == 0, supervisor.error_text()
    finally:
        await stop_all(phone, agent, supervisor)
    await wait_ended(service, call_id)

    started, ended = events.events
    assert started["event"] == EVENT_FOR_MODE[mode]
    assert ended["event"] == "supervision_ended" and ended["reason"] == "supervisor_hungup"
    for e in events.events:
        validate_event(e)
        assert (e["call_id"], e["supervisor"], e["mode"]) == (call_id, supervisor_endpoint(sup_port), mode)

    # While the supervisor was on: they heard both sides; who heard them depends on the mode.
    start, end = at(started) + 0.5, at(ended) - 0.5
    sup_heard = levels(heard(pcap, supervisor, start, end))
    assert sup_heard[CALLER_HZ] > PRESENT and sup_heard[AGENT_HZ] > PRESENT, sup_heard
    assert sup_heard[SUPERVISOR_HZ] < ABSENT, sup_heard  # no echo of themselves
    agent_hears, caller_hears = HEARS[mode]
    for who, hears in ((agent, agent_hears), (phone, caller_hears)):
        got = levels(heard(pcap, who, start, end))[SUPERVISOR_HZ]
        assert (got > PRESENT) if hears else (got < ABSENT), (who.name, mode, got)
    # The conversation itself went on undisturbed.
    assert levels(heard(pcap, phone, start, end))[AGENT_HZ] > PRESENT
    assert levels(heard(pcap, agent, start, end))[CALLER_HZ] > PRESENT

    # The recording (what the caller said and heard) holds the supervisor only when the caller heard them.
    meta = await wait_for_files(call_cfg.recording.host_dir, call_id)
    recording = call_cfg.recording.host_dir / f"{call_id}.wav"
    assert header_is_final(recording)
    rec = recording_levels(recording, when(service, call_id, "recording_started"), start, end)
    assert (rec[SUPERVISOR_HZ] > PRESENT) if caller_hears else (rec[SUPERVISOR_HZ] < ABSENT), (mode, rec)
    assert rec[CALLER_HZ] > PRESENT and rec[AGENT_HZ] > PRESENT / 2, rec
    assert meta["end_reason"] == "caller_hungup"
    assert abs(meta["duration_s"] - 17.0) < 1.5, meta["duration_s"]  # the caller's call_ms


async def test_supervision_ends_when_the_call_ends(
    running_service: Any, call_cfg: Config, sip_workdir: Path
) -> None:
    service = running_service
    sup_port, port = free_udp_port(5100, 5999), agent_port()
    supervisor = await supervisor_phone(sip_workdir, sup_port, ring_ms=300).start()  # never hangs up
    agent = await answering(sip_workdir, port).start()
    phone = await caller(sip_workdir, port, app=service.cfg.ari.app, call_ms=7000).start()
    events = MemoryEvents()
    try:
        call_id = await wait_for_event(service, port, "agent_answered")
        session = SupervisionSession(
            call_cfg, call_id, "listen", supervisor_endpoint(sup_port), events=events
        )
        reason = await asyncio.wait_for(session.run(), 40)
        assert reason == "call_ended"
        assert await phone.wait(10) == 0, phone.error_text()
        assert await supervisor.wait(10) == 0, supervisor.error_text()
    finally:
        await stop_all(phone, agent, supervisor)
    assert supervisor.received("BYE"), "the supervisor was left on the line"
    assert [e["event"] for e in events.events] == ["supervisor_listening", "supervision_ended"]
    assert events.events[-1]["reason"] == "call_ended"
    await wait_ended(service, call_id)
    await wait_for_files(call_cfg.recording.host_dir, call_id)


async def test_no_such_call_and_supervisor_not_answering(
    running_service: Any, call_cfg: Config, sip_workdir: Path
) -> None:
    events = MemoryEvents()
    with pytest.raises(CallNotFound, match="no live call"):
        await SupervisionSession(call_cfg, "1234.5678", "listen", "PJSIP/supervisor", events=events).run()

    service = running_service
    sup_port, port = free_udp_port(5100, 5999), agent_port()
    supervisor = await answering(sip_workdir, sup_port, scenario="uas_noanswer.xml").start()
    agent = await answering(sip_workdir, port).start()
    phone = await caller(sip_workdir, port, app=service.cfg.ari.app, call_ms=9000).start()
    try:
        call_id = await wait_for_event(service, port, "agent_answered")
        session = SupervisionSession(
            call_cfg, call_id, "barge", supervisor_endpoint(sup_port), events=events, ring_timeout_s=2
        )
        with pytest.raises(SupervisorUnavailable):
            await session.run()
        assert await supervisor.wait(10) == 0, supervisor.error_text()  # rung, then cancelled
        assert await phone.wait(30) == 0, phone.error_text()
    finally:
        await stop_all(phone, agent, supervisor)
    assert events.events == []  # nothing started, so nothing to report
    await wait_ended(service, call_id)
    meta = await wait_for_files(call_cfg.recording.host_dir, call_id)
    assert meta["end_reason"] == "caller_hungup"


async def test_supervise_command(running_service: Any, call_cfg: Config, sip_workdir: Path) -> None:
    """The CLI end to end: it rings the supervisor, runs until they hang up, and says why it ended."""
    env = {
        **os.environ,
        "KASUHARA_CONFIG": str(STACK_CONFIG),
        "KASUHARA_MQTT__ENABLED": "false",
        "KASUHARA_ESCALATION__RING_TIMEOUT_S": "5",
    }
    cli = [sys.executable, "-m", "kasuhara_ari.cli", "supervise"]

    async def run(*args: str, **extra_env: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            *cli,
            *args,
            env={**env, **extra_env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, (out + err).decode()

    code, text = await run("1234.5678", "--mode", "listen")
    assert code == 1 and "no live call 1234.5678" in text, text
    code, text = await run("../etc", "--mode", "listen")
    assert code == 2 and "not a call id" in text, text
    code, text = await run("1234.5678", "--mode", "shout")
    assert code == 2, text
    code, text = await run("1234.5678", KASUHARA_ARI__URL=f"http://127.0.0.1:{closed_port()}")
    assert code == 1 and "is not reachable" in text, text

    service = running_service
    sup_port, port = free_udp_port(5100, 5999), agent_port()
    supervisor = await supervisor_phone(sip_workdir, sup_port, ring_ms=300, hold_ms=3000).start()
    agent = await answering(sip_workdir, port).start()
    phone = await caller(sip_workdir, port, app=service.cfg.ari.app, call_ms=11000).start()
    try:
        call_id = await wait_for_event(service, port, "agent_answered")
        code, text = await run(call_id, "--mode", "whisper", "--endpoint", supervisor_endpoint(sup_port))
        assert code == 0, text
        assert "supervision ended: supervisor_hungup" in text, text
        assert await supervisor.wait(10) == 0, supervisor.error_text()
        assert await phone.wait(30) == 0, phone.error_text()
    finally:
        await stop_all(phone, agent, supervisor)
    assert len(supervisor.received("INVITE")) == 1
    await wait_ended(service, call_id)
    await wait_for_files(call_cfg.recording.host_dir, call_id)
