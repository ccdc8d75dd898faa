"""``kasuhara monitor``: a live view of calls and escalations from MQTT, for supervisors without a dashboard.

Subscribes to ``<prefix>/#``. On a terminal the view is redrawn as events arrive (and every second, so
durations tick); piped, it prints the changed call's line per event; ``--json`` prints every event
payload as one JSON line for machines. Calls already running when the monitor starts come from the
service's retained snapshots (``<prefix>/live/<call_id>``, kasuhara_ari.live). Everything shown that
came from outside (caller name and number, endpoints) is cleaned of control characters first: a caller
must not be able to write escape codes to a terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import sys
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO

import aiomqtt
import click

from .. import mqtt_client
from ..config import Config
from ..events import mqtt_tls_context
from ..live import MAX_DURATION_S, MAX_PAYLOAD_BYTES, LiveBoard, LiveCall, parse_at
from ..safe import clean_caller_text, json_for_terminal, load_untrusted_json
from .common import EXIT_FAILED, EXIT_OK, config_option, load_config

#: How long an ended call stays on the live view.
KEEP_ENDED_S = 60.0
COLUMNS = (("call_id", 24), ("state", 11), ("caller", 22), ("agent", 18), ("escalation", 30), ("duration", 8))

#: The board's states (kasuhara_ari.live) in the words this view has always used.
_STATE_WORDS = {"notice": "answering", "ringing": "dialling", "no_agent": "no agent"}
_BADGE_WORDS = {
    "flagged": "flagged",
    "warning_played": "warned",
    "final_warning": "final notice",
    "long_call": "long",
    "not_recorded": "NOT RECORDED",
    "shouting": "shouting",
    "alerted": "ALERT",
}


def _text(value: object, width: int) -> str:
    """Untrusted text for one terminal cell: escaped, then cut to ``width``."""
    if value is None or value == "":
        return "-"
    text = clean_caller_text(value, max_chars=max(16, width * 4)) or "-"
    return text if len(text) <= width else text[: width - 1] + "…"


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or not 0 <= seconds < MAX_DURATION_S:
        return "-"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:d}:{rest % 60:02d}"


@dataclass
class CallView:
    """One call as the monitor shows it: the shared model's call, in this view's words."""

    call: LiveCall

    @property
    def call_id(self) -> str:
        return self.call.call_id

    @property
    def state(self) -> str:
        return _STATE_WORDS.get(self.call.state, self.call.state)

    @property
    def caller(self) -> str:
        c = self.call
        return " ".join(x for x in (c.caller_number, f"({c.caller_name})" if c.caller_name else "") if x)

    @property
    def escalation(self) -> str:
        c = self.call
        if c.escalation == "requested":
            return f"requested {c.escalation_key}".strip()
        if c.escalation in ("ringing", "joined"):
            return f"{c.escalation} {c.supervisor or '?'}"
        return "nobody available" if c.escalation == "unavailable" else ""

    @property
    def marks(self) -> list[str]:
        c = self.call
        return [
            f"repeat x{c.repeat_count}" if b == "repeat_caller" else _BADGE_WORDS[b]
            for b in c.badges
            if b in _BADGE_WORDS or b == "repeat_caller"
        ]

    @property
    def started(self) -> dt.datetime | None:
        return self.call.started_at

    @property
    def ended(self) -> dt.datetime | None:
        return self.call.ended_at

    def duration(self, now: dt.datetime) -> str:
        return _duration(self.call.elapsed_s(now))

    def cells(self, now: dt.datetime) -> list[str]:
        escalation = "; ".join(x for x in (self.escalation, ", ".join(self.marks)) if x)
        values = (self.call_id, self.state, self.caller, self.call.agent, escalation, self.duration(now))
        return [_text(v, width) for v, (_, width) in zip(values, COLUMNS, strict=True)]


class CallBoard:
    """What the monitor knows: the shared :class:`~kasuhara_ari.live.LiveBoard`, seen as CallViews."""

    def __init__(self) -> None:
        self.board = LiveBoard()

    @property
    def calls(self) -> dict[str, CallView]:
        return {call_id: CallView(call) for call_id, call in self.board.calls.items()}

    @property
    def status(self) -> dict[str, Any] | None:
        return self.board.status

    def apply(self, payload: Mapping[str, Any]) -> CallView | None:
        """Take one payload in; return the call it changed (None for status and non-call events)."""
        call = self.board.apply(payload)
        return CallView(call) if call is not None else None

    def expire(self, now: dt.datetime, keep_s: float = KEEP_ENDED_S) -> None:
        """Forget calls that ended more than ``keep_s`` ago."""
        self.board.expire(now, keep_s)

    def status_line(self, tz: dt.tzinfo) -> str:
        if self.status is None:
            return "service: unknown (no retained status yet)"
        at = parse_at(self.status.get("at"))
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

    def __init__(
        self, out: TextIO, *, as_json: bool, live: bool, tz: dt.tzinfo, prefix: str = "kasuhara"
    ) -> None:
        self.live_prefix = f"{prefix}/live/"
        self.node_status_prefix = f"{prefix}/status/"
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

    def snapshot(self, call_id: str, raw: bytes) -> None:
        """A call's retained snapshot (``<prefix>/live/<call_id>``): how calls already running when the
        monitor starts are shown. State, not an event: never counted, never printed as JSON."""
        board = self.board.board
        known = board.calls.get(call_id)
        if not raw:
            if known is not None and known.live:
                board.remove(call_id)  # ended while we missed its events
            return
        try:
            doc = load_untrusted_json(raw, max_bytes=MAX_PAYLOAD_BYTES, max_depth=8)
        except ValueError:
            return
        call = LiveCall.from_snapshot(doc, call_id) if isinstance(doc, dict) else None
        if call is None or board.stale(doc) or (known and not known.live):
            return  # not a snapshot, one an earlier run of the service left, or of a call that ended
        board.put(call)
        if known is None and not self.live:
            now = dt.datetime.now(dt.UTC)
            clock = now.astimezone(self.tz).strftime("%H:%M:%S")
            self.out.write(f"{clock}  {row(CallView(call).cells(now))}\n")
            self.out.flush()
        elif self.live:
            self.redraw()

    def message(self, topic: str, raw: bytes) -> bool:
        """Handle one message; True when it counted as an event (for --count)."""
        if topic.startswith(self.live_prefix):
            if not self.as_json:
                self.snapshot(topic[len(self.live_prefix) :], raw)
            return False
        if topic.startswith(self.node_status_prefix):
            # A node's own copy of its status (several nodes on one broker): what judges that node's
            # snapshots; shown once, from `<prefix>/status`, not twice.
            with contextlib.suppress(ValueError):
                doc = load_untrusted_json(raw, max_bytes=MAX_PAYLOAD_BYTES, max_depth=8)
                if isinstance(doc, dict) and doc.get("event") == "status" and not self.as_json:
                    status = self.board.board.status
                    self.board.board.apply(doc)
                    self.board.board.status = status  # the line shows the shared status as before
            return False
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
    output = _Output(out, as_json=as_json, live=live, tz=tz, prefix=mqtt.topic_prefix)
    where = f"{mqtt.host}:{mqtt.port}"
    shown = 0
    connected_before = False
    delay = 0.5
    while True:
        try:
            async with mqtt_client.Client(
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
