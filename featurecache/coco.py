"""COCO instances files: ``images``, ``annotations`` and ``categories`` of one JSON file.

A COCO ``bbox`` is ``[x, y, w, h]`` in continuous coordinates already: ``x0 = x, x1 = x + w``.
``iscrowd`` objects are treated like VOC ``difficult`` ones.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np

from featurecache.errors import DatasetError
from featurecache.images import image_size
from featurecache.imageset import BoxCleaner, ImageRecord, ImageSet, check_classes, inside

__all__ = ["read_coco"]


def _load(annotations: Path) -> dict:
    """The JSON of an instances file, refused unless it has lists of objects under the three keys."""
    source = str(annotations)
    try:
        with open(annotations, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise DatasetError(f"{source}: cannot read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{source}: malformed JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations", "categories")):
        raise DatasetError(f"{source}: not a COCO instances file (needs images, annotations, categories)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list) or not all(isinstance(e, dict) for e in data[key]):
            raise DatasetError(f"{source}: {key} must be a list of objects, got {type(data[key]).__name__}")
    return data


def _entries(data: dict, source: str) -> tuple:
    """Category id -> name, and ``(id, file_name, width, height)`` of every image; duplicate ids refused."""
    try:
        cat_names = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        images = [(int(im["id"]), str(im["file_name"]), int(im.get("width") or 0), int(im.get("height") or 0))
                  for im in data["images"]]
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise DatasetError(f"{source}: malformed category or image entry ({e!r})") from None
    for what, ids in (("category", [int(c["id"]) for c in data["categories"]]), ("image", [i[0] for i in images])):
        dup = [k for k, n in Counter(ids).items() if n > 1]
        if dup:
            raise DatasetError(f"{source}: {what} id {dup[0]} appears {Counter(ids)[dup[0]]} times")
    return cat_names, images


def _objects(annotations: list, cat_names: dict, known_images: set, source: str) -> dict:
    """Image id -> its objects ``(x0, y0, x1, y1, class, crowd)``; malformed or stray annotations refused."""
    per_image: dict = {}
    for k, a in enumerate(annotations):
        try:
            x, y, w, h = (float(v) for v in a["bbox"])
            name = cat_names[int(a["category_id"])]
            image_id = int(a["image_id"])
            crowd = bool(int(a.get("iscrowd") or 0))
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise DatasetError(f"{source}: annotation #{k} is malformed ({e!r})") from None
        if image_id not in known_images:
            raise DatasetError(f"{source}: annotation #{k} refers to image id {image_id}, which is not in images")
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            raise DatasetError(f"{source}: annotation #{k} has a bbox that is not finite")
        per_image.setdefault(image_id, []).append((x, y, x + w, y + h, name, crowd))
    return per_image


def read_coco(path: Path, annotations: Path, *, classes: Optional[tuple]) -> ImageSet:
    """Read a COCO instances file (the ``coco`` layout of :func:`featurecache.datasets.read_dataset`).

    Parameters
    ----------
    path : Path
        The folder the ``file_name`` entries are relative to.
    annotations : Path
        The JSON file (``instances_*.json``).
    classes : tuple of str, optional
        The class list; without it the sorted category names.

    Returns
    -------
    ImageSet
        Layout ``"coco"``, records sorted by file name.

    Raises
    ------
    DatasetError
        An unreadable or malformed file, duplicate ids, an annotation of an unknown image, or a
        class outside the list.
    """
    source = str(annotations)
    data = _load(annotations)
    cat_names, images = _entries(data, source)
    if classes is None:
        classes = tuple(sorted(set(cat_names.values())))
    per_image = _objects(data["annotations"], cat_names, {i[0] for i in images}, source)
    root = path.resolve()
    cleaner = BoxCleaner()
    records = []
    for image_id, fname, width, height in sorted(images, key=lambda t: t[1]):
        image = inside(root, fname, source)
        error = ""
        if width <= 0 or height <= 0:
            width, height, error = image_size(image, displayed=False)
        objects = per_image.get(image_id, [])
        where = f"{source} (image {fname})"
        check_classes(where, [o[4] for o in objects], classes)
        if error:
            boxes, names, difficult = np.zeros((0, 4), np.float32), (), np.zeros(0, bool)
        else:
            boxes, names, difficult = cleaner.clean(where, objects, width, height)
        records.append(ImageRecord(image, Path(fname).as_posix(), width, height, boxes, names, difficult,
                                   source=source, error=error))
    return ImageSet(root, "coco", classes, records, box_problems=cleaner.problems)
