"""Fixtures for tests against the real local stack (``scripts/stack up``).

A server that is not running makes a test skip on a developer's machine, and FAIL when ``CI=true``: CI
must never pass by skipping the real thing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kasuhara_ari.config import Config, ConfigError, load

STACK_DIR = Path(os.environ.get("KASUHARA_STACK_DIR", "/var/cache/kasuhara"))
STACK_CONFIG = Path(os.environ.get("KASUHARA_TEST_CONFIG", STACK_DIR / "kasuhara.toml"))
IN_CI = os.environ.get("CI", "").lower() == "true"
REPO = Path(__file__).resolve().parent.parent
# `kasuhara storage init` creates the export signing key at ~/.config/kasuhara/ by default: tests (and the
# CLI processes they start, which inherit the environment) keep theirs in a scratch directory instead.
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="kasuhara-test-config-")


def skip_or_fail(message: str) -> None:
    """Skip locally, fail in CI: the one place that decides (every missing server or tool comes here)."""
    if IN_CI:
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


def missing(what: str) -> None:
    """A server of the local stack is not running."""
    skip_or_fail(f"{what} (start it with: scripts/stack up)")


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released): a server that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def stack_cfg() -> Config:
    if not STACK_CONFIG.exists():
        missing(f"the local stack's config {STACK_CONFIG} does not exist")
    try:
        return load(STACK_CONFIG, env={})
    except ConfigError as exc:
        pytest.fail(f"stack config is broken: {exc}")
        raise


@pytest.fixture(scope="session")
def asterisk(stack_cfg: Config) -> Config:
    import httpx

    try:
        resp = httpx.get(
            f"{stack_cfg.ari.url}/ari/asterisk/info",
            auth=(stack_cfg.ari.username, stack_cfg.ari.password),
            timeout=3,
        )
    except httpx.HTTPError as exc:
        missing(f"Asterisk (ARI at {stack_cfg.ari.url}) is not reachable: {exc}")
    if resp.status_code != 200:
        pytest.fail(f"ARI answered {resp.status_code}: credentials in {STACK_CONFIG} do not match")
    if not port_open(stack_cfg.ami.host, stack_cfg.ami.port):
        missing("AMI is not reachable")
    return stack_cfg


@pytest.fixture(scope="session")
def mqtt_broker(stack_cfg: Config) -> Config:
    if not port_open(stack_cfg.mqtt.host, stack_cfg.mqtt.port):
        missing(f"mosquitto at {stack_cfg.mqtt.host}:{stack_cfg.mqtt.port} is not reachable")
    return stack_cfg


@pytest.fixture(scope="session")
def s3_server(stack_cfg: Config) -> Config:
    host, _, port = stack_cfg.storage.endpoint.partition(":")
    if not port_open(host, int(port or 80)):
        missing(f"the S3 server at {stack_cfg.storage.endpoint} is not reachable")
    return stack_cfg


@pytest.fixture
def spool(asterisk: Config) -> Path:
    return asterisk.recording.host_dir


@pytest.fixture
def call_cfg(asterisk: Config) -> Config:
    """The stack's config with MQTT and S3 off (call-flow tests look at the spool) and a unique app."""
    return replace(
        asterisk,
        # Its own Stasis app: calls placed with this app name (X-Kasuhara-App) reach this test only.
        ari=replace(asterisk.ari, app=f"kasuhara-t{uuid.uuid4().hex[:10]}"),
        mqtt=replace(asterisk.mqtt, enabled=False),
        storage=replace(asterisk.storage, enabled=False),
    )


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
async def service_factory() -> AsyncIterator[Callable[[Config], Awaitable[Any]]]:
    """Starts the call service in this test's event loop (events kept in memory); stops it afterwards."""
    from kasuhara_ari.events import MemoryEvents
    from kasuhara_ari.service import Service

    started: list[tuple[Any, asyncio.Task[None]]] = []

    async def start(cfg: Config) -> Any:
        events = MemoryEvents()
        service = Service(cfg, events=events)
        task = asyncio.create_task(service.run())
        started.append((service, task))
        await asyncio.wait_for(service.app.connected.wait(), 10)
        await asyncio.sleep(0.2)  # let the resync after connecting finish before calls arrive
        service.memory_events = events
        return service

    yield start
    for _, task in started:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


@pytest.fixture
async def running_service(service_factory: Callable[[Config], Awaitable[Any]], call_cfg: Config) -> Any:
    return await service_factory(call_cfg)


@pytest.fixture
def sip_workdir(tmp_path: Path) -> Path:
    work = tmp_path / "sipp"
    work.mkdir()
    return work


# --- running in parallel (scripts/test: pytest -n 2 --dist loadgroup) -------------------------------------
#: Tests that share one server whose state a test may change as a whole run one after another on one
#: worker: the stack's Asterisk (a test stops it; SIP phones and the dialplan's fixed AGI port are shared)
#: and Ceph RGW (tests attach policies to its four role users). Everything else (unit tests, moto with a
#: bucket per test, mosquitto with a topic per test) spreads over the workers.
SERIAL_GROUPS = {"asterisk": "asterisk", "rgw": "rgw"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, group in SERIAL_GROUPS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(group))
                break


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print what tests recorded with ``record_property("report", text)`` (e.g. the per-role policy matrix
    on the enforcing S3 server): visible in every run's output, also from xdist workers, without ``-s``."""
    lines: list[str] = []
    for report in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get("failed", []):
        for name, value in getattr(report, "user_properties", ()):
            if name == "report" and report.when == "call":
                lines.append(f"{report.nodeid}:\n{value}")
    if lines:
        terminalreporter.section("reports from the tests")
        for text in lines:
            terminalreporter.write_line(text)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """Fail loudly if xdist did not apply the serial groups (it rewrites node ids to ``id@group``; a pytest
    it does not know keeps them unchanged, and the Asterisk tests would then run side by side)."""
    if not os.environ.get("PYTEST_XDIST_WORKER") or not session.config.getvalue("loadgroup"):
        return
    lost = [i.nodeid for i in session.items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
    if lost:
        raise pytest.UsageError(f"xdist_group not applied (pytest/pytest-xdist mismatch?): {lost[0]} ...")
