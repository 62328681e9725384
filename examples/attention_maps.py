"""Issue #31's localisation: pointing and CorLoc of attention maps against cam maps and the image centre.

    python examples/attention_maps.py [--work DIR] [--only voc|bccd] [--methods attention,cam,windows]

On the dense-mode caches of examples/attention_table.py: an attention head and a mil head at
`fit`'s defaults trained on the `train` images; every map method measured on the `val` images
(:func:`featurecache.localize.evaluate_localization`: pointing at 0 and 15 px, CorLoc at IoU
0.5, the image centre and the whole image as baselines). Writes WORK/<data set>-maps.json.
"""

import argparse
import json
import logging
import time
from pathlib import Path

from featurecache.localize import evaluate_localization
from featurecache.train import fit_objective

HEADS = {"attention": {"objective": "attention"}, "mil": {"objective": "mil"}}
METHODS = {"attention": ("attention", "cam", "windows"), "mil": ("cam",)}


def run(key: str, work: Path, only_heads: list) -> None:
    cache = work / f"{key}-dense.h5"
    rows = []
    for name in only_heads:
        t0 = time.perf_counter()
        head = fit_objective(cache, train_split="train", progress=False, **HEADS[name])
        fit_s = time.perf_counter() - t0
        head.save(work / f"{key}-{name}.head.pt")
        for method in METHODS[name]:
            r = evaluate_localization(head, cache, split="val", method=method, progress=False)
            d = r.to_dict()
            rows.append({"head": name, "method": method, "fit_seconds": fit_s, **{k: d[k] for k in (
                "images", "pairs", "seconds_per_image", "overall")}})
            o = d["overall"]
            print(f"| {key} | {name} | {method} | {100 * o['pointing']:.1f} | {100 * o['pointing_tol']:.1f} | "
                  f"{100 * o['corloc']:.1f} | {100 * o['centre']:.1f} | {100 * o['whole_image']:.1f} | "
                  f"{d['pairs']} | {d['seconds_per_image']:.2f} |", flush=True)
            (work / f"{key}-maps.json").write_text(json.dumps(rows, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("results-work"))
    ap.add_argument("--only", choices=("voc", "bccd"))
    ap.add_argument("--heads", default="attention,mil")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print("| set | head | map | pointing 0 px | pointing 15 px | CorLoc | centre | whole image | pairs | s / image |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key in [args.only] if args.only else ["voc", "bccd"]:
        run(key, args.work, args.heads.split(","))


if __name__ == "__main__":
    main()
