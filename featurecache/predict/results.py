"""Prediction results: one row per input image, as a table, CSV or JSON."""


from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from featurecache.extract import ExtractResult
from featurecache.outputs import csv_text, json_text, printable, write_report

logger = logging.getLogger(__name__)


@dataclass
class Predictions:
    """One row per input image: its scores, top classes, labels, error and map picture.

    Attributes
    ----------
    classes : tuple of str
    paths : list of str
        Each image as given (folders' images as folder/relative path; ``<image N>`` for
        in-memory images).
    width, height : ndarray (M,) int
        Pixels as the file's header says; 0 when not even that could be read.
    scores : ndarray (M, C) float32
        The head's image scores, NaN in rows of images that could not be read.
    errors : list of str
        Why an image could not be scored ('' when it was).
    top : int
    threshold : float or None
        The labels' threshold (None: no labels).
    objective, scoring, meaning : str
        The head's objective, how it scores images, and what the numbers mean.
    maps : list of str
        The map picture of each image ('' none).
    boxes : list of dict
        Per image, class -> ``[x0, y0, x1, y1]`` from its map, for its top classes (when maps
        were drawn).
    maps_note : str
        Why no maps were drawn, when they were asked for and could not be.
    cache : Path, optional
        The kept feature cache.
    extraction : ExtractResult, optional
    runtimes : dict
        What ran the network: ``features`` (the extraction's runtime, as the cache records it)
        and ``maps`` (the dense trunk of cam maps, when they were drawn).
    seconds : float
    """

    classes: tuple
    paths: list
    width: np.ndarray
    height: np.ndarray
    scores: np.ndarray
    errors: list
    top: int
    threshold: Optional[float]
    objective: str
    scoring: str
    meaning: str
    maps: list = field(default_factory=list)
    maps_note: str = ""
    boxes: list = field(default_factory=list)
    cache: Optional[Path] = None
    extraction: Optional[ExtractResult] = None
    runtimes: dict = field(default_factory=dict)
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def n_scored(self) -> int:
        return sum(1 for e in self.errors if not e)

    @property
    def n_failed(self) -> int:
        return len(self.errors) - self.n_scored

    def top_classes(self, i: int) -> list:
        """``[(class, score), ...]``: image ``i``'s best :attr:`top` classes, best first."""
        if self.errors[i]:
            return []
        order = np.argsort(-self.scores[i], kind="stable")[: self.top]
        return [(self.classes[c], float(self.scores[i, c])) for c in order]

    def labels(self, i: int) -> list:
        """Image ``i``'s classes scoring at least :attr:`threshold`, best first."""
        if self.errors[i] or self.threshold is None:
            return []
        order = np.argsort(-self.scores[i], kind="stable")
        return [self.classes[c] for c in order if self.scores[i, c] >= self.threshold]

    def records(self) -> list:
        """One dictionary per image: ``path``, ``width``, ``height``, ``top``, ``labels``, ``error``,
        ``scores`` (class -> score), and ``map`` and ``boxes`` (class -> ``[x0, y0, x1, y1]``) when maps
        were drawn."""
        out = []
        for i, path in enumerate(self.paths):
            rec = {"path": path, "width": int(self.width[i]), "height": int(self.height[i]),
                   "top": [{"class": c, "score": s} for c, s in self.top_classes(i)], "labels": self.labels(i),
                   "error": self.errors[i],
                   "scores": {} if self.errors[i] else {c: float(v) for c, v in zip(self.classes, self.scores[i])}}
            if any(self.maps):
                rec["map"] = self.maps[i]
                rec["boxes"] = self.boxes[i] if self.boxes else {}
            out.append(rec)
        return out

    def to_json(self) -> str:
        """The records with what the scores mean."""
        return json_text({"objective": self.objective, "scoring": self.scoring, "scores_are": self.meaning,
                          "threshold": self.threshold, "classes": list(self.classes), "runtimes": self.runtimes,
                          "images": self.records()})

    def to_html(self) -> str:
        """A gallery page: each image's thumbnail, top classes, labels and map (:mod:`featurecache.pages.gallery`)."""
        from featurecache.pages.gallery import predictions_html

        return predictions_html(self)

    def _class_columns(self, fixed: list) -> list:
        return [f"score:{c}" if c in fixed else c for c in self.classes]

    def to_csv(self) -> str:
        """One row per image: path, width, height, top-K classes and scores, labels, error, one column per class."""
        k = min(self.top, len(self.classes))
        fixed = ["path", "width", "height"] + [n for j in range(1, k + 1) for n in (f"top{j}", f"top{j}_score")]
        fixed += ["labels", "error"] + (["map"] if any(self.maps) else [])
        rows = [fixed + self._class_columns(fixed)]
        for i, path in enumerate(self.paths):
            top = self.top_classes(i)
            row = [path, int(self.width[i]), int(self.height[i])]
            for j in range(k):
                row += [top[j][0], f"{top[j][1]:.6g}"] if j < len(top) else ["", ""]
            row += [";".join(self.labels(i)), self.errors[i]] + ([self.maps[i]] if any(self.maps) else [])
            row += ["" if self.errors[i] else f"{v:.6g}" for v in self.scores[i]]
            rows.append(row)
        return csv_text(rows)

    def to_text(self, *, limit: int = 20) -> str:
        """A short table (the first ``limit`` images) and the summary line."""
        shown = min(len(self), limit)
        names = [printable(p) for p in self.paths[:shown]]  # a name cannot forge rows or move the cursor
        width = max([len(p) for p in names] + [5])
        lines = [f"{'image':<{width}}  {'top classes':<40}  labels"]
        for i in range(shown):
            if self.errors[i]:
                lines.append(f"{names[i]:<{width}}  error: {printable(self.errors[i])}")
                continue
            top = printable(", ".join(f"{c} {s:.3g}" for c, s in self.top_classes(i)[:3]))
            lines.append(f"{names[i]:<{width}}  {top:<40}  {printable(' '.join(self.labels(i))) or '-'}")
        if shown < len(self):
            lines.append(f"... {len(self) - shown} more (write them all with --out FILE.csv or .json)")
        return "\n".join(lines + [self.summary()])

    def summary(self) -> str:
        """One line: how many images were scored and failed, how, what the scores mean."""
        failed = f", {self.n_failed} could not be read (error column)" if self.n_failed else ""
        labels = (f"labels: score >= {self.threshold:g}" if self.threshold is not None
                  else "no labels without --threshold (these scores rank images; they are not probabilities)")
        line = f"{len(self)} images: {self.n_scored} scored{failed}; {self.objective} head, {self.scoring}; {labels}"
        return line + (f"; {self.seconds:.1f} s" if self.seconds else "")

    def save(self, path: Union[str, Path]) -> Path:
        """Write JSON for a ``.json`` file name, a gallery page for ``.html``, else CSV
        (:func:`featurecache.outputs.write_report`)."""
        return write_report(self, path)


