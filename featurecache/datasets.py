"""Reading an image set in any layout: PASCAL VOC devkits, COCO JSON, class folders and plain folders.

Every reader returns an :class:`~featurecache.imageset.ImageSet`: one
:class:`~featurecache.imageset.ImageRecord` per image with its object boxes in the one
coordinate convention of :mod:`featurecache.imageset`. VOC devkits are parsed in
:mod:`featurecache.voc`, COCO files in :mod:`featurecache.coco`; the folder layouts are here:

* Class folders: each image is one object of its folder's class filling the image.
* Plain folders: no objects, no labels (for extraction and prediction only).

Clipped and dropped boxes are counted in one warning per data set and kept on
:attr:`ImageSet.box_problems`.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from featurecache.coco import read_coco
from featurecache.errors import DatasetError
from featurecache.images import image_files, image_size, name_problem
from featurecache.imageset import ImageRecord, ImageSet, PathLike
from featurecache.voc import read_voc, voc_root

logger = logging.getLogger(__name__)

__all__ = [
    "LAYOUTS",
    "MAX_PIXELS",
    "DatasetError",
    "ImageRecord",
    "ImageSet",
    "detect_layout",
    "read_class_file",
    "read_dataset",
]


#: Default most pixels of one image that extraction decodes (a 48-megapixel phone photo fits;
#: decoding and cropping one costs about 30-60 bytes a pixel); larger ones are skipped and recorded.
MAX_PIXELS = 50_000_000

#: Layout names accepted by :func:`read_dataset`.
LAYOUTS = ("voc", "coco", "folders", "plain")


def read_class_file(path: PathLike) -> tuple:
    """Read a class list: one name per line; blank lines and ``#`` comments are ignored.

    Parameters
    ----------
    path : path-like
        The file.

    Returns
    -------
    tuple of str
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read class list ({e.strerror or e})") from None
    names = [ln.strip() for ln in lines]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise DatasetError(f"{path}: class list is empty")
    dup = [n for n, k in Counter(names).items() if k > 1]
    if dup:
        raise DatasetError(f"{path}: class list names {dup[0]!r} more than once")
    return tuple(names)


def detect_layout(path: PathLike, *, annotations: Optional[PathLike] = None) -> str:
    """Tell which layout a data set path has.

    Parameters
    ----------
    path : path-like
        The data set root (VOC devkit, image folder of a COCO set, class folders or a plain
        folder of images).
    annotations : path-like, optional
        A COCO JSON file; when given the layout is ``"coco"``.

    Returns
    -------
    str
        One of :data:`LAYOUTS`.

    Raises
    ------
    DatasetError
        When no layout fits; the message lists what was tried and how to choose.
    """
    path = Path(path)
    if annotations is not None:
        return "coco"
    if not path.exists():
        raise DatasetError(f"{path}: no such file or directory")
    if path.is_file():
        hint = " (pass it with --annotations and the image folder as DATASET)" if path.suffix == ".json" else ""
        raise DatasetError(f"{path}: is a file, a data set is a directory{hint}")
    if voc_root(path) is not None:
        return "voc"
    if image_files(path):
        return "plain"
    if any(image_files(p) for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        return "folders"
    raise DatasetError(
        f"{path}: cannot tell the data set layout; tried voc (Annotations/ and JPEGImages/), "
        "coco (needs --annotations FILE), folders (<class>/<image> files) and plain (image files "
        "directly inside); choose one with --layout"
    )


def read_dataset(
    path: PathLike,
    *,
    layout: str = "auto",
    split: Optional[str] = None,
    annotations: Optional[PathLike] = None,
    classes: Optional[Sequence[str]] = None,
) -> ImageSet:
    """Read an image set in any supported layout.

    Parameters
    ----------
    path : path-like
        Data set root. For COCO, the folder the ``file_name`` entries are relative to.
    layout : {"auto", "voc", "coco", "folders", "plain"}
        ``"auto"`` detects it with :func:`detect_layout`.
    split : str, optional
        VOC only: read the images listed in ``ImageSets/Main/<split>.txt``. Without it every
        annotation is read.
    annotations : path-like, optional
        COCO JSON file (``instances_*.json``).
    classes : sequence of str, optional
        The class list, in order (see :func:`read_class_file`). Without it the sorted names
        found in the annotations (all of them, not only the split's, so that class ids agree
        across splits). An object of a class outside the list is an error.

    Returns
    -------
    ImageSet

    Raises
    ------
    DatasetError
        On a missing or malformed file, an unknown class, or an undetectable layout.
    """
    path = Path(path)
    if layout == "auto":
        layout = detect_layout(path, annotations=annotations)
    classes = _check_request(path, layout, split, classes)
    ds = _read_layout(path, layout, split, annotations, classes)
    if not ds.records:
        raise DatasetError(f"{path}: no images found ({layout} layout{', split ' + split if split else ''})")
    _warn_box_problems(ds)
    if ds.unreadable:
        where, why = ds.unreadable[0]
        logger.warning("%s: %d image(s) cannot be read and will be skipped and recorded at extraction, e.g. %s: %s",
                       ds.root, len(ds.unreadable), where, why)
    return ds


def _check_request(path: Path, layout: str, split: Optional[str], classes: Optional[Sequence[str]]) -> Optional[tuple]:
    """Refuse a request no layout reader can serve; the class list as a tuple."""
    if layout not in LAYOUTS:
        raise DatasetError(f"{path}: unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not path.is_dir():
        raise DatasetError(f"{path}: not a directory")
    if split is not None and layout != "voc":
        raise DatasetError(f"{path}: --split needs a VOC layout (ImageSets/Main/<split>.txt), this is {layout}")
    if classes is None:
        return None
    classes = tuple(classes)
    if len(set(classes)) != len(classes):
        raise DatasetError(f"{path}: the class list names a class more than once")
    return classes


def _read_layout(path: Path, layout: str, split: Optional[str], annotations: Optional[PathLike],
                 classes: Optional[tuple]) -> ImageSet:
    """The image set of one layout's reader."""
    if layout == "voc":
        return read_voc(path, split=split, classes=classes)
    if layout == "coco":
        if annotations is None:
            raise DatasetError(f"{path}: the coco layout needs --annotations FILE (a COCO JSON file)")
        return read_coco(path, Path(annotations), classes=classes)
    if layout == "folders":
        return _read_folders(path, classes=classes)
    records = [_folder_record(path, p, None) for p in _named_files(image_files(path))]
    return ImageSet(path.resolve(), "plain", classes or (), records)


def _warn_box_problems(ds: ImageSet) -> None:
    if not ds.box_problems:
        return
    dropped = sum(1 for _, what in ds.box_problems if what.startswith("dropped"))
    clipped = len(ds.box_problems) - dropped
    files = sorted({Path(src).name for src, _ in ds.box_problems})
    shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
    logger.warning(
        "%s: dropped %d degenerate box(es) (zero area, inverted or outside the image) and clipped %d "
        "to the image, in %s",
        ds.root, dropped, clipped, shown,
    )


# --------------------------------------------------------------------------- folders


def _folder_record(root: Path, image: Path, class_name: Optional[str]) -> ImageRecord:
    # Absolute without resolving links: a linked file inside the folder keeps its place in it
    # (the set's root is stored resolved, as always; relative paths are taken lexically).
    root, image = root.absolute(), image.absolute()
    width, height, error = image_size(image, displayed=True)
    if class_name is None or error:
        boxes, names, difficult = np.zeros((0, 4), np.float32), (), np.zeros(0, bool)
    else:
        boxes = np.array([[0, 0, width, height]], dtype=np.float32)
        names, difficult = (class_name,), np.zeros(1, bool)
    return ImageRecord(image, image.relative_to(root).as_posix(), width, height, boxes, names, difficult,
                       error=error)


def _named_files(files: list) -> list:
    """The files whose names can be stored (UTF-8); the others are left out with one warning."""
    bad = [f for f in files if name_problem(f)]
    if bad:
        logger.warning("%s: left out %d file(s) whose names are not valid UTF-8 (caches store names as UTF-8); "
                       "rename them to use them", bad[0].parent, len(bad))
    return [f for f in files if not name_problem(f)]


def _read_folders(path: Path, *, classes: Optional[tuple]) -> ImageSet:
    folders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and image_files(p))
    found = tuple(p.name for p in folders)
    if classes is None:
        classes = found
    else:
        extra = [c for c in found if c not in classes]
        if extra:
            raise DatasetError(f"{path / extra[0]}: folder of class {extra[0]!r} is not in the class list")
    records = [_folder_record(path, img, d.name) for d in folders for img in _named_files(image_files(d))]
    return ImageSet(path.resolve(), "folders", classes, records)
