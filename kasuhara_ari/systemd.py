"""systemd's service protocol without a dependency: readiness, status, stopping and the watchdog.

``Type=notify`` units learn that a service is up from ``READY=1`` on ``$NOTIFY_SOCKET``; sent only once
the service can really do its job (``serve``: the Stasis app registered with Asterisk, AMI logged in, the
spool writable), so ``systemctl start`` and units ordered ``After=`` it wait for that. ``WatchdogSec=``
makes systemd restart a service that stops sending ``WATCHDOG=1``: the pings come from a task on the
event loop, so a loop blocked by a bug (a sync call that hangs) stops them and gets the process
restarted, where a thread pinging on its own would keep a dead service "alive".

Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping

log = logging.getLogger(__name__)


class Notifier:
    """The sd_notify datagram socket of this process (None outside systemd)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        # "@name" is an abstract socket (a leading NUL byte); anything else is a filesystem path.
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.watchdog_s = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=value`` lines; False when not under systemd or the socket refuses (never raises:
        a notification must not stop the service it describes)."""
        if not self.address:
            return False
        message = "\n".join(field.replace("\n", " ") for field in fields).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self.address)
        except OSError as exc:
            log.warning("systemd event=notify_failed error=%s", exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        log.info("systemd event=ready status=%s", status)
        return self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=stopping")

    async def watchdog(self) -> None:
        """Ping at half the interval systemd asked for, forever (a no-op without ``WatchdogSec``)."""
        if self.watchdog_s is None or not self.address:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_s / 2)


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """``WATCHDOG_USEC`` in seconds when it is meant for this process (``WATCHDOG_PID``, when set, must
    be ours: a child that inherited the variables must not ping for its parent)."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000


async def announce_ready(
    notifier: Notifier,
    checks: Mapping[str, Callable[[], Awaitable[bool]]],
    *,
    poll_s: float = 0.2,
) -> None:
    """Wait until every check passes, then ``READY=1``; meanwhile ``STATUS=`` names what is awaited (what
    ``systemctl status`` shows while a start hangs), then keep the watchdog fed."""
    waiting_for = ""
    while True:
        pending = [name for name, check in checks.items() if not await check()]
        if not pending:
            break
        now = ", ".join(pending)
        if now != waiting_for:
            waiting_for = now
            notifier.status(f"waiting for {now}")
        await asyncio.sleep(poll_s)
    notifier.ready("running: " + ", ".join(checks) + " ready")
    await notifier.watchdog()
