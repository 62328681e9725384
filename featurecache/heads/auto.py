"""The ``auto`` objective: the user's own training images choose the objective, by cross-validation.

Each candidate (:data:`featurecache.heads.options.DEFAULT_CANDIDATES` unless told) is
trained on K−1 folds of the training images and scored on the held-out fold, folds grouped
by image and seeded; the candidate with the highest mean AP over the folds is retrained on
all training images and returned, with the cross-validation table in its summary. The
``fusion`` candidate averages its members' held-out scores, so it costs no training of its
own. Nothing outside the training images is seen.
"""

from __future__ import annotations

import time
from contextlib import ExitStack

import numpy as np
from tqdm.auto import tqdm

from featurecache.cache import open_cache
from featurecache.errors import HeadError
from featurecache.heads.crossval import cv_folds
from featurecache.heads.fusion import FusionHead, has_boxes, resolve_members, train_member
from featurecache.heads.objectives import get_objective
from featurecache.heads.options import OPTIONS, is_fusion, parse_member
from featurecache.heads.registry import FitConfig
from featurecache.heads.trained import TrainedHead
from featurecache.metrics import mean_ap
from featurecache.resources import features_bytes, memory_budget

__all__ = ["choose_folds", "cross_validate", "fit_auto_objective"]

#: Fewest training images per fold for the comparison to mean anything.
_MIN_IMAGES_PER_FOLD = 2


def choose_folds(n_images: int) -> int:
    """K from the number of training images: 3 (a cost of about 3 default fits per candidate), 2 below 30 images."""
    return 3 if n_images >= 30 else 2


def _candidates(config: FitConfig, boxes: bool) -> tuple:
    """``(candidates, fusion members)`` that apply to this cache."""
    names = [c for c in config.option("candidates")
             if is_fusion(c) or boxes or not get_objective(parse_member(c)[0]).needs_boxes]
    members = resolve_members(config.option("members"), boxes) if any(map(is_fusion, names)) else ()
    return tuple(dict.fromkeys(names)), members


def cross_validate(data, config: FitConfig, candidates: tuple, members: tuple, k: int, *, progress=None) -> list:
    """Per candidate: held-out mAP in each of ``k`` folds over ``data``'s images, and training seconds.

    Returns
    -------
    list of dict
        ``candidate``, ``maps`` (per fold), ``map_mean``, ``map_std``, ``seconds`` (mean
        training time per fold), in the order of ``candidates``.
    """
    trained = [c for c in candidates if not is_fusion(c)] + [m for m in members if m not in candidates]
    maps = {c: [] for c in candidates}
    seconds = {c: [] for c in trained}
    bar = tqdm(total=len(trained) * k, unit="fit", desc="auto", disable=None if progress is None else not progress)
    try:
        with ExitStack() as stack:
            for fold in cv_folds(data, k, config.random_state, stack):
                held_out, fitted = {}, {}
                for name in trained:
                    t0 = time.perf_counter()
                    fitted[name] = train_member(fold.train, config, name)
                    seconds[name].append(time.perf_counter() - t0)
                    held_out[name] = fitted[name].image_scores(fold.test)
                    bar.update(1)
                t = fold.test.images
                for name in candidates:
                    scores = _fused(fold.train, fitted, held_out, members) if is_fusion(name) else held_out[name]
                    maps[name].append(mean_ap(scores, t.labels, t.difficult))
    finally:
        bar.close()
    return [{"candidate": c, "maps": maps[c], "map_mean": float(np.nanmean(maps[c])),
             "map_std": float(np.nanstd(maps[c])),
             "seconds": float(sum(np.mean(seconds[m]) for m in (members if is_fusion(c) else (c,))))}
            for c in candidates]


def _fused(train, fitted: dict, held_out: dict, members: tuple) -> np.ndarray:
    """The fusion candidate's held-out scores: its members' (trained on the fold), standardised on the fold's
    training images."""
    fusion = FusionHead(members, OPTIONS["fusion_rule"].default)
    fusion.fit_scores([fitted[m].image_scores(train) for m in members], train.images.labels)
    return fusion.fuse([held_out[m] for m in members])


def fit_auto_objective(cache, config: FitConfig, *, kind=None, params=None) -> TrainedHead:
    """Choose an objective by cross-validation on the training images, retrain it on all of them.

    Parameters
    ----------
    cache : path, FeatureCache or MemoryCache
    config : FitConfig
        ``candidates``, ``cv_folds``, ``members``/``fusion_rule`` (the fusion candidate)
        and every candidate's own options; ``random_state`` seeds the folds and trainings.

    Returns
    -------
    TrainedHead
        The chosen candidate's head; ``summary["selection"]`` holds the table.
    """
    t0 = time.perf_counter()
    if config.params:
        raise HeadError("auto trains estimators of several kinds; give options, not estimator parameters",
                        param="params")
    with open_cache(cache, config.train_split) as c:
        n = c.num_images
        k = config.option("cv_folds") or choose_folds(n)
        if n < k * _MIN_IMAGES_PER_FOLD:
            raise HeadError(f"{c.path}: {n} training images are too few for {k}-fold cross-validation; choose an "
                            "objective other than auto", param="objective")
        labels = np.asarray(c.images.labels, bool)
        if not (labels.any(axis=0) & ~labels.all(axis=0)).any():
            raise HeadError(f"{c.path}: auto cannot choose: no class has both positive and negative training images, "
                            "so every candidate's AP would be 100 or undefined; choose an objective with --objective",
                            param="objective")
        candidates, members = _candidates(config, has_boxes(c))
        if not candidates:
            raise HeadError("no candidate applies to this cache (patch and hybrid need boxes)", param="candidates")
        in_memory = features_bytes(c.num_patches, c.feature_dim) <= memory_budget(config.memory_limit)
        table = cross_validate(c.to_memory() if in_memory else c, config, candidates, members, k,
                               progress=config.progress)
        best = max(table, key=lambda r: (np.nan_to_num(r["map_mean"], nan=-1.0), -candidates.index(r["candidate"])))
        head = train_member(c, config, best["candidate"])
        head.summary["selection"] = {
            "chosen": best["candidate"], "folds": k, "images": n, "table": table, "seed": config.random_state,
            "members": list(members), "seconds": time.perf_counter() - t0,
            "reason": f"highest mean AP in {k}-fold cross-validation on the {n} training images"}
        return head
