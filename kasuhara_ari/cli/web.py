"""``kasuhara web``: the browser console (login and sessions so far; the board and recordings follow)."""

from __future__ import annotations

import asyncio
import socket

import click

from ..config import console_keys, web_bind_refusal
from .common import EXIT_CONFIG, EXIT_FAILED, config_option, load_config, metrics_endpoint


def port_free(bind: str, port: int) -> bool:
    """Whether ``bind:port`` can be listened on now (SO_REUSEADDR, as uvicorn binds)."""
    host = bind.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


@click.command()
@config_option
def web(config_path: str | None) -> None:
    """Serve the browser console on [web] bind/port (default 127.0.0.1:8090).

    Refuses (exit 2) a non-loopback bind unless web.behind_tls_proxy or web.allow_insecure_bind.
    Accounts and recordings are read with the [admin] S3 keys when set, else the [storage] keys (which
    cannot read audio: playback and the admin actions then fail at the S3 server).
    """
    import uvicorn

    from ..accounts import Accounts
    from ..events import NullEvents
    from ..storage import MinioStore, StorageSetupError
    from ..supervision import SessionEvents
    from ..systemd import Notifier, announce_ready
    from ..web import create_app

    cfg = load_config(config_path)
    refusal = web_bind_refusal(cfg.web)
    if refusal is not None:
        click.echo(f"kasuhara web: configuration error: {refusal}", err=True)
        raise SystemExit(EXIT_CONFIG)
    access, secret = console_keys(cfg)
    try:
        store = MinioStore.from_config(
            cfg.storage, access_key=access, secret_key=secret, read_timeout_s=60.0, pool_size=32
        )
    except StorageSetupError as exc:
        click.echo(f"kasuhara web: configuration error: {exc}", err=True)
        raise SystemExit(EXIT_CONFIG) from None
    # Audit events of the console's actions (the records themselves are in S3 whatever MQTT does).
    events = SessionEvents(cfg.mqtt) if cfg.mqtt.enabled else None
    app = create_app(cfg, Accounts(store), store=store, events=events or NullEvents())
    if events is not None:
        app.state.console.background.append(events.run)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=cfg.web.bind,
            port=cfg.web.port,
            # X-Forwarded-For/-Proto are the app's (web.security.ProxiedClient): uvicorn's own handling
            # would replace the proxy's address, which single sign-on must see.
            proxy_headers=False,
            server_header=False,
            access_log=False,  # the console logs its own events; request lines carry query strings
            log_config=None,  # the kasuhara log handler (stderr, escaped)
            lifespan="on",  # the pages' background work (board feed, audit events) starts with the app
            # Open boards (server-sent events) never finish by themselves: at shutdown they are cut
            # after this grace period instead of holding the process forever.
            timeout_graceful_shutdown=3,
        )
    )
    click.echo(f"kasuhara web: starting on http://{cfg.web.bind}:{cfg.web.port}/", err=True)

    # The port first, before anything starts: uvicorn learns it is taken only after the app's background
    # work (the board feed, the search index reading the bucket in threads) has begun, and its exit then
    # waits for those threads.
    if not port_free(cfg.web.bind, cfg.web.port):
        click.echo(f"kasuhara web: failed: cannot listen on {cfg.web.bind}:{cfg.web.port}", err=True)
        raise SystemExit(EXIT_FAILED)

    async def main() -> None:
        notifier = Notifier()

        async def listening() -> bool:
            return bool(server.started)

        ready = asyncio.create_task(announce_ready(notifier, {"http": listening}))
        try:
            await server.serve()
        finally:
            notifier.stopping()
            ready.cancel()

    with metrics_endpoint(cfg, cfg.metrics.web_port):
        try:
            asyncio.run(main())
        except SystemExit as exc:
            # uvicorn exits 3 when it cannot listen; 3 means "refused" here, so it becomes 1 (failed).
            if exc.code in (None, 0):
                raise
            click.echo(f"kasuhara web: failed: cannot listen on {cfg.web.bind}:{cfg.web.port}", err=True)
            raise SystemExit(EXIT_FAILED) from None
