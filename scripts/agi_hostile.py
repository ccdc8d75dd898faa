#!/usr/bin/env python3
"""Hostile FastAGI clients against ``kasuhara agi``, for tests and benchmarks (issue 12).

Keeps ``--sessions`` connections from ``--source`` going until SIGTERM (or ``--seconds``), each
reconnecting half a second after the server closed it, in three kinds:

* idle: connect and send nothing (held until the server's ``agi.env_timeout_s``);
* forged: a complete environment naming ``--channel`` (a real live channel, if given) with a made-up
  uniqueid, answering every command as a live channel would and the linkedid query with ``--linkedid``;
* oversized: an environment of many short lines, far beyond ``agi.max_env_bytes``.

Prints one summary line (connections made, refused at once, commands received) at the end.
Usage: ``scripts/agi_hostile.py --port 4573 --source 127.0.0.2 --sessions 200 [--seconds 30]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal


class Counts:
    def __init__(self) -> None:
        self.connections = 0
        self.closed_at_once = 0
        self.commands = 0
        self.errors = 0


def environment(channel: str, uniqueid: str) -> bytes:
    env = {
        "agi_network": "yes",
        "agi_network_script": "kasuhara",
        "agi_request": "agi://127.0.0.1/kasuhara",
        "agi_channel": channel,
        "agi_uniqueid": uniqueid,
        "agi_callerid": "0120999999",
        "agi_calleridname": "Hostile\x1b[2J",
        "agi_extension": "4999",
    }
    return "".join(f"{k}: {v}\n" for k, v in env.items()).encode() + b"\n"


def answer(cmd: str, linkedid: str) -> bytes:
    if cmd == "GET VARIABLE CHANNEL(linkedid)":
        return f"200 result=1 ({linkedid})\n".encode()
    if cmd.startswith("GET VARIABLE"):
        return b"200 result=0\n"
    if cmd.startswith("STREAM FILE"):
        return b"200 result=0 endpos=46400\n"
    return b"200 result=1\n" if cmd.startswith("SET") else b"200 result=0\n"


async def one(kind: int, i: int, n: int, args: argparse.Namespace, counts: Counts) -> None:
    reader, writer = await asyncio.open_connection(args.host, args.port, local_addr=(args.source, 0))
    counts.connections += 1
    try:
        if kind == 1:
            writer.write(environment(args.channel, f"{args.linkedid}{i}{n}"))
        elif kind == 2:
            writer.write(b"".join(b"agi_arg_%d: %s\n" % (k, b"x" * 100) for k in range(1, 250)) + b"\n")
        while line := await asyncio.wait_for(reader.readline(), 30):
            counts.commands += 1
            writer.write(answer(line.decode(errors="replace").rstrip("\n"), args.linkedid))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def session_loop(i: int, args: argparse.Namespace, counts: Counts, stop: asyncio.Event) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            await one(i % 3, i, n, args, counts)
        except (ConnectionError, OSError, TimeoutError):
            counts.errors += 1
        if loop.time() - start < 0.1:
            counts.closed_at_once += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


async def main(args: argparse.Namespace) -> None:
    counts = Counts()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.seconds:
        loop.call_later(args.seconds, stop.set)
    tasks = [asyncio.create_task(session_loop(i, args, counts, stop)) for i in range(args.sessions)]
    print("hostile: started", flush=True)
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(
        f"hostile: connections={counts.connections} closed_within_100ms={counts.closed_at_once} "
        f"commands_received={counts.commands} errors={counts.errors}",
        flush=True,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4573)
    parser.add_argument("--source", default="127.0.0.2", help="local address to connect from (the peer)")
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=0.0)
    parser.add_argument("--channel", default="PJSIP/caller-00000001")
    parser.add_argument("--linkedid", default="1700000000.1")
    asyncio.run(main(parser.parse_args()))
