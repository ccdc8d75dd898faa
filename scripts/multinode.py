"""A multi-node demo on the local stack: N Asterisk nodes behind Kamailio, one ``kasuhara serve`` per node,
the stack's S3 and mosquitto; customers (SIPp) call the proxy and are spread over the nodes.

Prints the cluster (the proxy, each node's SIP port, ARI url and kasuhara.toml), then each call's id, node
and key in S3. On a terminal it stays up until Ctrl-C (``--no-stay`` to end at once); then every process
stops and the demo's bucket and node trees are removed. Run by ``scripts/multinode`` (which brings the
stack up first). The same cluster is what ``tests/test_multinode_sip.py`` proves things on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the node, proxy and phone drivers are shared with the tests

from kamailio_cluster import Cluster, cluster_up  # noqa: E402

from s3_fixture import fresh_bucket  # noqa: E402
from sip import agent_port, answering, caller  # noqa: E402

NAMES = ("nodea", "nodeb", "nodec", "noded")


async def place_calls(cl: Cluster, count: int, workdir: Path) -> None:
    port = agent_port()
    agent = await answering(workdir, port, ring_ms=300, calls=count).start()
    customers = caller(
        workdir, port, call_ms=9000, calls=count, concurrent=count, rate=5, server=cl.proxy.address
    )
    try:
        await customers.start()
        if await customers.wait(300) != 0:
            print(f"multinode: some calls failed: {customers.error_text()}", file=sys.stderr)
        await agent.wait(60)
        docs = await cl.metadata(count)
    finally:
        await customers.stop()
        await agent.stop()
    print(f"\n{count} calls through the proxy at {cl.proxy.address}:")
    for doc in sorted(docs, key=lambda d: str(d.get("node"))):
        print(f"  {doc['call_id']:<28} node {doc.get('node')!s:<6}  s3://{cl.bucket}/{doc['audio']['key']}")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--nodes", type=int, choices=range(2, len(NAMES) + 1), default=2)
    parser.add_argument("--calls", type=int, default=4, help="calls placed through the proxy (default 4)")
    parser.add_argument("--no-stay", dest="stay", action="store_false", help="end after the calls")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="kasuhara-multinode-"))
    prefix = f"multinode{uuid.uuid4().hex[:6]}"
    print(f"multinode: starting {args.nodes} nodes and Kamailio (logs and configs in {home}) ...")
    with (
        fresh_bucket("multinode") as (s3, bucket),
        cluster_up(home, s3, bucket, prefix, NAMES[: args.nodes], ping_s=5) as cl,
    ):
        print(f"proxy (Kamailio, round robin): sip:{cl.proxy.address}   config {cl.proxy.home}")
        for node, config in zip(cl.nodes, cl.configs, strict=True):
            name = config.stem
            print(f"  {name}: SIP 127.0.0.1:{node.sip_port}  ARI http://127.0.0.1:{node.http_port}  {config}")
        print(f"events: mosquitto_sub -t '{prefix}/calls/#' -v     bucket: {bucket}")
        workdir = home / "sipp"
        workdir.mkdir()
        await place_calls(cl, args.calls, workdir)
        if args.stay and sys.stdin.isatty():
            print("\nUp until Ctrl-C (call the proxy with any SIP phone as user 'caller').")
            with contextlib.suppress(asyncio.CancelledError):  # Ctrl-C: everything stops below
                await asyncio.Event().wait()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except KeyboardInterrupt:
        sys.exit(0)
