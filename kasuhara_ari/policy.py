"""Call rules from the MHLW manual and Tokyo's guideline: a time budget per call, repeat callers, and an
admin-managed caller list. The decisions here are pure; the call carries them out.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .config import PolicyConfig


class BudgetStep(enum.Enum):
    NONE = "none"
    WARN = "warn"  # the agent (only) hears a short tone; a long_call event goes out
    END = "end"  # the caller hears the closing notice and the call ends


@dataclass
class TimeBudget:
    """Where a call stands against its time budget. ``step`` returns each action once."""

    policy: PolicyConfig
    warned: bool = False
    ended: bool = False

    @property
    def active(self) -> bool:
        return self.policy.time_budget_mode != "off" and self.policy.time_budget_s > 0

    def step(self, elapsed_s: float) -> BudgetStep:
        if not self.active or self.ended:
            return BudgetStep.NONE
        budget = self.policy.time_budget_s
        if elapsed_s >= budget and self.policy.time_budget_mode == "enforce":
            self.ended = True
            return BudgetStep.END
        if not self.warned and elapsed_s >= budget - self.policy.warn_before_s:
            self.warned = True
            return BudgetStep.WARN
        return BudgetStep.NONE

    def seconds_to_next(self, elapsed_s: float) -> float | None:
        """How long until ``step`` may return something new (None: never)."""
        if not self.active or self.ended:
            return None
        budget = self.policy.time_budget_s
        if not self.warned:
            return max(0.0, budget - self.policy.warn_before_s - elapsed_s)
        if self.policy.time_budget_mode == "enforce":
            return max(0.0, budget - elapsed_s)
        return None
