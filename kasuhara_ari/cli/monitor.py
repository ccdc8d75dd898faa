"""``kasuhara monitor``: a live view of calls and escalations from MQTT, for supervisors without a dashboard.

Subscribes to ``<prefix>/#``. On a terminal the view is redrawn as events arrive (and every second, so
durations tick); piped, it prints the changed call's line per event; ``--json`` prints every payload as
one JSON line for machines. Call events are not retained: calls already running when the monitor starts
appear with their next event. Everything shown that came from outside (caller name and number, endpoints)
is cleaned of control characters first: a caller must not be able to write escape codes to a terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import sys
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import aiomqtt
import click

from ..config import Config
from ..events import mqtt_tls_context
from ..safe import clean_caller_text, json_for_terminal, load_untrusted_json
from .common import EXIT_FAILED, EXIT_OK, config_option, load_config

#: How long an ended call stays on the live view.
KEEP_ENDED_S = 60.0
#: Longer than any call; a larger duration (or ``Infinity``) from a payload is shown as unknown.
MAX_DURATION_S = 10 * 365 * 86400
#: Calls the board remembers: a flood of made-up call ids must not grow the monitor without bound.
MAX_CALLS = 5000
#: The largest payload looked at (the service's are a few kB).
MAX_PAYLOAD_BYTES = 256 * 1024
COLUMNS = (("call_id", 24), ("state", 11), ("caller", 22), ("agent", 18), ("escalation", 30), ("duration", 8))

_STATE_AFTER = {
    "started": "answering",
    "notice_played": "dialling",
    "agent_ringing": "dialling",
    "agent_answered": "talking",
    "agent_unavailable": "no agent",
    "escalation_requested": "escalating",
    "supervisor_ringing": "escalating",
    "supervisor_joined": "talking",
    "supervisor_unavailable": "talking",
    "caller_hungup": "ending",
    "ended": "ended",
    "recording_stored": "stored",
}
_FINAL = {"ended": 1, "stored": 2}


def _text(value: object, width: int) -> str:
    """Untrusted text for one terminal cell: escaped, then cut to ``width``."""
    if value is None or value == "":
        return "-"
    text = clean_caller_text(value, max_chars=max(16, width * 4)) or "-"
    return text if len(text) <= width else text[: width - 1] + "…"


def _parse_at(value: object) -> dt.datetime | None:
    """An event's ``at`` as an aware UTC datetime; ``None`` if absent, naive, or with no UTC instant
    (``0001-01-01T00:00:00+14:00`` parses but overflows every later comparison)."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
        return parsed.astimezone(dt.UTC) if parsed.tzinfo is not None else None
    except (ValueError, OverflowError):
        return None


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or not 0 <= seconds < MAX_DURATION_S:
        return "-"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:d}:{rest % 60:02d}"


@dataclass
class CallView:
    """One call as the monitor shows it."""

    call_id: str
    state: str = "answering"
    caller: str = ""
    agent: str = ""
    escalation: str = ""
    marks: list[str] = field(default_factory=list)  # flagged, warned, ...
    started: dt.datetime | None = None
    ended: dt.datetime | None = None
    duration_s: float | None = None

    def duration(self, now: dt.datetime) -> str:
        if self.duration_s is not None and self.ended is not None:
            return _duration(self.duration_s)
        if self.started is None:
            return "-"
        return _duration(((self.ended or now) - self.started).total_seconds())

    def cells(self, now: dt.datetime) -> list[str]:
        escalation = "; ".join(x for x in (self.escalation, ", ".join(self.marks)) if x)
        values = (self.call_id, self.state, self.caller, self.agent, escalation, self.duration(now))
        return [_text(v, width) for v, (_, width) in zip(values, COLUMNS, strict=True)]


class CallBoard:
    """What the monitor knows, built from event payloads only (no I/O, so it is tested on its own)."""

    def __init__(self) -> None:
        self.calls: dict[str, CallView] = {}
        self.status: dict[str, Any] | None = None

    def apply(self, payload: Mapping[str, Any]) -> CallView | None:
        """Take one payload in; return the call it changed (None for status and non-call events)."""
        event = payload.get("event")
        if event == "status":
            self.status = dict(payload)
            return None
        call_id = payload.get("call_id")
        if not isinstance(event, str) or "." in event or not isinstance(call_id, str):
            return None
        view = self.calls.get(call_id)
        if view is None:
            if len(self.calls) >= MAX_CALLS:
                del self.calls[next(iter(self.calls))]  # the oldest seen
            view = self.calls[call_id] = CallView(call_id=call_id, state="?")
        at = _parse_at(payload.get("at"))
        if event == "started":
            view.started = at
            caller = payload.get("caller")
            if isinstance(caller, Mapping):
                number, name = caller.get("number"), caller.get("name")
                view.caller = " ".join(str(x) for x in (number, f"({name})" if name else None) if x)
        elif event == "agent_answered":
            view.agent = str(payload.get("agent") or "")
            view.started = view.started or at
        elif event == "escalation_requested":
            view.escalation = f"requested {payload.get('key') or ''}".strip()
        elif event == "supervisor_ringing":
            view.escalation = f"ringing {payload.get('supervisor') or '?'}"
        elif event == "supervisor_joined":
            view.escalation = f"joined {payload.get('supervisor') or '?'}"
        elif event == "supervisor_unavailable":
            view.escalation = "nobody available"
        elif event == "flagged":
            self._mark(view, "flagged")
        elif event == "warning_played":
            self._mark(view, "final notice" if payload.get("final") else "warned")
        elif event == "long_call":
            self._mark(view, "long")
        elif event == "repeat_caller":
            self._mark(view, f"repeat x{payload.get('count')}")
        elif event == "recording_failed":
            self._mark(view, "NOT RECORDED")
        elif event == "ended":
            view.ended = at
            duration = payload.get("duration_s")
            finite = isinstance(duration, int | float) and math.isfinite(duration)
            view.duration_s = float(duration) if finite and duration is not None else None
        new_state = _STATE_AFTER.get(event)
        if event == "warning_played" and payload.get("final"):
            new_state = "ending"
        # Events can come late or twice (at-least-once): a call never leaves ended/stored again.
        if new_state is not None and _FINAL.get(new_state, 0) >= _FINAL.get(view.state, 0):
            view.state = new_state
        if view.state == "?":
            view.state = "active"
        return view

    @staticmethod
    def _mark(view: CallView, mark: str) -> None:
        if mark not in view.marks:
            view.marks.append(mark)

    def expire(self, now: dt.datetime, keep_s: float = KEEP_ENDED_S) -> None:
        """Forget calls that ended more than ``keep_s`` ago."""
        for call_id, view in list(self.calls.items()):
            if view.ended is not None and (now - view.ended).total_seconds() > keep_s:
                del self.calls[call_id]

    def status_line(self, tz: dt.tzinfo) -> str:
        if self.status is None:
            return "service: unknown (no retained status yet)"
        at = _parse_at(self.status.get("at"))
        try:
            since = at.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S") if at else "?"
        except OverflowError:  # 9999-12-31T23:00Z is no date in Tokyo
            since = "?"
        state = _text(self.status.get("state"), 10)
        host = _text(self.status.get("hostname"), 40)
        version = _text(self.status.get("version"), 20)
        line = f"service: {state} since {since} (host {host}, version {version})"
        disk = self.status.get("spool_disk")
        if isinstance(disk, Mapping) and disk.get("state") not in (None, "ok"):
            line += f"  SPOOL DISK {_text(disk.get('state'), 10).upper()}"
        return line


def header() -> str:
    return "  ".join(name.upper().ljust(width) for name, width in COLUMNS).rstrip()


def row(cells: list[str]) -> str:
    return "  ".join(cell.ljust(width) for cell, (_, width) in zip(cells, COLUMNS, strict=True)).rstrip()


class _Output:
    """Writes the view (terminal: full redraws; pipe: one line per change) or JSON lines."""

    def __init__(self, out: TextIO, *, as_json: bool, live: bool, tz: dt.tzinfo) -> None:
        self.out = out
        self.as_json = as_json
        self.live = live and not as_json
        self.tz = tz
        self.board = CallBoard()
        self._started = False

    def start(self) -> None:
        """Connected: the table header (pipe) or the first screen (terminal)."""
        if not self._started and not self.as_json and not self.live:
            self.out.write(f"{'TIME':<8}  {header()}\n")
            self.out.flush()
        self._started = True
        self.redraw()

    def message(self, topic: str, raw: bytes) -> bool:
        """Handle one message; True when it counted as an event (for --count)."""
        try:
            # Anyone who may publish on the prefix writes these, and a retained one is read at every
            # start: NaN, Infinity, deep nesting and huge payloads are refused here, once.
            payload = load_untrusted_json(raw, max_bytes=MAX_PAYLOAD_BYTES, max_depth=16)
        except ValueError as exc:
            click.echo(
                f"kasuhara monitor: ignored a message on {_text(topic, 120)}: {_text(exc, 80)}", err=True
            )
            return False
        if not isinstance(payload, dict):
            click.echo(f"kasuhara monitor: ignored a non-object message on {_text(topic, 120)}", err=True)
            return False
        if self.as_json:
            self.out.write(json_for_terminal(payload) + "\n")
            self.out.flush()
            return True
        try:
            changed = self.board.apply(payload)
        except Exception as exc:  # a payload shape nobody foresaw: skip it, never end the monitor
            click.echo(
                f"kasuhara monitor: ignored a message on {_text(topic, 120)} ({type(exc).__name__})", err=True
            )
            return False
        now = dt.datetime.now(dt.UTC)
        if self.live:
            self.redraw()
        else:
            clock = now.astimezone(self.tz).strftime("%H:%M:%S")
            if changed is not None:
                self.out.write(f"{clock}  {row(changed.cells(now))}\n")
            elif payload.get("event") == "status":
                self.out.write(f"{clock}  {self.board.status_line(self.tz)}\n")
            else:
                event = _text(payload.get("event"), 40)
                self.out.write(f"{clock}  {event} {_text(payload.get('call_id'), 40)}\n")
            self.out.flush()
        return True

    def redraw(self) -> None:
        if not self.live:
            return
        now = dt.datetime.now(dt.UTC)
        self.board.expire(now)
        lines = [self.board.status_line(self.tz), "", header()]
        views = sorted(self.board.calls.values(), key=lambda v: (v.ended is not None, v.started or now))
        lines += [row(v.cells(now)) for v in views] or ["(no calls seen yet)"]
        clock = now.astimezone(self.tz).strftime("%Y-%m-%d %H:%M:%S")
        lines += ["", f"{clock}  {len(views)} call(s)  Ctrl-C to quit"]
        self.out.write("\x1b[H\x1b[2J" + "\n".join(lines) + "\n")
        self.out.flush()


async def watch(
    cfg: Config,
    out: TextIO,
    *,
    as_json: bool,
    count: int | None,
    live: bool,
    connect_timeout_s: float = 5.0,
) -> int:
    """Subscribe and show events until ``count`` events were shown (or forever); reconnects when the
    broker goes away after the first connection. Returns the exit code."""
    mqtt = cfg.mqtt
    try:
        tz: dt.tzinfo = zoneinfo.ZoneInfo(cfg.general.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        tz = dt.UTC
    output = _Output(out, as_json=as_json, live=live, tz=tz)
    where = f"{mqtt.host}:{mqtt.port}"
    shown = 0
    connected_before = False
    delay = 0.5
    while True:
        try:
            async with aiomqtt.Client(
                mqtt.host,
                mqtt.port,
                username=mqtt.username or None,
                password=mqtt.password or None,
                tls_context=mqtt_tls_context(mqtt),
                timeout=connect_timeout_s,
            ) as client:
                await client.subscribe(f"{mqtt.topic_prefix}/#", qos=1)
                verb = "reconnected; monitoring" if connected_before else "monitoring"
                click.echo(f"kasuhara monitor: {verb} {mqtt.topic_prefix}/# on {where}", err=True)
                connected_before = True
                delay = 0.5
                output.start()
                messages = client.messages.__aiter__()
                while True:
                    try:
                        message = await asyncio.wait_for(messages.__anext__(), 1.0 if output.live else None)
                    except TimeoutError:
                        output.redraw()
                        continue
                    payload = message.payload if isinstance(message.payload, bytes) else b""
                    if output.message(message.topic.value, payload):
                        shown += 1
                        if count is not None and shown >= count:
                            return EXIT_OK
        except aiomqtt.MqttError as exc:
            if not connected_before:
                click.echo(f"kasuhara monitor: cannot reach the MQTT broker at {where}: {exc}", err=True)
                return EXIT_FAILED
            click.echo(f"kasuhara monitor: connection lost ({exc}); reconnecting", err=True)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10.0)


@click.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print every event as one JSON line (for machines).")
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=None,
    help="Exit after this many events (the retained status counts as one).",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Exit after this many seconds.",
)
def monitor(config_path: str | None, as_json: bool, count: int | None, duration: float | None) -> None:
    """Live view of calls and escalations from MQTT: one line per call (state, caller, agent,
    escalation, duration). Ctrl-C quits."""
    cfg = load_config(config_path)
    out = sys.stdout
    live = not as_json and out.isatty()

    async def main() -> int:
        try:
            async with asyncio.timeout(duration):
                return await watch(cfg, out, as_json=as_json, count=count, live=live)
        except TimeoutError:
            return EXIT_OK

    try:
        code = asyncio.run(main())
    except KeyboardInterrupt:
        code = EXIT_OK
    if live:
        with contextlib.suppress(OSError):
            out.write("\n")
    sys.exit(code)
