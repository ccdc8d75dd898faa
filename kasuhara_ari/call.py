"""One call's life as an explicit state machine: answering → notice → dialling → talking → ending.

Everything that happens to a call arrives in its own inbox (the Stasis router puts ARI events there) and
is absorbed into a few facts (which channels are up or gone, which playbacks finished, which digits the
agent pressed). The ``run`` method reads top to bottom like the caller experiences the call, and every way
out goes through the single teardown in ``_end``. A failure in one call never touches another: each call
runs in its own task and its errors end only that call.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from . import escalation as esc
from . import metrics
from .announcement import NoticePlayer, PlayOutcome
from .ari import AriError, Channel, ChannelGone
from .callerid import CallerId, agent_label, render, repairs
from .callers import CallerPolicy, ListedCaller
from .config import Config
from .detection.base import BUILTIN_KINDS, Detection, DetectorFactory, FrameDetector, make_detectors
from .detection.media import MEDIA_FORMAT, MediaReceiver, StreamFeed
from .detection.talk import Party, TalkDetector
from .events import EventSink, now_iso
from .policy import BudgetStep, TimeBudget
from .recording import CallRecord, Escalation, Recorder, SpoolPaths, write_json_atomic
from .safe import clean_caller_name, clean_caller_number, safe_call_id

if TYPE_CHECKING:
    from .care.cooldown import CooldownKeeper

log = logging.getLogger(__name__)

Event = dict[str, Any]


#: Set (inherited, ``__`` prefix) on a channel once it heard the notice: it is not played to it again.
NOTICE_VAR = "KASUHARA_NOTICE_PLAYED"
#: The inbox event that carries what the frame detectors found (from the media socket's callback).
DETECTIONS_EVENT = "KasuharaDetections"
#: How long the teardown waits for a detector-rung listening supervisor's session to end by itself.
LISTEN_END_WAIT_S = 3.0

#: A talking call that a stopping ``serve`` left to its successor: ``<spool>/<call_id>.handover``.
HANDOVER_SCHEMA = "kasuhara.handover/1"
HANDOVER_SUFFIX = ".handover"
#: Put in a call's inbox to wake it when ``serve`` asks it to hand over.
_HANDOVER_EVENT = "KasuharaHandover"


class CallState(enum.Enum):
    ANSWERING = "answering"
    NOTICE = "notice"
    DIALLING = "dialling"
    TALKING = "talking"
    ESCALATING = "escalating"
    ENDING = "ending"
    ENDED = "ended"
    #: Left talking, channels and recording untouched, for the next ``serve`` (a restart).
    HANDED_OVER = "handed_over"


class Telephony(Protocol):
    """The ARI operations a call uses (AriClient implements it; unit tests use a fake)."""

    async def answer(self, channel_id: str) -> None: ...
    async def ring(self, channel_id: str) -> None: ...
    async def hangup(self, channel_id: str, reason: str = "normal") -> None: ...
    async def play(
        self, channel_id: str, media: str, *, lang: str | None = None, playback_id: str | None = None
    ) -> dict[str, Any]: ...
    async def play_on_bridge(
        self, bridge_id: str, media: str, *, lang: str | None = None, playback_id: str | None = None
    ) -> dict[str, Any]: ...
    async def stop_playback(self, playback_id: str) -> None: ...
    async def create_channel(
        self,
        endpoint: str,
        *,
        channel_id: str,
        app_args: str = "",
        originator: str | None = None,
        variables: dict[str, str] | None = None,
    ) -> Channel: ...
    async def dial(
        self, channel_id: str, *, caller: str | None = None, timeout_s: int | None = None
    ) -> None: ...
    async def create_bridge(
        self, bridge_id: str, *, kind: str = "mixing,dtmf_events", name: str = ""
    ) -> None: ...
    async def add_to_bridge(
        self, bridge_id: str, channel_id: str, *, absorb_dtmf: bool = False, role: str | None = None
    ) -> None: ...
    async def destroy_bridge(self, bridge_id: str) -> None: ...
    async def set_variable(self, channel_id: str, name: str, value: str) -> None: ...
    async def get_variable(self, channel_id: str, name: str) -> str: ...
    async def snoop(
        self, channel_id: str, *, snoop_id: str, spy: str = "both", whisper: str = "none", app_args: str = ""
    ) -> Channel: ...
    async def external_media(
        self,
        *,
        channel_id: str,
        external_host: str,
        media_format: str = "slin",
        direction: str = "both",
        app_args: str = "",
    ) -> dict[str, Any]: ...


@dataclass
class CallDeps:
    cfg: Config
    ari: Telephony
    recorder: Recorder
    notices: NoticePlayer
    events: EventSink
    #: Called once the call's metadata is on disk (the uploader's cue).
    on_metadata: Callable[[str], Awaitable[None]] | None = None
    #: Registers a channel id as belonging to this call before it exists (so no event is missed).
    claim_channel: Callable[[str, Call], None] | None = None
    #: Puts the call's recording on evidence hold durably (call_id, reason, by, started_at).
    hold: Callable[[str, str, str, str], Awaitable[Any]] | None = None
    #: Repeat callers and the admin's caller list (policy); None = no caller rules.
    callers: CallerPolicy | None = None
    #: The agent's recovery pause after a harassment call ([care]); None = no pauses.
    care: CooldownKeeper | None = None
    #: The app's one socket for the callers' audio, and the detectors fed from it (detection/); none:
    #: only Asterisk's talk detection.
    media: MediaReceiver | None = None
    detectors: tuple[DetectorFactory, ...] = ()


#: Backoff of a metadata write the disk refused (retried until it succeeds; see _write_metadata).
METADATA_RETRY_FIRST_S = 0.5
METADATA_RETRY_MAX_S = 30.0
METADATA_OTHER_ERROR_ATTEMPTS = 5

#: Q.850 causes of a dialled leg that did not answer, as the metadata names them.
_NO_ANSWER_CAUSES = frozenset({18, 19})  # no user responding, no answer
_BUSY_CAUSES = frozenset({17})  # user busy
_FINAL_DIAL_STATUSES = frozenset({"BUSY", "NOANSWER", "CHANUNAVAIL", "CONGESTION", "CANCEL"})


def _unreachable_reason(dialstatus: str, cause: int) -> str:
    """Why a dialled agent did not come: the Dial status when Asterisk gave one, else the hangup cause."""
    if dialstatus == "NOANSWER" or (not dialstatus and cause in _NO_ANSWER_CAUSES):
        return "agent_no_answer"
    if dialstatus == "BUSY" or (not dialstatus and cause in _BUSY_CAUSES):
        return "agent_busy"
    return "agent_unavailable"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


class Call:
    """An inbound call handed to the app by ``Stasis(kasuhara,inbound[,TARGET])``."""

    def __init__(
        self, deps: CallDeps, caller: Channel, call_id: str, target: str, *, direction: str = "inbound"
    ):
        self.deps = deps
        self.caller = caller
        self.call_id = call_id
        self.target = target
        self.state = CallState.ANSWERING
        self.inbox: asyncio.Queue[Event] = asyncio.Queue()
        self.bridge_id = f"kasuhara-{call_id}"
        self.agent_id: str | None = None
        self.started_mono = time.monotonic()
        self.record = CallRecord(
            call_id=call_id,
            direction=direction,
            caller_number=clean_caller_number(caller.caller_number) or "",
            caller_name=clean_caller_name(caller.caller_name) or "",
            target=target,
            started_at=now_iso(),
        )
        self._answered_wall: float | None = None
        self._paths: SpoolPaths | None = None
        # Facts absorbed from events.
        self._gone: dict[str, str] = {}  # channel id -> why
        self._causes: dict[str, int] = {}  # channel id -> Q.850 hangup cause
        self._destroyed: set[str] = set()
        self._dialstatus: dict[str, str] = {}  # dialled channel id -> last Dial status (BUSY, NOANSWER...)
        self._up: set[str] = set()
        self._in_stasis: set[str] = set()
        self._playbacks: dict[str, str] = {}
        self._digits = esc.KeySequenceCollector(
            dict(deps.cfg.escalation.keys), inter_digit_timeout_s=deps.cfg.escalation.inter_digit_timeout_s
        )
        self._pending_actions: list[tuple[str, str]] = []
        self.escalation = esc.EscalationRunner(self)
        self.budget = TimeBudget(deps.cfg.policy)
        detection = deps.cfg.detection
        self.talk = TalkDetector(detection) if detection.mode != "off" else None
        self._detections: list[Detection] = []
        self._handover_asked = False
        #: The handover file this call was resumed from (removed once its metadata is written).
        self._resumed_from: Path | None = None
        self._talk_before: dict[str, float] | None = None
        #: When the call really ended, if it ended before we knew (while handed over): the audio's mtime.
        self._ended_wall: float | None = None
        #: The queue member behind a ``Local/…`` agent leg (app_queue's MEMBERINTERFACE), for the pause.
        self.agent_member: str | None = None
        # Frame detectors (loudness, plug-ins) and the caller's audio feeding them: see _start_media.
        self.frame_detectors: list[FrameDetector] = (
            make_detectors(detection, list(deps.detectors))
            if detection.mode != "off" and deps.media is not None
            else []
        )
        self._feed: StreamFeed | None = None
        self._media_tried = False  # what the teardown must clean up (nothing for a call never talked)
        self.media_ids = (f"{call_id}-media-snoop", f"{call_id}-media-rtp", f"kasuhara-media-{call_id}")
        self._detected = 0
        self._acted: set[str] = set()
        self._listen_task: asyncio.Task[None] | None = None

    # --- facts ------------------------------------------------------------------------------------------

    def deliver(self, event: Event) -> None:
        self.inbox.put_nowait(event)

    def channel_gone(self, channel_id: str) -> bool:
        return channel_id in self._gone

    def channel_up(self, channel_id: str) -> bool:
        return channel_id in self._up

    def playback_state(self, playback_id: str) -> str | None:
        return self._playbacks.get(playback_id)

    def gone_reason(self, channel_id: str) -> str:
        return self._gone.get(channel_id, "")

    async def next_event(self, timeout: float | None) -> bool:
        """Absorb one event (False if none came within ``timeout``; None: wait for one however long).

        Waits are for events, not polls: a call that is simply talking costs nothing until something
        happens (the load benchmark found a 0.25-s poll per call to be over a tenth of the app's CPU)."""
        if not self.inbox.empty():
            event = self.inbox.get_nowait()
        elif timeout is None:
            event = await self.inbox.get()
        else:
            try:
                async with asyncio.timeout(timeout):
                    event = await self.inbox.get()
            except TimeoutError:
                return False
        self._absorb(event)
        return True

    def _absorb(self, event: Event) -> None:
        kind = event.get("type", "")
        chan = (event.get("channel") or {}).get("id", "")
        if kind in ("ChannelHangupRequest", "ChannelDestroyed", "StasisEnd"):
            # A hangup request comes first (before the PlaybackFinished of an interrupted prompt): from
            # then on the channel counts as gone. The cause of the destruction is kept when it comes.
            if kind == "ChannelDestroyed":
                self._destroyed.add(chan)
            if "cause" in event and (kind == "ChannelDestroyed" or chan not in self._causes):
                self._causes[chan] = int(event.get("cause") or 0)
                log.debug(
                    "call event=cause call_id=%s channel=%s via=%s cause=%s",
                    self.call_id,
                    chan,
                    kind,
                    event.get("cause"),
                )
            if chan and chan not in self._gone:
                cause = event.get("cause_txt") or ("left the app" if kind == "StasisEnd" else "hung up")
                self._gone[chan] = str(cause)
                self._on_channel_gone(chan, event)
        elif kind == "StasisStart":
            self._in_stasis.add(chan)
        elif kind == "ChannelStateChange":
            if (event.get("channel") or {}).get("state") == "Up":
                self._up.add(chan)
        elif kind == "PlaybackFinished":
            pb = event.get("playback") or {}
            self._playbacks[str(pb.get("id", ""))] = str(pb.get("state", "done"))
        elif kind == "ChannelDtmfReceived":
            if chan and chan == self.agent_id:
                action = self._digits.feed(str(event.get("digit", "")), time.monotonic())
                if action is not None:
                    self._pending_actions.append(action)
            # The caller's digits never trigger anything (and are not logged: they may be card numbers).
        elif kind in ("ChannelTalkingStarted", "ChannelTalkingFinished"):
            self._absorb_talk(kind, chan, event)
        elif kind == DETECTIONS_EVENT:
            self._detections.extend(event.get("detections") or [])
        elif kind == "Dial":
            log.debug(
                "call event=dial call_id=%s peer=%s status=%s",
                self.call_id,
                (event.get("peer") or {}).get("id"),
                event.get("dialstatus"),
            )
            peer = (event.get("peer") or {}).get("id", "")
            status = event.get("dialstatus", "")
            if peer and status == "ANSWER":
                self._up.add(peer)
            elif peer and status in _FINAL_DIAL_STATUSES:
                self._dialstatus[peer] = str(status)
        self.escalation.absorb(kind, chan, event)

    def _absorb_talk(self, kind: str, chan: str, event: Event) -> None:
        """Asterisk's talk detection on the caller's or the agent's leg (a supervisor's is not watched)."""
        if self.talk is None:
            return
        party: Party | None = (
            "caller" if chan == self.caller.id else "agent" if chan == self.agent_id else None
        )
        if party is None:
            return
        now = time.monotonic()
        log.debug(
            "call event=talk call_id=%s party=%s kind=%s duration=%s",
            self.call_id,
            party,
            kind,
            event.get("duration"),
        )
        if kind == "ChannelTalkingStarted":
            self._detections.extend(self.talk.started(party, now))
        else:
            duration = event.get("duration")
            seconds = float(duration) / 1000 if isinstance(duration, int | float) else None
            self._detections.extend(self.talk.finished(party, now, seconds))
        for det in self.frame_detectors:
            self._detections.extend(det.talk(party, kind == "ChannelTalkingStarted", self.elapsed_s()))

    async def _report_detections(self) -> None:
        """Each detection: its event (into the timeline too); in ``act`` mode the call becomes evidence."""
        if self.talk is not None:
            self._detections.extend(self.talk.check(time.monotonic()))
        while self._detections:
            found = self._detections.pop(0)
            now_s = self.elapsed_s()
            offset = round(now_s, 1)
            mode = self.deps.cfg.detection.mode
            log.info("call event=detected call_id=%s kind=%s mode=%s", self.call_id, found.kind, mode)
            figures: dict[str, Any] = dict(found.figures)
            if found.onset_s is not None and self._feed is not None and self._feed.started_wall is not None:
                # Where it began on the recording's clock (MixMonitor starts at the answer), and how long
                # the detector needed to be sure.
                onset = self._feed.started_wall - (self._answered_wall or 0.0) + found.onset_s
                offset = round(max(0.0, onset), 2)
                figures["latency_s"] = round(max(0.0, now_s - onset), 2)
            if found.kind in BUILTIN_KINDS:
                self.emit(f"{found.kind}_detected", offset_s=offset, mode=mode, **figures)
            else:  # an operator's plug-in (detection/base.py): one event name, its kind inside
                self.emit("custom_detected", offset_s=offset, mode=mode, kind=found.kind, **figures)
            self._detected += 1
            if mode == "act":
                await self._act_on(found, offset)

    def _may_act(self, action: str) -> bool:
        """Each ``act`` action once per call (unless ``act_repeat``)."""
        if action in self._acted and not self.deps.cfg.detection.act_repeat:
            return False
        self._acted.add(action)
        return True

    async def _act_on(self, found: Detection, offset_s: float) -> None:
        """``act`` mode: alert the supervisors, have one listen in, flag the call after N detections."""
        det = self.deps.cfg.detection
        if det.act_alert and self._may_act("alert"):
            log.warning("call event=detection_alert call_id=%s kind=%s", self.call_id, found.kind)
            self.emit("detection_alert", kind=found.kind, offset_s=offset_s, detections=self._detected)
        if det.act_listen and self._listen_task is None and self.deps.cfg.escalation.supervisors:
            self._acted.add("listen")
            self._listen_task = asyncio.create_task(self._listen_in(), name=f"listen-{self.call_id}")
        if det.act_flag_after and self._detected >= det.act_flag_after and self._may_act("flag"):
            await self.escalation.hold_as_evidence(
                key=f"detected:{found.kind}", by="detector", reason=f"detected: {found.kind}"
            )

    async def _listen_in(self) -> None:
        """The first supervisor who answers listens in (supervision.py's listen mode: nobody hears them);
        the agent alone first hears the tone of an accepted ``*9`` (escalation.supervisor_ack_sound), so
        they know someone is coming. (A ``tone:`` string cannot be used: ARI splits media at commas.)"""
        from .supervision import SupervisionError, SupervisionSession  # the face of `kasuhara supervise`

        cfg = self.deps.cfg
        sound = cfg.escalation.supervisor_ack_sound
        if sound and self.agent_id and not self.channel_gone(self.agent_id):
            await self.deps.notices.cue(self.agent_id, sound, tag=f"{self.call_id}-listen")
        for endpoint in cfg.escalation.supervisors:
            session = SupervisionSession(
                cfg, self.call_id, "listen", endpoint, events=self.deps.events, by="detector"
            )
            try:
                reason = await session.run()
            except SupervisionError as exc:
                log.info(
                    "call event=listen_failed call_id=%s supervisor=%s error=%s", self.call_id, endpoint, exc
                )
                continue
            log.info(
                "call event=listen_ended call_id=%s supervisor=%s reason=%s", self.call_id, endpoint, reason
            )
            return

    async def _end_listening(self) -> None:
        """After the call's legs and bridge are gone: a listening supervisor's session sees that and ends
        by itself (``call_ended``, the supervisor hung up); cancelled if it takes longer than a moment."""
        task = self._listen_task
        if task is None:
            return
        done, _ = await asyncio.wait({task}, timeout=LISTEN_END_WAIT_S)
        if not done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _start_media(self) -> None:
        """The caller's audio to the detectors: a snoop (``spy=in``: the caller's voice only) bridged with
        an externalMedia channel sending RTP to the app's socket. A failure costs the call nothing but
        signal 2 (logged); whatever was made is removed again."""
        media = self.deps.media
        det = self.deps.cfg.detection
        if media is None or not self.frame_detectors or self.channel_gone(self.caller.id):
            return
        ari = self.deps.ari
        snoop_id, rtp_id, bridge_id = self.media_ids
        for chan in (snoop_id, rtp_id):
            if self.deps.claim_channel is not None:
                self.deps.claim_channel(chan, self)
        self._media_tried = True
        try:
            host, port = await media.open(det.media_bind, det.media_port)
            feed = StreamFeed(
                "caller",
                self.frame_detectors,
                self._on_frame_detections,
                frame_samples=8 * det.frame_ms,
            )
            em = await ari.external_media(
                channel_id=rtp_id,
                external_host=f"{det.media_host or host}:{port}",
                media_format=MEDIA_FORMAT,
                app_args="media",
            )
            vars_ = em.get("channelvars") or {}
            source = (
                str(vars_.get("UNICASTRTP_LOCAL_ADDRESS", "")),
                int(vars_.get("UNICASTRTP_LOCAL_PORT", 0)),
            )
            media.register(source, feed)
            self._feed = feed
            await ari.snoop(self.caller.id, snoop_id=snoop_id, spy="in", app_args="media")
            await ari.create_bridge(bridge_id, kind="mixing", name=bridge_id)
            # Both enter the app a moment after their create returns; addChannel before that is a 422
            # (seen at 4 calls at once).
            for chan in (rtp_id, snoop_id):
                await self.until_in_stasis(chan)
                await ari.add_to_bridge(bridge_id, chan)
        except (AriError, OSError, ValueError) as exc:
            log.warning("call event=media_failed call_id=%s error=%s", self.call_id, exc)
            await self._stop_media()
            return
        log.debug("call event=media_started call_id=%s source=%s:%s", self.call_id, *source)

    def _on_frame_detections(self, found: list[Detection], feed: StreamFeed) -> None:
        """From the media socket's callback into the call's inbox: the call acts in its own task."""
        self.deliver({"type": DETECTIONS_EVENT, "detections": found})

    async def _stop_media(self) -> None:
        """Part of the teardown: nothing of the media path outlives the call (the snoop would go with the
        caller's channel, the externalMedia channel and its bridge would not)."""
        if self._feed is not None and self.deps.media is not None:
            self.deps.media.unregister(self._feed)
        if not self._media_tried:
            return
        self._media_tried = False
        snoop_id, rtp_id, bridge_id = self.media_ids
        for chan in (rtp_id, snoop_id):
            if not self.channel_gone(chan):
                await self._quietly(self.deps.ari.hangup(chan))
        await self._quietly(self.deps.ari.destroy_bridge(bridge_id))

    def _on_channel_gone(self, channel_id: str, event: Event) -> None:
        # A normal clearing (16) or none given is the everyday end: DEBUG; any other cause says why.
        level = logging.DEBUG if event.get("cause") in (None, 0, 16) else logging.INFO
        log.log(
            level,
            "call event=channel_gone call_id=%s channel=%s cause=%s via=%s",
            self.call_id,
            channel_id,
            event.get("cause", ""),
            event.get("type", ""),
        )

    async def until_in_stasis(self, channel_id: str, timeout: float = 3.0) -> None:
        """A channel created with /channels/create enters the app a moment after the request returns;
        until its StasisStart, addChannel answers 422 "not in Stasis" (seen under load)."""
        deadline = time.monotonic() + timeout
        while channel_id not in self._in_stasis and not self.channel_gone(channel_id):
            if time.monotonic() > deadline:
                return
            await self.next_event(timeout=0.1)

    def take_agent_action(self) -> tuple[str, str] | None:
        """The next key sequence the agent completed, as (sequence, action)."""
        if not self._pending_actions:
            flushed = self._digits.expire(time.monotonic())
            if flushed is not None:
                self._pending_actions.append(flushed)
        return self._pending_actions.pop(0) if self._pending_actions else None

    def emit(self, event: str, *, at: str | None = None, **fields: Any) -> str:
        """An event to MQTT and into the call's own timeline (exported with the evidence); its time
        (``at``: when the caller already read the clock for the same moment) is returned."""
        at = at or now_iso()
        self.deps.events.emit(event, self.call_id, at=at, **fields)
        self.record.events.append({"event": event, "at": at, **fields})
        metrics.observe_call_event(event, fields, self.record.direction)
        return at

    def _set_state(self, state: CallState) -> None:
        # DEBUG: logging was several per cent of the app's CPU under load, half of it these lines. At INFO:
        # the call's start, a channel's end for an unusual cause, and the written metadata (with the reason).
        log.debug("call event=state call_id=%s from=%s to=%s", self.call_id, self.state.value, state.value)
        self.state = state

    # --- the call ---------------------------------------------------------------------------------------

    async def run(self) -> None:
        """The call from start to teardown; every way out (return, hangup, error) ends in ``_end``."""
        try:
            await (self._resumed_steps() if self._resumed_from is not None else self._steps())
        except ChannelGone as exc:
            log.info("call event=channel_gone_during_step call_id=%s error=%s", self.call_id, exc)
            self.record.end_reason = self.record.end_reason or "hung_up"
        except AriError as exc:
            log.error(
                "call event=ari_error call_id=%s state=%s error=%s", self.call_id, self.state.value, exc
            )
            self.record.end_reason = self.record.end_reason or "error"
        except Exception:
            log.exception("call event=bug call_id=%s state=%s", self.call_id, self.state.value)
            self.record.end_reason = self.record.end_reason or "error"
            raise
        finally:
            await self._finish()

    async def _steps(self) -> None:
        """The inbound call, as the caller experiences it."""
        ari = self.deps.ari
        cfg = self.deps.cfg
        caller = self.caller.id
        self.emit(
            "started",
            direction=self.record.direction,
            caller={"number": self.record.caller_number, "name": self.record.caller_name},
            target=self.target,
        )
        notice_sound = cfg.announcement.sound
        listed = await self._apply_caller_rules()
        if listed is not None and listed.action == "strong_notice":
            notice_sound = cfg.policy.strong_notice_sound
        elif listed is not None and listed.action == "supervisor" and cfg.escalation.supervisors:
            self.target = self.record.target = cfg.escalation.supervisors[0]

        # ANSWERING: answer, then record from the first moment so the recording proves the notice.
        await ari.answer(caller)
        self._answered_wall = time.time()
        self.record.answered_at = _iso(self._answered_wall)
        await self._start_recording()

        if listed is not None and listed.action == "refuse":
            self.record.end_reason = "refused_listed_caller"
            await self.deps.notices.play(
                self, caller, cfg.policy.refused_sound, tag=f"{self.call_id}-refused"
            )
            return

        # NOTICE: once per call; a channel that already heard it (transfer) is not told again.
        self._set_state(CallState.NOTICE)
        if await self._notice_already_given():
            outcome = PlayOutcome.FINISHED
            self.record.notice_played = True
            self.emit("notice_played", sound=notice_sound, language=cfg.announcement.language, earlier=True)
        else:
            outcome = await self.deps.notices.play(self, caller, notice_sound, tag=f"{self.call_id}-notice")
        if outcome is PlayOutcome.HUNG_UP:
            self.record.end_reason = "caller_hungup_during_notice"
            return
        if outcome is PlayOutcome.FINISHED and not self.record.notice_played:
            self.record.notice_played = True
            self.emit("notice_played", sound=notice_sound, language=cfg.announcement.language)
            await self._quietly(ari.set_variable(caller, f"__{NOTICE_VAR}", "1"))
        else:
            log.error("call event=notice_failed call_id=%s", self.call_id)
            metrics.NOTICE_FAILURES.inc()

        # DIALLING: bridge first, so the caller hears the agent's early media.
        self._set_state(CallState.DIALLING)
        await ari.create_bridge(self.bridge_id, name=self.bridge_id)
        await ari.add_to_bridge(self.bridge_id, caller)
        if not await self._dial_agent():
            self.record.end_reason = self.record.end_reason or "agent_unavailable"
            if not self.channel_gone(caller):
                self.emit("agent_unavailable", target=self.target, reason=self.record.end_reason)
                await self.deps.notices.play(
                    self, caller, cfg.announcement.apology_sound, tag=f"{self.call_id}-apology"
                )
            return

        # TALKING: until either side hangs up; the agent's key sequences act on the call.
        self._set_state(CallState.TALKING)
        for name, value in self._talk_detect_variable().items():
            try:
                await ari.set_variable(caller, name, value)
            except AriError as exc:  # e.g. func_talkdetect.so not loaded: the call goes on undetected
                log.warning("call event=talk_detect_failed call_id=%s error=%s", self.call_id, exc)
        await self._start_media()
        await self._talk()

    async def _finish(self) -> None:
        """Teardown even when the call's task is cancelled (shutdown): metadata must be written."""
        await asyncio.shield(self._end())

    async def _notice_already_given(self) -> bool:
        """A channel that heard the notice earlier in this call (and came back, e.g. after a transfer)."""
        try:
            return await self.deps.ari.get_variable(self.caller.id, NOTICE_VAR) == "1"
        except AriError:
            return False

    async def _apply_caller_rules(self) -> ListedCaller | None:
        """Repeat callers are marked; a listed caller's entry decides routing, notice or refusal."""
        if self.deps.callers is None:
            return None
        try:
            check = await self.deps.callers.check(self.caller.caller_number)
        except Exception:  # a broken rule store must never stop a call
            log.exception("call event=caller_rules_failed call_id=%s", self.call_id)
            return None
        if check.is_repeat:
            if "repeat_caller" not in self.record.flags:
                self.record.flags.append("repeat_caller")
            self.record.repeat_count = check.repeat_count
            self.emit(
                "repeat_caller", count=check.repeat_count, window_days=self.deps.cfg.policy.repeat_window_days
            )
        if check.listed is not None:
            self.record.listed = {"action": check.listed.action, "reason": check.listed.reason}
            self.emit("caller_listed", action=check.listed.action)
        return check.listed

    async def _start_recording(self) -> None:
        try:
            self._paths = await self.deps.recorder.start(self.caller.name, self.call_id)
        except Exception as exc:
            self.record.recording_error = str(exc)[:200]
            log.error("call event=recording_failed call_id=%s error=%s", self.call_id, exc)
            self.emit("recording_failed", error=str(exc)[:200])
            return
        self.record.recording_started = True
        self.record.channels = self.deps.recorder.channels
        self.emit("recording_started")

    async def _dial_agent(self) -> bool:
        """Ring the target; True once it answered and sits in the bridge with the caller."""
        ari = self.deps.ari
        cfg = self.deps.cfg
        agent_id = f"{self.call_id}-agent"
        self.agent_id = agent_id
        if self.deps.claim_channel is not None:
            self.deps.claim_channel(agent_id, self)
        try:
            leg = await ari.create_channel(
                self.target,
                channel_id=agent_id,
                app_args=f"agent,{self.call_id}",
                originator=self.caller.id,
                variables={
                    "KASUHARA_CALL_ID": self.call_id,
                    "KASUHARA_ROLE": "agent",
                    **self._talk_detect_variable(),
                },
            )
        except ChannelGone:
            raise
        except AriError as exc:
            log.error(
                "call event=agent_create_failed call_id=%s target=%s error=%s", self.call_id, self.target, exc
            )
            self.record.end_reason = "agent_unreachable"
            return False
        await self.until_in_stasis(agent_id)
        await ari.add_to_bridge(self.bridge_id, agent_id, absorb_dtmf=True, role="agent")
        await self._quietly(ari.ring(self.caller.id))
        await self.repair_presented_id(self.caller)
        timeout = cfg.routing.dial_timeout_s
        await ari.dial(agent_id, caller=self.caller.id, timeout_s=timeout)
        self.emit("agent_ringing", target=self.target)
        # The dial status alone is not reliable: also watch the channel's end and keep our own timer.
        deadline = time.monotonic() + timeout + 3
        while not self.channel_up(agent_id):
            if self.channel_gone(self.caller.id):
                self.record.end_reason = "caller_hungup_while_ringing"
                return False
            if self.channel_gone(agent_id):
                self.record.end_reason = await self._why_unreachable(agent_id)
                self.record.agent = None
                return False
            if time.monotonic() > deadline:
                self.record.end_reason = "agent_no_answer"
                await self._quietly(ari.hangup(agent_id, "noanswer"))
                return False
            await self.next_event(timeout=max(0.0, deadline - time.monotonic()) + 0.01)
        self.record.agent = self.target
        if self.deps.care is not None:  # a queue behind the target: which member answered
            self.agent_member = await self.deps.care.identify_member(leg.name)
            self.record.agent = self.agent_member or self.target
        self.record.agent_answered_at = now_iso()
        self.emit("agent_answered", agent=self.record.agent)
        return True

    async def _why_unreachable(self, channel_id: str) -> str:
        """Why a dialled leg went away unanswered: its Dial status if Asterisk gave one, else its cause."""
        # The destruction event (with the cause) follows the hangup request closely: wait for it.
        deadline = time.monotonic() + 1.0
        while channel_id not in self._destroyed and time.monotonic() < deadline:
            await self.next_event(timeout=0.2)
        return _unreachable_reason(self._dialstatus.get(channel_id, ""), self._causes.get(channel_id, 0))

    def _talk_detect_variable(self) -> dict[str, str]:
        """``TALK_DETECT(set)`` for a leg (setting it calls the function: Asterisk's DSP watches the leg and
        sends ChannelTalkingStarted/Finished); nothing when detection is off."""
        det = self.deps.cfg.detection
        if det.mode == "off":
            return {}
        return {"TALK_DETECT(set)": f"{det.silence_ms},{det.talk_threshold}"}

    async def _talk(self) -> None:
        caller = self.caller.id
        agent = self.agent_id or ""
        agent_left = False
        while True:
            if self.channel_gone(caller):
                self.record.end_reason = self.record.end_reason or "caller_hungup"
                return
            if self.channel_gone(agent):
                supervisor = self.escalation.supervisor_joined
                if supervisor is None:
                    reason = "supervisor_hungup" if agent_left else "agent_hungup"
                    self.record.end_reason = self.record.end_reason or reason
                    return
                if not agent_left:
                    # A supervisor took over: the caller is not cut off because the agent left them.
                    agent_left = True
                    log.info("call event=agent_left call_id=%s supervisor=%s", self.call_id, supervisor)
                    self.emit("agent_left", supervisor=supervisor)
            if self._handover_asked and not self.escalation.in_progress:
                self._set_state(CallState.HANDED_OVER)
                return
            action = self.take_agent_action()
            if action is not None:
                ended = await self.escalation.handle(*action)
                if ended:
                    return
                continue
            await self._report_detections()
            if await self._apply_time_budget():
                return
            # Nothing to do until an event (a hangup, a key), the time budget's next step or a detection's.
            wait = self.budget.seconds_to_next(self.elapsed_s())
            due = self.talk.seconds_to_next(time.monotonic()) if self.talk is not None else None
            if due is not None:
                wait = due + 0.01 if wait is None else min(wait, due + 0.01)
            await self.next_event(timeout=wait)

    async def _apply_time_budget(self) -> bool:
        """The call's time budget (policy): a tone for the agent before it runs out, then, if enforced,
        the closing notice for both and the end of the call. True when it ended the call."""
        step = self.budget.step(self.elapsed_s())
        if step is BudgetStep.NONE:
            return False
        policy = self.deps.cfg.policy
        duration = round(self.elapsed_s(), 1)
        if step is BudgetStep.WARN:
            self.emit(
                "long_call", duration_s=duration, budget_s=policy.time_budget_s, mode=policy.time_budget_mode
            )
            if self.agent_id and not self.channel_gone(self.agent_id):
                await self.deps.notices.play(
                    self, self.agent_id, policy.long_call_sound, tag=f"{self.call_id}-long"
                )
            return False
        self.emit("time_limit", duration_s=duration, budget_s=policy.time_budget_s)
        parties = [p for p in (self.caller.id, self.agent_id, self.escalation.supervisor_leg) if p]
        await self.deps.notices.play_on_bridge(
            self,
            self.bridge_id,
            policy.time_limit_sound,
            tag=f"{self.call_id}-limit",
            parties=tuple(p for p in parties if not self.channel_gone(p)),
        )
        self.record.end_reason = "time_limit"
        await self._quietly(self.deps.ari.hangup(self.caller.id))
        return True

    def elapsed_s(self) -> float:
        """Seconds since the call was answered (what the time budget counts)."""
        return time.time() - self._answered_wall if self._answered_wall is not None else 0.0

    async def _quietly(self, aw: Awaitable[Any]) -> None:
        """An ARI call whose failure does not matter (the channel may be gone already)."""
        try:
            await aw
        except AriError as exc:
            log.debug("call event=ignored_ari_error call_id=%s error=%s", self.call_id, exc)

    async def _end(self) -> None:
        """The one teardown path: stop recording, hang up every leg, drop the bridge, write metadata.
        A call handed over to the next ``serve`` leaves all of that to it (unless the handover file
        cannot be written: then it ends here, as any other)."""
        if self.state is CallState.HANDED_OVER:
            # What only this process serves goes now: the audio stream to its socket (the next serve
            # starts its own) and a supervisor listening through it.
            await self._stop_media()
            if self._listen_task is not None and not self._listen_task.done():
                self._listen_task.cancel()
                await asyncio.gather(self._listen_task, return_exceptions=True)
            if await self._write_handover():
                return
        self._set_state(CallState.ENDING)
        ari = self.deps.ari
        try:
            if self.record.recording_started and not self.channel_gone(self.caller.id):
                try:
                    await self.deps.recorder.stop(self.caller.name, self.call_id)
                except Exception as exc:
                    log.warning("call event=stop_recording_failed call_id=%s error=%s", self.call_id, exc)
            await self._stop_media()
            for channel_id in [*self.escalation.channel_ids(), self.agent_id or "", self.caller.id]:
                if channel_id and not self.channel_gone(channel_id):
                    await self._quietly(ari.hangup(channel_id))
            await self._quietly(ari.destroy_bridge(self.bridge_id))
            await self._end_listening()
        finally:
            ended = self._ended_wall or time.time()
            self.record.ended_at = _iso(ended)
            if self._answered_wall is not None:
                self.record.duration_s = round(ended - self._answered_wall, 3)
            if self.talk is not None:
                self.record.talk = self.talk.totals(time.monotonic())
                for party, seconds in (self._talk_before or {}).items():  # before a handover
                    self.record.talk[party] = round(self.record.talk.get(party, 0.0) + seconds, 1)
            self.emit("ended", reason=self.record.end_reason or "normal", duration_s=self.record.duration_s)
            await self._write_metadata()
            if self.deps.care is not None:  # the agent's recovery pause, if the call asks for one
                await self.deps.care.call_ended(self.call_id, self.record.as_dict(), self.agent_member)
            self._set_state(CallState.ENDED)
            if self._resumed_from is not None and self.deps.recorder.paths(self.call_id).metadata.exists():
                self._resumed_from.unlink(missing_ok=True)

    async def _write_metadata(self) -> None:
        """Write the call's metadata; on a full (or failing) spool disk keep it here and try again until
        it is on disk: it carries the flags and the hold, which orphan adoption could not know."""
        paths = self.deps.recorder.paths(self.call_id)
        delay = METADATA_RETRY_FIRST_S
        attempt = 0
        while True:
            attempt += 1
            try:
                await asyncio.to_thread(write_json_atomic, paths.metadata, self.record.as_dict())
                break
            except OSError as exc:
                # Out of space passes (files get uploaded and removed): wait for it however long it takes.
                # Anything else (permissions, a missing directory) needs an operator: give up after a few.
                lasting = exc.errno not in (errno.ENOSPC, errno.EDQUOT)
                log.error(
                    "call event=metadata_write_failed call_id=%s error=%s attempt=%d retry_in_s=%s held=%s",
                    self.call_id,
                    exc.strerror or type(exc).__name__,
                    attempt,
                    "-" if lasting and attempt >= METADATA_OTHER_ERROR_ATTEMPTS else f"{delay:.1f}",
                    self.record.hold is not None,
                )
                if lasting and attempt >= METADATA_OTHER_ERROR_ATTEMPTS:
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, METADATA_RETRY_MAX_S)
        log.info(
            "call event=metadata_written call_id=%s reason=%s duration_s=%s path=%s",
            self.call_id,
            self.record.end_reason or "normal",
            self.record.duration_s,
            paths.metadata,
        )
        if self.deps.on_metadata is not None:
            try:
                await self.deps.on_metadata(self.call_id)
            except Exception:
                log.exception("call event=on_metadata_failed call_id=%s", self.call_id)

    # --- handover across a restart of ``serve`` ------------------------------------------------------------

    def ask_handover(self) -> None:
        """``serve`` is stopping to restart: once talking (and no supervisor is being rung), this call
        leaves its channels, bridge and recording as they are and writes what it knows for the next one."""
        self._handover_asked = True
        self.deliver({"type": _HANDOVER_EVENT})

    def handover_path(self) -> Path:
        paths = self.deps.recorder.paths(self.call_id)
        return paths.host_dir / f"{paths.call_id}{HANDOVER_SUFFIX}"

    async def _write_handover(self) -> bool:
        at = now_iso()
        record = self.record.as_dict()
        record["timeline"].append({"event": "handed_over", "at": at})
        doc = {
            "schema": HANDOVER_SCHEMA,
            "at": at,
            "record": record,
            "caller": {
                "id": self.caller.id,
                "name": self.caller.name,
                "number": self.caller.caller_number,
                "caller_name": self.caller.caller_name,
                "language": self.caller.language,
            },
            "agent_id": self.agent_id,
            "agent_member": self.agent_member,
            "bridge_id": self.bridge_id,
            "answered_at": self._answered_wall,
            "supervisor": self.escalation.handover_state(),
            "budget": {"warned": self.budget.warned, "ended": self.budget.ended},
            "talk": self.talk.totals(time.monotonic()) if self.talk is not None else None,
        }
        try:
            await asyncio.to_thread(write_json_atomic, self.handover_path(), doc)
        except OSError as exc:
            log.error("call event=handover_failed call_id=%s error=%s", self.call_id, exc.strerror or exc)
            return False
        self.emit("handed_over", at=at)
        log.info("call event=handed_over call_id=%s", self.call_id)
        return True

    def resume(self, doc: dict[str, Any], path: Path, gone: dict[str, str]) -> None:
        """Take over a call a previous ``serve`` handed over (``doc`` is its handover file; ``gone``: the
        call's channels that no longer exist, with why). Raises KeyError/TypeError/ValueError on a file
        that is not a handover."""
        if doc.get("schema") != HANDOVER_SCHEMA:
            raise ValueError(f"not a handover ({str(doc.get('schema'))[:40]!r})")
        record = CallRecord.from_dict(doc["record"])
        if safe_call_id(record.call_id) != self.call_id:
            raise ValueError("the handover names another call")
        self.record = record
        self.agent_id = str(doc["agent_id"]) if doc.get("agent_id") else None
        self.bridge_id = str(doc["bridge_id"])
        member = doc.get("agent_member")
        self.agent_member = member if isinstance(member, str) else None
        answered = doc.get("answered_at")
        self._answered_wall = float(answered) if isinstance(answered, int | float) else None
        budget = doc.get("budget") or {}
        self.budget.warned, self.budget.ended = bool(budget.get("warned")), bool(budget.get("ended"))
        talk = doc.get("talk")
        if isinstance(talk, dict):
            self._talk_before = {str(k): float(v) for k, v in talk.items() if isinstance(v, int | float)}
        self.escalation.resume(doc.get("supervisor") or {})
        if self.record.recording_started:
            self._paths = self.deps.recorder.paths(self.call_id)
        for channel_id in [self.caller.id, self.agent_id or "", *self.escalation.channel_ids()]:
            if channel_id:
                self._in_stasis.add(channel_id)
                self._up.add(channel_id)
        for channel_id, why in gone.items():
            self._gone[channel_id] = why
        self._resumed_from = path
        self._set_state(CallState.TALKING)

    async def _resumed_steps(self) -> None:
        """A call handed over by the previous ``serve``: it goes on talking (keys, budget, detection) and
        ends here as if it had always been ours."""
        self.emit(
            "resumed",
            direction=self.record.direction,
            caller={"number": self.record.caller_number, "name": self.record.caller_name},
            target=self.record.target,
            agent=self.record.agent,
            started_at=self.record.started_at,
            flags=list(self.record.flags),
            supervisor=self.escalation.supervisor_joined,
        )
        if self.channel_gone(self.caller.id) and self._paths is not None:
            # The caller left while no serve ran: the recording stopped then, its last write says when.
            with contextlib.suppress(OSError):
                self._ended_wall = (await asyncio.to_thread(self._paths.audio.stat)).st_mtime
        if self.channel_gone(self.caller.id) and (not self.agent_id or self.channel_gone(self.agent_id)):
            self.record.end_reason = self.record.end_reason or "ended_during_handover"
            return
        await self._start_media()  # the detectors start afresh here (the caller's baseline is learnt again)
        await self._talk()

    async def repair_presented_id(self, channel: Channel) -> None:
        """Make ``channel``'s caller ID safe before a leg is dialled "from" it (which copies it into the
        leg's From header). Dialling from the channel is kept: it also passes on inherited variables."""
        for name, value in repairs(channel.caller_name, channel.caller_number).items():
            log.warning(
                "call event=caller_id_repaired call_id=%s channel=%s field=%s", self.call_id, channel.id, name
            )
            await self._quietly(self.deps.ari.set_variable(channel.id, name, value))

    def leg_caller_id(self, kind: str, **extra: str) -> CallerId:
        """What the phone of a leg this call originates shows (``[callerid]`` templates)."""
        cfg = self.deps.cfg.callerid
        fields = {
            "agent": agent_label(self.record.agent or self.target),
            "caller_number": self.caller.caller_number,
            "caller_name": self.caller.caller_name,
            "call_id": self.call_id,
            **extra,
        }
        return render(getattr(cfg, f"{kind}_name"), getattr(cfg, f"{kind}_number"), fields)

    def add_escalation(self, entry: Escalation) -> None:
        self.record.escalations.append(entry)
        metrics.observe_escalation(entry.action, entry.result)
