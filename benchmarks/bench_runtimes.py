"""CPU runtimes side by side: the backbone alone (idle and under a competing load), then extract end to end.

1. Bare: the same batches of real VOC patches (16 at 224 px by default) through
   EfficientNet-Lite0 in torch eager (the thread policy's threads, and 1 thread), ONNX
   Runtime and OpenVINO f32, each in its own process, idle and then with ``--load`` busy
   processes spinning on the same cores. torch runs with featurecache's default
   ``OMP_WAIT_POLICY=PASSIVE`` and, for comparison, with OpenMP's active waiting.
2. ``extract`` on ``--images`` VOC val images (the paper's nine scales) with each runtime,
   idle and under load; and a streamed ``fit`` (the MLP reading from HDF5), idle and under
   load.

Usage (from the repository root)::

    python benchmarks/bench_runtimes.py [--images 4] [--load 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc2012-sample" / "VOC2012"

BARE = r'''
import json, sys, time, numpy as np, torch
from PIL import Image
from featurecache.backbones import build_backbone
from featurecache.runtimes import build_runtime
name, threads, size, repeats, files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
torch.set_num_threads(threads)
net = build_backbone("efficientnet_lite0")
crops = [np.asarray(Image.open(f).convert("RGB").resize((size, size)), np.float32) for f in files]
x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
if name == "torch":
    net.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
run = build_runtime(net, name, input_size=size, threads=threads)
with torch.inference_mode():
    run(x)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter(); run(x); best = max(best, len(x) / (time.perf_counter() - t))
print(json.dumps(best))
'''

EXTRACT = r'''
import json, sys, time
from featurecache.datasets import ImageSet, read_dataset
from featurecache.extract import extract
runtime, out, n, root = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
full = read_dataset(root, split="val")
images = ImageSet(full.root, full.layout, full.classes, full.records[:n], split="val")
r = extract(images, out, runtime=runtime, workers=1, progress=False, overwrite=True)
print(json.dumps(r.patches_per_second))
'''

FIT = r'''
import json, sys, time
from featurecache.train import fit_objective
t = time.perf_counter()
fit_objective(sys.argv[1], objective="patch", head="mlp", epochs=8, memory_limit=0, progress=False)
print(json.dumps(time.perf_counter() - t))
'''


def _busy(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10000))


class Load:
    """``n`` processes spinning on the CPUs for the duration of a ``with`` block."""

    def __init__(self, n: int) -> None:
        self.n, self.stop, self.procs = n, mp.Event(), []

    def __enter__(self):
        self.procs = [mp.Process(target=_busy, args=(self.stop,), daemon=True) for _ in range(self.n)]
        for p in self.procs:
            p.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for p in self.procs:
            p.join()


def _child(code: str, args: list, env: dict) -> float:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--load", type=int, default=2, help="busy processes of the loaded runs")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not (DATA / "Annotations").is_dir():
        print(f"no VOC sample at {DATA}", file=sys.stderr)
        return 1
    from featurecache.resources import available_cpus
    from featurecache.runtimes import installed_runtimes

    cpus = available_cpus()
    files = sorted((DATA / "JPEGImages").glob("*.jpg"))[: args.batch]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # featurecache's default: passive
    active = dict(env, OMP_WAIT_POLICY="ACTIVE")
    configs = [("torch", cpus, active, f"torch eager, {cpus} threads, active wait"),
               ("torch", cpus, env, f"torch eager, {cpus} threads (passive)"),
               ("torch", 1, env, "torch eager, 1 thread")]
    configs += [(r, cpus, env, f"{r}, {cpus} threads") for r in installed_runtimes() if r != "torch"]
    print(f"bare backbone: {len(files)} real patches at {args.size} px, best of {args.repeats}; load = {args.load} "
          f"busy processes on {cpus} CPUs")
    print(f"{'runtime':<40} {'idle p/s':>9} {'vs torch':>9} {'loaded p/s':>11} {'kept':>6}")
    base = None
    for name, threads, e, label in configs:
        idle = _child(BARE, [name, threads, args.size, args.repeats, *files], e)
        with Load(args.load):
            loaded = _child(BARE, [name, threads, args.size, args.repeats, *files], e)
        base = base or idle
        print(f"{label:<40} {idle:>9.1f} {idle / base:>8.2f}x {loaded:>11.1f} {loaded / idle:>6.0%}")
    print(f"\nextract, {args.images} VOC val images, nine scales at 224 px, 1 decoding worker")
    print(f"{'runtime':<40} {'idle p/s':>9} {'vs torch':>9} {'loaded p/s':>11} {'kept':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        base = None
        for runtime in installed_runtimes():
            out = Path(tmp) / f"{runtime}.h5"
            idle = _child(EXTRACT, [runtime, out, args.images, DATA], env)
            with Load(args.load):
                loaded = _child(EXTRACT, [runtime, out, args.images, DATA], env)
            base = base or idle
            print(f"{runtime:<40} {idle:>9.1f} {idle / base:>8.2f}x {loaded:>11.1f} {loaded / idle:>6.0%}")
        cache = Path(tmp) / "torch.h5"
        idle = _child(FIT, [cache], env)
        with Load(args.load):
            loaded = _child(FIT, [cache], env)
        print(f"\nstreamed fit (MLP from HDF5, 8 epochs): idle {idle:.1f} s, loaded {loaded:.1f} s "
              f"(kept {idle / loaded:.0%} of the idle throughput)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
