"""Localisation measured: pointing accuracy and CorLoc of a head's maps on labelled images, beside baselines.

Pointing (Oquab et al., 2015; with a 15-pixel tolerance and without): does a map's peak lie in
one of the class's boxes; CorLoc: does the map's box overlap one with IoU >= 0.5. The image
centre and the whole image are the baselines. The maps come from :mod:`featurecache.maps`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
from tqdm.auto import tqdm

from featurecache.cache import FeatureCache, open_cache
from featurecache.datasets import read_dataset
from featurecache.errors import DatasetError, EvalError, FeaturecacheError
from featurecache.maps import (
    CORLOC_IOU,
    DEFAULT_MAP_METHOD,
    MAP_METHODS,
    ImageFileError,
    LocalizationMap,
    Localizer,
    MapConfig,
    article,
    as_head,
    localization_map,
)
from featurecache.outputs import check_not_inputs, csv_text, json_text, printable
from featurecache.resources import BOX_THRESHOLD, POINTING_TOLERANCE
from featurecache.settings import LOCALIZE

logger = logging.getLogger(__name__)

# The maps are re-exported: ``featurecache.localize`` was their home before 0.3.
__all__ = [
    "DEFAULT_MAP_METHOD",
    "MAP_METHODS",
    "LocalizationMap",
    "LocalizationReport",
    "Localizer",
    "MapConfig",
    "evaluate_localization",
    "localization_map",
]

#: The report's hit counts: the map's peak in a box, within the tolerance, its box at IoU >= 0.5; the same for
#: the image centre and the whole image (the baselines).
REPORT_COLUMNS = ("pointing", "pointing_tol", "corloc", "centre", "centre_tol", "whole_image")


@dataclass
class LocalizationReport:
    """Pointing accuracy and CorLoc of one head's maps on labelled images, beside the baselines.

    For every image and every class with a non-difficult object in it (a *pair*): does the
    map's peak lie in one of the class's boxes (``pointing``), within ``tolerance`` pixels of
    one (``pointing_tol``), and does the map's box overlap one with IoU ≥ 0.5 (``corloc``).
    The baselines are the image centre (pointing) and the whole image (CorLoc).

    Attributes
    ----------
    classes : tuple of str
    pairs : ndarray (C,), int
    hits : dict of str -> ndarray (C,), int
        ``pointing``, ``pointing_tol``, ``corloc``, ``centre``, ``centre_tol``, ``whole_image``.
    method, objective : str
    tolerance : int
    n_images : int
    seconds_per_image : float
        Map making only (backbone, head and fusion), not reading annotations, per mapped image.
    skipped : list of str
        ``"path: reason"`` of images whose map could not be made (a missing or changed file);
        their pairs are not counted.
    runtime : str
        What ran the dense trunk of the maps (cam and combined methods; '' for window maps,
        which read cached features).
    """

    classes: tuple
    pairs: np.ndarray
    hits: dict
    method: str
    objective: str
    tolerance: int
    n_images: int
    seconds_per_image: float
    stride: int = 8
    box_threshold: float = BOX_THRESHOLD
    skipped: list = field(default_factory=list)
    runtime: str = ""

    COLUMNS = REPORT_COLUMNS

    def rate(self, column: str, cls: Optional[int] = None) -> float:
        """Share of pairs (of one class, or of all) that ``column`` gets right (nan without pairs)."""
        n = self.pairs.sum() if cls is None else self.pairs[cls]
        k = self.hits[column].sum() if cls is None else self.hits[column][cls]
        return float(k / n) if n else float("nan")

    def to_dict(self) -> dict:
        overall = {c: self.rate(c) for c in self.COLUMNS}
        per_class = {name: {"pairs": int(self.pairs[i]), **{c: self.rate(c, i) for c in self.COLUMNS}}
                     for i, name in enumerate(self.classes) if self.pairs[i]}
        return {"method": self.method, "objective": self.objective, "tolerance": self.tolerance,
                "stride": self.stride, "box_threshold": self.box_threshold, "images": self.n_images,
                "pairs": int(self.pairs.sum()), "seconds_per_image": self.seconds_per_image, "runtime": self.runtime,
                "overall": overall, "per_class": per_class, "skipped": list(self.skipped)}

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON (rates without pairs as null)."""
        return json_text(self.to_dict(), indent=2)

    def to_csv(self) -> str:
        which = [(name, i) for i, name in enumerate(self.classes) if self.pairs[i]] + [("all", None)]
        return csv_text([["class", "pairs", *self.COLUMNS]] + [
            [name, int(self.pairs.sum() if i is None else self.pairs[i]), *(f"{self.rate(c, i):.4f}" for c in
                                                                             self.COLUMNS)] for name, i in which])

    def to_text(self) -> str:
        t = self.tolerance
        head = (f"{self.method} maps of {article(self.objective)} {self.objective} head: {self.n_images} images, "
                f"{int(self.pairs.sum())} image-class pairs, {self.seconds_per_image:.2f} s per image"
                + (f" ({self.runtime})" if self.runtime else ""))
        names = [printable(c) for c in self.classes]
        width = max([len(c) for c in names] + [5])
        lines = [head, f"{'class':<{width}} {'pairs':>5}  {'point':>6} {f'±{t}px':>6} {'CorLoc':>6}  "
                       f"{'centre':>6} {f'±{t}px':>6} {'image':>6}"]
        rows = [(name, i) for i, name in enumerate(names) if self.pairs[i]] + [("all", None)]
        for name, i in rows:
            n = int(self.pairs.sum() if i is None else self.pairs[i])
            r = [100 * self.rate(c, i) for c in self.COLUMNS]
            lines.append(f"{name:<{width}} {n:>5}  {r[0]:>6.1f} {r[1]:>6.1f} {r[2]:>6.1f}  {r[3]:>6.1f} {r[4]:>6.1f} "
                         f"{r[5]:>6.1f}")
        lines.append("point: the map's peak in a box of the class; CorLoc: its box at IoU >= 0.5; centre: the image "
                     "centre; image: the whole image as the box (%)")
        if self.skipped:
            lines.append(f"{len(self.skipped)} image(s) could not be mapped and are not counted, e.g. "
                         f"{self.skipped[0]}")
        return "\n".join(lines)


def _distance(x: float, y: float, boxes: np.ndarray) -> np.ndarray:
    """Pixels from a point to each box (0 inside or on the edge)."""
    dx = np.maximum(np.maximum(boxes[:, 0] - x, x - boxes[:, 2]), 0)
    dy = np.maximum(np.maximum(boxes[:, 1] - y, y - boxes[:, 3]), 0)
    return np.hypot(dx, dy)


def _iou(box: tuple, boxes: np.ndarray) -> np.ndarray:
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return inter / np.maximum(union, 1e-12)


def _ground_truth(cache: FeatureCache, head, reports: Mapping):
    """The data set the cache was extracted from (its boxes), as an ``ImageSet``, once the head is checked
    against the cache and the ``reports`` to write against the data set's files (before any map is made)."""
    head.check_cache(cache)
    ds = cache.provenance.dataset
    root, layout = ds.root, ds.layout
    if not root:
        raise EvalError(f"{cache.path}: the data set is not recorded; pointing needs its boxes")
    if layout in ("folders", "plain"):
        raise EvalError(f"{cache.path}: extracted from a {layout} layout, which has no object boxes; pointing "
                        "and CorLoc need boxes (VOC or COCO)")
    try:
        dataset = read_dataset(root, layout=layout or "auto", annotations=ds.annotations,
                               classes=tuple(cache.classes))
    except (DatasetError, OSError) as e:
        raise EvalError(f"{root}: cannot read the boxes of the data set the cache was extracted from ({e})") from None
    try:
        check_not_inputs(reports, {"a file of the data set": dataset.files_read()})
    except FeaturecacheError as e:
        raise EvalError(e.message, param=e.param) from None
    return dataset


def evaluate_localization(head, cache: Union[str, Path, FeatureCache], *, split: Optional[str] = None,
                          config: Optional[MapConfig] = None, tolerance: int = POINTING_TOLERANCE,
                          progress: Optional[bool] = None, reports: Optional[Mapping] = None,
                          **options) -> LocalizationReport:
    """Pointing accuracy and CorLoc of a head's maps on a cache's labelled images.

    Parameters
    ----------
    head : TrainedHead or path
    cache : path, FeatureCache or MemoryCache
        Its images' boxes are read from the data set it was extracted from (VOC or COCO).
    split : str, optional
        Only the cache's images of this split (e.g. ``val``: images the head did not train on).
    config : MapConfig, optional
    tolerance : int
        Pixels the peak may miss a box by for ``pointing_tol``.
    progress : bool, optional
        A progress bar (default: when the output is a terminal).
    reports : mapping, optional
        Files the report will be written to (parameter -> path): refused first if one is read.
    **options
        Fields of :class:`MapConfig` over those of ``config``.

    Returns
    -------
    LocalizationReport
    """
    LOCALIZE["tolerance"].check(tolerance, EvalError)
    config = (maker := Localizer(as_head(head), replace(config or MapConfig(), **options))).config
    classes = tuple(maker.head.classes)
    pairs, hits = np.zeros(len(classes), np.int64), {c: np.zeros(len(classes), np.int64) for c in REPORT_COLUMNS}
    seconds, mapped, skipped = 0.0, 0, []
    with open_cache(cache, split=split) as data:
        truth = {r.relpath: r for r in _ground_truth(data, maker.head, reports or {}).records}
        paths = data.images.path
        if not paths:
            raise EvalError(f"{data.path}: no images" + (f" in split {split!r}" if split else ""), param="split")
        bar = tqdm(range(len(paths)), unit="image", desc="maps", disable=None if progress is None else not progress)
        for pos in bar:
            rec = truth.get(paths[pos])
            if rec is None:
                raise EvalError(f"{paths[pos]}: not in the data set the cache was extracted from any more")
            present = sorted({classes.index(c) for c, d in zip(rec.classes, rec.difficult) if not d})
            if not present:
                continue
            t0 = time.perf_counter()
            try:
                m = maker.cache_map(data, pos)
            except ImageFileError as e:  # this image's file; other errors are settings every map shares
                logger.warning("skipped in the evaluation: %s", e.message)
                skipped.append(e.message)
                continue
            seconds += time.perf_counter() - t0
            mapped += 1
            _score_pairs(m, rec, present, tolerance, config.box_threshold, pairs, hits)
    if not mapped and skipped:
        raise EvalError(f"no image could be mapped: {skipped[0]}")
    return LocalizationReport(classes, pairs, hits, config.method, maker.head.objective, int(tolerance), len(paths),
                              seconds / max(mapped, 1), config.stride, config.box_threshold, skipped,
                              maker.runtime_used())


def _score_pairs(m: LocalizationMap, rec, present: Sequence[int], tolerance: int, threshold: float,
                 pairs: np.ndarray, hits: dict) -> None:
    names = np.array(rec.classes)
    cx, cy = rec.width / 2, rec.height / 2
    whole = (0.0, 0.0, float(rec.width), float(rec.height))
    for c in present:
        boxes = np.asarray(rec.boxes, np.float64)[names == m.classes[c]]
        _, x, y = m.peak(c)
        d, dc = _distance(x, y, boxes), _distance(cx, cy, boxes)
        pairs[c] += 1
        for column, hit in (("pointing", d.min() <= 0), ("pointing_tol", d.min() <= tolerance),
                            ("corloc", _iou(m.box(c, threshold=threshold), boxes).max() >= CORLOC_IOU),
                            ("centre", dc.min() <= 0), ("centre_tol", dc.min() <= tolerance),
                            ("whole_image", _iou(whole, boxes).max() >= CORLOC_IOU)):
            hits[column][c] += bool(hit)

