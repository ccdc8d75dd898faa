"""``kasuhara export verify ZIP``: check an evidence zip offline — signature and every file's hash."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import click

from ..signing import (
    PUBLIC_KEY_OBJECT,
    SigningError,
    ZipVerification,
    fingerprint,
    load_public_key,
    read_public_key_file,
    verify_zip,
)
from .admin import finish, open_store, run_async, text
from .common import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, config_option, load_config


@click.group()
def export() -> None:
    """Evidence exports (`kasuhara recordings export` makes them).

    \b
    Exit codes: 0 verified, 1 not verified (each file named), 2 bad usage or configuration.
    """


def _public_key_from_bucket(config_path: str | None) -> bytes:
    cfg = load_config(config_path)
    store = open_store(cfg, role="admin", command="export verify")

    async def go() -> bytes | None:
        try:
            return await store.get_bytes(PUBLIC_KEY_OBJECT, max_bytes=64 * 1024)
        finally:
            store.close()

    data = run_async(cfg, go)
    if data is None:
        finish(EXIT_CONFIG, f"no {PUBLIC_KEY_OBJECT} in the bucket (kasuhara storage init publishes it)")
    return data


@export.command("verify")
@config_option
@click.argument("zip_path", metavar="ZIP", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--public-key",
    "public_key",
    metavar="FILE",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The export signing public key (PEM). Without it: keys/export-signing.pub from the bucket.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object with every file's verdict.")
def verify(config_path: str | None, zip_path: Path, public_key: Path | None, as_json: bool) -> None:
    """Check ZIP's Ed25519 signature and every file's sha256, offline with only the public key.

    \b
    manifest.sig signs the sha256 of manifest.json and SHA256SUMS; SHA256SUMS lists every other file.
    A file that differs, is missing, or is in the zip without a listed hash fails the check, as does a
    missing or foreign signature. Exit 0 only when everything verifies.
    """
    try:
        if public_key is not None:
            key = read_public_key_file(public_key)
            source = str(public_key)
        else:
            key = load_public_key(_public_key_from_bucket(config_path))
            source = f"bucket {PUBLIC_KEY_OBJECT}"
    except SigningError as exc:
        finish(EXIT_CONFIG, str(exc))
    try:
        result = verify_zip(zip_path, key)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        finish(EXIT_FAILED, f"{text(zip_path)}: not a readable zip: {text(exc)}")
    if as_json:
        click.echo(json.dumps({"zip": str(zip_path), "public_key": fingerprint(key), **result.as_dict()}))
    else:
        _print(result, source, fingerprint(key))
    raise SystemExit(EXIT_OK if result.ok else EXIT_FAILED)


def _print(result: ZipVerification, source: str, key: str) -> None:
    click.echo(f"public key   {key} ({text(source, 120)})")
    click.echo(f"signature    {result.signature.upper()}  {text(result.signature_detail, 160)}")
    if result.signed_at:
        click.echo(f"signed at    {text(result.signed_at, 40)}")
    for f in result.files:
        click.echo(
            f"{f.status.upper():<10}  {text(f.name, 120)}" + (f"  {text(f.detail, 160)}" if f.detail else "")
        )
    good = sum(1 for f in result.files if f.status == "ok")
    verdict = "VERIFIED" if result.ok else "NOT VERIFIED"
    click.echo(f"{verdict}: {good} of {len(result.files)} file(s) ok, signature {result.signature}", err=True)
