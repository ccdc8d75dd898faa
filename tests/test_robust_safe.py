"""Issue 12: the helpers every reader of untrusted JSON and every printer of untrusted text goes through."""

from __future__ import annotations

import json
import unicodedata

import pytest

from kasuhara_ari.safe import (
    JSON_MAX_DEPTH,
    UntrustedJsonError,
    json_for_terminal,
    load_untrusted_json,
    printable,
)
from kasuhara_ari.storage import parse_started_at, recording_keys
from kasuhara_ari.uploader import hold_signal


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"[" * 100_000, "nested"),
        (b'{"a":' * 5000 + b"1" + b"}" * 5000, "nested"),
        (b"[" * (JSON_MAX_DEPTH + 1) + b"]" * (JSON_MAX_DEPTH + 1), "nested"),
        (b'{"duration_s": Infinity}', "Infinity"),
        (b'{"x": NaN}', "NaN"),
        (b'{"duration_s": 1e999}', "not finite"),
        (b"1" * 5000, "usable"),
        (b'{"a": "\xc3\x28"}', "UTF-8"),
        (b'{"a": 1', "not JSON"),
    ],
)
def test_hostile_json_is_a_value_error_that_says_why(data: bytes, why: str) -> None:
    with pytest.raises(UntrustedJsonError, match=why):
        load_untrusted_json(data)


def test_sane_json_and_limits() -> None:
    depth = JSON_MAX_DEPTH
    assert load_untrusted_json(b"[" * depth + b"]" * depth) is not None
    assert load_untrusted_json('{"name": "山田"}') == {"name": "山田"}
    with pytest.raises(UntrustedJsonError, match="larger than 10 bytes"):
        load_untrusted_json(b'{"a": "0123456789"}', max_bytes=10)


@pytest.mark.parametrize(
    "value", ["evil\x1b[2J\r\nx", "a\u009b31m", "\u202egnp.exe", "del\x7f", "\u2028line"]
)
def test_printable_leaves_no_control_character(value: str) -> None:
    shown = printable(value)
    assert not any(unicodedata.category(ch) in {"Cc", "Cf", "Zl", "Zp"} for ch in shown), shown
    assert printable(None) == "-"
    assert len(printable("x" * 10_000, max_chars=50)) <= 50


def test_json_for_terminal_escapes_what_json_dumps_leaves_raw() -> None:
    doc = {"k": "a\u009b2J\u202e\x7f\U000e0001 山田", "n": [1, None]}
    text = json_for_terminal(doc)
    assert not any(unicodedata.category(ch) in {"Cc", "Cf", "Co", "Cn"} for ch in text), text
    assert json.loads(text) == doc  # still the same data for machines
    assert "山田" in text  # readable
    assert json.loads(json_for_terminal(doc, indent=1)) == doc


def test_impossible_started_at_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="range"):
        parse_started_at("0001-01-01T00:00:00+14:00")
    with pytest.raises(ValueError, match="range"):
        recording_keys("c1", "0001-01-01T00:00:00+14:00")
    assert parse_started_at("0001-01-01T00:00:00-01:00").year == 1


@pytest.mark.parametrize(
    ("raw", "held"),
    [
        (b'{"hold": {"reason": "x"}, "started_at": 5}', True),
        (b'{"flags": ["harassment"]}', True),
        (b'{"hold": null, "flags": []}', False),
        (b'{"hold": null, "flags": ["repeat_caller"]}', False),
        (b'{"started_at": 1e999999, "flags": ["harassment"]}', True),
        (b'{"call_id": "x", "hold": {"reason": "x"' + b"[" * 100_000, True),  # truncated or hostile
        (b"[" * 100_000, False),
    ],
)
def test_hold_signal_in_unusable_metadata(raw: bytes, held: bool) -> None:
    assert hold_signal(raw) is held


def test_log_lines_cannot_be_forged_or_drive_the_terminal() -> None:
    import logging

    from kasuhara_ari.safe import SafeLogFormatter

    record = logging.LogRecord(
        "x", logging.ERROR, __file__, 1, "key=%s", ("evil\x1b[2J\n2026-01-01 INFO forged \u202e",), None
    )
    line = SafeLogFormatter("%(levelname)s %(message)s").format(record)
    assert "\n" not in line and "\x1b" not in line and "\u202e" not in line
    assert line == "ERROR key=evil\\x1b[2J\\x0a2026-01-01 INFO forged \\u202e"
