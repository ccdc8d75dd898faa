"""``kasuhara recordings`` and ``kasuhara audit``: refusals, usage errors, and the admin actions against
the real S3 server, each audited."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner, Result

from kasuhara_ari.cli import main
from kasuhara_ari.storage import AUDIT_PREFIX, MinioStore

from conftest import closed_port
from recordings_seed import Seeded, all_versions, cli_env, hold, live_keys, read_json, seed
from s3_fixture import S3Target, create_bucket, destroy_bucket, open_store, require_s3, unique_bucket

TOKYO = ZoneInfo("Asia/Tokyo")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var == "KASUHARA_CONFIG" or (var.startswith("KASUHARA_") and "__" in var):
            monkeypatch.delenv(var)


def invoke(env: dict[str, str], *args: str, input: str | None = None) -> Result:
    result = CliRunner().invoke(main, list(args), env=env, input=input)
    # Expected failures exit with a code and a message, never an exception (a traceback).
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result


def offline_env(**extra: str) -> dict[str, str]:
    """A config whose S3 endpoint nobody listens on: a command that reaches S3 fails with exit 1."""
    env = {
        "KASUHARA_STORAGE__ENDPOINT": f"127.0.0.1:{closed_port()}",
        "KASUHARA_STORAGE__ACCESS_KEY": "service",
        "KASUHARA_STORAGE__SECRET_KEY": "service-secret",
        "KASUHARA_MQTT__ENABLED": "false",
    }
    env.update(extra)
    return env


# --------------------------------------------------------------------------------------------- without S3


@pytest.mark.parametrize(
    "args",
    [
        ["recordings", "download", "1735689600.1", "--reason", "court"],
        [
            "recordings",
            "export",
            "--from",
            "2025-01-01",
            "--to",
            "2025-01-02",
            "-o",
            "x.zip",
            "--reason",
            "r",
        ],
        ["recordings", "delete", "1735689600.1", "--reason", "r", "--yes"],
        ["recordings", "release", "1735689600.1", "--reason", "r"],
    ],
)
def test_admin_commands_refuse_without_admin_credentials(args: list[str], tmp_path: Path) -> None:
    os.chdir(tmp_path)
    result = invoke(offline_env(KASUHARA_ADMIN__ACCESS_KEY="only-half"), *args)
    assert result.exit_code == 3, result.output
    assert "needs the admin S3 credentials" in result.output
    assert "secret_key" in result.output and "KASUHARA_ADMIN__SECRET_KEY" in result.output
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["recordings", "list", "--from", "2025-13-01"], "not a valid date"),
        (["recordings", "list", "--from", "yesterday"], "not a date"),
        (["recordings", "list", "--from", "2025-02-02", "--to", "2025-02-01"], "before --from"),
        (["recordings", "list", "--direction", "sideways"], "inbound or outbound"),
        (["recordings", "show", "../../etc/passwd"], "unsafe call id"),
        (["recordings", "show", "1735689600.1", "--date", "31/01/2025"], "not a date"),
        (["recordings", "export", "-o", "x.zip", "--reason", "r"], "--from and --to are required"),
        (["audit", "list", "--to", "soon"], "not a date"),
        (["audit", "list", "--action", "explode"], "explode"),
        (["retention", "run", "--days", "0"], "0"),
        (["retention", "run", "--batch-size", "1001"], "1001"),
    ],
)
def test_usage_errors_exit_2_with_a_message(args: list[str], message: str) -> None:
    result = invoke(offline_env(), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_delete_outside_a_terminal_needs_yes() -> None:
    env = offline_env(KASUHARA_ADMIN__ACCESS_KEY="a", KASUHARA_ADMIN__SECRET_KEY="b")
    result = invoke(env, "recordings", "delete", "1735689600.1", "--reason", "r")
    assert result.exit_code == 2
    assert "--yes" in result.output


def test_bad_timezone_is_a_configuration_error() -> None:
    result = invoke(offline_env(KASUHARA_GENERAL__TIMEZONE="Mars/Olympus"), "recordings", "list")
    assert result.exit_code == 2
    assert "general.timezone" in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["recordings", "list"],
        ["recordings", "show", "1735689600.1"],
        ["audit", "list"],
        ["retention", "run"],
        ["retention", "run", "--dry-run"],
    ],
)
def test_server_down_is_a_message_and_exit_1(args: list[str]) -> None:
    result = invoke(offline_env(), *args)
    assert result.exit_code == 1, result.output
    assert "unreachable" in result.output


# --------------------------------------------------------------------------------------------- with S3


@dataclass
class Env:
    target: S3Target
    bucket: str
    store: MinioStore
    env: dict[str, str]

    def run(self, coro: Any) -> Any:
        return asyncio.run(coro)

    def audit_records(self) -> list[dict[str, Any]]:
        async def go() -> list[dict[str, Any]]:
            return [await read_json(self.store, o.key) async for o in self.store.list_prefix(AUDIT_PREFIX)]

        records: list[dict[str, Any]] = asyncio.run(go())
        return records


@pytest.fixture
def s3env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    target = require_s3()
    bucket = unique_bucket("kt-admin")
    store = open_store(target, bucket, read_timeout_s=30.0)
    create_bucket(store)
    monkeypatch.chdir(tmp_path)
    try:
        yield Env(target, bucket, store, cli_env(target, bucket))
    finally:
        store.close()
        destroy_bucket(target, bucket)


JAN2 = datetime(2025, 1, 2, 10, 0, tzinfo=TOKYO)  # 2025-01-02 01:00 UTC


def seed_set(e: Env) -> dict[str, Seeded]:
    async def go() -> dict[str, Seeded]:
        s = {
            "a": await seed(e.store, "1735779600.1", JAN2, caller="03-1234-5678"),
            "b": await seed(
                e.store,
                "1735779700.2",
                JAN2 + timedelta(hours=3),
                caller="+81 6 9999 0000",
                direction="outbound",
            ),
            "c": await seed(
                e.store, "1735866000.3", JAN2 + timedelta(days=1), caller="0312345678", flags=["harassment"]
            ),
            # 00:30 on 4 Jan in Tokyo is still 3 Jan in UTC: found by a local date range all the same.
            "d": await seed(
                e.store, "1735917000.4", datetime(2025, 1, 4, 0, 30, tzinfo=TOKYO), caller="090-0000-1111"
            ),
            "e": await seed(e.store, "1736000000.5", JAN2 + timedelta(days=10), caller="0120-000-000"),
        }
        await hold(e.store, s["c"])
        return s

    result: dict[str, Seeded] = asyncio.run(go())
    return result


def listed(e: Env, *args: str) -> list[str]:
    result = invoke(e.env, "recordings", "list", "--json", *args)
    assert result.exit_code == 0, result.output
    return [r["call_id"] for r in json.loads(result.stdout)]


@pytest.mark.integration
def test_list_filters(s3env: Env) -> None:
    s = seed_set(s3env)
    ids = {k: v.call_id for k, v in s.items()}
    assert listed(s3env, "--from", "2025-01-02", "--to", "2025-01-04") == [
        ids["a"],
        ids["b"],
        ids["c"],
        ids["d"],
    ]
    assert listed(s3env, "--from", "2025-01-02", "--to", "2025-01-02") == [ids["a"], ids["b"]]
    assert listed(s3env, "--from", "2025-01-02T12:00", "--to", "2025-01-02T13:00") == [ids["b"]]
    assert listed(s3env, "--from", "2025-01-01", "--to", "2025-01-31", "--caller", "+81-3-1234-5678") == [
        ids["a"],
        ids["c"],
    ]
    assert listed(s3env, "--from", "2025-01-01", "--to", "2025-01-31", "--caller", "06*") == [ids["b"]]
    assert listed(s3env, "--from", "2025-01-01", "--to", "2025-01-31", "--direction", "out") == [ids["b"]]
    assert listed(s3env, "--from", "2025-01-01", "--to", "2025-01-31", "--flagged") == [ids["c"]]
    assert listed(s3env, "--from", "2025-01-01", "--to", "2025-01-31", "--held") == [ids["c"]]
    assert listed(s3env, "--from", "2024-01-01", "--to", "2024-01-31") == []
    table = invoke(s3env.env, "recordings", "list", "--from", "2025-01-02", "--to", "2025-01-03")
    assert table.exit_code == 0
    assert "2025-01-02 10:00:00" in table.stdout  # shown in Asia/Tokyo
    assert "held" in table.stdout and "harassment" in table.stdout
    lists = [r for r in s3env.audit_records() if r["action"] == "list"]
    assert len(lists) == 10
    assert all(r["by"] == "test-admin" for r in lists)


@pytest.mark.integration
def test_show_and_unknown_ids(s3env: Env) -> None:
    s = seed_set(s3env)
    human = invoke(s3env.env, "recordings", "show", s["c"].call_id)
    assert human.exit_code == 0, human.output
    assert "threats" in human.stdout and "legal-hold" in human.stdout
    assert re.search(r"^timeline events +3$", human.stdout, re.M)
    doc = json.loads(invoke(s3env.env, "recordings", "show", s["a"].call_id, "--json").stdout)
    assert doc["metadata"]["call_id"] == s["a"].call_id and doc["hold_record"] is None
    unknown = invoke(s3env.env, "recordings", "show", "1735779600.999")
    assert unknown.exit_code == 1
    assert "no recording with call id" in unknown.output
    # An id without an embedded timestamp is found with --date (in general.timezone).
    asyncio.run(seed(s3env.store, "manual-id", JAN2))
    assert invoke(s3env.env, "recordings", "show", "manual-id").exit_code == 1
    assert invoke(s3env.env, "recordings", "show", "manual-id", "--date", "2025-01-02").exit_code == 0
    shows = sorted(r["target"]["call_id"] for r in s3env.audit_records() if r["action"] == "show")
    assert shows == sorted([s["c"].call_id, s["a"].call_id, "manual-id"])  # the failed lookups are not


@pytest.mark.integration
def test_hold_delete_release_flow_every_step_audited(s3env: Env) -> None:
    s = seed_set(s3env)
    cid, keys = s["a"].call_id, s["a"].keys
    held = invoke(s3env.env, "recordings", "hold", cid, "--reason", "threatened the agent")
    assert held.exit_code == 0, held.output
    assert asyncio.run(s3env.store.legal_hold(keys.audio))
    refused = invoke(s3env.env, "recordings", "delete", cid, "--reason", "cleanup", "--yes")
    assert refused.exit_code == 3
    assert "on hold" in refused.output and "release it first" in refused.output
    assert {keys.audio, keys.metadata} <= asyncio.run(live_keys(s3env.store))
    released = invoke(s3env.env, "recordings", "release", cid, "--reason", "case closed")
    assert released.exit_code == 0, released.output
    assert not asyncio.run(s3env.store.legal_hold(keys.audio))
    again = invoke(s3env.env, "recordings", "release", cid, "--reason", "twice")
    assert again.exit_code == 0 and "not held" in again.stdout
    deleted = invoke(s3env.env, "recordings", "delete", cid, "--reason", "subject request", "--yes")
    assert deleted.exit_code == 0, deleted.output
    assert not [v for v in asyncio.run(all_versions(s3env.store, "recordings/")) if cid in v[0]]
    gone = invoke(s3env.env, "recordings", "delete", cid, "--reason", "again", "--yes")
    assert gone.exit_code == 1 and "no recording" in gone.output

    records = s3env.audit_records()
    trail = [(r["action"], r["result"], r["reason"]) for r in records if r["target"].get("call_id") == cid]
    # Release and delete are on record before they act ("started"), then with their outcome.
    assert trail == [
        ("hold", "done", "threatened the agent"),
        ("delete", "refused", "cleanup"),
        ("release", "started", "case closed"),
        ("release", "done", "case closed"),
        ("release", "not_held", "twice"),
        ("delete", "started", "subject request"),
        ("delete", "done", "subject request"),
    ]
    done = next(r for r in records if r["action"] == "delete" and r["result"] == "done")
    assert done["by"] == "test-admin" and done["details"]["counts"]["objects_deleted"] == 2
    assert datetime.fromisoformat(done["at"]).tzinfo is not None

    audit_json = invoke(s3env.env, "audit", "list", "--from", datetime.now(UTC).date().isoformat(), "--json")
    assert audit_json.exit_code == 0, audit_json.output
    assert len(json.loads(audit_json.stdout)) == len(records)
    only = invoke(s3env.env, "audit", "list", "--action", "delete", "--json")
    assert [r["result"] for r in json.loads(only.stdout)] == ["refused", "started", "done"]
    human = invoke(s3env.env, "audit", "list")
    assert "subject request" in human.stdout and "test-admin" in human.stdout


@pytest.mark.integration
def test_download_verifies_against_capture_and_refuses_tampered_audio(s3env: Env, tmp_path: Path) -> None:
    s = seed_set(s3env)
    ok = invoke(s3env.env, "recordings", "download", s["a"].call_id, "--reason", "complaint 42")
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / f"{s['a'].call_id}.wav").read_bytes() == s["a"].audio
    exists = invoke(s3env.env, "recordings", "download", s["a"].call_id, "--reason", "again")
    assert exists.exit_code == 2 and "--force" in exists.output
    # Tamper: replace the audio object with a forgery whose sha256 header matches the forgery. The
    # shipped download read the latest version; now the pinned (first) one is downloaded and the later
    # version reported as possible tampering, with its own exit code.
    forged = b"RIFF forged"
    info = asyncio.run(s3env.store.stat(s["b"].keys.audio))
    assert info is not None
    asyncio.run(
        s3env.store.put_bytes(
            s["b"].keys.audio,
            forged,
            metadata={**info.metadata, "sha256": hashlib.sha256(forged).hexdigest()},
        )
    )
    bad = invoke(
        s3env.env, "recordings", "download", s["b"].call_id, "--reason", "complaint 43", "-o", "b.wav"
    )
    assert bad.exit_code == 4, bad.output
    assert "SUPERSEDED" in bad.output and "possible tampering" in bad.output
    assert (tmp_path / "b.wav").read_bytes() == s["b"].audio
    shown = invoke(s3env.env, "recordings", "show", s["b"].call_id)
    assert shown.exit_code == 4 and "SUPERSEDED" in shown.output, shown.output
    downloads = [
        (r["target"]["call_id"], r["result"]) for r in s3env.audit_records() if r["action"] == "download"
    ]
    assert downloads == [
        (s["a"].call_id, "started"),
        (s["a"].call_id, "verified"),
        (s["b"].call_id, "started"),
        (s["b"].call_id, "superseded"),
    ]


@pytest.mark.integration
def test_list_show_hold_work_without_admin_keys(s3env: Env) -> None:
    s = seed_set(s3env)
    env = {k: v for k, v in s3env.env.items() if not k.startswith("KASUHARA_ADMIN__")}
    assert invoke(env, "recordings", "list", "--from", "2025-01-02", "--to", "2025-01-02").exit_code == 0
    assert invoke(env, "recordings", "hold", s["b"].call_id, "--reason", "flag").exit_code == 0
    assert asyncio.run(s3env.store.stat(s["b"].keys.hold)) is not None
    assert invoke(env, "recordings", "release", s["b"].call_id, "--reason", "x").exit_code == 3


@pytest.mark.integration
def test_admin_actions_go_to_mqtt_and_a_dead_broker_does_not_block(s3env: Env) -> None:
    import subprocess

    from recordings_seed import run_cli

    host, port = "127.0.0.1", 1883
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        from conftest import missing

        missing(f"mosquitto at {host}:{port} is not reachable")
    s = seed_set(s3env)
    prefix = f"kt{os.urandom(4).hex()}"
    sub = subprocess.Popen(
        ["mosquitto_sub", "-h", host, "-p", str(port), "-t", f"{prefix}/#", "-C", "1", "-W", "30", "-v"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        import time

        time.sleep(0.5)  # let the subscription settle before publishing
        env = {**s3env.env, "KASUHARA_MQTT__ENABLED": "true", "KASUHARA_MQTT__TOPIC_PREFIX": prefix}
        result = run_cli(env, "recordings", "hold", s["a"].call_id, "--reason", "mqtt test")
        assert result.returncode == 0, result.stderr
        out, _ = sub.communicate(timeout=40)
    finally:
        sub.kill()
    topic, _, payload = out.strip().partition(" ")
    assert topic == f"{prefix}/audit/hold"
    doc = json.loads(payload)
    assert doc["event"] == "audit.hold" and doc["by"] == "test-admin" and doc["reason"] == "mqtt test"
    assert doc["call_id"] == s["a"].call_id and doc["audit_key"].startswith("audit/")
    # The broker down: the action still completes, with a warning, and is audited in S3.
    down = {**env, "KASUHARA_MQTT__PORT": str(closed_port())}
    result = run_cli(down, "recordings", "hold", s["b"].call_id, "--reason", "broker down", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "events not published" in result.stderr
    assert any(r["reason"] == "broker down" for r in s3env.audit_records())


@pytest.mark.integration
@pytest.mark.parametrize("action", ["release", "delete", "download", "export"])
def test_no_audit_record_no_action(
    s3env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, action: str
) -> None:
    """The audit record comes BEFORE the action, and an action whose record cannot be written is refused:
    the shipped release lifted the holds first, and delete went ahead with a warning (exit 0)."""
    from kasuhara_ari.audit import AuditLog
    from kasuhara_ari.storage import StorageRefused

    s = seed_set(s3env)
    c, a = s["c"], s["a"]  # c is held
    before = asyncio.run(all_versions(s3env.store, "recordings/"))

    async def refused(self: AuditLog, record: Any) -> Any:
        raise StorageRefused("put audit/...: refused (AccessDenied)", code="AccessDenied")

    monkeypatch.setattr(AuditLog, "write", refused)
    args = {
        "release": ["recordings", "release", c.call_id, "--reason", "r"],
        "delete": ["recordings", "delete", a.call_id, "--reason", "r", "--yes"],
        "download": ["recordings", "download", a.call_id, "--reason", "r", "-o", "x.wav"],
        "export": ["recordings", "export", "--call", a.call_id, "--reason", "r", "-o", "x.zip"],
    }[action]
    result = invoke(s3env.env, *args)
    assert result.exit_code != 0, result.output
    assert "audit record could not be written" in result.output
    # Nothing happened: every version is still there, the held call is still held, nothing handed out.
    assert asyncio.run(all_versions(s3env.store, "recordings/")) == before
    assert asyncio.run(s3env.store.legal_hold(c.keys.audio)) is True
    assert asyncio.run(s3env.store.stat(c.keys.hold)) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == []
