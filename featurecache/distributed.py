"""One job on many processes: the world read from torchrun or SLURM, and a gloo group that coordinates it.

featurecache does not start processes: ``torchrun`` (or ``srun``) does, and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``,
``SLURM_LOCALID``, ``SLURM_STEP_TASKS_PER_NODE``). :func:`world_from_env` reads them (one
process when none is set); :class:`Coordinator` joins a torch.distributed process group with
the gloo backend (barriers and small objects only; the features never travel over it).
torch is imported only when a group is made: the command line reads this module without it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from featurecache.errors import FeaturecacheError

__all__ = ["Coordinator", "World", "share", "stop_on_sigterm", "world_from_env"]

#: How long the processes wait for each other to start, and for a small exchange.
RENDEZVOUS_TIMEOUT = datetime.timedelta(minutes=10)
#: How long a rank may wait at the barrier for the others to finish their shares (a larger
#: share can take hours); a rank that stops ends the wait at once (its connection closes).
BARRIER_TIMEOUT = datetime.timedelta(days=2)

_TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
# The step's variables, which srun sets: an sbatch script's own shell has SLURM_NTASKS and
# SLURM_PROCID=0 too, and must stay a job of one process.
_SLURM = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE")


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
    # SLURM_STEP_TASKS_PER_NODE may read "2(x3)" or "2,1": its first number is this node's.
    m = re.fullmatch(r"\s*(\d+)\s*" + (r"(\(x\d+\))?(,.*)?" if name == "SLURM_STEP_TASKS_PER_NODE" else ""), text)
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
    elif "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
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
    job = (env.get("TORCHELASTIC_RUN_ID", "") if launcher == "torchrun"  # a requeued SLURM job restarts its count
           else f"{env.get('SLURM_JOB_ID', '')}.{env.get('SLURM_STEP_ID', '')}.{env.get('SLURM_RESTART_COUNT', '0')}")
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
        self.world, self._made, self._waiting = world, False, None
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
        try:
            dist.init_process_group("gloo", init_method=init, rank=self.world.rank, world_size=self.world.size,
                                    timeout=RENDEZVOUS_TIMEOUT)
            self._made = True
            # The long wait for the others' shares has its own group and timeout.
            self._waiting = dist.new_group(backend="gloo", timeout=BARRIER_TIMEOUT)
        except (RuntimeError, ValueError) as e:  # torch's store and gloo errors, a bad MASTER_PORT
            where = "MASTER_ADDR/MASTER_PORT" if init == "env://" else str(self.rendezvous)
            raise FeaturecacheError(f"process {self.world.rank} of {self.world.size} could not join the job through "
                                    f"{where} within {RENDEZVOUS_TIMEOUT} ({_first_line(e)})") from None
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

    def barrier(self, while_waiting: Optional[Callable[[], None]] = None) -> None:
        """Wait until every rank gets here (up to :data:`BARRIER_TIMEOUT`), calling ``while_waiting()``
        about every half second meanwhile (the leader's progress bar)."""
        if not self.world.distributed:
            return
        import torch.distributed as dist

        with _peers_alive(self.world):
            work = dist.barrier(group=self._waiting, async_op=True)
            while not work.is_completed():
                if while_waiting is not None:
                    while_waiting()
                time.sleep(0.5)
            work.wait()

    def from_leader(self, make: Callable[[], Any]) -> Any:
        """``make()`` run on the leader only; its result (a picklable object) handed to every rank."""
        if not self.world.distributed:
            return make()
        import torch.distributed as dist

        box = [make() if self.leader else None]
        with _peers_alive(self.world):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.world.distributed:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world.size
        with _peers_alive(self.world):
            dist.all_gather_object(out, obj)
        return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


@contextlib.contextmanager
def _peers_alive(world: World):
    """A collective that fails because another process stopped (its connection closed, a timeout) is one line;
    that process's own output says why it stopped."""
    try:
        yield
    except RuntimeError as e:
        raise FeaturecacheError(f"process {world.rank} of {world.size}: another process of the job stopped or "
                                f"stopped answering ({_first_line(e)}); its own output says why") from None


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """A scheduler's SIGTERM (a time limit, ``scancel``) stops a command as Ctrl-C does: committed work
    kept, temporary files removed, one line. Only the command line sets it, in its main thread."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupted)
