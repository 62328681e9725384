"""Stage two: heads trained on cached features, one registry of objectives, and the head file.

Submodules: :mod:`~featurecache.heads.objectives` (the objectives table, head kinds) and
:mod:`~featurecache.heads.options` (the options table, defaults), both read by
:mod:`~featurecache.heads.registry` (estimators from options, ``FitConfig``; no torch),
:mod:`~featurecache.heads.pooling` (patches to images; numpy only),
:mod:`~featurecache.heads.background`, :mod:`~featurecache.heads.crossval`, the estimators in
:mod:`~featurecache.heads.patch`, :mod:`~featurecache.heads.image` and
:mod:`~featurecache.heads.mil` (the last two trained by :mod:`~featurecache.heads.bags`),
:mod:`~featurecache.heads.attention` (gated attention MIL), and
:mod:`~featurecache.heads.trained` (:class:`TrainedHead`). Names are imported on first
use, so that reading the registry does not import torch.
"""

from __future__ import annotations

import importlib

from featurecache.errors import HeadError  # noqa: F401  (re-exported)

_EXPORTS = {
    "ArraySource": "_sources", "BagSource": "_sources", "StreamSource": "_sources", "epoch_order": "_sources",
    "BackgroundPolicy": "background", "background_weights": "background",
    "CoefficientState": "patch", "LinearSVMHead": "patch", "LogRegHead": "patch", "MLPHead": "patch",
    "ImageLogRegHead": "image", "ImageMLPHead": "image", "MILHead": "mil", "AttentionHead": "attention",
    "IMAGE_POOLINGS": "pooling", "SCORE_POOLINGS": "pooling", "image_features": "pooling",
    "pool_image_features": "pooling", "pool_scores": "pooling",
    "DEFAULT_OBJECTIVE": "registry", "FitConfig": "registry", "HEAD_KINDS": "registry", "OBJECTIVES": "registry",
    "OPTIONS": "registry", "get_objective": "registry", "make_head": "registry", "parse_aggregation": "registry",
    "HeadEstimator": "registry", "OptionScopeError": "registry", "BagTrainer": "bags", "cv_folds": "crossval",
    "TrainedHead": "trained",
}

__all__ = sorted([*_EXPORTS, "HeadError"])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"featurecache.heads.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'featurecache.heads' has no attribute {name!r}")


def __dir__() -> list:
    return __all__
