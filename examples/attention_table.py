"""Issue #31's comparison: the attention objective against mil, hybrid and the whole-image probe.

    python examples/attention_table.py [--work DIR] [--only voc|bccd] [--part PART]
                                       [--resamples N] [--tables-only]

VOC sample: 5-fold cross-validation over its 100 images, 1 seed; BCCD: its train/val split, 3
seeds. `featurecache.ablate` runs (:data:`PARTS`, one process each with ``--part``) on a
dense-mode multi-scale patch cache (extracted here if missing: VOC λ ≤ 2.4, five scales; BCCD
λ ∈ {1, 1.6, 2.4}) and a whole-image cache of the same images: attention with per-class or
shared branches, mil and hybrid at `fit`'s defaults, and the whole-image probe. mAP ± std over
folds (VOC) or seeds (BCCD), the bootstrap interval over images (1000 resamples), the
difference to mil paired by fold or seed, and the training seconds per fit against mil's.
Writes WORK/<data set>-<part>.json and prints a markdown table.
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
#: One ablate run per part, each its own process if wanted (``--part``): rows of different parts
#: are paired by fold (VOC) or seed (BCCD) in the table, not by image.
PARTS = {
    "att": ["objective=attention"],
    "shared": ["objective=attention", "attention=shared"],
    "nodrop": ["objective=attention", "attention_dropout=0"],
    "drop05": ["objective=attention", "attention_dropout=0.5"],
    "lr001": ["objective=attention", "attention_dropout=0", "image_lr=0.001"],
    "milhyb": ["objective=mil,hybrid"],
    # On the whole-image cache (crop mode: ablate's ``whole_image`` needs the patch cache's
    # fingerprint, and a dense cache's differs): one patch per image, so the image objective's
    # mean pooling is the whole-image feature.
    "probe": ["objective=image", "image_pooling=mean"],
}


def name(cfg: dict) -> str:
    o = cfg["objective"]
    if o == "image":
        return "whole-image probe" if cfg["image_pooling"] == "whole" else f"image ({cfg['image_pooling']})"
    if o == "attention":
        lr = f", lr {cfg['image_lr']}" if str(cfg.get("image_lr", "0.01")) != "0.01" else ""
        return f"attention ({cfg.get('attention', 'per-class')}, dropout {cfg.get('attention_dropout', 0.25)}{lr})"
    return o


def pct(v) -> str:
    return f"{100 * v:.1f}"


def caches(key: str, work: Path) -> tuple:
    """The dense patch cache and the whole-image cache of a data set (extracted when missing)."""
    root, split, scales, _ = SETS[key]
    patches, whole = work / f"{key}-dense.h5", work / f"{key}-whole.h5"
    if not patches.exists():
        print(extract(root, patches, split=split, grid=PatchGrid(scales=scales), mode="dense").summary(), flush=True)
    if not whole.exists():
        print(extract(root, whole, split=split, grid=PatchGrid(whole=True)).summary(), flush=True)
    return patches, whole


def run(key: str, work: Path, part: str, resamples: int) -> None:
    """One part's ablate run, written to WORK/<data set>-<part>.json."""
    patches, whole = caches(key, work)
    r = ablate(whole if part == "probe" else patches, grid=parse_grid(PARTS[part]), progress=False,
               n_boot=resamples, **SETS[key][3])
    print(r.to_text(), flush=True)
    (work / f"{key}-{part}.json").write_text(r.to_json())


def table(key: str, work: Path) -> str:
    """Markdown: every part's rows, best first, with the difference to mil paired by fold or seed."""
    rows = []
    for part in PARTS:
        path = work / f"{key}-{part}.json"
        if path.exists():
            data = json.loads(path.read_text())
            for row in data["rows"]:
                if part == "probe":
                    row["config"]["image_pooling"] = "whole"
                rows.append(row)
    rows.sort(key=lambda r: -r["map_mean"])
    mil = next(r for r in rows if r["config"]["objective"] == "mil")
    lines = ["| row | mAP | 95% interval | vs mil, paired by run | train s | × mil |", "|---|---|---|---|---|---|"]
    for row in rows:
        d = 100 * (np.array(row["maps"]) - np.array(mil["maps"]))
        paired = "" if row is mil else f"{d.mean():+.1f} ± {d.std():.1f} (ahead in {int((d > 0).sum())}/{len(d)})"
        lo, hi = row["map_ci"]
        lines.append(f"| {name(row['config'])} | {pct(row['map_mean'])} ± {pct(row['map_std'])} | [{pct(lo)}, "
                     f"{pct(hi)}] | {paired} | {row['train_seconds']:.1f} | "
                     f"{row['train_seconds'] / mil['train_seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("results-work"))
    ap.add_argument("--only", choices=sorted(SETS))
    ap.add_argument("--part", choices=sorted(PARTS), help="run this part only [default: all, one after another]")
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--tables-only", action="store_true", help="print the table of earlier runs' JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.work.mkdir(parents=True, exist_ok=True)
    for key in [args.only] if args.only else list(SETS):
        if not args.tables_only:
            for part in [args.part] if args.part else list(PARTS):
                run(key, args.work, part, args.resamples)
        print(f"\n**{key}**\n\n{table(key, args.work)}", flush=True)


if __name__ == "__main__":
    main()
