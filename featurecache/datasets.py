"""Readers for image sets: PASCAL VOC devkits, COCO JSON, class folders and plain folders.

Every reader returns an :class:`ImageSet`: one :class:`ImageRecord` per image with its
object boxes in one coordinate convention, used everywhere else in featurecache:

    boxes are ``(x0, y0, x1, y1)`` in continuous pixel-edge coordinates, 0-based, end
    exclusive: the top-left pixel of an image covers ``[0, 1) x [0, 1)``, and a box that
    covers the whole ``W x H`` image is ``(0, 0, W, H)``; its area is ``(x1-x0)*(y1-y0)``.

Conversions into it:

* PASCAL VOC stores 1-based *inclusive* pixel indices, so a box ``xmin..xmax`` covers the
  pixels ``xmin-1 .. xmax-1`` (0-based) and becomes ``x0 = xmin - 1, x1 = xmax`` (same for
  y). A box written with ``xmax <= xmin`` or ``ymax <= ymin`` has zero (or negative) area
  *as written*; it is an annotation error, not a one-pixel object, and is dropped.
* COCO ``bbox`` is ``[x, y, w, h]`` in continuous coordinates already: ``x0 = x, x1 = x + w``.
  ``iscrowd`` objects are treated like VOC ``difficult`` ones.
* Class folders: each image is one object of its folder's class filling the image.
* Plain folders: no objects, no labels (for extraction and prediction only).

Boxes that stick out of the image are clipped to it; boxes left with no area (outside the
image, zero area, inverted) are dropped. Both are counted in one warning per data set and
kept on :attr:`ImageSet.box_problems`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from featurecache.errors import DatasetError
from featurecache.images import image_files, image_size, name_problem

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
    """

    root: Path
    layout: str
    classes: tuple
    records: list
    split: Optional[str] = None
    box_problems: list = field(default_factory=list)

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


def _voc_root(path: Path) -> Optional[Path]:
    def is_voc(p: Path) -> bool:
        return (p / "Annotations").is_dir() and (p / "JPEGImages").is_dir()

    if is_voc(path):
        return path
    # A devkit folder (VOCdevkit/ or a download root) holding exactly one VOC20xx folder.
    inner = [p for p in sorted(path.iterdir()) if p.is_dir() and is_voc(p)]
    return inner[0] if len(inner) == 1 else None


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
    if _voc_root(path) is not None:
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
    if layout not in LAYOUTS:
        raise DatasetError(f"{path}: unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not path.is_dir():
        raise DatasetError(f"{path}: not a directory")
    if split is not None and layout != "voc":
        raise DatasetError(f"{path}: --split needs a VOC layout (ImageSets/Main/<split>.txt), this is {layout}")
    if classes is not None:
        classes = tuple(classes)
        if len(set(classes)) != len(classes):
            raise DatasetError(f"{path}: the class list names a class more than once")
    if layout == "voc":
        ds = _read_voc(path, split=split, classes=classes)
    elif layout == "coco":
        if annotations is None:
            raise DatasetError(f"{path}: the coco layout needs --annotations FILE (a COCO JSON file)")
        ds = _read_coco(path, Path(annotations), classes=classes)
    elif layout == "folders":
        ds = _read_folders(path, classes=classes)
    else:
        records = [_folder_record(path, p, None) for p in _named_files(image_files(path))]
        ds = ImageSet(path.resolve(), "plain", classes or (), records)
    if not ds.records:
        raise DatasetError(f"{path}: no images found ({layout} layout{', split ' + split if split else ''})")
    _warn_box_problems(ds)
    if ds.unreadable:
        where, why = ds.unreadable[0]
        logger.warning("%s: %d image(s) cannot be read and will be skipped and recorded at extraction, e.g. %s: %s",
                       ds.root, len(ds.unreadable), where, why)
    return ds


# --------------------------------------------------------------------------- boxes


class _BoxCleaner:
    """Clips boxes to the image and drops degenerate ones, keeping a log of both."""

    def __init__(self) -> None:
        self.problems: list = []

    def clean(self, source: str, raw: list, width: int, height: int) -> tuple:
        """``raw``: (x0, y0, x1, y1, class, difficult) in pixel-edge coordinates."""
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


def _check_classes(source: str, names: Sequence[str], allowed: Optional[tuple]) -> None:
    if allowed is None:
        return
    for n in names:
        if n not in allowed:
            raise DatasetError(f"{source}: object of class {n!r} is not in the class list")


def _inside(root: Path, name: str, source: str) -> Path:
    """``root / name`` for an annotation's file name, refused when it is absolute or climbs out of ``root``."""
    rel = Path(name)
    if rel.is_absolute() or rel.drive or ".." in rel.parts:
        raise DatasetError(f"{source}: image file name {name!r} points outside the data set folder {root}; "
                           "annotations name images relative to it")
    return root / rel




# --------------------------------------------------------------------------- VOC


def _text(elem: ET.Element, tag: str, source: str) -> str:
    child = elem.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DatasetError(f"{source}: missing <{tag}>")
    return child.text.strip()


def _number(elem: ET.Element, tag: str, source: str) -> float:
    s = _text(elem, tag, source)
    try:
        return float(s)
    except ValueError:
        raise DatasetError(f"{source}: <{tag}> is not a number: {s!r}") from None


def _parse_voc_xml(xml_path: Path, root: Path) -> dict:
    source = str(xml_path)
    try:
        tree = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        raise DatasetError(f"{source}: malformed XML ({e})") from None
    except OSError as e:
        raise DatasetError(f"{source}: cannot read ({e.strerror or e})") from None
    stem = xml_path.stem
    fname = (tree.findtext("filename", default="") or "").strip()
    image = _inside(root / "JPEGImages", fname, source) if fname else None
    if image is None or not image.is_file():
        # Some converters write the id without extension or an old name: fall back on the id.
        candidates = [root / "JPEGImages" / (stem + ext) for ext in (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")]
        image = next((c for c in candidates if c.is_file()), candidates[0])
    width = height = 0
    size = tree.find("size")
    if size is not None:
        try:
            width = int(float(size.findtext("width", "0")))
            height = int(float(size.findtext("height", "0")))
        except (ValueError, OverflowError):
            width = height = 0
    error = ""
    if width <= 0 or height <= 0:
        width, height, error = image_size(image, displayed=False)
    objects = []
    for obj in tree.iter("object"):
        name = _text(obj, "name", source)
        bb = obj.find("bndbox")
        if bb is None:
            raise DatasetError(f"{source}: object {name!r} has no <bndbox>")
        xmin, ymin, xmax, ymax = (_number(bb, t, source) for t in ("xmin", "ymin", "xmax", "ymax"))
        diff = obj.findtext("difficult", default="0").strip() or "0"
        try:
            difficult = bool(int(float(diff)))
        except (ValueError, OverflowError):
            raise DatasetError(f"{source}: <difficult> is not 0 or 1: {diff!r}") from None
        if xmax <= xmin or ymax <= ymin:
            objects.append((xmin, ymin, xmin, ymin, name, difficult))  # dropped by the cleaner
        else:
            objects.append((xmin - 1.0, ymin - 1.0, xmax, ymax, name, difficult))
    return {"image": image, "width": width, "height": height, "objects": objects, "source": source, "error": error}


def _read_split_file(path: Path) -> list:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read split file ({e.strerror or e})") from None
    # Class-specific files (aeroplane_train.txt) have a second column; take the id only.
    return [ln.split()[0] for ln in lines if ln.strip()]


def _read_voc(path: Path, *, split: Optional[str], classes: Optional[tuple]) -> ImageSet:
    root = _voc_root(path)
    if root is None:
        raise DatasetError(f"{path}: not a VOC devkit folder (needs Annotations/ and JPEGImages/)")
    root = root.resolve()
    ann_dir = root / "Annotations"
    split_dir = root / "ImageSets" / "Main"
    membership: dict = {}
    if split_dir.is_dir():
        # Only the generic split files (train.txt), not the per-class ones (cat_train.txt).
        for f in sorted(split_dir.glob("*.txt")):
            if "_" in f.stem:
                continue
            for image_id in _read_split_file(f):
                membership.setdefault(image_id, []).append(f.stem)
    all_ids = sorted(p.stem for p in ann_dir.glob("*.xml"))
    if not all_ids:
        raise DatasetError(f"{ann_dir}: no .xml annotation files")
    if split is not None:
        split_file = split_dir / f"{split}.txt"
        if not split_file.is_file():
            have = sorted({s for v in membership.values() for s in v})
            raise DatasetError(
                f"{split_file}: no such split file (splits here: {', '.join(have) if have else 'none'})"
            )
        ids = _read_split_file(split_file)
        known = set(all_ids)
        missing = [i for i in ids if i not in known]
        if missing:
            raise DatasetError(f"{split_file}: lists {missing[0]!r} which has no {missing[0]}.xml in {ann_dir}")
    else:
        ids = all_ids
    parsed = {i: _parse_voc_xml(ann_dir / f"{i}.xml", root) for i in all_ids}
    if classes is None:
        classes = tuple(sorted({o[4] for p in parsed.values() for o in p["objects"]}))
    cleaner = _BoxCleaner()
    records = []
    for image_id in ids:
        p = parsed[image_id]
        _check_classes(p["source"], [o[4] for o in p["objects"]], classes)
        if p["error"]:  # the image's size is unknown: its boxes cannot be checked; it is skipped at extraction
            boxes, names, difficult = np.zeros((0, 4), np.float32), (), np.zeros(0, bool)
        else:
            boxes, names, difficult = cleaner.clean(p["source"], p["objects"], p["width"], p["height"])
        records.append(
            ImageRecord(
                path=p["image"],
                relpath=p["image"].relative_to(root).as_posix(),
                width=p["width"],
                height=p["height"],
                boxes=boxes,
                classes=names,
                difficult=difficult,
                splits=tuple(membership.get(image_id, ())),
                source=p["source"],
                error=p["error"],
            )
        )
    return ImageSet(root, "voc", classes, records, split=split, box_problems=cleaner.problems)


# --------------------------------------------------------------------------- COCO


def _read_coco(path: Path, annotations: Path, *, classes: Optional[tuple]) -> ImageSet:
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
    if classes is None:
        classes = tuple(sorted(set(cat_names.values())))
    known_images = {i[0] for i in images}
    per_image: dict = {}
    for k, a in enumerate(data["annotations"]):
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
    root = path.resolve()
    cleaner = _BoxCleaner()
    records = []
    for image_id, fname, width, height in sorted(images, key=lambda t: t[1]):
        image = _inside(root, fname, source)
        error = ""
        if width <= 0 or height <= 0:
            width, height, error = image_size(image, displayed=False)
        objects = per_image.get(image_id, [])
        where = f"{source} (image {fname})"
        _check_classes(where, [o[4] for o in objects], classes)
        if error:
            boxes, names, difficult = np.zeros((0, 4), np.float32), (), np.zeros(0, bool)
        else:
            boxes, names, difficult = cleaner.clean(where, objects, width, height)
        records.append(ImageRecord(image, Path(fname).as_posix(), width, height, boxes, names, difficult,
                                   source=source, error=error))
    return ImageSet(root, "coco", classes, records, box_problems=cleaner.problems)


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
