"""Tests of image-score aggregation and average precision."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from featurecache.evaluate import average_precision, image_scores, per_class_ap


def test_power_max_mean_pooling():
    probs = np.array([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.2, 0.0, 0.8], [0.9, 0.1, 0.0]])
    img = np.array([0, 0, 1, 1])
    np.testing.assert_allclose(image_scores(probs, img, 2, k=2), [[(0.25 + 1) / 2, 0], [0.01 / 2, 0.64 / 2]])
    np.testing.assert_allclose(image_scores(probs, img, 2, pooling="max"), [[1.0, 0], [0.1, 0.8]])
    np.testing.assert_allclose(image_scores(probs, img, 3, pooling="mean"), [[0.75, 0], [0.05, 0.4], [0, 0]])
    with pytest.raises(ValueError):
        image_scores(probs, img, 2, pooling="median")


def test_k_large_approaches_max_and_k_one_is_mean():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=50)
    img = rng.integers(0, 5, 50)
    np.testing.assert_allclose(image_scores(probs, img, 5, k=1), image_scores(probs, img, 5, pooling="mean"))
    power = image_scores(probs, img, 5, k=200) ** (1 / 200)
    np.testing.assert_allclose(power, image_scores(probs, img, 5, pooling="max"), rtol=0.05)


@pytest.mark.parametrize("seed", range(10))
def test_raw_ap_matches_sklearn_on_random_data(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 200))
    y = rng.random(n) < rng.uniform(0.05, 0.6)
    y[0] = True
    s = rng.random(n)  # continuous: no ties
    assert average_precision(s, y, method="raw") == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_raw_ap_matches_sklearn_with_ties_too():
    rng = np.random.default_rng(3)
    y = rng.random(300) < 0.3
    s = rng.integers(0, 8, 300).astype(float)
    assert average_precision(s, y, method="raw") == pytest.approx(average_precision_score(y, s), abs=1e-12)


def voc_devkit_ap(rec, prec):
    """VOCdevkit's VOCap (VOC 2010+), transcribed literally from its MATLAB."""
    mrec = [0.0] + list(rec) + [1.0]
    mpre = [0.0] + list(prec) + [0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    return sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])


@pytest.mark.parametrize("seed", range(10))
def test_all_ap_is_the_devkit_interpolated_area(seed):
    rng = np.random.default_rng(seed)
    n = 100
    y = rng.random(n) < 0.3
    y[0] = True
    s = rng.random(n)
    order = np.argsort(-s)
    tp = np.cumsum(y[order])
    rec, prec = tp / y.sum(), tp / np.arange(1, n + 1)
    got = average_precision(s, y, method="all")
    assert got == pytest.approx(voc_devkit_ap(rec, prec), abs=1e-12)
    # Interpolation only raises precision: never below the uninterpolated area.
    assert got >= average_precision_score(y, s) - 1e-12


def test_voc07_worked_example_by_hand():
    # Ranking: + - + - - +, 3 positives.
    # rank:      1    2    3    4    5    6
    # recall:   1/3  1/3  2/3  2/3  2/3  1
    # precision: 1   1/2  2/3  1/2  2/5  1/2
    # Best precision at recall >= t: t in {0, .1, .2, .3}: 1; t in {.4 .. .6}: 2/3 (rank 3);
    # t in {.7, .8, .9, 1.0}: 1/2 (rank 6).
    # AP = (4 * 1 + 3 * 2/3 + 4 * 1/2) / 11 = 8 / 11.
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    y = np.array([1, 0, 1, 0, 0, 1], bool)
    assert average_precision(s, y, method="voc07") == pytest.approx(8 / 11)
    # VOC 2010+: recall steps of 1/3 at precision envelopes 1, 2/3, 1/2.
    assert average_precision(s, y, method="all") == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)
    assert average_precision(s, y, method="raw") == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)


def test_perfect_and_reversed_rankings():
    y = np.array([1, 1, 0, 0, 0], bool)
    s = np.array([5, 4, 3, 2, 1], float)
    for m in ("voc07", "all", "raw"):
        assert average_precision(s, y, method=m) == pytest.approx(1.0)
        assert average_precision(-s, y, method=m) < 0.5


def test_difficult_only_images_are_ignored_and_no_positive_is_nan():
    s = np.array([0.9, 0.8, 0.1])
    y = np.array([False, True, False])
    assert average_precision(s, y, method="raw") == pytest.approx(0.5)
    assert average_precision(s, y, ignore=np.array([True, False, False]), method="raw") == pytest.approx(1.0)
    assert np.isnan(average_precision(s, np.zeros(3, bool)))
    scores = np.stack([s, s], 1)
    labels = np.stack([y, np.zeros(3, bool)], 1)
    difficult = np.stack([[True, False, False], [False, False, False]], 1)
    ap, npos = per_class_ap(scores, labels, difficult, method="raw")
    assert ap[0] == pytest.approx(1.0) and np.isnan(ap[1]) and npos.tolist() == [1, 0]


def _hand_made_mil_head(cache_path, n_features):
    """A MIL head whose class score is σ(feature 0): known patch scores."""
    import torch

    from featurecache.cache import FeatureCache
    from featurecache.heads import MILHead, TrainedHead

    est = MILHead(device="cpu")
    net = torch.nn.Linear(n_features, 1)
    with torch.no_grad():
        net.weight.zero_()
        net.weight[0, 0] = 1.0
        net.bias.zero_()
    est.net_, est.n_features_in_, est.n_outputs_ = net.eval(), n_features, 1
    with FeatureCache(cache_path) as c:
        return TrainedHead(est, "mil", tuple(c.classes), dict(c.feature_settings), c.fingerprint,
                           {"objective": "mil"})


def test_localization_map_is_the_per_pixel_mean_of_covering_patch_scores(tmp_path):
    import h5py

    from featurecache.evaluate import EvalError, localization_map
    from featurecache.train import fit_objective

    from conftest import make_synthetic_cache

    X = np.zeros((5, 4))
    X[:, 0] = [3.0, -3.0, 0.0, 0.0, 1.0]  # patch scores sigma(x0); the last patch is image 1's
    path = make_synthetic_cache(tmp_path / "c.h5", X, [0] * 5, [0, 0, 0, 0, 1], np.array([[True], [False]]), ["obj"])
    with h5py.File(path, "a") as f:  # 100 x 100 images: two top quarters, the bottom half, the whole image
        f["box"][:] = np.array([[0, 0, 50, 50], [50, 0, 100, 50], [0, 50, 100, 100], [0, 0, 100, 100],
                                [0, 0, 100, 100]], np.float32)
    head = _hand_made_mil_head(path, 4)
    m = localization_map(head, path, "img0", stride=10)
    s = 1 / (1 + np.exp(-np.array([3.0, -3.0, 0.0])))
    assert m.scores.shape == (1, 10, 10) and (m.width, m.height) == (100, 100)
    np.testing.assert_allclose(m.scores[0, :5, :5], (s[0] + 0.5) / 2, rtol=1e-5)
    np.testing.assert_allclose(m.scores[0, :5, 5:], (s[1] + 0.5) / 2, rtol=1e-5)
    np.testing.assert_allclose(m.scores[0, 5:, :], 0.5, rtol=1e-5)
    score, x, y = m.peak("obj")
    assert x < 50 and y < 50 and score == pytest.approx((s[0] + 0.5) / 2, rel=1e-5)
    assert "obj" in m.to_text() and m.path == "img0.jpg"
    saved = np.load(m.save(tmp_path / "m.npz"))
    np.testing.assert_array_equal(saved["scores"], m.scores)
    # Image 1 by row; a 7-px stride does not divide 100: the map still covers the image.
    assert localization_map(head, path, 1, stride=7).scores.shape == (1, 15, 15)
    with pytest.raises(EvalError, match="no image"):
        localization_map(head, path, 5)
    with pytest.raises(EvalError, match="match 'cat'"):
        localization_map(head, path, "cat")
    with pytest.raises(EvalError, match="scores pooled image features"):
        localization_map(fit_objective(path, objective="image"), path, 0)


def test_cli_localize(tmp_path):
    import h5py
    from click.testing import CliRunner

    from featurecache.cli import main

    from conftest import make_synthetic_cache

    X = np.zeros((2, 4))
    X[:, 0] = [2.0, -2.0]
    path = make_synthetic_cache(tmp_path / "c.h5", X, [0, 0], [0, 0], np.array([[True]]), ["obj"])
    with h5py.File(path, "a") as f:
        f["box"][:] = np.array([[0, 0, 40, 100], [40, 0, 100, 100]], np.float32)
    _hand_made_mil_head(path, 4).save(tmp_path / "h.pt")
    r = CliRunner().invoke(main, ["localize", str(tmp_path / "h.pt"), str(path), "0", "--stride", "20", "--out",
                                  str(tmp_path / "m.npz")])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("img0.jpg (100x100, 20-px cells, objective mil): obj 0.881 at (10, 10)")
    assert np.load(tmp_path / "m.npz")["scores"].shape == (1, 5, 5)
