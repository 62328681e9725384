"""The ``auto`` objective: the user's own training images choose the objective, by cross-validation.

Each candidate (:data:`featurecache.heads.options.DEFAULT_CANDIDATES` unless told) is
trained on K−1 folds of the training images and scored on the held-out fold, folds grouped
by image and seeded. Successive halving (``cv_halving``, default ``interval``): every
candidate runs on the first fold, and after each fold but the last, those clearly behind the
best on the held-out images of the folds so far (the paired bootstrap interval of the
difference in mean fold mAP below zero, :func:`clearly_behind`) run on no further fold. The surviving
candidate with the highest mean AP over the folds is retrained on all training images and
returned, with the cross-validation table (and what was dropped when) in its summary. The
``fusion`` candidate averages its members' held-out scores, so it costs no training of its
own. Nothing outside the training images is seen.

The fits inside cross-validation only rank the candidates, so they train looser than the refit
(:func:`screening_config`: ``cv_tol`` for the L-BFGS scorers, ``cv_epochs`` for the patch MLP).
Each starts from its own seeded start: one started from another fold's fit would carry what that
fit learnt from this fold's held-out images.
"""

from __future__ import annotations

import time
import warnings
from contextlib import ExitStack
from dataclasses import replace

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
from featurecache.metrics import bootstrap_map, bootstrap_weights, interval, mean_ap
from featurecache.resources import features_bytes, memory_budget

__all__ = ["HALVING_LEVEL", "HALVING_RESAMPLES", "choose_folds", "clearly_behind", "cross_validate",
           "fit_auto_objective", "screening_config"]

#: Fewest training images per fold for the comparison to mean anything.
_MIN_IMAGES_PER_FOLD = 2

#: Bootstrap resamples of the held-out images when candidates are dropped (``cv_halving``).
HALVING_RESAMPLES = 1000

#: Level of the two-sided bootstrap interval that says a candidate is clearly behind (``cv_halving``): its upper
#: end below zero, i.e. behind at one-sided 95%. Chosen by cost (docs/results.md, "Auto"): at 0.95 the fusion
#: candidate survived the VOC sample's first fold by a hair and kept hybrid training on every fold; no choice
#: changed on either shared set.
HALVING_LEVEL = 0.90


def choose_folds(n_images: int) -> int:
    """K from the number of training images: 3 (a cost of about 3 default fits per candidate), 2 below 30 images."""
    return 3 if n_images >= 30 else 2


def _candidates(config: FitConfig, boxes: bool) -> tuple:
    """``(candidates, fusion members)`` that apply to this cache."""
    names = [c for c in config.option("candidates")
             if is_fusion(c) or boxes or not get_objective(parse_member(c)[0]).needs_boxes]
    members = resolve_members(config.option("members"), boxes) if any(map(is_fusion, names)) else ()
    return tuple(dict.fromkeys(names)), members


def _trained(alive: list, members: tuple) -> list:
    """What a fold trains for the ``alive`` candidates: the non-fusion ones, and the fusion's members if it is alive."""
    names = [c for c in alive if not is_fusion(c)]
    return names + [m for m in members if m not in names] if any(map(is_fusion, alive)) else names


def clearly_behind(folds: list, seed: int, *, n_boot: int = HALVING_RESAMPLES) -> dict:
    """The candidates clearly behind the best on the held-out images of the folds so far.

    A candidate's measure is its mean over these folds of the fold's held-out mAP, the measure
    ``auto`` chooses by. Paired bootstrap (``n_boot`` resamples, seeded; the same draws for every
    candidate): each fold's images are resampled within that fold, the first fold's first, and the
    resampled fold mAPs averaged, as ``ablate``'s intervals over folds are. A candidate is clearly
    behind when the :data:`HALVING_LEVEL` interval of its measure minus the best's lies wholly below
    zero (:func:`featurecache.metrics.interval`, centred on the measured difference). More folds,
    more images: the interval narrows from fold to fold. Scores are never pooled across folds into one
    ranking: each fold's models score on their own scale.

    Parameters
    ----------
    folds : list of (dict, cache)
        Per fold so far, in order: ``{candidate: held-out scores (M, C)}`` and the fold's evaluation
        images. The candidates compared are those of the last fold.
    seed : int
    n_boot : int

    Returns
    -------
    dict
        ``candidate -> {"behind": best, "vs_best": [difference, low, high]}`` for each such candidate.
    """
    names = list(folds[-1][0])
    rng = np.random.RandomState(seed)
    measured, boot = {c: [] for c in names}, {c: [] for c in names}
    for scores, test in folds:
        t = test.images
        weights = bootstrap_weights(len(t.labels), n_boot, rng)
        for c in names:
            measured[c].append(mean_ap(scores[c], t.labels, t.difficult))
            boot[c].append(bootstrap_map(scores[c], t.labels, t.difficult, weights))
    with warnings.catch_warnings():  # a fold without a positive image of any class is NaN: the others count
        warnings.simplefilter("ignore", RuntimeWarning)
        measured = {c: float(np.nanmean(v)) for c, v in measured.items()}
        boot = {c: np.nanmean(np.stack(v), axis=0) for c, v in boot.items()}
    best = max(names, key=lambda c: np.nan_to_num(measured[c], nan=-1.0))
    out = {}
    for c in names:
        d = measured[c] - measured[best]
        low, high = interval(boot[c] - boot[best], HALVING_LEVEL, center=d)
        if c != best and high < 0:
            out[c] = {"behind": best, "vs_best": [float(d), low, high]}
    return out


def screening_config(config: FitConfig) -> FitConfig:
    """The configuration of the fits inside cross-validation, which only rank the candidates: ``image_tol``
    loosened to ``cv_tol`` (never tighter) and the patch MLP's ``epochs`` capped at ``cv_epochs`` (never above);
    0 leaves either as it is. The chosen candidate's refit keeps ``config``'s own."""
    tol = max(float(config.option("cv_tol")), float(config.option("image_tol")))
    epochs = int(config.option("epochs"))
    if int(config.option("cv_epochs")) > 0:
        epochs = min(epochs, int(config.option("cv_epochs")))
    return replace(config, options={**config.options, "image_tol": tol, "epochs": epochs})


def cross_validate(data, config: FitConfig, candidates: tuple, members: tuple, k: int, *, progress=None) -> list:
    """Per candidate: held-out mAP in each of ``k`` folds over ``data``'s images, and training seconds.

    With ``cv_halving="interval"`` every candidate runs on the first fold, and after each fold but
    the last, those clearly behind the best on the held-out images of the folds so far
    (:func:`clearly_behind`) run on no further fold; ``"none"`` runs every candidate on every fold.
    The fits use :func:`screening_config`, each from its own seeded start: a fit started from another
    fold's solution would carry what that fit learnt from this fold's held-out images (measured: +3
    to +6 mAP for a warm-started hybrid on BCCD's folds 2 and 3).

    Returns
    -------
    list of dict
        ``candidate``, ``maps`` (per fold it ran on), ``map_mean``, ``map_std``, ``seconds`` (mean
        training time per fold), ``dropped`` (None, or the fold after which it was dropped, with
        ``behind`` and ``vs_best`` from :func:`clearly_behind`), in the order of ``candidates``.
    """
    maps, seconds, dropped, evidence = {c: [] for c in candidates}, {}, {}, []
    alive, screen = list(candidates), screening_config(config)
    halving = config.option("cv_halving") != "none" and k > 1
    bar = tqdm(total=len(_trained(alive, members)) * k, unit="fit", desc="auto",
               disable=None if progress is None else not progress)
    try:
        with ExitStack() as stack:
            for f, fold in enumerate(cv_folds(data, k, config.random_state, stack)):
                held_out, fitted = {}, {}
                for name in _trained(alive, members):
                    t0 = time.perf_counter()
                    fitted[name] = train_member(fold.train, screen, name)
                    seconds.setdefault(name, []).append(time.perf_counter() - t0)
                    held_out[name] = fitted[name].image_scores(fold.test)
                    bar.update(1)
                scores = {name: _fused(fold.train, fitted, held_out, members) if is_fusion(name) else held_out[name]
                          for name in alive}
                t = fold.test.images
                for name in alive:
                    maps[name].append(mean_ap(scores[name], t.labels, t.difficult))
                evidence.append((scores, fold.test))
                if halving and f < k - 1 and len(alive) > 1:  # after the last fold nothing is left to save
                    so_far = [({c: sc[c] for c in alive}, test) for sc, test in evidence]
                    behind = clearly_behind(so_far, config.random_state)
                    dropped.update({c: {"after_fold": f + 1, **v} for c, v in behind.items()})
                    alive = [c for c in alive if c not in behind]
                    bar.total = bar.n + len(_trained(alive, members)) * (k - 1 - f)
    finally:
        bar.close()
    return [{"candidate": c, "maps": maps[c], "map_mean": float(np.nanmean(maps[c])),
             "map_std": float(np.nanstd(maps[c])),
             "seconds": float(sum(np.mean(seconds[m]) for m in (members if is_fusion(c) else (c,)))),
             "dropped": dropped.get(c)}
            for c in candidates]


def _dropped_text(dropped: list) -> str:
    """`` (3 candidate(s) dropped as clearly behind: a, b after fold 1; c after fold 2)``, or nothing."""
    if not dropped:
        return ""
    folds = sorted({d["after_fold"] for d in dropped})
    parts = [", ".join(d["candidate"] for d in dropped if d["after_fold"] == f) + f" after fold {f}" for f in folds]
    return f" ({len(dropped)} candidate(s) dropped as clearly behind: {'; '.join(parts)})"


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
        best = max((r for r in table if r["dropped"] is None),
                   key=lambda r: (np.nan_to_num(r["map_mean"], nan=-1.0), -candidates.index(r["candidate"])))
        head = train_member(c, config, best["candidate"])
        dropped = [{"candidate": r["candidate"], **r["dropped"]} for r in table if r["dropped"]]
        head.summary["selection"] = {
            "chosen": best["candidate"], "folds": k, "images": n, "table": table, "seed": config.random_state,
            "members": list(members), "seconds": time.perf_counter() - t0, "halving": config.option("cv_halving"),
            "cv_tol": float(config.option("cv_tol")), "cv_epochs": int(config.option("cv_epochs")),
            "screening": {n: screening_config(config).option(n) for n in ("image_tol", "epochs")},
            "dropped": dropped,
            "reason": f"highest mean AP in {k}-fold cross-validation on the {n} training images"
                      + _dropped_text(dropped)}
        return head
