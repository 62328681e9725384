"""Head-only ablations: many head settings and objectives on one cache, features loaded once.

Settings are of two kinds. *Training* settings each need a trained head: the ``objective``
and its options (:data:`featurecache.heads.registry.OPTIONS`: ``head``, ``hidden``,
``background``, ... for the paper's ``patch`` objective; ``image_pooling``, ``image_head``,
``C`` for ``image``; ``aggregation``, ``image_*`` and, for ``hybrid``, ``patch_weight`` and
the background settings for the image-label trainers). *Evaluation* settings (``k``,
``pooling``, ``method``) reuse a trained patch head's scores. A setting that does not apply
to a configuration's objective or head neither multiplies runs nor shows a value. Every
combination is run for every seed and, with ``folds``, in K-fold cross-validation over
images (an image's patches are never on both sides).

The training images' features are read into memory once (:class:`featurecache.cache.MemoryCache`)
when they fit the memory limit; otherwise every configuration streams its fold's images from
the file (reader views that read only their rows; image features are still pooled once per
table). Either way every fold trains through :func:`featurecache.train.fit_objective` and is
scored through :class:`featurecache.heads.trained.TrainedHead`, the same code as ``fit`` and
``eval``; patch heads' scores are aggregated chunk by chunk for every evaluation setting at once.
``image_pooling=whole`` (with ``whole_image=``, a ``--whole-image`` cache of the same
images) is the whole-image one-vs-rest probe, measured on the same folds in the same run.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Optional, Union

import numpy as np
from tqdm.auto import tqdm

from featurecache.cache import FeatureCache, MemoryCache
from featurecache.errors import AblationError, FeaturecacheError, integer_at_least
from featurecache.evaluate import pooled_scores, report_from_image_scores
from featurecache.heads.crossval import Fold, cv_folds
from featurecache.heads.registry import FitConfig, get_objective, options_of, relevant
from featurecache.heads.trained import TrainedHead
from featurecache.metrics import bootstrap_map, bootstrap_weights, interval
from featurecache.outputs import check_not_inputs, csv_text, json_text
from featurecache.resources import apply_threads, features_bytes, memory_budget
from featurecache.sweep import (
    DEFAULTS,
    EVAL_KEYS,
    TRAIN_KEYS,
    canonical,
    check_grid,
    configurations,
    grid_settings,
    is_probe,
    parse_grid,
    read_sweep_file,
    show,
)
from featurecache.train import fit_objective

logger = logging.getLogger(__name__)

__all__ = ["AblateConfig", "AblationError", "AblationResult", "AblationRow", "DEFAULTS", "EVAL_KEYS", "TRAIN_KEYS",
           "ablate", "parse_grid", "read_sweep_file"]

#: Most bootstrap values an ablation holds (rows x evaluation settings x resamples, float64:
#: 400 MB); ``--resamples`` beyond what fits is refused before any training.
MAX_BOOTSTRAP_VALUES = 50_000_000

#: Resamples drawn at a time: the draw counts of one chunk of one fold stay near 64 MB.
_BOOT_CHUNK_VALUES = 8_000_000




@dataclass
class AblationRow:
    """One configuration's results over seeds and folds."""

    config: dict
    maps: list
    train_seconds: list
    patch_accuracy: list = field(default_factory=list)
    #: ``(fold, image scores)`` of each run, for the bootstrap.
    runs: list = field(default_factory=list, repr=False)
    #: Bootstrap: 95% interval of the mAP, and the paired differences to the best row and to
    #: the whole-image probe's row ``(difference, low, high)``, in mAP units.
    ci: tuple = (float("nan"), float("nan"))
    vs_best: Optional[tuple] = None
    vs_probe: Optional[tuple] = None

    @property
    def mean(self) -> float:
        return float(np.mean(self.maps))

    @property
    def std(self) -> float:
        return float(np.std(self.maps))

    def interval_dict(self) -> dict:
        return {"map_ci": list(self.ci), "vs_best": list(self.vs_best) if self.vs_best else None,
                "vs_probe": list(self.vs_probe) if self.vs_probe else None}


@dataclass
class AblationResult:
    """All rows, best first, and how they were measured."""

    rows: list
    varied: list
    fixed: dict
    protocol: str
    seeds: int
    cache: str
    seconds: float = 0.0
    trainings: int = 0
    extra: dict = field(default_factory=dict)
    best_head_path: Optional[str] = None

    @property
    def best(self) -> AblationRow:
        return self.rows[0]

    def to_dict(self) -> dict:
        return {
            "cache": self.cache, "protocol": self.protocol, "seeds": self.seeds, "varied": self.varied,
            "fixed": {k: show(v) for k, v in self.fixed.items()}, "seconds": self.seconds,
            "trainings": self.trainings, "best_head": self.best_head_path,
            "rows": [{"config": {k: show(v) for k, v in r.config.items()}, "map_mean": r.mean, "map_std": r.std,
                      "maps": r.maps, "train_seconds": float(np.mean(r.train_seconds)),
                      "patch_accuracy": float(np.mean(r.patch_accuracy)) if r.patch_accuracy else None,
                      **r.interval_dict()}
                     for r in self.rows],
            "bootstrap": self.extra.get("bootstrap"), "data": self.extra.get("data"),
        }

    def to_json(self) -> str:
        return json_text(self.to_dict())

    def to_html(self) -> str:
        """The table as a page: sortable, with a forest plot of the intervals (:mod:`featurecache.pages.ablation`)."""
        from featurecache.pages.ablation import ablation_html

        return ablation_html(self)

    def to_csv(self) -> str:
        rows = [["rank"] + self.varied + ["map_mean", "map_std", "runs", "train_seconds", "patch_accuracy",
                                          "ci_low", "ci_high", "vs_best", "vs_best_low", "vs_best_high",
                                          "vs_probe", "vs_probe_low", "vs_probe_high"]]
        for i, r in enumerate(self.rows, 1):
            rows.append([i] + [_cell(r.config, k) for k in self.varied]
                        + [f"{r.mean:.6f}", f"{r.std:.6f}", len(r.maps), f"{np.mean(r.train_seconds):.3f}",
                           f"{np.mean(r.patch_accuracy):.6f}" if r.patch_accuracy else ""]
                        + [f"{v:.6f}" for v in r.ci]
                        + [f"{v:.6f}" if d else "" for d in (r.vs_best, r.vs_probe) for v in (d or (0, 0, 0))])
        return csv_text(rows)

    def to_text(self) -> str:
        head = [f"{len(self.rows)} configurations, {self.protocol}, {self.seeds} seed(s); {self.trainings} "
                f"trainings in {self.seconds:.0f} s; mAP in % (mean ± std over seeds × folds; [95% paired bootstrap "
                f"interval over images])"]
        if self.extra.get("data"):
            head.append(self.extra["data"])
        used = set().union(*(relevant(r.config) for r in self.rows)) if self.rows else set()
        fixed = ", ".join(f"{k}={show(v)}" for k, v in self.fixed.items() if k in _RELEVANT_FIXED and k in used)
        if fixed:
            head.append(f"fixed: {fixed}")
        probe = any(r.vs_probe for r in self.rows)
        cols = ["rank"] + self.varied + ["mAP", "95% CI", "vs best"] + (["vs probe"] if probe else []) + [
            "patch acc", "train s"]
        table = [[str(i)] + [_cell(r.config, k) for k in self.varied]
                 + [f"{100 * r.mean:.1f} ± {100 * r.std:.1f}", _interval_text(r.ci), _difference_text(r.vs_best)]
                 + ([_difference_text(r.vs_probe)] if probe else [])
                 + [f"{100 * np.mean(r.patch_accuracy):.1f}" if r.patch_accuracy else "-",
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


def _interval_text(ci: tuple) -> str:
    return "-" if np.isnan(ci[0]) else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _difference_text(d: Optional[tuple]) -> str:
    return "-" if not d or np.isnan(d[1]) else f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]"


def _cell(cfg: dict, key: str) -> str:
    """A table cell; '-' for a setting that does not apply to the row's objective or head."""
    return show(cfg[key]) if key in relevant(cfg) else "-"




class _WholeImage:
    """A ``--whole-image`` cache of the same images, in memory: the probe's features for any view's images."""

    def __init__(self, path: Union[str, Path], like: MemoryCache) -> None:
        with FeatureCache(path) as w:
            if w.fingerprint != like.fingerprint:
                raise AblationError(f"{w.path}: whole-image features differ from the patch cache's")
            if tuple(w.classes) != tuple(like.classes):
                raise AblationError(f"{w.path}: classes differ from the patch cache's")
            self.cache = w.to_memory()
        self.path = path
        self.position = {p: i for i, p in enumerate(self.cache.images.path)}

    def view(self, patch_view: MemoryCache) -> tuple:
        """``(whole-image view of the same images, order)``: its scores ``[order]`` follow ``patch_view``'s images."""
        paths = patch_view.images.path
        missing = [p for p in paths if p not in self.position]
        if missing:
            raise AblationError(f"{self.path}: {len(missing)} image(s) of the patch cache are not in the "
                                f"whole-image cache (first: {missing[0]})")
        pos = np.array([self.position[p] for p in paths], dtype=np.int64)
        chosen = np.unique(pos)
        return self.cache.select(chosen), np.searchsorted(chosen, pos)


@dataclass(frozen=True)
class AblateConfig:
    """Everything an ablation needs besides the cache.

    Attributes
    ----------
    grid : mapping
        Setting -> list of values (see :func:`featurecache.sweep.parse_grid`); unset settings
        take :data:`featurecache.sweep.DEFAULTS`.
    val : path, optional
        A validation cache to evaluate on.
    val_split : str, optional
        Evaluate on this split (of ``val``, or of the cache; then training uses the other
        images, or ``train_split``).
    train_split : str, optional
        Train on this split of the cache.
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
    n_boot : int
        Bootstrap resamples of the images for each row's 95% interval and the paired
        differences to the best row and to the whole-image probe (0: none).
    threads : int, optional
        CPU threads (:func:`featurecache.resources.cpu_threads`).
    memory_limit : int, optional
        Bytes of float32 features to hold in memory (default: half the available memory).
        Training features within it are read once and shared by every configuration and
        fold (folds index them, no copy); above it each configuration streams its fold's
        images from the file (reading only their rows), its trainer deciding by the same
        limit what it holds. The table says which.
    """

    grid: Mapping = field(default_factory=dict)
    val: Optional[Union[str, Path]] = None
    val_split: Optional[str] = None
    train_split: Optional[str] = None
    folds: Optional[int] = None
    seeds: int = 1
    whole_image: Optional[Union[str, Path]] = None
    save_best: Optional[Union[str, Path]] = None
    device: str = "auto"
    progress: Optional[bool] = None
    n_boot: int = 1000
    threads: Optional[int] = None
    memory_limit: Optional[int] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", MappingProxyType(check_grid(dict(self.grid))))
        for name, low in (("seeds", 1), ("n_boot", 0)):
            value = getattr(self, name)
            if not integer_at_least(value, low):
                raise AblationError(f"must be an integer of at least {low}, got {value!r}", param=name)
        if self.folds is None and self.val is None and self.val_split is None:
            raise AblationError("say what to evaluate on: --val FILE, --val-split NAME, or --folds K")
        if self.folds is not None and (self.val is not None or self.val_split is not None):
            raise AblationError("--folds replaces --val/--val-split; give one or the other")
        if self.folds is not None and not integer_at_least(self.folds, 2):
            raise AblationError(f"must be an integer of at least 2, got {self.folds!r}", param="folds")


def _fit(cfg: dict, fold: Fold, seed: int, config: AblateConfig, whole: Optional[_WholeImage]) -> TrainedHead:
    """Train one configuration on a fold's training images (with the options of its objective)."""
    options = {k: v for k, v in cfg.items() if k in options_of(cfg["objective"])}
    train = fold.train
    if is_probe(cfg):
        train, options["image_pooling"] = whole.view(train)[0], "mean"
    fit = FitConfig(cfg["objective"], options, device=config.device, random_state=seed,
                    memory_limit=config.memory_limit)
    return fit_objective(train, fit)


def _reports(cfg: dict, head: TrainedHead, fold: Fold, eval_cfgs: list, whole: Optional[_WholeImage]) -> list:
    """``(evaluation settings, report, image scores)`` of a trained head on a fold's evaluation images."""
    te = fold.test
    t = te.images
    # Evaluation settings score the patch heads the grid trains; a head auto chose is scored as it was chosen.
    pooled = head.spec.pools_patches and get_objective(cfg["objective"]).pools_patches
    if pooled:  # the patch report does not depend on the pooling: made once for every evaluation setting
        by_pooling, patch = pooled_scores(head, te, [(e["pooling"], e["k"]) for e in eval_cfgs])
    elif is_probe(cfg):
        view, order = whole.view(te)
        scores = head.image_scores(view)[order]
    else:
        scores = head.image_scores(te)
    out, done = [], set()
    for ecfg in eval_cfgs:
        key = canonical({**cfg, **ecfg})
        if key in done:  # evaluation settings that do not apply to this objective
            continue
        done.add(key)
        if pooled:
            scores = by_pooling[(ecfg["pooling"], ecfg["k"])]
        rep = report_from_image_scores(scores, t.labels, t.difficult, te.classes, method=ecfg["method"])
        if pooled:
            rep.confusion, rep.labelled_patches, rep.patch_accuracy = patch
        out.append((ecfg, rep, scores))
    return out


def _training_cache(cache, config: AblateConfig, stack: contextlib.ExitStack) -> tuple:
    """``(training images, held in memory?)``: ``train_split``, or the images outside ``val_split`` of the same
    file; read into memory when their features fit ``memory_limit``, else a reader (closed with ``stack``)."""
    c = stack.enter_context(FeatureCache(cache, split=config.train_split))
    if config.val is None and config.val_split is not None:  # an evaluation image never trains
        keep = np.flatnonzero([config.val_split not in sp.split(",") for sp in c.images.split])
        c = stack.enter_context(c.select(keep))
    if features_bytes(c.num_patches, c.feature_dim) > memory_budget(config.memory_limit):
        return c, False
    return c.to_memory(), True


def _folds(train, cache, config: AblateConfig, stack: contextlib.ExitStack) -> tuple:
    """``(folds, protocol text)``; views of readers on disk are closed with ``stack``."""
    n, folds, val_split = train.num_images, config.folds, config.val_split
    if folds is not None:
        if folds > n:
            raise AblationError(f"{cache}: --folds {folds} is more than its {n} images")
        return cv_folds(train, folds, 0, stack), f"{folds}-fold cross-validation over {n} images"
    v = stack.enter_context(FeatureCache(config.val if config.val is not None else cache, split=val_split))
    if v.fingerprint != train.fingerprint:
        raise AblationError(f"{v.path}: validation features differ from the training cache's")
    in_memory = features_bytes(v.num_patches, v.feature_dim) <= memory_budget(config.memory_limit)
    test = v.to_memory() if in_memory else v
    protocol = f"train {n} images, evaluate {test.num_images} images ({test.path.name}" + (
        f", split {val_split})" if val_split else ")")
    return [Fold(train, test)], protocol


def _data_mode(train, in_memory: bool, memory_limit: Optional[int]) -> str:
    """How the features were used, for the table's header."""
    size = features_bytes(train.num_patches, train.feature_dim) / 2**30
    if in_memory:
        return f"features in memory ({size:.1f} GiB as float32)"
    return (f"features streamed from the file for each configuration ({size:.1f} GiB as float32 > memory limit "
            f"{memory_budget(memory_limit) / 2**30:.1f} GiB)")


def _run(configs: list, eval_cfgs: list, folds: list, config: AblateConfig, whole) -> dict:
    """Train and score every configuration for every seed and fold; rows by canonical configuration."""
    results: dict = {}
    bar = tqdm(total=len(configs) * config.seeds * len(folds), unit="fit", desc="ablate",
               disable=(None if config.progress is None else not config.progress))
    try:
        for cfg, seed, (f, fold) in itertools.product(configs, range(config.seeds), enumerate(folds)):
            t = time.perf_counter()
            head = _fit(cfg, fold, seed, config, whole)
            reports = _reports(cfg, head, fold, eval_cfgs, whole)
            dt = time.perf_counter() - t
            for ecfg, rep, scores in reports:
                full = {**cfg, **ecfg}
                row = results.setdefault(canonical(full), AblationRow(full, [], []))
                row.runs.append((f, scores))
                row.maps.append(rep.mean_ap)
                row.train_seconds.append(dt)
                if rep.patch_accuracy is not None:
                    row.patch_accuracy.append(rep.patch_accuracy)
            bar.update(1)
    finally:
        bar.close()
    return results


def _check_bootstrap(rows: int, n_boot: int) -> None:
    if rows * n_boot > MAX_BOOTSTRAP_VALUES:
        raise AblationError(f"{rows:,} rows x {n_boot:,} resamples are more bootstrap values than the "
                            f"{MAX_BOOTSTRAP_VALUES:,} an ablation holds; use at most "
                            f"{MAX_BOOTSTRAP_VALUES // rows:,} resamples", param="n_boot")


def ablate(cache: Union[str, Path], config: Optional[AblateConfig] = None, **settings) -> AblationResult:
    """Run every combination of a grid of head settings and objectives on one cache.

    Parameters
    ----------
    cache : path
        The training cache (its features are loaded into memory once when they fit).
    config : AblateConfig, optional
        The whole configuration (it needs an evaluation protocol: ``folds``, ``val`` or ``val_split``).
    **settings
        Fields of :class:`AblateConfig` (``grid``, ``folds``, ``seeds`` ...), over those of ``config``.

    Returns
    -------
    AblationResult
    """
    t0 = time.perf_counter()
    config = replace(config, **settings) if config is not None else AblateConfig(**settings)
    apply_threads(config.threads)
    try:
        check_not_inputs({"save_best": config.save_best}, {"the cache": cache, "the validation cache": config.val,
                                                           "the whole-image cache": config.whole_image})
    except FeaturecacheError as e:
        raise AblationError(e.message, param=e.param) from None
    settings = grid_settings(config.grid, whole_image=config.whole_image is not None)
    with contextlib.ExitStack() as stack:
        train, in_memory = _training_cache(cache, config, stack)
        evaluations, protocol = _folds(train, cache, config, stack)
        whole = _WholeImage(config.whole_image, train) if config.whole_image is not None else None
        configs, eval_cfgs = configurations(settings)
        _check_bootstrap(len(configs) * len(eval_cfgs), config.n_boot)
        results = _run(configs, eval_cfgs, evaluations, config, whole)
        rows = sorted(results.values(), key=lambda r: (-np.nan_to_num(r.mean, nan=-1.0), canonical(r.config)))
        result = AblationResult(rows, [k for k in DEFAULTS if len(settings[k]) > 1],
                                {k: settings[k][0] for k in DEFAULTS if len(settings[k]) == 1}, protocol, config.seeds,
                                str(train.path), seconds=0.0, trainings=len(configs) * config.seeds * len(evaluations))
        result.extra["data"] = _data_mode(train, in_memory, config.memory_limit)
        result.extra["bootstrap"] = _bootstrap(rows, [f.test.images for f in evaluations], n_boot=config.n_boot)
        if config.save_best is not None:
            try:
                _save_best(rows[0].config, train, config, whole)
            except FeaturecacheError as e:  # the sweep's table is not lost with the head
                result.seconds = time.perf_counter() - t0
                raise AblationError(e.message, param=e.param or "save_best", result=result) from None
            result.best_head_path = str(config.save_best)
    result.seconds = time.perf_counter() - t0
    return result


def _save_best(cfg: dict, train, config: AblateConfig, whole: Optional[_WholeImage]) -> None:
    """Retrain a configuration on all training images (seed 0) and save the head, its configuration recorded."""
    head = _fit(cfg, Fold(train, train), 0, config, whole)
    head.summary["ablation_config"] = {k: show(v) for k, v in cfg.items() if k in relevant(cfg)}
    if head.spec.pools_patches:
        head.summary.update(pooling=cfg["pooling"], k=cfg["k"])
    if is_probe(cfg):
        head.summary["note"] = f"trained on whole-image features ({whole.path}); evaluate it on that cache"
    head.save(config.save_best)


def _bootstrap(rows: list, tables: list, *, n_boot: int, seed: int = 0) -> dict:
    """Paired bootstrap over images: each row's 95% interval and its differences to the best and probe rows.

    In each evaluation fold, ``n_boot`` resamples draw its images with replacement (seed
    ``seed``); the same draws serve every row, so differences are paired. A run's mAP is
    recomputed on each resample (an image drawn twice counts twice); a row's statistic is
    the mean over its runs, as its mAP is. Intervals: the 2.5th to 97.5th percentile spread
    of the resampled values around their mean, placed around the measured value
    (:func:`featurecache.metrics.interval`).
    """
    if not rows or n_boot <= 0:
        return {"resamples": 0}
    rng = np.random.RandomState(seed)
    for r in rows:
        r.boot = np.zeros(n_boot)
    for f, t in enumerate(tables):  # fold by fold, the resamples a chunk at a time: memory stays bounded
        step = max(1, _BOOT_CHUNK_VALUES // max(len(t), 1))
        for start in range(0, n_boot, step):
            weights = bootstrap_weights(len(t), min(step, n_boot - start), rng)
            for r in rows:
                for run_fold, scores in r.runs:
                    if run_fold == f:
                        r.boot[start:start + len(weights)] += bootstrap_map(scores, t.labels, t.difficult, weights,
                                                                            method=r.config["method"]) / len(r.runs)
    for r in rows:
        r.ci = interval(r.boot, center=r.mean)
    best = rows[0]
    probe = next((r for r in rows if is_probe(r.config)), None)
    for r in rows:
        if r is not best:
            r.vs_best = (r.mean - best.mean, *interval(r.boot - best.boot, center=r.mean - best.mean))
        if probe is not None and r is not probe:
            r.vs_probe = (r.mean - probe.mean, *interval(r.boot - probe.boot, center=r.mean - probe.mean))
    return {"resamples": n_boot, "seed": seed, "unit": "image, within each evaluation fold, paired across rows",
            "interval": "2.5th-97.5th percentile spread, centred on the measured value"}

