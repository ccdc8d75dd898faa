"""Audio through the console over HTTP Range: one ``play`` grant per session and item (recording or
training clip), then the bytes streamed from S3 block by block, never held whole. The recording page and
the training library serve their audio through this one path."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from ..storage import StorageError
from .playback import PlayGrant, PlayGrants, Unsatisfiable, parse_range

FILE_BLOCK = 256 * 1024


@runtime_checkable
class RangeReader(Protocol):
    """A store that can stream part of one object version (MinioStore, MemoryStore)."""

    def read_range(
        self, key: str, offset: int, length: int | None, *, version_id: str | None = None
    ) -> AsyncIterator[bytes]: ...


class ClosingStream(StreamingResponse):
    """A streamed body whose generator is closed however the response ends (a client that goes away in
    the middle of a seek must not leave an S3 response or a temporary file behind)."""

    def __init__(self, blocks: AsyncGenerator[bytes, None], **kw: Any) -> None:
        super().__init__(blocks, **kw)
        self._blocks = blocks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._blocks.aclose()


async def blocks(
    reader: RangeReader, key: str, offset: int, length: int | None, version_id: str | None
) -> AsyncGenerator[bytes, None]:
    it = reader.read_range(key, offset, length, version_id=version_id)
    try:
        async for block in it:
            yield block
    finally:
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            await aclose()


async def then(first: bytes, rest: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
    try:
        if first:
            yield first
        async for block in rest:
            yield block
    finally:
        await rest.aclose()


async def file_blocks(path: Path, cleanup: Path) -> AsyncGenerator[bytes, None]:
    """A file in blocks read in a thread; ``cleanup`` (its temporary directory) is removed at the end."""
    try:
        fh = await asyncio.to_thread(path.open, "rb")
        try:
            while block := await asyncio.to_thread(fh.read, FILE_BLOCK):
                yield block
        finally:
            fh.close()
    finally:
        shutil.rmtree(cleanup, ignore_errors=True)


class Granting:
    """One grant per (session, item) even when a browser opens two requests at once: the second waits
    for the first's grant instead of writing a second ``play`` record."""

    def __init__(self, grants: PlayGrants) -> None:
        self.grants = grants
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def get(
        self, session_id: str, item: str, make: Callable[[], Awaitable[PlayGrant | Response]]
    ) -> PlayGrant | Response:
        key = (session_id, item)
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                grant = self.grants.get(session_id, item)
                if grant is None:
                    return await make()
                return grant
        finally:
            if not lock.locked():
                self._locks.pop(key, None)


async def ranged_audio(
    request: Request,
    reader: RangeReader,
    grant: PlayGrant,
    etag: str,
    failed: Callable[[StorageError], Response],
) -> Response:
    """The granted audio, whole (200) or the part the Range header asks (206; 416 when it cannot be
    served); an If-Range naming other bytes gets the whole of these. ``etag`` names the bytes."""
    size, playable = grant.size, grant.playable
    headers = {
        "accept-ranges": "bytes",
        "cache-control": "private, no-store",
        "etag": etag,
        "content-type": "audio/wav",
    }
    try:
        wanted = parse_range(request.headers.get("range"), size)
    except Unsatisfiable:
        return Response(status_code=416, headers={**headers, "content-range": f"bytes */{size}"})
    if_range = request.headers.get("if-range")
    if wanted is not None and if_range is not None and if_range.strip() != etag:
        wanted = None  # another version than the one the client has: the whole of this one
    start, end = wanted if wanted is not None else (0, size - 1)
    length = max(0, end - start + 1)
    status = 206 if wanted is not None else 200
    headers["content-length"] = str(length)
    if wanted is not None:
        headers["content-range"] = f"bytes {start}-{end}/{size}"
    if request.method == "HEAD" or length == 0:
        return Response(b"", status_code=status, headers=headers)
    rest = blocks(reader, playable.key, start, length, playable.version_id)
    try:
        first = await anext(rest, b"")
    except StorageError as exc:
        return failed(exc)
    return ClosingStream(then(first, rest), status_code=status, headers=headers)
