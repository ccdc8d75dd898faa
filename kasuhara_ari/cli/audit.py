"""``kasuhara audit``: read the audit trail (who did what to which recordings, when, why)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from ..audit import ACTIONS, AuditLog, AuditRecord, actor
from ..events import NullEvents
from ..search import local_midnight
from .common import EXIT_OK, config_option, load_config
from .recordings import open_store, run_async, show_time, text, timezone_of, when


@click.group()
def audit() -> None:
    """The audit trail: one record per admin action and per retention run (audit/YYYY/MM/DD/…).

    \b
    Reading it uses the [admin] credentials when set, else [storage]'s. Cost: one LIST per day in the
    range and one GET per record.
    Exit codes: 0 done (also: nothing found), 1 failed, 2 bad usage or configuration, 3 refused.
    """


def _target(record: AuditRecord) -> str:
    t: Mapping[str, Any] = record.target
    if isinstance(t.get("call_id"), str):
        return str(t["call_id"])
    if record.action == "purge":
        counts = record.details.get("counts")
        purged = counts.get("purged") if isinstance(counts, Mapping) else None
        return f"run {t.get('run_id', '?')}: {purged if purged is not None else '?'} purged"
    parts = []
    if "from" in t and "to" in t:
        parts.append(f"{str(t['from'])[:10]}..{str(t['to'])[:10]}")
    ids = t.get("call_ids")
    if isinstance(ids, list):
        parts.append(f"{len(ids)} call(s)")
    return " ".join(parts) or "-"


ROW = "{at:<19}  {action:<8}  {result:<12}  {by:<16}  {target:<32}  {reason}"


@audit.command("list")
@config_option
@click.option(
    "--from", "start", metavar="D", help="From D (YYYY-MM-DD or ISO datetime), inclusive; default 30 days."
)
@click.option("--to", "end", metavar="D", help="To D, inclusive (default: now).")
@click.option("--action", type=click.Choice(ACTIONS), help="Only this action.")
@click.option("--json", "as_json", is_flag=True, help="A JSON array of the records, for scripts.")
def list_cmd(
    config_path: str | None, start: str | None, end: str | None, action: str | None, as_json: bool
) -> None:
    """List audit records, oldest first."""
    cfg = load_config(config_path)
    tz = timezone_of(cfg)
    now = datetime.now(UTC)
    begin = when(start, tz, "--from") or local_midnight(now.astimezone(tz).date() - timedelta(days=30), tz)
    stop = when(end, tz, "--to", end=True) or now
    if stop < begin:
        raise click.BadParameter("--to is before --from", param_hint="'--to'")
    store = open_store(cfg, role="admin", command="audit list")

    async def go() -> int:
        log = AuditLog(store, NullEvents(), by=actor(cfg))
        count = 0
        problems: list[tuple[str, str]] = []
        try:
            if as_json:
                click.echo("[", nl=False)
            else:
                click.echo(
                    ROW.format(
                        at=f"at ({cfg.general.timezone})"[:19],
                        action="action",
                        result="result",
                        by="by",
                        target="target",
                        reason="reason",
                    )
                )
            async for record in log.records(
                begin,
                stop,
                action=action,
                on_problem=lambda k, p: problems.append((k, p)),
            ):
                if as_json:
                    doc = json.loads(record.to_json())
                    doc["key"] = record.key
                    click.echo(
                        ("\n" if count == 0 else ",\n") + json.dumps(doc, ensure_ascii=False), nl=False
                    )
                else:
                    click.echo(
                        ROW.format(
                            at=show_time(record.at, tz),
                            action=record.action,
                            result=text(record.result, 12),
                            by=text(record.by, 16),
                            target=text(_target(record), 32),
                            reason=text(record.reason, 60),
                        )
                    )
                count += 1
            if as_json:
                click.echo("\n]" if count else "]")
            else:
                click.echo(f"{count} record(s)", err=True)
            for key, problem in problems:
                click.echo(f"warning: {key}: {problem}", err=True)
        finally:
            store.close()
        return count

    run_async(cfg, go)
    raise SystemExit(EXIT_OK)
