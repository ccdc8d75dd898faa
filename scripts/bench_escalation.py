#!/usr/bin/env python3
"""Benchmark: escalation latency, the agent's ``9`` reaching Asterisk → the supervisor's INVITE leaving it.

Both ends are read from one packet capture on the loopback interface (``tcpdump``, kernel timestamps):

- start: the first RFC 4733 *end* packet (E bit) of the event ``9`` that reaches the Asterisk RTP port of
  the call's agent leg. Asterisk (features and ARI ``ChannelDtmfReceived`` alike) acts on the end packet;
  with the test phones it comes ~140 ms after the first packet of the digit;
- end: the INVITE Asterisk sends to the supervisor's phone.

Pairs are matched per call, not by order: while the calls run, ARI tells for each call the Asterisk RTP
address of the agent's leg (``CHANNEL(rtp,src)``) and the SIP Call-ID of the supervisor's leg
(``CHANNEL(pjsip,call-id)``). The app's share is split out by timestamping, in the service's process,
when its ``ChannelDtmfReceived`` for the ``9`` arrived (same host clock).

Runs: ``--single`` calls one at a time (default 20), then ``--concurrent`` calls at once (default 50; all
are up before the first ``*9``, presses ramped at ``--rate`` per second). The call service runs in this
process (the same ``Service`` as ``kasuhara serve``; MQTT events on, upload off) with its own Stasis app,
so other users of the shared stack are not disturbed; the spool files of its calls are removed afterwards.

    .venv/bin/python scripts/bench_escalation.py [--single 20] [--concurrent 50] [--write]

Needs the local stack (``scripts/stack up``), root (tcpdump, SIPp pcap playback), SIPp and tcpdump.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import io
import logging
import os
import platform
import statistics
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the SIPp phone driver and packet tools are shared with the tests

from kasuhara_ari.config import Config, load  # noqa: E402
from kasuhara_ari.events import EventSink, MemoryEvents, MqttEvents  # noqa: E402
from kasuhara_ari.service import Service  # noqa: E402

from audio import Capture, read_pcap  # noqa: E402
from escalation_helpers import agent_pressing, supervisor_phone, with_supervisors  # noqa: E402
from sip import agent_port, caller, free_udp_port  # noqa: E402

SECTION = "## Escalation latency"
DOCS = REPO / "docs/benchmarks.md"
#: Only what the measurement needs: SIP, and telephone-event packets into Asterisk's RTP ports.
BPF = "udp port 5060 or (udp dst portrange 20000-29999 and (udp[9] & 0x7f) = 101)"
BASELINE_MS = "2–3"  # plain-dialplan peer, /work/shared/ASTERISK-NOTES.md (measured at 1 and 20 calls)


class Tee:
    """Events to MQTT, as ``kasuhara serve`` sends them, and to memory, for the benchmark to follow calls."""

    def __init__(self, *sinks: EventSink) -> None:
        self.sinks = sinks

    def emit(self, event: str, call_id: str | None = None, /, **fields: Any) -> None:
        for sink in self.sinks:
            sink.emit(event, call_id, **fields)


@dataclass
class Sample:
    call_id: str
    dtmf_end: float | None = None  # the 9's first end packet reached Asterisk (pcap time)
    app_saw: float | None = None  # the service got ChannelDtmfReceived 9 (its clock)
    invite: float | None = None  # the INVITE to the supervisor left Asterisk (pcap time)

    @property
    def total_ms(self) -> float | None:
        if self.dtmf_end is None or self.invite is None:
            return None
        return (self.invite - self.dtmf_end) * 1000

    @property
    def to_app_ms(self) -> float | None:
        if self.dtmf_end is None or self.app_saw is None:
            return None
        return (self.app_saw - self.dtmf_end) * 1000


@dataclass
class Round:
    name: str
    calls: int
    concurrent: int
    samples: list[Sample] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    load_before: float = 0.0
    steps: list[tuple[float, ...]] = field(default_factory=list)  # the app's (create, stasis, add, dial) ms


class StepLog(logging.Handler):
    """Collects the escalation's own step timings (its ``supervisor_dialled`` log line) per call."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.steps: dict[str, tuple[float, ...]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("escalation event=supervisor_dialled") and isinstance(record.args, tuple):
            call_id, _leg, *ms = record.args
            self.steps.setdefault(str(call_id), tuple(float(str(m)) for m in ms))


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: with 20 samples p99 is the worst one)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def parse_capture(pcap: Path) -> tuple[dict[int, float], dict[str, float]]:
    """(Asterisk RTP port -> first end packet of the 9 there, SIP Call-ID -> when its INVITE was sent)."""
    ends: dict[int, float] = {}
    invites: dict[str, float] = {}
    for at, sport, dport, udp in read_pcap(pcap):
        if sport == 5060 and udp.startswith(b"INVITE "):
            for line in udp.split(b"\r\n"):
                if line.lower().startswith(b"call-id:"):
                    invites.setdefault(line.split(b":", 1)[1].strip().decode(), at)
                    break
        elif len(udp) >= 16 and udp[1] & 0x7F == 101:
            csrc = (udp[0] & 0x0F) * 4
            event, flags = struct.unpack("!BB", udp[12 + csrc : 14 + csrc])
            if event == 9 and flags & 0x80:
                ends.setdefault(dport, at)
    return ends, invites


async def ari_var(http: httpx.AsyncClient, cfg: Config, channel: str, name: str) -> str:
    resp = await http.get(f"{cfg.ari.url}/ari/channels/{channel}/variable", params={"variable": name})
    resp.raise_for_status()
    return str(resp.json().get("value", ""))


async def run_round(
    service: Service,
    events: MemoryEvents,
    app_saw: dict[str, float],
    steps: StepLog,
    rnd: Round,
    workdir: Path,
    rate: int,
) -> None:
    cfg = service.cfg
    supervisor_port = int(cfg.escalation.supervisors[0].rsplit(":", 1)[1])
    port = agent_port()
    work = workdir / rnd.name
    work.mkdir(parents=True, exist_ok=True)
    pcap = work / "lo.pcap"
    rnd.load_before = os.getloadavg()[0]
    already = {e["call_id"] for e in events.events}
    single = rnd.concurrent == 1
    # One at a time: the agent presses *9 2 s after answering. At once: every call is up (ramp of
    # calls/rate s plus the ~5.5 s notice) before the first *9, and the presses follow the ramp.
    press_ms = 2000 if single else int(rnd.calls / rate * 1000) + 2000
    call_ms = 6000 + press_ms + 5000  # the caller counts from its own answer, before the ~5.5 s notice
    supervisor = await supervisor_phone(work, supervisor_port, ring_ms=200, calls=rnd.calls).start()
    agent = await agent_pressing(work, port, [(press_ms, "*9")], calls=rnd.calls).start()
    # call id -> (Asterisk's RTP port of the agent leg, SIP Call-ID of the supervisor leg)
    legs: dict[str, tuple[int, str]] = {}
    async with Capture(pcap, BPF), httpx.AsyncClient(auth=(cfg.ari.username, cfg.ari.password)) as http:
        phone = await caller(
            work,
            port,
            app=cfg.ari.app,
            call_ms=call_ms,
            calls=rnd.calls,
            concurrent=rnd.concurrent,
            rate=rate,
            timeout_s=rnd.calls * 30 + 60,
        ).start()
        done = asyncio.create_task(phone.wait(rnd.calls * 30 + 60))
        while not done.done():
            joined = [
                e["call_id"]
                for e in events.events
                if e["event"] == "supervisor_joined"
                and e["call_id"] not in already
                and e["call_id"] not in legs
            ]
            for call_id in joined:
                with contextlib.suppress(httpx.HTTPError):
                    src = await ari_var(http, cfg, f"{call_id}-agent", "CHANNEL(rtp,src)")
                    sip_call = await ari_var(http, cfg, f"{call_id}-sup-1", "CHANNEL(pjsip,call-id)")
                    legs[call_id] = (int(src.rsplit(":", 1)[1]), sip_call)
            await asyncio.sleep(0.05)
        with contextlib.suppress(AssertionError):
            await done
    for p in (agent, supervisor):
        await p.stop()
    ends, invites = parse_capture(pcap)
    ours = [e["call_id"] for e in events.events if e["event"] == "started" and e["call_id"] not in already]
    for call_id in ours:
        if call_id not in legs:
            rnd.failed.append(call_id)
            continue
        rtp_port, sip_call = legs[call_id]
        rnd.samples.append(
            Sample(call_id, ends.get(rtp_port), app_saw.get(f"{call_id}-agent"), invites.get(sip_call))
        )
        if call_id in steps.steps:
            rnd.steps.append(steps.steps[call_id])


def shown_args(argv: list[str]) -> list[str]:
    """The command line as the docs show it (a scratch work directory says nothing about the run)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workdir":
            skip = True
        elif not arg.startswith("--workdir="):
            out.append(arg)
    return out


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {round(kb / 1024 / 1024)} GiB RAM"
    return (
        f"{cpu}, {os.cpu_count()} cores{mem}, Linux {platform.release()}, Python {platform.python_version()}"
    )


def revision() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout

    rev = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    return rev + (" + uncommitted changes" if git("status", "--porcelain").strip() else "")


def row(rnd: Round) -> str:
    totals = [s.total_ms for s in rnd.samples if s.total_ms is not None]
    to_app = [s.to_app_ms for s in rnd.samples if s.to_app_ms is not None]
    app = [t - a for t, a in zip(
        [s.total_ms for s in rnd.samples], [s.to_app_ms for s in rnd.samples], strict=True
    ) if t is not None and a is not None]  # fmt: skip
    if not totals:
        return f"| {rnd.concurrent} | 0 / {rnd.calls} | – | – | – | – | {rnd.load_before:.1f} |"
    return (
        f"| {rnd.concurrent} | {len(totals)} / {rnd.calls} | {pct(totals, 50):.1f} / {pct(totals, 99):.1f} "
        f"| {min(totals):.1f} / {max(totals):.1f} "
        f"| {pct(to_app, 50):.1f} / {pct(to_app, 99):.1f} | {pct(app, 50):.1f} / {pct(app, 99):.1f} "
        f"| {rnd.load_before:.1f} |"
    )


def section(meta: dict[str, Any], rounds: list[Round]) -> str:
    out = io.StringIO()
    out.write(f"{SECTION}\n\n")
    out.write(
        f"`{meta['command']}`, run {meta['date']} on: {meta['machine']}, kasuhara-ari {meta['revision']}. "
        "SIPp, Asterisk, tcpdump and the app share the machine.\n\n"
    )
    out.write(
        "Time from the agent's DTMF **end** packet of the `9` (of `*9`) reaching Asterisk to the "
        "supervisor's INVITE leaving Asterisk, both read from one `tcpdump` capture on `lo` and paired per "
        "call via ARI (`CHANNEL(rtp,src)` of the agent's leg, `CHANNEL(pjsip,call-id)` of the supervisor's). "
        "*Asterisk → app* ends when the service's `ChannelDtmfReceived` for the `9` arrived in its process "
        "(same host clock); *app → INVITE* is the rest: the app's decision, `POST /channels/create`, waiting "
        "for the leg's `StasisStart`, `addChannel` (absorbDTMF) and `dial`, and Asterisk sending the INVITE. "
        "Percentiles are nearest-rank (with 20 samples p99 is the worst). The service is the same `Service` "
        "as `kasuhara serve` (MQTT events on, upload off), run in the benchmark's process. *load* = the "
        "1-minute load average when the run started (2 cores; other engineers' tests and load benchmarks "
        "shared the machine).\n\n"
    )
    out.write(
        "| concurrent calls | calls measured | DTMF end → INVITE ms p50 / p99 | min / max ms "
        "| Asterisk → app ms p50 / p99 | app → INVITE ms p50 / p99 | load |\n"
    )
    out.write("|---|---|---|---|---|---|---|\n")
    for rnd in rounds:
        out.write(row(rnd) + "\n")
    out.write(
        "\nWhere the app's share goes (medians, ms, from the escalation's own `supervisor_dialled` log "
        "line): `POST /channels/create` / wait for its `StasisStart` / `addChannel` / `dial`:\n\n"
    )
    for rnd in rounds:
        if rnd.steps:
            medians = [statistics.median(s[i] for s in rnd.steps) for i in range(4)]
            out.write(f"- {rnd.concurrent} at once: " + " / ".join(f"{m:.1f}" for m in medians) + "\n")
    out.write(
        "\nBaseline, not re-measured in this run: the plain-dialplan peer (features.conf applicationmap `*9` "
        f"→ Originate of the supervisor → `ChanSpy(agent,qBE)`) sends the INVITE **{BASELINE_MS} ms** after "
        "the same end packet at 1 and 20 concurrent calls (ASTERISK-NOTES.md, same machine and Asterisk). "
        "That peer has no events, no evidence flag, no ordered fall-through to a second supervisor, and its "
        "supervisor only spies on the agent's channel; ours bridges the supervisor into the call (three-way, "
        "recorded), and pays for it with the round trips listed above.\n"
    )
    failed = [
        f"{r.concurrent} at once: {len(r.failed)} calls never got a supervisor" for r in rounds if r.failed
    ]
    if failed:
        out.write("\nNot measured: " + "; ".join(failed) + ".\n")
    return out.getvalue()


def write_section(path: Path, text: str) -> None:
    """Replace this benchmark's section (up to the next ``## ``) or append it; keep everything else."""
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    lines = old.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + text + ("\n" if end < len(lines) else "") + "".join(lines[end:])
    path.write_text(new, encoding="utf-8")


async def bench(args: argparse.Namespace) -> int:
    stack = load(args.config, env={})
    run_id = uuid.uuid4().hex[:8]
    workdir = Path(args.workdir or f"/tmp/kasuhara-bench-escalation-{run_id}")
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = with_supervisors(stack, free_udp_port(5100, 5999), ring_timeout_s=10)
    cfg = replace(
        cfg,
        ari=replace(cfg.ari, app=f"kasuhara-bench-esc-{run_id}"),
        mqtt=replace(cfg.mqtt, topic_prefix=f"kasuhara-bench/{run_id}"),
        storage=replace(cfg.storage, enabled=False),
    )
    events = MemoryEvents()
    publisher = MqttEvents(cfg.mqtt) if cfg.mqtt.enabled else None
    service = Service(cfg, events=Tee(events, publisher) if publisher is not None else events)
    app_saw: dict[str, float] = {}
    dispatch = service.app.dispatch

    def timestamped(event: dict[str, Any]) -> None:
        if event.get("type") == "ChannelDtmfReceived" and event.get("digit") == "9":
            app_saw.setdefault(str((event.get("channel") or {}).get("id", "")), time.time())
        dispatch(event)

    service.app.dispatch = timestamped  # type: ignore[method-assign]
    step_log = StepLog()
    escalation_log = logging.getLogger("kasuhara_ari.escalation")
    escalation_log.addHandler(step_log)
    escalation_log.setLevel(logging.INFO)
    task = asyncio.create_task(service.run())
    publishing = asyncio.create_task(publisher.run()) if publisher is not None else None
    await asyncio.wait_for(service.app.connected.wait(), 10)
    await asyncio.sleep(0.3)
    started = time.monotonic()
    rounds = []
    if args.single:
        rounds.append(Round("single", args.single, 1))
    if args.concurrent:
        rounds.append(Round("concurrent", args.concurrent, args.concurrent))
    try:
        for rnd in rounds:
            print(f"bench_escalation: {rnd.calls} calls, {rnd.concurrent} at once ...", flush=True)
            await run_round(service, events, app_saw, step_log, rnd, workdir, args.rate)
            print(row(rnd), flush=True)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if publisher is not None and publishing is not None:
            await publisher.close(timeout=3)
            publishing.cancel()
        for call_id in {e["call_id"] for e in events.events if e.get("call_id")}:
            for ext in (".wav", ".done", ".json"):
                (cfg.recording.host_dir / f"{call_id}{ext}").unlink(missing_ok=True)
    meta = {
        "command": " ".join(["scripts/bench_escalation.py", *shown_args(sys.argv[1:])]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "revision": revision(),
        "runtime_s": time.monotonic() - started,
    }
    text = section(meta, rounds)
    print("\n" + text)
    if args.write:
        write_section(DOCS, text)
        print(f"bench_escalation: wrote the section into {DOCS}")
    totals = [s.total_ms for r in rounds for s in r.samples if s.total_ms is not None]
    return 0 if totals and not any(r.failed for r in rounds) else 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(Path("/var/cache/kasuhara/kasuhara.toml")))
    parser.add_argument("--single", type=int, default=20, help="calls measured one at a time (0 = skip)")
    parser.add_argument("--concurrent", type=int, default=50, help="calls measured all at once (0 = skip)")
    parser.add_argument("--rate", type=int, default=10, help="calls (and *9 presses) per second in the ramp")
    parser.add_argument("--workdir", default="", help="where SIPp logs and captures go")
    parser.add_argument("--write", action="store_true", help=f"replace '{SECTION}' in docs/benchmarks.md")
    parser.add_argument("--verbose", action="store_true", help="log the call service at INFO")
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger().handlers[0].setLevel(logging.INFO if args.verbose else logging.WARNING)
    logging.getLogger().setLevel(logging.INFO if args.verbose else logging.WARNING)
    for noisy in ("httpx", "httpcore", "websockets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    raise SystemExit(asyncio.run(bench(args)))


if __name__ == "__main__":
    main()
