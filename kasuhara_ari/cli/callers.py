"""``kasuhara callers add|remove|list``: the admin-managed caller list (audited)."""

from __future__ import annotations

import json

import click

from ..callers import ACTIONS, LIST_KEY, CallerList, CallerListError, make_entry
from ..events import now_iso
from ..evidence.desk import EvidenceDesk
from ..storage import META_SHA256, PreconditionFailed
from .admin import fail, open_store, run_async, session
from .common import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, config_option, load_config


@click.group()
def callers() -> None:
    """The caller list: numbers routed straight to a supervisor, given a stronger notice, or refused.

    The list lives in the bucket (callers/list.json); `kasuhara serve` re-reads it every
    policy.caller_list_refresh_s seconds. Numbers match in E.164 and Japanese domestic forms
    (+81 3-1234-5678 = 03-1234-5678). add/remove need the admin credentials and are audited.
    Exit codes: 0 done, 1 failed, 2 bad usage or configuration, 3 refused.
    """


async def _load(s: EvidenceDesk) -> tuple[CallerList, str | None]:
    info = await s.store.stat(LIST_KEY)
    data = await s.store.get_bytes(LIST_KEY, max_bytes=4 * 1024 * 1024)
    if data is None:
        return CallerList(), None
    try:
        return CallerList.from_json(data), (info.etag if info is not None else None)
    except CallerListError as exc:
        fail(EXIT_FAILED, f"{LIST_KEY} in the bucket is broken: {exc}")


async def _save(s: EvidenceDesk, current: CallerList, etag: str | None) -> None:
    """A conditional write: two admins changing the list at once cannot lose each other's entry."""
    import hashlib

    data = current.to_json()
    try:
        await s.store.put_bytes_if(
            LIST_KEY,
            data,
            metadata={META_SHA256: hashlib.sha256(data).hexdigest()},
            if_match=etag,
            if_none_match=etag is None,
        )
    except PreconditionFailed:
        fail(EXIT_FAILED, "the caller list changed while this command ran; run it again")


@callers.command("add")
@config_option
@click.argument("number")
@click.option("--action", type=click.Choice(ACTIONS), required=True, help="What happens when NUMBER calls.")
@click.option("--reason", required=True, help="Why (kept in the list and the audit record).")
def add(config_path: str | None, number: str, action: str, reason: str) -> None:
    """Add NUMBER to the list (or change its action)."""
    cfg = load_config(config_path)
    store = open_store(cfg, role="admin", command="callers add", action="callers_add")

    async def go() -> str:
        async with session(cfg, store) as s:
            try:
                entry = make_entry(number, action, reason, by=s.audit.by, at=now_iso())
            except CallerListError as exc:
                fail(EXIT_CONFIG, str(exc))
            current, etag = await _load(s)
            await _save(s, current.with_entry(entry), etag)
            await s.note(
                s.audit.new(
                    "callers_add", reason=reason, target={"number": entry.number}, details={"action": action}
                )
            )
            return entry.number

    normalised = run_async(cfg, go)
    click.echo(f"{normalised}: {action}")
    raise SystemExit(EXIT_OK)


@callers.command("remove")
@config_option
@click.argument("number")
@click.option("--reason", required=True, help="Why (kept in the audit record).")
def remove(config_path: str | None, number: str, reason: str) -> None:
    """Remove NUMBER from the list (exit 0 also when it was not listed)."""
    cfg = load_config(config_path)
    store = open_store(cfg, role="admin", command="callers remove", action="callers_remove")

    async def go() -> bool:
        async with session(cfg, store) as s:
            current, etag = await _load(s)
            listed = current.find(number)
            if listed is None:
                return False
            await _save(s, current.without(number), etag)
            await s.note(s.audit.new("callers_remove", reason=reason, target={"number": listed.number}))
            return True

    removed = run_async(cfg, go)
    click.echo("removed" if removed else "not listed: nothing to do")
    raise SystemExit(EXIT_OK)


@callers.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")
def list_(config_path: str | None, as_json: bool) -> None:
    """Show the list."""
    cfg = load_config(config_path)
    store = open_store(cfg, role="admin", command="callers list")

    async def go() -> CallerList:
        async with session(cfg, store) as s:
            current, _ = await _load(s)
            return current

    current = run_async(cfg, go)
    if as_json:
        click.echo(current.to_json().decode())
    elif not current.entries:
        click.echo("the caller list is empty")
    else:
        click.echo(f"{'number':<16} {'action':<14} {'by':<12} {'at':<25} reason")
        for e in current.entries:
            click.echo(
                f"{e.number:<16} {e.action:<14} {e.by[:12]:<12} {e.at:<25} {json.dumps(e.reason)[1:-1]}"
            )
    raise SystemExit(EXIT_OK)
