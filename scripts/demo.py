"""The demo: one real SIP call through the whole flow, on the local stack.

A customer (SIPp) calls in; ``kasuhara serve`` answers, records, plays the notice, rings the agent
(SIPp) and bridges them; the agent presses *1 (flag as harassment) during the call; on hangup the
recording goes to S3 with its metadata and an evidence hold. Prints the call's timeline from MQTT, the
metadata, and where the recording is. The browser console (``kasuhara web``) runs beside it with a
ready admin login; on a terminal it stays up after the call until Ctrl-C.

Run by ``scripts/demo`` (which brings the stack up first).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the SIPp phone driver is shared with the tests

from kasuhara_ari.config import Config, load  # noqa: E402

from sip import agent_port, answering, caller  # noqa: E402

STATE = Path(os.environ.get("KASUHARA_STACK_DIR", "/var/cache/kasuhara"))


def kasuhara(*args: str) -> list[str]:
    return [sys.executable, "-m", "kasuhara_ari.cli", *args]


async def wait_registered(cfg: Config, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(auth=(cfg.ari.username, cfg.ari.password), timeout=3) as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"{cfg.ari.url}/ari/applications/{cfg.ari.app}")).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise SystemExit(f"demo: the app {cfg.ari.app!r} never registered with Asterisk")


def read_events(path: Path) -> list[dict[str, object]]:
    events = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return events


DEMO_USER = "demo-admin"


def console_account(env: dict[str, str]) -> str:
    """A fresh password for the demo's console admin (created on the first run)."""
    password = "demo-" + secrets.token_urlsafe(12)
    for command in (("users", "add", DEMO_USER, "--role", "admin"), ("users", "passwd", DEMO_USER)):
        done = subprocess.run(
            kasuhara(*command, "--password-stdin"),
            env=env,
            input=password + "\n",
            capture_output=True,
            text=True,
        )
        if done.returncode == 0:
            return password
    raise SystemExit(f"demo: could not set up the console account: {done.stderr.strip()}")


async def console_ready(url: str, timeout: float) -> bool:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(url + "healthz")).text == "ok":
                    return True
            await asyncio.sleep(0.2)
    return False


async def console_check(url: str, password: str, call_id: str) -> str:
    """Log in as the demo admin over HTTP and open the board and the call's page: what a browser does."""
    import re

    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=10, headers={"Origin": url.rstrip("/")}) as http:
        page = await http.get("/login")
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        if token is None:
            return "login page without a form"
        done = await http.post(
            "/login", data={"csrf": token.group(1), "username": DEMO_USER, "password": password}
        )
        if done.status_code != 303:
            return f"login answered {done.status_code}"
        board = await http.get("/")
        recording = await http.get(f"/recordings/{call_id}")
        return f"login ok, board {board.status_code}, recording page {recording.status_code}"


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(STATE / "kasuhara.toml"))
    parser.add_argument("--talk-seconds", type=int, default=14)
    parser.add_argument(
        "--stay",
        action=argparse.BooleanOptionalAction,
        default=sys.stdin.isatty(),
        help="keep the console running after the call until Ctrl-C (default: on a terminal)",
    )
    args = parser.parse_args()
    cfg = load(args.config, env={})
    out = STATE / "demo" / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    env = {**os.environ, "KASUHARA_CONFIG": args.config}

    print("demo: preparing the bucket (object lock on, for evidence holds)")
    subprocess.run(
        kasuhara("storage", "init", "--no-policies"), env=env, check=True, stdout=subprocess.DEVNULL
    )

    # The console reads audio and acts for its admins with the [admin] keys; on the local stack's S3 server
    # one key pair serves every role.
    if not (cfg.admin.access_key and cfg.admin.secret_key):
        env["KASUHARA_ADMIN__ACCESS_KEY"] = cfg.storage.access_key
        env["KASUHARA_ADMIN__SECRET_KEY"] = cfg.storage.secret_key
    password = console_account(env)
    url = f"http://{cfg.web.bind}:{cfg.web.port}/"
    web_log = (out / "web.log").open("w")
    web = subprocess.Popen(kasuhara("web"), env=env, stdout=web_log, stderr=subprocess.STDOUT)

    serve_log = (out / "serve.log").open("w")
    events_file = (out / "events.jsonl").open("w")
    serve = subprocess.Popen(kasuhara("serve"), env=env, stdout=serve_log, stderr=subprocess.STDOUT)
    monitor = subprocess.Popen(
        kasuhara("monitor", "--json"), env=env, stdout=events_file, stderr=subprocess.DEVNULL
    )
    phones = []
    try:
        await wait_registered(cfg, 20)
        port = agent_port()
        print(f"demo: agent phone (SIPp) on 127.0.0.1:{port}; customer (SIPp) calls extension {port}")
        agent = await answering(out, port, ring_ms=1000, dtmf=[(3000, "*1")]).start()
        customer = await caller(out, port, call_ms=args.talk_seconds * 1000).start()
        phones = [agent, customer]
        try:
            rc = await customer.wait(args.talk_seconds + 60)
            await agent.wait(20)
        except AssertionError as exc:
            print(f"demo: FAILED: a phone did not finish: {exc}; see {out}")
            web.terminate()
            return 1
        print(f"demo: the customer hung up after {args.talk_seconds} s of call (SIPp exit {rc})")

        # This run's call is the one that rang our agent's port (the spool may hold older recordings).
        deadline = time.monotonic() + 60
        stored = None
        while time.monotonic() < deadline and stored is None:
            await asyncio.sleep(0.3)
            events = read_events(out / "events.jsonl")
            ours = {
                e.get("call_id")
                for e in events
                if e.get("event") == "started" and str(e.get("target", "")).endswith(f"@127.0.0.1:{port}")
            }
            stored = next(
                (e for e in events if e.get("event") == "recording_stored" and e.get("call_id") in ours), None
            )
        if stored is None:
            print("demo: FAILED: no recording_stored event within 60 s; see", out / "serve.log")
            web.terminate()
            return 1
    except BaseException:
        web.terminate()
        raise
    finally:
        for phone in phones:
            await phone.stop()
        serve.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            serve.wait(10)
        await asyncio.sleep(0.5)
        monitor.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            monitor.wait(5)

    call_id = str(stored["call_id"])
    timeline = [e for e in read_events(out / "events.jsonl") if e.get("call_id") == call_id]
    t0 = datetime.fromisoformat(str(timeline[0]["at"]))
    print(f"\nCall {call_id}: what happened (MQTT events on {cfg.mqtt.topic_prefix}/calls/{call_id}/...)")
    for e in timeline:
        offset = (datetime.fromisoformat(str(e["at"])) - t0).total_seconds()
        extra = {k: v for k, v in e.items() if k not in {"schema", "event", "at", "call_id", "seq"}}
        print(f"  +{offset:6.2f}s  {e['event']:<22} {json.dumps(extra, ensure_ascii=False)[:90]}")

    show = subprocess.run(
        kasuhara("recordings", "show", call_id, "--json"), env=env, capture_output=True, text=True
    )
    print("\nWhere the recording is:")
    print(
        f"  s3://{cfg.storage.bucket}/{stored.get('key')}\n"
        f"  {stored.get('bytes')} bytes, sha256 {stored.get('sha256')}"
    )
    if show.returncode == 0:
        meta = json.loads(show.stdout)
        meta = meta.get("metadata", meta)
        print(
            f"  metadata: notice_played={meta.get('notice_played')} duration_s={meta.get('duration_s')} "
            f"agent={meta.get('agent')} flags={meta.get('flags')} hold={'yes' if meta.get('hold') else 'no'}"
        )
    print(f"  download (admin credentials): kasuhara recordings download {call_id}")

    print("\nThe console (kasuhara web):")
    if web.poll() is None and await console_ready(url, 20):
        print(f"  {url}   login: {DEMO_USER} / {password}")
        print(f"  this call: {url}recordings/{call_id}")
        print(f"  checked over HTTP: {await console_check(url, password, call_id)}")
    else:
        print(f"  did not start (port {cfg.web.port} taken?); see {out / 'web.log'}")
    print(f"\nLogs and events of this run: {out}")
    try:
        if args.stay and web.poll() is None:
            print("\nThe console stays up: open the URL above in a browser. Ctrl-C to stop.")
            with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
                while web.poll() is None:
                    await asyncio.sleep(1)
    finally:
        web.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            web.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
