"""Two Asterisk nodes, one bucket, one broker: a real SIPp call on each node (the same extension, at the
same moment) ends with two distinct recordings and metadata in the bucket and two distinct event topics,
each naming its node; each node's ``kasuhara serve`` handles only its own node's call.

The nodes are second runs of the stack's chroot (tests/asterisk_node.py: Debian's stock configuration, its
own directories and ports, ``kasuhara asterisk install`` drop-ins), each with ``systemname`` set as the
README's *Several nodes* says. Both start fresh, so their uniqueid counters are identical: without the
``systemname`` prefix their first calls in the same second get the same id (and one recording would land
on the other's key).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from asterisk_node import STOCK, AsteriskNode

from conftest import REPO, closed_port, missing, skip_or_fail
from s3_fixture import S3Target, all_versions, fresh_bucket, open_store
from sip import agent_port, answering, caller, free_udp_port

pytestmark = pytest.mark.integration

NAMES = ("nodea", "nodeb")


@contextlib.contextmanager
def two_nodes() -> Iterator[list[AsteriskNode]]:
    if not STOCK.is_dir():
        skip_or_fail(f"no stock Asterisk configuration at {STOCK} (scripts/stack up builds the chroot)")
    tag = uuid.uuid4().hex[:6]
    nodes = []
    try:
        for i, name in enumerate(NAMES):
            node = AsteriskNode(
                f"kn-{name}-{tag}",
                sip_port=free_udp_port(16000, 16999),
                http_port=closed_port(),
                ami_port=closed_port(),
                rtp_start=61000 + 2000 * i + 500 * (os.getpid() % 2),
            )
            nodes.append(node)
            node.operator_tree()
            # What makes call ids unique across nodes: Asterisk prefixes uniqueids/linkedids with it.
            with (node.etc / "asterisk.conf").open("a") as fh:
                fh.write(f"systemname = {name}\n")
        yield nodes
    finally:
        for node in nodes:
            node.remove()


def node_config(
    node: AsteriskNode, name: str, tmp_path: Path, s3: S3Target, bucket: str, prefix: str
) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f"""[general]
node = "{name}"

[ari]
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
host = "127.0.0.1"
port = 1883
topic_prefix = "{prefix}"

[storage]
endpoint = "{s3.endpoint}"
access_key = "{s3.access_key}"
secret_key = "{s3.secret_key}"
region = "{s3.region}"
bucket = "{bucket}"

[recording]
asterisk_dir = "{node.inside}/spool/monitor/kasuhara"
local_dir = "{node.spool}"

[escalation]
supervisors = []
"""
    )
    return path


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("KASUHARA_")}


def kasuhara(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kasuhara_ari.cli", *args, "--config", str(config)],
        env=clean_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def ari_password(config: Path) -> str:
    return next(line.split('"')[1] for line in config.read_text().splitlines() if line.startswith("password"))


async def wait_registered(
    node: AsteriskNode, config: Path, serve: subprocess.Popen[bytes], log: Path
) -> None:
    url = f"http://127.0.0.1:{node.http_port}/ari/applications/kasuhara"
    async with httpx.AsyncClient(auth=("kasuhara", ari_password(config)), timeout=3) as http:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(url)).status_code == 200:
                    return
            assert serve.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            await asyncio.sleep(0.2)


def mqtt_up() -> None:
    try:
        socket.create_connection(("127.0.0.1", 1883), timeout=1).close()
    except OSError:
        missing("mosquitto at 127.0.0.1:1883 is not reachable")


async def test_a_call_on_each_node_two_recordings_two_topics_each_naming_its_node(
    tmp_path: Path, sip_workdir: Path, record_property: Callable[[str, object], None]
) -> None:
    mqtt_up()
    prefix = f"kt{uuid.uuid4().hex[:8]}"
    with fresh_bucket("kt-nodes") as (s3, bucket), two_nodes() as nodes:
        configs = [
            node_config(n, name, tmp_path, s3, bucket, prefix) for n, name in zip(nodes, NAMES, strict=True)
        ]
        for node, config in zip(nodes, configs, strict=True):
            done = kasuhara(
                config, "asterisk", "install", "--dest", str(node.etc), "--sounds", str(node.sounds)
            )
            assert done.returncode == 0, done.stderr
        await asyncio.gather(*(asyncio.to_thread(n.start) for n in nodes))
        sub_out = tmp_path / "mqtt.txt"
        sub = subprocess.Popen(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", "1883", "-t", f"{prefix}/calls/#", "-v"],
            stdout=sub_out.open("w"),
            stderr=subprocess.STDOUT,
        )
        serves: list[subprocess.Popen[bytes]] = []
        logs = [tmp_path / f"serve-{name}.log" for name in NAMES]
        phones = []
        try:
            for config, log in zip(configs, logs, strict=True):
                serves.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "kasuhara_ari.cli", "serve", "--config", str(config)],
                        env=clean_env(),
                        cwd=REPO,
                        stdout=log.open("wb"),
                        stderr=subprocess.STDOUT,
                    )
                )
            for node, config, serve, log in zip(nodes, configs, serves, logs, strict=True):
                await wait_registered(node, config, serve, log)
            # One agent phone, the same extension dialled on both nodes at the same moment.
            port = agent_port()
            agent = await answering(sip_workdir, port, ring_ms=300, calls=2).start()
            phones.append(agent)
            customers = []
            for node, name in zip(nodes, NAMES, strict=True):
                phone = caller(
                    sip_workdir,
                    port,
                    call_ms=7000,
                    name=f"caller-{name}",
                    server=f"127.0.0.1:{node.sip_port}",
                )
                customers.append(await phone.start())
            phones += customers
            for c, node in zip(customers, nodes, strict=True):
                assert await c.wait(120) == 0, c.error_text() + node.log_tail()
            await agent.wait(30)
            # doctor tells whether general.node and the node's systemname agree.
            doctor = json.loads(kasuhara(configs[0], "doctor", "--json").stdout)
            assert doctor["ari"]["ok"] and "systemname nodea" in doctor["ari"]["detail"], doctor["ari"]
            wrong = subprocess.run(
                [sys.executable, "-m", "kasuhara_ari.cli", "doctor", "--json", "--config", str(configs[0])],
                env={**clean_env(), "KASUHARA_GENERAL__NODE": "nodeb"},
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=120,
            )
            ari_check = json.loads(wrong.stdout)["ari"]
            assert not ari_check["ok"] and "general.node nodeb" in ari_check["detail"], ari_check
            # Both recordings uploaded: two metadata objects in the bucket.
            store = open_store(s3, bucket)
            try:
                deadline = time.monotonic() + 90
                metas: list[str] = []
                while len(metas) < 2:
                    assert time.monotonic() < deadline, "uploads missing:\n" + "\n".join(
                        log.read_text()[-2000:] for log in logs
                    )
                    await asyncio.sleep(0.5)
                    listed = store.list_prefix("recordings/")
                    metas = sorted([o.key async for o in listed if o.key.endswith(".json")])
                docs = [json.loads(await store.get_bytes(k) or b"{}") for k in metas]
                versions = all_versions(store, "recordings/")
            finally:
                store.close()
            await asyncio.sleep(1.0)  # the last events reach the subscriber
        finally:
            for phone in phones:
                await phone.stop()
            for serve in serves:
                serve.send_signal(signal.SIGTERM)
            for serve in serves:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    serve.wait(20)
                if serve.poll() is None:
                    serve.kill()
            sub.kill()
            sub.wait()

    record_property("report", "call ids: " + ", ".join(f"{d.get('node')}: {d['call_id']}" for d in docs))
    by_node = {d["node"]: d for d in docs}
    assert set(by_node) == set(NAMES), [(d["call_id"], d.get("node")) for d in docs]
    for name, doc in by_node.items():
        # The call id is the node's linkedid, prefixed with its systemname: unique across nodes.
        assert re.fullmatch(rf"{name}-[0-9]{{9,11}}\.[0-9]+", doc["call_id"]), doc["call_id"]
        assert doc["notice_played"] is True and doc["audio"]["sha256"], doc
        assert doc["audio"]["key"].endswith(f"/{doc['call_id']}.wav")
    # Nothing overwritten: exactly one version of each of the four objects.
    assert len(versions) == 4, [(v.object_name, v.version_id) for v in versions]
    assert len({v.object_name for v in versions}) == 4

    events = [line.split(" ", 1) for line in sub_out.read_text().splitlines() if " " in line]
    topics_by_node: dict[str, set[str]] = {name: set() for name in NAMES}
    for topic, payload in events:
        doc = json.loads(payload)
        assert doc.get("node") in NAMES, (topic, doc)
        assert topic.startswith(f"{prefix}/calls/{by_node[doc['node']]['call_id']}/"), (topic, doc)
        topics_by_node[doc["node"]].add(topic.split("/")[2])
    assert {name: len(ids) for name, ids in topics_by_node.items()} == {name: 1 for name in NAMES}
    for name in NAMES:
        assert {"started", "ended", "recording_stored"} <= {
            t.rsplit("/", 1)[1] for t, p in events if json.loads(p).get("node") == name
        }
    # Each node's app saw only its own node's call.
    for name, log in zip(NAMES, logs, strict=True):
        text = log.read_text()
        other = next(n for n in NAMES if n != name)
        assert by_node[name]["call_id"] in text and by_node[other]["call_id"] not in text
