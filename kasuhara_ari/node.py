"""Which node (Asterisk box + its app) a call, recording or event comes from.

Call ids stay Asterisk's linkedids. With ``systemname`` set in ``asterisk.conf`` Asterisk prefixes every
uniqueid and linkedid with it (``pbx1-1795885134.0``), so ids, object keys and topics are unique across
nodes without any change to their shape; ids of a node without it (``1795885134.0``) stay valid and
readable. The node's name (``general.node``; by default this host's short name) is written into the
metadata (``node``) and every event (``node``), so whoever reads either knows where it came from.
"""

from __future__ import annotations

import re
import socket

from .safe import UnsafeValueError

#: A node name: safe in a call id prefix, an object key, an MQTT topic and a log line. No dot, so
#: ``<node>-<epoch>.<seq>`` never reads as anything else.
NODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
_NOT_NODE_CHAR = re.compile(r"[^A-Za-z0-9_-]+")
#: ``<systemname>-<epoch>.<sequence>``: a linkedid of a node with ``systemname`` set.
_PREFIXED_ID = re.compile(r"(?P<node>[A-Za-z0-9][A-Za-z0-9_-]{0,31})-[0-9]{9,11}\.[0-9]+")


def is_safe_node_name(value: object) -> bool:
    return isinstance(value, str) and NODE_RE.fullmatch(value) is not None


def safe_node_name(value: object) -> str:
    """``value`` if it is a node name (``[A-Za-z0-9][A-Za-z0-9_-]{0,31}``); never "fixed" (a fixed name
    could be another node's)."""
    if not is_safe_node_name(value):
        raise UnsafeValueError(f"not a node name (letters, digits, _ and -, at most 32): {str(value)[:40]!r}")
    assert isinstance(value, str)
    return value


def default_node_name(hostname: str | None = None) -> str:
    """This host's short name made safe (``pbx-1.example.jp`` → ``pbx-1``): the default when
    ``general.node`` is not set. Derived here, not taken from Asterisk, so every command (``serve``,
    ``agi``, ``retention``) knows it without reaching Asterisk."""
    short = (hostname if hostname is not None else socket.gethostname()).split(".", 1)[0]
    name = _NOT_NODE_CHAR.sub("-", short).strip("-_")[:32].strip("-_")
    return name if is_safe_node_name(name) else "node"


def node_name(configured: str, hostname: str | None = None) -> str:
    """The node's name: ``general.node`` when set (validated by the config), else the host's."""
    return configured or default_node_name(hostname)


def node_of_call_id(call_id: str) -> str | None:
    """The ``systemname`` prefix of a linkedid (``pbx1-1795885134.0`` → ``pbx1``); ``None`` for a plain
    single-node id or a call id of another shape (a second channel's ``<linkedid>-<uniqueid>``)."""
    m = _PREFIXED_ID.fullmatch(call_id)
    return m["node"] if m else None
