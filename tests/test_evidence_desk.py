"""The evidence desk's own logic, on the in-memory store: role checks, not found, hold/release, delete
refused while held, audit-before-action, outcomes; and that ``evidence/`` never imports the CLI.

The CLI's behaviour over real S3 (moto, Ceph RGW) is tests/test_admin_cli.py and friends."""

from __future__ import annotations

import ast
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kasuhara_ari.audit import AuditRecord
from kasuhara_ari.events import MemoryEvents
from kasuhara_ari.evidence.desk import (
    PERMITS,
    DeskFailed,
    DeskIntegrityFailure,
    DeskNotFound,
    DeskRefused,
    EvidenceDesk,
    Outcome,
    Principal,
    permit,
)
from kasuhara_ari.search import Filters
from kasuhara_ari.storage import MemoryStore, StorageRefused

from recordings_seed import Seeded, seed

REPO = Path(__file__).resolve().parent.parent
EVIDENCE = REPO / "kasuhara_ari" / "evidence"

ADMIN = Principal("alice", "admin")
#: The CLI's principal on the [storage] keys (cli/admin.py cli_principal).
SERVICE = Principal(
    "bob",
    "service",
    lacking="the admin S3 credentials, and [admin] access_key is not set (config file, or "
    "KASUHARA_ADMIN__ACCESS_KEY / KASUHARA_ADMIN__SECRET_KEY)",
)
VIEWER = Principal("carol", "viewer")
SUPERVISOR = Principal("dave", "supervisor")

T0 = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)


# ------------------------------------------------------------------------------------------- helpers


def desk_for(store: MemoryStore, principal: Principal, warnings: list[str] | None = None) -> EvidenceDesk:
    return EvidenceDesk(
        store, MemoryEvents(), principal, warn=(warnings.append if warnings is not None else None)
    )


async def seeded(store: MemoryStore, n: int = 0) -> Seeded:
    """A recording whose id carries its epoch (found without --date), unique per test."""
    t = T0 + timedelta(minutes=n)
    return await seed(store, f"{int(t.timestamp())}.{uuid.uuid4().int % 10_000}", t)


async def audit_records(store: MemoryStore) -> list[AuditRecord]:
    records = []
    for key in sorted(store.objects):
        if key.startswith("audit/"):
            data = await store.get_bytes(key)
            assert data is not None
            records.append(AuditRecord.from_json(data, key))
    # In write order: each writer's hash chain numbers its records (two can share a millisecond).
    return sorted(records, key=lambda r: (r.by, r.chain["seq"] if r.chain else -1))


def snapshot(store: MemoryStore) -> dict[str, list[tuple[str, bool, bool]]]:
    """Every version of every recording and hold object: (version, delete marker, legal hold)."""
    return {
        key: [(v.version_id, v.data is None, v.legal_hold) for v in versions]
        for key, versions in store.objects.items()
        if key.startswith(("recordings/", "holds/"))
    }


# ---------------------------------------------------------------------------------------------- roles


def test_permits_table() -> None:
    """Download, export, release, delete: admin only; play: supervisor and admin; hold: not viewers."""
    for action in ("download", "export", "release", "delete"):
        assert {r for r in ("viewer", "supervisor", "admin", "service") if Principal("x", r).may(action)} == {
            "admin"
        }
    assert SUPERVISOR.may("play") and ADMIN.may("play")
    assert not VIEWER.may("play") and not SERVICE.may("play")
    assert SERVICE.may("hold") and SUPERVISOR.may("hold") and not VIEWER.may("hold")
    assert all(p.may(a) for p in (VIEWER, SERVICE, SUPERVISOR, ADMIN) for a in ("list", "show"))
    assert not ADMIN.may("no-such-action")
    assert set(PERMITS) >= {"list", "show", "play", "download", "export", "hold", "release", "delete"}


def test_refusal_messages() -> None:
    """The CLI's message (with the keys to set), and a plain one for a role without that hint."""
    with pytest.raises(DeskRefused) as info:
        permit(SERVICE, "delete", doing="`kasuhara recordings delete`")
    assert str(info.value) == (
        "refused: `kasuhara recordings delete` needs the admin S3 credentials, and [admin] access_key is "
        "not set (config file, or KASUHARA_ADMIN__ACCESS_KEY / KASUHARA_ADMIN__SECRET_KEY)"
    )
    with pytest.raises(DeskRefused) as info:
        permit(VIEWER, "play")
    assert str(info.value) == "refused: play needs the supervisor or admin role; carol is viewer"
    permit(ADMIN, "delete")  # no exception
    with pytest.raises(DeskRefused, match="not an action of the evidence desk"):
        permit(ADMIN, "no-such-action")


@pytest.mark.parametrize("principal", [SERVICE, VIEWER, SUPERVISOR], ids=lambda p: p.role)
@pytest.mark.parametrize("action", ["download", "export", "release", "delete"])
async def test_non_admin_refused_and_nothing_happens(
    tmp_path: Path, principal: Principal, action: str
) -> None:
    """Refused before anything is read or written: no object changes, no file, and (as the CLI, which
    refuses before it opens the bucket) no audit record."""
    store = MemoryStore()
    a = await seeded(store)
    await desk_for(store, ADMIN).hold(a.call_id, reason="threats")  # release has something to lift
    before = snapshot(store)
    records_before = await audit_records(store)
    store.calls.clear()
    desk = desk_for(store, principal)
    out = tmp_path / "out"
    run = {
        "download": lambda: desk.download(a.call_id, out, reason="r"),
        "export": lambda: desk.export(out, calls=[a.call_id], reason="r"),
        "release": lambda: desk.release(a.call_id, reason="r"),
        "delete": lambda: desk.delete(a.call_id, reason="r"),
    }[action]
    with pytest.raises(DeskRefused) as info:
        await run()
    assert str(info.value).startswith(f"refused: {action} needs ")
    assert store.calls == []  # not even a read
    assert snapshot(store) == before
    assert await audit_records(store) == records_before
    assert list(tmp_path.iterdir()) == []


async def test_viewer_may_not_hold_or_play() -> None:
    store = MemoryStore()
    a = await seeded(store)
    for run in (
        lambda: desk_for(store, VIEWER).hold(a.call_id, reason="r"),
        lambda: desk_for(store, VIEWER).play(a.call_id, reason="r"),
        lambda: desk_for(store, SERVICE).play(a.call_id, reason="r"),
    ):
        with pytest.raises(DeskRefused):
            await run()
    assert await audit_records(store) == []
    assert await store.stat(a.keys.hold) is None


async def test_play_is_audited_as_play_not_download() -> None:
    """A supervisor may play; the record (written before a byte is streamed) says ``play``."""
    store = MemoryStore()
    a = await seeded(store)
    playable = await desk_for(store, SUPERVISOR).play(a.call_id, reason="review")
    assert playable.key == a.keys.audio and playable.version_id is not None
    assert a.audio is not None and playable.bytes == len(a.audio)
    [record] = await audit_records(store)
    assert (record.action, record.result, record.by) == ("play", "started", "dave")
    assert record.key == playable.audit_key


# ------------------------------------------------------------------------------------------ not found


@pytest.mark.parametrize("action", ["show", "play", "download", "export", "hold", "release", "delete"])
async def test_not_found(tmp_path: Path, action: str) -> None:
    store = MemoryStore()
    await seeded(store)
    desk = desk_for(store, ADMIN)
    cid = "1741064767.99999"  # an epoch id of the same day, not stored
    run = {
        "show": lambda: desk.show(cid),
        "play": lambda: desk.play(cid),
        "download": lambda: desk.download(cid, tmp_path / "x.wav", reason="r"),
        "export": lambda: desk.export(tmp_path / "x.zip", calls=[cid], reason="r"),
        "hold": lambda: desk.hold(cid, reason="r"),
        "release": lambda: desk.release(cid, reason="r"),
        "delete": lambda: desk.delete(cid, reason="r"),
    }[action]
    with pytest.raises(DeskNotFound) as info:
        await run()
    assert str(info.value) == (
        f"no recording with call id {cid!r}; if the id carries no timestamp, give the call's date with --date"
    )
    assert await audit_records(store) == []
    assert await store.stat(f"holds/{cid}.json") is None


async def test_not_found_on_the_given_days_says_no_hint() -> None:
    store = MemoryStore()
    with pytest.raises(DeskNotFound) as info:
        await desk_for(store, ADMIN).show("abc", days=[T0.date()])
    assert str(info.value) == "no recording with call id 'abc'"


# ----------------------------------------------------------------------------------- hold and release


async def test_hold_release_round_trip() -> None:
    store = MemoryStore()
    a = await seeded(store)
    desk = desk_for(store, ADMIN)

    held = await desk.hold(a.call_id, reason="threats")
    assert held.result == "done"
    assert set(held.legal_holds) == {a.keys.audio, a.keys.metadata}
    assert await store.stat(a.keys.hold) is not None
    assert await store.legal_hold(a.keys.audio) and await store.legal_hold(a.keys.metadata)
    assert (await desk.hold(a.call_id, reason="again")).result == "already_held"
    shown = await desk.show(a.call_id)
    assert shown.evidence.hold is not None and shown.evidence.hold.reason == "threats"

    released = await desk.release(a.call_id, reason="case closed")
    assert released.released
    assert await store.stat(a.keys.hold) is None
    assert not await store.legal_hold(a.keys.audio) and not await store.legal_hold(a.keys.metadata)
    assert not (await desk.release(a.call_id, reason="twice")).released

    results = [(r.action, r.result) for r in await audit_records(store)]
    assert results == [
        ("hold", "done"),
        ("hold", "already_held"),
        ("show", "done"),
        ("release", "started"),
        ("release", "done"),
        ("release", "not_held"),
    ]
    records = await audit_records(store)
    assert records[4].details["started_record"] == records[3].key  # the outcome names its first record
    assert records[3].details["hold_was"]["reason"] == "threats"


async def test_delete_refused_while_held_then_deleted_once_released() -> None:
    store = MemoryStore()
    a = await seeded(store)
    desk = desk_for(store, ADMIN)
    await desk.hold(a.call_id, reason="threats")
    before = snapshot(store)
    asked: list[str] = []

    def confirm(question: str) -> bool:
        asked.append(question)
        return True

    with pytest.raises(DeskRefused) as info:
        await desk.delete(a.call_id, reason="tidy", confirm=confirm)
    assert str(info.value) == f"refused: {a.call_id} is on hold (hold record); release it first"
    assert snapshot(store) == before
    assert asked == []  # refused before anyone is asked
    assert [(r.action, r.result) for r in await audit_records(store)][-1] == ("delete", "refused")
    assert not any(r.action == "delete" and r.result == "started" for r in await audit_records(store))

    await desk.release(a.call_id, reason="case closed")
    gone = await desk.delete(a.call_id, reason="tidy", confirm=confirm)
    assert asked == [f"Delete every version of {a.call_id}'s audio and metadata?"]
    assert gone.versions_deleted == 2
    assert await store.stat(a.keys.audio) is None and await store.stat(a.keys.metadata) is None
    assert [(r.action, r.result) for r in await audit_records(store)][-2:] == [
        ("delete", "started"),
        ("delete", "done"),
    ]


async def test_delete_refused_under_a_bare_legal_hold() -> None:
    """No hold record, but an S3 legal hold set by hand: still on hold."""
    store = MemoryStore()
    a = await seeded(store)
    await store.set_legal_hold(a.keys.audio, True)
    with pytest.raises(DeskRefused, match="is on hold \\(legal hold\\)"):
        await desk_for(store, ADMIN).delete(a.call_id, reason="r")
    assert await store.stat(a.keys.audio) is not None


async def test_delete_not_confirmed() -> None:
    store = MemoryStore()
    a = await seeded(store)
    with pytest.raises(DeskFailed, match="not confirmed; nothing deleted"):
        await desk_for(store, ADMIN).delete(a.call_id, reason="r", confirm=lambda q: False)
    assert await store.stat(a.keys.audio) is not None
    assert await audit_records(store) == []


# ----------------------------------------------------------------------------- audit, then the action


@pytest.mark.parametrize("action", ["download", "export", "release", "delete", "play"])
async def test_no_audit_record_no_action(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, action: str
) -> None:
    store = MemoryStore()
    a = await seeded(store)
    desk = desk_for(store, ADMIN)
    if action == "release":
        await desk.hold(a.call_id, reason="threats")
    before = snapshot(store)

    async def refused(record: AuditRecord) -> AuditRecord:
        raise StorageRefused("put audit/...: refused (AccessDenied)", code="AccessDenied")

    monkeypatch.setattr(desk.audit, "write", refused)
    run = {
        "download": lambda: desk.download(a.call_id, tmp_path / "x.wav", reason="r"),
        "export": lambda: desk.export(tmp_path / "x.zip", calls=[a.call_id], reason="r"),
        "release": lambda: desk.release(a.call_id, reason="r"),
        "delete": lambda: desk.delete(a.call_id, reason="r"),
        "play": lambda: desk.play(a.call_id, reason="r"),
    }[action]
    with pytest.raises(DeskFailed) as info:
        await run()
    assert str(info.value).startswith("refused: the audit record could not be written (")
    assert snapshot(store) == before
    assert list(tmp_path.iterdir()) == []


async def test_best_effort_records_warn() -> None:
    """A read whose record cannot be written still answers, and the face is told."""
    store = MemoryStore()
    a = await seeded(store)
    warnings: list[str] = []
    desk = desk_for(store, ADMIN, warnings)

    async def refused(record: AuditRecord) -> AuditRecord:
        raise StorageRefused("nope", code="AccessDenied")

    desk.audit.write = refused  # type: ignore[method-assign]
    shown = await desk.show(a.call_id)
    assert shown.outcome is Outcome.DONE
    assert warnings == ["audit record could not be written: nope"]


# ------------------------------------------------------------------------------------------ outcomes


async def test_download_verified_then_superseded(tmp_path: Path) -> None:
    store = MemoryStore()
    a = await seeded(store)
    desk = desk_for(store, ADMIN)
    got = await desk.download(a.call_id, tmp_path / "a.wav", reason="court")
    assert (got.verification, got.outcome) == ("verified", Outcome.DONE)
    assert (tmp_path / "a.wav").read_bytes() == a.audio

    # Held (versions pinned), then overwritten: the pinned version is handed out, flagged superseded.
    await desk.hold(a.call_id, reason="threats")
    await store.put_bytes(a.keys.audio, b"RIFF forged", metadata={}, content_type="audio/wav")
    again = await desk.download(a.call_id, tmp_path / "b.wav", reason="court")
    assert again.outcome is Outcome.SUPERSEDED
    assert (tmp_path / "b.wav").read_bytes() == a.audio
    assert (await desk.show(a.call_id)).outcome is Outcome.SUPERSEDED
    outcomes = [r.result for r in await audit_records(store) if r.action == "download"]
    assert outcomes == ["started", "verified", "started", "superseded"]


async def test_download_mismatch_writes_nothing(tmp_path: Path) -> None:
    store = MemoryStore()
    a = await seeded(store)
    [version] = store.objects[a.keys.audio]
    version.data = b"RIFF rotted in place"  # the pinned version itself no longer matches capture
    with pytest.raises(DeskIntegrityFailure, match=r"^INTEGRITY FAILURE: "):
        await desk_for(store, ADMIN).download(a.call_id, tmp_path / "a.wav", reason="court")
    assert list(tmp_path.iterdir()) == []
    results = [r.result for r in await audit_records(store)]
    assert results == ["started", "integrity_failure"]


async def test_export_and_empty_export(tmp_path: Path) -> None:
    store = MemoryStore()
    a = await seeded(store)
    desk = desk_for(store, ADMIN)
    exported = await desk.export(tmp_path / "e.zip", calls=[a.call_id], reason="court")
    assert exported is not None and exported.outcome is Outcome.DONE
    assert exported.result.call_ids == (a.call_id,) and (tmp_path / "e.zip").exists()
    nothing = Filters(start=T0 + timedelta(days=10), end=T0 + timedelta(days=11))
    assert await desk.export(tmp_path / "f.zip", filters=nothing, reason="court") is None
    assert not (tmp_path / "f.zip").exists()
    assert [(r.action, r.result) for r in await audit_records(store)] == [
        ("export", "started"),
        ("export", "done"),
        ("export", "empty"),
    ]


async def test_search_audits_the_list_once_done() -> None:
    store = MemoryStore()
    a = await seeded(store)
    b = await seeded(store, 1)
    f = Filters(start=T0 - timedelta(hours=1), end=T0 + timedelta(hours=1))
    found = [e.call_id async for e in desk_for(store, VIEWER).search(f, reason="weekly")]
    assert found == sorted([a.call_id, b.call_id])
    [record] = await audit_records(store)
    assert (record.action, record.by, record.reason) == ("list", "carol", "weekly")
    assert record.details["counts"] == {"listed": 2}


# ------------------------------------------------------------------------------- one-way imports


def forbidden_imports(source: str, module: str) -> list[str]:
    """Imports in ``source`` (the module ``module``) of click or of anything under kasuhara_ari.cli."""
    package = module.rsplit(".", 1)[0] if not module.endswith("__init__") else module
    package = package.removesuffix(".__init__")
    bad = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - (node.level - 1)])
                base = f"{anchor}.{base}" if base else anchor
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] == "click" or name.split(".")[:2] == ["kasuhara_ari", "cli"]:
                bad.append(name)
    return bad


def test_import_checker_catches_what_it_should() -> None:
    """The checker below is not vacuous: each of these would be a violation."""
    for source in (
        "import click",
        "from click import echo",
        "from ..cli.admin import fail",
        "from .. import cli",
        "from ..cli import admin",
        "import kasuhara_ari.cli.recordings",
        "def f() -> None:\n    from ..cli import common\n",
    ):
        assert forbidden_imports(source, "kasuhara_ari.evidence.desk"), source
    assert forbidden_imports("from ..storage import MemoryStore", "kasuhara_ari.evidence.desk") == []
    assert forbidden_imports("from . import desk", "kasuhara_ari.evidence.__init__") == []


def test_evidence_never_imports_click_or_the_cli() -> None:
    modules = sorted(EVIDENCE.rglob("*.py"))
    assert any(m.name == "desk.py" for m in modules)
    for path in modules:
        rel = path.relative_to(REPO).with_suffix("")
        module = ".".join(rel.parts)
        assert forbidden_imports(path.read_text(encoding="utf-8"), module) == [], path


def test_importing_the_desk_loads_neither_click_nor_the_cli() -> None:
    """Also what the desk imports in turn (storage, audit, export…): checked in a fresh interpreter."""
    code = (
        "import sys, kasuhara_ari.evidence.desk as d\n"
        "assert d.__file__.startswith(sys.argv[1]), d.__file__\n"
        "bad = sorted(m for m in sys.modules\n"
        "             if m.split('.')[0] == 'click' or m.startswith('kasuhara_ari.cli'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(REPO)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
