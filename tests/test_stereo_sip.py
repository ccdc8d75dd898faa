"""``recording.mode = "stereo"`` through the real Asterisk and the real uploader: the caller's phone streams
700 Hz, the agent's 1300 Hz; the WAV stored in S3 has two channels, the caller's tone on the first only,
the agent's on the second only (MixMonitor runs on the caller's channel: channel 1 = what the caller says,
channel 2 = what the caller hears). The control: the default ``mixed`` mode stores one channel with both.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import wave
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kasuhara_ari.config import Config
from kasuhara_ari.storage import MinioStore

from audio import tone_levels
from escalation_helpers import ABSENT, AGENT_HZ, CALLER_HZ, PRESENT
from s3_fixture import fetch, fresh_bucket, open_store
from sip import agent_port, answering, caller
from test_inbound_sip import wait_for_calls

pytestmark = pytest.mark.integration


def channels_of(data: bytes) -> tuple[int, int, list[list[int]]]:
    """(channels, rate, samples per channel) of a 16-bit PCM WAV."""
    with wave.open(io.BytesIO(data), "rb") as w:
        n, rate, width = w.getnchannels(), w.getframerate(), w.getsampwidth()
        assert width == 2, width
        raw = w.readframes(w.getnframes())
    samples = [int.from_bytes(raw[i : i + 2], "little", signed=True) for i in range(0, len(raw), 2)]
    return n, rate, [samples[c::n] for c in range(n)]


def stored(store: MinioStore, call_id: str) -> tuple[dict[str, Any], bytes] | None:
    """The call's metadata and audio once both are in the bucket."""
    names = [
        o.object_name for o in store.client.list_objects(store.bucket, prefix="recordings/", recursive=True)
    ]
    meta_key = next((k for k in names if k.endswith(f"/{call_id}.json")), None)
    if meta_key is None:
        return None
    meta = json.loads(fetch(store, meta_key))
    if not meta["audio"].get("key"):
        return None
    return meta, fetch(store, meta["audio"]["key"])


async def record_and_store(
    service_factory: Any, cfg: Config, sip_workdir: Path
) -> tuple[dict[str, Any], bytes]:
    """One call (the agent answers, ~6 s of talk, the caller hangs up), uploaded: its metadata and WAV."""
    with fresh_bucket("kt-stereo") as (target, bucket):
        cfg = replace(cfg, storage=replace(cfg.storage, enabled=True, bucket=bucket))
        service = await service_factory(cfg)
        port = agent_port()
        agent = await answering(sip_workdir, port, ring_ms=200).start()
        customer = await caller(sip_workdir, port, app=cfg.ari.app, call_ms=6000).start()
        try:
            assert await customer.wait(60) == 0, customer.error_text()
            await agent.wait(20)
            (call_id,) = await wait_for_calls(service, 1, port)
        finally:
            await customer.stop()
            await agent.stop()
        store = open_store(target, bucket)
        try:
            deadline = time.monotonic() + 60
            while (found := await asyncio.to_thread(stored, store, call_id)) is None:
                assert time.monotonic() < deadline, "the recording never reached the bucket"
                await asyncio.sleep(0.3)
        finally:
            store.close()
        return found


async def test_stereo_puts_the_caller_and_the_agent_on_separate_channels(
    service_factory: Any, call_cfg: Config, sip_workdir: Path
) -> None:
    cfg = replace(call_cfg, recording=replace(call_cfg.recording, mode="stereo"))
    meta, wav = await record_and_store(service_factory, cfg, sip_workdir)
    assert meta["audio"]["channels"] == 2 and meta["audio"]["layout"] == ["caller", "agent"], meta["audio"]
    n, rate, chans = channels_of(wav)
    assert n == 2 and rate == 8000, (n, rate)
    # The length the header now implies is the call's, not twice it (one WAV second per call second).
    assert abs(len(chans[0]) / rate - meta["duration_s"]) < 1.5, (len(chans[0]) / rate, meta["duration_s"])
    # The agent answers after the 0.5 s notice and ~0.2 s of ringing: look at the talking part.
    caller_side = tone_levels(chans[0], rate, (CALLER_HZ, AGENT_HZ), start_s=2.0)
    agent_side = tone_levels(chans[1], rate, (CALLER_HZ, AGENT_HZ), start_s=2.0)
    assert caller_side[CALLER_HZ] > PRESENT and caller_side[AGENT_HZ] < ABSENT, caller_side
    assert agent_side[AGENT_HZ] > PRESENT and agent_side[CALLER_HZ] < ABSENT, agent_side


async def test_mixed_stays_one_channel_with_both(
    service_factory: Any, call_cfg: Config, sip_workdir: Path
) -> None:
    assert call_cfg.recording.mode == "mixed"
    meta, wav = await record_and_store(service_factory, call_cfg, sip_workdir)
    assert "channels" not in meta["audio"], meta["audio"]
    n, rate, chans = channels_of(wav)
    assert n == 1, n
    levels = tone_levels(chans[0], rate, (CALLER_HZ, AGENT_HZ), start_s=2.0)
    assert levels[CALLER_HZ] > PRESENT and levels[AGENT_HZ] > PRESENT, levels
