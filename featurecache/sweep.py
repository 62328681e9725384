"""Sweeps of stage-two settings: grids read from the command line and TOML files, and their combinations.

A grid maps settings (:data:`DEFAULTS`: every option of :mod:`featurecache.heads.options`
that a grid may vary, training and evaluation ones) to lists of values. ``image_pooling=whole``
is the sweep's own value: the whole-image probe. :func:`configurations` expands a grid into
the training configurations and evaluation settings :func:`featurecache.ablate.ablate` runs,
each once: a setting that does not apply to a configuration (:func:`canonical`) neither
multiplies runs nor shows a value.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Sequence, Union

from featurecache.errors import AblationError, HeadError
from featurecache.heads.registry import EVAL_OPTIONS, OPTIONS, defaults, get_objective, relevant

__all__ = ["DEFAULTS", "EVAL_KEYS", "MAX_CONFIGURATIONS", "TRAIN_KEYS", "WHOLE", "canonical", "check_grid",
           "configurations", "grid_settings", "is_probe", "parse_grid", "read_sweep_file", "show"]

_GRID_OPTIONS = {n: o for n, o in {**OPTIONS, **EVAL_OPTIONS}.items() if o.grid}

#: Defaults of every setting a grid may vary: the registry's, except that ablations compare
#: against the paper's objective unless told otherwise.
DEFAULTS = {**{n: v for n, v in defaults().items() if n in _GRID_OPTIONS}, "objective": "patch"}
EVAL_KEYS = tuple(EVAL_OPTIONS)
TRAIN_KEYS = tuple(k for k in DEFAULTS if k not in EVAL_KEYS)
#: ``image_pooling=whole``: the whole-image probe (an image head on a ``--whole-image`` cache).
WHOLE = "whole"

#: Most combinations a grid may have (counted before any is built); a larger sweep is a mistake
#: or a job for several runs.
MAX_CONFIGURATIONS = 10_000


def _read(key: str, text: str):
    """A grid value: ``image_pooling=whole`` is ablate's own (the probe); the rest are the registry's."""
    text = text.strip()
    if key == "image_pooling" and text == WHOLE:
        return text
    try:
        return _GRID_OPTIONS[key].read(text)
    except HeadError as e:
        raise AblationError(f"{key}: {e.message}", param="grid") from None


def is_probe(cfg: dict) -> bool:
    """Whether a configuration is the whole-image probe (an image head on a ``--whole-image`` cache)."""
    return cfg.get("image_pooling") == WHOLE and get_objective(cfg["objective"]).image_features


def check_grid(grid: dict) -> dict:
    """A grid given as data: known settings, values read as :func:`parse_grid` reads them."""
    out = {}
    for key, values in grid.items():
        if key not in DEFAULTS:
            raise AblationError(f"unknown setting {key!r}; known: {', '.join(DEFAULTS)}", param="grid")
        out[key] = [v if isinstance(v, tuple) else _read(key, str(v)) for v in values]
    return out


def parse_grid(items: Sequence[str]) -> dict:
    """``["hidden=0,512,2048+2048", "background=weight,sample:0.1"]`` -> ``{"hidden": [0, 512, (2048, 2048)], ...}``."""
    grid: dict = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values.strip():
            raise AblationError(f"expects KEY=V1,V2,..., got {item!r}", param="grid")
        if key not in DEFAULTS:
            raise AblationError(f"unknown setting {key!r}; known: {', '.join(DEFAULTS)}", param="grid")
        grid[key] = [_read(key, v) for v in values.split(",")]
    return grid


#: The ``[options]`` a sweep file may set, with their types (ranges are :func:`ablate`'s).
_SWEEP_OPTIONS = {"seeds": int, "folds": int, "val_split": str, "train_split": str, "whole_image": str}


def read_sweep_file(path: Union[str, Path]) -> tuple:
    """Read a TOML sweep: ``[grid]`` (setting = list of values) and optional ``[options]``.

    Returns
    -------
    grid : dict
    options : dict
        ``seeds``, ``folds``, ``val_split``, ``train_split``, ``whole_image`` if given.
    """
    try:
        import tomllib
    except ImportError:  # pragma: no cover - Python < 3.11
        import tomli as tomllib  # type: ignore[no-redef]
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise AblationError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise AblationError(f"{path}: not UTF-8 text (TOML is UTF-8)") from None
    except (tomllib.TOMLDecodeError, RecursionError) as e:
        raise AblationError(f"{path}: invalid TOML ({str(e)[:160] or 'nested too deep'})") from None
    raw = data.get("grid", {})
    if not isinstance(raw, dict) or not raw:
        raise AblationError(f"{path}: needs a [grid] table of setting = [values]")
    grid = {}
    for key, values in raw.items():
        if key not in DEFAULTS:
            raise AblationError(f"{path}: unknown setting {key!r}; known: {', '.join(DEFAULTS)}")
        values = values if isinstance(values, list) else [values]
        if not values:
            raise AblationError(f"{path}: {key} = [] gives no value to try; give at least one")
        # A list value (hidden = [[2048, 2048]]) is read as the command line reads 2048+2048.
        grid[key] = [_read(key, "+".join(map(str, v)) if isinstance(v, list) else str(v)) for v in values]
    options = data.get("options", {})
    if not isinstance(options, dict):
        raise AblationError(f"{path}: [options] must be a table")
    unknown = set(options) - set(_SWEEP_OPTIONS)
    if unknown:
        raise AblationError(f"{path}: unknown option(s) {', '.join(sorted(unknown))}")
    for key, value in options.items():
        kind = _SWEEP_OPTIONS[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise AblationError(f"{path}: option {key} must be {'an integer' if kind is int else 'a string'}, "
                                f"got {value!r}")
    return grid, options


def show(v) -> str:
    """A setting's value as tables and JSON show it (``2048+2048``, ``5``, ``balanced``)."""
    if isinstance(v, tuple):
        return "+".join(str(x) for x in v)
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return "balanced" if v is None else str(v)


def configurations(settings: dict) -> tuple:
    """``(training configurations, evaluation settings)``: the grid's combinations, each once."""
    eval_cfgs = []
    for c in itertools.product(*(settings[k] for k in EVAL_KEYS)):
        e = dict(zip(EVAL_KEYS, c))
        if e["pooling"] != "power":  # k only shapes the power mean
            e["k"] = settings["k"][0]
        if e not in eval_cfgs:
            eval_cfgs.append(e)
    # Settings that do not apply to a configuration (hidden for logreg, C for the MLP, patch
    # settings for image objectives) would repeat runs.
    unique, seen = [], set()
    for c in itertools.product(*(settings[k] for k in TRAIN_KEYS)):
        cfg = dict(zip(TRAIN_KEYS, c))
        if cfg["image_pooling"] == WHOLE and not is_probe(cfg):  # the whole-image probe is an image head only
            cfg["image_pooling"] = DEFAULTS["image_pooling"]
        key = canonical({**cfg, **eval_cfgs[0]})
        if key not in seen:
            seen.add(key)
            unique.append(cfg)
    return unique, eval_cfgs


def canonical(cfg: dict) -> str:
    """A configuration's key: the settings that shape its result, shown (the same for runs that differ
    only in settings that do not apply)."""
    keep = relevant(cfg)
    return json.dumps({k: show(v) for k, v in sorted(cfg.items()) if k in keep})

def grid_settings(grid: dict, *, whole_image: bool) -> dict:
    """Every grid setting's values: the grid's, else its default; refused when ``image_pooling=whole`` has
    no whole-image cache or there are more than :data:`MAX_CONFIGURATIONS` combinations."""
    settings = {k: grid.get(k, [DEFAULTS[k]]) for k in DEFAULTS}
    if WHOLE in settings["image_pooling"] and not whole_image:
        raise AblationError("image_pooling=whole needs a whole-image cache of the same images (--whole-image FILE)")
    combinations = math.prod(len(v) for v in settings.values())
    if combinations > MAX_CONFIGURATIONS:
        raise AblationError(f"the grid has {combinations:,} combinations, more than the {MAX_CONFIGURATIONS:,} one "
                            "ablation runs; split the sweep", param="grid")
    return settings
