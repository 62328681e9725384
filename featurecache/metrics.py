"""Average precision over images, per class and for many bootstrap resamples at once.

Average precision (:func:`average_precision`), per class, ignoring the images whose only
objects of the class are ``difficult``:

* ``"voc07"``: the VOC 2007 11-point interpolated AP, mean over recall t ∈ {0, 0.1, …, 1} of
  the best precision at recall ≥ t;
* ``"all"``: VOC 2010 and later: area under the interpolated precision/recall curve
  (precision made monotone from the right), at every recall step;
* ``"raw"``: area under the uninterpolated curve, Σ (R_n − R_{n−1}) P_n, which is what
  ``sklearn.metrics.average_precision_score`` computes.

Tied scores are taken together as one threshold (so the result never depends on the
order of ties). mAP is the mean over classes with at least one positive image.

Every AP here is computed by one function of *weighted* images: an image counted w times
(w = 0: left out). A bootstrap resample of images is such a weighting (how often each
image was drawn), so :func:`bootstrap_map` computes the AP of a thousand resamples with
one sort per class, and gives exactly the AP of the resampled list.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from featurecache.errors import EvalError

__all__ = ["METHODS", "average_precision", "bootstrap_map", "bootstrap_weights", "image_folds", "interval", "mean_ap",
           "per_class_ap", "precision_recall"]

METHODS = ("voc07", "all", "raw")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise EvalError(f"must be one of {', '.join(METHODS)}, got {method!r}", param="method")


def _weighted_ap(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray, method: str) -> np.ndarray:
    """AP of one class under each row of ``weights`` (B, M): ``(B,)``, NaN where no positive has weight."""
    if len(scores) == 0:
        return np.full(len(weights), np.nan)
    bad = int(np.count_nonzero(~np.isfinite(scores)))
    if bad:  # NaN sorts anywhere: an AP of such scores would be a number that means nothing
        raise EvalError(f"{bad} of {len(scores)} scores are NaN or infinite, so no AP is computed; the head gives no "
                        "usable scores for these features (a training that diverged, or features that are not finite)")
    order = np.argsort(-scores, kind="stable")
    s, pos, w = scores[order], positive[order], weights[:, order].astype(np.float64)
    # The end of each run of tied scores is one threshold.
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    tp = np.cumsum(w * pos, axis=1)[:, last]
    fp = np.cumsum(w * ~pos, axis=1)[:, last]
    n_pos = tp[:, -1:] if len(last) else np.zeros((len(w), 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rec = tp / n_pos
        prec = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-300), 0.0)
    if method == "voc07":
        ap = np.mean([np.where(rec >= t, prec, -np.inf).max(axis=1).clip(min=0.0) for t in np.linspace(0, 1, 11)],
                     axis=0)
    elif method == "raw":
        ap = np.sum(np.diff(np.concatenate([np.zeros((len(w), 1)), rec], axis=1), axis=1) * prec, axis=1)
    else:
        mrec = np.concatenate([np.zeros((len(w), 1)), rec, np.ones((len(w), 1))], axis=1)
        mpre = np.concatenate([np.zeros((len(w), 1)), prec, np.zeros((len(w), 1))], axis=1)
        mpre = np.maximum.accumulate(mpre[:, ::-1], axis=1)[:, ::-1]
        step = np.diff(mrec, axis=1)
        ap = np.sum(np.where(step != 0, step * mpre[:, 1:], 0.0), axis=1)
    return np.where(n_pos[:, 0] > 0, ap, np.nan)


def average_precision(scores: np.ndarray, positive: np.ndarray, *, ignore: Optional[np.ndarray] = None,
                      method: str = "voc07") -> float:
    """Average precision of one class over images (see the module docstring).

    Parameters
    ----------
    scores : ndarray (M,)
    positive : ndarray (M,), bool
    ignore : ndarray (M,), bool, optional
        Images left out (e.g. only difficult objects of the class).
    method : {"voc07", "all", "raw"}

    Returns
    -------
    float
        In [0, 1]; NaN when there is no positive.
    """
    _check_method(method)
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    keep = np.ones(len(s)) if ignore is None else (~np.asarray(ignore, dtype=bool)).astype(np.float64)
    return float(_weighted_ap(s, pos, keep[None, :], method)[0])


def per_class_ap(scores: np.ndarray, labels: np.ndarray, difficult: Optional[np.ndarray] = None, *,
                 method: str = "voc07") -> tuple:
    """AP of every class: returns ``(ap (C,), positives (C,))``; AP is NaN without positives."""
    labels = np.asarray(labels, dtype=bool)
    difficult = np.zeros_like(labels) if difficult is None else np.asarray(difficult, dtype=bool)
    ap = np.array([average_precision(scores[:, c], labels[:, c], ignore=difficult[:, c] & ~labels[:, c],
                                     method=method) for c in range(labels.shape[1])])
    return ap, labels.sum(axis=0)


def precision_recall(scores: np.ndarray, positive: np.ndarray, *, ignore: Optional[np.ndarray] = None) -> tuple:
    """``(precision, recall)`` of one class at every score threshold, images in ``ignore`` left out.

    The curve whose area :func:`average_precision` measures: ranks by falling score; ties
    form one step. Empty arrays when there is no positive.
    """
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    if ignore is not None:
        keep = ~np.asarray(ignore, dtype=bool)
        s, pos = s[keep], pos[keep]
    if not pos.any():
        return np.zeros(0), np.zeros(0)
    order = np.argsort(-s, kind="stable")
    s, pos = s[order], pos[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the end of each run of equal scores
    tp = np.cumsum(pos)[last]
    return tp / (last + 1.0), tp / pos.sum()


def bootstrap_weights(n_images: int, n_boot: int, rng: np.random.RandomState) -> np.ndarray:
    """``(n_boot, n_images)`` draw counts: each row resamples ``n_images`` images with replacement."""
    return rng.multinomial(n_images, np.full(n_images, 1.0 / max(n_images, 1)), size=n_boot).astype(np.float64)


def bootstrap_map(scores: np.ndarray, labels: np.ndarray, difficult: Optional[np.ndarray], weights: np.ndarray, *,
                  method: str = "voc07") -> np.ndarray:
    """mAP of each bootstrap resample of the images: ``(B,)``.

    Parameters
    ----------
    scores : ndarray (M, C)
    labels, difficult : ndarray (M, C), bool
    weights : ndarray (B, M)
        How often each image is drawn in each resample (:func:`bootstrap_weights`). Two
        score matrices of the same images under the same weights are a *paired* resample.
    method : {"voc07", "all", "raw"}

    Returns
    -------
    ndarray (B,)
        Mean over the classes with a positive in the resample (NaN if none has).
    """
    _check_method(method)
    labels = np.asarray(labels, dtype=bool)
    difficult = np.zeros_like(labels) if difficult is None else np.asarray(difficult, dtype=bool)
    per_class = np.stack([_weighted_ap(np.asarray(scores[:, c], np.float64), labels[:, c],
                                       weights * ~(difficult[:, c] & ~labels[:, c]), method)
                          for c in range(labels.shape[1])], axis=1)
    counted = ~np.isnan(per_class)
    total = np.where(counted, per_class, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counted.any(axis=1), total / counted.sum(axis=1), np.nan)


def interval(samples: Sequence[float], level: float = 0.95, *, center: Optional[float] = None) -> tuple:
    """The central ``level`` percentile interval of bootstrap samples (NaNs dropped).

    With ``center`` (the value measured on the data themselves) the interval is the spread
    of the samples around their mean, placed around ``center``. Resampling images biases AP
    upwards when classes have few positive images (a resample without a class's positives
    drops the class), so raw percentiles can miss the measured value altogether; the spread
    is what the bootstrap estimates well.
    """
    s = np.asarray(samples, dtype=np.float64)
    s = s[~np.isnan(s)]
    if not len(s):
        return float("nan"), float("nan")
    lo, hi = np.percentile(s, [50 * (1 - level), 50 * (1 + level)])
    if center is not None:
        lo, hi = center + lo - s.mean(), center + hi - s.mean()
    return float(lo), float(hi)


def mean_ap(scores: np.ndarray, labels: np.ndarray, difficult: Optional[np.ndarray] = None, *,
            method: str = "voc07") -> float:
    """mAP: the mean AP over the classes with a positive image (NaN if none has)."""
    ap, _ = per_class_ap(scores, labels, difficult, method=method)
    return float(np.nanmean(ap)) if (~np.isnan(ap)).any() else float("nan")


def image_folds(n_images: int, folds: int, seed: int) -> list:
    """K-fold cross-validation over images: ``(training positions, evaluation positions)`` per fold.

    Images are shuffled with ``seed`` and cut into ``folds`` parts of near-equal size; each
    image is evaluated in exactly one fold, and a patch never is on both sides of a fold.
    """
    order = np.random.RandomState(seed).permutation(n_images)
    parts = np.array_split(order, folds)
    return [(np.sort(np.concatenate([q for j, q in enumerate(parts) if j != i])), np.sort(p))
            for i, p in enumerate(parts)]
