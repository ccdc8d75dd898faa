"""Playback through the console: HTTP Range parsing and the play grants that keep seeks out of the audit
log. Pure bookkeeping over an injected clock, tested without a server."""

from __future__ import annotations

from dataclasses import dataclass

from ..evidence.desk import Playable
from .sessions import Clock

#: Seeks of one session in one call reuse its ``play`` record this long after it was written.
PLAY_GRANT_S = 30 * 60
#: Grants kept at most (one per session and call); beyond it the oldest are dropped.
MAX_GRANTS = 10_000
#: A Range header longer than this is ignored (answered with the whole file), as are absurd numbers.
MAX_RANGE_HEADER = 256
_MAX_DIGITS = 18


class Unsatisfiable(Exception):
    """416: no byte of the object is in the range asked for."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The first byte range of a ``Range`` header as ``(start, end)`` (inclusive, clamped to ``size``).

    ``None``: answer with the whole object (no header, another unit, or a header that does not parse:
    RFC 9110 lets a server ignore what it cannot use). A multi-range request is answered with its first
    range only (a single-part 206; browsers' media players never ask for more). :class:`Unsatisfiable`:
    the first range starts at or past the end (also any range of an empty object, and ``bytes=-0``).
    """
    if header is None or len(header) > MAX_RANGE_HEADER:
        return None
    unit, sep, specs = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    first = specs.split(",", 1)[0].strip()
    start_text, dash, end_text = first.partition("-")
    start_text, end_text = start_text.strip(), end_text.strip()
    if not dash or not all(
        t.isdigit() and t.isascii() and len(t) <= _MAX_DIGITS for t in (start_text or "0", end_text or "0")
    ):
        return None
    if not start_text:
        if not end_text:
            return None
        suffix = int(end_text)
        if suffix == 0 or size == 0:
            raise Unsatisfiable
        return max(0, size - suffix), size - 1
    start = int(start_text)
    if end_text and int(end_text) < start:
        return None  # an invalid range-spec: ignored
    if start >= size:
        raise Unsatisfiable
    return start, min(int(end_text), size - 1) if end_text else size - 1


@dataclass(frozen=True)
class PlayGrant:
    """A ``play`` record written for one session and call: the pinned version it covers and its size."""

    playable: Playable
    size: int
    granted: float


class PlayGrants:
    """Grants by (session id, call id): the first request of a session for a call goes through the desk
    (a ``play`` record); its seeks within PLAY_GRANT_S reuse it. The role is still checked on every
    request (a demoted user loses playback at once); a new login is a new session, so a new record."""

    def __init__(self, clock: Clock, *, window_s: float = PLAY_GRANT_S, max_grants: int = MAX_GRANTS) -> None:
        self._clock = clock
        self._window_s = window_s
        self._max = max_grants
        self._grants: dict[tuple[str, str], PlayGrant] = {}

    def __len__(self) -> int:
        return len(self._grants)

    def get(self, session_id: str, call_id: str) -> PlayGrant | None:
        grant = self._grants.get((session_id, call_id))
        if grant is None:
            return None
        if self._clock() - grant.granted >= self._window_s:
            del self._grants[(session_id, call_id)]
            return None
        return grant

    def add(self, session_id: str, call_id: str, playable: Playable, size: int) -> PlayGrant:
        now = self._clock()
        if len(self._grants) >= self._max:
            for key in [k for k, g in self._grants.items() if now - g.granted >= self._window_s]:
                del self._grants[key]
            while len(self._grants) >= self._max:
                del self._grants[min(self._grants, key=lambda k: self._grants[k].granted)]
        grant = PlayGrant(playable, size, now)
        self._grants[(session_id, call_id)] = grant
        return grant

    def drop_session(self, session_id: str) -> None:
        for key in [k for k in self._grants if k[0] == session_id]:
            del self._grants[key]
