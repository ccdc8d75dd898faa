"""What a call does with frame detections (issue 14): the event, the offset on the recording's clock, the
``act`` actions once per call, the flag after N detections, an operator's plug-in and its failures.

Pure logic: a Call with fake telephony, detections handed in as the media socket would; the real path
(SIPp → Asterisk → snoop → externalMedia → the socket) is tests/test_detection_shout_sip.py."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kasuhara_ari.announcement import NoticePlayer
from kasuhara_ari.ari import Channel
from kasuhara_ari.call import DETECTIONS_EVENT, Call, CallDeps
from kasuhara_ari.config import DetectionConfig, load
from kasuhara_ari.detection import configured_factories
from kasuhara_ari.detection.base import AudioFrame, Detection, DetectorLoadError, Party, load_factory
from kasuhara_ari.detection.media import MediaReceiver, StreamFeed, rtp_payload
from kasuhara_ari.events import MemoryEvents
from kasuhara_ari.recording import Recorder
from kasuhara_ari.schemas import validate_event


class NoTelephony:
    """Nothing here talks to Asterisk: the tests drive the call's detection step directly."""

    def __getattr__(self, name: str) -> Any:
        async def op(*args: Any, **kwargs: Any) -> Any:
            return {}

        return op


class KeywordSpotter:
    """An operator's plug-in as the README describes it (here: "finds" a keyword in every 5th frame)."""

    def __init__(self, cfg: DetectionConfig) -> None:
        self.frames = 0
        self.talks: list[tuple[str, bool]] = []

    def feed(self, frame: AudioFrame) -> list[Detection]:
        self.frames += 1
        if self.frames % 5:
            return []
        return [Detection("keyword", {"score": 0.9}, onset_s=frame.offset_s)]

    def talk(self, party: Party, talking: bool, offset_s: float) -> list[Detection]:
        self.talks.append((party, talking))
        return []


class Broken:
    def __init__(self, cfg: DetectionConfig) -> None:
        pass

    def feed(self, frame: AudioFrame) -> list[Detection]:
        raise RuntimeError("model file missing")

    def talk(self, party: Party, talking: bool, offset_s: float) -> list[Detection]:
        return []


def make_call(tmp_path: Path, **detection: Any) -> tuple[Call, MemoryEvents]:
    cfg = load(
        env={"KASUHARA_RECORDING__ASTERISK_DIR": "/spool/k", "KASUHARA_RECORDING__LOCAL_DIR": str(tmp_path)}
    )
    cfg = replace(cfg, detection=replace(cfg.detection, **detection))
    events = MemoryEvents()
    ari: Any = NoTelephony()
    deps = CallDeps(
        cfg,
        ari,
        Recorder(ari, "/spool/k", tmp_path),
        NoticePlayer(ari, "ja"),
        events,
        media=MediaReceiver(),
        detectors=configured_factories(cfg.detection),
    )
    call = Call(deps, Channel("c1", "PJSIP/caller-1", "Up", "0312345678", "", "ja"), "1700000000.1", "x")
    call._answered_wall = 1000.0
    return call, events


def shout(onset: float = 4.0) -> Detection:
    figures = {"level_dbfs": -12.0, "baseline_dbfs": -28.0, "duration_s": 1.1, "over_baseline_db": 16.0}
    return Detection("shouting", dict(figures), onset_s=onset)


def names(events: MemoryEvents) -> list[str]:
    return [e["event"] for e in events.events]


async def deliver(call: Call, *found: Detection) -> None:
    call.deliver({"type": DETECTIONS_EVENT, "detections": list(found)})
    await call.next_event(timeout=1)
    await call._report_detections()


async def test_observe_publishes_with_the_onset_on_the_recordings_clock(tmp_path: Path) -> None:
    call, events = make_call(tmp_path, mode="observe")
    call._feed = StreamFeed("caller", [], lambda found, feed: None, started_wall=1002.5)  # 2.5 s in
    await deliver(call, shout(onset=4.0))
    (event,) = [e for e in events.events if e["event"] == "shouting_detected"]
    validate_event(event)
    assert event["offset_s"] == pytest.approx(6.5)  # 2.5 s of call before the stream + 4 s into it
    assert event["mode"] == "observe" and event["level_dbfs"] == -12.0 and "latency_s" in event
    assert names(events) == ["shouting_detected"]  # observe: nothing else
    assert call.record.hold is None
    assert call.record.events[0]["offset_s"] == pytest.approx(6.5)  # the metadata's timeline


async def test_act_alerts_and_flags_once_per_call(tmp_path: Path) -> None:
    call, events = make_call(tmp_path, mode="act", act_flag_after=1)
    await deliver(call, shout(), shout(onset=20.0))
    got = names(events)
    assert got.count("shouting_detected") == 2
    assert got.count("detection_alert") == 1 and got.count("flagged") == 1, got
    alert = next(e for e in events.events if e["event"] == "detection_alert")
    validate_event(alert)
    assert alert["kind"] == "shouting"
    assert call.record.hold is not None and call.record.hold["by"] == "detector"


async def test_act_flags_only_after_n_detections_and_repeats_when_configured(tmp_path: Path) -> None:
    call, events = make_call(tmp_path, mode="act", act_flag_after=3, act_repeat=True)
    await deliver(call, shout(), shout(onset=20.0))
    assert "flagged" not in names(events) and call.record.hold is None
    assert names(events).count("detection_alert") == 2  # act_repeat: every detection alerts
    await deliver(call, shout(onset=40.0))
    assert names(events).count("flagged") == 1


async def test_act_flag_after_zero_never_flags(tmp_path: Path) -> None:
    call, events = make_call(tmp_path, mode="act", act_flag_after=0)
    await deliver(call, shout(), shout(onset=20.0))
    assert "flagged" not in names(events) and "detection_alert" in names(events)


async def test_a_plugin_is_fed_frames_and_talk_and_reports_as_custom_detected(tmp_path: Path) -> None:
    call, events = make_call(
        tmp_path, mode="observe", loudness=False, detectors=("test_detection_shout:KeywordSpotter",)
    )
    (plugin,) = call.frame_detectors
    assert isinstance(plugin, KeywordSpotter)
    got: list[Detection] = []
    feed = StreamFeed("caller", call.frame_detectors, lambda found, f: got.extend(found), frame_samples=800)
    call._feed = feed
    packet = bytes([0x80, 10]) + bytes(10) + np.zeros(160, dtype=">i2").tobytes()
    for _ in range(25):  # 25 × 20 ms = 5 frames of 100 ms
        feed.rtp(packet)
    assert plugin.frames == 5 and len(got) == 1
    await deliver(call, *got)
    (event,) = [e for e in events.events if e["event"] == "custom_detected"]
    validate_event(event)
    assert event["kind"] == "keyword" and event["score"] == 0.9
    call.deliver({"type": "ChannelTalkingStarted", "channel": {"id": "c1"}})
    await call.next_event(timeout=1)
    assert plugin.talks == [("caller", True)]


def test_a_failing_plugin_costs_only_its_own_findings(caplog: pytest.LogCaptureFixture) -> None:
    cfg = DetectionConfig()
    spotter = KeywordSpotter(cfg)
    got: list[Detection] = []
    feed = StreamFeed("caller", [Broken(cfg), spotter], lambda found, f: got.extend(found), frame_samples=160)
    packet = bytes([0x80, 10]) + bytes(10) + np.zeros(160, dtype=">i2").tobytes()
    for _ in range(10):
        feed.rtp(packet)
    assert spotter.frames == 10 and len(got) == 2 and feed.failures == 10
    assert sum("detector_failed" in r.message for r in caplog.records) == 1  # logged once, not per frame


def test_bad_plugin_paths_are_refused_by_name() -> None:
    with pytest.raises(DetectorLoadError, match="no_such_module"):
        load_factory("no_such_module:Thing")
    with pytest.raises(DetectorLoadError, match=r"'package\.module:Name'"):
        load_factory("kasuhara_ari.detection.loudness")
    with pytest.raises(DetectorLoadError, match="Nope"):
        load_factory("kasuhara_ari.detection.loudness:Nope")


def test_rtp_payload_skips_csrcs_extension_and_padding() -> None:
    body = b"\x01\x02\x03\x04"
    plain = bytes([0x80, 10]) + bytes(10) + body
    assert rtp_payload(plain) == body
    csrc = bytes([0x81, 10]) + bytes(10) + bytes(4) + body
    assert rtp_payload(csrc) == body
    ext = bytes([0x90, 10]) + bytes(10) + b"\xbe\xde\x00\x01" + bytes(4) + body
    assert rtp_payload(ext) == body
    padded = bytes([0xA0, 10]) + bytes(10) + body + b"\x00\x00\x03"
    assert rtp_payload(padded) == body
    assert rtp_payload(b"\x40" + bytes(20)) is None  # not RTP v2
    assert rtp_payload(b"\x80\x0a") is None


async def test_one_socket_demultiplexes_by_the_senders_port() -> None:
    """Two streams into the one socket, told apart by where they come from; strangers are dropped."""
    receiver = MediaReceiver()
    host, port = await receiver.open("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    senders, feeds = [], []
    for _ in range(2):
        transport, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0), remote_addr=(host, port)
        )
        senders.append(transport)
        feed = StreamFeed("caller", [], lambda found, f: None, frame_samples=160)
        receiver.register(transport.get_extra_info("sockname")[:2], feed)
        feeds.append(feed)
    stranger, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0), remote_addr=(host, port)
    )
    packet = bytes([0x80, 10]) + bytes(10) + np.full(160, 1000, dtype=">i2").tobytes()
    senders[0].sendto(packet)
    senders[1].sendto(packet)
    senders[1].sendto(packet)
    stranger.sendto(packet)
    for _ in range(100):
        if receiver.packets >= 4:
            break
        await asyncio.sleep(0.01)
    assert [f.packets for f in feeds] == [1, 2] and receiver.strays == 1
    assert feeds[0].samples == 160  # decoded as 16-bit big-endian: 160 samples per 20 ms
    receiver.unregister(feeds[0])
    assert receiver.streams == 1
    for t in (*senders, stranger):
        t.close()
    receiver.close()


def test_serve_refuses_a_detector_it_cannot_import_with_exit_2(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from kasuhara_ari.cli.serve import serve

    config = tmp_path / "kasuhara.toml"
    config.write_text('[detection]\ndetectors = ["no_such_module.kws:KeywordSpotter"]\n')
    result = CliRunner().invoke(serve, ["--config", str(config)], env={"KASUHARA_CONFIG": ""})
    assert result.exit_code == 2, result.output
    assert "detection.detectors" in result.output and "no_such_module" in result.output


class LateStasis(NoTelephony):
    """Channels made by snoop/externalMedia enter the app a moment after the request returns (as under
    load); until then addChannel is a 422, as Asterisk answers."""

    def __init__(self) -> None:
        self.call: Call | None = None
        self.in_stasis: set[str] = set()
        self.bridged: list[str] = []
        self.hung_up: list[str] = []

    def _enter_later(self, channel_id: str) -> None:
        def enter() -> None:
            self.in_stasis.add(channel_id)
            assert self.call is not None
            self.call.deliver({"type": "StasisStart", "channel": {"id": channel_id}, "args": ["media"]})

        asyncio.get_running_loop().call_later(0.05, enter)

    async def external_media(self, *, channel_id: str, **kwargs: Any) -> dict[str, Any]:
        self._enter_later(channel_id)
        vars_ = {"UNICASTRTP_LOCAL_ADDRESS": "127.0.0.1", "UNICASTRTP_LOCAL_PORT": "23000"}
        return {"id": channel_id, "channelvars": vars_}

    async def snoop(self, channel_id: str, *, snoop_id: str, **kwargs: Any) -> Channel:
        self._enter_later(snoop_id)
        return Channel(snoop_id, "Snoop/x", "Up", "", "", "")

    async def add_to_bridge(self, bridge_id: str, channel_id: str, **kwargs: Any) -> None:
        from kasuhara_ari.ari import ChannelGone

        if channel_id not in self.in_stasis:
            raise ChannelGone(f"ARI POST /bridges/{bridge_id}/addChannel: 422 Channel not in Stasis", 422)
        self.bridged.append(channel_id)

    async def hangup(self, channel_id: str, reason: str = "normal") -> None:
        self.hung_up.append(channel_id)


async def test_the_media_path_waits_for_its_channels_to_enter_the_app_and_goes_with_the_call(
    tmp_path: Path,
) -> None:
    call, _ = make_call(tmp_path, mode="observe", loudness=True)
    ari = LateStasis()
    ari.call = call
    call.deps.ari = ari
    await call._start_media()
    snoop_id, rtp_id, _ = call.media_ids
    assert ari.bridged == [rtp_id, snoop_id]  # both bridged, none refused with a 422
    assert call.deps.media is not None and call.deps.media.streams == 1
    await call._stop_media()
    assert call.deps.media.streams == 0 and set(ari.hung_up) == {rtp_id, snoop_id}
    call.deps.media.close()


def test_monitor_and_board_show_a_shout_and_the_alert() -> None:
    """``kasuhara monitor``'s line and the live board's badges (the console draws the same model)."""
    from kasuhara_ari.cli.monitor import CallBoard
    from kasuhara_ari.events import build_payload
    from kasuhara_ari.live import ALERT_BADGES

    board = CallBoard()
    at = "2025-01-31T00:00:{:02d}.000+00:00"
    board.apply(build_payload("started", "c1", {"at": at.format(0), "direction": "inbound"}))
    board.apply(build_payload("agent_answered", "c1", {"at": at.format(5), "agent": "PJSIP/agent"}))
    figures = {"offset_s": 8.1, "mode": "act", "level_dbfs": -12.0, "baseline_dbfs": -28.0, "duration_s": 1.1}
    board.apply(build_payload("shouting_detected", "c1", {"at": at.format(9), **figures}))
    board.apply(
        build_payload("detection_alert", "c1", {"at": at.format(9), "kind": "shouting", "offset_s": 8.1})
    )
    call = board.calls["c1"]
    assert {"shouting", "alerted"} <= set(call.call.badges)
    assert {"shouting", "alerted"} <= ALERT_BADGES  # drawn as alerts on the console's board
    assert call.marks == ["shouting", "ALERT"]
