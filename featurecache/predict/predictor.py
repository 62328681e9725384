"""The predictor: a head file's extractor rebuilt from its recipe, run on new images, scored by the head."""


from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
from PIL import Image

from featurecache.backbones import FrozenBackbone
from featurecache.cache import KEPT_ALL, KEPT_PARTS, FeatureCache
from featurecache.datasets import ImageSet
from featurecache.errors import (
    BackboneError,
    CacheError,
    EvalError,
    FeaturecacheError,
    HeadError,
    PredictError,
)
from featurecache.extract import ExtractConfig, ExtractResult, extract
from featurecache.heads.trained import TrainedHead
from featurecache.maps import DEFAULT_MAP_METHOD, LocalizationMap, Localizer, MapConfig
from featurecache.outputs import check_not_inputs
from featurecache.overlay import MAX_SIDE
from featurecache.patches import PatchGrid
from featurecache.predict.inputs import collect_inputs, image_set_of
from featurecache.predict.pictures import draw_maps, one_map
from featurecache.predict.results import Predictions
from featurecache.settings import PREDICT, check_fields

logger = logging.getLogger(__name__)

__all__ = ["PredictConfig", "Predictor", "load_head", "predict"]

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
        How maps are made (:data:`featurecache.maps.MAP_METHODS`); the window methods need
        a head with patch scores, ``attention`` an attention head.
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
    reports : mapping, optional
        Other files the caller will write the results to (parameter -> path; the command
        line's ``--json``/``--csv``), refused with ``out`` when they are files the prediction reads.
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
    reports: Mapping = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(self, PREDICT, PredictError)
        try:
            self.map_config()
        except EvalError as e:
            raise PredictError(e.message, param="map_method" if e.param == "method" else e.param) from None

    def map_config(self, **options) -> MapConfig:
        """The :class:`MapConfig` of the maps (``options`` over this config's)."""
        return MapConfig(**{"method": self.map_method, "stride": self.stride, "runtime": self.runtime, **options})


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
        try:
            self.recipe = head.new_images_recipe()
        except HeadError as e:
            raise PredictError(f"{source}: {e.message}") from None

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
        return self.recipe.grid

    def backbone(self) -> FrozenBackbone:
        """The backbone the head's features came from, built once; refused when it would make other features."""
        if self._net is None:
            try:
                self._net = self.recipe.build_backbone(weights=self.weights, download=self.download)
            except BackboneError as e:
                raise PredictError(f"{self.source}: {e.message}", param=e.param) from None
        return self._net

    def _extract_config(self, config: PredictConfig) -> ExtractConfig:
        return self.recipe.extract_config(
            self.backbone(), batch_size=config.batch_size, workers=config.workers, device=self.device,
            strict=config.strict, overwrite=config.overwrite, runtime=config.runtime, threads=config.threads,
            progress=config.progress)

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
        items = collect_inputs(images, layout=config.layout, split=config.split, annotations=config.annotations,
                               strict=config.strict)
        self._check_outputs(config, items)
        scores = np.full((len(items), len(self.classes)), np.nan, np.float32)
        maps, boxes = [""] * len(items), [{} for _ in items]
        note, result, runtimes = "", None, {}
        with tempfile.TemporaryDirectory(prefix="featurecache-predict-") as tmp:
            images_set, where = image_set_of(items, Path(tmp), self.classes, kept=config.cache is not None)
            if images_set is not None:
                cache_path = Path(config.cache) if config.cache else Path(tmp) / "features.h5"
                result = self._extract(images_set, cache_path, config, tmp)
                with FeatureCache(cache_path) as cache:
                    runtimes["features"] = cache.provenance.extraction.get("runtime", "")
                    rows = self._score(cache, items, where, scores)
                    if config.maps is not None:
                        maps, boxes, note, runtimes["maps"] = draw_maps(self._localizer, cache, rows, items, scores,
                                                                        self.classes, config)
        label, text = self.head.scoring()
        predictions = Predictions(
            self.classes, [it.display for it in items], np.array([it.width for it in items]),
            np.array([it.height for it in items]), scores, [it.error for it in items], top=config.top,
            threshold=threshold, objective=self.head.objective, scoring=text, meaning=self.head.spec.scores,
            maps=maps, maps_note=note, boxes=boxes, cache=Path(config.cache) if config.cache else None,
            extraction=result, runtimes={k: v for k, v in runtimes.items() if v}, seconds=time.perf_counter() - t0)
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
            check_not_inputs({"out": config.out, "cache": config.cache, "maps": config.maps, **config.reports},
                             {"an input image": [it.path for it in items if it.path is not None],
                              "a file of an input data set": set().union(*(it.reads for it in items)),
                              "an input folder": {it.folder for it in items if it.folder is not None},
                              "the head file": self.source if Path(self.source).is_file() else None,
                              "the weights file": self.weights, "the annotations file": config.annotations},
                             folders=("maps",))
        except FeaturecacheError as e:
            raise PredictError(e.message, param=e.param) from None

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
            ``cam`` maps run the backbone's dense trunk on the image only; the window and
            attention methods extract its patches first.

        Returns
        -------
        LocalizationMap
            ``.picture()`` draws it over the image.
        """
        return one_map(self, image, cls, self._map(replace, config or MapConfig(), **options))


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
