"""The call state machine against a fake ARI: every path ends in one teardown with metadata written.

The same flows are proven against the real Asterisk in test_inbound_sip.py; these tests pin down the
decisions (who is rung when, what the metadata says) quickly and without servers.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from kasuhara_ari.announcement import NoticePlayer
from kasuhara_ari.ari import Channel, ChannelGone
from kasuhara_ari.call import Call, CallDeps
from kasuhara_ari.config import load
from kasuhara_ari.events import MemoryEvents
from kasuhara_ari.outbound import OutboundCall
from kasuhara_ari.recording import Recorder


class FakeAmi:
    def __init__(self, fail: bool = False) -> None:
        self.started: list[tuple[str, str, str]] = []
        self.stopped: list[str] = []
        self.fail = fail

    async def mixmonitor(self, channel: str, file: str, *, options: str = "", command: str = "") -> None:
        if self.fail:
            raise RuntimeError("AMI down")
        self.started.append((channel, file, command))

    async def stop_mixmonitor(self, channel: str) -> None:
        self.stopped.append(channel)


class FakeAri:
    """Plays Asterisk's part: answers with the events a real one would send."""

    def __init__(
        self,
        *,
        notice: str = "finish",
        agent: str = "answer",
        talk_s: float = 0.05,
        stasis_delay_s: float = 0.0,
    ) -> None:
        self.ops: list[tuple[str, Any]] = []
        # A created channel's StasisStart comes this long after the create request returns (under load,
        # or with the request and the events on different websockets); until then dial and addChannel fail.
        self.stasis_delay_s = stasis_delay_s
        self.in_stasis: set[str] = set()
        self.talk_s = talk_s
        self.call: Call | None = None
        self.notice = notice
        self.agent = agent
        self.hung_up: set[str] = set()
        self.vars: dict[tuple[str, str], str] = {}

    def _send(self, event: dict[str, Any]) -> None:
        assert self.call is not None
        self.call.deliver(event)

    async def answer(self, channel_id: str) -> None:
        self.ops.append(("answer", channel_id))

    async def ring(self, channel_id: str) -> None:
        self.ops.append(("ring", channel_id))

    async def hangup(self, channel_id: str, reason: str = "normal") -> None:
        if channel_id in self.hung_up:
            raise ChannelGone("gone", 404)
        self.hung_up.add(channel_id)
        self.ops.append(("hangup", channel_id))
        self._send({"type": "ChannelDestroyed", "channel": {"id": channel_id}, "cause": 16})

    async def play(
        self, channel_id: str, media: str, *, lang: str | None = None, playback_id: str | None = None
    ):
        self.ops.append(("play", (channel_id, media, lang)))
        if "notice" in media and self.notice == "hangup":
            self.hung_up.add(channel_id)
            self._send({"type": "ChannelDestroyed", "channel": {"id": channel_id}, "cause": 16})
        else:
            self._send({"type": "PlaybackFinished", "playback": {"id": playback_id, "state": "done"}})
        return {"id": playback_id}

    async def stop_playback(self, playback_id: str) -> None:
        self.ops.append(("stop_playback", playback_id))

    async def create_channel(
        self, endpoint: str, *, channel_id: str, app_args: str = "", originator=None, variables=None
    ):
        self.ops.append(("create", (endpoint, channel_id)))
        event = {"type": "StasisStart", "channel": {"id": channel_id}, "args": app_args.split(",")}

        def enter() -> None:
            self.in_stasis.add(channel_id)
            self._send(event)

        if self.stasis_delay_s:
            asyncio.get_running_loop().call_later(self.stasis_delay_s, enter)
        else:
            enter()
        return Channel(channel_id, endpoint, "Down", "", "", "ja")

    def _must_be_in_stasis(self, channel_id: str) -> None:
        if channel_id.endswith(("-agent", "-customer")) and channel_id not in self.in_stasis:
            raise ChannelGone("Channel not in Stasis application", 409)

    async def dial(self, channel_id: str, *, caller=None, timeout_s=None) -> None:
        self._must_be_in_stasis(channel_id)
        self.ops.append(("dial", channel_id))
        if self.agent == "answer":
            self._send({"type": "ChannelStateChange", "channel": {"id": channel_id, "state": "Up"}})
            # then the agent talks a little and hangs up
            asyncio.get_running_loop().call_later(
                self.talk_s,
                self._send,
                {"type": "ChannelDestroyed", "channel": {"id": channel_id}, "cause": 16},
            )
        elif self.agent == "busy":
            self._send(
                {
                    "type": "ChannelDestroyed",
                    "channel": {"id": channel_id},
                    "cause": 17,
                    "cause_txt": "User busy",
                }
            )

    async def create_bridge(
        self, bridge_id: str, *, kind: str = "mixing,dtmf_events", name: str = ""
    ) -> None:
        self.ops.append(("bridge", (bridge_id, kind)))

    async def add_to_bridge(
        self, bridge_id: str, channel_id: str, *, absorb_dtmf: bool = False, role=None
    ) -> None:
        self._must_be_in_stasis(channel_id)
        self.ops.append(("add", (channel_id, absorb_dtmf)))

    async def destroy_bridge(self, bridge_id: str) -> None:
        self.ops.append(("destroy_bridge", bridge_id))

    async def set_variable(self, channel_id: str, name: str, value: str) -> None:
        self.ops.append(("setvar", (channel_id, name, value)))
        self.vars[(channel_id, name.lstrip("_"))] = value

    async def get_variable(self, channel_id: str, name: str) -> str:
        return self.vars.get((channel_id, name), "")

    def names(self) -> list[str]:
        return [op for op, _ in self.ops]


async def run_call(
    tmp_path: Path,
    ari: FakeAri,
    ami: FakeAmi | None = None,
    *,
    completion: str = "watch",
    outbound: bool = False,
) -> tuple[dict[str, Any], MemoryEvents]:
    cfg = load(
        env={"KASUHARA_RECORDING__ASTERISK_DIR": "/spool/k", "KASUHARA_RECORDING__LOCAL_DIR": str(tmp_path)}
    )
    events = MemoryEvents()
    notified: list[str] = []

    async def on_metadata(call_id: str) -> None:
        notified.append(call_id)

    ami = ami or FakeAmi()
    deps = CallDeps(
        cfg,
        ari,
        Recorder(ami, "/spool/k", tmp_path, completion=completion),
        NoticePlayer(ari, "ja"),
        events,
        on_metadata,
    )
    call: Call
    if outbound:  # the agent's phone dials out; the customer is rung
        agent = Channel("a1", "PJSIP/agent-0001", "Ring", "agent", "", "ja")
        call = OutboundCall(deps, agent, "1700000000.1", "PJSIP/customer")
    else:
        caller = Channel("c1", "PJSIP/caller-0001", "Ring", "0312345678", "Taro", "ja")
        call = Call(deps, caller, "1700000000.1", "PJSIP/agent")
    ari.call = call
    await asyncio.wait_for(call.run(), 5)
    assert notified == ["1700000000.1"]
    return json.loads((tmp_path / "1700000000.1.json").read_text()), events


async def test_happy_path_notice_before_agent_and_metadata(tmp_path: Path) -> None:
    ari = FakeAri()
    meta, events = await run_call(tmp_path, ari)
    names = ari.names()
    assert names.index("answer") < names.index("play") < names.index("create") < names.index("dial")
    assert ("add", ("1700000000.1-agent", True)) in ari.ops  # agent joins with absorbDTMF
    assert ("bridge", ("kasuhara-1700000000.1", "mixing,dtmf_events")) in ari.ops
    assert meta["notice_played"] is True
    assert meta["agent"] == "PJSIP/agent"
    assert meta["end_reason"] == "agent_hungup"
    assert meta["audio"] == {"format": "wav", "expected": True}
    assert meta["caller"] == {"number": "0312345678", "name": "Taro"}
    assert ("hangup", "c1") in ari.ops  # the other side is hung up too
    assert [e["event"] for e in events.events][:3] == ["started", "recording_started", "notice_played"]
    assert events.events[-1]["event"] == "ended"


async def test_a_talking_call_waits_for_events_without_polling(tmp_path: Path, monkeypatch: Any) -> None:
    """While both sides talk nothing happens in the app until an event comes (a hangup, a key): the
    load benchmark found a 0.25-s poll per call to cost over a tenth of the app's CPU."""
    checks = 0
    original = Call.take_agent_action

    def counted(self: Call) -> Any:
        nonlocal checks
        checks += 1
        return original(self)

    monkeypatch.setattr(Call, "take_agent_action", counted)
    meta, _ = await run_call(tmp_path, FakeAri(talk_s=1.5))
    assert meta["end_reason"] == "agent_hungup"
    assert checks <= 3, checks  # once on entering, once per event; a 0.25-s poll would make it 7+


@pytest.mark.parametrize("outbound", [False, True], ids=["inbound-agent", "outbound-customer"])
async def test_a_created_leg_is_used_only_after_its_stasis_start(tmp_path: Path, outbound: bool) -> None:
    """Found by CI: the outbound flow dialled the customer's new channel before its StasisStart and
    Asterisk answered 409 "Channel not in Stasis application", ending the call."""
    ari = FakeAri(stasis_delay_s=0.05)
    meta, events = await run_call(tmp_path, ari, outbound=outbound)
    assert "dial" in ari.names(), ari.ops
    assert meta["notice_played"] is True
    assert "agent_answered" in [e["event"] for e in events.events]


async def test_caller_hangs_up_during_notice_no_agent_rung(tmp_path: Path) -> None:
    ari = FakeAri(notice="hangup")
    meta, _ = await run_call(tmp_path, ari)
    assert "create" not in ari.names() and "dial" not in ari.names()
    assert meta["notice_played"] is False
    assert meta["end_reason"] == "caller_hungup_during_notice"


async def test_agent_busy_plays_apology_and_closes(tmp_path: Path) -> None:
    ari = FakeAri(agent="busy")
    meta, events = await run_call(tmp_path, ari)
    plays = [arg[1] for op, arg in ari.ops if op == "play"]
    assert plays == ["sound:kasuhara/recording-notice", "sound:kasuhara/agent-unavailable"]
    assert meta["end_reason"] == "agent_busy"
    assert meta["agent"] is None
    assert "agent_unavailable" in [e["event"] for e in events.events]
    assert ("hangup", "c1") in ari.ops


async def test_recording_failure_does_not_drop_the_call(tmp_path: Path) -> None:
    meta, _events = await run_call(tmp_path, FakeAri(), FakeAmi(fail=True))
    assert meta["audio"]["expected"] is False
    assert "AMI down" in meta["recording_error"]
    assert meta["agent"] == "PJSIP/agent"


async def test_mixmonitor_command_holds_only_safe_text(tmp_path: Path) -> None:
    ami = FakeAmi()
    await run_call(tmp_path, FakeAri(), ami, completion="command")
    (_channel, file, command) = ami.started[0]
    assert file == "/spool/k/1700000000.1.wav"
    assert command == "touch /spool/k/1700000000.1.done"
    assert "0312345678" not in command and "Taro" not in command


async def test_watch_mode_gives_mixmonitor_no_command(tmp_path: Path) -> None:
    """The default: no shell command, so Asterisk does not fork itself for every call."""
    ami = FakeAmi()
    await run_call(tmp_path, FakeAri(), ami)
    (_channel, file, command) = ami.started[0]
    assert file == "/spool/k/1700000000.1.wav"
    assert command == ""


def test_unknown_completion_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="completion"):
        Recorder(FakeAmi(), "/spool/k", tmp_path, completion="poll")


@pytest.mark.parametrize("bad", ["../etc/passwd", "a/b", "x;rm -rf /", "", ".hidden", "a" * 200, "id\n"])
def test_unsafe_call_ids_never_become_paths(tmp_path: Path, bad: str) -> None:
    rec = Recorder(FakeAmi(), "/spool/k", tmp_path)
    with pytest.raises(ValueError, match="unsafe call id"):
        rec.paths(bad)
