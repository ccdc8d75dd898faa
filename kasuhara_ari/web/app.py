"""The console's ASGI app: the core (:mod:`.console`) and the pages, each module adding its routes.

Every decision that protects a page is made on the server (a hidden button is not a permission): who is
logged in (a server-side session, its role re-read from the accounts store), whether a state change comes
from our own page (CSRF token and Origin), and what the role may do (the evidence desk's ``PERMITS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from ..accounts import Accounts
from ..config import Config
from ..events import EventSink
from ..storage import ObjectStore
from . import audit_page, auth, board, care_page, recordings, search, training_page
from .console import STATIC_DIR, Console
from .security import ProxiedClient, SecurityHeaders
from .sessions import Clock

log = logging.getLogger(__name__)


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


def create_app(
    cfg: Config,
    accounts: Accounts,
    *,
    clock: Clock = time.monotonic,
    store: ObjectStore | None = None,
    events: EventSink | None = None,
) -> Starlette:
    """The console for ``cfg.web`` over ``accounts``; ``clock`` (seconds, monotonic) drives expiry;
    ``store``/``events``: the evidence store and the sink of audit events (pages needing them: 503)."""
    console = Console(cfg, accounts, clock, store=store, events=events)
    routes: list[BaseRoute] = [
        *auth.routes(console),
        *board.routes(console),
        *recordings.routes(console),
        *search.routes(console),
        *audit_page.routes(console),
        *care_page.routes(console),
        *training_page.routes(console),
        Route("/healthz", healthz, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR, follow_symlink=False), name="static"),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(work(), name=f"web-{i}") for i, work in enumerate(console.background)]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for result in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(result, Exception):
                    log.error("web event=background_failed error=%s", type(result).__name__)

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: console.http_error, Exception: console.server_error},
    )
    # The last added runs first: security headers go on every answer, also the refusals of the others.
    web = cfg.web
    if web.allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(web.allowed_hosts))
    # Forwarding headers (and SSO) believed only from the proxies named; without a list, a TLS proxy
    # on this host.
    trusted = web.trusted_proxies or (("127.0.0.1", "::1") if web.behind_tls_proxy else ())
    app.add_middleware(ProxiedClient, trusted=trusted)
    app.add_middleware(SecurityHeaders)
    app.state.console = console
    return app
