"""No command writes over a file it reads (docs/reliability.md, class 10): outputs are compared with
inputs by inode and resolved path, links included, before any work, in one line naming both."""

import hashlib
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from featurecache.cli import main
from featurecache.errors import FeaturecacheError
from featurecache.outputs import check_not_inputs, same_file

from conftest import blob_cache, tiny_trained_head


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_rule_sees_links_hard_links_and_other_spellings(tmp_path):
    a = tmp_path / "a.h5"
    a.write_bytes(b"cache")
    (tmp_path / "sub").mkdir()
    (tmp_path / "soft.h5").symlink_to(a)
    os.link(a, tmp_path / "hard.h5")
    for spelling in (a, tmp_path / "sub" / ".." / "a.h5", tmp_path / "soft.h5", tmp_path / "hard.h5"):
        assert same_file(spelling, a)
        with pytest.raises(FeaturecacheError) as e:
            check_not_inputs({"out": spelling}, {"CACHE": a})
        assert e.value.param == "out" and f"would overwrite CACHE ({a})" in str(e.value) and "\n" not in str(e.value)
    check_not_inputs({"out": tmp_path / "new.h5", "json": None}, {"CACHE": a, "--val": None})  # fine
    with pytest.raises(FeaturecacheError, match="the same file as json"):
        check_not_inputs({"json": tmp_path / "r.txt", "csv": tmp_path / "sub" / ".." / "r.txt"}, {"CACHE": a})
    with pytest.raises(FeaturecacheError, match=r"is inside an input folder .* read as input next time"):
        check_not_inputs({"maps": tmp_path / "sub" / "maps"}, {"an input folder": [tmp_path]}, folders=("maps",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    head = tiny_trained_head(root, objective="image")
    return head, root / "tiny.h5", root / "voc"


def _refused(args, *protected, flag: str, source: str):
    before = {p: _digest(p) for p in protected}
    r = CliRunner().invoke(main, [str(a) for a in args])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert lines[0].startswith(f"Error: {flag}: ") and "would overwrite" in lines[0] and source in lines[0], lines[0]
    assert {p: _digest(p) for p in protected} == before


def test_stage_two_commands_never_write_over_their_inputs(trained, tmp_path):
    head, cache, _ = trained
    link = tmp_path / "link.h5"
    link.symlink_to(cache)
    val = blob_cache(tmp_path / "v.h5", n_images=6, patches=4)
    _refused(["fit", cache, "--objective", "image", "--out", cache], cache, flag="--out", source="CACHE")
    _refused(["fit", cache, "--objective", "image", "--out", link], cache, flag="--out", source="CACHE")
    _refused(["fit", cache, "--objective", "patch", "--val", val, "--out", val], val, flag="--out", source="--val")
    _refused(["eval", head, cache, "--json", head], head, flag="--json", source="HEAD")
    _refused(["eval", head, cache, "--csv", cache], cache, flag="--csv", source="CACHE")
    _refused(["ablate", cache, "--grid", "C=1", "--save-best", cache], cache, flag="--save-best", source="CACHE")
    _refused(["ablate", cache, "--grid", "C=1", "--json", link], cache, flag="--json", source="CACHE")
    _refused(["localize", head, cache, "0", "--png", cache], cache, flag="--png", source="CACHE")
    _refused(["localize", head, cache, "0", "--out", head], head, flag="--out", source="HEAD")


def test_localize_never_draws_over_the_image_it_maps(trained):
    head, cache, voc = trained
    image = voc / "JPEGImages" / "im0.jpg"
    _refused(["localize", head, cache, "im0", "--png", image], image, flag="--png", source="the image")


def test_predict_never_writes_over_an_image_the_head_or_the_weights(trained, tmp_path):
    head, _, voc = trained
    image = voc / "JPEGImages" / "im1.jpg"
    folder = voc / "JPEGImages"
    _refused(["predict", head, image, "--out", image], image, flag="--out", source="an input image")
    _refused(["predict", head, folder, "--cache", folder / "im2.jpg"], folder / "im2.jpg", flag="--cache",
             source="an input image")
    _refused(["predict", head, folder, "--out", head], head, flag="--out", source="HEAD")
    _refused(["predict", head, folder, "--cache", head, "--overwrite"], head, flag="--cache", source="HEAD")
    r = CliRunner().invoke(main, ["predict", str(head), str(folder), "--maps", str(folder / "maps")])
    assert r.exit_code == 1 and "--maps: " in r.output and "read as input next time" in r.output
    assert not (folder / "maps").exists()


def test_extract_never_writes_the_cache_over_its_data_set(trained, tmp_path):
    _, _, voc = trained
    image, xml = voc / "JPEGImages" / "im3.jpg", voc / "Annotations" / "im3.xml"
    _refused(["extract", voc, image, "--scales", "1", "--input-size", "64"], image, flag="OUT",
             source="an image of the data set")
    _refused(["extract", voc, xml, "--scales", "1", "--input-size", "64"], xml, flag="OUT",
             source="an annotation file")


def test_csv_cells_that_spreadsheets_would_run_are_made_inert():
    import csv
    import io

    from featurecache.outputs import csv_text

    cells = ["=HYPERLINK(\"http://x\")", "+cmd", "-2+3", "@SUM(A1)", "\tx", "\rx", "plain", "-0.25", "+1e-3", 3, -1.5]
    back = next(csv.reader(io.StringIO(csv_text([cells]))))
    assert back == ["'=HYPERLINK(\"http://x\")", "'+cmd", "'-2+3", "'@SUM(A1)", "'\tx", "'\rx", "plain", "-0.25",
                    "+1e-3", "3", "-1.5"]


def test_predict_and_eval_write_inert_csv_and_print_names_without_control_characters(trained, tmp_path):
    import csv

    head, cache, voc = trained
    folder = tmp_path / "in"
    folder.mkdir()
    source = voc / "JPEGImages" / "im0.jpg"
    names = ["=cmd|' -C calc'!A0.jpg", "@x.jpg", "line\nforged  cat 1.0.jpg", "esc\x1b[31m.jpg"]
    for name in names:
        (folder / name).write_bytes(source.read_bytes())
    out = tmp_path / "p.csv"
    r = CliRunner().invoke(main, ["predict", str(head), str(folder), "--out", str(out), "--workers", "0"])
    assert r.exit_code == 0, r.output
    rows = list(csv.reader(out.open()))
    paths = sorted(row[0] for row in rows[1:])
    assert all(not p.startswith(("=", "+", "-", "@")) for p in paths)
    assert sorted(p.lstrip("'") for p in paths) == sorted(str(folder / n) for n in names)
    r = CliRunner().invoke(main, ["-q", "predict", str(head), str(folder), "--workers", "0"])
    table = r.output.strip().splitlines()
    assert len(table) == 1 + len(names) + 1 and "\x1b" not in r.output  # header, one row each, the summary
    assert any("line\\nforged" in line for line in table)


def test_a_class_name_that_is_a_formula_is_inert_in_eval_csv(tmp_path):
    import csv

    from featurecache.evaluate import EvalReport

    report = EvalReport(classes=("=1+1", "@cat"), ap=[0.5, float("nan")], positives=[2, 0], mean_ap=0.5,
                        n_images=4, n_patches=8, method="voc07", pooling="power", k=5.0, head="mlp", objective="patch")
    rows = list(csv.reader(report.to_csv().splitlines()))
    assert rows[1][0] == "'=1+1" and rows[2] == ["'@cat", "", "0"]
    assert "NaN" not in report.to_json() and '"ap": [\n  0.5,\n  null\n ]' in report.to_json()
