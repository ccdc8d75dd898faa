"""Shared helpers for the uploader tests: spool recordings as Asterisk and the call service leave them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from kasuhara_ari.config import Config, RecordingConfig, StorageConfig
from kasuhara_ari.uploader import Uploader

STARTED = "2025-01-02T03:04:05.000+09:00"  # UTC day 2025-01-01


def spool_config(spool: Path, queue: Path | None = None, **storage: Any) -> Config:
    return replace(
        Config(),
        recording=RecordingConfig(asterisk_dir=str(spool)),
        storage=StorageConfig(queue_dir=str(queue) if queue else "", **storage),
    )


def metadata(call_id: str, **over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema": "kasuhara.recording/1",
        "call_id": call_id,
        "direction": "inbound",
        "caller": {"number": "0312345678", "name": "山田 太郎"},
        "target": "PJSIP/agent",
        "agent": "PJSIP/agent",
        "started_at": STARTED,
        "answered_at": None,
        "ended_at": None,
        "duration_s": 12.5,
        "notice_played": True,
        "audio": {"format": "wav", "expected": True},
        "escalations": [],
        "flags": [],
        "hold": None,
    }
    doc.update(over)
    return doc


def wav_bytes(payload_len: int, *, seed: int = 1) -> bytes:
    """A small valid 8 kHz 16-bit mono WAV with deterministic pseudo-random samples."""
    import random
    import struct

    rnd = random.Random(seed)
    payload = rnd.randbytes(payload_len)
    header = b"RIFF" + struct.pack("<I", 36 + payload_len) + b"WAVEfmt "
    header += struct.pack("<IHHIIHH", 16, 1, 1, 8000, 16000, 2, 16) + b"data" + struct.pack("<I", payload_len)
    return header + payload


def put_recording(
    spool: Path,
    call_id: str,
    *,
    audio: bytes | None = b"",
    done: bool = True,
    meta: dict[str, Any] | bool | None = True,
    age_s: float = 0.0,
) -> None:
    """Lay out a call's files: ``audio=None`` means no .wav at all; ``meta=False`` no .json."""
    spool.mkdir(parents=True, exist_ok=True)
    paths = []
    if audio is not None:
        (spool / f"{call_id}.wav").write_bytes(audio)
        paths.append(spool / f"{call_id}.wav")
    if done:
        (spool / f"{call_id}.done").touch()
        paths.append(spool / f"{call_id}.done")
    if meta is not False and meta is not None:
        doc = metadata(call_id) if meta is True else meta
        (spool / f"{call_id}.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
        paths.append(spool / f"{call_id}.json")
    if age_s:
        past = time.time() - age_s
        for p in paths:
            os.utime(p, (past, past))


async def run_until_empty(uploader: Uploader, timeout: float = 20.0) -> None:
    task = asyncio.create_task(uploader.run())
    try:
        await asyncio.wait_for(uploader.wait_empty(), timeout)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def spool_names(spool: Path) -> list[str]:
    return sorted(p.name for p in spool.iterdir() if not p.name.startswith(".kasuhara-uploader"))


async def arrive_while_running(
    spool: Path, uploader: Uploader, recordings: dict[str, bytes], timeout: float = 20.0
) -> None:
    """Recordings that appear (and are notified, as the call service does) while the uploader runs, after
    its first scan: new to it, not left from before. Returns once the spool is empty."""
    task = asyncio.create_task(uploader.run())
    try:
        await asyncio.sleep(0.2)
        for call_id, audio in recordings.items():
            put_recording(spool, call_id, audio=audio)
            await uploader.notify(call_id)
        await asyncio.wait_for(uploader.wait_empty(), timeout)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
