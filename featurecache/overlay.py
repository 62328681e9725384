"""Localisation pictures: a per-cell score map drawn as a colour overlay on its image (Pillow only).

The map is upsampled bilinearly from its cells to the image's pixels, coloured with a
perceptually ordered ramp (inferno-like: near black for the map's lowest score, pale
yellow for its peak), blended over the image, and captioned with the class name and score. The colour's
brightness grows with the score, so on a flat image the brightest part of the picture is
where the map peaks (on a real image the image's own brightness adds to it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["MAX_SIDE", "MIN_CAPTION_SIDE", "colorize", "render_overlay", "save_png"]

#: Pictures larger than this on their longer side are scaled down to it (a 12-megapixel
#: photo's overlay would be a 30 MB PNG that no one looks at at full size).
MAX_SIDE = 2048

#: Pictures smaller than this on their short side get no caption.
MIN_CAPTION_SIDE = 96

#: Control points of the colour ramp (position, RGB), after matplotlib's inferno.
_RAMP = ((0.0, (0, 0, 4)), (0.13, (31, 12, 72)), (0.25, (85, 15, 109)), (0.38, (136, 34, 106)),
         (0.5, (186, 54, 85)), (0.63, (227, 89, 51)), (0.75, (249, 140, 10)), (0.88, (249, 201, 50)),
         (1.0, (252, 255, 164)))
_LUT = np.stack([np.interp(np.linspace(0, 1, 256), [p for p, _ in _RAMP], [c[i] for _, c in _RAMP])
                 for i in range(3)], axis=1).round().astype(np.uint8)


def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped) to RGB ``uint8`` colours of the ramp; shape ``values.shape + (3,)``."""
    v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0)
    return _LUT[np.clip(np.rint(v * 255), 0, 255).astype(np.intp)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable since Pillow 10.1
    except TypeError:  # pragma: no cover - older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def render_overlay(image: Union[np.ndarray, Image.Image], cells: np.ndarray, *, stride: int, caption: str = "",
                   vmin: Optional[float] = None, vmax: Optional[float] = None, alpha: float = 0.55,
                   max_side: int = MAX_SIDE) -> Image.Image:
    """Draw a cell map over its image.

    Parameters
    ----------
    image : ndarray (H, W[, 3 or 4]) uint8 or PIL image
        The image the map belongs to (gray is repeated, alpha dropped).
    cells : ndarray (rows, columns)
        Scores of ``stride``-pixel cells; cell ``(i, j)`` covers pixels
        ``[j * stride, (j + 1) * stride) x [i * stride, (i + 1) * stride)``.
    stride : int
    caption : str
        Written in the top-left corner (class name and score), on pictures at least
        :data:`MIN_CAPTION_SIDE` pixels on their short side (on smaller ones it would hide
        a third of the picture).
    vmin, vmax : float, optional
        The scores drawn in the darkest and brightest colours; default the map's minimum and
        maximum, so that any map shows where it peaks (the caption gives the numbers).
    alpha : float
        Weight of the colour against the image.
    max_side : int
        The picture's longer side at most (scaled down, aspect kept); the image's own size
        when it is smaller.

    Returns
    -------
    PIL.Image.Image
        RGB, the image's size (or scaled to ``max_side``).
    """
    if isinstance(image, Image.Image):
        base = image.convert("RGB")
    else:
        a = np.asarray(image, np.uint8)
        a = np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a[:, :, :3]  # gray; alpha dropped
        base = Image.fromarray(np.ascontiguousarray(a))
    w, h = base.size
    scale = min(1.0, max_side / max(w, h))
    out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
    if scale < 1.0:
        base = base.resize((out_w, out_h), Image.Resampling.LANCZOS)
    cells = np.asarray(cells, dtype=np.float32)
    low = float(np.nanmin(cells)) if vmin is None and cells.size else float(vmin or 0.0)
    high = float(np.nanmax(cells)) if vmax is None and cells.size else float(vmax or 0.0)
    norm = np.clip((cells - low) / (high - low), 0, 1) if high > low else np.zeros_like(cells)
    # Cell centres sit at (j + 0.5) * stride: resize the cell grid to its full pixel extent, then crop.
    gh, gw = norm.shape
    full = Image.fromarray(norm.astype(np.float32)).resize(
        (max(1, round(gw * stride * scale)), max(1, round(gh * stride * scale))), Image.Resampling.BILINEAR)
    heat = np.asarray(full, dtype=np.float32)[:out_h, :out_w]
    if heat.shape != (out_h, out_w):  # rounding left the grid a pixel short: repeat the last row/column
        heat = np.pad(heat, ((0, out_h - heat.shape[0]), (0, out_w - heat.shape[1])), mode="edge")
    blended = (1 - alpha) * np.asarray(base, dtype=np.float32) + alpha * colorize(heat).astype(np.float32)
    picture = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))
    if caption and min(picture.size) >= MIN_CAPTION_SIDE:
        _caption(picture, caption)
    return picture


def _caption(picture: Image.Image, text: str) -> None:
    """White text on a dark box in the top-left corner, sized to the picture."""
    size = max(10, min(picture.size) // 18)
    draw = ImageDraw.Draw(picture)
    font = _font(size)
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    pad = max(2, size // 4)
    draw.rectangle((0, 0, x1 - x0 + 2 * pad, y1 - y0 + 2 * pad), fill=(0, 0, 0))
    draw.text((pad - x0, pad - y0), text, fill=(255, 255, 255), font=font)


def save_png(picture: Image.Image, path: Union[str, Path]) -> Path:
    """Write a picture as PNG, creating its folder; written to a temporary name first, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.is_symlink():
        tmp.unlink()  # never written through a link planted at the temporary name
    try:
        picture.save(tmp, format="PNG")
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    return path
