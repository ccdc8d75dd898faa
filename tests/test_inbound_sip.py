"""Inbound calls end to end through the real Asterisk 22, with SIPp as caller and agent phones.

Each test runs the call service in-process (events kept in memory), places real SIP calls with RTP, and
checks what the caller and agent experienced, what Asterisk did, and what landed in the spool.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from kasuhara_ari.config import Config

from audio import contains_at_start, duration_s, header_is_final
from conftest import TEST_NOTICE_WAV, with_real_notice
from escalation_helpers import prompt_score, silent
from sip import Phone, agent_port, answering, caller

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


async def wait_for_calls(service: Any, count: int, port: int, timeout: float = 30) -> list[str]:
    """Call ids of the first ``count`` calls to the agent on ``port`` that ended (other calls that reach
    the shared Asterisk meanwhile are not this test's business)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ours = {
            e["call_id"]
            for e in service.memory_events.events
            if e["event"] == "started" and e.get("target", "").endswith(f"@127.0.0.1:{port}")
        }
        ended = [
            e["call_id"]
            for e in service.memory_events.events
            if e["event"] == "ended" and e["call_id"] in ours
        ]
        if len(ended) >= count:
            return ended
        await asyncio.sleep(0.1)
    raise AssertionError(f"only {service.app.finished_calls} of {count} calls ended")


_written: list[Path] = []


@pytest.fixture(autouse=True)
def _clean_spool() -> Iterator[None]:
    """These tests run without the uploader: remove their recordings from the shared spool afterwards."""
    yield
    while _written:
        _written.pop().unlink(missing_ok=True)


async def wait_for_files(
    spool: Path, call_id: str, timeout: float = 15, *, expect_audio: bool = True
) -> dict[str, Any]:
    """The call's metadata once both it and (when a recording was made) MixMonitor's marker exist."""
    _written.extend(spool / f"{call_id}{ext}" for ext in (".wav", ".done", ".json"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meta, done = spool / f"{call_id}.json", spool / f"{call_id}.done"
        if meta.exists() and (done.exists() or not expect_audio):
            return json.loads(meta.read_text())
        await asyncio.sleep(0.1)
    raise AssertionError(
        f"spool files for {call_id} incomplete: {sorted(p.name for p in spool.glob(call_id + '*'))}"
    )


async def place_call(
    service: Any, workdir: Path, *, call_ms: int, wait_s: float = 40, quiet: bool = False, **agent_kwargs: Any
) -> tuple[str, Phone, Phone]:
    """One real call from a SIPp caller to a SIPp agent through the service; both phones must finish
    cleanly. Returns the call id and the two phones (for their message logs). ``quiet``: both phones
    stream silence, so the prompts in the recording can be told apart (escalation_helpers.silent)."""
    port = agent_port()
    agent = answering(workdir, port, **agent_kwargs)
    phone = caller(workdir, port, app=service.cfg.ari.app, call_ms=call_ms)
    if quiet:
        agent, phone = silent(agent), silent(phone)
    await agent.start()
    await phone.start()
    try:
        assert await phone.wait(wait_s) == 0, phone.error_text()
        assert await agent.wait(10) == 0, agent.error_text()
    finally:
        await phone.stop()
        await agent.stop()
    (call_id,) = await wait_for_calls(service, 1, port)
    return call_id, phone, agent


async def ari_get(cfg: Config, path: str) -> httpx.Response:
    async with httpx.AsyncClient(auth=(cfg.ari.username, cfg.ari.password), timeout=5) as http:
        return await http.get(f"{cfg.ari.url}/ari{path}")


async def test_call_is_announced_recorded_and_bridged(
    service_factory: Any, asterisk: Config, call_cfg: Config, sip_workdir: Path
) -> None:
    # The real notice: this test checks that the recording starts with it.
    running_service = await service_factory(with_real_notice(call_cfg, asterisk))
    port = agent_port()
    agent = await answering(sip_workdir, port, ring_ms=500).start()
    phone = await caller(sip_workdir, port, app=running_service.cfg.ari.app, call_ms=12000).start()
    try:
        # Mid-call: caller and agent sit in one mixing bridge with DTMF events (this call's bridge: other
        # tests' calls share the Asterisk).
        deadline = time.monotonic() + 20
        bridge: dict[str, Any] = {}
        while time.monotonic() < deadline:
            answered = [
                e["call_id"] for e in running_service.memory_events.events if e["event"] == "agent_answered"
            ]
            if answered:
                resp = await ari_get(call_cfg, f"/bridges/kasuhara-{answered[0]}")
                if resp.status_code == 200 and len(resp.json()["channels"]) == 2:
                    bridge = resp.json()
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

    (call_id,) = await wait_for_calls(running_service, 1, port)
    # Asterisk's StasisStart carries a timestamp the overload watch reads (one call, a quiet box: on time).
    watch = running_service.app.overload
    assert len(watch._recent) == 1 and not watch.overloaded
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


def fast_dial(cfg: Config, seconds: int = 4) -> Config:
    return replace(cfg, routing=replace(cfg.routing, dial_timeout_s=seconds))


@pytest.mark.parametrize(
    ("scenario", "reason"), [("uas_noanswer.xml", "agent_no_answer"), ("uas_busy.xml", "agent_busy")]
)
async def test_agent_unreachable_caller_hears_apology(
    service_factory: Any, call_cfg: Config, sip_workdir: Path, scenario: str, reason: str
) -> None:
    service = await service_factory(fast_dial(call_cfg))
    # The caller would talk for a minute: the call must end from our side (BYE after the apology).
    call_id, phone, _ = await place_call(service, sip_workdir, call_ms=60000, scenario=scenario, quiet=True)
    names = event_names(service, call_id)
    assert names[-2:] == ["agent_unavailable", "ended"], names
    assert "agent_answered" not in names
    assert phone.received("BYE"), "the caller was not hung up by the app"
    meta = await wait_for_files(call_cfg.recording.host_dir, call_id)
    assert meta["end_reason"] == reason
    assert meta["agent"] is None
    audio = call_cfg.recording.host_dir / f"{call_id}.wav"
    assert header_is_final(audio)
    # The recording holds the notice and then the apology: the apology itself, not just as long a sound.
    apology = NOTICE_JA.with_name("agent-unavailable.wav")
    assert duration_s(audio) > duration_s(TEST_NOTICE_WAV) + duration_s(apology) - 0.5
    score, control = prompt_score(
        audio, "agent-unavailable", ["refused", "warning", "final-notice"], tones=()
    )
    assert score > 0.7 and score > control + 0.25, (score, control)


async def test_caller_hangs_up_during_notice_no_agent_rung(
    service_factory: Any, asterisk: Config, call_cfg: Config, sip_workdir: Path
) -> None:
    running_service = await service_factory(with_real_notice(call_cfg, asterisk))  # long enough to leave
    port = agent_port()
    agent = await answering(sip_workdir, port).start()
    phone = await caller(
        sip_workdir, port, app=running_service.cfg.ari.app, call_ms=2000
    ).start()  # the notice lasts ~5.5 s
    try:
        assert await phone.wait(30) == 0, phone.error_text()
        (call_id,) = await wait_for_calls(running_service, 1, port)
        await asyncio.sleep(1.0)  # an INVITE sent by mistake would have arrived by now
        assert agent.received("INVITE") == []
    finally:
        await phone.stop()
        await agent.stop()
    names = event_names(running_service, call_id)
    assert "agent_ringing" not in names and "notice_played" not in names, names
    meta = await wait_for_files(call_cfg.recording.host_dir, call_id)
    assert meta["end_reason"] == "caller_hungup_during_notice"
    assert meta["notice_played"] is False
    audio = call_cfg.recording.host_dir / f"{call_id}.wav"
    assert header_is_final(audio)
    assert abs(duration_s(audio) - 2.0) < 1.0


async def test_agent_hangs_up_first(running_service: Any, call_cfg: Config, sip_workdir: Path) -> None:
    call_id, phone, _ = await place_call(running_service, sip_workdir, call_ms=60000, hold_ms=3000)
    assert phone.received("BYE"), "the caller was left alone on the line"
    meta = await wait_for_files(call_cfg.recording.host_dir, call_id)
    assert meta["end_reason"] == "agent_hungup"
    audio = call_cfg.recording.host_dir / f"{call_id}.wav"
    assert header_is_final(audio)
    # notice (the 0.5 s test notice) + ringing (0.3 s) + 3 s talk
    expected = duration_s(TEST_NOTICE_WAV) + 3.3
    assert abs(duration_s(audio) - expected) < 1.5, (duration_s(audio), expected)
    assert abs(duration_s(audio) - meta["duration_s"]) < 1.0


async def test_twenty_concurrent_calls(running_service: Any, call_cfg: Config, sip_workdir: Path) -> None:
    port = agent_port()
    agent = await answering(sip_workdir, port, calls=20).start()
    phone = await caller(
        sip_workdir, port, app=running_service.cfg.ari.app, call_ms=8000, calls=20, concurrent=20, rate=20
    ).start()
    try:
        assert await phone.wait(90) == 0, phone.error_text()
        # The agent's SIPp counts a call done once its BYE is answered; under load that trails the caller.
        assert await agent.wait(45) == 0, agent.error_text()
    finally:
        await phone.stop()
        await agent.stop()
    call_ids = await wait_for_calls(running_service, 20, port)
    assert len(set(call_ids)) == 20
    for call_id in call_ids:
        meta = await wait_for_files(call_cfg.recording.host_dir, call_id)
        assert meta["end_reason"] == "caller_hungup", (call_id, meta["end_reason"])
        assert meta["notice_played"] is True
        audio = call_cfg.recording.host_dir / f"{call_id}.wav"
        assert header_is_final(audio)
        assert abs(duration_s(audio) - 8.0) < 1.0, (call_id, duration_s(audio))
    assert not [c for c in running_service.app.calls.values() if c.target.endswith(f":{port}")]


def kill_tcp(local_port: int) -> None:
    """Kill one TCP connection from outside the process, as a network fault would (``ss -K``)."""
    result = subprocess.run(
        ["ss", "-K", "src", "127.0.0.1", "sport", "=", str(local_port)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


async def test_websocket_killed_mid_call_reconnects_and_tears_down(
    running_service: Any, call_cfg: Config, sip_workdir: Path
) -> None:
    port = agent_port()
    agent = await answering(sip_workdir, port).start()
    phone = await caller(sip_workdir, port, app=running_service.cfg.ari.app, call_ms=7000).start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "agent_answered" not in [
            e["event"] for e in running_service.memory_events.events
        ]:
            await asyncio.sleep(0.1)
        ws = running_service.ari._ws
        assert ws is not None
        kill_tcp(ws.local_address[1])
        deadline = time.monotonic() + 10
        while running_service.ari.reconnects < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert running_service.ari.reconnects >= 1
        assert await phone.wait(40) == 0, phone.error_text()
        assert await agent.wait(10) == 0, agent.error_text()
    finally:
        await phone.stop()
        await agent.stop()
    (call_id,) = await wait_for_calls(running_service, 1, port)
    meta = await wait_for_files(call_cfg.recording.host_dir, call_id)
    assert meta["end_reason"] == "caller_hungup"
    assert agent.received("BYE"), "the agent was left on the line"
    assert (await ari_get(call_cfg, f"/bridges/kasuhara-{call_id}")).status_code == 404


def budget(cfg: Config, mode: str, seconds: int, warn_before: int) -> Config:
    return replace(
        cfg,
        policy=replace(cfg.policy, time_budget_mode=mode, time_budget_s=seconds, warn_before_s=warn_before),
    )


async def test_time_budget_enforced_warns_agent_then_ends(
    service_factory: Any, call_cfg: Config, sip_workdir: Path
) -> None:
    # Answered at 0 s, the test notice until 0.5 s, agent from ~1 s: the agent's tone at 4 s, the end at 7 s.
    service = await service_factory(budget(call_cfg, "enforce", 7, 3))
    call_id, phone, agent = await place_call(service, sip_workdir, call_ms=60000, quiet=True)
    names = event_names(service, call_id)
    assert names[-3:] == ["long_call", "time_limit", "ended"], names
    assert phone.received("BYE") and agent.received("BYE")
    meta = await wait_for_files(call_cfg.recording.host_dir, call_id)
    assert meta["end_reason"] == "time_limit"
    audio = call_cfg.recording.host_dir / f"{call_id}.wav"
    closing = NOTICE_JA.with_name("call-ending-time-limit.wav")
    # 7 s of budget, then the closing notice that both hear (and the recording keeps): that notice, not
    # one as long (final-notice ends with the same words: too close to be a control).
    assert abs(duration_s(audio) - (7 + duration_s(closing))) < 1.5, duration_s(audio)
    score, control = prompt_score(
        audio, "call-ending-time-limit", ["refused", "warning", "agent-unavailable"], tones=()
    )
    assert score > 0.7 and score > control + 0.25, (score, control)


async def test_time_budget_warn_only_lets_the_call_go_on(
    service_factory: Any, call_cfg: Config, sip_workdir: Path
) -> None:
    service = await service_factory(budget(call_cfg, "warn", 9, 2))
    call_id, _, _ = await place_call(service, sip_workdir, call_ms=14000)
    names = event_names(service, call_id)
    assert "long_call" in names and "time_limit" not in names, names
    meta = await wait_for_files(call_cfg.recording.host_dir, call_id)
    assert meta["end_reason"] == "caller_hungup"
    long_call = next(e for e in service.memory_events.of(call_id) if e["event"] == "long_call")
    assert 6.5 <= long_call["duration_s"] <= 8.5, long_call
