"""The console's skeleton (`kasuhara web`): login, sessions, CSRF, headers, rate limit, roles, i18n.

The app runs under a real uvicorn server on a loopback port and is driven with httpx over the socket
(raw HTTP/1.1 where httpx would tidy the path). Accounts are a fake (tests/web_fakes.py); the clock is
injected so expiry and lockouts are tested without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any, cast
from urllib.parse import quote

import httpx
import pytest
import uvicorn

from kasuhara_ari.accounts import Accounts, Role
from kasuhara_ari.config import Config, ConfigError, WebConfig, load
from kasuhara_ari.web import create_app
from kasuhara_ari.web.i18n import choose_language
from kasuhara_ari.web.security import CSP, safe_next
from kasuhara_ari.web.sessions import ROLE_RECHECK_S, LoginLimiter, SessionStore

from conftest import REPO
from web_fakes import FakeAccounts, FakeClock

PASSWORD = "correct horse battery staple"
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


@dataclasses.dataclass
class Console:
    url: str
    accounts: FakeAccounts
    clock: FakeClock
    cfg: Config

    def client(self, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, follow_redirects=False, timeout=10, **kw)


@contextlib.asynccontextmanager
async def serve(web: WebConfig | None = None, *, uvicorn_proxy: bool = True) -> AsyncIterator[Console]:
    """The app under uvicorn on a free loopback port; X-Forwarded-For believed from 127.0.0.1 only (as
    `kasuhara web` does behind a proxy), so tests can speak for several client addresses."""
    cfg = dataclasses.replace(Config(), web=web or WebConfig())
    accounts, clock = FakeAccounts(), FakeClock()
    for name, role in (("viewer1", Role.VIEWER), ("super1", Role.SUPERVISOR), ("admin1", Role.ADMIN)):
        accounts.add(name, role, PASSWORD)
    app = create_app(cfg, cast(Accounts, accounts), clock=clock)
    # uvicorn binds port 0 itself: a socket handed over with serve(sockets=...) answers every request
    # ~40 ms late here (delayed ACK), which would make the whole file slow.
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_config=None,
        access_log=False,
        lifespan="off",
        # uvicorn's own forwarding (test plumbing to speak for several client addresses); off where the
        # console's own handling (web.trusted_proxies, SSO) is under test, as `kasuhara web` runs it.
        proxy_headers=uvicorn_proxy,
        forwarded_allow_ips=["127.0.0.1"],
    )
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # uvicorn <0.29
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield Console(f"http://127.0.0.1:{port}", accounts, clock, cfg)
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def console() -> AsyncIterator[Console]:
    async with serve() as c:
        yield c


async def login_token(client: httpx.AsyncClient, **kw: Any) -> str:
    page = await client.get("/login", **kw)
    assert page.status_code == 200
    match = CSRF_RE.search(page.text)
    assert match
    return match.group(1)


async def login(
    client: httpx.AsyncClient, name: str, password: str = PASSWORD, *, next_path: str | None = None, **kw: Any
) -> httpx.Response:
    token = await login_token(client)
    form = {"csrf": token, "username": name, "password": password}
    if next_path is not None:
        form["next"] = next_path
    return await client.post("/login", data=form, **kw)


async def page_token(client: httpx.AsyncClient) -> str:
    page = await client.get("/")
    assert page.status_code == 200, page.status_code
    match = CSRF_RE.search(page.text)
    assert match
    return match.group(1)


def set_cookie_header(response: httpx.Response, name: str) -> str:
    headers = [v for v in response.headers.get_list("set-cookie") if v.startswith(f"{name}=")]
    assert len(headers) == 1, response.headers.get_list("set-cookie")
    return headers[0]


def cookie_attrs(header: str) -> set[str]:
    return {part.strip().lower() for part in header.split(";")[1:]}


async def raw_get(url: str, path: str) -> tuple[int, bytes]:
    """GET with the path sent byte for byte (httpx would resolve `..` before sending)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


# ------------------------------------------------------------------------------------------------ login


async def test_login_redirects_with_a_strict_httponly_session_cookie(console: Console) -> None:
    async with console.client() as client:
        response = await login(client, "admin1")
        assert response.status_code == 303
        assert response.headers["location"] == "/"
        cookie = set_cookie_header(response, "kasuhara_session")
        attrs = cookie_attrs(cookie)
        assert "httponly" in attrs
        assert "samesite=strict" in attrs
        assert "path=/" in attrs
        assert "secure" not in attrs  # plain http on loopback: a Secure cookie would never come back
        board = await client.get("/")
        assert board.status_code == 200
        assert "admin1" in board.text
        assert "管理者" in board.text  # the role, in Japanese by default


async def test_session_cookie_is_secure_behind_a_tls_proxy() -> None:
    # No X-Forwarded-Proto: the setting alone makes the cookies Secure (a proxy that forgets the header
    # must not downgrade them).
    async with serve(WebConfig(behind_tls_proxy=True)) as console, console.client() as client:
        page = await client.get("/login")
        login_cookie = set_cookie_header(page, "kasuhara_login_csrf")
        assert "secure" in cookie_attrs(login_cookie)
        match = CSRF_RE.search(page.text)
        assert match
        # httpx keeps Secure cookies from an http:// URL: the browser behind the proxy would send it back.
        headers = {"cookie": login_cookie.split(";")[0], "origin": "https://" + console.url[7:]}
        form = {"csrf": match.group(1), "username": "viewer1", "password": PASSWORD}
        response = await client.post("/login", data=form, headers=headers)
        assert response.status_code == 303
        assert "secure" in cookie_attrs(set_cookie_header(response, "kasuhara_session"))
        # Behind TLS the page's origin is https: an http Origin is another site.
        plain = await client.post("/login", data=form, headers={**headers, "origin": console.url})
        assert plain.status_code == 403


async def test_a_new_session_id_at_login_and_a_planted_one_is_never_promoted(console: Console) -> None:
    async with console.client() as client:
        client.cookies.set("kasuhara_session", "planted-by-the-attacker-0123456789abcdef")
        response = await login(client, "viewer1")
        sid = set_cookie_header(response, "kasuhara_session").split(";")[0].split("=", 1)[1]
        assert sid != "planted-by-the-attacker-0123456789abcdef"
        assert len(sid) >= 43  # 256 random bits
    async with console.client() as attacker:
        attacker.cookies.set("kasuhara_session", "planted-by-the-attacker-0123456789abcdef")
        assert (await attacker.get("/")).status_code == 303
    # Logging in again in a browser that has a live session replaces it: the old id is dead.
    async with console.client() as client:
        first = await login(client, "viewer1")
        old = set_cookie_header(first, "kasuhara_session").split(";")[0].split("=", 1)[1]
        second = await login(client, "admin1")
        new = set_cookie_header(second, "kasuhara_session").split(";")[0].split("=", 1)[1]
        assert new != old
    async with console.client(cookies={"kasuhara_session": old}) as stale:
        assert (await stale.get("/")).status_code == 303


async def test_wrong_password_and_unknown_user_get_the_same_answer(console: Console) -> None:
    async with console.client() as client:
        wrong = await login(client, "admin1", "not the password")
        unknown = await login(client, "nobody", "not the password")
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.text == unknown.text
    assert "kasuhara_session" not in wrong.headers.get("set-cookie", "")
    assert "ユーザー名またはパスワードが正しくありません" in wrong.text


async def test_login_failures_are_logged_without_the_password(
    console: Console, caplog: pytest.LogCaptureFixture
) -> None:
    async with console.client() as client:
        await login(client, "admin1", "hunter2-secret")
    failed = [r.getMessage() for r in caplog.records if "login_failed" in r.getMessage()]
    assert failed and "account=admin1" in failed[0]
    assert "hunter2-secret" not in caplog.text


async def test_rate_limit_per_account_across_addresses(console: Console) -> None:
    async with console.client() as client:
        for i in range(5):
            r = await login(client, "admin1", "wrong", headers={"x-forwarded-for": f"10.0.1.{i}"})
            assert r.status_code == 401
        # The sixth try is refused before the password is even checked, from a new address, right or wrong.
        calls = console.accounts.verify_calls
        locked = await login(client, "admin1", PASSWORD, headers={"x-forwarded-for": "10.0.1.99"})
        assert locked.status_code == 429
        assert 1 <= int(locked.headers["retry-after"]) <= 900
        assert console.accounts.verify_calls == calls
        assert "kasuhara_session" not in locked.headers.get("set-cookie", "")
        # Other accounts are not locked by it.
        other = await login(client, "viewer1", headers={"x-forwarded-for": "10.0.1.98"})
        assert other.status_code == 303
        # After the window the account may log in again.
        console.clock.advance(901)
        again = await login(client, "admin1", headers={"x-forwarded-for": "10.0.1.97"})
        assert again.status_code == 303


async def test_rate_limit_per_address_across_accounts(console: Console) -> None:
    async with console.client() as client:
        for i in range(5):
            r = await login(client, f"guess{i}", "wrong", headers={"x-forwarded-for": "10.0.2.7"})
            assert r.status_code == 401
        locked = await login(client, "viewer1", headers={"x-forwarded-for": "10.0.2.7"})
        assert locked.status_code == 429
        assert "retry-after" in locked.headers
        elsewhere = await login(client, "viewer1", headers={"x-forwarded-for": "10.0.2.8"})
        assert elsewhere.status_code == 303


# ------------------------------------------------------------------------------------------------- CSRF


async def test_login_without_or_with_a_wrong_csrf_token_is_refused(console: Console) -> None:
    async with console.client() as client:
        token = await login_token(client)
        form = {"username": "admin1", "password": PASSWORD}
        missing = await client.post("/login", data=form)
        wrong = await client.post("/login", data={**form, "csrf": token[:-2] + "xx"})
        assert missing.status_code == wrong.status_code == 403
        assert "kasuhara_session" not in missing.headers.get("set-cookie", "")
        assert "kasuhara_session" not in wrong.headers.get("set-cookie", "")
    # The token alone, without the cookie it was issued with (another browser), is refused too.
    async with console.client() as other:
        alone = await other.post("/login", data={**form, "csrf": token})
        assert alone.status_code == 403


async def test_logout_needs_the_session_csrf_token(console: Console) -> None:
    async with console.client() as client:
        await login(client, "viewer1")
        token = await page_token(client)
        assert (await client.post("/logout", data={})).status_code == 403
        assert (await client.post("/logout", data={"csrf": "x" + token})).status_code == 403
        assert (await client.get("/")).status_code == 200  # still logged in
        done = await client.post("/logout", data={"csrf": token})
        assert done.status_code == 303
        assert done.headers["location"] == "/login"
        assert (await client.get("/")).status_code == 303


async def test_language_switch_needs_a_csrf_token(console: Console) -> None:
    async with console.client() as client:
        await login(client, "viewer1")
        token = await page_token(client)
        refused = await client.post("/lang/en", data={"next": "/"})
        assert refused.status_code == 403
        assert "kasuhara_lang" not in refused.headers.get("set-cookie", "")
        assert "ログアウト" in (await client.get("/")).text
        done = await client.post("/lang/en", data={"csrf": token, "next": "/"})
        assert done.status_code == 303
        assert "kasuhara_lang=en" in done.headers["set-cookie"]
        board = await client.get("/")
        assert "Log out" in board.text and "Administrator" not in board.text
    async with console.client() as anonymous:
        assert (await anonymous.post("/lang/en", data={"csrf": "guess"})).status_code == 403


async def test_a_post_from_another_origin_is_refused(console: Console) -> None:
    async with console.client() as client:
        token = await login_token(client)
        form = {"csrf": token, "username": "admin1", "password": PASSWORD}
        evil = await client.post("/login", data=form, headers={"origin": "http://evil.example"})
        assert evil.status_code == 403
        null = await client.post("/login", data=form, headers={"origin": "null"})
        assert null.status_code == 403
        referer = await client.post("/login", data=form, headers={"referer": "http://evil.example/login"})
        assert referer.status_code == 403
        ours = await client.post("/login", data=form, headers={"origin": console.url})
        assert ours.status_code == 303


# --------------------------------------------------------------------------------------- session life


async def test_idle_session_expires(console: Console) -> None:
    idle = console.cfg.web.session_idle_s
    async with console.client() as client:
        await login(client, "viewer1")
        console.clock.advance(idle - 5)
        assert (await client.get("/")).status_code == 200  # activity restarts the idle clock
        console.clock.advance(idle - 5)
        assert (await client.get("/")).status_code == 200
        console.clock.advance(idle + 1)
        expired = await client.get("/")
        assert expired.status_code == 303
        assert expired.headers["location"] == "/login?next=/"


async def test_session_ends_at_its_absolute_limit_even_when_busy() -> None:
    async with (
        serve(WebConfig(session_idle_s=600, session_max_s=1800)) as console,
        console.client() as client,
    ):
        await login(client, "viewer1")
        for _ in range(5):  # 5 × 300 s of activity: 1500 s, under the limit
            console.clock.advance(300)
            assert (await client.get("/")).status_code == 200
        console.clock.advance(301)  # 1801 s after login
        assert (await client.get("/")).status_code == 303


async def test_a_disabled_user_loses_access_on_the_next_request(console: Console) -> None:
    async with console.client() as client:
        await login(client, "super1")
        assert (await client.get("/")).status_code == 200
        console.accounts.set_disabled("super1", True)
        console.clock.advance(ROLE_RECHECK_S)
        assert (await client.get("/")).status_code == 303
        console.accounts.set_disabled("super1", False)  # the session is gone, not merely paused
        assert (await client.get("/")).status_code == 303


async def test_a_demoted_admin_loses_admin_pages_at_once(console: Console) -> None:
    async with console.client() as client:
        await login(client, "admin1")
        assert (await client.get("/recordings/1795885134.0/download")).status_code == 303
        console.accounts.set_role("admin1", Role.VIEWER)
        console.clock.advance(ROLE_RECHECK_S)
        assert (await client.get("/recordings/1795885134.0/download")).status_code == 403


async def test_accounts_store_away_refuses_with_503_not_a_stale_role(console: Console) -> None:
    async with console.client() as client:
        await login(client, "admin1")
        console.accounts.broken = True
        console.clock.advance(ROLE_RECHECK_S)
        refused = await client.get("/recordings/1795885134.0/download")
        assert refused.status_code == 503
        assert refused.headers["content-security-policy"] == CSP
        assert "Traceback" not in refused.text
        assert (await login(client, "admin1")).status_code == 503
        console.accounts.broken = False
        assert (await client.get("/recordings/1795885134.0/download")).status_code == 303


# -------------------------------------------------------------------------------------------------- roles


@pytest.mark.parametrize(("name", "status"), [("viewer1", 403), ("super1", 403), ("admin1", 303)])
async def test_download_is_for_admins_only_enforced_on_the_server(
    console: Console, name: str, status: int
) -> None:
    async with console.client() as client:
        await login(client, name)
        response = await client.get("/recordings/1795885134.0/download")
        assert response.status_code == status


async def test_download_without_a_session_goes_to_login_and_bad_ids_are_404(console: Console) -> None:
    async with console.client() as client:
        anonymous = await client.get("/recordings/1795885134.0/download")
        assert anonymous.status_code == 303
        assert anonymous.headers["location"] == "/login?next=/recordings/1795885134.0/download"
        await login(client, "admin1")
        assert (await client.get("/recordings/a..b/download")).status_code == 404
        assert (await client.get("/recordings/%2e%2e/download")).status_code == 404


# ----------------------------------------------------------------------------------------- headers, XSS


async def test_security_headers_on_every_kind_of_response(console: Console) -> None:
    async with console.client() as client:
        responses = {
            "200 page": await client.get("/login"),
            "303 redirect": await client.get("/"),
            "404": await client.get("/no/such/page"),
            "405": await client.put("/login"),
            "static": await client.get("/static/console.css"),
            "healthz": await client.get("/healthz"),
        }
        responses["403"] = await client.post("/login", data={"username": "x"})
        await login(client, "viewer1")
        responses["403 role"] = await client.get("/recordings/1795885134.0/download")
    assert responses["static"].status_code == 200
    assert responses["405"].status_code == 405
    assert "GET" in responses["405"].headers["allow"]
    for kind, response in responses.items():
        assert response.headers.get("content-security-policy") == CSP, kind
        assert response.headers.get("x-content-type-options") == "nosniff", kind
        assert response.headers.get("referrer-policy") == "same-origin", kind
    assert "frame-ancestors 'none'" in CSP and "script-src 'self'" in CSP and "unsafe" not in CSP


async def test_templates_have_no_inline_scripts_or_styles(console: Console) -> None:
    async with console.client() as client:
        pages = [await client.get("/login"), await client.get("/nope")]
        await login(client, "admin1")
        pages += [await client.get("/"), await client.get("/recordings/1795885134.0/download")]
    for page in pages:
        # Scripts only as files of our own (the board's board.js): never one with a body.
        assert re.search(r'<script(?![^>]*\ssrc="/static/[a-z]+\.js")', page.text) is None
        assert re.search(r"<script[^>]*>(?!</script>)", page.text) is None
        assert "<style" not in page.text and " style=" not in page.text
        assert re.search(r"\son[a-z]+=", page.text) is None  # no event-handler attributes


async def test_hostile_strings_are_rendered_inert(console: Console) -> None:
    hostile = "<script>alert(1)</script>\u202eevil" + "A" * 10_000
    async with console.client() as client:
        response = await client.get("/x/" + quote(hostile))
    assert response.status_code == 404
    assert "<script>alert(1)" not in response.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in response.text
    assert "\u202e" not in response.text
    assert "\\u202e" in response.text  # shown as a visible escape, not obeyed
    assert len(response.text) < 5_000  # the 10 kB string is cut


async def test_a_hostile_account_name_is_escaped_on_the_board(console: Console) -> None:
    name = "<img src=x>\u202e"
    console.accounts.add(name, Role.VIEWER, PASSWORD)
    async with console.client() as client:
        assert (await login(client, name)).status_code == 303
        board = await client.get("/")
    assert board.status_code == 200
    assert "<img src=x>" not in board.text and "\u202e" not in board.text
    assert "&lt;img src=x&gt;" in board.text


@pytest.mark.parametrize(
    "target",
    [
        "//evil.example",
        "https://evil",
        "/\\evil",
        "/\\/evil.example",
        "http:/evil",
        "\\\\evil",
        "evil",
        "/<script>",
        "/ok\r\nSet-Cookie: x=1",
        "javascript:alert(1)",
        "/\u202e",
    ],
)
async def test_next_never_becomes_an_open_redirect(console: Console, target: str) -> None:
    async with console.client() as client:
        form_page = await client.get("/login", params={"next": target})
        assert 'name="next" value="/"' in form_page.text
        response = await login(client, "viewer1", next_path=target)
    assert response.status_code == 303
    assert response.headers["location"] == "/"


async def test_next_within_the_console_is_honoured(console: Console) -> None:
    async with console.client() as client:
        response = await login(client, "viewer1", next_path="/recordings/1795885134.0/download")
    assert response.headers["location"] == "/recordings/1795885134.0/download"


@pytest.mark.parametrize(
    "path",
    [
        "/static/../app.py",
        "/static/%2e%2e/app.py",
        "/static/..%2fapp.py",
        "/static/%2e%2e%2fapp.py",
        "/static/..%5capp.py",
        "/static/%2e%2e/templates/login.html",
        "/static//etc/passwd",
    ],
)
async def test_static_traversal_is_404(console: Console, path: str) -> None:
    status, body = await raw_get(console.url, path)
    assert status == 404
    assert b"create_app" not in body and b"root:" not in body and b"{%" not in body
    ok, css = await raw_get(console.url, "/static/console.css")
    assert ok == 200 and b"body" in css


# ------------------------------------------------------------------------------------------------ i18n


async def test_japanese_by_default_english_by_accept_language_or_cookie(console: Console) -> None:
    async with console.client() as client:
        assert "ログイン" in (await client.get("/login")).text
        assert "ログイン" in (await client.get("/login", headers={"accept-language": "fr-FR"})).text
        english = await client.get("/login", headers={"accept-language": "en-US,en;q=0.9,ja;q=0.5"})
        assert "Log in" in english.text and 'lang="en"' in english.text
        token = await login_token(client)
        switched = await client.post("/lang/en", data={"csrf": token, "next": "/login"})
        assert switched.status_code == 303 and switched.headers["location"] == "/login"
        # The cookie beats the browser's Accept-Language.
        assert "Log in" in (await client.get("/login", headers={"accept-language": "ja"})).text


def test_choose_language() -> None:
    assert choose_language(None, None) == "ja"
    assert choose_language("en", "ja") == "en"
    assert choose_language("xx", "en") == "en"
    assert choose_language(None, "ja;q=0.4, en;q=0.8") == "en"
    assert choose_language(None, "en;q=0, de") == "ja"
    assert choose_language(None, "en;q=abc") == "ja"


def test_safe_next_keeps_paths_on_this_site() -> None:
    assert safe_next("/recordings/x?page=2") == "/recordings/x?page=2"
    for bad in ("//x", "/\\x", "x", "", None, "https://x", "/" + "a" * 3000, "/a b", '/"x'):
        assert safe_next(bad) == "/", bad


def test_login_limiter_counts_in_a_sliding_window() -> None:
    clock = FakeClock()
    limiter = LoginLimiter(max_failures=3, window_s=100, clock=clock)
    for _ in range(3):
        assert limiter.retry_after("a") == 0
        limiter.failed("a")
        clock.advance(10)
    assert limiter.retry_after("a") == 70  # failures at 0, 10, 20 s; the first leaves the window at 100 s
    clock.advance(70)
    assert limiter.retry_after("a") == 0
    limiter.failed("b")
    limiter.succeeded("b")
    assert limiter.retry_after("b") == 0


def test_session_store_forgets_expired_sessions() -> None:
    clock = FakeClock()
    store = SessionStore(idle_s=10, max_s=100, clock=clock)
    first = store.create("a", Role.VIEWER)
    clock.advance(11)
    store.create("b", Role.VIEWER)
    assert len(store) == 1 and store.get(first.id) is None


def test_an_account_holds_a_bounded_number_of_sessions() -> None:
    clock = FakeClock()
    store = SessionStore(idle_s=1000, max_s=10_000, clock=clock)
    first = store.create("a", Role.VIEWER)
    for _ in range(SessionStore.MAX_PER_ACCOUNT):
        clock.advance(1)
        store.create("a", Role.VIEWER)
    other = store.create("b", Role.VIEWER)
    assert len(store) == SessionStore.MAX_PER_ACCOUNT + 1
    assert store.get(first.id) is None  # the least recently used one went
    assert store.get(other.id) is not None


# ----------------------------------------------------------------------------------------------- config


def test_web_config_checks_proxies_and_limits() -> None:
    cfg = load(env={"KASUHARA_WEB__TRUSTED_PROXIES": "127.0.0.1,10.0.0.0/24"})
    assert cfg.web.trusted_proxies == ("127.0.0.1", "10.0.0.0/24")
    assert cfg.web.bind == "127.0.0.1" and cfg.web.port == 8090 and cfg.web.session_idle_s == 1800
    with pytest.raises(ConfigError, match=r"web\.trusted_proxies"):
        load(env={"KASUHARA_WEB__TRUSTED_PROXIES": "proxy.example"})
    with pytest.raises(ConfigError, match=r"web\.session_idle_s"):
        load(env={"KASUHARA_WEB__SESSION_IDLE_S": "50000"})
    with pytest.raises(ConfigError, match=r"web\.port"):
        load(env={"KASUHARA_WEB__PORT": "70000"})


# -------------------------------------------------------------------------------------------------- CLI


def cli_env(**web: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KASUHARA_")}
    env.update({f"KASUHARA_WEB__{k.upper()}": v for k, v in web.items()})
    env["PYTHONPATH"] = str(REPO)
    return env


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", "192.0.2.10", "console.example"])
def test_kasuhara_web_refuses_a_public_bind_without_tls_or_override(bind: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kasuhara_ari.cli", "web"],
        env=cli_env(bind=bind),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "not a loopback address" in done.stderr
    assert "Traceback" not in done.stderr


async def test_kasuhara_web_serves_on_loopback_and_stops_on_sigterm() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "kasuhara_ari.cli", "web"],
        env=cli_env(port=str(port)),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            for _ in range(300):
                with contextlib.suppress(httpx.TransportError):
                    health = await client.get(f"http://127.0.0.1:{port}/healthz")
                    break
                assert proc.poll() is None, proc.communicate()[1]
                await asyncio.sleep(0.1)
            else:
                pytest.fail("kasuhara web did not answer")
            assert health.text == "ok"
            assert health.headers["content-security-policy"] == CSP
            assert "server" not in health.headers
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    # uvicorn shuts down cleanly, then re-raises the signal it caught (systemd counts that as a clean stop).
    assert proc.returncode in (0, -signal.SIGTERM), stderr
    assert "Shutting down" in stderr and "Traceback" not in stderr


def test_kasuhara_web_exits_1_when_the_port_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = subprocess.run(
            [sys.executable, "-m", "kasuhara_ari.cli", "web"],
            env=cli_env(port=str(taken.getsockname()[1])),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1, done.stderr  # uvicorn's own 3 would read as "refused"
    assert "cannot listen" in done.stderr


def test_kasuhara_web_allows_a_public_bind_behind_a_tls_proxy_or_with_the_override() -> None:
    from kasuhara_ari.config import web_bind_refusal

    public = WebConfig(bind="0.0.0.0")
    assert web_bind_refusal(public) is not None
    for web in (
        dataclasses.replace(public, behind_tls_proxy=True),
        dataclasses.replace(public, allow_insecure_bind=True),
        WebConfig(bind="127.0.0.1"),
        WebConfig(bind="::1"),
        WebConfig(bind="localhost"),
    ):
        assert web_bind_refusal(web) is None, web


# --- single sign-on through a trusted reverse proxy (web.sso_header) -------------------------------------

SSO = "X-Forwarded-User"


@contextlib.asynccontextmanager
async def sso_console(trusted: tuple[str, ...] = ("127.0.0.1",)) -> AsyncIterator[Console]:
    async with serve(WebConfig(sso_header=SSO, trusted_proxies=trusted), uvicorn_proxy=False) as c:
        yield c


def test_sso_header_needs_trusted_proxies_and_a_header_a_proxy_owns() -> None:
    with pytest.raises(ConfigError, match=r"web\.sso_header needs web\.trusted_proxies"):
        load(env={"KASUHARA_WEB__SSO_HEADER": SSO})
    for bad in ("Cookie", "X-Forwarded-For", "X User", "a:b", "x" * 65):
        with pytest.raises(ConfigError, match=r"web\.sso_header"):
            load(env={"KASUHARA_WEB__SSO_HEADER": bad, "KASUHARA_WEB__TRUSTED_PROXIES": "127.0.0.1"})
    cfg = load(env={"KASUHARA_WEB__SSO_HEADER": SSO, "KASUHARA_WEB__TRUSTED_PROXIES": "10.0.0.5"})
    assert cfg.web.sso_header == SSO


async def test_sso_signs_in_the_local_account_the_proxy_names_with_its_local_role() -> None:
    async with sso_console() as console, console.client() as client:
        first = await client.get("/", headers={SSO: "super1"})
        assert first.status_code == 303 and first.headers["location"].startswith("/login?next=")
        signed = await client.get(first.headers["location"], headers={SSO: "super1"})
        assert signed.status_code == 303 and signed.headers["location"] == "/"
        assert "kasuhara_session=" in set_cookie_header(signed, "kasuhara_session")
        board = await client.get("/", headers={SSO: "super1"})
        assert board.status_code == 200
        assert "super1" in board.text and "role-supervisor" in board.text


async def test_sso_refuses_unknown_and_disabled_users_and_never_creates_one() -> None:
    async with sso_console() as console, console.client() as client:
        unknown = await client.get("/login", headers={SSO: "mallory"})
        assert unknown.status_code == 403
        assert "kasuhara_session" not in unknown.headers.get("set-cookie", "")
        assert await console.accounts.get("mallory") is None
        console.accounts.set_disabled("admin1", True)
        disabled = await client.get("/login", headers={SSO: "admin1"})
        assert disabled.status_code == 403
        hostile = await client.get("/login", headers={SSO: "../admin1"})
        assert hostile.status_code == 200 and 'name="password"' in hostile.text  # ignored: the form


async def test_sso_header_from_an_address_that_is_not_a_trusted_proxy_is_ignored() -> None:
    # The test client connects from 127.0.0.1, which is not the configured proxy: its header is a claim.
    async with sso_console(trusted=("10.0.0.5",)) as console, console.client() as client:
        page = await client.get("/login", headers={SSO: "admin1"})
        assert page.status_code == 200 and 'name="password"' in page.text
        assert "kasuhara_session=" not in page.headers.get("set-cookie", "")
        board = await client.get("/", headers={SSO: "admin1"})
        assert board.status_code == 303


async def test_sso_session_ends_when_the_proxy_names_another_user() -> None:
    async with sso_console() as console, console.client() as client:
        await client.get("/login", headers={SSO: "admin1"})
        assert (await client.get("/", headers={SSO: "admin1"})).status_code == 200
        # Same cookie, another user at the proxy: the admin's session must not serve the viewer.
        switched = await client.get("/", headers={SSO: "viewer1"})
        assert switched.status_code == 303
        again = await client.get("/", headers={SSO: "admin1"})
        assert again.status_code == 303  # the old session was dropped, not kept for later


async def test_forwarded_for_is_believed_only_from_trusted_proxies() -> None:
    """The console's own X-Forwarded-For handling (uvicorn's is off in `kasuhara web`): lockouts per
    client address follow the forwarded address from a trusted proxy and the peer's otherwise."""
    async with (
        serve(
            WebConfig(trusted_proxies=("127.0.0.1",), login_max_failures=2), uvicorn_proxy=False
        ) as console,
        console.client() as client,
    ):
        for _ in range(2):
            r = await login(client, "nobody1", "wrong", headers={"x-forwarded-for": "203.0.113.7"})
            assert r.status_code == 401
        locked = await login(client, "viewer1", headers={"x-forwarded-for": "203.0.113.7"})
        assert locked.status_code == 429
        # Spoofed hops left of the proxy's own entry do not change who the client is.
        spoofed = await login(client, "viewer1", headers={"x-forwarded-for": "198.51.100.1, 203.0.113.7"})
        assert spoofed.status_code == 429
        other = await login(client, "viewer1", headers={"x-forwarded-for": "203.0.113.8"})
        assert other.status_code == 303
    async with (
        serve(WebConfig(trusted_proxies=("10.0.0.5",), login_max_failures=2), uvicorn_proxy=False) as console,
        console.client() as client,
    ):
        for i in range(2):
            await login(client, "nobody1", "wrong", headers={"x-forwarded-for": f"203.0.113.{i}"})
        # Not from the trusted proxy: the header is ignored and both failures counted for 127.0.0.1.
        locked = await login(client, "viewer1", headers={"x-forwarded-for": "203.0.113.99"})
        assert locked.status_code == 429


async def test_allowed_hosts_refuse_other_host_names_with_the_security_headers() -> None:
    """DNS rebinding: a page of another site whose name resolves to the console reaches it with its own
    Host; with web.allowed_hosts the console answers only to its names (and the refusal is a response
    like any other: it carries the CSP)."""
    with pytest.raises(ConfigError, match=r"web\.allowed_hosts"):
        load(env={"KASUHARA_WEB__ALLOWED_HOSTS": "bad host/"})
    web = WebConfig(allowed_hosts=("127.0.0.1", "console.example.jp"))
    async with serve(web) as console, console.client() as client:
        assert (await client.get("/login")).status_code == 200
        named = await client.get("/login", headers={"host": "console.example.jp"})
        assert named.status_code == 200
        rebound = await client.get("/login", headers={"host": "attacker.example"})
        assert rebound.status_code == 400
        assert rebound.headers["content-security-policy"] == CSP
    async with serve() as console, console.client() as client:
        # Not configured: any Host, as before.
        assert (await client.get("/login", headers={"host": "attacker.example"})).status_code == 200
