"""The FastAGI server and the legacy call flow against a fake Asterisk that speaks FastAGI over a real
socket, and a fake AMI. The same flow against the real Asterisk is in test_agi_sip.py; abuse of a real
``kasuhara agi`` process (and its CPU use) in test_agi_abuse.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from kasuhara_ari.agi import (
    PENDING_DIR,
    AgiCallFlow,
    CallEndWatch,
    HangupInfo,
    LegacyCall,
    PendingCalls,
    agi_sound,
)
from kasuhara_ari.agi_server import (
    AgiCommandError,
    AgiError,
    AgiHangup,
    AgiLimits,
    AgiProtocolError,
    AgiServer,
    AgiSession,
    AgiTimeout,
    parse_env_line,
    parse_response,
)
from kasuhara_ari.ami import AmiError
from kasuhara_ari.config import AgiConfig, Config, ConfigError, RecordingConfig
from kasuhara_ari.events import MemoryEvents
from kasuhara_ari.recording import CallRecord, Recorder
from kasuhara_ari.safe import clean_caller_name, clean_caller_number
from kasuhara_ari.schemas import validate_event, validate_recording

UNIQUEID = "1732800000.41"
LINKEDID = "1732800000.40"
DEAD = "511 Command Not Permitted on a dead channel or intercept routine"


def agi_env(**over: str) -> dict[str, str]:
    env = {
        "agi_network": "yes",
        "agi_network_script": "kasuhara",
        "agi_request": "agi://127.0.0.1:4573/kasuhara",
        "agi_channel": "PJSIP/caller-0000002a",
        "agi_language": "en",
        "agi_type": "PJSIP",
        "agi_uniqueid": UNIQUEID,
        "agi_version": "22.10.1",
        "agi_callerid": "0312345678",
        "agi_calleridname": "Yamada Taro",
        "agi_callingpres": "0",
        "agi_dnid": "4123",
        "agi_rdnis": "unknown",
        "agi_context": "kasuhara-in",
        "agi_extension": "4123",
        "agi_priority": "1",
        "agi_enhanced": "0.0",
        "agi_accountcode": "",
        "agi_threadid": "140418977396416",
    }
    env.update(over)
    return env


def env_bytes(env: dict[str, str]) -> bytes:
    return "".join(f"{k}: {v}\n" for k, v in env.items()).encode() + b"\n"


@dataclass
class FakeChannel:
    """Asterisk's answers for one channel; ``override`` maps a command prefix to the lines sent back (or
    None to close the connection instead of answering)."""

    variables: dict[str, str] = field(
        default_factory=lambda: {"CHANNEL(linkedid)": LINKEDID, "CHANNEL(language)": "en"}
    )
    override: dict[str, list[str] | None] = field(default_factory=dict)

    def reply(self, cmd: str) -> list[str] | None:
        for prefix, lines in self.override.items():
            if cmd.startswith(prefix):
                return lines
        if cmd == "ANSWER":
            return ["200 result=0"]
        if cmd.startswith("GET VARIABLE "):
            value = self.variables.get(cmd.removeprefix("GET VARIABLE "))
            return [f"200 result=1 ({value})"] if value else ["200 result=0"]
        if cmd.startswith("SET VARIABLE "):
            name, _, value = cmd.removeprefix("SET VARIABLE ").partition(" ")
            self.variables[name.lstrip("_")] = value
            return ["200 result=1"]
        if cmd.startswith("STREAM FILE "):
            return ["200 result=0 endpos=46400"]
        if cmd == "CHANNEL STATUS":
            return ["200 result=6"]
        if cmd.startswith("EXEC MixMonitor "):
            self.variables["KASUHARA_MIXMON_ID"] = "0x7fb5e8007a00"
            return ["200 result=0"]
        return ["510 Invalid or unknown command"]


class FakeAsterisk:
    """Asterisk's side of one FastAGI session over a real socket: sends the environment, answers."""

    def __init__(self, port: int, env: dict[str, str], channel: FakeChannel | None = None) -> None:
        self.port = port
        self.env = env
        self.channel = channel or FakeChannel()
        self.commands: list[str] = []

    async def run(self, timeout: float = 10) -> list[str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(env_bytes(self.env))
            async with asyncio.timeout(timeout):
                while line := await reader.readline():
                    cmd = line.decode().rstrip("\n")
                    self.commands.append(cmd)
                    answer = self.channel.reply(cmd)
                    if answer is None:
                        break
                    writer.write("".join(f"{a}\n" for a in answer).encode())
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        return self.commands


class FakeAmi:
    def __init__(self) -> None:
        self.ready = True
        self.callbacks: dict[str, list[Callable[[Any, Any], Any]]] = {}
        self.mixmonitors: list[tuple[str, str, str, str]] = []
        self.mixmonitor_error: Exception | None = None
        self.channels: set[str] = {UNIQUEID}  # what Asterisk has now (by uniqueid)
        #: Live channels by name and the variables AMI reads on them; the session Asterisk runs on a
        #: channel shares the dict (its SET VARIABLE lands there), a forged session does not.
        self.live: dict[str, dict[str, str]] = {}
        self.getvar_error: Exception | None = None
        self.getvars = 0

    def on_event(self, pattern: str, callback: Callable[[Any, Any], Any]) -> None:
        self.callbacks.setdefault(pattern, []).append(callback)

    def fire(self, **fields: str) -> None:
        for callback in self.callbacks.get(fields["Event"], []):
            callback(None, fields)

    async def action(self, fields: dict[str, str], *, timeout: float | None = None) -> dict[str, str]:
        assert fields["Action"] == "Getvar"
        self.getvars += 1
        if self.getvar_error is not None:
            raise self.getvar_error
        if fields["Channel"] in self.live:
            return {"Response": "Success", "Value": self.live[fields["Channel"]].get(fields["Variable"], "")}
        if fields["Channel"] not in self.channels:
            raise AmiError("AMI action Getvar: No such channel")
        return {"Response": "Success", "Value": fields["Channel"]}

    async def mixmonitor(self, channel: str, file: str, *, options: str = "", command: str = "") -> None:
        if self.mixmonitor_error is not None:
            raise self.mixmonitor_error
        self.mixmonitors.append((channel, file, options, command))

    async def stop_mixmonitor(self, channel: str) -> None:
        raise AssertionError("the AGI flow never stops MixMonitor: the call goes on in the dialplan")


def flow_config(spool: Path, completion: str = "watch", **agi: Any) -> Config:
    return replace(
        Config(),
        recording=RecordingConfig(asterisk_dir=str(spool), completion=completion),
        agi=replace(AgiConfig(), **{"reconcile_interval_s": 0.2, **agi}),
    )


@dataclass
class Harness:
    cfg: Config
    ami: FakeAmi
    events: MemoryEvents
    watch: CallEndWatch
    server: AgiServer
    spool: Path
    notified: list[str]
    flow: AgiCallFlow

    def flow_refused(self) -> dict[str, int]:
        """Sessions the flow refused, by reason."""
        return dict(self.flow.refused)

    async def call(
        self, channel: FakeChannel | None = None, *, forged: bool = False, **env: str
    ) -> FakeAsterisk:
        """A session as Asterisk runs it on a live channel (AMI sees the same channel), or ``forged``: a
        client that only names the channel."""
        full = agi_env(**env)
        fake = FakeAsterisk(self.server.port, full, channel)
        if not forged:
            live = fake.channel.variables
            live.setdefault("UNIQUEID", full["agi_uniqueid"])
            live.setdefault("CALLERID(num)", full["agi_callerid"])
            live.setdefault("CALLERID(name)", full["agi_calleridname"])
            self.ami.live[full["agi_channel"]] = live
        await fake.run()
        return fake

    def pending(self, call_id: str) -> Path:
        return self.spool / PENDING_DIR / f"{call_id}.json"

    async def metadata(self, call_id: str, timeout: float = 5) -> dict[str, Any]:
        path = self.spool / f"{call_id}.json"
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert time.monotonic() < deadline, f"no metadata for {call_id}"
            await asyncio.sleep(0.02)
        doc: dict[str, Any] = json.loads(path.read_text())
        validate_recording(doc)
        return doc

    async def finished(self, call_id: str, timeout: float = 5) -> None:
        """Until the call's end is handed on (after its metadata is written and its pending file removed)."""
        deadline = time.monotonic() + timeout
        while call_id not in self.notified:
            assert time.monotonic() < deadline, f"{call_id} not handed on"
            await asyncio.sleep(0.02)

    async def settle(self) -> None:
        """Let the watch apply what was queued."""
        for _ in range(5):
            await asyncio.sleep(0.02)


async def start_harness(
    spool: Path, ami: FakeAmi | None = None, completion: str = "watch", **agi: Any
) -> tuple[Harness, list[Any]]:
    cfg = flow_config(spool, completion, **agi)
    ami = ami or FakeAmi()
    events = MemoryEvents()
    notified: list[str] = []

    async def on_metadata(call_id: str) -> None:
        notified.append(call_id)

    recorder = Recorder(
        ami, cfg.recording.asterisk_dir, cfg.recording.host_dir, completion=cfg.recording.completion
    )
    watch = CallEndWatch(
        cfg, ami, recorder, events, PendingCalls(spool / PENDING_DIR), on_metadata=on_metadata
    )
    flow = AgiCallFlow(cfg, recorder, watch)
    server = AgiServer(flow, "127.0.0.1", 0, AgiLimits(env_timeout_s=1.0))
    tasks = [asyncio.create_task(server.serve()), asyncio.create_task(watch.run())]
    await asyncio.wait_for(server.listening.wait(), 5)
    await asyncio.wait_for(watch.restored.wait(), 5)
    return Harness(cfg, ami, events, watch, server, spool, notified, flow), tasks


async def stop(tasks: list[Any]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h, tasks = await start_harness(tmp_path)
    yield h
    await stop(tasks)


def hangup(ami: FakeAmi, *, uniqueid: str = UNIQUEID, at: float, cause: str = "16") -> None:
    ami.fire(
        Event="Hangup",
        Uniqueid=uniqueid,
        Cause=cause,
        **{"Cause-txt": "Normal Clearing"},
        Timestamp=f"{at:.6f}",
    )


# --- the protocol --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("200 result=0", (0, None, "")),
        ("200 result=-1 endpos=24000", (-1, None, "endpos=24000")),
        ("200 result=1 (1795885502.57)", (1, "1795885502.57", "")),
        ("200 result=1 (a (b) c)", (1, "a (b) c", "")),
        ("200 result=1 ()", (1, "", "")),
    ],
)
def test_parse_response(line: str, expected: tuple[int, str | None, str]) -> None:
    r = parse_response(line)
    assert (r.result, r.data, r.extra) == expected


@pytest.mark.parametrize("line", ["200 result=", "200 ok", "HTTP/1.1 200 OK", "200 result=1x"])
def test_parse_response_refuses_garbage(line: str) -> None:
    with pytest.raises(AgiProtocolError):
        parse_response(line)


def test_parse_env_line() -> None:
    assert parse_env_line("agi_accountcode: ") == ("agi_accountcode", "")
    assert parse_env_line("agi_calleridname: a: b") == ("agi_calleridname", "a: b")
    assert parse_env_line("Agi_channel: x") is None
    assert parse_env_line("GET / HTTP/1.1") is None
    assert parse_env_line("agi_../x: y") is None


async def _server(handler: Any, **limits: Any) -> tuple[AgiServer, asyncio.Task[None]]:
    server = AgiServer(handler, "127.0.0.1", 0, AgiLimits(**{"env_timeout_s": 1.0, **limits}), drain_s=0.5)
    task = asyncio.create_task(server.serve())
    await asyncio.wait_for(server.listening.wait(), 5)
    return server, task


async def test_env_first_value_wins_and_stray_lines_are_ignored() -> None:
    seen: list[dict[str, str]] = []

    async def handler(session: AgiSession) -> None:
        seen.append(dict(session.env))

    server, task = await _server(handler)
    try:
        # A caller name smuggling a newline cannot replace the channel or uniqueid sent before it.
        raw = (
            b"agi_network: yes\nagi_channel: PJSIP/caller-1\nagi_uniqueid: 1.1\n"
            b"agi_calleridname: x\nagi_uniqueid: ../../etc/passwd\nnot a variable\n\xff\xfe: bad\n\n"
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(raw)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the handler returned: session closed
        writer.close()
        assert seen == [
            {
                "agi_network": "yes",
                "agi_channel": "PJSIP/caller-1",
                "agi_uniqueid": "1.1",
                "agi_calleridname": "x",
            }
        ]
    finally:
        task.cancel()


async def test_command_answers_hangup_and_errors() -> None:
    outcomes: list[Any] = []

    async def handler(session: AgiSession) -> None:
        outcomes.append(await session.command("ANSWER"))
        for cmd in ("FOO", "EXEC", "STREAM FILE x"):
            try:
                outcomes.append(await session.command(cmd))
            except AgiError as exc:
                outcomes.append(type(exc))
        outcomes.append(session.hung_up)

    server, task = await _server(handler)
    channel = FakeChannel(
        override={
            "ANSWER": ["HANGUP", "200 result=0"],
            "FOO": ["510 Invalid or unknown command"],
            "EXEC": [
                "520-Invalid command syntax.  Proper usage follows:",
                "Usage: EXEC",
                "520 End of proper usage.",
            ],
            "STREAM FILE": [DEAD],
        }
    )
    try:
        commands = await FakeAsterisk(server.port, agi_env(), channel).run()
    finally:
        task.cancel()
    assert commands == ["ANSWER", "FOO", "EXEC", "STREAM FILE x"]
    assert outcomes[0].result == 0
    assert outcomes[1:] == [AgiCommandError, AgiCommandError, AgiHangup, True]


async def test_command_timeout_ends_the_session() -> None:
    errors: list[BaseException] = []

    async def handler(session: AgiSession) -> None:
        try:
            await session.command("ANSWER", timeout=0.2)
        except AgiTimeout as exc:
            errors.append(exc)
            raise

    server, task = await _server(handler)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(env_bytes(agi_env()))
        assert await asyncio.wait_for(reader.readline(), 5) == b"ANSWER\n"
        # Never answer: the server gives up and closes.
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        task.cancel()
    assert len(errors) == 1
    assert server.stats.failed == 1


async def test_a_command_is_one_line() -> None:
    refused: list[BaseException] = []

    async def handler(session: AgiSession) -> None:
        with pytest.raises(ValueError, match="one printable line") as info:
            await session.command("SET VARIABLE X 1\nEXEC System rm")
        refused.append(info.value)

    server, task = await _server(handler)
    try:
        assert await FakeAsterisk(server.port, agi_env()).run() == []
    finally:
        task.cancel()
    assert len(refused) == 1


async def _abuse(port: int, kind: str) -> bytes:
    """One misbehaving client; returns what the server sent before closing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = b""
    try:
        if kind == "garbage":
            writer.write(os.urandom(3000).replace(b"\n", b"") + b"\n\x00\x01\n")
        elif kind == "half_env_then_close":
            writer.write(b"agi_network: yes\nagi_channel: PJSIP/x")
            await writer.drain()
            writer.close()
            return b""
        elif kind == "huge_line":
            with contextlib.suppress(ConnectionError):
                writer.write(b"agi_network: " + b"A" * (10 * 1024 * 1024))
                await writer.drain()
        elif kind == "slowloris":
            with contextlib.suppress(ConnectionError):
                for ch in b"agi_network: yes\nagi_channel: PJSIP/caller-1\n" * 10:
                    writer.write(bytes([ch]))
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    if reader.at_eof():
                        break
                    with contextlib.suppress(TimeoutError):
                        got += await asyncio.wait_for(reader.read(100), 0.001)
                        if reader.at_eof():
                            break
        elif kind == "close_mid_command":
            writer.write(env_bytes(agi_env()))
            got = await reader.readline()
            writer.transport.abort()  # RST, mid-command
            return got
        with contextlib.suppress(ConnectionError):
            got += await asyncio.wait_for(reader.read(), 10)
        return got
    finally:
        writer.close()


async def test_malformed_and_abruptly_closed_sessions_are_closed_and_forgotten() -> None:
    handled: list[str] = []

    async def handler(session: AgiSession) -> None:
        handled.append(session.env["agi_uniqueid"])
        await session.command("GET VARIABLE CHANNEL(linkedid)")

    server, task = await _server(handler, max_line_bytes=4096)
    try:
        kinds = ["garbage", "half_env_then_close", "huge_line", "slowloris", "close_mid_command"]
        results = await asyncio.wait_for(asyncio.gather(*(_abuse(server.port, k) for k in kinds * 4)), 30)
        assert all(r in (b"", b"GET VARIABLE CHANNEL(linkedid)\n") for r in results), results
        deadline = time.monotonic() + 5
        while server.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert server.active == 0
        assert server.stats.malformed == 16  # garbage, half, huge, slowloris ×4
        assert server.stats.failed == 4  # close mid-command: AgiClosed in the handler
        # Still serving.
        channel = FakeChannel()
        assert await FakeAsterisk(server.port, agi_env(agi_uniqueid="9.9"), channel).run() == [
            "GET VARIABLE CHANNEL(linkedid)"
        ]
        assert handled[-1] == "9.9"
    finally:
        task.cancel()


async def test_max_sessions_refuses_extra_connections_at_once() -> None:
    release = asyncio.Event()

    async def handler(session: AgiSession) -> None:
        await release.wait()

    server, task = await _server(handler, max_sessions=2)
    conns = []
    try:
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(env_bytes(agi_env()))
            conns.append((reader, writer))
        while server.active < 2:
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed without reading anything
        writer.close()
        assert server.stats.refused_busy == 1
        release.set()
        for reader, writer in conns:
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
        assert (await FakeAsterisk(server.port, agi_env()).run()) == []  # room again
    finally:
        task.cancel()


async def test_stopping_the_server_ends_stuck_sessions() -> None:
    async def handler(session: AgiSession) -> None:
        await asyncio.sleep(3600)

    server, task = await _server(handler)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(env_bytes(agi_env()))
    while server.active < 1:
        await asyncio.sleep(0.01)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert server.active == 0
    writer.close()


# --- the legacy call flow ------------------------------------------------------------------------------


async def test_call_is_answered_recorded_announced_then_finished_by_ami_hangup(harness: Harness) -> None:
    channel = FakeChannel()
    fake = await harness.call(channel)
    spool = str(harness.spool)
    assert re.fullmatch(r"SET VARIABLE KASUHARA_AGI_PROOF [0-9a-f]{32}", fake.commands[1])
    assert fake.commands[:1] + fake.commands[2:] == [
        "GET VARIABLE CHANNEL(linkedid)",
        "ANSWER",
        "GET VARIABLE KASUHARA_NOTICE_PLAYED",
        f"SET VARIABLE __KASUHARA_CALL_ID {LINKEDID}",
        "GET VARIABLE CHANNEL(language)",
        "SET VARIABLE CHANNEL(language) ja",
        'STREAM FILE kasuhara/recording-notice ""',
        "SET VARIABLE __KASUHARA_NOTICE_PLAYED 1",
        "SET VARIABLE CHANNEL(language) en",
    ]
    # Recording through AMI with the Stasis flow's file, before the notice; no completion command (the
    # service's CompletionWatcher marks the closed file).
    assert harness.ami.mixmonitors == [
        ("PJSIP/caller-0000002a", f"{spool}/{LINKEDID}.wav", "i(KASUHARA_MIXMON_ID)", "")
    ]
    # Back in the dialplan: pending on disk, no metadata until the channel ends.
    await harness.settle()
    assert harness.pending(LINKEDID).exists()
    assert not (harness.spool / f"{LINKEDID}.json").exists()

    answered = datetime.fromisoformat(
        json.loads(harness.pending(LINKEDID).read_text())["record"]["answered_at"]
    )
    ami = harness.ami
    ami.fire(
        Event="DialBegin",
        Uniqueid=UNIQUEID,
        DestChannel="PJSIP/agent-0000002b",
        DestUniqueid="1732800000.42",
        DialString="agent/sip:agent@127.0.0.1:5123",
    )
    ami.fire(Event="DialEnd", Uniqueid=UNIQUEID, DestUniqueid="1732800000.42", DialStatus="ANSWER")
    ami.fire(Event="HangupRequest", Uniqueid=UNIQUEID)
    ami.fire(Event="Hangup", Uniqueid="1732800000.42", Cause="16")  # the agent's leg: not ours
    end = answered.timestamp() + 12.5
    hangup(ami, at=end)
    meta = await harness.metadata(LINKEDID)
    await harness.finished(LINKEDID)
    assert meta["call_id"] == LINKEDID
    assert meta["direction"] == "inbound"
    assert meta["caller"] == {"number": "0312345678", "name": "Yamada Taro"}
    assert meta["target"] == meta["agent"] == "PJSIP/agent/sip:agent@127.0.0.1:5123"
    assert meta["notice_played"] is True
    assert meta["audio"] == {"format": "wav", "expected": True}
    assert meta["ended_at"] == datetime.fromtimestamp(end, UTC).isoformat(timespec="milliseconds")
    assert meta["duration_s"] == pytest.approx(12.5, abs=0.002)
    assert meta["end_reason"] == "caller_hungup"
    assert meta["ended_at_source"] == "ami"
    assert meta["hangup_cause"] == {"code": 16, "text": "Normal Clearing"}
    assert meta["entry"] == "agi"
    assert not harness.pending(LINKEDID).exists()
    assert harness.notified == [LINKEDID]
    names = [e["event"] for e in harness.events.of(LINKEDID)]
    assert names == [
        "started",
        "recording_started",
        "notice_played",
        "agent_ringing",
        "agent_answered",
        "ended",
    ]
    for payload in harness.events.of(LINKEDID):
        validate_event(payload)
    assert [e["event"] for e in meta["timeline"]] == names


async def test_caller_id_is_cleaned_and_call_id_is_never_raw_input(harness: Harness) -> None:
    number = "\x1b[2J../../etc/passwd\x07"
    name = "../../../root/.ssh/authorized_keys\u202e\x00\t"
    channel = FakeChannel()
    channel.variables["CHANNEL(linkedid)"] = "../../etc/cron.d/x"  # unsafe: the uniqueid is used instead
    await harness.call(channel, agi_callerid=number, agi_calleridname=name)
    hangup(harness.ami, at=time.time())
    meta = await harness.metadata(UNIQUEID)
    assert meta["caller"] == {"number": clean_caller_number(number), "name": clean_caller_name(name)}
    assert meta["caller"]["number"] == "\\x1b[2J../../etc/passwd\\x07"
    assert all(ch.isprintable() for ch in meta["caller"]["name"] + meta["caller"]["number"])
    # Nothing named after the caller: only the call's own files exist.
    assert sorted(p.name for p in harness.spool.rglob("*") if p.is_file()) == [f"{UNIQUEID}.json"]


@pytest.mark.parametrize(
    "env",
    [
        {"agi_uniqueid": "../../etc/passwd"},
        {"agi_uniqueid": ""},
        {"agi_channel": "PJSIP/x\rAction: Originate"},
        {"agi_network_script": "other"},
    ],
)
async def test_unusable_sessions_are_refused_without_a_command(harness: Harness, env: dict[str, str]) -> None:
    fake = await harness.call(**env)
    assert fake.commands == []
    assert harness.ami.mixmonitors == []
    assert not any(harness.spool.rglob("*.json"))


async def test_notice_is_not_repeated_on_a_channel_that_heard_it(harness: Harness) -> None:
    channel = FakeChannel()
    channel.variables["KASUHARA_NOTICE_PLAYED"] = "1"
    fake = await harness.call(channel)
    assert not any(c.startswith("STREAM FILE") for c in fake.commands)
    assert len(harness.ami.mixmonitors) == 1  # still recorded
    hangup(harness.ami, at=time.time())
    meta = await harness.metadata(LINKEDID)
    assert meta["notice_played"] is False
    assert meta["notice_skipped"] == "already_played"


async def test_a_second_agi_on_the_same_channel_does_nothing(harness: Harness) -> None:
    await harness.call()
    again = await harness.call()
    assert again.commands == []
    assert len(harness.ami.mixmonitors) == 1


async def test_caller_hangs_up_during_the_notice(harness: Harness) -> None:
    channel = FakeChannel(
        override={
            "STREAM FILE": ["200 result=-1 endpos=19200"],
            "CHANNEL STATUS": ["HANGUP", DEAD],
        }
    )
    fake = await harness.call(channel)
    # The session ends right after Asterisk says the channel is gone: nothing more is sent.
    assert fake.commands[-2:] == ['STREAM FILE kasuhara/recording-notice ""', "CHANNEL STATUS"]
    hangup(harness.ami, at=time.time())
    meta = await harness.metadata(LINKEDID)
    assert meta["end_reason"] == "caller_hungup_during_notice"
    assert meta["notice_played"] is False
    assert meta["audio"]["expected"] is True
    assert "notice_played" not in [e["event"] for e in harness.events.of(LINKEDID)]


async def test_notice_that_cannot_be_played_is_not_claimed(harness: Harness) -> None:
    channel = FakeChannel(override={"STREAM FILE": ["200 result=-1 endpos=0"]})
    fake = await harness.call(channel)
    assert fake.commands[-2:] == ["CHANNEL STATUS", "SET VARIABLE CHANNEL(language) en"]
    hangup(harness.ami, at=time.time())
    meta = await harness.metadata(LINKEDID)
    assert meta["notice_played"] is False
    assert meta["notice_skipped"] == "failed"


@pytest.mark.parametrize("completion", ["watch", "command"])
async def test_mixmonitor_through_agi_when_ami_fails(tmp_path: Path, completion: str) -> None:
    harness, tasks = await start_harness(tmp_path, completion=completion)
    try:
        harness.ami.mixmonitor_error = AmiError("AMI at 127.0.0.1:5038 is not connected (action MixMonitor)")
        fake = await harness.call()
    finally:
        await stop(tasks)
    spool = str(harness.spool)
    # The same file, option and completion as Recorder gives to AMI.
    recorder = Recorder(harness.ami, spool, harness.spool, completion=completion)
    command = recorder.completion_command(recorder.paths(LINKEDID))
    if completion == "command":
        assert command == f"touch {spool}/{LINKEDID}.done"
        exec_cmd = f'EXEC MixMonitor "{spool}/{LINKEDID}.wav,i(KASUHARA_MIXMON_ID),{command}"'
    else:
        assert command == ""
        exec_cmd = f'EXEC MixMonitor "{spool}/{LINKEDID}.wav,i(KASUHARA_MIXMON_ID)"'
    assert fake.commands[4:7] == [
        "GET VARIABLE KASUHARA_MIXMON_ID",
        exec_cmd,
        "GET VARIABLE KASUHARA_MIXMON_ID",
    ]
    assert [e.get("via") for e in harness.events.of(LINKEDID) if e["event"] == "recording_started"] == ["agi"]


async def test_timed_out_ami_mixmonitor_that_did_start_is_not_started_twice(harness: Harness) -> None:
    harness.ami.mixmonitor_error = AmiError("AMI action MixMonitor: no answer within 5s")
    channel = FakeChannel()
    channel.variables["KASUHARA_MIXMON_ID"] = "0x1"  # it did start
    fake = await harness.call(channel)
    assert not any(c.startswith("EXEC") for c in fake.commands)
    hangup(harness.ami, at=time.time())
    assert (await harness.metadata(LINKEDID))["audio"]["expected"] is True


async def test_recording_failure_is_recorded(harness: Harness) -> None:
    harness.ami.mixmonitor_error = AmiError("refused")
    channel = FakeChannel(override={"EXEC MixMonitor": ["200 result=-1"]})
    await harness.call(channel)
    hangup(harness.ami, at=time.time())
    meta = await harness.metadata(LINKEDID)
    assert meta["audio"]["expected"] is False
    assert meta["recording_error"] == "refused"
    assert "recording_failed" in [e["event"] for e in harness.events.of(LINKEDID)]


async def test_restart_finishes_calls_whose_channel_is_gone_and_keeps_live_ones(tmp_path: Path) -> None:
    alive = FakeAmi()
    alive.channels = {"1.1", "2.2"}
    first, tasks = await start_harness(tmp_path, alive)
    await first.call(FakeChannel(variables={"CHANNEL(linkedid)": "1.1"}), agi_uniqueid="1.1")
    await first.call(FakeChannel(variables={"CHANNEL(linkedid)": "2.2"}), agi_uniqueid="2.2")
    await first.settle()
    await stop(tasks)  # kasuhara agi goes away mid-call
    assert first.pending("1.1").exists() and first.pending("2.2").exists()

    # While it was away: call 1.1 ended (MixMonitor closed its file and touched .done); 2.2 goes on.
    (tmp_path / "1.1.wav").write_bytes(b"RIFF")
    done = tmp_path / "1.1.done"
    done.touch()
    ended = time.time() - 30
    os.utime(done, (ended, ended))
    ami = FakeAmi()
    ami.channels = {"2.2"}
    second, tasks = await start_harness(tmp_path, ami)
    try:
        meta = await second.metadata("1.1")
        await second.finished("1.1")
        assert meta["ended_at_source"] == "estimated"
        assert meta["ended_at"] == datetime.fromtimestamp(ended, UTC).isoformat(timespec="milliseconds")
        assert meta["end_reason"] == "ended_while_not_watched"
        assert meta["notice_played"] is True  # what the first run learnt is kept
        assert meta["caller"]["number"] == "0312345678"
        assert not second.pending("1.1").exists()
        assert second.notified == ["1.1"]
        # 2.2 is alive: kept, and its AMI Hangup finishes it precisely.
        assert second.pending("2.2").exists()
        assert not (tmp_path / "2.2.json").exists()
        hangup(ami, uniqueid="2.2", at=time.time())
        meta2 = await second.metadata("2.2")
        assert meta2["ended_at_source"] == "ami"
        assert not second.pending("2.2").exists()
    finally:
        await stop(tasks)


async def test_calls_are_reconciled_when_ami_comes_back(tmp_path: Path) -> None:
    ami = FakeAmi()
    h, tasks = await start_harness(tmp_path, ami, reconcile_interval_s=3600)
    try:
        await h.call()
        await h.settle()
        ami.ready = False  # AMI drops; the Hangup event is lost
        await asyncio.sleep(1.2)
        assert not (tmp_path / f"{LINKEDID}.json").exists()
        before = ami.getvars
        ami.channels = set()
        ami.ready = True  # back: the watch asks Asterisk at once, not after reconcile_interval_s
        meta = await h.metadata(LINKEDID, timeout=5)
        assert ami.getvars > before
        assert meta["ended_at_source"] == "estimated"
    finally:
        await stop(tasks)


def _legacy(**over: Any) -> LegacyCall:
    record = CallRecord(
        call_id="1.1", direction="inbound", caller_number="", caller_name="", target="", started_at="x"
    )
    call = LegacyCall(call_id="1.1", channel="PJSIP/x-1", uniqueid="1.1", record=record)
    for key, value in over.items():
        setattr(call, key, value)
    return call


@pytest.mark.parametrize(
    ("dial_status", "caller_requested", "reason"),
    [
        ("ANSWER", True, "caller_hungup"),
        ("ANSWER", False, "agent_hungup"),
        ("BUSY", False, "agent_busy"),
        ("NOANSWER", False, "agent_no_answer"),
        ("CHANUNAVAIL", False, "agent_unavailable"),
        ("CANCEL", True, "caller_hungup_while_ringing"),
        ("", True, "caller_hungup"),
        ("", False, "hangup"),
    ],
)
def test_end_reason(dial_status: str, caller_requested: bool, reason: str) -> None:
    call = _legacy(
        dial_status=dial_status, caller_hangup_requested=caller_requested, hangup=HangupInfo(at=1.0)
    )
    assert call.end_reason() == reason


def test_pending_record_round_trip(tmp_path: Path) -> None:
    call = _legacy(answered_wall=12.5, dial_status="ANSWER", dialled={"2.2": "PJSIP/agent"})
    call.record.notice_played = True
    store = PendingCalls(tmp_path)
    store.save(call.to_pending())
    (tmp_path / "junk.json").write_text("{")
    (tmp_path / "..json").write_text("{}")
    [back] = store.load()
    assert back.to_pending() == call.to_pending() | {"state": back.state.value}
    assert back.session_open is False


@pytest.mark.parametrize(
    ("sound", "name"),
    [("kasuhara/recording-notice", "kasuhara/recording-notice"), ("sound:a/b_c-1", "a/b_c-1")],
)
def test_agi_sound(sound: str, name: str) -> None:
    assert agi_sound(sound) == name


@pytest.mark.parametrize("sound", ["a b", 'x"', "../etc/x", "tone:440", "a\nEXEC System x", ""])
def test_agi_sound_refuses_what_agi_cannot_carry(sound: str) -> None:
    with pytest.raises(ConfigError, match=r"announcement\.sound"):
        agi_sound(sound)


async def test_target_named_in_the_dialplan_is_kept(harness: Harness) -> None:
    # AGI(agi://127.0.0.1:4573/kasuhara,PJSIP/agent-queue): the dialplan says where the call goes.
    await harness.call(agi_arg_1="PJSIP/agent-queue")
    ami = harness.ami
    ami.fire(
        Event="DialBegin",
        Uniqueid=UNIQUEID,
        DestChannel="PJSIP/agent-0000002b",
        DestUniqueid="1732800000.42",
        DialString="agent-queue",
    )
    ami.fire(Event="DialEnd", Uniqueid=UNIQUEID, DestUniqueid="1732800000.42", DialStatus="NOANSWER")
    hangup(ami, at=time.time())
    meta = await harness.metadata(LINKEDID)
    assert meta["target"] == "PJSIP/agent-queue"
    assert meta["agent"] is None
    assert meta["end_reason"] == "agent_no_answer"
