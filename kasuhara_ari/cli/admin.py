"""What the admin commands (recordings, retention, audit, export, callers) share: who runs them and with
which S3 keys, the evidence desk's session, dates in ``general.timezone``, progress bars, and turning
expected failures (the desk's, the store's, our own) into one line on stderr and an exit code."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime
from typing import NoReturn, TypeVar
from zoneinfo import ZoneInfo

import click

from ..audit import actor
from ..config import Config
from ..evidence.desk import (
    DeskError,
    DeskRefused,
    EvidenceDesk,
    Principal,
    open_desk,
    permit,
)
from ..safe import UnsafeValueError, clean_caller_text, printable
from ..search import parse_when, zone
from ..storage import (
    MinioStore,
    PreconditionFailed,
    StorageError,
    StorageRefused,
    StorageSetupError,
    StorageUnavailable,
)
from .common import EXIT_CONFIG, EXIT_FAILED, EXIT_REFUSED

T = TypeVar("T")


class CliExit(Exception):
    """An expected failure: printed as one line, exits with ``code``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def fail(code: int, message: str) -> NoReturn:
    raise CliExit(code, message)


def finish(code: int, message: str) -> NoReturn:
    # Messages quote S3 keys and server errors, which bucket writers choose: no raw ESC or newline.
    click.echo(f"kasuhara: {printable(message, max_chars=2000)}", err=True)
    raise SystemExit(code)


def desk_exit_code(exc: DeskError) -> int:
    """The CLI's exit code for how a desk operation ended (refused 3; not found and failed 1)."""
    return EXIT_REFUSED if isinstance(exc, DeskRefused) else EXIT_FAILED


def run_async(cfg: Config, make: Callable[[], Awaitable[T]]) -> T:
    """Run a command's coroutine; expected failures become a message on stderr and an exit code."""
    try:
        return asyncio.run(_guarded(make))
    except CliExit as exc:
        finish(exc.code, str(exc))
    except DeskError as exc:
        finish(desk_exit_code(exc), str(exc))
    except StorageSetupError as exc:
        finish(EXIT_CONFIG, f"configuration error: {exc}")
    except StorageRefused as exc:
        finish(
            EXIT_REFUSED, f"refused by the S3 server: {exc} (do these credentials have the role's policy?)"
        )
    except StorageUnavailable as exc:
        finish(EXIT_FAILED, f"S3 at {cfg.storage.endpoint} is unreachable or failing: {exc}")
    except PreconditionFailed as exc:
        finish(EXIT_FAILED, f"another writer got there first: {exc}")
    except StorageError as exc:
        finish(EXIT_FAILED, f"S3 error: {exc}")
    except UnsafeValueError as exc:
        finish(EXIT_CONFIG, str(exc))


async def _guarded(make: Callable[[], Awaitable[T]]) -> T:
    return await make()


def timezone_of(cfg: Config) -> ZoneInfo:
    try:
        return zone(cfg.general.timezone)
    except ValueError as exc:
        finish(EXIT_CONFIG, f"configuration error: {exc}")


def when(text: str | None, tz: ZoneInfo, option: str, *, end: bool = False) -> datetime | None:
    if text is None:
        return None
    try:
        return parse_when(text, tz, end=end)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=f"'{option}'") from None


def cli_principal(cfg: Config) -> Principal:
    """Who runs this command: ``admin`` when both [admin] keys are set; otherwise the [storage] keys'
    ``service`` role, which the desk refuses download, export, release and delete (exit 3)."""
    access, secret = cfg.admin.access_key, cfg.admin.secret_key
    if access and secret:
        return Principal(actor(cfg), "admin")
    missing = " and ".join(n for n, v in (("access_key", access), ("secret_key", secret)) if not v)
    return Principal(
        actor(cfg),
        "service",
        lacking=f"the admin S3 credentials, and [admin] {missing} is not set (config file, or "
        "KASUHARA_ADMIN__ACCESS_KEY / KASUHARA_ADMIN__SECRET_KEY)",
    )


def open_store(cfg: Config, *, role: str, command: str, action: str | None = None) -> MinioStore:
    """The S3 client for a role. ``admin``: the [admin] keys, else [storage]'s; ``action``: the desk
    action the command performs, refused (exit 3) before anything is opened unless :func:`cli_principal`
    may do it. ``retention``: [retention] keys, else [storage]'s."""
    section = cfg.admin if role == "admin" else cfg.retention
    access, secret = section.access_key, section.secret_key
    if action is not None:
        try:
            permit(cli_principal(cfg), action, doing=f"`kasuhara {command}`")
        except DeskRefused as exc:
            finish(EXIT_REFUSED, str(exc))
    if not (access and secret):
        access, secret = cfg.storage.access_key, cfg.storage.secret_key
    try:
        return MinioStore.from_config(
            cfg.storage,
            access_key=access,
            secret_key=secret,
            connect_timeout_s=5.0,
            read_timeout_s=60.0,
            pool_size=16,
            connect_retries=1,
        )
    except StorageSetupError as exc:
        finish(EXIT_CONFIG, f"configuration error: {exc}")


def warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


@contextlib.contextmanager
def progress(length: int, label: str) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr when stderr is a terminal; otherwise nothing is drawn."""
    if length <= 0 or not sys.stderr.isatty():
        yield lambda n: None
        return
    with click.progressbar(length=length, label=label, file=sys.stderr) as bar:
        yield bar.update


@contextlib.asynccontextmanager
async def session(cfg: Config, store: MinioStore) -> AsyncIterator[EvidenceDesk]:
    """The evidence desk for this command's principal; its warnings on stderr, bars when a terminal."""
    try:
        timezone_of(cfg)  # a bad general.timezone is a configuration error for every admin command
    except BaseException:
        store.close()
        raise
    async with open_desk(cfg, store, cli_principal(cfg), warn=warn, progress=progress) as desk:
        yield desk


def show_time(value: object, tz: ZoneInfo) -> str:
    """An ISO timestamp from metadata, shown in the configured timezone (``-`` if absent/unusable)."""
    if not isinstance(value, str):
        return "-"
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return clean_caller_text(value, max_chars=40) or "-"
    if parsed.tzinfo is None:
        # Not ours (we always write an offset): shown as written, marked, never as if it were local time.
        return f"{clean_caller_text(value, max_chars=40)} (no offset)"
    try:
        return parsed.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S")
    except OverflowError:  # 0001-01-01T00:00:00+14:00: valid ISO, no instant in range
        return f"{clean_caller_text(value, max_chars=40)} (out of range)"


def text(value: object, width: int | None = None) -> str:
    shown = clean_caller_text("" if value is None else value, max_chars=200) or ""
    if width is not None and len(shown) > width:
        shown = shown[: width - 1] + "…"
    return shown
