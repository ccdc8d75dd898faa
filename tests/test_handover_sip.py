"""A restart of ``kasuhara serve`` with a call in progress (``routing.on_stop = handover``, the default):
the stopping service leaves the talking call bridged and recording, the next one takes it over, and the
call goes on as if nothing happened — the agent's key still flags it, the caller's hang-up still ends it,
and the bucket gets ONE recording of the whole call with one metadata document telling the whole story.

Real processes (SIGTERM as systemd sends it), real SIPp phones through the stack's Asterisk, mosquitto
and S3. A handover file that cannot be read is kept (renamed ``.bad``), never deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import shutil
import signal
import subprocess
import time
import uuid
import wave
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from test_flag_e2e_sip import _logged, _objects_of, _start_serve, _stop, serve_env

from kasuhara_ari.config import Config

from escalation_helpers import agent_pressing, ari_get
from s3_fixture import create_bucket, destroy_bucket, fetch, open_store, require_s3, unique_bucket
from sip import agent_port, answering, caller
from test_events import Collector

pytestmark = pytest.mark.integration

# The agent flags the call this long after answering: well after the restart (which takes a few seconds).
FLAG_AT_MS = 16000
# The caller hangs up this long after Asterisk answered (0.5-s test notice, ring, then the talk).
CALLER_TALKS_MS = 26000


@dataclasses.dataclass
class Serving:
    """What the two ``serve`` processes of a test share: app, bucket, MQTT prefix and spool."""

    env: dict[str, str]
    prefix: str
    spool: Path
    store: Any


@contextlib.contextmanager
def serving(asterisk: Config, tag: str) -> Iterator[Serving]:
    target = require_s3()
    uid = uuid.uuid4().hex[:10]
    bucket, prefix = unique_bucket(f"kt-{tag}"), f"kt-{tag}-{uid}"
    store = open_store(target, bucket)
    create_bucket(store)
    spool = asterisk.recording.host_dir / f"{tag}-{uid}"
    spool.mkdir(mode=0o777)
    try:
        yield Serving(
            serve_env(asterisk, f"kasuhara-{tag}{uid}", bucket, prefix, spool), prefix, spool, store
        )
    finally:
        store.close()
        destroy_bucket(target, bucket)
        shutil.rmtree(spool, ignore_errors=True)


async def stored(s: Serving, call_id: str, serve: subprocess.Popen[bytes], log: Path) -> dict[str, str]:
    """The call's objects once both are in the bucket (the second ``serve`` must stay up meanwhile)."""
    deadline = time.monotonic() + 60
    while len(objects := await asyncio.to_thread(_objects_of, s.store, call_id)) < 2:
        assert serve.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, (objects, log.read_text()[-3000:])
        await asyncio.sleep(0.3)
    return objects


def recorded_seconds(audio: bytes) -> float:
    with wave.open(io.BytesIO(audio)) as w:
        return w.getnframes() / w.getframerate()


async def test_restart_mid_call_hands_the_call_over_and_loses_nothing(
    asterisk: Config, mqtt_broker: Config, s3_server: Config, sip_workdir: Path, tmp_path: Path
) -> None:
    first_log, second_log = tmp_path / "serve-1.log", tmp_path / "serve-2.log"
    phones = []
    with serving(asterisk, "ho") as s:
        # Signal 2 on: its audio stream belongs to the process (a socket of its own): dropped at the
        # handover, started again by the next one.
        s.env["KASUHARA_DETECTION__LOUDNESS"] = "true"
        try:
            async with Collector(mqtt_broker.mqtt.port, s.prefix) as sub:
                first = _start_serve(s.env, first_log)
                second = None
                try:
                    await _logged(first_log, "stasis event=resynced", 30)
                    port = agent_port()
                    agent = await agent_pressing(sip_workdir, port, [(FLAG_AT_MS, "*1")]).start()
                    app = s.env["KASUHARA_ARI__APP"]
                    customer = await caller(sip_workdir, port, app=app, call_ms=CALLER_TALKS_MS).start()
                    phones = [agent, customer]
                    await sub.wait_for(lambda c: any(p["event"] == "agent_answered" for p in c.calls()), 30)
                    (call_id,) = {p["call_id"] for p in sub.calls() if p["event"] == "agent_answered"}
                    await asyncio.sleep(1.0)

                    # The restart: SIGTERM as systemd sends it. The call is left up, nobody gets a BYE.
                    stopped_at = time.monotonic()
                    first.send_signal(signal.SIGTERM)
                    assert await asyncio.to_thread(first.wait, 30) == 0, first_log.read_text()[-3000:]
                    assert "call event=handed_over" in first_log.read_text()
                    assert (s.spool / f"{call_id}.handover").exists()
                    assert not customer.received("BYE") and not agent.received("BYE")
                    # Not a handover (truncated, hostile): kept aside, never deleted or trusted.
                    (s.spool / "1796300000.7.handover").write_text('{"schema": "kasuhara.handover/1", "rec')
                    second = _start_serve(s.env, second_log)
                    await sub.wait_for(lambda c: any(p["event"] == "resumed" for p in c.calls()), 30)
                    print(f"  restart: call resumed {time.monotonic() - stopped_at:.1f} s after SIGTERM")

                    # Still the same call: the agent's key flags it, the caller's hang-up ends it.
                    await sub.wait_for(lambda c: any(p["event"] == "flagged" for p in c.calls()), 40)
                    assert await customer.wait(60) == 0, customer.error_text()
                    await sub.wait_for(lambda c: any(p["event"] == "ended" for p in c.calls()), 20)
                    assert not customer.received("BYE"), "the caller was cut off instead of hanging up"
                    assert agent.received("BYE"), "the agent was left on the line after the caller hung up"
                    objects = await stored(s, call_id, second, second_log)
                finally:
                    _stop(first)
                    if second is not None:
                        assert _stop(second) == 0, second_log.read_text()[-3000:]
        finally:
            for phone in phones:
                await phone.stop()

        events = [p["event"] for p in sub.calls() if p.get("call_id") == call_id]
        assert events.count("started") == 1 and events.count("ended") == 1, events
        assert events.index("handed_over") < events.index("resumed") < events.index("flagged"), events
        meta = json.loads(await asyncio.to_thread(fetch, s.store, objects["json"]))
        assert meta["call_id"] == call_id and meta["end_reason"] == "caller_hungup", meta
        assert meta["flags"] == ["harassment"] and meta["agent"], meta
        timeline = [e["event"] for e in meta["timeline"]]
        for name in ("started", "agent_answered", "handed_over", "resumed", "flagged", "ended"):
            assert timeline.count(name) == 1, (name, timeline)
        # One recording of the whole call: from the answer to the caller's hang-up, across the restart.
        recorded_s = recorded_seconds(await asyncio.to_thread(fetch, s.store, objects["wav"]))
        assert abs(recorded_s - meta["duration_s"]) < 1.0, (recorded_s, meta["duration_s"])
        assert meta["duration_s"] > CALLER_TALKS_MS / 1000 - 2, meta["duration_s"]
        channels = await ari_get(asterisk, "/channels")
        leftovers = [c["id"] for c in channels.json() if call_id in c["id"]]
        assert leftovers == [], leftovers  # nothing of the media path (or the call) outlives it
        for log in (first_log, second_log):  # each process had its own stream, none failed
            assert "call event=media_failed" not in log.read_text(), log.read_text()[-3000:]
        assert [p.name for p in s.spool.glob("*.handover*")] == ["1796300000.7.handover.bad"]
        assert "stasis event=handover_unreadable file=1796300000.7.handover" in second_log.read_text()


async def test_caller_hanging_up_while_no_serve_runs_is_ended_by_the_next_one(
    asterisk: Config, mqtt_broker: Config, s3_server: Config, sip_workdir: Path, tmp_path: Path
) -> None:
    """The caller hangs up between the old service's exit and the new one's start: the new one finds the
    caller gone, hangs up the agent left alone in the bridge, and stores the recording with the end time
    the recording itself gives (its last write), not the time it noticed."""
    first_log, second_log = tmp_path / "serve-1.log", tmp_path / "serve-2.log"
    phones = []
    with serving(asterisk, "hg") as s:
        try:
            async with Collector(mqtt_broker.mqtt.port, s.prefix) as sub:
                first = _start_serve(s.env, first_log)
                second = None
                try:
                    await _logged(first_log, "stasis event=resynced", 30)
                    port = agent_port()
                    agent = await answering(sip_workdir, port).start()
                    app = s.env["KASUHARA_ARI__APP"]
                    customer = await caller(sip_workdir, port, app=app, call_ms=6000).start()
                    phones = [agent, customer]
                    await sub.wait_for(lambda c: any(p["event"] == "agent_answered" for p in c.calls()), 30)
                    (call_id,) = {p["call_id"] for p in sub.calls() if p["event"] == "agent_answered"}
                    first.send_signal(signal.SIGTERM)
                    assert await asyncio.to_thread(first.wait, 30) == 0, first_log.read_text()[-3000:]
                    assert await customer.wait(30) == 0, customer.error_text()  # hung up on its own
                    hung_up = time.time()
                    await asyncio.sleep(2.0)  # nobody is there to notice
                    assert not agent.received("BYE")
                    second = _start_serve(s.env, second_log)
                    await sub.wait_for(lambda c: any(p["event"] == "ended" for p in c.calls()), 30)
                    assert await agent.wait(20) == 0, agent.error_text()
                    assert agent.received("BYE"), "the agent was left alone in the bridge"
                    objects = await stored(s, call_id, second, second_log)
                finally:
                    _stop(first)
                    if second is not None:
                        assert _stop(second) == 0, second_log.read_text()[-3000:]
        finally:
            for phone in phones:
                await phone.stop()
        meta = json.loads(await asyncio.to_thread(fetch, s.store, objects["json"]))
        assert meta["end_reason"] == "caller_hungup", meta
        assert [e["event"] for e in meta["timeline"]][-3:] == ["handed_over", "resumed", "ended"], meta
        ended = datetime.fromisoformat(meta["ended_at"]).timestamp()
        assert ended <= hung_up + 0.5, (meta["ended_at"], hung_up)  # the recording's end, not the restart
        recorded_s = recorded_seconds(await asyncio.to_thread(fetch, s.store, objects["wav"]))
        assert abs(recorded_s - meta["duration_s"]) < 1.0, (recorded_s, meta["duration_s"])
        assert meta["audio"]["incomplete"] is False, meta["audio"]
