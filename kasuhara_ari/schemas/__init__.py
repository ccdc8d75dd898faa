"""Versioned JSON Schemas of what kasuhara-ari hands to other systems, and validators for them.

- ``event-1.json`` — ``kasuhara.event/1``, every MQTT payload (call, retention, audit, status).
- ``recording-1.json`` — ``kasuhara.recording/1``, the metadata stored beside each recording.

A schema file never changes meaning once released: a new required field or a changed meaning is a new
file (``event-2.json``) and a new ``schema`` value, and consumers pick by the payload's ``schema``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from importlib import resources
from typing import Any

import jsonschema  # type: ignore[import-untyped]

EVENT_SCHEMA = "kasuhara.event/1"
RECORDING_SCHEMA = "kasuhara.recording/1"

_FILES = {EVENT_SCHEMA: "event-1.json", RECORDING_SCHEMA: "recording-1.json"}


class SchemaError(ValueError):
    """A document does not match its schema; the message says where and why."""


def load(schema: str) -> dict[str, Any]:
    """The JSON Schema for a ``schema`` value such as ``"kasuhara.event/1"`` (a fresh copy)."""
    return json.loads(_text(schema))  # type: ignore[no-any-return]


@functools.cache
def _text(schema: str) -> str:
    try:
        name = _FILES[schema]
    except KeyError:
        raise SchemaError(f"unknown schema {schema!r} (known: {', '.join(_FILES)})") from None
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


@functools.cache
def _validator(schema: str) -> Any:
    return jsonschema.Draft202012Validator(json.loads(_text(schema)))


def _check(schema: str, document: object, what: str) -> None:
    if not isinstance(document, Mapping):
        raise SchemaError(f"{what} is a {type(document).__name__}, not a JSON object ({schema})")
    errors = sorted(
        _validator(schema).iter_errors(dict(document)), key=lambda e: [str(p) for p in e.absolute_path]
    )
    if errors:
        lines = []
        for err in errors[:5]:
            where = "$" + "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
            lines.append(f"{where}: {err.message}")
        more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
        raise SchemaError(f"{what} does not match {schema}: " + "; ".join(lines) + more)


def _name(document: object, key: str) -> str:
    value = document.get(key) if isinstance(document, Mapping) else None
    return repr(str(value)[:64])


def validate_event(payload: object) -> None:
    """Raise :class:`SchemaError` unless ``payload`` (parsed JSON) is a valid ``kasuhara.event/1`` payload."""
    _check(EVENT_SCHEMA, payload, f"event {_name(payload, 'event')}")


def validate_recording(metadata: object) -> None:
    """Raise :class:`SchemaError` unless ``metadata`` (parsed JSON) is valid ``kasuhara.recording/1``."""
    _check(RECORDING_SCHEMA, metadata, f"recording metadata {_name(metadata, 'call_id')}")
