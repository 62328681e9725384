"""Shared fixtures: the real data in ../shared/data, tiny generated data sets, seeded RNGs."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FEATURECACHE_DATA", ROOT.parent / "shared" / "data"))
VOC_SAMPLE = DATA / "voc2012-sample"
BCCD = DATA / "bccd"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "needs_cuda" in item.keywords and not has_cuda:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _restore_featurecache_logger():
    """The CLI configures the package logger (own handler, no propagation); undo it per test."""
    import logging

    log = logging.getLogger("featurecache")
    saved = log.handlers[:], log.propagate, log.level
    yield
    log.handlers[:], log.propagate = saved[0], saved[1]
    log.setLevel(saved[2])


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture(scope="session")
def voc_sample() -> Path:
    root = VOC_SAMPLE / "VOC2012"
    if not (root / "Annotations").is_dir():
        pytest.skip(f"real VOC sample not found at {root} (set FEATURECACHE_DATA to the shared data folder)")
    return root


@pytest.fixture(scope="session")
def bccd() -> Path:
    if not (BCCD / "Annotations").is_dir():
        pytest.skip(f"BCCD data not found at {BCCD} (set FEATURECACHE_DATA to the shared data folder)")
    return BCCD


def write_voc_xml(path: Path, filename: str, width: int, height: int, objects) -> None:
    """objects: (name, xmin, ymin, xmax, ymax[, difficult]) in VOC 1-based inclusive pixels."""
    parts = [f"<annotation><filename>{filename}</filename>",
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for o in objects:
        name, x0, y0, x1, y1 = o[:5]
        diff = o[5] if len(o) > 5 else 0
        parts.append(f"<object><name>{name}</name><difficult>{diff}</difficult><bndbox><xmin>{x0}</xmin>"
                     f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")
    parts.append("</annotation>")
    path.write_text("".join(parts))


def make_voc(root: Path, images: dict, splits: dict | None = None, size=(64, 48)) -> Path:
    """Build a tiny VOC devkit. images: {id: [objects]}; splits: {name: [ids]}."""
    from PIL import Image

    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    rng = np.random.default_rng(0)
    for image_id, objects in images.items():
        w, h = size
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{image_id}.jpg")
        write_voc_xml(root / "Annotations" / f"{image_id}.xml", f"{image_id}.jpg", w, h, objects)
    if splits:
        (root / "ImageSets" / "Main").mkdir(parents=True)
        for name, ids in splits.items():
            (root / "ImageSets" / "Main" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    return root


@pytest.fixture
def tiny_voc(tmp_path) -> Path:
    return make_voc(
        tmp_path / "voc",
        {
            "a": [("dog", 1, 1, 32, 48), ("cat", 40, 10, 60, 30, 1)],
            "b": [("cat", 5, 5, 60, 45)],
            "c": [("dog", 10, 10, 20, 20), ("dog", 30, 30, 30, 30)],  # second box: zero area
        },
        splits={"train": ["a", "b"], "val": ["c"], "trainval": ["a", "b", "c"]},
    )


def voc_subset(real_root: Path, dest: Path, ids) -> Path:
    """A VOC devkit in ``dest`` linking to a few real images and annotations (no copies of pixels)."""
    (dest / "Annotations").mkdir(parents=True)
    (dest / "JPEGImages").mkdir()
    (dest / "ImageSets" / "Main").mkdir(parents=True)
    for i in ids:
        (dest / "Annotations" / f"{i}.xml").symlink_to(real_root / "Annotations" / f"{i}.xml")
        (dest / "JPEGImages" / f"{i}.jpg").symlink_to(real_root / "JPEGImages" / f"{i}.jpg")
    (dest / "ImageSets" / "Main" / "train.txt").write_text("\n".join(ids[: len(ids) // 2]) + "\n")
    (dest / "ImageSets" / "Main" / "val.txt").write_text("\n".join(ids[len(ids) // 2:]) + "\n")
    return dest


#: Real VOC sample images used by extraction tests: cat, aeroplane, dog, person+sofa+bottle, ...
VOC_IDS = ["2007_000528", "2007_000033", "2007_000720", "2007_001585", "2007_000027", "2007_000549"]


@pytest.fixture(scope="session")
def lite0():
    """The default backbone with its real weights, built once."""
    from featurecache.backbones import build_backbone

    return build_backbone("efficientnet_lite0")
