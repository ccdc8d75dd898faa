"""Issue 12: a call's metadata survives a full spool disk (fake ARI, real tmpfs).

Before the fix the call service logged the failed write and went on: the flags and the hold of the call
were lost, and an hour later its audio was adopted as an orphan with neither. Now the write is retried
until the disk takes it, and only then is the uploader told.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from test_call_logic import FakeAmi, FakeAri
from test_robust_uploader import fill, tiny_filesystem

from kasuhara_ari.announcement import NoticePlayer
from kasuhara_ari.ari import Channel
from kasuhara_ari.call import Call, CallDeps, CallState
from kasuhara_ari.config import load
from kasuhara_ari.doctor import check_spool
from kasuhara_ari.events import MemoryEvents
from kasuhara_ari.recording import Recorder


async def test_metadata_refused_by_a_full_disk_is_written_once_there_is_room(tmp_path: Path) -> None:
    with tiny_filesystem(tmp_path / "spool", size="1m") as spool:
        cfg = load(
            env={"KASUHARA_RECORDING__ASTERISK_DIR": "/spool/k", "KASUHARA_RECORDING__LOCAL_DIR": str(spool)}
        )
        notified: list[str] = []

        async def on_metadata(call_id: str) -> None:
            notified.append(call_id)

        ari = FakeAri()
        deps = CallDeps(
            cfg,
            ari,
            Recorder(FakeAmi(), "/spool/k", spool, completion="watch"),
            NoticePlayer(ari, "ja"),
            MemoryEvents(),
            on_metadata,
        )
        call = Call(
            deps, Channel("c1", "PJSIP/caller-0001", "Ring", "0312345678", "Taro", "ja"), "1700.1", ""
        )
        ari.call = call
        call.record.flags.append("harassment")
        filler = fill(spool)
        task = asyncio.create_task(call.run())
        # The call itself ends as always; its metadata waits for room (polled, no timing assertion).
        async with asyncio.timeout(20):
            while call.state not in (CallState.ENDING, CallState.ENDED) or not ari.hung_up:
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        assert not task.done(), "the call gave up on its metadata"
        assert not (spool / "1700.1.json").exists() and notified == []
        filler.unlink()
        await asyncio.wait_for(task, 60)
        doc = json.loads((spool / "1700.1.json").read_text())
        assert doc["flags"] == ["harassment"]
        assert notified == ["1700.1"]


def test_doctor_says_the_spool_disk_is_full(tmp_path: Path) -> None:
    """``kasuhara doctor`` wrote an empty probe file, which a full disk still accepts: it said ok."""
    with tiny_filesystem(tmp_path / "spool", size="8m") as spool:
        cfg = load(env={"KASUHARA_RECORDING__ASTERISK_DIR": str(spool)})
        assert check_spool(cfg).ok
        filler = fill(spool)
        full = check_spool(cfg)
        assert not full.ok and "disk FULL" in full.detail, full
        filler.unlink()
        assert check_spool(cfg).ok
