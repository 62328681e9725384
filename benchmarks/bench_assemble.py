"""Assembling a finished run: ``--assemble copy`` against ``--assemble virtual`` on several GB of parts.

Writes ``--size`` bytes of synthetic float16 features (1280-d, ~500 patches an image) as the
parts an extraction commits (``CacheWriter.write_part``, the default 2,048-patch parts),
hard-links them into two runs, and assembles one with each layout, timing the assembly,
the bytes it adds on the disk while the parts exist (the peak extra disk), and then one
sequential pass over every feature through ``FeatureCache.iter_chunks`` on the result.
With ``--drop-caches`` (root) the page cache is emptied before each step, so reads come
from the disk.

Usage (from the repository root)::

    python benchmarks/bench_assemble.py --dir /work/assemble --size 6G [--drop-caches]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's featurecache, installed or not

from featurecache.cache import CacheWriter, FeatureCache, PartData  # noqa: E402

DIM, PART = 1280, 2048


class _Record:
    """What the writer reads of an image record."""

    def __init__(self, i: int) -> None:
        self.relpath, self.labels, self.difficult_labels = f"img{i:07d}.jpg", ["a"] if i % 2 else ["b"], []
        self.width, self.height, self.splits = 500, 375, ["train"]


def _size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().rstrip("B")
    return int(float(t[:-1]) * units[t[-1]]) if t[-1] in units else int(float(t))


def make_parts(run: Path, size: int) -> tuple:
    """Commit synthetic parts for ``run`` (its ``.parts`` folder); returns ``(parts, images, rows)``."""
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((1 << 14, DIM)).astype(np.float16)
    rows_total, image, n_parts = size // (DIM * 2), 0, 0
    with CacheWriter(run, {"bench": "assemble", "rows": rows_total}) as w:
        done = 0
        while done < rows_total:
            counts = []
            while sum(counts) < PART and done + sum(counts) < rows_total:
                counts.append(int(min(rng.integers(300, 701), rows_total - done - sum(counts))))
            m = sum(counts)
            img = np.repeat(np.arange(image, image + len(counts)), counts)
            w.write_part(n_parts, PartData(pool[rng.integers(0, len(pool), m)], np.zeros(m, np.int16), img,
                                           np.zeros((m, 4), np.float32), np.ones(m, np.float32), np.zeros(0, np.int64),
                                           []))
            image, done, n_parts = image + len(counts), done + m, n_parts + 1
    return n_parts, image, done


def _drop(enabled: bool) -> None:
    if enabled:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _disk_used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--size", default="6G")
    ap.add_argument("--drop-caches", action="store_true")
    a = ap.parse_args()
    shutil.rmtree(a.dir, ignore_errors=True)
    a.dir.mkdir(parents=True)
    template = a.dir / "template.h5"
    t = time.perf_counter()
    n_parts, n_images, n_rows = make_parts(template, _size(a.size))
    parts_bytes = sum(f.stat().st_size for f in (a.dir / "template.h5.parts").glob("part-*.h5"))
    print(f"{n_parts} parts, {n_images:,} images, {n_rows:,} patches, {parts_bytes / 1e9:.2f} GB of parts "
          f"written in {time.perf_counter() - t:.0f} s", flush=True)
    records = [_Record(i) for i in range(n_images)]
    results = {}
    for layout in ("copy", "virtual"):
        out = a.dir / f"{layout}.h5"
        parts = a.dir / f"{layout}.h5.parts"
        shutil.copytree(a.dir / "template.h5.parts", parts, copy_function=os.link)  # hard links: no extra disk
        _drop(a.drop_caches)
        before = _disk_used(a.dir)
        with CacheWriter(out, {"bench": "assemble", "rows": n_rows}) as w:
            t = time.perf_counter()
            w.assemble(num_parts=n_parts, feature_dim=DIM, dtype="float16", compression=None, images=records,
                       classes=["a", "b"], attrs={"classes": ["a", "b"], "feature_settings": {"bench": 1},
                                                  "fingerprint": "bench"}, layout=layout)
            seconds = time.perf_counter() - t
        added = _disk_used(a.dir) - before  # parts of this run are links to the template's: only OUT adds
        _drop(a.drop_caches)
        t = time.perf_counter()
        with FeatureCache(out) as c:
            rows = sum(len(ch.indices) for ch in c.iter_chunks(65536, dtype=None))
        read = time.perf_counter() - t
        assert rows == n_rows
        results[layout] = (seconds, out.stat().st_size, added, read)
        print(f"{layout:8s} assemble {seconds:6.1f} s   OUT {out.stat().st_size / 1e9:6.2f} GB   extra disk "
              f"{added / 1e9:6.2f} GB   read every feature {read:5.1f} s ({parts_bytes / read / 1e9:.2f} GB/s)",
              flush=True)
    c, v = results["copy"], results["virtual"]
    print(f"\nvirtual / copy: assembly {v[0] / c[0]:.3f}x the time, {v[2] / max(c[2], 1):.4f}x the extra disk; "
          f"a full read {v[3] / c[3]:.2f}x the time")


if __name__ == "__main__":
    main()
