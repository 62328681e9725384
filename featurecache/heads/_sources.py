"""Where training data comes from: patches in memory or left in HDF5, bags of patches per image, epoch order."""

from __future__ import annotations

import logging
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from featurecache.cache import read_rows
from featurecache.patches import AMBIGUOUS
from featurecache.prefetch import ahead
from featurecache.resources import features_bytes, memory_budget

logger = logging.getLogger(__name__)

__all__ = ["ArraySource", "BagSource", "StreamSource", "batches", "epoch_order", "patch_source", "sequential"]


#: Rows of a shuffle block, and blocks per window: an epoch visits windows of 8 random blocks,
#: each window shuffled. Fixed, so that a model does not depend on the memory limit or on
#: whether its data were streamed (tested).
BLOCK_ROWS = 8192
WINDOW_BLOCKS = 8


def epoch_order(n: int, rng: np.random.RandomState, *, block: int = BLOCK_ROWS,
                buffer_blocks: int = WINDOW_BLOCKS) -> Iterator[tuple]:
    """One epoch's order of positions ``0..n-1``, as windows of shuffled blocks.

    The positions are cut into contiguous blocks; the blocks are visited in random order,
    ``buffer_blocks`` at a time, and each such window is shuffled. From HDF5 this reads
    contiguous runs only, with memory bounded by a window; data up to ``block *
    buffer_blocks`` rows get a full shuffle. In-memory and streaming training use the same
    order, hence give the same model.

    Yields
    ------
    ranges : list of (start, stop)
        The window's blocks, in the order their rows are laid out in the window.
    perm : ndarray
        The window's rows in training order (indices into the laid-out rows).
    """
    starts = list(range(0, n, block))
    order = rng.permutation(len(starts))
    for g in range(0, len(order), buffer_blocks):
        ranges = [(starts[b], min(starts[b] + block, n)) for b in order[g:g + buffer_blocks]]
        yield ranges, rng.permutation(sum(b - a for a, b in ranges))


def _positions(ranges: list) -> np.ndarray:
    return np.concatenate([np.arange(a, b) for a, b in ranges]) if ranges else np.zeros(0, np.int64)


def _read_depth(source) -> int:
    """Windows read ahead: one when the memory limit holds three windows (the one in use, the one
    waiting, the one being read), else none (reads then alternate with training)."""
    window = BLOCK_ROWS * WINDOW_BLOCKS * source.row_bytes
    return 1 if source.streaming and memory_budget(source.memory_limit) >= 3 * window else 0


class ArraySource:
    """Training patches in memory: features ``(n, d)`` (or rows ``index`` of a larger array), labels, weights."""

    streaming = False
    memory_limit = None

    def __init__(self, X: np.ndarray, y: np.ndarray, w: np.ndarray, index: Optional[np.ndarray] = None) -> None:
        self.X, self.y, self.w, self.index = np.ascontiguousarray(X), y, w, index

    def __len__(self) -> int:
        return len(self.y)

    @property
    def n_features(self) -> int:
        return self.X.shape[1]

    @property
    def row_bytes(self) -> int:
        return self.X.shape[1] * self.X.dtype.itemsize

    def window(self, ranges: list) -> tuple:
        """``(tensor, rows)``: the rows of the window's positions are ``tensor[rows]`` (no copy in memory)."""
        pos = _positions(ranges)
        return torch.from_numpy(self.X), torch.from_numpy(pos if self.index is None else self.index[pos])

    def matrix(self) -> np.ndarray:
        """All rows as float32, for estimators that need them at once."""
        return np.asarray(self.X if self.index is None else self.X[self.index], dtype=np.float32)


class StreamSource:
    """Training patches left in a features array on disk (HDF5): file rows ``rows`` (sorted).

    Windows are read in the stored dtype (float16 caches: half the bytes) by runs of
    consecutive rows, the next one in a background thread while the current one trains;
    rows become float32 a mini-batch at a time, on the training device.
    """

    streaming = True

    def __init__(self, dataset, rows: np.ndarray, y: np.ndarray, w: np.ndarray, *,
                 memory_limit: Optional[int] = None) -> None:
        self.ds, self.rows, self.y, self.w, self.memory_limit = dataset, rows, y, w, memory_limit

    def __len__(self) -> int:
        return len(self.y)

    @property
    def n_features(self) -> int:
        return self.ds.shape[1]

    @property
    def row_bytes(self) -> int:
        return self.ds.shape[1] * self.ds.dtype.itemsize

    def window(self, ranges: list) -> tuple:
        """``(tensor, rows)``: the window's positions read block by block, laid out in order."""
        out = np.empty((sum(b - a for a, b in ranges), self.ds.shape[1]), self.ds.dtype)
        o = 0
        for a, b in ranges:  # a block's file rows are sorted: read as runs
            read_rows(self.ds, self.rows[a:b], out=out[o:o + b - a])
            o += b - a
        return torch.from_numpy(out), torch.arange(len(out))


def batches(source, rng: np.random.RandomState, batch_size: int, device=None) -> Iterator[tuple]:
    """One epoch of ``(X, y, w)`` mini-batches in :func:`epoch_order`, as float32 tensors on ``device``.

    A window's rows are gathered and converted a mini-batch at a time (index_select, then
    ``float()`` on the device), so a window is never reordered or converted as a whole.
    """
    device = torch.device("cpu") if device is None else device

    def windows():
        for ranges, perm in epoch_order(len(source), rng):
            tensor, rows = source.window(ranges)
            yield tensor, rows[torch.from_numpy(perm)], _positions(ranges)[perm]

    for tensor, order, pos in ahead(windows(), _read_depth(source)):
        y, w = torch.from_numpy(source.y[pos]), torch.from_numpy(source.w[pos])
        for s in range(0, len(pos), batch_size):
            xb = tensor.index_select(0, order[s:s + batch_size]).to(device, non_blocking=True).float()
            yield xb, y[s:s + batch_size].to(device), w[s:s + batch_size].to(device)


def sequential(source, chunk: int = 8192, device=None) -> Iterator[tuple]:
    """``(X, y, w)`` of every row in order, ``chunk`` rows at a time, as tensors on ``device`` (scoring, losses)."""
    device = torch.device("cpu") if device is None else device
    n = len(source)

    def windows():
        for s in range(0, n, BLOCK_ROWS * WINDOW_BLOCKS):
            ranges = [(s, min(s + BLOCK_ROWS * WINDOW_BLOCKS, n))]
            yield source.window(ranges) + (ranges[0],)

    for tensor, rows, (a, b) in ahead(windows(), _read_depth(source)):
        for s in range(0, b - a, chunk):
            xb = tensor.index_select(0, rows[s:s + chunk]).to(device, non_blocking=True).float()
            yield (xb, torch.from_numpy(source.y[a + s:min(a + s + chunk, b)]).to(device),
                   torch.from_numpy(source.w[a + s:min(a + s + chunk, b)]).to(device))


def patch_source(cache, keep: np.ndarray, y: np.ndarray, w: np.ndarray, *, memory_limit: Optional[int] = None):
    """The patches at positions ``keep`` of a cache's selection: in memory if they fit the budget, else streamed."""
    rows = cache.indices[keep]
    if isinstance(cache.features, np.ndarray):  # a MemoryCache: index its array, no copy
        return ArraySource(cache.features, y, w, index=rows)
    if features_bytes(len(keep), cache.feature_dim) <= memory_budget(memory_limit):
        return ArraySource(cache.read_features(rows), y, w)
    return StreamSource(cache.features, rows, y, w, memory_limit=memory_limit)


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
        need = features_bytes(cache.num_patches, cache.feature_dim)
        if isinstance(cache.features, np.ndarray):  # a MemoryCache: bags index its array, no copy
            return cls(cache.features, local, len(t), rows=cache.indices, patch_labels=patch_labels,
                       patch_weights=patch_weights)
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
        """Whether bags are read from a file (rows of an in-memory array are not streaming)."""
        return self.rows is not None and not isinstance(self.features, np.ndarray)

    def sizes(self) -> np.ndarray:
        return np.array([len(g) for g in self.groups])

    def _read(self, pos: np.ndarray) -> torch.Tensor:
        """Rows at positions ``pos`` in that order, as stored (streamed: read in file order, by runs)."""
        if self.rows is None:
            return torch.from_numpy(np.asarray(self.features[pos], np.float32))
        file_rows = self.rows[pos]
        order = np.argsort(file_rows, kind="stable")
        x = torch.from_numpy(read_rows(self.features, file_rows[order]))
        out = torch.empty_like(x)
        out[torch.from_numpy(order)] = x
        return out

    def batch(self, images: Sequence[int]) -> tuple:
        """``(x (B, P, D), mask (B, P), labels (B, P) or None, weights (B, P) or None)`` for the images, padded."""
        groups = [self.groups[i] for i in images]
        n = max((len(g) for g in groups), default=0)
        pos = np.concatenate(groups) if groups else np.zeros(0, np.int64)
        feats = self._read(pos)
        x = torch.zeros((len(groups), n, self.n_features), dtype=torch.float32)
        mask = np.zeros((len(groups), n), bool)
        lab = np.full((len(groups), n), AMBIGUOUS, np.int64) if self.patch_labels is not None else None
        w = np.zeros((len(groups), n), np.float32) if self.patch_weights is not None else None
        s = 0
        for b, g in enumerate(groups):
            x[b, :len(g)].copy_(feats[s:s + len(g)])  # torch converts float16 several times faster than numpy
            mask[b, :len(g)] = True
            if lab is not None:
                lab[b, :len(g)] = self.patch_labels[g]
            if w is not None:
                w[b, :len(g)] = self.patch_weights[g]
            s += len(g)
        return x.numpy(), mask, lab, w

    def batches(self, id_batches: Sequence[Sequence[int]]) -> Iterator[tuple]:
        """:meth:`batch` of each group of images, in order; streamed bags are read one batch ahead in a
        background thread (at most three batches in memory)."""
        return ahead((self.batch(ids) for ids in id_batches), 1 if self.streaming else 0)
