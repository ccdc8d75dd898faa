"""The detector plug-in point: what a detector is fed and what it returns.

A call feeds every detector the same two things, per direction (``caller`` / ``agent``):

- **audio frames** (:class:`AudioFrame`: mono float samples in [-1, 1], 100–200 ms each, on the stream's
  own clock), today for the caller only (a snoop ``spy=in`` on the caller's leg, see ``media.py``);
- **talk events** (Asterisk's TALK_DETECT: a party starts or stops talking).

and publishes what the detector returns (:class:`Detection`) as ``<kind>_detected`` (built-in kinds) or
``custom_detected`` with ``kind`` (any other), into the recording's timeline, and acts on it in ``act`` mode.

An operator adds a detector (a keyword spotter with a local ASR model, say) without touching this project:
a class with the :class:`FrameDetector` methods, importable by the service, named in the configuration::

    [detection]
    detectors = ["mycompany.kws:KeywordSpotter"]

``KeywordSpotter(cfg)`` is called once per call with the ``[detection]`` section. Detectors run on the
event loop, frame by frame: keep :meth:`FrameDetector.feed` well under a millisecond, or hand the work to a
thread of your own and return its findings from a later call.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from ..config import DetectionConfig

Party = Literal["caller", "agent"]

#: Kinds with their own event and schema entry (``<kind>_detected``); other kinds go out as
#: ``custom_detected`` with ``kind``.
BUILTIN_KINDS = frozenset({"monologue", "talk_over", "shouting"})


@dataclass(frozen=True)
class Detection:
    """What was detected (the MQTT event ``<kind>_detected``) and its figures.

    ``onset_s``: where it began on the feeding stream's clock (seconds), when the detector knows it
    better than "now" (a shout is reported a second after it began); the call turns it into an offset
    from the recording's start."""

    kind: str
    figures: dict[str, float | int]
    onset_s: float | None = None


@dataclass(frozen=True)
class AudioFrame:
    """One stretch of one party's audio. ``offset_s``: its start on the stream's clock (0 = the first
    sample the app received for this party)."""

    party: Party
    samples: npt.NDArray[np.float32]
    rate: int
    offset_s: float

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.rate


@runtime_checkable
class FrameDetector(Protocol):
    """A per-call detector (one instance per call; state is per call)."""

    def feed(self, frame: AudioFrame) -> list[Detection]:
        """A frame of one party's audio; returns what it found (usually nothing)."""
        ...

    def talk(self, party: Party, talking: bool, offset_s: float) -> list[Detection]:
        """Asterisk's talk detection: ``party`` started (``talking``) or stopped talking."""
        ...


DetectorFactory = Callable[[DetectionConfig], FrameDetector]


class DetectorLoadError(ValueError):
    """A ``detection.detectors`` entry that cannot be imported or is not a detector (names the entry)."""


def load_factory(path: str) -> DetectorFactory:
    """``"package.module:Name"`` → the callable that makes one detector per call."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise DetectorLoadError(f"detection.detectors: {path!r} is not 'package.module:Name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DetectorLoadError(f"detection.detectors: cannot import {module_name!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise DetectorLoadError(f"detection.detectors: {path!r} has no callable {attr!r}")
    made: DetectorFactory = factory
    return made


def make_detectors(cfg: DetectionConfig, factories: list[DetectorFactory]) -> list[FrameDetector]:
    """One instance of each configured detector for a new call; one that does not fit the protocol is an
    error naming it (caught at start-up by :func:`check_detectors`)."""
    made = []
    for factory in factories:
        det = factory(cfg)
        if not isinstance(det, FrameDetector):
            raise DetectorLoadError(f"detection.detectors: {factory!r} made {det!r}, not a FrameDetector")
        made.append(det)
    return made
