"""The ``featurecache`` command line: each command parses, makes one library call, prints."""

from __future__ import annotations

import functools
import logging
import sys
from typing import Callable, Optional

import click

from featurecache import __version__
from featurecache.errors import FeaturecacheError

logger = logging.getLogger("featurecache")

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}


# --------------------------------------------------------------------------- logging


def _set_verbosity(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Apply -v/-q; options given on a subcommand override the group's."""
    obj = ctx.ensure_object(dict)
    if verbose or quiet:
        obj["verbose"], obj["quiet"] = verbose, quiet
    level = logging.WARNING
    if obj.get("quiet"):
        level = logging.ERROR
    elif obj.get("verbose", 0) >= 2:
        level = logging.DEBUG
    elif obj.get("verbose", 0) == 1:
        level = logging.INFO
    if not any(getattr(h, "_featurecache", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("featurecache: %(levelname)s: %(message)s"))
        handler._featurecache = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
    # Handlers keep the stream of their creation; CliRunner swaps sys.stderr per invocation.
    for h in logger.handlers:
        if getattr(h, "_featurecache", False):
            h.setStream(sys.stderr)


def _verbosity_options(f: Callable) -> Callable:
    f = click.option("-q", "--quiet", is_flag=True, help="Print errors only; no progress bar.")(f)
    f = click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")(f)
    return f


def _command(f: Callable) -> Callable:
    """Common behaviour of every subcommand: -v/-q, and library errors as one-line messages."""

    @functools.wraps(f)
    def wrapper(*args, verbose: int = 0, quiet: bool = False, **kwargs):
        ctx = click.get_current_context()
        _set_verbosity(ctx, verbose, quiet)
        try:
            return f(*args, **kwargs)
        except FeaturecacheError as e:
            raise click.ClickException(str(e)) from None

    return _verbosity_options(wrapper)


# --------------------------------------------------------------------------- shared options


def _parse_scales(ctx, param, value: Optional[str]):
    if value is None:
        return None
    try:
        scales = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers like 1,1.3,2, got {value!r}") from None
    if not scales:
        raise click.BadParameter("no scales given")
    return scales


def dataset_options(f: Callable) -> Callable:
    """--layout, --split, --annotations, --classes."""
    from featurecache.datasets import LAYOUTS

    f = click.option("--classes", "classes_file", type=click.Path(exists=True, dir_okay=False),
                     help="Class list file, one name a line (default: sorted names found).")(f)
    f = click.option("--annotations", type=click.Path(exists=True, dir_okay=False),
                     help="COCO instances JSON; DATASET is then the image folder.")(f)
    f = click.option("--split", default=None, help="VOC split: ImageSets/Main/<SPLIT>.txt (default: every annotation).")(f)
    f = click.option("--layout", type=click.Choice(("auto",) + LAYOUTS), default="auto",
                     help="Data set layout.")(f)
    return f


def grid_options(f: Callable) -> Callable:
    """--scales, --overlap, --input-size, --whole-image."""
    from featurecache.patches import DEFAULT_SCALES

    f = click.option("--whole-image", is_flag=True, help="One patch per image: the whole image (baseline).")(f)
    f = click.option("--input-size", type=click.IntRange(min=8), default=224,
                     help="Network input side in pixels; every patch is resized to it.")(f)
    f = click.option("--overlap", type=click.FloatRange(0, 1, max_open=True), default=0.5,
                     help="Minimum IoU between neighbouring patches.")(f)
    f = click.option("--scales", callback=_parse_scales, default=",".join(f"{s:g}" for s in DEFAULT_SCALES),
                     help="Scales λ (patch side = min(w, h)/λ), comma-separated.")(f)
    return f


def _read_images(dataset: str, layout: str, split: Optional[str], annotations: Optional[str],
                 classes_file: Optional[str]):
    from featurecache.datasets import read_class_file, read_dataset

    classes = read_class_file(classes_file) if classes_file else None
    return read_dataset(dataset, layout=layout, split=split, annotations=annotations, classes=classes)


def _grid(scales, overlap: float, input_size: int, whole_image: bool):
    from featurecache.patches import PatchGrid

    try:
        return PatchGrid(scales=scales, min_overlap=overlap, input_size=input_size, whole=whole_image)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--scales") from None


# --------------------------------------------------------------------------- commands


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="featurecache")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Print errors only; no progress bars.")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Two-stage transfer learning on images (Oquab et al., CVPR 2014).

    Stage one runs every multi-scale patch of every image through a frozen pretrained CNN
    once and caches the features; stage two trains and compares heads on the cache.
    """
    _set_verbosity(ctx, verbose, quiet)


@main.command(context_settings=CONTEXT)
@click.argument("dataset", type=click.Path(exists=True))
@dataset_options
@grid_options
@click.option("--min-patch-fraction", type=click.FloatRange(0, 1, min_open=True), default=0.2,
              help="A patch qualifies for an object when |P∩B| >= this × |P| ...")
@click.option("--min-object-fraction", type=click.FloatRange(0, 1, min_open=True), default=0.6,
              help="... and |P∩B| >= this × |B|.")
@_command
def inspect(dataset, layout, split, annotations, classes_file, scales, overlap, input_size, whole_image,
            min_patch_fraction, min_object_fraction):
    """Count images, boxes per class and the patch labels a patch grid would produce."""
    from featurecache.patches import LabelRule
    from featurecache.summary import summarize

    images = _read_images(dataset, layout, split, annotations, classes_file)
    rule = LabelRule(min_patch_fraction=min_patch_fraction, min_object_fraction=min_object_fraction)
    summary = summarize(images, grid=_grid(scales, overlap, input_size, whole_image), rule=rule, name=dataset)
    click.echo(summary.to_text())


if __name__ == "__main__":  # pragma: no cover
    main(prog_name="featurecache")
