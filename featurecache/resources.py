"""Compute resources: the one rule that picks a torch device, and the memory budget for training data."""

from __future__ import annotations

import os
from typing import Optional, Union

from featurecache.errors import FeaturecacheError

__all__ = ["DEVICES", "available_memory", "memory_budget", "resolve_device"]

#: What every ``device`` option accepts.
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: Union[str, "torch.device"] = "auto") -> "torch.device":  # noqa: F821
    """The torch device for a ``device`` option.

    ``"auto"`` is CUDA when available, else the CPU; ``"cuda"`` without a CUDA device is
    refused (a :class:`FeaturecacheError` naming ``device``) rather than failing later.
    """
    import torch  # here, not above: the command line reads DEVICES without loading torch

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise FeaturecacheError(f"unknown device {device!r} (auto, cpu, cuda)", param="device") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise FeaturecacheError("cuda: no CUDA device is available (use auto or cpu)", param="device")
    return d


def available_memory() -> int:
    """Bytes of memory available to this process now (``MemAvailable`` on Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 4 << 30


def memory_budget(memory_limit: Optional[int] = None) -> int:
    """Bytes of training features to hold in memory: ``memory_limit``, or half the available memory."""
    return int(memory_limit) if memory_limit is not None else available_memory() // 2
