"""The agent's key sequences: pure decisions, no servers."""

from __future__ import annotations

from kasuhara_ari.escalation import KeySequenceCollector

KEYS = {"*9": "supervisor", "*1": "flag", "*2": "warn", "*3": "warn_and_hangup"}


def feed(c: KeySequenceCollector, digits: str, start: float = 0.0, gap: float = 0.1) -> list[tuple[str, str]]:
    out = []
    for i, d in enumerate(digits):
        hit = c.feed(d, start + i * gap)
        if hit:
            out.append(hit)
    return out


def test_each_sequence_maps_to_its_action() -> None:
    for seq, action in KEYS.items():
        assert feed(KeySequenceCollector(KEYS), seq) == [(seq, action)]


def test_noise_before_a_sequence_is_ignored() -> None:
    assert feed(KeySequenceCollector(KEYS), "58#*9") == [("*9", "supervisor")]


def test_unknown_sequences_do_nothing() -> None:
    assert feed(KeySequenceCollector(KEYS), "*5*7*8123#") == []


def test_star_star_nine_still_escalates() -> None:
    assert feed(KeySequenceCollector(KEYS), "**9") == [("*9", "supervisor")]


def test_inter_digit_timeout_breaks_a_sequence() -> None:
    c = KeySequenceCollector(KEYS, inter_digit_timeout_s=2.0)
    assert c.feed("*", 0.0) is None
    assert c.feed("9", 2.5) is None
    assert c.pending == ""


def test_two_sequences_in_a_row() -> None:
    assert feed(KeySequenceCollector(KEYS), "*1*2") == [("*1", "flag"), ("*2", "warn")]


def test_garbage_digits_are_rejected() -> None:
    c = KeySequenceCollector(KEYS)
    for junk in ("", "99", "x", "\x00", "*9"):
        assert c.feed(junk, 0.0) is None
    assert c.pending == ""
