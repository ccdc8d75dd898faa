"""A lease on the shared bucket for work that must run once across hosts, with a fencing token.

**Epochs.** A lease under ``prefix`` is a series of objects ``<prefix><epoch>.json`` (epoch zero-padded to
12 digits, so keys sort by epoch). The epoch is the fencing token: it only ever grows. To take the lease
a worker creates the next epoch's object; to renew it, the holder writes a new version of its own epoch's
object; to release it, the holder writes ``state: free`` there. A takeover (the holder's ``expires_at``
passed, or its process on this host is gone) is a new epoch, so it never writes over the old holder.

**Who won an epoch, on any S3 server.** The create is sent with ``If-None-Match: *`` (as a real header:
:meth:`~kasuhara_ari.storage.MinioStore.put_bytes_if` sends it through minio's low-level ``_put_object``,
because the public ``put_object`` would turn it into ``x-amz-meta-if-none-match`` user metadata; checked
on the wire by ``tests/test_lease_s3.py``). Where the server enforces it (AWS S3, MinIO, moto 5.2, Ceph
RGW on an unversioned bucket) the losers get ``412`` at once. Ceph RGW 16 *ignores* it on a versioned
(object-lock) bucket, and moto checks it before writing rather than atomically; so on a versioned bucket
the winner is decided by the server's own order of the key's versions: the **oldest version** names the
winner, every contender lists the versions after its write and they all agree. On an unversioned bucket
there is no such order: the condition must be enforced, which the lease checks by repeating the create
(it must fail); a server that ignores it there gets :class:`LeaseUnsupported` — the work refuses to run
rather than risk running twice.

**Fencing.** :meth:`Lease.check` is called right before each irreversible step (retention: each delete
batch). It fails (:class:`LeaseLost`) when the holder's own monotonic clock says its lease may have
expired (``ttl_s - skew_s`` since the last renewal was sent: a process paused by SIGSTOP or a slow disk
sees this first, without asking the server), when a newer epoch exists, or when its epoch's oldest
version is not its own. S3 cannot refuse a delete by token, so the window left is the time between a
successful check and the delete request itself; ``skew_s`` (default 30 s) is the margin for that and for
clock differences between hosts (keep them NTP-synchronised).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from .storage import ObjectInfo, ObjectStore, PreconditionFailed, StorageError

log = logging.getLogger(__name__)

LEASE_SCHEMA = "kasuhara.lease/1"
_EPOCH_RE = re.compile(r"(?P<epoch>[0-9]{12})\.json")


class LeaseLost(Exception):
    """The lease is no longer this worker's (taken over, or possibly expired): stop before acting."""


class LeaseUnsupported(StorageError):
    """The server cannot give a safe lease here (unversioned bucket that ignores ``If-None-Match``)."""


def epoch_key(prefix: str, epoch: int) -> str:
    if not 1 <= epoch < 10**12:
        raise ValueError(f"lease epoch out of range: {epoch}")
    return f"{prefix}{epoch:012d}.json"


def epoch_of(prefix: str, key: str) -> int | None:
    """The epoch of a lease key under ``prefix``; ``None`` for anything else (left alone)."""
    if not key.startswith(prefix):
        return None
    m = _EPOCH_RE.fullmatch(key[len(prefix) :])
    return int(m["epoch"]) if m else None


def pid_alive(pid: int) -> bool:
    """Whether a process of this host still runs (0 or less, or not ours to signal: assume it does)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _versioned(info: ObjectInfo | None) -> bool:
    return info is not None and info.version_id not in (None, "", "null")


@dataclass(frozen=True)
class EpochState:
    """What one epoch's objects say: who won it and the winner's latest word."""

    epoch: int
    claim: str
    doc: Mapping[str, Any]

    @property
    def expires_at(self) -> datetime | None:
        try:
            value = datetime.fromisoformat(str(self.doc["expires_at"]))
        except (KeyError, ValueError):
            return None
        return value if value.tzinfo is not None else None


class Lease:
    """One named lease (see module docstring). ``owner`` is shown to those who find it held (node,
    host, pid, run id …); ``payload`` travels with it to the next holder (e.g. unfinished work)."""

    def __init__(
        self,
        store: ObjectStore,
        prefix: str,
        *,
        owner: Mapping[str, Any],
        ttl_s: float = 600.0,
        skew_s: float = 30.0,
        hostname: str | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if not prefix.endswith("/"):
            raise ValueError(f"lease prefix must end with '/': {prefix!r}")
        self.store = store
        self.prefix = prefix
        self.owner = dict(owner)
        self.ttl_s = ttl_s
        self.skew_s = skew_s
        self.hostname = hostname or socket.gethostname()
        self._now = clock or (lambda: datetime.now(UTC))
        #: This acquisition's identity in the lease objects (unique per acquire).
        self.claim = ""
        #: The fencing token while held (the epoch), else ``None``.
        self.token: int | None = None
        #: Who holds it when :meth:`acquire` returned ``False``.
        self.holder: dict[str, Any] | None = None
        #: The previous epoch's last document when this worker took over (``None``: the first epoch).
        self.previous: Mapping[str, Any] | None = None
        self._payload: Mapping[str, Any] = {}
        self._sent_mono = 0.0

    # -- documents

    def _doc(self, epoch: int, state: str, payload: Mapping[str, Any]) -> bytes:
        now = self._now()
        doc = {
            "schema": LEASE_SCHEMA,
            "epoch": epoch,
            "claim": self.claim,
            "state": state,
            **self.owner,
            "host": self.owner.get("host", self.hostname),
            "pid": self.owner.get("pid", os.getpid()),
            "renewed_at": now.isoformat(timespec="milliseconds"),
            "expires_at": (now + timedelta(seconds=self.ttl_s)).isoformat(timespec="milliseconds"),
            "payload": dict(payload),
        }
        return json.dumps(doc, indent=1, ensure_ascii=False).encode()

    async def _read(self, key: str, version_id: str | None) -> dict[str, Any]:
        data = await self.store.get_bytes(key, max_bytes=1024 * 1024, version_id=version_id)
        try:
            doc = json.loads(data or b"")
        except ValueError:
            return {}
        return doc if isinstance(doc, dict) else {}

    async def _versions(self, key: str) -> list[ObjectInfo]:
        """The key's versions, newest first (as S3 lists them), delete markers left out."""
        return [
            o
            async for o in self.store.list_prefix(key, versions=True)
            if o.key == key and not o.is_delete_marker
        ]

    async def current_epoch(self) -> int | None:
        found = [e async for o in self.store.list_prefix(self.prefix) if (e := epoch_of(self.prefix, o.key))]
        return max(found) if found else None

    async def read_epoch(self, epoch: int) -> EpochState | None:
        """Who won ``epoch`` (its oldest version) and that winner's latest document."""
        key = epoch_key(self.prefix, epoch)
        versions = await self._versions(key)
        if not versions:
            return None
        first = await self._read(key, versions[-1].version_id if _versioned(versions[-1]) else None)
        winner = str(first.get("claim", ""))
        for v in versions[:-1]:
            doc = await self._read(key, v.version_id)
            if doc.get("claim") == winner:
                return EpochState(epoch, winner, doc)
        return EpochState(epoch, winner, first)

    def stale(self, state: EpochState) -> bool:
        """Whether a lease may be taken over: free, expired, unreadable, or its process on this host gone."""
        doc = state.doc
        if doc.get("state") != "held" or not state.claim:
            return True
        expires = state.expires_at
        if expires is None or expires <= self._now():
            return True
        try:
            pid = int(doc.get("pid", 0) or 0)
        except (TypeError, ValueError):
            pid = 0
        return doc.get("host") == self.hostname and not pid_alive(pid)

    # -- the lease

    async def acquire(self, payload: Mapping[str, Any] | None = None) -> bool:
        """Take the lease; ``False`` (with :attr:`holder` set) if a live holder has it or a rival won.

        Raises :class:`LeaseUnsupported` where the server could let two workers both win."""
        self.holder = None
        for _ in range(5):
            current = await self.current_epoch()
            previous: Mapping[str, Any] | None = None
            if current is not None:
                state = await self.read_epoch(current)
                if state is not None and not self.stale(state):
                    self.holder = self._public(state)
                    return False
                previous = state.doc if state is not None else {}
            epoch = (current or 0) + 1
            self.claim = f"{self.hostname}-{os.getpid()}-{secrets.token_hex(8)}"
            body = self._doc(epoch, "held", payload or {})
            key = epoch_key(self.prefix, epoch)
            sent = time.monotonic()
            try:
                result = await self.store.put_bytes_if(key, body, metadata={}, if_none_match=True)
            except PreconditionFailed:
                continue  # a rival created this epoch first: look again (it will be held)
            if result.version_id in (None, "", "null"):
                await self._require_enforced_create(key, body)
            else:
                versions = await self._versions(key)
                if not versions or versions[-1].version_id != result.version_id:
                    # The server ignored If-None-Match (Ceph RGW, versioned) and a rival's version is older.
                    state = await self.read_epoch(epoch)
                    self.holder = self._public(state) if state else {"note": "lease contended"}
                    log.info("lease event=lost_race prefix=%s epoch=%d", self.prefix, epoch)
                    return False
            self.token, self.previous, self._payload, self._sent_mono = epoch, previous, payload or {}, sent
            if previous is not None and previous.get("state") == "held":
                log.warning(
                    "lease event=taken_over prefix=%s epoch=%d from_host=%s from_pid=%s",
                    self.prefix,
                    epoch,
                    previous.get("host"),
                    previous.get("pid"),
                )
            return True
        self.holder = {"note": "lease contended"}
        return False

    async def _require_enforced_create(self, key: str, body: bytes) -> None:
        """On an unversioned bucket only If-None-Match tells the winner: prove the server enforces it."""
        try:
            await self.store.put_bytes_if(key, body, metadata={}, if_none_match=True)
        except PreconditionFailed:
            return
        raise LeaseUnsupported(
            f"lease {self.prefix}: the bucket is not versioned and the server ignores If-None-Match: "
            "two workers could both hold the lease (use a versioned or object-lock bucket)",
            code="LeaseUnsupported",
        )

    async def check(self) -> int:
        """The fencing check before an irreversible step: the token if still held, else :class:`LeaseLost`."""
        if self.token is None:
            raise LeaseLost(f"lease {self.prefix}: not held")
        age = time.monotonic() - self._sent_mono
        if age > self.ttl_s - self.skew_s:
            raise LeaseLost(
                f"lease {self.prefix} epoch {self.token}: not renewed for {age:.0f}s (ttl {self.ttl_s:.0f}s, "
                f"margin {self.skew_s:.0f}s): it may have been taken over"
            )
        current = await self.current_epoch()
        if current != self.token:
            raise LeaseLost(f"lease {self.prefix} epoch {self.token} was taken over (now epoch {current})")
        versions = await self._versions(epoch_key(self.prefix, self.token))
        if versions and _versioned(versions[-1]):
            first = await self._read(versions[-1].key, versions[-1].version_id)
            if first.get("claim") != self.claim:
                raise LeaseLost(f"lease {self.prefix} epoch {self.token} was taken over (a rival won it)")
        return self.token

    async def renew(self, payload: Mapping[str, Any] | None = None) -> None:
        """Extend the lease (after a fencing check); :class:`LeaseLost` if it is no longer ours."""
        token = await self.check()
        if payload is not None:
            self._payload = payload
        sent = time.monotonic()
        await self.store.put_bytes(
            epoch_key(self.prefix, token), self._doc(token, "held", self._payload), metadata={}
        )
        self._sent_mono = sent

    async def release(self, payload: Mapping[str, Any] | None = None) -> None:
        """Mark the lease free (handing ``payload`` to the next holder); quiet if it was already lost."""
        if self.token is None:
            return
        try:
            token = await self.check()
        except LeaseLost as exc:
            log.warning("lease event=lost_before_release prefix=%s error=%s", self.prefix, exc)
            self.token = None
            return
        await self.store.put_bytes(
            epoch_key(self.prefix, token),
            self._doc(token, "free", payload if payload is not None else self._payload),
            metadata={},
        )
        self.token = None

    @staticmethod
    def _public(state: EpochState) -> dict[str, Any]:
        """What a refused worker may show of the holder (no payload)."""
        shown = {k: v for k, v in state.doc.items() if k not in {"payload", "schema", "claim"}}
        shown["epoch"] = state.epoch
        return shown
