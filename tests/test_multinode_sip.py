"""Two Asterisk nodes behind a real Kamailio (the shipped asterisk_conf/kamailio/kamailio.cfg), one bucket,
one broker, one ``kasuhara serve`` per node: customers call the proxy, never a node.

- calls through the proxy land on both nodes, and each node's app records its own (ids and metadata name
  the node);
- a supervisor's phone registered at the proxy is rung for ``*9`` from whichever node carries the call
  (the nodes dial ``PJSIP/supervisor@proxy``), and ``kasuhara supervise`` run with node A's config finds a
  call on node B through ``[nodes]`` (the call id names its node);
- node A stopped: new calls go to node B (the proxy fails over), and every call placed is recorded.

The tests share one cluster (a module fixture: booting two Asterisks and a proxy is the slow part) and run
in this order on one worker; the last one stops node A.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from asterisk_node import STOCK
from kamailio_cluster import Cluster, cluster_up
from test_nodes_sip import clean_env, mqtt_up

from conftest import REPO, skip_or_fail
from escalation_helpers import agent_pressing, supervisor_phone
from s3_fixture import fresh_bucket
from sip import agent_port, answering, caller

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("multinode")]

NAMES = ("nodea", "nodeb")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if not STOCK.is_dir():
        skip_or_fail(f"no stock Asterisk configuration at {STOCK} (scripts/stack up builds the chroot)")
    mqtt_up()
    home = tmp_path_factory.mktemp("multinode")
    with (
        fresh_bucket("km-nodes") as (s3, bucket),
        # No probe between a node's stop and the next call: the failover test sees ds_next_dst.
        cluster_up(home, s3, bucket, f"km{uuid.uuid4().hex[:8]}", NAMES, ping_s=30) as cl,
    ):
        yield cl


def by_node(docs: list[dict[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {name: [] for name in NAMES}
    for doc in docs:
        out.setdefault(str(doc.get("node")), []).append(doc["call_id"])
    return out


async def test_calls_through_the_proxy_land_on_both_nodes_each_recorded_by_its_own_app(
    cluster: Cluster, sip_workdir: Path
) -> None:
    port = agent_port()
    agent = await answering(sip_workdir, port, ring_ms=300, calls=4).start()
    customers = caller(
        sip_workdir, port, call_ms=10000, calls=4, concurrent=2, rate=2, server=cluster.proxy.address
    )
    try:
        await customers.start()
        assert await customers.wait(180) == 0, customers.error_text() + cluster.tails()
        await agent.wait(30)
        docs = await cluster.metadata(4)
    finally:
        await customers.stop()
        await agent.stop()

    placed = by_node(docs)
    # Round robin over two nodes: two calls each, each node's app recorded its own.
    assert {name: len(ids) for name, ids in placed.items()} == {"nodea": 2, "nodeb": 2}, placed
    for doc in docs:
        assert re.fullmatch(rf"{doc['node']}-[0-9]{{9,11}}\.[0-9]+", doc["call_id"]), doc["call_id"]
        assert doc["notice_played"] is True and doc["audio"]["sha256"], doc
    assert len({d["call_id"] for d in docs}) == 4
    versions = cluster.versions()
    assert len(versions) == 8 and len({v.object_name for v in versions}) == 8, versions  # none overwritten
    for name, log in zip(NAMES, cluster.logs, strict=True):
        text = log.read_text()
        other = next(n for n in NAMES if n != name)
        assert all(c in text for c in placed[name]) and not any(c in text for c in placed[other])
    await asyncio.sleep(1.0)  # the last events reach the subscriber
    for event in cluster.events():
        call_node = event["call_id"].split("-", 1)[0]
        assert event.get("node") == call_node, event


async def test_supervisor_registered_at_the_proxy_joins_from_either_node_and_supervise_finds_the_node(
    cluster: Cluster, sip_workdir: Path
) -> None:
    sup_port, boss_port, port = agent_port(), agent_port(), agent_port()
    # Two phones registered at the proxy only: no node knows their addresses.
    cluster.proxy.register("supervisor", sup_port)
    cluster.proxy.register("boss", boss_port)
    supervisor = await supervisor_phone(sip_workdir, sup_port, ring_ms=500, calls=2).start()
    boss = await answering(sip_workdir, boss_port, ring_ms=300, name="boss").start()
    agent = await agent_pressing(sip_workdir, port, [(2500, "*9")], calls=2).start()
    customers = caller(
        sip_workdir, port, call_ms=35000, calls=2, concurrent=2, rate=5, server=cluster.proxy.address
    )
    supervise: subprocess.Popen[str] | None = None
    before = len(cluster.events())
    try:
        await customers.start()
        joined = [e for e in await cluster.wait_event("supervisor_joined", 2) if e.get("node")]
        # One call on each node (round robin), and on each the supervisor came through the proxy.
        assert sorted(e["node"] for e in joined) == list(NAMES), joined
        assert {e["supervisor"] for e in joined} == {"PJSIP/supervisor@proxy"}
        on_b = next(e["call_id"] for e in joined if e["node"] == "nodeb")
        # kasuhara supervise with node A's config: the call id names node B, [nodes] says where it is.
        supervise = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kasuhara_ari.cli",
                "supervise",
                on_b,
                "--mode",
                "listen",
                "--endpoint",
                "PJSIP/boss@proxy",
                "--config",
                str(cluster.configs[0]),
            ],
            env=clean_env(),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        listening = await cluster.wait_event("supervisor_listening", 1)
        assert listening[0]["call_id"] == on_b and listening[0]["node"] == "nodeb", listening
        assert await customers.wait(120) == 0, customers.error_text() + cluster.tails()
        _, err = await asyncio.to_thread(supervise.communicate, timeout=60)
        assert supervise.returncode == 0, err
        assert "on node nodeb" in err and "supervision ended:" in err, err
        await supervisor.wait(30)
        await boss.wait(30)
    finally:
        if supervise is not None and supervise.poll() is None:
            supervise.kill()
            supervise.wait()
        for phone in (customers, agent, supervisor, boss):
            await phone.stop()
    # The supervisor's and boss's INVITEs reached them through the proxy (Via of the proxy on top).
    for phone in (supervisor, boss):
        assert f"SIP/2.0/UDP {cluster.proxy.address}" in phone.messages.read_text(errors="replace")
    events = cluster.events()[before:]
    assert {e["call_id"].split("-", 1)[0] for e in events if e.get("event") == "escalation_requested"} == set(
        NAMES
    )


async def test_a_stopped_node_new_calls_go_to_the_other_and_none_is_lost(
    cluster: Cluster, sip_workdir: Path
) -> None:
    # Every call the cluster took so far is in the bucket (none lost), before node A goes.
    started = {e["call_id"] for e in cluster.events() if e.get("event") == "started"}
    before = {d["call_id"] for d in await cluster.metadata(len(started))}
    assert before == started, (before, started)
    node_a = cluster.nodes[0]
    await asyncio.to_thread(node_a.stop)
    port = agent_port()
    agent = await answering(sip_workdir, port, ring_ms=300, calls=2).start()
    customers = caller(
        sip_workdir, port, call_ms=10000, calls=2, concurrent=2, rate=2, server=cluster.proxy.address
    )
    try:
        await customers.start()
        assert await customers.wait(180) == 0, customers.error_text() + cluster.tails()
        await agent.wait(30)
        docs = await cluster.metadata(len(before) + 2)
    finally:
        await customers.stop()
        await agent.stop()
    new = [d for d in docs if d["call_id"] not in before]
    assert len(new) == 2 and {d["node"] for d in new} == {"nodeb"}, new
    assert all(d["notice_played"] and d["audio"]["sha256"] for d in new), new
    # Round robin sent one of the two (placed within a second, long before the next probe) to node A,
    # which did not answer: the proxy marked it inactive and moved the call on (ds_next_dst).
    log = cluster.proxy.log_tail() + cluster.proxy.log.read_text(errors="replace")
    assert f"node sip:127.0.0.1:{node_a.sip_port} failed" in log, cluster.proxy.log_tail()
    versions = cluster.versions()
    assert len(versions) == 2 * len(docs) == len({v.object_name for v in versions}), versions
