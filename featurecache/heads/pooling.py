"""From patches to images: pooling patch scores into image scores, and patch features into image features.

Image score of class C over the M patches of an image (ambiguous ones included), as in
Oquab et al. (2014): ``pooling="power"``: (1/M) Σ_i y(C|P_i)^k (default k = 5);
``"max"``: max_i y(C|P_i); ``"mean"``: the power mean with k = 1.

Image features (the ``image`` objective): ``mean``/``max`` over all patches of an image;
``scales``: the mean at each scale, concatenated (coarse to fine); ``coarse``: the mean at
the image's smallest λ (the largest patches; the whole image for ``--whole-image`` caches).

Numpy only: the command line reads the names defined here without importing torch.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from featurecache.errors import HeadError

__all__ = ["IMAGE_POOLINGS", "SCORE_POOLINGS", "image_features", "pool_image_features", "pool_scores"]

#: How patch scores become image scores (``eval --pooling``).
SCORE_POOLINGS = ("power", "max", "mean")

#: How patch features become image features (``fit --image-pooling``).
IMAGE_POOLINGS = ("mean", "max", "scales", "coarse")


def pool_scores(probs: np.ndarray, image_index: np.ndarray, n_images: int, *, pooling: str = "power",
                k: float = 5.0) -> np.ndarray:
    """Aggregate patch class probabilities into image scores.

    Parameters
    ----------
    probs : ndarray (N, 1 + C)
        Head outputs: background, then the C classes.
    image_index : ndarray (N,)
        Image of each patch, in ``0 .. n_images - 1``.
    n_images : int
    pooling : {"power", "max", "mean"}
    k : float
        Exponent of the power mean.

    Returns
    -------
    ndarray (n_images, C)
        Images without patches score 0.
    """
    if pooling not in SCORE_POOLINGS:
        raise HeadError(f"must be one of {', '.join(SCORE_POOLINGS)}, got {pooling!r}", param="pooling")
    p = np.asarray(probs, dtype=np.float64)[:, 1:]
    idx = np.asarray(image_index, dtype=np.int64)
    out = np.zeros((n_images, p.shape[1]))
    if pooling == "max":
        out[:] = -np.inf
        np.maximum.at(out, idx, p)
        out[np.isinf(out)] = 0.0
        return out
    power = 1.0 if pooling == "mean" else float(k)
    np.add.at(out, idx, p ** power)
    counts = np.bincount(idx, minlength=n_images).astype(np.float64)
    return out / np.maximum(counts, 1)[:, None]


def check_image_pooling(pooling: Sequence[str]) -> tuple:
    """``pooling`` as a tuple of names from :data:`IMAGE_POOLINGS`, or a :class:`HeadError`."""
    pooling = tuple(pooling)
    bad = [p for p in pooling if p not in IMAGE_POOLINGS]
    if bad or not pooling:
        raise HeadError(f"must be among {', '.join(IMAGE_POOLINGS)}, got {list(pooling)}", param="image_pooling")
    return pooling


class _Pooler:
    """Running per-image sums / maxima / per-scale sums, fed chunk by chunk."""

    def __init__(self, n_images: int, dim: int, levels: np.ndarray, pooling: tuple) -> None:
        self.pooling, self.levels = pooling, levels
        m, n_levels = n_images, len(levels)
        self.want_max = "max" in pooling
        self.want_levels = "scales" in pooling or "coarse" in pooling
        self.sums = np.zeros((m, dim))
        self.maxs = np.full((m, dim) if self.want_max else (0, dim), -np.inf)
        # Per-scale sums are M x scales x D: only when asked for.
        self.level_sums = np.zeros((m, n_levels, dim) if self.want_levels else (0, n_levels, dim))
        self.level_counts = np.zeros((m, n_levels))

    def add(self, features: np.ndarray, local: np.ndarray, scales: np.ndarray) -> None:
        f = np.asarray(features, np.float64)
        lev = np.searchsorted(self.levels, scales)
        np.add.at(self.sums, local, f)
        if self.want_max:
            np.maximum.at(self.maxs, local, f)
        if self.want_levels:
            np.add.at(self.level_sums, (local, lev), f)
        np.add.at(self.level_counts, (local, lev), 1)

    def result(self) -> np.ndarray:
        m = len(self.sums)
        counts = np.maximum(self.level_counts.sum(1), 1)[:, None]
        parts = []
        for p in self.pooling:
            if p == "mean":
                parts.append(self.sums / counts)
            elif p == "max":
                parts.append(np.where(np.isfinite(self.maxs), self.maxs, 0.0))
            elif p == "scales":
                parts.append((self.level_sums / np.maximum(self.level_counts, 1)[:, :, None]).reshape(m, -1))
            else:  # coarse: the smallest λ each image has
                first = np.argmax(self.level_counts > 0, axis=1)
                parts.append(self.level_sums[np.arange(m), first]
                             / np.maximum(self.level_counts[np.arange(m), first], 1)[:, None])
        return np.concatenate(parts, axis=1).astype(np.float32)


def pool_image_features(X: np.ndarray, image_index: np.ndarray, n_images: int, *, scales: np.ndarray,
                        pooling: Sequence[str] = ("mean",), levels: Optional[np.ndarray] = None) -> np.ndarray:
    """Pool in-memory patch features into one vector per image (see :func:`image_features`).

    Parameters
    ----------
    X : ndarray (N, D)
    image_index : ndarray (N,)
        Image of each patch, in ``0 .. n_images - 1``.
    n_images : int
    scales : ndarray (N,)
        λ of each patch.
    pooling : sequence of str
    levels : ndarray, optional
        The scales ``scales`` pooling lays out (default: those present).

    Returns
    -------
    ndarray (n_images, D · n), float32
    """
    pooling = check_image_pooling(pooling)
    levels = np.unique(scales) if levels is None else np.asarray(levels)
    pool = _Pooler(n_images, X.shape[1], levels, pooling)
    pool.add(X, np.asarray(image_index), np.asarray(scales))
    return pool.result()


def image_features(cache, *, pooling: Sequence[str] = ("mean",), chunk_size: int = 65536) -> np.ndarray:
    """Pool each selected image's patch features into one vector.

    Parameters
    ----------
    cache : FeatureCache or MemoryCache
        An in-memory cache pools all its images once per ``pooling`` and serves its
        selections from that (cross-validation folds pool once, not once per fold).
    pooling : sequence of str
        Names from :data:`IMAGE_POOLINGS`; their vectors are concatenated in this order.
    chunk_size : int
        Patches read at a time (memory stays bounded by the per-image sums).

    Returns
    -------
    ndarray (M, D · n), float32
        One row per selected image, in the order of ``cache.images``.
    """
    pooling = check_image_pooling(pooling)
    memo = getattr(cache, "memo", None)
    if memo is not None:
        root, positions = memo
        key = ("image_features", pooling)
        if key not in root:
            whole = cache.root()
            root[key] = _pool_cache(whole, pooling, chunk_size)
        return root[key][positions]
    return _pool_cache(cache, pooling, chunk_size)


def _pool_cache(cache, pooling: tuple, chunk_size: int) -> np.ndarray:
    t = cache.images
    scales_all = cache.scales
    pool = _Pooler(len(t), cache.feature_dim, np.unique(scales_all), pooling)
    local_all = np.searchsorted(t.row, cache.image_index)
    start = 0
    for ch in cache.iter_chunks(chunk_size):
        n = len(ch.indices)
        pool.add(ch.features, local_all[start:start + n], scales_all[start:start + n])
        start += n
    return pool.result()
