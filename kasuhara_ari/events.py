"""Events about calls, retention and admin actions, as the rest of the app sees them.

Call logic only ever calls :meth:`EventSink.emit`, which never blocks and never raises: a broker outage
must not slow a call. Publishing to MQTT lives behind this interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol


def now_iso() -> str:
    """ISO 8601 with offset and milliseconds, as every payload's ``at``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class EventSink(Protocol):
    def emit(self, event: str, call_id: str | None = None, /, **fields: Any) -> None:
        """Queue an event; never blocks, never raises."""


@dataclass
class MemoryEvents:
    """Keeps events in a list: for tests and for the demo's summary."""

    events: list[dict[str, Any]] = field(default_factory=list)

    def emit(self, event: str, call_id: str | None = None, /, **fields: Any) -> None:
        payload: dict[str, Any] = {"event": event, "at": now_iso(), **fields}
        if call_id is not None:
            payload["call_id"] = call_id
        self.events.append(payload)

    def of(self, call_id: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("call_id") == call_id]


class NullEvents:
    def emit(self, event: str, call_id: str | None = None, /, **fields: Any) -> None:
        return None
