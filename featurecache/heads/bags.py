"""Training a scorer on bags: one label vector per image, a variable number of patch rows per image.

:class:`BagTrainer` is the one trainer of the image-label torch heads: :class:`~featurecache.heads.mil.MILHead`
(patches aggregated into an image score, optionally with a patch loss) and
:class:`~featurecache.heads.image.ImageMLPHead` (an image is a bag of one pooled vector).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from featurecache.errors import HeadError
from featurecache.heads._sources import BagSource
from featurecache.heads._torch import PatienceSchedule, diverged, train_torch
from featurecache.heads.options import AGGREGATIONS
from featurecache.heads.pooling import DEFAULT_POWER
from featurecache.patches import BACKGROUND
from featurecache.resources import resolve_device

__all__ = ["BagTrainer", "aggregate", "scorer"]


def scorer(n_features: int, n_outputs: int, hidden: int) -> nn.Module:
    """A linear scorer (``hidden=0``), else one ReLU hidden layer of that width with dropout 0.5."""
    if int(hidden) > 0:
        h = int(hidden)
        return nn.Sequential(nn.Linear(n_features, h), nn.ReLU(), nn.Dropout(0.5), nn.Linear(h, n_outputs))
    return nn.Linear(n_features, n_outputs)


def aggregate(z: torch.Tensor, mask: torch.Tensor, aggregation: str, *, temperature: float = 2.0,
              k: float = DEFAULT_POWER, warm: bool = False) -> torch.Tensor:
    """z: (B, P, C) patch logits, mask: (B, P) valid patches -> (B, C) image logits (probabilities for power).

    ``max``: the largest logit; ``lse``: (1/r)·log mean exp(r·z) at ``temperature`` r;
    ``power``: ((1/M) Σ σ(z)^k)^(1/k). ``warm``: log-sum-exp at r = 1 instead of a sharp
    aggregation (the warm-up epochs).
    """
    neg = torch.finfo(z.dtype).min / 4
    m = mask[:, :, None]
    n = mask.sum(1, keepdim=True).clamp_min(1).to(z.dtype)
    if warm and aggregation != "power":
        return (torch.logsumexp(z.masked_fill(~m, neg), dim=1) - torch.log(n))
    if aggregation == "max":
        return z.masked_fill(~m, neg).amax(1)
    if aggregation == "lse":
        r = float(temperature)
        return (torch.logsumexp((r * z).masked_fill(~m, neg), dim=1) - torch.log(n)) / r
    k = float(k)
    # log-domain power mean: stable where sigma(z)^k underflows.
    logp = torch.nn.functional.logsigmoid(z) * k
    log_mean = torch.logsumexp(logp.masked_fill(~m, neg), dim=1) - torch.log(n)
    return torch.exp(log_mean / k)


@dataclass(frozen=True)
class BagTrainer:
    """How a scorer of bags is trained: Adam on mini-batches of whole images, per-class binary
    cross-entropy of the aggregated image score against the image labels, optionally a weighted
    patch loss on labelled patches, and early stopping on held-out images.

    Attributes are the estimators' parameters of the same names (see :class:`~featurecache.heads.mil.MILHead`).
    """

    hidden: int
    lr: float
    weight_decay: float
    max_epochs: int
    patience: int
    batch_images: int
    validation_fraction: float
    warmup_epochs: int
    device: str
    random_state: Optional[int]
    aggregation: str = "max"
    temperature: float = 2.0
    k: float = DEFAULT_POWER
    patch_weight: float = 0.0

    @classmethod
    def of(cls, estimator, **fixed) -> "BagTrainer":
        """The trainer of an estimator's parameters (those it has), with ``fixed`` settings over them."""
        params = estimator.get_params()
        return cls(**{**{k: v for k, v in params.items() if k in cls.__dataclass_fields__}, **fixed})

    def image_outputs(self, z: torch.Tensor, mask: torch.Tensor, *, warm: bool = False) -> torch.Tensor:
        """Image logits (probabilities for ``power``) of patch logits (:func:`aggregate`)."""
        return aggregate(z, mask, self.aggregation, temperature=self.temperature, k=self.k, warm=warm)

    def _image_loss(self, out, y, w):
        if self.aggregation == "power":
            losses = F.binary_cross_entropy(out.clamp(1e-6, 1 - 1e-6), y, reduction="none")
        else:
            losses = F.binary_cross_entropy_with_logits(out, y, reduction="none")
        return (losses * w).sum() / w.sum().clamp_min(1e-12)

    @staticmethod
    def _patch_loss(z, lab, pw):
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

    def loss(self, net: nn.Module, batch: tuple, ids, Y, W, dev, warm: bool = False):
        """The loss of one batch of bags ``(features, mask, patch labels, patch weights)`` of images ``ids``."""
        xb, mb, lab, pw = batch
        z = net(torch.from_numpy(xb).to(dev))
        if not bool(torch.isfinite(z).all()):  # before the loss: BCE refuses NaN with a traceback of its own
            raise diverged("the patch scores are not finite", float(self.lr))
        mask = torch.from_numpy(mb).to(dev)
        loss = self._image_loss(self.image_outputs(z, mask, warm=warm), torch.from_numpy(Y[ids]).to(dev),
                                torch.from_numpy(W[ids]).to(dev))
        if float(self.patch_weight) > 0 and lab is not None:
            loss = loss + float(self.patch_weight) * self._patch_loss(
                z, torch.from_numpy(lab).to(dev), torch.from_numpy(pw).to(dev))
        return loss

    def fit(self, source: BagSource, Y: np.ndarray, ignore: Optional[np.ndarray] = None) -> tuple:
        """Train a :func:`scorer` on a :class:`BagSource` with image labels ``Y`` (M, C).

        Returns
        -------
        net : nn.Module
            In evaluation mode (the best held-out epoch's parameters with ``validation_fraction``).
        history : list of dict
        """
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
            net = scorer(source.n_features, Y.shape[1], self.hidden).to(dev)
            return net, torch.optim.Adam(net.parameters(), lr=float(self.lr), weight_decay=float(self.weight_decay))

        def run_epoch(net, opt, epoch):
            train_ids, total = order[0], 0.0
            id_batches = [train_ids[s:s + bs] for s in range(0, len(train_ids), bs)]
            for b, batch in zip(id_batches, source.batches(id_batches)):
                loss = self.loss(net, batch, b, Y, W, dev, warm=epoch < int(self.warmup_epochs))
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
                return sum(float(self.loss(net, batch, v, Y, W, dev)) * len(v)
                           for v, batch in zip(id_batches, source.batches(id_batches))) / len(val_ids)

        return train_torch(make, seed=seed, device=dev, max_epochs=int(self.max_epochs), run_epoch=run_epoch,
                           validate=validate if len(val_ids) else None, schedule=PatienceSchedule(self.patience))
