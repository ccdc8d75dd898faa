"""Who talks when: monologues and talk-over from Asterisk's talk detection, per call, per party.

Asterisk runs the DSP (``TALK_DETECT(set)`` on each leg, in its own threads) and sends two events per
stretch of talk; this class only keeps a few timestamps per call, so it costs next to nothing at 100 calls.

- **Monologue**: the caller has been talking without a pause (``silence_ms`` of Asterisk's setting) for
  ``monologue_s``: reported *while it goes on* (the call asks :meth:`seconds_to_next` when to look again),
  not when the caller finally stops.
- **Talk-over**: the agent starts while the caller talks and gives up within ``back_off_s`` while the caller
  goes on; ``attempts`` such tries within ``window_s`` mean the agent cannot get a word in.

Each kind is reported at most once per ``repeat_s``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..config import DetectionConfig
from .base import Detection, Party

__all__ = ["Detection", "Party", "TalkDetector"]


@dataclass
class TalkDetector:
    cfg: DetectionConfig
    #: When each party's current stretch of talk started (monotonic seconds), None while silent.
    talking_since: dict[str, float | None] = field(default_factory=lambda: {"caller": None, "agent": None})
    #: Total talk per party (finished stretches), for the talk share in the figures.
    talked_s: dict[str, float] = field(default_factory=lambda: {"caller": 0.0, "agent": 0.0})
    attempts: deque[float] = field(default_factory=deque)
    reported: dict[str, float] = field(default_factory=dict)
    _agent_started_over_caller: bool = False

    def started(self, party: Party, now: float) -> list[Detection]:
        self.talking_since[party] = now
        if party == "agent":
            self._agent_started_over_caller = self.talking_since["caller"] is not None
        return self.check(now)

    def finished(self, party: Party, now: float, duration_s: float | None = None) -> list[Detection]:
        """``duration_s``: Asterisk's own measure of the stretch (ChannelTalkingFinished ``duration``,
        in ms / 1000), which counts from the first talk frame, not from when the event reached us."""
        since = self.talking_since.get(party)
        length = duration_s if duration_s is not None else (now - since if since is not None else 0.0)
        self.talked_s[party] += max(0.0, length)
        self.talking_since[party] = None
        found: list[Detection] = []
        if party == "agent" and self._agent_started_over_caller:
            self._agent_started_over_caller = False
            if length <= self.cfg.talk_over_back_off_s and self.talking_since["caller"] is not None:
                self.attempts.append(now)
        while self.attempts and now - self.attempts[0] > self.cfg.talk_over_window_s:
            self.attempts.popleft()
        if len(self.attempts) >= self.cfg.talk_over_attempts and self._may_report("talk_over", now):
            found.append(
                Detection(
                    "talk_over",
                    {"attempts": len(self.attempts), "window_s": self.cfg.talk_over_window_s},
                )
            )
            self.attempts.clear()
        return found + self.check(now)

    def check(self, now: float) -> list[Detection]:
        """What is due at ``now`` (a monologue that reached its length)."""
        since = self.talking_since["caller"]
        if since is None or now - since < self.cfg.monologue_s:
            return []
        if not self._may_report("monologue", now):
            return []
        return [Detection("monologue", {"talking_s": round(now - since, 1), **self._shares()})]

    def seconds_to_next(self, now: float) -> float | None:
        """When :meth:`check` may next find something (None: only an event can change that)."""
        since = self.talking_since["caller"]
        if since is None:
            return None
        due = since + self.cfg.monologue_s
        last = self.reported.get("monologue")
        if last is not None:
            due = max(due, last + self.cfg.repeat_s)
        return max(0.0, due - now)

    def totals(self, now: float) -> dict[str, float]:
        """Seconds each party talked, the stretch in progress included (the metadata's ``talk``)."""
        out = {}
        for party in ("caller", "agent"):
            since = self.talking_since[party]
            out[f"{party}_s"] = round(self.talked_s[party] + (now - since if since is not None else 0.0), 1)
        return out

    def _may_report(self, kind: str, now: float) -> bool:
        last = self.reported.get(kind)
        if last is not None and now - last < self.cfg.repeat_s:
            return False
        self.reported[kind] = now
        return True

    def _shares(self) -> dict[str, float]:
        total = self.talked_s["caller"] + self.talked_s["agent"]
        if total <= 0:
            return {}
        return {"caller_share": round(self.talked_s["caller"] / total, 2)}
