"""The one place where untrusted strings become safe values.

Callers control their caller-ID number and name (any bytes, any length); AGI and ARI hand us channel
variables, ids and digits that ultimately come from the network. Nothing from there may reach an S3 key, a
file path, a shell command, an MQTT topic or a log line unchecked. Two kinds of function live here:

- ``safe_*``: *identifiers* that end up in keys, paths and topics. They validate and raise
  :class:`UnsafeValueError` (a ``ValueError``) rather than repair: a repaired id could collide with another.
- ``clean_*``: *text* that is only ever stored or shown (caller name and number, reasons). It is never
  refused: control and invisible characters are replaced by visible escapes (``\\x00``, ``\\n``,
  ``\\u202e``), invalid UTF-8 bytes become ``\\xNN``, and the length is capped with a visible ``…(+N)``
  suffix. Cleaning is idempotent (cleaning twice changes nothing), so every layer may clean again.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = [
    "CALL_ID_RE",
    "UnsafeValueError",
    "clean_caller_name",
    "clean_caller_number",
    "clean_caller_text",
    "clean_log_value",
    "is_safe_call_id",
    "safe_call_id",
    "safe_dtmf",
]

#: A call id: the linkedid of the call's first channel (``1732800000.123``) or anything of the same shape.
CALL_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_DTMF_RE = re.compile(r"[0-9*#A-D]{1,32}")

#: Caps for stored text. A SIP From header can carry kilobytes; evidence needs the start of it, not all.
NAME_MAX_CHARS = 256
NUMBER_MAX_CHARS = 64
REASON_MAX_CHARS = 1000

#: Unicode categories that are invisible or change how text around them is shown (controls, format
#: characters such as bidi overrides and zero-width joiners, line/paragraph separators, surrogates,
#: private use, unassigned).
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


class UnsafeValueError(ValueError):
    """An identifier from outside is not safe to use; the message names what and shows its start."""


def _show(value: object) -> str:
    """A short, printable preview of a rejected value for error messages and logs."""
    text = value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)
    cut = _escape(text[:40])
    return repr(cut + ("…" if len(text) > 40 else ""))


def is_safe_call_id(value: object) -> bool:
    """Whether ``value`` may be used as a call id in a key, path, shell command or topic."""
    return isinstance(value, str) and CALL_ID_RE.fullmatch(value) is not None and ".." not in value


def safe_call_id(value: object) -> str:
    """Return ``value`` if it is a safe call id (``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``, no ``..``).

    Raises :class:`UnsafeValueError` otherwise; never "fixes" the value (a fixed id could name another call).
    """
    if not is_safe_call_id(value):
        raise UnsafeValueError(f"unsafe call id {_show(value)}")
    assert isinstance(value, str)
    return value


def safe_dtmf(value: object) -> str:
    """Return ``value`` if it is a DTMF sequence (``0-9 * # A-D``, 1–32 digits); raise otherwise."""
    if not isinstance(value, str) or _DTMF_RE.fullmatch(value) is None:
        raise UnsafeValueError(f"not a DTMF sequence {_show(value)}")
    return value


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _escape(text: str) -> str:
    return "".join(_escape_char(ch) if unicodedata.category(ch) in _ESCAPED_CATEGORIES else ch for ch in text)


def clean_caller_text(value: object, *, max_chars: int = NAME_MAX_CHARS) -> str | None:
    """Text from outside made safe to store and show; ``None`` stays ``None``.

    Bytes are decoded as UTF-8 (invalid bytes become ``\\xNN``); control, format and other invisible
    characters become visible escapes; whitespace runs are kept as they are (spaces are harmless). The
    result is at most ``max_chars`` characters: longer text is cut and ends in ``…(+N)`` with the number of
    characters cut. Idempotent: ``clean(clean(x)) == clean(x)``.
    """
    if value is None:
        return None
    if max_chars < 16:
        raise ValueError("max_chars must be at least 16")
    if isinstance(value, bytes | bytearray):
        text = bytes(value).decode("utf-8", "backslashreplace")
    else:
        text = str(value)
    text = _escape(text)
    if len(text) <= max_chars:
        return text
    # The suffix can only get shorter than this bound, so head + suffix always fits in max_chars; a result
    # that fits is returned unchanged by the next call, which makes cleaning idempotent.
    head = text[: max_chars - len(f"…(+{len(text)})")]
    # Never split an escape sequence such as \x0a in half.
    partial = re.search(r"\\(x[0-9a-f]?|u[0-9a-f]{0,3}|U[0-9a-f]{0,7})?$", head)
    if partial:
        head = head[: partial.start()]
    return f"{head}…(+{len(text) - len(head)})"


def clean_caller_name(value: object) -> str | None:
    """A caller-ID name (CNAM, SIP display name) for metadata and events."""
    return clean_caller_text(value, max_chars=NAME_MAX_CHARS)


def clean_caller_number(value: object) -> str | None:
    """A caller-ID number for metadata and events: cleaned like a name, capped shorter.

    Not reduced to digits: ``anonymous``, ``+81…`` and SIP URIs are evidence as they came.
    """
    return clean_caller_text(value, max_chars=NUMBER_MAX_CHARS)


def clean_log_value(value: object, *, max_chars: int = 80) -> str:
    """Text for a ``key=value`` log line: escaped, capped, and without spaces or ``=`` that would split it."""
    text = clean_caller_text(value, max_chars=max(16, max_chars)) or ""
    return text.replace("\\", "\\\\").replace(" ", "\\x20").replace("=", "\\x3d") if text else '""'
