"""The systemd units shipped in the package, and the service protocol behind them (readiness, watchdog).

Units: `systemd-analyze verify` and `systemd-analyze security --offline` (the exposure score of each unit
is printed in the run's summary). Protocol: a real datagram socket stands in for systemd's
``$NOTIFY_SOCKET``; `kasuhara serve` under it says READY=1 only once the Stasis app is registered and AMI
is logged in, pings the watchdog, and says STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kasuhara_ari.config import Config
from kasuhara_ari.systemd import Notifier, announce_ready

from conftest import REPO, STACK_CONFIG, closed_port, skip_or_fail

UNITS = REPO / "kasuhara_ari" / "data" / "systemd"
SERVICES = ("serve", "agi", "web", "retention")
#: `systemd-analyze security`: 0 is perfect, 10 is unsafe; "OK" is below 2.0 (below 4.0: "MEDIUM").
MAX_EXPOSURE = 2.0


def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        skip_or_fail("systemd-analyze is not installed (scripts/bootstrap installs the systemd package)")
    assert tool is not None
    return tool


def installed_units(tmp_path: Path) -> list[Path]:
    """The units as an operator installs them: ExecStart pointing at a real kasuhara (verify checks it)."""
    kasuhara = Path(sys.executable).parent / "kasuhara"
    units = []
    for name in SERVICES:
        text = (UNITS / f"kasuhara-{name}.service").read_text()
        target = tmp_path / f"kasuhara-{name}.service"
        target.write_text(text.replace("/opt/kasuhara/bin/kasuhara", str(kasuhara)))
        units.append(target)
    return units


def unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_every_service_has_a_unit_with_readiness_watchdog_restart_and_hardening() -> None:
    for name in SERVICES:
        s = unit_settings(UNITS / f"kasuhara-{name}.service")
        assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"], name
        assert s["Restart"] == ["on-failure"] and int(s["WatchdogSec"][0]) > 0, name
        assert s["ExecStart"][0].endswith(f"kasuhara {'retention daemon' if name == 'retention' else name}")
        for key, value in {
            "ProtectSystem": "strict",
            "NoNewPrivileges": "yes",
            "PrivateTmp": "yes",
            "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
            "CapabilityBoundingSet": "",
        }.items():
            assert s.get(key) == [value], (name, key, s.get(key))
        assert s["User"][0] not in ("root", ""), name
    serve = unit_settings(UNITS / "kasuhara-serve.service")
    assert serve["ReadWritePaths"] == ["/var/spool/asterisk/monitor/kasuhara"]


def test_units_pass_systemd_analyze_verify_and_security(
    tmp_path: Path, record_property: pytest.RecordProperty
) -> None:
    tool = analyze()
    units = installed_units(tmp_path)
    verify = subprocess.run(
        [tool, "verify", *map(str, units)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    # verify prints warnings for what it finds questionable and still exits 0: any line about our units fails.
    ours = [line for line in (verify.stdout + verify.stderr).splitlines() if "kasuhara-" in line]
    assert verify.returncode == 0 and not ours, verify.stdout + verify.stderr
    scores = []
    for unit in units:
        done = subprocess.run(
            [tool, "security", "--offline=yes", str(unit)], capture_output=True, text=True, timeout=120
        )
        found = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", done.stdout + done.stderr)
        assert found, done.stdout[-2000:] + done.stderr[-2000:]
        scores.append((unit.name, float(found.group(1)), found.group(2)))
    record_property(
        "report",
        "systemd-analyze security --offline (0 best, 10 worst):\n"
        + "\n".join(f"  {name:<28} {score:4.1f} {label}" for name, score, label in scores),
    )
    assert all(score <= MAX_EXPOSURE for _, score, _ in scores), scores


# --------------------------------------------------------------------------------- the protocol, in-process


class FakeSystemd:
    """A datagram socket where systemd would listen; records each message with its arrival time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def with_key(self, key: str) -> list[tuple[float, dict[str, str]]]:
        return [(t, m) for t, m in self.messages if key in m]

    def wait_for(self, key: str, value: str | None = None, timeout: float = 60.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _, m in self.messages:
                if key in m and (value is None or value in m[key]):
                    return m
            time.sleep(0.05)
        raise AssertionError(f"no {key}={value or '*'} from the service; got {self.messages}")


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(tmp_path / "notify")
    try:
        yield fake
    finally:
        fake.close()


def test_no_notify_socket_means_no_notifications() -> None:
    notifier = Notifier({})
    assert not notifier.enabled and notifier.watchdog_s is None
    assert notifier.ready("x") is False


def test_watchdog_is_for_the_process_systemd_named(systemd: FakeSystemd) -> None:
    env = {"NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "2000000"}
    assert Notifier(env).watchdog_s == 2.0
    assert Notifier({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_s == 2.0
    # Inherited from a parent: not ours to feed.
    assert Notifier({**env, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_s is None
    assert Notifier({**env, "WATCHDOG_USEC": "0"}).watchdog_s is None


async def test_ready_waits_for_every_check_and_says_what_it_waits_for(systemd: FakeSystemd) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(systemd.path)})
    ami_up = asyncio.Event()

    async def ari() -> bool:
        return True

    async def ami() -> bool:
        return ami_up.is_set()

    task = asyncio.create_task(announce_ready(notifier, {"ari": ari, "ami": ami}, poll_s=0.01))
    while not systemd.with_key("STATUS"):
        await asyncio.sleep(0.01)
    assert systemd.messages[0][1]["STATUS"] == "waiting for ami"
    assert not systemd.with_key("READY")
    ami_up.set()
    await asyncio.wait_for(task, 10)  # no watchdog asked for: returns after READY
    # The datagram is sent; the fake's reader thread takes it when it gets to run.
    ready = await asyncio.to_thread(systemd.wait_for, "READY", None, 10.0)
    assert ready["READY"] == "1"


async def test_a_blocked_event_loop_stops_the_watchdog_pings(systemd: FakeSystemd) -> None:
    """The pings come from the loop: while it is blocked (a sync call that hangs), none goes out, so
    systemd restarts the service instead of keeping a dead one 'alive'."""
    notifier = Notifier({"NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "100000"})
    task = asyncio.create_task(notifier.watchdog())
    try:
        while len(systemd.with_key("WATCHDOG")) < 3:
            await asyncio.sleep(0.01)
        blocked_from = time.monotonic()
        time.sleep(1.0)  # the bug: the loop does not run for 1 s, 10 intervals of 0.1 s
        blocked_to = time.monotonic()
        while not [t for t, _ in systemd.with_key("WATCHDOG") if t > blocked_to]:
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
    during = [t for t, _ in systemd.with_key("WATCHDOG") if blocked_from + 0.1 < t < blocked_to]
    assert during == [], "pings went out while the loop was blocked"


# ----------------------------------------------------------------------- kasuhara serve under "systemd"


async def _app_registered(cfg: Config, app: str) -> bool:
    async with httpx.AsyncClient(auth=(cfg.ari.username, cfg.ari.password), timeout=3) as http:
        return (await http.get(f"{cfg.ari.url}/ari/applications/{app}")).status_code == 200


async def test_serve_is_ready_only_with_ari_and_ami_and_stops_cleanly(
    asterisk: Config, systemd: FakeSystemd, tmp_path: Path
) -> None:
    app = f"kasuhara-sd{uuid.uuid4().hex[:8]}"
    base = {
        **{k: v for k, v in os.environ.items() if not (k.startswith("KASUHARA_") and "__" in k)},
        "KASUHARA_CONFIG": str(STACK_CONFIG),
        "KASUHARA_ARI__APP": app,
        "KASUHARA_STORAGE__ENABLED": "false",
        "KASUHARA_MQTT__ENABLED": "false",
        "NOTIFY_SOCKET": str(systemd.path),
        "WATCHDOG_USEC": "1000000",
    }
    # AMI unreachable: ARI and the spool are fine, and READY must not come.
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kasuhara_ari.cli", "serve"],
        env={**base, "KASUHARA_AMI__PORT": str(closed_port())},
        cwd=REPO,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        await asyncio.to_thread(systemd.wait_for, "STATUS", "waiting for ami")
        assert await _app_registered(asterisk, app)  # only AMI is missing now
        status = [m["STATUS"] for _, m in systemd.with_key("STATUS")]
        assert status[-1] == "waiting for ami", status
        assert not systemd.with_key("READY") and not systemd.with_key("WATCHDOG")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-2000:]
    systemd.messages.clear()

    proc = subprocess.Popen(
        [sys.executable, "-m", "kasuhara_ari.cli", "serve"],
        env=base,
        cwd=REPO,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        ready = await asyncio.to_thread(systemd.wait_for, "READY")
        assert ready["READY"] == "1" and "ari, ami, spool ready" in ready["STATUS"]
        assert await _app_registered(asterisk, app)
        await asyncio.to_thread(systemd.wait_for, "WATCHDOG")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0, log.read_text()[-2000:]
    assert systemd.with_key("STOPPING"), systemd.messages
