"""``kasuhara recordings``: find, inspect, download, export, hold, release and delete recordings.

Also the plumbing ``kasuhara retention`` and ``kasuhara audit`` share: credentials per role, dates in
``general.timezone``, progress bars, and turning expected failures into a message and an exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from zoneinfo import ZoneInfo

import click

from ..audit import AuditLog, AuditRecord, CommandEvents, actor
from ..config import Config
from ..events import now_iso
from ..export import EvidenceExport, EvidenceMismatch, ExportError, ExportItem, ExportResult, verdict
from ..safe import UnsafeValueError, clean_caller_text, json_for_terminal, printable, safe_call_id
from ..search import (
    Catalog,
    CorruptMetadata,
    Entry,
    Filters,
    Located,
    Unreadable,
    local_midnight,
    parse_direction,
    parse_metadata,
    parse_when,
    started_of,
    zone,
)
from ..signing import SigningError, load_signer
from ..storage import (
    DeletionGuard,
    HoldRecord,
    MinioStore,
    ObjectRef,
    Pins,
    PreconditionFailed,
    RecordingHolds,
    StorageError,
    StorageRefused,
    StorageSetupError,
    StorageUnavailable,
    hash_file,
    pin_versions,
)
from .common import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_REFUSED, config_option, load_config

T = TypeVar("T")

#: Done, but a pinned object has a later version: "superseded — possible tampering" (README).
EXIT_SUPERSEDED = 4
#: Done, but a file has no sha256 recorded at capture: unverifiable, which is not a mismatch (README).
EXIT_UNVERIFIABLE = 5

EXIT_CODES_HELP = (
    "Exit codes: 0 done (also: nothing to do), 1 failed, 2 bad usage or configuration, 3 refused."
)


# --------------------------------------------------------------------------------------------- plumbing


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


def run_async(cfg: Config, make: Callable[[], Awaitable[T]]) -> T:
    """Run a command's coroutine; expected failures become a message on stderr and an exit code."""
    try:
        return asyncio.run(_guarded(make))
    except CliExit as exc:
        finish(exc.code, str(exc))
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


def open_store(cfg: Config, *, role: str, command: str, require: bool = False) -> MinioStore:
    """The S3 client for a role. ``admin``: the [admin] keys (``require``: refuse without them, exit 3;
    otherwise fall back to [storage]). ``retention``: [retention] keys, else [storage]'s."""
    section = cfg.admin if role == "admin" else cfg.retention
    access, secret = section.access_key, section.secret_key
    if not (access and secret):
        if require:
            missing = " and ".join(n for n, v in (("access_key", access), ("secret_key", secret)) if not v)
            finish(
                EXIT_REFUSED,
                f"refused: `kasuhara {command}` needs the admin S3 credentials, and [admin] {missing} "
                f"is not set (config file, or KASUHARA_ADMIN__ACCESS_KEY / KASUHARA_ADMIN__SECRET_KEY)",
            )
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


@contextlib.contextmanager
def progress(length: int, label: str) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr when stderr is a terminal; otherwise nothing is drawn."""
    if length <= 0 or not sys.stderr.isatty():
        yield lambda n: None
        return
    with click.progressbar(length=length, label=label, file=sys.stderr) as bar:
        yield bar.update


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


@dataclass
class Session:
    cfg: Config
    tz: ZoneInfo
    store: MinioStore
    events: CommandEvents
    audit: AuditLog
    catalog: Catalog


@contextlib.asynccontextmanager
async def session(cfg: Config, store: MinioStore) -> AsyncIterator[Session]:
    try:
        async with CommandEvents(cfg.mqtt) as events:
            yield Session(
                cfg=cfg,
                tz=timezone_of(cfg),
                store=store,
                events=events,
                audit=AuditLog(store, events, by=actor(cfg)),
                catalog=Catalog(store),
            )
        if events.failure is not None:
            click.echo(
                f"warning: MQTT broker {cfg.mqtt.host}:{cfg.mqtt.port}: events not published "
                f"({events.failure}); the audit record in S3 is complete",
                err=True,
            )
    finally:
        store.close()


async def audit_or_fail(s: Session, record: AuditRecord, *, strict: bool) -> None:
    """Write an audit record. ``strict``: an action that must not happen unaudited fails (exit 1)."""
    try:
        await s.audit.write(record)
    except StorageError as exc:
        if strict:
            fail(EXIT_FAILED, f"audit record could not be written ({exc}); nothing was handed out")
        click.echo(f"warning: audit record could not be written: {exc}", err=True)


async def audit_first(
    s: Session,
    action: str,
    *,
    reason: str,
    target: Mapping[str, Any],
    details: Mapping[str, Any] | None = None,
) -> AuditRecord:
    """The audit record written BEFORE a destructive or evidence-handing action (release, delete,
    download, export). If it cannot be written the action is refused: nothing happens unaudited."""
    record = s.audit.new(action, reason=reason, result="started", target=target, details=details)
    try:
        return await s.audit.write(record)
    except StorageError as exc:
        fail(EXIT_FAILED, f"refused: the audit record could not be written ({exc}); nothing was done")


async def audit_outcome(s: Session, first: AuditRecord, result: str, details: Mapping[str, Any]) -> None:
    """The follow-up record with how an audited action ended (best effort: the action is on record)."""
    await audit_or_fail(
        s,
        s.audit.new(
            first.action,
            reason=first.reason,
            result=result,
            target=first.target,
            details={**details, "started_record": first.key},
        ),
        strict=False,
    )


async def locate(s: Session, call_id: str, days: list[date]) -> Located:
    found = await s.catalog.locate(call_id, days=days)
    if found is None:
        hint = "" if days else "; if the id carries no timestamp, give the call's date with --date"
        fail(EXIT_FAILED, f"no recording with call id {call_id!r}{hint}")
    return found


async def entry_of(s: Session, found: Located) -> Entry:
    if not found.metadata:
        fail(EXIT_FAILED, f"{found.keys.call_id}: audio without metadata at {found.keys.audio}")
    try:
        return await s.catalog.entry(found)
    except CorruptMetadata as exc:
        fail(EXIT_FAILED, f"{found.keys.call_id}: metadata {found.keys.metadata} is unreadable: {exc}")


@dataclass(frozen=True)
class Evidence:
    """A call as evidence: the pinned versions, the hold record, the pinned metadata's entry."""

    pins: Pins
    hold: HoldRecord | None
    entry: Entry

    def superseded(self) -> list[str]:
        """One line per pinned object with a later version or delete marker (possible tampering)."""
        lines = []
        for pin in (self.pins.audio, self.pins.metadata):
            if pin.superseded:
                newest = pin.later[0]
                kind = "a delete marker" if newest.is_delete_marker else f"version {newest.version_id}"
                lines.append(
                    f"SUPERSEDED — possible tampering: {pin.key} has {len(pin.later)} later version(s) "
                    f"(newest: {kind}); the evidence is version {pin.version_id} ({pin.source})"
                )
        return lines


async def evidence_of(s: Session, found: Located) -> Evidence:
    """Read a call at its pinned versions (never simply the latest: a later PUT is not the evidence)."""
    cid = found.keys.call_id
    if not found.metadata:
        fail(EXIT_FAILED, f"{cid}: audio without metadata at {found.keys.audio}")
    hold = await RecordingHolds(s.store).record(cid)
    pins = await pin_versions(s.store, found.keys, hold.versions if hold is not None else {})
    meta = pins.metadata
    data = None
    if meta.present:
        data = await s.store.get_bytes(found.keys.metadata, version_id=meta.version_id)
    if data is None:
        fail(
            EXIT_FAILED, f"EVIDENCE MISSING: {found.keys.metadata} version {meta.version_id} ({meta.source})"
        )
    try:
        doc = parse_metadata(data, cid)
        started = started_of(doc)
    except ValueError as exc:
        fail(EXIT_FAILED, f"{cid}: metadata {found.keys.metadata} is unreadable: {exc}")
    audio = doc.get("audio")
    audio_key = audio.get("key") if isinstance(audio, Mapping) else None
    entry = Entry(
        call_id=cid,
        metadata_key=found.keys.metadata,
        audio_key=audio_key if isinstance(audio_key, str) else None,
        started_at=started,
        doc=doc,
        held=hold is not None,
    )
    return Evidence(pins, hold, entry)


def call_target(found: Located) -> dict[str, Any]:
    return {"call_id": found.keys.call_id, "keys": [found.keys.audio, found.keys.metadata]}


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
    store = open_store(cfg, role="admin", command="recordings list")

    async def go() -> int:
        async with session(cfg, store) as s:
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
            async for e in s.catalog.search(f, on_problem=problems.append):
                if as_json:
                    click.echo(
                        ("\n" if count == 0 else ",\n") + json_for_terminal(e.summary()),
                        nl=False,
                    )
                else:
                    click.echo(_row(e, s.tz))
                count += 1
            if as_json:
                click.echo("\n]" if count else "]")
            else:
                click.echo(f"{count} recording(s)")  # part of the result (stderr: errors only)
            for p in problems:
                click.echo(f"warning: {printable(p.key, max_chars=300)}: {printable(p.problem)}", err=True)
            record = s.audit.new(
                "list", reason=reason, target=f.as_dict(), details={"counts": {"listed": count}}
            )
            await audit_or_fail(s, record, strict=False)
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
    days = day_option(on_date, timezone_of(cfg))
    store = open_store(cfg, role="admin", command="recordings show")

    async def go() -> int:
        async with session(cfg, store) as s:
            found = await locate(s, cid, days)
            ev = await evidence_of(s, found)
            e, hold = ev.entry, ev.hold
            objects = {}
            for pin in (ev.pins.audio, ev.pins.metadata):
                info = await s.store.stat(pin.key, version_id=pin.version_id) if pin.present else None
                objects[pin.key] = (
                    None
                    if info is None
                    else {
                        "bytes": info.size,
                        "sha256": info.metadata.get("sha256"),
                        "version_id": info.version_id,
                        "version_source": pin.source,
                        "legal_hold": info.legal_hold,
                        "superseded_by": [v.version_id for v in pin.later],
                    }
                )
            superseded = ev.superseded()
            if as_json:
                doc = {
                    "metadata": e.doc,
                    "hold_record": asdict(hold) if hold else None,
                    "objects": objects,
                    "superseded": superseded,
                }
                click.echo(json_for_terminal(doc, indent=1))
            else:
                _print_show(e, hold, objects, s.tz, cfg.general.timezone)
            for line in superseded:
                click.echo(f"kasuhara: {line}", err=True)
            await audit_or_fail(
                s,
                s.audit.new(
                    "show",
                    reason=reason,
                    result="superseded" if superseded else "done",
                    target=call_target(found),
                ),
                strict=False,
            )
            return EXIT_SUPERSEDED if superseded else EXIT_OK

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
    store = open_store(cfg, role="admin", command="recordings download", require=True)

    async def go() -> tuple[str, str, list[str]]:
        async with session(cfg, store) as s:
            found = await locate(s, cid, days)
            ev = await evidence_of(s, found)
            e, pin = ev.entry, ev.pins.audio
            audio = e.doc.get("audio") if isinstance(e.doc.get("audio"), Mapping) else {}
            assert isinstance(audio, Mapping)
            if not e.audio_key:
                fail(EXIT_FAILED, f"{cid} has no audio (status: {audio.get('status') or 'none'})")
            if not pin.present:
                fail(EXIT_FAILED, f"EVIDENCE MISSING: {pin.key} version {pin.version_id} ({pin.source})")
            # On record before a byte is handed out; refused if that cannot be written.
            first = await audit_first(
                s,
                "download",
                reason=reason,
                target=call_target(found),
                details={"version_id": pin.version_id, "file": out.name},
            )
            tmp = out.with_name(f".{out.name}.{os.getpid()}.download")
            try:
                info = await s.store.get_to_file(pin.key, tmp, version_id=pin.version_id)
                size, sha = await asyncio.to_thread(hash_file, tmp)
                recorded = [audio.get("sha256"), info.metadata.get("sha256")]
                check = verdict(sha, recorded)
                if isinstance(audio.get("bytes"), int) and audio.get("bytes") != size:
                    check = "mismatch"
                facts = {"sha256": sha, "bytes": size, "version_id": info.version_id, "verification": check}
                if check == "mismatch":
                    await audit_outcome(s, first, "integrity_failure", {**facts, "recorded": recorded})
                    fail(
                        EXIT_FAILED,
                        f"INTEGRITY FAILURE: {pin.key} version {pin.version_id} hashes to {sha} ({size} "
                        f"bytes), but capture recorded {', '.join(str(r) for r in recorded if r)}; "
                        "nothing written",
                    )
                os.replace(tmp, out)
            finally:
                tmp.unlink(missing_ok=True)
            superseded = ev.superseded()
            await audit_outcome(
                s, first, "superseded" if superseded else check, {**facts, "superseded": superseded}
            )
            return sha, check, superseded

    sha, check, superseded = run_async(cfg, go)
    if check == "verified":
        click.echo(f"{out}  sha256 {sha} (matches capture)")
    else:
        click.echo(f"{out}  sha256 {sha}")
        click.echo(
            "kasuhara: UNVERIFIABLE: no sha256 was recorded at capture (missing provenance, not a "
            "mismatch): the file cannot be checked against the original",
            err=True,
        )
    for line in superseded:
        click.echo(f"kasuhara: {line}", err=True)
    raise SystemExit(EXIT_SUPERSEDED if superseded else EXIT_UNVERIFIABLE if check != "verified" else EXIT_OK)


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
    store = open_store(cfg, role="admin", command="recordings export", require=True)
    try:
        signer = load_signer(cfg.admin.signing_key)  # manifest.sig (signing.py)
    except SigningError as exc:
        finish(EXIT_CONFIG, f"configuration error: {exc}")
    if signer is None:
        click.echo("warning: no export signing key (`kasuhara storage init` makes one): unsigned", err=True)

    async def go() -> tuple[ExportResult, int, str] | None:
        async with session(cfg, store) as s:
            items: list[ExportItem] = []
            for cid in cids:
                found = await locate(s, cid, [])
                if not found.metadata:
                    fail(EXIT_FAILED, f"{cid}: audio without metadata at {found.keys.audio}")
                items.append(ExportItem(cid, found.keys.metadata))
            problems: list[Unreadable] = []
            if f is not None:
                days = (f.end.astimezone(UTC).date() - f.start.astimezone(UTC).date()).days + 1
                with progress(days, "searching") as step:
                    async for e in s.catalog.search(f, on_day=lambda _d: step(1), on_problem=problems.append):
                        if e.call_id not in cids:
                            items.append(ExportItem(e.call_id, e.metadata_key))
            for p in problems:
                click.echo(
                    f"warning: not exported, unreadable metadata: {printable(p.key, max_chars=300)}: "
                    f"{printable(p.problem)}",
                    err=True,
                )
            query: dict[str, Any] = dict(f.as_dict()) if f is not None else {}
            if cids:
                query["calls"] = cids
            target = {**query, "call_ids": [i.call_id for i in items]}
            if not items:
                await audit_or_fail(
                    s, s.audit.new("export", reason=reason, result="empty", target=target), strict=False
                )
                return None
            # On record before anything is read; its key goes into the manifest.
            first = await audit_first(s, "export", reason=reason, target=target, details={"file": out.name})
            with progress(len(items), "exporting") as step:
                exporter = EvidenceExport(
                    s.store,
                    created_by=s.audit.by,
                    query=query,
                    reason=reason,
                    progress=step,
                    audit_key=first.key,
                )
                exporter.signer = signer
                try:
                    result = await exporter.write(items, out)
                except (EvidenceMismatch, ExportError) as exc:
                    await audit_outcome(s, first, "failed", {"error": str(exc)})
                    fail(EXIT_FAILED, f"export aborted, no zip written: {exc}")
            EvidenceExport.commit(result, out)
            code, verdict_text = export_verdict(result)
            await audit_outcome(
                s,
                first,
                "done" if code == EXIT_OK else verdict_text.split(":", 1)[0].lower().replace(" ", "_"),
                {
                    "file": out.name,
                    "zip_sha256": result.sha256,
                    "counts": {"recordings": result.recordings, "files": result.files, "bytes": result.bytes},
                    "verification": dict(result.verification),
                    "superseded": list(result.superseded),
                },
            )
            return result, code, verdict_text

    outcome = run_async(cfg, go)
    if outcome is None:
        click.echo("nothing to export: no recording matches", err=True)
        raise SystemExit(EXIT_OK)
    result, code, verdict_text = outcome
    counts = ", ".join(f"{n} {k}" for k, n in sorted(result.verification.items()))
    click.echo(
        f"{out}: {result.recordings} recording(s), zip sha256 {result.sha256}; files: {counts}; "
        "verify with: unzip, then sha256sum -c SHA256SUMS"
    )
    if code != EXIT_OK:
        click.echo(f"kasuhara: {verdict_text}", err=True)
    raise SystemExit(code)


def export_verdict(result: ExportResult) -> tuple[int, str]:
    """The exit code of an export and why: a mismatch or a missing pinned version fails (1); a later
    version of an exported key is reported as possible tampering (4); files without a capture hash are
    unverifiable (5). The zip is written in every case, its manifest saying which file is which."""
    v = result.verification
    if v.get("mismatch") or v.get("missing"):
        return EXIT_FAILED, (
            f"INTEGRITY FAILURE: {v.get('mismatch', 0)} file(s) do not match the hash recorded at capture, "
            f"{v.get('missing', 0)} pinned version(s) missing (see 'verification' in manifest.json)"
        )
    if result.superseded:
        return EXIT_SUPERSEDED, (
            f"SUPERSEDED: possible tampering: a later version exists of {', '.join(result.superseded)}; "
            "the pinned versions were exported (see 'superseded_by' in manifest.json)"
        )
    if v.get("unverifiable"):
        return EXIT_UNVERIFIABLE, (
            f"UNVERIFIABLE: {v['unverifiable']} file(s) have no sha256 recorded at capture (missing "
            "provenance, not a mismatch; see 'verification' in manifest.json)"
        )
    return EXIT_OK, "verified"


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
    store = open_store(cfg, role="admin", command="recordings hold")

    async def go() -> str:
        async with session(cfg, store) as s:
            found = await locate(s, cid, days)
            started = None
            if found.metadata:
                # Unreadable metadata must not stop a hold: the hold is what keeps the evidence.
                with contextlib.suppress(CorruptMetadata):
                    started = (await s.catalog.entry(found)).doc.get("started_at")
            record = HoldRecord.create(cid, reason, s.audit.by, at=now_iso(), started_at=started)
            holds = RecordingHolds(s.store)
            outcome = await holds.apply(record, found.keys)
            # Re-read what the hold protects: a retention sweep that deleted a version between its check
            # of the hold records and this hold cannot be undone, and must not be reported as "held".
            refused = sorted(outcome.refused)
            lost = sorted(set(outcome.lost) | set(await holds.verify(outcome.pinned)) - set(refused))
            result = (
                "lost"
                if lost
                else "refused"
                if refused
                else "done"
                if outcome.record_written
                else "already_held"
            )
            await audit_or_fail(
                s,
                s.audit.new(
                    "hold",
                    reason=reason,
                    result=result,
                    target=call_target(found),
                    details={
                        "legal_holds": list(outcome.held_keys),
                        "versions": dict(outcome.pinned),
                        "lost": lost,
                        "refused": refused,
                    },
                ),
                strict=False,
            )
            if refused and not lost:
                # This key may not place legal holds (the service key on Ceph RGW): the record stands.
                fail(
                    EXIT_REFUSED,
                    f"refused: {cid}: the hold record is written, but the server refused the S3 legal hold "
                    f"on {', '.join(refused)} to this key; run it with the admin key",
                )
            if lost:
                fail(
                    EXIT_FAILED,
                    f"EVIDENCE LOST: {cid}: the hold record is written, but {', '.join(lost)} no longer "
                    "exists in the version the hold pins (deleted before the hold took effect, e.g. by a "
                    "retention sweep running at the same time)",
                )
            return result

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
    store = open_store(cfg, role="admin", command="recordings release", require=True)

    async def go() -> str:
        async with session(cfg, store) as s:
            found = await locate(s, cid, days)
            holds = RecordingHolds(s.store)
            previous = await holds.record(cid)
            why = await DeletionGuard(s.store).why_not(cid, [found.keys.audio, found.keys.metadata])
            if previous is None and why is None:
                await audit_or_fail(
                    s,
                    s.audit.new("release", reason=reason, result="not_held", target=call_target(found)),
                    strict=False,
                )
                return "not_held"
            hold_was = previous.as_metadata_hold() if previous else None
            # On record before a single legal hold is lifted; refused if that cannot be written.
            first = await audit_first(
                s,
                "release",
                reason=reason,
                target=call_target(found),
                details={"hold_was": hold_was, "versions": dict(previous.versions) if previous else {}},
            )
            released = await holds.release(found.keys)
            await audit_outcome(s, first, "done", {"released": list(released), "hold_was": hold_was})
            return "released"

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
    store = open_store(cfg, role="admin", command="recordings delete", require=True)

    async def go() -> int:
        async with session(cfg, store) as s:
            found = await locate(s, cid, days)
            # Early deletion of a recording still under the bucket's default GOVERNANCE retention: the
            # admin's delete (alone) sends the bypass header; holds are still refused by the guard.
            guard = DeletionGuard(s.store, bypass_governance=True)
            target = call_target(found)
            why = await guard.why_not(cid, [found.keys.audio, found.keys.metadata])
            if why is not None:
                await audit_or_fail(
                    s,
                    s.audit.new(
                        "delete", reason=reason, result="refused", target=target, details={"why": why}
                    ),
                    strict=False,
                )
                fail(EXIT_REFUSED, f"refused: {cid} is on hold ({why}); release it first")
            if not yes and not click.confirm(
                f"Delete every version of {cid}'s audio and metadata?", err=True
            ):
                fail(EXIT_FAILED, "not confirmed; nothing deleted")
            refs: dict[str, list[ObjectRef]] = {}
            for key in (found.keys.audio, found.keys.metadata):
                refs[key] = [
                    ObjectRef(o.key, o.version_id)
                    async for o in s.store.list_prefix(key, versions=True)
                    if o.key == key
                ]
            # On record before anything is deleted; refused if that cannot be written.
            started = await audit_first(
                s,
                "delete",
                reason=reason,
                target=target,
                details={
                    "versions": [{"key": r.key, "version_id": r.version_id} for v in refs.values() for r in v]
                },
            )
            # Audio first, metadata only once the audio is gone: never audio left without metadata.
            first = await guard.delete(refs[found.keys.audio])
            second = await guard.delete(refs[found.keys.metadata]) if not first.refused else None
            refused = list(first.refused) + (list(second.refused) if second else [])
            deleted = len(first.deleted) + (len(second.deleted) if second else 0)
            await audit_outcome(
                s,
                started,
                "refused" if refused else "done",
                {
                    "counts": {"objects_deleted": deleted, "objects_refused": len(refused)},
                    "refused": [{"key": r.ref.key, "reason": r.reason} for r in refused],
                },
            )
            if refused:
                fail(
                    EXIT_REFUSED,
                    f"refused: {refused[0].ref.key}: {refused[0].reason} ({deleted} object(s) deleted)",
                )
            return deleted

    deleted = run_async(cfg, go)
    click.echo(f"{cid}: deleted ({deleted} object version(s))")
    raise SystemExit(EXIT_OK)
