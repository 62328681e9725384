"""Heads trained on cached features: the paper's adaptation layers and scikit-learn baselines.

Estimators follow the scikit-learn contract (``fit(X, y, sample_weight=None)``,
``predict_proba``, ``get_params``/``set_params``, fitted attributes ending in ``_``). ``y``
holds patch labels in the encoding of :mod:`featurecache.patches`: ``0`` background,
``c + 1`` class ``c``; the outputs of every head are ``[background, class 0, class 1, ...]``
(``n_outputs`` columns, whether or not every class occurs in the training data).

:func:`fit_head` trains any of them on a cache (in memory when it fits, otherwise streaming
shuffled chunks from HDF5, with identical results), with a background policy, and returns
a :class:`TrainedHead` that saves to and loads from one torch file without pickle.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from torch import nn
from torch.nn import functional as F

from featurecache.cache import FeatureCache, describe_fingerprint_difference, read_rows
from featurecache.errors import FeaturecacheError
from featurecache.patches import AMBIGUOUS, BACKGROUND

logger = logging.getLogger(__name__)

__all__ = [
    "HEADS",
    "ArraySource",
    "StreamSource",
    "epoch_order",
    "fit_estimator",
    "BackgroundPolicy",
    "HeadError",
    "LinearSVMHead",
    "LogRegHead",
    "MLPHead",
    "TrainedHead",
    "background_weights",
    "fit_head",
    "make_head",
]

HEAD_FORMAT = "featurecache-head"
HEAD_FORMAT_VERSION = 1


class HeadError(FeaturecacheError):
    """A head cannot be trained, saved, loaded or used on a cache."""


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# --------------------------------------------------------------------------- batch sources


def epoch_order(n: int, rng: np.random.RandomState, *, block: int = 8192, buffer_blocks: int = 8) -> Iterator[np.ndarray]:
    """Positions ``0..n-1`` in one epoch's order, as buffers of shuffled blocks.

    The positions are cut into contiguous blocks; the blocks are visited in random order,
    ``buffer_blocks`` at a time, and each such buffer is shuffled. From HDF5 this reads
    contiguous runs only, with memory bounded by one buffer; data up to ``block *
    buffer_blocks`` rows get a full shuffle. In-memory and streaming training use the same
    order, hence give the same model.
    """
    starts = list(range(0, n, block))
    order = rng.permutation(len(starts))
    for g in range(0, len(order), buffer_blocks):
        pos = np.concatenate([np.arange(starts[b], min(starts[b] + block, n)) for b in order[g:g + buffer_blocks]])
        yield pos[rng.permutation(len(pos))]


class ArraySource:
    """Training data in memory: features ``(n, d)`` (or rows ``index`` of a larger array), labels, weights."""

    def __init__(self, X: np.ndarray, y: np.ndarray, w: np.ndarray, index: Optional[np.ndarray] = None) -> None:
        self.X, self.y, self.w, self.index = X, y, w, index

    def __len__(self) -> int:
        return len(self.y)

    @property
    def n_features(self) -> int:
        return self.X.shape[1]

    def buffer(self, pos: np.ndarray) -> np.ndarray:
        rows = pos if self.index is None else self.index[pos]
        return np.asarray(self.X[rows], dtype=np.float32)

    def matrix(self) -> np.ndarray:
        """All rows, for estimators that need them at once."""
        return self.buffer(np.arange(len(self.y)))


class StreamSource:
    """Training data left in an HDF5 features dataset: file rows ``rows`` (sorted)."""

    def __init__(self, dataset, rows: np.ndarray, y: np.ndarray, w: np.ndarray) -> None:
        self.ds, self.rows, self.y, self.w = dataset, rows, y, w

    def __len__(self) -> int:
        return len(self.y)

    @property
    def n_features(self) -> int:
        return self.ds.shape[1]

    def buffer(self, pos: np.ndarray) -> np.ndarray:
        order = np.argsort(pos, kind="stable")
        feats = read_rows(self.ds, self.rows[pos[order]]).astype(np.float32)
        out = np.empty_like(feats)
        out[order] = feats
        return out


def _batches(source, rng: np.random.RandomState, batch_size: int) -> Iterator[tuple]:
    for pos in epoch_order(len(source), rng):
        X = source.buffer(pos)
        y, w = source.y[pos], source.w[pos]
        for s in range(0, len(pos), batch_size):
            yield X[s:s + batch_size], y[s:s + batch_size], w[s:s + batch_size]


# --------------------------------------------------------------------------- estimators


def _hidden_tuple(hidden) -> tuple:
    if hidden is None:
        return ()
    if isinstance(hidden, (int, np.integer)):
        return () if int(hidden) == 0 else (int(hidden),)
    return tuple(int(h) for h in hidden if int(h) > 0)


def _build_mlp(n_in: int, hidden: tuple, n_out: int, dropout: float) -> nn.Sequential:
    layers, d = [], n_in
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        d = h
    layers.append(nn.Linear(d, n_out))
    return nn.Sequential(*layers)


class MLPHead(ClassifierMixin, BaseEstimator):
    """The paper's adaptation layers: FCa (ReLU, dropout) then FCb (softmax), in torch.

    Parameters
    ----------
    hidden : int or tuple of int
        FCa widths. ``2048`` (default) is the paper's FCa+FCb; ``0`` trains FCb alone;
        ``(2048, 2048)`` adds a third layer.
    dropout : float
        Dropout after each hidden layer. Default 0.5.
    lr : float
        Initial SGD learning rate. Default 0.01.
    momentum : float
        Default 0.9.
    weight_decay : float
        L2 penalty. Default 5e-4.
    batch_size : int
        Mini-batch size. Default 256.
    max_epochs : int
        Epoch cap. Default 60.
    lr_drops : int
        The learning rate is divided by 10 each time the monitored loss (training loss, or
        validation loss when validation data is given) stops improving by ``tol``
        (relative); training stops at the ``lr_drops``-th division. Default 3.
    tol : float
        Default 1e-3.
    n_outputs : int, optional
        Number of outputs (background + classes); default ``max(y) + 1``.
    device : str
        ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
    random_state : int, optional
        Seeds initialisation, dropout and shuffling. Default 0.

    Attributes
    ----------
    net_ : torch.nn.Sequential
    n_features_in_, n_outputs_ : int
    classes_ : ndarray
        ``arange(n_outputs_)``.
    history_ : list of dict
        Per epoch: ``train_loss``, ``val_loss`` (or None), ``lr``.
    n_epochs_ : int
    """

    def __init__(self, hidden=2048, dropout: float = 0.5, lr: float = 0.01, momentum: float = 0.9,
                 weight_decay: float = 5e-4, batch_size: int = 256, max_epochs: int = 60, lr_drops: int = 3,
                 tol: float = 1e-3, n_outputs: Optional[int] = None, device: str = "auto",
                 random_state: Optional[int] = 0) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.lr_drops = lr_drops
        self.tol = tol
        self.n_outputs = n_outputs
        self.device = device
        self.random_state = random_state

    def fit(self, X, y, sample_weight=None, *, validation: Optional[tuple] = None) -> "MLPHead":
        """Train on features ``X`` ``(n, d)`` and labels ``y``.

        Parameters
        ----------
        X : array-like of shape (n, d)
        y : array-like of shape (n,), int
        sample_weight : array-like of shape (n,), optional
        validation : tuple ``(X_val, y_val[, w_val])``, optional
            Held-out patches: their weighted loss drives the learning-rate schedule and the
            parameters of the best epoch are kept (early stopping).
        """
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y, dtype=np.int64)
        w = np.ones(len(y), np.float32) if sample_weight is None else np.asarray(sample_weight, np.float32)
        if X.ndim != 2 or len(X) != len(y) or len(w) != len(y):
            raise ValueError(f"X, y and sample_weight disagree: {X.shape}, {y.shape}, {w.shape}")
        val = None
        if validation is not None:
            Xv, yv = np.asarray(validation[0], np.float32), np.asarray(validation[1], np.int64)
            wv = np.asarray(validation[2], np.float32) if len(validation) > 2 else np.ones(len(yv), np.float32)
            val = ArraySource(Xv, yv, wv)
        return self.fit_source(ArraySource(X, y, w), val)

    def fit_source(self, source, val=None) -> "MLPHead":
        """Train from an :class:`ArraySource` or :class:`StreamSource` (same order, same model)."""
        if len(source) == 0:
            raise HeadError("no training patches")
        y_max = int(max(source.y.max(), val.y.max() if val is not None and len(val) else 0))
        n_out = int(self.n_outputs) if self.n_outputs is not None else y_max + 1
        if y_max >= n_out or source.y.min() < 0:
            raise ValueError(f"labels must be in [0, {n_out}); got {source.y.min()}..{y_max}")
        dev = _device(self.device)
        seed = 0 if self.random_state is None else int(self.random_state)
        rng = np.random.RandomState(seed)
        devices = [dev] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            net = _build_mlp(source.n_features, _hidden_tuple(self.hidden), n_out, float(self.dropout)).to(dev)
            opt = torch.optim.SGD(net.parameters(), lr=self.lr, momentum=self.momentum,
                                  weight_decay=self.weight_decay)
            history, best, best_state, drops, lr = [], math.inf, None, 0, float(self.lr)
            for epoch in range(int(self.max_epochs)):
                net.train()
                total = wsum = 0.0
                for xb, yb, wb in _batches(source, rng, int(self.batch_size)):
                    xb = torch.from_numpy(xb).to(dev)
                    yb = torch.from_numpy(yb).to(dev)
                    wb = torch.from_numpy(wb).to(dev)
                    ws = wb.sum()
                    if ws.item() <= 0:
                        continue
                    losses = F.cross_entropy(net(xb), yb, reduction="none")
                    loss = (losses * wb).sum() / ws
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float((losses.detach() * wb).sum())
                    wsum += float(ws)
                train_loss = total / max(wsum, 1e-12)
                val_loss = self._loss(net, val, dev) if val is not None else None
                history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "lr": lr})
                monitored = val_loss if val is not None else train_loss
                if monitored < best * (1 - self.tol):
                    best = monitored
                    if val is not None:
                        best_state = copy.deepcopy(net.state_dict())
                else:
                    drops += 1
                    if drops >= int(self.lr_drops):
                        break
                    lr /= 10
                    for g in opt.param_groups:
                        g["lr"] = lr
        if best_state is not None:
            net.load_state_dict(best_state)
        net.eval()
        self.net_ = net
        self.n_features_in_ = source.n_features
        self.n_outputs_ = n_out
        self.classes_ = np.arange(n_out)
        self.history_ = history
        self.n_epochs_ = len(history)
        return self

    def _loss(self, net: nn.Module, data, dev) -> float:
        net.eval()
        total = wsum = 0.0
        with torch.inference_mode():
            for s in range(0, len(data), 8192):
                pos = np.arange(s, min(s + 8192, len(data)))
                xb = torch.from_numpy(data.buffer(pos)).to(dev)
                yb = torch.from_numpy(data.y[pos]).to(dev)
                wb = torch.from_numpy(data.w[pos]).to(dev)
                total += float((F.cross_entropy(net(xb), yb, reduction="none") * wb).sum())
                wsum += float(wb.sum())
        return total / max(wsum, 1e-12)

    def predict_proba(self, X) -> np.ndarray:
        """Softmax outputs ``(n, n_outputs_)``: background then classes."""
        net = self.net_
        dev = next(net.parameters()).device
        X = np.asarray(X, dtype=np.float32)
        out = []
        with torch.inference_mode():
            for s in range(0, len(X), 8192):
                out.append(net(torch.from_numpy(X[s:s + 8192]).to(dev)).softmax(-1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.n_outputs_), np.float32)

    def predict(self, X) -> np.ndarray:
        return self.predict_proba(X).argmax(1)

    # -- persistence as plain tensors
    def _state(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.net_.state_dict().items()}

    def _restore(self, state: dict, n_features: int, n_outputs: int) -> None:
        net = _build_mlp(n_features, _hidden_tuple(self.hidden), n_outputs, float(self.dropout))
        net.load_state_dict(state)
        self.net_ = net.to(_device(self.device)).eval()
        self.n_features_in_, self.n_outputs_ = n_features, n_outputs
        self.classes_ = np.arange(n_outputs)


class CoefficientState:
    """Saving and restoring ``coef_``/``intercept_`` as plain tensors (no pickle)."""

    def _state(self) -> dict:
        return {"coef": torch.from_numpy(self.coef_.copy()), "intercept": torch.from_numpy(self.intercept_.copy())}

    def _restore(self, state: dict, n_features: int, n_outputs: int) -> None:
        self.coef_ = state["coef"].numpy().astype(np.float64)
        self.intercept_ = state["intercept"].numpy().astype(np.float64)
        self.n_features_in_, self.n_outputs_ = n_features, n_outputs


class _LinearSklearnHead(CoefficientState, ClassifierMixin, BaseEstimator):
    """Shared code of the scikit-learn baselines: full-width coefficient arrays."""

    def _full_coefficients(self, model, n_out: int) -> None:
        coef = np.asarray(model.coef_, dtype=np.float64)
        intercept = np.asarray(model.intercept_, dtype=np.float64).reshape(-1)
        present = np.asarray(model.classes_, dtype=np.int64)
        if len(present) == 2 and coef.shape[0] == 1:
            # Binary models keep one vector: score(c1) - score(c0) = w.x + b.
            coef = np.vstack([np.zeros_like(coef[0]), coef[0]])
            intercept = np.array([0.0, intercept[0]])
        full_coef = np.zeros((n_out, coef.shape[1]))
        full_intercept = np.full(n_out, -np.inf)  # an output never seen in training gets p = 0
        full_coef[present] = coef
        full_intercept[present] = intercept
        self.coef_, self.intercept_ = full_coef, full_intercept
        self.n_features_in_, self.n_outputs_ = coef.shape[1], n_out
        self.classes_ = np.arange(n_out)

    def _n_out(self, y: np.ndarray) -> int:
        return int(self.n_outputs) if self.n_outputs is not None else int(y.max()) + 1

    def decision_function(self, X) -> np.ndarray:
        return np.asarray(X, dtype=np.float64) @ self.coef_.T + self.intercept_

    def predict_proba(self, X) -> np.ndarray:
        z = self.decision_function(X)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def predict(self, X) -> np.ndarray:
        return self.predict_proba(X).argmax(1)

    def _restore(self, state: dict, n_features: int, n_outputs: int) -> None:
        super()._restore(state, n_features, n_outputs)
        self.classes_ = np.arange(n_outputs)


class LogRegHead(_LinearSklearnHead):
    """Multinomial logistic regression (scikit-learn ``LogisticRegression``, lbfgs).

    Parameters
    ----------
    C : float
        Inverse L2 strength. Default 1.0.
    max_iter : int
        Default 1000.
    n_outputs : int, optional
    random_state : int, optional
    """

    def __init__(self, C: float = 1.0, max_iter: int = 1000, tol: float = 1e-4, n_outputs: Optional[int] = None,
                 random_state: Optional[int] = 0) -> None:
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.n_outputs = n_outputs
        self.random_state = random_state

    def fit(self, X, y, sample_weight=None) -> "LogRegHead":
        from sklearn.linear_model import LogisticRegression

        y = np.asarray(y, dtype=np.int64)
        model = LogisticRegression(C=self.C, max_iter=self.max_iter, tol=self.tol, random_state=self.random_state)
        model.fit(np.asarray(X, dtype=np.float32), y, sample_weight=sample_weight)
        self._full_coefficients(model, self._n_out(y))
        return self


class LinearSVMHead(_LinearSklearnHead):
    """One-vs-rest linear SVM (scikit-learn ``LinearSVC``, squared hinge).

    Probabilities are the softmax of the one-vs-rest margins (no calibration: it would need
    held-out data and costs a refit per fold). They rank images as the margins do, which is
    what average precision measures, but are not calibrated probabilities.

    Parameters
    ----------
    C : float
        Default 1.0.
    max_iter : int
        Default 5000.
    n_outputs : int, optional
    random_state : int, optional
    """

    def __init__(self, C: float = 1.0, max_iter: int = 5000, n_outputs: Optional[int] = None,
                 random_state: Optional[int] = 0) -> None:
        self.C = C
        self.max_iter = max_iter
        self.n_outputs = n_outputs
        self.random_state = random_state

    def fit(self, X, y, sample_weight=None) -> "LinearSVMHead":
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.svm import LinearSVC

        y = np.asarray(y, dtype=np.int64)
        model = LinearSVC(C=self.C, max_iter=self.max_iter, random_state=self.random_state)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(np.asarray(X, dtype=np.float32), y, sample_weight=sample_weight)
        self._full_coefficients(model, self._n_out(y))
        return self


HEADS = {"mlp": MLPHead, "logreg": LogRegHead, "linearsvm": LinearSVMHead}


def make_head(kind: str = "mlp", **params) -> BaseEstimator:
    """An unfitted head by name with parameters.

    ``mlp``, ``logreg``, ``linearsvm`` (patch heads); ``image-logreg``, ``image-mlp`` (image
    objective); ``mil`` (mil and hybrid objectives).
    """
    from featurecache.objectives import ImageLogRegHead, ImageMLPHead, MILHead

    kinds = {**HEADS, "image-logreg": ImageLogRegHead, "image-mlp": ImageMLPHead, "mil": MILHead}
    if kind not in kinds:
        raise HeadError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")
    try:
        return kinds[kind](**params)
    except TypeError as e:
        raise HeadError(f"head {kind}: {e}") from None


# --------------------------------------------------------------------------- background


@dataclass(frozen=True)
class BackgroundPolicy:
    """How background patches enter training.

    ``kind="weight"``: every background patch gets weight ``weight`` (explicit) or, by
    default, the weight that makes background carry ``share`` of the total loss (0.5:
    balanced with the object patches). ``kind="sample"``: keep a random ``fraction`` of
    background patches, weight 1 (the paper's procedure). ``kind="none"``: all patches,
    weight 1. Ambiguous patches never train.
    """

    kind: str = "weight"
    share: float = 0.5
    weight: Optional[float] = None
    fraction: float = 0.1

    @classmethod
    def parse(cls, text: str, *, weight: Optional[float] = None, share: float = 0.5) -> "BackgroundPolicy":
        """From the command-line form: ``weight``, ``sample:0.1``, ``none``."""
        kind, _, arg = text.partition(":")
        if kind == "sample":
            try:
                fraction = float(arg or 0.1)
            except ValueError:
                raise HeadError(f"--background sample:F needs a number, got {text!r}") from None
            if not 0 < fraction <= 1:
                raise HeadError(f"--background sample:F needs 0 < F <= 1, got {fraction}")
            return cls("sample", fraction=fraction)
        if kind in ("weight", "none") and not arg:
            if kind == "weight" and not 0 < share < 1:
                raise HeadError(f"background share must be in (0, 1), got {share}")
            return cls(kind, share=share, weight=weight)
        raise HeadError(f"--background must be weight, sample:F or none, got {text!r}")

    def describe(self) -> str:
        if self.kind == "sample":
            return f"sample:{self.fraction:g}"
        if self.kind == "weight":
            return f"weight={self.weight:g}" if self.weight is not None else f"weight(share {self.share:g})"
        return "none"


def background_weights(labels: np.ndarray, policy: BackgroundPolicy, *, random_state: int = 0) -> tuple:
    """Which patches train, with which weights.

    Returns
    -------
    keep : ndarray of int
        Positions (into ``labels``) of the training patches, sorted.
    weights : ndarray of float32
        Their sample weights.
    background_weight : float
        The weight of a background patch.
    """
    labels = np.asarray(labels)
    usable = labels != AMBIGUOUS
    bg = labels == BACKGROUND
    if policy.kind == "sample":
        rng = np.random.RandomState(random_state)
        bg_pos = np.flatnonzero(bg)
        n_keep = int(round(policy.fraction * len(bg_pos)))
        kept_bg = np.sort(rng.choice(bg_pos, size=n_keep, replace=False)) if n_keep else bg_pos[:0]
        keep = np.union1d(np.flatnonzero(usable & ~bg), kept_bg)
        return keep, np.ones(len(keep), np.float32), 1.0
    keep = np.flatnonzero(usable)
    w = np.ones(len(keep), np.float32)
    w_bg = 1.0
    if policy.kind == "weight":
        n_bg = int(bg.sum())
        n_obj = int(usable.sum()) - n_bg
        if policy.weight is not None:
            w_bg = float(policy.weight)
        elif n_bg and n_obj:
            w_bg = policy.share * n_obj / ((1 - policy.share) * n_bg)
        w[bg[keep]] = w_bg
    return keep, w, float(w_bg)


# --------------------------------------------------------------------------- trained head


@dataclass
class TrainedHead:
    """A fitted head with what it needs to be used safely on caches.

    Attributes
    ----------
    estimator : MLPHead, LogRegHead or LinearSVMHead
    kind : str
    classes : tuple of str
    feature_settings : dict
        The cache's, at training time; compared with a cache's before use.
    fingerprint : str
    summary : dict
        Training facts (patches per class, background weight, epochs, seconds, loss ...).
    """

    estimator: BaseEstimator
    kind: str
    classes: tuple
    feature_settings: dict
    fingerprint: str
    summary: dict = field(default_factory=dict)

    def predict_proba(self, X) -> np.ndarray:
        return self.estimator.predict_proba(X)

    def check_cache(self, cache: FeatureCache) -> None:
        """Refuse a cache whose features differ from the training cache's, or whose classes do."""
        if cache.fingerprint != self.fingerprint:
            raise HeadError(f"{cache.path}: features differ from the ones this head was trained on ("
                            + describe_fingerprint_difference(cache.feature_settings, self.feature_settings)
                            + ")")
        if tuple(cache.classes) != tuple(self.classes):
            raise HeadError(f"{cache.path}: classes differ from the head's ({len(cache.classes)} vs "
                            f"{len(self.classes)}: {', '.join(cache.classes[:5])}... vs {', '.join(self.classes[:5])}...)")

    def save(self, path: Union[str, Path]) -> Path:
        """Write one torch file of tensors and JSON strings (loadable with ``weights_only=True``)."""
        path = Path(path)
        params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.estimator.get_params().items()}
        payload = {
            "format": HEAD_FORMAT,
            "format_version": HEAD_FORMAT_VERSION,
            "kind": self.kind,
            "params": json.dumps(params),
            "classes": json.dumps(list(self.classes)),
            "feature_settings": json.dumps(self.feature_settings, sort_keys=True),
            "fingerprint": self.fingerprint,
            "summary": json.dumps(self.summary, default=float),
            "n_features": int(self.estimator.n_features_in_),
            "n_outputs": int(self.estimator.n_outputs_),
            "state": self.estimator._state(),
        }
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Union[str, Path], *, device: str = "auto") -> "TrainedHead":
        """Read a head file; never executes code from it."""
        path = Path(path)
        if not path.is_file():
            raise HeadError(f"{path}: no such head file")
        try:
            p = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise HeadError(f"{path}: not a readable head file ({type(e).__name__})") from None
        if not isinstance(p, dict) or p.get("format") != HEAD_FORMAT:
            raise HeadError(f"{path}: not a featurecache head file")
        if int(p["format_version"]) > HEAD_FORMAT_VERSION:
            raise HeadError(f"{path}: head format {p['format_version']} is newer than this featurecache reads")
        params = json.loads(p["params"])
        for key in ("hidden", "pooling"):
            if isinstance(params.get(key), list):
                params[key] = tuple(params[key])
        if p["kind"] in ("mlp", "mil", "image-mlp"):
            params["device"] = device
        est = make_head(p["kind"], **params)
        est._restore(p["state"], int(p["n_features"]), int(p["n_outputs"]))
        return cls(est, p["kind"], tuple(json.loads(p["classes"])), json.loads(p["feature_settings"]),
                   p["fingerprint"], json.loads(p["summary"]))

    def summary_line(self) -> str:
        s = self.summary
        if s.get("objective") in ("mil", "hybrid"):
            line = (f"{s['objective']} head ({s.get('aggregation')} aggregation): {s.get('train_images', 0)} "
                    f"training images, {s.get('epochs', 0)} epochs; {s.get('seconds', 0):.1f} s")
            if s["objective"] == "hybrid":
                line += (f"; patch loss weight {s.get('patch_weight', 0):g} on {s.get('train_patches', 0):,} "
                         f"patches (background {s.get('background', '')})")
            return line
        if s.get("objective") == "image":
            per_class = ", ".join(f"{k} {v}" for k, v in s.get("images_per_class", {}).items())
            return (f"{self.kind} head (objective image, pooling {'+'.join(s.get('image_pooling', []))}): "
                    f"{s.get('train_images', 0)} training images; {s.get('seconds', 0):.1f} s; "
                    f"positive images: {per_class}")
        per_class = ", ".join(f"{k} {v}" for k, v in s.get("patches_per_class", {}).items() if v)
        parts = [f"{self.kind} head: {s.get('train_patches', 0):,} training patches "
                 f"({s.get('background_patches', 0):,} background, weight {s.get('background_weight', 1):.3g})"]
        if "epochs" in s:
            parts.append(f"{s['epochs']} epochs")
        parts.append(f"{s.get('seconds', 0):.1f} s")
        if s.get("final_loss") is not None:
            parts.append(f"final loss {s['final_loss']:.4f}")
        if s.get("val_loss") is not None:
            parts.append(f"best val loss {s['val_loss']:.4f}")
        return "; ".join(parts) + (f"; objects: {per_class}" if per_class else "")


def fit_estimator(est: BaseEstimator, source, val=None) -> BaseEstimator:
    """Fit any head on a batch source (the MLP uses ``val`` for its schedule and early stopping)."""
    if isinstance(est, MLPHead):
        return est.fit_source(source, val)
    return est.fit(source.matrix(), source.y, sample_weight=source.w)


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 4 << 30


def _open(cache: Union[str, Path, FeatureCache], split: Optional[str]) -> FeatureCache:
    if isinstance(cache, FeatureCache):
        return cache if split is None else FeatureCache(cache.path, split=split)
    return FeatureCache(cache, split=split)


def fit_head(
    cache: Union[str, Path, FeatureCache],
    *,
    head: str = "mlp",
    params: Optional[dict] = None,
    background: Union[str, BackgroundPolicy] = "weight",
    train_split: Optional[str] = None,
    val: Optional[Union[str, Path, FeatureCache]] = None,
    val_split: Optional[str] = None,
    memory_limit: Optional[int] = None,
    random_state: int = 0,
) -> TrainedHead:
    """Train a head on a feature cache.

    Parameters
    ----------
    cache : path or FeatureCache
        The training cache.
    head : {"mlp", "logreg", "linearsvm"}
    params : dict, optional
        Estimator parameters (``hidden``, ``dropout``, ``lr``, ``C`` ...).
    background : str or BackgroundPolicy
        ``"weight"`` (default, balanced), ``"sample:0.1"``, ``"none"``.
    train_split : str, optional
        Train on the images of this split only.
    val : path or FeatureCache, optional
        Validation cache (MLP: early stopping and learning-rate schedule on its loss).
    val_split : str, optional
        Split of ``val`` (or of ``cache`` when ``val`` is not given) to validate on.
    memory_limit : int, optional
        Bytes of float32 training features to hold in memory; above it the MLP streams
        from HDF5 (same model). Default half of the available memory.
    random_state : int

    Returns
    -------
    TrainedHead
    """
    t0 = time.perf_counter()
    policy = background if isinstance(background, BackgroundPolicy) else BackgroundPolicy.parse(background)
    train = _open(cache, train_split)
    n_out = len(train.classes) + 1
    params = dict(params or {})
    params.setdefault("n_outputs", n_out)
    params.setdefault("random_state", random_state)
    est = make_head(head, **params)
    labels = train.labels
    keep, w, w_bg = background_weights(labels, policy, random_state=random_state)
    if len(keep) == 0:
        raise HeadError(f"{train.path}: no labelled patches to train on")
    y = labels[keep]
    rows = train.indices[keep]
    limit = memory_limit if memory_limit is not None else _available_memory() // 2
    need = len(keep) * train.feature_dim * 4
    val_source = None
    val_cache = None
    if val is not None or val_split is not None:
        val_cache = _open(val if val is not None else train.path, val_split)
        if val_cache.fingerprint != train.fingerprint:
            raise HeadError(f"{val_cache.path}: validation features differ from training features ("
                            + describe_fingerprint_difference(val_cache.feature_settings, train.feature_settings,
                                                              ours_name="val", theirs_name="train") + ")")
        # Validation patches are weighted like the training distribution: a kept fraction F of
        # the background is, in expectation, every background patch at weight F.
        val_policy = policy if policy.kind == "none" else BackgroundPolicy(
            "weight", weight=policy.fraction if policy.kind == "sample" else w_bg)
        vk, vw, _ = background_weights(val_cache.labels, val_policy, random_state=random_state)
        val_source = ArraySource(val_cache.read_features(val_cache.indices[vk]), val_cache.labels[vk], vw)
    if need <= limit:
        source = ArraySource(train.read_features(rows), y, w)
        mode = "memory"
    else:
        if head != "mlp":
            raise HeadError(f"{train.path}: {need / 2**30:.1f} GiB of training features exceed the memory limit "
                            f"({limit / 2**30:.1f} GiB) and the {head} head cannot stream; use --head mlp, "
                            f"--background sample:0.1, or a larger --memory-limit")
        source = StreamSource(train.features, rows, y, w)
        mode = "stream"
    logger.info("training %s on %d patches (%s, %.1f MiB of features)", head, len(keep), mode, need / 2**20)
    fit_estimator(est, source, val_source)
    counts = np.bincount(y, minlength=n_out)
    summary = {
        "cache": str(train.path),
        "train_split": train_split,
        "val": str(val_cache.path) if val_cache is not None else None,
        "val_split": val_split,
        "background": policy.describe(),
        "background_weight": w_bg,
        "train_patches": int(len(keep)),
        "background_patches": int(counts[BACKGROUND]),
        "patches_per_class": {c: int(n) for c, n in zip(train.classes, counts[1:])},
        "training_data": mode,
        "seconds": time.perf_counter() - t0,
        "random_state": random_state,
    }
    if head == "mlp":
        summary["epochs"] = est.n_epochs_
        summary["final_loss"] = est.history_[-1]["train_loss"] if est.history_ else None
        vals = [h["val_loss"] for h in est.history_ if h["val_loss"] is not None]
        summary["val_loss"] = min(vals) if vals else None
    result = TrainedHead(est, head, tuple(train.classes), dict(train.feature_settings), train.fingerprint, summary)
    if not isinstance(cache, FeatureCache) or train is not cache:
        train.close()
    if val_cache is not None and val_cache is not val:
        val_cache.close()
    return result

