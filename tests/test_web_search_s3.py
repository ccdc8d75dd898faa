"""The console's search over the stack's real S3 server: recordings written as the uploader writes them are
found through the index, and a recording (and a hold) added while the console runs appears after the
index's next refresh. The console is the real app under uvicorn, its store a MinioStore on a fresh bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import httpx
import pytest
import uvicorn
from test_web_auth import PASSWORD, login

from kasuhara_ari.accounts import Accounts, Role
from kasuhara_ari.config import Config, StorageConfig, WebConfig
from kasuhara_ari.events import NullEvents
from kasuhara_ari.storage import MinioStore
from kasuhara_ari.web import create_app
from kasuhara_ari.web.search import index_of

from recordings_seed import hold, seed
from s3_fixture import S3Target, fresh_bucket, open_store
from web_fakes import FakeAccounts, FakeClock

pytestmark = pytest.mark.integration


@pytest.fixture
def bucket() -> Iterator[tuple[S3Target, str]]:
    with fresh_bucket("ksrch") as made:
        yield made


@contextlib.asynccontextmanager
async def console(tmp_path: Path, target: S3Target, store: MinioStore) -> AsyncIterator[str]:
    cfg = dataclasses.replace(
        Config(),
        storage=StorageConfig(endpoint=target.endpoint, bucket=store.bucket),
        web=WebConfig(index_path=str(tmp_path / "index.sqlite"), index_refresh_s=1),
    )
    accounts = FakeAccounts()
    accounts.add("super1", Role.SUPERVISOR, PASSWORD)
    app = create_app(cfg, cast(Accounts, accounts), clock=FakeClock(), store=store, events=NullEvents())
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False, lifespan="on")
    )
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        index = index_of(app.state.console)
        assert index is not None
        for _ in range(3000):  # a deadline for the first build, not a timing assertion
            if index.state.built_at:
                break
            await asyncio.sleep(0.02)
        assert index.state.built_at, f"index never built ({index.state.last_error})"
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        await task


def found(html: str) -> list[str]:
    return re.findall(r"<tr>\s*<td><a href=\"/recordings/([^\"]+)\"", html)


async def test_console_search_finds_s3_recordings_and_new_ones_after_a_refresh(
    tmp_path: Path, bucket: tuple[S3Target, str]
) -> None:
    target, name = bucket
    store = open_store(target, name)
    now = datetime.now(UTC)
    try:
        await seed(store, "s3-old", now - timedelta(days=3), caller="03-1111-2222")
        flagged = await seed(store, "s3-flag", now - timedelta(hours=1), flags=["harassment"])
        async with (
            console(tmp_path, target, store) as url,
            httpx.AsyncClient(base_url=url, timeout=30) as client,
        ):
            assert (await login(client, "super1")).status_code == 303
            page = await client.get("/recordings")
            assert found(page.text) == ["s3-flag", "s3-old"]
            assert found((await client.get("/recordings", params={"caller": "1111"})).text) == ["s3-old"]
            assert found((await client.get("/recordings", params={"flagged": "1"})).text) == ["s3-flag"]
            assert found((await client.get("/recordings", params={"held": "1"})).text) == []
            # While the console runs: a new call is stored and the flagged one is held.
            await seed(store, "s3-new", now - timedelta(minutes=1), direction="outbound")
            await hold(store, flagged)
            for _ in range(600):  # until the refresh (every second) has seen both; a deadline only
                page = await client.get("/recordings")
                held = await client.get("/recordings", params={"held": "1"})
                if "s3-new" in found(page.text) and found(held.text) == ["s3-flag"]:
                    break
                await asyncio.sleep(0.1)
            assert found(page.text) == ["s3-new", "s3-flag", "s3-old"]
            assert found(held.text) == ["s3-flag"]
            assert held.text.count('class="badge held"') == 1
            outbound = await client.get("/recordings", params={"direction": "outbound"})
            assert found(outbound.text) == ["s3-new"]
    finally:
        store.close()
