"""The ``featurecache`` command line: each command parses, makes one library call, prints.

Commands import the torch-heavy modules (extract, train, evaluate, ablate, demo) in their
bodies, so that ``--help`` and ``inspect`` start without loading torch.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from pathlib import Path
from typing import Callable, Optional

import click

from featurecache import __version__
from featurecache.datasets import LAYOUTS, MAX_PIXELS, read_class_file, read_dataset
from featurecache.distributed import world_from_env
from featurecache.errors import AblationError, FeaturecacheError
from featurecache.heads.registry import EVAL_OPTIONS, OPTIONS, FitConfig, Option, OptionScopeError
from featurecache.outputs import check_not_inputs, check_output, printable, write_report
from featurecache.patches import DEFAULT_SCALES, MAX_INPUT_SIZE, MAX_PATCHES, LabelRule, PatchGrid
from featurecache.resources import (
    ASSEMBLE_MODES,
    BOX_THRESHOLD,
    DEFAULT_MAP_METHOD,
    DEFAULT_MAX_SIDE,
    DEVICES,
    MAP_METHODS,
    MAX_STRIDE,
    MIN_MAX_SIDE,
    POINTING_TOLERANCE,
    RUNTIMES,
)
from featurecache.summary import summarize

logger = logging.getLogger("featurecache")

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}


# --------------------------------------------------------------------------- logging


class _OneLine(logging.Formatter):
    """Every log record one line: control characters in it (a file name's newline) shown escaped."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


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
        handler.setFormatter(_OneLine("featurecache: %(levelname)s: %(message)s"))
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
            if ctx.info_name not in _SHARED_COMMANDS and world_from_env().distributed:
                # Every process would do the whole work and write the same outputs.
                raise FeaturecacheError(f"{ctx.info_name} runs in one process; start it without torchrun/srun "
                                        f"(only {', '.join(_SHARED_COMMANDS)} shares its work among processes)")
            return f(*args, **kwargs)
        except FeaturecacheError as e:
            raise click.ClickException(printable(_message(ctx, e))) from None
        except OSError as e:
            # Permission denied, disk full, a folder that vanished: name the file, no traceback.
            where = e.filename or "featurecache"
            raise click.ClickException(printable(f"{where}: {e.strerror or e}")) from None
        except (MemoryError, RuntimeError) as e:
            # numpy's MemoryError, torch's "can't allocate memory": one line with the setting to change.
            if not isinstance(e, MemoryError) and not _MEMORY_WORDS.search(str(e)):
                raise
            first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            hint = _MEMORY_HINTS.get(ctx.info_name, "work on fewer images at a time")
            raise click.ClickException(f"out of memory ({first}); {hint}") from None

    return _verbosity_options(wrapper)


#: Commands that share their work among the processes of a torchrun/srun job.
_SHARED_COMMANDS = ("extract",)

_MEMORY_WORDS = re.compile(r"can't allocate memory|out of memory|not enough memory|Unable to allocate|bad_alloc|"
                           r"cannot allocate memory|failed to allocate", re.I)

#: What to change when a command runs out of memory.
_MEMORY_HINTS = {
    "fit": "lower --memory-limit (training features above it are streamed from the file)",
    "ablate": "lower --memory-limit (above it each configuration streams its images from the file)",
    "eval": "evaluate one split at a time (--split)",
    "extract": "lower --batch-size or --max-pixels",
    "predict": "lower --batch-size, or predict fewer or smaller images at a time",
    "localize": "use a larger --stride",
}


def _check_outputs(inputs: dict, *, folders: tuple = (), **paths) -> None:
    """Refuse outputs that cannot be written, or that are files this command reads (``inputs``: name
    shown to path or paths), before the work that fills them (flag names as keywords)."""
    for param, path in paths.items():
        if path:
            check_output(path, param=param, folder=param in folders)
    check_not_inputs(paths, inputs, folders=folders)


#: Library parameters whose flag has another name (``MapConfig.method`` is ``--map-method``).
_FLAG_NAMES = {"method": "map_method", "scales": "map_scales"}


def _message(ctx: click.Context, error: FeaturecacheError) -> str:
    """A library error's message, with the flag of this command in place of the library parameter it names."""
    names = {error.param, _FLAG_NAMES.get(error.param)} - {None}
    for p in ctx.command.params:
        if names and isinstance(p, click.Argument) and p.name in names:
            return error.for_option(p.human_readable_name)
        flags = [o.lstrip("-").replace("-", "_") for o in getattr(p, "opts", ())]
        if names and isinstance(p, click.Option) and names & {p.name, *flags}:
            return error.for_option(p.opts[0])
    return str(error)


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
    f = click.option("--classes", "classes_file", type=click.Path(exists=True, dir_okay=False),
                     help="Class list file, one name a line (default: sorted names found).")(f)
    f = click.option("--annotations", type=click.Path(exists=True, dir_okay=False),
                     help="COCO instances JSON; DATASET is then the image folder.")(f)
    f = click.option("--split", default=None,
                     help="VOC split: ImageSets/Main/<SPLIT>.txt (default: every annotation).")(f)
    f = click.option("--layout", type=click.Choice(("auto",) + LAYOUTS), default="auto",
                     help="Data set layout.")(f)
    return f


def threads_option(f: Callable) -> Callable:
    """--threads: the one CPU thread policy (featurecache.resources.cpu_threads)."""
    return click.option("--threads", type=click.IntRange(min=1), default=None,
                        help="CPU threads [default: the CPUs this process may use (affinity, container quota)].")(f)


def download_option(f: Callable) -> Callable:
    """--download: the one way to let a command open a network connection (default weights not cached)."""
    return click.option("--download", is_flag=True,
                        help="Download the backbone's default weights (timm, torchvision) when they are not in the "
                             "local cache; without it featurecache makes no network connection.")(f)


def runtime_option(f: Callable) -> Callable:
    """--runtime: what runs the backbone on the CPU."""
    return click.option("--runtime", type=click.Choice(RUNTIMES), default="auto",
                        help="CPU runtime of the backbone (crop mode): auto = the fastest installed whose features "
                             "agree with torch's (openvino, onnxruntime, torch); torch on CUDA and in dense mode.")(f)


def grid_options(f: Callable) -> Callable:
    """--scales, --overlap, --input-size, --whole-image."""
    f = click.option("--max-patches", type=click.IntRange(min=1), default=MAX_PATCHES,
                     help="Most patches of one image: images beyond (thin strips) are skipped and recorded; a grid "
                          "beyond it for most images is refused.")(f)
    f = click.option("--whole-image", is_flag=True, help="One patch per image: the whole image (baseline).")(f)
    f = click.option("--input-size", type=click.IntRange(min=8, max=MAX_INPUT_SIZE), default=224,
                     help="Network input side in pixels; every patch is resized to it.")(f)
    f = click.option("--overlap", type=click.FloatRange(0, 1, max_open=True), default=0.5,
                     help="Minimum IoU between neighbouring patches.")(f)
    f = click.option("--scales", callback=_parse_scales, default=",".join(f"{s:g}" for s in DEFAULT_SCALES),
                     help="Scales λ (patch side = min(w, h)/λ), comma-separated.")(f)
    return f


def _read_images(dataset: str, layout: str, split: Optional[str], annotations: Optional[str],
                 classes_file: Optional[str]):
    classes = read_class_file(classes_file) if classes_file else None
    return read_dataset(dataset, layout=layout, split=split, annotations=annotations, classes=classes)


def _grid(scales, overlap: float, input_size: int, whole_image: bool):
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
    _stop_on_sigterm()


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def _stop_on_sigterm() -> None:
    """A scheduler's SIGTERM (a time limit, ``scancel``) stops a command as Ctrl-C does: committed work
    kept, temporary files removed, one line. Only the command line sets it, in its main thread."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupted)


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
            max_patches, min_patch_fraction, min_object_fraction):
    """Count images, boxes per class and the patch labels a patch grid would produce."""
    images = _read_images(dataset, layout, split, annotations, classes_file)
    rule = LabelRule(min_patch_fraction=min_patch_fraction, min_object_fraction=min_object_fraction)
    summary = summarize(images, grid=_grid(scales, overlap, input_size, whole_image), rule=rule, name=dataset,
                        max_patches=max_patches)
    click.echo(summary.to_text())


@main.command(context_settings=CONTEXT)
@click.argument("dataset", type=click.Path(exists=True))
@click.argument("out", type=click.Path(dir_okay=False))
@dataset_options
@click.option("--backbone", default="efficientnet_lite0",
              help="efficientnet_lite0, alexnet, vgg16, resnet50, another torchvision model (with --layer), "
                   "or timm:<name>.")
@click.option("--layer", default=None, help="Torchvision graph node to read (default: the backbone's own).")
@click.option("--weights", default="default",
              help="'default' (packaged or cached weights), a torchvision weights name, a state-dict file, "
                   "or 'none' (random; for tests).")
@grid_options
@click.option("--mode", type=click.Choice(["crop", "dense"]), default="crop",
              help="crop: every patch through the whole network (the paper's); dense: the trunk once per "
                   "image and scale, windows pooled from its feature map (about 8x faster on CPU, 0.2-1.6 mAP "
                   "lower on the VOC sample and BCCD: docs/results.md).")
@click.option("--max-side", type=click.IntRange(min=MIN_MAX_SIDE), default=DEFAULT_MAX_SIDE,
              help="Dense mode: largest trunk input side; larger images run in overlapping tiles "
                   "(same features up to float rounding).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Patches per forward pass [default: 16 on CPU, 256 on CUDA].")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Image decoding processes [default: min(4, CPUs)].")
@click.option("--device", type=click.Choice(DEVICES), default="auto",
              help="auto = CUDA when present (mixed precision, channels-last).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", help="Stored feature type.")
@click.option("--compression", type=click.Choice(["none", "lzf", "gzip"]), default="none",
              help="HDF5 compression of the features.")
@click.option("--part-size", type=click.IntRange(min=1), default=2048,
              help="Patches per committed part (the most a crash can lose).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=MAX_PIXELS,
              help="Images with more pixels are skipped and recorded before decoding (3 bytes a pixel decoded, in "
                   "each worker).")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache or unfinished run with other settings.")
@click.option("--strict", is_flag=True, help="Stop at an unreadable image instead of skipping and recording it.")
@click.option("--assemble", type=click.Choice(ASSEMBLE_MODES), default="copy",
              help="copy: one self-contained file; virtual: OUT maps its features onto the part files, kept in "
                   "OUT.<run>.data/ beside it (no copy; move the two together).")
@download_option
@runtime_option
@threads_option
@_command
def extract(dataset, out, layout, split, annotations, classes_file, backbone, layer, weights, scales, overlap,
            input_size, whole_image, max_patches, mode, max_side, batch_size, workers, device, dtype, compression,
            part_size, max_pixels, overwrite, strict, assemble, download, runtime, threads):
    """Run every patch of DATASET through a frozen backbone once; cache the features in OUT (HDF5).

    A killed run continues where it stopped when the same command is run again. Under torchrun
    (or srun) the processes share the work and write one cache: docs/distributed.md.
    """
    from featurecache.extract import extract as run_extract

    _check_outputs({"--classes": classes_file, "--annotations": annotations}, out=out)
    ctx = click.get_current_context()
    result = run_extract(
        dataset, out, split=split, annotations=annotations, layout=layout,
        classes=read_class_file(classes_file) if classes_file else None,
        backbone=backbone, layer=layer, weights=None if weights == "none" else weights, download=download,
        grid=_grid(scales, overlap, input_size, whole_image), mode=mode, max_side=max_side, batch_size=batch_size,
        workers=workers,
        device=device, dtype=dtype, compression=compression, overwrite=overwrite, strict=strict,
        part_patches=part_size, max_pixels=max_pixels, max_patches=max_patches, runtime=runtime, threads=threads,
        progress=False if ctx.obj.get("quiet") else None, assemble=assemble, world=world_from_env())
    if result.rank == 0:  # in a job of several processes the leader speaks for it
        click.echo(result.summary())


class _RegistryValue(click.ParamType):
    """A number read by its registry option: the one place that knows its range (finite, bounds)."""

    def __init__(self, opt: Option) -> None:
        self.opt, self.name = opt, opt.kind

    def convert(self, value, param, ctx):
        try:
            return self.opt.read(value)
        except FeaturecacheError as e:
            self.fail(e.message, param, ctx)


def _click_type(opt: Option):
    if opt.kind == "choice":
        return click.Choice(list(opt.choices))
    if opt.kind == "path":
        return click.Path(exists=True, dir_okay=False)
    if opt.kind in ("float", "int"):
        return _RegistryValue(opt)
    return str


def _option(opt: Option, **overrides) -> Callable:
    """A click option made from a registry option: flag, type, default and help defined once, there."""
    flag = "--" + (opt.name if opt.name == "C" else opt.name.replace("_", "-"))
    default = opt.default
    if isinstance(default, tuple):
        default = ",".join(str(v) for v in default)
    kw = dict(type=_click_type(opt), default=default, help=opt.help, show_default=default is not None)
    kw.update(overrides)
    return click.option(flag, *opt.aliases, opt.name, **kw)


def objective_options(f: Callable) -> Callable:
    """Every training option of :data:`featurecache.heads.registry.OPTIONS`."""
    for opt in reversed(OPTIONS.values()):
        f = _option(opt)(f)
    return f


def _grid_help() -> str:
    per = {name: [n for n, o in OPTIONS.items() if o.grid and n != "objective" and name in o.objectives]
           for name in OPTIONS["objective"].choices}
    parts = [f"{name}: {', '.join(keys)}" for name, keys in per.items()]
    return ("KEY=V1,V2,... (repeatable); list values join parts with '+' (hidden=0,2048+2048; "
            "image_pooling=mean+max, or whole with --whole-image). Training: objective ("
            + ", ".join(OPTIONS["objective"].choices) + "); " + "; ".join(parts)
            + ". Evaluation (no retraining): " + ", ".join(EVAL_OPTIONS) + ".")


def _parse_size(ctx, param, value: Optional[str]):
    if value is None:
        return None
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    v = value.strip().upper().rstrip("B").rstrip("I")
    try:
        number = float(v[:-1]) * units[v[-1]] if v and v[-1] in units else float(v)
    except ValueError:
        raise click.BadParameter(f"expected a size like 4G or 512M, got {value!r}") from None
    if not (number >= 1 and number < 2**63):  # also refuses nan
        raise click.BadParameter(f"must be a positive size like 4G or 512M, got {value!r}")
    return int(number)


def _memory_limit_option(above: str):
    """``--memory-limit SIZE`` (fit, ablate): what is held in memory; ``above`` says what happens past it."""
    return click.option("--memory-limit", callback=_parse_size, default=None,
                        help=f"Float32 features held in memory, e.g. 4G; {above} [default: half the available "
                             "memory].")


@main.command(context_settings=CONTEXT)
@click.argument("cache", type=click.Path(exists=True, dir_okay=False))
@click.option("--train-split", default=None, help="Train on this split of CACHE only.")
@objective_options
@_memory_limit_option("above it torch heads stream their training (and --val) patches from the file")
@click.option("--device", type=click.Choice(DEVICES), default="auto", help="Device of the torch heads.")
@click.option("--seed", type=int, default=0, help="Random seed.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Head file [default: CACHE.head.pt].")
@threads_option
@_command
def fit(cache, train_split, objective, memory_limit, device, seed, out, threads, **options):
    """Train a head on a feature cache; by default the objective that cross-validates best on its images."""
    from featurecache.train import fit_objective

    val, val_split = options.pop("val"), options.pop("val_split")
    ctx = click.get_current_context()
    given = {k: v for k, v in options.items() if ctx.get_parameter_source(k) is not click.core.ParameterSource.DEFAULT}
    try:
        config = FitConfig(objective, given, train_split=train_split, val=val, val_split=val_split,
                           memory_limit=memory_limit, device=device, random_state=seed,
                           progress=False if ctx.obj.get("quiet") else None, threads=threads)
    except OptionScopeError as e:
        raise _scope_usage_error(ctx, e) from None
    path = Path(out) if out else Path(cache).with_suffix(".head.pt")
    _check_outputs({"CACHE": cache, "--val": val}, out=path)
    trained = fit_objective(cache, config)
    trained.save(path)
    click.echo(f"{trained.summary_line()} -> {path}")
    if trained.selection_table():
        click.echo(trained.selection_table())


def _scope_usage_error(ctx: click.Context, error: OptionScopeError) -> click.UsageError:
    """The library's refusal of options of another objective, in flags (a usage error, as click's own)."""
    default = ctx.get_parameter_source("objective") is click.core.ParameterSource.DEFAULT
    flags = [p.opts[0] for name in error.options for p in ctx.command.params if p.name == name]
    hint = f"; add --objective {' or '.join(error.owners)}" if default and error.owners else ""
    return click.UsageError(f"{', '.join(flags)} do(es) not apply to objective {error.objective}"
                            + (" (the default)" if default else "") + hint)


def report_options(what: str) -> Callable:
    """--out FILE.csv|.json (the report; JSON for a .json name, else CSV), with --json and --csv as aliases."""
    def decorate(f: Callable) -> Callable:
        f = click.option("--csv", "csv_out", type=click.Path(dir_okay=False), default=None,
                         help=f"{what}as CSV here (as --out FILE.csv).")(f)
        f = click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
                         help=f"{what}as JSON here (as --out FILE.json).")(f)
        return f
    return decorate


def _out_option(what: str) -> Callable:
    return click.option("--out", type=click.Path(dir_okay=False), default=None,
                        help=f"{what}here: JSON for a .json name, else CSV.")


def _write_reports(report, out, json_out, csv_out) -> None:
    """Every report goes through the one writer (outputs.write_report)."""
    for path, fmt in ((out, None), (json_out, "json"), (csv_out, "csv")):
        if path:
            write_report(report, path, fmt=fmt)


@main.command("eval", context_settings=CONTEXT)
@click.argument("head", type=click.Path(exists=True, dir_okay=False))
@click.argument("cache", type=click.Path(exists=True, dir_okay=False))
@click.option("--split", default=None, help="Evaluate on this split of CACHE only.")
@_option(EVAL_OPTIONS["pooling"], default=None, show_default=False,
         help=EVAL_OPTIONS["pooling"].help + " [default: power]. Image-level heads score images themselves.")
@_option(EVAL_OPTIONS["k"], default=None, show_default=False, help=EVAL_OPTIONS["k"].help + " [default: 5].")
@_option(EVAL_OPTIONS["method"])
@_out_option("Also write the report (per-class AP) ")
@report_options("Also write the report ")
@click.option("--plots", type=click.Path(file_okay=False), default=None,
              help="Write summary.png (AP per class) and pr_curves.png (precision-recall per class) in this "
                   "folder; needs matplotlib: pip install \"featurecache[plots]\".")
@threads_option
@_command
def eval_(head, cache, split, pooling, k, method, out, json_out, csv_out, plots, threads):
    """Score the images of CACHE with HEAD and print per-class AP and mAP."""
    from featurecache.evaluate import evaluate
    from featurecache.plots import write_eval_plots

    _check_outputs({"HEAD": head, "CACHE": cache}, folders=("plots",), out=out, json=json_out, csv=csv_out,
                   plots=plots)
    report = evaluate(head, cache, split=split, pooling=pooling, k=k, method=method, threads=threads)
    click.echo(report.to_text())
    _write_reports(report, out, json_out, csv_out)
    if plots:
        click.echo("plots: " + ", ".join(str(p) for p in write_eval_plots(report, plots)))


def map_options(f: Callable) -> Callable:
    """--map-method, --stride: how localize and predict make maps."""
    f = click.option("--stride", type=click.IntRange(1, MAX_STRIDE), default=8, help="Map cell size in pixels.")(f)
    return click.option(
        "--map-method", type=click.Choice(MAP_METHODS), default=DEFAULT_MAP_METHOD,
        help="cam: the head scores every cell of the backbone's feature map at the head's scales, log-odds "
             "averaged over scales; windows: the paper's per-pixel mean of the cached "
             "patches' scores (patch, mil, hybrid heads); cam*windows: the geometric mean of the two.")(f)


@main.command(context_settings=CONTEXT)
@click.argument("head", type=click.Path(exists=True, dir_okay=False))
@click.argument("cache", type=click.Path(exists=True, dir_okay=False))
@click.argument("image", required=False)
@map_options
@click.option("--map-scales", callback=_parse_scales, default=None,
              help="λ of the cam maps, comma-separated [default: the head's grid].")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write the maps (classes x rows x columns) as .npz here; with --evaluate, the report (JSON for "
                   "a .json name, else CSV).")
@click.option("--png", type=click.Path(dir_okay=False), default=None,
              help="Draw one class's map over the image and write it as PNG here (the image's size, longer "
                   "side at most 2048 px).")
@click.option("--class", "cls", default=None, help="The class --png draws [default: the one whose map peaks highest].")
@click.option("--evaluate", is_flag=True,
              help="Instead of one image's map: pointing accuracy and CorLoc of the maps of every image of CACHE "
                   "(or of --split) against its data set's boxes, beside the image centre and the whole image.")
@click.option("--split", default=None, help="--evaluate: only the cache's images of this split (e.g. val).")
@click.option("--tolerance", type=click.IntRange(min=0), default=POINTING_TOLERANCE,
              help="--evaluate: pixels a map's peak may miss a box by (reported beside 0).")
@click.option("--box-threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=BOX_THRESHOLD,
              help="A map's box: the cells connected to its peak scoring at least this fraction of the way from "
                   "the map's minimum to its peak.")
@report_options("--evaluate: the report ")
@click.option("--weights", default=None,
              help="cam maps: the backbone weights file, when not where the head's training found it.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", help="Where the backbone runs (cam maps).")
@download_option
@_command
def localize(head, cache, image, map_method, stride, map_scales, out, png, cls, evaluate, split, tolerance,
             box_threshold, json_out, csv_out, weights, device, download):
    """Localisation map of one cached IMAGE (row number, stored path, file name or stem), or with
    --evaluate how well the maps of a labelled cache point at and box its objects.

    Prints each top class's peak and box. The default cam maps work with every head and need
    the image files; windows maps read the cache only."""
    from featurecache.localize import evaluate_localization
    from featurecache.maps import MapConfig, localization_map

    if evaluate == (image is not None):
        raise click.UsageError("give IMAGE, or --evaluate without IMAGE")
    stray = [flag for flag, v in (("--png", png), ("--class", cls)) if v] if evaluate else \
        [flag for flag, v in (("--split", split), ("--json", json_out), ("--csv", csv_out)) if v]
    if stray:
        raise click.UsageError(f"{', '.join(stray)} {'do' if len(stray) > 1 else 'does'} not apply "
                               + ("with --evaluate" if evaluate else "without --evaluate"))
    if cls and not png:
        raise click.UsageError("--class chooses the class --png draws; give --png too")
    _check_outputs({"HEAD": head, "CACHE": cache}, out=out, png=png, json=json_out, csv=csv_out)
    config = MapConfig(method=map_method, stride=stride, scales=map_scales, box_threshold=box_threshold,
                       device=device, weights=weights, download=download)
    if evaluate:
        report = evaluate_localization(head, cache, split=split, config=config, tolerance=tolerance,
                                       progress=False if click.get_current_context().obj.get("quiet") else None)
        click.echo(report.to_text())
        _write_reports(report, out, json_out, csv_out)
        return
    m = localization_map(head, cache, image, config=config)
    check_not_inputs({"out": out, "png": png}, {"the image": m.image_file or None})
    if out:
        m.save(out)
    if png:
        m.save_png(png, cls)
    written = " and ".join(str(f) for f in (out, png) if f)
    click.echo(m.to_text() + (f" -> {written}" if written else ""))


@main.command(context_settings=CONTEXT)
@click.argument("head", type=click.Path(exists=True, dir_okay=False))
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write one row per image here: CSV, or JSON for a .json name [default: print a short table].")
@report_options("Also write the rows ")
@click.option("--top", type=click.IntRange(min=1), default=5, help="Classes listed per image, best first.")
@click.option("--threshold", type=float, default=None,
              help="Labels: classes scoring at least this [default: 0.5 for heads whose scores are probabilities "
                   "(image, mil, hybrid); none for pooled patch scores and fusion].")
@click.option("--maps", type=click.Path(file_okay=False), default=None,
              help="Write one PNG per image here: its top class's localisation map over the image; --out then "
                   "gets each image's top classes' boxes from their maps (JSON).")
@map_options
@click.option("--cache", type=click.Path(dir_okay=False), default=None,
              help="Keep the images' features in this cache (resumable; usable by eval, localize, predict) "
                   "[default: a temporary file].")
@click.option("--weights", default=None,
              help="The backbone weights file, when not where the head's training found it (refused unless its "
                   "SHA-256 is the recorded one).")
@click.option("--layout", type=click.Choice(("auto",) + LAYOUTS), default="auto",
              help="Layout of data-set folders among INPUTS; other folders are searched for images.")
@click.option("--split", default=None, help="VOC split of a devkit folder among INPUTS.")
@click.option("--annotations", type=click.Path(exists=True, dir_okay=False),
              help="COCO instances JSON of an image folder among INPUTS.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Patches per forward pass [default: 16 on CPU, 256 on CUDA].")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Image decoding processes [default: min(4, CPUs)].")
@click.option("--device", type=click.Choice(DEVICES), default="auto", help="auto = CUDA when present.")
@click.option("--strict", is_flag=True, help="Stop at the first image that cannot be read.")
@click.option("--overwrite", is_flag=True, help="Replace a --cache made of other images (or of changed files).")
@download_option
@runtime_option
@threads_option
@_command
def predict(head, inputs, out, json_out, csv_out, top, threshold, maps, map_method, stride, cache, weights, layout,
            split, annotations, batch_size, workers, device, strict, overwrite, download, runtime, threads):
    """Score new images (INPUTS: files, folders, data sets) with HEAD: top classes, labels, one score per class.

    The head file says how its features were made; the same backbone, weights (checked by
    SHA-256), patch grid and mode are used. Images that cannot be read get an error row; the
    exit status is 1 only when no image could be scored.
    """
    from featurecache.predict import PredictConfig
    from featurecache.predict import predict as run_predict

    ctx = click.get_current_context()
    config = PredictConfig(top=top, threshold=threshold, out=out, maps=maps, map_method=map_method, stride=stride,
                           cache=cache, layout=layout,
                           split=split, annotations=annotations, batch_size=batch_size, workers=workers,
                           strict=strict, overwrite=overwrite, runtime=runtime, threads=threads,
                           progress=False if ctx.obj.get("quiet") else None)
    _check_outputs({"HEAD": head, "--weights": weights, "--annotations": annotations}, folders=("maps",), out=out,
                   json=json_out, csv=csv_out, cache=cache, maps=maps)
    result = run_predict(head, inputs, config, weights=weights, device=device, download=download)
    _write_reports(result, None, json_out, csv_out)
    written = " and ".join(str(f) for f in (out, json_out, csv_out) if f)
    if written:
        click.echo(f"{result.summary()} -> {written}")
    else:
        click.echo(result.to_text())
    if maps:
        drawn = sum(1 for m in result.maps if m)
        if drawn or not result.maps_note:
            click.echo(f"maps: {drawn} PNG picture(s) in {maps}")
        if result.maps_note:
            click.echo(result.maps_note)
    if not result.n_scored:
        raise click.ClickException("no image could be scored")


@main.command(context_settings=CONTEXT)
@click.argument("cache", type=click.Path(exists=True, dir_okay=False))
@click.option("--val", "val_cache", type=click.Path(exists=True, dir_okay=False), help="Validation cache.")
@click.option("--val-split", default=None, help="Evaluate on this split (of --val, or of CACHE).")
@click.option("--train-split", default=None, help="Train on this split of CACHE.")
@click.option("--grid", "grid_items", multiple=True, help=_grid_help())
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="TOML sweep: [grid] setting = [values], optional [options] seeds/folds/val_split/train_split.")
@click.option("--seeds", type=click.IntRange(min=1), default=None, help="Repetitions per configuration [default: 1].")
@click.option("--folds", type=click.IntRange(min=2), default=None,
              help="K-fold cross-validation over images instead of a validation set.")
@_out_option("Also write the table ")
@report_options("Also write the table ")
@click.option("--whole-image", "whole_image", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A --whole-image cache of the same images: image_pooling=whole is then the whole-image "
                   "one-vs-rest probe, on the same folds.")
@click.option("--save-best", type=click.Path(dir_okay=False), default=None,
              help="Retrain the best configuration on all training images and save its head here.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", help="Device of the torch heads.")
@click.option("--resamples", "n_boot", type=click.IntRange(min=0), default=1000,
              help="Bootstrap resamples of the evaluation images for each row's 95% interval and the paired "
                   "differences to the best row and the whole-image probe (0: none).")
@_memory_limit_option("above it each configuration streams its images from the file")
@threads_option
@_command
def ablate(cache, val_cache, val_split, train_split, grid_items, config_file, seeds, folds, out, json_out, csv_out,
           whole_image, save_best, device, n_boot, memory_limit, threads):
    """Compare many head settings on one cache; prints a table sorted by mAP."""
    from featurecache.ablate import ablate as run_ablate
    from featurecache.ablate import parse_grid, read_sweep_file

    grid, options = read_sweep_file(config_file) if config_file else ({}, {})
    grid.update(parse_grid(grid_items))
    _check_outputs({"CACHE": cache, "--val": val_cache, "--whole-image": whole_image or options.get("whole_image"),
                    "--config": config_file}, out=out, json=json_out, csv=csv_out, save_best=save_best)
    ctx = click.get_current_context()
    try:
        result = run_ablate(
            cache, grid=grid, val=val_cache, val_split=val_split or options.get("val_split"),
            train_split=train_split or options.get("train_split"), folds=folds or options.get("folds"),
            seeds=seeds or options.get("seeds", 1), whole_image=whole_image or options.get("whole_image"),
            save_best=save_best, device=device, n_boot=n_boot, threads=threads, memory_limit=memory_limit,
            progress=False if ctx.obj.get("quiet") else None)
    except AblationError as e:
        if e.result is not None:  # the sweep ran; what failed came after it
            click.echo(e.result.to_text())
        raise
    click.echo(result.to_text())  # first: a failed file write below loses nothing of the sweep
    _write_reports(result, out, json_out, csv_out)


@main.command(context_settings=CONTEXT)
@click.argument("workdir", type=click.Path(file_okay=False), default="featurecache-demo")
@_command
def demo(workdir):
    """Make a small annotated image set and run extract -> fit -> eval -> ablate on it (no data needed).

    The images are textured discs, squares and triangles composited onto the photographs
    shipped with scikit-learn; everything is written to WORKDIR. About a minute on 2 CPU cores.
    """
    from featurecache.demo import run_demo

    ctx = click.get_current_context()
    result = run_demo(workdir, progress=False if ctx.obj.get("quiet") else None)
    click.echo(result.to_text())


if __name__ == "__main__":  # pragma: no cover
    main(prog_name="featurecache")
