"""Do the localisation maps point at the objects? Pointing accuracy and CorLoc on the VOC sample and BCCD.

    python examples/localization.py [--work DIR] [--data voc,bccd] [--objectives auto,hybrid,patch]

For each data set, heads of each objective (``auto`` is ``fit``'s default) are trained on the
``train`` images of a patch cache, and every map method
(:data:`featurecache.resources.MAP_METHODS`) is evaluated on the ``val`` images with
:func:`featurecache.localize.evaluate_localization` (what ``featurecache localize HEAD CACHE
--evaluate --split val`` prints): for every image and class present, is the map's peak in one
of the class's boxes (0 px, and within 15 px), and does the map's box reach IoU 0.5 with one
(CorLoc). Baselines: the image centre, and the whole image as the box.

Caches (extracted here when missing, with the command line's defaults otherwise):
VOC sample: ``voc-full.h5``, the paper's nine scales (about 11 min on 2 cores);
BCCD: ``bccd-patches.h5`` (trainval, λ in {1, 1.6, 2.4}, as examples/results_tables.py makes it).
Prints one markdown table per data set.
"""

import argparse
from pathlib import Path

from featurecache.extract import extract
from featurecache.heads.registry import FitConfig
from featurecache.localize import evaluate_localization
from featurecache.patches import PatchGrid
from featurecache.resources import MAP_METHODS
from featurecache.train import fit_objective

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = {
    "voc": (DATA / "voc2012-sample" / "VOC2012", "voc-full.h5", {"grid": PatchGrid()}),
    "bccd": (DATA / "bccd", "bccd-patches.h5", {"grid": PatchGrid(scales=(1, 1.6, 2.4)), "split": "trainval"}),
}


def table(name: str, work: Path, objectives: list) -> str:
    root, file, options = SETS[name]
    cache = work / file
    if not cache.exists():
        extract(root, cache, progress=False, **options)
    rows = []
    for objective in objectives:
        head = fit_objective(cache, FitConfig(objective, {}, train_split="train", progress=False))
        label = objective + (f" (chose {head.summary['selection']['chosen']})" if "selection" in head.summary else "")
        for method in MAP_METHODS:
            if "windows" in method and not head.spec.patch_scores:
                continue  # image and fusion heads have no patch scores to average
            r = evaluate_localization(head, cache, split="val", method=method, progress=False)
            o = r.to_dict()["overall"]
            rows.append(f"| {label} | {method} | {100 * o['pointing']:.1f} | {100 * o['pointing_tol']:.1f} | "
                        f"{100 * o['corloc']:.1f} | {r.seconds_per_image:.2f} |")
    o = r.to_dict()["overall"]
    rows.append(f"| image centre / whole image | (no model) | {100 * o['centre']:.1f} | {100 * o['centre_tol']:.1f} | "
                f"{100 * o['whole_image']:.1f} | |")
    head_line = (f"{name}: {r.n_images} val images, {int(r.pairs.sum())} image-class pairs\n\n"
                 "| head | map | pointing 0 px | pointing 15 px | CorLoc | s / image |\n|---|---|---|---|---|---|")
    return "\n".join([head_line, *rows])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("results-work"))
    ap.add_argument("--data", default="voc,bccd")
    ap.add_argument("--objectives", default="auto,hybrid,patch")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    for name in args.data.split(","):
        print(table(name, args.work, args.objectives.split(",")), end="\n\n", flush=True)


if __name__ == "__main__":
    main()
