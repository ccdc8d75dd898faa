"""``kasuhara audit``: read the audit trail (who did what to which recordings, when, why)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from ..audit import ACTIONS, AuditLog, AuditRecord, AuditVerifier, VerifyReport, actor
from ..events import NullEvents
from ..safe import json_for_terminal, printable
from ..search import local_midnight
from .admin import open_store, run_async, show_time, text, timezone_of, when
from .common import EXIT_FAILED, EXIT_OK, config_option, load_config


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
                    click.echo(("\n" if count == 0 else ",\n") + json_for_terminal(doc), nl=False)
                else:
                    click.echo(
                        ROW.format(
                            at=show_time(record.at, tz),
                            action=text(record.action, 24),
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
                click.echo(f"{count} record(s)")  # part of the result, as for recordings list
            for key, problem in problems:
                click.echo(f"warning: {printable(key, max_chars=300)}: {printable(problem)}", err=True)
        finally:
            store.close()
        return count

    run_async(cfg, go)
    raise SystemExit(EXIT_OK)


@audit.command("verify")
@config_option
@click.option("--from", "start", metavar="D", help="From D (its UTC day), inclusive; default: the whole log.")
@click.option("--to", "end", metavar="D", help="To D (its UTC day), inclusive; default: now.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object (chains, legacy keys, findings).")
def verify_cmd(config_path: str | None, start: str | None, end: str | None, as_json: bool) -> None:
    """Check the audit trail's hash chains: name every edited, deleted, reordered or moved record.

    \b
    Each writer (admin name + host) chains its records: every record carries the sha256 of the one
    before, and audit-chains/<id>.json names the last. Records older than every chain are listed as
    "unchained (legacy)", which is not tampering. Without --to the heads also vouch for the last
    records (a deleted newest record shows); with --to the range's end is only as good as what it holds.
    Exit codes: 0 intact, 1 a problem found (each named with its key) or S3 failed, 2 bad usage.
    """
    cfg = load_config(config_path)
    tz = timezone_of(cfg)
    begin = when(start, tz, "--from")
    stop = when(end, tz, "--to", end=True)
    if begin is not None and stop is not None and stop < begin:
        raise click.BadParameter("--to is before --from", param_hint="'--to'")
    store = open_store(cfg, role="admin", command="audit verify")

    async def go() -> VerifyReport:
        try:
            return await AuditVerifier(store, start=begin, end=stop).run()
        finally:
            store.close()

    report = run_async(cfg, go)
    if as_json:
        click.echo(json.dumps(report.as_dict(), ensure_ascii=False))
    else:
        for c in report.chains.values():
            span = "-" if c.first_seq is None else f"seq {c.first_seq}..{c.last_seq}"
            state = f"{c.problems} problem(s)" if c.problems else "intact"
            if c.open_end and not c.problems:
                state = "intact up to the range's end"
            click.echo(
                f"chain {c.chain}  {text(c.by, 16):<16} {text(c.host, 20):<20} {c.records:>7} record(s)  "
                f"{span:<16} head {c.head_seq if c.head_seq is not None else '-':<7} {state}"
            )
        if report.legacy:
            click.echo(f"unchained (legacy): {len(report.legacy)} record(s) written before chaining began")
        for f in report.findings:
            click.echo(f"{f.kind.upper():<13} {text(f.key, 120)}  {text(f.detail, 200)}")
        verdict = "intact" if report.ok else f"{len(report.findings)} problem(s)"
        click.echo(f"{report.records} record(s) in {len(report.chains)} chain(s): {verdict}")
    raise SystemExit(EXIT_OK if report.ok else EXIT_FAILED)
