"""The training library in the console against the real stack: ``kasuhara web`` as the operator starts it,
accounts made by ``kasuhara users``, a flagged and a plain recording seeded into the stack's S3 server, and
headless Chromium (tests/browser.py) making a clip from the recording page, playing it and exporting it.
The clip goes through the same library as ``kasuhara training`` (sox cuts it): the same refusals, the same
audit records; a viewer never reaches the library; the source call id is shown to admins only.
"""

from __future__ import annotations

import asyncio
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser import SESSION_LOOP, Watched, browser_session, watched  # noqa: F401  (fixtures)
from test_users_cli import users
from test_web_recording_s3 import http_login, log_in, speech_like_wav
from web_process import console_process

from conftest import closed_port
from recordings_seed import cli_env, seed
from s3_fixture import S3Target, fresh_bucket, open_store

pytestmark = [pytest.mark.integration, SESSION_LOOP]

VIEWER, VIEWER_PW = "ito", "the viewers long passphrase"
SUPERVISOR, SUPERVISOR_PW = "tanaka", "the supervisors long passphrase"
ADMIN, ADMIN_PW = "sato", "the admins long passphrase"
FLAGGED = "1764720100.7"
PLAIN = "1764720200.8"
STARTED = datetime.fromtimestamp(1764720100, UTC)
NUMBER, NAME = "0312345678", "山田 太郎"
HOSTILE_TITLE = "<script>alert(1)</script>\u202e怒鳴る客への対応"
NOTE = "<img src=x onerror=alert(2)> 最初の 10 秒：落ち着いて名乗る"
#: 8 kHz 16-bit mono: 16000 bytes a second plus the 44-byte header.
BYTES_PER_S = 16000


@dataclass(frozen=True)
class Stack:
    url: str
    target: S3Target
    bucket: str


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with fresh_bucket("kwt") as (target, bucket):
        env = {**cli_env(target, bucket), "KASUHARA_WEB__PORT": str(closed_port())}
        for name, role, password in (
            (VIEWER, "viewer", VIEWER_PW),
            (SUPERVISOR, "supervisor", SUPERVISOR_PW),
            (ADMIN, "admin", ADMIN_PW),
        ):
            made = users(env, "add", name, "--role", role, "--password-stdin", stdin=password + "\n")
            assert made.returncode == 0, made.stderr

        async def seed_calls() -> None:
            store = open_store(target, bucket)
            try:
                for cid, flags in ((FLAGGED, ["harassment"]), (PLAIN, [])):
                    await seed(
                        store,
                        cid,
                        STARTED,
                        audio=speech_like_wav(40),
                        caller=NUMBER,
                        caller_name=NAME,
                        flags=flags,
                        duration_s=40.0,
                        agent="PJSIP/agent",
                    )
            finally:
                store.close()

        asyncio.run(seed_calls())
        with console_process(env) as url:
            yield Stack(url, target, bucket)


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


async def clip_ids(s: Stack) -> list[str]:
    store = open_store(s.target, s.bucket)
    try:
        keys = [o.key async for o in store.list_prefix("training/") if o.key.endswith(".json")]
        return sorted(k.removeprefix("training/").removesuffix(".json") for k in keys)
    finally:
        store.close()


def add_form(csrf: str, **fields: str) -> dict[str, str]:
    return {"csrf": csrf, "from": "00:05", "to": "00:15", "title": "対応例", "note": "", **fields}


async def test_viewer_never_reaches_the_library_and_the_cli_refusals_hold(stack: Stack) -> None:
    fake = "tc-0123456789abcdef"
    async with httpx.AsyncClient(base_url=stack.url, timeout=60, headers={"Origin": stack.url}) as viewer:
        csrf = await http_login(viewer, VIEWER, VIEWER_PW)
        for path in ("/training", f"/training/{fake}/audio"):
            assert (await viewer.get(path)).status_code == 403, path
        export = await viewer.post("/training/export", data={"csrf": csrf, f"clip-{fake}": "1"})
        assert export.status_code == 403
        add = await viewer.post(f"/recordings/{FLAGGED}/training", data=add_form(csrf))
        assert add.status_code == 403
        page = await viewer.get(f"/recordings/{FLAGGED}")
        assert page.status_code == 200 and "/training" not in page.text
    async with httpx.AsyncClient(base_url=stack.url, timeout=60, headers={"Origin": stack.url}) as sup:
        csrf = await http_login(sup, SUPERVISOR, SUPERVISOR_PW)
        assert "do-training-add" in (await sup.get(f"/recordings/{FLAGGED}")).text
        assert "do-training-add" not in (await sup.get(f"/recordings/{PLAIN}")).text
        no_token = await sup.post(f"/recordings/{FLAGGED}/training", data={**add_form(csrf), "csrf": ""})
        assert no_token.status_code == 403
        export = await sup.post("/training/export", data={f"clip-{fake}": "1"})
        assert export.status_code == 403
        plain = await sup.post(f"/recordings/{PLAIN}/training", data=add_form(csrf))
        assert plain.status_code == 409 and "neither held nor flagged" in plain.text
        named = await sup.post(
            f"/recordings/{FLAGGED}/training", data=add_form(csrf, note="折り返しは 03-1234-5678 に")
        )
        assert named.status_code == 400 and "the caller&#39;s number" in named.text
        assert NUMBER not in named.text
        backwards = await sup.post(f"/recordings/{FLAGGED}/training", data=add_form(csrf, to="00:01"))
        assert backwards.status_code == 400
        garbage = await sup.post(f"/recordings/{FLAGGED}/training", data=add_form(csrf, **{"from": "x"}))
        assert garbage.status_code == 400
        assert (await sup.get("/training/..%2f..%2faudit/audio")).status_code == 404
    assert await clip_ids(stack) == []  # nothing refused left an object


async def test_admin_makes_a_clip_a_supervisor_plays_and_exports_it(
    watched: Watched,  # noqa: F811
    stack: Stack,
    tmp_path: Path,
) -> None:
    admin = await log_in(watched, stack.url, ADMIN, ADMIN_PW, f"/recordings/{FLAGGED}")
    form = admin.locator("form.training-add")
    await form.locator("input[name=from]").fill("00:05")
    await form.locator("input[name=to]").fill("00:15")
    await form.locator("input[name=title]").fill(HOSTILE_TITLE)
    await form.locator("textarea[name=note]").fill(NOTE)
    await admin.locator("#do-training-add").click()
    await admin.wait_for_url(f"{stack.url}/training?done=add", timeout=60_000)
    assert await admin.locator("p.notice").inner_text() == "クリップを作成しました。"
    (clip_id,) = await clip_ids(stack)
    row = admin.locator(f'#training-rows tr[data-clip="{clip_id}"]')
    # Hostile title and note are text; the source call is a link for the admin only.
    assert await admin.locator("script:not([src])").count() == 0 and await admin.locator("img").count() == 0
    assert "\\u202e" in await row.locator("td.title").inner_text()
    assert (await row.locator("td.note").inner_text()).startswith("<img src=x")
    assert await row.locator("td.source a").inner_text() == FLAGGED
    assert await row.locator("td.duration").inner_text() == "10.0"
    watched.assert_clean()
    await admin.get_by_role("button", name="ログアウト").click()
    await admin.wait_for_url(f"{stack.url}/login")

    page = await log_in(watched, stack.url, SUPERVISOR, SUPERVISOR_PW, "/training")
    assert FLAGGED not in await page.content()  # the source call id is for admins only
    assert await page.locator("td.source").count() == 0
    await page.evaluate("() => document.querySelector('#training-rows audio').play()")
    await page.wait_for_function(
        "() => document.querySelector('#training-rows audio').currentTime > 0.5", timeout=30_000
    )
    await watched.screenshot(page, "training-ja")
    await page.locator(f'input[name="clip-{clip_id}"]').check()
    await page.locator("form.training-export input[name=reason]").fill("新人研修 12 月")
    async with page.expect_download() as info:
        await page.locator("#do-training-export").click()
    saved = tmp_path / "clips.zip"
    await (await info.value).save_as(saved)
    await page.get_by_role("button", name="English").click()
    await page.wait_for_function("() => document.documentElement.lang === 'en'")
    assert await page.locator("#training-rows audio").count() >= 1
    # No header is broken inside a word ("Sele / ct"): a one-word header is one line.
    split = await page.evaluate(
        """() => [...document.querySelectorAll('table.results th')]
            .filter(th => !/\\s/.test(th.textContent.trim()))
            .filter(th => { const r = document.createRange(); r.selectNodeContents(th);
                            return r.getClientRects().length > 1; })
            .map(th => th.textContent.trim())"""
    )
    assert split == [], split
    await watched.screenshot(page, "training-en")
    watched.assert_clean()

    with zipfile.ZipFile(saved) as zf:
        names = set(zf.namelist())
        assert {f"{clip_id}.wav", f"{clip_id}.json", "SHA256SUMS", "manifest.json"} <= names
        wav = zf.read(f"{clip_id}.wav")
        everything = b"".join(zf.read(n) for n in names)
    assert abs((len(wav) - 44) / BYTES_PER_S - 10.0) <= 0.1
    for secret in (FLAGGED.encode(), NUMBER.encode(), NAME.encode()):
        assert secret not in everything

    # Range requests come from the clip in S3, byte for byte.
    async with httpx.AsyncClient(base_url=stack.url, timeout=60, headers={"Origin": stack.url}) as sup:
        await http_login(sup, SUPERVISOR, SUPERVISOR_PW)
        part = await sup.get(f"/training/{clip_id}/audio", headers={"range": "bytes=1000-1099"})
        assert part.status_code == 206 and part.content == wav[1000:1100]
        assert part.headers["content-range"] == f"bytes 1000-1099/{len(wav)}"
        past = await sup.get(f"/training/{clip_id}/audio", headers={"range": f"bytes={len(wav)}-"})
        assert past.status_code == 416

    records = await audit_records(stack)
    done = {(r["action"], r["by"], r["result"]) for r in records if r["action"].startswith("training_")}
    assert ("training_add", f"web:{ADMIN}", "done") in done
    assert ("training_list", f"web:{SUPERVISOR}", "done") in done
    assert ("training_play", f"web:{SUPERVISOR}", "done") in done
    assert ("training_export", f"web:{SUPERVISOR}", "done") in done
    # Seeks reuse the play grant: one play (started + done) per browser session, not one per Range.
    plays = [r for r in records if r["action"] == "training_play" and r["result"] == "started"]
    assert len(plays) <= 3, plays
    # The source call is in the admin-only details of the record, never in its target (MQTT's subject).
    targets = json.dumps([r["target"] for r in records if r["action"] == "training_add"])
    assert FLAGGED not in targets
