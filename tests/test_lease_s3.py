"""The lease on real S3 servers: moto (enforces If-None-Match) and Ceph RGW 16 (ignores it on an object-lock
bucket), over real sockets. What each server does is asserted too, so a server upgrade that changes it
shows here first."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from kasuhara_ari.audit import AuditLog
from kasuhara_ari.events import MemoryEvents
from kasuhara_ari.lease import Lease, LeaseLost, LeaseUnsupported, epoch_key
from kasuhara_ari.retention import LEASE_PREFIX, RetentionSweep, cutoff_for
from kasuhara_ari.retention import LeaseLost as RetentionLeaseLost
from kasuhara_ari.storage import MemoryStore, MinioStore, PreconditionFailed

from conftest import skip_or_fail
from recordings_seed import REPO, cli_command, cli_env, live_keys, run_cli, seed_many
from s3_fixture import CuttableProxy, S3Target, destroy_bucket, require_s3, unique_bucket

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Server:
    name: str
    endpoint: str
    access_key: str
    secret_key: str

    def store(self, bucket: str, endpoint: str | None = None) -> MinioStore:
        return MinioStore(
            endpoint=endpoint or self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            bucket=bucket,
            read_timeout_s=30.0,
        )


def moto() -> Server:
    t = require_s3()
    return Server("moto", t.endpoint, t.access_key, t.secret_key)


def ceph_rgw() -> Server:
    creds = Path(os.environ.get("KASUHARA_RGW_CREDENTIALS", "/var/cache/kasuhara/rgw-credentials"))
    if not creds.exists():
        skip_or_fail(f"Ceph RGW credentials {creds} missing (start it with: scripts/stack up rgw)")
    values = dict(line.split("=", 1) for line in creds.read_text().split() if "=" in line)
    endpoint = values["RGW_ENDPOINT"]
    host, _, port = endpoint.partition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        skip_or_fail(f"Ceph RGW at {endpoint} is not running (start it with: scripts/stack up rgw)")
    return Server("rgw", endpoint, values["RGW_SETUP_ACCESS_KEY"], values["RGW_SETUP_SECRET_KEY"])


@pytest.fixture(params=["moto", "rgw"])
def server(request: pytest.FixtureRequest) -> Server:
    return moto() if request.param == "moto" else ceph_rgw()


@contextlib.contextmanager
def bucket_on(server: Server, *, object_lock: bool = True) -> Iterator[str]:
    name = unique_bucket("kt-lease")
    store = server.store(name)
    store.client.make_bucket(name, object_lock=object_lock)
    store.close()
    try:
        yield name
    finally:
        destroy_bucket(S3Target(server.endpoint, server.access_key, server.secret_key, "us-east-1"), name)


def owner(name: str) -> dict[str, Any]:
    return {"node": name, "host": f"host-{name}", "pid": os.getpid()}


# ---------------------------------------------------------------------------------------- what servers do


class WireTap(CuttableProxy):
    """The proxy of s3_fixture, keeping every byte the client sent (the requests as they went out)."""

    def __init__(self, host: str, port: int) -> None:
        self.sent = bytearray()
        super().__init__(host, port)

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                readable, _, _ = select.select([a, b], [], [], 1.0)
                for s in readable:
                    data = s.recv(64 * 1024)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
                    if s is a:
                        with self._lock:
                            self.sent += data
        except OSError:
            return
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()


async def test_the_create_condition_is_a_real_header_on_the_wire(server: Server) -> None:
    """The lease's create goes out as ``If-None-Match: *``, not as ``x-amz-meta-if-none-match`` (what
    minio's public put_object would make of it)."""
    host, _, port = server.endpoint.partition(":")
    tap = WireTap(host, int(port))
    with bucket_on(server) as bucket:
        store = server.store(bucket, endpoint=tap.endpoint)
        try:
            lease = Lease(store, "jobs/lease/", owner=owner("a"), ttl_s=60, skew_s=5)
            assert await lease.acquire()
        finally:
            store.close()
            tap.close()
    requests = bytes(tap.sent).decode("latin-1").lower()
    [put] = [r for r in requests.split("\r\n\r\n") if r.lstrip().startswith("put /") and "000000000001" in r]
    assert "\r\nif-none-match: *" in put
    assert "x-amz-meta-if-none-match" not in requests


async def test_what_each_server_enforces(server: Server) -> None:
    """The facts the lease is built on (README: *Singletons across nodes*)."""
    with bucket_on(server) as locked, bucket_on(server, object_lock=False) as plain:
        for bucket, versioned in ((locked, True), (plain, False)):
            store = server.store(bucket)
            try:
                await store.put_bytes_if("k", b"1", metadata={}, if_none_match=True)
                try:
                    await store.put_bytes_if("k", b"2", metadata={}, if_none_match=True)
                    enforced = False
                except PreconditionFailed:
                    enforced = True
            finally:
                store.close()
            expected = not (server.name == "rgw" and versioned)
            assert enforced is expected, (
                f"{server.name} versioned={versioned}: If-None-Match enforced={enforced}"
            )


# ---------------------------------------------------------------------------------------- the lease


def contend(server: Server, bucket: str, prefix: str, n: int) -> list[Lease]:
    """``n`` workers, each with its own connection pool and event loop, start at the same moment."""
    barrier = threading.Barrier(n)
    won: list[Lease] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        store = server.store(bucket)
        lease = Lease(store, prefix, owner=owner(f"n{i}"), ttl_s=120, skew_s=10, hostname=f"host-{i}")

        async def go() -> None:
            barrier.wait()
            if await lease.acquire():
                won.append(lease)

        try:
            asyncio.run(go())
        except BaseException as exc:
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return won


async def test_racing_contenders_exactly_one_holder(server: Server) -> None:
    """Eight workers at once, ten rounds: exactly one holds the lease each time (on RGW, where the
    condition is ignored, by the version order)."""
    with bucket_on(server) as bucket:
        for round_ in range(10):
            won = contend(server, bucket, f"race{round_}/", 8)
            assert len(won) == 1, f"round {round_}: {len(won)} holders"
            store = server.store(bucket)
            try:
                judge = Lease(store, f"race{round_}/", owner=owner("judge"), ttl_s=60, skew_s=5)
                assert not await judge.acquire()
                assert judge.holder is not None and judge.holder["node"] == won[0].owner["node"]
            finally:
                store.close()


async def test_expiry_takeover_and_fencing(server: Server) -> None:
    with bucket_on(server) as bucket:
        store_a, store_b = server.store(bucket), server.store(bucket)
        try:
            a = Lease(store_a, "job/", owner=owner("a"), ttl_s=300, skew_s=10, hostname="host-a")
            assert await a.acquire({"todo": [1, 2]}) and a.token == 1
            b = Lease(store_b, "job/", owner=owner("b"), ttl_s=300, skew_s=10, hostname="host-b")
            assert not await b.acquire()
            assert b.holder is not None and b.holder["node"] == "a" and b.holder["epoch"] == 1
            await a.renew()
            assert await a.check() == 1
            # Half an hour later on B's clock, A (paused, never renewed) has expired: B takes epoch 2.
            late = Lease(
                store_b,
                "job/",
                owner=owner("b"),
                ttl_s=300,
                skew_s=10,
                hostname="host-b",
                clock=lambda: datetime.now(UTC) + timedelta(minutes=30),
            )
            assert await late.acquire() and late.token == 2
            assert late.previous is not None and late.previous["payload"] == {"todo": [1, 2]}
            # A resumes: fenced before anything it would do.
            with pytest.raises(LeaseLost, match="taken over"):
                await a.check()
            with pytest.raises(LeaseLost):
                await a.renew()
            await a.release()  # quiet: already lost, writes nothing over epoch 2
            assert await late.check() == 2
            await late.release({"done": True})
            # Released: the next worker takes epoch 3 at once and inherits the payload.
            c = Lease(store_a, "job/", owner=owner("c"), ttl_s=300, skew_s=10, hostname="host-c")
            assert await c.acquire() and c.token == 3
            assert c.previous is not None and c.previous["payload"] == {"done": True}
            assert c.previous["state"] == "free"
            assert await store_a.stat(epoch_key("job/", 3)) is not None
        finally:
            store_a.close()
            store_b.close()


async def test_a_holder_past_its_own_ttl_fences_itself() -> None:
    """A holder that was paused (here: a ttl it cannot renew within) fails its check without asking
    anyone: its monotonic clock says the lease may be another's."""
    server = moto()
    with bucket_on(server) as bucket:
        store = server.store(bucket)
        try:
            lease = Lease(store, "job/", owner=owner("a"), ttl_s=0.2, skew_s=0.1)
            assert await lease.acquire()
            await asyncio.sleep(0.2)
            with pytest.raises(LeaseLost, match="not renewed"):
                await lease.check()
        finally:
            store.close()


async def test_unversioned_bucket_needs_an_enforced_condition(server: Server) -> None:
    """Without versions there is no order to decide a race: the lease works where If-None-Match is
    enforced (both servers, unversioned) and the proof of it is a refused second create."""
    with bucket_on(server, object_lock=False) as bucket:
        store = server.store(bucket)
        try:
            lease = Lease(store, "job/", owner=owner("a"), ttl_s=60, skew_s=5)
            assert await lease.acquire()
            won = contend(server, bucket, "race/", 6)
            assert len(won) == 1
        finally:
            store.close()


async def test_a_server_ignoring_the_condition_without_versions_is_refused() -> None:
    """What the lease does on a server that could let two workers both win: it refuses to run."""

    class Ignores(MemoryStore):
        async def put_bytes_if(self, key: str, data: bytes, **kw: Any) -> Any:
            self.objects.pop(key, None)  # unversioned: the PUT replaces, the condition is not looked at
            result = await self.put_bytes(key, data, metadata=kw["metadata"])
            return type(result)(result.key, result.etag, None)

    with pytest.raises(LeaseUnsupported):
        await Lease(Ignores(), "job/", owner=owner("a")).acquire()


# ---------------------------------------------------------------------------------------- retention


async def test_a_paused_sweep_that_lost_its_lease_deletes_nothing(server: Server) -> None:
    """Sweep A takes the lease and walks the bucket; it is paused (its event loop blocked) long enough
    for another node to see the lease expired and take it over. When A resumes and reaches its first
    delete batch, the fencing check refuses: nothing deleted, status lost_lease."""
    tokyo = ZoneInfo("Asia/Tokyo")
    old = cutoff_for(datetime.now(UTC), 30, tokyo) - timedelta(days=3)
    with bucket_on(server) as bucket:
        store = server.store(bucket)
        try:
            ids = [(f"1700000000.{i}", old + timedelta(minutes=i)) for i in range(12)]
            await seed_many(store, ids)
            before = await live_keys(store)
            events = MemoryEvents()
            takeovers: list[int | None] = []

            def other_node_takes_over(_days: int) -> None:
                # Runs inside A's event loop: A is frozen until it returns, like a SIGSTOPped process.
                def b() -> None:
                    s = server.store(bucket)
                    lease = Lease(
                        s,
                        LEASE_PREFIX,
                        owner=owner("b"),
                        ttl_s=600,
                        skew_s=30,
                        hostname="host-b",
                        clock=lambda: datetime.now(UTC) + timedelta(hours=1),
                    )
                    try:
                        ok = asyncio.run(lease.acquire())
                        takeovers.append(lease.token if ok else None)
                    finally:
                        s.close()

                t = threading.Thread(target=b)
                t.start()
                t.join()

            a = RetentionSweep(
                store,
                events,
                AuditLog(store, events, by="node-a"),
                days=30,
                tz=tokyo,
                batch_size=5,
                on_days=other_node_takes_over,
            )
            with pytest.raises(RetentionLeaseLost, match="taken over"):
                await a.run()
            assert takeovers == [2]
            assert a.report.status == "lost_lease" and a.report.purged == []
            assert await live_keys(store) == before, "the fenced sweep deleted something"
            assert [o async for o in store.list_prefix("retention/runs/")] == [], "not even a journal"
        finally:
            store.close()


async def test_a_sweep_stopped_with_sigstop_past_its_lease_never_deletes_after_it_resumes() -> None:
    """Real processes: sweep A (``kasuhara retention run``, a 3 s lease, 30 days) is stopped with SIGSTOP
    while it walks the bucket, before its first delete batch. Sweep B on another "node" (60 days) finds
    the lease expired, takes it over and purges what is past 60 days. A is resumed: its fencing check
    refuses, and nothing past 30 days (A's own candidates, B's keepers) is deleted; one audit record for
    A's run, written by B from A's (empty) journal."""
    server = moto()
    tokyo = ZoneInfo("Asia/Tokyo")
    now = datetime.now(UTC)
    with bucket_on(server) as bucket:
        store = server.store(bucket)
        try:
            b_only = [
                (f"1700000000.{i}", cutoff_for(now, 60, tokyo) - timedelta(days=2, minutes=i))
                for i in range(20)
            ]
            a_only = [
                (f"1710000000.{i}", cutoff_for(now, 30, tokyo) - timedelta(days=2, minutes=i))
                for i in range(300)
            ]
            await seed_many(store, b_only + a_only)
            target = S3Target(server.endpoint, server.access_key, server.secret_key, "us-east-1")
            env = cli_env(target, bucket, KASUHARA_RETENTION__LEASE_TTL_S="3")
            a = subprocess.Popen(
                cli_command("retention", "run", "--json", "--batch-size", "1000"),
                env={**env, "KASUHARA_RETENTION__DAYS": "30"},
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                for _ in range(3000):
                    if [o async for o in store.list_prefix(LEASE_PREFIX)] or a.poll() is not None:
                        break
                    await asyncio.sleep(0.005)
                a.send_signal(signal.SIGSTOP)
                assert a.poll() is None, a.communicate()
                assert [o async for o in store.list_prefix("retention/runs/")] == [], (
                    "A deleted before the stop"
                )
                await asyncio.sleep(3.5)  # A's lease (3 s) runs out while it is stopped
                b = run_cli({**env, "KASUHARA_RETENTION__DAYS": "60"}, "retention", "run", "--json")
                assert b.returncode == 0, b.stderr
                report_b = json.loads(b.stdout)
                assert sorted(p["call_id"] for p in report_b["purged"]) == sorted(c for c, _ in b_only)
                assert [r["run_id"] for r in report_b["recovered_runs"]] != []
                before = await live_keys(store)
            finally:
                a.send_signal(signal.SIGCONT)
            out, err = a.communicate(timeout=120)
            assert a.returncode == 1, out + err
            assert "stopped:" in err and "lease" in err
            assert await live_keys(store) == before, "A deleted after it had lost the lease"
            assert len(before) == 2 * len(a_only)
            journals = [o.key async for o in store.list_prefix("retention/runs/")]
            assert [k for k in journals if report_b["run_id"] not in k] == [], "A journaled a batch"
            purges = [
                doc
                async for o in store.list_prefix("audit/")
                if (doc := json.loads(await store.get_bytes(o.key) or b"{}")).get("action") == "purge"
            ]
            assert sorted(d["result"] for d in purges) == ["completed", "interrupted"]
        finally:
            store.close()
