"""``kasuhara storage``: prepare the bucket, print the role policies, show the upload backlog."""

from __future__ import annotations

import asyncio
import json
import sys

import click

from ..signing import (
    PUBLIC_KEY_OBJECT,
    SigningError,
    ensure_private_key,
    fingerprint,
    key_path,
    public_pem,
    publish_public_key,
)
from ..storage import (
    MinioStore,
    StorageError,
    StorageRefused,
    StorageSetupError,
    StorageUnavailable,
    policy_documents,
)
from ..uploader import Spool, Timing, spool_status
from .common import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_REFUSED, config_option, load_config

ROLES = ("service", "retention", "admin")


@click.group()
def storage() -> None:
    """The S3 bucket and the local upload queue.

    \b
    SSE-C (encryption at rest with your own key, no KMS): set storage.sse_c_key (better: the environment
    variable KASUHARA_STORAGE__SSE_C_KEY) to the base64 of 32 random bytes, e.g. `openssl rand -base64 32`,
    and storage.secure = true (S3 servers accept SSE-C only over TLS). The server never stores the key:
    lose it and the recordings cannot be read; admin download/export need it too.
    """


def _policies_json(bucket: str, role: str | None) -> str:
    docs = policy_documents(bucket)
    return json.dumps(docs[role] if role else docs, indent=2)


@storage.command()
@config_option
@click.option(
    "--lifecycle/--no-lifecycle",
    default=True,
    show_default=True,
    help="Add a lifecycle rule dropping multipart uploads a crash left unfinished (after 1 day).",
)
@click.option("--no-policies", is_flag=True, help="Do not print the policy documents.")
@click.option(
    "--signing-key/--no-signing-key",
    default=True,
    show_default=True,
    help="Create the export signing key (admin.signing_key, mode 600) if missing; publish its public key.",
)
@click.option(
    "--default-retention/--no-default-retention",
    default=True,
    show_default=True,
    help="Lock every new object version in GOVERNANCE mode for retention.days (the server refuses early "
    "deletion to all but the admin role's s3:BypassGovernanceRetention).",
)
def init(
    config_path: str | None, lifecycle: bool, no_policies: bool, signing_key: bool, default_retention: bool
) -> None:
    """Create the bucket with object lock (needed for evidence holds) and print the role policies.

    Run it with credentials that may create buckets (not the service's). Safe to run again: an existing
    bucket is checked for object lock, which can only be enabled when a bucket is created. The policy
    documents (service, retention, admin; see DESIGN.md) go to stdout as one JSON object.
    """
    cfg = load_config(config_path)
    try:
        store = MinioStore.from_config(cfg.storage, connect_timeout_s=5.0, read_timeout_s=30.0)
    except StorageSetupError as exc:
        click.echo(f"kasuhara: configuration error: {exc}", err=True)
        raise SystemExit(EXIT_CONFIG) from None
    key_file = key_path(cfg.admin.signing_key)
    try:
        key, key_created = ensure_private_key(key_file) if signing_key else (None, False)
    except SigningError as exc:
        click.echo(f"kasuhara: configuration error: {exc}", err=True)
        raise SystemExit(EXIT_CONFIG) from None
    published = ""
    lock_note: list[str] = []

    async def setup() -> bool:
        nonlocal published
        created = await store.ensure_bucket()
        if default_retention:
            try:
                lock_changed = await store.ensure_default_retention(cfg.retention.days)
            except StorageRefused:
                raise
            except StorageError as exc:
                # moto refuses it on a bucket that already holds objects (AWS and Ceph RGW do not).
                click.echo(
                    f"warning: default retention NOT set ({exc.code or exc}): early deletion is then "
                    "stopped by the roles' policies and legal holds only",
                    err=True,
                )
                lock_note.append("NO default retention (see warning)")
            else:
                lock_note.append(f"default retention GOVERNANCE {cfg.retention.days} days")
                if lock_changed:
                    lock_note.append("(set now)")
        if key is not None:
            published = await publish_public_key(store, key)
        if lifecycle:
            try:
                await store.abort_stale_multipart_rule()
            except StorageError as exc:
                click.echo(f"warning: lifecycle rule not set ({exc.code or exc})", err=True)
        return created

    try:
        created = asyncio.run(setup())
    except StorageRefused as exc:
        click.echo(f"kasuhara: refused: {exc}", err=True)
        raise SystemExit(EXIT_REFUSED) from None
    except (StorageUnavailable, StorageError) as exc:
        click.echo(f"kasuhara: storage init failed: {exc}", err=True)
        raise SystemExit(EXIT_FAILED) from None
    finally:
        store.close()
    verb = "created" if created else "exists"
    click.echo(
        f"bucket {cfg.storage.bucket!r} {verb} on {cfg.storage.endpoint}, object lock enabled"
        + (f", {' '.join(lock_note)}" if lock_note else ", no default retention (--no-default-retention)"),
        err=True,
    )
    if key is not None:
        click.echo(
            f"export signing key: {key_file} ({'created' if key_created else 'exists'}, mode 600, keep it "
            f"off the bucket); public key {published} at {PUBLIC_KEY_OBJECT}, "
            f"{fingerprint(key.public_key())}:\n" + public_pem(key).decode("ascii").rstrip(),
            err=True,
        )
    if not no_policies:
        click.echo(_policies_json(cfg.storage.bucket, None))
    raise SystemExit(EXIT_OK)


@storage.command()
@config_option
@click.option("--bucket", help="Bucket name (default: storage.bucket from the config).")
@click.option("--role", type=click.Choice(ROLES), help="Print only this role's policy.")
def policies(config_path: str | None, bucket: str | None, role: str | None) -> None:
    """Print the S3 policy documents of the roles (no S3 access needed)."""
    name = bucket or load_config(config_path).storage.bucket
    click.echo(_policies_json(name, role))


@storage.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object for scripts.")
def status(config_path: str | None, as_json: bool) -> None:
    """Show the local upload backlog: recordings waiting in the spool and pending holds."""
    cfg = load_config(config_path)
    spool = Spool.from_config(cfg)
    st = spool_status(spool, timing=Timing(orphan_after_s=cfg.storage.orphan_after_s))
    if as_json:
        click.echo(json.dumps(st.as_dict()))
        raise SystemExit(EXIT_OK)
    rows = [
        ("spool", st.spool),
        ("queue (holds)", st.queue),
        ("recordings", str(st.recordings)),
        ("  ready to upload", str(st.ready)),
        ("  waiting for audio", str(st.waiting_for_audio)),
        ("  call in progress", str(st.in_call)),
        ("  orphans (no metadata)", str(st.orphans)),
        ("  invalid metadata", str(st.invalid)),
        ("pending holds", str(st.pending_holds)),
        ("audio bytes", f"{st.bytes:,}"),
        ("oldest", "-" if st.oldest_age_s is None else f"{st.oldest_age_s:,.0f} s ago"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")
    if st.invalid:
        click.echo("invalid metadata never uploads by itself: see the uploader's log for the file", err=True)
    sys.stdout.flush()
    raise SystemExit(EXIT_OK)
