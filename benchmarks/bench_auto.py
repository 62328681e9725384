"""What stage two's default fits cost: auto before and after, side by side, against one mil fit.

    python benchmarks/bench_auto.py --work results-work [--only voc|bccd] [--repeat 1] [--runs NAME,...]
                                    [--before REV] [--threads N]

On the caches of examples/auto_table.py (VOC sample: the `train` split of the five-scale
cache; BCCD: its `train` split), trains side by side:

* `image` at its defaults (the cheapest objective, for scale);
* `mil` and `hybrid` with the first optimiser (`image_solver=adam`: 200 epochs of Adam on
  mini-batches of 16 images) and at the defaults (full-batch L-BFGS to the loss's plateau);
* `auto old`: Adam candidates and `cv_halving=none` (every candidate on every fold);
* `auto before` and `mil before`: the code of git revision REV (`--before`, default the commit
  before issue #28's screening tolerance, warm starts and single-threaded image probes) at its
  defaults, run in a child process from that revision's files (`git archive`), timed inside it;
* `auto new`: the defaults of this checkout (also in a child process when a `before` row runs).

and prints the seconds (wall clock and CPU: on shared cores the CPU seconds move less with the
load), the passes over the bags (epochs) of each, each old/new speed-up, and auto's ratio to
one mil fit of the same code (the target: at most 3x at the defaults). With --repeat N each
is trained N times, the order of each pair alternating between repeats, and the median is
reported. `--runs` picks rows (the `old` ones take minutes); `--threads` sets torch's threads of
every fit (on shared cores one thread makes the CPU seconds a measure of the work: no thread
waits for another).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import featurecache
from featurecache.train import fit_objective

ROOT = Path(__file__).resolve().parents[1]
SETS = {"voc": "voc-patches.h5", "bccd": "bccd-patches.h5"}

#: The revision whose defaults are "before": the last commit before the screening tolerance,
#: warm starts and single-threaded image probes (issue #28, stage two).
BEFORE = "0b57cb4"

#: name -> (objective, options, revision or None for this checkout).
RUNS = {
    "image": ("image", {}, None),
    "mil old": ("mil", {"image_solver": "adam"}, None),
    "mil before": ("mil", {}, "before"),
    "mil new": ("mil", {}, None),
    "hybrid old": ("hybrid", {"image_solver": "adam"}, None),
    "hybrid new": ("hybrid", {}, None),
    "auto old": ("auto", {"image_solver": "adam", "cv_halving": "none"}, None),
    "auto before": ("auto", {}, "before"),
    "auto new": ("auto", {}, None),
}
PAIRS = [("mil old", "mil new"), ("mil before", "mil new"), ("hybrid old", "hybrid new"), ("auto old", "auto new"),
         ("auto before", "auto new")]

_CHILD = """
import json, sys, time
from featurecache.train import fit_objective
# imported before the clock starts, as the parent has them after its first fits
import featurecache.heads.auto, featurecache.heads.image, featurecache.heads.mil, featurecache.heads.patch
cache, objective, options, threads = json.loads(sys.argv[1])
t, c = time.perf_counter(), time.process_time()
head = fit_objective(cache, objective=objective, train_split="train", progress=False, threads=threads, **options)
s, c = time.perf_counter() - t, time.process_time() - c
print(json.dumps([s, c, head.summary.get("epochs", ""), head.summary.get("selection")]))
"""


def checkout(rev: str, into: Path) -> Path:
    """The package files of ``rev`` unpacked under ``into`` (imported from there by the child)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "featurecache"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def note_of(selection) -> str:
    """What auto chose and dropped."""
    if not selection:
        return ""
    gone = selection.get("dropped", [])
    folds = sorted({d["after_fold"] for d in gone})
    return f"chose {selection['chosen']}" + "".join(
        f"; dropped after fold {f}: {', '.join(d['candidate'] for d in gone if d['after_fold'] == f)}" for f in folds)


def fit(cache: Path, name: str, before: Path, threads) -> tuple:
    """``(wall seconds, CPU seconds, passes or '', note)`` of one fit: in this process, or, where a row of
    another revision runs, in a child process for every row (a fresh process fits faster than one that has
    trained many heads: about 10% for auto on VOC), importing that revision's files or this checkout's."""
    objective, options, rev = RUNS[name]
    if rev is not None or before != Path():
        here = Path(featurecache.__file__).resolve().parents[1]
        root = before if rev is not None else here
        # run from the code's own folder: `python -c` puts the working directory first on sys.path, so a child
        # started in this checkout would import it whatever PYTHONPATH says (the "before" rows measured this code)
        out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([str(cache.resolve()), objective, options,
                                                                        threads])],
                             env={**os.environ, "PYTHONPATH": str(root)}, cwd=root, check=True, capture_output=True,
                             text=True).stdout
        seconds, cpu, passes, selection = json.loads(out.strip().splitlines()[-1])
        return seconds, cpu, passes, note_of(selection)
    t, c = time.perf_counter(), time.process_time()
    head = fit_objective(cache, objective=objective, train_split="train", progress=False, threads=threads, **options)
    seconds, cpu = time.perf_counter() - t, time.process_time() - c
    return seconds, cpu, head.summary.get("epochs", ""), note_of(head.summary.get("selection"))


def order(names: list, repeat: int) -> list:
    """The names of one repeat: each pair's first before its second on even repeats, after it on odd ones."""
    out = [n for n in names if not any(n in p for p in PAIRS)]
    for pair in PAIRS:
        chosen = [n for n in (pair if repeat % 2 == 0 else pair[::-1]) if n in names and n not in out]
        out += chosen
    return out


def report(key: str, names: list, times: dict, cpus: dict, passes: dict, notes: dict) -> None:
    """The medians, the speed-ups of each pair and auto's ratio to mil."""
    med = {n: statistics.median(v) for n, v in times.items() if v}
    cpu = {n: statistics.median(v) for n, v in cpus.items() if v}
    print(f"{key}:", flush=True)
    for name in names:
        extra = f", {passes[name]} passes" if passes[name] != "" else ""
        print(f"  {name:<12} {med[name]:7.1f} s (CPU {cpu[name]:6.1f} s){extra}"
              f"{'; ' + notes[name] if notes[name] else ''}")
    for old, new in PAIRS:
        if old in med and new in med:
            print(f"  {new} is {med[old] / med[new]:.1f}x faster than {old} (CPU {cpu[old] / cpu[new]:.1f}x)")
    for auto, mil in (("auto old", "mil old"), ("auto before", "mil before"), ("auto new", "mil new")):
        if auto in med and mil in med:
            print(f"  {auto} / {mil}: {med[auto] / med[mil]:.1f}x (CPU {cpu[auto] / cpu[mil]:.1f}x)"
                  + ("  (target <= 3x)" if auto == "auto new" else ""))
    if "auto before" in med and "mil new" in med:
        print(f"  auto before / mil new: {med['auto before'] / med['mil new']:.1f}x "
              f"(CPU {cpu['auto before'] / cpu['mil new']:.1f}x)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("results-work"))
    ap.add_argument("--only", choices=sorted(SETS))
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--runs", default=",".join(RUNS), help="rows to run, comma-separated")
    ap.add_argument("--before", default=BEFORE, help="git revision of the 'before' rows")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of every fit [default: all cores]")
    args = ap.parse_args()
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        ap.error(f"unknown run(s) {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    with tempfile.TemporaryDirectory() as tmp:
        before = checkout(args.before, Path(tmp)) if any(RUNS[n][2] for n in names) else Path()
        for key in [args.only] if args.only else list(SETS):
            cache = args.work / SETS[key]
            times: dict = {n: [] for n in names}
            cpus: dict = {n: [] for n in names}
            passes, notes = {}, {}
            for r in range(args.repeat):
                for name in order(names, r):
                    dt, dc, passes[name], notes[name] = fit(cache, name, before, args.threads)
                    times[name].append(dt)
                    cpus[name].append(dc)
            report(key, names, times, cpus, passes, notes)


if __name__ == "__main__":
    main()
