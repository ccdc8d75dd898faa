#!/usr/bin/env python3
"""What proving a FastAGI session's channel through AMI costs (issue 12), against the local stack.

Originates one Local channel that sits in ``Wait()``, then times, N times each:

* ``getvar``: what ``kasuhara agi`` does per call: ``Getvar`` of the proof variable, then ``UNIQUEID``,
  ``CHANNEL(linkedid)``, ``CALLERID(num)`` and ``CALLERID(name)`` at once (4 pipelined ``Getvar``);
* ``status``: one ``Status`` action with ``Variables: KASUHARA_AGI_PROOF`` (uniqueid, linkedid and caller
  ID come with it, as an event list).

Prints the latency (ms) of each and Asterisk's CPU time per proof. Usage (stack up):
``eval "$(scripts/stack env)"; .venv/bin/python scripts/bench_agi_trust.py [-n 500]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from kasuhara_ari.ami import AmiClient
from kasuhara_ari.config import load

STACK = Path(os.environ.get("KASUHARA_STACK_DIR", "/var/cache/kasuhara"))


def asterisk_cpu_s() -> float:
    pid = subprocess.run(["pgrep", "-x", "asterisk"], capture_output=True, text=True).stdout.split()
    if not pid:
        return 0.0
    fields = Path(f"/proc/{pid[0]}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main(n: int) -> None:
    cfg = load(os.environ.get("KASUHARA_CONFIG") or STACK / "kasuhara.toml")
    ami = AmiClient(cfg.ami.host, cfg.ami.port, cfg.ami.username, cfg.ami.secret)
    await ami.wait_ready(10)
    listed = await ami.command("core show channels concise")
    before = set(re.findall(r"Local/echo@kasuhara-in-[0-9a-f]+;1", listed))
    await ami.action(
        {
            "Action": "Originate",
            "Channel": "Local/echo@kasuhara-in",
            "Application": "Wait",
            "Data": "60",
            "Async": "false",
        }
    )
    channel = ""
    for _ in range(50):
        out = await ami.command("core show channels concise")
        # panoramisk hands the output over as the text of a list of lines
        names = re.findall(r"(Local/echo@kasuhara-in-[0-9a-f]+;1)![^']*!Wait!", out)
        if fresh := [name for name in names if name not in before]:
            channel = fresh[0]
            break
        await asyncio.sleep(0.1)
    assert channel, "the Local channel did not appear"
    await ami.action({"Action": "Setvar", "Channel": channel, "Variable": "KASUHARA_AGI_PROOF", "Value": "x"})

    async def getvar(variable: str) -> str:
        return (await ami.action({"Action": "Getvar", "Channel": channel, "Variable": variable})).get(
            "Value", ""
        )

    async def by_getvar() -> None:
        assert await getvar("KASUHARA_AGI_PROOF") == "x"
        await asyncio.gather(
            *(getvar(v) for v in ("UNIQUEID", "CHANNEL(linkedid)", "CALLERID(num)", "CALLERID(name)"))
        )

    async def by_status() -> None:
        manager: Any = ami._manager  # AmiClient.action keeps only the first message of an event list
        resp = await asyncio.wait_for(
            manager.send_action({"Action": "Status", "Channel": channel, "Variables": "KASUHARA_AGI_PROOF"}),
            5,
        )
        status = [m for m in resp if m.get("Event") == "Status"]
        assert status and status[0].get("Linkedid")

    for name, fn in (("getvar (1 + 4 pipelined)", by_getvar), ("status (1 event list)", by_status)):
        for _ in range(20):
            await fn()  # warm up
        cpu0 = asterisk_cpu_s()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            await fn()
            times.append((time.perf_counter() - t) * 1000)
        cpu = asterisk_cpu_s() - cpu0
        times.sort()
        print(
            f"{name:26} n={n} median {statistics.median(times):.2f} ms  p99 {times[int(n * 0.99) - 1]:.2f} ms"
            f"  Asterisk CPU {cpu / n * 1000:.2f} ms/proof"
        )
    await ami.action({"Action": "Hangup", "Channel": channel})
    ami.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=500)
    asyncio.run(main(parser.parse_args().n))
