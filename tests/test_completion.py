"""Knowing that MixMonitor closed a recording: the WAV-header rule, the inotify watcher, and both
completion modes against the real Asterisk (the default must not make Asterisk run a command)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import struct
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from kasuhara_ari import recording
from kasuhara_ari.ami import AmiClient
from kasuhara_ari.ari import AriClient
from kasuhara_ari.config import Config
from kasuhara_ari.inotify import IN_Q_OVERFLOW, InotifyUnavailable
from kasuhara_ari.recording import CompletionWatcher, Recorder, wav_header_final


def wav_bytes(samples: int, *, final: bool, odd_pad: bool = False) -> bytes:
    """A 8 kHz mono 16-bit WAV as Asterisk writes it: sizes 0 while recording, filled in on close."""
    data = b"\x01\x00" * samples + (b"\x07" if odd_pad else b"")
    size = len(data)
    riff = 36 + size + (size & 1) if final else 0
    fmt = struct.pack("<HHIIHH", 1, 1, 8000, 16000, 2, 16)
    head = b"RIFF" + struct.pack("<I", riff) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
    pad = b"\x00" if final and size & 1 else b""
    return head + b"data" + struct.pack("<I", size if final else 0) + data + pad


# ------------------------------------------------------------------------------------------ header rule


def test_header_rule(tmp_path: Path) -> None:
    cases = {
        "recording.wav": (wav_bytes(800, final=False), False),  # Asterisk still writing: sizes 0
        "closed.wav": (wav_bytes(800, final=True), True),
        "empty-closed.wav": (wav_bytes(0, final=True), True),  # closed before any audio
        "empty-open.wav": (wav_bytes(0, final=False), False),
        "odd.wav": (wav_bytes(800, final=True, odd_pad=True), True),
        "grown.wav": (wav_bytes(800, final=True) + b"\x00\x00", False),  # written after the header
        "short.wav": (wav_bytes(800, final=True)[:-10], False),
        "text.wav": (b"not a wav at all, just some text", False),
        "tiny.wav": (b"RIFF", False),
    }
    for name, (data, final) in cases.items():
        (tmp_path / name).write_bytes(data)
        assert wav_header_final(tmp_path / name) is final, name
    assert wav_header_final(tmp_path / "missing.wav") is False


# ----------------------------------------------------------------------------- the watcher (real inotify)


@contextlib.asynccontextmanager
async def watching(spool: Path, **kw: Any) -> AsyncIterator[tuple[CompletionWatcher, list[str]]]:
    told: list[str] = []

    async def on_complete(call_id: str) -> None:
        told.append(call_id)

    watcher = CompletionWatcher(spool, on_complete, **kw)
    task = asyncio.create_task(watcher.run())
    await asyncio.sleep(0.2)  # watch registered and the start-up sweep done
    try:
        yield watcher, told
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(check: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_watcher_marks_a_file_when_its_writer_closes_it(tmp_path: Path) -> None:
    async with watching(tmp_path, sweep_interval_s=60) as (watcher, told):
        assert watcher.inotify
        with (tmp_path / "1700000000.1.wav").open("wb") as fh:
            fh.write(wav_bytes(800, final=False))
            fh.flush()
            await asyncio.sleep(0.3)
            assert not (tmp_path / "1700000000.1.done").exists()  # open: not complete
            fh.seek(0)
            fh.write(wav_bytes(800, final=True))
        await until(lambda: (tmp_path / "1700000000.1.done").exists(), 1.0)
        await until(lambda: told == ["1700000000.1"], 1.0)
        # Reading a file (the uploader, an admin) is not a close after writing.
        (tmp_path / "1700000000.1.done").unlink()
        (tmp_path / "1700000000.1.wav").read_bytes()
        await asyncio.sleep(0.3)
        assert not (tmp_path / "1700000000.1.done").exists()
        assert told == ["1700000000.1"]


async def test_watcher_ignores_unsafe_names_and_other_files(tmp_path: Path) -> None:
    async with watching(tmp_path, sweep_interval_s=60) as (_watcher, told):
        for name in ("a b.wav", ".hidden.wav", "x;touch y.wav", "1700000000.2.json", "notes.txt"):
            (tmp_path / name).write_bytes(wav_bytes(10, final=True))
        await asyncio.sleep(0.5)
        assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".done") == []
        assert told == []


async def test_start_up_sweep_finds_files_closed_while_nobody_watched(tmp_path: Path) -> None:
    (tmp_path / "1.1.wav").write_bytes(wav_bytes(800, final=True))  # closed while the app was down
    (tmp_path / "2.2.wav").write_bytes(wav_bytes(800, final=False))  # still being recorded
    (tmp_path / "3.3.wav").write_bytes(wav_bytes(800, final=True))
    (tmp_path / "3.3.done").write_bytes(b"")  # marked already
    async with watching(tmp_path, sweep_interval_s=60) as (_watcher, told):
        await until(lambda: (tmp_path / "1.1.done").exists())
        await until(lambda: bool(told))  # told after the marker is written (back from the thread)
        assert not (tmp_path / "2.2.done").exists()
        assert told == ["1.1"]


async def test_without_inotify_the_periodic_sweep_marks(tmp_path: Path, monkeypatch: Any) -> None:
    def no_inotify(*_a: Any, **_k: Any) -> None:
        raise InotifyUnavailable("not here")

    monkeypatch.setattr(recording, "DirectoryWatch", no_inotify)
    async with watching(tmp_path, sweep_interval_s=0.3) as (watcher, told):
        assert not watcher.inotify
        (tmp_path / "4.4.wav").write_bytes(wav_bytes(800, final=True))
        await until(lambda: (tmp_path / "4.4.done").exists(), 2.0)
        await until(lambda: bool(told))
        assert told == ["4.4"]


def test_an_inotify_overflow_asks_for_a_sweep(tmp_path: Path) -> None:
    class Overflowed:
        def read(self) -> list[tuple[int, str]]:
            return [(IN_Q_OVERFLOW, "")]

    watcher = CompletionWatcher(tmp_path)
    watcher._sweep_due = False
    watcher._readable(Overflowed())  # type: ignore[arg-type]
    assert watcher._sweep_due


# ------------------------------------------------------------------------------------ the real Asterisk


@contextlib.asynccontextmanager
async def local_channel(cfg: Config) -> AsyncIterator[tuple[AriClient, str, str]]:
    """A Local channel in a Stasis app of this test (its other half runs Echo): (ari, id, name)."""
    app = f"kasuhara-t{uuid.uuid4().hex[:10]}"
    ari = AriClient(cfg.ari.url, cfg.ari.username, cfg.ari.password, app)
    started: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def listen() -> None:
        async for event in ari.events():
            if event.get("type") in ("KasuharaAriConnected", "StasisStart"):
                started.put_nowait(event)

    listener = asyncio.create_task(listen())
    try:
        await asyncio.wait_for(started.get(), 5)
        chan_id = f"t-{uuid.uuid4().hex[:12]}"
        await ari.originate("Local/echo@kasuhara-in", channel_id=chan_id)
        event = await asyncio.wait_for(started.get(), 5)
        await ari.answer(chan_id)
        yield ari, chan_id, str(event["channel"]["name"])
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        await ari.aclose()


async def record_and_hang_up(cfg: Config, recorder: Recorder, call_id: str) -> Path:
    """Record a Local channel for a second through AMI, hang it up; the file once Asterisk closed it."""
    async with local_channel(cfg) as (ari, chan_id, name):
        paths = await recorder.start(name, call_id)
        await ari.play(chan_id, "tone:ring")  # something to record
        await asyncio.sleep(1.0)
        await ari.hangup(chan_id)
    await until(lambda: wav_header_final(paths.audio), 5.0)
    return paths.audio


@pytest.fixture
async def ami(asterisk: Config) -> AsyncIterator[AmiClient]:
    client = AmiClient(asterisk.ami.host, asterisk.ami.port, asterisk.ami.username, asterisk.ami.secret)
    await client.wait_ready(5)
    yield client
    client.close()


@pytest.fixture
def own_spool(asterisk: Config) -> Iterator[tuple[str, Path]]:
    """A spool directory of this test's own (as Asterisk sees it, as this host reads it): in the shared
    one, the completion watcher of any call service running meanwhile (another test's) would mark this
    test's files, and a marker this test expects could come from that watcher instead of from Asterisk."""
    name = f"completion-{uuid.uuid4().hex[:10]}"
    host = asterisk.recording.host_dir / name
    host.mkdir(mode=0o777)
    try:
        yield f"{asterisk.recording.asterisk_dir}/{name}", host
    finally:
        shutil.rmtree(host, ignore_errors=True)


@pytest.mark.integration
async def test_watch_mode_asterisk_runs_no_command_and_the_watcher_marks(
    asterisk: Config, ami: AmiClient, own_spool: tuple[str, Path]
) -> None:
    asterisk_dir, spool = own_spool
    recorder = Recorder(ami, asterisk_dir, spool, completion="watch")
    first, second = f"t{uuid.uuid4().hex[:10]}.1", f"t{uuid.uuid4().hex[:10]}.2"
    files = [spool / f"{cid}{ext}" for cid in (first, second) for ext in (".wav", ".done")]
    try:
        audio = await record_and_hang_up(asterisk, recorder, first)
        await asyncio.sleep(1.0)
        # Closed by Asterisk (final header), and nothing else: no completion command ran.
        assert not (spool / f"{first}.done").exists()
        assert audio.stat().st_size > 44 + 8000  # a second of 8 kHz 16-bit audio, at least half of it
        async with watching(spool, sweep_interval_s=60) as (_watcher, told):
            # The start-up sweep finds the file Asterisk closed while nobody watched ...
            await until(lambda: first in told)
            assert (spool / f"{first}.done").exists()
            # ... and inotify the next one the moment Asterisk closes it.
            audio2 = await record_and_hang_up(asterisk, recorder, second)
            await until(lambda: second in told, 1.0)
            assert wav_header_final(audio2)
    finally:
        for path in files:
            path.unlink(missing_ok=True)


@pytest.mark.integration
async def test_command_mode_asterisk_writes_the_marker(
    asterisk: Config, ami: AmiClient, own_spool: tuple[str, Path]
) -> None:
    asterisk_dir, spool = own_spool
    recorder = Recorder(ami, asterisk_dir, spool, completion="command")
    call_id = f"t{uuid.uuid4().hex[:10]}.1"
    try:
        audio = await record_and_hang_up(asterisk, recorder, call_id)
        await until(lambda: (spool / f"{call_id}.done").exists(), 5.0)
        assert wav_header_final(audio)
    finally:
        for ext in (".wav", ".done"):
            (spool / f"{call_id}{ext}").unlink(missing_ok=True)
