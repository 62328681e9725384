"""Training a head on a cache: one entry point for every objective, configured by one frozen config.

:func:`fit_objective` validates the options against the objective registry
(:mod:`featurecache.heads.registry`) and hands the cache to that objective's trainer.
:func:`fit_head` is the paper's patch objective with its head kind and estimator
parameters spelled out.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

import numpy as np

from featurecache.cache import FeatureCache, MemoryCache, open_cache
from featurecache.errors import HeadError
from featurecache.heads.background import BackgroundPolicy, background_weights
from featurecache.heads.registry import FitConfig, option_of_param, train_objective
from featurecache.heads.trained import TrainedHead
from featurecache.resources import apply_threads

__all__ = ["BackgroundPolicy", "FitConfig", "background_weights", "fit_head", "fit_objective"]

logger = logging.getLogger(__name__)

CacheLike = Union[str, Path, FeatureCache, MemoryCache]


def fit_objective(cache: CacheLike, config: Optional[FitConfig] = None, **settings) -> TrainedHead:
    """Train a head for any objective on a cache.

    Parameters
    ----------
    cache : path, FeatureCache or MemoryCache
        The training cache (``train_split`` selects its images).
    config : FitConfig, optional
        The whole configuration; default ``FitConfig()`` (the default objective at its
        default options).
    **settings
        Fields of :class:`FitConfig` (``objective``, ``train_split``, ``val``, ``val_split``,
        ``memory_limit``, ``device``, ``random_state``, ``params``, ``threads``) or training options by
        name (``head``, ``hidden``, ``background``, ``image_pooling``, ``aggregation`` ...,
        see :data:`featurecache.heads.registry.OPTIONS`), over those of ``config``.

    Returns
    -------
    TrainedHead

    Raises
    ------
    HeadError
        An unknown objective or option, an invalid value (naming the option), or an option
        of another objective.

    Examples
    --------
    >>> head = fit_objective("voc.h5", objective="patch", head="logreg", background="sample:0.1",
    ...                      train_split="train")                              # doctest: +SKIP
    """
    config = _merge(config or FitConfig(), settings)
    apply_threads(config.threads)
    _check_classes(cache, config.train_split)
    try:
        return train_objective(cache, config)
    except HeadError as e:  # an estimator names its own parameter; the user set an option
        option = option_of_param(config.objective, e.param)
        if option is None or option == e.param:
            raise
        raise HeadError(e.message, param=option) from None


def _check_classes(cache: CacheLike, split: Optional[str]) -> None:
    """Refuse a cache without classes (nothing to learn); say which classes the training images cannot
    teach: without a positive image a class's scores are near 0 everywhere; without a negative one they
    cannot tell images apart."""
    with open_cache(cache, split) as c:
        labels, classes, where = np.asarray(c.images.labels, bool), list(c.classes), c.path
    if not classes:
        raise HeadError(f"{where}: the cache has no classes (a plain layout has no labels); a head learns "
                        "classes: extract a labelled data set (VOC, COCO or class folders)")
    if not len(labels):
        return
    for what, which in (("positive", ~labels.any(axis=0)), ("negative", labels.all(axis=0))):
        names = [classes[i] for i in np.flatnonzero(which)]
        if names:
            logger.warning("%d class(es) have no %s training image, so the head cannot learn them (their scores "
                           "will not tell images apart): %s", len(names), what, ", ".join(names[:10])
                           + (", ..." if len(names) > 10 else ""))


def _merge(config: FitConfig, settings: dict) -> FitConfig:
    fields = set(FitConfig.__dataclass_fields__) - {"options"}
    own = {k: v for k, v in settings.items() if k in fields}
    options = {**config.options, **{k: v for k, v in settings.items() if k not in fields}}
    base = {f: getattr(config, f) for f in fields}
    return FitConfig(**{**base, **own, "options": options})


def fit_head(cache: CacheLike, *, head: str = "mlp", params: Optional[dict] = None,
             background: Union[str, BackgroundPolicy] = "weight", background_weight: Optional[float] = None,
             **settings) -> TrainedHead:
    """Train a patch head (the paper's objective) on a cache.

    Parameters
    ----------
    cache : path, FeatureCache or MemoryCache
    head : {"mlp", "logreg", "linearsvm"}
    params : dict, optional
        Estimator parameters (``hidden``, ``dropout``, ``lr``, ``C`` ...).
    background : str or BackgroundPolicy
        ``"weight"`` (default, balanced), ``"sample:0.1"``, ``"none"``.
    background_weight : float, optional
        The weight of a background patch under ``weight`` (default: balanced).
    **settings
        Fields of :class:`FitConfig` other than ``objective``, ``options`` and ``params``:
        ``train_split``; ``val``, a validation cache (MLP: early stopping and learning-rate
        schedule on its loss); ``val_split``, the split of ``val`` (or of ``cache``) to validate
        on; ``memory_limit``, bytes of float32 training features to hold in memory (above it
        the MLP streams from HDF5, same model; default half of the available memory);
        ``random_state``; ``device``; ``threads``.

    Returns
    -------
    TrainedHead
    """
    if isinstance(background, BackgroundPolicy):
        background, background_weight = _policy_text(background)
    config = FitConfig("patch", {"head": head, "background": background, "background_weight": background_weight},
                       params=dict(params or {}), **settings)
    return fit_objective(cache, config)


def _policy_text(policy: BackgroundPolicy) -> tuple:
    """``(background, background_weight)`` options of a policy (its share stays the default)."""
    if policy.kind == "sample":
        return f"sample:{policy.fraction!r}", None
    return policy.kind, policy.weight


