#!/usr/bin/env python3
"""Precision, recall and onset→event latency of the loudness detector on a labelled set
(scripts/make_detection_set.py), offline: the clips are decoded from G.711 as the app would receive them
and fed frame by frame; latency is on the stream's clock (the detector's own delay, without the network
and Asterisk's ~20–60 ms). The real-SIP path is measured by tests/test_detection_shout_sip.py.

    scripts/bench_detection.py SET_DIR [--frame-ms 100] [--over-db 10] [--floor -20] [--json]

A detection counts as true when its onset lies within a labelled shout (±0.5 s); any other is false.
Synthetic audio proves the mechanics, not real-world accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kasuhara_ari.config import DetectionConfig
from kasuhara_ari.detection.base import AudioFrame
from kasuhara_ari.detection.loudness import LoudnessDetector


def ulaw_table() -> npt.NDArray[np.float32]:
    """G.711 µ-law byte → linear sample (ITU-T G.711), as float in [-1, 1]."""
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    sign, exponent, mantissa = u & 0x80, (u >> 4) & 0x07, u & 0x0F
    magnitude = ((mantissa << 3) + 0x84) << exponent
    linear = np.where(sign != 0, 0x84 - magnitude, magnitude - 0x84)
    return (linear / 32768.0).astype(np.float32)


def read_ulaw(path: Path) -> npt.NDArray[np.float32]:
    """A µ-law WAV (``wave`` reads PCM only): the bytes of its data chunk, decoded."""
    data = path.read_bytes()
    start = data.index(b"data") + 8
    size = int.from_bytes(data[start - 4 : start], "little")
    return ulaw_table()[np.frombuffer(data[start : start + size], dtype=np.uint8)]


def evaluate(set_dir: Path, cfg: DetectionConfig) -> dict[str, object]:
    labels = json.loads((set_dir / "labels.json").read_text())
    n = 8 * cfg.frame_ms
    per_class: dict[str, dict[str, float]] = {}
    latencies: list[float] = []
    tp = fp = fn = 0
    calm_seconds = 0.0
    calm_false = 0
    for name, label in sorted(labels.items()):
        audio = read_ulaw(set_dir / name)
        det = LoudnessDetector(cfg)
        found: list[tuple[float, float]] = []  # (onset, reported at)
        for i in range(0, audio.size - n + 1, n):
            for d in det.feed(AudioFrame("caller", audio[i : i + n], 8000, i / 8000)):
                found.append((d.onset_s or 0.0, (i + n) / 8000))
        shouts = [tuple(s) for s in label["shouts"]]
        hit = set()
        clip_fp = 0
        for onset, at in found:
            match = next((s for s in shouts if s[0] - 0.5 <= onset <= s[1]), None)
            if match is None:
                clip_fp += 1
            elif match not in hit:
                hit.add(match)
                latencies.append(at - match[0])
        tp += len(hit)
        fn += len(shouts) - len(hit)
        fp += clip_fp
        stats = per_class.setdefault(label["class"], {"clips": 0, "seconds": 0.0, "false": 0, "missed": 0})
        stats["clips"] += 1
        stats["seconds"] += label["seconds"]
        stats["false"] += clip_fp
        stats["missed"] += len(shouts) - len(hit)
        if not shouts:
            calm_seconds += label["seconds"]
            calm_false += clip_fp
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {
        "precision": round(tp / (tp + fp), 3) if tp + fp else None,
        "recall": round(tp / (tp + fn), 3) if tp + fn else None,
        "true": tp,
        "false": fp,
        "missed": fn,
        "latency_p50_s": round(float(np.percentile(lat, 50)), 2),
        "latency_p95_s": round(float(np.percentile(lat, 95)), 2),
        "false_per_hour_without_shouts": round(calm_false / calm_seconds * 3600, 2) if calm_seconds else None,
        "hours_without_shouts": round(calm_seconds / 3600, 3),
        "per_class": per_class,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("set_dir", type=Path)
    ap.add_argument("--frame-ms", type=int, default=DetectionConfig.frame_ms)
    ap.add_argument("--over-db", type=float, default=DetectionConfig.shout_over_baseline_db)
    ap.add_argument("--floor", type=float, default=DetectionConfig.shout_floor_dbfs)
    ap.add_argument("--min-s", type=float, default=DetectionConfig.shout_min_s)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    cfg = replace(
        DetectionConfig(),
        frame_ms=args.frame_ms,
        shout_over_baseline_db=args.over_db,
        shout_floor_dbfs=args.floor,
        shout_min_s=args.min_s,
    )
    result = evaluate(args.set_dir, cfg)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(
            f"frame {args.frame_ms} ms, +{args.over_db} dB over baseline, floor {args.floor} dBFS, "
            f"min {args.min_s} s: precision {result['precision']} recall {result['recall']} "
            f"(true {result['true']}, false {result['false']}, missed {result['missed']}); latency p50 "
            f"{result['latency_p50_s']} s p95 {result['latency_p95_s']} s; false/hour without shouts "
            f"{result['false_per_hour_without_shouts']} over {result['hours_without_shouts']} h"
        )
        for kind, stats in sorted(result["per_class"].items()):  # type: ignore[attr-defined]
            print(f"  {kind:11} clips {stats['clips']:3} false {stats['false']:3} missed {stats['missed']:3}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
