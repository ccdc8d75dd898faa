"""The suite's own rules, checked by running small pytest sessions with this project's conftest:
a CI run cannot pass by skipping, and a call service that crashed in the background fails its test.

Each inner session is a real ``pytest`` subprocess that loads ``tests/conftest.py`` as a plugin, with the
CI variable set as a CI service would set it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, in_ci

TESTS = REPO / "tests"


def run_inner(
    tmp_path: Path, source: str, *, ci: str | None, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run ``source`` as a test module in a fresh pytest with the project's conftest; ``ci`` is $CI."""
    (tmp_path / "test_inner.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "CI"))}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO)])
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "conftest",
            "-p",
            "no:cacheprovider",
            "-o",
            "asyncio_mode=auto",
            "-o",
            "asyncio_default_fixture_loop_scope=function",
            "-q",
            "-rA",
            *extra,
            "test_inner.py",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", True),
        ("1", True),
        ("yes", True),
        ("TRUE", True),
        ("woodpecker", True),
        ("false", False),
        ("False", False),
        ("", False),
        ("  ", False),
        (None, False),
    ],
)
def test_any_ci_value_but_false_is_ci(value: str | None, expected: bool) -> None:
    assert in_ci(value) is expected


MISSING_SERVER = """
from conftest import skip_or_fail

def test_needs_a_server():
    skip_or_fail("the server is not running")
"""


@pytest.mark.parametrize("ci", ["1", "true", "yes"])
def test_a_missing_server_fails_in_ci_whatever_ci_says(tmp_path: Path, ci: str) -> None:
    """Before: only ``CI=true`` counted; ``CI=1`` turned the failure back into a skip and exit 0."""
    result = run_inner(tmp_path, MISSING_SERVER, ci=ci)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 failed" in result.stdout, result.stdout
    assert f"CI={ci} and the server is not running" in result.stdout, result.stdout


@pytest.mark.parametrize("ci", [None, "false"])
def test_control_a_missing_server_skips_outside_ci(tmp_path: Path, ci: str | None) -> None:
    result = run_inner(tmp_path, MISSING_SERVER, ci=ci)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout, result.stdout


PLAIN_SKIP = """
import pytest

def test_runs():
    pass

def test_skipped_some_other_way():
    pytest.skip("not today")
"""


@pytest.mark.parametrize("workers", [(), ("-n", "2")], ids=["serial", "xdist"])
def test_a_ci_run_that_skipped_anything_fails(tmp_path: Path, workers: tuple[str, ...]) -> None:
    """Before: a test skipped by any other route (``pytest.skip``, a skip marker) passed a CI run. Also
    under xdist, where the workers' reports reach the controlling process."""
    result = run_inner(tmp_path, PLAIN_SKIP, ci="true", extra=workers)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 passed, 1 skipped" in result.stdout, result.stdout
    assert "1 test(s) skipped, the run fails (first: test_inner.py::test_skipped_some_other_way)" in (
        result.stdout
    )


def test_control_the_same_run_passes_outside_ci(tmp_path: Path) -> None:
    result = run_inner(tmp_path, PLAIN_SKIP, ci=None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 1 skipped" in result.stdout, result.stdout


SERVICE = """
import asyncio

import kasuhara_ari.service

CRASH = {crash}


class FakeApp:
    def __init__(self):
        self.connected = asyncio.Event()


class FakeService:
    '''Stands in for the call service: connects, then (CRASH) dies in the background mid-test.'''

    def __init__(self, cfg, events):
        self.cfg = cfg
        self.app = FakeApp()

    async def run(self):
        self.app.connected.set()
        await asyncio.sleep(0.05)
        if CRASH:
            raise RuntimeError("the service crashed in the background")
        await asyncio.Event().wait()


kasuhara_ari.service.Service = FakeService


async def test_a_call(service_factory):
    await service_factory(None)
    await asyncio.sleep(0.3)  # the crash happens here, while the test's "call" goes on
"""


def test_a_service_that_crashed_in_the_background_fails_its_test(tmp_path: Path) -> None:
    """Before: the fixture's teardown suppressed every exception of the service task: this passed."""
    result = run_inner(tmp_path, SERVICE.format(crash=True), ci=None)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 passed, 1 error" in result.stdout, result.stdout
    assert "the call service crashed during the test" in result.stdout, result.stdout
    assert "RuntimeError: the service crashed in the background" in result.stdout, result.stdout


def test_control_a_service_that_kept_running_passes(tmp_path: Path) -> None:
    result = run_inner(tmp_path, SERVICE.format(crash=False), ci=None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout and "error" not in result.stdout, result.stdout
