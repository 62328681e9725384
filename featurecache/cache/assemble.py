"""Assembling a cache from its committed parts: the final file's datasets, image table and attributes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import h5py
import numpy as np

from featurecache.cache.files import fault, fresh, fsync_file
from featurecache.cache.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    IMAGE_ARRAYS,
    PATCH_ARRAYS,
    STR,
    canonical_json,
    chunk_rows,
)

__all__ = ["AssemblyPlan", "plan_assembly", "write_final"]


@dataclass(frozen=True)
class AssemblyPlan:
    """What the final file will hold, read from the parts' small arrays before any write.

    ``kept``: data set indices of the extracted images, sorted (the image table's rows);
    ``row_of``: a data set index's row in that table (-1: skipped); ``skipped``: ``(data set
    index, reason)`` of the images skipped; ``data_dir``: where a virtual cache's parts will
    be (None: the features are copied).
    """

    part_files: list
    counts: list
    feature_dim: int
    dtype: np.dtype
    compression: Optional[str]
    images: Sequence
    kept: np.ndarray
    row_of: np.ndarray
    skipped: list
    data_dir: Optional[Path] = None

    @property
    def n(self) -> int:
        return int(sum(self.counts))


def plan_assembly(part_files: list, images: Sequence, *, feature_dim: int, dtype: str, compression: Optional[str],
                  data_dir: Optional[Path]) -> AssemblyPlan:
    """The :class:`AssemblyPlan` of committed part files and the data set listing they index."""
    counts, skipped, image_rows = [], [], []
    for pf in part_files:
        with h5py.File(pf, "r") as f:
            counts.append(len(f["label"]))
            image_rows.append(f["image"][:])
            reasons = [s.decode() if isinstance(s, bytes) else s for s in f["skipped_reason"][:]]
            skipped.extend(zip((int(i) for i in f["skipped_index"][:]), reasons))
    image_of_patch = np.concatenate(image_rows) if image_rows else np.zeros(0, np.int64)
    kept = np.unique(image_of_patch)
    row_of = np.full(len(images), -1, np.int64)
    row_of[kept] = np.arange(len(kept))
    comp = None if compression in (None, "none") else compression
    return AssemblyPlan(part_files, counts, feature_dim, np.dtype(dtype), comp, images, kept, row_of, skipped,
                        data_dir)


def write_final(path: Path, plan: AssemblyPlan, attrs: dict, settings: dict) -> None:
    """Write the final file at ``path`` from the parts (with ``plan.data_dir``: all but the features, which
    are mapped onto the parts as they will be named there) and sync it; the caller renames it into place."""
    with h5py.File(fresh(path), "w") as out:
        arrays = _create_patch_arrays(out, plan)
        image_index = _copy_parts(plan, arrays)
        write_image_table(out, [plan.images[i] for i in plan.kept], plan.kept, image_index, attrs["classes"])
        sk = out.create_group("skipped")
        order = sorted(range(len(plan.skipped)), key=lambda i: plan.skipped[i][0])  # stable: parts in order
        sk.create_dataset("path", data=np.array([plan.images[plan.skipped[i][0]].relpath for i in order],
                                                dtype=object), dtype=STR)
        sk.create_dataset("reason", data=np.array([plan.skipped[i][1] for i in order], dtype=object), dtype=STR)
        for key, value in attrs.items():
            out.attrs[key] = value if isinstance(value, str) else canonical_json(value)
        # The schema's own attributes are this module's to write, whatever the caller passed.
        out.attrs["format"] = FORMAT_NAME
        out.attrs["format_version"] = FORMAT_VERSION
        out.attrs["settings"] = canonical_json(settings)
    fsync_file(path)


def _create_patch_arrays(out: h5py.File, plan: AssemblyPlan) -> dict:
    """The per-patch datasets of the format, empty; a virtual cache's features mapped onto its parts."""
    n, d = plan.n, plan.feature_dim
    arrays = {}
    for a in PATCH_ARRAYS:
        shape = (n, d) if a.name == "features" else (n, 4) if a.name == "box" else (n,)
        if a.name == "features" and plan.data_dir is not None and n:
            arrays[a.name] = out.create_virtual_dataset("features", _virtual_layout(plan))
        elif a.name == "features":
            rows = chunk_rows(d, plan.dtype.itemsize, n)
            arrays[a.name] = out.create_dataset("features", shape=shape, dtype=plan.dtype,
                                                chunks=(rows, d) if n else None, compression=plan.compression)
        else:
            arrays[a.name] = out.create_dataset(a.name, shape=shape, dtype=a.h5_dtype())
    return arrays


def _virtual_layout(plan: AssemblyPlan) -> h5py.VirtualLayout:
    layout = h5py.VirtualLayout(shape=(plan.n, plan.feature_dim), dtype=plan.dtype)
    start = 0
    for pf, m in zip(plan.part_files, plan.counts):
        if m:  # relative to OUT's folder, where HDF5 looks first: the pair can move together
            name = f"{plan.data_dir.name}/{pf.name}".replace("%", "%%")  # HDF5 reads % as printf-style
            layout[start:start + m] = h5py.VirtualSource(name, "features", shape=(m, plan.feature_dim))
        start += m
    return layout


def _copy_parts(plan: AssemblyPlan, arrays: dict) -> np.ndarray:
    """Copy the parts' patches into the final datasets (not a virtual cache's features); returns each
    patch's image-table row."""
    virtual = plan.data_dir is not None
    start = 0
    for k, pf in enumerate(plan.part_files):
        with h5py.File(pf, "r") as f:
            m = plan.counts[k]
            if m:
                if not virtual:
                    arrays["features"][start:start + m] = f["features"][:]
                arrays["label"][start:start + m] = f["label"][:]
                arrays["image_index"][start:start + m] = plan.row_of[f["image"][:]]
                arrays["box"][start:start + m] = f["box"][:]
                arrays["scale"][start:start + m] = f["scale"][:]
            start += m
        if k == len(plan.part_files) // 2:
            fault("assembling")
    return arrays["image_index"][:] if plan.n else np.zeros(0, np.int32)


def write_image_table(out: h5py.File, records: list, dataset_index: np.ndarray, image_index: np.ndarray,
                      classes: Sequence[str]) -> None:
    """The ``images/`` group: one row per extracted image, in data set order."""
    col = {c: i for i, c in enumerate(classes)}
    m, c = len(records), len(classes)
    labels = np.zeros((m, c), bool)
    difficult = np.zeros((m, c), bool)
    for r, rec in enumerate(records):
        for name in rec.labels:
            labels[r, col[name]] = True
        for name in rec.difficult_labels:
            difficult[r, col[name]] = True
    count = np.bincount(image_index, minlength=m).astype(np.int64) if m else np.zeros(0, np.int64)
    start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64) if m else count
    values = {"path": [r.relpath for r in records], "width": [r.width for r in records],
              "height": [r.height for r in records], "labels": labels, "difficult": difficult,
              "split": [",".join(r.splits) for r in records], "dataset_index": dataset_index,
              "patch_start": start, "patch_count": count}
    g = out.create_group("images")
    for a in IMAGE_ARRAYS:
        if a.dtype == "str":
            g.create_dataset(a.name, data=np.array(values[a.name], dtype=object), dtype=STR)
        else:
            g.create_dataset(a.name, data=np.asarray(values[a.name]).astype(a.h5_dtype()))
