"""Learning rate as a function of the optimizer steps taken: linear warmup, then
constant/linear/cosine decay (Megatron-LM's OptimizerParamScheduler, its formulas in its
operation order).

``lr_at(t)`` is the rate after ``t`` optimizer steps (``t >= 0``): the rate of step ``t + 1``,
which is what Megatron-LM's scheduler holds after ``t`` increments (and what it logs after step
``t``). With ``W`` warmup steps, peak ``lr``, floor ``min_lr``, warmup start ``init``
(``init_lr``, default 0) and decay end ``D`` (``decay_iters``):

* ``W > 0`` and ``t <= W``: ``init + (lr - init) * t / W`` (so the first step uses ``init``);
* ``W < t <= D``: with ``r = (t - W) / (D - W)``,
  ``linear``: ``min_lr + (lr - min_lr) * (1 - r)``;
  ``cosine``: ``min_lr + (lr - min_lr) * (1 + cos(pi * r)) / 2``;
  ``constant``: ``lr``;
* ``t > D``: ``min_lr`` (``lr`` for ``constant``).

The schedule is stateless (a pure function of ``t``), so resuming from a checkpoint only needs
the step count. A sample-based run (megalite.training.schedule) counts ``t``, ``W`` and ``D`` in
samples, and ``W`` may then be fractional (``--lr-warmup-fraction``).
"""
from __future__ import annotations

import math

from megalite.errors import MegaliteError

DECAY_STYLES = ("constant", "linear", "cosine")


class LRSchedule:
    """``lr_at(iteration)`` for warmup then decay (see the module docstring)."""

    def __init__(self, lr: float, min_lr: float, warmup_iters: float, decay_iters: int,
                 decay_style: str = "cosine", init_lr: float = 0.0):
        if decay_style not in DECAY_STYLES:
            raise MegaliteError(f"--lr-decay-style {decay_style!r}: choose one of "
                                f"{', '.join(DECAY_STYLES)}")
        if not (0 <= min_lr <= lr):
            raise MegaliteError(f"--min-lr {min_lr} and --lr {lr}: need 0 <= min-lr <= lr")
        if warmup_iters < 0 or decay_iters < 1:
            raise MegaliteError(f"--lr-warmup-iters {warmup_iters} must be >= 0 and the decay "
                                f"length {decay_iters} >= 1")
        if decay_style != "constant" and warmup_iters > decay_iters:
            raise MegaliteError(f"--lr-warmup-iters {warmup_iters} exceeds the decay length "
                                f"{decay_iters} (--lr-decay-iters, default --train-iters)")
        if not 0 <= init_lr <= lr:
            raise MegaliteError(f"--lr-warmup-init {init_lr} and --lr {lr}: need "
                                f"0 <= lr-warmup-init <= lr")
        self.lr, self.min_lr, self.init_lr = float(lr), float(min_lr), float(init_lr)
        self.warmup_iters, self.decay_iters = warmup_iters, int(decay_iters)
        self.decay_style = decay_style

    def lr_at(self, iteration: int) -> float:
        """Learning rate after ``iteration`` optimizer steps (>= 0): that of the next step."""
        if iteration < 0:
            raise MegaliteError(f"lr_at: steps count from 0, got {iteration}")
        w, d = self.warmup_iters, self.decay_iters
        if w > 0 and iteration <= w:
            return self.init_lr + (self.lr - self.init_lr) * iteration / w
        if self.decay_style == "constant":
            return self.lr
        if iteration >= d:
            return self.min_lr
        ratio = (iteration - w) / (d - w)
        if self.decay_style == "linear":
            coeff = 1.0 - ratio
        else:
            coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
        return self.min_lr + (self.lr - self.min_lr) * coeff

    def __repr__(self) -> str:
        return (f"LRSchedule(lr={self.lr}, min_lr={self.min_lr}, warmup_iters={self.warmup_iters}, "
                f"decay_iters={self.decay_iters}, decay_style={self.decay_style!r}, "
                f"init_lr={self.init_lr})")
