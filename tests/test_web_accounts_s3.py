"""The console with its real accounts: users made by ``kasuhara users`` in the bucket (the stack's S3
server), ``kasuhara web`` as the operator starts it, a client speaking HTTP to it over a socket."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator, Iterator, Mapping

import httpx
import pytest
from test_users_cli import users
from test_web_auth import login, page_token
from web_process import console_process

from conftest import REPO, closed_port
from recordings_seed import cli_command, cli_env
from s3_fixture import fresh_bucket

pytestmark = pytest.mark.integration

ADMIN_PW = "the admins long passphrase"
VIEWER_PW = "the viewers long passphrase"


@pytest.fixture
def env() -> Iterator[dict[str, str]]:
    with fresh_bucket("kw") as (target, bucket):
        yield {**cli_env(target, bucket), "KASUHARA_WEB__PORT": str(closed_port())}


@contextlib.asynccontextmanager
async def running_console(env: Mapping[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    """``kasuhara web`` in a subprocess (tests/web_process.py) and a client for it."""
    with console_process(env) as base:
        async with httpx.AsyncClient(base_url=base, timeout=10, headers={"Origin": base}) as client:
            yield client


async def test_users_made_with_the_cli_log_in_and_their_roles_hold(env: dict[str, str]) -> None:
    assert (
        users(env, "add", "sato", "--role", "admin", "--password-stdin", stdin=ADMIN_PW + "\n").returncode
        == 0
    )
    assert (
        users(env, "add", "ito", "--role", "viewer", "--password-stdin", stdin=VIEWER_PW + "\n").returncode
        == 0
    )
    async with running_console(env) as admin:
        assert (await login(admin, "sato", "not the password")).status_code != 303
        assert (await login(admin, "sato", ADMIN_PW)).status_code == 303
        board = await admin.get("/")
        assert board.status_code == 200 and "sato" in board.text
        await page_token(admin)
        # An admin-only URL: admins pass the role check (a GET of the download URL leads to the
        # recording page, where the download is a POST with a reason).
        assert (await admin.get("/recordings/1732800000.1/download")).status_code == 303

        async with httpx.AsyncClient(
            base_url=str(admin.base_url), headers=admin.headers, timeout=10
        ) as viewer:
            assert (await login(viewer, "ito", VIEWER_PW)).status_code == 303
            assert (await viewer.get("/recordings/1732800000.1/download")).status_code == 403
            # An admin disables the viewer with the CLI: the console refuses them from the next request on
            # (roles are re-read from the bucket within seconds).
            assert users(env, "disable", "ito").returncode == 0
            for _ in range(50):
                page = await viewer.get("/", follow_redirects=False)
                if page.status_code != 200:
                    break
                await asyncio.sleep(0.2)
            assert page.status_code == 303 and "/login" in page.headers["location"], page.status_code
            assert (await login(viewer, "ito", VIEWER_PW)).status_code != 303


def doctor_web(env: Mapping[str, str]) -> dict[str, object]:
    import json

    done = subprocess.run(
        cli_command("doctor", "--json"), env=dict(env), cwd=REPO, capture_output=True, text=True, timeout=120
    )
    checks = json.loads(done.stdout)
    web = checks["web"]
    assert isinstance(web, dict)
    return web


async def test_doctor_reports_the_console_accounts_and_whether_it_answers(env: dict[str, str]) -> None:
    """`kasuhara doctor` reads the console's accounts with the console's keys from the real S3 server,
    says when there are none yet, and whether a console answers on [web] bind/port."""
    none_yet = doctor_web(env)
    assert none_yet["ok"] is True and "no console accounts yet" in str(none_yet["detail"])
    assert "not running" in str(none_yet["detail"])
    assert (
        users(env, "add", "sato", "--role", "admin", "--password-stdin", stdin=ADMIN_PW + "\n").returncode
        == 0
    )
    async with running_console(env):
        running = await asyncio.to_thread(doctor_web, env)
    assert running["ok"] is True, running
    assert "console answering" in str(running["detail"]) and "1 enabled account(s), 1 admin" in str(
        running["detail"]
    )
    refused = doctor_web({**env, "KASUHARA_WEB__BIND": "0.0.0.0"})
    assert refused["ok"] is False and "not a loopback address" in str(refused["detail"])
    # (moto accepts any key, so the server is made unreachable instead of the key wrong.)
    away = doctor_web({**env, "KASUHARA_STORAGE__ENDPOINT": f"127.0.0.1:{closed_port()}"})
    assert away["ok"] is False and "unreadable" in str(away["detail"])
