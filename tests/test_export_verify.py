"""Signed exports: `kasuhara storage init` makes the key, `recordings export` signs, `export verify` checks
offline with only the public key — and names every altered, missing or extra file. Over the real S3."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
import subprocess
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kasuhara_ari.cli import main
from kasuhara_ari.signing import (
    PUBLIC_KEY_OBJECT,
    SIGNATURE_NAME,
    ExportSigner,
    ensure_private_key,
    fingerprint,
    public_pem,
    publish_public_key,
)
from kasuhara_ari.storage import MinioStore

from recordings_seed import Seeded, cli_env, seed
from s3_fixture import S3Target, create_bucket, destroy_bucket, open_store, require_s3, unique_bucket

pytestmark = pytest.mark.integration
TOKYO = ZoneInfo("Asia/Tokyo")
T0 = datetime(2025, 3, 10, 9, 0, tzinfo=TOKYO)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var == "KASUHARA_CONFIG" or (var.startswith("KASUHARA_") and "__" in var):
            monkeypatch.delenv(var)


def invoke(env: dict[str, str], *args: str) -> Result:
    result = CliRunner().invoke(main, list(args), env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result


@dataclass
class Env:
    target: S3Target
    bucket: str
    store: MinioStore
    env: dict[str, str]
    calls: list[Seeded]
    key_file: Path
    tmp: Path


@pytest.fixture
def s3env(tmp_path: Path) -> Iterator[Env]:
    target = require_s3()
    bucket = unique_bucket("kt-signed")
    store = open_store(target, bucket, read_timeout_s=30.0)
    create_bucket(store)

    async def seed_all() -> list[Seeded]:
        return [
            await seed(store, "1741564800.1", T0, flags=["harassment"]),
            await seed(store, "1741568400.2", T0.replace(hour=10)),
        ]

    calls = asyncio.run(seed_all())
    key_file = tmp_path / "keys" / "export-signing.key"
    env = cli_env(target, bucket, KASUHARA_ADMIN__SIGNING_KEY=str(key_file))
    try:
        yield Env(target, bucket, store, env, calls, key_file, tmp_path)
    finally:
        store.close()
        destroy_bucket(target, bucket)


def make_key(e: Env) -> Ed25519PrivateKey:
    """The key pair as `storage init` leaves it (test_storage_init_* covers init itself)."""
    key, created = ensure_private_key(e.key_file)
    assert created
    assert asyncio.run(publish_public_key(e.store, key)) == "published"
    return key


def export(e: Env, name: str = "evidence.zip") -> Path:
    out = e.tmp / name
    result = invoke(
        e.env,
        "recordings",
        "export",
        "--from",
        "2025-03-10",
        "--to",
        "2025-03-10",
        "-o",
        str(out),
        "--reason",
        "police request",
    )
    assert result.exit_code == 0, result.output
    return out


def write_pub(e: Env, key: Ed25519PrivateKey, name: str = "export-signing.pub") -> Path:
    path = e.tmp / name
    path.write_bytes(public_pem(key))
    return path


def rewrite(src: Path, dst: Path, change: Callable[[dict[str, bytes]], None]) -> Path:
    """A copy of a zip with its entries changed by ``change`` (name -> content)."""
    with zipfile.ZipFile(src) as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    change(entries)
    with zipfile.ZipFile(dst, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return dst


def resum(entries: dict[str, bytes]) -> None:
    """Recompute SHA256SUMS as a forger would, so `sha256sum -c` passes again."""
    names = [n for n in entries if n not in ("SHA256SUMS", SIGNATURE_NAME)]
    entries["SHA256SUMS"] = "".join(
        f"{hashlib.sha256(entries[n]).hexdigest()}  {n}\n" for n in names
    ).encode()


def verify(e: Env, zip_path: Path, *extra: str) -> Result:
    return invoke(e.env, "export", "verify", str(zip_path), *extra)


def verdicts(result: Result) -> dict[str, str]:
    """name -> status from `export verify --json` output."""
    doc = json.loads(result.stdout)
    return {f["name"]: f["status"] for f in doc["files"] if f["status"] != "ok"}


def test_storage_init_creates_the_key_and_publishes_the_public_half(s3env: Env) -> None:
    e = s3env
    first = invoke(e.env, "storage", "init", "--no-policies")
    assert first.exit_code == 0, first.output
    assert stat.S_IMODE(e.key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(e.key_file.parent.stat().st_mode) == 0o700
    key, created = ensure_private_key(e.key_file)
    assert not created
    published = asyncio.run(e.store.get_bytes(PUBLIC_KEY_OBJECT))
    assert published == public_pem(key)
    assert fingerprint(key.public_key()) in first.output and "BEGIN PUBLIC KEY" in first.output
    assert "created" in first.output and "published" in first.output
    # The private key never goes to the bucket.
    keys = [o.object_name for o in e.store.client.list_objects(e.bucket, recursive=True)]
    assert not [k for k in keys if "PRIVATE" in (asyncio.run(e.store.get_bytes(k)) or b"").decode("latin-1")]
    before = e.key_file.read_bytes()
    again = invoke(e.env, "storage", "init", "--no-policies")
    assert again.exit_code == 0 and "unchanged" in again.output and "exists" in again.output
    assert e.key_file.read_bytes() == before  # never replaced
    # A key others can read is refused, not used.
    e.key_file.chmod(0o644)
    loose = invoke(e.env, "storage", "init", "--no-policies")
    assert loose.exit_code == 2 and "readable by others" in loose.output


def test_a_signed_export_verifies_offline(s3env: Env) -> None:
    e = s3env
    key = make_key(e)
    out = export(e)
    with zipfile.ZipFile(out) as zf:
        assert SIGNATURE_NAME in zf.namelist()
    pub = write_pub(e, key)
    ok = verify(e, out, "--public-key", str(pub))
    assert ok.exit_code == 0, ok.output
    assert "VALID" in ok.stdout and "MISMATCH" not in ok.stdout
    for call in e.calls:
        assert f"OK          {call.call_id}/audio.wav" in ok.stdout
    # Offline: no S3 at all (a config pointing nowhere), only the zip and the public key file.
    offline = {k: v for k, v in e.env.items() if not k.startswith("KASUHARA_")}
    offline["KASUHARA_STORAGE__ENDPOINT"] = "127.0.0.1:9"
    assert invoke(offline, "export", "verify", str(out), "--public-key", str(pub)).exit_code == 0
    # Without --public-key: the key published in the bucket.
    assert verify(e, out).exit_code == 0
    # And the zip still checks with plain sha256sum.
    root = e.tmp / "x"
    with zipfile.ZipFile(out) as zf:
        zf.extractall(root)
    assert (
        subprocess.run(["sha256sum", "--strict", "-c", "SHA256SUMS"], cwd=root, check=False).returncode == 0
    )


def test_altered_exports_fail_and_name_the_file(s3env: Env) -> None:
    e = s3env
    key = make_key(e)
    out = export(e)
    pub = str(write_pub(e, key))
    audio = f"{e.calls[0].call_id}/audio.wav"
    timeline = f"{e.calls[1].call_id}/timeline.json"

    def flip_audio(z: dict[str, bytes]) -> None:
        data = bytearray(z[audio])
        data[-1] ^= 1
        z[audio] = bytes(data)

    def forge_manifest(z: dict[str, bytes]) -> None:
        doc = json.loads(z["manifest.json"])
        doc["reason"] = "routine"
        z["manifest.json"] = json.dumps(doc).encode()
        resum(z)  # consistent for sha256sum -c: only the signature can tell

    def forge_timeline(z: dict[str, bytes]) -> None:
        z[timeline] = b'{"events": []}'
        resum(z)

    def extra_file(z: dict[str, bytes]) -> None:
        z["README.txt"] = b"planted"

    def drop_file(z: dict[str, bytes]) -> None:
        del z[audio]

    def drop_signature(z: dict[str, bytes]) -> None:
        del z[SIGNATURE_NAME]

    def other_signer(z: dict[str, bytes]) -> None:
        forge_manifest(z)
        z[SIGNATURE_NAME] = ExportSigner(Ed25519PrivateKey.generate()).sign_export(
            z["manifest.json"], z["SHA256SUMS"]
        )

    cases: list[tuple[Callable[[dict[str, bytes]], None], str, dict[str, str]]] = [
        (flip_audio, "valid", {audio: "mismatch"}),
        (forge_manifest, "valid", {"manifest.json": "mismatch", "SHA256SUMS": "mismatch"}),
        (forge_timeline, "valid", {"SHA256SUMS": "mismatch"}),
        (extra_file, "valid", {"README.txt": "unlisted"}),
        (drop_file, "valid", {audio: "missing"}),
        (drop_signature, "missing", {"manifest.json": "unsigned", "SHA256SUMS": "unsigned"}),
        (other_signer, "wrong_key", {"manifest.json": "unsigned", "SHA256SUMS": "unsigned"}),
    ]
    for change, signature, expected in cases:
        bad = rewrite(out, e.tmp / f"{change.__name__}.zip", change)
        result = verify(e, bad, "--public-key", pub, "--json")
        assert result.exit_code == 1, (change.__name__, result.output)
        doc = json.loads(result.stdout)
        assert doc["ok"] is False and doc["signature"] == signature, (change.__name__, doc)
        assert verdicts(result) == expected, change.__name__
        text = verify(e, bad, "--public-key", pub)
        assert text.exit_code == 1 and "NOT VERIFIED" in text.output
        for name in expected:
            assert name in text.stdout


def test_an_unsigned_export_is_made_with_a_warning_and_does_not_verify(s3env: Env) -> None:
    e = s3env
    out = export(e)  # no key file: the export works, unsigned
    with zipfile.ZipFile(out) as zf:
        assert SIGNATURE_NAME not in zf.namelist()
    pub = write_pub(e, Ed25519PrivateKey.generate())
    result = verify(e, out, "--public-key", str(pub))
    assert result.exit_code == 1 and "not signed" in result.stdout


def test_bad_inputs_are_usage_errors_not_tracebacks(s3env: Env) -> None:
    e = s3env
    garbage = e.tmp / "key.pub"
    garbage.write_text("not a key")
    notzip = e.tmp / "x.zip"
    notzip.write_bytes(b"PK\x03\x04 truncated")
    assert verify(e, notzip, "--public-key", str(garbage)).exit_code == 2
    pub = write_pub(e, Ed25519PrivateKey.generate())
    result = verify(e, notzip, "--public-key", str(pub))
    assert result.exit_code == 1 and "not a readable zip" in result.output
    assert verify(e, e.tmp / "absent.zip").exit_code == 2
    # No key in the bucket and no --public-key: a configuration problem.
    assert verify(e, notzip).exit_code == 2
