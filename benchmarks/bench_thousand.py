"""Stage one per 1,000 VOC-size images: crop and dense mode through each CPU runtime, end to end, and bare.

    python benchmarks/bench_thousand.py [--crop-images 30] [--dense-images 100] [--modes crop,dense]
                                        [--runtimes torch,openvino,onnxruntime] [--rounds 1]

1. ``extract`` end to end: the first ``--crop-images`` (crop mode) or ``--dense-images``
   (dense mode) images of the VOC sample (all splits) at the
   paper's nine scales, 224 px, the default backbone (EfficientNet-Lite0), one (mode,
   runtime) per process, each process a whole ``extract()`` call as the command line makes it
   (the data set read, the backbone built, the runtime compiled and checked, decoding
   workers, writing); the page cache warmed first, the order of the (mode, runtime) pairs
   reversed every other round. Printed: patches, seconds, patches/s, seconds extrapolated to
   1,000 images (seconds x 1000 / images: the fixed costs counted 1000 / images times, so an
   upper bound: OpenVINO's dynamic-shape trunk also pays once per new input size, and a
   thousand images repeat sizes more), and where the time went (``ExtractResult.stages``).
2. The bare forward of each runtime in its own process, on inputs made as ``extract`` makes
   them: crop mode, batches of 16 real 224-px patches of the first images; dense mode, the
   trunk on every (image, scale) input of the first images. The ratio ``extract / bare`` is
   what the pipeline keeps of the network's speed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc2012-sample" / "VOC2012"

SUBSET = r'''
from featurecache.datasets import ImageSet, read_dataset
def subset(root, n):
    full = read_dataset(root)
    return ImageSet(full.root, full.layout, full.classes, full.records[:n])
'''

EXTRACT = SUBSET + r'''
import json, sys
from featurecache.extract import extract
mode, runtime, out, n, root = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
r = extract(subset(root, n), out, mode=mode, runtime=runtime, progress=False, overwrite=True)
print(json.dumps({"patches": r.patches, "seconds": r.seconds, "stages": r.stages}))
'''

BARE = SUBSET + r'''
import json, sys, time, numpy as np, torch
from PIL import Image
from torch.nn import functional as F
from featurecache.backbones import DENSE_STRIDE, build_backbone
from featurecache.patches import LabelRule, PatchGrid, image_patches
from featurecache.resources import apply_threads, cpu_threads
from featurecache.runners import PatchRunner, iter_batches
from featurecache.runtimes import build_runtime
mode, name, n, root = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
threads = apply_threads(cpu_threads())
net = build_backbone("efficientnet_lite0").to(memory_format=torch.channels_last)
grid, images = PatchGrid(), subset(root, n)
run = build_runtime(net, name, input_size=grid.input_size, threads=threads, dense=mode == "dense")
inputs, count = [], 0
with torch.inference_mode():
    for rec in images.records:
        with Image.open(rec.path) as im:
            image = torch.from_numpy(np.array(im.convert("RGB"), np.float32)).permute(2, 0, 1)[None]
        if mode == "crop":
            boxes = image_patches(rec, images.class_ids(rec), grid=grid, rule=LabelRule(), mode="crop")[0]
            cutter = PatchRunner(net, input_size=grid.input_size, batch_size=16, device=torch.device("cpu"),
                                 out_dtype=np.float32, runtime=run)
            for pieces in iter_batches([(image, torch.from_numpy(boxes))], 16):
                inputs.append(cutter.crops(pieces).contiguous(memory_format=run.memory_format))
            count += len(boxes)
        else:
            for _, rw, rh, xs, ys in grid.dense_layout(image.shape[-1], image.shape[-2], stride=DENSE_STRIDE):
                x = F.interpolate(image, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
                inputs.append(net.normalize(x).contiguous(memory_format=run.memory_format))
                count += len(xs) * len(ys)
    forward = run if mode == "crop" else run.trunk
    forward(inputs[0])  # warm-up: first-call costs are extract's, not the network's
    t = time.perf_counter()
    for x in inputs:
        forward(x)
print(json.dumps({"patches": count, "seconds": time.perf_counter() - t}))
'''


def child(script: str, *args) -> dict:
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{args[:2]} failed:\n{done.stderr[-2000:]}")
    return {**json.loads(done.stdout.splitlines()[-1]), "process": time.perf_counter() - t}


def warm(root: Path) -> None:
    """Read the images once, so that every run finds them in the page cache."""
    for f in (root / "JPEGImages").glob("*.jpg"):
        f.read_bytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crop-images", type=int, default=30)
    ap.add_argument("--dense-images", type=int, default=100)
    ap.add_argument("--bare-images", type=int, default=3)
    ap.add_argument("--modes", default="crop,dense")
    ap.add_argument("--runtimes", default="torch,openvino,onnxruntime")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--root", type=Path, default=DATA)
    args = ap.parse_args()
    pairs = [(m, r) for m in args.modes.split(",") for r in args.runtimes.split(",")]
    warm(args.root)
    runs: dict = {p: [] for p in pairs}
    bare: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for mode, rt in pairs if i % 2 == 0 else pairs[::-1]:
                n = args.crop_images if mode == "crop" else args.dense_images
                runs[mode, rt].append(child(EXTRACT, mode, rt, Path(tmp) / f"{mode}-{rt}.h5", n, args.root))
                print(f"round {i}: {mode} {rt}: {runs[mode, rt][-1]}", flush=True)
        for mode, rt in pairs[::-1]:
            bare[mode, rt] = child(BARE, mode, rt, args.bare_images, args.root)
    print(f"\nVOC images (crop {args.crop_images}, dense {args.dense_images}), nine scales, 224 px, "
          f"{args.rounds} round(s) (best):\n")
    print("| mode | runtime | images | patches | extract s | patches/s | min per 1,000 images | bare patches/s | "
          "extract / bare | vs torch | where the time went |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for mode, rt in pairs:
        r = min(runs[mode, rt], key=lambda x: x["seconds"])
        speed, b = r["patches"] / r["seconds"], bare[mode, rt]
        base = min(runs[mode, "torch"], key=lambda x: x["seconds"]) if (mode, "torch") in runs else None
        vs = f"{speed / (base['patches'] / base['seconds']):.2f}x" if base else ""
        shares = ", ".join(f"{k} {100 * v / r['seconds']:.0f}%" for k, v in
                           sorted(r["stages"].items(), key=lambda kv: -kv[1]) if v / r["seconds"] >= 0.005)
        n = args.crop_images if mode == "crop" else args.dense_images
        print(f"| {mode} | {rt} | {n} | {r['patches']:,} | {r['seconds']:.1f} | {speed:.1f} | "
              f"{r['seconds'] * 1000 / n / 60:.1f} | {b['patches'] / b['seconds']:.1f} | "
              f"{speed / (b['patches'] / b['seconds']):.2f} | {vs} | {shares} |", flush=True)


if __name__ == "__main__":
    main()
