"""``kasuhara care``: the monthly care report, follow-up notes, and ending an agent's pause early.

Every command is for supervisors and admins (the evidence desk's ``care_*`` permits) and is audited
(``care_report``, ``care_note``, ``care_resume``); a note's text stays in its own object.
"""

from __future__ import annotations

import asyncio
import json
import re
from datetime import date, timedelta
from pathlib import Path

import click

from ..ami import AmiError
from ..audit import AuditLog, CommandEvents
from ..care.chart import render_svg
from ..care.cooldown import resume_remote
from ..care.notes import check_agent, read_notes, write_note
from ..care.report import build_report, text_table
from ..config import Config
from ..evidence.desk import DeskRefused, permit
from ..safe import printable
from ..search import Catalog, Filters, local_midnight
from ..storage import MinioStore
from .admin import cli_principal, fail, finish, open_store, run_async, timezone_of
from .common import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_REFUSED, config_option, load_config


@click.group()
def care() -> None:
    """Care for agents: the monthly exposure report, follow-up notes, pauses after harassment calls.

    \b
    For the supervisor and admin roles: the CLI acts as admin with [admin] access_key/secret_key set,
    and refuses (exit 3) on the [storage] keys alone. Every command writes an audit record.
    Exit codes: 0 done, 1 failed, 2 bad usage or configuration, 3 refused.
    """


def _month(text: str) -> tuple[date, date]:
    m = re.fullmatch(r"([0-9]{4})-([0-9]{2})", text.strip())
    if not m or not 1 <= int(m[2]) <= 12:
        raise click.BadParameter(f"{text!r} is not a month like 2026-11", param_hint="'--month'")
    first = date(int(m[1]), int(m[2]), 1)
    nxt = date(first.year + first.month // 12, first.month % 12 + 1, 1)
    return first, nxt - timedelta(days=1)


def _refuse_unless(cfg: Config, action: str, command: str) -> str:
    """Who acts, if their role may; exit 3 otherwise (before anything is opened)."""
    principal = cli_principal(cfg)
    try:
        permit(principal, action, doing=f"`kasuhara {command}`")
    except DeskRefused as exc:
        finish(EXIT_REFUSED, str(exc))
    return principal.name


def _agent(cfg: Config, agent: str) -> str:
    try:
        check_agent(agent)
    except ValueError as exc:
        finish(EXIT_CONFIG, str(exc))
    if cfg.agents.people and agent not in cfg.agents.people:
        finish(EXIT_CONFIG, f"unknown agent {agent!r}: not in the [agents] table")
    return agent


async def _audit(cfg: Config, store: MinioStore, action: str, by: str, **target: object) -> None:
    async with CommandEvents(cfg.mqtt) as events:
        log = AuditLog(store, events, by=by)
        await log.write(log.new(action, target=dict(target)))


@care.command("report")
@config_option
@click.option("--month", "month", required=True, help="The month, YYYY-MM (days read in general.timezone).")
@click.option("--csv", "as_csv", is_flag=True, help="CSV on stdout instead of the table.")
@click.option("--json", "as_json", is_flag=True, help="JSON on stdout instead of the table.")
@click.option("--chart", "chart", type=click.Path(dir_okay=False), help="Also write an SVG bar chart here.")
@click.option(
    "--chart-lang",
    "chart_lang",
    type=click.Choice(["ja", "en"]),
    default="ja",
    show_default=True,
    help="The chart's language.",
)
def report_cmd(
    config_path: str | None, month: str, as_csv: bool, as_json: bool, chart: str | None, chart_lang: str
) -> None:
    """Per agent: harassment calls (flags, warnings, escalations, detections) and minutes in them over
    a month, and who needs a manager's follow-up (followed up / waiting)."""
    cfg = load_config(config_path)
    first, last = _month(month)
    tz = timezone_of(cfg)
    by = _refuse_unless(cfg, "care_report", "care report")
    store = open_store(cfg, role="admin", command="care report", action="care_report")
    start = local_midnight(first, tz)
    end = local_midnight(last + timedelta(days=1), tz) - timedelta(milliseconds=1)

    async def go() -> str:
        try:
            docs = [e.doc async for e in Catalog(store).search(Filters(start=start, end=end))]
            notes = [n async for n in read_notes(store)]
            rep = build_report(month, docs, notes, care=cfg.care, people=cfg.agents.people, month_start=start)
            await _audit(
                cfg, store, "care_report", by, month=month, agents=len(rep.agents), recordings=len(docs)
            )
        finally:
            store.close()
        if chart:
            try:
                svg = render_svg(rep, language=chart_lang)
                await asyncio.to_thread(Path(chart).write_text, svg, encoding="utf-8")
            except OSError as exc:
                fail(EXIT_FAILED, f"cannot write the chart {chart}: {exc.strerror}")
        if as_csv:
            return rep.as_csv()
        if as_json:
            return json.dumps([r.as_dict() for r in rep.agents], ensure_ascii=False, indent=1) + "\n"
        lines = [f"Care report {month} ({cfg.general.timezone}), {len(docs)} recording(s)", *text_table(rep)]
        waiting = [r.agent for r in rep.agents if r.status == "waiting"]
        lines.append(f"follow-up waiting: {', '.join(waiting) if waiting else 'none'}")
        return "\n".join(printable(line, max_chars=400) for line in lines) + "\n"

    click.echo(run_async(cfg, go), nl=False)
    raise SystemExit(EXIT_OK)


@care.command("note")
@config_option
@click.argument("agent")
@click.option("--text", "text", required=True, help="What was done (stored in care/notes/<agent>/).")
def note_cmd(config_path: str | None, agent: str, text: str) -> None:
    """Record a manager's follow-up with AGENT (an endpoint name of the [agents] table)."""
    cfg = load_config(config_path)
    agent = _agent(cfg, agent)
    by = _refuse_unless(cfg, "care_note", "care note")
    store = open_store(cfg, role="admin", command="care note", action="care_note")

    async def go() -> str:
        try:
            try:
                note = await write_note(store, agent, text, by=by)
            except ValueError as exc:
                fail(EXIT_CONFIG, str(exc))
            await _audit(cfg, store, "care_note", by, agent=agent, note_key=note.key)
        finally:
            store.close()
        return note.key

    key = run_async(cfg, go)
    click.echo(f"note stored: {key}")
    raise SystemExit(EXIT_OK)


@care.command("resume")
@config_option
@click.argument("agent")
def resume_cmd(config_path: str | None, agent: str) -> None:
    """End AGENT's recovery pause now (unpause in the queues, clear the device state). Audited."""
    cfg = load_config(config_path)
    agent = _agent(cfg, agent)
    by = _refuse_unless(cfg, "care_resume", "care resume")
    store = open_store(cfg, role="admin", command="care resume", action="care_resume")

    async def go() -> bool:
        try:
            try:
                ended = await resume_remote(cfg, agent, by=by)
            except AmiError as exc:
                fail(EXIT_FAILED, f"AMI at {cfg.ami.host}:{cfg.ami.port}: {exc}")
            await _audit(
                cfg, store, "care_resume", by, agent=agent, result="resumed" if ended else "not_paused"
            )
        finally:
            store.close()
        return ended

    ended = run_async(cfg, go)
    click.echo(f"{agent}: {'pause ended' if ended else 'was not paused (nothing to do)'}")
    raise SystemExit(EXIT_OK)
