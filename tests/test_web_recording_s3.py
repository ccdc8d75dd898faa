"""The recording page against the real stack: ``kasuhara web`` as the operator starts it, accounts made by
``kasuhara users``, a recording seeded into the stack's S3 server the way the uploader stores it, and
headless Chromium (tests/browser.py) playing, seeking, holding and downloading it. The audit records are
then read back from S3.

Own port and bucket per module (no shared state); on pytest-asyncio's session loop like the other browser
tests (SESSION_LOOP).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import struct
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from browser import SESSION_LOOP, Watched, browser_session, watched  # noqa: F401  (fixtures)
from test_users_cli import users
from test_web_auth import CSRF_RE
from web_process import console_process

from conftest import closed_port
from recordings_seed import cli_env, iso, seed
from s3_fixture import S3Target, fresh_bucket, open_store

if TYPE_CHECKING:
    from playwright.async_api import Page, Request

pytestmark = [pytest.mark.integration, SESSION_LOOP]

VIEWER, VIEWER_PW = "ito", "the viewers long passphrase"
SUPERVISOR, SUPERVISOR_PW = "tanaka", "the supervisors long passphrase"
ADMIN, ADMIN_PW = "sato", "the admins long passphrase"
CID = "1764720000.42"
STARTED = datetime.fromtimestamp(1764720000, UTC)
#: 8 minutes of 8 kHz 16-bit audio (7.7 MB): longer than Chromium buffers ahead while playing (~2 MB), so
#: a seek to the flag marker must become a new Range request.
SECONDS = 480
FLAG_AT_S = 400.0
HOSTILE_NAME = "<img src=x onerror=alert(1)>\u202e山田"


def speech_like_wav(seconds: int) -> bytes:
    """8 kHz 16-bit mono noise in bursts of varying loudness (turns of a conversation, pauses): a
    waveform a person can read in the screenshot, made in well under a second."""
    rnd = random.Random(42)
    levels = (0, 400, 2500, 8000, 16000, 26000)
    second = {lv: array("h", (rnd.randint(-lv, lv) for _ in range(8000))).tobytes() for lv in levels}
    half = 8000  # bytes in half a second
    pcm = bytearray()
    for i in range(seconds * 2):
        talking = (i // 14) % 3 != 2  # about 7 s of talk, then a pause, in turns
        level = rnd.choice(levels[2:]) if talking else rnd.choice(levels[:2])
        start = rnd.randrange(0, half + 1, 2)
        pcm += second[level][start : start + half]
    header = b"RIFF" + struct.pack("<I", 36 + len(pcm)) + b"WAVEfmt "
    header += struct.pack("<IHHIIHH", 16, 1, 1, 8000, 16000, 2, 16) + b"data" + struct.pack("<I", len(pcm))
    return header + bytes(pcm)


@dataclass(frozen=True)
class Stack:
    url: str
    target: S3Target
    bucket: str
    audio: bytes
    audio_key: str


async def _seed(target: S3Target, bucket: str) -> tuple[bytes, str]:
    store = open_store(target, bucket)
    try:
        answered = STARTED + timedelta(seconds=2)
        audio = speech_like_wav(SECONDS)
        seeded = await seed(
            store,
            CID,
            STARTED,
            audio=audio,
            answered_at=iso(answered),
            agent_answered_at=iso(answered + timedelta(seconds=12)),
            ended_at=iso(answered + timedelta(seconds=SECONDS)),
            duration_s=float(SECONDS),
            # Caller ID is caller-controlled: hostile markup and a bidi override.
            caller="0312345678",
            caller_name=HOSTILE_NAME,
            escalations=[
                {
                    "at": iso(answered + timedelta(seconds=FLAG_AT_S)),
                    "action": "flag",
                    "key": "*1",
                    "by": "agent",
                }
            ],
            flags=["flagged"],
            timeline=[
                {"event": "started", "at": iso(STARTED)},
                {"event": "notice_played", "at": iso(answered + timedelta(seconds=7))},
                {"event": "ended", "at": iso(answered + timedelta(seconds=SECONDS))},
            ],
        )
        return audio, seeded.keys.audio
    finally:
        store.close()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with fresh_bucket("kr") as (target, bucket):
        env = {**cli_env(target, bucket), "KASUHARA_WEB__PORT": str(closed_port())}
        for name, role, password in (
            (VIEWER, "viewer", VIEWER_PW),
            (SUPERVISOR, "supervisor", SUPERVISOR_PW),
            (ADMIN, "admin", ADMIN_PW),
        ):
            made = users(env, "add", name, "--role", role, "--password-stdin", stdin=password + "\n")
            assert made.returncode == 0, made.stderr
        audio, audio_key = asyncio.run(_seed(target, bucket))
        with console_process(env) as url:
            yield Stack(url, target, bucket, audio, audio_key)


async def http_login(client: httpx.AsyncClient, name: str, password: str) -> str:
    page = await client.get("/login")
    token = CSRF_RE.search(page.text)
    assert token
    done = await client.post("/login", data={"csrf": token.group(1), "username": name, "password": password})
    assert done.status_code == 303, done.text
    board = await client.get("/")
    csrf = CSRF_RE.search(board.text)
    assert csrf
    return csrf.group(1)


async def audit_records(s: Stack) -> list[dict[str, Any]]:
    store = open_store(s.target, s.bucket)
    try:
        records = []
        async for obj in store.list_prefix("audit/"):
            data = await store.get_bytes(obj.key)
            assert data is not None
            records.append(json.loads(data))
        return records
    finally:
        store.close()


async def test_viewer_is_refused_playback_and_actions_and_ranges_come_from_s3(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=30, headers={"Origin": stack.url}) as viewer:
        csrf = await http_login(viewer, VIEWER, VIEWER_PW)
        page = await viewer.get(f"/recordings/{CID}")
        assert page.status_code == 200 and "******5678" in page.text and "0312345678" not in page.text
        assert "<img src=x" not in page.text and "&lt;img src=x onerror=alert(1)&gt;" in page.text
        for path in ("audio", "waveform", "download"):
            assert (await viewer.get(f"/recordings/{CID}/{path}")).status_code == 403, path
        for action in ("hold", "release", "download", "export", "delete"):
            got = await viewer.post(
                f"/recordings/{CID}/{action}", data={"csrf": csrf, "reason": "r", "confirm": CID}
            )
            assert got.status_code == 403, action
    async with httpx.AsyncClient(base_url=stack.url, timeout=30, headers={"Origin": stack.url}) as sup:
        await http_login(sup, SUPERVISOR, SUPERVISOR_PW)
        size = len(stack.audio)
        middle = await sup.get(f"/recordings/{CID}/audio", headers={"range": "bytes=1000000-1000099"})
        assert middle.status_code == 206 and middle.content == stack.audio[1000000:1000100]
        assert middle.headers["content-range"] == f"bytes 1000000-1000099/{size}"
        tail = await sup.get(f"/recordings/{CID}/audio", headers={"range": "bytes=-16"})
        assert tail.content == stack.audio[-16:]
        past = await sup.get(f"/recordings/{CID}/audio", headers={"range": f"bytes={size}-"})
        assert past.status_code == 416
        # A seek aborted by the client (it reads a little and closes) leaves the console serving.
        async with sup.stream("GET", f"/recordings/{CID}/audio") as streaming:
            assert streaming.status_code == 200
            async for _ in streaming.aiter_bytes():
                break
        assert (await sup.get(f"/recordings/{CID}/audio", headers={"range": "bytes=0-3"})).content == b"RIFF"


async def log_in(watch: Watched, url: str, name: str, password: str, path: str) -> Page:
    page = await watch.page()
    await page.goto(f"{url}{path}")
    await page.get_by_label("ユーザー名").fill(name)
    await page.get_by_label("パスワード").fill(password)
    await page.get_by_role("button", name="ログイン").click()
    await page.wait_for_url(f"{url}{path}")
    return page


async def test_supervisor_plays_seeks_to_the_flag_and_holds_then_admin_downloads(
    watched: Watched,  # noqa: F811
    stack: Stack,
    tmp_path: Path,
) -> None:
    page = await log_in(watched, stack.url, SUPERVISOR, SUPERVISOR_PW, f"/recordings/{CID}")
    ranges: list[str] = []

    async def on_request(request: Request) -> None:
        if request.url.endswith(f"/recordings/{CID}/audio"):
            ranges.append((await request.all_headers()).get("range", ""))

    page.on("request", on_request)
    assert await page.locator("h1").inner_text() == f"録音 {CID}"
    # The hostile caller name is inert text, its bidi override a visible escape.
    assert await page.locator("img").count() == 0
    assert "\\u202e" in await page.locator(".caller-name").inner_text()
    await page.wait_for_selector("canvas#waveform[data-ready='true']")
    assert (
        await page.locator("#content-check").inner_text()
        == "内容のハッシュを検証済み：録音時の SHA-256 と一致。"
    )
    assert ranges == []  # preload="none": opening the page plays (and audits) nothing

    await page.get_by_role("button", name="再生", exact=True).click()
    await page.wait_for_function("() => document.getElementById('audio').currentTime > 0.5", timeout=30_000)
    flag = page.locator("button.marker-flag")
    assert await flag.inner_text() == "フラグ"
    await flag.click()
    await page.wait_for_function(
        f"() => document.getElementById('audio').currentTime >= {FLAG_AT_S - 1}", timeout=30_000
    )
    await page.wait_for_function(
        f"() => document.getElementById('audio').currentTime > {FLAG_AT_S + 0.3}", timeout=30_000
    )
    starts = [int(r.removeprefix("bytes=").split("-")[0]) for r in ranges if r.startswith("bytes=")]
    assert starts and starts[0] == 0, ranges
    assert any(s > 2_000_000 for s in starts), ranges  # the seek was a Range request deep into the file
    shot = await watched.screenshot(page, "recording-ja")

    await page.locator("form[action$='/hold'] input[name=reason]").fill("脅迫的な発言のため保全")
    await page.locator("#do-hold").click()
    await page.wait_for_url(f"{stack.url}/recordings/{CID}?done=hold")
    assert await page.locator(".held").inner_text() == "保全中"
    assert await page.locator(".hold-reason").inner_text() == "脅迫的な発言のため保全"
    watched.assert_clean()

    # The same browser (one cookie jar): the supervisor logs out, the admin logs in.
    await page.get_by_role("button", name="ログアウト").click()
    await page.wait_for_url(f"{stack.url}/login")
    admin = await log_in(watched, stack.url, ADMIN, ADMIN_PW, f"/recordings/{CID}")
    shown_sha = (await admin.locator(".capture-sha").inner_text()).strip()
    # The admin's actions on a held recording: release, download, export; delete only once released.
    assert await admin.locator("#do-release").is_visible() and await admin.locator("#do-export").is_visible()
    assert await admin.locator("#do-delete").count() == 0
    await watched.screenshot(admin, "recording-admin-held-ja")
    await admin.locator("form[action$='/download'] input[name=reason]").fill("警察からの照会")
    async with admin.expect_download() as info:
        await admin.locator("#do-download").click()
    download = await info.value
    saved = tmp_path / "got.wav"
    await download.save_as(saved)
    got = saved.read_bytes()
    store = open_store(stack.target, stack.bucket)
    try:
        in_s3 = tmp_path / "s3.wav"
        await store.get_to_file(stack.audio_key, in_s3)
    finally:
        store.close()
    assert got == in_s3.read_bytes() == stack.audio
    assert hashlib.sha256(got).hexdigest() == shown_sha
    watched.assert_clean()

    records = await audit_records(stack)
    plays = {(r["action"], r["by"], r["result"]) for r in records if r["action"] in ("play", "download")}
    assert ("play", f"web:{SUPERVISOR}", "started") in plays
    assert ("download", f"web:{ADMIN}", "started") in plays
    assert ("download", f"web:{ADMIN}", "verified") in plays
    # One play record for the supervisor's browser session however many Range requests it made.
    assert len([r for r in records if r["action"] == "play" and r["by"] == f"web:{SUPERVISOR}"]) <= 2
    # The admin's audit page shows them too: `play` and `download` as two records by two users, in Japanese.
    await admin.goto(f"{stack.url}/audit")
    rows = admin.locator("#audit-rows tr")
    play_row = rows.filter(has=admin.locator('td.action[data-action="play"]'))
    download_row = rows.filter(has=admin.locator('td.action[data-action="download"]'))
    assert await play_row.count() >= 1 and await download_row.count() >= 1
    assert await play_row.first.locator("td.action").inner_text() == "再生"
    assert await play_row.first.locator("td.by").inner_text() == f"web:{SUPERVISOR}"
    assert await download_row.first.locator("td.action").inner_text() == "ダウンロード"
    assert await download_row.first.locator("td.by").inner_text() == f"web:{ADMIN}"
    watched.assert_clean()
    assert shot.exists()
