"""The ``featurecache`` command line: each command parses, makes one library call, prints.

Commands import the torch-heavy modules (extract, train, evaluate, ablate, demo) in their
bodies, so that ``--help`` and ``inspect`` start without loading torch.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Callable, Mapping, Optional

import click

from featurecache import __version__
from featurecache.datasets import read_class_file, read_dataset
from featurecache.distributed import stop_on_sigterm, world_from_env
from featurecache.errors import AblationError, FeaturecacheError, one_line
from featurecache.heads.registry import EVAL_OPTIONS, OPTIONS, FitConfig, Option, OptionScopeError, grid_help
from featurecache.logs import log_to_stderr
from featurecache.outputs import check_not_inputs, check_outputs, printable, write_report
from featurecache.patches import LabelRule
from featurecache.resources import DEVICES, parse_size
from featurecache.settings import (
    EXPORT,
    EXTRACT,
    GRID,
    INSPECT,
    LOCALIZE,
    PREDICT,
    REPORT,
    Setting,
    grid_from,
    parse_image_size,
    parse_scales,
)
from featurecache.summary import summarize

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}


# --------------------------------------------------------------------------- logging


def _set_verbosity(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Apply -v/-q; options given on a subcommand override the group's."""
    obj = ctx.ensure_object(dict)
    if verbose or quiet:
        obj["verbose"], obj["quiet"] = verbose, quiet
    verbose = obj.get("verbose", 0)
    log_to_stderr(logging.ERROR if obj.get("quiet") else logging.DEBUG if verbose >= 2 else logging.INFO if verbose
                  else logging.WARNING)


def _verbosity_options(f: Callable) -> Callable:
    f = click.option("-q", "--quiet", is_flag=True, help="Print errors only; no progress bar.")(f)
    return click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")(f)


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
        except (ValueError, OSError, MemoryError, RuntimeError) as e:
            line = one_line(e, ctx.info_name)
            if line is None:
                raise
            raise click.ClickException(printable(line)) from None

    return _verbosity_options(wrapper)


#: Commands that share their work among the processes of a torchrun/srun job.
_SHARED_COMMANDS = ("extract",)

def _check_outputs(inputs: dict, *, folders: tuple = (), **paths) -> None:
    """:func:`featurecache.outputs.check_outputs` with the flag names as keywords."""
    check_outputs(paths, inputs, folders=folders)


def _message(ctx: click.Context, error: FeaturecacheError) -> str:
    """A library error's message, with the flag of this command in place of the library parameter it names."""
    names = {error.param} - {None}
    for p in ctx.command.params:
        if names and isinstance(p, click.Argument) and p.name in names:
            return error.for_option(p.human_readable_name)
        flags = [o.lstrip("-").replace("-", "_") for o in getattr(p, "opts", ())]
        if names and isinstance(p, click.Option) and names & {p.name, *flags}:
            return error.for_option(p.opts[0])
    return str(error)


# --------------------------------------------------------------------------- shared options


def _parsed(parse: Callable) -> Callable:
    """A click callback reading a value with ``parse`` (its ValueError as click's bad-parameter error)."""
    def callback(ctx, param, value: Optional[str]):
        try:
            return None if value is None else parse(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    return callback


class _InputFile(click.Path):
    """An existing regular file to read (a FIFO would block the command, a device never end)."""

    def __init__(self) -> None:
        super().__init__(exists=True, dir_okay=False)

    def convert(self, value, param, ctx):
        path = super().convert(value, param, ctx)
        if not os.path.isfile(path):
            self.fail(f"{value!r} is not a regular file (a FIFO, device or socket)", param, ctx)
        return path


def _setting_type(s: Setting):
    """The click type of a setting: its range and choices as the table defines them."""
    if s.kind in ("choice", "device"):
        return click.Choice(list(s.choices))
    if s.kind == "path":
        return _InputFile()
    if s.kind in ("file", "folder"):
        return click.Path(dir_okay=s.kind == "folder", file_okay=s.kind == "file")
    if s.kind in ("int", "float"):
        kind = click.IntRange if s.kind == "int" else click.FloatRange
        if s.low is None and s.high is None:
            return int if s.kind == "int" else float
        opens = dict(min_open=s.low_open, max_open=s.high_open) if s.kind == "float" else {}
        return kind(s.low, s.high, **opens)
    return str


def setting_option(s: Setting, **overrides) -> Callable:
    """A click option made from a setting of :mod:`featurecache.settings` (its flag, type, default and help)."""
    if s.kind == "flag":
        return click.option(s.option, s.name, is_flag=True, default=s.default, help=s.help, **overrides)
    kw = dict(type=_setting_type(s), default=s.default, help=s.help, show_default=s.default is not None)
    if s.kind == "scales":
        kw.update(type=str, callback=_parsed(parse_scales),
                  default=None if s.default is None else ",".join(f"{v:g}" for v in s.default))
    if s.kind == "size":
        kw.update(type=str, callback=_parsed(parse_image_size), metavar="WIDTH,HEIGHT")
    kw.update(overrides)
    return click.option(s.option, s.name, **kw)


def setting_options(table: Mapping[str, Setting], *, skip: tuple = ()) -> Callable:
    """Every command-line setting of ``table`` but ``skip``, in the table's order."""
    def decorate(f: Callable) -> Callable:
        for s in reversed([s for s in table.values() if s.cli and s.name not in skip]):
            f = setting_option(s)(f)
        return f
    return decorate


def threads_option(f: Callable) -> Callable:
    """--threads: the one CPU thread policy (featurecache.resources.cpu_threads)."""
    return setting_option(EXTRACT["threads"], show_default=False)(f)


def _read_images(options: Mapping):
    classes = read_class_file(options["classes_file"]) if options["classes_file"] else None
    return read_dataset(options["dataset"], layout=options["layout"], split=options["split"],
                        annotations=options["annotations"], classes=classes)


def _grid(options: Mapping):
    try:
        return grid_from(options)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--scales") from None


def _quiet() -> Optional[bool]:
    """The library's ``progress``: off with -q, else decided by the terminal."""
    return False if click.get_current_context().obj.get("quiet") else None


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
    stop_on_sigterm()


@main.command(context_settings=CONTEXT)
@click.argument("dataset", type=click.Path(exists=True))
@setting_options(INSPECT)
@_command
def inspect(dataset, **options):
    """Count images, boxes per class and the patch labels a patch grid would produce."""
    images = _read_images({"dataset": dataset, **options})
    rule = LabelRule(min_patch_fraction=options["min_patch_fraction"],
                     min_object_fraction=options["min_object_fraction"])
    summary = summarize(images, grid=_grid(options), rule=rule, name=dataset, max_patches=options["max_patches"])
    click.echo(summary.to_text())


@main.command(context_settings=CONTEXT)
@click.argument("dataset", type=click.Path(exists=True))
@click.argument("out", type=click.Path(dir_okay=False))
@setting_options(EXTRACT)
@_command
def extract(dataset, out, **options):
    """Run every patch of DATASET through a frozen backbone once; cache the features in OUT (HDF5).

    A killed run continues where it stopped when the same command is run again. Under torchrun
    (or srun) the processes share the work and write one cache: docs/distributed.md.
    """
    from featurecache.extract import ExtractConfig
    from featurecache.extract import extract as run_extract

    classes_file, weights = options.pop("classes_file"), options.pop("weights")
    _check_outputs({"--classes": classes_file, "--annotations": options["annotations"]}, out=out)
    grid = _grid(options)
    config = ExtractConfig(**{k: v for k, v in options.items() if k not in GRID or k == "max_patches"}, grid=grid,
                           classes=read_class_file(classes_file) if classes_file else None,
                           weights=None if weights == "none" else weights, progress=_quiet())
    result = run_extract(dataset, out, config, world=world_from_env())
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
        return _InputFile()
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


def _memory_limit_option(above: str):
    """``--memory-limit SIZE`` (fit, ablate): what is held in memory; ``above`` says what happens past it."""
    return click.option("--memory-limit", callback=_parsed(parse_size), default=None,
                        help=f"Float32 features held in memory, e.g. 4G; {above} [default: half the available "
                             "memory].")


@main.command(context_settings=CONTEXT)
@click.argument("cache", type=_InputFile())
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
    click.echo(printable(f"{trained.summary_line()} -> {path}"))  # class names are data: shown escaped
    if trained.selection_table():
        click.echo("\n".join(printable(line) for line in trained.selection_table().splitlines()))


def _scope_usage_error(ctx: click.Context, error: OptionScopeError) -> click.UsageError:
    """The library's refusal of options of another objective, in flags (a usage error, as click's own)."""
    default = ctx.get_parameter_source("objective") is click.core.ParameterSource.DEFAULT
    flags = [p.opts[0] for name in error.options for p in ctx.command.params if p.name == name]
    hint = f"; add --objective {' or '.join(error.owners)}" if default and error.owners else ""
    return click.UsageError(f"{', '.join(flags)} do(es) not apply to objective {error.objective}"
                            + (" (the default)" if default else "") + hint)


def report_options(what: str, page: str = "") -> Callable:
    """--json and --csv (as --out FILE.json, FILE.csv); with ``page``, --report (as --out FILE.html)."""
    def decorate(f: Callable) -> Callable:
        f = click.option("--report", "html_out", type=click.Path(dir_okay=False), default=None,
                         help=f"{what}as {page} here (as --out FILE.html).")(f) if page else f
        f = click.option("--csv", "csv_out", type=click.Path(dir_okay=False), default=None,
                         help=f"{what}as CSV here (as --out FILE.csv).")(f)
        f = click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
                         help=f"{what}as JSON here (as --out FILE.json).")(f)
        return f
    return decorate


def _out_option(what: str) -> Callable:
    return click.option("--out", type=click.Path(dir_okay=False), default=None,
                        help=f"{what}here: JSON for a .json name, else CSV.")


def _write_reports(report, out, json_out, csv_out, html_out=None) -> None:
    """Every report goes through the one writer (outputs.write_report)."""
    for path, fmt in ((out, None), (json_out, "json"), (csv_out, "csv"), (html_out, "html")):
        if path:
            write_report(report, path, fmt=fmt)


@main.command("eval", context_settings=CONTEXT)
@click.argument("head", type=_InputFile())
@click.argument("cache", type=_InputFile())
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
    from featurecache.plots import PLOT_FILES, write_eval_plots

    _check_outputs({"HEAD": head, "CACHE": cache}, folders=("plots",), out=out, json=json_out, csv=csv_out,
                   plots=plots)
    for name in PLOT_FILES if plots else ():  # written into the folder: none of them may be an input
        check_not_inputs({"plots": Path(plots) / name}, {"HEAD": head, "CACHE": cache})
    report = evaluate(head, cache, split=split, pooling=pooling, k=k, method=method, threads=threads)
    click.echo(report.to_text())
    _write_reports(report, out, json_out, csv_out)
    if plots:
        click.echo("plots: " + ", ".join(str(p) for p in write_eval_plots(report, plots)))


@main.command(context_settings=CONTEXT)
@click.argument("head", type=_InputFile())
@click.argument("cache", type=_InputFile())
@click.argument("image", required=False)
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
@report_options("--evaluate: the report ")
@setting_options(LOCALIZE)
@_command
def localize(head, cache, image, out, png, cls, evaluate, json_out, csv_out, split, tolerance, **options):
    """Localisation map of one cached IMAGE (row number, stored path, file name or stem), or with
    --evaluate how well the maps of a labelled cache point at and box its objects.

    Prints each top class's peak and box. The default cam maps work with every head and need
    the image files; windows and attention maps read the cache only."""
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
    config = MapConfig(**options)
    if evaluate:
        report = evaluate_localization(head, cache, split=split, config=config, tolerance=tolerance,
                                       progress=_quiet(), reports={"out": out, "json": json_out, "csv": csv_out})
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
@click.argument("head", type=_InputFile())
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write one row per image here: CSV, or JSON for a .json name [default: print a short table].")
@report_options("Also write the rows ", "an HTML gallery (each image's thumbnail, top classes and map)")
@setting_options(PREDICT)
@_command
def predict(head, inputs, out, json_out, csv_out, html_out, weights, device, download, **options):
    """Score new images (INPUTS: files, folders, data sets) with HEAD: top classes, labels, one score per class.

    The head file says how its features were made; the same backbone, weights (checked by
    SHA-256), patch grid and mode are used. Images that cannot be read get an error row; the
    exit status is 1 only when no image could be scored.
    """
    from featurecache.predict import PredictConfig
    from featurecache.predict import predict as run_predict

    config = PredictConfig(out=out, progress=_quiet(), reports={"json": json_out, "csv": csv_out, "report": html_out},
                           **options)
    _check_outputs({"HEAD": head, "--weights": weights, "--annotations": options["annotations"]}, folders=("maps",),
                   out=out, json=json_out, csv=csv_out, report=html_out, cache=options["cache"], maps=options["maps"])
    result = run_predict(head, inputs, config, weights=weights, device=device, download=download)
    _write_reports(result, None, json_out, csv_out, html_out)
    written = " and ".join(str(f) for f in (out, json_out, csv_out, html_out) if f)
    click.echo(f"{result.summary()} -> {written}" if written else result.to_text())
    if options["maps"]:
        drawn = sum(1 for m in result.maps if m)
        if drawn or not result.maps_note:
            click.echo(f"maps: {drawn} PNG picture(s) in {options['maps']}")
        if result.maps_note:
            click.echo(result.maps_note)
    if not result.n_scored:
        raise click.ClickException("no image could be scored")


@main.command("export", context_settings=CONTEXT)
@click.argument("head", type=_InputFile())
@click.argument("path", type=click.Path(dir_okay=False), metavar="OUT")
@click.argument("images", nargs=-1)
@setting_options(EXPORT)
@_command
def export(head, path, images, check, **options):
    """Write HEAD and its backbone as one ONNX model OUT (.onnx): a uint8 RGB image (H, W, 3) to per-class scores.

    The model computes what predict computes on an image of --input-size (or any size: --dynamic):
    the patch grid, the backbone, the head and its image-score rule; --maps adds the cam map. Its
    metadata holds the class names, what a score means, the threshold, the maps' grid (docs/deploy.md).
    """
    from featurecache.deploy import export as run_export

    if bool(images) != check:
        raise click.UsageError("IMAGES are what --check runs on: give both or neither")
    if (options["input_size"] is None) != options["dynamic"]:
        raise click.UsageError("give one of --input-size WIDTH,HEIGHT (one size) and --dynamic (any size)")
    _check_outputs({"HEAD": head, "--weights": options["weights"],
                    "IMAGES": [i for i in images if os.path.isfile(i)]}, path=path)
    click.echo(run_export(head, path, check=images, **options).to_text())


@main.command(context_settings=CONTEXT)
@click.argument("cache", type=_InputFile())
@click.option("--val", "val_cache", type=_InputFile(), help="Validation cache.")
@click.option("--val-split", default=None, help="Evaluate on this split (of --val, or of CACHE).")
@click.option("--train-split", default=None, help="Train on this split of CACHE.")
@click.option("--grid", "grid_items", multiple=True, help=grid_help())
@click.option("--config", "config_file", type=_InputFile(),
              help="TOML sweep: [grid] setting = [values], optional [options] seeds/folds/val_split/train_split.")
@click.option("--seeds", type=click.IntRange(min=1), default=None, help="Repetitions per configuration [default: 1].")
@click.option("--folds", type=click.IntRange(min=2), default=None,
              help="K-fold cross-validation over images instead of a validation set.")
@_out_option("Also write the table ")
@report_options("Also write the table ", "an HTML page (sortable, a forest plot of the intervals)")
@click.option("--whole-image", "whole_image", type=_InputFile(), default=None,
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
           html_out, whole_image, save_best, device, n_boot, memory_limit, threads):
    """Compare many head settings on one cache; prints a table sorted by mAP."""
    from featurecache.ablate import ablate as run_ablate
    from featurecache.ablate import parse_grid, read_sweep_file

    grid, options = read_sweep_file(config_file) if config_file else ({}, {})
    grid.update(parse_grid(grid_items))
    _check_outputs({"CACHE": cache, "--val": val_cache, "--whole-image": whole_image or options.get("whole_image"),
                    "--config": config_file}, out=out, json=json_out, csv=csv_out, report=html_out, save_best=save_best)
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
    _write_reports(result, out, json_out, csv_out, html_out)


@main.command(context_settings=CONTEXT)
@click.argument("head", type=_InputFile())
@click.argument("cache", type=_InputFile())
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="The page [default: HEAD.html].")
@setting_options(REPORT)
@_command
def report(head, cache, out, **options):
    """One self-contained HTML page on HEAD scored on CACHE: AP, curves, each class's images and mistakes, maps."""
    from featurecache.pages import report as make_report

    out = out or str(Path(head).with_suffix(".html"))
    _check_outputs({"HEAD": head, "CACHE": cache}, out=out)
    page = make_report(head, cache, progress=_quiet(), **options)
    page.save(out)
    click.echo(printable(f"{page.summary()} -> {out}"))


@main.command(context_settings=CONTEXT)
@click.argument("workdir", type=click.Path(file_okay=False), default="featurecache-demo")
@_command
def demo(workdir):
    """Make a small annotated image set and run extract -> fit -> eval -> ablate on it (no data needed).

    The images are textured discs, squares and triangles composited onto the photographs
    shipped with scikit-learn; everything is written to WORKDIR. About a minute on 2 CPU cores.
    """
    from featurecache.demo import run_demo

    result = run_demo(workdir, progress=_quiet())
    click.echo(result.to_text())


if __name__ == "__main__":  # pragma: no cover
    main(prog_name="featurecache")
