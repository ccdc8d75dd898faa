"""``kasuhara web`` as the operator runs it: a subprocess on its own port, ready once ``/healthz`` answers,
stopped with SIGTERM; a traceback in its log fails the test that used it."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping

import httpx
import pytest

from conftest import REPO
from recordings_seed import cli_command


@contextlib.contextmanager
def console_process(env: Mapping[str, str]) -> Iterator[str]:
    """The console's base URL (``KASUHARA_WEB__PORT`` of ``env``) while it runs."""
    proc = subprocess.Popen(
        cli_command("web"), env=dict(env), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{env['KASUHARA_WEB__PORT']}"
    try:
        with httpx.Client(base_url=url, timeout=5) as client:
            for _ in range(300):
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/healthz").status_code == 200:
                        break
                assert proc.poll() is None, proc.communicate()[1]
                time.sleep(0.1)
            else:
                pytest.fail("kasuhara web did not answer")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        assert "Traceback" not in stderr, stderr
