"""Report pages: one self-contained HTML file that shows a head scored on a cache.

``featurecache report HEAD CACHE --out report.html`` and :func:`report` (also
``featurecache.report``): AP and mAP with bootstrap intervals, precision-recall curves, each
class's top-scoring images, false positives and misses with their boxes and maps, the
localisation summary, which classes co-score, and how the head was made. The numbers are
:mod:`featurecache.evaluate`'s and :mod:`featurecache.localize`'s (:mod:`.content`); the page is
drawn by :mod:`.page`.

Size: at most 3 x ``images`` pictures a class (:data:`~featurecache.settings.IMAGES_PER_GROUP`, 8,
by default) whatever the number of images evaluated; each image's thumbnail
(:data:`~featurecache.pages.thumbs.THUMBNAIL_SIDE` px, JPEG, about 9 KB) and each class's map of it
(a palette PNG, about 4 KB) stored once: the VOC sample's 20 classes on 33 images make 1.6 MB, 20
classes of a 5,000-image evaluation about 7 MB, 80 classes under 30 MB.

Also here: ``ablate``'s table as a page (:mod:`.ablation`) and ``predict``'s gallery (:mod:`.gallery`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from featurecache.errors import FeaturecacheError, ReportError
from featurecache.outputs import check_not_inputs, check_output, write_text
from featurecache.pages.content import GROUPS, ReportConfig, ReportContent, gather, with_config
from featurecache.pages.page import render
from featurecache.pages.thumbs import THUMBNAIL_SIDE
from featurecache.settings import IMAGES_PER_GROUP

__all__ = ["GROUPS", "IMAGES_PER_GROUP", "THUMBNAIL_SIDE", "Report", "ReportConfig", "ReportContent", "report"]


@dataclass
class Report:
    """A report page: its HTML and the numbers it shows.

    Attributes
    ----------
    html : str
        The whole page.
    content : ReportContent
        What it shows (:attr:`ReportContent.evaluation` is ``eval``'s report,
        :attr:`ReportContent.localization` ``localize --evaluate``'s).
    seconds : dict
        Time per stage: scoring, maps, localization, page.
    """

    html: str
    content: ReportContent
    seconds: dict = field(default_factory=dict)

    def save(self, path: Union[str, Path]) -> Path:
        """Write the page (whole, through a temporary file); refused when ``path`` is one of the files the
        report read (the head, the cache, the data set's files, an image shown)."""
        try:
            check_output(path, param="out")
            check_not_inputs({"out": path}, self.content.inputs)
        except FeaturecacheError as e:
            raise ReportError(e.message, param=e.param) from None
        return write_text(path, self.html)

    def summary(self) -> str:
        """One line: the mAP, what the page shows, its size and time."""
        ev = self.content.evaluation
        maps = len(self.content.maps)
        mb = len(self.html.encode("utf-8")) / 1e6
        shown = len(self.content.images)
        total = sum(self.seconds.values())
        return (f"report: mAP {100 * ev.mean_ap:.1f} on {ev.n_images} images, {len(ev.classes)} classes, "
                f"{shown} images shown" + (f" ({maps} maps, {self.content.map_method})" if maps else "")
                + f", {mb:.1f} MB, {total:.1f} s"
                + (f"; {len(self.content.notes)} note(s) on the page" if self.content.notes else ""))


def report(head, cache, *, config: Optional[ReportConfig] = None, **options) -> Report:
    """One HTML page on ``head`` scored on ``cache``.

    Parameters
    ----------
    head : TrainedHead or path
    cache : path, FeatureCache or MemoryCache
        Refused as :func:`featurecache.evaluate.evaluate` refuses it (another fingerprint or classes).
    config : ReportConfig, optional
    **options
        Fields of :class:`ReportConfig` over those of ``config``: ``split``, ``method``, ``resamples``,
        ``seed``, ``images``, ``map_method``, ``localization``, ``stride``, ``box_threshold``,
        ``tolerance``, ``weights``, ``device``, ``download``, ``runtime``, ``threads``, ``progress``.

    Returns
    -------
    Report
        ``.html``, ``.save(path)``, ``.summary()``.
    """
    config = with_config(config, options)
    content = gather(head, cache, config)
    t0 = time.perf_counter()
    html = render(content)
    return Report(html, content, {**content.seconds, "page": time.perf_counter() - t0})
