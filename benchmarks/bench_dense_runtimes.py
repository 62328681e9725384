"""Dense mode through each CPU runtime: the bare trunk, then ``extract --mode dense`` end to end.

1. Bare trunk: every (image, scale) input of ``--images`` real VOC images resized as dense
   mode resizes them (224 px windows, the default nine scales), normalised, through
   EfficientNet-Lite0's dense trunk with torch (channels-last), OpenVINO and ONNX Runtime,
   all in this process, the runtimes' order alternating from round to round; windows/s is the
   dense windows those inputs give over the trunk's time (pooling and copying excluded).
2. ``featurecache extract --mode dense --runtime R`` on the same images, each run its own
   process (fixed costs included: backbone build, export or compile, the probe), the order
   alternating; windows/s as extract reports it, and the process's wall time.

Usage (from the repository root)::

    python benchmarks/bench_dense_runtimes.py [--images 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc2012-sample" / "VOC2012"

EXTRACT = r'''
import json, sys
from featurecache.datasets import ImageSet, read_dataset
from featurecache.extract import extract
runtime, out, n, root = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
full = read_dataset(root)
images = ImageSet(full.root, full.layout, full.classes, full.records[:n])
r = extract(images, out, mode="dense", runtime=runtime, workers=1, progress=False, overwrite=True)
print(json.dumps([r.patches_per_second, r.patches, r.seconds]))
'''


def bare(names: list, files: list, rounds: int) -> dict:
    """Windows/s of each runtime's trunk on the dense inputs of ``files``."""
    from featurecache.backbones import DENSE_STRIDE, build_backbone
    from featurecache.patches import PatchGrid
    from featurecache.resources import apply_threads, cpu_threads
    from featurecache.runtimes import build_runtime

    threads = apply_threads(cpu_threads())
    net = build_backbone("efficientnet_lite0").to(memory_format=torch.channels_last)
    grid = PatchGrid()
    inputs, windows = [], 0
    for f in files:
        with Image.open(f) as im:
            a = np.asarray(im.convert("RGB"), np.float32)
        image = torch.from_numpy(a).permute(2, 0, 1)[None]
        for _, rw, rh, xs, ys in grid.dense_layout(image.shape[-1], image.shape[-2], stride=DENSE_STRIDE):
            x = F.interpolate(image, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
            inputs.append(net.normalize(x).contiguous(memory_format=torch.channels_last))
            windows += len(xs) * len(ys)
    runtimes = {n: build_runtime(net, n, input_size=grid.input_size, threads=threads, dense=True) for n in names}
    spent = {n: [] for n in names}
    with torch.inference_mode():
        for r in runtimes.values():
            r.trunk(inputs[0])  # warm-up
        for i in range(rounds):
            for n in (names if i % 2 == 0 else names[::-1]):
                t = time.perf_counter()
                for x in inputs:
                    runtimes[n].trunk(x)
                spent[n].append(time.perf_counter() - t)
    print(f"bare trunk: {len(files)} images, {len(inputs)} trunk inputs, {windows} windows, {threads} threads, "
          f"{rounds} rounds (best)")
    return {n: windows / min(t) for n, t in spent.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if not (DATA / "Annotations").is_dir():
        print(f"no VOC sample at {DATA}", file=sys.stderr)
        return 1
    from featurecache.datasets import read_dataset
    from featurecache.runtimes import installed_runtimes

    names = list(installed_runtimes())
    files = [r.path for r in read_dataset(DATA).records[: args.images]]
    rate = bare(names, files, args.rounds)
    print(f"{'runtime':<14} {'windows/s':>10} {'vs torch':>9}")
    for n in names:
        print(f"{n:<14} {rate[n]:>10.1f} {rate[n] / rate['torch']:>8.2f}x")
    print(f"\nextract --mode dense, {args.images} VOC images, nine scales at 224 px, 1 decoding worker "
          f"({args.rounds} rounds, best)")
    best: dict = {n: (0.0, 0, 0.0, float("inf")) for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for n in (names if i % 2 == 0 else names[::-1]):
                t = time.perf_counter()
                out = subprocess.run([sys.executable, "-c", EXTRACT, n, str(Path(tmp) / f"{n}.h5"),
                                      str(args.images), str(DATA)], capture_output=True, text=True)
                wall = time.perf_counter() - t
                if out.returncode:
                    raise RuntimeError(out.stderr[-2000:])
                wps, windows, seconds = json.loads(out.stdout.strip().splitlines()[-1])
                if wps > best[n][0]:
                    best[n] = (wps, windows, seconds, wall)
    print(f"{'runtime':<14} {'windows/s':>10} {'vs torch':>9} {'windows':>8} {'extract s':>10} {'process s':>10} "
          f"{'extract/bare':>13}")
    for n in names:
        wps, windows, seconds, wall = best[n]
        print(f"{n:<14} {wps:>10.1f} {wps / best['torch'][0]:>8.2f}x {windows:>8} {seconds:>10.1f} {wall:>10.1f} "
              f"{wps / rate[n]:>13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
