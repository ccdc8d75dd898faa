"""The console's core that every page uses: sessions, role checks, CSRF, rendering, error pages.

Every decision that protects a page is made here on the server (a hidden button is not a permission):
who is logged in (a server-side session, its role re-read from the accounts store), whether a state change
comes from our own page (CSRF token and Origin), and what the role may do.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import jinja2
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response

from ..accounts import AccountError, Accounts, check_user_name
from ..config import Config
from ..events import EventSink
from ..evidence.desk import PERMITS, EvidenceDesk, Principal
from ..safe import clean_log_value, printable
from ..storage import ObjectStore
from .i18n import LANG_COOKIE, LANGUAGES, MESSAGES, choose_language
from .security import (
    SECURITY_HEADERS,
    VIA_PROXY,
    expected_origin,
    origin_allowed,
    safe_next,
)
from .sessions import ROLE_RECHECK_S, Clock, LoginLimiter, Session, SessionStore

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

    def __init__(
        self,
        cfg: Config,
        accounts: Accounts,
        clock: Clock,
        *,
        store: ObjectStore | None = None,
        events: EventSink | None = None,
    ) -> None:
        self.cfg = cfg
        self.accounts = accounts
        self.clock = clock
        #: The evidence store and the event sink of the desk's audit records (None: pages that need
        #: them answer 503; the login tests run without).
        self.store = store
        self.events = events
        #: Long-running work of the pages (e.g. the board's MQTT feed): started with the app (ASGI
        #: lifespan), cancelled at shutdown. A page module appends to it in its ``routes()``.
        self.background: list[Callable[[], Coroutine[Any, Any, None]]] = []
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

    def sso_user(self, request: Request) -> str | None:
        """The user the trusted reverse proxy says it authenticated (``web.sso_header``), or None: SSO is
        off, the header is absent, or the request did not come straight from a trusted proxy (then the
        header is a client's claim: ignored and logged)."""
        header = self.cfg.web.sso_header
        if not header:
            return None
        value = request.headers.get(header)
        if value is None:
            return None
        if request.scope.get(VIA_PROXY) is not True:
            log.warning(
                "web event=sso_header_ignored address=%s why=not_from_a_trusted_proxy",
                clean_log_value(self.client_address(request)),
            )
            return None
        try:
            return check_user_name(value.strip())
        except AccountError:
            log.warning("web event=sso_refused account=%s why=bad_name", clean_log_value(value))
            return None

    def client_address(self, request: Request) -> str:
        return request.client.host if request.client else "unknown"

    async def session(self, request: Request) -> Session | None:
        """The caller's session, its role re-read from the accounts store at most ROLE_RECHECK_S old:
        a disabled, deleted or demoted account loses its access at once."""
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is None:
            return None
        sso = self.sso_user(request)
        if sso is not None and sso != session.account:
            # Someone else signed in at the proxy (or the cookie was planted): this session is not theirs.
            self.sessions.delete(session.id)
            log.warning(
                "web event=session_dropped account=%s why=sso_user_changed", clean_log_value(session.account)
            )
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

    def forbidden(self, request: Request, session: Session, why: str = "") -> HTMLResponse:
        """403, logged: the server refuses whatever the page showed or hid."""
        log.warning(
            "web event=forbidden account=%s role=%s path=%s%s",
            clean_log_value(session.account),
            session.role.value,
            clean_log_value(request.url.path),
            f" why={clean_log_value(why)}" if why else "",
        )
        return self.render(request, "message.html", 403, message_key="forbidden", csrf=session.csrf)

    async def require(self, request: Request, action: str) -> Session | Response:
        """The session if its role may do the evidence desk's ``action`` (``PERMITS``); otherwise the
        answer to send: the login page without a session, 403 with one. Usage::

            allowed = await console.require(request, "play")
            if not isinstance(allowed, Session):
                return allowed
        """
        session = await self.session(request)
        if session is None:
            return self.to_login(request)
        if session.role.value not in PERMITS.get(action, frozenset()):
            return self.forbidden(request, session, action)
        return session

    def principal(self, session: Session) -> Principal:
        """The desk's principal for a console user: audit records name the account, prefixed ``web:``."""
        return Principal(f"web:{session.account}", session.role.value)

    def desk(self, session: Session) -> EvidenceDesk:
        """An evidence desk acting as ``session``'s user (503 when the console has no store)."""
        if self.store is None or self.events is None:
            raise HTTPException(503)
        return EvidenceDesk(self.store, self.events, self.principal(session))

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

    async def posted(self, request: Request, action: str) -> tuple[Session, dict[str, str]] | Response:
        """A state change's checks in one place: the role for ``action``, then CSRF and origin; the
        session and the form, or the answer that refuses them."""
        allowed = await self.require(request, action)
        if not isinstance(allowed, Session):
            return allowed
        try:
            return allowed, await self.checked_form(request, allowed)
        except FormRejected as exc:
            return self.rejected(request, exc)

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
