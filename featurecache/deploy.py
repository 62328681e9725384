"""``featurecache export``: a trained head and its frozen backbone as one ONNX model, image in, scores out.

The graph takes one RGB image as a uint8 tensor ``(H, W, 3)`` of a fixed size (the
``input_size`` it was exported for; a consumer resizes its images to that size first) and
returns the head's per-class image scores ``(C,)`` float32, computed as ``predict`` computes
them on an image of that size:

* crop mode: the head's patch grid for ``W x H`` (boxes computed here, constants of the graph)
  cut out by ONNX ``RoiAlign`` (half-pixel, adaptive sampling: torchvision's ``roi_align`` with
  ``aligned=True``, equal to it), the backbone with its normalisation on every patch;
* dense mode: per scale, the antialiased bilinear resize of ``predict`` as two matrix products
  (the weights are torch's, taken from ``F.interpolate`` itself, since ONNX cannot express
  torch's antialiased resize), the normalisation, the dense trunk, the window means;
* the features rounded to the cache's stored precision (float16 by default), as ``predict``
  reads them back from its temporary cache;
* the head and its image-score rule (:func:`featurecache.heads.graph.score_module`).

What a consumer needs is in the model's metadata (:data:`METADATA_KEYS`). ``--check``
(:func:`check_export`) runs the model with ONNX Runtime and ``predict`` on the same pixels and
compares the scores. The input size is fixed: the number of patches and their boxes follow
from the image size by the grid's rounding, which a static graph cannot express (no
``--dynamic``).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from featurecache import __version__
from featurecache.backbones import DENSE_STRIDE, FrozenBackbone
from featurecache.errors import BackboneError, ExportError, HeadError
from featurecache.heads.graph import score_module
from featurecache.heads.trained import TrainedHead
from featurecache.outputs import check_not_inputs, check_output, write_bytes
from featurecache.patches import MAX_PATCHES
from featurecache.resources import DEFAULT_MAX_SIDE

__all__ = ["CHECK_TOLERANCE", "METADATA_KEYS", "MIN_PATCH_SIDE", "CheckResult", "ExportResult", "ExportedModel",
           "check_export", "export", "read_metadata"]

#: ONNX operator set of the exported graph (RoiAlign's half-pixel mode needs 16).
OPSET = 17

#: Smallest patch side, in pixels of the exported input size, that an export accepts.
MIN_PATCH_SIDE = 8

#: Largest difference ``--check`` accepts between the model's scores and ``predict``'s, relative to
#: the score scale (the largest score magnitude, at least 1e-3).
CHECK_TOLERANCE = 1e-4

#: The model's metadata (ONNX ``metadata_props``), each a string: what a consumer reads.
METADATA_KEYS = {
    "featurecache.classes": "JSON list of the class names, in the order of the scores",
    "featurecache.scores": "what a score means",
    "featurecache.probabilities": "'true' when scores are probabilities, else 'false' (ranking scores)",
    "featurecache.threshold": "the default threshold of a label (predict's), '' when there is none",
    "featurecache.input": "JSON: name, layout (HWC), dtype (uint8), channels (RGB), width, height",
    "featurecache.version": "the featurecache version that exported it",
    "featurecache.head": "JSON: the head's provenance (objective, kind, scoring, features, recipe, training)",
}


def axis_resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``(n_in, n_out)`` weights of torch's antialiased bilinear resize along one axis (``align_corners=False``).

    Taken from :func:`torch.nn.functional.interpolate` itself on the rows of an identity
    matrix: the resize is separable and linear, so a ``(H, W)`` image resized to ``(h, w)`` is
    ``R_h.T @ image @ R_w``.
    """
    eye = torch.eye(n_in, dtype=torch.float32).reshape(n_in, 1, 1, n_in)
    return F.interpolate(eye, size=(1, n_out), mode="bilinear", antialias=True,
                         align_corners=False).reshape(n_in, n_out).contiguous()


class CropFeatures(nn.Module):
    """Crop mode: the grid's patches of a ``(1, 3, H, W)`` image cut out by RoiAlign, through the backbone."""

    def __init__(self, backbone: FrozenBackbone, boxes: np.ndarray, input_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.size = int(input_size)
        self.register_buffer("boxes", torch.from_numpy(np.asarray(boxes, np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import roi_align

        crops = roi_align(x, [self.boxes], output_size=self.size, spatial_scale=1.0, sampling_ratio=-1,
                          aligned=True)
        return self.backbone(crops)


class DenseFeatures(nn.Module):
    """Dense mode: per scale, the image resized (antialiased, as matrix products), the trunk, the windows."""

    def __init__(self, backbone: FrozenBackbone, layout: list, width: int, height: int, input_size: int,
                 max_side: int) -> None:
        super().__init__()
        self.backbone, self.input_size, self.max_side = backbone, int(input_size), int(max_side)
        self.rows, self.columns = nn.ParameterList(), nn.ParameterList()
        self.windows = []
        for _, rw, rh, xs, ys in layout:
            self.rows.append(nn.Parameter(axis_resize_matrix(height, rh).T.contiguous(), requires_grad=False))
            self.columns.append(nn.Parameter(axis_resize_matrix(width, rw), requires_grad=False))
            self.windows.append((torch.from_numpy(np.asarray(ys)), torch.from_numpy(np.asarray(xs))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for rows, columns, (ys, xs) in zip(self.rows, self.columns, self.windows):
            resized = torch.matmul(torch.matmul(rows, x[0]), columns)[None]
            fm = self.backbone.dense_features_batch(resized, self.input_size, max_side=self.max_side)[0]
            out.append(fm[:, ys][:, :, xs].flatten(1).T)
        return torch.cat(out)


class ExportedModel(nn.Module):
    """One image ``(H, W, 3)`` uint8 to the head's image scores ``(C,)`` float32, as ``predict`` scores it.

    Parameters
    ----------
    head : TrainedHead
    backbone : FrozenBackbone
        The head's backbone (:meth:`Recipe.build_backbone`).
    width, height : int
        The input size the graph is made for.
    """

    def __init__(self, head: TrainedHead, backbone: FrozenBackbone, width: int, height: int) -> None:
        super().__init__()
        recipe = head.new_images_recipe()
        grid = recipe.grid
        if recipe.mode == "dense":
            layout = grid.dense_layout(width, height, stride=DENSE_STRIDE)
            _, scales = grid.dense_boxes_and_scales(width, height, stride=DENSE_STRIDE)
            self.features = DenseFeatures(backbone, layout, width, height, grid.input_size,
                                          recipe.run.get("max_side") or DEFAULT_MAX_SIDE)
        else:
            boxes, scales = grid.boxes_and_scales(width, height)
            self.features = CropFeatures(backbone, boxes, grid.input_size)
        self.half = str(recipe.run.get("dtype", "float16")) == "float16"
        self.scores = score_module(head, scales)
        self.num_patches = len(scales)
        self.eval()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(2, 0, 1).unsqueeze(0).float()
        f = self.features(x)
        if self.half:  # the cache stores float16: what the head is given
            f = f.half().float()
        return self.scores(f).float()


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote.

    Attributes
    ----------
    path : Path
    width, height : int
    patches : int
        Patches (crop) or windows (dense) of an image of that size.
    classes : tuple of str
    mode : str
    seconds : float
    """

    path: Path
    width: int
    height: int
    patches: int
    classes: tuple
    mode: str
    seconds: float
    check: Optional["CheckResult"] = None

    def to_text(self) -> str:
        line = (f"exported {self.path}: {self.width}x{self.height} uint8 RGB image (H, W, 3) -> {len(self.classes)} "
                f"class scores; {self.mode} mode, {self.patches} patches; {self.seconds:.1f} s")
        return line + ("\n" + self.check.to_text() if self.check is not None else "")


def _load(head: Union[str, Path, TrainedHead]) -> tuple:
    """``(TrainedHead, source name, recipe)``; an old head file or an unreadable one as ExportError."""
    source = "head" if isinstance(head, TrainedHead) else str(head)
    try:
        trained = head if isinstance(head, TrainedHead) else TrainedHead.load(head, device="cpu")
        return trained, source, trained.new_images_recipe()
    except HeadError as e:
        raise ExportError(f"{source}: {e.message}") from None


def check_input_size(recipe, width: int, height: int) -> None:
    """Refuse an input size the grid cannot be exported at: patches under :data:`MIN_PATCH_SIDE` pixels,
    or more than :data:`~featurecache.patches.MAX_PATCHES` of them."""
    grid = recipe.grid
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise ExportError(f"must be two positive whole numbers of pixels, got {width}x{height}", param="input_size")
    smallest = min(width, height) / (1.0 if grid.whole else max(grid.scales))
    if smallest < MIN_PATCH_SIDE:
        raise ExportError(f"{width}x{height} is too small for the head's grid: its finest scale "
                          f"{max(grid.scales):g} makes patches of {smallest:.1f} px; at least {MIN_PATCH_SIDE} px "
                          f"needs a short side of {int(np.ceil(MIN_PATCH_SIDE * max(grid.scales)))} px",
                          param="input_size")
    n = grid.count(width, height, mode=recipe.mode, stride=DENSE_STRIDE)
    if n > MAX_PATCHES:
        raise ExportError(f"{width}x{height} gives {n:,} patches, above {MAX_PATCHES:,}; export a smaller size",
                          param="input_size")


def _provenance(head: TrainedHead, recipe, source: str) -> dict:
    label, text = head.scoring()
    record = {"objective": head.objective, "kind": head.kind, "scoring": text, "scoring_label": label,
              "feature_settings": head.feature_settings, "fingerprint": head.fingerprint,
              "recipe": recipe.to_record(), "source": Path(source).name if source != "head" else None,
              "training": {k: v for k, v in head.summary.items() if k != "selection"}}
    if "selection" in head.summary:
        record["selection"] = head.selection_line()
    if source != "head" and Path(source).is_file():
        record["source_sha256"] = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    return record


def _metadata(head: TrainedHead, recipe, source: str, width: int, height: int) -> dict:
    probabilities = bool(head.spec.probabilities)
    return {
        "featurecache.classes": json.dumps(list(head.classes)),
        "featurecache.scores": head.spec.scores,
        "featurecache.probabilities": "true" if probabilities else "false",
        "featurecache.threshold": "0.5" if probabilities else "",
        "featurecache.input": json.dumps({"name": "image", "layout": "HWC", "dtype": "uint8", "channels": "RGB",
                                          "width": width, "height": height}),
        "featurecache.version": __version__,
        "featurecache.head": json.dumps(_provenance(head, recipe, source), default=str),
    }


def _to_onnx(model: ExportedModel, width: int, height: int, name: str) -> bytes:
    """The traced graph's bytes; an exporter failure as one ExportError naming the backbone."""
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise ExportError("needs the onnx package: pip install \"featurecache[onnxruntime]\"") from None
    example = torch.zeros((height, width, 3), dtype=torch.uint8)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), buffer, input_names=["image"], output_names=["scores"],
                              opset_version=OPSET, dynamo=False, do_constant_folding=True)
    except Exception as e:  # exporters raise many kinds
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise ExportError(f"{name}: cannot be expressed in ONNX ({type(e).__name__}: {first})",
                          param="head") from None
    return buffer.getvalue()


def export(head: Union[str, Path, TrainedHead], path: Union[str, Path], *, input_size: Sequence[int],
           weights: Optional[Union[str, Path]] = None, download: bool = False, check: Sequence = (),
           threads: Optional[int] = None, runtime: str = "onnxruntime") -> ExportResult:
    """Write a head and its backbone as one ONNX model: a uint8 RGB image to per-class image scores.

    Parameters
    ----------
    head : path or TrainedHead
        A head file written by ``fit`` (since featurecache 0.2: it records its extraction).
    path : path
        The ``.onnx`` file to write (whole, then renamed into place; never the head file).
    input_size : (int, int)
        ``(width, height)`` of the images the model takes; a consumer resizes to it first.
    weights : path, optional
        The backbone weights, when not where the head's training found them.
    download : bool
        Let default weights missing from the local cache be downloaded.
    check : sequence of paths
        Images (files or folders) to check the written model on (:func:`check_export`).
    threads : int, optional
        Intra-op threads of the check.
    runtime : str
        What runs ``predict``'s backbone in the check (default ONNX Runtime, as the model is run:
        the comparison then measures the export alone, not two runtimes' float rounding).

    Returns
    -------
    ExportResult

    Raises
    ------
    ExportError
        A head without a recorded extraction, a backbone or head ONNX cannot express (a
        fusion by rank), an input size too small for the grid, an output that cannot be written;
        with ``check``, scores that differ from ``predict``'s beyond :data:`CHECK_TOLERANCE`
        (the model is written all the same).
    """
    t0 = time.perf_counter()
    trained, source, recipe = _load(head)
    width, height = (int(v) for v in input_size)
    check_input_size(recipe, width, height)
    check_output(path, param="path")
    check_not_inputs({"path": path}, {"the head file": source if source != "head" else None,
                                      "the weights file": weights})
    try:
        backbone = recipe.build_backbone(weights=weights, download=download).to("cpu")
        model = ExportedModel(trained, backbone, width, height)
    except (BackboneError, HeadError) as e:
        raise ExportError(f"{source}: {e.message}", param=e.param) from None
    data = _to_onnx(model, width, height, f"{source}: {backbone.spec.name} with its {trained.objective} head")
    data = _with_metadata(data, _metadata(trained, recipe, source, width, height))
    write_bytes(path, data)
    seconds = time.perf_counter() - t0
    checked = None
    if check:
        checked = check_export(path, trained, check, weights=weights, threads=threads, runtime=runtime)
        if not checked.passed:
            raise ExportError(f"{path}: the exported model disagrees with predict: {checked.to_text()}")
    return ExportResult(Path(path), width, height, model.num_patches, tuple(trained.classes), recipe.mode, seconds,
                        checked)


def _with_metadata(data: bytes, metadata: dict) -> bytes:
    import onnx

    model = onnx.load_from_string(data)
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name, model.producer_version = "featurecache", __version__
    model.doc_string = ("featurecache head: input 'image' uint8 (H, W, 3) RGB of the size in featurecache.input; "
                        "output 'scores' float32 (C,), classes in featurecache.classes")
    return model.SerializeToString()


def read_metadata(path: Union[str, Path]) -> dict:
    """The featurecache metadata of an exported model (JSON values decoded)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and OSError alike
        raise ExportError(f"{path}: not an ONNX model ({type(e).__name__})") from None
    props = {p.key: p.value for p in model.metadata_props if p.key.startswith("featurecache.")}
    if "featurecache.input" not in props:
        raise ExportError(f"{path}: not a model exported by featurecache (no featurecache metadata)")
    out = dict(props)
    for key in ("featurecache.classes", "featurecache.input", "featurecache.head"):
        out[key] = json.loads(props[key])
    return out


@dataclass(frozen=True)
class CheckResult:
    """The exported model's scores beside ``predict``'s on the same pixels (:func:`check_export`).

    Attributes
    ----------
    names : tuple of str
        The images, as given.
    exported, predicted : ndarray (N, C)
        ONNX Runtime's and ``predict``'s scores.
    seconds_exported, seconds_predicted : float
        Wall time of each on all the images (the model's session made before the clock starts;
        ``predict``'s backbone built before too).
    tolerance : float
    """

    names: tuple
    exported: np.ndarray
    predicted: np.ndarray
    seconds_exported: float
    seconds_predicted: float
    tolerance: float = CHECK_TOLERANCE

    @property
    def max_abs_difference(self) -> float:
        return float(np.abs(self.exported.astype(np.float64) - self.predicted).max())

    @property
    def scale(self) -> float:
        """The score scale: the largest score magnitude ``predict`` gave (at least 1e-6)."""
        return max(float(np.abs(self.predicted).max()), 1e-6)

    @property
    def relative_difference(self) -> float:
        return self.max_abs_difference / self.scale

    @property
    def top1_agreement(self) -> float:
        return float(np.mean(self.exported.argmax(1) == self.predicted.argmax(1)))

    @property
    def passed(self) -> bool:
        return self.relative_difference <= self.tolerance and self.top1_agreement == 1.0

    def to_text(self) -> str:
        n = len(self.names)
        speed = (f"ONNX Runtime {n / max(self.seconds_exported, 1e-9):.2f} images/s, "
                 f"predict {n / max(self.seconds_predicted, 1e-9):.2f} images/s")
        return (f"check on {n} image(s): max |exported - predict| {self.max_abs_difference:.2e} "
                f"({self.relative_difference:.2e} of the score scale {self.scale:.3g}; tolerance {self.tolerance:g}), "
                f"top-1 agreement {100 * self.top1_agreement:.1f}%; {speed}")


def _session(path: Union[str, Path], threads: Optional[int]):
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("--check needs ONNX Runtime: pip install \"featurecache[onnxruntime]\"") from None
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 4
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT's own exception types
        raise ExportError(f"{path}: ONNX Runtime cannot load it ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})") from None


def check_images(images: Sequence[Union[str, Path]], width: int, height: int) -> tuple:
    """``(names, arrays)``: the image files (folders searched) decoded, oriented and resized to ``width x height``
    (Pillow's bilinear resize) as ``(H, W, 3)`` uint8 arrays: the pixels both sides of a check see."""
    from PIL import Image

    from featurecache.images import image_files, load_rgb

    names, arrays = [], []
    for item in images:
        files = image_files(Path(item)) if Path(item).is_dir() else [Path(item)]
        for f in files:
            try:
                a = load_rgb(f)
            except Exception as e:  # PIL raises many kinds
                raise ExportError(f"{f}: cannot read the image ({type(e).__name__})", param="check") from None
            if a.shape[:2] != (height, width):
                a = np.asarray(Image.fromarray(a).resize((width, height), Image.BILINEAR))
            names.append(str(f))
            arrays.append(np.ascontiguousarray(a))
    if not arrays:
        raise ExportError("no image to check on", param="check")
    return tuple(names), arrays


def check_export(model: Union[str, Path], head: Union[str, Path, TrainedHead], images: Sequence[Union[str, Path]], *,
                 weights: Optional[Union[str, Path]] = None, threads: Optional[int] = None,
                 runtime: str = "onnxruntime") -> CheckResult:
    """Run an exported model with ONNX Runtime and ``predict`` on the same images; compare the scores.

    Parameters
    ----------
    model : path
        A model written by :func:`export`.
    head : path or TrainedHead
        The head it was exported from.
    images : sequence of paths
        Image files or folders; each is resized to the model's input size first (so that both
        see the same pixels).
    weights : path, optional
    threads : int, optional
        Intra-op threads of both.
    runtime : str
        What runs ``predict``'s backbone (``auto``, ``torch``, ``openvino``, ``onnxruntime``).
        Default ONNX Runtime, which runs the exported model: torch's and OpenVINO's features
        differ from it by float rounding (``TOLERANCE`` of :mod:`featurecache.runtimes`), which
        a head can amplify (docs/deploy.md gives the figures).

    Returns
    -------
    CheckResult
        Its ``passed`` says whether the scores agree within :data:`CHECK_TOLERANCE` of the score
        scale with the same top class for every image.
    """
    from featurecache.predict import Predictor, load_head

    meta = read_metadata(model)
    size = meta["featurecache.input"]
    names, arrays = check_images(images, int(size["width"]), int(size["height"]))
    session = _session(model, threads)
    t0 = time.perf_counter()
    exported = np.stack([session.run(None, {"image": a})[0] for a in arrays])
    seconds_exported = time.perf_counter() - t0
    predictor = (Predictor(head, weights=weights, device="cpu") if isinstance(head, TrainedHead)
                 else load_head(head, weights=weights, device="cpu"))
    predictor.backbone()
    t0 = time.perf_counter()
    result = predictor.predict(list(arrays), progress=False, runtime=runtime, threads=threads, workers=0)
    seconds_predicted = time.perf_counter() - t0
    return CheckResult(names, exported, np.asarray(result.scores, np.float64), seconds_exported, seconds_predicted)
