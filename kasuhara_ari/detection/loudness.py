"""Shouting, from the caller's own audio: level and clipping per frame against the caller's own baseline.

Phones (and their automatic gain) deliver speech anywhere between about −35 and −10 dBFS, so an absolute
threshold alone either misses a quiet line's shout or fires on a loud line's calm talk. The detector
therefore learns each caller's **baseline** (the median level of their first ``baseline_s`` seconds of
speech, then slowly following their calm speech) and calls a stretch a **shout** when, for at least
``shout_min_s``, most frames are both ``shout_over_baseline_db`` above that baseline *and* above the
absolute ``shout_floor_dbfs``. Overdriven speech (a shout into a handset clips: many samples at full
scale) needs only half the rise, since gain control flattens its level.

Frames that are not speech do not count: below ``speech_floor_dbfs`` (silence, line noise), or tonal
(nearly all energy in a few frequencies: DTMF, ring-back, a beep), which would otherwise look like a
sudden loud caller.

Pure logic on numpy arrays, no I/O and no clock: the stream's own sample count is its clock, so a test
feeds arrays and gets the same answer every time.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from ..config import DetectionConfig
from .base import AudioFrame, Detection, Party

#: A sample this close to full scale counts as clipped (G.711 µ-law's largest value is 32124/32768).
CLIP_LEVEL = 0.97
#: A frame with this share of clipped samples is overdriven.
CLIP_SHARE = 0.01
#: Share of a frame's energy in its strongest few frequency bins above which it is a tone, not speech.
TONAL_SHARE = 0.97
TONAL_BINS = 24
#: Within a shout, pauses (between words, for breath) up to this long do not end it.
MAX_PAUSE_S = 0.4
#: Share of the frames of a shout that must be loud (the rest are the pauses and quieter syllables).
LOUD_SHARE = 0.6
#: How fast the baseline follows the caller's calm speech after it was learnt (time constant, seconds).
BASELINE_FOLLOW_S = 30.0


@dataclass(frozen=True)
class FrameLevel:
    """What one frame measures."""

    level_dbfs: float  # RMS level relative to a full-scale square wave (a full-scale sine is −3 dBFS)
    clip_share: float  # share of samples at full scale
    tonal_share: float  # share of the energy in the strongest TONAL_BINS frequency bins


def level_and_clipping(samples: npt.NDArray[np.float32]) -> tuple[float, float]:
    """RMS level (dBFS) and share of clipped samples of one frame (float samples in [-1, 1])."""
    if samples.size == 0:
        return -120.0, 0.0
    x = samples.astype(np.float64, copy=False)
    power = float(np.dot(x, x)) / x.size
    level = 10.0 * math.log10(power) if power > 1e-12 else -120.0
    return level, float(np.count_nonzero(np.abs(x) >= CLIP_LEVEL)) / x.size


@functools.lru_cache(maxsize=8)
def _window(size: int) -> npt.NDArray[np.float64]:
    return np.hanning(size)


def tonal_share(samples: npt.NDArray[np.float32]) -> float:
    """Share of the frame's energy in its TONAL_BINS strongest frequency bins (a tone: near 1)."""
    if samples.size < 2 * TONAL_BINS:
        return 0.0
    spectrum = np.abs(np.fft.rfft(samples * _window(samples.size))) ** 2
    total = float(spectrum.sum())
    if total <= 0.0:
        return 0.0
    return float(np.partition(spectrum, -TONAL_BINS)[-TONAL_BINS:].sum()) / total


def measure(samples: npt.NDArray[np.float32]) -> FrameLevel:
    """Level, clipping and tonality of one frame."""
    level, clip = level_and_clipping(samples)
    return FrameLevel(level, clip, tonal_share(samples))


@dataclass
class _Run:
    """A stretch of loud frames in progress."""

    start_s: float
    last_loud_end_s: float
    frames: int = 0
    loud: int = 0
    power_sum: float = 0.0
    clip_sum: float = 0.0
    peak_dbfs: float = -120.0
    reported: bool = False


@dataclass
class LoudnessDetector:
    """Signal 2 of issue 14 (a :class:`~kasuhara_ari.detection.base.FrameDetector`): shouting callers.

    Feed it frames of ``frame_ms`` (any length works; 100–200 ms is what the thresholds were tuned on)."""

    cfg: DetectionConfig
    party: Party = "caller"
    baseline_dbfs: float | None = None
    _learning: list[float] = field(default_factory=list)
    _run: _Run | None = None
    #: End of the last reported shout (stream seconds): the next needs ``shout_gap_s`` of calm first.
    _last_reported_end: float | None = None
    speech_s: float = 0.0

    def talk(self, party: Party, talking: bool, offset_s: float) -> list[Detection]:
        """Talk events add nothing the audio does not tell this detector."""
        return []

    def feed(self, frame: AudioFrame) -> list[Detection]:
        if frame.party != self.party or frame.samples.size == 0:
            return []
        cfg = self.cfg
        level, clip = level_and_clipping(frame.samples)
        dur = frame.duration_s
        base = self.baseline_dbfs
        rise = level - base if base is not None else 0.0
        # The spectrum (the costly part) only where it can change the answer: while the baseline is
        # learnt, and for frames loud enough to be a shout (the bench: 100 calls' frames on 2 cores).
        candidate = base is None or (
            level >= cfg.shout_floor_dbfs
            and (
                rise >= cfg.shout_over_baseline_db
                or (clip >= CLIP_SHARE and rise >= cfg.shout_over_baseline_db / 2)
            )
        )
        speech = level >= cfg.speech_floor_dbfs and (
            not candidate or tonal_share(frame.samples) < TONAL_SHARE
        )
        if speech:
            self.speech_s += dur
        if base is None:
            if speech:
                self._learning.append(level)
                if len(self._learning) * dur >= cfg.baseline_s:
                    self.baseline_dbfs = float(np.median(self._learning))
                    self._learning.clear()
            return []
        loud = speech and candidate
        end = frame.offset_s + dur
        if speech and not loud and self._run is None:
            # Calm speech: the baseline follows the caller slowly (a line that gets louder over minutes).
            self.baseline_dbfs = base + (level - base) * min(1.0, dur / BASELINE_FOLLOW_S)
        run = self._run
        if loud:
            if run is None:
                run = self._run = _Run(start_s=frame.offset_s, last_loud_end_s=end)
            run.loud += 1
            run.last_loud_end_s = end
            run.power_sum += 10 ** (level / 10)
            run.clip_sum += clip
            run.peak_dbfs = max(run.peak_dbfs, level)
        if run is None:
            return []
        run.frames += 1
        if not loud and end - run.last_loud_end_s > MAX_PAUSE_S:
            if run.reported:
                self._last_reported_end = run.last_loud_end_s
            self._run = None
            return []
        if run.reported or run.last_loud_end_s - run.start_s < cfg.shout_min_s:
            return []
        if run.loud / run.frames < LOUD_SHARE:
            return []
        gap_ok = self._last_reported_end is None or run.start_s - self._last_reported_end >= cfg.shout_gap_s
        if not gap_ok:
            return []
        run.reported = True
        level = 10 * math.log10(run.power_sum / run.loud)
        return [
            Detection(
                "shouting",
                {
                    "level_dbfs": round(level, 1),
                    "baseline_dbfs": round(base, 1),
                    "over_baseline_db": round(level - base, 1),
                    "peak_dbfs": round(run.peak_dbfs, 1),
                    "duration_s": round(run.last_loud_end_s - run.start_s, 2),
                    "clipping": round(run.clip_sum / run.loud, 3),
                },
                onset_s=run.start_s,
            )
        ]


def loudness_detector(cfg: DetectionConfig) -> LoudnessDetector:
    """The factory the configuration names (``kasuhara_ari.detection.loudness:loudness_detector``)."""
    return LoudnessDetector(cfg)
