"""The care report as an SVG bar chart for the monthly meeting: small, dependency-free, printable.

One row per agent: stacked bars of flags, warnings, escalations and detections, the minutes in such calls
at the end, and agents who still wait for a follow-up marked. Every name from outside goes through XML
escaping (``xml.sax.saxutils.escape``), so a person's name cannot inject markup. The chart's own words come
in Japanese (the default: the meeting is in Japanese) and English.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from .report import CareReport

_KINDS = (
    ("flags", "#c0392b"),
    ("warnings", "#e67e22"),
    ("escalations", "#2980b9"),
    ("detections", "#8e44ad"),
)


@dataclass(frozen=True)
class ChartWords:
    """The chart's own text in one language (``{month}``, ``{calls}``, ``{minutes}`` are filled in)."""

    title: str
    legend: tuple[str, str, str, str]  # flags, warnings, escalations, detections
    no_agents: str
    row: str
    row_one: str  # the same for exactly one call (English has a singular)
    waiting: str
    followed_up: str


WORDS: dict[str, ChartWords] = {
    "ja": ChartWords(
        title="オペレーター別のカスハラ通話（{month}）",
        legend=("フラグ (*1)", "警告 (*2/*3)", "責任者呼び出し (*9)", "自動検知"),
        no_agents="該当するオペレーターはいません",
        row="{calls} 件・{minutes} 分",
        row_one="{calls} 件・{minutes} 分",
        waiting="・フォローアップ待ち",
        followed_up="・フォローアップ済み",
    ),
    "en": ChartWords(
        title="Harassment calls per agent, {month}",
        legend=("flags (*1)", "warnings (*2/*3)", "escalations (*9)", "detections"),
        no_agents="no agents",
        row="{calls} calls, {minutes} min",
        row_one="{calls} call, {minutes} min",
        waiting=" — follow-up waiting",
        followed_up=" — followed up",
    ),
}


def text_width(text: str) -> int:
    """Rough width in pixels at font size 13: wide (CJK) characters count twice a Latin letter."""
    return sum(14 if unicodedata.east_asian_width(ch) in "WF" else 8 for ch in text)


_ROW = 28
_LABEL = 220
_BAR_MAX = 420
_TOP = 70


def render_svg(report: CareReport, *, title: str = "", language: str = "ja") -> str:
    """The chart's SVG document (UTF-8 text), its words in ``language`` (``ja`` or ``en``)."""
    words = WORDS[language]
    rows = report.agents
    most = max((sum(getattr(r, k) for k, _ in _KINDS) for r in rows), default=0) or 1
    unit = _BAR_MAX / most
    legend = 10 + sum(30 + text_width(label) for label in words.legend)
    width = max(_LABEL + _BAR_MAX + 320, legend)  # room for "12 calls, 123.4 min — follow-up waiting"
    height = _TOP + _ROW * max(len(rows), 1) + 40
    out: list[str] = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="13">',
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="10" y="22" font-size="16" font-weight="bold">'
        f"{escape(title or words.title.format(month=report.month))}</text>",
    ]
    x = 10
    for (_, colour), label in zip(_KINDS, words.legend, strict=True):
        out.append(f'<rect x="{x}" y="34" width="12" height="12" fill="{colour}"/>')
        out.append(f'<text x="{x + 16}" y="45">{escape(label)}</text>')
        x += 30 + text_width(label)
    if not rows:
        out.append(f'<text x="10" y="{_TOP + 18}">{escape(words.no_agents)}</text>')
    for i, r in enumerate(rows):
        y = _TOP + i * _ROW
        name = f"{r.person} ({r.agent})" if r.person else r.agent
        out.append(f'<text x="10" y="{y + 17}">{escape(name)}</text>')
        bx = float(_LABEL)
        for (attr, colour), label in zip(_KINDS, words.legend, strict=True):
            count = getattr(r, attr)
            if count:
                w = count * unit
                out.append(
                    f'<rect x="{bx:.1f}" y="{y + 4}" width="{w:.1f}" height="{_ROW - 8}" fill="{colour}">'
                    f"<title>{escape(f'{label}: {count}')}</title></rect>"
                )
                bx += w
        status = {"waiting": words.waiting, "followed up": words.followed_up}.get(r.status, "")
        colour = "#c0392b" if r.status == "waiting" else "#333333"
        row = words.row_one if r.harassment_calls == 1 else words.row
        text = row.format(calls=r.harassment_calls, minutes=f"{r.minutes:.1f}") + status
        out.append(f'<text x="{bx + 6:.1f}" y="{y + 17}" fill={quoteattr(colour)}>{escape(text)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
