"""The pictures of a report page, as ``data:`` URIs: image thumbnails (JPEG) and map overlays (PNG of the cells).

A thumbnail is the image scaled down to :data:`THUMBNAIL_SIDE` pixels on its longer side and
stored as a JPEG of quality :data:`JPEG_QUALITY` (about 4-8 KB for a VOC photograph); the page
draws it stretched to the image's own pixel size, so that boxes and maps in image pixels lie
on it. A map is its cells coloured (:func:`featurecache.overlay.colorize`, from the map's
minimum to its peak, as ``localize --png`` draws them), one pixel a cell; the browser scales it.
"""

from __future__ import annotations

import base64
import io
from typing import Optional

import numpy as np
from PIL import Image

from featurecache.images import load_rgb
from featurecache.overlay import colorize

__all__ = ["JPEG_QUALITY", "THUMBNAIL_SIDE", "data_uri", "map_uri", "picture_uri", "thumbnail_uri"]

#: Longer side of a thumbnail in pixels.
THUMBNAIL_SIDE = 224

#: JPEG quality of the thumbnails.
JPEG_QUALITY = 72


def data_uri(image: Image.Image, fmt: str) -> str:
    """``data:image/<fmt>;base64,...`` of a picture (``jpeg`` or ``png``)."""
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.convert("RGB").save(buf, "JPEG", quality=JPEG_QUALITY, optimize=True)
    else:
        image.save(buf, "PNG", optimize=True)
    return f"data:image/{fmt};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnail_uri(file: str, size: tuple, *, displayed: bool, side: int = THUMBNAIL_SIDE) -> Optional[str]:
    """The thumbnail of an image file as the cache describes it (``size``: its ``(width, height)``;
    ``displayed``: oriented as displayed), or ``None`` when the file cannot be read or is of another size."""
    if not file:
        return None
    try:
        pixels = load_rgb(file, size=size, displayed=displayed)
    except Exception:  # PIL raises many kinds for a corrupt or vanished file; the page shows a placeholder
        return None
    if pixels.shape[1::-1] != tuple(size):
        return None
    im = Image.fromarray(pixels)
    im.thumbnail((side, side), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return data_uri(im, "jpeg")


#: The colour ramp as a 256-colour palette: a map is stored as ramp indices (a palette PNG, a third of RGB's size).
_PALETTE = colorize(np.linspace(0.0, 1.0, 256)).astype(np.uint8)


def picture_uri(file: str, *, side: int = THUMBNAIL_SIDE) -> Optional[str]:
    """A picture file (a map drawn over its image by ``predict --maps``) scaled down as a thumbnail, or ``None``
    when it cannot be read."""
    if not file:
        return None
    try:
        with Image.open(file) as im:
            im.thumbnail((side, side), Image.Resampling.BILINEAR)
            return data_uri(im, "jpeg")
    except Exception:  # a picture that vanished or is damaged: the page shows the image without it
        return None


def map_uri(cells: np.ndarray) -> str:
    """One class's map cells coloured from their minimum to their maximum, one pixel a cell, as a PNG URI
    (the colours of :func:`featurecache.overlay.colorize`)."""
    v = np.asarray(cells, np.float64)
    lo, hi = float(v.min()), float(v.max())
    norm = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    image = Image.fromarray(np.clip(np.rint(norm * 255), 0, 255).astype(np.uint8), mode="L").convert("P")
    image.putpalette(_PALETTE.reshape(-1).tolist())
    return data_uri(image, "png")
