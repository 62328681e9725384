"""Tests of average precision, its bootstrap over images, intervals and image folds."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from featurecache.metrics import (
    average_precision,
    bootstrap_map,
    bootstrap_weights,
    image_folds,
    interval,
    mean_ap,
    per_class_ap,
)


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


@pytest.mark.parametrize("method", ["voc07", "all", "raw"])
def test_weighted_resamples_equal_the_ap_of_the_repeated_images(method):
    """A bootstrap resample is a weighting; its AP must be the AP of the list with images repeated."""
    rng = np.random.default_rng(3)
    scores = np.round(rng.random((25, 3)), 1)  # coarse scores: many ties
    labels = rng.random((25, 3)) < 0.3
    labels[0] = True
    difficult = (rng.random((25, 3)) < 0.1) & ~labels
    weights = bootstrap_weights(25, 40, np.random.RandomState(0))
    got = bootstrap_map(scores, labels, difficult, weights, method=method)
    for b in range(40):
        rows = np.repeat(np.arange(25), weights[b].astype(int))
        ap, _ = per_class_ap(scores[rows], labels[rows], difficult[rows], method=method)
        want = np.nanmean(ap) if (~np.isnan(ap)).any() else np.nan
        assert got[b] == pytest.approx(want, abs=1e-12, nan_ok=True), b
    ones = bootstrap_map(scores, labels, difficult, np.ones((1, 25)), method=method)[0]
    assert ones == pytest.approx(mean_ap(scores, labels, difficult, method=method), abs=1e-12)


def test_intervals_and_folds():
    samples = np.r_[np.linspace(0.5, 0.7, 99), np.nan]
    lo, hi = interval(samples)
    assert lo == pytest.approx(0.505, abs=1e-3) and hi == pytest.approx(0.695, abs=1e-3)
    lo, hi = interval(samples, center=0.4)  # the spread, placed around the measured value
    assert lo == pytest.approx(0.305, abs=1e-3) and hi == pytest.approx(0.495, abs=1e-3)
    assert np.isnan(interval([np.nan])[0])
    folds = image_folds(10, 3, 0)
    evaluated = np.concatenate([e for _, e in folds])
    assert sorted(evaluated) == list(range(10)) and all(not set(t) & set(e) for t, e in folds)
    assert [len(e) for _, e in folds] == [4, 3, 3]
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, image_folds(10, 3, 0)))
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(folds, image_folds(10, 3, 1)))


def test_no_images_is_nan():
    assert np.isnan(average_precision(np.zeros(0), np.zeros(0, bool)))


def test_precision_recall_is_the_curve_under_average_precision():
    from sklearn.metrics import precision_recall_curve

    from featurecache.metrics import average_precision, precision_recall

    rng = np.random.default_rng(0)
    scores = np.round(rng.random(60), 1)  # ties: one step each
    positive = rng.random(60) < 0.3
    ignore = rng.random(60) < 0.1
    p, r = precision_recall(scores, positive, ignore=ignore)
    keep = ~ignore
    ps, rs, _ = precision_recall_curve(positive[keep], scores[keep])
    # Every (recall, precision) point of scikit-learn's curve, with a real tolerance (pytest.approx
    # compares nested sequences exactly or, from pytest 9, refuses them).
    np.testing.assert_allclose(np.array(sorted(zip(r, p))), np.array(sorted(zip(rs[:-1], ps[:-1]))),
                               rtol=0, atol=1e-12)
    assert np.sum(np.diff(np.r_[0, r]) * p) == pytest.approx(
        average_precision(scores, positive, ignore=ignore, method="raw"))
    assert [len(a) for a in precision_recall(scores, np.zeros(60, bool))] == [0, 0]
