"""Issue #31's comparison: the attention objective against mil, hybrid and the whole-image probe.

    python examples/attention_table.py [--work DIR] [--only voc|bccd] [--resamples N] [--grid ...]

VOC sample: 5-fold cross-validation over its 100 images, 1 seed; BCCD: its train/val split, 3
seeds. One `featurecache.ablate` run per data set on a dense-mode multi-scale patch cache
(extracted here if missing: VOC λ ≤ 2.4, five scales; BCCD λ ∈ {1, 1.6, 2.4}) and a
whole-image cache of the same images: rows are attention (per-class and shared branches),
mil and hybrid at `fit`'s defaults, and the whole-image probe (a second ablate run on the
whole-image cache, same folds: :data:`PROBE_GRID`). mAP ± std over folds (VOC) or seeds (BCCD),
the paired bootstrap interval over images, the paired difference to the best row (the
probe's run is not paired with the others), and the training seconds per fit (and per mil
fit). Writes WORK/<data set>-attention.json and prints a markdown table.
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
GRID = ["objective=attention,mil,hybrid", "attention=per-class,shared"]
#: The probe runs on the whole-image cache (crop mode: ablate's ``whole_image`` needs the patch cache's
#: fingerprint, and a dense cache's differs), same folds or split and seeds: one patch per image, so
#: the image objective's mean pooling is the whole-image feature.
PROBE_GRID = ["objective=image", "image_pooling=mean"]


def name(cfg: dict) -> str:
    o = cfg["objective"]
    if o == "image":
        return "whole-image probe" if cfg["image_pooling"] == "whole" else f"image ({cfg['image_pooling']})"
    if o == "attention":
        extra = [f"{k}={cfg[k]}" for k in ("image_lr", "attention_dropout", "attention_patch_weight") if k in cfg]
        return f"attention ({cfg['attention']}{', ' if extra else ''}{', '.join(extra)})"
    return o


def pct(v) -> str:
    return f"{100 * v:.1f}"


def diff(d) -> str:
    return "" if not d else f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]"


def caches(key: str, work: Path) -> tuple:
    """The dense patch cache and the whole-image cache of a data set (extracted when missing)."""
    root, split, scales, _ = SETS[key]
    patches, whole = work / f"{key}-dense.h5", work / f"{key}-whole.h5"
    if not patches.exists():
        print(extract(root, patches, split=split, grid=PatchGrid(scales=scales), mode="dense").summary(), flush=True)
    if not whole.exists():
        print(extract(root, whole, split=split, grid=PatchGrid(whole=True)).summary(), flush=True)
    return patches, whole


def run(key: str, work: Path, resamples: int, grid: list) -> None:
    patches, whole = caches(key, work)
    r = ablate(patches, grid=parse_grid(grid), progress=False, n_boot=resamples, **SETS[key][3])
    print(r.to_text(), flush=True)
    (work / f"{key}-attention.json").write_text(r.to_json())
    probe = ablate(whole, grid=parse_grid(PROBE_GRID), progress=False, n_boot=resamples, **SETS[key][3])
    (work / f"{key}-probe.json").write_text(probe.to_json())
    probe.rows[0].config["image_pooling"] = "whole"
    mil = next(row for row in r.rows if row.config["objective"] == "mil")
    ms = sum(mil.train_seconds) / len(mil.train_seconds)
    print(f"\n**{key}** ({r.protocol}; {r.trainings} trainings in {r.seconds / 60:.0f} min)\n")
    print("| row | mAP | 95% interval | vs best | vs probe | train s | × mil |")
    print("|---|---|---|---|---|---|---|")
    for row in [*r.rows, probe.rows[0]]:
        s = sum(row.train_seconds) / len(row.train_seconds)
        print(f"| {name(row.config)} | {pct(row.mean)} ± {pct(row.std)} | [{pct(row.ci[0])}, {pct(row.ci[1])}] | "
              f"{diff(row.vs_best)} | {diff(row.vs_probe)} | {s:.1f} | {s / ms:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("results-work"))
    ap.add_argument("--only", choices=sorted(SETS))
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--grid", nargs="*", default=GRID, help="ablate grid entries [default: %(default)s]")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.work.mkdir(parents=True, exist_ok=True)
    for key in [args.only] if args.only else list(SETS):
        run(key, args.work, args.resamples, args.grid)


if __name__ == "__main__":
    main()
