"""``kasuhara agi``: the FastAGI server for dialplans that cannot use Stasis."""

from __future__ import annotations

import asyncio
import contextlib
import signal

import click

from ..config import ConfigError
from .common import EXIT_CONFIG, EXIT_FAILED, config_option, load_config, metrics_endpoint


@click.command()
@config_option
def agi(config_path: str | None) -> None:
    """Serve AGI(agi://HOST:PORT/kasuhara): notice, recording, metadata, upload and events.

    The dialplan goes on after the AGI (it dials the agent); the end of the call is learnt from AMI.
    Listens on [agi] bind/port (default 127.0.0.1:4573). A session is only handled once AMI has proved
    that a real channel runs it (agi.allowed_peers, agi.max_sessions_per_peer: see the README).
    """
    from ..agi import AgiService
    from ..systemd import Notifier, announce_ready

    cfg = load_config(config_path)
    try:
        service = AgiService(cfg)
    except ConfigError as exc:
        click.echo(f"kasuhara: configuration error: {exc}", err=True)
        raise SystemExit(EXIT_CONFIG) from None

    async def main() -> None:
        notifier = Notifier()
        task = asyncio.create_task(service.run())

        def stop() -> None:
            notifier.stopping()
            task.cancel()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)

        async def listening() -> bool:
            return service.server.listening.is_set()

        async def ami() -> bool:
            return service.ami.ready

        ready = asyncio.create_task(announce_ready(notifier, {"agi": listening, "ami": ami}))
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            ready.cancel()

    try:
        with metrics_endpoint(cfg, cfg.metrics.agi_port):
            asyncio.run(main())
    except* OSError as group:
        first = group.exceptions[0]
        click.echo(f"kasuhara agi: failed: {first} (listening on {cfg.agi.bind}:{cfg.agi.port})", err=True)
        raise SystemExit(EXIT_FAILED) from None
