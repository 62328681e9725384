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
from featurecache.heads._torch import PatienceSchedule, diverged, train_lbfgs, train_torch
from featurecache.heads.options import AGGREGATIONS, SOLVERS
from featurecache.heads.pooling import DEFAULT_POWER
from featurecache.patches import BACKGROUND
from featurecache.resources import resolve_device

__all__ = ["BagTrainer", "aggregate", "scorer"]

#: Padded rows (images × the largest bag) of one batch of a full-batch pass: bounds its memory.
_PASS_ROWS = 16384


def scorer(n_features: int, n_outputs: int, hidden: int) -> nn.Module:
    """A linear scorer (``hidden=0``), else one ReLU hidden layer of that width with dropout 0.5."""
    if int(hidden) > 0:
        h = int(hidden)
        return nn.Sequential(nn.Linear(n_features, h), nn.ReLU(), nn.Dropout(0.5), nn.Linear(h, n_outputs))
    return nn.Linear(n_features, n_outputs)


def aggregate(z: torch.Tensor, mask: torch.Tensor, aggregation: str, *, temperature: float = 2.0,
              k: float = DEFAULT_POWER, warm: bool = False, log: bool = False) -> torch.Tensor:
    """z: (B, P, C) patch logits, mask: (B, P) valid patches -> (B, C) image logits (probabilities for power).

    ``max``: the largest logit; ``lse``: (1/r)·log mean exp(r·z) at ``temperature`` r;
    ``power``: ((1/M) Σ σ(z)^k)^(1/k). ``warm``: log-sum-exp at r = 1 instead of a sharp
    aggregation (the warm-up epochs). ``log``: power's log-probabilities instead (the L-BFGS
    solver's loss, smooth where a probability rounds to 0 or 1).
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
    return log_mean / k if log else torch.exp(log_mean / k)


def _size_batches(ids: np.ndarray, sizes: np.ndarray, rows: int) -> list:
    """``ids`` (sorted by their bags' ``sizes``, ascending) cut into runs of at most ``rows`` padded rows each."""
    out, start = [], 0
    while start < len(ids):
        end = start + 1
        while end < len(ids) and (end + 1 - start) * int(sizes[end]) <= rows:
            end += 1
        out.append(ids[start:end])
        start = end
    return out


@dataclass(frozen=True)
class BagTrainer:
    """How a scorer of bags is trained: per-class binary cross-entropy of the aggregated image score
    against the image labels, optionally a weighted patch loss on labelled patches, minimised by
    Adam on mini-batches of whole images (optionally early stopping on held-out images) or, with
    ``solver="lbfgs"`` for a linear scorer without held-out images, by full-batch L-BFGS until the
    loss falls by less than ``tol`` (relative) over :data:`~featurecache.heads.options.LBFGS_WINDOW`
    iterations, at most ``max_epochs`` passes over the bags.

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
    solver: str = "adam"
    tol: float = 0.0

    @classmethod
    def of(cls, estimator, **fixed) -> "BagTrainer":
        """The trainer of an estimator's parameters (those it has), with ``fixed`` settings over them."""
        params = estimator.get_params()
        return cls(**{**{k: v for k, v in params.items() if k in cls.__dataclass_fields__}, **fixed})

    def solver_used(self) -> str:
        """The solver that trains: ``lbfgs`` only when asked for a linear scorer without held-out images."""
        linear_full = int(self.hidden) == 0 and not float(self.validation_fraction)
        return "lbfgs" if self.solver == "lbfgs" and linear_full else "adam"

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
    def _patch_terms(z, lab, pw) -> tuple:
        """``(weighted sum, weight sum)`` of the per-class BCE of labelled patches against their one-hot
        label (background: all zeros)."""
        use = pw > 0
        if not bool(use.any()):
            return z.sum() * 0.0, None
        zs, ls, ws = z[use], lab[use], pw[use]
        target = torch.zeros_like(zs)
        obj = ls > BACKGROUND
        target[obj, ls[obj] - 1] = 1.0
        per = F.binary_cross_entropy_with_logits(zs, target, reduction="none").mean(1)
        return (per * ws).sum(), ws.sum()

    @classmethod
    def _patch_loss(cls, z, lab, pw):
        total, weight = cls._patch_terms(z, lab, pw)
        return total if weight is None else total / weight

    def _log_domain_terms(self, z, mask, y, w, warm: bool = False):
        """Image loss summed (not averaged) over the batch; ``power`` through log-probabilities (smooth)."""
        if self.aggregation != "power":
            out = self.image_outputs(z, mask, warm=warm)
            return (F.binary_cross_entropy_with_logits(out, y, reduction="none") * w).sum()
        logp = aggregate(z, mask, "power", k=self.k, log=True).clamp_max(-1e-30)
        return (-(y * logp + (1 - y) * torch.log(-torch.expm1(logp))) * w).sum()

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

    def _full_batch(self, source: BagSource, Y: np.ndarray, W: np.ndarray, ids: np.ndarray, dev):
        """``net -> loss`` of one pass over the bags of images ``ids`` (gradients accumulated), for L-BFGS.

        Images are batched by size (little padding); in memory the batches are made once and
        kept in the features' dtype (float16 caches: half the bytes), converted per batch.
        """
        ids = ids[np.argsort(source.sizes()[ids], kind="stable")]
        id_batches = _size_batches(ids, source.sizes()[ids], _PASS_ROWS)
        dtype = getattr(source.features, "dtype", np.float32)
        kept = None if source.streaming else [(x.astype(dtype, copy=False), *rest)
                                              for x, *rest in source.batches(id_batches)]
        w_total = max(float(W[ids].sum()), 1e-12)
        use_patches = float(self.patch_weight) > 0 and source.patch_weights is not None
        pw_total = float(source.patch_weights[np.concatenate([source.groups[i] for i in ids])].sum()) \
            if use_patches else 0.0

        def loss(net, warm: bool = False) -> float:
            total = 0.0
            for b, (xb, mb, lab, pw) in zip(id_batches, kept or source.batches(id_batches)):
                z = net(torch.from_numpy(xb).to(dev).float())
                if not bool(torch.isfinite(z).all()):
                    raise diverged("the patch scores are not finite", 1.0)
                y, w = torch.from_numpy(Y[b]).to(dev), torch.from_numpy(W[b]).to(dev)
                part = self._log_domain_terms(z, torch.from_numpy(mb).to(dev), y, w, warm) / w_total
                if use_patches and pw_total > 0:
                    patch, _ = self._patch_terms(z, torch.from_numpy(lab).to(dev), torch.from_numpy(pw).to(dev))
                    part = part + float(self.patch_weight) * patch / pw_total
                part.backward()
                total += float(part.detach())
            return total
        return loss

    def _fit_lbfgs(self, source: BagSource, Y: np.ndarray, W: np.ndarray, ids: np.ndarray, dev, seed: int) -> tuple:
        """Full-batch L-BFGS (:func:`~featurecache.heads._torch.train_lbfgs`); ``max``/``lse`` first minimise the
        warm loss (log-sum-exp at r = 1) for at most ``warmup_epochs`` passes, then the sharp one from there."""
        loss = self._full_batch(source, Y, W, ids, dev)
        settings = dict(seed=seed, device=dev, weight_decay=float(self.weight_decay), tol=float(self.tol))
        made: dict = {}

        def make():  # seeded inside train_lbfgs on the first call; the warm phase's net goes on
            if "net" not in made:
                made["net"] = scorer(source.n_features, Y.shape[1], 0).to(dev)
            return made["net"]

        history: list = []
        if self.aggregation != "power" and int(self.warmup_epochs) > 0:
            _, history = train_lbfgs(make, lambda n: loss(n, warm=True), max_passes=int(self.warmup_epochs), **settings)
        net, more = train_lbfgs(make, loss, max_passes=int(self.max_epochs) - len(history), **settings)
        return net, history + [{**h, "epoch": len(history) + h["epoch"]} for h in more]

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
        if self.solver not in SOLVERS:
            raise HeadError(f"must be {' or '.join(SOLVERS)}, got {self.solver!r}", param="solver")
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
        if self.solver_used() == "lbfgs":
            return self._fit_lbfgs(source, Y, W, order[0], dev, seed)

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
