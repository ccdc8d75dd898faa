"""``kasuhara users add|passwd|disable|enable|role|list``: the web console's accounts (audited).

Passwords come from a terminal prompt (twice) or one line of stdin (``--password-stdin``), never from
argv (which ``ps`` and shell histories show to everyone). Changes need the ``[admin]`` S3 keys (exit 3
without them); ``list`` falls back to ``[storage]``'s, which may read the accounts (the console does).
"""

from __future__ import annotations

import getpass
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from ..accounts import (
    Account,
    AccountError,
    AccountExists,
    Accounts,
    AccountsCorrupt,
    LastAdminError,
    Role,
    UnknownAccount,
    check_endpoint,
    check_password,
    check_user_name,
)
from ..audit import AuditLog, CommandEvents, actor
from ..config import Config
from ..storage import (
    MinioStore,
    PreconditionFailed,
    StorageError,
)
from .admin import CliExit, finish, open_store, run_async
from .common import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_REFUSED, config_option, load_config

T = TypeVar("T")

ROLES = tuple(r.value for r in Role)


def _name_arg(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    try:
        return check_user_name(value)
    except AccountError as exc:
        raise click.BadParameter(str(exc), param_hint="'NAME'") from None


def _endpoint_option(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    try:
        return check_endpoint(value)
    except AccountError as exc:
        raise click.BadParameter(str(exc), param_hint="'--endpoint'") from None


def _open_store(cfg: Config, command: str, *, require_admin: bool) -> MinioStore:
    """The [admin] keys (as `recordings delete`); ``require_admin``: refuse without them (exit 3),
    otherwise fall back to [storage]'s."""
    action = "users_admin" if require_admin else None
    return open_store(cfg, role="admin", command=f"users {command}", action=action)


def _run(cfg: Config, make: Callable[[], Awaitable[T]]) -> T:
    """Run the command's coroutine like every admin command (``cli.admin.run_async``), with the accounts'
    own expected failures turned into their exit codes first."""

    async def accounts_errors() -> T:
        try:
            return await make()
        except LastAdminError as exc:
            raise CliExit(EXIT_REFUSED, str(exc)) from None
        except (UnknownAccount, AccountExists) as exc:
            raise CliExit(EXIT_FAILED, str(exc)) from None
        except AccountError as exc:
            raise CliExit(EXIT_CONFIG, str(exc)) from None
        except AccountsCorrupt as exc:
            raise CliExit(
                EXIT_FAILED, f"{exc}: fix or restore an earlier version of it (the bucket keeps them)"
            ) from None
        except PreconditionFailed as exc:
            raise CliExit(EXIT_FAILED, f"other admins kept changing the accounts: {exc}") from None

    return run_async(cfg, accounts_errors)


def read_password(name: str, from_stdin: bool) -> str:
    """The new password: one line of stdin, or typed twice at a terminal (not echoed); checked
    (length, not the name) before anything is sent anywhere."""
    if from_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        password = password[:-1] if password.endswith("\r") else password
    else:
        if not sys.stdin.isatty():
            finish(EXIT_CONFIG, "no terminal to ask for the password: pipe it in with --password-stdin")
        try:
            password = getpass.getpass(f"New password for {name}: ")
            again = getpass.getpass("Repeat it: ")
        except (EOFError, KeyboardInterrupt):
            finish(EXIT_CONFIG, "no password given")
        if password != again:
            finish(EXIT_CONFIG, "the two passwords differ; nothing was changed")
    try:
        return check_password(name, password)
    except AccountError as exc:
        finish(EXIT_CONFIG, str(exc))


async def _audited(
    cfg: Config,
    store: MinioStore,
    action: str,
    name: str,
    reason: str,
    details: dict[str, Any],
    change: Callable[[Accounts], Awaitable[bool]],
) -> bool:
    """Apply ``change`` (False: nothing to do) and write its audit record (target = the user name; the
    password and its hash are never in it). A change that cannot be audited exits 1, saying so."""
    try:
        async with CommandEvents(cfg.mqtt) as events:
            changed = await change(Accounts(store))
            if changed:
                log = AuditLog(store, events, by=actor(cfg))
                record = log.new(action, reason=reason, target={"user": name}, details=details)
                try:
                    await log.write(record)
                except StorageError as exc:
                    raise CliExit(
                        EXIT_FAILED, f"{name}: changed, but the audit record could not be written: {exc}"
                    ) from None
        if events.failure is not None:
            click.echo(
                f"warning: MQTT broker {cfg.mqtt.host}:{cfg.mqtt.port}: events not published "
                f"({events.failure}); the audit record in S3 is complete",
                err=True,
            )
        return changed
    finally:
        store.close()


def _reason_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--reason", default="", help="Why (kept in the audit record).")(fn)


def _password_stdin_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--password-stdin",
        is_flag=True,
        help="Read the password from the first line of stdin instead of prompting (for scripts).",
    )(fn)


@click.group()
def users() -> None:
    """Accounts of the web console (`kasuhara web`): viewer < supervisor < admin.

    Stored in the bucket as users/accounts.json (argon2id hashes; every change keeps the previous
    version under the bucket's object lock). Changes need the admin S3 credentials and are audited
    (user_add, user_passwd, user_disable, user_enable, user_role, user_endpoint). Passwords are prompted
    for, or read with --password-stdin: never given as an option. The last enabled admin cannot be disabled or
    demoted. Exit codes: 0 done, 1 failed, 2 bad usage or configuration, 3 refused.
    """


@users.command("add", short_help="Create an account with its role and password.")
@config_option
@click.argument("name", callback=_name_arg)
@click.option("--role", type=click.Choice(ROLES), required=True, help="What the user may do.")
@click.option(
    "--endpoint",
    default="",
    callback=_endpoint_option,
    help="The user's phone, rung when they join a call from the console's board (e.g. PJSIP/alice; "
    "default: the first of escalation.supervisors).",
)
@_password_stdin_option
@_reason_option
def add(
    config_path: str | None, name: str, role: str, endpoint: str, password_stdin: bool, reason: str
) -> None:
    """Create the account NAME (lower case a-z 0-9 . _ -, up to 64 characters)."""
    cfg = load_config(config_path)
    store = _open_store(cfg, "add", require_admin=True)
    password = read_password(name, password_stdin)

    async def change(accounts: Accounts) -> bool:
        await accounts.add(name, Role(role), password, endpoint=endpoint)
        return True

    details = {"role": role, **({"endpoint": endpoint} if endpoint else {})}
    _run(cfg, lambda: _audited(cfg, store, "user_add", name, reason, details, change))
    click.echo(f"{name}: added ({role})")
    raise SystemExit(EXIT_OK)


@users.command("passwd")
@config_option
@click.argument("name", callback=_name_arg)
@_password_stdin_option
@_reason_option
def passwd(config_path: str | None, name: str, password_stdin: bool, reason: str) -> None:
    """Set a new password for NAME."""
    cfg = load_config(config_path)
    store = _open_store(cfg, "passwd", require_admin=True)
    password = read_password(name, password_stdin)

    async def change(accounts: Accounts) -> bool:
        await accounts.set_password(name, password)
        return True

    _run(cfg, lambda: _audited(cfg, store, "user_passwd", name, reason, {}, change))
    click.echo(f"{name}: password changed")
    raise SystemExit(EXIT_OK)


def _state_command(command: str, disabled: bool) -> click.Command:
    action = "user_disable" if disabled else "user_enable"

    @config_option
    @click.argument("name", callback=_name_arg)
    @_reason_option
    def run(config_path: str | None, name: str, reason: str) -> None:
        cfg = load_config(config_path)
        store = _open_store(cfg, command, require_admin=True)

        async def change(accounts: Accounts) -> bool:
            current = await accounts.get(name)
            if current is None:
                raise UnknownAccount(f"no user {name!r}")
            if current.disabled is disabled:
                return False
            await accounts.set_disabled(name, disabled)
            return True

        changed = _run(cfg, lambda: _audited(cfg, store, action, name, reason, {}, change))
        click.echo(f"{name}: {command}d" if changed else f"{name}: already {command}d, nothing to do")
        raise SystemExit(EXIT_OK)

    run.__doc__ = (
        "Disable NAME: the console refuses the user from the next request on (the account stays)."
        if disabled
        else "Enable NAME again."
    )
    return click.command(command)(run)


users.add_command(_state_command("disable", True))
users.add_command(_state_command("enable", False))


@users.command("role")
@config_option
@click.argument("name", callback=_name_arg)
@click.argument("role", type=click.Choice(ROLES))
@_reason_option
def role_cmd(config_path: str | None, name: str, role: str, reason: str) -> None:
    """Give NAME the role ROLE (viewer, supervisor or admin)."""
    cfg = load_config(config_path)
    store = _open_store(cfg, "role", require_admin=True)
    before: list[Account] = []

    async def change(accounts: Accounts) -> bool:
        current = await accounts.get(name)
        if current is None:
            raise UnknownAccount(f"no user {name!r}")
        if current.role == role:
            return False
        before.append(current)
        await accounts.set_role(name, Role(role))
        return True

    changed = _run(cfg, lambda: _audited(cfg, store, "user_role", name, reason, {"role": role}, change))
    if changed:
        click.echo(f"{name}: {before[0].role.value} -> {role}")
    else:
        click.echo(f"{name}: already {role}, nothing to do")
    raise SystemExit(EXIT_OK)


@users.command("endpoint")
@config_option
@click.argument("name", callback=_name_arg)
@click.argument("endpoint", default="", callback=_endpoint_option)
@_reason_option
def endpoint_cmd(config_path: str | None, name: str, endpoint: str, reason: str) -> None:
    """Set the phone the console rings when NAME joins a call from the board (e.g. PJSIP/alice);
    without ENDPOINT, clear it (escalation.supervisors[0] is rung)."""
    cfg = load_config(config_path)
    store = _open_store(cfg, "endpoint", require_admin=True)

    async def change(accounts: Accounts) -> bool:
        current = await accounts.get(name)
        if current is None:
            raise UnknownAccount(f"no user {name!r}")
        if current.endpoint == endpoint:
            return False
        await accounts.set_endpoint(name, endpoint)
        return True

    details = {"endpoint": endpoint}
    changed = _run(cfg, lambda: _audited(cfg, store, "user_endpoint", name, reason, details, change))
    shown = endpoint or "(none: escalation.supervisors[0])"
    click.echo(f"{name}: endpoint {shown}" if changed else f"{name}: endpoint already {shown}, nothing to do")
    raise SystemExit(EXIT_OK)


@users.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts (never any hash).")
def list_cmd(config_path: str | None, as_json: bool) -> None:
    """Show every account: name, role, state, when created and last changed."""
    cfg = load_config(config_path)
    store = _open_store(cfg, "list", require_admin=False)

    async def go() -> list[Account]:
        try:
            return await Accounts(store).list()
        finally:
            store.close()

    found = _run(cfg, go)
    if as_json:
        doc = {
            "users": [
                {
                    "name": a.name,
                    "role": a.role.value,
                    "disabled": a.disabled,
                    "created_at": a.created_at,
                    "changed_at": a.changed_at,
                    "endpoint": a.endpoint or None,
                }
                for a in found
            ]
        }
        click.echo(json.dumps(doc, indent=1))
    elif not found:
        click.echo("no console users yet (kasuhara users add NAME --role admin)")
    else:
        click.echo(f"{'name':<24} {'role':<11} {'state':<9} {'created':<26} {'changed':<26} endpoint")
        for a in found:
            state = "disabled" if a.disabled else "enabled"
            click.echo(
                f"{a.name:<24} {a.role.value:<11} {state:<9} {a.created_at:<26} {a.changed_at:<26} "
                f"{a.endpoint or '-'}".rstrip()
            )
    raise SystemExit(EXIT_OK)
