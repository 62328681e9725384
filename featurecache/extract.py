"""Stage one: run every patch of every image through a frozen backbone once and cache the features.

The pipeline: DataLoader worker processes decode images to RGB; the main process cuts all
patches of an image out of it on the compute device in one ``torchvision.ops.roi_align``
call per batch piece (bilinear, with adaptive area sampling when a patch shrinks, i.e.
anti-aliased), fills batches with patches from several images, runs the backbone, and
commits the features part by part through :class:`featurecache.cache.CacheWriter`, which
makes the run resumable after any crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence, Union

import h5py
import numpy as np
import torch
import torchvision
from tqdm.auto import tqdm

from featurecache import __version__
from featurecache.backbones import DENSE_STRIDE, FrozenBackbone, build_backbone
from featurecache.cache import (
    CacheWriter,
    DatasetSource,
    FeatureCache,
    Provenance,
    data_folders,
    feature_fingerprint,
    now_iso,
)
from featurecache.datasets import MAX_PIXELS, ImageSet, read_dataset
from featurecache.distributed import Coordinator, World, share
from featurecache.errors import ExtractError, FeaturecacheError
from featurecache.images import DISPLAYED_LAYOUTS, load_rgb, to_rgb
from featurecache.outputs import check_not_inputs
from featurecache.patches import MAX_PATCHES, LabelRule, PatchGrid, plan_patches
from featurecache.resources import (
    DEFAULT_MAX_SIDE,
    apply_threads,
    available_cpus,
    resolve_device,
)
from featurecache.runners import Decoder, PartComputer, StageClock, only
from featurecache.runtimes import Runtime, build_runtime
from featurecache.settings import EXTRACT, check_fields

logger = logging.getLogger(__name__)

__all__ = ["ExtractConfig", "ExtractError", "ExtractResult", "extract", "feature_settings", "load_rgb",
           "resolve_device", "to_rgb"]



@dataclass(frozen=True)
class ExtractResult:
    """What an extraction run did.

    Attributes
    ----------
    path : Path
        The cache file.
    images, patches, skipped : int
        Images and patches in the cache, images skipped as unreadable.
    seconds : float
        Wall time of this run.
    computed_patches : int
        Patches computed by this run (fewer than ``patches`` when it resumed).
    file_size : int
        Bytes (a virtual cache's part files included).
    already_complete : bool
        The cache existed with the same settings; nothing was done.
    rank : int
        This process's rank in its job (0 alone).
    ranks : list of (patches, seconds), optional
        In a job of several processes: what each rank computed, in rank order.
    stages : dict, optional
        Seconds this process spent per step: ``setup`` (data set read, backbone built,
        runtime compiled and checked), ``decode wait`` (waiting for the decoding workers),
        ``prepare``, ``crop`` or ``resize``, ``forward``, ``pool`` (dense), ``write``; see
        :class:`~featurecache.runners.StageClock`.
    """

    path: Path
    images: int
    patches: int
    skipped: int
    seconds: float
    computed_patches: int
    file_size: int
    already_complete: bool = False
    rank: int = 0
    ranks: Optional[list] = None
    stages: Optional[dict] = None

    @property
    def patches_per_second(self) -> float:
        return self.computed_patches / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One line for the end of ``featurecache extract``."""
        size = f"{self.file_size / 2**20:.1f} MiB"
        if self.already_complete:
            return (f"{self.path}: already complete ({self.images} images, {self.patches:,} patches, "
                    f"{self.skipped} skipped, {size}); nothing to do")
        resumed = "" if self.computed_patches == self.patches else f" ({self.computed_patches:,} computed now)"
        per_rank = ""
        if self.ranks:
            per_rank = "; per process: " + ", ".join(f"{r} {n / s if s > 0 else 0.0:.1f}"
                                                     for r, (n, s) in enumerate(self.ranks)) + " patches/s"
        return (f"{self.path}: {self.images} images, {self.patches:,} patches{resumed}, {self.skipped} skipped, "
                f"{self.seconds:.1f} s, {self.patches_per_second:.1f} patches/s, {size}{per_rank}")


# --------------------------------------------------------------------------- planning


def _plan_parts(counts: Sequence[int], part_patches: int) -> list:
    """Consecutive images grouped into parts of at least ``part_patches`` patches."""
    parts, cur, n = [], [], 0
    for i, c in enumerate(counts):
        cur.append(i)
        n += c
        if n >= part_patches:
            parts.append(cur)
            cur, n = [], 0
    if cur:
        parts.append(cur)
    return parts


def _dataset_digest(images: ImageSet) -> str:
    h = hashlib.sha256()
    for r in images:
        h.update(f"{r.relpath}|{r.width}|{r.height}|{','.join(r.classes)}|".encode())
        h.update(np.ascontiguousarray(r.boxes, dtype=np.float32).tobytes())
        h.update(np.ascontiguousarray(r.difficult, dtype=bool).tobytes())
        if r.stamp:  # only then: digests of sets without stamps stay as they were
            h.update(f"|{r.stamp}".encode())
    return h.hexdigest()


def feature_settings(backbone: FrozenBackbone, grid: PatchGrid, mode: str) -> dict:
    """What determines the features (a cache's ``feature_settings``; its SHA-256 is the fingerprint)."""
    s = backbone.spec
    return {
        "backbone": s.name,
        "architecture": s.architecture,
        "layer": s.layer,
        "weights_sha256": s.weights_sha256,
        "preprocessing": s.preprocessing.to_dict(),
        "input_size": grid.input_size,
        "mode": mode,
    }


def _versions() -> dict:
    v = {"featurecache": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
         "h5py": h5py.__version__, "numpy": np.__version__, "python": platform.python_version()}
    try:
        import timm

        v["timm"] = timm.__version__
    except ImportError:  # pragma: no cover
        pass
    return v


@dataclass(frozen=True)
class ExtractConfig:
    """How to extract: every option of :func:`extract` but the data set and the output.

    Attributes
    ----------
    split, annotations, classes, layout
        How the data set is read (:func:`featurecache.datasets.read_dataset`).
    backbone : str or FrozenBackbone
        A name for :func:`featurecache.backbones.build_backbone` (with ``layer`` and
        ``weights``), or a built backbone.
    download : bool
        Let the backbone's default weights be downloaded when they are not in the local cache
        (timm, torchvision; :func:`featurecache.backbones.build_backbone`). Off: no network.
    grid : PatchGrid, optional
        Default ``PatchGrid()`` (the paper's nine scales, 224-px input).
    rule : LabelRule, optional
        Default ``LabelRule()``.
    mode : {"crop", "dense"}
        ``"crop"`` (the paper's): every patch is cut out, resized and run through the whole
        network. ``"dense"``: for each scale the image is resized so that a patch becomes
        ``input_size`` pixels (sides rounded to the trunk's stride of 32), the convolutional
        trunk runs once, and each window's feature is pooled from the feature map (the
        network's own average pooling; FC6/FC7 as convolutions for AlexNet/VGG). The windows
        lie on feature cells (:meth:`PatchGrid.dense_layout`) and the stored boxes are their
        exact extent in the original image.
    max_side : int, optional
        Dense mode: the largest trunk input side; larger resized images run in overlapping
        tiles (margin of half the receptive field), which changes nothing beyond float
        rounding. ``None``: no cap.
    batch_size : int, optional
        Patches per forward pass; patches of several images share a batch. Default 16 on
        the CPU (small batches stay in cache: at 224 px they run about 1.7x faster than 64)
        and 256 on CUDA.
    workers : int, optional
        DataLoader worker processes decoding images; default ``min(4, cpu count)``; 0 decodes
        in this process.
    device : {"auto", "cpu", "cuda"} or torch.device
        ``"auto"`` uses CUDA when available (then with float16 autocast and channels-last).
    dtype : {"float16", "float32"}
        Stored feature type.
    compression : {"none", "lzf", "gzip"}
    overwrite : bool
        Replace an existing cache or unfinished run made with other settings.
    strict : bool
        Stop at the first unreadable image instead of skipping and recording it. The work
        committed so far is kept; the same command resumes.
    part_patches : int
        Patches per committed part: the most work a crash can lose. Part of the settings
        (it fixes how batches are formed, hence the exact features).
    max_pixels : int
        Images with more pixels are skipped and recorded before they are decoded (each
        decoded image costs 3 bytes a pixel, in each decoding worker).
    max_patches : int
        Images whose grid has more patches (very thin strips) are skipped and recorded; a
        grid that gives most images more is refused before anything runs.
    runtime : {"auto", "torch", "openvino", "onnxruntime"}
        What runs the backbone (crop mode) or its dense trunk (dense mode; AlexNet/VGG's stays
        torch's) on the CPU (:mod:`featurecache.runtimes`): ``auto`` the fastest installed one
        whose features agree with torch's; torch on CUDA. Part of the resume settings, not of
        the feature fingerprint.
    threads : int, optional
        Intra-op threads (:func:`featurecache.resources.cpu_threads`: default the CPUs this
        process may use).
    progress : bool, optional
        Show a progress bar; default only on a terminal.
    assemble : {"copy", "virtual"}
        How the finished parts become the cache: copied into one self-contained file, or
        mapped by HDF5 virtual datasets onto the part files, kept in ``OUT.<run>.data/`` beside it
        (no copy of the features; the two move together). Read identically.
    """

    split: Optional[str] = None
    annotations: Optional[Union[str, Path]] = None
    classes: Optional[Sequence[str]] = None
    layout: str = "auto"
    backbone: Union[str, FrozenBackbone] = "efficientnet_lite0"
    layer: Optional[str] = None
    weights: Optional[Union[str, Path]] = "default"
    download: bool = False
    grid: PatchGrid = field(default_factory=PatchGrid)
    rule: LabelRule = field(default_factory=LabelRule)
    mode: str = "crop"
    max_side: Optional[int] = DEFAULT_MAX_SIDE
    batch_size: Optional[int] = None
    workers: Optional[int] = None
    device: Union[str, torch.device] = "auto"
    dtype: str = "float16"
    compression: str = "none"
    overwrite: bool = False
    strict: bool = False
    part_patches: int = 2048
    max_pixels: int = MAX_PIXELS
    max_patches: int = MAX_PATCHES
    runtime: str = "auto"
    threads: Optional[int] = None
    progress: Optional[bool] = None
    assemble: str = "copy"

    def __post_init__(self) -> None:
        # A built backbone is taken as it is; a name is a setting like any other.
        check_fields(self, EXTRACT, ExtractError, skip=() if isinstance(self.backbone, str) else ("backbone",))
        # None means the default, as for every other option.
        object.__setattr__(self, "grid", self.grid or PatchGrid())
        object.__setattr__(self, "rule", self.rule or LabelRule())


def extract(dataset: Union[str, Path, ImageSet], out: Union[str, Path], config: Optional[ExtractConfig] = None,
            *, world: Optional[World] = None, **options) -> ExtractResult:
    """Extract and cache the backbone features of every patch of every image.

    Parameters
    ----------
    dataset : path or ImageSet
        A data set root (read with :func:`featurecache.datasets.read_dataset` and the
        ``split``, ``annotations``, ``classes`` and ``layout`` options) or an image set.
    out : path
        The HDF5 cache to write.
    config : ExtractConfig, optional
        All options at once; default ``ExtractConfig()``.
    world : World, optional
        This process's place in a job of several
        (:func:`featurecache.distributed.world_from_env` under torchrun or srun): the processes
        share the work and write one cache. Default one process, wherever it runs: a library
        caller inside a torchrun job (``predict``, the demo) extracts alone.
    **options
        Fields of :class:`ExtractConfig` (``grid``, ``backbone``, ``mode``, ``workers`` ...)
        over those of ``config``.

    Returns
    -------
    ExtractResult

    Raises
    ------
    FeaturecacheError
        Bad data set, backbone or settings; a resume with different settings; a second
        writer; an unreadable image with ``strict=True``.
    """
    t0 = time.perf_counter()
    config = replace(config, **options) if config is not None else ExtractConfig(**options)
    world = world or World()
    with Coordinator(world, rendezvous=Path(out)) as job, _quiet_unless(world.leader):
        return _extract(dataset, Path(out), config, job, t0)


@dataclass(frozen=True)
class _Run:
    """One process's extraction run: what its steps share."""

    images: ImageSet
    net: FrozenBackbone
    config: ExtractConfig
    device: torch.device
    batch_size: int
    runtime: Runtime
    threads: int
    world: World


def _prepare(dataset, out: Path, config: ExtractConfig, world: World) -> _Run:
    """The data set read, the backbone built and placed, the runtime chosen."""
    dev = resolve_device(config.device)
    images = dataset if isinstance(dataset, ImageSet) else read_dataset(
        dataset, layout=config.layout, split=config.split, annotations=config.annotations, classes=config.classes)
    _check_out_is_not_read(out, images, config)
    net = config.backbone if isinstance(config.backbone, FrozenBackbone) else build_backbone(
        config.backbone, layer=config.layer, weights=config.weights, device="cpu", download=config.download)
    net = net.to(dev)
    if config.mode == "dense":
        _check_dense(net, config.grid)
    threads = apply_threads(config.threads)
    runtime = build_runtime(net, config.runtime, input_size=config.grid.input_size, threads=threads, device=dev,
                            dense=config.mode == "dense")
    return _Run(images, net, config, dev, config.batch_size or (256 if dev.type == "cuda" else 16), runtime,
                threads, world)


def _extract(dataset, out: Path, config: ExtractConfig, job: Coordinator, t0: float) -> ExtractResult:
    """:func:`extract` in one process of a job (alone: a job of one): plan, take a share of the parts, assemble."""
    run = _prepare(dataset, out, config, job.world)
    settings = _settings(run)
    counts, skips = plan_patches(run.images.records, config.grid, mode=config.mode, stride=DENSE_STRIDE,
                                 max_patches=config.max_patches, max_pixels=config.max_pixels)
    parts = _plan_parts(counts, config.part_patches)
    # A resume must cut the same parts and compute them with the same runtime (bit-identical
    # parts); a complete file is not compared on these (they do not change its content). The
    # number of processes is neither: any rank computes a part to the same bits.
    plan = hashlib.sha256(json.dumps([counts, [bool(r) for r in skips]]).encode()).hexdigest()
    resume = {"part_plan": plan, "runtime": run.runtime.name}
    _same_everywhere(job, out, settings, resume)
    writer = CacheWriter(out, settings, overwrite=config.overwrite, resume=resume, lead=job.leader)
    with contextlib.ExitStack() as stack:
        # The leader locks the output (a second job is refused) and prepares the parts folder;
        # then every rank knows the same committed parts.
        complete, done = _on_leader(job, lambda: (stack.enter_context(writer).complete, sorted(writer.done_parts)))
        if complete:
            logger.info("%s: already complete with the same settings", out)
            return _result(out, t0, 0, already_complete=True, rank=job.world.rank)
        writer.follow(done)
        clock = StageClock()
        clock.seconds["setup"] = time.perf_counter() - t0
        computed, seconds = _compute_share(run, job, writer, parts, counts, skips, clock)
        with clock("write"):
            _on_leader(job, lambda: _assemble(run, writer, len(parts), settings))
        ranks = job.gather((computed, seconds))
    distributed = job.world.distributed
    result = _result(out, t0, sum(n for n, _ in ranks), rank=job.world.rank, ranks=ranks if distributed else None,
                     stages=dict(clock.seconds))
    logger.info("%s", result.summary())
    return result


def _compute_share(run: _Run, job: Coordinator, writer: CacheWriter, parts: list, counts: list,
                   skips: list, clock: StageClock) -> tuple:
    """This rank's share of the parts not yet committed, computed and committed: ``(patches, seconds)``."""
    todo = [p for p in range(len(parts)) if p not in writer.done_parts]
    size = {p: sum(counts[i] for i in parts[p]) for p in todo}
    mine = share(todo, [size[p] for p in todo], run.world)
    progress = _JobProgress(size, mine, writer.parts_dir, leader=job.leader,
                            quiet=None if run.config.progress is None else not run.config.progress)
    t1 = time.perf_counter()
    try:
        computed = _run_parts(run, writer, parts, mine, counts, skips, progress, clock)
        seconds = time.perf_counter() - t1
        job.barrier(while_waiting=progress.look)  # every part is committed; the bar shows the others'
    finally:
        progress.close()
    return computed, seconds


def _assemble(run: _Run, writer: CacheWriter, num_parts: int, settings: dict) -> None:
    writer.refresh()  # the parts every rank committed
    config = run.config
    writer.assemble(num_parts=num_parts, feature_dim=run.net.feature_dim, dtype=config.dtype,
                    compression=config.compression, images=run.images.records, provenance=_provenance(run, settings),
                    layout=config.assemble)


def _check_out_is_not_read(out: Path, images: ImageSet, config: ExtractConfig) -> None:
    """The cache is never written over an image or annotation file it is made from."""
    try:
        check_not_inputs({"out": out}, {"an image of the data set": [r.path for r in images.records],
                                        "an annotation file": {r.source for r in images.records if r.source},
                                        "the annotations file": config.annotations,
                                        "a file of the data set": images.files_read()})
    except FeaturecacheError as e:
        raise ExtractError(e.message, param=e.param) from None


def _same_everywhere(job: Coordinator, out: Path, settings: dict, resume: dict) -> None:
    """Refuse a job whose processes planned different work (another output, other options, another view
    of the data set, another runtime chosen by ``auto``) before any of them writes: their parts would not
    make one cache, and a rank writing elsewhere than the leader locked would write without a lock."""
    if not job.world.distributed:
        return
    mine = hashlib.sha256(json.dumps([os.path.abspath(out), settings, resume], sort_keys=True,
                                     default=str).encode()).hexdigest()
    others = [r for r, h in enumerate(job.gather(mine)) if h != mine]
    if others:
        raise ExtractError(f"process {job.world.rank} planned other work than process(es) "
                           f"{', '.join(map(str, others))}: the same output, options, data set and runtime are needed "
                           "on every process (--runtime torch avoids a per-machine choice)")


def _on_leader(job: Coordinator, make):
    """``make()`` on the leader; its result on every rank, or its error raised on every rank (one message)."""
    if not job.world.distributed:
        return make()

    def guarded():
        try:
            return False, make()
        except FeaturecacheError as e:
            return True, (type(e), e.message, e.param)

    failed, value = job.from_leader(guarded)
    if failed:
        kind, message, param = value
        raise kind(message, param=param)
    return value


@contextlib.contextmanager
def _quiet_unless(leader: bool):
    """Other ranks than the leader log warnings only (the leader speaks for the job)."""
    if leader:
        yield
        return
    log = logging.getLogger("featurecache")
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        log.setLevel(level)


class _JobProgress:
    """The job's progress bar, on the leader: its own patches as they are computed, the other ranks' as
    their parts are committed (a part file exists only complete). Other ranks show none."""

    def __init__(self, size: dict, mine: list, parts_dir: Path, *, leader: bool, quiet: Optional[bool]) -> None:
        self.others = {p: n for p, n in size.items() if p not in set(mine)}
        self.parts_dir, self.seen, self.checked = parts_dir, set(), 0.0
        # disable=None: tqdm's own rule, shown only on a terminal (a log file gets no bar).
        self.bar = tqdm(total=sum(size.values()), unit="patch", disable=(not leader) or quiet, smoothing=0.1,
                        dynamic_ncols=True, desc="extract")

    def update(self, n: int) -> None:
        self.bar.update(n)
        if self.others and time.monotonic() - self.checked > 2.0:
            self.look()

    def set_postfix_str(self, text: str) -> None:
        self.bar.set_postfix_str(text)

    def look(self) -> None:
        """Count the other ranks' parts committed since the last look (shown only; the barrier synchronises)."""
        self.checked = time.monotonic()
        if self.bar.disable:
            return
        for p in [p for p in self.others if p not in self.seen]:
            if (self.parts_dir / f"part-{p:06d}.h5").exists():
                self.seen.add(p)
                self.bar.update(self.others[p])

    def close(self) -> None:
        self.bar.close()


def _check_dense(net: FrozenBackbone, grid: PatchGrid) -> None:
    if not net.supports_dense:
        raise ExtractError(f"{net.spec.name}: no dense mode for this backbone (efficientnet_lite0, timm CNNs "
                           f"whose pre-logits are a global average, resnet50, alexnet, vgg16); use --mode crop")
    if grid.whole:
        raise ExtractError("--whole-image is a crop-mode grid; use --mode crop")
    if grid.input_size % DENSE_STRIDE or (net.dense_kind == "fc" and grid.input_size != 224):
        raise ExtractError(f"dense mode with {net.spec.name} needs --input-size "
                           + ("224" if net.dense_kind == "fc" else f"a multiple of {DENSE_STRIDE}")
                           + f", got {grid.input_size}")


def _settings(run: _Run) -> dict:
    """Everything that determines the file's content: a resume with other settings is refused."""
    images, config = run.images, run.config
    settings = {
        "dataset": {"root": str(images.root), "layout": images.layout, "split": images.split,
                    "num_images": len(images), "sha256": _dataset_digest(images)},
        "classes": list(images.classes),
        "features": feature_settings(run.net, config.grid, config.mode),
        "grid": config.grid.to_dict(),
        "label_rule": config.rule.to_dict(),
        "storage": {"dtype": config.dtype, "compression": config.compression},
        "batching": {"batch_size": run.batch_size, "part_patches": config.part_patches},
    }
    if config.mode == "dense":
        settings["batching"]["max_side"] = config.max_side
    return settings


def _provenance(run: _Run, settings: dict) -> Provenance:
    """The file's provenance (the schema's own attributes are the cache writer's)."""
    config, dev, world = run.config, run.device, run.world
    crop = config.mode == "crop"
    extraction = {"mode": config.mode,
                  "resize": "roi_align bilinear, adaptive sampling, aligned" if crop
                  else "whole image per scale, bilinear with antialias; windows pooled from the trunk's map",
                  "dtype": config.dtype, "compression": config.compression, "batch_size": run.batch_size,
                  "part_patches": config.part_patches, "max_side": None if crop else config.max_side,
                  "device": str(dev), "mixed_precision": dev.type == "cuda", "runtime": run.runtime.describe(),
                  "threads": run.threads, "processes": world.size, "launcher": world.launcher,
                  "assemble": config.assemble}
    dataset = DatasetSource(**settings["dataset"], annotations=str(config.annotations) if config.annotations else None)
    return Provenance(tuple(run.images.classes), settings["features"], feature_fingerprint(settings["features"]),
                      run.net.spec.to_dict(), config.grid, config.rule, dataset, extraction, _versions(), now_iso())


def _result(out: Path, t0: float, computed: int, *, already_complete: bool = False, rank: int = 0,
            ranks: Optional[list] = None, stages: Optional[dict] = None) -> ExtractResult:
    with FeatureCache(out) as c:
        n_img, n_patch, n_skip = c.num_images, c.num_patches, len(c.skipped)
    size = out.stat().st_size + sum(f.stat().st_size for d in data_folders(out) for f in d.glob("part-*.h5"))
    return ExtractResult(out, n_img, n_patch, n_skip, time.perf_counter() - t0, computed, size,
                         already_complete=already_complete, rank=rank, ranks=ranks, stages=stages)




def _run_parts(run: _Run, writer: CacheWriter, parts: list, todo: list, counts: list, skips: list,
               progress: "_JobProgress", clock: StageClock) -> int:
    """Compute and commit the parts in ``todo``; return the number of patches computed."""
    if not todo:
        return 0
    images, config = run.images, run.config
    workers = config.workers if config.workers is not None else min(4, max(1, available_cpus() // run.world.local_size))
    items = [(i, str(images[i].path), images[i].width, images[i].height, skips[i]) for p in todo for i in parts[p]]
    # Two images in flight per worker: memory stays workers x 2 x max_pixels x 3 bytes at most.
    loader = torch.utils.data.DataLoader(
        Decoder(items, config.max_pixels, displayed=images.layout in DISPLAYED_LAYOUTS), batch_size=1,
        collate_fn=only, num_workers=workers, pin_memory=run.device.type == "cuda",
        prefetch_factor=2 if workers else None)
    computer = PartComputer(images, run.net, config, device=run.device, batch_size=run.batch_size,
                            runtime=run.runtime, planned=counts, clock=clock)
    done_images = sum(len(parts[p]) for p in range(len(parts)) if p not in todo)
    computed, stream = 0, iter(loader)
    try:
        for p in todo:
            data = computer.part(stream, len(parts[p]), progress.update)
            computed += len(data.features)
            with clock("write"):
                writer.write_part(p, data)
            done_images += len(parts[p])
            if not run.world.distributed:  # a job's bar counts every rank's patches; images are this rank's
                progress.set_postfix_str(f"images {done_images}/{len(images)}")
    finally:
        del stream  # its decoding workers end now, not at the next collection
    return computed
