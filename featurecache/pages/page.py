"""The report page as HTML: :func:`render` draws a :class:`~featurecache.pages.content.ReportContent`.

One self-contained file: the style, the script (:mod:`featurecache.pages.static`), the figures
(inline SVG, :mod:`featurecache.pages.svg`) and the pictures (``data:`` URIs,
:mod:`featurecache.pages.thumbs`) are all in it, and its content security policy lets it load
nothing else. Each image's thumbnail is stored once (an SVG ``<image>`` that every tile showing
the image ``<use>``s). Every text that comes from data goes through :func:`~featurecache.pages.svg.esc`;
the numbers behind the tables are also embedded as JSON (``<script type="application/json"
id="report-data">``) with ``<``, ``>`` and ``&`` escaped, so that no name can end the script.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone

import numpy as np

from featurecache import __version__
from featurecache.images import DISPLAYED_LAYOUTS
from featurecache.outputs import json_text
from featurecache.pages.content import GROUPS, ReportContent
from featurecache.pages.static import CSP, SCRIPT, STYLE
from featurecache.pages.svg import esc, forest_svg, map_svg, num, pct, pr_svg, script_json, tile_svg
from featurecache.pages.thumbs import map_uri, thumbnail_uri

__all__ = ["GROUP_TITLES", "render", "script_json"]

GROUP_TITLES = {"top": "Top-scoring images", "fp": "Highest-scoring negatives (false positives)",
                "miss": "Lowest-scoring positives (misses)"}


def _table(header: list, rows: list, *, attrs: str = "") -> str:
    """A table of already escaped cells (a row may be ``(tr attributes, cells)``)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = []
    for row in rows:
        tr, cells = row if isinstance(row, tuple) else ("", row)
        body.append(f"<tr{tr}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _facts(pairs: list) -> str:
    """A two-column table of ``(name, value)``; floats to 4 digits, other values that are not strings as JSON."""
    rows = [[esc(k), esc(v if isinstance(v, str) else f"{v:.4g}" if isinstance(v, float) else
                         json_text(v, indent=None))] for k, v in pairs if v not in (None, "", {}, [])]
    return _table(["", ""], rows, attrs=' class="facts"').replace("<thead><tr><th></th><th></th></tr></thead>", "")


def _interval(low: float, high: float) -> str:
    return f"[{pct(low)}, {pct(high)}]" if math.isfinite(low) else "–"


def head_section(c: ReportContent) -> str:
    """The head: what it is, how it was trained, and how ``auto`` chose it."""
    head, s = c.head, c.head.summary
    scalars = [(k, v) for k, v in s.items() if k not in ("selection", "objective") and not isinstance(v, (dict, list))]
    parts = ['<section id="head"><h2>Head</h2>',
             _facts([("file", c.head_file or "(in memory)"), ("objective", head.objective), ("head", head.kind),
                     ("classes", ", ".join(head.classes)), ("training", head.summary_line()), *scalars])]
    sel = s.get("selection")
    if sel:
        rows = sorted(sel.get("table", []), key=lambda r: -np.nan_to_num(r.get("map_mean", np.nan), nan=-1.0))
        body = [(' class="chosen"' if r["candidate"] == sel.get("chosen") else "",
                 [esc(r["candidate"]) + (" ← chosen" if r["candidate"] == sel.get("chosen") else ""),
                  pct(r.get("map_mean")), pct(r.get("map_std")), f"{r.get('seconds', 0):.1f}"]) for r in rows]
        parts += [f"<h3>How it was chosen: {esc(sel.get('reason', ''))}</h3>",
                  _table(["candidate", "CV mAP", "± std", "train s"], body, attrs=' id="selection"'),
                  f"<p>{esc(head.selection_line())}</p>"]
    parts.append("</section>")
    return "".join(parts)


def cache_section(c: ReportContent) -> str:
    """The cache: backbone, extraction settings and provenance."""
    p = c.provenance
    grid = p.grid.to_dict() if p.grid is not None else None
    rule = p.label_rule.to_dict() if p.label_rule is not None else None
    ds = p.dataset
    return ('<section id="cache"><h2>Features</h2>' + _facts([
        ("cache", c.cache_file), ("split", c.config.split or "all images"), ("images", c.evaluation.n_images),
        ("patches", c.evaluation.n_patches), ("backbone", p.backbone), ("feature settings", p.feature_settings),
        ("patch grid", grid), ("label rule", rule), ("extraction", p.extraction),
        ("data set", {"root": ds.root, "layout": ds.layout, "split": ds.split, "annotations": ds.annotations}),
        ("fingerprint", p.fingerprint), ("created", p.created or ""), ("versions", p.versions)]) + "</section>")


def ap_section(c: ReportContent) -> str:
    """mAP and per-class AP with intervals, small precision-recall curves, and the forest plot."""
    ev = c.evaluation
    rows = []
    for i, name in enumerate(c.classes):
        lo, hi = c.ap_intervals[i]
        n_err = int(c.errors[:, i].sum())
        link = f'<a href="#class-{i}">{esc(name)}</a>'
        rows.append((f' data-name="{esc(name)}" data-rank="{i}" data-ap="{num(ev.ap[i], 6)}" '
                     f'data-positives="{ev.positives[i]}"',
                     [link, pct(ev.ap[i]), _interval(lo, hi), str(ev.positives[i]), str(n_err),
                      pr_svg(*c.curves[i], label=name, size=(64, 40), axes=False)]))
    buttons = [f'<button type="button" data-sort="{key}">{label}</button>'
               for key, label in (("name", "class"), ("ap-desc", "AP"), ("positives", "positives"))]
    table = _table([buttons[0], buttons[1], "95% interval", buttons[2], "errors", "precision–recall"], rows,
                   attrs=' id="ap-table"')
    lo, hi = c.map_interval
    forest = forest_svg([(n, ev.ap[i], *c.ap_intervals[i]) for i, n in enumerate(c.classes)],
                        references=[("mAP", ev.mean_ap, "#c62828")], label="AP per class with 95% intervals")
    return (f'<section id="ap"><h2>Average precision</h2><p class="lead">mAP <b id="map">{pct(ev.mean_ap)}</b> '
            f"{_interval(lo, hi)} ({esc(ev.method)} AP; {esc(ev.scoring or ev.pooling)}; {ev.n_images} images; "
            f"95% intervals: {c.config.resamples} bootstrap resamples of the images, seed {c.config.seed}). "
            "Errors: negatives scoring at least, and positives below, the class's break-even score (that of its "
            "n-th best image, n its positives).</p>" + f'<div class="row">{table}{forest}</div></section>')


def localization_section(c: ReportContent) -> str:
    """Pointing and CorLoc per class and overall, beside the image centre and the whole image."""
    r = c.localization
    if r is None:
        return ""
    t = r.tolerance
    which = [(name, i) for i, name in enumerate(r.classes) if r.pairs[i]] + [("all", None)]
    rows = [[esc(name), str(int(r.pairs.sum() if i is None else r.pairs[i])),
             *(pct(r.rate(col, i)) for col in r.COLUMNS)] for name, i in which]
    head = ["class", "pairs", "pointing", f"±{t} px", "CorLoc", "centre", f"centre ±{t} px", "whole image"]
    skipped = f"<p class=\"note\">{len(r.skipped)} image(s) could not be mapped.</p>" if r.skipped else ""
    return (f'<section id="localization"><h2>Localisation</h2><p>{esc(r.method)} maps, {r.n_images} images, '
            f"{int(r.pairs.sum())} image-class pairs ({esc(r.runtime) or 'cache only'}): pointing = the map's peak "
            f"in a box of the class; CorLoc = its box at IoU ≥ 0.5; centre and whole image are the baselines (%).</p>"
            + _table(head, rows, attrs=' id="localization-table"') + skipped + "</section>")


def coscore_section(c: ReportContent) -> str:
    """Which classes co-score: positives of a row's class (not labelled the column's) scoring at least the
    column's break-even score."""
    names, m = c.classes, c.coscore
    if m is None or len(names) < 2:
        return ""
    labels = c.evaluation.labels
    rows = []
    for a, name in enumerate(names):
        cells = []
        for b in range(len(names)):
            base = int(labels[:, a].sum()) if a == b else int((labels[:, a] & ~labels[:, b]).sum())
            share = m[a, b] / base if base else float("nan")
            cls = ' class="diag"' if a == b else ' class="cell0"' if not m[a, b] else ""
            cells.append(f'<span{cls} title="{int(m[a, b])} of {base}">{pct(share, 0)}</span>')
        rows.append([esc(name), str(int(labels[:, a].sum())), *cells])
    return ('<section id="coscore"><h2>Co-scoring</h2><p>Row: positives of a class; column: the share of them '
            "(not labelled with the column's class) that score at least the column's break-even score (%). The "
            "diagonal: the row's positives that reach their own class's.</p>"
            + '<div class="scroll">'
            + _table(["positives of", "n", *(esc(n) for n in names)], rows, attrs=' id="coscore-table"')
            + "</div></section>")


def _tile(c: ReportContent, cls: int, kind: str, rank: int, pos: int, image_ids: dict) -> str:
    """One image of a class's gallery: thumbnail, boxes, map, score and labels."""
    entry, ev = c.images[pos], c.evaluation
    name = c.classes[cls]
    score = float(ev.scores[pos, cls])
    positive, error = bool(ev.labels[pos, cls]), bool(c.errors[pos, cls])
    boxes = [(b[0], *b[1:5], b[5], b[0] == name) for b in entry.boxes]
    m = c.maps.get((pos, cls))
    overlay = map_svg(f"m{pos}-{cls}", m.box, m.peak, (entry.width, entry.height)) if m is not None else None
    svg = tile_svg((entry.width, entry.height), image_ref=image_ids.get(pos), boxes=boxes, label=entry.path,
                   overlay=overlay)
    labels = [n for j, n in enumerate(c.classes) if ev.labels[pos, j]]
    badge = (f'<span class="badge {"pos" if positive else "neg"}">{"positive" if positive else "negative"}</span>'
             + (' <span class="badge err">error</span>' if error else ""))
    return (f'<figure class="tile{" err" if error else ""}" data-score="{num(score, 6)}" data-rank="{rank}" '
            f'data-error="{int(error)}" data-kind="{kind}" data-positive="{int(positive)}">{svg}<figcaption>'
            f'<span class="s">{score:.3f}</span> {badge} {esc(entry.path)}<br>labels: '
            f'{esc(", ".join(labels)) or "none"}</figcaption></figure>')


def class_section(c: ReportContent, cls: int, image_ids: dict) -> str:
    """One class: its AP and curve, and its galleries."""
    ev, name = c.evaluation, c.classes[cls]
    lo, hi = c.ap_intervals[cls]
    parts = [f'<section class="cls" id="class-{cls}" data-name="{esc(name)}"><h2>{esc(name)}</h2>',
             f'<p>AP <b class="ap">{pct(ev.ap[cls])}</b> {_interval(lo, hi)}; {ev.positives[cls]} positive '
             f"image(s); break-even score {num(float(c.thresholds[cls]), 3) or '–'}; "
             f"{int(c.errors[:, cls].sum())} error(s).</p>",
             f'<div class="pr-row">{pr_svg(*c.curves[cls], label=name)}</div>']
    for kind in GROUPS:
        tiles = [_tile(c, cls, kind, r, p, image_ids) for r, p in enumerate(c.galleries[cls][kind])]
        parts.append(f"<h3>{GROUP_TITLES[kind]}</h3>"
                     + (f'<div class="gallery kind-{kind}">{"".join(tiles)}</div>' if tiles else "<p>none</p>"))
    parts.append("</section>")
    return "".join(parts)


def thumbnails(c: ReportContent) -> tuple:
    """``(position -> image id, the <svg> of <image> definitions)``: each image shown, and each class's map of
    it (``m<position>-<class>``), stored once however many tiles show it."""
    displayed = c.provenance.dataset.layout in DISPLAYED_LAYOUTS
    ids, defs = {}, []
    for pos, e in sorted(c.images.items()):
        uri = thumbnail_uri(e.file, (e.width, e.height), displayed=displayed)
        if uri is None:
            continue
        ids[pos] = f"im{pos}"
        defs.append(f'<image id="im{pos}" href="{esc(uri)}" width="{e.width}" height="{e.height}" '
                    'preserveAspectRatio="none"/>')
    for (pos, cls), m in sorted(c.maps.items()):
        rows, cols = m.cells.shape
        defs.append(f'<image id="m{pos}-{cls}" href="{esc(map_uri(m.cells))}" width="{cols * m.stride}" '
                    f'height="{rows * m.stride}" preserveAspectRatio="none"/>')
    return ids, ('<svg width="0" height="0" style="position:absolute" aria-hidden="true"><defs>'
                 + "".join(defs) + "</defs></svg>")


def _controls(c: ReportContent) -> str:
    options = "".join(f'<option value="{esc(n)}">{esc(n)}</option>' for n in c.classes)
    return ('<form id="controls" hidden><label>class <select name="class"><option value="">all</option>'
            f'{options}</select></label><label>sort <select name="sort"><option value="">as ranked</option>'
            '<option value="score-desc">score, high first</option><option value="score-asc">score, low first'
            '</option></select></label><label><input type="checkbox" name="errors" value="1"> errors only</label>'
            '<label>score ≥ <input type="number" name="min" step="0.01" size="5"></label>'
            '<span id="status"></span></form>')


def data_json(c: ReportContent) -> dict:
    """The numbers of the page as data: ``eval --json``'s and ``localize --evaluate --json``'s reports and
    the intervals."""
    return {"featurecache": __version__, "evaluation": c.evaluation.to_dict(),
            "localization": c.localization.to_dict() if c.localization is not None else None,
            "map_interval": list(c.map_interval), "ap_intervals": [list(v) for v in c.ap_intervals],
            "resamples": c.config.resamples, "seed": c.config.seed, "map_method": c.map_method,
            "images_per_group": c.config.images, "notes": list(c.notes)}


def render(c: ReportContent) -> str:
    """The whole page."""
    ids, defs = thumbnails(c)
    title = f"featurecache report: {c.head_file or c.head.objective} on {c.cache_file}"
    toggle = ('<p class="maptoggle"><label><input type="checkbox" id="show-maps" checked> show '
              f"{esc(c.map_method)} maps, their boxes and peaks (blue; ground truth green, dashed: other classes'"
              ")</label></p>") if c.maps else ""
    notes = "".join(f'<li class="note">{esc(n)}</li>' for n in c.notes)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [ap_section(c), localization_section(c), coscore_section(c), head_section(c), cache_section(c),
            *(class_section(c, i, ids) for i in range(len(c.classes))),
            f'<section id="notes"><h2>Notes</h2><ul>{notes}</ul></section>' if notes else ""]
    nav = " · ".join(f'<a href="#{a}">{t}</a>' for a, t in (("ap", "AP"), ("localization", "localisation"),
                                                           ("coscore", "co-scoring"), ("head", "head"),
                                                           ("cache", "features")))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
            f"<header><h1>{esc(title)}</h1><p>{nav}</p></header>{_controls(c)}{toggle}<main>{''.join(body)}</main>"
            f"<footer><p>Made by featurecache {esc(__version__)} on {stamp}.</p></footer>{defs}"
            f'<script type="application/json" id="report-data">{script_json(data_json(c))}</script>'
            f"<script>{SCRIPT}</script></body></html>\n")
