#!/usr/bin/env python3
"""Benchmark: what version-pinned evidence costs the upload path (requests and time per recording).

Against the stack's S3 (moto, `scripts/stack up`; or KASUHARA_TEST_S3_ENDPOINT), in a fresh bucket with
object lock, removed afterwards. ``--n`` recordings (``--kib`` of audio each) appear in a spool while one
:class:`Uploader` runs (as after calls: notified, fresh), half of them flagged (``*1``: hold in the
metadata). Reported per recording: S3 requests by operation (counted at the ObjectStore interface) and
wall time from the first notify until the spool is empty. Run it with ``--tree DIR`` to measure another
checkout of the code (e.g. ``git archive HEAD | tar -x -C /tmp/old``) with the same harness:

    .venv/bin/python scripts/bench_pinned_upload.py [--n 200] [--kib 160] [--tree /tmp/old]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


async def run(n: int, kib: int) -> dict[str, Any]:
    from uploader_helpers import metadata, put_recording, spool_config, wav_bytes

    from kasuhara_ari.events import MemoryEvents
    from kasuhara_ari.uploader import Timing, Uploader

    from s3_fixture import create_bucket, destroy_bucket, open_store, require_s3, unique_bucket

    target = require_s3()
    bucket = unique_bucket("kt-bench-pin")
    store = open_store(target, bucket, pool_size=8)
    create_bucket(store)
    counts: collections.Counter[str] = collections.Counter()
    for name in (
        "put_file",
        "put_bytes",
        "put_bytes_if",
        "stat",
        "get_bytes",
        "set_legal_hold",
        "list_prefix",
    ):
        real = getattr(store, name)

        def counted(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            counts[_name] += 1
            return _real(*args, **kwargs)

        setattr(store, name, counted)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            spool = Path(tmp)
            uploader = Uploader(
                spool_config(spool),
                store,
                MemoryEvents(),
                poll_interval_s=3600,
                timing=Timing(incomplete_after_s=60, orphan_after_s=600),
                concurrency=2,
            )
            task = asyncio.create_task(uploader.run())
            await asyncio.sleep(0.5)
            audio = wav_bytes(kib * 1024 // 2, seed=1)
            hold = {"reason": "harassment", "by": "agent", "at": "2025-01-01T18:00:00.000+00:00"}
            t0 = time.perf_counter()
            for i in range(n):
                cid = f"1735750000.{i}"
                flagged = i % 2 == 1
                put_recording(
                    spool,
                    cid,
                    audio=audio,
                    meta=metadata(
                        cid, hold=hold if flagged else None, flags=["harassment"] if flagged else []
                    ),
                )
                await uploader.notify(cid)
            await asyncio.wait_for(uploader.wait_empty(poll_s=0.02), 600)
            elapsed = time.perf_counter() - t0
            while uploader.stats.stored < n:  # the last one's bookkeeping follows its cleanup
                await asyncio.sleep(0.01)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert uploader.stats.stored == n, uploader.stats
        return {"n": n, "elapsed_s": elapsed, "counts": dict(counts)}
    finally:
        store.close()
        destroy_bucket(target, bucket)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--kib", type=int, default=160)
    parser.add_argument("--tree", type=Path, default=REPO)
    args = parser.parse_args()
    sys.path.insert(0, str(args.tree / "tests"))
    sys.path.insert(0, str(args.tree))
    result = asyncio.run(run(args.n, args.kib))
    n = result["n"]
    per = {k: round(v / n, 2) for k, v in sorted(result["counts"].items())}
    print(f"tree {args.tree}: {n} recordings of {args.kib} KiB, half flagged")
    print(f"  requests per recording: {sum(result['counts'].values()) / n:.2f}  {per}")
    print(f"  wall time per recording: {1000 * result['elapsed_s'] / n:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
