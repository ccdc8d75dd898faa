"""The live board: the shared model (kasuhara_ari.live), the service's retained snapshots, the console's
feed and its server-sent events.

Pure logic first (the model, the feed with messages handed in); then the stream and the join endpoint
under a real uvicorn on a loopback port (accounts are a fake, as in test_web_auth); then against a real
mosquitto: a retained snapshot republished after a broker restart that lost it, and a console started
mid-call that shows the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import aiomqtt
import httpx
import pytest
import uvicorn
from test_web_auth import PASSWORD, Console, login, page_token

from kasuhara_ari.accounts import AccountError, Accounts, Role
from kasuhara_ari.config import Config, MqttConfig, WebConfig
from kasuhara_ari.events import MqttEvents, build_payload, encode
from kasuhara_ari.live import LIVE_SCHEMA, MAX_TEXT_CHARS, LiveBoard, LiveCall
from kasuhara_ari.schemas import SchemaError, validate_event
from kasuhara_ari.web import board as board_module
from kasuhara_ari.web import create_app
from kasuhara_ari.web.board import CLIENT_QUEUE, RESYNC_GRACE_S, BoardFeed, call_row, mask_number

from test_events import Mosquitto, own_mosquitto  # noqa: F401  (fixture)
from web_fakes import FakeAccounts, FakeClock

PREFIX = "kasuhara"
NUMBER = "0312345678"
HOSTILE = "<img src=x onerror=alert(1)>\u202eevil"


def _at(seconds: float) -> str:
    return (dt.datetime(2026, 12, 3, 0, 0, tzinfo=dt.UTC) + dt.timedelta(seconds=seconds)).isoformat(
        timespec="milliseconds"
    )


def ev(event: str, seconds: float = 0, call_id: str = "c1", **fields: Any) -> dict[str, Any]:
    return build_payload(event, call_id, {"at": _at(seconds), **fields})


def started(call_id: str = "c1", name: str = "Yamada") -> dict[str, Any]:
    return ev("started", 0, call_id, direction="inbound", caller={"number": NUMBER, "name": name})


# --- the model ------------------------------------------------------------------------------------------


def test_model_folds_a_call_into_states_and_badges() -> None:
    board = LiveBoard()
    call = board.apply(started())
    assert call is not None and (call.state, call.caller_number, call.direction) == (
        "notice",
        NUMBER,
        "inbound",
    )
    board.apply(ev("notice_played", 5))
    assert board.calls["c1"].state == "ringing"
    board.apply(ev("agent_answered", 8, agent="PJSIP/agent"))
    assert (board.calls["c1"].state, board.calls["c1"].agent) == ("talking", "PJSIP/agent")
    board.apply(ev("escalation_requested", 10, key="*9"))
    assert board.calls["c1"].state == "escalating" and board.calls["c1"].alert
    board.apply(ev("supervisor_joined", 12, supervisor="PJSIP/sup"))
    board.apply(ev("flagged", 13, key="*1"))
    board.apply(ev("warning_played", 14, key="*2"))
    board.apply(ev("long_call", 15, duration_s=600))
    call = board.calls["c1"]
    assert call.state == "talking" and call.alert  # flagged keeps drawing attention
    assert call.badges == ["supervisor_joined", "flagged", "warning_played", "long_call"]
    assert call.elapsed_s(dt.datetime.fromisoformat(_at(30))) == 30
    board.apply(ev("supervisor_listening", 16, supervisor="PJSIP/boss", mode="listen"))
    assert (call.supervision, call.supervisor) == ("listen", "PJSIP/boss")
    board.apply(ev("supervision_ended", 17, supervisor="PJSIP/boss", reason="supervisor_hungup"))
    assert call.supervision == ""
    board.apply(ev("ended", 20, duration_s=20.0))
    assert not call.live and call.elapsed_s(dt.datetime.fromisoformat(_at(99))) == 20.0
    board.apply(ev("agent_answered", 9, agent="late"))  # late or re-sent: never reopened
    assert call.state == "ended"


def test_a_call_resumed_by_the_next_serve_shows_as_it_was() -> None:
    """A board that first hears of a call from ``resumed`` (the console started after the restart, or
    the old snapshot was from another boot) shows it talking, with who, since when and its flag."""
    board = LiveBoard()
    call = board.apply(
        ev(
            "resumed",
            40,
            direction="inbound",
            caller={"number": NUMBER, "name": HOSTILE},
            target="PJSIP/agent",
            agent="PJSIP/agent",
            started_at=_at(3),
            flags=["harassment"],
            supervisor="PJSIP/sup",
        )
    )
    assert call is not None and (call.state, call.agent, call.caller_name) == (
        "talking",
        "PJSIP/agent",
        HOSTILE,
    )
    assert call.elapsed_s(dt.datetime.fromisoformat(_at(43))) == 40  # since the call started, not the restart
    assert call.badges == ["flagged", "supervisor_joined"] and call.alert
    validate_event(ev("resumed", 40, direction="inbound", flags=["harassment"]))
    with pytest.raises(SchemaError):
        validate_event(ev("resumed", 40))  # direction is required


def test_snapshot_round_trip_and_hostile_snapshots() -> None:
    board = LiveBoard()
    for payload in (started(name=HOSTILE), ev("agent_answered", 2, agent="PJSIP/a"), ev("flagged", 3)):
        board.apply(payload)
    snap = board.calls["c1"].snapshot(boot="b1")
    assert snap["schema"] == LIVE_SCHEMA and snap["boot"] == "b1"
    back = LiveCall.from_snapshot(json.loads(json.dumps(snap)), "c1")
    assert back is not None and back.snapshot(boot="b1") == snap

    assert LiveCall.from_snapshot(snap, "other") is None  # a snapshot on another call's topic
    assert LiveCall.from_snapshot({**snap, "schema": "x"}, "c1") is None
    evil = {
        **snap,
        "state": "<b>",
        "caller": {"number": ["x"], "name": "A" * 100_000},
        "agent": {"nested": 1},
        "badges": ["flagged", "<script>", 3] * 50,
        "repeat_count": -5,
        "started_at": "0001-01-01T00:00:00+14:00",
    }
    call = LiveCall.from_snapshot(evil, "c1")
    assert call is not None
    assert (call.state, call.caller_number, call.agent, call.repeat_count) == ("active", "", "", 0)
    assert len(call.caller_name) == MAX_TEXT_CHARS and call.badges == ["flagged"] and call.started_at is None


def test_model_is_bounded() -> None:
    board = LiveBoard(max_calls=10)
    for i in range(100):
        board.apply(started(f"c{i}"))
    assert list(board.calls) == [f"c{i}" for i in range(90, 100)]


def test_viewer_sees_only_the_last_4_digits() -> None:
    assert mask_number("0312345678") == "••••••5678"
    assert mask_number("1234") == "••••"
    assert mask_number("") == ""
    board = LiveBoard()
    call = board.apply(started(name=HOSTILE))
    assert call is not None
    viewer, supervisor = call_row(call, masked=True), call_row(call, masked=False)
    assert NUMBER not in json.dumps(viewer) and viewer["caller_number"].endswith("5678")
    assert supervisor["caller_number"] == NUMBER
    # Bidi overrides and controls become visible escapes before any browser sees them.
    assert "\u202e" not in viewer["caller_name"] and "\\u202e" in viewer["caller_name"]


# --- the service's snapshots (no broker needed for the fold) ----------------------------------------------


def test_publisher_keeps_a_snapshot_per_live_call_and_clears_it_at_the_end() -> None:
    events = MqttEvents(port=1, topic_prefix=PREFIX, live_snapshots=True)
    events.emit("started", "c1", direction="inbound", caller={"number": NUMBER, "name": "Y"})
    events.emit("flagged", "c1", key="*1")
    snap = events.live_snapshot("c1")
    assert snap is not None and snap["badges"] == ["flagged"] and snap["boot"] == events.boot
    events.emit("ended", "c1", duration_s=3.0)
    assert events.live_snapshot("c1") is None
    events.emit("recording_stored", "c1", key="k")  # after the end: the call stays gone
    events.emit("supervision_ended", "c1")
    assert events.live_snapshot("c1") is None
    plain = MqttEvents(port=1, topic_prefix=PREFIX)
    plain.emit("started", "c1", direction="inbound")
    assert plain.live_snapshot("c1") is None  # only kasuhara serve's publisher keeps them


# --- the console's feed ---------------------------------------------------------------------------------


def status(boot: str, *, state: str = "online", reason: str = "connected", at: float = 0) -> bytes:
    return encode(
        {
            "schema": "kasuhara.event/1",
            "event": "status",
            "at": _at(at),
            "state": state,
            "reason": reason,
            "hostname": "pbx1",
            "version": "1",
            "boot": boot,
        }
    )


def snapshot_bytes(board: LiveBoard, call_id: str, boot: str) -> bytes:
    return encode(board.calls[call_id].snapshot(boot=boot))


def feed_with_clock() -> tuple[BoardFeed, FakeClock]:
    clock = FakeClock()
    return BoardFeed(MqttConfig(topic_prefix=PREFIX), clock=clock), clock


def drain(client: board_module.BoardClient) -> list[tuple[str, Any]]:
    out = []
    while not client.queue.empty():
        text = client.queue.get_nowait()
        assert text is not None
        kind, data = text.split("\n")[:2]
        out.append((kind.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def test_feed_started_mid_call_shows_the_retained_snapshot_and_follows_events() -> None:
    feed, _ = feed_with_clock()
    service = LiveBoard()
    service.apply(started())
    service.apply(ev("agent_answered", 2, agent="PJSIP/a"))
    feed.connected()
    feed.handle(f"{PREFIX}/status", status("b1"))
    feed.handle(f"{PREFIX}/live/c1", snapshot_bytes(service, "c1", "b1"))
    assert feed.board.calls["c1"].state == "talking"
    viewer = feed.subscribe(masked=True)
    assert viewer is not None
    assert NUMBER not in feed.snapshot(viewer) and "5678" in feed.snapshot(viewer)
    feed.handle(f"{PREFIX}/calls/c1/flagged", encode(ev("flagged", 5)))
    feed.handle(f"{PREFIX}/calls/c1/ended", encode(ev("ended", 9, duration_s=9.0)))
    feed.handle(f"{PREFIX}/live/c1", b"")
    feed.handle(f"{PREFIX}/calls/c1/recording_stored", encode(ev("recording_stored", 10, key="k")))
    got = drain(viewer)
    assert [k for k, _ in got] == ["call", "gone"]
    assert got[0][1]["badges"] == ["flagged"] and got[0][1]["alert"] is True
    assert "c1" not in feed.board.calls


def test_a_supervisor_joining_uninvited_stays_shown_over_the_services_snapshots() -> None:
    """The service's snapshots know nothing of `kasuhara supervise` (another publisher): a snapshot
    after the supervisor joined must not wipe them off the board."""
    feed, _ = feed_with_clock()
    service = LiveBoard()
    service.apply(started())
    service.apply(ev("agent_answered", 2, agent="PJSIP/a"))
    feed.connected()
    feed.handle(f"{PREFIX}/live/c1", snapshot_bytes(service, "c1", "b1"))
    feed.handle(
        f"{PREFIX}/calls/c1/supervisor_listening", encode(ev("supervisor_listening", 3, supervisor="PJSIP/s"))
    )
    service.apply(ev("long_call", 4, duration_s=600))
    feed.handle(f"{PREFIX}/live/c1", snapshot_bytes(service, "c1", "b1"))
    call = feed.board.calls["c1"]
    assert (call.supervision, call.supervisor) == ("listen", "PJSIP/s")
    assert call.badges == ["long_call", "supervisor_joined"]
    feed.handle(f"{PREFIX}/calls/c1/supervision_ended", encode(ev("supervision_ended", 5)))
    feed.handle(f"{PREFIX}/live/c1", snapshot_bytes(service, "c1", "b1"))
    assert feed.board.calls["c1"].supervision == ""


def test_a_cleared_call_never_comes_back_from_a_late_event() -> None:
    feed, _ = feed_with_clock()
    feed.connected()
    feed.handle(f"{PREFIX}/calls/c1/started", encode(started()))
    feed.handle(f"{PREFIX}/live/c1", b"")  # the end itself was missed; the clear says it
    feed.handle(f"{PREFIX}/calls/c1/supervision_ended", encode(ev("supervision_ended", 9)))
    assert feed.board.calls == {}


def test_feed_ignores_hostile_messages() -> None:
    feed, _ = feed_with_clock()
    feed.connected()
    for topic, raw in (
        (f"{PREFIX}/calls/c1/started", b"{not json"),
        (f"{PREFIX}/calls/c1/started", b'{"event": "started", "call_id": "c1", "at": NaN}'),
        (f"{PREFIX}/calls/c1/started", b"[" * 100 + b"]" * 100),
        (f"{PREFIX}/calls/c1/started", b'{"event": "started", "call_id": "c2"}'),  # topic and id disagree
        (f"{PREFIX}/calls/..%2f/started", encode(started())),
        (f"{PREFIX}/live/c1", b'{"schema": "kasuhara.live/1", "call_id": "c9"}'),
        (f"{PREFIX}/live/c1", b"x" * (1024 * 1024)),
        (f"{PREFIX}/status", b'"online"'),
        ("other/calls/c1/started", encode(started())),
    ):
        feed.handle(topic, raw)
    assert feed.board.calls == {} and feed.board.status is None


def test_feed_drops_calls_nobody_confirms_after_a_resync() -> None:
    feed, clock = feed_with_clock()
    service = LiveBoard()
    for call_id in ("c1", "c2"):
        service.apply(started(call_id))
    feed.connected()
    feed.handle(f"{PREFIX}/status", status("b1"))
    for call_id in ("c1", "c2"):
        feed.handle(f"{PREFIX}/live/{call_id}", snapshot_bytes(service, call_id, "b1"))
    clock.advance(RESYNC_GRACE_S + 1)
    feed.tick()
    assert set(feed.board.calls) == {"c1", "c2"}

    # The broker restarts without persistence; c2 ended meanwhile (its end never reached us).
    feed.disconnected()
    feed.connected()
    feed.tick()
    assert set(feed.board.calls) == {"c1", "c2"}  # nothing dropped before the service is back
    feed.handle(f"{PREFIX}/status", status("b1", at=60))  # the service reconnected...
    feed.handle(f"{PREFIX}/live/c1", snapshot_bytes(service, "c1", "b1"))  # ...and republished c1
    clock.advance(RESYNC_GRACE_S - 1)
    feed.tick()
    assert set(feed.board.calls) == {"c1", "c2"}
    clock.advance(2)
    feed.tick()
    assert set(feed.board.calls) == {"c1"}

    # A new run of the service: snapshots its predecessor left retained are ignored and swept.
    feed.handle(f"{PREFIX}/status", status("b2", at=120))
    feed.handle(f"{PREFIX}/live/c1", snapshot_bytes(service, "c1", "b1"))
    clock.advance(RESYNC_GRACE_S + 1)
    feed.tick()
    assert feed.board.calls == {}


def test_several_nodes_share_the_board_and_one_restarting_sweeps_only_its_own_calls() -> None:
    """Two nodes' services on one broker: `<prefix>/status` holds whichever wrote last, so each node's
    snapshots are judged by that node's own status (`<prefix>/status/<node>`), and a node's service
    restarting sweeps that node's calls only (before, node b's calls vanished when node a restarted)."""
    feed, clock = feed_with_clock()
    services = {"a": LiveBoard(), "b": LiveBoard()}
    for node, service in services.items():
        service.apply({**started(f"{node}-1"), "node": node})
    feed.connected()
    for node, boot in (("a", "a1"), ("b", "b1")):
        doc = {**json.loads(status(boot)), "node": node}
        feed.handle(f"{PREFIX}/status/{node}", encode(doc))
        feed.handle(f"{PREFIX}/status", encode(doc))  # the shared topic: b's is the last one there
    for node, boot in (("a", "a1"), ("b", "b1")):
        feed.handle(f"{PREFIX}/live/{node}-1", snapshot_bytes(services[node], f"{node}-1", boot))
    assert set(feed.board.calls) == {"a-1", "b-1"} and feed.board.calls["a-1"].node == "a"
    clock.advance(RESYNC_GRACE_S + 1)
    feed.tick()

    # Node a's service restarts (new boot): a-1 is not republished (it ended meanwhile), b-1 is untouched.
    restarted = {**json.loads(status("a2", at=60)), "node": "a"}
    feed.handle(f"{PREFIX}/status/a", encode(restarted))
    feed.handle(f"{PREFIX}/live/a-1", snapshot_bytes(services["a"], "a-1", "a1"))  # left by run a1: stale
    clock.advance(RESYNC_GRACE_S + 1)
    feed.tick()
    assert set(feed.board.calls) == {"b-1"}
    # A new call of node a's new run, and b's snapshots, are both believed.
    services["a"].apply({**started("a-2"), "node": "a"})
    feed.handle(f"{PREFIX}/live/a-2", snapshot_bytes(services["a"], "a-2", "a2"))
    feed.handle(f"{PREFIX}/live/b-1", snapshot_bytes(services["b"], "b-1", "b1"))
    assert set(feed.board.calls) == {"a-2", "b-1"}
    assert set(feed.board.nodes) == {"a", "b"} and feed.board.nodes["a"]["boot"] == "a2"


def test_a_slow_browser_is_dropped_not_buffered() -> None:
    feed, _ = feed_with_clock()
    feed.connected()
    slow, fast = feed.subscribe(masked=False), feed.subscribe(masked=False)
    assert slow is not None and fast is not None
    for i in range(CLIENT_QUEUE + 10):
        feed.handle(f"{PREFIX}/calls/c{i}/started", encode(started(f"c{i}")))
        with contextlib.suppress(asyncio.QueueEmpty):
            fast.queue.get_nowait()
    assert slow.dropped and slow not in feed.clients and slow.queue.qsize() <= CLIENT_QUEUE
    assert not fast.dropped and fast in feed.clients
    items = []
    while not slow.queue.empty():
        items.append(slow.queue.get_nowait())
    assert items[-1] is None  # the stream ends; the browser reconnects and gets a snapshot


# --- the stream and the join endpoint, over HTTP ------------------------------------------------------------


@dataclasses.dataclass
class BoardConsole(Console):
    feed: BoardFeed | None = None


def the_feed(console: BoardConsole) -> BoardFeed:
    assert console.feed is not None
    return console.feed


@contextlib.asynccontextmanager
async def board_console() -> AsyncIterator[BoardConsole]:
    """The console under uvicorn (as test_web_auth.serve, whose accounts and clock it shares), with its
    board feed at hand: the test hands it the broker's messages (no lifespan: no MQTT connection)."""
    cfg = dataclasses.replace(Config(), web=WebConfig())
    accounts, clock = FakeAccounts(), FakeClock()
    for name, role in (("viewer1", Role.VIEWER), ("super1", Role.SUPERVISOR), ("admin1", Role.ADMIN)):
        accounts.add(name, role, PASSWORD)
    app = create_app(cfg, cast(Accounts, accounts), clock=clock)
    feeds = [
        work.__self__
        for work in app.state.console.background
        if isinstance(getattr(work, "__self__", None), BoardFeed)
    ]
    assert len(feeds) == 1
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False, lifespan="off")
    )
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield BoardConsole(f"http://127.0.0.1:{port}", accounts, clock, cfg, feeds[0])
    finally:
        server.should_exit = True
        await task


class EventReader:
    """The server-sent events of one open stream, read as they come."""

    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.aiter_lines()

    async def until(self, kind_wanted: str) -> list[tuple[str, Any]]:
        """Events up to (and including) the first of kind ``kind_wanted``."""
        events: list[tuple[str, Any]] = []
        kind = ""
        async with asyncio.timeout(20):
            async for line in self.lines:
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    events.append((kind, json.loads(line.removeprefix("data: "))))
                    if kind == kind_wanted:
                        return events
        return events


async def test_stream_snapshot_then_deltas_masked_for_a_viewer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(board_module, "RECHECK_S", 0.2)
    async with board_console() as console:
        feed = the_feed(console)
        feed.connected()
        feed.handle(f"{PREFIX}/calls/c1/started", encode(started(name=HOSTILE)))
        async with console.client() as client:
            assert (await client.get("/board/stream")).status_code == 401
            await login(client, "viewer1")
            async with client.stream("GET", "/board/stream") as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                assert response.headers["cache-control"] == "no-store"
                reader = EventReader(response)
                first = await reader.until("snapshot")
                feed.handle(f"{PREFIX}/calls/c1/flagged", encode(ev("flagged", 3)))
                delta = await reader.until("call")
                # Disabled: the open stream ends at its next check, whatever it was streaming.
                console.accounts.set_disabled("viewer1", True)
                console.clock.advance(5)
                end = await reader.until("end")
    (_, snap) = first[-1]
    assert [c["call_id"] for c in snap["calls"]] == ["c1"]
    row = snap["calls"][0]
    assert row["caller_number"] == "••••••5678" and "\u202e" not in row["caller_name"]
    assert delta[-1][1]["badges"] == ["flagged"] and delta[-1][1]["caller_number"] == "••••••5678"
    assert end[-1] == ("end", {"reason": "session"})
    assert feed.clients == set()


async def test_stream_for_a_supervisor_has_full_numbers_and_ends_when_the_session_expires(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(board_module, "RECHECK_S", 0.2)
    async with board_console() as console:
        feed = the_feed(console)
        feed.connected()
        feed.handle(f"{PREFIX}/calls/c1/started", encode(started()))
        async with console.client() as client:
            await login(client, "super1")
            async with client.stream("GET", "/board/stream") as response:
                reader = EventReader(response)
                first = await reader.until("snapshot")
                # The open stream does not keep the session alive (its checks do not restart the idle
                # clock): idle time runs out although the stream was checked half-way.
                console.clock.advance(console.cfg.web.session_idle_s * 0.6)
                await asyncio.sleep(1.0)  # several checks of the stream's session (every 0.2 s here)
                console.clock.advance(console.cfg.web.session_idle_s * 0.6)
                end = await reader.until("end")
            assert (await client.get("/")).status_code == 303
    assert first[-1][1]["calls"][0]["caller_number"] == NUMBER
    assert end[-1] == ("end", {"reason": "session"})


async def test_a_new_role_restarts_the_stream_with_what_the_role_may_see(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(board_module, "RECHECK_S", 0.2)
    async with board_console() as console:
        feed = the_feed(console)
        feed.connected()
        feed.handle(f"{PREFIX}/calls/c1/started", encode(started()))
        async with console.client() as client:
            await login(client, "super1")
            async with client.stream("GET", "/board/stream") as response:
                reader = EventReader(response)
                first = await reader.until("snapshot")
                console.accounts.set_role("super1", Role.VIEWER)
                console.clock.advance(5)
                end = await reader.until("end")
            async with client.stream("GET", "/board/stream") as response:
                again = await EventReader(response).until("snapshot")
    assert first[-1][1]["calls"][0]["caller_number"] == NUMBER
    assert end[-1] == ("end", {"reason": "role"})
    assert again[-1][1]["calls"][0]["caller_number"] == "••••••5678"


async def test_join_is_for_supervisors_and_admins_with_a_csrf_token() -> None:
    async with board_console() as console:
        feed = the_feed(console)
        feed.connected()
        feed.handle(f"{PREFIX}/calls/c1/started", encode(started()))
        origin = {"origin": console.url}
        async with console.client() as viewer:
            await login(viewer, "viewer1")
            token = await page_token(viewer)
            page = await viewer.get("/")
            assert "join-listen" not in page.text and 'data-join="no"' in page.text
            refused = await viewer.post(
                "/board/join", data={"csrf": token, "call_id": "c1", "mode": "listen"}, headers=origin
            )
            assert refused.status_code == 403
        async with console.client() as supervisor:
            await login(supervisor, "super1")
            token = await page_token(supervisor)
            no_token = await supervisor.post(
                "/board/join", data={"call_id": "c1", "mode": "listen"}, headers=origin
            )
            assert no_token.status_code == 403
            bad = await supervisor.post(
                "/board/join", data={"csrf": token, "call_id": "../c1", "mode": "listen"}, headers=origin
            )
            assert bad.status_code == 400
            shout = await supervisor.post(
                "/board/join", data={"csrf": token, "call_id": "c1", "mode": "shout"}, headers=origin
            )
            assert shout.status_code == 400
            gone = await supervisor.post(
                "/board/join", data={"csrf": token, "call_id": "c2", "mode": "listen"}, headers=origin
            )
            assert gone.status_code == 404 and gone.json()["ok"] is False


# --- against a real mosquitto ----------------------------------------------------------------------------


async def retained_live(port: int, prefix: str, settle_s: float = 1.0) -> dict[str, dict[str, Any]]:
    """What a newcomer gets on ``<prefix>/live/+``: the retained snapshots."""
    found: dict[str, dict[str, Any]] = {}
    async with aiomqtt.Client("127.0.0.1", port, timeout=5) as client:
        await client.subscribe(f"{prefix}/live/+", qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(settle_s):
                async for message in client.messages:
                    assert isinstance(message.payload, bytes)
                    if message.payload:
                        found[message.topic.value.rsplit("/", 1)[1]] = json.loads(message.payload)
    return found


async def until(predicate: Any, timeout: float = 15) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


@pytest.mark.integration
async def test_retained_snapshot_survives_a_broker_restart_without_persistence(
    own_mosquitto: Mosquitto,  # noqa: F811
) -> None:
    prefix = f"kasuhara-test/{uuid.uuid4().hex[:12]}"
    events = MqttEvents(
        port=own_mosquitto.port, topic_prefix=prefix, live_snapshots=True, reconnect_max_s=0.5
    )
    async with events:
        events.emit("started", "c1", direction="inbound", caller={"number": NUMBER, "name": "Y"})
        events.emit("agent_answered", "c1", agent="PJSIP/a")
        events.emit("started", "c2", direction="inbound", caller={"number": "0300000000", "name": None})
        await until(lambda: events.stats.published == 3)
        before = await retained_live(own_mosquitto.port, prefix)
        assert set(before) == {"c1", "c2"} and before["c1"]["state"] == "talking"
        assert before["c1"]["boot"] == events.boot and before["c1"]["schema"] == LIVE_SCHEMA

        own_mosquitto.stop()
        for db in Path(own_mosquitto.workdir).glob("*.db"):
            db.unlink()  # as if it had no persistence: every retained message is gone
        events.emit("ended", "c2", duration_s=1.0)  # c2 ends while the broker is down
        own_mosquitto.start()
        connections = events.stats.connections
        await until(lambda: events.stats.connections > connections and events.stats.buffered == 0)
        await asyncio.sleep(0.5)
        after = await retained_live(own_mosquitto.port, prefix)
        assert set(after) == {"c1"} and after["c1"]["state"] == "talking"

        events.emit("ended", "c1", duration_s=9.0)
        await until(lambda: events.stats.buffered == 0)
        await asyncio.sleep(0.3)
        assert await retained_live(own_mosquitto.port, prefix) == {}


@pytest.mark.integration
async def test_console_started_mid_call_shows_the_call_and_survives_a_broker_restart(
    own_mosquitto: Mosquitto,  # noqa: F811
) -> None:
    prefix = f"kasuhara-test/{uuid.uuid4().hex[:12]}"
    events = MqttEvents(
        port=own_mosquitto.port, topic_prefix=prefix, live_snapshots=True, reconnect_max_s=0.5
    )
    async with events:
        for call_id in ("c1", "c2"):
            events.emit("started", call_id, direction="inbound", caller={"number": NUMBER, "name": "Y"})
        events.emit("flagged", "c1", key="*1")
        await until(lambda: events.stats.published == 3)
        # The console starts now: the events are long gone, the snapshots are retained.
        feed = BoardFeed(MqttConfig(port=own_mosquitto.port, topic_prefix=prefix))
        task = asyncio.create_task(feed.run())
        try:
            await until(lambda: set(feed.board.calls) == {"c1", "c2"})
            assert feed.board.calls["c1"].badges == ["flagged"] and feed.board.status is not None
            assert feed.board.status["boot"] == events.boot

            own_mosquitto.stop()
            for db in Path(own_mosquitto.workdir).glob("*.db"):
                db.unlink()
            await until(lambda: not feed.broker_connected)
            events.emit("ended", "c2", duration_s=1.0)
            own_mosquitto.start()
            # Back: c1 is kept (republished by the service), c2 is dropped once the resync is over.
            await until(lambda: set(feed.board.calls) == {"c1"}, timeout=30)
            assert feed.broker_connected and feed.board.calls["c1"].badges == ["flagged"]
            events.emit("ended", "c1", duration_s=9.0)
            await until(lambda: feed.board.calls == {})
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def test_snapshots_are_not_events_but_the_events_still_validate() -> None:
    """The snapshot is its own schema (kasuhara.live/1, README); the call events beside it stay
    kasuhara.event/1 and valid."""
    board = LiveBoard()
    for payload in (started(), ev("flagged", 1, key="*1")):
        validate_event(payload)
        board.apply(payload)
    snap = board.calls["c1"].snapshot(boot="b")
    assert "event" not in snap and snap["schema"] == LIVE_SCHEMA


# --- the supervisor's phone per account (kasuhara users --endpoint) -------------------------------------


async def test_accounts_keep_an_endpoint_and_old_documents_still_read() -> None:
    from test_accounts import accounts, stored

    acc = accounts()
    await acc.add("boss", Role.SUPERVISOR, "a long enough passphrase")
    store = acc.store
    assert "endpoint" not in stored(store)["boss"]  # unset: the document looks as it always did
    assert (await acc.get("boss")).endpoint == ""  # type: ignore[union-attr]
    await acc.set_endpoint("boss", "PJSIP/supervisor/sip:boss@10.0.0.5:5060")
    assert stored(store)["boss"]["endpoint"] == "PJSIP/supervisor/sip:boss@10.0.0.5:5060"
    assert (await acc.get("boss")).endpoint == "PJSIP/supervisor/sip:boss@10.0.0.5:5060"  # type: ignore[union-attr]
    for bad in ("PJSIP/a,PJSIP/b", "PJSIP/a&PJSIP/b", "Local/x@ctx/n x", "nope", "/x", "PJSIP/\u202ex"):
        with pytest.raises(AccountError):
            await acc.set_endpoint("boss", bad)
    await acc.set_endpoint("boss", "")
    assert "endpoint" not in stored(store)["boss"]


@pytest.mark.integration
def test_users_cli_sets_and_lists_the_endpoint(s3_server: Any) -> None:
    from test_users_cli import audit_records, users

    from recordings_seed import cli_env
    from s3_fixture import fresh_bucket

    with fresh_bucket("kbu") as (target, bucket):
        env = cli_env(target, bucket)
        pw = "a long enough passphrase\n"
        made = users(
            env,
            "add",
            "boss",
            "--role",
            "supervisor",
            "--endpoint",
            "PJSIP/boss",
            "--password-stdin",
            stdin=pw,
        )
        assert made.returncode == 0, made.stderr
        bad = users(
            env,
            "add",
            "eve",
            "--role",
            "viewer",
            "--endpoint",
            "PJSIP/a,PJSIP/b",
            "--password-stdin",
            stdin=pw,
        )
        assert bad.returncode == 2 and "not a phone endpoint" in bad.stderr
        listed = json.loads(users(env, "list", "--json").stdout)["users"]
        assert [(u["name"], u["endpoint"]) for u in listed] == [("boss", "PJSIP/boss")]
        changed = users(env, "endpoint", "boss", "PJSIP/boss2")
        assert changed.returncode == 0 and "PJSIP/boss2" in changed.stdout, changed.stderr
        cleared = users(env, "endpoint", "boss")
        assert cleared.returncode == 0, cleared.stderr
        assert users(env, "endpoint", "nobody", "PJSIP/x").returncode == 1
        assert "PJSIP/boss" not in users(env, "list").stdout.splitlines()[1]
        actions = [(r["action"], r.get("details")) for r in audit_records(env)]
        assert ("user_endpoint", {"endpoint": "PJSIP/boss2"}) in actions
        assert ("user_endpoint", {"endpoint": ""}) in actions
        assert ("user_add", {"role": "supervisor", "endpoint": "PJSIP/boss"}) in actions


# --- kasuhara monitor reads the same snapshots ------------------------------------------------------------


def test_monitor_shows_a_call_already_running_from_its_snapshot() -> None:
    import io

    from kasuhara_ari.cli.monitor import _Output

    service = LiveBoard()
    service.apply(started())
    service.apply(ev("agent_answered", 2, agent="PJSIP/a"))
    for as_json, expected in ((False, 1), (True, 0)):
        out = io.StringIO()
        output = _Output(out, as_json=as_json, live=False, tz=dt.UTC, prefix=PREFIX)
        assert (
            output.message(f"{PREFIX}/live/c1", snapshot_bytes(service, "c1", "b1")) is False
        )  # not counted
        lines = out.getvalue().splitlines()
        assert len(lines) == expected
        if not as_json:
            assert "talking" in lines[0] and NUMBER in lines[0] and "PJSIP/a" in lines[0]
            assert output.board.calls["c1"].state == "talking"
            output.message(f"{PREFIX}/live/c1", b"")  # cleared while the monitor missed the end
            assert "c1" not in output.board.calls


def test_detections_draw_attention_on_the_board() -> None:
    """A monologue or an agent talked over (issue 14's detections) is why a supervisor should look."""
    board = LiveBoard()
    board.apply(started())
    board.apply(ev("agent_answered", 8, agent="PJSIP/agent"))
    call = board.calls["c1"]
    assert not call.alert
    board.apply(ev("monologue_detected", 70, talking_s=60.0, offset_s=70.0, mode="observe"))
    assert call.alert and call.badges == ["monologue"]
    board.apply(ev("talk_over_detected", 90, attempts=3, window_s=60, offset_s=90.0, mode="observe"))
    assert call.badges == ["monologue", "talk_over"]
    back = LiveCall.from_snapshot(json.loads(json.dumps(call.snapshot(boot="b1"))), "c1")
    assert back is not None and back.badges == ["monologue", "talk_over"] and back.alert
