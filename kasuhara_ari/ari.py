"""A thin typed client for the Asterisk REST Interface (events over websockets, REST over the same
websocket where Asterisk offers it, else over httpx).

Why not an existing library: ``ari`` (ari-py) is Python 2 only; asyncari has no reconnect and caps REST at
three connections; aioari is abandoned and runs handlers inside the websocket reader. This client does only
what the app needs: typed REST calls with a timeout each, one error for "channel gone", and an event stream
that reconnects with backoff and tells the app when it must re-sync.

REST over the event websocket (Asterisk 20.12, 21.7, 22.2 and later): a request is one JSON message
(``RESTRequest``) and its answer arrives among the events (``RESTResponse``). The load benchmark measured
an HTTP request through httpx at ~1 ms of the app's CPU, a websocket request at a fraction of that, and
Asterisk's HTTP server costs more per request too. Whether Asterisk answers is probed after every
connection; until it has answered, and while the websocket is down, requests go over HTTP. Asterisk handles
the requests of one websocket strictly in turn (one thread), so besides the event websocket the client keeps
``rest_lanes`` more (apps ``<app>-rest-N`` that receive nothing but answers) and sends each request to the
one with the fewest waiting (see ``_lane``). A request whose answer was outstanding when its websocket
dropped fails with :class:`AriUnavailable`, like an HTTP request cut off mid-way (it may or may not have
been carried out).

The event filter (``event_types``) is set after every connection (Asterisk forgets an app's filter when
its websocket closes). Asterisk applies the filter to ``RESTResponse`` messages too, so it is always
allowed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import http
import itertools
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.connection import Connection
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from . import metrics

log = logging.getLogger(__name__)

Event = dict[str, Any]

#: Synthetic event yielded after every (re)connection of the event websocket: the app re-syncs on it.
CONNECTED = "KasuharaAriConnected"
#: A REST answer on the event websocket (never yielded as an event).
REST_RESPONSE = "RESTResponse"
_READER_STOPPED = "KasuharaAriReaderStopped"
#: How long Asterisk has to answer the probe for REST over the websocket before HTTP is used.
PROBE_TIMEOUT_S = 2.0


class AriError(Exception):
    """ARI answered with an error, or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ChannelGone(AriError):
    """The channel (or bridge, playback) no longer exists or can no longer do this: 404/409/412/422."""


class AriUnavailable(AriError):
    """Asterisk did not answer (connection refused, timeout)."""


_GONE_STATUSES = frozenset({404, 409, 412, 422})


def _check(method: str, path: str, status: int, text: str) -> Any:
    """The body of an ARI answer as JSON (or text, or None); errors as ChannelGone or AriError."""
    if status in _GONE_STATUSES or (status == 400 and "not found" in _message(text).lower()):
        raise ChannelGone(f"ARI {method} {path}: {status} {_message(text)}", status)
    if status == 401:
        raise AriError(f"ARI {method} {path}: 401 unauthorized (check ari.username/password)", 401)
    if status >= 400:
        raise AriError(f"ARI {method} {path}: {status} {_message(text)}", status)
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _q(value: object) -> str:
    """Query values as ARI wants them (booleans lowercase, which aioari got wrong)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class Channel:
    id: str
    name: str
    state: str
    caller_number: str
    caller_name: str
    language: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Channel:
        caller = data.get("caller") or {}
        return cls(
            id=str(data.get("id", "")),
            name=str(data.get("name", "")),
            state=str(data.get("state", "")),
            caller_number=str(caller.get("number", "")),
            caller_name=str(caller.get("name", "")),
            language=str(data.get("language", "")),
        )


class AriClient:
    """REST calls and the event stream of one Stasis application."""

    def __init__(
        self,
        url: str,
        username: str,
        password: str,
        app: str,
        *,
        timeout: float = 5.0,
        reconnect_max_s: float = 10.0,
        max_connections: int = 64,
        rest_over_websocket: bool = True,
        rest_lanes: int = 3,
        websocket_window: int = 16,
        event_types: Collection[str] | None = None,
        listen: tuple[str, int] | None = None,
    ) -> None:
        """``rest_over_websocket``: send REST requests over websockets where Asterisk answers there: the
        event websocket and ``rest_lanes`` more, each request to the one with the fewest waiting; with
        ``websocket_window`` waiting on every one, over HTTP. ``event_types``: only these events are sent
        by Asterisk (None: all of them). ``listen`` (host, port): Asterisk connects to us instead
        (``ari.mode = listen``, Asterisk's outbound websocket): events and every REST request go over that
        one connection, and nothing over HTTP (``url`` is not used)."""
        self._base = url.rstrip("/") + "/ari"
        self._username = username
        self._password = password
        self.app = app
        self.timeout = timeout
        self.reconnect_max_s = reconnect_max_s
        self._http = httpx.AsyncClient(
            base_url=self._base,
            auth=(username, password),
            timeout=timeout,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )
        self._ws: Connection | None = None
        self.reconnects = 0
        self.listen = listen
        #: Set once the listening socket is bound (``listen`` mode): what readiness waits for there.
        self.serving = asyncio.Event()
        self.rest_over_websocket = rest_over_websocket or listen is not None
        self.rest_lanes = rest_lanes if rest_over_websocket and listen is None else 0
        self.websocket_window = websocket_window
        self.event_types = frozenset(event_types) if event_types is not None else None
        #: Websockets on which Asterisk answered the probe: REST goes there (none: HTTP).
        self._ready: list[Connection] = []
        #: Per websocket, the requests waiting for their answer on it.
        self._waiting: dict[Connection, dict[str, asyncio.Future[dict[str, Any]]]] = {}
        self._ids = itertools.count(1)
        #: REST requests sent over the websocket / over HTTP (for tests and the load benchmark).
        self.ws_requests = 0
        self.http_requests = 0

    async def aclose(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        await self._http.aclose()

    async def __aenter__(self) -> AriClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- REST -------------------------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, object] | None = None,
        body: Any = None,
        timeout: float | None = None,
    ) -> Any:
        """One REST call; raises ChannelGone, AriUnavailable or AriError."""
        query = {k: _q(v) for k, v in (params or {}).items() if v is not None}
        wait = timeout if timeout is not None else self.timeout
        ws = self._lane()
        started = time.perf_counter()
        try:
            if ws is not None:
                status, text = await self._ws_request(ws, method, path, query, body, wait)
            elif self.listen is not None:
                raise AriUnavailable(f"ARI {method} {path}: no Asterisk connected to us (ari.mode = listen)")
            else:
                status, text = await self._http_request(method, path, query, body, wait)
        finally:
            metrics.ARI_REQUEST_SECONDS.labels(method).observe(time.perf_counter() - started)
        return _check(method, path, status, text)

    def _lane(self) -> Connection | None:
        """The websocket with the fewest requests waiting, if it has room (else: HTTP).

        Asterisk answers one websocket's requests strictly in turn, in one thread: behind a slow one
        (creating a channel on a loaded box) every other waits. The load benchmark found a burst of 200
        calls ending at once queueing ~90 requests on a single websocket and new callers waiting 2.7 s
        for their answer; several lanes are answered in parallel, and each costs the app no more."""
        best: Connection | None = None
        fewest = self.websocket_window
        for ws in self._ready:
            waiting = len(self._waiting.get(ws, ()))
            if waiting < fewest:
                best, fewest = ws, waiting
        return best

    @property
    def events_connected(self) -> bool:
        """Whether the event websocket is up now (``kasuhara_ari_connected``)."""
        return self._ws is not None

    @property
    def rest_websockets(self) -> int:
        """How many websockets REST requests go to now (0: HTTP only)."""
        return len(self._ready)

    async def _http_request(
        self, method: str, path: str, query: dict[str, str], body: Any, timeout: float
    ) -> tuple[int, str]:
        self.http_requests += 1
        try:
            resp = await self._http.request(method, path, params=query, json=body, timeout=timeout)
        except httpx.TimeoutException as exc:
            raise AriUnavailable(f"ARI {method} {path}: timed out") from exc
        except httpx.TransportError as exc:
            raise AriUnavailable(f"ARI {method} {path}: {type(exc).__name__}: {exc}") from exc
        return resp.status_code, resp.text

    async def _ws_request(
        self,
        ws: Connection,
        method: str,
        path: str,
        query: dict[str, str],
        body: Any,
        timeout: float,
    ) -> tuple[int, str]:
        self.ws_requests += 1
        request_id = str(next(self._ids))
        message: dict[str, Any] = {
            "type": "RESTRequest",
            "request_id": request_id,
            "method": method,
            "uri": path.lstrip("/"),
        }
        if query:
            message["query_strings"] = [{"name": k, "value": v} for k, v in query.items()]
        if body is not None:
            message["content_type"] = "application/json"
            message["message_body"] = json.dumps(body)
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        waiting = self._waiting.setdefault(ws, {})
        waiting[request_id] = answer
        try:
            await ws.send(json.dumps(message))
            response = await asyncio.wait_for(answer, timeout)
        except TimeoutError as exc:
            raise AriUnavailable(f"ARI {method} {path}: timed out (websocket)") from exc
        except ConnectionClosed as exc:
            raise AriUnavailable(f"ARI {method} {path}: websocket closed") from exc
        finally:
            waiting.pop(request_id, None)
        status, body_text = response.get("status_code"), response.get("message_body")
        if not isinstance(status, int) or status < 100:
            raise AriError(f"ARI {method} {path}: answer without a status on the websocket")
        return status, body_text if isinstance(body_text, str) else ""

    async def info(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", "/asterisk/info")
        return result

    async def application(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", f"/applications/{self.app}")
        return result

    async def channels(self) -> list[Channel]:
        return [Channel.from_json(c) for c in await self.request("GET", "/channels")]

    async def get_channel(self, channel_id: str) -> Channel:
        return Channel.from_json(await self.request("GET", f"/channels/{channel_id}"))

    async def answer(self, channel_id: str) -> None:
        await self.request("POST", f"/channels/{channel_id}/answer")

    async def ring(self, channel_id: str) -> None:
        await self.request("POST", f"/channels/{channel_id}/ring")

    async def hangup(self, channel_id: str, reason: str = "normal") -> None:
        await self.request("DELETE", f"/channels/{channel_id}", params={"reason": reason})

    async def continue_in_dialplan(self, channel_id: str) -> None:
        await self.request("POST", f"/channels/{channel_id}/continue")

    async def play(
        self, channel_id: str, media: str, *, lang: str | None = None, playback_id: str | None = None
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(
            "POST",
            f"/channels/{channel_id}/play",
            params={"media": media, "lang": lang, "playbackId": playback_id},
        )
        return result

    async def play_on_bridge(
        self, bridge_id: str, media: str, *, lang: str | None = None, playback_id: str | None = None
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(
            "POST",
            f"/bridges/{bridge_id}/play",
            params={"media": media, "lang": lang, "playbackId": playback_id},
        )
        return result

    async def stop_playback(self, playback_id: str) -> None:
        await self.request("DELETE", f"/playbacks/{playback_id}")

    async def create_channel(
        self,
        endpoint: str,
        *,
        channel_id: str,
        app_args: str = "",
        originator: str | None = None,
        variables: Mapping[str, str] | None = None,
    ) -> Channel:
        """Create (not dial) a channel in this app, so it can be bridged before it rings (early media)."""
        body = {"variables": dict(variables)} if variables else None
        data = await self.request(
            "POST",
            "/channels/create",
            params={
                "endpoint": endpoint,
                "app": self.app,
                "appArgs": app_args,
                "channelId": channel_id,
                "originator": originator,
            },
            body=body,
        )
        return Channel.from_json(data)

    async def dial(self, channel_id: str, *, caller: str | None = None, timeout_s: int | None = None) -> None:
        await self.request(
            "POST", f"/channels/{channel_id}/dial", params={"caller": caller, "timeout": timeout_s}
        )

    async def originate(
        self,
        endpoint: str,
        *,
        channel_id: str,
        app_args: str = "",
        originator: str | None = None,
        caller_id: str | None = None,
        timeout_s: int = 30,
        variables: Mapping[str, str] | None = None,
    ) -> Channel:
        body = {"variables": dict(variables)} if variables else None
        data = await self.request(
            "POST",
            "/channels",
            params={
                "endpoint": endpoint,
                "app": self.app,
                "appArgs": app_args,
                "channelId": channel_id,
                "originator": originator,
                "callerId": caller_id,
                "timeout": timeout_s,
            },
            body=body,
        )
        return Channel.from_json(data)

    async def get_variable(self, channel_id: str, name: str) -> str:
        data = await self.request("GET", f"/channels/{channel_id}/variable", params={"variable": name})
        return str((data or {}).get("value", ""))

    async def set_variable(self, channel_id: str, name: str, value: str) -> None:
        await self.request(
            "POST", f"/channels/{channel_id}/variable", params={"variable": name, "value": value}
        )

    async def create_bridge(
        self, bridge_id: str, *, kind: str = "mixing,dtmf_events", name: str = ""
    ) -> None:
        await self.request(
            "POST", "/bridges", params={"type": kind, "bridgeId": bridge_id, "name": name or None}
        )

    async def add_to_bridge(
        self, bridge_id: str, channel_id: str, *, absorb_dtmf: bool = False, role: str | None = None
    ) -> None:
        await self.request(
            "POST",
            f"/bridges/{bridge_id}/addChannel",
            params={"channel": channel_id, "absorbDTMF": absorb_dtmf, "role": role},
        )

    async def remove_from_bridge(self, bridge_id: str, channel_id: str) -> None:
        await self.request("POST", f"/bridges/{bridge_id}/removeChannel", params={"channel": channel_id})

    async def destroy_bridge(self, bridge_id: str) -> None:
        await self.request("DELETE", f"/bridges/{bridge_id}")

    async def get_bridge(self, bridge_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", f"/bridges/{bridge_id}")
        return result

    async def snoop(
        self, channel_id: str, *, snoop_id: str, spy: str = "both", whisper: str = "none", app_args: str = ""
    ) -> Channel:
        data = await self.request(
            "POST",
            f"/channels/{channel_id}/snoop",
            params={
                "app": self.app,
                "appArgs": app_args,
                "spy": spy,
                "whisper": whisper,
                "snoopId": snoop_id,
            },
        )
        return Channel.from_json(data)

    async def external_media(
        self,
        *,
        channel_id: str,
        external_host: str,
        media_format: str = "slin",
        direction: str = "both",
        app_args: str = "",
    ) -> dict[str, Any]:
        """An externalMedia channel streaming RTP over UDP to ``external_host`` (``host:port``); the answer
        (the channel's JSON) carries ``channelvars`` UNICASTRTP_LOCAL_ADDRESS/PORT: where its RTP comes from.
        ``direction`` other than ``both`` is accepted by 22.x's code although its API doc lists only both."""
        data: dict[str, Any] = await self.request(
            "POST",
            "/channels/externalMedia",
            params={
                "app": self.app,
                "appArgs": app_args or None,
                "channelId": channel_id,
                "external_host": external_host,
                "format": media_format,
                "encapsulation": "rtp",
                "transport": "udp",
                "connection_type": "client",
                "direction": direction,
            },
        )
        return data

    # --- events -----------------------------------------------------------------------------------------

    def _ws_url(self, app: str | None = None) -> str:
        parts = urlsplit(self._base)
        scheme = "wss" if parts.scheme == "https" else "ws"
        query = urlencode({"app": app or self.app})
        return urlunsplit((scheme, parts.netloc, parts.path + "/events", query, ""))

    async def events(self) -> AsyncIterator[Event]:
        """Every event of the app, forever. Reconnects with capped backoff and yields ``CONNECTED`` after
        each connection, because events that happened while disconnected are lost and must be re-read.

        The websockets (events, and the REST lanes) are read by tasks of their own, owned by this
        generator, so REST answers are delivered even while the consumer is busy awaiting one of them."""
        queue: asyncio.Queue[Event] = asyncio.Queue()
        if self.listen is not None:
            readers = [asyncio.create_task(self._serve_inbound(queue), name=f"ari-listen-{self.app}")]
        else:
            readers = [
                asyncio.create_task(self._keep_connected(self.app, queue), name=f"ari-events-{self.app}")
            ]
        readers += [
            asyncio.create_task(self._keep_connected(f"{self.app}-rest-{i}", None), name=f"ari-rest-{i}")
            for i in range(1, self.rest_lanes + 1)
        ]
        for reader in readers:
            reader.add_done_callback(lambda _: queue.put_nowait({"type": _READER_STOPPED}))
        try:
            while True:
                event = await queue.get()
                if event.get("type") == _READER_STOPPED:
                    for reader in readers:
                        if reader.done():
                            reader.result()  # a reader died of a bug: raise it here
                    raise AriError("ARI event reader stopped")
                yield event
        finally:
            for reader in readers:
                reader.cancel()
            for reader in readers:
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    async def _keep_connected(self, app: str, queue: asyncio.Queue[Event] | None) -> None:
        """One websocket, reconnected forever: the app's events into ``queue``, or (``queue`` None) a REST
        lane of its own app name that receives nothing but answers."""
        events = queue is not None
        token = base64.b64encode(f"{self._username}:{self._password}".encode()).decode()
        backoff = 0.5
        while True:
            ws: ClientConnection | None = None
            try:
                async with websockets.connect(
                    self._ws_url(app),
                    additional_headers={"Authorization": f"Basic {token}"},
                    open_timeout=self.timeout,
                    ping_interval=10,
                    ping_timeout=10,
                    max_size=2**22,
                ) as ws:
                    backoff = 0.5
                    if queue is not None:
                        self._ws = ws
                        log.info("ari event=connected app=%s reconnects=%d", app, self.reconnects)
                        if self.event_types is not None:
                            await self._set_event_filter(app, self.event_types)
                        queue.put_nowait({"type": CONNECTED})
                    else:
                        await self._set_event_filter(app, frozenset())
                    probe = asyncio.create_task(self._probe(ws, app)) if self.rest_over_websocket else None
                    try:
                        await self._read(ws, queue)
                    finally:
                        if probe is not None:
                            probe.cancel()
                            with contextlib.suppress(asyncio.CancelledError):
                                await probe
                    log.warning("ari event=disconnected app=%s", app)
            except (OSError, websockets.WebSocketException, TimeoutError, AriError) as exc:
                log.warning(
                    "ari event=unreachable app=%s error=%s retry_in=%.1fs", app, type(exc).__name__, backoff
                )
            finally:
                self._connection_gone(ws, events)
            if events:
                self.reconnects += 1
            await asyncio.sleep(backoff * (0.8 + 0.4 * random.random()))  # noqa: S311 - jitter, not crypto
            backoff = min(backoff * 2, self.reconnect_max_s)

    async def _serve_inbound(self, queue: asyncio.Queue[Event]) -> None:
        """``listen`` mode: Asterisk's outbound websocket (websocket_client.conf, ari.conf
        ``type = outbound_websocket``) connects here with the ARI user's credentials. One Asterisk at a
        time: a new connection (Asterisk reconnecting before the old one timed out) replaces the old."""
        assert self.listen is not None
        host, port = self.listen
        expected = "Basic " + base64.b64encode(f"{self._username}:{self._password}".encode()).decode()

        def check(connection: ServerConnection, request: Request) -> Response | None:
            if request.path == "/healthz":  # the installed dialplan asks before Stasis() (see asterisk_setup)
                return connection.respond(http.HTTPStatus.OK, "ok")
            given = request.headers.get("Authorization", "")
            if hmac.compare_digest(given.encode(), expected.encode()):
                return None
            log.warning("ari event=inbound_refused address=%s why=credentials", _peer(connection))
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, "unauthorized\n")

        async def handler(ws: ServerConnection) -> None:
            previous = self._ws
            self._ws = ws
            if previous is not None:
                log.warning("ari event=inbound_replaced address=%s", _peer(ws))
                await previous.close(1012, "replaced by a new connection")
            log.info("ari event=connected mode=listen address=%s reconnects=%d", _peer(ws), self.reconnects)
            reader = asyncio.create_task(self._read(ws, queue))
            try:
                await self._probe(ws, self.app)
                if ws not in self._ready:
                    log.error("ari event=inbound_without_rest address=%s (needs Asterisk 22.5+)", _peer(ws))
                    await ws.close(1011, "REST over this websocket is needed")
                elif self.event_types is not None:
                    await self._set_event_filter(self.app, self.event_types, ws=ws)
                if ws.state is websockets.State.OPEN:
                    queue.put_nowait({"type": CONNECTED})
                await reader
                log.warning("ari event=disconnected mode=listen address=%s", _peer(ws))
            except (AriError, ConnectionClosed) as exc:
                log.warning("ari event=inbound_failed address=%s error=%s", _peer(ws), type(exc).__name__)
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
                self._connection_gone(ws, self._ws is ws)
                self.reconnects += 1

        async with ws_serve(
            handler,
            host,
            port,
            subprotocols=[websockets.Subprotocol("ari")],
            process_request=check,
            ping_interval=10,
            ping_timeout=10,
            max_size=2**22,
        ) as server:
            self.serving.set()
            log.info("ari event=listening address=%s:%d app=%s", host, port, self.app)
            try:
                await server.serve_forever()
            finally:
                self.serving.clear()

    async def _read(self, ws: Connection, queue: asyncio.Queue[Event] | None) -> None:
        """Events into the queue, REST answers to their requests, until the connection closes."""
        waiting = self._waiting.setdefault(ws, {})
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                try:
                    event = json.loads(message)
                except ValueError:
                    log.warning("ari event=bad_message length=%d", len(message))
                    continue
                if not isinstance(event, dict):
                    continue
                if event.get("type") == REST_RESPONSE:
                    answer = waiting.get(str(event.get("request_id", "")))
                    if answer is not None and not answer.done():
                        answer.set_result(event)
                elif queue is not None:
                    queue.put_nowait(event)

    async def _probe(self, ws: Connection, app: str) -> None:
        """Send REST to this websocket too if Asterisk answers a request on it (older versions do not)."""
        try:
            status, _ = await self._ws_request(ws, "GET", "/asterisk/ping", {}, None, PROBE_TIMEOUT_S)
        except AriUnavailable:
            log.info("ari event=rest_over_websocket_unavailable app=%s (REST over HTTP)", app)
            return
        if status == 200 and ws.state is websockets.State.OPEN and ws not in self._ready:
            self._ready.append(ws)
            log.info("ari event=rest_over_websocket app=%s websockets=%d", app, len(self._ready))

    async def _set_event_filter(
        self, app: str, types: frozenset[str], *, ws: Connection | None = None
    ) -> None:
        """Only these events (and REST answers) for ``app`` (over HTTP: its websocket is not read yet;
        in ``listen`` mode over that websocket, which is being read). Asterisk forgets an app's filter
        when its websocket closes, so this follows every connection."""
        allowed = sorted(types | {REST_RESPONSE})
        path = f"/applications/{app}/eventFilter"
        body = {"allowed": [{"type": t} for t in allowed]}
        if ws is not None:
            status, text = await self._ws_request(ws, "PUT", path, {}, body, self.timeout)
        else:
            status, text = await self._http_request("PUT", path, {}, body, self.timeout)
        _check("PUT", path, status, text)

    def _connection_gone(self, ws: Connection | None, events: bool) -> None:
        """REST stops going there; requests still waiting for an answer on it fail now."""
        if events:
            self._ws = None
        if ws is None:
            return
        if ws in self._ready:
            self._ready.remove(ws)
        for request_id, answer in self._waiting.pop(ws, {}).items():
            if not answer.done():
                answer.set_exception(AriUnavailable(f"ARI request {request_id}: websocket closed"))

    async def drop_event_connection(self) -> None:
        """Close the event websocket (used by tests and by a stalled-connection watchdog)."""
        if self._ws is not None:
            await self._ws.close()


def _peer(ws: ServerConnection) -> str:
    address = ws.remote_address
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) and len(address) >= 2 else "?"


def _message(text: str) -> str:
    try:
        data = json.loads(text) if text else None
    except ValueError:
        return text[:200]
    if isinstance(data, dict) and "message" in data:
        return str(data["message"])[:200]
    return str(data)[:200]
