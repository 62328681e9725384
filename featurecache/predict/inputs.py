"""Prediction inputs: image files, folders, data sets and in-memory images, expanded and probed."""


from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from featurecache.backbones import sha256_file
from featurecache.datasets import ImageRecord, ImageSet, detect_layout, read_dataset
from featurecache.errors import (
    DatasetError,
    PredictError,
)
from featurecache.images import folder_images, image_size, name_problem, oriented, to_rgb

logger = logging.getLogger(__name__)


@dataclass
class Item:
    """One input image: where it is, how it is shown and named, its size or why it cannot be read."""

    display: str
    name: str  # a short relative name for its map picture: within its folder, or the file's name
    path: Optional[Path] = None
    pixels: Optional[np.ndarray] = None
    width: int = 0
    height: int = 0
    error: str = ""
    folder: Optional[Path] = None  # the input folder it was found in
    reads: frozenset = frozenset()  # other files read with it (its data set's annotations and split lists)


def _is_voc(folder: Path) -> bool:
    try:
        return detect_layout(folder) == "voc"
    except DatasetError:  # no layout at all: searched for images like any folder
        return False


def _in_memory(item, position: int) -> Item:
    """A PIL image or array, converted as image files are (:func:`featurecache.extract.to_rgb`)."""
    name = f"<image {position}>"
    if isinstance(item, Image.Image):
        try:  # scored as displayed, as image files are
            return Item(name, f"image-{position}", pixels=to_rgb(oriented(item)))
        except (OSError, ValueError) as e:
            return Item(name, f"image-{position}", error=f"cannot convert the image ({type(e).__name__})")
    a = item
    ok = a.dtype == np.uint8 and (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4)))
    if not ok or min(a.shape[:2]) < 1:
        return Item(name, f"image-{position}", error=f"an array image must be non-empty (H, W[, 1, 3 or 4]) "
                                                        f"uint8, got {a.shape} {a.dtype}")
    a = a.reshape(a.shape[0], a.shape[1], -1)
    a = np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a[:, :, :3]
    return Item(name, f"image-{position}", pixels=np.ascontiguousarray(a))


def _expand(item, position: int, layout: str, split: Optional[str], annotations) -> list:
    """The :class:`Item` s of one input: a file, a folder, a data set, or an in-memory image."""
    if isinstance(item, (Image.Image, np.ndarray)):
        return [_in_memory(item, position)]
    if not isinstance(item, (str, bytes, os.PathLike)):
        raise PredictError(f"expected image paths, PIL images or arrays, got {type(item).__name__}", param="images")
    text = os.fsdecode(item)
    path = Path(text)
    if not path.exists():
        return [Item(text, path.name, path, error="no such file or directory")]
    if not path.is_dir():  # a file, or a pipe or device that the header reader refuses
        return [Item(text, path.name, path)]
    if annotations is not None or layout in ("voc", "coco") or (layout == "auto" and _is_voc(path)):
        ds = read_dataset(path, layout=layout, split=split, annotations=annotations)
        read = frozenset(ds.files_read())
        return [Item(str(path / r.relpath), r.relpath, r.path, folder=path, reads=read) for r in ds]
    if split is not None:
        raise PredictError(f"{path}: --split needs a VOC devkit folder", param="split")
    files = folder_images(path)
    if not files:
        return [Item(text, path.name, path, error="no image files in this folder")]
    return [Item(str(f), f.relative_to(path).as_posix(), f, folder=path) for f in files]


def _probe(item: Item) -> None:
    """Read an image file's size (as displayed) from its header, or say why it cannot be read."""
    if item.error:
        return
    if item.pixels is not None:
        item.height, item.width = item.pixels.shape[:2]
        return
    item.error = name_problem(item.path)
    if not item.error:
        item.width, item.height, item.error = image_size(item.path, displayed=True)


def collect_inputs(images, *, layout: str = "auto", split: Optional[str] = None, annotations=None,
                   strict: bool = False) -> list:
    """Every input expanded to :class:`Item` s, duplicates (the same file twice) dropped, sizes read.

    ``layout``, ``split`` and ``annotations`` say how a data-set folder among the inputs is read;
    ``strict`` raises ``PredictError`` at the first unreadable image instead of recording its error.
    """
    if isinstance(images, (str, bytes, os.PathLike, Image.Image, np.ndarray)):
        images = [images]
    items, seen = [], set()
    for position, item in enumerate(images):
        for it in _expand(item, position, layout, split, annotations):
            key = os.path.realpath(it.path) if it.path is not None and it.pixels is None else id(it)
            if key in seen:
                continue
            seen.add(key)
            _probe(it)
            if it.error and strict:
                raise PredictError(f"{it.display}: {it.error} (--strict)")
            if it.error:
                logger.warning("%s: %s", it.display, it.error)
            items.append(it)
    if not items:
        raise PredictError("no input images given", param="images")
    return items


def image_set_of(items: list, tmp: Path, classes: tuple, *, kept: bool) -> tuple:
    """An image set of the readable items (in-memory images written to ``tmp`` as lossless PNG).

    For a ``kept`` cache each file is stamped with the SHA-256 of its bytes, so that a file
    replaced by another of the same size and time (``cp -p``, rsync) is not taken for the one
    whose features the cache holds.

    Returns ``(ImageSet or None, {relpath: item position})``.
    """
    usable = []
    for i, it in enumerate(items):
        if it.error:
            continue
        if it.pixels is not None:
            it.path = tmp / "images" / f"{i:06d}.png"
            it.path.parent.mkdir(exist_ok=True)
            Image.fromarray(it.pixels).save(it.path)
        usable.append(i)
    if not usable:
        return None, {}
    # Made absolute without resolving '..' or links: a path as given stays the file it names.
    paths = [items[i].path.absolute() for i in usable]
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    records = []
    for i, p in zip(usable, paths):
        records.append(ImageRecord(p, p.relative_to(root).as_posix(), items[i].width, items[i].height,
                                   np.zeros((0, 4), np.float32), (), np.zeros(0, bool),
                                   stamp=f"sha256:{sha256_file(p)}" if kept else ""))
    where = {r.relpath: i for r, i in zip(records, usable)}
    return ImageSet(root, "plain", tuple(classes), records), where


