"""The versioned JSON Schemas: well-formed, in step with the code's registry, and strict where it matters."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest

from kasuhara_ari import schemas
from kasuhara_ari.events import CALL_EVENTS, MemoryEvents, build_payload
from kasuhara_ari.schemas import SchemaError, validate_event, validate_recording
from kasuhara_ari.uploader import orphan_metadata, salvage_metadata

from audio import write_tone_wav

AT = "2025-01-31T09:15:02.123+09:00"


@pytest.mark.parametrize("name", [schemas.EVENT_SCHEMA, schemas.RECORDING_SCHEMA])
def test_schema_files_are_valid_draft_2020_12(name: str) -> None:
    schema = schemas.load(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["title"] == name


def test_unknown_schema_name_is_refused() -> None:
    with pytest.raises(SchemaError, match="unknown schema"):
        schemas.load("kasuhara.event/99")


def _per_event_required(schema: dict[str, Any]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for rule in schema["allOf"]:
        const = rule["if"]["properties"]["event"].get("const")
        if const is not None:
            found[const] = set(rule["then"].get("required", []))
    return found


def test_schema_and_code_registry_agree() -> None:
    schema = schemas.load(schemas.EVENT_SCHEMA)
    assert set(schema["$defs"]["call_event_name"]["enum"]) == set(CALL_EVENTS)
    required = _per_event_required(schema)
    for event, fields in CALL_EVENTS.items():
        assert required.get(event, set()) == set(fields), event
    assert set(required) - set(CALL_EVENTS) == {"status"}


def _minimal(event: str) -> dict[str, Any]:
    values: dict[str, Any] = {
        "direction": "inbound",
        "agent": "PJSIP/agent",
        "target": "PJSIP/agent",
        "action": "supervisor",
        "key": "*9",
        "supervisor": "PJSIP/supervisor",
        "duration_s": 12.5,
        "count": 3,
        "error": "AMI not connected",
        "reason": "bad.json: nested deeper than 64 levels",
        "offset_s": 70.2,
        "mode": "observe",
        "talking_s": 60.0,
        "attempts": 3,
        "trigger": "flag",
        "until": "2025-01-31T09:20:02.123+00:00",
        "level_dbfs": -12.3,
        "baseline_dbfs": -27.9,
        "kind": "shouting",
    }
    fields = {name: values[name] for name in CALL_EVENTS[event]}
    if event == "recording_stored":
        fields["key"] = "recordings/2025/01/31/1738282502.17.wav"
    return build_payload(event, "1738282502.17", fields)


@pytest.mark.parametrize("event", sorted(CALL_EVENTS))
def test_every_registered_call_event_validates_with_its_required_fields(event: str) -> None:
    validate_event(_minimal(event))


@pytest.mark.parametrize("event", sorted(e for e, fields in CALL_EVENTS.items() if fields))
def test_a_missing_per_event_field_is_reported(event: str) -> None:
    payload = _minimal(event)
    missing = sorted(CALL_EVENTS[event])[0]
    del payload[missing]
    with pytest.raises(SchemaError, match=f"'{missing}' is a required property"):
        validate_event(payload)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"schema": "kasuhara.event/2"}, "schema"),
        ({"at": "2025-01-31T09:15:02+09:00"}, "at"),  # no milliseconds
        ({"at": "2025-01-31T09:15:02.123"}, "at"),  # no offset
        ({"event": "made_up"}, "event"),
        ({"event": "retention./x"}, "event"),
        ({"call_id": "a/b"}, "call_id"),
        ({"call_id": "+"}, "call_id"),
        ({"seq": 0}, "seq"),
        ({"direction": "sideways"}, "direction"),
    ],
)
def test_invalid_payloads_are_rejected_with_the_place(change: dict[str, Any], match: str) -> None:
    payload = _minimal("started")
    payload.update(change)
    with pytest.raises(SchemaError, match=rf"\$\.{match}: "):
        validate_event(payload)


def test_common_fields_are_required() -> None:
    for field in ("schema", "event", "at", "call_id"):
        payload = _minimal("started")
        del payload[field]
        with pytest.raises(SchemaError, match=f"'{field}' is a required property"):
            validate_event(payload)


def test_extra_properties_retention_audit_and_status_are_allowed() -> None:
    payload = _minimal("ended")
    payload["something_new"] = {"nested": [1, 2]}
    validate_event(payload)
    validate_event(build_payload("retention.purged", None, {"key": "recordings/x.wav"}))
    validate_event(build_payload("audit.download", "1738282502.17", {"by": "alice"}))
    status = {"schema": schemas.EVENT_SCHEMA, "event": "status", "at": AT, "state": "online"}
    with pytest.raises(SchemaError, match="'hostname' is a required property"):
        validate_event(status)
    validate_event({**status, "hostname": "pbx1", "version": "0.1.0"})
    with pytest.raises(SchemaError, match=r"\$\.state: "):
        validate_event({**status, "hostname": "pbx1", "version": "0.1.0", "state": "sleepy"})


def test_not_an_object_is_a_schema_error() -> None:
    with pytest.raises(SchemaError, match="not a JSON object"):
        validate_event(["started"])


def test_memory_events_payloads_validate() -> None:
    events = MemoryEvents()
    events.emit("started", "c-1", direction="outbound", caller={"number": "0312345678", "name": None})
    events.emit("ended", call_id="c-1", duration_s=None)  # call_id as keyword lands in the payload too
    for payload in events.events:
        validate_event(payload)
    assert [e["event"] for e in events.of("c-1")] == ["started", "ended"]


# --- recording metadata ---------------------------------------------------------------------------------

RECORDING: dict[str, Any] = {
    "schema": "kasuhara.recording/1",
    "call_id": "1738282502.17",
    "direction": "inbound",
    "caller": {"number": "0312345678", "name": "山田"},
    "target": "PJSIP/agent",
    "agent": "PJSIP/agent",
    "started_at": "2025-01-31T00:15:02.123+00:00",
    "answered_at": "2025-01-31T00:15:02.456+00:00",
    "ended_at": "2025-01-31T00:17:00.001+00:00",
    "duration_s": 117.5,
    "notice_played": True,
    "audio": {"format": "wav", "expected": True},
    "escalations": [
        {
            "at": "2025-01-31T00:16:00.000+00:00",
            "action": "supervisor",
            "key": "*9",
            "by": "agent",
            "supervisor": "PJSIP/supervisor",
            "result": "joined",
        }
    ],
    "flags": ["harassment"],
    "hold": {"reason": "flagged by agent as harassment", "by": "agent", "at": "2025-01-31T00:16:30Z"},
    "timeline": [],
}


def test_recording_metadata_before_and_after_upload_validates() -> None:
    validate_recording(RECORDING)
    uploaded = copy.deepcopy(RECORDING)
    uploaded["audio"].update(key="recordings/2025/01/31/1738282502.17.wav", bytes=123456, sha256="ab" * 32)
    validate_recording(uploaded)
    never_answered = copy.deepcopy(RECORDING)
    never_answered.update(agent=None, answered_at=None, duration_s=None, escalations=[], flags=[], hold=None)
    never_answered["audio"] = {"format": "wav", "expected": False}
    validate_recording(never_answered)


def test_what_orphan_adoption_writes_validates_and_only_an_orphan_may_not_know_its_direction(
    tmp_path: Path,
) -> None:
    """The uploader's metadata for adopted audio (and for unusable metadata) has ``direction: null``:
    release 0.1.0 stored such documents that its own schema refused (tests/test_release_fixtures.py)."""
    wav = tmp_path / "1738282502.17.wav"
    write_tone_wav(wav, 440.0)
    validate_recording(orphan_metadata("1738282502.17", wav))
    validate_recording(salvage_metadata("1738282502.17", None, "unreadable", "quarantine/x"))
    not_orphan = copy.deepcopy(RECORDING)
    not_orphan["direction"] = None
    with pytest.raises(SchemaError, match=r"\$\.direction: "):
        validate_recording(not_orphan)


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        (("schema",), "kasuhara.recording/2", r"\$\.schema: "),
        (("call_id",), "../etc", r"\$\.call_id: "),
        (("direction",), "in", r"\$\.direction: "),
        (("started_at",), "2025-01-31 00:15:02", r"\$\.started_at: "),
        (("audio", "sha256"), "xyz", r"\$\.audio\.sha256: "),
        (("audio", "key"), "elsewhere/x.wav", r"\$\.audio\.key: "),
        (("flags",), "harassment", r"\$\.flags: "),
        (("hold",), {"reason": "x"}, r"\$\.hold: "),
        (("escalations",), [{"action": "supervisor"}], r"\$\.escalations\[0\]: 'at' is a required"),
    ],
)
def test_invalid_recording_metadata_is_rejected(path: tuple[str, ...], value: Any, match: str) -> None:
    doc = copy.deepcopy(RECORDING)
    target = doc
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    with pytest.raises(SchemaError, match=match):
        validate_recording(doc)


@pytest.mark.parametrize("key", ["caller", "target", "hold", "audio", "escalations", "notice_played"])
def test_every_design_key_is_required_in_metadata(key: str) -> None:
    doc = copy.deepcopy(RECORDING)
    del doc[key]
    with pytest.raises(SchemaError, match=f"'{key}' is a required property"):
        validate_recording(doc)
