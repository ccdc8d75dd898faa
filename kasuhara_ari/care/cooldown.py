"""The agent's recovery pause after a harassment call (``[care]``).

When a call ends that was flagged, warned, warned-and-hung-up, escalated (or detected, if configured),
the agent who took it is paused before the next call reaches them:

* a queue member is paused through AMI ``QueuePause`` with the reason ``<care.pause_reason>
  until=<UTC time>``, so Asterisk offers the queue's next caller to another member;
* every agent's ``Custom:kasuhara-care-<endpoint>`` device state is ``BUSY`` for the pause (a direct
  target's dialplan checks it, see the README; ``NOT_INUSE`` afterwards).

State lives in Asterisk, not only in this process (as wazo-calld keeps it): each pause is an AstDB entry
``kasuhara-care/<endpoint>`` = ``<until epoch>,<call_id>,<trigger>,<interface>``. A restarted app reads
them back (``DBGetTree``) and ends what fell due while it was down; ``kasuhara care resume`` ends one from
another process. So an agent is never left paused by a crash: the worst case is the pause lasting until
the app is back. Ending a pause early: the agent's feature code (the dialplan hands the phone's channel
to the app as ``Stasis(kasuhara,care-resume)``), or a supervisor's ``kasuhara care resume AGENT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from ..ami import AmiClient, AmiError, AmiTimeout
from ..config import CARE_TRIGGERS, CareConfig, Config
from ..events import EventSink
from .notes import check_agent
from .report import endpoint_of

log = logging.getLogger(__name__)

DB_FAMILY = "kasuhara-care"
DEVSTATE_PREFIX = "Custom:kasuhara-care-"


class Ami(Protocol):
    """The AMI operations a pause needs (AmiClient implements them; unit tests use a fake)."""

    async def action(self, fields: Mapping[str, str], *, timeout: float | None = None) -> dict[str, str]: ...
    async def action_list(
        self, fields: Mapping[str, str], *, timeout: float | None = None
    ) -> list[dict[str, str]]: ...


def triggers_of(record: Mapping[str, Any]) -> set[str]:
    """The care triggers a call's metadata shows (``flag`` is the agent's or a supervisor's, not the
    detector's, which is ``detected``)."""
    found: set[str] = set()
    for esc in record.get("escalations") or []:
        if not isinstance(esc, Mapping):
            continue
        action = esc.get("action")
        if action == "flag":
            found.add("detected" if esc.get("by") == "detector" else "flag")
        elif action in ("warn", "warn_and_hangup", "supervisor"):
            found.add(str(action))
    for event in record.get("timeline") or []:
        if isinstance(event, Mapping) and str(event.get("event", "")).endswith("_detected"):
            found.add("detected")
    return found


def pause_for(care: CareConfig, record: Mapping[str, Any]) -> tuple[str, int] | None:
    """The longest pause the call's triggers ask for, as (trigger, seconds); None: no pause."""
    if not care.cooldown:
        return None
    best: tuple[str, int] | None = None
    for trigger in CARE_TRIGGERS:  # in a fixed order: equal lengths name the first trigger
        seconds = int(getattr(care, f"{trigger}_s"))
        if trigger in triggers_of(record) and seconds > 0 and (best is None or seconds > best[1]):
            best = (trigger, seconds)
    return best


@dataclass(frozen=True)
class Pause:
    """One running pause, as kept in AstDB."""

    agent: str
    until: float
    call_id: str
    trigger: str
    interface: str = ""

    def db_value(self) -> str:
        return f"{self.until:.3f},{self.call_id},{self.trigger},{self.interface or '-'}"

    @classmethod
    def from_db(cls, agent: str, value: str) -> Pause | None:
        parts = value.split(",", 3)
        if len(parts) != 4:
            return None
        try:
            until = float(parts[0])
        except ValueError:
            return None
        return cls(agent, until, parts[1], parts[2], "" if parts[3] == "-" else parts[3])

    @property
    def until_iso(self) -> str:
        return datetime.fromtimestamp(self.until, UTC).isoformat(timespec="milliseconds")


class PauseDesk:
    """Puts pauses into Asterisk and takes them out (shared by the service and ``kasuhara care resume``)."""

    def __init__(self, care: CareConfig, ami: Ami, events: EventSink) -> None:
        self.care = care
        self.ami = ami
        self.events = events

    async def apply(self, pause: Pause, *, now: float | None = None) -> bool:
        """Pause the agent; True if a queue member was paused (False: device state only)."""
        await self.ami.action(
            {"Action": "DBPut", "Family": DB_FAMILY, "Key": pause.agent, "Val": pause.db_value()}
        )
        await self._devstate(pause.agent, "BUSY")
        queue_paused = False
        if pause.interface:
            fields = {
                "Action": "QueuePause",
                "Interface": pause.interface,
                "Paused": "true",
                "Reason": f"{self.care.pause_reason} until={pause.until_iso}",
            }
            if self.care.queue:
                fields["Queue"] = self.care.queue
            try:
                await self.ami.action(fields)
                queue_paused = True
            except Exception as exc:  # not a member of any queue: a direct target, the device state holds
                log.info("care event=queue_pause_skipped agent=%s error=%s", pause.agent, exc)
        self.events.emit(
            "agent_cooldown_started",
            pause.call_id,
            agent=pause.agent,
            trigger=pause.trigger,
            duration_s=round(max(0.0, pause.until - (time.time() if now is None else now)), 1),
            until=pause.until_iso,
            interface=pause.interface,
            queue_paused=queue_paused,
        )
        log.info(
            "care event=cooldown_started agent=%s trigger=%s until=%s queue_paused=%s",
            pause.agent,
            pause.trigger,
            pause.until_iso,
            queue_paused,
        )
        return queue_paused

    async def lift(self, pause: Pause, reason: str, by: str | None = None) -> None:
        """End the pause everywhere (each step on its own: one failing does not keep the others)."""
        if pause.interface:
            fields = {"Action": "QueuePause", "Interface": pause.interface, "Paused": "false"}
            if self.care.queue:
                fields["Queue"] = self.care.queue
            with contextlib.suppress(Exception):
                await self.ami.action(fields)
        with contextlib.suppress(Exception):
            await self._devstate(pause.agent, "NOT_INUSE")
        with contextlib.suppress(Exception):
            await self.ami.action({"Action": "DBDel", "Family": DB_FAMILY, "Key": pause.agent})
        self.events.emit("agent_cooldown_ended", pause.call_id, agent=pause.agent, reason=reason, by=by)
        log.info("care event=cooldown_ended agent=%s reason=%s", pause.agent, reason)

    async def stored(self) -> dict[str, Pause]:
        """Every pause in AstDB. Asterisk answers "not found" for an empty family: that is ``{}``; an AMI
        that cannot be asked raises :class:`AmiError` (an outage must not read as "no pauses")."""
        try:
            messages = await self.ami.action_list({"Action": "DBGetTree", "Family": DB_FAMILY})
        except AmiError as exc:
            if "not found" in str(exc).lower() and not isinstance(exc, AmiTimeout):
                return {}
            raise
        found: dict[str, Pause] = {}
        for m in messages:
            if m.get("Event") != "DBGetTreeResponse":
                continue
            key = m.get("Key", "").removeprefix(f"/{DB_FAMILY}/")
            try:
                check_agent(key)
            except ValueError:
                continue
            pause = Pause.from_db(key, m.get("Val", ""))
            if pause is not None:
                found[key] = pause
        return found

    async def _devstate(self, agent: str, state: str) -> None:
        await self.ami.action(
            {"Action": "Setvar", "Variable": f"DEVICE_STATE({DEVSTATE_PREFIX}{agent})", "Value": state}
        )


class CooldownKeeper:
    """The service's side: starts a pause when a call ends, ends it on time, on the agent's feature code
    or when it finds it gone (a supervisor's ``care resume``). One task (:meth:`run`) owns the timers."""

    def __init__(
        self, cfg: Config, ami: Ami, events: EventSink, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.care = cfg.care
        self.desk = PauseDesk(cfg.care, ami, events)
        self.ami = ami
        self._clock = clock
        self.pauses: dict[str, Pause] = {}
        self._wake = asyncio.Event()
        #: How often Asterisk's AstDB is read back (pauses another process ended, or added).
        self.sweep_s = 30.0

    async def identify_member(self, local_channel: str) -> str | None:
        """The queue member that answered behind a ``Local/…;1`` agent leg: ``MEMBERINTERFACE``, which
        app_queue (``setinterfacevar = yes``) sets on the ``;2`` half before it bridges the member."""
        if not local_channel.startswith("Local/") or not local_channel.endswith(";1"):
            return None
        other = local_channel[:-1] + "2"
        for _ in range(3):  # set before the bridge, so before the answer reached us; a moment's grace
            try:
                resp = await self.ami.action(
                    {"Action": "Getvar", "Channel": other, "Variable": "MEMBERINTERFACE"}
                )
            except Exception as exc:
                log.info("care event=member_unknown channel=%s error=%s", other, exc)
                return None
            value = resp.get("Value", "")
            if value and value != "(null)":
                return value
            await asyncio.sleep(0.05)
        return None

    async def call_ended(self, call_id: str, record: Mapping[str, Any], interface: str | None) -> None:
        """The end-of-call hook: pause the agent if the call's triggers ask for it. Never raises."""
        try:
            decided = pause_for(self.care, record)
            agent = endpoint_of(interface or record.get("agent"))
            if decided is None or agent is None:
                return
            trigger, seconds = decided
            until = self._clock() + seconds
            current = self.pauses.get(agent)
            if current is not None and current.until >= until:
                return  # already paused at least as long
            pause = Pause(agent, until, call_id, trigger, interface or "")
            self.pauses[agent] = pause
            await self.desk.apply(pause, now=until - seconds)
            self._wake.set()
        except Exception:
            log.exception("care event=cooldown_failed call_id=%s", call_id)

    async def end(self, agent: str, reason: str, by: str | None = None) -> bool:
        """End ``agent``'s pause now; False if there was none (or AMI could not tell)."""
        pause = self.pauses.pop(agent, None)
        if pause is None:
            try:
                pause = (await self.desk.stored()).get(agent)
            except AmiError as exc:
                log.warning("care event=resume_unknown agent=%s error=%s", agent, exc)
                return False
        if pause is None:
            return False
        await self.desk.lift(pause, reason, by)
        self._wake.set()
        return True

    async def run(self) -> None:
        """Take over the pauses Asterisk holds, then end each when due; every ``sweep_s`` compare with
        AstDB again (pauses another process ended or added, or the start's read that AMI missed)."""
        for _ in range(50):  # AMI connects on its own: the first read waits a little for it
            if getattr(self.ami, "ready", True):
                break
            await asyncio.sleep(0.2)
        await self._sync()
        while True:
            now = self._clock()
            for agent, pause in list(self.pauses.items()):
                if pause.until <= now:
                    del self.pauses[agent]
                    await self.desk.lift(pause, "expired")
            soonest = min((p.until for p in self.pauses.values()), default=now + self.sweep_s)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.05, min(soonest - now, self.sweep_s))):
                    await self._wake.wait()
            if not self._wake.is_set():
                await self._sync()

    async def _sync(self) -> None:
        """Make the timers agree with AstDB: adopt pauses this process does not know (ending at once
        those already due: ``overdue``), forget those gone from AstDB (``care resume`` published their
        end). Pauses started while AstDB was being read are kept."""
        before = dict(self.pauses)
        try:
            stored = await self.desk.stored()
        except AmiError as exc:
            log.warning("care event=sync_failed error=%s", exc)
            return
        now = self._clock()
        for agent, pause in before.items():
            if agent not in stored and self.pauses.get(agent) is pause:
                log.info("care event=ended_elsewhere agent=%s", agent)
                del self.pauses[agent]
        for agent, pause in stored.items():
            if agent in self.pauses:
                continue
            if pause.until <= now:
                await self.desk.lift(pause, "overdue")
            else:
                log.info("care event=adopted agent=%s until=%s", agent, pause.until_iso)
                self.pauses[agent] = pause


def channel_endpoint(channel_name: str) -> str | None:
    """The endpoint of a phone's own channel (``PJSIP/agent1-0000002a`` → ``agent1``)."""
    return endpoint_of(channel_name)


async def resume_remote(
    cfg: Config, agent: str, *, by: str, ami_factory: Callable[[Config], Awaitable[Any]] | None = None
) -> bool:
    """``kasuhara care resume``: end ``agent``'s pause from outside the service (AMI and MQTT of its own);
    the service notices the AstDB entry gone and forgets its timer. False if the agent was not paused."""
    from ..audit import CommandEvents  # (the admin side only: serve never needs it)

    ami = (
        await ami_factory(cfg)
        if ami_factory is not None
        else AmiClient(
            cfg.ami.host,
            cfg.ami.port,
            cfg.ami.username,
            cfg.ami.secret,
            action_timeout_s=cfg.ami.action_timeout_s,
        )
    )
    try:
        await ami.wait_ready(timeout=5)
        async with CommandEvents(cfg.mqtt) as events:
            desk = PauseDesk(cfg.care, ami, events)
            pause = (await desk.stored()).get(agent)
            if pause is None:
                return False
            await desk.lift(pause, "supervisor", by)
            return True
    finally:
        ami.close()
