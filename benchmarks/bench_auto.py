"""What `fit --objective auto` costs next to one default fit of `mil` and of `image`, on the same cache.

    python benchmarks/bench_auto.py --work results-work [--only voc|bccd] [--repeat 1]

On the caches of examples/auto_table.py (VOC sample: the `train` split of the five-scale
cache; BCCD: its `train` split), trains `image`, `mil` and `auto` at their defaults one
after the other in this process, and prints the seconds of each and auto's ratio to mil
(the target: at most 10×). With --repeat N each is trained N times, alternating, and the
median is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from featurecache.train import fit_objective

SETS = {"voc": "voc-patches.h5", "bccd": "bccd-patches.h5"}


def seconds(cache: Path, objective: str) -> tuple:
    t = time.perf_counter()
    head = fit_objective(cache, objective=objective, train_split="train", progress=False)
    return time.perf_counter() - t, head


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("results-work"))
    ap.add_argument("--only", choices=sorted(SETS))
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    for key in [args.only] if args.only else list(SETS):
        cache = args.work / SETS[key]
        times: dict = {"image": [], "mil": [], "auto": []}
        chosen = ""
        for _ in range(args.repeat):
            for objective in times:
                dt, head = seconds(cache, objective)
                times[objective].append(dt)
                if objective == "auto":
                    sel = head.summary["selection"]
                    chosen = f"chose {sel['chosen']} ({sel['folds']}-fold CV on {sel['images']} images)"
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{key}: image {med['image']:.1f} s, mil {med['mil']:.1f} s, auto {med['auto']:.1f} s "
              f"= {med['auto'] / med['mil']:.1f}x mil, {med['auto'] / med['image']:.0f}x image; auto {chosen}",
              flush=True)


if __name__ == "__main__":
    main()
