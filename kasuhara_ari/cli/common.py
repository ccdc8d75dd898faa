"""What every command shares: the ``--config`` option, exit codes, loading config with a clear error,
and how loud the log is."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import click

from ..config import Config, ConfigError, load
from ..safe import JsonLogFormatter, SafeLogFormatter, printable

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_REFUSED = 3

F = TypeVar("F", bound=Callable[..., Any])


def config_option(fn: F) -> F:
    """``--config`` and ``-v``: every command takes both, so ``kasuhara doctor -v`` works as well as
    ``kasuhara -v doctor`` (people put options after the command)."""
    fn = click.option(
        "-v",
        "--verbose",
        count=True,
        expose_value=False,
        callback=_verbose_callback,
        help="Log more on stderr: -v INFO, -vv DEBUG (as `kasuhara -v`).",
    )(fn)
    return click.option(
        "--config",
        "config_path",
        envvar="KASUHARA_CONFIG",
        type=click.Path(dir_okay=False),
        help="TOML config file (default: $KASUHARA_CONFIG; every key can also come from "
        "KASUHARA_<SECTION>__<KEY>).",
    )(fn)


def _verbose_callback(ctx: click.Context, _param: click.Parameter, value: int) -> None:
    """``-v`` given after the command: the louder of it and the group's ``-v``/KASUHARA_LOG_LEVEL."""
    if not value:
        return
    level = requested_log_level(value, os.environ)
    assert level is not None
    current = ctx.meta.get(_REQUESTED)
    if current is not None:
        level = min(level, current)
    ctx.meta[_REQUESTED] = level
    logging.getLogger().setLevel(level)


def load_config(config_path: str | None) -> Config:
    """Load config or exit 2 with the message (never a traceback for a bad file)."""
    try:
        cfg = load(config_path)
    except ConfigError as exc:
        click.echo(f"kasuhara: configuration error: {exc}", err=True)
        raise SystemExit(EXIT_CONFIG) from None
    if is_service():
        # general.log_level is the service's setting: checked and applied only where it means something.
        configured = log_level_named(cfg.general.log_level, "general.log_level")
        requested = _requested_level()
        logging.getLogger().setLevel(requested if requested is not None else configured)
        if cfg.general.log_format == "json":
            for handler in logging.getLogger().handlers:
                if isinstance(handler.formatter, SafeLogFormatter):
                    handler.setFormatter(JsonLogFormatter())
    return cfg


# ----------------------------------------------------------------------------------------------- logging

LOG_LEVEL_ENV = "KASUHARA_LOG_LEVEL"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: Commands that run until stopped: their log is what the operator reads (journald), so they log at
#: general.log_level (default INFO). Every other command is a one-shot tool whose output is its result:
#: it logs at WARNING unless -v or KASUHARA_LOG_LEVEL asks for more, whatever general.log_level says.
SERVICE_COMMANDS = frozenset({"serve", "agi", "retention daemon", "web"})
#: Third-party loggers kept at WARNING at every level: one line per HTTP request would drown the call
#: log, and ARI URLs carry query strings.
QUIET_LIBRARIES = ("httpx", "httpcore", "websockets")
_REQUESTED = "kasuhara.log_level"  # click's ctx.meta (shared by every context of one run)


def log_level_named(name: str, source: str) -> int:
    """A level name (any case) or exit 2 naming where the bad value came from."""
    if name.strip().upper() in LOG_LEVELS:
        level: int = logging.getLevelName(name.strip().upper())
        return level
    click.echo(
        f"kasuhara: configuration error: {source} = '{printable(name, max_chars=40)}' is not a log level "
        f"(one of {', '.join(LOG_LEVELS)})",
        err=True,
    )
    raise SystemExit(EXIT_CONFIG)


def requested_log_level(verbose: int, env: Mapping[str, str]) -> int | None:
    """What the operator asked for on this run: -v (INFO) / -vv (DEBUG) beat KASUHARA_LOG_LEVEL; None
    if neither was given. A bad KASUHARA_LOG_LEVEL exits 2 even when -v wins: it is a mistake to fix."""
    raw = env.get(LOG_LEVEL_ENV, "")
    from_env = log_level_named(raw, LOG_LEVEL_ENV) if raw.strip() else None
    if verbose:
        return logging.INFO if verbose == 1 else logging.DEBUG
    return from_env


def setup_logging(verbose: int) -> None:
    """Called once per run by the ``kasuhara`` group, before any command: one stderr handler, and the
    quiet default (WARNING) that a service raises to general.log_level when it loads its config."""
    requested = requested_log_level(verbose, os.environ)
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta[_REQUESTED] = requested
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeLogFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(handlers=[handler])  # no-op if the root has handlers already (tests, embedding)
    root.setLevel(requested if requested is not None else logging.WARNING)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


def _requested_level() -> int | None:
    ctx = click.get_current_context(silent=True)
    level: int | None = ctx.meta.get(_REQUESTED) if ctx is not None else None
    return level


def is_service() -> bool:
    """Whether the running command is one of SERVICE_COMMANDS (``retention daemon``: its path below the
    ``kasuhara`` group). False outside a click command."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return False
    chain: list[click.Context] = []
    node: click.Context | None = ctx
    while node is not None:
        chain.append(node)
        node = node.parent
    chain.reverse()
    below_group = chain[1:] if len(chain) > 1 else chain  # a command run on its own has no group above
    return " ".join(c.command.name or "" for c in below_group) in SERVICE_COMMANDS


@contextlib.contextmanager
def metrics_endpoint(cfg: Config, port: int) -> Iterator[None]:
    """``/metrics`` while a long-running command runs (``[metrics]``); a non-loopback bind without
    ``metrics.allow_remote`` is a configuration error (exit 2) before anything starts."""
    from ..metrics import MetricsSetupError, exposed

    with contextlib.ExitStack() as stack:  # closes the server however the command ends
        try:
            stack.enter_context(exposed(cfg.metrics, port))
        except MetricsSetupError as exc:
            click.echo(f"kasuhara: configuration error: {exc}", err=True)
            raise SystemExit(EXIT_CONFIG) from None
        yield
