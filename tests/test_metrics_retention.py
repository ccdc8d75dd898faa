"""``/metrics`` of a real ``kasuhara retention daemon`` process against the stack's S3: after its first
sweep it reports when it succeeded (what the ``KasuharaRetentionNotRun`` alert watches) and the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_metrics_sip import free_tcp_port

from kasuhara_ari.config import Config
from kasuhara_ari.metrics import iter_samples

from conftest import REPO, STACK_CONFIG
from s3_fixture import fresh_bucket

pytestmark = pytest.mark.integration


def test_the_retention_daemon_reports_its_last_successful_sweep(s3_server: Config, tmp_path: Path) -> None:
    port = free_tcp_port()
    url = f"http://127.0.0.1:{port}/metrics"
    with fresh_bucket("kt-metret") as (_, bucket):
        env = {
            **{k: v for k, v in os.environ.items() if not (k.startswith("KASUHARA_") and "__" in k)},
            "KASUHARA_CONFIG": str(STACK_CONFIG),
            "KASUHARA_STORAGE__BUCKET": bucket,
            "KASUHARA_METRICS__ENABLED": "true",
            "KASUHARA_METRICS__RETENTION_PORT": str(port),
        }
        log = tmp_path / "daemon.log"
        started = time.time()
        with log.open("wb") as out:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "kasuhara_ari.cli", "-v", "retention", "daemon", "--run-now"],
                env=env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 60
            last = 0.0
            samples: dict[str, float] = {}
            while last == 0.0:
                assert daemon.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, (
                    f"no successful sweep reported:\n{log.read_text()[-3000:]}"
                )
                time.sleep(0.3)
                try:
                    text = httpx.get(url, timeout=3).text
                except httpx.HTTPError:
                    continue
                samples = {name + str(sorted(labels.items())): v for name, labels, v in iter_samples(text)}
                last = samples.get("kasuhara_retention_last_success_timestamp_seconds[]", 0.0)
            assert started - 1 <= last <= time.time() + 1
            assert samples["kasuhara_retention_runs_total[('status', 'completed')]"] == 1
            # The daemon has no calls: its call gauges stay empty rather than claiming a disconnected ARI.
            assert not any(k.startswith("kasuhara_ari_connected") for k in samples)
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        assert daemon.returncode == 0, log.read_text()[-3000:]
