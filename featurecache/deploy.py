"""``featurecache export``: a trained head and its frozen backbone as one ONNX model, image in, scores out.

The graph (:mod:`featurecache.deploy_graph`) takes one RGB image as a uint8 tensor ``(H, W, 3)``,
of the fixed ``input_size`` it was exported for (a consumer resizes its images to it first) or,
``dynamic``, of any size, and returns the head's per-class image scores ``(C,)`` float32, computed
as ``predict`` computes them on an image of that size: the patch grid (crop: RoiAlign; dense:
antialiased resizes as matrix products, the trunk, the window means), the backbone, the features
rounded as the cache stores them, the head and its image-score rule. With ``maps`` a second
output is the class activation map ``(rows, columns, C)`` that :mod:`featurecache.maps` makes
(method ``cam``, its default).

What a consumer needs is in the model's metadata (:data:`METADATA_KEYS`). ``--check``
(:func:`check_export`) runs the model with ONNX Runtime and ``predict`` (and its maps) on the
same pixels and compares them.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from featurecache import __version__
from featurecache.backbones import DENSE_STRIDE
from featurecache.deploy_graph import ExportedModel, axis_resize_matrix, for_export, weights_into_loops
from featurecache.errors import BackboneError, ExportError, HeadError, is_out_of_memory
from featurecache.heads.trained import TrainedHead
from featurecache.outputs import check_not_inputs, check_output, write_bytes
from featurecache.patches import MAX_PATCHES
from featurecache.resources import DEFAULT_MAP_METHOD
from featurecache.settings import EXPORT, check_fields

__all__ = ["CHECK_TOLERANCE", "METADATA_KEYS", "MIN_PATCH_SIDE", "CheckResult", "ExportConfig", "ExportResult",
           "ExportedModel", "MapCheck", "axis_resize_matrix", "check_export", "export", "read_metadata"]

#: ONNX operator set of the exported graph (RoiAlign's half-pixel mode needs 16, GridSample-free maps 16 too).
OPSET = 17

#: Smallest patch side, in pixels of the exported input size, that an export accepts.
MIN_PATCH_SIDE = 8

#: Largest difference ``--check`` accepts between the model's scores and ``predict``'s, relative to
#: the score scale (the largest score magnitude, at least 1e-3); and between its maps and featurecache's,
#: relative to the largest map value.
CHECK_TOLERANCE = 1e-4

#: The model's metadata (ONNX ``metadata_props``), each a string: what a consumer reads.
METADATA_KEYS = {
    "featurecache.classes": "JSON list of the class names, in the order of the scores",
    "featurecache.scores": "what a score means",
    "featurecache.probabilities": "'true' when scores are probabilities, else 'false' (ranking scores)",
    "featurecache.threshold": "the default threshold of a label (predict's), '' when there is none",
    "featurecache.input": "JSON: name, layout (HWC), dtype (uint8), channels (RGB), width, height (null: any size)",
    "featurecache.maps": "JSON, only in a model with maps: name, method, layout, dtype, stride, rows, columns, "
                         "scales, cell (which pixels a cell covers)",
    "featurecache.version": "the featurecache version that exported it",
    "featurecache.head": "JSON: the head's provenance (objective, kind, scoring, features, recipe, training)",
}


@dataclass(frozen=True)
class ExportConfig:
    """What :func:`export` writes (the rows of :data:`featurecache.settings.EXPORT`).

    Attributes
    ----------
    input_size : (int, int), optional
        ``(width, height)`` of the images the model takes; a consumer resizes to it first.
    dynamic : bool
        A model that takes images of any size instead (the grid computed in the graph).
        Exactly one of ``input_size`` and ``dynamic``.
    maps : bool
        Also output the class activation map (:mod:`featurecache.maps`, method ``map_method``).
    map_method : str
        ``cam`` (featurecache's default), the one method exported.
    stride : int
        The map's cell size in pixels.
    weights : path, optional
        The backbone weights, when not where the head's training found them.
    download : bool
        Let default weights missing from the local cache be downloaded.
    threads : int, optional
        Intra-op threads of the check.
    runtime : str
        What runs ``predict``'s backbone in the check (default ONNX Runtime, as the model is run:
        the comparison then measures the export alone, not two runtimes' float rounding).
    """

    input_size: Optional[tuple] = None
    dynamic: bool = False
    maps: bool = False
    map_method: str = DEFAULT_MAP_METHOD
    stride: int = 8
    weights: Optional[str] = None
    download: bool = False
    threads: Optional[int] = None
    runtime: str = "onnxruntime"

    def __post_init__(self) -> None:
        check_fields(self, EXPORT, ExportError, skip=("input_size",))
        if self.input_size is not None and self.dynamic:
            raise ExportError("input_size and dynamic exclude each other: a model takes one size or any size",
                              param="dynamic")
        if self.input_size is None and not self.dynamic:
            raise ExportError("give the (width, height) the model takes, or dynamic for any size",
                              param="input_size")
        size = self.input_size
        if size is not None and not (isinstance(size, (tuple, list)) and len(size) == 2 and all(
                isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size)):
            raise ExportError(f"must be (width, height) in whole pixels, got {self.input_size!r}", param="input_size")
        if self.map_method != "cam":
            raise ExportError(f"the {self.map_method} map cannot be exported: it reads a cache's patch scores or "
                              "an attention head's weights; a model's maps are cam maps (the default)",
                              param="map_method")

    @property
    def size(self) -> Optional[tuple]:
        """``(width, height)``, or ``None`` for a dynamic model."""
        return None if self.dynamic else tuple(int(v) for v in self.input_size)


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote.

    Attributes
    ----------
    path : Path
    size : (int, int) or None
        ``(width, height)`` the model takes, ``None`` for any size (dynamic).
    patches : int or None
        Patches (crop) or windows (dense) of an image of that size (``None``: it depends on the image).
    classes : tuple of str
    mode : str
    seconds : float
    maps : dict or None
        The maps' metadata (``featurecache.maps``) when the model outputs maps.
    check : CheckResult, optional
    """

    path: Path
    size: Optional[tuple]
    patches: Optional[int]
    classes: tuple
    mode: str
    seconds: float
    maps: Optional[dict] = None
    check: Optional["CheckResult"] = None

    @property
    def width(self) -> Optional[int]:
        return self.size[0] if self.size else None

    @property
    def height(self) -> Optional[int]:
        return self.size[1] if self.size else None

    def to_text(self) -> str:
        size = f"{self.width}x{self.height}" if self.size else "any-size"
        out = f"{len(self.classes)} class scores" + (
            f" and their {self.maps['method']} maps ({self.maps['stride']}-px cells)" if self.maps else "")
        patches = f"{self.patches} patches" if self.size else "patches computed in the graph"
        line = (f"exported {self.path}: {size} uint8 RGB image (H, W, 3) -> {out}; {self.mode} mode, {patches}; "
                f"{self.seconds:.1f} s")
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


def _metadata(head: TrainedHead, recipe, source: str, width: Optional[int], height: Optional[int],
              maps: Optional[dict] = None) -> dict:
    probabilities = bool(head.spec.probabilities)
    meta = {
        "featurecache.classes": json.dumps(list(head.classes)),
        "featurecache.scores": head.spec.scores,
        "featurecache.probabilities": "true" if probabilities else "false",
        "featurecache.threshold": "0.5" if probabilities else "",
        "featurecache.input": json.dumps({"name": "image", "layout": "HWC", "dtype": "uint8", "channels": "RGB",
                                          "width": width, "height": height}),
        "featurecache.version": __version__,
        "featurecache.head": json.dumps(_provenance(head, recipe, source), default=str),
    }
    if maps is not None:
        meta["featurecache.maps"] = json.dumps(maps)
    return meta


def _maps_metadata(recipe, config: ExportConfig) -> dict:
    """What a consumer needs to place the map's cells on the image (``featurecache.maps``)."""
    grid, s = recipe.grid, config.stride
    size = config.size
    return {"name": "maps", "method": config.map_method, "layout": "rows, columns, classes", "dtype": "float32",
            "range": "[0, 1]", "stride": s, "rows": -(-size[1] // s) if size else None,
            "columns": -(-size[0] // s) if size else None, "scales": [1.0] if grid.whole else list(grid.scales),
            "cell": "row i, column j covers pixels x in [j*stride, min((j+1)*stride, width)), "
                    "y in [i*stride, min((i+1)*stride, height)); rows = ceil(height/stride), "
                    "columns = ceil(width/stride)"}


def _check_maps(trained: TrainedHead, backbone, recipe, config: ExportConfig) -> None:
    """Refuse maps the head's backbone cannot make (no dense trunk), or a grid the trunk cannot take."""
    if not backbone.supports_dense:
        raise ExportError(f"{backbone.spec.name} has no dense trunk for cam maps", param="maps")
    if recipe.grid.input_size % DENSE_STRIDE:
        raise ExportError(f"cam maps resize the image as dense extraction does, which needs an input size that is "
                          f"a multiple of {DENSE_STRIDE}; the head's is {recipe.grid.input_size}", param="maps")


def _to_onnx(model: ExportedModel, size: Optional[tuple], name: str) -> bytes:
    """The traced graph's bytes; an exporter failure as one ExportError naming the backbone."""
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise ExportError("needs the onnx package: pip install \"featurecache[onnxruntime]\"") from None
    # A dynamic graph is traced on an example of the grid's input size or larger (any size would do: the
    # shapes stay symbolic), with its height and width, and the maps' rows and columns, as named axes.
    width, height = size or (max(2 * model.example_side, 64), max(model.example_side * 3 // 2, 48))
    example = torch.zeros((height, width, 3), dtype=torch.uint8)
    outputs = ["scores"] + (["maps"] if model.maps is not None else [])
    axes = None if size else {"image": {0: "height", 1: "width"}, "maps": {0: "rows", 1: "columns"}}
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(for_export(model, example), (example,), buffer, input_names=["image"],
                              output_names=outputs, opset_version=OPSET, dynamo=False, do_constant_folding=True,
                              dynamic_axes={k: v for k, v in (axes or {}).items() if k in outputs + ["image"]} or None)
    except Exception as e:  # exporters raise many kinds
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        if is_out_of_memory(e):
            raise ExportError(f"{name}: out of memory tracing the model on a {width}x{height} image; export at "
                              f"a smaller --input-size, or a head of fewer scales ({first})", param="head") from None
        raise ExportError(f"{name}: cannot be expressed in ONNX ({type(e).__name__}: {first})",
                          param="head") from None
    return buffer.getvalue()


def _build(trained: TrainedHead, source: str, recipe, config: ExportConfig) -> ExportedModel:
    """The head's backbone rebuilt and the graph's module; their failures as one-line ExportErrors."""
    try:
        backbone = recipe.build_backbone(weights=config.weights, download=config.download).to("cpu")
        if config.maps:
            _check_maps(trained, backbone, recipe, config)
        return ExportedModel(trained, backbone, config.size, maps=config.maps, stride=config.stride)
    except (BackboneError, HeadError) as e:
        raise ExportError(f"{source}: {e.message}", param=e.param) from None


def export(head: Union[str, Path, TrainedHead], path: Union[str, Path], config: Optional[ExportConfig] = None, *,
           check: Sequence = (), **options) -> ExportResult:
    """Write a head and its backbone as one ONNX model: a uint8 RGB image to per-class image scores (and maps).

    Parameters
    ----------
    head : path or TrainedHead
        A head file written by ``fit`` (since featurecache 0.2: it records its extraction).
    path : path
        The ``.onnx`` file to write (whole, then renamed into place; never the head file).
    config : ExportConfig, optional
    check : sequence of paths
        Images (files or folders) to check the written model on (:func:`check_export`).
    **options
        Fields of :class:`ExportConfig` over those of ``config`` (``input_size=(500, 375)``,
        ``dynamic=True``, ``maps=True`` ...).

    Returns
    -------
    ExportResult

    Raises
    ------
    ExportError
        A head without a recorded extraction, a backbone or head ONNX cannot express (a
        fusion by rank), an input size too small for the grid, both or neither of ``input_size``
        and ``dynamic``, a map method other than ``cam``, an output that cannot be written; with
        ``check``, scores or maps that differ from featurecache's beyond :data:`CHECK_TOLERANCE`
        (the model is written all the same).
    """
    t0 = time.perf_counter()
    config = replace(config, **options) if config is not None else ExportConfig(**options)
    trained, source, recipe = _load(head)
    if config.size:
        check_input_size(recipe, *config.size)
    check_output(path, param="path")
    check_not_inputs({"path": path}, {"the head file": source if source != "head" else None,
                                      "the weights file": config.weights})
    model = _build(trained, source, recipe, config)
    maps = _maps_metadata(recipe, config) if config.maps else None
    data = _to_onnx(model, config.size, f"{source}: {model.backbone_name} with its {trained.objective} head")
    size = config.size or (None, None)
    write_bytes(path, _with_metadata(data, _metadata(trained, recipe, source, *size, maps=maps)))
    seconds = time.perf_counter() - t0
    checked = None
    if check:
        checked = check_export(path, trained, check, weights=config.weights, threads=config.threads,
                               runtime=config.runtime)
        if not checked.passed:
            raise ExportError(f"{path}: the exported model disagrees with predict: {checked.to_text()}")
    return ExportResult(Path(path), config.size, model.num_patches, tuple(trained.classes), recipe.mode, seconds,
                        maps, checked)


def _with_metadata(data: bytes, metadata: dict) -> bytes:
    import onnx

    model = onnx.load_from_string(data)
    weights_into_loops(model)
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name, model.producer_version = "featurecache", __version__
    model.doc_string = ("featurecache head: input 'image' uint8 (H, W, 3) RGB of the size in featurecache.input "
                        "(any size where it is null); output 'scores' float32 (C,), classes in featurecache.classes"
                        + ("; output 'maps' float32 (rows, columns, C), see featurecache.maps"
                           if "featurecache.maps" in metadata else ""))
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
    for key in ("featurecache.classes", "featurecache.input", "featurecache.head", "featurecache.maps"):
        if key in props:
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
    maps: Optional["MapCheck"] = None

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
        scores = self.relative_difference <= self.tolerance and self.top1_agreement == 1.0
        return scores and (self.maps is None or self.maps.passed)

    def to_text(self) -> str:
        n = len(self.names)
        speed = (f"ONNX Runtime {n / max(self.seconds_exported, 1e-9):.2f} images/s, "
                 f"predict {n / max(self.seconds_predicted, 1e-9):.2f} images/s")
        return (f"check on {n} image(s): max |exported - predict| {self.max_abs_difference:.2e} "
                f"({self.relative_difference:.2e} of the score scale {self.scale:.3g}; tolerance {self.tolerance:g}), "
                f"top-1 agreement {100 * self.top1_agreement:.1f}%; {speed}"
                + ("\n" + self.maps.to_text() if self.maps is not None else ""))


@dataclass(frozen=True)
class MapCheck:
    """The exported model's maps beside featurecache's (:class:`featurecache.maps.Localizer`, the same method,
    stride and scales) on the same pixels.

    Attributes
    ----------
    exported, predicted : tuple of ndarray (rows, columns, C)
        One map per image (their sizes follow the images' in a dynamic model).
    seconds_predicted : float
        Wall time of featurecache's maps of all the images.
    tolerance : float
    """

    exported: tuple
    predicted: tuple
    seconds_predicted: float
    tolerance: float = CHECK_TOLERANCE

    @property
    def max_abs_difference(self) -> float:
        if any(e.shape != p.shape for e, p in zip(self.exported, self.predicted)):
            return float("inf")
        return max(float(np.abs(e.astype(np.float64) - p).max()) for e, p in zip(self.exported, self.predicted))

    @property
    def scale(self) -> float:
        """The largest map value featurecache gave (at least 1e-6)."""
        return max(max(float(np.abs(p).max()) for p in self.predicted), 1e-6)

    @property
    def relative_difference(self) -> float:
        return self.max_abs_difference / self.scale

    @property
    def passed(self) -> bool:
        return self.relative_difference <= self.tolerance

    def to_text(self) -> str:
        n = len(self.predicted)
        return (f"maps of {n} image(s): max |exported - featurecache| {self.max_abs_difference:.2e} "
                f"({self.relative_difference:.2e} of the largest map value {self.scale:.3g}; tolerance "
                f"{self.tolerance:g}); featurecache's maps {n / max(self.seconds_predicted, 1e-9):.2f} images/s")


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


def check_images(images: Sequence[Union[str, Path]], width: Optional[int], height: Optional[int]) -> tuple:
    """``(names, arrays)``: the image files (folders searched) decoded, oriented and resized to ``width x height``
    (Pillow's bilinear resize; each at its own size when they are ``None``) as ``(H, W, 3)`` uint8 arrays: the
    pixels both sides of a check see."""
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
            if width is not None and a.shape[:2] != (height, width):
                a = np.asarray(Image.fromarray(a).resize((width, height), Image.BILINEAR))
            names.append(str(f))
            arrays.append(np.ascontiguousarray(a))
    if not arrays:
        raise ExportError("no image to check on", param="check")
    return tuple(names), arrays


def check_export(model: Union[str, Path], head: Union[str, Path, TrainedHead], images: Sequence[Union[str, Path]], *,
                 weights: Optional[Union[str, Path]] = None, threads: Optional[int] = None,
                 runtime: str = "onnxruntime") -> CheckResult:
    """Run an exported model with ONNX Runtime and ``predict`` on the same images; compare the scores (and maps).

    Parameters
    ----------
    model : path
        A model written by :func:`export`.
    head : path or TrainedHead
        The head it was exported from.
    images : sequence of paths
        Image files or folders; each is resized to the model's input size first (so that both
        see the same pixels), or kept at its own size by a dynamic model.
    weights : path, optional
    threads : int, optional
        Intra-op threads of both.
    runtime : str
        What runs ``predict``'s backbone and the maps' trunk (``auto``, ``torch``, ``openvino``,
        ``onnxruntime``). Default ONNX Runtime, which runs the exported model: torch's and
        OpenVINO's features differ from it by float rounding (``TOLERANCE`` of
        :mod:`featurecache.runtimes`), which a head can amplify (docs/deploy.md gives the figures).

    Returns
    -------
    CheckResult
        Its ``passed`` says whether the scores (and maps) agree within :data:`CHECK_TOLERANCE` of
        their scale with the same top class for every image.
    """
    from featurecache.predict import Predictor, load_head

    meta = read_metadata(model)
    size = meta["featurecache.input"]
    names, arrays = check_images(images, size["width"], size["height"])
    session = _session(model, threads)
    t0 = time.perf_counter()
    outputs = [session.run(None, {"image": a}) for a in arrays]
    seconds_exported = time.perf_counter() - t0
    predictor = (Predictor(head, weights=weights, device="cpu") if isinstance(head, TrainedHead)
                 else load_head(head, weights=weights, device="cpu"))
    predictor.backbone()
    t0 = time.perf_counter()
    result = predictor.predict(list(arrays), progress=False, runtime=runtime, threads=threads, workers=0)
    seconds_predicted = time.perf_counter() - t0
    maps = meta.get("featurecache.maps")
    checked = _compare_maps(predictor, arrays, [o[1] for o in outputs], maps, runtime) if maps else None
    return CheckResult(names, np.stack([o[0] for o in outputs]), np.asarray(result.scores, np.float64),
                       seconds_exported, seconds_predicted, maps=checked)


def _compare_maps(predictor, arrays: list, exported: list, meta: dict, runtime: str) -> MapCheck:
    """featurecache's maps of the images (the model's method, stride and scales) beside the model's."""
    from featurecache.maps import Localizer, MapConfig

    config = MapConfig(method=meta["method"], stride=int(meta["stride"]), device="cpu", runtime=runtime,
                       weights=predictor.weights)
    maker = Localizer(predictor.head, config, backbone=predictor.backbone())  # predict --maps' map maker
    maker.runtime()  # built before the clock starts, as the model's session is
    t0 = time.perf_counter()
    predicted = [maker.pixels_map(a).scores.transpose(1, 2, 0) for a in arrays]
    return MapCheck(tuple(exported), tuple(predicted), time.perf_counter() - t0)
