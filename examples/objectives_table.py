"""Issue #7's comparison: every objective's best configuration against the whole-image probe.

    python examples/objectives_table.py [--work DIR] [--only voc|bccd] [--seeds N]

VOC sample: 5-fold cross-validation over its 100 images, 1 seed (std over folds); BCCD: its
train/val split, 3 seeds (std over seeds; logistic regression is deterministic).

One `featurecache.ablate` run per data set, on the multi-scale patch cache of
examples/results_tables.py (extracted there, or here if missing) plus a whole-image cache of
the same images: the patch objective (the paper's), the image objective (pooled patch
features), mil and hybrid, and the whole-image one-vs-rest logistic regression probe
(``image_pooling=whole``), all on the same folds and scored by the same eval code. Prints
the full ranking and a markdown table of each objective's best row; writes
WORK/<data set>-objectives.json.
"""

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from featurecache.ablate import ablate, parse_grid
from featurecache.extract import extract
from featurecache.patches import PatchGrid

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

SETS = {
    # name: (root, split to extract, scales, protocol)
    "voc": (DATA / "voc2012-sample" / "VOC2012", None, (1, 1.3, 1.6, 2, 2.4), {"folds": 5, "seeds": 1}),
    "bccd": (DATA / "bccd", "trainval", (1, 1.6, 2.4), {"train_split": "train", "val_split": "val", "seeds": 3}),
}

GRID = [
    "objective=patch,image,mil,hybrid",
    # patch: the best rows of the paper-style tables (docs/results.md)
    "head=mlp", "hidden=0,2048", "background=weight,sample:0.1", "pooling=power,max", "k=5",
    # image: pooled patch features, and the whole-image probe
    "image_pooling=whole,mean,scales,mean+max,mean+coarse", "C=0.1,1",
    # mil / hybrid
    "aggregation=power:5,lse:1,max", "patch_weight=0.3,1",
]


def describe(cfg):
    o = cfg["objective"]
    if o == "patch":
        pool = "max" if cfg["pooling"] == "max" else f"k = {cfg['k']:g}"
        return (f"FCa {cfg['hidden']:g} + FCb" if cfg["hidden"] else "FCb only"), f"{cfg['background']}, {pool}"
    if o == "image":
        if cfg["image_pooling"] == "whole":
            return "whole image (probe)", f"logreg C = {cfg['C']:g}"
        return f"pooled {cfg['image_pooling']}", f"logreg C = {cfg['C']:g}"
    extra = f", patch weight {cfg['patch_weight']:g}, {cfg['background']}" if o == "hybrid" else ""
    return "linear patch scorer", f"{cfg['aggregation']}{extra}"


def run(name, work, seeds):
    root, split, scales, protocol = SETS[name]
    patches, whole = work / f"{name}-patches.h5", work / f"{name}-whole.h5"
    print(extract(root, patches, split=split, grid=PatchGrid(scales=scales)).summary(), flush=True)
    print(extract(root, whole, split=split, grid=PatchGrid(whole=True)).summary(), flush=True)
    protocol = dict(protocol, **({"seeds": seeds} if seeds else {}))
    r = ablate(patches, grid=parse_grid(GRID), whole_image=whole, progress=False, **protocol)
    print(r.to_text(), flush=True)
    (work / f"{name}-objectives.json").write_text(r.to_json())
    print(table(name, json.loads(r.to_json())))


def table(name, data):
    """Markdown: the best row of each objective, and the probe."""
    how = data["protocol"]
    lines = [f"{name}: {how}, {data['seeds']} seed(s), one ablate run of {data['trainings']} trainings in "
             f"{data['seconds'] / 60:.0f} min; mAP % mean ± std over folds × seeds", "",
             "| objective | model | best setting | mAP | vs probe, paired | train s |", "|---|---|---|---|---|---|"]
    best = {}
    for row in data["rows"]:  # sorted best first
        cfg = {k: _num(v) for k, v in row["config"].items()}
        key = "probe" if cfg["objective"] == "image" and cfg["image_pooling"] == "whole" else cfg["objective"]
        best.setdefault(key, (cfg, row))
    probe = np.array(best["probe"][1]["maps"]) if "probe" in best else None
    for key in ("patch", "image", "mil", "hybrid", "probe"):
        if key not in best:
            continue
        cfg, row = best[key]
        model, setting = describe(cfg)
        label = "whole-image probe" if key == "probe" else key
        paired = ""
        if probe is not None and key != "probe":
            # Same folds and seeds in the same order: per-run differences.
            d = 100 * (np.array(row["maps"]) - probe)
            paired = f"{d.mean():+.1f} ± {d.std():.1f} (ahead in {int((d > 0).sum())}/{len(d)})"
        lines.append(f"| {label} | {model} | {setting} | {100 * row['map_mean']:.1f} ± {100 * row['map_std']:.1f} "
                     f"| {paired} | {row['train_seconds']:.1f} |")
    lines += ["", "At `featurecache fit`'s default settings of each objective:", "",
              "| objective | model | setting | mAP |", "|---|---|---|---|"]
    for key, want in DEFAULT_ROWS.items():
        for row in data["rows"]:
            cfg = {k: _num(v) for k, v in row["config"].items()}
            if cfg["objective"] == key and all(cfg.get(k) == v for k, v in want.items()):
                model, setting = describe(cfg)
                lines.append(f"| {key} | {model} | {setting} | {100 * row['map_mean']:.1f} ± "
                             f"{100 * row['map_std']:.1f} |")
                break
    return "\n".join(lines)


# `fit`'s defaults per objective (featurecache.heads.MLPHead, objectives.ImageLogRegHead, MILHead).
DEFAULT_ROWS = {
    "patch": {"hidden": 2048.0, "background": "weight", "pooling": "power", "k": 5.0},
    "image": {"image_pooling": "mean", "C": 1.0},
    "mil": {"aggregation": "power:5"},
    "hybrid": {"aggregation": "power:5", "patch_weight": 0.3, "background": "weight"},
}


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("results-work"))
    ap.add_argument("--only", choices=sorted(SETS), default=None)
    ap.add_argument("--seeds", type=int, default=None, help="override the per-data-set seeds")
    ap.add_argument("--tables-only", action="store_true", help="print the tables of an earlier run's JSON")
    args = ap.parse_args()
    names = [args.only] if args.only else list(SETS)
    if args.tables_only:
        for name in names:
            print(table(name, json.loads((args.work / f"{name}-objectives.json").read_text())), end="\n\n")
        return
    logging.basicConfig(level=logging.WARNING)
    args.work.mkdir(parents=True, exist_ok=True)
    for name in names:
        run(name, args.work, args.seeds)


if __name__ == "__main__":
    main()
