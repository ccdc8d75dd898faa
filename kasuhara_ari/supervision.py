"""A supervisor joins a live call without being called: listen, whisper or barge.

Each session is its own short-lived Stasis application (``<ari.app>-sv-<random>``), run by
``kasuhara supervise`` and not by ``kasuhara serve``:

- it needs nothing from the service but two names Asterisk already knows: the call's bridge
  (``kasuhara-<call_id>``) and the agent's channel in it;
- a failing or abandoned session can never disturb a call the service owns, and the service needs no
  control channel (ARI's credentials are the only gate, as for every other ARI client);
- the session lives exactly as long as the command: Ctrl-C ends it, and so does the supervisor hanging up.

Modes, on the agent's channel (Asterisk audiohook directions: ``in`` = what the agent says, ``out`` = what
the agent hears):

=========  ================================================  =========================================
mode       how                                               who hears the supervisor
=========  ================================================  =========================================
listen     snoop ``spy=both whisper=none`` + private bridge  nobody
whisper    snoop ``spy=both whisper=out`` + private bridge   the agent only
barge      the supervisor joins the call's own bridge        both (and the recording, as the caller heard it)
=========  ================================================  =========================================

The recording (MixMonitor on the caller's channel) is never touched: listen and whisper do not reach the
caller at all, and in barge the caller hears the supervisor, so the recording does too.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt

from . import mqtt_client
from .ari import CONNECTED, AriClient, AriError, ChannelGone
from .callerid import CallerId, agent_label, mode_label, render
from .config import Config, MqttConfig
from .events import EventSink, build_payload, encode, mqtt_tls_context, topic_for
from .nodes import node_for_call
from .safe import safe_call_id

log = logging.getLogger(__name__)

Event = dict[str, Any]

MODES = ("listen", "whisper", "barge")
EVENT_FOR_MODE = {
    "listen": "supervisor_listening",
    "whisper": "supervisor_whispering",
    "barge": "supervisor_barging",
}
_END_EVENTS = frozenset({"ChannelHangupRequest", "ChannelDestroyed", "StasisEnd"})


class SupervisionError(Exception):
    """The session could not start (the reason is in the message)."""


class CallNotFound(SupervisionError):
    """No live call with this id (its bridge does not exist), or no agent in it."""


class SupervisorUnavailable(SupervisionError):
    """The supervisor's phone did not answer."""


def snoop_directions(mode: str) -> tuple[str, str] | None:
    """``(spy, whisper)`` for a snoop on the agent's channel; None when the mode joins the call's bridge."""
    if mode == "listen":
        return "both", "none"
    if mode == "whisper":
        return "both", "out"
    if mode == "barge":
        return None
    raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


class SupervisionSession:
    """One supervisor on one live call, from ringing their phone until either side hangs up."""

    def __init__(
        self,
        cfg: Config,
        call_id: str,
        mode: str,
        endpoint: str,
        *,
        events: EventSink,
        ring_timeout_s: int | None = None,
        by: str | None = None,
    ) -> None:
        snoop_directions(mode)  # ValueError for an unknown mode
        self.cfg = cfg
        self.call_id = safe_call_id(call_id)
        # The node that carries the call and its ARI (the id names it; kasuhara_ari/nodes.py): UnknownNode
        # when the id names a node missing from [nodes].
        self.node = node_for_call(cfg, self.call_id)
        self.ari_url = self.node.ari_url
        self.mode = mode
        self.endpoint = endpoint
        self.events = events
        self.ring_timeout_s = ring_timeout_s if ring_timeout_s is not None else cfg.escalation.ring_timeout_s
        self.by = by or getpass.getuser()
        token = secrets.token_hex(4)
        self.app = f"{cfg.ari.app}-sv-{token}"
        self.ari = AriClient(
            self.ari_url,
            cfg.ari.username,
            cfg.ari.password,
            self.app,
            timeout=cfg.ari.request_timeout_s,
            reconnect_max_s=cfg.ari.reconnect_max_s,
            rest_over_websocket=cfg.ari.rest_over_websocket,
            rest_lanes=0,  # a short-lived command: its few requests need no lanes
        )
        self.call_bridge = f"kasuhara-{self.call_id}"
        self.leg = f"{self.call_id}-sv-{token}"
        self.snoop = f"{self.call_id}-snoop-{token}"
        self.private_bridge = f"kasuhara-sv-{self.call_id}-{token}"
        self.agent: str | None = None
        self.started = False
        self.connected = asyncio.Event()
        self._inbox: asyncio.Queue[Event] = asyncio.Queue()
        self._gone: set[str] = set()
        self._up: set[str] = set()
        self._in_stasis: set[str] = set()
        self._left_call_bridge = False
        self._call_bridge_gone = False
        self._private_bridge_made = False

    # --- facts ------------------------------------------------------------------------------------------

    async def _read_events(self) -> None:
        async for event in self.ari.events():
            if event.get("type") == CONNECTED:
                self.connected.set()
                continue
            self._inbox.put_nowait(event)

    async def _next_event(self, timeout: float) -> None:
        try:
            event = await asyncio.wait_for(self._inbox.get(), timeout)
        except TimeoutError:
            return
        self._absorb(event)

    def _absorb(self, event: Event) -> None:
        kind = event.get("type", "")
        chan = str((event.get("channel") or {}).get("id", ""))
        if kind == "StasisStart":
            self._in_stasis.add(chan)
        elif kind in _END_EVENTS and chan:
            self._gone.add(chan)
        elif kind == "ChannelStateChange" and (event.get("channel") or {}).get("state") == "Up":
            self._up.add(chan)
        elif kind == "Dial" and event.get("dialstatus") == "ANSWER":
            self._up.add(str((event.get("peer") or {}).get("id", "")))
        elif kind == "ChannelLeftBridge" and chan == self.leg:
            if (event.get("bridge") or {}).get("id") == self.call_bridge:
                self._left_call_bridge = True
        elif kind == "BridgeDestroyed" and (event.get("bridge") or {}).get("id") == self.call_bridge:
            self._call_bridge_gone = True

    # --- the session ------------------------------------------------------------------------------------

    async def run(self) -> str:
        """Ring the supervisor, join them in ``mode``, and return why the session ended
        (``supervisor_hungup``, ``call_ended``, ``cancelled``). Raises :class:`SupervisionError` if it could
        not start."""
        reader = asyncio.create_task(self._read_events(), name=f"supervise-{self.call_id}")
        reason = "error"
        try:
            try:
                await asyncio.wait_for(self.connected.wait(), self.cfg.ari.request_timeout_s + 5)
            except TimeoutError:
                raise SupervisionError(f"Asterisk's ARI at {self.ari_url} is not reachable") from None
            self.agent = await self._find_agent()
            await self.ari.request(
                "POST",
                f"/applications/{self.app}/subscription",
                params={"eventSource": f"channel:{self.agent},bridge:{self.call_bridge}"},
            )
            await self._ring_supervisor()
            await self._join()
            self.started = True
            self.events.emit(
                EVENT_FOR_MODE[self.mode],
                self.call_id,
                supervisor=self.endpoint,
                mode=self.mode,
                by=self.by,
                node=self.node.node,  # the call's node, not the one this command runs on
            )
            log.info(
                "supervision event=started call_id=%s mode=%s supervisor=%s",
                self.call_id,
                self.mode,
                self.endpoint,
            )
            reason = await self._until_either_side_hangs_up()
            return reason
        except asyncio.CancelledError:
            reason = "cancelled"
            raise
        finally:
            await asyncio.shield(self._teardown(reason))
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            await self.ari.aclose()

    async def _find_agent(self) -> str:
        try:
            bridge = await self.ari.get_bridge(self.call_bridge)
        except ChannelGone:
            raise CallNotFound(f"no live call {self.call_id} (no bridge {self.call_bridge})") from None
        channels = [str(c) for c in bridge.get("channels") or []]
        if f"{self.call_id}-agent" in channels:
            return f"{self.call_id}-agent"
        for channel in channels:
            with contextlib.suppress(AriError):
                if await self.ari.get_variable(channel, "KASUHARA_ROLE") == "agent":
                    return channel
        raise CallNotFound(f"call {self.call_id} has no agent in its bridge yet")

    async def _caller_id(self) -> CallerId:
        """What the supervisor's phone shows: the mode, the agent and the customer (``[callerid]``)."""
        assert self.agent is not None
        fields = {"call_id": self.call_id, "mode": self.mode}
        fields["mode_label"] = mode_label(self.mode, self.cfg.announcement.language)
        with contextlib.suppress(AriError):
            fields["agent"] = agent_label((await self.ari.get_channel(self.agent)).name)
        # The customer's leg: the call's first channel (inbound) or the one the app dialled (outbound).
        for customer in (self.call_id, f"{self.call_id}-customer"):
            if customer == self.agent:
                continue
            with contextlib.suppress(AriError):
                channel = await self.ari.get_channel(customer)
                fields["caller_number"], fields["caller_name"] = channel.caller_number, channel.caller_name
                break
        cfg = self.cfg.callerid
        return render(cfg.supervise_name, cfg.supervise_number, fields)

    async def _ring_supervisor(self) -> None:
        ari = self.ari
        shown = await self._caller_id()
        await ari.create_channel(
            self.endpoint,
            channel_id=self.leg,
            app_args=f"supervise,{self.call_id},{self.mode}",
            originator=self.agent,
            variables={
                "KASUHARA_CALL_ID": self.call_id,
                "KASUHARA_ROLE": f"supervisor-{self.mode}",
                **shown.variables(),
            },
        )
        await self._until_in_stasis(self.leg)
        await ari.dial(self.leg, timeout_s=self.ring_timeout_s)
        log.info("supervision event=ringing call_id=%s supervisor=%s", self.call_id, self.endpoint)
        # The end of ringing is the channel's own end or our timer: the Dial status alone is not reliable.
        deadline = time.monotonic() + self.ring_timeout_s + 2
        while self.leg not in self._up:
            if self.leg in self._gone or time.monotonic() > deadline:
                raise SupervisorUnavailable(f"{self.endpoint} did not answer")
            if self._call_over():
                raise CallNotFound(f"call {self.call_id} ended while the supervisor was rung")
            await self._next_event(0.25)

    async def _join(self) -> None:
        ari = self.ari
        assert self.agent is not None
        directions = snoop_directions(self.mode)
        if directions is None:
            await ari.add_to_bridge(self.call_bridge, self.leg, absorb_dtmf=True, role="supervisor")
            return
        spy, whisper = directions
        await ari.snoop(self.agent, snoop_id=self.snoop, spy=spy, whisper=whisper, app_args="snoop")
        await self._until_in_stasis(self.snoop)
        await ari.create_bridge(self.private_bridge, kind="mixing", name=self.private_bridge)
        self._private_bridge_made = True
        await ari.add_to_bridge(self.private_bridge, self.snoop)
        await ari.add_to_bridge(self.private_bridge, self.leg, absorb_dtmf=True)

    async def _until_in_stasis(self, channel: str, timeout: float = 3.0) -> None:
        """A channel ARI just created enters the app a moment later; until then it cannot be dialled
        or bridged (422)."""
        deadline = time.monotonic() + timeout
        while channel not in self._in_stasis and channel not in self._gone and time.monotonic() < deadline:
            await self._next_event(0.1)

    def _call_over(self) -> bool:
        return (self.agent is not None and self.agent in self._gone) or self._call_bridge_gone

    async def _until_either_side_hangs_up(self) -> str:
        last_check = time.monotonic()
        while True:
            if self.leg in self._gone:
                return "supervisor_hungup"
            if self._call_over() or self.snoop in self._gone or self._left_call_bridge:
                return "call_ended"
            if time.monotonic() - last_check > 5:
                # Events sent while the websocket was reconnecting are lost: ask Asterisk itself.
                last_check = time.monotonic()
                if not await self._exists(f"/bridges/{self.call_bridge}"):
                    return "call_ended"
                if not await self._exists(f"/channels/{self.leg}"):
                    return "supervisor_hungup"
            await self._next_event(1.0)

    async def _exists(self, path: str) -> bool:
        try:
            await self.ari.request("GET", path)
        except ChannelGone:
            return False
        except AriError:
            return True  # unknown: keep going, the next check asks again
        return True

    async def _teardown(self, reason: str) -> None:
        for channel in (self.leg, self.snoop):
            if channel not in self._gone:
                with contextlib.suppress(AriError):
                    await self.ari.hangup(channel)
        if self._private_bridge_made:
            with contextlib.suppress(AriError):
                await self.ari.destroy_bridge(self.private_bridge)
        if self.started:
            self.events.emit(
                "supervision_ended",
                self.call_id,
                supervisor=self.endpoint,
                mode=self.mode,
                reason=reason,
                node=self.node.node,
            )
        log.info("supervision event=ended call_id=%s mode=%s reason=%s", self.call_id, self.mode, reason)


class SessionEvents:
    """The few events of a supervision session, published straight to MQTT (QoS 1).

    Not :class:`~kasuhara_ari.events.MqttEvents`: that one owns the retained ``<prefix>/status`` of
    ``kasuhara serve`` (online, last will offline), which a short-lived command must not overwrite.
    ``emit`` never blocks or raises; ``run`` publishes in order; an event that cannot be published within
    ``timeout_s`` is logged and dropped, so a broker outage never holds a supervisor's command.
    """

    def __init__(self, cfg: MqttConfig, *, timeout_s: float = 5.0) -> None:
        self.cfg = cfg
        self.timeout_s = timeout_s
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self.published = 0
        self.dropped = 0

    def emit(self, event: str, call_id: str | None = None, /, **fields: Any) -> None:
        try:
            topic = topic_for(self.cfg.topic_prefix, event, call_id)
            self._queue.put_nowait((topic, encode(build_payload(event, call_id, fields))))
        except Exception as exc:
            self.dropped += 1
            log.warning("supervision event=event_rejected event=%s error=%s", event, exc)

    async def run(self) -> None:
        while True:
            topic, payload = await self._queue.get()
            try:
                async with asyncio.timeout(self.timeout_s), self._client() as client:
                    await client.publish(topic, payload, qos=1)
                self.published += 1
            except (aiomqtt.MqttError, TimeoutError, OSError) as exc:
                self.dropped += 1
                log.warning("supervision event=event_dropped topic=%s error=%s", topic, exc)
            finally:
                self._queue.task_done()

    @contextlib.asynccontextmanager
    async def _client(self) -> AsyncIterator[aiomqtt.Client]:
        async with mqtt_client.Client(
            self.cfg.host,
            self.cfg.port,
            username=self.cfg.username or None,
            password=self.cfg.password or None,
            tls_context=mqtt_tls_context(self.cfg),
            timeout=self.timeout_s,
        ) as client:
            yield client

    async def flush(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout)
