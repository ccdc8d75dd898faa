"""``/metrics`` of a real ``kasuhara serve`` PROCESS during real SIP calls through the stack's Asterisk,
with S3 and MQTT on: scraped over HTTP while the calls run and after, the counters equal what was placed.

The process has its own Stasis app, spool, bucket, MQTT prefix and metrics port, so its counters are
exactly this test's calls (counters are per process).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from test_flag_e2e_sip import _logged, _registered, _stop

from kasuhara_ari.config import Config
from kasuhara_ari.metrics import iter_samples

from conftest import REPO, STACK_CONFIG, TEST_NOTICE_SOUND
from s3_fixture import create_bucket, destroy_bucket, open_store, require_s3, unique_bucket
from sip import agent_port, answering, caller

pytestmark = pytest.mark.integration

CALLS = 3

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def scrape(url: str) -> Samples:
    async with httpx.AsyncClient(timeout=5) as http:
        resp = await http.get(url)
    assert resp.status_code == 200, resp.text[:500]
    assert resp.headers["content-type"].startswith("text/plain"), resp.headers
    return {(name, frozenset(labels.items())): v for name, labels, v in iter_samples(resp.text)}


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over every label set that has ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


async def scrape_until(
    url: str, ok: Callable[[Samples], bool], what: str, serve: subprocess.Popen[bytes], log: Path
) -> Samples:
    deadline = time.monotonic() + 90
    while True:
        assert serve.poll() is None, log.read_text()[-3000:]
        samples = await scrape(url)
        if ok(samples):
            return samples
        assert time.monotonic() < deadline, f"never {what}:\n" + "\n".join(
            f"{n} {dict(ls)} {v}"
            for (n, ls), v in sorted(samples.items(), key=str)
            if n.startswith("kasuhara")
        )
        await asyncio.sleep(0.3)


async def test_metrics_of_a_serve_process_count_the_calls_placed(
    asterisk: Config, mqtt_broker: Config, s3_server: Config, sip_workdir: Path, tmp_path: Path
) -> None:
    target = require_s3()
    uid = uuid.uuid4().hex[:10]
    app = f"kasuhara-met{uid}"
    bucket = unique_bucket("kt-met")
    store = open_store(target, bucket)
    create_bucket(store)
    spool = asterisk.recording.host_dir / f"met-{uid}"
    spool.mkdir(mode=0o777)
    spool.chmod(0o777)
    port = free_tcp_port()
    url = f"http://127.0.0.1:{port}/metrics"
    env = {
        **{k: v for k, v in os.environ.items() if not (k.startswith("KASUHARA_") and "__" in k)},
        "KASUHARA_CONFIG": str(STACK_CONFIG),
        "KASUHARA_ARI__APP": app,
        "KASUHARA_STORAGE__BUCKET": bucket,
        "KASUHARA_STORAGE__ENABLED": "true",
        "KASUHARA_MQTT__ENABLED": "true",
        "KASUHARA_MQTT__TOPIC_PREFIX": f"kt-met-{uid}",
        "KASUHARA_RECORDING__ASTERISK_DIR": f"{asterisk.recording.asterisk_dir}/met-{uid}",
        "KASUHARA_RECORDING__LOCAL_DIR": str(spool),
        "KASUHARA_ANNOUNCEMENT__SOUND": TEST_NOTICE_SOUND,
        "KASUHARA_METRICS__ENABLED": "true",
        "KASUHARA_METRICS__SERVE_PORT": str(port),
    }
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "kasuhara_ari.cli", "-v", "serve"],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    phones = []
    try:
        await _registered(asterisk, app, 30)
        await _logged(log, "stasis event=resynced", 15)
        idle = await scrape_until(
            url, lambda s: get(s, "kasuhara_ari_connected") == 1, "ARI connected", serve, log
        )
        assert total(idle, "kasuhara_calls_total") == 0
        assert get(idle, "kasuhara_mqtt_connected") == 1
        assert "metrics event=listening" in log.read_text()

        sip_port = agent_port()
        agent = await answering(sip_workdir, sip_port, ring_ms=300, calls=CALLS).start()
        customer = await caller(
            sip_workdir, sip_port, app=app, call_ms=6000, calls=CALLS, concurrent=CALLS, rate=CALLS
        ).start()
        phones = [agent, customer]
        # While the calls run: all of them are counted as in progress.
        during = await scrape_until(
            url,
            lambda s: get(s, "kasuhara_calls_active", direction="inbound") == CALLS,
            f"{CALLS} calls active",
            serve,
            log,
        )
        assert get(during, "kasuhara_calls_total", direction="inbound") == CALLS
        assert await customer.wait(90) == 0, customer.error_text()
        await agent.wait(20)

        after = await scrape_until(
            url, lambda s: get(s, "kasuhara_uploads_total") >= CALLS, f"{CALLS} uploads", serve, log
        )
        assert get(after, "kasuhara_calls_total", direction="inbound") == CALLS
        assert get(after, "kasuhara_calls_total", direction="outbound") == 0
        assert get(after, "kasuhara_calls_active", direction="inbound") == 0
        assert total(after, "kasuhara_calls_ended_total", direction="inbound") == CALLS
        assert get(after, "kasuhara_calls_ended_total", direction="inbound", reason="caller_hungup") == CALLS
        assert get(after, "kasuhara_uploads_total") == CALLS
        assert get(after, "kasuhara_upload_failures_total") == 0
        assert get(after, "kasuhara_notice_failures_total") == 0
        assert get(after, "kasuhara_uploaded_bytes_total") > 44 * CALLS
        # Every request was timed: one MixMonitor per call over AMI, ARI's answers, S3's PUTs.
        assert get(after, "kasuhara_ami_action_duration_seconds_count", action="mixmonitor") == CALLS
        assert total(after, "kasuhara_ari_request_duration_seconds_count", method="POST") >= CALLS
        assert get(after, "kasuhara_s3_request_duration_seconds_count", operation="put") >= 2 * CALLS
        # Nothing waits in the spool once uploaded; the events reached the broker.
        assert get(after, "kasuhara_spool_recordings_pending") == 0
        assert get(after, "kasuhara_mqtt_dropped_events_total") == 0
        # The bucket agrees with the counter.
        wavs = [
            o.object_name
            for o in store.client.list_objects(bucket, prefix="recordings/", recursive=True)
            if o.object_name.endswith(".wav")
        ]
        assert len(wavs) == CALLS, wavs
    finally:
        for phone in phones:
            await phone.stop()
        _stop(serve)
        store.close()
        destroy_bucket(target, bucket)
        shutil.rmtree(spool, ignore_errors=True)
    # The endpoint goes with the process.
    with contextlib.suppress(httpx.HTTPError):
        async with httpx.AsyncClient(timeout=2) as http:
            await http.get(url)
        pytest.fail("/metrics still answers after serve stopped")
