#!/usr/bin/env python3
"""scripts/bench_load.py three times in one session, the app flow only: detection off, signal 1 only
(TALK_DETECT), signals 1 + 2 (also the caller's audio to the app and the loudness detector); then one table
of what each costs Asterisk and the app, and whether every call and recording is as good as with detection
off. The callers stream SIPp's tone (tests/sipp/caller.wav), so no detection fires: this measures the
standing cost of listening, which every call pays.

    .venv/bin/python scripts/bench_detection_load.py [--levels 10,20] [--call-s 20] [--waves 1]

Each variant is a separate ``kasuhara serve`` (bench_load's own), configured through the environment
(KASUHARA_DETECTION__MODE / __LOUDNESS). Needs what bench_load needs (the stack, root, SIPp).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kasuhara_ari.ari import AriClient, AriError  # noqa: E402
from kasuhara_ari.config import load  # noqa: E402

VARIANTS = {
    "off": {"KASUHARA_DETECTION__MODE": "off"},
    "signal 1": {"KASUHARA_DETECTION__MODE": "observe", "KASUHARA_DETECTION__LOUDNESS": "false"},
    "signals 1+2": {"KASUHARA_DETECTION__MODE": "observe", "KASUHARA_DETECTION__LOUDNESS": "true"},
}


async def asterisk_started(modules: tuple[str, ...] = ()) -> str:
    """When the shared Asterisk started (a restart by someone else during a variant spoils it), after
    loading ``modules`` through ARI if they are not (a restart of the shared stack unloads what was loaded
    by hand; the stack's modules.conf loads them)."""
    cfg = load(os.environ.get("KASUHARA_CONFIG") or None)
    async with AriClient(cfg.ari.url, cfg.ari.username, cfg.ari.password, "bench-detection") as ari:
        for module in modules:
            try:
                state = await ari.request("GET", f"/asterisk/modules/{module}")
            except AriError:
                state = None
            if not isinstance(state, dict) or state.get("status") != "Running":
                await ari.request("POST", f"/asterisk/modules/{module}")
        info = await ari.request("GET", "/asterisk/info")
        return str((info.get("status") or {}).get("startup_time", "?"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="10,20")
    ap.add_argument("--call-s", default="20")
    ap.add_argument("--waves", default="1")
    args = ap.parse_args(argv)
    rows = []
    for name, env in VARIANTS.items():
        work = Path(tempfile.mkdtemp(prefix="kasuhara-bench-detection-"))
        cmd = [
            sys.executable,
            str(REPO / "scripts" / "bench_load.py"),
            "--flows",
            "app",
            "--levels",
            args.levels,
            "--call-s",
            args.call_s,
            "--waves",
            args.waves,
            "--workdir",
            str(work),
            "--note",
            f"detection: {name}",
        ]
        print(f"== {name}: {' '.join(f'{k}={v}' for k, v in env.items())}", flush=True)
        before = asyncio.run(asterisk_started(("res_rtp_multicast.so", "chan_rtp.so")))
        subprocess.run(cmd, env={**os.environ, **env}, check=False, cwd=REPO)
        after = asyncio.run(asterisk_started())
        results = json.loads((work / "results.json").read_text())["results"]
        for r in results:
            r["restarted"] = before != after
            rows.append((name, r))
    print()
    print(
        "| calls | detection | completed | recordings ok | Asterisk CPU avg | Asterisk CPU s | app CPU avg "
        "| app CPU s | answer→agent p50 ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in sorted(rows, key=lambda x: (x[1]["level"], list(VARIANTS).index(x[0]))):
        setup = sorted(r["answer_to_agent_ms"])
        p50 = setup[len(setup) // 2] if setup else float("nan")
        print(
            f"| {r['level']} | {name} | {r['completed']}/{r['attempted']} | {r['rec_ok']}/{r['completed']} "
            f"| {r['asterisk_avg']:.1f} % | {r['asterisk_cpu_s']:.1f} | {r['app_avg']:.1f} % "
            f"| {r['app_cpu_s']:.1f} | {p50:.0f} |"
            + (" Asterisk restarted during the run: void |" if r["restarted"] else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
