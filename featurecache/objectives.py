"""Image-level objectives on patch caches: pooled patch features and a one-vs-rest image head.

The paper's objective (``patch``) trains a patch classifier on box-derived patch labels.
The ``image`` objective needs no boxes: each image's patch features are pooled into one
vector (:func:`image_features`) and a one-vs-rest logistic regression is trained on the
images' multi-hot labels (:class:`ImageLogRegHead`); its outputs are image scores directly.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator

from featurecache.cache import FeatureCache
from featurecache.errors import FeaturecacheError

__all__ = ["IMAGE_POOLINGS", "ImageLogRegHead", "fit_image_head", "image_features"]

#: ``mean``/``max`` over all patches of an image; ``scales``: the mean at each scale,
#: concatenated (coarse to fine); ``coarse``: the mean at the image's smallest λ (the largest
#: patches; the whole image for ``--whole-image`` caches).
IMAGE_POOLINGS = ("mean", "max", "scales", "coarse")


def image_features(cache: FeatureCache, *, pooling: Sequence[str] = ("mean",), chunk_size: int = 65536) -> np.ndarray:
    """Pool each selected image's patch features into one vector.

    Parameters
    ----------
    cache : FeatureCache
    pooling : sequence of str
        Names from :data:`IMAGE_POOLINGS`; their vectors are concatenated in this order.
    chunk_size : int
        Patches read at a time (memory stays bounded by the per-image sums).

    Returns
    -------
    ndarray (M, D · n), float32
        One row per selected image, in the order of ``cache.images``.
    """
    bad = [p for p in pooling if p not in IMAGE_POOLINGS]
    if bad or not pooling:
        raise FeaturecacheError(f"image pooling must be among {', '.join(IMAGE_POOLINGS)}, got {list(pooling)}")
    t = cache.images
    m, d = len(t), cache.feature_dim
    scales_all = cache.scales
    levels = np.unique(scales_all)
    n_levels = len(levels)
    sums = np.zeros((m, d))
    maxs = np.full((m, d), -np.inf)
    level_sums = np.zeros((m, n_levels, d))
    level_counts = np.zeros((m, n_levels))
    local_all = np.searchsorted(t.row, cache.image_index)
    start = 0
    for ch in cache.iter_chunks(chunk_size):
        n = len(ch.indices)
        local = local_all[start:start + n]
        lev = np.searchsorted(levels, scales_all[start:start + n])
        start += n
        f = ch.features.astype(np.float64)
        np.add.at(sums, local, f)
        np.maximum.at(maxs, local, f)
        np.add.at(level_sums, (local, lev), f)
        np.add.at(level_counts, (local, lev), 1)
    counts = np.maximum(level_counts.sum(1), 1)[:, None]
    parts = []
    for p in pooling:
        if p == "mean":
            parts.append(sums / counts)
        elif p == "max":
            parts.append(np.where(np.isfinite(maxs), maxs, 0.0))
        elif p == "scales":
            parts.append((level_sums / np.maximum(level_counts, 1)[:, :, None]).reshape(m, -1))
        else:  # coarse: the smallest λ each image has
            first = np.argmax(level_counts > 0, axis=1)
            parts.append(level_sums[np.arange(m), first] / np.maximum(level_counts[np.arange(m), first], 1)[:, None])
    return np.concatenate(parts, axis=1).astype(np.float32)


class ImageLogRegHead(BaseEstimator):
    """One-vs-rest logistic regression on pooled image features and multi-hot labels.

    Parameters
    ----------
    C : float
        Inverse L2 strength of each binary problem. Default 1.0.
    max_iter : int
    pooling : tuple of str
        Which :func:`image_features` the head was trained on (kept with the head).
    random_state : int, optional

    Attributes
    ----------
    coef_ : ndarray (C, D)
    intercept_ : ndarray (C,)
        ``-inf`` for a class with no positive (or no negative) training image: it scores 0
        (or 1) everywhere.
    """

    def __init__(self, C: float = 1.0, max_iter: int = 2000, pooling: tuple = ("mean",),
                 random_state: Optional[int] = 0) -> None:
        self.C = C
        self.max_iter = max_iter
        self.pooling = pooling
        self.random_state = random_state

    def fit(self, X: np.ndarray, Y: np.ndarray, ignore: Optional[np.ndarray] = None) -> "ImageLogRegHead":
        """Fit one binary logistic regression per class.

        Parameters
        ----------
        X : ndarray (M, D)
        Y : ndarray (M, C), bool
        ignore : ndarray (M, C), bool, optional
            Images left out of a class's problem (VOC ``difficult``-only).
        """
        from sklearn.linear_model import LogisticRegression

        X = np.asarray(X, dtype=np.float64)
        Y = np.asarray(Y, dtype=bool)
        ignore = np.zeros_like(Y) if ignore is None else np.asarray(ignore, bool)
        coef = np.zeros((Y.shape[1], X.shape[1]))
        intercept = np.full(Y.shape[1], -np.inf)
        for c in range(Y.shape[1]):
            keep = ~ignore[:, c]
            y = Y[keep, c]
            if y.all():
                intercept[c] = np.inf
                continue
            if not y.any():
                continue
            model = LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.random_state)
            model.fit(X[keep], y)
            coef[c], intercept[c] = model.coef_[0], model.intercept_[0]
        self.coef_, self.intercept_ = coef, intercept
        self.n_features_in_, self.n_outputs_ = X.shape[1], Y.shape[1]
        return self

    def image_scores(self, X: np.ndarray) -> np.ndarray:
        """Per-class probabilities ``(M, C)``."""
        z = np.asarray(X, dtype=np.float64) @ self.coef_.T + self.intercept_
        with np.errstate(over="ignore", invalid="ignore"):
            p = 1.0 / (1.0 + np.exp(-z))
        return np.nan_to_num(p, nan=0.0).astype(np.float32)

    def _state(self) -> dict:
        return {"coef": torch.from_numpy(self.coef_.copy()), "intercept": torch.from_numpy(self.intercept_.copy())}

    def _restore(self, state: dict, n_features: int, n_outputs: int) -> None:
        self.coef_ = state["coef"].numpy().astype(np.float64)
        self.intercept_ = state["intercept"].numpy().astype(np.float64)
        self.n_features_in_, self.n_outputs_ = n_features, n_outputs


def fit_image_head(cache, *, train_split: Optional[str] = None, pooling: Sequence[str] = ("mean",), C: float = 1.0,
                   random_state: int = 0):
    """Train the ``image`` objective on a cache: pooled features, one-vs-rest logistic regression.

    Parameters
    ----------
    cache : path or FeatureCache
    train_split : str, optional
    pooling : sequence of str
        See :data:`IMAGE_POOLINGS`.
    C : float
    random_state : int

    Returns
    -------
    TrainedHead
        With ``summary["objective"] == "image"``; :func:`featurecache.evaluate.evaluate`
        scores images with it directly.
    """
    import time

    from featurecache.heads import TrainedHead

    t0 = time.perf_counter()
    own = not isinstance(cache, FeatureCache)
    c = FeatureCache(cache, split=train_split) if own or train_split else cache
    try:
        X = image_features(c, pooling=pooling)
        t = c.images
        est = ImageLogRegHead(C=C, pooling=tuple(pooling), random_state=random_state).fit(
            X, t.labels, ignore=t.difficult & ~t.labels)
        summary = {"objective": "image", "cache": str(c.path), "train_split": train_split,
                   "train_images": int(len(t)), "image_pooling": list(pooling),
                   "images_per_class": {n: int(k) for n, k in zip(c.classes, t.labels.sum(0))},
                   "seconds": time.perf_counter() - t0}
        return TrainedHead(est, "image-logreg", tuple(c.classes), dict(c.feature_settings), c.fingerprint, summary)
    finally:
        if c is not cache:
            c.close()
