"""Reading a cache file's tables: the per-image table, chunks of patches, rows of a dataset read about as used."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from featurecache.cache.files import unescape
from featurecache.cache.format import IMAGE_ARRAYS, PATCH_ARRAYS, SKIPPED_ARRAYS
from featurecache.outputs import os_reason

__all__ = ["ImageTable", "PatchChunk", "damage", "read_image_table", "read_rows"]


@dataclass(frozen=True)
class PatchChunk:
    """A block of patches read from a cache: rows ``indices`` of the file."""

    indices: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    image_index: np.ndarray


@dataclass(frozen=True)
class ImageTable:
    """The per-image arrays of a cache (for the selected images)."""

    row: np.ndarray  # row in the file's image table (what ``image_index`` refers to)
    path: tuple
    width: np.ndarray
    height: np.ndarray
    labels: np.ndarray  # (M, C) bool: a non-difficult object of the class
    difficult: np.ndarray  # (M, C) bool: only difficult objects of the class
    split: tuple
    patch_start: np.ndarray
    patch_count: np.ndarray

    def __len__(self) -> int:
        return len(self.row)

    def take(self, positions: np.ndarray) -> "ImageTable":
        """The table of the images at ``positions`` (rows of this table, sorted)."""
        p = np.asarray(positions, dtype=np.int64)
        return ImageTable(row=self.row[p], path=tuple(self.path[i] for i in p), width=self.width[p],
                          height=self.height[p], labels=self.labels[p], difficult=self.difficult[p],
                          split=tuple(self.split[i] for i in p), patch_start=self.patch_start[p],
                          patch_count=self.patch_count[p])

    def in_split(self, split: str) -> np.ndarray:
        """Positions of the images whose split membership includes ``split``."""
        return np.flatnonzero([split in s.split(",") for s in self.split])


def read_image_table(g: h5py.Group, rows: np.ndarray) -> ImageTable:
    """The image table of the images at ``rows`` of a cache file's ``images/`` group."""
    def strings(name):
        return tuple(s.decode() if isinstance(s, bytes) else s for s in g[name][:][rows])

    return ImageTable(row=rows, path=strings("path"), width=g["width"][:][rows], height=g["height"][:][rows],
                      labels=g["labels"][:][rows], difficult=g["difficult"][:][rows], split=strings("split"),
                      patch_start=g["patch_start"][:][rows], patch_count=g["patch_count"][:][rows])


def no_read_ahead(f: h5py.File) -> None:
    """Tell the kernel that reads of this file jump (``POSIX_FADV_RANDOM``): a selection's reads skip the
    other images' rows, which read-ahead would fetch anyway (measured: 2.0x the bytes used from the disk
    for every other image, 1.02x with the advice; docs/performance.md). HDF5 shares one descriptor
    among the opens of a file in a process, so the advice holds for them all while the file is open;
    reads of whole windows and chunks (megabytes each) lose little without read-ahead. Best effort:
    not every driver has a descriptor."""
    try:
        os.posix_fadvise(f.id.get_vfd_handle(), 0, 0, os.POSIX_FADV_RANDOM)
    except (AttributeError, OSError, TypeError, ValueError):
        pass


def read_rows(ds, rows: np.ndarray, *, max_gap: int = 64, max_span: int = 16384,
              out: Optional[np.ndarray] = None) -> np.ndarray:
    """Rows ``rows`` (sorted, unique) of an HDF5 dataset, in its storage dtype, reading about what is used.

    Runs of consecutive rows are read straight into the result, one read each; runs apart by
    at most ``max_gap`` rows are read as one slice of at most ``max_span`` rows and picked from
    (a read costs about as much as 64 rows of features: scattered rows are read in slices,
    whole images exactly). Memory: the result plus one slice.

    Parameters
    ----------
    ds : h5py.Dataset or ndarray
    rows : ndarray of int
    max_gap, max_span : int
    out : ndarray, optional
        Where to write (``len(rows)`` rows, the dataset's dtype, C-contiguous).
    """
    rows = np.asarray(rows, dtype=np.int64)
    if out is None:
        out = np.empty((len(rows),) + tuple(ds.shape[1:]), ds.dtype)
    if isinstance(ds, np.ndarray):
        out[:] = ds[rows]
        return out
    cuts = np.flatnonzero(np.diff(rows) > max_gap + 1) + 1  # positions where a gap too wide to read through starts
    i, n = 0, len(rows)
    while i < n:
        lo = int(rows[i])
        k = int(np.searchsorted(cuts, i, side="right"))
        j = int(cuts[k]) if k < len(cuts) else n  # end of this group of nearby rows
        if int(rows[j - 1]) + 1 - lo == j - i and out.flags.c_contiguous:  # consecutive rows: read in place
            ds.read_direct(out, np.s_[lo:lo + j - i], np.s_[i:j])
        else:
            j = min(j, int(np.searchsorted(rows, lo + max_span, side="left")))
            out[i:j] = ds[lo:int(rows[j - 1]) + 1][rows[i:j] - lo]
        i = j
    return out


def damage(f: h5py.File, n_classes: int) -> str:
    """What is missing or inconsistent in an open cache file's datasets ('' when nothing): the format's
    tables (:mod:`featurecache.cache.format`) checked, no feature read."""
    for group, arrays in (("", PATCH_ARRAYS), ("images/", IMAGE_ARRAYS), ("skipped/", SKIPPED_ARRAYS)):
        for a in arrays:
            d = f.get(group + a.name)
            if not isinstance(d, h5py.Dataset) or d.ndim != a.ndim:
                return f"no {a.ndim}-d dataset {group + a.name}"
    n, m = f["features"].shape[0], f["images/path"].shape[0]
    for a in PATCH_ARRAYS[1:]:
        if f[a.name].shape[0] != n:
            return f"{a.name} has {f[a.name].shape[0]} rows, features {n}"
    if f["box"].shape[1] != 4:
        return "box is not (patches, 4)"
    for a in IMAGE_ARRAYS[1:]:
        if f["images/" + a.name].shape[0] != m:
            return f"images/{a.name} has {f['images/' + a.name].shape[0]} rows, images/path {m}"
    for name in ("labels", "difficult"):
        if f["images/" + name].shape[1] != n_classes:
            return f"images/{name} has {f['images/' + name].shape[1]} columns for {n_classes} classes"
    return _missing_sources(f)


def _missing_sources(f: h5py.File) -> str:
    """A virtual cache whose part files are not where its features point ('' when all are there): HDF5
    would read the missing rows as zeros without a word."""
    ds = f["features"]
    if not ds.is_virtual:
        return ""
    here = Path(f.filename).parent
    for src in ds.virtual_sources():
        if src.file_name == ".":
            continue
        part = here / unescape(src.file_name)
        if not part.is_file():
            return (f"its features live in {part.parent} (a virtual cache) and {part.name} is not there; move the "
                    "cache and that folder together")
        try:
            with open(part, "rb") as fh:
                if fh.read(8) != b"\x89HDF\r\n\x1a\n":
                    return f"{part}: a part file of this virtual cache is damaged (not HDF5)"
        except OSError as e:
            return f"{part}: a part file of this virtual cache cannot be read ({os_reason(e)})"
    return ""

