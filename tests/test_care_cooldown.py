"""The recovery pause's decisions and its bookkeeping in Asterisk: which calls pause the agent and for how
long (pure), what a pause puts into Asterisk and takes out again (a fake AMI that keeps AstDB), a restarted
app ending what fell due while it was down, and ``kasuhara care resume`` against the real Asterisk and S3."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pytest
from click.testing import CliRunner

from kasuhara_ari.ami import AmiClient, AmiError
from kasuhara_ari.care.cooldown import DB_FAMILY, CooldownKeeper, Pause, PauseDesk, pause_for, triggers_of
from kasuhara_ari.cli import main
from kasuhara_ari.config import CareConfig, Config
from kasuhara_ari.events import MemoryEvents
from kasuhara_ari.schemas import validate_event
from kasuhara_ari.storage import AUDIT_PREFIX

from recordings_seed import cli_env
from s3_fixture import create_bucket, destroy_bucket, open_store, require_s3, unique_bucket


def esc(action: str, by: str = "agent") -> dict[str, Any]:
    return {"action": action, "by": by, "key": "*1", "at": "2026-11-03T01:00:00.000+00:00"}


class FakeAmi:
    """AstDB, device states and queue pauses as Asterisk would keep them."""

    def __init__(self, members: tuple[str, ...] = ()) -> None:
        self.db: dict[str, str] = {}
        self.devstate: dict[str, str] = {}
        self.members = {m: False for m in members}
        self.reasons: dict[str, str] = {}
        self.ready = True

    async def action(self, fields: Mapping[str, str], *, timeout: float | None = None) -> dict[str, str]:
        kind = fields["Action"]
        if kind == "DBPut":
            self.db[f"/{fields['Family']}/{fields['Key']}"] = fields["Val"]
        elif kind == "DBDel":
            if self.db.pop(f"/{fields['Family']}/{fields['Key']}", None) is None:
                raise AmiError("Database entry not found")
        elif kind == "Setvar":
            name = fields["Variable"].removeprefix("DEVICE_STATE(").removesuffix(")")
            self.devstate[name] = fields["Value"]
        elif kind == "QueuePause":
            if fields["Interface"] not in self.members:
                raise AmiError("Interface not found")
            self.members[fields["Interface"]] = fields["Paused"] == "true"
            self.reasons[fields["Interface"]] = fields.get("Reason", "")
        return {"Response": "Success"}

    async def action_list(
        self, fields: Mapping[str, str], *, timeout: float | None = None
    ) -> list[dict[str, str]]:
        assert fields["Action"] == "DBGetTree"
        rows = [{"Event": "DBGetTreeResponse", "Key": k, "Val": v} for k, v in self.db.items()]
        if not rows:
            raise AmiError("Database entry not found")
        return [{"Response": "Success"}, *rows, {"Event": "DBGetTreeComplete"}]


def test_which_calls_pause_the_agent_and_for_how_long() -> None:
    care = CareConfig(flag_s=300, warn_s=120, warn_and_hangup_s=600, supervisor_s=0, detected_s=60)
    assert pause_for(care, {"escalations": []}) is None
    assert pause_for(care, {"escalations": [esc("flag")]}) == ("flag", 300)
    # The longest of the call's triggers wins; a trigger set to 0 is off.
    assert pause_for(care, {"escalations": [esc("warn"), esc("warn_and_hangup")]}) == ("warn_and_hangup", 600)
    assert pause_for(care, {"escalations": [esc("supervisor")]}) is None
    # The detector's flag and a detection event are "detected", not the agent's flag.
    assert triggers_of({"escalations": [esc("flag", by="detector")]}) == {"detected"}
    assert pause_for(care, {"timeline": [{"event": "monologue_detected"}]}) == ("detected", 60)
    assert pause_for(replace(care, cooldown=False), {"escalations": [esc("flag")]}) is None


async def test_a_queue_member_is_paused_and_unpaused_and_a_direct_target_gets_the_device_state() -> None:
    ami = FakeAmi(members=("PJSIP/agent1",))
    events = MemoryEvents()
    clock = [1_800_000_000.0]
    keeper = CooldownKeeper(Config(care=CareConfig(flag_s=300)), ami, events, clock=lambda: clock[0])
    record = {"agent": "PJSIP/agent1", "escalations": [esc("flag")]}
    await keeper.call_ended("c1", record, "PJSIP/agent1")
    assert ami.members["PJSIP/agent1"] is True
    assert ami.reasons["PJSIP/agent1"].startswith("kasuhara-care until=2027-01-15T08:05:00")
    assert ami.devstate["Custom:kasuhara-care-agent1"] == "BUSY"
    assert Pause.from_db("agent1", ami.db["/kasuhara-care/agent1"]) == Pause(
        "agent1", clock[0] + 300, "c1", "flag", "PJSIP/agent1"
    )
    (started,) = events.of("c1")
    validate_event({"schema": "kasuhara.event/1", **started})
    assert started["queue_paused"] is True and started["duration_s"] == 300.0

    # A direct target (in no queue): the device state alone carries the pause.
    await keeper.call_ended(
        "c2", {"agent": "PJSIP/agent2/sip:agent2@10.0.0.9", "escalations": [esc("flag")]}, None
    )
    assert ami.devstate["Custom:kasuhara-care-agent2"] == "BUSY"
    assert events.of("c2")[0]["queue_paused"] is False

    # A quiet call pauses no one.
    await keeper.call_ended("c3", {"agent": "PJSIP/agent3", "escalations": []}, None)
    assert "Custom:kasuhara-care-agent3" not in ami.devstate

    assert await keeper.end("agent1", "agent", by="agent1") is True
    assert ami.members["PJSIP/agent1"] is False
    assert ami.devstate["Custom:kasuhara-care-agent1"] == "NOT_INUSE"
    assert "/kasuhara-care/agent1" not in ami.db
    ended = events.of("c1")[-1]
    assert (ended["event"], ended["reason"], ended["by"]) == ("agent_cooldown_ended", "agent", "agent1")
    assert await keeper.end("agent1", "agent") is False  # nothing left to end


async def test_a_restarted_app_ends_overdue_pauses_and_times_the_others() -> None:
    """The pauses live in AstDB: a new keeper (the app restarted) ends the overdue one at once and the
    other when it falls due, so no agent stays paused because the app was down."""
    ami = FakeAmi(members=("PJSIP/a", "PJSIP/b"))
    now = 1_800_000_000.0
    for pause in (
        Pause("a", now - 5, "c1", "flag", "PJSIP/a"),
        Pause("b", now + 0.3, "c2", "warn", "PJSIP/b"),
    ):
        ami.db[f"/{DB_FAMILY}/{pause.agent}"] = pause.db_value()
        ami.members[pause.interface] = True
    events = MemoryEvents()
    clock = [now]
    keeper = CooldownKeeper(Config(), ami, events, clock=lambda: clock[0])
    task = asyncio.create_task(keeper.run())
    try:
        for _ in range(100):
            if events.of("c1"):
                break
            await asyncio.sleep(0.01)
        assert [e["reason"] for e in events.of("c1")] == ["overdue"]
        assert ami.members == {"PJSIP/a": False, "PJSIP/b": True}
        clock[0] = now + 1
        for _ in range(200):
            if events.of("c2"):
                break
            await asyncio.sleep(0.02)
        assert [e["reason"] for e in events.of("c2")] == ["expired"]
        assert ami.members["PJSIP/b"] is False and ami.db == {}
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_an_ami_outage_keeps_the_timers_and_a_resume_elsewhere_drops_one_quietly() -> None:
    ami = FakeAmi(members=("PJSIP/a",))
    events = MemoryEvents()
    keeper = CooldownKeeper(Config(), ami, events, clock=lambda: 1_800_000_000.0)
    await keeper.call_ended("c1", {"agent": "PJSIP/a", "escalations": [esc("flag")]}, "PJSIP/a")
    assert set(keeper.pauses) == {"a"}

    async def down(fields: Mapping[str, str], *, timeout: float | None = None) -> list[dict[str, str]]:
        raise AmiError("AMI at 127.0.0.1:5038 is not connected (action DBGetTree)")

    working = ami.action_list
    ami.action_list = down  # type: ignore[method-assign]
    await keeper._sync()
    assert set(keeper.pauses) == {"a"}  # an outage is not "no pauses"
    ami.action_list = working  # type: ignore[method-assign]
    del ami.db["/kasuhara-care/a"]  # kasuhara care resume, from another process
    await keeper._sync()
    assert keeper.pauses == {}
    assert [e["event"] for e in events.of("c1")] == ["agent_cooldown_started"]  # its end came from there


# ------------------------------------------------------------------------- kasuhara care resume (real)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var == "KASUHARA_CONFIG" or (var.startswith("KASUHARA_") and "__" in var):
            monkeypatch.delenv(var)


@pytest.mark.integration
def test_care_resume_ends_a_pause_in_the_real_asterisk_and_is_audited(asterisk: Config) -> None:
    target = require_s3()
    bucket = unique_bucket("kt-care")
    store = open_store(target, bucket, read_timeout_s=30.0)
    create_bucket(store)
    agent = f"kt{uuid.uuid4().hex[:10]}"
    env = cli_env(
        target,
        bucket,
        KASUHARA_AMI__HOST=asterisk.ami.host,
        KASUHARA_AMI__PORT=str(asterisk.ami.port),
        KASUHARA_AMI__USERNAME=asterisk.ami.username,
        KASUHARA_AMI__SECRET=asterisk.ami.secret,
    )

    async def with_ami(fn: Any) -> Any:
        ami = AmiClient(asterisk.ami.host, asterisk.ami.port, asterisk.ami.username, asterisk.ami.secret)
        await ami.wait_ready(timeout=10)
        try:
            return await fn(ami)
        finally:
            ami.close()

    async def pause(ami: AmiClient) -> None:
        desk = PauseDesk(asterisk.care, ami, MemoryEvents())
        await desk.apply(Pause(agent, 1e10, "1796000000.1", "flag", ""))

    async def state(ami: AmiClient) -> tuple[str, bool]:
        var = await ami.action(
            {"Action": "Getvar", "Variable": f"DEVICE_STATE(Custom:kasuhara-care-{agent})"}
        )
        stored = await PauseDesk(asterisk.care, ami, MemoryEvents()).stored()
        return var.get("Value", ""), agent in stored

    try:
        asyncio.run(with_ami(pause))
        assert asyncio.run(with_ami(state)) == ("BUSY", True)
        result = CliRunner().invoke(main, ["care", "resume", agent], env=env)
        assert result.exit_code == 0, result.output
        assert "pause ended" in result.output
        assert asyncio.run(with_ami(state)) == ("NOT_INUSE", False)
        again = CliRunner().invoke(main, ["care", "resume", agent], env=env)
        assert again.exit_code == 0 and "was not paused" in again.output

        async def audit() -> list[dict[str, Any]]:
            out = []
            async for obj in store.list_prefix(AUDIT_PREFIX):
                if obj.key.endswith(".json"):
                    data = await store.get_bytes(obj.key)
                    assert data is not None
                    out.append(json.loads(data))
            return out

        records = [r for r in asyncio.run(audit()) if r["action"] == "care_resume"]
        assert sorted(r["target"]["result"] for r in records) == ["not_paused", "resumed"]
        assert all(r["target"]["agent"] == agent and r["by"] == "test-admin" for r in records)
        refused = CliRunner().invoke(
            main, ["care", "resume", agent], env={k: v for k, v in env.items() if "ADMIN__" not in k}
        )
        assert refused.exit_code == 3, refused.output
    finally:

        async def forget(ami: AmiClient) -> None:
            with contextlib.suppress(AmiError):  # (gone already when the test passed)
                await ami.action({"Action": "DBDel", "Family": DB_FAMILY, "Key": agent})

        asyncio.run(with_ami(forget))
        store.close()
        destroy_bucket(target, bucket)
