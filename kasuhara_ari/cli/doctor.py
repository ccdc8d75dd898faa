"""``kasuhara doctor``."""

from __future__ import annotations

import asyncio
import json

import click

from ..doctor import run_checks
from .common import EXIT_FAILED, EXIT_OK, config_option, load_config


@click.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object for scripts.")
def doctor(config_path: str | None, as_json: bool) -> None:
    """Check config, ARI, AMI (MixMonitor permission), MQTT, S3 (object lock, clock skew), the console,
    /metrics and the spool; exit 1 if anything fails (``warn`` lines do not)."""
    cfg = load_config(config_path)
    checks = asyncio.run(run_checks(cfg))
    if as_json:
        click.echo(json.dumps({c.name: {"ok": c.ok, "warn": c.warn, "detail": c.detail} for c in checks}))
    else:
        for c in checks:
            click.echo(f"{('warn' if c.warn else 'ok  ') if c.ok else 'FAIL'} {c.name:<7} {c.detail}")
    raise SystemExit(EXIT_OK if all(c.ok for c in checks) else EXIT_FAILED)
