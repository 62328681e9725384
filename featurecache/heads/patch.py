"""The paper's objective: patch classifiers on box-derived patch labels (FCa/FCb in torch, scikit-learn baselines).

Estimators follow the scikit-learn contract (``fit(X, y, sample_weight=None)``,
``predict``/``predict_proba`` over ``classes_``, inputs checked with scikit-learn's own
validation, ``get_params``/``set_params``, fitted attributes ending in ``_``;
``tests/test_sklearn_contract.py`` runs scikit-learn's estimator checks). Any labels work,
as in scikit-learn: ``classes_`` holds the sorted labels seen in ``y``. The one exception is
featurecache's own use: with ``n_outputs`` set, ``y`` holds patch labels in the encoding of
:mod:`featurecache.patches` (``0`` background, ``c + 1`` class ``c``), ``classes_`` is
``arange(n_outputs)``, and the outputs are ``[background, class 0, class 1, ...]`` whether or
not every class occurs in the training data.

:func:`fit_patch_objective` trains any of them on a cache (in memory when it fits, otherwise
streaming shuffled chunks from HDF5, with identical results) with a background policy.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Mapping, Optional

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data
from torch import nn
from torch.nn import functional as F

from featurecache.cache import describe_fingerprint_difference, open_cache
from featurecache.errors import HeadError
from featurecache.heads._sources import ArraySource, batches, patch_source, sequential
from featurecache.heads._torch import PlateauSchedule, TorchState, train_torch
from featurecache.heads.background import BackgroundPolicy, as_policy, background_weights
from featurecache.heads.registry import OPTIONS, FitConfig, make_head
from featurecache.heads.trained import TrainedHead
from featurecache.patches import BACKGROUND
from featurecache.resources import features_bytes, memory_budget, resolve_device

__all__ = ["CoefficientState", "LinearSVMHead", "LogRegHead", "MLPHead", "describe_patch", "fit_patch_objective"]


def _hidden_tuple(hidden) -> tuple:
    if hidden is None:
        return ()
    if isinstance(hidden, (int, np.integer)):
        return () if int(hidden) == 0 else (int(hidden),)
    return tuple(int(h) for h in hidden if int(h) > 0)


#: Feature types kept as they are (float16 caches are converted a batch at a time, on the device).
_DTYPES = [np.float64, np.float32, np.float16]


class _PatchClassifier(ClassifierMixin):
    """What every patch head shares: scikit-learn's input checks, the label encoding, and what it
    derives from ``predict_proba``: labels and per-class patch scores."""

    def _fit_data(self, X, y, sample_weight) -> tuple:
        """``(X, encoded y, weights)`` checked as scikit-learn checks them; sets ``classes_``,
        ``n_features_in_``."""
        X, y = validate_data(self, X, y, dtype=_DTYPES[:2])
        check_classification_targets(y)
        if self.n_outputs is None:
            self.classes_, y = np.unique(y, return_inverse=True)
        else:  # featurecache's patch labels: 0 .. n_outputs - 1, every output kept
            n = int(self.n_outputs)
            if not np.issubdtype(y.dtype, np.number) or np.any(y != np.round(y)) or y.min() < 0 or y.max() >= n:
                raise ValueError(f"with n_outputs={n}, labels must be integers in [0, {n})")
            self.classes_ = np.arange(n)
        w = _check_sample_weight(sample_weight, X, dtype=np.float64, ensure_non_negative=True)
        if not w.any():
            raise ValueError("sample_weight: every weight is zero; there is nothing to fit")
        return X, np.asarray(y, np.int64), w

    def _checked(self, X) -> np.ndarray:
        """Features to score, checked against the fitted head (fitted, finite, 2-D, as many columns)."""
        check_is_fitted(self)
        return validate_data(self, X, reset=False, dtype=_DTYPES)

    def predict(self, X) -> np.ndarray:
        """The most probable class of each patch (featurecache's heads: 0 is background)."""
        best = self.predict_proba(X).argmax(1)  # checks that the head is fitted first
        return self.classes_[best]

    def patch_scores(self, X) -> np.ndarray:
        """Per-class probabilities ``(n, n_outputs_ - 1)`` (background left out)."""
        return self.predict_proba(X)[:, 1:]


def _build_mlp(n_in: int, hidden: tuple, n_out: int, dropout: float) -> nn.Sequential:
    layers, d = [], n_in
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        d = h
    layers.append(nn.Linear(d, n_out))
    return nn.Sequential(*layers)


class MLPHead(TorchState, _PatchClassifier, BaseEstimator):
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

    def __init__(self, hidden=OPTIONS["hidden"].default, dropout: float = OPTIONS["dropout"].default,
                 lr: float = OPTIONS["lr"].default, momentum: float = 0.9,
                 weight_decay: float = OPTIONS["weight_decay"].default, batch_size: int = OPTIONS["batch_size"].default,
                 max_epochs: int = OPTIONS["epochs"].default, lr_drops: int = 3, tol: float = 1e-3,
                 n_outputs: Optional[int] = None, device: str = "auto", random_state: Optional[int] = 0) -> None:
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
        X, y, w = self._fit_data(X, y, sample_weight)
        classes = self.classes_
        val = None
        if validation is not None:
            Xv = validate_data(self, validation[0], reset=False, dtype=np.float32)
            yv = np.asarray(validation[1])
            known = np.isin(yv, classes)
            if not known.all():
                raise ValueError(f"validation labels not among the training labels: {np.unique(yv[~known])[:5]}")
            wv = np.asarray(validation[2], np.float32) if len(validation) > 2 else np.ones(len(yv), np.float32)
            val = ArraySource(Xv, np.searchsorted(classes, yv).astype(np.int64), wv)
        self._train(ArraySource(np.asarray(X, np.float32), y, w.astype(np.float32)), val, len(classes))
        self.classes_ = classes
        return self

    def fit_source(self, source, val=None) -> "MLPHead":
        """Train from an :class:`ArraySource` or :class:`StreamSource` (same order, same model) of
        integer labels ``0 .. n_outputs - 1`` (``classes_`` is ``arange(n_outputs_)``)."""
        if len(source) == 0:
            raise HeadError("no training patches")
        y_max = int(max(source.y.max(), val.y.max() if val is not None and len(val) else 0))
        n_out = int(self.n_outputs) if self.n_outputs is not None else y_max + 1
        if y_max >= n_out or source.y.min() < 0:
            raise HeadError(f"labels must be in [0, {n_out}); got {source.y.min()}..{y_max}", param="y")
        self._train(source, val, n_out)
        self.classes_ = np.arange(n_out)
        return self

    def _train(self, source, val, n_out: int) -> None:
        dev = resolve_device(self.device)
        seed = 0 if self.random_state is None else int(self.random_state)
        rng = np.random.RandomState(seed)

        def make():
            net = self._build(source.n_features, n_out).to(dev)
            return net, torch.optim.SGD(net.parameters(), lr=self.lr, momentum=self.momentum,
                                        weight_decay=self.weight_decay)

        def run_epoch(net, opt, epoch):
            total = wsum = 0.0
            for xb, yb, wb in batches(source, rng, int(self.batch_size), dev):
                ws = wb.sum()
                if ws.item() <= 0:
                    continue
                losses = F.cross_entropy(net(xb), yb, reduction="none")
                opt.zero_grad(set_to_none=True)
                ((losses * wb).sum() / ws).backward()
                opt.step()
                total += float((losses.detach() * wb).sum())
                wsum += float(ws)
            return total / max(wsum, 1e-12)

        net, history = train_torch(make, seed=seed, device=dev, max_epochs=int(self.max_epochs), run_epoch=run_epoch,
                                   validate=(lambda net: self._loss(net, val, dev)) if val is not None else None,
                                   schedule=PlateauSchedule(self.lr_drops, self.tol))
        self.net_, self.history_, self.n_epochs_ = net, history, len(history)
        self.n_features_in_, self.n_outputs_, self.n_iter_ = source.n_features, n_out, len(history)

    def _build(self, n_features: int, n_outputs: int) -> nn.Module:
        return _build_mlp(n_features, _hidden_tuple(self.hidden), n_outputs, float(self.dropout))

    def _restore(self, state: dict, n_features: int, n_outputs: int, *, device: str = "auto") -> None:
        super()._restore(state, n_features, n_outputs, device=device)
        self.classes_ = np.arange(n_outputs)
        self.n_iter_ = getattr(self, "n_epochs_", 0)

    def _loss(self, net: nn.Module, data, dev) -> float:
        net.eval()
        total = wsum = 0.0
        with torch.inference_mode():
            for xb, yb, wb in sequential(data, 8192, dev):
                total += float((F.cross_entropy(net(xb), yb, reduction="none") * wb).sum())
                wsum += float(wb.sum())
        return total / max(wsum, 1e-12)

    def predict_proba(self, X) -> np.ndarray:
        """Softmax outputs ``(n, len(classes_))`` (featurecache's heads: background then classes)."""
        return self._forward(self._checked(X)).softmax(-1).numpy()



class CoefficientState:
    """Saving and restoring ``coef_``/``intercept_`` as plain tensors (no pickle)."""

    def _state(self) -> dict:
        return {"coef": torch.from_numpy(self.coef_.copy()), "intercept": torch.from_numpy(self.intercept_.copy())}

    def _restore(self, state: dict, n_features: int, n_outputs: int, *, device: str = "auto") -> None:
        self.coef_ = state["coef"].numpy().astype(np.float64)
        self.intercept_ = state["intercept"].numpy().astype(np.float64)
        if self.coef_.ndim != 2 or self.coef_.shape[1] != n_features or self.intercept_.shape != self.coef_.shape[:1]:
            raise ValueError(f"coefficients {tuple(self.coef_.shape)} do not fit {n_features} features")
        self.n_features_in_, self.n_outputs_ = n_features, n_outputs


class _LinearSklearnHead(CoefficientState, _PatchClassifier, BaseEstimator):
    """Shared code of the scikit-learn baselines: full-width coefficient arrays."""

    def _full_coefficients(self, model, n_out: int) -> None:
        """Coefficients of every output (``n_out``), those of labels absent from training at -inf."""
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
        self.n_iter_ = int(np.max(model.n_iter_))

    def _fit_model(self, model, X, y, sample_weight):
        X, y, w = self._fit_data(X, y, sample_weight)
        model.fit(X, y, sample_weight=w)
        self._full_coefficients(model, len(self.classes_))
        return self

    def _scores(self, X) -> np.ndarray:
        return np.asarray(self._checked(X), dtype=np.float64) @ self.coef_.T + self.intercept_

    def decision_function(self, X) -> np.ndarray:
        """Per-class scores ``(n, len(classes_))``; for two classes, as scikit-learn's binary
        classifiers, the second's minus the first's ``(n,)``."""
        z = self._scores(X)
        return z[:, 1] - z[:, 0] if z.shape[1] == 2 else z

    def predict_proba(self, X) -> np.ndarray:
        z = self._scores(X)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def fit_source(self, source, val=None):
        """Train on a batch source held in memory (``val`` is not used)."""
        return self.fit(source.matrix(), source.y, sample_weight=source.w)

    def _restore(self, state: dict, n_features: int, n_outputs: int, *, device: str = "auto") -> None:
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

    def __init__(self, C: float = OPTIONS["C"].default, max_iter: int = 1000, tol: float = 1e-4,
                 n_outputs: Optional[int] = None,
                 random_state: Optional[int] = 0) -> None:
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.n_outputs = n_outputs
        self.random_state = random_state

    def fit(self, X, y, sample_weight=None) -> "LogRegHead":
        model = LogisticRegression(C=self.C, max_iter=self.max_iter, tol=self.tol, random_state=self.random_state)
        return self._fit_model(model, X, y, sample_weight)


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

    def __init__(self, C: float = OPTIONS["C"].default, max_iter: int = 5000, n_outputs: Optional[int] = None,
                 random_state: Optional[int] = 0) -> None:
        self.C = C
        self.max_iter = max_iter
        self.n_outputs = n_outputs
        self.random_state = random_state

    def fit(self, X, y, sample_weight=None) -> "LinearSVMHead":
        model = LinearSVC(C=self.C, max_iter=self.max_iter, random_state=self.random_state)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return self._fit_model(model, X, y, sample_weight)




# --------------------------------------------------------------------------- training on a cache


def _validation_source(cache, train, config: FitConfig, policy: BackgroundPolicy, w_bg: float, *,
                       memory_limit: Optional[int], stack: contextlib.ExitStack) -> tuple:
    """``(source or None, path or None)``: the held-out patches that drive the MLP's schedule
    (``config.val``, or ``config.val_split`` of the cache given for training); streamed from
    the file, a window at a time, when they exceed ``memory_limit``. The reader stays open
    until ``stack`` closes."""
    if config.val is None and config.val_split is None:
        return None, None
    val = stack.enter_context(open_cache(config.val if config.val is not None else cache, config.val_split))
    if val.fingerprint != train.fingerprint:
        raise HeadError(f"{val.path}: validation features differ from training features ("
                        + describe_fingerprint_difference(val.feature_settings, train.feature_settings,
                                                          ours_name="val", theirs_name="train") + ")")
    # Validation patches are weighted like the training distribution: a kept fraction F of
    # the background is, in expectation, every background patch at weight F.
    val_policy = policy if policy.kind == "none" else BackgroundPolicy(
        "weight", weight=policy.fraction if policy.kind == "sample" else w_bg)
    vk, vw, _ = background_weights(val.labels, val_policy, random_state=config.random_state)
    return patch_source(val, vk, val.labels[vk], vw, memory_limit=memory_limit), str(val.path)


def fit_patch_objective(cache, config: FitConfig, *, kind: str, params: dict) -> TrainedHead:
    """Train a patch head (``kind`` mlp, logreg or linearsvm) on a cache's labelled patches.

    Parameters
    ----------
    cache : path, FeatureCache or MemoryCache
    config : FitConfig
        Its ``background``/``background_weight`` options, splits, validation data, memory
        limit and seed.
    kind : str
    params : dict
        Estimator parameters (:func:`featurecache.heads.registry.estimator_for`).

    Returns
    -------
    TrainedHead
    """
    t0 = time.perf_counter()
    policy = as_policy(config.option("background"), weight=config.option("background_weight"))
    with open_cache(cache, config.train_split) as train:
        n_out = len(train.classes) + 1
        est = make_head(kind, **{"n_outputs": n_out, **params})
        labels = train.labels
        keep, w, w_bg = background_weights(labels, policy, random_state=config.random_state)
        if len(keep) == 0:
            raise HeadError(f"{train.path}: no labelled patches to train on")
        source = patch_source(train, keep, labels[keep], w, memory_limit=config.memory_limit)
        if source.streaming and not isinstance(est, MLPHead):
            size = features_bytes(len(keep), train.feature_dim) / 2**30
            raise HeadError(f"{train.path}: {size:.1f} GiB of training features "
                            f"exceed the memory limit and the {kind} head cannot stream; use the mlp head, "
                            "background sample:0.1, or a larger memory limit", param="memory_limit")
        held = 0 if source.streaming else features_bytes(len(keep), train.feature_dim)
        with contextlib.ExitStack() as stack:
            val_source, val_path = _validation_source(
                cache, train, config, policy, w_bg, memory_limit=max(memory_budget(config.memory_limit) - held, 0),
                stack=stack)
            est.fit_source(source, val_source)
        counts = np.bincount(labels[keep], minlength=n_out)
        summary = {"objective": "patch", "cache": str(train.path), "train_split": config.train_split, "val": val_path,
                   "val_split": config.val_split, "background": policy.describe(), "background_weight": w_bg,
                   "train_patches": int(len(keep)), "background_patches": int(counts[BACKGROUND]),
                   "patches_per_class": {c: int(n) for c, n in zip(train.classes, counts[1:])},
                   "training_data": "stream" if source.streaming else "memory",
                   "validation_data": None if val_source is None else "stream" if val_source.streaming else "memory",
                   "seconds": time.perf_counter() - t0, "random_state": config.random_state}
        if isinstance(est, MLPHead):
            vals = [h["val_loss"] for h in est.history_ if h["val_loss"] is not None]
            summary.update(epochs=est.n_epochs_, final_loss=est.history_[-1]["train_loss"] if est.history_ else None,
                           val_loss=min(vals) if vals else None)
        return TrainedHead.from_cache(est, kind, train, summary, "patch")


def describe_patch(s: Mapping, kind: str) -> str:
    """One line on what training did (the objectives table names it)."""
    per_class = ", ".join(f"{k} {v}" for k, v in s.get("patches_per_class", {}).items() if v)
    parts = [f"{kind} head: {s.get('train_patches', 0):,} training patches "
             f"({s.get('background_patches', 0):,} background, weight {s.get('background_weight', 1):.3g})"]
    if "epochs" in s:
        parts.append(f"{s['epochs']} epochs")
    parts.append(f"{s.get('seconds', 0):.1f} s")
    if s.get("final_loss") is not None:
        parts.append(f"final loss {s['final_loss']:.4f}")
    if s.get("val_loss") is not None:
        parts.append(f"best val loss {s['val_loss']:.4f}")
    return "; ".join(parts) + (f"; objects: {per_class}" if per_class else "")
