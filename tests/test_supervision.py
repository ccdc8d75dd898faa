"""Supervision without SIP: the mode rules, input checks, and its small MQTT publisher on a real broker."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kasuhara_ari.config import Config, MqttConfig
from kasuhara_ari.events import NullEvents
from kasuhara_ari.schemas import validate_event
from kasuhara_ari.supervision import (
    EVENT_FOR_MODE,
    MODES,
    SessionEvents,
    SupervisionSession,
    snoop_directions,
)

from test_events import Collector, Mosquitto, running_mosquitto


def test_each_mode_has_its_audio_directions() -> None:
    # Audiohook directions on the agent's channel: "in" = what the agent says, "out" = what the agent hears.
    assert snoop_directions("listen") == ("both", "none")  # hears both sides, heard by nobody
    assert snoop_directions("whisper") == ("both", "out")  # heard by the agent only
    assert snoop_directions("barge") is None  # joins the call's own bridge: heard by both
    assert set(EVENT_FOR_MODE) == set(MODES)
    with pytest.raises(ValueError, match="mode must be one of listen, whisper, barge"):
        snoop_directions("shout")


def test_session_refuses_unsafe_call_ids_and_unknown_modes() -> None:
    cfg = Config()
    with pytest.raises(ValueError, match="unsafe call id"):
        SupervisionSession(cfg, "../../etc/passwd", "listen", "PJSIP/s", events=NullEvents())
    with pytest.raises(ValueError, match="mode"):
        SupervisionSession(cfg, "1738282502.17", "spy", "PJSIP/s", events=NullEvents())
    session = SupervisionSession(cfg, "1738282502.17", "whisper", "PJSIP/s", events=NullEvents())
    # Its own short-lived Stasis app and names that cannot collide with the service's.
    assert session.app.startswith(f"{cfg.ari.app}-sv-")
    assert session.call_bridge == "kasuhara-1738282502.17"
    assert session.leg.startswith("1738282502.17-sv-") and session.snoop.startswith("1738282502.17-snoop-")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with running_mosquitto(tmp_path / "broker") as b:
        yield b


@pytest.mark.integration
async def test_session_events_are_published_without_touching_the_service_status(broker: Mosquitto) -> None:
    prefix = f"kasuhara-test/{uuid.uuid4().hex[:12]}"
    events = SessionEvents(MqttConfig(host="127.0.0.1", port=broker.port, topic_prefix=prefix))
    async with Collector(broker.port, prefix) as sub:
        runner = asyncio.create_task(events.run())
        events.emit("supervisor_listening", "1738282502.17", supervisor="PJSIP/s", mode="listen", by="alice")
        events.emit("supervision_ended", "1738282502.17", supervisor="PJSIP/s", mode="listen", reason="x")
        events.emit("bad/name", "1738282502.17")  # refused, never raised
        await events.flush(timeout=10)
        await sub.wait_for(lambda c: len(c.messages) == 2)
        runner.cancel()
    topics = [t for t, _, _ in sub.messages]
    assert topics == [
        f"{prefix}/calls/1738282502.17/supervisor_listening",
        f"{prefix}/calls/1738282502.17/supervision_ended",
    ]
    for _, payload, retained in sub.messages:
        validate_event(payload)
        assert not retained
    assert sub.statuses() == []  # <prefix>/status belongs to `kasuhara serve`
    assert (events.published, events.dropped) == (2, 1)


@pytest.mark.integration
async def test_session_events_never_hold_the_command_when_the_broker_is_down() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once the socket is closed
    events = SessionEvents(MqttConfig(host="127.0.0.1", port=port, topic_prefix="kasuhara-test"), timeout_s=1)
    runner = asyncio.create_task(events.run())
    events.emit("supervisor_barging", "1738282502.17", supervisor="PJSIP/s", mode="barge")
    await events.flush(timeout=5)  # returns once the event was given up (after timeout_s), not at 5 s
    runner.cancel()
    assert events.dropped == 1 and events.published == 0
