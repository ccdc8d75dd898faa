"""A thin typed client for the Asterisk REST Interface (REST over httpx, events over websockets).

Why not an existing library: ``ari`` (ari-py) is Python 2 only; asyncari has no reconnect and caps REST at
three connections; aioari is abandoned and runs handlers inside the websocket reader. This client does only
what the app needs: typed REST calls with a timeout each, one error for "channel gone", and an event stream
that reconnects with backoff and tells the app when it must re-sync.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import websockets
from websockets.asyncio.client import ClientConnection

log = logging.getLogger(__name__)

Event = dict[str, Any]

#: Synthetic event yielded after every (re)connection of the event websocket: the app re-syncs on it.
CONNECTED = "KasuharaAriConnected"


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
    ) -> None:
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
        try:
            resp = await self._http.request(
                method,
                path,
                params=query,
                json=body,
                timeout=timeout if timeout is not None else self.timeout,
            )
        except httpx.TimeoutException as exc:
            raise AriUnavailable(f"ARI {method} {path}: timed out") from exc
        except httpx.TransportError as exc:
            raise AriUnavailable(f"ARI {method} {path}: {type(exc).__name__}: {exc}") from exc
        if resp.status_code in _GONE_STATUSES or (resp.status_code == 400 and _names_missing_channel(resp)):
            raise ChannelGone(f"ARI {method} {path}: {resp.status_code} {_message(resp)}", resp.status_code)
        if resp.status_code == 401:
            raise AriError(f"ARI {method} {path}: 401 unauthorized (check ari.username/password)", 401)
        if resp.status_code >= 400:
            raise AriError(f"ARI {method} {path}: {resp.status_code} {_message(resp)}", resp.status_code)
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            return resp.text

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
        each connection, because events that happened while disconnected are lost and must be re-read."""
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
                    yield {"type": CONNECTED}
                    async for message in ws:
                        try:
                            event = json.loads(message)
                        except ValueError:
                            log.warning("ari event=bad_message length=%d", len(message))
                            continue
                        if isinstance(event, dict):
                            yield event
                    log.warning("ari event=disconnected app=%s", self.app)
            except (OSError, websockets.WebSocketException, TimeoutError) as exc:
                log.warning(
                    "ari event=unreachable app=%s error=%s retry_in=%.1fs",
                    self.app,
                    type(exc).__name__,
                    backoff,
                )
            finally:
                self._ws = None
            self.reconnects += 1
            await asyncio.sleep(backoff * (0.8 + 0.4 * random.random()))  # noqa: S311 - jitter, not crypto
            backoff = min(backoff * 2, self.reconnect_max_s)

    async def drop_event_connection(self) -> None:
        """Close the event websocket (used by tests and by a stalled-connection watchdog)."""
        if self._ws is not None:
            await self._ws.close()


def _names_missing_channel(resp: httpx.Response) -> bool:
    """addChannel and friends answer 400 "Channel not found" when a channel in the query is gone."""
    return "not found" in _message(resp).lower()


def _message(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return resp.text[:200]
    if isinstance(data, dict) and "message" in data:
        return str(data["message"])[:200]
    return str(data)[:200]
