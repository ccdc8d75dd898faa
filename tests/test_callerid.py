"""Caller-ID templates and cleaning (pure logic; the SIP side is in test_callerid_sip.py)."""

from __future__ import annotations

from typing import Any

import pytest

from kasuhara_ari import config as config_mod
from kasuhara_ari.callerid import (
    NAME_MAX_BYTES,
    TemplateError,
    agent_label,
    check_template,
    clean_display_name,
    clean_display_number,
    dialled_number,
    mode_label,
    render,
    repairs,
)
from kasuhara_ari.config import ConfigError


def test_default_templates_show_escalation_agent_and_customer() -> None:
    cfg = config_mod.load(env={}).callerid
    shown = render(
        cfg.escalation_name,
        cfg.escalation_number,
        {"key": "*9", "agent": "agent-12", "caller_number": "+81 3-1234-5678"},
    )
    assert (shown.name, shown.number) == ("*9 応援要請 agent-12", "+81312345678")
    assert shown.variables() == {
        "CONNECTEDLINE(name)": "*9 応援要請 agent-12",
        "CALLERID(name)": "*9 応援要請 agent-12",
        "CONNECTEDLINE(num)": "+81312345678",
        "CALLERID(num)": "+81312345678",
    }
    sup = render(
        cfg.supervise_name, cfg.supervise_number, {"mode_label": mode_label("barge", "ja"), "agent": "a"}
    )
    assert (sup.name, sup.number) == ("割込み a", "")
    # Outbound: empty templates = keep the agent's own caller ID (nothing is set).
    assert not render(cfg.outbound_name, cfg.outbound_number, {"agent_number": "0501234567"})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a\r\nX: y", "a X: y"),  # no line break can start a SIP header
        ('q"u\\ote', "quote"),
        ("\u202eevil\u200b name\x00", "evil name"),  # bidi override, zero-width space, NUL
        ("  山田   太郎 ", "山田 太郎"),
        (b"\xff\xfeab", "\ufffd\ufffdab"),
    ],
)
def test_display_names_are_cleaned(raw: Any, expected: str) -> None:
    assert clean_display_name(raw) == expected
    assert clean_display_name(expected) == expected  # idempotent


def test_long_names_are_cut_at_a_character_within_the_byte_cap() -> None:
    for text in ("長" * 10_000, "a" * 10_000, "ab長" * 3000, "😀" * 100):
        cut = clean_display_name(text)
        assert len(cut.encode()) <= NAME_MAX_BYTES and cut.endswith("…"), cut
        assert text.startswith(cut[:-1])
        assert clean_display_name(cut) == cut
    exact = "x" * NAME_MAX_BYTES
    assert clean_display_name(exact) == exact


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0312345678", "0312345678"),
        ("+81 (3) 1234-5678", "+81312345678"),
        ("anonymous", ""),
        ("1" * 99, "1" * 32),
    ],
)
def test_numbers_keep_dialable_characters(raw: str, expected: str) -> None:
    assert clean_display_number(raw) == expected


def test_missing_fields_render_empty_and_hostile_fields_are_cleaned() -> None:
    shown = render("{key} {caller_name}", "{caller_number}", {"caller_name": "a\r\nX: y" + "z" * 10_000})
    assert "\r" not in shown.name and "\n" not in shown.name
    assert shown.name.startswith("a X: yzz") and len(shown.name.encode()) <= NAME_MAX_BYTES
    assert shown.number == ""
    assert shown.variables() == {"CONNECTEDLINE(name)": shown.name, "CALLERID(name)": shown.name}


@pytest.mark.parametrize(
    ("template", "kind", "message"),
    [
        ("{agent.__class__}", "escalation", "unknown field"),
        ("{caller_number[0]}", "escalation", "unknown field"),
        ("{agent!r}", "escalation", "no format spec"),
        ("{agent:>40}", "escalation", "no format spec"),
        ("{mode}", "escalation", "unknown field"),
        ("{key", "escalation", "braces"),
        ("{customer_number}", "supervise", "unknown field"),
    ],
)
def test_bad_templates_are_refused(template: str, kind: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        check_template(template, kind)


def test_templates_are_checked_when_the_config_loads() -> None:
    with pytest.raises(ConfigError, match=r"callerid.supervise_name: .*unknown field \{agnet\}"):
        config_mod.load(env={"KASUHARA_CALLERID__SUPERVISE_NAME": "{agnet}"})
    cfg = config_mod.load(env={"KASUHARA_CALLERID__OUTBOUND_NUMBER": "0120{{1}}"})
    assert render(cfg.callerid.outbound_name, cfg.callerid.outbound_number, {}).number == "01201"


@pytest.mark.parametrize(
    ("target", "label"),
    [
        ("PJSIP/agent-12", "agent-12"),
        ("PJSIP/agent-12-0000001a", "agent-12"),
        ("PJSIP/agent/sip:agent@127.0.0.1:5123", "agent"),
        ("Local/1001@agents", "1001"),
        ("Local/1001@agents-00000003;2", "1001"),
    ],
)
def test_agent_label(target: str, label: str) -> None:
    assert agent_label(target) == label


@pytest.mark.parametrize(
    ("target", "number"),
    [
        ("PJSIP/0312345678@trunk", "0312345678"),
        ("PJSIP/trunk/sip:0312345678@carrier.example", "0312345678"),
        ("PJSIP/customer/sip:customer@127.0.0.1:5090", ""),
        ("PJSIP/trunk/tel:+81312345678", "+81312345678"),
    ],
)
def test_dialled_number(target: str, number: str) -> None:
    assert dialled_number(target) == number


def test_repairs_only_what_cleaning_would_change() -> None:
    assert repairs('Yamada "Taro"', "0312345678") == {}  # quotes: Asterisk escapes them itself
    assert repairs("a\r\nX: y", "03\n1") == {"CALLERID(name)": "a X: y", "CALLERID(num)": "031"}
    assert set(repairs("長" * 100, "")) == {"CALLERID(name)"}


def test_mode_labels() -> None:
    assert [mode_label(m, "ja") for m in ("listen", "whisper", "barge")] == [
        "モニター",
        "ウィスパー",
        "割込み",
    ]
    assert mode_label("listen", "en") == "Listen" and mode_label("listen", "fr") == "Listen"
