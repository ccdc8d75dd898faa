"""End to end, the whole evidence chain: real SIP, a real ``kasuhara serve`` PROCESS with S3 and MQTT on.

The agent presses ``*1`` during the call, the caller hangs up; in the end the bucket holds the call's audio
and metadata once each, the hold record pins both versions, the S3 legal holds are on exactly those
versions, and the metadata names the audio version. (The SIP tests of the call flow run the service
in-process with storage off; the S3 tests start from hand-made markers: nothing else covers this chain.)

The process gets its own Stasis app (the phones name it in ``X-Kasuhara-App``), its own spool directory
(MixMonitor creates it inside the chroot; nothing another test records is uploaded by this process), its
own bucket and its own MQTT topic prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from kasuhara_ari.config import Config
from kasuhara_ari.storage import MinioStore, parse_recording_key

from conftest import REPO, STACK_CONFIG, TEST_NOTICE_SOUND
from s3_fixture import create_bucket, destroy_bucket, open_store, require_s3, unique_bucket
from sip import agent_port, answering, caller
from test_events import Collector

pytestmark = pytest.mark.integration


async def _registered(cfg: Config, app: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(auth=(cfg.ari.username, cfg.ari.password), timeout=3) as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"{cfg.ari.url}/ari/applications/{app}")).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise AssertionError(f"kasuhara serve never registered the Stasis app {app}")


async def _logged(log: Path, text: str, timeout: float) -> None:
    """Wait until the process's log says ``text``."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"never logged {text!r}:\n{log.read_text()[-3000:]}"
        await asyncio.sleep(0.05)


def _pinned_and_held(store: MinioStore) -> dict[str, Any] | None:
    """The one hold record of the bucket once it pins both objects, with what the server says of them."""
    client = store.client
    holds = [o.object_name for o in client.list_objects(store.bucket, prefix="holds/")]
    if len(holds) != 1:
        return None
    resp = client.get_object(store.bucket, holds[0])
    try:
        record: dict[str, Any] = json.loads(resp.read())
    finally:
        resp.close()
        resp.release_conn()
    versions = record.get("versions") or {}
    if len(versions) != 2:
        return None
    record["legal_holds"] = {
        key: bool(client.is_object_legal_hold_enabled(store.bucket, key, version_id=vid))
        for key, vid in versions.items()
    }
    return record


async def test_star1_ends_with_pinned_versions_held_in_the_bucket(
    asterisk: Config, mqtt_broker: Config, s3_server: Config, sip_workdir: Path, tmp_path: Path
) -> None:
    target = require_s3()
    uid = uuid.uuid4().hex[:10]
    app = f"kasuhara-e2e{uid}"
    bucket = unique_bucket("kt-e2e")
    store = open_store(target, bucket)
    create_bucket(store)
    spool = asterisk.recording.host_dir / f"e2e-{uid}"
    spool.mkdir(mode=0o777)
    env = {
        **{k: v for k, v in os.environ.items() if not (k.startswith("KASUHARA_") and "__" in k)},
        "KASUHARA_CONFIG": str(STACK_CONFIG),
        "KASUHARA_ARI__APP": app,
        "KASUHARA_STORAGE__BUCKET": bucket,
        "KASUHARA_STORAGE__ENABLED": "true",
        "KASUHARA_MQTT__ENABLED": "true",
        "KASUHARA_MQTT__TOPIC_PREFIX": f"kt-e2e-{uid}",
        "KASUHARA_RECORDING__ASTERISK_DIR": f"{asterisk.recording.asterisk_dir}/e2e-{uid}",
        "KASUHARA_RECORDING__LOCAL_DIR": str(spool),
        "KASUHARA_ANNOUNCEMENT__SOUND": TEST_NOTICE_SOUND,  # 0.5 s: the call does not wait for the notice
    }
    log = tmp_path / "serve.log"
    serve = subprocess.Popen(
        [sys.executable, "-m", "kasuhara_ari.cli", "serve"],
        env=env,
        cwd=REPO,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    phones = []
    try:
        await _registered(asterisk, app, 30)
        await _logged(log, "stasis event=resynced", 15)  # calls arriving before could look like leftovers
        port = agent_port()
        agent = await answering(sip_workdir, port, ring_ms=500, dtmf=[(2000, "*1")]).start()
        # The (test) notice plays before the agent rings: the call lasts long enough for the *1.
        customer = await caller(sip_workdir, port, app=app, call_ms=9000).start()
        phones = [agent, customer]
        assert await customer.wait(90) == 0, customer.error_text()
        await agent.wait(20)

        deadline = time.monotonic() + 90
        record = None
        while record is None:
            assert serve.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no pinned hold in the bucket:\n{log.read_text()[-3000:]}"
            await asyncio.sleep(0.5)
            record = await asyncio.to_thread(_pinned_and_held, store)
    finally:
        for phone in phones:
            await phone.stop()
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(20)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
    try:
        versions: dict[str, str] = record["versions"]
        assert record["reason"] and record["by"] == "agent"
        assert all(record["legal_holds"].values()), record
        parsed = {k: parse_recording_key(k) for k in versions}
        assert sorted(p.kind for p in parsed.values() if p) == ["json", "wav"]
        assert {p.call_id for p in parsed.values() if p} == {record["call_id"]}
        every = list(
            store.client.list_objects(bucket, prefix="recordings/", recursive=True, include_version=True)
        )
        # Each object exactly once, and the pinned version is that one.
        assert sorted((o.object_name, o.version_id) for o in every) == sorted(versions.items())
        meta_key = next(k for k in versions if k.endswith(".json"))
        audio_key = next(k for k in versions if k.endswith(".wav"))
        resp = store.client.get_object(bucket, meta_key, version_id=versions[meta_key])
        try:
            meta = json.loads(resp.read())
        finally:
            resp.close()
            resp.release_conn()
        assert meta["audio"]["version_id"] == versions[audio_key]
        assert meta["hold"]["by"] == "agent" and meta["flags"] == ["harassment"]
        assert meta["audio"]["bytes"] > 44 and meta["audio"]["sha256"]
    finally:
        store.close()
        destroy_bucket(target, bucket)
        shutil.rmtree(spool, ignore_errors=True)


def _objects_of(store: MinioStore, call_id: str) -> dict[str, str]:
    """The call's recording objects in the bucket: {"wav"|"json": key}."""
    found: dict[str, str] = {}
    for obj in store.client.list_objects(store.bucket, prefix="recordings/", recursive=True):
        parsed = parse_recording_key(obj.object_name)
        if parsed is not None and parsed.call_id == call_id:
            found[parsed.kind] = obj.object_name
    return found


def serve_env(asterisk: Config, app: str, bucket: str, prefix: str, spool: Path) -> dict[str, str]:
    """The environment of a ``kasuhara serve`` subprocess with its own Stasis app, bucket, MQTT prefix
    and spool (a directory of the stack's spool, named like ``spool``) on the stack's config."""
    return {
        **{k: v for k, v in os.environ.items() if not (k.startswith("KASUHARA_") and "__" in k)},
        "KASUHARA_CONFIG": str(STACK_CONFIG),
        "KASUHARA_ARI__APP": app,
        "KASUHARA_STORAGE__BUCKET": bucket,
        "KASUHARA_STORAGE__ENABLED": "true",
        "KASUHARA_MQTT__ENABLED": "true",
        "KASUHARA_MQTT__TOPIC_PREFIX": prefix,
        "KASUHARA_RECORDING__ASTERISK_DIR": f"{asterisk.recording.asterisk_dir}/{spool.name}",
        "KASUHARA_RECORDING__LOCAL_DIR": str(spool),
        "KASUHARA_ANNOUNCEMENT__SOUND": TEST_NOTICE_SOUND,
    }


def _start_serve(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "kasuhara_ari.cli", "serve"],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _stop(serve: subprocess.Popen[bytes]) -> int:
    if serve.poll() is None:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
    return serve.returncode


async def test_serve_process_sigterm_mid_call_loses_nothing(
    asterisk: Config, mqtt_broker: Config, s3_server: Config, sip_workdir: Path, tmp_path: Path
) -> None:
    """``kasuhara serve`` as it runs in production (a process that systemd stops with SIGTERM), stopped in
    the middle of a call: it exits 0 in time, the call is torn down (the caller gets a BYE), ``ended`` and
    the ``offline`` status still reach the broker, and the recording is not lost: once the service runs
    again, the bucket holds the call's audio and metadata. (The in-process test cancels a task instead,
    which is what the SIGTERM handler is supposed to do: this one checks that it does.)"""
    target = require_s3()
    uid = uuid.uuid4().hex[:10]
    app = f"kasuhara-term{uid}"
    bucket = unique_bucket("kt-term")
    prefix = f"kt-term-{uid}"
    store = open_store(target, bucket)
    create_bucket(store)
    spool = asterisk.recording.host_dir / f"term-{uid}"
    spool.mkdir(mode=0o777)
    env = serve_env(asterisk, app, bucket, prefix, spool)
    # Stopping ends the calls (the handover at a restart: tests/test_handover_sip.py).
    env["KASUHARA_ROUTING__ON_STOP"] = "hangup"
    log = tmp_path / "serve.log"
    phones = []
    try:
        async with Collector(mqtt_broker.mqtt.port, prefix) as sub:
            serve = _start_serve(env, log)
            try:
                await _registered(asterisk, app, 30)
                await _logged(log, "stasis event=resynced", 15)
                port = agent_port()
                agent = await answering(sip_workdir, port).start()
                # The caller would talk for a minute: only the stopping service ends the call.
                customer = await caller(sip_workdir, port, app=app, call_ms=60000).start()
                phones = [agent, customer]
                await sub.wait_for(lambda c: any(p["event"] == "agent_answered" for p in c.calls()), 30)
                serve.send_signal(signal.SIGTERM)
                returncode = await asyncio.to_thread(serve.wait, 30)
                assert returncode == 0, log.read_text()[-3000:]
                assert await customer.wait(20) == 0, customer.error_text()
                assert customer.received("BYE"), "the caller was left on the line"
                await sub.wait_for(lambda c: any(p["event"] == "ended" for p in c.calls()), 10)
            finally:
                _stop(serve)
        (call_id,) = {p["call_id"] for p in sub.calls() if p["event"] == "agent_answered"}
        assert [p["event"] for p in sub.calls() if p.get("call_id") == call_id][-1] == "ended"
        assert [p["state"] for p in sub.statuses()][-1:] == ["offline"]

        # Nothing lost: uploaded on the way out, or found in the spool when the service starts again.
        restarted = _start_serve(env, log)
        try:
            deadline = time.monotonic() + 60
            while len(objects := await asyncio.to_thread(_objects_of, store, call_id)) < 2:
                assert restarted.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, f"not in the bucket: {objects}\n{log.read_text()[-3000:]}"
                await asyncio.sleep(0.3)
        finally:
            assert _stop(restarted) == 0, log.read_text()[-3000:]
        resp = store.client.get_object(bucket, objects["json"])
        try:
            meta = json.loads(resp.read())
        finally:
            resp.close()
            resp.release_conn()
        assert meta["call_id"] == call_id and meta["ended_at"], meta
        assert meta["audio"]["key"] == objects["wav"] and meta["audio"]["bytes"] > 44, meta
        assert not list(spool.glob(f"{call_id}*")), "the spool still holds the call's files"
    finally:
        for phone in phones:
            await phone.stop()
        store.close()
        destroy_bucket(target, bucket)
        shutil.rmtree(spool, ignore_errors=True)
