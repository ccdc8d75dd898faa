"""``kasuhara storage init|policies|status``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from uploader_helpers import put_recording, wav_bytes

from kasuhara_ari.cli.storage import storage
from kasuhara_ari.storage import policy_documents

from s3_fixture import destroy_bucket, open_store, require_s3, unique_bucket


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    # Only the app's own configuration; KASUHARA_TEST_* (where the test servers are) stays.
    for var in list(os.environ):
        if var == "KASUHARA_CONFIG" or (var.startswith("KASUHARA_") and "__" in var):
            monkeypatch.delenv(var)


def test_policies_print_the_role_documents() -> None:
    result = CliRunner().invoke(storage, ["policies", "--bucket", "evidence"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == policy_documents("evidence")
    one = CliRunner().invoke(storage, ["policies", "--bucket", "evidence", "--role", "retention"])
    assert json.loads(one.output) == policy_documents("evidence")["retention"]


def test_status_shows_the_backlog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KASUHARA_RECORDING__ASTERISK_DIR", str(tmp_path))
    put_recording(tmp_path, "ready", audio=wav_bytes(100))
    put_recording(tmp_path, "incall", audio=wav_bytes(100), done=False, meta=False)
    result = CliRunner().invoke(storage, ["status", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert (doc["recordings"], doc["ready"], doc["in_call"], doc["spool"]) == (2, 1, 1, str(tmp_path))
    human = CliRunner().invoke(storage, ["status"])
    assert human.exit_code == 0
    assert "ready to upload" in human.output


def test_bad_config_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KASUHARA_STORAGE__NO_SUCH_KEY", "1")
    result = CliRunner().invoke(storage, ["status"])
    assert result.exit_code == 2
    assert "no_such_key" in result.output


def test_init_refuses_sse_c_without_tls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KASUHARA_STORAGE__SSE_C_KEY", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    result = CliRunner().invoke(storage, ["init"])
    assert result.exit_code == 2
    assert "secure" in result.output


@pytest.mark.integration
def test_init_creates_a_locked_bucket_and_prints_policies(monkeypatch: pytest.MonkeyPatch) -> None:
    target = require_s3()
    bucket = unique_bucket("kt-cli")
    for key, value in {
        "ENDPOINT": target.endpoint,
        "ACCESS_KEY": target.access_key,
        "SECRET_KEY": target.secret_key,
        "BUCKET": bucket,
    }.items():
        monkeypatch.setenv(f"KASUHARA_STORAGE__{key}", value)
    try:
        result = CliRunner().invoke(storage, ["init"])
        assert result.exit_code == 0, result.output
        out = result.stdout
        assert json.loads(out) == policy_documents(bucket)
        store = open_store(target, bucket)
        try:
            assert store.client.get_object_lock_config(bucket) is not None
        finally:
            store.close()
        again = CliRunner().invoke(storage, ["init", "--no-policies"])
        assert again.exit_code == 0
        assert "exists" in again.output
    finally:
        destroy_bucket(target, bucket)


@pytest.mark.integration
def test_init_refuses_a_bucket_without_object_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    target = require_s3()
    bucket = unique_bucket("kt-cli-plain")
    store = open_store(target, bucket)
    store.client.make_bucket(bucket)
    store.close()
    for key, value in {
        "ENDPOINT": target.endpoint,
        "ACCESS_KEY": target.access_key,
        "SECRET_KEY": target.secret_key,
        "BUCKET": bucket,
    }.items():
        monkeypatch.setenv(f"KASUHARA_STORAGE__{key}", value)
    try:
        result = CliRunner().invoke(storage, ["init"])
        assert result.exit_code == 3
        assert "object lock" in result.output
    finally:
        destroy_bucket(target, bucket)


def test_init_reports_an_unreachable_server(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    monkeypatch.setenv("KASUHARA_STORAGE__ENDPOINT", f"127.0.0.1:{port}")
    result = CliRunner().invoke(storage, ["init"])
    assert result.exit_code == 1
    assert "storage init failed" in result.output
    assert "Traceback" not in result.output
