"""``kasuhara doctor`` checks that every prompt the config names exists in Asterisk in the configured
language (ARI ``/sounds``), against the stack's real Asterisk: a missing prompt would leave a caller in
silence where the notice should be, and the call would only say ``notice_failed`` afterwards."""

from __future__ import annotations

import dataclasses

import pytest

from kasuhara_ari.config import Config
from kasuhara_ari.doctor import check_prompts, configured_sounds

pytestmark = pytest.mark.integration


async def test_every_prompt_of_the_stack_exists_in_japanese_and_in_english(asterisk: Config) -> None:
    sounds = configured_sounds(asterisk)
    assert "announcement.sound" in sounds and "escalation.supervisor_ack_sound" in sounds
    for lang in ("ja", "en"):
        cfg = dataclasses.replace(
            asterisk, announcement=dataclasses.replace(asterisk.announcement, language=lang)
        )
        check = await check_prompts(cfg)
        assert check.ok and f"present in {lang}" in check.detail, check


async def test_a_missing_prompt_and_a_missing_language_are_named(asterisk: Config) -> None:
    announcement = dataclasses.replace(asterisk.announcement, apology_sound="kasuhara/no-such-prompt")
    check = await check_prompts(dataclasses.replace(asterisk, announcement=announcement))
    assert not check.ok and "kasuhara/no-such-prompt (announcement.apology_sound)" in check.detail, check
    french = dataclasses.replace(asterisk.announcement, language="fr")
    check = await check_prompts(dataclasses.replace(asterisk, announcement=french))
    assert not check.ok and check.detail.startswith("not in language fr:"), check
    # Asterisk's sound index names the languages it has the file in (here en, ja and its en_US ones).
    assert "kasuhara/recording-notice (announcement.sound; only en," in check.detail, check
