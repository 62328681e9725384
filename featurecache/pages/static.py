"""The fixed parts of a report page: its style sheet, its script and its content security policy.

The script is plain JavaScript with no library. It filters and sorts what the HTML already
holds (the page is complete without it): the class sections (``class=NAME``), the images
(``errors=1``: a class's errors only; ``min=0.5``: scores at least this; ``sort=score-asc`` or
``score-desc``) and the AP table (``apsort=ap-desc``, ``ap-asc``, ``name``, ``positives``). Its
state is the URL's fragment (``report.html#class=cat&errors=1``), so a filtered view can be linked,
and the controls only rewrite the fragment. It never writes markup: only ``textContent``,
attributes and the order of existing elements.
"""

from __future__ import annotations

__all__ = ["CSP", "SCRIPT", "STYLE"]

#: Nothing is loaded from anywhere: pictures are ``data:`` URIs, style and script are inline.
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
       "base-uri 'none'; form-action 'none'")

STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header,main,footer{max-width:1280px;margin:0 auto;padding:0 16px}
h1{font-size:22px;margin:16px 0 4px}h2{font-size:18px;margin:24px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:12px 0 6px}
table{border-collapse:collapse;margin:6px 0 12px;background:#fff}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right;vertical-align:middle}
th:first-child,td:first-child{text-align:left}th{background:#f0f0f0}
td.l,th.l{text-align:left}tr.chosen td{font-weight:600}
.facts td:first-child{color:#555;white-space:nowrap}.facts td{text-align:left;max-width:900px;word-break:break-all}
.lead{font-size:16px;margin:4px 0 12px}.note{color:#8a5a00}
#controls{position:sticky;top:0;z-index:2;background:#fff;border-bottom:1px solid #ddd;padding:6px 16px}
#controls label{margin-right:14px}#status{color:#555}
.maptoggle{display:block;max-width:1280px;margin:8px auto;padding:0 16px}
body:has(#show-maps:not(:checked)) .map{display:none}
.gallery{display:flex;flex-wrap:wrap;gap:8px;margin:4px 0 10px}
figure.tile{margin:0;width:200px;background:#fff;border:1px solid #ddd;padding:4px}
figure.tile svg{width:100%;height:auto;display:block;max-height:200px}
figure.tile.err{border-color:#e57373}
figcaption{font-size:12px;word-break:break-all}figcaption .s{font-weight:600}
.kind-top{} .badge{display:inline-block;padding:0 4px;border-radius:3px;font-size:11px;background:#eee}
.badge.err{background:#ffcdd2}.badge.pos{background:#c8e6c9}
svg text{font-size:10px;fill:#444}svg.forest text{font-size:11px}
.pr-row svg{vertical-align:middle}
.cell0{color:#bbb}.diag{font-weight:600}.scroll{overflow-x:auto}.row{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
tr.picked td{background:#fff8e1}
[hidden]{display:none!important}
"""

SCRIPT = r"""
(function () {
  "use strict";
  function params() {
    var out = {};
    var text = location.search.replace(/^\?/, "") + "&" + location.hash.replace(/^#/, "");
    text.split("&").forEach(function (kv) {
      if (!kv) { return; }
      var i = kv.indexOf("=");
      var k = i < 0 ? kv : kv.slice(0, i), v = i < 0 ? "1" : kv.slice(i + 1);
      try { out[decodeURIComponent(k)] = decodeURIComponent(v.replace(/\+/g, " ")); } catch (e) { /* bad escape */ }
    });
    return out;
  }
  function num(el, name) { var v = parseFloat(el.getAttribute(name)); return isNaN(v) ? -Infinity : v; }
  function reorder(parent, items, key, down) {
    items.sort(function (a, b) { var d = key(a) - key(b); return down ? -d : d; });
    items.forEach(function (el) { parent.appendChild(el); });
  }
  function sortTiles(gallery, sort) {
    var tiles = Array.prototype.slice.call(gallery.querySelectorAll("figure.tile"));
    if (sort === "score-asc" || sort === "score-desc") {
      reorder(gallery, tiles, function (t) { return num(t, "data-score"); }, sort === "score-desc");
    } else {
      reorder(gallery, tiles, function (t) { return num(t, "data-rank"); }, false);
    }
    return tiles;
  }
  function sortTable(how) {
    var body = document.querySelector("#ap-table tbody");
    if (!body) { return; }
    var rows = Array.prototype.slice.call(body.querySelectorAll("tr[data-name]"));
    if (how === "name") {
      rows.sort(function (a, b) { return a.getAttribute("data-name") < b.getAttribute("data-name") ? -1 : 1; });
      rows.forEach(function (r) { body.appendChild(r); });
    } else if (how === "ap-asc" || how === "ap-desc") {
      reorder(body, rows, function (r) { return num(r, "data-ap"); }, how === "ap-desc");
    } else if (how === "positives") {
      reorder(body, rows, function (r) { return num(r, "data-positives"); }, true);
    } else {
      reorder(body, rows, function (r) { return num(r, "data-rank"); }, false);
    }
  }
  function apply() {
    var p = params(), cls = p["class"] || "", errors = p.errors === "1", min = parseFloat(p.min);
    var images = 0, classes = 0;
    document.querySelectorAll("section.cls").forEach(function (s) {
      var on = !cls || s.getAttribute("data-name") === cls;
      s.hidden = !on;
      if (!on) { return; }
      classes += 1;
      s.querySelectorAll(".gallery").forEach(function (g) {
        sortTiles(g, p.sort || "").forEach(function (t) {
          var show = (!errors || t.getAttribute("data-error") === "1") && (isNaN(min) || num(t, "data-score") >= min);
          t.hidden = !show;
          if (show) { images += 1; }
        });
      });
    });
    document.querySelectorAll("#ap-table tbody tr[data-name]").forEach(function (r) {
      r.classList.toggle("picked", !!cls && r.getAttribute("data-name") === cls);
    });
    sortTable(p.apsort || "");
    var status = document.getElementById("status");
    if (status) { status.textContent = "showing " + images + " image(s) in " + classes + " class(es)"; }
    var f = document.getElementById("controls");
    if (f) {
      f.elements["class"].value = cls;
      f.elements.errors.checked = errors;
      f.elements.sort.value = p.sort || "";
      f.elements.min.value = isNaN(min) ? "" : String(min);
    }
  }
  function update() {
    var f = document.getElementById("controls"), parts = [], p = params();
    var values = {"class": f.elements["class"].value, errors: f.elements.errors.checked ? "1" : "",
                  sort: f.elements.sort.value, min: f.elements.min.value, apsort: p.apsort || ""};
    Object.keys(values).forEach(function (k) {
      if (values[k]) { parts.push(encodeURIComponent(k) + "=" + encodeURIComponent(values[k])); }
    });
    location.hash = parts.join("&");
  }
  function ready() {
    var f = document.getElementById("controls");
    if (f) {
      f.hidden = false;
      f.addEventListener("change", update);
      f.addEventListener("submit", function (e) { e.preventDefault(); update(); });
    }
    document.querySelectorAll("#ap-table th button[data-sort]").forEach(function (b) {
      b.addEventListener("click", function () {
        var p = params(), want = b.getAttribute("data-sort"), parts = [];
        if (want === "ap-desc" && p.apsort === "ap-desc") { want = "ap-asc"; }
        p.apsort = want;
        Object.keys(p).forEach(function (k) {
          if (p[k]) { parts.push(encodeURIComponent(k) + "=" + encodeURIComponent(p[k])); }
        });
        location.hash = parts.join("&");
      });
    });
    window.addEventListener("hashchange", apply);
    apply();
    document.body.setAttribute("data-js", "ready");
  }
  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", ready); } else { ready(); }
})();
"""
