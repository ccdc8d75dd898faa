"""A training clip from a real flagged call: real SIP, a real ``kasuhara serve`` process recording in stereo
into S3, the agent pressing ``*1``; then the real CLI (``kasuhara training add|list|play|export``).

Shows: the clip lasts the requested range (±0.1 s); its metadata holds no caller number or name (nor the
call id); with ``--anonymise`` the caller's tone (700 Hz, channel 1) is measurably lower and the agent's
(1300 Hz, channel 2) is not; a retention run never deletes it; removing the source recording leaves it
intact (it still plays, verified against its sha256, and exports).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
import uuid
import wave
import zipfile
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from test_flag_e2e_sip import _logged, _pinned_and_held, _registered, serve_env

from kasuhara_ari.audit import AuditLog
from kasuhara_ari.config import Config
from kasuhara_ari.events import MemoryEvents
from kasuhara_ari.retention import RetentionSweep
from kasuhara_ari.search import zone
from kasuhara_ari.storage import MinioStore

from audio import tone_amplitude
from conftest import REPO
from recordings_seed import cli_env, run_cli
from s3_fixture import create_bucket, destroy_bucket, fetch, open_store, require_s3, unique_bucket
from sip import agent_port, answering, caller

pytestmark = pytest.mark.integration

CALLER_NUMBER = "0312345678"
CALLER_NAME = "Yamada"


def dominant_hz(samples: list[int], rate: int, lo: float = 300.0, hi: float = 1800.0) -> float:
    """The strongest frequency (5 Hz steps) of a steady tone: a pitch estimate."""
    window = samples[: rate // 2]
    candidates = [lo + 5 * i for i in range(int((hi - lo) / 5) + 1)]
    return max(candidates, key=lambda hz: tone_amplitude(window, rate, hz))


def read_channels(path: Path) -> tuple[int, int, list[list[int]]]:
    with wave.open(str(path), "rb") as w:
        n, rate = w.getnchannels(), w.getframerate()
        raw = w.readframes(w.getnframes())
    samples = [int.from_bytes(raw[i : i + 2], "little", signed=True) for i in range(0, len(raw), 2)]
    return n, rate, [samples[c::n] for c in range(n)]


def remove_source(store: MinioStore, call_id: str) -> list[str]:
    """Every version of the call's recording objects, holds lifted first (as a purge after release)."""
    from minio.deleteobjects import DeleteObject

    client = store.client
    gone = []
    for obj in list(
        client.list_objects(store.bucket, prefix="recordings/", recursive=True, include_version=True)
    ):
        if call_id in obj.object_name:
            if not obj.is_delete_marker:
                client.disable_object_legal_hold(store.bucket, obj.object_name, version_id=obj.version_id)
            gone.append(obj.object_name)
            errors = list(
                client.remove_objects(store.bucket, [DeleteObject(obj.object_name, obj.version_id)])
            )
            assert not errors, errors
    return gone


def training_versions(store: MinioStore) -> set[tuple[str, str | None]]:
    """Every version of everything under training/ and training-sources/."""
    return {
        (o.object_name, o.version_id)
        for prefix in ("training/", "training-sources/")
        for o in store.client.list_objects(store.bucket, prefix=prefix, recursive=True, include_version=True)
    }


async def test_a_clip_from_a_real_flagged_call(
    asterisk: Config, mqtt_broker: Config, s3_server: Config, sip_workdir: Path, tmp_path: Path
) -> None:
    target = require_s3()
    uid = uuid.uuid4().hex[:10]
    app = f"kasuhara-train{uid}"
    bucket = unique_bucket("kt-train")
    store = open_store(target, bucket)
    create_bucket(store)
    spool = asterisk.recording.host_dir / f"train-{uid}"
    spool.mkdir(mode=0o777)
    spool.chmod(0o777)
    env = serve_env(asterisk, app, bucket, f"kt-train-{uid}", spool)
    env["KASUHARA_RECORDING__MODE"] = "stereo"
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
        try:
            await _registered(asterisk, app, 30)
            await _logged(log, "stasis event=resynced", 15)
            port = agent_port()
            agent = await answering(sip_workdir, port, ring_ms=300, dtmf=[(2000, "*1")]).start()
            customer = await caller(
                sip_workdir, port, app=app, call_ms=9000, number=CALLER_NUMBER, display_name=CALLER_NAME
            ).start()
            phones = [agent, customer]
            assert await customer.wait(90) == 0, customer.error_text()
            await agent.wait(20)
            deadline = time.monotonic() + 90
            record = None
            while record is None:
                assert serve.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, f"no pinned hold:\n{log.read_text()[-3000:]}"
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
        call_id = record["call_id"]
        meta_key = next(k for k in record["versions"] if k.endswith(".json"))
        resp = store.client.get_object(bucket, meta_key)
        try:
            source_meta = json.loads(resp.read())
        finally:
            resp.close()
            resp.release_conn()
        # The source knows the caller (what the clip must drop) and is stereo.
        assert source_meta["caller"]["number"] == CALLER_NUMBER, source_meta["caller"]
        assert source_meta["audio"]["channels"] == 2

        cli = cli_env(target, bucket, KASUHARA_ADMIN__NAME="trainer-1")
        # The agent answered ~1 s in; *1 at 2 s of the agent's call; the call lasts ~9 s of talk.
        added = run_cli(
            cli, "training", "add", call_id, "--from", "00:02", "--to", "00:05.5", "--title", "怒鳴る顧客",
            "--note", "落ち着いて繰り返す", "--reason", "研修",
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        clip_id = added.stdout.split()[0]
        anon = run_cli(
            cli, "training", "add", call_id, "--from", "00:02", "--to", "00:05.5", "--title", "匿名化",
            "--anonymise",
        )  # fmt: skip
        assert anon.returncode == 0, anon.stderr
        anon_id = anon.stdout.split()[0]
        # A call that is neither held nor flagged is refused (exit 3): none exists here, so an unknown id
        # must at least fail without a clip (exit 1).
        unknown = run_cli(cli, "training", "add", "1.1", "--from", "0", "--to", "1", "--title", "x")
        assert unknown.returncode == 1, unknown.stderr

        clip_meta = json.loads(fetch(store, f"training/{clip_id}.json"))
        raw_meta = json.dumps(clip_meta, ensure_ascii=False)
        for secret in (CALLER_NUMBER, CALLER_NAME, call_id):
            assert secret not in raw_meta, secret
        assert clip_meta["duration_s"] == pytest.approx(3.5, abs=0.1)
        link = json.loads(fetch(store, f"training-sources/{clip_id}.json"))
        assert link["call_id"] == call_id

        # Retention (1 day, run a year from now): the held source stays, and the clips are never looked at.
        far = datetime.fromisoformat(source_meta["started_at"]) + timedelta(days=365)
        clips_before = await asyncio.to_thread(training_versions, store)
        assert len(clips_before) == 6  # two clips: audio, metadata, source link each
        events = MemoryEvents()
        report = await RetentionSweep(
            store, events, AuditLog(store, events, by="ret-test"), days=1, tz=zone("Asia/Tokyo"), now=far
        ).run()
        assert report.status == "completed" and report.purged == []
        assert await asyncio.to_thread(training_versions, store) == clips_before

        # The source goes (holds lifted, every version deleted): the clips stay whole.
        assert len(await asyncio.to_thread(remove_source, store, call_id)) >= 2
        out, anon_out = tmp_path / "clip.wav", tmp_path / "anon.wav"
        for cid, path in ((clip_id, out), (anon_id, anon_out)):
            played = run_cli(cli, "training", "play", cid, "-o", str(path))
            assert played.returncode == 0, played.stderr
        n, rate, chans = read_channels(out)
        assert n == 2 and abs(len(chans[0]) / rate - 3.5) <= 0.1
        _, _, anon_chans = read_channels(anon_out)
        # Pitch estimates: the caller's 700 Hz tone moved down by ~400 cents (to ~556 Hz); the agent's not.
        assert dominant_hz(chans[0], rate) == pytest.approx(700, abs=15)
        assert dominant_hz(anon_chans[0], rate) == pytest.approx(556, abs=20)
        assert dominant_hz(chans[1], rate) == pytest.approx(1300, abs=15)
        assert dominant_hz(anon_chans[1], rate) == pytest.approx(1300, abs=15)

        listed = run_cli(cli, "training", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        docs = [json.loads(line) for line in listed.stdout.splitlines()]
        assert {d["clip_id"] for d in docs} == {clip_id, anon_id}
        assert not any(CALLER_NUMBER in line or call_id in line for line in listed.stdout.splitlines())
        zip_path = tmp_path / "session.zip"
        exported = run_cli(cli, "training", "export", clip_id, anon_id, "-o", str(zip_path))
        assert exported.returncode == 0, exported.stderr
        with zipfile.ZipFile(zip_path) as zf:
            assert f"{clip_id}.wav" in zf.namelist() and "SHA256SUMS" in zf.namelist()
        # Without the admin keys (the [storage] keys' service role): refused, exit 3.
        no_admin = {k: v for k, v in cli.items() if not k.startswith("KASUHARA_ADMIN__")}
        assert run_cli(no_admin, "training", "list").returncode == 3
    finally:
        store.close()
        destroy_bucket(target, bucket)
        shutil.rmtree(spool, ignore_errors=True)
