"""From patches to images: pooling patch scores into image scores, and patch features into image features.

Image score of class C over the M patches of an image (ambiguous ones included), as in
Oquab et al. (2014): ``pooling="power"``: (1/M) Σ_i y(C|P_i)^k (default k = 5,
:data:`DEFAULT_POWER`);
``"max"``: max_i y(C|P_i); ``"mean"``: the power mean with k = 1.

Image features (the ``image`` objective): ``mean``/``max`` over all patches of an image;
``scales``: the mean at each scale, concatenated (coarse to fine); ``coarse``: the mean at
the image's smallest λ (the largest patches; the whole image for ``--whole-image`` caches).

Numpy only: the command line reads the names defined here without importing torch.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from featurecache.errors import HeadError

__all__ = ["DEFAULT_POWER", "IMAGE_POOLINGS", "SCORE_POOLINGS", "ScorePooler", "image_features", "pool_chunks",
           "pool_image_features", "pool_scores", "pooling_key"]

#: The exponent k of the power pooling unless told otherwise (``eval --k``, the mil aggregation ``power``).
DEFAULT_POWER = 5.0

#: How patch scores become image scores (``eval --pooling``).
SCORE_POOLINGS = ("power", "max", "mean")

#: How patch features become image features (``fit --image-pooling``).
IMAGE_POOLINGS = ("mean", "max", "scales", "coarse")


def pool_scores(probs: np.ndarray, image_index: np.ndarray, n_images: int, *, pooling: str = "power",
                k: float = DEFAULT_POWER) -> np.ndarray:
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
    pooler = ScorePooler(n_images, np.shape(probs)[1] - 1, pooling=pooling, k=k)
    pooler.add(probs, image_index)
    return pooler.result()


def pooling_key(pooling: Optional[str] = None, k: Optional[float] = None) -> tuple:
    """``(pooling, k)`` with the defaults filled in: ``power`` and :data:`DEFAULT_POWER`."""
    return pooling or "power", DEFAULT_POWER if k is None else k


def pool_chunks(chunks: Iterator[tuple], n_images: int, n_classes: int, keys: Iterable[tuple], *,
                each: Optional[Callable] = None) -> dict:
    """Image scores for every ``(pooling, k)`` of ``keys`` from one pass over chunks, none of them kept.

    Parameters
    ----------
    chunks : iterator of tuple
        ``(probabilities (n, 1 + C), image of each patch, patch labels)``; closed at the end.
    n_images, n_classes : int
    keys : iterable of (str, float)
    each : callable, optional
        ``each(probabilities, labels)`` sees every chunk (a patch report's counts).

    Returns
    -------
    dict
        ``(pooling, k)`` -> image scores ``(n_images, C)``.
    """
    poolers = {key: ScorePooler(n_images, n_classes, pooling=key[0], k=key[1]) for key in set(keys)}
    with contextlib.closing(chunks):
        for probs, local, labels in chunks:
            for pooler in poolers.values():
                pooler.add(probs, local)
            if each is not None:
                each(probs, labels)
    return {key: p.result() for key, p in poolers.items()}


class ScorePooler:
    """Image scores from patch probabilities fed chunk by chunk (memory: one number per image and class).

    Parameters
    ----------
    n_images, n_classes : int
    pooling : {"power", "max", "mean"}
    k : float
        Exponent of the power mean.
    """

    def __init__(self, n_images: int, n_classes: int, *, pooling: str = "power", k: float = DEFAULT_POWER) -> None:
        if pooling not in SCORE_POOLINGS:
            raise HeadError(f"must be one of {', '.join(SCORE_POOLINGS)}, got {pooling!r}", param="pooling")
        self.pooling, self.power = pooling, 1.0 if pooling == "mean" else float(k)
        self.totals = np.full((n_images, n_classes), -np.inf if pooling == "max" else 0.0)
        self.counts = np.zeros(n_images)

    def add(self, probs: np.ndarray, image_index: np.ndarray) -> None:
        """Take the probabilities ``(n, 1 + C)`` of patches of images ``image_index`` ``(n,)``."""
        p = np.asarray(probs, dtype=np.float64)[:, 1:]
        idx = np.asarray(image_index, dtype=np.int64)
        if self.pooling == "max":
            np.maximum.at(self.totals, idx, p)
        else:
            np.add.at(self.totals, idx, p ** self.power)
        self.counts += np.bincount(idx, minlength=len(self.counts))

    def result(self) -> np.ndarray:
        """Image scores ``(n_images, C)``; images without patches score 0."""
        if self.pooling == "max":
            return np.where(np.isinf(self.totals), 0.0, self.totals)
        return self.totals / np.maximum(self.counts, 1)[:, None]


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
        import torch  # here: the command line reads this module's names without loading torch

        images, inverse = np.unique(np.asarray(local, np.int64), return_inverse=True)
        lev = np.searchsorted(self.levels, scales)
        # A chunk is summed in float32 by torch (index_add_, several times faster than np.add.at;
        # float16 features are converted on the way), then added to float64 totals.
        f = torch.from_numpy(np.ascontiguousarray(features)).float()
        idx = torch.from_numpy(inverse)
        self.sums[images] += torch.zeros((len(images), f.shape[1])).index_add_(0, idx, f).double().numpy()
        if self.want_max:
            part = torch.full((len(images), f.shape[1]), -np.inf).scatter_reduce_(
                0, idx[:, None].expand_as(f), f, "amax")
            self.maxs[images] = np.maximum(self.maxs[images], part.double().numpy())
        if self.want_levels:
            key = torch.from_numpy(inverse * len(self.levels) + lev)
            part = torch.zeros((len(images) * len(self.levels), f.shape[1])).index_add_(0, key, f)
            self.level_sums[images] += part.double().numpy().reshape(len(images), len(self.levels), -1)
        np.add.at(self.level_counts, (np.asarray(local), lev), 1)

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
        A cache pools all the images of the reader it was selected from once per
        ``pooling`` and serves its selections from that (cross-validation folds pool once,
        not once per fold).
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
            try:
                root[key] = _pool_cache(whole, pooling, chunk_size)
            finally:
                whole.close()  # a reader opened for this (FeatureCache.root); nothing for a MemoryCache
        return root[key][positions]
    return _pool_cache(cache, pooling, chunk_size)


def _pool_cache(cache, pooling: tuple, chunk_size: int) -> np.ndarray:
    t = cache.images
    scales_all = cache.scales
    pool = _Pooler(len(t), cache.feature_dim, np.unique(scales_all), pooling)
    local_all = np.searchsorted(t.row, cache.image_index)
    start = 0
    with contextlib.closing(cache.iter_chunks(chunk_size, dtype=None)) as chunks:  # as stored: torch converts
        for ch in chunks:
            n = len(ch.indices)
            pool.add(ch.features, local_all[start:start + n], scales_all[start:start + n])
            start += n
    return pool.result()
