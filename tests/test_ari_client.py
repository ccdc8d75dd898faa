"""The thin ARI client against the real Asterisk: errors, the event stream, reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import websockets

from kasuhara_ari import ari as ari_module
from kasuhara_ari.ari import CONNECTED, AriClient, AriError, AriUnavailable, ChannelGone
from kasuhara_ari.config import Config

pytestmark = pytest.mark.integration


def client(cfg: Config, **kw: object) -> AriClient:
    return AriClient(
        cfg.ari.url, cfg.ari.username, cfg.ari.password, f"kasuhara-test-{uuid.uuid4().hex[:6]}", **kw
    )  # type: ignore[arg-type]


async def test_info_and_gone_channel(asterisk: Config) -> None:
    async with client(asterisk) as ari:
        info = await ari.info()
        assert info["system"]["version"].startswith("22.")
        for call in (
            ari.hangup("no-such-channel"),
            ari.answer("no-such-channel"),
            ari.play("no-such-channel", "sound:beep"),
            ari.get_channel("no-such-channel"),
        ):
            with pytest.raises(ChannelGone):
                await call


async def test_add_missing_channel_to_bridge_is_channel_gone(asterisk: Config) -> None:
    async with client(asterisk) as ari:
        bridge = f"test-{uuid.uuid4().hex[:8]}"
        await ari.create_bridge(bridge)
        try:
            with pytest.raises(ChannelGone):
                await ari.add_to_bridge(bridge, "no-such-channel", absorb_dtmf=True)
        finally:
            await ari.destroy_bridge(bridge)


async def test_wrong_password_is_a_clear_error(asterisk: Config) -> None:
    async with AriClient(asterisk.ari.url, asterisk.ari.username, "wrong", "x") as ari:
        with pytest.raises(AriError, match="401"):
            await ari.info()


async def test_unreachable_asterisk() -> None:
    async with AriClient("http://127.0.0.1:9", "u", "p", "x", timeout=1) as ari:
        with pytest.raises(AriUnavailable):
            await ari.info()


async def test_event_stream_reconnects_after_the_connection_is_dropped(asterisk: Config) -> None:
    async with client(asterisk, reconnect_max_s=1) as ari:
        stream = ari.events()
        first = await asyncio.wait_for(anext(stream), 5)
        assert first["type"] == CONNECTED
        # The app is registered while connected.
        assert (await ari.application())["name"] == ari.app
        await ari.drop_event_connection()
        again = await asyncio.wait_for(anext(stream), 10)
        assert again["type"] == CONNECTED
        assert ari.reconnects == 1
        assert (await ari.application())["name"] == ari.app
        await stream.aclose()


# --- REST over the event websocket, and the event filter -------------------------------------------------


async def connected(ari: AriClient) -> AsyncIterator[dict[str, Any]]:
    """The app's event stream, once connected and (if on) switched to REST over the websocket."""
    stream = ari.events()
    first = await asyncio.wait_for(anext(stream), 5)
    assert first["type"] == CONNECTED
    deadline = time.monotonic() + 3
    while ari.rest_over_websocket and ari.rest_websockets < 1 + ari.rest_lanes:
        assert time.monotonic() < deadline, "Asterisk never answered the websocket probes"
        await asyncio.sleep(0.01)
    return stream


async def test_rest_goes_over_the_websocket_with_the_same_errors(asterisk: Config) -> None:
    async with client(asterisk) as ari:
        stream = await connected(ari)
        http_before = ari.http_requests
        assert (await ari.info())["system"]["version"].startswith("22.")
        bridge = f"test-{uuid.uuid4().hex[:8]}"
        await ari.create_bridge(bridge)
        try:
            assert (await ari.get_bridge(bridge))["bridge_type"] == "mixing"
            with pytest.raises(ChannelGone):  # 400 "not found" mapped as over HTTP
                await ari.add_to_bridge(bridge, "no-such-channel", absorb_dtmf=True)
        finally:
            await ari.destroy_bridge(bridge)
        for call in (ari.hangup("no-such-channel"), ari.get_channel("no-such-channel")):
            with pytest.raises(ChannelGone):  # 404
                await call
        with pytest.raises(AriError) as bad:  # a bad request is an error, not "gone"
            await ari.create_bridge(f"test-{uuid.uuid4().hex[:8]}", kind="no-such-type")
        assert not isinstance(bad.value, ChannelGone) and bad.value.status in (400, 500), bad.value
        assert ari.http_requests == http_before  # all of it over the websocket
        assert ari.ws_requests >= 8
        # Concurrent requests each get their own answer.
        infos = await asyncio.gather(*(ari.request("GET", "/asterisk/ping") for _ in range(50)))
        assert all(i["ping"] == "pong" for i in infos)
        await stream.aclose()


async def test_http_when_the_websocket_is_off_or_down(asterisk: Config) -> None:
    async with client(asterisk, rest_over_websocket=False) as ari:
        stream = await connected(ari)
        await ari.info()
        assert ari.ws_requests == 0 and ari.http_requests >= 1
        await stream.aclose()
    async with client(asterisk, rest_lanes=0, reconnect_max_s=5) as ari:
        stream = await connected(ari)
        await ari.drop_event_connection()
        await asyncio.sleep(0.2)
        before = ari.http_requests
        await ari.info()  # while the (only) websocket is down: HTTP
        assert ari.http_requests == before + 1
        again = await asyncio.wait_for(anext(stream), 10)
        assert again["type"] == CONNECTED
        await stream.aclose()
    async with client(asterisk, reconnect_max_s=5) as ari:
        stream = await connected(ari)
        await ari.drop_event_connection()
        await asyncio.sleep(0.2)
        assert ari.rest_websockets == ari.rest_lanes
        before = ari.ws_requests
        await ari.info()  # the event websocket is down, the REST lanes are not
        assert ari.ws_requests == before + 1
        assert (await asyncio.wait_for(anext(stream), 10))["type"] == CONNECTED
        await stream.aclose()


class StallingProxy:
    """A TCP proxy in front of Asterisk's HTTP port that can hold back what Asterisk sends, or cut every
    connection: to see how requests waiting on the websocket end."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.hold = asyncio.Event()
        self.hold.set()  # set = data flows
        self._writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, held: bool) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    if held:
                        await self.hold.wait()
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))

    def cut(self) -> None:
        for w in self._writers:
            w.transport.abort()
        self._writers.clear()

    async def stop(self) -> None:
        self.cut()
        self.hold.set()
        if self.server is not None:
            self.server.close()


async def test_a_request_waiting_on_a_dropped_websocket_fails_at_once(asterisk: Config) -> None:
    port = int(asterisk.ari.url.rsplit(":", 1)[1])
    proxy = StallingProxy(port)
    proxy_port = await proxy.start()
    url = f"http://127.0.0.1:{proxy_port}"
    ari = AriClient(
        url, asterisk.ari.username, asterisk.ari.password, f"kasuhara-test-{uuid.uuid4().hex[:6]}"
    )
    try:
        stream = await connected(ari)
        # Asterisk's answer is held back: the request times out with its own timeout.
        proxy.hold.clear()
        with pytest.raises(AriUnavailable, match="timed out"):
            await ari.request("GET", "/asterisk/ping", timeout=0.3)
        # Still held, then the connection drops: the waiting request fails now, not after its timeout.
        waiting = asyncio.create_task(ari.request("GET", "/asterisk/ping", timeout=30))
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        proxy.cut()
        proxy.hold.set()
        with pytest.raises(AriUnavailable, match="websocket closed"):
            await waiting
        assert time.monotonic() - t0 < 2
        # After the reconnect, REST works (and goes over the new websocket).
        again = await asyncio.wait_for(anext(stream), 15)
        assert again["type"] == CONNECTED
        assert (await ari.request("GET", "/asterisk/ping"))["ping"] == "pong"
        await stream.aclose()
    finally:
        await ari.aclose()
        await proxy.stop()


async def test_without_an_answer_to_the_probe_rest_stays_on_http(asterisk: Config, monkeypatch: Any) -> None:
    """An Asterisk older than 20.12/21.7/22.2 ignores RESTRequest messages: simulated by a websocket
    relay that drops them."""
    target = asterisk.ari.url.replace("http://", "ws://")

    async def relay(client_ws: Any) -> None:
        auth = client_ws.request.headers["Authorization"]
        async with websockets.connect(
            f"{target}{client_ws.request.path}", additional_headers={"Authorization": auth}
        ) as upstream:

            async def up() -> None:
                async for msg in client_ws:
                    if '"RESTRequest"' not in msg:
                        await upstream.send(msg)

            async def down() -> None:
                async for msg in upstream:
                    await client_ws.send(msg)

            # Either side closing ends the relay: with gather(), a client that closed cleanly left down()
            # reading the Asterisk side forever, and the server's exit waited on it (a hung run, seen once).
            tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
            _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(websockets.ConnectionClosed, asyncio.CancelledError):
                    await task

    monkeypatch.setattr(ari_module, "PROBE_TIMEOUT_S", 0.5)
    async with websockets.serve(relay, "127.0.0.1", 0) as server:
        relay_port = server.sockets[0].getsockname()[1]
        async with client(asterisk) as ari:
            monkeypatch.setattr(
                ari,
                "_ws_url",
                lambda app=None: f"ws://127.0.0.1:{relay_port}/ari/events?app={app or ari.app}",
            )
            stream = ari.events()
            assert (await asyncio.wait_for(anext(stream), 5))["type"] == CONNECTED
            await asyncio.sleep(1.0)  # the probes have given up
            assert ari.rest_websockets == 0
            await ari.info()
            assert ari.http_requests >= 1
            assert ari.ws_requests == 1 + ari.rest_lanes  # the probes only
            await stream.aclose()


async def test_event_filter_lets_through_only_the_named_events(asterisk: Config) -> None:
    """With a filter, a variable set on a channel of the app sends no ChannelVarset (it does without)."""
    seen: dict[bool, list[str]] = {}
    for filtered in (False, True):
        types = {"StasisStart", "StasisEnd", "ChannelDestroyed"} if filtered else None
        async with client(asterisk, event_types=types) as ari:
            stream = await connected(ari)
            channel_id = f"t-{uuid.uuid4().hex[:12]}"
            await ari.originate("Local/echo@kasuhara-in", channel_id=channel_id)
            kinds: list[str] = []
            while "StasisStart" not in kinds:
                kinds.append((await asyncio.wait_for(anext(stream), 5))["type"])
            await ari.set_variable(channel_id, "KASUHARA_TEST", "1")  # answered over the websocket
            await ari.hangup(channel_id)
            while "ChannelDestroyed" not in kinds:
                kinds.append((await asyncio.wait_for(anext(stream), 5))["type"])
            seen[filtered] = kinds
            assert ari.ws_requests >= 3
            await stream.aclose()
    assert "ChannelVarset" in seen[False]
    assert set(seen[True]) <= {"StasisStart", "StasisEnd", "ChannelDestroyed"}, seen[True]


async def test_requests_spread_over_lanes_and_beyond_them_go_over_http(
    asterisk: Config, monkeypatch: Any
) -> None:
    """Asterisk answers a websocket's requests one at a time: each request goes to the websocket with the
    fewest waiting (here: held back by a proxy), and with ``websocket_window`` waiting on every one, over
    HTTP, which is answered at once."""
    port = int(asterisk.ari.url.rsplit(":", 1)[1])
    proxy = StallingProxy(port)
    proxy_port = await proxy.start()
    async with client(asterisk, rest_lanes=2, websocket_window=2) as ari:
        monkeypatch.setattr(
            ari, "_ws_url", lambda app=None: f"ws://127.0.0.1:{proxy_port}/ari/events?app={app or ari.app}"
        )
        try:
            stream = await connected(ari)
            assert ari.rest_websockets == 3
            proxy.hold.clear()
            held = [asyncio.create_task(ari.request("GET", "/asterisk/ping")) for _ in range(6)]
            await asyncio.sleep(0.2)
            assert not any(t.done() for t in held)
            assert sorted(len(w) for w in ari._waiting.values() if w) == [2, 2, 2]  # evenly spread
            before = ari.http_requests
            t0 = time.monotonic()
            assert (await ari.request("GET", "/asterisk/ping"))["ping"] == "pong"
            assert time.monotonic() - t0 < 1.0
            assert ari.http_requests == before + 1
            proxy.hold.set()
            assert all(r["ping"] == "pong" for r in await asyncio.gather(*held))
            await stream.aclose()
        finally:
            await proxy.stop()
