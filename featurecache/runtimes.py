"""CPU inference runtimes for the frozen backbone: torch eager, OpenVINO and ONNX Runtime.

The frozen backbone (normalisation included) is exported once per architecture, layer,
weights hash and input size to ONNX, into ``<torch hub dir>/featurecache/`` (written whole,
then renamed), and run by OpenVINO (f32 inference precision) or ONNX Runtime (with its
threads' busy-waiting off, so that they do not collapse on shared cores), with the threads
of :func:`featurecache.resources.cpu_threads`. Their features agree with torch's within
:data:`TOLERANCE`; that is checked on a probe batch every time a runtime is built (and on
real images by the tests), so the runtime is provenance, not part of the feature
fingerprint. Reduced precision is not offered. In crop mode they run :func:`crop_streams`
requests at once (two single-thread streams on 2 cores), which keep the cores busier than one
request on all threads; each patch is computed alone, so the values do not change.

Dense mode exports the backbone's dense trunk instead (normalised images to feature map; the
normalisation stays in torch), with dynamic batch, height and width axes, as
``...-dense.onnx``: one compiled model or session serves every image size and tile
(:meth:`Runtime.trunk`, which :meth:`FrozenBackbone.cell_features` calls, tiles included). Its
probe compares feature maps at two shapes. Only average-pooled trunks (EfficientNet-Lite0, timm
CNNs, ResNet) are exported; AlexNet/VGG's (FC6/FC7 as 4096-channel convolutions) stay torch's.

``auto`` takes the fastest installed runtime whose probe agrees, as measured in
docs/performance.md for both modes: OpenVINO, then ONNX Runtime, then torch. On CUDA it is
torch. When it
falls back to torch on the CPU (no runtime installed, the export failed, a runtime could not
run it or disagreed) it says so once per process, with the reasons, as a warning.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from featurecache.backbones import DENSE_STRIDE, FrozenBackbone
from featurecache.errors import BackboneError
from featurecache.outputs import os_reason
from featurecache.resources import RUNTIMES
from featurecache.weights import sha256_file

logger = logging.getLogger(__name__)

__all__ = ["RUNTIMES", "TOLERANCE", "Runtime", "build_runtime", "installed_runtimes"]

#: Most absolute difference between a runtime's features and torch's, relative to the largest
#: feature magnitude of the batch (measured: about 2e-6 for EfficientNet-Lite0 at 224 px).
TOLERANCE = 1e-4

#: Preference of ``auto`` among installed runtimes (fastest first, as measured in
#: docs/performance.md).
_AUTO_ORDER = ("openvino", "onnxruntime")

#: ``auto``'s preference in dense mode (the trunk on whole images of many sizes): as in crop mode.
#: OpenVINO's trunk was the fastest bare in 3 runs of 3 and ``extract --mode dense`` end to end in 2
#: (ONNX Runtime in the other; docs/performance.md).
_DENSE_AUTO_ORDER = ("openvino", "onnxruntime")

_MODULES = {"openvino": "openvino", "onnxruntime": "onnxruntime"}

_OPSET = 17

#: Compiled models and sessions of this process, by (runtime, model file, threads): built once.
_COMPILED: dict = {}


def crop_streams(threads: int) -> int:
    """Requests crop mode runs at once, each on ``threads // streams`` threads.

    A batch of 224-pixel patches leaves cores idle at every layer's join (1.7 of 2 cores busy
    in OpenVINO's latency mode). Crop mode's runner gives each stream whole batches, which its
    thread cuts and then runs, so that one stream cuts while the other computes and no thread
    waits for another; a batch run directly is split over the streams. Each patch is computed
    alone, so the values are the same bit for bit (docs/performance.md has the speed-ups). Dense
    mode runs one image at a time on all threads: one stream. End to end the crops take their share
    of the same cores: ONNX Runtime's crop mode gained 5-12%, OpenVINO's stayed level
    (``benchmarks/bench_streams.py``).
    """
    return 2 if threads >= 2 else 1


def installed_runtimes() -> tuple:
    """The runtimes whose packages can be imported here (torch always)."""
    import importlib.util

    return ("torch",) + tuple(n for n in _AUTO_ORDER if importlib.util.find_spec(_MODULES[n]) is not None)


class Runtime:
    """Runs a frozen backbone on the CPU: on batches of patches ``(N, 3, S, S)`` (0-255 RGB floats,
    crop mode, :meth:`__call__`), or its dense trunk on normalised images of any size (dense mode,
    :meth:`trunk`, which :meth:`FrozenBackbone.cell_features` calls on each image or tile).

    Attributes
    ----------
    name : str
        ``torch``, ``openvino`` or ``onnxruntime``.
    version : str
        The runtime package's version (provenance).
    dense : bool
        Whether it runs the dense trunk (else the whole backbone at a fixed patch size); the
        torch runtime runs both.
    """

    name = "torch"
    #: The memory layout its inputs are made in: channels-last for torch (1.5-2x faster with
    #: oneDNN); an exported graph reads NCHW, so a channels-last input would be copied twice.
    memory_format = torch.channels_last

    def __init__(self, backbone: FrozenBackbone, *, dense: bool = False) -> None:
        self.backbone = backbone
        self.version = torch.__version__
        self.dense = dense

    #: Requests it can run at once, each on its own thread (crop mode's parallel streams).
    streams = 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def on_stream(self, x: torch.Tensor, stream: int) -> torch.Tensor:
        """The features of one batch of patches run on stream ``stream`` alone (one of :attr:`streams`,
        each used by one thread at a time)."""
        return self(x)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The dense trunk's feature map ``(N, C, rows, columns)`` of normalised images ``(N, 3, H, W)``."""
        return self.backbone.run_trunk(x)

    def describe(self) -> str:
        return f"{self.name} {self.version}" + (" (dense trunk)" if self.dense and self.name != "torch" else "")


class _Exported(Runtime):
    """A runtime of an exported ONNX graph: the backbone (crop mode) or the dense trunk (dense mode)."""

    memory_format = torch.contiguous_format

    def _infer(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _infer_on(self, x: np.ndarray, stream: int) -> np.ndarray:
        raise NotImplementedError

    def on_stream(self, x: torch.Tensor, stream: int) -> torch.Tensor:
        return self._run(x, stream) if not self.dense else super().on_stream(x, stream)

    def _run(self, x: torch.Tensor, stream: Optional[int] = None) -> torch.Tensor:
        try:
            a = x.contiguous().numpy()
            out = self._infer(a) if stream is None else self._infer_on(a, stream)
        except Exception as e:  # the runtimes' own exception types (OpenVINO: RuntimeError with C++ text)
            raise BackboneError(f"{self.name} failed on a batch ({_why(e)}); use --runtime torch",
                                param="runtime") from None
        return torch.from_numpy(out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return super().__call__(x) if self.dense else self._run(x)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x) if self.dense else super().trunk(x)


class _OnnxRuntime(_Exported):
    name = "onnxruntime"

    def __init__(self, backbone: FrozenBackbone, model: Path, threads: int, *, dense: bool = False) -> None:
        import onnxruntime as ort

        super().__init__(backbone, dense=dense)
        self.version = ort.__version__
        if hasattr(ort, "disable_telemetry_events"):  # its usage events (Windows); nothing to send elsewhere
            ort.disable_telemetry_events()
        streams = 1 if dense else crop_streams(threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads // streams)
        options.inter_op_num_threads = 1
        # Threads that spin at barriers are what collapses throughput on shared cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 4  # fatal only: a failure reaches the user as featurecache's one line
        key = ("onnxruntime", str(model), threads)
        if key not in _COMPILED:
            _COMPILED[key] = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        self.session = _COMPILED[key]
        self.streams = streams
        self.pool = _part_threads(streams) if streams > 1 else []  # a direct call's parts, one thread each

    def _infer(self, x: np.ndarray) -> np.ndarray:
        if self.streams < 2 or len(x) < 2:
            return self._infer_on(x, 0)
        parts = np.array_split(x, self.streams)
        runs = [p.submit(self._infer_on, part, 0) for p, part in zip(self.pool, parts)]
        return np.concatenate([r.result() for r in runs])

    def _infer_on(self, x: np.ndarray, stream: int) -> np.ndarray:
        return self.session.run(None, {"images": x})[0]  # a session may be run from several threads at once


class _OpenVinoRuntime(_Exported):
    name = "openvino"

    def __init__(self, backbone: FrozenBackbone, model: Path, threads: int, *, dense: bool = False) -> None:
        ov = _import_openvino()
        super().__init__(backbone, dense=dense)
        self.version = ov.__version__
        key = ("openvino", str(model), threads)
        if key not in _COMPILED:
            core = ov.Core()
            # f32: OpenVINO's default on CPUs with bf16 units changes the features (cosine 0.97).
            config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads,
                      "ENABLE_CPU_PINNING": False, "CACHE_DIR": str(_export_dir() / "openvino-cache")}
            streams = 1 if dense else crop_streams(threads)
            config.update({"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": streams} if streams > 1 else
                          {"PERFORMANCE_HINT": "LATENCY"})
            _COMPILED[key] = core.compile_model(core.read_model(str(model)), "CPU", config)
        compiled = _COMPILED[key]
        self.streams = int(compiled.get_property("NUM_STREAMS"))
        self.requests = [compiled.create_infer_request() for _ in range(self.streams)]

    def _infer(self, x: np.ndarray) -> np.ndarray:
        if self.streams < 2 or len(x) < 2:
            return self._infer_on(x, 0)
        parts = np.array_split(x, self.streams)
        for request, part in zip(self.requests, parts):  # each part on its own stream, at once
            request.start_async({0: part}, share_inputs=True)  # parts live until the waits below
        out = []
        for request in self.requests[:len(parts)]:
            request.wait()
            out.append(np.array(request.get_output_tensor(0).data))
        return np.concatenate(out)

    def _infer_on(self, x: np.ndarray, stream: int) -> np.ndarray:
        # Shared, not copied: a request's own input tensor keeps the size of its first batch.
        return np.array(next(iter(self.requests[stream].infer({0: x}, share_inputs=True).values())))


def _part_threads(n: int) -> list:
    """``n`` single-thread executors (one per part of a batch), shared by the process's sessions."""
    key = ("threads", n)
    if key not in _COMPILED:
        _COMPILED[key] = [concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="featurecache-part")
                          for _ in range(n)]
    return _COMPILED[key]


#: How runtimes say they ran out of memory (an address-space limit, ``ulimit -v``, shows as these).
_MEMORY = re.compile(r"bad_alloc|out of memory|can't allocate|cannot allocate|failed to allocate|not enough memory",
                     re.I)


def _why(error: BaseException) -> str:
    """A runtime failure in a few words: running out of memory said as such, else its type and first line."""
    text = str(error)
    if isinstance(error, MemoryError) or _MEMORY.search(text):
        return "out of memory: allow the process more (ulimit -v, the job's memory) or use fewer --threads"
    first = next((ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("Exception from")), "")
    return f"{type(error).__name__}: {first[:120]}" if first else type(error).__name__


def _import_openvino():
    """``openvino``, imported with its usage telemetry off.

    ``import openvino`` sends an "import" event to Google Analytics (from a forked process,
    with a client id kept in ``~/intel``) unless its user declined in a consent file;
    featurecache opens no network connection unless asked. Its converter falls back to a
    stub when ``openvino_telemetry`` cannot be imported, so the package is hidden while
    openvino's own modules are imported, and only then. An openvino the caller imported
    first is used as it is.
    """
    import sys

    if "openvino" in sys.modules:
        return sys.modules["openvino"]
    missing = object()
    saved = sys.modules.get("openvino_telemetry", missing)
    sys.modules["openvino_telemetry"] = None  # an ImportError for openvino's "import openvino_telemetry"
    try:
        import openvino
    finally:
        if saved is missing:
            sys.modules.pop("openvino_telemetry", None)
        else:
            sys.modules["openvino_telemetry"] = saved
    return openvino


def _export_dir() -> Path:
    return Path(torch.hub.get_dir()) / "featurecache"


def exported_model(backbone: FrozenBackbone, input_size: int, *, dense: bool = False) -> Path:
    """The backbone as ONNX (dynamic batch, fixed ``input_size``), exported once and kept on disk;
    with ``dense``, its dense trunk (normalised images to feature map, dynamic batch, height and
    width; ``input_size`` unused).

    Beside the model, ``MODEL.sha256`` records the SHA-256 of the file featurecache wrote: a
    file whose bytes are not those (planted, damaged, or left without its record by a crash)
    is exported again, never run.
    """
    s = backbone.spec
    arch = s.architecture.replace(":", "-").replace("/", "-")
    layer = s.layer.replace("/", "-")
    # Everything the graph bakes in: weights, normalisation, exporter and opset.
    baked = hashlib.sha256(f"{s.weights_sha256}|{s.preprocessing.to_dict()}|{torch.__version__}|{_OPSET}".encode())
    path = _export_dir() / f"{arch}-{layer}-{baked.hexdigest()[:16]}-{'dense' if dense else f'{input_size}px'}.onnx"
    record = path.with_name(path.name + ".sha256")
    if path.is_file():
        recorded = _read_record(record)
        if recorded is not None and recorded == sha256_file(path):
            return path
        logger.warning("%s: not the file featurecache exported (%s); exporting it again", path,
                       "its SHA-256 differs from the one recorded" if recorded else "no SHA-256 recorded beside it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _export(backbone, input_size if not dense else None, path, record)
    except OSError as e:
        raise BackboneError(f"{path.parent}: cannot write the ONNX export there ({os_reason(e)}); set TORCH_HOME to "
                            "a writable folder, or use --runtime torch", param="runtime") from None
    logger.info("exported %s to %s", f"{s.name}'s dense trunk" if dense else f"{s.name} at {input_size} px", path)
    return path


def _read_record(record: Path):
    with contextlib.suppress(OSError, UnicodeDecodeError):
        text = record.read_text().strip()
        if len(text) == 64:
            return text
    return None


class _DenseTrunk(torch.nn.Module):
    """The dense trunk as a module whose output is the feature map itself (what is exported)."""

    def __init__(self, backbone: FrozenBackbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.run_trunk(x)


def _export(backbone: FrozenBackbone, input_size: Optional[int], path: Path, record: Path) -> None:
    """Export to a temporary file, record its hash, then rename both into place (model last but one, record last).

    ``input_size`` None: the dense trunk, with dynamic height and width (exported on a
    non-square multiple of the stride; its probe checks other sizes).
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    backbone.to("cpu").to(memory_format=torch.contiguous_format)
    if input_size is None:
        net, example = _DenseTrunk(backbone).eval(), torch.randn(1, 3, 128, 160)
        axes = {"images": {0: "n", 2: "h", 3: "w"}, "features": {0: "n", 2: "rows", 3: "columns"}}
    else:
        net, example = backbone, torch.rand(2, 3, input_size, input_size) * 255
        axes = {"images": {0: "n"}, "features": {0: "n"}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (example,), str(tmp), input_names=["images"], output_names=["features"],
                              dynamic_axes=axes, dynamo=False, opset_version=_OPSET)
        digest = sha256_file(tmp)
        with contextlib.suppress(FileNotFoundError):
            record.unlink()  # no moment where an old record vouches for the new file
        os.replace(tmp, path)
        tmp_record = record.with_name(f"{record.name}.{os.getpid()}.tmp")
        tmp_record.write_text(digest + "\n")
        os.replace(tmp_record, record)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    except Exception as e:  # exporters raise many kinds
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise BackboneError(f"{backbone.spec.name}: cannot export to ONNX for another runtime ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160] if str(e) else ''}); use --runtime torch",
                            param="runtime") from None


def _probe_images(input_size: int) -> torch.Tensor:
    """What a runtime's features are compared with torch's on: uniform noise, and crops of a photograph
    (scikit-learn's sample image; a model that alters only natural images' features shows there)."""
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(2, 3, input_size, input_size, generator=gen) * 255
    try:  # the file itself: importing sklearn.datasets would load scipy and its BLAS for one picture
        import importlib.util

        from PIL import Image

        folder = importlib.util.find_spec("sklearn").submodule_search_locations[0]
        with Image.open(Path(folder) / "datasets" / "images" / "china.jpg") as im:
            photo = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float()[None]
    except Exception:  # pragma: no cover - scikit-learn is a dependency; its data file could be gone
        return noise
    h, w = photo.shape[-2:]
    crops = [photo[..., :h // 2, :h // 2], photo[..., h // 4:, w // 3:w // 3 + 3 * h // 4]]
    resized = [torch.nn.functional.interpolate(c, size=(input_size, input_size), mode="bilinear",
                                               antialias=True, align_corners=False) for c in crops]
    return torch.cat([noise, *resized]).clamp(0, 255)


def _agrees(runtime: Runtime, backbone: FrozenBackbone, input_size: int) -> float:
    """Largest difference to torch's features on the probe images, relative to their largest magnitude.

    A dense runtime's trunk is compared with torch's on the probe images (normalised) and on them
    side by side with their mirror images (another shape, as dense inputs vary).
    """
    # Dense inputs are multiples of the stride (timm's "same" padding is exported for such sizes).
    probe = _probe_images(max(2 * DENSE_STRIDE, input_size // DENSE_STRIDE * DENSE_STRIDE) if runtime.dense
                          else input_size)
    worst = 0.0
    with torch.inference_mode():
        if runtime.dense:
            x = backbone.normalize(probe)
            pairs = [(backbone.run_trunk(v), runtime.trunk(v)) for v in (x, torch.cat([x, x.flip(-1)], -1))]
        else:
            pairs = [(backbone(probe), runtime(probe))]
    for ref, got in pairs:
        scale = float(ref.abs().max()) or 1.0
        worst = max(worst, float((got.float() - ref.float()).abs().max()) / scale)
    return worst


def _first_agreeing(backbone: FrozenBackbone, name: str, candidates: list, input_size: int, threads: int,
                    reasons: list, dense: bool = False) -> Optional[Runtime]:
    """The first candidate runtime whose features agree with torch's, or None with why in ``reasons``.

    A named runtime (``name`` not ``auto``) that fails raises instead: the user asked for it.
    """
    model = None
    for candidate in candidates:
        try:
            model = exported_model(backbone, input_size, dense=dense)
            runtime = (_OpenVinoRuntime if candidate == "openvino" else _OnnxRuntime)(backbone, model, threads,
                                                                                      dense=dense)
            diff = _agrees(runtime, backbone, input_size)
        except BackboneError as e:
            if name != "auto":
                raise
            reasons.append(e.message.removesuffix("; use --runtime torch"))  # the export failed: no runtime can run it
            break
        except Exception as e:  # a runtime that cannot load the graph: auto moves on
            why = _why(e)
            if name != "auto":
                advice = "" if why.startswith("out of memory") else "delete the file to export it again, or "
                raise BackboneError(f"{candidate}: cannot run {backbone.spec.name} exported as {model} ({why}); "
                                    f"{advice}use --runtime torch", param="runtime") from None
            reasons.append(f"{candidate} cannot run the exported model ({why})")
            continue
        if diff <= TOLERANCE:
            return runtime
        message = (f"{candidate}: features differ from torch's by {diff:.1e} of their scale, above the tolerance "
                   f"{TOLERANCE:g}")
        if name != "auto":
            raise BackboneError(message + "; use --runtime torch", param="runtime")
        reasons.append(message)
    return None


def build_runtime(backbone: FrozenBackbone, name: str = "auto", *, input_size: int, threads: int,
                  device: Optional[torch.device] = None, dense: bool = False) -> Runtime:
    """The runtime that extraction runs the backbone with.

    Parameters
    ----------
    backbone : FrozenBackbone
    name : {"auto", "torch", "openvino", "onnxruntime"}
    input_size : int
        Patch side (the exported graph's fixed spatial size in crop mode).
    threads : int
        Intra-op threads.
    device : torch.device, optional
        Other runtimes are CPU only: ``auto`` is torch on CUDA, a named one is refused.
    dense : bool
        Dense mode: the runtime runs the dense trunk (exported with dynamic height and width)
        on whole resized images or tiles. Only average-pooled trunks are exported; AlexNet/VGG's
        (FC6/FC7 as convolutions, 4096 channels of 224-pixel windows) stay torch's.

    Raises
    ------
    BackboneError
        Naming ``runtime``: not installed, not for this device or backbone, or features that
        disagree with torch's beyond :data:`TOLERANCE`.
    """
    if name not in RUNTIMES:
        raise BackboneError(f"must be one of {', '.join(RUNTIMES)}, got {name!r}", param="runtime")
    why_torch = _torch_only(backbone, device, dense)
    if name == "torch" or (name == "auto" and why_torch):
        return Runtime(backbone, dense=dense)
    if why_torch:
        raise BackboneError(f"{name}: not available here ({why_torch}); use --runtime torch or auto", param="runtime")
    order = _DENSE_AUTO_ORDER if dense else _AUTO_ORDER
    candidates = [name] if name != "auto" else [n for n in order if n in installed_runtimes()]
    if name != "auto" and name not in installed_runtimes():
        raise BackboneError(f"{name} is not installed: pip install \"featurecache[{name}]\"", param="runtime")
    if name == "auto" and not order:
        return Runtime(backbone, dense=dense)  # torch measured fastest: nothing to fall back from
    reasons = [] if candidates else ["neither OpenVINO nor ONNX Runtime is installed; pip install "
                                     "\"featurecache[openvino]\" runs the backbone faster on the CPU"]
    runtime = _first_agreeing(backbone, name, candidates, input_size, threads, reasons, dense)
    if runtime is not None:
        return runtime
    _warn_once(f"--runtime auto: torch runs the {'dense trunk' if dense else 'backbone'} ({'; '.join(reasons)})")
    return Runtime(backbone, dense=dense)


def _torch_only(backbone: FrozenBackbone, device: Optional[torch.device], dense: bool) -> str:
    """Why only torch can run here ('' when another runtime can)."""
    if device is not None and device.type != "cpu":
        return "it runs on the CPU only"
    if dense and backbone.dense_kind != "avg":
        return (f"dense mode with {backbone.spec.name} runs FC6/FC7 as convolutions; only average-pooled trunks "
                "are exported")
    return ""


#: The fallback messages this process has given (each is said once, not once per image batch or head).
_SAID: set = set()


def _warn_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        logger.warning("%s", message)
