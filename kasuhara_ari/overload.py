"""Saying when the box is overloaded: how late Asterisk's StasisStart events reach the app.

A new call's StasisStart carries Asterisk's own timestamp. Past the box's clean limit (CPU saturated),
events queue in Asterisk's stasis threads and in the websocket, and calls are answered seconds late:
that lateness is what an operator needs to see, and it costs one timestamp parse per call. A constant
offset between Asterisk's clock and ours (another host) is not lateness: the smallest lag seen lately is
taken as the offset and subtracted.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging

from . import metrics
from .events import StatusDetails

log = logging.getLogger(__name__)

#: Lateness (after the offset) that marks the box overloaded, and the lateness under which it is not any
#: more. A clean box delivers StasisStart within a few milliseconds; a saturated one takes seconds.
ENTER_S = 0.5
LEAVE_S = 0.1
#: Smoothing of the lateness (exponentially weighted mean over roughly the last 1/ALPHA calls).
ALPHA = 0.2
#: How many recent calls the clock-offset estimate (their smallest lag) looks at: many more than an
#: overload lasts, or a long one would become the offset.
OFFSET_WINDOW = 2000


def event_time(stamp: object) -> dt.datetime | None:
    """ARI's ``timestamp`` (``2026-12-03T21:30:45.714+0000``), or None if it is missing or malformed."""
    if not isinstance(stamp, str):
        return None
    try:
        return dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%f%z")
    except ValueError:
        return None


class OverloadWatch:
    """Lateness of new calls' StasisStart; logs, the ``kasuhara_overloaded`` gauge and the service's
    status detail ``overloaded`` say when the box is past its limit."""

    def __init__(self, status: StatusDetails | None = None) -> None:
        self._status = status
        self._recent: collections.deque[float] = collections.deque(maxlen=OFFSET_WINDOW)
        self.smoothed = 0.0
        self.overloaded = False

    def observe(self, stamp: object, now: dt.datetime | None = None) -> float | None:
        """Take one StasisStart's timestamp in; returns its lateness in seconds (None if unreadable)."""
        sent = event_time(stamp)
        if sent is None:
            return None
        raw = ((now or dt.datetime.now(dt.UTC)) - sent).total_seconds()
        self._recent.append(raw)
        late = max(0.0, raw - min(self._recent))
        metrics.STASIS_START_LATENESS.observe(late)
        self.smoothed += ALPHA * (late - self.smoothed)
        if not self.overloaded and self.smoothed > ENTER_S:
            self._set(True)
            log.warning(
                "overload event=overloaded stasis_start_late_s=%.2f smoothed_s=%.2f "
                "(Asterisk hands new calls over late: the box is past its limit)",
                late,
                self.smoothed,
            )
        elif self.overloaded and self.smoothed < LEAVE_S:
            self._set(False)
            log.info("overload event=recovered smoothed_s=%.3f", self.smoothed)
        return late

    def _set(self, overloaded: bool) -> None:
        self.overloaded = overloaded
        metrics.OVERLOADED.set(1 if overloaded else 0)
        if overloaded:
            metrics.OVERLOAD_EPISODES.inc()
        if self._status is not None:
            self._status.set_status_detail("overloaded", overloaded)
