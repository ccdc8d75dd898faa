"""Small audio checks for recordings and RTP captures (pure Python: 10 ms energy envelopes and Goertzel tone
levels, no numpy needed)."""

from __future__ import annotations

import asyncio
import math
import shutil
import signal
import struct
import wave
from dataclasses import dataclass
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


# --- tones, RTP captures -----------------------------------------------------------------------------------


def _ulaw_encode(sample: int) -> int:
    bias, clip = 0x84, 32635
    sign = 0x80 if sample < 0 else 0
    magnitude = min(abs(sample), clip) + bias
    exponent = 7
    for exp in range(7, -1, -1):
        if magnitude & (0x4000 >> (7 - exp)):
            exponent = exp
            break
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def _ulaw_decode(byte: int) -> int:
    byte = ~byte & 0xFF
    sign, exponent, mantissa = byte & 0x80, (byte >> 4) & 0x07, byte & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return -magnitude if sign else magnitude


ULAW_TABLE = [_ulaw_decode(b) for b in range(256)]


def write_tone_wav(path: Path, freq: float, *, seconds: float = 10.0, dbfs: float = -20.0) -> Path:
    """A steady tone as an 8 kHz mono u-law WAV, the format SIPp's ``rtp_stream`` plays (like agent.wav)."""
    amplitude = 32767 * 10 ** (dbfs / 20)
    n = int(seconds * 8000)
    data = bytes(_ulaw_encode(int(amplitude * math.sin(2 * math.pi * freq * i / 8000))) for i in range(n))
    fmt = struct.pack("<HHIIHH", 7, 1, 8000, 8000, 1, 8)  # WAVE_FORMAT_MULAW
    path.write_bytes(
        b"RIFF"
        + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data))
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"data"
        + struct.pack("<I", len(data))
        + data
    )
    return path


def tone_amplitude(samples: list[int] | list[float], rate: int, freq: float) -> float:
    """Amplitude (in sample units) of the ``freq`` component of ``samples`` (Goertzel)."""
    n = len(samples)
    if n == 0:
        return 0.0
    coeff = 2 * math.cos(2 * math.pi * freq / rate)
    s1 = s2 = 0.0
    for x in samples:
        s1, s2 = x + coeff * s1 - s2, s1
    power = s1 * s1 + s2 * s2 - coeff * s1 * s2
    return 2 * math.sqrt(max(power, 0.0)) / n


def tone_levels(
    samples: list[int],
    rate: int,
    freqs: tuple[float, ...],
    *,
    start_s: float = 0.0,
    end_s: float | None = None,
) -> dict[float, float]:
    """Median per-second amplitude of each tone between ``start_s`` and ``end_s`` (speech or a short
    burst in one second cannot make a tone look present: a steady tone is in every second)."""
    end = len(samples) if end_s is None else min(len(samples), int(end_s * rate))
    windows = [samples[i : i + rate] for i in range(int(start_s * rate), end - rate + 1, rate)]
    assert windows, f"no whole second between {start_s} s and {end_s} s"
    levels = {}
    for freq in freqs:
        values = sorted(tone_amplitude(w, rate, freq) for w in windows)
        levels[freq] = values[len(values) // 2]
    return levels


def contains_somewhere(
    recording: Path, prompt: Path, *, tones: tuple[float, ...] = (700.0, 1300.0)
) -> tuple[float, float]:
    """(correlation, offset in s) of ``prompt`` anywhere in ``recording`` (tones removed as above)."""
    rec, rate = read_pcm16(recording)
    return contains_at_start(recording, prompt, within_s=len(rec) / rate, tones=tones)


def read_pcap(path: Path) -> list[tuple[float, int, int, bytes]]:
    """(time, source port, destination port, UDP payload) of each UDP/IPv4 packet in a pcap file."""
    data = path.read_bytes()
    if len(data) < 24:
        return []
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    nano = magic in (0xA1B23C4D, 0x4D3CB2A1)
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    link_len = {1: 14, 113: 16, 276: 20, 0: 4}[linktype]
    out = []
    pos = 24
    while pos + 16 <= len(data):
        sec, frac, incl, _ = struct.unpack(endian + "IIII", data[pos : pos + 16])
        frame = data[pos + 16 : pos + 16 + incl]
        pos += 16 + incl
        ip = frame[link_len:]
        if len(ip) < 28 or ip[0] >> 4 != 4 or ip[9] != 17:
            continue
        ihl = (ip[0] & 0x0F) * 4
        sport, dport = struct.unpack("!HH", ip[ihl : ihl + 4])
        out.append((sec + frac / (1e9 if nano else 1e6), sport, dport, ip[ihl + 8 :]))
    return out


@dataclass(frozen=True)
class RtpPacket:
    at: float
    payload_type: int
    marker: bool
    seq: int
    timestamp: int
    payload: bytes


def rtp_to(pcap: Path, port: int) -> list[RtpPacket]:
    """The RTP packets sent to ``port`` (a phone's media port) in arrival order."""
    return _rtp(pcap, port, to=True)


def rtp_from(pcap: Path, port: int) -> list[RtpPacket]:
    """The RTP packets sent from ``port`` (a phone's media port) in the order they were sent."""
    return _rtp(pcap, port, to=False)


def _rtp(pcap: Path, port: int, *, to: bool) -> list[RtpPacket]:
    packets = []
    for at, sport, dport, udp in read_pcap(pcap):
        if (dport if to else sport) != port or len(udp) < 12 or udp[0] >> 6 != 2:
            continue
        csrc = (udp[0] & 0x0F) * 4
        seq, ts = struct.unpack("!HI", udp[2:8])
        packets.append(RtpPacket(at, udp[1] & 0x7F, bool(udp[1] & 0x80), seq, ts, udp[12 + csrc :]))
    return packets


def rtp_audio(packets: list[RtpPacket]) -> list[int]:
    """The G.711 u-law audio of these packets, decoded (payload type 0 only)."""
    return [ULAW_TABLE[b] for p in packets if p.payload_type == 0 for b in p.payload]


def dtmf_events(packets: list[RtpPacket], payload_type: int = 101) -> list[RtpPacket]:
    """RFC 4733 telephone-event packets."""
    return [p for p in packets if p.payload_type == payload_type]


class Capture:
    """``tcpdump`` on the loopback interface into a pcap file, for as long as the ``async with`` lasts."""

    def __init__(self, path: Path, bpf: str = "udp") -> None:
        self.path = path
        self.bpf = bpf
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Capture:
        if shutil.which("tcpdump") is None:
            raise RuntimeError("tcpdump is not installed (apt-get install tcpdump)")
        self.proc = await asyncio.create_subprocess_exec(
            "tcpdump", "-i", "lo", "-n", "-U", "-s", "0", "-w", str(self.path), self.bpf,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stderr is not None
        line = await asyncio.wait_for(self.proc.stderr.readline(), 10)
        if b"listening on" not in line:
            raise RuntimeError(f"tcpdump did not start: {line!r}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None
        await asyncio.sleep(0.3)  # packets already on the wire reach the file
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(self.proc.wait(), 10)


def write_pcm16(path: Path, samples: list[int], rate: int = 8000) -> Path:
    """Decoded audio (e.g. what a phone received) as a WAV file the recording checks can read."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(struct.pack(f"<{len(samples)}h", *(max(-32768, min(32767, s)) for s in samples)))
    return path


def contains_in_pieces(
    recording: Path, prompt: Path, *, piece_s: float = 1.0, tones: tuple[float, ...] = (700.0, 1300.0)
) -> tuple[float, float]:
    """(median score of the prompt's pieces, offset in s of the whole prompt) anywhere in ``recording``.

    Each ``piece_s`` piece of the prompt is looked for on its own, within 0.3 s of where the whole prompt
    matched best: a recording made on a loaded box has short gaps and drifts that lower a whole-prompt
    correlation although every part of the prompt is there."""
    rec, rate = read_pcm16(recording)
    pr, prate = read_pcm16(prompt)
    assert rate == prate == 8000, (rate, prate)
    rec_f: list[int] | list[float] = rec
    pr_f: list[int] | list[float] = pr
    for tone in tones:
        rec_f = notch([int(x) for x in rec_f], rate, tone)
        pr_f = notch([int(x) for x in pr_f], rate, tone)
    rec_env, pr_env = envelope(rec_f, rate), envelope(pr_f, rate)
    _, lag = best_match(rec_env, pr_env, len(rec_env))
    step = int(piece_s * 100)
    scores = []
    for start in range(0, len(pr_env) - step + 1, step):
        piece = pr_env[start : start + step]
        if max(piece) - min(piece) < 1e-6:
            continue
        lo = max(0, lag + start - 30)
        score, _ = best_match(rec_env[lo:], piece, 60)
        scores.append(score)
    scores.sort()
    return (scores[len(scores) // 2] if scores else -1.0), lag / 100


# --- in-band DTMF (Goertzel on the DTMF frequency pairs) --------------------------------------------------

DTMF_ROWS = (697.0, 770.0, 852.0, 941.0)
DTMF_COLS = (1209.0, 1336.0, 1477.0, 1633.0)
DTMF_KEYS = ("123A", "456B", "789C", "*0#D")
#: RFC 4733 event codes 0-15 as keys.
DTMF_EVENTS = "0123456789*#ABCD"
#: Asterisk's in-band DTMF generator plays each tone at 7219 (indications.c: "-8db"): the level a caller
#: would hear if the agent's keys leaked in-band.
ASTERISK_DTMF_AMPLITUDE = 7219.0


def dtmf_tone(
    key: str, seconds: float, *, amplitude: float = ASTERISK_DTMF_AMPLITUDE, rate: int = 8000
) -> list[int]:
    """The two tones of ``key`` (a control: what in-band DTMF would look like)."""
    row = next(i for i, keys in enumerate(DTMF_KEYS) if key in keys)
    low, high = DTMF_ROWS[row], DTMF_COLS[DTMF_KEYS[row].index(key)]
    n = int(seconds * rate)
    return [
        int(amplitude * (math.sin(2 * math.pi * low * i / rate) + math.sin(2 * math.pi * high * i / rate)))
        for i in range(n)
    ]


def dtmf_in_band(samples: list[int] | list[float], rate: int = 8000, *, min_amplitude: float = 1000.0) -> str:
    """The DTMF keys heard in ``samples``: 40 ms Hann-windowed frames (20 ms apart) in which one row tone
    and one column tone each stand over ``min_amplitude`` and at least 3x over the other tones of their
    group (a steady test tone leaking into one bin cannot make a pair), for 2 frames or more in a row."""
    n, hop = rate // 25, rate // 50
    hann = [0.5 - 0.5 * math.cos(2 * math.pi * i / (n - 1)) for i in range(n)]
    frames: list[str] = []
    for start in range(0, len(samples) - n + 1, hop):
        frame = [x * w for x, w in zip(samples[start : start + n], hann, strict=True)]
        key = ""
        rows = sorted(
            ((tone_amplitude(frame, rate, f) * 2, i) for i, f in enumerate(DTMF_ROWS)), reverse=True
        )
        cols = sorted(
            ((tone_amplitude(frame, rate, f) * 2, i) for i, f in enumerate(DTMF_COLS)), reverse=True
        )
        if all(g[0][0] > max(min_amplitude, 3 * g[1][0]) for g in (rows, cols)):
            key = DTMF_KEYS[rows[0][1]][cols[0][1]]
        frames.append(key)
    heard, run, previous = [], 0, ""
    for key in frames:
        run = run + 1 if key == previous else 1
        previous = key
        if key and run == 2:
            heard.append(key)
    return "".join(heard)
