"""What every cache reader is: the :class:`CacheLike` protocol and the base class of the file and memory readers."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from featurecache.cache.format import Provenance
from featurecache.cache.table import ImageTable, PatchChunk
from featurecache.patches import PatchGrid

__all__ = ["CacheLike", "CacheView"]


@runtime_checkable
class CacheLike(Protocol):
    """A readable selection of a cache's patches: a file (:class:`FeatureCache`), memory
    (:class:`MemoryCache`), or a subset of either. Stage two reads caches through this alone."""

    path: Path
    provenance: Provenance

    @property
    def images(self) -> ImageTable: ...

    @property
    def num_images(self) -> int: ...

    @property
    def num_patches(self) -> int: ...

    @property
    def indices(self) -> np.ndarray: ...

    @property
    def labels(self) -> np.ndarray: ...

    @property
    def image_index(self) -> np.ndarray: ...

    @property
    def feature_dim(self) -> int: ...

    def read_features(self, indices: Optional[np.ndarray] = None, *, dtype=np.float32) -> np.ndarray: ...

    def iter_chunks(self, chunk_size: int = 65536, *, dtype=np.float32, prefetch: int = 0) -> Iterator[PatchChunk]: ...

    def select(self, images: Sequence[int]) -> "CacheLike": ...


class CacheView:
    """What the readers share: the provenance's names, sizes, and use as a context manager.

    Subclasses set ``path`` and ``provenance`` and give ``indices``, ``images`` and ``close``.
    """

    path: Path
    provenance: Provenance

    @property
    def classes(self) -> tuple:
        return self.provenance.classes

    @property
    def feature_settings(self) -> dict:
        return self.provenance.feature_settings

    @property
    def fingerprint(self) -> str:
        return self.provenance.fingerprint

    @property
    def backbone(self) -> dict:
        return self.provenance.backbone

    @property
    def grid(self) -> Optional[PatchGrid]:
        return self.provenance.grid

    @property
    def num_patches(self) -> int:
        return len(self.indices)

    def __len__(self) -> int:
        return self.num_patches

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release what the reader holds (nothing in memory)."""
