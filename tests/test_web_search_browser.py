"""Search and audit pages in a real browser (Debian's chromium, tests/browser.py) against ``kasuhara web``
as the operator starts it, on a fresh bucket of the stack's S3 with recordings written as the uploader
writes them: an admin searches by a partial caller number, a viewer sees the number masked, the admin
opens the audit log (the searches are on it) and runs the chain verification. Screenshots in Japanese.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from browser import SESSION_LOOP, Watched, browser_session, watched  # noqa: F401  (fixtures)
from test_users_cli import users

from conftest import REPO, closed_port
from recordings_seed import cli_command, cli_env, seed
from s3_fixture import fresh_bucket, open_store

if TYPE_CHECKING:
    from playwright.async_api import Page

pytestmark = [pytest.mark.integration, SESSION_LOOP]

VIEWER, VIEWER_PW = "ito", "the viewers long passphrase"
ADMIN, ADMIN_PW = "sato", "the admins long passphrase"


@dataclass(frozen=True)
class Console:
    url: str


def seed_recordings(target: object, bucket: str) -> None:
    """Three calls of today, one from a hostile caller name (in a thread: no event loop of ours here)."""

    async def go() -> None:
        store = open_store(target, bucket)  # type: ignore[arg-type]
        now = datetime.now(UTC)
        try:
            await seed(store, "b-1", now - timedelta(hours=1), caller="03-1234-5678", flags=["harassment"])
            await seed(store, "b-2", now - timedelta(hours=2), caller="090-2222-3333")
            await seed(store, "b-3", now - timedelta(hours=3), caller="0120-000-999", direction="outbound")
        finally:
            store.close()

    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(go())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    index = Path(tmp_path_factory.mktemp("index")) / "index.sqlite"
    with fresh_bucket("kbs") as (target, bucket):
        seed_recordings(target, bucket)
        env = {
            **cli_env(target, bucket),
            "KASUHARA_WEB__PORT": str(closed_port()),
            "KASUHARA_WEB__INDEX_PATH": str(index),
            "KASUHARA_WEB__INDEX_REFRESH_S": "1",
        }
        for name, role, password in ((VIEWER, "viewer", VIEWER_PW), (ADMIN, "admin", ADMIN_PW)):
            made = users(env, "add", name, "--role", role, "--password-stdin", stdin=password + "\n")
            assert made.returncode == 0, made.stderr
        proc = subprocess.Popen(
            cli_command("web"), env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        url = f"http://127.0.0.1:{env['KASUHARA_WEB__PORT']}"
        try:
            with httpx.Client(base_url=url, timeout=5) as client:
                for _ in range(300):
                    with contextlib.suppress(httpx.TransportError):
                        if client.get("/healthz").status_code == 200:
                            break
                    assert proc.poll() is None, proc.communicate()[1]
                    time.sleep(0.1)
                else:
                    pytest.fail("kasuhara web did not answer")
            yield Console(url)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=30)
            assert "Traceback" not in stderr, stderr


async def log_in(watch: Watched, console: Console, name: str, password: str) -> Page:
    page = await watch.page()
    await page.goto(f"{console.url}/recordings")
    await page.get_by_label("ユーザー名").fill(name)
    await page.get_by_label("パスワード").fill(password)
    await page.get_by_role("button", name="ログイン").click()
    await page.wait_for_url(f"{console.url}/recordings")
    return page


async def results(page: Page) -> list[str]:
    return [
        (await cell.inner_text()).strip()
        for cell in await page.locator("table.results td.caller .number").all()
    ]


async def wait_indexed(page: Page, console: Console) -> None:
    """Until the console's first index build is done (a deadline, not a timing assertion)."""
    for _ in range(300):
        if await page.locator(".notice").count() == 0 and await page.locator("strong.total").count():
            return
        await asyncio.sleep(0.1)
        await page.goto(f"{console.url}/recordings")
    pytest.fail("the index was never built")


async def test_admin_searches_and_opens_the_audit_page(
    watched: Watched,  # noqa: F811
    console: Console,
) -> None:
    page = await log_in(watched, console, ADMIN, ADMIN_PW)
    await wait_indexed(page, console)
    assert await page.locator("h1").inner_text() == "録音の検索"
    assert await results(page) == ["03-1234-5678", "090-2222-3333", "0120-000-999"]
    await page.get_by_label("発信者番号（部分一致）").fill("2222")
    await page.get_by_role("button", name="検索").click()
    await page.wait_for_url("**/recordings?*caller=2222*")
    assert await results(page) == ["090-2222-3333"]
    await page.get_by_label("発信者番号（部分一致）").fill("")
    await page.get_by_label("フラグ付きのみ").check()
    await page.get_by_role("button", name="検索").click()
    await page.wait_for_url("**flagged=1*")
    assert await results(page) == ["03-1234-5678"]
    assert await page.locator(".badge.flagged").count() == 1
    await watched.screenshot(page, "search-ja")
    # A result links to its recording page (built elsewhere; the link is what this page owes).
    href = await page.locator("table.results a").first.get_attribute("href")
    assert href == "/recordings/b-1"

    await page.get_by_role("link", name="監査ログ").click()
    await page.wait_for_url(f"{console.url}/audit")
    assert await page.locator("h1").inner_text() == "監査ログ"
    for _ in range(100):  # the search's `list` records are written in the background
        if await page.locator("td.by", has_text=f"web:{ADMIN}").count():
            break
        await asyncio.sleep(0.1)
        await page.reload()
    listed = page.locator('td.action[data-action="list"]')
    assert await listed.count() >= 1
    assert await listed.first.inner_text() == "一覧"  # the action's name in the page's language
    await page.get_by_role("button", name="今すぐ検証する").click()
    await page.wait_for_url(f"{console.url}/audit")
    ok = page.locator(".verify-state.ok")
    await ok.wait_for(timeout=60_000)
    assert "改ざんは見つかりませんでした" in await ok.inner_text()
    await watched.screenshot(page, "audit-ja")
    watched.assert_clean()


async def test_viewer_sees_masked_numbers_and_no_audit_link(
    watched: Watched,  # noqa: F811
    console: Console,
) -> None:
    page = await log_in(watched, console, VIEWER, VIEWER_PW)
    await wait_indexed(page, console)
    assert await results(page) == ["••-••••-5678", "•••-••••-3333", "••••-••0-999"]
    assert await page.get_by_role("link", name="監査ログ").count() == 0
    await watched.screenshot(page, "search-viewer-ja")
    response = await page.goto(f"{console.url}/audit")
    assert response is not None and response.status == 403
    watched.assert_clean(allowed_statuses=(403,))
