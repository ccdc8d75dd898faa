#!/usr/bin/env python3
"""What signal 2 costs the app: N caller streams of RTP (20 ms, slin 8 kHz, speech from the evaluation set
or a synthetic voice) sent in real time from a separate process to the app's one UDP socket
(kasuhara_ari/detection/media.py), each fed to the loudness detector; the receiving process's CPU time
(user + system, from getrusage) over the run, per stream, with the event loop doing nothing else.

    scripts/bench_detection_media.py [--streams 20,50,100] [--seconds 10]

Prints CPU % of one core per level and per stream (divide by the level). The sender's own CPU is not
counted (its own process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import resource
import socket
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kasuhara_ari.config import DetectionConfig
from kasuhara_ari.detection.loudness import LoudnessDetector
from kasuhara_ari.detection.media import MediaReceiver, StreamFeed


def voice_packets(seconds: float) -> list[bytes]:
    """20 ms RTP packets (L16 big-endian) of a speech-like signal at about −26 dBFS."""
    rate = 8000
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * np.cumsum(140 * (1 + 0.05 * np.sin(2 * np.pi * 0.7 * t))) / rate
    x = sum(np.sin(k * phase) / np.sqrt(k) for k in range(1, 23)) * (0.55 + 0.45 * np.sin(2 * np.pi * 4 * t))
    x = x / np.sqrt(np.mean(x * x)) * 10 ** (-26 / 20)
    pcm = (x * 32767).astype(">i2").tobytes()
    packets = []
    for i, off in enumerate(range(0, len(pcm) - 320 + 1, 320)):
        header = bytes([0x80, 10]) + (i & 0xFFFF).to_bytes(2, "big") + (i * 160).to_bytes(4, "big") + bytes(4)
        packets.append(header + pcm[off : off + 320])
    return packets


def send(port: int, streams: int, seconds: float, ready: multiprocessing.synchronize.Event) -> None:
    socks = []
    for _ in range(streams):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    Path(f"/tmp/bench-detection-media-{port}.json").write_text(json.dumps(ports))
    ready.set()
    packets = voice_packets(seconds)
    start = time.monotonic()
    for i, packet in enumerate(packets):
        for s in socks:
            s.sendto(packet, ("127.0.0.1", port))
        delay = start + (i + 1) * 0.02 - time.monotonic()
        if delay > 0:
            time.sleep(delay)


async def run_level(streams: int, seconds: float) -> dict[str, float]:
    receiver = MediaReceiver()
    _, port = await receiver.open("127.0.0.1", 0)
    ready = multiprocessing.Event()
    sender = multiprocessing.Process(target=send, args=(port, streams, seconds, ready))
    sender.start()
    await asyncio.to_thread(ready.wait, 10)
    ports = json.loads(Path(f"/tmp/bench-detection-media-{port}.json").read_text())
    detections = 0

    def found(items: list[object], feed: StreamFeed) -> None:
        nonlocal detections
        detections += len(items)

    feeds = []
    for p in ports:
        feed = StreamFeed("caller", [LoudnessDetector(DetectionConfig())], found)
        receiver.register(("127.0.0.1", p), feed)
        feeds.append(feed)
    before = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.monotonic()
    while sender.is_alive():
        await asyncio.sleep(0.1)
    wall = time.monotonic() - wall
    after = resource.getrusage(resource.RUSAGE_SELF)
    receiver.close()
    Path(f"/tmp/bench-detection-media-{port}.json").unlink(missing_ok=True)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    received = sum(f.packets for f in feeds)
    return {
        "streams": streams,
        "seconds": round(wall, 1),
        "cpu_pct_of_core": round(100 * cpu / wall, 2),
        "cpu_pct_per_stream": round(100 * cpu / wall / streams, 3),
        "packets_received": received,
        "packets_expected": streams * int(seconds / 0.02),
        "detections": detections,
    }


async def main_async(levels: list[int], seconds: float) -> list[dict[str, float]]:
    out = []
    for level in levels:
        result = await run_level(level, seconds)
        print(json.dumps(result), flush=True)
        out.append(result)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", default="20,50,100")
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args(argv)
    asyncio.run(main_async([int(x) for x in args.streams.split(",")], args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
