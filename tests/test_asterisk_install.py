"""``kasuhara asterisk install|uninstall`` on Debian's own Asterisk configuration (the stack chroot's
``/etc/asterisk.dist``), and a real call through a second Asterisk that runs on what install wrote.

The operator's files are the stock ones plus what an operator sets by hand (ports, SIP endpoints, one
context that hands calls to ``kasuhara-inbound``): tests/asterisk_node.py. Nothing of kasuhara-ari is in
them until install runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from asterisk_node import STOCK, AsteriskNode
from test_flag_e2e_sip import _objects_of

from conftest import REPO, closed_port, skip_or_fail
from s3_fixture import fetch, fresh_bucket, open_store
from sip import agent_port, answering, caller, free_udp_port

pytestmark = pytest.mark.integration


def tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` (and symlink targets) with its sha256: a byte-exact picture."""
    found: dict[str, str] = {}
    for item in sorted(path.rglob("*")):
        rel = str(item.relative_to(path))
        if item.is_symlink():
            found[rel] = "-> " + os.readlink(item)
        elif item.is_file():
            found[rel] = hashlib.sha256(item.read_bytes()).hexdigest()
        elif item.is_dir():
            found[rel + "/"] = "dir"
    return found


@pytest.fixture
def node(tmp_path: Path) -> Iterator[AsteriskNode]:
    if not STOCK.is_dir():
        skip_or_fail(f"no stock Asterisk configuration at {STOCK} (scripts/stack up builds the chroot)")
    n = AsteriskNode(
        f"kn-{uuid.uuid4().hex[:8]}",
        sip_port=free_udp_port(16000, 16999),
        http_port=closed_port(),
        ami_port=closed_port(),
        rtp_start=60000 + 1000 * (os.getpid() % 4),
    )
    n.operator_tree()
    try:
        yield n
    finally:
        n.remove()


def node_config(node: AsteriskNode, tmp_path: Path) -> Path:
    """The kasuhara config of a site running this node: its own ARI/AMI secrets, no S3, no MQTT."""
    path = tmp_path / "kasuhara.toml"
    path.write_text(
        f"""[ari]
url = "http://127.0.0.1:{node.http_port}"
username = "kasuhara"
password = "{secrets.token_hex(12)}"
app = "kasuhara"

[ami]
host = "127.0.0.1"
port = {node.ami_port}
username = "kasuhara"
secret = "{secrets.token_hex(12)}"

[mqtt]
enabled = false

[storage]
enabled = false

[recording]
asterisk_dir = "{node.inside}/spool/monitor/kasuhara"
local_dir = "{node.spool}"

[escalation]
supervisors = []
"""
    )
    return path


def kasuhara(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KASUHARA_")}
    return subprocess.run(
        [sys.executable, "-m", "kasuhara_ari.cli", *args, "--config", str(config)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_dry_run_install_and_uninstall_leave_the_operators_files_byte_identical(
    node: AsteriskNode, tmp_path: Path
) -> None:
    config = node_config(node, tmp_path)
    before_etc, before_sounds = tree(node.etc), tree(node.sounds)
    where = ("--dest", str(node.etc), "--sounds", str(node.sounds))

    dry = kasuhara(config, "asterisk", "install", *where, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert tree(node.etc) == before_etc and tree(node.sounds) == before_sounds
    assert "+#tryinclude kasuhara.d/ari.conf" in dry.stdout and "password = ********" in dry.stdout
    secret_values = [
        line.split('"')[1]
        for line in config.read_text().splitlines()
        if "secret" in line or "password" in line
    ]
    assert not any(value in dry.stdout for value in secret_values)

    done = kasuhara(config, "asterisk", "install", *where)
    assert done.returncode == 0, done.stderr
    after = tree(node.etc)
    # Main files: only a block appended; our files: in kasuhara.d/ and Debian's manager.d/.
    changed = {name for name in before_etc if after.get(name) != before_etc[name]}
    assert changed == {"ari.conf", "http.conf", "extensions.conf"}, changed
    for name in changed:
        old, new = (STOCK / name).read_bytes(), (node.etc / name).read_bytes()
        assert new.startswith(old.rstrip(b"\n")), name
    added = set(after) - set(before_etc)
    assert "manager.d/kasuhara.conf" in added and "kasuhara.d/install.json" in added
    for secret in ("kasuhara.d/ari.conf", "manager.d/kasuhara.conf"):
        assert (node.etc / secret).stat().st_mode & 0o777 == 0o640
    manager = (node.etc / "manager.d" / "kasuhara.conf").read_text()
    assert "read = call,system" in manager and "write = system,call,agent" in manager  # least privilege
    assert (node.sounds / "ja" / "kasuhara" / "recording-notice.wav").is_file()

    again = kasuhara(config, "asterisk", "install", *where)
    assert again.returncode == 0 and "nothing to change" in again.stdout, again.stdout

    gone = kasuhara(config, "asterisk", "uninstall", *where)
    assert gone.returncode == 0, gone.stderr
    assert tree(node.etc) == before_etc
    assert tree(node.sounds) == before_sounds


def test_install_refuses_to_override_the_operators_users_and_keeps_their_prompts(
    node: AsteriskNode, tmp_path: Path
) -> None:
    config = node_config(node, tmp_path)
    where = ("--dest", str(node.etc), "--sounds", str(node.sounds))
    ari = node.etc / "ari.conf"
    ari.write_text(ari.read_text() + "\n[kasuhara]\ntype = user\npassword = theirs\n")
    before = tree(node.etc)
    refused = kasuhara(config, "asterisk", "install", *where)
    assert refused.returncode == 3 and "ari.conf already has a section [kasuhara]" in refused.stderr
    assert tree(node.etc) == before

    ari.write_text((STOCK / "ari.conf").read_text())
    studio = node.sounds / "ja" / "kasuhara" / "recording-notice.wav"
    studio.parent.mkdir(parents=True)
    studio.write_bytes(b"RIFF their studio recording")
    done = kasuhara(config, "asterisk", "install", *where)
    assert done.returncode == 0, done.stderr
    assert "kept" in done.stdout and studio.read_bytes() == b"RIFF their studio recording"
    # An edited drop-in survives uninstall, and is named.
    dropin = node.etc / "kasuhara.d" / "extensions.conf"
    dropin.write_text(dropin.read_text() + "; my note\n")
    gone = kasuhara(config, "asterisk", "uninstall", *where)
    assert gone.returncode == 0 and "changed since install: kept" in gone.stdout, gone.stdout
    assert dropin.exists() and studio.read_bytes() == b"RIFF their studio recording"
    assert (node.etc / "extensions.conf").read_bytes() == (STOCK / "extensions.conf").read_bytes() + (
        b"\n[from-customers]\n"
        b"exten => _5XXX,1,Set(KASUHARA_TARGET=PJSIP/agent/sip:agent@127.0.0.1:${EXTEN})\n"
        b" same => n,Goto(kasuhara-inbound,${EXTEN},1)\n"
    )


async def _ari_ok(url: str, user: str, password: str) -> int:
    async with httpx.AsyncClient(auth=(user, password), timeout=3) as http:
        try:
            return (await http.get(f"{url}/ari/asterisk/info")).status_code
        except httpx.HTTPError:
            return 0


async def test_a_real_call_runs_on_the_installed_dropins_and_uninstall_takes_them_out(
    node: AsteriskNode, tmp_path: Path, sip_workdir: Path
) -> None:
    """Install into the stock tree, start the node: `kasuhara serve` registers through the ARI user,
    records through the AMI user's classes, and a SIPp call gets the notice, the agent and a recording
    with its metadata. After uninstall and a reload, the ARI user is gone."""
    config = node_config(node, tmp_path)
    where = ("--dest", str(node.etc), "--sounds", str(node.sounds))
    done = kasuhara(config, "asterisk", "install", *where)
    assert done.returncode == 0, done.stderr
    await asyncio.to_thread(node.start)
    url = f"http://127.0.0.1:{node.http_port}"
    password = next(
        line.split('"')[1] for line in config.read_text().splitlines() if line.startswith("password")
    )
    assert await _ari_ok(url, "kasuhara", password) == 200, node.log_tail()

    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KASUHARA_")}
    serve = subprocess.Popen(
        [sys.executable, "-m", "kasuhara_ari.cli", "serve", "--config", str(config)],
        env=env,
        cwd=REPO,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    phones = []
    try:
        async with httpx.AsyncClient(auth=("kasuhara", password), timeout=3) as http:
            deadline = time.monotonic() + 30
            while (await http.get(f"{url}/ari/applications/kasuhara")).status_code != 200:
                assert serve.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                await asyncio.sleep(0.2)
        port = agent_port()
        agent = await answering(sip_workdir, port, ring_ms=300).start()
        customer = await caller(sip_workdir, port, call_ms=8000, server=f"127.0.0.1:{node.sip_port}").start()
        phones = [agent, customer]
        assert await customer.wait(90) == 0, customer.error_text() + node.log_tail()
        await agent.wait(20)
        deadline = time.monotonic() + 30
        metas: list[Path] = []
        while not metas:
            assert time.monotonic() < deadline, f"no metadata in {node.spool}:\n{log.read_text()[-3000:]}"
            await asyncio.sleep(0.3)
            metas = sorted(node.spool.glob("*.json"))
        meta = json.loads(metas[0].read_text())
    finally:
        for phone in phones:
            await phone.stop()
        serve.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            serve.wait(20)
        if serve.poll() is None:
            serve.kill()
    assert meta["notice_played"] is True and meta["agent"], meta
    assert meta["audio"]["expected"] is True, meta  # MixMonitor ran, through the AMI user installed
    assert (node.spool / f"{meta['call_id']}.wav").stat().st_size > 44

    # doctor checks the modules the app needs on the node it is configured for.
    doctor = json.loads(kasuhara(config, "doctor", "--json").stdout)
    assert doctor["ari"]["ok"] and doctor["ami"]["ok"], doctor
    # The installed AMI user has the classes the app's actions need (MixMonitor; QueuePause for care).
    assert "MixMonitor, QueuePause allowed" in doctor["ami"]["detail"], doctor["ami"]
    node.rx("module unload func_talkdetect.so")
    doctor = json.loads(kasuhara(config, "doctor", "--json").stdout)
    assert not doctor["ari"]["ok"] and "func_talkdetect.so (for detection.mode)" in doctor["ari"]["detail"]

    gone = kasuhara(config, "asterisk", "uninstall", *where)
    assert gone.returncode == 0, gone.stderr
    node.rx("module reload res_ari.so")
    assert await _ari_ok(url, "kasuhara", password) == 401


async def test_with_the_app_gone_the_installed_fallback_records_and_the_uploader_stores_it_later(
    node: AsteriskNode, tmp_path: Path, sip_workdir: Path
) -> None:
    """``serve`` registered its app, then stopped (a restart, a crash): Asterisk answers Stasis() with
    FAILED, the installed dialplan's fallback plays the notice, records into the spool as <linkedid>.wav and
    dials the agent. When ``serve`` runs again, its uploader adopts that recording as an orphan and stores
    it: no call unrecorded, no recording left behind on the Asterisk host."""
    config = node_config(node, tmp_path)
    with fresh_bucket("kt-fb") as (target, bucket):
        env = {k: v for k, v in os.environ.items() if not k.startswith("KASUHARA_")}
        env.update(
            {
                "KASUHARA_STORAGE__ENABLED": "true",
                "KASUHARA_STORAGE__ENDPOINT": target.endpoint,
                "KASUHARA_STORAGE__ACCESS_KEY": target.access_key,
                "KASUHARA_STORAGE__SECRET_KEY": target.secret_key,
                "KASUHARA_STORAGE__REGION": target.region,
                "KASUHARA_STORAGE__BUCKET": bucket,
                "KASUHARA_STORAGE__ORPHAN_AFTER_S": "1",
                "KASUHARA_ROUTING__ON_STOP": "hangup",
            }
        )
        where = ("--dest", str(node.etc), "--sounds", str(node.sounds))
        done = kasuhara(config, "asterisk", "install", *where)
        assert done.returncode == 0, done.stderr
        await asyncio.to_thread(node.start)
        log = tmp_path / "serve.log"

        def serve() -> subprocess.Popen[bytes]:
            cmd = [sys.executable, "-m", "kasuhara_ari.cli", "serve", "--config", str(config)]
            return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log.open("ab"), stderr=subprocess.STDOUT)

        # Registered once, then gone: Asterisk keeps the app's name but no websocket serves it.
        first = serve()
        try:
            deadline = time.monotonic() + 30
            while "stasis event=resynced" not in log.read_text(errors="replace"):
                assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                await asyncio.sleep(0.2)
        finally:
            first.send_signal(signal.SIGTERM)
            assert first.wait(30) == 0, log.read_text()[-2000:]

        port = agent_port()
        agent = await answering(sip_workdir, port, ring_ms=300).start()
        customer = await caller(sip_workdir, port, call_ms=7000, server=f"127.0.0.1:{node.sip_port}").start()
        try:
            assert await customer.wait(60) == 0, customer.error_text() + node.log_tail()
            assert agent.received("INVITE"), "the fallback did not dial the agent\n" + node.log_tail()
            assert await agent.wait(20) == 0, agent.error_text()
        finally:
            await customer.stop()
            await agent.stop()
        wavs = sorted(node.spool.glob("*.wav"))
        assert len(wavs) == 1 and not list(node.spool.glob("*.json")), list(node.spool.iterdir())
        call_id = wavs[0].stem

        second = serve()
        try:
            store = open_store(target, bucket)
            try:
                deadline = time.monotonic() + 60
                while len(objects := await asyncio.to_thread(_objects_of, store, call_id)) < 2:
                    assert second.poll() is None, log.read_text()[-3000:]
                    assert time.monotonic() < deadline, (objects, log.read_text()[-3000:])
                    await asyncio.sleep(0.5)
                meta = json.loads(await asyncio.to_thread(fetch, store, objects["json"]))
                audio = await asyncio.to_thread(fetch, store, objects["wav"])
            finally:
                store.close()
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(30) == 0, log.read_text()[-3000:]
        assert meta["orphaned"] is True and meta["call_id"] == call_id, meta
        assert meta["audio"]["bytes"] == len(audio) > 8000 * 2 * 5  # the notice and the talk, 8 kHz 16-bit
        assert not list(node.spool.glob(f"{call_id}*")), "the recording stayed on the Asterisk host"
