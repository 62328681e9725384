"""The image set as featurecache holds it: :class:`ImageSet` of :class:`ImageRecord`, boxes in one convention.

Boxes are ``(x0, y0, x1, y1)`` in continuous pixel-edge coordinates, 0-based, end exclusive:
the top-left pixel of an image covers ``[0, 1) x [0, 1)``, and a box that covers the whole
``W x H`` image is ``(0, 0, W, H)``; its area is ``(x1-x0)*(y1-y0)``. Boxes that stick out
of the image are clipped to it; boxes left with no area (outside the image, zero area,
inverted) are dropped (:class:`BoxCleaner`), and both are kept on :attr:`ImageSet.box_problems`.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from featurecache.errors import DatasetError

__all__ = ["BoxCleaner", "ImageRecord", "ImageSet", "PathLike", "check_classes", "inside"]


PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True, eq=False)
class ImageRecord:
    """One image and its annotations.

    Attributes
    ----------
    path : Path
        Absolute path of the image file.
    relpath : str
        Path relative to the data set root, with ``/`` separators (stored in caches).
    width, height : int
        Image size in pixels, as annotated (or read from the file header when not).
    boxes : ndarray of shape (K, 4), float32
        Object boxes ``x0, y0, x1, y1`` in the module's pixel-edge convention.
    classes : tuple of str
        Class name of each box.
    difficult : ndarray of shape (K,), bool
        VOC ``difficult`` (or COCO ``iscrowd``) flag of each box.
    splits : tuple of str
        Names of the split files (``ImageSets/Main/<name>.txt``) that list this image.
    source : str
        The annotation file the record came from ('' for folder layouts).
    stamp : str
        Identifies the file's content version when annotations do not (``predict`` sets
        ``"size:mtime"``), so that a kept cache of changed files is not reused; '' otherwise.
    error : str
        Why the image cannot be read ('' when it can): such a record is kept so that
        extraction records it as skipped (or stops on it with ``strict``); its size is 0 x 0.
    """

    path: Path
    relpath: str
    width: int
    height: int
    boxes: np.ndarray
    classes: tuple
    difficult: np.ndarray
    splits: tuple = ()
    source: str = ""
    stamp: str = ""
    error: str = ""

    @property
    def labels(self) -> frozenset:
        """Image-level labels: classes with at least one non-difficult object."""
        return frozenset(c for c, d in zip(self.classes, self.difficult) if not d)

    @property
    def difficult_labels(self) -> frozenset:
        """Classes present only through difficult objects (ignored by VOC-style AP)."""
        return frozenset(self.classes) - self.labels


@dataclass(eq=False)
class ImageSet:
    """A list of :class:`ImageRecord` with its class list and where it came from.

    Attributes
    ----------
    root : Path
        Data set root; :attr:`ImageRecord.relpath` is relative to it.
    layout : str
        One of :data:`LAYOUTS`.
    classes : tuple of str
        The class list: sorted names, or the order of a ``--classes`` file. A class's index
        in it is its class id everywhere in featurecache.
    records : list of ImageRecord
    split : str or None
        The split that was read, if any.
    box_problems : list of (str, str)
        ``(annotation file, what was done)`` for every clipped or dropped box.
    also_read : tuple of path
        Other files the reader read (a VOC devkit's split lists and all its annotation files).
    """

    root: Path
    layout: str
    classes: tuple
    records: list
    split: Optional[str] = None
    box_problems: list = field(default_factory=list)
    also_read: tuple = ()

    def files_read(self) -> set:
        """Every file this set was read from: its images, their annotation files, and the other files its
        reader read (``also_read``: a VOC devkit's split lists and every annotation file): what no
        output may replace."""
        return ({str(r.path) for r in self.records} | {r.source for r in self.records if r.source}
                | {str(f) for f in self.also_read})

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self.records)

    def __getitem__(self, i: int) -> ImageRecord:
        return self.records[i]

    @property
    def unreadable(self) -> list:
        """``(path, reason)`` of the images found but not readable (kept, recorded as skipped at extraction)."""
        return [(str(r.path), r.error) for r in self.records if r.error]

    @property
    def has_boxes(self) -> bool:
        """True for layouts with object boxes (VOC, COCO)."""
        return self.layout in ("voc", "coco")

    def class_ids(self, record: ImageRecord) -> np.ndarray:
        """Class ids (indices into :attr:`classes`) of a record's boxes."""
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[c] for c in record.classes], dtype=np.int64)

    def boxes_per_class(self) -> dict:
        """Number of boxes of each class, as ``{name: (total, difficult)}``."""
        total: Counter = Counter()
        hard: Counter = Counter()
        for r in self.records:
            for c, d in zip(r.classes, r.difficult):
                total[c] += 1
                hard[c] += int(d)
        return {c: (total[c], hard[c]) for c in self.classes}

    @property
    def num_boxes(self) -> int:
        return sum(len(r.classes) for r in self.records)


# --------------------------------------------------------------------------- boxes


class BoxCleaner:
    """Clips boxes to the image and drops degenerate ones, keeping a log of both."""

    def __init__(self) -> None:
        self.problems: list = []

    def clean(self, source: str, raw: list, width: int, height: int) -> tuple:
        """One image's boxes, clipped to it, degenerate ones dropped; both logged on :attr:`problems`.

        Parameters
        ----------
        source : str
            The annotation file (and image), for the log.
        raw : list of tuple
            ``(x0, y0, x1, y1, class, difficult)`` in pixel-edge coordinates.
        width, height : int
            The image's size.

        Returns
        -------
        (ndarray (K, 4) float32, tuple of str, ndarray (K,) bool)
            Boxes, their classes and their difficult flags, as :class:`ImageRecord` holds them.
        """
        kept = []
        for x0, y0, x1, y1, name, diff in raw:
            if not (x1 > x0 and y1 > y0):
                self.problems.append((source, f"dropped {name} box with zero area or inverted corners"))
                continue
            cx0, cy0 = max(x0, 0.0), max(y0, 0.0)
            cx1, cy1 = min(x1, float(width)), min(y1, float(height))
            if not (cx1 > cx0 and cy1 > cy0):
                self.problems.append((source, f"dropped {name} box outside the {width}x{height} image"))
                continue
            if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
                self.problems.append((source, f"clipped {name} box to the {width}x{height} image"))
            kept.append((cx0, cy0, cx1, cy1, name, diff))
        boxes = np.array([k[:4] for k in kept], dtype=np.float32).reshape(-1, 4)
        names = tuple(k[4] for k in kept)
        difficult = np.array([k[5] for k in kept], dtype=bool)
        return boxes, names, difficult


def check_classes(source: str, names: Sequence[str], allowed: Optional[tuple]) -> None:
    """Refuse an object whose class is not in the class list.

    Parameters
    ----------
    source : str
        The annotation file, for the message.
    names : sequence of str
        The classes of one image's objects.
    allowed : tuple of str or None
        The class list; None allows every class.

    Raises
    ------
    DatasetError
        Naming the first class outside the list.
    """
    if allowed is None:
        return
    for n in names:
        if n not in allowed:
            raise DatasetError(f"{source}: object of class {n!r} is not in the class list")


def inside(root: Path, name: str, source: str) -> Path:
    """``root / name`` for an annotation's file name, refused when it is absolute or climbs out of ``root``.

    Parameters
    ----------
    root : Path
        The folder the annotations name images relative to.
    name : str
        The file name as annotated.
    source : str
        The annotation file, for the message.

    Returns
    -------
    Path

    Raises
    ------
    DatasetError
        An absolute name or one with ``..``.
    """
    rel = Path(name)
    if rel.is_absolute() or rel.drive or ".." in rel.parts:
        raise DatasetError(f"{source}: image file name {name!r} points outside the data set folder {root}; "
                           "annotations name images relative to it")
    return root / rel
