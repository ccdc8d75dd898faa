"""``kasuhara``: the command line (serve, doctor, storage, recordings, retention, audit, monitor, agi)."""

from __future__ import annotations

import importlib

import click

from .common import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_REFUSED, setup_logging

__all__ = ["EXIT_CONFIG", "EXIT_FAILED", "EXIT_OK", "EXIT_REFUSED", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="kasuhara-ari")
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="Log more on stderr: -v INFO, -vv DEBUG (beats $KASUHARA_LOG_LEVEL and general.log_level). "
    "Without it, admin commands log warnings and errors only; serve, agi and retention daemon log at "
    "general.log_level.",
)
def main(verbose: int) -> None:
    """Harassment protection for Asterisk call centres: notice, recording, escalation, evidence.

    Exit codes: 0 done, 1 failed, 2 bad usage or configuration, 3 refused (permission, hold).
    """
    setup_logging(verbose)


# Each command group lives in its own module; a module that is not there yet is simply not offered.
for _module, _attr in (
    ("serve", "serve"),
    ("doctor", "doctor"),
    ("storage", "storage"),
    ("monitor", "monitor"),
    ("recordings", "recordings"),
    ("retention", "retention"),
    ("audit", "audit"),
    ("export", "export"),
    ("agi", "agi"),
    ("callers", "callers"),
    ("supervise", "supervise"),
    ("users", "users"),
    ("web", "web"),
    ("asterisk", "asterisk"),
    ("care", "care"),
    ("training", "training"),
):
    try:
        _mod = importlib.import_module(f"{__name__}.{_module}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"{__name__}.{_module}":
            raise
        continue
    main.add_command(getattr(_mod, _attr))
