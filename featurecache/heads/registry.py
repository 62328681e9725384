"""The objectives and head kinds of stage two: their names, options, defaults, estimators and trainers, defined once.

Everything that differs between objectives is read from here: the command line builds
``fit``'s options and ``ablate --grid``'s help from :data:`OPTIONS`, ``ablate`` asks which
settings shape a configuration (:func:`relevant`), :func:`estimator_for` turns options into
an estimator, and a head file's ``objective`` finds its :class:`Objective`. Estimators and
trainers are named by ``"module:attribute"`` and imported on first use (as timm's registry
does), so this module, and the command line's ``--help``, do not import torch.
"""

from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Sequence

from featurecache.errors import HeadError, integer_at_least
from featurecache.heads.background import BackgroundPolicy
from featurecache.heads.pooling import SCORE_POOLINGS, check_image_pooling

__all__ = ["AGGREGATIONS", "DEFAULT_OBJECTIVE", "EVAL_OPTIONS", "FitConfig", "HEAD_KINDS", "OBJECTIVES", "OPTIONS",
           "Objective", "Option", "defaults", "estimator_for", "get_objective", "make_head", "objective_of_kind",
           "option_of_param", "parse_aggregation", "relevant"]

#: ``fit``'s default objective: choose among the candidates by cross-validation on the
#: user's own training images (no fixed objective held on data nobody tuned on).
DEFAULT_OBJECTIVE = "auto"

#: MIL aggregations of patch logits into an image logit.
AGGREGATIONS = ("lse", "max", "power")

_PATCH_HEADS = ("mlp", "logreg", "linearsvm")
_IMAGE_HEADS = ("logreg", "mlp")


#: Largest power k or log-sum-exp r: beyond it the aggregation is max in all but rounding, and
#: its gradients overflow float32.
MAX_AGGREGATION_PARAMETER = 1000.0


def parse_aggregation(text: str) -> tuple:
    """``"lse:2"`` -> ``("lse", 2.0)``; ``"power:5"`` -> ``("power", 5.0)``; ``"max"`` -> ``("max", None)``."""
    name, _, value = str(text).partition(":")
    name = name.strip()
    if name not in AGGREGATIONS:
        raise HeadError(f"must be lse[:r], max or power[:k], got {text!r}", param="aggregation")
    if name == "max":
        if value:
            raise HeadError(f"max takes no parameter, got {text!r}", param="aggregation")
        return name, None
    try:
        v = float(value) if value else (2.0 if name == "lse" else 5.0)
    except ValueError:
        raise HeadError(f"{name}: cannot read {value!r} as a number", param="aggregation") from None
    if not math.isfinite(v) or not 0 < v <= MAX_AGGREGATION_PARAMETER:
        raise HeadError(f"{name}: the parameter must be a number in (0, {MAX_AGGREGATION_PARAMETER:g}], got {v:g}",
                        param="aggregation")
    return name, v


#: What ``auto`` compares unless told otherwise: the probe on the coarsest scale, the pooled
#: patch features, the image-label and box-label patch scorers, and a fusion. The paper's
#: patch objective enters as FCb only (``patch:0``): as good as FCa 2048 + FCb at the defaults
#: on both shared sets (VOC 5-fold 79.3 vs 78.2, BCCD 86.9 vs 87.1 at k = 5; docs/results.md)
#: and 26x cheaper to train on BCCD (3.4 s vs 90.5 s).
DEFAULT_CANDIDATES = ("image:coarse", "image:mean", "mil", "hybrid", "patch:0", "fusion")

#: Score fusions: standardised log-odds averaged (``zscore``), or ranks averaged (``rank``).
FUSION_RULES = ("zscore", "rank")


def is_fusion(name: str) -> bool:
    """Whether a member or candidate name is a fusion (of the ``members``)."""
    return get_objective(parse_member(name)[0]).fuses


def parse_member(text: str) -> tuple:
    """``"image:coarse"`` -> ``("image", {"image_pooling": "coarse"})``; ``"mil"`` -> ``("mil", {})``.

    A fusion member or an ``auto`` candidate: an objective, and after a colon the pooling of
    ``image`` (``image:mean+max``) or the hidden widths of the ``patch`` MLP (``patch:0``,
    FCb only). ``fusion`` is a candidate only (a fusion does not fuse fusions).
    """
    name, _, variant = str(text).strip().partition(":")
    if name not in ("patch", "image", "mil", "hybrid", "fusion"):
        raise HeadError(f"unknown member {text!r} (patch[:HIDDEN], image[:POOLING], mil, hybrid, fusion)",
                        param="members")
    if not variant:
        return name, {}
    if name not in _VARIANTS:
        raise HeadError(f"{name} takes no ':' variant, got {text!r}", param="members")
    option, read = _VARIANTS[name]
    return name, {option: read(variant)}


#: The option a member's ``:variant`` sets: the image objective's pooling, the patch MLP's widths.
_VARIANTS = {"image": ("image_pooling", lambda v: _pooling_value(v)), "patch": ("hidden", lambda v: _hidden_value(v))}


def _member_list(text, param: str = "members") -> tuple:
    # ',' on the command line; '/' in ablate --grid, where commas separate values ('+' joins image poolings).
    parts = list(text) if isinstance(text, (tuple, list)) else [
        p.strip() for p in str(text).replace("/", ",").split(",") if p.strip()]
    for p in parts:
        try:
            parse_member(p)
        except HeadError as e:
            raise HeadError(e.message, param=param) from None
    if not parts:
        raise HeadError("needs at least one name", param=param)
    return tuple(parts)


# --------------------------------------------------------------------------- options


def _aggregation_value(text) -> str:
    name, value = parse_aggregation(text)
    return name if value is None else f"{name}:{value:g}"


def _aggregation_params(value) -> dict:
    name, v = parse_aggregation(value)
    return {"aggregation": name, **({"temperature": v} if name == "lse" else {"k": v} if name == "power" else {})}


def _parts(text) -> list:
    """List-like values: ``2048,2048`` on the command line, ``2048+2048`` in ``ablate --grid``."""
    if isinstance(text, (tuple, list)):
        return list(text)
    return [p.strip() for p in str(text).replace("+", ",").split(",") if p.strip()]


def _hidden_value(text):
    if isinstance(text, int):
        return text
    sizes = tuple(int(v) for v in _parts(text))
    return sizes[0] if len(sizes) == 1 else sizes


def _pooling_value(text) -> str:
    """Image pooling as the '+'-joined text ablate shows (``"mean+max"``)."""
    return "+".join(check_image_pooling(_parts(text)))


def _choice(name: str, choices: Sequence[str]) -> Callable:
    def parse(text):
        if text not in choices:
            raise HeadError(f"unknown {name.replace('_', ' ')} {text!r} ({', '.join(choices)})", param=name)
        return text
    return parse


def _background_value(text) -> str:
    BackgroundPolicy.parse(str(text))
    return str(text)


def _optional_float(text):
    if text is None or str(text).strip().lower() in ("none", "balanced", ""):
        return None
    return float(text)


def _text(text):
    return text


@dataclass(frozen=True)
class Option:
    """One setting of stage two.

    Attributes
    ----------
    name : str
        The library name (``image_lr``); the command-line flag is ``--image-lr``.
    default : object
    help : str
    objectives : frozenset of str
        The objectives it belongs to (``fit`` refuses it, given explicitly, for others).
    param : str or callable, optional
        The estimator parameter it sets, or ``value -> dict of parameters``.
    when : callable, optional
        ``options -> bool``: whether it shapes the result within its objectives (``hidden``
        only for the MLP head, ``k`` only for power pooling). Used for estimator parameters
        and by ``ablate`` (settings that do not apply neither multiply runs nor show values).
    parse : callable
        ``text -> value``; list-like values take ``,`` (command line) or ``+`` (``ablate
        --grid``, where commas separate values) between parts.
    kind : str
        How the command line reads it: ``float``, ``int``, ``choice``, ``text``, ``path`` (an existing file).
    choices : tuple of str
    minimum, maximum : float, optional
        Inclusive range; ``minimum_open``/``maximum_open`` make an end exclusive.
    grid : bool
        Whether ``ablate --grid`` can vary it.
    aliases : tuple of str
        Other command-line flags.
    """

    name: str
    default: Any
    help: str
    objectives: frozenset
    param: Any = None
    when: Optional[Callable[[Mapping], bool]] = None
    parse: Callable = float
    kind: str = "float"
    choices: tuple = ()
    minimum: Optional[float] = None
    minimum_open: bool = False
    maximum: Optional[float] = None
    maximum_open: bool = False
    grid: bool = True
    aliases: tuple = ()

    def applies(self, options: Mapping) -> bool:
        """Whether this option shapes a configuration's result (for fusion and auto: through a member's)."""
        objective = options.get("objective")
        if objective in _MEMBERS and objective in self.objectives and self.objectives & _SINGLE:
            return any(self.applies(m) for m, fixed in _member_options(options) if self.name not in fixed)
        return objective in self.objectives and (self.when is None or bool(self.when(options)))

    def read(self, text) -> Any:
        """The value of a command-line or grid text (or an already typed value)."""
        try:
            value = self.parse(text)
        except (TypeError, ValueError, OverflowError) as e:  # int(inf) overflows
            if isinstance(e, HeadError):
                raise
            raise HeadError(f"cannot read {text!r}", param=self.name) from None
        if isinstance(value, float) and not math.isfinite(value):
            raise HeadError(f"must be a finite number, got {value!r}", param=self.name)
        bad_low = self.minimum is not None and value is not None and (
            value <= self.minimum if self.minimum_open else value < self.minimum)
        bad_high = self.maximum is not None and value is not None and (
            value >= self.maximum if self.maximum_open else value > self.maximum)
        if bad_low or bad_high:
            low = "" if self.minimum is None else f"{'>' if self.minimum_open else '>='} {self.minimum:g}"
            high = "" if self.maximum is None else f"{'<' if self.maximum_open else '<='} {self.maximum:g}"
            raise HeadError(f"must be {' and '.join(t for t in (low, high) if t)}, got {value!r}", param=self.name)
        return value


_ALL = frozenset({"patch", "image", "mil", "hybrid", "fusion", "auto"})
_PATCH, _IMAGE, _MIL, _HYBRID = frozenset({"patch"}), frozenset({"image"}), frozenset({"mil"}), frozenset({"hybrid"})
_FUSION, _AUTO = frozenset({"fusion"}), frozenset({"auto"})
_SINGLE = _PATCH | _IMAGE | _MIL | _HYBRID
# Members of a fusion and candidates of auto are trained with the options of their own objectives.
_MEMBERS = _FUSION | _AUTO


def _member_options(options: Mapping) -> list:
    """``(options, names the member fixes)`` of a fusion's members, or of auto's candidates (and fusion members)."""
    names = list(_member_list(options.get("members", "image:coarse,hybrid")))
    if options.get("objective") == "auto":
        candidates = list(_member_list(options.get("candidates", ",".join(DEFAULT_CANDIDATES)), "candidates"))
        names = candidates + (names if "fusion" in candidates else [])
    out = []
    for name in names:
        objective, overrides = parse_member(name)
        if objective != "fusion":
            out.append(({**options, "objective": objective, **overrides}, set(overrides)))
    return out


def _mlp(o: Mapping) -> bool:
    return o.get("head") == "mlp"


def _trainer(o: Mapping) -> bool:
    """The torch image-label trainers: ImageMLPHead (image objective, mlp head) and MILHead."""
    return o.get("objective") != "image" or o.get("image_head") == "mlp"


def _c_applies(o: Mapping) -> bool:
    return o.get("head") != "mlp" if o.get("objective") == "patch" else o.get("image_head") == "logreg"


def _pools_patches(o: Mapping) -> bool:
    return get_objective(o.get("objective", DEFAULT_OBJECTIVE)).pools_patches


_OPTION_LIST = (
    Option("objective", DEFAULT_OBJECTIVE,
           "auto: cross-validate the candidates (--candidates) on the training images and keep the best; patch: "
           "a patch classifier on box-derived patch labels (the paper's); image: each image's pooled patch features "
           "-> a per-class image head on its labels; mil: a patch scorer trained through an image-level aggregation "
           "on image labels; hybrid: mil plus a weighted patch loss on box labels; fusion: the averaged, "
           "standardised image scores of --members. image and mil need no boxes. Options below apply to the "
           "objectives they name (and to the members and candidates of fusion and auto).",
           _ALL, kind="choice", choices=("auto", "patch", "image", "mil", "hybrid", "fusion"),
           parse=_choice("objective", ("auto", "patch", "image", "mil", "hybrid", "fusion"))),
    Option("head", "mlp", "Head type (patch objective).", _PATCH, kind="choice", choices=_PATCH_HEADS,
           parse=_choice("head", _PATCH_HEADS)),
    Option("hidden", 2048, "MLP hidden widths: 2048 (FCa+FCb), 0 (FCb only), 2048,2048 (three layers).",
           _PATCH, param="hidden", when=_mlp, parse=_hidden_value, kind="text"),
    Option("dropout", 0.5, "MLP dropout.", _PATCH, param="dropout", when=_mlp, minimum=0.0, maximum=1.0,
           maximum_open=True),
    Option("lr", 0.01, "MLP initial learning rate (divided by 10 on plateaus).", _PATCH, param="lr", when=_mlp,
           minimum=0.0, minimum_open=True),
    Option("weight_decay", 5e-4, "MLP L2 penalty.", _PATCH, param="weight_decay", when=_mlp, minimum=0.0),
    Option("batch_size", 256, "MLP mini-batch size.", _PATCH, param="batch_size", when=_mlp, parse=int,
           kind="int", minimum=1),
    Option("epochs", 60, "MLP epoch cap.", _PATCH, param="max_epochs", when=_mlp, parse=int, kind="int",
           minimum=1),
    Option("C", 1.0, "logreg/linearsvm inverse regularisation.", _PATCH | _IMAGE, param="C", when=_c_applies,
           minimum=0.0, minimum_open=True),
    Option("background", "weight", "weight (re-weight background), sample:F (keep a fraction F of it), or none.",
           _PATCH | _HYBRID, parse=_background_value, kind="text"),
    Option("background_weight", None, "Weight of a background patch [default: balance background and objects].",
           _PATCH | _HYBRID, parse=_optional_float, minimum=0.0, minimum_open=True),
    Option("image_pooling", "mean",
           "image objective: mean, max, scales (per-scale means) and/or coarse, comma-separated.",
           _IMAGE, param=lambda v: {"pooling": tuple(str(v).split("+"))}, parse=_pooling_value, kind="text"),
    Option("image_head", "logreg", "image objective: one-vs-rest logistic regression (--C) or a sigmoid MLP.",
           _IMAGE, kind="choice", choices=_IMAGE_HEADS, parse=_choice("image_head", _IMAGE_HEADS)),
    Option("aggregation", "power:5",
           "mil/hybrid: lse[:r] (log-sum-exp, temperature r), max, or power[:k] of patch scores.",
           _MIL | _HYBRID, param=_aggregation_params, parse=_aggregation_value, kind="text",
           aliases=("--mil-aggregation",)),
    Option("patch_weight", 0.3, "hybrid: weight of the patch loss (0.3 measured better than 1 at the other defaults).",
           _HYBRID, param="patch_weight", minimum=0.0),
    Option("image_hidden", 0, "image (mlp head), mil, hybrid: hidden width of the scorer (0: linear).",
           _IMAGE | _MIL | _HYBRID, param="hidden", when=_trainer, parse=int, kind="int", minimum=0),
    Option("image_lr", 0.01, "image (mlp head), mil, hybrid: Adam learning rate.",
           _IMAGE | _MIL | _HYBRID, param="lr", when=_trainer, minimum=0.0, minimum_open=True),
    Option("image_weight_decay", 1e-4, "image (mlp head), mil, hybrid: L2 penalty.",
           _IMAGE | _MIL | _HYBRID, param="weight_decay", when=_trainer, minimum=0.0),
    Option("image_epochs", 200, "image (mlp head), mil, hybrid: epochs.",
           _IMAGE | _MIL | _HYBRID, param="max_epochs", when=_trainer, parse=int, kind="int", minimum=1),
    Option("members", "image:coarse,hybrid",
           "fusion (and auto's fusion candidate): the objectives whose image scores are averaged, comma-separated; "
           "image:POOLING picks the image objective's pooling. Members that need boxes are replaced by mil on data "
           "without boxes.", _MEMBERS, param=lambda v: {"members": tuple(v)}, parse=_member_list, kind="text",
           when=lambda o: o.get("objective") == "fusion" or "fusion" in _member_list(
               o.get("candidates", ",".join(DEFAULT_CANDIDATES)), "candidates")),
    Option("fusion_rule", "zscore",
           "fusion: zscore (each member's per-class log-odds standardised on the training images) or rank "
           "(per-class ranks within the scored images); auto's fusion candidate uses zscore.", _FUSION, param="rule",
           kind="choice",
           choices=FUSION_RULES, parse=_choice("fusion_rule", FUSION_RULES)),
    Option("candidates", ",".join(DEFAULT_CANDIDATES),
           "auto: the objectives cross-validated on the training images, comma-separated (image:POOLING, "
           "patch:HIDDEN; patch and hybrid need boxes; in ablate --grid separate them with '/').", _AUTO,
           parse=lambda t: _member_list(t, "candidates"), kind="text"),
    Option("cv_folds", None, "auto: folds over the training images [default: 3, or 2 below 30 images].", _AUTO,
           parse=lambda t: None if t is None or str(t).lower() == "none" else int(t), kind="int", minimum=2),
    Option("val", None, "patch: validation cache (early stopping for the MLP).", _PATCH, kind="path", grid=False,
           parse=_text),
    Option("val_split", None, "patch: validate on this split (of --val, or of CACHE).", _PATCH, kind="text",
           grid=False, parse=_text),
)



def _with_members(o: Option) -> Option:
    """A single objective's option also belongs to fusion and auto, whose members train with it."""
    if o.name in ("objective", "val", "val_split") or not o.objectives & (_PATCH | _IMAGE | _MIL | _HYBRID):
        return o
    return replace(o, objectives=o.objectives | _MEMBERS)


#: Every training option by name, in the command line's order.
OPTIONS: Mapping[str, Option] = MappingProxyType({o.name: _with_members(o) for o in _OPTION_LIST})

#: Evaluation settings: they reuse a trained head (``ablate`` varies them without retraining).
EVAL_OPTIONS: Mapping[str, Option] = MappingProxyType({o.name: o for o in (
    Option("k", 5.0, "Patch heads: exponent of the power pooling.", _SINGLE, minimum=0.0, minimum_open=True,
           when=lambda o: _pools_patches(o) and o.get("pooling", "power") == "power"),
    Option("pooling", "power", "Patch heads: patch scores to image score, (1/M) sum p^k, max, or mean.", _SINGLE,
           when=_pools_patches, kind="choice", choices=SCORE_POOLINGS, parse=_choice("pooling", SCORE_POOLINGS)),
    Option("method", "voc07", "AP: VOC 2007 11-point, VOC 2010+ interpolated area, or uninterpolated (sklearn).",
           _ALL, kind="choice", choices=("voc07", "all", "raw"), parse=_choice("method", ("voc07", "all", "raw"))),
)})


def defaults() -> dict:
    """Every training and evaluation option's default, by name."""
    return {o.name: o.default for o in (*OPTIONS.values(), *EVAL_OPTIONS.values())}


@functools.lru_cache(maxsize=1)
def _read_defaults() -> dict:
    """Every training option's default, read once (as given options are)."""
    return {n: o.read(o.default) for n, o in OPTIONS.items()}


def relevant(options: Mapping) -> set:
    """The names of the settings that shape a configuration's result (``objective`` included)."""
    return {o.name for o in (*OPTIONS.values(), *EVAL_OPTIONS.values()) if o.applies(options)}


# --------------------------------------------------------------------------- head kinds


#: Head kinds as stored in head files, and their estimators.
HEAD_KINDS: Mapping[str, str] = MappingProxyType({
    "mlp": "featurecache.heads.patch:MLPHead",
    "logreg": "featurecache.heads.patch:LogRegHead",
    "linearsvm": "featurecache.heads.patch:LinearSVMHead",
    "image-logreg": "featurecache.heads.image:ImageLogRegHead",
    "image-mlp": "featurecache.heads.image:ImageMLPHead",
    "mil": "featurecache.heads.mil:MILHead",
    "fusion": "featurecache.heads.fusion:FusionHead",
})


def _load(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def make_head(kind: str, **params):
    """An unfitted estimator of a head kind (:data:`HEAD_KINDS`) with parameters."""
    if kind not in HEAD_KINDS:
        raise HeadError(f"unknown head {kind!r}; choose one of {', '.join(HEAD_KINDS)}", param="head")
    try:
        return _load(HEAD_KINDS[kind])(**params)
    except TypeError as e:
        raise HeadError(f"head {kind}: {e}") from None


# --------------------------------------------------------------------------- objectives


def _describe_mil(s: Mapping, kind: str) -> str:
    line = (f"{s['objective']} head ({s.get('aggregation')} aggregation): {s.get('train_images', 0)} "
            f"training images, {s.get('epochs', 0)} epochs; {s.get('seconds', 0):.1f} s")
    if s.get("patch_weight"):
        line += (f"; patch loss weight {s.get('patch_weight', 0):g} on {s.get('train_patches', 0):,} "
                 f"patches (background {s.get('background', '')})")
    return line


def _describe_image(s: Mapping, kind: str) -> str:
    per_class = ", ".join(f"{k} {v}" for k, v in s.get("images_per_class", {}).items())
    return (f"{kind} head (objective image, pooling {'+'.join(s.get('image_pooling', []))}): "
            f"{s.get('train_images', 0)} training images; {s.get('seconds', 0):.1f} s; positive images: {per_class}")


def _describe_patch(s: Mapping, kind: str) -> str:
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


def _describe_fusion(s: Mapping, kind: str) -> str:
    return (f"fusion head ({' + '.join(s.get('members', []))}, {s.get('fusion_rule')}): {s.get('train_images', 0)} "
            f"training images; {s.get('seconds', 0):.1f} s")


@dataclass(frozen=True)
class Objective:
    """What a head learns from, and how it is trained and scored.

    Attributes
    ----------
    name : str
    kind : callable or None
        ``options -> head kind`` (:data:`HEAD_KINDS`); None for ``auto``, whose head is
        the chosen candidate's.
    trainer : str
        ``"module:function"`` of ``function(cache, config, *, kind, params) -> TrainedHead``.
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
    fuses : bool
        It averages the scores of other objectives' heads (its ``members``).
    scores : str
        What its image scores mean (``predict`` documents and prints it).
    probabilities : bool
        Its image scores are probabilities, so a threshold of 0.5 means "more likely than
        not"; ``predict`` uses that as its default threshold.
    describe : callable
        ``(summary, kind) -> one line`` after training.
    """

    name: str
    kind: Optional[Callable[[Mapping], str]]
    trainer: str
    pools_patches: bool
    patch_scores: bool
    needs_boxes: bool
    describe: Callable[[Mapping, str], str]
    fixed: Mapping = field(default_factory=dict)
    image_features: bool = False
    fuses: bool = False
    scores: str = ""
    probabilities: bool = False

    @property
    def options(self) -> tuple:
        """The names of its training options."""
        return tuple(o.name for o in OPTIONS.values() if self.name in o.objectives and o.name != "objective")

    def train(self, cache, config: "FitConfig"):
        """Train a head for this objective on a cache (see :func:`featurecache.train.fit_objective`)."""
        if self.kind is None:  # it chooses among other objectives, each with its own estimator
            check_options(config.all_options())
            return _load(self.trainer)(cache, config, kind=None, params={})
        kind, params = estimator_for(config.all_options(), params_given=config.params, random_state=config.random_state,
                                     device=config.device)
        return _load(self.trainer)(cache, config, kind=kind, params=params)


_OBJECTIVES = {
    "patch": Objective("patch", lambda o: o["head"], "featurecache.heads.patch:fit_patch_objective",
                       pools_patches=True, patch_scores=True, needs_boxes=True, describe=_describe_patch,
                       scores="the pooled patch score: (1/M) sum of the M patches' class probabilities to the "
                              "power k (k = 5), in [0, 1]; a ranking score, not a probability"),
    "image": Objective("image", lambda o: "image-" + o["image_head"], "featurecache.heads.image:fit_image_objective",
                       pools_patches=False, patch_scores=False, needs_boxes=False, describe=_describe_image,
                       image_features=True, probabilities=True,
                       scores="the probability that the class is in the image (per-class logistic output on "
                              "the pooled image features)"),
    "mil": Objective("mil", lambda o: "mil", "featurecache.heads.mil:fit_mil_objective", pools_patches=False,
                     patch_scores=True, needs_boxes=False, describe=_describe_mil,
                     fixed=MappingProxyType({"patch_weight": 0.0}), probabilities=True,
                     scores="the probability that the class is in the image (sigmoid of the trained "
                            "aggregation of the patches' class scores)"),
    "hybrid": Objective("hybrid", lambda o: "mil", "featurecache.heads.mil:fit_mil_objective", pools_patches=False,
                        patch_scores=True, needs_boxes=True, describe=_describe_mil, probabilities=True,
                        scores="the probability that the class is in the image (sigmoid of the trained "
                               "aggregation of the patches' class scores)"),
    "fusion": Objective("fusion", lambda o: "fusion", "featurecache.heads.fusion:fit_fusion_objective",
                        pools_patches=False, patch_scores=False, needs_boxes=False, describe=_describe_fusion,
                        fuses=True, scores="the mean of the members' scores, each standardised on the "
                                           "training images (0 = their mean); a ranking score, not a probability"),
    # auto trains candidates and keeps one: the head it returns has the chosen objective.
    "auto": Objective("auto", None, "featurecache.heads.auto:fit_auto_objective", pools_patches=False,
                      patch_scores=False, needs_boxes=False, describe=_describe_patch),
}

#: What ``fit --objective`` accepts.
OBJECTIVES = tuple(_OBJECTIVES)


def get_objective(name: str) -> Objective:
    """The :class:`Objective` of a name, or a :class:`HeadError` naming ``objective``."""
    try:
        return _OBJECTIVES[name]
    except (KeyError, TypeError):
        raise HeadError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}",
                        param="objective") from None


def option_of_param(objective: str, param: Optional[str]) -> Optional[str]:
    """The option of ``objective`` that sets estimator parameter ``param`` (``lr`` is ``image_lr`` for
    mil), so that an estimator's error names what the user sets; None when none does."""
    for opt in OPTIONS.values():
        if opt.param == param and objective in opt.objectives:
            return opt.name
    return None


def objective_of_kind(kind: str) -> str:
    """The objective of a head file written before heads recorded theirs (kinds map to one but ``mil``)."""
    return "image" if kind.startswith("image-") else kind if kind in ("mil", "fusion") else "patch"


def check_options(options: Mapping) -> dict:
    """Every option that applies to the configuration, read and checked (a :class:`HeadError` names a bad one)."""
    full = {**defaults(), **options}
    get_objective(full["objective"])
    for opt in OPTIONS.values():
        if opt.applies(full):
            full[opt.name] = opt.read(full[opt.name])
    return full


def estimator_for(options: Mapping, *, params_given: Optional[Mapping] = None, random_state: int = 0,
                  device: str = "auto") -> tuple:
    """``(head kind, estimator parameters)`` for a configuration's options (defaults filled in).

    ``params_given`` are estimator parameters that override those the options give (for
    parameters no option sets, such as ``MILHead(warmup_epochs=...)``).

    Raises
    ------
    HeadError
        Naming the option whose value is invalid.
    """
    full = check_options(options)
    objective = get_objective(full["objective"])
    params: dict = {}
    for opt in OPTIONS.values():
        if opt.param is not None and opt.applies(full):
            params.update(opt.param(full[opt.name]) if callable(opt.param) else {opt.param: full[opt.name]})
    params.update(objective.fixed)
    params_override = dict(params_given or {})
    params.update(params_override)
    if objective.name == "hybrid" and float(params["patch_weight"]) <= 0:
        raise HeadError("objective hybrid needs a positive patch weight", param="patch_weight")
    kind = objective.kind(full)
    estimator = _load(HEAD_KINDS[kind])
    accepted = estimator._get_param_names()
    params.setdefault("random_state", random_state)
    if "device" in accepted:
        params.setdefault("device", device)
    unknown = sorted(set(params_override) - set(accepted))
    if unknown:
        raise HeadError(f"{kind} head has no parameter(s) {', '.join(unknown)}", param="params")
    return kind, {k: v for k, v in params.items() if k in accepted}


# --------------------------------------------------------------------------- a fit's configuration


@dataclass(frozen=True)
class FitConfig:
    """Everything one training of stage two needs besides the cache.

    Attributes
    ----------
    objective : str
        Default :data:`DEFAULT_OBJECTIVE`.
    options : mapping
        Training options by name (:data:`OPTIONS`); missing ones take their defaults.
    train_split : str, optional
        Train on the images of this split only.
    val : path or cache, optional
        ``patch``: validation data for the MLP's schedule and early stopping.
    val_split : str, optional
        ``patch``: the split of ``val`` (or of the training cache) to validate on.
    memory_limit : int, optional
        Bytes of training features to hold in memory; above it torch heads stream from HDF5.
    device : str
    random_state : int
    params : mapping
        Estimator parameters over those the options give (see :func:`estimator_for`).
    progress : bool, optional
        A progress bar where training runs many fits (``auto``); default only on a terminal.
    threads : int, optional
        CPU threads of training (:func:`featurecache.resources.cpu_threads`).
    """

    objective: str = DEFAULT_OBJECTIVE
    options: Mapping = field(default_factory=dict)
    train_split: Optional[str] = None
    val: Any = None
    val_split: Optional[str] = None
    memory_limit: Optional[int] = None
    device: str = "auto"
    random_state: int = 0
    params: Mapping = field(default_factory=dict)
    progress: Optional[bool] = None
    threads: Optional[int] = None

    def __post_init__(self) -> None:
        objective = get_objective(self.objective)
        known = [n for n, o in OPTIONS.items() if o.grid and n != "objective"]
        unknown = sorted(set(self.options) - set(known))
        if unknown:
            raise HeadError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(known)}", param="options")
        if (self.val is not None or self.val_split is not None) and "val_split" not in objective.options:
            raise HeadError(f"objective {self.objective}: validation data are only used by the patch objective (the "
                            "image-level objectives hold out training images themselves)", param="val_split")
        options = {n: OPTIONS[n].read(v) for n, v in self.options.items()}
        object.__setattr__(self, "options", MappingProxyType(options))
        limit = self.memory_limit
        if limit is not None and not integer_at_least(limit, 0):
            raise HeadError(f"must be a number of bytes (0: always stream from the file), got {limit!r}",
                            param="memory_limit")
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    def all_options(self) -> dict:
        """Every training option's value (read, as :meth:`Option.read` gives it): the given ones over the defaults."""
        return {**_read_defaults(), **self.options, "objective": self.objective}

    def option(self, name: str):
        return self.all_options()[name]
