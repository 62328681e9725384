"""What stage two's default fits cost: mil, hybrid and auto at the previous settings against the new defaults.

    python benchmarks/bench_auto.py --work results-work [--only voc|bccd] [--repeat 1]

On the caches of examples/auto_table.py (VOC sample: the `train` split of the five-scale
cache; BCCD: its `train` split), trains in this one process, side by side:

* `image` at its defaults (the cheapest objective, for scale);
* `mil` and `hybrid` with the previous optimiser (`image_solver=adam`: 200 epochs of Adam on
  mini-batches of 16 images) and at the new defaults (full-batch L-BFGS to the loss's plateau);
* `auto` as before (`image_solver=adam`, `cv_halving=none`: every candidate on every fold) and at
  the new defaults (L-BFGS candidates, successive halving after the first fold).

and prints the seconds and passes over the bags (epochs) of each, each old/new speed-up, and
auto's ratio to one mil fit of the same settings (the target: at most 3x at the defaults).
With --repeat N each is trained N times, the order of old and new alternating between
repeats, and the median is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from featurecache.train import fit_objective

SETS = {"voc": "voc-patches.h5", "bccd": "bccd-patches.h5"}

#: name -> (objective, options): the previous settings and the new defaults, side by side.
RUNS = {
    "image": ("image", {}),
    "mil old": ("mil", {"image_solver": "adam"}),
    "mil new": ("mil", {}),
    "hybrid old": ("hybrid", {"image_solver": "adam"}),
    "hybrid new": ("hybrid", {}),
    "auto old": ("auto", {"image_solver": "adam", "cv_halving": "none"}),
    "auto new": ("auto", {}),
}


def fit(cache: Path, name: str) -> tuple:
    """``(seconds, passes or '', what auto chose or '')`` of one fit."""
    objective, options = RUNS[name]
    t = time.perf_counter()
    head = fit_objective(cache, objective=objective, train_split="train", progress=False, **options)
    seconds = time.perf_counter() - t
    sel = head.summary.get("selection")
    note = ""
    if sel:
        dropped = ", ".join(f"{d['candidate']}" for d in sel.get("dropped", []))
        note = f"chose {sel['chosen']}" + (f"; dropped after fold 1: {dropped}" if dropped else "")
    return seconds, head.summary.get("epochs", ""), note


def order(repeat: int) -> list:
    """The names of one repeat: each old before its new on even repeats, after it on odd ones."""
    pairs = [("mil old", "mil new"), ("hybrid old", "hybrid new"), ("auto old", "auto new")]
    return ["image"] + [n for pair in pairs for n in (pair if repeat % 2 == 0 else pair[::-1])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("results-work"))
    ap.add_argument("--only", choices=sorted(SETS))
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    for key in [args.only] if args.only else list(SETS):
        cache = args.work / SETS[key]
        times: dict = {n: [] for n in RUNS}
        passes, notes = {}, {}
        for r in range(args.repeat):
            for name in order(r):
                dt, passes[name], notes[name] = fit(cache, name)
                times[name].append(dt)
        med = {n: statistics.median(v) for n, v in times.items()}
        print(f"{key}:", flush=True)
        for name in RUNS:
            extra = f", {passes[name]} passes" if passes[name] != "" else ""
            print(f"  {name:<11} {med[name]:7.1f} s{extra}{'; ' + notes[name] if notes[name] else ''}")
        for what in ("mil", "hybrid", "auto"):
            print(f"  {what}: new is {med[what + ' old'] / med[what + ' new']:.1f}x faster than old")
        print(f"  auto / mil: old {med['auto old'] / med['mil old']:.1f}x, new {med['auto new'] / med['mil new']:.1f}x "
              f"(target <= 3x); auto new / mil old {med['auto new'] / med['mil old']:.1f}x", flush=True)


if __name__ == "__main__":
    main()
