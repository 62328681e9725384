"""Inline SVG of a report page: precision-recall curves, forest plots of values with intervals, image tiles.

No matplotlib: every figure is a few SVG elements written here. Every text that comes from data
(class names, file names) goes through :func:`esc` (``html.escape``, quotes included), and JSON
embedded in a page through :func:`script_json`.
"""

from __future__ import annotations

import html
import math
from typing import Optional, Sequence

from featurecache.outputs import json_text

__all__ = ["esc", "forest_svg", "num", "pct", "pr_svg", "script_json", "tile_svg"]

#: Colours of the page's figures (ground-truth boxes, predicted boxes, curves, references).
COLOURS = {"truth": "#00c853", "difficult": "#ffd600", "predicted": "#2979ff", "curve": "#1565c0",
           "reference": "#888", "probe": "#c62828"}


def esc(text) -> str:
    """``html.escape`` of ``str(text)``, quotes included: safe in text and in quoted attributes."""
    return html.escape(str(text), quote=True)


def script_json(obj) -> str:
    """Strict JSON (:func:`featurecache.outputs.json_text`) safe inside ``<script>``: ``<``, ``>``, ``&`` and
    the JavaScript line separators escaped as ``\\uXXXX``."""
    text = json_text(obj, indent=None)
    for ch, code in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                     ("\u2029", "\\u2029")):
        text = text.replace(ch, code)
    return text


def num(value: Optional[float], digits: int = 3) -> str:
    """A number for an attribute or a cell ('' for None or NaN)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.{digits}f}"


def pct(value: Optional[float], digits: int = 1) -> str:
    """A share as a percentage ('–' for None or NaN)."""
    if value is None or not math.isfinite(float(value)):
        return "–"
    return f"{100 * float(value):.{digits}f}"


def pr_svg(precision: Sequence[float], recall: Sequence[float], *, label: str, size: tuple = (240, 170),
           axes: bool = True) -> str:
    """A precision-recall curve (recall across, precision up, both 0-1) with its axes (``axes=False``: a frame
    only, for a table cell); an empty frame without a curve."""
    w, h = size
    left, bottom, top, right = (30, 22, 6, 8) if axes else (1, 1, 1, 1)
    pw, ph = w - left - right, h - top - bottom

    def x(r: float) -> float:
        return left + pw * r

    def y(p: float) -> float:
        return top + ph * (1 - p)

    parts = [f'<svg class="pr" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
             f'aria-label="precision-recall curve of {esc(label)}"><title>precision-recall: {esc(label)}</title>',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#bbb"/>']
    for v in (0.5,):
        parts.append(f'<line x1="{x(v):.1f}" y1="{top}" x2="{x(v):.1f}" y2="{top + ph}" stroke="#eee"/>'
                     f'<line x1="{left}" y1="{y(v):.1f}" x2="{left + pw}" y2="{y(v):.1f}" stroke="#eee"/>')
    for v in (0, 0.5, 1) if axes else ():
        parts.append(f'<text x="{x(v):.1f}" y="{h - 8}" text-anchor="middle">{v:g}</text>'
                     f'<text x="{left - 4}" y="{y(v) + 3:.1f}" text-anchor="end">{v:g}</text>')
    if axes:
        parts.append(f'<text x="{left + pw / 2:.1f}" y="{h - 0.5}" text-anchor="middle">recall</text>')
    if len(precision):
        pts = [(0.0, float(precision[0]))] + list(zip(map(float, recall), map(float, precision)))
        path = " ".join(f"{x(r):.1f},{y(p):.1f}" for r, p in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{COLOURS["curve"]}" stroke-width="1.5"/>')
    elif axes:
        parts.append(f'<text x="{left + pw / 2:.1f}" y="{top + ph / 2:.1f}" text-anchor="middle">no positive</text>')
    parts.append("</svg>")
    return "".join(parts)


def forest_svg(rows: Sequence[tuple], *, references: Sequence[tuple] = (), label: str = "", width: int = 560,
               domain: tuple = (0.0, 1.0), name_width: int = 150) -> str:
    """A forest plot: one row per ``(name, value, low, high)`` (a dot and its interval; names cut to fit
    ``name_width`` pixels), and vertical lines at ``references`` ``(name, value, colour)`` (the mAP, the best
    row, the probe)."""
    name_w, row_h, top, bottom = name_width, 18, 8, 26
    chars = max(4, int(name_w / 6.5))
    pw = width - name_w - 16
    h = top + row_h * len(rows) + bottom
    lo_d, hi_d = domain if domain[1] > domain[0] else (domain[1] - 0.1, domain[1])

    def x(v: float) -> float:
        return name_w + pw * (min(max(v, lo_d), hi_d) - lo_d) / (hi_d - lo_d)

    parts = [f'<svg class="forest" viewBox="0 0 {width} {h}" width="{width}" height="{h}" role="img" '
             f'aria-label="{esc(label)}"><title>{esc(label)}</title>']
    for i in range(5):
        v = lo_d + (hi_d - lo_d) * i / 4
        parts.append(f'<line x1="{x(v):.1f}" y1="{top}" x2="{x(v):.1f}" y2="{h - bottom}" stroke="#eee"/>'
                     f'<text x="{x(v):.1f}" y="{h - bottom + 14}" text-anchor="middle">{100 * v:g}</text>')
    for name, value, colour in references:
        if value is not None and math.isfinite(value):
            parts.append(f'<line x1="{x(value):.1f}" y1="{top}" x2="{x(value):.1f}" y2="{h - bottom}" '
                         f'stroke="{colour}" stroke-dasharray="4 3"><title>{esc(name)} {pct(value)}</title></line>')
    for i, (name, value, low, high) in enumerate(rows):
        cy = top + row_h * i + row_h / 2
        shown = name if len(name) <= chars else name[:chars - 1] + "…"
        parts.append(f'<text x="{name_w - 6}" y="{cy + 4:.1f}" text-anchor="end">{esc(shown)}</text>')
        if low is not None and math.isfinite(low) and math.isfinite(high):
            parts.append(f'<line x1="{x(low):.1f}" y1="{cy:.1f}" x2="{x(high):.1f}" y2="{cy:.1f}" stroke="#555"/>')
        if value is not None and math.isfinite(value):
            parts.append(f'<circle cx="{x(value):.1f}" cy="{cy:.1f}" r="3.5" fill="{COLOURS["curve"]}">'
                         f'<title>{esc(name)}: {pct(value)} [{pct(low)}, {pct(high)}]</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def tile_svg(size: tuple, *, image_ref: Optional[str], boxes: Sequence[tuple], label: str,
             overlay: Optional[str] = None) -> str:
    """One image drawn at ``size`` (its pixels) in a 100%-wide SVG: the thumbnail (``image_ref``: the id of a
    shared ``<image>``; a grey placeholder without), the map ``overlay`` (SVG, class ``map``), the ground-truth
    ``boxes`` ``(class, x0, y0, x1, y1, difficult, highlighted)``."""
    w, h = size
    parts = [f'<svg viewBox="0 0 {w} {h}" role="img" aria-label="{esc(label)}" preserveAspectRatio="xMidYMid meet">']
    if image_ref:
        parts.append(f'<use href="#{image_ref}"/>')
    else:
        parts.append(f'<rect width="{w}" height="{h}" fill="#ccc"/><text x="{w / 2:.0f}" y="{h / 2:.0f}" '
                     f'text-anchor="middle" font-size="{max(w, h) / 14:.0f}">no image</text>')
    if overlay:
        parts.append(overlay)
    stroke = max(w, h) / 110
    for name, x0, y0, x1, y1, difficult, highlighted in boxes:
        colour = COLOURS["difficult" if difficult else "truth"]
        dash = f' stroke-dasharray="{2 * stroke:.1f}"' if not highlighted else ""
        parts.append(f'<rect class="gt" x="{x0:.1f}" y="{y0:.1f}" width="{x1 - x0:.1f}" height="{y1 - y0:.1f}" '
                     f'fill="none" stroke="{colour}" stroke-width="{stroke * (1.6 if highlighted else 1):.1f}"{dash}>'
                     f'<title>{esc(name)}{" (difficult)" if difficult else ""}</title></rect>')
    parts.append("</svg>")
    return "".join(parts)


def map_svg(ref: str, box: tuple, peak: tuple, image_size: tuple) -> str:
    """A map overlay (class ``map``, shown or hidden by the page's toggle): the coloured cells (``ref``: the id
    of a shared ``<image>`` in image pixels) over the image, the predicted box and the peak."""
    w, h = image_size
    stroke = max(w, h) / 110
    x0, y0, x1, y1 = box
    return (f'<g class="map"><use href="#{ref}" opacity="0.5"/>'
            f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{x1 - x0:.1f}" height="{y1 - y0:.1f}" fill="none" '
            f'stroke="{COLOURS["predicted"]}" stroke-width="{1.6 * stroke:.1f}"><title>predicted box</title></rect>'
            f'<circle cx="{peak[1]:.1f}" cy="{peak[2]:.1f}" r="{2.5 * stroke:.1f}" fill="{COLOURS["predicted"]}" '
            f'stroke="#fff"><title>peak {peak[0]:.3f}</title></circle></g>')
