"""Image files: which files are images, their headers and names, decoding to RGB, EXIF orientation, failure texts."""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np

__all__ = ["DISPLAYED_LAYOUTS", "IMAGE_EXTENSIONS", "failure", "folder_images", "image_files", "image_size",
           "is_image_file", "load_rgb", "name_problem", "oriented", "to_rgb"]

#: File name endings (lower case) taken as images in folders.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

#: Layouts whose records describe an image as it is displayed, its EXIF orientation applied
#: (sizes read from the files, one box per whole image; ``predict``'s new images are read so
#: too). VOC and COCO annotations describe the stored pixels, which their tools drew boxes on,
#: unless their size says otherwise (:func:`oriented`).
DISPLAYED_LAYOUTS = ("folders", "plain")

#: The EXIF tag of an image's orientation (1: as stored; 2-8: mirrored and/or turned; 5-8 swap
#: width and height).
_ORIENTATION = 0x0112


def failure(error: BaseException, what: str = "cannot read image") -> str:
    """The one-line text of a failure to open or decode an image: ``what (Type: its first line)``."""
    msg = str(error).splitlines()[0][:120] if str(error) else ""
    return f"{what} ({type(error).__name__}{': ' + msg if msg else ''})"


def name_problem(path: Union[str, Path]) -> str:
    """Why a file's name cannot be stored in a cache ('' when it can): caches store names as UTF-8."""
    try:
        str(path).encode("utf-8")
        return ""
    except UnicodeEncodeError:
        return "the file name is not valid UTF-8 (caches store names as UTF-8); rename the file"


def is_image_file(path: Path) -> bool:
    """A visible file with an image ending (links followed)."""
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def image_files(folder: Path) -> list:
    """The image files directly in a folder, sorted by name."""
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)


def folder_images(folder: Path) -> list:
    """Image files under a folder, recursively (linked folders too, each once), sorted; hidden ones left out."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in filenames
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def _orientation(im) -> int:
    """An opened image's EXIF orientation, 1 when it has none (or an invalid one)."""
    try:
        value = im.getexif().get(_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block: the stored pixels
        return 1
    return value if isinstance(value, int) and 2 <= value <= 8 else 1


def oriented(im, *, size: Optional[tuple] = None, displayed: bool = True):
    """The one rule for EXIF orientation: an opened image as its record describes it.

    A record's size decides when it tells the stored pixels from the displayed ones (a phone
    photo stored sideways: its width and height swap); when it cannot (no orientation that
    turns the image, a square image, no size given), ``displayed`` does: what the record's
    layout describes (:data:`DISPLAYED_LAYOUTS`).

    Parameters
    ----------
    im : PIL.Image.Image
    size : (width, height), optional
        The size the record gives the image.
    displayed : bool
        Whether the record describes the image as displayed (EXIF orientation applied).

    Returns
    -------
    PIL.Image.Image
        ``im`` itself, or its transposed copy (``PIL.ImageOps.exif_transpose``).
    """
    orientation = _orientation(im)
    if orientation == 1:
        return im
    stored = tuple(im.size)
    shown = stored[::-1] if orientation >= 5 else stored
    if size is not None and stored != shown and tuple(size) in (stored, shown):
        displayed = tuple(size) == shown
    if not displayed:
        return im
    from PIL import ImageOps

    return ImageOps.exif_transpose(im)


def image_size(path: Union[str, Path], *, displayed: bool = True) -> tuple:
    """``(width, height, error)`` from an image file's header, as displayed (EXIF orientation applied)
    or as stored; ``(0, 0, reason)`` when it cannot be read. The one header reader."""
    from PIL import Image

    try:
        kind = os.stat(path).st_mode  # links followed: a link to /dev/zero is a device
        if not stat.S_ISREG(kind):  # opening a FIFO blocks, a device never ends: neither is an image
            return 0, 0, "not a regular file (a pipe, device or socket)"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning: sizes are checked at extraction
            with Image.open(path) as im:
                w, h = im.size
                if displayed and _orientation(im) >= 5:
                    w, h = h, w
    except Exception as e:  # PIL raises many kinds (OSError, ValueError, DecompressionBombError ...)
        return 0, 0, failure(e)
    if w < 1 or h < 1:
        return 0, 0, f"image is {w}x{h}"
    return w, h, ""


def to_rgb(im) -> np.ndarray:
    """An image as an ``(H, W, 3)`` uint8 RGB array, the one conversion for files and in-memory images.

    Grayscale, palette, RGBA (alpha dropped), CMYK and YCbCr go through PIL's conversion;
    16-bit and 32-bit integer grayscale are scaled from their full range, float images from
    [0, 1] (or their own maximum when larger). EXIF orientation is applied before, by the
    callers that read files (:func:`oriented`), not here.
    """
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16"):
            top = 65535.0
        elif im.mode == "I":
            top = 65535.0 if a.max(initial=0) > 255 else 255.0
        else:
            top = 1.0 if a.max(initial=0) <= 1.0 else float(a.max())
        g = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(g[:, :, None], 3, axis=2))
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    # np.array copies: a writable array, as torch.from_numpy wants.
    return np.array(im.convert("RGB"), dtype=np.uint8)


def load_rgb(path: Union[str, Path], *, size: Optional[tuple] = None, displayed: bool = True) -> np.ndarray:
    """Decode an image file to an ``(H, W, 3)`` uint8 RGB array: :func:`to_rgb` of the opened file,
    oriented as its record describes it (:func:`oriented`: ``size``, the record's ``(width,
    height)``, and ``displayed``)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return to_rgb(oriented(im, size=size, displayed=displayed))
