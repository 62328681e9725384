"""The paper-style ablation tables on the shared real data (docs/results.md).

    python examples/results_tables.py [--work DIR] [--only voc|bccd] [--seeds N]

VOC sample: 5-fold cross-validation over its 100 images (grouped by image).
BCCD: its own split (train 205 images, val 87), image-level AP for RBC/WBC/Platelets
and patch-level accuracy.

For each data set: one multi-scale patch cache and one whole-image cache are extracted once
(kept in --work; a rerun only retrains), then `featurecache.ablate` runs the paper's
ablations on the patch cache — FCb only vs FCa+FCb vs three layers; background re-weighting
vs 10% sampling vs none; k = 1, 5, 10 and max pooling; MLP vs logistic regression — and
the whole-image baselines on the whole-image cache. Prints markdown tables and writes the
raw results as JSON to WORK/<data set>-*.json.
"""

import argparse
import json
import logging
from pathlib import Path

from featurecache.ablate import ablate, parse_grid
from featurecache.extract import extract
from featurecache.patches import PatchGrid

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

SETS = {
    # name: (root, split to extract, scales, protocol)
    "voc": (DATA / "voc2012-sample" / "VOC2012", None, (1, 1.3, 1.6, 2, 2.4), {"folds": 5}),
    "bccd": (DATA / "bccd", "trainval", (1, 1.6, 2.4), {"train_split": "train", "val_split": "val"}),
}

# Training configurations: one row each (evaluation settings are crossed with all of them).
PATCH_CONFIGS = [
    ["head=mlp", "hidden=0", "background=weight"],
    ["head=mlp", "hidden=2048", "background=weight"],
    ["head=mlp", "hidden=2048+2048", "background=weight"],
    ["head=mlp", "hidden=2048", "background=sample:0.1"],
    ["head=mlp", "hidden=2048", "background=none"],
    ["head=logreg", "background=weight"],
]
EVAL = ["k=1,5,10", "pooling=power,max"]


def run(name, work, seeds):
    root, split, scales, protocol = SETS[name]
    patches = work / f"{name}-patches.h5"
    whole = work / f"{name}-whole.h5"
    print(extract(root, patches, split=split, grid=PatchGrid(scales=scales)).summary(), flush=True)
    print(extract(root, whole, split=split, grid=PatchGrid(whole=True)).summary(), flush=True)
    rows = []
    for cfg in PATCH_CONFIGS:
        r = ablate(patches, grid=parse_grid(cfg + EVAL), seeds=seeds, progress=False, **protocol)
        rows += [("patches", row) for row in r.rows]
        print(r.to_text(), flush=True)
    for cfg in (["head=logreg"], ["head=mlp", "hidden=0"], ["head=mlp", "hidden=2048"]):
        r = ablate(whole, grid=parse_grid(cfg + ["pooling=max"]), seeds=seeds, progress=False, **protocol)
        rows += [("whole image", row) for row in r.rows]
        print(r.to_text(), flush=True)
    out = [{"input": inp, **{k: str(v) for k, v in row.config.items()}, "map_mean": row.mean, "map_std": row.std,
            "runs": len(row.maps), "train_seconds": sum(row.train_seconds) / len(row.train_seconds),
            "patch_accuracy": sum(row.patch_accuracy) / len(row.patch_accuracy)}
           for inp, row in rows]
    (work / f"{name}-results.json").write_text(json.dumps(out, indent=1))
    print(table(name, out))


def table(name, rows):
    """Markdown: one row per trained configuration, one column per image-score pooling."""
    root, split, scales, protocol = SETS[name]
    cols = [("power", "1"), ("power", "5"), ("power", "10"), ("max", None)]
    groups = {}
    for o in rows:
        key = (o["input"], o["head"], o["hidden"] if o["head"] == "mlp" else "-", o["background"])
        k = None if o["pooling"] == "max" else str(int(float(o["k"])))
        groups.setdefault(key, {})[(o["pooling"], k)] = o
    how = "5-fold cross-validation over the 100 images" if "folds" in protocol else "train 205 / val 87 images"
    lines = [f"{name}: {how}; patches at scales {', '.join(map(str, scales))}, 224 px; mAP % (mean ± std over "
             "folds); patch accuracy % on labelled patches; seconds per training", "",
             "| input | head | hidden | background | k = 1 | k = 5 | k = 10 | max | patch acc | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def best(g):
        return max(v["map_mean"] for v in g.values())

    for key, g in sorted(groups.items(), key=lambda kv: -best(kv[1])):
        cells = []
        for c in cols:
            o = g.get(c)
            cells.append("" if o is None else f"{100 * o['map_mean']:.1f} ± {100 * o['map_std']:.1f}")
        any_o = next(iter(g.values()))
        hidden = key[2].replace("(", "").replace(")", "").replace(", ", "+")
        lines.append(f"| {key[0]} | {key[1]} | {hidden} | {key[3]} | " + " | ".join(cells)
                     + f" | {100 * any_o['patch_accuracy']:.1f} | {any_o['train_seconds']:.1f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("results-work"))
    ap.add_argument("--only", choices=sorted(SETS), default=None)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--tables-only", action="store_true", help="print the tables of an earlier run's JSON")
    args = ap.parse_args()
    if args.tables_only:
        for name in [args.only] if args.only else list(SETS):
            print(table(name, json.loads((args.work / f"{name}-results.json").read_text())), end="\n\n")
        return
    logging.basicConfig(level=logging.WARNING)
    args.work.mkdir(parents=True, exist_ok=True)
    for name in [args.only] if args.only else list(SETS):
        run(name, args.work, args.seeds)


if __name__ == "__main__":
    main()
