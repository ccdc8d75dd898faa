"""``kasuhara monitor``: the call board (pure) and the command against a real mosquitto."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from kasuhara_ari.cli.monitor import CallBoard, monitor
from kasuhara_ari.events import MqttEvents, build_payload
from kasuhara_ari.schemas import validate_event

# The broker helpers live with the publisher's tests (to move into conftest.py together).
from test_events import Mosquitto, free_port, running_mosquitto

REPO = Path(__file__).resolve().parent.parent
RUN_MONITOR = "from kasuhara_ari.cli.monitor import monitor; monitor()"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    with running_mosquitto(tmp_path_factory.mktemp("mosquitto")) as b:
        yield b


@pytest.fixture
def prefix() -> str:
    return f"kasuhara-test/{uuid.uuid4().hex[:12]}"


def _env(port: int, prefix: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KASUHARA_")}
    env.update(KASUHARA_MQTT__PORT=str(port), KASUHARA_MQTT__TOPIC_PREFIX=prefix, PYTHONUNBUFFERED="1")
    return env


# --- the board ------------------------------------------------------------------------------------------


def _at(seconds: float) -> str:
    return (dt.datetime(2025, 1, 31, 0, 0, tzinfo=dt.UTC) + dt.timedelta(seconds=seconds)).isoformat(
        timespec="milliseconds"
    )


def _event(event: str, seconds: float, **fields: Any) -> dict[str, Any]:
    return build_payload(event, "c1", {"at": _at(seconds), **fields})


def test_board_follows_a_call_through_escalation() -> None:
    board = CallBoard()
    now = dt.datetime.fromisoformat(_at(30))
    board.apply(_event("started", 0, direction="inbound", caller={"number": "0312345678", "name": "Yamada"}))
    assert board.calls["c1"].state == "answering"
    board.apply(_event("notice_played", 5))
    assert board.calls["c1"].state == "dialling"
    board.apply(_event("agent_answered", 8, agent="PJSIP/agent"))
    board.apply(_event("escalation_requested", 20, key="*9"))
    view = board.apply(_event("supervisor_ringing", 21, supervisor="PJSIP/sup1"))
    assert view is not None
    assert (view.state, view.escalation) == ("escalating", "ringing PJSIP/sup1")
    board.apply(_event("supervisor_joined", 25, supervisor="PJSIP/sup1"))
    board.apply(_event("flagged", 26, key="*1"))
    cells = board.calls["c1"].cells(now)
    assert cells[:5] == ["c1", "talking", "0312345678 (Yamada)", "PJSIP/agent", "joined PJSIP/sup1; flagged"]
    assert cells[5] == "0:30"
    board.apply(_event("ended", 65, duration_s=57.0))
    assert board.calls["c1"].state == "ended"
    assert board.calls["c1"].cells(now)[5] == "0:57"


def test_board_never_reopens_an_ended_call() -> None:
    board = CallBoard()
    board.apply(_event("ended", 10, duration_s=None))
    board.apply(_event("supervisor_joined", 5, supervisor="PJSIP/s"))  # late / re-sent
    assert board.calls["c1"].state == "ended"
    board.apply(_event("recording_stored", 12, key="recordings/2025/01/31/c1.wav"))
    board.apply(_event("ended", 10, duration_s=None))  # a duplicate (at-least-once)
    assert board.calls["c1"].state == "stored"


def test_board_expires_ended_calls_and_keeps_status() -> None:
    board = CallBoard()
    board.apply(_event("caller_hungup", 0))
    assert board.calls["c1"].state == "ending"
    board.apply(_event("ended", 1, duration_s=1.0))
    board.apply({"schema": "kasuhara.event/1", "event": "status", "at": _at(0), "state": "online",
                 "hostname": "pbx1", "version": "1.0"})  # fmt: skip
    board.expire(dt.datetime.fromisoformat(_at(30)), keep_s=60)
    assert "c1" in board.calls
    board.expire(dt.datetime.fromisoformat(_at(120)), keep_s=60)
    assert "c1" not in board.calls
    assert board.status_line(dt.UTC).startswith("service: online since 2025-01-31 00:00:00 (host pbx1")


def test_board_shows_calls_first_seen_mid_way_and_ignores_other_events() -> None:
    board = CallBoard()
    view = board.apply(_event("warning_played", 3, final=False))
    assert view is not None and (view.state, view.marks) == ("active", ["warned"])
    assert board.apply(build_payload("retention.purged", "c9", {})) is None
    assert board.apply({"event": "started"}) is None
    assert "c9" not in board.calls


def test_untrusted_text_cannot_reach_the_terminal_raw() -> None:
    board = CallBoard()
    evil = "\x1b[2J\x1b]0;pwned\x07Mallory\u202e"
    board.apply(_event("started", 0, direction="inbound", caller={"number": "\r\n123", "name": evil}))
    board.apply(_event("agent_answered", 1, agent="PJSIP/\x1b[31magent"))
    cells = board.calls["c1"].cells(dt.datetime.fromisoformat(_at(2)))
    text = "".join(cells)
    assert all(ch.isprintable() for ch in text)
    assert "\\x1b" in cells[2] or cells[2].endswith("…")


# --- the command ----------------------------------------------------------------------------------------


async def _start_monitor(port: int, prefix: str, *args: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        RUN_MONITOR,
        *args,
        cwd=REPO,
        env=_env(port, prefix),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    line = await asyncio.wait_for(proc.stderr.readline(), 20)
    assert b"monitoring" in line, line
    return proc


async def _publish_call(port: int, prefix: str) -> None:
    async with MqttEvents(port=port, topic_prefix=prefix) as events:
        events.emit(
            "started", "c1", direction="inbound", caller={"number": "0312345678", "name": "Evil\x1b[31m"}
        )
        events.emit("agent_answered", "c1", agent="PJSIP/agent")
        events.emit("escalation_requested", "c1", key="*9", by="agent")
        events.emit("supervisor_joined", "c1", supervisor="PJSIP/sup")
        events.emit("ended", "c1", duration_s=65.2, reason="normal")


@pytest.mark.integration
async def test_monitor_json_prints_every_event_in_order(broker: Mosquitto, prefix: str) -> None:
    # online status + 5 events + offline status
    proc = await _start_monitor(broker.port, prefix, "--json", "--count", "7")
    try:
        await _publish_call(broker.port, prefix)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err
    payloads = [json.loads(line) for line in out.decode().splitlines()]
    assert [p["event"] for p in payloads] == [
        "status",
        "started",
        "agent_answered",
        "escalation_requested",
        "supervisor_joined",
        "ended",
        "status",
    ]
    assert [p["state"] for p in (payloads[0], payloads[-1])] == ["online", "offline"]
    assert payloads[1]["caller"]["name"] == "Evil\x1b[31m"  # --json passes data through as data
    for payload in payloads:
        validate_event(payload)


@pytest.mark.integration
async def test_monitor_table_shows_one_line_per_change(broker: Mosquitto, prefix: str) -> None:
    proc = await _start_monitor(broker.port, prefix, "--count", "6")
    try:
        await _publish_call(broker.port, prefix)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err
    lines = out.decode().splitlines()
    assert lines[0].split()[:3] == ["TIME", "CALL_ID", "STATE"]
    assert "service: online" in lines[1]
    rows = [line.split() for line in lines[2:]]
    assert [r[2] for r in rows] == ["answering", "talking", "escalating", "talking", "ended"]
    assert "joined" in lines[-1] and "PJSIP/sup" in lines[-1] and lines[-1].endswith("1:05")
    assert b"\x1b" not in out


@pytest.mark.integration
async def test_monitor_exits_cleanly_on_ctrl_c(broker: Mosquitto, prefix: str) -> None:
    proc = await _start_monitor(broker.port, prefix)
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0
    assert b"Traceback" not in err


@pytest.mark.integration
def test_monitor_duration_ends_a_quiet_watch(broker: Mosquitto, prefix: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", RUN_MONITOR, "--json", "--duration", "0.5"],
        cwd=REPO,
        env=_env(broker.port, prefix),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == b""


def test_monitor_unreachable_broker_is_a_clear_failure() -> None:
    port = free_port()
    result = CliRunner().invoke(monitor, ["--json"], env={**_env(port, "kasuhara"), "KASUHARA_CONFIG": None})
    assert result.exit_code == 1
    assert f"cannot reach the MQTT broker at 127.0.0.1:{port}" in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_monitor_bad_config_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(monitor, ["--config", str(tmp_path / "missing.toml")])
    assert result.exit_code == 2
    assert "does not exist" in result.stderr
