"""Stage two's registry: estimators made from options, the configuration of a fit, and what every head is.

The objectives are :mod:`featurecache.heads.objectives`' one table, the options
:mod:`featurecache.heads.options`' (both re-exported here); this module turns them into
estimators (:func:`make_head`, :func:`estimator_for`), trains an objective
(:func:`train_objective`), holds :class:`FitConfig`, and states :class:`HeadEstimator`, the
protocol every head kind's estimator satisfies. Estimators and trainers are imported on first
use, so this module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Optional, Protocol, runtime_checkable

from featurecache.errors import HeadError, integer_at_least
from featurecache.heads.objectives import (
    COMBINING_OBJECTIVES,
    DEFAULT_OBJECTIVE,
    HEAD_KINDS,
    MEMBER_OBJECTIVES,
    OBJECTIVES,
    SINGLE_OBJECTIVES,
    HeadKind,
    Objective,
    get_objective,
    load,
    objective_of_kind,
)
from featurecache.heads.options import (
    AGGREGATIONS,
    DEFAULT_CANDIDATES,
    EVAL_OPTIONS,
    FUSION_RULES,
    OPTIONS,
    Option,
    OptionScopeError,
    check_options,
    defaults,
    is_fusion,
    options_of,
    parse_aggregation,
    parse_member,
    read_defaults,
    relevant,
    scope_error,
)

__all__ = ["AGGREGATIONS", "COMBINING_OBJECTIVES", "DEFAULT_CANDIDATES", "DEFAULT_OBJECTIVE", "EVAL_OPTIONS",
           "FUSION_RULES", "FitConfig", "HEAD_KINDS", "HeadEstimator", "HeadKind", "MEMBER_OBJECTIVES", "OBJECTIVES",
           "OPTIONS", "Objective", "Option", "OptionScopeError", "SINGLE_OBJECTIVES", "check_options", "defaults",
           "estimator_for", "get_objective", "is_fusion", "make_head", "objective_of_kind", "option_of_param",
           "options_of", "parse_aggregation", "parse_member", "relevant", "train_objective"]


@runtime_checkable
class HeadEstimator(Protocol):
    """What every head kind's estimator is (:data:`HEAD_KINDS`): scikit-learn's parameters, and its
    fitted state as plain tensors for the head file (:mod:`featurecache.heads.headfile`).

    How it scores is its objective's business (:class:`featurecache.heads.trained.TrainedHead`
    asks the objective): patch classifiers give ``predict_proba``, image-level heads
    ``score_images``, and so on.
    """

    def get_params(self, deep: bool = True) -> dict:
        ...

    def set_params(self, **params) -> Any:
        ...

    def _state(self) -> dict:
        ...

    def _restore(self, state: dict, n_features: int, n_outputs: int, *, device: str = "auto") -> None:
        ...


def make_head(kind: str, **params) -> HeadEstimator:
    """An unfitted estimator of a head kind (:data:`HEAD_KINDS`) with parameters."""
    if kind not in HEAD_KINDS:
        raise HeadError(f"unknown head {kind!r}; choose one of {', '.join(HEAD_KINDS)}", param="head")
    try:
        return load(HEAD_KINDS[kind])(**params)
    except TypeError as e:
        raise HeadError(f"head {kind}: {e}") from None


def option_of_param(objective: str, param: Optional[str]) -> Optional[str]:
    """The option of ``objective`` that sets estimator parameter ``param`` (``lr`` is ``image_lr`` for
    mil), so that an estimator's error names what the user sets; None when none does."""
    for opt in OPTIONS.values():
        if opt.param == param and objective in opt.objectives:
            return opt.name
    return None


def train_objective(cache, config: "FitConfig"):
    """Train a head for ``config``'s objective on a cache with its trainer (see
    :func:`featurecache.train.fit_objective`, which also names the user's option in errors)."""
    objective = get_objective(config.objective)
    if objective.chooses:  # it chooses among other objectives, each with its own estimator
        check_options(config.all_options())
        return load(objective.trainer)(cache, config, kind=None, params={})
    kind, params = estimator_for(config.all_options(), params_given=config.params, random_state=config.random_state,
                                 device=config.device)
    return load(objective.trainer)(cache, config, kind=kind, params=params)


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
    for name in objective.positive:
        if float(params[name]) <= 0:
            raise HeadError(f"objective {objective.name} needs a positive {name.replace('_', ' ')}", param=name)
    kind = objective.kind(full)
    estimator = load(HEAD_KINDS[kind])
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
        Training options by name (:data:`OPTIONS`); missing ones take their defaults. An option of
        another objective is refused (:class:`OptionScopeError`, naming it), as are ``val`` and
        ``val_split`` for an objective that uses no validation data.
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
        given = {*self.options, *(n for n in ("val", "val_split") if getattr(self, n) is not None)}
        stray = scope_error(objective.name, given)
        if stray is not None:  # an option of another objective is refused, never silently dropped
            raise stray
        options = {n: OPTIONS[n].read(v) for n, v in self.options.items()}
        object.__setattr__(self, "options", MappingProxyType(options))
        limit = self.memory_limit
        if limit is not None and not integer_at_least(limit, 0):
            raise HeadError(f"must be a number of bytes (0: always stream from the file), got {limit!r}",
                            param="memory_limit")
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    def all_options(self) -> dict:
        """Every training option's value (read, as :meth:`Option.read` gives it): the given ones over the defaults."""
        return {**read_defaults(), **self.options, "objective": self.objective}

    def option(self, name: str):
        return self.all_options()[name]
