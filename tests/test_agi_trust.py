"""Issue 12, "the FastAGI port trusts whoever connects": a session proves through AMI that a real channel
runs it before the flow records or writes anything; call ids that already have a recording are refused;
sessions per peer, environment size and peers are limited.

The flow runs against the fake Asterisk/AMI of test_agi.py (real sockets, fake servers); the same attack
against the real Asterisk over real SIP is in test_agi_sip.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_agi import (
    LINKEDID,
    PENDING_DIR,
    UNIQUEID,
    FakeAsterisk,
    FakeChannel,
    Harness,
    agi_env,
    env_bytes,
    hangup,
    start_harness,
    stop,
)

from kasuhara_ari.agi_server import AgiLimits, AgiServer, AgiSession, parse_peers, peer_address
from kasuhara_ari.ami import AmiError, AmiTimeout

VICTIM = "PJSIP/caller-0000002a"


def spool_files(h: Harness) -> list[str]:
    return sorted(str(p.relative_to(h.spool)) for p in h.spool.rglob("*") if p.is_file())


def live_victim(h: Harness, uniqueid: str = UNIQUEID, linkedid: str = LINKEDID) -> dict[str, str]:
    """A real call's channel that Asterisk has (AMI sees it), not running any session of ours."""
    variables = {
        "UNIQUEID": uniqueid,
        "CHANNEL(linkedid)": linkedid,
        "CALLERID(num)": "0312345678",
        "CALLERID(name)": "Real Caller",
    }
    h.ami.live[VICTIM] = variables
    return variables


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    harness, tasks = await start_harness(tmp_path)
    yield harness
    await stop(tasks)


# --- the channel must be proved through AMI --------------------------------------------------------------


async def test_a_client_naming_a_live_channel_is_refused_before_anything(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kasuhara_ari")
    victim = live_victim(h)
    forged = FakeChannel()  # answers the linkedid query with the victim's call id
    fake = await h.call(
        forged,
        forged=True,
        agi_channel=VICTIM,
        agi_uniqueid="1732800000.99",
        agi_callerid="0120\x1b[31m",
        agi_calleridname="Forged\r\nagi event=fake",
    )
    assert [c.split(" ")[:3] for c in fake.commands] == [
        ["GET", "VARIABLE", "CHANNEL(linkedid)"],
        ["SET", "VARIABLE", "KASUHARA_AGI_PROOF"],
    ]
    assert "KASUHARA_AGI_PROOF" not in victim  # the real channel never got the proof
    assert h.ami.mixmonitors == []
    await h.settle()
    assert spool_files(h) == []
    assert h.watch.calls == {}
    assert h.server.stats.completed == 1
    lines = [r.getMessage() for r in caplog.records if "event=refused" in r.getMessage()]
    assert len(lines) == 1 and "reason=channel_not_proved" in lines[0]
    assert all(ch.isprintable() for ch in lines[0])


async def test_a_client_naming_a_channel_asterisk_does_not_have_is_refused(h: Harness) -> None:
    fake = await h.call(forged=True, agi_channel="PJSIP/nobody-00000001", agi_uniqueid="5.5")
    assert len(fake.commands) == 2
    assert h.ami.mixmonitors == [] and spool_files(h) == []
    assert h.flow_refused() == {"no_such_channel": 1}


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [("UNIQUEID", "1732800000.77", "uniqueid_mismatch"), ("CHANNEL(linkedid)", "9.9", "linkedid_mismatch")],
)
async def test_claims_that_asterisk_contradicts_are_refused(
    h: Harness, variable: str, value: str, reason: str
) -> None:
    # The session does run on the channel (the proof passes), but what it claims is not what AMI says:
    # a relay that rewrites the environment or the answers.
    channel = FakeChannel()
    fake = FakeAsterisk(h.server.port, agi_env(), channel)
    channel.variables.update(
        {"UNIQUEID": UNIQUEID, "CALLERID(num)": "1", "CALLERID(name)": "n", variable: value}
    )
    channel.override["GET VARIABLE CHANNEL(linkedid)"] = [f"200 result=1 ({LINKEDID})"]
    h.ami.live[VICTIM] = channel.variables
    await fake.run()
    assert not any(c == "ANSWER" for c in fake.commands)
    assert h.ami.mixmonitors == [] and spool_files(h) == []
    assert h.flow_refused() == {reason: 1}


async def test_caller_id_comes_from_asterisk_not_the_environment(h: Harness) -> None:
    channel = FakeChannel()
    channel.variables.update({"CALLERID(num)": "0312345678", "CALLERID(name)": "Real Caller"})
    await h.call(channel, agi_callerid="0000", agi_calleridname="Someone Else")
    hangup(h.ami, at=time.time())
    meta = await h.metadata(LINKEDID)
    assert meta["caller"] == {"number": "0312345678", "name": "Real Caller"}
    assert meta["channel_verified"] is True
    assert h.events.of(LINKEDID)[0]["caller"] == {"number": "0312345678", "name": "Real Caller"}


# --- a call id that already has a recording is never reused ----------------------------------------------


@pytest.mark.parametrize("existing", [".wav", ".json", ".done", "pending"])
async def test_a_call_id_with_a_recording_is_never_written_again(h: Harness, existing: str) -> None:
    # The id of a call's first channel (linkedid = uniqueid) already has a recording in the spool (say,
    # Asterisk restarted within a second and repeated a uniqueid).
    if existing == "pending":
        (h.spool / PENDING_DIR).mkdir(exist_ok=True)
        h.pending(UNIQUEID).write_text("{}")
        evidence = h.pending(UNIQUEID)
    else:
        evidence = h.spool / f"{UNIQUEID}{existing}"
        evidence.write_text("{}")
    # A verified channel: recorded under an id of its own; the existing recording is untouched.
    channel = FakeChannel(variables={"CHANNEL(linkedid)": UNIQUEID})
    fake = await h.call(channel)
    assert "ANSWER" in fake.commands
    own = f"{UNIQUEID}-{UNIQUEID}"
    assert [m[1].rsplit("/", 1)[1] for m in h.ami.mixmonitors] == [f"{own}.wav"]
    hangup(h.ami, at=time.time())
    assert (await h.metadata(own))["call_id"] == own
    await h.finished(own)  # its pending record is gone too
    assert evidence.read_text() == "{}"
    # Both ids taken (the same channel id again): refused, nothing started or written.
    before = spool_files(h)
    again = await h.call(FakeChannel(variables={"CHANNEL(linkedid)": UNIQUEID}))
    assert "ANSWER" not in again.commands
    assert len(h.ami.mixmonitors) == 1
    assert h.flow_refused() == {"call_id_taken": 1}
    assert spool_files(h) == before


async def test_a_second_channel_of_a_live_call_gets_its_own_id_or_is_refused(h: Harness) -> None:
    first = await h.call()  # call LINKEDID, first leg
    assert "ANSWER" in first.commands
    second_uid = "1732800000.50"
    h.ami.channels.add(second_uid)
    second = await h.call(agi_channel="PJSIP/caller-0000002c", agi_uniqueid=second_uid)
    assert "ANSWER" in second.commands
    derived = f"{LINKEDID}-{second_uid}"
    assert [m[1].rsplit("/", 1)[1] for m in h.ami.mixmonitors] == [f"{LINKEDID}.wav", f"{derived}.wav"]
    # A third session claiming the same second leg again after a restart of its id: refused, not reused.
    (h.spool / f"{LINKEDID}-1732800000.51.wav").write_bytes(b"x")
    third = await h.call(agi_channel="PJSIP/caller-0000002d", agi_uniqueid="1732800000.51")
    assert "ANSWER" not in third.commands
    assert h.flow_refused() == {"call_id_taken": 1}
    assert len(h.ami.mixmonitors) == 2


async def test_two_sessions_at_once_never_share_a_call_id(h: Harness) -> None:
    # Two legs of one call reach the AGI at the same moment: each gets its own id, one MixMonitor each.
    a = h.call(agi_channel="PJSIP/a-1", agi_uniqueid=LINKEDID)
    b = h.call(agi_channel="PJSIP/b-1", agi_uniqueid="1732800000.60")
    h.ami.channels |= {LINKEDID, "1732800000.60"}
    await asyncio.gather(a, b)
    files = sorted(m[1].rsplit("/", 1)[1] for m in h.ami.mixmonitors)
    assert files == sorted([f"{LINKEDID}.wav", f"{LINKEDID}-1732800000.60.wav"])


# --- AMI away: nothing proved, nothing done by name ------------------------------------------------------


async def test_without_ami_the_notice_plays_and_only_the_session_records(h: Harness) -> None:
    h.ami.ready = False
    fake = await h.call()
    assert not any(c.startswith("SET VARIABLE KASUHARA_AGI_PROOF") for c in fake.commands)
    assert any(c.startswith("EXEC MixMonitor") for c in fake.commands)  # the session's own channel
    assert any(c.startswith("STREAM FILE") for c in fake.commands)
    assert h.ami.mixmonitors == []  # never by channel name through the privileged login
    h.ami.ready = True
    hangup(h.ami, at=time.time())
    meta = await h.metadata(LINKEDID)
    assert meta["channel_verified"] is False


async def test_without_ami_an_existing_call_id_is_refused_outright(h: Harness) -> None:
    (h.spool / f"{LINKEDID}.wav").write_bytes(b"evidence")
    h.ami.ready = False
    fake = await h.call()
    assert "ANSWER" not in fake.commands
    assert h.flow_refused() == {"call_id_taken": 1}


@pytest.mark.parametrize("error", [AmiTimeout("no answer"), AmiError("AMI action Getvar: Permission denied")])
async def test_ami_that_cannot_answer_leaves_the_call_unverified_not_unrecorded(
    h: Harness, error: AmiError
) -> None:
    h.ami.getvar_error = error
    fake = await h.call()
    assert any(c.startswith("EXEC MixMonitor") for c in fake.commands)
    assert h.ami.mixmonitors == []
    h.ami.getvar_error = None
    hangup(h.ami, at=time.time())
    assert (await h.metadata(LINKEDID))["channel_verified"] is False


# --- the server's limits ---------------------------------------------------------------------------------


async def _server(handler: object, **limits: object) -> tuple[AgiServer, asyncio.Task[None]]:
    server = AgiServer(
        handler,  # type: ignore[arg-type]
        "127.0.0.1",
        0,
        AgiLimits(**{"env_timeout_s": 2.0, **limits}),  # type: ignore[arg-type]
        drain_s=0.5,
    )
    task = asyncio.create_task(server.serve())
    await asyncio.wait_for(server.listening.wait(), 5)
    return server, task


async def _open(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def _closed_at_once(port: int, source: str) -> bool:
    """True if the server closes a fresh connection from ``source`` without waiting for anything."""
    reader, writer = await _open(port, source)
    try:
        return await asyncio.wait_for(reader.read(), 2) == b""
    except TimeoutError:
        return False
    finally:
        writer.close()


async def test_sessions_per_peer_are_limited_until_they_prove_themselves() -> None:
    release = asyncio.Event()
    handled: list[str] = []

    async def handler(session: AgiSession) -> None:
        handled.append(session.env["agi_uniqueid"])
        if session.env["agi_uniqueid"].startswith("real"):
            session.vouched()  # what the flow does once AMI proved the channel
        await release.wait()

    server, task = await _server(handler, max_sessions_per_peer=3)
    conns = []
    try:
        # Three idle sessions from one host (nothing sent): the host's quota is used up ...
        for _ in range(3):
            conns.append(await _open(server.port, "127.0.0.2"))
        while server.active < 3:
            await asyncio.sleep(0.01)
        assert await _closed_at_once(server.port, "127.0.0.2")
        assert server.stats.refused_peer_limit == 1
        # ... another host is not affected ...
        reader, writer = await _open(server.port, "127.0.0.1")
        writer.write(env_bytes(agi_env(agi_uniqueid="real.1")))
        conns.append((reader, writer))
        # ... and sessions that proved themselves do not count against their host.
        for i in range(2, 6):
            reader, writer = await _open(server.port, "127.0.0.1")
            writer.write(env_bytes(agi_env(agi_uniqueid=f"real.{i}")))
            conns.append((reader, writer))
            while f"real.{i}" not in handled:
                await asyncio.sleep(0.01)
        assert server.active == 8
        assert server.stats.refused_peer_limit == 1
        # The idle sessions are cut by env_timeout_s; then the host may connect again.
        for reader, _ in conns[:3]:
            assert await asyncio.wait_for(reader.read(), 5) == b""
        await asyncio.sleep(0.05)
        assert not await _closed_at_once(server.port, "127.0.0.2")
    finally:
        release.set()
        for _, writer in conns:
            writer.close()
        task.cancel()


async def test_environment_size_is_limited() -> None:
    handled: list[int] = []

    async def handler(session: AgiSession) -> None:
        handled.append(len(session.env))

    server, task = await _server(handler, max_env_bytes=2048)
    try:
        # 40 lines of 100 bytes, each well under max_line_bytes: 4 KB of environment in all.
        big = agi_env(**{f"agi_arg_{i}": "x" * 90 for i in range(1, 41)})
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        with contextlib.suppress(ConnectionError):
            writer.write(env_bytes(big))
            await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert handled == []
        assert server.stats.malformed == 1
        # Asterisk's real environment fits.
        await FakeAsterisk(server.port, agi_env()).run()
        assert handled == [len(agi_env())]
    finally:
        task.cancel()


async def test_only_allowed_peers_may_connect() -> None:
    handled: list[str] = []

    async def handler(session: AgiSession) -> None:
        handled.append(session.peer.rsplit(":", 1)[0])

    server, task = await _server(handler, allowed_peers=parse_peers(["127.0.0.2", "10.0.0.0/8"]))
    try:
        assert await _closed_at_once(server.port, "127.0.0.1")
        assert server.stats.refused_not_allowed == 1
        reader, writer = await _open(server.port, "127.0.0.2")
        writer.write(env_bytes(agi_env()))
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert handled == ["127.0.0.2"]
        assert server.stats.accepted == 1
    finally:
        task.cancel()


def test_peer_addresses_and_networks() -> None:
    limits = AgiLimits(allowed_peers=parse_peers(["192.0.2.0/24", "::1"]))
    assert limits.peer_allowed("192.0.2.77")
    assert limits.peer_allowed("::ffff:192.0.2.5")  # IPv4-mapped from a dual-stack socket
    assert limits.peer_allowed("::1")
    assert not limits.peer_allowed("192.0.3.1")
    assert not limits.peer_allowed("?")
    assert AgiLimits().peer_allowed("203.0.113.9")  # empty list: everyone, as before
    assert peer_address("fe80::1%eth0") is not None
    with pytest.raises(ValueError, match=r"agi\.allowed_peers"):
        parse_peers(["10.0.0.1/40"])
    with pytest.raises(ValueError, match="max_sessions_per_peer"):
        AgiLimits(max_sessions_per_peer=0)
    with pytest.raises(ValueError, match="max_env_bytes"):
        AgiLimits(max_env_bytes=10)
