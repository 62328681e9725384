"""Crop mode's parallel streams against one request on all threads, side by side in one process.

For each exported runtime (OpenVINO, ONNX Runtime) on the first ``--images`` VOC images at the
paper's nine scales, 224 px, batches of 16, alternating order every round:

* ``one request``: the runtime built with one stream (its threads in one request, as before
  ``runtimes.crop_streams``), each batch cut over the threads and then run;
* ``streams, in turn``: the runtime with its streams, each batch cut, then split over them;
* ``streams``: ``PatchRunner.run``, each stream cutting and running whole batches;
* ``bare``: the runtime with its streams on the batches already cut.

Printed: patches/s of each per round, and whether the features are the same bits.

Usage (from the repository root)::

    python benchmarks/bench_streams.py [--images 5] [--rounds 3] [--runtimes openvino,onnxruntime]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import featurecache.runtimes as rt
from featurecache.backbones import build_backbone
from featurecache.datasets import read_dataset
from featurecache.patches import LabelRule, PatchGrid, image_patches
from featurecache.resources import apply_threads, cpu_threads
from featurecache.runners import PatchRunner, iter_batches

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc2012-sample" / "VOC2012"


def segments(n: int) -> list:
    """``(image, boxes)`` of the first ``n`` VOC images at the default grid."""
    ds, grid, out = read_dataset(DATA), PatchGrid(), []
    for rec in ds.records[:n]:
        with Image.open(rec.path) as im:
            image = torch.from_numpy(np.array(im.convert("RGB"), np.float32)).permute(2, 0, 1)[None].contiguous()
        boxes = image_patches(rec, ds.class_ids(rec), grid=grid, rule=LabelRule(), mode="crop")[0]
        out.append((image, torch.from_numpy(boxes)))
    return out


def runner(net, name: str, threads: int, streams: int) -> PatchRunner:
    """A crop runner whose runtime has ``streams`` streams (compiled anew)."""
    saved = rt.crop_streams
    rt._COMPILED.clear()
    rt.crop_streams = lambda t: streams
    try:
        run = rt.build_runtime(net, name, input_size=224, threads=threads)
    finally:
        rt.crop_streams = saved
    return PatchRunner(net, input_size=224, batch_size=16, device=torch.device("cpu"), out_dtype=np.float32,
                       runtime=run)


def compare(net, name: str, threads: int, segs: list, rounds: int) -> None:
    """Print one runtime's patches/s with one request, in turn over its streams, as the runner runs, and bare."""
    n = sum(len(b) for _, b in segs)
    one, many = runner(net, name, threads, 1), runner(net, name, threads, rt.crop_streams(threads))
    cut = [many.crops(p).contiguous() for p in iter_batches(segs, 16)]
    runs = {"one request": lambda: [one._batch(p) for p in iter_batches(segs, 16)],
            "streams, in turn": lambda: [many._batch(p) for p in iter_batches(segs, 16)],
            "streams": lambda: many.run(segs),
            "bare": lambda: [many.runtime(x) for x in cut]}
    same = np.array_equal(np.concatenate(runs["one request"]()), many.run(segs))
    print(f"{name}: {many.runtime.streams} streams; same bits as one request: {same}")
    with torch.inference_mode():
        for r in range(rounds):
            for label in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                t = time.perf_counter()
                runs[label]()
                print(f"  round {r} {label:17s} {n / (time.perf_counter() - t):7.1f} patches/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtimes", default="openvino,onnxruntime")
    args = ap.parse_args()
    threads = apply_threads(cpu_threads())
    net, segs = build_backbone("efficientnet_lite0"), segments(args.images)
    n = sum(len(b) for _, b in segs)
    print(f"{args.images} VOC images, {n} patches, {threads} threads")
    for name in args.runtimes.split(","):
        compare(net, name, threads, segs, args.rounds)


if __name__ == "__main__":
    main()
