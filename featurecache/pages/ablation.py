"""The ablation page (``ablate --report ablation.html``): the table with its intervals, sortable, and a forest plot.

One row per configuration, as ``ablate`` prints it (the same numbers: mAP mean ± std over
seeds and folds, its 95% paired bootstrap interval, the difference to the best row and to the
whole-image probe with their intervals), sortable by any numeric column in the page (plain
JavaScript; the URL's fragment ``#sort=map-asc`` holds the state, and without JavaScript the
table stays in rank order); and a forest plot of every row's mAP and interval against the best
row and the probe. Self-contained, as the report page is (:mod:`featurecache.pages.page`).
"""

from __future__ import annotations

import math

from featurecache import __version__
from featurecache.heads.registry import relevant
from featurecache.pages.static import CSP, STYLE
from featurecache.pages.svg import COLOURS, esc, forest_svg, num, pct, script_json
from featurecache.sweep import is_probe, show

__all__ = ["SORT_SCRIPT", "ablation_html"]

#: Sorts ``table.sortable`` by a column's ``data-<key>`` from the fragment's ``sort=<key>-asc|desc``.
SORT_SCRIPT = r"""
(function () {
  "use strict";
  function state() {
    var m = /(?:^|[#&])sort=([a-z_]+)-(asc|desc)/.exec(location.hash);
    return m ? {key: m[1], down: m[2] === "desc"} : {key: "rank", down: false};
  }
  function apply() {
    var s = state();
    document.querySelectorAll("table.sortable tbody").forEach(function (body) {
      var rows = Array.prototype.slice.call(body.querySelectorAll("tr"));
      rows.sort(function (a, b) {
        var x = parseFloat(a.getAttribute("data-" + s.key)), y = parseFloat(b.getAttribute("data-" + s.key));
        x = isNaN(x) ? -Infinity : x; y = isNaN(y) ? -Infinity : y;
        return s.down ? y - x : x - y;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
    document.querySelectorAll("table.sortable th button[data-key]").forEach(function (b) {
      b.setAttribute("aria-pressed", String(b.getAttribute("data-key") === s.key));
    });
  }
  document.querySelectorAll("table.sortable th button[data-key]").forEach(function (b) {
    b.addEventListener("click", function () {
      var s = state(), key = b.getAttribute("data-key");
      var down = key === s.key ? !s.down : key !== "rank" && key !== "seconds";
      location.hash = "sort=" + key + "-" + (down ? "desc" : "asc");
    });
  });
  window.addEventListener("hashchange", apply);
  apply();
  document.body.setAttribute("data-js", "ready");
})();
"""


def _difference(d) -> tuple:
    """``(cell text, sort value)`` of a paired difference ``(value, low, high)`` or None."""
    if not d or math.isnan(d[1]):
        return "–", ""
    return f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]", num(d[0], 6)


def _row(rank: int, r, varied: list) -> str:
    cells = [str(rank)] + [esc(show(r.config[k]) if k in relevant(r.config) else "-") for k in varied]
    best, best_key = _difference(r.vs_best)
    probe, probe_key = _difference(r.vs_probe)
    acc = sum(r.patch_accuracy) / len(r.patch_accuracy) if r.patch_accuracy else float("nan")
    seconds = sum(r.train_seconds) / max(len(r.train_seconds), 1)
    ci = f"[{pct(r.ci[0])}, {pct(r.ci[1])}]" if not math.isnan(r.ci[0]) else "–"
    cells += [f"{pct(r.mean)} ± {pct(r.std)}", ci, best, probe, pct(acc), f"{seconds:.1f}"]
    attrs = (f' data-rank="{rank}" data-map="{num(r.mean, 6)}" data-best="{best_key}" data-probe="{probe_key}" '
             f'data-accuracy="{num(acc, 6)}" data-seconds="{num(seconds, 3)}"'
             + (' class="probe"' if is_probe(r.config) else ""))
    return f"<tr{attrs}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _label(r, varied: list) -> str:
    return ", ".join(f"{k}={show(r.config[k])}" for k in varied if k in relevant(r.config)) or "configuration"


def ablation_html(result) -> str:
    """The page of an :class:`~featurecache.ablate.AblationResult`."""
    varied, rows = list(result.varied), list(result.rows)
    buttons = {"rank": "rank", "map": "mAP", "best": "vs best", "probe": "vs probe", "accuracy": "patch acc",
               "seconds": "train s"}

    def th(key: str) -> str:
        return f'<th><button type="button" data-key="{key}">{buttons[key]}</button></th>'

    header = (th("rank") + "".join(f"<th>{esc(k)}</th>" for k in varied) + th("map") + "<th>95% interval</th>"
              + "".join(th(k) for k in ("best", "probe", "accuracy", "seconds")))
    table = (f'<table class="sortable" id="ablation-table"><thead><tr>{header}</tr></thead><tbody>'
             + "".join(_row(i, r, varied) for i, r in enumerate(rows, 1)) + "</tbody></table>")
    probe = next((r for r in rows if is_probe(r.config)), None)
    refs = [("best", rows[0].mean if rows else None, COLOURS["curve"])]
    if probe is not None:
        refs.append(("whole-image probe", probe.mean, COLOURS["probe"]))
    lows = [r.ci[0] for r in rows if not math.isnan(r.ci[0])] + [r.mean for r in rows]
    lo = max(0.0, min(0.9, math.floor(10 * min(lows, default=0.0)) / 10))
    forest = forest_svg([(f"{i}. {_label(r, varied)}", r.mean, *r.ci) for i, r in enumerate(rows, 1)],
                        references=refs, label="mAP of each configuration with its 95% interval", width=1000,
                        domain=(lo, 1.0), name_width=380)
    used = set().union(*(relevant(r.config) for r in rows)) if rows else set()
    fixed = ", ".join(f"{k}={show(v)}" for k, v in result.fixed.items() if k in used)
    title = f"featurecache ablation: {len(rows)} configurations on {result.cache}"
    data = script_json(result.to_dict())
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body><header><h1>{esc(title)}</h1>"
            f"<p>{esc(result.protocol)}, {result.seeds} seed(s); {result.trainings} trainings in "
            f"{result.seconds:.0f} s. mAP in % (mean ± std over seeds × folds; 95% paired bootstrap interval over "
            "images; differences to the best row and to the whole-image probe with their intervals: one that "
            "contains 0 does not tell the two apart).</p>"
            + (f"<p>{esc(result.extra['data'])}</p>" if result.extra.get("data") else "")
            + (f"<p>fixed: {esc(fixed)}</p>" if fixed else "")
            + f'</header><main><section id="table"><h2>Configurations</h2>{table}</section>'
            f'<section id="forest"><h2>mAP with intervals</h2><p>Dashed: the best row (blue)'
            + (", the whole-image probe (red)" if probe is not None else "") + f".</p>{forest}</section></main>"
            f"<footer><p>Made by featurecache {esc(__version__)}.</p></footer>"
            f'<script type="application/json" id="ablation-data">{data}</script>'
            f"<script>{SORT_SCRIPT}</script></body></html>\n")
