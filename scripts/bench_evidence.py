#!/usr/bin/env python3
"""Benchmark: the cost of tamper evidence — chained audit writes, `audit verify` and `export verify`.

Against the stack's S3 (moto, `scripts/stack up`; or KASUHARA_TEST_S3_ENDPOINT), in a fresh bucket with
object lock, removed afterwards:

1. *audit write*: ``--sample`` records written one after another through :class:`AuditLog` (chained: HEAD
   of the chain head, conditional PUT of the head, PUT of the record) vs the same number of plain PUTs
   (what a record cost before chains).
2. *audit verify*: ``--records`` chained records (4 writers, spread over 30 UTC days) are built with the
   real ``AuditLog.write`` in memory and copied byte for byte into the bucket (16 PUTs at a time: over
   HTTP the chain's three sequential requests per record would make seeding the slow part); then
   :class:`AuditVerifier` walks them all over the network; then one record is edited and it runs again.
3. *export verify*: ``--files`` / 3 recordings are seeded as the uploader stores them, exported with a
   signature by :class:`EvidenceExport` (audio, metadata and timeline per call: 3 files each), and the
   zip is checked by :func:`verify_zip` (signature, two signed hashes, every file); then once more with
   one byte of one file changed.

    .venv/bin/python scripts/bench_evidence.py [--records 10000] [--files 10000] [--sample 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from kasuhara_ari.audit import AuditLog, AuditVerifier  # noqa: E402
from kasuhara_ari.events import NullEvents  # noqa: E402
from kasuhara_ari.export import EvidenceExport, ExportItem  # noqa: E402
from kasuhara_ari.signing import ExportSigner, verify_zip  # noqa: E402
from kasuhara_ari.storage import MemoryStore, MinioStore, recording_keys  # noqa: E402

from recordings_seed import seed_many  # noqa: E402
from s3_fixture import create_bucket, destroy_bucket, open_store, s3_target, unique_bucket  # noqa: E402

BASE = datetime(2025, 6, 1, tzinfo=UTC)


async def copy_all(src: MemoryStore, dst: MinioStore, prefixes: tuple[str, ...]) -> int:
    limit = asyncio.Semaphore(16)
    keys = [k for k in src.objects if k.startswith(prefixes) and src.objects[k][-1].data is not None]

    async def one(key: str) -> None:
        v = src.objects[key][-1]
        async with limit:
            await dst.put_bytes(
                key, v.data or b"", metadata=dict(v.metadata), content_type="application/json"
            )

    await asyncio.gather(*(one(k) for k in keys))
    return len(keys)


async def audit_write_cost(store: MinioStore, n: int) -> tuple[float, float]:
    log = AuditLog(store, NullEvents(), by="bench", host="bench-host")
    t = time.perf_counter()
    for i in range(n):
        await log.write(log.new("show", reason=f"sample {i}", target={"call_id": f"c{i}"}))
    chained = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for i in range(n):
        record = log.new("show", reason=f"plain {i}", target={"call_id": f"p{i}"})
        await store.put_bytes(record.key, record.to_json(), metadata={}, content_type="application/json")
    plain = (time.perf_counter() - t) / n
    return chained, plain


async def build_records(n: int) -> MemoryStore:
    mem = MemoryStore()
    logs = [AuditLog(mem, NullEvents(), by=f"admin{w}", host="bench-host") for w in range(4)]
    step = timedelta(days=30) / n
    for i in range(n):
        log = logs[i % len(logs)]
        await log.write(log.new("hold", reason=f"bench {i}", target={"call_id": f"c{i}"}, at=BASE + i * step))
    return mem


async def bench_audit(target_store: MinioStore, records: int) -> dict[str, float]:
    out: dict[str, float] = {}
    t = time.perf_counter()
    mem = await build_records(records)
    copied = await copy_all(mem, target_store, ("audit/", "audit-chains/"))
    out["seed_s"] = time.perf_counter() - t
    out["objects"] = copied
    t, cpu = time.perf_counter(), time.process_time()
    report = await AuditVerifier(target_store).run()
    out["verify_s"] = time.perf_counter() - t
    out["verify_cpu_s"] = time.process_time() - cpu
    out["verified_records"] = report.records
    out["findings"] = len(report.findings)
    victim = sorted(k for k in mem.objects if k.startswith("audit/"))[records // 2]
    data = (await target_store.get_bytes(victim) or b"").replace(b"bench", b"BENCH", 1)
    await target_store.put_bytes(victim, data, metadata={}, content_type="application/json")
    t = time.perf_counter()
    tampered = await AuditVerifier(target_store).run()
    out["verify_tampered_s"] = time.perf_counter() - t
    out["tampered_findings"] = len(tampered.findings)
    out["tampered_named"] = float(any(f.key == victim for f in tampered.findings))
    return out


async def bench_export(store: MinioStore, files: int, tmp: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    calls = -(-files // 3)
    specs = [(f"{1748736000 + i}.{i}", BASE + timedelta(seconds=60 * i)) for i in range(calls)]
    t = time.perf_counter()
    await seed_many(store, specs)
    out["seed_s"] = time.perf_counter() - t
    items = [ExportItem(cid, recording_keys(cid, at).metadata) for cid, at in specs]
    exporter = EvidenceExport(store, created_by="bench", query={"bench": True}, reason="bench")
    exporter.signer = ExportSigner(key := Ed25519PrivateKey.generate())
    t = time.perf_counter()
    result = await exporter.write(items, tmp / "evidence.zip")
    out["export_s"] = time.perf_counter() - t
    zip_path = EvidenceExport.commit(result, tmp / "evidence.zip")
    with zipfile.ZipFile(zip_path) as zf:
        out["zip_files"] = len(zf.namelist())
    out["zip_mib"] = zip_path.stat().st_size / 2**20
    t = time.perf_counter()
    ok = await asyncio.to_thread(verify_zip, zip_path, key.public_key())
    out["verify_s"] = time.perf_counter() - t
    out["verify_ok"] = float(ok.ok)
    out["checked_files"] = len(ok.files)
    # One byte changed in one file: the verdict names it.
    bad = tmp / "bad.zip"
    with zipfile.ZipFile(zip_path) as src, zipfile.ZipFile(bad, "w") as dst:
        victim = next(n for n in src.namelist() if n.endswith("/metadata.json"))
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data.replace(b'"', b"'", 1) if info.filename == victim else data)
    t = time.perf_counter()
    bad_result = await asyncio.to_thread(verify_zip, bad, key.public_key())
    out["verify_bad_s"] = time.perf_counter() - t
    out["bad_named"] = float(any(f.name == victim and f.status == "mismatch" for f in bad_result.files))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--sample", type=int, default=200)
    parser.add_argument("--only", choices=("write", "audit", "export"), help="Run one part only.")
    args = parser.parse_args()
    target = s3_target()
    print(
        f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, S3 at {target.endpoint}",
        flush=True,
    )
    results: dict[str, dict[str, float]] = {}
    for name in (args.only,) if args.only else ("write", "audit", "export"):
        bucket = unique_bucket("bench-evidence")
        store = open_store(target, bucket, read_timeout_s=120.0, pool_size=32)
        create_bucket(store)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                if name == "write":
                    chained, plain = asyncio.run(audit_write_cost(store, args.sample))
                    results[name] = {"chained_ms": chained * 1000, "plain_ms": plain * 1000}
                elif name == "audit":
                    results[name] = asyncio.run(bench_audit(store, args.records))
                else:
                    results[name] = asyncio.run(bench_export(store, args.files, Path(tmp)))
        finally:
            store.close()
            destroy_bucket(target, bucket)
        print(f"{name}: " + ", ".join(f"{k}={v:.3f}" for k, v in results[name].items()), flush=True)
    if args.only:
        return 0
    w, a, e = results["write"], results["audit"], results["export"]
    print()
    print("| measurement | result |")
    print("|---|---|")
    print(f"| audit record write, chained (3 requests) | {w['chained_ms']:.1f} ms |")
    print(f"| audit record write, plain PUT (before) | {w['plain_ms']:.1f} ms |")
    print(
        f"| `audit verify`, {a['verified_records']:.0f} records, 4 chains, 30 days | {a['verify_s']:.1f} s "
        f"({a['verify_s'] / a['verified_records'] * 1000:.2f} ms/record; "
        f"client CPU {a['verify_cpu_s']:.1f} s), {a['findings']:.0f} findings |"
    )
    print(
        f"| same, one record edited | {a['verify_tampered_s']:.1f} s, "
        f"{a['tampered_findings']:.0f} finding(s), "
        f"edited key named: {'yes' if a['tampered_named'] else 'NO'} |"
    )
    print(f"| seeding {a['objects']:.0f} objects (not part of verify) | {a['seed_s']:.1f} s |")
    print(
        f"| signed export, {e['zip_files']:.0f} files ({e['zip_mib']:.1f} MiB) from S3 "
        f"| {e['export_s']:.1f} s |"
    )
    print(
        f"| `export verify` of it (signature + every file, offline) | {e['verify_s']:.2f} s, "
        f"ok: {'yes' if e['verify_ok'] else 'NO'} |"
    )
    print(
        f"| same zip, one metadata byte changed | {e['verify_bad_s']:.2f} s, file named: "
        f"{'yes' if e['bad_named'] else 'NO'} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
