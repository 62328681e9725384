"""Tests of the image objective: pooled patch features and the per-class image heads."""

import numpy as np
import pytest
from click.testing import CliRunner

from featurecache.cache import FeatureCache
from featurecache.cli import main
from featurecache.errors import HeadError
from featurecache.evaluate import evaluate
from featurecache.heads import TrainedHead, image_features
from featurecache.train import fit_objective

from conftest import blob_cache, make_synthetic_cache


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
    with FeatureCache(path) as c, pytest.raises(HeadError, match="image_pooling: must be among"):
        image_features(c, pooling=("median",))


def test_image_objective_learns_and_round_trips(tmp_path):
    splits = ["train" if i % 4 else "val" for i in range(60)]
    cache = blob_cache(tmp_path / "b.h5", n_images=60, splits=splits)
    head = fit_objective(cache, objective="image", train_split="train", image_pooling="mean,max")
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
    aps = {p: evaluate(fit_objective(cache, objective="image", train_split="train", image_pooling=p), cache,
                       split="val").mean_ap for p in ("max", "mean")}
    by_max, by_mean = aps["max"], aps["mean"]
    assert by_max > 0.9 and by_max > by_mean + 0.1, (by_max, by_mean)


def test_cli_fit_image_objective(tmp_path):
    cache = blob_cache(tmp_path / "b.h5")
    r = CliRunner().invoke(main, ["fit", str(cache), "--objective", "image", "--image-pooling", "mean,scales"])
    assert r.exit_code == 0, r.output
    assert "objective image, pooling mean+scales" in r.output and (tmp_path / "b.head.pt").exists()
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "b.head.pt"), str(cache)])
    assert r.exit_code == 0 and "objective image" in r.output.splitlines()[0]


def test_image_objective_mlp_head(tmp_path):

    splits = ["train" if i % 4 else "val" for i in range(60)]
    cache = blob_cache(tmp_path / "b.h5", n_images=60, splits=splits)
    head = fit_objective(cache, objective="image", image_head="mlp", train_split="train", image_pooling="mean",
                         image_hidden=16, image_epochs=60, device="cpu")
    assert head.kind == "image-mlp" and head.summary["epochs"] == 60
    report = evaluate(head, cache, split="val")
    assert report.objective == "image" and report.mean_ap > 0.95
    again = evaluate(TrainedHead.load(head.save(tmp_path / "h.pt"), device="cpu"), cache, split="val")
    assert again.ap == report.ap
