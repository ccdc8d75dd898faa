"""Detection through the real Asterisk: TALK_DETECT on the caller's and the agent's legs, a monologue
reported while the call goes on (the caller's phone streams a tone: talk without pause), none for a
caller who is silent (the control), and in ``act`` mode the call becomes evidence like the agent's ``*1``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kasuhara_ari.config import Config
from kasuhara_ari.schemas import validate_event

from sip import Phone, agent_port, answering, caller
from test_inbound_sip import event_names, wait_for_calls

pytestmark = pytest.mark.integration


def silent(phone: Phone) -> Phone:
    """The phone streams silence instead of its tone (a caller who says nothing): the same G.711 u-law
    file (SIPp streams u-law as it is), every sample 0xFF, u-law's zero."""
    path = phone.dir / "caller.wav"
    data = path.read_bytes()
    start = data.index(b"data") + 8
    path.write_bytes(data[:start] + b"\xff" * (len(data) - start))
    return phone


def bursts(phone: Phone, *, talk_s: float = 0.5, every_s: float = 1.6) -> Phone:
    """The agent's phone says something short every few seconds (its tone for ``talk_s``, then u-law
    silence): an agent trying to get a word in."""
    path = phone.dir / "agent.wav"
    data = path.read_bytes()
    start = data.index(b"data") + 8
    tone = data[start : start + int(8000 * talk_s)]
    body = tone + b"\xff" * int(8000 * (every_s - talk_s))
    header = bytearray(data[:start])
    header[start - 4 : start] = len(body).to_bytes(4, "little")
    header[4:8] = (len(header) - 8 + len(body)).to_bytes(4, "little")
    path.write_bytes(bytes(header) + body)
    return phone


def detection_cfg(cfg: Config, mode: str) -> Config:
    return replace(cfg, detection=replace(cfg.detection, mode=mode, monologue_s=3.0, silence_ms=800))


async def place(
    service: Any, sip_workdir: Path, *, quiet_caller: bool = False, bursty_agent: bool = False
) -> tuple[str, list[dict[str, Any]]]:
    port = agent_port()
    agent_phone = answering(sip_workdir, port, ring_ms=200)
    agent = await (bursts(agent_phone) if bursty_agent else agent_phone).start()
    phone = caller(sip_workdir, port, app=service.cfg.ari.app, call_ms=12000)
    customer = await (silent(phone) if quiet_caller else phone).start()
    try:
        assert await customer.wait(60) == 0, customer.error_text()
        await agent.wait(20)
        (call_id,) = await wait_for_calls(service, 1, port)
    finally:
        await customer.stop()
        await agent.stop()
    return call_id, service.memory_events.of(call_id)


async def test_a_caller_who_talks_without_pause_is_reported_live_and_a_silent_one_is_not(
    service_factory: Any, call_cfg: Config, sip_workdir: Path, spool: Path
) -> None:
    service = await service_factory(detection_cfg(call_cfg, "observe"))
    call_id, events = await place(service, sip_workdir)
    names = event_names(service, call_id)
    assert "monologue_detected" in names, names
    found = next(e for e in events if e["event"] == "monologue_detected")
    validate_event({"schema": "kasuhara.event/1", **found})
    # Live: reported during the call, about monologue_s after the caller began (the notice is ~5.5 s,
    # the tone starts at the answer), not at the end.
    assert names.index("monologue_detected") < names.index("ended")
    assert found["talking_s"] >= 3.0 and found["mode"] == "observe"
    meta = json.loads((spool / f"{call_id}.json").read_text())
    assert "harassment" not in meta["flags"] and meta["hold"] is None  # observe: no action
    assert any(t["event"] == "monologue_detected" for t in meta["timeline"])

    # Both legs are watched: the agent's phone streams a tone too (TALK_DETECT set at the leg's create).
    assert meta["talk"]["caller_s"] >= 3.0 and meta["talk"]["agent_s"] >= 3.0, meta["talk"]

    quiet_id, _ = await place(service, sip_workdir, quiet_caller=True)
    assert "monologue_detected" not in event_names(service, quiet_id)
    quiet = json.loads((spool / f"{quiet_id}.json").read_text())
    # (a first RTP packet may read as a blip of talk: well under a second, against the talker's >= 3 s)
    assert quiet["talk"]["caller_s"] < 1.0 and quiet["talk"]["agent_s"] >= 3.0, quiet["talk"]


async def test_act_mode_makes_the_call_evidence(
    service_factory: Any, call_cfg: Config, sip_workdir: Path, spool: Path
) -> None:
    service = await service_factory(detection_cfg(call_cfg, "act"))
    call_id, events = await place(service, sip_workdir)
    flagged = [e for e in events if e["event"] == "flagged"]
    assert flagged and flagged[0]["by"] == "detector" and flagged[0]["key"] == "detected:monologue"
    meta = json.loads((spool / f"{call_id}.json").read_text())
    assert "harassment" in meta["flags"] and meta["hold"]["by"] == "detector"


async def test_an_agent_who_cannot_get_a_word_in_is_reported(
    service_factory: Any, call_cfg: Config, sip_workdir: Path, spool: Path
) -> None:
    """The caller talks without pause; the agent's phone says 0.5 s every 1.6 s (each stretch ends
    silence_ms later): three tries within the window, each given up while the caller goes on."""
    cfg = detection_cfg(call_cfg, "observe")
    cfg = replace(
        cfg,
        detection=replace(
            cfg.detection,
            monologue_s=600.0,
            talk_over_attempts=3,
            talk_over_window_s=30.0,
            talk_over_back_off_s=2.5,
        ),
    )
    service = await service_factory(cfg)
    call_id, events = await place(service, sip_workdir, bursty_agent=True)
    found = [e for e in events if e["event"] == "talk_over_detected"]
    assert found and found[0]["attempts"] >= 3, event_names(service, call_id)
    validate_event({"schema": "kasuhara.event/1", **found[0]})
