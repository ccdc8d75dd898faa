"""The live board: calls in progress folded from their MQTT events, one model for every face.

``kasuhara monitor`` (a terminal), ``kasuhara web`` (the console's board) and ``kasuhara serve`` (which
publishes each live call's snapshot retained on ``<prefix>/live/<call_id>``) all fold events with
:class:`LiveBoard`, so a call is in the same state wherever it is looked at. Pure: no I/O, no clock of its
own (``now`` is passed in), so it is tested on its own.

Everything here comes from the broker, which anyone allowed to publish on the prefix writes: every field is
type-checked and capped when it is folded in (a 10 MB caller name or a flood of made-up call ids cannot grow
memory), and text is kept as data — each face escapes it for its medium (terminal, HTML).
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: Calls the board remembers: a flood of made-up call ids must not grow it without bound.
MAX_CALLS = 5000
#: Nodes whose status the board remembers (the same reason).
MAX_NODES = 64
#: The largest payload looked at (the service's are a few kB).
MAX_PAYLOAD_BYTES = 256 * 1024
#: Text fields are cut to this many characters when folded in (the service sends at most a few dozen).
MAX_TEXT_CHARS = 256
#: Longer than any call; a larger duration (or ``Infinity``) from a payload is unknown.
MAX_DURATION_S = 10 * 365 * 86400
#: The payload schema of a retained snapshot on ``<prefix>/live/<call_id>``.
LIVE_SCHEMA = "kasuhara.live/1"

#: States, named for what the caller experiences. ``active``: first seen by an event that says nothing
#: of the state (the board started mid-call without a snapshot).
STATES = ("notice", "ringing", "talking", "no_agent", "escalating", "ending", "ended", "stored", "active")
#: Badges a call can earn; it keeps them until it ends.
BADGES = (
    "flagged",
    "warning_played",
    "final_warning",
    "supervisor_joined",
    "long_call",
    "repeat_caller",
    "not_recorded",
    "monologue",
    "talk_over",
    "shouting",
    "alerted",
)
#: Badges that draw a supervisor's attention on the board (a detection does: it is why it exists).
ALERT_BADGES = frozenset({"flagged", "final_warning", "monologue", "talk_over", "shouting", "alerted"})

_STATE_AFTER = {
    "started": "notice",
    "notice_played": "ringing",
    "agent_ringing": "ringing",
    "customer_ringing": "ringing",
    "agent_answered": "talking",
    "customer_answered": "talking",
    "agent_unavailable": "no_agent",
    "escalation_requested": "escalating",
    "supervisor_ringing": "escalating",
    "supervisor_joined": "talking",
    "supervisor_unavailable": "talking",
    "caller_hungup": "ending",
    "ended": "ended",
    "recording_stored": "stored",
    "resumed": "talking",
}
_FINAL = {"ended": 1, "stored": 2}
_SUPERVISION = {
    "supervisor_listening": "listen",
    "supervisor_whispering": "whisper",
    "supervisor_barging": "barge",
}


def parse_at(value: object) -> dt.datetime | None:
    """An event's ``at`` as an aware UTC datetime; ``None`` if absent, naive, or with no UTC instant
    (``0001-01-01T00:00:00+14:00`` parses but overflows every later comparison)."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
        return parsed.astimezone(dt.UTC) if parsed.tzinfo is not None else None
    except (ValueError, OverflowError):
        return None


def _text(value: object) -> str:
    """A text field from a payload: strings and numbers only, cut to MAX_TEXT_CHARS; else empty."""
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, int | float | str):
        return str(value)[:MAX_TEXT_CHARS]
    return ""


def _duration(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    seconds = float(value)
    return seconds if math.isfinite(seconds) and 0 <= seconds < MAX_DURATION_S else None


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat(timespec="milliseconds") if value is not None else None


@dataclass
class LiveCall:
    """One call as every face shows it (text fields are raw data: escape them where they are shown)."""

    call_id: str
    state: str = "active"
    direction: str = ""
    caller_number: str = ""
    caller_name: str = ""
    agent: str = ""
    target: str = ""
    #: The agent's escalation: "" / requested / ringing / joined / unavailable, with the key and supervisor.
    escalation: str = ""
    escalation_key: str = ""
    supervisor: str = ""
    #: A supervisor joined uninvited (listen / whisper / barge) and is still on.
    supervision: str = ""
    badges: list[str] = field(default_factory=list)
    repeat_count: int = 0
    started_at: dt.datetime | None = None
    ended_at: dt.datetime | None = None
    duration_s: float | None = None
    #: The ``at`` of the last event folded in.
    updated_at: dt.datetime | None = None
    #: The node (``general.node``) whose service carries the call ("" when its events do not say).
    node: str = ""

    @property
    def live(self) -> bool:
        return self.state not in _FINAL

    @property
    def alert(self) -> bool:
        """A flagged call, or one whose agent is escalating: the board draws attention to it."""
        return self.state == "escalating" or any(b in ALERT_BADGES for b in self.badges)

    def mark(self, badge: str) -> None:
        if badge not in self.badges:
            self.badges.append(badge)

    def elapsed_s(self, now: dt.datetime) -> float | None:
        """Seconds since the call started (its final duration once ended); None when unknown."""
        if self.duration_s is not None and self.ended_at is not None:
            return self.duration_s
        if self.started_at is None:
            return None
        seconds = ((self.ended_at or now) - self.started_at).total_seconds()
        return seconds if 0 <= seconds < MAX_DURATION_S else None

    def snapshot(self, *, boot: str = "") -> dict[str, Any]:
        """The retained ``<prefix>/live/<call_id>`` payload (``kasuhara.live/1``, README)."""
        doc: dict[str, Any] = {
            "schema": LIVE_SCHEMA,
            "call_id": self.call_id,
            "state": self.state,
            "direction": self.direction or None,
            "caller": {"number": self.caller_number or None, "name": self.caller_name or None},
            "agent": self.agent or None,
            "target": self.target or None,
            "escalation": self.escalation or None,
            "escalation_key": self.escalation_key or None,
            "supervisor": self.supervisor or None,
            "supervision": self.supervision or None,
            "badges": list(self.badges),
            "repeat_count": self.repeat_count,
            "started_at": _iso(self.started_at),
            "at": _iso(self.updated_at),
        }
        if self.node:
            doc["node"] = self.node
        if boot:
            doc["boot"] = boot
        return doc

    @classmethod
    def from_snapshot(cls, doc: Mapping[str, Any], call_id: str) -> LiveCall | None:
        """A call from a retained snapshot someone published (None if it is not one): every field checked."""
        if doc.get("schema") != LIVE_SCHEMA or doc.get("call_id") != call_id:
            return None
        state = doc.get("state")
        call = cls(call_id, state=state if state in STATES else "active")
        call.direction = _text(doc.get("direction"))
        caller = doc.get("caller")
        if isinstance(caller, Mapping):
            call.caller_number = _text(caller.get("number"))
            call.caller_name = _text(caller.get("name"))
        call.agent = _text(doc.get("agent"))
        call.target = _text(doc.get("target"))
        call.escalation = _text(doc.get("escalation"))
        call.escalation_key = _text(doc.get("escalation_key"))
        call.supervisor = _text(doc.get("supervisor"))
        call.supervision = _text(doc.get("supervision"))
        badges = doc.get("badges")
        if isinstance(badges, list):
            for badge in badges[: len(BADGES)]:
                if badge in BADGES:
                    call.mark(badge)
        count = doc.get("repeat_count")
        call.repeat_count = count if isinstance(count, int) and 0 <= count < 10**9 else 0
        call.started_at = parse_at(doc.get("started_at"))
        call.updated_at = parse_at(doc.get("at"))
        call.node = _text(doc.get("node"))[:64]
        return call


#: Agents the board remembers in a recovery pause (care/cooldown.py's events); beyond it the oldest go.
MAX_PAUSES = 1000
#: The care pause's events: about an agent, not a call (they come on the ended call's topic).
PAUSE_EVENTS = frozenset({"agent_cooldown_started", "agent_cooldown_ended"})
_AGENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class AgentPause:
    """An agent in a recovery pause after a harassment call (``agent_cooldown_started``), until its
    ``agent_cooldown_ended`` or its ``until`` has passed."""

    agent: str
    call_id: str
    trigger: str = ""
    until: dt.datetime | None = None
    started_at: dt.datetime | None = None


class LiveBoard:
    """What is known of the calls and the service, built from payloads only."""

    def __init__(self, *, max_calls: int = MAX_CALLS) -> None:
        self.calls: dict[str, LiveCall] = {}
        #: The last status any service published (one node: its status).
        self.status: dict[str, Any] | None = None
        #: Per node, its service's last status (several nodes share a broker; "" = a status without node).
        self.nodes: dict[str, dict[str, Any]] = {}
        self.max_calls = max_calls
        #: Agents in a recovery pause, by endpoint name.
        self.pauses: dict[str, AgentPause] = {}

    def apply_pause(self, payload: Mapping[str, Any]) -> bool:
        """Take a care pause event in (agents are not calls: no call is made or changed by it); True if
        the pauses changed. An ``ended`` older than the pause it would end (a late one) is ignored."""
        event, agent = payload.get("event"), payload.get("agent")
        if event not in PAUSE_EVENTS or not isinstance(agent, str) or not _AGENT_NAME.fullmatch(agent):
            return False
        at = parse_at(payload.get("at"))
        known = self.pauses.get(agent)
        if event == "agent_cooldown_ended":
            if known is None or (at is not None and known.started_at is not None and at < known.started_at):
                return False
            del self.pauses[agent]
            return True
        if known is not None and at is not None and known.started_at is not None and at < known.started_at:
            return False
        call_id = payload.get("call_id")
        self.pauses.pop(agent, None)
        while len(self.pauses) >= MAX_PAUSES:
            del self.pauses[next(iter(self.pauses))]
        self.pauses[agent] = AgentPause(
            agent,
            _text(call_id),
            _text(payload.get("trigger"))[:32],
            parse_at(payload.get("until")),
            at,
        )
        return True

    def expire_pauses(self, now: dt.datetime) -> list[str]:
        """Forget pauses whose ``until`` has passed (their ``ended`` event was missed); returns agents."""
        gone = [a for a, p in self.pauses.items() if p.until is not None and p.until <= now]
        for agent in gone:
            del self.pauses[agent]
        return gone

    def stale(self, snapshot: Mapping[str, Any]) -> bool:
        """A retained snapshot left by an earlier run of its node's service: its ``boot`` is not that of
        the node's last status. Unknown (no status of that node yet, no boot): not stale."""
        node = _text(snapshot.get("node"))[:64]
        status = self.nodes.get(node) or (self.status if not self.nodes else None)
        boot = (status or {}).get("boot")
        return bool(boot) and snapshot.get("boot") not in (None, boot)

    def _slot(self, call_id: str) -> LiveCall:
        call = self.calls.get(call_id)
        if call is None:
            if len(self.calls) >= self.max_calls:
                del self.calls[next(iter(self.calls))]  # the oldest seen
            call = self.calls[call_id] = LiveCall(call_id)
        return call

    def put(self, call: LiveCall) -> None:
        """Take a snapshot's call in: it replaces what the events built, except what only other
        publishers' events say (``kasuhara supervise`` and the console publish the uninvited supervisor's
        events, which the service's snapshots know nothing of) and the badges, which a call keeps."""
        known = self.calls.pop(call.call_id, None)
        if known is not None:
            if not call.supervision and known.supervision:
                call.supervision, call.supervisor = known.supervision, call.supervisor or known.supervisor
            for badge in known.badges:
                call.mark(badge)
        if len(self.calls) >= self.max_calls:
            del self.calls[next(iter(self.calls))]
        self.calls[call.call_id] = call

    def remove(self, call_id: str) -> LiveCall | None:
        return self.calls.pop(call_id, None)

    def apply(self, payload: Mapping[str, Any]) -> LiveCall | None:
        """Take one event payload in; return the call it changed (None for status and non-call events)."""
        event = payload.get("event")
        if event == "status":
            self.status = dict(payload)
            node = _text(payload.get("node"))[:64]
            if node in self.nodes or len(self.nodes) < MAX_NODES:
                self.nodes[node] = self.status
            return None
        if event in PAUSE_EVENTS:
            self.apply_pause(payload)
            return None
        call_id = payload.get("call_id")
        if not isinstance(event, str) or "." in event or not isinstance(call_id, str) or not call_id:
            return None
        call = self._slot(call_id[:MAX_TEXT_CHARS])
        if not call.node and isinstance(payload.get("node"), str):
            call.node = _text(payload.get("node"))[:64]
        at = parse_at(payload.get("at"))
        if at is not None and (call.updated_at is None or at > call.updated_at):
            call.updated_at = at
        self._fold(call, event, payload, at)
        new_state = _STATE_AFTER.get(event)
        if event == "warning_played" and payload.get("final"):
            new_state = "ending"
        # Events can come late or twice (at-least-once): a call never leaves ended/stored again.
        if new_state is not None and _FINAL.get(new_state, 0) >= _FINAL.get(call.state, 0):
            call.state = new_state
        return call

    @staticmethod
    def _fold(call: LiveCall, event: str, payload: Mapping[str, Any], at: dt.datetime | None) -> None:
        if event == "started":
            call.started_at = at
            LiveBoard._fold_who(call, payload)
        elif event == "resumed":  # taken over by the next serve at a restart: what started/answered said
            call.started_at = parse_at(payload.get("started_at")) or call.started_at or at
            call.agent = _text(payload.get("agent"))
            LiveBoard._fold_who(call, payload)
            flags = payload.get("flags")
            if isinstance(flags, list) and "harassment" in flags:
                call.mark("flagged")
            if isinstance(flags, list) and "repeat_caller" in flags:
                call.mark("repeat_caller")
            if payload.get("supervisor"):
                call.escalation, call.supervisor = "joined", _text(payload.get("supervisor"))
                call.mark("supervisor_joined")
        elif event in ("agent_answered", "customer_answered"):
            if event == "agent_answered":
                call.agent = _text(payload.get("agent"))
            call.started_at = call.started_at or at
        elif event == "escalation_requested":
            call.escalation, call.escalation_key = "requested", _text(payload.get("key"))
        elif event == "supervisor_ringing":
            call.escalation, call.supervisor = "ringing", _text(payload.get("supervisor"))
        elif event == "supervisor_joined":
            call.escalation, call.supervisor = "joined", _text(payload.get("supervisor"))
            call.mark("supervisor_joined")
        elif event == "supervisor_unavailable":
            call.escalation = "unavailable"
        elif event in _SUPERVISION:
            call.supervision = _SUPERVISION[event]
            call.supervisor = _text(payload.get("supervisor")) or call.supervisor
            call.mark("supervisor_joined")
        elif event == "supervision_ended":
            call.supervision = ""
        elif event == "flagged":
            call.mark("flagged")
        elif event == "warning_played":
            call.mark("final_warning" if payload.get("final") else "warning_played")
        elif event == "long_call":
            call.mark("long_call")
        elif event == "repeat_caller":
            count = payload.get("count")
            call.repeat_count = count if isinstance(count, int) and 0 <= count < 10**9 else 0
            call.mark("repeat_caller")
        elif event == "recording_failed":
            call.mark("not_recorded")
        elif event in ("monologue_detected", "talk_over_detected", "shouting_detected"):
            call.mark(event.removesuffix("_detected"))
        elif event == "detection_alert":  # act mode: the detector asks the supervisors to look
            call.mark("alerted")
        elif event == "ended":
            call.ended_at = at
            call.duration_s = _duration(payload.get("duration_s"))

    @staticmethod
    def _fold_who(call: LiveCall, payload: Mapping[str, Any]) -> None:
        """Direction, target and caller, as ``started`` (and ``resumed``) carry them."""
        call.direction = _text(payload.get("direction"))
        call.target = _text(payload.get("target"))
        caller = payload.get("caller")
        if isinstance(caller, Mapping):
            call.caller_number = _text(caller.get("number"))
            call.caller_name = _text(caller.get("name"))

    def expire(self, now: dt.datetime, keep_s: float) -> list[str]:
        """Forget calls that ended more than ``keep_s`` ago; returns their ids."""
        gone = [
            call_id
            for call_id, call in self.calls.items()
            if call.ended_at is not None and (now - call.ended_at).total_seconds() > keep_s
        ]
        for call_id in gone:
            del self.calls[call_id]
        return gone
