"""Multi-scale sliding-window patches and their training labels (Oquab et al., CVPR 2014).

Label encoding
--------------
This is the one place the patch label encoding is defined; everything else uses these
constants:

========================  ==========================================================
``BACKGROUND = 0``        no object qualifies (the extra FCb output of the paper)
``c + 1``                 class id ``c`` (its index in the class list) qualifies
``AMBIGUOUS = -1``        objects of two or more classes qualify, or only
                          ``difficult`` objects do: never used for training, but
                          kept for test-time aggregation
========================  ==========================================================

So a head's outputs are ``[background, class 0, class 1, ...]`` and a label is directly the
index of its output.

Boxes are ``(x0, y0, x1, y1)`` in continuous pixel-edge coordinates (see
:mod:`featurecache.datasets`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

from featurecache.errors import FeaturecacheError

__all__ = [
    "AMBIGUOUS",
    "BACKGROUND",
    "DEFAULT_SCALES",
    "MAX_INPUT_SIZE",
    "MAX_PATCHES",
    "WHOLE_IMAGE_SCALE",
    "LabelRule",
    "PatchGrid",
    "image_patches",
    "label_to_class",
    "plan_patches",
]

BACKGROUND = 0
AMBIGUOUS = -1
#: The paper's scales λ: patch side = min(width, height) / λ.
DEFAULT_SCALES = (1.0, 1.3, 1.6, 2.0, 2.4, 2.8, 3.2, 3.6, 4.0)
#: The largest network input side a grid accepts (a 224-px network at 1024 px already
#: sees its objects at 4.6x the size it was trained on; beyond, memory per batch explodes).
MAX_INPUT_SIZE = 1024

#: Default most patches of one image: the default grid gives 512 for a 500 x 375 image;
#: images beyond (very thin strips) are skipped and recorded, grids beyond for most images
#: are refused before anything runs.
MAX_PATCHES = 20_000

#: The ``scale`` recorded for the single patch of a ``whole=True`` grid (not square).
WHOLE_IMAGE_SCALE = 0.0


def label_to_class(labels: np.ndarray) -> np.ndarray:
    """Class ids of patch labels: ``-1`` for background, ``-2`` for ambiguous."""
    labels = np.asarray(labels)
    return np.where(labels == AMBIGUOUS, -2, labels - 1)


def _positions(length: float, side: float, min_overlap: float) -> np.ndarray:
    """Start offsets of windows of ``side`` covering ``[0, length]`` edge to edge."""
    if length <= side * (1 + 1e-9):
        return np.zeros(1)
    # Neighbours shifted by d overlap with IoU (side - d) / (side + d) >= min_overlap.
    max_stride = side * (1.0 - min_overlap) / (1.0 + min_overlap)
    # The tolerance keeps an exact fit (e.g. 2 strides of exactly max_stride) at its count.
    n = math.ceil((length - side) / max_stride - 1e-9) + 1
    return np.linspace(0.0, length - side, n)


@dataclass(frozen=True)
class PatchGrid:
    """Square patches at several scales on a regular grid, as in Oquab et al. (2014).

    At scale λ the patch side is ``min(width, height) / λ``. Along each axis the patches are
    spaced evenly, the first at the image's edge and the last at the opposite edge, using the
    fewest patches for which neighbouring patches overlap by at least ``min_overlap``, measured
    as intersection over union (the usual "overlap" of the VOC literature): two squares of side
    s shifted by d have IoU (s - d) / (s + d), so the stride is at most s·(1 - o)/(1 + o), a
    third of the side at o = 0.5. Each patch is later resized to ``input_size`` pixels.

    At the defaults a 500 x 375 image (the commonest VOC size) gives **512 patches**
    (2, 8, 15, 24, 48, 70, 88, 117 and 140 at the nine scales): the paper's "about 500".
    Reading the overlap instead as a fraction of the patch side (stride ≤ s/2) would give 275.

    Parameters
    ----------
    scales : sequence of float
        The λ values, each ≥ 1. Default :data:`DEFAULT_SCALES`.
    min_overlap : float
        Minimum intersection over union of neighbouring patches, in ``[0, 1)``. Default 0.5.
    input_size : int
        Side in pixels of the network input each patch is resized to. Default 224.
    whole : bool
        If True the grid yields exactly one patch, the whole (not necessarily square) image:
        the baseline without sliding windows. Its recorded scale is
        :data:`WHOLE_IMAGE_SCALE`.
    """

    scales: Sequence[float] = DEFAULT_SCALES
    min_overlap: float = 0.5
    input_size: int = 224
    whole: bool = False

    def __post_init__(self) -> None:
        scales = tuple(float(s) for s in self.scales)
        object.__setattr__(self, "scales", scales)
        object.__setattr__(self, "min_overlap", float(self.min_overlap))
        object.__setattr__(self, "input_size", int(self.input_size))
        object.__setattr__(self, "whole", bool(self.whole))
        if not self.whole:
            if not scales:
                raise ValueError("PatchGrid needs at least one scale")
            bad = [s for s in scales if not (math.isfinite(s) and s >= 1.0)]
            if bad:
                raise ValueError(f"PatchGrid scales must be >= 1 (patch side = min(w, h) / scale), got {bad[0]}")
            if len(set(scales)) != len(scales):
                raise ValueError("PatchGrid scales must be distinct")
        if not 0.0 <= self.min_overlap < 1.0:
            raise ValueError(f"PatchGrid min_overlap must be in [0, 1), got {self.min_overlap}")
        if not 1 <= self.input_size <= MAX_INPUT_SIZE:
            raise ValueError(f"PatchGrid input_size must be in [1, {MAX_INPUT_SIZE}], got {self.input_size}")

    def boxes_and_scales(self, width: float, height: float) -> tuple:
        """Patch boxes of an image and the scale λ of each.

        Parameters
        ----------
        width, height : float
            Image size in pixels.

        Returns
        -------
        boxes : ndarray of shape (N, 4), float32
            ``x0, y0, x1, y1``, scale by scale (in the order of :attr:`scales`), row-major
            within a scale.
        scales : ndarray of shape (N,), float32
        """
        if not (width > 0 and height > 0):
            raise ValueError(f"image size must be positive, got {width}x{height}")
        if self.whole:
            return (np.array([[0.0, 0.0, width, height]], dtype=np.float32),
                    np.array([WHOLE_IMAGE_SCALE], dtype=np.float32))
        all_boxes, all_scales = [], []
        for lam in self.scales:
            side = min(width, height) / lam
            xs = _positions(width, side, self.min_overlap)
            ys = _positions(height, side, self.min_overlap)
            x0, y0 = np.meshgrid(xs, ys)  # row-major: y outer, x inner
            x0, y0 = x0.ravel(), y0.ravel()
            b = np.stack([x0, y0, x0 + side, y0 + side], axis=1)
            # Snap the far edges exactly onto the image (linspace can leave 1e-13 over).
            b[:, 2] = np.minimum(b[:, 2], width)
            b[:, 3] = np.minimum(b[:, 3], height)
            all_boxes.append(b)
            all_scales.append(np.full(len(b), lam))
        return (np.concatenate(all_boxes).astype(np.float32),
                np.concatenate(all_scales).astype(np.float32))

    def boxes(self, width: float, height: float) -> np.ndarray:
        """Patch boxes ``(N, 4)`` of a ``width x height`` image; see :meth:`boxes_and_scales`."""
        return self.boxes_and_scales(width, height)[0]

    def count(self, width: float, height: float, *, mode: str = "crop", stride: int = 32) -> int:
        """Number of patches of a ``width x height`` image, computed without making them.

        Equal to ``len(boxes_and_scales(...)[0])`` (``mode="crop"``) or to
        ``len(dense_boxes_and_scales(...)[0])`` (``mode="dense"``), at the cost of a few
        operations per scale, so that a grid that would explode on an image is refused
        before anything is allocated.
        """
        if not (width > 0 and height > 0):
            raise ValueError(f"image size must be positive, got {width}x{height}")
        if self.whole:
            return 1
        if mode == "dense":
            return sum(self._dense_count(width, height, lam, stride) for lam in self.scales)
        total = 0
        for lam in self.scales:
            side = min(width, height) / lam
            max_stride = side * (1.0 - self.min_overlap) / (1.0 + self.min_overlap)
            nx, ny = (1 if n <= side * (1 + 1e-9) else math.ceil((n - side) / max_stride - 1e-9) + 1
                      for n in (width, height))
            total += nx * ny
        return total

    def _dense_count(self, width: float, height: float, lam: float, stride: int) -> int:
        k = self.input_size // stride
        c = max(1, int(math.floor(k * (1 - self.min_overlap) / (1 + self.min_overlap) + 1e-9)))
        f = self.input_size * lam / min(width, height)
        counts = []
        for n in (width, height):
            last = max(self.input_size, int(round(n * f / stride)) * stride) // stride - k
            counts.append(last // c + 1 + (1 if last % c else 0))
        return counts[0] * counts[1]

    def dense_layout(self, width: float, height: float, *, stride: int = 32) -> list:
        """The dense-mode grid: per scale, the resized image and its feature-cell windows.

        At scale λ the image is resized by ``f = input_size·λ / min(w, h)`` (so a patch of
        side min(w, h)/λ becomes ``input_size`` pixels), each side rounded to a multiple of
        the trunk's ``stride`` and at least ``input_size``. A window is ``input_size``
        pixels (``input_size / stride`` feature cells); windows start every ``c`` cells,
        the largest whole number for which neighbours keep an IoU ≥ ``min_overlap``, and the
        last one is snapped to the far edge so the grid covers the image.

        Returns
        -------
        list of (scale, resized_width, resized_height, xs, ys)
            ``xs``/``ys``: window start offsets in cells along each axis.
        """
        if self.whole:
            raise ValueError("dense mode has no whole-image grid; use crop mode with whole=True")
        if self.input_size % stride:
            raise ValueError(f"dense mode needs an input size that is a multiple of the stride {stride}, "
                             f"got {self.input_size}")
        k = self.input_size // stride
        # Largest cell step c with IoU (k - c) / (k + c) >= min_overlap, at least one cell.
        c = max(1, int(math.floor(k * (1 - self.min_overlap) / (1 + self.min_overlap) + 1e-9)))
        out = []
        for lam in self.scales:
            f = self.input_size * lam / min(width, height)
            rw = max(self.input_size, int(round(width * f / stride)) * stride)
            rh = max(self.input_size, int(round(height * f / stride)) * stride)

            def starts(n_cells):
                last = n_cells - k
                pos = list(range(0, last + 1, c))
                if pos[-1] != last:
                    pos.append(last)
                return np.array(pos, dtype=np.int64)

            out.append((lam, rw, rh, starts(rw // stride), starts(rh // stride)))
        return out

    def dense_boxes_and_scales(self, width: float, height: float, *, stride: int = 32) -> tuple:
        """Boxes (in original pixels) and scales of the dense-mode windows, scale by scale, row-major.

        A window of cells ``[x, x + k)`` covers resized pixels ``[x·stride, x·stride + input_size)``,
        i.e. original pixels divided by the per-axis resize factor (``resized / original``,
        which differs from the nominal λ by the rounding to the stride).
        """
        boxes, scales = [], []
        for lam, rw, rh, xs, ys in self.dense_layout(width, height, stride=stride):
            fx, fy = rw / width, rh / height
            x0, y0 = np.meshgrid(xs * stride / fx, ys * stride / fy)
            x0, y0 = x0.ravel(), y0.ravel()
            b = np.stack([x0, y0, x0 + self.input_size / fx, y0 + self.input_size / fy], axis=1)
            b[:, 2] = np.minimum(b[:, 2], width)
            b[:, 3] = np.minimum(b[:, 3], height)
            boxes.append(b)
            scales.append(np.full(len(b), lam))
        return np.concatenate(boxes).astype(np.float32), np.concatenate(scales).astype(np.float32)

    def to_dict(self) -> dict:
        """JSON-ready settings (stored with caches)."""
        d = asdict(self)
        d["scales"] = list(self.scales)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PatchGrid":
        """Inverse of :meth:`to_dict`."""
        return cls(**d)


@dataclass(frozen=True)
class LabelRule:
    """The paper's patch labelling rule.

    A patch P *qualifies* for an object with box B when ``|P∩B| >= min_patch_fraction·|P|``
    (the object fills enough of the patch) and ``|P∩B| >= min_object_fraction·|B|`` (enough
    of the object is in the patch). Then, over the qualifying objects:

    * none: :data:`BACKGROUND`;
    * objects of two or more classes: :data:`AMBIGUOUS` (the paper deletes such patches);
    * objects of one class, at least one of them not ``difficult``: that class
      (``class id + 1``). With ``multiple_same_class="ambiguous"`` two or more qualifying
      objects of one class make the patch ambiguous too;
    * only ``difficult`` objects: :data:`AMBIGUOUS`.

    An object that does not qualify never changes the label, however much it overlaps.

    Parameters
    ----------
    min_patch_fraction : float
        Default 0.2.
    min_object_fraction : float
        Default 0.6.
    multiple_same_class : {"keep", "ambiguous"}
        What two or more qualifying objects of the same class do. Default "keep".
    """

    min_patch_fraction: float = 0.2
    min_object_fraction: float = 0.6
    multiple_same_class: str = "keep"

    def __post_init__(self) -> None:
        for name in ("min_patch_fraction", "min_object_fraction"):
            v = float(getattr(self, name))
            if not 0.0 < v <= 1.0:
                raise ValueError(f"LabelRule {name} must be in (0, 1], got {v}")
            object.__setattr__(self, name, v)
        if self.multiple_same_class not in ("keep", "ambiguous"):
            raise ValueError("LabelRule multiple_same_class must be 'keep' or 'ambiguous', "
                             f"got {self.multiple_same_class!r}")

    def qualifies(self, patch_boxes: np.ndarray, object_boxes: np.ndarray) -> np.ndarray:
        """Boolean ``(N, K)`` matrix: does patch ``n`` qualify for object ``k``."""
        p = np.asarray(patch_boxes, dtype=np.float64).reshape(-1, 4)
        b = np.asarray(object_boxes, dtype=np.float64).reshape(-1, 4)
        iw = np.minimum(p[:, None, 2], b[None, :, 2]) - np.maximum(p[:, None, 0], b[None, :, 0])
        ih = np.minimum(p[:, None, 3], b[None, :, 3]) - np.maximum(p[:, None, 1], b[None, :, 1])
        inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
        area_p = (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1])
        area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        # A relative epsilon so that exact-threshold cases are decided as written, not by rounding.
        eps = 1e-9
        return (inter >= self.min_patch_fraction * area_p[:, None] * (1 - eps)) & (
            inter >= self.min_object_fraction * area_b[None, :] * (1 - eps)
        ) & (inter > 0)

    def label(
        self,
        patch_boxes: np.ndarray,
        object_boxes: np.ndarray,
        object_class_ids: np.ndarray,
        object_difficult: Optional[np.ndarray] = None,
    ) -> np.ndarray:
        """Label every patch of one image, vectorised over patches × objects.

        Parameters
        ----------
        patch_boxes : ndarray of shape (N, 4)
        object_boxes : ndarray of shape (K, 4)
        object_class_ids : ndarray of shape (K,), int
            Index of each object's class in the class list.
        object_difficult : ndarray of shape (K,), bool, optional
            Default all False.

        Returns
        -------
        ndarray of shape (N,), int64
            Labels in the encoding of this module.
        """
        patch_boxes = np.asarray(patch_boxes).reshape(-1, 4)
        n = len(patch_boxes)
        cls = np.asarray(object_class_ids, dtype=np.int64).reshape(-1)
        k = len(cls)
        if np.asarray(object_boxes).reshape(-1, 4).shape[0] != k:
            raise ValueError("object_boxes and object_class_ids differ in length")
        if k == 0:
            return np.full(n, BACKGROUND, dtype=np.int64)
        diff = np.zeros(k, bool) if object_difficult is None else np.asarray(object_difficult, bool).reshape(-1)
        q = self.qualifies(patch_boxes, object_boxes)  # (N, K)
        num_classes = int(cls.max()) + 1
        onehot = np.zeros((k, num_classes), dtype=np.int64)
        onehot[np.arange(k), cls] = 1
        per_class = q.astype(np.int64) @ onehot  # (N, C) qualifying objects per class
        easy_per_class = (q & ~diff[None, :]).astype(np.int64) @ onehot
        n_classes = (per_class > 0).sum(axis=1)
        labels = np.full(n, BACKGROUND, dtype=np.int64)
        single = n_classes == 1
        the_class = per_class.argmax(axis=1)
        has_easy = easy_per_class[np.arange(n), the_class] > 0
        labels[single & has_easy] = the_class[single & has_easy] + 1
        labels[single & ~has_easy] = AMBIGUOUS
        labels[n_classes >= 2] = AMBIGUOUS
        if self.multiple_same_class == "ambiguous":
            labels[single & (per_class[np.arange(n), the_class] >= 2)] = AMBIGUOUS
        return labels

    def to_dict(self) -> dict:
        """JSON-ready settings (stored with caches)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LabelRule":
        """Inverse of :meth:`to_dict`."""
        return cls(**d)


def plan_patches(records, grid: PatchGrid, *, mode: str = "crop", stride: int = 32,
                 max_patches: int = MAX_PATCHES, max_pixels: Optional[int] = None) -> tuple:
    """Patch count of each image and why an image is skipped, before anything is decoded or allocated.

    Parameters
    ----------
    records : sequence of ImageRecord
    grid : PatchGrid
    mode : {"crop", "dense"}
    stride : int
    max_patches : int
        Most patches of one image. An image beyond it (a very thin strip) is skipped; when
        most images are beyond it, the grid (``overlap``, ``scales``) is at fault and the
        whole plan is refused.
    max_pixels : int, optional
        Most pixels of one image; larger ones are skipped before decoding.

    Returns
    -------
    counts : list of int
        0 for a skipped image.
    reasons : list of str
        '' for an image that is kept.

    Raises
    ------
    FeaturecacheError
        Naming ``max_patches`` when most readable images have more patches than that.
    """
    counts, reasons = [], []
    for r in records:
        reason = r.error
        n = 0
        if not reason and max_pixels is not None and r.width * r.height > max_pixels:
            reason = f"image is {r.width}x{r.height} = {r.width * r.height:,} pixels, above max_pixels {max_pixels:,}"
        if not reason:
            n = grid.count(r.width, r.height, mode=mode, stride=stride)
            if n > max_patches:
                reason = (f"the grid gives this {r.width}x{r.height} image {n:,} patches, above max_patches "
                          f"{max_patches:,}")
        counts.append(0 if reason else n)
        reasons.append(reason)
    over = [rs for rs in reasons if "above max_patches" in rs]
    readable = sum(1 for r in records if not r.error)
    if over and len(over) * 2 > readable:
        raise FeaturecacheError(
            f"the grid gives {len(over)} of {readable} images more than {max_patches:,} patches each; lower the "
            "overlap or the largest scale (or raise the limit)", param="max_patches")
    return counts, reasons


def image_patches(record, class_ids: np.ndarray, *, grid: PatchGrid, rule: LabelRule, mode: str = "crop",
                  stride: int = 32) -> tuple:
    """Patch boxes, scales and labels of one annotated image.

    Parameters
    ----------
    record : ImageRecord
        Anything with ``width``, ``height``, ``boxes`` and ``difficult``.
    class_ids : ndarray of shape (K,)
        Class id of each of the record's boxes (``ImageSet.class_ids(record)``).
    grid : PatchGrid
    rule : LabelRule
    mode : {"crop", "dense"}
        Which grid: :meth:`PatchGrid.boxes_and_scales` or :meth:`PatchGrid.dense_boxes_and_scales`.
    stride : int
        The trunk's stride (dense mode).

    Returns
    -------
    boxes : ndarray (N, 4) float32
    scales : ndarray (N,) float32
    labels : ndarray (N,) int64, in this module's encoding
    """
    if mode == "dense":
        boxes, scales = grid.dense_boxes_and_scales(record.width, record.height, stride=stride)
    else:
        boxes, scales = grid.boxes_and_scales(record.width, record.height)
    labels = rule.label(boxes, record.boxes, class_ids, record.difficult)
    return boxes, scales, labels
