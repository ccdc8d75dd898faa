"""The console's ASGI app: login, logout, sessions, CSRF, language, and the pages behind them.

Every decision that protects a page is made here on the server (a hidden button is not a permission):
who is logged in (a server-side session, its role re-read from the accounts store), whether a state change
comes from our own page (CSRF token and Origin), and what the role may do.
"""

from __future__ import annotations

import hmac
import logging
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import jinja2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..accounts import Account, Accounts, Role, role_at_least
from ..config import Config
from ..safe import clean_log_value, is_safe_call_id, printable
from .i18n import LANG_COOKIE, LANGUAGES, MESSAGES, choose_language
from .security import (
    SECURITY_HEADERS,
    SecurityHeaders,
    expected_origin,
    origin_allowed,
    safe_next,
)
from .sessions import ROLE_RECHECK_S, Clock, LoginLimiter, Session, SessionStore, new_token

log = logging.getLogger(__name__)

SESSION_COOKIE = "kasuhara_session"
LOGIN_CSRF_COOKIE = "kasuhara_login_csrf"
MAX_FORM_BYTES = 16 * 1024
MAX_NAME_CHARS = 128
MAX_PASSWORD_CHARS = 1024
HERE = Path(__file__).resolve().parent
TEMPLATES_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"


class FormRejected(Exception):
    """A state-changing request that fails a check: answered with ``status`` and nothing changes."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Console:
    """The app's state (sessions, login failures, templates) and its request handlers."""

    def __init__(self, cfg: Config, accounts: Accounts, clock: Clock) -> None:
        self.cfg = cfg
        self.accounts = accounts
        self.clock = clock
        self.sessions = SessionStore(idle_s=cfg.web.session_idle_s, max_s=cfg.web.session_max_s, clock=clock)
        self.limiter = LoginLimiter(
            max_failures=cfg.web.login_max_failures, window_s=cfg.web.login_window_s, clock=clock
        )
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        # Everything from outside shown on a page goes through `shown` as well as autoescape: control and
        # bidi characters (U+202E would reverse the text around it) become visible escapes, length is capped.
        self.env.filters["shown"] = lambda value, max_chars=200: printable(value, max_chars=max_chars)

    # ------------------------------------------------------------------------------------------ helpers

    def language(self, request: Request) -> str:
        return choose_language(request.cookies.get(LANG_COOKIE), request.headers.get("accept-language"))

    def render(self, request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        lang = self.language(request)
        context.setdefault("csrf", "")
        context.setdefault("here", "/")
        html = self.env.get_template(template).render(
            t=MESSAGES[lang], lang=lang, languages=LANGUAGES, **context
        )
        return HTMLResponse(html, status_code=status)

    def secure_cookies(self, request: Request) -> bool:
        return self.cfg.web.behind_tls_proxy or request.url.scheme == "https"

    def set_cookie(self, request: Request, response: Response, name: str, value: str, **kw: Any) -> None:
        response.set_cookie(
            name, value, httponly=True, samesite="strict", secure=self.secure_cookies(request), path="/", **kw
        )

    def client_address(self, request: Request) -> str:
        return request.client.host if request.client else "unknown"

    async def session(self, request: Request) -> Session | None:
        """The caller's session, its role re-read from the accounts store at most ROLE_RECHECK_S old:
        a disabled, deleted or demoted account loses its access at once."""
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is None:
            return None
        now = self.clock()
        if now - session.role_checked >= ROLE_RECHECK_S:
            try:
                account = await self.accounts.get(session.account)
            except Exception as exc:
                # The accounts store (the bucket) is away: refuse rather than go on with a stale role.
                log.warning("web event=accounts_unavailable error=%s", type(exc).__name__)
                raise HTTPException(503) from None
            if account is None or account.disabled:
                self.sessions.delete(session.id)
                log.warning("web event=session_revoked account=%s", clean_log_value(session.account))
                return None
            session.role = account.role
            session.role_checked = now
        return session

    async def checked_form(self, request: Request, session: Session | None) -> dict[str, str]:
        """The form of a state change, after its checks: same origin, and the CSRF token of the session
        (or, before login, the double-submitted login cookie). Raises FormRejected."""
        scheme = "https" if self.cfg.web.behind_tls_proxy else request.url.scheme
        expected = expected_origin(scheme, request.headers.get("host"))
        if not origin_allowed(request.headers.get("origin"), request.headers.get("referer"), expected):
            raise FormRejected(403, "origin")
        form = await read_form(request)
        if form is None:
            raise FormRejected(400, "form")
        sent = form.get("csrf", "")
        wanted = session.csrf if session is not None else request.cookies.get(LOGIN_CSRF_COOKIE, "")
        if not sent or not wanted or not hmac.compare_digest(sent.encode(), wanted.encode()):
            raise FormRejected(403, "csrf")
        return form

    def rejected(self, request: Request, exc: FormRejected) -> HTMLResponse:
        log.warning(
            "web event=request_refused reason=%s path=%s address=%s",
            exc.reason,
            clean_log_value(request.url.path),
            clean_log_value(self.client_address(request)),
        )
        key = "forbidden" if exc.status == 403 else "bad_request"
        return self.render(request, "message.html", exc.status, message_key=key)

    def to_login(self, request: Request) -> RedirectResponse:
        target = safe_next(request.url.path)
        return RedirectResponse(f"/login?next={quote(target, safe='/')}", status_code=303)

    # ----------------------------------------------------------------------------------------- handlers

    async def login_page(self, request: Request) -> Response:
        """Always the form, even with a session: logging in again (another account, or over a session id
        someone planted) must be possible, and it replaces the session."""
        return self.login_form(request)

    def login_form(
        self, request: Request, status: int = 200, error: str = "", next_path: str | None = None
    ) -> HTMLResponse:
        token = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        fresh = not (32 <= len(token) <= 64 and token.replace("-", "").replace("_", "").isalnum())
        if fresh:
            token = new_token()
        target = next_path if next_path is not None else request.query_params.get("next")
        response = self.render(
            request, "login.html", status, csrf=token, next=safe_next(target), error=error, here="/login"
        )
        if fresh:
            self.set_cookie(request, response, LOGIN_CSRF_COOKIE, token)
        return response

    async def login_submit(self, request: Request) -> Response:
        try:
            form = await self.checked_form(request, None)
        except FormRejected as exc:
            return self.rejected(request, exc)
        name = form.get("username", "").strip()[:MAX_NAME_CHARS]
        password = form.get("password", "")[:MAX_PASSWORD_CHARS]
        address = self.client_address(request)
        keys = (f"account:{name.lower()}", f"address:{address}")
        wait = self.limiter.retry_after(*keys)
        if wait:
            log.warning(
                "web event=login_locked account=%s address=%s retry_after_s=%d",
                clean_log_value(name),
                clean_log_value(address),
                wait,
            )
            response = self.login_form(request, 429, "login_locked", form.get("next"))
            response.headers["retry-after"] = str(wait)
            return response
        try:
            account: Account | None = (
                await self.accounts.verify(name, password) if name and password else None
            )
        except Exception as exc:
            log.warning("web event=accounts_unavailable error=%s", type(exc).__name__)
            raise HTTPException(503) from None
        if account is None or account.disabled:
            self.limiter.failed(*keys)
            # Never the password; unknown user and wrong password look the same here and to the browser.
            log.warning(
                "web event=login_failed account=%s address=%s",
                clean_log_value(name),
                clean_log_value(address),
            )
            return self.login_form(request, 401, "login_failed", form.get("next"))
        self.limiter.succeeded(keys[0])
        # A new id at every login; whatever id the browser brought is dropped, never promoted (fixation).
        self.sessions.delete(request.cookies.get(SESSION_COOKIE))
        session = self.sessions.create(account.name, account.role)
        log.info(
            "web event=login account=%s role=%s address=%s",
            clean_log_value(account.name),
            account.role.value,
            clean_log_value(address),
        )
        done = RedirectResponse(safe_next(form.get("next")), status_code=303)
        self.set_cookie(request, done, SESSION_COOKIE, session.id)
        done.delete_cookie(LOGIN_CSRF_COOKIE, path="/")
        return done

    async def logout(self, request: Request) -> Response:
        session = await self.session(request)
        if session is None:
            return RedirectResponse("/login", status_code=303)
        try:
            await self.checked_form(request, session)
        except FormRejected as exc:
            return self.rejected(request, exc)
        self.sessions.delete(session.id)
        log.info("web event=logout account=%s", clean_log_value(session.account))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    async def set_language(self, request: Request) -> Response:
        lang = request.path_params["lang"]
        if lang not in LANGUAGES:
            raise HTTPException(404)
        session = await self.session(request)
        try:
            form = await self.checked_form(request, session)
        except FormRejected as exc:
            return self.rejected(request, exc)
        response = RedirectResponse(safe_next(form.get("next")), status_code=303)
        self.set_cookie(request, response, LANG_COOKIE, lang, max_age=365 * 86400)
        return response

    async def board(self, request: Request) -> Response:
        session = await self.session(request)
        if session is None:
            return self.to_login(request)
        return self.render(
            request,
            "board.html",
            account=session.account,
            role=session.role.value,
            csrf=session.csrf,
            here="/",
        )

    async def recording_download(self, request: Request) -> Response:
        """Placeholder until the evidence desk is wired: proves the role check is made on the server."""
        session = await self.session(request)
        if session is None:
            return self.to_login(request)
        if not role_at_least(session.role, Role.ADMIN):
            log.warning(
                "web event=forbidden account=%s role=%s path=%s",
                clean_log_value(session.account),
                session.role.value,
                clean_log_value(request.url.path),
            )
            return self.render(request, "message.html", 403, message_key="forbidden", csrf=session.csrf)
        if not is_safe_call_id(request.path_params["call_id"]):
            raise HTTPException(404)
        return self.render(request, "message.html", 501, message_key="not_yet", csrf=session.csrf)

    async def healthz(self, request: Request) -> Response:
        return PlainTextResponse("ok")

    async def http_error(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        if status == 404:
            return self.render(
                request, "message.html", 404, message_key="not_found", shown_path=request.url.path
            )
        if status == 405:
            headers = exc.headers if isinstance(exc, HTTPException) else None
            return PlainTextResponse("method not allowed", status_code=405, headers=headers)
        if status == 503:
            response = self.render(request, "message.html", 503, message_key="unavailable")
            response.headers["retry-after"] = "5"
            return response
        return self.render(request, "message.html", status, message_key="bad_request")

    async def server_error(self, request: Request, exc: Exception) -> Response:
        """Starlette answers a crash outside the middleware stack, so the headers are added here too."""
        log.error("web event=error path=%s error=%s", clean_log_value(request.url.path), type(exc).__name__)
        response = PlainTextResponse(
            MESSAGES["ja"]["error"] + " / " + MESSAGES["en"]["error"], status_code=500
        )
        for name, value in SECURITY_HEADERS.items():
            response.headers[name] = value
        return response


async def read_form(request: Request) -> dict[str, str] | None:
    """An urlencoded form of at most MAX_FORM_BYTES (first value of each field), or None."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    if not body:
        return {}  # no fields at all: the CSRF check refuses it (403), like any form without a token
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        return None
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=32)
    except (UnicodeDecodeError, ValueError):
        return None
    form: dict[str, str] = {}
    for key, value in pairs:
        form.setdefault(key, value)
    return form


def create_app(cfg: Config, accounts: Accounts, *, clock: Clock = time.monotonic) -> Starlette:
    """The console for ``cfg.web`` over ``accounts``; ``clock`` (seconds, monotonic) drives expiry."""
    console = Console(cfg, accounts, clock)
    routes = [
        Route("/", console.board, methods=["GET"]),
        Route("/login", console.login_page, methods=["GET"]),
        Route("/login", console.login_submit, methods=["POST"]),
        Route("/logout", console.logout, methods=["POST"]),
        Route("/lang/{lang}", console.set_language, methods=["POST"]),
        Route("/recordings/{call_id}/download", console.recording_download, methods=["GET"]),
        Route("/healthz", console.healthz, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR, follow_symlink=False), name="static"),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: console.http_error, Exception: console.server_error},
    )
    app.add_middleware(SecurityHeaders)
    app.state.console = console
    return app
