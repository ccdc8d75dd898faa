"""RFC 2833 (RFC 4733) key presses as pcap files for SIPp's ``play_pcap_audio``.

SIPp's shipped ``dtmf_2833_*.pcap`` all carry the same RTP timestamp, so Asterisk takes the second digit
of ``*9`` for a retransmission of the first and drops it. Each digit written here gets its own timestamp
and sequence numbers, like a real phone's.
"""

from __future__ import annotations

import struct
from pathlib import Path

EVENTS = {**{str(d): d for d in range(10)}, "*": 10, "#": 11, "A": 12, "B": 13, "C": 14, "D": 15}


def _ip_checksum(header: bytes) -> int:
    total = sum(struct.unpack("!10H", header))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def dtmf_packets(
    digit: str, *, timestamp: int, seq: int, ssrc: int, pt: int = 101, packets: int = 7
) -> list[bytes]:
    """RTP payloads: ``packets`` updates 20 ms apart, then the end packet sent three times."""
    event = EVENTS[digit]
    out = []
    for i in range(packets + 3):
        end = i >= packets
        duration = 160 * (min(i, packets - 1) + 1)
        marker = 0x80 if i == 0 else 0
        rtp = struct.pack("!BBHII", 0x80, marker | pt, (seq + i) & 0xFFFF, timestamp & 0xFFFFFFFF, ssrc)
        payload = struct.pack("!BBH", event, (0x80 if end else 0) | 10, duration)
        out.append(rtp + payload)
    return out


def write_pcap(path: Path, payloads: list[bytes], *, interval_s: float = 0.02) -> None:
    """Ethernet/IPv4/UDP frames; SIPp replaces addresses and ports and keeps the timing."""
    with path.open("wb") as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        t = 0.0
        for i, payload in enumerate(payloads):
            if i > 0 and i < len(payloads) - 2:
                t += interval_s
            udp = struct.pack("!HHHH", 40000, 10000, 8 + len(payload), 0) + payload
            ip = struct.pack(
                "!BBHHHBBH4s4s",
                0x45,
                0,
                20 + len(udp),
                i,
                0,
                64,
                17,
                0,
                bytes([10, 0, 0, 1]),
                bytes([10, 0, 0, 2]),
            )
            ip = ip[:10] + struct.pack("!H", _ip_checksum(ip)) + ip[12:]
            frame = b"\x00\x00\x00\x00\x00\x02" + b"\x00\x00\x00\x00\x00\x01" + b"\x08\x00" + ip + udp
            sec = int(t)
            fh.write(struct.pack("<IIII", sec, int((t - sec) * 1e6), len(frame), len(frame)))
            fh.write(frame)


def write_digit(path: Path, digit: str, *, index: int, ssrc: int = 0x4B415355) -> Path:
    """The ``index``-th key press of a phone: timestamps and sequence numbers never repeat."""
    write_pcap(path, dtmf_packets(digit, timestamp=80000 + index * 8000, seq=1000 + index * 20, ssrc=ssrc))
    return path
