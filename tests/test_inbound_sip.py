"""Inbound calls end to end through the real Asterisk 22, with SIPp as caller and agent phones.

Each test runs the call service in-process (events kept in memory), places real SIP calls with RTP, and
checks what the caller and agent experienced, what Asterisk did, and what landed in the spool.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from audio import contains_at_start, duration_s, header_is_final
from kasuhara_ari.config import Config
from sip import agent_port, answering, caller

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
NOTICE_JA = REPO / "asterisk_conf/sounds/ja/kasuhara/recording-notice.wav"


def event_names(service: Any, call_id: str) -> list[str]:
    return [e["event"] for e in service.memory_events.of(call_id)]


def at(service: Any, call_id: str, name: str) -> datetime:
    for e in service.memory_events.of(call_id):
        if e["event"] == name:
            return datetime.fromisoformat(e["at"])
    raise AssertionError(f"no {name} event for {call_id}: {event_names(service, call_id)}")


async def wait_for_calls(service: Any, count: int, timeout: float = 30) -> list[str]:
    """Call ids of the first ``count`` calls that ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ended = [e["call_id"] for e in service.memory_events.events if e["event"] == "ended"]
        if len(ended) >= count:
            return ended
        await asyncio.sleep(0.1)
    raise AssertionError(f"only {service.app.finished_calls} of {count} calls ended")


async def wait_for_files(spool: Path, call_id: str, timeout: float = 15) -> dict[str, Any]:
    """The call's metadata once both it and MixMonitor's completion marker exist."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meta, done = spool / f"{call_id}.json", spool / f"{call_id}.done"
        if meta.exists() and done.exists():
            return json.loads(meta.read_text())
        await asyncio.sleep(0.1)
    raise AssertionError(
        f"spool files for {call_id} incomplete: {sorted(p.name for p in spool.glob(call_id + '*'))}"
    )


async def ari_get(cfg: Config, path: str) -> httpx.Response:
    async with httpx.AsyncClient(auth=(cfg.ari.username, cfg.ari.password), timeout=5) as http:
        return await http.get(f"{cfg.ari.url}/ari{path}")


async def test_call_is_announced_recorded_and_bridged(
    running_service: Any, call_cfg: Config, sip_workdir: Path
) -> None:
    port = agent_port()
    agent = await answering(sip_workdir, port, ring_ms=500).start()
    phone = await caller(sip_workdir, port, call_ms=12000).start()
    try:
        # Mid-call: caller and agent sit in one mixing bridge with DTMF events.
        deadline = time.monotonic() + 20
        bridge: dict[str, Any] = {}
        while time.monotonic() < deadline:
            bridges = (await ari_get(call_cfg, "/bridges")).json()
            ours = [b for b in bridges if b["id"].startswith("kasuhara-") and len(b["channels"]) == 2]
            if ours:
                bridge = ours[0]
                break
            await asyncio.sleep(0.2)
        assert bridge, "caller and agent never met in a bridge"
        assert bridge["bridge_type"] == "mixing"
        assert bridge["technology"] != "native_rtp"  # DTMF must pass through Asterisk for the app to see it
        assert await phone.wait(40) == 0, phone.error_text()
        assert await agent.wait(10) == 0, agent.error_text()
    finally:
        await phone.stop()
        await agent.stop()

    (call_id,) = await wait_for_calls(running_service, 1)
    names = event_names(running_service, call_id)
    assert names == [
        "started",
        "recording_started",
        "notice_played",
        "agent_ringing",
        "agent_answered",
        "ended",
    ], names
    # The notice finished before the agent's phone was rung (INVITE arrival at the agent's SIPp).
    invites = agent.received("INVITE")
    assert len(invites) == 1
    assert at(running_service, call_id, "notice_played") < invites[0]

    meta = await wait_for_files(call_cfg.recording.host_dir, call_id)
    audio = call_cfg.recording.host_dir / f"{call_id}.wav"
    assert header_is_final(audio)
    assert meta["notice_played"] is True
    assert meta["caller"]["number"] == "caller"
    assert meta["agent"] == f"PJSIP/agent/sip:agent@127.0.0.1:{port}"
    assert meta["end_reason"] == "caller_hungup"
    assert meta["audio"]["expected"] is True
    # The caller talked 12 s after the answer; the recording covers exactly that, within a second.
    assert abs(duration_s(audio) - 12.0) < 1.0, duration_s(audio)
    assert abs(duration_s(audio) - meta["duration_s"]) < 1.0
    # The recording starts with the notice (the recording itself proves it was given).
    # Control: other prompts of similar length do not match, so the score means something.
    score, offset = contains_at_start(audio, NOTICE_JA)
    control = max(contains_at_start(audio, NOTICE_JA.with_name(n))[0] for n in ("warning.wav", "refused.wav"))
    assert score > 0.6, (score, offset)
    assert score > control + 0.3, (score, control)
    assert offset < 1.0
