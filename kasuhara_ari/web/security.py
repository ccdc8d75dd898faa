"""The console's security bounds that do not depend on a session: response headers, where a redirect may
go, and whether a state-changing request comes from our own pages."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import MutableMapping
from typing import Any
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; media-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
#: Sent on every response, whatever produced it (page, redirect, error, static file).
SECURITY_HEADERS: dict[str, str] = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
}
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MAX_NEXT_CHARS = 2048
#: The characters RFC 3986 allows in a path and query (no quotes, angle brackets, spaces or controls).
_NEXT_RE = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")


class SecurityHeaders:
    """ASGI middleware: the headers above on every response (set, never duplicated)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                add_security_headers(message)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def add_security_headers(message: MutableMapping[str, Any]) -> None:
    """Replace any of our headers in a response-start message with ours."""
    names = {name.encode("latin-1") for name in SECURITY_HEADERS}
    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in SECURITY_HEADERS.items()]
    message["headers"] = headers


def safe_next(value: object) -> str:
    """Where to go after login: a path on this site, or ``/``.

    Anything a browser could read as another host is refused: ``//host``, ``/\\host`` (browsers treat ``\\``
    as ``/``), a scheme, control or non-ASCII characters, or an over-long value.
    """
    if not isinstance(value, str) or not value or len(value) > MAX_NEXT_CHARS:
        return "/"
    if not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    if _NEXT_RE.fullmatch(value) is None:
        return "/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return "/"
    return value


def expected_origin(scheme: str, host_header: str | None) -> str | None:
    """``scheme://host[:port]`` the browser shows for our pages; None without a usable Host header."""
    if not host_header or any(ch in host_header for ch in "/\\@ \t\r\n"):
        return None
    return f"{scheme}://{host_header.lower()}"


def origin_allowed(origin: str | None, referer: str | None, expected: str | None) -> bool:
    """A state change must come from our own origin: Origin if the browser sent it, else Referer; with
    neither (old clients, privacy settings) the CSRF token alone decides."""
    if origin is not None:
        return expected is not None and origin.lower() == expected
    if referer is not None:
        parts = urlsplit(referer)
        return expected is not None and f"{parts.scheme}://{parts.netloc}".lower() == expected
    return True


def parse_networks(values: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(v.strip(), strict=False) for v in values)


def address_in(host: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    try:
        address = ipaddress.ip_address(host.strip().strip("[]"))
    except ValueError:
        return False
    return any(address in net for net in networks)


#: Set in the ASGI scope by :class:`ProxiedClient`: the request came straight from a trusted proxy.
VIA_PROXY = "kasuhara.via_proxy"


class ProxiedClient:
    """ASGI middleware: the client address and scheme as the reverse proxy saw them, believed only when
    the connection itself comes from a trusted proxy; and a note in the scope (:data:`VIA_PROXY`) that it
    did, which single sign-on needs and which uvicorn's own proxy handling would erase (it replaces the
    peer's address with the forwarded one)."""

    def __init__(self, app: ASGIApp, trusted: tuple[str, ...]) -> None:
        self.app = app
        self.trusted = parse_networks(trusted)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and self.trusted:
            client = scope.get("client")
            if client and address_in(str(client[0]), self.trusted):
                scope = dict(scope)
                scope[VIA_PROXY] = True
                headers = {k.lower(): v for k, v in scope.get("headers", [])}
                forwarded = headers.get(b"x-forwarded-for", b"").decode("latin-1")
                hops = [h.strip() for h in forwarded.split(",") if h.strip()]
                # The nearest hop not itself a trusted proxy is the client (the left ones are the client's
                # own claims); all trusted: the leftmost.
                for hop in reversed(hops):
                    if not address_in(hop, self.trusted):
                        scope["client"] = (hop, 0)
                        break
                else:
                    if hops:
                        scope["client"] = (hops[0], 0)
                proto = headers.get(b"x-forwarded-proto", b"").decode("latin-1").strip().lower()
                if proto in ("http", "https"):
                    scope["scheme"] = proto
        await self.app(scope, receive, send)
