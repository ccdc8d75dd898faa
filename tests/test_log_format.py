"""``general.log_format = "json"``: one JSON object per log line for log shippers, each ``key=value`` of a
structured message a field of its own; a service's real log, not only the formatter."""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys

import pytest

from kasuhara_ari.config import ConfigError, load
from kasuhara_ari.safe import JsonLogFormatter

from conftest import REPO
from recordings_seed import cli_command, cli_env
from s3_fixture import fresh_bucket


def record(message: str, *args: object, exc: bool = False) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            info = sys.exc_info()
    return logging.LogRecord("kasuhara_ari.web", logging.WARNING, __file__, 1, message, args, info)


def test_json_lines_carry_the_structured_fields_and_stay_one_line() -> None:
    line = JsonLogFormatter().format(
        record("web event=login_failed account=%s address=%s", "sato", "10.0.0.7")
    )
    doc = json.loads(line)
    assert doc["scope"] == "web" and doc["event"] == "login_failed"
    assert doc["account"] == "sato" and doc["address"] == "10.0.0.7"
    assert doc["level"] == "WARNING" and doc["logger"] == "kasuhara_ari.web" and doc["at"].endswith("+00:00")
    # A value that tries to forge a second log line stays inside its string.
    forged = JsonLogFormatter().format(record("web event=x account=%s", "a\nweb event=login account=admin"))
    assert "\n" not in forged and json.loads(forged)["account"] == "a"
    traced = json.loads(JsonLogFormatter().format(record("web event=error", exc=True)))
    assert "ValueError: boom" in traced["exc"]


def test_log_format_is_checked() -> None:
    assert load(env={"KASUHARA_GENERAL__LOG_FORMAT": "json"}).general.log_format == "json"
    with pytest.raises(ConfigError, match=r"general\.log_format"):
        load(env={"KASUHARA_GENERAL__LOG_FORMAT": "yaml"})


@pytest.mark.integration
def test_a_service_logs_json_lines_when_configured() -> None:
    with fresh_bucket("klf") as (target, bucket):
        env = cli_env(target, bucket, KASUHARA_GENERAL__LOG_FORMAT="json")
        proc = subprocess.Popen(
            cli_command("retention", "daemon"),
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        got = b""
        try:
            assert proc.stderr is not None
            fd = proc.stderr.fileno()
            # Raw reads of the pipe (a buffered readline may hold the line select() no longer sees), until
            # the daemon has logged its schedule (its first lines may be others, e.g. readiness).
            while b"next_sweep" not in got:
                ready = select.select([fd], [], [], 60)[0]
                assert ready, f"the daemon logged no next_sweep within 60 s: {got!r}"
                chunk = os.read(fd, 65536)
                assert chunk, f"the daemon ended: {got!r}"
                got += chunk
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
    lines = got.decode().splitlines()
    lines += err.splitlines()
    logged = [json.loads(line) for line in lines if line.startswith("{")]
    assert any(doc.get("event") == "next_sweep" and doc.get("scope") == "retention" for doc in logged), lines
    # Whatever is not a JSON log line is the command's own output (click.echo), never a text log line.
    assert not [line for line in lines if " INFO " in line or " WARNING " in line], lines
