"""Finding recordings in the bucket: by date range and filters, or by call id, reading metadata only.

Cost, which the README repeats: the bucket has no index, so a search reads what it filters on.
For every UTC day the range touches it LISTs ``recordings/YYYY/MM/DD/`` (one request per 1000 objects)
and GETs each recording's metadata object (a few kB) — one request per recording in the range, run
``concurrency`` at a time. Nothing outside the range is listed (no bucket scan) and audio is never read.
Memory stays flat however long the range: keys are listed and metadata fetched in chunks of
``concurrency``, and each entry is handed on before the next chunk is read.

Also here, because the CLI and the retention worker share them: reading command-line dates in the
configured timezone, normalising caller numbers, and parsing a metadata object defensively.
"""

from __future__ import annotations

import asyncio
import fnmatch
import re
import unicodedata
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .safe import UntrustedJsonError, load_untrusted_json, printable, safe_call_id
from .storage import (
    HOLDS_PREFIX,
    ObjectStore,
    RecordingKeys,
    StorageError,
    day_prefix,
    hold_key,
    parse_recording_key,
    parse_started_at,
)

DIRECTIONS = {"inbound": "inbound", "in": "inbound", "outbound": "outbound", "out": "outbound"}
#: An Asterisk linkedid is ``[<systemname>-]<epoch>.<sequence>``: the epoch says which day to look in.
_EPOCH_ID = re.compile(r"(?:^|-)(?P<epoch>[0-9]{9,11})\.[0-9]+$")
_NUMBER_NOISE = re.compile(r"[\s\-.()/]")


# --------------------------------------------------------------------------------------------- values


def zone(name: str) -> ZoneInfo:
    """``general.timezone`` as a ZoneInfo; ``ValueError`` naming the key if it does not exist."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"general.timezone: unknown time zone {name!r} (e.g. Asia/Tokyo, UTC)") from None


def parse_when(text: str, tz: ZoneInfo, *, end: bool = False) -> datetime:
    """A command-line date: ``YYYY-MM-DD`` or an ISO 8601 datetime, read in ``tz`` unless it has an offset.

    A bare date means the start of that day, or with ``end`` its last instant, so ``--from D --to D`` is
    the whole day D (both bounds inclusive).
    """
    value = text.strip()
    if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value):
        try:
            day = date.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{text!r} is not a valid date") from None
        if end:
            return local_midnight(day + timedelta(days=1), tz) - timedelta(microseconds=1)
        return local_midnight(day, tz)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{text[:40]!r} is not a date (YYYY-MM-DD) or an ISO 8601 datetime (2025-01-31T18:30)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=tz)
    return parsed


def local_midnight(day: date, tz: ZoneInfo) -> datetime:
    """The first instant of ``day`` in ``tz`` (as an aware UTC datetime; DST-safe)."""
    return datetime.combine(day, time(0), tzinfo=tz).astimezone(UTC)


def utc_days(start: datetime, end: datetime) -> list[date]:
    """The UTC days whose ``recordings/YYYY/MM/DD/`` prefix can hold a call started in [start, end]."""
    first, last = start.astimezone(UTC).date(), end.astimezone(UTC).date()
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def parse_direction(value: str) -> str:
    """``inbound``/``outbound`` (``in``/``out`` accepted); ``ValueError`` otherwise."""
    try:
        return DIRECTIONS[value.strip().lower()]
    except KeyError:
        raise ValueError(f"direction {value!r}: use inbound or outbound (in/out)") from None


def normalise_number(value: object) -> str:
    """A phone number reduced for comparison: ``+81 3-1234-5678``, ``03(1234)5678``, ``０３１２３４５６７８``
    and ``sip:0312345678@pbx`` all become ``0312345678``.

    Full-width characters are folded (NFKC), a SIP/tel scheme and ``@host``/``;params`` are cut, spaces,
    dashes, dots, slashes and parentheses removed, and the Japanese country code ``+81`` (or ``0081``)
    becomes the domestic trunk prefix ``0``. Anything else (``anonymous``) is kept, lower-cased.
    """
    if value is None:
        return ""
    text = unicodedata.normalize("NFKC", str(value)).strip().lower()
    for scheme in ("sips:", "sip:", "tel:"):
        if text.startswith(scheme):
            text = text[len(scheme) :]
            break
    text = re.split(r"[@;]", text, maxsplit=1)[0]
    text = _NUMBER_NOISE.sub("", text)
    for country in ("+81", "0081"):
        if text.startswith(country) and text[len(country) :].isdigit():
            rest = text[len(country) :]
            return rest if rest.startswith("0") else "0" + rest
    return text


def caller_matches(query: str, number: object) -> bool:
    """Whether a caller number matches ``--caller``: equal once both are normalised; a ``*`` in the
    query is a wildcard (``--caller '03*'``)."""
    want = normalise_number(query)
    have = normalise_number(number)
    if not want or not have:
        return False
    if "*" in want:
        return fnmatch.fnmatchcase(have, want)
    return have == want


def epoch_days(call_id: str) -> list[date]:
    """The UTC days a call id's embedded epoch points at (the day itself first, then its neighbours:
    ``started_at`` is a moment after the channel was created, so it can fall on the next day)."""
    m = _EPOCH_ID.search(call_id)
    if m is None:
        return []
    day = datetime.fromtimestamp(int(m["epoch"]), UTC).date()
    return [day, day + timedelta(days=1), day - timedelta(days=1)]


# --------------------------------------------------------------------------------------------- metadata


class CorruptMetadata(ValueError):
    """A metadata object that cannot be trusted to say when the call started; says why."""


def parse_metadata(data: bytes, call_id: str) -> dict[str, Any]:
    """A stored metadata object, checked just enough to act on: a JSON object for this call id with an
    aware ``started_at``. Anything else raises :class:`CorruptMetadata`."""
    try:
        # Anyone with a put right on the bucket wrote this: huge, deeply nested or NaN-laden documents
        # must become a reported problem, never a RecursionError that ends a sweep or a search.
        doc = load_untrusted_json(data)
    except UntrustedJsonError as exc:
        raise CorruptMetadata(str(exc)) from None
    if not isinstance(doc, dict):
        raise CorruptMetadata("not a JSON object")
    if doc.get("call_id") != call_id:
        raise CorruptMetadata(f"call_id in the document is {printable(doc.get('call_id'), max_chars=40)}")
    try:
        parse_started_at(doc.get("started_at"))
    except ValueError as exc:
        raise CorruptMetadata(str(exc)) from None
    return doc


def started_of(doc: Mapping[str, Any]) -> datetime:
    return parse_started_at(doc["started_at"])


# --------------------------------------------------------------------------------------------- catalog


@dataclass(frozen=True)
class Filters:
    """What ``recordings list`` / ``export`` select. Bounds are inclusive; ``None`` means any."""

    start: datetime
    end: datetime
    caller: str | None = None
    direction: str | None = None
    flagged: bool = False
    held: bool = False

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"from": self.start.isoformat(), "to": self.end.isoformat()}
        for name in ("caller", "direction"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        for name in ("flagged", "held"):
            if getattr(self, name):
                out[name] = True
        return out


@dataclass(frozen=True)
class Entry:
    """One recording as found by a search: its keys, its metadata document, whether it is held."""

    call_id: str
    metadata_key: str
    audio_key: str | None
    started_at: datetime
    doc: Mapping[str, Any]
    held: bool

    def summary(self) -> dict[str, Any]:
        """The fields ``recordings list --json`` prints (the whole document is in ``show --json``)."""
        caller = self.doc.get("caller") if isinstance(self.doc.get("caller"), Mapping) else {}
        audio = self.doc.get("audio") if isinstance(self.doc.get("audio"), Mapping) else {}
        assert isinstance(caller, Mapping) and isinstance(audio, Mapping)
        return {
            "call_id": self.call_id,
            "started_at": self.doc.get("started_at"),
            "direction": self.doc.get("direction"),
            "caller": {"number": caller.get("number"), "name": caller.get("name")},
            "agent": self.doc.get("agent"),
            "duration_s": self.doc.get("duration_s"),
            "flags": list(self.doc.get("flags") or []),
            "held": self.held,
            "audio": {k: audio.get(k) for k in ("key", "bytes", "sha256", "status")},
            "metadata_key": self.metadata_key,
        }


@dataclass(frozen=True)
class Unreadable:
    """A metadata object a search could not use (reported, never silently dropped)."""

    key: str
    problem: str


def matches(doc: Mapping[str, Any], started: datetime, held: bool, f: Filters) -> bool:
    if not f.start <= started <= f.end:
        return False
    if f.direction is not None and doc.get("direction") != f.direction:
        return False
    if f.flagged and not doc.get("flags"):
        return False
    if f.held and not held:
        return False
    if f.caller is not None:
        caller = doc.get("caller")
        number = caller.get("number") if isinstance(caller, Mapping) else None
        if not caller_matches(f.caller, number):
            return False
    return True


@dataclass(frozen=True)
class Located:
    """Where a call's objects are (``metadata`` False: only audio was found, no metadata)."""

    keys: RecordingKeys
    metadata: bool


class Catalog:
    """Reads recordings' metadata from the bucket by date prefix. See the module docstring for costs."""

    def __init__(self, store: ObjectStore, *, concurrency: int = 16) -> None:
        self.store = store
        self.concurrency = concurrency

    async def held_call_ids(self) -> set[str]:
        """Call ids with a hold record (one listing of the small ``holds/`` prefix)."""
        held = set()
        async for obj in self.store.list_prefix(HOLDS_PREFIX):
            name = obj.key[len(HOLDS_PREFIX) :]
            if name.endswith(".json"):
                held.add(name[: -len(".json")])
        return held

    async def search(
        self,
        f: Filters,
        *,
        on_day: Callable[[date], None] | None = None,
        on_problem: Callable[[Unreadable], None] | None = None,
    ) -> AsyncIterator[Entry]:
        """Matching recordings in key order (by UTC day, then call id)."""
        held = await self.held_call_ids()
        for day in utc_days(f.start, f.end):
            chunk: list[str] = []
            async for obj in self.store.list_prefix(day_prefix(day)):
                if obj.key.endswith(".json"):
                    chunk.append(obj.key)
                if len(chunk) >= self.concurrency:
                    async for entry in self._read(chunk, held, f, on_problem):
                        yield entry
                    chunk = []
            async for entry in self._read(chunk, held, f, on_problem):
                yield entry
            if on_day is not None:
                on_day(day)

    async def _read(
        self,
        keys: list[str],
        held: set[str],
        f: Filters,
        on_problem: Callable[[Unreadable], None] | None,
    ) -> AsyncIterator[Entry]:
        results = await asyncio.gather(*(self._entry(k, held) for k in keys))
        for result in results:
            if isinstance(result, Unreadable):
                if on_problem is not None:
                    on_problem(result)
            elif result is not None and matches(result.doc, result.started_at, result.held, f):
                yield result

    async def _entry(self, key: str, held: set[str]) -> Entry | Unreadable | None:
        parsed = parse_recording_key(key)
        if parsed is None or parsed.kind != "json":
            return None
        try:
            data = await self.store.get_bytes(key)
        except StorageError as exc:
            if exc.code != "TooLarge":
                raise
            return Unreadable(key, "larger than 16 MiB (not read)")
        if data is None:
            return None  # deleted since it was listed
        try:
            doc = parse_metadata(data, parsed.call_id)
        except CorruptMetadata as exc:
            return Unreadable(key, str(exc))
        audio = doc.get("audio")
        audio_key = audio.get("key") if isinstance(audio, Mapping) else None
        return Entry(
            call_id=parsed.call_id,
            metadata_key=key,
            audio_key=audio_key if isinstance(audio_key, str) else None,
            started_at=started_of(doc),
            doc=doc,
            held=parsed.call_id in held,
        )

    async def locate(self, call_id: str, *, days: Iterable[date] = ()) -> Located | None:
        """Where a call's objects are, without listing: HEAD requests on the candidate days — those given,
        those the id's epoch points at, and the day in its hold record."""
        cid = safe_call_id(call_id)
        candidates = list(days) + epoch_days(cid)
        data = await self.store.get_bytes(hold_key(cid))
        if data is not None:
            try:
                started = load_untrusted_json(data).get("started_at")
                candidates.append(parse_started_at(started).astimezone(UTC).date())
            except (ValueError, AttributeError):
                pass
        seen: set[date] = set()
        for day in candidates:
            if day in seen:
                continue
            seen.add(day)
            prefix = day_prefix(day)
            keys = RecordingKeys(cid, day, f"{prefix}{cid}.wav", f"{prefix}{cid}.json", hold_key(cid))
            if await self.store.stat(keys.metadata) is not None:
                return Located(keys, metadata=True)
            if await self.store.stat(keys.audio) is not None:
                return Located(keys, metadata=False)
        return None

    async def entry(self, located: Located) -> Entry:
        """The full entry of a located call; :class:`CorruptMetadata` if its metadata is unusable."""
        result = await self._entry(located.keys.metadata, await self.held_call_ids())
        if result is None:
            raise CorruptMetadata("metadata object disappeared")
        if isinstance(result, Unreadable):
            raise CorruptMetadata(result.problem)
        return result
