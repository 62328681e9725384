"""Stage one's compute: images decoded in worker processes, patches cropped and run, dense windows pooled.

:class:`PartComputer` turns the images of one committed part into its :class:`~featurecache.cache.PartData`:
images are decoded by :class:`Decoder` in DataLoader workers; in crop mode :class:`PatchRunner` cuts every
patch out on the compute device (one ``roi_align`` call per batch piece: bilinear, adaptive sampling when a
patch shrinks, so anti-aliased) and fills batches with patches of several images, which the runtime's
parallel streams (:attr:`Runtime.streams`) each cut and run whole; in dense mode
:class:`DenseRunner` runs the trunk once per image and scale and pools each window from its map.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from typing import Callable, Iterator, Optional, Protocol, Sequence

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from torchvision.ops import roi_align

from featurecache.backbones import DENSE_STRIDE, FrozenBackbone
from featurecache.cache import PartData
from featurecache.datasets import ImageSet
from featurecache.errors import ExtractError
from featurecache.images import failure, oriented, to_rgb
from featurecache.patches import LabelRule, PatchGrid, image_patches
from featurecache.runtimes import Runtime

logger = logging.getLogger("featurecache.extract")

__all__ = ["Decoder", "DenseRunner", "PartComputer", "PartSettings", "PatchRunner", "StageClock", "iter_batches"]


class StageClock:
    """Seconds this process spent in each step of stage one (``decode wait``, ``prepare``, ``crop``,
    ``resize``, ``forward``, ``pool``, ``write``): where the time goes, so that a step that is not hidden
    behind the network shows (``benchmarks/bench_thousand.py`` prints the shares)."""

    def __init__(self) -> None:
        self.seconds: collections.Counter = collections.Counter()
        self._lock = threading.Lock()  # crop mode's parallel streams clock from their own threads

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t)

    def add(self, stage: str, seconds: float) -> None:
        """Count ``seconds`` more in ``stage``."""
        with self._lock:
            self.seconds[stage] += seconds


class Decoder(torch.utils.data.Dataset):
    """Decodes images in DataLoader workers; a failure is returned, not raised.

    An image whose header declares more than ``max_pixels`` pixels is refused before its
    pixels are decoded (a small, highly compressed file can declare a huge canvas).
    """

    def __init__(self, items: Sequence[tuple], max_pixels: int, *, displayed: bool) -> None:
        self.items = list(items)  # (data set index, path, width, height, reason to skip it or '')
        self.max_pixels = max_pixels
        self.displayed = displayed  # the records describe the images as displayed (their layout's)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        index, path, width, height, skip = self.items[i]
        if skip:
            return index, None, skip
        try:
            if not os.path.isfile(path):  # links followed: a FIFO or a device is never opened
                return index, None, "not a regular file" if os.path.exists(path) else "file not found"
            with Image.open(path) as im:
                w, h = im.size
                if w * h > self.max_pixels:
                    return index, None, f"image is {w}x{h} = {w * h:,} pixels, above max_pixels {self.max_pixels:,}"
                im.load()
                a = to_rgb(oriented(im, size=(width, height), displayed=self.displayed))
        except Exception as e:  # PIL raises many kinds for corrupt files
            return index, None, failure(e, "cannot decode")
        h, w = a.shape[:2]
        if (w, h) != (width, height):
            return index, None, f"image is {w}x{h}, its annotation says {width}x{height}"
        return index, torch.from_numpy(a), ""


def only(batch):
    return batch[0]


#: Decoded pixels a part holds (as float32, 12 bytes each) before its images are run: parts
#: of many images (a whole-image grid puts up to --part-size images in one) stay bounded.
HELD_PIXELS = 32_000_000


def iter_batches(segments: list, batch_size: int) -> Iterator[list]:
    """Fill batches of ``batch_size`` patches from consecutive images' boxes."""
    buf, n = [], 0
    for image, boxes in segments:
        start = 0
        while start < len(boxes):
            take = min(batch_size - n, len(boxes) - start)
            buf.append((image, boxes[start:start + take]))
            n += take
            start += take
            if n == batch_size:
                yield buf
                buf, n = [], 0
    if buf:
        yield buf


class PatchRunner:
    """Crops patches on the device with roi_align and runs the backbone on full batches."""

    def __init__(self, backbone: FrozenBackbone, *, input_size: int, batch_size: int, device: torch.device,
                 out_dtype: np.dtype, runtime: Optional[Runtime] = None, clock: Optional[StageClock] = None) -> None:
        self.backbone = backbone
        self.runtime = runtime or Runtime(backbone)
        self.clock = clock or StageClock()
        self.size = input_size
        self.batch_size = batch_size
        self.device = device
        self.out_dtype = out_dtype
        self.cuda = device.type == "cuda"
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        # Channels-last is faster on CPU too (1.5-2x for EfficientNet-Lite0 with oneDNN).
        self.backbone.to(memory_format=torch.channels_last)

    def crops(self, pieces: list, *, threads: Optional[int] = None) -> torch.Tensor:
        """The batch's patches ``(N, 3, size, size)``, cut out by ``roi_align``.

        On the CPU each piece's boxes are split over ``threads`` threads (default: the intra-op
        threads; a stream of crop mode cuts its batch on its own thread) and cut at once:
        torchvision's CPU ``roi_align`` runs on one core, and each crop is computed alone, so
        the split changes no value.
        """
        threads = 1 if self.cuda else threads or torch.get_num_threads()
        jobs = [(image, part) for image, boxes in pieces for part in boxes.tensor_split(threads) if len(part)]
        if len(jobs) > 1 and threads > 1:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="featurecache-crop")
            out = list(self._pool.map(self._cut, jobs))
        else:
            out = [self._cut(job) for job in jobs]
        return torch.cat(out) if len(out) > 1 else out[0]

    def _cut(self, job: tuple) -> torch.Tensor:
        image, boxes = job
        with torch.inference_mode():  # the pool's threads do not inherit the caller's mode
            return roi_align(image, [boxes], output_size=self.size, spatial_scale=1.0, sampling_ratio=-1,
                             aligned=True)

    @torch.inference_mode()  # also in the streams' threads, which do not inherit the caller's mode
    def _batch(self, pieces: list, stream: Optional[int] = None, clock: Optional[StageClock] = None) -> np.ndarray:
        """One batch's features: its patches cut, then run (on ``stream``, or all of the runtime's)."""
        clock = clock or self.clock
        with clock("crop"):
            x = self.crops(pieces, threads=1 if stream is not None else None)
            x = x.contiguous(memory_format=self.runtime.memory_format)
        with clock("forward"):
            if self.cuda:
                with torch.autocast("cuda", dtype=torch.float16):
                    f = self.backbone(x)
            else:
                f = self.runtime(x) if stream is None else self.runtime.on_stream(x, stream)
            return f.float().cpu().numpy().astype(self.out_dtype, copy=False)

    def _in_streams(self, batches: Iterator[list]) -> Iterator[np.ndarray]:
        """Batches run by the runtime's parallel streams, each cutting and running a whole batch on one
        thread: while one stream cuts, the other computes, and no thread waits at a layer's join."""
        streams, inner, waited = self.runtime.streams, StageClock(), 0.0
        running: collections.deque = collections.deque()

        def oldest() -> np.ndarray:
            nonlocal waited
            t = time.perf_counter()
            try:
                return running.popleft().result()
            finally:
                waited += time.perf_counter() - t

        with concurrent.futures.ThreadPoolExecutor(streams, thread_name_prefix="featurecache-stream") as pool:
            for i, pieces in enumerate(batches):
                if len(running) == streams:  # the oldest holds stream i % streams
                    yield oldest()
                running.append(pool.submit(self._batch, pieces, i % streams, inner))
            while running:
                yield oldest()
        busy = inner.seconds["crop"] + inner.seconds["forward"]
        for stage in ("crop", "forward"):
            self.clock.add(stage, waited * inner.seconds[stage] / busy if busy else 0.0)

    @torch.inference_mode()
    def run(self, segments: list, on_batch=None) -> np.ndarray:
        batches = iter_batches(segments, self.batch_size)
        if self.cuda or self.runtime.streams < 2:
            results = (self._batch(pieces) for pieces in batches)
        else:
            results = self._in_streams(batches)
        feats = []
        for f in results:
            feats.append(f)
            if on_batch is not None:
                on_batch(len(f))
        dim = self.backbone.feature_dim
        return np.concatenate(feats) if feats else np.zeros((0, dim), self.out_dtype)


class DenseRunner:
    """Dense mode: the trunk runs once per image and scale (through ``runtime``'s :meth:`Runtime.trunk`
    on the CPU, torch by default); windows are pooled from its map."""

    def __init__(self, backbone: FrozenBackbone, grid: PatchGrid, *, device: torch.device, out_dtype: np.dtype,
                 max_side: Optional[int] = None, runtime: Optional[Runtime] = None,
                 clock: Optional[StageClock] = None) -> None:
        self.backbone = backbone
        self.runtime = runtime or Runtime(backbone, dense=True)
        self.clock = clock or StageClock()
        self.grid = grid
        self.max_side = max_side
        self.device = device
        self.cuda = device.type == "cuda"
        self.out_dtype = out_dtype
        self.backbone.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def images(self, items: list, *, bucket: Optional[bool] = None, max_batch: int = 16) -> list:
        """Features of all dense windows of several images, each scale by scale, row-major.

        Parameters
        ----------
        items : list of (tensor (1, 3, H, W), width, height)
        bucket : bool, optional
            Run the images whose resized size at a scale is the same as one trunk batch (up
            to ``max_batch``), so that GPU batches stay full. Default: on CUDA only (on the CPU
            one image at a time is as fast and keeps results independent of batching).
        """
        bucket = self.cuda if bucket is None else bucket
        layouts = [self.grid.dense_layout(w, h, stride=DENSE_STRIDE) for _, w, h in items]
        out = [[None] * len(self.grid.scales) for _ in items]
        for si in range(len(self.grid.scales)):
            groups: dict = {}
            for i, lay in enumerate(layouts):
                key = (lay[si][1], lay[si][2]) if bucket else i
                groups.setdefault(key, []).append(i)
            for idxs in groups.values():
                for c in range(0, len(idxs), max_batch if bucket else 1):
                    chunk = idxs[c:c + (max_batch if bucket else 1)]
                    _, rw, rh, _, _ = layouts[chunk[0]][si]
                    with self.clock("resize"):
                        x = torch.cat([F.interpolate(items[i][0], size=(rh, rw), mode="bilinear", antialias=True,
                                                     align_corners=False) for i in chunk])
                        x = x.contiguous(memory_format=self.runtime.memory_format)
                    with self.clock("forward"):
                        fmaps = self._trunk(x)
                    with self.clock("pool"):
                        for b, i in enumerate(chunk):
                            _, _, _, xs, ys = layouts[i][si]
                            fm = fmaps[b]
                            rows, cols = torch.as_tensor(ys, device=fm.device), torch.as_tensor(xs, device=fm.device)
                            picked = fm[:, rows][:, :, cols]
                            out[i][si] = picked.flatten(1).T.float().cpu().numpy()
        return [np.concatenate(o).astype(self.out_dtype, copy=False) for o in out]

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        if self.cuda:
            with torch.autocast("cuda", dtype=torch.float16):
                return self.backbone.dense_features_batch(x, self.grid.input_size, max_side=self.max_side)
        return self.backbone.dense_features_batch(x, self.grid.input_size, max_side=self.max_side,
                                                  trunk=self.runtime.trunk)

    def image(self, image: torch.Tensor, width: int, height: int) -> np.ndarray:
        """Features of all dense windows of one image (1, 3, H, W), scale by scale, row-major."""
        return self.images([(image, width, height)])[0]


class PartSettings(Protocol):
    """What :class:`PartComputer` reads of an :class:`~featurecache.extract.ExtractConfig`."""

    grid: PatchGrid
    rule: LabelRule
    mode: str
    dtype: str
    max_side: Optional[int]
    strict: bool


class PartComputer:
    """The features and labels of parts of a data set, one part at a time, in bounded memory.

    Parameters
    ----------
    images : ImageSet
    net : FrozenBackbone
    config : PartSettings
        The grid, labelling rule, mode, stored dtype, dense ``max_side`` and ``strict``.
    device : torch.device
    batch_size : int
        Patches per forward pass in crop mode.
    runtime : Runtime
        What runs the backbone (crop mode) or its dense trunk (dense mode) on the CPU.
    planned : sequence of int
        Each image's planned patch count (what progress counts for an image that is skipped).
    clock : StageClock, optional
        Where the seconds of each step are added.
    """

    def __init__(self, images: ImageSet, net: FrozenBackbone, config: PartSettings, *, device: torch.device,
                 batch_size: int, runtime: Runtime, planned: Sequence[int], clock: Optional[StageClock] = None) -> None:
        self.images, self.net, self.config, self.device, self.planned = images, net, config, device, planned
        self.dtype = np.dtype(config.dtype)
        self.clock = clock or StageClock()
        self.patches = PatchRunner(net, input_size=config.grid.input_size, batch_size=batch_size, device=device,
                                   out_dtype=self.dtype, runtime=runtime, clock=self.clock)
        self.dense = (DenseRunner(net, config.grid, device=device, out_dtype=self.dtype, max_side=config.max_side,
                                  runtime=runtime, clock=self.clock) if config.mode == "dense" else None)

    def part(self, decoded: Iterator[tuple], size: int, progress: Callable[[int], None]) -> PartData:
        """The next ``size`` images of ``decoded`` (``(index, pixels or None, reason)`` from a
        :class:`Decoder`) as one part; ``progress(n)`` is told of every ``n`` patches done."""
        images, segments, meta, done, held = self.images, [], [], [], 0
        skipped = []  # (index, reason)
        for _ in range(size):
            with self.clock("decode wait"):  # what decoding costs beyond what the workers hide
                index, pixels, reason = next(decoded)
            rec = images[index]
            if pixels is None:
                if self.config.strict:
                    raise ExtractError(f"{rec.path}: {reason} (--strict)")
                logger.warning("%s: %s; skipped", rec.path, reason)
                skipped.append((index, reason))
                progress(self.planned[index])
                continue
            with self.clock("prepare"):  # the image's patches and labels, its pixels as float
                boxes, scales, labels = image_patches(rec, images.class_ids(rec), grid=self.config.grid,
                                                     rule=self.config.rule, mode=self.config.mode)
                image = pixels.to(self.device, non_blocking=True).permute(2, 0, 1).unsqueeze(0).float()
            segments.append((image, rec.width, rec.height) if self.dense is not None
                            else (image, torch.from_numpy(boxes).to(self.device)))
            meta.append((np.full(len(boxes), index, np.int64), boxes, scales, labels))
            held += rec.width * rec.height
            if held > HELD_PIXELS:  # a part of many images: run what is held (decided by the plan)
                self._flush(segments, done, progress)
                held = 0
        self._flush(segments, done, progress)
        return self._part_data(done, meta, skipped)

    def _flush(self, segments: list, done: list, progress: Callable[[int], None]) -> None:
        """Run the images gathered so far and keep only their features (bounded memory)."""
        if not segments:
            return
        if self.dense is not None:
            # All images gathered at once, so that same-size images can share GPU batches.
            feats = self.dense.images(segments)
            done.extend(feats)
            progress(sum(len(f) for f in feats))
        else:
            done.append(self.patches.run(segments, on_batch=progress))
        segments.clear()

    def _part_data(self, done: list, meta: list, skipped: list) -> PartData:
        def joined(i: int, empty: np.ndarray) -> np.ndarray:
            return np.concatenate([m[i] for m in meta]) if meta else empty

        return PartData(
            features=np.concatenate(done) if done else np.zeros((0, self.net.feature_dim), self.dtype),
            label=joined(3, np.zeros(0, np.int16)).astype(np.int16),
            image=joined(0, np.zeros(0, np.int64)),
            box=joined(1, np.zeros((0, 4), np.float32)),
            scale=joined(2, np.zeros(0, np.float32)),
            skipped_index=np.array([i for i, _ in skipped], dtype=np.int64),
            skipped_reason=[r for _, r in skipped],
        )
