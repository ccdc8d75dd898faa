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

import json
import logging
import re
import unicodedata
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "CALL_ID_RE",
    "INVISIBLE_CATEGORIES",
    "SafeLogFormatter",
    "UnsafeValueError",
    "UntrustedJsonError",
    "clean_caller_name",
    "clean_caller_number",
    "clean_caller_text",
    "clean_log_value",
    "is_safe_call_id",
    "json_for_terminal",
    "load_untrusted_json",
    "printable",
    "safe_call_id",
    "safe_dtmf",
    "safe_user_name",
]

#: A call id: the linkedid of the call's first channel (``1732800000.123``) or anything of the same shape.
CALL_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_DTMF_RE = re.compile(r"[0-9*#A-D]{1,32}")
#: A console user name (kasuhara_ari.accounts): safe in JSON, logs, audit records and cookies.
USER_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")

#: Caps for stored text. A SIP From header can carry kilobytes; evidence needs the start of it, not all.
NAME_MAX_CHARS = 256
NUMBER_MAX_CHARS = 64
REASON_MAX_CHARS = 1000

#: Unicode categories that are invisible or change how text around them is shown (controls, format
#: characters such as bidi overrides and zero-width joiners, line/paragraph separators, surrogates,
#: private use, unassigned).
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


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


def safe_user_name(value: object) -> str:
    """Return ``value`` if it is a console user name (``[a-z0-9][a-z0-9._-]{0,63}``); raise otherwise.

    Lower case only, so ``Admin`` and ``admin`` can never be two accounts; never "fixed" (a fixed name
    could be someone else's)."""
    if not isinstance(value, str) or USER_NAME_RE.fullmatch(value) is None:
        raise UnsafeValueError(
            f"not a user name {_show(value)}: 1-64 characters a-z 0-9 . _ - (lower case), starting with "
            "a letter or digit"
        )
    return value


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _escape(text: str) -> str:
    invisible = INVISIBLE_CATEGORIES
    return "".join(_escape_char(ch) if unicodedata.category(ch) in invisible else ch for ch in text)


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


def printable(value: object, *, max_chars: int = 200) -> str:
    """Untrusted text (an S3 key, an audit field, an MQTT payload value) for a terminal or a log line.

    Whoever can write to the bucket or the broker chooses these strings: ESC, CR/LF, C1 controls and bidi
    overrides would let them forge log lines or drive the terminal, so all of them become visible escapes
    and the text is capped. ``None`` shows as ``-``.
    """
    if value is None:
        return "-"
    return (
        clean_caller_text(
            value if isinstance(value, str | bytes) else str(value), max_chars=max(16, max_chars)
        )
        or ""
    )


def _json_escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def json_for_terminal(doc: object, *, indent: int | None = None) -> str:
    """One line of JSON that is still readable (``ensure_ascii=False``) but carries no raw control, format
    or bidi character: those are written as ``\\uXXXX`` escapes, which every JSON reader decodes to the
    same value. (``json.dumps`` escapes only C0 controls: DEL, C1 and U+202E would reach the terminal.)"""
    separators = (",", ": ") if indent is not None else (",", ":")
    text = json.dumps(doc, ensure_ascii=False, indent=indent, separators=separators, default=str)
    # A raw newline can only be the indentation's (json.dumps escapes those inside strings).
    return "".join(
        _json_escape(ch) if ch != "\n" and unicodedata.category(ch) in INVISIBLE_CATEGORIES else ch
        for ch in text
    )


class UntrustedJsonError(ValueError):
    """A JSON document from outside (bucket, spool, broker) that is not safe to use; says why."""


#: Deeper than any document this app writes (metadata nests 3 levels): a deep one is hostile, and nesting
#: near Python's recursion limit breaks whatever later walks or re-encodes it.
JSON_MAX_DEPTH = 64
JSON_MAX_BYTES = 16 * 1024 * 1024


def _reject_constant(name: str) -> Any:
    raise UntrustedJsonError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):  # 1e999 is valid JSON and would be Infinity
        raise UntrustedJsonError(f"number {text[:20]} is not finite")
    return value


def _depth_ok(doc: object, max_depth: int) -> bool:
    stack: list[tuple[object, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > max_depth:
            return False
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return True


def load_untrusted_json(
    data: bytes | str, *, max_bytes: int = JSON_MAX_BYTES, max_depth: int = JSON_MAX_DEPTH
) -> Any:
    """Parse JSON someone else wrote, or raise :class:`UntrustedJsonError` (a ``ValueError``) — never
    ``RecursionError``, ``OverflowError`` or a ``NaN``/``Infinity`` float that breaks arithmetic later.

    Larger than ``max_bytes`` or nested deeper than ``max_depth`` is refused.
    """
    if len(data) > max_bytes:
        raise UntrustedJsonError(f"larger than {max_bytes} bytes")
    try:
        doc = json.loads(data, parse_constant=_reject_constant, parse_float=_finite_float)
    except UntrustedJsonError:
        raise
    except RecursionError:
        raise UntrustedJsonError(f"nested deeper than {max_depth} levels") from None
    except UnicodeDecodeError:
        raise UntrustedJsonError("not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise UntrustedJsonError(f"not JSON ({exc.msg} at {exc.pos})") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise UntrustedJsonError(f"not usable JSON ({str(exc)[:80]})") from None
    if not _depth_ok(doc, max_depth):
        raise UntrustedJsonError(f"nested deeper than {max_depth} levels")
    return doc


class SafeLogFormatter(logging.Formatter):
    """One log record, one line, no terminal controls: the last line of defence for every value a log
    call forgot to clean (an S3 key with ESC or a newline could otherwise forge a log line or drive the
    operator's terminal). Only the message is escaped; a traceback keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _escape(record.message)
        return super().formatMessage(record)


_FIELD = re.compile(r"([a-z][a-z0-9_]*)=(\S+)")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line for log shippers (``general.log_format = "json"``): ``at``, ``level``,
    ``logger``, ``message``, and each ``key=value`` of our structured messages as a field of its own
    (``web event=login account=sato`` gives ``"event": "login", "account": "sato"``; the first word is
    ``scope``). A traceback goes into ``exc``. JSON escaping keeps a forged newline inside its string."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        doc: dict[str, object] = {
            "at": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        head = message.split(" ", 1)[0]
        if head.isidentifier() and "=" not in head:
            doc["scope"] = head
        for key, value in _FIELD.findall(message):
            if key not in doc:
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)
