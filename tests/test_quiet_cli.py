"""The quiet CLI: admin commands print their result and clear errors, logs only at WARNING unless -v or
KASUHARA_LOG_LEVEL asks for more; ``doctor`` prints its check lines and nothing else. Real S3 (the
stack's moto), real Asterisk/AMI, real mosquitto; every CLI run is its own process."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from kasuhara_ari.cli.common import LOG_LEVEL_ENV, requested_log_level
from kasuhara_ari.config import Config
from kasuhara_ari.retention import cutoff_for
from kasuhara_ari.storage import AUDIT_PREFIX, MinioStore

from conftest import REPO, STACK_CONFIG, closed_port
from recordings_seed import cli_command, cli_env, read_json, run_cli, seed
from s3_fixture import fresh_bucket, open_store

TOKYO = ZoneInfo("Asia/Tokyo")
DAYS = 30
#: A line of the app's log handler: "2026-12-03 12:00:00,123 INFO kasuhara_ari.audit audit event=...".
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+ ", re.M)
#: A line of `kasuhara doctor`: "ok   ari     http://…" / "FAIL s3      …" (see cli/doctor.py).
DOCTOR_LINE = re.compile(r"(?:ok  |FAIL) [a-z][a-z0-9_]* +\S.*")


def levels(stderr: str) -> set[str]:
    return {m.group(1) for m in LOG_LINE.finditer(stderr)}


@dataclass(frozen=True)
class Seeded:
    env: dict[str, str]
    day: str
    call_ids: list[str]


def _quiet_env(env: dict[str, str]) -> dict[str, str]:
    """The developer's own KASUHARA_LOG_LEVEL must not decide what these tests see."""
    return {k: v for k, v in env.items() if k != LOG_LEVEL_ENV}


@pytest.fixture
def seeded() -> Iterator[Seeded]:
    """A fresh bucket on the stack's S3 with two recordings of yesterday (Tokyo)."""
    with fresh_bucket("kq") as (target, bucket):
        store = open_store(target, bucket)
        when = datetime.now(UTC) - timedelta(days=1)
        call_ids = ["1764720000.11", "1764720000.12"]

        async def go() -> None:
            for n, cid in enumerate(call_ids):
                await seed(store, cid, when + timedelta(minutes=n))

        try:
            asyncio.run(go())
        finally:
            store.close()
        day = when.astimezone(TOKYO).date().isoformat()
        yield Seeded(_quiet_env(cli_env(target, bucket)), day, call_ids)


def list_args(s: Seeded) -> list[str]:
    return ["recordings", "list", "--from", s.day, "--to", s.day]


# ------------------------------------------------------------------------------------ recordings list


@pytest.mark.integration
def test_recordings_list_prints_the_list_and_nothing_on_stderr(seeded: Seeded) -> None:
    result = run_cli(seeded.env, *list_args(seeded))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    for cid in seeded.call_ids:
        assert cid in result.stdout
    assert "2 recording(s)" in result.stdout  # the count is part of the result: stdout


@pytest.mark.integration
def test_audit_list_and_verify_print_their_counts_on_stdout_and_nothing_on_stderr(seeded: Seeded) -> None:
    listed = run_cli(seeded.env, "audit", "list", "--from", seeded.day)
    assert listed.returncode == 0, listed.stderr
    assert listed.stderr == "" and " record(s)" in listed.stdout, (listed.stdout, listed.stderr)
    verified = run_cli(seeded.env, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stderr == "" and "chain(s): intact" in verified.stdout, (verified.stdout, verified.stderr)


@pytest.mark.integration
@pytest.mark.parametrize("configured", ["DEBUG", "chatty"])
def test_general_log_level_does_not_make_admin_commands_chatty(seeded: Seeded, configured: str) -> None:
    """general.log_level is the services' setting (a DEBUG service config shared with the admin CLI):
    admin commands neither follow it nor trip over a bad one (only a service refuses it, below)."""
    env = {**seeded.env, "KASUHARA_GENERAL__LOG_LEVEL": configured}
    result = run_cli(env, *list_args(seeded))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


@pytest.mark.integration
@pytest.mark.parametrize(
    ("flags", "env_level", "expected"),
    [
        (["-v"], None, {"INFO"}),
        (["--verbose"], None, {"INFO"}),
        ([], "INFO", {"INFO"}),
        ([], "info", {"INFO"}),
        (["-vv"], None, {"INFO", "DEBUG"}),
        ([], "DEBUG", {"INFO", "DEBUG"}),
        (["-v"], "ERROR", {"INFO"}),  # the flag beats the environment
    ],
)
def test_verbose_or_env_shows_the_log(
    seeded: Seeded, flags: list[str], env_level: str | None, expected: set[str]
) -> None:
    env = dict(seeded.env)
    if env_level is not None:
        env[LOG_LEVEL_ENV] = env_level
    result = run_cli(env, *flags, *list_args(seeded))
    assert result.returncode == 0, result.stderr
    assert expected <= levels(result.stderr), result.stderr
    if "DEBUG" not in expected:
        assert "DEBUG" not in levels(result.stderr), result.stderr
    assert "kasuhara_ari.audit" in result.stderr, result.stderr  # the app's own INFO line (audit written)
    for cid in seeded.call_ids:
        assert cid in result.stdout  # the result is the same, only stderr is louder


@pytest.mark.integration
@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        ([], ["-v"], {"INFO"}),
        ([], ["--verbose"], {"INFO"}),
        ([], ["-vv"], {"INFO", "DEBUG"}),
        (["-vv"], ["-v"], {"INFO", "DEBUG"}),  # the louder of the two
        (["-v"], ["-vv"], {"INFO", "DEBUG"}),
    ],
)
def test_verbose_after_the_command_works_too(
    seeded: Seeded, before: list[str], after: list[str], expected: set[str]
) -> None:
    """People type options after the command (``kasuhara recordings list ... -v``)."""
    result = run_cli(seeded.env, *before, *list_args(seeded), *after)
    assert result.returncode == 0, result.stderr
    assert levels(result.stderr) == expected, result.stderr
    for cid in seeded.call_ids:
        assert cid in result.stdout


@pytest.mark.integration
def test_env_level_error_is_quieter_than_the_default(seeded: Seeded) -> None:
    result = run_cli({**seeded.env, LOG_LEVEL_ENV: "ERROR"}, *list_args(seeded))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


@pytest.mark.parametrize("bad", ["loud", "5", "WARNINGS", "info\x1b[2J"])
@pytest.mark.parametrize("flags", [[], ["-v"]])
def test_bad_log_level_env_is_a_usage_error(bad: str, flags: list[str]) -> None:
    """Exit 2 before anything runs, naming the variable and the valid levels; the value escaped."""
    env = {**_quiet_env(dict(os.environ)), LOG_LEVEL_ENV: bad, "KASUHARA_MQTT__ENABLED": "false"}
    result = run_cli(env, *flags, "recordings", "list")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    assert LOG_LEVEL_ENV in result.stderr and "DEBUG, INFO, WARNING, ERROR, CRITICAL" in result.stderr
    assert "\x1b" not in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.integration
def test_a_failing_admin_command_still_prints_its_error(seeded: Seeded) -> None:
    """Quiet is not silent: an unknown recording is an error on stderr, exit 1, without log noise."""
    result = run_cli(seeded.env, "recordings", "show", "1764720000.99")
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith("kasuhara: "), result.stderr
    assert "1764720000.99" in result.stderr
    assert levels(result.stderr) == set(), result.stderr


@pytest.mark.integration
def test_warnings_still_reach_stderr(seeded: Seeded) -> None:
    """A WARNING log of an admin command (MQTT broker not reachable) is shown without -v."""
    env = {**seeded.env, "KASUHARA_MQTT__ENABLED": "true", "KASUHARA_MQTT__PORT": str(closed_port())}
    result = run_cli(env, *list_args(seeded), timeout=120)
    assert result.returncode == 0, result.stderr
    assert levels(result.stderr) & {"WARNING", "ERROR"}, result.stderr
    assert not levels(result.stderr) & {"INFO", "DEBUG"}, result.stderr


# --------------------------------------------------------------------------------------------- services


async def _wait_for_purge(store: MinioStore, proc: subprocess.Popen[str]) -> list[dict[str, Any]]:
    """The sweep's audit record(s) once written (or nothing if the daemon died)."""
    for _ in range(600):
        records = [
            doc
            async for obj in store.list_prefix(AUDIT_PREFIX)
            if (doc := await read_json(store, obj.key))["action"] == "purge"
        ]
        if records or proc.poll() is not None:
            return records
        await asyncio.sleep(0.1)
    return []


@pytest.mark.integration
@pytest.mark.parametrize(
    ("flags", "extra", "info_shown"),
    [
        ([], {}, True),  # a service keeps its log: general.log_level, default INFO
        ([], {"KASUHARA_GENERAL__LOG_LEVEL": "WARNING"}, False),  # ... which the config can lower
        (["-v"], {"KASUHARA_GENERAL__LOG_LEVEL": "WARNING"}, True),  # the flag beats the config
        ([], {"KASUHARA_GENERAL__LOG_LEVEL": "WARNING", LOG_LEVEL_ENV: "INFO"}, True),  # so does the env
        (["-v"], {LOG_LEVEL_ENV: "ERROR"}, True),  # and the flag beats the env
    ],
)
def test_retention_daemon_logs_at_its_level(
    flags: list[str], extra: dict[str, str], info_shown: bool
) -> None:
    """``retention daemon`` (a service) against real S3: one sweep, then SIGTERM; what did it log?"""
    with fresh_bucket("kqs") as (target, bucket):
        store = open_store(target, bucket)
        try:
            old = cutoff_for(datetime.now(UTC), DAYS, TOKYO) - timedelta(days=1)
            asyncio.run(seed(store, "1700000000.1", old))
            env = {**_quiet_env(cli_env(target, bucket, KASUHARA_RETENTION__DAYS=str(DAYS))), **extra}
            proc = subprocess.Popen(
                cli_command(*flags, "retention", "daemon", "--run-now"),
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                records = asyncio.run(_wait_for_purge(store, proc))
                proc.send_signal(signal.SIGTERM)
                _, err = proc.communicate(timeout=60)
            finally:
                proc.kill()
        finally:
            store.close()
    assert records, err
    assert proc.returncode == 0, err
    assert ("INFO" in levels(err)) == info_shown, err
    if info_shown:
        assert "retention event=next_sweep" in err, err
    assert "DEBUG" not in levels(err), err


@pytest.mark.parametrize("command", [["serve"], ["agi"], ["retention", "daemon"]])
def test_a_service_refuses_a_bad_general_log_level(command: list[str]) -> None:
    """Exit 2 naming the key, before connecting anywhere (it was a ValueError traceback)."""
    env = _quiet_env({k: v for k, v in os.environ.items() if not k.startswith("KASUHARA_")})
    env.update(
        KASUHARA_GENERAL__LOG_LEVEL="chatty",
        KASUHARA_MQTT__ENABLED="false",
        KASUHARA_STORAGE__ENABLED="false",
    )
    result = subprocess.run(
        cli_command(*command), env=env, cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "general.log_level" in result.stderr and "'chatty' is not a log level" in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------------- doctor


def run_doctor(*flags: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``kasuhara [flags] doctor`` against the stack's config, with only ``env`` of our own variables."""
    base = _quiet_env({k: v for k, v in os.environ.items() if not k.startswith("KASUHARA_")})
    return subprocess.run(
        cli_command(*flags, "doctor", "--config", str(STACK_CONFIG)),
        env={**base, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.integration
def test_doctor_prints_only_its_check_lines(asterisk: Config, mqtt_broker: Config) -> None:
    """Against the real stack (a fresh object-lock bucket, so every check can pass): every line of
    stdout and stderr is a check line; the AMI library's INFO line ("protocol version") is not shown."""
    with fresh_bucket("kqd") as (_, bucket):
        result = run_doctor(KASUHARA_STORAGE__BUCKET=bucket)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert lines, result
    for line in lines:
        assert DOCTOR_LINE.fullmatch(line), f"not a check line: {line!r}\n{result.stdout}{result.stderr}"
    assert result.stderr == ""
    checks = {line.split()[1]: line for line in lines}
    assert {"ari", "ami", "mqtt", "s3"} <= set(checks), lines
    assert checks["ami"].startswith("ok"), lines  # AMI was really reached (where the library logs)
    assert result.returncode == 0, lines


@pytest.mark.integration
def test_doctor_verbose_shows_the_log(asterisk: Config) -> None:
    """-v is how an operator sees what doctor's libraries said (the AMI handshake at INFO)."""
    result = run_doctor("-v", KASUHARA_MQTT__ENABLED="false")
    assert "INFO" in levels(result.stderr), result.stderr
    assert all(DOCTOR_LINE.fullmatch(line) for line in result.stdout.splitlines() if line.strip())


# ------------------------------------------------------------------------------------------- precedence


@pytest.mark.parametrize(
    ("verbose", "env", "expected"),
    [
        (0, {}, None),
        (0, {LOG_LEVEL_ENV: ""}, None),  # set but empty (systemd, compose): not set
        (0, {LOG_LEVEL_ENV: "warning"}, logging.WARNING),
        (0, {LOG_LEVEL_ENV: " Debug "}, logging.DEBUG),
        (1, {}, logging.INFO),
        (2, {}, logging.DEBUG),
        (3, {}, logging.DEBUG),
        (1, {LOG_LEVEL_ENV: "CRITICAL"}, logging.INFO),
        (2, {LOG_LEVEL_ENV: "ERROR"}, logging.DEBUG),
    ],
)
def test_requested_level_flag_beats_env(verbose: int, env: dict[str, str], expected: int | None) -> None:
    assert requested_log_level(verbose, env) == expected


def test_requested_level_refuses_a_bad_env_even_with_the_flag() -> None:
    with pytest.raises(SystemExit) as exc:
        requested_log_level(1, {LOG_LEVEL_ENV: "chatty"})
    assert exc.value.code == 2
