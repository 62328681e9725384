"""One job on many processes: the world read from torchrun or SLURM, and a gloo group that coordinates it.

featurecache does not start processes: ``torchrun`` (or ``srun``) does, and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` (``SLURM_PROCID``, ``SLURM_NTASKS``,
``SLURM_LOCALID``, ``SLURM_NTASKS_PER_NODE``). :func:`world_from_env` reads them (one
process when none is set); :class:`Coordinator` joins a torch.distributed process group with
the gloo backend (barriers and small objects only; the features never travel over it).
torch is imported only when a group is made: the command line reads this module without it.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from featurecache.errors import FeaturecacheError

__all__ = ["Coordinator", "World", "share", "world_from_env"]

#: How long a rank may wait at a barrier for the others (a rank with a larger share of the
#: work can take hours); a rank that dies ends the job at once (torchrun, srun --kill-on-bad-exit).
BARRIER_TIMEOUT = datetime.timedelta(days=2)

_TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
_SLURM = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE")


@dataclass(frozen=True)
class World:
    """Where this process stands in its job.

    Attributes
    ----------
    rank, size : int
        This process's rank and the number of processes of the job.
    local_rank, local_size : int
        Its rank and the number of processes on this machine (CUDA device, CPU share).
    launcher : str
        ``"torchrun"``, ``"slurm"`` or ``"none"``.
    job : str
        The launcher's id of this job (``TORCHELASTIC_RUN_ID``; ``SLURM_JOB_ID.SLURM_STEP_ID``).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    launcher: str = "none"
    job: str = ""

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def leader(self) -> bool:
        """Rank 0: it locks the output, assembles it, shows progress and speaks for the job."""
        return self.rank == 0


def _int(env: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    text = env.get(name)
    if text is None or text == "":
        if default is None:
            raise FeaturecacheError(f"{name} is not set (launched by torchrun or srun?)")
        return default
    m = re.match(r"^\s*(\d+)", text)  # SLURM_NTASKS_PER_NODE may read "2(x3)" or "2,1"
    if not m:
        raise FeaturecacheError(f"{name}={text!r} is not a number")
    return int(m.group(1))


def world_from_env(env: Optional[Mapping[str, str]] = None) -> World:
    """The world of this process: torchrun's variables, else SLURM's under ``srun``, else one process.

    Raises
    ------
    FeaturecacheError
        A variable that is not a number, or a rank outside its world, naming the variable.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        names, launcher = _TORCHRUN, "torchrun"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        names, launcher = _SLURM, "slurm"
    else:
        return World()
    rank, size = _int(env, names[0]), _int(env, names[1])
    local_rank = _int(env, names[2], 0)
    local_size = _int(env, names[3], 1)
    if size < 1 or rank >= size:
        raise FeaturecacheError(f"{names[0]}={rank} is outside {names[1]}={size}")
    if local_rank >= max(local_size, 1):
        local_size = local_rank + 1  # a launcher that does not say: at least this many here
    job = (env.get("TORCHELASTIC_RUN_ID", "") if launcher == "torchrun"
           else f"{env.get('SLURM_JOB_ID', '')}.{env.get('SLURM_STEP_ID', '')}")
    return World(rank, size, local_rank, max(local_size, 1), launcher, re.sub(r"[^\w.-]", "_", job))


def share(items: list, weights: list, world: World) -> list:
    """This rank's contiguous, balanced share of ``items`` (by ``weights``): disjoint and covering over ranks.

    An item goes to the rank whose slice of the total weight holds the item's midpoint, so
    shares differ by at most one item's weight from the even split.
    """
    if not world.distributed:
        return list(items)
    total = float(sum(weights)) or 1.0
    out, before = [], 0.0
    for item, w in zip(items, weights):
        mid = (before + w / 2) / total
        if min(int(mid * world.size), world.size - 1) == world.rank:
            out.append(item)
        before += w
    return out


class Coordinator:
    """The job's process group while it runs (gloo), or nothing for a single process.

    Use as a context manager. Rendezvous: ``env://`` when ``MASTER_ADDR`` is set (torchrun
    sets it), else a file store ``rendezvous`` on the shared file system (``srun`` without a
    master address). A group made elsewhere (the caller's own ``init_process_group``) is
    used as it is and left open.

    Parameters
    ----------
    world : World
    rendezvous : path, optional
        Where the file-store rendezvous may live (on a file system every node sees); the
        file is this path plus the job's id, removed by the leader at the end.
    """

    def __init__(self, world: World, *, rendezvous: Optional[Path] = None) -> None:
        self.world, self._made = world, False
        self.rendezvous = (Path(f"{rendezvous}.rendezvous-{world.job or 'job'}") if rendezvous is not None
                           else None)

    @property
    def leader(self) -> bool:
        return self.world.leader

    def __enter__(self) -> "Coordinator":
        if not self.world.distributed:
            return self
        import torch.distributed as dist

        if dist.is_initialized():
            if dist.get_world_size() != self.world.size:
                raise FeaturecacheError(f"the process group has {dist.get_world_size()} processes, "
                                        f"the environment says {self.world.size}")
            return self
        if os.environ.get("MASTER_ADDR"):
            init = "env://"
        elif self.rendezvous is not None:
            init = Path(self.rendezvous).resolve().as_uri()
        else:
            raise FeaturecacheError("MASTER_ADDR is not set and there is no rendezvous file")
        dist.init_process_group("gloo", init_method=init, rank=self.world.rank, world_size=self.world.size,
                                timeout=BARRIER_TIMEOUT)
        self._made = True
        return self

    def __exit__(self, *exc) -> None:
        if self._made:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._made = False
            if self.leader and self.rendezvous is not None and not os.environ.get("MASTER_ADDR"):
                try:
                    os.unlink(self.rendezvous)
                except OSError:
                    pass

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.world.distributed:
            import torch.distributed as dist

            dist.barrier()

    def from_leader(self, make: Callable[[], Any]) -> Any:
        """``make()`` run on the leader only; its result (a picklable object) handed to every rank."""
        if not self.world.distributed:
            return make()
        import torch.distributed as dist

        box = [make() if self.leader else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.world.distributed:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world.size
        dist.all_gather_object(out, obj)
        return out
