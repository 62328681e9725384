"""What one `fit --objective attention` costs next to one default fit of `mil`, on the same cache.

    python benchmarks/bench_attention.py --work results-work [--only voc|bccd] [--repeat 2]

On the dense-mode caches of examples/attention_table.py (the `train` split), trains `mil` and
`attention` at their defaults alternately in this process, ``--repeat`` times each, and prints
the seconds of each fit and attention's ratio of medians to mil.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from featurecache.train import fit_objective

SETS = {"voc": "voc-dense.h5", "bccd": "bccd-dense.h5"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("results-work"))
    ap.add_argument("--only", choices=sorted(SETS))
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    for key in [args.only] if args.only else list(SETS):
        times: dict = {"mil": [], "attention": []}
        for _ in range(args.repeat):
            for objective in times:
                t = time.perf_counter()
                fit_objective(args.work / SETS[key], objective=objective, train_split="train", progress=False)
                times[objective].append(time.perf_counter() - t)
                print(f"{key} {objective}: {times[objective][-1]:.1f} s", flush=True)
        ratio = statistics.median(times["attention"]) / statistics.median(times["mil"])
        print(f"{key}: attention {ratio:.1f}x mil (medians of {args.repeat})", flush=True)


if __name__ == "__main__":
    main()
