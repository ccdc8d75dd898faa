"""Time budget decisions (pure)."""

from __future__ import annotations

import pytest

from kasuhara_ari.config import ConfigError, PolicyConfig, load
from kasuhara_ari.policy import BudgetStep, TimeBudget


def steps(policy: PolicyConfig, times: list[float]) -> list[str]:
    budget = TimeBudget(policy)
    return [budget.step(t).value for t in times]


def test_off_never_acts() -> None:
    assert steps(PolicyConfig(time_budget_mode="off", time_budget_s=10), [0, 9, 10, 1000]) == ["none"] * 4


def test_warn_once_then_nothing() -> None:
    policy = PolicyConfig(time_budget_mode="warn", time_budget_s=10, warn_before_s=3)
    assert steps(policy, [0, 6.9, 7, 7.5, 10, 100]) == ["none", "none", "warn", "none", "none", "none"]


def test_enforce_warns_then_ends_once() -> None:
    policy = PolicyConfig(time_budget_mode="enforce", time_budget_s=10, warn_before_s=3)
    assert steps(policy, [1, 7, 9.9, 10, 11]) == ["none", "warn", "none", "end", "none"]


def test_enforce_late_check_still_ends() -> None:
    # A loop that wakes late (past the limit, never warned) ends the call rather than warning first.
    policy = PolicyConfig(time_budget_mode="enforce", time_budget_s=10, warn_before_s=3)
    assert steps(policy, [0, 12]) == ["none", "end"]


def test_seconds_to_next() -> None:
    budget = TimeBudget(PolicyConfig(time_budget_mode="enforce", time_budget_s=10, warn_before_s=3))
    assert budget.seconds_to_next(2) == 5
    assert budget.step(7) is BudgetStep.WARN
    assert budget.seconds_to_next(8) == 2


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"KASUHARA_POLICY__TIME_BUDGET_MODE": "sometimes"}, "time_budget_mode"),
        (
            {"KASUHARA_POLICY__TIME_BUDGET_MODE": "warn", "KASUHARA_POLICY__TIME_BUDGET_S": "0"},
            "time_budget_s",
        ),
        (
            {"KASUHARA_POLICY__TIME_BUDGET_MODE": "warn", "KASUHARA_POLICY__WARN_BEFORE_S": "4000"},
            "warn_before_s",
        ),
    ],
)
def test_bad_policy_config_names_the_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load(env=env)
