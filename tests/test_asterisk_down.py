"""Asterisk not running: ``doctor`` says so and exits 1; ``serve`` keeps retrying with a clear log and
takes calls as soon as Asterisk is back (a real call is placed to show it). Stops and restarts the real
Asterisk of the local stack: marked ``asterisk_alone`` (no other test's call is in Asterisk meanwhile)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from kasuhara_ari.config import Config

from conftest import REPO, STACK_CONFIG, TEST_NOTICE_SOUND
from sip import agent_port, answering, caller

pytestmark = [pytest.mark.integration, pytest.mark.asterisk_alone]  # it stops Asterisk

STACK = REPO / "scripts" / "stack"


def kasuhara(*args: str) -> list[str]:
    return [sys.executable, "-m", "kasuhara_ari.cli", *args]


def stack(*args: str) -> None:
    subprocess.run(
        [str(STACK), *args], check=True, env={**os.environ, "KASUHARA_SKIP_BOOTSTRAP": "1"}, timeout=180
    )


def wait_logged(log_path: Path, text: str, *, count: int = 1, timeout: float = 30) -> str:
    """The log once it holds ``text`` ``count`` times (instead of sleeping and hoping)."""
    deadline = time.monotonic() + timeout
    while (log := log_path.read_text(errors="replace")).count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged {count} times:\n{log[-3000:]}"
        time.sleep(0.1)
    return log


async def call_is_taken(asterisk: Config, spool: Path, app: str, workdir: Path) -> dict[str, Any]:
    """One real call to ``app``: the caller and agent phones finish cleanly and the call's metadata lands
    in the spool with the notice played."""
    port = agent_port()
    agent = await answering(workdir, port).start()
    phone = await caller(workdir, port, app=app, call_ms=3000).start()
    try:
        assert await phone.wait(40) == 0, phone.error_text()
        assert await agent.wait(10) == 0, agent.error_text()
    finally:
        await phone.stop()
        await agent.stop()
    assert agent.received("INVITE"), "the agent was never rung"
    deadline = time.monotonic() + 20
    while True:
        for meta_path in spool.glob("*.json"):
            meta = json.loads(meta_path.read_text())
            if meta.get("agent", "") and meta["agent"].endswith(f":{port}"):
                return dict(meta)
        assert time.monotonic() < deadline, (
            f"no metadata in {spool}: {sorted(p.name for p in spool.iterdir())}"
        )
        await asyncio.sleep(0.1)


def test_doctor_and_serve_without_asterisk(asterisk: Config, tmp_path: Path) -> None:
    log_path = tmp_path / "serve.log"
    uid = uuid.uuid4().hex[:10]
    app = f"kasuhara-down{uid}"  # its own Stasis app and spool: the call placed below reaches only it
    spool = asterisk.recording.host_dir / f"down-{uid}"
    spool.mkdir(mode=0o777)
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
                env={
                    **os.environ,
                    "KASUHARA_MQTT__ENABLED": "false",
                    "KASUHARA_STORAGE__ENABLED": "false",
                    "KASUHARA_ARI__APP": app,
                    "KASUHARA_RECORDING__ASTERISK_DIR": f"{asterisk.recording.asterisk_dir}/down-{uid}",
                    "KASUHARA_RECORDING__LOCAL_DIR": str(spool),
                    "KASUHARA_ANNOUNCEMENT__SOUND": TEST_NOTICE_SOUND,
                },
            )
        # It failed to connect and kept trying (with backoff), and is still running.
        text = wait_logged(log_path, "ari event=unreachable", count=3)
        assert serve.poll() is None, "serve gave up instead of retrying:\n" + log_path.read_text()
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
        # ...and it takes calls again: a real one, answered with the notice, rung through and recorded.
        wait_logged(log_path, "stasis event=resynced")
        meta = asyncio.run(call_is_taken(asterisk, spool, app, tmp_path / "sipp"))
        assert meta["notice_played"] is True and meta["end_reason"] == "caller_hungup", meta
        assert (spool / f"{meta['call_id']}.wav").exists()
    finally:
        assert serve is not None
        serve.terminate()
        serve.wait(10)
    doctor = subprocess.run(
        kasuhara("doctor", "--config", str(STACK_CONFIG)), capture_output=True, text=True, timeout=60
    )
    lines = {line.split()[1]: line for line in doctor.stdout.splitlines() if line.strip()}
    assert lines["ari"].startswith("ok") and lines["ami"].startswith("ok"), doctor.stdout
    shutil.rmtree(spool, ignore_errors=True)
