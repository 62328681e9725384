"""Evaluation: VOC-style average precision of image scores and patch-level reports.

Scores come from a :class:`~featurecache.heads.trained.TrainedHead` (patch heads' patch
probabilities are pooled into image scores as :mod:`featurecache.heads.pooling` describes);
this module turns them into AP and tables and knows no estimator.

Average precision is :mod:`featurecache.metrics`'s (VOC 2007 11-point, VOC 2010+ area, or
uninterpolated). Localisation maps and their evaluation are :mod:`featurecache.localize`'s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

import numpy as np

from featurecache.cache import FeatureCache, open_cache
from featurecache.errors import EvalError, HeadError
from featurecache.heads.pooling import DEFAULT_POWER, SCORE_POOLINGS, pool_scores, pooling_key
from featurecache.heads.trained import TrainedHead
from featurecache.metrics import METHODS, average_precision, per_class_ap
from featurecache.outputs import csv_text, json_text, printable
from featurecache.patches import AMBIGUOUS
from featurecache.resources import apply_threads

__all__ = [
    "METHODS",
    "POOLINGS",
    "POOLED",
    "EvalReport",
    "ReportSettings",
    "average_precision",
    "evaluate",
    "image_scores",
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
        return json_text(self.to_dict())

    def to_csv(self) -> str:
        rows = [["class", "ap", "positives"]]
        rows += [[c, "" if np.isnan(a) else f"{a:.6f}", int(n)] for c, a, n in zip(self.classes, self.ap,
                                                                                   self.positives)]
        rows.append(["mAP", "" if np.isnan(self.mean_ap) else f"{self.mean_ap:.6f}", int(sum(self.positives))])
        return csv_text(rows)

    def to_text(self) -> str:
        pool = self.scoring or (f"power k={self.k:g}" if self.pooling == "power" else self.pooling)
        n_cls = int(np.sum(~np.isnan(np.asarray(self.ap, dtype=float))))
        lines = [f"mAP {100 * self.mean_ap:.1f}  ({self.method} AP, {pool} pooling, objective {self.objective}, "
                 f"{self.head} head; {self.n_images} images, {n_cls} classes with positives)"]
        names = [printable(c) for c in self.classes]
        width = max([len(c) for c in names] + [5])
        lines.append(f"{'class':<{width}}  {'AP':>6}  {'positives':>9}")
        for c, a, n in zip(names, self.ap, self.positives):
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


@dataclass(frozen=True)
class ReportSettings:
    """How image scores were made and are measured, as an :class:`EvalReport` records them."""

    method: str = "voc07"
    pooling: str = ""
    k: float = 0.0
    head: str = ""
    objective: str = "patch"
    cache: str = ""


#: A patch head's report unless told otherwise: power pooling at the default k.
POOLED = ReportSettings(pooling="power", k=DEFAULT_POWER)


def _settings(settings: Optional[ReportSettings], default: ReportSettings, fields: dict) -> ReportSettings:
    """``settings`` (default ``default``) with ``fields`` (:class:`ReportSettings` fields by name) over it."""
    return replace(settings or default, **fields)


def report_from_probabilities(probs: np.ndarray, cache, settings: Optional[ReportSettings] = None,
                              **fields) -> EvalReport:
    """An :class:`EvalReport` from patch probabilities of a cache's selected patches (``settings``:
    default :data:`POOLED`, with ``fields`` over it)."""
    t = cache.images
    local = np.searchsorted(t.row, cache.image_index)
    settings = _settings(settings, POOLED, {"cache": str(cache.path), **fields})
    return report_from_arrays(probs, local, t.labels, t.difficult, cache.classes, patch_labels=cache.labels,
                              settings=settings)


def report_from_arrays(probs: np.ndarray, image_index: np.ndarray, image_labels: np.ndarray,
                       image_difficult: np.ndarray, classes, *, patch_labels: Optional[np.ndarray] = None,
                       settings: Optional[ReportSettings] = None, **fields) -> EvalReport:
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
    settings : ReportSettings, optional
        Default :data:`POOLED`; ``fields`` (``pooling``, ``k``, ``method`` ...) over it.
    """
    settings = _settings(settings, POOLED, fields)
    scores = pool_scores(probs, image_index, len(image_labels), pooling=settings.pooling, k=settings.k)
    report = report_from_image_scores(scores, image_labels, image_difficult, classes, settings=settings)
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
                             settings: Optional[ReportSettings] = None, **fields) -> EvalReport:
    """An :class:`EvalReport` from image scores ``(M, C)`` (any objective's); ``settings`` (default
    :class:`ReportSettings`) with ``fields`` over it."""
    s = _settings(settings, ReportSettings(), fields)
    ap, npos = per_class_ap(scores, image_labels, image_difficult, method=s.method)
    valid = ~np.isnan(ap)
    return EvalReport(
        classes=tuple(classes), ap=[float(a) for a in ap], positives=[int(n) for n in npos],
        mean_ap=float(ap[valid].mean()) if valid.any() else float("nan"), method=s.method, pooling=s.pooling,
        k=float(s.k), n_images=len(image_labels), n_patches=0, head=s.head, objective=s.objective, cache=s.cache,
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
        Exponent of ``power`` (default 5, :data:`~featurecache.heads.pooling.DEFAULT_POWER`); refused for
        image-level heads, as ``pooling``.
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
                report = _pooled_report(head, c, pooling_key(label, k), method=method)
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
    pass over the cache (:meth:`TrainedHead.pooled_scores`, the route of its image scores too):
    probabilities aggregated chunk by chunk, none kept.

    Returns
    -------
    scores : dict
        ``(pooling, k)`` -> image scores ``(M, C)``.
    report : tuple
        :func:`patch_report`'s ``(confusion, labelled patches, accuracy)``.
    """
    conf = np.zeros((len(cache.classes) + 1,) * 2, np.int64)

    def count(probs, labels):
        conf[...] += confusion(probs, labels)

    scores = head.pooled_scores(cache, poolings, each=count)
    return scores, confusion_report(conf)


def _pooled_report(head: TrainedHead, cache, key: tuple, *, method: str) -> EvalReport:
    """A patch head's report (:func:`pooled_scores` at one ``(pooling, k)``)."""
    t = cache.images
    scores, patch = pooled_scores(head, cache, [key])
    report = report_from_image_scores(scores[key], t.labels, t.difficult, cache.classes, method=method,
                                      pooling=key[0], k=key[1])
    report.n_patches = cache.num_patches
    report.confusion, report.labelled_patches, report.patch_accuracy = patch
    return report
