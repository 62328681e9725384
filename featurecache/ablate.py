"""Head-only ablations: many head settings and objectives on one cache, features loaded once.

Settings are of two kinds. *Training* settings each need a trained head: the ``objective``
(``patch``, ``image``, ``mil``, ``hybrid``; see :mod:`featurecache.objectives`) and that
objective's settings — ``head``, ``hidden``, ``dropout``, ``lr``, ``weight_decay``,
``batch_size``, ``epochs``, ``C``, ``background``, ``background_weight`` for the patch
objective; ``image_pooling``, ``image_head`` and ``C`` for ``image``; ``aggregation``,
``image_hidden``, ``image_lr``, ``image_weight_decay``, ``image_epochs`` (and, for
``hybrid``, ``patch_weight`` and the background settings) for the image-label trainers.
*Evaluation* settings (``k``, ``pooling``, ``method``) reuse a trained patch head's scores.
A setting that does not apply to a configuration's objective or head neither multiplies
runs nor shows a value. Every combination is run for every seed and, with ``folds``, in
K-fold cross-validation over images (an image's patches are never on both sides).

``image_pooling=whole`` (with ``whole_image=``, a ``--whole-image`` cache of the same
images) is the whole-image one-vs-rest probe, measured on the same folds in the same run.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from featurecache.cache import FeatureCache
from featurecache.errors import FeaturecacheError
from featurecache.evaluate import METHODS, POOLINGS, report_from_arrays, report_from_image_scores
from featurecache.heads import (
    ArraySource,
    BackgroundPolicy,
    TrainedHead,
    background_weights,
    fit_estimator,
    make_head,
)

logger = logging.getLogger(__name__)

__all__ = ["AblationError", "AblationResult", "AblationRow", "TRAIN_KEYS", "EVAL_KEYS", "ablate", "parse_grid",
           "read_sweep_file"]

#: Defaults of every setting a grid may vary.
DEFAULTS = {
    "objective": "patch",
    "head": "mlp", "hidden": 2048, "dropout": 0.5, "lr": 0.01, "weight_decay": 5e-4, "batch_size": 256,
    "epochs": 60, "C": 1.0, "background": "weight", "background_weight": None,
    "image_pooling": "mean", "image_head": "logreg", "aggregation": "power:5", "patch_weight": 0.3,
    "image_hidden": 0, "image_lr": 0.01, "image_weight_decay": 1e-4, "image_epochs": 200,
    "k": 5.0, "pooling": "power", "method": "voc07",
}
EVAL_KEYS = ("k", "pooling", "method")
TRAIN_KEYS = tuple(k for k in DEFAULTS if k not in EVAL_KEYS)
_MLP_ONLY = ("hidden", "dropout", "lr", "weight_decay", "batch_size", "epochs")
_TRAINER = ("image_hidden", "image_lr", "image_weight_decay", "image_epochs")
_WHOLE = "whole"


def _relevant(cfg: dict) -> set:
    """The settings that shape a configuration's result (the others are shown as '-')."""
    obj = cfg.get("objective", "patch")
    keys = {"objective", "method"}
    if obj == "patch":
        keys |= {"head", "background", "background_weight", "pooling"}
        keys |= set(_MLP_ONLY) if cfg.get("head") == "mlp" else {"C"}
        if cfg.get("pooling", "power") == "power":
            keys.add("k")
    elif obj == "image":
        keys |= {"image_pooling", "image_head"}
        keys |= {"C"} if cfg.get("image_head") == "logreg" else set(_TRAINER)
    else:
        keys |= {"aggregation"} | set(_TRAINER)
        if obj == "hybrid":
            keys |= {"patch_weight", "background", "background_weight"}
    return keys


class AblationError(FeaturecacheError):
    """An ablation grid or setup is invalid."""


def _value(key: str, text: str):
    text = text.strip()
    if key == "hidden":
        # "2048+2048" is a three-layer head; "0" is FCb only.
        parts = [int(p) for p in text.split("+")]
        return parts[0] if len(parts) == 1 else tuple(parts)
    if key in ("objective", "head", "background", "pooling", "method", "image_head"):
        return text
    if key == "image_pooling":
        # "mean+max" concatenates; order matters for the head, so it is kept.
        return "+".join(p.strip() for p in text.split("+"))
    if key == "aggregation":
        from featurecache.objectives import parse_aggregation

        name, value = parse_aggregation(text)
        return name if value is None else f"{name}:{value:g}"
    if key in ("batch_size", "epochs", "image_hidden", "image_epochs"):
        return int(text)
    if key == "background_weight" and text.lower() in ("none", "balanced", ""):
        return None
    return float(text)


def parse_grid(items: Sequence[str]) -> dict:
    """``["hidden=0,512,2048", "background=weight,sample:0.1"]`` -> ``{"hidden": [0, 512, 2048], ...}``."""
    grid: dict = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values.strip():
            raise AblationError(f"--grid expects KEY=V1,V2,..., got {item!r}")
        if key not in DEFAULTS:
            raise AblationError(f"--grid: unknown setting {key!r}; known: {', '.join(DEFAULTS)}")
        try:
            grid[key] = [_value(key, v) for v in values.split(",")]
        except ValueError:
            raise AblationError(f"--grid {key}: cannot read the values {values!r}") from None
    return _check_grid(grid)


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
    except tomllib.TOMLDecodeError as e:
        raise AblationError(f"{path}: invalid TOML ({e})") from None
    raw = data.get("grid", {})
    if not isinstance(raw, dict) or not raw:
        raise AblationError(f"{path}: needs a [grid] table of setting = [values]")
    grid = {}
    for key, values in raw.items():
        if key not in DEFAULTS:
            raise AblationError(f"{path}: unknown setting {key!r}; known: {', '.join(DEFAULTS)}")
        values = values if isinstance(values, list) else [values]
        grid[key] = [_value(key, str(v)) if not isinstance(v, list) else tuple(v) for v in values]
    options = data.get("options", {})
    unknown = set(options) - {"seeds", "folds", "val_split", "train_split", "whole_image"}
    if unknown:
        raise AblationError(f"{path}: unknown option(s) {', '.join(sorted(unknown))}")
    return _check_grid(grid), options


def _check_grid(grid: dict) -> dict:
    from featurecache.objectives import IMAGE_POOLINGS, OBJECTIVES

    for o in grid.get("objective", []):
        if o not in OBJECTIVES:
            raise AblationError(f"--grid objective: unknown objective {o!r} ({', '.join(OBJECTIVES)})")
    for h in grid.get("image_head", []):
        if h not in ("logreg", "mlp"):
            raise AblationError(f"--grid image_head: unknown image head {h!r} (logreg, mlp)")
    for p in grid.get("image_pooling", []):
        parts = p.split("+")
        if parts != [_WHOLE] and any(x not in IMAGE_POOLINGS for x in parts):
            raise AblationError(f"--grid image_pooling: {p!r} is not '+'-joined {', '.join(IMAGE_POOLINGS)}, "
                                f"or {_WHOLE} (a --whole-image cache of the same images)")
    for h in grid.get("head", []):
        if h not in ("mlp", "logreg", "linearsvm"):
            raise AblationError(f"--grid head: unknown head {h!r} (mlp, logreg, linearsvm)")
    for p in grid.get("pooling", []):
        if p not in POOLINGS:
            raise AblationError(f"--grid pooling: unknown pooling {p!r} ({', '.join(POOLINGS)})")
    for m in grid.get("method", []):
        if m not in METHODS:
            raise AblationError(f"--grid method: unknown method {m!r} ({', '.join(METHODS)})")
    for b in grid.get("background", []):
        BackgroundPolicy.parse(b)
    return grid


@dataclass
class AblationRow:
    """One configuration's results over seeds and folds."""

    config: dict
    maps: list
    train_seconds: list
    patch_accuracy: list = field(default_factory=list)

    @property
    def mean(self) -> float:
        return float(np.mean(self.maps))

    @property
    def std(self) -> float:
        return float(np.std(self.maps))


@dataclass
class AblationResult:
    """All rows, best first, and how they were measured."""

    rows: list
    varied: list
    fixed: dict
    protocol: str
    seeds: int
    cache: str
    best_head_path: Optional[str] = None
    seconds: float = 0.0
    trainings: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def best(self) -> AblationRow:
        return self.rows[0]

    def to_dict(self) -> dict:
        return {
            "cache": self.cache, "protocol": self.protocol, "seeds": self.seeds, "varied": self.varied,
            "fixed": {k: _show(v) for k, v in self.fixed.items()}, "seconds": self.seconds,
            "trainings": self.trainings, "best_head": self.best_head_path,
            "rows": [{"config": {k: _show(v) for k, v in r.config.items()}, "map_mean": r.mean, "map_std": r.std,
                      "maps": r.maps, "train_seconds": float(np.mean(r.train_seconds)),
                      "patch_accuracy": float(np.mean(r.patch_accuracy)) if r.patch_accuracy else None}
                     for r in self.rows],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["rank"] + self.varied + ["map_mean", "map_std", "runs", "train_seconds", "patch_accuracy"])
        for i, r in enumerate(self.rows, 1):
            w.writerow([i] + [_cell(r.config, k) for k in self.varied]
                       + [f"{r.mean:.6f}", f"{r.std:.6f}", len(r.maps), f"{np.mean(r.train_seconds):.3f}",
                          f"{np.mean(r.patch_accuracy):.6f}" if r.patch_accuracy else ""])
        return buf.getvalue()

    def to_text(self) -> str:
        head = [f"{len(self.rows)} configurations, {self.protocol}, {self.seeds} seed(s); {self.trainings} "
                f"trainings in {self.seconds:.0f} s; mAP in % (mean ± std over seeds × folds)"]
        used = set().union(*(_relevant(r.config) for r in self.rows)) if self.rows else set()
        fixed = ", ".join(f"{k}={_show(v)}" for k, v in self.fixed.items() if k in _RELEVANT_FIXED and k in used)
        if fixed:
            head.append(f"fixed: {fixed}")
        cols = ["rank"] + self.varied + ["mAP", "patch acc", "train s"]
        table = [[str(i)] + [_cell(r.config, k) for k in self.varied]
                 + [f"{100 * r.mean:.1f} ± {100 * r.std:.1f}",
                    f"{100 * np.mean(r.patch_accuracy):.1f}" if r.patch_accuracy else "-",
                    f"{np.mean(r.train_seconds):.1f}"]
                 for i, r in enumerate(self.rows, 1)]
        widths = [max(len(c), *(len(row[j]) for row in table)) for j, c in enumerate(cols)]
        lines = head + ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in table]
        if self.best_head_path:
            lines.append(f"best configuration's head saved to {self.best_head_path}")
        return "\n".join(lines)


_RELEVANT_FIXED = ("objective", "head", "hidden", "background", "k", "pooling", "method", "image_pooling",
                   "aggregation")


def _cell(cfg: dict, key: str) -> str:
    """A table cell; '-' for a setting that does not apply to the row's objective or head."""
    return _show(cfg[key]) if key in _relevant(cfg) else "-"


def _show(v) -> str:
    if isinstance(v, tuple):
        return "+".join(str(x) for x in v)
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return "balanced" if v is None else str(v)


def _estimator_params(cfg: dict, n_out: int, seed: int, device: str) -> dict:
    if cfg["head"] == "mlp":
        return dict(hidden=cfg["hidden"], dropout=cfg["dropout"], lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                    batch_size=cfg["batch_size"], max_epochs=cfg["epochs"], n_outputs=n_out, random_state=seed,
                    device=device)
    return dict(C=cfg["C"], n_outputs=n_out, random_state=seed)


def _trainer_params(cfg: dict, seed: int, device: str) -> dict:
    """Parameters of the image-label trainers (ImageMLPHead, MILHead) from a configuration."""
    return dict(hidden=int(cfg["image_hidden"]), lr=float(cfg["image_lr"]),
                weight_decay=float(cfg["image_weight_decay"]), max_epochs=int(cfg["image_epochs"]), device=device,
                random_state=seed)


def _mil_params(cfg: dict, seed: int, device: str) -> dict:
    from featurecache.objectives import parse_aggregation

    name, value = parse_aggregation(cfg["aggregation"])
    params = dict(_trainer_params(cfg, seed, device), aggregation=name)
    if name == "lse":
        params["temperature"] = value
    elif name == "power":
        params["k"] = value
    params["patch_weight"] = float(cfg["patch_weight"]) if cfg["objective"] == "hybrid" else 0.0
    return params


def _splits(n_images: int, folds: Optional[int], seed: int) -> list:
    """(train image mask, eval image mask) pairs for K-fold CV over images."""
    rng = np.random.RandomState(seed)
    order = rng.permutation(n_images)
    parts = np.array_split(order, folds)
    out = []
    for p in parts:
        ev = np.zeros(n_images, bool)
        ev[p] = True
        out.append((~ev, ev))
    return out


@dataclass
class _Table:
    """Patches and images of one side (the training cache, or the validation cache)."""

    X: np.ndarray  # (N, D) features
    img: np.ndarray  # (N,) image of each patch, rows of this table
    labels: np.ndarray  # (N,) patch labels
    scales: np.ndarray  # (N,)
    image_labels: np.ndarray  # (M, C)
    image_difficult: np.ndarray  # (M, C)
    paths: tuple  # (M,) image paths, to find the same images in a whole-image cache

    @classmethod
    def read(cls, cache: FeatureCache) -> "_Table":
        t = cache.images
        return cls(cache.read_features(), np.searchsorted(t.row, cache.image_index), cache.labels, cache.scales,
                   t.labels, t.difficult, tuple(t.path))


@dataclass
class _Fold:
    """One training/evaluation run: training images of ``train``, evaluation images of ``test``."""

    train: _Table
    train_images: np.ndarray
    test: _Table
    test_images: np.ndarray

    def __post_init__(self) -> None:
        tr = np.zeros(len(self.train.image_labels), bool)
        tr[self.train_images] = True
        ev = np.zeros(len(self.test.image_labels), bool)
        ev[self.test_images] = True
        self.tr_pos = np.flatnonzero(tr[self.train.img])
        self.ev_pos = np.flatnonzero(ev[self.test.img])
        # Patches' images renumbered 0 .. n - 1 within each side.
        self.tr_local = np.searchsorted(self.train_images, self.train.img[self.tr_pos])
        self.ev_local = np.searchsorted(self.test_images, self.test.img[self.ev_pos])

    def image_targets(self) -> tuple:
        t, i = self.train, self.train_images
        return t.image_labels[i], (t.image_difficult & ~t.image_labels)[i]


class _ImageFeatures:
    """Pooled image features of both sides, computed once per pooling (and the whole-image cache's)."""

    def __init__(self, tables: dict, whole: Optional[Union[str, Path]], fingerprint: str, classes: tuple) -> None:
        self.tables, self.memo = tables, {}
        self.levels = np.unique(np.concatenate([t.scales for t in tables.values()]))
        self.whole = None
        if whole is not None:
            with FeatureCache(whole) as w:
                if w.fingerprint != fingerprint:
                    raise AblationError(f"{w.path}: whole-image features differ from the patch cache's")
                if tuple(w.classes) != classes:
                    raise AblationError(f"{w.path}: classes differ from the patch cache's")
                from featurecache.objectives import image_features

                feats = image_features(w, pooling=("mean",))
                index = {p: i for i, p in enumerate(w.images.path)}
            for name, t in tables.items():
                missing = [p for p in t.paths if p not in index]
                if missing:
                    raise AblationError(f"{whole}: {len(missing)} image(s) of the patch cache are not in the "
                                        f"whole-image cache (first: {missing[0]})")
            self.whole = (feats, index)

    def get(self, pooling: str, side: str) -> np.ndarray:
        t = self.tables[side]
        key = (pooling, id(t))  # in cross-validation both sides are one table: pooled once
        if key not in self.memo:
            if pooling == _WHOLE:
                if self.whole is None:
                    raise AblationError("image_pooling=whole needs a whole-image cache of the same images "
                                        "(--whole-image FILE)")
                feats, index = self.whole
                self.memo[key] = feats[[index[p] for p in t.paths]]
            else:
                from featurecache.objectives import pool_image_features

                self.memo[key] = pool_image_features(t.X, t.img, len(t.image_labels), scales=t.scales,
                                                     pooling=pooling.split("+"), levels=self.levels)
        return self.memo[key]


def _fit_config(cfg: dict, fold: _Fold, seed: int, n_out: int, device: str, feats: _ImageFeatures):
    """Train one configuration on a fold's training side; returns ``(kind, estimator, facts)``."""
    from featurecache.objectives import ImageLogRegHead, ImageMLPHead, MILHead

    obj = cfg["objective"]
    tr = fold.train
    if obj == "patch":
        policy = BackgroundPolicy.parse(cfg["background"], weight=cfg["background_weight"])
        keep, w, w_bg = background_weights(tr.labels[fold.tr_pos], policy, random_state=seed)
        est = make_head(cfg["head"], **_estimator_params(cfg, n_out, seed, device))
        fit_estimator(est, ArraySource(tr.X, tr.labels[fold.tr_pos][keep], w, index=fold.tr_pos[keep]))
        return cfg["head"], est, {"background": policy.describe(), "background_weight": w_bg,
                                  "train_patches": int(len(keep))}
    Y, ignore = fold.image_targets()
    if obj == "image":
        pooling = cfg["image_pooling"]
        stored = ("mean",) if pooling == _WHOLE else tuple(pooling.split("+"))
        F = feats.get(pooling, "train")[fold.train_images]
        if cfg["image_head"] == "logreg":
            est = ImageLogRegHead(C=float(cfg["C"]), pooling=stored, random_state=seed)
        else:
            est = ImageMLPHead(**_trainer_params(cfg, seed, device), pooling=stored)
        est.fit(F, Y, ignore=ignore)
        return "image-" + cfg["image_head"], est, {"image_pooling": list(stored)}
    params = _mil_params(cfg, seed, device)
    est = MILHead(**params)
    pl = pw = None
    if obj == "hybrid":
        policy = BackgroundPolicy.parse(cfg["background"], weight=cfg["background_weight"])
        pl = tr.labels[fold.tr_pos]
        keep, w, _ = background_weights(pl, policy, random_state=seed)
        pw = np.zeros(len(pl), np.float32)
        pw[keep] = w
    est.fit(tr.X[fold.tr_pos], fold.tr_local, Y, ignore=ignore, patch_labels=pl, patch_weights=pw)
    return "mil", est, {"aggregation": est.describe_aggregation()}


def _score(cfg: dict, est, fold: _Fold, feats: _ImageFeatures) -> tuple:
    """``("patch", patch probabilities)`` or ``("image", image scores)`` on a fold's evaluation side."""
    te = fold.test
    if cfg["objective"] == "patch":
        return "patch", est.predict_proba(te.X[fold.ev_pos])
    if cfg["objective"] == "image":
        return "image", est.image_scores(feats.get(cfg["image_pooling"], "test")[fold.test_images])
    return "image", est.image_scores_from_patches(te.X[fold.ev_pos], fold.ev_local, len(fold.test_images))


def ablate(
    cache: Union[str, Path],
    *,
    grid: dict,
    val: Optional[Union[str, Path]] = None,
    val_split: Optional[str] = None,
    train_split: Optional[str] = None,
    folds: Optional[int] = None,
    seeds: int = 1,
    whole_image: Optional[Union[str, Path]] = None,
    save_best: Optional[Union[str, Path]] = None,
    device: str = "auto",
    progress: Optional[bool] = None,
) -> AblationResult:
    """Run every combination of a grid of head settings and objectives on one cache.

    Parameters
    ----------
    cache : path
        The training cache (all its features are loaded into memory once).
    grid : dict
        Setting -> list of values (see :func:`parse_grid`); unset settings take
        :data:`DEFAULTS`.
    val : path, optional
        A validation cache to evaluate on.
    val_split : str, optional
        Evaluate on this split (of ``val``, or of ``cache``; then training uses the other
        images, or ``train_split``).
    train_split : str, optional
        Train on this split of ``cache``.
    folds : int, optional
        K-fold cross-validation over the images instead of a validation set.
    seeds : int
        Repetitions of every configuration with seeds 0 .. seeds-1.
    whole_image : path, optional
        A ``--whole-image`` cache of the same images (same backbone), for
        ``image_pooling=whole``: the whole-image probe on the same folds.
    save_best : path, optional
        Retrain the best configuration on all training images (seed 0) and save its head.
    device : str
        For the torch heads.
    progress : bool, optional
        Progress bar over trainings; default only on a terminal.

    Returns
    -------
    AblationResult
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    grid = _check_grid(dict(grid))
    if folds is None and val is None and val_split is None:
        raise AblationError("say what to evaluate on: --val FILE, --val-split NAME, or --folds K")
    if folds is not None and (val is not None or val_split is not None):
        raise AblationError("--folds replaces --val/--val-split; give one or the other")
    if folds is not None and folds < 2:
        raise AblationError("--folds needs at least 2")
    same_file_val = val is None and val_split is not None
    if same_file_val and train_split is None:
        train = FeatureCache(cache)
        train_rows = np.flatnonzero([val_split not in s.split(",") for s in train.images.split])
        train.close()
        train = FeatureCache(cache, images=train_rows)
    else:
        train = FeatureCache(cache, split=train_split)
    with train:
        tables = {"train": _Table.read(train)}
        classes, n_out = tuple(train.classes), len(train.classes) + 1
        fingerprint, feature_settings = train.fingerprint, dict(train.feature_settings)
        path = str(train.path)
        n_images = train.num_images
    all_train = np.arange(n_images)
    if folds is not None:
        if folds > n_images:
            raise AblationError(f"{cache}: --folds {folds} is more than its {n_images} images")
        tables["test"] = tables["train"]
        evaluations = [_Fold(tables["train"], np.flatnonzero(tr), tables["test"], np.flatnonzero(ev))
                       for tr, ev in _splits(n_images, folds, 0)]
        protocol = f"{folds}-fold cross-validation over {n_images} images"
    else:
        with FeatureCache(val if val is not None else cache, split=val_split) as v:
            if v.fingerprint != fingerprint:
                raise AblationError(f"{v.path}: validation features differ from the training cache's")
            tables["test"] = _Table.read(v)
            evaluations = [_Fold(tables["train"], all_train, tables["test"], np.arange(v.num_images))]
            protocol = f"train {n_images} images, evaluate {v.num_images} images ({v.path.name}" + (
                f", split {val_split})" if val_split else ")")
    settings = {k: grid.get(k, [DEFAULTS[k]]) for k in DEFAULTS}
    if any(p == _WHOLE for p in settings["image_pooling"]) and whole_image is None:
        raise AblationError("image_pooling=whole needs a whole-image cache of the same images (--whole-image FILE)")
    feats = _ImageFeatures(tables, whole_image, fingerprint, classes)
    varied = [k for k in DEFAULTS if len(settings[k]) > 1]
    fixed = {k: settings[k][0] for k in DEFAULTS if len(settings[k]) == 1}
    train_cfgs = [dict(zip(TRAIN_KEYS, c)) for c in itertools.product(*(settings[k] for k in TRAIN_KEYS))]
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
    for cfg in train_cfgs:
        key = _canonical({**cfg, **eval_cfgs[0]})
        if key not in seen:
            seen.add(key)
            unique.append(cfg)
    runs = len(unique) * seeds * len(evaluations)
    results: dict = {}
    bar = tqdm(total=runs, unit="fit", desc="ablate", disable=(None if progress is None else not progress))
    try:
        for cfg in unique:
            for seed in range(seeds):
                for fold in evaluations:
                    t = time.perf_counter()
                    _, est, _ = _fit_config(cfg, fold, seed, n_out, device, feats)
                    kind, out = _score(cfg, est, fold, feats)
                    dt = time.perf_counter() - t
                    te, ev = fold.test, fold.test_images
                    done = set()
                    for ecfg in eval_cfgs:
                        full = {**cfg, **ecfg}
                        key = _canonical(full)
                        if key in done:  # evaluation settings that do not apply to this objective
                            continue
                        done.add(key)
                        if kind == "patch":
                            rep = report_from_arrays(out, fold.ev_local, te.image_labels[ev], te.image_difficult[ev],
                                                     classes, pooling=ecfg["pooling"], k=ecfg["k"],
                                                     method=ecfg["method"], patch_labels=te.labels[fold.ev_pos])
                        else:
                            rep = report_from_image_scores(out, te.image_labels[ev], te.image_difficult[ev], classes,
                                                           method=ecfg["method"])
                        row = results.setdefault(key, AblationRow(full, [], []))
                        row.maps.append(rep.mean_ap)
                        row.train_seconds.append(dt)
                        if rep.patch_accuracy is not None:
                            row.patch_accuracy.append(rep.patch_accuracy)
                    bar.update(1)
    finally:
        bar.close()
    rows = sorted(results.values(), key=lambda r: (-np.nan_to_num(r.mean, nan=-1.0), _canonical(r.config)))
    result = AblationResult(rows, varied, fixed, protocol, seeds, path, seconds=0.0, trainings=runs)
    if save_best is not None:
        cfg = rows[0].config
        whole_fold = _Fold(tables["train"], all_train, tables["train"], all_train)
        kind, est, facts = _fit_config(cfg, whole_fold, 0, n_out, device, feats)
        summary = {"cache": path, "ablation_config": {k: _show(v) for k, v in cfg.items() if k in _relevant(cfg)},
                   "objective": cfg["objective"], "train_images": int(n_images), **facts}
        if cfg["objective"] == "patch":
            summary.update(pooling=cfg["pooling"], k=cfg["k"])
        elif cfg["objective"] == "image" and cfg["image_pooling"] == _WHOLE:
            summary["note"] = f"trained on whole-image features ({whole_image}); evaluate it on that cache"
        TrainedHead(est, kind, classes, feature_settings, fingerprint, summary).save(save_best)
        result.best_head_path = str(save_best)
    result.seconds = time.perf_counter() - t0
    return result


def _canonical(cfg: dict) -> str:
    keep = _relevant(cfg)
    return json.dumps({k: _show(v) for k, v in sorted(cfg.items()) if k in keep})
