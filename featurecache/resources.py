"""Compute resources: the one rule that picks a torch device, the CPU thread policy, the memory budget."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Union

from featurecache.distributed import world_from_env
from featurecache.errors import FeaturecacheError, integer_at_least

__all__ = ["ASSEMBLE_MODES", "BOX_THRESHOLD", "DEFAULT_MAP_METHOD", "DEVICES", "MAP_METHODS",
           "MAX_STRIDE", "POINTING_TOLERANCE", "RUNTIMES", "apply_threads", "available_cpus", "available_memory",
           "cpu_threads", "features_bytes", "memory_budget", "parse_size", "resolve_device"]

#: What every ``device`` option accepts.
DEVICES = ("auto", "cpu", "cuda")

#: What every ``runtime`` option accepts (:mod:`featurecache.runtimes`).
RUNTIMES = ("auto", "torch", "openvino", "onnxruntime")

#: How a finished cache is laid out (``extract --assemble``): one self-contained file, or the
#: file plus ``OUT.<run>.data/`` holding the part files its features are mapped onto.
ASSEMBLE_MODES = ("copy", "virtual")

#: How localisation maps are made (:mod:`featurecache.localize`): class activation maps on the
#: dense trunk (the cells' log-odds averaged over scales), their geometric mean with the window
#: map, the paper's per-pixel mean of patch scores, and an attention head's per-pixel mean of
#: its patch attention weights.
MAP_METHODS = ("cam", "cam*windows", "windows", "attention")

#: The map method of ``localize``, ``predict --maps`` and the API: the best measured one
#: (docs/results.md, "Localisation maps").
DEFAULT_MAP_METHOD = "cam"

#: Dense mode and cam maps: the default largest trunk input side (larger images run in overlapping
#: tiles) and the least one allowed (two cells of the trunk's stride of 32), for extract, predict
#: and maps alike.
DEFAULT_MAX_SIDE = 2048
MIN_MAX_SIDE = 64

#: Largest map cell, in pixels (a picture of the map is drawn at cells × stride pixels).
MAX_STRIDE = 1024

#: Pixels a map's peak may lie outside a box and still point at it (Oquab et al., 2015 use 18
#: on VOC 2012; 15 is the value peers report on VOC and COCO).
POINTING_TOLERANCE = 15

#: A box is the peak's connected component of cells whose log-odds reach this fraction of the
#: way from the map's minimum to its peak (chosen on the VOC sample's train images: 0.3-0.8
#: were tried; docs/results.md).
BOX_THRESHOLD = 0.5


def parse_size(text: str) -> int:
    """``"4G"``, ``"512M"``, ``"1.5GiB"``, ``"1000000"`` -> bytes (else a ``ValueError`` saying what is expected)."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    v = text.strip().upper().rstrip("B").rstrip("I")
    try:
        number = float(v[:-1]) * units[v[-1]] if v and v[-1] in units else float(v)
    except ValueError:
        raise ValueError(f"expected a size like 4G or 512M, got {text!r}") from None
    if not (number >= 1 and number < 2**63):  # also refuses nan
        raise ValueError(f"must be a positive size like 4G or 512M, got {text!r}")
    return int(number)


def resolve_device(device: Union[str, "torch.device"] = "auto") -> "torch.device":  # noqa: F821
    """The torch device for a ``device`` option.

    ``"auto"`` is CUDA when available, else the CPU; ``"cuda"`` without a CUDA device is
    refused (a :class:`FeaturecacheError` naming ``device``) rather than failing later. In a
    job of several processes (torchrun, srun) ``cuda`` means ``cuda:LOCAL_RANK``.
    """
    import torch  # here, not above: the command line reads DEVICES without loading torch

    if str(device) == "auto":
        d = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            d = torch.device(device)
        except (RuntimeError, TypeError):
            raise FeaturecacheError(f"unknown device {device!r} (auto, cpu, cuda)", param="device") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise FeaturecacheError("cuda: no CUDA device is available (use auto or cpu)", param="device")
    if d.type == "cuda" and d.index is None:
        world = world_from_env()  # one process per GPU under torchrun/srun: cuda:LOCAL_RANK
        if world.distributed:
            d = torch.device("cuda", world.local_rank % torch.cuda.device_count())
    return d


def available_memory() -> int:
    """Bytes of memory available to this process now: the host's ``MemAvailable``, or less when a
    cgroup (a container, a SLURM job's ``--mem``) limits this process or one of its ancestors
    (the limit less what the group uses, its reclaimable file cache not counted as used)."""
    host = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    host = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if host is None:
        try:
            host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # pragma: no cover
            host = 4 << 30
    group = _cgroup_memory()
    return host if group is None else min(host, group)


def memory_budget(memory_limit: Optional[int] = None) -> int:
    """Bytes of training features to hold in memory: ``memory_limit``, or half the available memory."""
    return int(memory_limit) if memory_limit is not None else available_memory() // 2


def features_bytes(n_rows: int, dim: int) -> int:
    """Bytes of ``n_rows`` patches' features held in memory as float32: what a memory limit counts."""
    return int(n_rows) * int(dim) * 4


# --------------------------------------------------------------------------- cgroups

#: Where cgroup hierarchies are mounted, and this process's cgroup membership (tests point them elsewhere).
_CGROUP_ROOT = Path("/sys/fs/cgroup")
_SELF_CGROUP = Path("/proc/self/cgroup")

#: Limits at or above this are "no limit" (cgroup v1 writes PAGE_COUNTER_MAX pages, about 2**63).
_NO_LIMIT = 1 << 60


def _cgroup_dirs(controller: str) -> list:
    """The folders of this process's cgroup and of its ancestors, innermost first, that hold
    ``controller``'s files: v1's ``ROOT/<controller>/<path>``, v2's ``ROOT/<path>`` (or
    ``ROOT/unified/<path>`` on hybrid systems). Inside a cgroup namespace the mount is the
    process's own group, so a path that is not there means the mount's root."""
    paths = {}
    try:
        for line in _SELF_CGROUP.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                paths[c] = path
    except (OSError, ValueError):
        return []
    dirs = []
    for mount, key in ((_CGROUP_ROOT / controller, controller), (_CGROUP_ROOT, ""), (_CGROUP_ROOT / "unified", "")):
        if key not in paths or not mount.is_dir():
            continue
        here = mount / paths[key].lstrip("/")
        here = here if here.is_dir() else mount
        while True:
            dirs.append(here)
            if here == mount or mount not in here.parents:
                break
            here = here.parent
    return dirs


def _read_number(path: Path) -> Optional[int]:
    """The integer a one-value cgroup file holds; None for ``max``, a missing file or anything else."""
    try:
        text = path.read_text().split()
        return int(text[0]) if text and text[0] != "max" else None
    except (OSError, ValueError):
        return None


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_memory() -> Optional[int]:
    """Bytes this process's cgroups leave it (the tightest of its group and ancestors), None without a limit."""
    best = None
    for d in _cgroup_dirs("memory"):
        # v2 then v1: the limit, the usage and the reclaimable file cache inside it.
        for limit_file, usage_file, inactive in (("memory.max", "memory.current", "inactive_file"),
                                                 ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                  "total_inactive_file")):
            limit = _read_number(d / limit_file)
            if limit is None or limit >= _NO_LIMIT:
                continue
            used = (_read_number(d / usage_file) or 0) - _stat_value(d / "memory.stat", inactive)
            left = max(0, limit - max(0, used))
            best = left if best is None else min(best, left)
    return best


def _cgroup_cpus() -> Optional[float]:
    """The CPU quota of this process's cgroups in CPUs (v2 ``cpu.max``, v1 ``cfs_quota``; the tightest
    of its group and ancestors), None without one."""
    best = None
    for d in _cgroup_dirs("cpu"):
        quota, period = None, None
        try:
            text = (d / "cpu.max").read_text().split()
            if len(text) == 2 and text[0] != "max":
                quota, period = int(text[0]), int(text[1])
        except (OSError, ValueError):
            quota, period = _read_number(d / "cpu.cfs_quota_us"), _read_number(d / "cpu.cfs_period_us")
        if quota is not None and period and quota > 0 and period > 0:
            best = quota / period if best is None else min(best, quota / period)
    return best


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask (``taskset``, SLURM), capped by a cgroup CPU quota (containers)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    quota = _cgroup_cpus()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, n)


def cpu_threads(threads: Optional[int] = None) -> int:
    """Intra-op threads for CPU work: ``threads`` when given, else ``OMP_NUM_THREADS`` when set, else
    :func:`available_cpus` (shared among the job's processes on this machine, under torchrun or srun).

    Decoding workers are not subtracted: they decode an image in milliseconds, then wait
    while the network spends seconds on its patches (measured in docs/performance.md).
    """
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        if env.isdigit() and int(env) > 0:
            return int(env)  # the user's own setting wins
        return max(1, available_cpus() // world_from_env().local_size)  # processes of one job share the machine
    if not integer_at_least(threads, 1):
        raise FeaturecacheError(f"must be a positive integer, got {threads!r}", param="threads")
    return threads


def apply_threads(threads: Optional[int] = None) -> int:
    """Set torch's intra-op threads by :func:`cpu_threads` (the one place that does); returns the number."""
    import torch

    n = cpu_threads(threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
