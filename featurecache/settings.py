"""The options table of stage one, prediction and maps: every setting's choices, range, default and help, once.

Stage two has its own table (:mod:`featurecache.heads.registry`); this one holds the settings
of ``inspect``, ``extract``, ``predict`` and ``localize``. The configuration dataclasses
(:class:`~featurecache.extract.ExtractConfig`, :class:`~featurecache.predict.PredictConfig`,
:class:`~featurecache.maps.MapConfig`) check their fields with it (:func:`check_fields`), and the
command line makes its options from it, so a range or a default cannot differ between the two.
Importing it loads no torch.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, replace
from typing import Any, Mapping, Optional, Type

from featurecache.datasets import LAYOUTS, MAX_PIXELS
from featurecache.errors import FeaturecacheError
from featurecache.metrics import METHODS
from featurecache.overlay import MAX_SIDE as PICTURE_SIDE
from featurecache.patches import DEFAULT_SCALES, MAX_INPUT_SIZE, MAX_PATCHES, PatchGrid
from featurecache.resources import (
    ASSEMBLE_MODES,
    BOX_THRESHOLD,
    DEFAULT_MAP_METHOD,
    DEFAULT_MAX_SIDE,
    DEVICES,
    MAP_METHODS,
    MAX_STRIDE,
    MIN_MAX_SIDE,
    POINTING_TOLERANCE,
    RUNTIMES,
)

__all__ = ["COMPRESSIONS", "DTYPES", "EXTRACT", "GRID", "IMAGES_PER_GROUP", "INSPECT", "LOCALIZE", "MAP",
           "MAX_MAP_SCALE", "MODES", "PREDICT", "REPORT", "REPORT_LOCALIZATION", "REPORT_MAPS", "Setting",
           "EXPORT", "check_fields", "grid_from", "parse_image_size", "parse_scales"]

#: Stored feature types, HDF5 compressions and extraction modes (``extract``).
DTYPES = ("float16", "float32")
COMPRESSIONS = ("none", "lzf", "gzip")
MODES = ("crop", "dense")

#: Largest λ of a cam map (as a grid's scales: a patch side of min(w, h)/16).
MAX_MAP_SCALE = 16.0

#: ``report``: images shown per class and kind (top-scoring, false positives, misses), by default; at
#: most 3 x this many thumbnails per class (each image's thumbnail stored once on the page).
IMAGES_PER_GROUP = 8

#: ``report``'s maps: ``auto`` = windows for heads with patch scores (cache only), else cam when the
#: images are there; ``none`` draws none.
REPORT_MAPS = ("auto",) + MAP_METHODS + ("none",)

#: ``report``'s localisation summary: ``auto`` = measured when the data set has boxes and the maps read
#: the cache only (windows: seconds); ``on`` with cam maps too (one backbone pass per image); ``off``.
REPORT_LOCALIZATION = ("auto", "on", "off")

#: Kinds of setting: how a value is checked and how the command line reads it.
KINDS = ("int", "float", "choice", "flag", "text", "path", "file", "folder", "scales", "device", "size")


@dataclass(frozen=True)
class Setting:
    """One setting of stage one, prediction or maps.

    Attributes
    ----------
    name : str
        The library parameter (a configuration field); the flag is ``--name`` with dashes.
    default : object
        The default, or ``None`` when it is decided at run time (``help`` says how).
    help : str
    kind : str
        One of :data:`KINDS`. ``device`` takes :data:`~featurecache.resources.DEVICES` on the
        command line and anything :func:`~featurecache.resources.resolve_device` takes in the
        library; ``scales`` is a non-empty sequence of distinct numbers in the range; ``path``
        is an existing file, ``file`` a file to write, ``folder`` a folder to write in.
    choices : tuple of str
    low, high : float, optional
        Inclusive range; ``low_open``/``high_open`` make an end exclusive.
    flag : str, optional
        The command-line flag, when it is not the name's (``part_patches`` is ``--part-size``).
    cli : bool
        Whether the command line offers it (a few settings are the library's only).
    """

    name: str
    default: Any
    help: str
    kind: str = "int"
    choices: tuple = ()
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    flag: Optional[str] = None
    cli: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:  # pragma: no cover - a table error
            raise ValueError(f"{self.name}: unknown kind {self.kind!r}")

    @property
    def option(self) -> str:
        """The command-line flag."""
        return "--" + (self.flag or self.name).replace("_", "-")

    def problem(self, value: Any) -> Optional[str]:
        """Why ``value`` is not a valid value of this setting, or ``None`` (``None`` is always valid)."""
        if value is None:
            return None
        check = {"int": self._int, "float": self._float, "choice": self._choice, "flag": self._flag,
                 "scales": self._scales}.get(self.kind)
        return check(value) if check else (None if isinstance(value, (str, os.PathLike)) or self.kind == "device"
                                           else f"must be a string, got {value!r}")

    def check(self, value: Any, error: Type[FeaturecacheError] = FeaturecacheError) -> None:
        """Raise ``error`` naming this setting when ``value`` is not valid."""
        reason = self.problem(value)
        if reason:
            raise error(reason, param=self.name)

    def _range(self) -> str:
        """`` in [1, 1024]``, `` of at least 64``, `` above 0`` ... (empty without bounds)."""
        if self.low is not None and self.high is not None:
            return (f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f" above {self.low:g}" if self.low_open else f" of at least {self.low:g}"
        if self.high is not None:
            return f" below {self.high:g}" if self.high_open else f" of at most {self.high:g}"
        return ""

    def _within(self, v: float) -> bool:
        above = self.low is None or (v > self.low if self.low_open else v >= self.low)
        below = self.high is None or (v < self.high if self.high_open else v <= self.high)
        return above and below

    def _int(self, value) -> Optional[str]:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool) and self._within(value):
            return None
        if self.low == 1 and self.high is None:
            return f"must be a positive integer, got {value!r}"
        return f"must be an integer{self._range()}, got {value!r}"

    def _float(self, value) -> Optional[str]:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok and self._within(value) else f"must be a finite number{self._range()}, got {value!r}"

    def _choice(self, value) -> Optional[str]:
        return None if value in self.choices else f"must be one of {', '.join(self.choices)}, got {value!r}"

    def _flag(self, value) -> Optional[str]:
        return None if isinstance(value, bool) else f"must be True or False, got {value!r}"

    def _scales(self, value) -> Optional[str]:
        numbers_ok = not isinstance(value, (str, bytes)) and hasattr(value, "__len__") and len(value) > 0 and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and self._within(v)
            for v in value)
        if numbers_ok and len({float(v) for v in value}) == len(value):
            return None
        return f"must be distinct numbers{self._range()} (λ, as the grid's scales), got {value!r}"


def check_fields(config: Any, table: Mapping[str, Setting], error: Type[FeaturecacheError], *,
                 skip: tuple = ()) -> None:
    """Check every field of ``config`` that ``table`` knows but ``skip`` (an ``error`` naming the first bad one)."""
    for name, setting in table.items():
        if hasattr(config, name) and name not in skip:
            setting.check(getattr(config, name), error)


def _table(*settings: Setting) -> dict:
    return {s.name: s for s in settings}


def parse_scales(text: str) -> tuple:
    """``"1,1.3,2"`` -> ``(1.0, 1.3, 2.0)`` (a ``ValueError`` saying what is expected otherwise)."""
    try:
        scales = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated numbers like 1,1.3,2, got {text!r}") from None
    if not scales:
        raise ValueError("no scales given")
    return scales


def parse_image_size(text: str) -> tuple:
    """``"500,375"`` (or ``500x375``) -> ``(500, 375)``: an image's width and height in pixels."""
    try:
        width, height = (int(v) for v in str(text).replace("x", ",").split(","))
    except ValueError:
        raise ValueError(f"give WIDTH,HEIGHT in pixels (e.g. 500,375), got {text!r}") from None
    return width, height


def grid_from(options: Mapping[str, Any]) -> PatchGrid:
    """The :class:`PatchGrid` of the :data:`GRID` settings in ``options`` (a ``ValueError`` if it is not one)."""
    return PatchGrid(scales=options["scales"], min_overlap=options["overlap"], input_size=options["input_size"],
                     whole=options["whole_image"])


# --------------------------------------------------------------------------- the settings

_CPU_NOTE = "[default: the CPUs this process may use (affinity, container quota)]"

# Data sets (inspect, extract; predict's data-set folders).
LAYOUT = Setting("layout", "auto", "Data set layout.", "choice", ("auto",) + LAYOUTS)
SPLIT = Setting("split", None, "VOC split: ImageSets/Main/<SPLIT>.txt (default: every annotation).", "text")
ANNOTATIONS = Setting("annotations", None, "COCO instances JSON; DATASET is then the image folder.", "path")
CLASSES_FILE = Setting("classes_file", None, "Class list file, one name a line (default: sorted names found).",
                       "path", flag="classes")

#: The patch grid (:class:`~featurecache.patches.PatchGrid`, which checks the grid as a whole).
GRID = _table(
    Setting("scales", DEFAULT_SCALES, "Scales λ (patch side = min(w, h)/λ), comma-separated.", "scales", low=1.0),
    Setting("overlap", 0.5, "Minimum IoU between neighbouring patches.", "float", low=0.0, high=1.0, high_open=True),
    Setting("input_size", 224, "Network input side in pixels; every patch is resized to it.", low=8,
            high=MAX_INPUT_SIZE),
    Setting("whole_image", False, "One patch per image: the whole image (baseline).", "flag"),
    Setting("max_patches", MAX_PATCHES, "Most patches of one image: images beyond (thin strips) are skipped and "
            "recorded; a grid beyond it for most images is refused.", low=1),
)

_BACKEND = _table(
    Setting("batch_size", None, "Patches per forward pass [default: 16 on CPU, 256 on CUDA].", low=1),
    Setting("workers", None, "Image decoding processes [default: min(4, CPUs)].", low=0),
    Setting("device", "auto", "auto = CUDA when present (mixed precision, channels-last).", "device", DEVICES),
    Setting("strict", False, "Stop at an unreadable image instead of skipping and recording it.", "flag"),
    Setting("overwrite", False, "Replace an existing cache or unfinished run with other settings.", "flag"),
    Setting("download", False, "Download the backbone's default weights (timm, torchvision) when they are not in "
            "the local cache; without it featurecache makes no network connection.", "flag"),
    Setting("runtime", "auto", "CPU runtime of the backbone, or of the dense trunk in dense mode (not AlexNet/VGG's): "
            "auto = the fastest installed whose features agree with torch's (openvino, onnxruntime, torch); torch on "
            "CUDA.", "choice", RUNTIMES),
    Setting("threads", None, f"CPU threads {_CPU_NOTE}.", low=1),
)

#: ``inspect``: a data set, a grid and the labelling rule.
INSPECT = _table(
    LAYOUT, SPLIT, ANNOTATIONS, CLASSES_FILE, *GRID.values(),
    Setting("min_patch_fraction", 0.2, "A patch qualifies for an object when |P∩B| >= this × |P| ...", "float",
            low=0.0, high=1.0, low_open=True),
    Setting("min_object_fraction", 0.6, "... and |P∩B| >= this × |B|.", "float", low=0.0, high=1.0, low_open=True),
)

#: ``extract`` (:class:`~featurecache.extract.ExtractConfig`).
EXTRACT = _table(
    LAYOUT, SPLIT, ANNOTATIONS, CLASSES_FILE,
    Setting("backbone", "efficientnet_lite0", "efficientnet_lite0, alexnet, vgg16, resnet50, another torchvision "
            "model (with --layer), or timm:<name>.", "text"),
    Setting("layer", None, "Torchvision graph node to read (default: the backbone's own).", "text"),
    Setting("weights", "default", "'default' (packaged or cached weights), a torchvision weights name, a state-dict "
            "file, or 'none' (random; for tests).", "text"),
    *GRID.values(),
    Setting("mode", "crop", "crop: every patch through the whole network (the paper's, the default by measurement); "
            "dense: the trunk once per image and scale, windows pooled from its feature map (4-8x faster on CPU; "
            "with fit's default, 6.4 mAP lower on the VOC sample, within noise on BCCD: docs/results.md).",
            "choice", MODES),
    Setting("max_side", DEFAULT_MAX_SIDE, "Dense mode: largest trunk input side; larger images run in overlapping "
            "tiles (same features up to float rounding).", low=MIN_MAX_SIDE),
    _BACKEND["batch_size"], _BACKEND["workers"], _BACKEND["device"],
    Setting("dtype", "float16", "Stored feature type.", "choice", DTYPES),
    Setting("compression", "none", "HDF5 compression of the features.", "choice", COMPRESSIONS),
    Setting("part_patches", 2048, "Patches per committed part (the most a crash can lose).", low=1,
            flag="part_size"),
    Setting("max_pixels", MAX_PIXELS, "Images with more pixels are skipped and recorded before decoding (3 bytes a "
            "pixel decoded, in each worker).", low=1),
    _BACKEND["overwrite"], _BACKEND["strict"],
    Setting("assemble", "copy", "copy: one self-contained file; virtual: OUT maps its features onto the part "
            "files, kept in OUT.<run>.data/ beside it (no copy; move the two together).", "choice", ASSEMBLE_MODES),
    _BACKEND["download"], _BACKEND["runtime"], _BACKEND["threads"],
)

_METHOD = Setting("method", DEFAULT_MAP_METHOD, "cam: the head scores every cell of the backbone's feature map at "
                  "the head's scales, log-odds averaged over scales; windows: the paper's per-pixel mean of the "
                  "cached patches' scores (patch, mil, hybrid, attention heads); cam*windows: the geometric mean of "
                  "the two; attention: the per-pixel mean of an attention head's patch attention weights.",
                  "choice", MAP_METHODS, flag="map_method")
_STRIDE = Setting("stride", 8, "Map cell size in pixels.", low=1, high=MAX_STRIDE)

#: Maps (:class:`~featurecache.maps.MapConfig`).
MAP = _table(
    _METHOD, _STRIDE,
    Setting("scales", None, "λ of the cam maps, comma-separated [default: the head's grid].", "scales", low=1.0,
            high=MAX_MAP_SCALE, flag="map_scales"),
    Setting("box_threshold", BOX_THRESHOLD, "A map's box: the cells connected to its peak scoring at least this "
            "fraction of the way from the map's minimum to its peak.", "float", low=0.0, high=1.0, low_open=True,
            high_open=True),
    Setting("device", "auto", "Where the backbone runs (cam maps).", "device", DEVICES),
    Setting("weights", None, "cam maps: the backbone weights file, when not where the head's training found it.",
            "text"),
    _BACKEND["download"],
    Setting("max_side", DEFAULT_MAX_SIDE, "Largest trunk input side; larger inputs run in overlapping tiles.",
            low=MIN_MAX_SIDE),
    replace(_BACKEND["runtime"], help="What runs the backbone's trunk for cam maps on the CPU: auto = the fastest "
            "installed whose features agree with torch's (openvino, onnxruntime, torch); torch on CUDA."),
)

#: ``localize``: maps, and their evaluation.
LOCALIZE = _table(
    *(MAP[n] for n in ("method", "stride", "scales", "box_threshold")),
    Setting("split", None, "--evaluate: only the cache's images of this split (e.g. val).", "text"),
    Setting("tolerance", POINTING_TOLERANCE, "--evaluate: pixels a map's peak may miss a box by (reported beside "
            "0).", low=0),
    *(MAP[n] for n in ("weights", "device", "download", "runtime")),
)

#: ``predict`` (:class:`~featurecache.predict.PredictConfig`; the backbone's device, weights and
#: download are :class:`~featurecache.predict.Predictor`'s).
PREDICT = _table(
    Setting("top", 5, "Classes listed per image, best first.", low=1),
    Setting("threshold", None, "Labels: classes scoring at least this [default: 0.5 for heads whose scores are "
            "probabilities (image, mil, hybrid); none for pooled patch scores and fusion].", "float"),
    Setting("maps", None, "Write one PNG per image here: its top class's localisation map over the image; --out then "
            "gets each image's top classes' boxes from their maps (JSON).", "folder"),
    replace(_METHOD, name="map_method", flag=None), _STRIDE,
    Setting("max_side", PICTURE_SIDE, "Map pictures of larger images are scaled down to this longer side.", low=1,
            cli=False),
    Setting("cache", None, "Keep the images' features in this cache (resumable; usable by eval, localize, predict) "
            "[default: a temporary file].", "file"),
    Setting("weights", None, "The backbone weights file, when not where the head's training found it (refused unless "
            "its SHA-256 is the recorded one).", "text"),
    replace(LAYOUT, help="Layout of data-set folders among INPUTS; other folders are searched for images."),
    replace(SPLIT, help="VOC split of a devkit folder among INPUTS."),
    replace(ANNOTATIONS, help="COCO instances JSON of an image folder among INPUTS."),
    _BACKEND["batch_size"], _BACKEND["workers"], replace(_BACKEND["device"], help="auto = CUDA when present."),
    replace(_BACKEND["strict"], help="Stop at the first image that cannot be read."),
    replace(_BACKEND["overwrite"], help="Replace a --cache made of other images (or of changed files)."),
    _BACKEND["download"], _BACKEND["runtime"], _BACKEND["threads"],
)

#: ``report`` (:class:`~featurecache.pages.ReportConfig`): the evaluation, the bootstrap, the images shown,
#: the maps drawn and measured.
REPORT = _table(
    Setting("split", None, "Report on this split of CACHE only (e.g. val: images the head did not train on).",
            "text"),
    Setting("method", "voc07", "AP: 11-point VOC 2007, VOC 2010+ interpolated area, or uninterpolated area (as "
            "eval --method).", "choice", METHODS),
    Setting("resamples", None, "Bootstrap resamples of the images for the 95% intervals of mAP and of each AP "
            "(0: none) [default: 1000, fewer past 1,000 images: 1,000,000 / images, at least 200].", low=0,
            high=100000),
    Setting("seed", 0, "Seed of the bootstrap.", low=0),
    Setting("images", IMAGES_PER_GROUP, "Images shown per class and kind: top-scoring, highest-scoring negatives, "
            "lowest-scoring positives.", low=0, high=100),
    Setting("map_method", "auto", "Maps drawn over the images: auto = windows for heads with patch scores (the "
            "cache only), else cam when the image files are there; none: no maps.", "choice", REPORT_MAPS),
    Setting("localization", "auto", "Pointing and CorLoc over every image (as localize --evaluate): auto = when "
            "the data set has boxes and the maps read the cache only (windows); on: with cam maps too (a backbone "
            "pass per image); off.", "choice", REPORT_LOCALIZATION),
    _STRIDE, MAP["box_threshold"],
    replace(LOCALIZE["tolerance"], help="Pixels a map's peak may miss a box by (pointing, reported beside 0)."),
    *(MAP[n] for n in ("weights", "device", "download", "runtime")), _BACKEND["threads"],
)

#: ``export`` (:func:`featurecache.deploy.export`): the model's input size and the check against ``predict``.
EXPORT = _table(
    Setting("input_size", None, "The image size WIDTH,HEIGHT the model takes (fixed: a consumer resizes its images "
            "to it first); or --dynamic.", "size"),
    Setting("dynamic", False, "A model that takes images of any size instead of --input-size (the grid, resizes and "
            "windows computed in the graph from the image's shape).", "flag"),
    Setting("maps", False, "A second output 'maps': each image's class activation map (rows, columns, classes) in "
            "--stride cells at the head's scales, as predict --maps and localize make it.", "flag"),
    replace(_METHOD, name="map_method", flag=None, help="--maps: the map method; cam (the default) is the one "
            "exported."),
    _STRIDE,
    Setting("check", False, "Then run the model with ONNX Runtime on IMAGES (resized to --input-size) and compare "
            "its scores (and maps) with predict's on the same pixels; a difference beyond 1e-4 of the score scale "
            "(of the largest map value), or another top class, is an error.", "flag"),
    replace(_BACKEND["runtime"], default="onnxruntime", help="--check: what runs predict's backbone (onnxruntime, "
            "as the model runs: the export alone is compared)."),
    replace(PREDICT["weights"]), _BACKEND["download"], _BACKEND["threads"],
)
