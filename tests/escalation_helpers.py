"""Phones, observations and audio checks shared by the escalation and supervision tests over real SIP.

SIPp plays the caller (700 Hz tone), the agent (1300 Hz, pressing RFC 2833 keys) and supervisors (1900 Hz
and 2300 Hz), so a recording or a packet capture shows whose audio reached whom.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from kasuhara_ari.config import Config

from audio import (
    RtpPacket,
    contains_in_pieces,
    read_pcm16,
    rtp_audio,
    rtp_to,
    tone_levels,
    write_tone_wav,
)
from dtmf_pcap import write_digit
from sip import SIPP_DIR, Phone, answering, caller, digits_from_audio_port

REPO = Path(__file__).resolve().parent.parent
SOUNDS = REPO / "asterisk_conf/sounds/ja/kasuhara"  # the stack's announcement.language is ja
CALLER_HZ, AGENT_HZ, SUPERVISOR_HZ, SUPERVISOR2_HZ = 700.0, 1300.0, 1900.0, 2300.0
TONES = (CALLER_HZ, AGENT_HZ, SUPERVISOR_HZ, SUPERVISOR2_HZ)
#: A steady -20 dBFS tone measures ~1500-3300 here (median per second); absent tones stay below ~100.
PRESENT, ABSENT = 800.0, 250.0


# --- phones ---------------------------------------------------------------------------------------------


def supervisor_endpoint(port: int) -> str:
    return f"PJSIP/supervisor/sip:supervisor@127.0.0.1:{port}"


def with_supervisors(cfg: Config, *ports: int, ring_timeout_s: int = 4) -> Config:
    supervisors = tuple(supervisor_endpoint(p) for p in ports)
    return replace(
        cfg, escalation=replace(cfg.escalation, supervisors=supervisors, ring_timeout_s=ring_timeout_s)
    )


def supervisor_phone(workdir: Path, port: int, *, tone: float = SUPERVISOR_HZ, **kwargs: Any) -> Phone:
    """A supervisor's phone: answers like the agent's (uas.xml), but streams its own tone."""
    phone = answering(workdir, port, name=f"supervisor-{port}", **kwargs)
    write_tone_wav(phone.dir / "agent.wav", tone)
    return phone


def agent_pressing(workdir: Path, port: int, presses: Sequence[tuple[int, str]], **kwargs: Any) -> Phone:
    """The agent's phone (uas.xml) pressing keys after the answer: [(wait_ms, digits), ...]."""
    phone = answering(workdir, port, dtmf=presses, **kwargs)
    assert phone.args[1] == "uas_dtmf.xml"
    return phone


def caller_pressing(
    workdir: Path, exten: int, presses: Sequence[tuple[int, str]], *, app: str, call_ms: int
) -> Phone:
    """A caller who presses keys (RFC 2833) after the answer: [(wait_ms, digits), ...], then talks
    ``call_ms`` more and hangs up."""
    phone = caller(workdir, exten, app=app, call_ms=call_ms)
    steps = []
    for index, (wait_ms, digits) in enumerate(presses):
        steps.append(f'  <pause milliseconds="{wait_ms}" />')
        steps.append('  <nop><action><exec rtp_stream="pause" /></action></nop>')
        for n, digit in enumerate(digits):
            pcap = write_digit(phone.dir / f"caller-dtmf-{index}-{n}.pcap", digit, index=index * 10 + n)
            steps.append(f'  <nop><action><exec play_pcap_audio="{pcap}" /></action></nop>')
            steps.append('  <pause milliseconds="250" />')
        steps.append('  <nop><action><exec rtp_stream="resume" /></action></nop>')
    base = (SIPP_DIR / "uac.xml").read_text()
    marker = '  <pause variable="talk_ms" />'
    assert base.count(marker) == 1, "uac.xml changed: update caller_pressing"
    scenario = digits_from_audio_port(base.replace(marker, "\n".join(steps) + "\n" + marker))
    (phone.dir / "uac_dtmf.xml").write_text(scenario)
    assert phone.args[1:3] == ["-sf", "uac.xml"]
    phone.args[2] = "uac_dtmf.xml"
    return phone


def silent(phone: Phone) -> Phone:
    """The phone streams silence instead of its tone: prompts in a recording then stand out clearly (a
    mixed, slightly jittered tone leaves broadband residue that no notch filter removes)."""
    for stream in ("caller.wav", "agent.wav"):  # what uac.xml / uas.xml stream (and their variants)
        write_tone_wav(phone.dir / stream, 1000.0, dbfs=-120.0)
    return phone


def media_port(phone: Phone) -> int:
    """The RTP port a phone announced in the SDP it sent (its INVITE, or its 200 OK)."""
    text = phone.messages.read_text(errors="replace")
    for block in re.split(r"\n-{10,}", text):
        if "message sent" in block and "m=audio" in block:
            match = re.search(r"m=audio (\d+) ", block)
            assert match
            return int(match.group(1))
    raise AssertionError(f"{phone.name} sent no SDP")


def kill_tcp(local_port: int) -> None:
    """Kill one TCP connection from outside the process, as a network fault would (``ss -K``)."""
    result = subprocess.run(
        ["ss", "-K", "src", "127.0.0.1", "sport", "=", str(local_port)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


async def stop_all(*phones: Phone) -> None:
    for phone in phones:
        await phone.stop()


async def all_finish(phone: Phone, *others: Phone) -> None:
    """The caller's phone finishes its scenario, then each of the others; every phone is stopped anyway."""
    try:
        assert await phone.wait(60) == 0, phone.error_text()
        for other in others:
            assert await other.wait(10) == 0, other.error_text()
    finally:
        await stop_all(phone, *others)


# --- what the service did -------------------------------------------------------------------------------


def event_names(service: Any, call_id: str) -> list[str]:
    return [e["event"] for e in service.memory_events.of(call_id)]


def events_named(service: Any, call_id: str, name: str) -> list[dict[str, Any]]:
    return [e for e in service.memory_events.of(call_id) if e["event"] == name]


def when(service: Any, call_id: str, name: str) -> float:
    """Wall-clock time (epoch seconds) of the call's first ``name`` event."""
    (first, *_) = events_named(service, call_id, name) or [None]
    assert first is not None, f"no {name} event: {event_names(service, call_id)}"
    return datetime.fromisoformat(first["at"]).timestamp()


async def wait_for_event(service: Any, port: int, name: str, timeout: float = 40) -> str:
    """The call id of the call to the agent on ``port``, once it emitted ``name``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ours = {
            e["call_id"]
            for e in service.memory_events.events
            if e["event"] == "started" and e.get("target", "").endswith(f"@127.0.0.1:{port}")
        }
        for e in service.memory_events.events:
            if e["event"] == name and e["call_id"] in ours:
                return str(e["call_id"])
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {name} event for the call to port {port}")


async def wait_ended(service: Any, call_id: str, timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = event_names(service, call_id)
        if "ended" in names:
            return names
        await asyncio.sleep(0.1)
    raise AssertionError(f"call {call_id} did not end: {event_names(service, call_id)}")


def record_dtmf(service: Any) -> list[tuple[str, str]]:
    """(channel id, digit) of every ChannelDtmfReceived the service's app gets from now on: proof that
    the keys reached Asterisk and the app, so a test that expects them to do nothing can fail."""
    seen: list[tuple[str, str]] = []
    dispatch = service.app.dispatch

    def spy(event: dict[str, Any]) -> None:
        if event.get("type") == "ChannelDtmfReceived":
            seen.append((str(event["channel"]["id"]), str(event["digit"])))
        dispatch(event)

    service.app.dispatch = spy
    return seen


def without_absorb_dtmf(service: Any) -> None:
    """CONTROL ONLY: add the agent to the bridge without absorbDTMF, to show the capture sees the digits
    that absorbDTMF otherwise keeps from the caller."""
    add = service.ari.add_to_bridge

    async def add_to_bridge(bridge_id: str, channel_id: str, **kwargs: Any) -> None:
        if kwargs.get("role") == "agent":
            kwargs["absorb_dtmf"] = False
        await add(bridge_id, channel_id, **kwargs)

    service.ari.add_to_bridge = add_to_bridge


_written: list[Path] = []


def clean_spool() -> None:
    """These tests run without the uploader: remove the recordings they waited for from the shared spool
    (call it from an autouse fixture after each test)."""
    while _written:
        _written.pop().unlink(missing_ok=True)


async def wait_for_files(spool: Path, call_id: str, timeout: float = 15) -> dict[str, Any]:
    _written.extend(spool / f"{call_id}{ext}" for ext in (".wav", ".done", ".json"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meta, done = spool / f"{call_id}.json", spool / f"{call_id}.done"
        if meta.exists() and done.exists():
            return dict(json.loads(meta.read_text()))
        await asyncio.sleep(0.1)
    raise AssertionError(f"spool files for {call_id} incomplete")


async def ari_get(cfg: Config, path: str) -> httpx.Response:
    async with httpx.AsyncClient(auth=(cfg.ari.username, cfg.ari.password), timeout=5) as http:
        return await http.get(f"{cfg.ari.url}/ari{path}")


async def bridge_channels(cfg: Config, call_id: str) -> list[str]:
    resp = await ari_get(cfg, f"/bridges/kasuhara-{call_id}")
    return sorted(resp.json()["channels"]) if resp.status_code == 200 else []


# --- what the phones heard ------------------------------------------------------------------------------


def heard(pcap: Path, phone: Phone, start: float, end: float) -> list[RtpPacket]:
    """The RTP a phone received between two wall-clock times."""
    return [p for p in rtp_to(pcap, media_port(phone)) if start <= p.at <= end]


def levels(packets: list[RtpPacket]) -> dict[float, float]:
    return tone_levels(rtp_audio(packets), 8000, TONES)


def recording_levels(recording: Path, started_at: float, start: float, end: float) -> dict[float, float]:
    """Tone levels in a recording between two wall-clock times (the recording began at ``started_at``)."""
    samples, rate = read_pcm16(recording)
    return tone_levels(samples, rate, TONES, start_s=start - started_at, end_s=end - started_at)


def prompt_score(
    audio: Path, prompt: str, others: Sequence[str], *, tones: tuple[float, ...]
) -> tuple[float, float]:
    """(score of ``prompt`` in ``audio``, best score of other prompts): the control shows that the score
    means this prompt and not just 'some speech'."""
    score, _ = contains_in_pieces(audio, SOUNDS / f"{prompt}.wav", tones=tones)
    control = max(contains_in_pieces(audio, SOUNDS / f"{o}.wav", tones=tones)[0] for o in others)
    return score, control
