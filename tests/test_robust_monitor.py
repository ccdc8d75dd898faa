"""Issue 12: ``kasuhara monitor`` against hostile payloads on a real mosquitto.

Whoever may publish under the prefix writes what the monitor parses and shows. Before the fix one
``duration_s: Infinity`` (OverflowError) or an ``at`` with no UTC instant ended the monitor, and as a
*retained* status it ended every later start; ``--json`` wrote C1 controls and bidi overrides raw.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from kasuhara_ari.cli.monitor import CallBoard

from test_events import Mosquitto, running_mosquitto

REPO = Path(__file__).resolve().parent.parent
RUN_MONITOR = "from kasuhara_ari.cli.monitor import monitor; monitor()"
AT = "2025-01-31T00:00:00.000+00:00"
HOSTILE_STATUS = (
    b'{"schema": "kasuhara.event/1", "event": "status", "at": "0001-01-01T00:00:00+14:00", '
    b'"state": "online\\u009b31m", "hostname": "h", "version": "1"}'
)
HOSTILE_EVENTS = [
    b'{"event": "started", "call_id": "c1", "at": "'
    + AT.encode()
    + b'", "caller": {"number": "03\\u202e1"}}',
    b'{"event": "ended", "call_id": "c1", "at": "' + AT.encode() + b'", "duration_s": Infinity}',
    b'{"event": "ended", "call_id": "c2", "at": "9999-12-31T23:59:59+00:00", "duration_s": 1e308}',
    b'{"event": "ended", "call_id": "c3", "at": "' + AT.encode() + b'", "duration_s": NaN}',
    b"[" * 100_000,
    b'{"event": "\\u001b]0;pwned\\u0007", "call_id": "c4\\u009b2J", "at": 5}',
    b'{"event": "ended", "call_id": "ok1", "at": "' + AT.encode() + b'", "duration_s": 65.2}',
]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    with running_mosquitto(tmp_path_factory.mktemp("mosquitto")) as b:
        yield b


def test_board_survives_impossible_values() -> None:
    board = CallBoard()
    board.apply({"event": "status", "at": "0001-01-01T00:00:00+14:00", "state": "online"})
    assert "since ?" in board.status_line(dt.UTC)
    board.apply({"event": "status", "at": "9999-12-31T23:30:00+00:00", "state": "online"})
    tokyo = dt.timezone(dt.timedelta(hours=9))
    assert "since ?" in board.status_line(tokyo)
    for duration in (float("inf"), float("nan"), 1e308, -1.0):
        view = board.apply({"event": "ended", "call_id": "c1", "at": AT, "duration_s": duration})
        assert view is not None
        assert view.cells(dt.datetime.now(dt.UTC))[-1] == "-"


async def _monitor(port: int, prefix: str, subscribed: asyncio.Event, *args: str) -> tuple[int, bytes, bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KASUHARA_")}
    env.update(KASUHARA_MQTT__PORT=str(port), KASUHARA_MQTT__TOPIC_PREFIX=prefix, PYTHONUNBUFFERED="1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        RUN_MONITOR,
        *args,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    first = await asyncio.wait_for(proc.stderr.readline(), 30)
    subscribed.set()
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        err = first + err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out, err


def _raw_controls(data: bytes) -> list[str]:
    """Characters a terminal would act on: C0 (but newline), DEL, C1, bidi overrides."""
    text = data.decode("utf-8", "replace")
    bad = {ch for ch in text if (ord(ch) < 0x20 and ch != "\n") or 0x7F <= ord(ch) <= 0x9F}
    bad |= {ch for ch in text if ch in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"}
    return sorted(repr(ch) for ch in bad)


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["table", "json"])
async def test_monitor_survives_a_retained_hostile_status_and_hostile_events(
    broker: Mosquitto, mode: str
) -> None:
    prefix = f"kasuhara-test/{uuid.uuid4().hex[:12]}"
    async with aiomqtt.Client("127.0.0.1", broker.port, timeout=5) as client:
        # Retained: every later start of the monitor reads it first.
        await client.publish(f"{prefix}/status", HOSTILE_STATUS, qos=1, retain=True)
        args = ["--json"] if mode == "json" else []
        subscribed = asyncio.Event()
        task = asyncio.create_task(_monitor(broker.port, prefix, subscribed, *args, "--duration", "6"))
        await asyncio.wait_for(subscribed.wait(), 30)
        for n, payload in enumerate(HOSTILE_EVENTS):
            await client.publish(f"{prefix}/calls/x/{n}", payload, qos=1)
        code, out, err = await task
    assert code == 0, err
    assert b"monitoring" in err
    assert b"Traceback" not in err
    assert _raw_controls(out) == [] and _raw_controls(err) == []
    text = out.decode()
    assert "ok1" in text  # the well-formed event after the hostile ones is still shown
    if mode == "table":
        assert "1:05" in text
        assert "service: online" in text and "since ?" in text
    else:
        assert '"duration_s":65.2' in text
    assert err.count(b"ignored a message") >= 2  # Infinity and the deep nesting are reported
