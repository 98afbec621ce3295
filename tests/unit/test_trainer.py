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
