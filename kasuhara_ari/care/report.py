"""The per-agent exposure record: harassment calls per agent over a month, from the recordings' metadata.

Pure: it reads metadata documents (as the bucket holds them) and follow-up notes, and decides who needs a
manager's follow-up. The CLI (``kasuhara care report``) lists the month's metadata and prints the result.

What counts, per call the agent took (``agent`` in the metadata; the endpoint name is the agent):
flags (the agent's ``*1``), warnings (``*2``/``*3``), escalations (``*9``), detections (a ``*_detected``
event in the timeline, or a flag the detector placed). A call with any of them is a harassment call and
its ``duration_s`` counts into the minutes. Each kind counts a call once, however often the key was pressed.
"""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..config import CareConfig

_ENDPOINT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: ``PJSIP/agent-0000001a`` (a channel name): the suffix Asterisk adds to an endpoint's channels.
_CHANNEL_SUFFIX = re.compile(r"-[0-9a-f]{8}$")


def endpoint_of(agent: object) -> str | None:
    """The agent's endpoint name from what metadata holds (``PJSIP/agent1``, ``PJSIP/agent1/sip:…``, a
    channel name ``PJSIP/agent1-0000001a``, or a bare ``agent1``); None when there is none to name."""
    if not isinstance(agent, str) or not agent:
        return None
    parts = agent.split("/")
    name = parts[1] if len(parts) > 1 else parts[0]
    name = _CHANNEL_SUFFIX.sub("", name.split(";")[0])
    return name if _ENDPOINT.fullmatch(name) else None


@dataclass
class Exposure:
    """One agent's month."""

    agent: str
    person: str
    calls: int = 0
    harassment_calls: int = 0
    flags: int = 0
    warnings: int = 0
    escalations: int = 0
    detections: int = 0
    seconds: float = 0.0
    needs_follow_up: bool = False
    #: The newest follow-up note written since the month began (None: waiting, if follow-up is needed).
    followed_up_at: str | None = None
    followed_up_by: str | None = None

    @property
    def minutes(self) -> float:
        return round(self.seconds / 60, 1)

    @property
    def status(self) -> str:
        if not self.needs_follow_up:
            return "ok"
        return "followed up" if self.followed_up_at else "waiting"

    def as_dict(self) -> dict[str, Any]:
        return {
            "agent": self.agent,
            "person": self.person,
            "calls": self.calls,
            "harassment_calls": self.harassment_calls,
            "flags": self.flags,
            "warnings": self.warnings,
            "escalations": self.escalations,
            "detections": self.detections,
            "minutes": self.minutes,
            "needs_follow_up": self.needs_follow_up,
            "status": self.status,
            "followed_up_at": self.followed_up_at,
            "followed_up_by": self.followed_up_by,
        }


def kinds_of(doc: Mapping[str, Any]) -> set[str]:
    """Which kinds of harassment a call's metadata shows: flag, warning, escalation, detection."""
    kinds: set[str] = set()
    for esc in doc.get("escalations") or []:
        if not isinstance(esc, Mapping):
            continue
        action, by = esc.get("action"), esc.get("by")
        if action == "flag":
            kinds.add("detection" if by == "detector" else "flag")
        elif action in ("warn", "warn_and_hangup"):
            kinds.add("warning")
        elif action == "supervisor":
            kinds.add("escalation")
    for event in doc.get("timeline") or []:
        if isinstance(event, Mapping) and str(event.get("event", "")).endswith("_detected"):
            kinds.add("detection")
    return kinds


@dataclass(frozen=True)
class Note:
    """A manager's follow-up with an agent (``care/notes/<agent>/…``)."""

    agent: str
    at: str
    by: str
    text: str
    key: str = ""


@dataclass
class CareReport:
    month: str
    agents: list[Exposure] = field(default_factory=list)

    def as_csv(self) -> str:
        out = io.StringIO()
        columns = list(Exposure("", "").as_dict())
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in self.agents:
            writer.writerow({k: _csv_safe(v) for k, v in row.as_dict().items()})
        return out.getvalue()


def _csv_safe(value: object) -> object:
    """Names come from the config and the bucket: a cell starting with = + - @ would be a spreadsheet
    formula (CSV injection), so such text gets a leading apostrophe."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return "" if value is None else value


def build_report(
    month: str,
    docs: Iterable[Mapping[str, Any]],
    notes: Iterable[Note],
    *,
    care: CareConfig,
    people: Mapping[str, str],
    month_start: datetime,
) -> CareReport:
    """Tally ``docs`` (the month's metadata) per agent; agents over a threshold need a follow-up, which a
    note written at or after ``month_start`` answers. Every agent of ``people`` is listed, also at zero."""
    rows: dict[str, Exposure] = {a: Exposure(a, p) for a, p in people.items()}
    for doc in docs:
        agent = endpoint_of(doc.get("agent"))
        if agent is None:
            continue
        row = rows.setdefault(agent, Exposure(agent, people.get(agent, "")))
        row.calls += 1
        kinds = kinds_of(doc)
        if not kinds:
            continue
        row.harassment_calls += 1
        row.flags += "flag" in kinds
        row.warnings += "warning" in kinds
        row.escalations += "escalation" in kinds
        row.detections += "detection" in kinds
        duration = doc.get("duration_s")
        if isinstance(duration, int | float) and not isinstance(duration, bool) and duration > 0:
            row.seconds += float(duration)
    latest: dict[str, Note] = {}
    for note in notes:
        try:
            written = datetime.fromisoformat(note.at)
        except ValueError:
            continue
        if written.tzinfo is None:
            continue
        if written >= month_start and (note.agent not in latest or note.at > latest[note.agent].at):
            latest[note.agent] = note
    for row in rows.values():
        over_calls = care.follow_up_calls > 0 and row.harassment_calls >= care.follow_up_calls
        over_minutes = care.follow_up_minutes > 0 and row.seconds >= care.follow_up_minutes * 60
        row.needs_follow_up = over_calls or over_minutes
        last = latest.get(row.agent)
        if last is not None:
            row.followed_up_at, row.followed_up_by = last.at, last.by
    ordered = sorted(rows.values(), key=lambda r: (-r.harassment_calls, -r.seconds, r.agent))
    return CareReport(month, ordered)


def _cell(text: str, width: int) -> str:
    """``text`` cut and padded to ``width`` terminal columns (a kanji takes two)."""
    out, used = "", 0
    for ch in text:
        w = 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
        if used + w > width:
            break
        out, used = out + ch, used + w
    return out + " " * (width - used)


def text_table(report: CareReport, *, width: Sequence[int] = (16, 16)) -> list[str]:
    """The report as lines for a terminal (names are cleaned by the caller's printer)."""
    lines = [
        f"{'agent':<{width[0]}}  {'person':<{width[1]}}  {'calls':>5}  {'harass':>6}  {'flags':>5}  "
        f"{'warn':>4}  {'esc':>3}  {'det':>3}  {'minutes':>7}  follow-up"
    ]
    for r in report.agents:
        lines.append(
            f"{_cell(r.agent, width[0])}  {_cell(r.person, width[1])}  {r.calls:>5}  "
            f"{r.harassment_calls:>6}  {r.flags:>5}  {r.warnings:>4}  {r.escalations:>3}  {r.detections:>3}  "
            f"{r.minutes:>7.1f}  {r.status}"
            + (f" ({r.followed_up_at[:10]} by {r.followed_up_by})" if r.followed_up_at else "")
        )
    return lines
