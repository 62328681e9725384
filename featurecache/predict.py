"""Prediction: a trained head used on new images, giving scores, labels and localisation pictures.

A head file records how its training cache was extracted (backbone and the SHA-256 of its
weights, layer, preprocessing, patch grid, mode, stored dtype). :func:`load_head` reads it
and rebuilds that extractor once, finding the weights the same way ``extract`` does and
refusing, with the setting that differs, weights whose hash is not the recorded one. The
new images then go through :func:`featurecache.extract.extract` itself (batches span
images), into a temporary cache or a kept one, and are scored by the head's own route
(:meth:`~featurecache.heads.trained.TrainedHead.image_scores`), exactly as ``eval`` scores a
cache. An image that cannot be read gets a row with its error; the others are scored.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import re
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

from featurecache.backbones import FrozenBackbone, sha256_file
from featurecache.cache import KEPT_ALL, KEPT_PARTS, FeatureCache
from featurecache.datasets import ImageRecord, ImageSet, detect_layout, read_dataset
from featurecache.errors import (
    BackboneError,
    CacheError,
    DatasetError,
    EvalError,
    FeaturecacheError,
    HeadError,
    PredictError,
    integer_at_least,
)
from featurecache.extract import ExtractConfig, ExtractResult, extract
from featurecache.heads.trained import TrainedHead
from featurecache.images import folder_images, image_size, name_problem, oriented, to_rgb
from featurecache.localize import DEFAULT_MAP_METHOD, LocalizationMap, Localizer, MapConfig, backbone_of
from featurecache.outputs import check_not_inputs, csv_text, json_text, os_reason, printable, write_text
from featurecache.overlay import MAX_SIDE
from featurecache.patches import LabelRule, PatchGrid

logger = logging.getLogger(__name__)

__all__ = ["PredictConfig", "Predictions", "Predictor", "load_head", "predict"]

ImageInput = Union[str, "os.PathLike[str]", Image.Image, np.ndarray]


@dataclass(frozen=True)
class PredictConfig:
    """How to predict: every option of :meth:`Predictor.predict` but the images.

    Attributes
    ----------
    top : int
        Classes listed per image, best first.
    threshold : float, optional
        Classes scoring at least this are an image's labels. Default 0.5 for heads whose
        scores are probabilities (image-level logistic, MIL, hybrid); for the others (the
        paper's pooled patch scores, fusion) no default, and the labels are left empty.
    out : path, optional
        Write the records here when done: JSON for a ``.json`` name, else CSV
        (:meth:`Predictions.save`).
    maps : path, optional
        Folder for one PNG per image: the localisation map of its top class over the image;
        each record then has the box of each of its top classes (:meth:`LocalizationMap.box`).
    map_method : str
        How maps are made (:data:`featurecache.localize.MAP_METHODS`); the window methods need
        a head with patch scores.
    stride : int
        Map cell size in pixels.
    max_side : int
        Map pictures of larger images are scaled down to this longer side.
    cache : path, optional
        Keep the new images' features in this cache (resumable; usable by ``eval``,
        ``localize`` and another ``predict``); default a temporary file, removed after.
    layout, split, annotations
        How a data-set folder among the inputs is read (a VOC devkit's ``--split``, a COCO
        ``--annotations`` file); other folders are searched for images recursively.
    batch_size, workers : int, optional
        As for ``extract``; they do not change the features.
    strict : bool
        Stop at the first image that cannot be read instead of giving it an error row.
    overwrite : bool
        Replace a kept ``cache`` made of other images (or of files changed since).
    runtime, threads
        As for ``extract``: what runs the backbone on the CPU, and its threads.
    progress : bool, optional
    """

    top: int = 5
    threshold: Optional[float] = None
    out: Optional[Union[str, Path]] = None
    maps: Optional[Union[str, Path]] = None
    map_method: str = DEFAULT_MAP_METHOD
    stride: int = 8
    max_side: int = MAX_SIDE
    cache: Optional[Union[str, Path]] = None
    layout: str = "auto"
    split: Optional[str] = None
    annotations: Optional[Union[str, Path]] = None
    batch_size: Optional[int] = None
    workers: Optional[int] = None
    strict: bool = False
    overwrite: bool = False
    runtime: str = "auto"
    threads: Optional[int] = None
    progress: Optional[bool] = None

    def __post_init__(self) -> None:
        for name in ("top", "stride", "max_side"):
            value = getattr(self, name)
            if not integer_at_least(value, 1):
                raise PredictError(f"must be a positive integer, got {value!r}", param=name)
        t = self.threshold
        if t is not None and (not isinstance(t, numbers.Real) or isinstance(t, bool) or not math.isfinite(t)):
            raise PredictError(f"must be a finite number, got {t!r}", param="threshold")
        try:
            self.map_config()
        except EvalError as e:
            raise PredictError(e.message, param="map_method" if e.param == "method" else e.param) from None

    def map_config(self, **options) -> MapConfig:
        """The :class:`MapConfig` of the maps (``options`` over this config's)."""
        return MapConfig(**{"method": self.map_method, "stride": self.stride, **options})


# --------------------------------------------------------------------------- results


@dataclass
class Predictions:
    """One row per input image: its scores, top classes, labels, error and map picture.

    Attributes
    ----------
    classes : tuple of str
    paths : list of str
        Each image as given (folders' images as folder/relative path; ``<image N>`` for
        in-memory images).
    width, height : ndarray (M,) int
        Pixels as the file's header says; 0 when not even that could be read.
    scores : ndarray (M, C) float32
        The head's image scores, NaN in rows of images that could not be read.
    errors : list of str
        Why an image could not be scored ('' when it was).
    top : int
    threshold : float or None
        The labels' threshold (None: no labels).
    objective, scoring, meaning : str
        The head's objective, how it scores images, and what the numbers mean.
    maps : list of str
        The map picture of each image ('' none).
    boxes : list of dict
        Per image, class -> ``[x0, y0, x1, y1]`` from its map, for its top classes (when maps
        were drawn).
    maps_note : str
        Why no maps were drawn, when they were asked for and could not be.
    cache : Path, optional
        The kept feature cache.
    extraction : ExtractResult, optional
    seconds : float
    """

    classes: tuple
    paths: list
    width: np.ndarray
    height: np.ndarray
    scores: np.ndarray
    errors: list
    top: int
    threshold: Optional[float]
    objective: str
    scoring: str
    meaning: str
    maps: list = field(default_factory=list)
    maps_note: str = ""
    boxes: list = field(default_factory=list)
    cache: Optional[Path] = None
    extraction: Optional[ExtractResult] = None
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def n_scored(self) -> int:
        return sum(1 for e in self.errors if not e)

    @property
    def n_failed(self) -> int:
        return len(self.errors) - self.n_scored

    def top_classes(self, i: int) -> list:
        """``[(class, score), ...]``: image ``i``'s best :attr:`top` classes, best first."""
        if self.errors[i]:
            return []
        order = np.argsort(-self.scores[i], kind="stable")[: self.top]
        return [(self.classes[c], float(self.scores[i, c])) for c in order]

    def labels(self, i: int) -> list:
        """Image ``i``'s classes scoring at least :attr:`threshold`, best first."""
        if self.errors[i] or self.threshold is None:
            return []
        order = np.argsort(-self.scores[i], kind="stable")
        return [self.classes[c] for c in order if self.scores[i, c] >= self.threshold]

    def records(self) -> list:
        """One dictionary per image: ``path``, ``width``, ``height``, ``top``, ``labels``, ``error``,
        ``scores`` (class -> score), and ``map`` and ``boxes`` (class -> ``[x0, y0, x1, y1]``) when maps
        were drawn."""
        out = []
        for i, path in enumerate(self.paths):
            rec = {"path": path, "width": int(self.width[i]), "height": int(self.height[i]),
                   "top": [{"class": c, "score": s} for c, s in self.top_classes(i)], "labels": self.labels(i),
                   "error": self.errors[i],
                   "scores": {} if self.errors[i] else {c: float(v) for c, v in zip(self.classes, self.scores[i])}}
            if any(self.maps):
                rec["map"] = self.maps[i]
                rec["boxes"] = self.boxes[i] if self.boxes else {}
            out.append(rec)
        return out

    def to_json(self) -> str:
        """The records with what the scores mean."""
        return json_text({"objective": self.objective, "scoring": self.scoring, "scores_are": self.meaning,
                          "threshold": self.threshold, "classes": list(self.classes), "images": self.records()})

    def _class_columns(self, fixed: list) -> list:
        return [f"score:{c}" if c in fixed else c for c in self.classes]

    def to_csv(self) -> str:
        """One row per image: path, width, height, top-K classes and scores, labels, error, one column per class."""
        k = min(self.top, len(self.classes))
        fixed = ["path", "width", "height"] + [n for j in range(1, k + 1) for n in (f"top{j}", f"top{j}_score")]
        fixed += ["labels", "error"] + (["map"] if any(self.maps) else [])
        rows = [fixed + self._class_columns(fixed)]
        for i, path in enumerate(self.paths):
            top = self.top_classes(i)
            row = [path, int(self.width[i]), int(self.height[i])]
            for j in range(k):
                row += [top[j][0], f"{top[j][1]:.6g}"] if j < len(top) else ["", ""]
            row += [";".join(self.labels(i)), self.errors[i]] + ([self.maps[i]] if any(self.maps) else [])
            row += ["" if self.errors[i] else f"{v:.6g}" for v in self.scores[i]]
            rows.append(row)
        return csv_text(rows)

    def to_text(self, *, limit: int = 20) -> str:
        """A short table (the first ``limit`` images) and the summary line."""
        shown = min(len(self), limit)
        names = [printable(p) for p in self.paths[:shown]]  # a name cannot forge rows or move the cursor
        width = max([len(p) for p in names] + [5])
        lines = [f"{'image':<{width}}  {'top classes':<40}  labels"]
        for i in range(shown):
            if self.errors[i]:
                lines.append(f"{names[i]:<{width}}  error: {printable(self.errors[i])}")
                continue
            top = printable(", ".join(f"{c} {s:.3g}" for c, s in self.top_classes(i)[:3]))
            lines.append(f"{names[i]:<{width}}  {top:<40}  {printable(' '.join(self.labels(i))) or '-'}")
        if shown < len(self):
            lines.append(f"... {len(self) - shown} more (write them all with --out FILE.csv or .json)")
        return "\n".join(lines + [self.summary()])

    def summary(self) -> str:
        """One line: how many images were scored and failed, how, what the scores mean."""
        failed = f", {self.n_failed} could not be read (error column)" if self.n_failed else ""
        labels = (f"labels: score >= {self.threshold:g}" if self.threshold is not None
                  else "no labels without --threshold (these scores rank images; they are not probabilities)")
        line = f"{len(self)} images: {self.n_scored} scored{failed}; {self.objective} head, {self.scoring}; {labels}"
        return line + (f"; {self.seconds:.1f} s" if self.seconds else "")

    def save(self, path: Union[str, Path]) -> Path:
        """Write JSON for a ``.json`` file name, else CSV."""
        path = Path(path)
        return write_text(path, self.to_json() if path.suffix.lower() == ".json" else self.to_csv())


# --------------------------------------------------------------------------- inputs


@dataclass
class _Item:
    """One input image: where it is, how it is shown and named, its size or why it cannot be read."""

    display: str
    name: str  # a short relative name for its map picture: within its folder, or the file's name
    path: Optional[Path] = None
    pixels: Optional[np.ndarray] = None
    width: int = 0
    height: int = 0
    error: str = ""
    folder: Optional[Path] = None  # the input folder it was found in


def _is_voc(folder: Path) -> bool:
    try:
        return detect_layout(folder) == "voc"
    except DatasetError:  # no layout at all: searched for images like any folder
        return False


def _in_memory(item, position: int) -> _Item:
    """A PIL image or array, converted as image files are (:func:`featurecache.extract.to_rgb`)."""
    name = f"<image {position}>"
    if isinstance(item, Image.Image):
        try:  # scored as displayed, as image files are
            return _Item(name, f"image-{position}", pixels=to_rgb(oriented(item)))
        except (OSError, ValueError) as e:
            return _Item(name, f"image-{position}", error=f"cannot convert the image ({type(e).__name__})")
    a = item
    ok = a.dtype == np.uint8 and (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4)))
    if not ok or min(a.shape[:2]) < 1:
        return _Item(name, f"image-{position}", error=f"an array image must be non-empty (H, W[, 1, 3 or 4]) "
                                                        f"uint8, got {a.shape} {a.dtype}")
    a = a.reshape(a.shape[0], a.shape[1], -1)
    a = np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a[:, :, :3]
    return _Item(name, f"image-{position}", pixels=np.ascontiguousarray(a))


def _expand(item, position: int, config: PredictConfig) -> list:
    """The :class:`_Item` s of one input: a file, a folder, a data set, or an in-memory image."""
    if isinstance(item, (Image.Image, np.ndarray)):
        return [_in_memory(item, position)]
    if not isinstance(item, (str, bytes, os.PathLike)):
        raise PredictError(f"expected image paths, PIL images or arrays, got {type(item).__name__}", param="images")
    text = os.fsdecode(item)
    path = Path(text)
    if not path.exists():
        return [_Item(text, path.name, path, error="no such file or directory")]
    if not path.is_dir():  # a file, or a pipe or device that the header reader refuses
        return [_Item(text, path.name, path)]
    if config.annotations is not None or config.layout in ("voc", "coco") or (
            config.layout == "auto" and _is_voc(path)):
        ds = read_dataset(path, layout=config.layout, split=config.split, annotations=config.annotations)
        return [_Item(str(path / r.relpath), r.relpath, r.path, folder=path) for r in ds]
    if config.split is not None:
        raise PredictError(f"{path}: --split needs a VOC devkit folder", param="split")
    files = folder_images(path)
    if not files:
        return [_Item(text, path.name, path, error="no image files in this folder")]
    return [_Item(str(f), f.relative_to(path).as_posix(), f, folder=path) for f in files]


def _probe(item: _Item) -> None:
    """Read an image file's size (as displayed) from its header, or say why it cannot be read."""
    if item.error:
        return
    if item.pixels is not None:
        item.height, item.width = item.pixels.shape[:2]
        return
    item.error = name_problem(item.path)
    if not item.error:
        item.width, item.height, item.error = image_size(item.path, displayed=True)


def _collect(images, config: PredictConfig) -> list:
    """Every input expanded, duplicates (the same file twice) dropped, sizes read."""
    if isinstance(images, (str, bytes, os.PathLike, Image.Image, np.ndarray)):
        images = [images]
    items, seen = [], set()
    for position, item in enumerate(images):
        for it in _expand(item, position, config):
            key = os.path.realpath(it.path) if it.path is not None and it.pixels is None else id(it)
            if key in seen:
                continue
            seen.add(key)
            _probe(it)
            if it.error and config.strict:
                raise PredictError(f"{it.display}: {it.error} (--strict)")
            if it.error:
                logger.warning("%s: %s", it.display, it.error)
            items.append(it)
    if not items:
        raise PredictError("no input images given", param="images")
    return items


def _image_set(items: list, tmp: Path, classes: tuple, *, kept: bool) -> tuple:
    """An image set of the readable items (in-memory images written to ``tmp`` as lossless PNG).

    For a ``kept`` cache each file is stamped with the SHA-256 of its bytes, so that a file
    replaced by another of the same size and time (``cp -p``, rsync) is not taken for the one
    whose features the cache holds.

    Returns ``(ImageSet or None, {relpath: item position})``.
    """
    usable = []
    for i, it in enumerate(items):
        if it.error:
            continue
        if it.pixels is not None:
            it.path = tmp / "images" / f"{i:06d}.png"
            it.path.parent.mkdir(exist_ok=True)
            Image.fromarray(it.pixels).save(it.path)
        usable.append(i)
    if not usable:
        return None, {}
    # Made absolute without resolving '..' or links: a path as given stays the file it names.
    paths = [items[i].path.absolute() for i in usable]
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    records = []
    for i, p in zip(usable, paths):
        records.append(ImageRecord(p, p.relative_to(root).as_posix(), items[i].width, items[i].height,
                                   np.zeros((0, 4), np.float32), (), np.zeros(0, bool),
                                   stamp=f"sha256:{sha256_file(p)}" if kept else ""))
    where = {r.relpath: i for r, i in zip(records, usable)}
    return ImageSet(root, "plain", tuple(classes), records), where


# --------------------------------------------------------------------------- the predictor


class Predictor:
    """A trained head with the extractor that makes its features, rebuilt from the head file.

    Use :func:`load_head` to make one. The backbone is built on first use and kept, so
    that repeated :meth:`predict` calls pay for it once.

    Parameters
    ----------
    head : TrainedHead
    source : str
        The head file (named in errors).
    weights : str or path, optional
        Where the backbone weights are, when not where the head's training found them. Refused
        unless they hash to the recorded SHA-256.
    device : {"auto", "cpu", "cuda"}
    download : bool
        Let default weights missing from the local cache be downloaded (off: no network).
    """

    def __init__(self, head: TrainedHead, *, source: str = "head", weights: Optional[Union[str, Path]] = None,
                 device: str = "auto", download: bool = False) -> None:
        self.head = head
        self.source = source
        self.weights = None if weights is None else str(weights)
        self.download = bool(download)
        self.device = device
        self._net: Optional[FrozenBackbone] = None
        if not head.extraction or "grid" not in head.extraction or "backbone" not in head.extraction:
            raise PredictError(f"{source}: this head file does not record how its features were extracted "
                               "(written before featurecache 0.2); train it again with fit to predict with it")

    @property
    def classes(self) -> tuple:
        return tuple(self.head.classes)

    @property
    def objective(self) -> str:
        return self.head.objective

    def __repr__(self) -> str:
        fs = self.head.feature_settings
        return (f"Predictor({self.source!r}: {self.head.objective} {self.head.kind} head, {len(self.classes)} "
                f"classes, {fs.get('backbone')} at {fs.get('input_size')} px, {fs.get('mode')} mode)")

    # -- the extractor
    @property
    def grid(self) -> PatchGrid:
        return PatchGrid.from_dict(self.head.extraction["grid"])

    def backbone(self) -> FrozenBackbone:
        """The backbone the head's features came from, built once; refused when it would make other features."""
        if self._net is None:
            try:
                self._net = backbone_of(self.head, weights=self.weights, download=self.download)
            except BackboneError as e:
                raise PredictError(f"{self.source}: {e.message}", param=e.param) from None
        return self._net

    def _extract_config(self, config: PredictConfig) -> ExtractConfig:
        ex = self.head.extraction
        run = ex.get("extraction") or {}
        mode = self.head.feature_settings["mode"]
        return ExtractConfig(
            backbone=self.backbone(), grid=self.grid,
            rule=LabelRule.from_dict(ex["label_rule"]) if ex.get("label_rule") else None, mode=mode,
            dtype=run.get("dtype", "float16"), part_patches=int(run.get("part_patches", 2048)),
            max_side=run.get("max_side") or 2048, batch_size=config.batch_size, workers=config.workers,
            device=self.device, strict=config.strict, overwrite=config.overwrite, runtime=config.runtime,
            threads=config.threads, progress=config.progress)

    # -- use
    def predict(self, images: Union[ImageInput, Sequence[ImageInput]], config: Optional[PredictConfig] = None,
                **options) -> Predictions:
        """Score new images with the head.

        Parameters
        ----------
        images : path, PIL image, array, or a sequence of them
            Image files, folders (searched recursively), data-set folders (any layout
            ``extract`` reads), PIL images or ``(H, W, 3)`` uint8 arrays.
        config : PredictConfig, optional
        **options
            Fields of :class:`PredictConfig` over those of ``config``.

        Returns
        -------
        Predictions
            ``.records()`` as the command line writes them, ``.scores`` as a matrix.

        Raises
        ------
        PredictError
            A head without extraction record, weights that are missing or differ, bad
            options, an output that is one of the files read (``out``, ``cache``, ``maps``);
            with ``strict=True``, the first unreadable image.
        """
        t0 = time.perf_counter()
        config = replace(config, **options) if config is not None else PredictConfig(**options)
        threshold = config.threshold if config.threshold is not None else (
            0.5 if self.head.spec.probabilities else None)
        items = _collect(images, config)
        self._check_outputs(config, items)
        scores = np.full((len(items), len(self.classes)), np.nan, np.float32)
        maps, boxes = [""] * len(items), [{} for _ in items]
        note, result = "", None
        with tempfile.TemporaryDirectory(prefix="featurecache-predict-") as tmp:
            images_set, where = _image_set(items, Path(tmp), self.classes, kept=config.cache is not None)
            if images_set is not None:
                cache_path = Path(config.cache) if config.cache else Path(tmp) / "features.h5"
                result = self._extract(images_set, cache_path, config, tmp)
                with FeatureCache(cache_path) as cache:
                    rows = self._score(cache, items, where, scores)
                    if config.maps is not None:
                        note = self._draw_maps(cache, rows, items, scores, maps, boxes, config)
        label, text = self.head.scoring()
        predictions = Predictions(self.classes, [it.display for it in items], np.array([it.width for it in items]),
                                  np.array([it.height for it in items]), scores, [it.error for it in items],
                                  config.top, threshold, self.head.objective, text, self.head.spec.scores, maps, note,
                                  boxes, Path(config.cache) if config.cache else None, result,
                                  time.perf_counter() - t0)
        if config.out is not None:
            predictions.save(config.out)
        return predictions

    def _extract(self, images_set: ImageSet, cache_path: Path, config: PredictConfig, tmp: str) -> ExtractResult:
        """Extraction into the kept or temporary cache; a failed write of a temporary one says that nothing
        is kept (its folder is removed) rather than that the command resumes."""
        try:
            return extract(images_set, cache_path, self._extract_config(config))
        except CacheError as e:
            if config.cache is not None:
                raise
            gone = (f"the temporary cache in {tmp} is removed; free space there, set TMPDIR to a folder with room, "
                    "or keep the features with --cache")
            raise PredictError(e.message.replace(KEPT_PARTS, gone).replace(KEPT_ALL, gone)) from None

    def _check_outputs(self, config: PredictConfig, items: list) -> None:
        """Refuse outputs that would overwrite what this prediction reads, before anything runs."""
        try:
            check_not_inputs({"out": config.out, "cache": config.cache, "maps": config.maps},
                             {"an input image": [it.path for it in items if it.path is not None],
                              "an input folder": [p for p in self._folders(items)],
                              "the head file": self.source if Path(self.source).is_file() else None,
                              "the weights file": self.weights, "the annotations file": config.annotations},
                             folders=("maps",))
        except FeaturecacheError as e:
            raise PredictError(e.message, param=e.param) from None

    @staticmethod
    def _folders(items: list) -> set:
        return {it.folder for it in items if it.folder is not None}

    def _score(self, cache: FeatureCache, items: list, where: dict, scores: np.ndarray) -> dict:
        """Fill ``scores`` and the errors of images skipped at extraction; returns item -> cache image row."""
        try:
            self.head.check_cache(cache)
        except HeadError as e:
            raise PredictError(f"{self.source}: {e}") from None
        for relpath, reason in cache.skipped:
            items[where[relpath]].error = reason
        paths = cache.images.path
        if paths:
            scores[[where[p] for p in paths]] = self.head.image_scores(cache)
        for i in np.flatnonzero(~np.isfinite(scores).all(axis=1)):
            if not items[i].error:  # not counted as scored, never written as a number
                items[i].error = "the head's scores for this image are not finite (NaN or infinite features?)"
                scores[i] = np.nan
        return {where[p]: row for row, p in enumerate(paths)}

    def _draw_maps(self, cache: FeatureCache, rows: dict, items: list, scores: np.ndarray, maps: list, boxes: list,
                   config: PredictConfig) -> str:
        try:
            maker = self._localizer(config.map_config())
        except EvalError as e:  # a method this head cannot make: predictions without maps
            return f"no maps: {e.message}"
        out = Path(config.maps)
        used: set = set()
        failed = []
        for i, row in sorted(rows.items()):
            order = np.argsort(-scores[i], kind="stable")[:config.top]
            c = int(order[0])
            try:  # one image's map failing costs that map, not the predictions
                m = maker.cache_map(cache, row, image_file=str(items[i].path))  # an array's PNG too
                caption = (f"{self.classes[c]}  score {scores[i, c]:.3g}  map {m.scores[c].min():.2f}-"
                           f"{m.peak(c)[0]:.2f}")
                name = _map_name(items[i].name, self.classes[c], used)
                maps[i] = str(m.save_png(out / name, c, caption=caption, max_side=config.max_side))
            except (EvalError, OSError) as e:
                failed.append(f"{items[i].display}: {e.message if isinstance(e, EvalError) else os_reason(e)}")
                continue
            boxes[i] = {self.classes[k]: [round(v, 1) for v in m.box(int(k))] for k in order}
        return f"{len(failed)} map(s) not drawn, e.g. {failed[0]}" if failed else ""

    def _localizer(self, config: MapConfig) -> Localizer:
        """A map maker for this head, sharing its backbone (built on first use)."""
        return Localizer(self.head, replace(config, weights=self.weights, device=self.device, download=self.download),
                         backbone=self.backbone() if config.uses_cells else None)

    def _map(self, make, *args, **kwargs):
        """``make(*args, **kwargs)`` with map errors as this module's."""
        try:
            return make(*args, **kwargs)
        except EvalError as e:
            raise PredictError(e.message, param=e.param) from None

    def localization_map(self, image: ImageInput, cls: Union[int, str, None] = None, *,
                         config: Optional[MapConfig] = None, **options) -> LocalizationMap:
        """The localisation map of one new image.

        Parameters
        ----------
        image : path, PIL image or array
        cls : int or str, optional
            Keep this class's map only; default all classes.
        config : MapConfig, optional
        **options
            Fields of :class:`MapConfig` over those of ``config`` (``method=``, ``stride=`` ...).
            ``cam`` maps run the backbone's dense trunk on the image only; the window methods
            extract its patches first.

        Returns
        -------
        LocalizationMap
            ``.picture()`` draws it over the image.
        """
        if isinstance(image, (list, tuple)):
            raise PredictError("takes one image; use predict(..., maps=DIR) for several", param="image")
        config = self._map(replace, config or MapConfig(), **options)
        try:
            maker = self._localizer(config)
        except EvalError as e:  # this head cannot make such maps
            raise PredictError(f"{self.source}: {e.message}", param=e.param) from None
        items = _collect([image], PredictConfig(strict=True, workers=0, progress=False))
        if len(items) != 1:
            raise PredictError(f"{items[0].display}: takes one image, this is a folder of {len(items)}", param="image")
        item = items[0]
        if config.uses_windows:
            with tempfile.TemporaryDirectory(prefix="featurecache-predict-") as tmp:
                images_set, _ = _image_set(items, Path(tmp), self.classes, kept=False)
                cache_path = Path(tmp) / "features.h5"
                extract(images_set, cache_path, self._extract_config(PredictConfig(strict=True, workers=0,
                                                                                   progress=False)))
                with FeatureCache(cache_path) as cache:
                    m = self._map(maker.cache_map, cache, 0, image_file=str(item.path))
        elif item.pixels is not None:
            m = self._map(maker.pixels_map, item.pixels)
        else:
            m = self._map(maker.file_map, item.path)
        m.path = item.display
        m.image_file = "" if item.pixels is not None else str(item.path.absolute())
        if cls is not None:
            c = m.class_index(cls)
            m.classes, m.scores = (m.classes[c],), m.scores[c:c + 1]
        return m


def _map_name(name: str, cls: str, used: set) -> str:
    """``<name without suffix>.<class>.png``, made unique (``a.jpg`` and ``a.png``, or two inputs' ``a.jpg``).

    ``name`` is the image's path within the folder it was found in, or its file name.
    """
    stem = str(Path(name).with_suffix(""))
    label = re.sub(r"[^\w.-]+", "_", cls)
    name, k = f"{stem}.{label}.png", 2
    while name in used:
        name, k = f"{stem}-{k}.{label}.png", k + 1
    used.add(name)
    return name


def load_head(path: Union[str, Path], *, weights: Optional[Union[str, Path]] = None,
              device: str = "auto", download: bool = False) -> Predictor:
    """Read a head file for use on new images.

    Parameters
    ----------
    path : path
        A head file written by ``featurecache fit`` (or :meth:`TrainedHead.save`).
    weights : str or path, optional
        Where the backbone weights are, when not where training found them (refused unless
        their SHA-256 is the recorded one).
    device : {"auto", "cpu", "cuda"}
    download : bool
        Let the backbone's default weights be downloaded when they are not in the local cache
        (timm, torchvision); off by default: no network.

    Returns
    -------
    Predictor

    Examples
    --------
    >>> head = featurecache.load_head("voc.head.pt")           # doctest: +SKIP
    >>> result = head.predict(["cat.jpg", "photos/"])           # doctest: +SKIP
    >>> result.records()[0]["top"][0]                           # doctest: +SKIP
    {'class': 'cat', 'score': 0.93}
    """
    return Predictor(TrainedHead.load(path, device=device), source=str(path), weights=weights, device=device,
                     download=download)


def predict(head: Union[str, Path], images: Sequence[ImageInput], config: Optional[PredictConfig] = None, *,
            weights: Optional[Union[str, Path]] = None, device: str = "auto", download: bool = False,
            **options) -> Predictions:
    """:func:`load_head` then :meth:`Predictor.predict`: what ``featurecache predict`` runs."""
    return load_head(head, weights=weights, device=device, download=download).predict(images, config, **options)
