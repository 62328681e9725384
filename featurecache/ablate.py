"""Head-only ablations: many head settings on one cache, features loaded once.

Settings are of two kinds. *Training* settings (``head``, ``hidden``, ``dropout``, ``lr``,
``weight_decay``, ``batch_size``, ``epochs``, ``C``, ``background``, ``background_weight``)
each need a trained head; *evaluation* settings (``k``, ``pooling``, ``method``) reuse the
patch scores of a trained head. Every combination of the grid is run for every seed and,
with ``folds``, in K-fold cross-validation over images (an image's patches are never on
both sides).
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
from featurecache.evaluate import METHODS, POOLINGS, report_from_arrays
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
    "head": "mlp", "hidden": 2048, "dropout": 0.5, "lr": 0.01, "weight_decay": 5e-4, "batch_size": 256,
    "epochs": 60, "C": 1.0, "background": "weight", "background_weight": None,
    "k": 5.0, "pooling": "power", "method": "voc07",
}
TRAIN_KEYS = ("head", "hidden", "dropout", "lr", "weight_decay", "batch_size", "epochs", "C", "background",
              "background_weight")
EVAL_KEYS = ("k", "pooling", "method")


class AblationError(FeaturecacheError):
    """An ablation grid or setup is invalid."""


def _value(key: str, text: str):
    text = text.strip()
    if key == "hidden":
        # "2048+2048" is a three-layer head; "0" is FCb only.
        parts = [int(p) for p in text.split("+")]
        return parts[0] if len(parts) == 1 else tuple(parts)
    if key in ("head", "background", "pooling", "method"):
        return text
    if key in ("batch_size", "epochs"):
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
        ``seeds``, ``folds``, ``val_split``, ``train_split`` if given.
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
    unknown = set(options) - {"seeds", "folds", "val_split", "train_split"}
    if unknown:
        raise AblationError(f"{path}: unknown option(s) {', '.join(sorted(unknown))}")
    return _check_grid(grid), options


def _check_grid(grid: dict) -> dict:
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
        fixed = ", ".join(f"{k}={_show(v)}" for k, v in self.fixed.items() if k in _RELEVANT_FIXED)
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


_RELEVANT_FIXED = ("head", "hidden", "background", "k", "pooling", "method")


_MLP_ONLY = ("hidden", "dropout", "lr", "weight_decay", "batch_size", "epochs")


def _cell(cfg: dict, key: str) -> str:
    """A table cell; '-' for a setting that does not apply to the row's head."""
    if (key in _MLP_ONLY and cfg.get("head") != "mlp") or (key == "C" and cfg.get("head") == "mlp"):
        return "-"
    if key == "k" and cfg.get("pooling") != "power":
        return "-"
    return _show(cfg[key])


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


def ablate(
    cache: Union[str, Path],
    *,
    grid: dict,
    val: Optional[Union[str, Path]] = None,
    val_split: Optional[str] = None,
    train_split: Optional[str] = None,
    folds: Optional[int] = None,
    seeds: int = 1,
    save_best: Optional[Union[str, Path]] = None,
    device: str = "auto",
    progress: Optional[bool] = None,
) -> AblationResult:
    """Run every combination of a grid of head settings on one cache.

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
    save_best : path, optional
        Retrain the best configuration on all training images (seed 0) and save its head.
    device : str
        For MLP heads.
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
        X = train.read_features()
        labels = train.labels
        img = np.searchsorted(train.images.row, train.image_index)
        t_labels, t_difficult = train.images.labels, train.images.difficult
        classes, n_out = tuple(train.classes), len(train.classes) + 1
        fingerprint, feature_settings = train.fingerprint, dict(train.feature_settings)
        path = str(train.path)
        n_images = train.num_images
    if folds is not None:
        if folds > n_images:
            raise AblationError(f"{cache}: --folds {folds} is more than its {n_images} images")
        evaluations = []
        for tr_mask, ev_mask in _splits(n_images, folds, 0):
            tr_pos, ev_pos = np.flatnonzero(tr_mask[img]), np.flatnonzero(ev_mask[img])
            ev_images = np.flatnonzero(ev_mask)
            evaluations.append((tr_pos, X, ev_pos, np.searchsorted(ev_images, img[ev_pos]), labels[ev_pos],
                                t_labels[ev_images], t_difficult[ev_images]))
        protocol = f"{folds}-fold cross-validation over {n_images} images"
    else:
        with FeatureCache(val if val is not None else cache, split=val_split) as v:
            if v.fingerprint != fingerprint:
                raise AblationError(f"{v.path}: validation features differ from the training cache's")
            vX = v.read_features()
            vimg = np.searchsorted(v.images.row, v.image_index)
            evaluations = [(np.arange(len(labels)), vX, np.arange(len(vX)), vimg, v.labels, v.images.labels,
                            v.images.difficult)]
            protocol = f"train {n_images} images, evaluate {v.num_images} images ({v.path.name}" + (
                f", split {val_split})" if val_split else ")")
    settings = {k: grid.get(k, [DEFAULTS[k]]) for k in DEFAULTS}
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
    # Settings that do not apply to a head (hidden for logreg, C for the MLP) would repeat runs.
    unique, seen = [], set()
    for cfg in train_cfgs:
        key = _canonical(cfg)
        if key not in seen:
            seen.add(key)
            unique.append(cfg)
    runs = len(unique) * seeds * len(evaluations)
    results: dict = {}
    bar = tqdm(total=runs, unit="fit", desc="ablate", disable=(None if progress is None else not progress))
    try:
        for cfg in unique:
            policy = BackgroundPolicy.parse(cfg["background"], weight=cfg["background_weight"])
            for seed in range(seeds):
                for tr_pos, eX, ev_pos, ev_img, ev_lab, ev_tl, ev_td in evaluations:
                    t = time.perf_counter()
                    keep, w, _ = background_weights(labels[tr_pos], policy, random_state=seed)
                    est = make_head(cfg["head"], **_estimator_params(cfg, n_out, seed, device))
                    fit_estimator(est, ArraySource(X, labels[tr_pos][keep], w, index=tr_pos[keep]))
                    probs = est.predict_proba(eX[ev_pos])
                    dt = time.perf_counter() - t
                    for ecfg in eval_cfgs:
                        rep = report_from_arrays(probs, ev_img, ev_tl, ev_td, classes, pooling=ecfg["pooling"],
                                                 k=ecfg["k"], method=ecfg["method"], patch_labels=ev_lab)
                        full = {**cfg, **ecfg}
                        row = results.setdefault(_canonical(full), AblationRow(full, [], []))
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
        policy = BackgroundPolicy.parse(cfg["background"], weight=cfg["background_weight"])
        keep, w, w_bg = background_weights(labels, policy, random_state=0)
        est = make_head(cfg["head"], **_estimator_params(cfg, n_out, 0, device))
        fit_estimator(est, ArraySource(X, labels[keep], w, index=keep))
        summary = {"cache": path, "ablation_config": {k: _show(v) for k, v in cfg.items()},
                   "background": policy.describe(), "background_weight": w_bg, "train_patches": int(len(keep)),
                   "pooling": cfg["pooling"], "k": cfg["k"]}
        TrainedHead(est, cfg["head"], classes, feature_settings, fingerprint, summary).save(save_best)
        result.best_head_path = str(save_best)
    result.seconds = time.perf_counter() - t0
    return result


def _canonical(cfg: dict) -> str:
    c = dict(cfg)
    if c.get("head") != "mlp":
        for k in ("hidden", "dropout", "lr", "weight_decay", "batch_size", "epochs"):
            c.pop(k, None)
    else:
        c.pop("C", None)
    if c.get("pooling", "power") != "power":
        c.pop("k", None)
    return json.dumps({k: _show(v) for k, v in sorted(c.items())})
