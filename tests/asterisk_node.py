"""A second Asterisk from the stack's chroot, with a configuration tree of its own (an operator's node).

It shares the chroot's binaries, modules and stock files (``/etc/asterisk.dist``: Debian's own config) but
nothing that runs: its directories live under ``/var/tmp/<name>`` in the chroot, and its SIP, RTP, HTTP
and AMI ports are the caller's. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import REPO, STACK_DIR

ROOT = Path(os.environ.get("KASUHARA_ASTERISK_ROOT", STACK_DIR / "asterisk-sid"))
STOCK = ROOT / "etc" / "asterisk.dist"
DATA = ROOT / "usr" / "share" / "asterisk"
MODULES = "/usr/lib/x86_64-linux-gnu/asterisk/modules"


@dataclass
class AsteriskNode:
    name: str
    sip_port: int
    http_port: int
    ami_port: int
    rtp_start: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def inside(self) -> str:
        """Its directory as Asterisk sees it (in the chroot)."""
        return f"/var/tmp/{self.name}"

    @property
    def home(self) -> Path:
        return ROOT / self.inside.lstrip("/")

    @property
    def etc(self) -> Path:
        return self.home / "etc"

    @property
    def sounds(self) -> Path:
        return self.home / "data" / "sounds"

    @property
    def spool(self) -> Path:
        return self.home / "spool" / "monitor" / "kasuhara"

    def operator_tree(self) -> None:
        """Debian's stock configuration, with what an operator of this node sets by hand: where its files
        are, its modules, its SIP endpoints and its ports (nothing of kasuhara-ari's)."""
        shutil.rmtree(self.home, ignore_errors=True)
        shutil.copytree(STOCK, self.etc, symlinks=True)
        (self.home / "data").mkdir()
        for entry in DATA.iterdir():  # ARI's rest-api docs, static-http, ...: the chroot's own
            if entry.name != "sounds":
                (self.home / "data" / entry.name).symlink_to(f"/usr/share/asterisk/{entry.name}")
        self.sounds.mkdir()
        for sub in ("lib", "spool", "run", "log", "cache"):
            (self.home / sub).mkdir()
        self.spool.mkdir(parents=True, mode=0o777)
        (self.etc / "asterisk.conf").write_text(
            "[directories]\n"
            + "".join(
                f"{key} => {self.inside}/{sub}\n"
                for key, sub in (
                    ("astetcdir", "etc"),
                    ("astvarlibdir", "lib"),
                    ("astdbdir", "lib"),
                    ("astkeydir", "lib"),
                    ("astdatadir", "data"),
                    ("astagidir", "data/agi-bin"),
                    ("astspooldir", "spool"),
                    ("astrundir", "run"),
                    ("astlogdir", "log"),
                    ("astcachedir", "cache"),
                )
            )
            + f"astmoddir => {MODULES}\nastsbindir => /usr/sbin\n\n"
            + "[options]\nverbose = 0\nhideconnect = yes\n"
        )
        # The stack node's modules (Debian's autoload would also open IAX2, Skinny and MGCP ports).
        shutil.copy(REPO / "asterisk_conf" / "modules.conf", self.etc / "modules.conf")
        (self.etc / "rtp.conf").write_text(
            f"[general]\nrtpstart = {self.rtp_start}\nrtpend = {self.rtp_start + 999}\nstrictrtp = yes\n"
        )
        manager = (self.etc / "manager.conf").read_text()
        (self.etc / "manager.conf").write_text(manager.replace("port = 5038", f"port = {self.ami_port}", 1))
        (self.etc / "pjsip.conf").write_text(
            f"""[transport-udp]
type = transport
protocol = udp
bind = 127.0.0.1:{self.sip_port}

[phone](!)
type = endpoint
transport = transport-udp
disallow = all
allow = ulaw
dtmf_mode = rfc4733
direct_media = no
rtp_symmetric = yes
media_address = 127.0.0.1
identify_by = username

[caller](phone)
context = from-customers

[agent](phone)
context = from-agents
"""
        )
        with (self.etc / "extensions.conf").open("a") as fh:
            fh.write(
                "\n[from-customers]\n"
                "exten => _5XXX,1,Set(KASUHARA_TARGET=PJSIP/agent/sip:agent@127.0.0.1:${EXTEN})\n"
                " same => n,Goto(kasuhara-inbound,${EXTEN},1)\n"
            )

    def rx(self, command: str, timeout: float = 10) -> str:
        # Without its own asterisk.conf, `asterisk -C` falls back to the built-in defaults, whose control
        # socket is the STACK's Asterisk: a `core stop now` meant for this node would stop the shared one
        # (it did, once, mid-CI: 54 tests then found no Asterisk).
        if not (self.etc / "asterisk.conf").is_file():
            raise RuntimeError(f"node {self.name}: no {self.etc / 'asterisk.conf'}: not sending {command!r}")
        done = subprocess.run(
            [
                "chroot",
                str(ROOT),
                "/usr/sbin/asterisk",
                "-C",
                f"{self.inside}/etc/asterisk.conf",
                "-s",  # this node's control socket, named: never the default one (the stack's)
                f"{self.inside}/run/asterisk.ctl",
                "-rx",
                command,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return done.stdout

    def start(self, timeout: float = 60) -> None:
        log = (self.home / "log" / "console.log").open("wb")
        self.proc = subprocess.Popen(
            ["chroot", str(ROOT), "/usr/sbin/asterisk", "-f", "-n", "-C", f"{self.inside}/etc/asterisk.conf"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while "fully booted" not in self.rx("core waitfullybooted", timeout=5):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"node {self.name} did not boot: {self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self) -> str:
        texts = []
        for path in (self.home / "log" / "console.log", self.home / "log" / "messages.log"):
            if path.exists():
                texts.append(path.read_text(errors="replace")[-3000:])
        return "\n".join(texts)

    def stop(self) -> None:
        if self.proc is None:
            return
        if (self.home / "run" / "asterisk.ctl").exists() and (self.etc / "asterisk.conf").is_file():
            self.rx("core stop now", timeout=10)
        else:  # its control socket is gone: never ask through one that may be another Asterisk's
            self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)
