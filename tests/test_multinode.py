"""Call → node resolution (kasuhara_ari/nodes.py) and the ``[nodes]`` table: which node's ARI ``kasuhara
supervise`` and the console's join button talk to. Pure logic; the real proof over SIP, with two nodes
behind Kamailio, is tests/test_multinode_sip.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kasuhara_ari.config import ConfigError, load
from kasuhara_ari.events import NullEvents
from kasuhara_ari.nodes import NodeTarget, UnknownNode, node_for_call
from kasuhara_ari.supervision import SupervisionSession

from conftest import REPO

CONFIG = """[general]
node = "nodea"

[ari]
url = "http://127.0.0.1:18088"
password = "x"

[nodes]
nodea = "http://127.0.0.1:18088"
nodeb = "http://10.0.0.12:8088"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kasuhara.toml"
    path.write_text(text)
    return path


def test_the_call_id_names_the_node_and_nodes_says_where_its_ari_is(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, CONFIG), env={})
    assert dict(cfg.nodes.ari) == {"nodea": "http://127.0.0.1:18088", "nodeb": "http://10.0.0.12:8088"}
    assert node_for_call(cfg, "nodeb-1795885134.0") == NodeTarget("nodeb", "http://10.0.0.12:8088")
    assert node_for_call(cfg, "nodea-1795885134.0") == NodeTarget("nodea", "http://127.0.0.1:18088")
    # A single-node id (no systemname): this config's own Asterisk, as before.
    assert node_for_call(cfg, "1795885134.0") == NodeTarget("nodea", "http://127.0.0.1:18088")
    with pytest.raises(UnknownNode, match=r"nodec.*\[nodes\]"):
        node_for_call(cfg, "nodec-1795885134.0")


def test_without_nodes_only_this_node_and_plain_ids_resolve() -> None:
    cfg = load(None, env={"KASUHARA_GENERAL__NODE": "pbx1", "KASUHARA_ARI__URL": "http://127.0.0.1:9"})
    assert node_for_call(cfg, "pbx1-1795885134.0").ari_url == "http://127.0.0.1:9"
    assert node_for_call(cfg, "1795885134.0").ari_url == "http://127.0.0.1:9"
    with pytest.raises(UnknownNode):
        node_for_call(cfg, "pbx2-1795885134.0")


def test_nodes_from_the_environment() -> None:
    cfg = load(None, env={"KASUHARA_NODES__ARI": '{"pbx2": "https://pbx2.example.jp:8089"}'})
    assert node_for_call(cfg, "pbx2-1795885134.0").ari_url == "https://pbx2.example.jp:8089"


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ('"bad.name" = "http://x:8088"', "not a node name"),
        ('pbx2 = "ftp://x"', "nodes.pbx2"),
        ('pbx2 = "http://kasuhara:secret@x:8088"', "without credentials"),
    ],
)
def test_bad_nodes_entries_are_config_errors(tmp_path: Path, entry: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load(write(tmp_path, f"[nodes]\n{entry}\n"), env={})


def test_a_supervision_session_talks_to_the_calls_node(tmp_path: Path) -> None:
    """Before: the session always used ari.url (this node), so a call on node B was 'not found'."""
    cfg = load(write(tmp_path, CONFIG), env={})
    session = SupervisionSession(cfg, "nodeb-1795885134.0", "listen", "PJSIP/boss@proxy", events=NullEvents())
    assert session.ari_url == "http://10.0.0.12:8088"
    with pytest.raises(UnknownNode):
        SupervisionSession(cfg, "nodec-1795885134.0", "listen", "PJSIP/boss@proxy", events=NullEvents())


def test_supervise_a_call_on_an_unknown_node_is_a_config_error(tmp_path: Path) -> None:
    config = write(tmp_path, CONFIG)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kasuhara_ari.cli",
            "supervise",
            "nodec-1795885134.0",
            "--config",
            f"{config}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2, done.stderr
    assert "nodec" in done.stderr and "[nodes]" in done.stderr


async def test_the_console_refuses_to_join_a_call_on_a_node_it_does_not_know() -> None:
    """Before: the join went to this node's ARI (202, the phone rang, then 'no live call')."""
    from test_board import PREFIX, board_console, started, the_feed
    from test_web_auth import login, page_token

    from kasuhara_ari.events import encode

    call_id = "nodec-1795885134.0"
    async with board_console() as console:
        feed = the_feed(console)
        feed.connected()
        feed.handle(f"{PREFIX}/calls/{call_id}/started", encode(started(call_id)))
        async with console.client() as supervisor:
            await login(supervisor, "super1")
            token = await page_token(supervisor)
            refused = await supervisor.post(
                "/board/join",
                data={"csrf": token, "call_id": call_id, "mode": "listen"},
                headers={"origin": console.url},
            )
    assert refused.status_code == 409 and "[nodes]" in refused.json()["message"], refused.text
