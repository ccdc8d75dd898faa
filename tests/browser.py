"""Headless Chromium from Debian's packages, driven by Playwright, for the console's browser tests.

One browser per test session (starting it costs about a second), a fresh context (cookies, storage) per
test. Playwright's async API on pytest-asyncio's session event loop: test modules using these fixtures mark
their tests ``pytest.mark.asyncio(loop_scope="session")`` (see SESSION_LOOP). The sync API is not an option:
it leaves its own loop marked as running in the thread, and every asyncio test that an xdist worker runs
after it fails with "Runner.run() cannot be called from a running event loop".

Every page of a context is watched: console errors, uncaught exceptions and Content-Security-Policy
violations are collected so that a test can assert none happened. Screenshots go to
``$KASUHARA_TEST_ARTIFACTS`` (default ``/tmp/kasuhara-artifacts``), one directory per test.

Playwright never downloads a browser here (it cannot: only package registries are reachable): the tests
launch the system ``chromium`` by its path, and ``PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1`` is set for any
install step that might try.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio

from conftest import skip_or_fail

if TYPE_CHECKING:
    from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Page

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")

#: The browser: Debian's chromium (`scripts/bootstrap` installs it); KASUHARA_CHROMIUM overrides the path.
CHROMIUM = os.environ.get("KASUHARA_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("KASUHARA_TEST_ARTIFACTS", "/tmp/kasuhara-artifacts"))
# Chromium refuses to start its sandbox as root (CI and the dev machines run as root); as an ordinary user
# the sandbox stays on. The pages under test are our own console on 127.0.0.1, nothing from the internet.
CHROMIUM_ARGS = ["--no-sandbox"] if os.geteuid() == 0 else []

# Reports every CSP violation to Python, across navigations (an exposed binding survives page loads and is
# not subject to the page's CSP, unlike an inline script of ours would be).
CSP_LISTENER = """
document.addEventListener('securitypolicyviolation', (e) => {
  window.__kasuharaCsp(`${e.effectiveDirective} blocked ${e.blockedURI} on ${e.documentURI}`);
});
"""

#: The mark for browser tests: they run on the session's event loop, where the browser lives.
SESSION_LOOP = pytest.mark.asyncio(loop_scope="session")

FAILED_LOAD = re.compile(r"Failed to load resource: the server responded with a status of (\d+)")


@dataclass
class BrowserSession:
    """The session's browser and what starting it took (reported once per test)."""

    browser: Browser
    start_s: float


@dataclass
class Watched:
    """A test's browser context with everything its pages complained about."""

    context: BrowserContext
    artifacts: Path
    console_errors: list[str] = field(default_factory=list)
    csp_violations: list[str] = field(default_factory=list)
    screenshots: list[Path] = field(default_factory=list)

    async def page(self) -> Page:
        return await self.context.new_page()

    async def screenshot(self, page: Page, name: str) -> Path:
        """A full-page PNG in this test's artefacts directory."""
        path = self.artifacts / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"
        await page.screenshot(path=str(path), full_page=True)
        self.screenshots.append(path)
        return path

    def assert_clean(self, *, allowed_statuses: tuple[int, ...] = ()) -> None:
        """No CSP violation, no console error except the browser's own note on an HTTP error status the
        test asked for (a 401 after a wrong password, a 403 for a forbidden page)."""
        assert not self.csp_violations, self.csp_violations
        unexpected = [
            text
            for text in self.console_errors
            if not ((m := FAILED_LOAD.search(text)) and int(m.group(1)) in allowed_statuses)
        ]
        assert not unexpected, unexpected


def _require_playwright() -> Any:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        skip_or_fail("the Python driver playwright is not installed (pip install -e '.[test]')")
    return async_playwright


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def browser_session() -> AsyncIterator[BrowserSession]:
    """Headless system Chromium, once per test session (per xdist worker)."""
    async_playwright = _require_playwright()
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        found = shutil.which("chromium")
        skip_or_fail(
            f"{CHROMIUM} is not there{f' (chromium is {found})' if found else ''}: run scripts/bootstrap"
        )
    started = time.monotonic()
    async with async_playwright() as driver:
        browser = await driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield BrowserSession(browser, time.monotonic() - started)
        finally:
            await browser.close()


@pytest_asyncio.fixture(loop_scope="session")
async def watched(
    browser_session: BrowserSession,
    request: pytest.FixtureRequest,
    record_property: Callable[[str, object], None],
) -> AsyncIterator[Watched]:
    """A fresh context for one test (a Japanese browser: ja-JP locale, Tokyo time, 1280×800), with every
    page watched; where the screenshots went and the timings go to the pytest summary."""
    started = time.monotonic()
    artifacts = ARTIFACTS / re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(artifacts)
    artifacts.mkdir(parents=True)
    context = await browser_session.browser.new_context(
        locale="ja-JP", timezone_id="Asia/Tokyo", viewport={"width": 1280, "height": 800}
    )
    context.set_default_timeout(10_000)
    watch = Watched(context, artifacts)

    def on_csp_violation(text: str) -> None:
        watch.csp_violations.append(text)

    await context.expose_function("__kasuharaCsp", on_csp_violation)
    await context.add_init_script(CSP_LISTENER)

    def on_page(page: Page) -> None:
        def on_console(message: ConsoleMessage) -> None:
            if message.type == "error":
                source = message.location.get("url") or page.url
                watch.console_errors.append(f"{source}: {message.text}")

        page.on("console", on_console)
        page.on("pageerror", lambda exc: watch.console_errors.append(f"{page.url}: uncaught {exc}"))

    context.on("page", on_page)
    # Recorded before the test runs: properties recorded at teardown do not reach the call's report, which
    # is what conftest.pytest_terminal_summary prints. Per-test times: pytest --durations.
    record_property(
        "report",
        f"  screenshots in {artifacts}\n"
        f"  chromium {browser_session.browser.version} (system, headless) started in "
        f"{browser_session.start_s:.2f} s once per session; this test's context in "
        f"{time.monotonic() - started:.2f} s",
    )
    try:
        yield watch
    finally:
        await context.close()


async def platform_fonts(page: Page, selector: str) -> dict[str, int]:
    """The fonts Chromium actually drew the element's text with (family -> glyph count), from the DevTools
    protocol: proves that Japanese text is rendered with a CJK font, not as missing-glyph boxes."""
    cdp = await page.context.new_cdp_session(page)
    try:
        await cdp.send("DOM.enable")
        await cdp.send("CSS.enable")
        root = (await cdp.send("DOM.getDocument"))["root"]["nodeId"]
        node = (await cdp.send("DOM.querySelector", {"nodeId": root, "selector": selector}))["nodeId"]
        assert node, selector
        fonts = (await cdp.send("CSS.getPlatformFontsForNode", {"nodeId": node}))["fonts"]
        return {f["familyName"]: int(f["glyphCount"]) for f in fonts}
    finally:
        await cdp.detach()


# Draws each character of the element's text, in the element's font family at 48 px, on a canvas, and the
# same for a private-use character no font has (a missing-glyph box, "tofu"): returns the characters whose
# pixels equal the tofu's. Without a CJK font every Japanese character comes back.
_TOFU_JS = """
(el) => {
  const family = getComputedStyle(el).fontFamily;
  const draw = (ch) => {
    const canvas = document.createElement('canvas');
    canvas.width = 64; canvas.height = 64;
    const ctx = canvas.getContext('2d');
    ctx.font = `48px ${family}`;
    ctx.textBaseline = 'top';
    ctx.fillText(ch, 4, 4);
    return Array.from(ctx.getImageData(0, 0, 64, 64).data).join(',');
  };
  const tofu = draw('\\u{F0001}');
  return Array.from(el.textContent.trim()).filter((ch) => ch.trim() && draw(ch) === tofu);
}
"""


async def drawn_as_tofu(page: Page, selector: str) -> list[str]:
    """The characters of the element's text that Chromium draws as missing-glyph boxes (none, when the
    fonts are installed)."""
    chars: list[str] = await page.locator(selector).first.evaluate(_TOFU_JS)
    return chars
