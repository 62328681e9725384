"""End to end through the command line on the real VOC sample: extract -> fit -> eval."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from featurecache.cli import main

from conftest import blob_cache, tiny_trained_head


@pytest.fixture(scope="module")
def voc_cache(voc_sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("voc") / "voc.h5"
    r = CliRunner().invoke(main, ["extract", str(voc_sample), str(out), "--scales", "1,2", "--input-size", "64",
                                  "--workers", "2", "-q"])
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.slow
@pytest.mark.parametrize("head", ["mlp", "logreg"])
def test_extract_fit_eval_on_real_voc_is_far_above_chance(voc_cache, tmp_path, head):
    runner = CliRunner()
    head_file = tmp_path / f"{head}.head.pt"
    r = runner.invoke(main, ["fit", str(voc_cache), "--objective", "patch", "--train-split", "train",
                             "--val-split", "val", "--head", head, "--out", str(head_file)])
    assert r.exit_code == 0, r.output
    assert f"{head} head:" in r.output and "training patches" in r.output and head_file.exists()
    js = tmp_path / "r.json"
    r = runner.invoke(main, ["eval", str(head_file), str(voc_cache), "--split", "val", "--json", str(js),
                             "--csv", str(tmp_path / "r.csv")])
    assert r.exit_code == 0, r.output
    report = json.loads(js.read_text())
    ap = np.array([a for a in report["ap"] if a is not None])
    # Chance: a random ranking's AP is about the share of positive images of the class.
    chance = np.mean([n / report["n_images"] for n in report["positives"] if n])
    assert report["n_images"] == 33 and report["mean_ap"] > 3 * chance and report["mean_ap"] > 0.3, (
        report["mean_ap"], chance)
    assert abs(ap.mean() - report["mean_ap"]) < 1e-9
    assert r.output.startswith(f"mAP {100 * report['mean_ap']:.1f}")
    assert (tmp_path / "r.csv").read_text().splitlines()[0] == "class,ap,positives"


def test_fit_writes_beside_the_cache_and_eval_refuses_other_features(tmp_path):
    a = blob_cache(tmp_path / "a.h5")
    b = blob_cache(tmp_path / "b.h5", feature_settings={"backbone": "vgg16", "layer": "classifier.4",
                                                        "input_size": 224, "mode": "crop"})
    runner = CliRunner()
    r = runner.invoke(main, ["fit", str(a), "--objective", "patch", "--head", "logreg"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "a.head.pt").exists()
    r = runner.invoke(main, ["eval", str(tmp_path / "a.head.pt"), str(b)])
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert "backbone: vgg16 (cache) vs synthetic (head)" in r.output
    r = runner.invoke(main, ["fit", str(a), "--objective", "patch", "--background", "sometimes"])
    assert r.exit_code == 1 and "Error: --background: must be weight, sample:F or none" in r.output


def test_the_readmes_python_snippets_run(tmp_path, monkeypatch):
    """Each ```python block of the README runs as written, on a small cache named as it names it."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(snippets) >= 2
    splits = ["train" if i % 3 else "val" for i in range(30)]
    blob_cache(tmp_path / "voc.h5", n_images=30, splits=splits)
    # The prediction snippet needs a head on real features and a folder of photos.
    import shutil

    shutil.copy(tiny_trained_head(tmp_path / "real"), tmp_path / "voc.head.pt")
    shutil.copytree(tmp_path / "real" / "voc" / "JPEGImages", tmp_path / "photos")
    monkeypatch.chdir(tmp_path)
    scopes = []
    for code in snippets:
        scopes.append({})
        exec(compile(code, "README.md", "exec"), scopes[-1])  # noqa: S102 - the project's own documentation
    assert any(s.get("report") is not None and s["report"].mean_ap > 0.9 for s in scopes)
    result = next(s["result"] for s in scopes if "result" in s)
    assert result.n_scored == 6 and len(list((tmp_path / "maps").glob("*.png"))) == 6
