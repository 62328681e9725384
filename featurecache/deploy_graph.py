"""The graph ``featurecache export`` writes, as torch modules: one uint8 image to image scores (and maps).

:class:`ExportedModel` computes what ``predict`` computes on one image, in operations that
``torch.onnx.export`` traces into ONNX:

* crop mode: the head's patch grid cut out by ``RoiAlign`` (half-pixel, adaptive sampling:
  torchvision's ``roi_align`` with ``aligned=True``, which extraction uses), the patches through
  the backbone in chunks of :data:`PATCH_CHUNK` (:class:`CropFeatures`; unrolled at a fixed size,
  an ONNX ``Loop`` when dynamic: :func:`for_export`);
* dense mode: per scale, ``predict``'s antialiased bilinear resize as two matrix products (ONNX
  cannot express torch's antialiased resize; the weights are torch's), the normalisation and
  the dense trunk (:class:`ScaleTrunk`), the window means (:class:`Windows`);
* the head (:func:`featurecache.heads.graph.score_module`) on the features rounded as the cache
  stores them;
* optionally the class activation map of :mod:`featurecache.maps` (method ``cam``,
  :class:`CamMaps`): the head's region scores of every trunk cell at the head's scales, their
  log-odds sampled at the map's cells, averaged over scales, through the sigmoid.

At a fixed input size the geometry (patch boxes, resize weights, windows, map sampling) is
computed here once, from the same code ``predict`` runs, and stored as constants. With
``dynamic`` it is computed inside the graph from the image's shape (``Shape``, arithmetic,
``Ceil``/``Round``, ``Range``): the same formulas as :class:`~featurecache.patches.PatchGrid`
in float64, so that the boxes and window starts are exactly the grid's (tests/test_export.py).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import List, Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from featurecache.backbones import DENSE_STRIDE, FrozenBackbone
from featurecache.heads.graph import score_module, sigmoid
from featurecache.heads.trained import TrainedHead
from featurecache.patches import WHOLE_IMAGE_SCALE, PatchGrid
from featurecache.resources import DEFAULT_MAX_SIDE

__all__ = ["CamMaps", "ChunkLoop", "CropFeatures", "ExportedModel", "ScaleTrunk", "Windows", "axis_resize_matrix",
           "crop_geometry", "dense_geometry", "for_export", "map_sampling", "resize_weights",
           "static_padding", "weights_into_loops"]

# Scores are clipped away from 0 and 1 before their log-odds are taken, as featurecache.maps clips them.
_EPS = 1e-6


def axis_resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``(n_in, n_out)`` weights of torch's antialiased bilinear resize along one axis (``align_corners=False``).

    Taken from :func:`torch.nn.functional.interpolate` itself on the rows of an identity
    matrix: the resize is separable and linear, so a ``(H, W)`` image resized to ``(h, w)`` is
    ``R_h.T @ image @ R_w``.
    """
    eye = torch.eye(n_in, dtype=torch.float32).reshape(n_in, 1, 1, n_in)
    return F.interpolate(eye, size=(1, n_out), mode="bilinear", antialias=True,
                         align_corners=False).reshape(n_in, n_out).contiguous()


def _arange(n: torch.Tensor) -> torch.Tensor:
    """``0, 1, ..., n - 1`` as float64, ``n`` a tensor (a traced ``Range``)."""
    return torch.arange(n.to(torch.int64).reshape(())).to(torch.float64)


def resize_weights(n_in: torch.Tensor, n_out: torch.Tensor) -> torch.Tensor:
    """:func:`axis_resize_matrix` computed from sizes given as tensors (a dynamic graph's resizes).

    torch's antialiased bilinear filter (``aten/src/ATen/native/cpu/UpSampleKernel.cpp``), with its
    float32 and float64 steps (computed in float64 throughout, the weights differed from torch's by
    1.3e-5; with them, by at most one float32 rounding): output ``i`` has its centre at
    ``scale · (i + 0.5)`` input pixels, ``scale = n_in / n_out``; input ``j`` weighs
    ``max(0, 1 - |j + 0.5 - centre| / support)`` with ``support = max(scale, 1)``, normalised over
    ``j``. (torch bounds ``j`` to a window that holds every non-zero weight.)
    """
    f32, f64 = torch.float32, torch.float64
    scale = n_in.to(f32) / n_out.to(f32)
    support = torch.clamp(scale, min=1.0)
    inverse = (1.0 / support.to(f64)).to(f32)
    centre = (scale.to(f64) * (_arange(n_out) + 0.5)).to(f32)
    offset = ((_arange(n_in).to(f32)[:, None] - centre[None, :]).to(f64) + 0.5) * inverse.to(f64)
    w = torch.clamp(1.0 - torch.abs(offset.to(f32)), min=0.0)
    return w / w.sum(dim=0, keepdim=True)


def _positions(length: torch.Tensor, side: torch.Tensor, min_overlap: float) -> torch.Tensor:
    """:func:`featurecache.patches._positions` on float64 tensors: the same operations, so the same values."""
    max_stride = side * (1.0 - min_overlap) / (1.0 + min_overlap)
    n = torch.ceil((length - side) / max_stride - 1e-9) + 1
    n = torch.where(length <= side * (1 + 1e-9), torch.ones_like(n), n)
    i = _arange(n)
    step = (length - side) / torch.clamp(n - 1, min=1.0)
    # numpy's linspace: i · step, and the last one the end itself.
    return torch.where((i == n - 1) & (n > 1), length - side, i * step)


def _grid_of(a: torch.Tensor, b: torch.Tensor) -> tuple:
    """Row-major ``(a, b)`` pairs of two 1-d tensors (``b`` outer, ``a`` inner), flattened: numpy's
    ``meshgrid(a, b)`` raveled, with sizes known at run time only."""
    return (a[None, :] + 0.0 * b[:, None]).reshape(-1), (b[:, None] + 0.0 * a[None, :]).reshape(-1)


def crop_geometry(height: torch.Tensor, width: torch.Tensor, grid: PatchGrid) -> tuple:
    """``(boxes (N, 4) float32, scales (N,) float32)``: :meth:`PatchGrid.boxes_and_scales` of a
    ``width x height`` image given as tensors."""
    h, w = height.to(torch.float64), width.to(torch.float64)
    if grid.whole:
        box = torch.stack([h * 0, h * 0, w, h])[None]
        return box.to(torch.float32), torch.full((1,), WHOLE_IMAGE_SCALE, dtype=torch.float32)
    boxes, scales = [], []
    for lam in grid.scales:
        side = torch.minimum(w, h) / lam
        x0, y0 = _grid_of(_positions(w, side, grid.min_overlap), _positions(h, side, grid.min_overlap))
        boxes.append(torch.stack([x0, y0, torch.minimum(x0 + side, w), torch.minimum(y0 + side, h)], dim=1))
        scales.append(torch.zeros_like(x0, dtype=torch.float32) + np.float32(lam))
    return torch.cat(boxes).to(torch.float32), torch.cat(scales)


def _starts(n_cells: torch.Tensor, k: int, c: int) -> torch.Tensor:
    """Window starts in cells (int64): every ``c`` cells, the last one snapped to ``n_cells - k``
    (:meth:`PatchGrid.dense_layout`)."""
    last = n_cells - k
    n = torch.div(last, c, rounding_mode="floor") + 1 + (torch.remainder(last, c) != 0).to(torch.int64)
    return torch.minimum(torch.arange(n.reshape(())) * c, last)


def dense_geometry(height: torch.Tensor, width: torch.Tensor, grid: PatchGrid, stride: int = DENSE_STRIDE) -> list:
    """:meth:`PatchGrid.dense_layout` of a ``width x height`` image given as tensors: per scale
    ``(λ, resized width, resized height, xs, ys)``, the sizes as int64 tensors."""
    h, w = height.to(torch.float64), width.to(torch.float64)
    k = grid.input_size // stride
    c = max(1, int(np.floor(k * (1 - grid.min_overlap) / (1 + grid.min_overlap) + 1e-9)))
    out = []
    for lam in grid.scales:
        f = grid.input_size * lam / torch.minimum(w, h)
        # torch.round and ONNX Round round half to even, as Python's round does.
        rw = torch.clamp(torch.round(w * f / stride) * stride, min=grid.input_size).to(torch.int64)
        rh = torch.clamp(torch.round(h * f / stride) * stride, min=grid.input_size).to(torch.int64)
        out.append((lam, rw, rh, _starts(torch.div(rw, stride, rounding_mode="floor"), k, c),
                    _starts(torch.div(rh, stride, rounding_mode="floor"), k, c)))
    return out


def map_sampling(size: torch.Tensor, resized: torch.Tensor, cells: torch.Tensor, stride: int,
                 centre: float) -> torch.Tensor:
    """``(map cells, trunk cells)`` float32: the bilinear weights with which :func:`featurecache.maps._sample`
    samples a trunk cell map at the map's cell centres along one axis (``grid_sample``, ``align_corners=True``,
    edges held), for an image side ``size`` resized to ``resized`` pixels with ``cells`` trunk cells."""
    size, resized, cells = (v.to(torch.float64) for v in (size, resized, cells))
    starts = _arange(torch.ceil(size / stride)) * stride
    points = (starts + torch.minimum(starts + stride, size)) / 2 * resized / size
    index = torch.minimum(torch.clamp((points - centre) / DENSE_STRIDE, min=0.0), cells - 1)
    low = torch.floor(index)
    frac = (index - low)[:, None]
    j = _arange(cells)[None, :]
    w = torch.where(j == low[:, None], 1.0 - frac, 0.0 * frac) + torch.where(j == low[:, None] + 1, frac, 0.0 * frac)
    return w.to(torch.float32)


#: Patches a fixed-size crop-mode graph runs through the backbone at once.
PATCH_CHUNK = 64


class CropFeatures(nn.Module):
    """Crop mode: the grid's patches of a ``(1, 3, H, W)`` image cut out by RoiAlign, through the backbone.

    ``size`` ``(width, height)`` fixes the boxes as constants; ``None`` computes them from the image.
    """

    def __init__(self, backbone: FrozenBackbone, grid: PatchGrid, size: Optional[tuple]) -> None:
        super().__init__()
        self.backbone, self.grid, self.size = backbone, grid, int(grid.input_size)
        self.dynamic = size is None
        boxes, scales = grid.boxes_and_scales(*size) if size else (np.zeros((0, 4)), np.zeros(0))
        self.register_buffer("boxes", torch.from_numpy(np.asarray(boxes, np.float32)))
        self.register_buffer("scales", torch.from_numpy(np.asarray(scales, np.float32)))

    def geometry(self, hw: Optional[torch.Tensor] = None) -> tuple:
        """``(boxes (N, 4), scales (N,))`` of the grid on an image of ``hw`` (constants at a fixed size)."""
        return crop_geometry(hw[0], hw[1], self.grid) if self.dynamic else (self.boxes, self.scales)

    def chunk(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """The backbone's features ``(n, D)`` of the patches ``boxes`` of the image ``x``."""
        from torchvision.ops import roi_align

        crops = roi_align(x, [boxes], output_size=self.size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        return self.backbone(crops)

    def forward(self, x: torch.Tensor, hw: Optional[torch.Tensor] = None) -> tuple:
        boxes, scales = self.geometry(hw)
        # The patches run over chunks (unrolled in a fixed-size graph; a dynamic one loops, see
        # :func:`for_export`), so that the model, and tracing it, hold one chunk's activations, not those
        # of every patch of the image (GBs at the paper's grid).
        chunks = boxes.split(PATCH_CHUNK) if not self.dynamic else [boxes]
        return torch.cat([self.chunk(x, b) for b in chunks]) if len(chunks) > 1 else self.chunk(x, boxes), scales


class ScaleTrunk(nn.Module):
    """Per scale of ``grid``: the image resized as dense extraction resizes it (antialiased bilinear, as two
    matrix products), then the dense trunk's cell map ``(1, D, rows, columns)``.

    At a fixed ``size`` the resize matrices are torch's own (:func:`axis_resize_matrix`) and the trunk is
    tiled beyond ``max_side`` as extraction tiles it; dynamic, they are computed in the graph
    (:func:`resize_weights`) and the trunk runs untiled (the same map up to float rounding).
    """

    def __init__(self, backbone: FrozenBackbone, grid: PatchGrid, size: Optional[tuple], max_side: int) -> None:
        super().__init__()
        self.backbone, self.grid, self.max_side = backbone, grid, int(max_side)
        self.dynamic = size is None
        self.rows, self.columns, self.layout = nn.ParameterList(), nn.ParameterList(), []
        if size:
            width, height = size
            self.layout = grid.dense_layout(width, height, stride=DENSE_STRIDE)
            for _, rw, rh, _, _ in self.layout:
                self.rows.append(nn.Parameter(axis_resize_matrix(height, rh).T.contiguous(), requires_grad=False))
                self.columns.append(nn.Parameter(axis_resize_matrix(width, rw), requires_grad=False))

    def forward(self, x: torch.Tensor, hw: Optional[torch.Tensor] = None) -> list:
        """``[(cell map, resized width, resized height)]`` per scale (the sizes ints, or tensors when dynamic)."""
        layout = dense_geometry(hw[0], hw[1], self.grid) if self.dynamic else self.layout
        out = []
        for i, (_, rw, rh, _, _) in enumerate(layout):
            if self.dynamic:
                rows, columns = resize_weights(hw[0], rh).T, resize_weights(hw[1], rw)
            else:
                rows, columns = self.rows[i], self.columns[i]
            resized = torch.matmul(torch.matmul(rows, x[0]), columns)[None]
            fmap = self.backbone.cell_features(resized, max_side=None if self.dynamic else self.max_side)
            out.append((fmap, rw, rh))
        return out


class Windows(nn.Module):
    """Dense mode: the windows of the grid pooled from each scale's cell map (the window mean, or the cell
    itself for FC trunks, as :meth:`FrozenBackbone.dense_features_batch`), ``(P, D)`` and each one's λ."""

    def __init__(self, backbone: FrozenBackbone, grid: PatchGrid, size: Optional[tuple]) -> None:
        super().__init__()
        self.grid, self.pool = grid, backbone.dense_kind != "fc"
        self.k = grid.input_size // DENSE_STRIDE
        self.dynamic = size is None
        self.starts = [] if self.dynamic else [
            (torch.from_numpy(np.asarray(ys)), torch.from_numpy(np.asarray(xs)))
            for _, _, _, xs, ys in grid.dense_layout(*size, stride=DENSE_STRIDE)]
        _, scales = grid.dense_boxes_and_scales(*size, stride=DENSE_STRIDE) if size else (None, np.zeros(0))
        self.register_buffer("scales", torch.from_numpy(np.asarray(scales, np.float32)))

    def forward(self, cells: list, hw: torch.Tensor) -> tuple:
        if self.dynamic:
            starts = [(ys, xs) for _, _, _, xs, ys in dense_geometry(hw[0], hw[1], self.grid)]
        else:
            starts = self.starts
        out, scales = [], []
        for (fmap, _, _), (ys, xs), lam in zip(cells, starts, self.grid.scales):
            fm = F.avg_pool2d(fmap, kernel_size=self.k, stride=1)[0] if self.pool else fmap[0]
            windows = fm.index_select(1, ys).index_select(2, xs).flatten(1).T
            out.append(windows)
            scales.append(torch.zeros_like(windows[:, 0]) + np.float32(lam))
        return torch.cat(out), (torch.cat(scales) if self.dynamic else self.scales)


class CamMaps(nn.Module):
    """The ``cam`` map of :class:`featurecache.maps.Localizer`: ``(rows, columns, C)`` float32 in [0, 1].

    Each scale's trunk cells are scored by the head (its module's ``regions``), clipped, turned into
    log-odds and sampled bilinearly at the centres of the map's ``stride``-pixel cells (two matrix
    products, :func:`map_sampling`); the log-odds are averaged over the scales and put through the
    sigmoid. At a fixed size the sampling weights are constants (folded at export).
    """

    def __init__(self, scorer: nn.Module, stride: int, centre: float) -> None:
        super().__init__()
        self.scorer, self.stride, self.centre = scorer, int(stride), float(centre)

    def forward(self, cells: list, hw: torch.Tensor) -> torch.Tensor:
        total = None
        for fmap, rw, rh in cells:
            d = fmap.shape[1]  # the feature dimension: a constant of the backbone
            shape = torch._shape_as_tensor(fmap)
            probs = torch.clamp(self.scorer.regions(fmap[0].reshape(d, -1).T).to(torch.float64), _EPS, 1 - _EPS)
            logit = (torch.log(probs) - torch.log(1.0 - probs)).to(torch.float32)
            # (C, trunk rows, columns): sizes read from a traced shape stay dynamic in the graph
            logit = logit.T.reshape(-1, fmap.shape[2], fmap.shape[3])
            rows = map_sampling(hw[0], torch.as_tensor(rh), shape[2], self.stride, self.centre)
            columns = map_sampling(hw[1], torch.as_tensor(rw), shape[3], self.stride, self.centre)
            here = torch.matmul(torch.matmul(rows, logit), columns.T)
            total = here if total is None else total + here
        return sigmoid(total / len(cells)).permute(1, 2, 0)


class ExportedModel(nn.Module):
    """One image ``(H, W, 3)`` uint8 to the head's image scores ``(C,)`` float32, as ``predict`` scores it
    (and, with ``maps``, its cam map ``(rows, columns, C)`` as :class:`featurecache.maps.Localizer` makes it).

    Parameters
    ----------
    head : TrainedHead
    backbone : FrozenBackbone
        The head's backbone (:meth:`Recipe.build_backbone`).
    size : (int, int) or None
        ``(width, height)`` the graph is made for; ``None``: any size (computed in the graph).
    maps : bool
        Also output the cam map.
    stride : int
        The map's cell size in pixels.
    """

    def __init__(self, head: TrainedHead, backbone: FrozenBackbone, size: Optional[tuple], *, maps: bool = False,
                 stride: int = 8) -> None:
        super().__init__()
        recipe = head.new_images_recipe()
        grid, self.dense, self.dynamic = recipe.grid, recipe.mode == "dense", size is None
        self.backbone_name, self.example_side = backbone.spec.name, grid.input_size
        max_side = recipe.run.get("max_side") or DEFAULT_MAX_SIDE
        if self.dense:
            self.trunk = ScaleTrunk(backbone, grid, size, max_side)
            self.features = Windows(backbone, grid, size)
            scales = self.features.scales
        else:
            self.features = CropFeatures(backbone, grid, size)
            scales = self.features.scales
        self.half = str(recipe.run.get("dtype", "float16")) == "float16"
        # Dynamic: the scales of the image's patches come with its features; these name the levels.
        levels = [WHOLE_IMAGE_SCALE] if grid.whole else grid.scales
        self.scores = score_module(head, scales.numpy() if size else np.asarray(levels, np.float32))
        self.num_patches = len(scales) if size else None
        self.maps = None
        if maps:  # the cam map's scales are the head's grid's (MapConfig's default), whole grids at λ = 1
            map_grid = replace(grid, scales=(1.0,) if grid.whole else grid.scales, whole=False)
            self.map_trunk = None if self.dense else ScaleTrunk(backbone, map_grid, size, DEFAULT_MAX_SIDE)
            self.maps = CamMaps(self.scores, stride, backbone.cell_centre)
        self.eval()

    def forward(self, image: torch.Tensor):
        x, hw = self.prepare(image)
        cells = self.trunk(x, hw) if self.dense else None
        f, scales = self.features(cells, hw) if self.dense else self.features(x, hw)
        return self.finish(x, hw, f, scales, cells)

    def prepare(self, image: torch.Tensor) -> tuple:
        """``(x (1, 3, H, W) float32, hw (2,) int64)`` of the uint8 image ``(H, W, 3)``."""
        x = image.permute(2, 0, 1).unsqueeze(0).float()
        return x, torch._shape_as_tensor(image)[:2] if self.dynamic else torch.tensor(image.shape[:2])

    def finish(self, x: torch.Tensor, hw: torch.Tensor, f: torch.Tensor, scales: torch.Tensor,
               cells: Optional[list] = None):
        """The outputs from the image's patch features ``f`` and their ``scales``."""
        if self.half:  # the cache stores float16: what the head is given
            f = f.half().float()
        scores = self.scores(f, None if not self.dynamic else scales).float()
        if self.maps is None:
            return scores
        return scores, self.maps(cells if self.dense else self.map_trunk(x, hw), hw)


class _Method(nn.Module):
    """One method of a module as a module of its own, to trace it alone."""

    def __init__(self, module: nn.Module, method: str) -> None:
        super().__init__()
        self.module, self.method = module, method

    def forward(self, *args):
        return getattr(self.module, self.method)(*args)


class _CropStart(nn.Module):
    """A dynamic crop model's first part: the image to ``(x, hw, boxes, scales)``."""

    def __init__(self, model: ExportedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple:
        x, hw = self.model.prepare(image)
        return (x, hw) + tuple(self.model.features.geometry(hw))


class ChunkLoop(nn.Module):
    """The features of any number of patches, ``size`` at a time: a loop in the graph (ONNX ``Loop``)."""

    def __init__(self, chunk: nn.Module, size: int) -> None:
        super().__init__()
        self.chunk, self.size = chunk, int(size)

    def forward(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        out: List[torch.Tensor] = []
        for start in range(0, boxes.shape[0], self.size):
            out.append(self.chunk(x, boxes[start:start + self.size]))
        return torch.cat(out)


class _Looped(nn.Module):
    """A dynamic crop model as its traced parts around the scripted :class:`ChunkLoop`."""

    def __init__(self, start: nn.Module, loop: nn.Module, finish: nn.Module) -> None:
        super().__init__()
        self.start, self.loop, self.finish = start, loop, finish

    def forward(self, image: torch.Tensor):
        x, hw, boxes, scales = self.start(image)
        return self.finish(x, hw, self.loop(x, boxes), scales)


def static_padding(net: nn.Module, example: torch.Tensor) -> nn.Module:
    """``net``, or a copy of it whose TF-"same" convolutions (timm's ``Conv2dSame``) pad by the constants of
    ``example``'s size (a crop: the backbone's input size, always the same).

    Traced, such a convolution computes its padding from its input's shape (``Shape``, arithmetic, ``Pad``).
    A fixed-size graph folds that into constants, which ONNX Runtime fuses into the convolution; in a
    ``Loop``'s body it stays, and the explicit ``Pad`` with the layout changes around it took 1.8 s of
    4.9 s an image at the paper's grid (measured with ONNX Runtime's profiler).
    """
    try:
        from timm.layers.conv2d_same import Conv2dSame, pad_same_arg
    except ImportError:  # no timm, or one that names them otherwise: the padding stays computed
        return net
    if not any(type(m) is Conv2dSame for m in net.modules()):
        return net
    net = copy.deepcopy(net)
    sizes = {}
    hooks = [m.register_forward_pre_hook(lambda m, args: sizes.__setitem__(m, tuple(args[0].shape[-2:])))
             for m in net.modules() if type(m) is Conv2dSame]
    with torch.no_grad():
        net(example)
    for h in hooks:
        h.remove()
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if child in sizes:
                pads = pad_same_arg(list(sizes[child]), list(child.weight.shape[-2:]), child.stride, child.dilation)
                conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, 0,
                                 child.dilation, child.groups, child.bias is not None)
                conv.weight, conv.bias = child.weight, child.bias
                setattr(parent, name, nn.Sequential(nn.ZeroPad2d(pads), conv))
    return net


def for_export(model: ExportedModel, example: torch.Tensor) -> nn.Module:
    """What ``torch.onnx.export`` is given for ``model``: itself, or for a dynamic crop model, whose number of
    patches is known at run time only, a script module whose backbone loops over chunks of
    :data:`PATCH_CHUNK` patches, so that the model (and its export) holds one chunk's activations.

    The parts around the loop are traced on ``example`` (a uint8 image) as the exporter traces ``model``,
    the loop is scripted (the exporter turns it into ``Loop``), and so is the whole.
    """
    if model.dense or not model.dynamic:
        return model
    features = model.features
    with torch.no_grad():
        start = torch.jit.trace(_CropStart(model), (example,), check_trace=False)
        x, hw, boxes, scales = start(example)
        side = features.size
        looped = CropFeatures(static_padding(features.backbone, torch.zeros(1, 3, side, side)), features.grid, None)
        chunk = torch.jit.trace(_Method(looped, "chunk"), (x, boxes[:PATCH_CHUNK]), check_trace=False)
        loop = torch.jit.script(ChunkLoop(chunk, PATCH_CHUNK))
        finish = torch.jit.trace(_Method(model, "finish"), (x, hw, loop(x, boxes), scales), check_trace=False)
    return torch.jit.script(_Looped(start, loop, finish))


def _reads(graph) -> set:
    """The names the nodes of an ONNX ``graph`` (and of its nodes' subgraphs) read."""
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                names |= _reads(sub)
    return names


def weights_into_loops(model) -> None:
    """Give each ``Loop`` of the ONNX ``model`` (a ``ModelProto``, changed in place) the weights its body reads.

    ONNX Runtime takes a body's outer-scope initializers for run-time values: it neither pre-packs nor
    re-lays out the convolutions that read them, and the looped backbone ran 1.7x slower (16.1-16.8 s vs
    9.2-9.8 s an image at the paper's grid, measured). Weights only the loop reads move into its body;
    those the main graph reads too (the cam maps' trunk of a crop model) are stored in both.
    """
    weights = {w.name: w for w in model.graph.initializer}
    loops = [n for n in model.graph.node if n.op_type == "Loop"]
    outside = {name for n in model.graph.node if n.op_type != "Loop" for name in n.input}
    moved = set()
    for loop in loops:
        body = next(a.g for a in loop.attribute if a.name == "body")
        for name in sorted(_reads(body) & set(weights)):
            body.initializer.append(weights[name])
            moved.add(name)
    keep = [w for w in model.graph.initializer if w.name not in moved or w.name in outside]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
