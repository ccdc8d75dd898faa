"""``kasuhara asterisk install|uninstall``: the Asterisk side as drop-in files (see asterisk_setup)."""

from __future__ import annotations

from pathlib import Path

import click

from ..asterisk_setup import Installer, Plan, SetupError, SetupRefused, apply, diff, summary
from .common import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_REFUSED, config_option, load_config

RELOAD_HINT = (
    "now reload Asterisk: asterisk -rx 'module reload res_ari.so' -rx 'module reload manager' "
    "-rx 'dialplan reload' (the HTTP server needs 'module reload http' or a restart if it was off)"
)

dest_option = click.option(
    "--dest",
    type=click.Path(path_type=Path),
    default=Path("/etc/asterisk"),
    show_default=True,
    help="Asterisk's configuration directory.",
)
sounds_option = click.option(
    "--sounds",
    "sounds_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Asterisk's sounds directory (default: astdatadir/sounds from asterisk.conf, else "
    "/usr/share/asterisk/sounds).",
)
dry_run_option = click.option("--dry-run", is_flag=True, help="Show the diff; change nothing.")


@click.group()
def asterisk() -> None:
    """Put kasuhara-ari's Asterisk configuration and prompts in place, or take them out again."""


def _run(plan_of: str, config_path: str | None, dest: Path, sounds_dir: Path | None, dry_run: bool) -> None:
    cfg = load_config(config_path)
    try:
        installer = Installer(cfg, dest, sounds_dir)
        plan: Plan = getattr(installer, plan_of)()
    except SetupError as exc:
        click.echo(f"kasuhara asterisk: {exc}", err=True)
        raise SystemExit(EXIT_CONFIG) from None
    except SetupRefused as exc:
        click.echo(f"kasuhara asterisk: refused, nothing changed: {exc}", err=True)
        raise SystemExit(EXIT_REFUSED) from None
    for note in plan.notes:
        click.echo(f"note: {note}", err=True)
    lines = list(summary(plan))
    if dry_run:
        click.echo(diff(plan), nl=False)
        click.echo(f"dry run: {len([x for x in lines if not x.startswith('kept')])} file(s) would change")
        raise SystemExit(EXIT_OK)
    try:
        done = apply(plan)
    except OSError as exc:
        click.echo(f"kasuhara asterisk: failed: {exc}", err=True)
        raise SystemExit(EXIT_FAILED) from None
    for line in done + [x for x in lines if x.startswith("kept")]:
        click.echo(line)
    if not done:
        click.echo("nothing to change")
    elif plan_of == "plan_install":
        click.echo(RELOAD_HINT, err=True)
    raise SystemExit(EXIT_OK)


@asterisk.command()
@dest_option
@sounds_option
@dry_run_option
@config_option
def install(dest: Path, sounds_dir: Path | None, dry_run: bool, config_path: str | None) -> None:
    """Write the ARI user, the AMI user (read=call,system write=system,call), the HTTP server ARI needs,
    the dialplan contexts kasuhara-inbound/-outbound and the prompts, as drop-ins.

    Never rewrites your files: each main file gets one marked #tryinclude block; files you already have
    (a user of the same name, your own prompts) are refused or kept. Run again after changing the config.
    Exit codes: 0 done, 2 bad usage, 3 refused (a conflict with your configuration; nothing written).
    """
    _run("plan_install", config_path, dest, sounds_dir, dry_run)


@asterisk.command()
@dest_option
@sounds_option
@dry_run_option
@config_option
def uninstall(dest: Path, sounds_dir: Path | None, dry_run: bool, config_path: str | None) -> None:
    """Remove what install wrote: main files return to their bytes before install; a drop-in or prompt
    edited since is kept (and named)."""
    _run("plan_uninstall", config_path, dest, sounds_dir, dry_run)
