"""The legacy entry: ``AGI(agi://HOST:4573/kasuhara)`` for dialplans that cannot hand calls to Stasis.

One call, as the caller experiences it:

``answering``    the AGI answers and starts MixMonitor on the caller's channel — through AMI with the
                 Stasis flow's :class:`~kasuhara_ari.recording.Recorder` (same file, same ``.done``
                 completion marker); if AMI is away, the same MixMonitor through the AGI session itself.
                 Recording starts before the notice, so the recording proves the notice was given.
``notice``       the notice in ``announcement.language``, once per call: a channel that carries
                 ``KASUHARA_NOTICE_PLAYED`` (inherited from a leg that heard it) is not told again.
``in_dialplan``  the AGI session ends and the dialplan goes on (it dials the agent). From here on, AMI
                 events of the caller's channel tell the rest: ``DialBegin``/``DialEnd`` who was rung and
                 who answered, ``Hangup`` when the call ended.
``ended``        ``<call_id>.json`` (``kasuhara.recording/1``) is written into the spool and the uploader
                 told; the audio follows MixMonitor's ``.done`` marker as for Stasis calls.

The end of a call is AMI's ``Hangup`` event of the caller's channel: Asterisk raises it exactly once per
channel whoever ends the call (the caller's BYE, the dialplan's ``Hangup()`` after the agent left, a
channel driver failure) and it carries the Q.850 cause. ``HangupRequest`` is only raised for hangups
queued from outside (the caller's side) and can repeat, so it only tells *who* ended the call.

A call between its AGI session and its hangup is kept on disk (``<spool>/.agi-pending/<call_id>.json``,
a directory the uploader never looks into), so a restart of ``kasuhara agi`` loses nothing: pending calls
are reloaded, and every ``reconcile_interval_s`` (and whenever AMI (re)connects, because events sent
while it was away are lost) a call whose channel no longer exists is finished with an end time estimated
from the recording's files. If the service never comes back, the uploader's orphan handling still
uploads the audio.

Untrusted input: whoever can reach the port can speak FastAGI, so a session's word is not Asterisk's.
Before the flow answers, records or writes anything it proves through AMI that a real channel runs the
session: it sets a random value on "its" channel through the session (``SET VARIABLE``) and reads it back
through AMI (``Getvar``); only the session Asterisk itself runs on that channel can make them agree. The
uniqueid must be the channel's, and the call id (linkedid) and caller number/name are taken from AMI, not
from the environment. A call id that already has a recording (spool, pending record or a live call) is
refused. While AMI is away nothing can be proved: the notice is still played and MixMonitor started
through the session itself (it can only touch the session's own channel, never one named by the client);
the metadata then says ``channel_verified: false``. The caller's number and name are cleaned
(:mod:`kasuhara_ari.safe`); the call id passes :func:`~kasuhara_ari.safe.safe_call_id`; nothing from the
environment reaches a path, key, command or topic unchecked.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from . import metrics
from .agi_server import (
    AgiCommandError,
    AgiError,
    AgiHangup,
    AgiLimits,
    AgiServer,
    AgiSession,
    LogThrottle,
    parse_peers,
)
from .ami import AmiClient, AmiError, AmiTimeout
from .config import Config, ConfigError
from .events import EventSink, now_iso
from .recording import MIXMONITOR_ID_VAR, CallRecord, Recorder, write_json_atomic
from .safe import (
    clean_caller_name,
    clean_caller_number,
    clean_caller_text,
    clean_log_value,
    is_safe_call_id,
    safe_call_id,
)
from .service import Runtime

log = logging.getLogger(__name__)

#: The script name in ``agi://HOST:PORT/kasuhara``.
SCRIPT = "kasuhara"
PENDING_DIR = ".agi-pending"
PENDING_SCHEMA = "kasuhara.agi-pending/1"
NOTICE_PLAYED_VAR = "KASUHARA_NOTICE_PLAYED"
CALL_ID_VAR = "KASUHARA_CALL_ID"
#: Set through the session, read back through AMI: proves a real channel runs the session.
PROOF_VAR = "KASUHARA_AGI_PROOF"
#: Asterisk channel names: printable ASCII without spaces (``PJSIP/caller-0000002a``, ``Local/1@ctx-…;1``).
_CHANNEL_RE = re.compile(r"[\x21-\x7e]{1,256}")
_SOUND_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]{0,200}")
_LANGUAGE_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
AMI_EVENTS = ("Hangup", "HangupRequest", "DialBegin", "DialEnd")

_DIAL_END_REASONS = {
    "BUSY": "agent_busy",
    "NOANSWER": "agent_no_answer",
    "CHANUNAVAIL": "agent_unavailable",
    "CONGESTION": "agent_unavailable",
    "CANCEL": "caller_hungup_while_ringing",
}


class LegacyState(enum.Enum):
    ANSWERING = "answering"
    NOTICE = "notice"
    IN_DIALPLAN = "in_dialplan"
    ENDED = "ended"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def agi_sound(sound: str) -> str:
    """``announcement.sound`` as an AGI ``STREAM FILE`` argument (a plain file name, no ``sound:``)."""
    name = sound.removeprefix("sound:")
    if not _SOUND_RE.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"announcement.sound: {sound!r} cannot be played through AGI "
            "(a sound name of letters, digits, _ . / - is needed)"
        )
    return name


@dataclass
class HangupInfo:
    at: float
    cause: int = 0
    cause_txt: str = ""
    #: ``ami`` (the Hangup event) or ``estimated`` (the channel was found gone later).
    source: str = "ami"


@dataclass
class LegacyCall:
    """One call that came through the AGI, from its session to its hangup."""

    call_id: str
    channel: str
    uniqueid: str
    record: CallRecord
    state: LegacyState = LegacyState.ANSWERING
    answered_wall: float | None = None
    session_open: bool = True
    #: The dialplan named the target (``AGI(agi://…/kasuhara,TARGET)``); else the first Dial's string.
    target_given: bool = False
    notice_skipped: str = ""
    caller_hangup_requested: bool = False
    dial_status: str = ""
    #: Dialled channels' uniqueids → the dial string with technology (``PJSIP/agent/sip:…``).
    dialled: dict[str, str] = field(default_factory=dict)
    hangup: HangupInfo | None = None
    #: AMI confirmed the channel, its uniqueid and linkedid (False: AMI was away, the session's word).
    verified: bool = True
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False, compare=False)

    def to_pending(self) -> dict[str, Any]:
        return {
            "schema": PENDING_SCHEMA,
            "call_id": self.call_id,
            "channel": self.channel,
            "uniqueid": self.uniqueid,
            "state": self.state.value,
            "answered_wall": self.answered_wall,
            "target_given": self.target_given,
            "notice_skipped": self.notice_skipped,
            "caller_hangup_requested": self.caller_hangup_requested,
            "dial_status": self.dial_status,
            "dialled": dict(self.dialled),
            "verified": self.verified,
            "record": dataclasses.asdict(self.record),
        }

    @classmethod
    def from_pending(cls, doc: Mapping[str, Any]) -> LegacyCall:
        """Rebuild a call written by :meth:`to_pending` (ValueError/KeyError/TypeError if unusable)."""
        if doc.get("schema") != PENDING_SCHEMA:
            raise ValueError(f"not a {PENDING_SCHEMA} document")
        call_id = safe_call_id(doc["call_id"])
        uniqueid = safe_call_id(doc["uniqueid"])
        channel = str(doc["channel"])
        if not _CHANNEL_RE.fullmatch(channel):
            raise ValueError("unusable channel name")
        raw = doc["record"]
        names = {f.name for f in dataclasses.fields(CallRecord)} - {"escalations"}
        record = CallRecord(**{k: v for k, v in raw.items() if k in names})
        if record.call_id != call_id:
            raise ValueError("call_id of the record does not match")
        answered = doc.get("answered_wall")
        return cls(
            call_id=call_id,
            channel=channel,
            uniqueid=uniqueid,
            record=record,
            state=LegacyState(doc.get("state", LegacyState.IN_DIALPLAN.value)),
            answered_wall=float(answered) if answered is not None else None,
            session_open=False,
            target_given=bool(doc.get("target_given")),
            notice_skipped=str(doc.get("notice_skipped") or ""),
            caller_hangup_requested=bool(doc.get("caller_hangup_requested")),
            dial_status=str(doc.get("dial_status") or ""),
            dialled={str(k): str(v) for k, v in (doc.get("dialled") or {}).items()},
            # Written before the channel was checked through AMI: nothing was verified.
            verified=doc.get("verified") is True,
        )

    def end_reason(self) -> str:
        """Why the call ended, from what AMI told (a reason set during the AGI session wins)."""
        if self.record.end_reason:
            return self.record.end_reason
        if self.hangup is not None and self.hangup.source != "ami":
            return "ended_while_not_watched"
        if self.dial_status == "ANSWER":
            return "caller_hungup" if self.caller_hangup_requested else "agent_hungup"
        if self.dial_status in _DIAL_END_REASONS:
            return _DIAL_END_REASONS[self.dial_status]
        return "caller_hungup" if self.caller_hangup_requested else "hangup"

    def metadata(self) -> dict[str, Any]:
        doc = self.record.as_dict()
        doc["entry"] = "agi"
        doc["channel"] = self.channel
        doc["channel_verified"] = self.verified
        if self.notice_skipped:
            doc["notice_skipped"] = self.notice_skipped
        if self.hangup is not None:
            doc["ended_at_source"] = self.hangup.source
            doc["hangup_cause"] = {"code": self.hangup.cause, "text": self.hangup.cause_txt}
        return doc


class PendingCalls:
    """Calls between their AGI session and their hangup, one JSON file each. Blocking (use threads)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, call_id: str) -> Path:
        return self.directory / f"{safe_call_id(call_id)}.json"

    def save(self, doc: dict[str, Any]) -> None:
        write_json_atomic(self.path(doc["call_id"]), doc)

    def remove(self, call_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(call_id).unlink()

    def load(self) -> list[LegacyCall]:
        calls: list[LegacyCall] = []
        try:
            entries = sorted(self.directory.iterdir())
        except FileNotFoundError:
            return calls
        for path in entries:
            if path.suffix != ".json" or not is_safe_call_id(path.stem):
                continue
            try:
                calls.append(LegacyCall.from_pending(json.loads(path.read_bytes())))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("agi event=pending_unreadable file=%s error=%s", path.name, clean_log_value(exc))
        return calls


class AmiLink(Protocol):
    """What the AGI flow needs from AMI (AmiClient; a fake in unit tests)."""

    @property
    def ready(self) -> bool: ...

    def on_event(self, pattern: str, callback: Callable[[Any, Any], Any]) -> None: ...

    async def action(self, fields: Mapping[str, str], *, timeout: float | None = None) -> dict[str, str]: ...


def _event_time(fields: Mapping[str, str], received: float) -> float:
    """AMI's ``Timestamp`` (``timestampevents = yes``) if plausible, else when we received the event."""
    try:
        ts = float(fields.get("Timestamp", ""))
    except ValueError:
        return received
    return ts if abs(ts - received) < 3600 else received


def _field(message: Any, name: str) -> str:
    value = message.get(name) if hasattr(message, "get") else None
    return "" if value is None else str(value)


class CallEndWatch:
    """Keeps every call that left its AGI session until its channel has ended, then writes its metadata.

    AMI callbacks only queue events; :meth:`run` (one task) applies them, reconciles with Asterisk and
    finishes calls, so a call's facts are only ever changed in one place at a time.
    """

    def __init__(
        self,
        cfg: Config,
        ami: AmiLink,
        recorder: Recorder,
        events: EventSink,
        pending: PendingCalls,
        *,
        on_metadata: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.ami = ami
        self.recorder = recorder
        self.events = events
        self.pending = pending
        self.on_metadata = on_metadata
        self.reconcile_interval_s = cfg.agi.reconcile_interval_s
        self.calls: dict[str, LegacyCall] = {}  # by the caller channel's uniqueid
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._attached = False
        self.finished = 0
        self.restored = asyncio.Event()

    # --- what the AGI flow calls ------------------------------------------------------------------

    def attach(self) -> None:
        if not self._attached:
            for name in AMI_EVENTS:
                self.ami.on_event(name, self._on_ami_event)
            self._attached = True

    def by_uniqueid(self, uniqueid: str) -> LegacyCall | None:
        return self.calls.get(uniqueid)

    def has_call_id(self, call_id: str) -> bool:
        return any(c.call_id == call_id for c in self.calls.values())

    async def add(self, call: LegacyCall) -> None:
        self.calls[call.uniqueid] = call
        await self.persist(call)

    async def persist(self, call: LegacyCall) -> None:
        """Write the call's pending record (a failure is logged: the call itself goes on)."""
        async with call.lock:
            if call.state is LegacyState.ENDED:
                return
            try:
                await asyncio.to_thread(self.pending.save, call.to_pending())
            except OSError as exc:
                log.error("agi event=pending_write_failed call_id=%s error=%s", call.call_id, exc)

    def emit(self, call: LegacyCall, event: str, **fields: Any) -> None:
        """An event to MQTT and into the call's own timeline (exported with the evidence)."""
        self.events.emit(event, call.call_id, **fields)
        call.record.events.append({"event": event, "at": now_iso(), **fields})
        metrics.observe_call_event(event, fields, call.record.direction)

    def session_ended(self, call: LegacyCall) -> None:
        call.session_open = False
        if call.state is not LegacyState.ENDED:
            call.state = LegacyState.IN_DIALPLAN
        self._queue.put_nowait(("session_ended", call))

    # --- AMI ----------------------------------------------------------------------------------------

    def _on_ami_event(self, _manager: Any, message: Any) -> None:
        # Called inside panoramisk's reader: only queue what concerns our calls, never block.
        uniqueid = _field(message, "Uniqueid")
        if uniqueid in self.calls:
            fields = {str(k): str(v) for k, v in dict(message).items()}
            self._queue.put_nowait(("ami", (fields, time.time())))

    def _apply(self, call: LegacyCall, fields: Mapping[str, str], received: float) -> bool:
        """Absorb one AMI event into its call; True if the call's channel has ended."""
        name = fields.get("Event", "")
        if name == "HangupRequest":
            call.caller_hangup_requested = True
        elif name == "DialBegin":
            self._dial_begin(call, fields)
        elif name == "DialEnd":
            self._dial_end(call, fields, received)
        elif name == "Hangup":
            try:
                cause = int(fields.get("Cause", "0") or 0)
            except ValueError:
                cause = 0
            call.hangup = HangupInfo(
                at=_event_time(fields, received),
                cause=cause,
                cause_txt=clean_caller_text(fields.get("Cause-txt", ""), max_chars=64) or "",
            )
            return True
        return False

    def _dial_begin(self, call: LegacyCall, fields: Mapping[str, str]) -> None:
        dest = fields.get("DestChannel", "")
        tech = dest.split("/", 1)[0] if "/" in dest else ""
        dial = fields.get("DialString", "")
        dialled = clean_caller_text(f"{tech}/{dial}" if tech and dial else dest or dial) or ""
        if not call.dialled and not call.target_given:
            call.record.target = dialled
        call.dialled[fields.get("DestUniqueid", "")] = dialled
        self.emit(call, "agent_ringing", target=dialled)

    def _dial_end(self, call: LegacyCall, fields: Mapping[str, str], received: float) -> None:
        status = fields.get("DialStatus", "")
        if status == "ANSWER":
            agent = call.dialled.get(fields.get("DestUniqueid", ""), "") or clean_caller_text(
                fields.get("DestChannel", "")
            )
            call.record.agent = agent
            call.record.agent_answered_at = _iso(_event_time(fields, received))
            self.emit(call, "agent_answered", agent=agent)
        if status and (call.dial_status != "ANSWER"):
            call.dial_status = status

    # --- the watch's task ---------------------------------------------------------------------------

    async def restore(self) -> None:
        """Reload the calls a previous run left pending (before AMI connects, so no event is missed)."""
        if self.restored.is_set():
            return
        self.attach()
        for call in await asyncio.to_thread(self.pending.load):
            self.calls.setdefault(call.uniqueid, call)
        if self.calls:
            log.info("agi event=restored calls=%d (finished once their channel is gone)", len(self.calls))
        self.restored.set()

    async def run(self) -> None:
        """Apply AMI events, reconcile with Asterisk and finish calls until cancelled."""
        await self.restore()
        was_ready: bool | None = None
        next_reconcile = 0.0
        while True:
            item: tuple[str, Any] | None = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):  # wakes up to notice AMI coming and going
                    item = await self._queue.get()
            if item is not None:
                await self._handle(item)
            await self._handle_queued()
            ready = self.ami.ready
            if ready != was_ready:
                if ready:
                    log.info("agi event=ami_connected")
                    next_reconcile = 0.0  # events sent while AMI was away are lost: look now
                elif was_ready is not None or self.calls:
                    log.warning("agi event=ami_not_connected (call ends are learnt when it is back)")
                was_ready = ready
            if ready and time.monotonic() >= next_reconcile:
                await self.reconcile()
                next_reconcile = time.monotonic() + self.reconcile_interval_s

    async def _handle_queued(self) -> None:
        while not self._queue.empty():
            await self._handle(self._queue.get_nowait())

    async def _handle(self, item: tuple[str, Any]) -> None:
        kind, payload = item
        if kind == "ami":
            fields, received = payload
            call = self.calls.get(fields.get("Uniqueid", ""))
            if call is None:
                return
            if self._apply(call, fields, received):
                if not call.session_open:
                    await self.finish(call)
            elif fields.get("Event") in ("DialBegin", "DialEnd"):
                await self.persist(call)  # who was rung and answered survives a restart
        elif kind == "session_ended":
            call = payload
            if call.hangup is not None:
                await self.finish(call)
            else:
                await self.persist(call)

    async def reconcile(self) -> None:
        """Finish calls whose channel Asterisk no longer has (their Hangup event was missed)."""
        gone: list[LegacyCall] = []
        for call in list(self.calls.values()):
            if call.session_open:
                continue
            if call.hangup is not None:
                gone.append(call)  # a metadata write failed before: try again
                continue
            try:
                resp = await self.ami.action(
                    {"Action": "Getvar", "Channel": call.uniqueid, "Variable": "UNIQUEID"}
                )
            except AmiError as exc:
                if "no such channel" not in str(exc).lower():
                    log.debug("agi event=reconcile_skipped call_id=%s error=%s", call.call_id, exc)
                    continue
            else:
                if resp.get("Value") == call.uniqueid:
                    continue
            gone.append(call)
        if not gone:
            return
        await self._handle_queued()  # a Hangup that arrived meanwhile is better than an estimate
        for call in gone:
            if call.uniqueid not in self.calls:
                continue
            if call.hangup is None:
                call.hangup = HangupInfo(
                    at=await asyncio.to_thread(self._estimated_end, call), source="estimated"
                )
                log.warning("agi event=end_missed call_id=%s (end time estimated)", call.call_id)
            await self.finish(call)

    def _estimated_end(self, call: LegacyCall) -> float:
        """When a call whose Hangup we missed ended: MixMonitor's marker or audio was last touched then."""
        paths = self.recorder.paths(call.call_id)
        for path in (paths.marker, paths.audio):
            with contextlib.suppress(OSError):
                return path.stat().st_mtime
        return time.time()

    async def finish(self, call: LegacyCall) -> None:
        """Write the call's metadata into the spool, drop its pending record, tell the uploader."""
        hangup = call.hangup
        assert hangup is not None
        record = call.record
        record.ended_at = _iso(hangup.at)
        if call.answered_wall is not None:
            record.duration_s = round(max(0.0, hangup.at - call.answered_wall), 3)
        reason = call.end_reason()
        if call.state is not LegacyState.ENDED and not any(e.get("event") == "ended" for e in record.events):
            self.emit(call, "ended", reason=reason, duration_s=record.duration_s)
        record.end_reason = reason
        paths = self.recorder.paths(call.call_id)
        async with call.lock:
            try:
                await asyncio.to_thread(write_json_atomic, paths.metadata, call.metadata())
            except OSError as exc:
                log.error("agi event=metadata_write_failed call_id=%s error=%s (retried)", call.call_id, exc)
                return
            call.state = LegacyState.ENDED
            self.calls.pop(call.uniqueid, None)
            try:
                await asyncio.to_thread(self.pending.remove, call.call_id)
            except OSError as exc:
                log.error("agi event=pending_remove_failed call_id=%s error=%s", call.call_id, exc)
        self.finished += 1
        log.info(
            "agi event=call_ended call_id=%s reason=%s duration_s=%s ended_at_source=%s",
            call.call_id,
            reason,
            record.duration_s,
            hangup.source,
        )
        if self.on_metadata is not None:
            try:
                await self.on_metadata(call.call_id)
            except Exception:
                log.exception("agi event=on_metadata_failed call_id=%s", call.call_id)


class Refused(Exception):
    """The session is not handled: ``reason`` is a fixed word for the log, never the client's text."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ChannelFacts:
    """What Asterisk (AMI) says about the channel a session runs on."""

    linkedid: str
    caller_number: str
    caller_name: str


class AgiCallFlow:
    """The AGI session of one call: prove the channel, answer, record, notice, hand back to the dialplan."""

    def __init__(self, cfg: Config, recorder: Recorder, watch: CallEndWatch) -> None:
        self.cfg = cfg
        self.recorder = recorder
        self.watch = watch
        self.sound = agi_sound(cfg.announcement.sound)
        self.language = cfg.announcement.language
        self.command_timeout_s = cfg.agi.command_timeout_s
        self.notice_timeout_s = cfg.agi.notice_timeout_s
        #: Call ids chosen by sessions that are not in the watch yet (two legs of a call at once).
        self._claimed: set[str] = set()
        self._refused_log = LogThrottle(1.0)
        self.refused: dict[str, int] = {}

    async def __call__(self, session: AgiSession) -> None:
        env = session.env
        script = env.get("agi_network_script", "")
        if script != SCRIPT:
            self._refuse(session, "unknown_script", script=script)
            return
        uniqueid = env.get("agi_uniqueid", "")
        channel = env.get("agi_channel", "")
        if not is_safe_call_id(uniqueid) or not _CHANNEL_RE.fullmatch(channel):
            self._refuse(session, "bad_channel", uniqueid=uniqueid, channel=channel)
            return
        if self.watch.by_uniqueid(uniqueid) is not None:
            # The same channel ran the AGI again (a loop in the dialplan): already recorded and told.
            log.info("agi event=already_handled uniqueid=%s", uniqueid)
            return
        call_id = ""
        try:
            claimed = (await session.command("GET VARIABLE CHANNEL(linkedid)")).data or ""
            facts = await self._verify(session, channel, uniqueid, claimed)
            if facts is not None:
                session.vouched()
            call_id = await self._claim_call_id(
                facts.linkedid if facts else claimed, uniqueid, facts is not None
            )
        except Refused as exc:
            self._refuse(session, exc.reason, uniqueid=uniqueid, channel=channel)
            return
        try:
            await self._handle(session, env, call_id, channel, uniqueid, facts)
        finally:
            self._claimed.discard(call_id)

    def _refuse(self, session: AgiSession, reason: str, **claimed: str) -> None:
        """One log line per refusal (throttled under a flood), the client's text escaped and capped."""
        self.refused[reason] = self.refused.get(reason, 0) + 1
        held = self._refused_log.allow()
        if held is not None:
            log.error(
                "agi event=refused reason=%s peer=%s %s suppressed=%d",
                reason,
                clean_log_value(session.peer),
                " ".join(f"{k}={clean_log_value(v)}" for k, v in claimed.items()),
                held,
            )

    async def _getvar(self, channel: str, variable: str) -> str:
        resp = await self.watch.ami.action({"Action": "Getvar", "Channel": channel, "Variable": variable})
        return resp.get("Value", "")

    async def _verify(
        self, session: AgiSession, channel: str, uniqueid: str, claimed_linkedid: str
    ) -> ChannelFacts | None:
        """Prove through AMI that Asterisk runs this session on ``channel``; None if AMI cannot tell.

        The proof: a random value set through the session must be what AMI reads on the channel. A
        client that merely names a live channel answers ``SET VARIABLE`` itself, and the channel never
        gets the value. Raises :class:`Refused` if the proof or any claim fails.
        """
        if not self.watch.ami.ready:
            log.warning("agi event=unverified uniqueid=%s reason=ami_not_connected", uniqueid)
            return None
        token = secrets.token_hex(16)
        await session.command(f"SET VARIABLE {PROOF_VAR} {token}")
        try:
            if await self._getvar(channel, PROOF_VAR) != token:
                raise Refused("channel_not_proved")
            actual_uid, linkedid, number, name = await asyncio.gather(
                self._getvar(channel, "UNIQUEID"),
                self._getvar(channel, "CHANNEL(linkedid)"),
                self._getvar(channel, "CALLERID(num)"),
                self._getvar(channel, "CALLERID(name)"),
            )
        except AmiTimeout:
            log.warning("agi event=unverified uniqueid=%s reason=ami_timeout", uniqueid)
            return None
        except AmiError as exc:
            if "no such channel" in str(exc).lower():
                raise Refused("no_such_channel") from None
            log.warning("agi event=unverified uniqueid=%s reason=ami_error", uniqueid)
            return None
        if actual_uid != uniqueid:
            raise Refused("uniqueid_mismatch")
        if claimed_linkedid != linkedid:
            raise Refused("linkedid_mismatch")
        return ChannelFacts(linkedid=linkedid, caller_number=number, caller_name=name)

    async def _claim_call_id(self, linkedid: str, uniqueid: str, verified: bool) -> str:
        """The call's id: the linkedid of the channel (the call's first channel) if it is safe, else its
        uniqueid. No session ever records or writes metadata under an id that already has a recording,
        pending record or live call. A verified channel whose id is taken (a second channel of a call we
        already have; a uniqueid Asterisk repeated after a restart) gets ``<id>-<uniqueid>`` as in the
        Stasis flow, or is refused if that is taken too; an unverified session's taken id is refused."""
        call_id = linkedid if is_safe_call_id(linkedid) else uniqueid
        if not await self._claim(call_id):
            if not verified:
                raise Refused("call_id_taken")
            call_id = safe_call_id(f"{call_id}-{uniqueid}"[:128])
            if not await self._claim(call_id):
                raise Refused("call_id_taken")
        return call_id

    async def _claim(self, call_id: str) -> bool:
        if call_id in self._claimed or self.watch.has_call_id(call_id):
            return False
        self._claimed.add(call_id)  # before the await: a concurrent session sees it
        if await asyncio.to_thread(self._in_spool, call_id):
            self._claimed.discard(call_id)
            return False
        return True

    async def _handle(
        self,
        session: AgiSession,
        env: Mapping[str, str],
        call_id: str,
        channel: str,
        uniqueid: str,
        facts: ChannelFacts | None,
    ) -> None:
        target = env.get("agi_arg_1", "")
        if facts is not None:
            raw_number, raw_name = facts.caller_number, facts.caller_name
            # Asterisk writes "unknown" into the environment where the channel has no caller ID.
            claimed = tuple(
                "" if env.get(k, "") == "unknown" else env.get(k, "")
                for k in ("agi_callerid", "agi_calleridname")
            )
            if (raw_number, raw_name) != claimed:
                log.warning("agi event=caller_id_differs call_id=%s (Asterisk's, from AMI, is kept)", call_id)
        else:
            raw_number, raw_name = env.get("agi_callerid", ""), env.get("agi_calleridname", "")
        call = LegacyCall(
            call_id=call_id,
            channel=channel,
            uniqueid=uniqueid,
            target_given=bool(target),
            verified=facts is not None,
            record=CallRecord(
                call_id=call_id,
                direction="inbound",
                caller_number=clean_caller_number(raw_number) or "",
                caller_name=clean_caller_name(raw_name) or "",
                target=clean_caller_text(target or env.get("agi_extension", "")) or "",
                started_at=now_iso(),
            ),
        )
        log.info("agi event=call_started call_id=%s channel=%s verified=%s", call_id, channel, call.verified)
        await self.watch.add(call)  # on disk before anything happens to the caller
        try:
            await self._run(session, call)
        except AgiHangup:
            where = "notice" if call.state is LegacyState.NOTICE else "agi"
            call.record.end_reason = f"caller_hungup_during_{where}"
            log.info("agi event=caller_hungup call_id=%s state=%s", call_id, call.state.value)
        except AgiError as exc:
            log.warning(
                "agi event=session_broken call_id=%s state=%s error=%s",
                call_id,
                call.state.value,
                clean_log_value(f"{type(exc).__name__}: {exc}", max_chars=120),
            )
        finally:
            self.watch.session_ended(call)

    def _in_spool(self, call_id: str) -> bool:
        paths = self.recorder.paths(call_id)
        return (
            paths.audio.exists()
            or paths.metadata.exists()
            or paths.marker.exists()
            or self.watch.pending.path(call_id).exists()
        )

    async def _run(self, session: AgiSession, call: LegacyCall) -> None:
        w = self.watch
        w.emit(
            call,
            "started",
            direction=call.record.direction,
            caller={"number": call.record.caller_number, "name": call.record.caller_name},
            target=call.record.target,
            entry="agi",
        )
        # ANSWERING: answer, then record from the first moment so the recording proves the notice.
        answered = await session.command("ANSWER")
        if answered.result != 0:
            await self._still_there(session)
            raise AgiCommandError("ANSWER failed")
        call.answered_wall = time.time()
        call.record.answered_at = _iso(call.answered_wall)
        told_before = (await session.command(f"GET VARIABLE {NOTICE_PLAYED_VAR}")).data == "1"
        await self._start_recording(session, call)
        await session.command(f"SET VARIABLE __{CALL_ID_VAR} {call.call_id}")
        await w.persist(call)

        # NOTICE: once per call; a channel that already heard it (transfer) is not told again.
        call.state = LegacyState.NOTICE
        if told_before:
            call.notice_skipped = "already_played"
            log.info("agi event=notice_skipped call_id=%s reason=already_played", call.call_id)
        else:
            await self._play_notice(session, call)
        await w.persist(call)
        # IN_DIALPLAN: returning (closing the session) lets the dialplan dial the agent.

    async def _still_there(self, session: AgiSession) -> None:
        """Raise :class:`AgiHangup` if the channel has hung up (``CHANNEL STATUS`` is refused then)."""
        await session.command("CHANNEL STATUS")

    async def _start_recording(self, session: AgiSession, call: LegacyCall) -> None:
        via = "ami"
        error = ""
        try:
            if not call.verified:
                # AMI acts on a channel by name: only on one proved to be this session's.
                raise AmiError("channel not verified through AMI")
            await self.recorder.start(call.channel, call.call_id)
            started = True
        except Exception as exc:  # AMI away, refused, or timed out: the AGI session can still start it
            error = str(exc)[:200]
            log.warning(
                "agi event=mixmonitor_via_ami_failed call_id=%s error=%s (trying through AGI)",
                call.call_id,
                clean_log_value(exc, max_chars=200),
            )
            # A timed-out AMI action may still have started it: never start a second MixMonitor.
            started = await self._mixmonitor_running(session)
            if not started:
                via = "agi"
                paths = self.recorder.paths(call.call_id)
                # The same file, option and completion (if any) as Recorder.start (both directory and id
                # are restricted to shell- and argument-safe characters).
                command = self.recorder.completion_command(paths)
                await session.command(
                    f'EXEC MixMonitor "{paths.asterisk_audio},{self.recorder.options}'
                    + (f',{command}"' if command else '"')
                )
                started = await self._mixmonitor_running(session)
        if started:
            call.record.recording_started = True
            call.record.channels = self.recorder.channels
            self.watch.emit(call, "recording_started", via=via)
            log.info("agi event=recording_started call_id=%s via=%s", call.call_id, via)
        else:
            call.record.recording_error = error or "MixMonitor did not start"
            self.watch.emit(call, "recording_failed", error=call.record.recording_error)
            log.error("agi event=recording_failed call_id=%s", call.call_id)

    async def _mixmonitor_running(self, session: AgiSession) -> bool:
        return bool((await session.command(f"GET VARIABLE {MIXMONITOR_ID_VAR}")).data)

    async def _play_notice(self, session: AgiSession, call: LegacyCall) -> None:
        previous = (await session.command("GET VARIABLE CHANNEL(language)")).data or ""
        switch = previous != self.language
        if switch:
            await session.command(f"SET VARIABLE CHANNEL(language) {self.language}")
        # How long the caller waited from the connection to the notice (scripts/bench_agi_trust.py).
        log.debug(
            "agi event=notice_starting call_id=%s setup_ms=%.1f",
            call.call_id,
            (time.monotonic() - session.accepted_at) * 1000,
        )
        played = await session.command(f'STREAM FILE {self.sound} ""', timeout=self.notice_timeout_s)
        if played.result == -1:
            # -1 is both "hung up" and "could not play": only a live channel answers CHANNEL STATUS.
            await self._still_there(session)
            log.error("agi event=notice_failed call_id=%s sound=%s", call.call_id, self.sound)
            metrics.NOTICE_FAILURES.inc()
            call.notice_skipped = "failed"
        else:
            call.record.notice_played = True
            self.watch.emit(call, "notice_played", sound=self.sound, language=self.language)
            await session.command(f"SET VARIABLE __{NOTICE_PLAYED_VAR} 1")
        if switch and _LANGUAGE_RE.fullmatch(previous):
            await session.command(f"SET VARIABLE CHANNEL(language) {previous}")


def agi_limits(cfg: Config) -> AgiLimits:
    try:
        return AgiLimits(
            max_sessions=cfg.agi.max_sessions,
            max_sessions_per_peer=cfg.agi.max_sessions_per_peer,
            max_env_bytes=cfg.agi.max_env_bytes,
            allowed_peers=parse_peers(cfg.agi.allowed_peers),
            max_line_bytes=cfg.agi.max_line_bytes,
            env_timeout_s=cfg.agi.env_timeout_s,
            command_timeout_s=cfg.agi.command_timeout_s,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


class AgiService(Runtime):
    """Everything ``kasuhara agi`` runs, owned by one TaskGroup: the FastAGI server, the call-end watch
    (AMI), the uploader and the event publisher. Tests run it in-process with their own sinks."""

    def __init__(
        self,
        cfg: Config,
        *,
        events: EventSink | None = None,
        on_metadata: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        if cfg.agi.reconcile_interval_s <= 0 or cfg.agi.notice_timeout_s <= 0:
            raise ConfigError("agi.reconcile_interval_s and agi.notice_timeout_s must be positive")
        limits = agi_limits(cfg)
        ami = AmiClient(
            cfg.ami.host,
            cfg.ami.port,
            cfg.ami.username,
            cfg.ami.secret,
            action_timeout_s=cfg.ami.action_timeout_s,
            events=True,  # the end of a legacy call is known only from AMI's Hangup event
        )
        super().__init__(cfg, ami, events=events)
        notify = on_metadata
        if on_metadata is None and cfg.storage.enabled:
            notify = self._start_uploader().notify
        self.pending = PendingCalls(cfg.recording.host_dir / PENDING_DIR)
        self.watch = CallEndWatch(cfg, self.ami, self.recorder, self.events, self.pending, on_metadata=notify)
        self.flow = AgiCallFlow(cfg, self.recorder, self.watch)
        self.server = AgiServer(self.flow, cfg.agi.bind, cfg.agi.port, limits)

    async def run(self) -> None:
        await self.watch.restore()
        await self._run_with((self.server.serve, "agi-server"), (self.watch.run, "agi-call-end-watch"))


__all__ = [
    "PENDING_DIR",
    "SCRIPT",
    "AgiCallFlow",
    "AgiService",
    "CallEndWatch",
    "HangupInfo",
    "LegacyCall",
    "LegacyState",
    "PendingCalls",
    "Refused",
    "agi_sound",
]
