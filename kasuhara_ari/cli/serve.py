"""``kasuhara serve``: run the call service until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import signal

import click

from ..detection import configured_factories
from ..detection.base import DetectorLoadError
from ..doctor import check_spool
from ..service import Service
from ..systemd import Notifier, announce_ready
from .common import EXIT_CONFIG, config_option, load_config, metrics_endpoint


@click.command()
@config_option
def serve(config_path: str | None) -> None:
    """Run the Stasis app: notice, recording, bridging, escalation, upload and events."""
    cfg = load_config(config_path)
    try:  # an operator's detector that cannot be imported is a configuration error, found now
        configured_factories(cfg.detection)
    except DetectorLoadError as exc:
        click.echo(f"kasuhara: configuration error: {exc}", err=True)
        raise SystemExit(EXIT_CONFIG) from None

    async def main() -> None:
        service = Service(cfg)
        notifier = Notifier()
        task = asyncio.create_task(service.run())

        handing_over: list[asyncio.Task[int]] = []

        def stop() -> None:
            """The first SIGTERM with ``routing.on_stop = handover`` leaves talking calls to the next
            ``serve``, then stops; a second signal (or ``hangup``) stops at once, ending the calls."""
            notifier.stopping()
            if cfg.routing.on_stop == "handover" and not handing_over:
                handing_over.append(asyncio.create_task(hand_over_then_stop()))
            else:
                task.cancel()

        async def hand_over_then_stop() -> int:
            try:
                return await service.app.hand_over(cfg.routing.handover_wait_s)
            finally:
                task.cancel()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)

        async def ari() -> bool:
            # listen mode: serving is being ready; Asterisk connects when it (re)starts, not on our cue.
            if service.ari.listen is not None:
                return service.ari.serving.is_set()
            return service.app.connected.is_set()

        async def ami() -> bool:
            return service.ami.ready

        async def spool() -> bool:
            return (await asyncio.to_thread(check_spool, cfg)).ok

        ready = asyncio.create_task(announce_ready(notifier, {"ari": ari, "ami": ami, "spool": spool}))
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            ready.cancel()

    with metrics_endpoint(cfg, cfg.metrics.serve_port):
        asyncio.run(main())
