"""The built-in demo: a small box-annotated image set made on the spot, then the whole pipeline.

:func:`make_demo_dataset` composites procedurally drawn, textured objects of three classes
(``disc``, ``square``, ``triangle``) at random positions, sizes, colours and rotations onto
random crops of the two real photographs that scikit-learn ships (``china.jpg``,
``flower.jpg``), and writes them in PASCAL VOC layout with ``train`` and ``val`` splits.
:func:`run_demo` then runs extract → fit (the default objective) → eval → ablate (the paper's
patch heads against the image-level objectives) on it with the default backbone and
CPU-friendly settings, predicts on a few validation images as if they were new ones (a CSV
and localisation pictures), and ends by writing the head's report page on the validation
images (``report.html``, :mod:`featurecache.pages`). Nothing is downloaded.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_image

from featurecache.ablate import ablate, parse_grid
from featurecache.evaluate import evaluate
from featurecache.extract import extract
from featurecache.pages import report as report_page
from featurecache.patches import PatchGrid
from featurecache.predict import load_head
from featurecache.train import fit_objective

logger = logging.getLogger(__name__)

__all__ = ["DEMO_CLASSES", "DemoResult", "make_demo_dataset", "run_demo"]

DEMO_CLASSES = ("disc", "square", "triangle")


def _shape_mask(kind: str, side: int, angle: float) -> np.ndarray:
    """Boolean mask (side x side) of a shape centred in its box."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64)
    c = (side - 1) / 2
    x, y = xx - c, yy - c
    ca, sa = math.cos(angle), math.sin(angle)
    u, v = ca * x + sa * y, -sa * x + ca * y
    r = side / 2
    if kind == "disc":
        return x * x + y * y <= r * r
    if kind == "square":
        h = r / math.sqrt(2) * 0.98  # a rotated square that stays inside the box
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    # An equilateral triangle inscribed in the circle of radius r.
    pts = [(r * math.cos(angle + k * 2 * math.pi / 3), r * math.sin(angle + k * 2 * math.pi / 3)) for k in range(3)]
    inside = np.ones_like(x, bool)
    for k in range(3):
        (x0, y0), (x1, y1) = pts[k], pts[(k + 1) % 3]
        inside &= (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0) >= 0
    return inside


def _texture(side: int, rng: np.random.Generator) -> np.ndarray:
    """A coloured texture: stripes or checks of two random colours, plus noise."""
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    yy, xx = np.mgrid[0:side, 0:side]
    period = rng.integers(4, 12)
    pattern = ((xx // period + (yy // period if rng.random() < 0.5 else 0)) % 2).astype(bool)
    tex = np.where(pattern[..., None], a, b).astype(np.float64)
    tex += rng.normal(0, 12, tex.shape)
    return np.clip(tex, 0, 255)


def make_demo_dataset(root: Union[str, Path], *, n_train: int = 40, n_val: int = 24, size: tuple = (320, 240),
                      seed: int = 0) -> Path:
    """Write the demo image set in VOC layout under ``root`` and return ``root``.

    Parameters
    ----------
    root : path
    n_train, n_val : int
        Images in the ``train`` and ``val`` splits.
    size : (width, height)
    seed : int

    Returns
    -------
    Path
    """
    root = Path(root)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = [load_sample_image(n) for n in ("china.jpg", "flower.jpg")]
    w, h = size
    ids = {"train": [], "val": []}
    for i in range(n_train + n_val):
        split = "train" if i < n_train else "val"
        photo = photos[int(rng.integers(len(photos)))]
        # A random crop of at least half the photo, resized to the image size.
        cw = int(rng.integers(photo.shape[1] // 2, photo.shape[1] + 1))
        ch = min(photo.shape[0], int(cw * h / w))
        x0 = int(rng.integers(0, photo.shape[1] - cw + 1))
        y0 = int(rng.integers(0, photo.shape[0] - ch + 1))
        bg = Image.fromarray(photo[y0:y0 + ch, x0:x0 + cw]).resize((w, h), Image.BILINEAR)
        canvas = np.asarray(bg, dtype=np.float64).copy()
        objects = []
        for _ in range(int(rng.integers(1, 3))):
            kind = DEMO_CLASSES[int(rng.integers(len(DEMO_CLASSES)))]
            side = int(rng.integers(min(w, h) // 4, int(min(w, h) * 0.7)))
            ox, oy = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            mask = _shape_mask(kind, side, float(rng.uniform(0, 2 * math.pi)))
            region = canvas[oy:oy + side, ox:ox + side]
            region[mask] = _texture(side, rng)[mask]
            ys, xs = np.nonzero(mask)
            # VOC: 1-based inclusive pixel indices of the visible extent.
            objects.append((kind, ox + xs.min() + 1, oy + ys.min() + 1, ox + xs.max() + 1, oy + ys.max() + 1))
        image_id = f"demo_{i:04d}"
        Image.fromarray(canvas.astype(np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg", quality=92)
        xml = [f"<annotation><filename>{image_id}.jpg</filename><size><width>{w}</width><height>{h}</height>"
               "<depth>3</depth></size>"]
        for kind, a, b, c, d in objects:
            xml.append(f"<object><name>{kind}</name><difficult>0</difficult><bndbox><xmin>{a}</xmin><ymin>{b}</ymin>"
                       f"<xmax>{c}</xmax><ymax>{d}</ymax></bndbox></object>")
        xml.append("</annotation>")
        (root / "Annotations" / f"{image_id}.xml").write_text("".join(xml))
        ids[split].append(image_id)
    for split, names in ids.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


@dataclass
class DemoResult:
    """Where the demo put its files and what it measured."""

    workdir: Path
    dataset: Path
    cache: Path
    head: Path
    extraction: object
    report: object
    ablation: object
    seconds: float
    selection: str = ""
    predictions: object = None
    predictions_file: Optional[Path] = None
    page: Optional[Path] = None

    def to_text(self) -> str:
        return "\n".join([
            "== extraction", self.extraction.summary(), "",
            "== `featurecache fit` by default: candidates cross-validated on the training images", self.selection, "",
            f"== evaluation on the val split of the chosen head (objective {self.report.objective})",
            self.report.to_text(), "",
            "== objectives and head settings compared on the same cache (no re-extraction)",
            self.ablation.to_text(), "",
            "== the trained head used on new images (featurecache predict)",
            self.predictions.to_text(), "",
            f"demo finished in {self.seconds:.0f} s. Files in {self.workdir}:",
            f"  data set (VOC layout)  {self.dataset}",
            f"  feature cache          {self.cache}",
            f"  trained head           {self.head}",
            f"  predictions            {self.predictions_file}",
            "  localisation pictures  " + (str(Path(next(m for m in self.predictions.maps if m)).parent)
                                           if any(self.predictions.maps) else self.predictions.maps_note),
            f"  report page            {self.page}  (open it in a browser)",
            f"try: featurecache predict {self.head} YOUR_IMAGES/ --maps maps/ --out predictions.csv",
        ])


def run_demo(workdir: Union[str, Path] = "featurecache-demo", *, progress: Optional[bool] = None,
             input_size: int = 96, scales: tuple = (1.0, 1.6, 2.4), n_predict: int = 4) -> DemoResult:
    """Build the demo data and run extract → fit → eval → ablate on it.

    Parameters
    ----------
    workdir : path
        Created if missing; the data set, cache and head go there. Running again reuses
        the data set and cache.
    progress : bool, optional
    input_size : int
        Network input side (96 px keeps the demo at about a minute on 2 CPU cores).
    scales : tuple of float
    n_predict : int
        Validation images the trained head then predicts on, as new images.

    Returns
    -------
    DemoResult
    """
    t0 = time.perf_counter()
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not (data / "ImageSets" / "Main" / "val.txt").exists():
        make_demo_dataset(data)
    cache = work / "demo.h5"
    extraction = extract(data, cache, grid=PatchGrid(scales=scales, input_size=input_size), progress=progress)
    head = fit_objective(cache, train_split="train", progress=progress)
    head_path = head.save(work / "demo.head.pt")
    report = evaluate(head, cache, split="val")
    # The paper's patch heads (2 x 2 trainings, 2 poolings) against the image-level objectives.
    grid = ["objective=patch,image,mil,hybrid", "hidden=0,2048", "background=weight,sample:0.1", "epochs=30",
            "pooling=power,max"]
    ablation = ablate(cache, grid=parse_grid(grid), train_split="train", val_split="val", progress=progress)
    new_images = sorted((data / "JPEGImages").glob("*.jpg"))[-n_predict:]  # the last val images
    predictions = load_head(head_path).predict(new_images, maps=work / "maps", progress=progress)
    csv = predictions.save(work / "predictions.csv")
    page = report_page(head_path, cache, split="val", progress=progress).save(work / "report.html")
    return DemoResult(work, data, cache, head_path, extraction, report, ablation, time.perf_counter() - t0,
                      head.selection_table(), predictions, csv, page)
