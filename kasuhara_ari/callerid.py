"""What the phone of someone the app rings shows: caller ID for the legs the app originates.

A supervisor whose phone rings as "Anonymous" during a busy shift may not pick it up. Each leg the app
originates (the ``*9`` escalation, ``kasuhara supervise``, the customer of an outbound call) gets a name and
number from an operator's template (``[callerid]``) filled with the call's own fields. The fields come from
outside (a caller's name is whatever their network sent), so the rendered values are cleaned here, in one
place: no control or format characters (no header can be smuggled into the SIP INVITE), no quotes or
backslashes, a capped length, and numbers reduced to dialable characters.

Asterisk turns the values into the From header of the INVITE through the channel's connected line
(``CONNECTEDLINE(name)``/``CONNECTEDLINE(num)``), set when the channel is created, before it is dialled.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass

from .safe import INVISIBLE_CATEGORIES

__all__ = [
    "FIELDS",
    "NAME_MAX_BYTES",
    "NUMBER_MAX_CHARS",
    "CallerId",
    "TemplateError",
    "agent_label",
    "check_template",
    "clean_display_name",
    "clean_display_number",
    "dialled_number",
    "mode_label",
    "render",
    "repairs",
]

#: The fields a template may use, per kind of leg.
FIELDS: Mapping[str, frozenset[str]] = {
    "escalation": frozenset({"agent", "caller_number", "caller_name", "call_id", "key"}),
    "supervise": frozenset({"agent", "caller_number", "caller_name", "call_id", "mode", "mode_label"}),
    "outbound": frozenset({"agent", "agent_number", "agent_name", "customer_number", "call_id"}),
}

#: Phones show 16-32 characters of a display name, and Asterisk 22 cuts a longer one at 88 bytes, in
#: the middle of a character if it must (measured here): so names are capped in UTF-8 bytes, at a
#: character boundary, with a visible "…" (80 bytes: 26 Japanese characters).
NAME_MAX_BYTES = 80
NUMBER_MAX_CHARS = 32

_NUMBER_CHARS = re.compile(r"[^0-9+*#]")
_MODE_LABELS = {
    "ja": {"listen": "モニター", "whisper": "ウィスパー", "barge": "割込み"},
    "en": {"listen": "Listen", "whisper": "Whisper", "barge": "Barge"},
}


class TemplateError(ValueError):
    """A caller-ID template names a field that does not exist or uses format syntax that is not allowed."""


@dataclass(frozen=True)
class CallerId:
    """A rendered caller ID; an empty part is left unset (the phone shows what Asterisk has)."""

    name: str
    number: str

    def variables(self) -> dict[str, str]:
        """Channel variables that set it on a channel that is created but not yet dialled."""
        out: dict[str, str] = {}
        if self.name:
            out["CONNECTEDLINE(name)"] = self.name
            out["CALLERID(name)"] = self.name
        if self.number:
            out["CONNECTEDLINE(num)"] = self.number
            out["CALLERID(num)"] = self.number
        return out

    def __bool__(self) -> bool:
        return bool(self.name or self.number)


def check_template(template: str, kind: str) -> None:
    """Raise :class:`TemplateError` unless ``template`` uses only plain ``{field}`` of ``kind``'s fields.

    No attribute or index access, conversions or format specs: a template is operator text, but it must not
    be able to reach into Python objects (``{agent.__class__}``).
    """
    allowed = FIELDS[kind]
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise TemplateError(f"{template!r}: {exc} (write {{{{ and }}}} for literal braces)") from None
    for _literal, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in allowed:
            raise TemplateError(
                f"{template!r}: unknown field {{{field}}} (known: {', '.join(sorted(allowed))})"
            )
        if spec or conversion:
            raise TemplateError(f"{template!r}: {{{field}}} takes no format spec or conversion")


def clean_display_name(value: object) -> str:
    """A display name that is safe in a SIP header and readable on a phone: control, format and other
    invisible characters, quotes and backslashes removed, whitespace runs collapsed, length capped."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes | bytearray) else str(value)
    kept = []
    for ch in text:
        if ch in '"\\':
            continue
        category = unicodedata.category(ch)
        if category in INVISIBLE_CATEGORIES:  # removed, not escaped: "\\x0d" on a phone means nothing
            kept.append(" ")  # a CR LF between two words still separates them
        elif category.startswith("Z"):
            kept.append(" ")
        else:
            kept.append(ch)
    cleaned = " ".join("".join(kept).split())
    if len(cleaned.encode()) <= NAME_MAX_BYTES:
        return cleaned
    budget, used, cut = NAME_MAX_BYTES - len("…".encode()), 0, 0
    for cut, ch in enumerate(cleaned):  # noqa: B007 - the index where the budget ran out is the result
        used += len(ch.encode())
        if used > budget:
            break
    return cleaned[:cut].rstrip() + "…"


def clean_display_number(value: object) -> str:
    """A caller-ID number made of dialable characters only (``0-9 + * #``); anything else is dropped, so
    ``anonymous`` or a SIP URI becomes empty (and the number is left unset)."""
    text = value.decode("ascii", "replace") if isinstance(value, bytes | bytearray) else str(value)
    return _NUMBER_CHARS.sub("", text)[:NUMBER_MAX_CHARS]


def render(name_template: str, number_template: str, fields: Mapping[str, object]) -> CallerId:
    """Fill both templates with ``fields`` (missing fields render empty) and clean the results."""
    values = {k: "" if v is None else str(v) for k, v in fields.items()}

    def fill(template: str) -> str:
        return string.Formatter().vformat(template, (), _Blank(values))

    return CallerId(
        name=clean_display_name(fill(name_template)), number=clean_display_number(fill(number_template))
    )


class _Blank(dict[str, str]):
    """Fields a leg does not have (e.g. no caller number yet) render as empty text, never as an error."""

    def __missing__(self, key: str) -> str:
        return ""


def repairs(name: str, number: str) -> dict[str, str]:
    """Channel variables that make a channel's own caller ID safe to copy onto a leg it dials, or ``{}``.

    Asterisk 22 copies a caller's name into the From header of the legs dialled "from" that channel, and
    a CR LF in it comes out raw (verified here: the agent's INVITE got a header line ``X: y``, and the
    agent's phone rejected the INVITE). Only a name or number that cleaning would change is rewritten:
    ordinary names (quotes included, which Asterisk escapes) are left as they came.
    """
    fixes: dict[str, str] = {}
    if (
        any(unicodedata.category(ch) in INVISIBLE_CATEGORIES for ch in name)
        or len(name.encode()) > NAME_MAX_BYTES
    ):
        fixes["CALLERID(name)"] = clean_display_name(name)
    if (
        any(unicodedata.category(ch) in INVISIBLE_CATEGORIES for ch in number)
        or len(number) > NUMBER_MAX_CHARS
    ):
        fixes["CALLERID(num)"] = clean_display_number(number)
    return fixes


def agent_label(target: str) -> str:
    """A short name for the agent from a dial target or channel name, for a phone's display.

    ``PJSIP/agent-12`` and the channel ``PJSIP/agent-12-0000001a`` → ``agent-12``;
    ``PJSIP/agent/sip:agent@10.0.0.5:5060`` → ``agent``; ``Local/1001@agents`` → ``1001``.
    """
    text = target.strip()
    tech, sep, rest = text.partition("/")
    if not sep:
        rest = tech
    resource = rest.split("/", 1)[0]
    if tech.lower() == "local":
        resource = resource.split("@", 1)[0]
        resource = re.sub(r";\d+$", "", resource)
    return re.sub(r"-[0-9a-f]{8}$", "", resource)  # the channel name's unique suffix


def dialled_number(target: str) -> str:
    """The number a dial target calls, as a caller ID number (empty when it is not a number).

    ``PJSIP/0312345678@trunk`` and ``PJSIP/trunk/sip:0312345678@carrier`` → ``0312345678``.
    """
    _tech, _sep, rest = target.strip().partition("/")
    resource = rest.rsplit("/", 1)[-1]
    if resource.startswith(("sip:", "sips:", "tel:")):
        resource = resource.split(":", 1)[1]
    return clean_display_number(resource.split("@", 1)[0].split(";", 1)[0])


def mode_label(mode: str, language: str) -> str:
    """How a supervise mode reads on a phone, in the announcement language (English otherwise)."""
    labels = _MODE_LABELS.get(language.split("_", 1)[0].lower(), _MODE_LABELS["en"])
    return labels.get(mode, mode)
