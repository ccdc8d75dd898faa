"""``ari.mode = listen``: Asterisk 22's outbound ARI websocket connects to ``kasuhara serve`` (a node that
reaches its app, not the other way round: several Asterisk nodes, each with the app beside it, or an app
behind a firewall that lets nothing in to Asterisk's HTTP port).

On a second Asterisk from the stack's chroot (tests/asterisk_node.py) configured by ``kasuhara asterisk
install`` alone: a real SIP call goes through the whole flow over that one websocket (events and REST);
with ``serve`` stopped, Asterisk's Stasis() fails and the installed fallback records the call into the
spool. A client with the wrong credentials is refused before any ARI is spoken.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import websockets
from asterisk_node import AsteriskNode
from test_asterisk_install import kasuhara, node, node_config  # noqa: F401  (fixture)

from kasuhara_ari.ari import AriClient, AriUnavailable

from conftest import REPO, closed_port
from sip import agent_port, answering, caller

pytestmark = pytest.mark.integration


async def _logged(log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"never logged {text!r}:\n{log.read_text()[-3000:]}"
        await asyncio.sleep(0.1)


async def _one_call(on: AsteriskNode, sip_workdir: Path, call_ms: int) -> None:
    port = agent_port()
    agent = await answering(sip_workdir, port, ring_ms=300).start()
    customer = await caller(sip_workdir, port, call_ms=call_ms, server=f"127.0.0.1:{on.sip_port}").start()
    try:
        try:
            code = await customer.wait(60)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{on.log_tail()}") from None
        assert code == 0, customer.error_text() + on.log_tail()
        assert agent.received("INVITE"), "the agent was never rung\n" + on.log_tail()
        await agent.wait(20)
    finally:
        await customer.stop()
        await agent.stop()


async def test_asterisk_connects_to_serve_and_a_call_runs_then_the_fallback_records_without_it(
    node: AsteriskNode,  # noqa: F811
    tmp_path: Path,
    sip_workdir: Path,
) -> None:
    config = node_config(node, tmp_path)
    listen = closed_port()
    with config.open("a") as fh:
        fh.write('\n[routing]\non_stop = "hangup"\n')
    text = config.read_text().replace(
        'app = "kasuhara"\n', f'app = "kasuhara"\nmode = "listen"\nlisten = "127.0.0.1:{listen}"\n'
    )
    config.write_text(text)
    done = kasuhara(config, "asterisk", "install", "--dest", str(node.etc), "--sounds", str(node.sounds))
    assert done.returncode == 0, done.stderr
    written = (node.etc / "kasuhara.d" / "websocket_client.conf").read_text()
    assert f"uri = ws://127.0.0.1:{listen}/ari" in written and "connection_type = persistent" in written
    assert "type = outbound_websocket" in (node.etc / "kasuhara.d" / "ari.conf").read_text()
    assert not (node.etc / "kasuhara.d" / "http.conf").exists()  # no HTTP server for ARI in this mode

    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KASUHARA_")}
    serve = subprocess.Popen(
        [sys.executable, "-m", "kasuhara_ari.cli", "serve", "--config", str(config)],
        env=env,
        cwd=REPO,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        await _logged(log, f"ari event=listening address=127.0.0.1:{listen}", 20)
        await asyncio.to_thread(node.start)  # Asterisk starts after the app: it connects on its own
        await _logged(log, "ari event=connected mode=listen", 30)
        await _logged(log, "stasis event=resynced", 15)
        await _one_call(node, sip_workdir, 8000)
        deadline = time.monotonic() + 30
        while not (metas := sorted(node.spool.glob("*.json"))):
            assert time.monotonic() < deadline, f"no metadata in {node.spool}:\n{log.read_text()[-3000:]}"
            await asyncio.sleep(0.3)
        meta = json.loads(metas[0].read_text())
        recorded = meta["notice_played"] is True and meta["agent"] and meta["audio"]["expected"]
        assert recorded, log.read_text()[-4000:]  # AMI too: Asterisk started after serve
        assert "ari event=rest_over_websocket" in log.read_text()
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0, log.read_text()[-3000:]

    # The app is gone: Stasis() fails at once and the installed fallback records and dials.
    await _one_call(node, sip_workdir, 6000)
    wavs = [p for p in node.spool.glob("*.wav") if p.stem != meta["call_id"]]
    assert len(wavs) == 1 and not wavs[0].with_suffix(".json").exists(), list(node.spool.iterdir())
    assert wavs[0].stat().st_size > 8000 * 2 * 3, wavs[0].stat()


async def test_a_client_with_the_wrong_credentials_is_refused(tmp_path: Path) -> None:
    port = closed_port()
    ari = AriClient(
        "http://127.0.0.1:1", "kasuhara", "right-password", "kasuhara", listen=("127.0.0.1", port)
    )
    events = ari.events()
    first = asyncio.ensure_future(events.__anext__())
    try:
        await asyncio.wait_for(ari.serving.wait(), 10)
        wrong = base64.b64encode(b"kasuhara:wrong").decode()
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(
                f"ws://127.0.0.1:{port}/ari",
                subprotocols=[websockets.Subprotocol("ari")],
                additional_headers={"Authorization": f"Basic {wrong}"},
            ):
                pass
        assert refused.value.response.status_code == 401
        with pytest.raises(AriUnavailable, match="no Asterisk connected"):
            await ari.request("GET", "/asterisk/info")  # and nothing goes to HTTP meanwhile
        assert ari.http_requests == 0
    finally:
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        await events.aclose()
        await ari.aclose()
