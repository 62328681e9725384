"""Stage two on a cache larger than memory: peak memory and feature throughput of every command.

1. Generates (or reuses) a synthetic cache in the real format (docs/cache-format.md):
   ``--size`` bytes of float16 features, 1280-d like EfficientNet-Lite0, ~500 patches per
   image (300-700), 20 classes, images alternating between the ``train`` and ``val`` splits
   (so every split-selected read has the other split's rows between its own). Features are a
   shared noise pool plus a class direction for object patches, so heads have something to
   learn. Written block by block: the generator holds one block (~256 MB), never the file.
2. Runs, each in its own process: a raw read of the train split's rows (plain h5py slices of
   its images, 65,536 rows at a time, converted to float32 by numpy and, separately, by
   torch), then ``fit`` (patch linear, patch linear with ``--val-split``, mil, image),
   ``eval`` of the patch head and an ``ablate`` run, all with ``--memory-limit``.
   ``raw-all-*`` (only with ``--only``) read every row in file order: the disk's sequential
   rate. For each, after its imports: wall seconds, peak RSS (``VmHWM``), bytes read through
   the file system (``rchar`` of /proc/self/io) against the stored bytes of the feature rows
   the command uses, and those bytes per second as a fraction of the raw rates of the run.

Usage (from the repository root; the cache is big, put it on a disk with room)::

    python benchmarks/bench_scale.py --dir /work/scale --size 26G [--memory-limit 8G] [--only fit-linear,eval]
        [--drop-caches]

Targets (#16): peak RSS <= memory limit + 1 GB; a one-epoch linear patch fit >= 70% of the
raw float32-converted read rate; mil and image >= 50%; bytes read <= 1.2x bytes used.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's featurecache, installed or not
DIM, CLASSES, CHUNK_ROWS = 1280, 20, 409  # chunk: the writer's ~1 MiB of 1280-d float16 rows

CHILD = r'''
import json, os, sys, time
import h5py, numpy as np, torch, sklearn.linear_model  # imported before the clock and the byte counters start
import featurecache.ablate, featurecache.cli, featurecache.evaluate, featurecache.train
def io():
    return {k: int(v) for k, v in (l.split(": ") for l in open("/proc/self/io"))}
def peak_rss():  # VmHWM: this process's own peak (ru_maxrss would include the parent's, kept across exec)
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
kind, out, args = sys.argv[1], sys.argv[2], sys.argv[3:]
t0, io0 = time.perf_counter(), io()
if kind == "cli":
    from featurecache.cli import main
    try:
        main(args, standalone_mode=False)
    except SystemExit as e:
        if e.code:
            raise
else:  # raw read: plain h5py slices of the train split's image runs (or of every row), 65,536 rows at a time,
    # then float32
    path, conv, which = args
    with h5py.File(path, "r") as f:
        ds, split = f["features"], [s.decode() for s in f["images/split"][:]]
        start, count = f["images/patch_start"][:], f["images/patch_count"][:]
        runs = ([(int(a), int(a + n)) for a, n, s in zip(start, count, split) if "train" in s.split(",")]
                if which == "train" else [(a, min(a + 65536, ds.shape[0])) for a in range(0, ds.shape[0], 65536)])
        buf, held = [], 0
        def flush():
            x = np.concatenate(buf) if len(buf) > 1 else buf[0]
            y = x.astype(np.float32) if conv == "numpy" else torch.from_numpy(x).float()
        for a, b in runs:
            buf.append(ds[a:b]); held += b - a
            if held >= 65536:
                flush(); buf, held = [], 0
        if buf:
            flush()
io1 = io()
json.dump({"seconds": time.perf_counter() - t0, "peak_rss": peak_rss(),
           "rchar": io1["rchar"] - io0["rchar"], "read_bytes": io1["read_bytes"] - io0["read_bytes"]},
          open(out, "w"))
'''


def _size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().rstrip("B")
    return int(float(t[:-1]) * units[t[-1]]) if t[-1] in units else int(float(t))


def _attrs(n_images: int) -> dict:
    """File attributes as ``extract`` writes them (see docs/cache-format.md), for a synthetic data set."""
    from featurecache.cache import feature_fingerprint
    from featurecache.patches import LabelRule, PatchGrid

    backbone = {"name": "synthetic", "architecture": "synthetic:gaussian", "layer": "none", "feature_dim": DIM,
                "input_size": 224, "mean": [0, 0, 0], "std": [1, 1, 1], "weights": "none", "weights_sha256": "0"}
    settings = {"backbone": "synthetic", "architecture": backbone["architecture"], "layer": "none",
                "weights_sha256": "0", "input_size": 224, "mode": "crop", "feature_dim": DIM}
    return {"classes": [f"class{c:02d}" for c in range(CLASSES)], "backbone": backbone,
            "grid": PatchGrid().to_dict(), "label_rule": LabelRule().to_dict(),
            "dataset": {"root": "synthetic", "layout": "synthetic", "split": None, "num_images": n_images},
            "extraction": {"mode": "crop", "dtype": "float16", "compression": "none", "synthetic": True},
            "feature_settings": settings, "fingerprint": feature_fingerprint(settings),
            "versions": {}, "created": "", "settings": {"synthetic": True}}


def make_cache(path: Path, size: int, *, seed: int = 0, block_images: int = 200) -> dict:
    """Write a synthetic cache of about ``size`` bytes of float16 features; returns its counts."""
    rng = np.random.RandomState(seed)
    rows_total = size // (DIM * 2)
    counts = []
    while sum(counts) < rows_total:
        counts.append(int(rng.randint(300, 701)))
    counts[-1] -= sum(counts) - rows_total
    if counts[-1] <= 0:
        counts.pop()
    m, n = len(counts), int(sum(counts))
    pool = torch.from_numpy((rng.standard_normal((1 << 16, DIM)) * 0.5).astype(np.float16))  # noise shared by rows
    direction = rng.standard_normal((CLASSES + 1, DIM)).astype(np.float16)
    direction[0] = 0  # background: noise only
    direction = torch.from_numpy(direction)
    labels = np.zeros((m, CLASSES), bool)
    for i in range(m):
        labels[i, rng.choice(CLASSES, size=rng.randint(1, 4), replace=False)] = True
    start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        feats = f.create_dataset("features", (n, DIM), np.float16, chunks=(CHUNK_ROWS, DIM))
        lab = f.create_dataset("label", (n,), np.int16)
        img = f.create_dataset("image_index", (n,), np.int32)
        box = f.create_dataset("box", (n, 4), np.float32)
        scale = f.create_dataset("scale", (n,), np.float32)
        for b in range(0, m, block_images):
            ids = np.arange(b, min(b + block_images, m))
            a, z = int(start[ids[0]]), int(start[ids[-1]] + counts[ids[-1]])
            img_of = np.repeat(ids, [counts[i] for i in ids])
            # 20% of an image's patches show one of its classes (label c + 1), 5% are ambiguous.
            r = rng.random_sample(z - a)
            pick = np.empty(z - a, np.int64)
            for i in ids:  # an object patch shows one of its image's classes
                present = np.flatnonzero(labels[i])
                s0 = int(start[i]) - a
                pick[s0:s0 + counts[i]] = present[rng.randint(0, len(present), counts[i])] + 1
            y = np.where(r < 0.2, pick, np.where(r < 0.25, -1, 0)).astype(np.int16)
            x = pool[torch.from_numpy(rng.randint(0, len(pool), z - a))]  # torch: float16 arithmetic is fast there
            x += direction[torch.from_numpy(np.maximum(y, 0).astype(np.int64))]
            feats[a:z] = x.numpy()
            lab[a:z], img[a:z] = y, img_of
            box[a:z] = np.array([0, 0, 100, 100], np.float32)
            scale[a:z] = rng.choice([1.0, 2.0], z - a).astype(np.float32)
        g = f.create_group("images")
        s = h5py.string_dtype("utf-8")
        g.create_dataset("path", data=np.array([f"img{i:07d}.jpg" for i in range(m)], dtype=object), dtype=s)
        g.create_dataset("width", data=np.full(m, 500, np.int32))
        g.create_dataset("height", data=np.full(m, 375, np.int32))
        g.create_dataset("labels", data=labels)
        g.create_dataset("difficult", data=np.zeros_like(labels))
        g.create_dataset("split", data=np.array(["train" if i % 2 == 0 else "val" for i in range(m)], dtype=object),
                         dtype=s)
        g.create_dataset("dataset_index", data=np.arange(m, dtype=np.int32))
        g.create_dataset("patch_start", data=start)
        g.create_dataset("patch_count", data=np.asarray(counts, np.int64))
        sk = f.create_group("skipped")
        sk.create_dataset("path", data=np.array([], dtype=object), dtype=s)
        sk.create_dataset("reason", data=np.array([], dtype=object), dtype=s)
        for k, v in _attrs(m).items():
            f.attrs[k] = json.dumps(v)
        f.attrs["format"], f.attrs["format_version"] = "featurecache", 1
    os.replace(tmp, path)
    return {"images": m, "patches": n}


def run_child(kind: str, args: list, workdir: Path) -> dict:
    out = workdir / "child.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", CHILD, kind, str(out)] + [str(a) for a in args], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{kind} {' '.join(map(str, args))} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return {**json.loads(out.read_text()), "output": proc.stdout.strip()}


def used_rows(path: Path) -> dict:
    """Feature rows each kind of command uses: train-split patches, their labelled ones, val-split patches."""
    from featurecache.cache import FeatureCache

    with FeatureCache(path, split="train") as tr, FeatureCache(path, split="val") as va:
        return {"train": tr.num_patches, "train_labelled": int((tr.labels >= 0).sum()), "val": va.num_patches,
                "val_labelled": int((va.labels >= 0).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--size", default="26G", help="Bytes of float16 features [default: 26G].")
    ap.add_argument("--memory-limit", default=None, help="--memory-limit of the commands [default: theirs].")
    ap.add_argument("--only", default=None, help="Comma-separated subset of the commands.")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--drop-caches", action="store_true",
                    help="Empty the page cache before each command (root; every command then reads from the disk).")
    a = ap.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    cache = a.dir / f"synthetic-{a.size}.h5"
    if not cache.exists():
        t = time.perf_counter()
        info = make_cache(cache, _size(a.size))
        print(f"generated {cache}: {info['images']:,} images, {info['patches']:,} patches, "
              f"{cache.stat().st_size / 1e9:.1f} GB in {time.perf_counter() - t:.0f} s", flush=True)
    rows = used_rows(cache)
    mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    print(f"cache {cache.stat().st_size / 1e9:.1f} GB on a machine with {mem / 1e9:.1f} GB of memory; "
          f"{os.cpu_count()} CPUs", flush=True)
    limit = ["--memory-limit", a.memory_limit] if a.memory_limit else []
    head = a.dir / "patch.head.pt"
    row_bytes = DIM * 2
    commands = {
        "raw-numpy": ("raw", [cache, "numpy", "train"], "train"),
        "raw-torch": ("raw", [cache, "torch", "train"], "train"),
        "raw-all-numpy": ("raw", [cache, "numpy", "all"], "train+val"),
        "raw-all-torch": ("raw", [cache, "torch", "all"], "train+val"),
        "fit-linear": ("cli", ["fit", cache, "--objective", "patch", "--hidden", "0", "--epochs", "1",
                               "--train-split", "train", "--out", head, "-q"] + limit, "train_labelled"),
        "eval": ("cli", ["eval", head, cache, "--split", "val", "-q"], "val"),
        "fit-linear-val": ("cli", ["fit", cache, "--objective", "patch", "--hidden", "0", "--epochs", "1",
                                   "--train-split", "train", "--val-split", "val", "--out", a.dir / "val.head.pt",
                                   "-q"] + limit, "train_labelled+val_labelled"),
        "fit-mil": ("cli", ["fit", cache, "--objective", "mil", "--image-epochs", "1", "--train-split", "train",
                            "--out", a.dir / "mil.head.pt", "-q"] + limit, "train"),
        "fit-image": ("cli", ["fit", cache, "--objective", "image", "--train-split", "train",
                              "--out", a.dir / "image.head.pt", "-q"] + limit, "train"),
        "ablate": ("cli", ["ablate", cache, "--train-split", "train", "--val-split", "val", "--grid",
                           "objective=patch", "--grid", "hidden=0", "--grid", "epochs=1", "--resamples", "0",
                           "-q"] + limit, "train_labelled+val"),
    }
    chosen = a.only.split(",") if a.only else [c for c in commands if not c.startswith("raw-all")]
    results = {}
    for name in chosen:
        kind, args, use = commands[name]
        if a.drop_caches:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        r = run_child(kind, args, a.dir)
        r["used_bytes"] = sum(rows[u] for u in use.split("+")) * row_bytes
        r["rate"] = r["used_bytes"] / r["seconds"]
        results[name] = r
        print(f"{name:15s} {r['seconds']:7.1f} s  peak RSS {r['peak_rss'] / 1e9:5.2f} GB  "
              f"{r['rate'] / 1e9:5.3f} GB/s of stored features used  read/used {r['rchar'] / r['used_bytes']:.2f}"
              f"  (disk {r['read_bytes'] / r['used_bytes']:.2f})", flush=True)
    ref = {k: results[k]["rate"] for k in commands if k.startswith("raw") and k in results}
    if ref:
        print("\nrates against the raw reads of this run (stored bytes used per second):")
        for name, r in results.items():
            print(f"  {name:15s} " + "  ".join(f"{r['rate'] / v:5.2f}x {k}" for k, v in ref.items()))
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "results": {k: {x: y for x, y in v.items() if x != "output"}
                                                                 for k, v in results.items()}}, indent=1))


if __name__ == "__main__":
    main()
