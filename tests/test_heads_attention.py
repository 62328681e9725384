"""Tests of the attention objective: gated attention pooling, its weights, streaming, its head file, its maps."""

import numpy as np
import pytest
import torch
from sklearn.base import clone
from test_localize import GRID, SIZE, VAL, _square_voc

from featurecache.cache import FeatureCache
from featurecache.evaluate import evaluate
from featurecache.heads import AttentionHead, BagSource, TrainedHead
from featurecache.train import fit_objective

from conftest import make_synthetic_cache

FAST = dict(image_epochs=30, device="cpu", train_split="train")


def _planted_cache(path, n_img=60, per=20, dim=16, seed=0):
    """Two classes; a positive image of a class holds one planted patch of it among noise patches.
    Returns the cache and, per image, where each class's planted patch is."""
    rng = np.random.default_rng(seed)
    directions = np.zeros((2, dim))
    directions[0, :3], directions[1, 3:6] = 4.0, 4.0
    X, img, where = [], [], {}
    labels = np.zeros((n_img, 2), bool)
    for i in range(n_img):
        f = rng.normal(size=(per, dim))
        spots = rng.choice(per, 2, replace=False)
        for c in range(2):
            if rng.random() < 0.5:
                labels[i, c] = True
                f[spots[c]] += directions[c]
                where[i, c] = int(spots[c])
        X.append(f)
        img += [i] * per
    splits = ["train" if i < 40 else "val" for i in range(n_img)]
    return make_synthetic_cache(path, np.concatenate(X), [0] * len(img), img, labels, ["a", "b"],
                                splits=splits), where


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    path = tmp_path_factory.mktemp("attention") / "planted.h5"
    cache, where = _planted_cache(path)
    return {"cache": cache, "where": where, "head": fit_objective(cache, objective="attention", **FAST)}


def _val_attention(head, cache):
    with FeatureCache(cache, split="val") as c:
        source = BagSource.from_cache(c)
        return c.images.row, head.estimator.attention_from_source(source), source


@pytest.mark.parametrize("branches", ["per-class", "shared"])
def test_attention_weights_sum_to_one_per_bag_and_class(planted, branches):
    head = planted["head"] if branches == "per-class" else fit_objective(
        planted["cache"], objective="attention", attention=branches, **{**FAST, "image_epochs": 2})
    rows, weights, source = _val_attention(head, planted["cache"])
    assert len(weights) == len(rows)
    for w, n in zip(weights, source.sizes()):
        assert w.shape == (n, 2) and (w >= 0).all()
        np.testing.assert_allclose(w.sum(0), 1.0, rtol=1e-5)
    if branches == "shared":
        assert all(np.array_equal(w[:, 0], w[:, 1]) for w in weights)


def test_a_planted_instance_gets_the_most_attention(planted):
    head, where = planted["head"], planted["where"]
    assert head.summary["objective"] == "attention" and head.summary["training_data"] == "memory"
    assert evaluate(head, planted["cache"], split="val").mean_ap > 0.9
    rows, weights, _ = _val_attention(head, planted["cache"])
    hits = [int(np.argmax(w[:, c])) == where[int(r), c] for r, w in zip(rows, weights) for c in range(2)
            if (int(r), c) in where]
    assert len(hits) > 10 and np.mean(hits) > 0.9, np.mean(hits)
    # The head's own route gives the same weights for one image's patches.
    with FeatureCache(planted["cache"], split="val") as c, c.select([0]) as one:
        np.testing.assert_allclose(head.patch_attention(one.read_features()), weights[0], rtol=1e-5, atol=1e-7)


def test_streamed_bags_train_the_same_model(planted):
    settings = dict(objective="attention", **{**FAST, "image_epochs": 3})
    mem = fit_objective(planted["cache"], **settings)
    disk = fit_objective(planted["cache"], **settings, memory_limit=0)
    assert mem.summary["training_data"] == "memory" and disk.summary["training_data"] == "stream"
    for k, v in mem.estimator._state().items():
        assert torch.equal(v, disk.estimator._state()[k]), k


def test_head_file_round_trip(planted, tmp_path):
    head = planted["head"]
    again = TrainedHead.load(head.save(tmp_path / "a.head.pt"), device="cpu")
    assert again.objective == "attention" and again.kind == "attention"
    assert again.estimator.get_params() == {**head.estimator.get_params(), "device": "cpu"}
    with FeatureCache(planted["cache"], split="val") as c:
        np.testing.assert_array_equal(again.image_scores(c), head.image_scores(c))
        x = c.read_features()
    np.testing.assert_array_equal(again.patch_scores(x), head.patch_scores(x))
    assert evaluate(again, planted["cache"], split="val").ap == \
        evaluate(head, planted["cache"], split="val").ap


def test_patch_loss_needs_labels_and_names_its_option(planted):
    from featurecache.errors import HeadError
    from featurecache.heads.registry import FitConfig

    with pytest.raises(HeadError) as e:  # synthetic caches have no box labels: every patch is background
        AttentionHead(patch_weight=1.0, max_epochs=1, device="cpu").fit_source(
            BagSource(np.zeros((4, 3), np.float32), np.array([0, 0, 1, 1]), 2), np.array([[1], [0]]))
    assert e.value.param == "patch_weight"
    assert FitConfig("attention", {"attention_patch_weight": 0.5}).option("attention_patch_weight") == 0.5
    with pytest.raises(HeadError) as e:
        FitConfig("mil", {"attention": "shared"})
    assert e.value.param == "attention"


def test_clone_and_parameters():
    head = AttentionHead(attention="shared", attention_dim=8)
    twin = clone(head)
    assert twin.get_params() == head.get_params() and twin is not head
    assert twin.set_params(dropout=0.1).dropout == 0.1


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    """An attention head on real Lite0 features (dense mode) of test_localize's red-square set."""
    from featurecache.extract import extract
    from featurecache.patches import PatchGrid

    base = tmp_path_factory.mktemp("squares")
    voc, boxes = _square_voc(base / "voc")
    cache = extract(voc, base / "sq.h5", grid=PatchGrid(**GRID), mode="dense", workers=0, progress=False).path
    head = fit_objective(cache, objective="attention", train_split="train", device="cpu", image_epochs=40)
    return {"voc": voc, "cache": cache, "boxes": boxes, "head": head, "file": head.save(base / "a.head.pt")}


def test_the_patch_loss_trains_on_box_labels_weighted_by_the_background_policy(squares):
    head = fit_objective(squares["cache"], objective="attention", train_split="train", device="cpu", image_epochs=3,
                         attention_patch_weight=0.5, background="sample:0.5")
    s = head.summary
    assert s["patch_weight"] == 0.5 and s["background"].startswith("sample") and 0 < s["train_patches"]
    plain = fit_objective(squares["cache"], objective="attention", train_split="train", device="cpu", image_epochs=3)
    assert "patch_weight" not in plain.summary


def test_attention_maps_peak_on_the_object(squares):
    from featurecache.maps import localization_map

    for name in VAL:  # not trained on
        m = localization_map(squares["head"], squares["cache"], name, method="attention", stride=4)
        _, x, y = m.peak("red")
        x0, y0, x1, y1 = squares["boxes"][name]
        assert x0 - 12 <= x <= x1 + 12 and y0 - 12 <= y <= y1 + 12, (name, (x, y), squares["boxes"][name])
        assert m.method == "attention" and m.scores.shape == (1, SIZE[1] // 4, SIZE[0] // 4)
        assert 0 < m.scores.max() <= 1 and m.scores.sum() == pytest.approx(1.0, rel=1e-4)  # the share of attention


def test_localize_evaluates_attention_maps_and_refuses_them_for_other_heads(squares, tmp_path):
    from click.testing import CliRunner

    from featurecache.cli import main
    from featurecache.errors import EvalError
    from featurecache.localize import evaluate_localization
    from featurecache.maps import Localizer, MapConfig

    report = evaluate_localization(squares["head"], squares["cache"], split="val", method="attention", stride=8,
                                   progress=False)
    assert report.method == "attention" and report.pairs.sum() == 4 and report.rate("pointing_tol") == 1.0
    r = CliRunner().invoke(main, ["localize", str(squares["file"]), str(squares["cache"]), "--evaluate", "--split",
                                  "val", "--map-method", "attention", "--stride", "8"])
    assert r.exit_code == 0 and r.output.startswith("attention maps of an attention head"), r.output
    mil = fit_objective(squares["cache"], objective="mil", train_split="train", device="cpu", image_epochs=1)
    with pytest.raises(EvalError) as e:
        Localizer(mil, MapConfig(method="attention"))
    assert e.value.param == "method" and "attention" in e.value.message
    with pytest.raises(EvalError) as e:
        MapConfig(method="attention", scales=(1.0,))
    assert e.value.param == "scales"


def test_predict_draws_attention_maps_of_new_images(squares, tmp_path):
    import featurecache

    image = squares["voc"] / "JPEGImages" / "sq25.jpg"
    result = featurecache.load_head(squares["file"], device="cpu").predict(
        [image], maps=tmp_path / "maps", map_method="attention", stride=8, workers=0)
    assert result.errors == [""] and result.maps[0].endswith(".red.png"), result.maps
    x0, y0, x1, y1 = result.boxes[0]["red"]
    bx0, by0, bx1, by1 = squares["boxes"]["sq25"]
    assert x0 <= bx1 and bx0 <= x1 and y0 <= by1 and by0 <= y1  # the box from the map overlaps the square
