"""Fixtures for tests against the real local stack (``scripts/stack up``).

A server that is not running makes a test skip on a developer's machine, and FAIL in CI (``CI`` set to
anything but ``false``): CI must never pass by skipping the real thing, and a CI run that skipped any test
fails as a whole (``pytest_sessionfinish``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import socket
import tempfile
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kasuhara_ari.config import Config, ConfigError, load

STACK_DIR = Path(os.environ.get("KASUHARA_STACK_DIR", "/var/cache/kasuhara"))
STACK_CONFIG = Path(os.environ.get("KASUHARA_TEST_CONFIG", STACK_DIR / "kasuhara.toml"))


def in_ci(value: str | None) -> bool:
    """CI services set ``CI`` to ``true``, ``1``, ``yes``...: any non-empty value but ``false`` is CI."""
    return bool(value and value.strip() and value.strip().lower() != "false")


IN_CI = in_ci(os.environ.get("CI"))
REPO = Path(__file__).resolve().parent.parent
#: What the call-flow tests play as the recording notice: a 0.5 s beep (asterisk_conf/sounds/prompts.toml
#: ``test-notice``) instead of the ~5.5 s notice every call would otherwise wait for. Its file, for
#: recordings to be compared with.
TEST_NOTICE_SOUND = "kasuhara/test-notice"
TEST_NOTICE_WAV = REPO / "asterisk_conf/sounds/ja/kasuhara/test-notice.wav"
# `kasuhara storage init` creates the export signing key at ~/.config/kasuhara/ by default: tests (and the
# CLI processes they start, which inherit the environment) keep theirs in a scratch directory instead.
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="kasuhara-test-config-")


def skip_or_fail(message: str) -> None:
    """Skip locally, fail in CI: the one place that decides (every missing server or tool comes here)."""
    if IN_CI:
        pytest.fail(f"CI={os.environ.get('CI')} and {message}", pytrace=False)
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
    """The stack's Asterisk, checked once per worker. The check holds the shared Asterisk lock: a session
    fixture is set up before the test's lock fixture, and without it a worker whose first Asterisk test
    started while an ``asterisk_alone`` test had Asterisk stopped (test_asterisk_down) found it down, and
    the cached failure errored every later Asterisk test of that worker (two CI runs: 47 and 54 errors)."""
    return asterisk_checked(stack_cfg)


def asterisk_checked(stack_cfg: Config) -> Config:
    """The check of the ``asterisk`` fixture, under the shared Asterisk lock (tests/test_suite_lock.py)."""
    with asterisk_lock(alone=False):
        return _checked_asterisk(stack_cfg)


def _checked_asterisk(stack_cfg: Config) -> Config:
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
    sound = httpx.get(
        f"{stack_cfg.ari.url}/ari/sounds/{TEST_NOTICE_SOUND.replace('/', '%2F')}",
        auth=(stack_cfg.ari.username, stack_cfg.ari.password),
        timeout=3,
    )
    languages = (
        {f["language"] for f in sound.json().get("formats", ())} if sound.status_code == 200 else set()
    )
    if stack_cfg.announcement.language not in languages:
        # Without it every call-flow test would fail in a confusing way (a notice that never plays).
        pytest.fail(
            f"Asterisk has no sound {TEST_NOTICE_SOUND} in {stack_cfg.announcement.language!r} "
            "(installed from asterisk_conf/sounds by: scripts/stack up)",
            pytrace=False,
        )
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
def test_spool(asterisk: Config) -> Iterator[tuple[str, Path]]:
    """This test's own spool directory (as Asterisk sees it, as this host reads it), removed afterwards.

    Tests run side by side and beside other runs on the same stack: in one shared directory, another
    test's completion watcher would mark this test's recordings and another test's cleanup could delete
    them while this test still waits for them.
    """
    name = f"t-{uuid.uuid4().hex[:12]}"
    host = asterisk.recording.host_dir / name
    host.mkdir(mode=0o777)
    host.chmod(0o777)  # Asterisk writes here (the mode of mkdir is masked by the umask)
    try:
        yield f"{asterisk.recording.asterisk_dir}/{name}", host
    finally:
        shutil.rmtree(host, ignore_errors=True)


@pytest.fixture
def spool(test_spool: tuple[str, Path]) -> Path:
    """Where this test's calls are recorded (``call_cfg``'s spool): a directory of its own."""
    return test_spool[1]


def with_test_notice(cfg: Config) -> Config:
    """``cfg`` whose calls play the 0.5 s test notice instead of the ~5.5 s real one."""
    return replace(cfg, announcement=replace(cfg.announcement, sound=TEST_NOTICE_SOUND))


def with_real_notice(cfg: Config, stack: Config) -> Config:
    """``cfg`` whose calls play the stack's real notice: for the tests of the notice itself."""
    return replace(cfg, announcement=replace(cfg.announcement, sound=stack.announcement.sound))


@pytest.fixture
def call_cfg(asterisk: Config, test_spool: tuple[str, Path]) -> Config:
    """The stack's config with MQTT and S3 off (call-flow tests look at the spool), a unique app, its own
    spool directory (``spool``), and the short test notice (``TEST_NOTICE_SOUND``; a test of the notice
    itself uses ``with_real_notice``)."""
    asterisk_dir, host_dir = test_spool
    return with_test_notice(
        replace(
            asterisk,
            # Its own Stasis app: calls placed with this app name (X-Kasuhara-App) reach this test only.
            ari=replace(asterisk.ari, app=f"kasuhara-t{uuid.uuid4().hex[:10]}"),
            recording=replace(asterisk.recording, asterisk_dir=asterisk_dir, local_dir=str(host_dir)),
            mqtt=replace(asterisk.mqtt, enabled=False),
            storage=replace(asterisk.storage, enabled=False),
            # No recovery pauses (AstDB entries, device states, agent_cooldown_* events after ``ended``)
            # unless the test is about them (tests/test_care_cooldown_sip.py switches them on).
            care=replace(asterisk.care, cooldown=False),
        )
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

    async def start(cfg: Config, **kwargs: Any) -> Any:
        """``kwargs`` go to ``Service`` as they are (e.g. ``on_metadata``)."""
        events = MemoryEvents()
        service = Service(cfg, events=events, **kwargs)
        task = asyncio.create_task(service.run())
        started.append((service, task))
        await asyncio.wait_for(service.app.connected.wait(), 10)
        await resynced()
        service.memory_events = events
        return service

    yield start
    crashed: list[str] = []
    for _, task in started:
        crash = await stop_service_task(task)
        if crash is not None:
            crashed.append(crash)
    if crashed:
        pytest.fail("the call service crashed during the test:\n" + "\n".join(crashed), pytrace=False)


async def resynced(timeout: float = 10) -> None:
    """Wait until the app's resync after connecting (its task "resync", spawned with ``connected``) is
    over: a call arriving during it could be taken for a channel left over from an earlier run."""
    deadline = time.monotonic() + timeout
    while any(t.get_name() == "resync" and not t.done() for t in asyncio.all_tasks()):
        assert time.monotonic() < deadline, f"the resync after connecting took over {timeout}s"
        await asyncio.sleep(0.01)


async def stop_service_task(task: asyncio.Task[Any]) -> str | None:
    """Stop a service task; say how it crashed if it did (before or on the way out), None if it did not.

    Only the cancellation we ask for is expected: a service that died in the background must fail the test
    that ran it, not vanish in the teardown.
    """
    task.cancel()  # no effect on a task that already ended: awaiting it then raises how it ended
    try:
        await task
    except asyncio.CancelledError:
        return None
    except BaseException as exc:  # any other way out is the crash to report
        return "".join(traceback.format_exception(exc)).rstrip()
    return None


@pytest.fixture
async def running_service(service_factory: Callable[[Config], Awaitable[Any]], call_cfg: Config) -> Any:
    return await service_factory(call_cfg)


@pytest.fixture
def sip_workdir(tmp_path: Path) -> Path:
    work = tmp_path / "sipp"
    work.mkdir()
    return work


# --- running in parallel (scripts/test: pytest -n 4 --dist loadgroup) -------------------------------------
#: Tests that share one server whose state a test changes as a whole run one after another on one worker:
#: Ceph RGW (tests attach policies to its four role users). Everything else (unit tests, moto with a bucket
#: per test, mosquitto with a topic per test) spreads over the workers.
SERIAL_GROUPS = {"rgw": "rgw"}
#: The stack's Asterisk is shared the same way as a database: call-flow tests use it side by side (each has
#: its own Stasis app, its own SIP and RTP ports from its worker's slice: sip.worker_slice), under a shared
#: lock; a test marked ``asterisk_alone`` (it stops Asterisk, loads it for a benchmark...) takes the lock
#: exclusively, so no other test's call is in Asterisk meanwhile. The lock is a file lock on this host, so
#: it also holds between separate pytest runs against the same stack.
ASTERISK_ALONE = "asterisk_alone"
ASTERISK_LOCK = Path(tempfile.gettempdir()) / "kasuhara-tests-asterisk.lock"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{ASTERISK_ALONE}: needs the stack's Asterisk to itself (no other test's call at the same time)",
    )


@contextlib.contextmanager
def asterisk_lock(*, alone: bool) -> Iterator[None]:
    """Share Asterisk with other tests, or have it alone; writers first (a turnstile), so an ``alone``
    test waits only for the calls in progress, not for every test that starts after it asked."""
    with open(f"{ASTERISK_LOCK}.gate", "a") as gate, open(ASTERISK_LOCK, "a") as lock:
        if alone:
            fcntl.flock(gate, fcntl.LOCK_EX)  # new sharers wait from now on
            fcntl.flock(lock, fcntl.LOCK_EX)  # the ones in progress finish
            fcntl.flock(gate, fcntl.LOCK_UN)
        else:
            fcntl.flock(gate, fcntl.LOCK_SH)
            fcntl.flock(lock, fcntl.LOCK_SH)
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(autouse=True)
def _asterisk_share(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test that uses the stack's Asterisk holds the lock for its whole run, teardown included
    (autouse: set up before, torn down after the test's other function fixtures)."""
    if "asterisk" not in request.fixturenames:
        yield
        return
    with asterisk_lock(alone=request.node.get_closest_marker(ASTERISK_ALONE) is not None):
        yield


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue  # the test module named its own group (e.g. a fixed port its tests share)
        if item.get_closest_marker(ASTERISK_ALONE):
            item.add_marker(pytest.mark.xdist_group("asterisk-alone"))
            continue
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


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI a run that skipped any test fails: a skip there means something was not checked.

    Only the process that reports (not an xdist worker) decides; its terminal reporter has every report.
    """
    if not IN_CI or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    skipped = reporter.stats.get("skipped", [])
    if skipped and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter.write_line(
            f"CI={os.environ.get('CI')}: {len(skipped)} test(s) skipped, the run fails "
            f"(first: {skipped[0].nodeid})",
            red=True,
        )


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """Fail loudly if xdist did not apply the serial groups (it rewrites node ids to ``id@group``; a pytest
    it does not know keeps them unchanged, and the FastAGI or RGW tests would then run side by side)."""
    if not os.environ.get("PYTEST_XDIST_WORKER") or not session.config.getvalue("loadgroup"):
        return
    lost = [i.nodeid for i in session.items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
    if lost:
        raise pytest.UsageError(f"xdist_group not applied (pytest/pytest-xdist mismatch?): {lost[0]} ...")
