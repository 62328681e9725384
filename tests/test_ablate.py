"""Tests of head-only ablations on synthetic caches."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from featurecache.ablate import AblationError, ablate, parse_grid, read_sweep_file
from featurecache.cli import main
from featurecache.errors import HeadError
from featurecache.evaluate import evaluate
from featurecache.heads import TrainedHead
from featurecache.metrics import image_folds

from conftest import blob_cache

FAST = ["hidden=16", "epochs=8", "batch_size=32"]


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory):
    splits = ["train" if i % 4 else "val" for i in range(48)]
    return blob_cache(tmp_path_factory.mktemp("a") / "blobs.h5", n_images=48, splits=splits, seed=1)


def test_parse_grid_values_and_errors():
    g = parse_grid(["hidden=0,512,2048+2048", "background=weight,sample:0.1", "k=1,5", "head=mlp,logreg",
                    "background-weight=none,0.5"])
    assert g == {"hidden": [0, 512, (2048, 2048)], "background": ["weight", "sample:0.1"], "k": [1.0, 5.0],
                 "head": ["mlp", "logreg"], "background_weight": [None, 0.5]}
    for bad, says in ((["depth=3"], "unknown setting 'depth'"), (["head=forest"], "unknown head 'forest'"),
                      (["k"], "expects KEY=V1,V2"), (["hidden=x"], "hidden: cannot read 'x'"),
                      (["background=some"], "background: must be weight, sample:F or none"),
                      (["pooling=median"], "unknown pooling 'median'")):
        with pytest.raises(AblationError, match=says) as e:
            parse_grid(bad)
        assert e.value.param == "grid"


def test_eval_only_settings_reuse_one_training(cache_file):
    grid = parse_grid(FAST + ["hidden=0,16", "k=1,5,10", "pooling=power,max"])
    r = ablate(cache_file, grid=grid, val_split="val", progress=False)
    assert len(r.rows) == 2 * (3 + 1) and r.trainings == 2  # k does not apply to max pooling
    assert r.varied == ["hidden", "k", "pooling"]
    maps = [row.mean for row in r.rows]
    assert maps == sorted(maps, reverse=True) and r.best.mean > 0.9
    # Rows of one training share its time: the 6 evaluation settings did not retrain.
    assert len({round(row.train_seconds[0], 9) for row in r.rows}) == 2


def test_ablation_matches_a_separate_fit_and_eval(cache_file, tmp_path):
    r = ablate(cache_file, grid=parse_grid(["head=logreg", "k=1,5"]), train_split="train", val_split="val",
               save_best=tmp_path / "best.head.pt", progress=False)
    best = r.best
    head = TrainedHead.load(tmp_path / "best.head.pt")
    rep = evaluate(head, cache_file, split="val", k=best.config["k"])
    # The saved head is retrained on the same training images with the same settings.
    assert rep.mean_ap == pytest.approx(best.mean, abs=1e-9)


def test_folds_keep_each_image_on_one_side(cache_file):
    splits = image_folds(48, 5, 0)
    ev = np.zeros((5, 48), int)
    for i, (t, e) in enumerate(splits):
        ev[i, e] = 1
        assert not set(t) & set(e) and len(t) + len(e) == 48
    assert (ev.sum(0) == 1).all()
    r = ablate(cache_file, grid=parse_grid(FAST + ["head=mlp,logreg"]), folds=4, seeds=2, progress=False)
    assert r.protocol.startswith("4-fold") and r.trainings == 2 * 4 * 2
    assert all(len(row.maps) == 8 for row in r.rows) and all(row.std >= 0 for row in r.rows)


def test_cv_folds_are_views_of_the_image_folds(cache_file):
    """auto and ablate share one routine: its folds are metrics.image_folds' images, as cache views."""
    import contextlib

    from featurecache.cache import FeatureCache
    from featurecache.heads.crossval import cv_folds

    with FeatureCache(cache_file) as c, contextlib.ExitStack() as stack:
        folds = cv_folds(c, 3, 7, stack)
        for fold, (train, test) in zip(folds, image_folds(48, 3, 7)):
            np.testing.assert_array_equal(fold.test.images.row, c.images.row[np.sort(test)])
            np.testing.assert_array_equal(fold.train.images.row, c.images.row[np.sort(train)])
        assert sum(f.test.num_images for f in folds) == 48


def test_ablate_config_is_frozen_and_settings_override_it(cache_file):
    from dataclasses import FrozenInstanceError

    from featurecache.ablate import AblateConfig

    config = AblateConfig(grid=parse_grid(["head=logreg", "k=1,5"]), val_split="val", n_boot=0, progress=False)
    with pytest.raises(FrozenInstanceError):
        config.seeds = 2
    r = ablate(cache_file, config, train_split="train")
    assert r.protocol.startswith("train 36 images, evaluate 12") and len(r.rows) == 2 and r.trainings == 1
    with pytest.raises(AblationError, match="at least 1") as e:
        AblateConfig(folds=3, seeds=0)
    assert e.value.param == "seeds"
    with pytest.raises(AblationError, match="unknown setting 'depth'"):
        AblateConfig(grid={"depth": [1]}, folds=3)


def test_setup_errors(cache_file):
    with pytest.raises(AblationError, match="say what to evaluate on"):
        ablate(cache_file, grid={})
    with pytest.raises(AblationError, match="replaces"):
        ablate(cache_file, grid={}, folds=3, val_split="val")


def test_toml_sweep_and_cli(cache_file, tmp_path):
    cfg = tmp_path / "sweep.toml"
    cfg.write_text('[grid]\nhead = ["mlp", "logreg"]\nhidden = [16]\nepochs = [5]\nk = [1, 5]\n'
                   '[options]\nval_split = "val"\nseeds = 2\n')
    grid, options = read_sweep_file(cfg)
    assert grid["head"] == ["mlp", "logreg"] and options == {"val_split": "val", "seeds": 2}
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["ablate", str(cache_file), "--config", str(cfg), "--json", str(out), "--csv",
                                  str(tmp_path / "r.csv"), "-q"])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 4 and data["seeds"] == 2
    lines = r.output.splitlines()
    assert lines[0].startswith("4 configurations") and lines[1].startswith("features in memory")
    assert "mAP" in next(line for line in lines if line.startswith("rank"))
    assert (tmp_path / "r.csv").read_text().startswith("rank,head,k,map_mean")
    bad = tmp_path / "bad.toml"
    bad.write_text("[grid]\nwidth = [1]\n")
    r = CliRunner().invoke(main, ["ablate", str(cache_file), "--config", str(bad), "--val-split", "val"])
    assert r.exit_code == 1 and "unknown setting 'width'" in r.output


@pytest.fixture(scope="module")
def whole_file(cache_file, tmp_path_factory):
    """A one-patch-per-image cache of the same images (their mean patch feature)."""
    from featurecache.cache import FeatureCache

    from conftest import make_synthetic_cache

    with FeatureCache(cache_file) as c:
        t = c.images
        X, img = c.read_features(), c.image_index
        mean = np.stack([X[img == i].mean(0) for i in range(len(t))])
        return make_synthetic_cache(tmp_path_factory.mktemp("w") / "whole.h5", mean, [0] * len(t), np.arange(len(t)),
                                    t.labels, list(c.classes), splits=list(t.split))


def test_objectives_in_one_run_with_the_whole_image_probe(cache_file, whole_file):
    from featurecache.train import fit_objective

    grid = parse_grid(["objective=patch,image,mil", "head=mlp,logreg", "image_pooling=mean,whole", "C=0.5",
                       "k=1,5", "aggregation=max", "image_epochs=20", "image_lr=0.01"] + FAST)
    r = ablate(cache_file, grid=grid, val_split="val", whole_image=whole_file, progress=False)
    # patch: 2 heads (x 2 k); image: 2 poolings (head and k do not apply); mil: 1.
    assert r.trainings == 2 + 2 + 1 and len(r.rows) == 4 + 2 + 1
    by = {(row.config["objective"], row.config["image_pooling"] if row.config["objective"] == "image" else ""): row
          for row in r.rows}
    probe = by[("image", "whole")]
    head = fit_objective(whole_file, objective="image", train_split="train", C=0.5)
    assert probe.mean == pytest.approx(evaluate(head, whole_file, split="val").mean_ap, abs=1e-9)
    # The paired bootstrap: every row has an interval around its mAP; differences to the best and the probe.
    for row in r.rows:
        assert row.ci[0] - 1e-12 <= row.mean <= row.ci[1] + 1e-12
        assert (row.vs_probe is None) == (row is probe) and (row.vs_best is None) == (row is r.best)
        if row.vs_probe:
            assert row.vs_probe[0] == pytest.approx(row.mean - probe.mean) and row.vs_probe[1] <= row.vs_probe[2]
    assert "vs probe" in next(x for x in r.to_text().splitlines() if x.startswith("rank"))
    assert json.loads(r.to_json())["bootstrap"]["resamples"] == 1000
    text = r.to_text()
    image_line = next(line for line in text.splitlines() if " whole " in line)
    assert " - " in image_line  # head, k: not applicable to the image objective
    assert all(0 <= row.mean <= 1 for row in r.rows)
    with pytest.raises(AblationError, match="whole-image cache"):
        ablate(cache_file, grid=parse_grid(["objective=image", "image_pooling=whole"]), val_split="val")
    with pytest.raises(AblationError, match="unknown objective"):
        parse_grid(["objective=boxes"])
    with pytest.raises(AblationError, match="image_pooling"):
        parse_grid(["image_pooling=mean+median"])


@pytest.mark.parametrize("objective", ["image", "hybrid"])
def test_save_best_reproduces_image_level_objectives(cache_file, tmp_path, objective):
    grid = parse_grid([f"objective={objective}", "image_pooling=mean+max", "aggregation=lse:2,max",
                       "image_epochs=10", "image_lr=0.01"])
    r = ablate(cache_file, grid=grid, train_split="train", val_split="val", save_best=tmp_path / "best.pt",
               device="cpu", progress=False)
    head = TrainedHead.load(tmp_path / "best.pt", device="cpu")
    assert head.summary["objective"] == objective
    rep = evaluate(head, cache_file, split="val")
    assert rep.objective == objective and rep.mean_ap == pytest.approx(r.best.mean, abs=1e-6)


def test_auto_and_fusion_rows_and_no_bootstrap(cache_file):
    grid = parse_grid(["objective=auto,fusion", "candidates=image:mean/image:max", "members=image:mean/image:max",
                       "fusion_rule=zscore,rank"])
    assert grid["candidates"] == [("image:mean", "image:max")]
    r = ablate(cache_file, grid=grid, val_split="val", progress=False, n_boot=0)
    assert sorted(row.config["objective"] for row in r.rows) == ["auto", "fusion", "fusion"]
    assert all(np.isnan(row.ci[0]) and row.vs_best is None for row in r.rows) and all(row.mean > 0.8 for row in r.rows)


def test_evaluation_images_never_train_and_settings_that_do_not_apply_do_not_multiply(cache_file, whole_file,
                                                                                     tmp_path):
    # 'trainval' holds every image, the val ones too: they must still stay out of training.
    splits = ["train,trainval" if i % 4 else "val,trainval" for i in range(24)]
    both = blob_cache(tmp_path / "tv.h5", n_images=24, splits=splits)
    r = ablate(both, grid=parse_grid(["head=logreg"]), train_split="trainval", val_split="val", progress=False,
               n_boot=0)
    assert r.protocol.startswith("train 18 images, evaluate 6 images")
    r = ablate(cache_file, grid=parse_grid(["objective=patch,image", "head=logreg", "image_pooling=whole"]),
               val_split="val", whole_image=whole_file, progress=False, n_boot=0)
    assert sorted(row.config["objective"] for row in r.rows) == ["image", "patch"]  # the patch row stays
    grid = parse_grid(["objective=fusion", "members=image:mean/mil", "hidden=0,16", "image_epochs=3"])
    r = ablate(cache_file, grid=grid, val_split="val", progress=False, n_boot=0)
    assert r.trainings == 1  # hidden shapes no member of this fusion


@pytest.mark.parametrize("protocol", [dict(folds=3), dict(train_split="train", val_split="val")])
def test_streaming_past_the_memory_limit_gives_the_in_memory_table(cache_file, protocol):
    """Features over --memory-limit: every configuration streams its fold's images from the file (patch MLP,
    mil, image pooled once per table) and every row's mAP is the in-memory run's."""
    grid = parse_grid(FAST + ["objective=patch,mil,image", "image_epochs=15", "k=1,5"])
    mem = ablate(cache_file, grid=grid, **protocol, progress=False, n_boot=0, memory_limit=1 << 40)
    disk = ablate(cache_file, grid=grid, **protocol, progress=False, n_boot=0, memory_limit=0)
    assert mem.extra["data"].startswith("features in memory")
    assert disk.extra["data"].startswith("features streamed from the file") and disk.extra["data"] in disk.to_text()
    assert len(disk.rows) == len(mem.rows) == 4  # patch at k=1 and k=5, mil, image
    by_config = {json.dumps(r.config, sort_keys=True, default=str): r.maps for r in mem.rows}
    for row in disk.rows:
        assert row.maps == pytest.approx(by_config[json.dumps(row.config, sort_keys=True, default=str)], abs=1e-9)


def test_a_head_that_cannot_stream_names_the_memory_limit(cache_file):
    with pytest.raises(HeadError, match="cannot stream") as e:
        ablate(cache_file, grid=parse_grid(["head=logreg"]), val_split="val", progress=False, memory_limit=0)
    assert getattr(e.value, "param", None) == "memory_limit"
