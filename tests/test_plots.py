"""Tests of the evaluation plots (matplotlib, the `plots` extra; in the test extra)."""

import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from featurecache.cli import main

from conftest import blob_cache


@pytest.fixture
def fitted(tmp_path):
    cache = blob_cache(tmp_path / "c.h5", n_classes=4)
    r = CliRunner().invoke(main, ["fit", str(cache), "--objective", "patch", "--head", "logreg", "--out",
                                  str(tmp_path / "h.pt")])
    assert r.exit_code == 0, r.output
    return cache, tmp_path / "h.pt"


def test_eval_plots_writes_the_summary_and_the_curves(fitted, tmp_path):
    pytest.importorskip("matplotlib")
    cache, head = fitted
    out = tmp_path / "plots"
    r = CliRunner().invoke(main, ["eval", str(head), str(cache), "--plots", str(out)])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-1] == f"plots: {out / 'summary.png'}, {out / 'pr_curves.png'}"
    for name in ("summary.png", "pr_curves.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 150
            # Not a blank page: bars and curves drawn in the plot colour.
            a = np.asarray(im.convert("RGB")).reshape(-1, 3).astype(int)
            assert (np.abs(a - [0x3B, 0x6E, 0xA8]).sum(1) < 30).mean() > 0.002


def test_eval_plots_without_matplotlib_names_the_extra(fitted, tmp_path, monkeypatch):
    cache, head = fitted
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    r = CliRunner().invoke(main, ["eval", str(head), str(cache), "--plots", str(tmp_path / "p")])
    assert r.exit_code == 1
    assert r.output.splitlines()[-1] == 'Error: --plots: plots need matplotlib: pip install "featurecache[plots]"'
