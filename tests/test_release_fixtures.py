"""Upgrades: what release 0.1.0 wrote must stay readable by every later release.

``tests/fixtures/release-0.1.0/bucket`` is a bucket as 0.1.0 left it, captured from ``scripts/demo`` on
the local stack (2026-12-03): a flagged call on hold (metadata, audio, hold record pinning both versions),
an orphan the uploader adopted, the audit records with their hash chains, the console's accounts and the
export-signing public key; ``events.jsonl`` is the MQTT events of that call as ``kasuhara monitor --json``
printed them. The bucket is rebuilt in memory with the SAME version ids (an upgrade never rewrites
objects: the pins in the metadata and holds must still resolve), and the current code must search, show,
download (verified against the sha256 of capture), export, verify the audit chains, load the accounts and
plan retention over it. Never edit the fixture: a change that breaks this test breaks real buckets.
"""

from __future__ import annotations

import json
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from kasuhara_ari.accounts import Accounts
from kasuhara_ari.audit import AuditLog, AuditVerifier
from kasuhara_ari.events import MemoryEvents
from kasuhara_ari.evidence.desk import EvidenceDesk, Principal
from kasuhara_ari.retention import RetentionSweep
from kasuhara_ari.schemas import validate_event, validate_recording
from kasuhara_ari.search import Filters
from kasuhara_ari.storage import MemoryStore, _Version

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "release-0.1.0"
BUCKET = FIXTURE / "bucket"
HELD = "1796321183.9"
ORPHAN = "1796314847.54"
ADMIN = Principal("upgrade-test", "admin")


def fixture_objects() -> dict[str, bytes]:
    return {
        p.relative_to(BUCKET).as_posix(): p.read_bytes() for p in sorted(BUCKET.rglob("*")) if p.is_file()
    }


def pinned_versions(objects: dict[str, bytes]) -> tuple[dict[str, str], set[str]]:
    """Each object's version id as 0.1.0 recorded it (metadata and hold pins), and the legally held keys."""
    versions: dict[str, str] = {}
    held: set[str] = set()
    for key, data in objects.items():
        if key.startswith("recordings/") and key.endswith(".json"):
            audio = json.loads(data)["audio"]
            versions[audio["key"]] = audio["version_id"]
        elif key.startswith("holds/"):
            pins = json.loads(data)["versions"]
            versions.update(pins)
            held.update(pins)
    return versions, held


def rebuilt_bucket() -> MemoryStore:
    """The bucket with each object's version id, content type and user metadata (``sha256`` of capture,
    chain heads) as S3 held them (``objects.json``), and legal holds where the hold records put them."""
    store = MemoryStore("release-0.1.0")
    objects = fixture_objects()
    stat = json.loads((FIXTURE / "objects.json").read_text(encoding="utf-8"))
    _, held = pinned_versions(objects)
    for key, data in objects.items():
        s = stat[key]
        version = _Version(
            s["version_id"], data, dict(s["user_metadata"]), s["content_type"], legal_hold=key in held
        )
        store.objects[key] = [version]
    return store


def test_the_fixture_is_whole() -> None:
    objects = fixture_objects()
    _, held = pinned_versions(objects)
    assert {k for k in objects if k.startswith("recordings/")} == {
        f"recordings/2026/12/03/{cid}.{ext}" for cid in (HELD, ORPHAN) for ext in ("json", "wav")
    }
    assert held == {f"recordings/2026/12/03/{HELD}.json", f"recordings/2026/12/03/{HELD}.wav"}
    assert len([k for k in objects if k.startswith("audit/")]) == 3
    stat = json.loads((FIXTURE / "objects.json").read_text(encoding="utf-8"))
    assert set(stat) == set(objects)
    versions, _ = pinned_versions(objects)
    assert {k: stat[k]["version_id"] for k in versions} == versions  # the pins name the stored versions


def test_metadata_and_events_of_0_1_0_validate_against_the_current_schemas() -> None:
    for key, data in fixture_objects().items():
        if key.startswith("recordings/") and key.endswith(".json"):
            validate_recording(json.loads(data))
    lines = (FIXTURE / "events.jsonl").read_text(encoding="utf-8").splitlines()
    events = [json.loads(line) for line in lines if line.strip()]
    assert {"started", "flagged", "ended", "recording_stored"} <= {e["event"] for e in events}
    for event in events:
        validate_event(event)


async def test_search_show_download_and_export_read_0_1_0_recordings(tmp_path: Path) -> None:
    store = rebuilt_bucket()
    desk = EvidenceDesk(store, MemoryEvents(), ADMIN)
    day = Filters(datetime(2026, 12, 3, tzinfo=UTC), datetime(2026, 12, 3, 23, 59, 59, tzinfo=UTC))
    found = {e.call_id: e async for e in desk.search(day, reason="upgrade test")}
    assert set(found) == {HELD, ORPHAN}
    flagged = [e.call_id async for e in desk.search(Filters(day.start, day.end, flagged=True), reason="r")]
    assert flagged == [HELD]

    shown = await desk.show(HELD, reason="upgrade test")
    assert shown.evidence.entry.doc["flags"] == ["harassment"] and shown.evidence.entry.held
    assert shown.evidence.hold is not None and shown.evidence.hold.by == "agent" and not shown.superseded

    for call_id in (HELD, ORPHAN):
        got = await desk.download(call_id, tmp_path / f"{call_id}.wav", reason="upgrade test")
        assert got.verification == "verified", (call_id, got)
        meta = json.loads(store.objects[f"recordings/2026/12/03/{call_id}.json"][0].data or b"")
        assert got.sha256 == meta["audio"]["sha256"]

    exported = await desk.export(tmp_path / "evidence.zip", calls=[HELD], reason="upgrade test")
    assert exported is not None and exported.verdict == "verified", exported
    with zipfile.ZipFile(tmp_path / "evidence.zip") as z:
        assert f"{HELD}/audio.wav" in z.namelist() and "SHA256SUMS" in z.namelist()


async def test_audit_chains_and_accounts_of_0_1_0_still_verify_and_load() -> None:
    store = rebuilt_bucket()
    report = await AuditVerifier(store).run()
    assert report.ok and report.records == 3, report.as_dict()
    accounts = await Accounts(store).list()
    assert [(a.name, a.role.value) for a in accounts] == [("demo-admin", "admin")]


async def test_retention_purges_the_old_orphan_and_never_the_held_call() -> None:
    store = rebuilt_bucket()
    sweep = RetentionSweep(
        store,
        MemoryEvents(),
        AuditLog(store, MemoryEvents(), by="upgrade-test"),
        days=90,
        tz=ZoneInfo("Asia/Tokyo"),
        now=datetime(2027, 6, 1, tzinfo=UTC),
    )
    report = await sweep.run()
    assert [p.call_id for p in report.purged] == [ORPHAN], report.as_dict()
    assert HELD in {s.call_id for s in report.skipped}, report.as_dict()
    assert store.objects[f"recordings/2026/12/03/{HELD}.wav"][-1].data is not None


@pytest.mark.parametrize("key", ["recordings/2026/12/03/1796321183.9.json", "holds/1796321183.9.json"])
def test_the_fixture_is_what_0_1_0_wrote(key: str) -> None:
    """Guards the fixture itself: a schema field added later must not be slipped into these files."""
    doc = json.loads((BUCKET / key).read_text(encoding="utf-8"))
    assert doc["schema"] in ("kasuhara.recording/1", "kasuhara.hold/1")
    assert "node" not in doc  # fields of later releases are not back-filled here
