"""Seed recordings into a bucket exactly as the uploader stores them (audio, then metadata with the
audio's sha256 filled in, the same object metadata), with any ``started_at`` — for retention, search,
export and admin CLI tests. Also: running the CLI against a test bucket."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from uploader_helpers import metadata, wav_bytes

from kasuhara_ari.storage import (
    META_AUDIO_SHA256,
    META_CALL_ID,
    META_SHA256,
    NO_AUDIO,
    HoldRecord,
    ObjectStore,
    RecordingHolds,
    RecordingKeys,
    recording_keys,
)
from kasuhara_ari.uploader import AudioResult, encode_metadata, final_metadata

from s3_fixture import S3Target

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Seeded:
    call_id: str
    started_at: datetime
    keys: RecordingKeys
    audio: bytes | None


def iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds")


async def seed(
    store: ObjectStore,
    call_id: str,
    started_at: datetime,
    *,
    audio: bytes | None = None,
    with_audio: bool = True,
    caller: str = "03-1234-5678",
    caller_name: str = "山田 太郎",
    direction: str = "inbound",
    flags: Iterable[str] = (),
    timeline: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> Seeded:
    keys = recording_keys(call_id, started_at)
    fields: dict[str, Any] = {
        "started_at": iso(started_at),
        "ended_at": iso(started_at + timedelta(seconds=42)),
        "duration_s": 42.0,
        "direction": direction,
        "caller": {"number": caller, "name": caller_name},
        "flags": list(flags),
        "timeline": timeline
        if timeline is not None
        else [
            {"event": "started", "at": iso(started_at), "direction": direction},
            {"event": "notice_played", "at": iso(started_at + timedelta(seconds=5))},
            {"event": "ended", "at": iso(started_at + timedelta(seconds=42)), "duration_s": 42.0},
        ],
    }
    # ``extra`` may also replace the defaults above (ended_at, duration_s, caller, ...).
    doc = metadata(call_id, **{**fields, **extra})
    data = (
        (audio if audio is not None else wav_bytes(2000, seed=hash(call_id) & 0xFFFF)) if with_audio else None
    )
    if data is not None:
        sha = hashlib.sha256(data).hexdigest()
        await store.put_bytes(
            keys.audio,
            data,
            metadata={META_SHA256: sha, META_CALL_ID: call_id, "audio-status": "stored"},
            content_type="audio/wav",
        )
        result = AudioResult("stored", keys.audio, len(data), sha)
    else:
        sha = None
        result = AudioResult("not_recorded")
    final = final_metadata(doc, keys, result, None)
    encoded = encode_metadata(final)
    await store.put_bytes(
        keys.metadata,
        encoded,
        metadata={
            META_SHA256: hashlib.sha256(encoded).hexdigest(),
            META_AUDIO_SHA256: sha or NO_AUDIO,
            META_CALL_ID: call_id,
            "orphaned": "no",
        },
        content_type="application/json",
    )
    return Seeded(call_id, started_at, keys, data)


async def seed_many(
    store: ObjectStore, specs: Iterable[tuple[str, datetime]], *, concurrency: int = 16
) -> None:
    """Many plain recordings, ``concurrency`` at a time."""
    limit = asyncio.Semaphore(concurrency)

    async def one(cid: str, t: datetime) -> None:
        async with limit:
            await seed(store, cid, t, audio=b"RIFF" + cid.encode())

    await asyncio.gather(*(one(cid, t) for cid, t in specs))


async def hold(store: ObjectStore, s: Seeded, reason: str = "threats") -> None:
    """The full hold as the service and the admin place it: record first, then both legal holds."""
    record = HoldRecord.create(s.call_id, reason, "test", at=iso(datetime.now(UTC)), started_at=s.started_at)
    await RecordingHolds(store).apply(record, s.keys)


async def legal_hold_only(store: ObjectStore, s: Seeded) -> None:
    """A legal hold set by hand on the objects, with no hold record."""
    await store.set_legal_hold(s.keys.audio, True)
    await store.set_legal_hold(s.keys.metadata, True)


async def live_keys(store: ObjectStore, prefix: str = "recordings/") -> set[str]:
    return {o.key async for o in store.list_prefix(prefix)}


async def all_versions(store: ObjectStore, prefix: str = "") -> set[tuple[str, str | None, bool]]:
    return {(o.key, o.version_id, o.is_delete_marker) async for o in store.list_prefix(prefix, versions=True)}


async def read_json(store: ObjectStore, key: str) -> Any:
    data = await store.get_bytes(key, max_bytes=64 * 1024 * 1024)
    assert data is not None, f"{key} does not exist"
    return json.loads(data)


def cli_env(target: S3Target, bucket: str, **extra: str) -> dict[str, str]:
    """The environment for a ``kasuhara`` CLI run against a test bucket (admin = the test keys)."""
    env = {k: v for k, v in os.environ.items() if not (k.startswith("KASUHARA_") and "__" in k)}
    env.pop("KASUHARA_CONFIG", None)
    env.update(
        {
            "KASUHARA_STORAGE__ENDPOINT": target.endpoint,
            "KASUHARA_STORAGE__ACCESS_KEY": target.access_key,
            "KASUHARA_STORAGE__SECRET_KEY": target.secret_key,
            "KASUHARA_STORAGE__REGION": target.region,
            "KASUHARA_STORAGE__BUCKET": bucket,
            "KASUHARA_ADMIN__ACCESS_KEY": target.access_key,
            "KASUHARA_ADMIN__SECRET_KEY": target.secret_key,
            "KASUHARA_ADMIN__NAME": "test-admin",
            "KASUHARA_MQTT__ENABLED": "false",
            "KASUHARA_GENERAL__TIMEZONE": "Asia/Tokyo",
        }
    )
    env.update(extra)
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "kasuhara_ari.cli", *args]


def run_cli(env: Mapping[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_command(*args),
        env=dict(env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
