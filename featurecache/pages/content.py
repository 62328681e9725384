"""What a report shows, as numbers: one head scored on one cache, gathered by the library's own functions.

AP and mAP are :func:`featurecache.evaluate.evaluate`'s (the numbers ``eval --json`` writes), the
intervals :mod:`featurecache.metrics`'s bootstrap over images (mAP: :func:`bootstrap_map`; a class's
AP: the same function on that class's column), the curves :func:`~featurecache.metrics.precision_recall`,
the localisation summary :func:`featurecache.localize.evaluate_localization` (``localize --evaluate
--json``'s), the maps :class:`featurecache.maps.Localizer`'s. Nothing here writes HTML:
:mod:`featurecache.pages.page` does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np

from featurecache.cache import open_cache
from featurecache.datasets import read_dataset
from featurecache.errors import DatasetError, EvalError, FeaturecacheError, ReportError
from featurecache.evaluate import EvalReport, evaluate
from featurecache.heads.trained import TrainedHead
from featurecache.localize import LocalizationReport, evaluate_localization
from featurecache.maps import ImageFileError, Localizer, MapConfig, as_head
from featurecache.metrics import bootstrap_map, bootstrap_weights, interval, precision_recall
from featurecache.resources import BOX_THRESHOLD, POINTING_TOLERANCE
from featurecache.settings import IMAGES_PER_GROUP, REPORT, check_fields

logger = logging.getLogger(__name__)

__all__ = ["CURVE_POINTS", "GROUPS", "ImageEntry", "MapEntry", "ReportConfig", "ReportContent", "gather"]

#: The images shown per class: top-scoring, highest-scoring negatives, lowest-scoring positives.
GROUPS = ("top", "fp", "miss")

#: Most points of a precision-recall curve on the page (a longer curve is thinned, its ends kept).
CURVE_POINTS = 240

#: Layouts whose annotations have object boxes.
_BOX_LAYOUTS = ("voc", "coco")


@dataclass(frozen=True)
class ReportConfig:
    """How a report is made: the fields of :data:`featurecache.settings.REPORT` (checked with it).

    ``map_method`` ``auto`` draws windows maps for heads with patch scores (the cache only) and
    cam maps for the others when the image files are there; ``localization`` ``auto`` measures
    pointing and CorLoc when the data set has boxes and the maps read the cache only.
    ``resamples`` ``None``: :func:`default_resamples` (1000, fewer past 1,000 images). ``progress``: a
    progress bar while the localisation maps are made (default: on a terminal).
    """

    split: Optional[str] = None
    method: str = "voc07"
    resamples: Optional[int] = None
    seed: int = 0
    images: int = IMAGES_PER_GROUP
    map_method: str = "auto"
    localization: str = "auto"
    stride: int = 8
    box_threshold: float = BOX_THRESHOLD
    tolerance: int = POINTING_TOLERANCE
    weights: Optional[str] = None
    device: str = "auto"
    download: bool = False
    runtime: str = "auto"
    threads: Optional[int] = None
    progress: Optional[bool] = None

    def __post_init__(self) -> None:
        check_fields(self, REPORT, ReportError)

    def map_config(self, method: str) -> MapConfig:
        """The :class:`MapConfig` of maps made by ``method``."""
        return MapConfig(method=method, stride=self.stride, box_threshold=self.box_threshold, device=self.device,
                         weights=self.weights, download=self.download, runtime=self.runtime)


@dataclass
class ImageEntry:
    """One image shown: where it is, its size, its file ('' unknown) and its boxes ``(class, x0, y0, x1, y1,
    difficult)`` (empty without annotations)."""

    position: int
    path: str
    width: int
    height: int
    file: str = ""
    boxes: list = field(default_factory=list)


@dataclass
class MapEntry:
    """One class's map of one image: cell scores ``(rows, columns)``, cell size, peak ``(score, x, y)``, box."""

    cells: np.ndarray
    stride: int
    peak: tuple
    box: tuple


@dataclass
class ReportContent:
    """Every number and picture source of one report (what :func:`featurecache.pages.page.render` draws).

    Attributes
    ----------
    head : TrainedHead
    head_file, cache_file : str
    config : ReportConfig
        As used (``resamples``: the number drawn).
    provenance : Provenance
        The cache's.
    evaluation : EvalReport
        :func:`featurecache.evaluate.evaluate`'s report; ``scores``, ``labels``, ``difficult`` are its arrays.
    map_interval : tuple
        95% bootstrap interval of the mAP (NaNs without resamples).
    ap_intervals : list of tuple
        Each class's. Both within [0, 1] (:func:`featurecache.metrics.interval` places the spread of the
        resamples around the measured value, which can cross 0 or 1).
    curves : list of (precision, recall)
    thresholds : ndarray (C,)
        Each class's break-even score: that of its ``n``-th best image, ``n`` its positives (``inf``
        without positives). An image is an *error* of a class when it is a negative scoring at least
        this, or a positive scoring below it.
    errors : ndarray (M, C), bool
    galleries : list of dict
        Per class, :data:`GROUPS` -> positions of the images shown.
    images : dict
        Position -> :class:`ImageEntry` of every image shown.
    maps : dict
        ``(position, class)`` -> :class:`MapEntry`.
    map_method : str
        How the maps were made ('' none).
    localization : LocalizationReport, optional
    coscore : ndarray (C, C), int
        ``[a, b]``: positives of ``a`` (not labelled ``b``) scoring at least ``b``'s threshold; the
        diagonal: positives of ``a`` scoring at least its own.
    notes : list of str
        What could not be shown, and why.
    inputs : dict
        What the report read (name -> path or paths): no output may replace one.
    """

    head: TrainedHead
    head_file: str
    cache_file: str
    config: ReportConfig
    provenance: object
    evaluation: EvalReport
    map_interval: tuple
    ap_intervals: list
    curves: list
    thresholds: np.ndarray
    errors: np.ndarray
    galleries: list
    images: dict
    maps: dict = field(default_factory=dict)
    map_method: str = ""
    localization: Optional[LocalizationReport] = None
    coscore: Optional[np.ndarray] = None
    notes: list = field(default_factory=list)
    inputs: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    @property
    def classes(self) -> tuple:
        return tuple(self.evaluation.classes)


#: Bootstrap draws (resamples x images) by default: 1000 resamples up to 1,000 images, fewer beyond (at least
#: :data:`MIN_RESAMPLES`), so that the intervals of a 5,000-image report take seconds, not minutes.
DEFAULT_DRAWS = 1_000_000
MIN_RESAMPLES = 200


def default_resamples(n_images: int) -> int:
    """The resamples of a report whose ``resamples`` is not given: 1000, fewer past 1,000 images."""
    return int(min(1000, max(MIN_RESAMPLES, DEFAULT_DRAWS // max(n_images, 1))))


def bootstrap_intervals(ev: EvalReport, resamples: int, seed: int) -> tuple:
    """``(mAP interval, [each class's AP interval])``: 95% bootstrap intervals over images, placed around the
    measured values (:func:`featurecache.metrics.interval`); NaNs with no resamples.

    Each class's resampled APs are :func:`~featurecache.metrics.bootstrap_map` of its column; a resample's mAP
    is their mean over the classes with a positive drawn, as :func:`~featurecache.metrics.bootstrap_map`
    computes it for all columns at once (one pass instead of two).
    """
    n_classes = len(ev.classes)
    if not resamples or not ev.n_images:
        return (float("nan"),) * 2, [(float("nan"),) * 2] * n_classes
    weights = bootstrap_weights(ev.n_images, resamples, np.random.RandomState(seed))
    samples = np.full((resamples, n_classes), np.nan)
    per_class = []
    for c in range(n_classes):
        if np.isnan(ev.ap[c]):
            per_class.append((float("nan"),) * 2)
            continue
        samples[:, c] = bootstrap_map(ev.scores[:, [c]], ev.labels[:, [c]], ev.difficult[:, [c]], weights,
                                      method=ev.method)
        per_class.append(_clip(interval(samples[:, c], center=ev.ap[c])))
    counted = ~np.isnan(samples)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counted.any(1), np.where(counted, samples, 0.0).sum(1) / counted.sum(1), np.nan)
    return _clip(interval(means, center=ev.mean_ap)), per_class


def _clip(bounds: tuple) -> tuple:
    """An interval of AP kept within [0, 1] (placed around the measured value, its spread can cross either)."""
    return tuple(float(np.clip(v, 0.0, 1.0)) if np.isfinite(v) else v for v in bounds)


def thin(precision: np.ndarray, recall: np.ndarray, points: int = CURVE_POINTS) -> tuple:
    """A curve of at most ``points`` points, evenly spaced along it, its first and last kept."""
    if len(precision) <= points:
        return precision, recall
    keep = np.unique(np.linspace(0, len(precision) - 1, points).round().astype(int))
    return precision[keep], recall[keep]


def curves(ev: EvalReport) -> list:
    """Each class's precision-recall curve (thinned), difficult-only images left out as AP leaves them out."""
    out = []
    for c in range(len(ev.classes)):
        ignore = ev.difficult[:, c] & ~ev.labels[:, c]
        out.append(thin(*precision_recall(ev.scores[:, c], ev.labels[:, c], ignore=ignore)))
    return out


def break_even(ev: EvalReport) -> tuple:
    """``(thresholds (C,), errors (M, C))``: see :class:`ReportContent`."""
    scores, labels = np.asarray(ev.scores, np.float64), ev.labels
    counted = ~(ev.difficult & ~labels)
    thresholds = np.full(len(ev.classes), np.inf)
    for c in range(len(ev.classes)):
        n = int(labels[:, c].sum())
        if n:
            thresholds[c] = np.sort(scores[counted[:, c], c])[::-1][n - 1]
    errors = counted & np.where(labels, scores < thresholds, scores >= thresholds)
    return thresholds, errors


def coscore(ev: EvalReport, thresholds: np.ndarray) -> np.ndarray:
    """:class:`ReportContent`'s ``coscore``."""
    high = np.asarray(ev.scores, np.float64) >= thresholds
    labels = ev.labels
    out = np.zeros((len(ev.classes),) * 2, np.int64)
    for a in range(len(ev.classes)):
        pos = labels[:, a]
        out[a] = (high & pos[:, None] & ~labels).sum(0)
        out[a, a] = int((high[:, a] & pos).sum())
    return out


def galleries(ev: EvalReport, per_group: int) -> list:
    """Per class, :data:`GROUPS` -> positions: the ``per_group`` top-scoring images, highest-scoring negatives
    and lowest-scoring positives (ties kept in image order)."""
    out = []
    for c in range(len(ev.classes)):
        s, pos = np.asarray(ev.scores[:, c], np.float64), ev.labels[:, c]
        neg = ~pos & ~ev.difficult[:, c]
        down = np.argsort(-s, kind="stable")
        up = np.argsort(s, kind="stable")
        out.append({"top": [int(i) for i in down[:per_group]],
                    "fp": [int(i) for i in down[neg[down]][:per_group]],
                    "miss": [int(i) for i in up[pos[up]][:per_group]]})
    return out


def _dataset_boxes(provenance, classes: tuple, notes: list) -> tuple:
    """``(records by stored path, files read)`` of the data set the cache was extracted from; empty when it has
    no boxes or cannot be read (a note says which)."""
    ds = provenance.dataset
    if not ds.root or ds.layout not in _BOX_LAYOUTS:
        notes.append("no object boxes: the data set is not recorded, or its layout has none"
                     + (f" ({ds.layout})" if ds.layout else ""))
        return {}, set()
    try:
        dataset = read_dataset(ds.root, layout=ds.layout, annotations=ds.annotations, classes=classes)
    except (DatasetError, OSError) as e:
        notes.append(f"no object boxes: cannot read the data set {ds.root} ({e})")
        return {}, set()
    return {r.relpath: r for r in dataset.records}, dataset.files_read()


def image_entries(data, positions, records: dict) -> dict:
    """Position -> :class:`ImageEntry` of the images at ``positions`` of an open cache's image table."""
    t, ds = data.images, data.provenance.dataset
    out = {}
    for p in sorted(set(positions)):
        rec = records.get(t.path[p])
        boxes = [] if rec is None else [(str(c), *(float(v) for v in b), bool(d))
                                        for c, b, d in zip(rec.classes, rec.boxes, rec.difficult)]
        file = str(Path(ds.root) / t.path[p]) if ds.root else ""
        out[p] = ImageEntry(p, t.path[p], int(t.width[p]), int(t.height[p]), file, boxes)
    return out


def choose_map_method(head: TrainedHead, config: ReportConfig, images: dict) -> str:
    """The map method of the page ('' for none): ``auto`` is windows for heads with patch scores, else cam
    when the image files are there."""
    if config.map_method == "none":
        return ""
    if config.map_method != "auto":
        return config.map_method
    if head.spec.patch_scores:
        return "windows"
    files = [e.file for e in images.values()]
    return "cam" if files and all(f and Path(f).is_file() for f in files) else ""


def gallery_maps(maker: Localizer, data, galleries_: list, images: dict, notes: list) -> dict:
    """``(position, class)`` -> :class:`MapEntry` of every image shown in a class's gallery (one map per image)."""
    wanted: dict = {}
    for c, groups in enumerate(galleries_):
        for positions in groups.values():
            for p in positions:
                wanted.setdefault(p, set()).add(c)
    out = {}
    threshold = maker.config.box_threshold
    for p, classes in sorted(wanted.items()):
        try:
            m = maker.cache_map(data, p, image_file=images[p].file)
        except ImageFileError as e:  # this image's file; other errors are settings every map shares
            _note(notes, f"no map of {images[p].path}: {e.message}")
            continue
        for c in sorted(classes):
            out[(p, c)] = MapEntry(m.scores[c], m.stride, m.peak(c), m.box(c, threshold=threshold))
    return out


def measure_localization(head: TrainedHead, cache, config: ReportConfig, method: str, has_boxes: bool,
                         notes: list) -> Optional[LocalizationReport]:
    """:func:`evaluate_localization` as ``config.localization`` asks (``None`` when not measured; a note why)."""
    if config.localization == "off":
        return None
    if not method or not has_boxes:
        if config.localization == "on":
            _note(notes, "localisation not measured: " + ("no maps are drawn" if not method else "no object boxes"))
        return None
    if config.localization == "auto" and method != "windows":
        notes.append(f"localisation not measured: {method} maps run the backbone on every image; "
                     "ask for it with localization='on' (--localization on)")
        return None
    try:
        return evaluate_localization(head, cache, split=config.split, config=config.map_config(method),
                                     tolerance=config.tolerance, progress=config.progress)
    except EvalError as e:
        _note(notes, f"localisation not measured: {e}")
        return None


def _note(notes: list, text: str) -> None:
    """A note on the page about what could not be shown, logged as a warning too."""
    logger.warning("report: %s", text)
    notes.append(text)


def gather(head, cache, config: Optional[ReportConfig] = None) -> ReportContent:
    """Score ``cache`` with ``head`` and gather what the page shows (:class:`ReportContent`)."""
    config = config or ReportConfig()
    t0 = time.perf_counter()
    head_file = "" if isinstance(head, TrainedHead) else str(head)
    head = as_head(head)
    ev = evaluate(head, cache, split=config.split, method=config.method, threads=config.threads)
    seconds = {"scoring": time.perf_counter() - t0}
    resamples = default_resamples(ev.n_images) if config.resamples is None else config.resamples
    ap_interval, intervals = bootstrap_intervals(ev, resamples, config.seed)
    thresholds, errors = break_even(ev)
    shown = galleries(ev, config.images)
    notes: list = []
    with open_cache(cache, config.split) as data:
        records, dataset_files = _dataset_boxes(data.provenance, tuple(data.classes), notes)
        images = image_entries(data, [p for g in shown for ps in g.values() for p in ps], records)
        method = choose_map_method(head, config, images)
        content = ReportContent(head, head_file, str(data.path), replace(config, resamples=resamples),
                                data.provenance, ev, ap_interval, intervals, curves(ev), thresholds, errors, shown,
                                images, map_method=method, coscore=coscore(ev, thresholds), notes=notes,
                                seconds=seconds)
        t1 = time.perf_counter()
        if method:
            try:
                content.maps = gallery_maps(Localizer(head, config.map_config(method)), data, shown, images, notes)
            except FeaturecacheError as e:
                _note(notes, f"no maps: {e}")
                content.map_method = ""
        seconds["maps"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    content.localization = measure_localization(head, cache, config, content.map_method, bool(records), notes)
    seconds["localization"] = time.perf_counter() - t1
    content.inputs = {"HEAD": head_file or None, "CACHE": content.cache_file, "a file of the data set": dataset_files,
                      "an image shown": [e.file for e in images.values() if e.file]}
    return content


def with_config(config: Optional[ReportConfig], options: dict) -> ReportConfig:
    """``config`` (default :class:`ReportConfig`) with ``options`` (its fields by name) over it."""
    unknown = sorted(set(options) - set(ReportConfig.__dataclass_fields__))
    if unknown:
        raise ReportError(f"unknown report setting(s): {', '.join(unknown)}", param=unknown[0])
    return replace(config or ReportConfig(), **options)
