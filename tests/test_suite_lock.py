"""The suite's own machinery: the once-per-worker check of the stack's Asterisk waits while a test has
Asterisk to itself (``asterisk_alone``: test_asterisk_down stops it). Before, the session fixture probed
without the lock; a worker whose first Asterisk test started in that window cached "not reachable" and
errored every later Asterisk test it ran (two CI runs: 54 and 47 errors)."""

from __future__ import annotations

import threading

import pytest

from kasuhara_ari.config import Config

from conftest import asterisk_checked, asterisk_lock

pytestmark = pytest.mark.integration


def test_the_asterisk_check_waits_while_a_test_has_asterisk_alone(stack_cfg: Config) -> None:
    held, release = threading.Event(), threading.Event()

    def alone() -> None:
        with asterisk_lock(alone=True):
            held.set()
            release.wait(60)

    owner = threading.Thread(target=alone, daemon=True)
    owner.start()
    try:
        assert held.wait(120), "never got Asterisk alone"
        checked: list[Config] = []
        checker = threading.Thread(target=lambda: checked.append(asterisk_checked(stack_cfg)), daemon=True)
        checker.start()
        checker.join(1.0)
        assert checker.is_alive() and checked == []  # it waits: Asterisk may be stopped meanwhile
    finally:
        release.set()
        owner.join(30)
    checker.join(30)
    assert checked == [stack_cfg]
