"""Prediction pictures: each new image's map of its top class, its boxes, and one image's map on demand."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Callable, Union

import numpy as np

from featurecache.cache import FeatureCache
from featurecache.errors import EvalError, PredictError
from featurecache.extract import extract
from featurecache.maps import LocalizationMap, MapConfig
from featurecache.outputs import os_reason
from featurecache.predict.inputs import collect_inputs, image_set_of

__all__ = ["draw_maps", "one_map"]


def draw_maps(localizer: Callable, cache: FeatureCache, rows: dict, items: list, scores: np.ndarray, classes: tuple,
              config) -> tuple:
    """One PNG per scored image in ``config.maps``: the map of its top class, with the boxes of its
    ``config.top`` classes.

    ``localizer(map_config)`` makes the map maker; ``rows`` maps item positions to cache rows.
    Returns ``(picture paths, boxes, note, runtime)``: per item, the PNG written ('' when none) and
    ``{class: box}``; the note says why maps are missing ('' when none is); what ran the maps' trunk
    (:meth:`~featurecache.maps.Localizer.runtime_used`).
    """
    maps, boxes = [""] * len(items), [{} for _ in items]
    try:
        maker = localizer(config.map_config())
    except EvalError as e:  # a method this head cannot make: predictions without maps
        return maps, boxes, f"no maps: {e.message}", ""
    out, used, failed = Path(config.maps), set(), []
    for i, row in sorted(rows.items()):
        order = np.argsort(-scores[i], kind="stable")[:config.top]
        c = int(order[0])
        try:  # one image's map failing costs that map, not the predictions
            m = maker.cache_map(cache, row, image_file=str(items[i].path))  # an array's PNG too
            caption = f"{classes[c]}  score {scores[i, c]:.3g}  map {m.scores[c].min():.2f}-{m.peak(c)[0]:.2f}"
            maps[i] = str(m.save_png(out / _map_name(items[i].name, classes[c], used), c, caption=caption,
                                     max_side=config.max_side))
        except (EvalError, OSError) as e:
            failed.append(f"{items[i].display}: {e.message if isinstance(e, EvalError) else os_reason(e)}")
            continue
        boxes[i] = {classes[k]: [round(v, 1) for v in m.box(int(k))] for k in order}
    note = f"{len(failed)} map(s) not drawn, e.g. {failed[0]}" if failed else ""
    return maps, boxes, note, maker.runtime_used()


def _mapped(make, *args, **kwargs):
    """``make(*args, **kwargs)`` with map errors as prediction errors."""
    try:
        return make(*args, **kwargs)
    except EvalError as e:
        raise PredictError(e.message, param=e.param) from None


def one_map(predictor, image, cls: Union[int, str, None], config: MapConfig) -> LocalizationMap:
    """:meth:`featurecache.predict.Predictor.localization_map` of one new image with ``config``."""
    if isinstance(image, (list, tuple)):
        raise PredictError("takes one image; use predict(..., maps=DIR) for several", param="image")
    try:
        maker = predictor._localizer(config)
    except EvalError as e:  # this head cannot make such maps
        raise PredictError(f"{predictor.source}: {e.message}", param=e.param) from None
    items = collect_inputs([image], strict=True)
    if len(items) != 1:
        raise PredictError(f"{items[0].display}: takes one image, this is a folder of {len(items)}", param="image")
    item = items[0]
    if config.uses_patches:
        with tempfile.TemporaryDirectory(prefix="featurecache-predict-") as tmp:
            images_set, _ = image_set_of(items, Path(tmp), predictor.classes, kept=False)
            cache_path = Path(tmp) / "features.h5"
            extract(images_set, cache_path, predictor.recipe.extract_config(
                predictor.backbone(), workers=0, device=predictor.device, strict=True, progress=False))
            with FeatureCache(cache_path) as cache:
                m = _mapped(maker.cache_map, cache, 0, image_file=str(item.path))
    elif item.pixels is not None:
        m = _mapped(maker.pixels_map, item.pixels)
    else:
        m = _mapped(maker.file_map, item.path)
    m.path = item.display
    m.image_file = "" if item.pixels is not None else str(item.path.absolute())
    if cls is not None:
        c = m.class_index(cls)
        m.classes, m.scores = (m.classes[c],), m.scores[c:c + 1]
    return m


def _map_name(name: str, cls: str, used: set) -> str:
    """``<name without suffix>.<class>.png``, made unique (``a.jpg`` and ``a.png``, or two inputs' ``a.jpg``).

    ``name`` is the image's path within the folder it was found in, or its file name.
    """
    stem = str(Path(name).with_suffix(""))
    label = re.sub(r"[^\w.-]+", "_", cls)
    name, k = f"{stem}.{label}.png", 2
    while name in used:
        name, k = f"{stem}-{k}.{label}.png", k + 1
    used.add(name)
    return name
