"""Exported ONNX models (ONNX Runtime) against ``predict`` on the same images, side by side in one run.

A head is trained on a few VOC train images (image objective, logistic regression: quick to
fit; the backbone dominates either way) and exported three ways: at ``--size``, at ``--size``
with ``--maps``, and ``--dynamic``. Each is timed against what featurecache does for the same
output on the same pixels: ``predict`` on the val images resized to ``--size`` (the fixed-size
models), ``predict`` plus its cam maps (the maps model), ``predict`` on the images at their own
sizes (the dynamic model). Sessions are made and ``predict``'s backbone built before the clock
starts (both warm), alternating ``--repeats`` times. Printed: images/s of each, their ratio,
and the largest score (and map) difference.

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
from featurecache.maps import MapConfig
from featurecache.patches import DEFAULT_SCALES, PatchGrid
from featurecache.predict import load_head
from featurecache.train import fit_objective

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc2012-sample" / "VOC2012"


def _arguments():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=6, help="val images scored (and train images the head learns from)")
    ap.add_argument("--scales", default=",".join(str(s) for s in DEFAULT_SCALES))
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--size", default="500,375")
    ap.add_argument("--mode", default="crop", choices=("crop", "dense"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    return ap.parse_args()


def _timed(run_model, run_featurecache, repeats: int) -> tuple:
    """Best-of-``repeats`` seconds of both, alternated, and their last outputs."""
    model_s, featurecache_s = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        exported = run_model()
        model_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        predicted = run_featurecache()
        featurecache_s.append(time.perf_counter() - t)
    return min(model_s), min(featurecache_s), exported, predicted


def _row(name: str, n: int, seconds: tuple, difference: str) -> str:
    model_ips, fc_ips = n / seconds[0], n / seconds[1]
    return f"{name:<24} {model_ips:>10.3f} {fc_ips:>14.3f} {model_ips / fc_ips:>7.2f}  {difference}"


def _bench(head: Path, tmp: Path, val: list, args) -> list:
    width, height = (int(v) for v in args.size.split(","))
    predictor = load_head(head, device="cpu")
    predictor.backbone()
    localizer = predictor._localizer(MapConfig(device="cpu"))
    localizer.runtime()
    _, resized = check_images(val, width, height)
    _, own = check_images(val, None, None)

    def predict(arrays):
        return lambda: np.asarray(predictor.predict(list(arrays), progress=False, threads=args.threads,
                                                    workers=0).scores)

    def with_maps():
        return predict(resized)(), [localizer.pixels_map(a).scores.transpose(1, 2, 0) for a in resized]

    rows = []
    for name, options, arrays, reference in (
            ("fixed size", {"input_size": (width, height)}, resized, predict(resized)),
            ("fixed size + maps", {"input_size": (width, height), "maps": True}, resized, with_maps),
            ("dynamic (own sizes)", {"dynamic": True}, own, predict(own))):
        session = _session(export(head, tmp / "m.onnx", **options).path, args.threads)
        session.run(None, {"image": arrays[0]})  # warm

        def run(session=session, arrays=arrays):
            return [session.run(None, {"image": a}) for a in arrays]

        s_model, s_fc, exported, predicted = _timed(run, reference, args.repeats)
        scores = predicted[0] if isinstance(predicted, tuple) else predicted
        difference = f"scores {np.abs(np.stack([o[0] for o in exported]) - scores).max():.2e}"
        if isinstance(predicted, tuple):
            difference += f", maps {max(np.abs(o[1] - m).max() for o, m in zip(exported, predicted[1])):.2e}"
        rows.append(_row(name, len(arrays), (s_model, s_fc), difference))
    return rows


def main() -> int:
    args = _arguments()
    grid = PatchGrid(scales=tuple(float(s) for s in args.scales.split(",")), input_size=args.input_size)
    val = [DATA / "JPEGImages" / f"{i}.jpg" for i in (DATA / "ImageSets/Main/val.txt").read_text().split()]
    val = val[:args.images]
    with tempfile.TemporaryDirectory() as tmp:
        full = read_dataset(DATA, split="train")
        subset = ImageSet(full.root, full.layout, full.classes, full.records[:max(args.images, 4)], split="train")
        cache = extract(subset, Path(tmp) / "c.h5", grid=grid, mode=args.mode, progress=False, threads=args.threads)
        head = fit_objective(cache.path, objective="image", progress=False).save(Path(tmp) / "h.pt")
        rows = _bench(head, Path(tmp), val, args)
    print(f"{len(val)} VOC val images, {args.mode} mode, scales {args.scales} at {args.input_size} px, fixed size "
          f"{args.size}, {args.threads} threads (best of {args.repeats}); featurecache: predict (runtime auto), "
          "with its cam maps for the maps row")
    print(f"{'model':<24} {'ONNX img/s':>10} {'featurecache':>14} {'ratio':>7}  max |difference|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
