"""Localisation maps: per-class maps of where a head finds each class, and boxes from them.

Three kinds of map, all from the one route from a head to scores (:class:`TrainedHead`):

- ``windows``: the paper's localisation (Oquab et al., 2014): every cell of a ``stride``-pixel
  grid gets the mean score of the cached patches covering it.
- ``attention``: an attention head's weights: each cached patch's attention weight (of each
  class) is spread evenly over the cells it covers and summed, so a cell holds the share of
  the class's attention that falls on it (the map sums to 1). The mean weight of the covering
  patches, read as the windows map reads scores, peaks at the image's edges, where one patch
  decides a cell: on the VOC sample it pointed 14.6% of the time against 70.8% for the share.
- ``cam``: class activation maps (Zhou et al., 2016) on the backbone's dense trunk. At each
  scale λ of the head's grid the image is resized as dense extraction resizes it, every
  feature-map cell is scored by the head (:meth:`TrainedHead.region_scores`), the cell
  scores are sampled at the map's cells and their log-odds averaged over scales (``cam``).
  ``cam*windows`` is the geometric mean of ``cam`` and ``windows`` (the window map sharpened by
  the cells).

A map yields a point (its peak) and a box (the connected cells around the peak that reach a
fraction of the peak, :meth:`LocalizationMap.box`); :mod:`featurecache.localize` measures
both on a labelled split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F

from featurecache.backbones import DENSE_STRIDE, FrozenBackbone
from featurecache.cache import FeatureCache, open_cache
from featurecache.errors import EvalError
from featurecache.heads.trained import TrainedHead
from featurecache.images import DISPLAYED_LAYOUTS, load_rgb, oriented, to_rgb
from featurecache.outputs import printable
from featurecache.overlay import MAX_SIDE, render_overlay, save_png
from featurecache.patches import PatchGrid
from featurecache.resources import (
    BOX_THRESHOLD,
    DEFAULT_MAP_METHOD,
    DEFAULT_MAX_SIDE,
    MAP_METHODS,
    apply_threads,
    resolve_device,
)
from featurecache.runtimes import Runtime, build_runtime
from featurecache.settings import MAP, check_fields

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAP_METHOD",
    "MAP_METHODS",
    "LocalizationMap",
    "Localizer",
    "MapConfig",
    "WINDOW_METHODS",
    "localization_map",
]

#: Methods that read the cache's patch scores (patch, mil, hybrid and attention heads only).
WINDOW_METHODS = ("windows", "cam*windows")

#: Methods that run the backbone's dense trunk on the image.
CELL_METHODS = ("cam", "cam*windows")

#: CorLoc: a box localises its class when its IoU with one of the class's boxes reaches this.
CORLOC_IOU = 0.5

#: Most feature-map cells of one image at one scale (memory: cells × feature dimension floats).
MAX_CELLS = 16384

#: Most map values of one image (cells × classes): 32 M, a few hundred MB while a map is made.
MAX_MAP_VALUES = 2**25

# Scores are clipped away from 0 and 1 before their log-odds are taken (a class with no
# training positives scores 0 everywhere).
_EPS = 1e-6


@dataclass(frozen=True)
class MapConfig:
    """How maps are made.

    Attributes
    ----------
    method : str
        One of :data:`MAP_METHODS`.
    stride : int
        Map cell size in pixels.
    scales : tuple of float, optional
        λ of the class activation maps; default the head's grid (what its features saw).
    box_threshold : float
        :data:`BOX_THRESHOLD`, in (0, 1).
    device : {"auto", "cpu", "cuda"}
        Where the backbone runs (``cam`` methods).
    weights : str or path, optional
        The backbone weights file, when not where the head's training found it (checked by hash).
    download : bool
        Let default weights missing from the local cache be downloaded
        (:meth:`featurecache.heads.recipe.Recipe.build_backbone`).
    max_side : int
        Largest trunk input side; larger inputs are tiled (:meth:`FrozenBackbone.cell_features`).
    runtime : {"auto", "torch", "openvino", "onnxruntime"}
        What runs the trunk of cam maps on the CPU (:func:`featurecache.runtimes.build_runtime`,
        dense): ``auto`` the fastest installed one whose features agree with torch's.
    """

    method: str = DEFAULT_MAP_METHOD
    stride: int = 8
    scales: Optional[tuple] = None
    box_threshold: float = BOX_THRESHOLD
    device: str = "auto"
    weights: Optional[str] = None
    download: bool = False
    max_side: int = DEFAULT_MAX_SIDE
    runtime: str = "auto"

    def __post_init__(self) -> None:
        check_fields(self, MAP, EvalError)
        if self.scales is not None:
            if not self.uses_cells:  # silently ignored, it would look as if it had been honoured
                raise EvalError(f"applies to cam maps only (a {self.method} map averages the patches of every scale)",
                                param="scales")
            object.__setattr__(self, "scales", tuple(float(v) for v in self.scales))

    @property
    def uses_cells(self) -> bool:
        return self.method in CELL_METHODS

    @property
    def uses_windows(self) -> bool:
        return self.method in WINDOW_METHODS

    @property
    def uses_patches(self) -> bool:
        """Whether the map reads the image's cached patches (window and attention methods)."""
        return self.uses_windows or self.method == "attention"


# --------------------------------------------------------------------------- one map


@dataclass
class LocalizationMap:
    """Per-class maps of one image on a grid of ``stride``-pixel cells.

    Attributes
    ----------
    path : str
        The image, as the cache stores it.
    classes : tuple of str
    scores : ndarray (C, ceil(height / stride), ceil(width / stride)), float32
        Each cell's score of each class, in [0, 1] (:data:`MAP_METHODS`: a mean of patch
        scores, a fusion of cell scores over scales, or the share of an attention head's
        attention); 0 where no patch covers a cell of a ``windows`` or ``attention`` map.
    stride : int
        Pixels per cell.
    width, height : int
        The image's size in pixels.
    objective : str
        Which objective's head produced the scores.
    image_file : str
        The image file, when known ('' otherwise): what :meth:`picture` draws on.
    method : str
        How the map was made (:data:`MAP_METHODS`).
    displayed : bool
        Whether the map describes the image as displayed (its EXIF orientation applied: new
        images, folder layouts) or as stored (VOC, COCO annotations), when its size cannot tell
        (:func:`featurecache.datasets.oriented`).
    """

    path: str
    classes: tuple
    scores: np.ndarray
    stride: int
    width: int
    height: int
    objective: str
    image_file: str = ""
    method: str = "windows"
    displayed: bool = True

    def class_index(self, cls: Union[int, str, None] = None) -> int:
        """A class's row in :attr:`scores`; ``None``: the class whose map peaks highest."""
        if cls is None:
            return int(np.argmax(self.scores.reshape(len(self.classes), -1).max(1)))
        if isinstance(cls, str):
            if cls not in self.classes:
                raise EvalError(f"no class {cls!r}; classes: {', '.join(self.classes)}", param="cls")
            return self.classes.index(cls)
        if not 0 <= int(cls) < len(self.classes):
            raise EvalError(f"no class {cls} (there are {len(self.classes)})", param="cls")
        return int(cls)

    def peak(self, cls: Union[int, str]) -> tuple:
        """``(score, x, y)``: the highest cell of a class, at its centre in image pixels (within the image)."""
        c = self.class_index(cls)
        iy, ix = np.unravel_index(int(np.argmax(self.scores[c])), self.scores[c].shape)
        return (float(self.scores[c, iy, ix]), float(_centres(self.width, self.stride)[ix]),
                float(_centres(self.height, self.stride)[iy]))

    def box(self, cls: Union[int, str], *, threshold: float = BOX_THRESHOLD) -> tuple:
        """``(x0, y0, x1, y1)`` in image pixels: the bounding box of the cells connected to the
        peak (8-neighbours) whose log-odds reach ``threshold`` of the way from the map's minimum
        to its peak; the whole image for a flat map.

        Log-odds, not scores: a confident map's scores crowd near 1 over a wide area, which
        a threshold on the scores would take in whole.
        """
        MAP["box_threshold"].check(threshold, EvalError)
        threshold = float(threshold)
        p = np.clip(self.scores[self.class_index(cls)].astype(np.float64), _EPS, 1 - _EPS)
        z = np.log(p) - np.log1p(-p)
        lo, hi = float(z.min()), float(z.max())
        if not hi > lo:
            return 0.0, 0.0, float(self.width), float(self.height)
        parts, _ = ndimage.label(z >= lo + threshold * (hi - lo), structure=np.ones((3, 3), bool))
        rows, cols = np.nonzero(parts == parts.flat[int(np.argmax(z))])
        s = self.stride
        return (float(cols.min() * s), float(rows.min() * s), float(min((cols.max() + 1) * s, self.width)),
                float(min((rows.max() + 1) * s, self.height)))

    def picture(self, cls: Union[int, str, None] = None, *, image=None, caption: Optional[str] = None,
                max_side: int = MAX_SIDE):
        """The map of one class drawn over its image (:func:`featurecache.overlay.render_overlay`).

        Parameters
        ----------
        cls : int or str, optional
            Default: the class whose map peaks highest.
        image : ndarray (H, W, 3) or PIL image, optional
            Default: :attr:`image_file`, decoded.
        caption : str, optional
            Default: the class name and its map's range.
        max_side : int
            Pictures of larger images are scaled down to this longer side.

        Returns
        -------
        PIL.Image.Image
        """
        c = self.class_index(cls)
        if image is None:
            if not self.image_file:
                raise EvalError(f"{self.path}: the image file is not known; pass the image", param="image")
            image = _read_pixels(self.image_file, size=(self.width, self.height), displayed=self.displayed)
        image = to_rgb(oriented(image)) if not isinstance(image, np.ndarray) else image
        size = image.shape[1::-1]
        if tuple(size) != (self.width, self.height):
            raise EvalError(f"{self.image_file or self.path}: image is {size[0]}x{size[1]}, the map's "
                            f"{self.width}x{self.height}", param="image")
        if caption is None:
            caption = f"{self.classes[c]}  map {self.scores[c].min():.2f}-{self.peak(c)[0]:.2f}"
        return render_overlay(image, self.scores[c], stride=self.stride, caption=caption, max_side=max_side)

    def save_png(self, path: Union[str, Path], cls: Union[int, str, None] = None, **options) -> Path:
        """Write :meth:`picture` (same options) as a PNG."""
        return save_png(self.picture(cls, **options), path)

    def save(self, path: Union[str, Path]) -> Path:
        """Write an ``.npz``: ``scores``, ``classes``, ``stride``, ``width``, ``height``, ``image``, ``method``."""
        path = Path(path)
        with open(path, "wb") as f:  # a file object: numpy would add ".npz" to a name without it
            np.savez_compressed(f, scores=self.scores, classes=np.array(self.classes), stride=int(self.stride),
                                width=int(self.width), height=int(self.height), image=self.path, method=self.method)
        return path

    def to_text(self, top: int = 3) -> str:
        best = np.argsort([-self.scores[c].max() for c in range(len(self.classes))])[:top]
        parts = []
        for c in best:
            s, x, y = self.peak(int(c))
            x0, y0, x1, y1 = self.box(int(c))
            parts.append(f"{printable(self.classes[c])} {s:.3f} at ({x:.0f}, {y:.0f}), box ({x0:.0f}, {y0:.0f}, "
                         f"{x1:.0f}, {y1:.0f})")
        return (f"{printable(self.path)} ({self.width}x{self.height}, {self.method} map, {self.stride}-px cells, "
                f"objective {self.objective}): " + "; ".join(parts))


class ImageFileError(EvalError):
    """An image file that cannot be mapped: missing, unreadable, or changed since extraction."""


def _centres(size: int, stride: int) -> np.ndarray:
    """Pixel centre of each map cell along a side (the last cell may be partial)."""
    starts = np.arange(-(-size // stride)) * stride
    return (starts + np.minimum(starts + stride, size)) / 2


def _read_pixels(path: Union[str, Path], *, size: Optional[tuple] = None, displayed: bool = True) -> np.ndarray:
    """An image file's pixels, oriented as its record describes it (:func:`featurecache.extract.load_rgb`)."""
    try:
        return load_rgb(path, size=size, displayed=displayed)
    except Exception as e:  # PIL raises many kinds for a corrupt or vanished file
        raise ImageFileError(f"{path}: cannot read the image ({type(e).__name__})") from None


# --------------------------------------------------------------------------- making maps


class Localizer:
    """Maps of one head: holds the head and, for the ``cam`` methods, its backbone (built once).

    Parameters
    ----------
    head : TrainedHead
    config : MapConfig, optional
    backbone : FrozenBackbone, optional
        The head's backbone when the caller has it already (default: rebuilt from its recipe).
    """

    def __init__(self, head: TrainedHead, config: Optional[MapConfig] = None, *,
                 backbone: Optional[FrozenBackbone] = None) -> None:
        self.head = head
        self.config = config or MapConfig()
        if self.config.uses_windows and not head.spec.patch_scores:
            raise EvalError(f"the {self.config.method} map averages patch scores, which {article(head.objective)} "
                            f"{head.objective} head does not have; use the cam method", param="method")
        if self.config.method == "attention" and not head.spec.attention_maps:
            raise EvalError(f"the attention map reads patch attention weights, which {article(head.objective)} "
                            f"{head.objective} head does not have; use an attention head or the cam method",
                            param="method")
        self._net = _with_dense_trunk(backbone) if backbone is not None and self.config.uses_cells else backbone
        self._device: Optional[torch.device] = None
        self._runtime: Optional[Runtime] = None

    @property
    def grid(self) -> PatchGrid:
        return self.head.new_images_recipe().grid

    @property
    def scales(self) -> tuple:
        grid = self.grid
        return self.config.scales or ((1.0,) if grid.whole else tuple(grid.scales))

    def backbone(self) -> FrozenBackbone:
        if self._net is None:
            recipe = self.head.new_images_recipe()
            self._net = _with_dense_trunk(recipe.build_backbone(weights=self.config.weights,
                                                                download=self.config.download))
        if self._device is None:
            self._device = resolve_device(self.config.device)
            self._net.to(self._device).to(memory_format=torch.channels_last)
        return self._net

    def runtime(self) -> Runtime:
        """What runs the dense trunk of the cam maps (built once; ``describe()`` says which)."""
        if self._runtime is None:
            net = self.backbone()
            self._runtime = build_runtime(net, self.config.runtime, input_size=self.grid.input_size,
                                          threads=apply_threads(), device=self._device, dense=True)
        return self._runtime

    def runtime_used(self) -> str:
        """What ran the maps' dense trunk (:meth:`Runtime.describe`), '' when none has run (window maps
        read cached features only)."""
        return self._runtime.describe() if self._runtime is not None else ""

    def cache_map(self, cache: FeatureCache, position: int, *, image_file: str = "") -> LocalizationMap:
        """The map of the image at ``position`` in an open cache's image table (checked against the head)."""
        t = cache.images
        w, h, path = int(t.width[position]), int(t.height[position]), t.path[position]
        self._check_size(path, w, h)
        dataset = cache.provenance.dataset
        displayed = dataset.layout in DISPLAYED_LAYOUTS
        if not image_file:
            image_file = str(Path(dataset.root) / path) if dataset.root else ""
        windows = cells = None
        if self.config.uses_patches:
            with cache.select([position]) as one:
                x, boxes = one.read_features(), one.boxes.astype(np.float64)
                if self.config.method == "attention":
                    windows = _attention_mass(self.head.patch_attention(x), boxes, w, h, self.config.stride)
                else:
                    windows = _per_pixel_mean(self.head.patch_scores(x), boxes, w, h, self.config.stride)
        if self.config.uses_cells:
            if not image_file:
                raise EvalError(f"{cache.path}: the image files' folder is not recorded; cam maps need the "
                                "images (use the windows method)")
            pixels = _read_pixels(image_file, size=(w, h), displayed=displayed)
            if pixels.shape[1::-1] != (w, h):
                raise ImageFileError(f"{image_file}: image is {pixels.shape[1]}x{pixels.shape[0]}, the cache's "
                                     f"{w}x{h} (changed since extraction?)")
            cells = self._cell_logits(pixels, image_file)
        return self._combine(path, w, h, cells, windows, image_file, displayed)

    def file_map(self, image_file: Union[str, Path]) -> LocalizationMap:
        """The ``cam`` map of an image file (no cache needed)."""
        return self.pixels_map(_read_pixels(image_file), path=str(image_file), image_file=str(image_file))

    def pixels_map(self, pixels: np.ndarray, *, path: str = "", image_file: str = "") -> LocalizationMap:
        """The ``cam`` map of an ``(H, W, 3)`` uint8 image (no cache needed)."""
        if self.config.uses_patches:
            raise EvalError(f"the {self.config.method} map needs the image's cached patches", param="method")
        h, w = pixels.shape[:2]
        self._check_size(path or "the image", w, h)
        return self._combine(path, w, h, self._cell_logits(pixels, path or "the image"), None, image_file)

    def _check_size(self, path: str, w: int, h: int) -> None:
        """Refuse a map that would not fit the memory a map may take (:data:`MAX_MAP_VALUES`)."""
        s = self.config.stride
        values = -(-w // s) * -(-h // s) * (len(self.head.classes) + 1)
        if values > MAX_MAP_VALUES:
            raise EvalError(f"{path}: a {w}x{h} image in {s}-px cells is {values:,} map values with its classes, "
                            f"more than {MAX_MAP_VALUES:,}; use a larger stride", param="stride")

    def _combine(self, path: str, w: int, h: int, cells: Optional[np.ndarray], windows: Optional[np.ndarray],
                 image_file: str, displayed: bool = True) -> LocalizationMap:
        if cells is not None:
            cam = _sigmoid(cells / len(self.scales))
            scores = np.sqrt(cam * windows) if windows is not None else cam
        else:
            scores = windows
        return LocalizationMap(path, tuple(self.head.classes), scores.astype(np.float32), self.config.stride, w, h,
                               self.head.objective, image_file, self.config.method, displayed)

    @torch.inference_mode()
    def _cell_logits(self, pixels: np.ndarray, name: str) -> np.ndarray:
        """The sum over scales of the head's cell log-odds, ``(C, rows, columns)`` of the map."""
        net, grid, s = self.backbone(), self.grid, self.config.stride
        h, w = pixels.shape[:2]
        image = torch.tensor(pixels, device=self._device).permute(2, 0, 1)[None].float()  # copied: may be read-only
        xs, ys = _centres(w, s), _centres(h, s)  # map cell centres in image pixels
        total = None
        layout = replace(grid, scales=self.scales, whole=False).dense_layout(w, h, stride=DENSE_STRIDE)
        for lam, rw, rh, _, _ in layout:
            if (rw // DENSE_STRIDE) * (rh // DENSE_STRIDE) > MAX_CELLS:
                raise EvalError(f"{name}: the {w}x{h} image resized to {rw}x{rh} at λ={lam:g} is more than "
                                f"{MAX_CELLS} feature cells; use smaller scales", param="scales")
            x = F.interpolate(image, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
            runtime = self.runtime()
            fmap = net.cell_features(x.contiguous(memory_format=runtime.memory_format), max_side=self.config.max_side,
                                     trunk=runtime.trunk)
            d, ch, cw = fmap.shape[1:]
            probs = self.head.region_scores(fmap[0].reshape(d, -1).T.float().cpu().numpy())
            probs = np.clip(np.asarray(probs, np.float64), _EPS, 1 - _EPS)
            logit = torch.from_numpy((np.log(probs) - np.log1p(-probs)).T.reshape(1, -1, ch, cw).astype(np.float32))
            here = _sample(logit, xs * rw / w, ys * rh / h, net.cell_centre)
            total = here if total is None else total + here
        return total


def _with_dense_trunk(net: FrozenBackbone) -> FrozenBackbone:
    if not net.supports_dense:
        raise EvalError(f"{net.spec.name} has no dense trunk for cam maps; use the windows method", param="method")
    return net


def _sample(logit: torch.Tensor, xs: np.ndarray, ys: np.ndarray, centre: float) -> np.ndarray:
    """Bilinear samples ``(C, len(ys), len(xs))`` of a cell map ``(1, C, rows, columns)`` at points in
    trunk-input pixels (cell ``i``'s centre is at ``centre + i · stride``; edges held beyond)."""
    rows, cols = logit.shape[-2:]

    def norm(p, n):  # cell index -> [-1, 1] with align_corners=True (0 for a single cell)
        idx = (p - centre) / DENSE_STRIDE
        return np.zeros_like(idx) if n == 1 else 2 * idx / (n - 1) - 1

    gx, gy = np.meshgrid(norm(xs, cols), norm(ys, rows))
    where = torch.from_numpy(np.stack([gx, gy], -1)[None].astype(np.float32))
    return F.grid_sample(logit, where, mode="bilinear", padding_mode="border", align_corners=True)[0].numpy()


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def _cell_ranges(boxes: np.ndarray, w: int, h: int, stride: int) -> tuple:
    """``(x0, y0, x1, y1, rows, columns)``: the map cells each patch covers (any overlap), as half-open ranges."""
    gh, gw = -(-h // stride), -(-w // stride)
    x0 = np.clip(np.floor(boxes[:, 0] / stride), 0, gw).astype(int)
    y0 = np.clip(np.floor(boxes[:, 1] / stride), 0, gh).astype(int)
    x1 = np.clip(np.ceil(boxes[:, 2] / stride), 0, gw).astype(int)
    y1 = np.clip(np.ceil(boxes[:, 3] / stride), 0, gh).astype(int)
    return x0, y0, x1, y1, gh, gw


def _per_cell_sums(values: np.ndarray, boxes: np.ndarray, w: int, h: int, stride: int) -> np.ndarray:
    """``(C + 1, rows, columns)``: each cell's sum of the values ``(N, C)`` of the patches covering it, and
    (last) how many patches cover it."""
    x0, y0, x1, y1, gh, gw = _cell_ranges(boxes, w, h, stride)
    # Summed-area bookkeeping: +v at the top-left corner, -v past each edge, +v past both.
    total = np.zeros((values.shape[1] + 1, gh + 1, gw + 1))
    vals = np.concatenate([values.T, np.ones((1, len(values)))]).astype(np.float64)  # last row counts patches
    for ys, xs, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
        np.add.at(total, (slice(None), ys, xs), sign * vals)
    return total.cumsum(1).cumsum(2)[:, :gh, :gw]


def _per_pixel_mean(scores: np.ndarray, boxes: np.ndarray, w: int, h: int, stride: int) -> np.ndarray:
    """``(C, ceil(h / stride), ceil(w / stride))``: each cell's mean score over the patches covering it."""
    total = _per_cell_sums(scores, boxes, w, h, stride)
    count = total[-1]
    return np.where(count > 0, total[:-1] / np.maximum(count, 1e-12), 0.0).astype(np.float32)


def _attention_mass(weights: np.ndarray, boxes: np.ndarray, w: int, h: int, stride: int) -> np.ndarray:
    """``(C, ceil(h / stride), ceil(w / stride))``: each patch's attention weight ``(N, C)`` spread evenly over
    the cells it covers, summed over the patches: the share of a class's attention on each cell (a class's
    map sums to 1 where its weights do)."""
    x0, y0, x1, y1, _, _ = _cell_ranges(boxes, w, h, stride)
    cells = np.maximum((x1 - x0) * (y1 - y0), 1)[:, None]
    return _per_cell_sums(np.asarray(weights, np.float64) / cells, boxes, w, h, stride)[:-1].astype(np.float32)


def article(word: str) -> str:
    """``a`` or ``an`` before ``word`` in messages."""
    return "an" if word[:1] in "aeiou" else "a"


def _find_image(cache: FeatureCache, image: Union[int, str]) -> int:
    """A row of the cache's image table: an int, or text naming an image (its stored path, file name or stem;
    text of digits that names none is a row number, so COCO's numeric file names stay names)."""
    paths = cache.images.path
    if isinstance(image, (int, np.integer)) and not isinstance(image, bool):
        if not 0 <= int(image) < len(paths):
            raise EvalError(f"{cache.path}: no image {image} (it has {len(paths)})")
        return int(image)
    text = str(image)
    hits = [i for i, p in enumerate(paths) if p == text or p.endswith("/" + text) or Path(p).stem == text]
    if not hits and text.isdigit():
        return _find_image(cache, int(text))
    if len(hits) != 1:
        raise EvalError(f"{cache.path}: {'no' if not hits else f'{len(hits)}'} image(s) match {text!r}"
                        + ("" if hits else f" (e.g. {paths[0]})" if paths else ""))
    return hits[0]


def as_head(head) -> TrainedHead:
    """A trained head, or the head file it names loaded."""
    return head if isinstance(head, TrainedHead) else TrainedHead.load(head)


def localization_map(head, cache: Union[str, Path, FeatureCache], image: Union[int, str], *,
                     config: Optional[MapConfig] = None, **options) -> LocalizationMap:
    """Per-class localisation map of one cached image.

    Parameters
    ----------
    head : TrainedHead or path
        Any head for ``cam`` maps; a ``patch``, ``mil`` or ``hybrid`` head (patch scores)
        for the window methods.
    cache : path, FeatureCache or MemoryCache
    image : int or str
        Row of the cache's image table, or the image's stored path (or its file name, or
        its stem).
    config : MapConfig, optional
    **options
        Fields of :class:`MapConfig` over those of ``config`` (``method=``, ``stride=`` ...).

    Returns
    -------
    LocalizationMap
    """
    config = replace(config or MapConfig(), **options)
    maker = Localizer(as_head(head), config)
    with open_cache(cache) as full:
        maker.head.check_cache(full)
        return maker.cache_map(full, _find_image(full, image))
