"""The exported ONNX model (ONNX Runtime) against ``predict`` on the same images, side by side in one run.

A head is trained on a few VOC train images (image objective, logistic regression: quick to
fit; the backbone dominates either way), exported at ``--size``, and both score the same val
images resized to that size: the model session made and ``predict``'s backbone built before
the clock starts (both warm), alternating ``--repeats`` times. Printed: images/s of each, their
ratio, and the largest score difference.

Usage (from the repository root)::

    python benchmarks/bench_export.py [--images 6] [--scales 1,1.3,...] [--input-size 224] [--size 500,375]
        [--mode crop] [--threads 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from featurecache.datasets import ImageSet, read_dataset
from featurecache.deploy import _session, check_images, export
from featurecache.extract import extract
from featurecache.patches import DEFAULT_SCALES, PatchGrid
from featurecache.predict import load_head
from featurecache.train import fit_objective

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc2012-sample" / "VOC2012"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=6, help="val images scored (and train images the head learns from)")
    ap.add_argument("--scales", default=",".join(str(s) for s in DEFAULT_SCALES))
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--size", default="500,375")
    ap.add_argument("--mode", default="crop", choices=("crop", "dense"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    width, height = (int(v) for v in args.size.split(","))
    grid = PatchGrid(scales=tuple(float(s) for s in args.scales.split(",")), input_size=args.input_size)
    val = [DATA / "JPEGImages" / f"{i}.jpg" for i in (DATA / "ImageSets/Main/val.txt").read_text().split()]
    with tempfile.TemporaryDirectory() as tmp:
        full = read_dataset(DATA, split="train")
        subset = ImageSet(full.root, full.layout, full.classes, full.records[:max(args.images, 4)], split="train")
        cache = extract(subset, Path(tmp) / "c.h5", grid=grid, mode=args.mode, progress=False, threads=args.threads)
        head = fit_objective(cache.path, objective="image", progress=False).save(Path(tmp) / "h.pt")
        model = export(head, Path(tmp) / "m.onnx", input_size=(width, height)).path
        _, arrays = check_images(val[:args.images], width, height)
        session = _session(model, args.threads)
        predictor = load_head(head, device="cpu")
        predictor.backbone()
        session.run(None, {"image": arrays[0]})  # warm
        onnx_s, predict_s = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            exported = np.stack([session.run(None, {"image": a})[0] for a in arrays])
            onnx_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            predicted = predictor.predict(list(arrays), progress=False, threads=args.threads, workers=0).scores
            predict_s.append(time.perf_counter() - t)
        n = len(arrays)
        onnx_ips, predict_ips = n / min(onnx_s), n / min(predict_s)
        print(f"{n} VOC val images at {width}x{height}, {args.mode} mode, {grid.count(width, height, mode=args.mode)} "
              f"patches each, {args.threads} threads (best of {args.repeats})")
        print(f"exported model, ONNX Runtime: {onnx_ips:.3f} images/s")
        print(f"predict (runtime auto):       {predict_ips:.3f} images/s")
        print(f"ratio exported/predict: {onnx_ips / predict_ips:.2f}; max |score difference| "
              f"{np.abs(exported - predicted).max():.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
