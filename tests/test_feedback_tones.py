"""The agent's confirmation tones for ``*1`` and ``*9``, against fakes: which channel, in which order,
and that a tone can never hold up or break the action. The sound itself, over real SIP:
test_feedback_tones_sip.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from kasuhara_ari.announcement import NoticePlayer
from kasuhara_ari.ari import AriError, AriUnavailable, Channel, ChannelGone
from kasuhara_ari.call import Call, CallDeps
from kasuhara_ari.config import Config, load
from kasuhara_ari.events import MemoryEvents
from kasuhara_ari.recording import Recorder

CALL_ID = "1700000000.7"
AGENT = f"{CALL_ID}-agent"
FLAG_TONE = "sound:kasuhara/flag-accepted"
SUP_TONE = "sound:kasuhara/escalation-accepted"


class Ops:
    """One ordered log of everything the call did, across the fake ARI and the hold."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []


class FakeAri:
    """Answers like Asterisk: a play returns at once, its PlaybackFinished comes as an event later."""

    def __init__(self, ops: Ops, *, play_error: AriError | None = None, play_hangs: bool = False) -> None:
        self.ops = ops
        self.call: Call | None = None
        self.play_error = play_error
        self.play_hangs = play_hangs

    async def play(
        self, channel_id: str, media: str, *, lang: str | None = None, playback_id: str | None = None
    ) -> dict[str, Any]:
        self.ops.log.append(("play", (channel_id, media)))
        if "accepted" in media:
            if self.play_error is not None:
                raise self.play_error
            if self.play_hangs:
                await asyncio.sleep(3600)
        assert self.call is not None
        self.call.deliver({"type": "PlaybackFinished", "playback": {"id": playback_id, "state": "done"}})
        return {"id": playback_id}

    async def stop_playback(self, playback_id: str) -> None:
        self.ops.log.append(("stop_playback", playback_id))

    async def create_channel(self, endpoint: str, **kwargs: Any) -> Channel:
        self.ops.log.append(("create", endpoint))
        raise AriError("refused by the fake: the supervisor cannot be reached")

    async def hangup(self, channel_id: str, reason: str = "normal") -> None:
        self.ops.log.append(("hangup", channel_id))


class NoAmi:
    async def mixmonitor(self, channel: str, file: str, *, options: str = "", command: str = "") -> None:
        raise AssertionError("not used")

    async def stop_mixmonitor(self, channel: str) -> None:
        raise AssertionError("not used")


def make_call(tmp_path: Path, ari: FakeAri, ops: Ops, cfg: Config | None = None) -> Call:
    cfg = cfg or load(
        env={"KASUHARA_RECORDING__ASTERISK_DIR": "/spool/k", "KASUHARA_RECORDING__LOCAL_DIR": str(tmp_path)}
    )

    async def hold(call_id: str, reason: str, by: str, started_at: str) -> None:
        ops.log.append(("hold", call_id))

    deps = CallDeps(
        cfg,
        ari,  # type: ignore[arg-type]  # only what the escalation uses
        Recorder(NoAmi(), "/spool/k", tmp_path),  # type: ignore[arg-type]
        NoticePlayer(ari, "ja", cue_timeout_s=0.2),  # type: ignore[arg-type]
        MemoryEvents(),
        hold=hold,
    )
    call = Call(
        deps, Channel("c7", "PJSIP/caller-0007", "Up", "0312345678", "Taro", "ja"), CALL_ID, "PJSIP/a"
    )
    call.agent_id = AGENT
    ari.call = call
    return call


def names(ops: Ops) -> list[str]:
    return [name for name, _ in ops.log]


async def test_star1_tone_to_the_agent_before_the_hold_request(tmp_path: Path) -> None:
    ops = Ops()
    call = make_call(tmp_path, FakeAri(ops), ops)
    assert await call.escalation.handle("*1", "flag") is False
    assert ops.log[0] == ("play", (AGENT, FLAG_TONE)), ops.log
    assert names(ops) == ["play", "hold"], ops.log
    assert call.record.flags == ["harassment"]


async def test_star1_twice_confirms_twice(tmp_path: Path) -> None:
    ops = Ops()
    call = make_call(tmp_path, FakeAri(ops), ops)
    await call.escalation.handle("*1", "flag")
    await call.escalation.handle("*1", "flag")
    assert names(ops) == ["play", "hold", "play", "hold"], ops.log
    assert [e.result for e in call.record.escalations] == ["flagged", "flagged"]


async def test_star9_tone_before_the_first_supervisor_leg(tmp_path: Path) -> None:
    ops = Ops()
    call = make_call(tmp_path, FakeAri(ops), ops)
    assert await call.escalation.handle("*9", "supervisor") is False
    assert ops.log[0] == ("play", (AGENT, SUP_TONE)), ops.log
    assert names(ops).index("play") < names(ops).index("create"), ops.log
    # Nobody came (the fake refuses the leg): then the agent hears the spoken "no supervisor" as before.
    assert ("play", (AGENT, "sound:kasuhara/supervisor-unavailable")) in ops.log


async def test_star2_has_no_confirmation_tone(tmp_path: Path) -> None:
    ops = Ops()
    ari = FakeAri(ops)

    async def play_on_bridge(bridge_id: str, media: str, **kwargs: Any) -> dict[str, Any]:
        ops.log.append(("bridge_play", media))
        assert ari.call is not None
        ari.call.deliver(
            {"type": "PlaybackFinished", "playback": {"id": kwargs["playback_id"], "state": "done"}}
        )
        return {}

    ari.play_on_bridge = play_on_bridge  # type: ignore[attr-defined]
    call = make_call(tmp_path, ari, ops)
    await call.escalation.handle("*2", "warn")
    assert ops.log == [("bridge_play", "sound:kasuhara/warning")]


async def test_empty_sound_means_no_tone(tmp_path: Path) -> None:
    ops = Ops()
    cfg = load(
        env={
            "KASUHARA_RECORDING__ASTERISK_DIR": "/spool/k",
            "KASUHARA_RECORDING__LOCAL_DIR": str(tmp_path),
            "KASUHARA_ESCALATION__FLAG_ACK_SOUND": "",
            "KASUHARA_ESCALATION__SUPERVISOR_ACK_SOUND": "",
        }
    )
    assert (cfg.escalation.flag_ack_sound, cfg.escalation.supervisor_ack_sound) == ("", "")
    call = make_call(tmp_path, FakeAri(ops), ops, cfg)
    await call.escalation.handle("*1", "flag")
    await call.escalation.handle("*9", "supervisor")
    assert FLAG_TONE not in str(ops.log) and SUP_TONE not in str(ops.log), ops.log
    assert names(ops)[:2] == ["hold", "create"], ops.log


@pytest.mark.parametrize(
    "error", [ChannelGone("gone", 404), AriUnavailable("timed out"), AriError("500")], ids=repr
)
async def test_a_failed_tone_never_fails_the_flag(tmp_path: Path, error: AriError) -> None:
    ops = Ops()
    call = make_call(tmp_path, FakeAri(ops, play_error=error), ops)
    await call.escalation.handle("*1", "flag")
    assert names(ops) == ["play", "hold"], ops.log
    assert [e.result for e in call.record.escalations] == ["flagged"]


async def test_a_stuck_tone_request_holds_the_flag_up_only_briefly(tmp_path: Path) -> None:
    """The request is bounded (cue_timeout_s, 0.2 s here): the hold still happens."""
    ops = Ops()
    call = make_call(tmp_path, FakeAri(ops, play_hangs=True), ops)
    await asyncio.wait_for(call.escalation.handle("*1", "flag"), 2)
    assert names(ops) == ["play", "hold"], ops.log


async def test_no_tone_once_the_agent_is_gone(tmp_path: Path) -> None:
    ops = Ops()
    call = make_call(tmp_path, FakeAri(ops), ops)
    call.deliver({"type": "ChannelHangupRequest", "channel": {"id": AGENT}})
    await call.next_event(0)
    await call.escalation.handle("*1", "flag")
    assert names(ops) == ["hold"], ops.log


async def test_the_finished_event_of_an_unwaited_tone_is_harmless(tmp_path: Path) -> None:
    """The call never waits for a cue's PlaybackFinished; when it arrives later it is only remembered."""
    ops = Ops()
    call = make_call(tmp_path, FakeAri(ops), ops)
    playback_id = await call.deps.notices.cue(AGENT, "kasuhara/flag-accepted", tag="t")
    assert playback_id is not None and playback_id.startswith("t-")
    assert await call.next_event(0.5) is True
    assert call.playback_state(playback_id) == "done"
    assert await call.deps.notices.cue(AGENT, "", tag="t") is None  # "" plays nothing
