"""The handover file's pieces without servers: a call's record survives the trip through JSON unchanged
(what the next ``serve`` resumes is what the stopping one knew), and a file that is not a handover is
refused with an error, never half-applied."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kasuhara_ari.recording import CallRecord, Escalation


def _record() -> CallRecord:
    return CallRecord(
        call_id="1796320897.119",
        direction="inbound",
        caller_number="0312345678",
        caller_name="<b>山田</b>\u202e",
        target="PJSIP/agent",
        started_at="2026-12-03T09:00:00.000+00:00",
        agent="PJSIP/agent",
        answered_at="2026-12-03T09:00:00.100+00:00",
        agent_answered_at="2026-12-03T09:00:06.000+00:00",
        notice_played=True,
        recording_started=True,
        escalations=[Escalation("2026-12-03T09:01:00.000+00:00", "flag", "*1", "agent", None, "flagged")],
        flags=["harassment", "repeat_caller"],
        hold={"reason": "flagged by the agent", "by": "agent"},
        repeat_count=3,
        listed={"action": "strong_notice", "reason": "r"},
        events=[{"event": "started", "at": "2026-12-03T09:00:00.000+00:00", "direction": "inbound"}],
        talk={"caller": 12.5, "agent": 3.0},
    )


def test_a_record_round_trips_through_its_json() -> None:
    record = _record()
    doc = json.loads(json.dumps(record.as_dict()))
    assert CallRecord.from_dict(doc) == record
    assert CallRecord.from_dict(doc).as_dict() == record.as_dict()


@pytest.mark.parametrize(
    "broken",
    [
        {},
        {"call_id": "x", "direction": "inbound", "target": "t", "started_at": "s"},  # no escalations
        {"call_id": "x", "direction": "inbound", "target": "t", "started_at": "s", "escalations": 5},
    ],
)
def test_a_document_that_is_not_a_record_is_refused(broken: dict[str, object]) -> None:
    with pytest.raises((KeyError, TypeError, ValueError)):
        CallRecord.from_dict(broken)


def test_the_handover_file_is_not_taken_for_a_recording_by_the_uploader(tmp_path: Path) -> None:
    """``<id>.handover`` sits in the spool beside the call's WAV: the uploader must not upload it or read
    it as metadata of a call named ``<id>.handover``."""
    from kasuhara_ari.uploader import Spool

    (tmp_path / "1796320897.119.wav").write_bytes(b"RIFF")
    (tmp_path / "1796320897.119.handover").write_text("{}")
    assert set(Spool(tmp_path).scan()) == {"1796320897.119"}
