"""The console's words: both languages say the same things, and every audit action and recording flag the
code writes has a name in each (else a Japanese page would show raw identifiers such as ``user_passwd``)."""

from __future__ import annotations

import re

from kasuhara_ari import audit
from kasuhara_ari.web.i18n import LANGUAGES, MESSAGES

from conftest import REPO


def test_japanese_and_english_have_the_same_keys() -> None:
    ja, en = set(MESSAGES["ja"]), set(MESSAGES["en"])
    assert ja - en == set() and en - ja == set()
    assert set(MESSAGES) == set(LANGUAGES)


def test_every_audit_action_has_a_name_in_every_language() -> None:
    for lang in LANGUAGES:
        missing = [a for a in audit.ACTIONS if f"act_{a}" not in MESSAGES[lang]]
        assert missing == [], (lang, missing)


def test_every_flag_the_code_writes_has_a_name_in_every_language() -> None:
    written = set()
    for path in (REPO / "kasuhara_ari").rglob("*.py"):
        written |= set(re.findall(r"flags\.append\(\"([a-z_]+)\"\)", path.read_text(encoding="utf-8")))
    assert written, "no flags found: the pattern no longer matches how the code adds flags"
    for lang in LANGUAGES:
        assert [f for f in sorted(written) if f"flag_{f}" not in MESSAGES[lang]] == [], lang
