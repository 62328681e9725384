"""Tests of score fusion: standardised log-odds or ranks of member heads, averaged."""

import numpy as np
import pytest

from featurecache.cache import FeatureCache
from featurecache.errors import HeadError
from featurecache.evaluate import evaluate
from featurecache.heads import TrainedHead
from featurecache.heads.fusion import FusionHead, has_boxes, resolve_members
from featurecache.train import fit_objective

from conftest import blob_cache, make_synthetic_cache


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory):
    splits = ["train" if i % 4 else "val" for i in range(48)]
    return blob_cache(tmp_path_factory.mktemp("f") / "b.h5", n_images=48, splits=splits)


def _logit(s):
    s = np.clip(s.astype(np.float64), 1e-30, 1 - 1e-7)
    return np.log(s / (1 - s))


def test_zscore_fusion_is_the_mean_of_standardised_log_odds(cache_file, tmp_path):
    head = fit_objective(cache_file, objective="fusion", members="image:mean,mil", image_epochs=20,
                         train_split="train", device="cpu")
    assert head.objective == "fusion" and head.summary["members"] == ["image:mean", "mil"]
    members = head.estimator.heads_
    assert [m.objective for m in members] == ["image", "mil"]
    with FeatureCache(cache_file, split="train") as tr, FeatureCache(cache_file, split="val") as va:
        z_train = [_logit(m.image_scores(tr)) for m in members]
        z_val = [_logit(m.image_scores(va)) for m in members]
        want = np.mean([(z - zt.mean(0)) / zt.std(0) for z, zt in zip(z_val, z_train)], axis=0)
        np.testing.assert_allclose(head.image_scores(va), 1 / (1 + np.exp(-want)), rtol=1e-5, atol=1e-6)
    report = evaluate(head, cache_file, split="val")
    assert report.objective == "fusion" and report.mean_ap > 0.9 and "fusion of image:mean + mil" in report.to_text()
    again = TrainedHead.load(head.save(tmp_path / "f.pt"), device="cpu")
    assert again.objective == "fusion" and evaluate(again, cache_file, split="val").ap == report.ap


def test_rank_fusion_averages_ranks():
    a = np.array([[0.1], [0.9], [0.5], [0.5]])
    b = np.array([[0.3], [0.2], [0.1], [0.4]])
    fused = FusionHead(("x", "y"), "rank").fuse([a, b])
    # ranks of a: 1, 4, 2.5, 2.5; of b: 3, 2, 1, 4 -> means 2, 3, 1.75, 3.25 -> (r - 1) / 3
    np.testing.assert_allclose(fused[:, 0], (np.array([2, 3, 1.75, 3.25]) - 1) / 3)


def test_members_without_boxes(tmp_path):
    rng = np.random.default_rng(0)
    path = make_synthetic_cache(tmp_path / "n.h5", rng.normal(size=(40, 4)), [0] * 40, np.repeat(np.arange(20), 2),
                                np.eye(2, dtype=bool)[np.arange(20) % 2], ["a", "b"])
    with FeatureCache(path) as c:
        assert not has_boxes(c)
    assert resolve_members(("image:coarse", "hybrid", "patch"), False) == ("image:coarse", "mil")
    assert resolve_members(("image:coarse", "hybrid"), True) == ("image:coarse", "hybrid")
    head = fit_objective(path, objective="fusion", image_epochs=5, device="cpu")
    assert head.summary["members"] == ["image:coarse", "mil"]
    with pytest.raises(HeadError, match="does not fuse fusions"):
        resolve_members(("fusion", "mil"), True)
    with pytest.raises(HeadError) as e:
        fit_objective(path, objective="fusion", members="image:median")
    assert e.value.param == "members"


def test_a_class_the_training_images_cannot_teach_stays_at_its_members_level(tmp_path):
    """No positive among the training images (an absent class) or no negative: standardising its
    members' near-constant log-odds would blow their noise up to scores of 0.3-0.7."""
    rng = np.random.default_rng(0)
    n, per = 40, 6
    labels = np.zeros((n, 3), bool)
    labels[:, 0] = np.arange(n) % 2 == 0
    labels[np.arange(n) >= 30, 1] = True  # class 1 only among the last (val) images: absent from training
    labels[:30, 2] = True  # class 2 on every training image: no negative
    splits = ["train" if i < 30 else "val" for i in range(n)]
    X = rng.normal(size=(n * per, 8)) + np.repeat(labels[:, :1] * 3.0, per, axis=0)
    cache = make_synthetic_cache(tmp_path / "c.h5", X, np.zeros(n * per, int), np.repeat(np.arange(n), per), labels,
                                 ["half", "absent", "always"], splits=splits)
    head = fit_objective(cache, objective="fusion", members="image:mean,image:max", train_split="train")
    with FeatureCache(cache) as c:
        fused = head.image_scores(c)
        members = [m.image_scores(c) for m in head.estimator.heads_]
    for cls, level in ((1, 0.0), (2, 1.0)):
        lo, hi = min(m[:, cls].min() for m in members), max(m[:, cls].max() for m in members)
        assert abs(lo - level) < 0.05 and abs(hi - level) < 0.05
        assert np.all(np.abs(fused[:, cls] - level) < 0.05), (cls, fused[:, cls].min(), fused[:, cls].max())
    assert fused[:, 0].std() > 0.2  # a class with both kinds of images is still standardised and fused
