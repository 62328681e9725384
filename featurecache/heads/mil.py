"""Multiple-instance objectives: a patch scorer trained through an image-level aggregation (``mil``, ``hybrid``).

``mil`` learns from image labels only, which need no boxes (Oquab et al., CVPR 2015);
``hybrid`` adds a weighted patch loss on the box-derived patch labels.
:func:`fit_mil_objective` trains either on a cache.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np
import torch
from sklearn.base import BaseEstimator
from torch import nn
from torch.nn import functional as F

from featurecache.cache import open_cache
from featurecache.errors import HeadError
from featurecache.heads._sources import BagSource
from featurecache.heads._torch import PatienceSchedule, TorchState, diverged, train_torch
from featurecache.heads.background import as_policy, background_weights
from featurecache.heads.registry import AGGREGATIONS, OPTIONS, FitConfig, make_head, parse_aggregation
from featurecache.heads.trained import TrainedHead
from featurecache.patches import AMBIGUOUS, BACKGROUND
from featurecache.resources import resolve_device

logger = logging.getLogger(__name__)

__all__ = ["MILHead", "fit_mil_objective", "image_level_summary"]

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

    Trained with Adam on mini-batches of whole images (memory: one batch of bags), with weight
    decay, optionally early stopping on a held-out fraction of the training images (the best
    epoch's parameters are kept). Sharp aggregations (max, log-sum-exp at a high r) pass the
    gradient of an image to few patches and, from a random start, lock onto whichever patch
    happens to score highest; the first ``warmup_epochs`` therefore train through log-sum-exp
    at r = 1, which spreads it over all patches (on a synthetic one-signal-patch task this
    lifts max aggregation from chance to AP 1.0).

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
        Epochs (default 200); with ``validation_fraction``, epochs without a better held-out
        loss before stopping.
    batch_images : int
    validation_fraction : float
        Training images held out for early stopping (0: train ``max_epochs`` epochs).
    warmup_epochs : int
        Epochs trained through log-sum-exp at r = 1 before ``max``/``lse`` take over.
    device : str
    random_state : int, optional
    """

    def __init__(self, hidden: int = OPTIONS["image_hidden"].default, aggregation: str = _AGG_NAME,
                 temperature: float = 2.0, k: float = _AGG_VALUE or 5.0, patch_weight: float = 0.0,
                 lr: float = OPTIONS["image_lr"].default, weight_decay: float = OPTIONS["image_weight_decay"].default,
                 max_epochs: int = OPTIONS["image_epochs"].default, patience: int = 10, batch_images: int = 16,
                 validation_fraction: float = 0.0, warmup_epochs: int = 10, device: str = "auto",
                 random_state: Optional[int] = 0) -> None:
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

    def _build(self, d: int, c: int) -> nn.Module:
        if int(self.hidden) > 0:
            h = int(self.hidden)
            return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Dropout(0.5), nn.Linear(h, c))
        return nn.Linear(d, c)

    def _image_logits(self, z: "torch.Tensor", mask: "torch.Tensor", *, warm: bool = False) -> "torch.Tensor":
        """z: (B, P, C) patch logits, mask: (B, P) valid patches -> (B, C) image logits (probabilities for power).

        ``warm``: log-sum-exp at r = 1 instead of a sharp aggregation (the warm-up epochs).
        """
        neg = torch.finfo(z.dtype).min / 4
        m = mask[:, :, None]
        n = mask.sum(1, keepdim=True).clamp_min(1).to(z.dtype)
        if warm and self.aggregation != "power":
            return (torch.logsumexp(z.masked_fill(~m, neg), dim=1) - torch.log(n))
        if self.aggregation == "max":
            return z.masked_fill(~m, neg).amax(1)
        if self.aggregation == "lse":
            r = float(self.temperature)
            return (torch.logsumexp((r * z).masked_fill(~m, neg), dim=1) - torch.log(n)) / r
        k = float(self.k)
        # log-domain power mean: stable where sigma(z)^k underflows.
        logp = torch.nn.functional.logsigmoid(z) * k
        log_mean = torch.logsumexp(logp.masked_fill(~m, neg), dim=1) - torch.log(n)
        return torch.exp(log_mean / k)

    def _image_loss(self, out, y, w):
        if self.aggregation == "power":
            losses = F.binary_cross_entropy(out.clamp(1e-6, 1 - 1e-6), y, reduction="none")
        else:
            losses = F.binary_cross_entropy_with_logits(out, y, reduction="none")
        return (losses * w).sum() / w.sum().clamp_min(1e-12)

    def _patch_loss(self, z, lab, pw):
        """Per-class BCE of labelled patches against their one-hot label (background: all zeros)."""
        use = pw > 0
        if not bool(use.any()):
            return z.sum() * 0.0
        zs, ls, ws = z[use], lab[use], pw[use]
        target = torch.zeros_like(zs)
        obj = ls > BACKGROUND
        target[obj, ls[obj] - 1] = 1.0
        per = F.binary_cross_entropy_with_logits(zs, target, reduction="none").mean(1)
        return (per * ws).sum() / ws.sum()

    def _losses(self, net, source: BagSource, ids, Y, W, dev, warm: bool = False):
        return self._batch_loss(net, source.batch(ids), ids, Y, W, dev, warm)

    def _batch_loss(self, net, batch: tuple, ids, Y, W, dev, warm: bool = False):
        xb, mb, lab, pw = batch
        z = net(torch.from_numpy(xb).to(dev))
        if not bool(torch.isfinite(z).all()):  # before the loss: BCE refuses NaN with a traceback of its own
            raise diverged("the patch scores are not finite", float(self.lr))
        mask = torch.from_numpy(mb).to(dev)
        loss = self._image_loss(self._image_logits(z, mask, warm=warm), torch.from_numpy(Y[ids]).to(dev),
                                torch.from_numpy(W[ids]).to(dev))
        if float(self.patch_weight) > 0 and lab is not None:
            loss = loss + float(self.patch_weight) * self._patch_loss(
                z, torch.from_numpy(lab).to(dev), torch.from_numpy(pw).to(dev))
        return loss

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
        if self.aggregation not in AGGREGATIONS:
            raise HeadError(f"must be lse, max or power, got {self.aggregation!r}", param="aggregation")
        if float(self.patch_weight) > 0 and source.patch_labels is None:
            raise HeadError("> 0 (hybrid objective) needs patch labels", param="patch_weight")
        Y = np.asarray(Y, np.float32)
        W = np.ones_like(Y) if ignore is None else (~np.asarray(ignore, bool)).astype(np.float32)
        seed = 0 if self.random_state is None else int(self.random_state)
        rng = np.random.RandomState(seed)
        ids = rng.permutation(np.flatnonzero(source.sizes() > 0))
        n_val = int(round(float(self.validation_fraction) * len(ids))) if self.validation_fraction else 0
        val_ids, order = ids[:n_val], [ids[n_val:]]
        if len(order[0]) == 0:
            raise HeadError("no training image has patches")
        dev = resolve_device(self.device)
        bs = int(self.batch_images)

        def make():
            net = self._build(source.n_features, Y.shape[1]).to(dev)
            return net, torch.optim.Adam(net.parameters(), lr=float(self.lr), weight_decay=float(self.weight_decay))

        def run_epoch(net, opt, epoch):
            train_ids, total = order[0], 0.0
            id_batches = [train_ids[s:s + bs] for s in range(0, len(train_ids), bs)]
            for b, batch in zip(id_batches, source.batches(id_batches)):
                loss = self._batch_loss(net, batch, b, Y, W, dev, warm=epoch < int(self.warmup_epochs))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(b)
            order[0] = train_ids[rng.permutation(len(train_ids))]
            return total / len(train_ids)

        def validate(net):
            net.eval()
            id_batches = np.array_split(val_ids, range(bs, len(val_ids), bs))
            with torch.inference_mode():
                return sum(float(self._batch_loss(net, batch, v, Y, W, dev)) * len(v)
                           for v, batch in zip(id_batches, source.batches(id_batches))) / len(val_ids)

        net, history = train_torch(make, seed=seed, device=dev, max_epochs=int(self.max_epochs), run_epoch=run_epoch,
                                   validate=validate if len(val_ids) else None,
                                   schedule=PatienceSchedule(self.patience))
        self.net_, self.history_, self.n_epochs_ = net, history, len(history)
        self.n_features_in_, self.n_outputs_ = source.n_features, Y.shape[1]
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
                o = self._image_logits(self.net_(torch.from_numpy(xb).to(dev)), torch.from_numpy(mb).to(dev))
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
        labels = weights = None
        extra: dict = {}
        if float(est.patch_weight) > 0:
            policy = as_policy(config.option("background"), weight=config.option("background_weight"))
            labels = c.labels
            keep, w, w_bg = background_weights(labels, policy, random_state=config.random_state)
            weights = np.zeros(len(labels), np.float32)
            weights[keep] = w
            extra.update(background=policy.describe(), background_weight=w_bg, patch_weight=float(est.patch_weight),
                         train_patches=int(len(keep)))
        source = BagSource.from_cache(c, memory_limit=config.memory_limit, patch_labels=labels, patch_weights=weights)
        est.fit_source(source, t.labels, ignore=t.difficult & ~t.labels)
        extra.update(aggregation=est.describe_aggregation(), epochs=est.n_epochs_,
                     training_data="stream" if source.streaming else "memory")
        return TrainedHead.from_cache(est, kind, c, image_level_summary(c, config, t0, extra), config.objective)
