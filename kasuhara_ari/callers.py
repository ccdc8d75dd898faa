"""Caller policies (MHLW manual / Tokyo guideline): repeat callers and an admin-managed caller list.

* Repeat callers: a caller who called ``policy.repeat_calls`` times within ``policy.repeat_window_days``
  is marked ``repeat_caller`` (event + metadata). The history is a small SQLite file in
  ``policy.state_dir`` holding normalised numbers and times only, pruned past the window.
* The caller list lives in the bucket (``callers/list.json``) so every service and admin sees one list;
  admins change it with ``kasuhara callers add|remove`` (audited). ``kasuhara serve`` re-reads it every
  ``policy.caller_list_refresh_s`` and keeps the last good copy (also on disk) while S3 is away.
  A listed number can be routed straight to a supervisor, hear a stronger notice, or be refused.

Numbers are compared normalised (``+81 3-1234-5678`` == ``0312345678``), see ``search.normalise_number``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import PolicyConfig
from .search import normalise_number

log = logging.getLogger(__name__)

LIST_KEY = "callers/list.json"
LIST_SCHEMA = "kasuhara.callers/1"
ACTIONS = ("supervisor", "strong_notice", "refuse")


class CallerListError(ValueError):
    """A caller list entry or document is not valid; the message says which part."""


@dataclass(frozen=True)
class ListedCaller:
    number: str  # normalised
    action: str
    reason: str = ""
    by: str = ""
    at: str = ""


@dataclass(frozen=True)
class CallerList:
    entries: tuple[ListedCaller, ...] = ()

    def find(self, number: str) -> ListedCaller | None:
        want = normalise_number(number)
        if not want:
            return None
        return next((e for e in self.entries if e.number == want), None)

    def with_entry(self, entry: ListedCaller) -> CallerList:
        kept = tuple(e for e in self.entries if e.number != entry.number)
        return CallerList((*kept, entry))

    def without(self, number: str) -> CallerList:
        want = normalise_number(number)
        return CallerList(tuple(e for e in self.entries if e.number != want))

    def to_json(self) -> bytes:
        doc = {"schema": LIST_SCHEMA, "entries": [asdict(e) for e in self.entries]}
        return json.dumps(doc, ensure_ascii=False, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> CallerList:
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise CallerListError(f"caller list is not JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("schema") != LIST_SCHEMA:
            raise CallerListError(f"caller list: expected schema {LIST_SCHEMA}")
        entries = []
        for raw in doc.get("entries") or []:
            if not isinstance(raw, dict):
                raise CallerListError("caller list: an entry is not an object")
            entries.append(
                make_entry(
                    raw.get("number"),
                    raw.get("action"),
                    raw.get("reason", ""),
                    by=str(raw.get("by", "")),
                    at=str(raw.get("at", "")),
                )
            )
        return cls(tuple(entries))


def make_entry(
    number: object, action: object, reason: object = "", *, by: str = "", at: str = ""
) -> ListedCaller:
    """A validated entry: the number normalised (digits, optional leading +), the action known."""
    norm = normalise_number(number)
    if not norm or not (norm.lstrip("+").isdigit() and 3 <= len(norm) <= 20):
        raise CallerListError(f"{str(number)[:40]!r} is not a phone number")
    if action not in ACTIONS:
        raise CallerListError(f"action {str(action)[:40]!r}: one of {', '.join(ACTIONS)}")
    return ListedCaller(norm, str(action), str(reason)[:500], by[:100], at[:40])


class RepeatCallers:
    """How often a number called recently. SQLite, run in a thread: never on the event loop."""

    def __init__(self, path: Path, window_days: int) -> None:
        self.path = path
        self.window_s = window_days * 86400
        self._lock = asyncio.Lock()

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=5)
        db.execute("CREATE TABLE IF NOT EXISTS calls (number TEXT NOT NULL, at REAL NOT NULL)")
        db.execute("CREATE INDEX IF NOT EXISTS calls_number_at ON calls (number, at)")
        return db

    def _record_sync(self, number: str, now: float) -> int:
        with contextlib.closing(self._connect()) as db, db:
            db.execute("DELETE FROM calls WHERE at < ?", (now - self.window_s,))
            db.execute("INSERT INTO calls (number, at) VALUES (?, ?)", (number, now))
            (count,) = db.execute("SELECT COUNT(*) FROM calls WHERE number = ?", (number,)).fetchone()
        return int(count)

    async def record(self, number: str, now: float | None = None) -> int:
        """Record a call from ``number``; return how many calls it made within the window (this one too)."""
        norm = normalise_number(number)
        if not norm or not norm.lstrip("+").isdigit():
            return 0  # anonymous or not a number: nothing to count
        async with self._lock:
            return await asyncio.to_thread(self._record_sync, norm, now if now is not None else time.time())


@dataclass
class CallerCheck:
    repeat_count: int = 0
    is_repeat: bool = False
    listed: ListedCaller | None = None


@dataclass
class CallerPolicy:
    """What the call service asks at the start of each inbound call."""

    policy: PolicyConfig
    history: RepeatCallers | None = None
    store: Any = None  # an ObjectStore (get_bytes) or None when storage is off
    cache_path: Path | None = None
    current: CallerList = field(default_factory=CallerList)
    loaded_at: float = 0.0

    @classmethod
    def from_config(cls, policy: PolicyConfig, store: Any) -> CallerPolicy:
        state = Path(policy.state_dir)
        history = (
            RepeatCallers(state / "callers.sqlite", policy.repeat_window_days)
            if policy.repeat_calls
            else None
        )
        me = cls(policy, history, store, state / "caller-list.json")
        me._load_cache()
        return me

    def _load_cache(self) -> None:
        if self.cache_path is None or not self.cache_path.exists():
            return
        try:
            self.current = CallerList.from_json(self.cache_path.read_bytes())
        except (OSError, CallerListError) as exc:
            log.warning("callers event=cache_unreadable path=%s error=%s", self.cache_path, exc)

    async def check(self, number: str) -> CallerCheck:
        result = CallerCheck(listed=self.current.find(number))
        if self.history is not None:
            try:
                result.repeat_count = await self.history.record(number)
            except (OSError, sqlite3.Error) as exc:
                log.error("callers event=history_failed error=%s", exc)
            result.is_repeat = (
                self.policy.repeat_calls > 0 and result.repeat_count >= self.policy.repeat_calls
            )
        return result

    async def refresh(self) -> None:
        """Re-read the list from the bucket; keep the last good one on any failure."""
        if self.store is None:
            return
        try:
            data = await self.store.get_bytes(LIST_KEY, max_bytes=4 * 1024 * 1024)
        except Exception as exc:  # S3 away: the last good list stays in force
            log.warning("callers event=refresh_failed error=%s", type(exc).__name__)
            return
        try:
            fresh = CallerList.from_json(data) if data is not None else CallerList()
        except CallerListError as exc:
            log.error("callers event=list_invalid error=%s", exc)
            return
        if fresh != self.current:
            log.info("callers event=list_loaded entries=%d", len(fresh.entries))
        self.current = fresh
        self.loaded_at = time.time()
        if self.cache_path is not None:
            from .recording import write_json_atomic

            with contextlib.suppress(OSError):
                await asyncio.to_thread(write_json_atomic, self.cache_path, json.loads(fresh.to_json()))

    async def run(self) -> None:
        """Keep the list fresh (a task of ``kasuhara serve``)."""
        while True:
            await self.refresh()
            await asyncio.sleep(max(1, self.policy.caller_list_refresh_s))


def entries_table(entries: Sequence[ListedCaller]) -> list[Mapping[str, str]]:
    return [asdict(e) for e in entries]
