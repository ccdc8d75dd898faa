"""``kasuhara``: the command line (serve, doctor, storage, recordings, retention, audit, monitor, agi)."""

from __future__ import annotations

import importlib
import logging
import sys

import click

from ..safe import SafeLogFormatter
from .common import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_REFUSED

__all__ = ["EXIT_CONFIG", "EXIT_FAILED", "EXIT_OK", "EXIT_REFUSED", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="kasuhara-ari")
def main() -> None:
    """Harassment protection for Asterisk call centres: notice, recording, escalation, evidence.

    Exit codes: 0 done, 1 failed, 2 bad usage or configuration, 3 refused (permission, hold).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeLogFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    # One line per HTTP request would drown the call log (and ARI URLs carry query strings).
    for noisy in ("httpx", "httpcore", "websockets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
):
    try:
        _mod = importlib.import_module(f"{__name__}.{_module}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"{__name__}.{_module}":
            raise
        continue
    main.add_command(getattr(_mod, _attr))
