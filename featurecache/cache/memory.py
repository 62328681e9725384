"""A cache's selected patches held in memory (:class:`MemoryCache`), with views of image subsets that share them."""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np

from featurecache.cache.base import CacheView
from featurecache.cache.table import ImageTable, PatchChunk
from featurecache.errors import CacheError

__all__ = ["MemoryCache"]


class MemoryCache(CacheView):
    """A cache's selected patches held in memory, read like a :class:`FeatureCache`.

    :meth:`select` and :meth:`split` give views of image subsets that share the arrays (no
    copy of the features), so that cross-validation reads a cache once and trains and scores
    every fold through the same code as a cache on disk. ``memo`` is a dictionary shared by
    a cache and all its views, for results computed once over all images (pooled features).

    Parameters
    ----------
    source : FeatureCache
        Its selected patches are read (features as float32); any :class:`CacheLike` will do.
    """

    def __init__(self, source) -> None:
        self.path, self.attrs, self.provenance = source.path, source.attrs, source.provenance
        self._X = np.empty((source.num_patches, source.feature_dim), np.float32)
        s = 0
        for ch in source.iter_chunks(65536, dtype=None, prefetch=0):  # peak: the float32 copy and one chunk
            self._X[s:s + len(ch.indices)] = ch.features
            s += len(ch.indices)
        self._labels, self._image_index = source.labels, source.image_index
        self._scales, self._boxes = source.scales, source.boxes
        self._table = source.images
        self._local = np.searchsorted(self._table.row, self._image_index)  # image position of each patch
        self._img_pos = np.arange(len(self._table))
        self._patch_pos = np.arange(len(self._X))
        self._memo: dict = {}
        self._root = self

    def _view(self, image_positions: np.ndarray) -> "MemoryCache":
        view = object.__new__(MemoryCache)
        view.__dict__.update(self.__dict__)
        view._img_pos = self._img_pos[np.asarray(image_positions, dtype=np.int64)]
        view._patch_pos = np.flatnonzero(np.isin(self._root._local, view._img_pos))
        return view

    def select(self, images: Sequence[int]) -> "MemoryCache":
        """A view of the images at positions ``images`` of this view's table (sorted)."""
        pos = np.unique(np.asarray(images, dtype=np.int64))
        if len(pos) and (pos[0] < 0 or pos[-1] >= self.num_images):
            raise CacheError(f"{self.path}: image positions must be in [0, {self.num_images})")
        return self._view(pos)

    def split(self, split: str) -> "MemoryCache":
        """A view of the images of a split (as ``FeatureCache(path, split=...)``)."""
        pos = self.images.in_split(split)
        if len(pos) == 0:
            raise CacheError(f"{self.path}: no image in split {split!r}")
        return self._view(pos)

    def root(self) -> "MemoryCache":
        """The cache of all images this view was selected from."""
        return self._root

    def to_memory(self) -> "MemoryCache":
        """Itself: already in memory (as :meth:`FeatureCache.to_memory` for a cache on disk)."""
        return self

    @property
    def memo(self) -> tuple:
        """``(shared dictionary, positions of this view's images in the root's table)``."""
        return self._memo, self._img_pos

    def __repr__(self) -> str:
        return f"MemoryCache({str(self.path)!r}: {self.num_images} images, {self.num_patches} patches)"

    @property
    def feature_dim(self) -> int:
        return int(self._X.shape[1])

    @property
    def images(self) -> ImageTable:
        return self._table.take(self._img_pos)

    @property
    def num_images(self) -> int:
        return len(self._img_pos)

    @property
    def indices(self) -> np.ndarray:
        """Rows of :attr:`features` of the selected patches, sorted."""
        return self._patch_pos

    @property
    def labels(self) -> np.ndarray:
        return self._labels[self._patch_pos]

    @property
    def image_index(self) -> np.ndarray:
        return self._image_index[self._patch_pos]

    @property
    def scales(self) -> np.ndarray:
        return self._scales[self._patch_pos]

    @property
    def boxes(self) -> np.ndarray:
        return self._boxes[self._patch_pos]

    @property
    def features(self) -> np.ndarray:
        """All patches' features in memory (index it with :attr:`indices`)."""
        return self._X

    def read_features(self, indices: Optional[np.ndarray] = None, *, dtype=np.float32) -> np.ndarray:
        idx = self._patch_pos if indices is None else np.sort(np.asarray(indices, dtype=np.int64))
        return self._X[idx].astype(dtype, copy=False)

    def iter_chunks(self, chunk_size: int = 65536, *, dtype=np.float32, prefetch: int = 0) -> Iterator[PatchChunk]:
        """As :meth:`FeatureCache.iter_chunks` (``prefetch`` is not needed in memory)."""
        idx, labels, img = self._patch_pos, self.labels, self.image_index
        for s in range(0, len(idx), chunk_size):
            sel = idx[s:s + chunk_size]
            yield PatchChunk(sel, self._X[sel] if dtype is None else self._X[sel].astype(dtype, copy=False),
                             labels[s:s + chunk_size], img[s:s + chunk_size])

