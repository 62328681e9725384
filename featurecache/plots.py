"""Evaluation plots: per-class precision-recall curves and an AP summary (needs the ``plots`` extra).

matplotlib is an optional dependency (``pip install "featurecache[plots]"``); it is imported
when a plot is drawn, and its absence is one line naming the extra. Figures are made with
:class:`matplotlib.figure.Figure` directly, so no pyplot state or GUI backend is touched.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Union

import numpy as np

from featurecache.errors import EvalError
from featurecache.metrics import precision_recall
from featurecache.outputs import check_replaceable, os_reason

__all__ = ["PLOT_FILES", "write_eval_plots"]

#: The files ``write_eval_plots`` writes in its folder.
PLOT_FILES = ("summary.png", "pr_curves.png")


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise EvalError('plots need matplotlib: pip install "featurecache[plots]"', param="plots") from None
    return Figure


def write_eval_plots(report, out_dir: Union[str, Path]) -> list:
    """Write ``summary.png`` (AP per class, mAP line) and ``pr_curves.png`` (one panel per class).

    Parameters
    ----------
    report : EvalReport
        From :func:`featurecache.evaluate.evaluate` (it carries the image scores and labels).
    out_dir : path
        Created if missing.

    Returns
    -------
    list of Path
        The files written.
    """
    Figure = _figure_class()
    if report.scores is None or report.labels is None:
        raise EvalError("the report carries no image scores to plot (it was not made by evaluate)", param="plots")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in PLOT_FILES:
        check_replaceable(out / name, param="plots")
    return [_summary(Figure, report, out / PLOT_FILES[0]), _curves(Figure, report, out / PLOT_FILES[1])]


def _save(fig, path: Path) -> Path:
    """Written beside and renamed into place: a link planted at ``path`` is replaced, never written through."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise EvalError(f"{path}: cannot write ({os_reason(e)})", param="plots") from None
    return path


def _title(report) -> str:
    return (f"mAP {100 * report.mean_ap:.1f} ({report.method} AP) - {report.objective} {report.head} head, "
            f"{report.n_images} images")


def _summary(Figure, report, path: Path) -> Path:
    ap = np.array([np.nan if a is None else a for a in report.ap], dtype=float)
    order = np.argsort(np.nan_to_num(-ap, nan=1.0), kind="stable")
    fig = Figure(figsize=(8, 0.3 * len(ap) + 1.5), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(ap))
    ax.barh(y, np.nan_to_num(100 * ap[order]), color="#3b6ea8")
    ax.set_yticks(y, [f"{report.classes[i]} ({report.positives[i]})" for i in order])
    ax.invert_yaxis()
    ax.axvline(100 * report.mean_ap, color="#c0392b", linestyle="--", label=f"mAP {100 * report.mean_ap:.1f}")
    for yi, i in zip(y, order):
        ax.text(1, yi, "no positives" if np.isnan(ap[i]) else f"{100 * ap[i]:.1f}", va="center",
                color="white" if np.nan_to_num(ap[i]) > 0.1 else "black", fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_xlabel("average precision (%); positives in brackets")
    ax.legend(loc="lower right")
    ax.set_title(_title(report), fontsize=10)
    return _save(fig, path)


def _curves(Figure, report, path: Path) -> Path:
    n = len(report.classes)
    cols = min(5, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(2.6 * cols, 2.4 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)).ravel()
    labels, difficult = report.labels, report.difficult
    for c, ax in enumerate(axes):
        if c >= n:
            ax.set_visible(False)
            continue
        precision, recall = precision_recall(report.scores[:, c], labels[:, c], ignore=difficult[:, c] & ~labels[:, c])
        if len(recall):
            ax.step(np.r_[0.0, recall], np.r_[precision[0], precision], where="pre", color="#3b6ea8")
        ap = report.ap[c]
        what = "no positives" if ap is None or np.isnan(ap) else f"AP {100 * ap:.1f}"
        ax.set_title(f"{report.classes[c]}: {what}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    fig.supxlabel("recall")
    fig.supylabel("precision")
    fig.suptitle(_title(report), fontsize=10)
    return _save(fig, path)
