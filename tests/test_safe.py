"""Untrusted strings → safe values (kasuhara_ari.safe)."""

from __future__ import annotations

import unicodedata

import pytest

from kasuhara_ari.safe import (
    NAME_MAX_CHARS,
    UnsafeValueError,
    clean_caller_name,
    clean_caller_number,
    clean_caller_text,
    clean_log_value,
    is_safe_call_id,
    safe_call_id,
    safe_dtmf,
)

NASTY = [
    "../../etc/passwd",
    "a/b",
    "..",
    ".hidden",
    "a..b",
    "line\nbreak",
    "nul\x00byte",
    "tab\tchar",
    "bell\x07",
    "esc\x1b[31mred",
    "",
    " ",
    "x" * 129,
    "１２３",  # full-width digits are not ASCII
    "a b",
    "a;rm -rf /",
    "a$(id)",
    "a`id`",
    "a,b",
    "id\u202egnp.exe",
]


@pytest.mark.parametrize("value", ["1732800000.123", "a", "A-b_c.9", "x" * 128, "kasuhara-1"])
def test_safe_call_id_accepts_ids(value: str) -> None:
    assert safe_call_id(value) == value
    assert is_safe_call_id(value)


@pytest.mark.parametrize("value", NASTY)
def test_safe_call_id_refuses_everything_else(value: str) -> None:
    assert not is_safe_call_id(value)
    with pytest.raises(UnsafeValueError):
        safe_call_id(value)


@pytest.mark.parametrize("value", [None, 123, b"abc", ["a"]])
def test_safe_call_id_refuses_non_strings(value: object) -> None:
    with pytest.raises(UnsafeValueError):
        safe_call_id(value)


def test_unsafe_error_message_is_short_and_printable() -> None:
    with pytest.raises(UnsafeValueError) as info:
        safe_call_id("\x00" * 10_000)
    message = str(info.value)
    assert len(message) < 300
    assert "\x00" not in message


def test_safe_dtmf() -> None:
    assert safe_dtmf("*9") == "*9"
    assert safe_dtmf("0123456789*#ABCD") == "0123456789*#ABCD"
    for bad in ["", "*9\n", "E", "a", "1" * 33, None]:
        with pytest.raises(UnsafeValueError):
            safe_dtmf(bad)


def _visible(text: str) -> bool:
    return all(unicodedata.category(ch) not in {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"} for ch in text)


def test_clean_escapes_controls_visibly() -> None:
    assert clean_caller_text("a\x00b") == "a\\x00b"
    assert clean_caller_text("line1\nline2\r") == "line1\\x0aline2\\x0d"
    assert clean_caller_text("esc\x1b[31m") == "esc\\x1b[31m"
    assert clean_caller_text("id\u202eevil") == "id\\u202eevil"  # bidi override
    assert clean_caller_text("zero\u200bwidth") == "zero\\u200bwidth"
    assert clean_caller_text("sep\u2028x") == "sep\\u2028x"


def test_clean_keeps_ordinary_text() -> None:
    for text in ["山田 太郎", "../../etc/passwd", "O'Brien & Co", "+81-3-1234-5678", "anonymous", "🙂"]:
        assert clean_caller_text(text) == text


def test_clean_decodes_bytes_and_shows_invalid_utf8() -> None:
    assert clean_caller_text("山田".encode()) == "山田"
    assert clean_caller_text(b"ab\xff\xfe") == "ab\\xff\\xfe"
    assert clean_caller_text(b"a\x00") == "a\\x00"


def test_clean_handles_lone_surrogates() -> None:
    out = clean_caller_text("a\udc80b")
    assert out == "a\\udc80b"
    assert out.encode("utf-8")


def test_clean_caps_long_text_with_visible_count() -> None:
    text = "x" * 10_000
    out = clean_caller_text(text)
    assert out is not None
    assert len(out) <= NAME_MAX_CHARS
    head, _, count = out.partition("…(+")
    assert count.endswith(")")
    assert len(head) + int(count[:-1]) == 10_000


def test_clean_never_splits_an_escape() -> None:
    for offset in range(0, 8):
        text = "y" * (NAME_MAX_CHARS - 12 + offset) + "\x00" * 100
        out = clean_caller_text(text)
        assert out is not None
        assert len(out) <= NAME_MAX_CHARS
        head = out.partition("…(+")[0]
        # whatever survives of the NULs is whole escapes
        tail = head.lstrip("y")
        assert len(tail) % 4 == 0
        assert tail == "\\x00" * (len(tail) // 4)


@pytest.mark.parametrize(
    "value",
    [
        *NASTY,
        "\x00" * 10_000,
        "a\nb" * 5000,
        b"\xff" * 3000,
        "\u202e" * 300,
        "山" * 1000,
        "x" * 256,
        "x" * 257,
    ],
)
def test_clean_is_idempotent_and_visible(value: object) -> None:
    once = clean_caller_text(value)
    assert once is not None
    assert clean_caller_text(once) == once
    assert _visible(once)
    assert len(once) <= NAME_MAX_CHARS


def test_clean_none_and_limits() -> None:
    assert clean_caller_text(None) is None
    assert clean_caller_name(None) is None
    long_number = clean_caller_number("1" * 500)
    assert long_number is not None
    assert len(long_number) <= 64
    with pytest.raises(ValueError, match="max_chars"):
        clean_caller_text("x", max_chars=3)


def test_clean_log_value_is_one_token() -> None:
    out = clean_log_value("a b=c\nd")
    assert " " not in out
    assert "=" not in out
    assert "\n" not in out
    assert clean_log_value("") == '""'
