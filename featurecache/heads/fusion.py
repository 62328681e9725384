"""Score fusion: several heads trained on the same cache, their per-class image scores put on one scale and averaged."""

from __future__ import annotations

import time
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator

from featurecache.cache import open_cache
from featurecache.errors import HeadError
from featurecache.heads.mil import image_level_summary
from featurecache.heads.objectives import SINGLE_OBJECTIVES, get_objective
from featurecache.heads.options import FUSION_RULES, OPTIONS, is_fusion, options_of, parse_member
from featurecache.heads.registry import FitConfig, make_head, train_objective
from featurecache.heads.trained import TrainedHead
from featurecache.patches import BACKGROUND

__all__ = ["FusionHead", "describe_fusion", "fit_fusion_objective", "has_boxes", "member_config", "resolve_members",
           "train_member"]

_MEMBERS = OPTIONS["members"].read(OPTIONS["members"].default)
#: What stands in for a member that needs boxes on data without them: the image-label patch scorer.
_WITHOUT_BOXES = "mil"
# Members score in float32: below 1 - 1e-7 it resolves the scores, above it rounds to 1. The
# lower clip only guards log(0) (pooled patch scores can be tiny and still ordered).
_LOW, _HIGH = 1e-30, 1 - 1e-7


def _ranks(scores: np.ndarray) -> np.ndarray:
    """Per column, the rank of each row (1 = lowest), tied scores sharing their mean rank."""
    out = np.empty(scores.shape, np.float64)
    for c in range(scores.shape[1]):
        values, inverse = np.unique(scores[:, c], return_inverse=True)
        counts = np.bincount(inverse, minlength=len(values))
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        out[:, c] = (first + (counts + 1) / 2)[inverse]
    return out


def _log_odds(scores: np.ndarray) -> np.ndarray:
    s = np.clip(np.asarray(scores, np.float64), _LOW, _HIGH)
    return np.log(s) - np.log1p(-s)


class FusionHead(BaseEstimator):
    """Average of member heads' image scores, each first put on one scale.

    Members score images on scales of their own (a logistic regression's probabilities, a
    power mean of patch probabilities near 0), so averaging raw scores lets one member
    decide. ``rule="zscore"``: each member's per-class log-odds are standardised with the
    mean and standard deviation they have on the training images, averaged, and mapped back
    through the logistic function. ``rule="rank"``: per class, each member's scores are
    replaced by their rank among the images scored together (ties averaged), scaled to
    [0, 1], and averaged; it needs no training statistics but depends on which images are
    scored together.

    Parameters
    ----------
    members : tuple of str
        Member names (:func:`featurecache.heads.registry.parse_member`), for the record.
    rule : {"zscore", "rank"}

    Attributes
    ----------
    heads_ : list of TrainedHead
    center_, scale_ : ndarray (members, C)
        Training-image statistics of each member's per-class log-odds (``zscore``).
    """

    def __init__(self, members: tuple = _MEMBERS, rule: str = OPTIONS["fusion_rule"].default) -> None:
        self.members = members
        self.rule = rule

    def fit_scores(self, train_scores: Sequence[np.ndarray], labels: Optional[np.ndarray] = None) -> "FusionHead":
        """Learn the per-member, per-class standardisation from member scores of the training images.

        ``labels`` (M, C), the training images' labels: a class without a positive or without a
        negative among them has nothing to standardise against (its spread is the members'
        noise around one answer), so its log-odds are averaged as they are and the fused score
        stays at the members' level.
        """
        if self.rule not in FUSION_RULES:
            raise HeadError(f"must be one of {', '.join(FUSION_RULES)}, got {self.rule!r}", param="fusion_rule")
        z = np.stack([_log_odds(s) for s in train_scores])  # (K, M, C)
        self.center_ = z.mean(axis=1)
        self.scale_ = np.maximum(z.std(axis=1), 1e-6)
        if labels is not None:
            labels = np.asarray(labels, bool)
            one_sided = labels.all(axis=0) | ~labels.any(axis=0)
            self.center_[:, one_sided], self.scale_[:, one_sided] = 0.0, 1.0
        self.n_outputs_ = z.shape[2]
        return self

    def fit_members(self, heads: Sequence[TrainedHead], train_scores: Sequence[np.ndarray],
                    labels: Optional[np.ndarray] = None) -> "FusionHead":
        """Keep the trained member heads and learn the standardisation from their training-image scores
        (:meth:`fit_scores`)."""
        self.heads_ = list(heads)
        self.n_features_in_ = int(heads[0].estimator.n_features_in_)
        return self.fit_scores(train_scores, labels)

    def fuse(self, member_scores: Sequence[np.ndarray]) -> np.ndarray:
        """Fused per-class scores ``(M, C)`` in [0, 1] from the members' scores of the same images."""
        if self.rule == "rank":
            ranks = [_ranks(np.asarray(s)) for s in member_scores]
            return ((np.mean(ranks, axis=0) - 1) / max(len(member_scores[0]) - 1, 1)).astype(np.float32)
        z = np.mean([(_log_odds(s) - c) / d for s, c, d in zip(member_scores, self.center_, self.scale_)], axis=0)
        return (1 / (1 + np.exp(-z))).astype(np.float32)

    def score_images(self, cache) -> np.ndarray:
        """Fused scores ``(M, C)`` of a cache's selected images."""
        return self.fuse([h.image_scores(cache) for h in self.heads_])

    def region_scores(self, X: np.ndarray) -> np.ndarray:
        """Fused per-class scores ``(N, C)`` of regions each described by one feature vector (the
        members' :meth:`TrainedHead.region_scores`, standardised as their image scores are)."""
        return self.fuse([h.region_scores(X) for h in self.heads_])

    def scoring_label(self) -> str:
        return "fusion:" + "+".join(self.members)

    def scoring_text(self) -> str:
        return f"fusion of {' + '.join(self.members)} ({self.rule})"

    def _state(self) -> dict:
        return {"center": torch.from_numpy(self.center_.copy()), "scale": torch.from_numpy(self.scale_.copy()),
                "members": [h.to_payload() for h in self.heads_]}

    def _restore(self, state: dict, n_features: int, n_outputs: int, *, device: str = "auto") -> None:
        self.center_ = state["center"].numpy().astype(np.float64)
        self.scale_ = state["scale"].numpy().astype(np.float64)
        self.heads_ = [TrainedHead.from_payload(p, device=device, source="fusion member") for p in state["members"]]
        self.n_features_in_, self.n_outputs_ = n_features, n_outputs


def has_boxes(cache) -> bool:
    """Whether a cache's patch labels come from boxes (not from class folders or unlabelled images)."""
    return cache.provenance.dataset.layout not in ("folders", "plain") and bool((cache.labels > BACKGROUND).any())


def resolve_members(names: Sequence[str], boxes: bool) -> tuple:
    """Member names with those that need boxes replaced by ``mil`` when there are none (duplicates dropped)."""
    out = []
    for name in names:
        if is_fusion(name):
            raise HeadError("a fusion does not fuse fusions", param="members")
        name = name if boxes or not get_objective(parse_member(name)[0]).needs_boxes else _WITHOUT_BOXES
        if name not in out:
            out.append(name)
    return tuple(out)


def member_config(config: FitConfig, name: str) -> FitConfig:
    """The configuration a member (or an auto candidate) trains with: its objective, the options of
    ``config`` that are its objective's (not those of fusion and auto themselves)."""
    objective, overrides = parse_member(name)
    own = set(options_of(objective)) - {n for n in OPTIONS if not OPTIONS[n].objectives & set(SINGLE_OBJECTIVES)}
    options = {k: v for k, v in config.options.items() if k in own}
    return FitConfig(objective, {**options, **overrides}, memory_limit=config.memory_limit, device=config.device,
                     random_state=config.random_state, progress=False)


def train_member(cache, config: FitConfig, name: str) -> TrainedHead:
    """Train one member (or candidate) on all images of ``cache``."""
    sub = member_config(config, name)
    if is_fusion(name):
        return fit_fusion_objective(cache, sub, kind="fusion", params={"members": config.option("members")})
    return train_objective(cache, sub)


def fit_fusion_objective(cache, config: FitConfig, *, kind: str, params: dict) -> TrainedHead:
    """Train the members on a cache and the fusion of their scores.

    Parameters
    ----------
    cache : path, FeatureCache or MemoryCache
    config : FitConfig
        The members train with its options (each member's objective takes its own).
    kind : str
        ``"fusion"``.
    params : dict
        :class:`FusionHead` parameters (``members``, ``rule``).

    Returns
    -------
    TrainedHead
        Its estimator holds the member heads (saved with it).
    """
    t0 = time.perf_counter()
    with open_cache(cache, config.train_split) as c:
        est = make_head(kind, **params)
        est.members = resolve_members(est.members, has_boxes(c))
        heads = [train_member(c, config, m) for m in est.members]
        est.fit_members(heads, [h.image_scores(c) for h in heads], c.images.labels)
        summary = image_level_summary(c, config, t0, {"members": list(est.members), "fusion_rule": est.rule})
        return TrainedHead.from_cache(est, kind, c, summary, config.objective)


def describe_fusion(s: Mapping, kind: str) -> str:
    """One line on what training did (the objectives table names it)."""
    return (f"fusion head ({' + '.join(s.get('members', []))}, {s.get('fusion_rule')}): {s.get('train_images', 0)} "
            f"training images; {s.get('seconds', 0):.1f} s")
