"""CPU inference runtimes for the frozen backbone: torch eager, OpenVINO and ONNX Runtime.

The frozen backbone (normalisation included) is exported once per architecture, layer,
weights hash and input size to ONNX, into ``<torch hub dir>/featurecache/`` (written whole,
then renamed), and run by OpenVINO (f32 inference precision) or ONNX Runtime (with its
threads' busy-waiting off, so that they do not collapse on shared cores), with the threads
of :func:`featurecache.resources.cpu_threads`. Their features agree with torch's within
:data:`TOLERANCE`; that is checked on a probe batch every time a runtime is built (and on
real images by the tests), so the runtime is provenance, not part of the feature
fingerprint. Reduced precision is not offered.

``auto`` takes the fastest installed runtime whose probe agrees (OpenVINO, then ONNX Runtime,
then torch); on CUDA and in dense mode it is torch. When it falls back to torch on the CPU
(no runtime installed, the export failed, a runtime could not run it or disagreed) it says
so once per process, with the reasons, as a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from featurecache.backbones import FrozenBackbone
from featurecache.errors import BackboneError
from featurecache.resources import RUNTIMES

logger = logging.getLogger(__name__)

__all__ = ["RUNTIMES", "TOLERANCE", "Runtime", "build_runtime", "installed_runtimes"]

#: Most absolute difference between a runtime's features and torch's, relative to the largest
#: feature magnitude of the batch (measured: about 2e-6 for EfficientNet-Lite0 at 224 px).
TOLERANCE = 1e-4

#: Preference of ``auto`` among installed runtimes (fastest first, as measured in
#: docs/performance.md).
_AUTO_ORDER = ("openvino", "onnxruntime")

_MODULES = {"openvino": "openvino", "onnxruntime": "onnxruntime"}

_OPSET = 17

#: Compiled models and sessions of this process, by (runtime, model file, threads): built once.
_COMPILED: dict = {}


def installed_runtimes() -> tuple:
    """The runtimes whose packages can be imported here (torch always)."""
    import importlib.util

    return ("torch",) + tuple(n for n in _AUTO_ORDER if importlib.util.find_spec(_MODULES[n]) is not None)


class Runtime:
    """Runs a frozen backbone on batches of patches ``(N, 3, S, S)`` (0-255 RGB floats) on the CPU.

    Attributes
    ----------
    name : str
        ``torch``, ``openvino`` or ``onnxruntime``.
    version : str
        The runtime package's version (provenance).
    """

    name = "torch"

    def __init__(self, backbone: FrozenBackbone) -> None:
        self.backbone = backbone
        self.version = torch.__version__

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def describe(self) -> str:
        return f"{self.name} {self.version}"


class _OnnxRuntime(Runtime):
    name = "onnxruntime"

    def __init__(self, backbone: FrozenBackbone, model: Path, threads: int) -> None:
        import onnxruntime as ort

        super().__init__(backbone)
        self.version = ort.__version__
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Threads that spin at barriers are what collapses throughput on shared cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        key = ("onnxruntime", str(model), threads)
        if key not in _COMPILED:
            _COMPILED[key] = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        self.session = _COMPILED[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"images": x.contiguous().numpy()})[0]
        return torch.from_numpy(out)


class _OpenVinoRuntime(Runtime):
    name = "openvino"

    def __init__(self, backbone: FrozenBackbone, model: Path, threads: int) -> None:
        import openvino as ov

        super().__init__(backbone)
        self.version = ov.__version__
        key = ("openvino", str(model), threads)
        if key not in _COMPILED:
            core = ov.Core()
            # f32: OpenVINO's default on CPUs with bf16 units changes the features (cosine 0.97).
            config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads,
                      "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False,
                      "CACHE_DIR": str(_export_dir() / "openvino-cache")}
            _COMPILED[key] = core.compile_model(core.read_model(str(model)), "CPU", config)
        self.request = _COMPILED[key].create_infer_request()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.request.infer({0: x.contiguous().numpy()})
        return torch.from_numpy(np.array(next(iter(out.values()))))


def _export_dir() -> Path:
    return Path(torch.hub.get_dir()) / "featurecache"


def exported_model(backbone: FrozenBackbone, input_size: int) -> Path:
    """The backbone as ONNX (dynamic batch, fixed ``input_size``), exported once and kept on disk."""
    s = backbone.spec
    arch = s.architecture.replace(":", "-").replace("/", "-")
    layer = s.layer.replace("/", "-")
    # Everything the graph bakes in: weights, normalisation, exporter and opset.
    baked = hashlib.sha256(f"{s.weights_sha256}|{s.preprocessing.to_dict()}|{torch.__version__}|{_OPSET}".encode())
    path = _export_dir() / f"{arch}-{layer}-{baked.hexdigest()[:16]}-{input_size}px.onnx"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    example = torch.rand(2, 3, input_size, input_size) * 255
    net = backbone.to("cpu").to(memory_format=torch.contiguous_format)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (example,), str(tmp), input_names=["images"], output_names=["features"],
                              dynamic_axes={"images": {0: "n"}, "features": {0: "n"}}, dynamo=False,
                              opset_version=_OPSET)
        os.replace(tmp, path)
    except Exception as e:  # exporters raise many kinds
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise BackboneError(f"{s.name}: cannot export to ONNX for another runtime ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160] if str(e) else ''}); use --runtime torch",
                            param="runtime") from None
    logger.info("exported %s at %d px to %s", s.name, input_size, path)
    return path


def _agrees(runtime: Runtime, backbone: FrozenBackbone, input_size: int) -> float:
    """Largest relative difference to torch on a fixed probe batch."""
    gen = torch.Generator().manual_seed(0)
    probe = torch.rand(3, 3, input_size, input_size, generator=gen) * 255
    with torch.inference_mode():
        ref = backbone(probe).float()
        got = runtime(probe).float()
    scale = float(ref.abs().max()) or 1.0
    return float((got - ref).abs().max()) / scale


def build_runtime(backbone: FrozenBackbone, name: str = "auto", *, input_size: int, threads: int,
                  device: Optional[torch.device] = None, dense: bool = False) -> Runtime:
    """The runtime that extraction runs the backbone with.

    Parameters
    ----------
    backbone : FrozenBackbone
    name : {"auto", "torch", "openvino", "onnxruntime"}
    input_size : int
        Patch side (the exported graph's fixed spatial size).
    threads : int
        Intra-op threads.
    device : torch.device, optional
        Other runtimes are CPU only: ``auto`` is torch on CUDA, a named one is refused.
    dense : bool
        Dense mode runs the trunk on whole resized images (no fixed size): torch only.

    Raises
    ------
    BackboneError
        Naming ``runtime``: not installed, not for this device or mode, or features that
        disagree with torch's beyond :data:`TOLERANCE`.
    """
    if name not in RUNTIMES:
        raise BackboneError(f"must be one of {', '.join(RUNTIMES)}, got {name!r}", param="runtime")
    torch_only = (device is not None and device.type != "cpu") or dense
    if name == "torch" or (name == "auto" and torch_only):
        return Runtime(backbone)
    if torch_only:
        why = "dense mode runs the trunk on whole images of varying size" if dense else "it runs on the CPU only"
        raise BackboneError(f"{name}: not available here ({why}); use --runtime torch or auto", param="runtime")
    candidates = [name] if name != "auto" else [n for n in _AUTO_ORDER if n in installed_runtimes()]
    if name != "auto" and name not in installed_runtimes():
        raise BackboneError(f"{name} is not installed: pip install \"featurecache[{name}]\"", param="runtime")
    reasons = [] if candidates else ["neither OpenVINO nor ONNX Runtime is installed; pip install "
                                     "\"featurecache[openvino]\" runs crop mode about 3x faster on the CPU"]
    model = None
    for candidate in candidates:
        try:
            model = exported_model(backbone, input_size)
            runtime = (_OpenVinoRuntime if candidate == "openvino" else _OnnxRuntime)(backbone, model, threads)
            diff = _agrees(runtime, backbone, input_size)
        except BackboneError as e:
            if name != "auto":
                raise
            reasons.append(e.message.removesuffix("; use --runtime torch"))  # the export failed: no runtime can run it
            break
        except Exception as e:  # a runtime that cannot load the graph: auto moves on
            if name != "auto":
                raise BackboneError(f"{candidate}: cannot run {backbone.spec.name} exported as {model} "
                                    f"({type(e).__name__}); delete the file to export it again, or use "
                                    "--runtime torch", param="runtime") from None
            reasons.append(f"{candidate} cannot run the exported model ({type(e).__name__})")
            continue
        if diff <= TOLERANCE:
            return runtime
        message = (f"{candidate}: features differ from torch's by {diff:.1e} of their scale, above the tolerance "
                   f"{TOLERANCE:g}")
        if name != "auto":
            raise BackboneError(message + "; use --runtime torch", param="runtime")
        reasons.append(message)
    _warn_once(f"--runtime auto: torch runs the backbone ({'; '.join(reasons)})")
    return Runtime(backbone)


#: The fallback messages this process has given (each is said once, not once per image batch or head).
_SAID: set = set()


def _warn_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        logger.warning("%s", message)
