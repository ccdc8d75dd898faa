"""The live board in a real browser, fed by a REAL call: SIPp phones through the stack's Asterisk, the
call service in-process publishing to the stack's mosquitto, ``kasuhara web`` as a subprocess, headless
Chromium (tests/browser.py).

A viewer sees the call appear, sees ``flagged`` after the agent's ``*1`` and sees the call leave at
hang-up, with the caller's number masked; a supervisor clicks "listen" and their SIPp phone is rung
through the same SupervisionSession as ``kasuhara supervise``; a viewer's POST to join is refused (403).
The delay from each event's ``at`` to the DOM update is measured in the browser and reported, never
asserted. A Japanese screenshot of the board with the flagged call goes to the artefacts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from browser import SESSION_LOOP, BrowserSession, Watched, browser_session, watched  # noqa: F401  (fixtures)
from test_users_cli import audit_records, users
from web_process import console_process

from kasuhara_ari.config import Config
from kasuhara_ari.service import Service

from conftest import REPO, STACK_CONFIG, closed_port
from escalation_helpers import clean_spool, stop_all, supervisor_endpoint, supervisor_phone, wait_for_files
from recordings_seed import cli_env
from s3_fixture import fresh_bucket
from sip import agent_port, answering, caller, free_udp_port

pytestmark = [pytest.mark.integration, SESSION_LOOP]

VIEWER, VIEWER_PW = "ito", "the viewers long passphrase"
SUPERVISOR, SUPERVISOR_PW = "kato", "the supervisors long passphrase"
CALLER_NUMBER = "0312345678"
SCREENSHOT = REPO / "docs" / "screenshots" / "console-board-ja.png"

# Installed in the page by the test (through DevTools, not the page's CSP): every change of a row, with
# the browser's clock, so the delay from an event's `at` to the DOM is measured where the user sees it.
RECORD_ROWS = """
() => {
  window.__rows = [];
  const seen = new Map();
  const note = () => {
    const now = Date.now();
    const present = new Set();
    for (const tr of document.querySelectorAll('#board-rows tr.call')) {
      const key = `${tr.dataset.state}|${tr.dataset.badges}|${tr.dataset.at}`;
      present.add(tr.dataset.callId);
      if (seen.get(tr.dataset.callId) !== key) {
        seen.set(tr.dataset.callId, key);
        window.__rows.push({call: tr.dataset.callId, state: tr.dataset.state, badges: tr.dataset.badges,
                            at: tr.dataset.at, t: now});
      }
    }
    for (const id of Array.from(seen.keys())) {
      if (!present.has(id)) {
        seen.delete(id);
        window.__rows.push({call: id, gone: true, t: now});
      }
    }
  };
  new MutationObserver(note).observe(document.getElementById('board-rows'), {childList: true, subtree: true});
}
"""


@dataclasses.dataclass(frozen=True)
class WebConsole:
    url: str
    prefix: str
    #: The supervisor's SIPp phone (the account's endpoint).
    sup_port: int
    env: dict[str, str]


@pytest.fixture
def board_web(mqtt_broker: Config) -> Iterator[WebConsole]:
    """``kasuhara web`` on the stack's config (ARI, mosquitto) with its own bucket, port and MQTT prefix;
    a viewer and a supervisor (with the phone the board rings for them) made by the real CLI."""
    prefix = f"kasuhara-board/{uuid.uuid4().hex[:10]}"
    with fresh_bucket("kbb") as (target, bucket):
        env = {
            **cli_env(target, bucket),
            "KASUHARA_CONFIG": str(STACK_CONFIG),
            "KASUHARA_WEB__PORT": str(closed_port()),
            "KASUHARA_MQTT__ENABLED": "true",
            "KASUHARA_MQTT__TOPIC_PREFIX": prefix,
        }
        sup_port = free_udp_port(5100, 5999)
        made = users(env, "add", VIEWER, "--role", "viewer", "--password-stdin", stdin=VIEWER_PW + "\n")
        assert made.returncode == 0, made.stderr
        made = users(
            env,
            "add",
            SUPERVISOR,
            "--role",
            "supervisor",
            "--endpoint",
            supervisor_endpoint(sup_port),
            "--password-stdin",
            stdin=SUPERVISOR_PW + "\n",
        )
        assert made.returncode == 0, made.stderr
        with console_process(env) as url:
            yield WebConsole(url, prefix, sup_port, env)


async def log_in(context: Any, url: str, name: str, password: str) -> Any:
    page = await context.new_page()
    await page.goto(f"{url}/")
    await page.get_by_label("ユーザー名").fill(name)
    await page.get_by_label("パスワード").fill(password)
    await page.get_by_role("button", name="ログイン").click()
    await page.wait_for_url(f"{url}/")
    await page.wait_for_selector('#board-conn[data-state="live"]')
    return page


def delays(rows: list[dict[str, Any]], want: Callable[[dict[str, Any]], bool]) -> float | None:
    """Seconds from the event's `at` to the first DOM change that shows it."""
    for row in rows:
        if want(row) and row.get("at"):
            return float(row["t"]) / 1000 - datetime.fromisoformat(row["at"]).timestamp()
    return None


async def test_viewer_sees_a_real_call_flagged_and_gone_and_a_supervisor_listens_from_the_board(
    watched: Watched,  # noqa: F811
    browser_session: BrowserSession,  # noqa: F811
    board_web: WebConsole,
    call_cfg: Config,
    sip_workdir: Path,
    record_property: Callable[[str, object], None],
) -> None:
    cfg = dataclasses.replace(
        call_cfg, mqtt=dataclasses.replace(call_cfg.mqtt, enabled=True, topic_prefix=board_web.prefix)
    )
    service = Service(cfg)  # publishes to MQTT with the retained live snapshots, as `kasuhara serve`
    task = asyncio.create_task(service.run())
    sup_context = await browser_session.browser.new_context(
        locale="ja-JP", timezone_id="Asia/Tokyo", viewport={"width": 1280, "height": 800}
    )
    phones = []
    try:
        await asyncio.wait_for(service.app.connected.wait(), 10)
        await asyncio.sleep(0.3)
        viewer = await log_in(watched.context, board_web.url, VIEWER, VIEWER_PW)
        supervisor_page = await log_in(sup_context, board_web.url, SUPERVISOR, SUPERVISOR_PW)
        # The alert sound is off until the user switches it on; the choice survives a reload.
        assert not await viewer.locator("#board-sound").is_checked()
        await viewer.get_by_label("注意音").check()
        await viewer.reload()
        await viewer.wait_for_selector('#board-conn[data-state="live"]')
        assert await viewer.locator("#board-sound").is_checked()
        await viewer.evaluate(RECORD_ROWS)
        assert await viewer.locator("#board-empty").is_visible()

        sup_port = board_web.sup_port
        port = agent_port()
        supervisor = await supervisor_phone(sip_workdir, sup_port, ring_ms=300, hold_ms=8000).start()
        # The notice (~6 s) plays, the agent answers, presses *1 after 3 s; the caller hangs up 30 s
        # after the answer (time for a loaded machine to click through the rest).
        agent = await answering(sip_workdir, port, ring_ms=500, dtmf=[(3000, "*1")]).start()
        customer = await caller(
            sip_workdir, port, app=cfg.ari.app, call_ms=30000, number=CALLER_NUMBER
        ).start()
        phones = [customer, agent, supervisor]

        row = viewer.locator("#board-rows tr.call")
        await row.first.wait_for(timeout=30_000)
        call_id = await row.first.get_attribute("data-call-id")
        assert call_id
        # The viewer never receives the full number (masked on the server).
        assert CALLER_NUMBER not in await viewer.content()
        assert (await row.first.locator(".number").inner_text()).endswith("5678")

        flagged = viewer.locator('#board-rows tr.call.alert[data-badges~="flagged"]')
        await flagged.wait_for(timeout=30_000)
        assert await flagged.locator(".badge-flagged").inner_text() == "ハラスメント記録"
        # The supervisor clicks "listen": their phone (the account's endpoint) is rung.
        sup_row = supervisor_page.locator(f'#board-rows tr.call[data-call-id="{call_id}"]')
        assert (await sup_row.locator(".number").inner_text()) == CALLER_NUMBER
        await sup_row.get_by_role("button", name="モニター").click()
        notice = supervisor_page.locator("#board-notice")
        await notice.wait_for()
        assert "呼び出しています" in await notice.inner_text(), await notice.inner_text()
        async with asyncio.timeout(20):
            while not supervisor.received("INVITE"):
                await asyncio.sleep(0.1)
        await viewer.locator(f'tr.call[data-call-id="{call_id}"] .badge-supervision').wait_for(timeout=15_000)

        await watched.screenshot(viewer, "board-flagged-ja")
        await watched.screenshot(supervisor_page, "board-supervisor-ja")  # with the join buttons
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        await viewer.screenshot(path=str(SCREENSHOT))
        # A tablet in portrait: the table scrolls inside its box, the page itself does not.
        await viewer.set_viewport_size({"width": 768, "height": 1024})
        assert await viewer.evaluate("document.documentElement.scrollWidth") <= 768
        await watched.screenshot(viewer, "board-flagged-tablet-ja")
        await viewer.set_viewport_size({"width": 1280, "height": 800})

        # A viewer may not join, whatever the page shows: the server refuses.
        csrf = await viewer.locator("#board").get_attribute("data-csrf")
        refused = await viewer.request.post(
            f"{board_web.url}/board/join",
            form={"csrf": csrf or "", "call_id": call_id, "mode": "listen"},
            headers={"origin": board_web.url},
        )
        assert refused.status == 403
        assert await viewer.locator("button.join").count() == 0

        # Hang-up: the row leaves the board.
        assert await customer.wait(90) == 0, customer.error_text()
        await viewer.locator(f'tr.call[data-call-id="{call_id}"]').wait_for(state="detached", timeout=20_000)
        assert await viewer.locator("#board-empty").is_visible()
        with contextlib.suppress(AssertionError):  # only so that the spool is cleaned after the test
            await wait_for_files(call_cfg.recording.host_dir, call_id, timeout=60)
        # The join is in the audit log, by the console user, before the phone rang.
        (record,) = [r for r in audit_records(board_web.env) if r["action"] == "supervise"]
        assert record["by"] == f"web:{SUPERVISOR}" and record["target"] == {"call_id": call_id}
        assert record["details"] == {"mode": "listen", "endpoint": supervisor_endpoint(sup_port)}

        rows: list[dict[str, Any]] = await viewer.evaluate("window.__rows")
        ours = [r for r in rows if r["call"] == call_id]
        appear = delays(ours, lambda r: not r.get("gone"))
        flag = delays(ours, lambda r: "flagged" in (r.get("badges") or ""))
        record_property(
            "report",
            f"  board latency (event `at` -> DOM update, in Chromium): call appeared {appear:.3f} s, "
            f"flagged shown {flag:.3f} s after the event (measured, not asserted)"
            if appear is not None and flag is not None
            else f"  board latency: rows seen {ours}",
        )
        watched.assert_clean(allowed_statuses=(403,))
    finally:
        await stop_all(*phones)
        await sup_context.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        clean_spool()


async def test_hostile_caller_names_are_inert_on_the_board(watched: Watched) -> None:  # noqa: F811
    """The console in-process (fake accounts, the feed handed messages by the test): a caller name with
    markup, a bidi override and 10 kB reaches the page as text only, cut and with visible escapes."""
    from test_board import PREFIX, board_console, ev, started, status
    from test_web_auth import PASSWORD

    from kasuhara_ari.events import encode

    hostile = '<img src=x onerror="window.__pwned=1">\u202eevil' + "A" * 10_000
    async with board_console() as console:
        feed = console.feed
        assert feed is not None
        feed.connected()
        feed.handle(f"{PREFIX}/status", status("b1"))
        feed.handle(f"{PREFIX}/calls/c1/started", encode(started(name=hostile)))
        page = await log_in(watched.context, console.url, "viewer1", PASSWORD)
        row = page.locator('#board-rows tr.call[data-call-id="c1"]')
        await row.wait_for()
        feed.handle(f"{PREFIX}/calls/c1/flagged", encode(ev("flagged", 3)))
        await page.locator('tr.call.alert[data-badges~="flagged"]').wait_for()
        name = await row.locator(".name").inner_text()
        assert await page.locator("#board-rows img").count() == 0
        assert await page.evaluate("window.__pwned") is None
        assert name.startswith('<img src=x onerror="window.__pwned=1">\\u202eevil') and len(name) <= 120
        assert "\u202e" not in await page.content()
        await watched.screenshot(page, "board-hostile-name")
        await page.close()
    watched.assert_clean()
