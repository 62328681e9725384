"""The ``attention`` objective: gated attention pooling of a bag's cached patch features (Ilse et al., ICML 2018).

Each patch of an image gets a class score from a linear layer and, per class (or one for all
classes), an attention logit from a gated network, ``w · (tanh(V x) ⊙ sigmoid(U x))``; the
softmax of the attention logits over the image's patches weighs the patches, and the image's
class logit is the weighted sum of the patch scores, which equals a linear classifier of the
attention-weighted mean of the patch features (the paper's bag embedding). The weights say
where the evidence is: :meth:`AttentionHead.patch_attention` gives them for localisation maps.
:func:`fit_attention_objective` trains it on a cache, streaming bags within ``memory_limit``.
"""

from __future__ import annotations

import time
from typing import Mapping, Optional

import numpy as np
import torch
from sklearn.base import BaseEstimator
from torch import nn
from torch.nn import functional as F

from featurecache.cache import open_cache
from featurecache.errors import HeadError
from featurecache.heads._sources import BagSource
from featurecache.heads._torch import PatienceSchedule, TorchState, diverged, train_torch
from featurecache.heads.bags import BagTrainer
from featurecache.heads.mil import bag_source, image_level_summary
from featurecache.heads.options import ATTENTION_BRANCHES, OPTIONS
from featurecache.heads.registry import FitConfig, make_head
from featurecache.heads.trained import TrainedHead
from featurecache.patches import AMBIGUOUS
from featurecache.resources import resolve_device

__all__ = ["AttentionHead", "GatedAttention", "attend", "describe_attention", "fit_attention_objective"]


class GatedAttention(nn.Module):
    """Patch class scores and gated attention logits of patch features.

    Parameters
    ----------
    n_features, n_outputs : int
        Feature dimension D and classes C.
    dim : int
        Width L of the attention network.
    branches : int
        Attention logits per patch: C (one branch per class) or 1 (shared by the classes).
    dropout : float
        Dropout on the patch features while training.
    """

    def __init__(self, n_features: int, n_outputs: int, dim: int, branches: int, dropout: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(float(dropout))
        self.V, self.U = nn.Linear(n_features, dim), nn.Linear(n_features, dim)
        self.w = nn.Linear(dim, branches)
        self.classify = nn.Linear(n_features, n_outputs)

    def forward(self, x: torch.Tensor) -> tuple:
        """``(patch logits (..., P, C), attention logits (..., P, branches))`` of features ``(..., P, D)``."""
        x = self.drop(x)
        return self.classify(x), self.w(torch.tanh(self.V(x)) * torch.sigmoid(self.U(x)))


def attend(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention weights: the softmax of logits ``(B, P, K)`` over each bag's valid patches ``mask (B, P)``."""
    return torch.softmax(logits.masked_fill(~mask[:, :, None], torch.finfo(logits.dtype).min / 4), dim=1)


def image_logits(z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Image class logits ``(B, C)``: patch logits ``z (B, P, C)`` weighted by attention ``a (B, P, C or 1)``."""
    return (a * z).sum(1)


class AttentionHead(TorchState, BaseEstimator):
    """Gated attention multiple-instance learning on bags of patch features (Ilse, Tomczak and Welling, 2018).

    An image's logit for class c is Σ_i a_ic z_ic: the patch scores ``z = W x_i + b`` weighted
    by attention ``a_ic = softmax_i(w_c · (tanh(V x_i) ⊙ sigmoid(U x_i)))`` over the image's
    patches; with ``attention="shared"`` every class uses one weight per patch. A per-class
    binary cross-entropy compares it with the image labels. With ``patch_weight > 0`` a patch
    loss on box-derived patch labels is added, as the ``hybrid`` objective adds it
    (:class:`~featurecache.heads.bags.BagTrainer`).

    Not a scikit-learn estimator of rows: like :class:`~featurecache.heads.mil.MILHead` it
    learns from bags with one label vector per bag (:meth:`fit_source`), which scikit-learn's
    ``fit(X, y)`` cannot express; ``get_params``/``set_params``/``clone`` work (tested).

    Trained with Adam on mini-batches of whole images, weight decay and a fixed number of
    epochs; the epoch order is the same in memory and streamed, hence the same model.

    Parameters
    ----------
    attention : {"per-class", "shared"}
        One attention branch per class (default), or one shared by all classes.
    attention_dim : int
        Width L of the gated attention network (the paper's 128).
    dropout : float
        Dropout on the patch features while training.
    patch_weight : float
        Weight of the patch loss (0: image labels only).
    lr, weight_decay : float
        Adam's learning rate and L2 penalty.
    max_epochs : int
    batch_images : int
    device : str
    random_state : int, optional
    """

    def __init__(self, attention: str = OPTIONS["attention"].default,
                 attention_dim: int = OPTIONS["attention_dim"].default,
                 dropout: float = OPTIONS["attention_dropout"].default,
                 patch_weight: float = OPTIONS["attention_patch_weight"].default,
                 lr: float = OPTIONS["image_lr"].default, weight_decay: float = OPTIONS["image_weight_decay"].default,
                 max_epochs: int = OPTIONS["image_epochs"].default, batch_images: int = 16, device: str = "auto",
                 random_state: Optional[int] = 0) -> None:
        self.attention = attention
        self.attention_dim = attention_dim
        self.dropout = dropout
        self.patch_weight = patch_weight
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.batch_images = batch_images
        self.device = device
        self.random_state = random_state

    def _build(self, d: int, c: int) -> nn.Module:
        if self.attention not in ATTENTION_BRANCHES:
            raise HeadError(f"must be {' or '.join(ATTENTION_BRANCHES)}, got {self.attention!r}", param="attention")
        return GatedAttention(d, c, int(self.attention_dim), c if self.attention == "per-class" else 1,
                              float(self.dropout))

    # -- training
    def fit(self, X: np.ndarray, image_index: np.ndarray, Y: np.ndarray, ignore: Optional[np.ndarray] = None, *,
            patch_labels: Optional[np.ndarray] = None, patch_weights: Optional[np.ndarray] = None) -> "AttentionHead":
        """Train on patch features ``X`` (N, D) of images ``image_index`` (N,) with labels ``Y`` (M, C).

        ``ignore`` (M, C) leaves an image out of a class's loss; ``patch_labels``/``patch_weights``
        (N,) feed the patch loss when ``patch_weight > 0``.
        """
        if patch_labels is not None and patch_weights is None:
            patch_weights = (np.asarray(patch_labels) != AMBIGUOUS).astype(np.float32)
        source = BagSource(np.asarray(X, np.float32), image_index, len(Y), patch_labels=patch_labels,
                           patch_weights=patch_weights)
        return self.fit_source(source, Y, ignore)

    def fit_source(self, source: BagSource, Y: np.ndarray, ignore: Optional[np.ndarray] = None) -> "AttentionHead":
        """Train on a :class:`BagSource` (in memory or streamed) with image labels ``Y`` (M, C)."""
        if float(self.patch_weight) > 0 and source.patch_labels is None:
            raise HeadError("> 0 needs patch labels (boxes)", param="patch_weight")
        Y = np.asarray(Y, np.float32)
        self.n_features_in_, self.n_outputs_ = source.n_features, Y.shape[1]
        W = np.ones_like(Y) if ignore is None else (~np.asarray(ignore, bool)).astype(np.float32)
        seed = 0 if self.random_state is None else int(self.random_state)
        rng = np.random.RandomState(seed)
        order = [rng.permutation(np.flatnonzero(source.sizes() > 0))]
        if len(order[0]) == 0:
            raise HeadError("no training image has patches")
        dev, bs = resolve_device(self.device), int(self.batch_images)

        def make():
            net = self._build(source.n_features, Y.shape[1]).to(dev)
            return net, torch.optim.Adam(net.parameters(), lr=float(self.lr), weight_decay=float(self.weight_decay))

        def run_epoch(net, opt, epoch):
            ids, total = order[0], 0.0
            id_batches = [ids[s:s + bs] for s in range(0, len(ids), bs)]
            for b, batch in zip(id_batches, source.batches(id_batches)):
                loss = self._loss(net, batch, torch.from_numpy(Y[b]).to(dev), torch.from_numpy(W[b]).to(dev), dev)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(b)
            order[0] = ids[rng.permutation(len(ids))]
            return total / len(ids)

        self.net_, self.history_ = train_torch(make, seed=seed, device=dev, max_epochs=int(self.max_epochs),
                                               run_epoch=run_epoch, validate=None, schedule=PatienceSchedule(0))
        self.n_epochs_ = len(self.history_)
        return self

    def _loss(self, net: nn.Module, batch: tuple, y: torch.Tensor, w: torch.Tensor, dev) -> torch.Tensor:
        """Image loss of one batch of bags ``(features, mask, patch labels, patch weights)``, plus the patch loss."""
        xb, mb, lab, pw = batch
        z, logits = net(torch.from_numpy(xb).to(dev))
        if not bool(torch.isfinite(z).all() and torch.isfinite(logits).all()):
            raise diverged("the patch or attention scores are not finite", float(self.lr))
        out = image_logits(z, attend(logits, torch.from_numpy(mb).to(dev)))
        loss = (F.binary_cross_entropy_with_logits(out, y, reduction="none") * w).sum() / w.sum().clamp_min(1e-12)
        if float(self.patch_weight) > 0 and lab is not None:
            loss = loss + float(self.patch_weight) * BagTrainer._patch_loss(
                z, torch.from_numpy(lab).to(dev), torch.from_numpy(pw).to(dev))
        return loss

    # -- scores and attention
    def _bag_outputs(self, source: BagSource, batch_images: int = 64):
        """``(image ids, image logits (B, C), attention (B, P, C or 1), mask (B, P))`` per batch of bags, on the CPU."""
        dev = next(self.net_.parameters()).device
        usable = np.flatnonzero(source.sizes() > 0)
        id_batches = [usable[s:s + batch_images] for s in range(0, len(usable), batch_images)]
        with torch.inference_mode():
            for ids, (xb, mb, _, _) in zip(id_batches, source.batches(id_batches)):
                z, logits = self.net_(torch.from_numpy(xb).to(dev))
                a = attend(logits, torch.from_numpy(mb).to(dev))
                yield ids, image_logits(z, a).cpu(), a.cpu(), mb

    def image_scores_from_source(self, source: BagSource, *, batch_images: int = 64) -> np.ndarray:
        """Image scores ``(M, C)``: the probability of each class (0 for an image without patches)."""
        out = np.zeros((source.n_images, self.n_outputs_), np.float32)
        for ids, logit, _, _ in self._bag_outputs(source, batch_images):
            out[ids] = torch.sigmoid(logit).numpy()
        return out

    def attention_from_source(self, source: BagSource, *, batch_images: int = 64) -> list:
        """Each image's attention weights ``(patches, C)``, in the source's patch order (each column sums to 1)."""
        out = [np.zeros((0, self.n_outputs_), np.float32) for _ in range(source.n_images)]
        for ids, _, a, mb in self._bag_outputs(source, batch_images):
            for b, i in enumerate(ids):
                w = a[b, torch.from_numpy(mb[b])].numpy()
                out[i] = np.broadcast_to(w, (len(w), self.n_outputs_)).astype(np.float32)
        return out

    def patch_attention(self, X: np.ndarray) -> np.ndarray:
        """The attention weights ``(N, C)`` of one image's patch features ``X (N, D)`` (each column sums to 1)."""
        return self.attention_from_source(BagSource(np.asarray(X, np.float32), np.zeros(len(X), np.int64), 1))[0]

    def patch_scores(self, X: np.ndarray) -> np.ndarray:
        """Per-class patch probabilities ``(N, C)``: the score of an image all of whose patches are this one."""
        dev = next(self.net_.parameters()).device
        x = torch.from_numpy(np.ascontiguousarray(np.asarray(X, np.float32)))
        with torch.inference_mode():
            out = [torch.sigmoid(self.net_(x[s:s + 8192].to(dev))[0]).cpu() for s in range(0, len(x), 8192)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.n_outputs_), np.float32)

    def score_images(self, cache) -> np.ndarray:
        """Image scores ``(M, C)`` of a cache's selected images (bags read in batches, memory bounded)."""
        return self.image_scores_from_source(BagSource.from_cache(cache, memory_limit=0))

    def image_scores_from_patches(self, X: np.ndarray, image_index: np.ndarray, n_images: int) -> np.ndarray:
        """Image scores ``(M, C)`` from in-memory patch features."""
        return self.image_scores_from_source(BagSource(np.asarray(X, np.float32), image_index, n_images))

    def describe_attention(self) -> str:
        return f"gated {self.attention} attention, L={int(self.attention_dim)}"

    def scoring_label(self) -> str:
        return f"attention:{self.attention}"

    def scoring_text(self) -> str:
        return "trained " + self.describe_attention()


# --------------------------------------------------------------------------- training on a cache


def fit_attention_objective(cache, config: FitConfig, *, kind: str, params: dict) -> TrainedHead:
    """Train the ``attention`` objective on a cache.

    Parameters
    ----------
    cache : path, FeatureCache or MemoryCache
    config : FitConfig
        With ``attention_patch_weight > 0``, its ``background``/``background_weight`` options
        weight the patch loss. Bags are read from HDF5 per batch when the features exceed
        ``memory_limit``.
    kind : str
        ``"attention"``.
    params : dict
        :class:`AttentionHead` parameters.

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
        extra.update(attention=est.describe_attention(), epochs=est.n_epochs_,
                     training_data="stream" if source.streaming else "memory")
        return TrainedHead.from_cache(est, kind, c, image_level_summary(c, config, t0, extra), config.objective)


def describe_attention(s: Mapping, kind: str) -> str:
    """One line on what training did (the objectives table names it)."""
    line = (f"{s['objective']} head ({s.get('attention')}): {s.get('train_images', 0)} training images, "
            f"{s.get('epochs', 0)} epochs; {s.get('seconds', 0):.1f} s")
    if s.get("patch_weight"):
        line += (f"; patch loss weight {s.get('patch_weight', 0):g} on {s.get('train_patches', 0):,} "
                 f"patches (background {s.get('background', '')})")
    return line
