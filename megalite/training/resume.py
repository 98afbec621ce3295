"""Where a run starts, with Megatron-LM's checkpoint flags:

========================================  ====================================================
``--load DIR`` holding a checkpoint       resume it: weights, optimizer (unless
                                          ``--no-load-optim``), random states (unless
                                          ``--no-load-rng``), iteration and data position
... with ``--finetune``                   its weights only (any layout); iteration 0, fresh
                                          optimizer, schedule, data position, seeded RNGs
... with ``--ckpt-step N``                the checkpoint of iteration N instead of ``latest``
``--load`` empty, ``--pretrained-         the pretrained weights, as ``--finetune`` (a requeued
checkpoint P``                            job then finds its own checkpoint in ``--load``)
``--load`` empty                          from scratch; an error with
                                          ``--exit-on-missing-checkpoint``
========================================  ====================================================

A checkpoint saved with ``--no-save-optim`` / ``--no-save-rng`` has no optimizer state /
random states: resuming it needs ``--no-load-optim`` / ``--no-load-rng`` (or ``--finetune``),
as in Megatron-LM, which stops there too; the refusal names the flags.
"""
from __future__ import annotations

from dataclasses import dataclass

from megalite.errors import MegaliteError

__all__ = ["StartPoint", "plan_start", "check_saved_parts", "saved_parts"]


@dataclass(frozen=True)
class StartPoint:
    """What the run starts from."""

    directory: str | None
    """The checkpoint directory read (None: nothing to read)."""
    mode: str
    """"resume" (the full state), "finetune" (the weights only) or "scratch"."""
    iteration: int | None = None
    """--ckpt-step: the checkpoint's iteration (None: ``latest``)."""
    extra: dict | None = None
    """The checkpoint's saved ``extra`` (None when there is none)."""


def plan_start(training) -> StartPoint:
    """The :class:`StartPoint` of a run with these training settings (reads one small file of
    the checkpoint, on every rank; MegaliteError for a missing --ckpt-step or
    --exit-on-missing-checkpoint without a checkpoint)."""
    from megalite.checkpoint import checkpoint_extra

    load, step = training.load, training.ckpt_step
    extra = checkpoint_extra(load, step) if load else None
    if extra is not None:
        return StartPoint(load, "finetune" if training.finetune else "resume", step, extra)
    if training.pretrained_checkpoint:
        pretrained = checkpoint_extra(training.pretrained_checkpoint)
        if pretrained is None:
            raise MegaliteError(f"--pretrained-checkpoint {training.pretrained_checkpoint}: no "
                                "checkpoint in it" + (f" (and none in --load {load})"
                                                      if load else ""))
        return StartPoint(training.pretrained_checkpoint, "finetune", None, pretrained)
    if load and training.exit_on_missing_checkpoint:
        raise MegaliteError(f"--load {load}: no checkpoint in it (--exit-on-missing-checkpoint)")
    return StartPoint(load, "scratch")


def saved_parts(no_save_optim: bool, no_save_rng: bool) -> dict:
    """The ``extra`` entries a checkpoint records about what it holds."""
    return {"saved_optimizer": not no_save_optim, "saved_rng": not no_save_rng}


def check_saved_parts(start: StartPoint, training) -> None:
    """MegaliteError when a resume needs state that the checkpoint was saved without."""
    if start.mode != "resume":
        return
    extra = start.extra or {}
    where = f"--load {start.directory}: its checkpoint"
    for key, saved_with, load_flag, what in (
            ("saved_optimizer", "--no-save-optim", "no_load_optim", "optimizer state"),
            ("saved_rng", "--no-save-rng", "no_load_rng", "random states")):
        if extra.get(key, True) is False and not getattr(training, load_flag):
            flag = "--" + load_flag.replace("_", "-")
            raise MegaliteError(f"{where} was saved with {saved_with} (no {what}): resume it "
                                f"with {flag}, or take its weights only with --finetune")
