"""Login, logout and the language switch: the pages before and around a session."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from ..accounts import Account
from ..safe import clean_log_value
from .console import (
    LOGIN_CSRF_COOKIE,
    MAX_NAME_CHARS,
    MAX_PASSWORD_CHARS,
    SESSION_COOKIE,
    Console,
    FormRejected,
)
from .i18n import LANG_COOKIE, LANGUAGES
from .security import safe_next
from .sessions import new_token

log = logging.getLogger(__name__)


class AuthPages:
    """The handlers; ``self.c`` is the console core."""

    def __init__(self, console: Console) -> None:
        self.c = console

    async def login_page(self, request: Request) -> Response:
        """Always the form, even with a session: logging in again (another account, or over a session id
        someone planted) must be possible, and it replaces the session. Behind an SSO proxy the user it
        names is signed in instead."""
        sso = self.c.sso_user(request)
        if sso is not None:
            return await self.sso_login(request, sso)
        return self.login_form(request)

    async def sso_login(self, request: Request, name: str) -> Response:
        """A session for the local account the proxy authenticated: the role is the local one, and a
        proxy user without an enabled local account is refused (403), never created."""
        try:
            account = await self.c.accounts.get(name)
        except Exception as exc:
            log.warning("web event=accounts_unavailable error=%s", type(exc).__name__)
            raise HTTPException(503) from None
        address = self.c.client_address(request)
        if account is None or account.disabled:
            log.warning(
                "web event=sso_refused account=%s address=%s why=%s",
                clean_log_value(name),
                clean_log_value(address),
                "no_account" if account is None else "disabled",
            )
            return self.c.render(request, "message.html", 403, message_key="sso_no_account")
        return self.signed_in(request, account, "sso", request.query_params.get("next"))

    def login_form(
        self, request: Request, status: int = 200, error: str = "", next_path: str | None = None
    ) -> HTMLResponse:
        token = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        fresh = not (32 <= len(token) <= 64 and token.replace("-", "").replace("_", "").isalnum())
        if fresh:
            token = new_token()
        target = next_path if next_path is not None else request.query_params.get("next")
        response = self.c.render(
            request, "login.html", status, csrf=token, next=safe_next(target), error=error, here="/login"
        )
        if fresh:
            self.c.set_cookie(request, response, LOGIN_CSRF_COOKIE, token)
        return response

    async def login_submit(self, request: Request) -> Response:
        try:
            form = await self.c.checked_form(request, None)
        except FormRejected as exc:
            return self.c.rejected(request, exc)
        name = form.get("username", "").strip()[:MAX_NAME_CHARS]
        password = form.get("password", "")[:MAX_PASSWORD_CHARS]
        address = self.c.client_address(request)
        keys = (f"account:{name.lower()}", f"address:{address}")
        wait = self.c.limiter.retry_after(*keys)
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
                await self.c.accounts.verify(name, password) if name and password else None
            )
        except Exception as exc:
            log.warning("web event=accounts_unavailable error=%s", type(exc).__name__)
            raise HTTPException(503) from None
        if account is None or account.disabled:
            self.c.limiter.failed(*keys)
            # Never the password; unknown user and wrong password look the same here and to the browser.
            log.warning(
                "web event=login_failed account=%s address=%s",
                clean_log_value(name),
                clean_log_value(address),
            )
            return self.login_form(request, 401, "login_failed", form.get("next"))
        self.c.limiter.succeeded(keys[0])
        return self.signed_in(request, account, "password", form.get("next"))

    def signed_in(self, request: Request, account: Account, method: str, next_path: str | None) -> Response:
        # A new id at every login; whatever id the browser brought is dropped, never promoted (fixation).
        self.c.sessions.delete(request.cookies.get(SESSION_COOKIE))
        session = self.c.sessions.create(account.name, account.role)
        log.info(
            "web event=login account=%s role=%s method=%s address=%s",
            clean_log_value(account.name),
            account.role.value,
            method,
            clean_log_value(self.c.client_address(request)),
        )
        done = RedirectResponse(safe_next(next_path), status_code=303)
        self.c.set_cookie(request, done, SESSION_COOKIE, session.id)
        done.delete_cookie(LOGIN_CSRF_COOKIE, path="/")
        return done

    async def logout(self, request: Request) -> Response:
        session = await self.c.session(request)
        if session is None:
            return RedirectResponse("/login", status_code=303)
        try:
            await self.c.checked_form(request, session)
        except FormRejected as exc:
            return self.c.rejected(request, exc)
        self.c.sessions.delete(session.id)
        log.info("web event=logout account=%s", clean_log_value(session.account))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    async def set_language(self, request: Request) -> Response:
        lang = request.path_params["lang"]
        if lang not in LANGUAGES:
            raise HTTPException(404)
        session = await self.c.session(request)
        try:
            form = await self.c.checked_form(request, session)
        except FormRejected as exc:
            return self.c.rejected(request, exc)
        response = RedirectResponse(safe_next(form.get("next")), status_code=303)
        self.c.set_cookie(request, response, LANG_COOKIE, lang, max_age=365 * 86400)
        return response


def routes(console: Console) -> list[BaseRoute]:
    pages = AuthPages(console)
    return [
        Route("/login", pages.login_page, methods=["GET"]),
        Route("/login", pages.login_submit, methods=["POST"]),
        Route("/logout", pages.logout, methods=["POST"]),
        Route("/lang/{lang}", pages.set_language, methods=["POST"]),
    ]
