"""The options of stage two: one table of every training and evaluation setting, and how values are read.

Everything that differs between options is read from :data:`_OPTION_LIST`: the command line
builds ``fit``'s options and ``ablate --grid``'s help from :data:`OPTIONS`, ``ablate`` asks
which settings shape a configuration (:func:`relevant`), and
:func:`featurecache.heads.registry.estimator_for` turns options into estimator parameters.
Which objectives an option belongs to is said with the objective names of
:mod:`featurecache.heads.objectives`. No torch is imported.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Sequence

import featurecache.heads.objectives as table
from featurecache.errors import HeadError
from featurecache.heads.background import BackgroundPolicy
from featurecache.heads.pooling import DEFAULT_POWER, SCORE_POOLINGS, check_image_pooling
from featurecache.metrics import METHODS

__all__ = ["AGGREGATIONS", "ATTENTION_BRANCHES", "DEFAULT_CANDIDATES", "DEFAULT_MEMBERS", "EVAL_OPTIONS",
           "FUSION_RULES", "HALVINGS", "LBFGS_WINDOW", "MAX_AGGREGATION_PARAMETER", "OPTIONS", "SOLVERS", "Option",
           "OptionScopeError", "check_options", "defaults", "is_fusion", "options_of", "parse_aggregation",
           "parse_member", "read_defaults", "relevant", "scope_error"]

#: MIL aggregations of patch logits into an image logit.
AGGREGATIONS = ("lse", "max", "power")

#: Optimisers of the mil/hybrid scorer (:class:`featurecache.heads.bags.BagTrainer`'s ``solver``).
SOLVERS = ("lbfgs", "adam")

#: How ``auto`` drops candidates clearly behind after each fold but the last (``cv_halving``).
HALVINGS = ("interval", "none")

#: Iterations over which the L-BFGS solver measures the relative fall of its loss (``image_tol``).
LBFGS_WINDOW = 5

#: Attention branches of the ``attention`` objective: one per class, or one shared by the classes.
ATTENTION_BRANCHES = ("per-class", "shared")


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
        v = float(value) if value else (2.0 if name == "lse" else DEFAULT_POWER)
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

#: What ``fusion`` averages unless told otherwise: the coarsest-scale image probe and the box-aided patch scorer.
DEFAULT_MEMBERS = ("image:coarse", "hybrid")

#: Score fusions: standardised log-odds averaged (``zscore``), or ranks averaged (``rank``).
FUSION_RULES = ("zscore", "rank")


def is_fusion(name: str) -> bool:
    """Whether a member or candidate name is a fusion (of the ``members``)."""
    return table.get_objective(parse_member(name)[0]).fuses


def _variant_form(objective: str) -> str:
    """``[:POOLING]`` for ``image``, ``[:HIDDEN]`` for ``patch``, '' for an objective without a variant."""
    option = table.get_objective(objective).variant
    return f"[:{option.split('_')[-1].upper()}]" if option else ""


def parse_member(text: str) -> tuple:
    """``"image:coarse"`` -> ``("image", {"image_pooling": "coarse"})``; ``"mil"`` -> ``("mil", {})``.

    A fusion member or an ``auto`` candidate: an objective, and after a colon the value of its
    objective's ``variant`` option: the pooling of ``image`` (``image:mean+max``) or the hidden
    widths of the ``patch`` MLP (``patch:0``, FCb only). ``fusion`` is a candidate only (a
    fusion does not fuse fusions).
    """
    name, _, variant = str(text).strip().partition(":")
    if name not in table.MEMBER_OBJECTIVES:
        forms = [n + _variant_form(n) for n in table.MEMBER_OBJECTIVES]
        raise HeadError(f"unknown member {text!r} ({', '.join(forms)})", param="members")
    if not variant:
        return name, {}
    option = table.get_objective(name).variant
    if option is None:
        raise HeadError(f"{name} takes no ':' variant, got {text!r}", param="members")
    return name, {option: OPTIONS[option].parse(variant)}


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




_ALL, _SINGLE = frozenset(table.OBJECTIVES), frozenset(table.SINGLE_OBJECTIVES)
# Members of a fusion and candidates of auto are trained with the options of their own objectives.
_MEMBERS = frozenset(table.COMBINING_OBJECTIVES)
_PATCH, _IMAGE, _MIL, _HYBRID = frozenset({"patch"}), frozenset({"image"}), frozenset({"mil"}), frozenset({"hybrid"})
_ATTENTION = frozenset({"attention"})
_FUSION, _AUTO = frozenset({"fusion"}), frozenset({"auto"})
#: ``fit --objective``'s choices: the default first.
_OBJECTIVE_CHOICES = (table.DEFAULT_OBJECTIVE, *(o for o in table.OBJECTIVES if o != table.DEFAULT_OBJECTIVE))
_PATCH_HEADS, _IMAGE_HEADS = table.get_objective("patch").head_choices(), table.get_objective("image").head_choices()


def _member_options(options: Mapping) -> list:
    """``(options, names the member fixes)`` of a fusion's members, or of auto's candidates (and fusion members)."""
    names = list(_member_list(options.get("members", OPTIONS["members"].default)))
    if table.get_objective(options.get("objective")).chooses:
        candidates = _candidates(options)
        names = list(candidates) + (names if any(map(is_fusion, candidates)) else [])
    out = []
    for name in names:
        objective, overrides = parse_member(name)
        if not table.get_objective(objective).fuses:
            out.append(({**options, "objective": objective, **overrides}, set(overrides)))
    return out


def _candidates(options: Mapping) -> tuple:
    return _member_list(options.get("candidates", OPTIONS["candidates"].default), "candidates")


def _mlp(o: Mapping) -> bool:
    return o.get("head") == "mlp"


def _trainer(o: Mapping) -> bool:
    """The torch image-label trainers: ImageMLPHead (image objective, mlp head) and MILHead."""
    return o.get("objective") != "image" or o.get("image_head") == "mlp"


def _lbfgs(o: Mapping) -> bool:
    """MILHead's linear scorer with ``image_solver=lbfgs`` (an MLP scorer trains with Adam)."""
    return o.get("objective") in ("mil", "hybrid") and o.get("image_solver", "lbfgs") == "lbfgs" \
        and not int(o.get("image_hidden", 0) or 0)


def _adam(o: Mapping) -> bool:
    """The trainers that step with Adam: ImageMLPHead, MILHead with an MLP scorer or ``image_solver=adam``."""
    return _trainer(o) and not _lbfgs(o)

def _patch_loss(o: Mapping) -> bool:
    """The background options weight a patch loss: always for patch and hybrid, for attention with one."""
    return o.get("objective") != "attention" or float(o.get("attention_patch_weight") or 0) > 0


def _c_applies(o: Mapping) -> bool:
    return o.get("head") != "mlp" if o.get("objective") == "patch" else o.get("image_head") == "logreg"


def _pools_patches(o: Mapping) -> bool:
    return table.get_objective(o.get("objective", table.DEFAULT_OBJECTIVE)).pools_patches


_OPTION_LIST = (
    Option("objective", table.DEFAULT_OBJECTIVE,
           "auto: cross-validate the candidates (--candidates) on the training images and keep the best; patch: "
           "a patch classifier on box-derived patch labels (the paper's); image: each image's pooled patch features "
           "-> a per-class image head on its labels; mil: a patch scorer trained through an image-level aggregation "
           "on image labels; hybrid: mil plus a weighted patch loss on box labels; attention: gated attention pooling "
           "of the patch features (Ilse et al. 2018) on image labels; fusion: the averaged, standardised image scores "
           "of --members. image, mil and attention need no boxes. Options below apply to the "
           "objectives they name (and to the members and candidates of fusion and auto).",
           _ALL, kind="choice", choices=_OBJECTIVE_CHOICES, parse=_choice("objective", _OBJECTIVE_CHOICES)),
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
           _PATCH | _HYBRID | _ATTENTION, when=_patch_loss, parse=_background_value, kind="text"),
    Option("background_weight", None, "Weight of a background patch [default: balance background and objects].",
           _PATCH | _HYBRID | _ATTENTION, when=_patch_loss, parse=_optional_float, minimum=0.0, minimum_open=True),
    Option("image_pooling", "mean",
           "image objective: mean, max, scales (per-scale means) and/or coarse, comma-separated.",
           _IMAGE, param=lambda v: {"pooling": tuple(str(v).split("+"))}, parse=_pooling_value, kind="text"),
    Option("image_head", "logreg", "image objective: one-vs-rest logistic regression (--C) or a sigmoid MLP.",
           _IMAGE, kind="choice", choices=_IMAGE_HEADS, parse=_choice("image_head", _IMAGE_HEADS)),
    Option("aggregation", f"power:{DEFAULT_POWER:g}",
           "mil/hybrid: lse[:r] (log-sum-exp, temperature r), max, or power[:k] of patch scores.",
           _MIL | _HYBRID, param=_aggregation_params, parse=_aggregation_value, kind="text",
           aliases=("--mil-aggregation",)),
    Option("patch_weight", 0.3, "hybrid: weight of the patch loss (0.3 measured better than 1 at the other defaults).",
           _HYBRID, param="patch_weight", minimum=0.0),
    Option("attention", ATTENTION_BRANCHES[0], "attention: one gated attention branch per class, or one shared "
           "by the classes.", _ATTENTION, param="attention", kind="choice", choices=ATTENTION_BRANCHES,
           parse=_choice("attention", ATTENTION_BRANCHES)),
    Option("attention_dim", 32, "attention: width of the gated attention network.", _ATTENTION,
           param="attention_dim", parse=int, kind="int", minimum=1),
    Option("attention_dropout", 0.25, "attention: dropout on the patch features while training.", _ATTENTION,
           param="dropout", minimum=0.0, maximum=1.0, maximum_open=True),
    Option("attention_patch_weight", 0.0, "attention: weight of a patch loss on box labels (0: image labels only; "
           "hybrid's --patch-weight defaults to 0.3).", _ATTENTION, param="patch_weight", minimum=0.0),
    Option("image_hidden", 0, "image (mlp head), mil, hybrid: hidden width of the scorer (0: linear).",
           _IMAGE | _MIL | _HYBRID, param="hidden", when=_trainer, parse=int, kind="int", minimum=0),
    Option("image_lr", 0.01, "image (mlp head), mil, hybrid, attention: Adam learning rate.",
           _IMAGE | _MIL | _HYBRID | _ATTENTION, param="lr", when=_adam, minimum=0.0, minimum_open=True),
    Option("image_weight_decay", 1e-4, "image (mlp head), mil, hybrid, attention: L2 penalty.",
           _IMAGE | _MIL | _HYBRID | _ATTENTION, param="weight_decay", when=_trainer, minimum=0.0),
    Option("image_epochs", 200, "image (mlp head), mil, hybrid, attention: epochs (Adam), or the cap on passes "
           "over the bags (L-BFGS).", _IMAGE | _MIL | _HYBRID | _ATTENTION, param="max_epochs", when=_trainer,
           parse=int, kind="int", minimum=1),
    Option("image_solver", "lbfgs",
           "mil, hybrid: lbfgs (full-batch L-BFGS on the linear scorer until the loss plateaus, --image-tol; an MLP "
           "scorer trains with Adam) or adam (mini-batches of 16 images for --image-epochs epochs at --image-lr: the "
           "previous default, several times slower at the same mAP; docs/performance.md).",
           _MIL | _HYBRID, param="solver", kind="choice", choices=SOLVERS, parse=_choice("image_solver", SOLVERS)),
    Option("image_tol", 3e-3,
           "mil, hybrid (lbfgs): stop when the training loss fell by less than this fraction over the last "
           f"{LBFGS_WINDOW} iterations (0: run to --image-epochs passes or until it stops changing).",
           _MIL | _HYBRID, param="tol", when=_lbfgs, minimum=0.0),
    Option("members", ",".join(DEFAULT_MEMBERS),
           "fusion (and auto's fusion candidate): the objectives whose image scores are averaged, comma-separated; "
           "image:POOLING picks the image objective's pooling. Members that need boxes are replaced by mil on data "
           "without boxes.", _MEMBERS, param=lambda v: {"members": tuple(v)}, parse=_member_list, kind="text",
           when=lambda o: table.get_objective(o["objective"]).fuses or any(map(is_fusion, _candidates(o)))),
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
    Option("cv_halving", "interval",
           "auto: interval (every candidate on the first fold; after each fold but the last, those whose 90% "
           "paired bootstrap interval of the difference in mean fold mAP to the best, over the held-out images of "
           "the folds so far, lies below zero run on no further fold) or none (every candidate on every fold).",
           _AUTO, kind="choice", choices=HALVINGS,
           parse=_choice("cv_halving", HALVINGS)),
    Option("cv_tol", 0.01,
           "auto: the --image-tol of the mil/hybrid fits inside cross-validation, which only rank the candidates "
           "(never tighter than --image-tol; 0: --image-tol, the previous behaviour). The chosen candidate's refit "
           "on all training images uses --image-tol.", _AUTO, minimum=0.0),
    Option("cv_epochs", 20,
           "auto: the cap on the patch MLP's epochs (--epochs) inside cross-validation (never above --epochs; 0: "
           "--epochs, the previous behaviour). The chosen candidate's refit uses --epochs.", _AUTO, parse=int,
           kind="int", minimum=0),
    Option("val", None, "patch: validation cache (early stopping for the MLP).", _PATCH, kind="path", grid=False,
           parse=_text),
    Option("val_split", None, "patch: validate on this split (of --val, or of CACHE).", _PATCH, kind="text",
           grid=False, parse=_text),
)



def _with_members(o: Option) -> Option:
    """A single objective's option also belongs to fusion and auto, whose members train with it."""
    if o.name in ("objective", "val", "val_split") or not o.objectives & _SINGLE:
        return o
    return replace(o, objectives=o.objectives | _MEMBERS)


#: Every training option by name, in the command line's order.
OPTIONS: Mapping[str, Option] = MappingProxyType({o.name: _with_members(o) for o in _OPTION_LIST})

#: Evaluation settings: they reuse a trained head (``ablate`` varies them without retraining).
EVAL_OPTIONS: Mapping[str, Option] = MappingProxyType({o.name: o for o in (
    Option("k", DEFAULT_POWER, "Patch heads: exponent of the power pooling.", _SINGLE, minimum=0.0, minimum_open=True,
           when=lambda o: _pools_patches(o) and o.get("pooling", "power") == "power"),
    Option("pooling", "power", "Patch heads: patch scores to image score, (1/M) sum p^k, max, or mean.", _SINGLE,
           when=_pools_patches, kind="choice", choices=SCORE_POOLINGS, parse=_choice("pooling", SCORE_POOLINGS)),
    Option("method", "voc07", "AP: VOC 2007 11-point, VOC 2010+ interpolated area, or uninterpolated (sklearn).",
           _ALL, kind="choice", choices=METHODS, parse=_choice("method", METHODS)),
)})


def defaults() -> dict:
    """Every training and evaluation option's default, by name."""
    return {o.name: o.default for o in (*OPTIONS.values(), *EVAL_OPTIONS.values())}


@functools.lru_cache(maxsize=1)
def read_defaults() -> dict:
    """Every training option's default, read once (as given options are)."""
    return {n: o.read(o.default) for n, o in OPTIONS.items()}


def relevant(options: Mapping) -> set:
    """The names of the settings that shape a configuration's result (``objective`` included)."""
    return {o.name for o in (*OPTIONS.values(), *EVAL_OPTIONS.values()) if o.applies(options)}


def check_options(options: Mapping) -> dict:
    """Every option that applies to the configuration, read and checked (a :class:`HeadError` names a bad one)."""
    full = {**defaults(), **options}
    table.get_objective(full["objective"])
    for opt in OPTIONS.values():
        if opt.applies(full):
            full[opt.name] = opt.read(full[opt.name])
    return full



def options_of(objective: str) -> tuple:
    """The names of an objective's training options (``objective`` left out), in :data:`OPTIONS`' order."""
    return tuple(o.name for o in OPTIONS.values() if objective in o.objectives and o.name != "objective")


class OptionScopeError(HeadError):
    """Options given for an objective they do not belong to (``param``: the first of them).

    Attributes
    ----------
    options : tuple of str
        Every such option, in :data:`OPTIONS`' order.
    objective : str
    owners : tuple of str
        The objectives all of them belong to (``fit --objective``'s order).
    """

    def __init__(self, message: str, *, options: tuple, objective: str, owners: tuple,
                 param: Optional[str] = None) -> None:
        super().__init__(message, param=param or options[0])
        self.options, self.objective, self.owners = tuple(options), objective, tuple(owners)


def scope_error(objective: str, given) -> Optional[OptionScopeError]:
    """The error for the names in ``given`` that are not options of ``objective``; None when all are."""
    accepted = options_of(objective)
    stray = tuple(n for n in OPTIONS if n in given and n not in accepted)
    if not stray:
        return None
    owners = tuple(o for o in _OBJECTIVE_CHOICES if all(n in options_of(o) for n in stray))
    where = " or ".join(owners)
    if set(stray) <= {"val", "val_split"}:
        return OptionScopeError(f"objective {objective}: validation data are only used by the {where} objective (the "
                                "image-level objectives hold out training images themselves)", options=stray,
                                objective=objective, owners=owners, param="val_split")
    others = f" (nor do {', '.join(stray[1:])})" if len(stray) > 1 else ""
    return OptionScopeError(f"does not apply to objective {objective}{others}"
                            + (f"; an option of {where}" if owners else ""), options=stray, objective=objective,
                            owners=owners)
