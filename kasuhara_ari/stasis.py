"""The Stasis application: turns the ARI event stream into per-call inboxes.

Handlers here stay a few lines: parse the event, find the call it belongs to, hand it on. Each call runs
in its own task owned by a TaskGroup; an error in one call ends that call only. After every websocket
(re)connection the app re-syncs with Asterisk, because events sent while it was disconnected are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .announcement import NoticePlayer
from .ari import CONNECTED, AriClient, AriError, Channel, ChannelGone
from .call import HANDOVER_SUFFIX, Call, CallDeps, CallState
from .callers import CallerPolicy
from .care.cooldown import CooldownKeeper, channel_endpoint
from .config import Config
from .detection import configured_factories
from .detection.media import MediaReceiver
from .events import EventSink, StatusDetails
from .outbound import OutboundCall
from .overload import OverloadWatch
from .recording import Recorder
from .safe import safe_call_id

log = logging.getLogger(__name__)

Event = dict[str, Any]

#: The ARI events calls use (Asterisk sends no others: ``AriClient(event_types=...)``). Everything else
#: (variable sets, dialplan steps, bridge entries, caller-ID updates...) would be parsed only to be dropped.
STASIS_EVENTS = frozenset(
    {
        "StasisStart",
        "StasisEnd",
        "ChannelStateChange",
        "ChannelHangupRequest",
        "ChannelDestroyed",
        "ChannelDtmfReceived",
        "ChannelTalkingStarted",  # TALK_DETECT on the caller and agent legs (detection)
        "ChannelTalkingFinished",
        "Dial",
        "PlaybackFinished",
    }
)


class StasisApp:
    def __init__(
        self,
        cfg: Config,
        ari: AriClient,
        recorder: Recorder,
        events: EventSink,
        *,
        on_metadata: Callable[[str], Awaitable[None]] | None = None,
        hold: Callable[[str, str, str, str], Awaitable[Any]] | None = None,
        callers: CallerPolicy | None = None,
        care: CooldownKeeper | None = None,
    ) -> None:
        self.cfg = cfg
        self.care = care
        self.ari = ari
        self.events = events
        self.calls: dict[str, Call] = {}
        self._by_channel: dict[str, Call] = {}
        self._by_bridge: dict[str, Call] = {}
        factories = configured_factories(cfg.detection)
        #: The one UDP socket for every call's caller audio (opened by the first call that needs it).
        self.media = MediaReceiver() if factories else None
        self._deps = CallDeps(
            cfg=cfg,
            ari=ari,
            recorder=recorder,
            notices=NoticePlayer(ari, cfg.announcement.language),
            events=events,
            on_metadata=on_metadata,
            claim_channel=self._claim,
            hold=hold,
            callers=callers,
            care=care,
            media=self.media,
            detectors=factories,
        )
        self._tasks: asyncio.TaskGroup | None = None
        self.connected = asyncio.Event()
        self.finished_calls = 0
        self.handed_over = 0
        #: How late new calls reach us: says when the box is overloaded (log, metric, status detail).
        self.overload = OverloadWatch(events if isinstance(events, StatusDetails) else None)

    def _claim(self, channel_id: str, call: Call) -> None:
        self._by_channel[channel_id] = call

    async def run(self) -> None:
        """Consume ARI events forever (reconnecting as needed)."""
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                async for event in self.ari.events():
                    try:
                        self.dispatch(event)
                    except Exception:
                        log.exception("stasis event=dispatch_bug type=%s", event.get("type"))
        finally:
            if self.media is not None:
                self.media.close()

    # --- routing ---------------------------------------------------------------------------------------

    def dispatch(self, event: Event) -> None:
        kind = event.get("type", "")
        if kind == CONNECTED:
            self.connected.set()
            self._spawn(self.resync(), "resync")
        elif kind == "StasisStart":
            self.stasis_start(event)
        elif kind == "PlaybackFinished":
            self.playback_event(event)
        else:
            self.channel_event(event)

    def stasis_start(self, event: Event) -> None:
        channel = Channel.from_json(event.get("channel") or {})
        args = [str(a) for a in event.get("args") or []]
        owner = self._by_channel.get(channel.id)
        if owner is not None:  # a leg this app created (agent, supervisor)
            owner.deliver(event)
            return
        role = args[0] if args else ""
        if role in ("inbound", "outbound"):
            self._start_call(event, channel, args)
        elif role == "care-resume":  # the agent's feature code: end my pause now
            self._spawn(self._care_resume(channel), "care-resume")
        else:
            log.warning("stasis event=unexpected_channel channel=%s args=%s", channel.id, args[:3])
            self._spawn(self._return_to_dialplan(channel.id), "return")

    def _start_call(self, event: Event, channel: Channel, args: list[str]) -> None:
        self.overload.observe(event.get("timestamp"))
        linkedid = str((event.get("channel") or {}).get("linkedid") or channel.id)
        try:
            call_id = safe_call_id(linkedid)
        except ValueError:
            log.error("stasis event=bad_call_id channel=%s", channel.id)
            self._spawn(self._return_to_dialplan(channel.id), "return")
            return
        if call_id in self.calls:
            call_id = safe_call_id(f"{call_id}-{channel.id}"[:128])
        target = args[1] if len(args) > 1 and args[1] else ""
        call: Call
        if args[0] == "outbound":
            if not target:
                log.error("stasis event=outbound_without_target channel=%s", channel.id)
                self._spawn(self._return_to_dialplan(channel.id), "return")
                return
            call = OutboundCall(self._deps, channel, call_id, target)
        else:
            call = Call(self._deps, channel, call_id, target or self.cfg.routing.default_target)
        self.calls[call_id] = call
        self._by_channel[channel.id] = call
        self._by_bridge[call.bridge_id] = call
        log.info("stasis event=call_started call_id=%s channel=%s target=%s", call_id, channel.name, target)
        self._spawn(self._run_call(call), f"call-{call_id}")

    def playback_event(self, event: Event) -> None:
        target = str((event.get("playback") or {}).get("target_uri", ""))
        kind, _, ident = target.partition(":")
        call = self._by_channel.get(ident) if kind == "channel" else self._by_bridge.get(ident)
        if call is not None:
            call.deliver(event)

    def channel_event(self, event: Event) -> None:
        chan = (event.get("channel") or {}).get("id")
        call = self._by_channel.get(chan) if chan else None
        if call is None:
            peer = (event.get("peer") or {}).get("id")
            call = self._by_channel.get(peer) if peer else None
        if call is not None:
            call.deliver(event)

    # --- tasks -----------------------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        assert self._tasks is not None, "dispatch before run()"
        self._tasks.create_task(self._guard(coro, name), name=name)

    async def _guard(self, coro: Awaitable[None], name: str) -> None:
        try:
            await coro
        except Exception:
            log.exception("stasis event=task_failed task=%s", name)

    async def _run_call(self, call: Call) -> None:
        try:
            await call.run()
            if call.state is CallState.HANDED_OVER:
                self.handed_over += 1
        finally:
            self.calls.pop(call.call_id, None)
            self._by_bridge.pop(call.bridge_id, None)
            for chan in [k for k, v in self._by_channel.items() if v is call]:
                del self._by_channel[chan]
            self.finished_calls += 1

    async def _care_resume(self, channel: Channel) -> None:
        """End the pause of the phone's own endpoint, then back to the dialplan (which confirms)."""
        agent = channel_endpoint(channel.name)
        ended = False
        if self.care is not None and agent is not None:
            ended = await self.care.end(agent, "agent", by=agent)
        log.info("stasis event=care_resume agent=%s ended=%s", agent, ended)
        with contextlib.suppress(AriError):
            await self.ari.set_variable(channel.id, "KASUHARA_CARE_RESUMED", "1" if ended else "0")
        await self._return_to_dialplan(channel.id)

    async def _return_to_dialplan(self, channel_id: str) -> None:
        try:
            await self.ari.continue_in_dialplan(channel_id)
        except AriError:
            with contextlib.suppress(AriError):
                await self.ari.hangup(channel_id)

    # --- handover across a restart ----------------------------------------------------------------------

    async def hand_over(self, wait_s: float) -> int:
        """Ask every call to hand over to the next ``serve`` and wait (at most ``wait_s``) until each has
        done so or ended; calls still ringing or escalating after that are ended by the caller of this
        (cancellation), as before. Returns how many calls were handed over."""
        before = self.handed_over
        for call in list(self.calls.values()):
            call.ask_handover()
        deadline = time.monotonic() + wait_s
        while self.calls and time.monotonic() < deadline:
            for call in list(self.calls.values()):
                call.ask_handover()  # calls that started meanwhile too
            await asyncio.sleep(0.05)
        handed = self.handed_over - before
        log.info("stasis event=handed_over calls=%d left_to_end=%d", handed, len(self.calls))
        return handed

    async def _resume_handed_over(self) -> None:
        """Take over the calls a previous ``serve`` left talking (``<spool>/<call_id>.handover``): each
        goes on here, or ends here at once if its channels went away meanwhile (its metadata is written
        either way). A file that cannot be read is renamed ``.bad`` and reported, never deleted."""
        spool = self.cfg.recording.host_dir
        try:
            paths = sorted(p for p in spool.iterdir() if p.name.endswith(HANDOVER_SUFFIX))
        except OSError as exc:
            log.warning("stasis event=handover_scan_failed error=%s", exc.strerror or exc)
            return
        for path in paths:
            try:
                doc = json.loads(await asyncio.to_thread(path.read_bytes))
                call_id = safe_call_id(str(doc["record"]["call_id"]))
                caller_doc = doc["caller"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("stasis event=handover_unreadable file=%s error=%s", path.name, type(exc).__name__)
                with contextlib.suppress(OSError):
                    os.replace(path, path.with_name(path.name + ".bad"))
                continue
            if call_id in self.calls:
                continue
            try:
                call = await self._resumed_call(doc, call_id, caller_doc, path)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("stasis event=handover_unreadable file=%s error=%s", path.name, exc)
                with contextlib.suppress(OSError):
                    os.replace(path, path.with_name(path.name + ".bad"))
                continue
            except AriError as exc:  # Asterisk not answering: try again at the next connection
                log.warning("stasis event=handover_deferred call_id=%s error=%s", call_id, exc)
                return
            if call_id in self.calls:  # resumed meanwhile (a reconnect while we asked Asterisk)
                continue
            self.calls[call_id] = call
            for channel_id in [call.caller.id, call.agent_id or "", *call.escalation.channel_ids()]:
                if channel_id:
                    self._by_channel[channel_id] = call
            self._by_bridge[call.bridge_id] = call
            log.info("stasis event=call_resumed call_id=%s", call_id)
            self._spawn(self._run_call(call), f"call-{call_id}")

    async def _resumed_call(self, doc: dict[str, Any], call_id: str, caller_doc: Any, path: Path) -> Call:
        """The call of a handover file, its live channels asked from Asterisk (gone ones marked so)."""
        record = doc["record"]
        caller_id = str(caller_doc["id"])
        ids = [caller_id, str(doc.get("agent_id") or ""), *((doc.get("supervisor") or {}).get("legs") or [])]
        live: dict[str, Channel] = {}
        gone: dict[str, str] = {}
        for channel_id in [str(i) for i in ids if i]:
            try:
                live[channel_id] = await self.ari.get_channel(channel_id)
            except ChannelGone:
                gone[channel_id] = "gone while serve restarted"
        caller = live.get(caller_id) or Channel(
            caller_id,
            str(caller_doc.get("name", "")),
            "Up",
            str(caller_doc.get("number", "")),
            str(caller_doc.get("caller_name", "")),
            str(caller_doc.get("language", "")),
        )
        call: Call
        target = str(record["target"])
        if record.get("direction") == "outbound":
            agent_id = str(doc.get("agent_id") or "")
            agent = live.get(agent_id) or Channel(agent_id, str(record.get("agent") or ""), "Up", "", "", "")
            call = OutboundCall(self._deps, agent, call_id, target)
            call.caller = caller
        else:
            call = Call(self._deps, caller, call_id, target)
        call.resume(doc, path, gone)
        return call

    # --- re-sync after a reconnect --------------------------------------------------------------------

    async def resync(self) -> None:
        """Tell every call which of its channels vanished while we were not listening, take over the
        calls a previous ``serve`` handed over, and deal with channels in the app that no call owns
        (left over from a previous run of the app that did not hand them over)."""
        try:
            app = await self.ari.application()
        except AriError as exc:
            log.warning("stasis event=resync_failed error=%s", exc)
            return
        await self._resume_handed_over()
        in_app = set(app.get("channel_ids") or [])
        for channel_id, call in list(self._by_channel.items()):
            if call.channel_gone(channel_id):
                continue
            try:
                await self.ari.get_channel(channel_id)
            except ChannelGone:
                call.deliver(
                    {
                        "type": "ChannelDestroyed",
                        "channel": {"id": channel_id},
                        "cause": 0,
                        "cause_txt": "gone while the event connection was down",
                    }
                )
            except AriError as exc:
                log.warning("stasis event=resync_check_failed channel=%s error=%s", channel_id, exc)
        for channel_id in in_app - set(self._by_channel):
            log.warning("stasis event=orphan_channel channel=%s action=hangup", channel_id)
            with contextlib.suppress(AriError):
                await self.ari.hangup(channel_id)
        log.info("stasis event=resynced calls=%d channels_in_app=%d", len(self.calls), len(in_app))
