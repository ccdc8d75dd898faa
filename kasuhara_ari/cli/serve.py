"""``kasuhara serve``: run the call service until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import signal

import click

from ..service import Service
from .common import config_option, load_config


@click.command()
@config_option
def serve(config_path: str | None) -> None:
    """Run the Stasis app: notice, recording, bridging, escalation, upload and events."""
    cfg = load_config(config_path)

    async def main() -> None:
        service = Service(cfg)
        task = asyncio.create_task(service.run())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())
