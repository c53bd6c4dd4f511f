"""Inline SVG charts: heatmaps, a line chart with a phase timeline, horizontal bars.

Plain strings, no dependency and no script: the page renders offline in any browser,
in MLflow's artifact viewer and in the KFP UI. Colours are fixed hex values.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

NEG = (198, 40, 40)  # red
POS = (21, 101, 192)  # blue
WHITE = (255, 255, 255)
SEQ = (46, 125, 50)  # green for sequential scales
BAND_COLOURS = {"warmup": "#fff4e0", "dynamic": "#e8f1fb", "frozen": "#eceff3", "phase2": "#eef7ee",
                "measure only": "#e8f1fb"}
SERIES = ["#1565c0", "#c62828", "#2e7d32", "#6a1b9a", "#ef6c00", "#00838f", "#5d4037", "#ad1457", "#455a64",
          "#827717"]


def _mix(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> str:
    t = max(0.0, min(1.0, t))
    r, g, bl = (round(x + (y - x) * t) for x, y in zip(a, b))
    return f"#{r:02x}{g:02x}{bl:02x}"


def diverging(v: float | None, vmax: float) -> str:
    if v is None:
        return "#f0f0f0"
    return _mix(WHITE, POS if v >= 0 else NEG, abs(v) / vmax if vmax > 0 else 0.0)


def sequential(v: float | None, vmax: float) -> str:
    if v is None:
        return "#f0f0f0"
    return _mix(WHITE, SEQ, v / vmax if vmax > 0 else 0.0)


def short(txt: str) -> str:
    """Drop the leading zero of a formatted number (``0.25`` -> ``.25``) to fit a cell."""
    if txt.startswith("0.") and len(txt) > 3:
        return txt[1:]
    if txt.startswith("-0.") and len(txt) > 4:
        return "-" + txt[2:]
    return txt


def _ink(fill: str) -> str:
    r, g, b = (int(fill[i:i + 2], 16) for i in (1, 3, 5))
    return "#ffffff" if 0.299 * r + 0.587 * g + 0.114 * b < 140 else "#1d2430"


def heatmap(
    matrix: Sequence[Sequence[float | None]],
    labels: Sequence[str],
    *,
    title: str,
    scale: str = "diverging",
    vmax: float | None = None,
    vmin: float = 0.0,
    groups: Sequence[tuple[str, int, int]] = (),
    marked: set[tuple[int, int]] | None = None,
    fmt: str = "{:.2f}",
    cell: int = 26,
    show_labels: bool = True,
    colour_by: Sequence[Sequence[float | None]] | None = None,
    legend_ends: tuple[str, str] | None = None,
) -> str:
    """A labelled matrix heatmap with values in the cells.

    ``groups``: (name, start, end) index ranges (end exclusive) drawn as boxes and
    bracketed on the left; ``marked`` cells get a dark outline (blocked pairs);
    ``colour_by`` colours the cells by another matrix than the one whose values they show.
    """
    n = len(labels)
    left = 128 if show_labels else 8
    top = 112
    width = left + n * cell + 16 + (max((len(t) for t in labels), default=0) * 3 if labels else 0)
    height = top + n * cell + 40
    shade = colour_by if colour_by is not None else matrix
    vals = [abs(v) for row in shade for v in row if v is not None]
    vm = vmax if vmax is not None else (max(vals) if vals else 1.0) or 1.0

    def colour(v: float | None, vm_: float) -> str:
        if scale == "diverging":
            return diverging(v, vm_)
        return sequential(None if v is None else max(v - vmin, 0.0), vm_ - vmin)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{escape(title)}" '
           f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" class="chart">',
           f'<text x="{left}" y="14" class="t">{escape(title)}</text>']
    for j, lab in enumerate(labels):  # column labels, rotated
        x = left + j * cell + cell / 2 + 4
        out.append(f'<text x="{x:.1f}" y="{top - 6}" class="l" transform="rotate(-60 {x:.1f} {top - 6})">'
                   f"{escape(lab)}</text>")
    for i, lab in enumerate(labels):
        y = top + i * cell + cell / 2 + 4
        if show_labels:
            out.append(f'<text x="{left - 6}" y="{y:.1f}" class="l" text-anchor="end">{escape(lab)}</text>')
        for j in range(n):
            v = matrix[i][j]
            x0, y0 = left + j * cell, top + i * cell
            fill = colour(shade[i][j], vm)
            tip = f"{labels[i]} / {labels[j]}: {'n/a' if v is None else fmt.format(v)}"
            out.append(f'<rect x="{x0}" y="{y0}" width="{cell}" height="{cell}" fill="{fill}" stroke="#ffffff">'
                       f"<title>{escape(tip)}</title></rect>")
            if v is not None:
                txt = short(fmt.format(v))
                out.append(f'<text x="{x0 + cell / 2:.1f}" y="{y0 + cell / 2 + 3.5:.1f}" class="v" '
                           f'text-anchor="middle" fill="{_ink(fill)}">{escape(txt)}</text>')
    for name, s, e in groups:
        out.append(f'<rect x="{left + s * cell}" y="{top + s * cell}" width="{(e - s) * cell}" '
                   f'height="{(e - s) * cell}" fill="none" stroke="#1d2430" stroke-width="1.6">'
                   f"<title>{escape(name)}</title></rect>")
    for i, j in sorted(marked or ()):
        out.append(f'<rect x="{left + j * cell + 1.5}" y="{top + i * cell + 1.5}" width="{cell - 3}" '
                   f'height="{cell - 3}" fill="none" stroke="#000000" stroke-width="2.2" stroke-dasharray="3 2"/>')
    out.append(_legend(left, top + n * cell + 12, min(n * cell, 220), vm, scale, fmt, legend_ends, vmin))
    out.append("</svg>")
    return "".join(out)


def _legend(x: float, y: float, w: float, vm: float, scale: str, fmt: str,
            ends: tuple[str, str] | None = None, vmin: float = 0.0) -> str:
    steps = 24
    parts = []
    lo = -vm if scale == "diverging" else vmin
    for k in range(steps):
        v = lo + (vm - lo) * (k + 0.5) / steps
        fill = diverging(v, vm) if scale == "diverging" else sequential(v - vmin, vm - vmin)
        parts.append(f'<rect x="{x + k * w / steps:.1f}" y="{y}" width="{w / steps + 0.5:.1f}" height="8" '
                     f'fill="{fill}"/>')
    lo_txt, hi_txt = ends if ends else (fmt.format(lo), fmt.format(vm))
    parts.append(f'<text x="{x}" y="{y + 20}" class="l">{escape(lo_txt)}</text>')
    parts.append(f'<text x="{x + w}" y="{y + 20}" class="l" text-anchor="end">{escape(hi_txt)}</text>')
    return "".join(parts)


def line_chart(
    x: Sequence[float],
    series: Sequence[dict[str, Any]],
    *,
    title: str,
    bands: Sequence[dict[str, Any]] = (),
    events: Sequence[dict[str, Any]] = (),
    hline: tuple[float, str] | None = None,
    x_max: float | None = None,
    y_label: str = "",
    width: int = 900,
    height: int = 300,
) -> str:
    """Lines over an epoch axis, with shaded phase bands, event markers and a threshold line.

    Events at the same x share one marker whose label joins theirs with " + "."""
    left, right, top, bottom = 52, 280, 28, 46
    pw, ph = width - left - right, height - top - bottom
    ys = [v for s in series for v in s["values"] if v is not None]
    if hline:
        ys.append(hline[0])
    y_lo, y_hi = (min(ys), max(ys)) if ys else (-1.0, 1.0)
    pad = max((y_hi - y_lo) * 0.08, 0.02)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    xm = x_max if x_max is not None else (max(x) if x else 1.0)
    xm = xm or 1.0

    def px(v: float) -> float:
        return left + pw * v / xm

    def py(v: float) -> float:
        return top + ph * (1 - (v - y_lo) / (y_hi - y_lo))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{escape(title)}" width="{width}" '
           f'height="{height}" viewBox="0 0 {width} {height}" class="chart">',
           f'<text x="{left}" y="16" class="t">{escape(title)}</text>']
    for b in bands:
        out.append(f'<rect x="{px(b["x0"]):.1f}" y="{top}" width="{px(b["x1"]) - px(b["x0"]):.1f}" height="{ph}" '
                   f'fill="{BAND_COLOURS.get(b["kind"], "#f5f5f5")}"><title>{escape(b["kind"])}</title></rect>')
        out.append(f'<text x="{(px(b["x0"]) + px(b["x1"])) / 2:.1f}" y="{top + ph + 30}" class="l" '
                   f'text-anchor="middle">{escape(b["kind"])}</text>')
    for k in range(5):  # y grid
        v = y_lo + (y_hi - y_lo) * k / 4
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(v):.1f}" y2="{py(v):.1f}" stroke="#e3e6eb"/>')
        out.append(f'<text x="{left - 6}" y="{py(v) + 4:.1f}" class="l" text-anchor="end">{v:.2f}</text>')
    step = max(1, round(xm / 12))
    for e in range(0, int(xm) + 1, step):  # x ticks (epoch boundaries)
        out.append(f'<text x="{px(e):.1f}" y="{top + ph + 14}" class="l" text-anchor="middle">{e}</text>')
    out.append(f'<text x="{left + pw}" y="{height - 2}" class="l" text-anchor="end">epochs completed '
               f"(Phase 1, then Phase 2)</text>")
    if y_label:
        out.append(f'<text x="12" y="{top + ph / 2}" class="l" transform="rotate(-90 12 {top + ph / 2})" '
                   f'text-anchor="middle">{escape(y_label)}</text>')
    if hline:
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(hline[0]):.1f}" y2="{py(hline[0]):.1f}" '
                   f'stroke="#c62828" stroke-dasharray="5 3"/>')
        out.append(f'<text x="{left + pw - 4}" y="{py(hline[0]) - 4:.1f}" class="l" text-anchor="end" '
                   f'fill="#c62828">{escape(hline[1])}</text>')
    merged: dict[float, list[str]] = {}
    for ev in events:
        merged.setdefault(ev["x"], []).append(ev["label"])
    events = [{"x": x_, "label": " + ".join(dict.fromkeys(labs))} for x_, labs in merged.items()]
    for k, ev in enumerate(events):
        xx = px(ev["x"])
        out.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{top}" y2="{top + ph}" stroke="#37474f" '
                   f'stroke-dasharray="2 3"><title>{escape(ev["label"])}</title></line>')
        out.append(f'<text x="{xx + 3:.1f}" y="{top + 10 + 11 * (k % 3)}" class="l" fill="#37474f">'
                   f'{escape(ev["label"])}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#9aa3ae"/>')
    for k, s in enumerate(series):
        col = SERIES[k % len(SERIES)]
        pts = [(px(xv), py(v)) for xv, v in zip(x, s["values"]) if v is not None and xv is not None]
        if len(pts) > 1:
            d = " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)
            out.append(f'<polyline points="{d}" fill="none" stroke="{col}" stroke-width="2"/>')
        for a, b in pts:
            out.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.6" fill="{col}"/>')
        ly = top + 8 + 16 * k
        out.append(f'<line x1="{left + pw + 12}" x2="{left + pw + 30}" y1="{ly}" y2="{ly}" stroke="{col}" '
                   f'stroke-width="2.5"/>')
        out.append(f'<text x="{left + pw + 34}" y="{ly + 4}" class="l">{escape(s["label"])}</text>')
    out.append("</svg>")
    return "".join(out)


def hbars(rows: Sequence[tuple[str, float | None]], *, title: str, vmax: float | None = None,
          fmt: str = "{:.1%}", width: int = 520, marker: tuple[float, str] | None = None) -> str:
    """Horizontal bars, one per label (None draws an empty row marked n/a); ``marker``: a
    vertical reference line (value, label), e.g. the transfer cap."""
    left, bar_h, gap, top = 140, 14, 5, 26
    pw = width - left - 70
    vals = [v for _, v in rows if v is not None]
    vm = vmax if vmax is not None else (max(vals) if vals else 1.0) or 1.0
    height = top + len(rows) * (bar_h + gap) + 8
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{escape(title)}" width="{width}" '
           f'height="{height}" viewBox="0 0 {width} {height}" class="chart">',
           f'<text x="{left}" y="16" class="t">{escape(title)}</text>']
    for k, (lab, v) in enumerate(rows):
        y = top + k * (bar_h + gap)
        out.append(f'<text x="{left - 6}" y="{y + bar_h - 3}" class="l" text-anchor="end">{escape(lab)}</text>')
        out.append(f'<rect x="{left}" y="{y}" width="{pw}" height="{bar_h}" fill="#eef0f4"/>')
        if v is not None:
            out.append(f'<rect x="{left}" y="{y}" width="{pw * max(0.0, min(1.0, v / vm)):.1f}" height="{bar_h}" '
                       f'fill="#4a78c2"/>')
        out.append(f'<text x="{left + pw + 6}" y="{y + bar_h - 3}" class="l">'
                   f'{"n/a" if v is None else escape(fmt.format(v))}</text>')
    if marker is not None and vm > 0:
        mx = left + pw * max(0.0, min(1.0, marker[0] / vm))
        out.append(f'<line x1="{mx:.1f}" x2="{mx:.1f}" y1="{top - 4}" y2="{height - 4}" stroke="#c62828" '
                   f'stroke-dasharray="4 3"><title>{escape(marker[1])}</title></line>')
    out.append("</svg>")
    return "".join(out)
