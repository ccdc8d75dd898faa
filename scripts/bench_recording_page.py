#!/usr/bin/env python3
"""What the console's recording page costs (issue 13), against the stack's S3 (moto, ``scripts/stack up``).

A ``--minutes`` long recording (8 kHz 16-bit, as MixMonitor writes it) is seeded as the uploader stores it
into a fresh bucket; the console app runs in this process (httpx's ASGI transport, accounts faked, the
store the real MinioStore) and a supervisor:

* opens the page (``desk.show``: metadata, pins, two HEADs; a ``show`` audit record);
* makes the first audio request (``desk.play``: the ``play`` record written first, then a HEAD and the
  first ranged GET);
* seeks ``-n`` times (64 KiB Range requests at random offsets: the grant is reused, no audit record);
* asks for the waveform: once computed (the whole file read and hashed once), then from the cache.

Prints the median and p95 of each (ms) and the peak RSS of this process. Usage (stack up):
``eval "$(scripts/stack env)"; .venv/bin/python scripts/bench_recording_page.py [--minutes 10] [-n 50]``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import resource
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from uploader_helpers import wav_bytes  # noqa: E402

from kasuhara_ari.accounts import Accounts, Role  # noqa: E402
from kasuhara_ari.config import Config  # noqa: E402
from kasuhara_ari.events import NullEvents  # noqa: E402
from kasuhara_ari.web import create_app  # noqa: E402

from recordings_seed import seed  # noqa: E402
from s3_fixture import create_bucket, destroy_bucket, open_store, s3_target, unique_bucket  # noqa: E402
from web_fakes import FakeAccounts, FakeClock  # noqa: E402

CID = "1764720000.77"
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


async def timed(fn: Callable[[], Awaitable[httpx.Response]], expect: int) -> float:
    started = time.perf_counter()
    response = await fn()
    elapsed = time.perf_counter() - started
    assert response.status_code == expect, (response.status_code, response.text[:300])
    return elapsed * 1000


def summary(name: str, ms: list[float]) -> None:
    ms = sorted(ms)
    p95 = ms[min(len(ms) - 1, int(len(ms) * 0.95))]
    print(f"{name:<34} n={len(ms):<4} median {statistics.median(ms):8.1f} ms   p95 {p95:8.1f} ms")


async def run(minutes: int, seeks: int) -> None:
    target = s3_target()
    bucket = unique_bucket("kbrp")
    store = open_store(target, bucket, pool_size=32)
    create_bucket(store)
    try:
        audio = wav_bytes(8000 * 2 * 60 * minutes, seed=7)
        await seed(store, CID, datetime.fromtimestamp(1764720000, UTC), audio=audio)
        accounts = FakeAccounts()
        accounts.add("super1", Role.SUPERVISOR, "pw")
        app = create_app(
            Config(), cast(Accounts, accounts), clock=FakeClock(), store=store, events=NullEvents()
        )
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://console", timeout=120
        ) as client:
            token = CSRF_RE.search((await client.get("/login")).text)
            assert token
            await client.post("/login", data={"csrf": token.group(1), "username": "super1", "password": "pw"})
            page = [await timed(lambda: client.get(f"/recordings/{CID}"), 200) for _ in range(5)]
            url = f"/recordings/{CID}/audio"
            first = await timed(lambda: client.get(url, headers={"range": "bytes=0-65535"}), 206)
            rnd = random.Random(1)
            seek: list[float] = []
            for _ in range(seeks):
                at = rnd.randrange(0, len(audio) - 65536)
                rng = {"range": f"bytes={at}-{at + 65535}"}
                seek.append(await timed(lambda rng=rng: client.get(url, headers=rng), 206))  # type: ignore[misc]
            wave = f"/recordings/{CID}/waveform"
            computed = await timed(lambda: client.get(wave), 200)
            cached = [await timed(lambda: client.get(wave), 200) for _ in range(5)]
        print(f"recording: {minutes} min, {len(audio) / 1e6:.1f} MB; S3 {target.endpoint}")
        summary("page (desk.show)", page)
        summary("first audio request (play audit)", [first])
        summary("seek, 64 KiB Range", seek)
        summary("waveform, computed", [computed])
        summary("waveform, cached", cached)
        rss: Any = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"peak RSS of this process (console + client + the seeded file): {rss / 1024:.0f} MB")
    finally:
        store.close()
        destroy_bucket(target, bucket)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("-n", type=int, default=50, help="seeks")
    args = parser.parse_args()
    asyncio.run(run(args.minutes, args.n))


if __name__ == "__main__":
    main()
