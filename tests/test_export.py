"""``kasuhara recordings export``: the evidence zip verifies with ``sha256sum -c``; tampering fails loudly."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner, Result
from uploader_helpers import wav_bytes

from kasuhara_ari.cli import main
from kasuhara_ari.storage import AUDIT_PREFIX, MinioStore

from recordings_seed import Seeded, cli_env, read_json, seed
from s3_fixture import S3Target, create_bucket, destroy_bucket, open_store, require_s3, unique_bucket

pytestmark = pytest.mark.integration
TOKYO = ZoneInfo("Asia/Tokyo")
T0 = datetime(2025, 3, 10, 9, 0, tzinfo=TOKYO)


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

    def export(self, out: Path, *args: str) -> Result:
        result = CliRunner().invoke(
            main,
            ["recordings", "export", "-o", str(out), "--reason", "police request 7", *args],
            env=self.env,
        )
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        return result

    def audit(self, action: str) -> list[dict[str, Any]]:
        async def go() -> list[dict[str, Any]]:
            docs = [await read_json(self.store, o.key) async for o in self.store.list_prefix(AUDIT_PREFIX)]
            return [d for d in docs if d["action"] == action]

        records: list[dict[str, Any]] = asyncio.run(go())
        return records


@pytest.fixture
def s3env(tmp_path: Path) -> Iterator[Env]:
    target = require_s3()
    bucket = unique_bucket("kt-export")
    store = open_store(target, bucket, read_timeout_s=30.0)
    create_bucket(store)

    async def seed_all() -> dict[str, Seeded]:
        timeline = [
            {"event": "started", "at": T0.isoformat(), "direction": "inbound"},
            {"event": "escalation_requested", "at": (T0 + timedelta(seconds=30)).isoformat(), "key": "*9"},
            {"event": "flagged", "at": (T0 + timedelta(seconds=31)).isoformat()},
        ]
        return {
            "big": await seed(
                store,
                "1741564800.1",
                T0,
                audio=wav_bytes(3_000_000, seed=7),
                flags=["harassment"],
                timeline=timeline,
            ),
            "small": await seed(store, "1741568400.2", T0 + timedelta(hours=1)),
            "silent": await seed(store, "1741572000.3", T0 + timedelta(hours=2), with_audio=False),
            "later": await seed(store, "1742169600.4", T0 + timedelta(days=7)),
        }

    calls = asyncio.run(seed_all())
    try:
        yield Env(target, bucket, store, cli_env(target, bucket), calls)
    finally:
        store.close()
        destroy_bucket(target, bucket)


def unpack(zip_path: Path, into: Path) -> Path:
    into.mkdir()
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(into)
    return into


def sha256sum_check(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sha256sum", "--strict", "-c", "SHA256SUMS"],
        cwd=directory,
        capture_output=True,
        text=True,
        check=False,
    )


def test_export_zip_verifies_with_sha256sum(s3env: Env, tmp_path: Path) -> None:
    out = tmp_path / "evidence.zip"
    result = s3env.export(out, "--from", "2025-03-10", "--to", "2025-03-10")
    assert result.exit_code == 0, result.output
    assert "3 recording(s)" in result.stdout
    root = unpack(out, tmp_path / "x")
    check = sha256sum_check(root)
    assert check.returncode == 0, check.stdout + check.stderr
    # audio (one of the three calls has none), metadata, timelines, manifest
    assert check.stdout.count(": OK") == 2 + 3 + 3 + 1

    big, silent = s3env.calls["big"], s3env.calls["silent"]
    assert (root / big.call_id / "audio.wav").read_bytes() == big.audio
    assert not (root / silent.call_id / "audio.wav").exists()
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["schema"] == "kasuhara.export/1" and manifest["created_by"] == "test-admin"
    assert manifest["reason"] == "police request 7"
    assert [r["call_id"] for r in manifest["recordings"]] == [
        big.call_id,
        s3env.calls["small"].call_id,
        silent.call_id,
    ]
    entry = manifest["recordings"][0]
    assert (
        entry["audio"]["sha256"]
        == json.loads((root / big.call_id / "metadata.json").read_text())["audio"]["sha256"]
    )
    timeline = json.loads((root / big.call_id / "timeline.json").read_text())
    assert [e["event"] for e in timeline["events"]] == ["started", "escalation_requested", "flagged"]
    assert manifest["recordings"][2]["audio"]["path"] is None
    # The metadata in the zip is byte for byte the stored object.
    stored = asyncio.run(s3env.store.get_bytes(big.keys.metadata))
    assert (root / big.call_id / "metadata.json").read_bytes() == stored

    started, record = s3env.audit("export")
    assert started["result"] == "started" and record["result"] == "done"
    assert record["reason"] == "police request 7"
    assert sorted(record["target"]["call_ids"]) == sorted(r["call_id"] for r in manifest["recordings"])
    assert record["details"]["zip_sha256"] in result.stdout
    # The manifest names the export's own audit record (written before anything was read) and, per
    # object, the version exported, how it was verified, its legal hold and LastModified.
    assert manifest["audit_key"] == record["details"]["started_record"]
    assert manifest["audit_key"].endswith(f"-{started['id']}.json")
    assert manifest["summary"] == {"verification": {"verified": 5}, "superseded": 0}
    for part in ("audio", "metadata"):
        obj = entry[part]
        assert obj["verification"] == "verified" and obj["version_id"] and obj["superseded_by"] == []
        assert obj["legal_hold"] is False and obj["last_modified"]
    assert entry["hold_record"] is None

    # The check is real: change one byte of an exported file and sha256sum -c fails.
    audio = root / big.call_id / "audio.wav"
    data = bytearray(audio.read_bytes())
    data[1000] ^= 0xFF
    audio.write_bytes(bytes(data))
    assert sha256sum_check(root).returncode != 0


def test_export_filters_and_single_calls(s3env: Env, tmp_path: Path) -> None:
    flagged = tmp_path / "flagged.zip"
    assert s3env.export(flagged, "--from", "2025-03-01", "--to", "2025-03-31", "--flagged").exit_code == 0
    with zipfile.ZipFile(flagged) as zf:
        assert sorted(n.split("/")[0] for n in zf.namelist() if "/" in n) == [s3env.calls["big"].call_id] * 3
    one = tmp_path / "one.zip"
    result = s3env.export(one, "--call", s3env.calls["later"].call_id)
    assert result.exit_code == 0, result.output
    root = unpack(one, tmp_path / "one")
    assert sha256sum_check(root).returncode == 0
    empty = tmp_path / "empty.zip"
    nothing = s3env.export(empty, "--from", "2024-01-01", "--to", "2024-01-02")
    assert nothing.exit_code == 0 and "nothing to export" in nothing.output
    assert not empty.exists()
    assert s3env.export(one, "--call", s3env.calls["later"].call_id).exit_code == 2  # exists: needs --force


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_a_swapped_recording_exports_the_pinned_version_as_superseded(s3env: Env, tmp_path: Path) -> None:
    """A held call whose audio AND metadata are replaced by consistent forgeries (new bytes, matching
    sha256 headers, metadata naming the new hash): the shipped export read the latest versions and
    passed them as verified. Now the pinned versions are exported and the export says superseded (4)."""
    from recordings_seed import hold

    small = s3env.calls["small"]
    assert small.audio is not None
    asyncio.run(hold(s3env.store, small))
    forged = bytearray(small.audio)
    forged[-1] ^= 0x01
    forged_sha = hashlib.sha256(forged).hexdigest()
    info = asyncio.run(s3env.store.stat(small.keys.audio))
    assert info is not None
    asyncio.run(
        s3env.store.put_bytes(
            small.keys.audio, bytes(forged), metadata={**info.metadata, "sha256": forged_sha}
        )
    )
    doc = json.loads(asyncio.run(s3env.store.get_bytes(small.keys.metadata)) or b"{}")
    doc["audio"]["sha256"] = forged_sha
    doc["audio"].pop("version_id", None)
    meta = json.dumps(doc).encode()
    meta_info = asyncio.run(s3env.store.stat(small.keys.metadata))
    assert meta_info is not None
    asyncio.run(
        s3env.store.put_bytes(
            small.keys.metadata,
            meta,
            metadata={
                **meta_info.metadata,
                "sha256": hashlib.sha256(meta).hexdigest(),
                "audio-sha256": forged_sha,
            },
        )
    )
    out = tmp_path / "e.zip"
    result = s3env.export(out, "--call", small.call_id)
    assert result.exit_code == 4, result.output
    assert "SUPERSEDED" in result.output and "possible tampering" in result.output
    root = unpack(out, tmp_path / "x")
    assert sha256sum_check(root).returncode == 0
    assert (root / small.call_id / "audio.wav").read_bytes() == small.audio  # the original
    manifest = json.loads((root / "manifest.json").read_text())
    [entry] = manifest["recordings"]
    hold_record = entry["hold_record"]
    assert hold_record is not None and hold_record["reason"] == "threats"
    for part in ("audio", "metadata"):
        obj = entry[part]
        assert obj["verification"] == "verified"
        assert obj["version_id"] == hold_record["versions"][obj["key"]]
        assert obj["legal_hold"] is True
        assert len(obj["superseded_by"]) == 1
    assert entry["superseded"] is True
    assert [r["result"] for r in s3env.audit("export")] == ["started", "superseded"]


async def _raw_recording(
    store: MinioStore, cid: str, audio: bytes, *, audio_header: str | None, in_metadata: str | None
) -> None:
    """A recording written by hand: the capture hashes are whatever the test says (or absent)."""
    from uploader_helpers import metadata

    from kasuhara_ari.storage import recording_keys
    from kasuhara_ari.uploader import AudioResult, encode_metadata, final_metadata

    keys = recording_keys(cid, T0)
    await store.put_bytes(keys.audio, audio, metadata={"sha256": audio_header} if audio_header else {})
    doc = metadata(cid, started_at=T0.isoformat(), caller={"number": "0312345678", "name": None})
    final = final_metadata(doc, keys, AudioResult("stored", keys.audio, len(audio), in_metadata), None)
    data = encode_metadata(final)
    header = {"sha256": hashlib.sha256(data).hexdigest()} if in_metadata else {}
    await store.put_bytes(keys.metadata, data, metadata=header)


def test_missing_capture_hash_is_unverifiable_not_an_integrity_failure(s3env: Env, tmp_path: Path) -> None:
    """No sha256 recorded at capture is missing provenance, not tampering: the export is written, the
    manifest says 'unverifiable', the exit code is 5 (the shipped code refused it as INTEGRITY FAILURE)."""
    cid = "1741566000.8"
    asyncio.run(_raw_recording(s3env.store, cid, b"RIFF old audio", audio_header=None, in_metadata=None))
    out = tmp_path / "e.zip"
    result = s3env.export(out, "--call", cid)
    assert result.exit_code == 5, result.output
    assert "UNVERIFIABLE" in result.output and "INTEGRITY FAILURE" not in result.output
    root = unpack(out, tmp_path / "x")
    assert sha256sum_check(root).returncode == 0
    [entry] = json.loads((root / "manifest.json").read_text())["recordings"]
    assert (entry["audio"]["verification"], entry["metadata"]["verification"]) == (
        "unverifiable",
        "unverifiable",
    )


def test_a_hash_mismatch_fails_the_export_and_says_which_file(s3env: Env, tmp_path: Path) -> None:
    """Bytes that do not match the hash recorded at capture: INTEGRITY FAILURE, exit 1; the zip records
    the file as 'mismatch' (and which one), so the failure itself is evidence."""
    cid = "1741566000.9"
    audio = b"RIFF audio as stored"
    sha = hashlib.sha256(audio).hexdigest()
    asyncio.run(_raw_recording(s3env.store, cid, audio, audio_header="0" * 64, in_metadata=sha))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = s3env.export(out_dir / "e.zip", "--call", cid)
    assert result.exit_code == 1, result.output
    assert "INTEGRITY FAILURE" in result.output
    root = unpack(out_dir / "e.zip", tmp_path / "x")
    [entry] = json.loads((root / "manifest.json").read_text())["recordings"]
    assert entry["audio"]["verification"] == "mismatch"
    assert entry["audio"]["recorded_sha256"] == {"metadata": sha, "object": "0" * 64}
    assert entry["metadata"]["verification"] == "verified"
    assert [r["result"] for r in s3env.audit("export")] == ["started", "integrity_failure"]
