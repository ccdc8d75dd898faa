"""Asterisk not running: ``doctor`` says so and exits 1; ``serve`` keeps retrying with a clear log and
takes calls as soon as Asterisk is back. Stops and restarts the real Asterisk of the local stack."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kasuhara_ari.config import Config

from conftest import REPO, STACK_CONFIG

pytestmark = pytest.mark.integration

STACK = REPO / "scripts" / "stack"


def kasuhara(*args: str) -> list[str]:
    return [sys.executable, "-m", "kasuhara_ari.cli", *args]


def stack(*args: str) -> None:
    subprocess.run(
        [str(STACK), *args], check=True, env={**os.environ, "KASUHARA_SKIP_BOOTSTRAP": "1"}, timeout=180
    )


def test_doctor_and_serve_without_asterisk(asterisk: Config, tmp_path: Path) -> None:
    log_path = tmp_path / "serve.log"
    stack("down", "asterisk")
    serve = None
    try:
        doctor = subprocess.run(
            kasuhara("doctor", "--config", str(STACK_CONFIG)), capture_output=True, text=True, timeout=60
        )
        assert doctor.returncode == 1, doctor.stdout + doctor.stderr
        lines = {line.split()[1]: line for line in doctor.stdout.splitlines() if line.strip()}
        assert lines["ari"].startswith("FAIL"), doctor.stdout
        assert lines["ami"].startswith("FAIL"), doctor.stdout
        assert lines["config"].startswith("ok"), doctor.stdout
        assert asterisk.ari.password not in doctor.stdout + doctor.stderr

        with log_path.open("w") as log:
            serve = subprocess.Popen(
                kasuhara("serve", "--config", str(STACK_CONFIG)),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "KASUHARA_MQTT__ENABLED": "false", "KASUHARA_STORAGE__ENABLED": "false"},
            )
        time.sleep(4)
        assert serve.poll() is None, "serve gave up instead of retrying:\n" + log_path.read_text()
        text = log_path.read_text()
        assert "ari event=unreachable" in text and "retry_in=" in text, text
        assert "ami event=not_connected" in text, text
    finally:
        stack("up", "asterisk")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "ari event=connected" not in log_path.read_text():
            time.sleep(0.2)
        text = log_path.read_text()
        assert "ari event=connected" in text, text
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and "ami event=connected" not in log_path.read_text():
            time.sleep(0.2)
        assert "ami event=connected" in log_path.read_text()
        for secret in (asterisk.ari.password, asterisk.ami.secret):
            assert secret not in log_path.read_text()
    finally:
        assert serve is not None
        serve.terminate()
        serve.wait(10)
    doctor = subprocess.run(
        kasuhara("doctor", "--config", str(STACK_CONFIG)), capture_output=True, text=True, timeout=60
    )
    lines = {line.split()[1]: line for line in doctor.stdout.splitlines() if line.strip()}
    assert lines["ari"].startswith("ok") and lines["ami"].startswith("ok"), doctor.stdout
