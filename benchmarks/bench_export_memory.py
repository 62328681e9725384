"""A ``--dynamic`` crop-mode export at the paper's grid: its memory and speed, this checkout against a revision.

A head (image objective) is trained on a crop cache of 4 VOC train images at the paper's nine
scales, 224 px. For this checkout and for git revision ``--before`` (unpacked with ``git
archive``), each in its own child process: ``export(head, dynamic=True)`` (peak resident memory,
seconds), then the model run by ONNX Runtime (2 threads) on the first VOC val image 3 times (peak
resident memory, seconds per image). Then in this process, alternating ``--rounds`` times on that
image: the fixed-size model of the same head at the image's size, and both dynamic models
(seconds per image, largest score difference from the fixed-size model).

Usage (from the repository root)::

    python benchmarks/bench_export_memory.py [--before e9fde3d] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_auto import checkout

from featurecache.datasets import ImageSet, read_dataset
from featurecache.deploy import _session, check_images, export
from featurecache.extract import extract
from featurecache.patches import PatchGrid
from featurecache.train import fit_objective

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc2012-sample" / "VOC2012"
HERE = Path(__file__).resolve().parents[1]

_CHILD = """
import json, resource, sys, time
step, head, out, image = json.loads(sys.argv[1])
t = time.perf_counter()
if step == "export":
    from featurecache.deploy import export
    export(head, out, dynamic=True)
    seconds = time.perf_counter() - t
else:
    from featurecache.deploy import _session, check_images
    _, (array,) = check_images([image], None, None)
    session = _session(out, 2)
    t = time.perf_counter()
    for _ in range(3):
        session.run(None, {"image": array})
    seconds = (time.perf_counter() - t) / 3
print(json.dumps([seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6]))
"""


def child(root: Path, step: str, head: Path, out: Path, image: Path) -> tuple:
    """``(seconds, peak GB)`` of one step run by the code under ``root`` in a fresh process (started in
    ``root``: ``python -c`` puts its working directory first on sys.path)."""
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([step, str(head), str(out), str(image)])],
                          env={**os.environ, "PYTHONPATH": str(root)}, cwd=root, check=True, capture_output=True,
                          text=True)
    return tuple(json.loads(done.stdout.strip().splitlines()[-1]))


def head_of(tmp: Path) -> Path:
    """An image head trained on a crop cache of 4 VOC train images at the paper's grid."""
    full = read_dataset(DATA, split="train")
    subset = ImageSet(full.root, full.layout, full.classes, full.records[:4], split="train")
    cache = extract(subset, tmp / "c.h5", grid=PatchGrid(), mode="crop", progress=False, threads=2)
    return fit_objective(cache.path, objective="image", progress=False).save(tmp / "h.pt")


def alternate(models: dict, array: np.ndarray, rounds: int) -> dict:
    """Per model: seconds per run of each round, alternating order, and its scores."""
    sessions = {name: _session(path, 2) for name, path in models.items()}
    for session in sessions.values():
        session.run(None, {"image": array})  # warm
    seconds, scores = {name: [] for name in sessions}, {}
    for r in range(rounds):
        for name in (list(sessions) if r % 2 == 0 else list(sessions)[::-1]):
            t = time.perf_counter()
            scores[name] = sessions[name].run(None, {"image": array})[0]
            seconds[name].append(time.perf_counter() - t)
    return {name: (seconds[name], scores[name]) for name in sessions}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="e9fde3d", help="git revision of the 'before' rows")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    val = (DATA / "ImageSets/Main/val.txt").read_text().split()[0]
    image = DATA / "JPEGImages" / f"{val}.jpg"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        head = head_of(tmp)
        roots = {"now": HERE, f"before ({args.before})": checkout(args.before, Path(tempfile.mkdtemp(dir=tmp)))}
        print(f"--dynamic crop export, paper's grid, VOC image {val}; each step in its own process")
        print(f"{'code':<20} {'export s':>9} {'export GB':>10} {'run s/image':>12} {'run GB':>7}")
        models = {}
        for name, root in roots.items():
            models[name] = tmp / f"{len(models)}.onnx"
            (es, eg), (rs, rg) = (child(root, step, head, models[name], image) for step in ("export", "run"))
            print(f"{name:<20} {es:>9.1f} {eg:>10.2f} {rs:>12.2f} {rg:>7.2f}")
        _, (array,) = check_images([image], None, None)
        fixed = export(head, tmp / "fixed.onnx", input_size=(array.shape[1], array.shape[0])).path
        timed = alternate({"fixed size": fixed, **{f"dynamic, {k}": v for k, v in models.items()}}, array,
                          args.rounds)
        print(f"In one process, alternating, {args.rounds} rounds ({array.shape[1]} x {array.shape[0]}):")
        for name, (seconds, scores) in timed.items():
            diff = np.abs(scores - timed["fixed size"][1]).max()
            print(f"  {name:<26} s/image {' '.join(f'{s:.2f}' for s in seconds)}  max |score - fixed| {diff:.1e}")


if __name__ == "__main__":
    main()
