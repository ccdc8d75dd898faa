"""The talk detector (pure logic): monologues reported while they go on, talk-over from the agent's
failed tries to take the floor, each kind at most once per repeat_s."""

from __future__ import annotations

from kasuhara_ari.config import DetectionConfig
from kasuhara_ari.detection.talk import TalkDetector

CFG = DetectionConfig(monologue_s=30, talk_over_attempts=3, talk_over_window_s=60, talk_over_back_off_s=1.5)


def test_a_monologue_is_reported_while_it_goes_on_and_not_before() -> None:
    d = TalkDetector(CFG)
    assert d.started("caller", 100.0) == []
    assert d.seconds_to_next(100.0) == 30.0
    assert d.check(129.9) == []
    found = d.check(130.0)
    assert [f.kind for f in found] == ["monologue"] and found[0].figures["talking_s"] == 30.0
    # Once per repeat_s (default 300 s), however long it goes on.
    assert d.check(200.0) == []
    assert d.seconds_to_next(200.0) == 230.0


def test_pauses_reset_the_monologue_and_silence_needs_no_timer() -> None:
    d = TalkDetector(CFG)
    d.started("caller", 0.0)
    d.finished("caller", 29.0, 29.0)  # a pause of silence_ms before 30 s: no monologue
    assert d.seconds_to_next(29.0) is None
    d.started("caller", 31.0)
    assert d.check(60.9) == [] and [f.kind for f in d.check(61.0)] == ["monologue"]


def test_the_agent_who_cannot_get_a_word_in() -> None:
    d = TalkDetector(CFG)
    d.started("caller", 0.0)
    found = []
    for t in (5.0, 15.0, 25.0):
        d.started("agent", t)
        found += d.finished("agent", t + 1.0, 1.0)  # gives up after 1 s, the caller goes on
    assert [f.kind for f in found] == ["talk_over"] and found[0].figures["attempts"] == 3


def test_talking_after_the_caller_stopped_or_for_long_is_not_talk_over() -> None:
    d = TalkDetector(CFG)
    found = []
    d.started("caller", 0.0)
    d.started("agent", 5.0)
    found += d.finished("agent", 12.0, 7.0)  # the agent spoke for 7 s: took the floor
    d.finished("caller", 13.0, 13.0)
    for t in (20.0, 30.0, 40.0):  # the caller is silent: the agent's short answers are no tries
        d.started("agent", t)
        found += d.finished("agent", t + 1.0, 1.0)
    assert found == []


def test_tries_older_than_the_window_do_not_count() -> None:
    d = TalkDetector(CFG)
    d.started("caller", 0.0)
    found = []
    for t in (0.5, 70.0, 140.0, 210.0):  # one try per 70 s: never 3 within 60 s
        d.started("agent", t)
        found += d.finished("agent", t + 1.0, 1.0)
    assert [f for f in found if f.kind == "talk_over"] == []
