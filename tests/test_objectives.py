"""Tests of the image-level objective: pooled patch features and the one-vs-rest image head."""

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import blob_cache, make_synthetic_cache
from featurecache.cache import FeatureCache
from featurecache.cli import main
from featurecache.errors import FeaturecacheError
from featurecache.evaluate import evaluate
from featurecache.heads import TrainedHead
from featurecache.objectives import fit_image_head, image_features


def test_image_features_pool_each_image(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(7, 3)).astype(np.float16)
    img = np.array([0, 0, 0, 1, 1, 1, 1])
    path = make_synthetic_cache(tmp_path / "c.h5", X, [0] * 7, img, np.zeros((2, 1), bool), ["a"])
    import h5py

    with h5py.File(path, "a") as f:  # two scales: λ = 1 for the first patch of each image, 2 for the rest
        f["scale"][:] = np.array([1, 2, 2, 1, 2, 2, 2], np.float32)
    Xf = X.astype(np.float32)
    with FeatureCache(path) as c:
        got = image_features(c, pooling=("mean", "max", "scales", "coarse"), chunk_size=3)
    np.testing.assert_allclose(got[0, 0:3], Xf[:3].mean(0), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(got[1, 3:6], Xf[3:].max(0), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(got[1, 6:12], np.r_[Xf[3], Xf[4:].mean(0)], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(got[0, 12:15], Xf[0], rtol=1e-3, atol=1e-3)
    with FeatureCache(path) as c, pytest.raises(FeaturecacheError, match="image pooling must be among"):
        image_features(c, pooling=("median",))


def test_image_objective_learns_and_round_trips(tmp_path):
    splits = ["train" if i % 4 else "val" for i in range(60)]
    cache = blob_cache(tmp_path / "b.h5", n_images=60, splits=splits)
    head = fit_image_head(cache, train_split="train", pooling=("mean", "max"))
    assert head.summary["objective"] == "image" and head.summary["train_images"] == 45
    report = evaluate(head, cache, split="val")
    assert report.objective == "image" and report.mean_ap > 0.95
    path = head.save(tmp_path / "h.pt")
    again = evaluate(TrainedHead.load(path), cache, split="val")
    assert again.ap == report.ap


def test_max_pooling_finds_a_signal_in_one_patch_that_mean_pooling_dilutes(tmp_path):
    rng = np.random.default_rng(0)
    n_img, per, dim = 120, 50, 32
    direction = np.zeros(dim)
    direction[:4] = 4.5  # a strong, localised signal in a few feature dimensions
    X, img, labels = [], [], np.zeros((n_img, 1), bool)
    for i in range(n_img):
        pos = i % 2 == 0
        labels[i, 0] = pos
        f = rng.normal(size=(per, dim))
        if pos:
            f[rng.integers(per)] += direction  # one patch of fifty carries the class
        X.append(f)
        img += [i] * per
    splits = ["train" if i < 80 else "val" for i in range(n_img)]
    cache = make_synthetic_cache(tmp_path / "one.h5", np.concatenate(X), [0] * len(img), img, labels, ["obj"],
                                 splits=splits)
    by_max = evaluate(fit_image_head(cache, train_split="train", pooling=("max",)), cache, split="val").mean_ap
    by_mean = evaluate(fit_image_head(cache, train_split="train", pooling=("mean",)), cache, split="val").mean_ap
    assert by_max > 0.9 and by_max > by_mean + 0.1, (by_max, by_mean)


def test_cli_fit_image_objective(tmp_path):
    cache = blob_cache(tmp_path / "b.h5")
    r = CliRunner().invoke(main, ["fit", str(cache), "--objective", "image", "--image-pooling", "mean,scales"])
    assert r.exit_code == 0, r.output
    assert "objective image, pooling mean+scales" in r.output and (tmp_path / "b.head.pt").exists()
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "b.head.pt"), str(cache)])
    assert r.exit_code == 0 and "objective image" in r.output.splitlines()[0]


def _one_patch_signal_cache(path, n_img=120, per=50, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    direction = np.zeros(dim)
    direction[:4] = 4.5
    X, img, where = [], [], {}
    labels = np.zeros((n_img, 1), bool)
    for i in range(n_img):
        labels[i, 0] = i % 2 == 0
        f = rng.normal(size=(per, dim))
        if labels[i, 0]:
            where[i] = int(rng.integers(per))
            f[where[i]] += direction
        X.append(f)
        img += [i] * per
    splits = ["train" if i < 80 else "val" for i in range(n_img)]
    return make_synthetic_cache(path, np.concatenate(X), [0] * len(img), img, labels, ["obj"], splits=splits), where


@pytest.mark.parametrize("aggregation", ["max", "lse"])
def test_mil_finds_the_one_signal_patch(tmp_path, aggregation):
    from featurecache.objectives import fit_mil_head

    cache, where = _one_patch_signal_cache(tmp_path / "one.h5")
    head = fit_mil_head(cache, train_split="train", params=dict(aggregation=aggregation, device="cpu"))
    assert head.summary["objective"] == "mil"
    report = evaluate(head, cache, split="val")
    assert report.objective == "mil" and report.mean_ap > 0.9, report.mean_ap
    # Its patch scores localise: in positive val images the signal patch scores highest.
    with FeatureCache(cache, split="val") as c:
        p = head.estimator.patch_scores(c.read_features())[:, 0]
        local = c.image_index - c.images.row[0]
        hits = [int(np.argmax(p[local == i])) == where[int(c.images.row[i])]
                for i in range(len(c.images)) if int(c.images.row[i]) in where]
    assert np.mean(hits) > 0.8
    again = evaluate(TrainedHead.load(head.save(tmp_path / "m.pt"), device="cpu"), cache, split="val")
    assert again.ap == report.ap


def test_cli_fit_mil(tmp_path):
    cache, _ = _one_patch_signal_cache(tmp_path / "one.h5", n_img=40)
    r = CliRunner().invoke(main, ["fit", str(cache), "--objective", "mil", "--mil-aggregation", "max",
                                  "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("mil head (max aggregation)")
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "one.head.pt"), str(cache)])
    assert r.exit_code == 0 and "objective mil" in r.output.splitlines()[0]
