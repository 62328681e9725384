"""Image-level objectives on patch caches: pooled patch features and a one-vs-rest image head.

The paper's objective (``patch``) trains a patch classifier on box-derived patch labels.
The ``image`` objective needs no boxes: each image's patch features are pooled into one
vector (:func:`image_features`) and a one-vs-rest logistic regression is trained on the
images' multi-hot labels (:class:`ImageLogRegHead`); its outputs are image scores directly.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator

from featurecache.cache import FeatureCache
from featurecache.errors import FeaturecacheError
from featurecache.heads import CoefficientState

__all__ = ["IMAGE_POOLINGS", "ImageLogRegHead", "MILHead", "fit_image_head", "fit_mil_head", "image_features"]

#: ``mean``/``max`` over all patches of an image; ``scales``: the mean at each scale,
#: concatenated (coarse to fine); ``coarse``: the mean at the image's smallest λ (the largest
#: patches; the whole image for ``--whole-image`` caches).
IMAGE_POOLINGS = ("mean", "max", "scales", "coarse")


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
    bad = [p for p in pooling if p not in IMAGE_POOLINGS]
    if bad or not pooling:
        raise FeaturecacheError(f"image pooling must be among {', '.join(IMAGE_POOLINGS)}, got {list(pooling)}")
    t = cache.images
    m, d = len(t), cache.feature_dim
    scales_all = cache.scales
    levels = np.unique(scales_all)
    n_levels = len(levels)
    sums = np.zeros((m, d))
    want_max = "max" in pooling
    want_levels = "scales" in pooling or "coarse" in pooling
    maxs = np.full((m, d) if want_max else (0, d), -np.inf)
    # Per-scale sums are M x scales x D: only when asked for.
    level_sums = np.zeros((m, n_levels, d) if want_levels else (0, n_levels, d))
    level_counts = np.zeros((m, n_levels))
    local_all = np.searchsorted(t.row, cache.image_index)
    start = 0
    for ch in cache.iter_chunks(chunk_size):
        n = len(ch.indices)
        local = local_all[start:start + n]
        lev = np.searchsorted(levels, scales_all[start:start + n])
        start += n
        f = ch.features.astype(np.float64)
        np.add.at(sums, local, f)
        if want_max:
            np.maximum.at(maxs, local, f)
        if want_levels:
            np.add.at(level_sums, (local, lev), f)
        np.add.at(level_counts, (local, lev), 1)
    counts = np.maximum(level_counts.sum(1), 1)[:, None]
    parts = []
    for p in pooling:
        if p == "mean":
            parts.append(sums / counts)
        elif p == "max":
            parts.append(np.where(np.isfinite(maxs), maxs, 0.0))
        elif p == "scales":
            parts.append((level_sums / np.maximum(level_counts, 1)[:, :, None]).reshape(m, -1))
        else:  # coarse: the smallest λ each image has
            first = np.argmax(level_counts > 0, axis=1)
            parts.append(level_sums[np.arange(m), first] / np.maximum(level_counts[np.arange(m), first], 1)[:, None])
    return np.concatenate(parts, axis=1).astype(np.float32)


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


def fit_image_head(cache, *, train_split: Optional[str] = None, pooling: Sequence[str] = ("mean",), C: float = 1.0,
                   random_state: int = 0):
    """Train the ``image`` objective on a cache: pooled features, one-vs-rest logistic regression.

    Parameters
    ----------
    cache : path or FeatureCache
    train_split : str, optional
    pooling : sequence of str
        See :data:`IMAGE_POOLINGS`.
    C : float
    random_state : int

    Returns
    -------
    TrainedHead
        With ``summary["objective"] == "image"``; :func:`featurecache.evaluate.evaluate`
        scores images with it directly.
    """
    def train(c: FeatureCache):
        est = ImageLogRegHead(C=C, pooling=tuple(pooling), random_state=random_state)
        t = c.images
        est.fit(image_features(c, pooling=pooling), t.labels, ignore=t.difficult & ~t.labels)
        return est, {"image_pooling": list(pooling)}

    return _fit_image_objective(cache, train_split, "image", "image-logreg", train)


def _fit_image_objective(cache, train_split: Optional[str], objective: str, kind: str, train):
    """Open the training selection, run ``train(cache) -> (estimator, extra summary)``, wrap it."""
    import time

    from featurecache.heads import TrainedHead

    t0 = time.perf_counter()
    own = not isinstance(cache, FeatureCache)
    c = FeatureCache(cache, split=train_split) if own or train_split else cache
    try:
        est, extra = train(c)
        t = c.images
        summary = {"objective": objective, "cache": str(c.path), "train_split": train_split,
                   "train_images": int(len(t)),
                   "images_per_class": {n: int(k) for n, k in zip(c.classes, t.labels.sum(0))}, **extra,
                   "seconds": time.perf_counter() - t0}
        return TrainedHead(est, kind, tuple(c.classes), dict(c.feature_settings), c.fingerprint, summary)
    finally:
        if c is not cache:
            c.close()


class MILHead(BaseEstimator):
    """Multiple-instance learning: a patch scorer trained through an image-level aggregation.

    Each patch gets one logit per class from a linear layer (``hidden=0``) or a small MLP;
    an image's logit for a class aggregates its patches' logits, and a per-class binary
    cross-entropy compares it with the image labels. No patch labels or boxes are used
    (Oquab et al., CVPR 2015, train this way with max pooling). Aggregations:

    * ``"max"``: the largest patch logit;
    * ``"lse"``: log-sum-exp with temperature r, (1/r)·log mean_i exp(r·z_i), between the
      mean (r → 0) and the max (r → ∞);
    * ``"power"``: the paper's test-time score on probabilities, ((1/M) Σ σ(z_i)^k)^(1/k).

    Trained with Adam on mini-batches of whole images, with weight decay and early stopping
    on a held-out fraction of the training images (the best epoch's parameters are kept).

    Parameters
    ----------
    hidden : int
        0 for a linear scorer (default), else the width of one ReLU hidden layer.
    aggregation : {"lse", "max", "power"}
    temperature : float
        r of ``lse``. Default 5.
    k : float
        Exponent of ``power``. Default 5.
    lr, weight_decay : float
    max_epochs, patience : int
    batch_images : int
    validation_fraction : float
        Training images held out for early stopping (0 disables it).
    device : str
    random_state : int, optional
    """

    def __init__(self, hidden: int = 0, aggregation: str = "lse", temperature: float = 5.0, k: float = 5.0,
                 lr: float = 0.05, weight_decay: float = 1e-4, max_epochs: int = 100, patience: int = 10,
                 batch_images: int = 16, validation_fraction: float = 0.2, device: str = "auto",
                 random_state: Optional[int] = 0) -> None:
        self.hidden = hidden
        self.aggregation = aggregation
        self.temperature = temperature
        self.k = k
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.patience = patience
        self.batch_images = batch_images
        self.validation_fraction = validation_fraction
        self.device = device
        self.random_state = random_state

    def _net(self, d: int, c: int) -> "torch.nn.Module":
        from torch import nn

        if int(self.hidden) > 0:
            return nn.Sequential(nn.Linear(d, int(self.hidden)), nn.ReLU(), nn.Dropout(0.5), nn.Linear(int(self.hidden), c))
        return nn.Linear(d, c)

    def _image_logits(self, z: "torch.Tensor", mask: "torch.Tensor") -> "torch.Tensor":
        """z: (B, P, C) patch logits, mask: (B, P) valid patches -> (B, C) image logits (or probabilities for power)."""
        neg = torch.finfo(z.dtype).min / 4
        m = mask[:, :, None]
        if self.aggregation == "max":
            return z.masked_fill(~m, neg).amax(1)
        if self.aggregation == "lse":
            r = float(self.temperature)
            n = mask.sum(1, keepdim=True).clamp_min(1).to(z.dtype)
            return (torch.logsumexp((r * z).masked_fill(~m, neg), dim=1) - torch.log(n)) / r
        k = float(self.k)
        p = torch.sigmoid(z) * m
        mean = (p ** k).sum(1) / mask.sum(1, keepdim=True).clamp_min(1).to(z.dtype)
        return mean.clamp_min(1e-12) ** (1.0 / k)

    def _loss(self, out: "torch.Tensor", y: "torch.Tensor", w: "torch.Tensor") -> "torch.Tensor":
        from torch.nn import functional as F

        if self.aggregation == "power":
            losses = F.binary_cross_entropy(out.clamp(1e-6, 1 - 1e-6), y, reduction="none")
        else:
            losses = F.binary_cross_entropy_with_logits(out, y, reduction="none")
        return (losses * w).sum() / w.sum().clamp_min(1e-12)

    @staticmethod
    def _groups(image_index: np.ndarray, n_images: int) -> list:
        order = np.argsort(image_index, kind="stable")
        bounds = np.searchsorted(image_index[order], np.arange(n_images + 1))
        return [order[bounds[i]:bounds[i + 1]] for i in range(n_images)]

    def _batch(self, X, groups, images, dev):
        n = max(len(groups[i]) for i in images)
        xb = np.zeros((len(images), n, X.shape[1]), np.float32)
        mb = np.zeros((len(images), n), bool)
        for b, i in enumerate(images):
            g = groups[i]
            xb[b, :len(g)] = X[g]
            mb[b, :len(g)] = True
        return torch.from_numpy(xb).to(dev), torch.from_numpy(mb).to(dev)

    def fit(self, X: np.ndarray, image_index: np.ndarray, Y: np.ndarray, ignore: Optional[np.ndarray] = None) -> "MILHead":
        """Train on patch features ``X`` (N, D) of images ``image_index`` (N,) with labels ``Y`` (M, C)."""
        if self.aggregation not in ("lse", "max", "power"):
            raise FeaturecacheError(f"MIL aggregation must be lse, max or power, got {self.aggregation!r}")
        X = np.asarray(X, np.float32)
        Y = np.asarray(Y, np.float32)
        m, c = Y.shape
        w_all = np.ones_like(Y) if ignore is None else (~np.asarray(ignore, bool)).astype(np.float32)
        groups = self._groups(np.asarray(image_index, np.int64), m)
        seed = 0 if self.random_state is None else int(self.random_state)
        rng = np.random.RandomState(seed)
        usable = np.array([len(g) > 0 for g in groups])
        ids = rng.permutation(np.flatnonzero(usable))
        n_val = int(round(self.validation_fraction * len(ids))) if self.validation_fraction else 0
        val_ids, train_ids = ids[:n_val], ids[n_val:]
        dev = torch.device("cuda" if self.device == "auto" and torch.cuda.is_available() else
                           ("cpu" if self.device == "auto" else self.device))
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            net = self._net(X.shape[1], c).to(dev)
            opt = torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            best, best_state, bad, history = float("inf"), None, 0, []
            for epoch in range(int(self.max_epochs)):
                net.train()
                total = 0.0
                for s in range(0, len(train_ids), int(self.batch_images)):
                    b = train_ids[s:s + int(self.batch_images)]
                    xb, mb = self._batch(X, groups, b, dev)
                    out = self._image_logits(net(xb), mb)
                    loss = self._loss(out, torch.from_numpy(Y[b]).to(dev), torch.from_numpy(w_all[b]).to(dev))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(b)
                train_ids = train_ids[rng.permutation(len(train_ids))]
                val_loss = self._eval_loss(net, X, groups, val_ids, Y, w_all, dev) if len(val_ids) else None
                history.append({"epoch": epoch + 1, "train_loss": total / max(len(train_ids), 1), "val_loss": val_loss})
                monitored = val_loss if val_loss is not None else history[-1]["train_loss"]
                if monitored < best - 1e-4:
                    best, bad = monitored, 0
                    best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
                else:
                    bad += 1
                    if bad >= int(self.patience):
                        break
        net.load_state_dict(best_state)
        net.eval()
        self.net_, self.history_, self.n_epochs_ = net, history, len(history)
        self.n_features_in_, self.n_outputs_ = X.shape[1], c
        return self

    def _eval_loss(self, net, X, groups, ids, Y, w, dev) -> float:
        net.eval()
        with torch.inference_mode():
            xb, mb = self._batch(X, groups, ids, dev)
            out = self._image_logits(net(xb), mb)
            return float(self._loss(out, torch.from_numpy(Y[ids]).to(dev), torch.from_numpy(w[ids]).to(dev)))

    def patch_scores(self, X: np.ndarray) -> np.ndarray:
        """Per-class patch probabilities σ(z) ``(N, C)`` (for localisation maps)."""
        dev = next(self.net_.parameters()).device
        with torch.inference_mode():
            return torch.sigmoid(self.net_(torch.from_numpy(np.asarray(X, np.float32)).to(dev))).cpu().numpy()

    def image_scores_from_patches(self, X: np.ndarray, image_index: np.ndarray, n_images: int) -> np.ndarray:
        """Image scores ``(M, C)`` in [0, 1]: the trained aggregation of each image's patches."""
        groups = self._groups(np.asarray(image_index, np.int64), n_images)
        dev = next(self.net_.parameters()).device
        out = np.zeros((n_images, self.n_outputs_), np.float32)
        with torch.inference_mode():
            for s in range(0, n_images, 64):
                ids = [i for i in range(s, min(s + 64, n_images)) if len(groups[i])]
                if not ids:
                    continue
                xb, mb = self._batch(X, groups, ids, dev)
                o = self._image_logits(self.net_(xb), mb)
                out[ids] = (o if self.aggregation == "power" else torch.sigmoid(o)).cpu().numpy()
        return out

    def _state(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.net_.state_dict().items()}

    def _restore(self, state: dict, n_features: int, n_outputs: int) -> None:
        net = self._net(n_features, n_outputs)
        net.load_state_dict(state)
        self.net_ = net.eval()
        self.n_features_in_, self.n_outputs_ = n_features, n_outputs


def fit_mil_head(cache, *, train_split: Optional[str] = None, params: Optional[dict] = None, random_state: int = 0):
    """Train the ``mil`` objective on a cache's patch features and image labels; returns a TrainedHead."""

    def train(c: FeatureCache):
        t = c.images
        est = MILHead(**{"random_state": random_state, **(params or {})})
        est.fit(c.read_features(), np.searchsorted(t.row, c.image_index), t.labels, ignore=t.difficult & ~t.labels)
        return est, {"aggregation": est.aggregation, "epochs": est.n_epochs_}

    return _fit_image_objective(cache, train_split, "mil", "mil", train)
