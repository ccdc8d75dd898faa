"""The recording page's logic: Range parsing, play grants, peaks and markers (pure), and the routes over
the ASGI app with an in-memory store (storage.MemoryStore; accounts are a fake) — role checks, CSRF,
traversal, the audit records written, holds, typed confirmation. The same routes against the real S3
server and a real browser: tests/test_web_recording_s3.py."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import math
import re
import struct
import tempfile
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from kasuhara_ari.accounts import Accounts, Role
from kasuhara_ari.config import Config
from kasuhara_ari.events import NullEvents
from kasuhara_ari.evidence.desk import Playable
from kasuhara_ari.storage import MemoryStore
from kasuhara_ari.web import create_app
from kasuhara_ari.web.playback import PLAY_GRANT_S, PlayGrants, Unsatisfiable, parse_range
from kasuhara_ari.web.waveform import (
    PeakAccumulator,
    WaveformCache,
    compute_waveform,
    markers,
    parse_wav_header,
)

from recordings_seed import Seeded, iso, seed
from web_fakes import FakeAccounts, FakeClock

PASSWORD = "correct horse battery staple"
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')
CID = "1764720000.5"
STARTED = datetime.fromtimestamp(1764720000, UTC)
HOSTILE_NAME = "<script>alert(1)</script>\u202egnp.exe"


def wav(seconds: float, *, rate: int = 8000, freq: float = 440.0, amplitude: int = 12000) -> bytes:
    """A 16-bit mono sine WAV: its peaks are known (±amplitude everywhere)."""
    frames = int(seconds * rate)
    pcm = b"".join(
        struct.pack("<h", int(amplitude * math.sin(2 * math.pi * freq * i / rate))) for i in range(frames)
    )
    header = b"RIFF" + struct.pack("<I", 36 + len(pcm)) + b"WAVEfmt "
    header += struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" + struct.pack("<I", len(pcm))
    return header + pcm


# ------------------------------------------------------------------------------------------ Range


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 100, None),
        ("bytes=0-", 100, (0, 99)),
        ("bytes=0-0", 100, (0, 0)),
        ("bytes=10-19", 100, (10, 19)),
        ("bytes=90-1000", 100, (90, 99)),  # clamped to the end
        ("bytes=-10", 100, (90, 99)),  # suffix
        ("bytes=-1000", 100, (0, 99)),  # suffix longer than the object
        ("BYTES = 5-6", 100, (5, 6)),  # unit is case-insensitive, spaces tolerated
        ("bytes=5-6, 20-30", 100, (5, 6)),  # multi-range: the first range only
        ("bytes=20-10", 100, None),  # invalid range-spec: ignored, whole object
        ("bytes=abc", 100, None),
        ("bytes=-", 100, None),
        ("bytes=1-2-3", 100, None),
        ("bytes=+1-2", 100, None),
        ("bytes=١-٢", 100, None),  # non-ASCII digits are not digits here
        ("items=0-10", 100, None),  # another unit
        ("bytes=0-" + "9" * 40, 100, None),  # absurd numbers: ignored
        ("bytes=0-1," + "2-3," * 200, 100, None),  # over-long header: ignored
        ("bytes", 100, None),
    ],
)
def test_parse_range(header: str | None, size: int, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size"),
    [("bytes=100-", 100), ("bytes=100-200", 100), ("bytes=-0", 100), ("bytes=0-", 0), ("bytes=-5", 0)],
)
def test_parse_range_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(Unsatisfiable):
        parse_range(header, size)


def playable(cid: str = CID) -> Playable:
    return Playable(cid, f"recordings/x/{cid}.wav", "v1", None, 10, "audit/x", [])


def test_play_grants_last_their_window_per_session_and_call() -> None:
    clock = FakeClock()
    grants = PlayGrants(clock)
    grants.add("s1", CID, playable(), 10)
    assert grants.get("s1", CID) is not None
    assert grants.get("s2", CID) is None  # another session (another login) needs its own play record
    assert grants.get("s1", "1764720000.6") is None
    clock.advance(PLAY_GRANT_S - 1)
    assert grants.get("s1", CID) is not None
    clock.advance(1)
    assert grants.get("s1", CID) is None
    assert len(grants) == 0


def test_play_grants_are_bounded_and_dropped_with_the_session() -> None:
    clock = FakeClock()
    grants = PlayGrants(clock, max_grants=3)
    for i in range(5):
        clock.advance(1)
        grants.add(f"s{i}", CID, playable(), 10)
    assert len(grants) == 3
    assert grants.get("s0", CID) is None and grants.get("s4", CID) is not None
    grants.drop_session("s4")
    assert grants.get("s4", CID) is None


# ---------------------------------------------------------------------------------------- waveform


def test_wav_header_and_peaks_whatever_the_block_sizes() -> None:
    data = wav(2.0)
    fmt = parse_wav_header(data[:100], len(data))
    assert fmt is not None
    assert (fmt.channels, fmt.rate, fmt.bits, fmt.data_offset) == (1, 8000, 16, 44)
    assert fmt.duration_s == pytest.approx(2.0)
    assert parse_wav_header(data[:20], len(data)) is None  # needs more bytes
    results = []
    for block in (1, 7, 4096, len(data)):
        acc = PeakAccumulator(fmt, 100)
        body = data[fmt.data_offset :]
        for at in range(0, len(body), block):
            acc.feed(body[at : at + block])
        results.append(acc.finish())
    assert all(r == results[0] for r in results)
    assert len(results[0]) == 100
    # A 440 Hz sine at 12000/32768 reaches about ±47 on the -127..127 scale in every bucket.
    assert all(-48 <= lo <= -44 and 44 <= hi <= 48 for lo, hi in results[0])


def test_wav_header_refusals_and_an_unclosed_recording() -> None:
    with pytest.raises(ValueError, match="RIFF"):
        parse_wav_header(b"ID3\x04" + b"\0" * 60, 64)
    alaw = bytearray(wav(0.1))
    struct.pack_into("<H", alaw, 20, 6)  # format tag 6: A-law
    with pytest.raises(ValueError, match="unsupported"):
        parse_wav_header(bytes(alaw), len(alaw))
    # Asterisk never closed it: the data size is 0; the data runs to the end of the object.
    unclosed = bytearray(wav(1.0))
    struct.pack_into("<I", unclosed, 40, 0)
    fmt = parse_wav_header(bytes(unclosed), len(unclosed))
    assert fmt is not None and fmt.data_bytes == len(unclosed) - 44


async def blocks_of(data: bytes, size: int = 3000) -> AsyncIterator[bytes]:
    for at in range(0, len(data), size):
        yield data[at : at + size]


async def test_compute_waveform_hashes_every_byte_and_says_whether_it_matches_capture() -> None:
    data = wav(1.0)
    sha = hashlib.sha256(data).hexdigest()
    good = await compute_waveform(blocks_of(data), len(data), sha, buckets=50)
    assert (good.verification, good.sha256, good.bytes, len(good.peaks)) == ("verified", sha, len(data), 50)
    assert good.duration_s == pytest.approx(1.0)
    bad = await compute_waveform(blocks_of(data), len(data), "0" * 64, buckets=50)
    assert bad.verification == "mismatch"
    none = await compute_waveform(blocks_of(data), len(data), None, buckets=50)
    assert none.verification == "unverifiable"
    junk = await compute_waveform(blocks_of(b"not a wav at all" * 10), 160, None)
    assert junk.peaks == [] and junk.problem


async def test_waveform_cache_computes_once_and_is_bounded() -> None:
    cache = WaveformCache(entries=2)
    runs: list[str] = []

    async def compute(tag: str) -> Any:
        runs.append(tag)
        return await compute_waveform(blocks_of(wav(0.1)), len(wav(0.1)), None, buckets=4)

    for tag in ("a", "a", "b", "c", "a"):
        await cache.get((tag, "v", ""), lambda tag=tag: compute(tag))  # type: ignore[misc]
    assert runs == ["a", "b", "c", "a"]  # "a" was dropped (LRU, 2 entries) before its third request
    assert len(cache) == 2


def test_markers_from_the_metadata_on_the_recording_clock() -> None:
    t0 = STARTED
    doc = {
        "started_at": iso(t0),
        "answered_at": iso(t0 + timedelta(seconds=1)),
        "agent_answered_at": iso(t0 + timedelta(seconds=9)),
        "ended_at": iso(t0 + timedelta(seconds=61)),
        "escalations": [
            {"at": iso(t0 + timedelta(seconds=31)), "action": "flag", "key": "*1", "by": "agent"},
            {"at": iso(t0 + timedelta(seconds=41)), "action": "warn", "key": "*2", "by": "agent"},
            {"at": iso(t0 + timedelta(seconds=45)), "action": "supervisor", "result": "joined"},
            {"at": "not a time", "action": "flag"},
        ],
        "timeline": [
            {"event": "notice_played", "at": iso(t0 + timedelta(seconds=6))},
            {"event": "supervisor_joined", "at": iso(t0 + timedelta(seconds=50))},
            {"event": "monologue_detected", "at": iso(t0 + timedelta(seconds=21)), "talking_s": 60.0},
            {"event": "talk_over_detected", "at": iso(t0 + timedelta(seconds=26)), "attempts": 3},
            "junk",
        ],
    }
    got = [(m.kind, m.at_s) for m in markers(doc)]
    assert got == [
        ("notice", 5.0),
        ("answered", 8.0),
        ("monologue", 20.0),  # live detection (issue 14), from the timeline
        ("talk_over", 25.0),
        ("flag", 30.0),
        ("warning", 40.0),
        ("supervisor", 49.0),  # the timeline's join time, not the escalation's request time
        ("ended", 60.0),
    ]
    assert markers({"started_at": 12}) == []
    many = {"started_at": iso(t0), "escalations": [{"at": iso(t0), "action": "flag"}] * 5000}
    assert len(markers(many)) == 200


# ------------------------------------------------------------------------------------------ routes


@dataclass
class App:
    store: MemoryStore
    clock: FakeClock
    transport: httpx.ASGITransport
    seeded: Seeded

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=self.transport, base_url="http://testserver", follow_redirects=False
        )

    async def login(self, name: str) -> tuple[httpx.AsyncClient, str]:
        client = self.client()
        page = await client.get("/login")
        token = CSRF_RE.search(page.text)
        assert token
        done = await client.post(
            "/login", data={"csrf": token.group(1), "username": name, "password": PASSWORD}
        )
        assert done.status_code == 303, done.text
        board = await client.get("/")
        csrf = CSRF_RE.search(board.text)
        assert csrf
        return client, csrf.group(1)

    def audit(self, action: str | None = None) -> list[dict[str, Any]]:
        records = []
        for key, versions in self.store.objects.items():
            if key.startswith("audit/") and versions[-1].data is not None:
                doc = json.loads(cast(bytes, versions[-1].data))
                if action is None or doc.get("action") == action:
                    records.append(doc)
        return records


AUDIO = wav(3.0)


@pytest.fixture
async def app() -> App:
    store, clock, accounts = MemoryStore(), FakeClock(), FakeAccounts()
    for name, role in (("viewer1", Role.VIEWER), ("super1", Role.SUPERVISOR), ("admin1", Role.ADMIN)):
        accounts.add(name, role, PASSWORD)
    seeded = await seed(
        store,
        CID,
        STARTED,
        audio=AUDIO,
        caller="0312345678",
        answered_at=iso(STARTED + timedelta(seconds=1)),
        escalations=[
            {"at": iso(STARTED + timedelta(seconds=2)), "action": "flag", "key": "*1", "by": "agent"}
        ],
    )
    # The caller name is hostile (caller ID is caller-controlled).
    meta_key = seeded.keys.metadata
    doc = json.loads(cast(bytes, store.objects[meta_key][-1].data))
    doc["caller"]["name"] = HOSTILE_NAME + "あ" * 10_000  # and 10 000 characters long
    store.objects[meta_key][-1].data = json.dumps(doc).encode()
    app_ = create_app(Config(), cast(Accounts, accounts), clock=clock, store=store, events=NullEvents())
    return App(store, clock, httpx.ASGITransport(app=app_), seeded)


async def test_viewer_sees_metadata_escaped_and_masked_and_no_player_or_actions(app: App) -> None:
    viewer, _ = await app.login("viewer1")
    page = await viewer.get(f"/recordings/{CID}")
    assert page.status_code == 200
    html = page.text
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "\u202e" not in html and "\\u202e" in html  # the bidi override shown as a visible escape
    assert "0312345678" not in html and "******5678" in html  # the viewer sees the last 4 digits
    assert "あ" * 300 not in html  # capped
    assert all("src=" in tag for tag in re.findall(r"<script[^>]*>", html))  # no inline script
    assert " style=" not in html and re.search(r"\son[a-z]+=", html) is None
    assert "<audio" not in html and "/audio" not in html
    for action in ("hold", "release", "download", "export", "delete"):
        assert f"/recordings/{CID}/{action}" not in html
    assert hashlib.sha256(AUDIO).hexdigest() in html  # capture sha256 shown
    assert 'data-kind="flag"' in html and 'data-kind="ended"' in html
    assert "2025-12-03 09:00:00 JST" in html  # started_at in general.timezone (Asia/Tokyo)


async def test_viewer_is_refused_every_audio_and_action_url_by_the_server(app: App) -> None:
    viewer, csrf = await app.login("viewer1")
    for path in ("audio", "waveform", "download"):
        assert (await viewer.get(f"/recordings/{CID}/{path}")).status_code == 403, path
    for action in ("hold", "release", "download", "export", "delete"):
        refused = await viewer.post(
            f"/recordings/{CID}/{action}", data={"csrf": csrf, "reason": "r", "confirm": CID}
        )
        assert refused.status_code == 403, action
    assert app.audit("play") == [] and app.audit("download") == []
    assert app.store.version_count(app.seeded.keys.audio) == 1


async def test_supervisor_is_refused_the_admin_actions(app: App) -> None:
    sup, csrf = await app.login("super1")
    page = (await sup.get(f"/recordings/{CID}")).text
    assert f"/recordings/{CID}/hold" in page and f"/recordings/{CID}/download" not in page
    for action in ("release", "download", "export", "delete"):
        refused = await sup.post(
            f"/recordings/{CID}/{action}", data={"csrf": csrf, "reason": "r", "confirm": CID}
        )
        assert refused.status_code == 403, action


async def test_range_requests_stream_the_pinned_version_and_audit_play_once(app: App) -> None:
    sup, _ = await app.login("super1")
    url = f"/recordings/{CID}/audio"
    first = await sup.get(url, headers={"range": "bytes=0-99"})
    assert first.status_code == 206
    assert first.headers["content-range"] == f"bytes 0-99/{len(AUDIO)}"
    assert first.headers["accept-ranges"] == "bytes" and first.content == AUDIO[:100]
    seek = await sup.get(url, headers={"range": "bytes=30000-"})
    assert seek.status_code == 206 and seek.content == AUDIO[30000:]
    suffix = await sup.get(url, headers={"range": "bytes=-10"})
    assert suffix.content == AUDIO[-10:]
    multi = await sup.get(url, headers={"range": "bytes=0-1,5-6"})
    assert multi.status_code == 206 and multi.content == AUDIO[:2]
    whole = await sup.get(url)
    assert whole.status_code == 200 and whole.content == AUDIO
    assert whole.headers["content-length"] == str(len(AUDIO))
    past = await sup.get(url, headers={"range": f"bytes={len(AUDIO)}-"})
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(AUDIO)}"
    other = await sup.get(url, headers={"range": "bytes=0-9", "if-range": '"another-version"'})
    assert other.status_code == 200 and other.content == AUDIO
    # Seven requests, one play record (the seeks reuse the grant); by the console user.
    plays = app.audit("play")
    assert len(plays) == 1 and plays[0]["by"] == "web:super1"
    assert plays[0]["target"]["call_id"] == CID
    # Bytes came from ranged reads, never a whole-file download into the console.
    reads = [op for op, _ in app.store.calls if op in ("read_range", "get_to_file")]
    assert reads and set(reads) == {"read_range"}
    # After the window a seek is a new play.
    app.clock.advance(PLAY_GRANT_S)
    assert (await sup.get(url, headers={"range": "bytes=0-9"})).status_code == 206
    assert len(app.audit("play")) == 2


async def test_two_first_requests_at_once_write_one_play_record(app: App) -> None:
    """Chromium often opens a second request before the first has answered."""
    stat = app.store.stat

    async def slow_stat(key: str, *, version_id: str | None = None) -> Any:
        await asyncio.sleep(0.05)  # S3 answers later than a memory store: the requests overlap
        return await stat(key, version_id=version_id)

    app.store.stat = slow_stat  # type: ignore[method-assign]
    sup, _ = await app.login("super1")
    url = f"/recordings/{CID}/audio"
    got = await asyncio.gather(*(sup.get(url, headers={"range": f"bytes={i}-"}) for i in range(4)))
    assert [r.status_code for r in got] == [206] * 4
    assert len(app.audit("play")) == 1


async def test_waveform_is_computed_once_and_verifies_the_content(app: App) -> None:
    sup, _ = await app.login("super1")
    first = await sup.get(f"/recordings/{CID}/waveform")
    assert first.status_code == 200
    body = first.json()
    assert body["verification"] == "verified" and body["sha256"] == hashlib.sha256(AUDIO).hexdigest()
    assert body["duration_s"] == pytest.approx(3.0) and 500 <= len(body["peaks"]) <= 1000
    reads = sum(1 for op, _ in app.store.calls if op == "read_range")
    assert (await sup.get(f"/recordings/{CID}/waveform")).json() == body
    assert sum(1 for op, _ in app.store.calls if op == "read_range") == reads  # cached
    assert app.audit("play") == []  # drawing is not listening
    page = (await sup.get(f"/recordings/{CID}")).text
    assert "内容のハッシュを検証済み" in page


@pytest.mark.parametrize(
    "path",
    [
        "/recordings/%2e%2e/audio",
        "/recordings/..%2f..%2fetc%2fpasswd/audio",
        "/recordings/.hidden/waveform",
        "/recordings/a%00b",
        "/recordings/%2e%2e",
        "/recordings/" + "9" * 200 + "/audio",
        "/recordings/1764720000.5%0a/audio",
        "/recordings/1764720000.5/audio/..%2f..%2fstatic",
        "/static/..%2f..%2fweb%2frecordings.py",
        "/static/%2e%2e/console.py",
    ],
)
async def test_traversal_in_every_path_segment_is_a_404(app: App, path: str) -> None:
    admin, _ = await app.login("admin1")
    got = await admin.get(path)
    assert got.status_code == 404, (path, got.status_code)
    assert "import" not in got.text


async def test_unknown_call_is_a_404_page(app: App) -> None:
    viewer, _ = await app.login("viewer1")
    got = await viewer.get("/recordings/1764720000.999")
    assert got.status_code == 404 and "録音が見つかりません" in got.text


async def test_actions_need_the_csrf_token_and_a_reason(app: App) -> None:
    sup, csrf = await app.login("super1")
    no_token = await sup.post(f"/recordings/{CID}/hold", data={"reason": "threats"})
    assert no_token.status_code == 403
    wrong_origin = await sup.post(
        f"/recordings/{CID}/hold", data={"csrf": csrf, "reason": "x"}, headers={"origin": "http://evil.test"}
    )
    assert wrong_origin.status_code == 403
    no_reason = await sup.post(f"/recordings/{CID}/hold", data={"csrf": csrf, "reason": "  "})
    assert no_reason.status_code == 400
    assert app.audit("hold") == [] and not (await sup.get(f"/recordings/{CID}")).text.count("保全中")


async def test_hold_then_delete_refused_while_held_then_release_and_typed_confirmation(app: App) -> None:
    sup, sup_csrf = await app.login("super1")
    held = await sup.post(f"/recordings/{CID}/hold", data={"csrf": sup_csrf, "reason": "脅迫 <b>"})
    assert held.status_code == 303 and held.headers["location"] == f"/recordings/{CID}?done=hold"
    page = (await sup.get(held.headers["location"])).text
    assert "保全しました。" in page and "保全中" in page and "脅迫 &lt;b&gt;" in page
    assert app.audit("hold")[0]["by"] == "web:super1"

    admin, csrf = await app.login("admin1")
    assert (
        f"/recordings/{CID}/delete" not in (await admin.get(f"/recordings/{CID}")).text
    )  # hidden while held
    refused = await admin.post(
        f"/recordings/{CID}/delete", data={"csrf": csrf, "reason": "r", "confirm": CID}
    )
    assert refused.status_code == 409 and "release it first" in refused.text
    assert app.store.version_count(app.seeded.keys.audio) == 1

    released = await admin.post(f"/recordings/{CID}/release", data={"csrf": csrf, "reason": "closed"})
    assert released.status_code == 303 and released.headers["location"].endswith("?done=release")
    wrong = await admin.post(
        f"/recordings/{CID}/delete", data={"csrf": csrf, "reason": "r", "confirm": "1764720000.4"}
    )
    assert wrong.status_code == 400 and "一致しません" in wrong.text
    assert app.store.version_count(app.seeded.keys.audio) == 1
    assert [r["result"] for r in app.audit("delete")] == ["refused"]  # the wrong confirmation wrote nothing

    gone = await admin.post(f"/recordings/{CID}/delete", data={"csrf": csrf, "reason": "r", "confirm": CID})
    assert gone.status_code == 200 and "録音を削除しました" in gone.text
    assert app.store.version_count(app.seeded.keys.audio) == 0
    assert (await admin.get(f"/recordings/{CID}")).status_code == 404


async def test_admin_download_streams_the_verified_bytes_and_leaves_no_file(
    app: App, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    admin, csrf = await app.login("admin1")
    got = await admin.post(f"/recordings/{CID}/download", data={"csrf": csrf, "reason": "police request"})
    assert got.status_code == 200, got.text
    assert got.content == AUDIO
    assert got.headers["x-kasuhara-sha256"] == hashlib.sha256(AUDIO).hexdigest()
    assert got.headers["content-disposition"] == f'attachment; filename="{CID}.wav"'
    assert list(tmp_path.glob("kasuhara-web-*")) == []  # the temporary download is gone
    results = [r["result"] for r in app.audit("download")]
    assert sorted(results) == ["started", "verified"]
    # The old GET URL: an admin is sent to the page (an action is never a GET).
    link = await admin.get(f"/recordings/{CID}/download")
    assert link.status_code == 303 and link.headers["location"] == f"/recordings/{CID}"


async def test_download_of_tampered_audio_sends_nothing(
    app: App, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    app.store.objects[app.seeded.keys.audio][-1].data = AUDIO[:-1] + b"\x01"
    admin, csrf = await app.login("admin1")
    got = await admin.post(f"/recordings/{CID}/download", data={"csrf": csrf, "reason": "r"})
    assert got.status_code == 500 and "INTEGRITY FAILURE" in got.text
    assert got.headers["content-type"].startswith("text/html")
    assert list(tmp_path.glob("kasuhara-web-*")) == []  # the temporary download is gone


async def test_admin_export_is_the_desks_zip(app: App) -> None:
    admin, csrf = await app.login("admin1")
    got = await admin.post(f"/recordings/{CID}/export", data={"csrf": csrf, "reason": "court"})
    assert got.status_code == 200, got.text
    with zipfile.ZipFile(io.BytesIO(got.content)) as z:
        names = z.namelist()
        manifest = json.loads(z.read("manifest.json"))
    assert "SHA256SUMS" in names and any(n.endswith(".wav") for n in names)
    assert manifest["reason"] == "court" and manifest["created_by"] == "web:admin1"
    assert got.headers["x-kasuhara-sha256"] == hashlib.sha256(got.content).hexdigest()
