"""The console in a real browser: headless Chromium from Debian's packages (tests/browser.py) against
``kasuhara web`` as the operator starts it, with accounts made by ``kasuhara users`` in a bucket on the
stack's S3 server. What a Japanese viewer sees and clicks, with no CSP violation and no console error.

These tests use their own port and bucket (no shared state): they run beside others under xdist and are not
in the serial ``asterisk`` group. They run on pytest-asyncio's session loop, where the one browser of the
session lives (tests/browser.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
from browser import SESSION_LOOP, Watched, browser_session, drawn_as_tofu, platform_fonts, watched  # noqa: F401  (fixtures)
from test_users_cli import users
from web_process import console_process

from conftest import closed_port
from recordings_seed import cli_env
from s3_fixture import fresh_bucket

if TYPE_CHECKING:
    from playwright.async_api import Page

pytestmark = [pytest.mark.integration, SESSION_LOOP]

VIEWER, VIEWER_PW = "ito", "the viewers long passphrase"
ADMIN, ADMIN_PW = "sato", "the admins long passphrase"
CJK_FONT = "Noto Sans CJK JP"


@dataclass(frozen=True)
class Console:
    url: str


@pytest.fixture(scope="module")
def console() -> Iterator[Console]:
    """One ``kasuhara web`` (subprocess, own port) on a fresh bucket with a viewer and an admin made by the
    CLI, shared by this module's tests; SIGTERM after, and no traceback in its log."""
    with fresh_bucket("kb") as (target, bucket):
        env = {**cli_env(target, bucket), "KASUHARA_WEB__PORT": str(closed_port())}
        for name, role, password in ((VIEWER, "viewer", VIEWER_PW), (ADMIN, "admin", ADMIN_PW)):
            made = users(env, "add", name, "--role", role, "--password-stdin", stdin=password + "\n")
            assert made.returncode == 0, made.stderr
        with console_process(env) as url:
            yield Console(url)


async def log_in(watch: Watched, console: Console, name: str, password: str) -> Page:
    """Through the form, by its Japanese labels, as a person would."""
    page = await watch.page()
    await page.goto(f"{console.url}/")
    assert page.url.startswith(f"{console.url}/login")
    await page.get_by_label("ユーザー名").fill(name)
    await page.get_by_label("パスワード").fill(password)
    await page.get_by_role("button", name="ログイン").click()
    return page


async def assert_rendered_with_cjk_font(page: Page, selector: str) -> None:
    fonts = await platform_fonts(page, selector)
    assert CJK_FONT in fonts and fonts[CJK_FONT] > 0, (
        f"{selector} drawn with {fonts} (fonts-noto-cjk missing?)"
    )
    tofu = await drawn_as_tofu(page, selector)
    assert not tofu, f"{selector}: {tofu} drawn as missing-glyph boxes"


async def test_viewer_logs_in_in_japanese_switches_to_english_and_logs_out(
    watched: Watched,  # noqa: F811
    console: Console,
) -> None:
    page = await watched.page()
    await page.goto(f"{console.url}/")
    # Not logged in: the login page, in Japanese for a Japanese browser.
    assert page.url.startswith(f"{console.url}/login")
    assert await page.locator("h1").inner_text() == "ログイン"
    assert (
        await page.get_by_label("ユーザー名").is_visible()
        and await page.get_by_label("パスワード").is_visible()
    )
    await assert_rendered_with_cjk_font(page, "h1")
    await watched.screenshot(page, "login-ja")

    await page.get_by_label("ユーザー名").fill(VIEWER)
    await page.get_by_label("パスワード").fill(VIEWER_PW)
    await page.get_by_role("button", name="ログイン").click()
    await page.wait_for_url(f"{console.url}/")
    assert await page.locator("h1").inner_text() == "通話ボード"
    assert await page.locator(".who").inner_text() == VIEWER
    assert await page.locator(".role").inner_text() == "閲覧者"
    await assert_rendered_with_cjk_font(page, "h1")
    await assert_rendered_with_cjk_font(page, ".board-empty, .banner")  # (no [mqtt] here: the banner)
    await watched.screenshot(page, "board-ja")

    # The language button is a POST form with the page's CSRF token; it brings the user back to the board.
    await page.get_by_role("button", name="English").click()
    await page.wait_for_url(f"{console.url}/")
    assert await page.locator("h1").inner_text() == "Call board"
    assert await page.locator(".role").inner_text() == "Viewer"
    assert await page.get_by_role("button", name="English").get_attribute("aria-current") == "true"
    await watched.screenshot(page, "board-en")

    await page.get_by_role("button", name="Log out").click()
    await page.wait_for_url(f"{console.url}/login")
    assert await page.locator("h1").inner_text() == "Log in"
    # Logged out for real: the board sends us back to the login page.
    await page.goto(f"{console.url}/")
    assert page.url.startswith(f"{console.url}/login")
    watched.assert_clean()


async def test_wrong_password_and_unknown_user_show_the_same_generic_error(
    watched: Watched,  # noqa: F811
    console: Console,
) -> None:
    texts = []
    for name, password in ((ADMIN, "not the password"), ("nobody", "not the password")):
        page = await log_in(watched, console, name, password)
        alert = page.get_by_role("alert")
        texts.append(await alert.inner_text())
        assert page.url.startswith(f"{console.url}/login")
    assert texts == ["ユーザー名またはパスワードが正しくありません。"] * 2, texts
    # The failed logins answer 401, which Chromium notes on the console; nothing else may appear.
    watched.assert_clean(allowed_statuses=(401,))


async def test_viewer_typing_the_admin_download_url_is_refused_by_the_server(
    watched: Watched,  # noqa: F811
    console: Console,
) -> None:
    page = await log_in(watched, console, VIEWER, VIEWER_PW)
    await page.wait_for_url(f"{console.url}/")
    response = await page.goto(f"{console.url}/recordings/1732800000.1/download")
    assert response is not None and response.status == 403
    assert "この操作の権限がありません。" in await page.locator("main").inner_text()
    await watched.screenshot(page, "forbidden-ja")
    watched.assert_clean(allowed_statuses=(403,))


async def test_the_watch_catches_csp_violations_console_errors_and_tofu(watched: Watched) -> None:  # noqa: F811
    """The checks above cannot pass by seeing nothing: a page with the console's CSP and an inline script
    is reported twice (violation + console error), and a character no installed font has is not drawn
    with the CJK font."""
    csp = "default-src 'none'; script-src 'self'; style-src 'self'"
    body = (
        "<!doctype html><html lang=ja><meta charset=utf-8><body>"
        "<p id=ja>通話ボード</p><p id=tofu>\U000f0001\U000f0002</p>"
        "<script>console.error('inline ran')</script></body></html>"
    )
    await watched.context.route(
        "http://console.invalid/**",
        lambda route: route.fulfill(
            status=200,
            content_type="text/html; charset=utf-8",
            headers={"content-security-policy": csp},
            body=body,
        ),
    )
    page = await watched.page()
    await page.goto("http://console.invalid/")
    await page.wait_for_function("document.readyState === 'complete'")
    for _ in range(100):  # the violation reaches Python through a binding, asynchronously
        if watched.csp_violations:
            break
        await page.wait_for_timeout(50)
    with pytest.raises(AssertionError, match="script-src"):
        watched.assert_clean()
    assert any("Content Security Policy" in e for e in watched.console_errors), watched.console_errors
    assert CJK_FONT in await platform_fonts(page, "#ja")
    assert await drawn_as_tofu(page, "#ja") == []
    assert await drawn_as_tofu(page, "#tofu") == ["\U000f0001", "\U000f0002"]
