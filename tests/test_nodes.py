"""Node identity: the name's rules, its default, the config key, and the ``node`` field on events."""

from __future__ import annotations

import json

import pytest

from kasuhara_ari.config import ConfigError, MqttConfig, load
from kasuhara_ari.events import MqttEvents
from kasuhara_ari.node import default_node_name, node_name, node_of_call_id, safe_node_name
from kasuhara_ari.safe import UnsafeValueError, is_safe_call_id


@pytest.mark.parametrize("name", ["pbx1", "PBX-2", "tokyo_a", "a" * 32])
def test_node_names_accepted(name: str) -> None:
    assert safe_node_name(name) == name
    # A node name prefixed to a uniqueid is still a safe call id (keys, topics, paths).
    assert is_safe_call_id(f"{name}-1795885134.0")


@pytest.mark.parametrize("name", ["", "-pbx", "pbx.1", "pbx/1", "pbx 1", "a" * 33, "ノード", "pbx\n1", "+1"])
def test_node_names_refused(name: str) -> None:
    with pytest.raises(UnsafeValueError):
        safe_node_name(name)


def test_default_is_the_short_host_name_made_safe() -> None:
    assert default_node_name("pbx-1.example.jp") == "pbx-1"
    assert default_node_name("My Box (2)") == "My-Box-2"
    assert default_node_name("...") == "node"
    assert default_node_name("x" * 80) == "x" * 32
    assert node_name("", "pbx9.local") == "pbx9"
    assert node_name("pbx1", "pbx9.local") == "pbx1"


def test_config_key_is_validated() -> None:
    assert load(None, env={"KASUHARA_GENERAL__NODE": "pbx1"}).general.node == "pbx1"
    assert load(None, env={}).general.node == ""
    with pytest.raises(ConfigError, match=r"general\.node"):
        load(None, env={"KASUHARA_GENERAL__NODE": "../etc"})


def test_node_of_call_id() -> None:
    assert node_of_call_id("pbx1-1795885134.0") == "pbx1"
    assert node_of_call_id("tokyo-a-1795885134.12") == "tokyo-a"
    assert node_of_call_id("1795885134.0") is None
    assert node_of_call_id("1795885134.0-1795885134.1") is None


def test_every_event_names_the_node() -> None:
    events = MqttEvents(MqttConfig(), node="pbx1")
    events.emit("started", "pbx1-1795885134.0", direction="inbound")
    events.emit("retention.purged", "1795885134.0", objects=2)
    events.emit("ended", "pbx1-1795885134.0", node="given")  # a field the caller sets wins
    payloads = [json.loads(o.payload) for o in events._buffer]
    assert [p["node"] for p in payloads] == ["pbx1", "pbx1", "given"]
    assert json.loads(events._status("online", "connected"))["node"] == "pbx1"
    # Without a node (a CLI's publisher, tests): no field, as before.
    plain = MqttEvents(MqttConfig())
    plain.emit("started", "1795885134.0", direction="inbound")
    assert "node" not in json.loads(plain._buffer[0].payload)
