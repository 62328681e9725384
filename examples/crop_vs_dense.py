"""Crop mode against dense mode with the same head settings, on the VOC sample and BCCD.

    python examples/crop_vs_dense.py [--work results-work] [--seeds 2]

Uses (or makes) the crop-mode caches of examples/results_tables.py in --work, extracts the
dense-mode caches of the same images and scales, and runs the same ablation on both: VOC
sample with 5-fold cross-validation over its 100 images, BCCD on its train/val split.
Prints extraction speed and a markdown table of mAP (mean ± std over folds and seeds).
"""

import argparse
import json
from pathlib import Path

from featurecache.ablate import ablate, parse_grid
from featurecache.extract import extract
from featurecache.patches import PatchGrid

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = {
    "voc": (DATA / "voc2012-sample" / "VOC2012", None, (1, 1.3, 1.6, 2, 2.4), {"folds": 5}),
    "bccd": (DATA / "bccd", "trainval", (1, 1.6, 2.4), {"train_split": "train", "val_split": "val"}),
}
# The best VOC configuration of docs/results.md and the cheapest one.
CONFIGS = [["hidden=2048", "background=sample:0.1"], ["hidden=0", "background=weight"]]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("results-work"))
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (root, split, scales, protocol) in SETS.items():
        for mode in ("crop", "dense"):
            out = args.work / (f"{name}-patches.h5" if mode == "crop" else f"{name}-dense.h5")
            r = extract(root, out, split=split, grid=PatchGrid(scales=scales), mode=mode)
            print(r.summary(), flush=True)
            for cfg in CONFIGS:
                res = ablate(out, grid=parse_grid(cfg + ["k=5", "pooling=power,max"]), seeds=args.seeds,
                             progress=False, **protocol)
                for row in res.rows:
                    rows.append({"data": name, "mode": mode, "patches": r.patches, **{k: str(v) for k, v in
                                 row.config.items()}, "map_mean": row.mean, "map_std": row.std,
                                 "runs": len(row.maps)})
                print(res.to_text(), flush=True)
    (args.work / "crop-vs-dense.json").write_text(json.dumps(rows, indent=1))
    print("\n| data | head | background | pooling | crop mAP | dense mAP |\n|---|---|---|---|---|---|")
    seen = {}
    for o in rows:
        seen.setdefault((o["data"], o["hidden"], o["background"], o["pooling"]), {})[o["mode"]] = o
    for (data, hidden, bg, pool), d in seen.items():
        cell = {m: f"{100 * o['map_mean']:.1f} ± {100 * o['map_std']:.1f}" for m, o in d.items()}
        print(f"| {data} | mlp {hidden} | {bg} | {pool if pool == 'max' else 'k = 5'} | {cell.get('crop', '')} | "
              f"{cell.get('dense', '')} |")


if __name__ == "__main__":
    main()
