"""``kasuhara recordings``: find, inspect, download, export, hold, release and delete recordings.

A face of the evidence desk (:mod:`kasuhara_ari.evidence.desk`): click options, parsing, printing,
progress bars and exit codes here; locating, role checks, audit records and outcomes there.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import click

from ..config import Config
from ..evidence.desk import Downloaded, Exported, Outcome
from ..safe import UnsafeValueError, json_for_terminal, printable, safe_call_id
from ..search import Entry, Filters, Unreadable, local_midnight, parse_direction
from ..signing import SigningError, load_signer
from ..storage import HoldRecord
from .admin import (
    finish,
    open_store,
    run_async,
    session,
    show_time,
    text,
    timezone_of,
    when,
)
from .common import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, config_option, load_config

#: Done, but a pinned object has a later version: "superseded — possible tampering" (README).
EXIT_SUPERSEDED = 4
#: Done, but a file has no sha256 recorded at capture: unverifiable, which is not a mismatch (README).
EXIT_UNVERIFIABLE = 5
#: The exit code of each desk outcome (an export's integrity failure still writes its zip: exit 1).
OUTCOME_EXIT = {
    Outcome.DONE: EXIT_OK,
    Outcome.SUPERSEDED: EXIT_SUPERSEDED,
    Outcome.UNVERIFIABLE: EXIT_UNVERIFIABLE,
    Outcome.INTEGRITY_FAILURE: EXIT_FAILED,
}

EXIT_CODES_HELP = (
    "Exit codes: 0 done (also: nothing to do), 1 failed, 2 bad usage or configuration, 3 refused."
)


# ---------------------------------------------------------------------------------------------- options


def day_option(text: str | None, tz: ZoneInfo) -> list[date]:
    """``--date D``: the UTC days a local date D spans (a call's key carries the UTC day)."""
    if text is None:
        return []
    start = when(text, tz, "--date")
    assert start is not None
    end = start + timedelta(days=1) - timedelta(microseconds=1)
    return sorted({start.astimezone(UTC).date(), end.astimezone(UTC).date()})


def call_id_arg(value: str) -> str:
    try:
        return safe_call_id(value)
    except UnsafeValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'CALL_ID'") from None


def direction_option(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return parse_direction(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--direction'") from None


def reason_option(required: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--reason",
        required=required,
        default=None if required else "",
        help="Why (written into the audit record)." + (" Required." if required else ""),
    )


date_option = click.option(
    "--date",
    "on_date",
    metavar="D",
    help="The call's date (YYYY-MM-DD, general.timezone), for ids that carry no timestamp.",
)


def check_output(path: str, force: bool) -> Path:
    out = Path(path)
    if out.exists() and not force:
        raise click.BadParameter(f"{out} exists (use --force to replace it)", param_hint="'-o'")
    if not out.parent.exists():
        raise click.BadParameter(f"directory {out.parent} does not exist", param_hint="'-o'")
    return out


def range_filters(
    cfg: Config,
    start: str | None,
    end: str | None,
    *,
    caller: str | None,
    direction: str | None,
    flagged: bool,
    held: bool,
    default_days: int | None,
) -> Filters:
    tz = timezone_of(cfg)
    now = datetime.now(UTC)
    begin = when(start, tz, "--from")
    if begin is None:
        if default_days is None:
            raise click.BadParameter("required (or give --call)", param_hint="'--from'")
        begin = local_midnight(now.astimezone(tz).date() - timedelta(days=default_days), tz)
    stop = when(end, tz, "--to", end=True) or now
    if stop < begin:
        raise click.BadParameter("--to is before --from", param_hint="'--to'")
    if (stop - begin).days > 3660:
        raise click.BadParameter("a range of more than 10 years is not searched", param_hint="'--from'")
    return Filters(
        start=begin,
        end=stop,
        caller=caller,
        direction=direction_option(direction),
        flagged=flagged,
        held=held,
    )


def filter_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.option(
                "--from", "start", metavar="D", help="From D (YYYY-MM-DD or ISO datetime), inclusive."
            ),
            click.option("--to", "end", metavar="D", help="To D, inclusive (default: now)."),
            click.option("--caller", metavar="N", help="Caller number (+81/0 forms match; * wildcard)."),
            click.option("--direction", metavar="inbound|outbound", help="in/out accepted."),
            click.option("--flagged", is_flag=True, help="Only calls flagged during the call."),
            click.option("--held", is_flag=True, help="Only recordings on hold."),
        ]
    ):
        fn = option(fn)
    return fn


# --------------------------------------------------------------------------------------------- group


@click.group()
def recordings() -> None:
    """Find, inspect, download, export, hold, release and delete recordings.

    \b
    Dates are YYYY-MM-DD or ISO 8601 datetimes, read in general.timezone; --from/--to are inclusive.
    Credentials: download, export, release and delete need [admin] access_key/secret_key (env
    KASUHARA_ADMIN__ACCESS_KEY/SECRET_KEY) and refuse (exit 3) without them; list, show and hold use
    them when set, else [storage]'s. Every command writes an audit record (audit/…) and audit.<action>
    on MQTT. Search cost: one LIST per day in the range and one GET per recording (metadata only).
    Exit codes: 0 done (also: nothing to do), 1 failed, 2 bad usage or configuration, 3 refused;
    show/download/export: 4 done but superseded (a later version of a pinned object: possible
    tampering), 5 done but unverifiable (no sha256 recorded at capture).
    """


ROW = "{started:<19}  {call_id:<24}  {dir:<3}  {caller:<16}  {dur:>7}  {held:<4}  {flags}"


def _row(e: Entry, tz: ZoneInfo) -> str:
    s = e.summary()
    dur = s["duration_s"]
    return ROW.format(
        started=show_time(s["started_at"], tz),
        call_id=text(e.call_id, 24),
        dir={"inbound": "in", "outbound": "out"}.get(str(s["direction"]), "?"),
        caller=text(s["caller"]["number"] or "-", 16),
        dur=f"{dur:.0f}s" if isinstance(dur, int | float) else "-",
        held="held" if s["held"] else "",
        flags=text(",".join(map(str, s["flags"])), 40),
    )


@recordings.command("list")
@config_option
@filter_options
@click.option("--json", "as_json", is_flag=True, help="A JSON array of summaries, for scripts.")
@reason_option(required=False)
def list_cmd(
    config_path: str | None,
    start: str | None,
    end: str | None,
    caller: str | None,
    direction: str | None,
    flagged: bool,
    held: bool,
    as_json: bool,
    reason: str,
) -> None:
    """List recordings that started in a range (default: the last 7 days)."""
    cfg = load_config(config_path)
    f = range_filters(
        cfg, start, end, caller=caller, direction=direction, flagged=flagged, held=held, default_days=7
    )
    tz = timezone_of(cfg)
    store = open_store(cfg, role="admin", command="recordings list", action="list")

    async def go() -> int:
        async with session(cfg, store) as desk:
            problems: list[Unreadable] = []
            count = 0
            if as_json:
                click.echo("[", nl=False)
            else:
                click.echo(
                    ROW.format(
                        started=f"started ({cfg.general.timezone})"[:19],
                        call_id="call id",
                        dir="dir",
                        caller="caller",
                        dur="length",
                        held="hold",
                        flags="flags",
                    )
                )
            # The desk writes the list's audit record once the search is done.
            async for e in desk.search(f, reason=reason, on_problem=problems.append):
                if as_json:
                    click.echo(
                        ("\n" if count == 0 else ",\n") + json_for_terminal(e.summary()),
                        nl=False,
                    )
                else:
                    click.echo(_row(e, tz))
                count += 1
            if as_json:
                click.echo("\n]" if count else "]")
            else:
                click.echo(f"{count} recording(s)")  # part of the result (stderr: errors only)
            for p in problems:
                click.echo(f"warning: {printable(p.key, max_chars=300)}: {printable(p.problem)}", err=True)
            return count

    run_async(cfg, go)
    raise SystemExit(EXIT_OK)


@recordings.command()
@config_option
@click.argument("call_id")
@date_option
@click.option("--json", "as_json", is_flag=True, help="The metadata document plus hold and objects.")
@reason_option(required=False)
def show(config_path: str | None, call_id: str, on_date: str | None, as_json: bool, reason: str) -> None:
    """Show one recording: metadata, hold, stored objects."""
    cfg = load_config(config_path)
    cid = call_id_arg(call_id)
    tz = timezone_of(cfg)
    days = day_option(on_date, tz)
    store = open_store(cfg, role="admin", command="recordings show", action="show")

    async def go() -> int:
        async with session(cfg, store) as desk:
            shown = await desk.show(cid, days=days, reason=reason)
            e, hold = shown.evidence.entry, shown.evidence.hold
            if as_json:
                doc = {
                    "metadata": e.doc,
                    "hold_record": asdict(hold) if hold else None,
                    "objects": shown.objects,
                    "superseded": shown.superseded,
                }
                click.echo(json_for_terminal(doc, indent=1))
            else:
                _print_show(e, hold, shown.objects, tz, cfg.general.timezone)
            for line in shown.superseded:
                click.echo(f"kasuhara: {line}", err=True)
            return OUTCOME_EXIT[shown.outcome]

    raise SystemExit(run_async(cfg, go))


def _print_show(
    e: Entry, hold: HoldRecord | None, objects: Mapping[str, Any], tz: ZoneInfo, tz_name: str
) -> None:
    d = e.doc
    caller = d.get("caller") if isinstance(d.get("caller"), Mapping) else {}
    assert isinstance(caller, Mapping)
    rows: list[tuple[str, str]] = [
        ("call id", e.call_id),
        (f"started ({tz_name})", show_time(d.get("started_at"), tz)),
        ("answered", show_time(d.get("answered_at"), tz)),
        ("ended", show_time(d.get("ended_at"), tz)),
        ("duration", f"{d['duration_s']:.1f} s" if isinstance(d.get("duration_s"), int | float) else "-"),
        ("direction", text(d.get("direction"))),
        ("caller number", text(caller.get("number") or "-")),
        ("caller name", text(caller.get("name") or "-")),
        ("target", text(d.get("target") or "-")),
        ("agent", text(d.get("agent") or "-")),
        ("notice played", "yes" if d.get("notice_played") else "no"),
        ("flags", text(", ".join(map(str, d.get("flags") or [])) or "-")),
        ("hold", f"{text(hold.reason)} (by {text(hold.by)}, {show_time(hold.at, tz)})" if hold else "-"),
    ]
    for esc in d.get("escalations") or []:
        if isinstance(esc, Mapping):
            at, action, result = (
                show_time(esc.get("at"), tz),
                text(esc.get("action")),
                text(esc.get("result")),
            )
            rows.append(("escalation", f"{at} {action} {result}".rstrip()))
    timeline = d.get("timeline")
    rows.append(("timeline events", str(len(timeline)) if isinstance(timeline, list) else "-"))
    for key, info in objects.items():
        if info is None:
            rows.append(("object", f"{key}: (none)"))
        else:
            lock = " legal-hold" if info["legal_hold"] else ""
            rows.append(("object", f"{key}: {info['bytes']:,} bytes sha256 {info['sha256'] or '-'}{lock}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


@recordings.command()
@config_option
@click.argument("call_id")
@click.option(
    "-o", "--output", "output", metavar="FILE", help="Where to write the audio (default: CALL_ID.wav)."
)
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
@date_option
@reason_option(required=True)
def download(
    config_path: str | None, call_id: str, output: str | None, force: bool, on_date: str | None, reason: str
) -> None:
    """Download a recording's audio, verified against the sha256 recorded at capture. Needs admin."""
    cfg = load_config(config_path)
    cid = call_id_arg(call_id)
    out = check_output(output or f"{cid}.wav", force)
    days = day_option(on_date, timezone_of(cfg))
    store = open_store(cfg, role="admin", command="recordings download", action="download")

    async def go() -> Downloaded:
        async with session(cfg, store) as desk:
            return await desk.download(cid, out, days=days, reason=reason)

    got = run_async(cfg, go)
    if got.verification == "verified":
        click.echo(f"{out}  sha256 {got.sha256} (matches capture)")
    else:
        click.echo(f"{out}  sha256 {got.sha256}")
        click.echo(
            "kasuhara: UNVERIFIABLE: no sha256 was recorded at capture (missing provenance, not a "
            "mismatch): the file cannot be checked against the original",
            err=True,
        )
    for line in got.superseded:
        click.echo(f"kasuhara: {line}", err=True)
    raise SystemExit(OUTCOME_EXIT[got.outcome])


@recordings.command()
@config_option
@filter_options
@click.option("--call", "calls", multiple=True, metavar="CALL_ID", help="Export this call (repeatable).")
@click.option("-o", "--output", "output", required=True, metavar="FILE", help="The zip to write.")
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
@reason_option(required=True)
def export(
    config_path: str | None,
    start: str | None,
    end: str | None,
    caller: str | None,
    direction: str | None,
    flagged: bool,
    held: bool,
    calls: tuple[str, ...],
    output: str,
    force: bool,
    reason: str,
) -> None:
    """Export evidence: a zip with audio, metadata, timeline, manifest.json and SHA256SUMS.

    Each object is exported at its pinned version and checked against the sha256 recorded at capture;
    manifest.json marks every file verified / unverifiable / mismatch / missing. Exit 1 on a mismatch or a
    missing version (the zip is still written: it shows which), 4 if a pinned object has a later version
    (possible tampering), 5 if a file has no capture hash. Select by range and filters (--from and --to
    required) or by --call. Needs admin.
    """
    cfg = load_config(config_path)
    cids = [call_id_arg(c) for c in calls]
    f = None
    if not cids or start or end:
        if not (start and end):
            raise click.BadParameter("--from and --to are required (or give --call)", param_hint="'--from'")
        f = range_filters(
            cfg, start, end, caller=caller, direction=direction, flagged=flagged, held=held, default_days=None
        )
    out = check_output(output, force)
    store = open_store(cfg, role="admin", command="recordings export", action="export")
    try:
        signer = load_signer(cfg.admin.signing_key)  # manifest.sig (signing.py)
    except SigningError as exc:
        finish(EXIT_CONFIG, f"configuration error: {exc}")
    if signer is None:
        click.echo("warning: no export signing key (`kasuhara storage init` makes one): unsigned", err=True)

    async def go() -> Exported | None:
        async with session(cfg, store) as desk:
            return await desk.export(out, calls=cids, filters=f, reason=reason, signer=signer)

    exported = run_async(cfg, go)
    if exported is None:
        click.echo("nothing to export: no recording matches", err=True)
        raise SystemExit(EXIT_OK)
    result = exported.result
    counts = ", ".join(f"{n} {k}" for k, n in sorted(result.verification.items()))
    click.echo(
        f"{out}: {result.recordings} recording(s), zip sha256 {result.sha256}; files: {counts}; "
        "verify with: unzip, then sha256sum -c SHA256SUMS"
    )
    if exported.outcome is not Outcome.DONE:
        click.echo(f"kasuhara: {exported.verdict}", err=True)
    raise SystemExit(OUTCOME_EXIT[exported.outcome])


@recordings.command()
@config_option
@click.argument("call_id")
@date_option
@reason_option(required=True)
def hold(config_path: str | None, call_id: str, on_date: str | None, reason: str) -> None:
    """Put a recording on hold: hold record + S3 legal hold; retention and delete then refuse it."""
    cfg = load_config(config_path)
    cid = call_id_arg(call_id)
    days = day_option(on_date, timezone_of(cfg))
    store = open_store(cfg, role="admin", command="recordings hold", action="hold")

    async def go() -> str:
        async with session(cfg, store) as desk:
            return (await desk.hold(cid, days=days, reason=reason)).result

    result = run_async(cfg, go)
    click.echo(f"{cid}: {'held' if result == 'done' else 'already held (legal holds confirmed)'}")
    raise SystemExit(EXIT_OK)


@recordings.command()
@config_option
@click.argument("call_id")
@date_option
@reason_option(required=True)
def release(config_path: str | None, call_id: str, on_date: str | None, reason: str) -> None:
    """Release a hold: legal holds off, hold record removed. Needs admin."""
    cfg = load_config(config_path)
    cid = call_id_arg(call_id)
    days = day_option(on_date, timezone_of(cfg))
    store = open_store(cfg, role="admin", command="recordings release", action="release")

    async def go() -> str:
        async with session(cfg, store) as desk:
            released = await desk.release(cid, days=days, reason=reason)
            return "released" if released.released else "not_held"

    result = run_async(cfg, go)
    click.echo(f"{cid}: {'released' if result == 'released' else 'was not held; nothing to do'}")
    raise SystemExit(EXIT_OK)


@recordings.command()
@config_option
@click.argument("call_id")
@date_option
@reason_option(required=True)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def delete(config_path: str | None, call_id: str, on_date: str | None, reason: str, yes: bool) -> None:
    """Delete a recording for good (every version of its audio and metadata). Needs admin.

    Refused (exit 3) while the recording is on hold. Asks for confirmation unless --yes.
    """
    cfg = load_config(config_path)
    cid = call_id_arg(call_id)
    days = day_option(on_date, timezone_of(cfg))
    if not yes and not sys.stdin.isatty():
        raise click.UsageError("not a terminal: confirm with --yes")
    store = open_store(cfg, role="admin", command="recordings delete", action="delete")

    def confirm(question: str) -> bool:
        return click.confirm(question, err=True)

    async def go() -> int:
        async with session(cfg, store) as desk:
            gone = await desk.delete(cid, days=days, reason=reason, confirm=None if yes else confirm)
            return gone.versions_deleted

    deleted = run_async(cfg, go)
    click.echo(f"{cid}: deleted ({deleted} object version(s))")
    raise SystemExit(EXIT_OK)
