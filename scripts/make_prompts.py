#!/usr/bin/env python3
"""Generate kasuhara's voice prompts from ``asterisk_conf/sounds/prompts.toml``.

Japanese is spoken by pyopenjtalk-plus (bundled dictionary and HTS voice, works offline), English by
espeak-ng; sox trims, normalises and resamples everything to what Asterisk's format_wav plays natively
(8 kHz, mono, 16-bit signed PCM).  Output: ``asterisk_conf/sounds/<lang>/kasuhara/<name>.wav``.

``manifest.json`` records, per file, a hash of the text and the settings that produced it and the sha256
of the file written.  TTS output is not bit-identical across versions, so ``--check`` compares hashes of
the *inputs*, not the audio: it needs only the standard library and fails when a text changed without a
regeneration, a file is missing, or a file was changed by hand.

    .venv/bin/python scripts/make_prompts.py            # (re)generate what changed
    .venv/bin/python scripts/make_prompts.py --check    # exit 1 if the shipped files are stale
"""

from __future__ import annotations

import argparse
import array
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import tomllib
import wave
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SOUNDS = ROOT / "asterisk_conf" / "sounds"
TEXTS = SOUNDS / "prompts.toml"
MANIFEST = SOUNDS / "manifest.json"
LANGS = ("ja", "en")
SUBDIR = "kasuhara"
# Bump when the pipeline changes in a way that changes the audio: every prompt is then stale.
GENERATOR = "kasuhara-prompts/1"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
# Below this peak a "prompt" is effectively silence: the synthesis went wrong.
MIN_PEAK_DBFS = -20.0


class PromptsError(Exception):
    """The texts file or the manifest is unusable; the message says which key or file."""


class SynthesisError(PromptsError):
    """A TTS engine or sox failed, or produced unusable audio."""


@dataclasses.dataclass(frozen=True)
class Settings:
    rate: int = 8000
    pad_ms: int = 150
    peak_dbfs: float = -3.0
    ja_speed: float = 1.0
    en_voice: str = "en-us"
    en_wpm: int = 150


@dataclasses.dataclass(frozen=True)
class Tone:
    hz: int
    beeps: int
    beep_ms: int
    gap_ms: int
    #: Silence before and after, instead of ``settings.pad_ms``: a confirmation tone must start at once.
    pad_ms: int | None = None


@dataclasses.dataclass(frozen=True)
class Prompt:
    name: str
    lang: str
    source: str | Tone

    @property
    def relpath(self) -> str:
        return f"{self.lang}/{SUBDIR}/{self.name}.wav"

    def key(self, settings: Settings) -> str:
        """Hash of everything that decides this file's audio (but not the TTS engine's version)."""
        used = ["rate", "pad_ms", "peak_dbfs"]
        if isinstance(self.source, Tone):
            # An unset pad_ms stays out of the hash, so tones that do not use it keep their key.
            tone = {k: v for k, v in dataclasses.asdict(self.source).items() if v is not None}
            source: Any = {"tone": tone}
        else:
            source = {"text": self.source}
            used += ["ja_speed"] if self.lang == "ja" else ["en_voice", "en_wpm"]
        relevant = {k: getattr(settings, k) for k in used}
        blob = json.dumps(
            {
                "generator": GENERATOR,
                "name": self.name,
                "lang": self.lang,
                "source": source,
                "settings": relevant,
            },
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(blob.encode()).hexdigest()


# ---------------------------------------------------------------- texts


def _typed(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    # bool is an int in Python; a TOML `true` is never a valid number here.
    if isinstance(value, bool) or not isinstance(value, kind):
        raise PromptsError(f"{where}: expected {kind}, got {value!r}")
    return value


def load_texts(path: Path = TEXTS) -> tuple[Settings, list[Prompt]]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PromptsError(f"{path}: {exc}") from exc

    raw_settings = data.pop("settings", {})
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    values: dict[str, Any] = {}
    for key, value in _typed(raw_settings, dict, "settings").items():
        if key not in fields:
            raise PromptsError(f"settings.{key}: unknown key (known: {', '.join(fields)})")
        default = fields[key].default
        kind: type | tuple[type, ...] = (int, float) if isinstance(default, float) else type(default)
        values[key] = _typed(value, kind, f"settings.{key}")
    settings = Settings(**values)
    if settings.rate not in (8000, 16000):
        raise PromptsError("settings.rate: Asterisk's format_wav plays 8000 or 16000 Hz only")
    if not 0 <= settings.pad_ms <= 2000:
        raise PromptsError("settings.pad_ms: must be 0..2000")
    if not -20.0 <= settings.peak_dbfs <= 0.0:
        raise PromptsError("settings.peak_dbfs: must be -20..0")
    if not re.fullmatch(r"[A-Za-z0-9+_-]{1,40}", settings.en_voice):
        raise PromptsError("settings.en_voice: not an espeak-ng voice name")

    prompts: list[Prompt] = []
    for name, entry in data.items():
        if not NAME_RE.match(name):
            raise PromptsError(f"{name}: prompt names are lower-case letters, digits and '-'")
        _typed(entry, dict, name)
        unknown = set(entry) - {"ja", "en", "tone"}
        if unknown:
            raise PromptsError(f"{name}.{sorted(unknown)[0]}: unknown key (use ja, en or tone)")
        if "tone" in entry:
            if set(entry) != {"tone"}:
                raise PromptsError(f"{name}: a tone prompt has no ja/en text")
            spec = _typed(entry["tone"], dict, f"{name}.tone")
            tone_fields = {f.name for f in dataclasses.fields(Tone) if f.name != "pad_ms"}
            if not tone_fields <= set(spec) <= tone_fields | {"pad_ms"}:
                raise PromptsError(
                    f"{name}.tone: needs exactly {', '.join(sorted(tone_fields))} (and optionally pad_ms)"
                )
            tone = Tone(**{k: _typed(v, int, f"{name}.tone.{k}") for k, v in spec.items()})
            if not (
                50 <= tone.hz <= 3400
                and 1 <= tone.beeps <= 10
                and 20 <= tone.beep_ms <= 2000
                and 0 <= tone.gap_ms <= 2000
                and (tone.pad_ms is None or 0 <= tone.pad_ms <= 2000)
            ):
                raise PromptsError(f"{name}.tone: value out of range")
            prompts.extend(Prompt(name, lang, tone) for lang in LANGS)
            continue
        for lang in LANGS:
            if lang not in entry:
                raise PromptsError(f"{name}.{lang}: missing (every prompt ships in {', '.join(LANGS)})")
            text = _typed(entry[lang], str, f"{name}.{lang}").strip()
            if not text:
                raise PromptsError(f"{name}.{lang}: empty text")
            prompts.append(Prompt(name, lang, text))
    if not prompts:
        raise PromptsError(f"{path}: no prompts")
    return settings, prompts


# ---------------------------------------------------------------- manifest and file checks


def load_manifest(path: Path = MANIFEST) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PromptsError(f"{path}: unreadable manifest ({exc}); delete it and regenerate") from exc
    if not isinstance(files, dict):
        raise PromptsError(f"{path}: 'files' is not an object")
    return files


def write_manifest(files: dict[str, dict[str, Any]], path: Path = MANIFEST) -> None:
    body = {
        "about": "Written by scripts/make_prompts.py; key = hash of text + settings, see its docstring.",
        "generator": GENERATOR,
        "files": dict(sorted(files.items())),
    }
    _atomic_write_text(path, json.dumps(body, indent=2, ensure_ascii=False) + "\n")


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the file is committed and read by others
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclasses.dataclass(frozen=True)
class WavInfo:
    format_tag: int
    channels: int
    rate: int
    bits: int
    frames: int
    peak_dbfs: float
    rms_dbfs: float
    clipped: int

    @property
    def duration(self) -> float:
        return self.frames / self.rate if self.rate else 0.0


def inspect_wav(path: Path) -> WavInfo:
    """Read the RIFF header the way Asterisk's format_wav does, and level statistics of the samples."""
    raw = path.read_bytes()
    if raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        raise PromptsError(f"{path}: not a RIFF/WAVE file")
    pos, fmt = 12, b""
    while pos + 8 <= len(raw):
        cid, size = raw[pos : pos + 4], int.from_bytes(raw[pos + 4 : pos + 8], "little")
        if cid == b"fmt ":
            fmt = raw[pos + 8 : pos + 8 + size]
            break
        pos += 8 + size + (size & 1)
    if len(fmt) < 16:
        raise PromptsError(f"{path}: no fmt chunk")
    format_tag = int.from_bytes(fmt[0:2], "little")
    channels = int.from_bytes(fmt[2:4], "little")
    rate = int.from_bytes(fmt[4:8], "little")
    bits = int.from_bytes(fmt[14:16], "little")
    samples = array.array("h")
    if format_tag == 1 and bits == 16:
        with wave.open(str(path), "rb") as wav:
            samples.frombytes(wav.readframes(wav.getnframes()))
        if sys.byteorder == "big":
            samples.byteswap()
    frames = len(samples) // max(channels, 1)
    peak = max((abs(s) for s in samples), default=0)
    rms = math.sqrt(sum(s * s for s in samples) / len(samples)) if samples else 0.0

    def dbfs(v: float) -> float:
        return 20 * math.log10(v / 32768) if v > 0 else -math.inf

    clipped = sum(1 for s in samples if s in (32767, -32768))
    return WavInfo(format_tag, channels, rate, bits, frames, dbfs(peak), dbfs(rms), clipped)


def format_problem(info: WavInfo, settings: Settings) -> str | None:
    if (info.format_tag, info.channels, info.rate, info.bits) != (1, 1, settings.rate, 16):
        return (
            f"format tag={info.format_tag} channels={info.channels} rate={info.rate} bits={info.bits}, "
            f"want PCM mono {settings.rate} Hz 16-bit"
        )
    if info.peak_dbfs < MIN_PEAK_DBFS:
        return f"nearly silent (peak {info.peak_dbfs:.1f} dBFS)"
    if info.clipped > 0:
        return f"{info.clipped} clipped samples"
    return None


# ---------------------------------------------------------------- synthesis


def _run(cmd: list[str], *, stdin: str | None = None) -> str:
    try:
        done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False, timeout=120)
    except FileNotFoundError as exc:
        raise SynthesisError(f"{cmd[0]} is not installed (Debian: apt-get install {cmd[0]})") from exc
    if done.returncode != 0:
        raise SynthesisError(f"{' '.join(cmd[:2])} ... failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _sox_out(settings: Settings, out: Path) -> list[str]:
    return ["-t", "wav", "-e", "signed-integer", "-b", "16", "-c", "1", "-r", str(settings.rate), str(out)]


def _finish_speech(raw: Path, out: Path, settings: Settings) -> None:
    """Trim silence at both ends, resample, normalise, re-pad.  -R/-D: repeatable, no dither noise."""
    pad = f"{settings.pad_ms / 1000:.3f}"
    trim = "silence 1 0.02 0.3%"
    effects = (
        f"{trim} reverse {trim} reverse rate -v {settings.rate} gain -n {settings.peak_dbfs} pad {pad} {pad}"
    )
    _run(["sox", "-R", "-D", str(raw), *_sox_out(settings, out), *effects.split()])


def _japanese_raw(text: str, settings: Settings, raw: Path) -> str:
    with contextlib.redirect_stdout(io.StringIO()):  # it prints an ONNX notice on import
        import numpy as np
        import pyopenjtalk
    from importlib.metadata import version

    # predict_nani needs onnxruntime, which the [prompts] extra does not install.
    audio, sr = pyopenjtalk.tts(text, speed=settings.ja_speed, predict_nani=False)
    pcm = np.clip(np.round(audio), -32768, 32767).astype("<i2")
    with wave.open(str(raw), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sr)
        wav.writeframes(pcm.tobytes())
    return f"pyopenjtalk-plus {version('pyopenjtalk-plus')} (mei_normal)"


def _english_raw(text: str, settings: Settings, raw: Path) -> str:
    # Text on stdin, never argv: a text starting with '-' is then not an option.
    _run(["espeak-ng", "-v", settings.en_voice, "-s", str(settings.en_wpm), "-w", str(raw)], stdin=text)
    return _run(["espeak-ng", "--version"]).split(" Data at")[0].strip()


def _tone(tone: Tone, out: Path, settings: Settings) -> str:
    beep, gap = tone.beep_ms / 1000, tone.gap_ms / 1000
    fade = min(0.01, beep / 4)
    pad = f"{(settings.pad_ms if tone.pad_ms is None else tone.pad_ms) / 1000:.3f}"
    # One beep plus a gap, repeated, minus the last gap; then the usual level and padding.
    effects = (
        f"synth {beep:.3f} sine {tone.hz} fade h {fade:.3f} {beep:.3f} {fade:.3f} pad 0 {gap:.3f} "
        f"repeat {tone.beeps - 1} trim 0 -{gap:.3f} gain -n {settings.peak_dbfs} pad {pad} {pad}"
    )
    _run(["sox", "-R", "-D", "-n", *_sox_out(settings, out), *effects.split()])
    return _run(["sox", "--version"]).strip().removeprefix("sox:").strip()


def synthesise(prompt: Prompt, settings: Settings, out: Path) -> str:
    """Write ``out`` atomically; return a description of the engine used."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kasuhara-prompt-") as work:
        tmp = Path(work) / "out.wav"
        if isinstance(prompt.source, Tone):
            engine = _tone(prompt.source, tmp, settings)
        else:
            raw = Path(work) / "raw.wav"
            if prompt.lang == "ja":
                engine = _japanese_raw(prompt.source, settings, raw)
            else:
                engine = _english_raw(prompt.source, settings, raw)
            _finish_speech(raw, tmp, settings)
        problem = format_problem(inspect_wav(tmp), settings)
        if problem:
            raise SynthesisError(f"{prompt.relpath}: generated audio is unusable: {problem}")
        # Same filesystem for the final rename, so Asterisk never plays a half-written file.
        staged = out.with_name(f".{out.name}.tmp")
        staged.write_bytes(tmp.read_bytes())
        os.replace(staged, out)
    return engine


# ---------------------------------------------------------------- commands


def _entry(prompt: Prompt, settings: Settings, path: Path, engine: str) -> dict[str, Any]:
    info = inspect_wav(path)
    return {
        "key": prompt.key(settings),
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "duration_s": round(info.duration, 3),
        "engine": engine,
        "text": prompt.source if isinstance(prompt.source, str) else None,
    }


def check(settings: Settings, prompts: Iterable[Prompt], manifest: dict[str, dict[str, Any]]) -> list[str]:
    """Problems that make the shipped files disagree with the texts; empty when all is in order."""
    problems: list[str] = []
    wanted = set()
    for prompt in prompts:
        wanted.add(prompt.relpath)
        path = SOUNDS / prompt.relpath
        entry = manifest.get(prompt.relpath)
        if not path.exists():
            problems.append(f"{prompt.relpath}: missing")
        elif entry is None or entry.get("key") != prompt.key(settings):
            problems.append(f"{prompt.relpath}: text or settings changed since it was generated")
        elif entry.get("sha256") != sha256_file(path):
            problems.append(f"{prompt.relpath}: file changed by hand (not what the manifest recorded)")
        else:
            problem = format_problem(inspect_wav(path), settings)
            if problem:
                problems.append(f"{prompt.relpath}: {problem}")
    problems.extend(
        f"{rel}: in the manifest but no longer in prompts.toml" for rel in manifest if rel not in wanted
    )
    return problems


def generate(
    settings: Settings, prompts: list[Prompt], manifest: dict[str, dict[str, Any]], *, force: bool
) -> int:
    files = dict(manifest)
    # Never overwrite a recording an operator put in place of a generated file, unless told to.
    replaced = [
        p.relpath
        for p in prompts
        if p.relpath in files
        and (SOUNDS / p.relpath).exists()
        and files[p.relpath].get("sha256") != sha256_file(SOUNDS / p.relpath)
    ]
    if replaced and not force:
        for rel in replaced:
            print(f"refusing to overwrite {rel}: changed by hand (--force regenerates it)", file=sys.stderr)
        return 1
    made = 0
    for prompt in prompts:
        path = SOUNDS / prompt.relpath
        entry = files.get(prompt.relpath)
        current = (
            path.exists()
            and entry is not None
            and entry.get("key") == prompt.key(settings)
            and entry.get("sha256") == sha256_file(path)
        )
        if current and not force:
            continue
        engine = synthesise(prompt, settings, path)
        files[prompt.relpath] = _entry(prompt, settings, path, engine)
        write_manifest(files)  # after every file: an interrupted run loses nothing already done
        made += 1
        print(
            f"wrote {prompt.relpath} {files[prompt.relpath]['duration_s']:.2f}s "
            f"{files[prompt.relpath]['bytes'] / 1024:.1f} KiB"
        )
    wanted = {p.relpath for p in prompts}
    for rel in [r for r in files if r not in wanted]:
        path = SOUNDS / rel
        if path.exists() and sha256_file(path) == files[rel].get("sha256"):
            path.unlink()
            print(f"removed {rel} (no longer in prompts.toml)")
        del files[rel]
    write_manifest(files)
    print(f"{made} generated, {len(prompts) - made} already up to date")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--check", action="store_true", help="only verify the shipped files match prompts.toml; exit 1 if not"
    )
    parser.add_argument("--force", action="store_true", help="regenerate every file, even hand-replaced ones")
    args = parser.parse_args(argv)
    try:
        settings, prompts = load_texts()
        manifest = load_manifest()
        if args.check:
            problems = check(settings, prompts, manifest)
            for problem in problems:
                print(problem, file=sys.stderr)
            if problems:
                print("prompts are stale: run .venv/bin/python scripts/make_prompts.py", file=sys.stderr)
                return 1
            print(f"{len(prompts)} prompt files match prompts.toml")
            return 0
        return generate(settings, prompts, manifest, force=args.force)
    except SynthesisError as exc:
        print(f"make_prompts: {exc}", file=sys.stderr)
        return 1
    except PromptsError as exc:
        print(f"make_prompts: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
