"""``kasuhara care report`` / ``care note`` against the real S3 server: a seeded month of metadata whose
counts and minutes are worked out by hand below, the follow-up notes, text, CSV and the SVG chart, the
role checks and the audit records."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner, Result

from kasuhara_ari.care.notes import NOTES_PREFIX
from kasuhara_ari.care.report import Note, build_report, endpoint_of, kinds_of
from kasuhara_ari.cli import main
from kasuhara_ari.config import CareConfig
from kasuhara_ari.evidence.desk import Principal
from kasuhara_ari.storage import AUDIT_PREFIX, MinioStore

from recordings_seed import cli_env, seed
from s3_fixture import create_bucket, destroy_bucket, open_store, require_s3, unique_bucket

TOKYO = ZoneInfo("Asia/Tokyo")
PEOPLE = {
    "care-a": "佐藤 花子",
    "care-b": "鈴木 一郎",
    "care-c": '=HYPERLINK("x")<b>&',
    "care-d": "高橋 三郎",
}


SVG_NS = "http://www.w3.org/2000/svg"


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


def esc(action: str, by: str = "agent", key: str = "*1") -> dict[str, Any]:
    return {"at": "2026-11-03T01:00:00.000+00:00", "action": action, "key": key, "by": by, "result": "done"}


def t(day: int, hour: int, minute: int = 0, month: int = 11) -> datetime:
    year = 2026
    return datetime(year, month, day, hour, minute, tzinfo=TOKYO)


#: (call id, start in Tokyo, agent, duration, escalations, timeline events)
SEED: list[tuple[str, datetime, str | None, float, list[dict[str, Any]], list[str]]] = [
    # care-a: 4 calls in November, 3 of them harassment: 120 + 300 + 90 s = 510 s = 8.5 min
    ("1793700000.1", t(3, 10), "PJSIP/care-a", 120.0, [esc("flag")], []),
    (
        "1793700000.2",
        t(10, 14),
        "PJSIP/care-a/sip:care-a@127.0.0.1:5171",
        300.0,
        [esc("warn", key="*2"), esc("supervisor", key="*9")],
        [],
    ),
    ("1793700000.3", t(11, 9), "PJSIP/care-a", 60.0, [], []),
    # 00:10 on 1 Nov in Tokyo is 31 Oct in UTC: in the month all the same. The detector's flag and its
    # event are one detection.
    (
        "1793700000.4",
        t(1, 0, 10),
        "PJSIP/care-a-0000001f",
        90.0,
        [esc("flag", by="detector", key="detected:monologue")],
        ["monologue_detected"],
    ),
    # care-b: 2 harassment calls, 45 + 75 s = 2.0 min; the second flagged twice (counts once)
    ("1793700000.5", t(20, 16), "PJSIP/care-b", 45.0, [esc("warn_and_hangup", key="*3")], []),
    ("1793700000.6", t(30, 23, 50), "PJSIP/care-b", 75.0, [esc("flag"), esc("flag")], []),
    # outside the month in Tokyo (the UTC day of the first is still 30 Nov)
    ("1793700000.7", t(1, 0, 5, month=12), "PJSIP/care-b", 600.0, [esc("flag")], []),
    ("1793700000.8", datetime(2026, 10, 31, 23, 30, tzinfo=TOKYO), "PJSIP/care-b", 600.0, [esc("flag")], []),
    # care-c: one quiet call; an unanswered call has no agent and counts for no one
    ("1793700000.9", t(5, 11), "PJSIP/care-c", 30.0, [], []),
    ("1793700001.0", t(5, 12), None, 0.0, [], []),
]

EXPECTED = {
    "care-a": {"calls": 4, "harassment_calls": 3, "flags": 1, "warnings": 1, "escalations": 1,
               "detections": 1, "minutes": 8.5, "needs_follow_up": True, "status": "followed up"},
    "care-b": {"calls": 2, "harassment_calls": 2, "flags": 1, "warnings": 1, "escalations": 0,
               "detections": 0, "minutes": 2.0, "needs_follow_up": True, "status": "waiting"},
    "care-c": {"calls": 1, "harassment_calls": 0, "flags": 0, "warnings": 0, "escalations": 0,
               "detections": 0, "minutes": 0.0, "needs_follow_up": False, "status": "ok"},
    "care-d": {"calls": 0, "harassment_calls": 0, "flags": 0, "warnings": 0, "escalations": 0,
               "detections": 0, "minutes": 0.0, "needs_follow_up": False, "status": "ok"},
}  # fmt: skip


@pytest.fixture
def s3env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[MinioStore, dict[str, str]]]:
    target = require_s3()
    bucket = unique_bucket("kt-care")
    store = open_store(target, bucket, read_timeout_s=30.0)
    create_bucket(store)
    monkeypatch.chdir(tmp_path)
    env = cli_env(
        target,
        bucket,
        KASUHARA_AGENTS__PEOPLE=json.dumps(PEOPLE),
        KASUHARA_CARE__FOLLOW_UP_CALLS="2",
        KASUHARA_CARE__FOLLOW_UP_MINUTES="0",
    )
    try:
        yield store, env
    finally:
        store.close()
        destroy_bucket(target, bucket)


async def seed_month(store: MinioStore) -> None:
    for call_id, started, agent, duration, escalations, events in SEED:
        timeline = [{"event": e, "at": started.isoformat(timespec="milliseconds")} for e in events]
        await seed(
            store,
            call_id,
            started,
            agent=agent,
            duration_s=duration,
            escalations=escalations,
            timeline=timeline,
            ended_at=(started + timedelta(seconds=duration)).isoformat(timespec="milliseconds"),
        )


def rows_of(csv_text: str) -> dict[str, dict[str, str]]:
    return {r["agent"]: r for r in csv.DictReader(io.StringIO(csv_text))}


def test_the_month_report_has_the_hand_counted_numbers_notes_csv_and_chart(
    s3env: tuple[MinioStore, dict[str, str]], tmp_path: Path
) -> None:
    store, env = s3env
    asyncio.run(seed_month(store))

    # A note from October does not answer November; one written in December (the meeting after) does.
    old = invoke(env, "care", "note", "care-b", "--text", "talked in October")
    assert old.exit_code == 0, old.output
    old_key = old.output.split("note stored: ")[1].strip()
    data = asyncio.run(store.get_bytes(old_key))
    assert data is not None
    doc = json.loads(data)
    doc["at"] = "2026-10-15T10:00:00.000+09:00"
    asyncio.run(store.put_bytes(old_key, json.dumps(doc).encode(), metadata={}))
    note = invoke(env, "care", "note", "care-a", "--text", "面談済み、休憩を増やす")
    assert note.exit_code == 0, note.output
    assert note.output.startswith(f"note stored: {NOTES_PREFIX}care-a/")

    chart = tmp_path / "care.svg"
    as_csv = invoke(
        env, "care", "report", "--month", "2026-11", "--csv", "--chart", str(chart), "--chart-lang", "en"
    )
    assert as_csv.exit_code == 0, as_csv.output
    rows = rows_of(as_csv.output)
    assert set(rows) == set(EXPECTED)
    for agent, want in EXPECTED.items():
        got = {k: rows[agent][k] for k in want}
        assert got == {k: str(v) for k, v in want.items()}, agent
        assert rows[agent]["person"] == (PEOPLE[agent] if agent != "care-c" else "'" + PEOPLE[agent])
    assert rows["care-a"]["followed_up_by"] == "test-admin"
    assert rows["care-b"]["followed_up_at"] == ""  # October's note is not this month's follow-up

    text = invoke(env, "care", "report", "--month", "2026-11")
    assert text.exit_code == 0, text.output
    line_a = next(line for line in text.output.splitlines() if line.startswith("care-a "))
    assert line_a.split()[3:12] == ["4", "3", "1", "1", "1", "1", "8.5", "followed", "up"], line_a
    line_b = next(line for line in text.output.splitlines() if line.startswith("care-b "))
    assert line_b.split()[3:11] == ["2", "2", "1", "1", "0", "0", "2.0", "waiting"], line_b
    assert "follow-up waiting: care-b" in text.output
    assert "8 recording(s)" in text.output  # the two outside the month are not read into it

    # The chart is looked at, not only created: an SVG with every person's name as text.
    assert chart.stat().st_size > 1500
    svg = ET.parse(chart).getroot()
    texts = ["".join(el.itertext()) for el in svg.iter(f"{{{SVG_NS}}}text")]
    for agent, person in PEOPLE.items():
        assert f"{person} ({agent})" in texts, texts
    assert any("follow-up waiting" in s and s.startswith("2 calls, 2.0 min") for s in texts), texts
    assert "<b>" not in chart.read_text(encoding="utf-8")  # the name's markup is text, not markup
    # Japanese unless told otherwise: the meeting's chart speaks its language, the numbers the same.
    chart_ja = tmp_path / "care-ja.svg"
    assert invoke(env, "care", "report", "--month", "2026-11", "--chart", str(chart_ja)).exit_code == 0
    texts_ja = ["".join(el.itertext()) for el in ET.parse(chart_ja).getroot().iter(f"{{{SVG_NS}}}text")]
    assert "オペレーター別のカスハラ通話（2026-11）" in texts_ja, texts_ja
    assert "フラグ (*1)" in texts_ja and "責任者呼び出し (*9)" in texts_ja, texts_ja
    assert "2 件・2.0 分・フォローアップ待ち" in texts_ja, texts_ja
    assert not any("calls" in s or "waiting" in s for s in texts_ja), texts_ja
    bad = invoke(env, "care", "report", "--month", "2026-11", "--chart", str(chart_ja), "--chart-lang", "fr")
    assert bad.exit_code == 2 and "fr" in bad.output, bad.output

    # Audited: the notes (naming the agent and the note's key, never its text) and the reports.
    async def audit_docs() -> list[dict[str, Any]]:
        docs = []
        async for obj in store.list_prefix(AUDIT_PREFIX):
            if obj.key.endswith(".json"):
                data = await store.get_bytes(obj.key)
                assert data is not None
                docs.append(json.loads(data))
        return docs

    audit = asyncio.run(audit_docs())
    notes = [d for d in audit if d["action"] == "care_note"]
    assert sorted(d["target"]["agent"] for d in notes) == ["care-a", "care-b"]
    assert all("面談" not in json.dumps(d, ensure_ascii=False) for d in audit)
    assert (
        len([d for d in audit if d["action"] == "care_report"]) == 3
    )  # csv+chart (en), the table, the Japanese chart


def test_report_and_note_are_refused_without_the_supervisor_or_admin_role(
    s3env: tuple[MinioStore, dict[str, str]],
) -> None:
    store, env = s3env
    service = {k: v for k, v in env.items() if not k.startswith("KASUHARA_ADMIN__")}
    for args in (("care", "report", "--month", "2026-11"), ("care", "note", "care-a", "--text", "x")):
        result = invoke(service, *args)
        assert result.exit_code == 3, result.output
        assert "refused:" in result.output and "admin S3 credentials" in result.output
    # The roles behind it (the console's viewer may not; its supervisor may).
    for action in ("care_report", "care_note", "care_resume"):
        assert Principal("v", "viewer").may(action) is False
        assert Principal("s", "service").may(action) is False
        assert Principal("s", "supervisor").may(action) and Principal("a", "admin").may(action)

    async def keys() -> list[str]:
        return [o.key async for o in store.list_prefix("")]

    assert asyncio.run(keys()) == []  # nothing written, not even an audit record


def test_bad_usage_exits_2() -> None:
    env = {"KASUHARA_MQTT__ENABLED": "false", "KASUHARA_AGENTS__PEOPLE": json.dumps(PEOPLE)}
    assert invoke(env, "care", "report", "--month", "2026-13").exit_code == 2
    assert invoke(env, "care", "note", "../etc", "--text", "x").exit_code == 2
    assert invoke(env, "care", "note", "care-x", "--text", "x").exit_code == 2  # not in [agents]
    bad = {**env, "KASUHARA_AGENTS__PEOPLE": json.dumps({"a/b": "x"})}
    assert invoke(bad, "care", "report", "--month", "2026-11").exit_code == 2


def test_endpoint_names_and_kinds_from_metadata() -> None:
    assert endpoint_of("PJSIP/agent1") == "agent1"
    assert endpoint_of("PJSIP/agent1/sip:agent1@10.0.0.5:5060") == "agent1"
    assert endpoint_of("PJSIP/agent1-0000002a") == "agent1"
    assert endpoint_of("agent1") == "agent1"
    assert endpoint_of(None) is None and endpoint_of("PJSIP/../x") is None
    doc = {"escalations": [esc("flag", by="detector")], "timeline": [{"event": "talk_over_detected"}]}
    assert kinds_of(doc) == {"detection"}


def test_the_minutes_threshold_alone_asks_for_a_follow_up() -> None:
    docs = [{"agent": "PJSIP/a", "duration_s": 301.0, "escalations": [esc("warn")]}]
    start = datetime(2026, 11, 1, tzinfo=TOKYO)
    care = CareConfig(follow_up_calls=0, follow_up_minutes=5.0)
    (row,) = build_report("2026-11", docs, [], care=care, people={}, month_start=start).agents
    assert row.needs_follow_up and row.status == "waiting" and row.minutes == 5.0
    under = build_report(
        "2026-11", [{**docs[0], "duration_s": 299.0}], [], care=care, people={}, month_start=start
    )
    assert not under.agents[0].needs_follow_up
    note = Note("a", "2026-11-20T10:00:00.000+09:00", "boss", "ok")
    done = build_report("2026-11", docs, [note], care=care, people={}, month_start=start)
    assert done.agents[0].status == "followed up"


def test_the_chart_in_each_language_with_a_single_call_and_wide_legend() -> None:
    from kasuhara_ari.care.chart import WORDS, render_svg
    from kasuhara_ari.care.report import CareReport, Exposure

    rep = CareReport("2026-11", [Exposure("a1", "佐藤", calls=3, harassment_calls=1, flags=1, seconds=90)])
    for lang, row in (("en", "1 call, 1.5 min"), ("ja", "1 件・1.5 分")):
        root = ET.fromstring(render_svg(rep, language=lang))
        texts = ["".join(el.itertext()) for el in root.iter(f"{{{SVG_NS}}}text")]
        assert row in texts, texts
        assert WORDS[lang].title.format(month="2026-11") in texts
        # The legend fits: the drawing is at least as wide as its legend's last entry ends.
        end = WORDS[lang].legend[-1]
        last = next(el for el in root.iter(f"{{{SVG_NS}}}text") if el.text == end)
        assert float(root.get("width", "0")) >= float(last.get("x", "0")) + 8 * len(end)
    with pytest.raises(KeyError):
        render_svg(rep, language="fr")
