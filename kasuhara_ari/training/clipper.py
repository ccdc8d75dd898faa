"""Cutting a clip out of a recording with sox, and shifting the caller's voice.

sox runs as a subprocess with an argument list (never a shell) on files this process named itself; the
times are numbers checked here. Positions are given in samples, so a clip is exactly as long as asked
(to the sample). Anonymisation is sox's ``pitch`` on the caller's channel only: it moves pitch and
formants together by resampling (tempo kept), which is what makes a voice hard to recognise; the agent's
channel is copied untouched. It needs a stereo recording (``recording.mode = "stereo"``): in a mixed one
the caller's and the agent's voices cannot be told apart.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import wave
from dataclasses import dataclass
from pathlib import Path

#: How long one sox run may take (a clip of a long call on a busy box still takes seconds).
SOX_TIMEOUT_S = 120.0
_TIME_RE = re.compile(r"^(?:(?:(\d{1,2}):)?(\d{1,3}):)?(\d{1,5}(?:\.\d{1,3})?)$")


class ClipError(Exception):
    """sox is missing or failed; the message says which."""


@dataclass(frozen=True)
class WavShape:
    channels: int
    rate: int
    frames: int

    @property
    def duration_s(self) -> float:
        return self.frames / self.rate if self.rate else 0.0


def parse_offset(text: str) -> float:
    """``SS``, ``MM:SS`` or ``HH:MM:SS`` (seconds may have up to 3 decimals) as seconds; ValueError
    saying what is wrong otherwise."""
    m = _TIME_RE.match(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a time like 00:45, 02:10.5 or 01:02:03")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in m.groups())
    if m.group(2) is not None and m.group(1) is not None and minutes >= 60:
        raise ValueError(f"{text!r}: minutes must be below 60")
    if m.group(2) is not None and seconds >= 60:
        raise ValueError(f"{text!r}: seconds must be below 60")
    return hours * 3600 + minutes * 60 + seconds


def shape_of(path: Path) -> WavShape:
    """Channels, rate and frames of a PCM WAV (ValueError if it is not one)."""
    try:
        with wave.open(str(path), "rb") as w:
            return WavShape(w.getnchannels(), w.getframerate(), w.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"{path.name}: not a PCM WAV ({exc})") from exc


def sox_path() -> str:
    found = shutil.which("sox")
    if found is None:
        raise ClipError("sox is not installed (Debian package sox): training clips need it")
    return found


async def _sox(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sox_path(),
        "--no-glob",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), SOX_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise ClipError(f"sox took more than {SOX_TIMEOUT_S:.0f} s") from None
    if proc.returncode != 0:
        raise ClipError(f"sox failed ({proc.returncode}): {err.decode(errors='replace')[-500:]}")


async def cut(
    source: Path, out: Path, start_s: float, end_s: float, *, pitch_cents: int | None = None
) -> WavShape:
    """Write ``source[start_s:end_s]`` to ``out`` as 16-bit PCM; with ``pitch_cents`` the first channel
    (the caller's) is pitch-shifted and the second (the agent's) kept as it is. Returns the clip's shape."""
    shape = shape_of(source)
    first, last = round(start_s * shape.rate), round(end_s * shape.rate)
    if not 0 <= first < last <= shape.frames:
        raise ValueError(
            f"the range {start_s:.3f}-{end_s:.3f} s is not inside the recording (0-{shape.duration_s:.3f} s)"
        )
    frames = last - first
    trim = ["trim", f"{first}s", f"{frames}s"]
    common = ["--comment", "", "-b", "16", "-e", "signed-integer"]
    if pitch_cents is None:
        await _sox(str(source), *common, str(out), *trim)
    else:
        if shape.channels != 2:
            raise ValueError('anonymising needs a stereo recording (recording.mode = "stereo")')
        caller, agent = out.with_name(out.name + ".caller.wav"), out.with_name(out.name + ".agent.wav")
        try:
            # pitch resamples (so `rate` brings it back before counting samples) and keeps the tempo but
            # may move the length by a few ms: padded and cut to the exact frame count.
            shift = ["pitch", str(pitch_cents), "rate", str(shape.rate)]
            exact = ["pad", "0", f"{frames}s", "trim", "0", f"{frames}s"]
            await _sox(str(source), *common, str(caller), *trim, "remix", "1", *shift, *exact)
            await _sox(str(source), *common, str(agent), *trim, "remix", "2")
            await _sox("-M", str(caller), str(agent), *common, str(out))
        finally:
            caller.unlink(missing_ok=True)
            agent.unlink(missing_ok=True)
    got = shape_of(out)
    if got.frames != frames:
        raise ClipError(f"sox wrote {got.frames} frames, {frames} were asked for")
    return got
