"""The console's search (/recordings) and audit (/audit) pages: roles, viewer masking, bad input, paging,
the ``list`` audit record, the chain verification on demand.

The app runs under a real uvicorn server (lifespan on: the index's background task builds it) and is
driven with httpx over the socket. Accounts are a fake and recordings live in the in-memory store (pure
logic); the same pages over the stack's S3 are in tests/test_web_search_s3.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import httpx
import pytest
import uvicorn
from test_web_auth import CSRF_RE, PASSWORD, login
from uploader_helpers import metadata

from kasuhara_ari.accounts import Accounts, Role
from kasuhara_ari.config import Config, ConfigError, WebConfig, load
from kasuhara_ari.events import NullEvents
from kasuhara_ari.storage import MemoryStore, recording_keys
from kasuhara_ari.uploader import encode_metadata
from kasuhara_ari.web import create_app
from kasuhara_ari.web.search import index_of

from recordings_seed import iso
from web_fakes import FakeAccounts, FakeClock

NOW = datetime.now(UTC)
HOSTILE_NAME = "<script>alert(1)</script>\u202eevil"


@dataclasses.dataclass
class Site:
    url: str
    store: MemoryStore

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, follow_redirects=False, timeout=20)


async def put_meta(store: MemoryStore, call_id: str, started: datetime, **over: object) -> None:
    keys = recording_keys(call_id, started)
    doc = metadata(call_id, started_at=iso(started), **over)
    await store.put_bytes(keys.metadata, encode_metadata(doc), metadata={})


@contextlib.asynccontextmanager
async def serve(tmp_path: Path, store: MemoryStore, *, index_path: str = "") -> AsyncIterator[Site]:
    web = WebConfig(index_path=index_path or str(tmp_path / "index.sqlite"), index_refresh_s=1)
    cfg = dataclasses.replace(Config(), web=web)
    accounts = FakeAccounts()
    for name, role in (("viewer1", Role.VIEWER), ("super1", Role.SUPERVISOR), ("admin1", Role.ADMIN)):
        accounts.add(name, role, PASSWORD)
    app = create_app(cfg, cast(Accounts, accounts), clock=FakeClock(), store=store, events=NullEvents())
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        index = index_of(app.state.console)
        assert index is not None
        for _ in range(1000):  # the first rebuild (a deadline, not a timing assertion)
            if index.state.built_at or index.state.last_error:
                break
            await asyncio.sleep(0.02)
        assert index.state.built_at or index_path, "the index was never built"
        port = server.servers[0].sockets[0].getsockname()[1]
        yield Site(f"http://127.0.0.1:{port}", store)
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    store = MemoryStore("web-search")
    t = NOW - timedelta(hours=2)
    await put_meta(store, "c-hostile", t, caller={"number": "03-1234-5678", "name": HOSTILE_NAME})
    await put_meta(
        store,
        "c-flag",
        t - timedelta(minutes=1),
        flags=["harassment"],
        direction="outbound",
        caller={"number": "0120-444-999", "name": "x"},
    )
    async with serve(tmp_path, store) as s:
        yield s


@contextlib.asynccontextmanager
async def logged_in(site: Site, name: str) -> AsyncIterator[httpx.AsyncClient]:
    async with site.client() as client:
        assert (await login(client, name)).status_code == 303
        yield client


def rows(html: str) -> list[str]:
    return re.findall(r"<tr>\s*<td><a href=\"/recordings/([^\"]+)\"", html)


async def test_search_needs_a_login(site: Site) -> None:
    async with site.client() as client:
        response = await client.get("/recordings")
        assert response.status_code == 303
        assert response.headers["location"].startswith("/login")


async def test_viewer_sees_the_caller_masked_and_no_name_supervisor_sees_them_inert(site: Site) -> None:
    async with logged_in(site, "viewer1") as viewer:
        page = await viewer.get("/recordings")
        assert page.status_code == 200
        assert rows(page.text) == ["c-hostile", "c-flag"]
        assert "••-••••-5678" in page.text
        assert "1234" not in page.text.replace("5678", "")  # the hidden digits are not in the page at all
        assert "script" not in page.text.lower().replace("<script", "")  # no name at all for a viewer
        assert "alert(1)" not in page.text
    async with logged_in(site, "super1") as supervisor:
        page = await supervisor.get("/recordings")
        assert "03-1234-5678" in page.text
        assert "<script>alert" not in page.text  # escaped
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
        assert "\u202e" not in page.text  # the bidi override shown as an escape, never raw


async def test_viewer_cannot_search_on_hidden_digits(site: Site) -> None:
    async with logged_in(site, "viewer1") as viewer:
        page = await viewer.get("/recordings", params={"caller": "5678"})
        assert page.status_code == 200 and rows(page.text) == ["c-hostile"]
        # The middle digits would be an oracle for the masked number: refused with a message.
        page = await viewer.get("/recordings", params={"caller": "031234"})
        assert page.status_code == 400
        assert "下4桁" in page.text
        page = await viewer.get("/recordings", params={"caller": "1234"})
        assert rows(page.text) == []  # four digits, but not the last four


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"from": "2026-13-45"}, "YYYY-MM-DD"),
        ({"to": "yesterday"}, "YYYY-MM-DD"),
        ({"from": "2026-12-03T10:00"}, "YYYY-MM-DD"),
        ({"from": "9999-12-31", "to": "0001-01-01"}, "終了日が開始日より前"),
        ({"from": "0001-01-01"}, "YYYY-MM-DD"),  # before UTC's first instant in Tokyo: no overflow 500
        ({"to": "9999-12-31"}, "YYYY-MM-DD"),
        ({"direction": "sideways"}, "着信・発信"),
        ({"min_duration": "-1"}, "最短通話時間"),
        ({"min_duration": "nan"}, "最短通話時間"),
        ({"after": "garbage"}, "ページの指定"),
        ({"caller": "1" * 65}, "長すぎます"),
    ],
)
async def test_bad_input_is_a_message_on_the_form_never_a_500(
    site: Site, params: dict[str, str], message: str
) -> None:
    async with logged_in(site, "super1") as client:
        page = await client.get("/recordings", params=params)
        assert page.status_code == 400, page.text
        assert message in page.text
        assert 'role="alert"' in page.text
        assert '<form method="get" action="/recordings"' in page.text  # the form again, to correct


@pytest.mark.parametrize(
    "params",
    [
        {"agent": "' OR 1=1 --"},
        {"caller": "%"},
        {"caller": "'); DROP TABLE recordings; --"},
        {"agent": "\\"},
        {"caller": "_"},
    ],
)
async def test_sql_hostile_filters_find_nothing_and_break_nothing(site: Site, params: dict[str, str]) -> None:
    async with logged_in(site, "admin1") as client:
        page = await client.get("/recordings", params=params)
        assert page.status_code == 200
        assert rows(page.text) == []
        assert rows((await client.get("/recordings")).text) == ["c-hostile", "c-flag"]


async def test_filters_and_pages_through_the_form(tmp_path: Path) -> None:
    store = MemoryStore("paging")
    for i in range(57):
        await put_meta(store, f"p-{i:03d}", NOW - timedelta(hours=1, minutes=i), duration_s=float(i))
    async with serve(tmp_path, store) as site, logged_in(site, "super1") as client:
        first = await client.get("/recordings")
        assert '<strong class="total">57</strong>' in first.text
        assert rows(first.text) == [f"p-{i:03d}" for i in range(50)]
        nxt = re.search(r'<a href="([^"]+)" rel="next">', first.text)
        assert nxt
        second = await client.get(nxt.group(1).replace("&amp;", "&"))
        assert rows(second.text) == [f"p-{i:03d}" for i in range(50, 57)]
        assert 'rel="next"' not in second.text
        longer = await client.get("/recordings", params={"min_duration": "50"})
        assert rows(longer.text) == [f"p-{i:03d}" for i in range(50, 57)]
        today = NOW.astimezone(UTC).strftime("%Y-%m-%d")
        nothing = await client.get("/recordings", params={"from": "2000-01-01", "to": "2000-01-02"})
        assert rows(nothing.text) == [] and "条件に合う録音はありません" in nothing.text
        assert (await client.get("/recordings", params={"to": today})).status_code == 200


async def audit_records(store: MemoryStore, action: str) -> list[dict[str, object]]:
    out = []
    async for obj in store.list_prefix("audit/"):
        data = await store.get_bytes(obj.key)
        assert data is not None
        doc = json.loads(data)
        if doc["action"] == action:
            out.append(doc)
    return out


async def test_a_search_is_audited_once_not_per_page_view(site: Site) -> None:
    async with logged_in(site, "viewer1") as viewer:
        for _ in range(3):
            assert (await viewer.get("/recordings", params={"direction": "outbound"})).status_code == 200
        await viewer.get("/recordings", params={"flagged": "1"})
        records: list[dict[str, object]] = []
        for _ in range(500):  # written in the background
            records = await audit_records(site.store, "list")
            if len(records) >= 2:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # a wrongly repeated record would have landed by now
        records = await audit_records(site.store, "list")
        assert len(records) == 2, records
        targets = sorted((r["target"] for r in records), key=str)
        assert {"direction": "outbound", "via": "web"} in targets
        assert {"flagged": True, "via": "web"} in targets
        assert all(r["by"] == "web:viewer1" for r in records)
        counts = {json.dumps(r["target"], sort_keys=True): r["details"]["counts"] for r in records}  # type: ignore[index]
        assert counts[json.dumps({"direction": "outbound", "via": "web"}, sort_keys=True)] == {"matched": 1}


async def test_audit_page_is_for_admins_only(site: Site) -> None:
    async with site.client() as anonymous:
        assert (await anonymous.get("/audit")).status_code == 303
    for name in ("viewer1", "super1"):
        async with logged_in(site, name) as client:
            assert (await client.get("/audit")).status_code == 403
            token = CSRF_RE.search((await client.get("/recordings")).text)
            assert token
            assert (await client.post("/audit/verify", data={"csrf": token.group(1)})).status_code == 403
            assert "/audit" not in (await client.get("/recordings")).text  # no link either
    async with logged_in(site, "admin1") as admin:
        assert (await admin.get("/audit")).status_code == 200


async def test_audit_page_lists_filters_and_verifies_on_demand(site: Site) -> None:
    async with logged_in(site, "viewer1") as viewer:
        await viewer.get("/recordings")  # one `list` record by web:viewer1
    async with logged_in(site, "admin1") as admin:
        page = await admin.get("/audit")
        for _ in range(200):
            if "web:viewer1" in page.text:
                break
            await asyncio.sleep(0.05)
            page = await admin.get("/audit")
        assert page.status_code == 200
        assert "web:viewer1" in page.text
        assert "まだ検証していません" in page.text
        assert (await admin.get("/audit", params={"action": "play"})).text.count("web:viewer1") == 0
        assert "web:viewer1" in (await admin.get("/audit", params={"actor": "VIEWER"})).text
        bad = await admin.get("/audit", params={"from": "2026-02-30"})
        assert bad.status_code == 400 and "YYYY-MM-DD" in bad.text
        assert (await admin.get("/audit", params={"call_id": "../../etc"})).status_code == 400
        assert (await admin.get("/audit", params={"action": "<script>"})).status_code == 400
        # The verification is a state change: no CSRF token, no run.
        assert (await admin.post("/audit/verify", data={})).status_code == 403
        token = CSRF_RE.search(page.text)
        assert token
        started = await admin.post("/audit/verify", data={"csrf": token.group(1)})
        assert started.status_code == 303 and started.headers["location"] == "/audit"
        for _ in range(500):
            page = await admin.get("/audit")
            if "検証中" not in page.text:
                break
            await asyncio.sleep(0.02)
        assert "改ざんは見つかりませんでした" in page.text, page.text
        assert "admin1" in page.text


async def test_an_index_that_cannot_be_opened_is_a_503_with_a_reason(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    path = str(blocker / "index.sqlite")
    async with (
        serve(tmp_path, MemoryStore("x"), index_path=path) as site,
        logged_in(site, "admin1") as client,
    ):
        for page_path in ("/recordings", "/audit"):
            page = await client.get(page_path)
            assert page.status_code == 503, page_path
            assert "web.index_path" in page.text
        assert (await client.get("/")).status_code == 200  # the rest of the console works on


async def test_pages_in_english(site: Site) -> None:
    async with logged_in(site, "admin1") as client:
        client.cookies.set("kasuhara_lang", "en")
        page = await client.get("/recordings", params={"from": "2026-02-30"})
        assert page.status_code == 400
        assert "Search recordings" in page.text and "Dates must be valid dates" in page.text
        audit = await client.get("/audit")
        assert audit.status_code == 200 and "Tamper check" in audit.text


def test_index_config_keys_from_the_environment_and_their_bounds() -> None:
    cfg = load(
        None, env={"KASUHARA_WEB__INDEX_PATH": "/srv/idx.sqlite", "KASUHARA_WEB__INDEX_REFRESH_S": "5"}
    )
    assert cfg.web.index_path == "/srv/idx.sqlite" and cfg.web.index_refresh_s == 5
    assert cfg.web.index_reconcile_s == 3600
    for key in ("KASUHARA_WEB__INDEX_REFRESH_S", "KASUHARA_WEB__INDEX_RECONCILE_S"):
        with pytest.raises(ConfigError, match="at least 1"):
            load(None, env={key: "0"})
