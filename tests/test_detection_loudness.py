"""The loudness detector (signal 2 of issue 14) on synthetic arrays: pure logic, no server.

Speech is imitated by a harmonic voice (f0 with its overtones, syllable-shaped by a 4 Hz envelope, with
pauses) at a chosen RMS level; a shout is the same voice raised, higher-pitched and, where said, clipped."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import numpy.typing as npt
import pytest

from kasuhara_ari.config import DetectionConfig
from kasuhara_ari.detection.base import AudioFrame, FrameDetector, load_factory
from kasuhara_ari.detection.loudness import LoudnessDetector, measure

RATE = 8000
Samples = npt.NDArray[np.float32]


def voice(
    seconds: float, level_dbfs: float, *, f0: float = 140.0, seed: int = 1, clip: bool = False
) -> Samples:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    f = f0 * (1 + 0.05 * np.sin(2 * np.pi * 0.7 * t))  # a little intonation
    phase = 2 * np.pi * np.cumsum(f) / RATE
    # Harmonics up to the telephone band's top, and breath noise: a spectrum as broad as speech's.
    harmonics = range(1, int(3400 / (f0 * 1.05)))
    x = sum(np.sin(k * phase) / np.sqrt(k) for k in harmonics) + 0.5 * rng.standard_normal(t.size)
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4 * t)  # syllables
    x = x * envelope
    target = 10 ** (level_dbfs / 20)
    x = x * target / np.sqrt(np.mean(x * x))
    if clip:
        x = np.clip(x * 2.5, -1.0, 1.0)
    return x.astype(np.float32)


def silence(seconds: float) -> Samples:
    return (np.random.default_rng(7).standard_normal(int(seconds * RATE)) * 1e-4).astype(np.float32)


def dtmf(seconds: float, level_dbfs: float = -8.0) -> Samples:
    t = np.arange(int(seconds * RATE)) / RATE
    x = np.sin(2 * np.pi * 697 * t) + np.sin(2 * np.pi * 1209 * t)
    return (x * 10 ** (level_dbfs / 20) / np.sqrt(np.mean(x * x))).astype(np.float32)


def run(
    samples: Samples, cfg: DetectionConfig | None = None, frame_ms: int = 100
) -> list[tuple[float, dict]]:
    det = LoudnessDetector(cfg or DetectionConfig())
    n = RATE * frame_ms // 1000
    found = []
    for i in range(0, samples.size - n + 1, n):
        for d in det.feed(AudioFrame("caller", samples[i : i + n], RATE, i / RATE)):
            assert d.kind == "shouting" and d.onset_s is not None
            found.append((d.onset_s, {**d.figures, "at_s": (i + n) / RATE}))
    return found


def test_measure_levels_and_clipping() -> None:
    sine = np.sin(2 * np.pi * 440 * np.arange(800) / RATE).astype(np.float32)
    m = measure(sine)
    assert m.level_dbfs == pytest.approx(-3.0, abs=0.1)
    assert m.clip_share > 0  # a full-scale sine touches full scale
    assert m.tonal_share > 0.95  # and is a tone
    quiet = measure((sine * 0.1).astype(np.float32))
    assert quiet.level_dbfs == pytest.approx(-23.0, abs=0.1) and quiet.clip_share == 0
    assert measure(voice(0.1, -20)).tonal_share < 0.9  # speech-like spreads over its harmonics


def test_calm_speech_is_no_shout() -> None:
    assert run(voice(30, -26)) == []


def test_loud_but_steady_caller_is_no_shout() -> None:
    # The caller's own level is high (a loud phone): only a rise above their baseline counts.
    assert run(voice(30, -10)) == []


def test_shout_mid_call_is_reported_with_its_onset() -> None:
    audio = np.concatenate([voice(8, -28), voice(3, -12, f0=220, seed=2), voice(6, -28, seed=3)])
    found = run(audio)
    assert len(found) == 1
    onset, figures = found[0]
    assert onset == pytest.approx(8.0, abs=0.3)
    assert figures["at_s"] - 8.0 <= 1.5  # reported while the shout goes on
    assert figures["baseline_dbfs"] == pytest.approx(-28, abs=2)
    assert figures["level_dbfs"] == pytest.approx(-12, abs=2)
    assert figures["duration_s"] >= 1.0


def test_short_burst_is_no_shout() -> None:
    audio = np.concatenate([voice(8, -28), voice(0.6, -10, f0=220), voice(5, -28, seed=3)])
    assert run(audio) == []


def test_clipping_shout_needs_less_rise() -> None:
    # Gain control flattened the shout, but the handset overdrives: clipping tells. With a rise of 14 dB
    # required, a clipping stretch +13 dB over the caller counts, and an unclipped one +8 dB does not.
    cfg = replace(DetectionConfig(), shout_over_baseline_db=14.0)
    calm, after = voice(8, -24), voice(4, -24, seed=3)
    overdriven = np.clip(voice(3, -20, f0=220, seed=2) * 3, -1, 1).astype(np.float32)
    assert measure(overdriven[:800]).clip_share >= 0.01
    assert len(run(np.concatenate([calm, overdriven, after]), cfg)) == 1
    clean = voice(3, -16, f0=220, seed=2)
    assert measure(clean).clip_share == 0
    assert run(np.concatenate([calm, clean, after]), cfg) == []


def test_below_the_absolute_floor_is_no_shout() -> None:
    # A whisperer who raises their voice to normal talk: +12 dB but still quiet in absolute terms.
    assert run(np.concatenate([voice(8, -40), voice(3, -28, f0=220)])) == []


def test_silence_and_dtmf_are_not_speech() -> None:
    det_cfg = DetectionConfig()
    # Silence never sets a baseline; loud DTMF after calm speech is a tone, not a shout.
    assert run(silence(10)) == []
    audio = np.concatenate([voice(6, -28), silence(1), dtmf(2.0), voice(3, -28, seed=4)])
    assert run(audio, det_cfg) == []


def test_two_shouts_need_a_calm_gap_between_reports() -> None:
    calm, shout = voice(6, -28), voice(2, -12, f0=220, seed=2)
    close = np.concatenate([calm, shout, voice(2, -28, seed=5), shout, calm])
    assert len(run(close)) == 1
    apart = np.concatenate([calm, shout, voice(12, -28, seed=5), shout, calm])
    assert len(run(apart)) == 2


def test_thresholds_come_from_the_config() -> None:
    audio = np.concatenate([voice(8, -28), voice(3, -21, f0=220, seed=2), voice(4, -28, seed=3)])
    assert run(audio) == []  # +7 dB: not enough by default
    assert len(run(audio, replace(DetectionConfig(), shout_over_baseline_db=6.0, shout_floor_dbfs=-25))) == 1


@pytest.mark.parametrize("frame_ms", [100, 200])
def test_frame_length_does_not_change_the_answer(frame_ms: int) -> None:
    audio = np.concatenate([voice(8, -28), voice(3, -12, f0=220, seed=2), voice(6, -28, seed=3)])
    assert len(run(audio, frame_ms=frame_ms)) == 1


def test_only_the_watched_party_counts() -> None:
    det = LoudnessDetector(DetectionConfig())
    loud = voice(0.1, -5)
    assert all(det.feed(AudioFrame("agent", loud, RATE, i / 10)) == [] for i in range(100))
    assert det.baseline_dbfs is None


def test_the_builtin_detector_is_loadable_as_a_plugin() -> None:
    factory = load_factory("kasuhara_ari.detection.loudness:loudness_detector")
    assert isinstance(factory(DetectionConfig()), FrameDetector)
