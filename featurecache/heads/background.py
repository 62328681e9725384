"""Background patches in training: the policy (re-weight, sub-sample, leave alone) and the weights it gives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from featurecache.errors import HeadError
from featurecache.patches import AMBIGUOUS, BACKGROUND

__all__ = ["BackgroundPolicy", "as_policy", "background_weights"]


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
                raise HeadError(f"sample:F needs a number, got {text!r}", param="background") from None
            if not 0 < fraction <= 1:
                raise HeadError(f"sample:F needs 0 < F <= 1, got {fraction}", param="background")
            return cls("sample", fraction=fraction)
        if kind in ("weight", "none") and not arg:
            if kind == "weight" and not 0 < share < 1:
                raise HeadError(f"must be in (0, 1), got {share}", param="background_share")
            return cls(kind, share=share, weight=weight)
        raise HeadError(f"must be weight, sample:F or none, got {text!r}", param="background")

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


def as_policy(background: Union[str, BackgroundPolicy], *, weight: Optional[float] = None) -> BackgroundPolicy:
    """A policy from its command-line form (with ``weight``, the explicit background weight) or as it is."""
    return background if isinstance(background, BackgroundPolicy) else BackgroundPolicy.parse(background, weight=weight)
