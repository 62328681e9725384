"""The reader of a cache file: :class:`FeatureCache`, selections of its images, and :func:`open_cache`."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import h5py
import numpy as np

from featurecache.cache.base import CacheView
from featurecache.cache.format import FORMAT_NAME, FORMAT_VERSION, Provenance, parse_attr
from featurecache.cache.memory import MemoryCache
from featurecache.cache.table import ImageTable, PatchChunk, damage, no_read_ahead, read_image_table, read_rows
from featurecache.errors import CacheError
from featurecache.prefetch import ahead

__all__ = ["AnyCache", "FeatureCache", "open_cache"]


def _open(path: Path) -> tuple:
    """``(h5py.File, parsed attributes, Provenance)`` of a cache file, or a one-line refusal naming the damage."""
    if not path.is_file():
        raise CacheError(f"{path}: no such cache file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CacheError(f"{path}: not a readable HDF5 file ({str(e).splitlines()[0][:120]})") from None
    a = f.attrs
    try:
        if a.get("format") != FORMAT_NAME:
            raise CacheError(f"{path}: not a featurecache cache (no format attribute)")
        if int(a.get("format_version", 0)) > FORMAT_VERSION:
            raise CacheError(f"{path}: cache format {a['format_version']} is newer than this featurecache reads "
                             f"({FORMAT_VERSION}); upgrade featurecache")
        attrs = {k: parse_attr(v) for k, v in a.items()}
        try:
            provenance = Provenance.from_attrs(attrs)
        except ValueError as e:
            raise CacheError(f"{path}: damaged featurecache cache: {e}") from None
        problem = damage(f, len(provenance.classes))
        if problem:
            raise CacheError(f"{path}: damaged featurecache cache: {problem}")
    except BaseException:
        f.close()
        raise
    return f, attrs, provenance


def _selected_rows(f: h5py.File, path: Path, split: Optional[str], images: Optional[Sequence[int]]) -> np.ndarray:
    """Rows of the image table kept by a split and an explicit list of rows."""
    n_images = len(f["images/path"])
    rows = np.arange(n_images)
    if split is not None:
        splits = [s.decode() if isinstance(s, bytes) else s for s in f["images/split"][:]]
        rows = rows[[split in s.split(",") for s in splits]]
        if len(rows) == 0:
            known = sorted({p for s in splits for p in s.split(",") if p})
            raise CacheError(f"{path}: no image in split {split!r} (splits: {', '.join(known) or 'none'})")
    if images is not None:
        wanted = np.asarray(images, dtype=np.int64)
        if len(wanted) and (wanted.min() < 0 or wanted.max() >= n_images):
            raise CacheError(f"{path}: image rows must be in [0, {n_images})")
        rows = np.intersect1d(rows, wanted)
    return rows


def _uncached_features(f: h5py.File) -> h5py.Dataset:
    """The features dataset; uncompressed ones opened without HDF5's chunk cache: a read then moves just
    the rows asked for, where the cache would read every touched storage chunk whole (measured: 1.8x
    the bytes, a third of the speed, for images of every other split)."""
    ds = f["features"]
    if ds.compression is None and ds.chunks is not None:
        # HDF5 shares an open dataset between opens, with the first open's access settings: close
        # this one before opening with the cache off.
        ds.id.close()
        access = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
        access.set_chunk_cache(0, 0, 1.0)
        ds = h5py.Dataset(h5py.h5d.open(f.id, b"features", access))
    return ds


class FeatureCache(CacheView):
    """Read a feature cache, optionally restricted to a split or a subset of images.

    Features stay on disk until asked for; labels and the image table are small and read
    on first use. ``provenance`` is the file's record of how its features were made
    (:class:`~featurecache.cache.Provenance`); ``attrs`` its attributes as parsed JSON.

    Parameters
    ----------
    path : path-like
    split : str, optional
        Keep the images whose split membership (``images/split``) includes this name.
    images : sequence of int, optional
        Keep these rows of the image table.

    Examples
    --------
    >>> with FeatureCache("train.h5", split="val") as cache:      # doctest: +SKIP
    ...     for chunk in cache.iter_chunks(8192):
    ...         model.partial_fit(chunk.features, chunk.labels)
    """

    def __init__(self, path: Union[str, Path], *, split: Optional[str] = None,
                 images: Optional[Sequence[int]] = None) -> None:
        self.path = Path(path)
        self._file, self.attrs, self.provenance = _open(self.path)
        try:
            rows = _selected_rows(self._file, self.path, split, images)
        except BaseException:
            self._file.close()
            raise
        self._rows = self._root_rows = rows
        self._all = split is None and images is None
        if not self._all and len(rows) < len(self._file["images/path"]):
            no_read_ahead(self._file)
        self._images: Optional[ImageTable] = None
        self._indices: Optional[np.ndarray] = None
        self._labels: Optional[np.ndarray] = None
        self._features: Optional[h5py.Dataset] = None
        self._memo: dict = {}

    def close(self) -> None:
        """Close the file."""
        if self._file.id.valid:
            self._file.close()

    def __repr__(self) -> str:
        return (f"FeatureCache({str(self.path)!r}: {self.num_images} images, {self.num_patches} patches, "
                f"{self.feature_dim}-d {self.backbone['name']})")

    @property
    def feature_dim(self) -> int:
        return int(self._file["features"].shape[1])

    @property
    def images(self) -> ImageTable:
        """The selected images' table."""
        if self._images is None:
            self._images = read_image_table(self._file["images"], self._rows)
        return self._images

    @property
    def skipped(self) -> list:
        """``(path, reason)`` of every image that could not be read at extraction."""
        g = self._file["skipped"]
        dec = lambda s: s.decode() if isinstance(s, bytes) else s  # noqa: E731
        return [(dec(p), dec(r)) for p, r in zip(g["path"][:], g["reason"][:])]

    @property
    def num_images(self) -> int:
        return len(self._rows)

    @property
    def indices(self) -> np.ndarray:
        """File rows of the selected patches, sorted."""
        if self._indices is None:
            if self._all:
                self._indices = np.arange(len(self._file["label"]))
            else:
                t = self.images
                self._indices = (np.concatenate([np.arange(s, s + c) for s, c in zip(t.patch_start, t.patch_count)])
                                 if len(t) else np.zeros(0, np.int64))
        return self._indices

    def _read(self, name: str, idx: np.ndarray) -> np.ndarray:
        ds = self.features if name == "features" else self._file[name]
        if self._all and len(idx) == ds.shape[0]:
            return ds[:]
        # Per-patch columns are small: read through gaps; features: about the rows used.
        return read_rows(ds, idx) if name == "features" else read_rows(ds, idx, max_gap=16384)

    @property
    def labels(self) -> np.ndarray:
        """Patch labels (encoding of :mod:`featurecache.patches`) of the selected patches."""
        if self._labels is None:
            self._labels = self._read("label", self.indices).astype(np.int64)
        return self._labels

    @property
    def image_index(self) -> np.ndarray:
        """Image-table row of each selected patch."""
        return self._read("image_index", self.indices).astype(np.int64)

    @property
    def boxes(self) -> np.ndarray:
        return self._read("box", self.indices)

    @property
    def scales(self) -> np.ndarray:
        return self._read("scale", self.indices)

    @property
    def features(self) -> h5py.Dataset:
        """The on-disk features dataset (all patches; index it with :attr:`indices`), read without HDF5's
        chunk cache when uncompressed."""
        if self._features is None:
            self._features = _uncached_features(self._file)
        return self._features

    def read_features(self, indices: Optional[np.ndarray] = None, *, dtype=np.float32) -> np.ndarray:
        """Read features of the selected patches (or of the given file rows) into memory."""
        idx = self.indices if indices is None else np.sort(np.asarray(indices, dtype=np.int64))
        return self._read("features", idx).astype(dtype, copy=False)

    def iter_chunks(self, chunk_size: int = 65536, *, dtype=np.float32, prefetch: int = 1) -> Iterator[PatchChunk]:
        """Yield the selected patches in file order, ``chunk_size`` at a time (bounded memory).

        Parameters
        ----------
        chunk_size : int
            Patches per chunk.
        dtype : numpy dtype or None
            Of the features; None: as stored (float16 caches stay half the size until a
            consumer converts them, e.g. on its device).
        prefetch : int
            Chunks read ahead in a background thread (0: none); at most ``prefetch + 2``
            chunks are in memory at once.
        """
        idx, img, labels, feats = self.indices, self.image_index, self.labels, self.features

        def read() -> Iterator[PatchChunk]:
            for s in range(0, len(idx), chunk_size):
                sel = idx[s:s + chunk_size]
                x = read_rows(feats, sel)
                yield PatchChunk(sel, x if dtype is None else x.astype(dtype, copy=False), labels[s:s + chunk_size],
                                 img[s:s + chunk_size])

        return ahead(read(), prefetch)

    def select(self, images: Sequence[int]) -> "FeatureCache":
        """A new reader of the images at positions ``images`` of this selection (close it after use).

        It shares this reader's ``memo`` (results computed once over the first reader's images).
        """
        pos = np.asarray(images, dtype=np.int64)
        if len(pos) and (pos.min() < 0 or pos.max() >= self.num_images):
            raise CacheError(f"{self.path}: image positions must be in [0, {self.num_images})")
        return self._sibling(self._rows[pos])

    def root(self) -> "FeatureCache":
        """A new reader of the images this one was selected from (close it after use)."""
        n = len(self._file["images/path"])
        return self._sibling(None if len(self._root_rows) == n else self._root_rows)

    def _sibling(self, rows) -> "FeatureCache":
        other = FeatureCache(self.path, images=rows)
        other._memo, other._root_rows = self._memo, self._root_rows
        return other

    @property
    def memo(self) -> tuple:
        """``(dictionary shared with the readers selected from the same first reader, positions of this
        reader's images in that reader's table)`` (as :attr:`MemoryCache.memo`)."""
        return self._memo, np.searchsorted(self._root_rows, self._rows)

    def to_memory(self) -> MemoryCache:
        """The selected patches' features, labels and image table, read into memory once."""
        return MemoryCache(self)


AnyCache = Union[FeatureCache, MemoryCache]


@contextlib.contextmanager
def open_cache(cache: Union[str, Path, FeatureCache, MemoryCache], split: Optional[str] = None) -> Iterator[AnyCache]:
    """A cache to read: a path is opened (and closed on exit), an open cache is used as it is.

    With ``split``, the images of that split: a new reader of the same file for a
    :class:`FeatureCache` (closed on exit; the caller's stays open), a view for a
    :class:`MemoryCache`.
    """
    if isinstance(cache, MemoryCache):
        yield cache if split is None else cache.split(split)
        return
    if isinstance(cache, FeatureCache) and split is None:
        yield cache
        return
    c = FeatureCache(cache.path if isinstance(cache, FeatureCache) else cache, split=split)
    try:
        yield c
    finally:
        c.close()
