"""What every command shares: the ``--config`` option, exit codes, loading config with a clear error."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..config import Config, ConfigError, load

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_REFUSED = 3

F = TypeVar("F", bound=Callable[..., Any])


def config_option(fn: F) -> F:
    return click.option(
        "--config",
        "config_path",
        envvar="KASUHARA_CONFIG",
        type=click.Path(dir_okay=False),
        help="TOML config file (default: $KASUHARA_CONFIG; every key can also come from "
        "KASUHARA_<SECTION>__<KEY>).",
    )(fn)


def load_config(config_path: str | None) -> Config:
    """Load config or exit 2 with the message (never a traceback for a bad file)."""
    try:
        cfg = load(config_path)
    except ConfigError as exc:
        click.echo(f"kasuhara: configuration error: {exc}", err=True)
        raise SystemExit(EXIT_CONFIG) from None
    logging.getLogger().setLevel(cfg.general.log_level.upper())
    return cfg
