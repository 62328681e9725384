"""Shared fixtures: the real data in ../shared/data, tiny generated data sets, seeded RNGs."""

from __future__ import annotations

import json
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
    """The CLI configures the package logger (own handler, no propagation, a level); each test starts
    with it as a library user has it (so caplog sees records, even after a module fixture ran the
    CLI) and leaves it as it found it."""
    import logging

    log = logging.getLogger("featurecache")
    saved = log.handlers[:], log.propagate, log.level
    log.handlers[:], log.propagate = [], True
    log.setLevel(logging.NOTSET)
    yield
    log.handlers[:], log.propagate = saved[0], saved[1]
    log.setLevel(saved[2])


def _is_local(address) -> bool:
    """A loopback or Unix-socket address (a torch.distributed store, a test's own server)."""
    if isinstance(address, (str, bytes)):  # AF_UNIX
        return True
    host = str(address[0]) if isinstance(address, tuple) and address else ""
    return host in ("localhost", "::1", "") or host.startswith("127.") or host.startswith("::ffff:127.")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """featurecache opens no network connection unless asked: any connection to another host, or
    a name looked up for one, fails the test that made it (loopback stays open for gloo)."""
    import socket

    def refuse(what, address):
        raise AssertionError(f"a network {what} during a test: {address!r} (featurecache must not use the network)")

    connect, connect_ex, getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def guarded_connect(self, address):
        if not _is_local(address):
            refuse("connection", address)
        return connect(self, address)

    def guarded_connect_ex(self, address):
        if not _is_local(address):
            refuse("connection", address)
        return connect_ex(self, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if not _is_local((host,)) and host is not None:
            refuse("name lookup", host)
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    yield


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


def make_synthetic_cache(path: Path, X, labels, image_index, image_labels, classes, *, splits=None,
                         feature_settings=None, difficult=None):
    """Write a minimal valid feature cache directly (no backbone): for head and evaluation tests."""
    import h5py

    from featurecache.cache import feature_fingerprint

    X = np.asarray(X, np.float16)
    image_index = np.asarray(image_index, np.int64)
    m = len(image_labels)
    fs = feature_settings or {"backbone": "synthetic", "layer": "none", "input_size": 0, "mode": "crop"}
    counts = np.bincount(image_index, minlength=m)
    str_dt = h5py.string_dtype("utf-8")
    with h5py.File(path, "w") as f:
        f["features"] = X
        f["label"] = np.asarray(labels, np.int16)
        f["image_index"] = image_index.astype(np.int32)
        f["box"] = np.zeros((len(X), 4), np.float32)
        f["scale"] = np.ones(len(X), np.float32)
        g = f.create_group("images")
        g.create_dataset("path", data=np.array([f"img{i}.jpg" for i in range(m)], dtype=object), dtype=str_dt)
        g["width"] = np.full(m, 100, np.int32)
        g["height"] = np.full(m, 100, np.int32)
        g["labels"] = np.asarray(image_labels, bool)
        g["difficult"] = np.zeros((m, len(classes)), bool) if difficult is None else np.asarray(difficult, bool)
        g.create_dataset("split", data=np.array(splits or [""] * m, dtype=object), dtype=str_dt)
        g["dataset_index"] = np.arange(m, dtype=np.int32)
        g["patch_start"] = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        g["patch_count"] = counts.astype(np.int64)
        s = f.create_group("skipped")
        s.create_dataset("path", data=np.array([], dtype=object), dtype=str_dt)
        s.create_dataset("reason", data=np.array([], dtype=object), dtype=str_dt)
        f.attrs["format"] = "featurecache"
        f.attrs["format_version"] = 1
        f.attrs["classes"] = json.dumps(list(classes))
        f.attrs["feature_settings"] = json.dumps(fs)
        f.attrs["fingerprint"] = feature_fingerprint(fs)
        f.attrs["backbone"] = json.dumps({"name": fs["backbone"]})
        f.attrs["grid"] = json.dumps({"scales": [1.0], "min_overlap": 0.5, "input_size": 64, "whole": False})
    return path


def blob_cache(path: Path, *, n_images=40, patches=12, dim=16, n_classes=3, seed=0, splits=None,
               feature_settings=None):
    """A synthetic cache: each image has one object class; its object patches carry that class's
    direction in feature space, the rest are background noise."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (n_classes, dim))
    X, y, img = [], [], []
    image_labels = np.zeros((n_images, n_classes), bool)
    for i in range(n_images):
        c = i % n_classes
        image_labels[i, c] = True
        for p in range(patches):
            obj = p < 3
            X.append(rng.normal(0, 1, dim) + (centers[c] if obj else 0))
            y.append(c + 1 if obj else 0)
            img.append(i)
    return make_synthetic_cache(path, np.array(X), y, img, image_labels, [f"c{k}" for k in range(n_classes)],
                                splits=splits, feature_settings=feature_settings)


def tiny_trained_head(root: Path, *, objective: str = "patch", **options) -> Path:
    """A head trained on real Lite0 features of a tiny noise-image VOC set under ``root`` (64 px, scales 1, 2).

    Returns the head file; the set is ``root / "voc"`` (classes cat and dog, splits train and val).
    """
    from featurecache.extract import extract
    from featurecache.patches import PatchGrid
    from featurecache.train import fit_objective

    voc = make_voc(root / "voc", {f"im{i}": [("cat" if i % 2 else "dog", 5, 5, 40, 40)] for i in range(6)},
                   splits={"train": [f"im{i}" for i in range(4)], "val": ["im4", "im5"]})
    cache = extract(voc, root / "tiny.h5", grid=PatchGrid(scales=(1.0, 2.0), input_size=64), workers=0,
                    progress=False)
    head = fit_objective(cache.path, objective=objective, train_split="train", progress=False, **options)
    return head.save(root / f"{objective}.head.pt")
