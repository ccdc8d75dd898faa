"""Follow-up notes in the bucket: ``care/notes/<agent>/<YYYYMMDDTHHMMSS.mmmZ>-<id>.json``.

A note is about a person's wellbeing, so its text lives only in its own object (never in the audit record,
which names the agent and the note's key, nor on MQTT). The agent name is an endpoint name from the config,
checked before it becomes part of a key.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from ..safe import clean_caller_text
from ..storage import ObjectStore, StorageError
from .report import Note

NOTES_PREFIX = "care/notes/"
NOTE_SCHEMA = "kasuhara.care-note/1"
NOTE_MAX_CHARS = 4000
_AGENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_agent(agent: str) -> str:
    """An endpoint name safe in a key and a device-state name, or ValueError naming it."""
    if not _AGENT.fullmatch(agent) or ".." in agent:
        raise ValueError(f"{agent[:64]!r} is not an agent's endpoint name (letters, digits, . _ -)")
    return agent


def note_key(agent: str, at: datetime, note_id: str) -> str:
    t = at.astimezone(UTC)
    stamp = t.strftime("%Y%m%dT%H%M%S") + f".{t.microsecond // 1000:03d}Z"
    return f"{NOTES_PREFIX}{check_agent(agent)}/{stamp}-{note_id}.json"


async def write_note(
    store: ObjectStore, agent: str, text: str, *, by: str, at: datetime | None = None
) -> Note:
    """Store one note (a new object each time: notes are never overwritten)."""
    when = (at or datetime.now(UTC)).astimezone(UTC)
    cleaned = clean_caller_text(text, max_chars=NOTE_MAX_CHARS) or ""
    if not cleaned.strip():
        raise ValueError("the note's text is empty")
    key = note_key(agent, when, secrets.token_hex(6))
    note = Note(agent=agent, at=when.isoformat(timespec="milliseconds"), by=by, text=cleaned, key=key)
    doc = {"schema": NOTE_SCHEMA, "agent": agent, "at": note.at, "by": by, "text": cleaned}
    await store.put_bytes(
        key,
        json.dumps(doc, ensure_ascii=False, indent=1).encode("utf-8"),
        metadata={"agent": agent},
        content_type="application/json",
    )
    return note


async def read_notes(store: ObjectStore) -> AsyncIterator[Note]:
    """Every note (one LIST of the small ``care/notes/`` prefix, one GET each); unreadable ones skipped."""
    async for obj in store.list_prefix(NOTES_PREFIX):
        if not obj.key.endswith(".json"):
            continue
        try:
            data = await store.get_bytes(obj.key, max_bytes=64 * 1024)
            doc = json.loads(data) if data is not None else None
        except (StorageError, ValueError):
            continue
        if not isinstance(doc, dict) or doc.get("schema") != NOTE_SCHEMA:
            continue
        agent = str(doc.get("agent", ""))
        # The key names the agent: a document claiming another agent is not believed.
        if not obj.key.startswith(f"{NOTES_PREFIX}{agent}/"):
            continue
        yield Note(
            agent=agent,
            at=str(doc.get("at", "")),
            by=clean_caller_text(str(doc.get("by", "")), max_chars=200) or "",
            text=clean_caller_text(str(doc.get("text", "")), max_chars=NOTE_MAX_CHARS) or "",
            key=obj.key,
        )
