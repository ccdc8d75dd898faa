"""The upload queue's logic: decisions (pure) and whole runs against the in-memory store."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from uploader_helpers import (
    STARTED,
    arrive_while_running,
    metadata,
    put_recording,
    run_until_empty,
    spool_config,
    spool_names,
    wav_bytes,
)

from kasuhara_ari.events import MemoryEvents
from kasuhara_ari.storage import (
    DeletionGuard,
    HoldRecord,
    MemoryStore,
    ObjectRef,
    PreconditionFailed,
    StorageRefused,
    recording_keys,
)
from kasuhara_ari.uploader import (
    Action,
    AudioMode,
    FileStat,
    InvalidMetadata,
    LocalState,
    Spool,
    Timing,
    Uploader,
    backoff_delay,
    decide,
    final_metadata,
    spool_status,
    write_file_atomic,
)

NOW = 1_000_000.0
T = Timing(incomplete_after_s=120, orphan_after_s=3600)
META: dict[str, Any] = {"audio": {"expected": True}}


def f(age: float, size: int = 100) -> FileStat:
    return FileStat(size, NOW - age)


# ---------------------------------------------------------------------------------------------- decide


@pytest.mark.parametrize(
    ("state", "meta", "action", "audio"),
    [
        (LocalState("c", wav=f(1), done=f(1), json=f(1)), META, Action.UPLOAD, AudioMode.COMPLETE),
        (LocalState("c", wav=f(1), json=f(1)), META, Action.WAIT, None),
        (LocalState("c", wav=f(121), json=f(1)), META, Action.UPLOAD, AudioMode.INCOMPLETE),
        (LocalState("c", json=f(1)), {"audio": {"expected": False}}, Action.UPLOAD, AudioMode.NOT_RECORDED),
        # audio present although metadata says none: the file wins
        (
            LocalState("c", wav=f(1), done=f(1), json=f(1)),
            {"audio": {"expected": False}},
            Action.UPLOAD,
            AudioMode.COMPLETE,
        ),
        (LocalState("c", done=f(1), json=f(1)), META, Action.UPLOAD, AudioMode.ABSENT),
        (LocalState("c", json=f(1)), META, Action.UPLOAD, AudioMode.ABSENT),
        (LocalState("c", wav=f(1)), None, Action.WAIT, None),
        (LocalState("c", wav=f(1), done=f(1)), None, Action.WAIT, None),
        (LocalState("c", wav=f(3601), done=f(3601)), None, Action.ADOPT_ORPHAN, None),
        (LocalState("c", wav=f(3601)), None, Action.ADOPT_ORPHAN, None),
        (LocalState("c", hold=f(1)), None, Action.APPLY_HOLD, None),
        (LocalState("c", done=f(1)), None, Action.WAIT, None),
        (LocalState("c", done=f(3601)), None, Action.DROP_STRAY_DONE, None),
        (LocalState("c", wav=f(1), done=f(1), json=f(1)), InvalidMetadata("bad"), Action.INVALID, None),
    ],
)
def test_decide(state: LocalState, meta: Any, action: Action, audio: AudioMode | None) -> None:
    d = decide(state, meta, NOW, T)
    assert d.action is action, d
    assert d.audio is audio


def test_decide_absent_audio_is_final_only_after_grace() -> None:
    assert not decide(LocalState("c", json=f(10)), META, NOW, T).final
    assert decide(LocalState("c", json=f(200)), META, NOW, T).final


def test_backoff_grows_and_is_capped() -> None:
    delays = [backoff_delay(n, base_s=1, cap_s=60, jitter=0) for n in range(1, 10)]
    assert delays[:4] == [1, 2, 4, 8]
    assert max(delays) == 60
    assert all(48 <= backoff_delay(20, base_s=1, cap_s=60) <= 72 for _ in range(50))


def test_final_metadata_fills_audio_and_cleans_caller() -> None:
    keys = recording_keys("c1", STARTED)
    doc = metadata("c1", caller={"number": "03\n1234", "name": "x\x00" * 5000}, extra_field=1)
    from kasuhara_ari.uploader import AudioResult

    out = final_metadata(doc, keys, AudioResult("stored", keys.audio, 10, "a" * 64), None)
    assert out["audio"] == {
        "format": "wav",
        "expected": True,
        "key": keys.audio,
        "bytes": 10,
        "sha256": "a" * 64,
        "version_id": None,
        "status": "stored",
        "incomplete": False,
    }
    assert out["caller"]["number"] == "03\\x0a1234"
    assert len(out["caller"]["name"]) <= 256 and "\x00" not in out["caller"]["name"]
    assert out["extra_field"] == 1
    assert doc["caller"]["number"] == "03\n1234", "input not modified"


# ---------------------------------------------------------------------------------------------- spool


def test_scan_ignores_unsafe_and_temporary_names(tmp_path: Path) -> None:
    for name in [
        "ok.wav",
        "ok.done",
        "ok.json",
        ".ok.json.1234.tmp",
        "a b.wav",
        "..json",
        ".x.wav",
        "weird.mp3",
        "x" * 129 + ".wav",
        "in;jection.json",
    ]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "dir.wav").mkdir()
    os.symlink("/etc/passwd", tmp_path / "link.wav")
    states = Spool(tmp_path).scan()
    assert set(states) == {"ok"}
    assert states["ok"].wav and states["ok"].done and states["ok"].json and not states["ok"].hold


def test_hold_markers_live_in_the_queue_dir(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", tmp_path / "queue")
    (tmp_path / "spool").mkdir()
    rec = HoldRecord.create("c1", "r", "b", at="2025-01-01T00:00:00.000+00:00", started_at=STARTED)
    assert spool.write_hold(rec) == rec
    second = HoldRecord.create("c1", "other", "b", at="2025-01-01T00:00:01.000+00:00", started_at=STARTED)
    assert spool.write_hold(second) == rec, "the first hold wins"
    assert (tmp_path / "queue" / "c1.hold").exists()
    (tmp_path / "spool" / "c2.hold").write_bytes(b"{}")  # not where markers live: ignored
    assert set(spool.scan()) == {"c1"}
    assert spool.remove_hold("c1", second) is False
    assert spool.remove_hold("c1", rec) is True
    assert spool.scan() == {}


def test_write_file_atomic_no_clobber(tmp_path: Path) -> None:
    p = tmp_path / "m.json"
    assert write_file_atomic(p, b"one", replace=False)
    assert not write_file_atomic(p, b"two", replace=False)
    assert p.read_bytes() == b"one"
    assert write_file_atomic(p, b"three")
    assert p.read_bytes() == b"three"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.json"]


def test_read_metadata_rejects_mismatched_or_naive(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    (tmp_path / "c1.json").write_text(json.dumps(metadata("other")))
    with pytest.raises(InvalidMetadata, match="call_id"):
        spool.read_metadata("c1")
    (tmp_path / "c1.json").write_text(json.dumps(metadata("c1", started_at="2025-01-01T00:00:00")))
    with pytest.raises(InvalidMetadata, match="offset"):
        spool.read_metadata("c1")
    (tmp_path / "c1.json").write_text("{not json")
    with pytest.raises(InvalidMetadata, match="not JSON"):
        spool.read_metadata("c1")


# ---------------------------------------------------------------------------------------------- runs


def make_uploader(
    tmp_path: Path, store: MemoryStore, events: MemoryEvents | None = None, **options: Any
) -> Uploader:
    options.setdefault("poll_interval_s", 0.05)
    options.setdefault("backoff_base_s", 0.02)
    options.setdefault("backoff_cap_s", 0.2)
    options.setdefault("timing", Timing(incomplete_after_s=0.5, orphan_after_s=2.0))
    return Uploader(spool_config(tmp_path), store, events or MemoryEvents(), **options)


def stored_metadata(store: MemoryStore, key: str) -> dict[str, Any]:
    versions = store.objects[key]
    data = versions[-1].data
    assert data is not None
    result: dict[str, Any] = json.loads(data)
    return result


async def test_upload_complete_recording(tmp_path: Path) -> None:
    store, events = MemoryStore(), MemoryEvents()
    audio = wav_bytes(50_000)
    put_recording(tmp_path, "call-1", audio=audio)
    await run_until_empty(make_uploader(tmp_path, store, events))
    keys = recording_keys("call-1", STARTED)
    assert keys.audio == "recordings/2025/01/01/call-1.wav"
    sha = hashlib.sha256(audio).hexdigest()
    assert store.objects[keys.audio][-1].data == audio
    assert store.objects[keys.audio][-1].metadata["sha256"] == sha
    assert store.objects[keys.audio][-1].content_type == "audio/wav"
    meta = stored_metadata(store, keys.metadata)
    assert meta["audio"]["key"] == keys.audio
    assert meta["audio"]["bytes"] == len(audio)
    assert meta["audio"]["sha256"] == sha
    assert meta["audio"]["incomplete"] is False
    assert meta["caller"]["name"] == "山田 太郎"
    assert store.version_count(keys.audio) == 1
    assert store.version_count(keys.metadata) == 1
    assert sorted(store.objects) == sorted([keys.audio, keys.metadata])
    # audio first, metadata last: the metadata object marks the recording complete
    puts = [k for op, k in store.calls if op.startswith("put")]
    assert puts == [keys.audio, keys.metadata]
    assert spool_names(tmp_path) == []
    [ev] = events.of("call-1")
    assert ev["event"] == "recording_stored"
    assert (ev["key"], ev["bytes"], ev["sha256"]) == (keys.audio, len(audio), sha)


async def test_draining_waits_for_the_event_of_an_upload_whose_files_are_gone(tmp_path: Path) -> None:
    """The local files go before ``recording_stored`` is emitted; a drain that looked only at the spool
    stopped the uploader in between and the event was lost (seen once on moto under load)."""
    store, events = MemoryStore(), MemoryEvents()
    put_recording(tmp_path, "call-1", audio=wav_bytes(1000))
    uploader = make_uploader(tmp_path, store, events)
    finish = uploader.spool.finish

    def slow_finish(*args: Any) -> Any:
        result = finish(*args)  # the files are gone now ...
        time.sleep(0.5)  # ... and the event is not out yet
        return result

    uploader.spool.finish = slow_finish  # type: ignore[method-assign]
    await run_until_empty(uploader)
    assert [e["event"] for e in events.of("call-1")] == ["recording_stored"]


async def test_a_new_recording_costs_two_requests(tmp_path: Path) -> None:
    """New since the uploader started: nothing can be in the bucket, and the ETags (the MD5 of what the
    server received) prove both objects, so nothing is read back."""
    store = MemoryStore()
    await arrive_while_running(tmp_path, make_uploader(tmp_path, store), {"new-1": wav_bytes(5000)})
    keys = recording_keys("new-1", STARTED)
    assert store.calls == [("put_file", keys.audio), ("put_bytes_if", keys.metadata)]
    assert store.objects[keys.audio][-1].data == wav_bytes(5000)
    assert spool_names(tmp_path) == []


async def test_between_full_scans_only_named_recordings_are_looked_at(tmp_path: Path) -> None:
    """A burst of finished calls is not a scan of the whole spool each: the uploader looks at the call
    ids it was told about, and scans everything only every ``poll_interval_s`` (the safety net)."""
    store = MemoryStore()
    for i in range(30):  # calls still recording: audio, no metadata yet
        (tmp_path / f"busy-{i}.wav").write_bytes(wav_bytes(100))
    uploader = make_uploader(tmp_path, store, poll_interval_s=3600)
    scans = 0
    real_scan = uploader.spool.scan

    def counted() -> Any:
        nonlocal scans
        scans += 1
        return real_scan()

    uploader.spool.scan = counted  # type: ignore[method-assign]
    task = asyncio.create_task(uploader.run())
    try:
        await asyncio.sleep(0.2)
        for i in range(10):
            put_recording(tmp_path, f"done-{i}", audio=wav_bytes(2000, seed=i))
            await uploader.notify(f"done-{i}")
            await asyncio.sleep(0.01)
        deadline = time.monotonic() + 10
        while any(n.startswith("done-") for n in spool_names(tmp_path)):
            assert time.monotonic() < deadline, spool_names(tmp_path)
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert uploader.stats.stored == 10
    assert scans == 1  # the start-up scan only


async def test_a_recording_left_from_before_is_looked_up_first(tmp_path: Path) -> None:
    """In the spool when the uploader starts (a crash may have stored it already): looked up first, and
    stored once."""
    store = MemoryStore()
    put_recording(tmp_path, "old-1", audio=wav_bytes(5000))
    keys = recording_keys("old-1", STARTED)
    await run_until_empty(make_uploader(tmp_path, store))
    assert ("stat", keys.audio) in store.calls and ("stat", keys.metadata) in store.calls
    assert store.calls.index(("stat", keys.audio)) < store.calls.index(("put_file", keys.audio))
    # Uploaded, then the crash came before the local files were removed: the re-run adds no version.
    put_recording(tmp_path, "old-1", audio=wav_bytes(5000))
    await run_until_empty(make_uploader(tmp_path, store))
    assert store.version_count(keys.audio) == 1
    assert store.version_count(keys.metadata) == 1


async def test_a_failed_new_upload_looks_before_writing_again(tmp_path: Path) -> None:
    store = MemoryStore()
    store.fail_next = {"put_bytes_if": 1}  # the audio is stored, the metadata put fails once
    await arrive_while_running(tmp_path, make_uploader(tmp_path, store), {"new-2": wav_bytes(5000)})
    keys = recording_keys("new-2", STARTED)
    assert store.version_count(keys.audio) == 1  # the retry found it and did not upload it again
    assert store.version_count(keys.metadata) == 1
    assert ("stat", keys.audio) in store.calls


@pytest.mark.parametrize("etags", ["not_md5", "wrong"])
async def test_without_a_matching_etag_the_object_is_read_back(tmp_path: Path, etags: str) -> None:
    """SSE-KMS ETags are not the MD5; a wrong one means the server may hold something else: either way
    the object is read back (size and sha256) before the local files go."""
    store = MemoryStore()
    store.md5_etags = etags != "not_md5"
    store.wrong_etags = etags == "wrong"
    await arrive_while_running(tmp_path, make_uploader(tmp_path, store), {"new-3": wav_bytes(5000)})
    keys = recording_keys("new-3", STARTED)
    assert store.calls == [
        ("put_file", keys.audio),
        ("stat", keys.audio),
        ("put_bytes_if", keys.metadata),
        ("stat", keys.metadata),
    ]
    assert spool_names(tmp_path) == []


async def test_an_object_that_does_not_match_is_never_trusted(tmp_path: Path, monkeypatch: Any) -> None:
    """Wrong ETag and the read-back disagrees too: VerifyError, retried, local files kept meanwhile; the
    object there is never replaced (a second version would hide the first)."""
    store = MemoryStore()
    store.wrong_etags = True
    real_stat = store.stat
    lies = {"left": 2}

    async def lying_stat(key: str, *, version_id: str | None = None) -> Any:
        info = await real_stat(key, version_id=version_id)
        if info is not None and key.endswith(".wav") and lies["left"]:
            lies["left"] -= 1
            return replace(info, size=info.size - 1)
        return info

    monkeypatch.setattr(store, "stat", lying_stat)
    uploader = make_uploader(tmp_path, store)
    await arrive_while_running(tmp_path, uploader, {"new-4": wav_bytes(5000)})
    keys = recording_keys("new-4", STARTED)
    assert uploader.stats.failures == 2  # the first verification failed ...
    # ... the retry looked (the object still disagreed: refused to replace it), the next one found it.
    assert store.version_count(keys.audio) == 1
    assert store.version_count(keys.metadata) == 1
    assert spool_names(tmp_path) == []


async def test_zero_length_and_unrecorded_audio_still_produce_metadata(tmp_path: Path) -> None:
    store, events = MemoryStore(), MemoryEvents()
    put_recording(tmp_path, "empty", audio=b"")
    put_recording(
        tmp_path,
        "none",
        audio=None,
        done=False,
        meta=metadata("none", audio={"format": "wav", "expected": False}),
    )
    put_recording(tmp_path, "missing", audio=None, done=True)
    await run_until_empty(make_uploader(tmp_path, store, events))
    for cid, status in (("empty", "empty"), ("none", "not_recorded"), ("missing", "missing")):
        keys = recording_keys(cid, STARTED)
        assert keys.audio not in store.objects
        meta = stored_metadata(store, keys.metadata)
        assert meta["audio"]["status"] == status
        assert meta["audio"]["key"] is None
        assert meta["audio"]["sha256"] is None
        [ev] = events.of(cid)
        assert ev["key"] == keys.metadata and "sha256" not in ev
    assert stored_metadata(store, recording_keys("empty", STARTED).metadata)["audio"]["bytes"] == 0
    assert spool_names(tmp_path) == []


async def test_missing_done_uploads_after_grace_marked_incomplete(tmp_path: Path) -> None:
    store = MemoryStore()
    put_recording(tmp_path, "crashed", audio=wav_bytes(1000), done=False)
    uploader = make_uploader(tmp_path, store, timing=Timing(incomplete_after_s=0.6, orphan_after_s=60))
    task = asyncio.create_task(uploader.run())
    try:
        await asyncio.sleep(0.3)
        assert spool_names(tmp_path) == ["crashed.json", "crashed.wav"], "waits for .done first"
        await asyncio.wait_for(uploader.wait_empty(), 10)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    meta = stored_metadata(store, recording_keys("crashed", STARTED).metadata)
    assert meta["audio"]["incomplete"] is True
    assert meta["audio"]["status"] == "incomplete"
    assert meta["audio"]["bytes"] == len(wav_bytes(1000))


async def test_outage_keeps_files_and_retries_until_stored_once(tmp_path: Path) -> None:
    store = MemoryStore()
    store.down = True
    for i in range(5):
        put_recording(tmp_path, f"c{i}", audio=wav_bytes(2000, seed=i))
    uploader = make_uploader(tmp_path, store)
    task = asyncio.create_task(uploader.run())
    try:
        await asyncio.sleep(0.8)
        assert len(spool_names(tmp_path)) == 15, "nothing removed while S3 is down"
        assert uploader.stats.failures >= 5
        store.down = False
        await asyncio.wait_for(uploader.wait_empty(), 10)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for i in range(5):
        keys = recording_keys(f"c{i}", STARTED)
        assert store.version_count(keys.audio) == 1
        assert store.version_count(keys.metadata) == 1


class CrashingSpool(Spool):
    """Dies (once) after ``after`` files of the real removal sequence, like a kill -9 right there."""

    def __init__(self, directory: Path, after: int) -> None:
        super().__init__(directory)
        self.after = after
        self.crashed = False

    def remove_recording(self, call_id: str) -> None:
        if self.crashed:
            return super().remove_recording(call_id)
        self.crashed = True
        real_unlink = Path.unlink
        done = 0

        def unlink(path: Path, missing_ok: bool = False) -> None:
            nonlocal done
            if done == self.after:
                raise OSError("simulated crash while removing local files")
            done += 1
            real_unlink(path, missing_ok=missing_ok)

        with mock.patch.object(Path, "unlink", unlink):
            super().remove_recording(call_id)
        raise OSError("simulated crash after removing local files")


@pytest.mark.parametrize("removed_before_crash", [0, 1, 2, 3])
async def test_rerun_after_crash_adds_no_second_version(tmp_path: Path, removed_before_crash: int) -> None:
    store = MemoryStore()
    audio = wav_bytes(3000)
    put_recording(tmp_path, "c1", audio=audio)
    spool = CrashingSpool(tmp_path, removed_before_crash)
    await run_until_empty(make_uploader(tmp_path, store, spool=spool))
    assert spool.crashed
    keys = recording_keys("c1", STARTED)
    assert sorted(store.objects) == sorted([keys.audio, keys.metadata]), "no orphan re-upload"
    assert store.version_count(keys.audio) == 1
    assert store.version_count(keys.metadata) == 1
    meta = stored_metadata(store, keys.metadata)
    assert meta["audio"]["sha256"] == hashlib.sha256(audio).hexdigest()
    assert meta["audio"]["status"] == "stored"


async def test_lost_put_answer_is_not_uploaded_twice(tmp_path: Path) -> None:
    """The server stored the object but the answer never came back: the retry must see it, not re-put."""
    store = MemoryStore()
    original = store.put_file
    lost = {"n": 0}

    async def put_then_lose_answer(*args: Any, **kwargs: Any) -> Any:
        result = await original(*args, **kwargs)
        if lost["n"] == 0:
            lost["n"] += 1
            from kasuhara_ari.storage import StorageUnavailable

            raise StorageUnavailable("connection reset after the body was sent")
        return result

    store.put_file = put_then_lose_answer  # type: ignore[method-assign]
    put_recording(tmp_path, "c1", audio=wav_bytes(3000))
    await run_until_empty(make_uploader(tmp_path, store))
    assert lost["n"] == 1
    assert store.version_count(recording_keys("c1", STARTED).audio) == 1


async def test_file_changing_during_upload_is_retried(tmp_path: Path) -> None:
    store = MemoryStore()
    put_recording(tmp_path, "c1", audio=wav_bytes(3000))
    original = store.put_file
    changed = {"n": 0}

    async def change_then_put(key: str, path: Path, **kwargs: Any) -> Any:
        if changed["n"] == 0:
            changed["n"] += 1
            path.write_bytes(wav_bytes(3000, seed=9))  # same size, other content
        return await original(key, path, **kwargs)

    store.put_file = change_then_put  # type: ignore[method-assign]
    await run_until_empty(make_uploader(tmp_path, store))
    keys = recording_keys("c1", STARTED)
    assert store.version_count(keys.audio) == 1
    assert store.objects[keys.audio][-1].data == wav_bytes(3000, seed=9)
    meta = stored_metadata(store, keys.metadata)
    assert meta["audio"]["sha256"] == hashlib.sha256(wav_bytes(3000, seed=9)).hexdigest()


async def test_flag_in_metadata_holds_at_upload(tmp_path: Path) -> None:
    store = MemoryStore()
    hold = {"reason": "flagged by agent as harassment", "by": "agent", "at": "2025-01-01T18:05:00.000+00:00"}
    put_recording(
        tmp_path, "flagged", audio=wav_bytes(100), meta=metadata("flagged", flags=["harassment"], hold=hold)
    )
    put_recording(tmp_path, "plain", audio=wav_bytes(100))
    await run_until_empty(make_uploader(tmp_path, store))
    keys = recording_keys("flagged", STARTED)
    assert store.objects[keys.audio][-1].legal_hold
    assert store.objects[keys.metadata][-1].legal_hold
    record = HoldRecord.from_json(store.objects[keys.hold][-1].data or b"")
    assert (record.reason, record.by) == (hold["reason"], "agent")
    assert stored_metadata(store, keys.metadata)["hold"] == hold
    plain = recording_keys("plain", STARTED)
    assert not store.objects[plain.audio][-1].legal_hold
    assert plain.hold not in store.objects
    # the hold record is written before any recording object
    puts = [k for op, k in store.calls if op.startswith("put")]
    assert puts.index(keys.hold) < puts.index(keys.audio) < puts.index(keys.metadata)
    refs = [ObjectRef(o.key, o.version_id) async for o in store.list_prefix("recordings/", versions=True)]
    outcome = await DeletionGuard(store).delete(refs)
    assert {r.key for r in outcome.deleted} == {plain.audio, plain.metadata}
    assert {r.ref.key for r in outcome.refused} == {keys.audio, keys.metadata}


async def test_hold_during_call_is_applied_at_upload(tmp_path: Path) -> None:
    store = MemoryStore()
    uploader = make_uploader(tmp_path, store)
    task = asyncio.create_task(uploader.run())
    try:
        # The call is still running: only the growing .wav exists.
        (tmp_path / "live.wav").write_bytes(wav_bytes(500))
        rec = await uploader.hold("live", "abusive\ncaller", "agent 7", started_at=STARTED)
        assert rec.reason == "abusive\\x0acaller"
        assert (tmp_path / "live.hold").exists()
        await asyncio.sleep(0.3)
        keys = recording_keys("live", STARTED)
        assert keys.audio not in store.objects, "nothing uploaded while the call runs"
        assert keys.hold not in store.objects, "not applied while the recording is still local"
        put_recording(tmp_path, "live", audio=wav_bytes(900))
        await uploader.notify("live")
        await asyncio.wait_for(uploader.wait_empty(), 10)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert store.objects[keys.audio][-1].legal_hold
    assert store.objects[keys.metadata][-1].legal_hold
    assert HoldRecord.from_json(store.objects[keys.hold][-1].data or b"") == rec
    assert stored_metadata(store, keys.metadata)["hold"] == rec.as_metadata_hold()
    assert spool_names(tmp_path) == []


async def test_hold_after_upload_and_during_outage(tmp_path: Path) -> None:
    store = MemoryStore()
    put_recording(tmp_path, "done1", audio=wav_bytes(100))
    uploader = make_uploader(tmp_path, store)
    task = asyncio.create_task(uploader.run())
    try:
        await asyncio.wait_for(uploader.wait_empty(), 10)
        store.down = True
        await uploader.hold("done1", "complaint", "supervisor", started_at=STARTED)
        await asyncio.sleep(0.5)
        assert spool_names(tmp_path) == ["done1.hold"], "the hold waits durably while S3 is down"
        store.down = False
        await asyncio.wait_for(uploader.wait_empty(), 10)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    keys = recording_keys("done1", STARTED)
    assert store.objects[keys.audio][-1].legal_hold and store.objects[keys.metadata][-1].legal_hold
    assert keys.hold in store.objects
    assert store.version_count(keys.metadata) == 1, "a hold does not rewrite the metadata"


async def test_hold_for_unknown_recording_waits_for_its_upload(tmp_path: Path) -> None:
    store = MemoryStore()
    uploader = make_uploader(tmp_path, store)
    task = asyncio.create_task(uploader.run())
    try:
        await uploader.hold("later", "r", "agent", started_at=STARTED)
        await asyncio.sleep(0.4)
        keys = recording_keys("later", STARTED)
        assert keys.hold in store.objects, "the record is written at once, so the guard refuses already"
        assert spool_names(tmp_path) == ["later.hold"]
        put_recording(
            tmp_path,
            "later",
            audio=None,
            done=False,
            meta=metadata("later", audio={"format": "wav", "expected": False}),
        )
        await uploader.notify("later")
        await asyncio.wait_for(uploader.wait_empty(), 10)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert store.objects[keys.metadata][-1].legal_hold


async def test_hostile_caller_id_never_reaches_keys_or_paths(tmp_path: Path) -> None:
    store = MemoryStore()
    spool = tmp_path / "spool"
    hostile = {
        "number": "../../../etc/passwd\x00\n",
        "name": "\x1b[2J" + "../" * 3000 + "\u202e\r\n" + "A" * 10_000,
    }
    put_recording(spool, "c1", audio=wav_bytes(100), meta=metadata("c1", caller=hostile))
    await run_until_empty(make_uploader(spool, store))
    keys = recording_keys("c1", STARTED)
    assert sorted(store.objects) == sorted([keys.audio, keys.metadata])
    caller = stored_metadata(store, keys.metadata)["caller"]
    assert caller["number"] == "../../../etc/passwd\\x00\\x0a"
    assert caller["name"].startswith("\\x1b[2J../../")
    assert len(caller["name"]) <= 256
    for value in caller.values():
        assert not any(ord(ch) < 32 for ch in value)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "spool",
        "spool/.kasuhara-uploader.lock",
    ]


async def test_orphan_audio_is_adopted(tmp_path: Path) -> None:
    store = MemoryStore()
    audio = wav_bytes(16000 * 3)  # 3 s at 16000 bytes/s
    put_recording(tmp_path, "orphan", audio=audio, meta=False, age_s=10)
    await run_until_empty(make_uploader(tmp_path, store))
    [meta_key] = [k for k in store.objects if k.endswith(".json")]
    meta = json.loads(store.objects[meta_key][-1].data or b"")
    assert meta["orphaned"] is True
    assert meta["audio"]["bytes"] == len(audio)
    assert meta["direction"] is None
    assert store.objects[meta_key][-1].metadata["orphaned"] == "yes"


async def test_invalid_metadata_is_counted_then_quarantined_and_the_audio_uploaded(tmp_path: Path) -> None:
    """Issue 12: unusable metadata no longer leaves the audio in the spool forever (it used to stay)."""
    store = MemoryStore()
    put_recording(tmp_path, "bad", audio=wav_bytes(100), meta=metadata("bad", started_at="no time"))
    put_recording(tmp_path, "good", audio=wav_bytes(100))
    status = spool_status(Spool(tmp_path))
    assert (status.recordings, status.invalid, status.ready) == (2, 1, 1)
    await run_until_empty(make_uploader(tmp_path, store))
    assert spool_names(tmp_path) == ["quarantine"]
    [kept] = (tmp_path / "quarantine").iterdir()
    assert json.loads(kept.read_text())["started_at"] == "no time"
    [bad_meta] = [k for k in store.objects if k.endswith("/bad.json")]
    doc = json.loads(store.objects[bad_meta][-1].data or b"")
    assert doc["orphaned"] is True and "started_at" in doc["metadata_invalid"]["reason"]
    assert [k for k in store.objects if k.endswith("/bad.wav")]


async def test_notify_ignores_unsafe_ids(tmp_path: Path) -> None:
    uploader = make_uploader(tmp_path, MemoryStore())
    await uploader.notify("../../etc")
    await uploader.notify("ok-1")
    assert "../../etc" not in uploader._track
    with pytest.raises(ValueError, match="unsafe"):
        await uploader.hold("../x", "r", "b", started_at=STARTED)


def test_spool_status_counts(tmp_path: Path) -> None:
    put_recording(tmp_path, "ready", audio=wav_bytes(10))
    put_recording(tmp_path, "incall", audio=wav_bytes(20), done=False, meta=False)
    put_recording(tmp_path, "waiting", audio=wav_bytes(30), done=False)
    put_recording(tmp_path, "orphan", audio=wav_bytes(40), meta=False, age_s=7200)
    (tmp_path / "held.hold").write_bytes(b"{}")
    st = spool_status(Spool(tmp_path), now=time.time())
    assert (st.recordings, st.ready, st.in_call, st.waiting_for_audio, st.orphans, st.pending_holds) == (
        4,
        1,
        1,
        1,
        1,
        1,
    )
    assert st.bytes == sum(len(wav_bytes(n)) for n in (10, 20, 30, 40))


async def test_second_uploader_on_the_same_queue_waits(tmp_path: Path) -> None:
    store = MemoryStore()
    first = make_uploader(tmp_path, store)
    second = make_uploader(tmp_path, store)
    t1 = asyncio.create_task(first.run())
    await asyncio.sleep(0.1)
    t2 = asyncio.create_task(second.run())
    try:
        put_recording(tmp_path, "c1", audio=wav_bytes(100))
        await asyncio.wait_for(first.wait_empty(), 10)
        assert first.stats.stored == 1
        assert second.stats.stored == 0
        t1.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await t1
        put_recording(tmp_path, "c2", audio=wav_bytes(100))
        await asyncio.wait_for(second.wait_empty(), 10)
        assert second.stats.stored == 1, "takes over once the first one is gone"
    finally:
        for t in (t1, t2):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t


def test_events_match_the_event_schema(tmp_path: Path) -> None:
    from kasuhara_ari.schemas import validate_event

    store, events = MemoryStore(), MemoryEvents()
    put_recording(tmp_path, "c1", audio=wav_bytes(100))
    put_recording(tmp_path, "c2", audio=b"")
    asyncio.run(run_until_empty(make_uploader(tmp_path, store, events)))
    assert len(events.events) == 2
    for ev in events.events:
        validate_event({"schema": "kasuhara.event/1", **ev})


class RgwLikeStore(MemoryStore):
    """What Ceph RGW 16 does to the service key (README *Roles enforced by the server*): PutObjectLegalHold
    refused, every ``If-Match`` refused on a versioned bucket even when it matches, ``If-None-Match``
    ignored; a legal hold sent with the creating PUT is honoured."""

    async def set_legal_hold(self, key: str, on: bool, *, version_id: str | None = None) -> None:
        self._enter("set_legal_hold", key)
        raise StorageRefused(f"legal hold {key}: refused (AccessDenied)", code="AccessDenied")

    async def put_bytes_if(
        self,
        key: str,
        data: bytes,
        *,
        metadata: Any,
        if_match: str | None = None,
        if_none_match: bool = False,
        content_type: str = "application/json",
        legal_hold: bool = False,
    ) -> Any:
        if if_match is not None:
            self._enter("put_bytes_if", key)
            raise PreconditionFailed(f"put {key}: PreconditionFailed", code="PreconditionFailed")
        return await super().put_bytes_if(
            key, data, metadata=metadata, content_type=content_type, legal_hold=legal_hold
        )


async def test_flagged_call_is_held_by_its_creating_puts_where_the_hold_api_is_refused(
    tmp_path: Path,
) -> None:
    """On RGW the service may not call PutObjectLegalHold nor replace with If-Match: the flagged call still
    leaves the spool, its objects created under the legal hold, its hold record pinning both versions
    (failed before the fix: the record write looped on 'the hold record keeps changing')."""
    store, events = RgwLikeStore(), MemoryEvents()
    hold = {"reason": "harassment", "by": "agent", "at": "2025-01-01T18:05:00.000+00:00"}
    put_recording(
        tmp_path, "rg1", audio=wav_bytes(100), meta=metadata("rg1", flags=["harassment"], hold=hold)
    )
    uploader = make_uploader(tmp_path, store, events)
    await run_until_empty(uploader, timeout=5)
    keys = recording_keys("rg1", STARTED)
    assert store.objects[keys.audio][-1].legal_hold and store.objects[keys.metadata][-1].legal_hold
    record = HoldRecord.from_json(store.objects[keys.hold][-1].data or b"")
    assert dict(record.versions) == {
        keys.audio: store.objects[keys.audio][0].version_id,
        keys.metadata: store.objects[keys.metadata][0].version_id,
    }
    assert ("set_legal_hold", keys.audio) not in store.calls
    assert uploader.stats.holds_applied == 1 and uploader.stats.holds_need_admin == 0
    assert [e["event"] for e in events.of("rg1")] == ["recording_stored"]
    assert spool_names(tmp_path) == []


async def test_a_late_hold_the_key_may_not_place_keeps_its_record_and_says_so(tmp_path: Path) -> None:
    """A hold asked after the audio was stored without one (RGW, service key): the hold record stays
    (the deletion guard honours it), the refusal is logged and emitted, never counted as applied."""
    from kasuhara_ari.schemas import validate_event

    store, events = RgwLikeStore(), MemoryEvents()
    put_recording(tmp_path, "late1", audio=wav_bytes(100))
    uploader = make_uploader(tmp_path, store, events)
    await run_until_empty(uploader, timeout=5)
    await uploader.hold("late1", "complaint", "supervisor", started_at=STARTED)
    await run_until_empty(uploader, timeout=5)
    keys = recording_keys("late1", STARTED)
    assert keys.hold in store.objects
    assert not store.objects[keys.audio][-1].legal_hold
    assert uploader.stats.holds_need_admin == 1 and uploader.stats.holds_applied == 0
    late = [e for e in events.of("late1") if e["event"] == "hold_incomplete"]
    assert len(late) == 1 and late[0]["reason"] == "legal_hold_refused"
    assert set(late[0]["keys"]) == {keys.audio, keys.metadata}
    validate_event({"schema": "kasuhara.event/1", **late[0]})
    assert await DeletionGuard(store).why_not("late1") == "hold record"
    assert spool_names(tmp_path) == []


async def test_a_marker_hold_that_lost_its_audio_is_reported_not_applied(tmp_path: Path) -> None:
    """``HoldOutcome.lost`` from a hold placed after a sweep deleted the audio: an error event and
    ``holds_lost``, never ``holds_applied`` (failed before the fix: counted as applied, nothing said)."""
    from kasuhara_ari.schemas import validate_event

    store, events = MemoryStore(), MemoryEvents()
    put_recording(tmp_path, "gone1", audio=wav_bytes(100))
    uploader = make_uploader(tmp_path, store, events)
    await run_until_empty(uploader, timeout=5)
    keys = recording_keys("gone1", STARTED)
    versions = [ObjectRef(keys.audio, v.version_id) for v in store.objects[keys.audio]]
    assert await store.delete_versions(versions) == []  # the sweep got there first
    await uploader.hold("gone1", "complaint", "supervisor", started_at=STARTED)
    await run_until_empty(uploader, timeout=5)
    assert uploader.stats.holds_applied == 0
    assert uploader.stats.holds_lost == 1
    lost = [e for e in events.of("gone1") if e["event"] == "hold_incomplete"]
    assert len(lost) == 1 and lost[0]["reason"] == "evidence_lost" and lost[0]["keys"] == [keys.audio]
    validate_event({"schema": "kasuhara.event/1", **lost[0]})
    assert keys.hold in store.objects, "the record of the request stays"
    assert spool_names(tmp_path) == []


# -- the service role may not read audio (Ceph RGW refuses it HEAD/GET of *.wav)


def _stored_before(store: MemoryStore, tmp_path: Path, call_id: str, audio: bytes) -> str:
    """The audio object an interrupted first attempt left (no metadata object): its version id."""
    keys = recording_keys(call_id, STARTED)
    sha = hashlib.sha256(audio).hexdigest()
    version = store._add(keys.audio, audio, {"sha256": sha}, "audio/wav")
    return version.version_id


async def test_audio_of_an_interrupted_attempt_is_identified_by_its_etag_without_reading(
    tmp_path: Path,
) -> None:
    store = MemoryStore()
    store.refuse_audio_reads = True
    audio = wav_bytes(20_000)
    put_recording(tmp_path, "again-1", audio=audio)
    first = _stored_before(store, tmp_path, "again-1", audio)
    uploader = make_uploader(tmp_path, store)
    await run_until_empty(uploader)
    keys = recording_keys("again-1", STARTED)
    assert [v.version_id for v in store.objects[keys.audio]] == [first]
    assert stored_metadata(store, keys.metadata)["audio"]["version_id"] == first
    assert uploader.stats.skipped_existing == 1
    assert spool_names(tmp_path) == []


async def test_other_bytes_at_the_audio_key_stay_unreplaced_when_audio_cannot_be_read(tmp_path: Path) -> None:
    store = MemoryStore()
    store.refuse_audio_reads = True
    put_recording(tmp_path, "clash-2", audio=wav_bytes(20_000, seed=1))
    _stored_before(store, tmp_path, "clash-2", wav_bytes(20_000, seed=2))
    uploader = make_uploader(tmp_path, store)
    with pytest.raises(TimeoutError):
        await run_until_empty(uploader, timeout=1.0)
    keys = recording_keys("clash-2", STARTED)
    assert len(store.objects[keys.audio]) == 1 and keys.metadata not in store.objects
    assert "clash-2.wav" in spool_names(tmp_path)


async def test_etags_that_prove_nothing_never_let_an_unreadable_object_count_as_ours(tmp_path: Path) -> None:
    """As with SSE-C: the ETag is no MD5, so the service cannot tell; the recording stays (retried)."""
    store = MemoryStore()
    store.refuse_audio_reads = True
    store.md5_etags = False
    audio = wav_bytes(20_000)
    put_recording(tmp_path, "ssec-1", audio=audio)
    _stored_before(store, tmp_path, "ssec-1", audio)
    with pytest.raises(TimeoutError):
        await run_until_empty(make_uploader(tmp_path, store), timeout=1.0)
    assert len(store.objects[recording_keys("ssec-1", STARTED).audio]) == 1


async def test_a_flagged_recording_is_held_although_its_audio_cannot_be_read(tmp_path: Path) -> None:
    store = MemoryStore()
    store.refuse_audio_reads = True
    hold = {"reason": "harassment", "by": "agent", "at": "2025-01-01T18:00:00.000+00:00"}
    put_recording(tmp_path, "held-2", audio=wav_bytes(20_000), meta=metadata("held-2", hold=hold))
    uploader = make_uploader(tmp_path, store)
    await run_until_empty(uploader)
    keys = recording_keys("held-2", STARTED)
    assert store.objects[keys.audio][-1].legal_hold and store.objects[keys.metadata][-1].legal_hold
    assert uploader.stats.holds_applied == 1 and uploader.stats.holds_need_admin == 0


async def test_the_metadata_object_names_the_audio_so_nothing_is_read_or_listed(tmp_path: Path) -> None:
    """Crash after both objects were stored, before the spool was cleared: the metadata says it all."""
    store = MemoryStore()
    audio = wav_bytes(20_000)
    put_recording(tmp_path, "done-1", audio=audio)
    await run_until_empty(make_uploader(tmp_path, store))
    put_recording(tmp_path, "done-1", audio=audio)
    store.refuse_audio_reads = True
    store.calls.clear()
    uploader = make_uploader(tmp_path, store)
    await run_until_empty(uploader)
    keys = recording_keys("done-1", STARTED)
    assert len(store.objects[keys.audio]) == 1 and len(store.objects[keys.metadata]) == 1
    assert not [c for c in store.calls if c[1] == keys.audio]
