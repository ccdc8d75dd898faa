#!/usr/bin/env python3
"""Shouting detection end to end over real SIP: SIPp callers stream clips of the evaluation set
(scripts/make_detection_set.py: shouts and loud-but-calm), through the stack's Asterisk, into an
in-process ``kasuhara serve`` (its own Stasis app, MQTT and S3 off), detection in ``observe``; per call the
event (or none), its ``latency_s`` (the shout's onset in the recording → the event) and the offset error of
the marker. Calls run ``--concurrent`` at a time.

    .venv/bin/python scripts/bench_detection_sip.py [--calls 8] [--concurrent 4] [--seed 7]

Needs the stack (``scripts/stack up``), root (SIPp) and chan_rtp.so in Asterisk (loaded here through ARI
if a restart of the shared stack unloaded it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))

import make_detection_set as gen  # noqa: E402
from bench_detection_load import asterisk_started  # noqa: E402

from kasuhara_ari.config import load  # noqa: E402
from kasuhara_ari.events import MemoryEvents  # noqa: E402
from kasuhara_ari.service import Service  # noqa: E402

from sip import agent_port, answering, caller  # noqa: E402


async def one_call(service: Any, work: Path, kind: str, seed: int) -> dict[str, Any]:
    audio, label = gen.make_clip(kind, "ja" if seed % 2 else "en", random.Random(seed))
    seconds = min(label["seconds"], 18.0) - 0.5
    clip_dir = work / f"clip-{seed}"
    clip_dir.mkdir()
    gen.write_wav(clip_dir / "lin.wav", audio)
    gen.to_ulaw(clip_dir / "lin.wav", clip_dir / "caller.wav")
    port = agent_port()
    agent = await answering(work, port, ring_ms=200, name=f"agent-{seed}").start()
    phone = caller(work, port, app=service.cfg.ari.app, call_ms=int(seconds * 1000), name=f"caller-{seed}")
    (phone.dir / "caller.wav").write_bytes((clip_dir / "caller.wav").read_bytes())
    customer = await phone.start()
    try:
        await customer.wait(120)
        await agent.wait(20)
    finally:
        await customer.stop()
        await agent.stop()
    events: MemoryEvents = service.memory_events
    for _ in range(100):
        ours = [
            e["call_id"]
            for e in events.events
            if e["event"] == "started" and e.get("target", "").endswith(f"@127.0.0.1:{port}")
        ]
        if ours and any(e["event"] == "ended" and e["call_id"] == ours[0] for e in events.events):
            break
        await asyncio.sleep(0.1)
    call_id = ours[0] if ours else ""
    found = [e for e in events.of(call_id) if e["event"] == "shouting_detected"]
    shouts = label["shouts"]
    row: dict[str, Any] = {"kind": kind, "seed": seed, "call_id": call_id, "events": len(found)}
    if found:
        row["latency_s"] = found[0].get("latency_s")
        row["offset_s"] = found[0]["offset_s"]
        if shouts:
            row["offset_error_s"] = round(found[0]["offset_s"] - shouts[0][0], 2)
            # From the labelled onset (the shout's first sample in the recording) to the event.
            row["latency_from_label_s"] = round(
                found[0]["offset_s"] + found[0]["latency_s"] - shouts[0][0], 2
            )
    return row


async def main_async(calls: int, concurrent: int, seed: int) -> list[dict[str, Any]]:
    await asterisk_started(("res_rtp_multicast.so", "chan_rtp.so"))
    cfg = load()
    cfg = replace(
        cfg,
        ari=replace(cfg.ari, app=f"kasuhara-bd{uuid.uuid4().hex[:8]}"),
        mqtt=replace(cfg.mqtt, enabled=False),
        storage=replace(cfg.storage, enabled=False),
        detection=replace(cfg.detection, mode="observe", loudness=True),
        announcement=replace(cfg.announcement, sound="kasuhara/test-notice"),
    )
    events = MemoryEvents()
    service = Service(cfg, events=events)
    service.memory_events = events  # type: ignore[attr-defined]
    task = asyncio.create_task(service.run())
    await asyncio.wait_for(service.app.connected.wait(), 10)
    await asyncio.sleep(1)
    work = Path(tempfile.mkdtemp(prefix="kasuhara-bench-detection-sip-"))
    kinds = ["shout" if i % 4 else "loud_calm" for i in range(calls)]
    rows: list[dict[str, Any]] = []
    sem = asyncio.Semaphore(concurrent)

    async def limited(i: int) -> None:
        async with sem:
            rows.append(await one_call(service, work, kinds[i], seed + i))
            print(json.dumps(rows[-1]), flush=True)

    await asyncio.gather(*(limited(i) for i in range(calls)))
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=8)
    ap.add_argument("--concurrent", type=int, default=4)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    rows = asyncio.run(main_async(args.calls, args.concurrent, args.seed))
    shouts = [r for r in rows if r["kind"] == "shout"]
    calm = [r for r in rows if r["kind"] != "shout"]
    lat = np.array([r["latency_from_label_s"] for r in shouts if "latency_from_label_s" in r] or [np.nan])
    err = np.array([abs(r["offset_error_s"]) for r in shouts if "offset_error_s" in r] or [np.nan])
    print(
        f"shout calls {len(shouts)}: detected {sum(1 for r in shouts if r['events'])}; "
        "latency labelled onset→event "
        f"p50 {np.percentile(lat, 50):.2f} s p95 {np.percentile(lat, 95):.2f} s; marker offset error max "
        f"{np.nanmax(err):.2f} s; loud-but-calm calls {len(calm)}: "
        f"false events {sum(r['events'] for r in calm)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
