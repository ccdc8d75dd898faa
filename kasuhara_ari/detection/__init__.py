"""Live detection of abusive talk on a call, from signals the box already has (no cloud, no models).

``talk``: who talks when, from Asterisk's own talk detection (TALK_DETECT → ChannelTalkingStarted/
Finished): monologues and an agent who cannot get a word in. Detectors are pure logic fed with events and
the clock; the call (kasuhara_ari/call.py) feeds them and acts on what they report.

``loudness``: shouting, from the caller's own audio (``media``: a snoop on the caller's leg streamed over
RTP to one socket of the app) against the caller's own baseline. ``base``: the plug-in point (a detector
fed the same per-direction frames and talk events) through which an operator adds their own.
"""

from ..config import DetectionConfig
from .base import DetectorFactory, load_factory
from .loudness import loudness_detector


def configured_factories(cfg: DetectionConfig) -> tuple[DetectorFactory, ...]:
    """The frame detectors a call gets: the built-in loudness detector (``loudness``) and every
    ``detectors`` entry; none when detection is off. Raises DetectorLoadError naming a bad entry (at
    start-up, not at the first call)."""
    if cfg.mode == "off":
        return ()
    builtin: list[DetectorFactory] = [loudness_detector] if cfg.loudness else []
    return (*builtin, *(load_factory(path) for path in cfg.detectors))
