"""Server-side sessions and the login rate limit: pure bookkeeping over an injected clock, so expiry and
lockout are decided in one place and tested without waiting."""

from __future__ import annotations

import math
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..accounts import Role

Clock = Callable[[], float]

#: A role read from the accounts store is trusted this long; a disabled or demoted user loses access
#: on the first request after it.
ROLE_RECHECK_S = 2.0


@dataclass
class Session:
    """One logged-in browser. Only the server knows it; the browser holds the random id alone."""

    id: str
    account: str
    role: Role
    created: float
    last_seen: float
    csrf: str
    role_checked: float


def new_token() -> str:
    """256 random bits, URL-safe (session ids and CSRF tokens)."""
    return secrets.token_urlsafe(32)


class SessionStore:
    """Sessions in memory: a restart logs everyone out, which is the safe direction."""

    #: Live sessions one account may hold; a further login ends that account's least recently used one
    #: (a script logging in forever cannot grow memory).
    MAX_PER_ACCOUNT = 32

    def __init__(self, *, idle_s: float, max_s: float, clock: Clock) -> None:
        self._idle_s = idle_s
        self._max_s = max_s
        self._clock = clock
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, account: str, role: Role) -> Session:
        """A fresh id for every login: an id the browser had before (fixation) is never promoted."""
        self._sweep()
        mine = [s for s in self._sessions.values() if s.account == account]
        if len(mine) >= self.MAX_PER_ACCOUNT:
            del self._sessions[min(mine, key=lambda s: s.last_seen).id]
        now = self._clock()
        session = Session(new_token(), account, role, now, now, new_token(), now)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session for this id (its idle clock restarts), or None; an expired one is dropped."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self._clock()
        if now - session.last_seen > self._idle_s or now - session.created > self._max_s:
            del self._sessions[session_id]
            return None
        session.last_seen = now
        return session

    def peek(self, session_id: str | None) -> Session | None:
        """The live session for this id WITHOUT restarting its idle clock (a long-lived stream re-checks
        its session with this: an open board alone must not keep a session alive forever)."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self._clock()
        if now - session.last_seen > self._idle_s or now - session.created > self._max_s:
            del self._sessions[session_id]
            return None
        return session

    def delete(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(session_id, None)

    def _sweep(self) -> None:
        now = self._clock()
        stale = [
            sid
            for sid, s in self._sessions.items()
            if now - s.last_seen > self._idle_s or now - s.created > self._max_s
        ]
        for sid in stale:
            del self._sessions[sid]


class LoginLimiter:
    """Failed logins counted per key (``account:NAME``, ``address:IP``) in a sliding window."""

    #: Keys kept at most; beyond it the stalest are forgotten (a flood of made-up names cannot grow memory).
    MAX_KEYS = 50_000

    def __init__(self, *, max_failures: int, window_s: float, clock: Clock) -> None:
        self._max = max_failures
        self._window_s = window_s
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, *keys: str) -> int:
        """Seconds until any of ``keys`` may try again; 0 if none is locked."""
        now = self._clock()
        wait = 0.0
        for key in keys:
            times = self._recent(key, now)
            if len(times) >= self._max:
                wait = max(wait, times[-self._max] + self._window_s - now)
        return max(1, math.ceil(wait)) if wait > 0 else 0

    def failed(self, *keys: str) -> None:
        now = self._clock()
        for key in keys:
            times = self._recent(key, now)
            times.append(now)
            while len(times) > self._max:
                times.popleft()
            self._failures[key] = times
        if len(self._failures) > self.MAX_KEYS:
            for key in sorted(self._failures, key=lambda k: self._failures[k][-1])[: self.MAX_KEYS // 10]:
                del self._failures[key]

    def succeeded(self, key: str) -> None:
        """The account's own count restarts after a good password (the address's does not)."""
        self._failures.pop(key, None)

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.get(key, deque())
        while times and now - times[0] >= self._window_s:
            times.popleft()
        if not times:
            self._failures.pop(key, None)
        return times
