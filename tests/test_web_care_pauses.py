"""Agents in a recovery pause on the live board: the fold (pure, :mod:`kasuhara_ari.live`), the console's
feed, and the real thing — a pause put into the stack's Asterisk by the service's own code (AstDB entry,
device state, ``agent_cooldown_started`` on mosquitto), shown in the board's "agents pausing" panel, and
ended early by a supervisor's button through ``resume_remote`` (as ``kasuhara care resume``): the AstDB
entry is gone, ``agent_cooldown_ended`` takes the row off every board, the action is audited. A viewer sees
the panel without the button and gets 403 from the URL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from browser import SESSION_LOOP, Watched, browser_session, watched  # noqa: F401  (fixtures)
from test_users_cli import users
from test_web_recording_s3 import http_login
from web_process import console_process

from kasuhara_ari.ami import AmiClient
from kasuhara_ari.audit import CommandEvents
from kasuhara_ari.care.cooldown import DB_FAMILY, Pause, PauseDesk
from kasuhara_ari.config import Config, MqttConfig
from kasuhara_ari.live import LiveBoard
from kasuhara_ari.web.board import BoardClient, BoardFeed

from conftest import STACK_CONFIG, closed_port
from recordings_seed import cli_env
from s3_fixture import S3Target, fresh_bucket, open_store

VIEWER, VIEWER_PW = "ito", "the viewers long passphrase"
SUPERVISOR, SUPERVISOR_PW = "tanaka", "the supervisors long passphrase"
HOSTILE = "<img src=x onerror=alert(1)>\u202e佐藤"


def at(seconds: float = 0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat(timespec="milliseconds")


def started(
    agent: str, call_id: str = "1764720000.1", *, when: str | None = None, until_s: float = 300
) -> dict[str, Any]:
    return {
        "schema": "kasuhara.event/1",
        "event": "agent_cooldown_started",
        "at": when or at(),
        "call_id": call_id,
        "agent": agent,
        "trigger": "flag",
        "until": at(until_s),
    }


def ended(agent: str, call_id: str = "1764720000.1", *, when: str | None = None) -> dict[str, Any]:
    return {"event": "agent_cooldown_ended", "at": when or at(), "call_id": call_id, "agent": agent}


# --- the fold --------------------------------------------------------------------------------------------


def test_a_pause_is_an_agent_on_the_board_never_a_call() -> None:
    board = LiveBoard()
    assert board.apply(started("agent1")) is None
    assert board.calls == {}  # before: the pause's event made a phantom "active" call
    assert list(board.pauses) == ["agent1"] and board.pauses["agent1"].trigger == "flag"
    # A late `ended` from before this pause began does not end it; the real one does.
    board.apply(ended("agent1", when=at(-60)))
    assert "agent1" in board.pauses
    board.apply(ended("agent1"))
    assert board.pauses == {} and board.calls == {}
    # Names that are not endpoint names are not folded in (they become data attributes and keys).
    board.apply(started("x"))
    for bad in ("", "../x", "<b>", "a" * 65, 5):
        board.apply({**started("x"), "agent": bad})
    assert list(board.pauses) == ["x"]
    # A pause whose `ended` was missed goes when its time is up.
    board.apply(started("y", until_s=-1))
    assert board.expire_pauses(datetime.now(UTC)) == ["y"]


def test_the_feed_shows_pauses_of_calls_already_over_and_sends_them_to_browsers() -> None:
    prefix = "kasuhara"
    feed = BoardFeed(MqttConfig(topic_prefix=prefix), people={"agent1": HOSTILE})
    client = feed.subscribe(masked=True)
    assert isinstance(client, BoardClient)
    call = "1764720000.1"
    feed.handle(
        f"{prefix}/calls/{call}/started",
        json.dumps({"event": "started", "call_id": call, "at": at()}).encode(),
    )
    feed.handle(
        f"{prefix}/calls/{call}/ended", json.dumps({"event": "ended", "call_id": call, "at": at()}).encode()
    )
    feed.handle(f"{prefix}/calls/{call}/agent_cooldown_started", json.dumps(started("agent1", call)).encode())
    assert feed.board.calls == {}
    (row,) = feed.pause_rows()
    assert row["agent"] == "agent1" and row["person"] == "<img src=x onerror=alert(1)>\\u202e佐藤"
    sent = []
    while not client.queue.empty():
        sent.append(client.queue.get_nowait())
    assert any(s is not None and s.startswith("event: pauses\n") and "agent1" in s for s in sent), sent
    assert '"pauses":[{"agent":"agent1"' in feed.snapshot(client)
    feed.handle(f"{prefix}/calls/{call}/agent_cooldown_ended", json.dumps(ended("agent1", call)).encode())
    assert feed.pause_rows() == []


# --- the real thing --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Console:
    url: str
    prefix: str
    agent: str
    target: S3Target
    bucket: str


@pytest.fixture
def console(mqtt_broker: Config, asterisk: Config) -> Iterator[Console]:
    prefix = f"kasuhara-pause/{uuid.uuid4().hex[:10]}"
    agent = f"pg{uuid.uuid4().hex[:8]}"
    with fresh_bucket("kwp") as (target, bucket):
        env = {
            **cli_env(target, bucket),
            "KASUHARA_CONFIG": str(STACK_CONFIG),
            "KASUHARA_WEB__PORT": str(closed_port()),
            "KASUHARA_MQTT__ENABLED": "true",
            "KASUHARA_MQTT__TOPIC_PREFIX": prefix,
            "KASUHARA_AGENTS__PEOPLE": json.dumps({agent: HOSTILE}),
        }
        for name, role, password in (
            (VIEWER, "viewer", VIEWER_PW),
            (SUPERVISOR, "supervisor", SUPERVISOR_PW),
        ):
            made = users(env, "add", name, "--role", role, "--password-stdin", stdin=password + "\n")
            assert made.returncode == 0, made.stderr
        with console_process(env) as url:
            yield Console(url, prefix, agent, target, bucket)


@contextlib.asynccontextmanager
async def ami_client(asterisk: Config) -> AsyncIterator[AmiClient]:
    """On the test's own (session) loop: an AMI connection made in a fixture's loop would never answer."""
    client = AmiClient(asterisk.ami.host, asterisk.ami.port, asterisk.ami.username, asterisk.ami.secret)
    await client.wait_ready(timeout=10)
    try:
        yield client
    finally:
        client.close()


async def in_astdb(ami: AmiClient, agent: str) -> bool:
    try:
        resp = await ami.action({"Action": "DBGet", "Family": DB_FAMILY, "Key": agent})
    except Exception:
        return False  # "Database entry not found"
    return bool(resp)


@pytest.mark.integration
@SESSION_LOOP
async def test_a_real_pause_shows_on_the_board_and_a_supervisor_ends_it(
    watched: Watched,  # noqa: F811
    console: Console,
    mqtt_broker: Config,
    asterisk: Config,
) -> None:
    async with ami_client(asterisk) as ami:
        await pause_and_resume(watched, console, mqtt_broker, ami)
    await check_audit(console)


async def pause_and_resume(watched: Watched, console: Console, mqtt_broker: Config, ami: AmiClient) -> None:  # noqa: F811
    agent = console.agent
    viewer = await watched.page()
    await viewer.goto(f"{console.url}/")
    await viewer.get_by_label("ユーザー名").fill(VIEWER)
    await viewer.get_by_label("パスワード").fill(VIEWER_PW)
    await viewer.get_by_role("button", name="ログイン").click()
    await viewer.wait_for_selector('#board-conn[data-state="live"]')

    # The service's code puts the pause into Asterisk and announces it on the broker.
    cfg = dataclasses.replace(
        mqtt_broker, mqtt=dataclasses.replace(mqtt_broker.mqtt, topic_prefix=console.prefix)
    )
    async with CommandEvents(cfg.mqtt) as events:
        desk = PauseDesk(cfg.care, ami, events)
        await desk.apply(Pause(agent, time.time() + 600, "1764720000.9", "flag"))
    try:
        assert await in_astdb(ami, agent)
        row = viewer.locator(f'#pause-rows tr[data-agent="{agent}"]')
        await row.wait_for()
        assert await viewer.locator("#pauses").is_visible()
        assert await row.locator(".badge-pause").inner_text() == "回復のための休憩"
        assert await row.locator("td.person").inner_text() == "<img src=x onerror=alert(1)>\\u202e佐藤"
        assert await viewer.locator("img").count() == 0
        assert await row.locator("button.resume").count() == 0  # a viewer has no button ...
        async with httpx.AsyncClient(base_url=console.url, timeout=30, headers={"Origin": console.url}) as v:
            csrf = await http_login(v, VIEWER, VIEWER_PW)
            got = await v.post("/care/resume", data={"csrf": csrf, "agent": agent})
            assert got.status_code == 403  # ... and the server refuses the URL
        assert await in_astdb(ami, agent)

        sup = await watched.page()  # (the same cookie jar: log the viewer's page out first)
        await viewer.get_by_role("button", name="ログアウト").click()
        await sup.goto(f"{console.url}/")
        await sup.get_by_label("ユーザー名").fill(SUPERVISOR)
        await sup.get_by_label("パスワード").fill(SUPERVISOR_PW)
        await sup.get_by_role("button", name="ログイン").click()
        await sup.wait_for_selector('#board-conn[data-state="live"]')
        sup_row = sup.locator(f'#pause-rows tr[data-agent="{agent}"]')
        await sup_row.wait_for()
        await watched.screenshot(sup, "board-pause-ja")
        await sup_row.locator("button.resume").click()
        await sup.wait_for_function("() => !document.getElementById('board-notice').hidden", timeout=30_000)
        assert await sup.locator("#board-notice").inner_text() == f"{agent} の休憩を終了しました。"
        await sup_row.wait_for(state="detached", timeout=30_000)  # agent_cooldown_ended came back
        assert await sup.locator("#pauses").is_hidden()
        assert not await in_astdb(ami, agent)
        watched.assert_clean()
    finally:
        with contextlib.suppress(Exception):
            await ami.action({"Action": "DBDel", "Family": DB_FAMILY, "Key": agent})


async def check_audit(console: Console) -> None:
    agent = console.agent
    store = open_store(console.target, console.bucket)
    try:
        records = []
        async for obj in store.list_prefix("audit/"):
            data = await store.get_bytes(obj.key)
            assert data is not None
            records.append(json.loads(data))
    finally:
        store.close()
    resumes = [r for r in records if r["action"] == "care_resume"]
    assert [(r["by"], r["target"]) for r in resumes] == [
        (f"web:{SUPERVISOR}", {"agent": agent, "result": "resumed"})
    ]
