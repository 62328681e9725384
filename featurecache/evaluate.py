"""Evaluation: VOC-style average precision of image scores, patch-level reports, localisation maps.

Scores come from a :class:`~featurecache.heads.trained.TrainedHead` (patch heads' patch
probabilities are pooled into image scores as :mod:`featurecache.heads.pooling` describes);
this module turns them into AP and tables and knows no estimator.

Average precision is :mod:`featurecache.metrics`'s (VOC 2007 11-point, VOC 2010+ area, or
uninterpolated).

:func:`localization_map` averages a head's patch scores per pixel (the paper's localisation).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from featurecache.cache import FeatureCache, open_cache
from featurecache.errors import EvalError, HeadError
from featurecache.extract import load_rgb, to_rgb
from featurecache.heads.pooling import SCORE_POOLINGS, ScorePooler, pool_scores
from featurecache.heads.trained import TrainedHead
from featurecache.metrics import METHODS, average_precision, per_class_ap
from featurecache.overlay import MAX_SIDE, render_overlay, save_png
from featurecache.patches import AMBIGUOUS
from featurecache.resources import apply_threads

__all__ = [
    "METHODS",
    "POOLINGS",
    "EvalReport",
    "LocalizationMap",
    "average_precision",
    "evaluate",
    "image_scores",
    "localization_map",
    "patch_probabilities",
    "per_class_ap",
    "pooled_scores",
    "report_from_arrays",
    "report_from_image_scores",
    "report_from_probabilities",
]

POOLINGS = SCORE_POOLINGS

#: Patch probabilities to image scores (:func:`featurecache.heads.pooling.pool_scores`).
image_scores = pool_scores


@dataclass
class EvalReport:
    """Per-class AP, mAP and the patch-level report of one head on one cache."""

    classes: tuple
    ap: list
    positives: list
    mean_ap: float
    method: str
    pooling: str
    k: float
    n_images: int
    n_patches: int
    patch_accuracy: Optional[float] = None
    labelled_patches: int = 0
    confusion: Optional[list] = None
    head: str = ""
    objective: str = "patch"
    cache: str = ""
    extra: dict = field(default_factory=dict)
    scoring: str = ""
    #: The image scores (M, C) and labels behind the APs, for plots; not written to JSON or CSV.
    scores: Optional[np.ndarray] = field(default=None, repr=False)
    labels: Optional[np.ndarray] = field(default=None, repr=False)
    difficult: Optional[np.ndarray] = field(default=None, repr=False)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("scores", "labels", "difficult")}
        d["ap"] = [None if np.isnan(a) else float(a) for a in self.ap]
        d["mean_ap"] = None if np.isnan(self.mean_ap) else float(self.mean_ap)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["class", "ap", "positives"])
        for c, a, n in zip(self.classes, self.ap, self.positives):
            w.writerow([c, "" if np.isnan(a) else f"{a:.6f}", int(n)])
        w.writerow(["mAP", "" if np.isnan(self.mean_ap) else f"{self.mean_ap:.6f}", int(sum(self.positives))])
        return buf.getvalue()

    def to_text(self) -> str:
        pool = self.scoring or (f"power k={self.k:g}" if self.pooling == "power" else self.pooling)
        n_cls = int(np.sum(~np.isnan(np.asarray(self.ap, dtype=float))))
        lines = [f"mAP {100 * self.mean_ap:.1f}  ({self.method} AP, {pool} pooling, objective {self.objective}, "
                 f"{self.head} head; {self.n_images} images, {n_cls} classes with positives)"]
        width = max([len(c) for c in self.classes] + [5])
        lines.append(f"{'class':<{width}}  {'AP':>6}  {'positives':>9}")
        for c, a, n in zip(self.classes, self.ap, self.positives):
            lines.append(f"{c:<{width}}  {'-' if np.isnan(a) else f'{100 * a:.1f}':>6}  {int(n):>9}")
        if self.extra.get("selection"):
            lines.append(self.extra["selection"])
        if self.patch_accuracy is not None:
            lines.append(f"patch accuracy {100 * self.patch_accuracy:.1f}% on {self.labelled_patches:,} labelled "
                         f"patches (background included, ambiguous excluded)")
        return "\n".join(lines)


def patch_probabilities(head: TrainedHead, cache, *, chunk_size: int = 65536) -> np.ndarray:
    """Head outputs ``(N, 1 + C)`` for the selected patches of a cache, read chunk by chunk."""
    return head.patch_probabilities(cache, chunk_size=chunk_size)


def report_from_probabilities(probs: np.ndarray, cache, *, pooling: str = "power", k: float = 5.0,
                              method: str = "voc07", head: str = "", objective: str = "patch") -> EvalReport:
    """An :class:`EvalReport` from patch probabilities of a cache's selected patches."""
    t = cache.images
    local = np.searchsorted(t.row, cache.image_index)
    return report_from_arrays(probs, local, t.labels, t.difficult, cache.classes, patch_labels=cache.labels,
                              pooling=pooling, k=k, method=method, head=head, objective=objective,
                              cache=str(cache.path))


def report_from_arrays(probs: np.ndarray, image_index: np.ndarray, image_labels: np.ndarray,
                       image_difficult: np.ndarray, classes, *, patch_labels: Optional[np.ndarray] = None,
                       pooling: str = "power", k: float = 5.0, method: str = "voc07", head: str = "",
                       objective: str = "patch", cache: str = "") -> EvalReport:
    """An :class:`EvalReport` from in-memory arrays.

    Parameters
    ----------
    probs : ndarray (N, 1 + C)
        Patch outputs.
    image_index : ndarray (N,)
        Image of each patch, in ``0 .. M - 1``.
    image_labels, image_difficult : ndarray (M, C) bool
    classes : sequence of str
    patch_labels : ndarray (N,), optional
        For the patch-level accuracy and confusion matrix.
    """
    scores = pool_scores(probs, image_index, len(image_labels), pooling=pooling, k=k)
    report = report_from_image_scores(scores, image_labels, image_difficult, classes, method=method,
                                      pooling=pooling, k=k, head=head, objective=objective, cache=cache)
    report.n_patches = len(probs)
    if patch_labels is not None:
        report.confusion, report.labelled_patches, report.patch_accuracy = patch_report(probs, patch_labels)
    return report


def patch_report(probs: np.ndarray, patch_labels: np.ndarray) -> tuple:
    """``(confusion matrix as lists, labelled patches, patch accuracy or None)``; ambiguous patches left out."""
    return confusion_report(confusion(probs, patch_labels))


def confusion(probs: np.ndarray, patch_labels: np.ndarray) -> np.ndarray:
    """Counts ``(1 + C, 1 + C)`` of (true label, most probable output) over labelled patches (sums over chunks)."""
    patch_labels = np.asarray(patch_labels, np.int64)  # int64: label * n_out must not overflow a small type
    lab = patch_labels != AMBIGUOUS
    n_out = probs.shape[1]
    pred = probs[lab].argmax(1)
    return np.bincount(patch_labels[lab] * n_out + pred, minlength=n_out * n_out).reshape(n_out, n_out)


def confusion_report(conf: np.ndarray) -> tuple:
    """:func:`patch_report`'s triple from a confusion matrix."""
    labelled = int(conf.sum())
    return conf.tolist(), labelled, float(np.trace(conf) / labelled) if labelled else None


def report_from_image_scores(scores: np.ndarray, image_labels: np.ndarray, image_difficult: np.ndarray, classes, *,
                             method: str = "voc07", pooling: str = "", k: float = 0.0, head: str = "",
                             objective: str = "patch", cache: str = "") -> EvalReport:
    """An :class:`EvalReport` from image scores ``(M, C)`` (any objective's)."""
    ap, npos = per_class_ap(scores, image_labels, image_difficult, method=method)
    valid = ~np.isnan(ap)
    return EvalReport(
        classes=tuple(classes), ap=[float(a) for a in ap], positives=[int(n) for n in npos],
        mean_ap=float(ap[valid].mean()) if valid.any() else float("nan"), method=method, pooling=pooling,
        k=float(k), n_images=len(image_labels), n_patches=0, head=head, objective=objective, cache=cache,
        scores=np.asarray(scores), labels=np.asarray(image_labels, bool), difficult=np.asarray(image_difficult, bool))


def evaluate(head, cache: Union[str, Path, FeatureCache], *, split: Optional[str] = None,
             pooling: Optional[str] = None, k: Optional[float] = None, method: str = "voc07",
             threads: Optional[int] = None) -> EvalReport:
    """Score every image of a cache with a trained head and report AP per class.

    Parameters
    ----------
    head : TrainedHead or path
        A trained head, or its file. Refused when its feature fingerprint or classes
        differ from the cache's.
    cache : path, FeatureCache or MemoryCache
    split : str, optional
        Evaluate on the images of this split only.
    pooling : {"power", "max", "mean"}, optional
        Patch heads: how patch scores become image scores (default ``power``). Refused for
        image-level heads (``image``, ``mil``, ``hybrid``), which score images themselves.
    k : float, optional
        Exponent of ``power`` (default 5); refused for image-level heads, as ``pooling``.
    method : {"voc07", "all", "raw"}
    threads : int, optional
        CPU threads (:func:`featurecache.resources.cpu_threads`).

    Returns
    -------
    EvalReport
    """
    apply_threads(threads)
    head = head if isinstance(head, TrainedHead) else TrainedHead.load(head)
    if pooling is not None and pooling not in POOLINGS:
        raise EvalError(f"must be one of {', '.join(POOLINGS)}, got {pooling!r}", param="pooling")
    if method not in METHODS:
        raise EvalError(f"must be one of {', '.join(METHODS)}, got {method!r}", param="method")
    with open_cache(cache, split) as c:
        head.check_cache(c)
        try:
            label, text = head.scoring(pooling=pooling, k=k)
            if head.spec.pools_patches:
                report = _pooled_report(head, c, pooling=label, k=5.0 if k is None else k, method=method)
            else:
                t = c.images
                report = report_from_image_scores(head.image_scores(c, pooling=pooling, k=k), t.labels, t.difficult,
                                                  c.classes, method=method, pooling=label)
                report.n_patches = c.num_patches
        except HeadError as e:
            raise EvalError(e.message, param=e.param) from None
    report.head, report.objective, report.cache, report.scoring = head.kind, head.objective, str(c.path), text
    if head.selection_line():
        report.extra["selection"] = head.selection_line()
    return report


def pooled_scores(head: TrainedHead, cache, poolings) -> tuple:
    """A patch head's image scores for each ``(pooling, k)`` in ``poolings`` and its patch report, from one
    pass over the cache: probabilities aggregated chunk by chunk, none kept.

    Returns
    -------
    scores : dict
        ``(pooling, k)`` -> image scores ``(M, C)``.
    report : tuple
        :func:`patch_report`'s ``(confusion, labelled patches, accuracy)``.
    """
    n_classes = len(cache.classes)
    poolers = {key: ScorePooler(cache.num_images, n_classes, pooling=key[0], k=key[1]) for key in set(poolings)}
    conf = np.zeros((n_classes + 1,) * 2, np.int64)
    with contextlib.closing(head.probability_chunks(cache)) as chunks:
        for probs, local, labels in chunks:
            for pooler in poolers.values():
                pooler.add(probs, local)
            conf += confusion(probs, labels)
    return {key: p.result() for key, p in poolers.items()}, confusion_report(conf)


def _pooled_report(head: TrainedHead, cache, *, pooling: str, k: float, method: str) -> EvalReport:
    """A patch head's report (:func:`pooled_scores` at one pooling)."""
    t = cache.images
    scores, patch = pooled_scores(head, cache, [(pooling, k)])
    report = report_from_image_scores(scores[(pooling, k)], t.labels, t.difficult, cache.classes, method=method,
                                      pooling=pooling, k=k)
    report.n_patches = cache.num_patches
    report.confusion, report.labelled_patches, report.patch_accuracy = patch
    return report


# --------------------------------------------------------------------------- localisation


@dataclass
class LocalizationMap:
    """Per-class maps of one image: each cell is the mean score of the patches covering it.

    Attributes
    ----------
    path : str
        The image, as the cache stores it.
    classes : tuple of str
    scores : ndarray (C, ceil(height / stride), ceil(width / stride)), float32
        Per-pixel average of the patch scores (Oquab et al., 2014, §4: localisation); 0 where
        no patch covers a cell.
    stride : int
        Pixels per cell.
    width, height : int
        The image's size in pixels.
    objective : str
        Which objective's head produced the patch scores.
    image_file : str
        The image file, when known ('' otherwise): what :meth:`picture` draws on.
    """

    path: str
    classes: tuple
    scores: np.ndarray
    stride: int
    width: int
    height: int
    objective: str
    image_file: str = ""

    def class_index(self, cls: Union[int, str, None] = None) -> int:
        """A class's row in :attr:`scores`; ``None``: the class whose map peaks highest."""
        if cls is None:
            return int(np.argmax(self.scores.reshape(len(self.classes), -1).max(1)))
        if isinstance(cls, str):
            if cls not in self.classes:
                raise EvalError(f"no class {cls!r}; classes: {', '.join(self.classes)}", param="cls")
            return self.classes.index(cls)
        if not 0 <= int(cls) < len(self.classes):
            raise EvalError(f"no class {cls} (there are {len(self.classes)})", param="cls")
        return int(cls)

    def peak(self, cls: Union[int, str]) -> tuple:
        """``(score, x, y)``: the highest cell of a class, at its centre in image pixels."""
        c = self.class_index(cls)
        iy, ix = np.unravel_index(int(np.argmax(self.scores[c])), self.scores[c].shape)
        return float(self.scores[c, iy, ix]), (ix + 0.5) * self.stride, (iy + 0.5) * self.stride

    def picture(self, cls: Union[int, str, None] = None, *, image=None, caption: Optional[str] = None,
                max_side: int = MAX_SIDE):
        """The map of one class drawn over its image (:func:`featurecache.overlay.render_overlay`).

        Parameters
        ----------
        cls : int or str, optional
            Default: the class whose map peaks highest.
        image : ndarray (H, W, 3) or PIL image, optional
            Default: :attr:`image_file`, decoded.
        caption : str, optional
            Default: the class name and its map's peak.
        max_side : int
            Pictures of larger images are scaled down to this longer side.

        Returns
        -------
        PIL.Image.Image
        """
        c = self.class_index(cls)
        if image is None:
            if not self.image_file:
                raise EvalError(f"{self.path}: the image file is not known; pass the image", param="image")
            try:
                image = load_rgb(self.image_file)
            except Exception as e:  # PIL raises many kinds for a corrupt or vanished file
                raise EvalError(f"{self.image_file}: cannot read the image ({type(e).__name__})") from None
        image = to_rgb(image) if not isinstance(image, np.ndarray) else image
        size = image.shape[1::-1]
        if tuple(size) != (self.width, self.height):
            raise EvalError(f"{self.image_file or self.path}: image is {size[0]}x{size[1]}, the map's "
                            f"{self.width}x{self.height}", param="image")
        if caption is None:
            caption = f"{self.classes[c]}  map {self.scores[c].min():.2f}-{self.peak(c)[0]:.2f}"
        return render_overlay(image, self.scores[c], stride=self.stride, caption=caption, max_side=max_side)

    def save_png(self, path: Union[str, Path], cls: Union[int, str, None] = None, **options) -> Path:
        """Write :meth:`picture` (same options) as a PNG."""
        return save_png(self.picture(cls, **options), path)

    def save(self, path: Union[str, Path]) -> Path:
        """Write an ``.npz``: ``scores``, ``classes``, ``stride``, ``width``, ``height``, ``image``."""
        path = Path(path)
        np.savez_compressed(path, scores=self.scores, classes=np.array(self.classes), stride=self.stride,
                            width=self.width, height=self.height, image=self.path)
        return path

    def to_text(self, top: int = 3) -> str:
        best = np.argsort([-self.scores[c].max() for c in range(len(self.classes))])[:top]
        parts = []
        for c in best:
            s, x, y = self.peak(int(c))
            parts.append(f"{self.classes[c]} {s:.3f} at ({x:.0f}, {y:.0f})")
        return (f"{self.path} ({self.width}x{self.height}, {self.stride}-px cells, objective {self.objective}): "
                + "; ".join(parts))


def _find_image(cache: FeatureCache, image: Union[int, str]) -> int:
    paths = cache.images.path
    if isinstance(image, (int, np.integer)):
        if not 0 <= int(image) < len(paths):
            raise EvalError(f"{cache.path}: no image {image} (it has {len(paths)})")
        return int(image)
    text = str(image)
    hits = [i for i, p in enumerate(paths) if p == text or p.endswith("/" + text) or Path(p).stem == text]
    if len(hits) != 1:
        raise EvalError(f"{cache.path}: {'no' if not hits else f'{len(hits)}'} image(s) match {text!r}"
                        + ("" if hits else f" (e.g. {paths[0]})" if paths else ""))
    return hits[0]


def localization_map(head, cache: Union[str, Path, FeatureCache], image: Union[int, str], *,
                     stride: int = 8) -> LocalizationMap:
    """Per-class localisation map of one cached image: per-pixel average of its patch scores.

    Parameters
    ----------
    head : TrainedHead or path
        A ``patch`` head (class probabilities of each patch) or a ``mil``/``hybrid`` head
        (per-class patch scores σ(z)). ``image`` heads score pooled features, not patches,
        and are refused.
    cache : path, FeatureCache or MemoryCache
    image : int or str
        Row of the cache's image table, or the image's stored path (or its file name, or
        its stem).
    stride : int
        Cell size of the map in pixels.

    Returns
    -------
    LocalizationMap
    """
    if stride < 1:
        raise EvalError(f"must be a positive number of pixels, got {stride}", param="stride")
    head = head if isinstance(head, TrainedHead) else TrainedHead.load(head)
    if not head.spec.patch_scores:
        raise EvalError(f"an {head.objective}-objective head scores pooled image features, not patches; "
                        "localisation needs a patch, mil or hybrid head")
    with open_cache(cache) as full:
        head.check_cache(full)
        with full.select([_find_image(full, image)]) as one:
            X, boxes = one.read_features(), one.boxes.astype(np.float64)
            w, h, path = int(one.images.width[0]), int(one.images.height[0]), one.images.path[0]
        root = (full.attrs.get("dataset") or {}).get("root")
    maps = _per_pixel_mean(head.patch_scores(X), boxes, w, h, stride)
    return LocalizationMap(path, tuple(head.classes), maps, int(stride), w, h, head.objective,
                           str(Path(root) / path) if root else "")


def _per_pixel_mean(scores: np.ndarray, boxes: np.ndarray, w: int, h: int, stride: int) -> np.ndarray:
    """``(C, ceil(h / stride), ceil(w / stride))``: each cell's mean score over the patches covering it."""
    gh, gw = -(-h // stride), -(-w // stride)
    # Cells a patch covers (any overlap), as half-open index ranges.
    x0 = np.clip(np.floor(boxes[:, 0] / stride), 0, gw).astype(int)
    y0 = np.clip(np.floor(boxes[:, 1] / stride), 0, gh).astype(int)
    x1 = np.clip(np.ceil(boxes[:, 2] / stride), 0, gw).astype(int)
    y1 = np.clip(np.ceil(boxes[:, 3] / stride), 0, gh).astype(int)
    # Summed-area bookkeeping: +v at the top-left corner, -v past each edge, +v past both.
    n_cls = scores.shape[1]
    total = np.zeros((n_cls + 1, gh + 1, gw + 1))
    vals = np.concatenate([scores.T, np.ones((1, len(scores)))]).astype(np.float64)  # last row counts patches
    for ys, xs, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
        np.add.at(total, (slice(None), ys, xs), sign * vals)
    total = total.cumsum(1).cumsum(2)[:, :gh, :gw]
    count = total[-1]
    return np.where(count > 0, total[:-1] / np.maximum(count, 1e-12), 0.0).astype(np.float32)
