"""The training library on the in-memory store (real sox): clips cut from held or flagged calls only, to
the sample; no caller identity in a clip's metadata; the source link only under training-sources/;
anonymisation shifts the caller's channel and leaves the agent's; roles and audit; retention, evidence
search and the source's deletion never touch a clip. (Real SIP and S3: tests/test_training_sip.py.)"""

from __future__ import annotations

import io
import json
import math
import struct
import wave
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kasuhara_ari.audit import ACTIONS, AuditLog
from kasuhara_ari.events import MemoryEvents
from kasuhara_ari.evidence.desk import DeskRefused, EvidenceDesk, Principal
from kasuhara_ari.retention import RetentionSweep, cutoff_for
from kasuhara_ari.search import Filters
from kasuhara_ari.storage import MemoryStore
from kasuhara_ari.training.clipper import parse_offset, shape_of
from kasuhara_ari.training.library import TrainingLibrary, clip_keys
from kasuhara_ari.web.i18n import MESSAGES

from audio import tone_amplitude
from recordings_seed import Seeded, hold, seed

ADMIN = Principal("alice", "admin")
SUPERVISOR = Principal("dave", "supervisor")
VIEWER = Principal("carol", "viewer")
T0 = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
CALLER_NUMBER, CALLER_NAME = "0312345678", "山田 太郎"


def stereo_wav(seconds: float = 10.0, caller_hz: float = 700.0, agent_hz: float = 1300.0) -> bytes:
    """A stereo recording as the uploader stores it: channel 1 the caller's tone, channel 2 the agent's."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        frames = bytearray()
        for i in range(int(seconds * 8000)):
            a = int(8000 * math.sin(2 * math.pi * caller_hz * i / 8000))
            b = int(8000 * math.sin(2 * math.pi * agent_hz * i / 8000))
            frames += struct.pack("<hh", a, b)
        w.writeframes(bytes(frames))
    return out.getvalue()


def channels(data: bytes) -> tuple[int, list[list[int]]]:
    with wave.open(io.BytesIO(data), "rb") as w:
        n = w.getnchannels()
        raw = w.readframes(w.getnframes())
    samples = list(struct.unpack(f"<{len(raw) // 2}h", raw))
    return n, [samples[c::n] for c in range(n)]


def dominant_hz(samples: list[int], lo: float = 300.0, hi: float = 1800.0, step: float = 5.0) -> float:
    """The strongest frequency between ``lo`` and ``hi`` (a pitch estimate of a steady tone)."""
    window = samples[:4000]
    best, best_hz = -1.0, lo
    hz = lo
    while hz <= hi:
        amp = tone_amplitude(window, 8000, hz)
        if amp > best:
            best, best_hz = amp, hz
        hz += step
    return best_hz


def desk_for(store: MemoryStore, principal: Principal) -> EvidenceDesk:
    return EvidenceDesk(store, MemoryEvents(), principal)


async def flagged_call(store: MemoryStore, *, held: bool = False, mono: bool = False, n: int = 0) -> Seeded:
    t = T0 + timedelta(minutes=n)
    audio = stereo_wav() if not mono else None
    s = await seed(
        store,
        f"{int(t.timestamp())}.{n}",
        t,
        audio=audio,
        caller=CALLER_NUMBER,
        caller_name=CALLER_NAME,
        flags=["harassment"],
    )
    if held:
        await hold(store, s)
    return s


async def audit_actions(store: MemoryStore) -> list[tuple[str, str, dict[str, object], dict[str, object]]]:
    out = []
    for key in sorted(store.objects):
        if key.startswith("audit/"):
            data = await store.get_bytes(key)
            assert data is not None
            r = json.loads(data)
            out.append((r["action"], r["result"], r["target"], r["details"]))
    return out


def test_times_on_the_command_line() -> None:
    assert parse_offset("00:45") == 45.0
    assert parse_offset("02:10") == 130.0
    assert parse_offset("1:02:03.5") == 3723.5
    assert parse_offset("75") == 75.0
    for bad in ("", "1:2:3:4", "00:75", "-5", "1e3", "00:45; rm -rf /"):
        with pytest.raises(ValueError, match=r"time like|below 60"):
            parse_offset(bad)


def test_every_training_action_is_audited_and_labelled() -> None:
    for action in ("training_add", "training_list", "training_play", "training_export"):
        assert action in ACTIONS
        for lang in MESSAGES:
            assert MESSAGES[lang].get(f"act_{action}"), (lang, action)


async def test_a_clip_of_a_flagged_call_is_exact_and_names_no_caller(tmp_path: Path) -> None:
    store = MemoryStore()
    s = await flagged_call(store)
    library = TrainingLibrary(desk_for(store, SUPERVISOR))
    clip = await library.add(
        s.call_id, 2.25, 7.5, title="怒鳴り続ける顧客", note="言い返さない", reason="研修"
    )
    assert clip.duration_s == pytest.approx(5.25, abs=0.001) and clip.channels == 2
    audio_key, meta_key, source_key = clip_keys(clip.clip_id)
    wav = await store.get_bytes(audio_key)
    assert wav is not None
    n, chans = channels(wav)
    assert n == 2 and len(chans[0]) == 5.25 * 8000
    # Nothing in the clip's metadata names the caller or the call.
    meta_raw = await store.get_bytes(meta_key)
    assert meta_raw is not None
    meta_text = meta_raw.decode()
    for secret in (CALLER_NUMBER, CALLER_NAME, "山田", s.call_id, s.started_at.isoformat()[:16]):
        assert secret not in meta_text, secret
    meta = json.loads(meta_raw)
    assert meta["schema"] == "kasuhara.training/1" and meta["created_by"] == "dave"
    assert meta["title"] == "怒鳴り続ける顧客" and meta["note"] == "言い返さない"
    assert clip.clip_id not in s.call_id and not clip.clip_id.startswith(s.call_id[:6])
    # The source link: only under training-sources/.
    link = json.loads((await store.get_bytes(source_key)) or b"{}")
    assert link["call_id"] == s.call_id and link["from_s"] == 2.25 and link["to_s"] == 7.5
    assert link["audio_key"] == s.keys.audio
    # Audited: first the start, then the outcome; the call id only in the record's details (MQTT
    # subscribers get the target as the event's subject).
    records = [r for r in await audit_actions(store) if r[0] == "training_add"]
    assert [r[1] for r in records] == ["started", "done"]
    assert all(r[2] == {"clip_id": clip.clip_id} for r in records)
    assert records[0][3]["source"]["call_id"] == s.call_id  # type: ignore[index]


async def test_only_held_or_flagged_calls_become_clips() -> None:
    store = MemoryStore()
    plain = await seed(store, f"{int(T0.timestamp())}.7", T0, audio=stereo_wav(2.0))
    library = TrainingLibrary(desk_for(store, ADMIN))
    with pytest.raises(DeskRefused, match="neither held nor flagged"):
        await library.add(plain.call_id, 0, 1, title="x")
    held = await seed(
        store, f"{int(T0.timestamp()) + 60}.8", T0 + timedelta(minutes=1), audio=stereo_wav(2.0)
    )
    await hold(store, held)
    assert (await library.add(held.call_id, 0, 1, title="held")).duration_s == 1.0
    assert not [k for k in store.objects if k.startswith("training/") and plain.call_id in k]


async def test_bad_ranges_titles_and_roles_are_refused() -> None:
    store = MemoryStore()
    s = await flagged_call(store)
    library = TrainingLibrary(desk_for(store, ADMIN))
    with pytest.raises(ValueError, match="not inside"):
        await library.add(s.call_id, 5, 11, title="past the end")
    with pytest.raises(ValueError, match="before"):
        await library.add(s.call_id, 5, 5, title="empty")
    with pytest.raises(ValueError, match="caller's number"):
        await library.add(s.call_id, 0, 1, title="call from 03-1234-5678")
    with pytest.raises(ValueError, match="caller's name"):
        await library.add(s.call_id, 0, 1, title="x", note="山田 太郎 again")
    viewer = TrainingLibrary(desk_for(store, VIEWER))
    with pytest.raises(DeskRefused, match="supervisor or admin"):
        await viewer.add(s.call_id, 0, 1, title="x")
    with pytest.raises(DeskRefused, match="supervisor or admin"):
        await viewer.clips()
    with pytest.raises(DeskRefused, match="supervisor or admin"):
        await viewer.play("tc-0123456789abcdef", Path("/nonexistent"))
    with pytest.raises(DeskRefused, match="supervisor or admin"):
        await viewer.export(["tc-0123456789abcdef"], Path("/nonexistent"))
    assert not [k for k in store.objects if k.startswith("training")]


async def test_anonymising_shifts_the_callers_voice_only() -> None:
    store = MemoryStore()
    s = await flagged_call(store)
    library = TrainingLibrary(desk_for(store, ADMIN), pitch_cents=-400)
    plain = await library.add(s.call_id, 1.0, 4.0, title="plain")
    anon = await library.add(s.call_id, 1.0, 4.0, title="anonymised", anonymise=True)
    assert anon.anonymised and anon.duration_s == plain.duration_s == 3.0
    plain_wav = await store.get_bytes(plain.audio_key)
    anon_wav = await store.get_bytes(anon.audio_key)
    assert plain_wav is not None and anon_wav is not None
    _, before = channels(plain_wav)
    _, after = channels(anon_wav)
    assert dominant_hz(before[0]) == pytest.approx(700, abs=10)
    # -400 cents: 700 Hz * 2^(-4/12) = 555.6 Hz on the caller's channel; the agent's stays at 1300 Hz.
    assert dominant_hz(after[0]) == pytest.approx(555.6, abs=15)
    assert dominant_hz(after[1]) == pytest.approx(1300, abs=10)
    assert after[1] == before[1]  # the agent's channel is copied sample for sample


async def test_anonymising_a_mixed_recording_is_refused() -> None:
    store = MemoryStore()
    s = await flagged_call(store, mono=True)
    library = TrainingLibrary(desk_for(store, ADMIN))
    with pytest.raises(ValueError, match="stereo"):
        await library.add(s.call_id, 0.0, 0.1, title="x", anonymise=True)


async def test_retention_and_deleting_the_source_leave_the_clip_and_search_never_shows_it(
    tmp_path: Path,
) -> None:
    """The source is flagged but not held: retention purges it; the clip stays, plays and verifies."""
    tokyo = __import__("zoneinfo").ZoneInfo("Asia/Tokyo")
    store = MemoryStore()
    s = await flagged_call(store)
    desk = desk_for(store, ADMIN)
    library = TrainingLibrary(desk)
    clip = await library.add(s.call_id, 0.5, 2.5, title="kept")
    found = [
        e.call_id
        async for e in desk.search(Filters(start=T0 - timedelta(days=1), end=T0 + timedelta(days=1)))
    ]
    assert found == [s.call_id]  # the clip is not a recording
    now = T0 + timedelta(days=400)
    sweep = RetentionSweep(
        store, MemoryEvents(), AuditLog(store, MemoryEvents(), by="ret"), days=30, tz=tokyo, now=now
    )
    report = await sweep.run()
    assert {p.call_id for p in report.purged} == {s.call_id}
    assert not [k for k in store.objects if k.startswith("recordings/") and store.objects[k][-1].data]
    assert {k for k in store.objects if k.startswith("training")} == set(clip_keys(clip.clip_id))
    assert cutoff_for(now, 30, tokyo) > T0
    out = tmp_path / "clip.wav"
    played = await library.play(clip.clip_id, out)
    assert played.sha256 == clip.sha256 and shape_of(out).duration_s == 2.0
    clips, problems = await library.clips()
    assert [c.clip_id for c in clips] == [clip.clip_id] and not problems


async def test_export_has_the_clips_and_no_source(tmp_path: Path) -> None:
    store = MemoryStore()
    s = await flagged_call(store)
    library = TrainingLibrary(desk_for(store, SUPERVISOR))
    a = await library.add(s.call_id, 0, 1, title="a")
    b = await library.add(s.call_id, 1, 3, title="b")
    out = tmp_path / "session.zip"
    await library.export([a.clip_id, b.clip_id], out, reason="monthly training")
    with zipfile.ZipFile(out) as zf:
        names = set(zf.namelist())
        assert names == {f"{c.clip_id}.{x}" for c in (a, b) for x in ("wav", "json")} | {
            "SHA256SUMS",
            "manifest.json",
        }
        everything = b"".join(zf.read(n) for n in names if not n.endswith(".wav"))
        assert s.call_id.encode() not in everything and CALLER_NUMBER.encode() not in everything
        import hashlib

        for line in zf.read("SHA256SUMS").decode().splitlines():
            sha, name = line.split("  ")
            assert hashlib.sha256(zf.read(name)).hexdigest() == sha
    assert [r[:2] for r in await audit_actions(store) if r[0] == "training_export"] == [
        ("training_export", "started"),
        ("training_export", "done"),
    ]
