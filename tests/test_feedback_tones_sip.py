"""The agent's confirmation tones over real SIP: after ``*1``/``*9`` the agent — and only the agent — hears
a short tone within 500 ms of the key's end packet; the caller and the recording do not.

Everything is read from a ``tcpdump`` capture of the loopback interface: when the agent's phone sent the
key's last RFC 4733 *end* packet (what Asterisk acts on), and which audio each phone received after it,
20 ms RTP packet by 20 ms packet. The test phones stream steady tones (caller 700 Hz, agent 1300 Hz,
supervisor 1900 Hz): at 8 kHz a 160-sample frame holds whole cycles of every multiple of 50 Hz, so the
confirmation tones (1600 Hz, 1000 Hz) measure ~0 in a frame of the phones' tones, and ~20000 when played.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from kasuhara_ari.config import Config

from audio import (
    ULAW_TABLE,
    Capture,
    RtpPacket,
    read_pcap,
    read_pcm16,
    rtp_to,
    tone_amplitude,
)
from dtmf_pcap import EVENTS
from escalation_helpers import (
    AGENT_HZ,
    agent_pressing,
    clean_spool,
    event_names,
    events_named,
    media_port,
    stop_all,
    supervisor_phone,
    wait_ended,
    wait_for_files,
    when,
    with_supervisors,
)
from sip import Phone, agent_port, caller, free_udp_port

pytestmark = pytest.mark.integration

FLAG_HZ, ESCALATION_HZ = 1600.0, 1000.0  # asterisk_conf/sounds/prompts.toml: flag-/escalation-accepted
FLAG_BEEPS, ESCALATION_BEEPS = 2, 3
#: A frame "has" a tone above this amplitude: the shipped tones peak at -3 dBFS (~23000); a 20 ms frame
#: only partly inside a beep still measures several thousand. A tone that is not there stays under ~300.
BEEP = 4000.0
#: ...and the tone is most of the frame's energy (speech, clicks and mixes of the phones' tones are not).
PURITY = 0.8
#: A frame in which the agent's 1300 Hz tone (-20 dBFS: ~3300) still reaches the caller.
VOICE = 1500.0
LATENCY_S = 0.5


@pytest.fixture(autouse=True)
def _clean_spool() -> Iterator[None]:
    yield
    clean_spool()


# --- reading the capture --------------------------------------------------------------------------------


def sent_from(pcap: Path, port: int) -> list[RtpPacket]:
    """RTP packets a phone sent from its media port (what Asterisk received from it)."""
    packets = []
    for at, sport, _, udp in read_pcap(pcap):
        if sport != port or len(udp) < 12 or udp[0] >> 6 != 2:
            continue
        csrc = (udp[0] & 0x0F) * 4
        seq, ts = struct.unpack("!HI", udp[2:8])
        packets.append(RtpPacket(at, udp[1] & 0x7F, bool(udp[1] & 0x80), seq, ts, udp[12 + csrc :]))
    return packets


def key_ends(pcap: Path, phone: Phone, digit: str) -> list[float]:
    """Capture time of the first RFC 4733 end packet of each press of ``digit`` by ``phone``."""
    first_end: dict[int, float] = {}
    for p in sent_from(pcap, media_port(phone)):
        is_key = p.payload_type == 101 and len(p.payload) >= 4 and p.payload[0] == EVENTS[digit]
        if is_key and p.payload[1] & 0x80:
            first_end.setdefault(p.timestamp, p.at)
    return sorted(first_end.values())


@dataclass(frozen=True)
class Frame:
    at: float
    amplitude: float  # of the tone looked for
    purity: float  # amplitude / (sqrt(2) * RMS): 1.0 for a pure sine

    @property
    def beep(self) -> bool:
        return self.amplitude > BEEP and self.purity > PURITY


def frame(at: float, samples: list[int], freq: float) -> Frame:
    amplitude = tone_amplitude(samples, 8000, freq)
    rms = math.sqrt(sum(s * s for s in samples) / len(samples)) if samples else 0.0
    return Frame(at, amplitude, amplitude / (math.sqrt(2) * rms) if rms else 0.0)


def received_frames(pcap: Path, phone: Phone, freq: float, start: float, end: float) -> list[Frame]:
    """Per received 20 ms RTP packet (u-law) between two wall-clock times: the ``freq`` component."""
    return [
        frame(p.at, [ULAW_TABLE[b] for b in p.payload], freq)
        for p in rtp_to(pcap, media_port(phone))
        if p.payload_type == 0 and start <= p.at <= end
    ]


def recording_frames(
    recording: Path, started_at: float, freq: float, start: float, end: float
) -> list[Frame]:
    samples, rate = read_pcm16(recording)
    n = rate // 50
    first = max(0, int((start - started_at) * rate))
    last = min(len(samples), int((end - started_at) * rate))
    return [
        frame(started_at + i / rate, samples[i : i + n], freq * 8000 / rate if rate != 8000 else freq)
        for i in range(first, last - n + 1, n)
    ]


def beeps(frames: list[Frame]) -> list[float]:
    """Start times of the runs of at least two beep frames (one per beep heard: the shipped beeps last
    70-90 ms; a single frame of speech that looks like a tone is not a beep)."""
    starts: list[float] = []
    run: list[Frame] = []
    for f in [*frames, Frame(0.0, 0.0, 0.0)]:
        if f.beep:
            run.append(f)
            continue
        if len(run) >= 2:
            starts.append(run[0].at)
        run = []
    return starts


def loudest(frames: list[Frame]) -> float:
    return max((f.amplitude for f in frames), default=0.0)


# --- one call --------------------------------------------------------------------------------------------


@dataclass
class Heard:
    pcap: Path
    service: Any
    call_id: str
    caller: Phone
    agent: Phone
    meta: dict[str, Any]
    recording: Path


async def call_with_keys(
    service: Any,
    sip_workdir: Path,
    tmp_path: Path,
    presses: list[tuple[int, str]],
    *,
    call_ms: int,
    supervisor_port: int | None = None,
) -> Heard:
    port = agent_port()
    others: list[Phone] = []
    if supervisor_port is not None:
        others.append(await supervisor_phone(sip_workdir, supervisor_port, ring_ms=1500).start())
    agent = await agent_pressing(sip_workdir, port, presses).start()
    phone = await caller(sip_workdir, port, app=service.cfg.ari.app, call_ms=call_ms).start()
    pcap = tmp_path / "lo.pcap"
    try:
        async with Capture(pcap):
            assert await phone.wait(60) == 0, phone.error_text()
        assert await agent.wait(10) == 0, agent.error_text()
        for other in others:
            assert await other.wait(10) == 0, other.error_text()
    finally:
        await stop_all(phone, agent, *others)
    (call_id,) = {
        e["call_id"]
        for e in service.memory_events.events
        if e["event"] == "started" and e["target"].endswith(f"@127.0.0.1:{port}")
    }
    await wait_ended(service, call_id)
    meta = await wait_for_files(service.cfg.recording.host_dir, call_id)
    return Heard(
        pcap, service, call_id, phone, agent, meta, service.cfg.recording.host_dir / f"{call_id}.wav"
    )


def voice_back(frames: list[Frame], after: float) -> float | None:
    """Seconds from ``after`` until the first frame in which the agent's 1300 Hz tone is heard."""
    return next((f.at - after for f in frames if f.at >= after and f.amplitude > VOICE), None)


def ms(seconds: float | None) -> str:
    return "never" if seconds is None else f"+{seconds * 1000:.0f} ms"


def check_agent_only(
    heard: Heard, digit: str, freq: float, count: int, presses: int, report: list[str]
) -> list[float]:
    """After each press of the key ending in ``digit``: the agent hears ``count`` beeps of ``freq`` within
    LATENCY_S, the caller none, the recording none. Returns the latencies; reports how long the agent's
    own audio was missing at the caller and in the recording (Asterisk suspends a bridged channel while a
    channel playback runs on it)."""
    ends = key_ends(heard.pcap, heard.agent, digit)
    assert len(ends) == presses, f"the capture shows {len(ends)} presses of {digit}, expected {presses}"
    rec_start = when(heard.service, heard.call_id, "recording_started")
    latencies = []
    for end in ends:
        agent = received_frames(heard.pcap, heard.agent, freq, end, end + 1.0)
        starts = beeps(agent)
        assert len(starts) == count, (digit, freq, starts, [round(f.amplitude) for f in agent])
        latency = starts[0] - end
        latencies.append(latency)
        assert 0 <= latency < LATENCY_S, (
            f"the tone started {latency * 1000:.0f} ms after the key's end packet"
        )
        tone_end = max(f.at for f in agent if f.beep) - end
        # The caller: none of it (a leak would be loud and pure: clicks at a bridge change are neither).
        to_caller = received_frames(heard.pcap, heard.caller, freq, end - 0.2, end + 1.5)
        assert to_caller, "the capture saw no RTP to the caller"
        assert not leaked(to_caller), ("the caller heard the agent's tone", loudest(to_caller))
        # The recording (MixMonitor on the caller's channel): none of it either.
        rec = recording_frames(heard.recording, rec_start, freq, end - 0.5, end + 1.5)
        assert rec and not leaked(rec), ("the recording has the agent's tone", loudest(rec))
        # The agent's own audio: it still reaches the caller and the recording after the tone.
        caller_voice = received_frames(heard.pcap, heard.caller, AGENT_HZ, end, end + 1.5)
        rec_voice = recording_frames(heard.recording, rec_start, AGENT_HZ, end, end + 1.5)
        assert voice_back(caller_voice, end) is not None, "the caller no longer hears the agent"
        assert voice_back(rec_voice, end) is not None, "the recording no longer has the agent"
        report.append(
            f"*{digit}: agent heard {count} x {freq:.0f} Hz from {ms(latency)} to {ms(tone_end)} after the "
            f"key's end packet; caller: max {loudest(to_caller):.0f} at {freq:.0f} Hz (tone ~23000); "
            f"{measure_voice(heard, end, caller_voice, rec_voice)}"
        )
    return latencies


def leaked(frames: list[Frame]) -> bool:
    return any(f.amplitude > BEEP and f.purity > 0.5 for f in frames)


def measure_voice(heard: Heard, end: float, caller_voice: list[Frame], rec_voice: list[Frame]) -> str:
    """When the agent's phone streamed again after the key (SIPp pauses its audio while a key plays), and
    when the caller and the recording had the agent's audio again."""
    resumed = next(
        (
            p.at - end
            for p in sent_from(heard.pcap, media_port(heard.agent))
            if p.at >= end and p.payload_type == 0
        ),
        None,
    )
    return (
        f"agent's phone streamed again {ms(resumed)}, caller heard it {ms(voice_back(caller_voice, end))}, "
        f"recording had it {ms(voice_back(rec_voice, end))}"
    )


# --- tests ----------------------------------------------------------------------------------------------


async def test_star1_tone_heard_by_the_agent_only_each_time(
    service_factory: Any, call_cfg: Config, sip_workdir: Path, tmp_path: Path, record_property: Any
) -> None:
    service = await service_factory(call_cfg)
    heard = await call_with_keys(service, sip_workdir, tmp_path, [(2000, "*1"), (2500, "*1")], call_ms=10000)
    report: list[str] = []
    check_agent_only(heard, "1", FLAG_HZ, FLAG_BEEPS, 2, report)
    # Distinct: never the escalation tone.
    ends = key_ends(heard.pcap, heard.agent, "1")
    assert beeps(received_frames(heard.pcap, heard.agent, ESCALATION_HZ, ends[0], ends[-1] + 1.0)) == []
    assert event_names(service, heard.call_id).count("flagged") == 2
    assert heard.meta["flags"] == ["harassment"]
    assert [e["action"] for e in heard.meta["escalations"]] == ["flag", "flag"]
    assert heard.meta["end_reason"] == "caller_hungup"  # the unwaited tones' events broke nothing
    record_property("report", "\n".join(report))


async def test_star9_tone_heard_by_the_agent_only_while_the_supervisor_rings(
    service_factory: Any, call_cfg: Config, sip_workdir: Path, tmp_path: Path, record_property: Any
) -> None:
    sup_port = free_udp_port(5100, 5999)
    service = await service_factory(with_supervisors(call_cfg, sup_port))
    heard = await call_with_keys(
        service, sip_workdir, tmp_path, [(2000, "*9")], call_ms=8000, supervisor_port=sup_port
    )
    report: list[str] = []
    (latency,) = check_agent_only(heard, "9", ESCALATION_HZ, ESCALATION_BEEPS, 1, report)
    (end,) = key_ends(heard.pcap, heard.agent, "9")
    assert beeps(received_frames(heard.pcap, heard.agent, FLAG_HZ, end, end + 1.0)) == []
    # The tone came before the supervisor's phone even rang (it rings for 1.5 s, then joins).
    names = event_names(service, heard.call_id)
    assert "supervisor_joined" in names, names
    assert end + latency < when(service, heard.call_id, "supervisor_joined")
    (entry,) = heard.meta["escalations"]
    assert (entry["action"], entry["result"]) == ("supervisor", "joined")
    record_property("report", "\n".join(report))


async def test_star2_plays_no_confirmation_tone(
    service_factory: Any, call_cfg: Config, sip_workdir: Path, tmp_path: Path
) -> None:
    service = await service_factory(call_cfg)
    heard = await call_with_keys(service, sip_workdir, tmp_path, [(2000, "*2")], call_ms=11000)
    (end,) = key_ends(heard.pcap, heard.agent, "2")
    for freq in (FLAG_HZ, ESCALATION_HZ):
        frames = received_frames(heard.pcap, heard.agent, freq, end, end + 1.0)
        assert frames and beeps(frames) == [], (freq, [round(f.amplitude) for f in frames if f.beep])
    (played,) = events_named(service, heard.call_id, "warning_played")
    assert played["key"] == "*2"  # the key worked: the warning, heard by both, is its confirmation


async def test_no_tone_when_the_sound_is_configured_empty(
    service_factory: Any, call_cfg: Config, sip_workdir: Path, tmp_path: Path, record_property: Any
) -> None:
    cfg = replace(call_cfg, escalation=replace(call_cfg.escalation, flag_ack_sound=""))
    service = await service_factory(cfg)
    heard = await call_with_keys(service, sip_workdir, tmp_path, [(2000, "*1")], call_ms=7000)
    (end,) = key_ends(heard.pcap, heard.agent, "1")
    frames = received_frames(heard.pcap, heard.agent, FLAG_HZ, end, end + 1.0)
    assert frames and beeps(frames) == [] and not leaked(frames), [round(f.amplitude) for f in frames]
    assert heard.meta["flags"] == ["harassment"]  # *1 itself still worked
    # The control for the measurement above: without a tone, when the agent's audio reaches the caller.
    rec_start = when(service, heard.call_id, "recording_started")
    caller_voice = received_frames(heard.pcap, heard.caller, AGENT_HZ, end, end + 1.5)
    rec_voice = recording_frames(heard.recording, rec_start, AGENT_HZ, end, end + 1.5)
    record_property("report", f"*1 without a tone: {measure_voice(heard, end, caller_voice, rec_voice)}")
