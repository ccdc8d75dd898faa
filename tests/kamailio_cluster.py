"""Several Asterisk nodes behind a Kamailio, one ``kasuhara serve`` per node, the stack's S3 and broker: the
cluster of tests/test_multinode_sip.py and scripts/multinode.py, all on 127.0.0.1 with distinct ports.

Each node is a run of the stack's chroot (tests/asterisk_node.py) with ``systemname`` = its name, the
proxy as a PJSIP endpoint (supervisors are ``PJSIP/<user>@proxy``), and ``kasuhara asterisk install``'s
drop-ins; every node's kasuhara.toml has the same ARI user and the whole ``[nodes]`` table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from asterisk_node import AsteriskNode
from kamailio import KamailioProxy
from test_nodes_sip import clean_env, kasuhara

from conftest import REPO, closed_port
from s3_fixture import S3Target, all_versions, open_store
from sip import free_udp_port


@dataclass
class Cluster:
    nodes: list[AsteriskNode]
    configs: list[Path]
    logs: list[Path]
    proxy: KamailioProxy
    s3: S3Target
    bucket: str
    prefix: str
    events_file: Path
    serves: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def events(self) -> list[dict[str, Any]]:
        """Every event published so far (``<prefix>/calls/#``), with its topic."""
        out = []
        for line in self.events_file.read_text(errors="replace").splitlines():
            topic, _, payload = line.partition(" ")
            with contextlib.suppress(json.JSONDecodeError):
                out.append({**json.loads(payload), "_topic": topic})
        return out

    async def wait_event(self, name: str, count: int = 1, timeout: float = 90) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events() if e.get("event") == name]
            if len(found) >= count:
                return found
            assert time.monotonic() < deadline, f"{count} x {name} not seen: {self.tails()}"
            await asyncio.sleep(0.3)

    async def metadata(self, count: int, timeout: float = 120) -> list[dict[str, Any]]:
        """The metadata documents in the bucket, once there are at least ``count``."""
        store = open_store(self.s3, self.bucket)
        try:
            deadline = time.monotonic() + timeout
            while True:
                keys = sorted(
                    [o.key async for o in store.list_prefix("recordings/") if o.key.endswith(".json")]
                )
                if len(keys) >= count:
                    return [json.loads(await store.get_bytes(k) or b"{}") for k in keys]
                assert time.monotonic() < deadline, f"{len(keys)}/{count} uploads: {self.tails()}"
                await asyncio.sleep(0.5)
        finally:
            store.close()

    def versions(self) -> list[Any]:
        store = open_store(self.s3, self.bucket)
        try:
            return all_versions(store, "recordings/")
        finally:
            store.close()

    def tails(self) -> str:
        texts = [log.read_text(errors="replace")[-1500:] for log in self.logs if log.exists()]
        return "\n---\n".join([*texts, self.proxy.log_tail()[-1500:]])


def node_config(node: AsteriskNode, name: str, home: Path, cluster_args: dict[str, Any]) -> Path:
    """Node ``name``'s kasuhara.toml: its own ARI/AMI/spool, the shared bucket and broker, every node in
    ``[nodes]`` (one ARI user on all of them), supervisors reached through the proxy."""
    s3: S3Target = cluster_args["s3"]
    nodes_table = "".join(f'{n} = "http://127.0.0.1:{port}"\n' for n, port in cluster_args["http_ports"])
    path = home / f"{name}.toml"
    path.write_text(
        f"""[general]
node = "{name}"

[ari]
url = "http://127.0.0.1:{node.http_port}"
username = "kasuhara"
password = "{cluster_args["ari_password"]}"
app = "kasuhara"

[ami]
host = "127.0.0.1"
port = {node.ami_port}
username = "kasuhara"
secret = "{secrets.token_hex(12)}"

[mqtt]
host = "127.0.0.1"
port = 1883
topic_prefix = "{cluster_args["prefix"]}"

[storage]
endpoint = "{s3.endpoint}"
access_key = "{s3.access_key}"
secret_key = "{s3.secret_key}"
region = "{s3.region}"
bucket = "{cluster_args["bucket"]}"

[recording]
asterisk_dir = "{node.inside}/spool/monitor/kasuhara"
local_dir = "{node.spool}"

[escalation]
supervisors = ["PJSIP/supervisor@proxy"]
ring_timeout_s = 15

[nodes]
{nodes_table}"""
    )
    return path


def proxy_endpoint(node: AsteriskNode, proxy_port: int) -> None:
    """What an operator adds to each node's pjsip.conf: the proxy as an endpoint with a fixed contact, so
    ``PJSIP/<user>@proxy`` reaches a phone registered at the proxy."""
    with (node.etc / "pjsip.conf").open("a") as fh:
        fh.write(
            f"\n[proxy](phone)\ncontext = from-agents\naors = proxy\n\n"
            f"[proxy]\ntype = aor\ncontact = sip:127.0.0.1:{proxy_port}\n"
        )


def wait_registered(node: AsteriskNode, password: str, serve: subprocess.Popen[bytes], log: Path) -> None:
    url = f"http://127.0.0.1:{node.http_port}/ari/applications/kasuhara"
    deadline = time.monotonic() + 90
    with httpx.Client(auth=("kasuhara", password), timeout=3) as http:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if http.get(url).status_code == 200:
                    return
            assert serve.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)


@contextlib.contextmanager
def cluster_up(
    home: Path,
    s3: S3Target,
    bucket: str,
    prefix: str,
    names: Sequence[str] = ("nodea", "nodeb"),
    *,
    ping_s: int = 30,
) -> Iterator[Cluster]:
    """Boot the nodes, the proxy (round robin) and one ``serve`` per node; everything stopped and the
    nodes' trees removed afterwards. ``ping_s``: the proxy's probe interval."""
    home.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:6]
    proxy_port = free_udp_port(16000, 16999)
    nodes: list[AsteriskNode] = []
    proxy: KamailioProxy | None = None
    sub: subprocess.Popen[bytes] | None = None
    cl: Cluster | None = None
    try:
        for i, name in enumerate(names):
            node = AsteriskNode(
                f"km-{name}-{tag}",
                sip_port=free_udp_port(16000, 16999),
                http_port=closed_port(),
                ami_port=closed_port(),
                rtp_start=62000 + 1000 * i + 500 * (os.getpid() % 2),  # off test_nodes_sip's
            )
            nodes.append(node)
            node.operator_tree()
            with (node.etc / "asterisk.conf").open("a") as fh:
                fh.write(f"systemname = {name}\n")
            proxy_endpoint(node, proxy_port)
        ari_password = secrets.token_hex(12)
        args: dict[str, Any] = {
            "s3": s3,
            "bucket": bucket,
            "prefix": prefix,
            "ari_password": ari_password,
            "http_ports": [(name, n.http_port) for name, n in zip(names, nodes, strict=True)],
        }
        configs = [node_config(n, name, home, args) for n, name in zip(nodes, names, strict=True)]
        for node, config in zip(nodes, configs, strict=True):
            done = kasuhara(
                config, "asterisk", "install", "--dest", str(node.etc), "--sounds", str(node.sounds)
            )
            assert done.returncode == 0, done.stderr
        for node in nodes:
            node.start()
        proxy = KamailioProxy(
            home / "kamailio",
            proxy_port,
            [(name, n.sip_port) for name, n in zip(names, nodes, strict=True)],
            ping_s=ping_s,
        )
        proxy.start()
        events_file = home / "mqtt.txt"
        sub = subprocess.Popen(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", "1883", "-t", f"{prefix}/calls/#", "-v"],
            stdout=events_file.open("w"),
            stderr=subprocess.STDOUT,
        )
        logs = [home / f"serve-{name}.log" for name in names]
        cl = Cluster(nodes, configs, logs, proxy, s3, bucket, prefix, events_file)
        for config, log in zip(configs, logs, strict=True):
            cl.serves.append(
                subprocess.Popen(
                    [sys.executable, "-m", "kasuhara_ari.cli", "serve", "--config", str(config)],
                    env=clean_env(),
                    cwd=REPO,
                    stdout=log.open("wb"),
                    stderr=subprocess.STDOUT,
                )
            )
        for node, serve, log in zip(nodes, cl.serves, logs, strict=True):
            wait_registered(node, ari_password, serve, log)
        yield cl
    finally:
        if cl is not None:
            for serve in cl.serves:
                serve.send_signal(signal.SIGTERM)
            for serve in cl.serves:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    serve.wait(20)
                if serve.poll() is None:
                    serve.kill()
                    serve.wait()
        if sub is not None:
            sub.kill()
            sub.wait()
        if proxy is not None:
            proxy.stop()
        for node in nodes:
            node.remove()
