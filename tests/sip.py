"""Real SIP phones for tests: SIPp processes placing and answering calls through the local Asterisk.

Each phone runs in its own working directory copy of ``tests/sipp`` (SIPp opens ``rtp_stream`` files
relative to the working directory) and logs every SIP message with a timestamp, so tests can tell when
an INVITE reached a phone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import socket
import subprocess
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from dtmf_pcap import write_digit

SIPP_DIR = Path(__file__).resolve().parent / "sipp"
ASTERISK_SIP = "127.0.0.1:5060"
_used_ports: set[int] = set()


def worker_slice(lo: int, hi: int) -> tuple[int, int]:
    """This pytest-xdist worker's own part of [lo, hi]: tests running side by side on several workers
    never pick the same port (a port is checked free, then bound by SIPp a moment later)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if not worker.startswith("gw") or not worker[2:].isdigit() or count < 2:
        return lo, hi
    index = int(worker[2:]) % count
    size = (hi - lo + 1) // count
    return lo + index * size, lo + (index + 1) * size - 1


def free_udp_port(lo: int, hi: int) -> int:
    """A free UDP port in [lo, hi] (tests pick agent ports 5100-5999: the dialplan maps 5XXX to them),
    from this xdist worker's slice of it."""
    lo, hi = worker_slice(lo, hi)
    for _ in range(200):
        port = random.randint(lo, hi)
        if port in _used_ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _used_ports.add(port)
        return port
    raise RuntimeError(f"no free UDP port in {lo}-{hi}")


def agent_port() -> int:
    return free_udp_port(5100, 5999)


def rtp_base() -> int:
    """Four UDP ports (audio and video RTP and RTCP) for one SIPp instance, from this worker's slice of
    10000-14999: off Asterisk's 20000-29999, the callers' SIP ports 15000-15999, and the kernel's ephemeral
    range (32768-60999), where any socket bound to port 0 on the box (a detector's media socket, another
    SIPp's) could take a port checked free a moment before: a CI run lost a call to `Unable to bind audio
    RTP socket ... port=35398 ... Address already in use` when the range was 30000-59000."""
    lo, hi = worker_slice(10000, 14999)
    for _ in range(200):
        base = random.randint(lo, hi - 3) & ~3
        ports = range(base, base + 4)
        if base < lo or any(p in _used_ports for p in ports):
            continue
        try:
            for p in ports:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        _used_ports.update(ports)
        return base
    raise RuntimeError(f"no four free UDP ports in {lo}-{hi}")


class Phone:
    """One SIPp process (a UAC or a UAS scenario)."""

    def __init__(self, workdir: Path, name: str, args: Sequence[str]) -> None:
        self.dir = workdir / name
        if not self.dir.exists():
            shutil.copytree(SIPP_DIR, self.dir)
        self.name = name
        self.args = list(args)
        self.proc: asyncio.subprocess.Process | None = None
        self.messages = self.dir / "messages.log"
        self.errors = self.dir / "errors.log"
        self.stats = self.dir / "stats.csv"

    async def start(self) -> Phone:
        cmd = [
            "sipp",
            *self.args,
            "-nostdin",
            "-trace_msg",
            "-message_file",
            str(self.messages),
            "-trace_err",
            "-error_file",
            str(self.errors),
            "-trace_stat",
            "-stf",
            str(self.stats),
        ]
        self.proc = await asyncio.create_subprocess_exec(
            *cmd, cwd=self.dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        return self

    async def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.kill()
            raise AssertionError(
                f"SIPp {self.name} still running after {timeout}s: {self.error_text()}"
            ) from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    async def stop(self) -> None:
        self.kill()
        if self.proc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.proc.wait(), 5)

    def error_text(self) -> str:
        return self.errors.read_text(errors="replace")[-2000:] if self.errors.exists() else ""

    def received(self, method: str) -> list[datetime]:
        """When each ``method`` request (e.g. INVITE, BYE) arrived at this phone (wall clock, UTC)."""
        return self._requests("received", method)

    def sent(self, method: str) -> list[datetime]:
        """When this phone sent each ``method`` request (e.g. its own BYE)."""
        return self._requests("sent", method)

    def _requests(self, direction: str, method: str) -> list[datetime]:
        if not self.messages.exists():
            return []
        text = self.messages.read_text(errors="replace")
        times = []
        # SIPp's message log: a header line with the date and time, then "UDP message received ...:" (or
        # "sent") and the message itself.
        pattern = re.compile(
            r"-+ (\d{4}-\d{2}-\d{2})\s+(\d{2}:\d{2}:\d{2}\.\d+)\s*\n"
            # (received: "[N] bytes :", sent: "(N bytes):")
            rf"UDP message {direction} (?:\[\d+\] bytes :|\(\d+ bytes\):)\s*\n\s*\n"
            + re.escape(method)
            + r" sip:",
        )
        for m in pattern.finditer(text):
            local = datetime.strptime(f"{m.group(1)} {m.group(2)}", "%Y-%m-%d %H:%M:%S.%f")
            times.append(local.astimezone(UTC))
        return times


def caller(
    workdir: Path,
    exten: str | int,
    *,
    call_ms: int,
    calls: int = 1,
    concurrent: int = 1,
    rate: int = 10,
    name: str = "caller",
    app: str = "kasuhara",
    from_user: str = "caller",
    number: str = "-",
    timeout_s: int = 120,
    extra: Sequence[str] = (),
    display_name: str = "caller",
    name_header: str = "",
    server: str = ASTERISK_SIP,
) -> Phone:
    """The customer: dials ``exten``, talks ``call_ms`` after the answer, then hangs up (or takes a BYE).

    ``display_name`` goes into the From header as it is (a test may send a hostile one); ``name_header``
    (percent-encoded) becomes the caller's name through the test dialplan's ``X-Test-Caller-Name``, for
    names SIP cannot carry (a CR LF). ``server``: the Asterisk to call (another node's address:port).
    """
    port = free_udp_port(15000, 15999)
    phone = Phone(
        workdir,
        name,
        [
            server,
            "-sf",
            "uac.xml",
            "-s",
            str(exten),
            "-set",
            "call_ms",
            str(call_ms),
            "-set",
            "app",
            app,
            "-set",
            "caller_number",
            number,
            "-i",
            "127.0.0.1",
            "-p",
            str(port),
            "-mi",
            "127.0.0.1",
            "-mp",
            str(rtp_base()),
            "-m",
            str(calls),
            "-l",
            str(concurrent),
            "-r",
            str(rate),
            "-timeout",
            f"{timeout_s}s",
            "-timeout_error",
            *extra,
        ],
    )
    if from_user != "caller" or display_name != "caller" or name_header:
        # The same scenario as another SIP user (e.g. ``agent``, whose endpoint calls out), or with another
        # display name.
        if not from_user.isalnum():
            raise ValueError(f"bad SIP user {from_user!r}")
        if display_name == "caller":
            display_name = from_user
        scenario = (SIPP_DIR / "uac.xml").read_text().replace("sip:caller@", f"sip:{from_user}@")
        scenario = scenario.replace('"caller" <sip:', f'"{display_name}" <sip:')
        if name_header:
            marker = "      X-Test-Caller: [$caller_number]\n"
            assert scenario.count(marker) == 1, "uac.xml changed: update caller()"
            scenario = scenario.replace(marker, marker + f"      X-Test-Caller-Name: {name_header}\n")
        # SIPp sends the scenario's bytes as they are (its XML says ISO-8859-1): UTF-8 names stay UTF-8.
        (phone.dir / "uac_as.xml").write_bytes(scenario.encode("utf-8"))
        phone.args[phone.args.index("uac.xml")] = "uac_as.xml"
    return phone


def dtmf_scenario(base: str, presses: Sequence[tuple[int, str]], pcap_dir: Path) -> str:
    """``uas.xml`` with RFC 2833 key presses after the answer: [(wait_ms, digits), ...].

    Each digit gets its own pcap with fresh RTP timestamps (see dtmf_pcap.py); the phone's audio stream
    pauses while digits play (mixing both made Asterisk see each digit ~8 times).
    """
    steps = []
    index = 0
    for wait_ms, digits in presses:
        steps.append(f'  <pause milliseconds="{int(wait_ms)}" />')
        steps.append('  <nop><action><exec rtp_stream="pause" /></action></nop>')
        for digit in digits:
            pcap = write_digit(pcap_dir / f"dtmf-{index}.pcap", digit, index=index)
            index += 1
            steps.append(f'  <nop><action><exec play_pcap_audio="{pcap}" /></action></nop>')
            steps.append('  <pause milliseconds="250" />')
        steps.append('  <nop><action><exec rtp_stream="resume" /></action></nop>')
    marker = '  <nop test="agent_hangs_up" next="hangup" />'
    assert marker in base, "uas.xml changed: update dtmf_scenario"
    return digits_from_audio_port(base).replace(marker, "\n".join(steps) + "\n" + marker)


def digits_from_audio_port(scenario: str) -> str:
    """A scenario whose key presses leave from its audio port.

    SIPp sends play_pcap_audio packets from the port of [media_port], and from port 0 when the scenario
    never mentions it; Asterisk's strict RTP then drops the digits once the bridge changes (a supervisor
    joins). Naming [media_port] on an "audio" SDP line makes them leave from the audio stream's port, like a
    real phone's (for a SIPp instance's first call at a time both come from -mp).
    """
    ptime = "      a=ptime:20\n"
    assert scenario.count(ptime) == 1, "scenario changed: update digits_from_audio_port"
    return scenario.replace(ptime, ptime + "      a=x-kasuhara-dtmf-audio-port:[media_port]\n")


def answering(
    workdir: Path,
    port: int,
    *,
    ring_ms: int = 300,
    hold_ms: int = 0,
    calls: int = 1,
    name: str = "agent",
    scenario: str = "uas.xml",
    extra: Sequence[str] = (),
    dtmf: Sequence[tuple[int, str]] = (),
) -> Phone:
    """An agent or supervisor phone on ``port``: rings, answers, hangs up after ``hold_ms`` (0 = waits)."""
    args = ["-sf", scenario, "-i", "127.0.0.1", "-p", str(port), "-mi", "127.0.0.1", "-mp", str(rtp_base())]
    if scenario == "uas.xml":
        args += ["-set", "ring_ms", str(ring_ms), "-set", "hold_ms", str(hold_ms)]
    args += ["-m", str(calls), *extra]
    phone = Phone(workdir, name, args)
    if dtmf:
        generated = dtmf_scenario((SIPP_DIR / scenario).read_text(), dtmf, phone.dir)
        (phone.dir / "uas_dtmf.xml").write_text(generated)
        phone.args[1] = "uas_dtmf.xml"
    return phone
