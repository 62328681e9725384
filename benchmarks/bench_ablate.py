"""What a 12-configuration head ablation costs next to one extraction of the same images.

    python benchmarks/bench_ablate.py [--images 30] [--scales ...] [--input-size 224]

Extracts the first N images of the VOC sample once (timed), then runs a 12-configuration
ablation on that cache (timed): hidden 0 / 2048 × background weight / sample:0.1 (4 trained
heads) × k = 1, 5, 10 (evaluation only), trained on the images of the `train` split and
evaluated on the `val` split. Without the cache, each configuration would need its own
extraction: the target is a sweep ≥ 10× cheaper than that, i.e. under 1.2 extractions.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from featurecache.ablate import ablate, parse_grid
from featurecache.datasets import ImageSet, read_dataset
from featurecache.extract import extract
from featurecache.patches import DEFAULT_SCALES, PatchGrid

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc2012-sample" / "VOC2012"
GRID = ["hidden=0,2048", "background=weight,sample:0.1", "k=1,5,10"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--images", type=int, default=30)
    ap.add_argument("--scales", default=",".join(f"{s:g}" for s in DEFAULT_SCALES))
    ap.add_argument("--input-size", type=int, default=224)
    args = ap.parse_args(argv)
    full = read_dataset(args.data)
    images = ImageSet(full.root, full.layout, full.classes, full.records[: args.images])
    grid = PatchGrid(scales=[float(s) for s in args.scales.split(",")], input_size=args.input_size)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.h5"
        t = time.perf_counter()
        r = extract(images, out, grid=grid, progress=False, device="cpu")
        t_extract = time.perf_counter() - t
        print(f"extraction: {r.images} images, {r.patches} patches, {t_extract:.1f} s", flush=True)
        t = time.perf_counter()
        result = ablate(out, grid=parse_grid(GRID), val_split="val", progress=False, device="cpu")
        t_sweep = time.perf_counter() - t
    print(result.to_text())
    n = len(result.rows)
    print(f"\n{n}-configuration sweep: {t_sweep:.1f} s = {t_sweep / t_extract:.2f} extractions "
          f"(target < 1.2)")
    print(f"re-extracting for each configuration would take {n * t_extract:.0f} s: the sweep is "
          f"{n * t_extract / t_sweep:.1f}x cheaper (target >= 10)")


if __name__ == "__main__":
    sys.exit(main())
