"""A Kamailio SIP proxy for a test, in front of AsteriskNodes (as AsteriskNode runs an Asterisk).

It runs the repository's ``asterisk_conf/kamailio/kamailio.cfg`` unchanged; what differs per test (its
port, the nodes' ports, timers) goes into ``kamailio-local.cfg`` and ``dispatcher.list`` beside a copy of
it in a directory of its own. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from conftest import REPO, skip_or_fail

TEMPLATE = REPO / "asterisk_conf" / "kamailio" / "kamailio.cfg"
KAMAILIO = shutil.which("kamailio") or "/usr/sbin/kamailio"


@dataclass
class KamailioProxy:
    """One Kamailio: ``nodes`` are ``(name, sip_port)`` of the Asterisk nodes it dispatches to."""

    home: Path
    port: int
    nodes: list[tuple[str, int]]
    algorithm: int = 4  # round robin: a test of "both nodes get calls" is then deterministic
    fr_timer_ms: int = 3000
    ping_s: int = 2
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.home / "kamailio.log"

    def render(self) -> None:
        """The shipped configuration plus this test's values."""
        if not Path(KAMAILIO).exists():
            skip_or_fail("kamailio is not installed (scripts/bootstrap installs Debian's kamailio)")
        self.home.mkdir(parents=True, exist_ok=True)
        shutil.copy(TEMPLATE, self.home / "kamailio.cfg")
        (self.home / "kamailio-local.cfg").write_text(
            f"#!define LISTEN udp:127.0.0.1:{self.port}\n"
            f'#!define DS_LIST "{self.home}/dispatcher.list"\n'
            f"#!define DS_ALG {self.algorithm}\n"
            f"#!define FR_TIMER {self.fr_timer_ms}\n"
            f"#!define DS_PING_S {self.ping_s}\n"
            f'#!define CTL_SOCKET "unix:{self.home}/ctl"\n'
        )
        (self.home / "dispatcher.list").write_text(
            "".join(f"1 sip:127.0.0.1:{port} 0 0 duid={name}\n" for name, port in self.nodes)
        )

    def start(self, timeout: float = 30) -> None:
        self.render()
        self.proc = subprocess.Popen(
            [
                KAMAILIO,
                "-f",
                str(self.home / "kamailio.cfg"),
                "-DD",  # foreground, its children forked
                "-E",
                "-Y",
                str(self.home),
                "-m",
                "32",
                "-M",
                "8",
            ],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"kamailio did not start: {self.log_tail()}")
            time.sleep(0.2)

    def answers(self) -> bool:
        """Whether the proxy answers an OPTIONS to itself (its keepalive)."""
        return self.request("OPTIONS", f"sip:{self.address}", "")[0] == 200

    def request(
        self, method: str, uri: str, extra: str, *, to: str = "", timeout: float = 1.0
    ) -> tuple[int, str]:
        """Send one out-of-dialog request from a fresh socket; the final status and reply (0 on none)."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(timeout)
            lport = sock.getsockname()[1]
            tag = uuid.uuid4().hex[:8]
            msg = (
                f"{method} {uri} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{lport};branch=z9hG4bK{uuid.uuid4().hex}\r\n"
                "Max-Forwards: 70\r\n"
                f"From: <sip:test@127.0.0.1>;tag={tag}\r\n"
                f"To: <{to or uri}>\r\n"
                f"Call-ID: {uuid.uuid4().hex}@127.0.0.1\r\n"
                f"CSeq: 1 {method}\r\n"
                f"{extra}"
                "Content-Length: 0\r\n\r\n"
            )
            sock.sendto(msg.encode(), ("127.0.0.1", self.port))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    data = sock.recv(65535).decode(errors="replace")
                except OSError:
                    return 0, ""
                status = int(data.split(" ", 2)[1]) if data.startswith("SIP/2.0 ") else 0
                if status >= 200:
                    return status, data
            return 0, ""

    def register(self, user: str, contact_port: int, expires: int = 600) -> None:
        """REGISTER ``user`` at the proxy with a Contact on ``contact_port`` (where its SIPp phone listens),
        as a supervisor's phone does."""
        status, reply = self.request(
            "REGISTER",
            f"sip:{self.address}",
            f"Contact: <sip:{user}@127.0.0.1:{contact_port}>\r\nExpires: {expires}\r\n",
            to=f"sip:{user}@127.0.0.1",  # the AOR being registered
        )
        assert status == 200, f"REGISTER {user}: {status} {reply[:300]} {self.log_tail()}"

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
