"""A trained head and its file: the one route from a head to patch scores and image scores on a cache."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

from featurecache.cache import describe_fingerprint_difference
from featurecache.errors import HeadError
from featurecache.heads.headfile import (
    HEAD_FORMAT,
    HEAD_FORMAT_VERSION,
    read_head_file,
    read_payload,
    to_payload,
    write_head_file,
)
from featurecache.heads.objectives import Objective, get_objective, objective_of_kind
from featurecache.heads.options import EVAL_OPTIONS
from featurecache.heads.pooling import pool_chunks, pooling_key
from featurecache.heads.recipe import Recipe, require

__all__ = ["HEAD_FORMAT", "HEAD_FORMAT_VERSION", "Recipe", "TrainedHead"]


@dataclass
class TrainedHead:
    """A fitted head with what it needs to be used safely on caches.

    Attributes
    ----------
    estimator : object
        The fitted estimator (:data:`featurecache.heads.registry.HEAD_KINDS`).
    kind : str
        Its head kind (``mlp``, ``logreg``, ``linearsvm``, ``image-logreg``, ``image-mlp``,
        ``mil``).
    classes : tuple of str
    feature_settings : dict
        The cache's, at training time; compared with a cache's before use.
    fingerprint : str
    summary : dict
        Training facts (patches per class, background weight, epochs, seconds, loss ...).
    objective : str, optional
        What it learnt from (:data:`featurecache.heads.registry.OBJECTIVES`); default: the
        summary's ``objective``, else the one the kind implies.
    recipe : Recipe, optional
        How the training cache was extracted beyond the features themselves (grid, label
        rule, backbone, extraction record): what it takes to extract new images the same
        way. None for heads written before featurecache 0.2 (:meth:`new_images_recipe`).
    """

    @classmethod
    def from_cache(cls, estimator, kind: str, cache, summary: dict, objective: str) -> "TrainedHead":
        """A head trained on ``cache``: its classes, feature settings and extraction recipe recorded."""
        return cls(estimator, kind, tuple(cache.classes), dict(cache.feature_settings), cache.fingerprint, summary,
                   objective, Recipe.from_provenance(cache.provenance))

    estimator: object
    kind: str
    classes: tuple
    feature_settings: dict
    fingerprint: str
    summary: dict = field(default_factory=dict)
    objective: Optional[str] = None
    recipe: Optional[Recipe] = None

    def __post_init__(self) -> None:
        if self.objective is None:
            self.objective = self.summary.get("objective") or objective_of_kind(self.kind)
        get_objective(self.objective)

    @property
    def spec(self) -> Objective:
        """The registry's description of its objective."""
        return get_objective(self.objective)

    def new_images_recipe(self) -> Recipe:
        """How to extract new images as the training cache was; ``HeadError`` for a head file written
        before featurecache 0.2, which records none (the one rule for old head files)."""
        return require(self.recipe)

    # -- use on caches
    def check_cache(self, cache) -> None:
        """Refuse a cache whose features differ from the training cache's, or whose classes do."""
        if cache.fingerprint != self.fingerprint:
            raise HeadError(f"{cache.path}: features differ from the ones this head was trained on ("
                            + describe_fingerprint_difference(cache.feature_settings, self.feature_settings)
                            + ")")
        if tuple(cache.classes) != tuple(self.classes):
            ours, theirs = ", ".join(cache.classes[:5]), ", ".join(self.classes[:5])
            raise HeadError(f"{cache.path}: classes differ from the head's ({len(cache.classes)} vs "
                            f"{len(self.classes)}: {ours}... vs {theirs}...)")

    def predict_proba(self, X) -> np.ndarray:
        """Patch heads: class probabilities ``(N, 1 + C)`` of patch features (background first)."""
        self._need_patch_probabilities()
        return self.estimator.predict_proba(X)

    def patch_probabilities(self, cache, *, chunk_size: int = 65536) -> np.ndarray:
        """Patch heads: :meth:`predict_proba` of a cache's selected patches, read chunk by chunk.

        Memory grows with the patches (``N × (1 + C)`` floats); :meth:`image_scores` and
        ``evaluate`` aggregate :meth:`probability_chunks` instead and keep none of them.
        """
        with contextlib.closing(self.probability_chunks(cache, chunk_size=chunk_size)) as chunks:
            out = [p for p, _, _ in chunks]
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, len(self.classes) + 1), np.float32)

    def probability_chunks(self, cache, *, chunk_size: int = 65536) -> Iterator[tuple]:
        """Patch heads: ``(probabilities (n, 1 + C), image position of each patch, patch labels)`` per chunk
        of a cache's selected patches, in file order (the next chunk read while this one is scored)."""
        self._need_patch_probabilities()  # checked now, not at the first chunk
        self.check_cache(cache)
        rows = cache.images.row

        def chunks():
            with contextlib.closing(cache.iter_chunks(chunk_size, dtype=None)) as reader:
                for ch in reader:
                    yield (np.asarray(self.estimator.predict_proba(ch.features), np.float32),
                           np.searchsorted(rows, ch.image_index), ch.labels)

        return chunks()

    def image_scores(self, cache, *, pooling: Optional[str] = None, k: Optional[float] = None) -> np.ndarray:
        """Per-class scores ``(M, C)`` of a cache's selected images.

        Patch heads pool their patch probabilities (``pooling``, default ``power`` with
        ``k = 5``, :func:`~featurecache.heads.pooling.pooling_key`); the image-level heads score
        images themselves and refuse ``pooling`` and ``k``.
        """
        self.check_cache(cache)
        k = None if k is None else EVAL_OPTIONS["k"].read(k)
        if self.spec.pools_patches:
            key = pooling_key(pooling, k)
            return self.pooled_scores(cache, [key])[key]
        if pooling is not None or k is not None:
            raise HeadError(f"applies to patch heads; this {self.objective} head scores images itself",
                            param="pooling" if pooling is not None else "k")
        return self.estimator.score_images(cache)

    def pooled_scores(self, cache, keys, *, each=None) -> dict:
        """Patch heads: image scores for every ``(pooling, k)`` of ``keys`` from one pass over the cache
        (:func:`~featurecache.heads.pooling.pool_chunks`; ``each(probabilities, labels)`` sees every chunk)."""
        return pool_chunks(self.probability_chunks(cache), cache.num_images, len(self.classes), keys, each=each)

    def patch_scores(self, X) -> np.ndarray:
        """Per-class scores ``(N, C)`` of single patches (localisation), for heads that have them."""
        if not self.spec.patch_scores:
            raise HeadError(f"an {self.objective}-objective head scores pooled image features, not patches; "
                            "localisation needs a patch, mil or hybrid head")
        return self.estimator.patch_scores(X)

    def patch_attention(self, X) -> np.ndarray:
        """Attention weights ``(N, C)`` of one image's patches ``X (N, D)`` (each class's column sums to 1), for
        heads whose objective weighs patches (``attention``: the ``attention`` map method)."""
        if not self.spec.attention_maps:
            raise HeadError(f"this {self.objective} head has no attention weights; attention maps need an "
                            "attention head")
        return self.estimator.patch_attention(X)

    def region_scores(self, X) -> np.ndarray:
        """Per-class scores ``(N, C)`` of image regions each described by one feature vector
        ``(N, D)`` (class activation maps): patch scores for patch, mil and hybrid heads; for
        image and fusion heads, the score of an image whose patches all have that feature."""
        if self.spec.patch_scores:
            return self.estimator.patch_scores(X)
        return self.estimator.region_scores(X)

    def scoring(self, *, pooling: Optional[str] = None, k: Optional[float] = None) -> tuple:
        """``(label, text)`` of how images are scored: ``("power", "power k=5")``, ``("mil:max", "trained max")``."""
        k = None if k is None else EVAL_OPTIONS["k"].read(k)
        if self.spec.pools_patches:
            pooling, k = pooling_key(pooling, k)
            return pooling, (f"power k={k:g}" if pooling == "power" else pooling)
        return self.estimator.scoring_label(), self.estimator.scoring_text()

    def _need_patch_probabilities(self) -> None:
        if not self.spec.pools_patches:
            raise HeadError(f"a {self.objective} head has no patch class probabilities; use image_scores")

    def summary_line(self) -> str:
        """One line on what training did, for the end of ``featurecache fit``."""
        line = self.spec.describe({"objective": self.objective, **self.summary}, self.kind)
        return (self.selection_line() + ": " if "selection" in self.summary else "") + line

    def selection_line(self) -> str:
        """Which candidate ``auto`` chose and why ('' for a head trained with a given objective)."""
        return _selection_line(self.summary.get("selection"))

    def selection_table(self) -> str:
        """``auto``'s cross-validation table, best first ('' for a head trained with a given objective)."""
        return _selection_table(self.summary.get("selection"))

    # -- the file (featurecache.heads.headfile)
    def to_payload(self) -> dict:
        """The head as plain tensors, numbers and JSON strings (what :meth:`save` writes)."""
        return to_payload(self)

    @classmethod
    def from_payload(cls, p: dict, *, device: str = "auto", source: str = "head") -> "TrainedHead":
        """The head of a :meth:`to_payload` dictionary (``source`` names it in errors)."""
        fields = read_payload(p, device=device, source=source)
        try:
            return cls(**fields)
        except HeadError as e:
            raise HeadError(f"{source}: damaged featurecache head: {e}") from None

    def save(self, path: Union[str, Path]) -> Path:
        """Write one torch file (loadable with ``weights_only=True``); a head whose weights are not all
        finite is refused, nothing written."""
        return write_head_file(self.to_payload(), path)

    @classmethod
    def load(cls, path: Union[str, Path], *, device: str = "auto") -> "TrainedHead":
        """Read a head file; never executes code from it."""
        return cls.from_payload(read_head_file(path), device=device, source=str(path))


def _selection_line(sel: Optional[dict]) -> str:
    if not sel:
        return ""
    rows = sorted(sel["table"], key=lambda r: -np.nan_to_num(r["map_mean"], nan=-1.0))
    runner_up = next((r for r in rows if r["candidate"] != sel["chosen"]), None)
    chosen = next(r for r in rows if r["candidate"] == sel["chosen"])
    versus = (f"; next {runner_up['candidate']} {100 * runner_up['map_mean']:.1f}" if runner_up else "")
    return (f"auto chose {sel['chosen']} ({sel['reason']}: mAP {100 * chosen['map_mean']:.1f} "
            f"± {100 * chosen['map_std']:.1f}{versus})")


def _selection_table(sel: Optional[dict]) -> str:
    if not sel:
        return ""
    rows = sorted(sel["table"], key=lambda r: (bool(r.get("dropped")), -np.nan_to_num(r["map_mean"], nan=-1.0)))
    width = max(len(r["candidate"]) for r in rows) + 2
    lines = [f"{'candidate':<{width}}  {'CV mAP':>12}  {'train s':>7}"]
    for r in rows:
        gone = r.get("dropped")
        mark = " <- chosen" if r["candidate"] == sel["chosen"] else (
            f" dropped after fold {gone['after_fold']}, behind {gone['behind']}" if gone else "")
        lines.append(f"{r['candidate']:<{width}}  {100 * r['map_mean']:>5.1f} ± {100 * r['map_std']:<4.1f}  "
                     f"{r['seconds']:>7.1f}{mark}")
    return "\n".join(lines)
