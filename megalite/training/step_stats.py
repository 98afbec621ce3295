"""Each iteration's loss and stop votes: one all-reduce left in flight, read back later.

On a GPU, reading a device value on the host (``.item()``, ``.tolist()``) waits for everything
queued before it; done at the end of every iteration it empties the device's queue while the
host prepares the next one. So the training loop (:mod:`megalite.training.trainer`) queues an
iteration's stats (:meth:`StepStats.queue`: this rank's loss sum and stop votes, float64 [3],
summed over the world by an asynchronous all-reduce) and reads them back (:meth:`StepStats.settle`)
one iteration later, after the next iteration's forward/backward is queued, or at once where
it needs them (logging, evaluation, checkpoints, the end).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError
from megalite.optim.base import StepResult
from megalite.training.signals import StopMonitor

__all__ = ["Settled", "StepStats"]


@dataclass
class _Pending:
    """An iteration whose stats may still be in flight (``work``)."""

    iteration: int
    loss: object
    stats: torch.Tensor
    work: object | None
    step: StepResult


@dataclass
class Settled:
    """An iteration's results read back: global-batch mean loss, the optimizer's result in
    Python numbers, and the stop reason its votes gave (None: go on)."""

    loss: float
    step: StepResult
    stop: str | None


class StepStats:
    """At most one iteration in flight (``pending``) and the ones read back but not yet taken.

    Args:
        ps: this rank's layout (the all-reduce runs over the world).
        device: where the stats live (the device NCCL reduces on; CPU for gloo).
    """

    def __init__(self, ps: ParallelState, device: torch.device):
        self.ps, self.device = ps, device
        self.pending: _Pending | None = None
        self._settled: list[Settled] = []

    def queue(self, iteration: int, loss, reported: list[torch.Tensor], step: StepResult,
              votes: list[float]) -> None:
        """Start iteration ``iteration``'s one collective: the loss sum of the step's loss
        object (``loss.local_sum`` of ``reported``) and ``votes`` ([signal, time], 0/1)."""
        # torch.full writes each vote from a kernel argument: no blocking host-to-device copy
        stats = torch.cat([loss.local_sum(reported, self.ps, self.device)] + [
            torch.full((1,), v, dtype=torch.float64, device=self.device) for v in votes])
        work = dist.all_reduce(stats, async_op=True) if self.ps.world_size > 1 else None
        self.pending = _Pending(iteration, loss, stats, work, step)

    def settle(self) -> Settled | None:
        """Read the pending iteration back (the iteration's host sync); None when none is
        pending. A non-finite loss is an error here."""
        p, self.pending = self.pending, None
        if p is None:
            return None
        if p.work is not None:
            p.work.wait()
        total, signal_votes, time_votes = p.stats.tolist()
        mean = p.loss.mean_of(total, self.ps)
        if not math.isfinite(mean):
            raise MegaliteError(f"iteration {p.iteration}: the loss is {mean}; "
                                "lower --lr or use --bf16/--fp16 loss scaling")
        settled = Settled(mean, p.step.host(),
                          StopMonitor.decide(signal_votes, time_votes))
        self._settled.append(settled)
        return settled

    def take(self) -> list[Settled]:
        """The iterations read back since the last call, in order."""
        out, self._settled = self._settled, []
        return out
