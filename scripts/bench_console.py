#!/usr/bin/env python3
"""Benchmark: the console's live board under a SIP load, seen from real browsers (issue 13).

One ``kasuhara serve`` (the load benchmark's ``App``: its own Stasis app, spool, bucket and MQTT prefix)
carries real SIPp calls through the stack's Asterisk; one ``kasuhara web`` subscribes to that prefix; headless
Debian Chromium opens the sessions on the board (one browser process, one context and login each). For each
run of ``--runs`` (``BROWSERSxCALLS[+STREAMS]``, default ``1x100,1x100+19,20x100``: the same load seen by
one screen, by one screen and 19 plain SSE sessions, then by 20 screens)
the load is ``bench_load.run_level`` itself (2 waves × the level, at most the level at once, 20-s calls), and:

- **board latency**: every change of a row in every browser is stamped with the browser's clock by a
  MutationObserver installed through DevTools (not the page: the console's CSP forbids inline scripts); the
  delay is that stamp minus the event's ``at`` (set by ``serve`` when the event happened, before MQTT), i.e.
  the whole path serve → mosquitto → console → SSE → DOM. Reported: the call appearing, and every change;
  p50/p95/p99/max over all browsers;
- **completeness**: every browser must have seen every call placed, and no row may remain once the calls
  ended (a lost or stale call is a defect, not a latency);
- **cost**: the console's CPU (all threads) and RSS, Chromium's CPU (all its processes: they share the box,
  which a real supervisor's screen would not), Asterisk's and the app's CPU, all sampled from /proc every
  0.5 s; and an idle phase first (browsers open, no call) as the same-run baseline of the console's cost.

Background-tab throttling is switched off in Chromium: each session stands for a supervisor's own visible
screen, not a hidden tab. Results are printed, saved as JSON in the work directory and, with ``--write``,
replace the "Console: the live board under load" section of ``docs/benchmarks.md``.

    .venv/bin/python scripts/bench_console.py [--runs 1x100,1x100+19,20x100] [--call-s 20] [--write]
    .venv/bin/python scripts/bench_console.py --runs 3x10 --call-s 5          # a quick look

Needs the local stack (``scripts/stack up``), root (SIPp RTP), SIPp and Debian's chromium.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import bench_load as bl  # noqa: E402  (puts tests/ on the path too)
import httpx  # noqa: E402
from browser import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

from kasuhara_ari.config import load  # noqa: E402

SECTION = "## Console: the live board under load"
VIEWER, VIEWER_PW = "bench-viewer", "the bench viewers long passphrase"

# Every change of a row, stamped with the browser's clock (same host clock as the server's `at`).
RECORD_ROWS = """
() => {
  window.__rows = [];
  const seen = new Map();
  const note = () => {
    const now = Date.now();
    const present = new Set();
    for (const tr of document.querySelectorAll('#board-rows tr.call')) {
      const key = `${tr.dataset.state}|${tr.dataset.badges}|${tr.dataset.at}`;
      present.add(tr.dataset.callId);
      if (seen.get(tr.dataset.callId) !== key) {
        const first = !seen.has(tr.dataset.callId);
        seen.set(tr.dataset.callId, key);
        const d = tr.dataset;
        window.__rows.push({call: d.callId, first, at: d.at, sent: d.sent, t: now});
      }
    }
    for (const id of Array.from(seen.keys())) {
      if (!present.has(id)) {
        seen.delete(id);
        window.__rows.push({call: id, gone: true, t: now});
      }
    }
  };
  new MutationObserver(note).observe(document.getElementById('board-rows'), {childList: true, subtree: true});
}
"""

# How many calls a board shows now.
COUNT_ROWS = "() => document.querySelectorAll('#board-rows tr.call').length"

#: After a run, how long the boards get to show the last calls' ends before a row left is a defect.
SETTLE_S = 10.0

# The rows still on the board, and what this page has recorded since the last drain.
DRAIN_ROWS = """
() => {
  const rows = window.__rows; window.__rows = [];
  return {rows, left: document.querySelectorAll('#board-rows tr.call').length};
}
"""


# ------------------------------------------------------------------------------------------- sampling


def descendants(root: int) -> set[int]:
    """Every living process below ``root`` (Chromium's zygotes and renderers under Playwright's driver)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def is_chromium(pid: int) -> bool:
    try:
        return "chrom" in Path(f"/proc/{pid}/comm").read_text()
    except OSError:
        return False


@dataclass
class Tick:
    t: float
    console: int | None
    console_rss: int | None
    chromium: int


class CostSampler:
    """The console's CPU ticks and RSS, and Chromium's CPU ticks, every 0.5 s in a thread."""

    def __init__(self) -> None:
        self.console_pid: int | None = None
        self.ticks: list[Tick] = []
        self._gone = 0  # ticks of Chromium processes that exited (renderers come and go)
        self._last: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cost-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _chromium_ticks(self) -> int:
        living: dict[int, int] = {}
        for pid in descendants(os.getpid()):
            if is_chromium(pid):
                ticks = bl.proc_ticks(pid)
                if ticks is not None:
                    living[pid] = ticks
        for pid, ticks in self._last.items():
            if pid not in living:
                self._gone += ticks
        self._last = living
        return self._gone + sum(living.values())

    def _loop(self) -> None:
        while not self._stop.is_set():
            pid = self.console_pid
            self.ticks.append(
                Tick(
                    t=time.time(),
                    console=bl.proc_ticks(pid) if pid else None,
                    console_rss=bl.proc_rss_kib(pid) if pid else None,
                    chromium=self._chromium_ticks(),
                )
            )
            self._stop.wait(bl.SAMPLE_S)

    def window(self, t0: float, t1: float) -> list[Tick]:
        return [s for s in self.ticks if t0 <= s.t <= t1]


def percent(ticks: list[Tick], attr: str) -> tuple[float, float]:
    """(average, peak over 2-s windows) in % of one core."""
    vals = [(s.t, getattr(s, attr)) for s in ticks if getattr(s, attr) is not None]
    if len(vals) < 2 or vals[-1][0] <= vals[0][0]:
        return 0.0, 0.0
    avg = 100.0 * (vals[-1][1] - vals[0][1]) / bl.TICK / (vals[-1][0] - vals[0][0])
    step = max(1, int(2.0 / bl.SAMPLE_S))
    peak = max(
        (
            100.0 * (vals[i + step][1] - vals[i][1]) / bl.TICK / (vals[i + step][0] - vals[i][0])
            for i in range(len(vals) - step)
        ),
        default=avg,
    )
    return avg, peak


# -------------------------------------------------------------------------------------------- console


class Console:
    """``kasuhara web`` on the app's bucket and MQTT prefix, logging to a file (a pipe could fill up)."""

    def __init__(self, app: bl.App, config: Path, workdir: Path) -> None:
        self.port = free_tcp_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "web.log"
        self.env = dict(os.environ)
        self.env.update(
            {
                "KASUHARA_MQTT__ENABLED": "true",
                "KASUHARA_MQTT__TOPIC_PREFIX": app.name,
                "KASUHARA_STORAGE__BUCKET": app.bucket,
                "KASUHARA_WEB__PORT": str(self.port),
                # The accounts live in the bucket; the stack's storage keys administer it here.
                "KASUHARA_ADMIN__ACCESS_KEY": app.cfg.storage.access_key,
                "KASUHARA_ADMIN__SECRET_KEY": app.cfg.storage.secret_key,
                "KASUHARA_ADMIN__NAME": "bench-admin",
            }
        )
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str, stdin: str | None = None) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "kasuhara_ari.cli", *args, "--config", str(self.config)],
            env=self.env,
            cwd=REPO,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"kasuhara {' '.join(args)}: {done.stderr.strip()[-500:]}")

    async def start(self) -> int:
        self.cli("users", "add", VIEWER, "--role", "viewer", "--password-stdin", stdin=VIEWER_PW + "\n")
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kasuhara_ari.cli", "web", "--config", str(self.config)],
                env=self.env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        async with httpx.AsyncClient(base_url=self.url, timeout=3) as http:
            for _ in range(300):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"kasuhara web exited: {self.log.read_text()[-2000:]}")
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/healthz")).status_code == 200:
                        return self.proc.pid
                await asyncio.sleep(0.1)
        raise RuntimeError("kasuhara web did not answer /healthz within 30 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def tracebacks(self) -> int:
        return self.log.read_text(errors="replace").count("Traceback") if self.log.exists() else 0


def free_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -------------------------------------------------------------------------------------------- browsers


async def open_board(browser: Any, url: str) -> Any:
    context = await browser.new_context(viewport={"width": 1280, "height": 800}, locale="ja-JP")
    page = await context.new_page()
    await page.goto(f"{url}/")
    await page.get_by_label("ユーザー名").fill(VIEWER)
    await page.get_by_label("パスワード").fill(VIEWER_PW)
    await page.get_by_role("button", name="ログイン").click()
    await page.wait_for_url(f"{url}/")
    await page.wait_for_selector('#board-conn[data-state="live"]', timeout=30_000)
    await page.evaluate(RECORD_ROWS)
    return page


def at_seconds(at: str) -> float | None:
    try:
        return datetime.fromisoformat(at).timestamp()
    except ValueError:
        return None


class SseSession:
    """A board session without a browser: logs in like one, reads ``/board/stream`` and notes when each
    change of a call arrives (the console's work for one more screen, without a renderer on the box)."""

    def __init__(self, url: str) -> None:
        timeout = httpx.Timeout(10, read=None)
        self.http = httpx.AsyncClient(base_url=url, timeout=timeout, headers={"origin": url})
        self.delays_ms: list[float] = []
        self.calls: set[str] = set()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        page = await self.http.get("/login")
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        if token is None:
            raise RuntimeError("no CSRF token on /login")
        form = {"csrf": token.group(1), "username": VIEWER, "password": VIEWER_PW}
        done = await self.http.post("/login", data=form)
        if done.status_code not in (200, 303):
            raise RuntimeError(f"login: {done.status_code}")
        opened = asyncio.Event()
        self.task = asyncio.create_task(self._read(opened))
        await asyncio.wait_for(opened.wait(), 30)

    async def _read(self, opened: asyncio.Event) -> None:
        async with self.http.stream("GET", "/board/stream") as resp:
            opened.set()
            kind = ""
            async for line in resp.aiter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: ") and kind == "call":
                    now = time.time()
                    data = json.loads(line[6:])
                    at = at_seconds(data.get("at") or "")
                    self.calls.add(str(data.get("call_id")))
                    if at is not None:
                        self.delays_ms.append(1000 * (now - at))

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await self.task
        await self.http.aclose()


# ---------------------------------------------------------------------------------------------- a run


@dataclass
class Run:
    browsers: int
    level: int
    attempted: int = 0
    completed: int = 0
    rec_ok: int = 0
    #: Delay event `at` → DOM (ms), the call's first row, over all browsers.
    appear_ms: list[float] = field(default_factory=list)
    #: Delay of every row change (first row and each later state/badge change).
    change_ms: list[float] = field(default_factory=list)
    #: Of that, the part up to the console writing the change to the stream (serve, mosquitto, console).
    console_ms: list[float] = field(default_factory=list)
    #: Per browser: how many of the calls placed it showed, and rows left after the calls ended.
    seen: list[int] = field(default_factory=list)
    left: list[int] = field(default_factory=list)
    console_avg: float = 0.0
    console_peak: float = 0.0
    console_rss_mib: float | None = None
    console_rss_peak_mib: float | None = None
    chromium_avg: float = 0.0
    asterisk_avg: float = 0.0
    app_avg: float = 0.0
    wall_s: float = 0.0
    #: Plain SSE sessions besides the browsers (the console's cost of N sessions without N renderers).
    streams: int = 0
    #: Their delay from the event's `at` to the change arriving at the client (every change).
    stream_ms: list[float] = field(default_factory=list)
    stream_seen: list[int] = field(default_factory=list)
    #: Seconds from the end of the load until every board was empty (SETTLE_S: some never were).
    settle_s: float = 0.0
    notes: list[str] = field(default_factory=list)


async def idle_phase(cost: CostSampler, seconds: float) -> tuple[float, float, float, float | None]:
    t0 = time.time()
    await asyncio.sleep(seconds)
    window = cost.window(t0, time.time())
    rss = [s.console_rss for s in window if s.console_rss]
    return (
        *percent(window, "console"),
        percent(window, "chromium")[0],
        max(rss) / 1024 if rss else None,
    )


async def one_run(
    args: argparse.Namespace,
    cfg: Any,
    sampler: bl.Sampler,
    cost: CostSampler,
    workdir: Path,
    app: bl.App,
    pages: list[Any],
    level: int,
) -> Run:
    run = Run(len(pages), level)
    load_args = argparse.Namespace(
        waves=args.waves,
        rate=0,
        call_s=args.call_s,
        profile=False,
        drain_timeout=args.drain_timeout,
        keep=False,
    )
    t0 = time.time()
    result = await bl.run_level(load_args, cfg, sampler, workdir / f"b{len(pages)}", level, "app", app)
    t1 = time.time()
    # The last `ended` events reach the boards; a row still there after SETTLE_S is a defect, not a delay.
    settle_start = time.monotonic()
    while time.monotonic() - settle_start < SETTLE_S:
        counts = [await page.evaluate(COUNT_ROWS) for page in pages]
        if not any(counts):
            break
        await asyncio.sleep(0.25)
    run.settle_s = round(time.monotonic() - settle_start, 2)
    run.attempted, run.completed, run.rec_ok = result.attempted, result.completed, result.rec_ok
    run.asterisk_avg, run.app_avg, run.wall_s = result.asterisk_avg, result.app_avg, result.wall_s
    run.notes += result.notes
    for page in pages:
        drained = await page.evaluate(DRAIN_ROWS)
        calls: set[str] = set()
        for row in drained["rows"]:
            if row.get("gone"):
                continue
            calls.add(row["call"])
            at = at_seconds(row.get("at") or "")
            if at is None:
                continue
            delay_ms = float(row["t"]) - 1000 * at
            run.change_ms.append(delay_ms)
            sent = at_seconds(row.get("sent") or "")
            if sent is not None:  # the console's part: event `at` → the change written to the stream
                run.console_ms.append(1000 * (sent - at))
            if row.get("first"):
                run.appear_ms.append(delay_ms)
        run.seen.append(len(calls))
        run.left.append(int(drained["left"]))
    window = cost.window(t0, t1)
    run.console_avg, run.console_peak = percent(window, "console")
    run.chromium_avg = percent(window, "chromium")[0]
    rss = [s.console_rss for s in window if s.console_rss]
    if rss:
        run.console_rss_peak_mib = max(rss) / 1024
    return run


# -------------------------------------------------------------------------------------------- report


def pct(values: list[float], q: float) -> str:
    v = bl.pct(values, q)
    return "–" if v is None else f"{v:.0f}"


def section(meta: dict[str, Any], idle: dict[str, Any], runs: list[Run]) -> str:
    lines = [
        SECTION,
        "",
        f"`scripts/bench_console.py --runs {meta['runs']} --call-s {meta['call_s']:g}`, "
        f"{meta['date']}, revision {meta['revision']}; {meta['machine']}; "
        f"run took {meta['runtime_s']:.0f} s. "
        "One `kasuhara serve` carries the SIPp calls (2 waves × the level, at most the level at once); one "
        "`kasuhara web` serves the board; headless Chromium (Debian's) holds the sessions, on the same 2 "
        "cores. Delay = the browser's clock when the row changed − the event's `at` (set by `serve` when it "
        "happened): serve → mosquitto → console → SSE → DOM.",
        "",
        f"Idle, {idle['browsers']} sessions open, no call: console {idle['console_avg']:.1f} % of a core "
        f"(peak {idle['console_peak']:.1f} %), RSS {fmt_mib(idle['console_rss_mib'])}; Chromium "
        f"{idle['chromium_avg']:.1f} %.",
        "",
        "| sessions | concurrent calls | calls ok | recordings ok | appear p50 / p95 / p99 / max (ms) | "
        "every change p50 / p99 (ms) | of it, up to the stream p50 / p99 (ms) | plain streams: n, "
        "every change p50 / p99 (ms) | calls seen per session | "
        "rows left (boards empty after) | "
        "console CPU avg / peak | "
        "console RSS peak | Chromium CPU | Asterisk | app |",
        "|---:|---:|---|---|---|---|---|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in runs:
        seen = f"{min(r.seen)}–{max(r.seen)} of {r.attempted}" if r.seen else "–"
        appear = " / ".join(pct(r.appear_ms, q) for q in (50, 95, 99, 100))
        change = " / ".join(pct(r.change_ms, q) for q in (50, 99))
        server = " / ".join(pct(r.console_ms, q) for q in (50, 99))
        plain = f"{r.streams}, " + " / ".join(pct(r.stream_ms, q) for q in (50, 99)) if r.streams else "–"
        lines.append(
            f"| {r.browsers} | {r.level} | {r.completed}/{r.attempted} | {r.rec_ok}/{r.attempted} | "
            f"{appear} | "
            f"{change} | {server} | {plain} | {seen} | {sum(r.left)} ({r.settle_s:.1f} s) | "
            f"{r.console_avg:.0f} % / {r.console_peak:.0f} % | "
            f"{fmt_mib(r.console_rss_peak_mib)} | {r.chromium_avg:.0f} % | {r.asterisk_avg:.0f} % | "
            f"{r.app_avg:.0f} % |"
        )
    lines.append("")
    lines.append(
        "CPU in % of one core, averaged over the calls' span (peak: the busiest 2-s window). The issue's "
        "bound is the board updated within 1 s of the event."
    )
    for r in runs:
        for note in r.notes:
            lines.append(f"- {r.browsers}×{r.level}: {note}")
    return "\n".join(lines) + "\n"


def fmt_mib(v: float | None) -> str:
    return "–" if v is None else f"{v:.0f} MiB"


def write_section(path: Path, text: str) -> None:
    """Replace this benchmark's section (up to the next ``## ``) or append it; keep everything else."""
    old = path.read_text(encoding="utf-8")
    lines = old.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION), None)
    if start is None:
        path.write_text(old.rstrip("\n") + "\n\n" + text, encoding="utf-8")
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    path.write_text(
        "".join(lines[:start]) + text + ("\n" if end < len(lines) else "") + "".join(lines[end:]),
        encoding="utf-8",
    )


# ----------------------------------------------------------------------------------------------- main


def parse_runs(text: str) -> list[tuple[int, int, int]]:
    """``BROWSERSxCALLS[+STREAMS]``: Chromium sessions, concurrent calls, plain SSE sessions besides."""
    runs = []
    for part in text.split(","):
        try:
            head, _, extra = part.lower().partition("+")
            b, c = head.split("x")
            runs.append((int(b), int(c), int(extra or 0)))
        except ValueError:
            raise SystemExit(f"--runs: {part!r} is not BROWSERSxCALLS[+STREAMS] (e.g. 1x100+19)") from None
        if runs[-1][0] < 1 or runs[-1][1] < 1 or runs[-1][2] < 0:
            raise SystemExit(f"--runs: {part!r}: browsers and calls at least 1, streams at least 0")
    return runs


async def bench(args: argparse.Namespace) -> int:
    from playwright.async_api import async_playwright

    runs_wanted = parse_runs(args.runs)
    cfg = load(args.config, env={})
    workdir = Path(args.workdir or f"/tmp/kasuhara-bench-console-{uuid.uuid4().hex[:8]}")
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"bench_console: work directory {workdir}", flush=True)
    started = time.monotonic()
    sampler, cost = bl.Sampler(), CostSampler()
    sampler.start()
    cost.start()
    app = bl.App(cfg, Path(args.config), workdir, f"console-{uuid.uuid4().hex[:8]}", True, True)
    console = Console(app, Path(args.config), workdir)
    runs: list[Run] = []
    idle: dict[str, Any] = {}
    try:
        sampler.app_pid = await app.start()
        cost.console_pid = await console.start()
        async with async_playwright() as driver:
            browser = await driver.chromium.launch(
                executable_path=CHROMIUM,
                headless=True,
                args=[
                    *CHROMIUM_ARGS,
                    "--disable-background-timer-throttling",
                    "--disable-renderer-backgrounding",
                    "--disable-backgrounding-occluded-windows",
                ],
            )
            pages: list[Any] = []
            most = max(b for b, _, _ in runs_wanted)
            for browsers, level, streams in runs_wanted:
                while len(pages) < browsers:
                    pages.append(await open_board(browser, console.url))
                if most == browsers and not idle:
                    await asyncio.sleep(2.0)
                    c_avg, c_peak, chrome, rss = await idle_phase(cost, args.idle_s)
                    idle = dict(
                        browsers=browsers,
                        console_avg=c_avg,
                        console_peak=c_peak,
                        chromium_avg=chrome,
                        console_rss_mib=rss,
                    )
                    print(f"bench_console: idle with {browsers} sessions: console {c_avg:.1f} %", flush=True)
                active = pages[:browsers]
                for page in active:
                    await page.evaluate(DRAIN_ROWS)
                print(
                    f"bench_console: {browsers} sessions (+{streams} streams) × {level} calls …", flush=True
                )
                sse = [SseSession(console.url) for _ in range(streams)]
                for session in sse:
                    await session.start()
                try:
                    r = await one_run(args, cfg, sampler, cost, workdir, app, active, level)
                finally:
                    for session in sse:
                        await session.stop()
                r.streams = streams
                for session in sse:
                    r.stream_ms += session.delays_ms
                    r.stream_seen.append(len(session.calls))
                runs.append(r)
                print(
                    f"bench_console:   {r.completed}/{r.attempted} calls, "
                    f"appear p99 {pct(r.appear_ms, 99)} ms, max {pct(r.appear_ms, 100)} ms, "
                    f"seen {min(r.seen, default=0)}–{max(r.seen, default=0)}, "
                    f"left {sum(r.left)}, console {r.console_avg:.0f} %",
                    flush=True,
                )
                await asyncio.sleep(args.pause)
            await browser.close()
    finally:
        console.stop()
        sampler.app_pid = None
        app.stop()
        await asyncio.to_thread(app.cleanup)
        sampler.stop()
        cost.stop()
    if console.tracebacks():
        print(f"bench_console: the console logged {console.tracebacks()} traceback(s): see {console.log}")
    meta = {
        "runs": args.runs,
        "call_s": args.call_s,
        "date": datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "revision": bl.revision(),
        "machine": bl.machine(),
        "runtime_s": time.monotonic() - started,
    }
    (workdir / "results.json").write_text(
        json.dumps(
            {"meta": meta, "idle": idle, "runs": [asdict(r) for r in runs]}, indent=1, ensure_ascii=False
        )
    )
    text = section(meta, idle, runs)
    print(text)
    if args.write:
        write_section(REPO / "docs" / "benchmarks.md", text)
        print("bench_console: docs/benchmarks.md updated")
    # A call a session never showed, or a row left after the calls ended, is a defect, not a latency.
    bad = [
        r
        for r in runs
        if sum(r.left)
        or (r.seen and min(r.seen) < r.completed)
        or (r.stream_seen and min(r.stream_seen) < r.completed)
    ]
    return 1 if bad or console.tracebacks() else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--runs",
        default="1x100,1x100+19,20x100",
        help="BROWSERSxCALLS[+STREAMS],… (default 1x100,1x100+19,20x100)",
    )
    ap.add_argument("--waves", type=int, default=2, help="calls per run = waves × level (default 2)")
    ap.add_argument("--call-s", type=float, default=20.0, help="answered time per call (default 20)")
    ap.add_argument("--idle-s", type=float, default=20.0, help="idle phase, sessions open (default 20)")
    ap.add_argument("--drain-timeout", type=float, default=120.0, help="wait for recordings/uploads (s)")
    ap.add_argument("--pause", type=float, default=3.0, help="pause between runs (s)")
    ap.add_argument("--config", default=str(bl.STACK_DIR / "kasuhara.toml"), help="the stack's app config")
    ap.add_argument("--workdir", default="", help="default /tmp/kasuhara-bench-console-<random>")
    ap.add_argument("--write", action="store_true", help="write the section in docs/benchmarks.md")
    args = ap.parse_args()
    sys.exit(asyncio.run(bench(args)))


if __name__ == "__main__":
    main()
