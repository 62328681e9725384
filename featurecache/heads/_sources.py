"""Where training data comes from: patches in memory or left in HDF5, bags of patches per image, epoch order."""

from __future__ import annotations

import logging
from typing import Iterator, Optional, Sequence

import numpy as np

from featurecache.cache import read_rows
from featurecache.patches import AMBIGUOUS
from featurecache.resources import memory_budget

logger = logging.getLogger(__name__)

__all__ = ["ArraySource", "BagSource", "StreamSource", "batches", "epoch_order"]


def epoch_order(n: int, rng: np.random.RandomState, *, block: int = 8192,
                buffer_blocks: int = 8) -> Iterator[np.ndarray]:
    """Positions ``0..n-1`` in one epoch's order, as buffers of shuffled blocks.

    The positions are cut into contiguous blocks; the blocks are visited in random order,
    ``buffer_blocks`` at a time, and each such buffer is shuffled. From HDF5 this reads
    contiguous runs only, with memory bounded by one buffer; data up to ``block *
    buffer_blocks`` rows get a full shuffle. In-memory and streaming training use the same
    order, hence give the same model.
    """
    starts = list(range(0, n, block))
    order = rng.permutation(len(starts))
    for g in range(0, len(order), buffer_blocks):
        pos = np.concatenate([np.arange(starts[b], min(starts[b] + block, n)) for b in order[g:g + buffer_blocks]])
        yield pos[rng.permutation(len(pos))]


class ArraySource:
    """Training patches in memory: features ``(n, d)`` (or rows ``index`` of a larger array), labels, weights."""

    streaming = False

    def __init__(self, X: np.ndarray, y: np.ndarray, w: np.ndarray, index: Optional[np.ndarray] = None) -> None:
        self.X, self.y, self.w, self.index = X, y, w, index

    def __len__(self) -> int:
        return len(self.y)

    @property
    def n_features(self) -> int:
        return self.X.shape[1]

    def buffer(self, pos: np.ndarray) -> np.ndarray:
        rows = pos if self.index is None else self.index[pos]
        return np.asarray(self.X[rows], dtype=np.float32)

    def matrix(self) -> np.ndarray:
        """All rows, for estimators that need them at once."""
        return self.buffer(np.arange(len(self.y)))


class StreamSource:
    """Training patches left in a features array on disk (HDF5): file rows ``rows`` (sorted)."""

    streaming = True

    def __init__(self, dataset, rows: np.ndarray, y: np.ndarray, w: np.ndarray) -> None:
        self.ds, self.rows, self.y, self.w = dataset, rows, y, w

    def __len__(self) -> int:
        return len(self.y)

    @property
    def n_features(self) -> int:
        return self.ds.shape[1]

    def buffer(self, pos: np.ndarray) -> np.ndarray:
        return _read_unsorted(self.ds, self.rows[pos])


def _read_unsorted(ds, file_rows: np.ndarray) -> np.ndarray:
    """Rows of ``ds`` in the given (any) order, as float32, read in file order."""
    order = np.argsort(file_rows, kind="stable")
    out = np.empty((len(file_rows), ds.shape[1]), np.float32)
    out[order] = read_rows(ds, file_rows[order])
    return out


def batches(source, rng: np.random.RandomState, batch_size: int) -> Iterator[tuple]:
    """One epoch of ``(X, y, w)`` mini-batches in :func:`epoch_order`."""
    for pos in epoch_order(len(source), rng):
        X = source.buffer(pos)
        y, w = source.y[pos], source.w[pos]
        for s in range(0, len(pos), batch_size):
            yield X[s:s + batch_size], y[s:s + batch_size], w[s:s + batch_size]


def patch_source(cache, keep: np.ndarray, y: np.ndarray, w: np.ndarray, *, memory_limit: Optional[int] = None):
    """The patches at positions ``keep`` of a cache's selection: in memory if they fit the budget, else streamed."""
    rows = cache.indices[keep]
    if len(keep) * cache.feature_dim * 4 <= memory_budget(memory_limit):
        return ArraySource(cache.read_features(rows), y, w)
    return StreamSource(cache.features, rows, y, w)


class BagSource:
    """Patch features grouped by image ("bags"), in memory or left in an HDF5 dataset.

    Parameters
    ----------
    features : ndarray (N, D) or h5py.Dataset
        In memory: the patches themselves. On disk: the whole features dataset, with ``rows``.
    image_index : ndarray (N,)
        Image of each patch, in ``0 .. n_images - 1``.
    n_images : int
    rows : ndarray (N,), optional
        File row of each patch when ``features`` is on disk (sorted within an image).
    patch_labels : ndarray (N,), optional
        Box-derived labels (:mod:`featurecache.patches` encoding), for the hybrid objective.
    patch_weights : ndarray (N,), optional
        Weight of each patch in the patch loss (0: not used).
    """

    def __init__(self, features, image_index: np.ndarray, n_images: int, *, rows: Optional[np.ndarray] = None,
                 patch_labels: Optional[np.ndarray] = None, patch_weights: Optional[np.ndarray] = None) -> None:
        self.features, self.rows = features, rows
        self.patch_labels, self.patch_weights = patch_labels, patch_weights
        image_index = np.asarray(image_index, np.int64)
        order = np.argsort(image_index, kind="stable")
        bounds = np.searchsorted(image_index[order], np.arange(n_images + 1))
        self.groups = [order[bounds[i]:bounds[i + 1]] for i in range(n_images)]

    @classmethod
    def from_cache(cls, cache, *, memory_limit: Optional[int] = None, patch_labels: Optional[np.ndarray] = None,
                   patch_weights: Optional[np.ndarray] = None) -> "BagSource":
        """The selected images of a cache: features read into memory if they fit ``memory_limit``
        bytes (default half the available memory), else read image batch by image batch."""
        t = cache.images
        local = np.searchsorted(t.row, cache.image_index)
        need = cache.num_patches * cache.feature_dim * 4
        if need <= memory_budget(memory_limit):
            return cls(cache.read_features(), local, len(t), patch_labels=patch_labels, patch_weights=patch_weights)
        logger.info("%s: %.1f GiB of features exceed the memory limit; reading them per batch of images",
                    cache.path, need / 2**30)
        return cls(cache.features, local, len(t), rows=cache.indices, patch_labels=patch_labels,
                   patch_weights=patch_weights)

    @property
    def n_images(self) -> int:
        return len(self.groups)

    @property
    def n_features(self) -> int:
        return int(self.features.shape[1])

    @property
    def streaming(self) -> bool:
        return self.rows is not None

    def sizes(self) -> np.ndarray:
        return np.array([len(g) for g in self.groups])

    def _read(self, pos: np.ndarray) -> np.ndarray:
        if self.rows is None:
            return np.asarray(self.features[pos], np.float32)
        return _read_unsorted(self.features, self.rows[pos])

    def batch(self, images: Sequence[int]) -> tuple:
        """``(x (B, P, D), mask (B, P), labels (B, P) or None, weights (B, P) or None)`` for the images, padded."""
        groups = [self.groups[i] for i in images]
        n = max((len(g) for g in groups), default=0)
        pos = np.concatenate(groups) if groups else np.zeros(0, np.int64)
        feats = self._read(pos)
        x = np.zeros((len(groups), n, self.n_features), np.float32)
        mask = np.zeros((len(groups), n), bool)
        lab = np.full((len(groups), n), AMBIGUOUS, np.int64) if self.patch_labels is not None else None
        w = np.zeros((len(groups), n), np.float32) if self.patch_weights is not None else None
        s = 0
        for b, g in enumerate(groups):
            x[b, :len(g)] = feats[s:s + len(g)]
            mask[b, :len(g)] = True
            if lab is not None:
                lab[b, :len(g)] = self.patch_labels[g]
            if w is not None:
                w[b, :len(g)] = self.patch_weights[g]
            s += len(g)
        return x, mask, lab, w
