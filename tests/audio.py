"""Small audio checks for recordings (pure Python: 10 ms energy envelopes, no numpy needed)."""

from __future__ import annotations

import math
import struct
import wave
from pathlib import Path


def read_pcm16(path: Path) -> tuple[list[int], int]:
    with wave.open(str(path), "rb") as w:
        assert w.getsampwidth() == 2 and w.getnchannels() == 1, (w.getsampwidth(), w.getnchannels())
        rate = w.getframerate()
        frames = w.readframes(w.getnframes())
    return list(struct.unpack(f"<{len(frames) // 2}h", frames)), rate


def duration_s(path: Path) -> float:
    with wave.open(str(path), "rb") as w:
        return w.getnframes() / w.getframerate()


def header_is_final(path: Path) -> bool:
    """True when the RIFF/data sizes in the header match the file: MixMonitor fixes them up on close."""
    data = path.read_bytes()
    if len(data) < 44 or data[:4] != b"RIFF":
        return False
    riff_size = struct.unpack("<I", data[4:8])[0]
    return riff_size == len(data) - 8


def notch(samples: list[int], rate: int, freq: float, q: float = 8.0) -> list[float]:
    """Remove one test tone (the SIPp phones stream steady tones) so speech envelopes can be compared."""
    w0 = 2 * math.pi * freq / rate
    alpha = math.sin(w0) / (2 * q)
    b0, b1, b2 = 1.0, -2 * math.cos(w0), 1.0
    a0, a1, a2 = 1 + alpha, -2 * math.cos(w0), 1 - alpha
    b0, b1, b2, a1, a2 = b0 / a0, b1 / a0, b2 / a0, a1 / a0, a2 / a0
    out: list[float] = []
    x1 = x2 = y1 = y2 = 0.0
    for x in samples:
        y = b0 * x + b1 * x1 + b2 * x2 - a1 * y1 - a2 * y2
        x2, x1, y2, y1 = x1, x, y1, y
        out.append(y)
    return out


def envelope(samples: list[int] | list[float], rate: int, frame_ms: int = 10) -> list[float]:
    n = rate * frame_ms // 1000
    return [math.sqrt(sum(s * s for s in samples[i : i + n]) / n) for i in range(0, len(samples) - n + 1, n)]


def best_match(haystack: list[float], needle: list[float], max_lag: int) -> tuple[float, int]:
    """Highest normalised correlation of ``needle`` within the first ``max_lag`` frames of ``haystack``."""

    def norm(xs: list[float]) -> list[float]:
        mean = sum(xs) / len(xs)
        dev = math.sqrt(sum((x - mean) ** 2 for x in xs)) or 1.0
        return [(x - mean) / dev for x in xs]

    nd = norm(needle)
    best = (-1.0, 0)
    for lag in range(0, max_lag + 1):
        window = haystack[lag : lag + len(needle)]
        if len(window) < len(needle):
            break
        score = sum(a * b for a, b in zip(norm(window), nd, strict=True))
        best = max(best, (score, lag))
    return best


def contains_at_start(
    recording: Path, prompt: Path, *, within_s: float = 2.0, tones: tuple[float, ...] = (700.0, 1300.0)
) -> tuple[float, float]:
    """(correlation, offset in s) of ``prompt`` found near the start of ``recording``, after removing the
    test phones' tones from both."""
    rec, rate = read_pcm16(recording)
    pr, prate = read_pcm16(prompt)
    assert rate == prate == 8000, (rate, prate)
    rec_f: list[int] | list[float] = rec
    pr_f: list[int] | list[float] = pr
    for tone in tones:
        rec_f = notch([int(x) for x in rec_f], rate, tone)
        pr_f = notch([int(x) for x in pr_f], rate, tone)
    score, lag = best_match(envelope(rec_f, rate), envelope(pr_f, prate), int(within_s * 100))
    return score, lag / 100
