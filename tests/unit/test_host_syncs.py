"""The training loop reads nothing back to the host mid-iteration (issue 16, the lean step).

On a GPU every read of a device value (``.item()``, ``float(t)``, ``bool(t)``) waits for all the
work queued before it, so one per step drains the device's queue. This machine has no GPU, so
the tests watch the operator every such read dispatches to (``aten._local_scalar_dense``) in a
real CPU run and check where each one comes from:

* none from the optimizer step (norm, clipping, overflow skip: on the device, fused AdamW takes
  the overflow flag) in fp32 and bf16;
* the loop's own reads (``StepStats.settle``, via ``Trainer._settle``) read the previous iteration's loss, stop votes and
  step result, after the current iteration's forward/backward has been queued;
* the embedding's token-id range check reads on CPU only (on an accelerator it is an
  asynchronous device assert), so it is the one other reader allowed here.
"""
from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megalite.training.prepare import parse_train_args
from megalite.training.trainer import Trainer

ITERS = 6
GLOBAL_BATCH = 8


def _args(*extra: str) -> list[str]:
    return ["--mock-data", "--vocab-size", "1000", "--num-layers", "2", "--hidden-size", "64",
            "--num-attention-heads", "4", "--seq-length", "32", "--max-position-embeddings", "32",
            "--micro-batch-size", "4", "--global-batch-size", str(GLOBAL_BATCH),
            "--train-iters", str(ITERS), "--lr", "1e-3", "--eval-iters", "0",
            "--log-interval", "1000", *extra]


class _HostReads(TorchDispatchMode):
    """Records the innermost megalite function of every host read of a tensor value."""

    def __init__(self):
        super().__init__()
        self.readers: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            frames = [f for f in traceback.extract_stack() if "/megalite/" in f.filename]
            self.readers.append(" <- ".join(f.name for f in reversed(frames[-2:])))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("precision", [[], ["--bf16"]], ids=["fp32", "bf16"])
def test_the_step_reads_nothing_back_and_the_loop_reads_one_iteration_late(precision):
    trainer = Trainer(parse_train_args(_args(*precision)))
    settles = []
    settle = trainer._settle

    def watched_settle():
        if trainer.stats.pending is not None:
            settles.append((trainer.stats.pending.iteration, trainer.iteration,
                            trainer.train_data.consumed_samples))
        settle()

    trainer._settle = watched_settle
    with _HostReads() as reads:
        result = trainer.train()
    assert len(result.losses) == ITERS and all(l == l for l in result.losses)
    others = [r for r in reads.readers
              if not r.startswith(("host <- settle", "_check_ids_in_range"))]
    assert others == [], others
    assert any(r.startswith("host <- settle") for r in reads.readers)
    # iterations 1..ITERS-1 are read during the next one, after its batch was taken (its
    # forward/backward queued) and before its optimizer step; the last one at the end
    assert settles[:-1] == [(i, i, (i + 1) * GLOBAL_BATCH) for i in range(1, ITERS)]
    assert settles[-1] == (ITERS, ITERS, ITERS * GLOBAL_BATCH)


def test_deferred_reads_give_the_same_run_as_reading_every_step():
    """The loop (reads one iteration late) and train_step() (reads at once) run the same
    arithmetic: bitwise-equal losses and gradient norms."""
    looped = Trainer(parse_train_args(_args())).train()
    stepped = Trainer(parse_train_args(_args()))
    pairs = [stepped.train_step() for _ in range(ITERS)]
    assert looped.losses == [loss for loss, _ in pairs]
    assert looped.grad_norms == [step.grad_norm for _, step in pairs]


def test_a_skipped_step_holds_the_learning_rate_back_in_the_loop_too():
    """A non-finite gradient in fp32 skips the update on the device (fused AdamW's found_inf);
    the loop learns of it one iteration late but before the next optimizer step, so the next
    step still takes the rate of the steps taken (Megatron-LM's rule)."""
    trainer = Trainer(parse_train_args(_args("--lr-warmup-iters", "3")))
    used, step = [], trainer.optimizer.step

    def poisoned_step(lr):
        used.append(lr)
        if len(used) == 2:   # iteration 2: a NaN gradient
            next(p for p in trainer.optimizer.params).grad.view(-1)[0] = float("nan")
        return step(lr)

    trainer.optimizer.step = poisoned_step
    result = trainer.train()
    assert trainer.skipped_iters == 1
    lr_at = trainer.lr_schedule.lr_at
    assert used == [lr_at(0), lr_at(1), lr_at(1), lr_at(2), lr_at(3), lr_at(4)]
    assert len(result.losses) == ITERS
