"""The report page (featurecache.pages, ``featurecache report``): its numbers are eval's and localize's, its
names are escaped, it loads nothing, and in headless Chromium it renders, filters and sorts with no error."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import featurecache
from featurecache.cli import main
from featurecache.errors import FeaturecacheError, ReportError
from featurecache.evaluate import report_from_image_scores
from featurecache.metrics import bootstrap_map, bootstrap_weights, interval
from featurecache.pages import IMAGES_PER_GROUP, ReportConfig, report
from featurecache.pages.content import bootstrap_intervals, break_even, coscore, default_resamples, galleries, thin
from featurecache.pages.svg import script_json

from conftest import blob_cache, tiny_trained_head

EVIL_CLASS = "<script>document.body.dataset.pwned='class'</script>"
EVIL_FILE = "x\"'><img src=x onerror=\"document.body.dataset.pwned='file'\">&amp;.jpg"


class Page(HTMLParser):
    """The elements of a page: every start tag with its attributes, and the text of each <script>."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list = []
        self.scripts: list = []
        self._in_script = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if self._in_script:
            self.scripts.append("")

    def handle_endtag(self, tag):
        self._in_script = False if tag == "script" else self._in_script

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data

    def find(self, tag: str, **attrs) -> list:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def _data(text: str) -> dict:
    page = Page(text)
    i = [a.get("id") for t, a in page.tags if t == "script"].index("report-data")
    return json.loads(page.scripts[i])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A patch head on real Lite0 features of a tiny VOC set (boxes, image files), and its report."""
    root = tmp_path_factory.mktemp("tiny")
    head = tiny_trained_head(root)
    page = report(head, root / "tiny.h5")
    path = page.save(root / "report.html")
    return {"root": root, "head": head, "cache": root / "tiny.h5", "page": page, "path": path}


@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    """A logreg head on a synthetic cache whose class names and file names are markup."""
    from featurecache.train import fit_objective

    root = tmp_path_factory.mktemp("evil")
    cache = blob_cache(root / "evil.h5", n_images=12, patches=6, dim=8)
    with h5py.File(cache, "a") as f:
        f.attrs["classes"] = json.dumps([EVIL_CLASS, 'say "hi" & <b>bye</b>', "c2"])
        paths = [f"img{i}.jpg" for i in range(12)]
        paths[0] = EVIL_FILE
        del f["images/path"]
        f["images"].create_dataset("path", data=np.array(paths, dtype=object), dtype=h5py.string_dtype("utf-8"))
    head = fit_objective(cache, objective="patch", head="logreg", progress=False).save(root / "evil.head.pt")
    page = report(head, cache, resamples=50, images=3)
    return {"root": root, "page": page, "path": page.save(root / "evil.html")}


# --------------------------------------------------------------------------- numbers


def test_numbers_on_the_page_are_evals_and_localizes(tiny, tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["eval", str(tiny["head"]), str(tiny["cache"]), "--json", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["localize", str(tiny["head"]), str(tiny["cache"]), "--evaluate", "--map-method",
                             "windows", "--json", str(tmp_path / "l.json")])
    assert r.exit_code == 0, r.output
    data = _data(tiny["path"].read_text())
    assert data["evaluation"] == json.loads((tmp_path / "e.json").read_text())
    loc, expected = data["localization"], json.loads((tmp_path / "l.json").read_text())
    loc.pop("seconds_per_image"), expected.pop("seconds_per_image")
    assert loc == expected and loc["pairs"] > 0
    # The visible mAP and each class's AP are the same numbers, rounded.
    text = tiny["path"].read_text()
    assert f'<b id="map">{100 * data["evaluation"]["mean_ap"]:.1f}</b>' in text
    for name, ap in zip(data["evaluation"]["classes"], data["evaluation"]["ap"]):
        assert re.search(rf'data-name="{name}".*?<b class="ap">{100 * ap:.1f}</b>', text, re.S)


def test_intervals_contain_the_measured_values_and_are_seeded(tiny):
    c = tiny["page"].content
    lo, hi = c.map_interval
    assert lo <= c.evaluation.mean_ap <= hi
    for ap, (lo, hi) in zip(c.evaluation.ap, c.ap_intervals):
        assert lo <= ap <= hi
    again = report(tiny["head"], tiny["cache"], map_method="none", localization="on")
    assert again.content.ap_intervals == c.ap_intervals and not again.content.maps
    assert "<g class=\"map\">" not in again.html and again.content.localization is None
    assert again.content.notes == ["localisation not measured: no maps are drawn"] and "1 note(s)" in again.summary()


def test_galleries_break_even_and_coscore_on_known_scores():
    scores = np.array([[0.9, 0.1], [0.8, 0.7], [0.3, 0.6], [0.2, 0.9], [0.1, 0.2]])
    labels = np.array([[1, 0], [0, 1], [1, 0], [0, 1], [0, 0]], bool)
    ev = report_from_image_scores(scores, labels, np.zeros_like(labels), ("a", "b"))
    shown = galleries(ev, 2)
    assert shown[0] == {"top": [0, 1], "fp": [1, 3], "miss": [2, 0]}
    thresholds, errors = break_even(ev)
    assert thresholds.tolist() == [0.8, 0.7]  # each class's 2nd best score: it has 2 positives
    assert errors[:, 0].tolist() == [False, True, True, False, False]
    co = coscore(ev, thresholds)
    assert co[0, 1] == 0 and co[1, 0] == 1 and co[0, 0] == 1  # image 1 (b) scores 0.8 for a
    p, r = thin(np.linspace(1, 0, 1000), np.linspace(0, 1, 1000), points=50)
    assert len(p) == 50 and p[0] == 1 and r[-1] == 1


def test_the_map_interval_is_metrics_bootstrap_and_large_sets_draw_fewer_resamples():
    rng = np.random.default_rng(1)
    labels = rng.random((120, 4)) < 0.2
    scores = rng.random((120, 4)) + 0.4 * labels
    ev = report_from_image_scores(scores, labels, np.zeros_like(labels), tuple("abcd"))
    overall, per_class = bootstrap_intervals(ev, 100, 3)
    weights = bootstrap_weights(120, 100, np.random.RandomState(3))
    assert overall == interval(bootstrap_map(scores, labels, None, weights), center=ev.mean_ap)
    one = bootstrap_map(scores[:, [2]], labels[:, [2]], None, weights)
    assert per_class[2] == tuple(np.clip(interval(one, center=ev.ap[2]), 0, 1))
    assert default_resamples(33) == 1000 and default_resamples(5000) == 200 and default_resamples(10**6) == 200


# --------------------------------------------------------------------------- the page


def test_page_has_every_class_capped_galleries_and_loads_nothing(tiny):
    text = tiny["path"].read_text()
    page = Page(text)
    classes = tiny["page"].content.classes
    assert [a["data-name"] for a in page.find("section", **{"class": "cls"})] == list(classes)
    tiles = page.find("figure")
    assert 0 < len(tiles) <= 3 * IMAGES_PER_GROUP * len(classes)
    assert {a["data-kind"] for a in tiles} == {"top", "fp", "miss"}
    # Each image's thumbnail, and each class's map of it, is stored once however many tiles show it.
    stored = [a for t, a in page.tags if t == "image" and a.get("id")]
    images = [a for a in stored if a["id"].startswith("im")]
    maps = [a for a in stored if a["id"].startswith("m") and "-" in a["id"]]
    assert len(stored) == len({a["id"] for a in stored}) == len(images) + len(maps)
    assert len(images) == len(tiny["page"].content.images) and len(maps) == len(tiny["page"].content.maps)
    assert all(a["href"].startswith("data:image/jpeg;base64,") for a in images)
    assert all(a["href"].startswith("data:image/png;base64,") for a in maps)
    assert text.count('<g class="map">') == len(tiles) and 'class="gt"' in text
    # Nothing is loaded from anywhere: every reference is in the page, and the policy says so.
    refs = [v for _, a in page.tags for k, v in a.items() if k in ("src", "href") and v]
    assert refs and all(v.startswith(("#", "data:")) for v in refs), [v[:40] for v in refs if v[:1] != "#"]
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", text)
    assert "default-src 'none'" in page.find("meta", **{"http-equiv": "Content-Security-Policy"})[0]["content"]
    for section in ("ap", "localization", "coscore", "head", "cache"):
        assert page.find("section", id=section), section


def test_the_page_reads_without_javascript(tiny):
    """Without a script the page is its HTML: everything is in it and nothing is hidden but the controls (which
    only the script can work); the maps' checkbox works by style alone."""
    page = Page(tiny["path"].read_text())
    hidden = [(t, a.get("id")) for t, a in page.tags if "hidden" in a]
    assert hidden == [("form", "controls")]
    assert page.find("figure") and page.find("table", id="ap-table") and page.find("input", id="show-maps")
    assert "body:has(#show-maps:not(:checked)) .map{display:none}" in tiny["path"].read_text()


def test_untrusted_class_and_file_names_are_escaped(evil):
    text = evil["path"].read_text()
    page = Page(text)
    assert len(page.find("script")) == 2  # the data and the page's own script: no planted one
    assert EVIL_CLASS not in text and "<img src=x" not in text and "<b>bye" not in text
    assert "&lt;script&gt;document.body.dataset.pwned=&#x27;class&#x27;&lt;/script&gt;" in text
    assert not [a for t, a in page.tags if any(k.startswith("on") for k in a)]  # no event handler attribute
    assert [a["data-name"] for a in page.find("section", **{"class": "cls"})][:2] == [
        EVIL_CLASS, 'say "hi" & <b>bye</b>']  # the parser reads the names back as they were
    assert _data(text)["evaluation"]["classes"][0] == EVIL_CLASS
    assert "</script" not in script_json({"x": EVIL_CLASS}) and "\\u003c" in script_json({"x": "<&>"})
    assert any(EVIL_FILE in a.get("aria-label", "") for t, a in page.tags if t == "svg")
    # No data set recorded: no boxes and no image files, said on the page; tiles show a placeholder.
    assert ">no image</text>" in text and "no object boxes" in text


# --------------------------------------------------------------------------- library and command line


def test_settings_are_checked_and_outputs_never_replace_inputs(tiny, tmp_path):
    with pytest.raises(ReportError) as e:
        ReportConfig(resamples=-1)
    assert e.value.param == "resamples"
    with pytest.raises(ReportError, match="unknown report setting"):
        report(tiny["head"], tiny["cache"], colour="red")
    page = tiny["page"]
    image = next(e.file for e in page.content.images.values())
    for target in (tiny["cache"], tiny["head"], image):
        with pytest.raises(ReportError, match="would overwrite"):
            page.save(target)
    assert featurecache.report is report and page.html.startswith("<!DOCTYPE html>")


def test_command_writes_one_page_and_prints_one_line(tiny, tmp_path):
    out = tmp_path / "r.html"
    r = CliRunner().invoke(main, ["report", str(tiny["head"]), str(tiny["cache"]), "--split", "val", "--out",
                                  str(out), "--resamples", "50", "--images", "2", "-q"])
    assert r.exit_code == 0, r.output
    assert r.output.count("\n") == 1 and r.output.startswith("report: mAP") and str(out) in r.output
    assert _data(out.read_text())["evaluation"]["n_images"] == 2
    r = CliRunner().invoke(main, ["report", str(tiny["head"]), str(tiny["cache"]), "--out", str(tiny["cache"])])
    assert r.exit_code == 1 and "Error: --out:" in r.output and "would overwrite CACHE" in r.output
    r = CliRunner().invoke(main, ["report", str(tiny["head"]), str(tiny["cache"]), "--resamples", "-1"])
    assert r.exit_code == 2


def test_size_and_time_stay_bounded(tiny, tmp_path):
    page = tiny["page"]
    assert sum(page.seconds.values()) < 30
    per_image = len(page.html.encode()) / max(len(page.content.images), 1)
    assert per_image < 40_000  # a thumbnail and its maps: tens of KB, whatever the evaluation's size
    # What is shown depends on the classes and --images, not on how many images were evaluated.
    from featurecache.train import fit_objective

    cache = blob_cache(tmp_path / "many.h5", n_images=300, patches=4, dim=8)
    head = fit_objective(cache, objective="patch", head="logreg", progress=False)
    big = report(head, cache, images=2, map_method="none")
    assert big.content.evaluation.n_images == 300 and big.content.config.resamples == 1000
    assert len(big.content.images) <= 2 * 3 * 3 and big.html.count("<figure") <= 2 * 3 * 3
    assert len(big.html) < 200_000


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    """``ablate --report`` and ``--json`` of one small sweep."""
    root = tmp_path_factory.mktemp("ablation")
    cache = blob_cache(root / "b.h5", n_images=24, patches=6, dim=8)
    r = CliRunner().invoke(main, ["ablate", str(cache), "--grid", "objective=patch,image", "--grid", "head=logreg",
                                  "--grid", "C=0.001,1", "--folds", "2", "--resamples", "50", "--report",
                                  str(root / "ablation.html"), "--json", str(root / "ablation.json"), "-q"])
    assert r.exit_code == 0, r.output
    return {"page": root / "ablation.html", "json": json.loads((root / "ablation.json").read_text())}


def test_ablation_page_is_the_tables_numbers_sortable_with_a_forest_plot(ablation, tmp_path):
    text = ablation["page"].read_text()
    page = Page(text)
    rows, expected = page.find("tr")[1:], ablation["json"]["rows"]
    assert [float(a["data-map"]) for a in rows] == pytest.approx([row["map_mean"] for row in expected], abs=1e-6)
    assert len(page.find("button")) == 6 and '<svg class="forest"' in text and text.count("<circle") == 4
    assert json.loads(page.scripts[0])["rows"] == expected
    refs = [v for _, a in page.tags for k, v in a.items() if k in ("src", "href") and v]
    assert all(v.startswith(("#", "data:")) for v in refs)
    # A report without a page refuses an HTML name, and writes nothing.
    from featurecache.outputs import write_report

    with pytest.raises(FeaturecacheError, match="no HTML page"):
        write_report(report_from_image_scores(np.ones((2, 1)), np.ones((2, 1), bool), None, ("a",)),
                     tmp_path / "e.html")
    assert not (tmp_path / "e.html").exists()


def test_predict_gallery_shows_every_image_with_its_top_classes_and_map(tiny, tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    shutil.copy(tiny["root"] / "voc" / "JPEGImages" / "im0.jpg", images / EVIL_FILE)
    shutil.copy(tiny["root"] / "voc" / "JPEGImages" / "im1.jpg", images / "plain.jpg")
    (images / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "gallery.html"
    r = CliRunner().invoke(main, ["predict", str(tiny["head"]), str(images), "--maps", str(tmp_path / "maps"),
                                  "--report", str(out), "--stride", "16", "-q"])
    assert r.exit_code == 0, r.output
    text = out.read_text()
    page = Page(text)
    tiles = page.find("figure")
    assert len(tiles) == 3 and sum(a["data-error"] == "1" for a in tiles) == 1
    assert text.count('<g class="map">') == 2 and text.count('<table class="top">') == 2
    assert len(page.find("script")) == 1 and "<img src=x" not in text and 'id="show-maps"' in text
    assert any(EVIL_FILE in a.get("aria-label", "") for t, a in page.tags if t == "svg")
    refs = [v for _, a in page.tags for k, v in a.items() if k in ("src", "href") and v]
    assert refs and all(v.startswith("data:image/") for v in refs)
    records = json.loads(page.scripts[0])  # the rows predict --out FILE.json writes
    assert len(records) == 3 and {Path(rec["path"]).name for rec in records} == {EVIL_FILE, "plain.jpg",
                                                                                  "broken.jpg"}


# --------------------------------------------------------------------------- in a browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
browser = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install "
                                                      "chromium; .ci/run tries to)")

#: Where screenshots go: $FEATURECACHE_TEST_ARTEFACTS, else the test's temporary folder (kept by pytest).
ARTEFACTS = os.environ.get("FEATURECACHE_TEST_ARTEFACTS")


def _chromium(url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-extensions", "--no-first-run", "--disable-sync", "--mute-audio",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


def _console_errors(stderr: str) -> list:
    """Every console message (the page's script logs none; an uncaught error, a refused load, a console.error
    are all one of these lines with --enable-logging=stderr)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@browser
def test_console_messages_are_seen(tmp_path):
    """The check the browser tests make catches a script error and a console.error."""
    page = tmp_path / "err.html"
    page.write_text('<!DOCTYPE html><body><script>console.error("boom"); noSuchFunction();</script></body>')
    r = _chromium(page.as_uri(), tmp_path, "--dump-dom")
    assert len(_console_errors(r.stderr)) == 2, r.stderr[-2000:]


@browser
def test_browser_renders_and_filters_by_the_fragment(tiny, tmp_path):
    url = tiny["path"].as_uri() + "#class=cat&errors=1"
    r = _chromium(url, tmp_path, "--dump-dom")
    assert r.returncode == 0 and not _console_errors(r.stderr), r.stderr[-2000:]
    dom = Page(r.stdout)
    assert dom.find("body", **{"data-js": "ready"})
    sections = {a["data-name"]: "hidden" in a for a in dom.find("section", **{"class": "cls"})}
    assert sections == {"cat": False, "dog": True}
    cat = re.search(r'<section class="cls"[^>]*data-name="cat".*?</section>', r.stdout, re.S).group()
    shown = re.findall(r'<figure class="tile[^"]*"([^>]*)>', cat)
    visible = [t for t in shown if "hidden" not in t]
    assert visible and all('data-error="1"' in t for t in visible) and len(visible) < len(shown)
    status = re.search(r'<span id="status">([^<]*)</span>', r.stdout).group(1)
    assert status == f"showing {len(visible)} image(s) in 1 class(es)"


@browser
def test_browser_sorts_by_score(tiny, tmp_path):
    r = _chromium(tiny["path"].as_uri() + "#sort=score-asc&apsort=ap-asc", tmp_path, "--dump-dom")
    assert r.returncode == 0 and not _console_errors(r.stderr), r.stderr[-2000:]
    for gallery in re.findall(r'<div class="gallery[^"]*">(.*?)</div>', r.stdout, re.S):
        scores = [float(s) for s in re.findall(r'data-score="([^"]+)"', gallery)]
        assert scores == sorted(scores)
    aps = [float(v) for v in re.findall(r'<tr data-name="[^"]*" data-rank="\d+" data-ap="([^"]+)"', r.stdout)]
    assert len(aps) == 2 and aps == sorted(aps)


@browser
def test_browser_sorts_the_ablation_table(ablation, tmp_path):
    r = _chromium(ablation["page"].as_uri() + "#sort=seconds-desc", tmp_path, "--dump-dom")
    assert r.returncode == 0 and not _console_errors(r.stderr), r.stderr[-2000:]
    seconds = [float(s) for s in re.findall(r'<tr data-rank="\d+"[^>]* data-seconds="([^"]+)"', r.stdout)]
    assert len(seconds) == 4 and seconds == sorted(seconds, reverse=True) and 'data-js="ready"' in r.stdout


@browser
def test_browser_shows_planted_markup_as_text_and_takes_a_screenshot(evil, tmp_path):
    r = _chromium(evil["path"].as_uri(), tmp_path, "--dump-dom")
    assert r.returncode == 0 and not _console_errors(r.stderr), r.stderr[-2000:]
    assert "data-pwned" not in r.stdout  # no planted script or handler ran: the body is not marked
    assert "&lt;script&gt;document.body.dataset.pwned" in r.stdout  # shown as text
    shot = Path(ARTEFACTS or tmp_path) / "report-evil.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    r = _chromium(evil["path"].as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1200,1600",
                  "--hide-scrollbars")
    assert r.returncode == 0 and shot.stat().st_size > 10_000, r.stderr[-2000:]
