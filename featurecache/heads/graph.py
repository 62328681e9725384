"""A trained head as one torch module: one image's patch features to its per-class image scores.

:func:`score_module` gives what :meth:`TrainedHead.image_scores` computes for one image, as an
``nn.Module`` that ``torch.onnx.export`` can trace (``featurecache export``,
:mod:`featurecache.deploy`): the patch head and the power mean (k = :data:`DEFAULT_POWER`),
the MIL aggregation, the image pooling and image head, or the members and their fusion. Each
step keeps the precision the estimator computes in (float64 for the scikit-learn
coefficients, the power mean and the fusion's log-odds; float32 for the torch heads), so the
module's scores equal ``image_scores`` up to float rounding (tests/test_export.py).
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from featurecache.errors import HeadError
from featurecache.heads.fusion import _HIGH, _LOW, FusionHead
from featurecache.heads.image import ImageLogRegHead, ImageMLPHead
from featurecache.heads.mil import MILHead
from featurecache.heads.patch import MLPHead, _LinearSklearnHead
from featurecache.heads.pooling import DEFAULT_POWER

__all__ = ["score_module"]


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

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.net is not None:
            p = torch.softmax(self.net(features), dim=1)
        else:
            p = _softmax(self.linear(features)).float()  # predict_proba returns float32
        return (p[:, 1:].double() ** self.k).mean(dim=0)


def _log_sigmoid(z: torch.Tensor) -> torch.Tensor:
    """log σ(z) without underflow (torch's ``logsigmoid``, in ops every ONNX runtime has)."""
    return torch.clamp(z, max=0.0) - torch.log(1.0 + torch.exp(-z.abs()))


def _log_mean_exp(x: torch.Tensor) -> torch.Tensor:
    """log((1/M) Σ exp(x)) over the patches (dim 0), shifted by the maximum."""
    top = x.max(dim=0).values
    return torch.log(torch.exp(x - top).sum(dim=0)) + top - math.log(x.shape[0])


class MILAggregation(nn.Module):
    """``mil``/``hybrid`` heads: patch logits aggregated as :func:`~featurecache.heads.bags.aggregate`
    does for one image (power: a probability; max and lse: a logit, then its sigmoid)."""

    def __init__(self, estimator: MILHead) -> None:
        super().__init__()
        self.net = _frozen(estimator.net_)
        self.aggregation = estimator.aggregation
        self.k, self.r = float(estimator.k), float(estimator.temperature)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = self.net(features)
        if self.aggregation == "max":
            out = torch.sigmoid(z.max(dim=0).values)
        elif self.aggregation == "lse":
            out = torch.sigmoid(_log_mean_exp(self.r * z) / self.r)
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
        levels = np.unique(scales)
        # One index list per scale (coarse to fine: ascending λ), as constants of the graph.
        self.groups = [torch.from_numpy(np.flatnonzero(scales == lev)) for lev in levels]
        if isinstance(estimator, ImageMLPHead):
            self.net, self.linear = _frozen(estimator.net_), None
        else:
            self.net, self.linear = None, _Linear64(estimator.coef_, estimator.intercept_)

    @staticmethod
    def _mean(x: torch.Tensor) -> torch.Tensor:
        # Summed in float32 (as _Pooler sums a chunk), divided in float64, rounded to float32.
        return (x.sum(dim=0).double() / x.shape[0]).float()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        parts = []
        for p in self.pooling:
            if p == "mean":
                parts.append(self._mean(features))
            elif p == "max":
                parts.append(features.max(dim=0).values)
            elif p == "scales":
                parts.extend(self._mean(features[g]) for g in self.groups)
            else:  # coarse: the smallest λ
                parts.append(self._mean(features[self.groups[0]]))
        x = torch.cat(parts)[None]
        if self.net is not None:
            return torch.sigmoid(self.net(x))[0].double()
        return torch.sigmoid(self.linear(x))[0].float().double()


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

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = []
        for i, member in enumerate(self.members):
            s = torch.clamp(member(features), _LOW, _HIGH)
            z.append((torch.log(s) - torch.log(1.0 - s) - self.center[i]) / self.scale[i])
        return torch.sigmoid(torch.stack(z).mean(dim=0))


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
