#!/usr/bin/env python3
"""A labelled evaluation set for live detection (issue 14), made offline with espeak-ng and sox.

Every clip is what a caller's phone would send: speech synthesised by espeak-ng (Japanese and English
voices), band-limited to the telephone band (300–3400 Hz), 8 kHz, and written as G.711 µ-law WAV (what
SIPp streams as it is). ``labels.json`` names each clip's class and, for shouts, where they begin and end.

Classes:
  calm        calm speech at an ordinary level (−24…−30 dBFS), per clip its own level
  loud_calm   the same calm speech at a high steady level (−10…−14 dBFS): a loud line, no shout
  shout       calm speech with a 3 s shout in the middle: raised level (+9…+18 dB), higher pitch, compression,
              overdrive (the label gives its onset and end)
  monologue   40 s of calm speech without pauses over 1 s
  babble      calm speech over background babble (several voices mixed, −12 dB under the speaker)
  dtmf        calm speech with loud DTMF key tones in the middle
  hold_music  calm speech, then a loud synthetic music loop (chords) for some seconds

Synthetic audio proves the mechanics (the level path, the thresholds, the timing), not real-world accuracy.

    scripts/make_detection_set.py OUT_DIR [--per-class N] [--seed S] [--classes calm,shout,...]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np
import numpy.typing as npt

RATE = 8000
Audio = npt.NDArray[np.float32]

TEXTS = {
    "ja": [
        "お問い合わせいただいた件について、確認してからご連絡いたします。",
        "先週注文した商品がまだ届いていないので、状況を教えていただけますか。",
        "請求書の金額が前回と違っているようなのですが、理由を知りたいです。",
        "はい、その番号で間違いありません。よろしくお願いします。",
    ],
    "en": [
        "I am calling about the order I placed last week, it has not arrived yet.",
        "Could you please check the invoice, the amount looks different from last month.",
        "Yes, that is the right number. Thank you for checking it for me.",
        "I would like to change the delivery address for my next shipment.",
    ],
}
SHOUTS = {
    "ja": ["ふざけるな、いい加減にしろ、何度言ったら分かるんだ！", "責任者を出せと言っているんだ！"],
    "en": ["This is ridiculous, I have told you three times already!", "Get me your manager right now!"],
}
CLASSES = ("calm", "loud_calm", "shout", "monologue", "babble", "dtmf", "hold_music")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        sys.exit(f"make_detection_set: {name} is not installed (scripts/bootstrap installs it)")
    return path


def speak(text: str, lang: str, *, pitch: int = 50, speed: int = 160, amplitude: int = 100) -> Audio:
    """espeak-ng → sox: 8 kHz, telephone band; float samples, RMS not yet set."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "tts.wav"
        out = Path(tmp) / "tel.wav"
        voice = "ja" if lang == "ja" else "en-us"
        subprocess.run(
            [
                _tool("espeak-ng"),
                "-v",
                voice,
                "-p",
                str(pitch),
                "-s",
                str(speed),
                "-a",
                str(amplitude),
                "-w",
                str(raw),
                text,
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [_tool("sox"), str(raw), "-r", str(RATE), "-c", "1", "-b", "16", str(out), "sinc", "300-3400"],
            check=True,
            capture_output=True,
        )
        return read_wav(out)


def shout_effects(audio: Audio) -> Audio:
    """What a shout does to the signal beyond its level: compression and overdrive (sox), then the band."""
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.wav", Path(tmp) / "out.wav"
        write_wav(src, audio * 0.5)
        subprocess.run(
            [
                _tool("sox"),
                str(src),
                str(out),
                "compand",
                "0.005,0.1",
                "-60,-60,-30,-12,0,-4",
                "6",
                "overdrive",
                "10",
                "sinc",
                "300-3400",
            ],
            check=True,
            capture_output=True,
        )
        return read_wav(out)


def read_wav(path: Path) -> Audio:
    with wave.open(str(path)) as w:
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return (data.astype(np.float32) / 32768.0).copy()


def write_wav(path: Path, audio: Audio) -> None:
    pcm = (np.clip(audio, -1.0, 32767 / 32768) * 32768).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.tobytes())


def to_ulaw(src: Path, dst: Path) -> None:
    """G.711 µ-law, as the phone sends it (the detector then sees what the line delivers)."""
    subprocess.run(
        [_tool("sox"), str(src), "-r", str(RATE), "-c", "1", "-e", "u-law", "-b", "8", str(dst)],
        check=True,
        capture_output=True,
    )


def at_level(audio: Audio, dbfs: float) -> Audio:
    """Scale so the speech (samples above −50 dBFS of the peak, pauses left out) has this RMS level."""
    active = audio[np.abs(audio) > np.abs(audio).max() * 0.003]
    rms = float(np.sqrt(np.mean(active.astype(np.float64) ** 2))) if active.size else 1.0
    return (audio * (10 ** (dbfs / 20) / rms)).astype(np.float32)


def pause(seconds: float) -> Audio:
    noise = np.random.default_rng(int(seconds * 1000)).standard_normal(int(seconds * RATE))
    return (noise * 10 ** (-62 / 20)).astype(np.float32)  # line noise, not digital silence


def talk(lang: str, rng: random.Random, seconds: float, dbfs: float) -> Audio:
    """Calm sentences with short pauses until ``seconds``."""
    parts: list[Audio] = []
    total = 0
    while total < seconds * RATE:
        s = speak(rng.choice(TEXTS[lang]), lang, pitch=rng.randint(35, 60), speed=rng.randint(140, 175))
        parts += [at_level(s, dbfs + rng.uniform(-1.5, 1.5)), pause(rng.uniform(0.3, 0.8))]
        total += s.size
    return np.concatenate(parts)[: int(seconds * RATE)]


def dtmf_tones(digits: str) -> Audio:
    low = {"1": 697, "2": 697, "3": 697, "4": 770, "5": 770, "6": 770, "7": 852, "8": 852, "9": 852, "0": 941}
    high = {
        "1": 1209,
        "2": 1336,
        "3": 1477,
        "4": 1209,
        "5": 1336,
        "6": 1477,
        "7": 1209,
        "8": 1336,
        "9": 1477,
        "0": 1336,
    }
    t = np.arange(int(0.12 * RATE)) / RATE
    parts = []
    for d in digits:
        tone = np.sin(2 * np.pi * low[d] * t) + np.sin(2 * np.pi * high[d] * t)
        parts += [at_level(tone.astype(np.float32), -8), pause(0.1)]
    return np.concatenate(parts)


def music(seconds: float, dbfs: float) -> Audio:
    """A hold-music stand-in: a chord progression with a beat, loud and steady."""
    t = np.arange(int(seconds * RATE)) / RATE
    chords = [(262, 330, 392), (220, 277, 330), (175, 220, 262), (196, 247, 294)]
    out = np.zeros_like(t)
    for i, chord in enumerate(chords * int(seconds)):
        seg = (t >= i * 1.0) & (t < (i + 1) * 1.0)
        for f in chord:
            out[seg] += np.sin(2 * np.pi * f * t[seg]) + 0.3 * np.sin(4 * np.pi * f * t[seg])
    out *= 0.7 + 0.3 * (np.sin(2 * np.pi * 2 * t) > 0)
    return at_level(out.astype(np.float32), dbfs)


def make_clip(kind: str, lang: str, rng: random.Random) -> tuple[Audio, dict[str, object]]:
    base = rng.uniform(-30, -24)
    label: dict[str, object] = {"class": kind, "lang": lang, "shouts": []}
    if kind == "calm":
        audio = talk(lang, rng, 20, base)
    elif kind == "loud_calm":
        audio = talk(lang, rng, 20, rng.uniform(-14, -10))
    elif kind == "shout":
        before = talk(lang, rng, rng.uniform(7, 9), base)
        raw = speak(rng.choice(SHOUTS[lang]), lang, pitch=rng.randint(80, 99), speed=190, amplitude=200)
        shout = at_level(shout_effects(raw), base + rng.uniform(9, 18))  # some barely louder than calm
        shout = np.tile(shout, 3)[: 3 * RATE]  # 3 s of shouting, without a pause
        after = talk(lang, rng, 6, base)
        onset = before.size / RATE
        label["shouts"] = [[round(onset, 2), round(onset + 3.0, 2)]]
        label["baseline_dbfs"] = round(base, 1)
        audio = np.concatenate([before, shout, after])
    elif kind == "monologue":
        audio = talk(lang, rng, 40, base)
    elif kind == "babble":
        speaker = talk(lang, rng, 20, base)
        crowd = sum(talk(lang, random.Random(rng.random()), 20, base - 12) for _ in range(3))
        audio = (speaker + crowd).astype(np.float32)
    elif kind == "dtmf":
        audio = np.concatenate([talk(lang, rng, 8, base), dtmf_tones("0123456789"), talk(lang, rng, 6, base)])
    elif kind == "hold_music":
        audio = np.concatenate([talk(lang, rng, 8, base), music(8, base + 12), talk(lang, rng, 4, base)])
    else:
        raise ValueError(kind)
    label["seconds"] = round(audio.size / RATE, 2)
    return audio, label


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--per-class", type=int, default=4, help="clips per class (and language), default 4")
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--classes", default=",".join(CLASSES))
    ap.add_argument("--langs", default="ja,en")
    args = ap.parse_args(argv)
    classes = [c for c in args.classes.split(",") if c]
    if bad := [c for c in classes if c not in CLASSES]:
        ap.error(f"unknown classes {bad}; known: {', '.join(CLASSES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    labels: dict[str, dict[str, object]] = {}
    for kind in classes:
        for lang in args.langs.split(","):
            for i in range(args.per_class):
                audio, label = make_clip(kind, lang, rng)
                name = f"{kind}-{lang}-{i:02d}.wav"
                with tempfile.TemporaryDirectory() as tmp:
                    lin = Path(tmp) / "lin.wav"
                    write_wav(lin, audio)
                    to_ulaw(lin, args.out / name)
                labels[name] = label
    (args.out / "labels.json").write_text(json.dumps(labels, indent=1, ensure_ascii=False) + "\n")
    print(f"make_detection_set: {len(labels)} clips in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
