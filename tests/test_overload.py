"""The overload watch: new calls reaching the app late say the box is past its limit (log, gauge, status)."""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

import pytest

from kasuhara_ari import metrics
from kasuhara_ari.overload import ENTER_S, OverloadWatch, event_time

T0 = dt.datetime(2026, 12, 3, 21, 30, 45, 714000, tzinfo=dt.UTC)


def stamp(at: dt.datetime) -> str:
    """ARI's timestamp format (Asterisk 22: milliseconds and a +HHMM offset)."""
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}+0000"


class Status:
    def __init__(self) -> None:
        self.details: dict[str, Any] = {}

    def set_status_detail(self, name: str, value: Any) -> None:
        self.details[name] = value


def feed(
    watch: OverloadWatch, lags: list[float], *, offset: float = 0.0, start: int = 0
) -> list[float | None]:
    out = []
    for i, lag in enumerate(lags, start):
        sent = T0 + dt.timedelta(seconds=i)
        out.append(watch.observe(stamp(sent), now=sent + dt.timedelta(seconds=offset + lag)))
    return out


def test_ari_timestamps_parse_and_junk_does_not() -> None:
    assert event_time("2026-12-03T21:30:45.714+0000") == T0
    assert event_time("2026-12-03T21:30:45.714+0900") == T0 - dt.timedelta(hours=9)
    for junk in (None, 17, "", "yesterday", "2026-12-03 21:30:45"):
        assert event_time(junk) is None


def test_a_clock_offset_alone_is_not_lateness() -> None:
    """Asterisk on another host 3 s ahead or behind: steady calls are on time."""
    for offset in (3.0, -3.0):
        watch = OverloadWatch()
        lates = feed(watch, [0.002, 0.004, 0.003] * 20, offset=offset)
        assert max(x for x in lates if x is not None) < 0.01
        assert not watch.overloaded


def test_late_calls_mark_the_box_overloaded_then_recovered(caplog: pytest.LogCaptureFixture) -> None:
    status = Status()
    watch = OverloadWatch(status)
    episodes = metrics.OVERLOAD_EPISODES._value.get()
    caplog.set_level(logging.INFO, logger="kasuhara_ari.overload")
    feed(watch, [0.003] * 10)
    assert not watch.overloaded and "overloaded" not in status.details
    # A saturated box: new calls arrive seconds late.
    feed(watch, [2.0, 3.0, 4.0, 5.0], start=10)
    assert watch.overloaded and status.details["overloaded"] is True
    assert metrics.OVERLOADED._value.get() == 1
    assert metrics.OVERLOAD_EPISODES._value.get() == episodes + 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "event=overloaded" in warnings[0].getMessage()
    # Still late but easing: no second episode, no second warning.
    feed(watch, [1.0, 0.8], start=14)
    assert watch.overloaded and metrics.OVERLOAD_EPISODES._value.get() == episodes + 1
    # Back to normal: recovered (smoothed, so it takes a few calls, not one).
    lates = feed(watch, [0.003] * 30, start=16)
    assert not watch.overloaded and status.details["overloaded"] is False
    assert metrics.OVERLOADED._value.get() == 0
    assert any("event=recovered" in r.getMessage() for r in caplog.records)
    assert lates[-1] is not None and lates[-1] < 0.01


def test_one_late_call_is_not_an_overload() -> None:
    watch = OverloadWatch()
    feed(watch, [0.003] * 10 + [ENTER_S * 2] + [0.003] * 10)
    assert not watch.overloaded


def test_an_unreadable_timestamp_changes_nothing() -> None:
    watch = OverloadWatch()
    assert watch.observe("garbage") is None and watch.observe(None) is None
    assert watch.smoothed == 0.0 and not watch.overloaded


def test_a_long_overload_does_not_become_the_clock_offset() -> None:
    watch = OverloadWatch()
    feed(watch, [0.003] * 20)
    feed(watch, [3.0] * 600, start=20)  # ten minutes of a saturated box at one new call per second
    assert watch.overloaded


def test_the_status_with_overloaded_is_a_valid_event() -> None:
    """What the service publishes: the retained status carries ``overloaded`` and stays schema-valid."""
    from kasuhara_ari.events import MqttEvents
    from kasuhara_ari.schemas import validate_event

    events = MqttEvents(node="pbx1")
    watch = OverloadWatch(events)
    feed(watch, [0.003] * 5 + [3.0] * 5)
    status = json.loads(events._status("online", "updated"))
    assert status["overloaded"] is True
    validate_event(status)
