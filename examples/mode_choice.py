"""Issue #28's decision: crop against dense mode with `fit`'s default objective, paired on the same images.

    python examples/mode_choice.py [--work results-work] [--only voc|bccd] [--resamples 1000]

Each data set is extracted twice from the same images at the same scales (those of
docs/results.md: VOC sample at five scales, BCCD at three), once per mode, with the default
backbone and runtime. `fit`'s default objective (``auto``) is then trained and evaluated on
each cache by :func:`featurecache.ablate.ablate` under the same protocol: VOC sample, 5-fold
cross-validation over its 100 images (the same folds for both modes); BCCD, train -> val, 3
seeds. Per mode: mAP (mean over folds or seeds) with its bootstrap interval; then the paired
difference dense - crop: in each evaluation fold the same resampled images score both modes'
heads, so the interval is of the difference itself. Writes WORK/mode-choice.json and prints a
markdown table.
"""

import argparse
import json
from pathlib import Path

import numpy as np

from featurecache.ablate import ablate, parse_grid
from featurecache.cache import FeatureCache
from featurecache.extract import extract
from featurecache.metrics import bootstrap_map, bootstrap_weights, image_folds, interval
from featurecache.patches import PatchGrid

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

SETS = {
    # name: (root, split to extract, scales, protocol)
    "voc": (DATA / "voc2012-sample" / "VOC2012", None, (1, 1.3, 1.6, 2, 2.4), {"folds": 5, "seeds": 1}),
    "bccd": (DATA / "bccd", "trainval", (1, 1.6, 2.4), {"train_split": "train", "val_split": "val", "seeds": 3}),
}
MODES = ("crop", "dense")


def evaluation_tables(cache: Path, protocol: dict) -> list:
    """The evaluation images of each fold, as ablate cuts them: ``(labels, difficult)`` per fold."""
    with FeatureCache(cache) as c:
        t = c.images
        if "folds" in protocol:
            return [(t.labels[test], t.difficult[test]) for _, test in image_folds(c.num_images, protocol["folds"], 0)]
        val = np.array([protocol["val_split"] in s.split(",") for s in t.split])
        return [(t.labels[val], t.difficult[val])]


def paired(rows: dict, tables: list, resamples: int) -> dict:
    """Bootstrap over images, the same draws for both modes: each mode's interval and dense - crop's."""
    rng = np.random.RandomState(0)
    boot = {m: np.zeros(resamples) for m in rows}
    for f, (labels, difficult) in enumerate(tables):
        weights = bootstrap_weights(len(labels), resamples, rng)
        for m, row in rows.items():
            runs = [s for fold, s in row.runs if fold == f]
            for scores in runs:
                boot[m] += bootstrap_map(scores, labels, difficult, weights) / len(row.runs)
    means = {m: row.mean for m, row in rows.items()}
    d = means["dense"] - means["crop"]
    return {"map": means, "std": {m: row.std for m, row in rows.items()},
            "interval": {m: interval(boot[m], center=means[m]) for m in rows},
            "dense_minus_crop": (d, *interval(boot["dense"] - boot["crop"], center=d))}


def run(key: str, work: Path, resamples: int) -> dict:
    root, split, scales, protocol = SETS[key]
    rows, caches, extraction = {}, {}, {}
    for mode in MODES:
        caches[mode] = work / f"{key}-{mode}-modes.h5"
        r = extract(root, caches[mode], split=split, grid=PatchGrid(scales=scales), mode=mode)
        extraction[mode] = {"patches": r.patches, "seconds": r.seconds}
        print(r.summary(), flush=True)
    with FeatureCache(caches["crop"]) as a, FeatureCache(caches["dense"]) as b:
        if list(a.images.path) != list(b.images.path):
            raise SystemExit(f"{key}: the two caches hold different images")
    for mode in MODES:
        res = ablate(caches[mode], grid=parse_grid(["objective=auto"]), progress=False, n_boot=0, **protocol)
        rows[mode] = res.rows[0]
        print(f"{key} {mode}: mAP {100 * res.rows[0].mean:.1f} ({res.seconds:.0f} s)", flush=True)
    out = paired(rows, evaluation_tables(caches["crop"], protocol), resamples)
    out.update(protocol=protocol, scales=list(scales), extraction=extraction, resamples=resamples)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("results-work"))
    ap.add_argument("--only", choices=sorted(SETS))
    ap.add_argument("--resamples", type=int, default=1000)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = {k: run(k, args.work, args.resamples) for k in ([args.only] if args.only else SETS)}
    (args.work / "mode-choice.json").write_text(json.dumps(results, indent=1, default=float))
    print("\n| data set | crop mAP [95%] | dense mAP [95%] | dense - crop [95%, paired] |\n|---|---|---|---|")
    for k, r in results.items():
        cell = {m: f"{100 * r['map'][m]:.1f} [{100 * r['interval'][m][0]:.1f}, {100 * r['interval'][m][1]:.1f}]"
                for m in MODES}
        d, lo, hi = r["dense_minus_crop"]
        print(f"| {k} | {cell['crop']} | {cell['dense']} | {100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] |")


if __name__ == "__main__":
    main()
