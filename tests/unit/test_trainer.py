"""The training loop in one process: what `--load` says it did, and `--keep-last` pruning."""
from __future__ import annotations

import os
from pathlib import Path

from megalite.config import parse_train_args
from megalite.training.trainer import pretrain

TINY = ["--config", str(Path(__file__).resolve().parents[2] / "configs" / "tiny-gpt.yaml"),
        "--mock-data", "--num-layers", "2", "--micro-batch-size", "2", "--global-batch-size", "2",
        "--eval-iters", "0", "--log-interval", "100", "--lr-warmup-iters", "0"]


def test_load_of_an_empty_directory_says_it_starts_from_scratch(tmp_path, capsys):
    result = pretrain(parse_train_args(TINY + ["--train-iters", "1", "--load", str(tmp_path)]))
    assert result.iteration == 1
    assert f"no checkpoint in {tmp_path}: starting from scratch" in capsys.readouterr().out


def test_keep_last_prunes_older_checkpoints_and_resume_continues(tmp_path, capsys):
    save = str(tmp_path / "ckpt")
    first = pretrain(parse_train_args(TINY + ["--train-iters", "3", "--save", save,
                                              "--save-interval", "1", "--keep-last", "2"]))
    assert sorted(n for n in os.listdir(save) if n.startswith("iter_")) == [
        "iter_0000002", "iter_0000003"]
    resumed = pretrain(parse_train_args(TINY + ["--train-iters", "4", "--load", save]))
    assert "resumed from" in capsys.readouterr().out and resumed.losses and len(resumed.losses) == 1
    assert resumed.iteration == 4 and first.iteration == 3


def _dropout_run(tmp_path, extra):
    """4 iterations with dropout, saved at 2; then a resume from iteration 2 with ``extra``."""
    save = str(tmp_path / "ckpt")
    args = TINY + ["--hidden-dropout", "0.2", "--attention-dropout", "0.2", "--train-iters", "4"]
    full = pretrain(parse_train_args(args + ["--save", save, "--save-interval", "2"]))
    with open(os.path.join(save, "latest"), "w") as f:
        f.write("iter_0000002\n")
    return full.losses, pretrain(parse_train_args(args + ["--load", save, *extra])).losses


def test_resume_restores_rng_unless_no_load_rng(tmp_path, capsys):
    """Dropout masks come from the saved RNG: bitwise with it, different with --no-load-rng
    (a fresh seeding); the optimizer state is restored either way."""
    full, resumed = _dropout_run(tmp_path / "a", [])
    assert resumed == full[2:]
    full, fresh_rng = _dropout_run(tmp_path / "b", ["--no-load-rng"])
    assert len(fresh_rng) == 2 and fresh_rng != full[2:]
    assert abs(fresh_rng[0] - full[2]) < 0.05 * full[2]    # same weights, other masks


def test_no_load_optim_starts_a_fresh_optimizer(tmp_path, capsys):
    full, resumed = _dropout_run(tmp_path, ["--no-load-optim"])
    out = capsys.readouterr().out
    assert "(weights only: fresh optimizer, --no-load-optim)" in out
    assert resumed[0] == full[2]           # same weights, data and RNG: the first loss is equal
    assert resumed[1] != full[3]           # the first step without Adam's moments differs
