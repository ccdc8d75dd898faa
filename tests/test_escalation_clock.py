"""The escalation's request time is one reading of the clock: the ``escalation_requested`` event and the
metadata's escalation entry carry the same ``at`` (two readings differed by a millisecond under load, and
the three-way SIP test failed now and then). Pure logic: a Call with fakes and a clock that never repeats.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any, cast

import pytest

from kasuhara_ari import call as call_module
from kasuhara_ari.ari import Channel
from kasuhara_ari.call import Call, CallDeps
from kasuhara_ari.config import Config
from kasuhara_ari.events import MemoryEvents


async def test_escalation_requested_and_its_metadata_entry_share_one_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ticks = itertools.count()
    # Every reading of the clock is a different millisecond, as under load.
    monkeypatch.setattr(call_module, "now_iso", lambda: f"2026-12-03T10:00:00.{next(ticks):03d}+00:00")
    cfg = Config()
    cfg = replace(cfg, escalation=replace(cfg.escalation, supervisors=()))  # nobody to ring: "unavailable"
    events = MemoryEvents()
    deps = CallDeps(
        cfg=cfg,
        ari=cast(Any, None),
        recorder=cast(Any, None),
        notices=cast(Any, None),
        events=events,
    )
    caller = Channel("c1", "PJSIP/caller-1", "Up", "0312345678", "caller", "ja")
    call = Call(deps, caller, "1796300000.1", "PJSIP/agent")
    ended = await call.escalation.handle("*9", "supervisor")
    assert ended is False
    requested = [e for e in events.events if e["event"] == "escalation_requested"]
    (entry,) = call.record.escalations
    assert requested and entry.result == "unavailable"
    assert entry.at == requested[0]["at"]
    # The call's own timeline (exported with the evidence) says the same.
    assert [t["at"] for t in call.record.events if t["event"] == "escalation_requested"] == [entry.at]
