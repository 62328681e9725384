"""Cross-validation over images: the one routine that cuts a cache's images into folds.

``auto`` (:mod:`featurecache.heads.auto`) compares its candidates on these folds and
``ablate`` its configurations: an image's patches are never on both sides, and the folds
are those of :func:`featurecache.metrics.image_folds` (seeded, near-equal sizes).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from featurecache.cache import AnyCache
from featurecache.metrics import image_folds

__all__ = ["Fold", "cv_folds"]


@dataclass(frozen=True)
class Fold:
    """One training/evaluation run: views of the training and evaluation images."""

    train: AnyCache
    test: AnyCache


def cv_folds(data, k: int, seed: int, stack: contextlib.ExitStack) -> list:
    """The ``k`` folds of ``data``'s images as :class:`Fold` views (selections of ``data``).

    Parameters
    ----------
    data : FeatureCache or MemoryCache
        In memory, the views index its features (no copy); on disk, they read only their rows.
    k : int
    seed : int
        Seeds the shuffle of the images.
    stack : contextlib.ExitStack
        Closes the views.
    """
    return [Fold(stack.enter_context(data.select(train)), stack.enter_context(data.select(test)))
            for train, test in image_folds(data.num_images, k, seed)]
