"""AMI through panoramisk, behind a small adapter that fixes its known defects.

* Every action runs under a timeout: an action whose response was cut by a dropped connection can
  otherwise await forever.
* Nothing is replayed after a reconnect: panoramisk re-sends unanswered actions, which could start
  MixMonitor twice on one channel. The caller of a timed-out action decides what to do instead.
* panoramisk reconnects by itself; ``wait_ready`` waits for a logged-in connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from panoramisk import Manager

from . import metrics

log = logging.getLogger(__name__)


class AmiError(Exception):
    """AMI refused an action or is unreachable."""


class AmiTimeout(AmiError):
    """No answer in time: the action may or may not have been carried out."""


class _Everything:
    """A collection that contains every action name: so panoramisk forgets all unanswered actions."""

    def __contains__(self, item: object) -> bool:
        return True


class AmiClient:
    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        secret: str,
        *,
        action_timeout_s: float = 5.0,
        events: bool = False,
    ) -> None:
        """``events``: receive AMI events (only the FastAGI entry needs them). Off by default: with events
        on, every event of every channel on the Asterisk is parsed, which the load benchmark showed to be
        a large share of the call service's CPU."""
        self.action_timeout_s = action_timeout_s
        self._manager = Manager(
            host=host,
            port=port,
            username=username,
            secret=secret,
            ping_delay=5,
            ping_interval=5,
            reconnect_timeout=1,
            forgetable_actions=_Everything(),
            events="on" if events else "off",
            log=logging.getLogger("kasuhara_ari.ami.panoramisk"),
        )
        self._connect_task: asyncio.Future[Any] | None = None
        self.address = f"{host}:{port}"

    def connect(self) -> None:
        """Start connecting; panoramisk keeps reconnecting on its own from here on."""
        if self._connect_task is None:
            self._manager.loop = asyncio.get_running_loop()
            self._connect_task = self._manager.connect()

    @property
    def ready(self) -> bool:
        proto = self._manager.protocol
        return bool(self._manager.authenticated and proto is not None and not proto.closed)

    async def wait_ready(self, timeout: float) -> None:
        """Wait for a logged-in connection; raise AmiError with the reason if none comes in time."""
        self.connect()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.ready:
                return
            future = self._manager.authenticated_future
            if future is not None and future.done() and not future.cancelled():
                resp = future.result()
                if not getattr(resp, "success", False):
                    raise AmiError(
                        f"AMI at {self.address} refused the login "
                        f"({getattr(resp, 'message', 'no message')}): check ami.username/secret"
                    )
            await asyncio.sleep(0.05)
        raise AmiError(f"AMI at {self.address} is not reachable or did not log in within {timeout:.0f}s")

    def on_event(self, pattern: str, callback: Callable[[Any, Any], Any]) -> None:
        self._manager.register_event(pattern, callback)

    async def _send(self, fields: Mapping[str, str], timeout: float | None) -> list[dict[str, str]]:
        """One action on the wire, timed (metrics); its answer as a list of messages, the response
        first (panoramisk gives a list for actions answered by an event list)."""
        name = fields.get("Action", "?")
        if not self.ready:
            raise AmiError(f"AMI at {self.address} is not connected (action {name})")
        started = time.perf_counter()
        try:
            future = self._manager.send_action(dict(fields))
            resp = await asyncio.wait_for(asyncio.shield(future), timeout or self.action_timeout_s)
        except TimeoutError:
            raise AmiTimeout(
                f"AMI action {name}: no answer within {timeout or self.action_timeout_s}s"
            ) from None
        finally:
            elapsed = time.perf_counter() - started
            metrics.AMI_REQUEST_SECONDS.labels(metrics.label_value(name)).observe(elapsed)
        answers = resp if isinstance(resp, list) else [resp]
        messages = [{str(k): str(v) for k, v in dict(m).items()} for m in answers]
        if messages and messages[0].get("Response", "").lower() == "error":
            raise AmiError(f"AMI action {name}: {messages[0].get('Message', 'error')}")
        return messages

    async def action(self, fields: Mapping[str, str], *, timeout: float | None = None) -> dict[str, str]:
        """Send one action and return its response as a dict; errors become AmiError/AmiTimeout."""
        messages = await self._send(fields, timeout)
        return messages[0] if messages else {}

    async def action_list(
        self, fields: Mapping[str, str], *, timeout: float | None = None
    ) -> list[dict[str, str]]:
        """An action answered by an event list (QueueStatus, DBGetTree): the response, then each event."""
        return await self._send(fields, timeout)

    async def ping(self) -> None:
        await self.action({"Action": "Ping"})

    async def command(self, command: str) -> str:
        resp = await self.action({"Action": "Command", "Command": command})
        return resp.get("Output", resp.get("content", ""))

    async def mixmonitor(self, channel: str, file: str, *, options: str = "", command: str = "") -> None:
        fields = {"Action": "MixMonitor", "Channel": channel, "File": file}
        if options:
            fields["Options"] = options
        if command:
            fields["Command"] = command
        await self.action(fields)

    async def stop_mixmonitor(self, channel: str) -> None:
        await self.action({"Action": "StopMixMonitor", "Channel": channel})

    def close(self) -> None:
        # panoramisk schedules a reconnect whenever a connection is lost; closing means we are done with it.
        self._manager.connection_lost = lambda exc: None
        self._manager.connect = lambda *a, **k: None
        self._manager.close()
