"""The care report page against the real stack: ``kasuhara web`` as the operator starts it, accounts made by
``kasuhara users``, the hand-counted month of ``test_care_report`` seeded into the stack's S3 server, and
headless Chromium (tests/browser.py) reading the page and recording a follow-up. The page must show the
same numbers as ``kasuhara care report`` (they come from the same code), the chart as an image, the CSV,
and the note must land as the CLI's does (audited ``care_note``, its text never in the record).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from browser import SESSION_LOOP, Watched, browser_session, watched  # noqa: F401  (fixtures)
from test_care_report import EXPECTED, PEOPLE, seed_month
from test_users_cli import users
from test_web_recording_s3 import http_login, log_in
from web_process import console_process

from conftest import closed_port
from recordings_seed import cli_env
from s3_fixture import S3Target, fresh_bucket, open_store

pytestmark = [pytest.mark.integration, SESSION_LOOP]

VIEWER, VIEWER_PW = "ito", "the viewers long passphrase"
SUPERVISOR, SUPERVISOR_PW = "tanaka", "the supervisors long passphrase"
ADMIN, ADMIN_PW = "sato", "the admins long passphrase"
HOSTILE = "<img src=x onerror=alert(1)>\u202e山田"
#: The test_care_report people, and one whose name is hostile markup with a bidi override.
STAFF = {**PEOPLE, "care-e": HOSTILE}
NEW_URLS = ("/care", "/care?month=2026-11", "/care/chart.svg?month=2026-11", "/care/report.csv?month=2026-11")


@dataclass(frozen=True)
class Stack:
    url: str
    target: S3Target
    bucket: str


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with fresh_bucket("kwc") as (target, bucket):
        env = {
            **cli_env(
                target,
                bucket,
                KASUHARA_AGENTS__PEOPLE=json.dumps(STAFF),
                KASUHARA_CARE__FOLLOW_UP_CALLS="2",
                KASUHARA_CARE__FOLLOW_UP_MINUTES="0",
            ),
            "KASUHARA_WEB__PORT": str(closed_port()),
        }
        for name, role, password in (
            (VIEWER, "viewer", VIEWER_PW),
            (SUPERVISOR, "supervisor", SUPERVISOR_PW),
            (ADMIN, "admin", ADMIN_PW),
        ):
            made = users(env, "add", name, "--role", role, "--password-stdin", stdin=password + "\n")
            assert made.returncode == 0, made.stderr
        store = open_store(target, bucket)
        try:
            asyncio.run(seed_month(store))
        finally:
            store.close()
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


async def test_viewer_gets_403_and_every_post_needs_csrf_and_origin(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=30, headers={"Origin": stack.url}) as viewer:
        csrf = await http_login(viewer, VIEWER, VIEWER_PW)
        for path in NEW_URLS:
            assert (await viewer.get(path)).status_code == 403, path
        note = await viewer.post("/care/note", data={"csrf": csrf, "agent": "care-b", "text": "x"})
        assert note.status_code == 403
        board = await viewer.get("/")
        assert 'href="/care"' not in board.text and 'href="/training"' not in board.text
    async with httpx.AsyncClient(base_url=stack.url, timeout=30, headers={"Origin": stack.url}) as sup:
        csrf = await http_login(sup, SUPERVISOR, SUPERVISOR_PW)
        no_token = await sup.post("/care/note", data={"agent": "care-b", "text": "x"})
        wrong = await sup.post("/care/note", data={"csrf": "0" * 43, "agent": "care-b", "text": "x"})
        elsewhere = await sup.post(
            "/care/note",
            data={"csrf": csrf, "agent": "care-b", "text": "x"},
            headers={"Origin": "http://evil.example"},
        )
        assert (no_token.status_code, wrong.status_code, elsewhere.status_code) == (403, 403, 403)
        # Agents not in [agents], names that could become keys, an empty text: refused, nothing stored.
        for agent, text in (("nobody", "x"), ("../care-a", "x"), ("care-b", "   ")):
            got = await sup.post("/care/note", data={"csrf": csrf, "agent": agent, "text": text})
            assert got.status_code == 400, (agent, text)
        assert (await sup.get("/care?month=2026-13")).status_code == 400
        assert (await sup.get("/care?month=<script>")).status_code == 400
    store = open_store(stack.target, stack.bucket)
    try:
        assert [o.key async for o in store.list_prefix("care/notes/")] == []
    finally:
        store.close()


async def test_page_csv_and_chart_have_the_hand_counted_numbers(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=30, headers={"Origin": stack.url}) as sup:
        await http_login(sup, SUPERVISOR, SUPERVISOR_PW)
        got = await sup.get("/care/report.csv?month=2026-11")
        assert got.status_code == 200 and got.headers["content-type"].startswith("text/csv")
        assert 'filename="care-report-2026-11.csv"' in got.headers["content-disposition"]
        rows = {r["agent"]: r for r in csv.DictReader(io.StringIO(got.text))}
        assert set(rows) == {*EXPECTED, "care-e"}
        for agent, want in EXPECTED.items():
            if agent == "care-a":  # followed up in test_care_report by its own note; none here yet
                want = {**want, "status": "waiting"}
            assert {k: rows[agent][k] for k in want} == {k: str(v) for k, v in want.items()}, agent

        chart = await sup.get("/care/chart.svg?month=2026-11")
        assert chart.status_code == 200
        assert chart.headers["content-type"].startswith("image/svg+xml")
        assert "default-src 'none'" in chart.headers["content-security-policy"]
        assert chart.headers["x-content-type-options"] == "nosniff"
        svg = ET.fromstring(chart.content)
        texts = ["".join(el.itertext()) for el in svg.iter("{http://www.w3.org/2000/svg}text")]
        for agent, person in PEOPLE.items():
            assert f"{person} ({agent})" in texts, texts
        # The hostile name is text in the SVG, not markup, and its bidi override a visible escape.
        hostile = [s for s in texts if s.endswith("(care-e)")]
        assert len(hostile) == 1 and hostile[0].startswith("<img src=x"), texts  # cut to the label column
        assert b"<img" not in chart.content and "\u202e" not in chart.text
        assert "オペレーター別のカスハラ通話（2026-11）" in texts  # the page's language (Japanese by default)
        assert "フラグ (*1)" in texts and not any("calls" in s or "waiting" in s for s in texts), texts
        # An English reader's chart is English through and through, the same numbers.
        english = await sup.get("/care/chart.svg?month=2026-11", headers={"accept-language": "en"})
        texts_en = [
            "".join(el.itertext())
            for el in ET.fromstring(english.content).iter("{http://www.w3.org/2000/svg}text")
        ]
        assert "Harassment calls per agent, 2026-11" in texts_en and "flags (*1)" in texts_en, texts_en
        assert not any("件" in s or "フォローアップ" in s for s in texts_en), texts_en
        assert sorted(s for s in texts if "(care-" in s) == sorted(s for s in texts_en if "(care-" in s)

        page = await sup.get("/care?month=2026-11")
        assert page.status_code == 200
        assert "<img src=x" not in page.text and "&lt;img src=x onerror=alert(1)&gt;" in page.text
        assert "\u202e" not in page.text  # the bidi override is a visible escape
    reports = [r for r in await audit_records(stack) if r["action"] == "care_report"]
    shapes = {r["details"].get("format") for r in reports if r["by"] == f"web:{SUPERVISOR}"}
    assert {"csv", "svg", "html"} <= shapes
    assert all(r["target"]["month"] == "2026-11" for r in reports)


async def test_supervisor_reads_the_page_and_records_a_follow_up(
    watched: Watched,  # noqa: F811
    stack: Stack,
) -> None:
    page = await log_in(watched, stack.url, SUPERVISOR, SUPERVISOR_PW, "/care")
    await page.get_by_label("対象月").fill("2026-11")
    await page.get_by_role("button", name="表示").click()
    await page.wait_for_url(f"{stack.url}/care?month=2026-11")
    assert await page.locator("h1").inner_text() == "ケア報告（オペレーター別） 2026-11"
    row_b = page.locator('#care-rows tr[data-agent="care-b"]')
    assert await row_b.locator("td.harassment").inner_text() == "2"
    assert await row_b.locator("td.minutes").inner_text() == "2.0"
    assert await row_b.locator("td.status").inner_text() == "未対応"
    row_a = page.locator('#care-rows tr[data-agent="care-a"]')
    assert await row_a.locator("td.harassment").inner_text() == "3"
    assert await row_a.locator("td.minutes").inner_text() == "8.5"
    # The hostile name is inert: no image but the chart, the override shown as an escape.
    assert await page.locator("img").count() == 1
    assert "\\u202e" in await page.locator('#care-rows tr[data-agent="care-e"] td.person').inner_text()
    # The chart is an image of the console that the browser drew (CSP allows it, it decodes).
    await page.wait_for_function("() => document.getElementById('care-chart').naturalWidth > 400")
    await watched.screenshot(page, "care-ja")

    await page.locator("form.care-note select[name=agent]").select_option("care-b")
    await page.locator("form.care-note textarea[name=text]").fill("面談しました。来週から休憩を増やす")
    await page.locator("#do-care-note").click()
    await page.wait_for_url(f"{stack.url}/care?month=2026-11&done=note")
    assert await page.locator("p.notice").inner_text() == "フォローアップを記録しました。"
    status = await page.locator('#care-rows tr[data-agent="care-b"] td.status').inner_text()
    assert status.startswith("対応済み") and f"web:{SUPERVISOR}" in status
    # The same page and chart for an English reader (looked at: the screenshot).
    await page.get_by_role("button", name="English").click()
    await page.wait_for_function("() => document.documentElement.lang === 'en'")
    assert await page.locator("h1").inner_text() == "Care report per agent 2026-11"  # the month kept
    assert await row_b.locator("td.harassment").inner_text() == "2"
    await page.wait_for_function("() => document.getElementById('care-chart').naturalWidth > 400")
    await watched.screenshot(page, "care-en")
    watched.assert_clean()

    notes = [r for r in await audit_records(stack) if r["action"] == "care_note"]
    assert len(notes) == 1 and notes[0]["by"] == f"web:{SUPERVISOR}"
    assert notes[0]["target"]["agent"] == "care-b"
    assert notes[0]["target"]["note_key"].startswith("care/notes/care-b/")
    assert "面談" not in json.dumps(notes[0], ensure_ascii=False)  # the text stays in its own object


async def test_the_board_links_the_care_pages_for_supervisors_in_english_too(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=30, headers={"Origin": stack.url}) as admin:
        await http_login(admin, ADMIN, ADMIN_PW)
        admin.cookies.set("kasuhara_lang", "en")
        page = await admin.get("/care?month=2026-11")
        assert page.status_code == 200
        assert "Care report per agent 2026-11" in page.text
        assert 'href="/care"' in page.text and 'href="/training"' in page.text
