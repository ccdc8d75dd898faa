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
connection; until it has answered, and while the websocket is down, requests go over HTTP. A request
whose answer was outstanding when the websocket dropped fails with :class:`AriUnavailable`, like an HTTP
request cut off mid-way (it may or may not have been carried out).

The event filter (``event_types``) is set after every connection (Asterisk forgets an app's filter when
its websocket closes). Asterisk applies the filter to ``RESTResponse`` messages too, so it is always
allowed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import random
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

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
        event_types: Collection[str] | None = None,
    ) -> None:
        """``rest_over_websocket``: send REST requests over the event websocket when Asterisk answers
        there. ``event_types``: only these events are sent by Asterisk (None: all of them)."""
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
        self._ws: ClientConnection | None = None
        self.reconnects = 0
        self.rest_over_websocket = rest_over_websocket
        self.event_types = frozenset(event_types) if event_types is not None else None
        #: The websocket on which Asterisk answered the probe (REST goes there), else None (HTTP).
        self._rest_ws: ClientConnection | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
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
        ws = self._rest_ws
        if ws is not None:
            status, text = await self._ws_request(ws, method, path, query, body, wait)
        else:
            status, text = await self._http_request(method, path, query, body, wait)
        return _check(method, path, status, text)

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
        ws: ClientConnection,
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
        self._pending[request_id] = answer
        try:
            await ws.send(json.dumps(message))
            response = await asyncio.wait_for(answer, timeout)
        except TimeoutError as exc:
            raise AriUnavailable(f"ARI {method} {path}: timed out (websocket)") from exc
        except ConnectionClosed as exc:
            raise AriUnavailable(f"ARI {method} {path}: event websocket closed") from exc
        finally:
            self._pending.pop(request_id, None)
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

    # --- events -----------------------------------------------------------------------------------------

    def _ws_url(self) -> str:
        parts = urlsplit(self._base)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return urlunsplit((scheme, parts.netloc, parts.path + "/events", f"app={self.app}", ""))

    async def events(self) -> AsyncIterator[Event]:
        """Every event of the app, forever. Reconnects with capped backoff and yields ``CONNECTED`` after
        each connection, because events that happened while disconnected are lost and must be re-read.

        The websocket is read by a task of its own (owned by this generator), so REST answers arriving on
        it are delivered even while the consumer is busy awaiting one of them."""
        queue: asyncio.Queue[Event] = asyncio.Queue()
        reader = asyncio.create_task(self._read_connections(queue), name=f"ari-events-{self.app}")
        reader.add_done_callback(lambda _: queue.put_nowait({"type": _READER_STOPPED}))
        try:
            while True:
                event = await queue.get()
                if event.get("type") == _READER_STOPPED:
                    reader.result()  # the reader died of a bug: raise it here
                    raise AriError("ARI event reader stopped")
                yield event
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _read_connections(self, queue: asyncio.Queue[Event]) -> None:
        token = base64.b64encode(f"{self._username}:{self._password}".encode()).decode()
        backoff = 0.5
        while True:
            try:
                async with websockets.connect(
                    self._ws_url(),
                    additional_headers={"Authorization": f"Basic {token}"},
                    open_timeout=self.timeout,
                    ping_interval=10,
                    ping_timeout=10,
                    max_size=2**22,
                ) as ws:
                    self._ws = ws
                    log.info("ari event=connected app=%s reconnects=%d", self.app, self.reconnects)
                    backoff = 0.5
                    await self._set_event_filter()
                    queue.put_nowait({"type": CONNECTED})
                    probe = asyncio.create_task(self._probe(ws)) if self.rest_over_websocket else None
                    try:
                        await self._read(ws, queue)
                    finally:
                        if probe is not None:
                            probe.cancel()
                            with contextlib.suppress(asyncio.CancelledError):
                                await probe
                    log.warning("ari event=disconnected app=%s", self.app)
            except (OSError, websockets.WebSocketException, TimeoutError, AriError) as exc:
                log.warning(
                    "ari event=unreachable app=%s error=%s retry_in=%.1fs",
                    self.app,
                    type(exc).__name__,
                    backoff,
                )
            finally:
                self._connection_gone()
            self.reconnects += 1
            await asyncio.sleep(backoff * (0.8 + 0.4 * random.random()))  # noqa: S311 - jitter, not crypto
            backoff = min(backoff * 2, self.reconnect_max_s)

    async def _read(self, ws: ClientConnection, queue: asyncio.Queue[Event]) -> None:
        """Events into the queue, REST answers to their requests, until the connection closes."""
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
                    answer = self._pending.get(str(event.get("request_id", "")))
                    if answer is not None and not answer.done():
                        answer.set_result(event)
                    continue
                queue.put_nowait(event)

    async def _probe(self, ws: ClientConnection) -> None:
        """Switch REST to this websocket if Asterisk answers a request on it (older versions do not)."""
        try:
            status, _ = await self._ws_request(ws, "GET", "/asterisk/ping", {}, None, PROBE_TIMEOUT_S)
        except AriUnavailable:
            log.info("ari event=rest_over_websocket_unavailable app=%s (REST over HTTP)", self.app)
            return
        if status == 200 and self._ws is ws:
            self._rest_ws = ws
            log.info("ari event=rest_over_websocket app=%s", self.app)

    async def _set_event_filter(self) -> None:
        """Only the events the app uses (over HTTP: the websocket is not being read yet)."""
        if self.event_types is None:
            return
        allowed = sorted(self.event_types | {REST_RESPONSE})
        await self.request(
            "PUT", f"/applications/{self.app}/eventFilter", body={"allowed": [{"type": t} for t in allowed]}
        )

    def _connection_gone(self) -> None:
        """REST goes back to HTTP; requests still waiting for an answer on the websocket fail."""
        self._ws = None
        self._rest_ws = None
        for request_id, answer in list(self._pending.items()):
            if not answer.done():
                answer.set_exception(AriUnavailable(f"ARI request {request_id}: event websocket closed"))

    async def drop_event_connection(self) -> None:
        """Close the event websocket (used by tests and by a stalled-connection watchdog)."""
        if self._ws is not None:
            await self._ws.close()


def _message(text: str) -> str:
    try:
        data = json.loads(text) if text else None
    except ValueError:
        return text[:200]
    if isinstance(data, dict) and "message" in data:
        return str(data["message"])[:200]
    return str(data)[:200]
