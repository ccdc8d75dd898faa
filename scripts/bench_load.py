#!/usr/bin/env python3
"""Benchmark: SIP load through the app (``Stasis``, 5XXX) against the plain-dialplan baseline (6XXX).

For each concurrency level (default 10, 50, 100, 200) the same SIPp load runs twice, baseline first:

- ``baseline``: ``kasuhara-in`` 6XXX: Answer, MixMonitor, Playback of the notice, Dial the agent (dialplan);
- ``app``: ``kasuhara-in`` 5XXX: ``Stasis(<app>,inbound,PJSIP/agent/…)`` handled by a fresh ``kasuhara serve``
  subprocess with everything on (AMI MixMonitor, MQTT events, upload to S3) and its own Stasis app name,
  spool directory, bucket and topic prefix, so nothing it does touches other users of the shared stack.

A level places ``waves × level`` calls (default 2 ×), at most ``level`` at once, ramped at ``--rate`` calls
per second (default level / 10, at least 5): full concurrency is held for about one call length. The caller
(SIPp UAC, ``tests/sipp/uac.xml``) talks ``--call-s`` seconds after the answer, then hangs up; the agent
(SIPp UAS) answers after 300 ms of ringing. Each caller carries its call number in the From display name
(``"kb<N>"``), which Asterisk passes on to the agent's INVITE (and the app into its metadata), so every
measurement is paired per call.

Measured per level and flow:

- calls attempted / completed (the caller got 200 OK, the agent's phone rang, the caller talked the full
  ``--call-s`` and hung up itself) / failed;
- setup latency INVITE → 200 OK, and answer (200 OK at the caller) → INVITE at the agent, p50/p99, from the
  SIPp message logs (µs timestamps, one host clock). The answer → agent time includes the ~5.8 s notice in
  both flows, so app − baseline is what the app adds;
- CPU from ``/proc/<pid>/stat`` sampled every 0.5 s: Asterisk (the chroot's process), the app (its
  event-loop thread and its worker threads: S3 upload, hashing, file I/O), moto's S3 server and mosquitto
  (shared: other users' load counts too), and the rest of the box;
- the app's RSS over time (idle before the calls, peak, after the drain, slope against active calls);
- recordings: for every completed call the WAV must exist, have a final header and last the call's
  answered time (200 OK → BYE at the caller) ± 0.5 s. Baseline WAVs are read in the spool (the dialplan
  names them after extension and caller name: no AMI listener, whose event traffic would load Asterisk in
  both flows and flatter the app's CPU ratio), then deleted; the app's are read back from its bucket once
  the uploader stored them: the uploader deletes the local files, and the stored object is what the
  product keeps.

The run stops after the first level at which the baseline itself fails calls. Results are printed, saved
as JSON in the work directory and, with ``--write``, replace the "Load" section of ``docs/benchmarks.md``.

    .venv/bin/python scripts/bench_load.py [--levels 10,50,100,200] [--call-s 20] [--write]
    .venv/bin/python scripts/bench_load.py --levels 10 --profile      # + py-spy profile of the app
    git worktree add /tmp/kasuhara-old <commit>                        # an older version of the app ...
    .venv/bin/python scripts/bench_load.py --flows app --app-src /tmp/kasuhara-old   # ... on the same box

Needs the local stack (``scripts/stack up``), root (SIPp RTP) and SIPp; ``--profile`` needs ``py-spy`` in
the venv. Restarts nothing it did not start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from kasuhara_ari.config import Config, load  # noqa: E402

from sip import SIPP_DIR, Phone, agent_port, answering, caller  # noqa: E402

STACK_DIR = Path(os.environ.get("KASUHARA_STACK_DIR", "/var/cache/kasuhara"))
TICK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
SAMPLE_S = 0.5
RING_MS = 300
TOLERANCE_S = 0.5
DOC = REPO / "docs" / "benchmarks.md"


# ------------------------------------------------------------------------------------------------- /proc


def proc_ticks(pid: int, tid: int | None = None) -> int | None:
    """utime + stime of a process (all its threads, living and dead) or of one thread, in clock ticks."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    rest = text[text.rfind(")") + 2 :].split()
    return int(rest[11]) + int(rest[12])


def proc_rss_kib(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB
    except (OSError, IndexError, ValueError):
        return None


def box_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


def pid_from_file(name: str, must_contain: str) -> int | None:
    try:
        pid = int((STACK_DIR / "run" / name).read_text().strip())
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):
        return None
    return pid if must_contain in cmd else None


@dataclass
class Sample:
    t: float
    asterisk: int | None
    app: int | None
    app_main: int | None
    app_rss: int | None
    moto: int | None
    mqtt: int | None
    sipp: int
    box_busy: int
    box_total: int


class Sampler:
    """Samples CPU ticks and the app's RSS every 0.5 s in a thread (cheap: a few /proc reads)."""

    def __init__(self) -> None:
        self.samples: list[Sample] = []
        self.app_pid: int | None = None
        self.sipp_pids: set[int] = set()
        self._dead_sipp = 0
        self._last_sipp: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _sipp_ticks(self) -> int:
        """Our SIPp processes' CPU ticks; a process that exited keeps counting with its last reading."""
        living = 0
        for pid in list(self.sipp_pids):
            ticks = proc_ticks(pid)
            if ticks is None:
                self._dead_sipp += self._last_sipp.pop(pid, 0)
                self.sipp_pids.discard(pid)
            else:
                self._last_sipp[pid] = ticks
                living += ticks
        return self._dead_sipp + living

    def _loop(self) -> None:
        while not self._stop.is_set():
            ast = pid_from_file("asterisk.pid", "asterisk")
            moto = pid_from_file("s3.pid", "moto")
            mqtt = pid_from_file("mqtt.pid", "mosquitto")
            app = self.app_pid
            busy, total = box_ticks()
            self.samples.append(
                Sample(
                    t=time.time(),
                    asterisk=proc_ticks(ast) if ast else None,
                    app=proc_ticks(app) if app else None,
                    app_main=proc_ticks(app, app) if app else None,
                    app_rss=proc_rss_kib(app) if app else None,
                    moto=proc_ticks(moto) if moto else None,
                    mqtt=proc_ticks(mqtt) if mqtt else None,
                    sipp=self._sipp_ticks(),
                    box_busy=busy,
                    box_total=total,
                )
            )
            self._stop.wait(SAMPLE_S)

    def window(self, t0: float, t1: float) -> list[Sample]:
        return [s for s in self.samples if t0 <= s.t <= t1]


def cpu_seconds(samples: list[Sample], attr: str) -> float:
    """CPU seconds of one process over the samples (0 if it was not there throughout)."""
    vals = [getattr(s, attr) for s in samples]
    if len(vals) < 2 or vals[0] is None or vals[-1] is None:
        return 0.0
    return float(vals[-1] - vals[0]) / TICK


def cpu_percent(samples: list[Sample], attr: str) -> tuple[float, float]:
    """(average, peak of 2-s windows) in % of one core."""
    if len(samples) < 2:
        return 0.0, 0.0
    span = samples[-1].t - samples[0].t
    avg = 100.0 * cpu_seconds(samples, attr) / span if span > 0 else 0.0
    peak = 0.0
    step = max(1, int(2.0 / SAMPLE_S))
    for i in range(0, len(samples) - step):
        a, b = samples[i], samples[i + step]
        va, vb = getattr(a, attr), getattr(b, attr)
        if va is not None and vb is not None and b.t > a.t:
            peak = max(peak, 100.0 * (vb - va) / TICK / (b.t - a.t))
    return avg, peak


# -------------------------------------------------------------------------------------------- SIPp logs

_BLOCK = re.compile(r"^-{10,} (\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d+)\s*$", re.MULTILINE)


def sip_messages(path: Path) -> list[tuple[float, bool, str, dict[str, str]]]:
    """(epoch time, sent?, first line, headers) for each message in a SIPp ``-trace_msg`` log."""
    if not path.exists():
        return []
    text = path.read_text(errors="replace")
    parts = _BLOCK.split(text)
    out = []
    for stamp, body in zip(parts[1::2], parts[2::2], strict=False):
        t = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp()  # local time, like SIPp
        lines = [ln.strip() for ln in body.strip().splitlines()]
        if not lines:
            continue
        sent = lines[0].startswith("UDP message sent")
        msg = [ln for ln in lines[1:] if ln]
        if not msg:
            continue
        headers: dict[str, str] = {}
        for ln in msg[1:]:
            name, sep, value = ln.partition(":")
            if sep and name and " " not in name:
                headers.setdefault(name.lower(), value.strip())
        out.append((t, sent, msg[0], headers))
    return out


@dataclass
class CallTimes:
    invite: float | None = None
    answer: float | None = None
    end: float | None = None
    hung_up_by_caller: bool = False
    bye_ok: bool = False
    error: str = ""
    agent_invite: float | None = None

    @property
    def talk_s(self) -> float | None:
        return self.end - self.answer if self.end is not None and self.answer is not None else None


def call_times(caller_log: Path, agent_log: Path) -> dict[int, CallTimes]:
    """Per call number: the caller's INVITE, 200 OK and end, and the INVITE's arrival at the agent."""
    calls: dict[int, CallTimes] = {}
    for t, sent, first, hdr in sip_messages(caller_log):
        m = re.match(r"(\d+)-", hdr.get("call-id", ""))
        if not m:
            continue
        c = calls.setdefault(int(m.group(1)), CallTimes())
        cseq = hdr.get("cseq", "")
        if sent and first.startswith("INVITE ") and c.invite is None:
            c.invite = t
        elif sent and first.startswith("BYE ") and c.end is None:
            c.end, c.hung_up_by_caller = t, True
        elif not sent and first.startswith("BYE ") and c.end is None:
            c.end = t
        elif not sent and first.startswith("SIP/2.0 "):
            code = first.split()[1]
            if cseq.endswith("INVITE") and code == "200" and c.answer is None:
                c.answer = t
            elif cseq.endswith("BYE") and code == "200":
                c.bye_ok = True
            elif code[0] in "3456" and not c.error:
                c.error = first
    for t, sent, first, hdr in sip_messages(agent_log):
        if sent or not first.startswith("INVITE "):
            continue
        m = re.match(r'"kb(\d+)"', hdr.get("from", ""))
        if m and int(m.group(1)) in calls and calls[int(m.group(1))].agent_invite is None:
            calls[int(m.group(1))].agent_invite = t
    return calls


def completed(c: CallTimes) -> bool:
    return bool(c.answer and c.agent_invite and c.hung_up_by_caller and c.bye_ok and not c.error)


def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def active_at(calls: dict[int, CallTimes], t: float) -> int:
    return sum(1 for c in calls.values() if c.answer and c.answer <= t and (c.end is None or c.end > t))


# ------------------------------------------------------------------------------------------------ WAVs


@dataclass
class WavInfo:
    duration_s: float
    final: bool


def wav_info(head: bytes, size: int) -> WavInfo | None:
    """Duration from the header's data size and byte rate; ``final`` when the sizes match the file."""
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    riff = int.from_bytes(head[4:8], "little")
    pos, byte_rate, data_size, data_at = 12, 0, None, 0
    while pos + 8 <= len(head):
        cid, n = head[pos : pos + 4], int.from_bytes(head[pos + 4 : pos + 8], "little")
        if cid == b"fmt ":
            byte_rate = int.from_bytes(head[pos + 16 : pos + 20], "little")
        elif cid == b"data":
            data_size, data_at = n, pos + 8
            break
        pos += 8 + n + (n & 1)
    if not byte_rate or data_size is None:
        return None
    return WavInfo(data_size / byte_rate, riff == size - 8 and data_size == size - data_at)


def local_wav(path: Path) -> WavInfo | None:
    try:
        with path.open("rb") as fh:
            head = fh.read(4096)
        return wav_info(head, path.stat().st_size)
    except OSError:
        return None


# ------------------------------------------------------------------------------------------------- app


class App:
    """``kasuhara serve`` as a subprocess with its own app name, spool, bucket and topic prefix."""

    def __init__(
        self,
        cfg: Config,
        config_path: Path,
        workdir: Path,
        tag: str,
        storage: bool,
        mqtt: bool,
        source: Path = REPO,
    ) -> None:
        self.source = source
        self.name = f"kasuhara-bench-{tag}"
        self.bucket = self.name
        self.asterisk_dir = f"/var/spool/asterisk/monitor/kasuhara-bench-{tag}"
        chroot = str(cfg.recording.host_dir)[: -len(cfg.recording.asterisk_dir)]
        self.spool = Path(chroot + self.asterisk_dir)
        self.storage, self.mqtt = storage, mqtt
        self.cfg = replace(
            cfg,
            ari=replace(cfg.ari, app=self.name),
            storage=replace(cfg.storage, bucket=self.bucket, enabled=storage),
            recording=replace(cfg.recording, asterisk_dir=self.asterisk_dir, local_dir=str(self.spool)),
        )
        self.config_path = config_path
        self.log = workdir / f"serve-{tag}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.profiler: subprocess.Popen[bytes] | None = None

    async def start(self) -> int:
        self.spool.mkdir(parents=True, exist_ok=True)
        if self.storage:
            s3 = s3_client(self.cfg)
            if not s3.bucket_exists(self.bucket):
                s3.make_bucket(self.bucket, object_lock=True)
        env = dict(os.environ)
        env.update(
            {
                "KASUHARA_ARI__APP": self.name,
                "KASUHARA_MQTT__ENABLED": str(self.mqtt).lower(),
                "KASUHARA_MQTT__TOPIC_PREFIX": self.name,
                "KASUHARA_STORAGE__ENABLED": str(self.storage).lower(),
                "KASUHARA_STORAGE__BUCKET": self.bucket,
                "KASUHARA_RECORDING__ASTERISK_DIR": self.asterisk_dir,
                "KASUHARA_RECORDING__LOCAL_DIR": str(self.spool),
            }
        )
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kasuhara_ari.cli", "serve", "--config", str(self.config_path)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.source,  # python -m finds the package of this checkout first
            )
        import httpx

        ari = self.cfg.ari
        deadline = time.monotonic() + 20
        async with httpx.AsyncClient(auth=(ari.username, ari.password), timeout=3) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"kasuhara serve exited: {self.log.read_text()[-2000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"{ari.url}/ari/applications/{self.name}")).status_code == 200:
                        await asyncio.sleep(1.0)  # AMI login, uploader start
                        return self.proc.pid
                await asyncio.sleep(0.2)
        raise RuntimeError("kasuhara serve did not register its Stasis app within 20 s")

    def start_profiler(self, out: Path, rate: int = 100) -> None:
        assert self.proc is not None
        spy = Path(sys.executable).with_name("py-spy")
        if not spy.exists():
            raise SystemExit(f"--profile needs py-spy: {Path(sys.executable).parent}/pip install py-spy")
        self.profiler = subprocess.Popen(
            [
                str(spy),
                "record",
                "-p",
                str(self.proc.pid),
                "-r",
                str(rate),
                "--gil",
                "-o",
                str(out),
                "-f",
                "raw",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop_profiler(self) -> None:
        if self.profiler is not None:
            self.profiler.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.profiler.wait(30)
            self.profiler = None

    def stop(self) -> None:
        self.stop_profiler()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log_counts(self) -> dict[str, int]:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return {lvl: len(re.findall(rf" {lvl} ", text)) for lvl in ("WARNING", "ERROR")}

    def cleanup(self) -> None:
        shutil.rmtree(self.spool, ignore_errors=True)
        if self.storage:
            purge_bucket(self.cfg, self.bucket)


#: Where the app's CPU goes, by the first rule whose marker appears in a sampled stack.
PROFILE_CATEGORIES = (
    ("imports (first use of a module)", ("importlib",)),
    ("logging", ("logging/__init__.py", "(logging/")),
    ("ARI REST requests (httpx)", ("AriClient.request",)),
    ("ARI events (websocket, JSON, dispatch)", ("AriClient.events", "StasisApp.", "websockets/")),
    ("AMI (panoramisk: actions and events)", ("panoramisk/",)),
    ("upload (uploader, S3 client, hashing)", ("uploader.py", "storage.py", "minio/", "urllib3/")),
    ("caller rules (callers.py)", ("callers.py",)),
    ("MQTT events", ("aiomqtt/", "paho/", "MqttEvents")),
    ("call logic (call.py, stasis.py, escalation.py)", ("call.py", "stasis.py", "escalation.py")),
)


def profile_summary(path: Path, top: int = 15, rate: int = 100) -> str:
    """A py-spy ``raw`` profile (collapsed stacks, GIL holder only) by category, then the hottest code."""
    own: dict[str, int] = {}
    cats: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + n
        cat = next(
            (name for name, marks in PROFILE_CATEGORIES if any(m in stack for m in marks)),
            "event loop, other",
        )
        cats[cat] = cats.get(cat, 0) + n
    if not total:
        return f"{path.name}: no samples"
    cpu_s = total / rate
    out = [f"{path.name}: {total} samples at {rate} Hz of the thread holding the GIL ≈ {cpu_s:.1f} CPU-s"]
    out += [f"  {100 * n / total:5.1f} %  {c}" for c, n in sorted(cats.items(), key=lambda x: -x[1])]
    out.append("  hottest functions (self):")
    out += [f"  {100 * n / total:5.1f} %  {f}" for f, n in sorted(own.items(), key=lambda x: -x[1])[:top]]
    return "\n".join(out)


def s3_client(cfg: Config) -> Any:
    from minio import Minio

    st = cfg.storage
    return Minio(
        st.endpoint, access_key=st.access_key, secret_key=st.secret_key, secure=st.secure, region=st.region
    )


def s3_sse(cfg: Config) -> Any:
    if not cfg.storage.sse_c_key:
        return None
    import base64

    from minio.sse import SseCustomerKey

    return SseCustomerKey(base64.b64decode(cfg.storage.sse_c_key))


def purge_bucket(cfg: Config, bucket: str) -> None:
    from minio.deleteobjects import DeleteObject

    s3 = s3_client(cfg)
    with contextlib.suppress(Exception):
        objs = list(s3.list_objects(bucket, recursive=True, include_version=True))
        list(s3.remove_objects(bucket, [DeleteObject(o.object_name, o.version_id) for o in objs]))
        s3.remove_bucket(bucket)


def stored_recordings(app: App) -> dict[str, tuple[WavInfo | None, dict[str, Any]]]:
    """The app's recordings as stored in its bucket, by caller name: (audio header info, metadata)."""
    s3, sse = s3_client(app.cfg), s3_sse(app.cfg)
    out: dict[str, tuple[WavInfo | None, dict[str, Any]]] = {}
    for obj in s3.list_objects(app.bucket, prefix="recordings/", recursive=True):
        if not obj.object_name.endswith(".json"):
            continue
        resp = s3.get_object(app.bucket, obj.object_name, ssec=sse)
        try:
            meta = json.loads(resp.read())
        finally:
            resp.close()
            resp.release_conn()
        info = None
        audio = meta.get("audio") or {}
        if audio.get("key"):
            stat = s3.stat_object(app.bucket, audio["key"], ssec=sse)
            resp = s3.get_object(app.bucket, audio["key"], offset=0, length=4096, ssec=sse)
            try:
                info = wav_info(resp.read(), stat.size)
            finally:
                resp.close()
                resp.release_conn()
        out[(meta.get("caller") or {}).get("name", "")] = (info, meta)
    return out


# ------------------------------------------------------------------------------------------------- runs


@dataclass
class RunResult:
    level: int
    flow: str
    attempted: int
    completed: int
    failed: int
    sipp_failed: int
    setup_ms: list[float] = field(default_factory=list)
    answer_to_agent_ms: list[float] = field(default_factory=list)
    rec_ok: int = 0
    rec_found: int = 0
    rec_worst_delta_s: float | None = None
    wall_s: float = 0.0
    drain_s: float = 0.0
    asterisk_avg: float = 0.0
    asterisk_peak: float = 0.0
    asterisk_cpu_s: float = 0.0
    app_avg: float = 0.0
    app_cpu_s: float = 0.0
    app_loop_cpu_s: float = 0.0
    app_worker_cpu_s: float = 0.0
    moto_cpu_s: float = 0.0
    mqtt_cpu_s: float = 0.0
    sipp_cpu_s: float = 0.0
    others_avg: float = 0.0
    rss_idle_mib: float | None = None
    rss_peak_mib: float | None = None
    rss_after_mib: float | None = None
    rss_kib_per_call: float | None = None
    rss_plateau_drift_mib: float | None = None
    app_log: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def p(self, name: str, q: float) -> float | None:
        return pct(getattr(self, name), q)


def sipp_failed(phone: Phone) -> int:
    """SIPp's own failed-call count (last row of its -trace_stat CSV)."""
    try:
        rows = [r.split(";") for r in phone.stats.read_text().splitlines() if r.strip()]
        col = rows[0].index("FailedCall(C)")
        return int(rows[-1][col])
    except (OSError, ValueError, IndexError):
        return -1


async def run_level(
    args: argparse.Namespace,
    cfg: Config,
    sampler: Sampler,
    workdir: Path,
    level: int,
    flow: str,
    app: App | None,
) -> RunResult:
    calls_n = args.waves * level
    rate = args.rate or max(5, math.ceil(level / 10))
    port = agent_port()
    exten = ("5" if flow == "app" else "6") + str(port)[1:]
    tag = f"{flow}-{level}"
    agent = answering(workdir, port, ring_ms=RING_MS, hold_ms=0, calls=calls_n, name=f"agent-{tag}")
    # The ramp, or (many waves) the concurrency cap: each call holds a slot for the notice + talk time.
    timeout_s = int(max(calls_n / rate, calls_n * (args.call_s + 8) / level) + args.call_s + 90)
    phone = caller(
        workdir,
        exten,
        call_ms=int(args.call_s * 1000),
        calls=calls_n,
        concurrent=level,
        rate=rate,
        name=f"caller-{tag}",
        app=app.name if app else "kasuhara",
        timeout_s=timeout_s,
    )
    scenario = (SIPP_DIR / "uac.xml").read_text()
    marked = scenario.replace('From: "caller" <sip:', 'From: "kb[call_number]" <sip:')
    assert marked != scenario, "uac.xml changed: update bench_load.py"
    (phone.dir / "uac_bench.xml").write_text(marked)
    phone.args[phone.args.index("uac.xml")] = "uac_bench.xml"

    result = RunResult(level, flow, calls_n, 0, 0, 0)
    rss_before = [s.app_rss for s in sampler.samples[-4:] if s.app_rss]
    await agent.start()
    await asyncio.sleep(0.3)
    t0 = time.time()
    await phone.start()
    for p in (agent, phone):
        if p.proc:
            sampler.sipp_pids.add(p.proc.pid)
    profile = workdir / f"profile-{tag}.txt"
    if app and args.profile:
        app.start_profiler(profile, args.profile_rate)
    try:
        rc = await phone.wait(timeout_s + 30)
    except AssertionError as exc:
        rc = -1
        result.notes.append(str(exc)[:200])
    t_calls = time.time()
    with contextlib.suppress(AssertionError):
        await agent.wait(30)
    await agent.stop()
    result.sipp_failed = sipp_failed(phone) if rc != -1 else calls_n

    calls = call_times(phone.messages, agent.messages)
    result.completed = sum(1 for c in calls.values() if completed(c))
    result.failed = calls_n - result.completed
    result.setup_ms = [1000 * (c.answer - c.invite) for c in calls.values() if c.answer and c.invite]
    result.answer_to_agent_ms = [
        1000 * (c.agent_invite - c.answer) for c in calls.values() if c.agent_invite and c.answer
    ]

    # Drain: recordings closed (baseline) or uploaded (app), then check them against each call's talk time.
    deltas: list[float] = []
    deadline = time.monotonic() + args.drain_timeout
    if app is None:
        host_spool = cfg.recording.host_dir
        wavs: dict[int, Path] = {}
        # The baseline dialplan names each recording after its extension and caller name (kb<N>).
        for path in host_spool.glob(f"baseline-{exten}-kb*-*.wav"):
            n = path.name.split("-")[2][2:]
            if n.isdigit() and int(n) in calls:
                wavs[int(n)] = path
        while time.monotonic() < deadline:
            infos = [local_wav(p) for p in wavs.values()]
            if all(i is not None and i.final for i in infos):
                break
            await asyncio.sleep(0.5)
        t_drained = time.time()
        for n, path in wavs.items():
            info = local_wav(path)
            result.rec_found += path.exists()
            c = calls[n]
            if info and info.final and completed(c) and c.talk_s is not None:
                deltas.append(info.duration_s - c.talk_s)
                result.rec_ok += abs(info.duration_s - c.talk_s) <= TOLERANCE_S
        if not args.keep:
            for path in wavs.values():
                path.unlink(missing_ok=True)
    else:
        while time.monotonic() < deadline and app.storage:
            left = [p for p in app.spool.iterdir() if p.suffix in (".wav", ".json", ".done")]
            if not left:
                break
            await asyncio.sleep(0.5)
        t_drained = time.time()
        if app.storage:
            stored = await asyncio.to_thread(stored_recordings, app)
        else:  # storage off: read the spool
            stored = {}
            for meta_path in app.spool.glob("*.json"):
                meta = json.loads(meta_path.read_text())
                stored[(meta.get("caller") or {}).get("name", "")] = (
                    local_wav(meta_path.with_suffix(".wav")),
                    meta,
                )
        for n, c in calls.items():
            info, _meta = stored.get(f"kb{n}", (None, {}))
            result.rec_found += info is not None
            if info and info.final and completed(c) and c.talk_s is not None:
                deltas.append(info.duration_s - c.talk_s)
                result.rec_ok += abs(info.duration_s - c.talk_s) <= TOLERANCE_S
        app.stop_profiler()
        if args.profile and profile.exists():
            summary = profile_summary(profile, top=40, rate=args.profile_rate)
            (workdir / f"profile-{tag}-summary.txt").write_text(summary)
            print(profile_summary(profile, rate=args.profile_rate), flush=True)
    if deltas:
        result.rec_worst_delta_s = max(deltas, key=abs)

    await asyncio.sleep(1.0)
    during = sampler.window(t0, t_calls)
    whole = sampler.window(t0, t_drained + 0.6)
    result.wall_s, result.drain_s = t_calls - t0, t_drained - t_calls
    result.asterisk_avg, result.asterisk_peak = cpu_percent(during, "asterisk")
    result.asterisk_cpu_s = cpu_seconds(whole, "asterisk")
    result.moto_cpu_s = cpu_seconds(whole, "moto")
    result.mqtt_cpu_s = cpu_seconds(whole, "mqtt")
    result.sipp_cpu_s = cpu_seconds(whole, "sipp")
    if len(during) >= 2:
        span = during[-1].t - during[0].t
        box = (during[-1].box_busy - during[0].box_busy) / TICK
        ours = sum(cpu_seconds(during, a) for a in ("asterisk", "app", "moto", "mqtt", "sipp"))
        result.others_avg = max(0.0, 100.0 * (box - ours) / span) if span > 0 else 0.0
    if app is not None:
        result.app_avg = cpu_percent(during, "app")[0]
        result.app_cpu_s = cpu_seconds(whole, "app")
        result.app_loop_cpu_s = cpu_seconds(whole, "app_main")
        result.app_worker_cpu_s = result.app_cpu_s - result.app_loop_cpu_s
        rss = [(s.t, s.app_rss) for s in whole if s.app_rss]
        if rss:
            result.rss_peak_mib = max(r for _, r in rss) / 1024
            result.rss_after_mib = rss[-1][1] / 1024
        if rss_before:
            result.rss_idle_mib = min(rss_before) / 1024
        # What the level's calls added on top of the idle process, per concurrent call.
        if result.rss_peak_mib is not None and result.rss_idle_mib is not None:
            result.rss_kib_per_call = 1024 * (result.rss_peak_mib - result.rss_idle_mib) / level
        # Drift while concurrency is held at the level: RSS at the end of the plateau minus at its start.
        plateau = [(s.t, s.app_rss) for s in during if s.app_rss and active_at(calls, s.t) >= 0.9 * level]
        if len(plateau) >= 2:
            result.rss_plateau_drift_mib = (plateau[-1][1] - plateau[0][1]) / 1024
        result.app_log = app.log_counts()
    if rc not in (0, 1):
        result.notes.append(f"caller SIPp exit {rc}")
    return result


# ------------------------------------------------------------------------------------------------ report


def fmt(v: float | None, spec: str = ".0f") -> str:
    return "–" if v is None else format(v, spec)


def ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}×"


def delta(a: float | None, b: float | None, unit: str = " ms") -> str:
    return "–" if a is None or b is None else f"{a - b:+.0f}{unit}"


def table(results: list[RunResult]) -> str:
    head = (
        "| level | flow | calls ok / attempted (failed) | INVITE→200 ms p50 / p99 | answer→agent INVITE ms "
        "p50 / p99 | Asterisk CPU avg / peak | app CPU avg | app CPU ÷ Asterisk CPU | app RSS peak "
        "| recordings ok | worst Δ s |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    by_level: dict[int, dict[str, RunResult]] = {}
    for r in results:
        by_level.setdefault(r.level, {})[r.flow] = r
    for level, flows in by_level.items():
        for r in flows.values():
            is_app = r.flow == "app"
            rows.append(
                f"| {level} | {r.flow} | {r.completed} / {r.attempted} ({r.failed}) "
                f"| {fmt(r.p('setup_ms', 50), '.1f')} / {fmt(r.p('setup_ms', 99), '.1f')} "
                f"| {fmt(r.p('answer_to_agent_ms', 50))} / {fmt(r.p('answer_to_agent_ms', 99))} "
                f"| {r.asterisk_avg:.0f} % / {r.asterisk_peak:.0f} % "
                f"| {f'{r.app_avg:.1f} %' if is_app else '–'} "
                f"| {ratio(r.app_cpu_s, r.asterisk_cpu_s) if is_app else '–'} "
                f"| {fmt(r.rss_peak_mib, '.0f') + ' MiB' if is_app and r.rss_peak_mib else '–'} "
                f"| {r.rec_ok}/{r.attempted} | {fmt(r.rec_worst_delta_s, '+.2f')} |"
            )
        b, a = flows.get("baseline"), flows.get("app")
        if a and b:
            rows.append(
                f"| {level} | **app ÷ baseline** | {ratio(a.completed, b.completed)} "
                f"| {delta(a.p('setup_ms', 50), b.p('setup_ms', 50))} / "
                f"{delta(a.p('setup_ms', 99), b.p('setup_ms', 99))} "
                f"| {delta(a.p('answer_to_agent_ms', 50), b.p('answer_to_agent_ms', 50))} / "
                f"{delta(a.p('answer_to_agent_ms', 99), b.p('answer_to_agent_ms', 99))} "
                f"| {ratio(a.asterisk_avg, b.asterisk_avg)} | | | | {ratio(a.rec_ok, b.rec_ok)} | |"
            )
    return head + "\n".join(rows) + "\n"


def detail_table(results: list[RunResult]) -> str:
    head = (
        "| level | flow | calls s + drain s | Asterisk CPU-s | app CPU-s: event loop + workers | moto CPU-s "
        "| mosquitto CPU-s | SIPp CPU-s | others on the box | app RSS idle → peak → after "
        "| RSS per call (peak − idle) ÷ level "
        "| RSS drift at plateau | app log warn/err |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in results:
        is_app = r.flow == "app"
        rows.append(
            f"| {r.level} | {r.flow} | {r.wall_s:.0f} + {r.drain_s:.0f} | {r.asterisk_cpu_s:.1f} "
            f"| {f'{r.app_loop_cpu_s:.1f} + {r.app_worker_cpu_s:.1f}' if is_app else '–'} "
            f"| {r.moto_cpu_s:.1f} | {r.mqtt_cpu_s:.1f} | {r.sipp_cpu_s:.1f} | {r.others_avg:.0f} % "
            + (
                f"| {fmt(r.rss_idle_mib, '.0f')} → {fmt(r.rss_peak_mib, '.0f')} → "
                f"{fmt(r.rss_after_mib, '.0f')} MiB "
                f"| {fmt(r.rss_kib_per_call, '.0f')} KiB | {fmt(r.rss_plateau_drift_mib, '+.1f')} MiB "
                f"| {r.app_log.get('WARNING', 0)}/{r.app_log.get('ERROR', 0)} |"
                if is_app
                else "| – | – | – | – |"
            )
        )
    return head + "\n".join(rows) + "\n"


def targets(results: list[RunResult]) -> list[str]:
    by_level: dict[int, dict[str, RunResult]] = {}
    for r in results:
        by_level.setdefault(r.level, {})[r.flow] = r
    clean = [
        lv
        for lv, f in by_level.items()
        if "baseline" in f and f["baseline"].failed == 0 and f["baseline"].rec_ok == f["baseline"].attempted
    ]
    out = []
    if clean:
        lv = max(clean)
        base, app_run = by_level[lv]["baseline"], by_level[lv].get("app")
        if app_run:
            share_ok = app_run.completed / base.completed if base.completed else 0.0
            out.append(
                f"- completed ≥ 0.98× baseline at the baseline's highest clean level ({lv}: no failed call, "
                f"every recording within ±{TOLERANCE_S} s): {share_ok:.2f}× → "
                f"{'met' if share_ok >= 0.98 else 'MISSED'}"
            )
    else:
        out.append("- no level was clean for the baseline (failed calls or recordings off by > 0.5 s)")
    for lv, f in by_level.items():
        a, b = f.get("app"), f.get("baseline")
        if not (a and b):
            continue
        d1 = (a.p("setup_ms", 99) or 0) - (b.p("setup_ms", 99) or 0)
        d2 = (a.p("answer_to_agent_ms", 99) or 0) - (b.p("answer_to_agent_ms", 99) or 0)
        share = a.app_cpu_s / a.asterisk_cpu_s if a.asterisk_cpu_s else 0.0
        out.append(
            f"- level {lv}: added p99 INVITE→200 {d1:+.1f} ms, answer→agent {d2:+.0f} ms "
            f"({'met' if max(d1, d2) <= 20 else 'MISSED'} ≤ 20 ms); app CPU {100 * share:.1f} % of "
            f"Asterisk's ({'met' if share <= 0.10 else 'MISSED'} ≤ 10 %); RSS "
            f"{fmt(a.rss_kib_per_call, '.0f')} KiB per concurrent call, drift at full concurrency "
            f"{fmt(a.rss_plateau_drift_mib, '+.1f')} MiB"
        )
    return out


def machine() -> str:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in ln
        ),
        platform.processor(),
    )
    mem = next(
        int(ln.split()[1])
        for ln in Path("/proc/meminfo").read_text().splitlines()
        if ln.startswith("MemTotal")
    )
    sipp = subprocess.run(["sipp", "-v"], capture_output=True, text=True).stdout
    sipp_v = re.search(r"v(\d+\.\d+\.\d+)", sipp)
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem / 1024**2:.0f} GiB RAM, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"SIPp {sipp_v.group(1) if sipp_v else '?'}"
    )


def revision(source: Path = REPO) -> str:
    """The commit measured, marked when the work tree had uncommitted changes to the package."""
    git = ["git", "-C", str(source)]
    head = subprocess.run(
        [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "kasuhara_ari"], capture_output=True, text=True)
    return f"{head or '?'}{' + uncommitted changes' if dirty.stdout.strip() else ''}"


def asterisk_version(cfg: Config) -> str:
    import httpx

    with contextlib.suppress(Exception):
        r = httpx.get(
            f"{cfg.ari.url}/ari/asterisk/info", auth=(cfg.ari.username, cfg.ari.password), timeout=3
        )
        return str(r.json()["system"]["version"])
    return "?"


def run_meta(args: argparse.Namespace, cfg: Config, runtime_s: float) -> dict[str, Any]:
    """What the report says about the run besides the numbers (kept in results.json for ``--render``)."""
    shown: list[str] = []
    skip = False
    for arg in args.argv:  # the command to repeat it: without the work directory and the note
        if skip:
            skip = False
        elif arg in ("--workdir", "--note"):
            skip = True
        elif not arg.startswith(("--workdir=", "--note=")):
            shown.append(arg)
    return {
        "command": " ".join([".venv/bin/python scripts/bench_load.py", *shown]),
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "machine": machine(),
        "asterisk": asterisk_version(cfg),
        "revision": revision(args.app_src),
        "runtime_s": runtime_s,
        "note": args.note,
        "waves": args.waves,
        "call_s": args.call_s,
        "rate": args.rate,
        "mqtt": args.mqtt,
        "storage": args.storage,
    }


def section(meta: dict[str, Any], results: list[RunResult]) -> str:
    out = io.StringIO()
    out.write("## Load\n\n")
    out.write(
        f"`{meta['command']}` (runtime {meta['runtime_s'] / 60:.1f} min), run {meta['date']} on: "
        f"{meta['machine']}, Asterisk {meta['asterisk']}, kasuhara-ari {meta['revision']}. SIPp, Asterisk, "
        "the app, moto and mosquitto share the machine.\n\n"
    )
    if meta["note"]:
        out.write(f"**{meta['note']}**\n\n")
    out.write(
        f"Each level: {meta['waves']} × level calls of {meta['call_s']:g} s (answered time), at most `level` "
        f"at once, ramp {meta['rate'] or 'level/10 (≥ 5)'} calls/s; the agent answers after {RING_MS} ms. "
        "*baseline* = extension 6XXX (Answer, MixMonitor, Playback of the notice, Dial: plain dialplan); "
        "*app* = 5XXX through `Stasis(kasuhara,inbound,…)` with a fresh `kasuhara serve` "
        f"(MQTT {'on' if meta['mqtt'] else 'off'}, upload to S3 {'on' if meta['storage'] else 'off'}). "
        "A call is *ok* when the caller was answered, the agent's phone rang, and the caller talked the "
        "full time and hung up. Latencies from the SIPp message logs; *answer→agent INVITE* includes the "
        "~5.8 s notice in both flows, so the app ÷ baseline row shows the milliseconds the app adds. "
        "CPU: % of one core while calls run, sampled from `/proc` every 0.5 s; *app CPU ÷ Asterisk CPU* "
        "compares CPU-seconds over the calls and the drain (upload). *Recordings ok*: WAV present, header "
        f"final, length = the caller's answered time ± {TOLERANCE_S} s (app: read back from the bucket "
        "after upload; baseline: from the spool); *worst Δ* = recording − answered time.\n\n"
    )
    out.write(table(results))
    out.write("\nCPU-seconds per run (calls + drain), the app's split, support processes and memory:\n\n")
    out.write(detail_table(results))
    out.write("\nTargets (reported, not asserted):\n\n" + "\n".join(targets(results)) + "\n")
    stopped = [r for r in results if r.flow == "baseline" and r.failed]
    if stopped:
        out.write(f"\nStopped after level {stopped[0].level}: the baseline itself failed calls there.\n")
    notes = [f"- {r.level} {r.flow}: {n}" for r in results for n in r.notes]
    if notes:
        out.write("\nNotes:\n" + "\n".join(notes) + "\n")
    return out.getvalue()


def write_section(path: Path, text: str) -> None:
    """Replace the ``## Load`` section (up to the next ``## ``) or append it; keep everything else."""
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    lines = old.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == "## Load"), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + text + ("\n" if end < len(lines) else "") + "".join(lines[end:])
    path.write_text(new, encoding="utf-8")


# -------------------------------------------------------------------------------------------------- main


async def bench(args: argparse.Namespace) -> int:
    cfg = load(args.config, env={})
    workdir = Path(args.workdir or f"/tmp/kasuhara-bench-load-{uuid.uuid4().hex[:8]}")
    workdir.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:8]
    print(f"bench_load: work directory {workdir}", flush=True)
    sampler = Sampler()
    sampler.start()
    results: list[RunResult] = []
    started = time.monotonic()
    try:
        for level in args.levels:
            for flow in args.flows:
                app = None
                if flow == "app":
                    app = App(
                        cfg,
                        Path(args.config),
                        workdir,
                        f"{run_id}-{level}",
                        args.storage,
                        args.mqtt,
                        source=args.app_src,
                    )
                    sampler.app_pid = await app.start()
                    await asyncio.sleep(2.0)  # idle RSS samples
                try:
                    print(f"bench_load: level {level} {flow} …", flush=True)
                    r = await run_level(args, cfg, sampler, workdir, level, flow, app)
                finally:
                    if app is not None:
                        sampler.app_pid = None
                        app.stop()
                        if not args.keep:
                            await asyncio.to_thread(app.cleanup)
                results.append(r)
                print(
                    f"bench_load:   {r.completed}/{r.attempted} ok, "
                    f"setup p99 {fmt(r.p('setup_ms', 99), '.1f')} ms, "
                    f"answer→agent p99 {fmt(r.p('answer_to_agent_ms', 99))} ms, "
                    f"Asterisk {r.asterisk_avg:.0f} %, "
                    f"recordings {r.rec_ok}/{r.attempted}",
                    flush=True,
                )
                await asyncio.sleep(args.pause)
            if any(r.level == level and r.flow == "baseline" and r.failed for r in results):
                print(f"bench_load: baseline failed calls at level {level}: stopping", flush=True)
                break
    finally:
        sampler.stop()
    meta = run_meta(args, cfg, time.monotonic() - started)
    (workdir / "results.json").write_text(
        json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=1, ensure_ascii=False)
    )
    report(section(meta, results), args.write)
    print(f"bench_load: raw results {workdir / 'results.json'}")
    return 0


def report(text: str, write: bool) -> None:
    print()
    print(text)
    if write:
        write_section(DOC, text)
        print(f"bench_load: wrote the Load section of {DOC}")


def render(path: Path, write: bool) -> int:
    """The report again from a run's results.json (e.g. after a change to the report's layout)."""
    data = json.loads(path.read_text())
    results = [RunResult(**r) for r in data["results"]]
    report(section(data["meta"], results), write)
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="10,50,100,200", help="concurrency levels (default 10,50,100,200)")
    ap.add_argument("--flows", default="baseline,app", help="which flows to run (profiling: app)")
    ap.add_argument("--waves", type=int, default=2, help="calls per level = waves × level (default 2)")
    ap.add_argument("--call-s", type=float, default=20.0, help="answered time per call (default 20)")
    ap.add_argument("--rate", type=int, default=0, help="calls per second (default level/10, at least 5)")
    ap.add_argument("--config", default=str(STACK_DIR / "kasuhara.toml"), help="the stack's app config")
    ap.add_argument("--no-storage", dest="storage", action="store_false", help="app without S3 upload")
    ap.add_argument("--no-mqtt", dest="mqtt", action="store_false", help="app without MQTT events")
    ap.add_argument("--profile", action="store_true", help="py-spy the app during each app run (work dir)")
    ap.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second (default 100)")
    ap.add_argument("--drain-timeout", type=float, default=120.0, help="wait for recordings/uploads (s)")
    ap.add_argument("--pause", type=float, default=3.0, help="pause between runs (s)")
    ap.add_argument("--workdir", default="", help="default /tmp/kasuhara-bench-load-<random>")
    ap.add_argument("--keep", action="store_true", help="keep recordings and buckets (debugging)")
    ap.add_argument(
        "--app-src",
        type=Path,
        default=REPO,
        help="run `kasuhara serve` from this checkout (e.g. a git worktree of an older commit), to compare"
        " versions in one session",
    )
    ap.add_argument("--note", default="", help="a remark printed above the table (e.g. 'machine shared')")
    ap.add_argument("--write", action="store_true", help="replace the Load section of docs/benchmarks.md")
    ap.add_argument("--render", metavar="RESULTS_JSON", help="only print (and --write) a saved run's report")
    args = ap.parse_args()
    if args.render:
        raise SystemExit(render(Path(args.render), args.write))
    args.argv = sys.argv[1:]
    args.levels = [int(x) for x in args.levels.split(",") if x.strip()]
    args.flows = [f for f in ("baseline", "app") if f in args.flows.split(",")]
    if shutil.which("sipp") is None:
        raise SystemExit("bench_load: sipp not found (Debian package sip-tester)")
    try:
        raise SystemExit(asyncio.run(bench(args)))
    except (OSError, RuntimeError) as exc:
        print(f"bench_load: FAILED: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
