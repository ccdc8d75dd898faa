"""Recordings in S3: the key layout, the narrow object-store interface, evidence holds, the deletion guard.

Layout (DESIGN.md): ``recordings/YYYY/MM/DD/<call_id>.wav`` and ``.json`` (date = call start in UTC),
``holds/<call_id>.json`` (why, who, when) beside an S3 legal hold on both recording objects. Keys are built
by one pure function that refuses anything but a safe call id: nothing a caller typed reaches a key.

The bucket has object lock (and therefore versioning) enabled, which decides two things here:

- A re-upload of the same key would make a second *version*, so every writer checks what is already there
  first (:class:`~kasuhara_ari.uploader.Uploader` is idempotent by key, size and sha256).
- A ``DELETE`` without a version id only adds a delete marker (allowed even on held objects; the data
  stays). Purging means deleting each *version*, which the server refuses for a version under legal hold.
  Every deletion goes through :class:`DeletionGuard`, which also refuses anything with a hold record.

:class:`MinioStore` runs the synchronous ``minio`` client in its own small thread pool (never blocking
the event loop, never starving ``asyncio.to_thread`` users) over a bounded urllib3 pool with explicit
connect/read timeouts. Its ``region`` is set so no bucket-location request is ever made. :class:`MemoryStore`
is a faithful in-memory fake (versions, delete markers, legal holds) for pure-logic tests; both pass the
same contract tests.

SSE-C (``storage.sse_c_key``): a base64 string of exactly 32 random bytes (``openssl rand -base64 32``).
Every object is then encrypted at rest by the server with that key, which the server never stores: lose
the key and the recordings are unreadable; every reader (retention needs none, admin download/export do)
must have it. S3 servers accept SSE-C only over TLS, so it requires ``storage.secure = true``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import dataclasses
import email.utils
import hashlib
import io
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol, TypeVar

from . import metrics
from .config import StorageConfig
from .safe import REASON_MAX_CHARS, clean_caller_text, safe_call_id

log = logging.getLogger(__name__)

RECORDINGS_PREFIX = "recordings/"
HOLDS_PREFIX = "holds/"
AUDIT_PREFIX = "audit/"
#: The retention worker's lease and run journals (``retention/lease.json``, ``retention/runs/<run>/…``).
RETENTION_PREFIX = "retention/"
#: The admin-managed caller list (``callers/list.json``): admins write it, the call service reads it.
CALLERS_PREFIX = "callers/"
#: The console's accounts (``users/accounts.json``, kasuhara_ari.accounts): admins write, the console reads.
USERS_PREFIX = "users/"
#: Training clips (kasuhara_ari.training): admins write and read them; retention never walks them.
TRAINING_PREFIX = "training/"
#: Which call each training clip was cut from: admin only (no other role's policy reaches it).
TRAINING_SOURCES_PREFIX = "training-sources/"
HOLD_SCHEMA = "kasuhara.hold/1"
#: User metadata on every object we write (sent as ``x-amz-meta-<name>``; ASCII only, never caller text).
META_SHA256 = "sha256"
META_CALL_ID = "call-id"
#: On a metadata object: the sha256 of the audio it describes ("none" without audio). What makes a
#: re-run of an upload recognise that it already stored this recording.
META_AUDIO_SHA256 = "audio-sha256"
NO_AUDIO = "none"
CHUNK = 1024 * 1024

_RECORDING_KEY_RE = re.compile(
    r"recordings/(?P<y>[0-9]{4})/(?P<m>[0-9]{2})/(?P<d>[0-9]{2})/(?P<call_id>[^/]+)\.(?P<kind>wav|json)"
)

T = TypeVar("T")


# --------------------------------------------------------------------------------------------- errors


class StorageError(Exception):
    """An S3 operation failed; ``code`` is the S3 error code when the server gave one."""

    def __init__(self, message: str, *, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class StorageUnavailable(StorageError):
    """The server could not be reached or answered with a server error: worth retrying later."""


class StorageRefused(StorageError):
    """The server refused (permission, object lock): retrying the same request will not help."""


class ContentChanged(StorageError):
    """The file read during upload does not match the size or sha256 computed beforehand."""


class PreconditionFailed(StorageError):
    """A conditional write (``If-Match`` / ``If-None-Match``) lost: someone else wrote first."""


class StorageSetupError(ValueError):
    """The storage configuration cannot work (bad SSE-C key, SSE-C without TLS); names the key."""


# --------------------------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class RecordingKeys:
    """Where one call's objects live in the bucket."""

    call_id: str
    day: date
    audio: str
    metadata: str
    hold: str


def parse_started_at(value: object) -> datetime:
    """``started_at`` from metadata as an aware datetime; naive or malformed values raise ``ValueError``.

    The key's date is derived from it, so a guess (e.g. the local timezone for a naive value) is refused.
    """
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str) and len(value) <= 64:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"started_at is not an ISO 8601 timestamp: {value[:64]!r}") from None
    else:
        raise ValueError(f"started_at is not an ISO 8601 timestamp: {str(value)[:64]!r}")
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise ValueError(f"started_at has no UTC offset: {str(value)[:64]!r}")
    try:
        # 0001-01-01T00:00:00+14:00 is a valid ISO string but no UTC instant: every later comparison
        # or key derivation would raise OverflowError, far from here. Refuse it as the bad input it is.
        parsed.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"started_at is outside the representable range: {str(value)[:64]!r}") from None
    return parsed


def day_prefix(day: date) -> str:
    """``recordings/YYYY/MM/DD/``: the prefix of one UTC day's recordings (retention walks these)."""
    return f"{RECORDINGS_PREFIX}{day.year:04d}/{day.month:02d}/{day.day:02d}/"


def hold_key(call_id: str) -> str:
    return f"{HOLDS_PREFIX}{safe_call_id(call_id)}.json"


def recording_keys(call_id: str, started_at: datetime | str) -> RecordingKeys:
    """The keys of a call's audio, metadata and hold record. Pure; refuses unsafe ids and naive times."""
    cid = safe_call_id(call_id)
    day = parse_started_at(started_at).astimezone(UTC).date()
    prefix = day_prefix(day)
    return RecordingKeys(
        call_id=cid, day=day, audio=f"{prefix}{cid}.wav", metadata=f"{prefix}{cid}.json", hold=hold_key(cid)
    )


@dataclass(frozen=True)
class ParsedKey:
    call_id: str
    day: date
    kind: Literal["wav", "json"]


def parse_recording_key(key: str) -> ParsedKey | None:
    """The call id, day and kind of a ``recordings/…`` key; ``None`` for anything else."""
    m = _RECORDING_KEY_RE.fullmatch(key)
    if m is None:
        return None
    try:
        cid = safe_call_id(m["call_id"])
        day = date(int(m["y"]), int(m["m"]), int(m["d"]))
    except ValueError:
        return None
    kind: Literal["wav", "json"] = "wav" if m["kind"] == "wav" else "json"
    return ParsedKey(cid, day, kind)


# --------------------------------------------------------------------------------------------- store


@dataclass(frozen=True)
class ObjectInfo:
    """One object (or version, or delete marker) as the store reports it."""

    key: str
    size: int
    etag: str = ""
    version_id: str | None = None
    is_latest: bool = True
    is_delete_marker: bool = False
    last_modified: datetime | None = None
    #: User metadata, names lower-case without the ``x-amz-meta-`` prefix (from ``stat`` only).
    metadata: Mapping[str, str] = field(default_factory=dict)
    #: Legal hold as reported with ``stat`` (``None`` when the server did not say).
    legal_hold: bool | None = None


@dataclass(frozen=True)
class PutResult:
    key: str
    etag: str
    version_id: str | None
    #: The server's ETags proved it stored exactly the bytes sent (the MD5 of a single PUT; each part's
    #: MD5 and the multipart ETag ``md5(part digests)-N``), so nothing needs to be read back: the call
    #: service may not read audio (HEAD needs ``s3:GetObject``). Never set with SSE-C (ETags are not MD5s).
    verified: bool = False


@dataclass(frozen=True)
class ObjectRef:
    """An object version to delete. ``version_id=None`` on a versioned bucket only adds a delete marker."""

    key: str
    version_id: str | None = None


@dataclass(frozen=True)
class DeleteFailure:
    ref: ObjectRef
    code: str
    message: str = ""


class ObjectStore(Protocol):
    """The few S3 operations kasuhara needs. Every method may raise :class:`StorageError` subclasses."""

    bucket: str

    async def put_file(
        self,
        key: str,
        path: Path,
        *,
        length: int,
        sha256: str,
        metadata: Mapping[str, str],
        content_type: str = "application/octet-stream",
        if_none_match: bool = False,
        legal_hold: bool = False,
    ) -> PutResult:
        """Stream ``length`` bytes of ``path`` into ``key``. The bytes read must hash to ``sha256``, else
        :class:`ContentChanged` is raised and no object becomes visible. ``if_none_match``: a conditional
        create (``If-None-Match: *``): :class:`PreconditionFailed` if ``key`` already exists, so an
        existing recording never gets a second version. ``legal_hold``: the new version is created under
        an S3 legal hold (``x-amz-object-lock-legal-hold: ON`` on the PUT): the only way the service key
        may hold on Ceph RGW, which refuses it PutObjectLegalHold."""
        ...

    async def put_bytes(
        self, key: str, data: bytes, *, metadata: Mapping[str, str], content_type: str = "application/json"
    ) -> PutResult: ...

    async def stat(self, key: str, *, version_id: str | None = None) -> ObjectInfo | None:
        """The latest version's (or ``version_id``'s) size, user metadata and legal hold; ``None`` if
        there is none."""
        ...

    def put_etag_is_md5(self, length: int) -> bool:
        """Whether a put of ``length`` bytes answers with the MD5 of the content as its ETag (one
        request, no SSE-C): then the server's ETag proves what it stored, without reading it back."""
        ...

    def content_etags(self, path: Path, length: int) -> frozenset[str]:
        """Blocking (reads ``path``): every ETag under which this store holds exactly these ``length``
        bytes as kasuhara writes them (one PUT, or multipart at the store's part size). Empty when ETags
        say nothing about content (SSE-C). What identifies an object a key may list but not read."""
        ...

    async def get_bytes(
        self, key: str, *, max_bytes: int = 16 * 1024 * 1024, version_id: str | None = None
    ) -> bytes | None:
        """A small object's content (metadata, hold records); ``None`` if missing. Evidence readers pass
        the pinned ``version_id``: the latest version may be a later, unheld replacement."""
        ...

    async def get_to_file(self, key: str, path: Path, *, version_id: str | None = None) -> ObjectInfo:
        """Stream an object (the latest version, or ``version_id``) into ``path`` (through a temporary
        file beside it)."""
        ...

    def list_prefix(self, prefix: str, *, versions: bool = False) -> AsyncIterator[ObjectInfo]:
        """Everything under ``prefix`` (recursively), in key order; with ``versions`` every version and
        delete marker."""
        ...

    async def list_dirs(self, prefix: str, *, versions: bool = False) -> list[str]:
        """The "directories" one level below ``prefix`` (S3 common prefixes, each ending in ``/``), sorted.
        With ``versions`` a directory holding only old versions or delete markers is included too."""
        ...

    async def put_bytes_if(
        self,
        key: str,
        data: bytes,
        *,
        metadata: Mapping[str, str],
        if_match: str | None = None,
        if_none_match: bool = False,
        content_type: str = "application/json",
        legal_hold: bool = False,
    ) -> PutResult:
        """A conditional write: only if ``key`` does not exist (``if_none_match``) or its latest version
        still has the etag ``if_match``; otherwise :class:`PreconditionFailed`."""
        ...

    async def delete_versions(
        self, refs: Sequence[ObjectRef], *, bypass_governance: bool = False
    ) -> list[DeleteFailure]:
        """Raw batch delete. Call it only through :class:`DeletionGuard` (or for a hold record's release).
        ``bypass_governance`` sends ``x-amz-bypass-governance-retention: true`` (admin early delete only)."""
        ...

    async def set_legal_hold(self, key: str, on: bool, *, version_id: str | None = None) -> None: ...

    async def legal_hold(self, key: str, *, version_id: str | None = None) -> bool: ...


def user_metadata(headers: Mapping[str, str]) -> dict[str, str]:
    """``x-amz-meta-*`` headers as a plain dict with lower-case names without the prefix."""
    out: dict[str, str] = {}
    for name, value in headers.items():
        low = name.lower()
        if low.startswith("x-amz-meta-"):
            out[low[len("x-amz-meta-") :]] = value
    return out


#: Answers to GetObjectLegalHold that mean "no legal hold was ever set on this version".
NO_LEGAL_HOLD_CODES = frozenset({"ObjectLockConfigurationNotFoundError", "NoSuchObjectLockConfiguration"})

#: Sent on a creating PUT, this places the S3 legal hold with the object (checked against ``s3:PutObject``
#: only on Ceph RGW). Never given to ``put_object`` as metadata without its ``x-amz-`` prefix: minio would
#: send it as ``X-Amz-Meta-*`` (pinned on the wire by ``tests/test_storage.py``).
LEGAL_HOLD_HEADER = "x-amz-object-lock-legal-hold"

#: A file to be created under a legal hold is sent as ONE PUT up to this size (held in memory once):
#: Ceph RGW 16 and moto ignore the legal-hold header on CreateMultipartUpload, and the call service may
#: not place the hold afterwards. Only a call over ~2.3 hours (8 kHz 16-bit mono) is larger: then
#: multipart, and an admin's ``recordings hold`` places the hold the server dropped (``hold_incomplete``).
HELD_SINGLE_PUT_MAX = 128 * 1024 * 1024


def multipart_etag(part_md5s: Sequence[bytes]) -> str:
    """The ETag S3 gives a multipart object: MD5 of the concatenated part MD5 digests, ``-`` part count."""
    joined = hashlib.md5(b"".join(part_md5s), usedforsecurity=False).hexdigest()
    return f"{joined}-{len(part_md5s)}"


def file_etags(path: Path, length: int, part_size: int) -> frozenset[str]:
    """The ETags of ``length`` bytes of ``path`` written as one PUT and (above ``part_size``) as a
    multipart upload of ``part_size`` parts: what a listing shows for exactly this content."""
    whole = hashlib.md5(usedforsecurity=False)
    parts: list[bytes] = []
    with path.open("rb") as fh:
        left = length
        while left > 0:
            part = hashlib.md5(usedforsecurity=False)
            want = min(part_size, left)
            while want > 0:
                block = fh.read(min(CHUNK, want))
                if not block:
                    return frozenset()  # shorter than expected: matches nothing
                part.update(block)
                whole.update(block)
                want -= len(block)
                left -= len(block)
            parts.append(part.digest())
    found = {whole.hexdigest()}
    if length > part_size:
        found.add(multipart_etag(parts))
    return frozenset(found)


def _response_etag(body: bytes) -> str:
    """The ``ETag`` of a CompleteMultipartUpload answer, with or without an XML namespace prefix (minio's
    parser found none in Ceph RGW 16's answer, tested). A regex, not an XML parser: the body is the
    server's, and only this one text field is wanted."""
    found = re.search(rb"<(?:[A-Za-z0-9]+:)?ETag>([^<]{1,200})</", body)
    if found is None:
        return ""
    return found.group(1).decode("ascii", "replace").replace("&quot;", "").replace("&#34;", "").strip('"')


def lock_checksum_headers(sha256_hex: str) -> dict[str, str]:
    """The object's sha256 as an S3 checksum on a single PUT. A bucket with a default object-lock
    retention (``kasuhara storage init``) makes AWS refuse a PUT without Content-MD5 or a checksum, and moto
    follows it; MinIO and AWS also verify the value, Ceph RGW 16 ignores it. Never on a multipart upload
    (there a checksum is per part)."""
    digest = base64.b64encode(bytes.fromhex(sha256_hex)).decode("ascii")
    return {"x-amz-sdk-checksum-algorithm": "SHA256", "x-amz-checksum-sha256": digest}


class HashingReader:
    """A file reader for uploads that hashes what it hands out and checks it against the expected sha256.

    When the last expected byte has been read and the digest differs (the file changed since it was
    hashed), ``read`` raises :class:`ContentChanged` *before* the client can complete the upload, so the
    object never becomes visible with a wrong checksum.
    """

    def __init__(self, raw: BinaryIO, length: int, sha256: str) -> None:
        self._raw = raw
        self._remaining = length
        self._expected = sha256
        self._hash = hashlib.sha256()
        if length == 0:
            self._finish()

    def _finish(self) -> None:
        got = self._hash.hexdigest()
        if got != self._expected:
            raise ContentChanged(f"file content changed while uploading (sha256 {got} != {self._expected})")

    def read(self, size: int = -1) -> bytes:
        if self._remaining <= 0:
            return b""
        want = self._remaining if size is None or size < 0 else min(size, self._remaining)
        data = self._raw.read(want)
        if not data:
            raise ContentChanged(f"file is shorter than expected ({self._remaining} bytes missing)")
        self._hash.update(data)
        self._remaining -= len(data)
        if self._remaining == 0:
            self._finish()
        return data


def _digest_file(path: Path, chunk: int, *, md5: bool) -> tuple[int, str, str]:
    """Size, sha256 and (if asked) MD5 of a file, read in chunks (never the whole file in memory)."""
    h = hashlib.sha256()
    m = hashlib.md5(usedforsecurity=False) if md5 else None
    size = 0
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
            if m is not None:
                m.update(block)
            size += len(block)
    return size, h.hexdigest(), m.hexdigest() if m is not None else ""


def hash_file_md5(path: Path, *, chunk: int = CHUNK) -> tuple[int, str, str]:
    """Size, sha256 and MD5 of a file in one pass (MD5: what S3 gives a single-part object as its ETag)."""
    return _digest_file(path, chunk, md5=True)


def hash_file(path: Path, *, chunk: int = CHUNK) -> tuple[int, str]:
    """Size and sha256 of a file."""
    size, sha, _ = _digest_file(path, chunk, md5=False)
    return size, sha


def decode_sse_c_key(value: str) -> bytes | None:
    """``storage.sse_c_key`` (base64 of 32 bytes; empty = off) as the raw key."""
    if not value:
        return None
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise StorageSetupError("storage.sse_c_key: not base64 (use: openssl rand -base64 32)") from None
    if len(raw) != 32:
        raise StorageSetupError(f"storage.sse_c_key: must decode to 32 bytes, got {len(raw)}")
    return raw


class MinioStore:
    """:class:`ObjectStore` over the synchronous ``minio`` client, run in a dedicated thread pool."""

    def __init__(
        self,
        *,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        region: str = "us-east-1",
        secure: bool = False,
        sse_c_key: bytes | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
        pool_size: int = 8,
        connect_retries: int = 2,
        part_size: int = 8 * 1024 * 1024,
        parallel_parts: int = 2,
    ) -> None:
        import urllib3
        from minio import Minio
        from minio.sse import SseCustomerKey

        self.bucket = bucket
        self.endpoint = endpoint
        # Retries inside urllib3 only where they cannot duplicate anything: connection failures (nothing
        # was sent) for any method, and 5xx answers for GET/HEAD. A PUT whose answer was lost is retried
        # by the uploader, which first looks at what the server has (a blind re-PUT would add a version).
        retry = urllib3.Retry(
            total=connect_retries + 2,
            connect=connect_retries,
            read=0,
            redirect=0,
            status=2,
            other=0,
            allowed_methods=frozenset({"GET", "HEAD"}),
            status_forcelist=(500, 502, 503, 504),
            backoff_factor=0.2,
            raise_on_status=False,
        )
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
            maxsize=pool_size,
            block=True,
            retries=retry,
        )
        self._client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=self._http,
        )
        self._sse = SseCustomerKey(sse_c_key) if sse_c_key is not None else None
        self._part_size = part_size
        self._parallel_parts = parallel_parts
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=pool_size, thread_name_prefix="kasuhara-s3"
        )

    @classmethod
    def from_config(
        cls,
        storage: StorageConfig,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        **options: Any,
    ) -> MinioStore:
        """A store for ``[storage]``; other roles pass their own keys (retention, admin)."""
        sse = decode_sse_c_key(storage.sse_c_key)
        if sse is not None and not storage.secure:
            raise StorageSetupError(
                "storage.sse_c_key needs storage.secure = true (S3 refuses SSE-C over http)"
            )
        return cls(
            endpoint=storage.endpoint,
            access_key=access_key if access_key is not None else storage.access_key,
            secret_key=secret_key if secret_key is not None else storage.secret_key,
            bucket=storage.bucket,
            region=storage.region,
            secure=storage.secure,
            sse_c_key=sse,
            **options,
        )

    def __repr__(self) -> str:
        return (
            f"MinioStore(endpoint={self.endpoint!r}, bucket={self.bucket!r}, sse_c={self._sse is not None})"
        )

    @property
    def client(self) -> Any:
        """The underlying ``minio.Minio`` (for bucket setup and tests; not for recording I/O)."""
        return self._client

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._http.clear()

    async def _call(self, fn: Callable[[], T], what: str) -> T:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            return await loop.run_in_executor(self._executor, fn)
        except StorageError:
            raise
        except Exception as exc:
            raise _translate(exc, what) from exc
        finally:
            elapsed = time.perf_counter() - started
            metrics.S3_REQUEST_SECONDS.labels(metrics.s3_operation(what)).observe(elapsed)

    # -- writes

    async def put_file(
        self,
        key: str,
        path: Path,
        *,
        length: int,
        sha256: str,
        metadata: Mapping[str, str],
        content_type: str = "application/octet-stream",
        if_none_match: bool = False,
        legal_hold: bool = False,
    ) -> PutResult:
        if if_none_match:
            return await self._call(
                lambda: self._create_file(key, path, length, sha256, metadata, content_type, legal_hold),
                f"put {key}",
            )
        hold = {LEGAL_HOLD_HEADER: "ON"} if legal_hold else {}

        def put() -> PutResult:
            with path.open("rb") as fh:
                single = length <= self._part_size
                result = self._client.put_object(
                    self.bucket,
                    key,
                    HashingReader(fh, length, sha256),  # type: ignore[arg-type]  # read() is all it uses
                    length,
                    content_type=content_type,
                    # x-amz-* names pass put_object's header normalisation as they are (not user metadata)
                    metadata={**metadata, **hold, **(lock_checksum_headers(sha256) if single else {})},
                    sse=self._sse,
                    part_size=self._part_size,
                    num_parallel_uploads=self._parallel_parts,
                )
            return PutResult(key, (result.etag or "").strip('"'), result.version_id)

        return await self._call(put, f"put {key}")

    def _write_headers(self, metadata: Mapping[str, str], content_type: str) -> dict[str, Any]:
        """Headers of a write sent through the client's low-level request methods: user metadata as
        ``x-amz-meta-*`` and the SSE-C headers, exactly what ``put_object`` would send."""
        headers: dict[str, Any] = {"Content-Type": content_type}
        headers.update({f"x-amz-meta-{name}": value for name, value in metadata.items()})
        if self._sse is not None:
            headers.update(self._sse.headers())
        return headers

    def _create_file(
        self,
        key: str,
        path: Path,
        length: int,
        sha256: str,
        metadata: Mapping[str, str],
        content_type: str,
        legal_hold: bool = False,
    ) -> PutResult:
        """Blocking conditional create of a file (``If-None-Match: *``), single PUT or multipart.

        minio-py's public ``put_object`` turns any header it does not know (``If-None-Match`` included)
        into ``X-Amz-Meta-*`` user metadata (``normalize_headers``): the condition would silently not be
        sent. So the same requests are made through the client's request methods with the header as
        given (checked on the wire, ``tests/test_storage.py::test_conditional_create_header_on_the_wire``).
        A multipart upload carries the condition on its CompleteMultipartUpload (S3 since 2024, MinIO,
        moto); the parts are sent one at a time, at most one part in memory.
        """
        from minio.datatypes import CompleteMultipartUploadResult
        from minio.helpers import md5sum_hash
        from minio.xml import Element, SubElement, getbytes

        headers = self._write_headers(metadata, content_type)
        if legal_hold:
            headers[LEGAL_HOLD_HEADER] = "ON"  # on the PUT, or the CreateMultipartUpload (as S3 wants)
        # The ETags prove the content only without SSE-C (then they are not MD5s: read back instead).
        provable = self._sse is None
        with path.open("rb") as fh:
            reader = HashingReader(fh, length, sha256)
            if length <= self._part_size or (legal_hold and length <= HELD_SINGLE_PUT_MAX):
                data = _read_exactly(reader, length)
                headers["If-None-Match"] = "*"
                headers.update(lock_checksum_headers(sha256))
                result = self._client._put_object(self.bucket, key, data, headers)
                etag = (result.etag or "").strip('"')
                md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
                return PutResult(key, etag, result.version_id, verified=provable and etag == md5)
            upload_id = self._client._create_multipart_upload(self.bucket, key, headers)
            try:
                part_headers: dict[str, Any] | None = self._sse.headers() if self._sse else None
                etags: list[str] = []
                digests: list[bytes] = []
                sent = 0
                while sent < length:
                    chunk = _read_exactly(reader, min(self._part_size, length - sent))
                    digest = hashlib.md5(chunk, usedforsecurity=False)
                    etag = self._client._upload_part(
                        self.bucket, key, chunk, part_headers, upload_id, len(etags) + 1
                    )
                    if provable and etag.strip('"') != digest.hexdigest():
                        # The server stored other bytes than sent for this part: never complete it.
                        raise StorageError(
                            f"put {key}: part {len(etags) + 1} ETag mismatch", code="BadDigest"
                        )
                    etags.append(etag)
                    digests.append(digest.digest())
                    sent += len(chunk)
                element = Element("CompleteMultipartUpload")
                for number, etag in enumerate(etags, start=1):
                    part = SubElement(element, "Part")
                    SubElement(part, "PartNumber", str(number))
                    SubElement(part, "ETag", f'"{etag}"')
                body = getbytes(element)
                complete: dict[str, Any] = {
                    "Content-Type": "application/xml",
                    "Content-MD5": md5sum_hash(body),
                    "If-None-Match": "*",
                }
                if self._sse is not None:
                    complete.update(self._sse.headers())
                response = self._client._execute(
                    "POST",
                    self.bucket,
                    key,
                    body=body,
                    headers=complete,
                    query_params={"uploadId": upload_id},
                )
                done = CompleteMultipartUploadResult(response)
                etag = (done.etag or "").strip('"') or _response_etag(response.data)
                verified = provable and etag == multipart_etag(digests)
                return PutResult(key, etag, done.version_id, verified=verified)
            except BaseException:
                with contextlib.suppress(Exception):
                    self._client._abort_multipart_upload(self.bucket, key, upload_id)
                raise

    async def put_bytes(
        self, key: str, data: bytes, *, metadata: Mapping[str, str], content_type: str = "application/json"
    ) -> PutResult:
        checksum = lock_checksum_headers(hashlib.sha256(data).hexdigest())

        def put() -> PutResult:
            result = self._client.put_object(
                self.bucket,
                key,
                io.BytesIO(data),
                len(data),
                content_type=content_type,
                metadata={**metadata, **checksum},
                sse=self._sse,
            )
            return PutResult(key, (result.etag or "").strip('"'), result.version_id)

        return await self._call(put, f"put {key}")

    def put_etag_is_md5(self, length: int) -> bool:
        # minio-py sends up to one part in a single PUT; S3 and MinIO give it the content's MD5 as ETag
        # unless the object is encrypted with a customer key (or a KMS: then the fallback reads it back).
        return self._sse is None and length <= self._part_size

    def content_etags(self, path: Path, length: int) -> frozenset[str]:
        if self._sse is not None:
            return frozenset()
        return file_etags(path, length, self._part_size)

    # -- reads

    async def stat(self, key: str, *, version_id: str | None = None) -> ObjectInfo | None:
        from minio.error import S3Error

        def stat() -> ObjectInfo | None:
            try:
                obj = self._client.stat_object(self.bucket, key, ssec=self._sse, version_id=version_id)
            except S3Error as exc:
                if exc.code in {"NoSuchKey", "NoSuchObject", "NoSuchVersion", "MethodNotAllowed"}:
                    # MethodNotAllowed: the latest version is a delete marker.
                    return None
                raise
            headers: Mapping[str, str] = obj.metadata or {}
            hold_header = headers.get("x-amz-object-lock-legal-hold")
            return ObjectInfo(
                key=key,
                size=int(obj.size or 0),
                etag=obj.etag or "",
                version_id=obj.version_id,
                last_modified=obj.last_modified,
                metadata=user_metadata(headers),
                legal_hold=None if hold_header is None else hold_header.upper() == "ON",
            )

        return await self._call(stat, f"stat {key}")

    async def get_bytes(
        self, key: str, *, max_bytes: int = 16 * 1024 * 1024, version_id: str | None = None
    ) -> bytes | None:
        from minio.error import S3Error

        def get() -> bytes | None:
            try:
                response = self._client.get_object(self.bucket, key, ssec=self._sse, version_id=version_id)
            except S3Error as exc:
                if exc.code in {"NoSuchKey", "NoSuchObject", "NoSuchVersion", "MethodNotAllowed"}:
                    return None
                raise
            try:
                data = response.read(max_bytes + 1)
            finally:
                response.close()
                response.release_conn()
            if len(data) > max_bytes:
                raise StorageError(f"get {key}: larger than {max_bytes} bytes", code="TooLarge")
            return bytes(data)

        return await self._call(get, f"get {key}")

    async def get_to_file(self, key: str, path: Path, *, version_id: str | None = None) -> ObjectInfo:
        def get() -> ObjectInfo:
            tmp = path.with_name(f".{path.name}.part")
            response = self._client.get_object(self.bucket, key, ssec=self._sse, version_id=version_id)
            try:
                with tmp.open("wb") as fh:
                    for block in response.stream(CHUNK):
                        fh.write(block)
                    fh.flush()
                    os.fsync(fh.fileno())
                headers = response.headers
                size = tmp.stat().st_size
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            finally:
                response.close()
                response.release_conn()
            hold_header = headers.get("x-amz-object-lock-legal-hold")
            return ObjectInfo(
                key=key,
                size=size,
                etag=(headers.get("etag") or "").strip('"'),
                version_id=headers.get("x-amz-version-id"),
                last_modified=_http_date(headers.get("last-modified")),
                metadata=user_metadata(headers),
                legal_hold=None if hold_header is None else hold_header.upper() == "ON",
            )

        return await self._call(get, f"get {key}")

    async def read_range(
        self, key: str, offset: int, length: int | None, *, version_id: str | None = None
    ) -> AsyncIterator[bytes]:
        """``length`` bytes (``None``: to the end) from ``offset`` of one version, as a ranged GET (SSE-C
        aware), in blocks read in the store's threads: the console streams audio without holding the
        file. Closing the iterator early (a client gone) closes the S3 response."""
        what = f"get {key}"
        response = await self._call(
            lambda: self._client.get_object(
                self.bucket, key, offset=offset, length=length or 0, ssec=self._sse, version_id=version_id
            ),
            what,
        )
        try:
            blocks = response.stream(CHUNK // 4)
            # A body block is timed as ``read``: ``get`` stays the request's own latency.
            while (block := await self._call(lambda: next(blocks, None), f"read {key}")) is not None:
                yield bytes(block)
        finally:
            response.close()
            response.release_conn()

    async def list_prefix(self, prefix: str, *, versions: bool = False) -> AsyncIterator[ObjectInfo]:
        iterator: Iterator[Any] = iter(())

        def start() -> Iterator[Any]:
            it: Iterator[Any] = iter(
                self._client.list_objects(
                    self.bucket, prefix=prefix, recursive=True, include_version=versions
                )
            )
            return it

        def take() -> list[Any]:
            # One page per thread hop: the client fetches pages of 1000 lazily while iterating.
            out = []
            for obj in iterator:
                out.append(obj)
                if len(out) >= 1000:
                    break
            return out

        iterator = await self._call(start, f"list {prefix}")
        while True:
            page = await self._call(take, f"list {prefix}")
            for obj in page:
                yield ObjectInfo(
                    key=obj.object_name,
                    size=int(obj.size or 0),
                    etag=(obj.etag or "").strip('"'),
                    version_id=obj.version_id,
                    is_latest=_truthy(obj.is_latest, default=True),
                    is_delete_marker=bool(obj.is_delete_marker),
                    last_modified=obj.last_modified,
                )
            if not page:
                return

    async def list_dirs(self, prefix: str, *, versions: bool = False) -> list[str]:
        def dirs() -> list[str]:
            found = self._client.list_objects(
                self.bucket, prefix=prefix, recursive=False, include_version=versions
            )
            return sorted({o.object_name for o in found if o.is_dir})

        return await self._call(dirs, f"list {prefix}")

    async def put_bytes_if(
        self,
        key: str,
        data: bytes,
        *,
        metadata: Mapping[str, str],
        if_match: str | None = None,
        if_none_match: bool = False,
        content_type: str = "application/json",
        legal_hold: bool = False,
    ) -> PutResult:
        headers = self._write_headers(metadata, content_type)
        headers.update(lock_checksum_headers(hashlib.sha256(data).hexdigest()))
        if legal_hold:
            headers[LEGAL_HOLD_HEADER] = "ON"
        if if_none_match:
            headers["If-None-Match"] = "*"
        if if_match is not None:
            headers["If-Match"] = f'"{if_match.strip(chr(34))}"'

        def put() -> PutResult:
            # The public put_object() would turn If-* into user metadata; _put_object sends them as given.
            result = self._client._put_object(self.bucket, key, data, headers)
            return PutResult(key, result.etag or "", result.version_id)

        return await self._call(put, f"put {key}")

    # -- deletes and holds

    async def delete_versions(
        self, refs: Sequence[ObjectRef], *, bypass_governance: bool = False
    ) -> list[DeleteFailure]:
        from minio.deleteobjects import DeleteObject

        by_pair = {(r.key, r.version_id): r for r in refs}
        by_key: dict[str, list[ObjectRef]] = {}
        for r in refs:
            by_key.setdefault(r.key, []).append(r)

        def delete() -> list[DeleteFailure]:
            failures = []
            errors = self._client.remove_objects(
                self.bucket,
                (DeleteObject(r.key, r.version_id) for r in refs),
                bypass_governance_mode=bypass_governance,
            )
            for err in errors:
                name = err.name or ""
                ref = by_pair.get((name, err.version_id))
                if ref is None:
                    # Some servers leave VersionId out of the error: match by key when unambiguous.
                    same = by_key.get(name, [])
                    ref = same[0] if len(same) == 1 else ObjectRef(name, err.version_id)
                failures.append(DeleteFailure(ref, err.code or "Error", err.message or ""))
            return failures

        return await self._call(delete, f"delete {len(refs)} objects")

    async def set_legal_hold(self, key: str, on: bool, *, version_id: str | None = None) -> None:
        def set_hold() -> None:
            if on:
                self._client.enable_object_legal_hold(self.bucket, key, version_id=version_id)
            else:
                self._client.disable_object_legal_hold(self.bucket, key, version_id=version_id)

        await self._call(set_hold, f"legal hold {key}")

    async def legal_hold(self, key: str, *, version_id: str | None = None) -> bool:
        from minio.error import S3Error

        def get() -> bool:
            try:
                return bool(
                    self._client.is_object_legal_hold_enabled(self.bucket, key, version_id=version_id)
                )
            except S3Error as exc:
                # Ceph RGW 16 answers GetObjectLegalHold of a version that never had a legal hold with
                # this error (tested): no hold was ever set, so it is not held.
                if exc.code in NO_LEGAL_HOLD_CODES:
                    return False
                raise

        return await self._call(get, f"legal hold {key}")

    # -- bucket setup (``kasuhara storage init`` and tests; not part of ObjectStore)

    async def ensure_bucket(self) -> bool:
        """Create the bucket with object lock if missing; ``True`` if created. Raises
        :class:`StorageRefused` if it exists without object lock (holds could not work)."""
        from minio.error import S3Error

        def ensure() -> bool:
            created = False
            if not self._client.bucket_exists(self.bucket):
                self._client.make_bucket(self.bucket, object_lock=True)
                created = True
            try:
                self._client.get_object_lock_config(self.bucket)
            except S3Error as exc:
                if exc.code in {"ObjectLockConfigurationNotFoundError", "ObjectLockConfigurationNotFound"}:
                    raise StorageRefused(
                        f"bucket {self.bucket!r} exists without object lock: evidence holds cannot work; "
                        "create a new bucket (object lock can only be enabled at creation)",
                        code=exc.code,
                    ) from None
                raise
            return created

        return await self._call(ensure, f"ensure bucket {self.bucket}")

    async def default_retention(self) -> tuple[str, int] | None:
        """The bucket's default object-lock retention as ``(mode, days)``; ``None`` when it has none."""

        def get() -> tuple[str, int] | None:
            config = self._client.get_object_lock_config(self.bucket)
            if config.mode is None or config.duration is None:
                return None
            years = str(config.duration_unit or "").lower().startswith("year")
            return str(config.mode), int(config.duration) * (365 if years else 1)

        return await self._call(get, f"object lock config {self.bucket}")

    async def ensure_default_retention(self, days: int) -> bool:
        """Give every new object version a GOVERNANCE lock of ``days`` (the retention period), so the
        server itself refuses to delete a recording early to anyone without ``s3:BypassGovernanceRetention``
        (the admin role alone). ``True`` if the setting was changed. Governance, not compliance: an admin
        can still correct a mistake, audited; compliance would make even that impossible."""
        from minio.commonconfig import GOVERNANCE
        from minio.objectlockconfig import DAYS, ObjectLockConfig

        if not 1 <= days <= 36500:
            raise ValueError(f"retention days must be 1..36500, got {days}")
        if await self.default_retention() == (GOVERNANCE, days):
            return False

        def put() -> None:
            self._client.set_object_lock_config(self.bucket, ObjectLockConfig(GOVERNANCE, days, DAYS))

        await self._call(put, f"object lock config {self.bucket}")
        return True

    async def abort_stale_multipart_rule(self, days: int = 1) -> None:
        """Add a lifecycle rule that drops multipart uploads left behind by a crash after ``days``."""
        from minio.commonconfig import ENABLED, Filter
        from minio.lifecycleconfig import AbortIncompleteMultipartUpload, LifecycleConfig, Rule

        def put_rule() -> None:
            rule = Rule(
                ENABLED,
                rule_filter=Filter(prefix=RECORDINGS_PREFIX),
                rule_id="kasuhara-abort-incomplete-uploads",
                abort_incomplete_multipart_upload=AbortIncompleteMultipartUpload(days),
            )
            self._client.set_bucket_lifecycle(self.bucket, LifecycleConfig([rule]))

        await self._call(put_rule, "lifecycle")


def _read_exactly(reader: HashingReader, length: int) -> bytes:
    """``length`` bytes from ``reader`` (which raises :class:`ContentChanged` on a short file)."""
    buf = bytearray()
    while len(buf) < length:
        buf += reader.read(length - len(buf))
    return bytes(buf)


def _http_date(value: str | None) -> datetime | None:
    """An HTTP ``Last-Modified`` header as an aware datetime (``None`` if absent or unreadable)."""
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None


async def key_versions(store: ObjectStore, key: str) -> list[ObjectInfo]:
    """Every version and delete marker of exactly ``key``, newest first (one listing)."""
    return [o async for o in store.list_prefix(key, versions=True) if o.key == key]


async def replace_if_unchanged(
    store: ObjectStore,
    key: str,
    data: bytes,
    *,
    metadata: Mapping[str, str],
    etag: str,
    version_id: str | None = None,
    what: str = "storage",
) -> PutResult:
    """Replace ``key`` if it is still the object read as ``etag`` (and ``version_id``): ``If-Match``.

    Ceph RGW 16 refuses every ``If-Match`` on a versioned bucket, even a matching one (and ignores
    ``If-None-Match``): when a re-read still shows that very object, nobody wrote, so it is written
    plainly. Not atomic: a write between the re-read and ours is overwritten; callers that need to know
    who won read back. Raises :class:`PreconditionFailed` when the object really changed."""
    try:
        return await store.put_bytes_if(key, data, metadata=metadata, if_match=etag)
    except PreconditionFailed:
        now = await store.stat(key)
        if (
            now is None
            or now.etag.strip('"') != etag.strip('"')
            or (version_id is not None and now.version_id != version_id)
        ):
            raise
    log.warning("%s event=condition_refused_unchanged key=%s (server refuses If-Match)", what, key)
    return await store.put_bytes(key, data, metadata=metadata)


def _truthy(value: object, *, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, str):
        return value.strip().lower() == "true"
    return bool(value)


def _translate(exc: BaseException, what: str) -> StorageError:
    """The client's many exception types as ours; the message never carries credentials or URLs."""
    from minio.error import InvalidResponseError, S3Error, ServerError

    if isinstance(exc, ValueError | TypeError | FileNotFoundError | PermissionError | IsADirectoryError):
        # Bad arguments and local file problems are not the server's state: never retried as an outage.
        raise exc
    if isinstance(exc, S3Error):
        code = exc.code or "S3Error"
        if code in {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ObjectLocked"}:
            return StorageRefused(f"{what}: refused ({code})", code=code)
        if code in {"PreconditionFailed", "ConditionalRequestConflict"}:
            return PreconditionFailed(f"{what}: {code}", code=code)
        if code in {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"}:
            return StorageUnavailable(f"{what}: server busy ({code})", code=code)
        return StorageError(f"{what}: {code}", code=code)
    if isinstance(exc, ServerError | InvalidResponseError):
        return StorageUnavailable(f"{what}: server error ({type(exc).__name__})")
    # urllib3 errors, socket errors, timeouts: the server is not reachable right now.
    return StorageUnavailable(f"{what}: {type(exc).__name__}: {str(exc)[:200]}")


# --------------------------------------------------------------------------------------------- fake


@dataclass
class _Version:
    version_id: str
    data: bytes | None  # None = delete marker
    metadata: dict[str, str]
    content_type: str
    legal_hold: bool = False
    last_modified: datetime = field(default_factory=lambda: datetime.now(UTC))


class MemoryStore:
    """In-memory :class:`ObjectStore` with S3's versioning, delete-marker and legal-hold behaviour.

    ``down = True`` makes every call raise :class:`StorageUnavailable`; ``fail_next`` injects failures
    into the next calls of one operation (e.g. ``{"put_bytes": 2}``) to test retries.
    """

    def __init__(self, bucket: str = "memory") -> None:
        self.bucket = bucket
        self.objects: dict[str, list[_Version]] = {}
        self.down = False
        self.fail_next: dict[str, int] = {}
        self.calls: list[tuple[str, str]] = []
        #: ``bypass_governance`` of each ``delete_versions`` call (who asked to bypass the lock).
        self.bypass_requests: list[bool] = []
        #: False: answer puts with ETags that are not the MD5 (as SSE-KMS does); ``wrong_etags``: claim
        #: MD5 ETags but give wrong ones (a server that stored something else).
        self.md5_etags = True
        self.wrong_etags = False
        #: Refuse every read of audio (HEAD and GET of ``*.wav``) as Ceph RGW refuses the service role.
        self.refuse_audio_reads = False
        self._seq = 0

    def _enter(self, op: str, key: str) -> None:
        self.calls.append((op, key))
        if self.down:
            raise StorageUnavailable(f"{op} {key}: memory store is down")
        if self.refuse_audio_reads and op in {"stat", "get_bytes", "get_to_file"} and key.endswith(".wav"):
            raise StorageRefused(f"{op} {key}: refused (AccessDenied)", code="AccessDenied")
        left = self.fail_next.get(op, 0)
        if left:
            self.fail_next[op] = left - 1
            raise StorageUnavailable(f"{op} {key}: injected failure")

    def _latest(self, key: str) -> _Version | None:
        versions = self.objects.get(key)
        if not versions or versions[-1].data is None:
            return None
        return versions[-1]

    def _find(self, key: str, version_id: str | None) -> _Version | None:
        if version_id is None:
            return self._latest(key)
        return next((v for v in self.objects.get(key, []) if v.version_id == version_id), None)

    def _add(self, key: str, data: bytes | None, metadata: Mapping[str, str], content_type: str) -> _Version:
        self._seq += 1
        version = _Version(f"v{self._seq}", data, {k.lower(): v for k, v in metadata.items()}, content_type)
        self.objects.setdefault(key, []).append(version)
        return version

    async def put_file(
        self,
        key: str,
        path: Path,
        *,
        length: int,
        sha256: str,
        metadata: Mapping[str, str],
        content_type: str = "application/octet-stream",
        if_none_match: bool = False,
        legal_hold: bool = False,
    ) -> PutResult:
        self._enter("put_file", key)
        if if_none_match and self._latest(key) is not None:
            raise PreconditionFailed(f"put {key}: PreconditionFailed", code="PreconditionFailed")
        buf = bytearray()
        with path.open("rb") as fh:
            reader = HashingReader(fh, length, sha256)
            while block := reader.read(CHUNK):
                buf += block
        version = self._add(key, bytes(buf), metadata, content_type)
        version.legal_hold = legal_hold
        return PutResult(key, self._etag(bytes(buf)), version.version_id)

    async def put_bytes(
        self, key: str, data: bytes, *, metadata: Mapping[str, str], content_type: str = "application/json"
    ) -> PutResult:
        self._enter("put_bytes", key)
        version = self._add(key, bytes(data), metadata, content_type)
        return PutResult(key, self._etag(data), version.version_id)

    def _etag(self, data: bytes) -> str:
        if self.wrong_etags:
            return "0" * 32
        if not self.md5_etags:
            return f"kms-{self._seq}"
        return hashlib.md5(data, usedforsecurity=False).hexdigest()

    def put_etag_is_md5(self, length: int) -> bool:
        return self.md5_etags

    def content_etags(self, path: Path, length: int) -> frozenset[str]:
        if not self.md5_etags:
            return frozenset()
        return file_etags(path, length, max(length, 1))

    @staticmethod
    def _info(key: str, v: _Version) -> ObjectInfo:
        """What a HEAD (or a GET's headers) says of a stored version."""
        assert v.data is not None
        return ObjectInfo(
            key=key,
            size=len(v.data),
            etag=hashlib.md5(v.data, usedforsecurity=False).hexdigest(),
            version_id=v.version_id,
            last_modified=v.last_modified,
            metadata=dict(v.metadata),
            legal_hold=v.legal_hold,
        )

    async def stat(self, key: str, *, version_id: str | None = None) -> ObjectInfo | None:
        self._enter("stat", key)
        v = self._find(key, version_id)
        if v is None or v.data is None:
            return None
        return self._info(key, v)

    async def get_bytes(
        self, key: str, *, max_bytes: int = 16 * 1024 * 1024, version_id: str | None = None
    ) -> bytes | None:
        self._enter("get_bytes", key)
        v = self._find(key, version_id)
        if v is None or v.data is None:
            return None
        if len(v.data) > max_bytes:
            raise StorageError(f"get {key}: larger than {max_bytes} bytes", code="TooLarge")
        return v.data

    async def get_to_file(self, key: str, path: Path, *, version_id: str | None = None) -> ObjectInfo:
        self._enter("get_to_file", key)
        v = self._find(key, version_id)
        if v is None or v.data is None:
            code = "NoSuchKey" if version_id is None else "NoSuchVersion"
            raise StorageError(f"get {key}: {code}", code=code)
        await asyncio.to_thread(path.write_bytes, v.data)
        return self._info(key, v)

    async def read_range(
        self, key: str, offset: int, length: int | None, *, version_id: str | None = None
    ) -> AsyncIterator[bytes]:
        self._enter("read_range", key)
        if self.refuse_audio_reads and key.endswith(".wav"):
            raise StorageRefused(f"get {key}: refused (AccessDenied)", code="AccessDenied")
        v = self._find(key, version_id)
        if v is None or v.data is None:
            code = "NoSuchKey" if version_id is None else "NoSuchVersion"
            raise StorageError(f"get {key}: {code}", code=code)
        end = len(v.data) if length is None else min(len(v.data), offset + length)
        for at in range(offset, end, 64 * 1024):
            yield v.data[at : min(end, at + 64 * 1024)]

    async def list_prefix(self, prefix: str, *, versions: bool = False) -> AsyncIterator[ObjectInfo]:
        self._enter("list", prefix)
        for key in sorted(k for k in self.objects if k.startswith(prefix)):
            history = self.objects[key]
            shown = list(reversed(history)) if versions else history[-1:]
            for i, v in enumerate(shown):
                if not versions and v.data is None:
                    continue
                yield ObjectInfo(
                    key=key,
                    size=len(v.data or b""),
                    etag=self._etag(v.data) if v.data is not None else "",
                    version_id=v.version_id,
                    is_latest=(i == 0),
                    is_delete_marker=v.data is None,
                    last_modified=v.last_modified,
                )

    async def list_dirs(self, prefix: str, *, versions: bool = False) -> list[str]:
        self._enter("list_dirs", prefix)
        found = set()
        for key, history in self.objects.items():
            if not key.startswith(prefix) or (not versions and history[-1].data is None):
                continue
            rest = key[len(prefix) :]
            if "/" in rest:
                found.add(prefix + rest.split("/", 1)[0] + "/")
        return sorted(found)

    async def put_bytes_if(
        self,
        key: str,
        data: bytes,
        *,
        metadata: Mapping[str, str],
        if_match: str | None = None,
        if_none_match: bool = False,
        content_type: str = "application/json",
        legal_hold: bool = False,
    ) -> PutResult:
        self._enter("put_bytes_if", key)
        latest = self._latest(key)
        if if_none_match and latest is not None:
            raise PreconditionFailed(f"put {key}: PreconditionFailed", code="PreconditionFailed")
        if if_match is not None:
            etag = hashlib.md5(latest.data or b"", usedforsecurity=False).hexdigest() if latest else None
            if etag != if_match.strip('"'):
                raise PreconditionFailed(f"put {key}: PreconditionFailed", code="PreconditionFailed")
        version = self._add(key, bytes(data), metadata, content_type)
        version.legal_hold = legal_hold
        return PutResult(key, self._etag(data), version.version_id)

    async def delete_versions(
        self, refs: Sequence[ObjectRef], *, bypass_governance: bool = False
    ) -> list[DeleteFailure]:
        self._enter("delete_versions", f"{len(refs)} objects")
        self.bypass_requests.append(bypass_governance)
        failures = []
        for ref in refs:
            if ref.version_id is None:
                if ref.key in self.objects:
                    self._add(ref.key, None, {}, "")
                continue
            history = self.objects.get(ref.key, [])
            v = next((x for x in history if x.version_id == ref.version_id), None)
            if v is None:
                continue
            if v.legal_hold:
                failures.append(DeleteFailure(ref, "AccessDenied", "object protected by object lock"))
                continue
            history.remove(v)
            if not history:
                del self.objects[ref.key]
        return failures

    async def set_legal_hold(self, key: str, on: bool, *, version_id: str | None = None) -> None:
        self._enter("set_legal_hold", key)
        v = self._find(key, version_id)
        if v is None or v.data is None:
            raise StorageError(f"legal hold {key}: NoSuchKey", code="NoSuchKey")
        v.legal_hold = on

    async def legal_hold(self, key: str, *, version_id: str | None = None) -> bool:
        self._enter("legal_hold", key)
        v = self._find(key, version_id)
        if v is None or v.data is None:
            raise StorageError(f"legal hold {key}: NoSuchKey", code="NoSuchKey")
        return v.legal_hold

    def version_count(self, key: str) -> int:
        """How many versions (not delete markers) a key has: "exactly once" in tests means 1."""
        return sum(1 for v in self.objects.get(key, []) if v.data is not None)


# --------------------------------------------------------------------------------------------- holds


@dataclass(frozen=True)
class HoldRecord:
    """Why, who and when: ``holds/<call_id>.json`` and the ``hold`` field of the metadata."""

    call_id: str
    reason: str
    by: str
    at: str
    started_at: str | None = None
    #: The object versions the hold protects, ``{key: version_id}``. A legal hold protects one version;
    #: a later PUT to the key is a new, unheld version, so evidence readers read these, never "the
    #: latest". Filled in once the objects exist; not part of a request's identity (``compare=False``).
    versions: Mapping[str, str] = field(default_factory=dict, compare=False)

    @classmethod
    def create(
        cls,
        call_id: str,
        reason: object,
        by: object,
        *,
        at: str,
        started_at: datetime | str | None = None,
        versions: object = None,
    ) -> HoldRecord:
        """A record from untrusted input: the id is checked, reason and by are cleaned text, versions are
        kept only for this call's recording keys."""
        started = None
        if started_at is not None:
            started = parse_started_at(started_at).isoformat()
        cid = safe_call_id(call_id)
        return cls(
            call_id=cid,
            reason=clean_caller_text(reason, max_chars=REASON_MAX_CHARS) or "",
            by=clean_caller_text(by, max_chars=200) or "",
            at=at,
            started_at=started,
            versions=_clean_versions(versions, cid),
        )

    def with_versions(self, versions: Mapping[str, str]) -> HoldRecord:
        """The same record pinning ``versions`` where it pins nothing yet (the first pin wins)."""
        return dataclasses.replace(self, versions={**versions, **self.versions})

    def as_metadata_hold(self) -> dict[str, str]:
        """The ``hold`` object of ``kasuhara.recording/1`` metadata."""
        return {"reason": self.reason, "by": self.by, "at": self.at}

    def to_json(self) -> bytes:
        doc = {"schema": HOLD_SCHEMA, **dataclasses.asdict(self)}
        return json.dumps(doc, ensure_ascii=False, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> HoldRecord:
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("hold record is not a JSON object")
        return cls.create(
            str(doc.get("call_id", "")),
            doc.get("reason", ""),
            doc.get("by", ""),
            at=str(doc.get("at", "")),
            started_at=doc.get("started_at"),
            versions=doc.get("versions"),
        )


_VERSION_ID_RE = re.compile(r"[A-Za-z0-9._+=/-]{1,1024}")


def _clean_versions(value: object, call_id: str) -> dict[str, str]:
    """``{key: version_id}`` of a hold record, keeping only this call's recording keys and plain ids."""
    if not isinstance(value, Mapping):
        return {}
    out: dict[str, str] = {}
    for key, vid in value.items():
        parsed = parse_recording_key(key) if isinstance(key, str) else None
        if parsed is None or parsed.call_id != call_id:
            continue
        if isinstance(vid, str) and _VERSION_ID_RE.fullmatch(vid):
            out[key] = vid
    return out


@dataclass(frozen=True)
class PinnedObject:
    """One of a call's objects as evidence: the version that counts, and what came after it."""

    key: str
    #: The version that is the evidence (``None``: the key never had one).
    version_id: str | None
    #: Where the pin comes from: ``hold record``, ``metadata`` (the audio version the metadata names),
    #: ``first version`` (the uploader creates each key once, so the first version is the original).
    source: str
    #: Whether that version still exists.
    present: bool
    #: Versions and delete markers newer than the pinned one, newest first: a replacement or a hiding
    #: delete marker — "superseded, possible tampering".
    later: tuple[ObjectInfo, ...] = ()

    @property
    def superseded(self) -> bool:
        return bool(self.later)


@dataclass(frozen=True)
class Pins:
    """The pinned versions of a call's metadata and audio (see :func:`pin_versions`)."""

    metadata: PinnedObject
    audio: PinnedObject
    #: The pinned metadata names an audio key (``None``: no readable pinned metadata to say).
    audio_expected: bool | None

    def versions(self) -> dict[str, str]:
        return {o.key: o.version_id for o in (self.audio, self.metadata) if o.version_id and o.present}


def _pin(key: str, versions: Sequence[ObjectInfo], version_id: str | None, source: str) -> PinnedObject:
    """Pin ``version_id`` (or, without one, the oldest data version) among ``versions`` (newest first)."""
    if version_id is None:
        data = [v for v in versions if not v.is_delete_marker and v.version_id]
        if not data:
            return PinnedObject(key, None, "none", False, tuple(versions))
        version_id, source = data[-1].version_id, "first version"
    index = next((i for i, v in enumerate(versions) if v.version_id == version_id), None)
    if index is None:
        return PinnedObject(key, version_id, source, False, tuple(versions))
    return PinnedObject(key, version_id, source, True, tuple(versions[:index]))


async def pin_versions(store: ObjectStore, keys: RecordingKeys, pinned: Mapping[str, str]) -> Pins:
    """Which version of each object is the evidence: the hold record's pins (``pinned``); else for the
    metadata its first version, for the audio the version the pinned metadata names (``audio.version_id``,
    recorded at upload), else its first version. Two listings and one GET."""
    meta = _pin(
        keys.metadata, await key_versions(store, keys.metadata), pinned.get(keys.metadata), "hold record"
    )
    audio_vid, source, expected = pinned.get(keys.audio), "hold record", None
    if meta.present and meta.version_id is not None:
        data = await store.get_bytes(keys.metadata, version_id=meta.version_id)
        doc: object = None
        with contextlib.suppress(ValueError, RecursionError):
            doc = json.loads(data) if data is not None else None
        audio = doc.get("audio") if isinstance(doc, dict) else None
        if isinstance(audio, dict):
            expected = bool(audio.get("key"))
            named = audio.get("version_id")
            if audio_vid is None and isinstance(named, str) and _VERSION_ID_RE.fullmatch(named):
                audio_vid, source = named, "metadata"
    audio_pin = _pin(keys.audio, await key_versions(store, keys.audio), audio_vid, source)
    return Pins(meta, audio_pin, expected)


@dataclass(frozen=True)
class HoldOutcome:
    """What :meth:`RecordingHolds.apply` found and did."""

    record_written: bool
    held_keys: tuple[str, ...]
    #: The metadata object does not exist yet (not uploaded): the hold must be applied again at upload.
    pending_upload: bool
    #: ``{key: version_id}`` the hold protects (as written in the hold record).
    pinned: Mapping[str, str] = field(default_factory=dict)
    #: Keys whose evidence is gone: the pinned version no longer exists, or the pinned metadata names
    #: audio of which no version is left. A hold that lost a race with a deletion says so here.
    lost: tuple[str, ...] = ()
    #: Keys whose pinned version exists without a legal hold and this key may not place one (Ceph RGW
    #: refuses the service key PutObjectLegalHold): the hold record protects them from the retention
    #: sweep (and the default GOVERNANCE retention meanwhile); an admin's ``recordings hold`` places it.
    refused: tuple[str, ...] = ()


_GONE = frozenset({"NoSuchKey", "NoSuchObject", "NoSuchVersion", "MethodNotAllowed"})


class RecordingHolds:
    """Evidence holds applied directly in S3 (admin CLI, and the uploader's worker).

    Order matters for crash safety: the hold record is written *first* (the deletion guard refuses on it
    alone), then the legal holds; a release removes the legal holds first and the record last. A crash in
    between therefore always leaves the recording protected, and a re-run completes the operation.

    Holds pin versions: the record lists ``{key: version_id}`` and the legal holds go on exactly those
    versions (a legal hold protects one version; a later PUT is a new, unheld one). A legal hold that
    cannot be set because its version is gone (a retention sweep deleted it between the sweep's check of
    the hold records and this hold) is reported in :attr:`HoldOutcome.lost`, never as held.
    """

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    async def _current(self, keys: RecordingKeys) -> tuple[ObjectInfo | None, HoldRecord | None]:
        info = await self.store.stat(keys.hold)
        if info is None:
            return None, None
        data = await self.store.get_bytes(keys.hold, version_id=info.version_id)
        try:
            return info, HoldRecord.from_json(data) if data is not None else None
        except (ValueError, RecursionError):
            return info, None  # unreadable: still a hold (the guard refuses on its existence); kept as is

    async def apply(
        self,
        record: HoldRecord,
        keys: RecordingKeys,
        *,
        versions: Mapping[str, str] | None = None,
        resolve: bool = True,
        created_held: Collection[str] = (),
    ) -> HoldOutcome:
        """Write (or complete) the hold record, then legal holds on the pinned versions. ``versions``:
        versions the caller just created (the uploader), pinned without looking them up; ``resolve``
        False: pin nothing else now (the uploader's record-first step, before its own objects exist);
        ``created_held``: keys of ``versions`` created under a legal hold (PUT header), never re-held."""
        for _ in range(5):
            try:
                return await self._apply(record, keys, versions or {}, resolve, frozenset(created_held))
            except PreconditionFailed:
                continue  # another writer changed the hold record meanwhile: read it again
        raise PreconditionFailed(f"hold {keys.call_id}: the hold record keeps changing", code="Conflict")

    async def _replace(self, keys: RecordingKeys, record: HoldRecord, info: ObjectInfo) -> None:
        """Replace the hold record ``info`` (read just before) with ``record``: ``If-Match`` on its ETag.

        Ceph RGW 16 refuses every ``If-Match`` on a versioned bucket, even a matching one: when the
        record re-read is still that very version, nobody wrote, so it is written plainly. Not atomic: a
        write between the re-read and ours is overwritten. The only writers are other ``apply`` calls
        (which add the same kind of pins: the first pin wins again on their retry) and ``release`` (which
        deletes the record): the race can only leave a record in place, i.e. keep a hold, never drop one.
        """
        await replace_if_unchanged(
            self.store,
            keys.hold,
            record.to_json(),
            metadata={META_CALL_ID: record.call_id},
            etag=info.etag,
            version_id=info.version_id,
            what="hold",
        )

    async def _hold_one(self, key: str, vid: str, created_held: bool) -> str:
        """Legal hold on one pinned version: ``held``, ``lost`` (gone) or ``refused`` (this key may not).

        Even a version created with the hold header is read back (HEAD reports the hold on S3, MinIO,
        RGW and moto): RGW 16 and moto ignore the header on a *multipart* upload (tested), so "sent" is
        not "held". A key that may not read the object (the call service and audio: HEAD needs
        ``s3:GetObject``) finds the version in the listing and asks GetObjectLegalHold instead."""
        try:
            info = await self.store.stat(key, version_id=vid)
            present, already = info is not None, info is not None and bool(info.legal_hold)
        except StorageRefused as exc:
            if exc.code != "AccessDenied":
                raise
            present = any(
                v.version_id == vid and not v.is_delete_marker for v in await key_versions(self.store, key)
            )
            already = present and await self.store.legal_hold(key, version_id=vid)
        if not present:
            return "lost"
        if already:
            return "held"  # created under the hold, or held before: no API call needed
        if created_held:
            log.warning("hold event=create_header_ignored key=%s (setting it through the API)", key)
        try:
            await self.store.set_legal_hold(key, True, version_id=vid)
        except StorageRefused as exc:
            if exc.code != "AccessDenied":
                raise
            return "refused"
        except StorageError as exc:
            if exc.code not in _GONE:
                raise
            return "lost"
        return "held"

    async def _apply(
        self,
        record: HoldRecord,
        keys: RecordingKeys,
        given: Mapping[str, str],
        resolve: bool,
        created_held: frozenset[str] = frozenset(),
    ) -> HoldOutcome:
        info, current = await self._current(keys)
        pins = dict(current.versions) if current is not None else {}
        pins.update({k: v for k, v in given.items() if k not in pins})
        found: Pins | None = None
        if resolve and not {keys.audio, keys.metadata} <= pins.keys():
            found = await pin_versions(self.store, keys, pins)
            pins.update({k: v for k, v in found.versions().items() if k not in pins})
        written = False
        if info is None:
            await self.store.put_bytes_if(
                keys.hold,
                record.with_versions(pins).to_json(),
                metadata={META_CALL_ID: record.call_id},
                if_none_match=True,
            )
            written = True
        elif current is not None and pins != dict(current.versions):
            await self._replace(keys, current.with_versions(pins), info)
        held: list[str] = []
        lost: list[str] = []
        refused: list[str] = []
        for key in (keys.audio, keys.metadata):
            vid = pins.get(key)
            if vid is None:
                continue
            result = await self._hold_one(key, vid, key in created_held and given.get(key) == vid)
            {"held": held, "lost": lost, "refused": refused}[result].append(key)
        if found is not None and found.audio_expected and keys.audio not in pins and keys.audio not in lost:
            lost.append(keys.audio)  # the metadata names audio of which no version is left
        pending = keys.metadata not in pins and not (found is not None and found.metadata.later)
        log.log(
            logging.ERROR if lost or refused else logging.INFO,
            "hold event=applied call_id=%s record_written=%s held=%d lost=%d refused=%d pending_upload=%s",
            record.call_id,
            written,
            len(held),
            len(lost),
            len(refused),
            pending,
        )
        return HoldOutcome(written, tuple(held), pending, pins, tuple(lost), tuple(refused))

    async def verify(self, pinned: Mapping[str, str]) -> list[str]:
        """Re-read each pinned version: the keys whose version is missing or not under legal hold."""
        bad = []
        for key, vid in pinned.items():
            info = await self.store.stat(key, version_id=vid)
            if info is None:
                bad.append(key)
                continue
            held = info.legal_hold
            if held is None:
                held = await self.store.legal_hold(key, version_id=vid)
            if not held:
                bad.append(key)
        return bad

    async def release(self, keys: RecordingKeys) -> tuple[str, ...]:
        """Remove the legal holds (the pinned versions' and the latest's), then the hold record. Returns
        the keys released."""
        _, current = await self._current(keys)
        pinned = dict(current.versions) if current is not None else {}
        released = []
        for key in (keys.audio, keys.metadata):
            targets: set[str | None] = {pinned.get(key)} - {None}
            info = await self.store.stat(key)
            if info is not None:
                targets.add(info.version_id)
            for vid in targets:
                try:
                    await self.store.set_legal_hold(key, False, version_id=vid)
                except StorageError as exc:
                    if exc.code not in _GONE:
                        raise
            if targets:
                released.append(key)
        if await self.store.stat(keys.hold) is not None:
            await self.store.delete_versions([ObjectRef(keys.hold)])
        log.info("hold event=released call_id=%s released=%d", keys.call_id, len(released))
        return tuple(released)

    async def record(self, call_id: str) -> HoldRecord | None:
        data = await self.store.get_bytes(hold_key(call_id))
        if data is None:
            return None
        try:
            return HoldRecord.from_json(data)
        except (ValueError, json.JSONDecodeError):
            # A record we cannot read still means "held": report it with what we know.
            return HoldRecord(call_id=safe_call_id(call_id), reason="(unreadable hold record)", by="", at="")


# --------------------------------------------------------------------------------------------- deletion


@dataclass(frozen=True)
class Refusal:
    ref: ObjectRef
    reason: str


@dataclass(frozen=True)
class DeletionOutcome:
    deleted: tuple[ObjectRef, ...]
    refused: tuple[Refusal, ...]
    #: Deleted, but their call had a hold record by the time the batch was done: a hold placed while the
    #: batch was in flight. Never to be reported as kept (the hold command reports the loss too).
    raced: tuple[ObjectRef, ...] = ()


def deletion_verdicts(
    refs: Iterable[ObjectRef], held_call_ids: frozenset[str] | set[str]
) -> tuple[list[ObjectRef], list[Refusal]]:
    """Pure first stage of the guard: only recording objects, and none of a call with a hold record."""
    allowed: list[ObjectRef] = []
    refused: list[Refusal] = []
    for ref in refs:
        parsed = parse_recording_key(ref.key)
        if parsed is None:
            refused.append(Refusal(ref, "not a recording object"))
        elif parsed.call_id in held_call_ids:
            refused.append(Refusal(ref, "hold record"))
        else:
            allowed.append(ref)
    return allowed, refused


class DeletionGuard:
    """The one way recordings are deleted (retention, admin delete, anything later).

    Refuses, per object version: anything that is not ``recordings/…``; any object of a call with a hold
    record (``holds/<call_id>.json``); any version with an S3 legal hold (checked here *and* enforced by
    the server, whose refusals are reported as refusals, not errors). Deletes in batches of ≤ 1000.

    The hold records are listed once per :meth:`delete` call (one small prefix, not a bucket scan), and
    once more after a batch deleted something: a hold placed between the first listing and the
    DeleteObjects (its record written, its legal hold not yet) cannot save a version the batch already
    deleted, so such deletions come back as :attr:`DeletionOutcome.raced`, never as "kept"; the hold
    itself finds its pinned version gone and says so (``recordings hold`` exits non-zero naming it).
    """

    def __init__(
        self,
        store: ObjectStore,
        *,
        check_legal_hold: bool = True,
        concurrency: int = 8,
        bypass_governance: bool = False,
    ) -> None:
        self.store = store
        self.check_legal_hold = check_legal_hold
        #: Only the admin's early delete sets this (the retention sweep never does: what the lock still
        #: protects is not its to delete, and its key is denied the bypass anyway).
        self.bypass_governance = bypass_governance
        self._limit = asyncio.Semaphore(concurrency)

    async def held_call_ids(self) -> set[str]:
        held = set()
        async for obj in self.store.list_prefix(HOLDS_PREFIX):
            name = obj.key[len(HOLDS_PREFIX) :]
            if name.endswith(".json"):
                held.add(name[: -len(".json")])
        return held

    async def why_not(self, call_id: str, keys: Iterable[str] = ()) -> str | None:
        """Why a call's objects may not be deleted (``None``: they may). For single-call paths."""
        if await self.store.stat(hold_key(call_id)) is not None:
            return "hold record"
        for key in keys:
            info = await self.store.stat(key)
            if info is None:
                continue
            held = info.legal_hold if info.legal_hold is not None else await self.store.legal_hold(key)
            if held:
                return "legal hold"
        return None

    async def _legally_held(self, ref: ObjectRef) -> bool:
        async with self._limit:
            try:
                return await self.store.legal_hold(ref.key, version_id=ref.version_id)
            except StorageError as exc:
                if exc.code in {"NoSuchKey", "NoSuchVersion", "MethodNotAllowed"}:
                    return False
                raise

    async def delete(self, refs: Sequence[ObjectRef], *, dry_run: bool = False) -> DeletionOutcome:
        held = await self.held_call_ids()
        allowed, refused = deletion_verdicts(refs, held)
        if self.check_legal_hold and allowed:
            flags = await asyncio.gather(*(self._legally_held(r) for r in allowed))
            refused += [Refusal(r, "legal hold") for r, f in zip(allowed, flags, strict=True) if f]
            allowed = [r for r, f in zip(allowed, flags, strict=True) if not f]
        if dry_run:
            return DeletionOutcome(tuple(allowed), tuple(refused))
        deleted: list[ObjectRef] = []
        for start in range(0, len(allowed), 1000):
            batch = allowed[start : start + 1000]
            failures = await self.store.delete_versions(batch, bypass_governance=self.bypass_governance)
            failed = {(f.ref.key, f.ref.version_id): f for f in failures}
            # A failure the server reported without its VersionId (moto does) cannot be pinned to one
            # version: count every version of that key in the batch as refused. Under-reporting a
            # deletion is safe (the next run sees the key gone); over-reporting one is not.
            unpinned = {f.ref.key: f for f in failures if f.ref.version_id is None}
            for ref in batch:
                failure = failed.get((ref.key, ref.version_id)) or unpinned.get(ref.key)
                if failure is None:
                    deleted.append(ref)
                else:
                    refused.append(Refusal(ref, f"server refused ({failure.code})"))
        raced: list[ObjectRef] = []
        if deleted:
            held_now = await self.held_call_ids()
            for ref in deleted:
                parsed = parse_recording_key(ref.key)
                if parsed is not None and parsed.call_id in held_now:
                    raced.append(ref)
                    log.error("delete event=raced_with_hold key=%s version=%s", ref.key, ref.version_id)
        for r in refused:
            log.info("delete event=refused key=%s reason=%s", r.ref.key, r.reason.replace(" ", "_"))
        return DeletionOutcome(tuple(deleted), tuple(refused), tuple(raced))


# --------------------------------------------------------------------------------------------- policies


#: The audio ``Deny`` covers call ids with up to this many dots (see :func:`policy_documents`); an Asterisk
#: uniqueid has one (``1733212345.42``), a ``systemname`` prefix adds its own.
AUDIO_DENY_MAX_DOTS = 7


def policy_documents(bucket: str) -> dict[str, dict[str, Any]]:
    """The S3 (IAM / MinIO / Ceph RGW) policy of each role in DESIGN.md, for ``bucket``.

    One source of truth: ``docs/s3-policies/*.json`` are these documents for ``kasuhara-recordings``,
    ``kasuhara storage policies`` prints them, and tests/test_policies_enforced.py applies them to a
    server that enforces them. Why the explicit ``Deny`` statements: on Ceph RGW the uploader *owns* the
    objects it writes (its ACL lets it read them and lift their holds unless a policy denies it), and RGW
    grants ``x-amz-bypass-governance-retention`` to anyone not explicitly denied
    ``s3:BypassGovernanceRetention``. The README ("Storage and roles") has the details.

    - ``service`` (``kasuhara serve``): creates recordings and hold records, reads metadata and hold
      records (idempotent retries), switches legal holds ON only; never reads audio, deletes, lifts a hold,
      shortens a lock or bypasses governance. The web console uses these keys too: it reads (never
      writes) the console accounts under ``users/``.
    - ``retention``: lists, reads metadata, hold records and legal-hold states, deletes recording versions
      the object lock no longer protects, writes audit records and its chain head, reads and writes its
      lease and run journals under ``retention/``; no bypass, no holds.
    - ``admin``: everything the CLI does on recordings, holds, audit, the caller list and the console
      accounts (``users/``: read and write, no delete), and alone may
      bypass governance retention (early deletion, with an audit record first); never deletes audit records.
    """
    arn = f"arn:aws:s3:::{bucket}"
    everything = [arn, f"{arn}/*"]

    def objects(*prefixes: str) -> list[str]:
        return [f"{arn}/{p}*" for p in prefixes]

    # Ceph RGW 16 matches ``*`` only up to the FIRST occurrence of what follows it (no backtracking,
    # tested): ``recordings/*.wav`` misses ``…/1733212345.42.wav`` — every Asterisk call id has a dot.
    # One pattern per number of dots before ``.wav`` (AWS's glob: each is a subset of the first).
    audio = [f"{arn}/{RECORDINGS_PREFIX}*{'.*' * dots}.wav" for dots in range(AUDIO_DENY_MAX_DOTS + 1)]
    metadata = [f"{arn}/{RECORDINGS_PREFIX}*.json"]
    chains = "audit-chains/"  # audit.AUDIT_CHAINS_PREFIX: each writer's hash-chain head
    never_lift = {"s3:PutObjectRetention", "s3:BypassGovernanceRetention"}
    never_owner = ["s3:PutObjectAcl", "s3:PutObjectVersionAcl", "s3:PutBucketPolicy", "s3:PutBucketAcl"]
    hold_on_only = [
        {
            # AWS (and servers that evaluate the key) let the call service switch a hold ON, never OFF.
            "Sid": "NoHoldReleaseByCondition",
            "Effect": "Deny",
            "Action": ["s3:PutObjectLegalHold"],
            "Resource": everything,
            "Condition": {"StringNotEquals": {"s3:object-lock-legal-hold": "ON"}},
        },
        {
            # A server that does not supply the key (Ceph RGW 16-18) cannot tell ON from OFF: no hold
            # changes through the legal-hold API at all; holds are then set by the creating PUT.
            "Sid": "NoHoldChangeWhereTheServerCannotTellOnFromOff",
            "Effect": "Deny",
            "Action": ["s3:PutObjectLegalHold"],
            "Resource": everything,
            "Condition": {"Null": {"s3:object-lock-legal-hold": "true"}},
        },
    ]

    service = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "SeeMissingObjectsAs404AndVersions",
                "Effect": "Allow",
                "Action": ["s3:ListBucket", "s3:ListBucketVersions"],
                "Resource": [arn],
            },
            {
                "Sid": "CreateRecordingsAndHoldRecords",
                "Effect": "Allow",
                "Action": ["s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
                "Resource": objects(RECORDINGS_PREFIX, HOLDS_PREFIX),
            },
            {
                "Sid": "ReadMetadataHoldRecordsAndCallerList",
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:GetObjectVersion"],
                "Resource": metadata + objects(HOLDS_PREFIX, CALLERS_PREFIX),
            },
            {
                # The console (`kasuhara web`, with these keys) checks logins; only admins change accounts.
                "Sid": "ReadConsoleAccounts",
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": objects(USERS_PREFIX),
            },
            {
                "Sid": "SwitchHoldsOn",
                "Effect": "Allow",
                "Action": ["s3:PutObjectLegalHold", "s3:GetObjectLegalHold"],
                "Resource": objects(RECORDINGS_PREFIX),
            },
            *hold_on_only,
            {
                "Sid": "NeverReadAudio",
                "Effect": "Deny",
                "Action": ["s3:GetObject", "s3:GetObjectVersion"],
                "Resource": audio,
            },
            {
                # The console (these keys) serves viewers too: the training library is the admin key's.
                "Sid": "NeverReadTraining",
                "Effect": "Deny",
                "Action": ["s3:GetObject", "s3:GetObjectVersion"],
                "Resource": objects(TRAINING_PREFIX, TRAINING_SOURCES_PREFIX),
            },
            {
                "Sid": "NeverDeleteOrWeakenTheLock",
                "Effect": "Deny",
                "Action": sorted({"s3:DeleteObject", "s3:DeleteObjectVersion", *never_lift}) + never_owner,
                "Resource": everything,
            },
        ],
    }
    retention = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "ListAndLocate",
                "Effect": "Allow",
                "Action": ["s3:ListBucket", "s3:ListBucketVersions"],
                "Resource": [arn],
            },
            {
                "Sid": "ReadMetadataAndHolds",
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:GetObjectVersion", "s3:GetObjectLegalHold"],
                "Resource": metadata + objects(HOLDS_PREFIX),
            },
            {
                "Sid": "ReadLegalHoldOfAudio",
                "Effect": "Allow",
                "Action": ["s3:GetObjectLegalHold"],
                "Resource": objects(RECORDINGS_PREFIX),
            },
            {
                # The bucket ARN too: Ceph RGW checks a multi-object delete against the bucket.
                "Sid": "PurgeRecordings",
                "Effect": "Allow",
                "Action": ["s3:DeleteObject", "s3:DeleteObjectVersion"],
                "Resource": [arn, *objects(RECORDINGS_PREFIX)],
            },
            {
                "Sid": "WriteAudit",
                "Effect": "Allow",
                "Action": ["s3:PutObject"],
                "Resource": objects(AUDIT_PREFIX),
            },
            {
                "Sid": "LeaseRunJournalAndAuditChain",
                "Effect": "Allow",
                # GetObjectVersion: the lease reads its epoch object's versions (kasuhara_ari/lease.py).
                "Action": ["s3:GetObject", "s3:GetObjectVersion", "s3:PutObject"],
                "Resource": objects(RETENTION_PREFIX, chains),
            },
            {
                "Sid": "NeverReadAudio",
                "Effect": "Deny",
                "Action": ["s3:GetObject", "s3:GetObjectVersion"],
                "Resource": audio,
            },
            {
                "Sid": "DeleteOnlyRecordings",
                "Effect": "Deny",
                "Action": ["s3:DeleteObject", "s3:DeleteObjectVersion"],
                "Resource": objects(
                    AUDIT_PREFIX,
                    chains,
                    HOLDS_PREFIX,
                    CALLERS_PREFIX,
                    TRAINING_PREFIX,
                    TRAINING_SOURCES_PREFIX,
                ),
            },
            {
                "Sid": "NeverReadTraining",
                "Effect": "Deny",
                "Action": ["s3:GetObject", "s3:GetObjectVersion"],
                "Resource": objects(TRAINING_PREFIX, TRAINING_SOURCES_PREFIX),
            },
            {
                "Sid": "NeverLiftHoldsOrLocks",
                "Effect": "Deny",
                "Action": sorted({"s3:PutObjectLegalHold", *never_lift}) + never_owner,
                "Resource": everything,
            },
        ],
    }
    admin = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "ListAndLocate",
                "Effect": "Allow",
                "Action": ["s3:ListBucket", "s3:ListBucketVersions", "s3:GetBucketObjectLockConfiguration"],
                "Resource": [arn],
            },
            {
                "Sid": "ReadWriteEvidence",
                "Effect": "Allow",
                "Action": [
                    "s3:GetObject",
                    "s3:GetObjectVersion",
                    "s3:PutObject",
                    "s3:AbortMultipartUpload",
                    "s3:ListMultipartUploadParts",
                ],
                "Resource": objects(
                    RECORDINGS_PREFIX,
                    HOLDS_PREFIX,
                    AUDIT_PREFIX,
                    chains,
                    CALLERS_PREFIX,
                    RETENTION_PREFIX,
                    USERS_PREFIX,
                    TRAINING_PREFIX,
                    TRAINING_SOURCES_PREFIX,
                ),
            },
            {
                "Sid": "ReadPublishedSigningKey",
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": objects("keys/"),
            },
            {
                "Sid": "HoldsLocksAndDeletion",
                "Effect": "Allow",
                "Action": [
                    "s3:PutObjectLegalHold",
                    "s3:GetObjectLegalHold",
                    "s3:GetObjectRetention",
                    "s3:PutObjectRetention",
                    "s3:BypassGovernanceRetention",
                    "s3:DeleteObject",
                    "s3:DeleteObjectVersion",
                ],
                "Resource": [arn, *objects(RECORDINGS_PREFIX, HOLDS_PREFIX, CALLERS_PREFIX)],
            },
            {
                "Sid": "NeverDeleteAudit",
                "Effect": "Deny",
                "Action": ["s3:DeleteObject", "s3:DeleteObjectVersion"],
                "Resource": objects(AUDIT_PREFIX, chains),
            },
            {
                "Sid": "NeverChangeOwnershipOrPolicy",
                "Effect": "Deny",
                "Action": never_owner,
                "Resource": everything,
            },
        ],
    }
    return {"service": service, "retention": retention, "admin": admin}
