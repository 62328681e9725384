"""Tests of the built-in demo: its generated data set, and the whole demo through the CLI."""

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from featurecache.cli import main
from featurecache.datasets import read_dataset
from featurecache.demo import DEMO_CLASSES, make_demo_dataset


def test_demo_dataset_is_a_readable_voc_set_with_tight_boxes(tmp_path):
    root = make_demo_dataset(tmp_path / "d", n_train=6, n_val=3, seed=1)
    ds = read_dataset(root)
    assert len(ds) == 9 and set(ds.classes) <= set(DEMO_CLASSES)
    assert len(read_dataset(root, split="val")) == 3
    for r in ds:
        assert 1 <= len(r.boxes) <= 2
        a = np.asarray(Image.open(r.path).convert("RGB"), dtype=float)
        for b in r.boxes.astype(int):
            # Shapes are at least 60 px across their box; a triangle fills 3/4 of it.
            assert min(b[2] - b[0], b[3] - b[1]) >= 40 and b[2] <= 320 and b[3] <= 240
            # The object differs from its surroundings: the box is where something was drawn.
            inner = a[b[1]:b[3], b[0]:b[2]]
            assert inner.std() > 10
    again = make_demo_dataset(tmp_path / "e", n_train=6, n_val=3, seed=1)
    assert (again / "Annotations" / "demo_0004.xml").read_text() == (root / "Annotations" / "demo_0004.xml").read_text()


@pytest.mark.slow
def test_demo_command_runs_the_pipeline_and_learns(tmp_path):
    result = CliRunner().invoke(main, ["demo", str(tmp_path / "work"), "-q"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "== extraction" in out and "== objectives and head settings compared" in out
    assert "12 configurations" in out
    first = next(line for line in out.splitlines() if line.startswith("mAP "))
    assert float(first.split()[1]) > 70  # three easy classes: far above chance
    assert "<- chosen" in out and "auto chose" in out  # the default objective says what it chose
    rows = [line.split() for line in out.splitlines() if line[:3].strip().isdigit() and "configurations" not in line]
    assert {r[1] for r in rows} == {"patch", "image", "mil", "hybrid"}
    assert (tmp_path / "work" / "demo.head.pt").exists() and (tmp_path / "work" / "demo.h5").exists()
    # It ends by predicting on its last validation images, as new ones: a CSV and pictures, where it says.
    work = tmp_path / "work"
    rows = (work / "predictions.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("path,width,height,top1,top1_score")
    assert f"predictions            {work / 'predictions.csv'}" in out
    maps = sorted((work / "maps").glob("*.png"))
    assert "localisation pictures  " + str(work / "maps") in out and len(maps) == 4  # cam maps: any head
    assert "4 images: 4 scored" in out
    # And it ends by writing the head's report page on the validation images, and says where.
    page = (work / "report.html").read_text()
    assert f"report page            {work / 'report.html'}" in out
    assert page.count('<section class="cls"') == 3 and "featurecache report" in page
