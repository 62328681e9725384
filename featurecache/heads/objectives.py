"""The objectives of stage two: one table, and every list of objective names derived from it.

An objective says what a head learns from and how it is trained, scored and described. Its
trainer, describer and estimators are named by ``"module:attribute"`` strings and imported
on first use (as timm's registry does), so this module, and the command line's ``--help``,
do not import torch. :data:`OBJECTIVES`, :data:`SINGLE_OBJECTIVES`,
:data:`COMBINING_OBJECTIVES`, :data:`MEMBER_OBJECTIVES` and :data:`HEAD_KINDS` are read
from :data:`_TABLE`; adding an objective is one entry there (docs/architecture.md).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Optional

from featurecache.errors import HeadError
from featurecache.heads.pooling import DEFAULT_POWER

__all__ = ["COMBINING_OBJECTIVES", "DEFAULT_OBJECTIVE", "HEAD_KINDS", "MEMBER_OBJECTIVES", "OBJECTIVES",
           "SINGLE_OBJECTIVES", "HeadKind", "Objective", "get_objective", "load", "objective_of_kind"]

#: ``fit``'s default objective: choose among the candidates by cross-validation on the
#: user's own training images (no fixed objective held on data nobody tuned on).
DEFAULT_OBJECTIVE = "auto"


def load(target: str):
    """The attribute a ``"module:attribute"`` string names, imported now."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class HeadKind:
    """A head kind as stored in head files.

    Attributes
    ----------
    name : str
        The kind (``mlp``, ``image-logreg``, ``mil`` ...).
    estimator : str
        ``"module:Class"`` of its estimator (a :class:`featurecache.heads.registry.HeadEstimator`).
    choice : str, optional
        The value of its objective's ``head_option`` that picks it.
    """

    name: str
    estimator: str
    choice: Optional[str] = None


@dataclass(frozen=True)
class Objective:
    """What a head learns from, and how it is trained and scored.

    Attributes
    ----------
    name : str
    trainer : str
        ``"module:function"`` of ``function(cache, config, *, kind, params) -> TrainedHead``.
    describer : str
        ``"module:function"`` of ``function(summary, kind) -> one line`` after training.
    heads : tuple of HeadKind
        Its head kinds; empty for an objective that chooses among others (``auto``, whose
        head is the chosen candidate's).
    head_option : str, optional
        The option whose value picks among several ``heads``.
    single : bool
        It trains one estimator of its own: a fusion member or ``auto`` candidate, whose
        options also belong to the combining objectives.
    fuses : bool
        It averages the scores of other objectives' heads (its ``members``).
    chooses : bool
        It chooses among other objectives (``candidates``); not a fusion member.
    pools_patches : bool
        Image scores pool patch class probabilities (the evaluation options ``pooling``
        and ``k`` apply; patch accuracy is reported).
    patch_scores : bool
        Its heads score single patches (localisation maps).
    needs_boxes : bool
        It trains on box-derived patch labels.
    fixed : mapping
        Estimator parameters the objective sets whatever the options.
    image_features : bool
        Its heads score one pooled feature vector per image (so a whole-image feature can
        stand in: ``ablate``'s probe).
    positive : tuple of str
        Estimator parameters it needs positive (``hybrid``: the weight of its patch loss).
    variant : str, optional
        The option a member's or candidate's ``:variant`` sets (``image:coarse``, ``patch:0``).
    scores : str
        What its image scores mean (``predict`` documents and prints it).
    probabilities : bool
        Its image scores are probabilities, so a threshold of 0.5 means "more likely than
        not"; ``predict`` uses that as its default threshold.
    attention_maps : bool
        Its heads weigh each patch of an image (``patch_attention``: the ``attention`` map method).
    """

    name: str
    trainer: str
    describer: str
    heads: tuple = ()
    head_option: Optional[str] = None
    single: bool = True
    fuses: bool = False
    chooses: bool = False
    pools_patches: bool = False
    patch_scores: bool = False
    needs_boxes: bool = False
    fixed: Mapping = field(default_factory=dict)
    positive: tuple = ()
    image_features: bool = False
    variant: Optional[str] = None
    scores: str = ""
    probabilities: bool = False
    attention_maps: bool = False

    def kind(self, options: Mapping) -> Optional[str]:
        """The head kind of a configuration's options (None for an objective that chooses)."""
        if not self.heads:
            return None
        if self.head_option is None:
            return self.heads[0].name
        return next(h.name for h in self.heads if h.choice == options[self.head_option])

    def head_choices(self) -> tuple:
        """The values of its ``head_option``."""
        return tuple(h.choice for h in self.heads if h.choice is not None)

    def describe(self, summary: Mapping, kind: str) -> str:
        """One line on what training did."""
        return load(self.describer)(summary, kind)


_MIL_HEAD = HeadKind("mil", "featurecache.heads.mil:MILHead")
_MIL_SCORES = ("the probability that the class is in the image (sigmoid of the trained aggregation of the patches' "
               "class scores)")

#: The one table of objectives, in ``fit --objective``'s order after the default.
_TABLE = (
    Objective("patch", "featurecache.heads.patch:fit_patch_objective", "featurecache.heads.patch:describe_patch",
              heads=(HeadKind("mlp", "featurecache.heads.patch:MLPHead", "mlp"),
                     HeadKind("logreg", "featurecache.heads.patch:LogRegHead", "logreg"),
                     HeadKind("linearsvm", "featurecache.heads.patch:LinearSVMHead", "linearsvm")),
              head_option="head", pools_patches=True, patch_scores=True, needs_boxes=True, variant="hidden",
              scores=f"the pooled patch score: (1/M) sum of the M patches' class probabilities to the power k "
                     f"(k = {DEFAULT_POWER:g}), in [0, 1]; a ranking score, not a probability"),
    Objective("image", "featurecache.heads.image:fit_image_objective", "featurecache.heads.image:describe_image",
              heads=(HeadKind("image-logreg", "featurecache.heads.image:ImageLogRegHead", "logreg"),
                     HeadKind("image-mlp", "featurecache.heads.image:ImageMLPHead", "mlp")),
              head_option="image_head", image_features=True, probabilities=True, variant="image_pooling",
              scores="the probability that the class is in the image (per-class logistic output on the pooled "
                     "image features)"),
    Objective("mil", "featurecache.heads.mil:fit_mil_objective", "featurecache.heads.mil:describe_mil",
              heads=(_MIL_HEAD,), patch_scores=True, fixed=MappingProxyType({"patch_weight": 0.0}),
              probabilities=True, scores=_MIL_SCORES),
    Objective("hybrid", "featurecache.heads.mil:fit_mil_objective", "featurecache.heads.mil:describe_mil",
              heads=(_MIL_HEAD,), patch_scores=True, needs_boxes=True, positive=("patch_weight",), probabilities=True,
              scores=_MIL_SCORES),
    Objective("attention", "featurecache.heads.attention:fit_attention_objective",
              "featurecache.heads.attention:describe_attention",
              heads=(HeadKind("attention", "featurecache.heads.attention:AttentionHead"),), patch_scores=True,
              probabilities=True, attention_maps=True,
              scores="the probability that the class is in the image (sigmoid of the attention-weighted sum of the "
                     "patches' class scores)"),
    Objective("fusion", "featurecache.heads.fusion:fit_fusion_objective", "featurecache.heads.fusion:describe_fusion",
              heads=(HeadKind("fusion", "featurecache.heads.fusion:FusionHead"),), single=False, fuses=True,
              scores="the mean of the members' scores, each standardised on the training images (0 = their "
                     "mean); a ranking score, not a probability"),
    # auto trains candidates and keeps one: the head it returns has the chosen objective (and its describer).
    Objective("auto", "featurecache.heads.auto:fit_auto_objective", "featurecache.heads.patch:describe_patch",
              single=False, chooses=True),
)

_BY_NAME = MappingProxyType({o.name: o for o in _TABLE})

#: What ``fit --objective`` accepts.
OBJECTIVES = tuple(_BY_NAME)
#: Objectives that train one estimator of their own (fusion members, auto candidates).
SINGLE_OBJECTIVES = tuple(o.name for o in _TABLE if o.single)
#: Objectives that train other objectives' heads with the same options (fusion, auto).
COMBINING_OBJECTIVES = tuple(o.name for o in _TABLE if not o.single)
#: What a fusion member or an auto candidate may name (a fusion is a candidate only).
MEMBER_OBJECTIVES = tuple(o.name for o in _TABLE if not o.chooses)

#: Head kinds as stored in head files, and their estimators.
HEAD_KINDS: Mapping[str, str] = MappingProxyType({h.name: h.estimator for o in _TABLE for h in o.heads})


def get_objective(name: str) -> Objective:
    """The :class:`Objective` of a name, or a :class:`HeadError` naming ``objective``."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise HeadError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}",
                        param="objective") from None


def objective_of_kind(kind: str) -> str:
    """The objective of a head file written before heads recorded theirs: the first in the table with
    that head kind (``mil`` for a mil head); the first objective (the paper's) for a kind none has."""
    return next((o.name for o in _TABLE if any(h.name == kind for h in o.heads)), OBJECTIVES[0])
