"""``kasuhara doctor``'s newer lines against the real stack: the clock against a real S3 answer's ``Date``,
the bucket's object-lock settings on the stack's S3 server, the metrics endpoint of a running server
(and something else on its port), and the spool's free-space warning."""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from kasuhara_ari import doctor, metrics
from kasuhara_ari.config import Config, MetricsConfig
from kasuhara_ari.doctor import Check, check_clock, check_metrics

from s3_fixture import S3Target, fresh_bucket, open_store

pytestmark = pytest.mark.integration


@pytest.fixture
def bucket_cfg(s3_server: Config) -> Iterator[tuple[Config, S3Target]]:
    """The stack's config on a fresh object-lock bucket of its own."""
    with fresh_bucket("kt-doc") as (target, bucket):
        cfg = replace(
            s3_server,
            storage=replace(
                s3_server.storage,
                enabled=True,
                endpoint=target.endpoint,
                access_key=target.access_key,
                secret_key=target.secret_key,
                region=target.region,
                bucket=bucket,
            ),
        )
        yield cfg, target


# --- clock ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shift_s", "ok", "warn"),
    [(0.0, True, False), (-8.0, True, True), (8.0, True, True), (-90.0, False, False), (90.0, False, False)],
)
async def test_clock_skew_against_a_real_s3_date_header(
    bucket_cfg: tuple[Config, S3Target], shift_s: float, ok: bool, warn: bool
) -> None:
    """The server is on this host, so its clock is ours: shifting the local clock by ``shift_s`` is the
    skew the check must find (warn beyond 2 s, fail beyond 30 s)."""
    cfg, _ = bucket_cfg
    check = await check_clock(cfg, now=lambda: time.time() + shift_s)
    assert (check.ok, check.warn) == (ok, warn), check
    if shift_s:
        assert ("ahead of" if shift_s > 0 else "behind") in check.detail, check.detail


async def test_clock_check_says_when_s3_does_not_answer(bucket_cfg: tuple[Config, S3Target]) -> None:
    from conftest import closed_port

    cfg, _ = bucket_cfg
    cfg = replace(cfg, storage=replace(cfg.storage, endpoint=f"127.0.0.1:{closed_port()}"))
    check = await check_clock(cfg)
    assert not check.ok and "no answer" in check.detail


# --- object lock ---------------------------------------------------------------------------------------


def test_object_lock_on_without_default_retention_is_fine(bucket_cfg: tuple[Config, S3Target]) -> None:
    cfg, _ = bucket_cfg
    check = doctor._check_lock_sync(cfg)
    assert (check.ok, check.warn) == (True, False), check
    assert "object lock on, no default retention" in check.detail


def test_a_default_retention_longer_than_retention_days_is_a_warning(
    bucket_cfg: tuple[Config, S3Target],
) -> None:
    from minio.commonconfig import GOVERNANCE
    from minio.objectlockconfig import DAYS, ObjectLockConfig

    cfg, target = bucket_cfg
    store = open_store(target, cfg.storage.bucket)
    try:
        store.client.set_object_lock_config(cfg.storage.bucket, ObjectLockConfig(GOVERNANCE, 400, DAYS))
    finally:
        store.close()
    check = doctor._check_lock_sync(cfg)
    assert (check.ok, check.warn) == (True, True), check
    assert "GOVERNANCE 400 days" in check.detail and "retention.days = 90" in check.detail
    longer = replace(cfg, retention=replace(cfg.retention, days=500))
    assert doctor._check_lock_sync(longer).warn is False


def test_a_bucket_without_object_lock_is_reported_not_failed(bucket_cfg: tuple[Config, S3Target]) -> None:
    cfg, target = bucket_cfg
    plain = cfg.storage.bucket + "-plain"
    store = open_store(target, plain)
    store.client.make_bucket(plain)
    try:
        check = doctor._check_lock_sync(replace(cfg, storage=replace(cfg.storage, bucket=plain)))
    finally:
        store.client.remove_bucket(plain)
        store.close()
    assert (check.ok, check.warn) == (True, True), check
    assert "NOT enabled" in check.detail


# --- metrics endpoint ----------------------------------------------------------------------------------


def _metrics_cfg(base: Config, port: int, **options: Any) -> Config:
    m = MetricsConfig(
        enabled=True,
        serve_port=port,
        agi_port=port + 1,
        retention_port=port + 2,
        web_port=port + 3,
        **options,
    )
    return replace(base, metrics=m)


async def test_doctor_finds_a_running_metrics_endpoint(s3_server: Config) -> None:
    server = metrics.serve_metrics(MetricsConfig(enabled=True), 0)
    assert server is not None
    try:
        check = await check_metrics(_metrics_cfg(s3_server, server.address[1]))
    finally:
        server.close()
    assert (check.ok, check.warn) == (True, False), check
    assert f"serve :{server.address[1]}" in check.detail
    # Gone: a warning, not a failure (doctor may run before serve does).
    gone = await check_metrics(_metrics_cfg(s3_server, server.address[1]))
    assert (gone.ok, gone.warn) == (True, True), gone


async def test_something_else_on_the_metrics_port_fails(s3_server: Config) -> None:
    class Other(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"node_load1 0.5\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Other)
    thread = threading.Thread(target=other.serve_forever, daemon=True)
    thread.start()
    try:
        check = await check_metrics(_metrics_cfg(s3_server, other.server_address[1]))
    finally:
        other.shutdown()
        other.server_close()
    assert not check.ok and "another exporter" in check.detail, check


async def test_metrics_off_or_refused(s3_server: Config) -> None:
    off = await check_metrics(s3_server)
    assert off.ok and "off" in off.detail
    refused = await check_metrics(_metrics_cfg(s3_server, 9464, bind="0.0.0.0"))
    assert not refused.ok and "allow_remote" in refused.detail


# --- spool and the CLI's lines -------------------------------------------------------------------------


def test_a_low_spool_disk_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.statvfs

    class Low:
        def __init__(self, st: os.statvfs_result) -> None:
            self.f_frsize, self.f_blocks = 4096, st.f_blocks
            self.f_bavail = (100 * 2**20) // 4096  # 100 MiB: under 512 MiB and 5 % of the disk

    monkeypatch.setattr("kasuhara_ari.uploader.os.statvfs", lambda p: Low(real(p)))
    cfg = replace(
        Config(),
        recording=replace(Config().recording, local_dir=str(tmp_path)),
        storage=replace(Config().storage, queue_dir=""),
    )
    check = doctor.check_spool(cfg)
    assert (check.ok, check.warn) == (True, True), check
    assert "disk low" in check.detail


def test_the_cli_prints_warn_and_exits_0_on_warnings_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from kasuhara_ari.cli import main

    async def checks(cfg: Config) -> list[Check]:
        return [Check("config", True, "x"), Check("clock", True, "4.0 s behind", warn=True)]

    monkeypatch.setattr("kasuhara_ari.cli.doctor.run_checks", checks)
    result = CliRunner().invoke(main, ["doctor"], env={"KASUHARA_CONFIG": ""})
    assert result.exit_code == 0, result.output
    assert "warn clock   4.0 s behind" in result.output
    result = CliRunner().invoke(main, ["doctor", "--json"], env={"KASUHARA_CONFIG": ""})
    assert json.loads(result.output)["clock"] == {"ok": True, "warn": True, "detail": "4.0 s behind"}
