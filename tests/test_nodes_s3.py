"""A bucket shared by nodes, with a recording from before (plain single-node id ``1735779600.1``, no
``node`` in its metadata) and one per node whose ids differ only by the ``systemname`` prefix: every
command reads each of them as its own recording (list, show, download, hold, export, retention, the
console's index)."""

from __future__ import annotations

import asyncio
import json
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner, Result

from kasuhara_ari.cli import main
from kasuhara_ari.evidence.index import EvidenceIndex, Query
from kasuhara_ari.node import node_of_call_id
from kasuhara_ari.storage import MinioStore

from recordings_seed import Seeded, cli_env, live_keys, seed
from s3_fixture import S3Target, create_bucket, destroy_bucket, open_store, require_s3, unique_bucket

pytestmark = pytest.mark.integration
TOKYO = ZoneInfo("Asia/Tokyo")
JAN2 = datetime(2025, 1, 2, 10, 0, tzinfo=TOKYO)
#: The same Asterisk uniqueid on a node without systemname (before) and on two named nodes.
IDS = {"old": "1735779600.1", "pbx1": "pbx1-1735779600.1", "pbx2": "pbx2-1735779600.1"}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var == "KASUHARA_CONFIG" or (var.startswith("KASUHARA_") and "__" in var):
            monkeypatch.delenv(var)


@dataclass
class Env:
    target: S3Target
    bucket: str
    store: MinioStore
    env: dict[str, str]
    calls: dict[str, Seeded]


@pytest.fixture
def shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    target = require_s3()
    bucket = unique_bucket("kt-nodes")
    store = open_store(target, bucket, read_timeout_s=30.0)
    create_bucket(store)
    monkeypatch.chdir(tmp_path)

    async def seed_all() -> dict[str, Seeded]:
        out = {}
        for i, (name, cid) in enumerate(IDS.items()):
            extra: dict[str, Any] = {} if name == "old" else {"node": name}
            out[name] = await seed(
                store, cid, JAN2 + timedelta(minutes=i), audio=f"RIFF audio of {name}".encode(), **extra
            )
        return out

    try:
        yield Env(target, bucket, store, cli_env(target, bucket), asyncio.run(seed_all()))
    finally:
        store.close()
        destroy_bucket(target, bucket)


def invoke(env: dict[str, str], *args: str) -> Result:
    result = CliRunner().invoke(main, list(args), env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def test_node_of_call_id() -> None:
    assert node_of_call_id(IDS["pbx1"]) == "pbx1"
    assert node_of_call_id(IDS["old"]) is None
    assert node_of_call_id("pbx1-1735779600.1-pbx1-1735779600.2") is None  # a second AGI channel's id


def test_old_and_node_ids_side_by_side_in_every_command(shared: Env, tmp_path: Path) -> None:
    env, calls = shared.env, shared.calls
    listed = invoke(env, "recordings", "list", "--json", "--from", "2025-01-02", "--to", "2025-01-02")
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert sorted(r["call_id"] for r in rows) == sorted(IDS.values())

    for name, cid in IDS.items():
        shown = invoke(env, "recordings", "show", cid, "--json")
        assert shown.exit_code == 0, shown.output
        doc = json.loads(shown.stdout)["metadata"]
        assert doc["call_id"] == cid and doc.get("node") == (None if name == "old" else name)
        got = invoke(env, "recordings", "download", cid, "--reason", "complaint")
        assert got.exit_code == 0, got.output
        assert (tmp_path / f"{cid}.wav").read_bytes() == calls[name].audio

    for cid in (IDS["old"], IDS["pbx2"]):
        held = invoke(env, "recordings", "hold", cid, "--reason", "threats")
        assert held.exit_code == 0, held.output
    flagged = invoke(
        env, "recordings", "list", "--json", "--from", "2025-01-02", "--to", "2025-01-02", "--held"
    )
    assert sorted(r["call_id"] for r in json.loads(flagged.stdout)) == sorted([IDS["old"], IDS["pbx2"]])

    out = tmp_path / "evidence.zip"
    exported = invoke(
        env,
        "recordings",
        "export",
        "--from",
        "2025-01-02",
        "--to",
        "2025-01-02",
        "-o",
        str(out),
        "--reason",
        "r",
    )
    assert exported.exit_code == 0, exported.output
    with zipfile.ZipFile(out) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        assert sorted(r["call_id"] for r in manifest["recordings"]) == sorted(IDS.values())
        for name, cid in IDS.items():
            assert zf.read(f"{cid}/audio.wav") == calls[name].audio

    # The console's index (what `kasuhara web` searches) has all three.
    async def indexed() -> list[str]:
        index = EvidenceIndex(tmp_path / "index.sqlite", shared.store, source="test")
        await index.open()
        try:
            await index.rebuild()
            page = await index.search(
                Query(start=datetime(2025, 1, 1, tzinfo=UTC), end=datetime(2025, 1, 3, tzinfo=UTC))
            )
        finally:
            index.close()
        return sorted(r.call_id for r in page.rows)

    assert asyncio.run(indexed()) == sorted(IDS.values())

    # Retention, once they are old enough: the held ones stay, whatever their id's shape.
    swept = invoke({**env, "KASUHARA_RETENTION__DAYS": "30"}, "retention", "run", "--json")
    assert swept.exit_code == 0, swept.output
    assert sorted(p["call_id"] for p in json.loads(swept.stdout)["purged"]) == [IDS["pbx1"]]
    left = asyncio.run(live_keys(shared.store))
    assert left == {
        k for name in ("old", "pbx2") for k in (calls[name].keys.audio, calls[name].keys.metadata)
    }
