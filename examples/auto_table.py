"""Issue #12's comparison: `fit --objective auto` against each objective at its defaults, fusion and the probe.

    python examples/auto_table.py [--work DIR] [--only voc|bccd] [--resamples N]

Out-of-sample throughout: VOC sample, 5-fold cross-validation over its 100 images (auto's own
3-fold selection runs inside each outer training fold, on those images only); BCCD, its
train/val split, 3 seeds. One `featurecache.ablate` run per data set on the multi-scale
patch cache and a whole-image cache of the same images (extracted here if missing, as
examples/objectives_table.py does): rows are the whole-image probe, patch, image (mean
pooling), mil, hybrid at `fit`'s defaults, fusion (image:coarse + hybrid) with either fusion
rule, and auto. mAP ± std over folds (VOC) or seeds (BCCD), with the paired bootstrap
interval over images and the paired differences to the best row and to the probe. Writes
WORK/<data set>-auto.json and prints a markdown table.
"""

import argparse
import logging
from pathlib import Path

from featurecache.ablate import ablate, parse_grid
from featurecache.extract import extract
from featurecache.patches import PatchGrid

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

SETS = {
    # name: (root, split to extract, scales, protocol)
    "voc": (DATA / "voc2012-sample" / "VOC2012", None, (1, 1.3, 1.6, 2, 2.4), {"folds": 5, "seeds": 1}),
    "bccd": (DATA / "bccd", "trainval", (1, 1.6, 2.4), {"train_split": "train", "val_split": "val", "seeds": 3}),
}
GRID = ["objective=patch,image,mil,hybrid,fusion,auto", "image_pooling=mean,whole", "fusion_rule=zscore,rank"]


def name(cfg: dict) -> str:
    o = cfg["objective"]
    if o == "image":
        return "whole-image probe" if cfg["image_pooling"] == "whole" else "image (mean)"
    if o == "fusion":
        return f"fusion ({cfg['fusion_rule']})"
    return o


def pct(v) -> str:
    return f"{100 * v:.1f}"


def diff(d) -> str:
    return "" if not d else f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]"


def run(key: str, work: Path, resamples: int) -> None:
    root, split, scales, protocol = SETS[key]
    patches, whole = work / f"{key}-patches.h5", work / f"{key}-whole.h5"
    print(extract(root, patches, split=split, grid=PatchGrid(scales=scales)).summary(), flush=True)
    print(extract(root, whole, split=split, grid=PatchGrid(whole=True)).summary(), flush=True)
    r = ablate(patches, grid=parse_grid(GRID), whole_image=whole, progress=False, n_boot=resamples, **protocol)
    print(r.to_text(), flush=True)
    (work / f"{key}-auto.json").write_text(r.to_json())
    mil = next(row for row in r.rows if row.config["objective"] == "mil")
    print(f"\n**{key}** ({r.protocol}; {r.trainings} trainings in {r.seconds / 60:.0f} min)\n")
    print("| row | mAP | 95% interval | vs best | vs probe | train s | × mil |")
    print("|---|---|---|---|---|---|---|")
    for row in r.rows:
        s = sum(row.train_seconds) / len(row.train_seconds)
        ms = sum(mil.train_seconds) / len(mil.train_seconds)
        print(f"| {name(row.config)} | {pct(row.mean)} ± {pct(row.std)} | [{pct(row.ci[0])}, {pct(row.ci[1])}] | "
              f"{diff(row.vs_best)} | {diff(row.vs_probe)} | {s:.1f} | {s / ms:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("results-work"))
    ap.add_argument("--only", choices=sorted(SETS))
    ap.add_argument("--resamples", type=int, default=1000)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.work.mkdir(parents=True, exist_ok=True)
    for key in [args.only] if args.only else list(SETS):
        run(key, args.work, args.resamples)


if __name__ == "__main__":
    main()
