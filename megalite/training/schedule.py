"""A run's sizes in Megatron-LM's terms: how many iterations, how many samples each dataset is
asked for, and the learning-rate schedule (iteration-based or sample-based).

* ``--train-iters N``: N iterations; the training data holds ``N x G`` samples (G: the global
  batch size); the learning rate warms up over ``--lr-warmup-iters`` (or ``fraction x decay``)
  and decays over ``--lr-decay-iters`` (default N).
* ``--train-samples S``: ``S // G`` iterations (the last partial batch is not trained, as in
  Megatron-LM); the training data holds S samples; warmup and decay are counted in samples
  (``--lr-warmup-samples``, ``--lr-decay-samples``, default S).
* Validation: ``(iterations // --eval-interval + 1) x --eval-iters x G`` samples; test:
  ``--eval-iters x G`` (Megatron-LM's ``get_train_valid_test_num_samples``).

The learning rate is :class:`~megalite.optim.lr_schedule.LRSchedule` counted in samples
(``--lr-warmup-iters W`` is ``W x G`` samples), as Megatron-LM's scheduler counts, so the
values are Megatron-LM's to the bit, and applied when Megatron-LM applies them: the scheduler
advances by ``G`` after every optimizer step that is not skipped (an fp16 overflow), so the step
of iteration ``t`` after ``k`` skipped steps uses the value at ``(t - 1 - k) x G`` samples, and
the rate logged for iteration ``t`` is the one after its step (the next step's), as
Megatron-LM logs it.

On resume the schedule saved with the optimizer state (:meth:`RunLRSchedule.state`, lengths
in samples, as Megatron-LM's scheduler saves them) is compared with this run's:
``--use-checkpoint-opt_param-scheduler`` takes the checkpoint's, otherwise this run's is used
and a difference is named in one line (Megatron-LM refuses one unless
``--override-opt_param-scheduler``).
"""
from __future__ import annotations

import dataclasses

from megalite.errors import ConfigError
from megalite.optim.lr_schedule import LRSchedule

__all__ = ["train_iterations", "with_train_iterations", "dataset_num_samples", "RunLRSchedule",
           "reconcile_lr_schedule"]


def train_iterations(training, global_batch_size: int) -> int:
    """Iterations of the run: --train-iters, or --train-samples // the global batch size."""
    if training.train_samples is None:
        return training.train_iters
    iters = training.train_samples // global_batch_size
    if iters < 1:
        raise ConfigError(f"--train-samples {training.train_samples} is less than one global "
                          f"batch ({global_batch_size})", "training", "train_samples")
    return iters


def with_train_iterations(config, global_batch_size: int):
    """``config`` with ``training.train_iters`` set from --train-samples (unchanged when the
    run is iteration-based)."""
    iters = train_iterations(config.training, global_batch_size)
    if iters == config.training.train_iters:
        return config
    return dataclasses.replace(config, training=dataclasses.replace(config.training,
                                                                    train_iters=iters))


def dataset_num_samples(training, global_batch_size: int) -> tuple[int, int, int]:
    """Samples the (train, valid, test) datasets are asked for (see the module docstring)."""
    g, iters = global_batch_size, train_iterations(training, global_batch_size)
    train = training.train_samples if training.train_samples is not None else iters * g
    eval_runs = iters // training.eval_interval + 1
    return train, eval_runs * training.eval_iters * g, training.eval_iters * g


class RunLRSchedule:
    """``lr_at(steps)`` of a run (see the module docstring); ``unit``: samples per
    iteration (the global batch size), the :class:`LRSchedule` counting samples."""

    def __init__(self, schedule: LRSchedule, unit: int, global_batch_size: int):
        self.schedule, self.unit, self.global_batch_size = schedule, unit, global_batch_size

    @classmethod
    def from_config(cls, optim, training, global_batch_size: int) -> "RunLRSchedule":
        """Megatron-LM's get_optimizer_param_scheduler: every length in samples."""
        g = global_batch_size
        if training.train_samples is not None:
            decay = optim.lr_decay_samples or training.train_samples
            warmup = optim.lr_warmup_samples
        else:
            decay = (optim.lr_decay_iters or training.train_iters) * g
            warmup = optim.lr_warmup_iters * g
        if optim.lr_warmup_fraction is not None:
            warmup = optim.lr_warmup_fraction * decay
        return cls(LRSchedule(optim.lr, optim.min_lr, warmup, decay, optim.lr_decay_style,
                              init_lr=optim.lr_warmup_init), g, g)

    def lr_at(self, steps: int) -> float:
        """Learning rate after ``steps`` optimizer steps (>= 0), i.e. that of the next step:
        the step of iteration ``t`` after ``k`` skipped steps uses ``lr_at(t - 1 - k)``."""
        return self.schedule.lr_at(steps * self.unit)

    @property
    def warmup_iterations(self) -> int:
        """Steps after which the learning rate is still warming up (after the last, it is lr)."""
        warmup = self.schedule.warmup_iters
        t = int(warmup // self.unit)
        while (t + 1) * self.unit <= warmup:   # the rule as lr_at applies it, not a division
            t += 1
        while t > 0 and t * self.unit > warmup:
            t -= 1
        return t

    def state(self) -> dict:
        """The schedule as Megatron-LM's scheduler saves it: lengths in samples."""
        s, scale = self.schedule, self.global_batch_size // self.unit
        return {"max_lr": s.lr, "min_lr": s.min_lr, "lr_warmup_steps": s.warmup_iters * scale,
                "lr_decay_steps": s.decay_iters * scale, "lr_decay_style": s.decay_style}

    @classmethod
    def from_state(cls, state: dict, init_lr: float, global_batch_size: int) -> "RunLRSchedule":
        """A sample-based schedule from :meth:`state` (a checkpoint's)."""
        return cls(LRSchedule(state["max_lr"], state["min_lr"], state["lr_warmup_steps"],
                              state["lr_decay_steps"], state["lr_decay_style"],
                              init_lr=min(init_lr, state["max_lr"])),
                   global_batch_size, global_batch_size)


_NAMES = {"max_lr": "lr", "min_lr": "min lr", "lr_warmup_steps": "warmup samples",
          "lr_decay_steps": "decay samples", "lr_decay_style": "decay style"}


def reconcile_lr_schedule(current: RunLRSchedule, saved: dict | None,
                          optim) -> tuple[RunLRSchedule, str | None]:
    """The schedule a resumed run uses, and the line to print about it (None: nothing to say).

    ``saved``: the checkpoint's :meth:`RunLRSchedule.state` (None in checkpoints saved without
    the optimizer state, or by an older megalite: this run's schedule is used)."""
    if not saved:
        return current, None
    mine = current.state()
    diff = [f"{_NAMES[k]} {saved[k]} -> {mine[k]}" for k in _NAMES
            if saved.get(k) != mine[k]]
    if not diff:
        return current, None
    if optim.use_checkpoint_opt_param_scheduler:
        return (RunLRSchedule.from_state(saved, optim.lr_warmup_init, current.global_batch_size),
                "learning-rate schedule from the checkpoint (--use-checkpoint-opt_param-"
                "scheduler), not this run's: " + ", ".join(diff).replace("->", "instead of"))
    if optim.override_opt_param_scheduler:
        return current, "learning-rate schedule from this run's flags "\
                        "(--override-opt_param-scheduler): " + ", ".join(diff)
    return current, ("notice: this run's learning-rate schedule differs from the checkpoint's ("
                     + ", ".join(diff) + "); using this run's (Megatron-LM refuses this "
                     "without --override-opt_param-scheduler; "
                     "--use-checkpoint-opt_param-scheduler takes the checkpoint's)")
