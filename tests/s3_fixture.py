"""Helpers for tests against a real S3-compatible server (moto at 127.0.0.1:9000 or the stack's S3).

Where the server is: ``KASUHARA_TEST_S3_ENDPOINT`` (host:port), else the stack config's ``[storage]``
(``KASUHARA_TEST_CONFIG``, default ``/var/cache/kasuhara/kasuhara.toml``), else ``127.0.0.1:9000``.
A server that is not reachable skips the test locally and fails it when ``CI=true``.

Every test gets its own bucket (object lock on); it is emptied (holds released) and removed afterwards,
so tests never see each other and the in-memory moto does not grow.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kasuhara_ari.config import ConfigError, load
from kasuhara_ari.storage import MinioStore

from conftest import STACK_CONFIG, skip_or_fail


@dataclass(frozen=True)
class S3Target:
    endpoint: str
    access_key: str
    secret_key: str
    region: str


def s3_target() -> S3Target:
    explicit = os.environ.get("KASUHARA_TEST_S3_ENDPOINT")
    if explicit:
        return S3Target(
            explicit,
            os.environ.get("KASUHARA_TEST_S3_ACCESS_KEY", "testing"),
            os.environ.get("KASUHARA_TEST_S3_SECRET_KEY", "testing"),
            "us-east-1",
        )
    if STACK_CONFIG.exists():
        try:
            st = load(STACK_CONFIG, env={}).storage
        except ConfigError:
            pass
        else:
            return S3Target(st.endpoint, st.access_key or "testing", st.secret_key or "testing", st.region)
    return S3Target("127.0.0.1:9000", "testing", "testing", "us-east-1")


def require_s3() -> S3Target:
    target = s3_target()
    host, _, port = target.endpoint.partition(":")
    try:
        with socket.create_connection((host, int(port or 80)), timeout=1.0):
            pass
    except OSError:
        skip_or_fail(f"S3 server at {target.endpoint} is not reachable (scripts/stack up s3, or moto.server)")
    return target


def unique_bucket(prefix: str = "kt") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def open_store(target: S3Target, bucket: str, *, endpoint: str | None = None, **options: Any) -> MinioStore:
    return MinioStore(
        endpoint=endpoint or target.endpoint,
        access_key=target.access_key,
        secret_key=target.secret_key,
        bucket=bucket,
        region=target.region,
        **options,
    )


def create_bucket(store: MinioStore) -> None:
    store.client.make_bucket(store.bucket, object_lock=True)


@contextlib.contextmanager
def fresh_bucket(prefix: str) -> Iterator[tuple[S3Target, str]]:
    """A fresh object-lock bucket on the stack's S3 server for one test, emptied and removed after it."""
    target = require_s3()
    bucket = unique_bucket(prefix)
    store = open_store(target, bucket)
    create_bucket(store)
    store.close()
    try:
        yield target, bucket
    finally:
        destroy_bucket(target, bucket)


def destroy_bucket(target: S3Target, bucket: str) -> None:
    """Release every legal hold, delete every version, remove the bucket (best effort)."""
    from minio.deleteobjects import DeleteObject

    store = open_store(target, bucket, read_timeout_s=30.0)
    client = store.client
    try:
        versions = list(client.list_objects(bucket, recursive=True, include_version=True))
        for obj in versions:
            if not obj.is_delete_marker:
                with contextlib.suppress(Exception):
                    client.disable_object_legal_hold(bucket, obj.object_name, version_id=obj.version_id)
        list(client.remove_objects(bucket, [DeleteObject(o.object_name, o.version_id) for o in versions]))
        client.remove_bucket(bucket)
    except Exception:  # cleanup must not hide the test's own result
        pass
    finally:
        store.close()


def all_versions(store: MinioStore, prefix: str = "") -> list[Any]:
    return list(store.client.list_objects(store.bucket, prefix=prefix, recursive=True, include_version=True))


class CuttableProxy:
    """A TCP proxy in front of the S3 server whose link can be cut, as if the server went away.

    ``cut()`` closes the listening socket (new connections are refused) and resets every open connection
    (requests in flight fail); ``blackhole()`` accepts connections but never answers (timeouts);
    ``restore()`` forwards again on the same port. Moto keeps its data in memory, so stopping the real
    server would lose it: cutting the link is the faithful way to make S3 unreachable.
    """

    def __init__(self, target_host: str, target_port: int, *, rate_bps: float | None = None) -> None:
        self.target = (target_host, target_port)
        #: Upload bandwidth towards the server (bytes/s), to make uploads slow enough to interrupt.
        self.rate_bps = rate_bps
        #: Bytes forwarded from clients to the server so far.
        self.forwarded = 0
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._mode = "up"
        self._threads: list[threading.Thread] = []
        self.restore()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _listen(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self._listener = sock
        t = threading.Thread(target=self._accept_loop, args=(sock,), daemon=True)
        t.start()
        self._threads.append(t)

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                mode = self._mode
                self._conns.append(client)
            if mode == "blackhole":
                continue  # held open, never answered
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.append(upstream)
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        socks = [a, b]
        try:
            while True:
                readable, _, _ = select.select(socks, [], [], 1.0)
                for s in readable:
                    data = s.recv(64 * 1024)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
                    if s is a:
                        with self._lock:
                            self.forwarded += len(data)
                        if self.rate_bps:
                            time.sleep(len(data) / self.rate_bps)
        except OSError:
            return
        finally:
            for s in socks:
                with contextlib.suppress(OSError):
                    s.close()

    def _drop_all(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def cut(self) -> None:
        with self._lock:
            self._mode = "down"
            listener, self._listener = self._listener, None
        if listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would leave it listening.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        self._drop_all()

    def blackhole(self) -> None:
        self.cut()
        with self._lock:
            self._mode = "blackhole"
        self._listen()

    def restore(self) -> None:
        if self._listener is not None:
            self.cut()
        with self._lock:
            self._mode = "up"
        self._listen()

    def close(self) -> None:
        self.cut()


def fetch(store: MinioStore, key: str) -> bytes:
    """The latest version of one object, whole (small test objects only)."""
    resp = store.client.get_object(store.bucket, key)
    try:
        return bytes(resp.read())
    finally:
        resp.close()
        resp.release_conn()
