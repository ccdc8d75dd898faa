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
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol, TypeVar

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
    ) -> PutResult:
        """Stream ``length`` bytes of ``path`` into ``key``. The bytes read must hash to ``sha256``, else
        :class:`ContentChanged` is raised and no object becomes visible."""
        ...

    async def put_bytes(
        self, key: str, data: bytes, *, metadata: Mapping[str, str], content_type: str = "application/json"
    ) -> PutResult: ...

    async def stat(self, key: str) -> ObjectInfo | None:
        """The latest version's size, user metadata and legal hold; ``None`` if there is none."""
        ...

    def put_etag_is_md5(self, length: int) -> bool:
        """Whether a put of ``length`` bytes answers with the MD5 of the content as its ETag (one
        request, no SSE-C): then the server's ETag proves what it stored, without reading it back."""
        ...

    async def get_bytes(self, key: str, *, max_bytes: int = 16 * 1024 * 1024) -> bytes | None:
        """A small object's content (metadata, hold records); ``None`` if missing."""
        ...

    async def get_to_file(self, key: str, path: Path) -> ObjectInfo:
        """Stream an object into ``path`` (through a temporary file beside it)."""
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
    ) -> PutResult:
        """A conditional write: only if ``key`` does not exist (``if_none_match``) or its latest version
        still has the etag ``if_match``; otherwise :class:`PreconditionFailed`."""
        ...

    async def delete_versions(self, refs: Sequence[ObjectRef]) -> list[DeleteFailure]:
        """Raw batch delete. Call it only through :class:`DeletionGuard` (or for a hold record's release)."""
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
        try:
            return await loop.run_in_executor(self._executor, fn)
        except StorageError:
            raise
        except Exception as exc:
            raise _translate(exc, what) from exc

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
    ) -> PutResult:
        def put() -> PutResult:
            with path.open("rb") as fh:
                result = self._client.put_object(
                    self.bucket,
                    key,
                    HashingReader(fh, length, sha256),  # type: ignore[arg-type]  # read() is all it uses
                    length,
                    content_type=content_type,
                    metadata=dict(metadata),
                    sse=self._sse,
                    part_size=self._part_size,
                    num_parallel_uploads=self._parallel_parts,
                )
            return PutResult(key, (result.etag or "").strip('"'), result.version_id)

        return await self._call(put, f"put {key}")

    async def put_bytes(
        self, key: str, data: bytes, *, metadata: Mapping[str, str], content_type: str = "application/json"
    ) -> PutResult:
        def put() -> PutResult:
            result = self._client.put_object(
                self.bucket,
                key,
                io.BytesIO(data),
                len(data),
                content_type=content_type,
                metadata=dict(metadata),
                sse=self._sse,
            )
            return PutResult(key, (result.etag or "").strip('"'), result.version_id)

        return await self._call(put, f"put {key}")

    def put_etag_is_md5(self, length: int) -> bool:
        # minio-py sends up to one part in a single PUT; S3 and MinIO give it the content's MD5 as ETag
        # unless the object is encrypted with a customer key (or a KMS: then the fallback reads it back).
        return self._sse is None and length <= self._part_size

    # -- reads

    async def stat(self, key: str) -> ObjectInfo | None:
        from minio.error import S3Error

        def stat() -> ObjectInfo | None:
            try:
                obj = self._client.stat_object(self.bucket, key, ssec=self._sse)
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

    async def get_bytes(self, key: str, *, max_bytes: int = 16 * 1024 * 1024) -> bytes | None:
        from minio.error import S3Error

        def get() -> bytes | None:
            try:
                response = self._client.get_object(self.bucket, key, ssec=self._sse)
            except S3Error as exc:
                if exc.code in {"NoSuchKey", "NoSuchObject", "MethodNotAllowed"}:
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

    async def get_to_file(self, key: str, path: Path) -> ObjectInfo:
        def get() -> ObjectInfo:
            tmp = path.with_name(f".{path.name}.part")
            response = self._client.get_object(self.bucket, key, ssec=self._sse)
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
            return ObjectInfo(
                key=key,
                size=size,
                etag=(headers.get("etag") or "").strip('"'),
                version_id=headers.get("x-amz-version-id"),
                metadata=user_metadata(headers),
            )

        return await self._call(get, f"get {key}")

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
    ) -> PutResult:
        headers: dict[str, Any] = {"Content-Type": content_type}
        headers.update({f"x-amz-meta-{name}": value for name, value in metadata.items()})
        if self._sse is not None:
            headers.update(self._sse.headers())
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

    async def delete_versions(self, refs: Sequence[ObjectRef]) -> list[DeleteFailure]:
        from minio.deleteobjects import DeleteObject

        by_pair = {(r.key, r.version_id): r for r in refs}
        by_key: dict[str, list[ObjectRef]] = {}
        for r in refs:
            by_key.setdefault(r.key, []).append(r)

        def delete() -> list[DeleteFailure]:
            failures = []
            errors = self._client.remove_objects(
                self.bucket, (DeleteObject(r.key, r.version_id) for r in refs)
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
        def get() -> bool:
            return bool(self._client.is_object_legal_hold_enabled(self.bucket, key, version_id=version_id))

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
        #: False: answer puts with ETags that are not the MD5 (as SSE-KMS does); ``wrong_etags``: claim
        #: MD5 ETags but give wrong ones (a server that stored something else).
        self.md5_etags = True
        self.wrong_etags = False
        self._seq = 0

    def _enter(self, op: str, key: str) -> None:
        self.calls.append((op, key))
        if self.down:
            raise StorageUnavailable(f"{op} {key}: memory store is down")
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
    ) -> PutResult:
        self._enter("put_file", key)
        buf = bytearray()
        with path.open("rb") as fh:
            reader = HashingReader(fh, length, sha256)
            while block := reader.read(CHUNK):
                buf += block
        version = self._add(key, bytes(buf), metadata, content_type)
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

    async def stat(self, key: str) -> ObjectInfo | None:
        self._enter("stat", key)
        v = self._latest(key)
        if v is None or v.data is None:
            return None
        return ObjectInfo(
            key=key,
            size=len(v.data),
            etag=hashlib.md5(v.data, usedforsecurity=False).hexdigest(),
            version_id=v.version_id,
            last_modified=v.last_modified,
            metadata=dict(v.metadata),
            legal_hold=v.legal_hold,
        )

    async def get_bytes(self, key: str, *, max_bytes: int = 16 * 1024 * 1024) -> bytes | None:
        self._enter("get_bytes", key)
        v = self._latest(key)
        if v is None or v.data is None:
            return None
        if len(v.data) > max_bytes:
            raise StorageError(f"get {key}: larger than {max_bytes} bytes", code="TooLarge")
        return v.data

    async def get_to_file(self, key: str, path: Path) -> ObjectInfo:
        self._enter("get_to_file", key)
        v = self._latest(key)
        if v is None or v.data is None:
            raise StorageError(f"get {key}: NoSuchKey", code="NoSuchKey")
        await asyncio.to_thread(path.write_bytes, v.data)
        return ObjectInfo(key=key, size=len(v.data), version_id=v.version_id, metadata=dict(v.metadata))

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
        return PutResult(key, hashlib.md5(data, usedforsecurity=False).hexdigest(), version.version_id)

    async def delete_versions(self, refs: Sequence[ObjectRef]) -> list[DeleteFailure]:
        self._enter("delete_versions", f"{len(refs)} objects")
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

    @classmethod
    def create(
        cls, call_id: str, reason: object, by: object, *, at: str, started_at: datetime | str | None = None
    ) -> HoldRecord:
        """A record from untrusted input: the id is checked, reason and by are cleaned text."""
        started = None
        if started_at is not None:
            started = parse_started_at(started_at).isoformat()
        return cls(
            call_id=safe_call_id(call_id),
            reason=clean_caller_text(reason, max_chars=REASON_MAX_CHARS) or "",
            by=clean_caller_text(by, max_chars=200) or "",
            at=at,
            started_at=started,
        )

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
        )


@dataclass(frozen=True)
class HoldOutcome:
    """What :meth:`RecordingHolds.apply` found and did."""

    record_written: bool
    held_keys: tuple[str, ...]
    #: The metadata object does not exist yet (not uploaded): the hold must be applied again at upload.
    pending_upload: bool


class RecordingHolds:
    """Evidence holds applied directly in S3 (admin CLI, and the uploader's worker).

    Order matters for crash safety: the hold record is written *first* (the deletion guard refuses on it
    alone), then the legal holds; a release removes the legal holds first and the record last. A crash in
    between therefore always leaves the recording protected, and a re-run completes the operation.
    """

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    async def apply(self, record: HoldRecord, keys: RecordingKeys) -> HoldOutcome:
        written = False
        if await self.store.stat(keys.hold) is None:
            await self.store.put_bytes(
                keys.hold,
                record.to_json(),
                metadata={META_CALL_ID: record.call_id},
                content_type="application/json",
            )
            written = True
        held: list[str] = []
        meta = await self.store.stat(keys.metadata)
        audio = await self.store.stat(keys.audio)
        for key, info in ((keys.audio, audio), (keys.metadata, meta)):
            if info is None:
                continue
            if info.legal_hold is not True:
                await self.store.set_legal_hold(key, True)
            held.append(key)
        log.info(
            "hold event=applied call_id=%s record_written=%s held=%d pending_upload=%s",
            record.call_id,
            written,
            len(held),
            meta is None,
        )
        return HoldOutcome(written, tuple(held), pending_upload=meta is None)

    async def release(self, keys: RecordingKeys) -> tuple[str, ...]:
        """Remove the legal holds on both objects, then the hold record. Returns the keys released."""
        released = []
        for key in (keys.audio, keys.metadata):
            info = await self.store.stat(key)
            if info is not None:
                await self.store.set_legal_hold(key, False)
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

    The hold records are listed once per :meth:`delete` call (one small prefix, not a bucket scan). A hold
    placed while a batch is being deleted is still safe: its record is written before its legal hold and
    the server refuses deleting a held version.
    """

    def __init__(self, store: ObjectStore, *, check_legal_hold: bool = True, concurrency: int = 8) -> None:
        self.store = store
        self.check_legal_hold = check_legal_hold
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
            failures = await self.store.delete_versions(batch)
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
        for r in refused:
            log.info("delete event=refused key=%s reason=%s", r.ref.key, r.reason.replace(" ", "_"))
        return DeletionOutcome(tuple(deleted), tuple(refused))


# --------------------------------------------------------------------------------------------- policies


def policy_documents(bucket: str) -> dict[str, dict[str, Any]]:
    """The S3 (IAM / MinIO) policy of each role in DESIGN.md, for ``bucket``.

    - ``service`` (``kasuhara serve``): writes recordings and hold records, sets legal holds, reads back
      what it wrote (HEAD for verification and idempotent retries); cannot delete anything.
    - ``retention``: lists, reads metadata and hold records, deletes recording versions, writes audit
      records, reads and writes its lease and run journals under ``retention/``; cannot touch holds or
      legal holds.
    - ``admin``: everything on recordings, holds and audit records except deleting audit records; no
      bucket configuration and no governance bypass.
    """
    arn = f"arn:aws:s3:::{bucket}"

    def objects(*prefixes: str) -> list[str]:
        return [f"{arn}/{p}*" for p in prefixes]

    service = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "WriteRecordingsAndHolds",
                "Effect": "Allow",
                "Action": [
                    "s3:PutObject",
                    "s3:GetObject",
                    "s3:AbortMultipartUpload",
                    "s3:ListMultipartUploadParts",
                ],
                "Resource": objects(RECORDINGS_PREFIX, HOLDS_PREFIX),
            },
            {
                "Sid": "LegalHolds",
                "Effect": "Allow",
                "Action": ["s3:PutObjectLegalHold", "s3:GetObjectLegalHold"],
                "Resource": objects(RECORDINGS_PREFIX),
            },
            {
                "Sid": "ReadCallerList",
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": objects(CALLERS_PREFIX),
            },
            {
                "Sid": "SeeMissingObjectsAs404",
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": [arn],
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
                "Resource": objects(RECORDINGS_PREFIX, HOLDS_PREFIX),
            },
            {
                "Sid": "PurgeRecordings",
                "Effect": "Allow",
                "Action": ["s3:DeleteObject", "s3:DeleteObjectVersion"],
                "Resource": objects(RECORDINGS_PREFIX),
            },
            {
                "Sid": "WriteAudit",
                "Effect": "Allow",
                "Action": ["s3:PutObject"],
                "Resource": objects(AUDIT_PREFIX),
            },
            {
                "Sid": "LeaseAndRunJournal",
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:PutObject"],
                "Resource": objects(RETENTION_PREFIX),
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
                "Resource": objects(RECORDINGS_PREFIX, HOLDS_PREFIX, AUDIT_PREFIX, CALLERS_PREFIX),
            },
            {
                "Sid": "HoldsAndDeletion",
                "Effect": "Allow",
                "Action": [
                    "s3:PutObjectLegalHold",
                    "s3:GetObjectLegalHold",
                    "s3:DeleteObject",
                    "s3:DeleteObjectVersion",
                ],
                "Resource": objects(RECORDINGS_PREFIX, HOLDS_PREFIX),
            },
        ],
    }
    return {"service": service, "retention": retention, "admin": admin}
