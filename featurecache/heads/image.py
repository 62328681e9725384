"""The ``image`` objective: each image's pooled patch features, then a per-class image head on its labels."""

from __future__ import annotations

import time
from typing import Mapping, Optional

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.utils.multiclass import type_of_target
from sklearn.utils.validation import check_is_fitted, validate_data
from threadpoolctl import threadpool_limits
from torch import nn

from featurecache.cache import open_cache
from featurecache.heads._sources import BagSource
from featurecache.heads._torch import TorchState
from featurecache.heads.bags import BagTrainer, scorer
from featurecache.heads.mil import image_level_summary
from featurecache.heads.options import OPTIONS
from featurecache.heads.patch import CoefficientState
from featurecache.heads.pooling import image_features
from featurecache.heads.registry import FitConfig, make_head
from featurecache.heads.trained import TrainedHead

__all__ = ["ImageLogRegHead", "ImageMLPHead", "describe_image", "fit_image_objective"]

_POOLING = tuple(OPTIONS["image_pooling"].read(OPTIONS["image_pooling"].default).split("+"))


class _ImageScorer(ClassifierMixin):
    """A multi-label classifier of pooled image features, in scikit-learn's terms, that scores a
    cache's images through the pooled features it was trained on (``pooling``).

    ``Y`` is a multi-label indicator matrix ``(M, C)`` of 0/1 (or bool); ``classes_`` is
    ``arange(C)``, ``predict`` gives the indicator matrix (score >= 0.5), ``predict_proba``
    one probability per class ``(M, C)``. Tagged multi-label, multi-output and not single
    output, so scikit-learn's estimator checks exercise it with indicator targets.
    """

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = False
        tags.classifier_tags.multi_class = False
        tags.classifier_tags.multi_label = True
        return tags

    def _fit_data(self, X, Y, ignore) -> tuple:
        """``(X float64, Y bool (M, C), ignore bool (M, C))`` checked as scikit-learn checks them."""
        X, Y = validate_data(self, X, Y, multi_output=True, dtype=[np.float64, np.float32], y_numeric=False)
        Y = np.asarray(Y)
        kind = type_of_target(Y, input_name="Y", raise_unknown=True)
        if kind.startswith("continuous"):
            raise ValueError(f"Unknown label type: {kind}; Y must be a multi-label indicator matrix of 0/1")
        if Y.ndim != 2 or not np.isin(Y, (0, 1)).all():
            raise ValueError("Only binary classification is supported per class: Y must be a multi-label indicator "
                             f"matrix (images, classes) of 0/1 or bool; the type of the target is {kind}, its shape "
                             f"{Y.shape}")
        ignore = np.zeros(Y.shape, bool) if ignore is None else np.asarray(ignore, bool)
        if ignore.shape != Y.shape:
            raise ValueError(f"ignore must have Y's shape {Y.shape}, got {ignore.shape}")
        self.classes_ = np.arange(Y.shape[1])
        return X, Y.astype(bool), ignore

    def _checked(self, X) -> np.ndarray:
        check_is_fitted(self)
        return validate_data(self, X, reset=False, dtype=[np.float64, np.float32, np.float16])

    def predict_proba(self, X) -> np.ndarray:
        """Per-class probabilities ``(M, C)`` (each class's own, not a distribution over classes)."""
        return self.image_scores(self._checked(X))

    def predict(self, X) -> np.ndarray:
        """The multi-label indicator matrix ``(M, C)``: 1 where a class's probability is at least 0.5."""
        return (self.predict_proba(X) >= 0.5).astype(np.int64)

    def score_images(self, cache) -> np.ndarray:
        """Per-class scores ``(M, C)`` of a cache's selected images."""
        return self.image_scores(image_features(cache, pooling=self.pooling))

    def region_scores(self, X: np.ndarray) -> np.ndarray:
        """Per-class scores ``(N, C)`` of regions each described by one feature vector ``(N, D)``:
        what the head gives an image all of whose patches have that feature (every pooling
        of it is the vector itself), i.e. a class activation map's cell scores."""
        X = np.asarray(X, dtype=np.float32)
        return self.image_scores(np.tile(X, (1, self.n_features_in_ // X.shape[1])))

    def scoring_label(self) -> str:
        return "image:" + "+".join(self.pooling)

    def scoring_text(self) -> str:
        return "image features " + "+".join(self.pooling)


class ImageLogRegHead(_ImageScorer, CoefficientState, BaseEstimator):
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

    def __init__(self, C: float = OPTIONS["C"].default, max_iter: int = 2000, pooling: tuple = _POOLING,
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
        X, Y, ignore = self._fit_data(X, Y, ignore)
        X = np.asarray(X, dtype=np.float64)
        coef = np.zeros((Y.shape[1], X.shape[1]))
        intercept = np.full(Y.shape[1], -np.inf)
        n_iter = 0
        # One BLAS thread: each problem (images x features) is too small for threads to pay, and waking OpenBLAS's
        # threads at every L-BFGS step cost many times the work itself on 2 shared cores (docs/performance.md).
        with threadpool_limits(limits=1, user_api="blas"):
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
                n_iter = max(n_iter, int(model.n_iter_.max()))
        self.coef_, self.intercept_ = coef, intercept
        self.n_features_in_, self.n_outputs_, self.n_iter_ = X.shape[1], Y.shape[1], n_iter
        return self

    def decision_function(self, X) -> np.ndarray:
        """Per-class log-odds ``(M, C)`` (±inf for a class seen with one label only)."""
        return np.asarray(self._checked(X), dtype=np.float64) @ self.coef_.T + self.intercept_

    def image_scores(self, X: np.ndarray) -> np.ndarray:
        """Per-class probabilities ``(M, C)``."""
        z = np.asarray(X, dtype=np.float64) @ self.coef_.T + self.intercept_
        with np.errstate(over="ignore", invalid="ignore"):
            p = 1.0 / (1.0 + np.exp(-z))
        # +-inf intercepts (a class seen with one label) give exactly 1 or 0; NaN only comes from
        # features that are not finite, and stays NaN so that evaluation and predict name it.
        return p.astype(np.float32)


class ImageMLPHead(_ImageScorer, TorchState, BaseEstimator):
    """Per-class sigmoid head (linear or one hidden layer) on pooled image features.

    The ``image`` objective's trainable alternative to :class:`ImageLogRegHead`: binary
    cross-entropy on multi-hot image labels, Adam, weight decay, optional early stopping on
    held-out images, trained by the bag trainer of :class:`~featurecache.heads.mil.MILHead`
    (:class:`~featurecache.heads.bags.BagTrainer`; an image is a bag of one vector).

    Parameters
    ----------
    hidden, lr, weight_decay, max_epochs, patience, batch_images, validation_fraction, device, random_state
        As :class:`~featurecache.heads.mil.MILHead`.
    pooling : tuple of str
        Which :func:`image_features` the head was trained on (kept with the head).
    """

    def __init__(self, hidden: int = OPTIONS["image_hidden"].default, lr: float = OPTIONS["image_lr"].default,
                 weight_decay: float = OPTIONS["image_weight_decay"].default,
                 max_epochs: int = OPTIONS["image_epochs"].default, patience: int = 10, batch_images: int = 16,
                 validation_fraction: float = 0.0, pooling: tuple = _POOLING, device: str = "auto",
                 random_state: Optional[int] = 0) -> None:
        self.hidden = hidden
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.patience = patience
        self.batch_images = batch_images
        self.validation_fraction = validation_fraction
        self.pooling = pooling
        self.device = device
        self.random_state = random_state

    def _build(self, d: int, c: int) -> nn.Module:
        return scorer(d, c, self.hidden)

    def fit(self, X: np.ndarray, Y: np.ndarray, ignore: Optional[np.ndarray] = None) -> "ImageMLPHead":
        """Train on image features ``X`` (M, D) and labels ``Y`` (M, C)."""
        X, Y, ignore = self._fit_data(X, Y, ignore)
        X = np.asarray(X, np.float32)
        # A bag of one vector: its maximum is its score (and there is nothing to warm up).
        trainer = BagTrainer.of(self, aggregation="max", warmup_epochs=0)
        self.net_, self.history_ = trainer.fit(BagSource(X, np.arange(len(X)), len(X)), Y, ignore)
        self.n_epochs_ = self.n_iter_ = len(self.history_)
        self.n_features_in_, self.n_outputs_ = X.shape[1], Y.shape[1]
        return self

    def image_scores(self, X: np.ndarray) -> np.ndarray:
        """Per-class probabilities ``(M, C)``."""
        return torch.sigmoid(self._forward(X)).numpy()


def fit_image_objective(cache, config: FitConfig, *, kind: str, params: dict) -> TrainedHead:
    """Train the ``image`` objective on a cache: pooled features, then a per-class image head.

    Parameters
    ----------
    cache : path, FeatureCache or MemoryCache
    config : FitConfig
    kind : {"image-logreg", "image-mlp"}
    params : dict
        Estimator parameters, ``pooling`` among them.

    Returns
    -------
    TrainedHead
    """
    t0 = time.perf_counter()
    with open_cache(cache, config.train_split) as c:
        est, t = make_head(kind, **params), c.images
        est.fit(image_features(c, pooling=est.pooling), t.labels, ignore=t.difficult & ~t.labels)
        extra = {"image_pooling": list(est.pooling)}
        if hasattr(est, "n_epochs_"):  # the trained MLP
            extra["epochs"] = est.n_epochs_
        return TrainedHead.from_cache(est, kind, c, image_level_summary(c, config, t0, extra), config.objective)


def describe_image(s: Mapping, kind: str) -> str:
    """One line on what training did (the objectives table names it)."""
    per_class = ", ".join(f"{k} {v}" for k, v in s.get("images_per_class", {}).items())
    return (f"{kind} head (objective image, pooling {'+'.join(s.get('image_pooling', []))}): "
            f"{s.get('train_images', 0)} training images; {s.get('seconds', 0):.1f} s; positive images: {per_class}")
