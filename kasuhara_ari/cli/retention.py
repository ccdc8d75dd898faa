"""``kasuhara retention``: purge recordings past retention (one sweep, or daily as a daemon)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from datetime import UTC, date, datetime, timedelta
from typing import Any

import click

from ..audit import AuditLog, CommandEvents, actor
from ..config import Config
from ..lease import LeaseUnsupported
from ..metrics import RUNTIME, RuntimeSources
from ..retention import MAX_BATCH, LeaseLost, RetentionSweep, SweepReport, next_run, parse_daily_at
from ..safe import json_for_terminal, printable
from ..storage import MinioStore, StorageError
from ..systemd import Notifier
from .admin import finish, open_store, run_async, show_time, timezone_of
from .common import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REFUSED,
    config_option,
    load_config,
    metrics_endpoint,
)

log = logging.getLogger(__name__)

#: After a failed sweep the daemon tries again this much later (but never past the next daily run).
RETRY_AFTER = timedelta(minutes=15)


@click.group()
def retention() -> None:
    """Purge recordings whose call started more than N days ago, never anything on hold.

    \b
    N is retention.days (default 90), counted in calendar days of general.timezone: a sweep on
    30 May deletes calls that started before 1 March 00:00 local time. The call start is the
    metadata's started_at, never S3's LastModified. Credentials: [retention] access_key/secret_key,
    else [storage]'s. Each sweep writes one audit record (audit/…, action purge) and MQTT events
    retention.started / retention.purged (per recording) / retention.problem / retention.completed.
    Exit codes: 0 done (also: nothing to do, or another sweep is running), 1 failed,
    2 bad usage or configuration, 3 refused.
    """


def _store(cfg: Config) -> MinioStore:
    return open_store(cfg, role="retention", command="retention")


class DayBar:
    """A progress bar over the day prefixes, started once the sweep knows how many there are; drawn
    on stderr only when it is a terminal."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled and sys.stderr.isatty()
        self._bar: Any = None

    def start(self, days: int) -> None:
        if self.enabled and days > 0:
            self._bar = click.progressbar(length=days, label=self.label, file=sys.stderr)
            self._bar.__enter__()

    def step(self, _day: date) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


def _summary(report: SweepReport, cfg: Config) -> None:
    tz = timezone_of(cfg)
    verb = "would purge" if report.dry_run else "purged"
    if report.dry_run:
        for purged in report.purged:
            click.echo(f"would delete  {show_time(purged.started_at, tz)}  {purged.call_id}")
        for skipped in report.skipped:
            click.echo(
                f"would skip    {show_time(skipped.started_at, tz)}  {skipped.call_id}  ({skipped.reason})"
            )
    rows = [
        ("status", report.status + (" (dry run: nothing deleted)" if report.dry_run else "")),
        (
            f"cutoff ({cfg.general.timezone})",
            f"{show_time(report.cutoff.isoformat(), tz)} ({report.days} days)",
        ),
        ("day prefixes walked", str(report.days_walked)),
        ("recordings looked at", str(report.recordings_seen)),
        ("kept (newer than cutoff)", str(report.recordings_kept)),
        (verb, str(len(report.purged))),
        ("skipped (held / refused)", str(len(report.skipped))),
        ("problems (not deleted)", str(report.counts()["problems"])),
        ("object versions deleted", str(report.objects_deleted)),
        ("object versions refused", str(report.objects_refused)),
    ]
    if report.audit_key:
        rows.append(("audit record", report.audit_key))
    for run in report.recovered_runs:
        rows.append(("crashed run recorded", f"{run.get('run_id')}: {run.get('purged', 0)} purged"))
    if report.lease_holder:
        h = report.lease_holder
        rows.append(
            (
                "lease held by",
                f"run {h.get('run_id')} on {h.get('host')} pid {h.get('pid')} until {h.get('expires_at')}",
            )
        )
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")
    for problem in report.problems:
        key, why = printable(problem.key, max_chars=300), printable(problem.problem)
        click.echo(f"problem: {key}: {why}", err=True)
    if report.status == "busy":
        click.echo("refused: another retention sweep holds the lease; this one did nothing", err=True)


async def _one_sweep(
    cfg: Config, store: MinioStore, *, days: int, dry_run: bool, batch_size: int, show_progress: bool
) -> SweepReport:
    bar = DayBar("checking" if dry_run else "purging", show_progress)
    async with CommandEvents(cfg.mqtt) as events:
        sweep = RetentionSweep(
            store,
            events,
            AuditLog(store, events, by=actor(cfg)),
            days=days,
            tz=timezone_of(cfg),
            dry_run=dry_run,
            batch_size=batch_size,
            lease_ttl_s=cfg.retention.lease_ttl_s,
            on_days=bar.start,
            on_day=bar.step,
        )
        try:
            return await sweep.run()
        finally:
            bar.close()


@retention.command("run")
@config_option
@click.option(
    "--days",
    type=click.IntRange(min=1),
    help="Keep this many days (default: retention.days; shorter only with --dry-run).",
)
@click.option("--dry-run", is_flag=True, help="Delete nothing; say what would be deleted.")
@click.option(
    "--batch-size",
    type=click.IntRange(1, MAX_BATCH),
    default=MAX_BATCH,
    show_default=True,
    help="Keys per DeleteObjects request.",
)
@click.option("--json", "as_json", is_flag=True, help="The full report as JSON, for scripts.")
def run_cmd(config_path: str | None, days: int | None, dry_run: bool, batch_size: int, as_json: bool) -> None:
    """One sweep: delete what is past retention and not held; print a summary."""
    cfg = load_config(config_path)
    keep = days or cfg.retention.days
    if keep < cfg.retention.days and not dry_run:
        # How long evidence is kept is policy: it lives in the config, not in one command line.
        finish(
            EXIT_REFUSED,
            f"refused: --days {keep} is shorter than retention.days ({cfg.retention.days}); change "
            "retention.days to shorten retention (a --dry-run may use any --days)",
        )
    store = _store(cfg)

    async def go() -> SweepReport:
        try:
            return await _one_sweep(
                cfg, store, days=keep, dry_run=dry_run, batch_size=batch_size, show_progress=not as_json
            )
        finally:
            store.close()

    try:
        report = run_async(cfg, go)
    except LeaseLost as exc:
        finish(EXIT_FAILED, f"stopped: {exc}")
    except LeaseUnsupported as exc:
        finish(EXIT_REFUSED, f"refused: {exc}")
    if as_json:
        click.echo(json_for_terminal(report.as_dict(), indent=1))
    else:
        _summary(report, cfg)
    # Another node's sweep holding the lease is a refusal (3), not a failure: nothing to retry now.
    codes = {"completed": EXIT_OK, "busy": EXIT_REFUSED}
    raise SystemExit(codes.get(report.status, EXIT_FAILED))


async def _sleep_until(due: datetime) -> None:
    """Sleep until the wall clock reaches ``due``, in steps of at most a minute (so a clock step by
    NTP, or a suspended VM, does not make the daemon miss or double a sweep)."""
    wait = (due - datetime.now(UTC)).total_seconds()
    while wait > 0:
        await asyncio.sleep(min(wait, 60.0))
        wait = (due - datetime.now(UTC)).total_seconds()


@retention.command()
@config_option
@click.option("--run-now", is_flag=True, help="Sweep once at start, then daily.")
@click.option(
    "--batch-size",
    type=click.IntRange(1, MAX_BATCH),
    default=MAX_BATCH,
    show_default=True,
    help="Keys per DeleteObjects request.",
)
def daemon(config_path: str | None, run_now: bool, batch_size: int) -> None:
    """Sweep every day at retention.daily_at (general.timezone). Stops cleanly on SIGTERM/SIGINT."""
    cfg = load_config(config_path)
    tz = timezone_of(cfg)
    try:
        at = parse_daily_at(cfg.retention.daily_at)
    except ValueError as exc:
        finish(EXIT_CONFIG, f"configuration error: {exc}")
    store = _store(cfg)

    async def loop() -> None:
        task = asyncio.current_task()
        assert task is not None
        ev_loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            ev_loop.add_signal_handler(sig, task.cancel)
        due = datetime.now(UTC) if run_now else next_run(datetime.now(UTC), at, tz)
        notifier = Notifier()
        detach_metrics = RUNTIME.attach(RuntimeSources(retention=True))
        notifier.ready(f"next sweep at {due.isoformat(timespec='seconds')}")
        watchdog = asyncio.create_task(notifier.watchdog())
        try:
            while True:
                log.info("retention event=next_sweep at=%s", due.isoformat(timespec="seconds"))
                notifier.status(f"next sweep at {due.isoformat(timespec='seconds')}")
                await _sleep_until(due)
                scheduled = next_run(datetime.now(UTC), at, tz)
                try:
                    report = await _one_sweep(
                        cfg,
                        store,
                        days=cfg.retention.days,
                        dry_run=False,
                        batch_size=batch_size,
                        show_progress=False,
                    )
                    log.info(
                        "retention event=sweep_done status=%s purged=%d", report.status, len(report.purged)
                    )
                    due = scheduled
                except (StorageError, LeaseLost) as exc:
                    due = min(datetime.now(UTC) + RETRY_AFTER, scheduled)
                    log.error("retention event=sweep_failed error=%s retry_at=%s", exc, due.isoformat())
                except Exception:  # a bug, or a hostile object nobody foresaw: never the daemon's end
                    due = min(datetime.now(UTC) + RETRY_AFTER, scheduled)
                    log.exception("retention event=sweep_crashed retry_at=%s", due.isoformat())
        finally:
            notifier.stopping()
            watchdog.cancel()
            store.close()
            detach_metrics()

    with (
        metrics_endpoint(cfg, cfg.metrics.retention_port),
        contextlib.suppress(asyncio.CancelledError, KeyboardInterrupt),
    ):
        asyncio.run(loop())
    click.echo("retention daemon stopped", err=True)
    raise SystemExit(EXIT_OK)
