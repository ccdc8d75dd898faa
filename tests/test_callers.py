"""Caller rules: repeat callers (real SQLite), the caller list (pure), the admin CLI against the real S3
server, and listed callers over real SIP through Asterisk."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kasuhara_ari.callers import CallerList, CallerListError, CallerPolicy, RepeatCallers, make_entry
from kasuhara_ari.config import Config, PolicyConfig

from s3_fixture import create_bucket, destroy_bucket, open_store, require_s3, unique_bucket
from sip import agent_port, answering, caller
from test_inbound_sip import event_names, wait_for_calls, wait_for_files


def test_numbers_match_in_e164_and_domestic_form() -> None:
    lst = CallerList((make_entry("+81 3-1234-5678", "refuse", "abusive"),))
    for form in ("0312345678", "03-1234-5678", "+81312345678", "0081312345678", "sip:0312345678@pbx"):
        assert lst.find(form) is not None, form
    assert lst.find("0312345679") is None
    assert lst.find("anonymous") is None


@pytest.mark.parametrize(
    ("number", "action"),
    [("caller", "refuse"), ("12", "refuse"), ("0312345678", "dance"), ("../x", "refuse")],
)
def test_bad_entries_are_refused(number: str, action: str) -> None:
    with pytest.raises(CallerListError):
        make_entry(number, action)


def test_list_round_trip_and_replace() -> None:
    lst = (
        CallerList()
        .with_entry(make_entry("0312345678", "refuse"))
        .with_entry(make_entry("+81312345678", "supervisor"))
    )
    assert [e.action for e in lst.entries] == ["supervisor"]
    assert CallerList.from_json(lst.to_json()) == lst
    assert lst.without("03-1234-5678").entries == ()
    with pytest.raises(CallerListError):
        CallerList.from_json(b'{"schema": "other"}')


async def test_repeat_callers_counted_in_window(tmp_path: Path) -> None:
    history = RepeatCallers(tmp_path / "h.sqlite", window_days=7)
    day = 86400.0
    assert await history.record("0312345678", now=0) == 1
    assert await history.record("+81312345678", now=day) == 2  # same number, other form
    assert await history.record("0312345678", now=7.5 * day) == 2  # the first call fell out of the window
    assert await history.record("anonymous", now=9 * day) == 0


async def test_policy_marks_repeat_callers(tmp_path: Path) -> None:
    policy = CallerPolicy.from_config(
        PolicyConfig(repeat_calls=3, repeat_window_days=7, state_dir=str(tmp_path)), store=None
    )
    results = [await policy.check("0312345678") for _ in range(4)]
    assert [r.is_repeat for r in results] == [False, False, True, True]
    assert results[-1].repeat_count == 4


# --- against the real S3 server ----------------------------------------------------------------------


@pytest.fixture
def bucket_cfg(stack_cfg: Config) -> Iterator[Config]:
    target = require_s3()
    bucket = unique_bucket("kc")
    store = open_store(target, bucket)
    create_bucket(store)
    store.close()
    yield replace(
        stack_cfg,
        storage=replace(stack_cfg.storage, bucket=bucket),
        mqtt=replace(stack_cfg.mqtt, enabled=False),
    )
    destroy_bucket(target, bucket)


def cli(cfg: Config, *args: str, admin: bool = True) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "KASUHARA_STORAGE__BUCKET": cfg.storage.bucket,
        "KASUHARA_MQTT__ENABLED": "false",
        "KASUHARA_ADMIN__NAME": "test-admin",
    }
    if admin:
        env["KASUHARA_ADMIN__ACCESS_KEY"] = cfg.storage.access_key
        env["KASUHARA_ADMIN__SECRET_KEY"] = cfg.storage.secret_key
    else:
        env.pop("KASUHARA_ADMIN__ACCESS_KEY", None)
        env.pop("KASUHARA_ADMIN__SECRET_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "kasuhara_ari.cli", "callers", *args, "--config", cfg.source],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.mark.integration
def test_admin_cli_manages_the_list_and_audits(bucket_cfg: Config) -> None:
    assert cli(bucket_cfg, "list").stdout.strip() == "the caller list is empty"
    added = cli(bucket_cfg, "add", "+81 3-1234-5678", "--action", "refuse", "--reason", "threats on 11/20")
    assert added.returncode == 0, added.stderr
    assert added.stdout.strip() == "0312345678: refuse"
    listed = json.loads(cli(bucket_cfg, "list", "--json").stdout)
    assert [(e["number"], e["action"], e["by"]) for e in listed["entries"]] == [
        ("0312345678", "refuse", "test-admin")
    ]
    assert cli(bucket_cfg, "remove", "03-1234-5678", "--reason", "resolved").stdout.strip() == "removed"
    assert (
        cli(bucket_cfg, "remove", "03-1234-5678", "--reason", "again").stdout.strip()
        == "not listed: nothing to do"
    )
    bad = cli(bucket_cfg, "add", "not-a-number", "--action", "refuse", "--reason", "x")
    assert bad.returncode == 2 and "not a phone number" in bad.stderr
    refused = cli(bucket_cfg, "add", "0312345678", "--action", "refuse", "--reason", "x", admin=False)
    assert refused.returncode == 3 and "admin" in refused.stderr
    # every change is in the audit log
    store = open_store(require_s3(), bucket_cfg.storage.bucket)
    try:
        keys = [
            o.object_name
            for o in store.client.list_objects(bucket_cfg.storage.bucket, prefix="audit/", recursive=True)
        ]
        actions = sorted(
            json.loads(store.client.get_object(bucket_cfg.storage.bucket, k).read())["action"] for k in keys
        )
    finally:
        store.close()
    assert actions == ["callers_add", "callers_remove"]


@pytest.mark.integration
@pytest.mark.parametrize("action", ["refuse", "supervisor", "strong_notice"])
async def test_listed_caller_over_real_sip(
    action: str, bucket_cfg: Config, call_cfg: Config, service_factory: Any, sip_workdir: Path, tmp_path: Path
) -> None:
    number = "0398765432"
    assert (
        cli(bucket_cfg, "add", f"+81 3 9876 {number[-4:]}", "--action", action, "--reason", "test").returncode
        == 0
    )
    agent_p, supervisor_p = agent_port(), agent_port()
    cfg = replace(
        call_cfg,
        # Storage on, as `kasuhara serve` has it: the service builds its caller policy from [storage] and
        # [policy] itself and keeps it fresh in the background (CallerPolicy.run). Only the upload is
        # replaced (on_metadata), so the recordings stay in the spool for the checks below.
        storage=replace(bucket_cfg.storage, enabled=True),
        policy=replace(call_cfg.policy, state_dir=str(tmp_path)),
        escalation=replace(
            call_cfg.escalation, supervisors=(f"PJSIP/supervisor/sip:supervisor@127.0.0.1:{supervisor_p}",)
        ),
    )

    async def kept_in_spool(call_id: str) -> None:
        return None

    service = await service_factory(cfg, on_metadata=kept_in_spool)
    policy = service.callers
    assert policy is not None and policy.store is not None, "serve's path built no caller list from S3"
    deadline = time.monotonic() + 15
    while not policy.loaded_at:  # the service's own first refresh read the list from the bucket
        assert time.monotonic() < deadline, "the service never loaded the caller list"
        await asyncio.sleep(0.05)
    assert policy.current.find(number) is not None
    agent = await answering(sip_workdir, agent_p, name="agent").start()
    supervisor = await answering(sip_workdir, supervisor_p, name="supervisor").start()
    # The stronger notice (~9.6 s) is the one long prompt here; the other actions play the test notice.
    call_ms = 14000 if action == "strong_notice" else 9000
    phone = await caller(sip_workdir, agent_p, app=cfg.ari.app, call_ms=call_ms, number=number).start()
    try:
        assert await phone.wait(40) == 0, phone.error_text()
        await asyncio.sleep(0.5)
    finally:
        await phone.stop()
        await agent.stop()
        await supervisor.stop()
    (call_id,) = await wait_for_calls(service, 1, agent_p)  # "started" names the dialled target
    names = event_names(service, call_id)
    meta = await wait_for_files(cfg.recording.host_dir, call_id)
    assert meta["caller"]["number"] == number
    assert meta["listed"]["action"] == action
    assert "caller_listed" in names
    if action == "refuse":
        assert meta["end_reason"] == "refused_listed_caller"
        assert agent.received("INVITE") == [] and supervisor.received("INVITE") == []
        assert phone.received("BYE")
    elif action == "supervisor":
        assert supervisor.received("INVITE") and not agent.received("INVITE")
    else:
        notice = [e for e in service.memory_events.of(call_id) if e["event"] == "notice_played"]
        assert notice[0]["sound"] == "kasuhara/stronger-notice"
        assert agent.received("INVITE")


@pytest.mark.integration
async def test_repeat_caller_over_real_sip(
    call_cfg: Config, service_factory: Any, sip_workdir: Path, tmp_path: Path
) -> None:
    cfg = replace(
        call_cfg,
        policy=replace(call_cfg.policy, repeat_calls=2, repeat_window_days=1, state_dir=str(tmp_path)),
    )
    service = await service_factory(cfg)
    port = agent_port()
    agent = await answering(sip_workdir, port, calls=2).start()
    phone = await caller(
        sip_workdir, port, app=cfg.ari.app, call_ms=1000, calls=2, concurrent=1, rate=1, number="09011112222"
    ).start()
    try:
        assert await phone.wait(60) == 0, phone.error_text()
    finally:
        await phone.stop()
        await agent.stop()
    first, second = await wait_for_calls(service, 2, port)
    assert "repeat_caller" not in event_names(service, first)
    assert "repeat_caller" in event_names(service, second)
    meta = await wait_for_files(cfg.recording.host_dir, second)
    assert "repeat_caller" in meta["flags"] and meta["repeat_count"] == 2
