"""The care report as an SVG bar chart for the monthly meeting: small, dependency-free, printable.

One row per agent: stacked bars of flags, warnings, escalations and detections, the minutes in such calls
at the end, and agents who still wait for a follow-up marked. Every name from outside goes through XML
escaping (``xml.sax.saxutils.escape``), so a person's name cannot inject markup.
"""

from __future__ import annotations

from xml.sax.saxutils import escape, quoteattr

from .report import CareReport

_KINDS = (
    ("flags", "flags (*1)", "#c0392b"),
    ("warnings", "warnings (*2/*3)", "#e67e22"),
    ("escalations", "escalations (*9)", "#2980b9"),
    ("detections", "detections", "#8e44ad"),
)
_ROW = 28
_LABEL = 220
_BAR_MAX = 420
_TOP = 70


def render_svg(report: CareReport, *, title: str = "") -> str:
    """The chart's SVG document (UTF-8 text)."""
    rows = report.agents
    most = max((sum(getattr(r, k) for k, _, _ in _KINDS) for r in rows), default=0) or 1
    unit = _BAR_MAX / most
    width = _LABEL + _BAR_MAX + 320  # room for "12 calls, 123.4 min — follow-up waiting"
    height = _TOP + _ROW * max(len(rows), 1) + 40
    out: list[str] = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="13">',
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="10" y="22" font-size="16" font-weight="bold">'
        f"{escape(title or f'Harassment calls per agent, {report.month}')}</text>",
    ]
    x = 10
    for _, label, colour in _KINDS:
        out.append(f'<rect x="{x}" y="34" width="12" height="12" fill="{colour}"/>')
        out.append(f'<text x="{x + 16}" y="45">{escape(label)}</text>')
        x += 30 + 8 * len(label)
    if not rows:
        out.append(f'<text x="10" y="{_TOP + 18}">no agents</text>')
    for i, r in enumerate(rows):
        y = _TOP + i * _ROW
        name = f"{r.person} ({r.agent})" if r.person else r.agent
        out.append(f'<text x="10" y="{y + 17}">{escape(name)}</text>')
        bx = float(_LABEL)
        for attr, label, colour in _KINDS:
            count = getattr(r, attr)
            if count:
                w = count * unit
                out.append(
                    f'<rect x="{bx:.1f}" y="{y + 4}" width="{w:.1f}" height="{_ROW - 8}" fill="{colour}">'
                    f"<title>{escape(f'{label}: {count}')}</title></rect>"
                )
                bx += w
        status = {"waiting": " — follow-up waiting", "followed up": " — followed up"}.get(r.status, "")
        colour = "#c0392b" if r.status == "waiting" else "#333333"
        out.append(
            f'<text x="{bx + 6:.1f}" y="{y + 17}" fill={quoteattr(colour)}>'
            f"{escape(f'{r.harassment_calls} calls, {r.minutes:.1f} min{status}')}</text>"
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"
