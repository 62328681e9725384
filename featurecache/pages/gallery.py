"""The predictions page (``predict --report predictions.html``): a gallery of new images, their top classes and maps.

Each image is a tile: its thumbnail (drawn as displayed, as ``predict`` scores it), its top
classes with their scores, its labels, or why it could not be read; with ``--maps``, its top
class's map picture over it and that map's box (blue), which a checkbox hides. Self-contained,
as the report page is (:mod:`featurecache.pages.page`): pictures as ``data:`` URIs, every name
escaped, nothing loaded.
"""

from __future__ import annotations

from featurecache import __version__
from featurecache.pages.static import CSP, STYLE
from featurecache.pages.svg import COLOURS, esc, num, script_json
from featurecache.pages.thumbs import picture_uri, thumbnail_uri

__all__ = ["predictions_html"]


def _picture(size: tuple, image: str, overlay: str, boxes: dict, label: str) -> str:
    """An image tile's SVG: the thumbnail, and the map picture with its boxes as the toggled ``map`` layer."""
    w, h = size
    stroke = max(w, h) / 110
    parts = [f'<svg viewBox="0 0 {w} {h}" role="img" aria-label="{esc(label)}">']
    parts.append(f'<image href="{esc(image)}" width="{w}" height="{h}" preserveAspectRatio="none"/>' if image else
                 f'<rect width="{w}" height="{h}" fill="#ccc"/>')
    if overlay or boxes:
        parts.append('<g class="map">')
        if overlay:
            parts.append(f'<image href="{esc(overlay)}" width="{w}" height="{h}" preserveAspectRatio="none"/>')
        for name, (x0, y0, x1, y1) in boxes.items():
            parts.append(f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{x1 - x0:.1f}" height="{y1 - y0:.1f}" fill="none" '
                         f'stroke="{COLOURS["predicted"]}" stroke-width="{1.6 * stroke:.1f}"><title>{esc(name)}'
                         "</title></rect>")
        parts.append("</g>")
    return "".join(parts) + "</svg>"


def _tile(p, i: int) -> str:
    path, error = p.paths[i], p.errors[i]
    w, h = int(p.width[i]) or 1, int(p.height[i]) or 1
    image = None if error or not (int(p.width[i]) and int(p.height[i])) else thumbnail_uri(path, (w, h),
                                                                                          displayed=True)
    overlay = picture_uri(p.maps[i]) if p.maps and p.maps[i] else None
    top = p.top_classes(i)
    boxes = {c: b for c, b in (p.boxes[i] if p.boxes and p.boxes[i] else {}).items() if top and c == top[0][0]}
    rows = "".join(f"<tr><td>{esc(c)}</td><td>{s:.3g}</td></tr>" for c, s in top)
    body = (f'<p class="note">{esc(error)}</p>' if error else
            f'<table class="top">{rows}</table><p>labels: {esc(", ".join(p.labels(i))) or "none"}</p>')
    score = num(top[0][1], 6) if top else ""
    return (f'<figure class="tile{" err" if error else ""}" data-score="{score}" data-rank="{i}" '
            f'data-error="{int(bool(error))}">{_picture((w, h), image or "", overlay or "", boxes, path)}'
            f"<figcaption>{esc(path)}</figcaption>{body}</figure>")


def predictions_html(p) -> str:
    """The page of a :class:`~featurecache.predict.results.Predictions`."""
    title = f"featurecache predictions: {len(p)} images"
    toggle = ('<p class="maptoggle"><label><input type="checkbox" id="show-maps" checked> show each image\'s top '
              "class's map and its box (blue)</label></p>") if any(p.maps) else ""
    note = f'<p class="note">{esc(p.maps_note)}</p>' if p.maps_note else ""
    tiles = "".join(_tile(p, i) for i in range(len(p)))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body><header><h1>{esc(title)}</h1>"
            f"<p>{esc(p.summary())}</p><p>Scores: {esc(p.meaning)}.</p>{note}</header>{toggle}"
            f'<main><section id="gallery"><div class="gallery">{tiles}</div></section></main>'
            f"<footer><p>Made by featurecache {esc(__version__)}.</p></footer>"
            f'<script type="application/json" id="predictions-data">{script_json(p.records())}</script>'
            "</body></html>\n")
