"""`predict` against `extract` on the same images and settings, measured side by side in one run.

``predict`` rebuilds the head's extractor and runs the new images through ``extract`` itself,
then scores them. Its images/s should be close to extraction's: the backbone loads once and
batches span images. Each run below is timed end to end from the library call (backbone
build, decoding, patches, backbone, cache writing; for predict also head loading and scoring),
alternating extract and predict ``--repeats`` times so that neither gets a warmer machine.
Then the same prediction with localisation pictures (``maps``), reported apart.

Target on the CPU: predict ≥ 0.9 × extract in images/s.

Usage (from the repository root)::

    python benchmarks/bench_predict.py [--images 6] [--scales 1,1.3,...] [--input-size 224] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from featurecache.datasets import ImageSet, read_dataset
from featurecache.extract import extract
from featurecache.patches import DEFAULT_SCALES, PatchGrid
from featurecache.predict import load_head
from featurecache.train import fit_objective

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc2012-sample" / "VOC2012"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--scales", default=",".join(str(s) for s in DEFAULT_SCALES))
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if not (DATA / "Annotations").is_dir():
        print(f"no VOC sample at {DATA}", file=sys.stderr)
        return 1
    full = read_dataset(DATA, split="val")
    images = ImageSet(full.root, full.layout, full.classes, full.records[: args.images], split="val")
    files = [r.path for r in images]
    grid = PatchGrid(scales=tuple(float(s) for s in args.scales.split(",")), input_size=args.input_size)
    options = dict(grid=grid, workers=args.workers, device=args.device, progress=False)
    print(f"{len(images)} images, {sum(grid.count(r.width, r.height) for r in images)} patches "
          f"({args.scales} at {args.input_size} px), {torch.get_num_threads()} threads, {args.device}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        first = extract(images, tmp / "head.h5", **options)
        head = fit_objective(first.path, objective="patch", head="logreg", progress=False).save(tmp / "h.pt")
        ext_s, pred_s = [], []
        for i in range(args.repeats):
            t = time.perf_counter()
            extract(images, tmp / f"e{i}.h5", **options)
            ext_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            result = load_head(head, device=args.device).predict(files, workers=args.workers, progress=False)
            pred_s.append(time.perf_counter() - t)
            assert result.n_scored == len(files)
        t = time.perf_counter()
        load_head(head, device=args.device).predict(files, workers=args.workers, maps=tmp / "maps", progress=False)
        maps_s = time.perf_counter() - t
    e, p = statistics.median(ext_s), statistics.median(pred_s)
    n = len(files)
    print(f"extract            {n / e:7.3f} images/s  (runs: {', '.join(f'{s:.1f}' for s in ext_s)} s)")
    print(f"predict            {n / p:7.3f} images/s  (runs: {', '.join(f'{s:.1f}' for s in pred_s)} s)")
    print(f"predict with maps  {n / maps_s:7.3f} images/s  ({maps_s:.1f} s)")
    print(f"predict / extract  {e / p:.2f}x  (target >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
