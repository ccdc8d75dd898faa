"""Shouting detected through the real Asterisk (issue 14, signal 2): the caller's SIPp phone streams a clip
of the evaluation set (scripts/make_detection_set.py: espeak-ng speech, telephone band, G.711 µ-law) and
the app hears it through a snoop ``spy=in`` → externalMedia → its one RTP socket.

- calm speech with a 3 s shout in the middle → ``shouting_detected`` during the call, the marker in the
  metadata's timeline at the shout's onset (±0.5 s, on the recording's clock), and in ``act`` mode the
  supervisors alerted and the call flagged;
- the same speaker calm at a high steady level → no event;
- neither call leaves a snoop, externalMedia channel or bridge behind in Asterisk.

The latency (onset → event) is in each event's ``latency_s``; it is measured and reported by
scripts/bench_detection.py and docs/benchmarks.md, not asserted here.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from kasuhara_ari.config import Config
from kasuhara_ari.schemas import validate_event
from kasuhara_ari.web.waveform import markers

from escalation_helpers import supervisor_phone, with_supervisors
from sip import agent_port, answering, caller, free_udp_port
from test_inbound_sip import event_names, wait_for_calls

pytestmark = pytest.mark.integration

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def detection_set() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_detection_set", SCRIPTS / "make_detection_set.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_detection_set", module)
    spec.loader.exec_module(module)
    return module


def clip(tmp: Path, kind: str, seed: int) -> tuple[Path, dict[str, Any]]:
    """One clip of the evaluation set (the CI slice), as the phone's µ-law WAV, and its label."""
    gen = detection_set()
    audio, label = gen.make_clip(kind, "ja", random.Random(seed))
    lin, out = tmp / f"{kind}-lin.wav", tmp / f"{kind}.wav"
    gen.write_wav(lin, audio)
    gen.to_ulaw(lin, out)
    return out, label


async def place(
    service: Any, sip_workdir: Path, audio: Path, seconds: float
) -> tuple[str, list[dict[str, Any]]]:
    port = agent_port()
    agent = await answering(sip_workdir, port, ring_ms=200).start()
    phone = caller(sip_workdir, port, app=service.cfg.ari.app, call_ms=int(seconds * 1000))
    (phone.dir / "caller.wav").write_bytes(audio.read_bytes())
    customer = await phone.start()
    try:
        assert await customer.wait(90) == 0, customer.error_text()
        await agent.wait(20)
        (call_id,) = await wait_for_calls(service, 1, port)
    finally:
        await customer.stop()
        await agent.stop()
    return call_id, service.memory_events.of(call_id)


async def assert_nothing_left(service: Any, call_id: str) -> None:
    """The media path's channels and bridge are gone with the call."""
    ari = service.app.ari
    left = [c.id for c in await ari.channels() if c.id.startswith(f"{call_id}-media")]
    assert left == [], left
    bridges = await ari.request("GET", "/bridges")
    assert [b["id"] for b in bridges if call_id in b["id"]] == []


async def test_a_shout_mid_call_is_detected_marked_and_acted_on_and_a_loud_steady_caller_is_not(
    service_factory: Any, call_cfg: Config, sip_workdir: Path, spool: Path, tmp_path: Path
) -> None:
    cfg = replace(
        call_cfg, detection=replace(call_cfg.detection, mode="act", loudness=True, act_flag_after=1)
    )
    service = await service_factory(cfg)

    audio, label = clip(tmp_path, "shout", seed=3)
    onset = label["shouts"][0][0]
    call_id, events = await place(service, sip_workdir, audio, label["seconds"] - 0.5)
    names = event_names(service, call_id)
    assert "shouting_detected" in names, names
    assert names.index("shouting_detected") < names.index("ended")  # live, not after the call
    found = next(e for e in events if e["event"] == "shouting_detected")
    validate_event({"schema": "kasuhara.event/1", **found})
    assert found["mode"] == "act"
    # The caller's baseline is their calm speech, the shout well above it.
    assert found["level_dbfs"] - found["baseline_dbfs"] >= cfg.detection.shout_over_baseline_db
    assert abs(found["baseline_dbfs"] - label["baseline_dbfs"]) < 4, (found, label)
    # act: the supervisors are alerted, the call becomes evidence (once each).
    assert names.count("detection_alert") == 1 and names.count("flagged") == 1, names
    alert = next(e for e in events if e["event"] == "detection_alert")
    validate_event({"schema": "kasuhara.event/1", **alert})
    assert alert["kind"] == "shouting"
    meta = json.loads((spool / f"{call_id}.json").read_text())
    marks = [t for t in meta["timeline"] if t["event"] == "shouting_detected"]
    assert len(marks) == 1
    # The marker sits where the shout began in the recording (the phone's audio starts at the answer).
    assert abs(marks[0]["offset_s"] - onset) <= 0.5, (marks[0], onset)
    # ...and the recording page's marker too (it reads the same offset).
    (marker,) = [m for m in markers(meta) if m.kind == "shouting"]
    assert abs(marker.at_s - onset) <= 0.5, (marker, onset)
    assert "harassment" in meta["flags"] and meta["hold"]["by"] == "detector"
    await assert_nothing_left(service, call_id)

    audio, label = clip(tmp_path, "loud_calm", seed=3)
    calm_id, _ = await place(service, sip_workdir, audio, min(label["seconds"], 16.0) - 0.5)
    calm_names = event_names(service, calm_id)
    assert "shouting_detected" not in calm_names and "detection_alert" not in calm_names, calm_names
    assert "ended" in calm_names
    await assert_nothing_left(service, calm_id)


async def test_act_listen_rings_a_supervisor_who_listens_in_until_the_call_ends(
    service_factory: Any, call_cfg: Config, sip_workdir: Path, spool: Path, tmp_path: Path
) -> None:
    """``act_listen``: on the shout, the first supervisor is rung and joins in listen mode (supervision.py,
    its events on the service's sink); the call's end ends the listening and hangs up the supervisor."""
    sup_port = free_udp_port(5100, 5999)
    cfg = with_supervisors(call_cfg, sup_port)
    cfg = replace(
        cfg, detection=replace(cfg.detection, mode="act", loudness=True, act_listen=True, act_flag_after=0)
    )
    service = await service_factory(cfg)
    supervisor = await supervisor_phone(sip_workdir, sup_port, ring_ms=300).start()  # never hangs up
    audio, label = clip(tmp_path, "shout", seed=5)
    try:
        call_id, events = await place(service, sip_workdir, audio, label["seconds"] - 0.5)
        assert await supervisor.wait(20) == 0, supervisor.error_text()
    finally:
        await supervisor.stop()
    names = event_names(service, call_id)
    assert "shouting_detected" in names and "detection_alert" in names, names
    assert "flagged" not in names  # act_flag_after = 0
    listening = [e for e in events if e["event"] == "supervisor_listening"]
    assert listening and listening[0]["by"] == "detector", names
    validate_event({"schema": "kasuhara.event/1", **listening[0]})
    assert names.index("detection_alert") < names.index("supervisor_listening") < names.index("ended")
    assert supervisor.received("BYE"), "the supervisor was left on the line"
    await assert_nothing_left(service, call_id)
