"""Multiple-instance objectives: a patch scorer trained through an image-level aggregation (``mil``, ``hybrid``).

``mil`` learns from image labels only, which need no boxes (Oquab et al., CVPR 2015);
``hybrid`` adds a weighted patch loss on the box-derived patch labels.
:func:`fit_mil_objective` trains either on a cache.
"""

from __future__ import annotations

import logging
import time
from typing import Mapping, Optional

import numpy as np
import torch
from sklearn.base import BaseEstimator
from torch import nn

from featurecache.cache import open_cache
from featurecache.heads._sources import BagSource
from featurecache.heads._torch import TorchState
from featurecache.heads.background import as_policy, background_weights
from featurecache.heads.bags import BagTrainer, scorer
from featurecache.heads.options import OPTIONS, parse_aggregation
from featurecache.heads.pooling import DEFAULT_POWER
from featurecache.heads.registry import FitConfig, make_head
from featurecache.heads.trained import TrainedHead
from featurecache.patches import AMBIGUOUS

logger = logging.getLogger(__name__)

__all__ = ["MILHead", "bag_source", "describe_mil", "fit_mil_objective", "image_level_summary"]

_AGG_NAME, _AGG_VALUE = parse_aggregation(OPTIONS["aggregation"].default)


class MILHead(TorchState, BaseEstimator):
    """Multiple-instance learning: a patch scorer trained through an image-level aggregation.

    Each patch gets one logit per class from a linear layer (``hidden=0``) or a small MLP;
    an image's logit for a class aggregates its patches' logits, and a per-class binary
    cross-entropy compares it with the image labels. No patch labels or boxes are needed
    (Oquab et al., CVPR 2015, train this way with max pooling). Aggregations:

    * ``"max"``: the largest patch logit;
    * ``"lse"``: log-sum-exp with temperature r, (1/r)·log mean_i exp(r·z_i), between the
      mean (r → 0) and the max (r → ∞);
    * ``"power"``: the paper's test-time score on probabilities, ((1/M) Σ σ(z_i)^k)^(1/k).

    With ``patch_weight > 0`` (the ``hybrid`` objective) a patch loss is added: per-class
    binary cross-entropy of each labelled patch's scores against its box-derived label
    (background: no class), weighted per patch, times ``patch_weight``.

    Not a scikit-learn estimator of rows: it learns from bags (a variable number of patch
    rows per image, :class:`~featurecache.heads._sources.BagSource`, through
    :meth:`fit_source`) with one label vector per bag, which scikit-learn's ``fit(X, y)``
    with one label per row cannot express; ``get_params``/``set_params``/``clone`` work, and
    ``tests/test_sklearn_contract.py`` leaves it out of scikit-learn's estimator checks.

    A linear scorer is trained by full-batch L-BFGS on the loss with its L2 penalty (``solver``
    ``"lbfgs"``, the default: passes over the bags until the loss falls by less than ``tol``
    over five iterations; in memory the bags are batched once, streamed ones are read per pass).
    An MLP scorer, ``solver="adam"`` or held-out images train with Adam on mini-batches of whole
    images (memory: one batch of bags), with weight decay, optionally early stopping on a held-out
    fraction of the training images (the best epoch's parameters are kept). Sharp aggregations
    (max, log-sum-exp at a high r) pass the gradient of an image to few patches and, from a
    random start, lock onto whichever patch happens to score highest; the first
    ``warmup_epochs`` (L-BFGS: at most that many passes, to the warm loss's plateau) therefore
    train through log-sum-exp at r = 1, which spreads it over all patches (on a synthetic
    one-signal-patch task this lifts max aggregation from chance to AP 1.0).

    Parameters
    ----------
    hidden : int
        0 for a linear scorer (default), else the width of one ReLU hidden layer (dropout 0.5).
    aggregation : {"power", "lse", "max"}
        Default ``power`` (k = 5): the best of the three on the VOC sample (docs/results.md).
    temperature : float
        r of ``lse``. Default 2.
    k : float
        Exponent of ``power``. Default 5.
    patch_weight : float
        Weight of the patch loss (0: pure MIL).
    lr, weight_decay : float
        Adam's learning rate and L2 penalty (defaults 0.01 and 1e-4, tuned by 5-fold CV on the
        VOC sample; a hidden layer and stronger decay both measured worse there).
    max_epochs, patience : int
        Epochs of Adam, or the cap on L-BFGS's passes (default 200); with ``validation_fraction``,
        epochs without a better held-out loss before stopping.
    batch_images : int
    validation_fraction : float
        Training images held out for early stopping (0: train ``max_epochs`` epochs).
    warmup_epochs : int
        Epochs trained through log-sum-exp at r = 1 before ``max``/``lse`` take over.
    device : str
    random_state : int, optional
    solver : {"lbfgs", "adam"}
        How a linear scorer is optimised (``image_solver``); ``"adam"`` is the previous default.
    tol : float
        L-BFGS's relative tolerance on the fall of the loss over five iterations (``image_tol``).
    """

    def __init__(self, hidden: int = OPTIONS["image_hidden"].default, aggregation: str = _AGG_NAME,
                 temperature: float = 2.0, k: float = _AGG_VALUE or DEFAULT_POWER, patch_weight: float = 0.0,
                 lr: float = OPTIONS["image_lr"].default, weight_decay: float = OPTIONS["image_weight_decay"].default,
                 max_epochs: int = OPTIONS["image_epochs"].default, patience: int = 10, batch_images: int = 16,
                 validation_fraction: float = 0.0, warmup_epochs: int = 10, device: str = "auto",
                 random_state: Optional[int] = 0, solver: str = OPTIONS["image_solver"].default,
                 tol: float = OPTIONS["image_tol"].default) -> None:
        self.hidden = hidden
        self.aggregation = aggregation
        self.temperature = temperature
        self.k = k
        self.patch_weight = patch_weight
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.patience = patience
        self.batch_images = batch_images
        self.validation_fraction = validation_fraction
        self.warmup_epochs = warmup_epochs
        self.device = device
        self.random_state = random_state
        self.solver = solver
        self.tol = tol

    def _build(self, d: int, c: int) -> nn.Module:
        return scorer(d, c, self.hidden)

    def _trainer(self) -> BagTrainer:
        return BagTrainer.of(self)

    def fit(self, X: np.ndarray, image_index: np.ndarray, Y: np.ndarray, ignore: Optional[np.ndarray] = None, *,
            patch_labels: Optional[np.ndarray] = None, patch_weights: Optional[np.ndarray] = None) -> "MILHead":
        """Train on patch features ``X`` (N, D) of images ``image_index`` (N,) with labels ``Y`` (M, C).

        ``ignore`` (M, C) leaves an image out of a class's loss (VOC ``difficult``-only);
        ``patch_labels``/``patch_weights`` (N,) feed the patch loss when ``patch_weight > 0``.
        """
        if patch_labels is not None and patch_weights is None:
            patch_weights = (np.asarray(patch_labels) != AMBIGUOUS).astype(np.float32)
        source = BagSource(np.asarray(X, np.float32), image_index, len(Y), patch_labels=patch_labels,
                           patch_weights=patch_weights)
        return self.fit_source(source, Y, ignore)

    def fit_source(self, source: BagSource, Y: np.ndarray, ignore: Optional[np.ndarray] = None) -> "MILHead":
        """Train on a :class:`BagSource` (in memory or streamed) with image labels ``Y`` (M, C)."""
        net, history = self._trainer().fit(source, Y, ignore)
        self.net_, self.history_, self.n_epochs_ = net, history, len(history)
        self.n_features_in_, self.n_outputs_ = source.n_features, np.shape(Y)[1]
        return self

    def patch_scores(self, X: np.ndarray) -> np.ndarray:
        """Per-class patch probabilities σ(z) ``(N, C)`` (for localisation maps)."""
        return torch.sigmoid(self._forward(X)).numpy()

    def image_scores_from_source(self, source: BagSource, *, batch_images: int = 64) -> np.ndarray:
        """Image scores ``(M, C)`` in [0, 1]: the trained aggregation of each image's patches."""
        dev = next(self.net_.parameters()).device
        out = np.zeros((source.n_images, self.n_outputs_), np.float32)
        usable = np.flatnonzero(source.sizes() > 0)
        id_batches = [usable[s:s + batch_images] for s in range(0, len(usable), batch_images)]
        with torch.inference_mode():
            for ids, (xb, mb, _, _) in zip(id_batches, source.batches(id_batches)):
                o = self._trainer().image_outputs(self.net_(torch.from_numpy(xb).to(dev)), torch.from_numpy(mb).to(dev))
                out[ids] = (o if self.aggregation == "power" else torch.sigmoid(o)).cpu().numpy()
        return out

    def score_images(self, cache) -> np.ndarray:
        """Image scores ``(M, C)`` of a cache's selected images (bags read in batches, one pass, memory bounded)."""
        return self.image_scores_from_source(BagSource.from_cache(cache, memory_limit=0))

    def image_scores_from_patches(self, X: np.ndarray, image_index: np.ndarray, n_images: int) -> np.ndarray:
        """Image scores ``(M, C)`` from in-memory patch features."""
        return self.image_scores_from_source(BagSource(np.asarray(X, np.float32), image_index, n_images))

    def describe_aggregation(self) -> str:
        return self.aggregation + (f" r={float(self.temperature):g}" if self.aggregation == "lse" else
                                   f" k={float(self.k):g}" if self.aggregation == "power" else "")

    def scoring_label(self) -> str:
        return "mil:" + self.describe_aggregation()

    def scoring_text(self) -> str:
        return "trained " + self.describe_aggregation()


# --------------------------------------------------------------------------- training on a cache


def image_level_summary(cache, config: FitConfig, t0: float, extra: dict) -> dict:
    """The training facts every image-label objective records."""
    t = cache.images
    return {"objective": config.objective, "cache": str(cache.path), "train_split": config.train_split,
            "train_images": int(len(t)),
            "images_per_class": {n: int(k) for n, k in zip(cache.classes, t.labels.sum(0))},
            **extra, "seconds": time.perf_counter() - t0}


def bag_source(cache, config: FitConfig, patch_weight: float) -> tuple:
    """``(BagSource, summary facts)`` of an open cache's training images for a bag trainer; with a positive
    ``patch_weight``, the box-derived patch labels and their weights under ``config``'s background policy."""
    labels = weights = None
    extra: dict = {}
    if patch_weight > 0:
        policy = as_policy(config.option("background"), weight=config.option("background_weight"))
        labels = cache.labels
        keep, w, w_bg = background_weights(labels, policy, random_state=config.random_state)
        weights = np.zeros(len(labels), np.float32)
        weights[keep] = w
        extra.update(background=policy.describe(), background_weight=w_bg, patch_weight=patch_weight,
                     train_patches=int(len(keep)))
    source = BagSource.from_cache(cache, memory_limit=config.memory_limit, patch_labels=labels, patch_weights=weights)
    return source, extra


def fit_mil_objective(cache, config: FitConfig, *, kind: str, params: dict) -> TrainedHead:
    """Train the ``mil`` objective (or ``hybrid``, whose ``patch_weight`` is positive) on a cache.

    Parameters
    ----------
    cache : path, FeatureCache or MemoryCache
    config : FitConfig
        Hybrid: its ``background``/``background_weight`` options weight the patch loss.
        Bags are read from HDF5 per batch when the features exceed ``memory_limit``.
    kind : str
        ``"mil"``.
    params : dict
        :class:`MILHead` parameters.

    Returns
    -------
    TrainedHead
    """
    t0 = time.perf_counter()
    est = make_head(kind, **params)
    with open_cache(cache, config.train_split) as c:
        t = c.images
        source, extra = bag_source(c, config, float(est.patch_weight))
        est.fit_source(source, t.labels, ignore=t.difficult & ~t.labels)
        extra.update(aggregation=est.describe_aggregation(), epochs=est.n_epochs_, solver=est._trainer().solver_used(),
                     training_data="stream" if source.streaming else "memory")
        return TrainedHead.from_cache(est, kind, c, image_level_summary(c, config, t0, extra), config.objective)


def describe_mil(s: Mapping, kind: str) -> str:
    """One line on what training did (the objectives table names it)."""
    line = (f"{s['objective']} head ({s.get('aggregation')} aggregation): {s.get('train_images', 0)} "
            f"training images, {s.get('epochs', 0)} epochs; {s.get('seconds', 0):.1f} s")
    if s.get("patch_weight"):
        line += (f"; patch loss weight {s.get('patch_weight', 0):g} on {s.get('train_patches', 0):,} "
                 f"patches (background {s.get('background', '')})")
    return line
