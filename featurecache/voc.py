"""PASCAL VOC devkits: ``Annotations/*.xml``, ``JPEGImages/`` and the split files of ``ImageSets/Main``.

VOC stores 1-based *inclusive* pixel indices, so a box ``xmin..xmax`` covers the pixels
``xmin-1 .. xmax-1`` (0-based) and becomes ``x0 = xmin - 1, x1 = xmax`` (same for y). A box
written with ``xmax <= xmin`` or ``ymax <= ymin`` has zero (or negative) area *as written*;
it is an annotation error, not a one-pixel object, and is dropped.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

import numpy as np

from featurecache.errors import DatasetError
from featurecache.images import image_size
from featurecache.imageset import BoxCleaner, ImageRecord, ImageSet, check_classes, inside

__all__ = ["read_voc", "voc_root"]


def voc_root(path: Path) -> Optional[Path]:
    """The VOC folder of a path: the path itself, or the one VOC folder inside a devkit folder.

    Parameters
    ----------
    path : Path

    Returns
    -------
    Path or None
        None when ``path`` neither is one (``Annotations/`` and ``JPEGImages/``) nor holds exactly one.
    """
    def is_voc(p: Path) -> bool:
        return (p / "Annotations").is_dir() and (p / "JPEGImages").is_dir()

    if is_voc(path):
        return path
    # A devkit folder (VOCdevkit/ or a download root) holding exactly one VOC20xx folder.
    inner = [p for p in sorted(path.iterdir()) if p.is_dir() and is_voc(p)]
    return inner[0] if len(inner) == 1 else None


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
    image = inside(root / "JPEGImages", fname, source) if fname else None
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


def _split_membership(split_dir: Path) -> dict:
    """Image id -> the generic split files (``train.txt``) that list it."""
    membership: dict = {}
    if split_dir.is_dir():
        # Only the generic split files (train.txt), not the per-class ones (cat_train.txt).
        for f in sorted(split_dir.glob("*.txt")):
            if "_" in f.stem:
                continue
            for image_id in _read_split_file(f):
                membership.setdefault(image_id, []).append(f.stem)
    return membership


def _split_ids(split_dir: Path, split: str, membership: dict, all_ids: list) -> list:
    """The ids one split file lists, each refused unless it has an annotation file."""
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
        ann_dir = split_dir.parent.parent / "Annotations"
        raise DatasetError(f"{split_file}: lists {missing[0]!r} which has no {missing[0]}.xml in {ann_dir}")
    return ids


def read_voc(path: Path, *, split: Optional[str], classes: Optional[tuple]) -> ImageSet:
    """Read a VOC devkit (the ``voc`` layout of :func:`featurecache.datasets.read_dataset`).

    Parameters
    ----------
    path : Path
        The VOC folder or a devkit folder holding one (:func:`voc_root`).
    split : str, optional
        Read only the images that ``ImageSets/Main/<split>.txt`` lists.
    classes : tuple of str, optional
        The class list; without it the sorted names of every annotation (not only the split's).

    Returns
    -------
    ImageSet
        Layout ``"voc"``, each record with the split files that list it.

    Raises
    ------
    DatasetError
        Not a VOC folder, no annotations, a missing split or image, bad XML, an unlisted class.
    """
    root = voc_root(path)
    if root is None:
        raise DatasetError(f"{path}: not a VOC devkit folder (needs Annotations/ and JPEGImages/)")
    root = root.resolve()
    ann_dir = root / "Annotations"
    split_dir = root / "ImageSets" / "Main"
    membership = _split_membership(split_dir)
    all_ids = sorted(p.stem for p in ann_dir.glob("*.xml"))
    if not all_ids:
        raise DatasetError(f"{ann_dir}: no .xml annotation files")
    ids = _split_ids(split_dir, split, membership, all_ids) if split is not None else all_ids
    parsed = {i: _parse_voc_xml(ann_dir / f"{i}.xml", root) for i in all_ids}
    if classes is None:
        classes = tuple(sorted({o[4] for p in parsed.values() for o in p["objects"]}))
    cleaner = BoxCleaner()
    records = []
    for image_id in ids:
        p = parsed[image_id]
        check_classes(p["source"], [o[4] for o in p["objects"]], classes)
        if p["error"]:  # the image's size is unknown: its boxes cannot be checked; it is skipped at extraction
            boxes, names, difficult = np.zeros((0, 4), np.float32), (), np.zeros(0, bool)
        else:
            boxes, names, difficult = cleaner.clean(p["source"], p["objects"], p["width"], p["height"])
        records.append(ImageRecord(path=p["image"], relpath=p["image"].relative_to(root).as_posix(),
                                   width=p["width"], height=p["height"], boxes=boxes, classes=names,
                                   difficult=difficult, splits=tuple(membership.get(image_id, ())),
                                   source=p["source"], error=p["error"]))
    return ImageSet(root, "voc", classes, records, split=split, box_problems=cleaner.problems,
                    also_read=_files_read(split_dir, ann_dir, all_ids))


def _files_read(split_dir: Path, ann_dir: Path, ids: list) -> tuple:
    """The split lists and every annotation file a devkit was read from (none may be overwritten)."""
    lists = tuple(sorted(split_dir.glob("*.txt"))) if split_dir.is_dir() else ()
    return lists + tuple(ann_dir / f"{i}.xml" for i in ids)
