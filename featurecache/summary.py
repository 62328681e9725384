"""Summaries of an image set and of the patch labels a grid would give it (``featurecache inspect``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from featurecache.datasets import ImageSet
from featurecache.outputs import printable
from featurecache.patches import AMBIGUOUS, BACKGROUND, MAX_PATCHES, LabelRule, PatchGrid, image_patches, plan_patches

__all__ = ["DatasetSummary", "summarize"]


@dataclass(frozen=True)
class DatasetSummary:
    """Counts of an image set and its patch labels.

    Attributes
    ----------
    name, layout, split : str
    classes : tuple of str
    images_per_class, boxes_per_class, difficult_per_class, patches_per_class : tuple of int
        Per class, in class order. An image counts for a class when it has a non-difficult
        object of it.
    num_images, num_boxes, num_patches, background, ambiguous : int
    grid : PatchGrid
    rule : LabelRule
    skipped : tuple of (path, reason)
        Images left out of the patch counts: unreadable, or beyond ``max_patches``.
    """

    name: str
    layout: str
    split: Optional[str]
    classes: tuple
    num_images: int
    num_boxes: int
    images_per_class: tuple
    boxes_per_class: tuple
    difficult_per_class: tuple
    patches_per_class: tuple
    num_patches: int
    background: int
    ambiguous: int
    grid: PatchGrid
    rule: LabelRule
    skipped: tuple = ()

    @property
    def classes_without_patches(self) -> tuple:
        """Classes with objects but no positive patch (too small for the grid and rule)."""
        return tuple(c for c, b, p in zip(self.classes, self.boxes_per_class, self.patches_per_class)
                     if b > 0 and p == 0)

    def to_text(self) -> str:
        """A human-readable table."""
        g = self.grid
        shape = "whole image" if g.whole else (
            f"scales {','.join(f'{s:g}' for s in g.scales)}, overlap {g.min_overlap:g}")
        split = f", split {self.split}" if self.split else ""
        per_image = self.num_patches / max(self.num_images, 1)
        lines = [
            f"{self.name} ({self.layout}{split}): {self.num_images} images, {self.num_boxes} boxes, "
            f"{len(self.classes)} classes",
            f"patches ({shape}; input {g.input_size} px): {self.num_patches:,} "
            f"({per_image:.1f} per image)",
        ]
        names = [printable(c) for c in self.classes]  # a name cannot forge lines or move the cursor
        width = max([len(c) for c in names] + [len("background")])
        lines.append(f"{'class':<{width}}  {'images':>6}  {'boxes':>6}  {'difficult':>9}  {'patches':>8}")
        for row in zip(names, self.images_per_class, self.boxes_per_class,
                       self.difficult_per_class, self.patches_per_class):
            lines.append(f"{row[0]:<{width}}  {row[1]:>6}  {row[2]:>6}  {row[3]:>9}  {row[4]:>8,}")
        total = max(self.num_patches, 1)
        lines.append(f"{'background':<{width}}  {'':>6}  {'':>6}  {'':>9}  {self.background:>8,}  "
                     f"({100 * self.background / total:.1f}% of patches)")
        lines.append(f"{'ambiguous':<{width}}  {'':>6}  {'':>6}  {'':>9}  {self.ambiguous:>8,}  "
                     f"({100 * self.ambiguous / total:.1f}%, not used for training)")
        missing = self.classes_without_patches
        if missing:
            lines.append(f"no positive patch for {len(missing)} class(es): {printable(', '.join(missing))}")
        if self.skipped:
            where, why = self.skipped[0]
            lines.append(f"{len(self.skipped)} image(s) left out (extraction skips and records them), e.g. "
                         f"{where}: {why}")
        return "\n".join(lines)


def summarize(images: ImageSet, *, grid: Optional[PatchGrid] = None, rule: Optional[LabelRule] = None,
              name: Optional[str] = None, max_patches: int = MAX_PATCHES) -> DatasetSummary:
    """Count images, boxes and the patch labels a grid and rule give an image set.

    Parameters
    ----------
    images : ImageSet
    grid : PatchGrid, optional
        Default ``PatchGrid()``.
    rule : LabelRule, optional
        Default ``LabelRule()``.
    name : str, optional
        Shown in the report; default the data set root.
    max_patches : int
        As for extraction: images beyond it are left out, a grid beyond it for most images
        is refused (before any patch is made).

    Returns
    -------
    DatasetSummary
    """
    grid = grid or PatchGrid()
    rule = rule or LabelRule()
    c = len(images.classes)
    img_count = np.zeros(c, np.int64)
    box_count = np.zeros(c, np.int64)
    diff_count = np.zeros(c, np.int64)
    patch_count = np.zeros(c + 1, np.int64)  # index = label (0 = background)
    ambiguous = total = 0
    _, reasons = plan_patches(images.records, grid, max_patches=max_patches)
    for r, reason in zip(images, reasons):
        if reason:
            continue
        ids = images.class_ids(r)
        np.add.at(box_count, ids, 1)
        np.add.at(diff_count, ids[r.difficult], 1)
        for name_ in r.labels:
            img_count[images.classes.index(name_)] += 1
        _, _, labels = image_patches(r, ids, grid=grid, rule=rule)
        total += len(labels)
        ambiguous += int((labels == AMBIGUOUS).sum())
        patch_count += np.bincount(labels[labels != AMBIGUOUS], minlength=c + 1)
    return DatasetSummary(
        name=name or str(images.root),
        layout=images.layout,
        split=images.split,
        classes=tuple(images.classes),
        num_images=len(images),
        num_boxes=images.num_boxes,
        images_per_class=tuple(int(v) for v in img_count),
        boxes_per_class=tuple(int(v) for v in box_count),
        difficult_per_class=tuple(int(v) for v in diff_count),
        patches_per_class=tuple(int(v) for v in patch_count[1:]),
        num_patches=total,
        background=int(patch_count[BACKGROUND]),
        ambiguous=ambiguous,
        grid=grid,
        rule=rule,
        skipped=tuple((str(r.path), why) for r, why in zip(images, reasons) if why),
    )
