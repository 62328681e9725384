"""A trained head as one torch module: one image's patch features to its per-class image scores.

:func:`score_module` gives what :meth:`TrainedHead.image_scores` computes for one image, as an
``nn.Module`` that ``torch.onnx.export`` can trace (``featurecache export``,
:mod:`featurecache.deploy`): the patch head and the power mean (k = :data:`DEFAULT_POWER`),
the MIL aggregation, the image pooling and image head, or the members and their fusion. Each
step keeps the precision the estimator computes in (float64 for the scikit-learn
coefficients, the power mean and the fusion's log-odds; float32 for the torch heads), so the
module's scores equal ``image_scores`` up to float rounding (tests/test_export.py).

Each module's :meth:`regions` gives :meth:`TrainedHead.region_scores` (what class activation
maps score every feature-map cell with). Counts of patches are read from the tensors' shapes
and the per-scale groups of the image pooling may be given at run time (``scales``), so that a
graph traced with dynamic axes (``export --dynamic``) keeps them dynamic.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from featurecache.errors import HeadError
from featurecache.heads.fusion import _HIGH, _LOW, FusionHead
from featurecache.heads.image import ImageLogRegHead, ImageMLPHead
from featurecache.heads.mil import MILHead
from featurecache.heads.patch import MLPHead, _LinearSklearnHead
from featurecache.heads.pooling import DEFAULT_POWER

__all__ = ["score_module", "sigmoid"]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """The number of rows of ``x`` as a float64 tensor: read from its shape at run time (a traced
    ``x.shape[0]`` would be frozen into the graph as a constant)."""
    return torch._shape_as_tensor(x)[0].to(torch.float64)


def _frozen(net: nn.Module) -> nn.Module:
    """A CPU, evaluation-mode copy of a trained torch scorer (dropout off)."""
    net = copy.deepcopy(net).cpu().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


class _Linear64(nn.Module):
    """``x @ coef.T + intercept`` in float64 (the scikit-learn heads' own precision); -inf intercepts kept."""

    def __init__(self, coef: np.ndarray, intercept: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("coef", torch.from_numpy(np.ascontiguousarray(np.asarray(coef, np.float64).T)))
        self.register_buffer("intercept", torch.from_numpy(np.asarray(intercept, np.float64).copy()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double() @ self.coef + self.intercept


def sigmoid(z: torch.Tensor) -> torch.Tensor:
    """σ(z) as ``1 / (1 + exp(-z))``: ONNX Runtime's float32 ``Sigmoid`` is accurate to 1.2e-7 absolute, not
    relative (a probability of 1e-6 came out 3.9 times too large, measured), and maps take the log-odds of
    such probabilities; its ``Exp`` is accurate to 7e-8 relative. Equal to torch's sigmoid within float32 rounding."""
    return 1.0 / (1.0 + torch.exp(-z))


def _softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


class PatchPowerMean(nn.Module):
    """Patch heads: class probabilities of every patch (background first), then the power mean
    ``(1/M) Σ p^k`` in float64, as :class:`~featurecache.heads.pooling.ScorePooler` pools them."""

    def __init__(self, estimator, k: float = DEFAULT_POWER) -> None:
        super().__init__()
        self.k = float(k)
        if isinstance(estimator, MLPHead):
            self.net, self.linear = _frozen(estimator.net_), None
        else:
            self.net, self.linear = None, _Linear64(estimator.coef_, estimator.intercept_)

    def regions(self, features: torch.Tensor) -> torch.Tensor:
        """Class probabilities of each patch (background left out), float32 as ``predict_proba``'s."""
        if self.net is not None:
            return torch.softmax(self.net(features), dim=1)[:, 1:]
        return _softmax(self.linear(features)).float()[:, 1:]  # predict_proba returns float32

    def forward(self, features: torch.Tensor, scales: Optional[torch.Tensor] = None) -> torch.Tensor:
        return (self.regions(features).double() ** self.k).sum(dim=0) / _rows(features)


def _log_sigmoid(z: torch.Tensor) -> torch.Tensor:
    """log σ(z) without underflow (torch's ``logsigmoid``, in ops every ONNX runtime has)."""
    return torch.clamp(z, max=0.0) - torch.log(1.0 + torch.exp(-z.abs()))


def _log_mean_exp(x: torch.Tensor) -> torch.Tensor:
    """log((1/M) Σ exp(x)) over the patches (dim 0), shifted by the maximum."""
    top = x.max(dim=0).values
    return torch.log(torch.exp(x - top).sum(dim=0)) + top - torch.log(_rows(x)).to(x.dtype)


class MILAggregation(nn.Module):
    """``mil``/``hybrid`` heads: patch logits aggregated as :func:`~featurecache.heads.bags.aggregate`
    does for one image (power: a probability; max and lse: a logit, then its sigmoid)."""

    def __init__(self, estimator: MILHead) -> None:
        super().__init__()
        self.net = _frozen(estimator.net_)
        self.aggregation = estimator.aggregation
        self.k, self.r = float(estimator.k), float(estimator.temperature)

    def regions(self, features: torch.Tensor) -> torch.Tensor:
        """σ of each patch's logits (``MILHead.patch_scores``)."""
        return sigmoid(self.net(features))

    def forward(self, features: torch.Tensor, scales: Optional[torch.Tensor] = None) -> torch.Tensor:
        z = self.net(features)
        if self.aggregation == "max":
            out = sigmoid(z.max(dim=0).values)
        elif self.aggregation == "lse":
            out = sigmoid(_log_mean_exp(self.r * z) / self.r)
        else:
            out = torch.exp(_log_mean_exp(_log_sigmoid(z) * self.k) / self.k)
        return out.double()


class ImagePooling(nn.Module):
    """``image`` heads: the patch features pooled (mean, max, per-scale means, the coarsest scale's
    mean, concatenated as :func:`~featurecache.heads.pooling.image_features`), then the image head."""

    def __init__(self, estimator, scales: np.ndarray) -> None:
        super().__init__()
        scales = np.asarray(scales)
        self.pooling = tuple(estimator.pooling)
        # The scales in ascending λ (coarse to fine); each patch's λ, a constant unless given at run time.
        self.levels = tuple(float(v) for v in np.unique(np.asarray(scales, np.float32)))
        self.register_buffer("scales", torch.from_numpy(np.asarray(scales, np.float32).copy()))
        self.copies = int(estimator.n_features_in_)
        if isinstance(estimator, ImageMLPHead):
            self.net, self.linear = _frozen(estimator.net_), None
        else:
            self.net, self.linear = None, _Linear64(estimator.coef_, estimator.intercept_)

    @staticmethod
    def _mean(x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        # Summed in float32 (as _Pooler sums a chunk), divided in float64, rounded to float32. A scale's
        # patches are picked by a mask (zeros added leave a float32 sum as it is), so their count can vary.
        if mask is None:
            return (x.sum(dim=0).double() / _rows(x)).float()
        return ((x * mask[:, None].to(x.dtype)).sum(dim=0).double() / mask.to(torch.float64).sum()).float()

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        if self.net is not None:
            return sigmoid(self.net(x)).double()
        return sigmoid(self.linear(x)).float().double()  # image_scores returns float32

    def regions(self, features: torch.Tensor) -> torch.Tensor:
        """The scores of an image all of whose patches are one region's feature: every pooling of it
        is the feature itself (``_ImageScorer.region_scores``)."""
        return self._head(features.repeat(1, self.copies // features.shape[1])).float()

    def forward(self, features: torch.Tensor, scales: Optional[torch.Tensor] = None) -> torch.Tensor:
        scales = self.scales if scales is None else scales
        parts = []
        for p in self.pooling:
            if p == "mean":
                parts.append(self._mean(features))
            elif p == "max":
                parts.append(features.max(dim=0).values)
            elif p == "scales":
                parts.extend(self._mean(features, scales == lev) for lev in self.levels)
            else:  # coarse: the smallest λ
                parts.append(self._mean(features, scales == self.levels[0]))
        return self._head(torch.cat(parts)[None])[0]


class Fusion(nn.Module):
    """``fusion`` heads (rule ``zscore``): the members' scores as log-odds (float64, clipped as
    :func:`~featurecache.heads.fusion._log_odds` clips them), standardised, averaged, through the sigmoid."""

    def __init__(self, estimator: FusionHead, scales: np.ndarray) -> None:
        super().__init__()
        if estimator.rule != "zscore":
            raise HeadError(f"a fusion by {estimator.rule} scores an image by its rank among the images scored "
                            "with it, which one exported image does not have; export a zscore fusion or a member",
                            param="head")
        self.members = nn.ModuleList(score_module(h, scales) for h in estimator.heads_)
        self.register_buffer("center", torch.from_numpy(np.asarray(estimator.center_, np.float64).copy()))
        self.register_buffer("scale", torch.from_numpy(np.asarray(estimator.scale_, np.float64).copy()))

    def _fuse(self, member_scores: list) -> torch.Tensor:
        z = []
        for i, s in enumerate(member_scores):
            s = torch.clamp(s.double(), _LOW, _HIGH)
            z.append((torch.log(s) - torch.log(1.0 - s) - self.center[i]) / self.scale[i])
        return sigmoid(torch.stack(z).mean(dim=0))

    def regions(self, features: torch.Tensor) -> torch.Tensor:
        """The members' region scores fused as their image scores are (``FusionHead.region_scores``)."""
        return self._fuse([m.regions(features) for m in self.members]).float()

    def forward(self, features: torch.Tensor, scales: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._fuse([m(features, scales) for m in self.members])


def score_module(head, scales: Sequence[float]) -> nn.Module:
    """The module of one image's scores: patch features ``(P, D)`` float32 to image scores ``(C,)`` float64.

    Parameters
    ----------
    head : TrainedHead
    scales : sequence of float
        λ of each of the image's ``P`` patches, in the order of the features (the image
        poolings ``scales`` and ``coarse`` group by it).

    Returns
    -------
    nn.Module
        In evaluation mode, on the CPU, without gradients.

    Raises
    ------
    HeadError
        A head whose image scores depend on other images (a fusion by ``rank``), or an
        estimator this module does not know.
    """
    est = head.estimator
    if isinstance(est, (MLPHead, _LinearSklearnHead)):
        module = PatchPowerMean(est)
    elif isinstance(est, MILHead):
        module = MILAggregation(est)
    elif isinstance(est, (ImageLogRegHead, ImageMLPHead)):
        module = ImagePooling(est, np.asarray(scales))
    elif isinstance(est, FusionHead):
        module = Fusion(est, np.asarray(scales))
    else:
        raise HeadError(f"a {head.kind} head cannot be exported (no graph for {type(est).__name__})", param="head")
    return module.eval()
