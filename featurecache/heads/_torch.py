"""The one training loop of the torch heads, their learning-rate/stopping schedules, and tensor persistence."""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from featurecache.errors import HeadError
from featurecache.heads.options import LBFGS_WINDOW
from featurecache.resources import resolve_device

__all__ = ["PatienceSchedule", "PlateauSchedule", "TorchState", "diverged", "train_lbfgs", "train_torch"]


class PlateauSchedule:
    """Divide the learning rate by 10 when the monitored loss stops improving by ``tol`` (relative);
    stop at the ``drops``-th division. The monitored loss is the held-out one when there is one."""

    def __init__(self, drops: int, tol: float) -> None:
        self.drops, self.tol, self.best, self.count = int(drops), float(tol), math.inf, 0

    def update(self, train_loss: float, val_loss: Optional[float], opt: torch.optim.Optimizer) -> tuple:
        """``(improved, stop)`` after an epoch."""
        monitored = val_loss if val_loss is not None else train_loss
        if monitored < self.best * (1 - self.tol):
            self.best = monitored
            return True, False
        self.count += 1
        if self.count >= self.drops:
            return False, True
        for g in opt.param_groups:
            g["lr"] /= 10
        return False, False


class PatienceSchedule:
    """A fixed learning rate; with held-out data, stop after ``patience`` epochs without a better loss."""

    def __init__(self, patience: int) -> None:
        self.patience, self.best, self.bad = int(patience), math.inf, 0

    def update(self, train_loss: float, val_loss: Optional[float], opt: torch.optim.Optimizer) -> tuple:
        if val_loss is None:
            return False, False
        if val_loss < self.best - 1e-4:
            self.best, self.bad = val_loss, 0
            return True, False
        self.bad += 1
        return False, self.bad >= self.patience


def train_torch(make: Callable[[], tuple], *, seed: int, device: torch.device, max_epochs: int,
                run_epoch: Callable[[nn.Module, torch.optim.Optimizer, int], float],
                validate: Optional[Callable[[nn.Module], float]], schedule) -> tuple:
    """Train a torch head: seeded initialisation, epochs, schedule, the best held-out epoch kept.

    Parameters
    ----------
    make : callable
        ``() -> (net on device, optimiser)``; called with torch's RNG seeded by ``seed``
        (forked, so the caller's RNG state is untouched).
    seed : int
    device : torch.device
    max_epochs : int
    run_epoch : callable
        ``(net, optimiser, epoch) -> mean training loss``; the net is in training mode.
    validate : callable, optional
        ``net -> held-out loss``.
    schedule : PlateauSchedule or PatienceSchedule

    Returns
    -------
    net : nn.Module
        In evaluation mode, with the best held-out epoch's parameters when there was
        held-out data, else the last epoch's.
    history : list of dict
        Per epoch: ``epoch``, ``train_loss``, ``val_loss`` (or None), ``lr``.
    """
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        net, opt = make()
        history, best_state = [], None
        for epoch in range(int(max_epochs)):
            net.train()
            lr = opt.param_groups[0]["lr"]
            train_loss = run_epoch(net, opt, epoch)
            val_loss = validate(net) if validate is not None else None
            _check_finite(train_loss, val_loss, epoch, lr)
            history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "lr": lr})
            improved, stop = schedule.update(train_loss, val_loss, opt)
            if improved and val_loss is not None:
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            if stop:
                break
    if best_state is not None:
        net.load_state_dict(best_state)
    return net.eval(), history


def _seeded(make: Callable[[], nn.Module], seed: int, device: torch.device) -> nn.Module:
    """``make()`` with torch's RNG seeded by ``seed``, the caller's RNG state left as it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return make()


def train_lbfgs(make: Callable[[], nn.Module], full_loss: Callable[[nn.Module], float], *, seed: int,
                device: torch.device, weight_decay: float, max_passes: int, tol: float) -> tuple:
    """Train a torch head full-batch with L-BFGS (strong Wolfe line search) to the loss's plateau.

    Parameters
    ----------
    make : callable
        ``() -> net on device``; called with torch's RNG seeded by ``seed`` (forked).
    full_loss : callable
        ``net -> loss``: one pass over all training data, gradients accumulated into the
        parameters' ``.grad`` (which are zero on entry), the loss returned as a float.
    seed : int
    device : torch.device
    weight_decay : float
        L2 penalty ``weight_decay / 2 · ||θ||²`` over all parameters (Adam's ``weight_decay``).
    max_passes : int
        Cap on the passes (loss evaluations); a line search under way may finish past it.
    tol : float
        Stop when the loss fell by less than ``tol`` (relative) over the last
        :data:`LBFGS_WINDOW` iterations; 0 runs to ``max_passes`` or until the loss stops changing.

    Returns
    -------
    net : nn.Module
        In evaluation mode.
    history : list of dict
        Per pass: ``epoch`` (the pass), ``train_loss`` (with the penalty), ``val_loss`` (None), ``lr`` (None).
    """
    net = _seeded(make, seed, device)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=1, max_eval=64, history_size=50, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-12)
    history: list = []
    last: dict = {}

    def closure():
        at = torch.cat([p.detach().reshape(-1) for p in params])
        if last and torch.equal(last["at"], at):  # the step's opening evaluation repeats the line search's last
            for p, g in zip(params, last["grads"]):
                p.grad = g.clone()
            return last["loss"]
        for p in params:
            p.grad = torch.zeros_like(p)
        net.train()
        loss = float(full_loss(net))
        for p in params:
            loss += 0.5 * float(weight_decay) * float((p.detach() ** 2).sum())
            p.grad.add_(p.detach(), alpha=float(weight_decay))
        _check_finite(loss, None, len(history), 1.0)
        history.append({"epoch": len(history) + 1, "train_loss": loss, "val_loss": None, "lr": None})
        last.update(at=at, grads=[p.grad.clone() for p in params], loss=torch.tensor(loss))
        return last["loss"]

    losses: list = []
    while len(history) < int(max_passes):
        losses.append(float(opt.step(closure)))
        if len(losses) > LBFGS_WINDOW and losses[-1 - LBFGS_WINDOW] - losses[-1] <= float(tol) * abs(losses[-1]):
            break
    return net.eval(), history


def diverged(what: str, lr: float) -> HeadError:
    """The error of a training that diverged: one line naming the learning rate (``param="lr"``; the
    training entry point names the user's option)."""
    return HeadError(f"training diverged: {what} at learning rate {lr:g}; lower it", param="lr")


def _check_finite(train_loss: float, val_loss: Optional[float], epoch: int, lr: float) -> None:
    """A diverged training is an error naming the learning rate, never a head of NaN weights."""
    for name, loss in (("training", train_loss), ("validation", val_loss)):
        if loss is not None and not math.isfinite(loss):
            raise diverged(f"the {name} loss is {loss} after epoch {epoch + 1}", lr)


class TorchState:
    """Saving and restoring a torch head's ``net_`` as plain tensors (no pickle).

    The class provides ``_build(n_features, n_outputs) -> nn.Module`` and a ``device``
    parameter.
    """

    def _state(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.net_.state_dict().items()}

    def _restore(self, state: dict, n_features: int, n_outputs: int, *, device: str = "auto") -> None:
        net = self._build(n_features, n_outputs)
        net.load_state_dict(state)
        self.net_ = net.to(resolve_device(self.device)).eval()
        self.n_features_in_, self.n_outputs_ = n_features, n_outputs

    def _forward(self, X, *, batch: int = 8192) -> torch.Tensor:
        """Raw outputs of ``net_`` for features ``X`` (n, d), computed ``batch`` rows at a time, returned on the CPU."""
        dev = next(self.net_.parameters()).device
        X = np.asarray(X)
        if X.dtype not in (np.float16, np.float32):
            X = X.astype(np.float32)
        x = torch.from_numpy(np.ascontiguousarray(X))
        with torch.inference_mode():  # float16 features become float32 a batch at a time, on the device
            out = [self.net_(x[s:s + batch].to(dev).float()).float().cpu() for s in range(0, len(x), batch)]
        return torch.cat(out) if out else torch.zeros((0, self.n_outputs_))
