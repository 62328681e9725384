"""Do the localisation maps point at the objects? Pointing accuracy on the VOC sample.

    python examples/localization.py [--work DIR] [--full-grid]

Trains the default ``mil`` head and the paper's ``patch`` head (FCa 2048 + FCb, 10%
background sampling) on the VOC sample's ``train`` images, computes each ``val`` image's
localisation map (per-pixel mean of patch scores, :func:`featurecache.evaluate.localization_map`),
and, for every class present in the image, checks whether the map's peak for that class lies
inside one of its ground-truth boxes (the point-based localisation measure of Oquab et al.,
CVPR 2015). Baseline: the image centre. Uses the λ ≤ 2.4 patch cache of
examples/results_tables.py (extracted here if missing), or with --full-grid the paper's nine
scales (λ up to 4; about 12 min to extract on 2 cores).
"""

import argparse
from pathlib import Path

import numpy as np

from featurecache.datasets import read_dataset
from featurecache.evaluate import localization_map
from featurecache.extract import extract
from featurecache.patches import PatchGrid
from featurecache.train import fit_head, fit_objective

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc2012-sample" / "VOC2012"


def inside(x, y, boxes):
    return bool(np.any((boxes[:, 0] <= x) & (x < boxes[:, 2]) & (boxes[:, 1] <= y) & (y < boxes[:, 3])))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("results-work"))
    ap.add_argument("--full-grid", action="store_true", help="the paper's nine scales instead of λ ≤ 2.4")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.full_grid:
        cache = args.work / "voc-full.h5"
        extract(ROOT, cache, grid=PatchGrid(), progress=False)
    else:
        cache = args.work / "voc-patches.h5"
        extract(ROOT, cache, grid=PatchGrid(scales=(1, 1.3, 1.6, 2, 2.4)), progress=False)
    heads = {
        "mil (default)": fit_objective(cache, objective="mil", train_split="train"),
        "patch (FCa+FCb, sample:0.1)": fit_head(cache, train_split="train", background="sample:0.1"),
    }
    val = read_dataset(ROOT, split="val")
    hits = {name: [] for name in [*heads, "image centre"]}
    for rec in val:
        present = sorted({c for c, d in zip(rec.classes, rec.difficult) if not d})
        for name, head in heads.items():
            m = localization_map(head, cache, rec.relpath, stride=8)
            for cls in present:
                _, x, y = m.peak(cls)
                hits[name].append(inside(x, y, rec.boxes[np.array(rec.classes) == cls]))
        for cls in present:
            hits["image centre"].append(inside(rec.width / 2, rec.height / 2, rec.boxes[np.array(rec.classes) == cls]))
    print(f"{cache.name}: pointing accuracy on {len(val)} val images ({len(hits['image centre'])} image-class pairs):")
    for name, h in hits.items():
        print(f"  {name:<30} {100 * np.mean(h):.1f}%")


if __name__ == "__main__":
    main()
