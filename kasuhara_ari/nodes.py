"""Which node's ARI to talk to about a call: the call id names its node.

With several nodes behind a SIP proxy, a call lives on one Asterisk, and only that Asterisk's ARI can
join it (``kasuhara supervise``, the console's join button). The call id says which node: a node with
``systemname`` set (*Several nodes* in the README) prefixes every linkedid with its name
(``nodeb-1795885134.0``), and ``[nodes]`` maps that name to the node's ARI url. No lookup in MQTT or the
bucket is needed, so resolution works while the broker is away and cannot be misled by a forged event.

- an id without a node prefix (a single-node install) → this config's own ``ari.url``;
- an id naming this node (``general.node``) → ``ari.url``;
- an id naming a node in ``[nodes]`` → that url, with the same ARI user (``ari.username``/``password``);
- any other node → :class:`UnknownNode` (a configuration gap, said as such, never a guess).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Config
from .node import node_name, node_of_call_id


class UnknownNode(LookupError):
    """The call id names a node that is neither this one nor in ``[nodes]``."""


@dataclass(frozen=True)
class NodeTarget:
    """The node that carries a call and where its ARI is."""

    node: str
    ari_url: str


def node_for_call(cfg: Config, call_id: str) -> NodeTarget:
    """The node carrying ``call_id`` (a safe call id) and its ARI url."""
    own = node_name(cfg.general.node)
    named = node_of_call_id(call_id)
    if named is None or named == own:
        return NodeTarget(own, cfg.ari.url)
    url = cfg.nodes.ari.get(named)
    if url is None:
        known = ", ".join(sorted({own, *cfg.nodes.ari})) or "none"
        raise UnknownNode(
            f"call {call_id} is on node {named}, which is not in [nodes] (known: {known}); "
            f'add {named} = "http://HOST:PORT" (its ARI url) to [nodes]'
        )
    return NodeTarget(named, url)
