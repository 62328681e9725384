"""Extraction throughput, measured side by side in one run on the same patches.

Three ways to get the features of the same patches of the same images:

1. bare backbone: the network alone on patches already cropped, resized and in memory
   (the limit: no decoding, cropping or writing);
2. ``featurecache.extract``: the whole stage one, decoding, cropping on the device,
   batching and writing the HDF5 cache;
3. the naive loop a user would write: PIL crop + resize per patch, torchvision transforms,
   batches of 64.

Usage (from the repository root)::

    python benchmarks/bench_extract.py [--images 3] [--scales 1,1.3,...] [--input-size 224]

Then crop mode against dense mode (``--mode dense``) on the same boxes, the dense grid's
windows: the target is dense ≥ 4x crop on the CPU at the defaults.

It prints patches/s of each and the ratios; the targets on CPU are extract ≥ 0.9 × bare and
extract ≥ 1.0 × naive. "Bare" runs the network exactly as extract does (channels-last,
the same batch size); the naive loop runs it as most users would (NCHW, batches of 64).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from featurecache.backbones import build_backbone
from featurecache.datasets import ImageSet, read_dataset
from featurecache.extract import extract
from featurecache.patches import DEFAULT_SCALES, PatchGrid

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc2012-sample" / "VOC2012"


def bare(net, images, grid, batch_size):
    """Crop everything first (untimed), then time only the network, as extract runs it."""
    from torchvision.ops import roi_align

    crops = []
    for r in images:
        x = torch.from_numpy(np.array(Image.open(r.path).convert("RGB"))).permute(2, 0, 1)[None].float()
        b = torch.from_numpy(grid.boxes(r.width, r.height))
        crops.append(roi_align(x, [b], grid.input_size, 1.0, -1, True))
    crops = torch.cat(crops).contiguous(memory_format=torch.channels_last)
    net.to(memory_format=torch.channels_last)
    t = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(crops), batch_size):
            net(crops[s:s + batch_size])
    return len(crops), time.perf_counter() - t


def naive(net, images, grid, batch_size=64):
    """What a user writes: PIL crop + resize per patch, torchvision transforms, batches of 64."""
    import torchvision.transforms as T

    mean = [m / 255 for m in net.spec.preprocessing.mean]
    std = [s / 255 for s in net.spec.preprocessing.std]
    tf = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    body = net.body
    body.to(memory_format=torch.contiguous_format)
    n = 0
    t = time.perf_counter()
    batch = []
    with torch.inference_mode():
        def run(batch):
            x = torch.stack(batch)
            return body.forward_head(body.forward_features(x), pre_logits=True)

        for r in images:
            pil = Image.open(r.path).convert("RGB")
            for box in grid.boxes(r.width, r.height):
                crop = pil.resize((grid.input_size, grid.input_size), Image.BILINEAR, box=tuple(map(float, box)))
                batch.append(tf(crop))
                if len(batch) == batch_size:
                    run(batch)
                    n += len(batch)
                    batch = []
        if batch:
            run(batch)
            n += len(batch)
    return n, time.perf_counter() - t


def featurecache_extract(net, images, grid, batch_size, workers):
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        r = extract(images, Path(tmp) / "bench.h5", backbone=net, grid=grid, batch_size=batch_size,
                    workers=workers, progress=False, device="cpu")
        return r.patches, time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--scales", default=",".join(f"{s:g}" for s in DEFAULT_SCALES))
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=16, help="extract and bare (the naive loop uses 64)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True,
                    help="also compare crop and dense mode on the same boxes")
    ap.add_argument("--only-dense", action="store_true", help="skip the crop/bare/naive comparison")
    args = ap.parse_args(argv)
    full = read_dataset(args.data, split="val")
    images = ImageSet(full.root, full.layout, full.classes, full.records[: args.images], full.split)
    grid = PatchGrid(scales=[float(s) for s in args.scales.split(",")], input_size=args.input_size)
    net = build_backbone("efficientnet_lite0")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"{len(images)} images, {sum(grid.count(r.width, r.height) for r in images)} patches at "
          f"{grid.input_size} px, batch {args.batch_size}", flush=True)
    with torch.inference_mode():  # warm-up
        net(torch.rand(8, 3, grid.input_size, grid.input_size) * 255)
    if args.only_dense:
        return crop_vs_dense(net, images, grid, args.batch_size)
    # One image per round, the three methods in rotating order, so that drifts in machine
    # speed hit all three alike.
    methods = {
        "bare backbone": lambda im: bare(net, im, grid, args.batch_size),
        "featurecache extract": lambda im: featurecache_extract(net, im, grid, args.batch_size, args.workers),
        "naive PIL loop": lambda im: naive(net, im, grid, 64),
    }
    names = list(methods)
    totals = {k: [0, 0.0] for k in names}
    for i, r in enumerate(images):
        one = ImageSet(images.root, images.layout, images.classes, [r], images.split)
        for k in names[i % 3:] + names[: i % 3]:
            n, t = methods[k](one)
            totals[k][0] += n
            totals[k][1] += t
        print(f"round {i + 1}/{len(images)}: " + ", ".join(
            f"{k} {totals[k][0] / totals[k][1]:.1f}/s" for k in names), flush=True)
    rate = {k: n / t for k, (n, t) in totals.items()}
    for k in names:
        print(f"{k:22s} {rate[k]:8.1f} patches/s  ({totals[k][1]:.1f} s for {totals[k][0]} patches)")
    print(f"extract / bare  = {rate['featurecache extract'] / rate['bare backbone']:.2f}   (target >= 0.9)")
    print(f"extract / naive = {rate['featurecache extract'] / rate['naive PIL loop']:.2f}   (target >= 1.0)")
    if args.dense:
        crop_vs_dense(net, images, grid, args.batch_size)


def crop_vs_dense(net, images, grid, batch_size):
    """Crop and dense mode on the same boxes (the dense grid's windows), one image per round."""
    from featurecache.runners import DenseRunner, PatchRunner

    crop = PatchRunner(net, input_size=grid.input_size, batch_size=batch_size, device=torch.device("cpu"),
                        out_dtype=np.dtype("float16"))
    dense = DenseRunner(net, grid, device=torch.device("cpu"), out_dtype=np.dtype("float16"))
    t_crop = t_dense = 0.0
    n = 0
    for i, r in enumerate(images):
        x = torch.from_numpy(np.array(Image.open(r.path).convert("RGB"))).permute(2, 0, 1)[None].float()
        boxes = torch.from_numpy(grid.dense_boxes_and_scales(r.width, r.height)[0])
        order = ("crop", "dense") if i % 2 == 0 else ("dense", "crop")
        for mode in order:
            t = time.perf_counter()
            if mode == "crop":
                f = crop.run([(x, boxes)])
                t_crop += time.perf_counter() - t
            else:
                f = dense.image(x, r.width, r.height)
                t_dense += time.perf_counter() - t
            assert len(f) == len(boxes)
        n += len(boxes)
    print(f"\ncrop vs dense on the same {n} boxes of {len(images)} images (dense grid, {grid.input_size} px):")
    print(f"crop mode   {n / t_crop:8.1f} patches/s  ({t_crop / len(images):.2f} s per image)")
    print(f"dense mode  {n / t_dense:8.1f} patches/s  ({t_dense / len(images):.2f} s per image)")
    print(f"dense / crop = {t_crop / t_dense:.2f}   (target >= 4)")

if __name__ == "__main__":
    sys.exit(main())
