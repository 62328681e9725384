"""Image-level objectives on patch caches: pooled-feature heads, multiple-instance and hybrid heads.

The paper's objective (``patch``) trains a patch classifier on box-derived patch labels.
The objectives here learn from image labels, which need no boxes:

* ``image``: each image's patch features are pooled into one vector
  (:func:`image_features`) and a one-vs-rest logistic regression (:class:`ImageLogRegHead`)
  or a small per-class-sigmoid MLP (:class:`ImageMLPHead`) is trained on the images'
  multi-hot labels;
* ``mil``: a patch scorer trained through an image-level aggregation of its patch scores
  (max, log-sum-exp, power mean) against the image labels (:class:`MILHead`);
* ``hybrid``: the ``mil`` loss plus a weighted patch loss on the box-derived patch labels.

:func:`fit_objective` trains any of them (and ``patch``) on a cache.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from sklearn.base import BaseEstimator

from featurecache.cache import FeatureCache, read_rows
from featurecache.errors import FeaturecacheError
from featurecache.heads import CoefficientState
from featurecache.patches import AMBIGUOUS, BACKGROUND

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_OBJECTIVE", "IMAGE_POOLINGS", "OBJECTIVES", "OBJECTIVE_OPTIONS", "BagSource", "ImageLogRegHead",
           "ImageMLPHead", "MILHead",
           "fit_image_head", "fit_mil_head", "fit_objective", "image_features", "parse_aggregation",
           "pool_image_features"]

#: What ``fit --objective`` accepts.
OBJECTIVES = ("patch", "image", "mil", "hybrid")

#: ``fit``'s default: the objective whose default configuration measured best on the shared
#: real data (docs/results.md, "Objectives").
DEFAULT_OBJECTIVE = "mil"

#: Which ``fit`` options each objective uses (an explicitly given option outside its
#: objective is an error rather than silently ignored).
OBJECTIVE_OPTIONS = {
    "patch": {"head", "hidden", "dropout", "lr", "weight_decay", "batch_size", "epochs", "C", "background",
              "background_weight", "val_cache", "val_split"},
    "image": {"image_pooling", "image_head", "C", "image_hidden", "image_lr", "image_weight_decay", "image_epochs"},
    "mil": {"aggregation", "image_hidden", "image_lr", "image_weight_decay", "image_epochs"},
    "hybrid": {"aggregation", "patch_weight", "background", "background_weight", "image_hidden", "image_lr",
               "image_weight_decay", "image_epochs"},
}

#: ``mean``/``max`` over all patches of an image; ``scales``: the mean at each scale,
#: concatenated (coarse to fine); ``coarse``: the mean at the image's smallest λ (the largest
#: patches; the whole image for ``--whole-image`` caches).
IMAGE_POOLINGS = ("mean", "max", "scales", "coarse")


def _check_pooling(pooling: Sequence[str]) -> tuple:
    bad = [p for p in pooling if p not in IMAGE_POOLINGS]
    if bad or not pooling:
        raise FeaturecacheError(f"image pooling must be among {', '.join(IMAGE_POOLINGS)}, got {list(pooling)}")
    return tuple(pooling)


class _Pooler:
    """Running per-image sums / maxima / per-scale sums, fed chunk by chunk."""

    def __init__(self, n_images: int, dim: int, levels: np.ndarray, pooling: tuple) -> None:
        self.pooling, self.levels = pooling, levels
        m, n_levels = n_images, len(levels)
        self.want_max = "max" in pooling
        self.want_levels = "scales" in pooling or "coarse" in pooling
        self.sums = np.zeros((m, dim))
        self.maxs = np.full((m, dim) if self.want_max else (0, dim), -np.inf)
        # Per-scale sums are M x scales x D: only when asked for.
        self.level_sums = np.zeros((m, n_levels, dim) if self.want_levels else (0, n_levels, dim))
        self.level_counts = np.zeros((m, n_levels))

    def add(self, features: np.ndarray, local: np.ndarray, scales: np.ndarray) -> None:
        f = np.asarray(features, np.float64)
        lev = np.searchsorted(self.levels, scales)
        np.add.at(self.sums, local, f)
        if self.want_max:
            np.maximum.at(self.maxs, local, f)
        if self.want_levels:
            np.add.at(self.level_sums, (local, lev), f)
        np.add.at(self.level_counts, (local, lev), 1)

    def result(self) -> np.ndarray:
        m = len(self.sums)
        counts = np.maximum(self.level_counts.sum(1), 1)[:, None]
        parts = []
        for p in self.pooling:
            if p == "mean":
                parts.append(self.sums / counts)
            elif p == "max":
                parts.append(np.where(np.isfinite(self.maxs), self.maxs, 0.0))
            elif p == "scales":
                parts.append((self.level_sums / np.maximum(self.level_counts, 1)[:, :, None]).reshape(m, -1))
            else:  # coarse: the smallest λ each image has
                first = np.argmax(self.level_counts > 0, axis=1)
                parts.append(self.level_sums[np.arange(m), first]
                             / np.maximum(self.level_counts[np.arange(m), first], 1)[:, None])
        return np.concatenate(parts, axis=1).astype(np.float32)


def pool_image_features(X: np.ndarray, image_index: np.ndarray, n_images: int, *, scales: np.ndarray,
                        pooling: Sequence[str] = ("mean",), levels: Optional[np.ndarray] = None) -> np.ndarray:
    """Pool in-memory patch features into one vector per image (see :func:`image_features`).

    Parameters
    ----------
    X : ndarray (N, D)
    image_index : ndarray (N,)
        Image of each patch, in ``0 .. n_images - 1``.
    n_images : int
    scales : ndarray (N,)
        λ of each patch.
    pooling : sequence of str
    levels : ndarray, optional
        The scales ``scales`` pooling lays out (default: those present).

    Returns
    -------
    ndarray (n_images, D · n), float32
    """
    pooling = _check_pooling(pooling)
    levels = np.unique(scales) if levels is None else np.asarray(levels)
    pool = _Pooler(n_images, X.shape[1], levels, pooling)
    pool.add(X, np.asarray(image_index), np.asarray(scales))
    return pool.result()


def image_features(cache: FeatureCache, *, pooling: Sequence[str] = ("mean",), chunk_size: int = 65536) -> np.ndarray:
    """Pool each selected image's patch features into one vector.

    Parameters
    ----------
    cache : FeatureCache
    pooling : sequence of str
        Names from :data:`IMAGE_POOLINGS`; their vectors are concatenated in this order.
    chunk_size : int
        Patches read at a time (memory stays bounded by the per-image sums).

    Returns
    -------
    ndarray (M, D · n), float32
        One row per selected image, in the order of ``cache.images``.
    """
    pooling = _check_pooling(pooling)
    t = cache.images
    scales_all = cache.scales
    pool = _Pooler(len(t), cache.feature_dim, np.unique(scales_all), pooling)
    local_all = np.searchsorted(t.row, cache.image_index)
    start = 0
    for ch in cache.iter_chunks(chunk_size):
        n = len(ch.indices)
        pool.add(ch.features, local_all[start:start + n], scales_all[start:start + n])
        start += n
    return pool.result()


class ImageLogRegHead(CoefficientState, BaseEstimator):
    """One-vs-rest logistic regression on pooled image features and multi-hot labels.

    Parameters
    ----------
    C : float
        Inverse L2 strength of each binary problem. Default 1.0.
    max_iter : int
    pooling : tuple of str
        Which :func:`image_features` the head was trained on (kept with the head).
    random_state : int, optional

    Attributes
    ----------
    coef_ : ndarray (C, D)
    intercept_ : ndarray (C,)
        ``-inf`` for a class with no positive (or no negative) training image: it scores 0
        (or 1) everywhere.
    """

    def __init__(self, C: float = 1.0, max_iter: int = 2000, pooling: tuple = ("mean",),
                 random_state: Optional[int] = 0) -> None:
        self.C = C
        self.max_iter = max_iter
        self.pooling = pooling
        self.random_state = random_state

    def fit(self, X: np.ndarray, Y: np.ndarray, ignore: Optional[np.ndarray] = None) -> "ImageLogRegHead":
        """Fit one binary logistic regression per class.

        Parameters
        ----------
        X : ndarray (M, D)
        Y : ndarray (M, C), bool
        ignore : ndarray (M, C), bool, optional
            Images left out of a class's problem (VOC ``difficult``-only).
        """
        from sklearn.linear_model import LogisticRegression

        X = np.asarray(X, dtype=np.float64)
        Y = np.asarray(Y, dtype=bool)
        ignore = np.zeros_like(Y) if ignore is None else np.asarray(ignore, bool)
        coef = np.zeros((Y.shape[1], X.shape[1]))
        intercept = np.full(Y.shape[1], -np.inf)
        for c in range(Y.shape[1]):
            keep = ~ignore[:, c]
            y = Y[keep, c]
            if y.all():
                intercept[c] = np.inf
                continue
            if not y.any():
                continue
            model = LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.random_state)
            model.fit(X[keep], y)
            coef[c], intercept[c] = model.coef_[0], model.intercept_[0]
        self.coef_, self.intercept_ = coef, intercept
        self.n_features_in_, self.n_outputs_ = X.shape[1], Y.shape[1]
        return self

    def image_scores(self, X: np.ndarray) -> np.ndarray:
        """Per-class probabilities ``(M, C)``."""
        z = np.asarray(X, dtype=np.float64) @ self.coef_.T + self.intercept_
        with np.errstate(over="ignore", invalid="ignore"):
            p = 1.0 / (1.0 + np.exp(-z))
        return np.nan_to_num(p, nan=0.0).astype(np.float32)


# --------------------------------------------------------------------------- bags of patches


class BagSource:
    """Patch features grouped by image ("bags"), in memory or left in an HDF5 dataset.

    Parameters
    ----------
    features : ndarray (N, D) or h5py.Dataset
        In memory: the patches themselves. On disk: the whole features dataset, with ``rows``.
    image_index : ndarray (N,)
        Image of each patch, in ``0 .. n_images - 1``.
    n_images : int
    rows : ndarray (N,), optional
        File row of each patch when ``features`` is on disk (sorted within an image).
    patch_labels : ndarray (N,), optional
        Box-derived labels (:mod:`featurecache.patches` encoding), for the hybrid objective.
    patch_weights : ndarray (N,), optional
        Weight of each patch in the patch loss (0: not used).
    """

    def __init__(self, features, image_index: np.ndarray, n_images: int, *, rows: Optional[np.ndarray] = None,
                 patch_labels: Optional[np.ndarray] = None, patch_weights: Optional[np.ndarray] = None) -> None:
        self.features, self.rows = features, rows
        self.patch_labels, self.patch_weights = patch_labels, patch_weights
        image_index = np.asarray(image_index, np.int64)
        order = np.argsort(image_index, kind="stable")
        bounds = np.searchsorted(image_index[order], np.arange(n_images + 1))
        self.groups = [order[bounds[i]:bounds[i + 1]] for i in range(n_images)]

    @classmethod
    def from_cache(cls, cache: FeatureCache, *, memory_limit: Optional[int] = None,
                   patch_labels: Optional[np.ndarray] = None,
                   patch_weights: Optional[np.ndarray] = None) -> "BagSource":
        """The selected images of a cache: features read into memory if they fit ``memory_limit``
        bytes (default half the available memory), else read image batch by image batch."""
        from featurecache.heads import _available_memory

        t = cache.images
        local = np.searchsorted(t.row, cache.image_index)
        limit = memory_limit if memory_limit is not None else _available_memory() // 2
        need = cache.num_patches * cache.feature_dim * 4
        if need <= limit:
            return cls(cache.read_features(), local, len(t), patch_labels=patch_labels, patch_weights=patch_weights)
        logger.info("%s: %.1f GiB of features exceed the memory limit; reading them per batch of images",
                    cache.path, need / 2**30)
        return cls(cache.features, local, len(t), rows=cache.indices, patch_labels=patch_labels,
                   patch_weights=patch_weights)

    @property
    def n_images(self) -> int:
        return len(self.groups)

    @property
    def n_features(self) -> int:
        return int(self.features.shape[1])

    @property
    def streaming(self) -> bool:
        return self.rows is not None

    def sizes(self) -> np.ndarray:
        return np.array([len(g) for g in self.groups])

    def _read(self, pos: np.ndarray) -> np.ndarray:
        if self.rows is None:
            return np.asarray(self.features[pos], np.float32)
        file_rows = self.rows[pos]
        order = np.argsort(file_rows, kind="stable")
        out = np.empty((len(pos), self.n_features), np.float32)
        out[order] = read_rows(self.features, file_rows[order])
        return out

    def batch(self, images: Sequence[int]) -> tuple:
        """``(x (B, P, D), mask (B, P), labels (B, P) or None, weights (B, P) or None)`` for the images, padded."""
        groups = [self.groups[i] for i in images]
        n = max((len(g) for g in groups), default=0)
        pos = np.concatenate(groups) if groups else np.zeros(0, np.int64)
        feats = self._read(pos)
        x = np.zeros((len(groups), n, self.n_features), np.float32)
        mask = np.zeros((len(groups), n), bool)
        lab = np.full((len(groups), n), AMBIGUOUS, np.int64) if self.patch_labels is not None else None
        w = np.zeros((len(groups), n), np.float32) if self.patch_weights is not None else None
        s = 0
        for b, g in enumerate(groups):
            x[b, :len(g)] = feats[s:s + len(g)]
            mask[b, :len(g)] = True
            if lab is not None:
                lab[b, :len(g)] = self.patch_labels[g]
            if w is not None:
                w[b, :len(g)] = self.patch_weights[g]
            s += len(g)
        return x, mask, lab, w


def parse_aggregation(text: str) -> tuple:
    """``"lse:2"`` -> ``("lse", 2.0)``; ``"power:5"`` -> ``("power", 5.0)``; ``"max"`` -> ``("max", None)``."""
    name, _, value = str(text).partition(":")
    name = name.strip()
    if name not in ("lse", "max", "power"):
        raise FeaturecacheError(f"MIL aggregation must be lse[:r], max or power[:k], got {text!r}")
    if name == "max":
        if value:
            raise FeaturecacheError(f"MIL aggregation max takes no parameter, got {text!r}")
        return name, None
    try:
        v = float(value) if value else (2.0 if name == "lse" else 5.0)
    except ValueError:
        raise FeaturecacheError(f"MIL aggregation {name}: cannot read {value!r} as a number") from None
    if v <= 0:
        raise FeaturecacheError(f"MIL aggregation {name}: the parameter must be positive, got {v:g}")
    return name, v


class MILHead(BaseEstimator):
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

    def __init__(self, hidden: int = 0, aggregation: str = "power", temperature: float = 2.0, k: float = 5.0,
                 patch_weight: float = 0.0, lr: float = 0.01, weight_decay: float = 1e-4, max_epochs: int = 200,
                 patience: int = 10, batch_images: int = 16, validation_fraction: float = 0.0,
                 warmup_epochs: int = 10, device: str = "auto", random_state: Optional[int] = 0) -> None:
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

    def _net(self, d: int, c: int) -> "torch.nn.Module":
        from torch import nn

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
        from torch.nn import functional as F

        if self.aggregation == "power":
            losses = F.binary_cross_entropy(out.clamp(1e-6, 1 - 1e-6), y, reduction="none")
        else:
            losses = F.binary_cross_entropy_with_logits(out, y, reduction="none")
        return (losses * w).sum() / w.sum().clamp_min(1e-12)

    def _patch_loss(self, z, lab, pw):
        """Per-class BCE of labelled patches against their one-hot label (background: all zeros)."""
        from torch.nn import functional as F

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
        xb, mb, lab, pw = source.batch(ids)
        z = net(torch.from_numpy(xb).to(dev))
        mask = torch.from_numpy(mb).to(dev)
        loss = self._image_loss(self._image_logits(z, mask, warm=warm), torch.from_numpy(Y[ids]).to(dev),
                                torch.from_numpy(W[ids]).to(dev))
        if float(self.patch_weight) > 0 and lab is not None:
            loss = loss + float(self.patch_weight) * self._patch_loss(
                z, torch.from_numpy(lab).to(dev), torch.from_numpy(pw).to(dev))
        return loss

    def _device(self) -> torch.device:
        from featurecache.heads import _device

        return _device(self.device)

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
        if self.aggregation not in ("lse", "max", "power"):
            raise FeaturecacheError(f"MIL aggregation must be lse, max or power, got {self.aggregation!r}")
        if float(self.patch_weight) > 0 and source.patch_labels is None:
            raise FeaturecacheError("patch_weight > 0 (hybrid objective) needs patch labels")
        Y = np.asarray(Y, np.float32)
        m, c = Y.shape
        W = np.ones_like(Y) if ignore is None else (~np.asarray(ignore, bool)).astype(np.float32)
        seed = 0 if self.random_state is None else int(self.random_state)
        rng = np.random.RandomState(seed)
        ids = rng.permutation(np.flatnonzero(source.sizes() > 0))
        n_val = int(round(float(self.validation_fraction) * len(ids))) if self.validation_fraction else 0
        val_ids, train_ids = ids[:n_val], ids[n_val:]
        if len(train_ids) == 0:
            raise FeaturecacheError("no training image has patches")
        dev = self._device()
        bs = int(self.batch_images)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            net = self._net(source.n_features, c).to(dev)
            opt = torch.optim.Adam(net.parameters(), lr=float(self.lr), weight_decay=float(self.weight_decay))
            best, best_state, bad, history = float("inf"), None, 0, []
            for epoch in range(int(self.max_epochs)):
                net.train()
                total = 0.0
                for s in range(0, len(train_ids), bs):
                    b = train_ids[s:s + bs]
                    loss = self._losses(net, source, b, Y, W, dev, warm=epoch < int(self.warmup_epochs))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(b)
                train_ids = train_ids[rng.permutation(len(train_ids))]
                val_loss = None
                if len(val_ids):
                    net.eval()
                    with torch.inference_mode():
                        val_loss = sum(float(self._losses(net, source, v, Y, W, dev)) * len(v)
                                       for v in np.array_split(val_ids, range(bs, len(val_ids), bs))) / len(val_ids)
                history.append({"epoch": epoch + 1, "train_loss": total / len(train_ids), "val_loss": val_loss})
                if val_loss is None:
                    continue
                if val_loss < best - 1e-4:
                    best, bad = val_loss, 0
                    best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
                else:
                    bad += 1
                    if bad >= int(self.patience):
                        break
        if best_state is not None:
            net.load_state_dict(best_state)
        net.eval()
        self.net_, self.history_, self.n_epochs_ = net, history, len(history)
        self.n_features_in_, self.n_outputs_ = source.n_features, c
        return self

    def patch_scores(self, X: np.ndarray) -> np.ndarray:
        """Per-class patch probabilities σ(z) ``(N, C)`` (for localisation maps)."""
        dev = next(self.net_.parameters()).device
        with torch.inference_mode():
            return torch.sigmoid(self.net_(torch.from_numpy(np.asarray(X, np.float32)).to(dev))).cpu().numpy()

    def image_scores_from_source(self, source: BagSource, *, batch_images: int = 64) -> np.ndarray:
        """Image scores ``(M, C)`` in [0, 1]: the trained aggregation of each image's patches."""
        dev = next(self.net_.parameters()).device
        out = np.zeros((source.n_images, self.n_outputs_), np.float32)
        usable = np.flatnonzero(source.sizes() > 0)
        with torch.inference_mode():
            for s in range(0, len(usable), batch_images):
                ids = usable[s:s + batch_images]
                xb, mb, _, _ = source.batch(ids)
                o = self._image_logits(self.net_(torch.from_numpy(xb).to(dev)), torch.from_numpy(mb).to(dev))
                out[ids] = (o if self.aggregation == "power" else torch.sigmoid(o)).cpu().numpy()
        return out

    def image_scores_from_patches(self, X: np.ndarray, image_index: np.ndarray, n_images: int) -> np.ndarray:
        """Image scores ``(M, C)`` from in-memory patch features."""
        return self.image_scores_from_source(BagSource(np.asarray(X, np.float32), image_index, n_images))

    def describe_aggregation(self) -> str:
        return self.aggregation + (f" r={float(self.temperature):g}" if self.aggregation == "lse" else
                                   f" k={float(self.k):g}" if self.aggregation == "power" else "")

    def _state(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.net_.state_dict().items()}

    def _restore(self, state: dict, n_features: int, n_outputs: int) -> None:
        net = self._net(n_features, n_outputs)
        net.load_state_dict(state)
        self.net_ = net.eval().to(self._device())
        self.n_features_in_, self.n_outputs_ = n_features, n_outputs


class ImageMLPHead(MILHead):
    """Per-class sigmoid head (linear or one hidden layer) on pooled image features.

    The ``image`` objective's trainable alternative to :class:`ImageLogRegHead`: binary
    cross-entropy on multi-hot image labels, Adam, weight decay, optional early stopping on
    held-out images. (Internally an image is a bag of one vector.)

    Parameters
    ----------
    hidden, lr, weight_decay, max_epochs, patience, batch_images, validation_fraction, device, random_state
        As :class:`MILHead`.
    pooling : tuple of str
        Which :func:`image_features` the head was trained on (kept with the head).
    """

    def __init__(self, hidden: int = 0, lr: float = 0.01, weight_decay: float = 1e-4, max_epochs: int = 200,
                 patience: int = 10, batch_images: int = 16, validation_fraction: float = 0.0,
                 pooling: tuple = ("mean",), device: str = "auto", random_state: Optional[int] = 0) -> None:
        super().__init__(hidden=hidden, aggregation="max", lr=lr, weight_decay=weight_decay, max_epochs=max_epochs,
                         patience=patience, batch_images=batch_images, validation_fraction=validation_fraction,
                         device=device, random_state=random_state)
        self.pooling = pooling

    def fit(self, X: np.ndarray, Y: np.ndarray, ignore: Optional[np.ndarray] = None) -> "ImageMLPHead":
        """Train on image features ``X`` (M, D) and labels ``Y`` (M, C)."""
        X = np.asarray(X, np.float32)
        return self.fit_source(BagSource(X, np.arange(len(X)), len(X)), Y, ignore)

    def image_scores(self, X: np.ndarray) -> np.ndarray:
        """Per-class probabilities ``(M, C)``."""
        return self.patch_scores(X)


# --------------------------------------------------------------------------- training on a cache


def _open_training(cache, train_split: Optional[str]) -> FeatureCache:
    if isinstance(cache, FeatureCache):
        return cache if train_split is None else FeatureCache(cache.path, split=train_split)
    return FeatureCache(cache, split=train_split)


def _wrap(est, kind: str, objective: str, c: FeatureCache, train_split: Optional[str], t0: float, extra: dict):
    from featurecache.heads import TrainedHead

    t = c.images
    summary = {"objective": objective, "cache": str(c.path), "train_split": train_split,
               "train_images": int(len(t)),
               "images_per_class": {n: int(k) for n, k in zip(c.classes, t.labels.sum(0))}, **extra,
               "seconds": time.perf_counter() - t0}
    return TrainedHead(est, kind, tuple(c.classes), dict(c.feature_settings), c.fingerprint, summary)


def fit_image_head(cache: Union[str, Path, FeatureCache], *, train_split: Optional[str] = None,
                   pooling: Sequence[str] = ("mean",), head: str = "logreg", C: float = 1.0,
                   params: Optional[dict] = None, random_state: int = 0):
    """Train the ``image`` objective on a cache: pooled features, then a per-class image head.

    Parameters
    ----------
    cache : path or FeatureCache
    train_split : str, optional
    pooling : sequence of str
        See :data:`IMAGE_POOLINGS`.
    head : {"logreg", "mlp"}
        One-vs-rest logistic regression (``C``), or :class:`ImageMLPHead` (``params``).
    C : float
    params : dict, optional
        :class:`ImageMLPHead` parameters.
    random_state : int

    Returns
    -------
    TrainedHead
        With ``summary["objective"] == "image"``; :func:`featurecache.evaluate.evaluate`
        scores images with it directly.
    """
    t0 = time.perf_counter()
    pooling = _check_pooling(pooling)
    if head not in ("logreg", "mlp"):
        raise FeaturecacheError(f"image objective: head must be logreg or mlp, got {head!r}")
    c = _open_training(cache, train_split)
    try:
        t = c.images
        if head == "logreg":
            est = ImageLogRegHead(C=C, pooling=pooling, random_state=random_state)
        else:
            est = ImageMLPHead(**{"random_state": random_state, **(params or {}), "pooling": pooling})
        est.fit(image_features(c, pooling=pooling), t.labels, ignore=t.difficult & ~t.labels)
        extra = {"image_pooling": list(pooling)}
        if head == "mlp":
            extra["epochs"] = est.n_epochs_
        return _wrap(est, "image-" + head, "image", c, train_split, t0, extra)
    finally:
        if c is not cache:
            c.close()


def fit_mil_head(cache: Union[str, Path, FeatureCache], *, train_split: Optional[str] = None,
                 params: Optional[dict] = None, background: str = "weight", memory_limit: Optional[int] = None,
                 random_state: int = 0):
    """Train the ``mil`` objective (or ``hybrid``, when ``params["patch_weight"] > 0``) on a cache.

    Parameters
    ----------
    cache : path or FeatureCache
    train_split : str, optional
    params : dict, optional
        :class:`MILHead` parameters.
    background : str
        Hybrid only: how background patches enter the patch loss (``weight``, ``sample:F``,
        ``none``; see :class:`featurecache.heads.BackgroundPolicy`).
    memory_limit : int, optional
        Bytes of features to hold in memory; above it bags are read from HDF5 per batch.
    random_state : int

    Returns
    -------
    TrainedHead
        ``summary["objective"]`` is ``"mil"`` or ``"hybrid"``.
    """
    from featurecache.heads import BackgroundPolicy, background_weights

    t0 = time.perf_counter()
    est = MILHead(**{"random_state": random_state, **(params or {})})
    hybrid = float(est.patch_weight) > 0
    c = _open_training(cache, train_split)
    try:
        t = c.images
        labels = weights = None
        extra: dict = {}
        if hybrid:
            policy = BackgroundPolicy.parse(background) if isinstance(background, str) else background
            labels = c.labels
            keep, w, w_bg = background_weights(labels, policy, random_state=random_state)
            weights = np.zeros(len(labels), np.float32)
            weights[keep] = w
            extra.update(background=policy.describe(), background_weight=w_bg, patch_weight=float(est.patch_weight),
                         train_patches=int(len(keep)))
        source = BagSource.from_cache(c, memory_limit=memory_limit, patch_labels=labels, patch_weights=weights)
        est.fit_source(source, t.labels, ignore=t.difficult & ~t.labels)
        extra.update(aggregation=est.describe_aggregation(), epochs=est.n_epochs_,
                     training_data="stream" if source.streaming else "memory")
        return _wrap(est, "mil", "hybrid" if hybrid else "mil", c, train_split, t0, extra)
    finally:
        if c is not cache:
            c.close()


def fit_objective(cache: Union[str, Path, FeatureCache], *, objective: str = DEFAULT_OBJECTIVE,
                  train_split: Optional[str] = None,
                  head: Optional[str] = None, params: Optional[dict] = None, background: str = "weight",
                  pooling: Sequence[str] = ("mean",), val=None, val_split: Optional[str] = None,
                  memory_limit: Optional[int] = None, random_state: int = 0):
    """Train a head for any objective of :data:`OBJECTIVES` on a cache.

    Parameters
    ----------
    cache : path or FeatureCache
    objective : {"patch", "image", "mil", "hybrid"}
        Default :data:`DEFAULT_OBJECTIVE`.
    train_split : str, optional
    head : str, optional
        ``patch``: mlp (default), logreg, linearsvm; ``image``: logreg (default) or mlp.
    params : dict, optional
        Estimator parameters: :class:`featurecache.heads.MLPHead` (or ``C``) for ``patch``,
        ``C`` or :class:`ImageMLPHead`'s for ``image``, :class:`MILHead`'s for ``mil`` and
        ``hybrid`` (``hybrid`` sets ``patch_weight`` to 0.3 unless given).
    background : str
        Background policy of the patch loss (``patch``, ``hybrid``).
    pooling : sequence of str
        ``image``: the pooled features.
    val, val_split
        ``patch``: validation data for the MLP schedule.
    memory_limit : int, optional
    random_state : int

    Returns
    -------
    TrainedHead
    """
    params = dict(params or {})
    if objective == "patch":
        from featurecache.heads import fit_head

        return fit_head(cache, head=head or "mlp", params=params, background=background, train_split=train_split,
                        val=val, val_split=val_split, memory_limit=memory_limit, random_state=random_state)
    if val is not None or val_split is not None:
        raise FeaturecacheError(f"objective {objective}: validation data are only used by the patch objective "
                                "(the image-level objectives hold out training images themselves)")
    if objective == "image":
        C = params.pop("C", 1.0)
        return fit_image_head(cache, train_split=train_split, pooling=pooling, head=head or "logreg", C=C,
                              params=params, random_state=random_state)
    if objective in ("mil", "hybrid"):
        if objective == "hybrid":
            params.setdefault("patch_weight", 0.3)
            if float(params["patch_weight"]) <= 0:
                raise FeaturecacheError("objective hybrid needs a positive patch weight")
        else:
            params["patch_weight"] = 0.0
        return fit_mil_head(cache, train_split=train_split, params=params, background=background,
                            memory_limit=memory_limit, random_state=random_state)
    raise FeaturecacheError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
