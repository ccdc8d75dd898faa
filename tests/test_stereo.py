"""Stereo recording (``recording.mode = "stereo"``) without Asterisk: MixMonitor's options, the metadata,
the header fix for what MixMonitor's ``D`` writes (interleaved samples under a 1-channel header), the
uploader storing the fixed file, and the console's waveform reading it. (Real SIP: test_stereo_sip.py.)"""

from __future__ import annotations

import hashlib
import json
import struct
import wave
from pathlib import Path
from typing import Any

import pytest
from test_uploader import make_uploader, stored_metadata
from uploader_helpers import STARTED, metadata, put_recording, run_until_empty

from kasuhara_ari.config import Config, ConfigError, load
from kasuhara_ari.events import MemoryEvents
from kasuhara_ari.recording import CallRecord, Recorder, fix_stereo_header
from kasuhara_ari.storage import MemoryStore, recording_keys
from kasuhara_ari.web.waveform import parse_wav_header


def as_mixmonitor_d_writes(frames: list[tuple[int, int]], rate: int = 8000) -> bytes:
    """What Asterisk 22.10.1 writes with MixMonitor ``D`` into a .wav (measured): the frames interleaved
    (read, write), but a header of one channel at ``rate``, 2 bytes per frame."""
    data = b"".join(struct.pack("<hh", a, b) for a, b in frames)
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return (
        b"RIFF"
        + struct.pack("<I", 36 + len(data))
        + b"WAVEfmt "
        + struct.pack("<I", 16)
        + fmt
        + (b"data" + struct.pack("<I", len(data)) + data)
    )


FRAMES = [(1000 + i, -1000 - i) for i in range(8000)]  # one second


class _Ami:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    async def mixmonitor(self, channel: str, file: str, *, options: str = "", command: str = "") -> None:
        self.calls.append((channel, file, options))

    async def stop_mixmonitor(self, channel: str) -> None:
        pass


async def test_stereo_mode_asks_mixmonitor_for_d_and_mixed_does_not(tmp_path: Path) -> None:
    for mode, expect in (("mixed", "i(KASUHARA_MIXMON_ID)"), ("stereo", "i(KASUHARA_MIXMON_ID)D")):
        ami = _Ami()
        recorder = Recorder(ami, "/spool", tmp_path, mode=mode)
        await recorder.start("PJSIP/caller-1", "c1")
        assert ami.calls == [("PJSIP/caller-1", "/spool/c1.wav", expect)]
        assert recorder.channels == (2 if mode == "stereo" else 1)
    with pytest.raises(ValueError, match="mode"):
        Recorder(_Ami(), "/spool", tmp_path, mode="quad")


def test_the_config_knows_the_modes(tmp_path: Path) -> None:
    assert Config().recording.mode == "mixed"
    empty = tmp_path / "k.toml"
    empty.write_text("")
    assert load(empty, env={"KASUHARA_RECORDING__MODE": "stereo"}).recording.mode == "stereo"
    with pytest.raises(ConfigError, match=r"recording\.mode"):
        load(empty, env={"KASUHARA_RECORDING__MODE": "surround"})


def test_metadata_says_stereo_only_when_it_is_and_survives_a_handover() -> None:
    rec = CallRecord("c1", "inbound", "0312345678", "x", "PJSIP/agent", "2025-01-01T00:00:00+00:00")
    assert rec.as_dict()["audio"] == {"format": "wav", "expected": False}  # mixed: exactly as before
    rec.channels = 2
    audio = rec.as_dict()["audio"]
    assert audio["channels"] == 2 and audio["layout"] == ["caller", "agent"]
    assert CallRecord.from_dict(rec.as_dict()).channels == 2


def test_the_header_fix_makes_the_file_what_it_is(tmp_path: Path) -> None:
    path = tmp_path / "c.wav"
    path.write_bytes(as_mixmonitor_d_writes(FRAMES))
    with wave.open(str(path)) as w:  # as written: twice as long, one channel
        assert (w.getnchannels(), w.getnframes()) == (1, 16000)
    assert fix_stereo_header(path) is True
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getframerate(), w.getnframes()) == (2, 8000, 8000)
        raw = w.readframes(2)
    assert struct.unpack("<hhhh", raw) == (1000, -1000, 1001, -1001)  # channel 1 = read, 2 = write
    before = path.read_bytes()
    assert fix_stereo_header(path) is False and path.read_bytes() == before  # idempotent
    path.write_bytes(b"not a wav at all")
    with pytest.raises(ValueError, match="not a WAV"):
        fix_stereo_header(path)


async def test_the_uploader_stores_a_stereo_recording_as_stereo(tmp_path: Path) -> None:
    store = MemoryStore()
    raw = as_mixmonitor_d_writes(FRAMES)
    doc: dict[str, Any] = metadata("c-st", audio={"format": "wav", "expected": True, "channels": 2})
    put_recording(tmp_path, "c-st", audio=raw, meta=doc)
    put_recording(tmp_path, "c-mono", audio=as_mixmonitor_d_writes(FRAMES))  # not stereo: left alone
    await run_until_empty(make_uploader(tmp_path, store, MemoryEvents()))
    keys = recording_keys("c-st", STARTED)
    stored = store.objects[keys.audio][-1].data
    assert stored is not None
    fmt = parse_wav_header(stored, len(stored))  # the console's waveform reads it as 1 s of stereo
    assert fmt is not None and fmt.channels == 2 and fmt.duration_s == pytest.approx(1.0)
    meta = stored_metadata(store, keys.metadata)
    assert meta["audio"]["sha256"] == hashlib.sha256(stored).hexdigest()  # hashed after the fix
    mono = store.objects[recording_keys("c-mono", STARTED).audio][-1].data
    assert mono == as_mixmonitor_d_writes(FRAMES)
    assert json.loads(json.dumps(meta))["audio"]["channels"] == 2
