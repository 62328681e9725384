#!/usr/bin/env bash
# One GPU check, under 8 minutes on one GPU: extraction speed in crop and dense mode (Lite0 with its real
# weights; AlexNet's FC7 path with random weights), the share of time spent decoding, and a 2-process
# torchrun extraction on CUDA compared with a 1-process one.
#
# Usage (from the repository root, on a machine with a CUDA GPU and ../shared/data):
#     bash benchmarks/gpu_check.sh [IMAGES]        # IMAGES: VOC sample images to use (default 40)
# Prints one block per step; paste them into docs/performance.md with the date and the GPU.
set -euo pipefail
IMAGES="${1:-40}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
DATA="$REPO/../shared/data/voc2012-sample/VOC2012"
[ -d "$DATA" ] || DATA="$REPO/shared/data/voc2012-sample/VOC2012"
[ -d "$DATA" ] || { echo "no VOC sample at ../shared/data or shared/data" >&2; exit 1; }
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python - "$DATA" "$WORK" "$IMAGES" <<'EOF'
import sys, time, shutil
from pathlib import Path
import torch
from featurecache.datasets import read_dataset
from featurecache.extract import extract, load_rgb

data, work, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
assert torch.cuda.is_available(), "no CUDA device"
images = read_dataset(data, split="train")
ids = [r.path.stem for r in images.records[:n]]
# A subset folder in VOC layout: the first n training images.
sub = work / "VOC"
(sub / "ImageSets" / "Main").mkdir(parents=True)
for d in ("JPEGImages", "Annotations"):
    (sub / d).mkdir()
for i in ids:
    shutil.copy(data / "JPEGImages" / f"{i}.jpg", sub / "JPEGImages")
    shutil.copy(data / "Annotations" / f"{i}.xml", sub / "Annotations")
(sub / "ImageSets" / "Main" / "train.txt").write_text("\n".join(ids) + "\n")
print(f"{len(ids)} VOC sample images, torch {torch.__version__}, {torch.cuda.get_device_name(0)}")

t = time.perf_counter()
for r in read_dataset(sub).records:
    load_rgb(r.path)
decode = time.perf_counter() - t
for name, opts in [("lite0 crop", dict()),
                   ("lite0 dense", dict(mode="dense")),
                   ("alexnet crop (FC7, random weights)", dict(backbone="alexnet", weights=None)),
                   ("alexnet dense (FC7, random weights)", dict(backbone="alexnet", weights=None, mode="dense"))]:
    out = work / (name.split()[0] + "-" + opts.get("mode", "crop") + ".h5")
    extract(sub, out, device="cuda", progress=False, **opts)  # warm-up run: kernels, cudnn autotune
    out.unlink()
    torch.cuda.synchronize()
    t = time.perf_counter()
    r = extract(sub, out, device="cuda", progress=False, **opts)
    torch.cuda.synchronize()
    s = time.perf_counter() - t
    print(f"{name:38s} {r.patches:8,} patches  {s:6.1f} s  {r.patches / s:9,.0f} patches/s  "
          f"decoding alone (1 process) {decode:5.1f} s = {100 * decode / s:4.0f}% of the run")
EOF

# Two processes on the GPU(s) (2 on one GPU is enough for the code path) against one.
python - "$WORK" <<'EOF'
import subprocess, sys, numpy as np
from pathlib import Path
from featurecache.cache import FeatureCache
work = Path(sys.argv[1])
common = ["extract", str(work / "VOC"), "--device", "cuda", "--scales", "1,2", "-q"]
one = subprocess.run([sys.executable, "-m", "featurecache", *common[:2], str(work / "one.h5"), *common[2:]],
                     capture_output=True, text=True)
two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                      "-m", "featurecache", *common[:2], str(work / "two.h5"), *common[2:]], capture_output=True,
                     text=True)
print("1 process:", one.stdout.strip() or one.stderr[-2000:])
print("2 processes:", two.stdout.strip() or two.stderr[-2000:])
with FeatureCache(work / "one.h5") as a, FeatureCache(work / "two.h5") as b:
    x, y = a.read_features(), b.read_features()
    print(f"same images and order: {a.images.path == b.images.path}; features identical: {np.array_equal(x, y)}; "
          f"max difference {np.abs(x - y).max():.2e}")
EOF
