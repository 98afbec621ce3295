"""Iterations, dataset sizes and the learning-rate schedule against Megatron-LM's rules.

The reference for the learning rate is megatron-core 0.16.1's own OptimizerParamScheduler
(installed by ``make install``), stepped as Megatron-LM's training loop steps it (``increment``
= the global batch size per iteration, after every step that is not skipped). ``lr_at(t)`` is the
scheduler's value after t increments; the step of iteration t uses ``lr_at(t - 1 - skipped)``,
as Megatron-LM's does (its scheduler is set before the step), and the logged rate is the one
after the step, as Megatron-LM logs it. The values are compared for equality, no tolerance:
the formulas run in the same operation order. The dataset sizes follow Megatron-LM's get_train_valid_test_num_samples
and update_train_iters (megatron/training/training.py, which megatron-core does not ship),
written out here.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from megalite.training.prepare import parse_train_args
from megalite.training.schedule import (RunLRSchedule, dataset_num_samples,
                                        reconcile_lr_schedule, train_iterations)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

BASE = ["--model-preset", "tiny", "--mock-data", "--lr", "3e-4", "--min-lr", "3e-5",
        "--micro-batch-size", "2", "--global-batch-size", "6", "--eval-interval", "7",
        "--eval-iters", "3"]


def _megatron(lr, min_lr, warmup_steps, decay_steps, style, init_lr=0.0):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    return OptimizerParamScheduler(opt, init_lr=init_lr, max_lr=lr, min_lr=min_lr,
                                   lr_warmup_steps=warmup_steps, lr_decay_steps=decay_steps,
                                   lr_decay_style=style, start_wd=0.0, end_wd=0.0,
                                   wd_incr_steps=1, wd_incr_style="constant",
                                   use_checkpoint_opt_param_scheduler=False)


def _compare(config, g, megatron_scheduler, iters):
    """megalite's lr at iterations 1..iters == Megatron's after 1..iters increments of g."""
    ours = RunLRSchedule.from_config(config.optim, config.training, g)
    for t in range(1, iters + 1):
        megatron_scheduler.step(g)
        assert ours.lr_at(t) == megatron_scheduler.optimizer.param_groups[0]["lr"], t
    return ours


# Megatron-LM's get_optimizer_param_scheduler, iteration-based: steps are samples.
@pytest.mark.parametrize("style", ["linear", "cosine", "constant"])
def test_warmup_fraction_gives_megatrons_schedule_and_warmup_iterations(style):
    c = parse_train_args(BASE + ["--train-iters", "40", "--lr-decay-iters", "30",
                                 "--lr-warmup-fraction", "0.1", "--lr-decay-style", style])
    g = 6
    decay_steps = 30 * g
    warmup_steps = 0.1 * decay_steps   # Megatron-LM: fraction x lr_decay_steps (samples)
    ours = _compare(c, g, _megatron(3e-4, 3e-5, warmup_steps, decay_steps, style), 40)
    # the warmup covers the iterations t with t*g <= 0.1*180 = 18 samples: t = 1, 2, 3
    assert ours.warmup_iterations == 3
    assert ours.lr_at(3) == 3e-4 and ours.lr_at(2) < 3e-4


def test_iteration_based_warmup_and_decay_and_warmup_init():
    c = parse_train_args(BASE + ["--train-iters", "25", "--lr-warmup-iters", "5",
                                 "--lr-warmup-init", "1e-5", "--lr-decay-style", "cosine"])
    g = 6
    ours = _compare(c, g, _megatron(3e-4, 3e-5, 5 * g, 25 * g, "cosine", init_lr=1e-5), 30)
    assert ours.unit == g and ours.warmup_iterations == 5
    assert ours.lr_at(1) == 1e-5 + (3e-4 - 1e-5) * 6 / 30   # in samples, Megatron's order


def test_train_samples_sizes_iterations_data_and_the_sample_based_schedule():
    # 400 samples of 6 per iteration: 66 iterations (the partial last batch is not trained)
    c = parse_train_args(BASE + ["--train-samples", "400", "--lr-warmup-samples", "50",
                                 "--lr-decay-samples", "300", "--lr-decay-style", "linear"])
    g = 6
    assert train_iterations(c.training, g) == 400 // g == 66
    # Megatron-LM: train = train_samples; valid = (iters // eval_interval + 1) x eval_iters x g
    assert dataset_num_samples(c.training, g) == (400, (66 // 7 + 1) * 3 * g, 3 * g)
    ours = _compare(c, g, _megatron(3e-4, 3e-5, 50, 300, "linear"), 66)
    assert ours.unit == g and ours.warmup_iterations == 8   # 8 * 6 = 48 <= 50 < 54
    # decay defaults to --train-samples
    c = parse_train_args(BASE + ["--train-samples", "400", "--lr-warmup-fraction", "0.05"])
    _compare(c, g, _megatron(3e-4, 3e-5, 0.05 * 400, 400, "cosine"), 66)
    from megalite.errors import ConfigError
    with pytest.raises(ConfigError, match="--train-samples 5 is less than one global batch"):
        train_iterations(parse_train_args(BASE + ["--train-samples", "5"]).training, g)


def test_iteration_based_sizes_are_megatrons():
    c = parse_train_args(BASE + ["--train-iters", "20"])
    assert dataset_num_samples(c.training, 6) == (20 * 6, (20 // 7 + 1) * 3 * 6, 3 * 6)
    c = parse_train_args(BASE + ["--train-iters", "20", "--eval-iters", "0"])
    assert dataset_num_samples(c.training, 6) == (120, 0, 0)


def test_resumed_schedule_flags():
    """The schedule saved in a checkpoint (Megatron-LM's scheduler state, in samples) against
    this run's: --use-checkpoint-opt_param-scheduler takes the saved one, otherwise this run's
    is used and the difference named."""
    g = 6
    old = parse_train_args(BASE + ["--train-iters", "20", "--lr-warmup-iters", "2"])
    saved = RunLRSchedule.from_config(old.optim, old.training, g).state()
    assert saved == {"max_lr": 3e-4, "min_lr": 3e-5, "lr_warmup_steps": 12,
                     "lr_decay_steps": 120, "lr_decay_style": "cosine"}
    same = RunLRSchedule.from_config(old.optim, old.training, g)
    assert reconcile_lr_schedule(same, saved, old.optim) == (same, None)
    args = ["--train-iters", "30", "--lr-warmup-iters", "2", "--lr", "1e-3"]
    new = parse_train_args(BASE + args)
    mine = RunLRSchedule.from_config(new.optim, new.training, g)
    kept, line = reconcile_lr_schedule(mine, saved, new.optim)
    assert kept is mine and line == (
        "notice: this run's learning-rate schedule differs from the checkpoint's (lr 0.0003 -> "
        "0.001, decay samples 120 -> 180); using this run's (Megatron-LM refuses this without "
        "--override-opt_param-scheduler; --use-checkpoint-opt_param-scheduler takes the "
        "checkpoint's)")
    over = parse_train_args(BASE + args + ["--override-opt_param-scheduler"])
    kept, line = reconcile_lr_schedule(mine, saved, over.optim)
    assert kept is mine and line.startswith("learning-rate schedule from this run's flags")
    use = parse_train_args(BASE + args + ["--use-checkpoint-opt_param-scheduler"])
    taken, line = reconcile_lr_schedule(mine, saved, use.optim)
    assert line.startswith("learning-rate schedule from the checkpoint")
    original = RunLRSchedule.from_config(old.optim, old.training, g)
    assert [taken.lr_at(t) for t in range(1, 25)] == [original.lr_at(t) for t in range(1, 25)]


@pytest.mark.parametrize("precision", [[], ["--fp16", "--initial-loss-scale", str(2.0 ** 24),
                                           "--hysteresis", "1"]])
def test_trainer_steps_with_megatrons_rate(precision):
    """The optimizer step of iteration t uses Megatron-LM's rate after the steps taken before
    it (a skipped fp16 step does not advance the scheduler); with a warmup from 0 the first
    step leaves the weights as they were."""
    from megalite.training.trainer import Trainer

    g = 6
    config = parse_train_args(BASE + ["--train-iters", "8", "--lr-warmup-iters", "3",
                                      "--eval-iters", "0", "--weight-decay", "0.1", *precision])
    trainer = Trainer(config)
    ref = _megatron(3e-4, 3e-5, 3 * g, 8 * g, "cosine")
    used, original = [], trainer.optimizer.step
    trainer.optimizer.step = lambda lr: used.append(lr) or original(lr)
    params = [p for chunk in trainer.model_chunks for p in chunk.parameters()]
    before = [p.detach().clone() for p in params]
    expected, skipped = [], []
    for _ in range(8):
        expected.append(ref.optimizer.param_groups[0]["lr"])
        _, step = trainer.train_step()
        skipped.append(step.skipped)
        if not step.skipped:
            ref.step(g)
        if len(expected) == 1:
            assert all(torch.equal(a, p) for a, p in zip(before, params))   # lr 0: no change
    assert used == expected
    assert any(skipped) == bool(precision) and not all(skipped)
